/* quant.c - ggml's block formats: decoding to floats, the reference quantizers, and the
 * per-block quantization of activations for the integer products.
 *
 * Written from the format descriptions (ggml-common.h: block layouts; ggml-quants.c: the
 * reference quantizers' rounding). Every float operation of the dequantizers and
 * quantizers is the one ggml performs, in its order (this library is built with
 * -ffp-contract=off), because the result must equal llama.cpp's bit for bit: a model
 * file means the same numbers in both, and kvd's --quantize writes llama-quantize's bytes.
 */
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "kvd/kvd_half.h"
#include "kvd/kvd_quant.h"
#include "quant_internal.h"

/* ggml's rounding to the nearest integer (ties to even) for |x| < 2^22: adding 1.5 * 2^23
 * leaves the integer in the low mantissa bits. */
static int nearest_int(float x)
{
    float shifted = x + 12582912.f;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    return (bits & 0x007fffff) - 0x00400000;
}

static uint16_t rd16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static void wr16(uint8_t *p, uint16_t v)
{
    memcpy(p, &v, sizeof v);
}

/* ---- block codecs ------------------------------------------------------------------ */

/* The 12-byte 6-bit scale/min table of Q4_K and Q5_K: sub-blocks 0-3 in the low 6 bits of
 * bytes 0-3 (scales) and 4-7 (mins); 4-7 in the nibbles of bytes 8-11 with their top two
 * bits in the spare top bits of bytes 0-7. */
