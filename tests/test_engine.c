/* test_engine.c - the engine on the tiny fixture model: determinism, limits, events.
 *
 * The central property: a request's tokens are the same whether it runs alone or
 * beside 31 others in a KV pool small enough to force preemptions, with prefill
 * chunks small enough to force chunking, for greedy and for seeded sampling. Around
 * it: prefix-cache hits (same output, cached tokens reported), stop strings across
 * token boundaries (never leaked), stop ids and EOS, max_tokens and the context cap,
 * n > 1 (shared prompt blocks; choice 0 equals a lone run with the seed, the others draw
 * from their own streams of it: choice 1 of seed s is not choice 0 of seed s + 1),
 * logit_bias, min_tokens and include_stop_str_in_output (exact ids, and the same
 * invariance under batching and preemption), the lm_head rows past the tokenizer never
 * sampled,
 * cancellation mid-prefill and mid-decode (blocks back, pool invariants hold), refusals
 * (KVD_ETOOLONG, KVD_EBUSY), and the engine thread. The model is KVD_TINY_MODEL
 * (random weights, so outputs are arbitrary but reproducible); expected values come
 * from lone runs of the same engine code, the property under test being invariance.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvd/kvd_engine.h"

#define MAX_OUT_TOKENS 512
#define MAX_OUT_TEXT 16384
#define PLAIN_VOCAB 151643 /* ids below this are ordinary BPE tokens */

typedef struct fixture {
    kvd_model *model;
    kvd_tokenizer *tok;
    kvd_grammar_vocab *gvocab; /* structured output: the tokens' bytes, mask as wide as a row */
    kvd_grammar *grammars[3];
} fixture;

typedef struct choice_out {
    int32_t tokens[MAX_OUT_TOKENS];
    int num_tokens;
    char text[MAX_OUT_TEXT];
    size_t text_len;
    size_t text_after[MAX_OUT_TOKENS]; /* delivered text length after each token's event */
    kvd_finish_reason finish;
    int num_finish_events;
    int cached_tokens;
    int completion_tokens;
    float first_logprob;
    int first_num_top;
    int32_t first_top_token;
    float first_top_logprob;
    int32_t runner_up[MAX_OUT_TOKENS]; /* the raw row's second best at each step (logprobs >= 2) */
} choice_out;

typedef struct req_out {
    int64_t id;
    int n;
    choice_out ch[4];
} req_out;

