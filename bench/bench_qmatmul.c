/* bench_qmatmul.c - quantized matrix products beside bf16 on Qwen2.5-0.5B shapes.
 *
 * The matrix products of one forward step of the 0.5B shape (24 layers of q, k, v, o,
 * gate, up, down and the 151936-row lm_head, each matrix its own memory, so a step
 * streams all weights from memory as the model does), for M rows (1 = decode of one
 * sequence, 16 = 16 sequences, 512 = a prefill chunk), with the weights in one recipe:
 *   bf16, q8_0, q4_0, q5_0 (every matrix that type), q4_k_m (llama.cpp's Q4_K_M on
 *   the 0.5B's 896-wide rows: Q5_0 where Q4_K cannot go, ffn_down Q4_K or Q6_K by
 *   llama.cpp's layer rule, attn_v Q8_0 on the Q6_K layers, lm_head Q8_0).
 * Reports the step time of the products alone, tokens/s it allows (M / step), weight
 * bytes per step and the bound bandwidth / bytes (bandwidth measured here by streaming
 * 1 GiB). Attention, norms and the rest of the forward pass are not in these figures:
 * bench_model measures whole steps.
 *
 * Usage: bench_qmatmul [--threads N] [--rows 1,16,512] [--recipes bf16,q8_0,q4_k_m]
 *                      [--steps S] [--isa avx512|scalar] [--cpu-time] [--layers L] [--in-cache N]
 * --layers L keeps the first L layers (quick comparisons; the bound is then for them).
 * --cpu-time (with --threads 1) times with the thread's CPU clock: on a shared machine it
 * measures the kernels rather than the neighbours (memory stalls still count).
 * --in-cache N times the kernel alone instead: one N x 896 matrix of each recipe's type
 * (q4_k_m: its Q5_0), small enough for L2, against M pre-quantized rows (kvd_qinput), one
 * thread, repeated ~0.2 s, best of 5; reports integer multiply-adds (G MAC/s, 64 per
 * VPDPBUSD) and GB/s of weights. What the product loop itself can do, without memory.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvd/kvd_half.h"
#include "kvd/kvd_kernels.h"
#include "kvd/kvd_quant.h"

#define LAYERS 24
#define HIDDEN 896
#define INTER 4864
#define KV_DIM 128
#define VOCAB 151936

static clockid_t bench_clock = CLOCK_MONOTONIC;

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(bench_clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static float rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return (float)((*s >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

enum { W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN, W_PER_LAYER };

/* llama.cpp's "more bits" layers of Q4_K_M (attn_v, ffn_down get Q6_K there). */
static bool more_bits(int layer)
{
    return layer < LAYERS / 8 || layer >= 7 * LAYERS / 8 || (layer - LAYERS / 8) % 3 == 2;
}

static kvd_dtype recipe_dtype(const char *recipe, int layer, int which)
{
    if (strcmp(recipe, "q4_k_m") != 0) {
        kvd_dtype d = KVD_DTYPE_BF16;
        kvd_dtype_parse(recipe, &d);
        return d;
    }
    if (layer < 0)
        return KVD_DTYPE_Q8_0; /* lm_head: Q6_K, falls back on 896-wide rows */
    if (which == W_DOWN)
        return more_bits(layer) ? KVD_DTYPE_Q6_K : KVD_DTYPE_Q4_K;
    if (which == W_V && more_bits(layer))
        return KVD_DTYPE_Q8_0;
    return KVD_DTYPE_Q5_0;
}

/* A rows x cols matrix of dtype with random values, packed. */
static kvd_matrix make_matrix(kvd_dtype dtype, int rows, int cols, uint64_t *seed)
{
    size_t row_bytes = kvd_dtype_row_bytes(dtype, cols);
    uint8_t *packed = aligned_alloc(64, kvd_matrix_packed_bytes(dtype, rows, cols));
    uint8_t *raw = malloc(row_bytes * rows);
    float *row = malloc((size_t)cols * sizeof(float));
    if (!packed || !raw || !row) {
        fprintf(stderr, "bench_qmatmul: out of memory\n");
        exit(1);
    }
    float scale = 1.0f / sqrtf((float)cols);
    for (int r = 0; r < rows; r++) {
        for (int k = 0; k < cols; k++)
            row[k] = rnd(seed) * scale;
        uint8_t *dst = raw + (size_t)r * row_bytes;
        if (kvd_dtype_is_quantized(dtype)) {
            kvd_quantize_row(dtype, row, dst, cols);
        } else {
            for (int k = 0; k < cols; k++) {
                uint16_t h = kvd_f32_to_bf16(row[k]);
                memcpy(dst + 2 * k, &h, 2);
            }
        }
    }
    kvd_matrix_pack(packed, dtype, rows, cols, raw, 0, kvd_matrix_panels(rows));
    free(raw);
    free(row);
    return (kvd_matrix){.dtype = dtype, .rows = rows, .cols = cols, .data = packed};
}

