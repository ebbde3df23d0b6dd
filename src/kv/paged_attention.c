/* paged_attention.c - causal GQA attention through block tables, with an online softmax.
 *
 * Compiled twice like the other kernels (kvd_vec16.h): the _avx512 and _scalar builds
 * compute bit-identical results; the scalar build also holds the public dispatchers.
 *
 * A work item is (sequence, kv head, up to ROW_CHUNK query rows). It walks the keys in
 * logical tiles of KVD_ATTENTION_TILE positions: the tile's K and V rows are gathered
 * through the block table and widened to float once, then every query head of the
 * group and every row of the chunk folds the tile into its running softmax state
 * (max m, sum l, output acc). Tiles are logical, never physical blocks, so the
 * sequence of operations for a query is fixed by its position alone: block size,
 * prefix-cache sharing and batching cannot change a bit of the output.
 *
 * Per query head and tile of nk visible keys:
 *   s_j = hsum(q . k_j) * scale;  m' = max(m, max_j s_j);  p_j = exp(s_j - m')
 *   c = exp(m - m') (0 on the first tile);  l = l*c + hsum(sum of p vectors)
 *   acc = acc*c, then acc += p_j v_j for j in order;  at the end out = acc / l.
 * With 64-value heads on float pages an item folds its query states four at a time
 * (fold_tile_states): the same operations per state, sharing K/V loads and overlapping
 * the states' dependency chains, which one state alone leaves waiting on latencies.
 */
#include "kvd_vec16.h"

#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kvd/kvd_attention.h"

#define TILE KVD_ATTENTION_TILE
#define ROW_CHUNK 16

static int round16(int n) { return (n + 15) & ~15; }

/* n elements of dtype at src widened to floats at dst. */
V16_INLINE void widen_row(float *dst, const void *src, int dtype, int n)
{
    int i = 0;
    for (; i + 16 <= n; i += 16)
        v16_store(dst + i, v16_load_any(src, dtype, (size_t)i));
    if (i < n)
        v16_store_n(dst + i, v16_load_any_n(src, dtype, (size_t)i, n - i), n - i);
}

/* x[n] as an int8 row: q at dst, its f16 scale returned (kvd_attention.h). The row's
 * max |x| is order-free, and each q_i is one division and one rounding: every build
 * writes the same bytes. */
V16_INLINE uint16_t quantize_row_i8(int8_t *dst, const float *x, int n)
{
    v16 amax = v16_zero();
    for (int i = 0; i < n; i += 16) {
        int m = n - i < 16 ? n - i : 16;
        v16 v = v16_load_n(x + i, m);
        amax = v16_max(amax, v16_max(v, v16_sub(v16_zero(), v)));
    }
    uint16_t scale_bits = kvd_f32_to_f16(v16_hmax(amax) / 127.0f);
    float d = kvd_f16_to_f32(scale_bits);
    for (int i = 0; i < n; i += 16) {
        int m = n - i < 16 ? n - i : 16;
        float q[16];
        v16 r = d > 0.0f ? v16_round(v16_div(v16_load_n(x + i, m), v16_set1(d))) : v16_zero();
        v16_store(q, v16_min(v16_max(r, v16_set1(-127.0f)), v16_set1(127.0f)));
        for (int j = 0; j < m; j++)
            dst[i + j] = (int8_t)q[j];
    }
    return scale_bits;
}

/* ---- fp8 (e4m3) pages: the code of a float, and the code widened back ---- */

/* The e4m3 nearest to x (ties to even mantissa), saturated to +-448; NaN gives 0. Plain
 * integer work on x's bits, so every build writes the same byte. */
static uint8_t f32_to_e4m3(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) /* NaN */
        return 0;
    if (a >= 0x43E00000u) /* >= 448 (and infinity): the largest code */
        return sign | 0x7E;
    if (a < 0x3C800000u) {
        /* below 2^-6, the subnormal range: steps of 2^-9. a * 2^9 < 8 is exact, and
         * its rounding to an integer (nearest even) is the code; 8 is 2^-6, code 0x08. */
        float f;
        memcpy(&f, &a, sizeof f);
        float scaled = f * 512.0f;
        uint32_t m = (uint32_t)scaled;
        float rest = scaled - (float)m;
        if (rest > 0.5f || (rest == 0.5f && (m & 1)))
            m++;
        return sign | (uint8_t)m;
    }
    int exponent = (int)(a >> 23) - 127; /* -6 .. 8 */
    uint32_t mant = a & 0x7FFFFFu;
    uint32_t m = mant >> 20, rest = mant & 0xFFFFFu;
    if (rest > 0x80000u || (rest == 0x80000u && (m & 1)))
        m++;
    if (m == 8) {
        m = 0;
        exponent++;
    }
    if (exponent > 8 || (exponent == 8 && m == 7)) /* past 448 after rounding: saturate */
        return sign | 0x7E;
    return sign | (uint8_t)((uint32_t)(exponent + 7) << 3 | m);
}

/* x[n] as an fp8 row: e4m3 codes at dst, its f16 scale returned (kvd_attention.h). */
static uint16_t quantize_row_f8(uint8_t *dst, const float *x, int n)
{
    float amax = 0.0f;
    for (int i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
    uint16_t scale_bits = kvd_f32_to_f16(amax / 448.0f);
    float d = kvd_f16_to_f32(scale_bits);
    for (int i = 0; i < n; i++)
        dst[i] = d > 0.0f ? f32_to_e4m3(x[i] / d) : 0;
    return scale_bits;
}

/* n e4m3 codes widened to floats, each exactly its value / 2^8: the code's sign and
 * its 7 other bits shifted under an f16's sign and exponent/mantissa (bias 15 instead
 * of 7) make that f16, normal or subnormal alike. */
V16_INLINE void widen_row_f8(float *dst, const uint8_t *src, int n)
{
    for (int i = 0; i < n; i += 16) {
        int m = n - i < 16 ? n - i : 16;
#if defined(KVD_VEC_AVX512)
        __m256i w = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8((__mmask16)((1u << m) - 1u), src + i));
        __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8),
                                    _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7F)), 7));
        v16_store_n(dst + i, _mm512_cvtph_ps(h), m);
