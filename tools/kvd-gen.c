/* kvd-gen.c - one-shot generation from a Qwen2 checkpoint directory, with or without
 * a KV cache.
 *
 * Loads the model and its tokenizer.json, tokenizes the prompt (special tokens such
 * as <|im_start|> are recognised), prefills it in one forward step and decodes token
 * by token through the same engine pieces the daemon uses: the paged KV pool, the
 * batched forward and the sampler. With --no-kv-cache it keeps no cache between
 * steps: every step recomputes the whole sequence through a scratch block table that
 * is released afterwards (the tutorial's baseline, for comparison); thanks to the
 * batch-invariant kernels it produces exactly the same tokens, only slower.
 *
 * Output: the generated text streamed to stdout and a timing line on stderr, or with
 * --json one object (prompt_ids, ids, text, timings, kv_bytes, tokens_per_s).
 * `--tokenize` prints the prompt's ids as a JSON array and exits. Errors: one line
 * on stderr, exit status 1.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvd/kvd_forward.h"
#include "kvd/kvd_kernels.h"
#include "kvd/kvd_kv.h"
#include "kvd/kvd_model.h"
#include "kvd/kvd_sampler.h"
#include "kvd/kvd_tokenizer.h"

typedef struct gen_options {
    const char *model_dir;
    const char *prompt;
    int max_tokens;
    kvd_sampling_params sampling;
    bool no_kv_cache;
    int block_size;
    kvd_dtype kv_dtype;
    const char *quantize; /* --quantize: matrices converted at load, or NULL */
    int threads;
    bool json;
    bool tokenize_only;
    bool ignore_eos;
} gen_options;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvd-gen --model DIR|FILE.gguf --prompt TEXT [--max-tokens N] [--temperature T]\n"
            "               [--top-p P] [--top-k K] [--seed S] [--no-kv-cache] [--block-size N]\n"
            "               [--kv-dtype f16|bf16|f32] [--threads N] [--ignore-eos] [--json]\n"
            "               [--quantize q8_0|q4_0|q4_k_m|...]\n"
            "       kvd-gen --model DIR --tokenize --prompt TEXT\n"
            "Defaults: --max-tokens 32, --temperature 0 (greedy), --top-p 1, --top-k 0, --seed 0,\n"
            "--block-size 16, --kv-dtype f16, --threads 0 (all cores). Stops at the model's EOS\n"
            "ids unless --ignore-eos. KVD_ISA=scalar forces the portable kernels.\n");
}

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* One line on stderr; returns the exit status 1. */
static int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kvd-gen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    return 1;
}

static bool parse_int(const char *s, int lo, int hi, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return false;
    *out = (int)v;
    return true;
}

static bool parse_float(const char *s, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end)
        return false;
    *out = v;
    return true;
}

