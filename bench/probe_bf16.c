/* probe_bf16.c - how fast this core runs the AVX-512 bf16 dot product (VDPBF16PS)
 * against the float FMA (VFMADD231PS), both on zmm registers.
 *
 * The question behind it: kvd's bf16 products could have been built on VDPBF16PS (32
 * multiply-adds an instruction against the FMA's 16). Whether that pays depends on the
 * core: each instruction is issued into 12 independent accumulator chains, enough to
 * hide either's latency, so the rates printed are issue rates. docs/benchmarks.md
 * quotes them.
 *
 * --semantics: what one VDPBF16PS computes in a lane, bit for bit, against candidate
 * definitions (kvd_kernels.h states the one kvd uses): random operands of ordinary
 * size, operands whose products and sums are near FLT_MIN (subnormal handling), and
 * every combination of special values (zeros, subnormals, FLT_MIN, max, infinities,
 * NaNs) under four MXCSR settings (round to nearest or toward zero, DAZ/FTZ off or
 * on). Prints the mismatches of each candidate; 0 for "odd first, flushed" is what
 * kvd's scalar emulation assumes.
 *
 * Usage: probe_bf16 [--iterations N] [--semantics]; prints "not supported" and exits 0
 * on a CPU without AVX512_BF16.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
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

/* ---- --semantics ---- */