static size_t weight_bytes(const kvd_matrix *w)
{
    return kvd_dtype_row_bytes(w->dtype, w->cols) * (size_t)w->rows;
}

/* Streaming read bandwidth with `threads` threads over 1 GiB (best of 3). */
static double bandwidth(int threads)
{
    size_t n = ((size_t)1 << 30) / sizeof(uint64_t);
    uint64_t *buf = aligned_alloc(64, n * sizeof(uint64_t));
    if (!buf)
        return 0;
#pragma omp parallel for num_threads(threads)
    for (size_t i = 0; i < n; i++)
        buf[i] = i;
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        uint64_t sum = 0;
        double t0 = now_seconds();
#pragma omp parallel for num_threads(threads) reduction(+ : sum)
        for (size_t i = 0; i < n; i += 8)
            sum += buf[i] + buf[i + 1] + buf[i + 2] + buf[i + 3] + buf[i + 4] + buf[i + 5] +
                   buf[i + 6] + buf[i + 7];
        double dt = now_seconds() - t0;
        if (sum == 42)
            printf(" ");
        best = (double)n * sizeof(uint64_t) / dt > best ? (double)n * sizeof(uint64_t) / dt : best;
    }
    free(buf);
    return best;
}

/* --in-cache: the product loop alone, weights in L2, activations quantized once. */
static int in_cache_kernels(int n, const int *rows, int num_rows, char *recipes, kvd_isa isa)
{
    bench_clock = CLOCK_THREAD_CPUTIME_ID;
    printf("isa %s (quantized: %s), 1 thread, thread CPU time, %d x %d weights in cache\n",
           kvd_isa_name(isa), kvd_isa_avx512(isa) && kvd_quant_vnni_supported() ? "avx512 vnni" : "scalar",
           n, HIDDEN);
    printf("%-8s %5s | %10s %9s | %9s\n", "type", "M", "call us", "G MAC/s", "wGB/s");
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    for (char *recipe = strtok(recipes, ","); recipe; recipe = strtok(NULL, ",")) {
        kvd_dtype dtype = recipe_dtype(recipe, 0, W_Q);
        if (!kvd_dtype_is_quantized(dtype))
            continue;
        kvd_matrix w = make_matrix(dtype, n, HIDDEN, &seed);
        for (int ri = 0; ri < num_rows; ri++) {
            int m = rows[ri] < 1 ? 1 : rows[ri];
            float *x = aligned_alloc(64, (size_t)m * HIDDEN * sizeof(float));
            float *out = aligned_alloc(64, (size_t)m * n * sizeof(float));
            void *mem = aligned_alloc(64, (kvd_qinput_bytes(m, HIDDEN) + 63) / 64 * 64);
            if (!x || !out || !mem) {
                fprintf(stderr, "bench_qmatmul: out of memory\n");
                return 1;
            }
            for (size_t i = 0; i < (size_t)m * HIDDEN; i++)
                x[i] = rnd(&seed);
            kvd_qinput in;
            kvd_qinput_init(&in, mem, m, HIDDEN);
            kvd_qinput_quantize(isa, &in, dtype, x, HIDDEN, 0, m);
            int reps = 1;
            double best = 1e30;
            for (int round = 0; round < 6; round++) {
                double t0 = now_seconds();
                for (int i = 0; i < reps; i++)
                    kvd_qmatmul_cols_input(isa, out, n, &in, m, &w, NULL, false, 0, n);
                double dt = (now_seconds() - t0) / reps;
                if (round == 0) /* the first round sizes the others to ~0.2 s each */
                    reps = (int)(0.2 / (dt > 1e-7 ? dt : 1e-7)) + 1;
                else if (dt < best)
                    best = dt;
            }
            double macs = (double)m * n * HIDDEN;
            printf("%-8s %5d | %10.2f %9.2f | %9.1f\n", kvd_dtype_name(dtype), m, best * 1e6,
                   macs / best * 1e-9, weight_bytes(&w) / best * 1e-9);
            fflush(stdout);
            free(x);
            free(out);
            free(mem);
        }
        free((void *)w.data);
    }
    return 0;
}