/* Returns 0 to go on, 1 on a bad command line (message printed), 2 after --help. */
static int parse_options(int argc, char **argv, gen_options *o)
{
    *o = (gen_options){.max_tokens = 32, .block_size = 16, .kv_dtype = KVD_DTYPE_F16};
    o->sampling = kvd_sampling_params_default();
    o->sampling.logprobs = -1;
    enum { OPT_TEMP = 256, OPT_TOP_P, OPT_TOP_K, OPT_SEED, OPT_NO_KV, OPT_BLOCK, OPT_KV_DTYPE,
           OPT_THREADS, OPT_JSON, OPT_TOKENIZE, OPT_IGNORE_EOS, OPT_QUANTIZE };
    static const struct option longopts[] = {
        {"model", required_argument, NULL, 'm'},       {"prompt", required_argument, NULL, 'p'},
        {"max-tokens", required_argument, NULL, 'n'},  {"temperature", required_argument, NULL, OPT_TEMP},
        {"top-p", required_argument, NULL, OPT_TOP_P}, {"top-k", required_argument, NULL, OPT_TOP_K},
        {"seed", required_argument, NULL, OPT_SEED},   {"no-kv-cache", no_argument, NULL, OPT_NO_KV},
        {"block-size", required_argument, NULL, OPT_BLOCK},
        {"kv-dtype", required_argument, NULL, OPT_KV_DTYPE},
        {"threads", required_argument, NULL, OPT_THREADS}, {"json", no_argument, NULL, OPT_JSON},
        {"tokenize", no_argument, NULL, OPT_TOKENIZE}, {"ignore-eos", no_argument, NULL, OPT_IGNORE_EOS},
        {"quantize", required_argument, NULL, OPT_QUANTIZE},
        {"help", no_argument, NULL, 'h'},              {NULL, 0, NULL, 0},
    };
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "hm:p:n:", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': o->model_dir = optarg; break;
        case 'p': o->prompt = optarg; break;
        case 'n':
            if (!parse_int(optarg, 1, 1 << 20, &o->max_tokens))
                return fail("--max-tokens: expected a positive integer, got \"%s\"", optarg);
            break;
        case OPT_TEMP:
            if (!parse_float(optarg, &o->sampling.temperature) || o->sampling.temperature < 0)
                return fail("--temperature: expected a number >= 0, got \"%s\"", optarg);
            break;
        case OPT_TOP_P:
            if (!parse_float(optarg, &o->sampling.top_p) || !(o->sampling.top_p > 0 && o->sampling.top_p <= 1))
                return fail("--top-p: expected a number in (0, 1], got \"%s\"", optarg);
            break;
        case OPT_TOP_K:
            if (!parse_int(optarg, 0, INT_MAX, &o->sampling.top_k))
                return fail("--top-k: expected an integer >= 0, got \"%s\"", optarg);
            break;
        case OPT_SEED: {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(optarg, &end, 10);
            if (errno || end == optarg || *end)
                return fail("--seed: expected an unsigned integer, got \"%s\"", optarg);
            o->sampling.seed = v;
            break;
        }
        case OPT_NO_KV: o->no_kv_cache = true; break;
        case OPT_BLOCK:
            if (!parse_int(optarg, 1, 256, &o->block_size) || (o->block_size & (o->block_size - 1)))
                return fail("--block-size: expected a power of two in 1..256, got \"%s\"", optarg);
            break;
        case OPT_KV_DTYPE:
            if (kvd_dtype_parse(optarg, &o->kv_dtype) != 0 || kvd_dtype_is_quantized(o->kv_dtype))
                return fail("--kv-dtype: expected f16, bf16 or f32, got \"%s\"", optarg);
            break;
        case OPT_THREADS:
            if (!parse_int(optarg, 0, 1024, &o->threads))
                return fail("--threads: expected an integer >= 0, got \"%s\"", optarg);
            break;
        case OPT_JSON: o->json = true; break;
        case OPT_TOKENIZE: o->tokenize_only = true; break;
        case OPT_IGNORE_EOS: o->ignore_eos = true; break;
        case OPT_QUANTIZE: o->quantize = optarg; break;
        case 'h': usage(stdout); return 2;
        default:
            return fail("unknown or incomplete option \"%s\" (try --help)", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return fail("unexpected argument \"%s\" (try --help)", argv[optind]);
    if (!o->model_dir || !o->prompt)
        return fail("--model DIR and --prompt TEXT are required (try --help)");
    return 0;
}

static bool is_eos(const kvd_model_config *c, int32_t id)
{
    for (int i = 0; i < c->num_eos_token_ids; i++)
        if (c->eos_token_ids[i] == id)
            return true;
    return false;
}

/* Everything one run holds; released by gen_free. */
typedef struct gen_state {
    kvd_tokenizer *tok;
    kvd_model *model;
    kvd_kv_pool *pool;
    kvd_forward_ctx *ctx;
    kvd_sampler *sampler;
    kvd_block_table table;
    bool table_ready;
    int32_t *prompt_ids;
    int num_prompt;
    int32_t *ids; /* prompt then generated, (num_prompt + max_tokens) */
    float *logits;
    char *text;
} gen_state;

static void gen_free(gen_state *g)
{
    if (g->table_ready)
        kvd_block_table_deinit(g->pool, &g->table);
    kvd_sampler_destroy(g->sampler);
    kvd_forward_destroy(g->ctx);
    kvd_kv_pool_destroy(g->pool);
    kvd_model_destroy(g->model);
    kvd_tokenizer_destroy(g->tok);
    free(g->prompt_ids);
    free(g->ids);
    free(g->logits);
    free(g->text);
}

/* One forward step over positions [num_past, num_past + n) of g->ids into g->logits. */
static int step(gen_state *g, kvd_block_table *table, int num_past, int n, kvd_error *err)
{
    int need = num_past + n - table->num_tokens;
    if (need > 0 && kvd_block_table_append(g->pool, table, need, err) != 0)
        return -1;
    kvd_forward_seq seq = {table, num_past, n, 0, KVD_LOGITS_LAST};
    kvd_forward_batch batch = {g->ids + num_past, n, &seq, 1, g->logits};
    return kvd_forward(g->ctx, &batch, err);
}

/* Recompute mode: the whole sequence [0, n) through a scratch table released after. */
static int step_recompute(gen_state *g, int n, kvd_error *err)
{
    kvd_block_table scratch;
    kvd_block_table_init(&scratch);
    int rc = step(g, &scratch, 0, n, err);
    kvd_block_table_deinit(g->pool, &scratch);
    return rc;
}

static int print_tokenized(const gen_state *g)
{
    printf("[");
    for (int i = 0; i < g->num_prompt; i++)
        printf("%s%d", i ? "," : "", g->prompt_ids[i]);
    printf("]\n");
    return 0;
}

static cJSON *id_array(const int32_t *ids, int n)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < n && a; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(ids[i]));
    return a;
}

