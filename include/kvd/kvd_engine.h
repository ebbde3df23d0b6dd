/* kvd_engine.h - continuous batching of many requests over one shared model.
 *
 * The engine owns the model's forward context, the KV pool, the scheduler and the
 * sequences. Each step admits waiting requests while KV blocks allow, packs one
 * decode token of every running sequence plus prefill chunks of new ones under a
 * token budget, runs one batched forward pass, samples, and emits token events.
 * When blocks run out, the most recently admitted sequence is preempted (its blocks
 * freed, full ones staying in the prefix cache) and recomputed later: its output is
 * the same as if it had never been interrupted.
 *
 * Threads: kvd_engine_start() runs steps on the engine's own thread. submit, cancel,
 * poll_events and stats are safe from any thread. Without start(), the owner drives
 * the engine with kvd_engine_step() from a single thread (tests, one-shot tools).
 * Requests are named by 64-bit ids, never by pointer. Events carry ownership: whoever
 * takes them from kvd_engine_poll_events frees them with kvd_event_free.
 */
#ifndef KVD_ENGINE_H
#define KVD_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_error.h"
#include "kvd/kvd_grammar.h"
#include "kvd/kvd_kv.h"
#include "kvd/kvd_kvdisk.h"
#include "kvd/kvd_model.h"
#include "kvd/kvd_sampler.h"
#include "kvd/kvd_tokenizer.h"

typedef struct kvd_engine_config {
    int block_size;            /* default 16 */
    kvd_dtype kv_dtype;        /* default F16 */
    size_t kv_cache_bytes;     /* KV pool budget (used when kv_num_blocks == 0) */
    size_t kv_num_blocks;      /* exact pool size in blocks, overrides kv_cache_bytes */
    bool enable_prefix_cache;  /* default true */
    int max_num_seqs;          /* running sequences at once, default 64 */
    int max_batched_tokens;    /* tokens per step, default 512 */
    /* A step takes no further prompt once its prefill chunks hold this many tokens
     * (the first always runs; 0: fill max_batched_tokens), default 128. From about that
     * size a step's time grows with its tokens, so packing more prompts in gains no
     * throughput and only makes each one wait for all before its first token. */
    int prefill_pack_tokens;
    int max_queue;             /* waiting requests before submit says KVD_EBUSY; 0 = unbounded */
    int num_threads;           /* compute threads, <= 0: all cores */
    float watermark;           /* share of blocks kept free when admitting, default 0.01 */
    /* The disk tier (kvd_kvdisk.h): NULL or "" for none. Pages the prefix cache evicts
     * are written there, prefixes that miss in RAM are loaded from there, and the pages
     * still in RAM are written at destroy, so a restart finds them. If the directory
     * cannot be used the engine runs without the tier and says why through warn. */
    const char *kv_disk_dir;
    uint64_t kv_disk_bytes;    /* its capacity (required with kv_disk_dir) */
    void (*warn)(void *arg, const char *msg); /* one-line warnings, any thread; may be NULL */
    void *warn_arg;
} kvd_engine_config;

/* The one place the engine's defaults are written down: kvd_engine_config_default()
 * and the daemon's configuration (server/config.c) both start from it. */
#define KVD_ENGINE_CONFIG_DEFAULT                                                                  \
    {                                                                                              \
        .block_size = 16, .kv_dtype = KVD_DTYPE_F16, .kv_cache_bytes = (size_t)512 << 20,          \
        .kv_num_blocks = 0, .enable_prefix_cache = true, .max_num_seqs = 64,                       \
        .max_batched_tokens = 512, .prefill_pack_tokens = 128, .max_queue = 256, .num_threads = 0, \
        .watermark = 0.01f,                                                                        \
    }

kvd_engine_config kvd_engine_config_default(void);

#define KVD_MAX_STOP_STRINGS 16
/* A request's stop ids in all: a client's (the server takes up to 64) plus a chat
 * template's turn-ending ids. */
#define KVD_MAX_STOP_TOKEN_IDS 128
#define KVD_MAX_N 16

/* Choice i of a request samples from kvd_rng_seed_stream(sampling.seed, i), so choices
 * differ from each other and from every choice of every other seed; choice 0 is the
 * plain seed. Stop token ids and EOS are part of the choice's tokens but not of its
 * text; a stop string is cut from the text (both kept with include_stop_str_in_output).
 * min_tokens (sampling.min_tokens): until that many tokens exist, stop ids and EOS are
 * masked out of sampling (the engine fills sampling.min_tokens_stop_ids itself) and no
 * stop rule ends the choice, as vLLM does; it must not exceed max_tokens. */
