/* test_kv.c - unit tests of the paged KV cache: pool sizing, block tables, COW, prefix cache.
 *
 * Every test runs the pool's invariant checker after each operation, passing every
 * live table, so a refcount, list or hash-map inconsistency fails at the step that
 * caused it. Counts are exact: blocks, tokens, bytes, evictions, copies, block ids.
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

#define TABLES(...) ((const kvd_block_table *const[]){__VA_ARGS__})
#define NUM_TABLES(...) ((int)(sizeof(TABLES(__VA_ARGS__)) / sizeof(const kvd_block_table *)))
/* Invariants with exactly the listed tables alive. */
#define CHECK(pool, ...) assert_invariants((pool), TABLES(__VA_ARGS__), NUM_TABLES(__VA_ARGS__))
#define CHECK_NO_TABLES(pool) assert_invariants((pool), NULL, 0)

static void assert_invariants(const kvd_kv_pool *pool, const kvd_block_table *const *tables, int n)
{
    kvd_error err = {0};
    int rc = kvd_kv_check_invariants(pool, tables, n, &err);
    if (rc != 0)
        fail_msg("invariants: %s", err.msg);
}

/* A small shape: 2 layers, 2 kv heads, head_dim 8, f16. */
static kvd_kv_config small_config(int block_size, size_t num_blocks, bool prefix_cache)
{
    return (kvd_kv_config){
        .num_layers = 2,
        .num_kv_heads = 2,
        .head_dim = 8,
        .block_size = block_size,
        .dtype = KVD_DTYPE_F16,
        .num_blocks = num_blocks,
        .enable_prefix_cache = prefix_cache,
    };
}

static kvd_kv_config qwen_config(void)
{
    return (kvd_kv_config){
        .num_layers = 24,
        .num_kv_heads = 2,
        .head_dim = 64,
        .block_size = 16,
        .dtype = KVD_DTYPE_F16,
        .enable_prefix_cache = true,
    };
}

static kvd_kv_pool *make_pool(kvd_kv_config cfg)
{
    kvd_error err = {0};
    kvd_kv_pool *pool = kvd_kv_pool_create(&cfg, &err);
    if (!pool)
        fail_msg("pool create: %s", err.msg);
    return pool;
}

static void append_ok(kvd_kv_pool *pool, kvd_block_table *table, int n)
{
    kvd_error err = {0};
    int rc = kvd_block_table_append(pool, table, n, &err);
    if (rc != 0)
        fail_msg("append %d: %d %s", n, rc, err.msg);
}

static kvd_kv_stats stats_of(const kvd_kv_pool *pool)
{
    kvd_kv_stats s;
    kvd_kv_stats_get(pool, &s);
    return s;
}

/* tokens[i] = base + i */
static void fill_tokens(int32_t *tokens, int n, int32_t base)
{
    for (int i = 0; i < n; i++)
        tokens[i] = base + i;
}

/* Element of a slot for (layer, K/V, head, dim): distinct per position tag. */
static uint16_t pattern(int tag, int layer, int kv, int head, int dim)
{
    return (uint16_t)(tag * 131 + layer * 17 + kv * 7 + head * 3 + dim + 1);
}

static uint16_t *slot_elems(const kvd_kv_pool *pool, int32_t block, int layer, int kv, int head, int slot)
{
    const kvd_kv_config *cfg = kvd_kv_pool_config(pool);
    uint16_t *base = kv ? kvd_kv_block_values(pool, block, layer) : kvd_kv_block_keys(pool, block, layer);
    return base + ((size_t)head * cfg->block_size + slot) * cfg->head_dim;
}

/* Writes position pos of the table as a forward pass would, with a tag. */
static void write_position(const kvd_kv_pool *pool, const kvd_block_table *t, int pos, int tag)
{
    const kvd_kv_config *cfg = kvd_kv_pool_config(pool);
    int32_t block = t->blocks[pos / cfg->block_size];
    for (int l = 0; l < cfg->num_layers; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < cfg->num_kv_heads; h++) {
                uint16_t *e = slot_elems(pool, block, l, kv, h, pos % cfg->block_size);
                for (int d = 0; d < cfg->head_dim; d++)
                    e[d] = pattern(tag, l, kv, h, d);
            }
}

static void assert_position(const kvd_kv_pool *pool, const kvd_block_table *t, int pos, int tag)
{
    const kvd_kv_config *cfg = kvd_kv_pool_config(pool);
    int32_t block = t->blocks[pos / cfg->block_size];
    for (int l = 0; l < cfg->num_layers; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < cfg->num_kv_heads; h++) {
                const uint16_t *e = slot_elems(pool, block, l, kv, h, pos % cfg->block_size);
                for (int d = 0; d < cfg->head_dim; d++)
                    assert_int_equal(e[d], pattern(tag, l, kv, h, d));
            }
}

/* ---- sizing and configuration ------------------------------------------------------- */

