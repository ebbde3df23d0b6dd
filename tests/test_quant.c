/* test_quant.c - quantized weights in kvd's own terms: codecs' contracts, the packed
 * layout, and the products' determinism (scalar == AVX-512 VNNI bit for bit, the same
 * bits whatever the batch, the column range or the threads). Agreement with llama.cpp
 * and with the numpy oracle is test_quant_golden.py's. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <math.h>

#include "kvd/kvd_kernels.h"
#include "kvd/kvd_quant.h"
#include "quant_internal.h" /* the per-ISA builds, called one by one */

static const kvd_dtype qtypes[] = {KVD_DTYPE_Q8_0, KVD_DTYPE_Q4_0, KVD_DTYPE_Q5_0, KVD_DTYPE_Q4_K,
                                   KVD_DTYPE_Q5_K, KVD_DTYPE_Q6_K, KVD_DTYPE_Q8_K};
#define NTYPES (int)(sizeof qtypes / sizeof qtypes[0])

static float rnd(uint64_t *s)
{
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((*s >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
}

typedef struct qmatrix {
    kvd_matrix m;
    float *values; /* dequantized, rows x cols */
    void *raw;
} qmatrix;

static qmatrix make_qmatrix(kvd_dtype dtype, int rows, int cols, uint64_t *s)
{
    qmatrix q;
    float *src = malloc((size_t)rows * cols * sizeof(float));
    for (int i = 0; i < rows * cols; i++)
        src[i] = rnd(s) * (i % 37 == 0 ? 4.0f : 1.0f);
    size_t row_bytes = kvd_dtype_row_bytes(dtype, cols);
    q.raw = malloc(row_bytes * rows);
    q.values = malloc((size_t)rows * cols * sizeof(float));
    for (int r = 0; r < rows; r++) {
        assert_int_equal(kvd_quantize_row(dtype, src + (size_t)r * cols,
                                          (uint8_t *)q.raw + r * row_bytes, cols), 0);
        assert_int_equal(kvd_dequantize_row(dtype, (uint8_t *)q.raw + r * row_bytes,
                                            q.values + (size_t)r * cols, cols), 0);
    }
    void *packed = aligned_alloc(64, kvd_matrix_packed_bytes(dtype, rows, cols));
    kvd_matrix_pack(packed, dtype, rows, cols, q.raw, 0, kvd_matrix_panels(rows));
    q.m = (kvd_matrix){.dtype = dtype, .rows = rows, .cols = cols, .data = packed};
    free(src);
    return q;
}

static void free_qmatrix(qmatrix *q)
{
    free((void *)q->m.data);
    free(q->values);
    free(q->raw);
}

static int cols_for(kvd_dtype dtype)
{
    return kvd_dtype_block_values(dtype) == 256 ? 768 : 160;
}

static void test_codec_contract(void **state)
{
    (void)state;
    float x[256], y[256];
    uint8_t buf[512];
    uint64_t s = 1;
    for (int i = 0; i < 256; i++)
        x[i] = rnd(&s);
    assert_int_equal(kvd_quantize_row(KVD_DTYPE_Q8_0, x, buf, 33), KVD_EINVAL);
    assert_int_equal(kvd_quantize_row(KVD_DTYPE_Q4_K, x, buf, 32), KVD_EINVAL);
    assert_int_equal(kvd_quantize_row(KVD_DTYPE_BF16, x, buf, 32), KVD_EUNSUPPORTED);
    assert_int_equal(kvd_dequantize_row(KVD_DTYPE_Q6_K, buf, y, 100), KVD_EINVAL);
    /* float types pass through */
    uint16_t h[2] = {0x3f80, 0xc000};
    assert_int_equal(kvd_dequantize_row(KVD_DTYPE_BF16, h, y, 2), 0);
    assert_true(y[0] == 1.0f && y[1] == -2.0f);
    /* per type: a round trip's error stays within the format's step */
    static const float max_rel[] = {0.01f, 0.15f, 0.07f, 0.15f, 0.07f, 0.04f, 0.01f};
    for (int t = 0; t < NTYPES; t++) {
        assert_int_equal(kvd_quantize_row(qtypes[t], x, buf, 256), 0);
        assert_int_equal(kvd_dequantize_row(qtypes[t], buf, y, 256), 0);
        for (int i = 0; i < 256; i++)
            if (fabsf(y[i] - x[i]) > max_rel[t])
                fail_msg("%s: x[%d] %g -> %g", kvd_dtype_name(qtypes[t]), i, x[i], y[i]);
        /* zeros stay zeros */
        float z[256] = {0};
        assert_int_equal(kvd_quantize_row(qtypes[t], z, buf, 256), 0);
        assert_int_equal(kvd_dequantize_row(qtypes[t], buf, y, 256), 0);
        for (int i = 0; i < 256; i++)
            assert_true(y[i] == 0.0f);
    }
}

static void test_matrix_row(void **state)
{
    (void)state;
    uint64_t s = 5;
    for (int t = 0; t < NTYPES; t++) {
        int cols = cols_for(qtypes[t]);
        qmatrix q = make_qmatrix(qtypes[t], 45, cols, &s);
        float *row = malloc(cols * sizeof(float));
        for (int r = 0; r < 45; r++) {
            kvd_matrix_row(row, &q.m, r);
            assert_memory_equal(row, q.values + (size_t)r * cols, cols * sizeof(float));
        }
        free(row);
        free_qmatrix(&q);
    }
}

/* The product of every type: close to the float product of the dequantized weights,
 * the same bits in both builds, for any m, column range and thread count. */
static void test_products_deterministic(void **state)
{
    (void)state;
    bool vnni = kvd_quant_vnni_supported();
    if (!vnni)
        print_message("no AVX512_VNNI on this CPU: the scalar build only\n");
    uint64_t s = 9;
    const int rows = 77, m = 16;
    for (int t = 0; t < NTYPES; t++) {
        kvd_dtype dtype = qtypes[t];
        int cols = cols_for(dtype);
        qmatrix q = make_qmatrix(dtype, rows, cols, &s);
        float *x = malloc((size_t)m * cols * sizeof(float));
        float bias[77];
        for (int i = 0; i < m * cols; i++)
            x[i] = rnd(&s) * (i % 53 == 0 ? 20.0f : 1.0f);
        for (int j = 0; j < rows; j++)
            bias[j] = rnd(&s);
        /* row 0: rounding ties (with amax 127 the Q8_0 scale is 1, so k + 0.5 is a tie),
         * and the largest magnitude twice with both signs (the first one's sign sets the
         * Q8_K scale); row 1: all zero */
        for (int k = 0; k < cols; k++)
            x[k] = k % 32 == 0 ? -127.0f : k % 32 == 1 ? 127.0f : (float)(k % 7) - 3.5f;
        memset(x + cols, 0, cols * sizeof(float));
        size_t out_bytes = (size_t)m * rows * sizeof(float);
        float *ref = malloc(out_bytes), *got = malloc(out_bytes), *one = malloc(rows * sizeof(float));
        kvd_matmul(KVD_ISA_SCALAR, ref, rows, x, cols, m, &q.m, bias, false, 1);
        /* accuracy against the dequantized weights in double */
        for (int i = 0; i < m; i++) {
            for (int j = 0; j < rows; j++) {
                double exact = bias[j], mag = fabs(bias[j]);
                for (int k = 0; k < cols; k++) {
                    exact += (double)x[i * cols + k] * q.values[(size_t)j * cols + k];
                    mag += fabs((double)x[i * cols + k] * q.values[(size_t)j * cols + k]);
                }
                /* activations quantized to 8 bits: error a few 1/127 steps of the terms */
                if (fabs(ref[i * rows + j] - exact) > 0.02 * mag)
                    fail_msg("%s [%d][%d]: %g vs %g (mag %g)", kvd_dtype_name(dtype), i, j,
                             ref[i * rows + j], exact, mag);
            }
        }
        /* the VNNI build, two threads */
        if (vnni) {
            kvd_matmul(KVD_ISA_AVX512, got, rows, x, cols, m, &q.m, bias, false, 2);
            if (memcmp(ref, got, out_bytes) != 0)
                fail_msg("%s: scalar and avx512 differ", kvd_dtype_name(dtype));
        }
        for (int isa = KVD_ISA_SCALAR; isa <= (vnni ? KVD_ISA_AVX512 : KVD_ISA_SCALAR); isa++) {
            /* one row at a time: the same bits as in the batch of 16 */
            for (int i = 0; i < m; i++) {
                kvd_matmul_cols((kvd_isa)isa, one, rows, x + (size_t)i * cols, cols, 1, &q.m, bias,
                                false, 0, rows);
                if (memcmp(one, ref + (size_t)i * rows, rows * sizeof(float)) != 0)
                    fail_msg("%s isa %d: row %d alone differs from the batch", kvd_dtype_name(dtype),
                             isa, i);
            }
            /* three rows (the K types' two-group shape) */
            kvd_matmul_cols((kvd_isa)isa, got, rows, x + 5 * cols, cols, 3, &q.m, bias, false, 0, rows);
            if (memcmp(got, ref + 5 * rows, 3 * rows * sizeof(float)) != 0)
                fail_msg("%s isa %d: rows 5-7 as a batch of 3 differ", kvd_dtype_name(dtype), isa);
            /* odd column ranges, accumulate on top of what out holds */
            memset(got, 0, out_bytes);
            for (int a = 0; a < rows;) {
                int b = a + 1 + (int)((rnd(&s) + 1.0f) * 20);
                b = b > rows ? rows : b;
                kvd_matmul_cols((kvd_isa)isa, got, rows, x, cols, m, &q.m, bias, true, a, b);
                a = b;
            }
            if (memcmp(ref, got, out_bytes) != 0)
                fail_msg("%s isa %d: column ranges change the result", kvd_dtype_name(dtype), isa);
        }
        free(x);
        free(ref);
        free(got);
        free(one);
        free_qmatrix(&q);
    }
}

/* The AVX-512 builds one by one against the scalar one: VNNI alone and VNNI with GFNI
 * (whose unpacking of 4-6-bit codes differs; the dispatcher shows only the best one a CPU
 * has), for the decode shapes (1-4 rows: one and two sum chains, four groups at a time)
 * and a batch, from float rows and from a kvd_qinput, on whole and odd column ranges. */
static void test_builds_agree(void **state)
{
    (void)state;
    bool vnni = kvd_quant_vnni_supported();
    __builtin_cpu_init();
    bool gfni = vnni && __builtin_cpu_supports("gfni");
    if (!vnni)
        skip();
    if (!gfni)
        print_message("no GFNI on this CPU: the VNNI build only\n");
    uint64_t s = 21;
    const int rows = 141, ms[] = {1, 2, 3, 4, 7};
    for (int t = 0; t < NTYPES; t++) {
        kvd_dtype dtype = qtypes[t];
        int cols = kvd_dtype_block_values(dtype) == 256 ? 1024 : 320;
        qmatrix q = make_qmatrix(dtype, rows, cols, &s);
        float *x = malloc((size_t)7 * cols * sizeof(float));
        float bias[141];
        for (int i = 0; i < 7 * cols; i++)
            x[i] = rnd(&s) * (i % 29 == 0 ? 9.0f : 1.0f);
        for (int j = 0; j < rows; j++)
            bias[j] = rnd(&s);
        size_t out_bytes = (size_t)7 * rows * sizeof(float);
        float *ref = malloc(out_bytes), *got = malloc(out_bytes);
        void *mem = aligned_alloc(64, (kvd_qinput_bytes(7, cols) + 63) / 64 * 64);
        kvd_qinput in;
        kvd_qinput_init(&in, mem, 7, cols);
        for (size_t mi = 0; mi < sizeof ms / sizeof ms[0]; mi++) {
            int m = ms[mi];
            for (int range = 0; range < 2; range++) {
                int a = range ? 19 : 0, b = range ? 117 : rows;
                memset(ref, 0, out_bytes);
                kvd_qmatmul_cols_scalar(ref, rows, x, cols, m, &q.m, bias, false, a, b);
                for (int build = 0; build < (gfni ? 2 : 1); build++) {
                    memset(got, 0, out_bytes);
                    if (build)
                        kvd_qmatmul_cols_avx512gfni(got, rows, x, cols, m, &q.m, bias, false, a, b);
                    else
                        kvd_qmatmul_cols_avx512vnni(got, rows, x, cols, m, &q.m, bias, false, a, b);
                    if (memcmp(ref, got, out_bytes) != 0)
                        fail_msg("%s, %d rows, columns %d-%d: the %s build differs from the "
                                 "scalar one", kvd_dtype_name(dtype), m, a, b, build ? "gfni" : "vnni");
                    memset(got, 0, out_bytes);
                    if (build) {
                        kvd_qinput_quantize_avx512gfni(&in, dtype, x, cols, 0, m, 0, cols);
                        kvd_qmatmul_cols_input_avx512gfni(got, rows, &in, m, &q.m, bias, false, a, b);
                    } else {
                        kvd_qinput_quantize_avx512vnni(&in, dtype, x, cols, 0, m, 0, cols);
                        kvd_qmatmul_cols_input_avx512vnni(got, rows, &in, m, &q.m, bias, false, a, b);
                    }
                    if (memcmp(ref, got, out_bytes) != 0)
                        fail_msg("%s, %d rows, columns %d-%d: the %s build from a kvd_qinput "
                                 "differs from the scalar one", kvd_dtype_name(dtype), m, a, b,
                                 build ? "gfni" : "vnni");
                }
            }
        }
        free(mem);
        free(x);
        free(ref);
        free(got);
        free_qmatrix(&q);
    }
}

/* n random values, every `every`-th one `big` times larger (outliers set Q8 scales). */
static float *random_values(uint64_t *s, size_t n, size_t every, float big)
{
    float *v = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        v[i] = rnd(s) * (i % every == 0 ? big : 1.0f);
    return v;
}

/* The rows x of a batch quantized once (kvd_qinput) give ref (m x rows) bit for bit. */
static void check_pre_quantized(const qmatrix *q, const float *x, int m, const float *bias,
                                const float *ref, float *got, void *in_mem)
{
    kvd_qinput in;
    int rows = q->m.rows, cols = q->m.cols;
    kvd_qinput_init(&in, in_mem, m, cols);
    kvd_qinput_quantize(KVD_ISA_AVX512, &in, q->m.dtype, x, cols, 0, m);
    memset(got, 0, (size_t)m * rows * sizeof(float));
    kvd_qmatmul_cols_input(KVD_ISA_AVX512, got, rows, &in, m, &q->m, bias, false, 0, rows);
    if (memcmp(ref, got, (size_t)m * rows * sizeof(float)) != 0)
        fail_msg("%s: pre-quantized input differs", kvd_dtype_name(q->m.dtype));
}

/* Batched products over long rows (m > 4, k = 8192): the VNNI build cuts k into slices
 * whose partial sums wait in out and runs the rows in passes (qmatmul_impl.c); neither may
 * change a bit. Against the scalar build, rows one at a time (the decode path, all of k at
 * once), a sub-batch, and the pre-quantized input (kvd_qmatmul_cols_input). */
static void test_sliced_passes_same_bits(void **state)
{
    (void)state;
    if (!kvd_quant_vnni_supported()) {
        print_message("no AVX512_VNNI on this CPU: skipped\n");
        return;
    }
    uint64_t s = 21;
    const int rows = 48, cols = 8192, m = 150;
    float *x = random_values(&s, (size_t)m * cols, 61, 10.0f);
    float *bias = random_values(&s, rows, rows, 1.0f);
    size_t out_bytes = (size_t)m * rows * sizeof(float);
    float *ref = malloc(out_bytes), *got = malloc(out_bytes);
    size_t in_bytes = (kvd_qinput_bytes(m, cols) + 63) & ~(size_t)63;
    void *in_mem = aligned_alloc(64, in_bytes);
    for (int t = 0; t < NTYPES; t++) {
        kvd_dtype dtype = qtypes[t];
        qmatrix q = make_qmatrix(dtype, rows, cols, &s);
        kvd_matmul(KVD_ISA_SCALAR, ref, rows, x, cols, m, &q.m, bias, false, 1);
        kvd_matmul(KVD_ISA_AVX512, got, rows, x, cols, m, &q.m, bias, false, 2);
        if (memcmp(ref, got, out_bytes) != 0)
            fail_msg("%s: batch of %d, k %d: scalar and avx512 differ", kvd_dtype_name(dtype), m, cols);
        for (int i = 0; i < m; i += 37) {
            kvd_matmul_cols(KVD_ISA_AVX512, got, rows, x + (size_t)i * cols, cols, 1, &q.m, bias,
                            false, 0, rows);
            if (memcmp(got, ref + (size_t)i * rows, rows * sizeof(float)) != 0)
                fail_msg("%s: row %d alone differs from the batch", kvd_dtype_name(dtype), i);
        }
        kvd_matmul_cols(KVD_ISA_AVX512, got, rows, x + 7 * (size_t)cols, cols, 23, &q.m, bias,
                        false, 16, rows);
        for (int i = 0; i < 23; i++)
            if (memcmp(got + (size_t)i * rows + 16, ref + (size_t)(7 + i) * rows + 16,
                       (rows - 16) * sizeof(float)) != 0)
                fail_msg("%s: rows 7-29, columns 16-47 differ", kvd_dtype_name(dtype));
        check_pre_quantized(&q, x, m, bias, ref, got, in_mem);
        free_qmatrix(&q);
    }
    free(in_mem);
    free(x);
    free(bias);
    free(ref);
    free(got);
}

/* Batched decodes (5..16 rows) run each group pair in slices of k whose partial sums wait
 * in out, prefetching the next slice (qmatmul_impl.c, few_rows_product): against the
 * scalar build for every row count, then rows one at a time, odd column ranges
 * accumulated on top of out, and the pre-quantized input (k = 896: slices of 8 blocks
 * and a shorter last one; the K types, which keep the older blocking, at k = 1024). */
static void test_few_rows_same_bits(void **state)
{
    (void)state;
    if (!kvd_quant_vnni_supported()) {
        print_message("no AVX512_VNNI on this CPU: skipped\n");
        return;
    }
    uint64_t s = 33;
    const int rows = 100, max_m = 16, max_cols = 1024;
    float *x = random_values(&s, (size_t)max_m * max_cols, 59, 12.0f);
    float *bias = random_values(&s, rows, rows, 1.0f);
    size_t out_bytes = (size_t)max_m * rows * sizeof(float);
    float *ref = malloc(out_bytes), *got = malloc(out_bytes);
    size_t in_bytes = (kvd_qinput_bytes(max_m, max_cols) + 63) & ~(size_t)63;
    void *in_mem = aligned_alloc(64, in_bytes);
    for (int t = 0; t < NTYPES; t++) {
        kvd_dtype dtype = qtypes[t];
        /* the K types' rows are whole 256-input blocks */
        int cols = kvd_dtype_block_values(dtype) == 256 ? max_cols : 896;
        qmatrix q = make_qmatrix(dtype, rows, cols, &s);
        kvd_matmul(KVD_ISA_SCALAR, ref, rows, x, cols, max_m, &q.m, bias, false, 1);
        for (int m = 5; m <= max_m; m++) {
            memset(got, 0, out_bytes);
            kvd_matmul(KVD_ISA_AVX512, got, rows, x, cols, m, &q.m, bias, false, 2);
            if (memcmp(ref, got, (size_t)m * rows * sizeof(float)) != 0)
                fail_msg("%s: batch of %d: scalar and avx512 differ", kvd_dtype_name(dtype), m);
        }
        for (int i = 0; i < max_m; i++) {
            kvd_matmul_cols(KVD_ISA_AVX512, got, rows, x + (size_t)i * cols, cols, 1, &q.m, bias,
                            false, 0, rows);
            if (memcmp(got, ref + (size_t)i * rows, rows * sizeof(float)) != 0)
                fail_msg("%s: row %d alone differs from the batch", kvd_dtype_name(dtype), i);
        }
        memset(got, 0, out_bytes);
        for (int a = 0; a < rows;) {
            int b = a + 1 + (int)((rnd(&s) + 1.0f) * 24);
            b = b > rows ? rows : b;
            kvd_matmul_cols(KVD_ISA_AVX512, got, rows, x, cols, max_m, &q.m, bias, true, a, b);
            a = b;
        }
        if (memcmp(ref, got, out_bytes) != 0)
            fail_msg("%s: column ranges change the result", kvd_dtype_name(dtype));
        check_pre_quantized(&q, x, max_m, bias, ref, got, in_mem);
        free_qmatrix(&q);
    }
    free(in_mem);
    free(x);
    free(bias);
    free(ref);
    free(got);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_codec_contract),
        cmocka_unit_test(test_matrix_row),
        cmocka_unit_test(test_products_deterministic),
        cmocka_unit_test(test_builds_agree),
        cmocka_unit_test(test_sliced_passes_same_bits),
        cmocka_unit_test(test_few_rows_same_bits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
