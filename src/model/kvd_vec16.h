/* kvd_vec16.h - the 16-lane float vector the compute kernels are written against.
 *
 * The kernels (kernels_impl.c, matmul_impl.c, paged_attention.c) are compiled twice:
 * once with KVD_VEC_AVX512 (AVX-512 F/BW/VL + FMA + F16C intrinsics) and once with
 * KVD_VEC_SCALAR (a plain struct of 16 floats, built for the baseline ISA);
 * matmul_impl.c also with KVD_VEC_AVX512 and KVD_VEC_AMX (AMX tiles), and with
 * KVD_VEC_DPBF16 for both ISAs (VDPBF16PS, and its scalar emulation). Every
 * operation here is defined lane by lane with IEEE single precision and explicit
 * fused multiply-adds, and the horizontal reductions use one fixed pairwise tree,
 * so both builds compute bit-identical results: the scalar build is the portable
 * fallback and, in tests, the witness that the AVX-512 code computes what it says.
 * Private to the compute module.
 */
#ifndef KVD_VEC16_H
#define KVD_VEC16_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kvd/kvd_half.h"

#if defined(KVD_VEC_AVX512) && defined(KVD_VEC_AMX)
/* AVX-512 with AMX tiles (and AVX512_BF16): the product kernel only */
#include <immintrin.h>
#define KVD_VEC_FN(name) name##_avx512amx
#elif defined(KVD_VEC_AVX512) && defined(KVD_VEC_DPBF16)
/* AVX-512 with AVX512_BF16: the product kernel only, bf16 products on VDPBF16PS */
#include <immintrin.h>
#define KVD_VEC_FN(name) name##_avx512bf16
#elif defined(KVD_VEC_AVX512)
#include <immintrin.h>
#define KVD_VEC_FN(name) name##_avx512
#elif defined(KVD_VEC_SCALAR) && defined(KVD_VEC_STANDIN_AVX512AMX)
#define KVD_VEC_FN(name) name##_avx512amx
#elif defined(KVD_VEC_SCALAR) && defined(KVD_VEC_STANDIN_AVX512BF16)
#define KVD_VEC_FN(name) name##_avx512bf16
#elif defined(KVD_VEC_SCALAR) && defined(KVD_VEC_DPBF16)
/* the scalar emulation of VDPBF16PS's products (tests, and KVD_ISA=scalar-vdpbf16) */
#define KVD_VEC_FN(name) name##_scalar_vdpbf16
#elif defined(KVD_VEC_SCALAR) && defined(KVD_VEC_STANDIN_AVX512)
/* Not x86: the _avx512 entry points exist for the dispatcher to link, built from the
 * scalar code (never called: kvd_isa_supported() says no). */
#define KVD_VEC_FN(name) name##_avx512
#elif defined(KVD_VEC_SCALAR)
#define KVD_VEC_FN(name) name##_scalar
#else
#error "define KVD_VEC_AVX512 or KVD_VEC_SCALAR"
#endif

#define V16_INLINE static inline __attribute__((always_inline))

#if defined(KVD_VEC_AVX512)

typedef __m512 v16;

V16_INLINE v16 v16_zero(void) { return _mm512_setzero_ps(); }
V16_INLINE v16 v16_set1(float a) { return _mm512_set1_ps(a); }
V16_INLINE v16 v16_load(const float *p) { return _mm512_loadu_ps(p); }
V16_INLINE v16 v16_load_n(const float *p, int n)
{
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
}
/* The first n of p, the other lanes set to fill. */
V16_INLINE v16 v16_load_n_or(const float *p, int n, float fill)
{
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), (__mmask16)((1u << n) - 1u), p);
}
V16_INLINE void v16_store(float *p, v16 a) { _mm512_storeu_ps(p, a); }
V16_INLINE void v16_store_n(float *p, v16 a, int n)
{
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), a);
}
/* Lanes whose bit is set in mask; the others read as 0 / are left alone, and never
 * fault, so p may point past the end of the array for masked-off lanes. */
