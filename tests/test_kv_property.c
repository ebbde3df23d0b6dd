/* test_kv_property.c - randomized property test of the KV cache against a naive model.
 *
 * Over 1,000,000 seeded operations (new sequence with prefix lookup, decode appends,
 * forks and writes into shared blocks, commits, releases, eviction under pressure on
 * small pools) run against the pool and, in parallel, against a model that knows
 * nothing about hashes or intrusive lists: each table is its list of token ids, the
 * cache is a set of blocks labelled with the full token prefix they hold, the LRU is a
 * plain array, reference counts are recounted from the tables. After every operation
 * the model predicts the exact outcome (ENOSPC or not, which block an allocation takes
 * or evicts, how many tokens a lookup covers and with which blocks, every stats field)
 * and the pool's own invariant checker runs over all live tables. K/V memory is
 * written like a forward pass would (a value derived from the token prefix at each
 * position), and read back, so a block shared wrongly or copied badly shows up as
 * wrong contents. KVD_KV_PROPERTY_SEED and KVD_KV_PROPERTY_OPS override the seed and the
 * total operation count; a failure names the seed, configuration and step.
 *
 * The disk tier's states ride along (configs with "disk"): every page the pool evicts
 * goes through its evict hook into a test disk (the model checks it was exactly the
 * least recently used cached block and holds its prefix's K/V); a new sequence that
 * misses in RAM looks its next pages up there by kvd_prefix_cache_next_keys, and the
 * model predicts how many it finds (pages whose whole token prefix equals the prompt's).
 * Those pages take blocks and the table is *loading* (its blocks hold garbage, no
 * operation may touch it) until a later operation completes the load: the pages are
 * copied in, sometimes only some of them (a failed read: the rest are truncated away),
 * committed, and the table lives on as any other.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvd/kvd_kv.h"

enum {
    MAX_TABLES = 8,
    MAX_BLOCKS = 64,
    MAX_LEN = 160,
    DISK_SLOTS = 512,
    NUM_FAMILIES = 3,
    LAYERS = 2,
    HEAD_DIM = 2,
};

typedef struct prop_config {
    const char *name;
    int block_size;
    int num_blocks;
    int max_len;        /* longest sequence */
    int max_prompt;     /* longest prompt */
    bool prefix_cache;
    double share;       /* share of the total operations */
    bool disk;          /* an evict hook feeds a test disk; lookups that miss in RAM load from it */
} prop_config;

static const prop_config configs[] = {
    {"bs1", 1, 40, 48, 24, true, 0.2, false},
    {"bs4", 4, 32, 96, 48, true, 0.3, false},
    {"bs16", 16, 24, 160, 120, true, 0.3, false},
    {"bs2-nocache", 2, 40, 64, 40, false, 0.2, false},
    {"bs4-disk", 4, 32, 96, 48, true, 0.45, true},
    {"bs16-disk", 16, 24, 160, 120, true, 0.4, true},
};

typedef struct model_table {
    bool live;
    kvd_block_table t;
    int32_t tokens[MAX_LEN];
    uint64_t prefix[MAX_LEN];  /* model hash of tokens[0..p], what position p's K/V encode */
    int len;
    int committed;             /* expected num_cached */
    int loading;               /* pages being loaded into its last blocks (0: not loading) */
    kvd_kv_page_key load_keys[MAX_LEN]; /* their keys */
} model_table;

/* One page on the test disk: what the evict hook saw, and (for the model) the whole
 * token prefix the page ends. Direct-mapped by hash: a newer page replaces an older. */
typedef struct disk_page {
    bool used;
    kvd_kv_page_key key;
    int32_t tokens[MAX_LEN];   /* the whole prefix, prefix_len ids */
    int prefix_len;
    uint8_t data[2 * 2 * 16 * 2 * 4]; /* LAYERS x K|V x max block size x HEAD_DIM x f32 */
} disk_page;

