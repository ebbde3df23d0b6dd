/* sampler_vocab.c - the sampler's whole-row passes, AVX-512 and portable.
 *
 * The portable bodies mirror the vector ones lane for lane: 16 running lanes, the
 * same operation order, the same final tree. The build uses -std=c17, which keeps
 * GCC from contracting a*b+c into an FMA, so both bodies round identically and the
 * choice of body is invisible in the results.
 */
#include "sampler_vocab.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX512_BODY 1
#define AVX512_FN __attribute__((target("avx512f")))
#else
#define HAVE_AVX512_BODY 0
#endif

#define LANES 16

/* The scalar part of kvd_vocab_compress_ge: entries [i, n) appended after `out` kept ones
 * (the vector loop's tail, or the whole row without AVX-512). */
static int compress_ge_from(float *vals, int32_t *ids, const float *x, int i, int n, float t,
                            int out)
{
    for (; i < n; i++) {
        if (x[i] >= t) {
            vals[out] = x[i];
            if (ids)
                ids[out] = i;
            out++;
        }
    }
    return out;
}

bool kvd_vocab_avx512_supported(void)
{
#if HAVE_AVX512_BODY
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
#else
    return false;
#endif
}

static const float exp_lo = -87.0f, exp_hi = 88.0f;
static const float log2e = 1.44269504088896341f;
static const float ln2_hi = 0.693145751953125f;
static const float ln2_lo = 1.428606765330187045e-06f;
static const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
static const float c7 = 1.0f / 5040.0f, c6 = 1.0f / 720.0f, c5 = 1.0f / 120.0f, c4 = 1.0f / 24.0f,
                   c3 = 1.0f / 6.0f, c2 = 0.5f;

float kvd_vocab_exp1(float x)
{
    float xc = x < exp_lo ? exp_lo : x;
    xc = xc > exp_hi ? exp_hi : xc;
    float r = (xc * log2e + round_magic) - round_magic;
    float g = (xc - r * ln2_hi) - r * ln2_lo; /* |g| <= 0.35 */
    float p = c7;
    p = p * g + c6;
    p = p * g + c5;
    p = p * g + c4;
    p = p * g + c3;
    p = p * g + c2;
    p = p * g + 1.0f;
    p = p * g + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)r + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < exp_lo ? 0.0f : p * scale;
}

static float tree_sum16(const float *lanes)
{
    float a[LANES];
    memcpy(a, lanes, sizeof a);
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int i = 0; i < width; i++)
            a[i] += a[i + width];
    return a[0];
}

#if HAVE_AVX512_BODY
AVX512_FN static __m512 exp16(__m512 x)
{
    const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(exp_lo), _CMP_LT_OQ);
    __m512 xc = _mm512_mask_mov_ps(x, under, _mm512_set1_ps(exp_lo));
    xc = _mm512_mask_mov_ps(xc, _mm512_cmp_ps_mask(xc, _mm512_set1_ps(exp_hi), _CMP_GT_OQ),
                            _mm512_set1_ps(exp_hi));
    __m512 r = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(xc, _mm512_set1_ps(log2e)),
                                           _mm512_set1_ps(round_magic)),
                             _mm512_set1_ps(round_magic));
    __m512 g = _mm512_sub_ps(_mm512_sub_ps(xc, _mm512_mul_ps(r, _mm512_set1_ps(ln2_hi))),
                             _mm512_mul_ps(r, _mm512_set1_ps(ln2_lo)));
    __m512 p = _mm512_set1_ps(c7);
    p = _mm512_add_ps(_mm512_mul_ps(p, g), _mm512_set1_ps(c6));
    p = _mm512_add_ps(_mm512_mul_ps(p, g), _mm512_set1_ps(c5));
    p = _mm512_add_ps(_mm512_mul_ps(p, g), _mm512_set1_ps(c4));
    p = _mm512_add_ps(_mm512_mul_ps(p, g), _mm512_set1_ps(c3));
    p = _mm512_add_ps(_mm512_mul_ps(p, g), _mm512_set1_ps(c2));
    p = _mm512_add_ps(_mm512_mul_ps(p, g), _mm512_set1_ps(1.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, g), _mm512_set1_ps(1.0f));
    __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(r), _mm512_set1_epi32(127));
    __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
    /* NaN compares false everywhere above: it stays NaN here and the caller zeroes it. */
    return _mm512_maskz_mov_ps((__mmask16)~under, _mm512_mul_ps(p, scale));
}