#else
        uint16_t h[16];
        for (int j = 0; j < m; j++)
            h[j] = (uint16_t)((src[i + j] & 0x80u) << 8 | (src[i + j] & 0x7Fu) << 7);
        v16_store_n(dst + i, v16_load_f16_n(h, m), m);
#endif
    }
}

V16_INLINE float dot(const float *a, const float *b, int n)
{
    v16 acc = v16_zero();
    int i = 0;
    for (; i + 16 <= n; i += 16)
        acc = v16_fma(v16_load(a + i), v16_load(b + i), acc);
    if (i < n)
        acc = v16_fma(v16_load_n(a + i, n - i), v16_load_n(b + i, n - i), acc);
    return v16_hsum(acc);
}

static void fold_softmax_v(float tile_max, float *scores, const float *vscale, int nk, int hd,
                           int hd_pad, const float *vt, float *m, float *l, float *acc);

/* s_j = dot_j * scale (times kscale_j when not NULL) in place for keys [0, nk); returns
 * their max (order-free), 16 keys at a time. */
V16_INLINE float scale_scores(float *scores, const float *kscale, float scale, int nk)
{
    v16 sv = v16_set1(scale), mv = v16_set1(-INFINITY);
    for (int j = 0; j < nk; j += 16) {
        int n = nk - j < 16 ? nk - j : 16;
        v16 s = v16_mul(v16_load_n(scores + j, n), kscale ? v16_mul(v16_load_n(kscale + j, n), sv) : sv);
        v16_store_n(scores + j, s, n);
        mv = v16_max(mv, v16_load_n_or(scores + j, n, -INFINITY));
    }
    return v16_hmax(mv);
}

/* a[i] += p * v[16i .. 16i+15] for the four vectors of a 64-value row */
V16_INLINE void fma_row64(v16 a[4], float p, const float *v)
{
    v16 pv = v16_set1(p);
    for (int i = 0; i < 4; i++)
        a[i] = v16_fma(pv, v16_load(v + 16 * i), a[i]);
}

/* Folds keys [0, nk) of the tile (kt, vt: rows of hd_pad floats) into one query
 * head's state. kscale and vscale (fp8 pages), when not NULL, are each key's and value's
 * row scale: s_j = dot * (kscale_j * scale), and vscale as in fold_softmax_v. */
static void fold_tile(const float *qh, int hd, int hd_pad, float scale, const float *kt,
                      const float *vt, const float *kscale, const float *vscale, int nk,
                      float *scores, float *m, float *l, float *acc)
{
    int j = 0;
    for (; j + 4 <= nk; j += 4) {
        /* four keys at once: the same per-key operations as dot(), reduced together */
        const float *k0 = kt + (size_t)j * hd_pad;
        v16 a0 = v16_zero(), a1 = v16_zero(), a2 = v16_zero(), a3 = v16_zero();
        int d = 0;
        for (; d + 16 <= hd; d += 16) {
            v16 qv = v16_load(qh + d);
            a0 = v16_fma(qv, v16_load(k0 + d), a0);
            a1 = v16_fma(qv, v16_load(k0 + hd_pad + d), a1);
            a2 = v16_fma(qv, v16_load(k0 + 2 * (size_t)hd_pad + d), a2);
            a3 = v16_fma(qv, v16_load(k0 + 3 * (size_t)hd_pad + d), a3);
        }
        if (d < hd) {
            int n = hd - d;
            v16 qv = v16_load_n(qh + d, n);
            a0 = v16_fma(qv, v16_load_n(k0 + d, n), a0);
            a1 = v16_fma(qv, v16_load_n(k0 + hd_pad + d, n), a1);
            a2 = v16_fma(qv, v16_load_n(k0 + 2 * (size_t)hd_pad + d, n), a2);
            a3 = v16_fma(qv, v16_load_n(k0 + 3 * (size_t)hd_pad + d, n), a3);
        }
        v16_hsum4(a0, a1, a2, a3, scores + j);
    }
    for (; j < nk; j++)
        scores[j] = dot(qh, kt + (size_t)j * hd_pad, hd);
    fold_softmax_v(scale_scores(scores, kscale, scale, nk), scores, vscale, nk, hd, hd_pad, vt, m,
                   l, acc);
}

/* The softmax half of a tile: scores[0, nk) hold s_j and tile_max their max. Turns them
 * into p_j = exp(s_j - m') (times vscale_j when not NULL, after they are summed into l),
 * updates m and l, and returns c = exp(m - m'), by which acc is to be scaled. */
V16_INLINE float softmax_weights(float tile_max, float *scores, const float *vscale, int nk,
                                 float *m, float *l)
{
    float m_old = *m;
    float m_new = m_old > tile_max ? m_old : tile_max;
    v16 psum = v16_zero();
    for (int j = 0; j < nk; j += 16) {
        int n = nk - j < 16 ? nk - j : 16;
        v16 p = v16_exp(v16_sub(v16_load_n(scores + j, n), v16_set1(m_new)));
        v16_store_n(scores + j, p, n);
        psum = v16_add(psum, v16_load_n(scores + j, n));
        if (vscale)
            v16_store_n(scores + j, v16_mul(p, v16_load_n(vscale + j, n)), n);
    }
    float c = m_old == -INFINITY ? 0.0f : v16_lane0(v16_exp(v16_set1(m_old - m_new)));
    *m = m_new;
    *l = *l * c + v16_hsum(psum);
    return c;
}

/* The softmax and V half of a tile: scores[0, nk) hold s_j and tile_max their max.
 * vscale (int8 and fp8 pages), when not NULL, multiplies each p_j after it is summed
 * into l: the V rows are then the unscaled 8-bit values. */
