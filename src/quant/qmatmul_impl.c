/* qmatmul_impl.c - out = x W^T over quantized weights in the packed layout
 * (quant_internal.h), activations quantized per block, dot products in integers.
 *
 * Compiled twice: with AVX-512 VNNI (KVD_QVEC_VNNI, _avx512vnni) and portable
 * (_scalar). Both compute every output element with the operations kvd_kernels.h
 * defines for quantized weights: exact integer block sums, then one float
 * multiply-add per block (two for Q4_K/Q5_K) in k order, so they give the same bits.
 *
 * Blocking: rows go in tiles of up to ROW_TILE rows whose activations are quantized once
 * into a stack buffer (or come quantized in a kvd_qinput); for each group of 16 output
 * columns the tile runs the group's tiles (weights) front to back, every row against
 * each weight vector while it is in registers. With m = 1 (decode) that streams the
 * weights once, in order. Batched decodes (5..16 rows, 32-value types) run each group
 * pair in L1-sized slices of k, prefetching the next into L2 (few_rows_product); larger
 * batches run in passes of rows over slices of k sized for L2 (tile_product in the VNNI
 * build).
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kvd/kvd_half.h"
#include "kvd/kvd_quant.h"
#include "quant_internal.h"

#if defined(KVD_QVEC_VNNI) && defined(KVD_QVEC_GFNI)
#include <immintrin.h>
#define QSFX(name) name##_avx512gfni
#elif defined(KVD_QVEC_VNNI)
#include <immintrin.h>
#define QSFX(name) name##_avx512vnni
#elif defined(KVD_QVEC_STANDIN_VNNI)
#define QSFX(name) name##_avx512vnni
#elif defined(KVD_QVEC_STANDIN_GFNI)
#define QSFX(name) name##_avx512gfni
#else
#define QSFX(name) name##_scalar
#endif

#define GROUP KVD_QGROUP_ROWS
/* Most rows whose quantized activations are held at a time (fewer when k is large: 292 at
 * k = 896). A tile streams the call's weights once: tiles of 64 rows, as before, made a
 * 512-row product over k = 896 (o_proj in a prefill) stream them 8 times instead of 2
 * (bench_qmatmul --threads 1 --cpu-time --rows 512 --recipes q8_0 --layers 2: 64.6-66.7
 * ms against 67.5-69.2). */
#define ROW_TILE 512
/* Quantized activations a row tile may hold: codes (k), scales (k/32) and sums (k/16):
 * 352 KB of stack, four rows of up to KVD_QUANT_MAX_COLS inputs, 64 rows of 4096
 * (the 7B shape's 3584: one row, 65536, took 18 rows a tile, each tile streaming the
 * weights again). */
#define ACT_CODES ((size_t)4 * KVD_QUANT_MAX_COLS)

typedef struct act_tile {
    int8_t q[ACT_CODES];
    float d[ACT_CODES / 32];
    int32_t sum[ACT_CODES / 16];
} act_tile;

/* Rows of quantized activations, row r at q + r k, d + r k/32, sum + r k/16 (a stack
 * tile or a caller's kvd_qinput). */
typedef struct act_rows {
    const int8_t *q;
    const float *d;
    const int32_t *sum;
} act_rows;

static kvd_qact act_row(const act_rows *a, int r, int k)
{
    return (kvd_qact){(int8_t *)a->q + (size_t)r * k, (float *)a->d + (size_t)r * (k / 32),
                      (int32_t *)a->sum + (size_t)r * (k / 16)};
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
static void group_product_scalar(float *out, int ldo, int first_row, int rows, const act_rows *a,
                                 const kvd_matrix *w, const float *bias, bool accumulate, int g,
                                 int c0, int c1)
{
    kvd_dtype dtype = w->dtype;
    int k = w->cols, per_block = kvd_dtype_block_values(dtype);
    int blocks = k / per_block;
    int act_block = kvd_qtype_is_k(dtype) ? 256 : 32;
    size_t tile_bytes = kvd_qtile_bytes(dtype);
    const uint8_t *tiles = (const uint8_t *)w->data + (size_t)g * blocks * tile_bytes;
    float acc[8][GROUP];
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
            kvd_qact x = act_row(a, first_row + r, k);
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

static void act_quantize(kvd_dtype dtype, const float *x, int k, kvd_qact *out)
{
    kvd_qact_quantize(dtype, x, k, out);
}

static void tile_product(float *out, int ldo, int rows, const act_rows *a, const kvd_matrix *w,
                         const float *bias, bool accumulate, int n_begin, int n_end)
{
    for (int g = n_begin / GROUP; g * GROUP < n_end; g++) {
        int c0 = g * GROUP < n_begin ? n_begin - g * GROUP : 0;
        int c1 = (g + 1) * GROUP > n_end ? n_end - g * GROUP : GROUP;
        for (int r0 = 0; r0 < rows; r0 += 8) {
            int n = rows - r0 < 8 ? rows - r0 : 8;
            group_product_scalar(out + (size_t)r0 * ldo, ldo, r0, n, a, w, bias, accumulate, g, c0, c1);
        }
    }
}

#else /* KVD_QVEC_VNNI */

/* Register blocking: up to RB rows x GB groups of 16 columns share each weight vector
 * load and each activation broadcast; their block sums are RB x GB int32 registers and
 * their accumulators as many float registers. */
#define RB 6
#define GB 4 /* 4 only for one row (decode: more independent streams and sums per broadcast) */
_Static_assert(RB == 6, "the kernel instantiations below cover R = 1..6");

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* How far ahead (bytes) a 32-value type's weight streams are prefetched on the first
 * pass of rows over a group (its weights come from memory; later rows find them in
 * L1/L2); the K types prefetch their next tile. */
#define PREFETCH_BYTES 1024

/* Prefetches one tile of `bytes` (a constant: the loop unrolls) at p: ceil(bytes / 64)
 * lines from p. A tile's lines may start anywhere in a line, so this may leave its last
 * line out, but the next tile's call, at p + bytes, takes it: over a stream of tiles
 * every line is prefetched. (Walking the exact lines of each tile took a loop whose trip
 * count changed with the tile's alignment: a branch mispredicted per group and block,
 * which cost one-row products more than the unpacking.) */
static ALWAYS_INLINE void prefetch_tile(const char *p, const size_t bytes)
{
    for (size_t i = 0; i < (bytes + 63) / 64; i++)
        _mm_prefetch(p + 64 * i, _MM_HINT_T0);
}

/* Bytes of a tile of dtype (kvd_qtile_bytes as a constant the kernels unroll with). */
static ALWAYS_INLINE size_t tile_size(const kvd_dtype dtype)
{
    switch (dtype) {
    case KVD_DTYPE_Q8_0: return 512 + 32;
    case KVD_DTYPE_Q4_0: return 256 + 32;
    case KVD_DTYPE_Q5_0: return 256 + 64 + 32;
    case KVD_DTYPE_Q4_K: return 2048 + 256 + 64;
    case KVD_DTYPE_Q5_K: return 2048 + 512 + 256 + 64;
    case KVD_DTYPE_Q6_K: return 2048 + 1024 + 256 + 32;
    default: return 4096 + 64; /* Q8_K */
    }
}


static ALWAYS_INLINE __m512i nib_lo(__m512i v)
{
    return _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
}

#if defined(KVD_QVEC_GFNI)
/* GF2P8AFFINEQB as a gather of bits inside each byte: byte 7 - i of the 64-bit matrix
 * selects the input bits whose parity becomes output bit i, so one set bit there moves
 * input bit s to output bit i, and output bits with an empty matrix byte are 0. One
 * instruction replaces a shift and a mask (and, beside VPTERNLOGD, the merge of a code's
 * high bits): the unpacking, not the memory, limited the 5- and 6-bit types in decode. */
#define BIT_TO(i, s) ((uint64_t)1 << (s) << (8 * (7 - (i))))
#define HIGH_NIBBLE_DOWN (BIT_TO(0, 4) | BIT_TO(1, 5) | BIT_TO(2, 6) | BIT_TO(3, 7))

static ALWAYS_INLINE __m512i bit_gather(__m512i v, uint64_t matrix)
{
    return _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64((long long)matrix), 0);
}

/* (v & 0x0F) | high: a low nibble with high bits that sit only above bit 3 */
static ALWAYS_INLINE __m512i nib_lo_or(__m512i v, __m512i high)
{
    return _mm512_ternarylogic_epi32(v, high, _mm512_set1_epi8(0x0F), 0xEC);
}

static ALWAYS_INLINE __m512i nib_hi(__m512i v)
{
    return bit_gather(v, HIGH_NIBBLE_DOWN);
}
#else
static ALWAYS_INLINE __m512i nib_hi(__m512i v)
{
    return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F));
}
#endif

