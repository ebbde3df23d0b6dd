/* kernels_impl.c - RMSNorm, RoPE, SwiGLU and exp over the 16-lane vector.
 *
 * Compiled twice (see kvd_vec16.h): the AVX-512 build and the scalar build define
 * the same functions with the suffixes _avx512 and _scalar; kernels.c dispatches.
 * The matrix product lives in matmul_impl.c.
 */
#include "kvd_vec16.h"

#include "kernels_internal.h"

void KVD_VEC_FN(kvd_rmsnorm)(float *out, const float *x, const float *weight, int n, float eps)
{
    v16 acc = v16_zero();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        v16 v = v16_load(x + i);
        acc = v16_fma(v, v, acc);
    }
    if (i < n) {
        v16 v = v16_load_n(x + i, n - i);
        acc = v16_fma(v, v, acc);
    }
    float scale = 1.0f / sqrtf(v16_hsum(acc) / (float)n + eps);
    v16 s = v16_set1(scale);
    for (i = 0; i + 16 <= n; i += 16)
        v16_store(out + i, v16_mul(v16_mul(v16_load(x + i), s), v16_load(weight + i)));
    if (i < n)
        v16_store_n(out + i, v16_mul(v16_mul(v16_load_n(x + i, n - i), s), v16_load_n(weight + i, n - i)),
                    n - i);
}

/* x*cos - y*sin and y*cos + x*sin as separate multiplies and adds, the way the
 * reference (x * cos + rotate_half(x) * sin) rounds. */
void KVD_VEC_FN(kvd_rope)(float *vec, int num_heads, int head_dim, const float *cos_sin)
{
    int half = head_dim / 2;
    const float *cosv = cos_sin;
    const float *sinv = cos_sin + half;
    for (int h = 0; h < num_heads; h++) {
        float *a = vec + (size_t)h * head_dim;
        float *b = a + half;
        for (int i = 0; i < half; i += 16) {
            int n = half - i < 16 ? half - i : 16;
            v16 x = v16_load_n(a + i, n);
            v16 y = v16_load_n(b + i, n);
            v16 c = v16_load_n(cosv + i, n);
            v16 s = v16_load_n(sinv + i, n);
            v16_store_n(a + i, v16_sub(v16_mul(x, c), v16_mul(y, s)), n);
            v16_store_n(b + i, v16_add(v16_mul(y, c), v16_mul(x, s)), n);
        }
    }
}

V16_INLINE v16 silu_mul(v16 g, v16 u)
{
    v16 e = v16_exp(v16_sub(v16_zero(), g));
    return v16_mul(v16_div(g, v16_add(v16_set1(1.0f), e)), u);
}

void KVD_VEC_FN(kvd_swiglu)(float *gate, const float *up, int n)
{
    int i = 0;
    for (; i + 16 <= n; i += 16)
        v16_store(gate + i, silu_mul(v16_load(gate + i), v16_load(up + i)));
    if (i < n)
        v16_store_n(gate + i, silu_mul(v16_load_n(gate + i, n - i), v16_load_n(up + i, n - i)), n - i);
}

void KVD_VEC_FN(kvd_exp)(float *out, const float *x, int n)
{
    for (int i = 0; i < n; i += 16) {
        int c = n - i < 16 ? n - i : 16;
        v16_store_n(out + i, v16_exp(v16_load_n(x + i, c)), c);
    }
}