static void fold_softmax_v(float tile_max, float *scores, const float *vscale, int nk, int hd,
                           int hd_pad, const float *vt, float *m, float *l, float *acc)
{
    int j;
    v16 cv = v16_set1(softmax_weights(tile_max, scores, vscale, nk, m, l));
    if (hd == 64) {
        /* Qwen2's head_dim: four independent accumulator chains instead of one at a time
         * (the FMA latency, not the arithmetic, bounded this loop); same operations. int8
         * pages: eight, even keys in a, odd keys in b, added at the end (four still waited
         * on the FMA latency; the float dtypes keep their order and bits). */
        v16 a[4], b[4];
        for (int i = 0; i < 4; i++) {
            a[i] = v16_mul(v16_load(acc + 16 * i), cv);
            b[i] = v16_zero();
        }
        j = 0;
        if (vscale)
            for (; j + 2 <= nk; j += 2) {
                fma_row64(a, scores[j], vt + (size_t)j * hd_pad);
                fma_row64(b, scores[j + 1], vt + (size_t)(j + 1) * hd_pad);
            }
        for (; j < nk; j++)
            fma_row64(a, scores[j], vt + (size_t)j * hd_pad);
        for (int i = 0; i < 4; i++)
            v16_store(acc + 16 * i, vscale ? v16_add(a[i], b[i]) : a[i]);
        return;
    }
    for (int d = 0; d < hd; d += 16) {
        int n = hd - d < 16 ? hd - d : 16;
        v16 a = v16_mul(v16_load_n(acc + d, n), cv);
        for (j = 0; j < nk; j++)
            a = v16_fma(v16_set1(scores[j]), v16_load_n(vt + (size_t)j * hd_pad + d, n), a);
        v16_store_n(acc + d, a, n);
    }
}

/* scale_scores and softmax_weights (no kscale, no vscale) over scores held in registers,
 * s[h] holding keys 16h .. 16h+15 (lanes past nk unused): the same operations, the
 * lanes a stored copy would not hold masked as its reloads would read them. p_j goes to
 * p[0, nk) for the V half; returns c. */
V16_INLINE float softmax_in_registers(v16 s[2], int nk, float scale, float *p, float *m, float *l)
{
    v16 sv = v16_set1(scale), mv = v16_set1(-INFINITY);
    for (int h = 0; 16 * h < nk; h++) {
        int n = nk - 16 * h < 16 ? nk - 16 * h : 16;
        s[h] = v16_first_n(v16_mul(v16_first_n(s[h], n), sv), n);
        mv = v16_max(mv, v16_first_n_or(s[h], n, -INFINITY));
    }
    float m_old = *m, tile_max = v16_hmax(mv);
    float m_new = m_old > tile_max ? m_old : tile_max;
    v16 psum = v16_zero();
    for (int h = 0; 16 * h < nk; h++) {
        int n = nk - 16 * h < 16 ? nk - 16 * h : 16;
        v16 e = v16_exp(v16_sub(s[h], v16_set1(m_new)));
        v16_store(p + 16 * h, e);
        psum = v16_add(psum, v16_first_n(e, n));
    }
    float c = m_old == -INFINITY ? 0.0f : v16_lane0(v16_exp(v16_set1(m_old - m_new)));
    *m = m_new;
    *l = *l * c + v16_hsum(psum);
    return c;
}

/* One query state of a tile: its head's q row, keys visible (nk), softmax state. */
typedef struct fold_state {
    const float *qh;
    int nk;
    float *m, *l, *acc;
} fold_state;

/* Query states a tile folds together (fold_tile_states). */
#define FOLD_STATES 4

/* fold_tile for S (2 or 4) states of 64-value heads over the same tile (float pages),
 * each with exactly the operations fold_tile runs for it alone: they share every K and V
 * load, run 4S independent FMA chains instead of four (one state's chains wait on the
 * FMA latency, and so does its softmax), and hold their scores in registers. Keys past a
 * state's nk that its pair partner sees are dotted for both (a tile's K rows are there
 * up to TILE) and never used by the first. */
V16_INLINE void fold_tile_states(const fold_state *st, int S, int hd_pad, float scale,
                                 const float *kt, const float *vt)
{
    _Static_assert(TILE == 32, "scores of a tile in two vectors");
    float p[FOLD_STATES][TILE] __attribute__((aligned(64)));
    v16 sc[FOLD_STATES][2];
    for (int s0 = 0; s0 < S; s0 += 2) {
        const fold_state *x = &st[s0], *y = &st[s0 + 1];
        int nk = x->nk > y->nk ? x->nk : y->nk;
        v16 q0[4], q1[4];
        for (int i = 0; i < 4; i++) {
            q0[i] = v16_load(x->qh + 16 * i);
            q1[i] = v16_load(y->qh + 16 * i);
        }
        /* as fold_tile's four keys at a time (whose sums equal dot()'s for the rest) */
        sc[s0][0] = sc[s0][1] = sc[s0 + 1][0] = sc[s0 + 1][1] = v16_zero();
        for (int j = 0; j < nk; j += 4) {
            const float *k0 = kt + (size_t)j * hd_pad;
            v16 a[4], b[4];
            for (int key = 0; key < 4; key++)
                a[key] = b[key] = v16_zero();
            for (int i = 0; i < 4; i++) {
                for (int key = 0; key < 4; key++) {
                    v16 kv = v16_load(k0 + (size_t)key * hd_pad + 16 * i);
                    a[key] = v16_fma(q0[i], kv, a[key]);
                    b[key] = v16_fma(q1[i], kv, b[key]);
                }
            }
            int h = j / 16, q = (j % 16) / 4;
            sc[s0][h] = v16_hsum4_lanes(sc[s0][h], q, a[0], a[1], a[2], a[3]);
            sc[s0 + 1][h] = v16_hsum4_lanes(sc[s0 + 1][h], q, b[0], b[1], b[2], b[3]);
        }
    }
    /* as fold_softmax_v's 64-value path, the states' chains side by side */
    v16 acc[FOLD_STATES][4];
    int both = TILE;
    for (int s = 0; s < S; s++) {
        v16 cv = v16_set1(softmax_in_registers(sc[s], st[s].nk, scale, p[s], st[s].m, st[s].l));
        for (int i = 0; i < 4; i++)
            acc[s][i] = v16_mul(v16_load(st[s].acc + 16 * i), cv);
        both = st[s].nk < both ? st[s].nk : both;
    }
    for (int j = 0; j < both; j++) {
        const float *v = vt + (size_t)j * hd_pad;
        v16 vr[4] = {v16_load(v), v16_load(v + 16), v16_load(v + 32), v16_load(v + 48)};
        for (int s = 0; s < S; s++) {
            v16 pv = v16_set1(p[s][j]);
            for (int i = 0; i < 4; i++)
                acc[s][i] = v16_fma(pv, vr[i], acc[s][i]);
        }
    }
    for (int s = 0; s < S; s++) {
        for (int j = both; j < st[s].nk; j++)
            fma_row64(acc[s], p[s][j], vt + (size_t)j * hd_pad);
        for (int i = 0; i < 4; i++)
            v16_store(st[s].acc + 16 * i, acc[s][i]);
    }
}