static void test_block_bytes_and_pool_sizing(void **state)
{
    (void)state;
    kvd_kv_config cfg = qwen_config();
    assert_int_equal(kvd_kv_block_bytes(&cfg), 16 * 12288);
    cfg.dtype = KVD_DTYPE_BF16;
    assert_int_equal(kvd_kv_block_bytes(&cfg), 16 * 12288);
    cfg.dtype = KVD_DTYPE_F32;
    assert_int_equal(kvd_kv_block_bytes(&cfg), 16 * 24576);
    /* int8: per layer and K or V, 2 heads x 16 tokens x (64 values + a 2-byte scale) =
     * 2112 bytes: 1.94x the tokens of f16 in the same bytes */
    cfg.dtype = KVD_DTYPE_I8;
    assert_int_equal(kvd_kv_block_bytes(&cfg), 2 * 24 * 2112);
    cfg.dtype = KVD_DTYPE_F8; /* fp8 e4m3: the same layout, one byte a value */
    assert_int_equal(kvd_kv_block_bytes(&cfg), 2 * 24 * 2112);
    cfg.dtype = KVD_DTYPE_F16;

    /* 1 GiB budget: floor(2^30 / 196608) = 5461 blocks, reported exactly. */
    cfg.cache_bytes = (size_t)1 << 30;
    kvd_kv_pool *pool = make_pool(cfg);
    kvd_kv_stats s = stats_of(pool);
    assert_int_equal(s.blocks_total, 5461);
    assert_int_equal(s.blocks_free, 5461);
    assert_int_equal(s.block_bytes, 196608);
    assert_int_equal(s.pool_bytes, (size_t)5461 * 196608);
    assert_int_equal(kvd_kv_pool_config(pool)->num_blocks, 5461);
    /* Layout: block-major, each layer K then V, slices of 2*16*64*2 = 4096 bytes. */
    uint8_t *k00 = kvd_kv_block_keys(pool, 0, 0);
    assert_int_equal((uintptr_t)k00 % 64, 0);
    assert_ptr_equal(kvd_kv_block_values(pool, 0, 0), k00 + 4096);
    assert_ptr_equal(kvd_kv_block_keys(pool, 0, 23), k00 + 23 * 8192);
    assert_ptr_equal(kvd_kv_block_keys(pool, 5460, 1), k00 + (size_t)5460 * 196608 + 8192);
    CHECK_NO_TABLES(pool);
    kvd_kv_pool_destroy(pool);

    /* num_blocks wins over cache_bytes. */
    cfg.num_blocks = 3;
    pool = make_pool(cfg);
    assert_int_equal(stats_of(pool).blocks_total, 3);
    assert_int_equal(stats_of(pool).pool_bytes, 3 * 196608);
    kvd_kv_pool_destroy(pool);

    /* A tiny shape pads each slice to 64 bytes: 1 head * 1 slot * 4 dims * 2 bytes = 8 -> 64. */
    kvd_kv_config tiny = {.num_layers = 2, .num_kv_heads = 1, .head_dim = 4, .block_size = 1,
                          .dtype = KVD_DTYPE_F16, .cache_bytes = 1000};
    assert_int_equal(kvd_kv_block_bytes(&tiny), 2 * 2 * 64);
    pool = make_pool(tiny);
    assert_int_equal(stats_of(pool).blocks_total, 3); /* 1000 / 256 */
    for (int b = 0; b < 3; b++)
        for (int l = 0; l < 2; l++) {
            assert_int_equal((uintptr_t)kvd_kv_block_keys(pool, b, l) % 64, 0);
            assert_int_equal((uintptr_t)kvd_kv_block_values(pool, b, l) % 64, 0);
        }
    kvd_kv_pool_destroy(pool);
    kvd_kv_pool_destroy(NULL);
}

/* Every layer slice of every block is distinct memory: write all, read all back. */
static void test_slices_do_not_overlap(void **state)
{
    (void)state;
    kvd_kv_pool *pool = make_pool(small_config(4, 6, false));
    const kvd_kv_config *cfg = kvd_kv_pool_config(pool);
    size_t elems = (size_t)cfg->num_kv_heads * cfg->block_size * cfg->head_dim;
    for (int b = 0; b < 6; b++)
        for (int l = 0; l < 2; l++)
            for (int kv = 0; kv < 2; kv++) {
                uint16_t *e = kv ? kvd_kv_block_values(pool, b, l) : kvd_kv_block_keys(pool, b, l);
                for (size_t i = 0; i < elems; i++)
                    e[i] = (uint16_t)(b * 1000 + l * 100 + kv * 10 + i % 7);
            }
    for (int b = 0; b < 6; b++)
        for (int l = 0; l < 2; l++)
            for (int kv = 0; kv < 2; kv++) {
                const uint16_t *e = kv ? kvd_kv_block_values(pool, b, l) : kvd_kv_block_keys(pool, b, l);
                for (size_t i = 0; i < elems; i++)
                    assert_int_equal(e[i], (uint16_t)(b * 1000 + l * 100 + kv * 10 + i % 7));
            }
    kvd_kv_pool_destroy(pool);
}

static void test_bad_configs_name_the_field(void **state)
{
    (void)state;
    struct {
        kvd_kv_config cfg;
        const char *field;
    } cases[8];
    for (int i = 0; i < 8; i++)
        cases[i].cfg = small_config(16, 8, true);
    cases[0].cfg.num_layers = 0, cases[0].field = "num_layers";
    cases[1].cfg.num_kv_heads = -2, cases[1].field = "num_kv_heads";
    cases[2].cfg.head_dim = 0, cases[2].field = "head_dim";
    cases[3].cfg.block_size = 12, cases[3].field = "block_size";
    cases[4].cfg.block_size = 512, cases[4].field = "block_size";
    cases[5].cfg.block_size = 0, cases[5].field = "block_size";
    cases[6].cfg.dtype = (kvd_dtype)7, cases[6].field = "dtype";
    /* Budget below one block (2 * 2 * 2*16*8*2 = 2048 bytes) with no block count. */
    cases[7].cfg.num_blocks = 0, cases[7].cfg.cache_bytes = 2047, cases[7].field = "cache_bytes";
    for (int i = 0; i < 8; i++) {
        kvd_error err = {0};
        assert_null(kvd_kv_pool_create(&cases[i].cfg, &err));
        assert_int_equal(err.code, KVD_EINVAL);
        if (!strstr(err.msg, cases[i].field))
            fail_msg("case %d: message \"%s\" does not name %s", i, err.msg, cases[i].field);
    }
    kvd_kv_config ok = small_config(16, 0, true);
    ok.cache_bytes = 2048;
    kvd_kv_pool *pool = make_pool(ok);
    assert_int_equal(stats_of(pool).blocks_total, 1);
    kvd_kv_pool_destroy(pool);
    kvd_kv_config bad = small_config(3, 1, true);
    assert_int_equal(kvd_kv_block_bytes(&bad), 0);
}

/* ---- block tables ------------------------------------------------------------------ */