static void k4_scales_decode(const uint8_t *s, uint8_t *sc, uint8_t *mn)
{
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
    }
    for (int j = 4; j < 8; j++) {
        sc[j] = (uint8_t)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        mn[j] = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

static void k4_scales_encode(const uint8_t *sc, const uint8_t *mn, uint8_t *s)
{
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)(mn[j] | ((mn[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4));
    }
}

void kvd_qblock_decode(kvd_dtype dtype, const uint8_t *src, kvd_qblock *b)
{
    switch (dtype) {
    case KVD_DTYPE_Q8_0:
        b->d = rd16(src);
        for (int j = 0; j < 32; j++)
            b->code[j] = src[2 + j] ^ 0x80;
        break;
    case KVD_DTYPE_Q4_0:
        b->d = rd16(src);
        for (int j = 0; j < 16; j++) {
            b->code[j] = src[2 + j] & 0xF;
            b->code[j + 16] = src[2 + j] >> 4;
        }
        break;
    case KVD_DTYPE_Q5_0: {
        b->d = rd16(src);
        uint32_t qh;
        memcpy(&qh, src + 2, sizeof qh);
        for (int j = 0; j < 16; j++) {
            b->code[j] = (uint8_t)((src[6 + j] & 0xF) | ((qh >> j & 1u) << 4));
            b->code[j + 16] = (uint8_t)((src[6 + j] >> 4) | ((qh >> (j + 16) & 1u) << 4));
        }
        break;
    }
    case KVD_DTYPE_Q4_K:
    case KVD_DTYPE_Q5_K: {
        bool five = dtype == KVD_DTYPE_Q5_K;
        b->d = rd16(src);
        b->dmin = rd16(src + 2);
        k4_scales_decode(src + 4, b->sc, b->mn);
        const uint8_t *qh = src + 16;
        const uint8_t *qs = src + (five ? 48 : 16);
        for (int j = 0; j < 4; j++) {
            for (int l = 0; l < 32; l++) {
                uint8_t lo = qs[32 * j + l] & 0xF, hi = qs[32 * j + l] >> 4;
                if (five) {
                    lo |= (uint8_t)((qh[l] >> (2 * j) & 1) << 4);
                    hi |= (uint8_t)((qh[l] >> (2 * j + 1) & 1) << 4);
                }
                b->code[64 * j + l] = lo;
                b->code[64 * j + 32 + l] = hi;
            }
        }
        break;
    }
    case KVD_DTYPE_Q6_K: {
        const uint8_t *ql = src, *qh = src + 128;
        memcpy(b->sc, src + 192, 16);
        b->d = rd16(src + 208);
        for (int n = 0; n < 2; n++) {
            const uint8_t *l0 = ql + 64 * n, *h0 = qh + 32 * n;
            uint8_t *c = b->code + 128 * n;
            for (int l = 0; l < 32; l++) {
                c[l] = (uint8_t)((l0[l] & 0xF) | (h0[l] & 3) << 4);
                c[l + 32] = (uint8_t)((l0[l + 32] & 0xF) | (h0[l] >> 2 & 3) << 4);
                c[l + 64] = (uint8_t)((l0[l] >> 4) | (h0[l] >> 4 & 3) << 4);
                c[l + 96] = (uint8_t)((l0[l + 32] >> 4) | (h0[l] >> 6 & 3) << 4);
            }
        }
        break;
    }
    case KVD_DTYPE_Q8_K:
        memcpy(&b->d32, src, sizeof b->d32);
        for (int j = 0; j < 256; j++)
            b->code[j] = src[4 + j] ^ 0x80;
        break;
    default:
        break;
    }
}

void kvd_qblock_encode(kvd_dtype dtype, const kvd_qblock *b, uint8_t *dst)
{
    switch (dtype) {
    case KVD_DTYPE_Q8_0:
        wr16(dst, b->d);
        for (int j = 0; j < 32; j++)
            dst[2 + j] = b->code[j] ^ 0x80;
        break;
    case KVD_DTYPE_Q4_0:
        wr16(dst, b->d);
        for (int j = 0; j < 16; j++)
            dst[2 + j] = (uint8_t)((b->code[j] & 0xF) | (b->code[j + 16] & 0xF) << 4);
        break;
    case KVD_DTYPE_Q5_0: {
        wr16(dst, b->d);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            dst[6 + j] = (uint8_t)((b->code[j] & 0xF) | (b->code[j + 16] & 0xF) << 4);
            qh |= (uint32_t)(b->code[j] >> 4 & 1) << j;
            qh |= (uint32_t)(b->code[j + 16] >> 4 & 1) << (j + 16);
        }
        memcpy(dst + 2, &qh, sizeof qh);
        break;
    }
    case KVD_DTYPE_Q4_K:
    case KVD_DTYPE_Q5_K: {
        bool five = dtype == KVD_DTYPE_Q5_K;
        wr16(dst, b->d);
        wr16(dst + 2, b->dmin);
        k4_scales_encode(b->sc, b->mn, dst + 4);
        uint8_t *qh = dst + 16;
        uint8_t *qs = dst + (five ? 48 : 16);
        if (five)
            memset(qh, 0, 32);
        for (int j = 0; j < 4; j++) {
            for (int l = 0; l < 32; l++) {
                uint8_t lo = b->code[64 * j + l], hi = b->code[64 * j + 32 + l];
                qs[32 * j + l] = (uint8_t)((lo & 0xF) | (hi & 0xF) << 4);
                if (five)
                    qh[l] |= (uint8_t)((lo >> 4 & 1) << (2 * j) | (hi >> 4 & 1) << (2 * j + 1));
            }
        }
        break;
    }
    case KVD_DTYPE_Q6_K: {
        uint8_t *ql = dst, *qh = dst + 128;
        for (int n = 0; n < 2; n++) {
            const uint8_t *c = b->code + 128 * n;
            uint8_t *l0 = ql + 64 * n, *h0 = qh + 32 * n;
            for (int l = 0; l < 32; l++) {
                l0[l] = (uint8_t)((c[l] & 0xF) | (c[l + 64] & 0xF) << 4);
                l0[l + 32] = (uint8_t)((c[l + 32] & 0xF) | (c[l + 96] & 0xF) << 4);
                h0[l] = (uint8_t)((c[l] >> 4) | (c[l + 32] >> 4) << 2 | (c[l + 64] >> 4) << 4 |
                                  (c[l + 96] >> 4) << 6);
            }
        }
        memcpy(dst + 192, b->sc, 16);
        wr16(dst + 208, b->d);
        break;
    }
    case KVD_DTYPE_Q8_K:
        memcpy(dst, &b->d32, sizeof b->d32);
        for (int j = 0; j < 256; j++)
            dst[4 + j] = b->code[j] ^ 0x80;
        for (int g = 0; g < 16; g++) {
            int16_t sum = 0;
            for (int l = 0; l < 16; l++)
                sum = (int16_t)(sum + (b->code[16 * g + l] - 128));
            memcpy(dst + 260 + 2 * g, &sum, sizeof sum);
        }
        break;
    default:
        break;
    }
}

/* ---- dequantization ---------------------------------------------------------------- */