V16_INLINE v16 v16_load_mask(const float *p, uint32_t mask)
{
    return _mm512_maskz_loadu_ps((__mmask16)mask, p);
}
V16_INLINE void v16_store_mask(float *p, v16 a, uint32_t mask)
{
    _mm512_mask_storeu_ps(p, (__mmask16)mask, a);
}
V16_INLINE v16 v16_from_bf16_bits(__m256i h)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
V16_INLINE v16 v16_load_bf16(const uint16_t *p)
{
    return v16_from_bf16_bits(_mm256_loadu_si256((const __m256i *)p));
}
V16_INLINE v16 v16_load_bf16_n(const uint16_t *p, int n)
{
    return v16_from_bf16_bits(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1u), p));
}
V16_INLINE v16 v16_load_f16(const uint16_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
V16_INLINE v16 v16_load_f16_n(const uint16_t *p, int n)
{
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1u), p));
}
/* Round to nearest even, NaN kept quiet: the same integer recipe as kvd_f32_to_bf16. */
V16_INLINE __m256i v16_to_bf16_bits(v16 a)
{
    __m512i bits = _mm512_castps_si512(a);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    __m512i out = _mm512_mask_mov_epi32(_mm512_srli_epi32(rounded, 16), nan, quiet);
    return _mm512_cvtepi32_epi16(out);
}
V16_INLINE void v16_store_bf16_n(uint16_t *p, v16 a, int n)
{
    _mm256_mask_storeu_epi16(p, (__mmask16)((1u << n) - 1u), v16_to_bf16_bits(a));
}
V16_INLINE void v16_store_f16_n(uint16_t *p, v16 a, int n)
{
    __m256i h = _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(p, (__mmask16)((1u << n) - 1u), h);
}
/* 16 (or the first n, rest zero) int8 widened to float (exact). */
V16_INLINE v16 v16_load_i8_n(const int8_t *p, int n)
{
    __m128i b = _mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1u), p);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
V16_INLINE v16 v16_fma(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
V16_INLINE v16 v16_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
V16_INLINE v16 v16_sub(v16 a, v16 b) { return _mm512_sub_ps(a, b); }
V16_INLINE v16 v16_mul(v16 a, v16 b) { return _mm512_mul_ps(a, b); }
V16_INLINE v16 v16_div(v16 a, v16 b) { return _mm512_div_ps(a, b); }
V16_INLINE v16 v16_max(v16 a, v16 b) { return _mm512_max_ps(a, b); }
V16_INLINE v16 v16_min(v16 a, v16 b) { return _mm512_min_ps(a, b); }
V16_INLINE v16 v16_round(v16 a)
{
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* a * 2^n for integral n in [-126, 127]. */
V16_INLINE v16 v16_scale_pow2(v16 a, v16 n)
{
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(a, _mm512_castsi512_ps(e));
}
/* Lanes i and i+8, then i and i+4, i+2, i+1: the tree every reduction uses. */
V16_INLINE float v16_hsum(v16 a)
{
    __m256 lo = _mm512_castps512_ps256(a);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
    __m256 h8 = _mm256_add_ps(lo, hi);
    __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    __m128 h1 = _mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1));
    return _mm_cvtss_f32(h1);
}
/* v16_hsum of a, b, c and d, the same additions in the same tree, four at a time: each
 * stage adds the halves of two vectors packed in one register; the sums end in lanes 0,
 * 4, 8 and 12. */
V16_INLINE v16 v16_hsum4_tree(v16 a, v16 b, v16 c, v16 d)
{
    /* (i, i+8): a's in lanes 0-7, b's in 8-15 */
    v16 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    v16 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
    /* (i, i+4): one 128-bit lane each for a, b, c, d */
    v16 h4 = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
    /* (i, i+2), then (0, 1) within each 128-bit lane */
    v16 h2 = _mm512_add_ps(h4, _mm512_permute_ps(h4, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm512_add_ps(h2, _mm512_permute_ps(h2, _MM_SHUFFLE(2, 3, 0, 1)));
}
/* v16_hsum of a, b, c and d into out[0..3]. */
V16_INLINE void v16_hsum4(v16 a, v16 b, v16 c, v16 d, float *out)
{
    v16 h1 = v16_hsum4_tree(a, b, c, d);
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, h1)));
}
/* v16_hsum of a, b, c and d (v16_hsum4's additions) into lanes 4q .. 4q+3 of into, the
 * other lanes kept: sums of 16 vectors gathered in a register, with no trip through
 * memory (narrow stores read back as a vector wait for the stores to retire). */
