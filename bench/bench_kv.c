/* bench_kv.c - KV cache manager benchmarks: waste, capacity, prefix sharing, cost per op.
 *
 * Everything runs through the real block pool (kvd_kv.h) without a model: a request is
 * a prompt appended at admission, then one token appended per step until its output
 * length, then a release, interleaved like a continuous batch. Waste and capacity are
 * exact counts from the pool's own accounting, compared with what contiguous
 * reservations of the same schedule would hold; costs are wall-clock nanoseconds per
 * operation. Seeded, so every figure is reproducible. Prints Markdown for
 * docs/benchmarks.md.
 *
 * Usage: bench_kv [seed]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvd/kvd_kv.h"

enum {
    NUM_REQUESTS = 2000,
    CONCURRENCY = 64,
    PROMPT_MIN = 16,
    PROMPT_MAX = 1024,
    OUTPUT_MIN = 16,
    OUTPUT_MAX = 512,
    MAX_POSITION = 32768, /* Qwen2.5-0.5B max_position_embeddings */
    SESSIONS = 32,
    SYSTEM_PROMPT = 1024,
};

/* Qwen2.5-0.5B: 2 (K, V) x 24 layers x 2 kv heads x 64 x 2 bytes = 12,288 bytes per token. */
static kvd_kv_config qwen_shape(int block_size)
{
    return (kvd_kv_config){.num_layers = 24, .num_kv_heads = 2, .head_dim = 64, .block_size = block_size,
                           .dtype = KVD_DTYPE_F16, .enable_prefix_cache = true};
}
#define QWEN_TOKEN_BYTES 12288.0

typedef struct request {
    int prompt;
    int output;
} request;

static uint64_t rng_state;

