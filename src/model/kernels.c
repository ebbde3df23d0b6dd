/* kernels.c - run-time ISA selection and the ISA-independent kernel helpers.
 *
 * The vector kernels are built twice (kernels_impl.c and matmul_impl.c with and without
 * AVX-512), the matrix product also with AMX tiles, with VDPBF16PS and as VDPBF16PS's
 * scalar emulation; this file, built for the baseline ISA, picks one per call from the
 * kvd_isa the caller holds (the forward pass detects it once at creation). Nothing here
 * keeps state: the CPU checks read CPUID (and what libgcc recorded at start-up); for
 * AMX they also ask Linux for the tile state, which Linux records per process; for
 * VDPBF16PS they run one small product both ways.
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

#if defined(__x86_64__) || defined(__i386__)
/* Whether this CPU's VDPBF16PS computes what kvd_kernels.h says (the scalar emulation,
 * measured on Zen 5): one product of 32 columns x 64 inputs (2 blocks) run by both
 * builds must give the same bits. Columns 0-23 take weights and accumulators of
 * ordinary size, on which a different order or rounding of the pair's two adds shows
 * in about one add in ten (bench/probe_bf16 --semantics), so within their 768 adds;
 * columns 24-31 take products and accumulators near FLT_MIN, where the flushing of
 * subnormal sums shows. Call only on a CPU with AVX512_BF16. */
static bool vdpbf16_as_specified(void)
{
    enum { ROWS = KVD_PANEL_ROWS, COLS = 64 };
    uint16_t weights[ROWS * COLS];
    float x[COLS], acc[ROWS], out_hw[ROWS], out_emulated[ROWS];
    uint64_t state = 0x9e3779b97f4a7c15u;
    for (int i = 0; i < ROWS * COLS + COLS + ROWS; i++) {
        state = state * 6364136223846793005u + 1442695040888963407u;
        uint32_t bits = (uint32_t)(state >> 32);
        /* the tiny columns' weights times x of order one are products near FLT_MIN */
        bool tiny = i < ROWS * COLS ? i / COLS >= 24 : i >= ROWS * COLS + COLS + 24;
        /* sign, exponent 2^-8 .. 2^7 (or 2^-126 .. 2^-119 for the tiny ones), mantissa */
        uint32_t exponent = tiny ? 1u + (bits >> 8 & 7u) : 119u + (bits >> 8 & 15u);
        uint32_t f32 = (bits & 0x80000000u) | exponent << 23 | (bits & 0x7fffffu);
        float value;
        memcpy(&value, &f32, sizeof value);
        if (i < ROWS * COLS)
            weights[i] = (uint16_t)(f32 >> 16);
        else if (i < ROWS * COLS + COLS)
            x[i - ROWS * COLS] = value;
        else
            acc[i - ROWS * COLS - COLS] = value;
    }
    _Alignas(64) unsigned char packed[ROWS * COLS * 2];
    kvd_matrix_pack(packed, KVD_DTYPE_BF16, ROWS, COLS, weights, 0, 1);
    kvd_matrix w = {KVD_DTYPE_BF16, ROWS, COLS, packed};
    memcpy(out_hw, acc, sizeof acc);
    memcpy(out_emulated, acc, sizeof acc);
    kvd_matmul_cols_avx512bf16(out_hw, ROWS, x, COLS, 1, &w, NULL, true, 0, ROWS);
    kvd_matmul_cols_scalar_vdpbf16(out_emulated, ROWS, x, COLS, 1, &w, NULL, true, 0, ROWS);
    return memcmp(out_hw, out_emulated, sizeof out_hw) == 0;
}
#endif

bool kvd_isa_supported(kvd_isa isa)
{
    if (isa == KVD_ISA_SCALAR || isa == KVD_ISA_SCALAR_VDPBF16)
        return true;
    if ((int)isa < 0 || isa >= KVD_ISA_COUNT)
        return false;
#if defined(__x86_64__) || defined(__i386__)
    /* F16C is not asked for: every AVX-512 CPU has it, and clang 14 cannot query it. */
    __builtin_cpu_init();
    bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
    if (isa == KVD_ISA_AVX512 || !avx512)
        return avx512;
    /* AVX512_BF16 (VDPBF16PS, and the bf16 rounding of x AMX uses): CPUID leaf 7 subleaf
     * 1 EAX bit 5; AMX-BF16 and AMX-TILE: leaf 7 EDX bits 22 and 24. The kernel hands out
     * the tile state only on request: the first ask (per process) is made here, and
     * refused permission means no AMX. */
    unsigned eax, ebx, ecx, edx, eax1;
    if (!__get_cpuid_count(7, 1, &eax1, &ebx, &ecx, &edx) || !(eax1 >> 5 & 1u))
        return false;
    if (isa == KVD_ISA_AVX512_BF16)
        return vdpbf16_as_specified();
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx >> 22 & 1u) || !(edx >> 24 & 1u))
        return false;
    return amx_permitted();