static int setup(void **state)
{
    const char *dir = getenv("KVD_TINY_MODEL");
    if (!dir) {
        fprintf(stderr, "KVD_TINY_MODEL is not set (run through meson test)\n");
        return -1;
    }
    fixture *f = calloc(1, sizeof *f);
    kvd_error err = {0};
    f->model = kvd_model_load(dir, NULL, &err);
    if (!f->model) {
        fprintf(stderr, "tiny model: %s\n", err.msg);
        return -1;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    f->tok = kvd_tokenizer_load(path, &err);
    if (!f->tok) {
        fprintf(stderr, "tokenizer: %s\n", err.msg);
        return -1;
    }
    f->gvocab = kvd_grammar_vocab_create(f->tok, f->model->config.vocab_size, &err);
    static const char schema[] = "{\"type\": \"object\", \"properties\": {\"c\": {\"enum\": [\"red\", \"blue\"]}, "
                                 "\"n\": {\"type\": \"integer\", \"minimum\": -5, \"maximum\": 500}, \"s\": "
                                 "{\"type\": \"string\", \"maxLength\": 6}}, \"required\": [\"c\", \"n\"], "
                                 "\"additionalProperties\": false}";
    static const char regex[] = "(ab|[0-9]{1,3}) (yes|no)";
    static const char gbnf[] = "root ::= \"[\" item (\",\" item){0,3} \"]\"\nitem ::= [a-z]{1,4}\n";
    if (f->gvocab) {
        f->grammars[0] = kvd_grammar_compile_json_schema(f->gvocab, schema, sizeof schema - 1, NULL, &err);
        f->grammars[1] = kvd_grammar_compile_regex(f->gvocab, regex, sizeof regex - 1, &err);
        f->grammars[2] = kvd_grammar_compile_gbnf(f->gvocab, gbnf, sizeof gbnf - 1, &err);
    }
    if (!f->grammars[0] || !f->grammars[1] || !f->grammars[2]) {
        fprintf(stderr, "grammars: %s\n", err.msg);
        return -1;
    }
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    for (int i = 0; i < 3; i++)
        kvd_grammar_release(f->grammars[i]);
    kvd_grammar_vocab_destroy(f->gvocab);
    kvd_tokenizer_destroy(f->tok);
    kvd_model_destroy(f->model);
    free(f);
    return 0;
}

static kvd_engine_config small_config(int num_blocks, int max_batched_tokens)
{
    kvd_engine_config cfg = kvd_engine_config_default();
    cfg.kv_num_blocks = (size_t)num_blocks;
    cfg.max_batched_tokens = max_batched_tokens;
    cfg.max_num_seqs = 64;
    cfg.num_threads = 1;
    cfg.max_queue = 0;
    return cfg;
}

static kvd_engine *make_engine(const fixture *f, const kvd_engine_config *cfg)
{
    kvd_error err = {0};
    kvd_engine *e = kvd_engine_create(f->model, f->tok, cfg, NULL, NULL, &err);
    if (!e)
        fail_msg("kvd_engine_create: %s", err.msg);
    return e;
}

/* Plain random token ids, reproducible from seed. */
static void make_prompt(int32_t *ids, int len, uint64_t seed)
{
    kvd_rng rng;
    kvd_rng_seed(&rng, seed);
    for (int i = 0; i < len; i++)
        ids[i] = (int32_t)(kvd_rng_uniform(&rng) * PLAIN_VOCAB);
}

static kvd_request_params greedy_params(int max_tokens)
{
    kvd_request_params p = kvd_request_params_default(NULL);
    p.max_tokens = max_tokens;
    p.ignore_eos = true;
    return p;
}

static kvd_request_params sampled_params(int max_tokens, uint64_t seed)
{
    kvd_request_params p = greedy_params(max_tokens);
    p.sampling.temperature = 0.8f;
    p.sampling.top_k = 40;
    p.sampling.top_p = 0.9f;
    p.sampling.repetition_penalty = 1.1f;
    p.sampling.presence_penalty = 0.2f;
    p.sampling.seed = seed;
    return p;
}

static int64_t submit_ok(kvd_engine *e, const int32_t *prompt, int len, const kvd_request_params *p)
{
    kvd_error err = {0};
    int64_t id = kvd_engine_submit(e, prompt, len, p, &err);
    if (id <= 0)
        fail_msg("submit: %lld %s", (long long)id, err.msg);
    return id;
}

static void collect(kvd_event *list, req_out *outs, int num_outs)
{
    for (kvd_event *ev = list; ev; ev = ev->next) {
        req_out *r = NULL;
        for (int i = 0; i < num_outs; i++)
            if (outs[i].id == (int64_t)ev->request_id)
                r = &outs[i];
        if (!r)
            fail_msg("event for unknown request %llu", (unsigned long long)ev->request_id);
        assert_in_range(ev->choice, 0, r->n - 1);
        choice_out *c = &r->ch[ev->choice];
        assert_int_equal(c->num_finish_events, 0); /* nothing after the last event */
        for (int t = 0; t < ev->num_tokens; t++) {
            assert_true(c->num_tokens < MAX_OUT_TOKENS);
            if (c->num_tokens == 0 && ev->logprobs) {
                c->first_logprob = ev->logprobs[0].logprob;
                c->first_num_top = ev->logprobs[0].num_top;
                c->first_top_token = ev->logprobs[0].top_tokens[0];
                c->first_top_logprob = ev->logprobs[0].top_logprobs[0];
            }
            if (ev->logprobs && ev->logprobs[t].num_top >= 2)
                c->runner_up[c->num_tokens] = ev->logprobs[t].top_tokens[1];
            c->tokens[c->num_tokens++] = ev->tokens[t];
        }
        assert_int_equal(ev->text[ev->text_len], '\0'); /* bytes may hold a NUL token: use text_len */
        assert_true(c->text_len + ev->text_len < MAX_OUT_TEXT);
        memcpy(c->text + c->text_len, ev->text, ev->text_len);
        c->text_len += ev->text_len;
        c->text[c->text_len] = '\0';
        if (c->num_tokens > 0)
            c->text_after[c->num_tokens - 1] = c->text_len;
        c->cached_tokens = ev->cached_tokens;
        c->completion_tokens = ev->completion_tokens;
        assert_int_equal(ev->completion_tokens, c->num_tokens);
        if (ev->finish != KVD_FINISH_NONE) {
            c->finish = ev->finish;
            c->num_finish_events++;
        }
    }
    kvd_event_free(list);
}

static void drain(kvd_engine *e, req_out *outs, int num_outs)
{
    kvd_error err = {0};
    for (int guard = 0; kvd_engine_busy(e); guard++) {
        assert_true(guard < 200000);
        int rc = kvd_engine_step(e, &err);
        if (rc < 0)
            fail_msg("step: %s", err.msg);
        collect(kvd_engine_poll_events(e), outs, num_outs);
    }
    collect(kvd_engine_poll_events(e), outs, num_outs);
}

static void assert_invariants(kvd_engine *e)
{
    kvd_error err = {0};
    if (kvd_engine_check_invariants(e, &err) != 0)
        fail_msg("%s", err.msg);
}

static void assert_same_output(const choice_out *a, const choice_out *b, int req_index)
{
    if (a->num_tokens != b->num_tokens)
        fail_msg("request %d: %d tokens vs %d", req_index, a->num_tokens, b->num_tokens);
    for (int t = 0; t < a->num_tokens; t++)
        if (a->tokens[t] != b->tokens[t])
            fail_msg("request %d: token %d differs: %d vs %d", req_index, t, a->tokens[t], b->tokens[t]);
    assert_int_equal(a->finish, b->finish);
    assert_int_equal(a->text_len, b->text_len);
    assert_memory_equal(a->text, b->text, a->text_len);
}

/* ---- the determinism property -------------------------------------------------- */

#define NPROMPTS 32
#define GEN_TOKENS 20

static void temp_dir(char *out, size_t cap);
static void remove_dir(const char *dir);

/* DET_DISK: sampled, with the disk tier under the tight pool (preempted sequences come
 * back through disk loads). */
typedef enum det_mode { DET_GREEDY, DET_SAMPLED, DET_FEATURES, DET_GRAMMAR, DET_DISK } det_mode;

/* Sampled, n = 2 for odd i, with a logit_bias, min_tokens over a few stop ids and
 * include_stop_str_in_output with a stop string: the request features beside the
 * sampler's, under the same invariance. */
static kvd_request_params feature_params(int i)
{
    static const kvd_logit_bias bias[3] = {{220, 4.0f}, {13, -2.0f}, {151700, 50.0f}};
    static const int32_t stop_ids[3] = {11, 198, 151645};
    static const char *const stops[1] = {"\x01\x02"};
    kvd_request_params p = sampled_params(GEN_TOKENS, 7000 + (uint64_t)i);
    p.n = 1 + i % 2;
    p.sampling.logit_bias = bias;
    p.sampling.num_logit_bias = 3;
    p.sampling.min_tokens = 6;
    p.stop_token_ids = stop_ids;
    p.num_stop_token_ids = 3;
    p.stop = stops;
    p.num_stop = 1;
    p.include_stop_str_in_output = true;
    return p;
}

/* Sampled (temperature 1), n = 2 for odd i, each under one of the fixture's grammars
 * (JSON Schema, regex, GBNF), EOS allowed: outputs end when their grammar does. */
static kvd_request_params grammar_params(const fixture *f, int i)
{
    kvd_request_params p = sampled_params(GEN_TOKENS, 11000 + (uint64_t)i);
    p.sampling.temperature = 1.0f;
    p.ignore_eos = false;
    p.n = 1 + i % 2;
    p.grammar = f->grammars[i % 3];
    return p;
}

/* Every output follows its grammar: a fresh matcher takes each token but a final EOS,
 * and a "stop" finish is where the grammar may end. */
static void assert_follows_grammar(const fixture *f, kvd_grammar *g, const choice_out *c)
{
    kvd_grammar_matcher *m = kvd_grammar_matcher_create(g, NULL);
    assert_non_null(m);
    int n = c->num_tokens;
    const kvd_model_config *mc = &f->model->config;
    bool eos_end = false;
    for (int k = 0; n > 0 && k < mc->num_eos_token_ids; k++)
        eos_end = eos_end || c->tokens[n - 1] == mc->eos_token_ids[k];
    for (int t = 0; t < n - eos_end; t++)
        if (kvd_grammar_matcher_accept(m, c->tokens[t], NULL) != 0)
            fail_msg("token %d (%d) is outside the grammar: %.*s", t, c->tokens[t], (int)c->text_len, c->text);
    if (c->finish == KVD_FINISH_STOP)
        assert_true(kvd_grammar_matcher_can_end(m));
    if (kvd_grammar_matcher_is_complete(m))
        assert_int_equal(c->finish, KVD_FINISH_STOP);
    kvd_grammar_matcher_destroy(m);
}

static void determinism(const fixture *f, det_mode mode)
{
    const bool sampled = mode != DET_GREEDY;
    /* The features run has half the prompts (with n = 2 for half of those): its
     * 24 sequences still need 2.7 times the pool, and sanitizer builds stay fast. */
    const int num = mode == DET_FEATURES ? NPROMPTS / 2 : NPROMPTS;
    static int32_t prompts[NPROMPTS][200];
    int lens[NPROMPTS];
    for (int i = 0; i < num; i++)
        lens[i] = 5 + (i * 61) % 196; /* 5..200, all different */
    lens[7] = 80;
    for (int i = 0; i < num; i++)
        make_prompt(prompts[i], lens[i], 500 + (uint64_t)i);
    /* Two prompts share a long prefix, so the prefix cache also plays a part. */
    assert_true(lens[3] >= 64);
    memcpy(prompts[7], prompts[3], 64 * sizeof(int32_t));
    kvd_request_params params[NPROMPTS];
    for (int i = 0; i < num; i++)
        params[i] = mode == DET_FEATURES ? feature_params(i)
                    : mode == DET_GRAMMAR ? grammar_params(f, i)
                    : sampled           ? sampled_params(GEN_TOKENS, 9000 + (uint64_t)i)
                                        : greedy_params(GEN_TOKENS);
    int total_tokens = 0;

    req_out *alone = calloc(NPROMPTS, sizeof *alone);
    req_out *together = calloc(NPROMPTS, sizeof *together);

    /* One by one, in an ample pool with the default budget. */
    kvd_engine_config roomy = small_config(1024, 512);
    roomy.enable_prefix_cache = false;
    kvd_engine *e = make_engine(f, &roomy);
    for (int i = 0; i < num; i++) {
        alone[i].n = params[i].n;
        alone[i].id = submit_ok(e, prompts[i], lens[i], &params[i]);
        drain(e, &alone[i], 1);
        for (int c = 0; c < alone[i].n; c++) {
            total_tokens += alone[i].ch[c].num_tokens;
            if (mode == DET_GRAMMAR)
                assert_follows_grammar(f, params[i].grammar, &alone[i].ch[c]);
            if (mode != DET_FEATURES && mode != DET_GRAMMAR) {
                assert_int_equal(alone[i].ch[c].num_tokens, GEN_TOKENS);
                assert_int_equal(alone[i].ch[c].finish, KVD_FINISH_LENGTH);
            }
            for (int t = 0; t < alone[i].ch[c].num_tokens; t++)
                assert_true(alone[i].ch[c].tokens[t] < kvd_tokenizer_vocab_size(f->tok));
        }
    }
    kvd_engine_destroy(e);

    /* All at once: 48 blocks of 16 tokens cannot hold 32 sequences of 25..220 tokens,
     * and 48-token steps split every long prompt into chunks. */
    kvd_engine_config tight = small_config(48, 48);
    char disk_dir[512] = "";
    if (mode == DET_DISK) {
        temp_dir(disk_dir, sizeof disk_dir);
        tight.kv_disk_dir = disk_dir;
        tight.kv_disk_bytes = 64u << 20;
    }
    e = make_engine(f, &tight);
    for (int i = 0; i < num; i++) {
        together[i].n = params[i].n;
        together[i].id = submit_ok(e, prompts[i], lens[i], &params[i]);
    }
    kvd_error err = {0};
    for (int guard = 0; kvd_engine_busy(e); guard++) {
        assert_true(guard < 100000);
        assert_true(kvd_engine_step(e, &err) >= 0);
        collect(kvd_engine_poll_events(e), together, num);
        if (guard % 16 == 0)
            assert_invariants(e);
    }
    kvd_engine_stats st;
    kvd_engine_stats_get(e, &st);
    print_message("  %s: %llu steps, %llu preemptions, %llu prefix-hit tokens, %llu from disk\n",
                  mode == DET_DISK      ? "disk"
                  : mode == DET_GRAMMAR ? "grammar"
                  : mode == DET_FEATURES ? "features"
                  : sampled             ? "sampled"
                                        : "greedy",
                  (unsigned long long)st.steps, (unsigned long long)st.num_preemptions,
                  (unsigned long long)st.kv.prefix_hit_tokens, (unsigned long long)st.disk_hit_tokens);
    if (mode == DET_DISK)
        assert_true(st.disk_hit_tokens > 0);
    assert_true(st.num_preemptions > 0);
    assert_int_equal(st.generation_tokens_total, total_tokens);
    assert_int_equal(st.kv.blocks_used, 0);
    assert_invariants(e);
    kvd_engine_destroy(e);
    if (disk_dir[0])
        remove_dir(disk_dir);

    for (int i = 0; i < num; i++)
        for (int c = 0; c < params[i].n; c++)
            assert_same_output(&alone[i].ch[c], &together[i].ch[c], i);
    free(alone);
    free(together);
}

static void test_determinism_greedy(void **state)
{
    determinism(*state, DET_GREEDY);
}

static void test_determinism_disk_tier(void **state)
{
    determinism(*state, DET_DISK);
}

static void test_determinism_sampled(void **state)
{
    determinism(*state, DET_SAMPLED);
}

static void test_determinism_request_features(void **state)
{
    determinism(*state, DET_FEATURES);
}

/* Structured output under batching, chunked prefill and preemption: the same tokens
 * as alone, every one inside its grammar. */
static void test_determinism_grammar(void **state)
{
    determinism(*state, DET_GRAMMAR);
}

/* ---- prefix cache ---------------------------------------------------------------- */

static void test_prefix_cache_hit(void **state)
{
    const fixture *f = *state;
    int32_t prompt[100], other[90];
    make_prompt(prompt, 100, 41);
    memcpy(other, prompt, 70 * sizeof *other);
    make_prompt(other + 70, 20, 42);
    kvd_engine_config cfg = small_config(256, 512);
    kvd_engine *e = make_engine(f, &cfg);
    kvd_request_params p = sampled_params(12, 77);
    req_out runs[3] = {{.n = 1}, {.n = 1}, {.n = 1}};
    runs[0].id = submit_ok(e, prompt, 100, &p);
    drain(e, &runs[0], 1);
    runs[1].id = submit_ok(e, prompt, 100, &p);
    drain(e, &runs[1], 1);
    runs[2].id = submit_ok(e, other, 90, &p);
    drain(e, &runs[2], 1);
    assert_int_equal(runs[0].ch[0].cached_tokens, 0);
    /* 6 full blocks of 16 (the last prompt token is always recomputed). */
    assert_int_equal(runs[1].ch[0].cached_tokens, 96);
    assert_same_output(&runs[0].ch[0], &runs[1].ch[0], 1);
    /* 70 shared tokens: 4 full blocks. */
    assert_int_equal(runs[2].ch[0].cached_tokens, 64);
    kvd_engine_stats st;
    kvd_engine_stats_get(e, &st);
    assert_int_equal(st.kv.prefix_hit_tokens, 96 + 64);
    assert_int_equal(st.kv.blocks_used, 0);
    assert_true(st.kv.blocks_cached > 0);
    kvd_engine_destroy(e);
}

/* ---- the disk tier ---------------------------------------------------------------- */

static void run_one(const fixture *f, const int32_t *prompt, int len, const kvd_request_params *p, req_out *out);

static void temp_dir(char *out, size_t cap)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(out, cap, "%s/kvd-engine-disk-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    if (!mkdtemp(out))
        fail_msg("mkdtemp %s", out);
}

static void remove_dir(const char *dir)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
}

