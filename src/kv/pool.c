/* pool.c - the paged KV cache: block pool, block tables, copy-on-write, prefix cache.
 *
 * One anonymous mapping holds every block; a block is [num_layers][K|V][slice] where a
 * slice is [num_kv_heads][block_size][head_dim] elements rounded up to 64 bytes, so a
 * copy-on-write is a few memcpys and attention addresses a block with one multiply.
 * Block metadata lives in a side array (kv_block) with the links of two intrusive
 * doubly linked lists: `free_list` for blocks holding nothing and `lru` for blocks no
 * table holds but whose full contents stay registered in the prefix cache, least
 * recently used at the head. Allocation takes from free_list first and evicts the lru
 * head only when nothing else is left, so cached prefixes live as long as possible.
 * Every operation on a block is O(1): a prefix-cache hit unlinks the block from the
 * middle of `lru`, a release pushes a table's blocks tail-first so a prefix's tail is
 * evicted before its head.
 *
 * The prefix cache maps the chained hash of a full block (XXH3 of its token ids, seeded
 * with the previous block's hash) to the block, in an open-addressing table with linear
 * probing and backward-shift deletion (no tombstones). A hit is confirmed, never
 * trusted: the block's stored token ids must equal the prompt's, and its recorded
 * parent (block id and the registration generation of that block) must be the block
 * matched one step earlier, so a 64-bit collision can cost a hit but never serve
 * another prefix's K/V. Only one block per hash is registered; a duplicate computed by
 * a concurrent request stays private and returns to free_list when released.
 *
 * Accounting is kept incrementally (tokens in used blocks, list lengths), so stats are
 * O(1); kvd_kv_check_invariants recomputes everything from scratch.
 */
#include "kvd/kvd_kv.h"
#include "kvd/kvd_hugemem.h"

#include <assert.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

enum {
    KV_SLICE_ALIGN = 64,
    KV_MAX_SHAPE = 4096,      /* bound on layers, heads, head_dim: keeps sizes in range */
    KV_MAX_BLOCK_SIZE = 256,
    KV_MIN_TABLE_CAPACITY = 8,
};
/* Seed of the first block of every prefix ("kvd-kv-1"). */
#define KV_ROOT_SEED UINT64_C(0x6b76642d6b762d31)
/* Seed of the first block's second chain ("kvd-chk-"). */
#define KV_ROOT_CHECK UINT64_C(0x6b76642d63686b2d)

typedef struct kv_block {
    int32_t ref;          /* tables holding the block */
    int32_t fill;         /* slots reserved by its holders: 0 when free, block_size when cached */
    int32_t prev, next;   /* links in free_list or lru while ref == 0, else -1 */
    int32_t parent;       /* registered: block of the previous positions, -1 for a first block */
    uint32_t gen;         /* bumped at every registration, so a parent link cannot go stale */
    uint32_t parent_gen;  /* parent's gen when this block was registered */
    bool registered;      /* in the hash map (then its token ids are in block_tokens) */
    uint64_t hash;        /* chained hash, valid while registered */
    uint64_t parent_hash; /* the parent's chained hash (KV_ROOT_SEED for a first block) */
    uint64_t check;       /* second chain (XXH64, seeded by the parent's): the disk tier's confirmation */
} kv_block;

typedef struct kv_list {
    int32_t head, tail;
    int32_t len;
} kv_list;

typedef struct kv_map_slot {
    uint64_t key;
    int32_t block;        /* -1: empty */
} kv_map_slot;

struct kvd_kv_pool {
    kvd_kv_config cfg;            /* num_blocks filled in with the actual count */
    int32_t num_blocks;
    int block_size;
    size_t slice_bytes;           /* one layer's K (or V) of one block, multiple of 64 */
    size_t block_bytes;           /* num_layers * 2 * slice_bytes */
    uint8_t *arena;               /* [num_blocks][num_layers][2][slice_bytes], 64-byte aligned */
    size_t mapping_bytes;         /* what kvd_huge_free needs */
    kv_block *blocks;             /* [num_blocks] */
    int32_t *block_tokens;        /* [num_blocks][block_size] token ids of registered blocks */
    kv_list free_list;            /* count 0, holding nothing; taken from the head */
    kv_list lru;                  /* count 0, registered; head least recently used */
    kv_map_slot *map;             /* [map_mask + 1], load <= 1/2 */
    size_t map_mask;
    int32_t map_len;
    int64_t tokens_stored;        /* sum of fill over used blocks */
    kvd_kv_block_hash_fn hash;
    /* Scratch of the invariant checker, allocated with the pool so a check in a debug
     * loop neither allocates nor fails: */
    int32_t *check_held;          /* [num_blocks] references found in the tables */
    int32_t *check_holder;        /* [num_blocks] last table seen holding the block */
    uint8_t *check_seen;          /* [num_blocks] which list the block was found on */
    uint64_t prefix_queries, prefix_query_tokens, prefix_hits, prefix_hit_tokens;
    uint64_t evictions, cow_copies;
    kvd_kv_evict_fn evict_hook;   /* sees each cached page before its block is reused */
    void *evict_arg;
};

static uint64_t kv_hash_xxh3(uint64_t seed, const int32_t *ids, int n)
{
    return XXH3_64bits_withSeed(ids, (size_t)n * sizeof *ids, seed);
}