static void append_across_boundaries(int bs)
{
    kvd_kv_pool *pool = make_pool(small_config(bs, 8, true));
    size_t token_bytes = stats_of(pool).block_bytes / (size_t)bs;
    kvd_block_table t;
    kvd_block_table_init(&t);

    append_ok(pool, &t, 1);
    CHECK(pool, &t);
    assert_int_equal(t.num_tokens, 1);
    assert_int_equal(t.num_blocks, 1);
    assert_int_equal(t.blocks[0], 0);
    kvd_kv_stats s = stats_of(pool);
    assert_int_equal(s.blocks_used, 1);
    assert_int_equal(s.tokens_stored, 1);
    assert_int_equal(s.bytes_wasted, (int64_t)((bs - 1) * token_bytes));

    append_ok(pool, &t, bs - 1); /* fills the first block exactly (no-op for bs 1) */
    CHECK(pool, &t);
    assert_int_equal(t.num_blocks, 1);
    assert_int_equal(stats_of(pool).bytes_wasted, 0);

    append_ok(pool, &t, 1); /* first slot of the second block */
    CHECK(pool, &t);
    assert_int_equal(t.num_blocks, 2);
    assert_int_equal(t.blocks[1], 1);

    append_ok(pool, &t, 2 * bs + 1); /* tokens: bs + 1 + 2bs + 1 = 3bs + 2 -> 4 blocks */
    CHECK(pool, &t);
    assert_int_equal(t.num_tokens, 3 * bs + 2);
    assert_int_equal(t.num_blocks, bs == 1 ? 5 : 4);
    for (int i = 0; i < t.num_blocks; i++)
        assert_int_equal(t.blocks[i], i); /* a fresh pool hands out ascending ids */
    s = stats_of(pool);
    assert_int_equal(s.blocks_used, t.num_blocks);
    assert_int_equal(s.blocks_free, 8 - t.num_blocks);
    assert_int_equal(s.tokens_stored, 3 * bs + 2);
    assert_int_equal(s.bytes_wasted, (int64_t)((size_t)(t.num_blocks * bs - (3 * bs + 2)) * token_bytes));

    assert_int_equal(kvd_block_table_append(pool, &t, 0, NULL), 0);
    assert_int_equal(kvd_block_table_append(pool, &t, -1, NULL), KVD_EINVAL);
    CHECK(pool, &t);

    kvd_block_table_release(pool, &t);
    CHECK_NO_TABLES(pool);
    s = stats_of(pool);
    assert_int_equal(s.blocks_used, 0);
    assert_int_equal(s.blocks_free, 8);
    assert_int_equal(s.tokens_stored, 0);
    assert_int_equal(s.bytes_wasted, 0);
    assert_int_equal(t.num_tokens, 0);
    assert_int_equal(t.num_blocks, 0);
    kvd_block_table_deinit(pool, &t);
    assert_null(t.blocks);
    kvd_kv_pool_destroy(pool);
}

static void test_append_block_size_1(void **state) { (void)state; append_across_boundaries(1); }
static void test_append_block_size_16(void **state) { (void)state; append_across_boundaries(16); }
static void test_append_block_size_256(void **state) { (void)state; append_across_boundaries(256); }

static void test_fork_and_copy_on_write(void **state)
{
    (void)state;
    kvd_kv_pool *pool = make_pool(small_config(16, 8, true));
    kvd_block_table a, b;
    kvd_block_table_init(&a);
    kvd_block_table_init(&b);
    append_ok(pool, &a, 20);
    for (int p = 0; p < 20; p++)
        write_position(pool, &a, p, p + 1);
    assert_int_equal(kvd_block_table_fork(pool, &a, &b, NULL), 0);
    CHECK(pool, &a, &b);
    assert_int_equal(b.num_tokens, 20);
    assert_memory_equal(a.blocks, b.blocks, 2 * sizeof(int32_t));
    int32_t refs[8];
    uint8_t states[8];
    kvd_kv_block_states(pool, states, refs);
    assert_int_equal(refs[0], 2);
    assert_int_equal(refs[1], 2);
    assert_int_equal(states[1], 3);
    assert_int_equal(stats_of(pool).blocks_used, 2);
    assert_int_equal(stats_of(pool).tokens_stored, 20);

    /* b writes into the shared partly filled block: it gets a copy first. */
    assert_int_equal(kvd_kv_blocks_needed(pool, &b, 1), 1);
    int32_t shared_last = a.blocks[1];
    append_ok(pool, &b, 1);
    CHECK(pool, &a, &b);
    assert_int_equal(stats_of(pool).cow_copies, 1);
    assert_int_equal(b.blocks[0], a.blocks[0]); /* full block stays shared */
    assert_int_equal(a.blocks[1], shared_last);
    assert_int_not_equal(b.blocks[1], shared_last);
    for (int p = 0; p < 20; p++)
        assert_position(pool, &b, p, p + 1); /* copied K/V of all layers and heads */
    write_position(pool, &b, 20, 999);
    for (int p = 0; p < 20; p++)
        assert_position(pool, &a, p, p + 1);
    /* a's own slot 20 was never written: still zero. */
    assert_int_equal(slot_elems(pool, a.blocks[1], 1, 1, 1, 4)[7], 0);

    /* a is now the only holder of its last block: no further copy. */
    assert_int_equal(kvd_kv_blocks_needed(pool, &a, 1), 0);
    append_ok(pool, &a, 1);
    CHECK(pool, &a, &b);
    assert_int_equal(stats_of(pool).cow_copies, 1);
    kvd_kv_stats s = stats_of(pool);
    assert_int_equal(s.blocks_used, 3);
    assert_int_equal(s.tokens_stored, 16 + 5 + 5);

    /* fork into a non-empty table is refused and changes nothing. */
    kvd_error err = {0};
    assert_int_equal(kvd_block_table_fork(pool, &a, &b, &err), KVD_ESTATE);
    assert_int_equal(kvd_block_table_fork(pool, &a, &a, &err), KVD_ESTATE);
    CHECK(pool, &a, &b);

    kvd_block_table_deinit(pool, &a);
    CHECK(pool, &b);
    kvd_block_table_deinit(pool, &b);
    CHECK_NO_TABLES(pool);
    assert_int_equal(stats_of(pool).blocks_free, 8);
    kvd_kv_pool_destroy(pool);
}