static void count_warning(void *arg, const char *msg)
{
    (void)msg;
    (*(int *)arg)++;
}

/* A pool of 24 blocks (384 tokens) holds one prompt of 100 tokens and its output, so
 * three other prompts evict it: its pages go to disk, and asking again loads them back.
 * Greedy outputs must equal a lone run's in a large pool (a disk hit changes no token),
 * cached_tokens counts the pages loaded, and a new engine on the same directory (a
 * restart: the first one wrote its RAM pages at destroy) serves them too. */
static void test_disk_tier_hits_and_restart(void **state)
{
    const fixture *f = *state;
    char dir[512];
    temp_dir(dir, sizeof dir);
    enum { LEN = 100, OTHERS = 3 };
    int32_t prompt[LEN], others[OTHERS][120], turn2[LEN + 40];
    make_prompt(prompt, LEN, 501);
    for (int i = 0; i < OTHERS; i++)
        make_prompt(others[i], 120, 510 + (uint64_t)i);
    memcpy(turn2, prompt, sizeof prompt);
    make_prompt(turn2 + LEN, 40, 520);
    kvd_request_params p = greedy_params(20);

    /* Reference: lone runs without the tier. */
    req_out ref[2] = {{.n = 1}, {.n = 1}};
    run_one(f, prompt, LEN, &p, &ref[0]);
    run_one(f, turn2, LEN + 40, &p, &ref[1]);

    int warnings = 0;
    kvd_engine_config cfg = small_config(24, 64);
    cfg.kv_disk_dir = dir;
    cfg.kv_disk_bytes = 64u << 20;
    cfg.warn = count_warning;
    cfg.warn_arg = &warnings;
    kvd_engine *e = make_engine(f, &cfg);
    req_out first = {.n = 1};
    first.id = submit_ok(e, prompt, LEN, &p);
    drain(e, &first, 1);
    assert_same_output(&ref[0].ch[0], &first.ch[0], 0);
    for (int i = 0; i < OTHERS; i++) {
        req_out o = {.n = 1};
        o.id = submit_ok(e, others[i], 120, &p);
        drain(e, &o, 1);
        assert_invariants(e);
    }
    kvd_engine_stats st;
    kvd_engine_stats_get(e, &st);
    assert_true(st.disk_configured);
    assert_true(st.kv.evictions > 0);

    /* Wait for the evicted pages' files, then ask for the first prompt again. */
    for (int guard = 0; guard < 200; guard++) {
        kvd_engine_stats_get(e, &st);
        if (st.disk.pages >= 6)
            break;
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    assert_true(st.disk.pages >= 6);
    req_out again = {.n = 1};
    again.id = submit_ok(e, prompt, LEN, &p);
    drain(e, &again, 1);
    assert_invariants(e);
    assert_same_output(&ref[0].ch[0], &again.ch[0], 0);
    assert_int_equal(again.ch[0].cached_tokens, 96);
    kvd_engine_stats_get(e, &st);
    assert_true(st.disk_hits >= 1);
    assert_int_equal(st.disk_hit_tokens % 16, 0);
    assert_true(st.disk_hit_tokens >= 16);
    assert_true(st.disk.pages_read >= 1);
    assert_int_equal(st.disk.pages_corrupt, 0);
    kvd_engine_destroy(e);

    /* Restart: a fresh engine (empty pool) on the same directory. */
    e = make_engine(f, &cfg);
    req_out next = {.n = 1};
    next.id = submit_ok(e, turn2, LEN + 40, &p);
    drain(e, &next, 1);
    assert_invariants(e);
    assert_same_output(&ref[1].ch[0], &next.ch[0], 0);
    assert_int_equal(next.ch[0].cached_tokens, 96); /* the first prompt's 6 pages, all from disk */
    kvd_engine_stats_get(e, &st);
    assert_int_equal(st.disk_hit_tokens, 96);
    assert_int_equal(st.kv.prefix_hit_tokens, 0);

    /* Cancelled while its pages load: it ends, its blocks come back. */
    kvd_engine_destroy(e);
    e = make_engine(f, &cfg);
    req_out cancelled = {.n = 1};
    cancelled.id = submit_ok(e, turn2, LEN + 40, &p);
    kvd_error err = {0};
    assert_true(kvd_engine_step(e, &err) >= 0);
    kvd_engine_stats_get(e, &st);
    assert_int_equal(st.num_loading, 1);
    kvd_engine_cancel(e, (uint64_t)cancelled.id);
    drain(e, &cancelled, 1);
    assert_int_equal(cancelled.ch[0].finish, KVD_FINISH_CANCELLED);
    assert_invariants(e);
    kvd_engine_stats_get(e, &st);
    assert_int_equal(st.kv.blocks_used, 0);
    assert_int_equal(st.num_loading, 0);
    kvd_engine_destroy(e);
    assert_int_equal(warnings, 0);

    /* A second engine on a directory in use runs without the tier, with a warning. */
    e = make_engine(f, &cfg);
    kvd_engine *second = make_engine(f, &cfg);
    kvd_engine_stats_get(second, &st);
    assert_false(st.disk_configured);
    assert_int_equal(warnings, 1);
    req_out plain = {.n = 1};
    plain.id = submit_ok(second, prompt, LEN, &p);
    drain(second, &plain, 1);
    assert_same_output(&ref[0].ch[0], &plain.ch[0], 0);
    kvd_engine_destroy(second);
    kvd_engine_destroy(e);
    remove_dir(dir);
}

/* Chat sessions returning after their pages were evicted, all at once, into a pool
 * that holds a part of their histories: each turn must get the whole previous turn
 * (prompt and answer, full pages) back from RAM or disk, never recompute a part of it
 * that is on disk, and answer as a lone run does. Before the tier loaded every page
 * or waited, an admission under pressure loaded only the pages that fit then and
 * recomputed the rest. */
static void test_disk_tier_sessions_return(void **state)
{
    const fixture *f = *state;
    char dir[512];
    temp_dir(dir, sizeof dir);
    enum { SESSIONS = 4, TURNS = 4, FIRST = 120, NEW = 40, ANSWER = 16, BS = 16 };
    enum { MAX_LEN = FIRST + TURNS * (ANSWER + NEW) };
    int32_t prompts[SESSIONS][MAX_LEN];
    int lens[SESSIONS];
    for (int i = 0; i < SESSIONS; i++) {
        lens[i] = FIRST;
        make_prompt(prompts[i], FIRST, 900 + (uint64_t)i);
    }
    kvd_request_params p = greedy_params(ANSWER);
    /* 40 blocks: one session's last turn needs 18, the four together 72. */
    kvd_engine_config cfg = small_config(40, 64);
    cfg.kv_disk_dir = dir;
    cfg.kv_disk_bytes = 64u << 20;
    kvd_engine *e = make_engine(f, &cfg);
    for (int turn = 0; turn < TURNS; turn++) {
        req_out outs[SESSIONS];
        for (int i = 0; i < SESSIONS; i++) {
            outs[i] = (req_out){.n = 1};
            outs[i].id = submit_ok(e, prompts[i], lens[i], &p);
        }
        drain(e, outs, SESSIONS);
        assert_invariants(e);
        for (int i = 0; i < SESSIONS; i++) {
            req_out alone = {.n = 1};
            run_one(f, prompts[i], lens[i], &p, &alone);
            assert_same_output(&alone.ch[0], &outs[i].ch[0], i);
            /* The previous turn computed its prompt and all but its answer's last token. */
            int previous = lens[i] - NEW - 1;
            int expected = turn == 0 ? 0 : previous / BS * BS;
            if (outs[i].ch[0].cached_tokens != expected)
                fail_msg("turn %d, session %d: %d cached tokens of %d, expected %d", turn + 1, i,
                         outs[i].ch[0].cached_tokens, lens[i], expected);
            assert_int_equal(outs[i].ch[0].num_tokens, ANSWER);
            memcpy(prompts[i] + lens[i], outs[i].ch[0].tokens, ANSWER * sizeof(int32_t));
            make_prompt(prompts[i] + lens[i] + ANSWER, NEW, 950 + (uint64_t)(turn * SESSIONS + i));
            lens[i] += ANSWER + NEW;
        }
    }
    kvd_engine_stats st;
    kvd_engine_stats_get(e, &st);
    print_message("  sessions: %llu preemptions, %llu RAM-hit tokens, %llu from disk, %llu disk queries\n",
                  (unsigned long long)st.num_preemptions, (unsigned long long)st.kv.prefix_hit_tokens,
                  (unsigned long long)st.disk_hit_tokens, (unsigned long long)st.disk_queries);
    assert_true(st.kv.evictions > 0);
    assert_true(st.disk_hit_tokens > 0);
    assert_int_equal(st.kv.blocks_used, 0);
    kvd_engine_destroy(e);
    remove_dir(dir);
}

/* ---- stop rules ------------------------------------------------------------------ */

static void run_one(const fixture *f, const int32_t *prompt, int len, const kvd_request_params *p, req_out *out)
{
    kvd_engine_config cfg = small_config(256, 512);
    kvd_engine *e = make_engine(f, &cfg);
    out->n = p->n;
    out->id = submit_ok(e, prompt, len, p);
    drain(e, out, 1);
    assert_invariants(e);
    kvd_engine_destroy(e);
}

/* Byte length of the UTF-8 character starting with b (1 for a stray byte). */
static size_t utf8_len(unsigned char b)
{
    return b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 1;
}

static void test_stop_string_across_tokens(void **state)
{
    const fixture *f = *state;
    int32_t prompt[30];
    make_prompt(prompt, 30, 314);
    kvd_request_params p = greedy_params(40);
    req_out ref = {0};
    run_one(f, prompt, 30, &p, &ref);
    const choice_out *r = &ref.ch[0];
    assert_int_equal(r->num_tokens, 40);

    /* A stop string that starts inside token k's text (after its first character)
     * and ends inside token k+1's. */
    long start = -1, end = -1;
    for (int k = 1; k + 1 < r->num_tokens && start < 0; k++) {
        size_t a0 = r->text_after[k - 1], a1 = r->text_after[k], a2 = r->text_after[k + 1];
        if (a1 <= a0 || a2 <= a1)
            continue;
        size_t first = utf8_len((unsigned char)r->text[a0]);
        if (a0 + first >= a1)
            continue; /* token k is one character: no inside to start from */
        start = (long)(a0 + first);
        end = (long)(a1 + utf8_len((unsigned char)r->text[a1]));
    }
    if (start < 0)
        fail_msg("no pair of multi-character tokens in the reference text");
    char stop[64];
    assert_true(end - start < (long)sizeof stop);
    memcpy(stop, r->text + start, (size_t)(end - start));
    stop[end - start] = '\0';
    /* An earlier occurrence would stop earlier: cut at the first one. */
    const char *first_hit = memmem(r->text, r->text_len, stop, strlen(stop));
    size_t expect_len = (size_t)(first_hit - r->text);

    const char *stops[2] = {"this never appears \x01", stop};
    p.stop = stops;
    p.num_stop = 2;
    req_out got = {0};
    run_one(f, prompt, 30, &p, &got);
    const choice_out *g = &got.ch[0];
    assert_int_equal(g->finish, KVD_FINISH_STOP);
    assert_int_equal(g->num_finish_events, 1);
    assert_int_equal(g->text_len, expect_len);
    assert_memory_equal(g->text, r->text, expect_len);
    assert_null(memmem(g->text, g->text_len, stop, strlen(stop)));
    for (int t = 0; t < g->num_tokens; t++)
        assert_int_equal(g->tokens[t], r->tokens[t]);

    /* A stop string that only ever begins to match holds text back, then releases it. */
    char near[80];
    snprintf(near, sizeof near, "%s\x01\x02", stop);
    const char *near_stops[1] = {near};
    p.stop = near_stops;
    p.num_stop = 1;
    req_out full = {0};
    run_one(f, prompt, 30, &p, &full);
    assert_int_equal(full.ch[0].finish, KVD_FINISH_LENGTH);
    assert_same_output(&full.ch[0], r, 0);
}

/* The first k >= from of r whose token is new there, whose text ends on a clean
 * boundary and adds at least min_bytes; -1 if none. */
static int find_clean_new_token(const fixture *f, const choice_out *r, int from, size_t min_bytes)
{
    for (int t = from; t < r->num_tokens; t++) {
        bool seen = false;
        for (int u = 0; u < t; u++)
            seen |= r->tokens[u] == r->tokens[t];
        size_t len = 0;
        char *text = kvd_tokenizer_decode(f->tok, r->tokens, (size_t)t, true, &len, NULL);
        bool clean = text && len == r->text_after[t - 1] && r->text_after[t] - r->text_after[t - 1] >= min_bytes;
        free(text);
        if (!seen && clean)
            return t;
    }
    return -1;
}

static void test_stop_ids_eos_and_ignore_eos(void **state)
{
    fixture *f = *state;
    int32_t prompt[25];
    make_prompt(prompt, 25, 2718);
    kvd_request_params p = greedy_params(30);
    req_out ref = {0};
    run_one(f, prompt, 25, &p, &ref);
    const choice_out *r = &ref.ch[0];
    assert_int_equal(r->num_tokens, 30);
    int k = find_clean_new_token(f, r, 3, 0);
    assert_true(k >= 3);

    /* A stop token id: the token ends the choice, its text is left out. */
    int32_t stop_id = r->tokens[k];
    p.stop_token_ids = &stop_id;
    p.num_stop_token_ids = 1;
    req_out got = {0};
    run_one(f, prompt, 25, &p, &got);
    assert_int_equal(got.ch[0].finish, KVD_FINISH_STOP);
    assert_int_equal(got.ch[0].num_tokens, k + 1);
    assert_memory_equal(got.ch[0].tokens, r->tokens, (size_t)(k + 1) * sizeof(int32_t));
    assert_int_equal(got.ch[0].text_len, r->text_after[k - 1]);
    assert_memory_equal(got.ch[0].text, r->text, got.ch[0].text_len);

    /* The same token as the model's EOS: stops unless ignore_eos. */
    kvd_model_config saved = f->model->config;
    f->model->config.eos_token_ids[0] = stop_id;
    f->model->config.num_eos_token_ids = 1;
    p.stop_token_ids = NULL;
    p.num_stop_token_ids = 0;
    p.ignore_eos = false;
    req_out eos = {0};
    run_one(f, prompt, 25, &p, &eos);
    p.ignore_eos = true;
    req_out ignored = {0};
    run_one(f, prompt, 25, &p, &ignored);
    f->model->config = saved;
    assert_int_equal(eos.ch[0].finish, KVD_FINISH_STOP);
    assert_int_equal(eos.ch[0].num_tokens, k + 1);
    assert_int_equal(eos.ch[0].text_len, r->text_after[k - 1]);
    assert_same_output(&ignored.ch[0], r, 0);
}

static void test_max_tokens_and_context_cap(void **state)
{
    const fixture *f = *state;
    static int32_t prompt[4096];
    make_prompt(prompt, 4096, 99);
    kvd_request_params p = greedy_params(7);
    req_out a = {0};
    run_one(f, prompt, 10, &p, &a);
    assert_int_equal(a.ch[0].num_tokens, 7);
    assert_int_equal(a.ch[0].completion_tokens, 7);
    assert_int_equal(a.ch[0].finish, KVD_FINISH_LENGTH);

    /* 4090 prompt tokens in a 4096-token context leave 6, whatever max_tokens says. */
    const int ctx = f->model->config.max_position_embeddings;
    assert_int_equal(ctx, 4096);
    kvd_engine_config cfg = small_config(300, 512);
    kvd_engine *e = make_engine(f, &cfg);
    p.max_tokens = 100;
    req_out b = {.n = 1};
    b.id = submit_ok(e, prompt, ctx - 6, &p);
    drain(e, &b, 1);
    assert_int_equal(b.ch[0].num_tokens, 6);
    assert_int_equal(b.ch[0].finish, KVD_FINISH_LENGTH);

    /* Refusals: longer than the context, or than the whole pool. */
    kvd_error err = {0};
    assert_int_equal(kvd_engine_submit(e, prompt, ctx, &p, &err), KVD_ETOOLONG);
    assert_non_null(strstr(err.msg, "4096"));
    kvd_engine_destroy(e);
    kvd_engine_config little = small_config(8, 512);
    e = make_engine(f, &little);
    memset(&err, 0, sizeof err);
    assert_int_equal(kvd_engine_submit(e, prompt, 200, &p, &err), KVD_ETOOLONG);
    assert_non_null(strstr(err.msg, "200"));
    assert_non_null(strstr(err.msg, "128"));
    /* And bad parameters. */
    kvd_request_params bad = p;
    bad.n = 0;
    assert_int_equal(kvd_engine_submit(e, prompt, 10, &bad, &err), KVD_EINVAL);
    bad = p;
    bad.sampling.top_p = 2.0f;
    assert_int_equal(kvd_engine_submit(e, prompt, 10, &bad, &err), KVD_EINVAL);
    int32_t out_of_vocab = f->model->config.vocab_size;
    assert_int_equal(kvd_engine_submit(e, &out_of_vocab, 1, &p, &err), KVD_EINVAL);
    assert_false(kvd_engine_busy(e));
    kvd_engine_destroy(e);
}

/* ---- n > 1 ------------------------------------------------------------------------ */

static void test_n_choices_share_prompt_blocks(void **state)
{
    const fixture *f = *state;
    int32_t prompt[100];
    make_prompt(prompt, 100, 1234);
    kvd_engine_config cfg = small_config(256, 512);
    kvd_engine *e = make_engine(f, &cfg);
    kvd_request_params p = sampled_params(10, 600);
    p.n = 4;
    req_out r = {.n = 4};
    r.id = submit_ok(e, prompt, 100, &p);
    kvd_error err = {0};
    /* Step 1 prefills and forks (4 first tokens); step 2 feeds each its token. */
    assert_int_equal(kvd_engine_step(e, &err), 1);
    collect(kvd_engine_poll_events(e), &r, 1);
    for (int c = 0; c < 4; c++)
        assert_int_equal(r.ch[c].num_tokens, 1);
    assert_int_equal(kvd_engine_step(e, &err), 4);
    collect(kvd_engine_poll_events(e), &r, 1);
    kvd_engine_stats st;
    kvd_engine_stats_get(e, &st);
    /* 6 full prompt blocks shared by all four; the partly filled seventh was copied
     * for three of them: 10 blocks, not 4 x 7. */
    assert_int_equal(st.kv.blocks_used, 6 + 4);
    assert_int_equal(st.kv.cow_copies, 3);
    assert_invariants(e);
    drain(e, &r, 1);
    kvd_engine_destroy(e);

    /* Choice 0 is the lone run with the seed; choice 1 is not the lone run with seed + 1
     * (the old seed + choice rule, which made requests' choices coincide). */
    kvd_request_params one = sampled_params(10, 600);
    req_out alone = {0};
    run_one(f, prompt, 100, &one, &alone);
    assert_same_output(&r.ch[0], &alone.ch[0], 0);
    one.sampling.seed = 601;
    req_out next_seed = {0};
    run_one(f, prompt, 100, &one, &next_seed);
    assert_true(memcmp(r.ch[1].tokens, next_seed.ch[0].tokens, 10 * sizeof(int32_t)) != 0);
    int differ = 0;
    for (int c = 1; c < 4; c++)
        differ += memcmp(r.ch[c].tokens, r.ch[0].tokens, 10 * sizeof(int32_t)) != 0;
    assert_true(differ > 0);
}

/* Steps a fresh engine until idle with three prompts submitted together; records the
 * step in which each got its first token, its timing, and its tokens. */
typedef struct pack_run {
    int first_step[3];
    kvd_request_timing timing[3];
    int32_t tokens[3][8];
    int num_tokens[3];
} pack_run;

static void run_three(const fixture *f, int prompt_len, int pack_tokens, pack_run *out)
{
    memset(out, 0, sizeof *out);
    kvd_engine_config cfg = small_config(256, 512);
    cfg.prefill_pack_tokens = pack_tokens;
    kvd_engine *e = make_engine(f, &cfg);
    int64_t ids[3];
    for (int i = 0; i < 3; i++) {
        int32_t prompt[200];
        make_prompt(prompt, prompt_len, 900 + (uint64_t)i);
        kvd_request_params p = greedy_params(4);
        ids[i] = submit_ok(e, prompt, prompt_len, &p);
    }
    kvd_error err = {0};
    for (int step = 1; kvd_engine_busy(e); step++) {
        assert_true(step < 100);
        assert_true(kvd_engine_step(e, &err) >= 0);
        kvd_event *list = kvd_engine_poll_events(e);
        for (kvd_event *ev = list; ev; ev = ev->next)
            for (int i = 0; i < 3; i++) {
                if ((int64_t)ev->request_id != ids[i] || ev->num_tokens == 0)
                    continue;
                if (out->num_tokens[i] == 0) {
                    out->first_step[i] = step;
                    out->timing[i] = ev->timing;
                }
                out->tokens[i][out->num_tokens[i]++] = ev->tokens[0];
            }
        kvd_event_free(list);
    }
    kvd_engine_destroy(e);
}

/* Prompts that arrive together: a step takes no further prompt once it holds
 * prefill_pack_tokens of prefill, so 150-token prompts get their first tokens in steps
 * 1, 2, 3 (each step: the earlier ones' decodes plus the next prompt) instead of all
 * at the end of one 450-token step; 40-token prompts still share one step. The tokens
 * are the same either way, and each request's timing names its steps exactly. */
static void test_prefill_pack_serves_arrivals_in_turn(void **state)
{
    const fixture *f = *state;
    pack_run packed, filled, small;
    run_three(f, 150, 128, &packed);
    run_three(f, 150, 0, &filled);
    run_three(f, 40, 128, &small);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(packed.first_step[i], i + 1);
        assert_int_equal(packed.timing[i].prefill_steps, 1);
        /* its prompt plus one decode token of each earlier request */
        assert_int_equal(packed.timing[i].prefill_step_tokens, 150 + i);
        assert_int_equal(filled.first_step[i], 1);
        assert_int_equal(filled.timing[i].prefill_step_tokens, 450);
        assert_int_equal(small.first_step[i], 1);
        assert_int_equal(small.timing[i].prefill_step_tokens, 120);
        assert_int_equal(packed.num_tokens[i], 4);
        assert_int_equal(filled.num_tokens[i], 4);
        assert_memory_equal(packed.tokens[i], filled.tokens[i], 4 * sizeof(int32_t));
        assert_true(packed.timing[i].prefill_ms > 0.0f);
    }
    /* Waiting for the earlier prompts' steps is queue time. */
    assert_true(packed.timing[2].queue_ms > packed.timing[0].queue_ms);
}

