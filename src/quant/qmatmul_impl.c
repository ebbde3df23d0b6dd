/* qmatmul_impl.c - out = x W^T over quantized weights in the packed layout
 * (quant_internal.h), activations quantized per block, dot products in integers.
 *
 * Compiled twice: with AVX-512 VNNI (KVD_QVEC_VNNI, _avx512vnni) and portable
 * (_scalar). Both compute every output element with the operations kvd_kernels.h
 * defines for quantized weights: exact integer block sums, then one float
 * multiply-add per block (two for Q4_K/Q5_K) in k order, so they give the same bits.
 *
 * Blocking: rows go in tiles of up to ROW_TILE rows whose activations are quantized once
 * into a stack buffer; for each group of 16 output columns the tile runs the group's
 * tiles (weights) front to back, every row against each weight vector while it is in
 * registers. With m = 1 (decode) that streams the weights once, in order.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kvd/kvd_half.h"
#include "kvd/kvd_quant.h"
#include "quant_internal.h"

#if defined(KVD_QVEC_VNNI)
#include <immintrin.h>
#define QSFX(name) name##_avx512vnni
#elif defined(KVD_QVEC_STANDIN_VNNI)
#define QSFX(name) name##_avx512vnni
#else
#define QSFX(name) name##_scalar
#endif

#define GROUP KVD_QGROUP_ROWS
#define ROW_TILE 8
/* Quantized activations a row tile may hold: codes (k), scales (k/32) and sums (k/16);
 * 88 KB of stack, one row of up to KVD_QUANT_MAX_COLS inputs. */
#define ACT_CODES ((size_t)KVD_QUANT_MAX_COLS)

typedef struct act_tile {
    int8_t q[ACT_CODES];
    float d[ACT_CODES / 32];
    int32_t sum[ACT_CODES / 16];
} act_tile;

static kvd_qact act_row(act_tile *a, int r, int k)
{
    return (kvd_qact){a->q + (size_t)r * k, a->d + (size_t)r * (k / 32), a->sum + (size_t)r * (k / 16)};
}

#if !defined(KVD_QVEC_VNNI)

/* The integer sums of row c of a tile against one row's activations (block b of the
 * row starts at xq): isum, and for Q4_K/Q5_K msum (mins x sub-block sums). */
static void block_sums(kvd_dtype dtype, const kvd_qblock *w, const int8_t *xq, const int32_t *xsum,
                       int32_t *isum, int32_t *msum)
{
    int32_t s = 0, ms = 0;
    switch (dtype) {
    case KVD_DTYPE_Q8_0:
    case KVD_DTYPE_Q4_0:
    case KVD_DTYPE_Q5_0: {
        int offset = dtype == KVD_DTYPE_Q8_0 ? 128 : dtype == KVD_DTYPE_Q4_0 ? 8 : 16;
        for (int k = 0; k < 32; k++)
            s += (w->code[k] - offset) * xq[k];
        break;
    }
    case KVD_DTYPE_Q8_K:
        for (int k = 0; k < 256; k++)
            s += (w->code[k] - 128) * xq[k];
        break;
    case KVD_DTYPE_Q4_K:
    case KVD_DTYPE_Q5_K:
        for (int sub = 0; sub < 8; sub++) {
            int32_t dot = 0;
            for (int k = 32 * sub; k < 32 * sub + 32; k++)
                dot += w->code[k] * xq[k];
            s += w->sc[sub] * dot;
            ms += w->mn[sub] * (xsum[2 * sub] + xsum[2 * sub + 1]);
        }
        break;
    case KVD_DTYPE_Q6_K:
        for (int sub = 0; sub < 16; sub++) {
            int32_t dot = 0;
            for (int k = 16 * sub; k < 16 * sub + 16; k++)
                dot += (w->code[k] - 32) * xq[k];
            s += (int8_t)w->sc[sub] * dot;
        }
        break;
    default:
        break;
    }
    *isum = s;
    *msum = ms;
}

