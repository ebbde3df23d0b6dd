/* kvd_kv.h - the paged KV cache: block pool, block tables, copy-on-write, prefix cache.
 *
 * KV memory is one arena of fixed-size blocks allocated once from configuration.
 * A block holds, for every layer, the keys and values of block_size consecutive
 * token positions. Sequences never own contiguous buffers: each owns a
 * kvd_block_table listing the physical blocks of its logical positions. Blocks are
 * reference counted; fork shares them, writing into a shared block copies it first.
 * Full blocks are identified by a chained xxHash of (previous block's hash, token
 * ids) and kept in a prefix cache: a block whose count drops to zero stays cached
 * and reusable until the pool needs it (least recently used first).
 *
 * Threading: a pool and its tables are used by one thread at a time (the engine).
 * Ownership: the pool owns the arena; tables are embedded in their owner and must be
 * released (kvd_block_table_release) against the same pool before it is destroyed.
 */
#ifndef KVD_KV_H
#define KVD_KV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_error.h"
#include "kvd/kvd_model.h"

typedef struct kvd_kv_config {
    int num_layers;
    int num_kv_heads;
    int head_dim;
    int block_size;           /* tokens per block: a power of two in 1..256 (default 16) */
    kvd_dtype dtype;          /* element type of K and V: F16 (default), BF16, F32, I8 or F8 */
    size_t num_blocks;        /* if non-zero, the pool holds exactly this many blocks */
    size_t cache_bytes;       /* otherwise: as many blocks as fit in these bytes */
    bool enable_prefix_cache;
} kvd_kv_config;

typedef struct kvd_kv_stats {
    int64_t blocks_total;
    int64_t blocks_used;        /* reference count > 0 */
    int64_t blocks_cached;      /* count 0 but holding a cached full block, reusable */
    int64_t blocks_free;        /* count 0, holding nothing */
    int64_t tokens_stored;      /* token slots written in used blocks (a shared block counts once) */
    int64_t bytes_wasted;       /* bytes of used blocks not holding a token (partly filled blocks) */
    size_t pool_bytes;          /* bytes of the arena: blocks_total * block_bytes */
    size_t block_bytes;
    kvd_dtype dtype;            /* element type of the pages (kvd_dtype_name names it) */
    uint64_t prefix_queries;        /* lookups */
    uint64_t prefix_query_tokens;   /* tokens asked for in lookups */
    uint64_t prefix_hits;           /* lookups that reused at least one block */
    uint64_t prefix_hit_tokens;     /* tokens served from the cache */
    uint64_t evictions;             /* cached blocks reclaimed for new allocations */
    uint64_t cow_copies;            /* blocks copied before a write */
} kvd_kv_stats;

typedef struct kvd_kv_pool kvd_kv_pool;

/* A sequence's view of its KV: blocks[i] holds logical positions
 * [i*block_size, (i+1)*block_size). */
typedef struct kvd_block_table {
    int32_t *blocks;      /* physical block ids, [num_blocks] */
    int num_blocks;
    int capacity;         /* allocated length of blocks[] and hashes[] */
    int num_tokens;       /* positions with a reserved slot */
    int num_cached;       /* leading full blocks committed to the prefix cache (hashed, and
                             registered unless an identical block already was) */
    uint64_t *hashes;     /* chained hash of each committed block, [num_cached] */
} kvd_block_table;

/* Bytes one block occupies: 2 * layers * kv_heads * block_size * head_dim * elem, each
 * layer's K and V slice rounded up to 64 bytes (only tiny test shapes need padding).
 * 0 for a config whose shape fields are out of range. */
size_t kvd_kv_block_bytes(const kvd_kv_config *cfg);

/* Creates the pool. Fails with KVD_EINVAL (message names the field) on a bad block
 * size, dtype, or a budget smaller than one block; KVD_ENOMEM if the arena cannot be
 * allocated. */
kvd_kv_pool *kvd_kv_pool_create(const kvd_kv_config *cfg, kvd_error *err);
void kvd_kv_pool_destroy(kvd_kv_pool *pool);
/* The configuration in use; num_blocks holds the actual block count even when the pool
 * was sized from cache_bytes. */