/* The values of one decoded block, with ggml's operations: Q4_K/Q5_K (d*sc)*q - dmin*m,
 * Q6_K (d*sc)*q, the others q*d. */
static void qblock_values(kvd_dtype dtype, const kvd_qblock *b, float *y)
{
    int n = kvd_dtype_block_values(dtype);
    switch (dtype) {
    case KVD_DTYPE_Q8_0:
    case KVD_DTYPE_Q4_0:
    case KVD_DTYPE_Q5_0: {
        int offset = dtype == KVD_DTYPE_Q8_0 ? 128 : dtype == KVD_DTYPE_Q4_0 ? 8 : 16;
        float d = kvd_f16_to_f32(b->d);
        for (int j = 0; j < n; j++)
            y[j] = (float)(b->code[j] - offset) * d;
        break;
    }
    case KVD_DTYPE_Q4_K:
    case KVD_DTYPE_Q5_K: {
        float d = kvd_f16_to_f32(b->d), dmin = kvd_f16_to_f32(b->dmin);
        for (int s = 0; s < 8; s++) {
            float d1 = d * (float)b->sc[s], m1 = dmin * (float)b->mn[s];
            for (int l = 0; l < 32; l++)
                y[32 * s + l] = d1 * (float)b->code[32 * s + l] - m1;
        }
        break;
    }
    case KVD_DTYPE_Q6_K: {
        float d = kvd_f16_to_f32(b->d);
        for (int s = 0; s < 16; s++) {
            float ds = d * (float)(int8_t)b->sc[s];
            for (int l = 0; l < 16; l++)
                y[16 * s + l] = ds * (float)(b->code[16 * s + l] - 32);
        }
        break;
    }
    case KVD_DTYPE_Q8_K:
        for (int j = 0; j < 256; j++)
            y[j] = b->d32 * (float)(b->code[j] - 128);
        break;
    default:
        break;
    }
}

int kvd_dequantize_row(kvd_dtype dtype, const void *src, float *dst, int64_t n)
{
    int per_block = kvd_dtype_block_values(dtype);
    if (per_block <= 0 || n < 0 || n % per_block != 0)
        return KVD_EINVAL;
    const uint8_t *in = src;
    if (!kvd_dtype_is_quantized(dtype)) {
        for (int64_t i = 0; i < n; i++) {
            if (dtype == KVD_DTYPE_F32) {
                memcpy(&dst[i], in + 4 * i, sizeof(float));
            } else {
                uint16_t h = rd16(in + 2 * i);
                dst[i] = dtype == KVD_DTYPE_BF16 ? kvd_bf16_to_f32(h) : kvd_f16_to_f32(h);
            }
        }
        return 0;
    }
    size_t block_bytes = kvd_dtype_block_bytes(dtype);
    kvd_qblock b;
    for (int64_t i = 0; i < n / per_block; i++) {
        kvd_qblock_decode(dtype, in + (size_t)i * block_bytes, &b);
        qblock_values(dtype, &b, dst + i * per_block);
    }
    return 0;
}

/* ---- reference quantizers ---------------------------------------------------------- */

/* The element of largest magnitude (the first on ties), with its sign. */
static float signed_absmax(const float *x, int n, float *amax_out)
{
    float amax = 0, max = 0;
    for (int i = 0; i < n; i++) {
        if (amax < fabsf(x[i])) {
            amax = fabsf(x[i]);
            max = x[i];
        }
    }
    *amax_out = amax;
    return max;
}

static void quantize_q8_0(const float *x, kvd_qblock *b)
{
    float amax = 0;
    for (int j = 0; j < 32; j++)
        amax = fmaxf(amax, fabsf(x[j]));
    float d = amax / 127;
    float id = d != 0 ? 1.0f / d : 0.0f;
    b->d = kvd_f32_to_f16(d);
    for (int j = 0; j < 32; j++)
        b->code[j] = (uint8_t)((int)roundf(x[j] * id) + 128);
}

/* Q4_0 and Q5_0: d = -max/2^(bits-1), codes truncated from x/d + offset + 0.5. */
static void quantize_qx_0(const float *x, kvd_qblock *b, int offset)
{
    float amax;
    float max = signed_absmax(x, 32, &amax);
    float d = max / (float)-offset;
    float id = d != 0 ? 1.0f / d : 0.0f;
    b->d = kvd_f32_to_f16(d);
    int top = 2 * offset - 1;
    for (int j = 0; j < 32; j++) {
        int q = (int8_t)(x[j] * id + ((float)offset + 0.5f));
        b->code[j] = (uint8_t)(q < top ? q : top);
    }
}

