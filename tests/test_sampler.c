/* test_sampler.c - exact behaviour of the sampler on small hand-made logits.
 *
 * Each filter is checked by the set of tokens it can ever produce and the
 * distribution it produces over many seeded draws; penalties by the exact logits
 * they leave; the random stream by values computed independently (Python big
 * integers, in the comments) for splitmix64 seeding and xoshiro256**. Draw counts
 * are fixed and the seed too, so the statistical checks are deterministic; their
 * tolerance is stated next to each (about 5 standard deviations).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvd/kvd_sampler.h"
#include "../src/engine/sampler_vocab.h" /* the sparse chunk sums against the whole-row ones */

#define NDRAWS 200000

static kvd_sampling_params sampling(float temperature)
{
    kvd_sampling_params p = kvd_sampling_params_default();
    p.temperature = temperature;
    return p;
}

/* Samples n times from a fresh copy of logits each time; counts[v] per token. */
static void histogram(kvd_sampler *s, const kvd_sampling_params *p, const float *logits, int vocab,
                      int n, uint64_t seed, int *counts)
{
    float *row = malloc((size_t)vocab * sizeof *row);
    assert_non_null(row);
    kvd_rng rng;
    kvd_rng_seed(&rng, seed);
    memset(counts, 0, (size_t)vocab * sizeof *counts);
    for (int i = 0; i < n; i++) {
        memcpy(row, logits, (size_t)vocab * sizeof *row);
        kvd_sample_result r;
        assert_int_equal(kvd_sampler_sample(s, p, row, NULL, 0, NULL, 0, &rng, &r), 0);
        assert_in_range(r.token, 0, vocab - 1);
        counts[r.token]++;
    }
    free(row);
}

/* |observed share - expected| <= tol for each token. */
static void assert_shares(const int *counts, const double *expected, int vocab, int n, double tol)
{
    for (int v = 0; v < vocab; v++) {
        double share = (double)counts[v] / n;
        if (fabs(share - expected[v]) > tol)
            fail_msg("token %d: share %.5f, expected %.5f (tol %.4f)", v, share, expected[v], tol);
    }
}

static void test_rng_reference_values(void **state)
{
    (void)state;
    kvd_rng rng;
    kvd_rng_seed(&rng, 0);
    /* splitmix64 from 0: its well-known first outputs. */
    assert_true(rng.s[0] == 0xe220a8397b1dcdafull);
    assert_true(rng.s[1] == 0x6e789e6aa1b965f4ull);
    assert_true(rng.s[2] == 0x06c45d188009454full);
    assert_true(rng.s[3] == 0xf88bb8a8724c81ecull);
    /* xoshiro256** outputs >> 11, i.e. uniform * 2^53. */
    assert_true((uint64_t)(kvd_rng_uniform(&rng) * 0x1.0p53) == 0x133d8be6d96ebeull);
    assert_true((uint64_t)(kvd_rng_uniform(&rng) * 0x1.0p53) == 0x17edc3ef092ac8ull);
    assert_true((uint64_t)(kvd_rng_uniform(&rng) * 0x1.0p53) == 0x034bf093a9267cull);
    kvd_rng_seed(&rng, 42);
    assert_true(rng.s[0] == 0xbdd732262feb6e95ull);
    assert_true((uint64_t)(kvd_rng_uniform(&rng) * 0x1.0p53) == 0x2af0165c185d8ull);
    assert_true((uint64_t)(kvd_rng_uniform(&rng) * 0x1.0p53) == 0xc209b30cda227ull);
}

static void test_greedy_ties_lowest_and_rng_untouched(void **state)
{
    (void)state;
    kvd_sampler *s = kvd_sampler_create(6, 6);
    assert_non_null(s);
    float logits[6] = {1.0f, 3.0f, -2.0f, 3.0f, 2.5f, -INFINITY};
    kvd_sampling_params p = sampling(0.0f);
    kvd_rng rng, before;
    kvd_rng_seed(&rng, 7);
    before = rng;
    kvd_sample_result r;
    assert_int_equal(kvd_sampler_sample(s, &p, logits, NULL, 0, NULL, 0, &rng, &r), 0);
    assert_int_equal(r.token, 1);
    assert_memory_equal(&rng, &before, sizeof rng);
    assert_int_equal(r.num_top, 0);
    /* Greedy needs no rng at all. */
    assert_int_equal(kvd_sampler_sample(s, &p, logits, NULL, 0, NULL, 0, NULL, &r), 0);
    assert_int_equal(r.token, 1);
    /* NaN never wins. */
    float with_nan[6] = {NAN, 0.5f, NAN, 0.25f, 0.0f, -1.0f};
    assert_int_equal(kvd_sampler_sample(s, &p, with_nan, NULL, 0, NULL, 0, NULL, &r), 0);
    assert_int_equal(r.token, 1);
    kvd_sampler_destroy(s);
}

static void test_repetition_penalty_exact(void **state)
{
    (void)state;
    kvd_sampler *s = kvd_sampler_create(5, 5);
    float logits[5] = {2.0f, -1.0f, 1.5f, 0.0f, 1.75f};
    kvd_sampling_params p = sampling(0.0f);
    p.repetition_penalty = 2.0f;
    /* Token 0 twice in the prompt and once in the output: penalised once. */
    const int32_t prompt[] = {0, 0, 3};
    const int32_t output[] = {1, 0, 4};
    kvd_sample_result r;
    assert_int_equal(kvd_sampler_sample(s, &p, logits, prompt, 3, output, 3, NULL, &r), 0);
    const float expect[5] = {1.0f, -2.0f, 1.5f, 0.0f, 0.875f};
    for (int i = 0; i < 5; i++)
        assert_float_equal(logits[i], expect[i], 0.0f);
    assert_int_equal(r.token, 2);
    /* The dedup marks were cleared: a second call penalises again exactly once. */
    float again[5] = {2.0f, -1.0f, 1.5f, 0.0f, 1.75f};
    assert_int_equal(kvd_sampler_sample(s, &p, again, prompt, 3, output, 3, NULL, &r), 0);
    for (int i = 0; i < 5; i++)
        assert_float_equal(again[i], expect[i], 0.0f);
    kvd_sampler_destroy(s);
}

