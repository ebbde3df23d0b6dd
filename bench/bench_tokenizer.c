/* bench_tokenizer.c - how fast the tokenizer loads, encodes, decodes and streams.
 *
 * Usage: bench_tokenizer [tokenizer.json] [text-file]
 * The tokenizer defaults to $KVD_TOKENIZER_JSON, else third_party/qwen-tokenizer/
 * tokenizer.json. Without a text file it encodes a built-in 100 KB mix of English prose,
 * Chinese, Python, JSON and emoji (the target: well under a second). Each encode figure is
 * the best of several runs on a fresh tokenizer ("cold": empty word cache) and on a warm
 * one (the same text again: repeated words hit the cache). Results go to stdout; record
 * them in docs/tokenizer.md with the command and the machine.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvd/kvd_buf.h"
#include "kvd/kvd_error.h"
#include "kvd/kvd_tokenizer.h"

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ~100 KB of varied text, built by repeating paragraphs with a changing number so the
 * text is not a handful of words over and over. */
static char *builtin_text(size_t target, size_t *len)
{
    static const char *const paragraphs[] = {
        "The paged KV cache splits each sequence's keys and values into fixed-size blocks; "
        "a block table maps logical positions to physical blocks, so memory is allocated on "
        "demand and shared copy-on-write between requests with a common prefix. ",
        "\xe5\xa4\xa7\xe8\xaf\xad\xe8\xa8\x80\xe6\xa8\xa1\xe5\x9e\x8b\xe7\x9a\x84\xe6\x8e\xa8"
        "\xe7\x90\x86\xe6\x9c\x8d\xe5\x8a\xa1\xe9\x9c\x80\xe8\xa6\x81\xe9\xab\x98\xe6\x95\x88"
        "\xe7\x9a\x84\xe5\x86\x85\xe5\xad\x98\xe7\xae\xa1\xe7\x90\x86\xe3\x80\x82 ",
        "def attention(q, k, v, mask=None):\n    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))\n"
        "    if mask is not None:\n        scores = scores.masked_fill(mask == 0, -1e9)\n"
        "    return torch.softmax(scores, dim=-1) @ v\n",
        "{\"model\": \"qwen2.5-0.5b-instruct\", \"messages\": [{\"role\": \"user\", \"content\": "
        "\"Hello! \xf0\x9f\x91\x8b How are you?\"}], \"max_tokens\": 128, \"stream\": true}\n",
        "It's 42\xc2\xb0" "C today in Z\xc3\xbcrich; they'll say we've had enough \xe2\x80\x94 "
        "don't they?\t\xf0\x9f\x98\x80\xf0\x9f\x8e\x89\n\n",
    };
    char *text = malloc(target + 1024);
    size_t n = 0;
    for (unsigned i = 0; n < target; i++) {
        const char *p = paragraphs[i % 5];
        size_t plen = strlen(p);
        memcpy(text + n, p, plen);
        n += plen;
        n += (size_t)snprintf(text + n, 32, "[%u] ", i * 7919u % 100000u);
    }
    *len = n;
    return text;
}

static double best_encode(const kvd_tokenizer *tok, const char *text, size_t len, int runs, int *num_ids)
{
    double best = 1e30;
    for (int r = 0; r < runs; r++) {
        int32_t *ids;
        double t0 = now_seconds();
        *num_ids = kvd_tokenizer_encode(tok, text, len, true, &ids);
        double t = now_seconds() - t0;
        free(ids);
        best = t < best ? t : best;
    }
    return best;
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : getenv("KVD_TOKENIZER_JSON");
    if (!path)
        path = "third_party/qwen-tokenizer/tokenizer.json";
    kvd_error err = {0};
    size_t len;
    char *text;
    if (argc > 2) {
        kvd_sbuf file;
        kvd_sbuf_init(&file);
        if (kvd_sbuf_read_file(&file, argv[2], &err) != 0) {
            fprintf(stderr, "bench_tokenizer: %s\n", err.msg);
            return 1;
        }
        text = kvd_sbuf_take(&file, &len);
    } else {
        text = builtin_text(100 * 1024, &len);
    }
    if (!text) {
        fprintf(stderr, "bench_tokenizer: out of memory\n");
        return 1;
    }

    double t0 = now_seconds();
    kvd_tokenizer *tok = kvd_tokenizer_load(path, &err);
    double load = now_seconds() - t0;
    if (!tok) {
        fprintf(stderr, "bench_tokenizer: %s\n", err.msg);
        return 1;
    }
    printf("load            %8.1f ms  (%s)\n", load * 1e3, path);

    /* Cold: a fresh tokenizer per run, so the merge cache starts empty each time. */
    double cold = 1e30;
    int num_ids = 0;
    for (int r = 0; r < 3; r++) {
        kvd_tokenizer *fresh = kvd_tokenizer_load(path, &err);
        double t = best_encode(fresh, text, len, 1, &num_ids);
        cold = t < cold ? t : cold;
        kvd_tokenizer_destroy(fresh);
    }
    printf("encode cold     %8.2f ms  %zu bytes -> %d ids  %.1f MB/s\n", cold * 1e3, len, num_ids,
           (double)len / cold / 1e6);
    best_encode(tok, text, len, 1, &num_ids); /* warm the cache */
    double warm = best_encode(tok, text, len, 10, &num_ids);
    printf("encode warm     %8.2f ms  %.1f MB/s\n", warm * 1e3, (double)len / warm / 1e6);

    int32_t *ids;
    int n = kvd_tokenizer_encode(tok, text, len, true, &ids);
    double best_decode = 1e30;
    for (int r = 0; r < 10; r++) {
        size_t out_len;
        t0 = now_seconds();
        char *out = kvd_tokenizer_decode(tok, ids, (size_t)n, false, &out_len, NULL);
        double t = now_seconds() - t0;
        free(out);
        best_decode = t < best_decode ? t : best_decode;
    }
    printf("decode          %8.3f ms  %d ids\n", best_decode * 1e3, n);

    size_t cap = kvd_tokenizer_max_token_bytes(tok) + 1;
    char *piece = malloc(cap);
    double best_stream = 1e30;
    for (int r = 0; r < 10; r++) {
        kvd_detokenizer d;
        kvd_detokenizer_init(&d, tok, false);
        t0 = now_seconds();
        for (int i = 0; i < n; i++)
            kvd_detokenizer_push(&d, ids[i], piece, cap);
        kvd_detokenizer_flush(&d, piece, cap);
        double t = now_seconds() - t0;
        best_stream = t < best_stream ? t : best_stream;
    }
    printf("stream push     %8.1f ns/token\n", best_stream / n * 1e9);

    free(piece);
    free(ids);
    free(text);
    kvd_tokenizer_destroy(tok);
    return 0;
}
