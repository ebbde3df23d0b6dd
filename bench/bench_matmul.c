/* bench_matmul.c - kvd's matrix product against OpenBLAS sgemm on Qwen2.5-0.5B shapes.
 *
 * For each weight shape (out_features x in_features) of the 0.5B model and each row
 * count M (1 = decode, 16 = a small batch, 512 = a prefill chunk) it times
 * out[M,N] = x[M,K] W[N,K]^T with kvd's kernel on bf16 weights (what the model runs)
 * and with OpenBLAS cblas_sgemm on the same weights widened to f32 (OpenBLAS has no
 * batch-invariant bf16 path; its kernels also change with M, which is why kvd does
 * not use it). Reports milliseconds, GFLOP/s and weight bytes streamed per second,
 * plus the largest difference between the two results as a sanity check.
 *
 * Usage: bench_matmul [--threads N] [--min-seconds S] [--shapes all|small|1.5b|7b]
 *                     [--rows 1,16,512] [--isa avx512amx|avx512bf16|avx512|scalar|scalar-vdpbf16]
 *                     [--cpu-time] [--cold] [--no-blas] [--words]
 * --shapes 1.5b / 7b: the projections of Qwen2.5-1.5B / -7B instead (hidden 1536 / 3584,
 * MLP 8960 / 18944, k and v 256 / 512 rows; no lm_head), whose x panels and weights
 * outgrow the caches the 0.5B ones fit. --no-blas skips OpenBLAS (its sgemm on the 7B
 * shapes takes seconds a call). --words times what the forward pass runs where the ISA takes
 * x as bf16 words (kvd_matmul_takes_words: VDPBF16PS): x rounded once outside the timing,
 * then kvd_matmul_cols_words over each thread's whole panels.
 * --cold cycles kvd's runs through enough copies of the weights (>= 256 MB) that each
 * run streams them from memory, as a model's layers do; without it small shapes are
 * timed from cache.
 * --cpu-time (with --threads 1) times with the thread's CPU clock instead of the wall
 * clock: on a shared machine it measures the kernels, not the neighbours.
 * OPENBLAS_CORETYPE=SkylakeX makes OpenBLAS 0.3.21 use its AVX-512 kernels on Zen 5.
 */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvd/kvd_half.h"
#include "kvd/kvd_kernels.h"

void openblas_set_num_threads(int num_threads);
char *openblas_get_corename(void);