static uint64_t check_hash(uint64_t seed, const int32_t *ids, int n)
{
    return XXH64(ids, (size_t)n * sizeof *ids, seed);
}

static bool is_power_of_two(int x)
{
    return x > 0 && (x & (x - 1)) == 0;
}

static size_t slice_bytes_of(const kvd_kv_config *cfg)
{
    size_t rows = (size_t)cfg->num_kv_heads * (size_t)cfg->block_size;
    size_t raw = rows * (size_t)cfg->head_dim * kvd_dtype_size(cfg->dtype);
    if (kvd_kv_dtype_row_scaled(cfg->dtype))
        raw += rows * sizeof(uint16_t); /* each row's f16 scale, after the values */
    return (raw + KV_SLICE_ALIGN - 1) / KV_SLICE_ALIGN * KV_SLICE_ALIGN;
}

static int validate_config(const kvd_kv_config *cfg, kvd_error *err)
{
    if (cfg->num_layers < 1 || cfg->num_layers > KV_MAX_SHAPE)
        return kvd_error_set(err, KVD_EINVAL, "kv config: num_layers %d is outside 1..%d",
                             cfg->num_layers, KV_MAX_SHAPE);
    if (cfg->num_kv_heads < 1 || cfg->num_kv_heads > KV_MAX_SHAPE)
        return kvd_error_set(err, KVD_EINVAL, "kv config: num_kv_heads %d is outside 1..%d",
                             cfg->num_kv_heads, KV_MAX_SHAPE);
    if (cfg->head_dim < 1 || cfg->head_dim > KV_MAX_SHAPE)
        return kvd_error_set(err, KVD_EINVAL, "kv config: head_dim %d is outside 1..%d", cfg->head_dim,
                             KV_MAX_SHAPE);
    if (cfg->block_size > KV_MAX_BLOCK_SIZE || !is_power_of_two(cfg->block_size))
        return kvd_error_set(err, KVD_EINVAL,
                             "kv config: block_size %d is not a power of two in 1..%d",
                             cfg->block_size, KV_MAX_BLOCK_SIZE);
    if (cfg->dtype != KVD_DTYPE_F16 && cfg->dtype != KVD_DTYPE_BF16 && cfg->dtype != KVD_DTYPE_F32 &&
        cfg->dtype != KVD_DTYPE_I8 && cfg->dtype != KVD_DTYPE_F8)
        return kvd_error_set(err, KVD_EINVAL, "kv config: dtype %d is not f16, bf16, f32, int8 or fp8",
                             (int)cfg->dtype);
    return 0;
}

size_t kvd_kv_block_bytes(const kvd_kv_config *cfg)
{
    if (!cfg || validate_config(cfg, NULL) < 0)
        return 0;
    return (size_t)cfg->num_layers * 2 * slice_bytes_of(cfg);
}

/* ---- intrusive lists ---------------------------------------------------------------- */

static void list_init(kv_list *list)
{
    list->head = list->tail = -1;
    list->len = 0;
}

static void list_push_tail(kvd_kv_pool *pool, kv_list *list, int32_t b)
{
    kv_block *blk = &pool->blocks[b];
    blk->prev = list->tail;
    blk->next = -1;
    if (list->tail >= 0)
        pool->blocks[list->tail].next = b;
    else
        list->head = b;
    list->tail = b;
    list->len++;
}

static void list_push_head(kvd_kv_pool *pool, kv_list *list, int32_t b)
{
    kv_block *blk = &pool->blocks[b];
    blk->prev = -1;
    blk->next = list->head;
    if (list->head >= 0)
        pool->blocks[list->head].prev = b;
    else
        list->tail = b;
    list->head = b;
    list->len++;
}

static void list_remove(kvd_kv_pool *pool, kv_list *list, int32_t b)
{
    kv_block *blk = &pool->blocks[b];
    if (blk->prev >= 0)
        pool->blocks[blk->prev].next = blk->next;
    else
        list->head = blk->next;
    if (blk->next >= 0)
        pool->blocks[blk->next].prev = blk->prev;
    else
        list->tail = blk->prev;
    blk->prev = blk->next = -1;
    list->len--;
}

/* ---- hash map: chained hash -> registered block ----------------------------------- */

static int32_t map_find(const kvd_kv_pool *pool, uint64_t key)
{
    for (size_t i = key & pool->map_mask;; i = (i + 1) & pool->map_mask) {
        const kv_map_slot *slot = &pool->map[i];
        if (slot->block < 0)
            return -1;
        if (slot->key == key)
            return slot->block;
    }
}

static void map_insert(kvd_kv_pool *pool, uint64_t key, int32_t block)
{
    size_t i = key & pool->map_mask;
    while (pool->map[i].block >= 0)
        i = (i + 1) & pool->map_mask;
    pool->map[i].key = key;
    pool->map[i].block = block;
    pool->map_len++;
}

/* Backward-shift deletion: later entries of the probe run move into the hole when
 * their home slot does not lie cyclically in (hole, entry], so lookups never need
 * tombstones and the load never creeps up. */
static void map_remove(kvd_kv_pool *pool, uint64_t key)
{
    size_t mask = pool->map_mask;
    size_t hole = key & mask;
    while (pool->map[hole].key != key || pool->map[hole].block < 0) {
        assert(pool->map[hole].block >= 0);
        hole = (hole + 1) & mask;
    }
    for (size_t j = (hole + 1) & mask; pool->map[j].block >= 0; j = (j + 1) & mask) {
        size_t home = pool->map[j].key & mask;
        bool stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (!stays) {
            pool->map[hole] = pool->map[j];
            hole = j;
        }
    }
    pool->map[hole].block = -1;
    pool->map_len--;
}

