/* kvd_quant.h - ggml's block-quantized formats: reading them back to floats and making
 * them from floats. The formats are the ones a GGUF file stores (ggml-common.h), so a
 * file means the same numbers in kvd as in llama.cpp.
 *
 * Pure functions over caller-owned memory, any thread; only kvd_quant_matrix_create
 * allocates (the caller frees). The matrix products over quantized weights (activations
 * quantized per block, integer dot products; their operations are defined in
 * kvd_kernels.h) are kvd_matmul_cols, dispatched on the matrix's dtype to
 * kvd_qmatmul_cols; kvd_matrix_pack / kvd_matrix_packed_bytes / kvd_matrix_row
 * (kvd_model.h) take a quantized tensor in its file layout (row-major, each row
 * kvd_dtype_row_bytes()) and call the packing functions below. A product keeps its
 * quantized activations on the stack (about 350 KB), or reads them from a kvd_qinput
 * its caller quantized once for several products (kvd_qmatmul_cols_input).
 */
#ifndef KVD_QUANT_H
#define KVD_QUANT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_error.h"
#include "kvd/kvd_kernels.h"
#include "kvd/kvd_model.h"

/* dst[n] = the values of n consecutive elements of type dtype at src (any dtype, float
 * or quantized; n a whole number of blocks). Returns 0, or KVD_EINVAL when n is not a
 * whole number of blocks. */
int kvd_dequantize_row(kvd_dtype dtype, const void *src, float *dst, int64_t n);

/* dst (kvd_dtype_row_bytes(dtype, n) bytes) = src[n] quantized to dtype, rounding as
 * llama.cpp's reference quantizer (quantize_row_*_ref) does, so that kvd's --quantize and
 * llama-quantize (without an importance matrix) give the same bytes. Returns 0, or
 * KVD_EINVAL (n not a whole number of blocks) / KVD_EUNSUPPORTED (no quantizer for dtype). */
int kvd_quantize_row(kvd_dtype dtype, const float *src, void *dst, int64_t n);

/* The widest quantized matrix (inputs per row) the products take: a row of activations
 * is quantized into a fixed stack buffer. Loaders reject wider quantized tensors. */
#define KVD_QUANT_MAX_COLS 65536

/* The packed layout of quantized matrices (groups of 16 rows, one tile per ggml block,
 * arranged for VPDPBUSD: src/quant/quant_internal.h). kvd_matrix_packed_bytes,
 * kvd_matrix_pack and kvd_matrix_row call these for quantized dtypes; the arguments
 * are theirs (src: the file's row-major blocks, each row kvd_dtype_row_bytes()). */
size_t kvd_quant_packed_bytes(kvd_dtype dtype, int rows, int cols);
void kvd_quant_pack(void *dst, kvd_dtype dtype, int rows, int cols, const void *src,
                    int panel_begin, int panel_end);
void kvd_quant_matrix_row(float *out, const kvd_matrix *w, int row);

/* *out = src (a packed matrix of any dtype) quantized to dtype row by row with
 * kvd_quantize_row, packed; out->data is the caller's to free(). Returns 0, KVD_EINVAL
 * (dtype not quantized, rows not whole blocks or wider than KVD_QUANT_MAX_COLS) or
 * KVD_ENOMEM, with err set and *out untouched. */
int kvd_quant_matrix_create(kvd_matrix *out, kvd_dtype dtype, const kvd_matrix *src, kvd_error *err);

/* kvd_matmul_cols for a quantized w (kvd_matmul_cols dispatches here): the AVX-512 VNNI
 * build when isa is AVX-512 or better and the CPU has VNNI, else the scalar build; both
 * give the same bits (see kvd_kernels.h). */
void kvd_qmatmul_cols(kvd_isa isa, float *out, int ldo, const float *x, int ldx, int m,
                      const kvd_matrix *w, const float *bias, bool accumulate, int n_begin,
                      int n_end);
/* True when this CPU runs the VNNI build (AVX-512 F/BW/VL + AVX512_VNNI). */
bool kvd_quant_vnni_supported(void);

/* Activations quantized once for several products that read the same rows (q/k/v read
 * the normed input, gate/up the post-attention one), instead of once per product call.
 * The memory (kvd_qinput_bytes) is the caller's; a forward context holds one per model.
 * Rows are quantized exactly as kvd_qmatmul_cols quantizes them, so the products give
 * the same bits either way. */
typedef struct kvd_qinput {
    int8_t *q;    /* [rows * k] codes */
    float *d;     /* [rows * k / 32] block scales (one per 256 inputs in Q8_K rounding) */
    int32_t *sum; /* [rows * k / 16] sums of 16 codes */
    int k;        /* inputs per row (whole blocks of the weights) */
    int rows;     /* rows the memory holds */
} kvd_qinput;

/* Bytes of memory for rows x k inputs (k a multiple of 32). */
size_t kvd_qinput_bytes(int rows, int k);
/* in over mem (kvd_qinput_bytes(rows, k) bytes, 64-byte aligned). */
void kvd_qinput_init(kvd_qinput *in, void *mem, int rows, int k);
/* True when a quantized w's products can read in as quantized for w_first's dtype: the
 * same width and the same activation blocks (Q8_0 for Q8_0/Q4_0/Q5_0, Q8_K for the K
 * types). */
bool kvd_qinput_serves(const kvd_matrix *w_first, const kvd_matrix *w);
/* Quantizes rows [r0, r1) of x (row stride ldx) for products with weights of dtype;
 * disjoint rows may be quantized by different threads at once. */
void kvd_qinput_quantize(kvd_isa isa, kvd_qinput *in, kvd_dtype dtype, const float *x, int ldx,
                         int r0, int r1);
/* The same for columns [c0, c1) of rows [r0, r1) only (c0, c1 whole blocks of 32 and
 * dtype one of Q8_0/Q4_0/Q5_0, whose activation blocks are quantized from their own 32
 * values alone: the result equals quantizing the whole rows). */
void kvd_qinput_quantize_cols(kvd_isa isa, kvd_qinput *in, kvd_dtype dtype, const float *x,
                              int ldx, int r0, int r1, int c0, int c1);
/* kvd_qmatmul_cols with the activations of rows [0, m) already in x, quantized for w's
 * dtype family (kvd_qinput_serves). */
void kvd_qmatmul_cols_input(kvd_isa isa, float *out, int ldo, const kvd_qinput *x, int m,
                            const kvd_matrix *w, const float *bias, bool accumulate, int n_begin,
                            int n_end);

#endif