static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static int uniform(int lo, int hi)
{
    return lo + (int)(rng_next() % (uint64_t)(hi - lo + 1));
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static kvd_kv_pool *make_pool(kvd_kv_config cfg)
{
    kvd_error err = {0};
    kvd_kv_pool *pool = kvd_kv_pool_create(&cfg, &err);
    if (!pool) {
        fprintf(stderr, "bench_kv: %s\n", err.msg);
        exit(1);
    }
    return pool;
}

static void must(int rc, const char *what, const kvd_error *err)
{
    if (rc != 0) {
        fprintf(stderr, "bench_kv: %s: %s\n", what, err->msg);
        exit(1);
    }
}

/* ---- waste ------------------------------------------------------------------------ */

typedef struct waste_result {
    double paged_peak, paged_mean;   /* share of allocated bytes holding no token */
    double max_len_peak, reserve_peak;
    int64_t peak_blocks, peak_tokens;
    int steps;
} waste_result;

/* The continuous batch: CONCURRENCY slots, a slot admits the next request (prompt in
 * one append) as soon as it is free, every running request then gains one token per
 * step, and leaves when its output is complete. */
static waste_result simulate_waste(const request *reqs, int block_size)
{
    /* A small shape: waste is a ratio of token slots, the shape does not matter. */
    kvd_kv_config cfg = {.num_layers = 1, .num_kv_heads = 1, .head_dim = 16, .block_size = block_size,
                         .dtype = KVD_DTYPE_F32,
                         .num_blocks = (size_t)CONCURRENCY * ((PROMPT_MAX + OUTPUT_MAX) / block_size + 2)};
    kvd_kv_pool *pool = make_pool(cfg);
    kvd_block_table tables[CONCURRENCY];
    int slot_req[CONCURRENCY], generated[CONCURRENCY];
    for (int s = 0; s < CONCURRENCY; s++) {
        kvd_block_table_init(&tables[s]);
        slot_req[s] = -1;
    }
    waste_result r = {0};
    double waste_sum = 0, max_len_alloc_peak = 0, reserve_alloc_peak = 0;
    int next = 0, done = 0;
    kvd_error err = {0};
    while (done < NUM_REQUESTS) {
        for (int s = 0; s < CONCURRENCY && next < NUM_REQUESTS; s++) {
            if (slot_req[s] >= 0)
                continue;
            slot_req[s] = next++;
            generated[s] = 0;
            must(kvd_block_table_append(pool, &tables[s], reqs[slot_req[s]].prompt, &err), "prompt", &err);
        }
        int64_t reserve_tokens = 0, active = 0;
        for (int s = 0; s < CONCURRENCY; s++) {
            if (slot_req[s] < 0)
                continue;
            must(kvd_block_table_append(pool, &tables[s], 1, &err), "decode", &err);
            generated[s]++;
            active++;
            reserve_tokens += reqs[slot_req[s]].prompt + OUTPUT_MAX;
        }
        kvd_kv_stats st;
        kvd_kv_stats_get(pool, &st);
        double allocated = (double)st.blocks_used * block_size;
        double waste = 1.0 - (double)st.tokens_stored / allocated;
        waste_sum += waste;
        r.steps++;
        if (st.blocks_used > r.peak_blocks) {
            r.peak_blocks = st.blocks_used;
            r.peak_tokens = st.tokens_stored;
            r.paged_peak = waste;
        }
        double max_len_alloc = (double)active * MAX_POSITION;
        if (max_len_alloc > max_len_alloc_peak) {
            max_len_alloc_peak = max_len_alloc;
            r.max_len_peak = 1.0 - (double)st.tokens_stored / max_len_alloc;
        }
        if ((double)reserve_tokens > reserve_alloc_peak) {
            reserve_alloc_peak = (double)reserve_tokens;
            r.reserve_peak = 1.0 - (double)st.tokens_stored / (double)reserve_tokens;
        }
        for (int s = 0; s < CONCURRENCY; s++) {
            if (slot_req[s] >= 0 && generated[s] >= reqs[slot_req[s]].output) {
                kvd_block_table_release(pool, &tables[s]);
                slot_req[s] = -1;
                done++;
            }
        }
    }
    r.paged_mean = waste_sum / r.steps;
    for (int s = 0; s < CONCURRENCY; s++)
        kvd_block_table_deinit(pool, &tables[s]);
    kvd_kv_pool_destroy(pool);
    return r;
}

static void bench_waste(const request *reqs)
{
    static const int sizes[] = {1, 8, 16, 32, 64, 128, 256};
    printf("### Waste at the peak of a continuous batch\n\n");
    printf("%d requests, prompt uniform in %d..%d, output uniform in %d..%d, %d running at once;\n"
           "share of allocated KV bytes that hold no token, at the step with the most blocks allocated\n"
           "(and the mean over all steps). Contiguous schemes reserve per running request.\n\n",
           NUM_REQUESTS, PROMPT_MIN, PROMPT_MAX, OUTPUT_MIN, OUTPUT_MAX, CONCURRENCY);
    printf("| scheme | waste at peak | mean waste | peak allocation (tokens) |\n|---|---|---|---|\n");
    waste_result r16 = {0};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        waste_result r = simulate_waste(reqs, sizes[i]);
        if (sizes[i] == 16)
            r16 = r;
        printf("| paged, block %d | %.2f%% | %.2f%% | %lld |\n", sizes[i], 100 * r.paged_peak, 100 * r.paged_mean,
               (long long)r.peak_blocks * sizes[i]);
    }
    printf("| contiguous, prompt + max_tokens (%d) | %.1f%% | | |\n", OUTPUT_MAX, 100 * r16.reserve_peak);
    printf("| contiguous, max_position_embeddings (%d) | %.1f%% | | %lld |\n\n", MAX_POSITION,
           100 * r16.max_len_peak, (long long)CONCURRENCY * MAX_POSITION);
}

/* ---- capacity --------------------------------------------------------------------- */