static void fold_tile_four(const fold_state *st, int hd_pad, float scale, const float *kt,
                           const float *vt)
{
    fold_tile_states(st, 4, hd_pad, scale, kt, vt);
}

static void fold_tile_two(const fold_state *st, int hd_pad, float scale, const float *kt,
                          const float *vt)
{
    fold_tile_states(st, 2, hd_pad, scale, kt, vt);
}

/* Prefetches the K and V rows of positions [begin, end) of one KV head. */
static void prefetch_rows(const kvd_kv_pool *pool, const int32_t *blocks, int layer, int kv_head,
                          int bs, size_t row_bytes, int begin, int end)
{
    for (int pos = begin; pos < end; pos++) {
        int32_t block = blocks[pos / bs];
        size_t at = ((size_t)kv_head * bs + (size_t)(pos % bs)) * row_bytes;
        const char *k = (const char *)kvd_kv_block_keys(pool, block, layer) + at;
        const char *v = (const char *)kvd_kv_block_values(pool, block, layer) + at;
        for (size_t b = 0; b < row_bytes; b += 64) {
            v16_prefetch(k + b);
            v16_prefetch(v + b);
        }
    }
}

/* Keys of the tile [t0, t0 + nt) that row i of q sees (causal): 0 when it starts later. */
static int visible_keys(const kvd_attention_query *q, int i, int t0, int nt)
{
    int pos = q->first_pos + i;
    if (pos < t0)
        return 0;
    return pos + 1 - t0 < nt ? pos + 1 - t0 : nt;
}

/* out = acc / l for the query heads of kv_head, rows [r0, r1). */
static void write_out(const kvd_attention_query *q, int kv_head, int group, int hd, int hd_pad,
                      int r0, int r1, const float *st_l, const float *st_acc)
{
    for (int i = r0; i < r1; i++) {
        for (int g = 0; g < group; g++) {
            int h = kv_head * group + g;
            int s = (i - r0) * group + g;
            float *out = q->out + (size_t)i * q->out_stride + (size_t)h * hd;
            const float *acc = st_acc + (size_t)s * hd_pad;
            v16 lv = v16_set1(st_l[s]);
            for (int d = 0; d < hd; d += 16) {
                int n = hd - d < 16 ? hd - d : 16;
                v16_store_n(out + d, v16_div(v16_load_n(acc + d, n), lv), n);
            }
        }
    }
}

/* ---- int8 pages ----
 * K: q.k is an exact integer. Each query row's head is quantized once per call like a
 * cache row (quantize_row_i8: f16 scale dq, q8_i = round(q_i / dq)), so
 *   s_j = (float)(sum_i q8_i * k8_i) * (dk_j * (dq * scale))
 * where the sum (|sum| < 2^24, so the conversion is exact) is the same integer in
 * every build: VPDPBUSD over a transposed tile (K bytes + 128 as unsigned, minus
 * 128 * sum q8) in the AVX-512 build, a plain loop in the scalar one.
 * V: the tile's rows are widened to floats unscaled (exact), and each token's scale is
 * folded into its softmax weight, p_j * dv_j: one multiply per token and head. */

/* 64-value chunks of a K row: the unit the transposed tile is built of. */
static int chunks64(int hd) { return (hd + 63) / 64; }

/* scratch for the int8 path, in floats (kvd_attention_scratch_floats takes the max) */
static size_t scratch_floats_i8(int hd, int group)
{
    size_t hd_pad = (size_t)round16(hd), c16 = (size_t)chunks64(hd) * 16;
    size_t states = (size_t)ROW_CHUNK * group;
    return TILE * c16 + TILE * hd_pad + 3 * (size_t)round16(TILE) + 4 * (size_t)round16((int)states) +
           states * hd_pad + states * c16;
}

#if defined(KVD_VEC_AVX512)
/* kt: the K rows of keys [0, n) of the tile as VPDPBUSD wants them: for every group of
 * 16 keys and chunk c, 16 vectors, vector w holding dword w of the chunk (values
 * 4w..4w+3, +128 as unsigned bytes) of the 16 keys, one per lane. Keys past n and
 * values past hd read as 0. */
__attribute__((target("avx512vnni"))) static void pack_k_i8(int32_t *kt, const int8_t *const *krow,
                                                          int n, int hd)
{
    int chunks = chunks64(hd);
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    for (int g = 0; g < n; g += 16) {
        for (int c = 0; c < chunks; c++) {
            int m = hd - c * 64 < 64 ? hd - c * 64 : 64;
            __mmask64 mask = m == 64 ? ~(__mmask64)0 : (((__mmask64)1 << m) - 1);
            __m512i r[16], t[16];
            for (int i = 0; i < 16; i++)
                r[i] = g + i < n ? _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, krow[g + i] + c * 64), bias)
                                 : bias;
            /* 16x16 dword transpose: pairs, then quads within 128-bit lanes, then the
             * 128-bit blocks */
            for (int i = 0; i < 16; i += 2) {
                t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
                t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
            }
            for (int i = 0; i < 16; i += 4) {
                r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
                r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
                r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
                r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
            }
            /* r[4G + k], 128-bit block L: dword 4L + k of rows 4G..4G+3 */
            int32_t *out = kt + ((size_t)(g / 16) * chunks + c) * 256;
            for (int k = 0; k < 4; k++) {
                __m512i a = _mm512_shuffle_i32x4(r[k], r[4 + k], _MM_SHUFFLE(1, 0, 1, 0));
                __m512i b = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], _MM_SHUFFLE(1, 0, 1, 0));
                __m512i cc = _mm512_shuffle_i32x4(r[k], r[4 + k], _MM_SHUFFLE(3, 2, 3, 2));
                __m512i d = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], _MM_SHUFFLE(3, 2, 3, 2));
                _mm512_storeu_si512(out + (0 + k) * 16, _mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
                _mm512_storeu_si512(out + (4 + k) * 16, _mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
                _mm512_storeu_si512(out + (8 + k) * 16, _mm512_shuffle_i32x4(cc, d, _MM_SHUFFLE(2, 0, 2, 0)));
                _mm512_storeu_si512(out + (12 + k) * 16, _mm512_shuffle_i32x4(cc, d, _MM_SHUFFLE(3, 1, 3, 1)));
            }
        }
    }
}

