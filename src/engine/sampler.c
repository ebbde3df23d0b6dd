/* sampler.c - one row of logits to one token: bias, masks, penalties, filters, a draw.
 *
 * The pipeline is vLLM's: logit_bias, the min_tokens mask, repetition penalty (prompt
 * + output), presence and frequency penalties (output), then greedy argmax when
 * temperature is 0, else temperature, top_k, top_p, min_p and one uniform draw from the
 * sequence's own xoshiro256** stream. Everything is a pure function of (params, logits,
 * tokens, rng state), so what else runs in the batch can never change a sample.
 *
 * Ids past the tokenizer (num_printable..vocab_size) are padding rows at the end of
 * the row, so every selection below runs over the first num_printable ids only: they
 * are never drawn nor listed, at no cost. Logprobs still normalise over the whole row.
 *
 * Speed: the vocabulary is 151936 wide, so a full sort would cost milliseconds and is
 * never done. A small top_k (<= 1024, the common case) keeps the k best in a bounded
 * heap while a 16-lane scan skips every value below the heap's worst; the survivors
 * are sorted best first and top_p / min_p cut that list. Otherwise the weights of the
 * whole row are computed once, and top_k, top_p and min_p find their cut points by a
 * quickselect over the few values above a vectorised floor and zero the rest; the draw
 * then walks ids in order, a 256-id chunk at a time. The whole-row passes live in
 * sampler_vocab.c. All scratch is allocated once in kvd_sampler_create: sampling never
 * mallocs.
 */
#include "kvd/kvd_sampler.h"

#include "kvd/kvd_error.h"
#include "sampler_vocab.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

struct kvd_sampler {
    int vocab_size;
    int num_printable;   /* ids drawn and listed: [0, num_printable) */
    bool avx512;         /* which body the whole-row passes use (same results either way) */
    float *raw;          /* (vocab) unpenalised logits, kept for logprobs when penalties apply */
    float *weights;      /* (vocab) exp((logit - max) / T) when the whole vocabulary is a candidate */
    int32_t *cand_ids;   /* (vocab) candidate ids, best first once sorted */
    float *cand_vals;    /* (vocab) their penalised logits, then their weights */
    float *chunk_sums;   /* (vocab / KVD_VOCAB_CHUNK rounded up) weight sums per chunk of ids */
    int32_t *counts;     /* (vocab) output occurrences; all zero between calls */
    uint8_t *seen;       /* (vocab) dedup marks for the repetition penalty; all zero between calls */
};

/* ---- random numbers ---------------------------------------------------------- */

static uint64_t fmix64(uint64_t z);

static uint64_t splitmix64_next(uint64_t *state)
{
    return fmix64(*state += 0x9e3779b97f4a7c15ull);
}

/* splitmix64's output function: a bijection of 64-bit words with fmix64(0) = 0. */
static uint64_t fmix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void kvd_rng_seed(kvd_rng *rng, uint64_t seed)
{
    uint64_t sm = seed;
    for (int i = 0; i < 4; i++)
        rng->s[i] = splitmix64_next(&sm);
}

void kvd_rng_seed_stream(kvd_rng *rng, uint64_t seed, uint64_t stream)
{
    /* Odd multipliers (so stream * k is 0 only for stream 0): 2^64 / phi and two of
     * Steele and Vigna's LCG multipliers. */
    static const uint64_t k[4] = {0, 0x9e3779b97f4a7c15ull, 0xd1b54a32d192ed03ull, 0x8cb92ba72f3d8dd7ull};
    kvd_rng_seed(rng, seed);
    /* s[0] stays as seed made it: it alone identifies seed and keeps the state nonzero.
     * s[1] (the next output's word) and the rest move by amounts that differ for every
     * stream, so even the first draws of two choices are unrelated. */
    for (int i = 1; i < 4; i++)
        rng->s[i] ^= fmix64(stream * k[i]);
}