AVX512_FN static float max_avx512(const float *x, int n)
{
    __m512 m = _mm512_set1_ps(-INFINITY);
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        m = _mm512_max_ps(_mm512_loadu_ps(x + i), m); /* a NaN first operand yields m */
    float best = _mm512_reduce_max_ps(m);
    for (; i < n; i++)
        best = x[i] > best ? x[i] : best;
    return best;
}

AVX512_FN static void exp_avx512(float *w, const float *x, int n, float m, float inv_t)
{
    const __m512 vm = _mm512_set1_ps(m), vt = _mm512_set1_ps(inv_t);
    int i = 0;
    for (; i + LANES <= n; i += LANES) {
        __m512 v = _mm512_loadu_ps(x + i);
        __m512 e = exp16(_mm512_mul_ps(_mm512_sub_ps(v, vm), vt));
        _mm512_storeu_ps(w + i, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), e));
    }
    for (; i < n; i++)
        w[i] = x[i] == x[i] ? kvd_vocab_exp1((x[i] - m) * inv_t) : 0.0f;
}

AVX512_FN static float chunk_sum_avx512(const float *w, int len, float floor_w, int *count)
{
    __m512 acc = _mm512_setzero_ps();
    const __m512 f = _mm512_set1_ps(floor_w);
    int i = 0, cnt = 0;
    for (; i + LANES <= len; i += LANES) {
        __m512 v = _mm512_loadu_ps(w + i);
        __mmask16 keep = _mm512_cmp_ps_mask(v, f, _CMP_GE_OQ);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(keep, v));
        cnt += __builtin_popcount(keep);
    }
    float lanes[LANES], tail = 0.0f;
    _mm512_storeu_ps(lanes, acc);
    for (; i < len; i++) {
        if (w[i] >= floor_w) {
            tail += w[i];
            cnt++;
        }
    }
    *count += cnt;
    return tree_sum16(lanes) + tail;
}

/* chunk_sum_avx512(w, len, 0) of w = exp_avx512(x, len, m, inv_t), the same operations
 * in the same order, without storing w (len <= CHUNK, x 16-aligned in the row as chunks
 * are, so exp_avx512's vector blocks and scalar tail fall where they do here). */
AVX512_FN static float exp_chunk_sum_avx512(const float *x, int len, float m, float inv_t)
{
    const __m512 vm = _mm512_set1_ps(m), vt = _mm512_set1_ps(inv_t), zero = _mm512_setzero_ps();
    __m512 acc = zero;
    int i = 0;
    for (; i + LANES <= len; i += LANES) {
        __m512 v = _mm512_loadu_ps(x + i);
        __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q),
                                       exp16(_mm512_mul_ps(_mm512_sub_ps(v, vm), vt)));
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, zero, _CMP_GE_OQ), e));
    }
    float lanes[LANES], tail = 0.0f;
    _mm512_storeu_ps(lanes, acc);
    for (; i < len; i++) {
        float w = x[i] == x[i] ? kvd_vocab_exp1((x[i] - m) * inv_t) : 0.0f;
        if (w >= 0.0f)
            tail += w;
    }
    return tree_sum16(lanes) + tail;
}

AVX512_FN static int find_gt_avx512(const float *x, int start, int n, float t)
{
    const __m512 vt = _mm512_set1_ps(t);
    int i = start;
    for (; i + LANES <= n; i += LANES) {
        __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), vt, _CMP_GT_OQ);
        if (hit)
            return i + __builtin_ctz(hit);
    }
    for (; i < n; i++)
        if (x[i] > t)
            return i;
    return n;
}

AVX512_FN static int compress_ge_avx512(float *vals, int32_t *ids, const float *x, int n, float t)
{
    const __m512 vt = _mm512_set1_ps(t);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(LANES);
    int out = 0, i = 0;
    for (; i + LANES <= n; i += LANES) {
        __m512 v = _mm512_loadu_ps(x + i);
        __mmask16 keep = _mm512_cmp_ps_mask(v, vt, _CMP_GE_OQ);
        if (keep) {
            _mm512_mask_compressstoreu_ps(vals + out, keep, v);
            if (ids)
                _mm512_mask_compressstoreu_epi32(ids + out, keep, idx);
            out += __builtin_popcount(keep);
        }
        idx = _mm512_add_epi32(idx, step);
    }
    return compress_ge_from(vals, ids, x, i, n, t, out);
}

