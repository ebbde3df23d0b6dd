/* matmul_impl.c - the matrix product out = x W^T over packed weights.
 *
 * Compiled five times (see kvd_vec16.h): AVX-512 with AMX tiles (_avx512amx), AVX-512
 * (_avx512), the scalar build (_scalar), AVX-512 with VDPBF16PS (_avx512bf16) and its
 * scalar twin (_scalar_vdpbf16); kernels.c dispatches. All compute the same bits over
 * f32 and f16 weights; over bf16 weights the first three compute TDPBF16PS's semantics
 * and the last two VDPBF16PS's (kvd_kernels.h).
 *
 * Over packed weights (kvd_matrix in kvd_model.h), one float accumulator per output
 * element starts from its init value (0, or what out holds when accumulating, plus the
 * bias). f32 and f16 weights: it takes one fused multiply-add per input k, in order,
 * with x[r][k] broadcast against 32 widened weights of a panel. bf16 weights follow
 * AMX's TDPBF16PS (kvd_kernels.h): x rounded to bf16, and per block of 32 inputs two
 * chains of FMAs from zero (even and odd inputs) whose sum is added to the accumulator.
 * The AMX build runs them on tiles (amx_product below); the _avx512 and _scalar builds
 * emulate them with FMAs in the tiles of panel_tile_bf16. The VDPBF16PS builds run, per
 * block of 64 inputs, one chain of VDPBF16PS from zero added to the accumulator
 * (panel_tile_vdp). Nothing about an element's operations depends on
 * the blocking around it, and a partial sum parked in out between slices of k is exact,
 * which is what makes a row's result independent of the batch, the column range and
 * the thread. The blocking of the vector tiles:
 * - up to MAX_TILE_ROWS rows (decode, small batches): one tile holds all rows and
 *   streams its panels' weights from memory once over the whole of k, with software
 *   prefetch ahead of each stream; few rows take several panels at a time so that
 *   enough independent accumulators (and memory streams) are in flight.
 * - more rows (prefill, big batches): chunks of rows; per slice of K_SLICE inputs,
 *   each panel's slice (16 KB of bf16, in L1) is run by every row tile of the chunk
 *   (tiles of up to 12 rows x 32 columns: 24 accumulators + 2 weight vectors + 1
 *   broadcast of the 32 registers; up to SMALL_BATCH_ROWS rows, 6 rows x 64 columns),
 *   the chunk's x slice staying in L2.
 * bf16 tiles take the same shapes: only their chains (one parity at a time) live in
 * registers, the sums and the parked even chains on the stack, touched once a block;
 * and x, rounded to bf16 and split by parity, is shared by the tiles of a chunk. The
 * VDPBF16PS tiles (panel_tile_vdp) keep one chain per output vector in registers, the
 * sums on the stack, x shared as words of pairs, and use 6 x 2 tiles for every batch;
 * their slices are as long as L2 holds the panels' weights (vdp_slice_inputs), whole k
 * for the 0.5B shapes but the down projection's.
 */
#include "kvd_vec16.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kernels_internal.h"
#include "kvd/kvd_kernels.h"

/* The AVX-512 build unrolls the tiles completely so that accumulators stay in
 * registers; the scalar build (a fallback, and a witness in tests) keeps loops rolled,
 * which keeps its compile time under a minute with sanitizers (unrolled: over 8 minutes). */
#if defined(KVD_VEC_AVX512)
#define KVD_PRAGMA(x) _Pragma(#x)
#define KVD_UNROLL(n) KVD_PRAGMA(GCC unroll n)
#else
#define KVD_UNROLL(n)
#endif

#define PANEL KVD_PANEL_ROWS
#define MAX_TILE_ROWS 12
/* Up to this many rows, batched tiles take two panels at a time (see tiled_product). */
#define SMALL_BATCH_ROWS 48
/* Inputs per slice when many rows share a panel: the slice of a panel stays in L1
 * (256 x 64 B of 16-bit weights) while the chunk's row tiles run against it. */
#define K_SLICE 256
/* x floats a chunk of rows may hold per slice (the rows' slice stays in L2); also the
 * size of the stack buffer that holds a chunk's x rounded to bf16. */
#define CHUNK_FLOATS ((size_t)96 * 1024)
/* How far ahead (bytes) each weight stream of a streaming tile is prefetched. */
#define PREFETCH_BYTES 1024
/* The bf16 products' semantics this build computes: VDPBF16PS's (one instruction per pair
 * of inputs, x kept as words of bf16 pairs, one word per 2 inputs) or TDPBF16PS's (x kept
 * as halves, one float per input). */
#if defined(KVD_VEC_DPBF16)
#define BF16_VDP 1
#define BF16_X_INPUTS_PER_FLOAT 2
/* Inputs per block of the VDPBF16PS semantics (kvd_kernels.h): a divisor of K_SLICE, so
 * that slices start on block boundaries. */
#define VDP_BLOCK 64
/* Longest slice of inputs of a VDPBF16PS product (see vdp_slice_inputs). */
#define VDP_L2_SLICE 2048
#else
#define BF16_VDP 0
#define BF16_X_INPUTS_PER_FLOAT 1
#endif

/* Lanes of the 16 output columns starting at col that fall in [n_begin, n_end). */
static uint32_t column_mask(int col, int n_begin, int n_end)
{
    int lo = n_begin - col, hi = n_end - col; /* the range in lane numbers */
    lo = lo < 0 ? 0 : lo;
    hi = hi > 16 ? 16 : hi;
    if (hi <= lo)
        return 0;
    return (uint32_t)((1u << hi) - 1u) & ~(uint32_t)((1u << lo) - 1u);
}

/* Software prefetch of a tile's weight streams: at input kk, the line `ahead` bytes
 * past kk's in each panel (negative: before it), on one input of every `every` (phase
 * `phase`), into L1 or only L2. every = 0: none. part > 0: the tiles sharing a range of inputs (from byte
 * `origin` of each panel) each prefetch one contiguous part of it instead, the phase-th
 * `part` bytes, advancing one call's lines per firing. */