static void bench_capacity(const request *reqs)
{
    kvd_kv_config cfg = qwen_shape(16);
    cfg.cache_bytes = (size_t)1 << 30;
    cfg.enable_prefix_cache = false;
    kvd_kv_pool *pool = make_pool(cfg);
    kvd_kv_stats st;
    kvd_kv_stats_get(pool, &st);
    static kvd_block_table tables[NUM_REQUESTS];
    int paged = 0;
    kvd_error err = {0};
    /* Each session at its full final length (prompt + whole output): the paged count is
     * the conservative one, a running batch is on average only half way through. */
    while (paged < NUM_REQUESTS) {
        kvd_block_table_init(&tables[paged]);
        if (kvd_block_table_append(pool, &tables[paged], reqs[paged].prompt + reqs[paged].output, &err) != 0)
            break;
        paged++;
    }
    double budget = (double)((size_t)1 << 30);
    int by_max_len = (int)(budget / (MAX_POSITION * QWEN_TOKEN_BYTES));
    static const int max_tokens[] = {OUTPUT_MAX, 2048, 4096};
    int by_reserve[3];
    for (int k = 0; k < 3; k++) {
        double used = 0;
        int n = 0;
        while (n < NUM_REQUESTS && used + (reqs[n].prompt + max_tokens[k]) * QWEN_TOKEN_BYTES <= budget)
            used += (reqs[n++].prompt + max_tokens[k]) * QWEN_TOKEN_BYTES;
        by_reserve[k] = n;
    }
    printf("### Capacity of a 1 GiB KV budget (Qwen2.5-0.5B shape, f16, 12,288 bytes/token)\n\n");
    printf("Sessions of the distribution above, each at its full final length; paged pool of %lld blocks of 16\n"
           "(%zu bytes each, %zu bytes in all).\n\n",
           (long long)st.blocks_total, st.block_bytes, st.pool_bytes);
    printf("| scheme | sessions at once | paged / scheme |\n|---|---|---|\n");
    printf("| paged blocks of 16 | %d | 1.0x |\n", paged);
    for (int k = 0; k < 3; k++)
        printf("| reserve prompt + max_tokens (%d) | %d | %.1fx |\n", max_tokens[k], by_reserve[k],
               (double)paged / by_reserve[k]);
    printf("| reserve max_position_embeddings (%d) | %d | %.1fx |\n\n", MAX_POSITION, by_max_len,
           (double)paged / by_max_len);
    for (int i = 0; i < paged + (paged < NUM_REQUESTS); i++)
        kvd_block_table_deinit(pool, &tables[i]);
    kvd_kv_pool_destroy(pool);
}

/* ---- prefix sharing --------------------------------------------------------------- */

static void run_sessions(int system_len, bool prefix_cache, int64_t *blocks_used, int64_t *ideal_blocks,
                         int64_t *hit_tokens)
{
    kvd_kv_config cfg = qwen_shape(16);
    cfg.num_blocks = 4096;
    cfg.enable_prefix_cache = prefix_cache;
    kvd_kv_pool *pool = make_pool(cfg);
    uint64_t saved = rng_state;
    rng_state = 42; /* the same sessions for every variant */
    int32_t system[SYSTEM_PROMPT];
    for (int i = 0; i < SYSTEM_PROMPT; i++) /* all of it, so shorter variants get the same sessions */
        system[i] = uniform(0, 151642);
    kvd_block_table tables[SESSIONS];
    int32_t *tokens[SESSIONS];
    int length[SESSIONS], output[SESSIONS];
    kvd_error err = {0};
    int64_t own_blocks = 0;
    for (int s = 0; s < SESSIONS; s++) {
        int user = uniform(16, 256);
        output[s] = uniform(OUTPUT_MIN, OUTPUT_MAX);
        tokens[s] = malloc(sizeof(int32_t) * (size_t)(system_len + user + output[s]));
        memcpy(tokens[s], system, sizeof(int32_t) * (size_t)system_len);
        for (int i = 0; i < user + output[s]; i++)
            tokens[s][system_len + i] = uniform(0, 151642);
        length[s] = system_len + user;
        own_blocks += (user + output[s] + 15) / 16;
        kvd_block_table_init(&tables[s]);
        int cached = kvd_prefix_cache_lookup(pool, &tables[s], tokens[s], length[s]);
        must(kvd_block_table_append(pool, &tables[s], length[s] - cached, &err), "prompt", &err);
        kvd_prefix_cache_commit(pool, &tables[s], tokens[s], length[s]);
    }
    for (int step = 0; step < OUTPUT_MAX; step++)
        for (int s = 0; s < SESSIONS; s++)
            if (step < output[s]) {
                must(kvd_block_table_append(pool, &tables[s], 1, &err), "decode", &err);
                length[s]++;
                kvd_prefix_cache_commit(pool, &tables[s], tokens[s], length[s]);
            }
    kvd_kv_stats st;
    kvd_kv_stats_get(pool, &st);
    *blocks_used = st.blocks_used;
    *ideal_blocks = (system_len + 15) / 16 + own_blocks;
    *hit_tokens = (int64_t)st.prefix_hit_tokens;
    for (int s = 0; s < SESSIONS; s++) {
        kvd_block_table_deinit(pool, &tables[s]);
        free(tokens[s]);
    }
    kvd_kv_pool_destroy(pool);
    rng_state = saved;
}

