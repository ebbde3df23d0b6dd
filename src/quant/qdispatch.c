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
    if (kvd_isa_avx512(isa) && kvd_quant_vnni_supported())
        kvd_qmatmul_cols_avx512vnni(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
    else
        kvd_qmatmul_cols_scalar(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
}