AVX512_FN static void zero_below_avx512(float *w, const float *key, int n, float t)
{
    const __m512 vt = _mm512_set1_ps(t);
    int i = 0;
    for (; i + LANES <= n; i += LANES) {
        __mmask16 keep = _mm512_cmp_ps_mask(_mm512_loadu_ps(key + i), vt, _CMP_GE_OQ);
        _mm512_storeu_ps(w + i, _mm512_maskz_mov_ps(keep, _mm512_loadu_ps(w + i)));
    }
    for (; i < n; i++)
        w[i] = key[i] >= t ? w[i] : 0.0f;
}

/* The uint16 view of the mask reads ids in order on little-endian x86. A blend and a
 * whole store, not a masked store (slow on AMD) nor a branch (mixed words mispredict);
 * the max rides along, as max_avx512 takes it, since the row is read anyway. */
AVX512_FN static float mask_max_avx512(float *x, const uint32_t *allowed, int n, int n_max)
{
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    const uint16_t *half = (const uint16_t *)(const void *)allowed;
    __m512 m = ninf;
    int i = 0;
    for (; i + LANES <= n_max; i += LANES) {
        const __mmask16 drop = (__mmask16)~half[i / LANES];
        const __m512 v = _mm512_mask_mov_ps(_mm512_loadu_ps(x + i), drop, ninf);
        _mm512_storeu_ps(x + i, v);
        m = _mm512_max_ps(v, m);
    }
    float best = _mm512_reduce_max_ps(m);
    for (; i < n; i++) {
        if (!((allowed[i >> 5] >> (i & 31)) & 1))
            x[i] = -INFINITY;
        if (i < n_max)
            best = x[i] > best ? x[i] : best;
    }
    return best;
}
#endif

static float max_portable(const float *x, int n)
{
    float best = -INFINITY;
    for (int i = 0; i < n; i++)
        best = x[i] > best ? x[i] : best;
    return best;
}

static float mask_max_portable(float *x, const uint32_t *allowed, int n, int n_max)
{
    for (int i = 0; i < n; i++)
        x[i] = (allowed[i >> 5] >> (i & 31)) & 1 ? x[i] : -INFINITY;
    return max_portable(x, n_max);
}


static float chunk_sum_portable(const float *w, int len, float floor_w, int *count)
{
    float acc[LANES] = {0};
    int i = 0, cnt = 0;
    for (; i + LANES <= len; i += LANES) {
        for (int l = 0; l < LANES; l++) {
            float v = w[i + l];
            acc[l] += v >= floor_w ? v : 0.0f;
            cnt += v >= floor_w;
        }
    }
    float tail = 0.0f;
    for (; i < len; i++) {
        if (w[i] >= floor_w) {
            tail += w[i];
            cnt++;
        }
    }
    *count += cnt;
    return tree_sum16(acc) + tail;
}

static float exp_chunk_sum_portable(const float *x, int len, float m, float inv_t)
{
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= len; i += LANES) {
        for (int l = 0; l < LANES; l++) {
            float w = x[i + l] == x[i + l] ? kvd_vocab_exp1((x[i + l] - m) * inv_t) : 0.0f;
            acc[l] += w >= 0.0f ? w : 0.0f;
        }
    }
    float tail = 0.0f;
    for (; i < len; i++) {
        float w = x[i] == x[i] ? kvd_vocab_exp1((x[i] - m) * inv_t) : 0.0f;
        if (w >= 0.0f)
            tail += w;
    }
    return tree_sum16(acc) + tail;
}

float kvd_vocab_max(bool avx512, const float *x, int n)
{
#if HAVE_AVX512_BODY
    if (avx512)
        return max_avx512(x, n);
#endif
    (void)avx512;
    return max_portable(x, n);
}

void kvd_vocab_exp(bool avx512, float *w, const float *x, int n, float m, float inv_t)
{
#if HAVE_AVX512_BODY
    if (avx512) {
        exp_avx512(w, x, n, m, inv_t);
        return;
    }
#endif
    (void)avx512;
    for (int i = 0; i < n; i++)
        w[i] = x[i] == x[i] ? kvd_vocab_exp1((x[i] - m) * inv_t) : 0.0f;
}

static float chunk_sum(bool avx512, const float *w, int len, float floor_w, int *count)
{
#if HAVE_AVX512_BODY
    if (avx512)
        return chunk_sum_avx512(w, len, floor_w, count);
#endif
    (void)avx512;
    return chunk_sum_portable(w, len, floor_w, count);
}

