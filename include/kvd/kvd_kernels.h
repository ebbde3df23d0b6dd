/* kvd_kernels.h - the numeric kernels of the forward pass: matrix products over
 * checkpoint-dtype weights, RMSNorm, rotary embeddings, SwiGLU, embedding rows.
 *
 * Activations and accumulators are float32; weights stay in their stored dtype
 * (f32, f16, bf16). Each kernel exists for AVX-512 (F/BW/VL + FMA + F16C, chosen at run
 * time when the CPU has it; the matrix product also for AVX-512 with AMX tiles and for
 * AVX-512 with VDPBF16PS) and a portable scalar build of the same source. Every build
 * computes every output element with one defined sequence of IEEE operations. f32 and
 * f16 products give the same bits in every build; bf16 products have two semantics
 * (below), the one of the CPU's fastest exact instruction, and the scalar build can
 * compute either.
 *
 * Determinism contract: an output element depends only on its own inputs. A matrix
 * product row is computed the same way whatever the number of rows (m), the row's
 * position among them, the column range a thread was given or the thread count:
 * out[i][j] is one float accumulator that starts at (accumulate ? out[i][j] : 0)
 * + bias[j], then
 * - f32 and f16 weights: takes fmaf(x[i][k], W[j][k], acc) for k = 0, 1, 2, ... in order;
 * - bf16 weights: x[i] is rounded to bf16 (nearest even, subnormals to zero), as
 *   PyTorch and llama.cpp run bf16 checkpoints, and the inputs go in blocks (the last
 *   padded with zeros to a multiple of 32), in order, in one of two ways:
 *   - TDPBF16PS semantics (KVD_ISA_AVX512_AMX, KVD_ISA_AVX512, KVD_ISA_SCALAR): for each
 *     block of 32, an even chain e = fmaf(x[2p], W[j][2p], e) and an odd chain o =
 *     fmaf(x[2p+1], W[j][2p+1], o), p over the block's 16 pairs, start from zero, and
 *     acc = acc + (e + o); subnormal inputs read as zero and subnormal results flush to
 *     zero. That is what AMX's TDPBF16PS computes (measured bit for bit on a Sapphire
 *     Rapids-class Xeon), so CPUs with AMX run these products on tiles, 16 rows x 16
 *     columns x 32 inputs an instruction; CPUs without AVX512_BF16 emulate it with FMAs.
 *   - VDPBF16PS semantics (KVD_ISA_AVX512_BF16, KVD_ISA_SCALAR_VDPBF16): for each block
 *     of 64, a chain c starts from zero and takes, for each pair p of the block in
 *     order, c = fmaf(x[2p+1], W[j][2p+1], c) then c = fmaf(x[2p], W[j][2p], c), each
 *     with subnormal inputs read as zero and a subnormal result flushed to zero; then
 *     acc = acc + c (plain IEEE). One pair is what VDPBF16PS computes (Intel's
 *     documented order, measured bit for bit on AMD Zen 5 by bench/probe_bf16
 *     --semantics, and checked on each CPU at start-up before it is used), 16 columns x
 *     2 inputs an instruction, twice the FMA's multiply-adds on Zen 5; CPUs with
 *     AVX512_BF16 and without AMX run it. (The blocks keep the rounding error of the
 *     long sums at the level of TDPBF16PS's: one chain over all of k tripled the worst
 *     logit error on the tiny test model.)
 *   So CPUs agree bit for bit in two groups: all AMX CPUs and the AVX-512 CPUs without
 *   AVX512_BF16 (and any whose VDPBF16PS failed the start-up check) on one side, the
 *   AVX512_BF16 CPUs without AMX (AMD Zen 4 and 5, Intel Cooper Lake) on the other;
 *   the two sides differ in the last bits. Either way a row's result never depends on
 *   the batch, and the scalar build computes either side (KVD_ISA=scalar,
 *   KVD_ISA=scalar-vdpbf16).
 * - quantized weights (ggml blocks, kvd_quant.h): x[i] is quantized block by block as
 *   llama.cpp quantizes activations: Q8_0 (32 inputs, scale amax/127 rounded to fp16,
 *   codes roundf) for Q8_0, Q4_0 and Q5_0 weights; Q8_K (256 inputs, float scale
 *   max/-127, codes nearest-even) for Q4_K, Q5_K, Q6_K and Q8_K. For each weight block b,
 *   in k order, with dx = the activation block's scale and integer codes w, x:
 *   Q8_0/Q4_0/Q5_0/Q8_K: s = sum w*x (w the signed integer, code - offset);
 *   Q6_K: s = sum over the 16 sub-blocks of scale_sub * sum (code-32)*x;
 *   then acc = fmaf(d_w * dx, (float)s, acc);
 *   Q4_K/Q5_K: s = sum over the 8 sub-blocks of scale_sub * sum code*x and
 *   mn = sum of min_sub * (sum of the sub-block's x codes), then
 *   acc = fmaf(d_w * dx, (float)s, acc), acc = fmaf(-(dmin_w * dx), (float)mn, acc).
 *   The sums are exact 32-bit integers, d_w and dmin_w the block's fp16 scales (Q8_K
 *   weights: float). The AVX-512 VNNI build (VPDPBUSD over the packed layout) and the
 *   scalar build compute exactly this; CPUs without VNNI run the scalar build.
 * Threads split output columns, never k.
 *
 * Kernels take the output first and never allocate; the *_cols forms compute a
 * column range so a caller's threads can share one product.
 */