typedef struct model {
    const prop_config *cfg;
    kvd_kv_pool *pool;
    uint64_t rng;
    uint64_t step;
    int bs;
    model_table tables[MAX_TABLES];
    int32_t families[NUM_FAMILIES][MAX_LEN];
    /* the cache as a set of blocks labelled with the prefix they hold */
    bool registered[MAX_BLOCKS];
    int reg_len[MAX_BLOCKS];
    uint64_t reg_prefix[MAX_BLOCKS];
    int32_t reg_tokens[MAX_BLOCKS][MAX_LEN];
    int32_t lru[MAX_BLOCKS];   /* unreferenced registered blocks, least recently used first */
    int lru_len;
    bool in_free[MAX_BLOCKS];
    int free_len;
    uint64_t evictions, cow_copies, queries, query_tokens, hits, hit_tokens;
    disk_page *disk;           /* [DISK_SLOTS] with cfg->disk */
    uint64_t disk_writes, disk_loads, disk_pages_loaded, disk_partial;
    int evicting;              /* evictions the hook saw in the running append */
} model;

#define FAILF(m, ...)                                                                            \
    do {                                                                                         \
        char what_[800];                                                                         \
        snprintf(what_, sizeof what_, __VA_ARGS__);                                              \
        fail_msg("config %s, step %llu: %s", (m)->cfg->name, (unsigned long long)(m)->step, what_); \
    } while (0)
#define EXPECT_EQ(m, got, want, what)                                                            \
    do {                                                                                         \
        long long g_ = (long long)(got), w_ = (long long)(want);                                 \
        if (g_ != w_)                                                                            \
            FAILF(m, "%s: got %lld, expected %lld", what, g_, w_);                               \
    } while (0)