/* ---- pool --------------------------------------------------------------------------- */

/* Anonymous memory on 2 MiB pages where the kernel allows (fewer TLB misses when
 * attention walks many blocks); only what is written is committed. */
static int arena_map(kvd_kv_pool *pool, size_t bytes, kvd_error *err)
{
    pool->arena = kvd_huge_alloc(bytes, &pool->mapping_bytes);
    if (!pool->arena)
        return kvd_error_set(err, KVD_ENOMEM, "kv pool: cannot map %zu bytes for %d blocks", bytes,
                             (int)pool->num_blocks);
    return 0;
}

kvd_kv_pool *kvd_kv_pool_create(const kvd_kv_config *cfg, kvd_error *err)
{
    if (!cfg) {
        kvd_error_set(err, KVD_EINVAL, "kv config: missing");
        return NULL;
    }
    if (validate_config(cfg, err) < 0)
        return NULL;
    size_t block_bytes = kvd_kv_block_bytes(cfg);
    size_t num_blocks = cfg->num_blocks;
    if (num_blocks == 0) {
        if (cfg->cache_bytes < block_bytes) {
            kvd_error_set(err, KVD_EINVAL,
                          "kv config: cache_bytes %zu is smaller than one block (%zu bytes) and num_blocks is 0",
                          cfg->cache_bytes, block_bytes);
            return NULL;
        }
        num_blocks = cfg->cache_bytes / block_bytes;
    }
    /* Ids are int32 and the map holds twice as many slots as blocks. */
    if (num_blocks > (size_t)INT32_MAX / 2 || num_blocks > SIZE_MAX / block_bytes) {
        kvd_error_set(err, KVD_EINVAL, "kv config: num_blocks %zu is too large", num_blocks);
        return NULL;
    }

    kvd_kv_pool *pool = calloc(1, sizeof *pool);
    if (!pool) {
        kvd_error_set(err, KVD_ENOMEM, "kv pool: out of memory");
        return NULL;
    }
    pool->cfg = *cfg;
    pool->cfg.num_blocks = num_blocks;
    pool->num_blocks = (int32_t)num_blocks;
    pool->block_size = cfg->block_size;
    pool->slice_bytes = slice_bytes_of(cfg);
    pool->block_bytes = block_bytes;
    pool->hash = kv_hash_xxh3;
    size_t map_slots = 16;
    while (map_slots < 2 * num_blocks)
        map_slots *= 2;
    pool->map_mask = map_slots - 1;
    pool->blocks = calloc(num_blocks, sizeof *pool->blocks);
    pool->block_tokens = calloc(num_blocks * (size_t)cfg->block_size, sizeof *pool->block_tokens);
    pool->map = malloc(map_slots * sizeof *pool->map);
    pool->check_held = malloc(num_blocks * sizeof *pool->check_held);
    pool->check_holder = malloc(num_blocks * sizeof *pool->check_holder);
    pool->check_seen = malloc(num_blocks);
    if (!pool->blocks || !pool->block_tokens || !pool->map || !pool->check_held || !pool->check_holder ||
        !pool->check_seen) {
        kvd_error_set(err, KVD_ENOMEM, "kv pool: out of memory for metadata of %zu blocks", num_blocks);
        goto fail;
    }
    if (arena_map(pool, num_blocks * block_bytes, err) < 0)
        goto fail;
    for (size_t i = 0; i < map_slots; i++)
        pool->map[i].block = -1;
    list_init(&pool->free_list);
    list_init(&pool->lru);
    /* Ascending ids from a fresh pool: neighbouring requests get neighbouring memory. */
    for (int32_t b = 0; b < pool->num_blocks; b++) {
        pool->blocks[b].parent = -1;
        list_push_tail(pool, &pool->free_list, b);
    }
    return pool;
fail:
    kvd_kv_pool_destroy(pool);
    return NULL;
}

void kvd_kv_pool_destroy(kvd_kv_pool *pool)
{
    if (!pool)
        return;
    kvd_huge_free(pool->arena, pool->mapping_bytes);
    free(pool->check_seen);
    free(pool->check_holder);
    free(pool->check_held);
    free(pool->map);
    free(pool->block_tokens);
    free(pool->blocks);
    free(pool);
}

const kvd_kv_config *kvd_kv_pool_config(const kvd_kv_pool *pool)
{
    return &pool->cfg;
}

int kvd_kv_pool_set_block_hash(kvd_kv_pool *pool, kvd_kv_block_hash_fn hash, kvd_error *err)
{
    if (pool->map_len > 0)
        return kvd_error_set(err, KVD_ESTATE, "kv pool: block hash changed while %d blocks are cached",
                             (int)pool->map_len);
    pool->hash = hash ? hash : kv_hash_xxh3;
    return 0;
}

void *kvd_kv_block_keys(const kvd_kv_pool *pool, int32_t block, int layer)
{
    assert(block >= 0 && block < pool->num_blocks && layer >= 0 && layer < pool->cfg.num_layers);
    return pool->arena + (size_t)block * pool->block_bytes + (size_t)layer * 2 * pool->slice_bytes;
}

