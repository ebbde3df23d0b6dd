/* kvd_sampler.h - turning one row of logits into the next token, reproducibly.
 *
 * Greedy when temperature is 0; otherwise penalties, temperature, top_k, top_p and
 * min_p filter the distribution and a per-sequence random stream (xoshiro256**,
 * seeded from the request's seed) draws the token, so a sequence's samples depend
 * only on its own seed and logits, never on what else runs.
 *
 * Order (as vLLM): logit_bias (added to each listed id's logit), the min_tokens mask
 * (while fewer than min_tokens tokens were generated, the ids in min_tokens_stop_ids
 * get -inf), the structured-output mask (allowed), repetition penalty (HF: logit > 0 ? logit / p : logit * p, once per
 * distinct token of prompt + output), presence and frequency penalties (OpenAI:
 * logit -= presence + frequency * count, over output tokens), then temperature 0 ->
 * argmax (ties to the lowest id; penalties still apply), else logits / temperature,
 * top_k (ties to the lower id), top_p (smallest best-first set whose probability
 * reaches top_p, at least one token), min_p (drop tokens with p < min_p * p_max), and
 * one draw u = kvd_rng_uniform() walked over the survivors.
 *
 * Printable ids: a model's logits row can be wider than its tokenizer (Qwen2's lm_head
 * has 151936 rows for 151669 ids; a 7B shape 152064): the rows past the tokenizer are
 * padding with no text. A sampler made with num_printable < vocab_size never draws
 * them and never lists them as alternatives, whatever their logits.
 *
 * Choices: choice c of a request draws from kvd_rng_seed_stream(seed, c). Stream 0 is
 * kvd_rng_seed(seed); the map (seed, stream) -> generator state is injective, so no
 * choice of any request starts where another seed's or choice's stream starts (choice 1
 * of seed 42 is not choice 0 of seed 43, as it was with the old seed + c rule).
 *
 * Logprobs come from the log-softmax of the RAW row as the model produced it, over the
 * whole row: before logit_bias, masks, penalties, temperature and filters (what OpenAI
 * and vLLM report).
 */
#ifndef KVD_SAMPLER_H
#define KVD_SAMPLER_H

#include <stdbool.h>
#include <stdint.h>

#include "kvd/kvd_error.h"

#define KVD_MAX_TOP_LOGPROBS 20
#define KVD_MAX_LOGIT_BIAS 1024

/* One logit_bias entry: bias is added to token's logit before anything else. */
typedef struct kvd_logit_bias {
    int32_t token;
    float bias;
} kvd_logit_bias;

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
    const kvd_logit_bias *logit_bias; /* (num_logit_bias) finite biases; an id listed twice adds both */
    int num_logit_bias;       /* 0..KVD_MAX_LOGIT_BIAS */
    int min_tokens;           /* 0 = off; the engine fills min_tokens_stop_ids (stop ids + EOS) */
    const int32_t *min_tokens_stop_ids; /* (num_min_tokens_stop_ids) -inf while num_output < min_tokens */
    int num_min_tokens_stop_ids;
    /* Structured output: NULL, or one bit per id (bit id % 32 of word id / 32); ids whose
     * bit is clear get -inf after the min_tokens mask. The engine points it at the
     * sequence's grammar mask for one call; raw logprobs are not affected. */
    const uint32_t *allowed;
} kvd_sampling_params;

/* Neutral parameters: greedy, no filters, no penalties, no bias, no min_tokens, seed 0,
 * no logprobs. */
kvd_sampling_params kvd_sampling_params_default(void);

/* Returns 0, or KVD_EINVAL with err naming the field (temperature < 0, top_p outside
 * (0, 1], top_k < 0, min_p outside [0, 1], repetition_penalty <= 0, non-finite
 * penalties, logprobs outside -1..KVD_MAX_TOP_LOGPROBS, a non-finite logit_bias, more
 * than KVD_MAX_LOGIT_BIAS of them, min_tokens < 0, a NULL list with a count). Ids are
 * checked against the vocabulary by kvd_sampler_sample. */
int kvd_sampling_params_check(const kvd_sampling_params *params, kvd_error *err);

/* xoshiro256** state; plain data, so a sequence can keep it across preemption. */
typedef struct kvd_rng {
    uint64_t s[4];
} kvd_rng;

/* Fills the state from seed through splitmix64 (never all zero). */
void kvd_rng_seed(kvd_rng *rng, uint64_t seed);
/* Stream `stream` of seed: kvd_rng_seed(seed), then s[i] ^= fmix64(stream * k[i]) for
 * i = 1..3 (k[i] odd constants; fmix64 splitmix64's finaliser, a bijection with
 * fmix64(0) = 0). Stream 0 is kvd_rng_seed(seed); s[0] alone determines seed and s[1]
 * then the stream, so different (seed, stream) pairs never give the same state. */
void kvd_rng_seed_stream(kvd_rng *rng, uint64_t seed, uint64_t stream);
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

/* Scratch sized for vocab_size (the width of a logits row); one per thread that
 * samples. Ids >= num_printable (rows past the tokenizer: pass its vocabulary size, or
 * vocab_size when every row has text) are never drawn nor listed as alternatives.
 * NULL on ENOMEM or num_printable outside 1..vocab_size. */
kvd_sampler *kvd_sampler_create(int vocab_size, int num_printable);
void kvd_sampler_destroy(kvd_sampler *s);
int kvd_sampler_vocab_size(const kvd_sampler *s);
int kvd_sampler_num_printable(const kvd_sampler *s);

/* True when kvd_sampler_sample(params, ..., num_output, ...) writes into its logits
 * (logit_bias, the min_tokens mask, a structured-output mask, penalties); otherwise the
 * row is only read, and several samples may share it, on any threads. */
bool kvd_sampler_rewrites(const kvd_sampling_params *params, int num_output);

/* Samples from logits[vocab_size] (modified in place: bias, masks and penalties are
 * applied to it: see kvd_sampler_rewrites). prompt/output: the sequence's tokens so far, for penalties (ids
 * outside the vocabulary are ignored) and min_tokens (num_output). rng advances by
 * exactly one draw when temperature > 0 and not at all for greedy (it may be NULL
 * then). Never allocates. Returns 0 and fills out, or KVD_EINVAL (bad params, a
 * logit_bias or min_tokens id outside the vocabulary, bad arguments; logits and rng
 * untouched). */
int kvd_sampler_sample(kvd_sampler *s, const kvd_sampling_params *params, float *logits,
                       const int32_t *prompt, int num_prompt, const int32_t *output,
                       int num_output, kvd_rng *rng, kvd_sample_result *out);

#endif
