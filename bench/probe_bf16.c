/* probe_bf16.c - how fast this core runs the AVX-512 bf16 dot product (VDPBF16PS)
 * against the float FMA (VFMADD231PS), both on zmm registers.
 *
 * The question behind it: kvd's bf16 products could have been built on VDPBF16PS (32
 * multiply-adds an instruction against the FMA's 16). Whether that pays depends on the
 * core: each instruction is issued into 12 independent accumulator chains, enough to
 * hide either's latency, so the rates printed are issue rates. docs/benchmarks.md
 * quotes them. Usage: probe_bf16 [--iterations N]; prints "not supported" and exits 0
 * on a CPU without AVX512_BF16.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>

#define CHAINS 12

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int has_avx512_bf16(void)
{
    unsigned eax, ebx, ecx, edx;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) &&
           (eax >> 5 & 1u);
}

/* The operands pass through an empty asm each iteration, so nothing is folded; the
 * accumulators stay in registers. Returns the seconds taken; *sink keeps the result. */
__attribute__((target("avx512f,avx512bf16"))) static double run_dpbf16(long n, float *sink)
{
    __m512 acc[CHAINS];
    for (int c = 0; c < CHAINS; c++)
        acc[c] = _mm512_set1_ps((float)c * 1e-3f);
    __m512i x = _mm512_set1_epi32(0x3f803f80), w = _mm512_set1_epi32(0x3c003c00);
    double t0 = now_s();
    for (long i = 0; i < n; i++) {
        __asm__ volatile("" : "+v"(x), "+v"(w));
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; c++)
            acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)x, (__m512bh)w);
    }
    double t = now_s() - t0;
    for (int c = 0; c < CHAINS; c++)
        *sink += _mm512_reduce_add_ps(acc[c]);
    return t;
}

__attribute__((target("avx512f,fma"))) static double run_fma(long n, float *sink)
{
    __m512 acc[CHAINS];
    for (int c = 0; c < CHAINS; c++)
        acc[c] = _mm512_set1_ps((float)c * 1e-3f);
    __m512 x = _mm512_set1_ps(1.0001f), w = _mm512_set1_ps(1e-7f);
    double t0 = now_s();
    for (long i = 0; i < n; i++) {
        __asm__ volatile("" : "+v"(x), "+v"(w));
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; c++)
            acc[c] = _mm512_fmadd_ps(acc[c], x, w);
    }
    double t = now_s() - t0;
    for (int c = 0; c < CHAINS; c++)
        *sink += _mm512_reduce_add_ps(acc[c]);
    return t;
}

int main(int argc, char **argv)
{
    long n = 100000000;
    if (argc == 3 && strcmp(argv[1], "--iterations") == 0)
        n = atol(argv[2]);
    else if (argc != 1) {
        fprintf(stderr, "usage: %s [--iterations N]\n", argv[0]);
        return 2;
    }
    if (!has_avx512_bf16()) {
        printf("probe_bf16: AVX512_BF16 not supported on this CPU\n");
        return 0;
    }
    float sink = 0;
    double dp = run_dpbf16(n, &sink), fma = run_fma(n, &sink);
    double dp_rate = (double)n * CHAINS / dp / 1e9, fma_rate = (double)n * CHAINS / fma / 1e9;
    volatile float keep = sink; /* the results are used, so the loops are not dropped */
    (void)keep;
    printf("one core, zmm, %d independent chains, %ld iterations\n", CHAINS, n);
    printf("VDPBF16PS:   %.2f G instructions/s = %.1f G multiply-adds/s (32 each)\n", dp_rate,
           32 * dp_rate);
    printf("VFMADD231PS: %.2f G instructions/s = %.1f G multiply-adds/s (16 each)\n", fma_rate,
           16 * fma_rate);
    return 0;
}

#else
int main(void)
{
    printf("probe_bf16: x86-64 only\n");
    return 0;
}
#endif