/* 4 activation codes as a broadcast dword (VPDPBUSD's signed operand). */
static ALWAYS_INLINE __m512i bcast4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

static ALWAYS_INLINE __m512 load_f16x16(const uint8_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* Nibble codes of N4 vector t (inputs 8t..8t+7) with the fifth bits of the 32-input vector
 * hv merged in when five: bit t of a byte goes to bit 4 of the low code, bit 4+t to bit 4
 * of the high one (16-bit shifts, but the bit kept comes from the same byte). */
static ALWAYS_INLINE void unpack_n4(__m512i v, bool five, __m512i hv, int t, __m512i *lo, __m512i *hi)
{
#if defined(KVD_QVEC_GFNI)
    if (five) {
        *lo = nib_lo_or(v, bit_gather(hv, BIT_TO(4, t)));
        *hi = _mm512_or_si512(nib_hi(v), bit_gather(hv, BIT_TO(4, 4 + t)));
    } else {
        *lo = nib_lo(v);
        *hi = nib_hi(v);
    }
    return;
#endif
    *lo = nib_lo(v);
    *hi = nib_hi(v);
    if (five) {
        const __m512i bit4 = _mm512_set1_epi8(0x10);
        __m512i l5 = _mm512_and_si512(_mm512_sll_epi16(hv, _mm_cvtsi32_si128(4 - t)), bit4);
        __m512i h5 = _mm512_and_si512(_mm512_srl_epi16(hv, _mm_cvtsi32_si128(t)), bit4);
        *lo = _mm512_or_si512(*lo, l5);
        *hi = _mm512_or_si512(*hi, h5);
    }
}

typedef struct rows_view {
    const int8_t *q[RB];    /* each row's activation codes */
    const float *d[RB];     /* each row's block scales */
    const int32_t *sum[RB]; /* each row's sums per 16 codes */
} rows_view;

/* What one kernel call runs: blocks [b0, b1) of its groups' weights. from_out: an earlier
 * call left the accumulators' partial sums in out (exact floats), so they start from there
 * without the bias. stream: the weights come from memory: every line PREFETCH_BYTES ahead. */
typedef struct kspan {
    int b0, b1;
    bool from_out, stream;
    /* weights that run next (few_rows_product), in next_groups streams: each block
     * prefetches next_per_block bytes of each, from next[i] + (b - b0) * next_per_block,
     * into L2 */
    const char *next[GB];
    int next_groups;
    size_t next_per_block;
} kspan;

/* Block b's share of the weights that run next (kspan.next), into L2. */
static ALWAYS_INLINE void prefetch_next(const kspan *sp, int b)
{
    for (int i = 0; i < sp->next_groups; i++) {
        const char *p = sp->next[i] + (size_t)(b - sp->b0) * sp->next_per_block;
        for (size_t at = 0; at < sp->next_per_block; at += 64)
            _mm_prefetch(p + at, _MM_HINT_T1);
    }
}

/* Accumulators of R rows x G groups from out (accumulate) and bias, lanes outside mask 0. */
static ALWAYS_INLINE void acc_init(__m512 acc[RB][GB], const int R, const int G, float *out, int ldo,
                                   const float *bias, bool accumulate, int col0,
                                   const __mmask16 mask[GB])
{
    for (int g = 0; g < G; g++) {
        __m512 bv = bias ? _mm512_maskz_loadu_ps(mask[g], bias + col0 + 16 * g) : _mm512_setzero_ps();
        for (int r = 0; r < R; r++) {
            __m512 v = accumulate ? _mm512_maskz_loadu_ps(mask[g], out + (size_t)r * ldo + col0 + 16 * g)
                                  : _mm512_setzero_ps();
            acc[r][g] = bias ? _mm512_add_ps(v, bv) : v;
        }
    }
}

static ALWAYS_INLINE void acc_store(__m512 acc[RB][GB], const int R, const int G, float *out, int ldo,
                                    int col0, const __mmask16 mask[GB])
{
    for (int g = 0; g < G; g++)
        for (int r = 0; r < R; r++)
            _mm512_mask_storeu_ps(out + (size_t)r * ldo + col0 + 16 * g, mask[g], acc[r][g]);
}

/* Q8_0 / Q4_0 / Q5_0 weights: R rows x G groups over all blocks. */
static ALWAYS_INLINE void kernel32(const kvd_dtype dtype, const int R, const int G, float *out, int ldo,
                                   const rows_view *x, const uint8_t *tiles[GB], size_t tile_bytes,
                                   const float *bias, bool accumulate, int col0,
                                   const __mmask16 mask[GB], const kspan *sp)
{
    __m512 acc[RB][GB];
    acc_init(acc, R, G, out, ldo, sp->from_out ? NULL : bias, accumulate || sp->from_out, col0, mask);
    const bool stream = sp->stream;
    const bool five = dtype == KVD_DTYPE_Q5_0;
    const int32_t offset = dtype == KVD_DTYPE_Q8_0 ? 128 : five ? 16 : 8;
    const size_t d_at = dtype == KVD_DTYPE_Q8_0 ? 512 : five ? 320 : 256;
    for (int b = sp->b0; b < sp->b1; b++) {
        /* codes carry the offset: the sums start from -(offset x the block's activation sum) */
        __m512i s[RB][GB];
        for (int r = 0; r < R; r++) {
            __m512i start = _mm512_set1_epi32(-offset * (x->sum[r][2 * b] + x->sum[r][2 * b + 1]));
            for (int g = 0; g < G; g++)
                s[r][g] = start;
        }
        if (stream) /* weights from memory: every line of each stream, PREFETCH_BYTES ahead */
            for (int g = 0; g < G; g++)
                prefetch_tile((const char *)tiles[g] + (size_t)b * tile_bytes + PREFETCH_BYTES,
                              tile_size(dtype));
        prefetch_next(sp, b);
        /* one row: a second chain of sums per group (odd vectors, or the high nibbles),
         * added at the block's end, halves the VPDPBUSD latency each block waits for */
        __m512i s2[GB];
        for (int g = 0; g < G; g++)
            s2[g] = _mm512_setzero_si512();
        if (dtype == KVD_DTYPE_Q8_0) {
            for (int j = 0; j < 8; j++) {
                __m512i wv[GB];
                for (int g = 0; g < G; g++)
                    wv[g] = _mm512_loadu_si512(tiles[g] + (size_t)b * tile_bytes + 64 * j);
                for (int r = 0; r < R; r++) {
                    __m512i bx = bcast4(x->q[r] + 32 * b + 4 * j);
                    for (int g = 0; g < G; g++) {
                        if (R == 1 && j % 2)
                            s2[g] = _mm512_dpbusd_epi32(s2[g], wv[g], bx);
                        else
                            s[r][g] = _mm512_dpbusd_epi32(s[r][g], wv[g], bx);
                    }
                }
            }
        } else {
            __m512i hv[GB];
            for (int g = 0; g < G; g++)
                hv[g] = five ? _mm512_loadu_si512(tiles[g] + (size_t)b * tile_bytes + 256)
                             : _mm512_setzero_si512();
            for (int t = 0; t < 4; t++) {
                __m512i lo[GB], hi[GB];
                for (int g = 0; g < G; g++)
                    unpack_n4(_mm512_loadu_si512(tiles[g] + (size_t)b * tile_bytes + 64 * t), five,
                              hv[g], t, &lo[g], &hi[g]);
                for (int r = 0; r < R; r++) {
                    __m512i b0 = bcast4(x->q[r] + 32 * b + 8 * t);
                    __m512i b1 = bcast4(x->q[r] + 32 * b + 8 * t + 4);
                    for (int g = 0; g < G; g++) {
                        s[r][g] = _mm512_dpbusd_epi32(s[r][g], lo[g], b0);
                        if (R == 1)
                            s2[g] = _mm512_dpbusd_epi32(s2[g], hi[g], b1);
                        else
                            s[r][g] = _mm512_dpbusd_epi32(s[r][g], hi[g], b1);
                    }
                }
            }
        }
        if (R == 1)
            for (int g = 0; g < G; g++)
                s[0][g] = _mm512_add_epi32(s[0][g], s2[g]);
        for (int g = 0; g < G; g++) {
            __m512 dw = load_f16x16(tiles[g] + (size_t)b * tile_bytes + d_at);
            for (int r = 0; r < R; r++) {
                __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(x->d[r][b]));
                acc[r][g] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s[r][g]), acc[r][g]);
            }
        }
    }
    acc_store(acc, R, G, out, ldo, col0, mask);
}