/* scores[j] = (float)(q8 . k8_j) for keys [0, n), 16 at a time (up to round16(n)
 * written); q32: the head's q8 as dwords, chunks * 16 of them, zero past hd. */
__attribute__((target("avx512vnni"))) static void dots_i8(float *scores, const int32_t *kt,
                                                        const int8_t *const *krow, const int32_t *q32,
                                                        int32_t q_sum, int n, int hd)
{
    (void)krow;
    int chunks = chunks64(hd);
    const __m512i bias = _mm512_set1_epi32(128 * q_sum);
    for (int g = 0; g < n; g += 16) {
        const int32_t *t = kt + (size_t)(g / 16) * chunks * 256;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        for (int w = 0; w < chunks * 16; w += 4) {
            a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(t + w * 16), _mm512_set1_epi32(q32[w]));
            a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(t + (w + 1) * 16), _mm512_set1_epi32(q32[w + 1]));
            a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(t + (w + 2) * 16), _mm512_set1_epi32(q32[w + 2]));
            a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512(t + (w + 3) * 16), _mm512_set1_epi32(q32[w + 3]));
        }
        __m512i s = _mm512_sub_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)), bias);
        _mm512_storeu_ps(scores + g, _mm512_cvtepi32_ps(s));
    }
}
#else
static void pack_k_i8(int32_t *kt, const int8_t *const *krow, int n, int hd)
{
    (void)kt, (void)krow, (void)n, (void)hd; /* the scalar dots read the rows directly */
}

static void dots_i8(float *scores, const int32_t *kt, const int8_t *const *krow, const int32_t *q32,
                    int32_t q_sum, int n, int hd)
{
    (void)kt, (void)q_sum;
    const int8_t *q8 = (const int8_t *)q32;
    for (int j = 0; j < n; j++) {
        int32_t s = 0;
        for (int i = 0; i < hd; i++)
            s += (int32_t)q8[i] * krow[j][i];
        scores[j] = (float)s;
    }
}
#endif

/* kvd_paged_attention_part for int8 pages (see the int8 note above). */
static void paged_attention_part_i8(const kvd_kv_pool *pool, int layer,
                                    const kvd_attention_shape *shape, const kvd_attention_query *q,
                                    int kv_head, int row_begin, int row_end, float *scratch)
{
    const kvd_kv_config *cfg = kvd_kv_pool_config(pool);
    int bs = cfg->block_size;
    int hd = shape->head_dim;
    int hd_pad = round16(hd);
    int c16 = chunks64(hd) * 16;
    int group = shape->num_heads / shape->num_kv_heads;
    int states = ROW_CHUNK * group;
    int32_t *kt = (int32_t *)scratch;                      /* (TILE / 16, chunks, 16, 16) */
    float *vt = scratch + (size_t)TILE * c16;              /* (TILE, hd_pad) */
    float *scores = vt + (size_t)TILE * hd_pad;            /* (TILE) */
    float *kscale = scores + round16(TILE);                /* (TILE) */
    float *vscale = kscale + round16(TILE);                /* (TILE) */
    float *st_m = vscale + round16(TILE);                  /* (ROW_CHUNK, group) */
    float *st_l = st_m + round16(states);                  /* (ROW_CHUNK, group) */
    float *st_qs = st_l + round16(states);                 /* (ROW_CHUNK, group): dq * scale */
    int32_t *st_qsum = (int32_t *)(st_qs + round16(states)); /* (ROW_CHUNK, group) */
    float *st_acc = (float *)st_qsum + round16(states);    /* (ROW_CHUNK, group, hd_pad) */
    int32_t *st_q32 = (int32_t *)(st_acc + (size_t)states * hd_pad); /* (ROW_CHUNK, group, c16) */
    const int32_t *blocks = q->table->blocks;
    size_t row_bytes = (size_t)hd;
    size_t scales_at = (size_t)shape->num_kv_heads * bs * row_bytes; /* kvd_kv.h's page layout */
    const int8_t *krow[TILE];
    uint16_t kbits[TILE], vbits[TILE];

    for (int r0 = row_begin; r0 < row_end; r0 += ROW_CHUNK) {
        int r1 = row_end - r0 < ROW_CHUNK ? row_end : r0 + ROW_CHUNK;
        int nstates = (r1 - r0) * group;
        for (int i = r0; i < r1; i++)
            for (int g = 0; g < group; g++) {
                int s = (i - r0) * group + g;
                const float *qh = q->q + (size_t)i * q->q_stride + (size_t)(kv_head * group + g) * hd;
                int8_t *q8 = (int8_t *)(st_q32 + (size_t)s * c16);
                memset(q8, 0, (size_t)c16 * sizeof(int32_t));
                st_qs[s] = kvd_f16_to_f32(quantize_row_i8(q8, qh, hd)) * shape->scale;
                int32_t sum = 0;
                for (int d = 0; d < hd; d++)
                    sum += q8[d];
                st_qsum[s] = sum;
                st_m[s] = -INFINITY;
                st_l[s] = 0.0f;
            }
        memset(st_acc, 0, (size_t)nstates * hd_pad * sizeof(float));
        int last = q->first_pos + r1 - 1;
        prefetch_rows(pool, blocks, layer, kv_head, bs, row_bytes, 0, last < TILE ? last + 1 : TILE);
        const char *kb = NULL, *vb = NULL, *next_kb = NULL, *next_vb = NULL;
        for (int t0 = 0; t0 <= last; t0 += TILE) {
            int nt = last + 1 - t0 < TILE ? last + 1 - t0 : TILE;
            for (int j = 0; j < nt; j++) {
                int pos = t0 + j;
                /* a block's address once per block, not per row */
                if (!kb || pos % bs == 0) {
                    kb = kvd_kv_block_keys(pool, blocks[pos / bs], layer);
                    vb = kvd_kv_block_values(pool, blocks[pos / bs], layer);
                }
                size_t slot = (size_t)kv_head * bs + (size_t)(pos % bs);
                krow[j] = (const int8_t *)(kb + slot * row_bytes);
                memcpy(&kbits[j], kb + scales_at + slot * sizeof kbits[j], sizeof kbits[j]);
                memcpy(&vbits[j], vb + scales_at + slot * sizeof vbits[j], sizeof vbits[j]);
                const int8_t *vrow = (const int8_t *)(vb + slot * row_bytes);
                int d = 0;
                for (; d + 16 <= hd; d += 16)
                    v16_store(vt + (size_t)j * hd_pad + d, v16_load_i8_n(vrow + d, 16));
                if (d < hd)
                    v16_store_n(vt + (size_t)j * hd_pad + d, v16_load_i8_n(vrow + d, hd - d), hd - d);
                /* the next tile's row and scales: memory, not cache (see the other path) */
                int ahead = pos + TILE;
                if (ahead <= last) {
                    if (!next_kb || ahead % bs == 0) {
                        next_kb = kvd_kv_block_keys(pool, blocks[ahead / bs], layer);
                        next_vb = kvd_kv_block_values(pool, blocks[ahead / bs], layer);
                    }
                    size_t at = (size_t)kv_head * bs + (size_t)(ahead % bs);
                    for (size_t b = 0; b < row_bytes; b += 64) {
                        v16_prefetch(next_kb + at * row_bytes + b);
                        v16_prefetch(next_vb + at * row_bytes + b);
                    }
                    v16_prefetch(next_kb + scales_at + at * sizeof(uint16_t));
                    v16_prefetch(next_vb + scales_at + at * sizeof(uint16_t));
                }
            }
            for (int j = 0; j < nt; j += 16) {
                int n = nt - j < 16 ? nt - j : 16;
                v16_store_n(kscale + j, v16_load_f16_n(kbits + j, n), n);
                v16_store_n(vscale + j, v16_load_f16_n(vbits + j, n), n);
            }
            pack_k_i8(kt, krow, nt, hd);
            for (int i = r0; i < r1; i++) {
                int nk = visible_keys(q, i, t0, nt);
                if (nk == 0)
                    continue;
                for (int g = 0; g < group; g++) {
                    int s = (i - r0) * group + g;
                    dots_i8(scores, kt, krow, st_q32 + (size_t)s * c16, st_qsum[s], nk, hd);
                    v16 qs = v16_set1(st_qs[s]), mv = v16_set1(-INFINITY);
                    for (int j = 0; j < nk; j += 16) {
                        int n = nk - j < 16 ? nk - j : 16;
                        v16 sc = v16_mul(v16_load_n(scores + j, n), v16_mul(v16_load_n(kscale + j, n), qs));
                        v16_store_n(scores + j, sc, n);
                        mv = v16_max(mv, v16_load_n_or(scores + j, n, -INFINITY));
                    }
                    fold_softmax_v(v16_hmax(mv), scores, vscale, nk, hd, hd_pad, vt, &st_m[s],
                                   &st_l[s], st_acc + (size_t)s * hd_pad);
                }
            }
        }
        write_out(q, kv_head, group, hd, hd_pad, r0, r1, st_l, st_acc);
    }
}

