/* kernels_impl.c - matrix products, RMSNorm, RoPE and SwiGLU over the 16-lane vector.
 *
 * Compiled twice (see kvd_vec16.h): the AVX-512 build and the scalar build define
 * the same functions with the suffixes _avx512 and _scalar; kernels.c dispatches.
 *
 * Matrix product out = x W^T: every output element is one 16-lane accumulator
 * advanced by FMAs over k in order, reduced by the fixed tree of v16_hsum, plus the
 * bias. Only the blocking around that changes with the shape, never the operations
 * of an element, which is what makes a row's result independent of the batch:
 * - few rows (decode): weights stream from memory once, widened in registers;
 *   a tile is up to 3 rows by 6..8 columns of accumulators.
 * - four rows or more (prefill): a panel of weight rows is widened once into
 *   per-thread scratch and reused by every 4-row tile; a tile is 4 rows by 6 columns
 *   (24 accumulators + 6 weight vectors + 1 input vector = 31 of the 32 registers).
 *   Long inputs (k > LONG_K) go in slices so the tile's weights stay in L1, the
 *   accumulators parked in scratch between slices (exact, so still the same result).
 */
#include "kvd_vec16.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels_internal.h"

/* Weight rows widened per panel: 512 KB of floats, half of a Zen 5 core's L2; every
 * panel rereads all of x, so wider panels mean less traffic (measured best of 64K,
 * 96K, 128K floats). */
#define PANEL_FLOATS ((size_t)128 * 1024)
#define TILE_ROWS 4
#define PREFETCH_BYTES 32768
#define TILE_COLS 6
/* Past LONG_K inputs (down_proj's 4864) see long_k_product; LONG_K_ROWS and K_BLOCK
 * measured best among 16..64 rows and 256..2432 inputs (+25% on 896x4864 over one
 * full-k pass per tile: ~165 against ~130 GFLOP/s per core). */
#define LONG_K 2048
#define LONG_K_ROWS 32
#define K_BLOCK 1024

/* One tile: R rows of x by C consecutive weight rows over inputs [k0, k1). The
 * accumulators start at zero when k0 == 0, else from spill (R*C vectors); when k1 < k
 * they are saved back to spill, otherwise reduced into out. Saving and reloading a
 * vector is exact, so slicing k changes no result. R and C are compile-time constants
 * at every call site so the accumulators live in registers. */
V16_INLINE void tile(float *out, int ldo, const float *x, int ldx, const void *w, int wdt,
                     size_t wld, int k0, int k1, int k, v16 *spill, const float *bias,
                     bool accumulate, int R, int C)
{
    v16 acc[TILE_ROWS][8];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int c = 0; c < C; c++)
            acc[r][c] = k0 == 0 ? v16_zero() : spill[c * R + r];
    int kk = k0;
    for (; kk + 16 <= k1; kk += 16) {
        if (R < TILE_ROWS && (kk & 31) == 0) {
            /* Few rows stream the weights from memory once: ask for them ~32 KB ahead
             * (two 8-row groups of a 896-wide bf16 matrix), one line per row per 32 k.
             * The hardware prefetcher alone reached ~75% of this. */
#pragma GCC unroll 8
            for (int c = 0; c < C; c++)
                v16_prefetch((const char *)w + ((size_t)c * wld + (size_t)kk) * (wdt == 0 ? 4 : 2) +
                             PREFETCH_BYTES);
        }
        v16 wv[8];
#pragma GCC unroll 8
        for (int c = 0; c < C; c++)
            wv[c] = v16_load_any(w, wdt, (size_t)c * wld + (size_t)kk);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            v16 xv = v16_load(x + (size_t)r * ldx + kk);
#pragma GCC unroll 8
            for (int c = 0; c < C; c++)
                acc[r][c] = v16_fma(xv, wv[c], acc[r][c]);
        }
    }
    if (kk < k1) {
        int n = k1 - kk;
        v16 wv[8];
#pragma GCC unroll 8
        for (int c = 0; c < C; c++)
            wv[c] = v16_load_any_n(w, wdt, (size_t)c * wld + (size_t)kk, n);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            v16 xv = v16_load_n(x + (size_t)r * ldx + kk, n);
#pragma GCC unroll 8
            for (int c = 0; c < C; c++)
                acc[r][c] = v16_fma(xv, wv[c], acc[r][c]);
        }
    }
    if (k1 < k) {
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
#pragma GCC unroll 8
            for (int c = 0; c < C; c++)
                spill[c * R + r] = acc[r][c];
        return;
    }
    /* Reduce four accumulators at a time (same tree as v16_hsum), in (r, c) order. */
    float sums[TILE_ROWS * 8];
    int i = 0;