/* ggml's make_qkx2_quants: a scale and a (non-positive) min for n values with codes in
 * [0, nmax], searching nstep+1 scales around the range's and keeping the least weighted
 * error. Returns the scale; *neg_min = -min. */
static float qkx2_quants(int n, int nmax, const float *x, const float *w, uint8_t *L,
                         float *neg_min, float rmin, float rdelta, int nstep)
{
    float min = x[0], max = x[0];
    float sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min)
            min = x[i];
        if (x[i] > max)
            max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0)
        min = 0;
    if (max == min) {
        memset(L, 0, (size_t)n);
        *neg_min = -min;
        return 0.f;
    }
    float iscale = (float)nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)(l < 0 ? 0 : l > nmax ? nmax : l);
        float diff = scale * (float)L[i] + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    uint8_t aux[32];
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * (x[i] - min));
            l = l < 0 ? 0 : l > nmax ? nmax : l;
            aux[i] = (uint8_t)l;
            sum_l += w[i] * (float)l;
            sum_l2 += w[i] * (float)l * (float)l;
            sum_xl += w[i] * (float)l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * (float)aux[i] + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if (cur_error < best_error) {
                memcpy(L, aux, (size_t)n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *neg_min = -min;
    return scale;
}

/* Q4_K (bits 4) and Q5_K (bits 5): per 32-value sub-block a weighted scale/min search,
 * the 8 scales and mins quantized to 6 bits against their maxima, then every value
 * requantized with the stored scales. */
static void quantize_qx_k(const float *x, kvd_qblock *b, int bits)
{
    int nmax = (1 << bits) - 1;
    float scales[8], mins[8], w[32];
    uint8_t L[256];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; j++) {
        const float *xs = x + 32 * j;
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++)
            sum_x2 += xs[l] * xs[l];
        float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++)
            w[l] = av_x + fabsf(xs[l]);
        scales[j] = bits == 4 ? qkx2_quants(32, nmax, xs, w, L + 32 * j, &mins[j], -1.f, 0.1f, 20)
                              : qkx2_quants(32, nmax, xs, w, L + 32 * j, &mins[j], -0.5f, 0.1f, 15);
        if (scales[j] > max_scale)
            max_scale = scales[j];
        if (mins[j] > max_min)
            max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; j++) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
        b->sc[j] = ls < 63 ? ls : 63;
        b->mn[j] = lm < 63 ? lm : 63;
    }
    b->d = kvd_f32_to_f16(max_scale / 63.f);
    b->dmin = kvd_f32_to_f16(max_min / 63.f);
    for (int j = 0; j < 8; j++) {
        float d = kvd_f16_to_f32(b->d) * (float)b->sc[j];
        if (d == 0)
            continue;
        float dm = kvd_f16_to_f32(b->dmin) * (float)b->mn[j];
        for (int l = 0; l < 32; l++) {
            int q = nearest_int((x[32 * j + l] + dm) / d);
            L[32 * j + l] = (uint8_t)(q < 0 ? 0 : q > nmax ? nmax : q);
        }
    }
    memcpy(b->code, L, 256);
}

/* ggml's make_qx_quants with rmse_type 1 and no importance: codes in [-nmax, nmax) (stored
 * + nmax), the scale refined over 18 neighbouring trial scales by x^2-weighted fit. */