static void test_presence_frequency_exact(void **state)
{
    (void)state;
    kvd_sampler *s = kvd_sampler_create(4, 4);
    float logits[4] = {3.0f, 1.0f, 2.5f, 2.0f};
    kvd_sampling_params p = sampling(0.0f);
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 0.25f;
    const int32_t prompt[] = {3, 3, 3}; /* prompt tokens are not penalised by these */
    const int32_t output[] = {0, 2, 0};
    kvd_sample_result r;
    assert_int_equal(kvd_sampler_sample(s, &p, logits, prompt, 3, output, 3, NULL, &r), 0);
    assert_float_equal(logits[0], 3.0f - 0.5f - 0.5f, 0.0f);
    assert_float_equal(logits[1], 1.0f, 0.0f);
    assert_float_equal(logits[2], 2.5f - 0.5f - 0.25f, 0.0f);
    assert_float_equal(logits[3], 2.0f, 0.0f);
    assert_int_equal(r.token, 0); /* 2.0 ties with token 3's 2.0: lowest id */
    /* Counts were reset: the same call gives the same logits again. */
    float again[4] = {3.0f, 1.0f, 2.5f, 2.0f};
    assert_int_equal(kvd_sampler_sample(s, &p, again, prompt, 3, output, 3, NULL, &r), 0);
    assert_float_equal(again[0], 2.0f, 0.0f);
    assert_float_equal(again[2], 1.75f, 0.0f);
    kvd_sampler_destroy(s);
}

static void test_temperature_distribution(void **state)
{
    (void)state;
    kvd_sampler *s = kvd_sampler_create(4, 4);
    const float logits[4] = {logf(0.5f), logf(0.25f), logf(0.125f), logf(0.125f)};
    int counts[4];
    kvd_sampling_params p = sampling(1.0f);
    histogram(s, &p, logits, 4, NDRAWS, 1, counts);
    /* sd of a share <= sqrt(0.25 / 200000) = 0.0011; tolerance 0.0055 ~ 5 sd. */
    const double t1[4] = {0.5, 0.25, 0.125, 0.125};
    assert_shares(counts, t1, 4, NDRAWS, 0.0055);
    /* T = 2 takes the square root of the probabilities. */
    p.temperature = 2.0f;
    histogram(s, &p, logits, 4, NDRAWS, 2, counts);
    double z = sqrt(0.5) + sqrt(0.25) + 2 * sqrt(0.125);
    const double t2[4] = {sqrt(0.5) / z, sqrt(0.25) / z, sqrt(0.125) / z, sqrt(0.125) / z};
    assert_shares(counts, t2, 4, NDRAWS, 0.0055);
    /* T = 0.5 squares them. */
    p.temperature = 0.5f;
    histogram(s, &p, logits, 4, NDRAWS, 3, counts);
    z = 0.25 + 0.0625 + 2 * 0.015625;
    const double t05[4] = {0.25 / z, 0.0625 / z, 0.015625 / z, 0.015625 / z};
    assert_shares(counts, t05, 4, NDRAWS, 0.0055);
    kvd_sampler_destroy(s);
}

static void test_top_k(void **state)
{
    (void)state;
    kvd_sampler *s = kvd_sampler_create(6, 6);
    /* Tokens 1 and 4 tie for second place: top_k = 2 keeps 0 and the lower id, 1. */
    const float logits[6] = {logf(0.4f), logf(0.2f), logf(0.1f), logf(0.05f), logf(0.2f), logf(0.05f)};
    int counts[6];
    kvd_sampling_params p = sampling(1.0f);
    p.top_k = 2;
    histogram(s, &p, logits, 6, NDRAWS, 11, counts);
    const double expect[6] = {2.0 / 3.0, 1.0 / 3.0, 0, 0, 0, 0};
    assert_shares(counts, expect, 6, NDRAWS, 0.0055);
    assert_int_equal(counts[4], 0);
    /* top_k = 1 is greedy whatever the temperature. */
    p.top_k = 1;
    p.temperature = 5.0f;
    histogram(s, &p, logits, 6, 2000, 12, counts);
    assert_int_equal(counts[0], 2000);
    /* top_k >= vocab is off. */
    p.top_k = 100;
    p.temperature = 1.0f;
    histogram(s, &p, logits, 6, NDRAWS, 13, counts);
    const double all[6] = {0.4, 0.2, 0.1, 0.05, 0.2, 0.05};
    assert_shares(counts, all, 6, NDRAWS, 0.0055);
    kvd_sampler_destroy(s);
}

static void test_top_p(void **state)
{
    (void)state;
    kvd_sampler *s = kvd_sampler_create(5, 5);
    const float logits[5] = {logf(0.05f), logf(0.5f), logf(0.3f), logf(0.1f), logf(0.05f)};
    int counts[5];
    kvd_sampling_params p = sampling(1.0f);
    /* Best first: 1 (0.5), 2 (0.8 cumulative) reaches 0.75. */
    p.top_p = 0.75f;
    histogram(s, &p, logits, 5, NDRAWS, 21, counts);
    const double two[5] = {0, 0.5 / 0.8, 0.3 / 0.8, 0, 0};
    assert_shares(counts, two, 5, NDRAWS, 0.0055);
    /* Below the first token's mass: only the first survives. */
    p.top_p = 0.3f;
    histogram(s, &p, logits, 5, 5000, 22, counts);
    assert_int_equal(counts[1], 5000);
    /* 0.85 needs the third (0.9); the 0.05 ties stay out. */
    p.top_p = 0.85f;
    histogram(s, &p, logits, 5, NDRAWS, 23, counts);
    const double three[5] = {0, 0.5 / 0.9, 0.3 / 0.9, 0.1 / 0.9, 0};
    assert_shares(counts, three, 5, NDRAWS, 0.0055);
    /* With top_k the nucleus is taken over the renormalised top k: {1, 2} has
     * 0.625 + 0.375; top_p 0.6 keeps only token 1. */
    p.top_k = 2;
    p.top_p = 0.6f;
    histogram(s, &p, logits, 5, 5000, 24, counts);
    assert_int_equal(counts[1], 5000);
    kvd_sampler_destroy(s);
}

static void test_min_p(void **state)
{
    (void)state;
    kvd_sampler *s = kvd_sampler_create(5, 5);
    const float logits[5] = {logf(0.4f), logf(0.3f), logf(0.15f), logf(0.1f), logf(0.05f)};
    int counts[5];
    kvd_sampling_params p = sampling(1.0f);
    /* Floor 0.3 * 0.4 = 0.12: tokens 0, 1, 2 survive. */
    p.min_p = 0.3f;
    histogram(s, &p, logits, 5, NDRAWS, 31, counts);
    const double expect[5] = {0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0};
    assert_shares(counts, expect, 5, NDRAWS, 0.0055);
    /* The same with a sorting filter in front (top_k 4 drops token 4 first). */
    p.top_k = 4;
    histogram(s, &p, logits, 5, NDRAWS, 32, counts);
    assert_shares(counts, expect, 5, NDRAWS, 0.0055);
    kvd_sampler_destroy(s);
}

static void test_masked_tokens_never_drawn(void **state)
{
    (void)state;
    kvd_sampler *s = kvd_sampler_create(4, 4);
    const float logits[4] = {-INFINITY, 0.0f, -INFINITY, 0.0f};
    int counts[4];
    kvd_sampling_params p = sampling(1.5f);
    histogram(s, &p, logits, 4, 20000, 41, counts);
    assert_int_equal(counts[0], 0);
    assert_int_equal(counts[2], 0);
    assert_int_equal(counts[1] + counts[3], 20000);
    kvd_sampler_destroy(s);
}

