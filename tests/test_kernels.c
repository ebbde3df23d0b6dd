/* test_kernels.c - the compute kernels against double-precision references, and their
 * determinism: bitwise batch invariance, thread/split invariance, scalar == AVX-512.
 *
 * Tolerances are error bounds, not fudge factors. A matrix-product element is one
 * accumulator that starts at (what out held, when accumulating) + bias and takes k
 * FMAs in order: n = k + 1 rounded steps, so
 * |computed - exact| <= gamma(n) * (sum_k |x_k w_k| + |bias| + |out before|) with
 * gamma(n) = n u / (1 - n u), u = 2^-24 (Higham, "Accuracy and Stability of Numerical
 * Algorithms", 3.1); the exact value is computed in double from the same widened
 * weights. Over bf16 weights the product is defined on x rounded to bf16 (kvd_kernels.h),
 * so the exact value uses the rounded x; each product then passes through at most 16
 * FMAs of its block's chain, the chains' sum and one addition per block (TDPBF16PS
 * semantics), or at most 64 adds of its block's chain and one addition per block
 * (VDPBF16PS semantics), no more than k + 1 rounded steps when k >= 2 (k = 1: two), so
 * the same bound holds. Element-wise kernels get a few ulps, stated where used. Attention is
 * checked against a dense double softmax within 2e-6 relative to the output's scale.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvd/kvd_attention.h"
#include "kvd/kvd_half.h"
#include "kvd/kvd_kernels.h"
#include "kvd/kvd_kv.h"

/* ---- helpers ---------------------------------------------------------------------- */

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Uniform in [-1, 1). */
static float rng_float(uint64_t *s)
{
    return (float)((double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

static void fill(float *x, size_t n, uint64_t *s, float scale)
{
    for (size_t i = 0; i < n; i++)
        x[i] = rng_float(s) * scale;
}

/* A random weight matrix of the given dtype and its exact float values. */
typedef struct test_matrix {
    kvd_matrix m;
    void *data;
    float *values; /* (rows, cols) widened */
} test_matrix;

/* The rows are drawn row-major, as a checkpoint stores them, then packed. */
static test_matrix make_matrix(kvd_dtype dtype, int rows, int cols, uint64_t *s)
{
    test_matrix t;
    size_t n = (size_t)rows * cols;
    void *row_major = malloc(n * 4);
    t.data = aligned_alloc(64, kvd_matrix_packed_bytes(dtype, rows, cols));
    t.values = malloc(n * sizeof(float));
    assert_non_null(row_major);
    assert_non_null(t.data);
    assert_non_null(t.values);
    for (size_t i = 0; i < n; i++) {
        float v = rng_float(s) / sqrtf((float)cols);
        if (dtype == KVD_DTYPE_F32) {
            ((float *)row_major)[i] = v;
            t.values[i] = v;
        } else if (dtype == KVD_DTYPE_F16) {
            uint16_t h = kvd_f32_to_f16(v);
            ((uint16_t *)row_major)[i] = h;
            t.values[i] = kvd_f16_to_f32(h);
        } else {
            uint16_t h = kvd_f32_to_bf16(v);
            ((uint16_t *)row_major)[i] = h;
            t.values[i] = kvd_bf16_to_f32(h);
        }
    }
    kvd_matrix_pack(t.data, dtype, rows, cols, row_major, 0, kvd_matrix_panels(rows));
    free(row_major);
    t.m = (kvd_matrix){.dtype = dtype, .rows = rows, .cols = cols, .data = t.data};
    return t;
}

static void free_matrix(test_matrix *t)
{
    free(t->data);
    free(t->values);
}

static double gamma_n(int n)
{
    double u = ldexp(1.0, -24);
    return n * u / (1.0 - n * u);
}

static kvd_isa best_isa(void)
{
    static const kvd_isa best_first[] = {KVD_ISA_AVX512_AMX, KVD_ISA_AVX512_BF16, KVD_ISA_AVX512};
    for (size_t i = 0; i < sizeof best_first / sizeof best_first[0]; i++)
        if (kvd_isa_supported(best_first[i]))
            return best_first[i];
    return KVD_ISA_SCALAR;
}

/* x as a product over bf16 weights reads it: bf16, nearest even, subnormals to zero. */
static double bf16_input(float x)
{
    return fabsf(x) < 0x1p-126f ? 0.0 : kvd_bf16_to_f32(kvd_f32_to_bf16(x));
}

/* ---- matrix product: accuracy --------------------------------------------------- */

static void check_matmul_accuracy(kvd_isa isa, kvd_dtype dtype, int m, int n, int k, bool with_bias,
                                  bool accumulate)
{
    uint64_t s = 0x1234567ull + (uint64_t)(m * 131 + n * 7 + k + dtype * 1000);
    test_matrix w = make_matrix(dtype, n, k, &s);
    float *x = malloc((size_t)m * k * sizeof(float));
    float *bias = malloc((size_t)n * sizeof(float));
    float *out = malloc((size_t)m * n * sizeof(float));
    float *before = malloc((size_t)m * n * sizeof(float));
    fill(x, (size_t)m * k, &s, 1.0f);
    fill(bias, (size_t)n, &s, 0.5f);
    fill(out, (size_t)m * n, &s, 2.0f);
    memcpy(before, out, (size_t)m * n * sizeof(float));
    kvd_matmul(isa, out, n, x, k, m, &w.m, with_bias ? bias : NULL, accumulate, 2);
    int steps = k + 1;
    for (int i = 0; i < m; i++) {
        for (int j = 0; j < n; j++) {
            double exact = with_bias ? bias[j] : 0.0, magnitude = with_bias ? fabs(bias[j]) : 0.0;
            if (accumulate) {
                exact += before[(size_t)i * n + j];
                magnitude += fabs(before[(size_t)i * n + j]);
            }
            for (int t = 0; t < k; t++) {
                float xv = x[(size_t)i * k + t];
                double p = (dtype == KVD_DTYPE_BF16 ? bf16_input(xv) : xv) * w.values[(size_t)j * k + t];
                exact += p;
                magnitude += fabs(p);
            }
            double bound = gamma_n(steps) * magnitude;
            double got = out[(size_t)i * n + j];
            if (fabs(got - exact) > bound)
                fail_msg("%s %s m=%d n=%d k=%d at (%d,%d): got %.9g exact %.9g bound %.3g",
                         kvd_isa_name(isa), kvd_dtype_name(dtype), m, n, k, i, j, got, exact, bound);
        }
    }
    free_matrix(&w);
    free(x);
    free(bias);
    free(out);
    free(before);
}

static void test_matmul_accuracy(void **state)
{
    (void)state;
    static const kvd_dtype dtypes[] = {KVD_DTYPE_F32, KVD_DTYPE_F16, KVD_DTYPE_BF16};
    static const int shapes[][3] = {
        /* m, n, k: partial panels, one-tile (streaming) shapes of 1..12 rows taking 4, 2
         * and 1 panels at a time, and sliced many-tile shapes */
        {1, 1, 1}, {1, 13, 16}, {2, 9, 17}, {3, 20, 37}, {4, 6, 64}, {5, 19, 100},
        {9, 50, 896}, {17, 7, 1000}, {1, 300, 4864}, {6, 13, 4864}, {2, 130, 33},
        {12, 70, 300}, {13, 40, 257}, {30, 100, 520},
    };
    for (int isa = 0; isa < KVD_ISA_COUNT; isa++) {
        if (!kvd_isa_supported((kvd_isa)isa))
            continue;
        for (size_t d = 0; d < 3; d++)
            for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
                check_matmul_accuracy((kvd_isa)isa, dtypes[d], shapes[i][0], shapes[i][1],
                                      shapes[i][2], i % 2 == 0, false);
    }
}

static void test_matmul_accumulate(void **state)
{
    (void)state;
    check_matmul_accuracy(best_isa(), KVD_DTYPE_BF16, 6, 33, 80, false, true);
    check_matmul_accuracy(best_isa(), KVD_DTYPE_F16, 2, 21, 48, true, true);
    check_matmul_accuracy(best_isa(), KVD_DTYPE_BF16, 20, 40, 300, true, true);
    /* accumulating starts each accumulator from what out held: row by row, exactly the
     * product with that row of out as its bias */
    uint64_t s = 99;
    test_matrix w = make_matrix(KVD_DTYPE_BF16, 40, 70, &s);
    float x[5 * 70], a[5 * 40], b[5 * 40];
    fill(x, 5 * 70, &s, 1.0f);
    fill(b, 5 * 40, &s, 3.0f);
    for (int i = 0; i < 5; i++)
        kvd_matmul(best_isa(), a + i * 40, 40, x + i * 70, 70, 1, &w.m, b + i * 40, false, 1);
    kvd_matmul(best_isa(), b, 40, x, 70, 5, &w.m, NULL, true, 1);
    assert_memory_equal(a, b, sizeof a);
    free_matrix(&w);
}

/* ---- matrix product: determinism ------------------------------------------------ */

/* Every row of a 64-row batch, computed inside batches of many sizes at many offsets,
 * with 1..3 threads and arbitrary column splits, is bit-identical to the row alone. */
static void check_batch_invariance(kvd_isa isa, kvd_dtype dtype, int n, int k)
{
    enum { ROWS = 64 };
    uint64_t s = 0xfeedull + (uint64_t)(dtype * 17 + n + k);
    test_matrix w = make_matrix(dtype, n, k, &s);
    float *x = malloc((size_t)ROWS * k * sizeof(float));
    float *bias = malloc((size_t)n * sizeof(float));
    float *alone = malloc((size_t)ROWS * n * sizeof(float));
    float *batch = malloc((size_t)ROWS * n * sizeof(float));
    fill(x, (size_t)ROWS * k, &s, 1.0f);
    fill(bias, (size_t)n, &s, 1.0f);
    for (int r = 0; r < ROWS; r++)
        kvd_matmul_cols(isa, alone + (size_t)r * n, n, x + (size_t)r * k, k, 1, &w.m, bias, false,
                        0, n);
    static const int sizes[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17, 31, 33, 63, 64};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        int m = sizes[si];
        for (int offset = 0; offset + m <= ROWS; offset += m + 3) {
            /* one thread, odd column split: [0, a), [a, b), [b, n) */
            int a = n / 3 + 1, b = n - 5 > a ? n - 5 : a;
            memset(batch, 0xff, (size_t)m * n * sizeof(float));
            kvd_matmul_cols(isa, batch, n, x + (size_t)offset * k, k, m, &w.m, bias, false, 0, a);
            kvd_matmul_cols(isa, batch, n, x + (size_t)offset * k, k, m, &w.m, bias, false, a, b);
            kvd_matmul_cols(isa, batch, n, x + (size_t)offset * k, k, m, &w.m, bias, false, b, n);
            if (memcmp(batch, alone + (size_t)offset * n, (size_t)m * n * sizeof(float)) != 0)
                fail_msg("%s %s n=%d k=%d: rows %d..%d in a batch of %d differ from alone",
                         kvd_isa_name(isa), kvd_dtype_name(dtype), n, k, offset, offset + m, m);
            for (int threads = 1; threads <= 3; threads++) {
                memset(batch, 0xff, (size_t)m * n * sizeof(float));
                kvd_matmul(isa, batch, n, x + (size_t)offset * k, k, m, &w.m, bias, false, threads);
                if (memcmp(batch, alone + (size_t)offset * n, (size_t)m * n * sizeof(float)) != 0)
                    fail_msg("%s %s n=%d k=%d: batch of %d at %d with %d threads differs",
                             kvd_isa_name(isa), kvd_dtype_name(dtype), n, k, m, offset, threads);
            }
        }
    }
    free_matrix(&w);
    free(x);
    free(bias);
    free(alone);
    free(batch);
}

/* A prefill-sized batch (several chunks of row tiles, several slices of k): every row
 * is bit-identical to the row alone. */
static void test_matmul_large_batch_invariance(void **state)
{
    (void)state;
    enum { M = 800, N = 70, K = 600 };
    uint64_t s = 0xbeefull;
    test_matrix w = make_matrix(KVD_DTYPE_BF16, N, K, &s);
    float *x = malloc((size_t)M * K * sizeof(float));
    float *alone = malloc((size_t)M * N * sizeof(float));
    float *batch = malloc((size_t)M * N * sizeof(float));
    fill(x, (size_t)M * K, &s, 1.0f);
    for (int r = 0; r < M; r++)
        kvd_matmul_cols(best_isa(), alone + (size_t)r * N, N, x + (size_t)r * K, K, 1, &w.m, NULL,
                        false, 0, N);
    kvd_matmul(best_isa(), batch, N, x, K, M, &w.m, NULL, false, 2);
    assert_memory_equal(batch, alone, (size_t)M * N * sizeof(float));
    free_matrix(&w);
    free(x);
    free(alone);
    free(batch);
}

static void test_matmul_batch_invariance(void **state)
{
    (void)state;
    for (int isa = 0; isa < KVD_ISA_COUNT; isa++) {
        if (!kvd_isa_supported((kvd_isa)isa))
            continue;
        check_batch_invariance((kvd_isa)isa, KVD_DTYPE_BF16, 45, 200);
        check_batch_invariance((kvd_isa)isa, KVD_DTYPE_F16, 37, 61);
        check_batch_invariance((kvd_isa)isa, KVD_DTYPE_F32, 29, 96);
    }
    /* a long k (several panels' worth of weights) on the fast path */
    check_batch_invariance(best_isa(), KVD_DTYPE_BF16, 70, 4864);
}

/* x rounded once into words (kvd_bf16_round_cols, here in column pieces of odd even
 * widths as threads round what they computed, and whole) gives the same bits as the
 * product over the floats, for both VDPBF16PS builds, accumulating or not, for the
 * shapes of every tiling path: 1 and 7 rows (streaming tiles), 16 (small batch), 100
 * (chunks of tiles), and a k past the first slice (2600: two slices) with k not a
 * multiple of 32 (the padding words must read as zero, whatever the buffer held). */
static void test_matmul_words_match_floats(void **state)
{
    (void)state;
    static const struct { int m, n, k; } shapes[] = {
        {1, 45, 601}, {7, 64, 601}, {16, 96, 200}, {100, 45, 601}, {33, 40, 2600}};
    uint64_t s = 777;
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        int m = shapes[c].m, n = shapes[c].n, k = shapes[c].k;
        size_t stride = kvd_bf16_words_stride(k) + 3; /* a row stride past the padding */
        assert_true(kvd_bf16_words_stride(k) * 2 >= (size_t)k);
        assert_int_equal(kvd_bf16_words_stride(k) % 16, 0);
        test_matrix w = make_matrix(KVD_DTYPE_BF16, n, k, &s);
        float *x = malloc((size_t)m * k * sizeof(float));
        uint32_t *words = malloc((size_t)m * stride * sizeof(uint32_t));
        uint32_t *whole = malloc((size_t)m * stride * sizeof(uint32_t));
        float *expected = malloc((size_t)m * n * sizeof(float));
        float *got = malloc((size_t)m * n * sizeof(float));
        float bias[96];
        fill(x, (size_t)m * k, &s, 2.0f);
        fill(bias, (size_t)n, &s, 1.0f);
        for (int isa = KVD_ISA_SCALAR; isa < KVD_ISA_COUNT; isa++) {
            if (!kvd_isa_supported((kvd_isa)isa))
                continue;
            assert_int_equal(kvd_matmul_takes_words((kvd_isa)isa, &w.m),
                             kvd_isa_vdpbf16((kvd_isa)isa));
            if (!kvd_isa_vdpbf16((kvd_isa)isa))
                continue;
            memset(words, 0xa5, (size_t)m * stride * sizeof(uint32_t));
            memset(whole, 0x5a, (size_t)m * stride * sizeof(uint32_t));
            for (int r = 0; r < m; r++) {
                const float *row = x + (size_t)r * k;
                int cuts[] = {0, 2, 64, 98, 288, k};
                for (int i = 0; i + 1 < 6; i++) {
                    int c0 = cuts[i] < k ? cuts[i] : k, c1 = cuts[i + 1] < k ? cuts[i + 1] : k;
                    if (c0 < c1)
                        kvd_bf16_round_cols((kvd_isa)isa, words + (size_t)r * stride, row, k,
                                            c0, c1);
                }
                kvd_bf16_round_cols((kvd_isa)isa, whole + (size_t)r * stride, row, k, 0, k);
                assert_memory_equal(words + (size_t)r * stride, whole + (size_t)r * stride,
                                    kvd_bf16_words_stride(k) * sizeof(uint32_t));
                /* the words are x rounded as the products read it */
                for (int i = 0; i < (int)kvd_bf16_words_stride(k) * 2; i++) {
                    uint32_t word = whole[(size_t)r * stride + (size_t)i / 2];
                    uint16_t half = (uint16_t)(i % 2 ? word >> 16 : word);
                    double want = i < k ? bf16_input(row[i]) : 0.0;
                    assert_true(kvd_bf16_to_f32(half) == want);
                }
            }
            for (int accumulate = 0; accumulate < 2; accumulate++) {
                fill(expected, (size_t)m * n, &s, 1.0f);
                memcpy(got, expected, (size_t)m * n * sizeof(float));
                kvd_matmul_cols((kvd_isa)isa, expected, n, x, k, m, &w.m, bias, accumulate, 0, n);
                /* two column ranges, as two threads take them */
                kvd_matmul_cols_words((kvd_isa)isa, got, n, words, stride, m, &w.m, bias,
                                      accumulate, 0, 32);
                kvd_matmul_cols_words((kvd_isa)isa, got, n, words, stride, m, &w.m, bias,
                                      accumulate, 32, n);
                if (memcmp(expected, got, (size_t)m * n * sizeof(float)) != 0)
                    fail_msg("%s m=%d n=%d k=%d accumulate=%d: words differ from floats",
                             kvd_isa_name((kvd_isa)isa), m, n, k, accumulate);
            }
        }
        free_matrix(&w);
        free(x);
        free(words);
        free(whole);
        free(expected);
        free(got);
    }
}

/* The scalar fallback computes the same bits as the AVX-512 kernels, the AMX ones and
 * the VDPBF16PS ones, each against the scalar build of its bf16 semantics (KVD_ISA_SCALAR
 * or KVD_ISA_SCALAR_VDPBF16), including where bf16 products meet subnormals. Shapes: 1
 * row (decode), 7 rows (one streaming tile), 16 (small-batch tiles) and 60 (prefill
 * tiles of 12 rows), and 60 rows of a k long enough to be cut into slices (VDPBF16PS:
 * slices of up to 2048 inputs, partial sums parked in out between them). */
static void test_scalar_matches_avx512(void **state)
{
    (void)state;
    if (!kvd_isa_supported(KVD_ISA_AVX512))
        skip();
    uint64_t s = 4242;
    static const kvd_dtype dtypes[] = {KVD_DTYPE_F32, KVD_DTYPE_F16, KVD_DTYPE_BF16};
    static const int rows[] = {1, 7, 16, 60};
    enum { MAX_M = 60, K = 601, LONG_K = 2600, N = 45 };
    float *x = malloc((size_t)MAX_M * LONG_K * sizeof(float));
    float *witness[2] = {malloc((size_t)MAX_M * N * sizeof(float)),
                         malloc((size_t)MAX_M * N * sizeof(float))};
    float *b = malloc((size_t)MAX_M * N * sizeof(float));
    float bias[N];
    for (int d = 0; d < 3; d++) {
        /* the last case's x has subnormals and products and sums that underflow */
        for (int c = 0; c < 6; c++) {
            int m = c == 5 ? MAX_M : rows[c % 4], k = c == 5 ? LONG_K : K, n = N;
            bool tiny = c == 4;
            test_matrix w = make_matrix(dtypes[d], n, k, &s);
            fill(x, (size_t)m * k, &s, tiny ? 0x1p-120f : 1.0f);
            fill(bias, N, &s, tiny ? 0x1p-125f : 1.0f);
            for (int i = 0; tiny && i < m * k; i += 7)
                x[i] = (float)(i % 3) * 0x1p-140f; /* subnormal */
            kvd_matmul(KVD_ISA_SCALAR, witness[0], n, x, k, m, &w.m, bias, false, 1);
            kvd_matmul(KVD_ISA_SCALAR_VDPBF16, witness[1], n, x, k, m, &w.m, bias, false, 1);
            size_t bytes = (size_t)m * n * sizeof(float);
            /* the semantics differ only over bf16 weights, and there visibly */
            if (dtypes[d] != KVD_DTYPE_BF16)
                assert_memory_equal(witness[0], witness[1], bytes);
            else if (!tiny)
                assert_memory_not_equal(witness[0], witness[1], bytes);
            for (int isa = KVD_ISA_AVX512; isa < KVD_ISA_COUNT; isa++) {
                if (!kvd_isa_supported((kvd_isa)isa) || isa == KVD_ISA_SCALAR_VDPBF16)
                    continue;
                kvd_matmul((kvd_isa)isa, b, n, x, k, m, &w.m, bias, false, 2);
                if (memcmp(witness[kvd_isa_vdpbf16((kvd_isa)isa)], b, bytes) != 0)
                    fail_msg("%s %s m=%d case %d: differs from scalar", kvd_isa_name((kvd_isa)isa),
                             kvd_dtype_name(dtypes[d]), m, c);
            }
            free_matrix(&w);
        }
    }
    free(x);
    free(witness[0]);
    free(witness[1]);
    free(b);
    float v[100], up[100], g1[100], g2[100], w[100], r1[100], r2[100], e1[100], e2[100];
    fill(v, 100, &s, 30.0f);
    fill(up, 100, &s, 2.0f);
    fill(w, 100, &s, 1.0f);
    memcpy(g1, v, sizeof v);
    memcpy(g2, v, sizeof v);
    kvd_swiglu(KVD_ISA_SCALAR, g1, up, 100);
    kvd_swiglu(KVD_ISA_AVX512, g2, up, 100);
    assert_memory_equal(g1, g2, sizeof g1);
    kvd_rmsnorm(KVD_ISA_SCALAR, r1, v, w, 100, 1e-6f);
    kvd_rmsnorm(KVD_ISA_AVX512, r2, v, w, 100, 1e-6f);
    assert_memory_equal(r1, r2, sizeof r1);
    kvd_exp(KVD_ISA_SCALAR, e1, v, 100);
    kvd_exp(KVD_ISA_AVX512, e2, v, 100);
    assert_memory_equal(e1, e2, sizeof e1);
}

/* Which bf16 semantics each ISA computes, on one output worked out by hand from the
 * definitions in kvd_kernels.h: u = 2^-23 (an ulp of 1), x = (1, 1, 1, 1), W = (u, 1,
 * u, u/2), no bias.
 * - VDPBF16PS: the block's chain from zero takes the odd input first: 1, then 1 + u
 *   (exact), then 1 + u + u/2, a tie, to even: 1 + 2u, then 1 + 3u. (Even input first:
 *   1 + 2u, then + u/2, a tie: 1 + 2u.)
 * - TDPBF16PS: the even chain gives u + u = 2u, the odd one 1 + u/2, a tie: 1; their
 *   sum 1 + 2u. */
static void test_bf16_semantics_by_hand(void **state)
{
    (void)state;
    const float u = 0x1p-23f;
    uint16_t row[4] = {kvd_f32_to_bf16(u), kvd_f32_to_bf16(1.0f), kvd_f32_to_bf16(u),
                       kvd_f32_to_bf16(u / 2)};
    void *packed = aligned_alloc(64, kvd_matrix_packed_bytes(KVD_DTYPE_BF16, 1, 4));
    assert_non_null(packed);
    kvd_matrix_pack(packed, KVD_DTYPE_BF16, 1, 4, row, 0, 1);
    kvd_matrix w = {.dtype = KVD_DTYPE_BF16, .rows = 1, .cols = 4, .data = packed};
    float x[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    for (int isa = 0; isa < KVD_ISA_COUNT; isa++) {
        if (!kvd_isa_supported((kvd_isa)isa))
            continue;
        float out = 0.0f, expected = kvd_isa_vdpbf16((kvd_isa)isa) ? 1.0f + 3 * u : 1.0f + 2 * u;
        kvd_matmul_cols((kvd_isa)isa, &out, 1, x, 4, 1, &w, NULL, false, 0, 1);
        if (out != expected)
            fail_msg("%s: got 1 + %.3g u, expected 1 + %.3g u", kvd_isa_name((kvd_isa)isa),
                     (double)((out - 1.0f) / u), (double)((expected - 1.0f) / u));
    }
    free(packed);
}

/* ---- element-wise kernels -------------------------------------------------------- */

static void test_rmsnorm(void **state)
{
    (void)state;
    uint64_t s = 7;
    static const int sizes[] = {1, 15, 16, 64, 896, 1001};
    for (int isa = 0; isa <= 1; isa++) {
        if (!kvd_isa_supported((kvd_isa)isa))
            continue;
        for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
            int n = sizes[si];
            float *x = malloc(n * sizeof(float)), *w = malloc(n * sizeof(float));
            float *out = malloc(n * sizeof(float));
            fill(x, n, &s, 3.0f);
            fill(w, n, &s, 2.0f);
            kvd_rmsnorm((kvd_isa)isa, out, x, w, n, 1e-6f);
            double ss = 0;
            for (int i = 0; i < n; i++)
                ss += (double)x[i] * x[i];
            double r = 1.0 / sqrt(ss / n + 1e-6);
            for (int i = 0; i < n; i++) {
                double exact = x[i] * r * w[i];
                /* sum of squares (gamma of n/16+5 steps), sqrt, divide, two multiplies */
                double bound = (gamma_n(n / 16 + 5) / 2 + ldexp(4.0, -24)) * fabs(exact) + 1e-30;
                if (fabs(out[i] - exact) > bound)
                    fail_msg("rmsnorm n=%d i=%d: %.9g vs %.9g", n, i, out[i], exact);
            }
            /* in place gives the same bits */
            float *copy = malloc(n * sizeof(float));
            memcpy(copy, x, n * sizeof(float));
            kvd_rmsnorm((kvd_isa)isa, copy, copy, w, n, 1e-6f);
            assert_memory_equal(copy, out, n * sizeof(float));
            free(copy);
            free(x);
            free(w);
            free(out);
        }
    }
}

static void test_rope(void **state)
{
    (void)state;
    enum { HEADS = 3, HD = 64 };
    float inv_freq[HD / 2], cos_sin[HD];
    kvd_rope_inv_freq(inv_freq, HD, 1000000.0f);
    /* theta^(-2i/d): i = 0 is 1, i = 16 is theta^-0.5 */
    assert_true(inv_freq[0] == 1.0f);
    assert_true(fabs(inv_freq[16] - 1e-3) < 1e-9);
    uint64_t s = 11;
    static const int positions[] = {0, 1, 7, 100, 4095};
    for (int isa = 0; isa <= 1; isa++) {
        if (!kvd_isa_supported((kvd_isa)isa))
            continue;
        for (size_t pi = 0; pi < sizeof positions / sizeof positions[0]; pi++) {
            int pos = positions[pi];
            float v[HEADS * HD], orig[HEADS * HD];
            fill(v, HEADS * HD, &s, 1.0f);
            memcpy(orig, v, sizeof v);
            kvd_rope_angles(cos_sin, pos, inv_freq, HD);
            kvd_rope((kvd_isa)isa, v, HEADS, HD, cos_sin);
            for (int h = 0; h < HEADS; h++) {
                for (int i = 0; i < HD / 2; i++) {
                    double angle = (double)((float)pos * inv_freq[i]);
                    double x = orig[h * HD + i], y = orig[h * HD + i + HD / 2];
                    double ex = x * cos(angle) - y * sin(angle);
                    double ey = y * cos(angle) + x * sin(angle);
                    /* cosf/sinf within 1 ulp, then 2 products and a sum: 4 ulps of |x|+|y| */
                    double bound = ldexp(4.0, -24) * (fabs(x) + fabs(y));
                    if (fabs(v[h * HD + i] - ex) > bound || fabs(v[h * HD + i + HD / 2] - ey) > bound)
                        fail_msg("rope pos %d head %d dim %d", pos, h, i);
                }
            }
            if (pos == 0)
                assert_memory_equal(v, orig, sizeof v); /* angle 0 is the identity */
        }
    }
}

static void test_swiglu_and_exp(void **state)
{
    (void)state;
    uint64_t s = 5;
    enum { N = 1000 };
    float g[N], up[N], out[N], e[N];
    fill(g, N, &s, 20.0f);
    fill(up, N, &s, 3.0f);
    g[0] = 0.0f;
    g[1] = -87.5f; /* clamped region */
    g[2] = 87.5f;
    for (int isa = 0; isa <= 1; isa++) {
        if (!kvd_isa_supported((kvd_isa)isa))
            continue;
        memcpy(out, g, sizeof g);
        kvd_swiglu((kvd_isa)isa, out, up, N);
        for (int i = 0; i < N; i++) {
            double exact = g[i] / (1.0 + exp(-(double)g[i])) * up[i];
            /* exp within 2 ulps, then add, divide, multiply */
            double bound = ldexp(6.0, -24) * fabs(exact) + 1e-37;
            if (fabs(out[i] - exact) > bound)
                fail_msg("swiglu %d: g=%g up=%g got %.9g exact %.9g", i, g[i], up[i], out[i], exact);
        }
        kvd_exp((kvd_isa)isa, e, g, N);
        for (int i = 0; i < N; i++) {
            if (g[i] < -87.0f || g[i] > 88.0f)
                continue;
            double exact = exp((double)g[i]);
            if (fabs(e[i] - exact) > ldexp(2.0, -24) * exact)
                fail_msg("exp(%.9g) = %.9g, exact %.9g", g[i], e[i], exact);
        }
        assert_true(e[0] == 1.0f);
    }
    assert_int_equal(kvd_argmax((const float[]){1, 5, 5, 2}, 4), 1);
    assert_int_equal(kvd_argmax(NULL, 0), -1);
}

static void test_matrix_row(void **state)
{
    (void)state;
    uint64_t s = 3;
    static const kvd_dtype dtypes[] = {KVD_DTYPE_F32, KVD_DTYPE_F16, KVD_DTYPE_BF16};
    for (int d = 0; d < 3; d++) {
        /* 45 rows: both halves of a bf16 panel word, and a padded second panel */
        test_matrix w = make_matrix(dtypes[d], 45, 33, &s);
        float row[33];
        for (int r = 0; r < 45; r++) {
            kvd_matrix_row(row, &w.m, r);
            assert_memory_equal(row, w.values + r * 33, sizeof row);
        }
        free_matrix(&w);
    }
}

/* ---- paged attention --------------------------------------------------------------- */

typedef struct attn_case {
    int layers, kv_heads, heads, head_dim;
} attn_case;

/* Positions [0, n) of one sequence in a fresh pool of the given block size and dtype,
 * K and V random (the same for every pool: seeded by position). Returns the pool. */
static kvd_kv_pool *filled_pool(const attn_case *c, int block_size, kvd_dtype dtype, int n,
                                kvd_block_table *table, const float *k, const float *v)
{
    kvd_kv_config cfg = {
        .num_layers = c->layers, .num_kv_heads = c->kv_heads, .head_dim = c->head_dim,
        .block_size = block_size, .dtype = dtype,
        .num_blocks = (size_t)(n + block_size - 1) / block_size + 1,
    };
    kvd_error err = {0};
    kvd_kv_pool *pool = kvd_kv_pool_create(&cfg, &err);
    if (!pool)
        fail_msg("pool: %s", err.msg);
    kvd_block_table_init(table);
    assert_int_equal(kvd_block_table_append(pool, table, n, &err), 0);
    int row = c->kv_heads * c->head_dim;
    for (int layer = 0; layer < c->layers; layer++)
        for (int p = 0; p < n; p++)
            kvd_kv_store(best_isa(), pool, layer, table, p, k + ((size_t)layer * n + p) * row,
                         v + ((size_t)layer * n + p) * row);
    return pool;
}

/* Dense double-precision causal attention of query rows at positions first..first+rows-1. */
static void reference_attention(const attn_case *c, int n, int layer, const float *q, int first,
                                int rows, const float *k, const float *v, double *out)
{
    int group = c->heads / c->kv_heads, hd = c->head_dim, row = c->kv_heads * hd;
    double *sc = malloc((size_t)n * sizeof(double));
    for (int i = 0; i < rows; i++) {
        int pos = first + i;
        for (int h = 0; h < c->heads; h++) {
            int kvh = h / group;
            const float *qh = q + (size_t)i * c->heads * hd + h * hd;
            double mx = -INFINITY, sum = 0;
            for (int j = 0; j <= pos; j++) {
                const float *kj = k + ((size_t)layer * n + j) * row + kvh * hd;
                double d = 0;
                for (int t = 0; t < hd; t++)
                    d += (double)qh[t] * kj[t];
                sc[j] = d / sqrt((double)hd);
                mx = sc[j] > mx ? sc[j] : mx;
            }
            for (int j = 0; j <= pos; j++)
                sum += (sc[j] = exp(sc[j] - mx));
            for (int t = 0; t < hd; t++) {
                double acc = 0;
                for (int j = 0; j <= pos; j++)
                    acc += sc[j] * v[((size_t)layer * n + j) * row + kvh * hd + t];
                out[((size_t)i * c->heads + h) * hd + t] = acc / sum;
            }
        }
    }
    free(sc);
}

/* The value of e4m3 code c (OCP 8-bit floating point: sign, 4 exponent bits with bias 7,
 * 3 mantissa bits; exponent 0 is subnormal; 0x7F and 0xFF are NaN), from the format's
 * definition rather than kvd's bit tricks. */
static double e4m3_value(int c)
{
    int e = (c >> 3) & 15, m = c & 7;
    double v = e == 0 ? ldexp(m / 8.0, -6) : ldexp(1.0 + m / 8.0, e - 7);
    return (c & 0x80) ? -v : v;
}

/* The code an fp8 page must hold for y: the nearest finite e4m3 value by exhaustive
 * search (ties to the even code, i.e. even mantissa; past 448 the nearest is 448, which
 * is saturation), with y's sign. */
static int e4m3_nearest(float y)
{
    double a = fabs((double)y);
    int best = 0;
    for (int c = 1; c <= 0x7E; c++) {
        double dc = fabs(e4m3_value(c) - a), db = fabs(e4m3_value(best) - a);
        if (dc < db || (dc == db && (c & 1) == 0))
            best = c;
    }
    return (signbit(y) ? 0x80 : 0) | best;
}

/* What the cache gives back for x (rows of head_dim values): the dtype's rounding, or
 * for int8 each row's f16 scale d = max|x| / 127 and round(x / d) * d, for fp8 d =
 * max|x| / 448 and e4m3(x / d) * d (kvd_attention.h). */
static void round_to(kvd_dtype dtype, float *x, size_t n, int head_dim)
{
    if (dtype == KVD_DTYPE_I8 || dtype == KVD_DTYPE_F8) {
        float top = dtype == KVD_DTYPE_I8 ? 127.0f : 448.0f;
        for (size_t r = 0; r < n; r += (size_t)head_dim) {
            float amax = 0;
            for (int t = 0; t < head_dim; t++)
                amax = fmaxf(amax, fabsf(x[r + t]));
            float d = kvd_f16_to_f32(kvd_f32_to_f16(amax / top));
            for (int t = 0; t < head_dim; t++) {
                float y = x[r + t] / d;
                float q = dtype == KVD_DTYPE_I8 ? fminf(fmaxf(nearbyintf(y), -127.0f), 127.0f)
                                                : (float)e4m3_value(e4m3_nearest(y));
                x[r + t] = d > 0 ? q * d : 0.0f;
            }
        }
        return;
    }
    for (size_t i = 0; i < n; i++)
        x[i] = dtype == KVD_DTYPE_F16 ? kvd_f16_to_f32(kvd_f32_to_f16(x[i]))
             : dtype == KVD_DTYPE_BF16 ? kvd_bf16_to_f32(kvd_f32_to_bf16(x[i])) : x[i];
}

static void test_paged_attention(void **state)
{
    (void)state;
    static const attn_case cases[] = {{2, 2, 14, 64}, {1, 1, 2, 24}, {1, 2, 2, 16}};
    static const kvd_dtype dtypes[] = {KVD_DTYPE_F32, KVD_DTYPE_F16, KVD_DTYPE_BF16, KVD_DTYPE_I8,
                                       KVD_DTYPE_F8};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const attn_case *c = &cases[ci];
        enum { N = 100 };
        int row = c->kv_heads * c->head_dim, qrow = c->heads * c->head_dim;
        uint64_t s = 77 + ci;
        float *k = malloc((size_t)c->layers * N * row * sizeof(float));
        float *v = malloc((size_t)c->layers * N * row * sizeof(float));
        float *q = malloc((size_t)N * qrow * sizeof(float));
        fill(k, (size_t)c->layers * N * row, &s, 2.0f);
        fill(v, (size_t)c->layers * N * row, &s, 1.0f);
        fill(q, (size_t)N * qrow, &s, 2.0f);
        kvd_attention_shape shape = {c->heads, c->kv_heads, c->head_dim, 1.0f / sqrtf((float)c->head_dim)};
        float *first = malloc((size_t)N * qrow * sizeof(float));
        float *out = malloc((size_t)N * qrow * sizeof(float));
        double *ref = malloc((size_t)N * qrow * sizeof(double));
        for (int d = 0; d < (int)(sizeof dtypes / sizeof dtypes[0]); d++) {
            float *kr = malloc((size_t)c->layers * N * row * sizeof(float));
            float *vr = malloc((size_t)c->layers * N * row * sizeof(float));
            memcpy(kr, k, (size_t)c->layers * N * row * sizeof(float));
            memcpy(vr, v, (size_t)c->layers * N * row * sizeof(float));
            round_to(dtypes[d], kr, (size_t)c->layers * N * row, c->head_dim);
            round_to(dtypes[d], vr, (size_t)c->layers * N * row, c->head_dim);
            /* int8 pages: q.k is an integer product, each query head quantized as a
             * cache row is (kvd_attention.h) */
            float *qr = malloc((size_t)N * qrow * sizeof(float));
            memcpy(qr, q, (size_t)N * qrow * sizeof(float));
            if (dtypes[d] == KVD_DTYPE_I8)
                round_to(dtypes[d], qr, (size_t)N * qrow, c->head_dim);
            int layer = c->layers - 1;
            reference_attention(c, N, layer, qr, 0, N, kr, vr, ref);
            free(qr);
            static const int block_sizes[] = {1, 2, 16, 64, 256};
            for (size_t bi = 0; bi < sizeof block_sizes / sizeof block_sizes[0]; bi++) {
                kvd_block_table table;
                kvd_kv_pool *pool = filled_pool(c, block_sizes[bi], dtypes[d], N, &table, k, v);
                for (int isa = 0; isa <= 1; isa++) {
                    if (!kvd_isa_supported((kvd_isa)isa))
                        continue;
                    /* all rows at once, 2 threads */
                    kvd_attention_query all = {&table, 0, N, q, qrow, out, qrow};
                    kvd_error err = {0};
                    assert_int_equal(kvd_paged_attention((kvd_isa)isa, pool, layer, &shape, &all, 1, 2, &err), 0);
                    if (bi == 0 && isa == 0)
                        memcpy(first, out, (size_t)N * qrow * sizeof(float));
                    else if (memcmp(first, out, (size_t)N * qrow * sizeof(float)) != 0)
                        fail_msg("attention differs with block size %d, %s, dtype %s",
                                 block_sizes[bi], kvd_isa_name((kvd_isa)isa), kvd_dtype_name(dtypes[d]));
                    /* row by row (decode steps), and in uneven chunks (chunked prefill), as
                     * several queries of one call: bitwise the same */
                    memset(out, 0, (size_t)N * qrow * sizeof(float));
                    kvd_attention_query parts[N];
                    int np = 0;
                    for (int r = 0, len = 1; r < N; r += len, len = len % 7 + 1) {
                        int rows = N - r < len ? N - r : len;
                        parts[np++] = (kvd_attention_query){&table, r, rows, q + (size_t)r * qrow, qrow,
                                                            out + (size_t)r * qrow, qrow};
                    }
                    assert_int_equal(kvd_paged_attention((kvd_isa)isa, pool, layer, &shape, parts, np, 3, &err), 0);
                    if (memcmp(first, out, (size_t)N * qrow * sizeof(float)) != 0)
                        fail_msg("chunked attention differs (block size %d)", block_sizes[bi]);
                }
                kvd_block_table_deinit(pool, &table);
                kvd_kv_pool_destroy(pool);
            }
            /* accuracy against the dense double reference on the rounded K/V */
            double worst = 0;
            for (int i = 0; i < N; i++) {
                for (int h = 0; h < c->heads; h++) {
                    double scale = 0;
                    for (int t = 0; t < c->head_dim; t++)
                        scale = fmax(scale, fabs(ref[((size_t)i * c->heads + h) * c->head_dim + t]));
                    for (int t = 0; t < c->head_dim; t++) {
                        size_t at = ((size_t)i * c->heads + h) * c->head_dim + t;
                        double e = fabs(first[at] - ref[at]) / fmax(scale, 1e-3);
                        worst = e > worst ? e : worst;
                    }
                }
            }
            if (worst > 2e-6)
                fail_msg("attention vs reference: %.3g relative (case %zu, %s)", worst, ci,
                         kvd_dtype_name(dtypes[d]));
            free(kr);
            free(vr);
        }
        free(k);
        free(v);
        free(q);
        free(first);
        free(out);
        free(ref);
    }
}

