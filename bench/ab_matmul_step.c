/* ab_matmul_step.c - two builds of the VDPBF16PS product kernels side by side in one
 * process (bench/ab_matmul_step.sh compiles an old and a new copy of
 * src/model/matmul_impl.c under the names old_* and new_*), alternated run by run, so
 * that a loaded, noisy machine slows both alike; reports CPU time (or wall time with
 * TWO) of each and the median of the paired old/new ratios.
 *
 * Usage: ab_matmul_step [M] [ROUNDS]
 *   default: the bf16 products of one decode step of the Qwen2.5-0.5B shape at M rows
 *     (24 layers of q, k, v, o, gate, up, down and the 151936-row lm_head), thread 0's
 *     half of forward.c's fused split, weights from memory in one huge-page arena in
 *     layer order, one thread, CPU time; parts: attention projections, gate+up, down, lm.
 *   TWO=1: both halves on two threads with a barrier after each stage, wall time.
 *   KCOLS=n [KLM=1 | KDOWN=1] [KCOLD=1] [KSEC=s]: one product (gate 4864x896, lm_head,
 *     down 896x4864), output columns [0, n), repeated ~KSEC CPU-seconds per round;
 *     KCOLD cycles through the 24 layers' copies so that weights come from memory.
 * Not built by meson: a measuring tool for kernel changes (docs/benchmarks.md). */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#include "kvd/kvd_half.h"
#include "kvd/kvd_hugemem.h"
#include "kvd/kvd_model.h"

typedef void (*words_fn)(float *, int, const uint32_t *, size_t, int, const kvd_matrix *, const float *, bool, int, int);
typedef void (*cols_fn)(float *, int, const float *, int, int, const kvd_matrix *, const float *, bool, int, int);
typedef void (*round_fn)(uint32_t *, const float *, int, int, int);
#define DECL(p) \
    void p##_words(float *, int, const uint32_t *, size_t, int, const kvd_matrix *, const float *, bool, int, int); \
    void p##_cols(float *, int, const float *, int, int, const kvd_matrix *, const float *, bool, int, int); \
    void p##_round(uint32_t *, const float *, int, int, int);
DECL(old)
DECL(new)
static words_fn WORDS[2] = {old_words, new_words};
static cols_fn COLS[2] = {old_cols, new_cols};

size_t kvd_bf16_words_stride(int k) { return (size_t)(k + 31) / 32 * 16; }

#define LAYERS 24
#define H 896
#define I 4864
#define KD 128
#define V 151936

static kvd_matrix mats[LAYERS * 7 + 1];
static uint32_t *xw_h, *xw_i;
static float *xf_h, *out_big;

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static atomic_int bar_count, bar_gen;
static int nthreads = 1;
static void barrier(void)
{
    if (nthreads == 1)
        return;
    int gen = atomic_load(&bar_gen);
    if (atomic_fetch_add(&bar_count, 1) == nthreads - 1) {
        atomic_store(&bar_count, 0);
        atomic_fetch_add(&bar_gen, 1);
    } else {
        for (int spins = 0; atomic_load(&bar_gen) == gen; spins++)
            if (spins > 2000)
                sched_yield();
            else
                __builtin_ia32_pause();
    }
}

static void step_th(int v, int M, double *part, int ith)
{
    size_t hs = kvd_bf16_words_stride(H), is = kvd_bf16_words_stride(I);
    double c = cpu_now(), c2;
#define T(i, stmt) do { stmt; c2 = cpu_now(); part[i] += c2 - c; c = c2; } while (0)
    int a = ith * 448, kv = ith * 64, g = ith * 2432;
    for (int l = 0; l < LAYERS; l++) {
        kvd_matrix *w = &mats[l * 7];
        T(0, WORDS[v](out_big, 896, xw_h, hs, M, &w[0], NULL, false, a, a + 448);
             WORDS[v](out_big, 128, xw_h, hs, M, &w[1], NULL, false, kv, kv + 64);
             WORDS[v](out_big, 128, xw_h, hs, M, &w[2], NULL, false, kv, kv + 64);
             barrier();
             COLS[v](out_big, 896, xf_h, H, M, &w[3], NULL, true, a, a + 448); barrier());
        T(1, WORDS[v](out_big, I, xw_h, hs, M, &w[4], NULL, false, g, g + 2432);
             WORDS[v](out_big + (size_t)M * I, I, xw_h, hs, M, &w[5], NULL, false, g, g + 2432); barrier());
        T(2, WORDS[v](out_big, 896, xw_i, is, M, &w[6], NULL, true, a, a + 448); barrier());
    }
    T(3, COLS[v](out_big, V, xf_h, H, M, &mats[LAYERS * 7], NULL, false, ith * (V / 2), ith * (V / 2) + V / 2); barrier());
}