typedef struct kvd_request_params {
    kvd_sampling_params sampling;
    int max_tokens;            /* > 0; capped by the context left after the prompt and
                                  by what one sequence can hold in the whole KV pool */
    int n;                     /* choices, 1..KVD_MAX_N (and <= max_num_seqs); they share
                                  the prompt's blocks */
    bool ignore_eos;           /* keep going past EOS ids (stop_token_ids still stop) */
    bool skip_special_tokens;  /* leave special tokens out of the text (default true) */
    const char *const *stop;   /* stop strings (copied at submit) */
    const size_t *stop_len;    /* their byte lengths (they may hold NULs); NULL: up to each NUL */
    int num_stop;
    bool include_stop_str_in_output; /* keep the matched stop string (and a stop id's text) */
    const int32_t *stop_token_ids; /* copied at submit */
    int num_stop_token_ids;
    /* Structured output: NULL, or a compiled grammar every choice must follow (the
     * engine holds a reference while the request lives). Each step a choice may only
     * draw what its grammar allows, EOS and stop ids only where the grammar may end;
     * the choice finishes with "stop" as soon as the grammar is complete. */
    kvd_grammar *grammar;
} kvd_request_params;

/* Default params: the model's generation defaults, max_tokens 16, n 1. */
kvd_request_params kvd_request_params_default(const kvd_model *model);

typedef enum kvd_finish_reason {
    KVD_FINISH_NONE = 0,
    KVD_FINISH_STOP,      /* EOS, a stop token id or a stop string */
    KVD_FINISH_LENGTH,    /* max_tokens or the context limit */
    KVD_FINISH_CANCELLED, /* kvd_engine_cancel */
    KVD_FINISH_ERROR,
    KVD_FINISH_COUNT,
} kvd_finish_reason;

/* The one name table: what OpenAI responses, the log and /metrics say ("abort" for a
 * cancelled choice, as vLLM reports it). */
static inline const char *kvd_finish_reason_name(kvd_finish_reason reason)
{
    static const char *const names[KVD_FINISH_COUNT] = {"none", "stop", "length", "abort", "error"};
    return (unsigned)reason < KVD_FINISH_COUNT ? names[reason] : "unknown";
}

typedef struct kvd_token_logprob {
    int32_t token;
    float logprob;
    int num_top;
    int32_t top_tokens[KVD_MAX_TOP_LOGPROBS];
    float top_logprobs[KVD_MAX_TOP_LOGPROBS];
} kvd_token_logprob;

/* Where a request's time to first token went, on the engine's clock (0 until
 * reached): submit to admission (waiting in the queue, including for the step in
 * flight to end), admission to its disk pages being in RAM (0 without a load), and from
 * there to the first token (the prefill steps of its uncached prompt, and of whatever
 * shared those steps with it). */
typedef struct kvd_request_timing {
    float queue_ms, load_ms, prefill_ms;
    int prefill_steps;          /* steps its prompt ran in */
    int prefill_step_tokens;    /* tokens of those steps, its own and the others' */
} kvd_request_timing;

/* One delivery for one choice of one request: new tokens and their text delta, and,
 * on the last event of a choice, its finish reason. Text never splits a UTF-8
 * character and never contains (part of) a matched stop string. */
typedef struct kvd_event {
    struct kvd_event *next;
    uint64_t request_id;
    int choice;                 /* 0..n-1 */
    int num_tokens;             /* tokens generated since the previous event */
    int32_t *tokens;            /* [num_tokens] */
    kvd_token_logprob *logprobs;/* [num_tokens] when logprobs were requested, else NULL */
    char *text;                 /* NUL-terminated delta */
    size_t text_len;
    kvd_finish_reason finish;   /* NONE until the choice's last event */
    int prompt_tokens;          /* set on every event */
    int cached_tokens;          /* prompt tokens served from the prefix cache (RAM or disk) */
    int completion_tokens;      /* tokens generated so far by this choice */
    kvd_request_timing timing;  /* set on every event */
    char error[256];            /* with KVD_FINISH_ERROR */
} kvd_event;

/* Frees a whole list of events (only events from kvd_engine_poll_events: they may
 * live in the engine's preallocated pool, which they may outlive). */
void kvd_event_free(kvd_event *list);