static float qx_quants(int n, int nmax, const float *x, uint8_t *L)
{
    float amax;
    float max = signed_absmax(x, n, &amax);
    if (amax < 1e-15f) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = (float)-nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * x[i]);
        l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
        L[i] = (uint8_t)(l + nmax);
        float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    float scale = suml2 != 0 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0)
            continue;
        iscale = -((float)nmax + 0.1f * (float)is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * x[i]);
            l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
            float w = x[i] * x[i];
            sumlx += w * x[i] * (float)l;
            suml2 += w * (float)l * (float)l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) {
                int l = nearest_int(iscale * x[i]);
                l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
                L[i] = (uint8_t)(l + nmax);
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

static void quantize_q6_k(const float *x, kvd_qblock *b)
{
    float scales[16];
    uint8_t L[256];
    float max_scale = 0, max_abs_scale = 0;
    for (int s = 0; s < 16; s++) {
        scales[s] = qx_quants(16, 32, x + 16 * s, L + 16 * s);
        if (fabsf(scales[s]) > max_abs_scale) {
            max_abs_scale = fabsf(scales[s]);
            max_scale = scales[s];
        }
    }
    if (max_abs_scale < 1e-15f) {
        /* an all-zero block is all zero bytes: codes 0 (not 32), scales 0, d 0 */
        memset(b, 0, sizeof *b);
        return;
    }
    float iscale = -128.f / max_scale;
    b->d = kvd_f32_to_f16(1 / iscale);
    for (int s = 0; s < 16; s++) {
        int l = nearest_int(iscale * scales[s]);
        b->sc[s] = (uint8_t)(int8_t)(l < 127 ? l : 127);
    }
    for (int s = 0; s < 16; s++) {
        float d = kvd_f16_to_f32(b->d) * (float)(int8_t)b->sc[s];
        if (d == 0)
            continue;
        for (int l = 0; l < 16; l++) {
            int q = nearest_int(x[16 * s + l] / d);
            q = q < -32 ? -32 : q > 31 ? 31 : q;
            L[16 * s + l] = (uint8_t)(q + 32);
        }
    }
    memcpy(b->code, L, 256);
}

static void quantize_q8_k(const float *x, kvd_qblock *b)
{
    float amax;
    float max = signed_absmax(x, 256, &amax);
    if (amax == 0) {
        b->d32 = 0;
        memset(b->code, 128, 256);
        return;
    }
    float iscale = -127.f / max;
    for (int j = 0; j < 256; j++) {
        int v = nearest_int(iscale * x[j]);
        b->code[j] = (uint8_t)((v < 127 ? v : 127) + 128);
    }
    b->d32 = 1 / iscale;
}

int kvd_quantize_row(kvd_dtype dtype, const float *src, void *dst, int64_t n)
{
    int per_block = kvd_dtype_block_values(dtype);
    if (!kvd_dtype_is_quantized(dtype))
        return KVD_EUNSUPPORTED;
    if (n < 0 || n % per_block != 0)
        return KVD_EINVAL;
    size_t block_bytes = kvd_dtype_block_bytes(dtype);
    uint8_t *out = dst;
    kvd_qblock b;
    for (int64_t i = 0; i < n / per_block; i++) {
        const float *x = src + i * per_block;
        memset(&b, 0, sizeof b);
        switch (dtype) {
        case KVD_DTYPE_Q8_0: quantize_q8_0(x, &b); break;
        case KVD_DTYPE_Q4_0: quantize_qx_0(x, &b, 8); break;
        case KVD_DTYPE_Q5_0: quantize_qx_0(x, &b, 16); break;
        case KVD_DTYPE_Q4_K: quantize_qx_k(x, &b, 4); break;
        case KVD_DTYPE_Q5_K: quantize_qx_k(x, &b, 5); break;
        case KVD_DTYPE_Q6_K: quantize_q6_k(x, &b); break;
        case KVD_DTYPE_Q8_K: quantize_q8_k(x, &b); break;
        default: return KVD_EUNSUPPORTED;
        }
        kvd_qblock_encode(dtype, &b, out + (size_t)i * block_bytes);
    }
    return 0;
}

/* ---- activations ------------------------------------------------------------------- */

void kvd_qact_quantize(kvd_dtype dtype, const float *x, int k, kvd_qact *out)
{
    kvd_qblock b;
    if (kvd_qtype_is_k(dtype)) {
        for (int i = 0; i < k / 256; i++) {
            quantize_q8_k(x + 256 * i, &b);
            out->d[i] = b.d32;
            for (int j = 0; j < 256; j++)
                out->q[256 * i + j] = (int8_t)(b.code[j] - 128);
        }
    } else {
        for (int i = 0; i < k / 32; i++) {
            quantize_q8_0(x + 32 * i, &b);
            out->d[i] = kvd_f16_to_f32(b.d);
            for (int j = 0; j < 32; j++)
                out->q[32 * i + j] = (int8_t)(b.code[j] - 128);
        }
    }
    for (int g = 0; g < k / 16; g++) {
        int32_t sum = 0;
        for (int l = 0; l < 16; l++)
            sum += out->q[16 * g + l];
        out->sum[g] = sum;
    }
}