/* K-quant weights: R rows x G groups over all 256-input blocks. */
static ALWAYS_INLINE void kernel256(const kvd_dtype dtype, const int R, const int G, float *out,
                                    int ldo, const rows_view *x, const uint8_t *tiles[GB],
                                    size_t tile_bytes, const float *bias, bool accumulate, int col0,
                                    const __mmask16 mask[GB], const kspan *sp)
{
    __m512 acc[RB][GB];
    acc_init(acc, R, G, out, ldo, sp->from_out ? NULL : bias, accumulate || sp->from_out, col0, mask);
    const bool stream = sp->stream;
    for (int b = sp->b0; b < sp->b1; b++) {
        const uint8_t *t[GB];
        for (int g = 0; g < G; g++) {
            t[g] = tiles[g] + (size_t)b * tile_bytes;
            if (stream)
                prefetch_tile((const char *)t[g] + tile_bytes, tile_size(dtype));
        }
        int xb = 256 * b;
        __m512i isum[RB][GB], msum[RB][GB];
        for (int r = 0; r < R; r++)
            for (int g = 0; g < G; g++)
                isum[r][g] = msum[r][g] = _mm512_setzero_si512();
        if (dtype == KVD_DTYPE_Q4_K || dtype == KVD_DTYPE_Q5_K) {
            const bool five = dtype == KVD_DTYPE_Q5_K;
            const size_t sc_at = 2048 + (five ? 512 : 0), mn_at = sc_at + 128;
            for (int sub = 0; sub < 8; sub++) {
                for (int g = 0; g < G; g++) {
                    __m512i dot[RB];
                    for (int r = 0; r < R; r++)
                        dot[r] = _mm512_setzero_si512();
                    __m512i hv = five ? _mm512_loadu_si512(t[g] + 2048 + 64 * sub) : _mm512_setzero_si512();
                    for (int q = 0; q < 4; q++) {
                        __m512i lo, hi;
                        unpack_n4(_mm512_loadu_si512(t[g] + 256 * sub + 64 * q), five, hv, q, &lo, &hi);
                        for (int r = 0; r < R; r++) {
                            const int8_t *xr = x->q[r] + xb + 32 * sub + 8 * q;
                            dot[r] = _mm512_dpbusd_epi32(dot[r], lo, bcast4(xr));
                            dot[r] = _mm512_dpbusd_epi32(dot[r], hi, bcast4(xr + 4));
                        }
                    }
                    __m512i scv = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(t[g] + sc_at + 16 * sub)));
                    __m512i mnv = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(t[g] + mn_at + 16 * sub)));
                    for (int r = 0; r < R; r++) {
                        isum[r][g] = _mm512_add_epi32(isum[r][g], _mm512_mullo_epi32(dot[r], scv));
                        int32_t xs = x->sum[r][xb / 16 + 2 * sub] + x->sum[r][xb / 16 + 2 * sub + 1];
                        msum[r][g] = _mm512_add_epi32(msum[r][g], _mm512_mullo_epi32(mnv, _mm512_set1_epi32(xs)));
                    }
                }
            }
            for (int g = 0; g < G; g++) {
                __m512 dw = load_f16x16(t[g] + mn_at + 128), dmin = load_f16x16(t[g] + mn_at + 160);
                for (int r = 0; r < R; r++) {
                    __m512 dx = _mm512_set1_ps(x->d[r][b]);
                    __m512 mscale = _mm512_castsi512_ps(_mm512_xor_si512(
                        _mm512_castps_si512(_mm512_mul_ps(dmin, dx)), _mm512_set1_epi32(INT32_MIN)));
                    acc[r][g] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(isum[r][g]), acc[r][g]);
                    acc[r][g] = _mm512_fmadd_ps(mscale, _mm512_cvtepi32_ps(msum[r][g]), acc[r][g]);
                }
            }
        } else if (dtype == KVD_DTYPE_Q6_K) {
            const __m512i top2 = _mm512_set1_epi8(0x30);
            for (int sub = 0; sub < 16; sub++) {
                for (int g = 0; g < G; g++) {
                    __m512i hv = _mm512_loadu_si512(t[g] + 2048 + 64 * sub);
                    __m512i v0 = _mm512_loadu_si512(t[g] + 128 * sub);
                    __m512i v1 = _mm512_loadu_si512(t[g] + 128 * sub + 64);
#if defined(KVD_QVEC_GFNI)
                    (void)top2; /* the top bits pair q of each byte to bits 4-5 */
                    __m512i w0 = nib_lo_or(v0, bit_gather(hv, BIT_TO(4, 0) | BIT_TO(5, 1)));
                    __m512i w1 = _mm512_or_si512(nib_hi(v0), bit_gather(hv, BIT_TO(4, 2) | BIT_TO(5, 3)));
                    __m512i w2 = nib_lo_or(v1, bit_gather(hv, BIT_TO(4, 4) | BIT_TO(5, 5)));
                    __m512i w3 = _mm512_or_si512(nib_hi(v1), bit_gather(hv, BIT_TO(4, 6) | BIT_TO(5, 7)));
#else
                    __m512i w0 = _mm512_or_si512(nib_lo(v0), _mm512_and_si512(_mm512_slli_epi16(hv, 4), top2));
                    __m512i w1 = _mm512_or_si512(nib_hi(v0), _mm512_and_si512(_mm512_slli_epi16(hv, 2), top2));
                    __m512i w2 = _mm512_or_si512(nib_lo(v1), _mm512_and_si512(hv, top2));
                    __m512i w3 = _mm512_or_si512(nib_hi(v1), _mm512_and_si512(_mm512_srli_epi16(hv, 2), top2));
#endif
                    __m512i scv = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(t[g] + 3072 + 16 * sub)));
                    for (int r = 0; r < R; r++) {
                        const int8_t *xr = x->q[r] + xb + 16 * sub;
                        __m512i dot = _mm512_set1_epi32(-32 * x->sum[r][xb / 16 + sub]);
                        dot = _mm512_dpbusd_epi32(dot, w0, bcast4(xr));
                        dot = _mm512_dpbusd_epi32(dot, w1, bcast4(xr + 4));
                        dot = _mm512_dpbusd_epi32(dot, w2, bcast4(xr + 8));
                        dot = _mm512_dpbusd_epi32(dot, w3, bcast4(xr + 12));
                        isum[r][g] = _mm512_add_epi32(isum[r][g], _mm512_mullo_epi32(dot, scv));
                    }
                }
            }
            for (int g = 0; g < G; g++) {
                __m512 dw = load_f16x16(t[g] + 3328);
                for (int r = 0; r < R; r++)
                    acc[r][g] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(x->d[r][b])),
                                                _mm512_cvtepi32_ps(isum[r][g]), acc[r][g]);
            }
        } else { /* Q8_K */
            for (int r = 0; r < R; r++) {
                int32_t xs = 0;
                for (int gi = 0; gi < 16; gi++)
                    xs += x->sum[r][xb / 16 + gi];
                for (int g = 0; g < G; g++)
                    isum[r][g] = _mm512_set1_epi32(-128 * xs);
            }
            for (int j = 0; j < 64; j++) {
                __m512i wv[GB];
                for (int g = 0; g < G; g++)
                    wv[g] = _mm512_loadu_si512(t[g] + 64 * j);
                for (int r = 0; r < R; r++) {
                    __m512i bx = bcast4(x->q[r] + xb + 4 * j);
                    for (int g = 0; g < G; g++)
                        isum[r][g] = _mm512_dpbusd_epi32(isum[r][g], wv[g], bx);
                }
            }
            for (int g = 0; g < G; g++) {
                __m512 dw = _mm512_loadu_ps((const float *)(t[g] + 4096));
                for (int r = 0; r < R; r++)
                    acc[r][g] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(x->d[r][b])),
                                                _mm512_cvtepi32_ps(isum[r][g]), acc[r][g]);
            }
        }
    }
    acc_store(acc, R, G, out, ldo, col0, mask);
}