static int run(const gen_options *o, gen_state *g)
{
    kvd_error err = {0};
    g->tok = kvd_tokenizer_load_model(o->model_dir, &err);
    if (!g->tok)
        return fail("%s", err.msg);
    int n = kvd_tokenizer_encode(g->tok, o->prompt, strlen(o->prompt), true, &g->prompt_ids);
    if (n < 0)
        return fail("tokenizing the prompt: %s", kvd_strerror(n));
    g->num_prompt = n;
    if (o->tokenize_only)
        return print_tokenized(g);
    if (n == 0)
        return fail("the prompt is empty");

    kvd_model_load_options load = {.quantize = o->quantize,
                                   .threads = o->threads > 0 ? o->threads
                                                             : (int)sysconf(_SC_NPROCESSORS_ONLN)};
    g->model = kvd_model_load(o->model_dir, &load, &err);
    if (!g->model)
        return fail("%s", err.msg);
    const kvd_model_config *c = &g->model->config;
    for (int i = 0; i < n; i++)
        if (g->prompt_ids[i] >= c->vocab_size)
            return fail("the tokenizer produced an id past the model's vocabulary");
    int total = n + o->max_tokens;
    if (total > c->max_position_embeddings)
        return fail("prompt (%d tokens) + --max-tokens (%d) exceeds the model's %d positions", n,
                    o->max_tokens, c->max_position_embeddings);
    kvd_kv_config kv = {
        .num_layers = c->num_layers, .num_kv_heads = c->num_kv_heads, .head_dim = c->head_dim,
        .block_size = o->block_size, .dtype = o->kv_dtype,
        .num_blocks = (size_t)((total + o->block_size - 1) / o->block_size + 1),
    };
    g->pool = kvd_kv_pool_create(&kv, &err);
    if (!g->pool)
        return fail("%s", err.msg);
    g->ctx = kvd_forward_create(g->model, g->pool, o->no_kv_cache ? total : n, 1, 1, o->threads, &err);
    /* lm_head rows past the tokenizer (151936 vs 151669 for Qwen2) have no text: a
     * random fixture's greedy argmax found one. They are never sampled. */
    const int tok_ids = kvd_tokenizer_vocab_size(g->tok);
    g->sampler = kvd_sampler_create(c->vocab_size, tok_ids < c->vocab_size ? tok_ids : c->vocab_size);
    g->ids = malloc((size_t)total * sizeof(int32_t));
    g->logits = malloc((size_t)c->vocab_size * sizeof(float));
    if (!g->ctx)
        return fail("%s", err.msg);
    if (!g->sampler || !g->ids || !g->logits)
        return fail("out of memory");
    if (kvd_sampling_params_check(&o->sampling, &err) != 0)
        return fail("%s", err.msg);
    memcpy(g->ids, g->prompt_ids, (size_t)n * sizeof(int32_t));
    kvd_block_table_init(&g->table);
    g->table_ready = true;

    kvd_rng rng;
    kvd_rng_seed(&rng, o->sampling.seed);
    kvd_detokenizer detok;
    kvd_detokenizer_init(&detok, g->tok, true);
    size_t piece_cap = kvd_tokenizer_max_token_bytes(g->tok) + 16;
    char *piece = malloc(piece_cap);
    if (!piece)
        return fail("out of memory");

    double t0 = now_ms();
    int rc = o->no_kv_cache ? step_recompute(g, n, &err) : step(g, &g->table, 0, n, &err);
    double prefill_ms = now_ms() - t0, decode_ms = 0;
    int generated = 0;
    const char *finish = "length";
    while (rc == 0) {
        kvd_sample_result res;
        kvd_sampler_sample(g->sampler, &o->sampling, g->logits, g->prompt_ids, n, g->ids + n,
                           generated, &rng, &res);
        g->ids[n + generated++] = res.token;
        if (!o->json) {
            int len = kvd_detokenizer_push(&detok, res.token, piece, piece_cap);
            if (len > 0) {
                fwrite(piece, 1, (size_t)len, stdout);
                fflush(stdout);
            }
        }
        if (!o->ignore_eos && is_eos(c, res.token)) {
            finish = "stop";
            break;
        }
        if (generated == o->max_tokens)
            break;
        double s0 = now_ms();
        rc = o->no_kv_cache ? step_recompute(g, n + generated, &err)
                            : step(g, &g->table, n + generated - 1, 1, &err);
        decode_ms += now_ms() - s0;
    }
    if (rc != 0) {
        free(piece);
        return fail("%s", err.msg);
    }
    int decode_steps = generated - 1;
    double tokens_per_s = decode_steps > 0 && decode_ms > 0 ? decode_steps / (decode_ms / 1e3) : 0;
    /* the pool's own bytes per token slot (int8 pages carry a scale per row) */
    size_t per_token = kvd_kv_block_bytes(&kv) / (size_t)kv.block_size;
    size_t kv_bytes = o->no_kv_cache ? 0 : (size_t)g->table.num_tokens * per_token;
    size_t kv_block_bytes = o->no_kv_cache ? 0 : (size_t)g->table.num_blocks * kvd_kv_block_bytes(&kv);
    if (!o->json) {
        int len = kvd_detokenizer_flush(&detok, piece, piece_cap);
        if (len > 0)
            fwrite(piece, 1, (size_t)len, stdout);
        printf("\n");
        fprintf(stderr,
                "kvd-gen: %d prompt + %d generated tokens (%s), prefill %.1f ms (%.1f tok/s), decode "
                "%.1f ms (%.2f tok/s), KV cache %s, %zu bytes, %s kernels, %d threads\n",
                n, generated, finish, prefill_ms, n / (prefill_ms / 1e3), decode_ms, tokens_per_s,
                o->no_kv_cache ? "off (recompute)" : kvd_dtype_name(o->kv_dtype), kv_bytes,
                kvd_isa_name(kvd_isa_detect()), o->threads);
        free(piece);
        return 0;
    }
    free(piece);
    size_t text_len = 0;
    g->text = kvd_tokenizer_decode(g->tok, g->ids + n, (size_t)generated, true, &text_len, &err);
    if (!g->text)
        return fail("%s", err.msg);
    cJSON *out = cJSON_CreateObject();
    cJSON_AddItemToObject(out, "prompt_ids", id_array(g->prompt_ids, n));
    cJSON_AddItemToObject(out, "ids", id_array(g->ids + n, generated));
    cJSON_AddStringToObject(out, "text", g->text);
    cJSON_AddStringToObject(out, "finish_reason", finish);
    cJSON_AddNumberToObject(out, "prompt_tokens", n);
    cJSON_AddNumberToObject(out, "generated_tokens", generated);
    cJSON_AddNumberToObject(out, "prefill_ms", prefill_ms);
    cJSON_AddNumberToObject(out, "decode_ms", decode_ms);
    cJSON_AddNumberToObject(out, "total_ms", prefill_ms + decode_ms);
    cJSON_AddNumberToObject(out, "prefill_tokens_per_s", n / (prefill_ms / 1e3));
    cJSON_AddNumberToObject(out, "tokens_per_s", tokens_per_s);
    cJSON_AddBoolToObject(out, "kv_cache", !o->no_kv_cache);
    cJSON_AddStringToObject(out, "kv_dtype", kvd_dtype_name(o->kv_dtype));
    cJSON_AddNumberToObject(out, "block_size", o->block_size);
    cJSON_AddNumberToObject(out, "kv_bytes", (double)kv_bytes);
    cJSON_AddNumberToObject(out, "kv_block_bytes", (double)kv_block_bytes);
    cJSON_AddStringToObject(out, "isa", kvd_isa_name(kvd_isa_detect()));
    char *json = cJSON_PrintUnformatted(out);
    cJSON_Delete(out);
    if (!json)
        return fail("out of memory");
    printf("%s\n", json);
    free(json);
    return 0;
}

int main(int argc, char **argv)
{
    gen_options o;
    int rc = parse_options(argc, argv, &o);
    if (rc != 0)
        return rc == 2 ? 0 : 1;
    gen_state g = {0};
    rc = run(&o, &g);
    gen_free(&g);
    return rc;
}
