/* kernels_impl.c - matrix products, RMSNorm, RoPE and SwiGLU over the 16-lane vector.
 *
 * Compiled twice (see kvd_vec16.h): the AVX-512 build and the scalar build define
 * the same functions with the suffixes _avx512 and _scalar; kernels.c dispatches.
 *
 * Matrix product out = x W^T over packed weights (kvd_matrix in kvd_model.h): one
 * float lane per output element, which starts from its init value (0, or what out
 * holds when accumulating, plus the bias) and takes one fused multiply-add per input
 * k, in order, with x[r][k] broadcast against 32 widened weights of a panel. Nothing
 * about an element's operations depends on the blocking around it, and a partial
 * sum parked in out between slices of k is exact, which is what makes a row's result
 * independent of the batch, the column range and the thread. The blocking:
 * - up to MAX_TILE_ROWS rows (decode, small batches): one tile holds all rows and
 *   streams its panels' weights from memory once over the whole of k, with software
 *   prefetch ahead of each stream; few rows take several panels at a time so that
 *   enough independent accumulators (and memory streams) are in flight.
 * - more rows (prefill, big batches): chunks of rows; per slice of K_SLICE inputs,
 *   each panel's slice (16 KB of bf16, in L1) is run by every row tile of the chunk
 *   (tiles of up to 12 rows x 32 columns: 24 accumulators + 2 weight vectors + 1
 *   broadcast of the 32 registers; up to SMALL_BATCH_ROWS rows, 6 rows x 64 columns),
 *   the chunk's x slice staying in L2.
 */
#include "kvd_vec16.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels_internal.h"

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
/* Up to this many rows, batched tiles take two panels at a time (see kvd_matmul_cols). */
#define SMALL_BATCH_ROWS 48
/* Inputs per slice when many rows share a panel: the slice of a panel stays in L1
 * (256 x 64 B of 16-bit weights) while the chunk's row tiles run against it. */
#define K_SLICE 256
/* x floats a chunk of rows may hold per slice (the rows' slice stays in L2). */
#define CHUNK_FLOATS ((size_t)96 * 1024)
/* How far ahead (bytes) each weight stream of a streaming tile is prefetched. */
#define PREFETCH_BYTES 1024

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
 * past kk's in each panel, on one input of every `every` (phase `phase`), into L1 or
 * only L2. every = 0: none. */
typedef struct prefetch_plan {
    size_t ahead;
    int every, phase;
    bool l2_only;
} prefetch_plan;

/* One tile: R rows of x against P consecutive panels (32*P output columns starting
 * at out/bias column 0) over inputs [k0, k1). When k0 == 0 the accumulators start
 * from out (accumulate) or 0, plus bias; otherwise from the partial sums a previous
 * slice left in out. masks[2P] say which columns this call owns; only those are read
 * and written. R and P are compile-time constants at every call site so the
 * accumulators live in registers. */
V16_INLINE void panel_tile(float *out, int ldo, const float *x, int ldx, const char *w,
                           size_t panel_bytes, int wdt, int k0, int k1, const uint32_t *masks,
                           const float *bias, bool accumulate, prefetch_plan pf, int R, int P)
{
    v16 acc[MAX_TILE_ROWS][8];
KVD_UNROLL(12)
    for (int r = 0; r < R; r++) {
KVD_UNROLL(8)
        for (int h = 0; h < 2 * P; h++) {
            float *o = out + (size_t)r * ldo + 16 * h;
            if (k0 > 0 || accumulate)
                acc[r][h] = v16_load_mask(o, masks[h]);
            else
                acc[r][h] = v16_zero();
            if (k0 == 0 && bias)
                acc[r][h] = v16_add(acc[r][h], v16_load_mask(bias + 16 * h, masks[h]));
        }
    }
    size_t step = wdt == 0 ? 128 : 64; /* bytes of one (panel, k) */
    int countdown = pf.every ? pf.phase : -1;
KVD_UNROLL(2)
    for (int kk = k0; kk < k1; kk++) {
        if (countdown == 0) {
            countdown = pf.every;
KVD_UNROLL(4)
            for (int q = 0; q < P; q++) {
                const char *ahead = w + (size_t)q * panel_bytes + (size_t)kk * step + pf.ahead;
                for (size_t line = 0; line < step; line += 64) /* 1 line, 2 for f32 */
                    pf.l2_only ? v16_prefetch_l2(ahead + line) : v16_prefetch(ahead + line);
            }
        }
        countdown--;
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
KVD_UNROLL(12)
    for (int r = 0; r < R; r++)
KVD_UNROLL(8)
        for (int h = 0; h < 2 * P; h++)
            v16_store_mask(out + (size_t)r * ldo + 16 * h, acc[r][h], masks[h]);
}

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
} product;