static void bench_prefix_sharing(void)
{
    printf("### Prefix sharing: %d chat sessions with a common system prompt\n\n", SESSIONS);
    printf("Each session: system prompt + user turn uniform in 16..256 + output uniform in %d..%d, all alive\n"
           "at full length. Ideal = one system prompt's blocks + each session's own blocks.\n\n",
           OUTPUT_MIN, OUTPUT_MAX);
    printf("| system prompt | prefix cache | blocks used | ideal | ratio | tokens from cache |\n"
           "|---|---|---|---|---|---|\n");
    static const int lens[] = {SYSTEM_PROMPT, 1000};
    for (int i = 0; i < 2; i++)
        for (int on = 1; on >= 0; on--) {
            int64_t used, ideal, hits;
            run_sessions(lens[i], on, &used, &ideal, &hits);
            printf("| %d tokens | %s | %lld | %lld | %.3fx | %lld |\n", lens[i], on ? "on" : "off", (long long)used,
                   (long long)ideal, (double)used / (double)ideal, (long long)hits);
        }
    printf("\n");
}

/* ---- cost ----------------------------------------------------------------------------- */

/* Best of REPEATS runs: the machine is shared, the minimum is the cost of the code. */
enum { REPEATS = 5 };
#define TIMED(best, body)                                                                    \
    do {                                                                                     \
        best = 1e300;                                                                        \
        for (int rep_ = 0; rep_ < REPEATS; rep_++) {                                         \
            double t0_ = now_ns();                                                           \
            body;                                                                            \
            double dt_ = now_ns() - t0_;                                                     \
            if (dt_ < best)                                                                  \
                best = dt_;                                                                  \
        }                                                                                    \
    } while (0)

static void report(const char *name, double ops, double ns)
{
    printf("| %s | %.1f | %.3g |\n", name, ns / ops, 1e9 * ops / ns);
}

static void check(int ok)
{
    if (!ok) {
        fprintf(stderr, "bench_kv: unexpected result in the cost loop\n");
        exit(1);
    }
}

