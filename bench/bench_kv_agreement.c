/* bench_kv_agreement.c - how far a 16- or 8-bit KV cache moves a model from the f32 cache.
 *
 *   build/bench/bench_kv_agreement --model DIR [--prompts 32] [--steps 64] [--threads 2]
 *       [--seed 1] [--dtypes f16,bf16,int8,fp8] [--bound DTYPE:MIN_AGREEMENT:MAX_LOGIT_ERROR]...
 *
 * --prompts seeded prompts of 8 to 32 random ordinary token ids run as one batch. The
 * f32 cache decodes --steps tokens greedily; beside it, in lockstep, each dtype's cache
 *   - teacher-forced: fed the f32 run's tokens; every step's logits are compared with
 *     the f32 logits (max |difference| over the whole vocabulary) and its argmax with
 *     the f32 choice (top-1 agreement, of prompts x steps choices);
 *   - free-running: decodes its own greedy tokens; counted are the tokens identical to
 *     the f32 run's before the first divergence, and the prompts identical all through.
 * A disagreement where the f32 top-1 margin (top-1 minus top-2 logit) is below the
 * logit error is a near-tie the cache may legitimately flip; the largest f32 margin at
 * any teacher-forced disagreement is printed so the reader can tell.
 *
 * --bound makes it a check (tests/meson.build runs it on the tiny fixture): exit 1 when
 * a dtype's teacher-forced agreement is below MIN_AGREEMENT (a fraction), its logit
 * error above MAX_LOGIT_ERROR, or a teacher-forced disagreement falls where the f32
 * margin exceeds 2 x MAX_LOGIT_ERROR (a cache within the error bound cannot flip
 * such a choice: a flip there is a bug, not a near-tie). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvd/kvd_forward.h"
#include "kvd/kvd_kernels.h"

enum { MAX_DTYPES = 5, MIN_PROMPT = 8, MAX_PROMPT = 32 };

typedef struct cache_run {
    kvd_kv_pool *pool;
    kvd_forward_ctx *ctx;
    kvd_block_table *tables; /* [prompts] */
    float *logits;           /* (prompts, vocab): each sequence's last row */
} cache_run;

typedef struct options {
    const char *model;
    int prompts, steps, threads;
    uint64_t seed;
    kvd_dtype dtypes[MAX_DTYPES];
    int num_dtypes;
    double min_agreement[MAX_DTYPES], max_error[MAX_DTYPES]; /* NAN: no bound */
} options;

static int parse_dtype(const char *name, size_t len, kvd_dtype *out)
{
    static const kvd_dtype all[] = {KVD_DTYPE_F32, KVD_DTYPE_F16, KVD_DTYPE_BF16, KVD_DTYPE_I8,
                                    KVD_DTYPE_F8};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        const char *n = kvd_dtype_name(all[i]);
        if (strlen(n) == len && strncmp(n, name, len) == 0) {
            *out = all[i];
            return 0;
        }
    }
    return -1;
}

static int parse_options(int argc, char **argv, options *o)
{
    *o = (options){.prompts = 32, .steps = 64, .threads = 2, .seed = 1, .num_dtypes = 4,
                   .dtypes = {KVD_DTYPE_F16, KVD_DTYPE_BF16, KVD_DTYPE_I8, KVD_DTYPE_F8}};
    const char *bounds[8];
    int num_bounds = 0;
    for (int i = 1; i < argc; i += 2) {
        if (i + 1 >= argc)
            return -1;
        const char *a = argv[i], *v = argv[i + 1];
        if (strcmp(a, "--model") == 0) o->model = v;
        else if (strcmp(a, "--prompts") == 0) o->prompts = atoi(v);
        else if (strcmp(a, "--steps") == 0) o->steps = atoi(v);
        else if (strcmp(a, "--threads") == 0) o->threads = atoi(v);
        else if (strcmp(a, "--seed") == 0) o->seed = strtoull(v, NULL, 10);
        else if (strcmp(a, "--bound") == 0 && num_bounds < 8) bounds[num_bounds++] = v;
        else if (strcmp(a, "--dtypes") == 0) {
            o->num_dtypes = 0;
            for (const char *p = v; *p;) {
                size_t len = strcspn(p, ",");
                if (o->num_dtypes == MAX_DTYPES || parse_dtype(p, len, &o->dtypes[o->num_dtypes++]) != 0)
                    return -1;
                p += len + (p[len] == ',');
            }
        } else
            return -1;
    }
    if (!o->model || o->prompts < 1 || o->steps < 1 || o->threads < 1 || o->num_dtypes < 1)
        return -1;
    for (int d = 0; d < o->num_dtypes; d++)
        o->min_agreement[d] = o->max_error[d] = NAN;
    for (int b = 0; b < num_bounds; b++) {
        kvd_dtype dt;
        size_t len = strcspn(bounds[b], ":");
        double agree, err;
        if (parse_dtype(bounds[b], len, &dt) != 0 || sscanf(bounds[b] + len, ":%lf:%lf", &agree, &err) != 2)
            return -1;
        int d = 0;
        while (d < o->num_dtypes && o->dtypes[d] != dt)
            d++;
        if (d == o->num_dtypes)
            return -1;
        o->min_agreement[d] = agree;
        o->max_error[d] = err;
    }
    return 0;
}