static inline uint64_t rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t xoshiro256ss_next(kvd_rng *rng)
{
    uint64_t *s = rng->s;
    uint64_t result = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

double kvd_rng_uniform(kvd_rng *rng)
{
    /* The top 53 bits make every double in [0, 1) on a 2^-53 grid equally likely. */
    return (double)(xoshiro256ss_next(rng) >> 11) * 0x1.0p-53;
}

/* ---- parameters and lifetime ------------------------------------------------- */

kvd_sampling_params kvd_sampling_params_default(void)
{
    kvd_sampling_params p = {
        .temperature = 0.0f,
        .top_p = 1.0f,
        .top_k = 0,
        .min_p = 0.0f,
        .repetition_penalty = 1.0f,
        .presence_penalty = 0.0f,
        .frequency_penalty = 0.0f,
        .seed = 0,
        .logprobs = -1,
        .logit_bias = NULL,
        .num_logit_bias = 0,
        .min_tokens = 0,
        .min_tokens_stop_ids = NULL,
        .num_min_tokens_stop_ids = 0,
    };
    return p;
}

kvd_sampler *kvd_sampler_create(int vocab_size, int num_printable)
{
    if (vocab_size <= 0 || num_printable <= 0 || num_printable > vocab_size)
        return NULL;
    kvd_sampler *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    size_t n = (size_t)vocab_size;
    s->vocab_size = vocab_size;
    s->num_printable = num_printable;
    /* KVD_ISA=scalar (as for the compute kernels) forces the portable passes. */
    const char *isa = getenv("KVD_ISA");
    s->avx512 = kvd_vocab_avx512_supported() && !(isa && strcmp(isa, "scalar") == 0);
    s->raw = malloc(n * sizeof *s->raw);
    s->weights = malloc(n * sizeof *s->weights);
    s->cand_ids = malloc(n * sizeof *s->cand_ids);
    s->cand_vals = malloc(n * sizeof *s->cand_vals);
    s->chunk_sums = malloc((n / KVD_VOCAB_CHUNK + 1) * sizeof *s->chunk_sums);
    s->counts = calloc(n, sizeof *s->counts);
    s->seen = calloc(n, sizeof *s->seen);
    if (!s->raw || !s->weights || !s->cand_ids || !s->cand_vals || !s->chunk_sums || !s->counts ||
        !s->seen) {
        kvd_sampler_destroy(s);
        return NULL;
    }
    return s;
}

void kvd_sampler_destroy(kvd_sampler *s)
{
    if (!s)
        return;
    free(s->raw);
    free(s->weights);
    free(s->cand_ids);
    free(s->cand_vals);
    free(s->chunk_sums);
    free(s->counts);
    free(s->seen);
    free(s);
}

int kvd_sampler_vocab_size(const kvd_sampler *s)
{
    return s->vocab_size;
}

int kvd_sampler_num_printable(const kvd_sampler *s)
{
    return s->num_printable;
}

int kvd_sampling_params_check(const kvd_sampling_params *p, kvd_error *err)
{
    if (!(p->temperature >= 0.0f) || !isfinite(p->temperature))
        return kvd_error_set(err, KVD_EINVAL, "sampling: temperature %g must be finite and >= 0",
                             (double)p->temperature);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return kvd_error_set(err, KVD_EINVAL, "sampling: top_p %g must be in (0, 1]", (double)p->top_p);
    if (p->top_k < 0)
        return kvd_error_set(err, KVD_EINVAL, "sampling: top_k %d must be >= 0 (0 = off)", p->top_k);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return kvd_error_set(err, KVD_EINVAL, "sampling: min_p %g must be in [0, 1]", (double)p->min_p);
    if (!(p->repetition_penalty > 0.0f) || !isfinite(p->repetition_penalty))
        return kvd_error_set(err, KVD_EINVAL, "sampling: repetition_penalty %g must be finite and > 0",
                             (double)p->repetition_penalty);
    if (!isfinite(p->presence_penalty))
        return kvd_error_set(err, KVD_EINVAL, "sampling: presence_penalty must be finite");
    if (!isfinite(p->frequency_penalty))
        return kvd_error_set(err, KVD_EINVAL, "sampling: frequency_penalty must be finite");
    if (p->logprobs < -1 || p->logprobs > KVD_MAX_TOP_LOGPROBS)
        return kvd_error_set(err, KVD_EINVAL, "sampling: logprobs %d must be -1 (off) or 0..%d",
                             p->logprobs, KVD_MAX_TOP_LOGPROBS);
    if (p->num_logit_bias < 0 || p->num_logit_bias > KVD_MAX_LOGIT_BIAS || (p->num_logit_bias > 0 && !p->logit_bias))
        return kvd_error_set(err, KVD_EINVAL, "sampling: logit_bias: %d entries, at most %d", p->num_logit_bias,
                             KVD_MAX_LOGIT_BIAS);
    for (int i = 0; i < p->num_logit_bias; i++)
        if (!isfinite(p->logit_bias[i].bias))
            return kvd_error_set(err, KVD_EINVAL, "sampling: logit_bias for token %d must be finite",
                                 p->logit_bias[i].token);
    if (p->min_tokens < 0)
        return kvd_error_set(err, KVD_EINVAL, "sampling: min_tokens %d must be >= 0", p->min_tokens);
    if (p->num_min_tokens_stop_ids < 0 || (p->num_min_tokens_stop_ids > 0 && !p->min_tokens_stop_ids))
        return kvd_error_set(err, KVD_EINVAL, "sampling: min_tokens_stop_ids: bad list of %d ids",
                             p->num_min_tokens_stop_ids);
    return 0;
}

/* ---- numeric helpers --------------------------------------------------------- */

/* "a is better than b": larger value, ties to the lower id. */
static inline bool cand_better(float va, int32_t ia, float vb, int32_t ib)
{
    return va > vb || (va == vb && ia < ib);
}

static void heap_sift_down(float *vals, int32_t *ids, int n, int i)
{
    /* Min-heap on "better": the root is the worst kept candidate. */
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && cand_better(vals[w], ids[w], vals[l], ids[l]))
            w = l;
        if (r < n && cand_better(vals[w], ids[w], vals[r], ids[r]))
            w = r;
        if (w == i)
            return;
        float tv = vals[i];
        vals[i] = vals[w];
        vals[w] = tv;
        int32_t ti = ids[i];
        ids[i] = ids[w];
        ids[w] = ti;
        i = w;
    }
}