typedef struct prefetch_plan {
    ptrdiff_t ahead;
    int every, phase;
    bool l2_only;
    size_t origin, part;
} prefetch_plan;

/* The accumulators of a tile of R rows x 2P half-panels: from out (k0 > 0: the partial
 * sums a previous slice left there; accumulate: what out held) or 0, plus bias when
 * k0 == 0. masks[2P] say which columns the call owns; only those are read. */
V16_INLINE void tile_start(v16 acc[][8], const float *out, int ldo, int k0, const uint32_t *masks,
                           const float *bias, bool accumulate, int R, int P)
{
KVD_UNROLL(12)
    for (int r = 0; r < R; r++) {
KVD_UNROLL(8)
        for (int h = 0; h < 2 * P; h++) {
            const float *o = out + (size_t)r * ldo + 16 * h;
            if (k0 > 0 || accumulate)
                acc[r][h] = v16_load_mask(o, masks[h]);
            else
                acc[r][h] = v16_zero();
            if (k0 == 0 && bias)
                acc[r][h] = v16_add(acc[r][h], v16_load_mask(bias + 16 * h, masks[h]));
        }
    }
}

V16_INLINE void tile_finish(float *out, int ldo, v16 acc[][8], const uint32_t *masks, int R, int P)
{
KVD_UNROLL(12)
    for (int r = 0; r < R; r++)
KVD_UNROLL(8)
        for (int h = 0; h < 2 * P; h++)
            v16_store_mask(out + (size_t)r * ldo + 16 * h, acc[r][h], masks[h]);
}

/* tile_start and tile_finish for tiles whose accumulators wait on the stack (sums[r][h])
 * while chains run in registers. */
V16_INLINE void tile_start_parked(float sums[][8][16], const float *out, int ldo, int k0,
                                  const uint32_t *masks, const float *bias, bool accumulate,
                                  int R, int P)
{
    v16 acc[MAX_TILE_ROWS][8];
    tile_start(acc, out, ldo, k0, masks, bias, accumulate, R, P);
KVD_UNROLL(12)
    for (int r = 0; r < R; r++)
KVD_UNROLL(8)
        for (int h = 0; h < 2 * P; h++)
            v16_store(sums[r][h], acc[r][h]);
}

V16_INLINE void tile_finish_parked(float *out, int ldo, float sums[][8][16], const uint32_t *masks,
                                   int R, int P)
{
    v16 acc[MAX_TILE_ROWS][8];
KVD_UNROLL(12)
    for (int r = 0; r < R; r++)
KVD_UNROLL(8)
        for (int h = 0; h < 2 * P; h++)
            acc[r][h] = v16_load(sums[r][h]);
    tile_finish(out, ldo, acc, masks, R, P);
}

/* Prefetch of the `lines` 64-byte lines at `ahead` bytes past offset in each of the P
 * panels (or past the plan's place in its part), on one call of every pf.every
 * (countdown). */
V16_INLINE void tile_prefetch(const char *w, size_t panel_bytes, size_t offset, int lines,
                              prefetch_plan pf, int *countdown, int P)
{
    if (*countdown == 0) {
        *countdown = pf.every;
        size_t unit = 64 * (size_t)lines;
        if (pf.part)
            offset = pf.origin + (size_t)pf.phase * pf.part +
                     (offset - pf.origin) / unit / (size_t)pf.every * unit;
KVD_UNROLL(4)
        for (int q = 0; q < P; q++) {
            const char *ahead = w + (ptrdiff_t)((size_t)q * panel_bytes + offset) + pf.ahead;
            for (int line = 0; line < lines; line++)
                pf.l2_only ? v16_prefetch_l2(ahead + 64 * line) : v16_prefetch(ahead + 64 * line);
        }
    }
    (*countdown)--;
}

/* One f32/f16 tile: R rows of x against P consecutive panels (32*P output columns
 * starting at out/bias column 0) over inputs [k0, k1). R and P are compile-time
 * constants at every call site so the accumulators live in registers. */
V16_INLINE void panel_tile(float *out, int ldo, const float *x, int ldx, const char *w,
                           size_t panel_bytes, int wdt, int k0, int k1, const uint32_t *masks,
                           const float *bias, bool accumulate, prefetch_plan pf, int R, int P)
{
    v16 acc[MAX_TILE_ROWS][8];
    tile_start(acc, out, ldo, k0, masks, bias, accumulate, R, P);
    size_t step = wdt == KVD_DTYPE_F32 ? 128 : 64; /* bytes of one (panel, k) */
    int countdown = pf.every ? pf.phase : -1;
KVD_UNROLL(2)
    for (int kk = k0; kk < k1; kk++) {
        tile_prefetch(w, panel_bytes, (size_t)kk * step, (int)(step / 64), pf, &countdown, P);
        v16 wlo[4], whi[4];
KVD_UNROLL(4)
        for (int q = 0; q < P; q++)
            v16_load_panel(w + (size_t)q * panel_bytes, wdt, (size_t)kk, &wlo[q], &whi[q]);
KVD_UNROLL(12)
        for (int r = 0; r < R; r++) {
            v16 xb = v16_set1(x[(size_t)r * ldx + kk]);
KVD_UNROLL(4)
            for (int q = 0; q < P; q++) {
                acc[r][2 * q] = v16_fma(xb, wlo[q], acc[r][2 * q]);
                acc[r][2 * q + 1] = v16_fma(xb, whi[q], acc[r][2 * q + 1]);
            }
        }
    }
    tile_finish(out, ldo, acc, masks, R, P);
}

/* The 32 inputs row[i .. i+32) rounded to bf16, as 16 words of pairs (2j, 2j+1); inputs
 * at or past k (the padding of the last block) are zero. */