static void assert_same_state(const kvd_kv_pool *pool, const kvd_kv_stats *before, const uint8_t *states_before,
                              const int32_t *refs_before, int n)
{
    kvd_kv_stats now = stats_of(pool);
    assert_memory_equal(&now, before, sizeof now);
    uint8_t states[16];
    int32_t refs[16];
    kvd_kv_block_states(pool, states, refs);
    assert_memory_equal(states, states_before, (size_t)n);
    assert_memory_equal(refs, refs_before, (size_t)n * sizeof *refs);
}

static void test_enospc_changes_nothing(void **state)
{
    (void)state;
    kvd_kv_pool *pool = make_pool(small_config(4, 4, true));
    kvd_block_table a, b, c;
    kvd_block_table_init(&a);
    kvd_block_table_init(&b);
    kvd_block_table_init(&c);
    append_ok(pool, &a, 10); /* 3 blocks, the last holds 2 */
    assert_int_equal(kvd_block_table_fork(pool, &a, &c, NULL), 0);
    CHECK(pool, &a, &b, &c);

    kvd_kv_stats before = stats_of(pool);
    uint8_t states[4];
    int32_t refs[4];
    kvd_kv_block_states(pool, states, refs);
    kvd_error err = {0};
    /* b needs 2 blocks, 1 is free. */
    assert_int_equal(kvd_block_table_append(pool, &b, 5, &err), KVD_ENOSPC);
    assert_int_equal(err.code, KVD_ENOSPC);
    assert_non_null(strstr(err.msg, "available"));
    assert_int_equal(b.num_tokens, 0);
    assert_int_equal(b.num_blocks, 0);
    assert_same_state(pool, &before, states, refs, 4);
    CHECK(pool, &a, &b, &c);

    /* b takes the last free block; c's write into the shared block then needs a copy. */
    append_ok(pool, &b, 4);
    CHECK(pool, &a, &b, &c);
    before = stats_of(pool);
    kvd_kv_block_states(pool, states, refs);
    int32_t c_blocks[3];
    memcpy(c_blocks, c.blocks, sizeof c_blocks);
    assert_int_equal(kvd_kv_blocks_needed(pool, &c, 1), 1);
    assert_int_equal(kvd_block_table_append(pool, &c, 1, &err), KVD_ENOSPC);
    assert_int_equal(c.num_tokens, 10);
    assert_memory_equal(c.blocks, c_blocks, sizeof c_blocks);
    assert_same_state(pool, &before, states, refs, 4);
    CHECK(pool, &a, &b, &c);

    /* More than the whole pool: never fits. */
    assert_false(kvd_kv_can_ever_fit(pool, 17));
    assert_true(kvd_kv_can_ever_fit(pool, 16));
    kvd_block_table_release(pool, &a);
    kvd_block_table_release(pool, &b);
    kvd_block_table_release(pool, &c);
    CHECK(pool, &a, &b, &c);
    assert_int_equal(kvd_block_table_append(pool, &a, 17, &err), KVD_ENOSPC);
    CHECK(pool, &a);
    append_ok(pool, &a, 16);
    CHECK(pool, &a);
    kvd_block_table_deinit(pool, &a);
    kvd_block_table_deinit(pool, &b);
    kvd_block_table_deinit(pool, &c);
    kvd_kv_pool_destroy(pool);
}

static void test_capacity_queries(void **state)
{
    (void)state;
    kvd_kv_pool *pool = make_pool(small_config(16, 10, true));
    assert_true(kvd_kv_can_ever_fit(pool, 0));
    assert_true(kvd_kv_can_ever_fit(pool, 160));
    assert_false(kvd_kv_can_ever_fit(pool, 161));
    assert_false(kvd_kv_can_ever_fit(pool, -1));
    kvd_block_table t, f;
    kvd_block_table_init(&t);
    kvd_block_table_init(&f);
    assert_int_equal(kvd_kv_blocks_needed(pool, &t, 0), 0);
    assert_int_equal(kvd_kv_blocks_needed(pool, &t, 1), 1);
    assert_int_equal(kvd_kv_blocks_needed(pool, &t, 17), 2);
    append_ok(pool, &t, 17);
    assert_int_equal(kvd_kv_available_blocks(pool), 8);
    assert_int_equal(kvd_kv_blocks_needed(pool, &t, 15), 0);
    assert_int_equal(kvd_kv_blocks_needed(pool, &t, 16), 1);
    assert_int_equal(kvd_block_table_fork(pool, &t, &f, NULL), 0);
    assert_int_equal(kvd_kv_blocks_needed(pool, &t, 15), 1);  /* copy of the shared block */
    assert_int_equal(kvd_kv_blocks_needed(pool, &t, 16), 2);
    CHECK(pool, &t, &f);
    kvd_block_table_deinit(pool, &t);
    kvd_block_table_deinit(pool, &f);
    kvd_kv_pool_destroy(pool);
}

static void test_reserve_keeps_appends_allocation_free(void **state)
{
    (void)state;
    kvd_kv_pool *pool = make_pool(small_config(16, 16, true));
    kvd_block_table t;
    kvd_block_table_init(&t);
    assert_int_equal(kvd_block_table_reserve(pool, &t, 200, NULL), 0);
    assert_true(t.capacity >= 13);
    int32_t *blocks = t.blocks;
    uint64_t *hashes = t.hashes;
    for (int i = 0; i < 200; i++) {
        append_ok(pool, &t, 1);
        assert_ptr_equal(t.blocks, blocks);
        assert_ptr_equal(t.hashes, hashes);
    }
    CHECK(pool, &t);
    assert_int_equal(t.num_blocks, 13);
    assert_int_equal(kvd_block_table_reserve(pool, &t, -1, NULL), KVD_EINVAL);
    kvd_block_table_deinit(pool, &t);
    kvd_kv_pool_destroy(pool);
}