#pragma GCC unroll 8
    for (; i + 4 <= R * C; i += 4)
        v16_hsum4(acc[i / C][i % C], acc[(i + 1) / C][(i + 1) % C], acc[(i + 2) / C][(i + 2) % C],
                  acc[(i + 3) / C][(i + 3) % C], sums + i);
#pragma GCC unroll 8
    for (; i < R * C; i++)
        sums[i] = v16_hsum(acc[i / C][i % C]);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
#pragma GCC unroll 8
        for (int c = 0; c < C; c++) {
            float v = sums[r * C + c];
            if (bias)
                v += bias[c];
            float *o = out + (size_t)r * ldo + c;
            *o = accumulate ? *o + v : v;
        }
    }
}

/* R rows of x starting at X against ncols weight rows, written at O: tiles of C
 * columns, then single columns for the remainder. */
#define COLS_LOOP(O, X, R, C)                                                                  \
    do {                                                                                       \
        int c0_ = 0;                                                                           \
        for (; c0_ + (C) <= ncols; c0_ += (C))                                                 \
            tile((O) + c0_, ldo, (X), ldx, (const char *)w + (size_t)c0_ * wld * esize, wdt,   \
                 wld, 0, k, k, NULL, bias ? bias + c0_ : NULL, accumulate, (R), (C));          \
        for (; c0_ < ncols; c0_++)                                                             \
            tile((O) + c0_, ldo, (X), ldx, (const char *)w + (size_t)c0_ * wld * esize, wdt,   \
                 wld, 0, k, k, NULL, bias ? bias + c0_ : NULL, accumulate, (R), 1);            \
    } while (0)

/* All m rows against ncols weight rows starting at w (row stride wld), full k. */
static void block_product(float *out, int ldo, const float *x, int ldx, int m, const void *w,
                          int wdt, size_t wld, int k, const float *bias, bool accumulate,
                          int ncols)
{
    size_t esize = wdt == 0 ? 4 : 2;
    int r0 = 0;
    for (; r0 + TILE_ROWS <= m; r0 += TILE_ROWS)
        COLS_LOOP(out + (size_t)r0 * ldo, x + (size_t)r0 * ldx, TILE_ROWS, TILE_COLS);
    float *o = out + (size_t)r0 * ldo;
    const float *xr = x + (size_t)r0 * ldx;
    switch (m - r0) {
    case 3: COLS_LOOP(o, xr, 3, 6); break;
    case 2: COLS_LOOP(o, xr, 2, 8); break;
    case 1: COLS_LOOP(o, xr, 1, 8); break;
    default: break;
    }
}

/* One slice [k0, k1) of R rows (1..4) against C (TILE_COLS or 1) weight rows. */
static void long_k_tile(float *out, int ldo, const float *x, int ldx, const void *w, int wdt, int k,
                        int k0, int k1, v16 *spill, const float *bias, bool accumulate, int R,
                        int C)
{
#define LONG_K_TILE(R_, C_)                                                                    \
    tile(out, ldo, x, ldx, w, wdt, (size_t)k, k0, k1, k, spill, bias, accumulate, R_, C_)
    if (C == TILE_COLS) {
        switch (R) {
        case 4: LONG_K_TILE(4, TILE_COLS); break;
        case 3: LONG_K_TILE(3, TILE_COLS); break;
        case 2: LONG_K_TILE(2, TILE_COLS); break;
        default: LONG_K_TILE(1, TILE_COLS); break;
        }
    } else {
        switch (R) {
        case 4: LONG_K_TILE(4, 1); break;
        case 3: LONG_K_TILE(3, 1); break;
        case 2: LONG_K_TILE(2, 1); break;
        default: LONG_K_TILE(1, 1); break;
        }
    }
#undef LONG_K_TILE
}

/* Long inputs (k > LONG_K): four x rows no longer fit in L1 next to the weights, and
 * streaming both from L2 costs a third of the FMA rate. So, per chunk of LONG_K_ROWS
 * rows (their x stays in L2), each group of TILE_COLS weight rows is walked in slices
 * of K_BLOCK inputs; within a slice every 4-row tile of the chunk runs against it (the
 * slice's weights stay in L1, widened in registers: widening once into scratch cost
 * more, as it is redone per chunk), its accumulators parked in scratch between slices. */