/* sum[g] = the sum of codes 16g..16g+15 (k a multiple of 32), 64 codes a vector: biased
 * to unsigned bytes, VPSADBW adds each 8, two adjacent sums make 16 (exact integers, as
 * a horizontal add per 16 would give, at a third of the instructions). */
static void code_sums(const int8_t *q, int k, int32_t *sum)
{
    const __m512i to_unsigned = _mm512_set1_epi8((char)0x80);
    const __m512i pick = _mm512_set_epi64(0, 0, 0, 0, 6, 4, 2, 0);
    int g = 0;
    for (; g + 4 <= k / 16; g += 4) {
        __m512i v = _mm512_xor_si512(_mm512_loadu_si512(q + 16 * g), to_unsigned);
        __m512i s8 = _mm512_sad_epu8(v, _mm512_setzero_si512());
        __m512i s16 = _mm512_add_epi64(s8, _mm512_bsrli_epi128(s8, 8));
        __m256i four = _mm512_cvtepi64_epi32(_mm512_permutexvar_epi64(pick, s16));
        _mm_storeu_si128((__m128i *)(sum + g),
                         _mm_sub_epi32(_mm256_castsi256_si128(four), _mm_set1_epi32(16 * 128)));
    }
    for (; g < k / 16; g++) {
        int32_t t = 0;
        for (int i = 0; i < 16; i++)
            t += q[16 * g + i];
        sum[g] = t;
    }
}