/* The sharing case: n = 4 samples of a 1,000-token prompt hold it once. */
static void test_sharing_four_samples(void **state)
{
    (void)state;
    kvd_kv_pool *pool = make_pool(small_config(16, 80, true));
    int32_t prompt[1000];
    fill_tokens(prompt, 1000, 5000);
    kvd_block_table parent, forks[4];
    kvd_block_table_init(&parent);
    append_ok(pool, &parent, 1000);
    kvd_prefix_cache_commit(pool, &parent, prompt, 1000);
    assert_int_equal(stats_of(pool).blocks_used, 63); /* ceil(1000 / 16) */
    for (int i = 0; i < 4; i++) {
        kvd_block_table_init(&forks[i]);
        assert_int_equal(kvd_block_table_fork(pool, &parent, &forks[i], NULL), 0);
    }
    CHECK(pool, &parent, &forks[0], &forks[1], &forks[2], &forks[3]);
    assert_int_equal(stats_of(pool).blocks_used, 63);
    assert_int_equal(stats_of(pool).tokens_stored, 1000);
    for (int i = 0; i < 4; i++) {
        append_ok(pool, &forks[i], 1);
        CHECK(pool, &parent, &forks[0], &forks[1], &forks[2], &forks[3]);
    }
    kvd_kv_stats s = stats_of(pool);
    assert_int_equal(s.blocks_used, 63 + 4);
    assert_int_equal(s.cow_copies, 4);
    assert_int_equal(s.tokens_stored, 992 + 8 + 4 * 9);
    for (int i = 0; i < 4; i++)
        assert_memory_equal(forks[i].blocks, parent.blocks, 62 * sizeof(int32_t));

    /* The engine's usual shape: the parent goes away once forked, so the last sample
     * writes the original partial block in place. */
    for (int i = 0; i < 4; i++)
        kvd_block_table_release(pool, &forks[i]);
    for (int i = 0; i < 4; i++)
        assert_int_equal(kvd_block_table_fork(pool, &parent, &forks[i], NULL), 0);
    kvd_block_table_release(pool, &parent);
    CHECK(pool, &parent, &forks[0], &forks[1], &forks[2], &forks[3]);
    for (int i = 0; i < 4; i++)
        append_ok(pool, &forks[i], 1);
    CHECK(pool, &parent, &forks[0], &forks[1], &forks[2], &forks[3]);
    s = stats_of(pool);
    assert_int_equal(s.blocks_used, 63 + 3);
    assert_int_equal(s.cow_copies, 4 + 3);
    for (int i = 0; i < 4; i++)
        kvd_block_table_deinit(pool, &forks[i]);
    kvd_block_table_deinit(pool, &parent);
    CHECK_NO_TABLES(pool);
    /* The prompt's 62 full blocks stay cached; everything else is free. */
    s = stats_of(pool);
    assert_int_equal(s.blocks_cached, 62);
    assert_int_equal(s.blocks_free, 80 - 62);
    kvd_kv_pool_destroy(pool);
}

/* ---- prefix cache ------------------------------------------------------------------ */

static void test_prefix_hit_and_miss(void **state)
{
    (void)state;
    kvd_kv_pool *pool = make_pool(small_config(4, 16, true));
    int32_t tokens[11];
    fill_tokens(tokens, 11, 100);
    kvd_block_table a, b;
    kvd_block_table_init(&a);
    kvd_block_table_init(&b);

    assert_int_equal(kvd_prefix_cache_lookup(pool, &a, tokens, 11), 0); /* empty cache */
    append_ok(pool, &a, 11);
    for (int p = 0; p < 11; p++)
        write_position(pool, &a, p, tokens[p]);
    kvd_prefix_cache_commit(pool, &a, tokens, 7); /* one full block computed */
    CHECK(pool, &a, &b);
    assert_int_equal(a.num_cached, 1);
    kvd_prefix_cache_commit(pool, &a, tokens, 11);
    kvd_prefix_cache_commit(pool, &a, tokens, 11); /* idempotent */
    CHECK(pool, &a, &b);
    assert_int_equal(a.num_cached, 2);
    int32_t a_blocks[2] = {a.blocks[0], a.blocks[1]};
    kvd_block_table_release(pool, &a);
    CHECK(pool, &a, &b);
    kvd_kv_stats s = stats_of(pool);
    assert_int_equal(s.blocks_cached, 2);
    assert_int_equal(s.blocks_free, 14);
    assert_int_equal(s.blocks_used, 0);

    /* Full hit: 8 tokens from the cache, the K/V written by a. */
    assert_int_equal(kvd_prefix_cache_lookup(pool, &b, tokens, 11), 8);
    CHECK(pool, &a, &b);
    assert_int_equal(b.num_tokens, 8);
    assert_int_equal(b.num_cached, 2);
    assert_memory_equal(b.blocks, a_blocks, sizeof a_blocks);
    for (int p = 0; p < 8; p++)
        assert_position(pool, &b, p, tokens[p]);
    assert_int_equal(stats_of(pool).blocks_used, 2);
    assert_int_equal(stats_of(pool).tokens_stored, 8);
    assert_int_equal(kvd_prefix_cache_lookup(pool, &b, tokens, 11), KVD_ESTATE); /* not empty */
    kvd_block_table_release(pool, &b);

    struct {
        int n;
        int changed_at; /* -1: none */
        int expected;
    } cases[] = {
        {9, -1, 8},  /* one token past the cached blocks */
        {8, -1, 4},  /* the whole prompt cached: the last block is recomputed */
        {5, -1, 4},
        {4, -1, 0},
        {1, -1, 0},
        {0, -1, 0},
        {11, 5, 4},  /* second block differs */
        {11, 0, 0},  /* first token differs */
        {11, 3, 0},  /* last token of the first block differs */
    };
    uint64_t queries = 2, query_tokens = 22, hits = 1, hit_tokens = 8;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int32_t probe[11];
        memcpy(probe, tokens, sizeof probe);
        if (cases[i].changed_at >= 0)
            probe[cases[i].changed_at] = 7;
        int got = kvd_prefix_cache_lookup(pool, &b, probe, cases[i].n);
        if (got != cases[i].expected)
            fail_msg("case %zu: %d tokens covered, expected %d", i, got, cases[i].expected);
        CHECK(pool, &a, &b);
        queries++;
        query_tokens += (uint64_t)cases[i].n;
        hits += got > 0;
        hit_tokens += (uint64_t)got;
        kvd_block_table_release(pool, &b);
    }
    s = stats_of(pool);
    assert_int_equal(s.prefix_queries, queries);
    assert_int_equal(s.prefix_query_tokens, query_tokens);
    assert_int_equal(s.prefix_hits, hits);
    assert_int_equal(s.prefix_hit_tokens, hit_tokens);
    assert_int_equal(kvd_prefix_cache_lookup(pool, &b, NULL, 3), KVD_EINVAL);
    assert_int_equal(kvd_prefix_cache_lookup(pool, &b, tokens, -1), KVD_EINVAL);
    kvd_block_table_deinit(pool, &a);
    kvd_block_table_deinit(pool, &b);
    kvd_kv_pool_destroy(pool);
}