/* Float pages with 64-value heads fold a tile's query states two at a time
 * (fold_tile_pair in paged_attention.c), pairing whichever states an item holds; one row
 * of one head per query leaves every state alone (fold_tile). The two must give the same
 * bits: a whole prefill (pairs, across rows at the diagonal tiles too, where the two see
 * different key counts) against one query per row, with 1 and 7 query heads per kv
 * head, both builds. */
static void test_attention_pairs_match_single_states(void **state)
{
    (void)state;
    static const attn_case cases[] = {{1, 2, 2, 64}, {1, 2, 14, 64}};
    static const kvd_dtype dtypes[] = {KVD_DTYPE_F32, KVD_DTYPE_F16, KVD_DTYPE_BF16};
    enum { N = 77 };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const attn_case *c = &cases[ci];
        int row = c->kv_heads * c->head_dim, qrow = c->heads * c->head_dim;
        uint64_t s = 300 + ci;
        float *k = malloc((size_t)N * row * sizeof(float));
        float *v = malloc((size_t)N * row * sizeof(float));
        float *q = malloc((size_t)N * qrow * sizeof(float));
        float *whole = malloc((size_t)N * qrow * sizeof(float));
        float *rows = malloc((size_t)N * qrow * sizeof(float));
        fill(k, (size_t)N * row, &s, 2.0f);
        fill(v, (size_t)N * row, &s, 1.0f);
        fill(q, (size_t)N * qrow, &s, 2.0f);
        kvd_attention_shape shape = {c->heads, c->kv_heads, c->head_dim, 1.0f / sqrtf((float)c->head_dim)};
        for (size_t d = 0; d < sizeof dtypes / sizeof dtypes[0]; d++) {
            kvd_block_table table;
            kvd_kv_pool *pool = filled_pool(c, 16, dtypes[d], N, &table, k, v);
            for (int isa = 0; isa <= 1; isa++) {
                if (!kvd_isa_supported((kvd_isa)isa))
                    continue;
                kvd_error err = {0};
                kvd_attention_query all = {&table, 0, N, q, qrow, whole, qrow};
                assert_int_equal(kvd_paged_attention((kvd_isa)isa, pool, 0, &shape, &all, 1, 2, &err), 0);
                kvd_attention_query one[N];
                for (int r = 0; r < N; r++)
                    one[r] = (kvd_attention_query){&table, r, 1, q + (size_t)r * qrow, qrow,
                                                   rows + (size_t)r * qrow, qrow};
                assert_int_equal(kvd_paged_attention((kvd_isa)isa, pool, 0, &shape, one, N, 2, &err), 0);
                if (memcmp(whole, rows, (size_t)N * qrow * sizeof(float)) != 0)
                    fail_msg("paired states differ from single ones (%d heads, %s, %s)", c->heads,
                             kvd_dtype_name(dtypes[d]), kvd_isa_name((kvd_isa)isa));
            }
            kvd_block_table_deinit(pool, &table);
            kvd_kv_pool_destroy(pool);
        }
        free(k);
        free(v);
        free(q);
        free(whole);
        free(rows);
    }
}