V16_INLINE v16 bf16_block_words(const float *row, int i, int k)
{
    int lo_n = k - i, hi_n = k - i - 16;
    lo_n = lo_n < 0 ? 0 : lo_n > 16 ? 16 : lo_n;
    hi_n = hi_n < 0 ? 0 : hi_n > 16 ? 16 : hi_n;
    v16 lo = v16_load_n(row + i, lo_n);
    v16 hi = hi_n > 0 ? v16_load_n(row + i + 16, hi_n) : v16_zero();
    return v16_bf16_pairs(lo, hi);
}

/* Each build compiles only the tiles of its semantics (clang reports unused helpers). */
#if BF16_VDP || defined(KVD_VEC_AMX)
/* x[r][k0 .. k0+n) for r < R rounded to bf16 pairs, the layout of an AMX A tile and of
 * VDPBF16PS's broadcasts: words[r * stride + i] holds inputs k0+2i and k0+2i+1
 * (bf16_block_words). */
static inline void round_to_bf16_pairs(uint32_t *words, size_t stride, const float *x, int ldx,
                                       int R, int k0, int n, int k)
{
    for (int r = 0; r < R; r++)
        for (int i = k0; i < k0 + n; i += 32)
            v16_store_words(words + (size_t)r * stride + (size_t)(i - k0) / 2,
                            bf16_block_words(x + (size_t)r * ldx, i, k));
}
#endif

#if !BF16_VDP
/* x[r][k0 .. k0+n) for r < R rounded to bf16 and split by parity, as floats:
 * halves[r * stride + 32 * (i / 16) + j] is input k0 + i + 2j (j < 16) for the even ones
 * of each block of 32 and k0 + i + 2(j - 16) + 1 (j >= 16) for the odd ones, so that a
 * tile broadcasts them straight from memory. k0 and n are multiples of 32. */
static inline void round_to_bf16_halves(float *halves, size_t stride, const float *x, int ldx,
                                        int R, int k0, int n, int k)
{
    for (int r = 0; r < R; r++) {
        const float *row = x + (size_t)r * ldx;
        float *dst = halves + (size_t)r * stride;
        for (int i = k0; i < k0 + n; i += 32) {
            v16 words = bf16_block_words(row, i, k);
            v16_store(dst + (i - k0), v16_bf16_low(words));
            v16_store(dst + (i - k0) + 16, v16_bf16_high(words));
        }
    }
}

/* One parity's chains of a block (see panel_tile_bf16): chain[r][h] = 16 flushed FMAs
 * from zero over the block's even (parity 0) or odd inputs, x from xs (the block's
 * rounded halves, row stride xs_stride), weights from the panels' words at byte `at`. */
V16_INLINE void bf16_chains(v16 chain[][8], const float *xs, size_t xs_stride, const char *w,
                            size_t panel_bytes, size_t at, int parity, prefetch_plan pf,
                            int *countdown, int R, int P)
{
KVD_UNROLL(12)
    for (int r = 0; r < R; r++)
KVD_UNROLL(8)
        for (int h = 0; h < 2 * P; h++)
            chain[r][h] = v16_zero();
KVD_UNROLL(2)
    for (int pair = 0; pair < 16; pair++, at += 128) {
        /* a pair of inputs is 128 bytes of a panel: 32 words, one per row */
        if (parity == 0)
            tile_prefetch(w, panel_bytes, at, 2, pf, countdown, P);
        v16 wv[4][2];
KVD_UNROLL(4)
        for (int q = 0; q < P; q++) {
            for (int half = 0; half < 2; half++) {
                v16 words = v16_load_words(w + (size_t)q * panel_bytes + at + 64 * half);
                wv[q][half] = parity ? v16_bf16_high(words) : v16_bf16_low(words);
            }
        }
KVD_UNROLL(12)
        for (int r = 0; r < R; r++) {
            v16 xb = v16_set1(xs[(size_t)r * xs_stride + 16 * parity + pair]);
KVD_UNROLL(8)
            for (int h = 0; h < 2 * P; h++)
                chain[r][h] = v16_fma_flush(xb, wv[h / 2][h % 2], chain[r][h]);
        }
    }
}

/* One bf16 tile, TDPBF16PS emulated: as panel_tile, over inputs [k0, k1) that are whole
 * blocks of 32 (k: the matrix's real inputs, past which x reads as zero). Per block,
 * each output vector runs its even chain of 16 FMAs from zero, parks it on the stack,
 * runs its odd chain, then adds their sum to its accumulator, all with subnormals
 * flushed (v16_flush_begin). Only the chains live in registers (the accumulators and
 * the parked chains are touched once a block, on the stack), so a bf16 tile holds as
 * many rows and panels as an f32 one. */
V16_INLINE void panel_tile_bf16(float *out, int ldo, const float *x, int ldx, const float *pre,
                                size_t pre_stride, const char *w, size_t panel_bytes, int k, int k0,
                                int k1, const uint32_t *masks, const float *bias, bool accumulate,
                                prefetch_plan pf, int R, int P)
{
    float halves[MAX_TILE_ROWS][K_SLICE] __attribute__((aligned(64)));
    float sums[MAX_TILE_ROWS][8][16] __attribute__((aligned(64)));
    float parked[MAX_TILE_ROWS][8][16] __attribute__((aligned(64)));
    tile_start_parked(sums, out, ldo, k0, masks, bias, accumulate, R, P);
    int countdown = pf.every ? pf.phase : -1;
    v16_flush_state flush = v16_flush_begin();
    for (int s0 = k0; s0 < k1; s0 += K_SLICE) {
        int s1 = k1 - s0 < K_SLICE ? k1 : s0 + K_SLICE;
        const float *xs = pre ? pre + (s0 - k0) : &halves[0][0];
        size_t xs_stride = pre ? pre_stride : K_SLICE;
        if (!pre)
            round_to_bf16_halves(&halves[0][0], K_SLICE, x, ldx, R, s0, s1 - s0, k);
        for (int b0 = s0; b0 < s1; b0 += 32, xs += 32) {
            v16 chain[MAX_TILE_ROWS][8];
            size_t at = (size_t)b0 * 64;
            bf16_chains(chain, xs, xs_stride, w, panel_bytes, at, 0, pf, &countdown, R, P);
KVD_UNROLL(12)
            for (int r = 0; r < R; r++)
KVD_UNROLL(8)
                for (int h = 0; h < 2 * P; h++)
                    v16_store(parked[r][h], chain[r][h]);
            bf16_chains(chain, xs, xs_stride, w, panel_bytes, at, 1, pf, &countdown, R, P);
KVD_UNROLL(12)
            for (int r = 0; r < R; r++)
KVD_UNROLL(8)
                for (int h = 0; h < 2 * P; h++)
                    v16_store(sums[r][h], v16_add_flush(v16_load(sums[r][h]),
                                                        v16_add_flush(v16_load(parked[r][h]), chain[r][h])));
        }
    }
    v16_flush_end(flush);
    tile_finish_parked(out, ldo, sums, masks, R, P);
}
#endif