static uint64_t next_random(uint64_t *s)
{
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return *s >> 33;
}

static int open_run(cache_run *r, const kvd_model *model, kvd_dtype dtype, const options *o,
                    int max_tokens, kvd_error *err)
{
    memset(r, 0, sizeof *r);
    kvd_kv_config cfg = {
        .num_layers = model->config.num_layers, .num_kv_heads = model->config.num_kv_heads,
        .head_dim = model->config.head_dim, .block_size = 16, .dtype = dtype,
        .num_blocks = (size_t)o->prompts * ((MAX_PROMPT + o->steps + 15) / 16 + 1),
    };
    r->pool = kvd_kv_pool_create(&cfg, err);
    if (!r->pool)
        return -1;
    r->ctx = kvd_forward_create(model, r->pool, max_tokens, o->prompts, o->prompts, o->threads, err);
    r->tables = calloc((size_t)o->prompts, sizeof *r->tables);
    r->logits = malloc((size_t)o->prompts * model->config.vocab_size * sizeof(float));
    if (!r->ctx || !r->tables || !r->logits)
        return r->ctx ? kvd_error_set(err, KVD_ENOMEM, "out of memory") : -1;
    for (int p = 0; p < o->prompts; p++)
        kvd_block_table_init(&r->tables[p]);
    return 0;
}

static void close_run(cache_run *r, int prompts)
{
    for (int p = 0; r->tables && p < prompts; p++)
        kvd_block_table_deinit(r->pool, &r->tables[p]);
    free(r->tables);
    free(r->logits);
    kvd_forward_destroy(r->ctx);
    kvd_kv_pool_destroy(r->pool);
}

/* Feeds tokens (new[p] tokens of sequence p, sequence by sequence, after past[p]) to
 * every sequence at once; r->logits gets each sequence's last row. */
static int feed(cache_run *r, const int32_t *tokens, const int *past, const int *new_tokens,
                int prompts, kvd_forward_seq *seqs, kvd_error *err)
{
    int offset = 0;
    for (int p = 0; p < prompts; p++) {
        if (kvd_block_table_append(r->pool, &r->tables[p], new_tokens[p], err) != 0)
            return -1;
        seqs[p] = (kvd_forward_seq){&r->tables[p], past[p], new_tokens[p], offset, KVD_LOGITS_LAST};
        offset += new_tokens[p];
    }
    kvd_forward_batch batch = {tokens, offset, seqs, prompts, r->logits};
    return kvd_forward(r->ctx, &batch, err);
}

typedef struct dtype_result {
    double max_error, worst_margin;
    long agree, prefix_tokens;
    int identical_prompts;
} dtype_result;