size_t KVD_VEC_FN(kvd_attention_scratch_floats)(const kvd_attention_shape *shape)
{
    size_t hd_pad = (size_t)round16(shape->head_dim);
    size_t group = (size_t)(shape->num_heads / shape->num_kv_heads);
    size_t states = (size_t)ROW_CHUNK * group;
    size_t floats = 2 * TILE * hd_pad + 3 * (size_t)round16(TILE) + 2 * (size_t)round16((int)states) +
                    states * hd_pad;
    size_t floats_i8 = scratch_floats_i8(shape->head_dim, (int)group);
    return floats > floats_i8 ? floats : floats_i8;
}

void KVD_VEC_FN(kvd_paged_attention_part)(const kvd_kv_pool *pool, int layer,
                                          const kvd_attention_shape *shape,
                                          const kvd_attention_query *q, int kv_head,
                                          int row_begin, int row_end, float *scratch)
{
    const kvd_kv_config *cfg = kvd_kv_pool_config(pool);
    if (cfg->dtype == KVD_DTYPE_I8) {
        paged_attention_part_i8(pool, layer, shape, q, kv_head, row_begin, row_end, scratch);
        return;
    }
    int bs = cfg->block_size;
    int dtype = (int)cfg->dtype;
    int f8 = cfg->dtype == KVD_DTYPE_F8;
    size_t esize = kvd_dtype_size(cfg->dtype);
    int hd = shape->head_dim;
    int hd_pad = round16(hd);
    int group = shape->num_heads / shape->num_kv_heads;
    int states = ROW_CHUNK * group;
    float *kt = scratch;                          /* (TILE, hd_pad) */
    float *vt = kt + (size_t)TILE * hd_pad;       /* (TILE, hd_pad) */
    float *scores = vt + (size_t)TILE * hd_pad;   /* (TILE) */
    float *kscale = scores + round16(TILE);       /* (TILE), fp8 only */
    float *vscale = kscale + round16(TILE);       /* (TILE), fp8 only */
    float *st_m = vscale + round16(TILE);         /* (ROW_CHUNK, group) */
    float *st_l = st_m + round16(states);         /* (ROW_CHUNK, group) */
    float *st_acc = st_l + round16(states);       /* (ROW_CHUNK, group, hd_pad) */
    const int32_t *blocks = q->table->blocks;
    size_t scales_at = (size_t)shape->num_kv_heads * bs * (size_t)hd; /* fp8: kvd_kv.h's page layout */

    for (int r0 = row_begin; r0 < row_end; r0 += ROW_CHUNK) {
        int r1 = row_end - r0 < ROW_CHUNK ? row_end : r0 + ROW_CHUNK;
        int nstates = (r1 - r0) * group;
        for (int s = 0; s < nstates; s++) {
            st_m[s] = -INFINITY;
            st_l[s] = 0.0f;
        }
        memset(st_acc, 0, (size_t)nstates * hd_pad * sizeof(float));
        int last = q->first_pos + r1 - 1;
        size_t row_bytes = (size_t)hd * esize;
        prefetch_rows(pool, blocks, layer, kv_head, bs, row_bytes, 0, last < TILE ? last + 1 : TILE);
        for (int t0 = 0; t0 <= last; t0 += TILE) {
            int nt = last + 1 - t0 < TILE ? last + 1 - t0 : TILE;
            for (int j = 0; j < nt; j++) {
                int pos = t0 + j;
                int32_t block = blocks[pos / bs];
                size_t slot = (size_t)kv_head * bs + (size_t)(pos % bs);
                size_t offset = slot * row_bytes;
                const char *kb = kvd_kv_block_keys(pool, block, layer);
                const char *vb = kvd_kv_block_values(pool, block, layer);
                if (f8) {
                    /* the rows are value / 2^8 (widen_row_f8): the 2^8 goes to the scale */
                    uint16_t kbits, vbits;
                    memcpy(&kbits, kb + scales_at + slot * sizeof kbits, sizeof kbits);
                    memcpy(&vbits, vb + scales_at + slot * sizeof vbits, sizeof vbits);
                    kscale[j] = kvd_f16_to_f32(kbits) * 256.0f;
                    vscale[j] = kvd_f16_to_f32(vbits) * 256.0f;
                    widen_row_f8(kt + (size_t)j * hd_pad, (const uint8_t *)kb + offset, hd);
                    widen_row_f8(vt + (size_t)j * hd_pad, (const uint8_t *)vb + offset, hd);
                } else {
                    widen_row(kt + (size_t)j * hd_pad, kb + offset, dtype, hd);
                    widen_row(vt + (size_t)j * hd_pad, vb + offset, dtype, hd);
                }
                /* The cache's rows come from memory (a step touches every sequence's
                 * whole context once): ask for the next tile's while this one is
                 * folded, or every row waits for DRAM. */
                if (pos + TILE <= last)
                    prefetch_rows(pool, blocks, layer, kv_head, bs, row_bytes, pos + TILE, pos + TILE + 1);
            }
            /* 64-value heads on float pages: states four at a time (fold_tile_states),
             * the last two or three as a pair and one alone */
            bool together = !f8 && hd == 64;
            fold_state waiting[FOLD_STATES];
            int num_waiting = 0;
            for (int i = r0; i < r1; i++) {
                int nk = visible_keys(q, i, t0, nt);
                if (nk == 0)
                    continue;
                for (int g = 0; g < group; g++) {
                    int h = kv_head * group + g;
                    int s = (i - r0) * group + g;
                    fold_state st = {q->q + (size_t)i * q->q_stride + (size_t)h * hd, nk, &st_m[s],
                                     &st_l[s], st_acc + (size_t)s * hd_pad};
                    if (!together) {
                        fold_tile(st.qh, hd, hd_pad, shape->scale, kt, vt, f8 ? kscale : NULL,
                                  f8 ? vscale : NULL, nk, scores, st.m, st.l, st.acc);
                        continue;
                    }
                    waiting[num_waiting++] = st;
                    if (num_waiting == FOLD_STATES) {
                        fold_tile_four(waiting, hd_pad, shape->scale, kt, vt);
                        num_waiting = 0;
                    }
                }
            }
            if (num_waiting >= 2)
                fold_tile_two(waiting, hd_pad, shape->scale, kt, vt);
            if (num_waiting % 2)
                fold_tile(waiting[num_waiting - 1].qh, hd, hd_pad, shape->scale, kt, vt, NULL, NULL,
                          waiting[num_waiting - 1].nk, scores, waiting[num_waiting - 1].m,
                          waiting[num_waiting - 1].l, waiting[num_waiting - 1].acc);
        }
        write_out(q, kv_head, group, hd, hd_pad, r0, r1, st_l, st_acc);
    }
}