static void long_k_product(float *out, int ldo, const float *x, int ldx, int m,
                           const kvd_matrix *w, const float *bias, bool accumulate, int n_begin,
                           int n_end, float *scratch)
{
    int k = w->cols, wdt = (int)w->dtype;
    size_t esize = wdt == 0 ? 4 : 2;
    v16 *spill = (v16 *)scratch;
    for (int rc = 0; rc < m; rc += LONG_K_ROWS) {
        int rows = m - rc < LONG_K_ROWS ? m - rc : LONG_K_ROWS;
        for (int c0 = n_begin; c0 < n_end;) {
            int C = n_end - c0 >= TILE_COLS ? TILE_COLS : 1;
            const char *src = (const char *)w->data + (size_t)c0 * (size_t)k * esize;
            for (int k0 = 0; k0 < k; k0 += K_BLOCK) {
                int k1 = k - k0 > K_BLOCK ? k0 + K_BLOCK : k;
                for (int r0 = 0; r0 < rows; r0 += TILE_ROWS) {
                    int R = rows - r0 < TILE_ROWS ? rows - r0 : TILE_ROWS;
                    long_k_tile(out + (size_t)(rc + r0) * ldo + c0, ldo, x + (size_t)(rc + r0) * ldx,
                                ldx, src, wdt, k, k0, k1, spill + (size_t)(r0 / TILE_ROWS) * TILE_ROWS * TILE_COLS,
                                bias ? bias + c0 : NULL, accumulate, R, C);
                }
            }
            c0 += C;
        }
    }
}

/* Weight rows widened per panel (at least one tile's worth). */
static int panel_rows_for(int k)
{
    int rows = (int)(PANEL_FLOATS / (size_t)k);
    rows -= rows % TILE_COLS;
    return rows > TILE_COLS ? rows : TILE_COLS;
}

size_t KVD_VEC_FN(kvd_matmul_scratch_floats)(int k)
{
    if (k > LONG_K) /* the parked accumulators of a chunk's tiles */
        return (size_t)LONG_K_ROWS * TILE_COLS * 16;
    return (size_t)panel_rows_for(k) * (size_t)k;
}

void KVD_VEC_FN(kvd_matmul_cols)(float *out, int ldo, const float *x, int ldx, int m,
                                 const kvd_matrix *w, const float *bias, bool accumulate,
                                 int n_begin, int n_end, float *scratch)
{
    int k = w->cols;
    int wdt = (int)w->dtype;
    size_t esize = wdt == 0 ? 4 : 2;
    if (n_end <= n_begin || m <= 0)
        return;
    if (m < TILE_ROWS) {
        /* Few rows: each widened weight is used m times at most, stream it. */
        block_product(out + n_begin, ldo, x, ldx, m,
                      (const char *)w->data + (size_t)n_begin * (size_t)k * esize, wdt,
                      (size_t)k, k, bias ? bias + n_begin : NULL, accumulate, n_end - n_begin);
        return;
    }
    if (k > LONG_K) {
        long_k_product(out, ldo, x, ldx, m, w, bias, accumulate, n_begin, n_end, scratch);
        return;
    }
    if (wdt == 0) {
        /* f32 weights need no widening: tiles read them in place */
        block_product(out + n_begin, ldo, x, ldx, m, (const float *)w->data + (size_t)n_begin * k,
                      0, (size_t)k, k, bias ? bias + n_begin : NULL, accumulate, n_end - n_begin);
        return;
    }
    int panel_rows = panel_rows_for(k);
    for (int n0 = n_begin; n0 < n_end; n0 += panel_rows) {
        int pn = n_end - n0 < panel_rows ? n_end - n0 : panel_rows;
        const char *src = (const char *)w->data + (size_t)n0 * (size_t)k * esize;
        size_t total = (size_t)pn * (size_t)k;
        size_t i = 0;
        for (; i + 16 <= total; i += 16)
            v16_store(scratch + i, v16_load_any(src, wdt, i));
        if (i < total)
            v16_store_n(scratch + i, v16_load_any_n(src, wdt, i, (int)(total - i)), (int)(total - i));
        block_product(out + n0, ldo, x, ldx, m, scratch, 0, (size_t)k, k,
                      bias ? bias + n0 : NULL, accumulate, pn);
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
