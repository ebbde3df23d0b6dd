/* kvd_attention.h - causal grouped-query attention over the paged KV cache.
 *
 * A sequence's keys and values live in the pool's blocks, found through its block
 * table (kvd_kv.h); nothing here owns a contiguous cache. The forward pass first
 * stores each new token's K (after RoPE) and V into its slot with kvd_kv_store,
 * rounding to the pool's dtype, then runs attention, so a token attends to its own
 * rounded K/V exactly as later steps will see them.
 *
 * int8 pages: a row x of head_dim values (one head's K or V of one token) is stored
 * once, when written, as the f16 scale d = f16(max|x| / 127) and q_i = round(x_i / d)
 * (nearest even, clamped to +-127; all zero when d is 0), never re-quantized.
 * Attention reads the pages directly (no dequantized copy of the cache exists): each
 * query head's q is quantized the same way, once per call, and q.k is an exact integer
 * sum (VPDPBUSD on AVX-512 VNNI CPUs; others with AVX-512 run int8 pages on the scalar
 * build), s = (float)(q8.k8) * (dk * (dq * scale)); V rows are widened to floats
 * unscaled and each token's dv multiplies its softmax weight, once per token and head.
 *
 * fp8 pages (OCP e4m3: 4 exponent bits, bias 7, 3 mantissa bits, largest 448, no inf):
 * a row is stored once as the f16 scale d = f16(max|x| / 448) and the e4m3 nearest to
 * x_i / d (ties to even mantissa, magnitudes past 448 saturate to 448, so no NaN or
 * infinity is ever written; all zero when d is 0). Attention widens each e4m3 byte
 * exactly (its bits shifted into an f16 are the value / 2^8: VPMOVZXBW, shifts and
 * VCVTPH2PS on AVX-512, the same bits in the scalar build) and computes q.k in floats,
 * s = dot(q, k') * (256 dk * scale); V as int8's, with 256 dv on each softmax weight.
 *
 * Determinism: the keys of a query at position p are visited in logical position
 * order in fixed tiles of KVD_ATTENTION_TILE positions ([0, 32), [32, 64), ...)
 * whatever the block size, whether blocks came from the prefix cache, how many
 * queries run together, the work split or the thread count. Each tile updates a
 * numerically stable online softmax (running max, rescaled sum and output) with one
 * defined sequence of operations, so the result of a query depends only on its
 * position, its q and the K/V of positions 0..p.
 */
#ifndef KVD_ATTENTION_H
#define KVD_ATTENTION_H

#include <stddef.h>

#include "kvd/kvd_error.h"
#include "kvd/kvd_kernels.h"
#include "kvd/kvd_kv.h"

#define KVD_ATTENTION_TILE 32

typedef struct kvd_attention_shape {
    int num_heads;    /* query heads */
    int num_kv_heads; /* key/value heads; query head h reads kv head h / (num_heads / num_kv_heads) */
    int head_dim;     /* <= 256 */
    float scale;      /* score multiplier, 1/sqrt(head_dim) */
} kvd_attention_shape;

/* The query rows of one sequence: row i sits at position first_pos + i and attends
 * to positions 0..first_pos + i, which must all be stored in table. */
typedef struct kvd_attention_query {
    const kvd_block_table *table;
    int first_pos;
    int num_rows;
    const float *q; /* (num_rows, q_stride): head h at h*head_dim */
    int q_stride;
    float *out;     /* (num_rows, out_stride): head h at h*head_dim */
    int out_stride;
} kvd_attention_query;

/* Floats of per-thread scratch kvd_paged_attention_part needs. */
size_t kvd_attention_scratch_floats(const kvd_attention_shape *shape);

/* Rows [row_begin, row_end) of query q, for the query heads of kv head kv_head, on
 * layer `layer` of pool. Any split of (query, kv head, row range) over threads gives
 * the same result. scratch: kvd_attention_scratch_floats floats, 64-byte aligned. */
void kvd_paged_attention_part(kvd_isa isa, const kvd_kv_pool *pool, int layer,
                              const kvd_attention_shape *shape, const kvd_attention_query *q,
                              int kv_head, int row_begin, int row_end, float *scratch);

/* Every row of every query with num_threads OpenMP threads (<= 0: all cores); allocates
 * its scratch (for tests and tools). Returns 0, KVD_EINVAL (a position not stored in
 * its table, bad shape) or KVD_ENOMEM. */
int kvd_paged_attention(kvd_isa isa, const kvd_kv_pool *pool, int layer,
                        const kvd_attention_shape *shape, const kvd_attention_query *queries,
                        int num_queries, int num_threads, kvd_error *err);

/* Stores the K and V of position pos (k, v: num_kv_heads*head_dim floats each) of
 * layer `layer` into the slot table reserved for it, converted to the pool's dtype
 * (round to nearest even). */
void kvd_kv_store(kvd_isa isa, const kvd_kv_pool *pool, int layer, const kvd_block_table *table,
                  int pos, const float *k, const float *v);
/* kvd_kv_store of kv heads [head_begin, head_end) only (k and v still point at head 0),
 * so that threads owning different heads store them without waiting for each other. */
void kvd_kv_store_heads(kvd_isa isa, const kvd_kv_pool *pool, int layer,
                        const kvd_block_table *table, int pos, const float *k, const float *v,
                        int head_begin, int head_end);

#endif