void *kvd_kv_block_values(const kvd_kv_pool *pool, int32_t block, int layer)
{
    return (uint8_t *)kvd_kv_block_keys(pool, block, layer) + pool->slice_bytes;
}

static int32_t *tokens_of(const kvd_kv_pool *pool, int32_t b)
{
    return pool->block_tokens + (size_t)b * (size_t)pool->block_size;
}

/* ---- block references ------------------------------------------------------------- */

/* Caller checked kvd_kv_available_blocks. Uncached blocks first, so cached prefixes
 * survive as long as possible; otherwise the least recently used cached block. */
static int32_t block_take(kvd_kv_pool *pool, int32_t fill)
{
    int32_t b;
    if (pool->free_list.len > 0) {
        b = pool->free_list.head;
        list_remove(pool, &pool->free_list, b);
    } else {
        b = pool->lru.head;
        assert(b >= 0);
        list_remove(pool, &pool->lru, b);
        if (pool->evict_hook) {
            const kv_block *old = &pool->blocks[b];
            kvd_kv_page page = {.key = {.hash = old->hash, .parent_hash = old->parent_hash, .check = old->check},
                                .tokens = tokens_of(pool, b),
                                .data = pool->arena + (size_t)b * pool->block_bytes};
            pool->evict_hook(pool->evict_arg, &page);
        }
        map_remove(pool, pool->blocks[b].hash);
        pool->blocks[b].registered = false;
        pool->evictions++;
    }
    kv_block *blk = &pool->blocks[b];
    blk->ref = 1;
    blk->fill = fill;
    pool->tokens_stored += fill;
    return b;
}

static void block_ref(kvd_kv_pool *pool, int32_t b)
{
    kv_block *blk = &pool->blocks[b];
    if (blk->ref++ == 0) {
        list_remove(pool, &pool->lru, b); /* only cached blocks are found with count 0 */
        pool->tokens_stored += blk->fill;
    }
}

static void block_unref(kvd_kv_pool *pool, int32_t b)
{
    kv_block *blk = &pool->blocks[b];
    assert(blk->ref > 0);
    if (--blk->ref > 0)
        return;
    pool->tokens_stored -= blk->fill;
    if (blk->registered) {
        list_push_tail(pool, &pool->lru, b);
    } else {
        blk->fill = 0;
        list_push_head(pool, &pool->free_list, b); /* reused first: its pages are warm */
    }
}

/* Copies the written slots of every layer's K and V; the rest of dst is overwritten by
 * the appends that follow. */
static void block_copy(kvd_kv_pool *pool, int32_t dst, int32_t src, int slots)
{
    uint8_t *to = pool->arena + (size_t)dst * pool->block_bytes;
    const uint8_t *from = pool->arena + (size_t)src * pool->block_bytes;
    if (slots == pool->block_size) {
        memcpy(to, from, pool->block_bytes);
        return;
    }
    size_t row = (size_t)pool->cfg.head_dim * kvd_dtype_size(pool->cfg.dtype);
    size_t head_stride = row * (size_t)pool->block_size;
    size_t copied = row * (size_t)slots;
    int heads_per_block = pool->cfg.num_layers * 2 * pool->cfg.num_kv_heads;
    int heads_per_slice = pool->cfg.num_kv_heads;
    for (int h = 0; h < heads_per_block; h++) {
        size_t offset = (size_t)(h / heads_per_slice) * pool->slice_bytes +
                        (size_t)(h % heads_per_slice) * head_stride;
        memcpy(to + offset, from + offset, copied);
    }
    if (kvd_kv_dtype_row_scaled(pool->cfg.dtype)) {
        /* the rows' scales follow each slice's values (kvd_kv.h): copied whole, the
         * unwritten slots' are overwritten with their rows */
        size_t scales_at = head_stride * (size_t)heads_per_slice;
        size_t scale_bytes = (size_t)heads_per_slice * (size_t)pool->block_size * sizeof(uint16_t);
        for (int s = 0; s < pool->cfg.num_layers * 2; s++) {
            size_t offset = (size_t)s * pool->slice_bytes + scales_at;
            memcpy(to + offset, from + offset, scale_bytes);
        }
    }
}

/* ---- block tables ------------------------------------------------------------------- */

void kvd_block_table_init(kvd_block_table *table)
{
    memset(table, 0, sizeof *table);
}

static int table_grow(kvd_block_table *table, int64_t min_blocks, kvd_error *err)
{
    if (min_blocks <= table->capacity)
        return 0;
    if (min_blocks > INT_MAX)
        return kvd_error_set(err, KVD_EINVAL, "block table: %lld blocks is too many", (long long)min_blocks);
    int64_t capacity = (int64_t)table->capacity * 2;
    if (capacity < min_blocks)
        capacity = min_blocks;
    if (capacity < KV_MIN_TABLE_CAPACITY)
        capacity = KV_MIN_TABLE_CAPACITY;
    if (capacity > INT_MAX)
        capacity = INT_MAX;
    int32_t *blocks = realloc(table->blocks, (size_t)capacity * sizeof *blocks);
    if (!blocks)
        return kvd_error_set(err, KVD_ENOMEM, "block table: out of memory for %lld blocks", (long long)capacity);
    table->blocks = blocks;
    uint64_t *hashes = realloc(table->hashes, (size_t)capacity * sizeof *hashes);
    if (!hashes)
        return kvd_error_set(err, KVD_ENOMEM, "block table: out of memory for %lld blocks", (long long)capacity);
    table->hashes = hashes;
    table->capacity = (int)capacity;
    return 0;
}