static void step(int v, int M, double *part)
{
    step_th(v, M, part, 0);
}

typedef struct { int v, M, go, quit; } job;
static job g_job;
static atomic_int g_seq, g_done;
static double dummy_part[4];
static void *helper(void *arg)
{
    (void)arg;
    int seen = 0;
    for (;;) {
        while (atomic_load(&g_seq) == seen)
            sched_yield();
        seen = atomic_load(&g_seq);
        if (g_job.quit)
            return NULL;
        step_th(g_job.v, g_job.M, dummy_part, 1);
        atomic_fetch_add(&g_done, 1);
    }
}

static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    int M = argc > 1 ? atoi(argv[1]) : 16, rounds = argc > 2 ? atoi(argv[2]) : 20;
    static const int shape[7][2] = {{H, H}, {KD, H}, {KD, H}, {H, H}, {I, H}, {I, H}, {H, I}};
    const char *kc = getenv("KCOLS");
    int target = getenv("KLM") ? LAYERS * 7 : getenv("KDOWN") ? 6 : 4;
    size_t total = 0;
    for (int i = 0; i <= LAYERS * 7; i++)
        total += kvd_matrix_packed_bytes(KVD_DTYPE_BF16, i < LAYERS * 7 ? shape[i % 7][0] : V, H * 0 + (i < LAYERS * 7 ? shape[i % 7][1] : H));
    size_t mapped;
    char *arena = kvd_huge_alloc(total, &mapped), *p = arena;
    uint64_t seed = 88172645463325252ull;
    uint16_t *raw = malloc((size_t)V * H * 2);
    size_t nraw = kc && target != LAYERS * 7 ? (size_t)I * H : (size_t)V * H;
    for (size_t i = 0; i < nraw; i++) {
        seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
        raw[i] = kvd_f32_to_bf16(((float)(seed >> 40) / 16777216.0f * 2 - 1) * 0.03f);
    }
    for (int i = 0; i <= LAYERS * 7; i++) {
        int r = i < LAYERS * 7 ? shape[i % 7][0] : V, c = i < LAYERS * 7 ? shape[i % 7][1] : H;
        if (!kc || i == target || (getenv("KCOLD") && i % 7 == target % 7 && i < LAYERS * 7))
            kvd_matrix_pack(p, KVD_DTYPE_BF16, r, c, raw, 0, kvd_matrix_panels(r));
        mats[i] = (kvd_matrix){KVD_DTYPE_BF16, r, c, p};
        p += kvd_matrix_packed_bytes(KVD_DTYPE_BF16, r, c);
    }
    free(raw);
    xf_h = aligned_alloc(64, (size_t)512 * I * 4);
    out_big = aligned_alloc(64, (size_t)512 * V * 4);
    xw_h = aligned_alloc(64, (size_t)512 * kvd_bf16_words_stride(H) * 4);
    xw_i = aligned_alloc(64, (size_t)512 * kvd_bf16_words_stride(I) * 4);
    for (size_t i = 0; i < (size_t)512 * I; i++) {
        seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
        xf_h[i] = (float)(seed >> 40) / 16777216.0f * 2 - 1;
    }
    for (int r = 0; r < 512; r++) {
        old_round(xw_h + r * kvd_bf16_words_stride(H), xf_h + (size_t)r * H, H, 0, H);
        old_round(xw_i + r * kvd_bf16_words_stride(I), xf_h + (size_t)r * I, I, 0, I);
    }
    double ratio[256], tot[2] = {0, 0}, parts[2][4] = {{0}};
    double work = 0;
    if (kc) {
        kvd_matrix *w = &mats[target];
        int cols = atoi(kc), kin = w->cols;
        uint32_t *xw = kin == I ? xw_i : xw_h;
        double budget = getenv("KSEC") ? atof(getenv("KSEC")) : 0.1;
        int reps = 1;
        { /* calibrate */
            double c0 = cpu_now();
            WORDS[0](out_big, w->rows, xw, kvd_bf16_words_stride(kin), M, w, NULL, false, 0, cols);
            double dt = cpu_now() - c0;
            reps = (int)(budget / dt) + 1;
        }
        work = 2.0 * M * cols * kin * reps;
        for (int r = 0; r < rounds; r++) {
            double t[2];
            for (int vv = 0; vv < 2; vv++) {
                int v = r % 2 ? 1 - vv : vv;
                double c0 = cpu_now();
                for (int j = 0; j < reps; j++) {
                    const kvd_matrix *wj = getenv("KCOLD") ? &mats[(j % LAYERS) * 7 + target % 7] : w;
                    WORDS[v](out_big, w->rows, xw, kvd_bf16_words_stride(kin), M, wj, NULL, false, 0, cols);
                }
                t[v] = cpu_now() - c0;
                tot[v] += t[v];
            }
            ratio[r] = t[0] / t[1];
        }
        printf("%s M %d cols %d k %d: old %.1f new %.1f GFLOP per cpu-s",
               getenv("KLM") ? "lm_head" : kin == I ? "down" : "gate", M, cols, kin,
               work * rounds / tot[0] * 1e-9, work * rounds / tot[1] * 1e-9);
    } else if (getenv("TWO")) {
        nthreads = 2;
        pthread_t th;
        pthread_create(&th, NULL, helper, NULL);
        double t[2];
        for (int r = 0; r < rounds; r++) {
            for (int vv = 0; vv < 2; vv++) {
                int v = r % 2 ? 1 - vv : vv;
                double w0 = wall_now();
                g_job.v = v, g_job.M = M;
                int d = atomic_load(&g_done);
                atomic_fetch_add(&g_seq, 1);
                step_th(v, M, parts[v], 0);
                while (atomic_load(&g_done) == d)
                    ;
                t[v] = wall_now() - w0;
                tot[v] += t[v];
            }
            ratio[r] = t[0] / t[1];
        }
        g_job.quit = 1;
        atomic_fetch_add(&g_seq, 1);
        pthread_join(th, NULL);
        printf("2 threads, step M %d: wall ms/step old %.2f new %.2f", M, tot[0] / rounds * 1e3, tot[1] / rounds * 1e3);
    } else {
        double t[2];
        for (int r = 0; r < rounds; r++) {
            for (int vv = 0; vv < 2; vv++) {
                int v = r % 2 ? 1 - vv : vv;
                double c0 = cpu_now();
                step(v, M, parts[v]);
                t[v] = cpu_now() - c0;
                tot[v] += t[v];
            }
            ratio[r] = t[0] / t[1];
        }
        printf("step M %d: cpu ms/step old %.2f new %.2f", M, tot[0] / rounds * 1e3, tot[1] / rounds * 1e3);
        for (int v = 0; v < 2; v++) {
            printf(" | %s", v ? "new" : "old");
            for (int i = 0; i < 4; i++)
                printf(" %s %.2f", (const char *[]){"attn", "gate+up", "down", "lm"}[i], parts[v][i] / rounds * 1e3);
        }
    }
    qsort(ratio, rounds, sizeof ratio[0], cmp);
    printf(" | old/new median %.3f (quartiles %.3f %.3f)\n", ratio[rounds / 2], ratio[rounds / 4], ratio[3 * rounds / 4]);
    return 0;
}
