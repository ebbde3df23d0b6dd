/* bench_attention.c - paged attention time of one decode step by KV dtype.
 *
 *   build/bench/bench_attention [--seqs 16] [--context 2000] [--threads 2] [--steps 10]
 *                               [--dtype f32|f16|bf16|int8|fp8: that one only]
 *                               [--clock cpu: process CPU time instead of wall time]
 *                               [--prefill 1: each query is its whole context, a prefill]
 * (and --clock wall, the default)
 *
 * Qwen2.5-0.5B's attention shape (24 layers, 14 query heads, 2 KV heads of 64): --seqs
 * sequences of --context random tokens each are written into one pool per dtype (f32,
 * f16, bf16, int8, fp8), then one decode query per sequence attends over its whole context
 * on every layer, as a decode step does. Prints the best of --steps steps per dtype, the
 * bytes of cache a step reads, and the tokens a 512 MiB pool holds, side by side in one
 * run. With --prefill 1, every sequence's query is instead all of its --context tokens from
 * position 0 (causal), the attention of one prefill step. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvd/kvd_attention.h"

enum { LAYERS = 24, HEADS = 14, KV_HEADS = 2, HEAD_DIM = 64 };

/* CLOCK_MONOTONIC, or CLOCK_PROCESS_CPUTIME_ID (--clock cpu: the CPU time of all threads,
 * for A/B runs on a loaded machine where wall time mostly measures the run queue; use it
 * with --threads 1, as idle OpenMP threads spin and count) */
static double now_s(clockid_t clock)
{
    struct timespec t;
    clock_gettime(clock, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static float next_uniform(uint64_t *s)
{
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((*s >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

int main(int argc, char **argv)
{
    int seqs = 16, context = 2000, threads = 2, steps = 10;
    const char *only = NULL;
    clockid_t timer = CLOCK_MONOTONIC;
    int prefill = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        int v = atoi(argv[i + 1]);
        if (strcmp(argv[i], "--dtype") == 0) only = argv[i + 1];
        else if (strcmp(argv[i], "--clock") == 0)
            timer = strcmp(argv[i + 1], "cpu") == 0 ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC;
        else if (strcmp(argv[i], "--seqs") == 0) seqs = v;
        else if (strcmp(argv[i], "--context") == 0) context = v;
        else if (strcmp(argv[i], "--threads") == 0) threads = v;
        else if (strcmp(argv[i], "--steps") == 0) steps = v;
        else if (strcmp(argv[i], "--prefill") == 0) prefill = v;
        else {
            fprintf(stderr, "usage: %s [--seqs N] [--context N] [--threads N] [--steps N] [--dtype NAME] [--clock cpu] [--prefill 1]\n", argv[0]);
            return 2;
        }
    }
    if (seqs < 1 || context < 1 || threads < 1 || steps < 1) {
        fprintf(stderr, "bench_attention: every value must be positive\n");
        return 2;
    }
    kvd_isa isa = kvd_isa_detect();
    printf("paged attention, one %s step: %d sequences x %d tokens, %d layers, %d threads, kernels %s\n\n",
           prefill ? "prefill" : "decode", seqs, context, LAYERS, threads, kvd_isa_name(isa));
    printf("| KV dtype | step %sms (best of %d) | cache bytes read per step | tokens in 512 MiB |\n|---|---|---|---|\n",
           timer == CLOCK_MONOTONIC ? "" : "CPU ", steps);
    static const kvd_dtype dtypes[] = {KVD_DTYPE_F32, KVD_DTYPE_F16, KVD_DTYPE_BF16, KVD_DTYPE_I8,
                                       KVD_DTYPE_F8};
    int row = KV_HEADS * HEAD_DIM;
    float *k = malloc((size_t)row * sizeof(float)), *v = malloc((size_t)row * sizeof(float));
    int rows = prefill ? context : 1; /* query rows per sequence */
    size_t qrow = (size_t)HEADS * HEAD_DIM, qseq = (size_t)rows * qrow;
    float *q = malloc((size_t)seqs * qseq * sizeof(float));
    float *out = malloc((size_t)seqs * qseq * sizeof(float));
    kvd_block_table *tables = calloc((size_t)seqs, sizeof *tables);
    kvd_attention_query *queries = calloc((size_t)seqs, sizeof *queries);
    if (!k || !v || !q || !out || !tables || !queries) {
        fprintf(stderr, "bench_attention: out of memory\n");
        return 1;
    }
    uint64_t seed = 1;
    for (size_t i = 0; i < (size_t)seqs * qseq; i++)
        q[i] = next_uniform(&seed);
    kvd_attention_shape shape = {HEADS, KV_HEADS, HEAD_DIM, 1.0f / sqrtf((float)HEAD_DIM)};
    for (size_t d = 0; d < sizeof dtypes / sizeof dtypes[0]; d++) {
        if (only && strcmp(only, kvd_dtype_name(dtypes[d])) != 0)
            continue;
        kvd_kv_config cfg = {.num_layers = LAYERS, .num_kv_heads = KV_HEADS, .head_dim = HEAD_DIM,
                             .block_size = 16, .dtype = dtypes[d],
                             .num_blocks = (size_t)seqs * ((context + 15) / 16)};
        kvd_error err = {0};
        kvd_kv_pool *pool = kvd_kv_pool_create(&cfg, &err);
        if (!pool) {
            fprintf(stderr, "bench_attention: %s\n", err.msg);
            return 1;
        }
        for (int s = 0; s < seqs; s++) {
            kvd_block_table_init(&tables[s]);
            if (kvd_block_table_append(pool, &tables[s], context, &err) != 0) {
                fprintf(stderr, "bench_attention: %s\n", err.msg);
                return 1;
            }
            for (int layer = 0; layer < LAYERS; layer++)
                for (int p = 0; p < context; p++) {
                    for (int i = 0; i < row; i++) {
                        k[i] = next_uniform(&seed);
                        v[i] = next_uniform(&seed);
                    }
                    kvd_kv_store(isa, pool, layer, &tables[s], p, k, v);
                }
            queries[s] = (kvd_attention_query){&tables[s], context - rows, rows, q + (size_t)s * qseq,
                                               (int)qrow, out + (size_t)s * qseq, (int)qrow};
        }
        double best = INFINITY;
        for (int step = 0; step < steps; step++) {
            double t0 = now_s(timer);
            for (int layer = 0; layer < LAYERS; layer++)
                if (kvd_paged_attention(isa, pool, layer, &shape, queries, seqs, threads, &err) != 0) {
                    fprintf(stderr, "bench_attention: %s\n", err.msg);
                    return 1;
                }
            double t = now_s(timer) - t0;
            best = t < best ? t : best;
        }
        size_t block_bytes = kvd_kv_block_bytes(&cfg);
        double read = (double)block_bytes / 16 * context * seqs;
        printf("| %s | %.2f | %.1f MB | %.0f |\n", kvd_dtype_name(dtypes[d]), best * 1e3, read / 1e6,
               (double)(512u << 20) / block_bytes * 16);
        for (int s = 0; s < seqs; s++)
            kvd_block_table_deinit(pool, &tables[s]);
        kvd_kv_pool_destroy(pool);
    }
    free(k);
    free(v);
    free(q);
    free(out);
    free(tables);
    free(queries);
    return 0;
}