static int64_t blocks_for_tokens(const kvd_kv_pool *pool, int64_t n_tokens)
{
    return (n_tokens + pool->block_size - 1) / pool->block_size;
}

int kvd_block_table_reserve(const kvd_kv_pool *pool, kvd_block_table *table, int n_tokens, kvd_error *err)
{
    if (n_tokens < 0)
        return kvd_error_set(err, KVD_EINVAL, "block table: reserve of %d tokens", n_tokens);
    return table_grow(table, blocks_for_tokens(pool, n_tokens), err);
}

void kvd_block_table_release(kvd_kv_pool *pool, kvd_block_table *table)
{
    for (int i = table->num_blocks - 1; i >= 0; i--)
        block_unref(pool, table->blocks[i]);
    table->num_blocks = 0;
    table->num_tokens = 0;
    table->num_cached = 0;
}

void kvd_block_table_deinit(kvd_kv_pool *pool, kvd_block_table *table)
{
    kvd_block_table_release(pool, table);
    free(table->blocks);
    free(table->hashes);
    kvd_block_table_init(table);
}

int kvd_kv_blocks_needed(const kvd_kv_pool *pool, const kvd_block_table *table, int n_tokens)
{
    if (n_tokens <= 0)
        return 0;
    int64_t room_in_last = (int64_t)table->num_blocks * pool->block_size - table->num_tokens;
    int64_t copy = room_in_last > 0 && pool->blocks[table->blocks[table->num_blocks - 1]].ref > 1;
    int64_t beyond = n_tokens - room_in_last;
    int64_t needed = copy + (beyond > 0 ? blocks_for_tokens(pool, beyond) : 0);
    return needed > INT_MAX ? INT_MAX : (int)needed;
}

int64_t kvd_kv_available_blocks(const kvd_kv_pool *pool)
{
    return (int64_t)pool->free_list.len + pool->lru.len;
}

bool kvd_kv_can_ever_fit(const kvd_kv_pool *pool, int n_tokens)
{
    return n_tokens >= 0 && blocks_for_tokens(pool, n_tokens) <= pool->num_blocks;
}

int kvd_block_table_append(kvd_kv_pool *pool, kvd_block_table *table, int n_tokens, kvd_error *err)
{
    if (n_tokens < 0)
        return kvd_error_set(err, KVD_EINVAL, "block table: append of %d tokens", n_tokens);
    if (n_tokens == 0)
        return 0;
    if (n_tokens > INT_MAX - table->num_tokens)
        return kvd_error_set(err, KVD_EINVAL, "block table: %d + %d tokens overflows", table->num_tokens,
                             n_tokens);
    int needed = kvd_kv_blocks_needed(pool, table, n_tokens);
    if (needed > kvd_kv_available_blocks(pool))
        return kvd_error_set(err, KVD_ENOSPC, "kv pool: %d more tokens need %d blocks, %lld available",
                             n_tokens, needed, (long long)kvd_kv_available_blocks(pool));
    int64_t total_tokens = (int64_t)table->num_tokens + n_tokens;
    int rc = table_grow(table, blocks_for_tokens(pool, total_tokens), err);
    if (rc < 0)
        return rc;

    int bs = pool->block_size;
    int room_in_last = table->num_blocks * bs - table->num_tokens;
    int remaining = n_tokens;
    if (room_in_last > 0) {
        int32_t *last = &table->blocks[table->num_blocks - 1];
        if (pool->blocks[*last].ref > 1) {
            int32_t copy = block_take(pool, pool->blocks[*last].fill);
            block_copy(pool, copy, *last, pool->blocks[*last].fill);
            block_unref(pool, *last);
            *last = copy;
            pool->cow_copies++;
        }
        int add = remaining < room_in_last ? remaining : room_in_last;
        pool->blocks[*last].fill += add;
        pool->tokens_stored += add;
        remaining -= add;
    }
    while (remaining > 0) {
        int add = remaining < bs ? remaining : bs;
        table->blocks[table->num_blocks++] = block_take(pool, add);
        remaining -= add;
    }
    table->num_tokens = (int)total_tokens;
    return 0;
}

int kvd_block_table_fork(kvd_kv_pool *pool, const kvd_block_table *src, kvd_block_table *dst, kvd_error *err)
{
    if (src == dst || dst->num_blocks > 0 || dst->num_tokens > 0)
        return kvd_error_set(err, KVD_ESTATE, "block table: fork into a table holding %d tokens",
                             dst->num_tokens);
    int rc = table_grow(dst, src->num_blocks, err);
    if (rc < 0)
        return rc;
    for (int i = 0; i < src->num_blocks; i++) {
        block_ref(pool, src->blocks[i]);
        dst->blocks[i] = src->blocks[i];
    }
    for (int i = 0; i < src->num_cached; i++)
        dst->hashes[i] = src->hashes[i];
    dst->num_blocks = src->num_blocks;
    dst->num_tokens = src->num_tokens;
    dst->num_cached = src->num_cached;
    return 0;
}

/* ---- prefix cache ----------------------------------------------------------------- */

/* A hash hit is only a candidate: the block must hold exactly these ids and follow
 * exactly the block matched before it (same registration), which makes a hit exact
 * by induction from the first block. */
