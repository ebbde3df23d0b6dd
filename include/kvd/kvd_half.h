/* kvd_half.h - scalar conversions between float32 and the 16-bit formats (bf16, f16).
 *
 * Exact where the format allows: widening is exact; narrowing rounds to nearest even.
 * Vector kernels have their own versions; these serve loaders, tools and tests.
 */
#ifndef KVD_HALF_H
#define KVD_HALF_H

#include <stdint.h>
#include <string.h>

static inline float kvd_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t kvd_f32_to_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it a quiet NaN */
        return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float kvd_f16_to_f32(uint16_t h)
{
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}

static inline uint16_t kvd_f32_to_f16(float f)
{
    _Float16 v = (_Float16)f;
    uint16_t h;
    memcpy(&h, &v, sizeof h);
    return h;
}

#endif