static void test_seed_reproducibility(void **state)
{
    (void)state;
    enum { V = 1000, N = 200 };
    kvd_sampler *s = kvd_sampler_create(V, V);
    float *base = malloc(V * sizeof *base);
    float *row = malloc(V * sizeof *row);
    kvd_rng grng;
    kvd_rng_seed(&grng, 99);
    for (int i = 0; i < V; i++)
        base[i] = (float)(kvd_rng_uniform(&grng) * 8.0);
    kvd_sampling_params p = sampling(0.9f);
    p.top_k = 50;
    p.top_p = 0.95f;
    int32_t a[N], b[N], c[N];
    for (int run = 0; run < 3; run++) {
        int32_t *out = run == 0 ? a : run == 1 ? b : c;
        kvd_rng rng;
        kvd_rng_seed(&rng, run == 2 ? 1235 : 1234);
        for (int i = 0; i < N; i++) {
            memcpy(row, base, V * sizeof *row);
            kvd_sample_result r;
            assert_int_equal(kvd_sampler_sample(s, &p, row, NULL, 0, out, i, &rng, &r), 0);
            out[i] = r.token;
        }
    }
    assert_memory_equal(a, b, sizeof a);
    int same = 0;
    for (int i = 0; i < N; i++)
        same += a[i] == c[i];
    assert_true(same < N / 2);
    free(base);
    free(row);
    kvd_sampler_destroy(s);
}

static double raw_logsumexp(const float *x, int n)
{
    double m = -INFINITY, sum = 0.0;
    for (int i = 0; i < n; i++)
        m = x[i] > m ? x[i] : m;
    for (int i = 0; i < n; i++)
        sum += exp((double)x[i] - m);
    return m + log(sum);
}

static void test_logprobs_from_raw_logits(void **state)
{
    (void)state;
    kvd_sampler *s = kvd_sampler_create(6, 6);
    const float base[6] = {1.0f, 4.0f, 2.0f, 4.0f, -3.0f, 0.5f};
    float logits[6];
    memcpy(logits, base, sizeof logits);
    kvd_sampling_params p = sampling(0.0f);
    p.logprobs = 3;
    p.repetition_penalty = 1.5f; /* changes the choice, never the reported logprobs */
    const int32_t output[] = {1};
    kvd_sample_result r;
    assert_int_equal(kvd_sampler_sample(s, &p, logits, NULL, 0, output, 1, NULL, &r), 0);
    assert_int_equal(r.token, 3);
    double lse = raw_logsumexp(base, 6);
    assert_float_equal(r.logprob, 4.0 - lse, 1e-5);
    assert_int_equal(r.num_top, 3);
    assert_int_equal(r.top_tokens[0], 1);
    assert_int_equal(r.top_tokens[1], 3);
    assert_int_equal(r.top_tokens[2], 2);
    assert_float_equal(r.top_logprobs[0], 4.0 - lse, 1e-5);
    assert_float_equal(r.top_logprobs[1], 4.0 - lse, 1e-5);
    assert_float_equal(r.top_logprobs[2], 2.0 - lse, 1e-5);
    /* logprobs = 0: the chosen token's logprob without alternatives. */
    memcpy(logits, base, sizeof logits);
    p.logprobs = 0;
    p.repetition_penalty = 1.0f;
    assert_int_equal(kvd_sampler_sample(s, &p, logits, NULL, 0, NULL, 0, NULL, &r), 0);
    assert_int_equal(r.token, 1);
    assert_int_equal(r.num_top, 0);
    assert_float_equal(r.logprob, 4.0 - lse, 1e-5);
    kvd_sampler_destroy(s);
}

/* Full-size vocabulary: the partial selections agree with a full sort. */
typedef struct ranked {
    float v;
    int32_t id;
} ranked;

static int ranked_cmp(const void *a, const void *b)
{
    const ranked *x = a, *y = b;
    if (x->v != y->v)
        return x->v > y->v ? -1 : 1;
    return x->id < y->id ? -1 : 1;
}

static void test_full_vocab_filters_match_full_sort(void **state)
{
    (void)state;
    enum { V = 151936, DRAWS = 300 };
    kvd_sampler *s = kvd_sampler_create(V, V);
    float *base = malloc(V * sizeof *base);
    float *row = malloc(V * sizeof *row);
    ranked *order = malloc(V * sizeof *order);
    uint8_t *allowed = calloc(V, 1);
    kvd_rng grng;
    kvd_rng_seed(&grng, 5);
    /* A peaked row: a few hundred plausible tokens over a long tail. */
    for (int i = 0; i < V; i++) {
        double u = kvd_rng_uniform(&grng);
        base[i] = (float)(u < 0.002 ? 6.0 + 4.0 * kvd_rng_uniform(&grng) : 8.0 * u - 4.0);
        order[i] = (ranked){base[i], i};
    }
    qsort(order, V, sizeof *order, ranked_cmp);

    /* top_k 40: exactly the 40 best are reachable. */
    kvd_sampling_params p = sampling(1.0f);
    p.top_k = 40;
    for (int j = 0; j < 40; j++)
        allowed[order[j].id] = 1;
    kvd_rng rng;
    kvd_rng_seed(&rng, 8);
    int distinct_hits = 0;
    for (int i = 0; i < DRAWS; i++) {
        memcpy(row, base, V * sizeof *row);
        kvd_sample_result r;
        assert_int_equal(kvd_sampler_sample(s, &p, row, NULL, 0, NULL, 0, &rng, &r), 0);
        if (!allowed[r.token])
            fail_msg("top_k 40 drew token %d outside the 40 best", r.token);
        if (allowed[r.token] == 1) {
            allowed[r.token] = 2;
            distinct_hits++;
        }
    }
    assert_true(distinct_hits > 10);
    memset(allowed, 0, V);

    /* top_p 0.9 alone: the nucleus from a double-precision full sort. */
    double z = 0.0, m = order[0].v;
    for (int i = 0; i < V; i++)
        z += exp((double)base[i] - m);
    double cum = 0.0;
    int nucleus = 0;
    while (cum < 0.9 * z)
        cum += exp((double)order[nucleus++].v - m);
    assert_true(nucleus > 256); /* the search had to widen past its first slice */
    for (int j = 0; j < nucleus; j++)
        allowed[order[j].id] = 1;
    p = sampling(1.0f);
    p.top_p = 0.9f;
    for (int i = 0; i < DRAWS; i++) {
        memcpy(row, base, V * sizeof *row);
        kvd_sample_result r;
        assert_int_equal(kvd_sampler_sample(s, &p, row, NULL, 0, NULL, 0, &rng, &r), 0);
        if (!allowed[r.token])
            fail_msg("top_p 0.9 drew token %d outside the %d-token nucleus", r.token, nucleus);
    }

    /* A large top_k (the selection path, not the heap): exactly the 5000 best. */
    memset(allowed, 0, V);
    for (int j = 0; j < 5000; j++)
        allowed[order[j].id] = 1;
    p = sampling(1.0f);
    p.top_k = 5000;
    for (int i = 0; i < DRAWS; i++) {
        memcpy(row, base, V * sizeof *row);
        kvd_sample_result r;
        assert_int_equal(kvd_sampler_sample(s, &p, row, NULL, 0, NULL, 0, &rng, &r), 0);
        if (!allowed[r.token])
            fail_msg("top_k 5000 drew token %d outside the 5000 best", r.token);
    }

    /* A flat row: the nucleus is the lowest 99% of ids (ties to the lower id). */
    for (int i = 0; i < V; i++)
        base[i] = 0.25f;
    p = sampling(1.0f);
    p.top_p = 0.99f;
    int limit = (int)ceil(0.99 * V);
    int max_seen = 0;
    for (int i = 0; i < DRAWS; i++) {
        memcpy(row, base, V * sizeof *row);
        kvd_sample_result r;
        assert_int_equal(kvd_sampler_sample(s, &p, row, NULL, 0, NULL, 0, &rng, &r), 0);
        assert_true(r.token <= limit + 2);
        max_seen = r.token > max_seen ? r.token : max_seen;
    }
    assert_true(max_seen > V / 2);
    /* Ties at a large top_k cut also go to the lowest ids. */
    p = sampling(1.0f);
    p.top_k = 2000;
    max_seen = 0;
    for (int i = 0; i < DRAWS; i++) {
        memcpy(row, base, V * sizeof *row);
        kvd_sample_result r;
        assert_int_equal(kvd_sampler_sample(s, &p, row, NULL, 0, NULL, 0, &rng, &r), 0);
        assert_in_range(r.token, 0, 1999);
        max_seen = r.token > max_seen ? r.token : max_seen;
    }
    assert_true(max_seen > 1000);
    free(base);
    free(row);
    free(order);
    free(allowed);
    kvd_sampler_destroy(s);
}