static uint64_t rng_next(model *m)
{
    uint64_t z = (m->rng += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static int rng_int(model *m, int lo, int hi) /* inclusive */
{
    return lo + (int)(rng_next(m) % (uint64_t)(hi - lo + 1));
}

static bool rng_chance(model *m, int percent)
{
    return (int)(rng_next(m) % 100) < percent;
}

static uint64_t mix(uint64_t h, uint64_t x)
{
    h ^= x + 0x9e3779b97f4a7c15u + (h << 6) + (h >> 2);
    h *= 0xff51afd7ed558ccdu;
    return h ^ (h >> 33);
}

static uint32_t kv_value(uint64_t prefix, int layer, int kv, int dim)
{
    return (uint32_t)mix(prefix, (uint64_t)(layer * 4 + kv * 2 + dim + 1));
}

static uint32_t *slot_of(const model *m, int32_t block, int layer, int kv, int slot)
{
    uint32_t *base = kv ? kvd_kv_block_values(m->pool, block, layer) : kvd_kv_block_keys(m->pool, block, layer);
    return base + (size_t)slot * HEAD_DIM; /* one kv head */
}

static void write_positions(model *m, model_table *mt, int from, int to)
{
    for (int p = from; p < to; p++)
        for (int l = 0; l < LAYERS; l++)
            for (int kv = 0; kv < 2; kv++) {
                uint32_t *e = slot_of(m, mt->t.blocks[p / m->bs], l, kv, p % m->bs);
                for (int d = 0; d < HEAD_DIM; d++)
                    e[d] = kv_value(mt->prefix[p], l, kv, d);
            }
}

static void verify_contents(model *m, const model_table *mt)
{
    for (int p = 0; p < mt->len; p++)
        for (int l = 0; l < LAYERS; l++)
            for (int kv = 0; kv < 2; kv++) {
                const uint32_t *e = slot_of(m, mt->t.blocks[p / m->bs], l, kv, p % m->bs);
                for (int d = 0; d < HEAD_DIM; d++)
                    if (e[d] != kv_value(mt->prefix[p], l, kv, d))
                        FAILF(m, "table %d position %d layer %d %s holds another prefix's K/V",
                              (int)(mt - m->tables), p, l, kv ? "V" : "K");
            }
}

static void set_tokens(model_table *mt, const int32_t *tokens, int from, int to)
{
    for (int p = from; p < to; p++) {
        mt->tokens[p] = tokens[p];
        mt->prefix[p] = mix(p > 0 ? mt->prefix[p - 1] : 0x5eed, (uint64_t)(uint32_t)tokens[p]);
    }
}

/* Reference counts and fills recounted from the live tables (skipping one if asked). */
/* memcmp/memcpy of zero bytes from a table's NULL array is undefined: compare by hand. */
static bool same_ids(const int32_t *a, const int32_t *b, int n)
{
    for (int i = 0; i < n; i++)
        if (a[i] != b[i])
            return false;
    return true;
}

static void model_counts(const model *m, int32_t *refs, int32_t *fills, int skip)
{
    memset(refs, 0, sizeof(int32_t) * MAX_BLOCKS);
    memset(fills, 0, sizeof(int32_t) * MAX_BLOCKS);
    for (int ti = 0; ti < MAX_TABLES; ti++) {
        const model_table *mt = &m->tables[ti];
        if (!mt->live || ti == skip)
            continue;
        for (int i = 0; i < mt->t.num_blocks; i++) {
            int fill = mt->len - i * m->bs < m->bs ? mt->len - i * m->bs : m->bs;
            refs[mt->t.blocks[i]]++;
            fills[mt->t.blocks[i]] = fill;
        }
    }
}

static void lru_remove(model *m, int32_t b)
{
    for (int i = 0; i < m->lru_len; i++)
        if (m->lru[i] == b) {
            memmove(&m->lru[i], &m->lru[i + 1], sizeof(int32_t) * (size_t)(m->lru_len - i - 1));
            m->lru_len--;
            return;
        }
    FAILF(m, "block %d expected in the lru", (int)b);
}

/* The pool handed out block b: it must be an uncached free block if there is any,
 * otherwise exactly the least recently used cached block. */
static void model_take(model *m, int32_t b)
{
    if (b < 0 || b >= m->cfg->num_blocks)
        FAILF(m, "allocated block id %d out of range", (int)b);
    if (m->free_len > 0) {
        if (!m->in_free[b])
            FAILF(m, "allocated block %d is not free (%d free blocks exist)", (int)b, m->free_len);
        m->in_free[b] = false;
        m->free_len--;
        return;
    }
    if (m->lru_len == 0 || m->lru[0] != b)
        FAILF(m, "allocated block %d, least recently used is %d", (int)b, m->lru_len ? (int)m->lru[0] : -1);
    lru_remove(m, b);
    m->registered[b] = false;
    m->evictions++;
}

static int32_t find_registered(const model *m, const int32_t *tokens, int len, uint64_t prefix)
{
    for (int32_t b = 0; b < m->cfg->num_blocks; b++)
        if (m->registered[b] && m->reg_len[b] == len && m->reg_prefix[b] == prefix &&
            memcmp(m->reg_tokens[b], tokens, sizeof(int32_t) * (size_t)len) == 0)
            return b;
    return -1;
}

static void check_all(model *m)
{
    const kvd_block_table *live[MAX_TABLES];
    int n = 0;
    for (int ti = 0; ti < MAX_TABLES; ti++)
        if (m->tables[ti].live)
            live[n++] = &m->tables[ti].t;
    kvd_error err = {0};
    if (kvd_kv_check_invariants(m->pool, live, n, &err) != 0)
        FAILF(m, "%s", err.msg);

    int32_t refs[MAX_BLOCKS], fills[MAX_BLOCKS];
    model_counts(m, refs, fills, -1);
    int64_t used = 0, tokens = 0;
    for (int b = 0; b < m->cfg->num_blocks; b++)
        if (refs[b] > 0) {
            used++;
            tokens += fills[b];
        }
    kvd_kv_stats s;
    kvd_kv_stats_get(m->pool, &s);
    EXPECT_EQ(m, s.blocks_used, used, "blocks_used");
    EXPECT_EQ(m, s.blocks_cached, m->lru_len, "blocks_cached");
    EXPECT_EQ(m, s.blocks_free, m->free_len, "blocks_free");
    EXPECT_EQ(m, s.tokens_stored, tokens, "tokens_stored");
    EXPECT_EQ(m, s.bytes_wasted, (used * m->bs - tokens) * (int64_t)(s.block_bytes / (size_t)m->bs), "bytes_wasted");
    EXPECT_EQ(m, s.evictions, m->evictions, "evictions");
    EXPECT_EQ(m, s.cow_copies, m->cow_copies, "cow_copies");
    EXPECT_EQ(m, s.prefix_queries, m->queries, "prefix_queries");
    EXPECT_EQ(m, s.prefix_query_tokens, m->query_tokens, "prefix_query_tokens");
    EXPECT_EQ(m, s.prefix_hits, m->hits, "prefix_hits");
    EXPECT_EQ(m, s.prefix_hit_tokens, m->hit_tokens, "prefix_hit_tokens");
    for (int ti = 0; ti < MAX_TABLES; ti++) {
        const model_table *mt = &m->tables[ti];
        if (!mt->live)
            continue;
        EXPECT_EQ(m, mt->t.num_tokens, mt->len, "table num_tokens");
        EXPECT_EQ(m, mt->t.num_cached, mt->committed, "table num_cached");
    }
}

/* Appends tokens[len..len+n) to a live table; returns whether it fit. */
static bool op_append(model *m, model_table *mt, const int32_t *tokens, int n)
{
    int32_t refs[MAX_BLOCKS], fills[MAX_BLOCKS];
    model_counts(m, refs, fills, -1);
    int old_blocks = mt->t.num_blocks;
    int room = old_blocks * m->bs - mt->len;
    bool copy = room > 0 && refs[mt->t.blocks[old_blocks - 1]] > 1;
    int beyond = n - room;
    int needed = (int)copy + (beyond > 0 ? (beyond + m->bs - 1) / m->bs : 0);
    EXPECT_EQ(m, kvd_kv_blocks_needed(m->pool, &mt->t, n), needed, "blocks_needed");
    int32_t before[MAX_LEN];
    for (int i = 0; i < old_blocks; i++)
        before[i] = mt->t.blocks[i];

    kvd_error err = {0};
    m->evicting = 0;
    int rc = kvd_block_table_append(m->pool, &mt->t, n, &err);
    if (needed > m->free_len + m->lru_len) {
        EXPECT_EQ(m, rc, KVD_ENOSPC, "append past the free blocks");
        EXPECT_EQ(m, mt->t.num_blocks, old_blocks, "blocks after ENOSPC");
        if (!same_ids(before, mt->t.blocks, old_blocks))
            FAILF(m, "ENOSPC changed the block table");
        return false;
    }
    if (rc != 0)
        FAILF(m, "append of %d: %s", n, err.msg);
    if (copy) {
        int32_t fresh = mt->t.blocks[old_blocks - 1];
        if (fresh == before[old_blocks - 1])
            FAILF(m, "write into shared block %d without a copy", (int)fresh);
        model_take(m, fresh);
        m->cow_copies++;
    }
    if (!same_ids(before, mt->t.blocks, old_blocks - (copy ? 1 : 0)))
        FAILF(m, "append changed earlier blocks");
    for (int i = old_blocks; i < mt->t.num_blocks; i++)
        model_take(m, mt->t.blocks[i]);
    set_tokens(mt, tokens, mt->len, mt->len + n);
    int old_len = mt->len;
    mt->len += n;
    write_positions(m, mt, old_len, mt->len);
    return true;
}

static void op_commit(model *m, model_table *mt, int n_computed)
{
    kvd_prefix_cache_commit(m->pool, &mt->t, mt->tokens, n_computed);
    if (!m->cfg->prefix_cache)
        return;
    int computed = n_computed < mt->len ? n_computed : mt->len;
    int full = computed / m->bs;
    for (int i = mt->committed; i < full; i++) {
        int32_t b = mt->t.blocks[i];
        int end = (i + 1) * m->bs;
        if (m->registered[b] || (i > 0 && !m->registered[mt->t.blocks[i - 1]]) ||
            find_registered(m, mt->tokens, end, mt->prefix[end - 1]) >= 0)
            continue;
        m->registered[b] = true;
        m->reg_len[b] = end;
        m->reg_prefix[b] = mt->prefix[end - 1];
        memcpy(m->reg_tokens[b], mt->tokens, sizeof(int32_t) * (size_t)end);
    }
    if (full > mt->committed)
        mt->committed = full;
}

static void op_release(model *m, int ti)
{
    model_table *mt = &m->tables[ti];
    int32_t refs[MAX_BLOCKS], fills[MAX_BLOCKS];
    model_counts(m, refs, fills, ti);
    for (int i = mt->t.num_blocks - 1; i >= 0; i--) {
        int32_t b = mt->t.blocks[i];
        if (refs[b] > 0)
            continue;
        if (m->registered[b]) {
            m->lru[m->lru_len++] = b;
        } else {
            m->in_free[b] = true;
            m->free_len++;
        }
    }
    kvd_block_table_release(m->pool, &mt->t);
    mt->live = false;
    mt->len = 0;
    mt->committed = 0;
}

static int free_slot(model *m)
{
    int start = rng_int(m, 0, MAX_TABLES - 1);
    for (int k = 0; k < MAX_TABLES; k++)
        if (!m->tables[(start + k) % MAX_TABLES].live)
            return (start + k) % MAX_TABLES;
    return -1;
}

/* A live table that is not loading (a loading one is touched only by its load). */
static int live_slot(model *m)
{
    int start = rng_int(m, 0, MAX_TABLES - 1);
    for (int k = 0; k < MAX_TABLES; k++) {
        const model_table *mt = &m->tables[(start + k) % MAX_TABLES];
        if (mt->live && !mt->loading)
            return (start + k) % MAX_TABLES;
    }
    return -1;
}

static int loading_slot(model *m)
{
    int start = rng_int(m, 0, MAX_TABLES - 1);
    for (int k = 0; k < MAX_TABLES; k++)
        if (m->tables[(start + k) % MAX_TABLES].loading)
            return (start + k) % MAX_TABLES;
    return -1;
}

/* Prompts share prefixes often (a family's head, sometimes all of it) and diverge
 * into a small alphabet, so hits, partial hits and near-misses are all common. */
static void make_prompt(model *m, int32_t *tokens, int len)
{
    const int32_t *family = m->families[rng_int(m, 0, NUM_FAMILIES - 1)];
    int diverge = rng_chance(m, 30) ? len : rng_int(m, 0, len);
    for (int p = 0; p < len; p++)
        tokens[p] = p < diverge ? family[p] : rng_int(m, 0, 3);
}

static size_t kvd_kv_pool_block_bytes_for_test(const model *m)
{
    kvd_kv_stats s;
    kvd_kv_stats_get(m->pool, &s);
    if (s.block_bytes > sizeof(((disk_page *)0)->data))
        FAILF(m, "block of %zu bytes is larger than a test disk page", s.block_bytes);
    return s.block_bytes;
}

static disk_page *disk_slot(model *m, uint64_t hash)
{
    return &m->disk[(hash ^ (hash >> 17)) % DISK_SLOTS];
}

/* The pool is about to reuse a cached block: it must be the model's least recently
 * used cached block, and its bytes the K/V of exactly its registered prefix. */
static void on_evict(void *arg, const kvd_kv_page *page)
{
    model *m = arg;
    int32_t b = -1;
    for (int32_t i = 0; i < m->cfg->num_blocks; i++)
        if (kvd_kv_block_data(m->pool, i) == page->data)
            b = i;
    /* The model catches up after the append: this is its k-th eviction in it. */
    int k = m->evicting++;
    if (b < 0 || !m->registered[b] || k >= m->lru_len || m->lru[k] != b)
        FAILF(m, "evict hook on block %d, least recently used cached is %d", (int)b,
              k < m->lru_len ? (int)m->lru[k] : -1);
    int len = m->reg_len[b];
    if (!same_ids(page->tokens, m->reg_tokens[b] + len - m->bs, m->bs))
        FAILF(m, "evict hook: block %d's token ids are not its prefix's last block", (int)b);
    /* Its contents, position by position (the model's value of each prefix). */
    uint64_t prefix = 0x5eed;
    for (int p = 0; p < len; p++) {
        prefix = mix(prefix, (uint64_t)(uint32_t)m->reg_tokens[b][p]);
        if (p < len - m->bs)
            continue;
        for (int layer = 0; layer < LAYERS; layer++)
            for (int kv = 0; kv < 2; kv++)
                for (int dim = 0; dim < HEAD_DIM; dim++)
                    if (slot_of(m, b, layer, kv, p - (len - m->bs))[dim] != kv_value(prefix, layer, kv, dim))
                        FAILF(m, "evict hook: block %d position %d holds another prefix's K/V", (int)b, p);
    }
    if (len != m->reg_len[b] || prefix != m->reg_prefix[b])
        FAILF(m, "evict hook: block %d's prefix label differs", (int)b);
    disk_page *d = disk_slot(m, page->key.hash);
    d->used = true;
    d->key = page->key;
    d->prefix_len = len;
    memcpy(d->tokens, m->reg_tokens[b], sizeof(int32_t) * (size_t)len);
    size_t bytes = kvd_kv_pool_block_bytes_for_test(m);
    memcpy(d->data, page->data, bytes);
    m->disk_writes++;
}

/* After a RAM hit of `got` tokens: how many of the prompt's next pages the disk holds
 * (by the pool's keys, confirmed by key and own token ids as the store does), against
 * the model's answer (pages whose whole prefix is the prompt's). Returns that count. */
static int disk_probe(model *m, model_table *mt, const int32_t *prompt, int len, kvd_kv_page_key *keys)
{
    int n = kvd_prefix_cache_next_keys(m->pool, &mt->t, prompt, len, keys, MAX_LEN);
    int first = mt->t.num_blocks;
    EXPECT_EQ(m, n, len > 0 ? (len - 1) / m->bs - first : 0, "next keys past the RAM hit");
    int found = 0;
    while (found < n) {
        const kvd_kv_page_key *k = &keys[found];
        const disk_page *d = disk_slot(m, k->hash);
        int end = (first + found + 1) * m->bs;
        bool by_key = d->used && d->key.hash == k->hash && d->key.parent_hash == k->parent_hash &&
                      d->key.check == k->check && same_ids(d->tokens + d->prefix_len - m->bs, prompt + end - m->bs, m->bs);
        bool by_model = d->used && d->prefix_len == end && same_ids(d->tokens, prompt, end);
        if (by_key != by_model)
            FAILF(m, "disk page %d past the hit: keys say %d, the whole prefix says %d", found, by_key, by_model);
        if (!by_key)
            break;
        found++;
    }
    return found;
}

/* Completes a loading table: copies its pages from the test disk into its blocks, all
 * of them or (a failed read) only the first few, gives the rest back, commits. */
static void op_finish_load(model *m, model_table *mt)
{
    int pages = mt->loading;
    int ok = rng_chance(m, 80) ? pages : rng_int(m, 0, pages - 1);
    int first = mt->t.num_blocks - pages;
    size_t bytes = kvd_kv_pool_block_bytes_for_test(m);
    for (int i = 0; i < ok; i++) {
        const kvd_kv_page_key *k = &mt->load_keys[i];
        const disk_page *d = disk_slot(m, k->hash);
        /* A newer page took its slot meanwhile: the read misses, the rest is recomputed. */
        if (!d->used || d->key.hash != k->hash || d->key.check != k->check) {
            ok = i;
            break;
        }
        memcpy(kvd_kv_block_data(m->pool, mt->t.blocks[first + i]), d->data, bytes);
    }
    int keep = (first + ok) * m->bs;
    for (int i = mt->t.num_blocks - 1; i >= first + ok; i--) {
        m->in_free[mt->t.blocks[i]] = true; /* unregistered, held once: back to free */
        m->free_len++;
    }
    EXPECT_EQ(m, kvd_block_table_truncate(m->pool, &mt->t, keep), 0, "truncate after a load");
    mt->len = keep;
    mt->loading = 0;
    m->disk_loads++;
    m->disk_pages_loaded += (uint64_t)ok;
    m->disk_partial += ok < pages;
    verify_contents(m, mt); /* loaded pages hold exactly this prefix's K/V */
    op_commit(m, mt, keep);
}

static void op_new_sequence(model *m, int ti)
{
    model_table *mt = &m->tables[ti];
    int32_t prompt[MAX_LEN];
    int len = rng_int(m, 1, m->cfg->max_prompt);
    make_prompt(m, prompt, len);

    /* Expected hit: longest run of cached blocks holding exactly this prefix. */
    int32_t expected[MAX_LEN];
    int matched = 0;
    uint64_t prefix = 0x5eed;
    int p = 0;
    if (m->cfg->prefix_cache) {
        for (; matched < (len - 1) / m->bs; matched++) {
            for (; p < (matched + 1) * m->bs; p++)
                prefix = mix(prefix, (uint64_t)(uint32_t)prompt[p]);
            int32_t b = find_registered(m, prompt, (matched + 1) * m->bs, prefix);
            if (b < 0)
                break;
            expected[matched] = b;
        }
    }
    int32_t refs[MAX_BLOCKS], fills[MAX_BLOCKS];
    model_counts(m, refs, fills, -1);
    int got = kvd_prefix_cache_lookup(m->pool, &mt->t, prompt, len);
    EXPECT_EQ(m, got, matched * m->bs, "tokens covered by the prefix cache");
    for (int i = 0; i < matched; i++) {
        EXPECT_EQ(m, mt->t.blocks[i], expected[i], "block attached by a hit");
        if (refs[expected[i]] == 0)
            lru_remove(m, expected[i]);
    }
    m->queries++;
    m->query_tokens += (uint64_t)len;
    if (matched > 0) {
        m->hits++;
        m->hit_tokens += (uint64_t)(matched * m->bs);
    }
    mt->live = true;
    mt->len = got;
    mt->committed = matched;
    set_tokens(mt, prompt, 0, got);
    verify_contents(m, mt); /* the cached K/V belong to exactly this prefix */
    check_all(m);
    if (m->cfg->disk && rng_chance(m, 80)) {
        kvd_kv_page_key keys[MAX_LEN];
        int found = disk_probe(m, mt, prompt, len, keys);
        if (found > 0 && op_append(m, mt, prompt, found * m->bs)) {
            memcpy(mt->load_keys, keys, sizeof(kvd_kv_page_key) * (size_t)found);
            /* Until the load is back its blocks hold whatever they held: garbage. */
            for (int i = mt->t.num_blocks - found; i < mt->t.num_blocks; i++)
                memset(kvd_kv_block_data(m->pool, mt->t.blocks[i]), 0xa5, kvd_kv_pool_block_bytes_for_test(m));
            mt->loading = found;
            return;
        }
    }
    if (!op_append(m, mt, prompt, len - got)) {
        check_all(m);
        op_release(m, ti); /* admission failed: give the hit back */
        return;
    }
    verify_contents(m, mt);
    if (rng_chance(m, 85))
        op_commit(m, mt, rng_chance(m, 80) ? len : rng_int(m, 0, len));
}

static void run_config(const prop_config *cfg, uint64_t seed, uint64_t ops)
{
    model *m = calloc(1, sizeof *m);
    assert_non_null(m);
    m->cfg = cfg;
    m->rng = seed;
    m->bs = cfg->block_size;
    kvd_kv_config kc = {
        .num_layers = LAYERS, .num_kv_heads = 1, .head_dim = HEAD_DIM, .block_size = cfg->block_size,
        .dtype = KVD_DTYPE_F32, .num_blocks = (size_t)cfg->num_blocks, .enable_prefix_cache = cfg->prefix_cache,
    };
    kvd_error err = {0};
    m->pool = kvd_kv_pool_create(&kc, &err);
    if (!m->pool)
        fail_msg("pool: %s", err.msg);
    for (int f = 0; f < NUM_FAMILIES; f++)
        for (int p = 0; p < MAX_LEN; p++)
            m->families[f][p] = rng_int(m, 0, 1 << 20);
    for (int b = 0; b < cfg->num_blocks; b++)
        m->in_free[b] = true;
    m->free_len = cfg->num_blocks;
    for (int ti = 0; ti < MAX_TABLES; ti++)
        kvd_block_table_init(&m->tables[ti].t);
    if (cfg->disk) {
        m->disk = calloc(DISK_SLOTS, sizeof *m->disk);
        assert_non_null(m->disk);
        kvd_kv_pool_set_evict_hook(m->pool, on_evict, m);
    }

    uint64_t enospc = 0, forks = 0, news = 0;
    for (m->step = 0; m->step < ops; m->step++) {
        int r = rng_int(m, 0, 99);
        int ti;
        if (cfg->disk && rng_chance(m, 30) && (ti = loading_slot(m)) >= 0) {
            op_finish_load(m, &m->tables[ti]);
        } else if (r < 25 && (ti = free_slot(m)) >= 0) {
            op_new_sequence(m, ti);
            news++;
        } else if (r < 60 && (ti = live_slot(m)) >= 0) {
            model_table *mt = &m->tables[ti];
            int n = rng_chance(m, 80) ? 1 : rng_int(m, 1, 2 * m->bs);
            if (mt->len + n > cfg->max_len) {
                op_release(m, ti);
            } else {
                int32_t tokens[MAX_LEN];
                memcpy(tokens, mt->tokens, sizeof(int32_t) * (size_t)mt->len);
                for (int p = mt->len; p < mt->len + n; p++)
                    tokens[p] = rng_int(m, 0, 3);
                if (op_append(m, mt, tokens, n)) {
                    if (rng_chance(m, 50))
                        op_commit(m, mt, mt->len);
                } else {
                    enospc++;
                }
            }
        } else if (r < 72 && (ti = live_slot(m)) >= 0) {
            int dst = free_slot(m);
            if (dst >= 0) {
                model_table *src = &m->tables[ti], *mt = &m->tables[dst];
                if (kvd_block_table_fork(m->pool, &src->t, &mt->t, &err) != 0)
                    FAILF(m, "fork: %s", err.msg);
                if (!same_ids(src->t.blocks, mt->t.blocks, src->t.num_blocks))
                    FAILF(m, "fork does not share the blocks");
                mt->live = true;
                mt->len = src->len;
                mt->committed = src->committed;
                memcpy(mt->tokens, src->tokens, sizeof(int32_t) * (size_t)src->len);
                memcpy(mt->prefix, src->prefix, sizeof(uint64_t) * (size_t)src->len);
                forks++;
            }
        } else if (r < 88 && (ti = live_slot(m)) >= 0) {
            op_release(m, ti);
        } else if (r < 96 && (ti = live_slot(m)) >= 0) {
            op_commit(m, &m->tables[ti], rng_int(m, 0, m->tables[ti].len));
        } else {
            for (ti = 0; ti < MAX_TABLES; ti++)
                if (m->tables[ti].live && !m->tables[ti].loading)
                    verify_contents(m, &m->tables[ti]);
        }
        check_all(m);
    }
    for (int ti = 0; ti < MAX_TABLES; ti++)
        if (m->tables[ti].loading)
            op_finish_load(m, &m->tables[ti]);
    for (int ti = 0; ti < MAX_TABLES; ti++)
        if (m->tables[ti].live)
            verify_contents(m, &m->tables[ti]);
    for (int ti = 0; ti < MAX_TABLES; ti++) {
        if (m->tables[ti].live)
            op_release(m, ti);
        kvd_block_table_deinit(m->pool, &m->tables[ti].t);
    }
    check_all(m);
    kvd_kv_stats s;
    kvd_kv_stats_get(m->pool, &s);
    printf("# %s: %llu ops (%llu new sequences, %llu forks, %llu ENOSPC), %llu lookups hit %llu, "
           "%llu evictions, %llu copies\n",
           cfg->name, (unsigned long long)ops, (unsigned long long)news, (unsigned long long)forks,
           (unsigned long long)enospc, (unsigned long long)s.prefix_queries, (unsigned long long)s.prefix_hits,
           (unsigned long long)s.evictions, (unsigned long long)s.cow_copies);
    if (cfg->disk)
        printf("# %s: %llu pages to disk, %llu loads of %llu pages (%llu partial)\n", cfg->name,
               (unsigned long long)m->disk_writes, (unsigned long long)m->disk_loads,
               (unsigned long long)m->disk_pages_loaded, (unsigned long long)m->disk_partial);
    kvd_kv_pool_destroy(m->pool);
    free(m->disk);
    free(m);
}

static uint64_t env_u64(const char *name, uint64_t fallback)
{
    const char *v = getenv(name);
    return v && *v ? strtoull(v, NULL, 0) : fallback;
}

static void test_property(void **state)
{
    const prop_config *cfg = *state;
    uint64_t seed = env_u64("KVD_KV_PROPERTY_SEED", 20261123);
    uint64_t total = env_u64("KVD_KV_PROPERTY_OPS", 1200000);
    printf("# seed %llu (KVD_KV_PROPERTY_SEED), config %s\n", (unsigned long long)seed, cfg->name);
    run_config(cfg, seed ^ (uint64_t)cfg->block_size * 0x100000001b3u, (uint64_t)(cfg->share * (double)total));
}

int main(void)
{
    struct CMUnitTest tests[sizeof configs / sizeof configs[0]];
    for (size_t i = 0; i < sizeof configs / sizeof configs[0]; i++)
        tests[i] = (struct CMUnitTest){configs[i].name, test_property, NULL, NULL, (void *)&configs[i]};
    return cmocka_run_group_tests_name("kv_property", tests, NULL, NULL);
}