void KVD_VEC_FN(kvd_kv_store_heads)(const kvd_kv_pool *pool, int layer,
                                    const kvd_block_table *table, int pos, const float *k,
                                    const float *v, int head_begin, int head_end)
{
    const kvd_kv_config *cfg = kvd_kv_pool_config(pool);
    int bs = cfg->block_size;
    int hd = cfg->head_dim;
    size_t esize = kvd_dtype_size(cfg->dtype);
    int32_t block = table->blocks[pos / bs];
    char *kdst = kvd_kv_block_keys(pool, block, layer);
    char *vdst = kvd_kv_block_values(pool, block, layer);
    for (int h = head_begin; h < head_end; h++) {
        size_t slot = (size_t)h * bs + (size_t)(pos % bs);
        size_t offset = slot * hd * esize;
        const float *ks = k + (size_t)h * hd;
        const float *vs = v + (size_t)h * hd;
        if (kvd_kv_dtype_row_scaled(cfg->dtype)) {
            size_t scales_at = (size_t)cfg->num_kv_heads * bs * hd; /* kvd_kv.h's page layout */
            int i8 = cfg->dtype == KVD_DTYPE_I8;
            uint16_t kscale = i8 ? quantize_row_i8((int8_t *)(kdst + offset), ks, hd)
                                 : quantize_row_f8((uint8_t *)(kdst + offset), ks, hd);
            uint16_t vscale = i8 ? quantize_row_i8((int8_t *)(vdst + offset), vs, hd)
                                 : quantize_row_f8((uint8_t *)(vdst + offset), vs, hd);
            memcpy(kdst + scales_at + slot * sizeof kscale, &kscale, sizeof kscale);
            memcpy(vdst + scales_at + slot * sizeof vscale, &vscale, sizeof vscale);
            continue;
        }
        for (int d = 0; d < hd; d += 16) {
            int n = hd - d < 16 ? hd - d : 16;
            size_t at = offset + (size_t)d * esize;
            switch (cfg->dtype) {
            case KVD_DTYPE_F32:
                v16_store_n((float *)(kdst + at), v16_load_n(ks + d, n), n);
                v16_store_n((float *)(vdst + at), v16_load_n(vs + d, n), n);
                break;
            case KVD_DTYPE_F16:
                v16_store_f16_n((uint16_t *)(kdst + at), v16_load_n(ks + d, n), n);
                v16_store_f16_n((uint16_t *)(vdst + at), v16_load_n(vs + d, n), n);
                break;
            case KVD_DTYPE_BF16:
                v16_store_bf16_n((uint16_t *)(kdst + at), v16_load_n(ks + d, n), n);
                v16_store_bf16_n((uint16_t *)(vdst + at), v16_load_n(vs + d, n), n);
                break;
            default: /* the pool refuses other dtypes (kvd_kv_pool_create) */
                break;
            }
        }
    }
}