/* Rows [0, rows) of the tile against output columns [c0, c1) of group g. */
static void group_product(float *out, int ldo, int rows, const act_tile *a, const kvd_matrix *w,
                          const float *bias, bool accumulate, int g, int c0, int c1)
{
    kvd_dtype dtype = w->dtype;
    int k = w->cols, per_block = kvd_dtype_block_values(dtype);
    int blocks = k / per_block;
    int act_block = kvd_qtype_is_k(dtype) ? 256 : 32;
    size_t tile_bytes = kvd_qtile_bytes(dtype);
    const uint8_t *tiles = (const uint8_t *)w->data + (size_t)g * blocks * tile_bytes;
    float acc[ROW_TILE][GROUP];
    for (int r = 0; r < rows; r++) {
        for (int c = c0; c < c1; c++) {
            int j = g * GROUP + c;
            float v = accumulate ? out[(size_t)r * ldo + j] : 0.0f;
            acc[r][c] = bias ? v + bias[j] : v;
        }
    }
    kvd_qblock wb[GROUP];
    for (int b = 0; b < blocks; b++) {
        for (int c = c0; c < c1; c++)
            kvd_qtile_get(dtype, tiles + (size_t)b * tile_bytes, c, &wb[c]);
        for (int r = 0; r < rows; r++) {
            kvd_qact x = act_row((act_tile *)a, r, k);
            const int8_t *xq = x.q + (size_t)b * per_block;
            const int32_t *xsum = x.sum + (size_t)b * per_block / 16;
            float dx = x.d[(size_t)b * per_block / act_block];
            for (int c = c0; c < c1; c++) {
                int32_t isum, msum;
                block_sums(dtype, &wb[c], xq, xsum, &isum, &msum);
                float dw = dtype == KVD_DTYPE_Q8_K ? wb[c].d32 : kvd_f16_to_f32(wb[c].d);
                acc[r][c] = __builtin_fmaf(dw * dx, (float)isum, acc[r][c]);
                if (dtype == KVD_DTYPE_Q4_K || dtype == KVD_DTYPE_Q5_K)
                    acc[r][c] = __builtin_fmaf(-(kvd_f16_to_f32(wb[c].dmin) * dx), (float)msum,
                                               acc[r][c]);
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = c0; c < c1; c++)
            out[(size_t)r * ldo + g * GROUP + c] = acc[r][c];
}

#else /* KVD_QVEC_VNNI */

static inline __m512i nib_lo(__m512i v)
{
    return _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
}

static inline __m512i nib_hi(__m512i v)
{
    return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F));
}

static inline __m512i bcast4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

