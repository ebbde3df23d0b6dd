/* kernels.c - run-time ISA selection and the ISA-independent kernel helpers.
 *
 * The vector kernels are built twice (kernels_impl.c and matmul_impl.c with and without
 * AVX-512), the matrix product a third time with AMX tiles; this file, built for the
 * baseline ISA, picks one per call from the kvd_isa the caller holds (the forward pass
 * detects it once at creation). Nothing here keeps state: the CPU checks read CPUID (and
 * what libgcc recorded at start-up); for AMX they also ask Linux for the tile state,
 * which Linux records per process.
 */
#include "kvd/kvd_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <string.h>

#include "kernels_internal.h"
#include "kvd/kvd_error.h"
#include "kvd/kvd_half.h"
#include "kvd/kvd_quant.h"

#if defined(__x86_64__) && defined(__linux__)
#define KVD_ARCH_REQ_XCOMP_PERM 0x1023 /* arch_prctl: ask for a dynamic xstate feature */
#define KVD_XFEATURE_XTILEDATA 18
static bool amx_permitted(void)
{
    return syscall(SYS_arch_prctl, KVD_ARCH_REQ_XCOMP_PERM, KVD_XFEATURE_XTILEDATA) == 0;
}
#else
static bool amx_permitted(void)
{
    return false;
}
#endif

bool kvd_isa_supported(kvd_isa isa)
{
    if (isa == KVD_ISA_SCALAR)
        return true;
#if defined(__x86_64__) || defined(__i386__)
    /* F16C is not asked for: every AVX-512 CPU has it, and clang 14 cannot query it. */
    __builtin_cpu_init();
    bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
    if (isa == KVD_ISA_AVX512 || !avx512)
        return avx512;
    /* AMX-BF16 and AMX-TILE: CPUID leaf 7 EDX bits 22 and 24; AVX512_BF16 (the bf16
     * rounding of x): leaf 7 subleaf 1 EAX bit 5. The kernel hands out the tile state
     * only on request: the first ask (per process) is made here, and refused
     * permission means no AMX. */
    unsigned eax, ebx, ecx, edx, eax1;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx >> 22 & 1u) || !(edx >> 24 & 1u))
        return false;
    if (!__get_cpuid_count(7, 1, &eax1, &ebx, &ecx, &edx) || !(eax1 >> 5 & 1u))
        return false;
    return amx_permitted();
#else
    return false;
#endif
}

kvd_isa kvd_isa_detect(void)
{
    const char *forced = getenv("KVD_ISA");
    if (forced && strcmp(forced, "scalar") == 0)
        return KVD_ISA_SCALAR;
    if (forced && strcmp(forced, "avx512") == 0 && kvd_isa_supported(KVD_ISA_AVX512))
        return KVD_ISA_AVX512;
    for (int isa = KVD_ISA_AVX512_AMX; isa > KVD_ISA_SCALAR; isa--)
        if (kvd_isa_supported((kvd_isa)isa))
            return (kvd_isa)isa;
    return KVD_ISA_SCALAR;
}

const char *kvd_isa_name(kvd_isa isa)
{
    return isa == KVD_ISA_AVX512_AMX ? "avx512amx" : isa == KVD_ISA_AVX512 ? "avx512" : "scalar";
}

void kvd_matmul_cols(kvd_isa isa, float *out, int ldo, const float *x, int ldx, int m,
                     const kvd_matrix *w, const float *bias, bool accumulate, int n_begin,
                     int n_end)
{
    if (kvd_dtype_is_quantized(w->dtype))
        kvd_qmatmul_cols(isa, out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
    else if (isa == KVD_ISA_AVX512_AMX)
        kvd_matmul_cols_avx512amx(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
    else if (isa == KVD_ISA_AVX512)
        kvd_matmul_cols_avx512(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
    else
        kvd_matmul_cols_scalar(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
}

void kvd_matmul(kvd_isa isa, float *out, int ldo, const float *x, int ldx, int m,
                const kvd_matrix *w, const float *bias, bool accumulate, int num_threads)
{
    if (num_threads <= 0)
        num_threads = omp_get_num_procs();
    int panels = kvd_matrix_panels(w->rows);
#pragma omp parallel num_threads(num_threads)
    {
        /* whole panels per thread: a panel split between threads is computed twice */
        int nth = omp_get_num_threads();
        int ith = omp_get_thread_num();
        int begin = (int)((int64_t)panels * ith / nth) * KVD_PANEL_ROWS;
        int end = (int)((int64_t)panels * (ith + 1) / nth) * KVD_PANEL_ROWS;
        kvd_matmul_cols(isa, out, ldo, x, ldx, m, w, bias, accumulate, begin,
                        end < w->rows ? end : w->rows);
    }
}

void kvd_rmsnorm(kvd_isa isa, float *out, const float *x, const float *weight, int n, float eps)
{
    if (isa >= KVD_ISA_AVX512)
        kvd_rmsnorm_avx512(out, x, weight, n, eps);
    else
        kvd_rmsnorm_scalar(out, x, weight, n, eps);
}

void kvd_rope(kvd_isa isa, float *vec, int num_heads, int head_dim, const float *cos_sin)
{
    if (isa >= KVD_ISA_AVX512)
        kvd_rope_avx512(vec, num_heads, head_dim, cos_sin);
    else
        kvd_rope_scalar(vec, num_heads, head_dim, cos_sin);
}

void kvd_rope_inv_freq(float *inv_freq, int head_dim, float theta)
{
    for (int i = 0; i < head_dim / 2; i++)
        inv_freq[i] = 1.0f / powf(theta, (float)(2 * i) / (float)head_dim);
}

void kvd_rope_angles(float *cos_sin, int pos, const float *inv_freq, int head_dim)
{
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        float angle = (float)pos * inv_freq[i];
        cos_sin[i] = cosf(angle);
        cos_sin[half + i] = sinf(angle);
    }
}

void kvd_swiglu(kvd_isa isa, float *gate, const float *up, int n)
{
    if (isa >= KVD_ISA_AVX512)
        kvd_swiglu_avx512(gate, up, n);
    else
        kvd_swiglu_scalar(gate, up, n);
}

void kvd_exp(kvd_isa isa, float *out, const float *x, int n)
{
    if (isa >= KVD_ISA_AVX512)
        kvd_exp_avx512(out, x, n);
    else
        kvd_exp_scalar(out, x, n);
}

int kvd_argmax(const float *x, int n)
{
    if (n <= 0)
        return -1;
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}
