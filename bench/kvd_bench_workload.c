/* kvd_bench_workload.c - seeded workload: word list, random streams, arrivals, request bodies.
 *
 * Prompts are words drawn from a fixed list whose entries each encode to exactly one
 * Qwen2 BPE token after a space (checked against the tokenizer's merges when the list
 * was made, and by test_kvd_bench_units against tokenizer.json's vocabulary), so
 * --prompt-tokens N gives prompts of about N tokens without linking a tokenizer. Every
 * session draws from its own stream derived from (seed, session index), and arrivals
 * from another, so a workload never depends on the order answers come back in.
 */
#include "kvd_bench.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const words[] = {
    "the", "of", "and", "to", "in", "is", "was", "for", "that", "with", "as", "on", "by",
    "at", "from", "his", "her", "are", "were", "be", "this", "which", "or", "an", "had",
    "not", "but", "have", "they", "their", "one", "all", "has", "been", "also", "its",
    "who", "new", "more", "after", "first", "other", "two", "can", "into", "time",
    "there", "when", "would", "some", "these", "only", "most", "over", "such", "than",
    "many", "about", "years", "during", "then", "so", "out", "may", "will", "up", "no",
    "made", "while", "both", "between", "world", "city", "under", "three", "where",
    "used", "later", "part", "through", "year", "people", "well", "them", "state",
    "known", "could", "any", "because", "since", "before", "being", "school", "what",
    "how", "work", "life", "even", "called", "against", "team", "name", "back", "much",
    "make", "found", "same", "still", "high", "each", "second", "game", "like", "series",
    "take", "day", "way", "very", "long", "good", "great", "little", "own", "old",
    "right", "big", "number", "place", "word", "home", "hand", "small", "large", "end",
    "group", "line", "set", "order", "house", "point", "family", "public", "system",
    "just", "early", "best", "several", "again", "last", "water", "form", "music", "film",
    "season", "left", "main", "did", "should", "country", "four", "five", "area", "began",
    "around", "another", "become", "power", "general", "said", "members", "history",
    "government", "national", "war", "play", "local", "do", "head", "top", "law", "few",
    "body", "next", "major", "include", "among", "thing", "side", "different", "down",
    "seen", "away", "along", "real", "open", "course", "report", "case", "age", "light",
    "church", "near", "question", "land", "often", "free", "book", "story", "based",
    "off", "service", "took", "help", "must", "level", "run", "late", "close", "field",
    "court", "rather", "show", "given", "full", "without", "social", "move", "white",
    "however", "less", "above", "told", "yet", "say", "need", "want", "keep", "every",
    "money", "build", "until", "always", "final", "whole", "type", "today", "support",
    "upon", "here", "too", "mind", "cause", "black", "study", "ever", "past", "sure",
    "job", "change", "center", "young", "men", "women", "friend", "child", "children",
    "father", "mother", "son", "daughter", "road", "river", "sea", "sky", "sun", "moon",
    "star", "tree", "flower", "garden", "door", "window", "room", "table", "chair", "bed",
    "kitchen", "food", "bread", "milk", "coffee", "tea", "fruit", "apple", "car", "train",
    "ship", "plane", "bus", "street", "town", "village", "market", "shop", "office",
    "paper", "letter", "news", "idea", "fact", "problem", "answer", "reason", "result",
    "example", "picture", "color", "red", "blue", "green", "yellow", "brown", "dark",
    "bright", "warm", "cold", "hot", "cool", "fast", "slow", "happy", "sad", "easy",
    "hard", "simple", "strong", "weak", "rich", "poor", "clean", "quick", "quiet", "loud",
    "heavy", "short", "tall", "wide", "deep", "true", "false", "fire", "earth", "wind",
    "rain", "snow", "ice", "stone", "wood", "metal", "gold", "silver", "glass", "plant",
    "animal", "bird", "fish", "dog", "cat", "horse", "cow", "night", "morning", "evening",
    "week", "month", "summer", "winter", "spring", "autumn", "hour", "minute", "moment",
    "person", "man", "woman", "boy", "girl", "king", "queen", "doctor", "teacher",
    "student", "worker", "player", "writer", "artist", "leader", "member", "voice",
    "sound", "song", "dance", "sport", "ball", "race", "goal", "prize", "gift", "party",
    "meeting", "plan", "project", "design", "model", "method", "process", "energy",
    "force", "heat", "space", "rest", "trip", "travel", "visit", "walk", "talk", "speak",
    "read", "write", "learn", "teach", "think", "know", "feel", "believe", "hope", "wish",
    "love", "hate", "give", "bring", "carry", "hold", "send", "tell", "ask", "call",
    "start", "stop", "wait", "watch", "look", "listen", "hear", "touch", "begin",
    "finish", "win", "lose", "pay", "buy", "sell", "cost", "spend", "save", "grow",
    "fall", "rise", "turn", "stand", "sit", "lie", "sleep", "wake", "eat", "drink",
    "cook", "wash", "wear", "drive", "ride", "fly", "swim", "climb", "jump", "push",
    "pull", "throw", "catch", "cut", "draw", "paint", "sing", "break", "fix", "clear",
};

const char kvd_bench_system_prompt[] = "You are a helpful assistant.";

size_t kvd_bench_word_count(void)
{
    return sizeof words / sizeof words[0];
}

const char *kvd_bench_word(size_t index)
{
    return index < kvd_bench_word_count() ? words[index] : NULL;
}

/* splitmix64 finalizer: also used to derive independent stream seeds. */
static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void kvd_bench_rng_seed(kvd_bench_rng *rng, uint64_t seed, uint64_t stream)
{
    rng->state = mix64(seed ^ mix64(stream + 0x9e3779b97f4a7c15ULL));
}