static inline __m512 load_f16x16(const uint8_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

static inline __m512i dp(__m512i acc, __m512i w, const int8_t *x)
{
    return _mm512_dpbusd_epi32(acc, w, bcast4(x));
}

/* Lane c's sum over 32 inputs of N4 vectors v[0..3] (codes with their high bits merged
 * in lo[]/hi[] by the caller) against x. */
static inline __m512i dot32_n4(const __m512i lo[4], const __m512i hi[4], const int8_t *x)
{
    __m512i s = _mm512_setzero_si512();
    for (int t = 0; t < 4; t++) {
        s = dp(s, lo[t], x + 8 * t);
        s = dp(s, hi[t], x + 8 * t + 4);
    }
    return s;
}

/* Splits 4 N4 vectors at p into low/high nibble codes, merging the fifth bits of the
 * 32-input vector h when given. */
static inline void unpack32(const uint8_t *p, const uint8_t *h, __m512i lo[4], __m512i hi[4])
{
    __m512i hv = h ? _mm512_loadu_si512(h) : _mm512_setzero_si512();
    const __m512i bit4 = _mm512_set1_epi8(0x10);
    for (int t = 0; t < 4; t++) {
        __m512i v = _mm512_loadu_si512(p + 64 * t);
        lo[t] = nib_lo(v);
        hi[t] = nib_hi(v);
        if (h) {
            /* bit t of a byte to bit 4 (left shift 4-t), bit 4+t to bit 4 (right shift t):
             * 16-bit shifts, but the bit kept comes from the same byte */
            __m512i l5 = _mm512_and_si512(_mm512_sll_epi16(hv, _mm_cvtsi32_si128(4 - t)), bit4);
            __m512i h5 = _mm512_and_si512(_mm512_srl_epi16(hv, _mm_cvtsi32_si128(t)), bit4);
            lo[t] = _mm512_or_si512(lo[t], l5);
            hi[t] = _mm512_or_si512(hi[t], h5);
        }
    }
}

static void group_product(float *out, int ldo, int rows, const act_tile *a, const kvd_matrix *w,
                          const float *bias, bool accumulate, int g, int c0, int c1)
{
    kvd_dtype dtype = w->dtype;
    int k = w->cols, per_block = kvd_dtype_block_values(dtype);
    int blocks = k / per_block;
    int act_block = kvd_qtype_is_k(dtype) ? 256 : 32;
    size_t tile_bytes = kvd_qtile_bytes(dtype);
    const uint8_t *tiles = (const uint8_t *)w->data + (size_t)g * blocks * tile_bytes;
    __mmask16 mask = (__mmask16)(((1u << (c1 - c0)) - 1u) << c0);
    __m512 acc[ROW_TILE];
    __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + g * GROUP) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        __m512 v = accumulate ? _mm512_maskz_loadu_ps(mask, out + (size_t)r * ldo + g * GROUP)
                              : _mm512_setzero_ps();
        acc[r] = bias ? _mm512_add_ps(v, bv) : v;
    }
    const int8_t *xq[ROW_TILE];
    const int32_t *xs[ROW_TILE];
    const float *xd[ROW_TILE];
    for (int r = 0; r < rows; r++) {
        kvd_qact x = act_row((act_tile *)a, r, k);
        xq[r] = x.q;
        xs[r] = x.sum;
        xd[r] = x.d;
    }
    for (int b = 0; b < blocks; b++) {
        const uint8_t *t = tiles + (size_t)b * tile_bytes;
        _mm_prefetch((const char *)t + 4 * tile_bytes, _MM_HINT_T0);
        _mm_prefetch((const char *)t + 4 * tile_bytes + 64, _MM_HINT_T0);
        int xb = b * per_block;
        switch (dtype) {
        case KVD_DTYPE_Q8_0: {
            __m512i wv[8];
            for (int v = 0; v < 8; v++)
                wv[v] = _mm512_loadu_si512(t + 64 * v);
            __m512 dw = load_f16x16(t + 512);
            for (int r = 0; r < rows; r++) {
                __m512i s = _mm512_setzero_si512();
                for (int v = 0; v < 8; v++)
                    s = dp(s, wv[v], xq[r] + xb + 4 * v);
                /* codes are q + 128: take 128 x the block's activation sum back */
                int32_t xsum = xs[r][xb / 16] + xs[r][xb / 16 + 1];
                s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * xsum));
                __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(xd[r][b]));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s), acc[r]);
            }
            break;
        }
        case KVD_DTYPE_Q4_0:
        case KVD_DTYPE_Q5_0: {
            bool five = dtype == KVD_DTYPE_Q5_0;
            int offset = five ? 16 : 8;
            __m512i lo[4], hi[4];
            unpack32(t, five ? t + 256 : NULL, lo, hi);
            __m512 dw = load_f16x16(t + (five ? 320 : 256));
            for (int r = 0; r < rows; r++) {
                __m512i s = dot32_n4(lo, hi, xq[r] + xb);
                int32_t xsum = xs[r][xb / 16] + xs[r][xb / 16 + 1];
                s = _mm512_sub_epi32(s, _mm512_set1_epi32(offset * xsum));
                __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(xd[r][b]));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s), acc[r]);
            }
            break;
        }
        case KVD_DTYPE_Q4_K:
        case KVD_DTYPE_Q5_K: {
            bool five = dtype == KVD_DTYPE_Q5_K;
            const uint8_t *sc = t + 2048 + (five ? 512 : 0);
            const uint8_t *mn = sc + 128;
            __m512 dw = load_f16x16(mn + 128);
            __m512 dmin = load_f16x16(mn + 160);
            __m512i isum[ROW_TILE], msum[ROW_TILE];
            for (int r = 0; r < rows; r++)
                isum[r] = msum[r] = _mm512_setzero_si512();
            for (int sub = 0; sub < 8; sub++) {
                __m512i lo[4], hi[4];
                unpack32(t + 256 * sub, five ? t + 2048 + 64 * sub : NULL, lo, hi);
                __m512i scv = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sc + 16 * sub)));
                __m512i mnv = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(mn + 16 * sub)));
                for (int r = 0; r < rows; r++) {
                    const int8_t *x = xq[r] + xb + 32 * sub;
                    __m512i dot = dot32_n4(lo, hi, x);
                    isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(dot, scv));
                    int32_t xsum = xs[r][xb / 16 + 2 * sub] + xs[r][xb / 16 + 2 * sub + 1];
                    msum[r] = _mm512_add_epi32(msum[r], _mm512_mullo_epi32(mnv, _mm512_set1_epi32(xsum)));
                }
            }
            for (int r = 0; r < rows; r++) {
                __m512 dx = _mm512_set1_ps(xd[r][b]);
                __m512 scale = _mm512_mul_ps(dw, dx);
                __m512 mscale = _mm512_castsi512_ps(_mm512_xor_si512(
                    _mm512_castps_si512(_mm512_mul_ps(dmin, dx)), _mm512_set1_epi32(INT32_MIN)));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum[r]), acc[r]);
                acc[r] = _mm512_fmadd_ps(mscale, _mm512_cvtepi32_ps(msum[r]), acc[r]);
            }
            break;
        }
        case KVD_DTYPE_Q6_K: {
            const uint8_t *qh = t + 2048;
            const uint8_t *sc = t + 3072;
            __m512 dw = load_f16x16(t + 3328);
            __m512i isum[ROW_TILE];
            for (int r = 0; r < rows; r++)
                isum[r] = _mm512_setzero_si512();
            const __m512i top2 = _mm512_set1_epi8(0x30);
            for (int sub = 0; sub < 16; sub++) {
                __m512i hv = _mm512_loadu_si512(qh + 64 * sub);
                __m512i v0 = _mm512_loadu_si512(t + 128 * sub);
                __m512i v1 = _mm512_loadu_si512(t + 128 * sub + 64);
                __m512i lo0 = _mm512_or_si512(nib_lo(v0), _mm512_and_si512(_mm512_slli_epi16(hv, 4), top2));
                __m512i hi0 = _mm512_or_si512(nib_hi(v0), _mm512_and_si512(_mm512_slli_epi16(hv, 2), top2));
                __m512i lo1 = _mm512_or_si512(nib_lo(v1), _mm512_and_si512(hv, top2));
                __m512i hi1 = _mm512_or_si512(nib_hi(v1), _mm512_and_si512(_mm512_srli_epi16(hv, 2), top2));
                __m512i scv = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sc + 16 * sub)));
                for (int r = 0; r < rows; r++) {
                    const int8_t *x = xq[r] + xb + 16 * sub;
                    __m512i dot = _mm512_setzero_si512();
                    dot = dp(dot, lo0, x);
                    dot = dp(dot, hi0, x + 4);
                    dot = dp(dot, lo1, x + 8);
                    dot = dp(dot, hi1, x + 12);
                    dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(32 * xs[r][xb / 16 + sub]));
                    isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(dot, scv));
                }
            }
            for (int r = 0; r < rows; r++) {
                __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(xd[r][b]));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum[r]), acc[r]);
            }
            break;
        }
        case KVD_DTYPE_Q8_K: {
            __m512 dw = _mm512_loadu_ps((const float *)(t + 4096));
            for (int r = 0; r < rows; r++) {
                __m512i s = _mm512_setzero_si512();
                int32_t xsum = 0;
                for (int v = 0; v < 64; v++)
                    s = dp(s, _mm512_loadu_si512(t + 64 * v), xq[r] + xb + 4 * v);
                for (int gi = 0; gi < 16; gi++)
                    xsum += xs[r][xb / 16 + gi];
                s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * xsum));
                __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(xd[r][b]));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s), acc[r]);
            }
            break;
        }
        default:
            break;
        }
        (void)act_block;
    }
    for (int r = 0; r < rows; r++)
        _mm512_mask_storeu_ps(out + (size_t)r * ldo + g * GROUP, mask, acc[r]);
}