#if BF16_VDP
/* One bf16 tile on VDPBF16PS: as panel_tile, over inputs [k0, k1) that are whole blocks
 * of 32 (k: the matrix's real inputs, past which x reads as zero). A pair of inputs is
 * 128 bytes of a panel (32 words, one per output column), against which each row's word
 * of x pairs is broadcast. Per block of VDP_BLOCK inputs (kvd_kernels.h), each output
 * vector's chain takes one VDPBF16PS per pair from zero, in registers, and is then
 * added to its accumulator, which waits on the stack (touched once a block), so a tile
 * holds as many rows and panels as an f32 one. xs: x as words of pairs
 * (round_to_bf16_pairs, row stride xs_stride, starting at k0), or NULL to round them
 * here. */
V16_INLINE void panel_tile_vdp(float *out, int ldo, const float *x, int ldx, const float *xs,
                               size_t xs_stride, const char *w, size_t panel_bytes, int k, int k0,
                               int k1, const uint32_t *masks, const float *bias, bool accumulate,
                               prefetch_plan pf, int R, int P)
{
    float words[MAX_TILE_ROWS][K_SLICE / 2] __attribute__((aligned(64)));
    float sums[MAX_TILE_ROWS][8][16] __attribute__((aligned(64)));
    tile_start_parked(sums, out, ldo, k0, masks, bias, accumulate, R, P);
    int countdown = pf.every ? pf.phase : -1;
    for (int s0 = k0; s0 < k1; s0 += K_SLICE) {
        int s1 = k1 - s0 < K_SLICE ? k1 : s0 + K_SLICE;
        const float *xw = xs ? xs + (s0 - k0) / 2 : &words[0][0];
        size_t xw_stride = xs ? xs_stride : K_SLICE / 2;
        if (!xs)
            round_to_bf16_pairs((uint32_t *)&words[0][0], K_SLICE / 2, x, ldx, R, s0, s1 - s0, k);
        for (int b0 = s0; b0 < s1; b0 += VDP_BLOCK, xw += VDP_BLOCK / 2) {
            int pairs = (s1 - b0 < VDP_BLOCK ? s1 - b0 : VDP_BLOCK) / 2;
            size_t at = (size_t)b0 * 64;
            v16 chain[MAX_TILE_ROWS][8];
KVD_UNROLL(12)
            for (int r = 0; r < R; r++)
KVD_UNROLL(8)
                for (int h = 0; h < 2 * P; h++)
                    chain[r][h] = v16_zero();
KVD_UNROLL(2)
            for (int pair = 0; pair < pairs; pair++, at += 128) {
                tile_prefetch(w, panel_bytes, at, 2, pf, &countdown, P);
                v16 wv[8];
KVD_UNROLL(8)
                for (int h = 0; h < 2 * P; h++)
                    wv[h] = v16_load_words(w + (size_t)(h / 2) * panel_bytes + at + 64 * (h % 2));
KVD_UNROLL(12)
                for (int r = 0; r < R; r++) {
                    v16 xb = v16_set1(xw[(size_t)r * xw_stride + pair]);
KVD_UNROLL(8)
                    for (int h = 0; h < 2 * P; h++)
                        chain[r][h] = v16_dpbf16(chain[r][h], xb, wv[h]);
                }
            }
KVD_UNROLL(12)
            for (int r = 0; r < R; r++)
KVD_UNROLL(8)
                for (int h = 0; h < 2 * P; h++)
                    v16_store(sums[r][h], v16_add(v16_load(sums[r][h]), chain[r][h]));
        }
    }
    tile_finish_parked(out, ldo, sums, masks, R, P);
}
#endif

typedef struct product {
    float *out;
    int ldo;
    const float *x;
    int ldx;
    const kvd_matrix *w;
    const float *bias;
    bool accumulate;
    int n_begin, n_end;
    size_t panel_bytes;
    /* bf16: x's rows from halves_r0 and inputs from halves_k0, already rounded and split
     * (round_to_bf16_halves, or round_to_bf16_pairs for VDPBF16PS; row stride
     * halves_stride), so that tiles sharing them do not each round them again; NULL:
     * every tile rounds its own */
    const float *halves;
    size_t halves_stride;
    int halves_r0, halves_k0;
} product;

/* The tile shapes (rows, panels) tiled_product uses: the AVX-512 build
 * instantiates each kernel once per shape, with R and P constants. */
#define TILE_SHAPES(X)                                                                         \
    X(1, 4) X(2, 4) X(1, 2) X(2, 2) X(3, 2) X(4, 2) X(5, 2) X(6, 2) X(1, 1) X(2, 1) X(3, 1)  \
        X(4, 1) X(5, 1) X(6, 1) X(7, 1) X(8, 1) X(9, 1) X(10, 1) X(11, 1) X(12, 1)

