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

KVD_DECLARE_MATMUL(avx512amx)
KVD_DECLARE_MATMUL(avx512bf16)
KVD_DECLARE_MATMUL(scalar_vdpbf16)
KVD_DECLARE_KERNELS(avx512)
KVD_DECLARE_KERNELS(scalar)

#endif