static void heap_sift_up(float *vals, int32_t *ids, int i)
{
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!cand_better(vals[parent], ids[parent], vals[i], ids[i]))
            return;
        float tv = vals[i];
        vals[i] = vals[parent];
        vals[parent] = tv;
        int32_t ti = ids[i];
        ids[i] = ids[parent];
        ids[parent] = ti;
        i = parent;
    }
}

/* The k best entries of x[0..n) (NaN never selected), sorted best first with ties to
 * the lower id, into ids/vals. Returns how many were selected (min(k, non-NaN count)).
 * Once the heap is full only values above its worst can enter, and a vector scan
 * skips to the next such value: typically a few hundred heap operations per row. */
static int select_top(bool avx512, const float *x, int n, int k, int32_t *ids, float *vals)
{
    int size = 0, i = 0;
    for (; i < n && size < k; i++) {
        if (x[i] != x[i])
            continue;
        vals[size] = x[i];
        ids[size] = i;
        heap_sift_up(vals, ids, size);
        size++;
    }
    while (size == k && (i = kvd_vocab_find_gt(avx512, x, i, n, vals[0])) < n) {
        /* Scanning ids upwards, an equal value is always worse than the root. */
        vals[0] = x[i];
        ids[0] = i;
        heap_sift_down(vals, ids, size, 0);
        i++;
    }
    /* Heap sort: popping the worst to the back leaves the array best first. */
    for (int end = size - 1; end > 0; end--) {
        float tv = vals[0];
        vals[0] = vals[end];
        vals[end] = tv;
        int32_t ti = ids[0];
        ids[0] = ids[end];
        ids[end] = ti;
        heap_sift_down(vals, ids, end, 0);
    }
    return size;
}

/* ---- whole-row helpers ------------------------------------------------------ */

static int32_t argmax_lowest(bool avx512, const float *x, int n)
{
    const float m = kvd_vocab_max(avx512, x, n);
    if (m == -INFINITY) {
        for (int i = 0; i < n; i++)
            if (x[i] == m)
                return i;
        return 0; /* all NaN */
    }
    /* The first value above m's predecessor is the first equal to m. */
    int i = kvd_vocab_find_gt(avx512, x, 0, n, nextafterf(m, -INFINITY));
    return i < n ? i : 0;
}

static int num_chunks(int n)
{
    return (n + KVD_VOCAB_CHUNK - 1) / KVD_VOCAB_CHUNK;
}