/* Rows [r0, r0 + R) against panels [p, p + P) over inputs [k0, k1). */
static void run_tile(const product *pr, int r0, int R, int p, int P, int k0, int k1, prefetch_plan pf)
{
    uint32_t masks[8];
    for (int h = 0; h < 2 * P; h++)
        masks[h] = column_mask(p * PANEL + 16 * h, pr->n_begin, pr->n_end);
    int col = p * PANEL;
    float *out = pr->out + (size_t)r0 * pr->ldo + col;
    const float *x = pr->x ? pr->x + (size_t)r0 * pr->ldx : NULL; /* NULL: x given as words */
    const char *w = (const char *)pr->w->data + (size_t)p * pr->panel_bytes;
    const float *bias = pr->bias ? pr->bias + col : NULL;
    int wdt = (int)pr->w->dtype, ldo = pr->ldo, ldx = pr->ldx, k = pr->w->cols;
    size_t pb = pr->panel_bytes;
    bool acc = pr->accumulate;
    if (wdt == KVD_DTYPE_BF16) {
        const float *pre = NULL;
        size_t ps = pr->halves_stride;
        if (pr->halves)
            pre = pr->halves + (size_t)(r0 - pr->halves_r0) * ps +
                  (size_t)(k0 - pr->halves_k0) / BF16_X_INPUTS_PER_FLOAT;
#if BF16_VDP
#define BF16_TILE_FN panel_tile_vdp
#else
#define BF16_TILE_FN panel_tile_bf16
#endif
#if !defined(KVD_VEC_AVX512)
        BF16_TILE_FN(out, ldo, x, ldx, pre, ps, w, pb, k, k0, k1, masks, bias, acc, pf, R, P);
        return;
#endif
#define BF16_TILE(R_, P_)                                                                       \
    case R_ * 8 + P_:                                                                          \
        BF16_TILE_FN(out, ldo, x, ldx, pre, ps, w, pb, k, k0, k1, masks, bias, acc, pf, R_, P_); \
        break;
        switch (R * 8 + P) {
            TILE_SHAPES(BF16_TILE)
        default: break;
        }
#undef BF16_TILE
#undef BF16_TILE_FN
        return;
    }
#if !defined(KVD_VEC_AVX512)
    panel_tile(out, ldo, x, ldx, w, pb, wdt, k0, k1, masks, bias, acc, pf, R, P);
    return;
#endif
#define TILE(R_, P_)                                                                            \
    case R_ * 8 + P_:                                                                          \
        panel_tile(out, ldo, x, ldx, w, pb, wdt, k0, k1, masks, bias, acc, pf, R_, P_);        \
        break;
    switch (R * 8 + P) {
        TILE_SHAPES(TILE)
    default: break;
    }
#undef TILE
}

/* Row tiles [t0, t1) of the m rows (split in `tiles` even tiles) against panels
 * [p, p + P), inputs [k0, k1): the panels' slice stays in L1 for all of them. Meanwhile the
 * weights that run next (`next` bytes from this slice's start) are prefetched, each tile
 * taking its share of the lines so that memory stays busy for the whole slice instead of
 * bursting while the first tile runs: a contiguous share, so that each tile's prefetches
 * run through memory in order (measured on Zen 5, lm_head at 16 rows on two threads:
 * ~25% more per CPU-second than every tile taking every t-th line pair). */
static void chunk_slice(const product *pr, int m, int tiles, int t0, int t1, int p, int P, int k0,
                        int k1, ptrdiff_t next)
{
    size_t step = (size_t)PANEL * kvd_dtype_size(pr->w->dtype); /* bytes of one (panel, k) */
    size_t span = (size_t)(k1 - k0) * step, every = (size_t)(t1 - t0);
    /* VDPBF16PS bf16 products only: the FMA tiles keep the strided shares (one thread,
     * lm_head at 16 rows, load 7: 120-133 GFLOP/s contiguous against 142-143 strided) and
     * the prefetch into L2 only. The VDPBF16PS ones prefetch into L1 too (PREFETCHT0):
     * measured on Zen 5, the products of a 16-row decode step from memory, one thread,
     * old and new alternated in one process: 7-10% less CPU time than with PREFETCHT1
     * (lm_head and down_proj most), 512 rows the same. */
    bool vdp = BF16_VDP && pr->w->dtype == KVD_DTYPE_BF16;
    for (int t = t0; t < t1; t++) {
        int r0 = (int)((int64_t)m * t / tiles), r1 = (int)((int64_t)m * (t + 1) / tiles);
        prefetch_plan pf = {.ahead = next, .every = t1 - t0, .phase = t - t0,
                            .l2_only = !vdp, .origin = (size_t)k0 * step,
                            .part = vdp ? (span / every + 127) / 128 * 128 : 0};
        run_tile(pr, r0, r1 - r0, p, P, k0, k1, pf);
    }
}

/* Panels a tile of R rows takes at once: enough accumulators in flight for few rows
 * (an FMA chain per accumulator), never more registers than there are. */
static int panels_per_tile(int R)
{
    return R <= 2 ? 4 : R <= 6 ? 2 : 1;
}

/* Rounds rows [r0, r1) of x, inputs [k0, k1), into buf for the tiles that share them
 * (as the build's bf16 tiles read them: pairs or halves). */
static void share_halves(product *pr, float *buf, int r0, int r1, int k0, int k1)
{
    size_t stride = (size_t)(k1 - k0) / BF16_X_INPUTS_PER_FLOAT;
    const float *x = pr->x ? pr->x + (size_t)r0 * pr->ldx : NULL; /* NULL: x given as words */
#if BF16_VDP
    round_to_bf16_pairs((uint32_t *)buf, stride, x, pr->ldx, r1 - r0, k0, k1 - k0, pr->w->cols);
#else
    round_to_bf16_halves(buf, stride, x, pr->ldx, r1 - r0, k0, k1 - k0, pr->w->cols);
#endif
    pr->halves = buf;
    pr->halves_stride = stride;
    pr->halves_r0 = r0;
    pr->halves_k0 = k0;
}