/* fp8 pages hold, for every value, the e4m3 code nearest to x / d (ties to even,
 * saturated, never NaN) and the row's f16 scale d = max|x| / 448, byte for byte, in both
 * builds: rows of values spread over every binade, exact ties between two codes, the
 * subnormal range, and rows holding infinities and NaN. */
static void test_fp8_pages_codes(void **state)
{
    (void)state;
    enum { N = 40 };
    float k[N * 64], v[N * 64];
    uint64_t s = 11;
    fill(k, N * 64, &s, 1.0f);
    for (int p = 0; p < N; p++)
        for (int t = 0; t < 64; t++) {
            float *x = &k[p * 64 + t];
            if (p < 16)
                *x *= ldexpf(1.0f, t % 24 - 12); /* every binade, subnormals of e4m3 too */
            else if (p < 24 && t > 0)
                /* x / d lands exactly halfway between two codes (d = 1 with amax 448) */
                *x = (float)((e4m3_value(t % 0x7E) + e4m3_value(t % 0x7E + 1)) / 2.0) * (t & 1 ? 1 : -1);
            else if (p < 24)
                *x = 448.0f;
            v[p * 64 + t] = -k[p * 64 + t];
        }
    k[30 * 64 + 5] = INFINITY;
    k[31 * 64 + 7] = NAN;
    v[32 * 64 + 9] = -INFINITY;
    for (int isa = 0; isa <= 1; isa++) {
        if (!kvd_isa_supported((kvd_isa)isa))
            continue;
        kvd_kv_config cfg = {.num_layers = 1, .num_kv_heads = 1, .head_dim = 64, .block_size = 64,
                             .dtype = KVD_DTYPE_F8, .num_blocks = 2};
        kvd_kv_pool *pool = kvd_kv_pool_create(&cfg, NULL);
        assert_non_null(pool);
        kvd_block_table table;
        kvd_block_table_init(&table);
        assert_int_equal(kvd_block_table_append(pool, &table, N, NULL), 0);
        for (int p = 0; p < N; p++)
            kvd_kv_store((kvd_isa)isa, pool, 0, &table, p, k + p * 64, v + p * 64);
        for (int kv = 0; kv < 2; kv++) {
            const uint8_t *page = kv == 0 ? kvd_kv_block_keys(pool, table.blocks[0], 0)
                                          : kvd_kv_block_values(pool, table.blocks[0], 0);
            const float *x = kv == 0 ? k : v;
            for (int p = 0; p < N; p++) {
                uint16_t bits;
                memcpy(&bits, page + 64 * 64 + 2 * p, sizeof bits);
                float amax = 0;
                for (int t = 0; t < 64; t++)
                    amax = fabsf(x[p * 64 + t]) > amax ? fabsf(x[p * 64 + t]) : amax;
                assert_int_equal(bits, kvd_f32_to_f16(amax / 448.0f));
                float d = kvd_f16_to_f32(bits);
                for (int t = 0; t < 64; t++) {
                    int got = page[p * 64 + t];
                    float y = x[p * 64 + t] / d;
                    if ((got & 0x7F) == 0x7F)
                        fail_msg("fp8 page holds NaN at row %d value %d", p, t);
                    if (isnan(y) || !(d > 0))
                        assert_int_equal(got & 0x7F, 0);
                    else if (got != e4m3_nearest(y))
                        fail_msg("%s, row %d value %d: x / d = %.9g coded 0x%02x, nearest 0x%02x",
                                 kv ? "V" : "K", p, t, y, got, e4m3_nearest(y));
                }
            }
        }
        kvd_block_table_deinit(pool, &table);
        kvd_kv_pool_destroy(pool);
    }
    /* the tie rows really are ties: the row scale is exactly 1 */
    assert_int_equal(kvd_f32_to_f16(448.0f / 448.0f), 0x3C00);
}