/* A sampler with the native whole-row passes and one with the portable ones. */
static void sampler_pair(int V, kvd_sampler **native, kvd_sampler **portable)
{
    *native = kvd_sampler_create(V, V);
    setenv("KVD_ISA", "scalar", 1);
    *portable = kvd_sampler_create(V, V);
    unsetenv("KVD_ISA");
}

/* The AVX-512 and portable whole-row passes give the same samples bit for bit
 * (KVD_ISA=scalar at creation picks the portable ones). */
static void test_isa_bodies_agree(void **state)
{
    (void)state;
    enum { V = 151936, DRAWS = 40 };
    kvd_sampler *native, *portable;
    sampler_pair(V, &native, &portable);
    float *base = malloc(V * sizeof *base), *a = malloc(V * sizeof *a), *b = malloc(V * sizeof *b);
    kvd_rng grng;
    kvd_rng_seed(&grng, 77);
    for (int i = 0; i < V; i++)
        base[i] = (float)(kvd_rng_uniform(&grng) * 16.0 - 8.0);
    kvd_sampling_params cfgs[5];
    for (int c = 0; c < 5; c++) {
        cfgs[c] = sampling(0.8f);
        cfgs[c].logprobs = 5;
    }
    cfgs[1].top_p = 0.7f;
    cfgs[2].min_p = 0.05f;
    cfgs[3].top_k = 3000;
    cfgs[4].temperature = 0.0f;
    for (int c = 0; c < 5; c++) {
        kvd_rng ra, rb;
        kvd_rng_seed(&ra, 100 + c);
        kvd_rng_seed(&rb, 100 + c);
        for (int i = 0; i < DRAWS; i++) {
            memcpy(a, base, V * sizeof *a);
            memcpy(b, base, V * sizeof *b);
            kvd_sample_result x, y;
            assert_int_equal(kvd_sampler_sample(native, &cfgs[c], a, NULL, 0, NULL, 0, &ra, &x), 0);
            assert_int_equal(kvd_sampler_sample(portable, &cfgs[c], b, NULL, 0, NULL, 0, &rb, &y), 0);
            assert_int_equal(x.token, y.token);
            assert_memory_equal(&x.logprob, &y.logprob, sizeof x.logprob);
            assert_memory_equal(x.top_tokens, y.top_tokens, sizeof x.top_tokens[0] * 5);
        }
    }
    free(base);
    free(a);
    free(b);
    kvd_sampler_destroy(native);
    kvd_sampler_destroy(portable);
}

/* Greedy with top logprobs on an untouched row takes the first listed id: the same
 * token as greedy without logprobs (argmax, lowest id on ties, NaN skipped, padding ids
 * never), on rows of ties, -inf, NaN, signed zeros and a best value in the padding. */
static void test_greedy_logprobs_token_is_argmax(void **state)
{
    (void)state;
    enum { V = 1000, PRINTABLE = 997, ROWS = 400 };
    kvd_sampler *s = kvd_sampler_create(V, PRINTABLE);
    assert_non_null(s);
    float *base = malloc(V * sizeof *base), *a = malloc(V * sizeof *a), *b = malloc(V * sizeof *b);
    kvd_rng grng;
    kvd_rng_seed(&grng, 4242);
    for (int r = 0; r < ROWS; r++) {
        const int kind = r % 6;
        for (int i = 0; i < V; i++) {
            double u = kvd_rng_uniform(&grng);
            /* few distinct values, so ties for the best are common */
            base[i] = kind == 0 ? (float)(u * 8.0 - 4.0) : (float)(int)(u * 5.0) - 2.0f;
            if (kind == 2 && u < 0.3)
                base[i] = NAN;
            if (kind == 3)
                base[i] = u < 0.5 ? -INFINITY : NAN;
            if (kind == 4)
                base[i] = u < 0.5 ? 0.0f : -0.0f;
        }
        if (kind == 5)
            base[PRINTABLE + r % (V - PRINTABLE)] = 100.0f; /* best in the padding */
        if (r == 11)
            for (int i = 0; i < V; i++)
                base[i] = NAN;
        for (int lp = 1; lp <= 20; lp += 19) {
            kvd_sampling_params with = sampling(0.0f), without = sampling(0.0f);
            with.logprobs = lp;
            memcpy(a, base, V * sizeof *a);
            memcpy(b, base, V * sizeof *b);
            kvd_sample_result x, y;
            assert_int_equal(kvd_sampler_sample(s, &with, a, NULL, 0, NULL, 0, NULL, &x), 0);
            assert_int_equal(kvd_sampler_sample(s, &without, b, NULL, 0, NULL, 0, NULL, &y), 0);
            if (x.token != y.token)
                fail_msg("row %d (kind %d), logprobs %d: token %d, argmax %d", r, kind, lp, x.token, y.token);
            assert_in_range(x.token, 0, PRINTABLE - 1);
        }
    }
    free(base);
    free(a);
    free(b);
    kvd_sampler_destroy(s);
}

