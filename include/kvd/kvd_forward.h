/* kvd_forward.h - one batched Qwen2 forward pass over many sequences' block tables.
 *
 * A step concatenates the new tokens of several sequences (a decode token each, or
 * a prefill chunk) into one batch: every linear layer runs as one matrix product over
 * all of them, attention runs per sequence through its block table. The forward
 * writes the new tokens' K/V into their slots (the caller has reserved them with
 * kvd_block_table_append) and returns logits for the rows asked for.
 *
 * Determinism: every kernel computes each output element with the same sequence of
 * operations whatever the batch size, the batch's other members, the thread count
 * or the KV block size, so a sequence's logits do not depend on what ran beside it.
 *
 * Ownership: the context owns its scratch buffers (allocated once at creation, never
 * on the step path); it borrows the model and pool, which must outlive it.
 */
#ifndef KVD_FORWARD_H
#define KVD_FORWARD_H

#include <stdbool.h>
#include <stdint.h>

#include "kvd/kvd_error.h"
#include "kvd/kvd_kv.h"
#include "kvd/kvd_model.h"

typedef enum kvd_logits_mode {
    KVD_LOGITS_NONE = 0, /* prefill chunk that does not end the prompt */
    KVD_LOGITS_LAST = 1, /* the last token of this sequence's part of the batch */
    KVD_LOGITS_ALL = 2,  /* every token of its part (tests, prompt logprobs) */
} kvd_logits_mode;

typedef struct kvd_forward_seq {
    const kvd_block_table *table; /* slots reserved for positions [0, num_past + num_new) */
    int num_past;                 /* positions already holding K/V */
    int num_new;                  /* tokens of this sequence in the batch, positions num_past.. */
    int token_offset;             /* index of its first token in kvd_forward_batch.tokens */
    kvd_logits_mode logits;
} kvd_forward_seq;

typedef struct kvd_forward_batch {
    const int32_t *tokens;        /* [num_tokens] */
    int num_tokens;
    const kvd_forward_seq *seqs;  /* [num_seqs], token ranges disjoint and in order */
    int num_seqs;
    /* Output: logits rows in the order of seqs and, within a sequence, of tokens;
     * (rows, vocab_size) floats where rows = sum of 1 per LAST seq and num_new per ALL seq. */
    float *logits;
} kvd_forward_batch;

typedef struct kvd_forward_ctx kvd_forward_ctx;

/* max_tokens: most tokens one batch will hold; max_seqs: most sequences; max_logit_rows:
 * most logits rows one batch will ask for. num_threads <= 0 means all cores. */
kvd_forward_ctx *kvd_forward_create(const kvd_model *model, kvd_kv_pool *pool, int max_tokens,
                                    int max_seqs, int max_logit_rows, int num_threads,
                                    kvd_error *err);
void kvd_forward_destroy(kvd_forward_ctx *ctx);

/* Runs the batch. Returns 0, or KVD_EINVAL (batch larger than the context was made
 * for, token id out of range, positions past max_position_embeddings, a sequence
 * whose table has not reserved its slots, a token outside every sequence's range).
 * Steps too small to gain from threads (a tiny model's decode) run on one thread;
 * the result never depends on the thread count. */
int kvd_forward(kvd_forward_ctx *ctx, const kvd_forward_batch *batch, kvd_error *err);

/* The thread count the context was made with (num_threads <= 0 resolved). */
int kvd_forward_num_threads(const kvd_forward_ctx *ctx);

/* Per-row work after a step (the engine's sampling) on the same threads: calls
 * fn(arg, item, thread) exactly once for each item in [0, num_items), handing items out
 * one at a time to up to kvd_forward_num_threads(ctx) threads (the caller is thread 0;
 * thread < kvd_forward_num_threads(ctx) picks per-thread scratch), and returns when all
 * are done. Which thread gets an item varies from run to run, so fn's result for an
 * item must depend on the item alone. One item, or a one-thread context, runs on the
 * caller. Not to be called from fn or during kvd_forward. */
typedef void (*kvd_forward_item_fn)(void *arg, int item, int thread);
void kvd_forward_for_each(kvd_forward_ctx *ctx, int num_items, kvd_forward_item_fn fn, void *arg);

/* With force, every step runs on all the context's threads however small it is
 * (tests use it to exercise the parallel paths on the tiny model). */
void kvd_forward_force_threads(kvd_forward_ctx *ctx, bool force);

/* Steps of up to max_tokens tokens (default and most: 16; 0: none) take the fused decode
 * stages (forward.c); the bits are the same either way (tests and benchmarks compare). */
void kvd_forward_set_fused_tokens(kvd_forward_ctx *ctx, int max_tokens);

#endif