const kvd_kv_config *kvd_kv_pool_config(const kvd_kv_pool *pool);

/* Storage of one block for one layer: [num_kv_heads][block_size][head_dim] elements of
 * the pool's dtype, keys and values separately. An int8 or fp8 pool follows the values
 * with [num_kv_heads][block_size] f16 scales, one per row of head_dim values (a row's
 * value is scale * int8 or scale * e4m3; see kvd_attention.h), so a page is still one
 * self-contained piece of memory: copy-on-write and the prefix cache move it as any
 * other. */
void *kvd_kv_block_keys(const kvd_kv_pool *pool, int32_t block, int layer);
void *kvd_kv_block_values(const kvd_kv_pool *pool, int32_t block, int layer);

/* True for the 8-bit KV dtypes whose rows carry an f16 scale (int8, fp8). */
static inline bool kvd_kv_dtype_row_scaled(kvd_dtype dtype)
{
    return dtype == KVD_DTYPE_I8 || dtype == KVD_DTYPE_F8;
}

void kvd_block_table_init(kvd_block_table *table);
/* Grows the table's arrays to hold n_tokens positions, so later appends up to that
 * length never allocate (call at admission; the decode step then stays malloc-free).
 * Returns 0 or KVD_ENOMEM (table unchanged). */
int kvd_block_table_reserve(const kvd_kv_pool *pool, kvd_block_table *table, int n_tokens,
                            kvd_error *err);
/* Drops the table's references (registered full blocks stay cached) and empties it;
 * keeps its arrays for reuse. Blocks whose count reaches zero are pushed tail block
 * first: cached ones to the recently-used end of the LRU list (so a prefix's tail is
 * evicted before its head), the others to the free list. */
void kvd_block_table_release(kvd_kv_pool *pool, kvd_block_table *table);
/* Release, then free the arrays. */
void kvd_block_table_deinit(kvd_kv_pool *pool, kvd_block_table *table);

/* Blocks that appending n_tokens would take from the pool (new blocks plus a copy of
 * a shared partly filled last block). */
int kvd_kv_blocks_needed(const kvd_kv_pool *pool, const kvd_block_table *table, int n_tokens);
/* Blocks that can be handed out now: free plus cached-but-unreferenced. */
int64_t kvd_kv_available_blocks(const kvd_kv_pool *pool);
/* True when a sequence of n_tokens could fit in the whole, otherwise empty pool. */
bool kvd_kv_can_ever_fit(const kvd_kv_pool *pool, int n_tokens);

/* Reserves slots for n_tokens more positions, allocating blocks (evicting cached
 * ones LRU-first if needed) and copying a shared last block before it is written.
 * All or nothing: on KVD_ENOSPC the table and pool are unchanged. */
int kvd_block_table_append(kvd_kv_pool *pool, kvd_block_table *table, int n_tokens, kvd_error *err);

/* dst (empty) shares every block of src; reference counts go up. KVD_ESTATE if dst is
 * not empty, KVD_ENOMEM if dst's arrays cannot grow (nothing changes on failure). */
int kvd_block_table_fork(kvd_kv_pool *pool, const kvd_block_table *src, kvd_block_table *dst,
                         kvd_error *err);

/* On an empty table: attaches the longest run of cached full blocks matching the
 * prefix of tokens[0..n_tokens) (hash hit confirmed by comparing token ids and the
 * parent block), covering at most n_tokens - 1 tokens so the last one is always
 * computed. Returns the number of tokens covered (a multiple of block_size; 0 when
 * disabled or no hit); KVD_ESTATE if the table is not empty, KVD_EINVAL on a negative
 * count or NULL tokens. */
int kvd_prefix_cache_lookup(kvd_kv_pool *pool, kvd_block_table *table, const int32_t *tokens,
                            int n_tokens);

/* Registers the table's full blocks whose K/V are now computed (positions
 * [0, n_computed) hold tokens[0..n_computed)) in the prefix cache. Idempotent. A block
 * is not registered when an identical block is already cached (two requests computed
 * the same prefix) or when its predecessor is not registered itself. */