V16_INLINE v16 v16_hsum4_lanes(v16 into, int q, v16 a, v16 b, v16 c, v16 d)
{
    v16 h1 = v16_hsum4_tree(a, b, c, d);
    /* lane 4i of h1 is the i-th sum: moved to lane 4q + i */
    __m512i at = _mm512_set_epi32(12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0);
    return _mm512_mask_permutexvar_ps(into, (__mmask16)(0xFu << (4 * q)), at, h1);
}
/* Lanes [0, n) of a, the others 0 (v16_load_n of a stored vector). */
V16_INLINE v16 v16_first_n(v16 a, int n) { return _mm512_maskz_mov_ps((__mmask16)((1u << n) - 1u), a); }
/* Lanes [0, n) of a, the others fill (v16_load_n_or of a stored vector). */
V16_INLINE v16 v16_first_n_or(v16 a, int n, float fill)
{
    return _mm512_mask_mov_ps(_mm512_set1_ps(fill), (__mmask16)((1u << n) - 1u), a);
}
V16_INLINE float v16_hmax(v16 a) { return _mm512_reduce_max_ps(a); }
V16_INLINE float v16_lane0(v16 a) { return _mm512_cvtss_f32(a); }
V16_INLINE void v16_prefetch(const void *p) { _mm_prefetch((const char *)p, _MM_HINT_T0); }
V16_INLINE void v16_prefetch_l2(const void *p) { _mm_prefetch((const char *)p, _MM_HINT_T1); }

/* ---- bf16 products (kvd_kernels.h): words, halves and flushed arithmetic ----
 * A "words" vector holds 16 32-bit words, each a pair of bf16 (the even-numbered
 * element in the low half), in the bits of a v16. The flushed operations read
 * subnormal inputs as zero and flush subnormal results to zero, as AMX does; on
 * AVX-512 they are plain FMAs and adds run between v16_flush_begin and v16_flush_end,
 * which set and restore MXCSR's DAZ and FTZ. */
V16_INLINE v16 v16_load_words(const void *p) { return _mm512_load_ps((const float *)p); }
V16_INLINE void v16_store_words(uint32_t *p, v16 a) { _mm512_storeu_si512(p, _mm512_castps_si512(a)); }
/* The low (even) or high (odd) bf16 of each word, as a float. */
V16_INLINE v16 v16_bf16_low(v16 words)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(words), 16));
}
V16_INLINE v16 v16_bf16_high(v16 words)
{
    return _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_castps_si512(words), _mm512_set1_epi32((int)0xffff0000u)));
}
typedef unsigned v16_flush_state;
V16_INLINE v16_flush_state v16_flush_begin(void)
{
    v16_flush_state saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040u); /* FTZ | DAZ */
    return saved;
}
V16_INLINE void v16_flush_end(v16_flush_state saved) { _mm_setcsr(saved); }
V16_INLINE v16 v16_fma_flush(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
V16_INLINE v16 v16_add_flush(v16 a, v16 b) { return _mm512_add_ps(a, b); }
#if defined(KVD_VEC_DPBF16)
/* VDPBF16PS: per lane, acc + x.odd * w.odd, rounded, + x.even * w.even, rounded, on the
 * bf16 pairs of the words x and w (v16_dpbf16 in the scalar section says it exactly).
 * It ignores MXCSR: no v16_flush_begin needed. */
V16_INLINE v16 v16_dpbf16(v16 acc, v16 x, v16 w)
{
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(x), (__m512bh)_mm512_castps_si512(w));
}
#endif
/* Words of the bf16 pairs (lo[0], lo[1]), ..., (hi[14], hi[15]), each rounded as
 * VCVTNE2PS2BF16 rounds: nearest even, NaN made quiet, subnormals to a zero of their
 * sign. */
#if defined(KVD_VEC_AMX) || defined(KVD_VEC_DPBF16)
V16_INLINE v16 v16_bf16_pairs(v16 lo, v16 hi)
{
    return _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}