/* Inputs per slice of a VDPBF16PS product: as long as the panels' slice stays in L2
 * (VDP_L2_SLICE inputs of two panels: 256 KB) rather than L1, since streaming a tile's
 * weights from L2 costs VDPBF16PS nothing (measured: the same rate from 16 KB as from
 * 128-512 KB) while every slice costs each tile its start and finish, partial sums
 * parked in out. Long k is cut into near-equal slices of whole blocks, so that block
 * boundaries (the semantics) stay where they are. */
static int vdp_slice_inputs(int k)
{
#if BF16_VDP
    int slices = (k + VDP_L2_SLICE - 1) / VDP_L2_SLICE;
    int blocks = (k + VDP_BLOCK - 1) / VDP_BLOCK;
    return (blocks + slices - 1) / slices * VDP_BLOCK;
#else
    return k;
#endif
}

/* The panel group and first input of item i of a chunk's loop in tiled_product: group
 * by group, slice by slice within each (panel_outer), or slice by slice, group by group
 * within each. */
static void chunk_item(int i, bool panel_outer, int slices, int groups, int slice, int p_begin,
                       int P, int *p, int *k0)
{
    *p = p_begin + P * (panel_outer ? i / slices : i % groups);
    *k0 = (panel_outer ? i % slices : i / groups) * slice;
}

/* The vector tiles over the whole product (see the top of the file). buf (CHUNK_FLOATS
 * floats, bf16 only, or NULL) holds x rounded once for all the tiles that read it. */
static void tiled_product(const product *product_in, int m, int p_begin, int p_end, float *buf)
{
    product pr = *product_in;
    const kvd_matrix *w = pr.w;
    /* bf16 runs whole blocks of 32 inputs, the padding reading as zero */
    int k = w->dtype == KVD_DTYPE_BF16 ? (w->cols + 31) / 32 * 32 : w->cols;
    if (m <= MAX_TILE_ROWS) {
        /* every weight is used by this one tile only: stream it once over all of k */
        if (buf && (size_t)m * (size_t)k <= CHUNK_FLOATS)
            share_halves(&pr, buf, 0, m, 0, k);
        int P = panels_per_tile(m);
        for (int p = p_begin; p < p_end;) {
            int np = P;
            while (np > p_end - p)
                np /= 2;
            run_tile(&pr, 0, m, p, np, 0, k, (prefetch_plan){PREFETCH_BYTES, 1, 0, false, 0, 0});
            p += np;
        }
        return;
    }
    /* Row tiles as even as tile_rows allows (R and R-1 rows), in chunks of whole
     * tiles. When a few tiles' worth of whole x rows fit CHUNK_FLOATS (short k), a chunk
     * takes each panel once, slice by slice: its weights come from memory once per
     * chunk and its outputs stay in L1. Otherwise (long k) a chunk's x fits only slice
     * by slice: every panel runs against one slice before the next, weights rereading
     * from L2/L3 and partial sums parking in out. Either way a chunk's x (bf16: rounded
     * into buf) is at most CHUNK_FLOATS. */
    /* Small batches (decode of a few dozen sequences) run faster as tiles of up to 6
     * rows over two panels (measured: 16 sequences ~15% faster per step); prefill-sized
     * ones as 12 rows over one panel, which needs fewer widening operations per FMA.
     * VDPBF16PS widens nothing: 6 x 2 tiles, with fewer loads per instruction, whatever
     * the batch (896x896 at 512 rows: 332-352 against 310 GFLOP/s per core). */
    bool vdp = BF16_VDP && w->dtype == KVD_DTYPE_BF16;
    bool six_by_two = m <= SMALL_BATCH_ROWS || vdp;
    int tile_rows = six_by_two ? 6 : MAX_TILE_ROWS, P = six_by_two ? 2 : 1;
    int tiles = (m + tile_rows - 1) / tile_rows;
    /* floats of buf per input of a row: bf16 pairs for VDPBF16PS take half a float */
    int inputs_per_float = w->dtype == KVD_DTYPE_BF16 ? BF16_X_INPUTS_PER_FLOAT : 1;
    int slice = vdp ? vdp_slice_inputs(k) : K_SLICE;
    int whole_rows = (int)(CHUNK_FLOATS * (size_t)inputs_per_float / (size_t)k);
    bool panel_outer = whole_rows >= 4 * MAX_TILE_ROWS;
    int chunk_tiles = panel_outer ? whole_rows / tile_rows
                                  : (int)(CHUNK_FLOATS * (size_t)inputs_per_float /
                                          ((size_t)slice * tile_rows));
    size_t step = (size_t)PANEL * kvd_dtype_size(w->dtype); /* bytes of one (panel, k) */
    int slices = (k + slice - 1) / slice, groups = (p_end - p_begin + P - 1) / P;
    for (int t0 = 0; t0 < tiles; t0 += chunk_tiles) {
        int t1 = tiles - t0 < chunk_tiles ? tiles : t0 + chunk_tiles;
        int r0 = (int)((int64_t)m * t0 / tiles), r1 = (int)((int64_t)m * t1 / tiles);
        if (buf && panel_outer)
            share_halves(&pr, buf, r0, r1, 0, k);
        int items = slices * groups;
        for (int i = 0; i < items; i++) {
            int p, k0;
            chunk_item(i, panel_outer, slices, groups, slice, p_begin, P, &p, &k0);
            int np = p_end - p < P ? p_end - p : P;
            int k1 = k - k0 < slice ? k : k0 + slice;
            if (buf && !panel_outer && i % groups == 0)
                share_halves(&pr, buf, r0, r1, k0, k1);
            /* what runs next, in this chunk or the next one (down_proj's next slice
             * starts at the first group, not past the last); after the call's last item
             * the lines past it, as before: the forward pass claims a product's columns
             * chunk by chunk, so they are what a thread runs next (prefetching nothing
             * there: 0.91-0.99 per CPU-second in three bench_model pairs) */
            int j = i + 1 < items ? i + 1 : 0, next_p, next_k0;
            chunk_item(j, panel_outer, slices, groups, slice, p_begin, P, &next_p, &next_k0);
            ptrdiff_t next = (ptrdiff_t)(next_p - p) * (ptrdiff_t)pr.panel_bytes +
                             (ptrdiff_t)(next_k0 - k0) * (ptrdiff_t)step;
            if (i + 1 == items && t1 == tiles) /* the group past the last, its first slice */
                next = (ptrdiff_t)pr.panel_bytes * np - (panel_outer ? (ptrdiff_t)k0 * (ptrdiff_t)step : 0);
            chunk_slice(&pr, m, tiles, t0, t1, p, np, k0, k1, next);
        }
    }
}