static double now_seconds(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t rng_next(uint64_t *state)
{
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return *state;
}

static float rng_uniform(uint64_t *state)
{
    return (float)((rng_next(state) >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

#define MAX_ROW_COUNTS 16

/* kvd_matmul's split (whole panels per thread) over x given as bf16 words. */
static void matmul_words(kvd_isa isa, float *out, const uint32_t *xw, size_t xw_stride, int m,
                         const kvd_matrix *w, int threads)
{
    int panels = kvd_matrix_panels(w->rows);
#pragma omp parallel num_threads(threads)
    {
        int nth = omp_get_num_threads(), ith = omp_get_thread_num();
        int begin = (int)((int64_t)panels * ith / nth) * KVD_PANEL_ROWS;
        int end = (int)((int64_t)panels * (ith + 1) / nth) * KVD_PANEL_ROWS;
        kvd_matmul_cols_words(isa, out, w->rows, xw, xw_stride, m, w, NULL, false, begin,
                              end < w->rows ? end : w->rows);
    }
}

typedef struct bench_case {
    const char *name;
    int n, k;
} bench_case;

/* Best time of repeated runs lasting at least min_seconds in total (at least 2 runs). */
#define TIME_BEST(best, min_seconds, stmt)                                                     \
    do {                                                                                       \
        stmt;                                                                                  \
        double start_ = now_seconds(bench_clock), total_ = 0;                                  \
        best = 1e30;                                                                           \
        for (int rep_ = 0; rep_ < 2 || total_ < (min_seconds); rep_++) {                       \
            double t0_ = now_seconds(bench_clock);                                             \
            stmt;                                                                              \
            double dt_ = now_seconds(bench_clock) - t0_;                                       \
            best = dt_ < best ? dt_ : best;                                                    \
            total_ = now_seconds(bench_clock) - start_;                                        \
        }                                                                                      \
    } while (0)

int main(int argc, char **argv)
{
    int threads = 2;
    double min_seconds = 0.5;
    bool small_only = false, cold = false, blas = true, words = false;
    const char *shape_set = "all";
    kvd_isa isa = kvd_isa_detect();
    clockid_t bench_clock = CLOCK_MONOTONIC;
    int rows[MAX_ROW_COUNTS] = {1, 16, 512};
    int num_rows = 3;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--min-seconds") == 0 && i + 1 < argc) {
            min_seconds = atof(argv[++i]);
        } else if (strcmp(argv[i], "--shapes") == 0 && i + 1 < argc) {
            shape_set = argv[++i];
            small_only = strcmp(shape_set, "small") == 0;
        } else if (strcmp(argv[i], "--rows") == 0 && i + 1 < argc) {
            num_rows = 0;
            for (char *p = argv[++i]; *p && num_rows < MAX_ROW_COUNTS; p += strspn(p, ","))
                rows[num_rows++] = (int)strtol(p, &p, 10);
        } else if (strcmp(argv[i], "--words") == 0) {
            words = true;
        } else if (strcmp(argv[i], "--no-blas") == 0) {
            blas = false;
        } else if (strcmp(argv[i], "--cold") == 0) {
            cold = true;
        } else if (strcmp(argv[i], "--cpu-time") == 0) {
            bench_clock = CLOCK_THREAD_CPUTIME_ID;
        } else if (strcmp(argv[i], "--isa") == 0 && i + 1 < argc) {
            isa = KVD_ISA_AVX512;
            for (int named = 0; named < KVD_ISA_COUNT; named++)
                if (strcmp(argv[i + 1], kvd_isa_name((kvd_isa)named)) == 0)
                    isa = (kvd_isa)named;
            i++;
        } else {
            fprintf(stderr, "usage: %s [--threads N] [--min-seconds S] [--shapes all|small|1.5b|7b] "
                            "[--rows M,M,...] [--isa avx512amx|avx512bf16|avx512|scalar|scalar-vdpbf16] "
                            "[--cpu-time] [--cold] [--no-blas] [--words]\n", argv[0]);
            return 1;
        }
    }
    if (bench_clock == CLOCK_THREAD_CPUTIME_ID && threads != 1) {
        fprintf(stderr, "bench_matmul: --cpu-time needs --threads 1\n");
        return 1;
    }
    if (!kvd_isa_supported(isa)) {
        fprintf(stderr, "bench_matmul: this CPU cannot run %s\n", kvd_isa_name(isa));
        return 1;
    }
    openblas_set_num_threads(threads);
    printf("kvd isa %s, OpenBLAS core %s, %d threads, %s time\n", kvd_isa_name(isa),
           openblas_get_corename(), threads, bench_clock == CLOCK_MONOTONIC ? "wall" : "thread CPU");
    printf("%-12s %4s | %9s %8s %8s | %9s %8s | %7s %9s\n", "shape NxK", "M", "kvd ms", "GFLOP/s",
           "wGB/s", "blas ms", "GFLOP/s", "speedup", "max|diff|");

    static const bench_case cases[] = {
        {"896x896", 896, 896},
        {"4864x896", 4864, 896},
        {"896x4864", 896, 4864},
        {"151936x896", 151936, 896},
    };
    static const bench_case cases_1_5b[] = {
        {"1536x1536", 1536, 1536},
        {"256x1536", 256, 1536},
        {"8960x1536", 8960, 1536},
        {"1536x8960", 1536, 8960},
    };
    static const bench_case cases_7b[] = {
        {"3584x3584", 3584, 3584},
        {"512x3584", 512, 3584},
        {"18944x3584", 18944, 3584},
        {"3584x18944", 3584, 18944},
    };
    const bench_case *set = cases;
    int num_cases = small_only ? 3 : 4;
    if (strcmp(shape_set, "1.5b") == 0)
        set = cases_1_5b;
    else if (strcmp(shape_set, "7b") == 0)
        set = cases_7b;
    else if (!small_only && strcmp(shape_set, "all") != 0) {
        fprintf(stderr, "bench_matmul: --shapes: all, small, 1.5b or 7b\n");
        return 1;
    }
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    int max_rows = 1;
    for (int i = 0; i < num_rows; i++) {
        if (rows[i] < 1) {
            fprintf(stderr, "bench_matmul: --rows: counts must be positive\n");
            return 1;
        }
        max_rows = rows[i] > max_rows ? rows[i] : max_rows;
    }
    for (int ci = 0; ci < num_cases; ci++) {
        const bench_case *bc = &set[ci];
        size_t wn = (size_t)bc->n * (size_t)bc->k;
        uint16_t *wb = aligned_alloc(64, (wn * 2 + 63) & ~(size_t)63);
        float *wf = aligned_alloc(64, wn * 4);
        float *x = aligned_alloc(64, (size_t)max_rows * bc->k * 4);
        size_t xw_stride = kvd_bf16_words_stride(bc->k);
        uint32_t *xw = aligned_alloc(64, ((size_t)max_rows * xw_stride * 4 + 63) & ~(size_t)63);
        float *out_kvd = aligned_alloc(64, (size_t)max_rows * bc->n * 4);
        float *out_blas = aligned_alloc(64, (size_t)max_rows * bc->n * 4);
        size_t packed_bytes = kvd_matrix_packed_bytes(KVD_DTYPE_BF16, bc->n, bc->k);
        int copies = cold ? (int)(((size_t)256 << 20) / packed_bytes) + 1 : 1;
        char *packed = aligned_alloc(64, packed_bytes * (size_t)copies);
        if (!wb || !wf || !x || !xw || !out_kvd || !out_blas || !packed) {
            fprintf(stderr, "bench_matmul: out of memory\n");
            return 1;
        }
        float scale = 1.0f / sqrtf((float)bc->k);
        for (size_t i = 0; i < wn; i++) {
            wb[i] = kvd_f32_to_bf16(rng_uniform(&seed) * scale);
            wf[i] = kvd_bf16_to_f32(wb[i]);
        }
        for (size_t i = 0; i < (size_t)max_rows * bc->k; i++)
            x[i] = rng_uniform(&seed);
        for (int c = 0; c < copies; c++)
            kvd_matrix_pack(packed + (size_t)c * packed_bytes, KVD_DTYPE_BF16, bc->n, bc->k, wb, 0,
                            kvd_matrix_panels(bc->n));
        kvd_matrix w = {.dtype = KVD_DTYPE_BF16, .rows = bc->n, .cols = bc->k, .data = packed};
        if (words && !kvd_matmul_takes_words(isa, &w)) {
            fprintf(stderr, "bench_matmul: --words: %s takes x as floats\n", kvd_isa_name(isa));
            return 1;
        }
        for (int r = 0; words && r < max_rows; r++)
            kvd_bf16_round_cols(isa, xw + (size_t)r * xw_stride, x + (size_t)r * bc->k, bc->k, 0,
                                bc->k);
        int run = 0;
        for (int ri = 0; ri < num_rows; ri++) {
            int m = rows[ri];
            double flops = 2.0 * m * bc->n * bc->k;
            double t_kvd, t_blas;
            TIME_BEST(t_kvd, min_seconds,
                      (w.data = packed + (size_t)(run++ % copies) * packed_bytes,
                       words ? matmul_words(isa, out_kvd, xw, xw_stride, m, &w, threads)
                             : kvd_matmul(isa, out_kvd, bc->n, x, bc->k, m, &w, NULL, false, threads)));
            t_blas = 0;
            if (blas)
                TIME_BEST(t_blas, min_seconds,
                          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, bc->n, bc->k,
                                      1.0f, x, bc->k, wf, bc->k, 0.0f, out_blas, bc->n));
            double max_diff = 0;
            for (size_t i = 0; blas && i < (size_t)m * bc->n; i++) {
                double d = fabs((double)out_kvd[i] - (double)out_blas[i]);
                max_diff = d > max_diff ? d : max_diff;
            }
            printf("%-12s %4d | %9.3f %8.1f %8.1f", bc->name, m, t_kvd * 1e3, flops / t_kvd * 1e-9,
                   (double)wn * 2 / t_kvd * 1e-9);
            if (blas)
                printf(" | %9.3f %8.1f | %6.2fx %9.2e", t_blas * 1e3, flops / t_blas * 1e-9,
                       t_blas / t_kvd, max_diff);
            printf("\n");
            fflush(stdout);
        }
        free(wb);
        free(packed);
        free(wf);
        free(x);
        free(xw);
        free(out_kvd);
        free(out_blas);
    }
    return 0;
}