static void bench_cost(void)
{
    printf("### Cost per operation (block size 16, Qwen2.5-0.5B shape, pool of 4096 blocks)\n\n");
    printf("Best of %d runs.\n\n| operation | ns per op | ops per second |\n|---|---|---|\n", REPEATS);
    kvd_kv_config cfg = qwen_shape(16);
    cfg.num_blocks = 4096;
    kvd_kv_pool *pool = make_pool(cfg);
    kvd_block_table t, f;
    kvd_block_table_init(&t);
    kvd_block_table_init(&f);
    kvd_error err = {0};
    must(kvd_block_table_reserve(pool, &t, 4096 * 16, &err), "reserve", &err);
    double ns;

    /* One block allocated (free list pop) and freed (push). */
    int iters = 1000000;
    TIMED(ns, for (int i = 0; i < iters; i++) {
        check(kvd_block_table_append(pool, &t, 16, NULL) == 0);
        kvd_block_table_release(pool, &t);
    });
    report("allocate + free one block (append 16 tokens, release)", iters, ns);

    /* Decode: one token at a time, a new block every 16th, the whole pool. */
    iters = 4096 * 16;
    TIMED(ns, {
        for (int i = 0; i < iters; i++)
            check(kvd_block_table_append(pool, &t, 1, NULL) == 0);
        kvd_block_table_release(pool, &t);
    });
    report("decode append of 1 token (amortized block allocation, incl. release)", iters, ns);

    /* Fork of a 1,024-token sequence (64 blocks) and its release. */
    must(kvd_block_table_append(pool, &t, 1024, &err), "append", &err);
    iters = 100000;
    TIMED(ns, for (int i = 0; i < iters; i++) {
        check(kvd_block_table_fork(pool, &t, &f, NULL) == 0);
        kvd_block_table_release(pool, &f);
    });
    report("fork + release, per block shared", (double)iters * 64, ns);
    kvd_block_table_release(pool, &t);

    /* Prefix cache: a cached 1,024-token prompt looked up (64 hashes of 16 ids, probes,
     * id comparisons, references) and released. */
    int32_t prompt[1025];
    for (int i = 0; i < 1025; i++)
        prompt[i] = uniform(0, 151642);
    must(kvd_block_table_append(pool, &t, 1024, &err), "append", &err);
    kvd_prefix_cache_commit(pool, &t, prompt, 1024);
    kvd_block_table_release(pool, &t);
    iters = 50000;
    TIMED(ns, for (int i = 0; i < iters; i++) {
        check(kvd_prefix_cache_lookup(pool, &t, prompt, 1025) == 1024);
        kvd_block_table_release(pool, &t);
    });
    report("prefix lookup hit + release, per block", (double)iters * 64, ns);
    iters = 1000000;
    prompt[0] ^= 1; /* first block misses: one hash, one probe */
    TIMED(ns, for (int i = 0; i < iters; i++) check(kvd_prefix_cache_lookup(pool, &t, prompt, 1025) == 0));
    report("prefix lookup miss (first block)", iters, ns);
    prompt[0] ^= 1;

    /* Commit of new content into a full pool: each block is hashed and inserted, and the
     * allocation evicts the least recently used cached block (map removal). */
    iters = 10000;
    int round = 0;
    TIMED(ns, for (int i = 0; i < iters; i++) {
        prompt[0] = ++round;
        check(kvd_block_table_append(pool, &t, 1024, NULL) == 0);
        kvd_prefix_cache_commit(pool, &t, prompt, 1024);
        kvd_block_table_release(pool, &t);
    });
    report("allocate (evicting when full) + commit + release, per block", (double)iters * 64, ns);
    kvd_kv_stats st;
    kvd_kv_stats_get(pool, &st);
    printf("\n(%llu evictions in the last row over all runs.)\n\n", (unsigned long long)st.evictions);
    kvd_block_table_deinit(pool, &t);
    kvd_block_table_deinit(pool, &f);
    kvd_kv_pool_destroy(pool);
}

int main(int argc, char **argv)
{
    uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 0) : 20261123;
    rng_state = seed;
    static request reqs[NUM_REQUESTS];
    for (int i = 0; i < NUM_REQUESTS; i++) {
        reqs[i].prompt = uniform(PROMPT_MIN, PROMPT_MAX);
        reqs[i].output = uniform(OUTPUT_MIN, OUTPUT_MAX);
    }
    printf("<!-- bench_kv seed %llu -->\n\n", (unsigned long long)seed);
    bench_waste(reqs);
    bench_capacity(reqs);
    bench_prefix_sharing();
    bench_cost();
    return 0;
}