#else
    return false;
#endif
}

kvd_isa kvd_isa_detect(void)
{
    const char *forced = getenv("KVD_ISA");
    for (int isa = 0; forced && isa < KVD_ISA_COUNT; isa++)
        if (strcmp(forced, kvd_isa_name((kvd_isa)isa)) == 0 && kvd_isa_supported((kvd_isa)isa))
            return (kvd_isa)isa;
    static const kvd_isa best_first[] = {KVD_ISA_AVX512_AMX, KVD_ISA_AVX512_BF16, KVD_ISA_AVX512};
    for (size_t i = 0; i < sizeof best_first / sizeof best_first[0]; i++)
        if (kvd_isa_supported(best_first[i]))
            return best_first[i];
    return KVD_ISA_SCALAR;
}

const char *kvd_isa_name(kvd_isa isa)
{
    switch (isa) {
    case KVD_ISA_AVX512: return "avx512";
    case KVD_ISA_AVX512_AMX: return "avx512amx";
    case KVD_ISA_AVX512_BF16: return "avx512bf16";
    case KVD_ISA_SCALAR_VDPBF16: return "scalar-vdpbf16";
    default: return "scalar";
    }
}

void kvd_matmul_cols(kvd_isa isa, float *out, int ldo, const float *x, int ldx, int m,
                     const kvd_matrix *w, const float *bias, bool accumulate, int n_begin,
                     int n_end)
{
    if (kvd_dtype_is_quantized(w->dtype))
        kvd_qmatmul_cols(isa, out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
    else if (isa == KVD_ISA_AVX512_AMX)
        kvd_matmul_cols_avx512amx(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
    else if (isa == KVD_ISA_AVX512_BF16)
        kvd_matmul_cols_avx512bf16(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
    else if (isa == KVD_ISA_AVX512)
        kvd_matmul_cols_avx512(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
    else if (isa == KVD_ISA_SCALAR_VDPBF16)
        kvd_matmul_cols_scalar_vdpbf16(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
    else
        kvd_matmul_cols_scalar(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end);
}

size_t kvd_bf16_words_stride(int k)
{
    return (size_t)(k + 31) / 32 * 16;
}

bool kvd_matmul_takes_words(kvd_isa isa, const kvd_matrix *w)
{
    return kvd_isa_vdpbf16(isa) && w->dtype == KVD_DTYPE_BF16;
}

void kvd_bf16_round_cols(kvd_isa isa, uint32_t *words, const float *x, int k, int c0, int c1)
{
    if (isa == KVD_ISA_AVX512_BF16)
        kvd_bf16_round_cols_avx512bf16(words, x, k, c0, c1);
    else
        kvd_bf16_round_cols_scalar_vdpbf16(words, x, k, c0, c1);
}

void kvd_matmul_cols_words(kvd_isa isa, float *out, int ldo, const uint32_t *xw, size_t xw_stride,
                           int m, const kvd_matrix *w, const float *bias, bool accumulate,
                           int n_begin, int n_end)
{
    if (isa == KVD_ISA_AVX512_BF16)
        kvd_matmul_cols_words_avx512bf16(out, ldo, xw, xw_stride, m, w, bias, accumulate, n_begin,
                                         n_end);
    else
        kvd_matmul_cols_words_scalar_vdpbf16(out, ldo, xw, xw_stride, m, w, bias, accumulate,
                                             n_begin, n_end);
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
    if (kvd_isa_avx512(isa))
        kvd_rmsnorm_avx512(out, x, weight, n, eps);
    else
        kvd_rmsnorm_scalar(out, x, weight, n, eps);
}

void kvd_rope(kvd_isa isa, float *vec, int num_heads, int head_dim, const float *cos_sin)
{
    if (kvd_isa_avx512(isa))
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
    if (kvd_isa_avx512(isa))
        kvd_swiglu_avx512(gate, up, n);
    else
        kvd_swiglu_scalar(gate, up, n);
}

void kvd_exp(kvd_isa isa, float *out, const float *x, int n)
{
    if (kvd_isa_avx512(isa))
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

float kvd_top_margin(const float *x, int n)
{
    int best = kvd_argmax(x, n);
    float second = -INFINITY;
    for (int i = 0; i < n; i++)
        if (i != best && x[i] > second)
            second = x[i];
    return x[best] - second;
}