uint64_t kvd_bench_rng_next(kvd_bench_rng *rng)
{
    rng->state += 0x9e3779b97f4a7c15ULL;
    return mix64(rng->state);
}

double kvd_bench_rng_uniform(kvd_bench_rng *rng)
{
    return (double)(kvd_bench_rng_next(rng) >> 11) * 0x1.0p-53;
}

long kvd_bench_rng_pick(kvd_bench_rng *rng, kvd_bench_range range)
{
    if (range.hi <= range.lo)
        return range.lo;
    uint64_t span = (uint64_t)(range.hi - range.lo) + 1;
    return range.lo + (long)(kvd_bench_rng_next(rng) % span);
}

double kvd_bench_rng_exponential(kvd_bench_rng *rng, double rate)
{
    /* 1 - u is in (0, 1], so the log is finite. */
    return -log(1.0 - kvd_bench_rng_uniform(rng)) / rate;
}

int kvd_bench_make_words(kvd_sbuf *out, kvd_bench_rng *rng, long n_words)
{
    size_t old_len = out->len;
    size_t n = kvd_bench_word_count();
    for (long i = 0; i < n_words; i++) {
        const char *w = words[kvd_bench_rng_next(rng) % n];
        if ((i > 0 && kvd_sbuf_append(out, " ", 1) < 0) ||
            kvd_sbuf_append(out, w, strlen(w)) < 0) {
            out->len = old_len;
            if (out->data)
                out->data[old_len] = '\0';
            return KVD_ENOMEM;
        }
    }
    return 0;
}

/* Stream ids: sessions use their index, arrivals and think times constants far from
 * any index. */
#define ARRIVAL_STREAM 0xa7717a1500000000ULL
#define THINK_STREAM 0x7b1c0000000000ULL

void kvd_bench_session_rng(kvd_bench_rng *rng, uint64_t seed, long session)
{
    kvd_bench_rng_seed(rng, seed, (uint64_t)session);
}

void kvd_bench_arrival_rng(kvd_bench_rng *rng, uint64_t seed)
{
    kvd_bench_rng_seed(rng, seed, ARRIVAL_STREAM);
}

double kvd_bench_arrival_gap(kvd_bench_rng *rng, double rate)
{
    return kvd_bench_rng_exponential(rng, rate);
}

double kvd_bench_think_time(uint64_t seed, long session, long turn, double mean_s)
{
    if (mean_s <= 0.0)
        return 0.0;
    kvd_bench_rng rng;
    kvd_bench_rng_seed(&rng, seed ^ (uint64_t)turn * 0xd1b54a32d192ed03ULL, THINK_STREAM + (uint64_t)session);
    return kvd_bench_rng_exponential(&rng, 1.0 / mean_s);
}

void kvd_bench_arrivals(double *out, size_t n, double rate, uint64_t seed)
{
    kvd_bench_rng rng;
    kvd_bench_arrival_rng(&rng, seed);
    double t = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (i > 0)
            t += kvd_bench_arrival_gap(&rng, rate);
        out[i] = t;
    }
}

static int add_common(cJSON *root, const kvd_bench_options *opt, const char *model,
                      long max_tokens)
{
    cJSON *stream_options = cJSON_CreateObject();
    if (!stream_options)
        return KVD_ENOMEM;
    cJSON_AddItemToObject(root, "stream_options", stream_options);
    if (!cJSON_AddStringToObject(root, "model", model) ||
        !cJSON_AddNumberToObject(root, "max_tokens", (double)max_tokens) ||
        !cJSON_AddNumberToObject(root, "temperature", opt->temperature) ||
        !cJSON_AddTrueToObject(root, "stream") ||
        !cJSON_AddTrueToObject(stream_options, "include_usage"))
        return KVD_ENOMEM;
    if (opt->ignore_eos && !cJSON_AddTrueToObject(root, "ignore_eos"))
        return KVD_ENOMEM;
    return 0;
}

static int print_into(kvd_sbuf *out, cJSON *root)
{
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!text)
        return KVD_ENOMEM;
    kvd_sbuf_reset(out);
    int rc = kvd_sbuf_append(out, text, strlen(text));
    cJSON_free(text);
    return rc;
}

int kvd_bench_body_completion(kvd_sbuf *out, const kvd_bench_options *opt,
                              const char *model, const char *prompt, long max_tokens)
{
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return KVD_ENOMEM;
    if (!cJSON_AddStringToObject(root, "prompt", prompt) ||
        add_common(root, opt, model, max_tokens) < 0) {
        cJSON_Delete(root);
        return KVD_ENOMEM;
    }
    return print_into(out, root);
}

static int add_message(cJSON *messages, const char *role, const char *content)
{
    cJSON *m = cJSON_CreateObject();
    if (!m)
        return KVD_ENOMEM;
    cJSON_AddItemToArray(messages, m);
    if (!cJSON_AddStringToObject(m, "role", role) ||
        !cJSON_AddStringToObject(m, "content", content))
        return KVD_ENOMEM;
    return 0;
}

int kvd_bench_body_chat(kvd_sbuf *out, const kvd_bench_options *opt, const char *model,
                        const kvd_sbuf *history, size_t n_history, long max_tokens)
{
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return KVD_ENOMEM;
    cJSON *messages = cJSON_AddArrayToObject(root, "messages");
    int rc = messages ? add_message(messages, "system", kvd_bench_system_prompt) : KVD_ENOMEM;
    for (size_t i = 0; rc == 0 && i < n_history; i++)
        rc = add_message(messages, i % 2 == 0 ? "user" : "assistant",
                         history[i].data ? history[i].data : "");
    if (rc == 0)
        rc = add_common(root, opt, model, max_tokens);
    if (rc < 0) {
        cJSON_Delete(root);
        return rc;
    }
    return print_into(out, root);
}