/* Four choices in a pool that holds barely more than one: they take turns through
 * preemption (choices preempting themselves included), on the engine thread, and
 * each still equals the same choice of the request run in a roomy pool. */
static void test_n_choices_under_pressure(void **state)
{
    const fixture *f = *state;
    int32_t prompt[60];
    make_prompt(prompt, 60, 4321);
    kvd_request_params p = sampled_params(30, 800);
    p.n = 4;
    kvd_engine_config cfg = small_config(8, 512);
    kvd_error err = {0};
    kvd_engine *e = make_engine(f, &cfg);
    assert_int_equal(kvd_engine_start(e, &err), 0);
    req_out r = {.n = 4};
    r.id = submit_ok(e, prompt, 60, &p);
    for (int guard = 0; kvd_engine_busy(e); guard++) {
        assert_true(guard < 6000);
        kvd_engine_wait_events(e, 10);
        collect(kvd_engine_poll_events(e), &r, 1);
    }
    collect(kvd_engine_poll_events(e), &r, 1);
    kvd_engine_stats st;
    kvd_engine_stats_get(e, &st);
    assert_true(st.num_preemptions > 0);
    assert_int_equal(st.kv.blocks_used, 0);
    assert_invariants(e);
    kvd_engine_destroy(e);
    req_out roomy = {0};
    run_one(f, prompt, 60, &p, &roomy);
    for (int c = 0; c < 4; c++) {
        assert_int_equal(r.ch[c].num_finish_events, 1);
        assert_same_output(&r.ch[c], &roomy.ch[c], c);
    }
}

