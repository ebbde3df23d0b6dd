/* qdispatch.c - picks the build of the quantized product for the caller's ISA. */
#include <math.h>

#include "kvd/kvd_quant.h"
#include "quant_internal.h"

bool kvd_quant_vnni_supported(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
    return false;
#endif
}

/* GFNI beside VNNI: the same products with fewer unpacking instructions (same bits). */
static bool gfni_supported(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return kvd_quant_vnni_supported() && __builtin_cpu_supports("gfni");
#else
    return false;
#endif
}

static bool use_vnni(kvd_isa isa);
static bool use_gfni(kvd_isa isa);

void kvd_qmatmul_cols(kvd_isa isa, float *out, int ldo, const float *x, int ldx, int m,
                      const kvd_matrix *w, const float *bias, bool accumulate, int n_begin,
                      int n_end)
{
    if (w->cols > KVD_QUANT_MAX_COLS) {
        /* loaders reject such tensors; a caller that did not gets NaN, not a stack overrun */
        for (int i = 0; i < m; i++)
            for (int j = n_begin; j < n_end; j++)
                out[(size_t)i * ldo + j] = NAN;
        return;
    }
    if (use_gfni(isa))
        kvd_qmatmul_cols_avx512gfni(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
    else if (use_vnni(isa))
        kvd_qmatmul_cols_avx512vnni(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
    else
        kvd_qmatmul_cols_scalar(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
}

/* A kvd_qinput's memory: codes, then scales and sums, each from a 64-byte boundary. */
static void qinput_parts(int rows, int k, size_t *codes, size_t *scales, size_t *sums)
{
    *codes = ((size_t)rows * k + 63) / 64 * 64;
    *scales = ((size_t)rows * (k / 32) * sizeof(float) + 63) / 64 * 64;
    *sums = (size_t)rows * (k / 16) * sizeof(int32_t);
}

size_t kvd_qinput_bytes(int rows, int k)
{
    size_t codes, scales, sums;
    qinput_parts(rows, k, &codes, &scales, &sums);
    return codes + scales + sums;
}

void kvd_qinput_init(kvd_qinput *in, void *mem, int rows, int k)
{
    size_t codes, scales, sums;
    qinput_parts(rows, k, &codes, &scales, &sums);
    *in = (kvd_qinput){(int8_t *)mem, (float *)((char *)mem + codes),
                       (int32_t *)((char *)mem + codes + scales), k, rows};
}

bool kvd_qinput_serves(const kvd_matrix *w_first, const kvd_matrix *w)
{
    return kvd_dtype_is_quantized(w_first->dtype) && kvd_dtype_is_quantized(w->dtype) &&
           w_first->cols == w->cols && w->cols <= KVD_QUANT_MAX_COLS &&
           kvd_qtype_is_k(w_first->dtype) == kvd_qtype_is_k(w->dtype);
}

static bool use_vnni(kvd_isa isa)
{
    return kvd_isa_avx512(isa) && kvd_quant_vnni_supported();
}

static bool use_gfni(kvd_isa isa)
{
    return kvd_isa_avx512(isa) && gfni_supported();
}

void kvd_qinput_quantize(kvd_isa isa, kvd_qinput *in, kvd_dtype dtype, const float *x, int ldx,
                         int r0, int r1)
{
    if (use_gfni(isa))
        kvd_qinput_quantize_avx512gfni(in, dtype, x, ldx, r0, r1, 0, in->k);
    else if (use_vnni(isa))
        kvd_qinput_quantize_avx512vnni(in, dtype, x, ldx, r0, r1, 0, in->k);
    else
        kvd_qinput_quantize_scalar(in, dtype, x, ldx, r0, r1, 0, in->k);
}

void kvd_qinput_quantize_cols(kvd_isa isa, kvd_qinput *in, kvd_dtype dtype, const float *x,
                              int ldx, int r0, int r1, int c0, int c1)
{
    if (kvd_qtype_is_k(dtype) || c0 % 32 != 0 || c1 % 32 != 0 || c0 >= c1 || c1 > in->k)
        return; /* not block-local: callers check kvd_dtype_block_values() == 32 */
    if (use_gfni(isa))
        kvd_qinput_quantize_avx512gfni(in, dtype, x, ldx, r0, r1, c0, c1);
    else if (use_vnni(isa))
        kvd_qinput_quantize_avx512vnni(in, dtype, x, ldx, r0, r1, c0, c1);
    else
        kvd_qinput_quantize_scalar(in, dtype, x, ldx, r0, r1, c0, c1);
}

void kvd_qmatmul_cols_input(kvd_isa isa, float *out, int ldo, const kvd_qinput *x, int m,
                            const kvd_matrix *w, const float *bias, bool accumulate, int n_begin,
                            int n_end)
{
    if (use_gfni(isa))
        kvd_qmatmul_cols_input_avx512gfni(out, ldo, x, m, w, bias, accumulate, n_begin, n_end);
    else if (use_vnni(isa))
        kvd_qmatmul_cols_input_avx512vnni(out, ldo, x, m, w, bias, accumulate, n_begin, n_end);
    else
        kvd_qmatmul_cols_input_scalar(out, ldo, x, m, w, bias, accumulate, n_begin, n_end);
}
