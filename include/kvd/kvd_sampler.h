/* kvd_sampler.h - turning one row of logits into the next token, reproducibly.
 *
 * Greedy when temperature is 0; otherwise penalties, temperature, top_k, top_p and
 * min_p filter the distribution and a per-sequence random stream (xoshiro256**,
 * seeded from the request's seed) draws the token, so a sequence's samples depend
 * only on its own seed and logits, never on what else runs.
 */
#ifndef KVD_SAMPLER_H
#define KVD_SAMPLER_H

#include <stdbool.h>
#include <stdint.h>

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

typedef struct kvd_rng {
    uint64_t s[4];
} kvd_rng;

void kvd_rng_seed(kvd_rng *rng, uint64_t seed);
/* Uniform in [0, 1). */
double kvd_rng_uniform(kvd_rng *rng);

typedef struct kvd_sample_result {
    int32_t token;
    float logprob;                              /* of token under the unfiltered, untempered softmax */
    int num_top;
    int32_t top_tokens[KVD_MAX_TOP_LOGPROBS];
    float top_logprobs[KVD_MAX_TOP_LOGPROBS];
} kvd_sample_result;

typedef struct kvd_sampler kvd_sampler;

/* Scratch sized for vocab_size; one per thread that samples. NULL on ENOMEM. */
kvd_sampler *kvd_sampler_create(int vocab_size);
void kvd_sampler_destroy(kvd_sampler *s);

/* Samples from logits[vocab_size] (modified in place). prompt/output: the sequence's
 * tokens so far, for penalties. Returns 0 and fills out. */
int kvd_sampler_sample(kvd_sampler *s, const kvd_sampling_params *params, float *logits,
                       const int32_t *prompt, int num_prompt, const int32_t *output,
                       int num_output, kvd_rng *rng, kvd_sample_result *out);

#endif