static double total_of_chunks(const float *sums, int n)
{
    double total = 0.0;
    for (int c = 0; c < num_chunks(n); c++)
        total += sums[c];
    return total;
}

/* Draws token i with probability w[i] / total over the whole vocabulary in id order,
 * total being total_of_chunks(sums): a chunk is found by its sum, then walked. */
/* The chunk whose sums reach target (the last one at most); *cum := the sum before it. */
static int chunk_reaching(const float *sums, int n, double target, double *cum)
{
    int c = 0, last_c = num_chunks(n) - 1;
    *cum = 0.0;
    for (; c < last_c; c++) {
        if (*cum + sums[c] > target)
            break;
        *cum += sums[c];
    }
    return c;
}

static int32_t draw_vocab(const float *w, const float *sums, int n, double total, kvd_rng *rng)
{
    const double target = kvd_rng_uniform(rng) * total;
    double cum;
    for (int c = chunk_reaching(sums, n, target, &cum); c >= 0; c--) {
        /* Rounding can leave the walk short inside the chunk: take its last nonzero
         * weight, or an earlier chunk's if this one holds none. */
        int start = c * KVD_VOCAB_CHUNK, end = start + KVD_VOCAB_CHUNK < n ? start + KVD_VOCAB_CHUNK : n;
        int last = -1;
        double run = cum;
        for (int i = start; i < end; i++) {
            if (w[i] > 0.0f) {
                run += w[i];
                last = i;
                if (run > target)
                    return i;
            }
        }
        if (last >= 0)
            return last;
        cum = 0.0; /* only reached for an all-zero chunk: any earlier weight will do */
    }
    return argmax_lowest(false, w, n);
}

/* draw_vocab over a row that is zero but for w[j] at ids[j] (k of them, ascending):
 * the same chunk walk over the same sums, the same walk inside the chunk. */
static int32_t draw_allowed(const int32_t *ids, const float *w, int k, const float *sums, int n, double total,
                            kvd_rng *rng)
{
    const double target = kvd_rng_uniform(rng) * total;
    double cum;
    for (int c = chunk_reaching(sums, n, target, &cum); c >= 0; c--) {
        const int start = c * KVD_VOCAB_CHUNK, end = start + KVD_VOCAB_CHUNK;
        int lo = 0, hi = k; /* the first allowed id >= start */
        while (lo < hi) {
            const int mid = lo + (hi - lo) / 2;
            if (ids[mid] < start)
                lo = mid + 1;
            else
                hi = mid;
        }
        int32_t last = -1;
        double run = cum;
        for (int j = lo; j < k && ids[j] < end; j++) {
            if (w[j] > 0.0f) {
                run += w[j];
                last = ids[j];
                if (run > target)
                    return ids[j];
            }
        }
        if (last >= 0)
            return last;
        cum = 0.0;
    }
    int best = 0; /* unreachable: the top allowed id weighs exp(0) */
    for (int j = 1; j < k; j++)
        if (w[j] > w[best])
            best = j;
    return ids[best];
}

/* Structured output with a narrow mask (at most 1/16 of the printable ids): the allowed
 * ids alone, through the very numbers the whole-row path computes on the masked row
 * (its max, the weights, the chunk sums, the draw's walk), so the token is the same
 * without three passes over the vocabulary. -1 (nothing drawn) when the mask is wide,
 * a top_k/top_p/min_p filter is on, or no allowed logit is finite. */
