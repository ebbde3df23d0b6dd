/* kernels_internal.h - the per-ISA builds of the compute kernels, for the dispatchers.
 *
 * kernels_impl.c and paged_attention.c are compiled once per ISA; each function
 * below exists as name_avx512 and name_scalar with the same contract as the public
 * function in kvd_kernels.h / kvd_attention.h that selects between them. The matrix
 * product (matmul_impl.c) has three more builds: name_avx512amx (AMX tiles),
 * name_avx512bf16 (VDPBF16PS) and name_scalar_vdpbf16 (VDPBF16PS's semantics in C).
 */
#ifndef KVD_KERNELS_INTERNAL_H
#define KVD_KERNELS_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_model.h"

#define KVD_DECLARE_MATMUL(sfx)                                                                \
    void kvd_matmul_cols_##sfx(float *out, int ldo, const float *x, int ldx, int m,            \
                               const kvd_matrix *w, const float *bias, bool accumulate,        \
                               int n_begin, int n_end);
#define KVD_DECLARE_KERNELS(sfx)                                                               \
    KVD_DECLARE_MATMUL(sfx)                                                                    \
    void kvd_rmsnorm_##sfx(float *out, const float *x, const float *weight, int n, float eps);  \
    void kvd_rope_##sfx(float *vec, int num_heads, int head_dim, const float *cos_sin);        \
    void kvd_swiglu_##sfx(float *gate, const float *up, int n);                                \
    void kvd_exp_##sfx(float *out, const float *x, int n);

/* The VDPBF16PS builds also take x as words of bf16 pairs, rounded once (kvd_kernels.h). */
#define KVD_DECLARE_MATMUL_WORDS(sfx)                                                          \
    KVD_DECLARE_MATMUL(sfx)                                                                    \
    void kvd_bf16_round_cols_##sfx(uint32_t *words, const float *x, int k, int c0, int c1);    \
    void kvd_matmul_cols_words_##sfx(float *out, int ldo, const uint32_t *xw, size_t xw_stride, \
                                     int m, const kvd_matrix *w, const float *bias,            \
                                     bool accumulate, int n_begin, int n_end);

KVD_DECLARE_MATMUL(avx512amx)
KVD_DECLARE_MATMUL_WORDS(avx512bf16)
KVD_DECLARE_MATMUL_WORDS(scalar_vdpbf16)
KVD_DECLARE_KERNELS(avx512)
KVD_DECLARE_KERNELS(scalar)

#endif