#ifndef KVD_KERNELS_H
#define KVD_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_model.h"

typedef enum kvd_isa {
    KVD_ISA_SCALAR = 0,      /* portable C, any x86-64 (or other) CPU */
    KVD_ISA_AVX512 = 1,      /* AVX-512 F/BW/VL with FMA and F16C */
    KVD_ISA_AVX512_AMX = 2,  /* ... and AMX-BF16 tiles with AVX512_BF16 (Sapphire Rapids on) */
    KVD_ISA_AVX512_BF16 = 3, /* AVX-512 with AVX512_BF16, bf16 products on VDPBF16PS (Zen 4/5) */
    KVD_ISA_SCALAR_VDPBF16 = 4, /* portable C with VDPBF16PS's bf16 semantics (tests) */
    KVD_ISA_COUNT
} kvd_isa;

/* The best ISA this CPU runs: AMX, else AVX512_BF16, else AVX-512, else scalar. KVD_ISA
 * in the environment forces another one the CPU runs: scalar, scalar-vdpbf16, avx512
 * (the FMA emulation of TDPBF16PS), avx512bf16. */
kvd_isa kvd_isa_detect(void);
/* True when the CPU can run isa (for AMX, asks Linux for the tile state once per
 * process, arch_prctl(ARCH_REQ_XCOMP_PERM), as any AMX user must; for AVX512_BF16,
 * checks that VDPBF16PS computes what the scalar emulation does on a known product). */
bool kvd_isa_supported(kvd_isa isa);
/* True when isa's bf16 products have VDPBF16PS's semantics (else TDPBF16PS's). */
static inline bool kvd_isa_vdpbf16(kvd_isa isa)
{
    return isa == KVD_ISA_AVX512_BF16 || isa == KVD_ISA_SCALAR_VDPBF16;
}
/* True when isa runs the AVX-512 builds of the element-wise kernels. */
static inline bool kvd_isa_avx512(kvd_isa isa)
{
    return isa == KVD_ISA_AVX512 || isa == KVD_ISA_AVX512_AMX || isa == KVD_ISA_AVX512_BF16;
}
/* "scalar", "avx512", "avx512amx", "avx512bf16", "scalar-vdpbf16". */
const char *kvd_isa_name(kvd_isa isa);