static int32_t sample_allowed(kvd_sampler *s, const kvd_sampling_params *p, const float *logits, kvd_rng *rng)
{
    if (p->temperature > 0.0f && (p->top_k > 0 || p->top_p < 1.0f || p->min_p > 0.0f))
        return -1;
    const int n = s->num_printable, cap = n / 16;
    int k = 0;
    for (int wd = 0; wd * 32 < n && k <= cap; wd++) {
        uint32_t bits = p->allowed[wd];
        if (n - wd * 32 < 32)
            bits &= (1u << (n - wd * 32)) - 1u;
        k += __builtin_popcount(bits);
    }
    if (k > cap || k == 0)
        return -1;
    int32_t *ids = s->cand_ids;
    float *vals = s->cand_vals, *w = s->weights;
    int j = 0;
    for (int wd = 0; wd * 32 < n; wd++) {
        uint32_t bits = p->allowed[wd];
        if (n - wd * 32 < 32)
            bits &= (1u << (n - wd * 32)) - 1u;
        for (; bits; bits &= bits - 1) {
            const int32_t id = wd * 32 + __builtin_ctz(bits);
            ids[j] = id;
            vals[j++] = logits[id];
        }
    }
    float m = -INFINITY;
    for (j = 0; j < k; j++)
        m = vals[j] > m ? vals[j] : m;
    if (!isfinite(m))
        return -1;
    if (p->temperature == 0.0f) {
        for (j = 0; vals[j] != m; j++)
            ;
        return ids[j];
    }
    kvd_vocab_exp(s->avx512, w, vals, k, m, 1.0f / p->temperature);
    kvd_vocab_chunk_sums_sparse(s->chunk_sums, ids, w, k, n);
    return draw_allowed(ids, w, k, s->chunk_sums, n, total_of_chunks(s->chunk_sums, n), rng);
}

/* ---- the pipeline ------------------------------------------------------------ */

static bool penalties_active(const kvd_sampling_params *p)
{
    return p->repetition_penalty != 1.0f || p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f;
}

static void apply_penalties(kvd_sampler *s, const kvd_sampling_params *p, float *logits,
                            const int32_t *prompt, int num_prompt, const int32_t *output,
                            int num_output)
{
    const int V = s->vocab_size;
    if (p->repetition_penalty != 1.0f) {
        const float rp = p->repetition_penalty;
        /* Each distinct token once, as HF's gather/scatter does. */
        for (int pass = 0; pass < 2; pass++) {
            const int32_t *toks = pass ? output : prompt;
            int n = pass ? num_output : num_prompt;
            for (int i = 0; i < n; i++) {
                int32_t t = toks[i];
                if (t < 0 || t >= V || s->seen[t])
                    continue;
                s->seen[t] = 1;
                float l = logits[t];
                logits[t] = l > 0.0f ? l / rp : l * rp;
            }
        }
        for (int i = 0; i < num_prompt; i++)
            if (prompt[i] >= 0 && prompt[i] < V)
                s->seen[prompt[i]] = 0;
        for (int i = 0; i < num_output; i++)
            if (output[i] >= 0 && output[i] < V)
                s->seen[output[i]] = 0;
    }
    if (p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f) {
        for (int i = 0; i < num_output; i++)
            if (output[i] >= 0 && output[i] < V)
                s->counts[output[i]]++;
        for (int i = 0; i < num_output; i++) {
            int32_t t = output[i];
            if (t < 0 || t >= V || s->counts[t] == 0)
                continue;
            logits[t] -= p->presence_penalty + p->frequency_penalty * (float)s->counts[t];
            s->counts[t] = 0; /* also marks t done, and leaves counts zero for the next call */
        }
    }
}

/* Log-softmax facts of the raw row: the chosen token's logprob is filled in later. */
static void raw_logprobs(kvd_sampler *s, const float *raw, int num_top, double *lse_out,
                         kvd_sample_result *out)
{
    const int V = s->vocab_size;
    const float m = kvd_vocab_max(s->avx512, raw, V);
    double lse = m;
    if (isfinite(m)) {
        kvd_vocab_exp_chunk_sums(s->avx512, s->chunk_sums, raw, V, m, 1.0f);
        lse = (double)m + log(total_of_chunks(s->chunk_sums, V)); /* the sum is >= 1 */
    }
    *lse_out = lse;
    out->num_top = 0;
    if (num_top > 0) {
        int got = select_top(s->avx512, raw, s->num_printable, num_top, s->cand_ids, s->cand_vals);
        for (int j = 0; j < got; j++) {
            out->top_tokens[j] = s->cand_ids[j];
            out->top_logprobs[j] = (float)((double)s->cand_vals[j] - lse);
        }
        out->num_top = got;
    }
}

/* Draws from the candidates' weights (best first or in id order; either way fixed by
 * the logits alone). The last candidate absorbs rounding at the top end. */
