/* kvd_sampler.h - turning one row of logits into the next token, reproducibly.
 *
 * Greedy when temperature is 0; otherwise penalties, temperature, top_k, top_p and
 * min_p filter the distribution and a per-sequence random stream (xoshiro256**,
 * seeded from the request's seed) draws the token, so a sequence's samples depend
 * only on its own seed and logits, never on what else runs.
 *
 * Order (as Hugging Face / vLLM): repetition penalty (HF: logit > 0 ? logit / p :
 * logit * p, once per distinct token of prompt + output), presence and frequency
 * penalties (OpenAI: logit -= presence + frequency * count, over output tokens),
 * then temperature 0 -> argmax (ties to the lowest id; penalties still apply), else
 * logits / temperature, top_k (ties to the lower id), top_p (smallest best-first set
 * whose probability reaches top_p, at least one token), min_p (drop tokens with
 * p < min_p * p_max), and one draw u = kvd_rng_uniform() walked over the survivors.
 * The engine seeds choice i of a request with kvd_rng_seed(seed + i).
 *
 * Logprobs come from the log-softmax of the RAW row as the model produced it: before
 * penalties, temperature and filters (what OpenAI reports).
 */
#ifndef KVD_SAMPLER_H
#define KVD_SAMPLER_H

#include <stdbool.h>
#include <stdint.h>

#include "kvd/kvd_error.h"

#define KVD_MAX_TOP_LOGPROBS 20

typedef struct kvd_sampling_params {
    float temperature;        /* 0 = greedy */
    float top_p;              /* 1 = off */
    int top_k;                /* 0 = off */
    float min_p;              /* 0 = off */
    float repetition_penalty; /* 1 = off; HF style, over prompt and output tokens */
    float presence_penalty;   /* 0 = off; OpenAI style, over output tokens */
    float frequency_penalty;  /* 0 = off; OpenAI style, over output tokens */
    uint64_t seed;
    int logprobs;             /* -1 = none; otherwise top alternatives 0..KVD_MAX_TOP_LOGPROBS */
} kvd_sampling_params;

/* Neutral parameters: greedy, no filters, no penalties, seed 0, no logprobs. */
kvd_sampling_params kvd_sampling_params_default(void);

/* Returns 0, or KVD_EINVAL with err naming the field (temperature < 0, top_p outside
 * (0, 1], top_k < 0, min_p outside [0, 1], repetition_penalty <= 0, non-finite
 * penalties, logprobs outside -1..KVD_MAX_TOP_LOGPROBS). */
int kvd_sampling_params_check(const kvd_sampling_params *params, kvd_error *err);

/* xoshiro256** state; plain data, so a sequence can keep it across preemption. */
typedef struct kvd_rng {
    uint64_t s[4];
} kvd_rng;

/* Fills the state from seed through splitmix64 (never all zero). */
void kvd_rng_seed(kvd_rng *rng, uint64_t seed);
/* Uniform in [0, 1). */
double kvd_rng_uniform(kvd_rng *rng);

/* logprob and the top alternatives are filled only when params->logprobs >= 0
 * (logprob 0 and num_top 0 otherwise): the log-softmax over the whole vocabulary
 * costs a pass of exp() the common case does not need. */
typedef struct kvd_sample_result {
    int32_t token;
    float logprob;                              /* of token under the unfiltered, untempered softmax */
    int num_top;                                /* = params->logprobs; best first, ties to the lower id */
    int32_t top_tokens[KVD_MAX_TOP_LOGPROBS];
    float top_logprobs[KVD_MAX_TOP_LOGPROBS];
} kvd_sample_result;

typedef struct kvd_sampler kvd_sampler;

/* Scratch sized for vocab_size; one per thread that samples. NULL on ENOMEM. */
kvd_sampler *kvd_sampler_create(int vocab_size);
void kvd_sampler_destroy(kvd_sampler *s);
int kvd_sampler_vocab_size(const kvd_sampler *s);

/* Samples from logits[vocab_size] (modified in place: penalties are applied to it).
 * prompt/output: the sequence's tokens so far, for penalties (ids outside the
 * vocabulary are ignored). rng advances by exactly one draw when temperature > 0 and
 * not at all for greedy (it may be NULL then). Never allocates. Returns 0 and fills
 * out, or KVD_EINVAL (bad params or arguments; logits and rng untouched). */
int kvd_sampler_sample(kvd_sampler *s, const kvd_sampling_params *params, float *logits,
                       const int32_t *prompt, int num_prompt, const int32_t *output,
                       int num_output, kvd_rng *rng, kvd_sample_result *out);

#endif