/* Copy-on-write of a partly filled shared block carries each dtype's whole rows (int8:
 * the values and their scales): the copy attends exactly as the original. */
static void test_attention_after_copy_on_write(void **state)
{
    (void)state;
    attn_case c = {2, 2, 4, 16};
    enum { N = 6 };
    int row = c.kv_heads * c.head_dim, qrow = c.heads * c.head_dim;
    float k[2 * N * 32], v[2 * N * 32], q[N * 64], a[N * 64], b[N * 64];
    uint64_t s = 5;
    fill(k, sizeof k / sizeof k[0], &s, 2.0f);
    fill(v, sizeof v / sizeof v[0], &s, 1.0f);
    fill(q, sizeof q / sizeof q[0], &s, 2.0f);
    assert_int_equal(row, 32);
    static const kvd_dtype dtypes[] = {KVD_DTYPE_F32, KVD_DTYPE_F16, KVD_DTYPE_BF16, KVD_DTYPE_I8,
                                       KVD_DTYPE_F8};
    for (size_t d = 0; d < sizeof dtypes / sizeof dtypes[0]; d++) {
        kvd_block_table table, copy;
        kvd_kv_pool *pool = filled_pool(&c, 16, dtypes[d], N, &table, k, v);
        kvd_block_table_init(&copy);
        assert_int_equal(kvd_block_table_fork(pool, &table, &copy, NULL), 0);
        assert_int_equal(kvd_block_table_append(pool, &copy, 1, NULL), 0); /* copies the block */
        assert_int_not_equal(copy.blocks[0], table.blocks[0]);
        /* scribble over the original's block: the copy must not read it */
        kvd_attention_shape shape = {c.heads, c.kv_heads, c.head_dim, 0.25f};
        kvd_attention_query qa = {&table, 0, N, q, qrow, a, qrow};
        kvd_attention_query qb = {&copy, 0, N, q, qrow, b, qrow};
        assert_int_equal(kvd_paged_attention(best_isa(), pool, 1, &shape, &qa, 1, 1, NULL), 0);
        for (int layer = 0; layer < c.layers; layer++) {
            memset(kvd_kv_block_keys(pool, table.blocks[0], layer), 0x5a, 16);
            memset(kvd_kv_block_values(pool, table.blocks[0], layer), 0x5a, 16);
        }
        assert_int_equal(kvd_paged_attention(best_isa(), pool, 1, &shape, &qb, 1, 1, NULL), 0);
        if (memcmp(a, b, sizeof a) != 0)
            fail_msg("copy-on-write changed attention for KV %s", kvd_dtype_name(dtypes[d]));
        kvd_block_table_deinit(pool, &copy);
        kvd_block_table_deinit(pool, &table);
        kvd_kv_pool_destroy(pool);
    }
}