int main(int argc, char **argv)
{
    options o;
    if (parse_options(argc, argv, &o) != 0) {
        fprintf(stderr, "usage: %s --model DIR [--prompts N] [--steps N] [--threads N] [--seed N] "
                        "[--dtypes f16,bf16,int8] [--bound DTYPE:MIN_AGREEMENT:MAX_LOGIT_ERROR]...\n",
                argv[0]);
        return 2;
    }
    kvd_error err = {0};
    kvd_model *model = kvd_model_load(o.model, NULL, &err);
    if (!model) {
        fprintf(stderr, "bench_kv_agreement: %s\n", err.msg);
        return 1;
    }
    int vocab = model->config.vocab_size, prompts = o.prompts;
    /* ordinary ids: below the Qwen2 specials (151643...), and inside small vocabularies */
    int id_range = vocab < 151643 ? vocab : 151643;
    int32_t *prompt_ids = malloc((size_t)prompts * MAX_PROMPT * sizeof(int32_t));
    int *len = malloc((size_t)prompts * sizeof(int)), *past = calloc((size_t)prompts, sizeof(int));
    int *ones = malloc((size_t)prompts * sizeof(int));
    int32_t *step_ids = malloc((size_t)prompts * sizeof(int32_t));
    int32_t *free_ids = malloc((size_t)o.num_dtypes * prompts * sizeof(int32_t));
    int *free_match = malloc((size_t)o.num_dtypes * prompts * sizeof(int)); /* -1: diverged */
    kvd_forward_seq *seqs = malloc((size_t)prompts * sizeof *seqs);
    cache_run base, forced[MAX_DTYPES], freerun[MAX_DTYPES];
    dtype_result res[MAX_DTYPES] = {{0}};
    if (!prompt_ids || !len || !past || !ones || !step_ids || !free_ids || !free_match || !seqs) {
        fprintf(stderr, "bench_kv_agreement: out of memory\n");
        return 1;
    }
    uint64_t seed = o.seed;
    int total = 0;
    for (int p = 0; p < prompts; p++) {
        len[p] = MIN_PROMPT + (int)(next_random(&seed) % (MAX_PROMPT - MIN_PROMPT + 1));
        for (int t = 0; t < len[p]; t++)
            prompt_ids[total + t] = (int32_t)(next_random(&seed) % (uint64_t)id_range);
        total += len[p];
        ones[p] = 1;
    }
    if (open_run(&base, model, KVD_DTYPE_F32, &o, total, &err) != 0 ||
        feed(&base, prompt_ids, past, len, prompts, seqs, &err) != 0)
        goto fail;
    for (int d = 0; d < o.num_dtypes; d++) {
        if (open_run(&forced[d], model, o.dtypes[d], &o, total, &err) != 0 ||
            open_run(&freerun[d], model, o.dtypes[d], &o, total, &err) != 0 ||
            feed(&forced[d], prompt_ids, past, len, prompts, seqs, &err) != 0 ||
            feed(&freerun[d], prompt_ids, past, len, prompts, seqs, &err) != 0)
            goto fail;
        for (int p = 0; p < prompts; p++)
            free_match[d * prompts + p] = 0;
    }
    memcpy(past, len, (size_t)prompts * sizeof(int));
    for (int k = 0; k < o.steps; k++) {
        for (int p = 0; p < prompts; p++) {
            const float *row = base.logits + (size_t)p * vocab;
            step_ids[p] = kvd_argmax(row, vocab);
            for (int d = 0; d < o.num_dtypes; d++) {
                const float *other = forced[d].logits + (size_t)p * vocab;
                for (int v = 0; v < vocab; v++)
                    res[d].max_error = fmax(res[d].max_error, fabs((double)other[v] - row[v]));
                if (kvd_argmax(other, vocab) == step_ids[p])
                    res[d].agree++;
                else
                    res[d].worst_margin = fmax(res[d].worst_margin, kvd_top_margin(row, vocab));
                int32_t own = kvd_argmax(freerun[d].logits + (size_t)p * vocab, vocab);
                free_ids[d * prompts + p] = own;
                int *m = &free_match[d * prompts + p];
                if (*m >= 0)
                    *m = own == step_ids[p] ? *m + 1 : -1 - *m; /* diverged: -1 - (tokens matched) */
            }
        }
        if (k + 1 == o.steps)
            break;
        if (feed(&base, step_ids, past, ones, prompts, seqs, &err) != 0)
            goto fail;
        for (int d = 0; d < o.num_dtypes; d++)
            if (feed(&forced[d], step_ids, past, ones, prompts, seqs, &err) != 0 ||
                feed(&freerun[d], free_ids + d * prompts, past, ones, prompts, seqs, &err) != 0)
                goto fail;
        for (int p = 0; p < prompts; p++)
            past[p]++;
    }
    printf("KV cache vs f32: %s, %d prompts (%d..%d random ids, seed %llu) x %d greedy steps, kernels %s\n\n",
           o.model, prompts, MIN_PROMPT, MAX_PROMPT, (unsigned long long)o.seed, o.steps,
           kvd_isa_name(kvd_isa_detect()));
    printf("| KV dtype | max abs logit diff | top-1 agreement, teacher-forced | free-running: tokens "
           "before first divergence | prompts identical all %d | largest f32 margin at a disagreement |\n"
           "|---|---|---|---|---|---|\n", o.steps);
    int failed = 0;
    long choices = (long)prompts * o.steps;
    for (int d = 0; d < o.num_dtypes; d++) {
        for (int p = 0; p < prompts; p++) {
            int m = free_match[d * prompts + p];
            res[d].prefix_tokens += m >= 0 ? m : -1 - m;
            res[d].identical_prompts += m >= 0;
        }
        double agreement = (double)res[d].agree / (double)choices;
        printf("| %s | %.4f | %ld / %ld (%.2f%%) | %ld / %ld (%.2f%%) | %d / %d | %.4f |\n",
               kvd_dtype_name(o.dtypes[d]), res[d].max_error, res[d].agree, choices, 100 * agreement,
               res[d].prefix_tokens, choices, 100.0 * (double)res[d].prefix_tokens / (double)choices,
               res[d].identical_prompts, prompts, res[d].worst_margin);
        if (!isnan(o.min_agreement[d]) && (agreement < o.min_agreement[d] || res[d].max_error > o.max_error[d] ||
                                            res[d].worst_margin > 2 * o.max_error[d])) {
            fprintf(stderr, "bench_kv_agreement: KV %s: agreement %.4f (bound >= %.4f), logit error %.4f "
                            "(bound <= %.4f), largest f32 margin at a disagreement %.4f (bound <= %.4f)\n",
                    kvd_dtype_name(o.dtypes[d]), agreement, o.min_agreement[d], res[d].max_error,
                    o.max_error[d], res[d].worst_margin, 2 * o.max_error[d]);
            failed = 1;
        }
    }
    close_run(&base, prompts);
    for (int d = 0; d < o.num_dtypes; d++) {
        close_run(&forced[d], prompts);
        close_run(&freerun[d], prompts);
    }
    kvd_model_destroy(model);
    free(prompt_ids);
    free(len);
    free(past);
    free(ones);
    free(step_ids);
    free(free_ids);
    free(free_match);
    free(seqs);
    return failed;
fail:
    fprintf(stderr, "bench_kv_agreement: %s\n", err.msg);
    return 1;
}