/* ---- cancellation ------------------------------------------------------------------ */

static void test_cancel_mid_prefill_and_mid_decode(void **state)
{
    const fixture *f = *state;
    static int32_t long_prompt[1000];
    make_prompt(long_prompt, 1000, 5);
    int32_t short_prompt[20];
    make_prompt(short_prompt, 20, 6);
    kvd_engine_config cfg = small_config(256, 64);
    kvd_engine *e = make_engine(f, &cfg);
    kvd_error err = {0};

    /* Mid-prefill: two 64-token chunks of a 1000-token prompt, n = 2. */
    kvd_request_params p = greedy_params(50);
    p.n = 2;
    req_out a = {.n = 2};
    a.id = submit_ok(e, long_prompt, 1000, &p);
    assert_int_equal(kvd_engine_step(e, &err), 1);
    assert_int_equal(kvd_engine_step(e, &err), 1);
    collect(kvd_engine_poll_events(e), &a, 1);
    kvd_engine_stats st;
    kvd_engine_stats_get(e, &st);
    assert_int_equal(st.kv.blocks_used, 8);
    kvd_engine_cancel(e, (uint64_t)a.id);
    kvd_engine_cancel(e, 987654); /* unknown: ignored */
    assert_int_equal(kvd_engine_step(e, &err), 0);
    collect(kvd_engine_poll_events(e), &a, 1);
    for (int c = 0; c < 2; c++) {
        assert_int_equal(a.ch[c].finish, KVD_FINISH_CANCELLED);
        assert_int_equal(a.ch[c].num_finish_events, 1);
        assert_int_equal(a.ch[c].num_tokens, 0);
    }
    kvd_engine_stats_get(e, &st);
    assert_int_equal(st.kv.blocks_used, 0);
    assert_int_equal(st.kv.blocks_cached, 8); /* the computed full blocks stay reusable */
    assert_int_equal(st.num_running + st.num_waiting, 0);
    assert_invariants(e);
    assert_false(kvd_engine_busy(e));

    /* Mid-decode, beside a request that carries on. */
    req_out b[2] = {{.n = 1}, {.n = 1}};
    kvd_request_params q = greedy_params(30);
    b[0].id = submit_ok(e, short_prompt, 20, &q);
    b[1].id = submit_ok(e, long_prompt + 500, 40, &q);
    for (int i = 0; i < 5; i++)
        assert_true(kvd_engine_step(e, &err) > 0);
    collect(kvd_engine_poll_events(e), b, 2);
    assert_true(b[0].ch[0].num_tokens >= 3);
    kvd_engine_cancel(e, (uint64_t)b[0].id);
    drain(e, b, 2);
    assert_int_equal(b[0].ch[0].finish, KVD_FINISH_CANCELLED);
    assert_true(b[0].ch[0].num_tokens < 30);
    assert_int_equal(b[1].ch[0].finish, KVD_FINISH_LENGTH);
    assert_int_equal(b[1].ch[0].num_tokens, 30);
    kvd_engine_cancel(e, (uint64_t)b[1].id); /* finished: ignored */
    assert_int_equal(kvd_engine_step(e, &err), 0);
    assert_null(kvd_engine_poll_events(e));
    kvd_engine_stats_get(e, &st);
    assert_int_equal(st.kv.blocks_used, 0);
    assert_invariants(e);
    kvd_engine_destroy(e);
}