#if defined(KVD_VEC_SCALAR) && !defined(KVD_VEC_STANDIN_AVX512)
/* The public entry points, built once (with the scalar build), pick an ISA per call. */
#include <omp.h>
#include <stdlib.h>

#include "kvd/kvd_quant.h"

size_t kvd_attention_scratch_floats_avx512(const kvd_attention_shape *shape);
void kvd_paged_attention_part_avx512(const kvd_kv_pool *pool, int layer,
                                     const kvd_attention_shape *shape,
                                     const kvd_attention_query *q, int kv_head, int row_begin,
                                     int row_end, float *scratch);
void kvd_kv_store_heads_avx512(const kvd_kv_pool *pool, int layer, const kvd_block_table *table,
                               int pos, const float *k, const float *v, int head_begin,
                               int head_end);

size_t kvd_attention_scratch_floats(const kvd_attention_shape *shape)
{
    return kvd_attention_scratch_floats_scalar(shape);
}

void kvd_paged_attention_part(kvd_isa isa, const kvd_kv_pool *pool, int layer,
                              const kvd_attention_shape *shape, const kvd_attention_query *q,
                              int kv_head, int row_begin, int row_end, float *scratch)
{
    /* int8 pages take VPDPBUSD: AVX-512 CPUs without VNNI (Skylake-SP) run them scalar */
    if (kvd_isa_avx512(isa) &&
        (kvd_kv_pool_config(pool)->dtype != KVD_DTYPE_I8 || kvd_quant_vnni_supported()))
        kvd_paged_attention_part_avx512(pool, layer, shape, q, kv_head, row_begin, row_end, scratch);
    else
        kvd_paged_attention_part_scalar(pool, layer, shape, q, kv_head, row_begin, row_end, scratch);
}

void kvd_kv_store_heads(kvd_isa isa, const kvd_kv_pool *pool, int layer,
                        const kvd_block_table *table, int pos, const float *k, const float *v,
                        int head_begin, int head_end)
{
    if (kvd_isa_avx512(isa))
        kvd_kv_store_heads_avx512(pool, layer, table, pos, k, v, head_begin, head_end);
    else
        kvd_kv_store_heads_scalar(pool, layer, table, pos, k, v, head_begin, head_end);
}

void kvd_kv_store(kvd_isa isa, const kvd_kv_pool *pool, int layer, const kvd_block_table *table,
                  int pos, const float *k, const float *v)
{
    kvd_kv_store_heads(isa, pool, layer, table, pos, k, v, 0,
                       kvd_kv_pool_config(pool)->num_kv_heads);
}

int kvd_paged_attention(kvd_isa isa, const kvd_kv_pool *pool, int layer,
                        const kvd_attention_shape *shape, const kvd_attention_query *queries,
                        int num_queries, int num_threads, kvd_error *err)
{
    const kvd_kv_config *cfg = kvd_kv_pool_config(pool);
    if (shape->num_kv_heads <= 0 || shape->num_heads % shape->num_kv_heads != 0 ||
        shape->head_dim != cfg->head_dim || shape->num_kv_heads != cfg->num_kv_heads)
        return kvd_error_set(err, KVD_EINVAL,
                             "paged attention: shape (%d heads, %d kv heads, head_dim %d) does "
                             "not match the KV pool (%d kv heads, head_dim %d)",
                             shape->num_heads, shape->num_kv_heads, shape->head_dim,
                             cfg->num_kv_heads, cfg->head_dim);
    if (layer < 0 || layer >= cfg->num_layers)
        return kvd_error_set(err, KVD_EINVAL, "paged attention: layer %d out of range", layer);
    int items = 0;
    for (int i = 0; i < num_queries; i++) {
        const kvd_attention_query *q = &queries[i];
        if (q->first_pos < 0 || q->num_rows < 0 || q->first_pos + q->num_rows > q->table->num_tokens)
            return kvd_error_set(err, KVD_EINVAL,
                                 "paged attention: query %d needs positions up to %d but its "
                                 "table holds %d", i, q->first_pos + q->num_rows,
                                 q->table->num_tokens);
        items += shape->num_kv_heads * ((q->num_rows + ROW_CHUNK - 1) / ROW_CHUNK);
    }
    if (num_threads <= 0)
        num_threads = omp_get_num_procs();
    size_t per_thread = (kvd_attention_scratch_floats(shape) + 15) & ~(size_t)15;
    float *scratch = aligned_alloc(64, per_thread * (size_t)num_threads * sizeof(float));
    if (!scratch)
        return kvd_error_set(err, KVD_ENOMEM, "paged attention: out of memory for scratch");
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int item = 0; item < items; item++) {
        int rest = item, qi = 0;
        for (;; qi++) {
            int n = shape->num_kv_heads * ((queries[qi].num_rows + ROW_CHUNK - 1) / ROW_CHUNK);
            if (rest < n)
                break;
            rest -= n;
        }
        int kv_head = rest % shape->num_kv_heads;
        int row0 = rest / shape->num_kv_heads * ROW_CHUNK;
        int row1 = queries[qi].num_rows - row0 < ROW_CHUNK ? queries[qi].num_rows : row0 + ROW_CHUNK;
        kvd_paged_attention_part(isa, pool, layer, shape, &queries[qi], kv_head, row0, row1,
                                 scratch + per_thread * (size_t)omp_get_thread_num());
    }
    free(scratch);
    return 0;
}
#endif