typedef struct kvd_engine_stats {
    int num_running;
    int num_waiting;
    uint64_t num_preemptions;
    uint64_t prompt_tokens_total;      /* prompt tokens of admitted requests */
    uint64_t generation_tokens_total;
    uint64_t steps;
    kvd_kv_stats kv;
    /* Where step time went (sums over all steps, nanoseconds): the batched forward,
     * scheduling (intake, cancellation, planning, preemption, prefix commits), and
     * sampling with detokenisation and event building. */
    uint64_t step_ns;
    uint64_t forward_ns;
    uint64_t schedule_ns;
    uint64_t sample_ns;
    uint64_t batched_tokens_total;     /* tokens through the forward (prefill + decode) */
    /* The disk tier (all zero without one). A query is an admission whose prompt had
     * full blocks beyond the RAM hit; a hit loaded at least one page for it. */
    bool disk_configured;              /* the tier was asked for and opened */
    int num_loading;                   /* sequences waiting for their pages (counted in num_waiting) */
    uint64_t disk_queries;
    uint64_t disk_hits;
    uint64_t disk_misses;
    uint64_t disk_hit_tokens;          /* prompt tokens served from disk (part of cached_tokens) */
    kvd_kvdisk_stats disk;
} kvd_engine_stats;

typedef struct kvd_engine kvd_engine;

/* notify(arg) is called from the engine thread after events were queued (for
 * uv_async_send); may be NULL. The engine borrows model and tokenizer. */
kvd_engine *kvd_engine_create(const kvd_model *model, const kvd_tokenizer *tok,
                              const kvd_engine_config *cfg, void (*notify)(void *arg),
                              void *notify_arg, kvd_error *err);
/* Stops the thread if started, cancels everything, frees all. NULL does nothing. */
void kvd_engine_destroy(kvd_engine *engine);

int kvd_engine_start(kvd_engine *engine, kvd_error *err);

/* Queues a request. Returns its id (> 0), or a negative code with err set:
 * KVD_ETOOLONG when the prompt (plus one token) exceeds the context or the whole KV
 * pool, KVD_EBUSY when the waiting queue is full, KVD_EINVAL on bad params. */
int64_t kvd_engine_submit(kvd_engine *engine, const int32_t *prompt, int num_prompt,
                          const kvd_request_params *params, kvd_error *err);

/* Cancels a request (all its choices) at the next step boundary; its blocks go back
 * to the pool and each unfinished choice gets a KVD_FINISH_CANCELLED event. Unknown
 * or finished ids are ignored. */
void kvd_engine_cancel(kvd_engine *engine, uint64_t request_id);

/* Takes every queued event (oldest first) and returns the list, or NULL. */
kvd_event *kvd_engine_poll_events(kvd_engine *engine);

/* Blocks until an event is queued or timeout_ms passes (for callers without a loop). */
void kvd_engine_wait_events(kvd_engine *engine, int timeout_ms);

/* One scheduling step when the engine thread is not started. Returns the number of
 * sequences that ran (0 when idle) or a negative code. */
int kvd_engine_step(kvd_engine *engine, kvd_error *err);

/* True while any request is waiting or running. */
bool kvd_engine_busy(kvd_engine *engine);

void kvd_engine_stats_get(kvd_engine *engine, kvd_engine_stats *out);

/* One running sequence of a KV snapshot. */
typedef struct kvd_kv_seq_view {
    uint64_t request_id;
    int choice;
    int num_tokens;
    int num_computed;
    int num_blocks;
    const int32_t *blocks;     /* [num_blocks] physical ids, inside the snapshot's block_ids */
} kvd_kv_seq_view;

/* The KV pool at one step boundary, for the /v1/kv view. Owned by the caller
 * (kvd_kv_snapshot_deinit); any thread may read it. */
typedef struct kvd_kv_snapshot {
    int block_size;
    int num_blocks;            /* the pool's size */
    uint8_t *states;           /* [num_blocks], see kvd_kv_block_states */
    int num_seqs;
    kvd_kv_seq_view *seqs;     /* [num_seqs], the running sequences */
    int32_t *block_ids;        /* every sequence's table, back to back */
    kvd_engine_stats stats;    /* taken in the same pause */
} kvd_kv_snapshot;

/* Fills *out (overwritten; deinit it afterwards either way). With the engine thread
 * started this waits for the current step to end (one step, tens of milliseconds at
 * most), so call it where a short wait is acceptable (a worker thread). Returns 0 or
 * KVD_ENOMEM. */
int kvd_engine_kv_snapshot(kvd_engine *engine, kvd_kv_snapshot *out);
void kvd_kv_snapshot_deinit(kvd_kv_snapshot *snap);

/* Debug check (tests): runs kvd_kv_check_invariants over the pool with every live
 * sequence's block table, between steps. Returns 0 or KVD_ESTATE with err set. */
int kvd_engine_check_invariants(kvd_engine *engine, kvd_error *err);

#endif