/* ---- request features ------------------------------------------------------------ */

/* Greedy ids under logit_bias, exactly: -1000 on the first token makes the raw row's
 * runner-up first; +1000 on an id makes every token that id; a bias on an lm_head row
 * past the tokenizer (151700) changes nothing, greedy or sampled, as those rows are
 * never drawn. */
static void test_logit_bias_exact(void **state)
{
    const fixture *f = *state;
    int32_t prompt[20];
    make_prompt(prompt, 20, 77);
    kvd_request_params p = greedy_params(8);
    p.sampling.logprobs = 2;
    req_out ref = {0};
    run_one(f, prompt, 20, &p, &ref);
    const choice_out *r = &ref.ch[0];

    kvd_logit_bias down = {r->tokens[0], -1000.0f};
    p.sampling.logit_bias = &down;
    p.sampling.num_logit_bias = 1;
    req_out got = {0};
    run_one(f, prompt, 20, &p, &got);
    assert_int_equal(got.ch[0].tokens[0], r->runner_up[0]);

    kvd_logit_bias up = {12345, 1000.0f};
    p.sampling.logit_bias = &up;
    req_out forced = {0};
    run_one(f, prompt, 20, &p, &forced);
    assert_int_equal(forced.ch[0].num_tokens, 8);
    for (int t = 0; t < 8; t++)
        assert_int_equal(forced.ch[0].tokens[t], 12345);

    kvd_logit_bias padding = {151700, 1000.0f};
    assert_true(f->model->config.vocab_size > 151700 && kvd_tokenizer_vocab_size(f->tok) <= 151700);
    p.sampling.logit_bias = &padding;
    req_out unchanged = {0};
    run_one(f, prompt, 20, &p, &unchanged);
    assert_same_output(&unchanged.ch[0], r, 0);
    kvd_request_params hot = sampled_params(12, 5);
    hot.sampling.temperature = 2.0f;
    hot.sampling.top_k = 0;
    hot.sampling.top_p = 1.0f;
    req_out plain = {0}, biased = {0};
    run_one(f, prompt, 20, &hot, &plain);
    hot.sampling.logit_bias = &padding;
    hot.sampling.num_logit_bias = 1;
    run_one(f, prompt, 20, &hot, &biased);
    assert_same_output(&biased.ch[0], &plain.ch[0], 0);

    /* Refused at submit: an id outside the model's rows, min_tokens > max_tokens. */
    kvd_engine_config cfg = small_config(64, 512);
    kvd_engine *e = make_engine(f, &cfg);
    kvd_error err = {0};
    kvd_logit_bias outside = {f->model->config.vocab_size, 1.0f};
    kvd_request_params bad = greedy_params(8);
    bad.sampling.logit_bias = &outside;
    bad.sampling.num_logit_bias = 1;
    assert_int_equal(kvd_engine_submit(e, prompt, 20, &bad, &err), KVD_EINVAL);
    assert_non_null(strstr(err.msg, "logit_bias"));
    bad = greedy_params(8);
    bad.sampling.min_tokens = 9;
    assert_int_equal(kvd_engine_submit(e, prompt, 20, &bad, &err), KVD_EINVAL);
    assert_non_null(strstr(err.msg, "min_tokens"));
    assert_false(kvd_engine_busy(e));
    kvd_engine_destroy(e);
}