/* A sample kvd_sampler_rewrites says does not write leaves the row bit for bit as it
 * was, on every path (greedy, logprobs, small and large top_k, top_p, min_p, NaN and
 * -inf in the row, both bodies); one it says writes (bias, min_tokens, penalties, a
 * mask) does change it here. */
static void test_rewrites_predicate(void **state)
{
    (void)state;
    enum { V = 4099 };
    kvd_sampler *native, *portable;
    sampler_pair(V, &native, &portable);
    float *base = malloc(V * sizeof *base), *row = malloc(V * sizeof *row);
    uint32_t allowed[(V + 31) / 32];
    memset(allowed, 0x55, sizeof allowed);
    static const kvd_logit_bias bias[1] = {{3, 1.5f}};
    static const int32_t stop_ids[1] = {7};
    const int32_t history[4] = {1, 2, 3, 7};
    kvd_rng grng;
    kvd_rng_seed(&grng, 90);
    for (int i = 0; i < V; i++)
        base[i] = (float)(kvd_rng_uniform(&grng) * 10.0 - 5.0);
    base[11] = NAN;
    base[12] = -INFINITY;
    kvd_sampling_params reads[7], writes[5];
    for (int c = 0; c < 7; c++)
        reads[c] = sampling(c == 0 ? 0.0f : 0.9f);
    reads[0].logprobs = 20;
    reads[1].top_k = 40;
    reads[1].logprobs = 3;
    reads[2].top_k = 2000;
    reads[3].top_p = 0.7f;
    reads[4].min_p = 0.1f;
    reads[5].min_tokens = 2; /* no stop ids to mask: nothing to write */
    reads[6].logprobs = 0;
    for (int c = 0; c < 5; c++)
        writes[c] = sampling(0.9f);
    writes[0].logit_bias = bias;
    writes[0].num_logit_bias = 1;
    writes[1].min_tokens = 8;
    writes[1].min_tokens_stop_ids = stop_ids;
    writes[1].num_min_tokens_stop_ids = 1;
    writes[2].repetition_penalty = 1.3f;
    writes[3].presence_penalty = 0.5f;
    writes[4].allowed = allowed;
    for (int isa = 0; isa < 2; isa++) {
        kvd_sampler *s = isa ? portable : native;
        kvd_rng rng;
        kvd_rng_seed(&rng, 5);
        kvd_sample_result r;
        for (int c = 0; c < 7; c++) {
            assert_false(kvd_sampler_rewrites(&reads[c], 2));
            memcpy(row, base, V * sizeof *row);
            assert_int_equal(kvd_sampler_sample(s, &reads[c], row, history, 2, history + 2, 2, &rng, &r), 0);
            assert_memory_equal(row, base, V * sizeof *row);
        }
        for (int c = 0; c < 5; c++) {
            assert_true(kvd_sampler_rewrites(&writes[c], 2));
            memcpy(row, base, V * sizeof *row);
            assert_int_equal(kvd_sampler_sample(s, &writes[c], row, history, 2, history + 2, 2, &rng, &r), 0);
            assert_true(memcmp(row, base, V * sizeof *row) != 0);
        }
        assert_false(kvd_sampler_rewrites(&writes[1], 8)); /* min_tokens reached */
    }
    free(base);
    free(row);
    kvd_sampler_destroy(native);
    kvd_sampler_destroy(portable);
}

/* The structured-output mask (allowed) equals writing -inf over the cleared ids by
 * hand, on both row bodies: a vocabulary whose length is no multiple of 16 or 32,
 * random words beside all-clear and all-set ones; a masked id is never drawn. */
static void test_allowed_mask_matches_manual_mask(void **state)
{
    (void)state;
    enum { V = 151936 - 7, DRAWS = 12 };
    kvd_sampler *native, *portable;
    sampler_pair(V, &native, &portable);
    float *base = malloc(V * sizeof *base), *a = malloc(V * sizeof *a), *b = malloc(V * sizeof *b);
    uint32_t *allowed = calloc((V + 31) / 32, sizeof *allowed);
    kvd_rng grng;
    kvd_rng_seed(&grng, 78);
    for (int i = 0; i < V; i++)
        base[i] = (float)(kvd_rng_uniform(&grng) * 16.0 - 8.0);
    for (int w = 0; w < (V + 31) / 32; w++) {
        double u = kvd_rng_uniform(&grng);
        allowed[w] = u < 0.4 ? 0u : u < 0.6 ? UINT32_MAX : (uint32_t)(kvd_rng_uniform(&grng) * 4294967295.0);
    }
    const float temps[2] = {0.9f, 0.0f};
    for (int c = 0; c < 4; c++) {
        kvd_sampler *s = c % 2 ? portable : native;
        kvd_sampling_params masked = sampling(temps[c / 2]), manual = masked;
        masked.allowed = allowed;
        kvd_rng ra, rb;
        kvd_rng_seed(&ra, 200 + c);
        kvd_rng_seed(&rb, 200 + c);
        for (int i = 0; i < DRAWS; i++) {
            memcpy(a, base, V * sizeof *a);
            for (int k = 0; k < V; k++)
                b[k] = (allowed[k >> 5] >> (k & 31)) & 1 ? base[k] : -INFINITY;
            kvd_sample_result x, y;
            assert_int_equal(kvd_sampler_sample(s, &masked, a, NULL, 0, NULL, 0, &ra, &x), 0);
            assert_int_equal(kvd_sampler_sample(s, &manual, b, NULL, 0, NULL, 0, &rb, &y), 0);
            assert_int_equal(x.token, y.token);
            assert_true((allowed[x.token >> 5] >> (x.token & 31)) & 1);
        }
    }
    free(base);
    free(a);
    free(b);
    free(allowed);
    kvd_sampler_destroy(native);
    kvd_sampler_destroy(portable);
}

/* A narrow mask takes the allowed ids alone: the same tokens as the whole masked row,
 * bit for bit, on both bodies, with repetition and presence penalties, with a filter
 * (which goes the whole-row way), with one allowed id, with allowed ids only in the
 * row's ragged last chunk, and with every allowed logit -inf (the whole-row fallback). */