int main(int argc, char **argv)
{
    int threads = 2, steps = 5, layers = LAYERS, in_cache = 0;
    int rows[8] = {1, 16, 512}, num_rows = 3;
    char recipes_arg[256] = "bf16,q8_0,q4_k_m";
    kvd_isa isa = kvd_isa_detect();
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
            steps = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--rows") == 0 && i + 1 < argc) {
            num_rows = 0;
            for (char *p = argv[++i]; *p && num_rows < 8; p += strspn(p, ","))
                rows[num_rows++] = (int)strtol(p, &p, 10);
        } else if (strcmp(argv[i], "--recipes") == 0 && i + 1 < argc) {
            snprintf(recipes_arg, sizeof recipes_arg, "%s", argv[++i]);
        } else if (strcmp(argv[i], "--layers") == 0 && i + 1 < argc) {
            layers = atoi(argv[++i]);
            layers = layers < 1 ? 1 : layers > LAYERS ? LAYERS : layers;
        } else if (strcmp(argv[i], "--cpu-time") == 0) {
            bench_clock = CLOCK_THREAD_CPUTIME_ID;
        } else if (strcmp(argv[i], "--in-cache") == 0 && i + 1 < argc) {
            in_cache = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--isa") == 0 && i + 1 < argc) {
            isa = strcmp(argv[++i], "scalar") == 0 ? KVD_ISA_SCALAR : KVD_ISA_AVX512;
        } else {
            fprintf(stderr, "usage: %s [--threads N] [--rows 1,16,512] [--recipes bf16,q8_0,q4_k_m] "
                            "[--steps S] [--isa avx512|scalar] [--cpu-time] [--in-cache N]\n", argv[0]);
            return 1;
        }
    }
    if (bench_clock == CLOCK_THREAD_CPUTIME_ID && threads != 1) {
        fprintf(stderr, "bench_qmatmul: --cpu-time needs --threads 1\n");
        return 1;
    }
    if (in_cache > 0)
        return in_cache_kernels(in_cache, rows, num_rows, recipes_arg, isa);
    int max_rows = 1;
    for (int i = 0; i < num_rows; i++)
        max_rows = rows[i] > max_rows ? rows[i] : max_rows;
    double bw = bench_clock == CLOCK_MONOTONIC ? bandwidth(threads) : 0;
    printf("isa %s (quantized: %s), %d threads, %s time, streaming read %.1f GB/s\n", kvd_isa_name(isa),
           kvd_isa_avx512(isa) && kvd_quant_vnni_supported() ? "avx512 vnni" : "scalar", threads,
           bench_clock == CLOCK_MONOTONIC ? "wall" : "thread CPU", bw * 1e-9);
    printf("%-8s %5s | %10s %9s | %8s %10s %9s\n", "recipe", "M", "step ms", "tok/s", "wGB",
           "bound tok/s", "wGB/s");
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    float *x = aligned_alloc(64, (size_t)max_rows * INTER * sizeof(float));
    float *out = aligned_alloc(64, (size_t)max_rows * VOCAB * sizeof(float));
    for (size_t i = 0; i < (size_t)max_rows * INTER; i++)
        x[i] = rnd(&seed);
    for (char *recipe = strtok(recipes_arg, ","); recipe; recipe = strtok(NULL, ",")) {
        static const int shape[W_PER_LAYER][2] = {{HIDDEN, HIDDEN}, {KV_DIM, HIDDEN}, {KV_DIM, HIDDEN},
                                                  {HIDDEN, HIDDEN}, {INTER, HIDDEN}, {INTER, HIDDEN},
                                                  {HIDDEN, INTER}};
        kvd_matrix mats[LAYERS * W_PER_LAYER + 1];
        size_t bytes = 0;
        for (int l = 0; l < layers; l++)
            for (int w = 0; w < W_PER_LAYER; w++) {
                mats[l * W_PER_LAYER + w] =
                    make_matrix(recipe_dtype(recipe, l, w), shape[w][0], shape[w][1], &seed);
                bytes += weight_bytes(&mats[l * W_PER_LAYER + w]);
            }
        kvd_matrix *lm = &mats[layers * W_PER_LAYER];
        *lm = make_matrix(recipe_dtype(recipe, -1, 0), VOCAB, HIDDEN, &seed);
        bytes += weight_bytes(lm);
        for (int ri = 0; ri < num_rows; ri++) {
            int m = rows[ri];
            double best = 1e30;
            for (int s = 0; s < steps + 1; s++) {
                double t0 = now_seconds();
                for (int i = 0; i < layers * W_PER_LAYER; i++)
                    kvd_matmul(isa, out, mats[i].rows, x, mats[i].cols, m, &mats[i], NULL, false,
                               threads);
                /* lm_head: the last token of each sequence; a prefill chunk has one */
                kvd_matmul(isa, out, VOCAB, x, HIDDEN, m == 512 ? 1 : m, lm, NULL, false, threads);
                double dt = now_seconds() - t0;
                if (s > 0 && dt < best) /* the first step warms up */
                    best = dt;
            }
            printf("%-8s %5d | %10.2f %9.1f | %8.3f %10.1f %9.1f\n", recipe, m, best * 1e3, m / best,
                   bytes * 1e-9, bw / bytes, bytes / best * 1e-9);
            fflush(stdout);
        }
        for (int i = 0; i <= layers * W_PER_LAYER; i++)
            free((void *)mats[i].data);
    }
    free(x);
    free(out);
    return 0;
}