/* min_tokens: with the model's EOS set to the greedy run's k-th token, the run stops
 * there; with min_tokens = k + 2 the EOS is masked at step k (the raw runner-up comes
 * instead) and no stop rule ends the choice before k + 2 tokens. A stop string found
 * only before min_tokens does not stop the choice at all. */
static void test_min_tokens_exact(void **state)
{
    fixture *f = *state;
    int32_t prompt[25];
    make_prompt(prompt, 25, 2718);
    kvd_request_params p = greedy_params(30);
    p.sampling.logprobs = 2;
    req_out ref = {0};
    run_one(f, prompt, 25, &p, &ref);
    const choice_out *r = &ref.ch[0];
    int k = find_clean_new_token(f, r, 3, 1);
    assert_true(k >= 3);

    kvd_model_config saved = f->model->config;
    f->model->config.eos_token_ids[0] = r->tokens[k];
    f->model->config.num_eos_token_ids = 1;
    p.ignore_eos = false;
    req_out eos = {0}, held = {0};
    run_one(f, prompt, 25, &p, &eos);
    p.sampling.min_tokens = k + 2;
    run_one(f, prompt, 25, &p, &held);
    f->model->config = saved;
    assert_int_equal(eos.ch[0].finish, KVD_FINISH_STOP);
    assert_int_equal(eos.ch[0].num_tokens, k + 1);
    const choice_out *h = &held.ch[0];
    assert_true(h->num_tokens >= k + 2);
    assert_memory_equal(h->tokens, r->tokens, (size_t)k * sizeof(int32_t));
    assert_int_equal(h->tokens[k], r->runner_up[k]);
    for (int t = 0; t < k + 2; t++)
        assert_int_not_equal(h->tokens[t], r->tokens[k]);

    /* A stop string that occurs once in the reference text, inside its first tokens. */
    int j = -1;
    char stop[64];
    size_t stop_len = 0;
    for (int t = 1; t < 8 && j < 0; t++) {
        size_t a = r->text_after[t - 1], b = r->text_after[t];
        if (b - a < 2 || b - a >= sizeof stop)
            continue;
        memcpy(stop, r->text + a, b - a);
        stop_len = b - a;
        const char *first = memmem(r->text, r->text_len, stop, stop_len);
        if (first == r->text + a && !memmem(first + 1, r->text_len - a - 1, stop, stop_len))
            j = t;
    }
    assert_true(j >= 1);
    const char *stops[1] = {stop};
    kvd_request_params q = greedy_params(30);
    q.stop = stops;
    q.stop_len = &stop_len;
    q.num_stop = 1;
    req_out cut = {0}, through = {0};
    run_one(f, prompt, 25, &q, &cut);
    assert_int_equal(cut.ch[0].finish, KVD_FINISH_STOP);
    assert_int_equal(cut.ch[0].num_tokens, j + 1);
    q.sampling.min_tokens = j + 3;
    run_one(f, prompt, 25, &q, &through);
    assert_same_output(&through.ch[0], r, 0);
}

/* include_stop_str_in_output: the text runs to the end of the stop string (a stop
 * string split across tokens, one holding a NUL byte after it), and a stop id's own
 * text is kept. */
static void test_include_stop_str_in_output(void **state)
{
    fixture *f = *state;
    int32_t prompt[30];
    make_prompt(prompt, 30, 314);
    kvd_request_params p = greedy_params(40);
    req_out ref = {0};
    run_one(f, prompt, 30, &p, &ref);
    const choice_out *r = &ref.ch[0];
    /* The reference's bytes 3 characters into token 5 .. 2 bytes into token 6. */
    int k = find_clean_new_token(f, r, 5, 4);
    assert_true(k >= 5 && k + 1 < r->num_tokens);
    size_t start = r->text_after[k - 1] + 2, end = r->text_after[k] + 1;
    assert_true(end <= r->text_after[k + 1]);
    char stop[64];
    size_t stop_len = end - start;
    memcpy(stop, r->text + start, stop_len);
    const char *hit = memmem(r->text, r->text_len, stop, stop_len);
    size_t keep = (size_t)(hit - r->text) + stop_len;
    /* A second stop string with a NUL inside never matches: NUL is a byte like others. */
    char with_nul[8] = {stop[0], '\0', stop[1]};
    const char *stops[2] = {with_nul, stop};
    size_t lens[2] = {3, stop_len};
    p.stop = stops;
    p.stop_len = lens;
    p.num_stop = 2;
    p.include_stop_str_in_output = true;
    req_out got = {0};
    run_one(f, prompt, 30, &p, &got);
    assert_int_equal(got.ch[0].finish, KVD_FINISH_STOP);
    assert_int_equal(got.ch[0].text_len, keep);
    assert_memory_equal(got.ch[0].text, r->text, keep);

    /* A stop id: its text stays with include_stop_str_in_output, goes without. */
    int32_t stop_id = r->tokens[k];
    kvd_request_params q = greedy_params(40);
    q.stop_token_ids = &stop_id;
    q.num_stop_token_ids = 1;
    req_out without = {0}, with = {0};
    run_one(f, prompt, 30, &q, &without);
    q.include_stop_str_in_output = true;
    run_one(f, prompt, 30, &q, &with);
    assert_int_equal(without.ch[0].num_tokens, k + 1);
    assert_int_equal(without.ch[0].text_len, r->text_after[k - 1]);
    assert_int_equal(with.ch[0].num_tokens, k + 1);
    assert_int_equal(with.ch[0].text_len, r->text_after[k]);
    assert_memory_equal(with.ch[0].text, r->text, r->text_after[k]);
}