#endif

void QSFX(kvd_qmatmul_cols)(float *out, int ldo, const float *x, int ldx, int m,
                            const kvd_matrix *w, const float *bias, bool accumulate, int n_begin,
                            int n_end)
{
    if (n_begin >= n_end || m <= 0)
        return;
    int k = w->cols;
    /* rows per activation tile: as many as the buffer holds, up to ROW_TILE */
    int tile_rows = (int)(ACT_CODES / (size_t)k);
    tile_rows = tile_rows > ROW_TILE ? ROW_TILE : tile_rows < 1 ? 1 : tile_rows;
    act_tile a;
    for (int r0 = 0; r0 < m; r0 += tile_rows) {
        int rows = m - r0 < tile_rows ? m - r0 : tile_rows;
        for (int r = 0; r < rows; r++) {
            kvd_qact qa = act_row(&a, r, k);
            kvd_qact_quantize(w->dtype, x + (size_t)(r0 + r) * ldx, k, &qa);
        }
        for (int g = n_begin / GROUP; g * GROUP < n_end; g++) {
            int c0 = g * GROUP < n_begin ? n_begin - g * GROUP : 0;
            int c1 = (g + 1) * GROUP > n_end ? n_end - g * GROUP : GROUP;
            group_product(out + (size_t)r0 * ldo, ldo, rows, &a, w, bias, accumulate, g, c0, c1);
        }
    }
}