static float from_bits(uint32_t b)
{
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static uint32_t to_bits(float f)
{
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b;
}

static float bf16(uint16_t h)
{
    return from_bits((uint32_t)h << 16);
}

static float flush(float f)
{
    return fabsf(f) < FLT_MIN ? copysignf(0.0f, f) : f;
}

/* The instruction on one lane: acc + the pair (a0, a1) . (b0, b1). */
__attribute__((target("avx512f,avx512bf16"))) static float vdpbf16_lane(float acc, uint16_t a0,
                                                                       uint16_t a1, uint16_t b0,
                                                                       uint16_t b1)
{
    __m512 c = _mm512_set1_ps(acc);
    __m512i a = _mm512_set1_epi32((int)((uint32_t)a0 | (uint32_t)a1 << 16));
    __m512i b = _mm512_set1_epi32((int)((uint32_t)b0 | (uint32_t)b1 << 16));
    __asm__ volatile("" : "+v"(c), "+v"(a), "+v"(b));
    return _mm512_cvtss_f32(_mm512_dpbf16_ps(c, (__m512bh)a, (__m512bh)b));
}

/* The candidates, on flushed (f) or raw operands. */
typedef float (*candidate_fn)(float acc, float a0, float a1, float b0, float b1);
static float odd_first_flushed(float acc, float a0, float a1, float b0, float b1)
{
    float t = flush(fmaf(flush(a1), flush(b1), flush(acc)));
    return flush(fmaf(flush(a0), flush(b0), t));
}
static float even_first_flushed(float acc, float a0, float a1, float b0, float b1)
{
    float t = flush(fmaf(flush(a0), flush(b0), flush(acc)));
    return flush(fmaf(flush(a1), flush(b1), t));
}
static float odd_first_unflushed_middle(float acc, float a0, float a1, float b0, float b1)
{
    float t = fmaf(flush(a1), flush(b1), flush(acc));
    return flush(fmaf(flush(a0), flush(b0), t));
}
static float pair_sum_then_add(float acc, float a0, float a1, float b0, float b1)
{
    return flush(flush(acc) + flush(flush(a0) * flush(b0) + flush(a1) * flush(b1)));
}
static float one_rounding(float acc, float a0, float a1, float b0, float b1)
{
    double exact = (double)flush(acc) + (double)flush(a0) * flush(b0) + (double)flush(a1) * flush(b1);
    return flush((float)exact);
}

static uint64_t probe_rng = 0x2545f4914f6cdd1dull;
static uint32_t rnd32(void)
{
    probe_rng ^= probe_rng << 13;
    probe_rng ^= probe_rng >> 7;
    probe_rng ^= probe_rng << 17;
    return (uint32_t)(probe_rng >> 16);
}

/* A bf16 with a random sign and mantissa and an exponent field in [lo, hi]. */
static uint16_t random_bf16(int lo, int hi)
{
    uint32_t r = rnd32();
    return (uint16_t)((r & 0x8000u) | (uint32_t)(lo + (int)(r % (uint32_t)(hi - lo + 1))) << 7 |
                      (r >> 16 & 0x7fu));
}

static int run_semantics(long n)
{
    static const candidate_fn fns[] = {odd_first_flushed, even_first_flushed,
                                       odd_first_unflushed_middle, pair_sum_then_add, one_rounding};
    static const char *const names[] = {"odd first, flushed (kvd)", "even first, flushed",
                                        "odd first, middle not flushed", "pair summed, then added",
                                        "one rounding"};
    enum { CANDIDATES = 5 };
    /* exponent fields of the operands and of the accumulator: ordinary, then near FLT_MIN */
    static const int ranges[2][4] = {{120, 135, 110, 145}, {30, 70, 0, 3}};
    printf("VDPBF16PS, one lane, bit for bit (NaNs: any NaN matches any NaN)\n");
    for (int g = 0; g < 2; g++) {
        long bad[CANDIDATES] = {0};
        for (long i = 0; i < n; i++) {
            uint16_t a0 = random_bf16(ranges[g][0], ranges[g][1]), a1 = random_bf16(ranges[g][0], ranges[g][1]);
            uint16_t b0 = random_bf16(ranges[g][0], ranges[g][1]), b1 = random_bf16(ranges[g][0], ranges[g][1]);
            uint32_t r = rnd32();
            float acc = from_bits((r & 0x80000000u) |
                                  (uint32_t)(ranges[g][2] + (int)(r % (uint32_t)(ranges[g][3] - ranges[g][2] + 1))) << 23 |
                                  (rnd32() & 0x7fffffu));
            float hw = vdpbf16_lane(acc, a0, a1, b0, b1);
            for (int c = 0; c < CANDIDATES; c++) {
                float e = fns[c](acc, bf16(a0), bf16(a1), bf16(b0), bf16(b1));
                bad[c] += to_bits(e) != to_bits(hw) && !(isnan(e) && isnan(hw));
            }
        }
        printf("%s operands, %ld random cases:\n", g == 0 ? "ordinary" : "near-FLT_MIN", n);
        for (int c = 0; c < CANDIDATES; c++)
            printf("  %-32s %ld mismatches\n", names[c], bad[c]);
    }
    static const uint16_t special[] = {0x0000, 0x8000, 0x0001, 0x8001, 0x007f, 0x0080, 0x8080, 0x3f80,
                                       0xbf80, 0x7f7f, 0xff7f, 0x7f80, 0xff80, 0x7fc0, 0x7fa0, 0xffc1,
                                       0x4000, 0x1f80, 0x2080, 0x5f80};
    const float accs[] = {0.0f, -0.0f, 1.0f, -1.0f, FLT_MIN, -FLT_MIN, 1e-40f, -1e-40f, FLT_MAX,
                          -FLT_MAX, INFINITY, -INFINITY, NAN, 3.0e38f, 1e-30f};
    static const unsigned csrs[] = {0x1f80, 0x7f80, 0x9fc0, 0xff80};
    enum { NS = sizeof special / sizeof special[0], NA = sizeof accs / sizeof accs[0] };
    unsigned saved = _mm_getcsr();
    for (size_t m = 0; m < sizeof csrs / sizeof csrs[0]; m++) {
        long bad = 0, total = 0;
        for (int ia = 0; ia < NA; ia++)
            for (int i = 0; i < NS * NS * NS * NS; i++) {
                uint16_t a0 = special[i % NS], a1 = special[i / NS % NS];
                uint16_t b0 = special[i / (NS * NS) % NS], b1 = special[i / (NS * NS * NS)];
                _mm_setcsr(csrs[m]);
                float hw = vdpbf16_lane(accs[ia], a0, a1, b0, b1);
                _mm_setcsr(saved);
                float e = odd_first_flushed(accs[ia], bf16(a0), bf16(a1), bf16(b0), bf16(b1));
                bad += to_bits(e) != to_bits(hw) && !(isnan(e) && isnan(hw));
                total++;
            }
        printf("special values, MXCSR %#x: %ld of %ld differ from \"odd first, flushed\"\n",
               csrs[m], bad, total);
    }
    return 0;
}

int main(int argc, char **argv)
{
    long n = 100000000;
    int semantics = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--iterations") == 0 && i + 1 < argc)
            n = atol(argv[++i]);
        else if (strcmp(argv[i], "--semantics") == 0)
            semantics = 1;
        else {
            fprintf(stderr, "usage: %s [--iterations N] [--semantics]\n", argv[0]);
            return 2;
        }
    }
    if (!has_avx512_bf16()) {
        printf("probe_bf16: AVX512_BF16 not supported on this CPU\n");
        return 0;
    }
    if (semantics)
        return run_semantics(n < 1000000 ? n : 1000000);
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