/* kvd_qact_quantize's rounding, 16 lanes at a time (the same operations, so the same
 * codes and scales): Q8_0 blocks take amax/127, x*(1/d) rounded half away from zero and
 * the scale rounded to fp16; Q8_K blocks take -127/(the first value of largest
 * magnitude), codes rounded to nearest even by ggml's 1.5*2^23 addition, clamped to 127. */
static void act_quantize(kvd_dtype dtype, const float *x, int k, kvd_qact *out)
{
    const __m512 sign_bit = _mm512_set1_ps(-0.0f);
    if (kvd_qtype_is_k(dtype)) {
        for (int b = 0; b < k / 256; b++) {
            const float *xb = x + 256 * b;
            __m512 amaxv = _mm512_setzero_ps();
            for (int v = 0; v < 16; v++)
                amaxv = _mm512_max_ps(amaxv, _mm512_abs_ps(_mm512_loadu_ps(xb + 16 * v)));
            float amax = _mm512_reduce_max_ps(amaxv);
            int8_t *q = out->q + 256 * b;
            if (amax == 0) {
                out->d[b] = 0;
                memset(q, 0, 256);
                for (int g = 0; g < 16; g++)
                    out->sum[16 * b + g] = 0;
                continue;
            }
            float max = 0;
            for (int v = 0; v < 16; v++) {
                __mmask16 m = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(xb + 16 * v)),
                                                 _mm512_set1_ps(amax), _CMP_EQ_OQ);
                if (m) {
                    max = xb[16 * v + __builtin_ctz(m)];
                    break;
                }
            }
            float iscale = -127.f / max;
            const __m512i magic_mask = _mm512_set1_epi32(0x007fffff);
            for (int v = 0; v < 16; v++) {
                __m512 shifted = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(iscale), _mm512_loadu_ps(xb + 16 * v)),
                                               _mm512_set1_ps(12582912.f));
                __m512i qi = _mm512_sub_epi32(_mm512_and_si512(_mm512_castps_si512(shifted), magic_mask),
                                              _mm512_set1_epi32(0x00400000));
                qi = _mm512_min_epi32(qi, _mm512_set1_epi32(127));
                _mm_storeu_si128((__m128i *)(q + 16 * v), _mm512_cvtepi32_epi8(qi));
            }
            out->d[b] = 1 / iscale;
        }
        code_sums(out->q, k, out->sum);
        return;
    }
    for (int b = 0; b < k / 32; b++) {
        __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0),
                                                        _mm512_abs_ps(v1)));
        float d = amax / 127;
        float id = d != 0 ? 1.0f / d : 0.0f;
        out->d[b] = kvd_f16_to_f32(kvd_f32_to_f16(d));
        __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
        for (int h = 0; h < 2; h++) {
            __m512 y = _mm512_mul_ps(h ? v1 : v0, _mm512_set1_ps(id));
            __m512 t = _mm512_roundscale_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(y, t)), half, _CMP_GE_OQ);
            /* halves and above go away from zero: t + copysign(1, y) */
            t = _mm512_mask_add_ps(t, up, t, _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_castps_si512(one), _mm512_and_si512(_mm512_castps_si512(y), _mm512_castps_si512(sign_bit)))));
            __m512i qi = _mm512_cvtps_epi32(t);
            _mm_storeu_si128((__m128i *)(out->q + 32 * b + 16 * h), _mm512_cvtepi32_epi8(qi));
        }
    }
    code_sums(out->q, k, out->sum);
}

