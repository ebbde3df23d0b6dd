/* quant_internal.h - what the block codecs (quant.c), the packed layout (qpack.c) and the
 * per-ISA product builds (qmatmul_impl.c) share inside src/quant.
 *
 * The packed layout: a quantized matrix is stored in groups of KVD_QGROUP_ROWS (16)
 * rows, the rows padded with zeros to whole panels of KVD_PANEL_ROWS. A group holds its
 * ggml blocks in k order, one "tile" per block index: the 16 rows' block b, rearranged so
 * that one 64-byte vector carries 4 consecutive inputs of each of the 16 rows (the
 * operand order of VPDPBUSD, which sums 4 byte products into each of 16 int32 lanes).
 * Weight codes are stored unsigned (the instruction's unsigned operand); the activations
 * are the signed one. Per tile type (c = row 0..15, i = 0..3):
 * - byte vectors "B8" (Q8_0, Q8_K): vector t, byte 4c+i = code of input 4t+i, stored as
 *   q + 128.
 * - nibble vectors "N4" (Q4_0, Q5_0, Q4_K, Q5_K, Q6_K): vector t, byte 4c+i = low 4 bits
 *   of input 8t+i | low 4 bits of input 8t+4+i << 4.
 * - Q5_0/Q5_K fifth bits: per 32 inputs one vector, byte 4c+i bit t = bit 4 of input 8t+i,
 *   bit 4+t = bit 4 of input 8t+4+i (t = 0..3).
 * - Q6_K top two bits: per 16 inputs (vectors t = 2u, 2u+1) one vector, byte 4c+i bits
 *   0-1 = input 8t+i, 2-3 = input 8t+4+i, 4-5 = input 8t+8+i, 6-7 = input 8t+12+i.
 * then the scales, row by row (16 rows' fp16 d, etc.; see the tile tables in qpack.c).
 */
#ifndef KVD_QUANT_INTERNAL_H
#define KVD_QUANT_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include "kvd/kvd_model.h"
#include "kvd/kvd_quant.h"

#define KVD_QGROUP_ROWS 16

/* One ggml block decoded to its parts: codes as unsigned integers (the value's integer
 * is code - offset, offset 128 for Q8_0/Q8_K, 8 Q4_0, 16 Q5_0, 32 Q6_K, 0 Q4_K/Q5_K),
 * sub-block scales and mins, and the block scales as stored. */
typedef struct kvd_qblock {
    uint8_t code[256];
    uint8_t sc[16]; /* Q4_K/Q5_K: 8 six-bit scales; Q6_K: 16 int8 scales (two's complement) */
    uint8_t mn[8];  /* Q4_K/Q5_K: 8 six-bit mins */
    uint16_t d;     /* fp16 bits (Q8_K: unused) */
    uint16_t dmin;  /* fp16 bits, Q4_K/Q5_K */
    float d32;      /* Q8_K's float scale */
} kvd_qblock;

/* Decode / encode one ggml block of dtype (quantized dtypes only). */
void kvd_qblock_decode(kvd_dtype dtype, const uint8_t *src, kvd_qblock *out);
void kvd_qblock_encode(kvd_dtype dtype, const kvd_qblock *in, uint8_t *dst);

/* Bytes of one tile (16 rows x one block) of dtype in the packed layout. */
size_t kvd_qtile_bytes(kvd_dtype dtype);
/* Row c's block in a tile: write it from, or read it into, a decoded block. */
void kvd_qtile_put(kvd_dtype dtype, uint8_t *tile, int c, const kvd_qblock *b);
void kvd_qtile_get(kvd_dtype dtype, const uint8_t *tile, int c, kvd_qblock *b);

/* Activations quantized for one row of x: signed codes xq[k], one float scale per block
 * of 32 (Q8_0 family) or 256 (K family), sums of codes per 16 inputs. */
typedef struct kvd_qact {
    int8_t *q;     /* [k] */
    float *d;      /* [k / block] */
    int32_t *sum;  /* [k / 16] */
} kvd_qact;

/* True for the types whose activations go in Q8_K blocks of 256. */
static inline bool kvd_qtype_is_k(kvd_dtype dtype)
{
    return dtype == KVD_DTYPE_Q4_K || dtype == KVD_DTYPE_Q5_K || dtype == KVD_DTYPE_Q6_K ||
           dtype == KVD_DTYPE_Q8_K;
}

/* Quantizes x[k] for products with weights of dtype: Q8_0 rounding (scale rounded to
 * fp16, as llama.cpp's Q8_0 activations carry it) or Q8_K rounding. */
void kvd_qact_quantize(kvd_dtype dtype, const float *x, int k, kvd_qact *out);

/* The per-ISA builds of the quantized product (same contract as kvd_matmul_cols; w is
 * quantized). */
#define KVD_DECLARE_QMATMUL(sfx)                                                               \
    void kvd_qmatmul_cols_##sfx(float *out, int ldo, const float *x, int ldx, int m,           \
                                const kvd_matrix *w, const float *bias, bool accumulate,       \
                                int n_begin, int n_end);
KVD_DECLARE_QMATMUL(scalar)
KVD_DECLARE_QMATMUL(avx512vnni)
KVD_DECLARE_QMATMUL(avx512gfni)

/* The per-ISA builds of kvd_qinput_quantize / kvd_qmatmul_cols_input (same bits). */
#define KVD_DECLARE_QINPUT(sfx)                                                                \
    void kvd_qinput_quantize_##sfx(kvd_qinput *in, kvd_dtype dtype, const float *x, int ldx,   \
                                   int r0, int r1, int c0, int c1);                            \
    void kvd_qmatmul_cols_input_##sfx(float *out, int ldo, const kvd_qinput *x, int m,         \
                                      const kvd_matrix *w, const float *bias, bool accumulate, \
                                      int n_begin, int n_end);
KVD_DECLARE_QINPUT(scalar)
KVD_DECLARE_QINPUT(avx512vnni)
KVD_DECLARE_QINPUT(avx512gfni)

#endif