static int32_t draw(const int32_t *ids, const float *w, int n, double total, kvd_rng *rng)
{
    double target = kvd_rng_uniform(rng) * total;
    double cum = 0.0;
    for (int j = 0; j < n; j++) {
        cum += w[j];
        if (cum > target)
            return ids ? ids[j] : j;
    }
    for (int j = n - 1; j >= 0; j--)
        if (w[j] > 0.0f)
            return ids ? ids[j] : j;
    return ids ? ids[0] : 0;
}

/* Sorted path for a small top_k (the common 20..1000): the heap gives the k best,
 * best first, and top_p / min_p are prefix cuts of that list. */
static int32_t sample_small_top_k(kvd_sampler *s, const kvd_sampling_params *p, const float *logits,
                                  float m, float inv_t, kvd_rng *rng)
{
    int32_t *ids = s->cand_ids;
    float *w = s->cand_vals;
    int n = select_top(s->avx512, logits, s->num_printable, p->top_k, ids, w);
    double total = 0.0;
    for (int j = 0; j < n; j++)
        w[j] = kvd_vocab_exp1((w[j] - m) * inv_t);
    for (int j = 0; j < n; j++)
        total += w[j];
    if (p->top_p < 1.0f) {
        /* Smallest prefix whose mass reaches top_p of the k; at least one token. */
        const double need = (double)p->top_p * total;
        double cum = 0.0;
        int keep = n;
        for (int j = 0; j < n; j++) {
            cum += w[j];
            if (cum >= need) {
                keep = j + 1;
                break;
            }
        }
        n = keep;
        total = cum;
    }
    if (p->min_p > 0.0f && n > 1) {
        const float floor_w = p->min_p * w[0];
        int keep = 1;
        double kept = w[0];
        while (keep < n && w[keep] >= floor_w)
            kept += w[keep++];
        n = keep;
        total = kept;
    }
    return draw(ids, w, n, total, rng);
}

static inline void swap_float(float *a, float *b)
{
    float t = *a;
    *a = *b;
    *b = t;
}

static inline float median3(float a, float b, float c)
{
    if (a > b)
        swap_float(&a, &b);
    if (b > c)
        swap_float(&b, &c);
    return a > b ? a : b;
}

/* Quickselect for a cut point: permutes v[0..n) (no NaN) and returns tau with
 * measure(v > tau) < need <= measure(v >= tau), where measure counts elements, or
 * sums them when by_mass. *above receives measure(v > tau) and *count_above the
 * number of v > tau. Returns -inf (everything above) when need exceeds the total.
 * Expected O(n), no sort. */
static float cut_select(float *v, int n, double need, bool by_mass, double *above, int *count_above)
{
    int lo = 0, hi = n;
    double acc = 0.0;
    while (lo < hi) {
        const float pivot = median3(v[lo], v[lo + (hi - lo) / 2], v[hi - 1]);
        int gt = lo, i = lo, lt = hi;
        double mass_gt = 0.0, mass_eq = 0.0;
        /* Three-way partition: [lo, gt) > pivot, [gt, lt) == pivot, [lt, hi) < pivot. */
        while (i < lt) {
            float x = v[i];
            if (x > pivot) {
                swap_float(&v[i++], &v[gt++]);
                mass_gt += by_mass ? x : 1.0;
            } else if (x < pivot) {
                swap_float(&v[i], &v[--lt]);
            } else {
                i++;
                mass_eq += by_mass ? x : 1.0;
            }
        }
        if (acc + mass_gt >= need) {
            hi = gt; /* the cut lies among the larger ones (non-empty, as acc < need) */
        } else if (acc + mass_gt + mass_eq >= need) {
            *above = acc + mass_gt;
            *count_above = gt;
            return pivot;
        } else {
            acc += mass_gt + mass_eq;
            lo = lt;
        }
    }
    *above = acc;
    *count_above = n;
    return -INFINITY;
}

/* The k-th best logit (count cut) for a large top_k. Only values near the top can be
 * in it, so a bisection with vectorised counts narrows a floor holding between k and
 * 4k values (the invariant: at least k at or above it), and the selection runs on
 * those alone. */