static void test_narrow_mask_matches_manual_mask(void **state)
{
    (void)state;
    enum { V = 151936 - 7, DRAWS = 30, WORDS = (V + 31) / 32 };
    kvd_sampler *native, *portable;
    sampler_pair(V, &native, &portable);
    float *base = malloc(V * sizeof *base), *a = malloc(V * sizeof *a), *b = malloc(V * sizeof *b);
    uint32_t *allowed = calloc(WORDS, sizeof *allowed);
    kvd_rng grng;
    kvd_rng_seed(&grng, 79);
    for (int i = 0; i < V; i++)
        base[i] = (float)(kvd_rng_uniform(&grng) * 6.0 - 3.0);
    const int32_t output[4] = {5, 17, 17, 150001};
    for (int shape = 0; shape < 5; shape++) {
        memset(allowed, 0, WORDS * sizeof *allowed);
        if (shape == 0 || shape == 4) /* 300 ids spread over the row, a few repeated from output */
            for (int i = 0; i < 300; i++) {
                int id = (int)(kvd_rng_uniform(&grng) * V);
                allowed[id >> 5] |= 1u << (id & 31);
            }
        if (shape == 0)
            allowed[17 >> 5] |= 1u << (17 & 31);
        if (shape == 1)
            allowed[9000 >> 5] |= 1u << (9000 & 31);
        if (shape == 2) /* the last chunk: ids 151808.. of which 151920.. are past its 16-lane blocks */
            for (int id = 151900; id < V; id += 3)
                allowed[id >> 5] |= 1u << (id & 31);
        if (shape == 3) /* a 2,000-id run: many chunks, every lane */
            for (int id = 40000; id < 42000; id++)
                allowed[id >> 5] |= 1u << (id & 31);
        for (int c = 0; c < 8; c++) {
            kvd_sampler *s = c % 2 ? portable : native;
            kvd_sampling_params masked = sampling(c / 2 == 1 ? 0.0f : 0.7f);
            if (c / 2 == 2) {
                masked.repetition_penalty = 1.3f;
                masked.presence_penalty = 0.5f;
            }
            if (c / 2 == 3)
                masked.top_p = 0.8f;
            kvd_sampling_params manual = masked;
            masked.allowed = allowed;
            kvd_rng ra, rb;
            kvd_rng_seed(&ra, 300 + c);
            kvd_rng_seed(&rb, 300 + c);
            for (int i = 0; i < DRAWS; i++) {
                memcpy(a, base, V * sizeof *a);
                for (int k = 0; k < V; k++)
                    b[k] = (allowed[k >> 5] >> (k & 31)) & 1 && shape != 4 ? base[k] : -INFINITY;
                if (shape == 4) /* all allowed -inf */
                    for (int k = 0; k < V; k++)
                        a[k] = (allowed[k >> 5] >> (k & 31)) & 1 ? -INFINITY : base[k];
                kvd_sample_result x, y;
                assert_int_equal(kvd_sampler_sample(s, &masked, a, NULL, 0, output, 4, &ra, &x), 0);
                assert_int_equal(kvd_sampler_sample(s, &manual, b, NULL, 0, output, 4, &rb, &y), 0);
                assert_int_equal(x.token, y.token);
                if (shape != 4)
                    assert_true((allowed[x.token >> 5] >> (x.token & 31)) & 1);
            }
        }
    }
    free(base);
    free(a);
    free(b);
    free(allowed);
    kvd_sampler_destroy(native);
    kvd_sampler_destroy(portable);
}

/* The sparse chunk sums equal the whole-row ones bit for bit on both bodies, over a
 * row with a ragged last chunk (the narrow-mask draw relies on it). */
static void test_sparse_chunk_sums_exact(void **state)
{
    (void)state;
    enum { N = 151936 - 7, CHUNKS = (N + KVD_VOCAB_CHUNK - 1) / KVD_VOCAB_CHUNK };
    float *w = calloc(N, sizeof *w), *vals = malloc(N * sizeof *vals);
    int32_t *ids = malloc(N * sizeof *ids);
    float dense[CHUNKS], sparse[CHUNKS];
    kvd_rng grng;
    kvd_rng_seed(&grng, 80);
    for (int density = 0; density < 3; density++) {
        memset(w, 0, N * sizeof *w);
        int k = 0;
        for (int i = 0; i < N; i++) {
            double u = kvd_rng_uniform(&grng);
            if (u < (density == 0 ? 0.002 : density == 1 ? 0.05 : 0.5) || i >= N - 20) {
                w[i] = kvd_vocab_exp1((float)(kvd_rng_uniform(&grng) * 40.0 - 30.0));
                ids[k] = i;
                vals[k++] = w[i];
            }
        }
        for (int isa = 0; isa < 2; isa++) {
            kvd_vocab_chunk_sums(isa == 1 && kvd_vocab_avx512_supported(), dense, w, N);
            kvd_vocab_chunk_sums_sparse(sparse, ids, vals, k, N);
            assert_memory_equal(dense, sparse, sizeof dense);
        }
    }
    free(w);
    free(vals);
    free(ids);
}

/* The fused exp and chunk sums equal kvd_vocab_exp then kvd_vocab_chunk_sums bit for
 * bit on both bodies (and across them), over ragged lengths, NaN, +-inf, a max that is
 * not the row's, and temperatures other than 1. */
static void test_exp_chunk_sums_exact(void **state)
{
    (void)state;
    enum { N = 151936 };
    static const int lens[] = {N, N - 7, N - 267, 255, 17, 1};
    float *x = malloc(N * sizeof *x), *w = malloc(N * sizeof *w);
    static float two_pass[N / KVD_VOCAB_CHUNK + 1], fused[N / KVD_VOCAB_CHUNK + 1], portable[N / KVD_VOCAB_CHUNK + 1];
    kvd_rng grng;
    kvd_rng_seed(&grng, 81);
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < N; i++) {
            double u = kvd_rng_uniform(&grng);
            x[i] = (float)(kvd_rng_uniform(&grng) * 60.0 - 40.0);
            if (round > 0 && u < 0.01)
                x[i] = u < 0.004 ? NAN : u < 0.008 ? -INFINITY : 1e-30f;
        }
        const float inv_t = round == 3 ? 1.0f / 0.7f : 1.0f;
        for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++) {
            const int n = lens[l], chunks = (n + KVD_VOCAB_CHUNK - 1) / KVD_VOCAB_CHUNK;
            const float m = round == 2 ? 25.0f : kvd_vocab_max(false, x, n);
            for (int isa = 0; isa < 2; isa++) {
                const bool avx512 = isa == 1 && kvd_vocab_avx512_supported();
                kvd_vocab_exp(avx512, w, x, n, m, inv_t);
                kvd_vocab_chunk_sums(avx512, two_pass, w, n);
                kvd_vocab_exp_chunk_sums(avx512, fused, x, n, m, inv_t);
                assert_memory_equal(two_pass, fused, (size_t)chunks * sizeof fused[0]);
                if (isa == 0)
                    memcpy(portable, fused, (size_t)chunks * sizeof fused[0]);
                else
                    assert_memory_equal(portable, fused, (size_t)chunks * sizeof fused[0]);
            }
        }
    }
    free(x);
    free(w);
}