#else
V16_INLINE __m256i v16_to_bf16_bits_daz(v16 a)
{
    __m512i bits = _mm512_castps_si512(a);
    __mmask16 subnormal = _mm512_testn_epi32_mask(bits, _mm512_set1_epi32(0x7f800000));
    bits = _mm512_mask_and_epi32(bits, subnormal, bits, _mm512_set1_epi32((int)0x80000000u));
    return v16_to_bf16_bits(_mm512_castsi512_ps(bits));
}
V16_INLINE v16 v16_bf16_pairs(v16 lo, v16 hi)
{
    /* elements 0..15 then 16..31 in order are already the pairs (2i, 2i+1) */
    return _mm512_castsi512_ps(_mm512_inserti64x4(
        _mm512_castsi256_si512(v16_to_bf16_bits_daz(lo)), v16_to_bf16_bits_daz(hi), 1));
}
#endif

#else /* KVD_VEC_SCALAR */

typedef struct v16 {
    float f[16];
} v16;

#define V16_MAP(expr)                                                                          \
    v16 r_;                                                                                    \
    for (int i = 0; i < 16; i++)                                                               \
        r_.f[i] = (expr);                                                                      \
    return r_

V16_INLINE v16 v16_zero(void) { V16_MAP(0.0f); }
V16_INLINE v16 v16_set1(float a) { V16_MAP(a); }
V16_INLINE v16 v16_load(const float *p) { V16_MAP(p[i]); }
V16_INLINE v16 v16_load_n(const float *p, int n) { V16_MAP(i < n ? p[i] : 0.0f); }
V16_INLINE v16 v16_load_n_or(const float *p, int n, float fill) { V16_MAP(i < n ? p[i] : fill); }
V16_INLINE void v16_store(float *p, v16 a) { memcpy(p, a.f, sizeof a.f); }
V16_INLINE void v16_store_n(float *p, v16 a, int n) { memcpy(p, a.f, (size_t)n * sizeof(float)); }
V16_INLINE v16 v16_load_mask(const float *p, uint32_t mask)
{
    V16_MAP((mask >> i) & 1u ? p[i] : 0.0f);
}
V16_INLINE void v16_store_mask(float *p, v16 a, uint32_t mask)
{
    for (int i = 0; i < 16; i++)
        if ((mask >> i) & 1u)
            p[i] = a.f[i];
}
V16_INLINE v16 v16_load_bf16(const uint16_t *p) { V16_MAP(kvd_bf16_to_f32(p[i])); }
V16_INLINE v16 v16_load_bf16_n(const uint16_t *p, int n)
{
    V16_MAP(i < n ? kvd_bf16_to_f32(p[i]) : 0.0f);
}
V16_INLINE v16 v16_load_f16(const uint16_t *p) { V16_MAP(kvd_f16_to_f32(p[i])); }
V16_INLINE v16 v16_load_f16_n(const uint16_t *p, int n)
{
    V16_MAP(i < n ? kvd_f16_to_f32(p[i]) : 0.0f);
}
V16_INLINE void v16_store_bf16_n(uint16_t *p, v16 a, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = kvd_f32_to_bf16(a.f[i]);
}
V16_INLINE void v16_store_f16_n(uint16_t *p, v16 a, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = kvd_f32_to_f16(a.f[i]);
}
V16_INLINE v16 v16_load_i8_n(const int8_t *p, int n) { V16_MAP(i < n ? (float)p[i] : 0.0f); }
V16_INLINE v16 v16_fma(v16 a, v16 b, v16 c) { V16_MAP(fmaf(a.f[i], b.f[i], c.f[i])); }
V16_INLINE v16 v16_add(v16 a, v16 b) { V16_MAP(a.f[i] + b.f[i]); }
V16_INLINE v16 v16_sub(v16 a, v16 b) { V16_MAP(a.f[i] - b.f[i]); }
V16_INLINE v16 v16_mul(v16 a, v16 b) { V16_MAP(a.f[i] * b.f[i]); }
V16_INLINE v16 v16_div(v16 a, v16 b) { V16_MAP(a.f[i] / b.f[i]); }
/* Same NaN rule as vmaxps/vminps: the second operand wins unless the first is larger. */
V16_INLINE v16 v16_max(v16 a, v16 b) { V16_MAP(a.f[i] > b.f[i] ? a.f[i] : b.f[i]); }
V16_INLINE v16 v16_min(v16 a, v16 b) { V16_MAP(a.f[i] < b.f[i] ? a.f[i] : b.f[i]); }
V16_INLINE v16 v16_round(v16 a) { V16_MAP(nearbyintf(a.f[i])); }
V16_INLINE v16 v16_scale_pow2(v16 a, v16 n)
{
    v16 r;
    for (int i = 0; i < 16; i++) {
        uint32_t bits = (uint32_t)((int32_t)n.f[i] + 127) << 23;
        float s;
        memcpy(&s, &bits, sizeof s);
        r.f[i] = a.f[i] * s;
    }
    return r;
}
V16_INLINE float v16_hsum(v16 a)
{
    float h8[8], h4[4], h2[2];
    for (int i = 0; i < 8; i++)
        h8[i] = a.f[i] + a.f[i + 8];
    for (int i = 0; i < 4; i++)
        h4[i] = h8[i] + h8[i + 4];
    for (int i = 0; i < 2; i++)
        h2[i] = h4[i] + h4[i + 2];
    return h2[0] + h2[1];
}
V16_INLINE v16 v16_hsum4_lanes(v16 into, int q, v16 a, v16 b, v16 c, v16 d)
{
    const v16 *x[4] = {&a, &b, &c, &d};
    for (int i = 0; i < 4; i++)
        into.f[4 * q + i] = v16_hsum(*x[i]);
    return into;
}
V16_INLINE v16 v16_first_n(v16 a, int n) { V16_MAP(i < n ? a.f[i] : 0.0f); }
V16_INLINE v16 v16_first_n_or(v16 a, int n, float fill) { V16_MAP(i < n ? a.f[i] : fill); }
V16_INLINE void v16_hsum4(v16 a, v16 b, v16 c, v16 d, float *out)
{
    out[0] = v16_hsum(a);
    out[1] = v16_hsum(b);
    out[2] = v16_hsum(c);
    out[3] = v16_hsum(d);
}
V16_INLINE float v16_hmax(v16 a)
{
    float m = a.f[0];
    for (int i = 1; i < 16; i++)
        m = a.f[i] > m ? a.f[i] : m;
    return m;
}
V16_INLINE float v16_lane0(v16 a) { return a.f[0]; }
V16_INLINE void v16_prefetch(const void *p) { __builtin_prefetch(p); }
V16_INLINE void v16_prefetch_l2(const void *p) { __builtin_prefetch(p, 0, 2); }