/* out[m][ldo] (columns [n_begin, n_end)) = x[m][ldx] * W^T + bias, where W is the
 * packed matrix w (rows = n output features, cols = k) and bias (n floats) may be
 * NULL. With accumulate, the product is added to what out holds (out += x W^T + bias),
 * for residual connections. Only columns [n_begin, n_end) of out are read or written.
 * The result is independent of m, of the column range and of the thread that runs it
 * (see the contract above); ranges on multiples of KVD_PANEL_ROWS waste no work. */
void kvd_matmul_cols(kvd_isa isa, float *out, int ldo, const float *x, int ldx, int m,
                     const kvd_matrix *w, const float *bias, bool accumulate, int n_begin,
                     int n_end);

/* bf16 weights on VDPBF16PS (kvd_matmul_takes_words): x rounded to bf16 once for every
 * product that reads it, instead of by each product and thread. A row of k inputs
 * becomes kvd_bf16_words_stride(k) 32-bit words, word i holding inputs 2i (low half)
 * and 2i+1, zeros past k up to a whole block of 32; kvd_bf16_round_cols writes the
 * words of inputs [c0, c1) of one row x (c0 even, c1 even or k; c1 == k also writes
 * the padding), so that threads can round the columns they computed. The products then
 * give the same bits as kvd_matmul_cols over the floats. */
size_t kvd_bf16_words_stride(int k);
bool kvd_matmul_takes_words(kvd_isa isa, const kvd_matrix *w);
void kvd_bf16_round_cols(kvd_isa isa, uint32_t *words, const float *x, int k, int c0, int c1);
/* kvd_matmul_cols with x as words (row r at xw + r * xw_stride); only where
 * kvd_matmul_takes_words(isa, w). */
void kvd_matmul_cols_words(kvd_isa isa, float *out, int ldo, const uint32_t *xw, size_t xw_stride,
                           int m, const kvd_matrix *w, const float *bias, bool accumulate,
                           int n_begin, int n_end);

/* The whole product with num_threads OpenMP threads splitting the columns
 * (num_threads <= 0: all cores). For tests, tools and benches. */
void kvd_matmul(kvd_isa isa, float *out, int ldo, const float *x, int ldx, int m,
                const kvd_matrix *w, const float *bias, bool accumulate, int num_threads);

/* out[n] = x[n] * rsqrt(mean(x^2) + eps) * weight[n] (sum of squares in the 16-lane
 * tree order). out may equal x. */
void kvd_rmsnorm(kvd_isa isa, float *out, const float *x, const float *weight, int n, float eps);

/* Rotary embedding, rotate-half form, in place on num_heads heads of head_dim floats
 * (head h at vec + h*head_dim): dims i and i+head_dim/2 rotate by angle pos*inv_freq[i].
 * cos_sin: head_dim floats, cos of the head_dim/2 angles then their sin
 * (kvd_rope_angles). head_dim must be even. */
void kvd_rope(kvd_isa isa, float *vec, int num_heads, int head_dim, const float *cos_sin);

/* inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2, computed in float as Hugging Face does. */
void kvd_rope_inv_freq(float *inv_freq, int head_dim, float theta);
/* cos_sin (head_dim floats) for position pos: cos(pos*inv_freq[i]) then sin(...). */
void kvd_rope_angles(float *cos_sin, int pos, const float *inv_freq, int head_dim);

/* gate[n] = silu(gate[n]) * up[n], silu(g) = g / (1 + exp(-g)). */
void kvd_swiglu(kvd_isa isa, float *gate, const float *up, int n);

/* exp(x) lane by lane with the kernels' own polynomial (for tests). */
void kvd_exp(kvd_isa isa, float *out, const float *x, int n);

/* Index of the largest value (the first one on ties); -1 when n <= 0. */
int kvd_argmax(const float *x, int n);
/* The largest value minus the second largest (a greedy choice's margin; n >= 2). */
float kvd_top_margin(const float *x, int n);

#endif