static float top_k_cut(kvd_sampler *s, const float *logits, float m, int k, int *count_above)
{
    const int V = s->num_printable;
    double above;
    float lo = m - 64.0f, hi = m;
    int n;
    if (kvd_vocab_count_ge(s->avx512, logits, V, lo) < k) {
        lo = -INFINITY; /* a very wide top_k: everything that is a number */
    } else {
        for (int iter = 0; iter < 24; iter++) {
            const float mid = lo + (hi - lo) * 0.5f;
            if (mid <= lo || mid >= hi)
                break;
            const int count = kvd_vocab_count_ge(s->avx512, logits, V, mid);
            if (count < k) {
                hi = mid;
            } else {
                lo = mid;
                if (count <= 4 * k)
                    break;
            }
        }
    }
    n = kvd_vocab_compress_ge(s->avx512, s->cand_vals, NULL, logits, V, lo);
    return cut_select(s->cand_vals, n, (double)k, false, &above, count_above);
}

/* The weight cut for top_p (need = top_p * total): the nucleus lies above some floor,
 * so find a floor whose mass already reaches need and select among those only. */
static float nucleus_cut(kvd_sampler *s, const float *w, double need, double *above,
                         int *count_above)
{
    const int V = s->num_printable;
    static const float floors[] = {1e-2f, 1e-4f, 1e-6f};
    for (size_t f = 0; f < sizeof floors / sizeof floors[0]; f++) {
        int count = 0;
        if (kvd_vocab_mass_at_least(s->avx512, w, V, floors[f], &count) < need)
            continue;
        int n = kvd_vocab_compress_ge(s->avx512, s->cand_vals, NULL, w, V, floors[f]);
        return cut_select(s->cand_vals, n, need, true, above, count_above);
    }
    int n = kvd_vocab_compress_ge(s->avx512, s->cand_vals, NULL, w, V, FLT_TRUE_MIN);
    return cut_select(s->cand_vals, n, need, true, above, count_above);
}

/* General path: weights over the whole vocabulary, filters zero them out, and the
 * draw walks the survivors in id order. Cuts at a tie keep the lowest ids. */
static int32_t sample_vocab(kvd_sampler *s, const kvd_sampling_params *p, const float *logits,
                            float m, float inv_t, kvd_rng *rng)
{
    const int V = s->num_printable;
    float *w = s->weights;
    kvd_vocab_exp(s->avx512, w, logits, V, m, inv_t);

    if (p->top_k > 0 && p->top_k < kvd_vocab_count_ge(s->avx512, logits, V, -INFINITY)) {
        int count_above;
        const float tau = top_k_cut(s, logits, m, p->top_k, &count_above);
        kvd_vocab_zero_below(s->avx512, w, logits, V, tau);
        int ties_left = p->top_k - count_above;
        if (kvd_vocab_count_ge(s->avx512, logits, V, tau) - count_above > ties_left) {
            for (int i = 0; i < V; i++) {
                if (logits[i] != tau)
                    continue;
                if (ties_left > 0)
                    ties_left--;
                else
                    w[i] = 0.0f;
            }
        }
    }

    if (p->top_p < 1.0f) {
        kvd_vocab_chunk_sums(s->avx512, s->chunk_sums, w, V);
        const double need = (double)p->top_p * total_of_chunks(s->chunk_sums, V);
        double above;
        int count_above;
        const float tau = nucleus_cut(s, w, need, &above, &count_above);
        kvd_vocab_zero_below(s->avx512, w, w, V, tau);
        if (tau > 0.0f && kvd_vocab_count_ge(s->avx512, w, V, tau) - count_above > 1) {
            /* Several tokens tie at the cut: the lowest ids until the mass is reached. */
            double mass = above;
            for (int i = 0; i < V; i++) {
                if (w[i] != tau)
                    continue;
                if (mass < need)
                    mass += w[i];
                else
                    w[i] = 0.0f;
            }
        }
    }

    if (p->min_p > 0.0f) {
        /* The best token's weight is exp(0) = 1 and no filter ever removes it. */
        kvd_vocab_zero_below(s->avx512, w, w, V, p->min_p);
    }
    kvd_vocab_chunk_sums(s->avx512, s->chunk_sums, w, V);
    return draw_vocab(w, s->chunk_sums, V, total_of_chunks(s->chunk_sums, V), rng);
}