/* The bf16 products the vector tiles run, with the buffer that rounds x once: on the
 * stack (CHUNK_FLOATS floats), which keeps the kernels free of allocation. */
static __attribute__((noinline)) void tiled_product_bf16(const product *pr, int m, int p_begin,
                                                          int p_end)
{
    float buf[CHUNK_FLOATS] __attribute__((aligned(64)));
    tiled_product(pr, m, p_begin, p_end, buf);
}

#if defined(KVD_VEC_AMX)
/* ---- AMX: bf16 products on tiles ----------------------------------------------------
 * Eight tiles of 16 rows x 64 bytes: C tiles 0..3 (row group g of 16, half-panel h at
 * 2g + h) hold float accumulators, A tiles 4 and 5 the two row groups' x as bf16, B
 * tiles 6 and 7 a block's 16 weight pairs of the panel's two halves, which the panel
 * layout gives at a stride of 128 bytes. One TDPBF16PS runs a block of 32 inputs for
 * 16 rows x 16 columns (8192 multiply-adds). x is rounded to bf16 a slice at a time
 * into a buffer on the stack; each panel then runs against the slice for every pair of
 * row groups, its slice of weights loaded from memory once per chunk of rows. */
#define AMX_X_WORDS (16 * 1024) /* 64 KB: a chunk of rows x a slice of inputs, as bf16 */
#define AMX_CHUNK_ROWS 128
/* Up to this many rows, the FMA tiles stream the weights faster than tiles do (measured:
 * one row ~47 GB/s against ~38 GB/s); from 3 rows on, the tiles win. The bits are the same. */
#define AMX_MIN_ROWS 3
/* How far ahead (bytes) the weights of a panel are prefetched: 2 blocks (measured best
 * of 2, 4 and 8 KB). */
#define AMX_PREFETCH_BYTES 4096

typedef struct amx_tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tile_config;

/* The 2 KB (32 lines) of a block's weights AMX_PREFETCH_BYTES ahead of wb. */
static inline void amx_prefetch_block(const char *wb)
{
    for (int line = 0; line < 32; line++)
        _mm_prefetch(wb + AMX_PREFETCH_BYTES + 64 * line, _MM_HINT_T0);
}

static void amx_configure(void)
{
    amx_tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    _tile_loadconfig(&c);
}

/* Where one C tile's 16 x 16 accumulators come from and go to: out itself when all of
 * its rows exist and its columns are owned (stride ldo), else a staging copy. */
typedef struct amx_c_tile {
    float *out;
    int rows;
    uint32_t mask;
    float stage[16 * 16] __attribute__((aligned(64)));
} amx_c_tile;

static bool amx_direct(const amx_c_tile *c)
{
    return c->rows == 16 && c->mask == 0xffffu;
}

/* The tile's accumulators before a slice, in out (direct) or staged: when the slice is
 * the first, the init value (what out held when accumulating, else 0, plus bias). */
static void amx_c_prepare(amx_c_tile *c, int ldo, const float *bias, bool first, bool accumulate)
{
    bool staged = !amx_direct(c);
    if (!first && !staged)
        return;
    v16 b = first && bias ? v16_load_mask(bias, c->mask) : v16_zero();
    for (int r = 0; r < 16; r++) {
        float *o = c->out + (size_t)r * ldo;
        v16 v = v16_zero();
        if (r < c->rows) {
            v = !first || accumulate ? v16_load_mask(o, c->mask) : v16_zero();
            if (first && bias)
                v = v16_add(v, b);
        }
        if (staged)
            v16_store(c->stage + 16 * r, v);
        else
            v16_store(o, v);
    }
}

static void amx_c_unstage(const amx_c_tile *c, int ldo)
{
    if (amx_direct(c))
        return;
    for (int r = 0; r < c->rows; r++)
        v16_store_mask(c->out + (size_t)r * ldo, v16_load(c->stage + 16 * r), c->mask);
}

static float *amx_c_base(amx_c_tile *c)
{
    return amx_direct(c) ? c->out : c->stage;
}

static long amx_c_stride(const amx_c_tile *c, int ldo)
{
    return amx_direct(c) ? (long)ldo * 4 : 64;
}

#define AMX_C_LOAD(t, c, ldo) _tile_loadd(t, amx_c_base(c), amx_c_stride(c, ldo))
#define AMX_C_STORE(t, c, ldo) _tile_stored(t, amx_c_base(c), amx_c_stride(c, ldo))

/* Rows [g0 * 16, g0 * 16 + 16 * groups) (groups 1 or 2) of the chunk against panel p over
 * the slice [s0, s1) of inputs, whose bf16 x is xs (stride words a row). */