/* The kernels instantiated per type and shape (constant arguments unroll them). */
#define K32_CASES(DT, NAME)                                                                    \
    static void NAME(int R, int G, float *out, int ldo, const rows_view *x,                    \
                     const uint8_t *tiles[GB], size_t tile_bytes, const float *bias,            \
                     bool accumulate, int col0, const __mmask16 mask[GB], const kspan *sp)     \
    {                                                                                          \
        if (G == 4) {                                                                          \
            kernel32(DT, 1, 4, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); \
        } else if (G == 2) {                                                                   \
            switch (R) {                                                                       \
            case 1: kernel32(DT, 1, 2, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            case 2: kernel32(DT, 2, 2, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            case 3: kernel32(DT, 3, 2, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            case 4: kernel32(DT, 4, 2, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            case 5: kernel32(DT, 5, 2, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            default: kernel32(DT, 6, 2, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            }                                                                                  \
        } else {                                                                               \
            switch (R) {                                                                       \
            case 1: kernel32(DT, 1, 1, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            case 2: kernel32(DT, 2, 1, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            case 3: kernel32(DT, 3, 1, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            case 4: kernel32(DT, 4, 1, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            case 5: kernel32(DT, 5, 1, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            default: kernel32(DT, 6, 1, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            }                                                                                  \
        }                                                                                      \
    }
K32_CASES(KVD_DTYPE_Q8_0, kernel_q8_0)
K32_CASES(KVD_DTYPE_Q4_0, kernel_q4_0)
K32_CASES(KVD_DTYPE_Q5_0, kernel_q5_0)

#define K256_CASES(DT, NAME)                                                                   \
    static void NAME(int R, int G, float *out, int ldo, const rows_view *x,                    \
                     const uint8_t *tiles[GB], size_t tile_bytes, const float *bias,            \
                     bool accumulate, int col0, const __mmask16 mask[GB], const kspan *sp)     \
    {                                                                                          \
        if (G == 4) {                                                                          \
            kernel256(DT, 1, 4, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); \
        } else if (G == 2) {                                                                   \
            switch (R) {                                                                       \
            case 1: kernel256(DT, 1, 2, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            case 2: kernel256(DT, 2, 2, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            default: kernel256(DT, 3, 2, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            }                                                                                  \
        } else {                                                                               \
            switch (R) {                                                                       \
            case 1: kernel256(DT, 1, 1, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            case 2: kernel256(DT, 2, 1, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            case 3: kernel256(DT, 3, 1, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            case 4: kernel256(DT, 4, 1, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            case 5: kernel256(DT, 5, 1, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            default: kernel256(DT, 6, 1, out, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break; \
            }                                                                                  \
        }                                                                                      \
    }
K256_CASES(KVD_DTYPE_Q4_K, kernel_q4_k)
K256_CASES(KVD_DTYPE_Q5_K, kernel_q5_k)
K256_CASES(KVD_DTYPE_Q6_K, kernel_q6_k)
K256_CASES(KVD_DTYPE_Q8_K, kernel_q8_k)

static __mmask16 group_mask(int g, int n_begin, int n_end)
{
    int c0 = g * GROUP < n_begin ? n_begin - g * GROUP : 0;
    int c1 = (g + 1) * GROUP > n_end ? n_end - g * GROUP : GROUP;
    return (__mmask16)(((1u << (c1 - c0)) - 1u) << c0);
}

/* Groups [g, g + G) of w as a kernel takes them (column masks, weight streams). */
typedef struct kgroups {
    __mmask16 mask[GB];
    const uint8_t *tiles[GB];
    size_t tile_bytes;
    int col0, G;
} kgroups;

static kgroups groups_of(const kvd_matrix *w, int n_begin, int n_end, int g, int G)
{
    kgroups c = {.tile_bytes = kvd_qtile_bytes(w->dtype), .col0 = g * GROUP, .G = G};
    size_t group_bytes = (size_t)(w->cols / kvd_dtype_block_values(w->dtype)) * c.tile_bytes;
    for (int i = 0; i < GB; i++) {
        c.mask[i] = i < G ? group_mask(g + i, n_begin, n_end) : 0;
        c.tiles[i] = (const uint8_t *)w->data + (size_t)(g + (i < G ? i : 0)) * group_bytes;
    }
    return c;
}

/* Rows [r0, r0 + R) of the activations as a kernel takes them. */
static rows_view rows_of(const act_rows *a, int r0, int R, int k)
{
    rows_view x;
    for (int r = 0; r < R; r++) {
        kvd_qact qa = act_row(a, r0 + r, k);
        x.q[r] = qa.q;
        x.d[r] = qa.d;
        x.sum[r] = qa.sum;
    }
    return x;
}

/* R rows x the groups over the span; out at the rows' first. */
static void kernel_run(kvd_dtype dtype, kgroups *c, float *o, int ldo, const rows_view *x, int R,
                       const float *bias, bool accumulate, const kspan *sp)
{
    int G = c->G, col0 = c->col0;
    size_t tile_bytes = c->tile_bytes;
    const uint8_t **tiles = c->tiles;
    const __mmask16 *mask = c->mask;
    switch (dtype) {
    case KVD_DTYPE_Q8_0: kernel_q8_0(R, G, o, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    case KVD_DTYPE_Q4_0: kernel_q4_0(R, G, o, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    case KVD_DTYPE_Q5_0: kernel_q5_0(R, G, o, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    case KVD_DTYPE_Q4_K: kernel_q4_k(R, G, o, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    case KVD_DTYPE_Q5_K: kernel_q5_k(R, G, o, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    case KVD_DTYPE_Q6_K: kernel_q6_k(R, G, o, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    case KVD_DTYPE_Q8_K: kernel_q8_k(R, G, o, ldo, x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    default: break;
    }
}

/* Rows [r0, r0 + R) against groups [g, g + G) over the span (tile_product's calls). It
 * keeps its own set-up and dispatch rather than calling groups_of / rows_of / kernel_run:
 * built that way, bench_qmatmul --threads 1 --cpu-time --rows 512 --recipes q8_0 --layers 2
 * took 71.7-74.2 ms a step against main's 61.0-66.8 (alternated, 21:04-21:07 UTC), a cause
 * not found in the time; this way 61.3-69.2 against 62.3-76.5. */
static void run_kernel(float *out, int ldo, const act_rows *a, int r0, int R, const kvd_matrix *w,
                       const float *bias, bool accumulate, int n_begin, int n_end, int g, int G,
                       const kspan *sp)
{
    kvd_dtype dtype = w->dtype;
    int k = w->cols;
    size_t tile_bytes = kvd_qtile_bytes(dtype);
    size_t group_bytes = (size_t)(k / kvd_dtype_block_values(dtype)) * tile_bytes;
    __mmask16 mask[GB];
    const uint8_t *tiles[GB];
    for (int i = 0; i < GB; i++) {
        mask[i] = i < G ? group_mask(g + i, n_begin, n_end) : 0;
        tiles[i] = (const uint8_t *)w->data + (size_t)(g + (i < G ? i : 0)) * group_bytes;
    }
    rows_view x;
    for (int r = 0; r < R; r++) {
        kvd_qact qa = act_row(a, r0 + r, k);
        x.q[r] = qa.q;
        x.d[r] = qa.d;
        x.sum[r] = qa.sum;
    }
    float *o = out + (size_t)r0 * ldo;
    int col0 = g * GROUP;
    switch (dtype) {
    case KVD_DTYPE_Q8_0: kernel_q8_0(R, G, o, ldo, &x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    case KVD_DTYPE_Q4_0: kernel_q4_0(R, G, o, ldo, &x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    case KVD_DTYPE_Q5_0: kernel_q5_0(R, G, o, ldo, &x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    case KVD_DTYPE_Q4_K: kernel_q4_k(R, G, o, ldo, &x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    case KVD_DTYPE_Q5_K: kernel_q5_k(R, G, o, ldo, &x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    case KVD_DTYPE_Q6_K: kernel_q6_k(R, G, o, ldo, &x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    case KVD_DTYPE_Q8_K: kernel_q8_k(R, G, o, ldo, &x, tiles, tile_bytes, bias, accumulate, col0, mask, sp); break;
    default: break;
    }
}

/* Groups a kernel takes at once from group g (g_end: the call's end): one row, 4 groups
 * (more streams, and sums per broadcast); K types take 2 groups only up to 3 rows (their
 * per-sub-block sums fill the registers). */
static int groups_at(kvd_dtype dtype, int rows, int g, int g_end)
{
    return rows == 1 && g + 3 < g_end ? 4 : g + 1 < g_end && (!kvd_qtype_is_k(dtype) || rows <= 3) ? 2 : 1;
}

/* Up to this many rows (decode), the groups run their weights from memory once over all
 * of k, each row tile against them while they are in L1/L2. */
#define DECODE_ROWS 4
/* Up to this many rows (a batched decode), few_rows_product runs the 32-value types. */
#define FEW_ROWS 16
/* Blocks per slice of a batched decode's group pair (few_rows_product). */
#define FEW_SLICE_BLOCKS 8
/* Batched products: the weights of a group pair that one slice of k holds, so that they
 * stay in L2 while every row tile runs against them (k up to ~7700 for Q8_0: one slice). */
#define SLICE_PAIR_BYTES ((size_t)256 * 1024)
/* Batched products: activation bytes (codes) of a pass's rows over a slice, which stay in
 * L2 beside the weights (384 KB measured slower on the 0.5B shape: 7 passes of 80 rows
 * over its down projection instead of 10 of 53). */
#define PASS_ACT_BYTES ((size_t)256 * 1024)

/* A batched decode's rows (DECODE_ROWS < rows <= FEW_ROWS) against columns [n_begin,
 * n_end): each group pair runs in slices of FEW_SLICE_BLOCKS blocks, every row tile
 * against a slice while it is in L1, partial sums parked in out (exact floats) between
 * slices. While a slice runs, its tiles prefetch the next slice (the pair's, or the next
 * pair's first) into L2, each tile its share block by block: the weights then come from
 * memory at an even pace over all the arithmetic instead of in bursts under the first
 * tile (whole-k pairs: the first tile's prefetches, a few blocks ahead, came too late
 * and the others found memory idle). Each element takes its blocks in k order: the
 * same bits as tile_product. */
static void few_rows_product(float *out, int ldo, int rows, const act_rows *a,
                             const kvd_matrix *w, const float *bias, bool accumulate,
                             int n_begin, int n_end)
{
    kvd_dtype dtype = w->dtype;
    int blocks = w->cols / kvd_dtype_block_values(dtype);
    size_t tile_bytes = kvd_qtile_bytes(dtype);
    size_t group_bytes = (size_t)blocks * tile_bytes;
    int g_begin = n_begin / GROUP, g_end = (n_end + GROUP - 1) / GROUP;
    int tiles = (rows + RB - 1) / RB, sb = FEW_SLICE_BLOCKS;
    /* each call's set-up done once per tile and group pair, not per slice (it was ~8% of
     * a 16-row product in cache) */
    rows_view x[(FEW_ROWS + RB - 1) / RB];
    for (int t = 0; t < tiles; t++)
        x[t] = rows_of(a, t * RB, rows - t * RB < RB ? rows - t * RB : RB, w->cols);
    for (int g = g_begin; g < g_end;) {
        int G = groups_at(dtype, rows, g, g_end);
        kgroups c = groups_of(w, n_begin, n_end, g, G);
        for (int b0 = 0; b0 < blocks; b0 += sb) {
            int b1 = blocks - b0 < sb ? blocks : b0 + sb;
            /* what runs next: this pair's next slice, or the next pair's first */
            int ng = b1 < blocks ? g : g + G, nb0 = b1 < blocks ? b1 : 0;
            int nG = ng >= g_end ? 0 : ng == g ? G : groups_at(dtype, rows, ng, g_end);
            int nb1 = blocks - nb0 < sb ? blocks : nb0 + sb;
            size_t bytes = (size_t)(nb1 - nb0) * tile_bytes; /* per group */
            size_t share = (bytes / (size_t)tiles + 63) & ~(size_t)63;
            for (int t = 0; t < tiles; t++) {
                int r0 = t * RB, r1 = rows - r0 < RB ? rows : r0 + RB;
                kspan sp = {.b0 = b0, .b1 = b1, .from_out = b0 > 0,
                            .stream = t == 0 && b0 == 0 && g == g_begin};
                size_t mine = nG > 0 && bytes > (size_t)t * share ? bytes - (size_t)t * share : 0;
                mine = mine < share ? mine : share;
                if (mine > 0) {
                    for (int i = 0; i < nG; i++)
                        sp.next[i] = (const char *)w->data + (size_t)(ng + i) * group_bytes +
                                     (size_t)nb0 * tile_bytes + (size_t)t * share;
                    sp.next_groups = nG;
                    sp.next_per_block = (mine / (size_t)(b1 - b0) + 63) & ~(size_t)63;
                }
                kernel_run(dtype, &c, out + (size_t)r0 * ldo, ldo, &x[t], r1 - r0, bias, accumulate, &sp);
            }
        }
        g += G;
    }
}

/* All rows of the activations against columns [n_begin, n_end): groups in pairs (one
 * row: fours), rows in tiles of up to RB, the first tile of each group pair streaming its
 * weights from memory and the others finding them in L1/L2.
 * Up to DECODE_ROWS rows (decode) a pair runs over all of k at once; up to FEW_ROWS
 * (32-value types) few_rows_product runs them. More rows run in
 * passes of rows whose activations stay in L2, over slices of k whose group pair's
 * weights (SLICE_PAIR_BYTES) stay in L2 too: a long k (the 7B shape's down projection,
 * 18944) would otherwise leave room in L2 for the activations of 13 rows only, and every
 * 13 rows would stream all the weights again (now 3 slices, 41 rows a pass). Partial sums wait in out between
 * slices (exact floats): every element still takes its blocks in k order, so the bits do
 * not depend on the blocking. */
static void tile_product(float *out, int ldo, int rows, const act_rows *a, const kvd_matrix *w,
                         const float *bias, bool accumulate, int n_begin, int n_end)
{
    /* the K types keep whole-k pairs: their 256-input tiles would need other slices, unmeasured */
    if (rows > DECODE_ROWS && rows <= FEW_ROWS && !kvd_qtype_is_k(w->dtype)) {
        few_rows_product(out, ldo, rows, a, w, bias, accumulate, n_begin, n_end);
        return;
    }
    kvd_dtype dtype = w->dtype;
    int k = w->cols, per_block = kvd_dtype_block_values(dtype);
    int blocks = k / per_block;
    size_t tile_bytes = kvd_qtile_bytes(dtype);
    int g_begin = n_begin / GROUP, g_end = (n_end + GROUP - 1) / GROUP;
    /* slices of near-equal whole blocks; passes of pass_rows rows, the last one shorter */
    int slices = 1, pass_rows = rows;
    if (rows > DECODE_ROWS) {
        int slice_max = (int)(SLICE_PAIR_BYTES / (2 * tile_bytes));
        slice_max = slice_max < 1 ? 1 : slice_max;
        slices = (blocks + slice_max - 1) / slice_max;
        int slice = (blocks + slices - 1) / slices;
        pass_rows = (int)(PASS_ACT_BYTES / ((size_t)slice * (size_t)per_block));
        pass_rows = pass_rows < RB ? RB : pass_rows;
    }
    int slice = (blocks + slices - 1) / slices;
    for (int p0 = 0; p0 < rows; p0 += pass_rows) {
        int p1 = rows - p0 < pass_rows ? rows : p0 + pass_rows;
        for (int b0 = 0; b0 < blocks; b0 += slice) {
            int b1 = blocks - b0 < slice ? blocks : b0 + slice;
            for (int g = g_begin; g < g_end;) {
                int G = groups_at(dtype, rows, g, g_end);
                for (int r0 = p0; r0 < p1; r0 += RB) {
                    int r1 = p1 - r0 < RB ? p1 : r0 + RB;
                    /* the pass's first rows bring the pair's weights from memory; the
                     * others find them in L1/L2 */
                    kspan sp = {.b0 = b0, .b1 = b1, .from_out = b0 > 0, .stream = r0 == p0};
                    run_kernel(out, ldo, a, r0, r1 - r0, w, bias, accumulate, n_begin, n_end, g, G,
                               &sp);
                }
                g += G;
            }
        }
    }
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
    act_rows view = {a.q, a.d, a.sum};
    for (int r0 = 0; r0 < m; r0 += tile_rows) {
        int rows = m - r0 < tile_rows ? m - r0 : tile_rows;
        for (int r = 0; r < rows; r++) {
            kvd_qact qa = act_row(&view, r, k);
            act_quantize(w->dtype, x + (size_t)(r0 + r) * ldx, k, &qa);
        }
        tile_product(out + (size_t)r0 * ldo, ldo, rows, &view, w, bias, accumulate, n_begin, n_end);
    }
}

void QSFX(kvd_qinput_quantize)(kvd_qinput *in, kvd_dtype dtype, const float *x, int ldx, int r0,
                               int r1, int c0, int c1)
{
    /* columns [c0, c1) are whole activation blocks (the caller checked) */
    for (int r = r0; r < r1; r++) {
        kvd_qact qa = {in->q + (size_t)r * in->k + c0, in->d + (size_t)r * (in->k / 32) + c0 / 32,
                       in->sum + (size_t)r * (in->k / 16) + c0 / 16};
        act_quantize(dtype, x + (size_t)r * ldx + c0, c1 - c0, &qa);
    }
}

void QSFX(kvd_qmatmul_cols_input)(float *out, int ldo, const kvd_qinput *x, int m,
                                  const kvd_matrix *w, const float *bias, bool accumulate,
                                  int n_begin, int n_end)
{
    if (n_begin >= n_end || m <= 0)
        return;
    int k = w->cols;
#if defined(KVD_QVEC_VNNI)
    /* tile_product makes its own passes */
    int tile_rows = m;
#else
    /* rows per pass over the weights: their activations (k bytes a row) stay in L2 */
    int tile_rows = (int)((size_t)256 * 1024 / (size_t)k);
    tile_rows = tile_rows < 1 ? 1 : tile_rows;
#endif
    for (int r0 = 0; r0 < m; r0 += tile_rows) {
        int rows = m - r0 < tile_rows ? m - r0 : tile_rows;
        act_rows view = {x->q + (size_t)r0 * k, x->d + (size_t)r0 * (k / 32),
                         x->sum + (size_t)r0 * (k / 16)};
        tile_product(out + (size_t)r0 * ldo, ldo, rows, &view, w, bias, accumulate, n_begin, n_end);
    }
}