/* Streams of one seed (choices of one request): stream 0 is the seed itself; stream 1
 * of seed 42 is not seed 43 (the old seed + choice rule made them equal). Reference
 * values from Python big integers: state = splitmix64(seed), then
 * s[i] ^= fmix64(stream * k[i]) for i = 1..3. */
static void test_rng_streams(void **state)
{
    (void)state;
    kvd_rng a, b;
    kvd_rng_seed(&a, 42);
    kvd_rng_seed_stream(&b, 42, 0);
    assert_memory_equal(&a, &b, sizeof a);
    kvd_rng_seed_stream(&a, 42, 1);
    assert_true(a.s[0] == 0xbdd732262feb6e95ull);
    assert_true(a.s[1] == 0xcacf4b0ac97b3cacull);
    assert_true(a.s[2] == 0xc55bd3d7e9e28442ull);
    assert_true(a.s[3] == 0x61805574c9646efcull);
    assert_true((uint64_t)(kvd_rng_uniform(&a) * 0x1.0p53) == 0x7030e56aa9aa4ull);
    assert_true((uint64_t)(kvd_rng_uniform(&a) * 0x1.0p53) == 0x1e50e21b72fb3aull);
    kvd_rng_seed_stream(&b, 43, 0);
    assert_true((uint64_t)(kvd_rng_uniform(&b) * 0x1.0p53) == 0x120cf6926e0942ull);
    /* No two of seeds 0..63 x streams 0..15 share a state or a first draw. */
    enum { SEEDS = 64, STREAMS = 16 };
    static uint64_t first[SEEDS * STREAMS];
    for (int sd = 0; sd < SEEDS; sd++)
        for (int st = 0; st < STREAMS; st++) {
            kvd_rng_seed_stream(&a, (uint64_t)sd, (uint64_t)st);
            first[sd * STREAMS + st] = (uint64_t)(kvd_rng_uniform(&a) * 0x1.0p53);
        }
    for (int i = 0; i < SEEDS * STREAMS; i++)
        for (int j = i + 1; j < SEEDS * STREAMS; j++)
            if (first[i] == first[j])
                fail_msg("seed/stream %d/%d and %d/%d draw the same first value", i / STREAMS, i % STREAMS,
                         j / STREAMS, j % STREAMS);
}

/* logit_bias adds to the listed ids before anything else, exactly; a repeated id adds
 * twice; the reported logprobs stay those of the raw row; bad ids or values are
 * refused with logits and rng untouched. */
static void test_logit_bias(void **state)
{
    (void)state;
    kvd_sampler *s = kvd_sampler_create(4, 4);
    const float base[4] = {1.0f, 3.0f, 2.0f, 0.0f};
    float logits[4];
    memcpy(logits, base, sizeof logits);
    kvd_sampling_params p = sampling(0.0f);
    kvd_logit_bias bias[3] = {{0, 2.5f}, {1, -100.0f}, {0, 0.25f}};
    p.logit_bias = bias;
    p.num_logit_bias = 3;
    p.logprobs = 1;
    kvd_sample_result r;
    assert_int_equal(kvd_sampler_sample(s, &p, logits, NULL, 0, NULL, 0, NULL, &r), 0);
    assert_float_equal(logits[0], 3.75f, 0.0f);
    assert_float_equal(logits[1], -97.0f, 0.0f);
    assert_float_equal(logits[2], 2.0f, 0.0f);
    assert_int_equal(r.token, 0);
    double lse = raw_logsumexp(base, 4);
    assert_float_equal(r.logprob, 1.0 - lse, 1e-5);
    assert_int_equal(r.top_tokens[0], 1); /* the raw row's best, bias or not */

    /* Sampled: the shares follow softmax(logits + bias); -100 is never drawn. */
    int counts[4];
    kvd_logit_bias flat[2] = {{1, -100.0f}, {3, 2.0f}};
    p = sampling(1.0f);
    p.logit_bias = flat;
    p.num_logit_bias = 2;
    histogram(s, &p, base, 4, NDRAWS, 5, counts);
    const double z = exp(1.0) + exp(2.0) + exp(2.0);
    const double expected[4] = {exp(1.0) / z, 0.0, exp(2.0) / z, exp(2.0) / z};
    assert_int_equal(counts[1], 0);
    assert_shares(counts, expected, 4, NDRAWS, 0.006);

    /* Refusals. */
    kvd_rng rng, before;
    kvd_rng_seed(&rng, 3);
    before = rng;
    memcpy(logits, base, sizeof logits);
    kvd_logit_bias outside = {4, 1.0f}, negative = {-1, 1.0f}, infinite = {2, INFINITY};
    const kvd_logit_bias *bad[3] = {&outside, &negative, &infinite};
    for (int i = 0; i < 3; i++) {
        p.logit_bias = bad[i];
        p.num_logit_bias = 1;
        assert_int_equal(kvd_sampler_sample(s, &p, logits, NULL, 0, NULL, 0, &rng, &r), KVD_EINVAL);
    }
    assert_memory_equal(logits, base, sizeof logits);
    assert_memory_equal(&rng, &before, sizeof rng);
    kvd_error err = {0};
    assert_int_equal(kvd_sampling_params_check(&p, &err), KVD_EINVAL);
    assert_non_null(strstr(err.msg, "logit_bias"));
    p.logit_bias = NULL;
    assert_int_equal(kvd_sampling_params_check(&p, NULL), KVD_EINVAL);
    p.num_logit_bias = KVD_MAX_LOGIT_BIAS + 1;
    p.logit_bias = flat;
    assert_int_equal(kvd_sampling_params_check(&p, NULL), KVD_EINVAL);
    kvd_sampler_destroy(s);
}

/* min_tokens: the listed stop ids get -inf while fewer than min_tokens tokens were
 * generated, then compete again; the logprobs stay raw. */
static void test_min_tokens_masks_stop_ids(void **state)
{
    (void)state;
    kvd_sampler *s = kvd_sampler_create(4, 4);
    const float base[4] = {5.0f, 1.0f, 2.0f, 4.5f}; /* 0 and 3 play EOS and a stop id */
    const int32_t stops[2] = {0, 3};
    const int32_t out[3] = {2, 2, 2};
    kvd_sampling_params p = sampling(0.0f);
    p.min_tokens = 3;
    p.min_tokens_stop_ids = stops;
    p.num_min_tokens_stop_ids = 2;
    p.logprobs = 0;
    float logits[4];
    kvd_sample_result r;
    for (int done = 0; done <= 3; done++) {
        memcpy(logits, base, sizeof logits);
        assert_int_equal(kvd_sampler_sample(s, &p, logits, NULL, 0, out, done, NULL, &r), 0);
        assert_int_equal(r.token, done < 3 ? 2 : 0);
        assert_float_equal(r.logprob, base[r.token] - raw_logsumexp(base, 4), 1e-5);
        if (done < 3)
            assert_true(logits[0] == -INFINITY && logits[3] == -INFINITY);
    }
    /* Sampled, one token short of min_tokens: the stop ids are never drawn. */
    kvd_rng rng;
    kvd_rng_seed(&rng, 11);
    p.temperature = 1.0f;
    p.logprobs = -1;
    for (int i = 0; i < 20000; i++) {
        memcpy(logits, base, sizeof logits);
        assert_int_equal(kvd_sampler_sample(s, &p, logits, NULL, 0, out, 2, &rng, &r), 0);
        assert_true(r.token == 1 || r.token == 2);
    }
    p.min_tokens = -1;
    assert_int_equal(kvd_sampling_params_check(&p, NULL), KVD_EINVAL);
    p.min_tokens = 3;
    const int32_t outside[1] = {4};
    p.min_tokens_stop_ids = outside;
    p.num_min_tokens_stop_ids = 1;
    assert_int_equal(kvd_sampler_sample(s, &p, logits, NULL, 0, out, 0, &rng, &r), KVD_EINVAL);
    kvd_sampler_destroy(s);
}