static bool block_confirms(const kvd_kv_pool *pool, int32_t b, int32_t parent, const int32_t *ids)
{
    const kv_block *blk = &pool->blocks[b];
    if (blk->parent != parent)
        return false;
    if (parent >= 0 && blk->parent_gen != pool->blocks[parent].gen)
        return false;
    return memcmp(tokens_of(pool, b), ids, (size_t)pool->block_size * sizeof *ids) == 0;
}

int kvd_prefix_cache_lookup(kvd_kv_pool *pool, kvd_block_table *table, const int32_t *tokens, int n_tokens)
{
    if (n_tokens < 0 || (!tokens && n_tokens > 0))
        return KVD_EINVAL;
    if (table->num_blocks > 0 || table->num_tokens > 0)
        return KVD_ESTATE;
    pool->prefix_queries++;
    pool->prefix_query_tokens += (uint64_t)n_tokens;
    if (!pool->cfg.enable_prefix_cache || n_tokens == 0)
        return 0;
    int bs = pool->block_size;
    int max_blocks = (n_tokens - 1) / bs; /* the last token is always computed */
    uint64_t hash = KV_ROOT_SEED;
    int32_t parent = -1;
    int matched = 0;
    for (; matched < max_blocks; matched++) {
        const int32_t *ids = tokens + (size_t)matched * bs;
        hash = pool->hash(hash, ids, bs);
        int32_t b = map_find(pool, hash);
        if (b < 0 || !block_confirms(pool, b, parent, ids))
            break;
        /* Sized once for the whole prompt at the first hit; on failure the shorter hit stands. */
        if (table_grow(table, max_blocks, NULL) < 0)
            break;
        block_ref(pool, b);
        table->blocks[matched] = b;
        table->hashes[matched] = hash;
        parent = b;
    }
    table->num_blocks = matched;
    table->num_cached = matched;
    table->num_tokens = matched * bs;
    if (matched > 0) {
        pool->prefix_hits++;
        pool->prefix_hit_tokens += (uint64_t)matched * (uint64_t)bs;
    }
    return matched * bs;
}

static void block_register(kvd_kv_pool *pool, int32_t b, uint64_t hash, int32_t parent, const int32_t *ids)
{
    kv_block *blk = &pool->blocks[b];
    blk->registered = true;
    blk->hash = hash;
    blk->parent_hash = parent >= 0 ? pool->blocks[parent].hash : KV_ROOT_SEED;
    blk->check = check_hash(parent >= 0 ? pool->blocks[parent].check : KV_ROOT_CHECK, ids, pool->block_size);
    blk->gen++;
    blk->parent = parent;
    blk->parent_gen = parent >= 0 ? pool->blocks[parent].gen : 0;
    memcpy(tokens_of(pool, b), ids, (size_t)pool->block_size * sizeof *ids);
    map_insert(pool, hash, b);
}

void kvd_prefix_cache_commit(kvd_kv_pool *pool, kvd_block_table *table, const int32_t *tokens, int n_computed)
{
    if (!pool->cfg.enable_prefix_cache || !tokens || n_computed <= 0)
        return;
    int bs = pool->block_size;
    int computed = n_computed < table->num_tokens ? n_computed : table->num_tokens;
    int full_blocks = computed / bs;
    for (int i = table->num_cached; i < full_blocks; i++) {
        const int32_t *ids = tokens + (size_t)i * bs;
        uint64_t hash = pool->hash(i > 0 ? table->hashes[i - 1] : KV_ROOT_SEED, ids, bs);
        table->hashes[i] = hash;
        int32_t b = table->blocks[i];
        int32_t parent = i > 0 ? table->blocks[i - 1] : -1;
        /* Already registered (a fork committed it first); a chain whose previous block
         * is not registered cannot be found by a lookup; an equal hash means the same
         * block is cached already or a collision, and the map holds one block per hash. */
        if (pool->blocks[b].registered || (parent >= 0 && !pool->blocks[parent].registered) ||
            map_find(pool, hash) >= 0)
            continue;
        block_register(pool, b, hash, parent, ids);
    }
    if (full_blocks > table->num_cached)
        table->num_cached = full_blocks;
}

int kvd_prefix_cache_next_keys(const kvd_kv_pool *pool, const kvd_block_table *table, const int32_t *tokens,
                               int n_tokens, kvd_kv_page_key *keys, int max_keys)
{
    if (!pool->cfg.enable_prefix_cache || n_tokens < 1 || table->num_cached != table->num_blocks)
        return 0;
    int bs = pool->block_size;
    int first = table->num_blocks;
    int count = (n_tokens - 1) / bs - first;
    if (count > max_keys)
        count = max_keys;
    if (count <= 0)
        return 0;
    uint64_t hash = first > 0 ? table->hashes[first - 1] : KV_ROOT_SEED;
    uint64_t check = KV_ROOT_CHECK;
    if (first > 0) {
        const kv_block *last = &pool->blocks[table->blocks[first - 1]];
        if (!last->registered || last->hash != hash)
            return 0; /* its block went private (a duplicate): no chain to follow */
        check = last->check;
    }
    for (int i = 0; i < count; i++) {
        const int32_t *ids = tokens + (size_t)(first + i) * bs;
        keys[i].parent_hash = hash;
        hash = pool->hash(hash, ids, bs);
        check = check_hash(check, ids, bs);
        keys[i].hash = hash;
        keys[i].check = check;
    }
    return count;
}