/* ---- queue bound ------------------------------------------------------------------ */

static void test_queue_full_busy(void **state)
{
    const fixture *f = *state;
    int32_t prompt[12];
    make_prompt(prompt, 12, 8);
    kvd_engine_config cfg = small_config(64, 512);
    cfg.max_queue = 2;
    kvd_engine *e = make_engine(f, &cfg);
    kvd_request_params p = greedy_params(3);
    req_out r[3] = {{.n = 1}, {.n = 1}, {.n = 1}};
    r[0].id = submit_ok(e, prompt, 12, &p);
    r[1].id = submit_ok(e, prompt, 12, &p);
    kvd_error err = {0};
    assert_int_equal(kvd_engine_submit(e, prompt, 12, &p, &err), KVD_EBUSY);
    assert_non_null(strstr(err.msg, "queue full"));
    /* Admission empties the queue. */
    assert_int_equal(kvd_engine_step(e, &err), 2);
    r[2].id = submit_ok(e, prompt, 12, &p);
    drain(e, r, 3);
    for (int i = 0; i < 3; i++)
        assert_int_equal(r[i].ch[0].num_tokens, 3);
    kvd_engine_destroy(e);
}

/* ---- logprobs and snapshot -------------------------------------------------------- */

static void test_logprobs_and_kv_snapshot(void **state)
{
    const fixture *f = *state;
    int32_t prompt[40];
    make_prompt(prompt, 40, 11);
    kvd_engine_config cfg = small_config(64, 512);
    kvd_engine *e = make_engine(f, &cfg);
    kvd_request_params p = greedy_params(5);
    p.sampling.logprobs = 3;
    req_out r = {.n = 1};
    r.id = submit_ok(e, prompt, 40, &p);
    kvd_error err = {0};
    assert_int_equal(kvd_engine_step(e, &err), 1);
    kvd_kv_snapshot snap;
    assert_int_equal(kvd_engine_kv_snapshot(e, &snap), 0);
    assert_int_equal(snap.num_blocks, 64);
    int used = 0;
    for (int b = 0; b < snap.num_blocks; b++)
        used += snap.states[b] >= 2;
    assert_int_equal(used, 3); /* 40 tokens: 2 full blocks and a partial one */
    assert_int_equal(snap.num_seqs, 1);
    assert_int_equal(snap.seqs[0].request_id, (uint64_t)r.id);
    assert_int_equal(snap.seqs[0].choice, 0);
    assert_int_equal(snap.seqs[0].num_tokens, 40);
    assert_int_equal(snap.seqs[0].num_blocks, 3);
    for (int b = 0; b < 3; b++)
        assert_true(snap.states[snap.seqs[0].blocks[b]] >= 2);
    assert_int_equal(snap.stats.kv.blocks_total, 64);
    kvd_kv_snapshot_deinit(&snap);
    drain(e, &r, 1);
    /* Greedy without penalties picks the raw argmax: the first alternative. */
    assert_int_equal(r.ch[0].first_num_top, 3);
    assert_int_equal(r.ch[0].first_top_token, r.ch[0].tokens[0]);
    assert_float_equal(r.ch[0].first_logprob, r.ch[0].first_top_logprob, 0.0f);
    assert_true(r.ch[0].first_logprob < 0.0f);
    kvd_engine_destroy(e);
}

/* ---- engine thread ---------------------------------------------------------------- */

typedef struct notify_count {
    atomic_int calls;
} notify_count;

static void count_notify(void *arg)
{
    atomic_fetch_add(&((notify_count *)arg)->calls, 1);
}

static void test_engine_thread(void **state)
{
    const fixture *f = *state;
    enum { N = 8 };
    int32_t prompts[N][64];
    int lens[N];
    kvd_request_params params[N];
    req_out ref[N], got[N];
    memset(ref, 0, sizeof ref);
    memset(got, 0, sizeof got);
    for (int i = 0; i < N; i++) {
        lens[i] = 8 + 7 * i;
        make_prompt(prompts[i], lens[i], 70 + (uint64_t)i);
        params[i] = sampled_params(12, 40 + (uint64_t)i);
        run_one(f, prompts[i], lens[i], &params[i], &ref[i]);
    }
    notify_count nc = {0};
    /* 24 blocks for 8 sequences of up to 5 blocks, 32-token steps: a crowded queue. */
    kvd_engine_config cfg = small_config(24, 32);
    cfg.num_threads = 2;
    kvd_error err = {0};
    kvd_engine *e = kvd_engine_create(f->model, f->tok, &cfg, count_notify, &nc, &err);
    assert_non_null(e);
    assert_int_equal(kvd_engine_start(e, &err), 0);
    assert_int_equal(kvd_engine_start(e, &err), KVD_ESTATE);
    assert_int_equal(kvd_engine_step(e, &err), KVD_ESTATE);
    for (int i = 0; i < N; i++) {
        got[i].n = 1;
        got[i].id = submit_ok(e, prompts[i], lens[i], &params[i]);
    }
    /* A ninth request, cancelled from this thread while the engine runs. */
    static int32_t long_prompt[300];
    make_prompt(long_prompt, 300, 3);
    req_out extra[N + 1];
    memcpy(extra, got, sizeof got);
    extra[N] = (req_out){.n = 1};
    extra[N].id = submit_ok(e, long_prompt, 300, &params[0]);
    kvd_engine_cancel(e, (uint64_t)extra[N].id);
    int finished = 0;
    for (int guard = 0; finished < N + 1; guard++) {
        assert_true(guard < 20000);
        kvd_engine_wait_events(e, 50);
        collect(kvd_engine_poll_events(e), extra, N + 1);
        finished = 0;
        for (int i = 0; i < N + 1; i++)
            finished += extra[i].ch[0].num_finish_events;
    }
    assert_int_equal(extra[N].ch[0].finish, KVD_FINISH_CANCELLED);
    for (int i = 0; i < N; i++)
        assert_same_output(&extra[i].ch[0], &ref[i].ch[0], i);
    assert_true(atomic_load(&nc.calls) > 0);
    /* Idle now: the thread sleeps, and stats say so. */
    for (int guard = 0; kvd_engine_busy(e); guard++) {
        assert_true(guard < 1000);
        kvd_engine_wait_events(e, 10);
    }
    kvd_engine_stats st;
    kvd_engine_stats_get(e, &st);
    assert_int_equal(st.num_running, 0);
    assert_int_equal(st.kv.blocks_used, 0);
    assert_int_equal(kvd_engine_check_invariants(e, &err), 0);
    kvd_engine_destroy(e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_determinism_greedy),
        cmocka_unit_test(test_determinism_sampled),
        cmocka_unit_test(test_determinism_request_features),
        cmocka_unit_test(test_determinism_grammar),
        cmocka_unit_test(test_prefix_cache_hit),
        cmocka_unit_test(test_disk_tier_hits_and_restart),
        cmocka_unit_test(test_determinism_disk_tier),
        cmocka_unit_test(test_disk_tier_sessions_return),
        cmocka_unit_test(test_stop_string_across_tokens),
        cmocka_unit_test(test_stop_ids_eos_and_ignore_eos),
        cmocka_unit_test(test_max_tokens_and_context_cap),
        cmocka_unit_test(test_n_choices_share_prompt_blocks),
        cmocka_unit_test(test_n_choices_under_pressure),
        cmocka_unit_test(test_cancel_mid_prefill_and_mid_decode),
        cmocka_unit_test(test_queue_full_busy),
        cmocka_unit_test(test_logit_bias_exact),
        cmocka_unit_test(test_min_tokens_exact),
        cmocka_unit_test(test_include_stop_str_in_output),
        cmocka_unit_test(test_logprobs_and_kv_snapshot),
        cmocka_unit_test(test_engine_thread),
        cmocka_unit_test(test_prefill_pack_serves_arrivals_in_turn),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