/* Rows [r0, r0 + R) against panels [p, p + P) over inputs [k0, k1). */
static void run_tile(const product *pr, int r0, int R, int p, int P, int k0, int k1, prefetch_plan pf)
{
    uint32_t masks[8];
    for (int h = 0; h < 2 * P; h++)
        masks[h] = column_mask(p * PANEL + 16 * h, pr->n_begin, pr->n_end);
    int col = p * PANEL;
    float *out = pr->out + (size_t)r0 * pr->ldo + col;
    const float *x = pr->x + (size_t)r0 * pr->ldx;
    const char *w = (const char *)pr->w->data + (size_t)p * pr->panel_bytes;
    const float *bias = pr->bias ? pr->bias + col : NULL;
    int wdt = (int)pr->w->dtype, ldo = pr->ldo, ldx = pr->ldx;
    size_t pb = pr->panel_bytes;
    bool acc = pr->accumulate;
#if !defined(KVD_VEC_AVX512)
    panel_tile(out, ldo, x, ldx, w, pb, wdt, k0, k1, masks, bias, acc, pf, R, P);
    return;
#endif
#define TILE(R_, P_)                                                                            \
    case R_:                                                                                   \
        panel_tile(out, ldo, x, ldx, w, pb, wdt, k0, k1, masks, bias, acc, pf, R_, P_);        \
        break
    if (P == 4) {
        switch (R) {
            TILE(1, 4);
            TILE(2, 4);
        default: break;
        }
    } else if (P == 2) {
        switch (R) {
            TILE(1, 2);
            TILE(2, 2);
            TILE(3, 2);
            TILE(4, 2);
            TILE(5, 2);
            TILE(6, 2);
        default: break;
        }
    } else {
        switch (R) {
            TILE(1, 1);
            TILE(2, 1);
            TILE(3, 1);
            TILE(4, 1);
            TILE(5, 1);
            TILE(6, 1);
            TILE(7, 1);
            TILE(8, 1);
            TILE(9, 1);
            TILE(10, 1);
            TILE(11, 1);
            TILE(12, 1);
        default: break;
        }
    }
#undef TILE
}

/* Row tiles [t0, t1) of the m rows (split in `tiles` even tiles) against panels
 * [p, p + P), inputs [k0, k1): the panels' slice stays in L1 for all of them. Meanwhile the
 * weights that run next (`next` bytes past this slice's start) are prefetched into L2,
 * each tile taking its share of the lines so that memory stays busy for the whole
 * slice instead of bursting while the first tile runs. */
static void chunk_slice(const product *pr, int m, int tiles, int t0, int t1, int p, int P, int k0,
                        int k1, size_t next)
{
    for (int t = t0; t < t1; t++) {
        int r0 = (int)((int64_t)m * t / tiles), r1 = (int)((int64_t)m * (t + 1) / tiles);
        prefetch_plan pf = {.ahead = next, .every = t1 - t0, .phase = t - t0, .l2_only = true};
        run_tile(pr, r0, r1 - r0, p, P, k0, k1, pf);
    }
}

/* Panels a tile of R rows takes at once: enough accumulators in flight for few rows
 * (an FMA chain per accumulator), never more registers than there are. */
static int panels_per_tile(int R)
{
    return R <= 2 ? 4 : R <= 6 ? 2 : 1;
}

void KVD_VEC_FN(kvd_matmul_cols)(float *out, int ldo, const float *x, int ldx, int m,
                                 const kvd_matrix *w, const float *bias, bool accumulate,
                                 int n_begin, int n_end)
{
    if (n_end <= n_begin || m <= 0)
        return;
    int k = w->cols;
    product pr = {out, ldo, x, ldx, w, bias, accumulate, n_begin, n_end,
                  (size_t)PANEL * (size_t)k * kvd_dtype_size(w->dtype)};
    int p_begin = n_begin / PANEL, p_end = (n_end + PANEL - 1) / PANEL;
    if (m <= MAX_TILE_ROWS) {
        /* every weight is used by this one tile only: stream it once over all of k */
        int P = panels_per_tile(m);
        for (int p = p_begin; p < p_end;) {
            int np = P;
            while (np > p_end - p)
                np /= 2;
            run_tile(&pr, 0, m, p, np, 0, k, (prefetch_plan){PREFETCH_BYTES, 1, 0, false});
            p += np;
        }
        return;
    }
    /* Row tiles as even as tile_rows allows (R and R-1 rows), in chunks of whole
     * tiles. When a few tiles' worth of whole x rows fit CHUNK_FLOATS (short k), a chunk
     * takes each panel once, slice by slice: its weights come from memory once per
     * chunk and its outputs stay in L1. Otherwise (long k) a chunk's x fits only slice
     * by slice: every panel runs against one slice before the next, weights rereading
     * from L2/L3 and partial sums parking in out. */
    /* Small batches (decode of a few dozen sequences) run faster as tiles of up to 6
     * rows over two panels (measured: 16 sequences ~15% faster per step); prefill-sized
     * ones as 12 rows over one panel, which needs fewer widening operations per FMA. */
    int tile_rows = m <= SMALL_BATCH_ROWS ? 6 : MAX_TILE_ROWS, P = m <= SMALL_BATCH_ROWS ? 2 : 1;
    int tiles = (m + tile_rows - 1) / tile_rows;
    int whole_rows = (int)(CHUNK_FLOATS / (size_t)k);
    bool panel_outer = whole_rows >= 4 * MAX_TILE_ROWS;
    int chunk_tiles = panel_outer ? whole_rows / tile_rows
                                  : (int)(CHUNK_FLOATS / ((size_t)K_SLICE * tile_rows));
    size_t step = pr.panel_bytes / (size_t)k; /* bytes of one (panel, k) */
    int slices = (k + K_SLICE - 1) / K_SLICE, groups = (p_end - p_begin + P - 1) / P;
    for (int t0 = 0; t0 < tiles; t0 += chunk_tiles) {
        int t1 = tiles - t0 < chunk_tiles ? tiles : t0 + chunk_tiles;
        for (int i = 0; i < slices * groups; i++) {
            int p = p_begin + P * (panel_outer ? i / slices : i % groups);
            int np = p_end - p < P ? p_end - p : P;
            int k0 = (panel_outer ? i % slices : i / groups) * K_SLICE;
            int k1 = k - k0 < K_SLICE ? k : k0 + K_SLICE;
            size_t next = panel_outer ? (size_t)(k1 - k0) * step : pr.panel_bytes * (size_t)np;
            chunk_slice(&pr, m, tiles, t0, t1, p, np, k0, k1, next);
        }
    }
}

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