/* m: the row's max over the printable ids when the caller has it, else NaN. */
static int32_t sample_filtered(kvd_sampler *s, const kvd_sampling_params *p, const float *logits,
                               float m, kvd_rng *rng)
{
    enum { SMALL_TOP_K = 1024 };
    const int V = s->num_printable;
    const float inv_t = 1.0f / p->temperature;
    if (isnan(m))
        m = kvd_vocab_max(s->avx512, logits, V);
    if (!isfinite(m))
        return argmax_lowest(s->avx512, logits, V); /* nothing to draw from: keep it defined */
    if (p->top_k > 0 && p->top_k <= SMALL_TOP_K && p->top_k < V)
        return sample_small_top_k(s, p, logits, m, inv_t, rng);
    return sample_vocab(s, p, logits, m, inv_t, rng);
}

bool kvd_sampler_rewrites(const kvd_sampling_params *p, int num_output)
{
    const bool mask_stops = num_output < p->min_tokens && p->num_min_tokens_stop_ids > 0;
    return penalties_active(p) || p->num_logit_bias > 0 || mask_stops || p->allowed;
}

/* True when some id of the bias or min_tokens lists lies outside the row. */
static bool ids_outside(const kvd_sampling_params *p, int V)
{
    for (int i = 0; i < p->num_logit_bias; i++)
        if (p->logit_bias[i].token < 0 || p->logit_bias[i].token >= V)
            return true;
    for (int i = 0; i < p->num_min_tokens_stop_ids; i++)
        if (p->min_tokens_stop_ids[i] < 0 || p->min_tokens_stop_ids[i] >= V)
            return true;
    return false;
}

int kvd_sampler_sample(kvd_sampler *s, const kvd_sampling_params *params, float *logits,
                       const int32_t *prompt, int num_prompt, const int32_t *output,
                       int num_output, kvd_rng *rng, kvd_sample_result *out)
{
    if (!s || !params || !logits || !out || (num_prompt > 0 && !prompt) ||
        (num_output > 0 && !output) || num_prompt < 0 || num_output < 0)
        return KVD_EINVAL;
    if (kvd_sampling_params_check(params, NULL) < 0 || ids_outside(params, s->vocab_size))
        return KVD_EINVAL;
    if (params->temperature > 0.0f && !rng)
        return KVD_EINVAL;
    const int V = s->vocab_size;
    const bool want_logprobs = params->logprobs >= 0;
    const bool penalise = penalties_active(params);
    const bool mask_stops = num_output < params->min_tokens && params->num_min_tokens_stop_ids > 0;
    const bool rewrite = kvd_sampler_rewrites(params, num_output);
    const float *raw = logits;
    double lse = 0.0;

    out->num_top = 0;
    out->logprob = 0.0f;
    if (want_logprobs) {
        if (rewrite) {
            memcpy(s->raw, logits, (size_t)V * sizeof *logits);
            raw = s->raw;
        }
        raw_logprobs(s, raw, params->logprobs, &lse, out);
    }
    for (int i = 0; i < params->num_logit_bias; i++)
        logits[params->logit_bias[i].token] += params->logit_bias[i].bias;
    if (mask_stops)
        for (int i = 0; i < params->num_min_tokens_stop_ids; i++)
            logits[params->min_tokens_stop_ids[i]] = -INFINITY;
    /* Penalties before the mask gives the same row as after it: they keep -inf at -inf. */
    if (penalise)
        apply_penalties(s, params, logits, prompt, num_prompt, output, num_output);
    int32_t token = -1;
    float max_printable = NAN; /* taken by the mask pass */
    if (params->allowed) {
        token = sample_allowed(s, params, logits, rng);
        if (token < 0)
            max_printable = kvd_vocab_mask_max(s->avx512, logits, params->allowed, V, s->num_printable);
    }
    if (token < 0 && params->temperature == 0.0f && raw == logits && out->num_top > 0) {
        /* Greedy on the untouched row whose best printable ids were just listed: the
         * first of them is argmax_lowest's answer (the same order: NaN skipped, ties to
         * the lower id), without two more passes over the row. */
        token = out->top_tokens[0];
    }
    if (token < 0)
        token = params->temperature == 0.0f ? argmax_lowest(s->avx512, logits, s->num_printable)
                                            : sample_filtered(s, params, logits, max_printable, rng);
    out->token = token;
    if (want_logprobs)
        out->logprob = (float)((double)raw[token] - lse);
    return 0;
}