/* A query that asks for positions its table has not reserved is refused. */
static void test_paged_attention_rejects(void **state)
{
    (void)state;
    attn_case c = {1, 1, 2, 16};
    float k[8 * 16] = {0}, v[8 * 16] = {0}, q[2 * 2 * 16] = {0}, out[2 * 2 * 16];
    kvd_block_table table;
    kvd_kv_pool *pool = filled_pool(&c, 4, KVD_DTYPE_F16, 8, &table, k, v);
    kvd_attention_shape shape = {2, 1, 16, 0.25f};
    kvd_attention_query bad = {&table, 7, 2, q, 32, out, 32};
    kvd_error err = {0};
    assert_int_equal(kvd_paged_attention(best_isa(), pool, 0, &shape, &bad, 1, 1, &err), KVD_EINVAL);
    assert_non_null(strstr(err.msg, "table holds 8"));
    kvd_attention_shape wrong = {2, 1, 32, 0.25f};
    kvd_attention_query ok = {&table, 0, 2, q, 32, out, 32};
    assert_int_equal(kvd_paged_attention(best_isa(), pool, 0, &wrong, &ok, 1, 1, &err), KVD_EINVAL);
    kvd_block_table_deinit(pool, &table);
    kvd_kv_pool_destroy(pool);
}