void kvd_vocab_chunk_sums(bool avx512, float *sums, const float *w, int n)
{
    int ignored = 0;
    for (int c = 0, start = 0; start < n; c++, start += KVD_VOCAB_CHUNK) {
        int len = n - start < KVD_VOCAB_CHUNK ? n - start : KVD_VOCAB_CHUNK;
        /* Weights are >= 0, so a floor of 0 keeps every one. */
        sums[c] = chunk_sum(avx512, w + start, len, 0.0f, &ignored);
    }
}

void kvd_vocab_exp_chunk_sums(bool avx512, float *sums, const float *x, int n, float m, float inv_t)
{
    for (int c = 0, start = 0; start < n; c++, start += KVD_VOCAB_CHUNK) {
        int len = n - start < KVD_VOCAB_CHUNK ? n - start : KVD_VOCAB_CHUNK;
#if HAVE_AVX512_BODY
        if (avx512) {
            sums[c] = exp_chunk_sum_avx512(x + start, len, m, inv_t);
            continue;
        }
#endif
        (void)avx512;
        sums[c] = exp_chunk_sum_portable(x + start, len, m, inv_t);
    }
}

void kvd_vocab_chunk_sums_sparse(float *sums, const int32_t *ids, const float *w, int k, int n)
{
    /* Lane by lane in id order as chunk_sum adds them: the absent weights are zeros,
     * and adding +0 to a sum that is >= +0 changes no bit. */
    int j = 0;
    for (int c = 0, start = 0; start < n; c++, start += KVD_VOCAB_CHUNK) {
        const int len = n - start < KVD_VOCAB_CHUNK ? n - start : KVD_VOCAB_CHUNK;
        const int lanes_end = start + len / LANES * LANES;
        float acc[LANES] = {0}, tail = 0.0f;
        for (; j < k && ids[j] < start + len; j++) {
            const float v = w[j] >= 0.0f ? w[j] : 0.0f;
            if (ids[j] < lanes_end)
                acc[(ids[j] - start) % LANES] += v;
            else
                tail += v;
        }
        sums[c] = tree_sum16(acc) + tail;
    }
}

double kvd_vocab_mass_at_least(bool avx512, const float *w, int n, float floor_w, int *count)
{
    double mass = 0.0;
    *count = 0;
    for (int start = 0; start < n; start += KVD_VOCAB_CHUNK) {
        int len = n - start < KVD_VOCAB_CHUNK ? n - start : KVD_VOCAB_CHUNK;
        mass += chunk_sum(avx512, w + start, len, floor_w, count);
    }
    return mass;
}

int kvd_vocab_find_gt(bool avx512, const float *x, int start, int n, float t)
{
#if HAVE_AVX512_BODY
    if (avx512)
        return find_gt_avx512(x, start, n, t);
#endif
    (void)avx512;
    for (int i = start; i < n; i++)
        if (x[i] > t)
            return i;
    return n;
}

int kvd_vocab_count_ge(bool avx512, const float *x, int n, float t)
{
    /* The masked sums chunk_sum also forms are ignored here. */
    int count = 0, chunk_count;
    for (int start = 0; start < n; start += KVD_VOCAB_CHUNK) {
        int len = n - start < KVD_VOCAB_CHUNK ? n - start : KVD_VOCAB_CHUNK;
        chunk_count = 0;
        (void)chunk_sum(avx512, x + start, len, t, &chunk_count);
        count += chunk_count;
    }
    return count;
}

int kvd_vocab_compress_ge(bool avx512, float *vals, int32_t *ids, const float *x, int n, float t)
{
#if HAVE_AVX512_BODY
    if (avx512)
        return compress_ge_avx512(vals, ids, x, n, t);
#endif
    (void)avx512;
    return compress_ge_from(vals, ids, x, 0, n, t, 0);
}

float kvd_vocab_mask_max(bool avx512, float *x, const uint32_t *allowed, int n, int n_max)
{
#if HAVE_AVX512_BODY
    if (avx512)
        return mask_max_avx512(x, allowed, n, n_max);
#endif
    (void)avx512;
    return mask_max_portable(x, allowed, n, n_max);
}

void kvd_vocab_zero_below(bool avx512, float *w, const float *key, int n, float t)
{
#if HAVE_AVX512_BODY
    if (avx512) {
        zero_below_avx512(w, key, n, t);
        return;
    }
#endif
    (void)avx512;
    for (int i = 0; i < n; i++)
        w[i] = key[i] >= t ? w[i] : 0.0f;
}