/* A hash that ignores the token ids: every block at the same depth collides. */
static uint64_t hash_ignoring_ids(uint64_t seed, const int32_t *ids, int n)
{
    (void)ids;
    (void)n;
    return seed * 31 + 7;
}

/* A hash that ignores the chain: equal blocks collide whatever precedes them. */
static uint64_t hash_ignoring_chain(uint64_t seed, const int32_t *ids, int n)
{
    (void)seed;
    uint64_t h = 1469598103934665603u;
    for (int i = 0; i < n; i++)
        h = (h ^ (uint32_t)ids[i]) * 1099511628211u;
    return h;
}

static void test_collisions_are_confirmed(void **state)
{
    (void)state;
    kvd_kv_pool *pool = make_pool(small_config(4, 16, true));
    assert_int_equal(kvd_kv_pool_set_block_hash(pool, hash_ignoring_ids, NULL), 0);
    int32_t x[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    int32_t y[9] = {1, 2, 3, 4, 50, 60, 70, 80, 90};
    kvd_block_table a, b;
    kvd_block_table_init(&a);
    kvd_block_table_init(&b);
    append_ok(pool, &a, 9);
    kvd_prefix_cache_commit(pool, &a, x, 9);
    kvd_block_table_release(pool, &a);
    CHECK(pool, &a, &b);
    assert_int_equal(stats_of(pool).blocks_cached, 2);
    kvd_error err = {0};
    assert_int_equal(kvd_kv_pool_set_block_hash(pool, NULL, &err), KVD_ESTATE);

    /* y's second block has x's second block's hash: the ids tell them apart. */
    assert_int_equal(kvd_prefix_cache_lookup(pool, &b, y, 9), 4);
    CHECK(pool, &a, &b);
    append_ok(pool, &b, 5);
    kvd_prefix_cache_commit(pool, &b, y, 9); /* colliding block stays private */
    int32_t private_block = b.blocks[1];
    kvd_block_table_release(pool, &b);
    CHECK(pool, &a, &b);
    kvd_kv_stats s = stats_of(pool);
    assert_int_equal(s.blocks_cached, 2);
    uint8_t states[16];
    kvd_kv_block_states(pool, states, NULL);
    assert_int_equal(states[private_block], 0);
    assert_int_equal(kvd_prefix_cache_lookup(pool, &b, x, 9), 8);
    kvd_block_table_release(pool, &b);
    assert_int_equal(kvd_prefix_cache_lookup(pool, &b, y, 9), 4);
    kvd_block_table_release(pool, &b);
    CHECK(pool, &a, &b);
    kvd_kv_pool_destroy(pool);

    /* Equal ids after a different first block: the parent link tells them apart. */
    pool = make_pool(small_config(4, 16, true));
    assert_int_equal(kvd_kv_pool_set_block_hash(pool, hash_ignoring_chain, NULL), 0);
    int32_t z[9] = {9, 9, 9, 9, 5, 6, 7, 8, 9};
    append_ok(pool, &a, 9);
    kvd_prefix_cache_commit(pool, &a, x, 9);
    kvd_block_table_release(pool, &a);
    append_ok(pool, &a, 9);
    kvd_prefix_cache_commit(pool, &a, z, 9); /* first block registered, second collides */
    kvd_block_table_release(pool, &a);
    CHECK(pool, &a, &b);
    assert_int_equal(stats_of(pool).blocks_cached, 3);
    assert_int_equal(kvd_prefix_cache_lookup(pool, &b, z, 9), 4);
    CHECK(pool, &a, &b);
    kvd_block_table_release(pool, &b);
    assert_int_equal(kvd_prefix_cache_lookup(pool, &b, x, 9), 8);
    kvd_block_table_deinit(pool, &b);
    kvd_block_table_deinit(pool, &a);
    kvd_kv_pool_destroy(pool);
}

/* Two requests computed the same prompt without a hit: one copy is cached. */
static void test_duplicate_blocks_stay_private(void **state)
{
    (void)state;
    kvd_kv_pool *pool = make_pool(small_config(4, 8, true));
    int32_t tokens[12];
    fill_tokens(tokens, 12, 1);
    kvd_block_table a, b, c;
    kvd_block_table_init(&a);
    kvd_block_table_init(&b);
    kvd_block_table_init(&c);
    append_ok(pool, &a, 8);
    append_ok(pool, &b, 12);
    kvd_prefix_cache_commit(pool, &a, tokens, 8);
    kvd_prefix_cache_commit(pool, &b, tokens, 12); /* 0,1 duplicate a's; 2 follows a duplicate */
    CHECK(pool, &a, &b, &c);
    kvd_block_table_release(pool, &b);
    kvd_block_table_release(pool, &a);
    CHECK(pool, &a, &b, &c);
    kvd_kv_stats s = stats_of(pool);
    assert_int_equal(s.blocks_cached, 2);
    assert_int_equal(s.blocks_free, 6);
    assert_int_equal(kvd_prefix_cache_lookup(pool, &c, tokens, 12), 8);
    assert_int_equal(c.blocks[0], 0);
    assert_int_equal(c.blocks[1], 1);
    /* Extending a hit registers the new block (its parent is registered). */
    append_ok(pool, &c, 4);
    kvd_prefix_cache_commit(pool, &c, tokens, 12);
    kvd_block_table_release(pool, &c);
    CHECK(pool, &a, &b, &c);
    assert_int_equal(stats_of(pool).blocks_cached, 3);
    int32_t longer[13];
    fill_tokens(longer, 13, 1);
    assert_int_equal(kvd_prefix_cache_lookup(pool, &c, longer, 13), 12);
    kvd_block_table_deinit(pool, &a);
    kvd_block_table_deinit(pool, &b);
    kvd_block_table_deinit(pool, &c);
    kvd_kv_pool_destroy(pool);
}

/* A fork committed after its source: the shared blocks are registered once. */
static void test_commit_after_fork(void **state)
{
    (void)state;
    kvd_kv_pool *pool = make_pool(small_config(4, 8, true));
    int32_t tokens[10];
    fill_tokens(tokens, 10, 40);
    kvd_block_table a, b;
    kvd_block_table_init(&a);
    kvd_block_table_init(&b);
    append_ok(pool, &a, 9);
    assert_int_equal(kvd_block_table_fork(pool, &a, &b, NULL), 0);
    kvd_prefix_cache_commit(pool, &a, tokens, 9);
    kvd_prefix_cache_commit(pool, &b, tokens, 9);
    CHECK(pool, &a, &b);
    assert_int_equal(b.num_cached, 2);
    assert_memory_equal(a.hashes, b.hashes, 2 * sizeof(uint64_t));
    kvd_block_table_deinit(pool, &a);
    kvd_block_table_deinit(pool, &b);
    CHECK_NO_TABLES(pool);
    assert_int_equal(stats_of(pool).blocks_cached, 2);
    kvd_kv_pool_destroy(pool);
}

static void test_lru_eviction_descendants_first(void **state)
{
    (void)state;
    kvd_kv_pool *pool = make_pool(small_config(4, 7, true));
    int32_t ta[13], tb[9];
    fill_tokens(ta, 13, 1000);
    fill_tokens(tb, 9, 2000);
    kvd_block_table a, b, c, d, e, hold[4];
    kvd_block_table *all[] = {&a, &b, &c, &d, &e, &hold[0], &hold[1], &hold[2], &hold[3]};
    for (int i = 0; i < 9; i++)
        kvd_block_table_init(all[i]);
#define CHECK_ALL() CHECK(pool, &a, &b, &c, &d, &e, &hold[0], &hold[1], &hold[2], &hold[3])

    append_ok(pool, &a, 12); /* blocks 0 1 2 */
    kvd_prefix_cache_commit(pool, &a, ta, 12);
    kvd_block_table_release(pool, &a); /* lru: 2 1 0 */
    append_ok(pool, &b, 8);            /* blocks 3 4 */
    kvd_prefix_cache_commit(pool, &b, tb, 8);
    kvd_block_table_release(pool, &b); /* lru: 2 1 0 4 3 */
    CHECK_ALL();
    assert_int_equal(stats_of(pool).blocks_cached, 5);

    /* Uncached blocks go first: nothing is evicted. */
    append_ok(pool, &c, 8);
    CHECK_ALL();
    assert_int_equal(c.blocks[0], 5);
    assert_int_equal(c.blocks[1], 6);
    assert_int_equal(stats_of(pool).evictions, 0);
    assert_int_equal(stats_of(pool).blocks_cached, 5);

    /* Then the least recently used: a's tail before its head. */
    append_ok(pool, &d, 4);
    CHECK_ALL();
    assert_int_equal(d.blocks[0], 2);
    assert_int_equal(stats_of(pool).evictions, 1);
    assert_int_equal(kvd_prefix_cache_lookup(pool, &e, ta, 13), 8); /* 0 1 survive */
    assert_int_equal(e.blocks[0], 0);
    assert_int_equal(e.blocks[1], 1);
    CHECK_ALL();
    kvd_block_table_release(pool, &e); /* a hit makes them recent: lru 4 3 1 0 */
    CHECK_ALL();

    /* b's tail, b's head, then a's tail and head. */
    int32_t expected[] = {4, 3, 1, 0};
    for (int i = 0; i < 4; i++) {
        append_ok(pool, &hold[i], 4);
        CHECK_ALL();
        assert_int_equal(hold[i].blocks[0], expected[i]);
        assert_int_equal(stats_of(pool).evictions, 2 + (uint64_t)i);
        assert_int_equal(stats_of(pool).blocks_cached, 3 - i);
    }
    assert_int_equal(kvd_kv_available_blocks(pool), 0);
    assert_int_equal(kvd_prefix_cache_lookup(pool, &b, tb, 9), 0);
    assert_int_equal(kvd_prefix_cache_lookup(pool, &a, ta, 13), 0);
    CHECK_ALL();
    for (int i = 0; i < 9; i++)
        kvd_block_table_deinit(pool, all[i]);
    CHECK_NO_TABLES(pool);
    kvd_kv_pool_destroy(pool);
#undef CHECK_ALL
}

static void test_disabled_prefix_cache(void **state)
{
    (void)state;
    kvd_kv_pool *pool = make_pool(small_config(4, 8, false));
    int32_t tokens[9];
    fill_tokens(tokens, 9, 3);
    kvd_block_table a;
    kvd_block_table_init(&a);
    append_ok(pool, &a, 9);
    kvd_prefix_cache_commit(pool, &a, tokens, 9);
    assert_int_equal(a.num_cached, 0);
    kvd_block_table_release(pool, &a);
    CHECK(pool, &a);
    kvd_kv_stats s = stats_of(pool);
    assert_int_equal(s.blocks_cached, 0);
    assert_int_equal(s.blocks_free, 8);
    assert_int_equal(kvd_prefix_cache_lookup(pool, &a, tokens, 9), 0);
    assert_int_equal(a.num_tokens, 0);
    s = stats_of(pool);
    assert_int_equal(s.prefix_queries, 1);
    assert_int_equal(s.prefix_query_tokens, 9);
    assert_int_equal(s.prefix_hits, 0);
    assert_int_equal(s.prefix_hit_tokens, 0);
    kvd_block_table_deinit(pool, &a);
    kvd_kv_pool_destroy(pool);
}

static void test_stats_and_block_states(void **state)
{
    (void)state;
    /* block_bytes = 2 layers * 2 * (2 heads * 4 slots * 8 dims * 2 bytes) = 512; 128 per token */
    kvd_kv_pool *pool = make_pool(small_config(4, 10, true));
    int32_t tokens[6];
    fill_tokens(tokens, 6, 70);
    kvd_block_table a, b;
    kvd_block_table_init(&a);
    kvd_block_table_init(&b);
    append_ok(pool, &a, 6);
    kvd_kv_stats s = stats_of(pool);
    assert_int_equal(s.blocks_total, 10);
    assert_int_equal(s.blocks_used, 2);
    assert_int_equal(s.blocks_cached, 0);
    assert_int_equal(s.blocks_free, 8);
    assert_int_equal(s.tokens_stored, 6);
    assert_int_equal(s.bytes_wasted, 2 * 128);
    assert_int_equal(s.pool_bytes, 5120);
    assert_int_equal(s.block_bytes, 512);

    assert_int_equal(kvd_block_table_fork(pool, &a, &b, NULL), 0);
    append_ok(pool, &b, 1);
    kvd_prefix_cache_commit(pool, &a, tokens, 6);
    CHECK(pool, &a, &b);
    s = stats_of(pool);
    assert_int_equal(s.blocks_used, 3);
    assert_int_equal(s.tokens_stored, 4 + 2 + 3);
    assert_int_equal(s.bytes_wasted, (12 - 9) * 128);
    assert_int_equal(s.cow_copies, 1);
    uint8_t states[10];
    int32_t refs[10];
    kvd_kv_block_states(pool, states, refs);
    uint8_t expected_states[10] = {3, 2, 2, 0, 0, 0, 0, 0, 0, 0};
    int32_t expected_refs[10] = {2, 1, 1, 0, 0, 0, 0, 0, 0, 0};
    assert_memory_equal(states, expected_states, sizeof states);
    assert_memory_equal(refs, expected_refs, sizeof refs);

    kvd_block_table_release(pool, &a);
    kvd_block_table_release(pool, &b);
    CHECK(pool, &a, &b);
    s = stats_of(pool);
    assert_int_equal(s.blocks_used, 0);
    assert_int_equal(s.blocks_cached, 1);
    assert_int_equal(s.blocks_free, 9);
    assert_int_equal(s.tokens_stored, 0);
    assert_int_equal(s.bytes_wasted, 0);
    kvd_kv_block_states(pool, states, NULL);
    assert_int_equal(states[0], 1);
    assert_int_equal(states[1], 0);
    assert_int_equal(states[2], 0);
    kvd_block_table_deinit(pool, &a);
    kvd_block_table_deinit(pool, &b);
    kvd_kv_pool_destroy(pool);
}

/* The checker itself must be able to fail. */
static void test_invariant_checker_reports_violations(void **state)
{
    (void)state;
    kvd_kv_pool *pool = make_pool(small_config(4, 8, true));
    kvd_block_table a, b;
    kvd_block_table_init(&a);
    kvd_block_table_init(&b);
    append_ok(pool, &a, 6);
    assert_int_equal(kvd_block_table_fork(pool, &a, &b, NULL), 0);
    kvd_error err = {0};
    assert_int_equal(kvd_kv_check_invariants(pool, TABLES(&a, &b), 2, &err), 0);

    /* A table left out: its references look leaked. */
    assert_int_equal(kvd_kv_check_invariants(pool, TABLES(&a), 1, &err), KVD_ESTATE);
    assert_non_null(strstr(err.msg, "count 2"));
    /* A table counted twice. */
    assert_int_equal(kvd_kv_check_invariants(pool, TABLES(&a, &b, &a), 3, &err), KVD_ESTATE);
    /* A table that claims a block it was never given. */
    kvd_block_table forged = a;
    int32_t forged_blocks[2] = {a.blocks[0], 5};
    forged.blocks = forged_blocks;
    assert_int_equal(kvd_kv_check_invariants(pool, TABLES(&forged, &b), 2, &err), KVD_ESTATE);
    assert_non_null(strstr(err.msg, "block"));
    /* A token count that does not match the blocks. */
    forged = a;
    forged.num_tokens = 9;
    assert_int_equal(kvd_kv_check_invariants(pool, TABLES(&forged, &b), 2, &err), KVD_ESTATE);
    kvd_block_table_deinit(pool, &a);
    kvd_block_table_deinit(pool, &b);
    kvd_kv_pool_destroy(pool);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_block_bytes_and_pool_sizing),
        cmocka_unit_test(test_slices_do_not_overlap),
        cmocka_unit_test(test_bad_configs_name_the_field),
        cmocka_unit_test(test_append_block_size_1),
        cmocka_unit_test(test_append_block_size_16),
        cmocka_unit_test(test_append_block_size_256),
        cmocka_unit_test(test_fork_and_copy_on_write),
        cmocka_unit_test(test_enospc_changes_nothing),
        cmocka_unit_test(test_capacity_queries),
        cmocka_unit_test(test_reserve_keeps_appends_allocation_free),
        cmocka_unit_test(test_sharing_four_samples),
        cmocka_unit_test(test_prefix_hit_and_miss),
        cmocka_unit_test(test_collisions_are_confirmed),
        cmocka_unit_test(test_duplicate_blocks_stay_private),
        cmocka_unit_test(test_commit_after_fork),
        cmocka_unit_test(test_lru_eviction_descendants_first),
        cmocka_unit_test(test_disabled_prefix_cache),
        cmocka_unit_test(test_stats_and_block_states),
        cmocka_unit_test(test_invariant_checker_reports_violations),
    };
    return cmocka_run_group_tests_name("kv", tests, NULL, NULL);
}