void kvd_kv_pool_set_evict_hook(kvd_kv_pool *pool, kvd_kv_evict_fn hook, void *arg)
{
    pool->evict_hook = hook;
    pool->evict_arg = arg;
}

void kvd_kv_pool_for_each_page(const kvd_kv_pool *pool, kvd_kv_evict_fn fn, void *arg)
{
    for (int32_t b = 0; b < pool->num_blocks; b++) {
        const kv_block *blk = &pool->blocks[b];
        if (!blk->registered)
            continue;
        kvd_kv_page page = {.key = {.hash = blk->hash, .parent_hash = blk->parent_hash, .check = blk->check},
                            .tokens = tokens_of(pool, b),
                            .data = pool->arena + (size_t)b * pool->block_bytes};
        fn(arg, &page);
    }
}

void *kvd_kv_block_data(const kvd_kv_pool *pool, int32_t block)
{
    assert(block >= 0 && block < pool->num_blocks);
    return pool->arena + (size_t)block * pool->block_bytes;
}

int kvd_block_table_truncate(kvd_kv_pool *pool, kvd_block_table *table, int n_tokens)
{
    if (n_tokens < 0 || n_tokens > table->num_tokens || n_tokens % pool->block_size != 0)
        return KVD_EINVAL;
    int keep = n_tokens / pool->block_size;
    for (int i = table->num_blocks - 1; i >= keep; i--) {
        block_unref(pool, table->blocks[i]);
    }
    table->num_blocks = keep;
    table->num_tokens = n_tokens;
    if (table->num_cached > keep)
        table->num_cached = keep;
    return 0;
}

/* ---- accounting --------------------------------------------------------------------- */

void kvd_kv_stats_get(const kvd_kv_pool *pool, kvd_kv_stats *out)
{
    memset(out, 0, sizeof *out);
    int64_t used = (int64_t)pool->num_blocks - pool->free_list.len - pool->lru.len;
    int64_t empty_slots = used * pool->block_size - pool->tokens_stored;
    size_t bs = (size_t)pool->block_size;
    out->blocks_total = pool->num_blocks;
    out->blocks_used = used;
    out->blocks_cached = pool->lru.len;
    out->blocks_free = pool->free_list.len;
    out->tokens_stored = pool->tokens_stored;
    /* Split so a padded block (bytes not a multiple of block_size) stays exact. */
    out->bytes_wasted = (int64_t)((size_t)empty_slots * (pool->block_bytes / bs) +
                                  (size_t)empty_slots * (pool->block_bytes % bs) / bs);
    out->pool_bytes = (size_t)pool->num_blocks * pool->block_bytes;
    out->block_bytes = pool->block_bytes;
    out->dtype = pool->cfg.dtype;
    out->prefix_queries = pool->prefix_queries;
    out->prefix_query_tokens = pool->prefix_query_tokens;
    out->prefix_hits = pool->prefix_hits;
    out->prefix_hit_tokens = pool->prefix_hit_tokens;
    out->evictions = pool->evictions;
    out->cow_copies = pool->cow_copies;
}

void kvd_kv_block_states(const kvd_kv_pool *pool, uint8_t *state, int32_t *refcounts)
{
    for (int32_t b = 0; b < pool->num_blocks; b++) {
        const kv_block *blk = &pool->blocks[b];
        if (state)
            state[b] = blk->ref == 0 ? (blk->registered ? 1 : 0) : (blk->ref == 1 ? 2 : 3);
        if (refcounts)
            refcounts[b] = blk->ref;
    }
}

/* ---- invariant checker -------------------------------------------------------------- */

#define FAIL(...)                                                                            \
    do {                                                                                     \
        rc = kvd_error_set(err, KVD_ESTATE, "kv invariant: " __VA_ARGS__);                   \
        goto done;                                                                           \
    } while (0)

/* Walks one list checking links and membership; marks each block with `mark` in seen[].
 * In the lru, a cached block must come before its cached parent (descendants first). */
static int check_list(const kvd_kv_pool *pool, const kv_list *list, bool cached, const char *name,
                      uint8_t *seen, uint8_t mark, kvd_error *err)
{
    int rc = 0;
    int32_t count = 0, prev = -1;
    for (int32_t b = list->head; b >= 0; b = pool->blocks[b].next) {
        if (b >= pool->num_blocks)
            FAIL("%s holds block id %d out of range", name, (int)b);
        const kv_block *blk = &pool->blocks[b];
        if (seen[b])
            FAIL("block %d is on %s twice or on both lists", (int)b, name);
        seen[b] = mark;
        if (++count > list->len)
            FAIL("%s is longer than its length %d", name, (int)list->len);
        if (blk->prev != prev)
            FAIL("%s: block %d has prev %d, expected %d", name, (int)b, (int)blk->prev, (int)prev);
        if (blk->ref != 0)
            FAIL("%s holds block %d with count %d", name, (int)b, (int)blk->ref);
        if (blk->registered != cached)
            FAIL("%s holds block %d which is %s", name, (int)b, cached ? "not cached" : "cached");
        if (cached && blk->parent >= 0 && seen[blk->parent] == mark)
            FAIL("lru: parent block %d would be evicted before its child %d", (int)blk->parent, (int)b);
        prev = b;
    }
    if (count != list->len)
        FAIL("%s has %d blocks, its length says %d", name, (int)count, (int)list->len);
    if (list->tail != prev)
        FAIL("%s tail is %d, last block is %d", name, (int)list->tail, (int)prev);
done:
    return rc;
}