void kvd_prefix_cache_commit(kvd_kv_pool *pool, kvd_block_table *table, const int32_t *tokens,
                             int n_computed);

void kvd_kv_stats_get(const kvd_kv_pool *pool, kvd_kv_stats *out);

/* Per-block state for visualisation: state[i] = 0 free, 1 cached, 2 used, 3 shared
 * (count > 1); refcounts[i] may be NULL. Both of length blocks_total. */
void kvd_kv_block_states(const kvd_kv_pool *pool, uint8_t *state, int32_t *refcounts);

/* Debug invariant check, given every live table of the pool: each block is referenced
 * exactly as often as the tables hold it (the cache holds no references), each
 * unreferenced block is on exactly one free list, list links, fills, token counts and
 * the hash map are consistent, and cached children are evicted before their parents.
 * Returns 0 or KVD_ESTATE with the first violation described in err. O(blocks). */
int kvd_kv_check_invariants(const kvd_kv_pool *pool, const kvd_block_table *const *tables,
                            int num_tables, kvd_error *err);

/* ---- the disk tier's hooks (kvd_kvdisk.h stores the pages; the engine connects them) ---- */

/* What names a full page beyond the pool: its chained hash, its parent's, and a second
 * chain (XXH64 of the token ids seeded by the parent's check) that a page found by
 * hash must match as well, so a 64-bit collision in either chain alone cannot serve
 * another prefix. */
typedef struct kvd_kv_page_key {
    uint64_t hash;
    uint64_t parent_hash;
    uint64_t check;
} kvd_kv_page_key;

/* A registered page as the pool holds it: valid only during the callback. */
typedef struct kvd_kv_page {
    kvd_kv_page_key key;
    const int32_t *tokens;    /* [block_size] */
    const void *data;         /* block_bytes */
} kvd_kv_page;

typedef void (*kvd_kv_evict_fn)(void *arg, const kvd_kv_page *page);

/* hook(arg, page) runs when a cached page's block is about to be reused (on the
 * pool's thread, inside an allocation): the last moment its bytes exist. NULL: none. */
void kvd_kv_pool_set_evict_hook(kvd_kv_pool *pool, kvd_kv_evict_fn hook, void *arg);
/* Calls fn for every registered page, used or cached (a flush at shutdown). */
void kvd_kv_pool_for_each_page(const kvd_kv_pool *pool, kvd_kv_evict_fn fn, void *arg);

/* After a lookup: the keys of the prompt's next full blocks beyond the table's (those a
 * RAM lookup missed), at most max_keys, never the block holding the last token.
 * Returns how many were written (0 when disabled or the table's last block is not the
 * registered one of its hash). */
int kvd_prefix_cache_next_keys(const kvd_kv_pool *pool, const kvd_block_table *table, const int32_t *tokens,
                               int n_tokens, kvd_kv_page_key *keys, int max_keys);

/* The whole block (block_bytes, every layer's K and V) as one piece of memory. */
void *kvd_kv_block_data(const kvd_kv_pool *pool, int32_t block);

/* Gives back the table's blocks beyond n_tokens (a multiple of block_size, at most
 * num_tokens), e.g. those a failed disk load was meant to fill. KVD_EINVAL otherwise. */
int kvd_block_table_truncate(kvd_kv_pool *pool, kvd_block_table *table, int n_tokens);

/* The chained block hash: seed is the previous block's hash (a fixed constant for the
 * first block), ids one block's token ids. The default is XXH3_64bits_withSeed. */
typedef uint64_t (*kvd_kv_block_hash_fn)(uint64_t seed, const int32_t *ids, int n);

/* For tests: replaces the block hash, e.g. by a deliberately weak one so collisions
 * exercise the token-id confirmation. Only while no block is cached (else KVD_ESTATE). */
int kvd_kv_pool_set_block_hash(kvd_kv_pool *pool, kvd_kv_block_hash_fn hash, kvd_error *err);

#endif