/* A sampler made with num_printable < vocab_size never draws nor lists the ids past
 * it (a model's padding rows), on every path: greedy, the small top_k heap, the
 * whole-vocabulary filters; logprobs still normalise over the whole row. */
static void test_unprintable_ids_never_drawn(void **state)
{
    (void)state;
    enum { V = 4000, PRINTABLE = 3000 };
    kvd_sampler *s = kvd_sampler_create(V, PRINTABLE);
    assert_non_null(s);
    assert_int_equal(kvd_sampler_num_printable(s), PRINTABLE);
    assert_null(kvd_sampler_create(V, V + 1));
    assert_null(kvd_sampler_create(V, 0));
    float *base = malloc(V * sizeof *base), *row = malloc(V * sizeof *row);
    kvd_rng gen;
    kvd_rng_seed(&gen, 99);
    for (int i = 0; i < V; i++)
        base[i] = (float)(kvd_rng_uniform(&gen) * 4.0);
    for (int i = PRINTABLE; i < V; i++)
        base[i] += 6.0f; /* the padding rows are the most likely ones */
    base[1234] = 9.0f;   /* the best printable id */
    kvd_sampling_params greedy = sampling(0.0f);
    greedy.logprobs = 5;
    kvd_sample_result r;
    memcpy(row, base, V * sizeof *row);
    assert_int_equal(kvd_sampler_sample(s, &greedy, row, NULL, 0, NULL, 0, NULL, &r), 0);
    assert_int_equal(r.token, 1234);
    assert_int_equal(r.num_top, 5);
    assert_int_equal(r.top_tokens[0], 1234);
    for (int k = 1; k < 5; k++)
        assert_true(r.top_tokens[k] < PRINTABLE && r.top_logprobs[k] <= r.top_logprobs[k - 1]);
    assert_float_equal(r.logprob, 9.0 - raw_logsumexp(base, V), 1e-4);

    kvd_sampling_params cfgs[3] = {sampling(1.0f), sampling(1.0f), sampling(2.0f)};
    cfgs[1].top_k = 50;    /* the heap path */
    cfgs[2].top_k = 2000;  /* the whole-row path with a cut */
    cfgs[2].top_p = 0.99f;
    cfgs[2].min_p = 0.001f;
    kvd_rng rng;
    kvd_rng_seed(&rng, 17);
    int hits_best = 0;
    for (int c = 0; c < 3; c++)
        for (int i = 0; i < 3000; i++) {
            memcpy(row, base, V * sizeof *row);
            assert_int_equal(kvd_sampler_sample(s, &cfgs[c], row, NULL, 0, NULL, 0, &rng, &r), 0);
            assert_in_range(r.token, 0, PRINTABLE - 1);
            hits_best += r.token == 1234;
        }
    assert_true(hits_best > 0);
    free(base);
    free(row);
    kvd_sampler_destroy(s);
}

static void test_bad_params_rejected_untouched(void **state)
{
    (void)state;
    kvd_sampler *s = kvd_sampler_create(3, 3);
    float logits[3] = {1.0f, 2.0f, 3.0f};
    kvd_rng rng, before;
    kvd_rng_seed(&rng, 1);
    before = rng;
    kvd_sample_result r;
    kvd_sampling_params bad[6];
    for (int i = 0; i < 6; i++)
        bad[i] = sampling(1.0f);
    bad[0].temperature = -1.0f;
    bad[1].top_p = 0.0f;
    bad[2].top_k = -3;
    bad[3].min_p = 1.5f;
    bad[4].repetition_penalty = 0.0f;
    bad[5].logprobs = KVD_MAX_TOP_LOGPROBS + 1;
    for (int i = 0; i < 6; i++) {
        kvd_error err = {0};
        assert_int_equal(kvd_sampling_params_check(&bad[i], &err), KVD_EINVAL);
        assert_non_null(strstr(err.msg, "sampling: "));
        assert_int_equal(kvd_sampler_sample(s, &bad[i], logits, NULL, 0, NULL, 0, &rng, &r), KVD_EINVAL);
    }
    assert_memory_equal(&rng, &before, sizeof rng);
    assert_float_equal(logits[2], 3.0f, 0.0f);
    kvd_sampling_params ok = sampling(1.0f);
    assert_int_equal(kvd_sampler_sample(s, &ok, logits, NULL, 0, NULL, 0, NULL, &r), KVD_EINVAL);
    assert_null(kvd_sampler_create(0, 0));
    kvd_sampler_destroy(NULL);
    kvd_sampler_destroy(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rng_reference_values),
        cmocka_unit_test(test_greedy_ties_lowest_and_rng_untouched),
        cmocka_unit_test(test_repetition_penalty_exact),
        cmocka_unit_test(test_presence_frequency_exact),
        cmocka_unit_test(test_temperature_distribution),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_p),
        cmocka_unit_test(test_min_p),
        cmocka_unit_test(test_masked_tokens_never_drawn),
        cmocka_unit_test(test_seed_reproducibility),
        cmocka_unit_test(test_logprobs_from_raw_logits),
        cmocka_unit_test(test_full_vocab_filters_match_full_sort),
        cmocka_unit_test(test_isa_bodies_agree),
        cmocka_unit_test(test_rewrites_predicate),
        cmocka_unit_test(test_greedy_logprobs_token_is_argmax),
        cmocka_unit_test(test_allowed_mask_matches_manual_mask),
        cmocka_unit_test(test_narrow_mask_matches_manual_mask),
        cmocka_unit_test(test_sparse_chunk_sums_exact),
        cmocka_unit_test(test_exp_chunk_sums_exact),
        cmocka_unit_test(test_bad_params_rejected_untouched),
        cmocka_unit_test(test_rng_streams),
        cmocka_unit_test(test_logit_bias),
        cmocka_unit_test(test_min_tokens_masks_stop_ids),
        cmocka_unit_test(test_unprintable_ids_never_drawn),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