static int check_table(const kvd_kv_pool *pool, const kvd_block_table *t, int ti, int32_t *held,
                       int32_t *last_holder, kvd_error *err)
{
    int rc = 0;
    int bs = pool->block_size;
    if (t->num_tokens < 0 || t->num_blocks != blocks_for_tokens(pool, t->num_tokens))
        FAIL("table %d has %d blocks for %d tokens", ti, t->num_blocks, t->num_tokens);
    if (t->num_blocks > t->capacity)
        FAIL("table %d has %d blocks, capacity %d", ti, t->num_blocks, t->capacity);
    if (t->num_cached < 0 || (int64_t)t->num_cached * bs > t->num_tokens)
        FAIL("table %d has %d committed blocks for %d tokens", ti, t->num_cached, t->num_tokens);
    for (int i = 0; i < t->num_blocks; i++) {
        int32_t b = t->blocks[i];
        if (b < 0 || b >= pool->num_blocks)
            FAIL("table %d position block %d is id %d, out of range", ti, i, (int)b);
        if (last_holder[b] == ti)
            FAIL("table %d holds block %d twice", ti, (int)b);
        last_holder[b] = ti;
        held[b]++;
        int expected_fill = i + 1 < t->num_blocks ? bs : t->num_tokens - i * bs;
        if (pool->blocks[b].fill != expected_fill)
            FAIL("block %d has fill %d, table %d expects %d", (int)b, (int)pool->blocks[b].fill, ti,
                 expected_fill);
        if (i < t->num_cached && pool->blocks[b].registered && pool->blocks[b].hash != t->hashes[i])
            FAIL("block %d is cached under another hash than table %d records", (int)b, ti);
    }
done:
    return rc;
}

int kvd_kv_check_invariants(const kvd_kv_pool *pool, const kvd_block_table *const *tables, int num_tables,
                            kvd_error *err)
{
    int rc = 0;
    int32_t n = pool->num_blocks;
    int32_t *held = pool->check_held;
    int32_t *last_holder = pool->check_holder;
    uint8_t *seen = pool->check_seen;
    memset(held, 0, (size_t)n * sizeof *held);
    memset(seen, 0, (size_t)n);
    for (int32_t b = 0; b < n; b++)
        last_holder[b] = -1;
    for (int ti = 0; ti < num_tables; ti++) {
        if (!tables[ti])
            FAIL("table %d is NULL", ti);
        if ((rc = check_table(pool, tables[ti], ti, held, last_holder, err)) < 0)
            goto done;
    }

    int64_t tokens = 0;
    int32_t registered = 0, unreferenced = 0;
    for (int32_t b = 0; b < n; b++) {
        const kv_block *blk = &pool->blocks[b];
        if (blk->ref != held[b])
            FAIL("block %d has count %d but the tables hold it %d times", (int)b, (int)blk->ref, (int)held[b]);
        if (blk->fill < 0 || blk->fill > pool->block_size)
            FAIL("block %d has fill %d", (int)b, (int)blk->fill);
        if (blk->ref > 0)
            tokens += blk->fill;
        else
            unreferenced++;
        if (blk->ref == 0 && blk->fill != (blk->registered ? pool->block_size : 0))
            FAIL("unreferenced block %d has fill %d", (int)b, (int)blk->fill);
        if (!blk->registered)
            continue;
        registered++;
        if (blk->fill != pool->block_size)
            FAIL("cached block %d is not full (fill %d)", (int)b, (int)blk->fill);
        if (map_find(pool, blk->hash) != b)
            FAIL("cached block %d is not found under its hash", (int)b);
        if (blk->parent >= n)
            FAIL("cached block %d has parent id %d, out of range", (int)b, (int)blk->parent);
        if (blk->parent >= 0 &&
            (!pool->blocks[blk->parent].registered || pool->blocks[blk->parent].gen != blk->parent_gen))
            FAIL("cached block %d outlived its parent block %d", (int)b, (int)blk->parent);
    }
    if (tokens != pool->tokens_stored)
        FAIL("used blocks hold %lld tokens, the count says %lld", (long long)tokens,
             (long long)pool->tokens_stored);

    if ((rc = check_list(pool, &pool->free_list, false, "free list", seen, 1, err)) < 0)
        goto done;
    if ((rc = check_list(pool, &pool->lru, true, "lru", seen, 2, err)) < 0)
        goto done;
    if (pool->free_list.len + pool->lru.len != unreferenced)
        FAIL("%d unreferenced blocks, the lists hold %d", (int)unreferenced,
             (int)(pool->free_list.len + pool->lru.len));

    int32_t entries = 0;
    for (size_t i = 0; i <= pool->map_mask; i++) {
        const kv_map_slot *slot = &pool->map[i];
        if (slot->block < 0)
            continue;
        entries++;
        if (slot->block >= n || !pool->blocks[slot->block].registered ||
            pool->blocks[slot->block].hash != slot->key)
            FAIL("hash map slot %zu names block %d, which does not hold that hash", i, (int)slot->block);
    }
    if (entries != registered || entries != pool->map_len)
        FAIL("hash map has %d entries (length %d) for %d cached blocks", (int)entries, (int)pool->map_len,
             (int)registered);
done:
    return rc;
}