/* K/V land in the slot of their position, rounded to nearest even in the pool dtype. */
static void test_kv_store(void **state)
{
    (void)state;
    attn_case c = {2, 2, 2, 20};
    enum { N = 11 };
    uint64_t s = 8;
    static const kvd_dtype dtypes[] = {KVD_DTYPE_F32, KVD_DTYPE_F16, KVD_DTYPE_BF16};
    for (int d = 0; d < 3; d++) {
        float k[2 * N * 40], v[2 * N * 40];
        fill(k, sizeof k / sizeof k[0], &s, 100.0f);
        fill(v, sizeof v / sizeof v[0], &s, 1e-3f);
        kvd_block_table table;
        kvd_kv_pool *pool = filled_pool(&c, 4, dtypes[d], N, &table, k, v);
        for (int layer = 0; layer < 2; layer++)
            for (int p = 0; p < N; p++)
                for (int h = 0; h < 2; h++)
                    for (int t = 0; t < 20; t++) {
                        size_t slot = ((size_t)h * 4 + p % 4) * 20 + t;
                        const void *kb = kvd_kv_block_keys(pool, table.blocks[p / 4], layer);
                        const void *vb = kvd_kv_block_values(pool, table.blocks[p / 4], layer);
                        float kx = k[((size_t)layer * N + p) * 40 + h * 20 + t];
                        float vx = v[((size_t)layer * N + p) * 40 + h * 20 + t];
                        if (dtypes[d] == KVD_DTYPE_F32) {
                            assert_true(((const float *)kb)[slot] == kx);
                            assert_true(((const float *)vb)[slot] == vx);
                        } else if (dtypes[d] == KVD_DTYPE_F16) {
                            assert_int_equal(((const uint16_t *)kb)[slot], kvd_f32_to_f16(kx));
                            assert_int_equal(((const uint16_t *)vb)[slot], kvd_f32_to_f16(vx));
                        } else {
                            assert_int_equal(((const uint16_t *)kb)[slot], kvd_f32_to_bf16(kx));
                            assert_int_equal(((const uint16_t *)vb)[slot], kvd_f32_to_bf16(vx));
                        }
                    }
        kvd_block_table_deinit(pool, &table);
        kvd_kv_pool_destroy(pool);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_accuracy),
        cmocka_unit_test(test_matmul_accumulate),
        cmocka_unit_test(test_matmul_batch_invariance),
        cmocka_unit_test(test_matmul_large_batch_invariance),
        cmocka_unit_test(test_scalar_matches_avx512),
        cmocka_unit_test(test_matmul_words_match_floats),
        cmocka_unit_test(test_bf16_semantics_by_hand),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_swiglu_and_exp),
        cmocka_unit_test(test_matrix_row),
        cmocka_unit_test(test_paged_attention),
        cmocka_unit_test(test_attention_pairs_match_single_states),
        cmocka_unit_test(test_fp8_pages_codes),
        cmocka_unit_test(test_attention_after_copy_on_write),
        cmocka_unit_test(test_paged_attention_rejects),
        cmocka_unit_test(test_kv_store),
    };
    printf("kernels: isa %s\n", kvd_isa_name(kvd_isa_detect()));
    return cmocka_run_group_tests(tests, NULL, NULL);
}