/* bf16 products: see the AVX-512 section. */
V16_INLINE v16 v16_load_words(const void *p)
{
    v16 r;
    memcpy(r.f, p, sizeof r.f);
    return r;
}
V16_INLINE void v16_store_words(uint32_t *p, v16 a) { memcpy(p, a.f, sizeof a.f); }
V16_INLINE float v16_word_half(float word, int high)
{
    uint32_t bits;
    memcpy(&bits, &word, sizeof bits);
    bits = high ? bits & 0xffff0000u : bits << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
V16_INLINE v16 v16_bf16_low(v16 words) { V16_MAP(v16_word_half(words.f[i], 0)); }
V16_INLINE v16 v16_bf16_high(v16 words) { V16_MAP(v16_word_half(words.f[i], 1)); }
typedef int v16_flush_state;
V16_INLINE v16_flush_state v16_flush_begin(void) { return 0; }
V16_INLINE void v16_flush_end(v16_flush_state s) { (void)s; }
V16_INLINE float v16_flush_subnormal(float a)
{
    return fabsf(a) < FLT_MIN ? copysignf(0.0f, a) : a;
}
V16_INLINE v16 v16_fma_flush(v16 a, v16 b, v16 c)
{
    V16_MAP(v16_flush_subnormal(fmaf(v16_flush_subnormal(a.f[i]), v16_flush_subnormal(b.f[i]),
                                     v16_flush_subnormal(c.f[i]))));
}
V16_INLINE v16 v16_add_flush(v16 a, v16 b)
{
    V16_MAP(v16_flush_subnormal(v16_flush_subnormal(a.f[i]) + v16_flush_subnormal(b.f[i])));
}
/* What VDPBF16PS computes in each lane (measured bit for bit on AMD Zen 5, bench/probe_bf16
 * --semantics, and Intel's documented order): the odd products first, each product
 * exact and added with one rounding to nearest even, inputs, the intermediate sum and
 * the result with subnormals flushed to zero, MXCSR ignored. */
V16_INLINE v16 v16_dpbf16(v16 acc, v16 x, v16 w)
{
    v16 r;
    for (int i = 0; i < 16; i++) {
        float odd = fmaf(v16_flush_subnormal(v16_word_half(x.f[i], 1)),
                         v16_flush_subnormal(v16_word_half(w.f[i], 1)),
                         v16_flush_subnormal(acc.f[i]));
        r.f[i] = v16_flush_subnormal(fmaf(v16_flush_subnormal(v16_word_half(x.f[i], 0)),
                                          v16_flush_subnormal(v16_word_half(w.f[i], 0)),
                                          v16_flush_subnormal(odd)));
    }
    return r;
}
V16_INLINE uint16_t v16_bf16_daz(float f)
{
    return kvd_f32_to_bf16(v16_flush_subnormal(f));
}
V16_INLINE v16 v16_bf16_pairs(v16 lo, v16 hi)
{
    v16 r;
    for (int i = 0; i < 16; i++) {
        const float *src = i < 8 ? &lo.f[2 * i] : &hi.f[2 * i - 16];
        uint32_t word = (uint32_t)v16_bf16_daz(src[0]) | (uint32_t)v16_bf16_daz(src[1]) << 16;
        memcpy(&r.f[i], &word, sizeof word);
    }
    return r;
}

#undef V16_MAP
#endif

/* exp(x) for x clamped to [-87, 88] (Cephes expf: Cody-Waite reduction by ln 2, degree-5
 * polynomial, ~1 ulp), written once over the lane operations above so both builds agree.
 * Below -87 it returns exp(-87) ~ 1.6e-38 rather than a denormal or 0: callers (softmax,
 * silu) only add such values to sums of order one. */
V16_INLINE v16 v16_exp(v16 x)
{
    x = v16_min(v16_max(x, v16_set1(-87.0f)), v16_set1(88.0f));
    v16 n = v16_round(v16_mul(x, v16_set1(1.44269504088896341f)));
    v16 r = v16_fma(n, v16_set1(-0.693359375f), x);
    r = v16_fma(n, v16_set1(2.12194440e-4f), r);
    v16 p = v16_set1(1.9875691500e-4f);
    p = v16_fma(p, r, v16_set1(1.3981999507e-3f));
    p = v16_fma(p, r, v16_set1(8.3334519073e-3f));
    p = v16_fma(p, r, v16_set1(4.1665795894e-2f));
    p = v16_fma(p, r, v16_set1(1.6666665459e-1f));
    p = v16_fma(p, r, v16_set1(5.0000001201e-1f));
    p = v16_fma(p, v16_mul(r, r), r);
    p = v16_add(p, v16_set1(1.0f));
    return v16_scale_pow2(p, n);
}

/* The 32 weights of (panel, k) of a packed f32 or f16 matrix, widened: rows 0..15 of
 * the panel in *lo, 16..31 in *hi; panel points at the panel's first weight. (bf16
 * matrices are read as words of pairs, v16_load_words.) */
V16_INLINE void v16_load_panel(const void *panel, int dtype, size_t k, v16 *lo, v16 *hi)
{
    if (dtype == 1) {
        *lo = v16_load_f16((const uint16_t *)panel + k * 32);
        *hi = v16_load_f16((const uint16_t *)panel + k * 32 + 16);
    } else {
        *lo = v16_load((const float *)panel + k * 32);
        *hi = v16_load((const float *)panel + k * 32 + 16);
    }
}

/* Loads 16 (or the first n, rest zero) weights of any dtype widened to float. */
V16_INLINE v16 v16_load_any(const void *base, int dtype, size_t index)
{
    if (dtype == 0)
        return v16_load((const float *)base + index);
    if (dtype == 1)
        return v16_load_f16((const uint16_t *)base + index);
    return v16_load_bf16((const uint16_t *)base + index);
}
V16_INLINE v16 v16_load_any_n(const void *base, int dtype, size_t index, int n)
{
    if (dtype == 0)
        return v16_load_n((const float *)base + index, n);
    if (dtype == 1)
        return v16_load_f16_n((const uint16_t *)base + index, n);
    return v16_load_bf16_n((const uint16_t *)base + index, n);
}

#endif