static void amx_panel(const product *pr, int r0, int rows, int g0, int groups, int p,
                      const uint32_t *xs, size_t stride, int s0, int s1)
{
    amx_c_tile c[4];
    int ldo = pr->ldo, col = p * PANEL;
    for (int g = 0; g < groups; g++) {
        for (int h = 0; h < 2; h++) {
            amx_c_tile *t = &c[2 * g + h];
            int first_row = (g0 + g) * 16;
            t->out = pr->out + (size_t)(r0 + first_row) * ldo + col + 16 * h;
            t->rows = rows - first_row < 16 ? rows - first_row : 16;
            t->mask = column_mask(col + 16 * h, pr->n_begin, pr->n_end);
            amx_c_prepare(t, ldo, pr->bias ? pr->bias + col + 16 * h : NULL, s0 == 0,
                          pr->accumulate);
        }
    }
    AMX_C_LOAD(0, &c[0], ldo);
    AMX_C_LOAD(1, &c[1], ldo);
    const char *w = (const char *)pr->w->data + (size_t)p * pr->panel_bytes;
    const uint32_t *x0 = xs + (size_t)g0 * 16 * stride;
    int xstride = (int)(stride * 4);
    if (groups == 2) {
        AMX_C_LOAD(2, &c[2], ldo);
        AMX_C_LOAD(3, &c[3], ldo);
    }
    for (int b = s0; b < s1; b += 32) {
        const char *wb = w + (size_t)b * 64;
        amx_prefetch_block(wb);
        _tile_loadd(4, x0 + (b - s0) / 2, xstride);
        _tile_loadd(6, wb, 128);
        _tile_loadd(7, wb + 64, 128);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (groups == 2) {
            _tile_loadd(5, x0 + 16 * stride + (b - s0) / 2, xstride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    if (groups == 2) {
        AMX_C_STORE(2, &c[2], ldo);
        AMX_C_STORE(3, &c[3], ldo);
    }
    AMX_C_STORE(0, &c[0], ldo);
    AMX_C_STORE(1, &c[1], ldo);
    for (int t = 0; t < 2 * groups; t++)
        amx_c_unstage(&c[t], ldo);
}

static void amx_product(const product *pr, int m, int p_begin, int p_end)
{
    uint32_t xs[AMX_X_WORDS] __attribute__((aligned(64)));
    int k = pr->w->cols, kpad = (k + 31) / 32 * 32;
    amx_configure();
    for (int r0 = 0; r0 < m; r0 += AMX_CHUNK_ROWS) {
        int rows = m - r0 < AMX_CHUNK_ROWS ? m - r0 : AMX_CHUNK_ROWS;
        int groups = (rows + 15) / 16;
        /* the longest slice of whole blocks whose bf16 x fits the buffer */
        int slice = (int)(AMX_X_WORDS * 2 / (size_t)(groups * 16)) / 32 * 32;
        slice = slice < kpad ? slice : kpad;
        size_t stride = (size_t)slice / 2;
        for (int s0 = 0; s0 < kpad; s0 += slice) {
            int s1 = kpad - s0 < slice ? kpad : s0 + slice;
            round_to_bf16_pairs(xs, stride, pr->x + (size_t)r0 * pr->ldx, pr->ldx, rows, s0,
                                s1 - s0, k);
            /* the rows past m of the last group multiply as zeros and are not stored */
            memset(xs + (size_t)rows * stride, 0, (size_t)(groups * 16 - rows) * stride * 4);
            for (int p = p_begin; p < p_end; p++)
                for (int g = 0; g < groups; g += 2)
                    amx_panel(pr, r0, rows, g, groups - g < 2 ? 1 : 2, p, xs, stride, s0, s1);
        }
    }
    _tile_release();
}
#endif

#if BF16_VDP
/* x's inputs [c0, c1) of a row of k rounded as the VDPBF16PS tiles read them (see
 * round_to_bf16_pairs), words[i] holding inputs 2i and 2i+1; the words past the row's
 * end up to its last block of 32 are zeros when c1 == k. c0 even; c1 even or k. Only
 * the words of [c0, c1) (and that padding) are written, so that threads may round the
 * columns they computed side by side. */
void KVD_VEC_FN(kvd_bf16_round_cols)(uint32_t *words, const float *x, int k, int c0, int c1)
{
    int end = c1 == k ? (k + 31) / 32 * 32 : c1; /* inputs whose words this call writes */
    for (int i = c0; i < end; i += 32) {
        int n_words = (end - i < 32 ? end - i + 1 : 32) / 2;
        uint32_t block[16];
        v16_store_words(n_words == 16 ? words + i / 2 : block, bf16_block_words(x, i, c1));
        if (n_words < 16)
            memcpy(words + i / 2, block, (size_t)n_words * sizeof block[0]);
    }
}

/* kvd_matmul_cols over x given as words of bf16 pairs (kvd_bf16_round_cols: row r's
 * words at xw + r * xw_stride, the whole row of w->cols inputs padded to blocks of 32),
 * bf16 weights only: the same bits as from the floats they were rounded from. */
void KVD_VEC_FN(kvd_matmul_cols_words)(float *out, int ldo, const uint32_t *xw, size_t xw_stride,
                                       int m, const kvd_matrix *w, const float *bias,
                                       bool accumulate, int n_begin, int n_end)
{
    if (n_end <= n_begin || m <= 0 || w->dtype != KVD_DTYPE_BF16)
        return;
    product pr = {out, ldo, NULL, 0, w, bias, accumulate, n_begin, n_end,
                  kvd_matrix_packed_bytes(w->dtype, PANEL, w->cols), (const float *)xw,
                  xw_stride, 0, 0};
    tiled_product(&pr, m, n_begin / PANEL, (n_end + PANEL - 1) / PANEL, NULL);
}
#endif

void KVD_VEC_FN(kvd_matmul_cols)(float *out, int ldo, const float *x, int ldx, int m,
                                 const kvd_matrix *w, const float *bias, bool accumulate,
                                 int n_begin, int n_end)
{
    if (n_end <= n_begin || m <= 0)
        return;
    product pr = {out, ldo, x, ldx, w, bias, accumulate, n_begin, n_end,
                  kvd_matrix_packed_bytes(w->dtype, PANEL, w->cols), NULL, 0, 0, 0};
    int p_begin = n_begin / PANEL, p_end = (n_end + PANEL - 1) / PANEL;
#if defined(KVD_VEC_AMX)
    if (w->dtype == KVD_DTYPE_BF16 && m >= AMX_MIN_ROWS) {
        amx_product(&pr, m, p_begin, p_end);
        return;
    }
#endif
    if (w->dtype == KVD_DTYPE_BF16)
        tiled_product_bf16(&pr, m, p_begin, p_end);
    else
        tiled_product(&pr, m, p_begin, p_end, NULL);
}
