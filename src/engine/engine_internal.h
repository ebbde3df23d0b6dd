/* engine_internal.h - the engine's private types: requests, sequences, events, queues.
 *
 * A request is what a client asked for (prompt, params, n choices); a sequence is one
 * choice's life in the KV cache (block table, tokens, rng, detokenizer, pending text).
 * A request with n > 1 starts as one sequence (choice 0) that prefills the prompt; when
 * the prompt's last logits exist the other choices fork its block table and each draws
 * from its own rng stream. Sequences sit in exactly one of two intrusive lists, waiting
 * or running, both in admission order. Everything here belongs to the engine thread
 * except the inbox, the outbox and the published stats, which the mutex guards.
 */
#ifndef KVD_ENGINE_INTERNAL_H
#define KVD_ENGINE_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_engine.h"
#include "kvd/kvd_forward.h"

typedef struct eng_request eng_request;

typedef enum eng_seq_state {
    SEQ_IDLE = 0,  /* a choice > 0 before its fork */
    SEQ_WAITING,
    SEQ_RUNNING,
    SEQ_LOADING,   /* admitted, its prefix's pages being read from disk into its blocks */
    SEQ_FINISHED,
} eng_seq_state;

typedef struct eng_seq {
    eng_request *req;
    int choice;
    eng_seq_state state;
    struct eng_seq *prev, *next; /* waiting or running list */
    kvd_block_table table;
    int32_t *tokens;             /* (num_prompt + max_tokens) prompt, then output */
    int num_tokens;
    int num_computed;            /* positions whose K/V are in the cache */
    kvd_rng rng;
    kvd_detokenizer detok;
    char *text;                  /* (text_cap) decoded but undelivered: held back for stop strings */
    size_t text_len;
    size_t text_cap;
    kvd_finish_reason finish;
    kvd_grammar_matcher *grammar; /* structured output: where the choice is in its grammar */
    /* This step's schedule. */
    bool scheduled;
    int sched_tokens;
    int sched_error;             /* KVD_ENOMEM growing its table: the engine fails the request */
    bool load_first_admission;   /* the load decides the request's cached_tokens */
} eng_seq;

struct eng_request {
    uint64_t id;
    eng_request *next_inbox;
    eng_request *prev_active, *next_active;
    int32_t *prompt;             /* (num_prompt) */
    int num_prompt;
    kvd_request_params params;   /* its pointers point at the copies below */
    char **stop;                 /* (num_stop) copies of stop_len bytes (plus a NUL) */
    size_t *stop_len;
    size_t max_stop_len;
    int32_t *stop_ids;           /* (num_stop_token_ids) */
    kvd_logit_bias *logit_bias;  /* (sampling.num_logit_bias) */
    int32_t *min_tokens_ids;     /* stop ids, then EOS ids unless ignore_eos: masked before min_tokens */
    int max_tokens;              /* capped by context and pool */
    int n;
    bool forked;                 /* choices > 0 exist (always true when n == 1) */
    bool admitted;               /* counted once in the prompt-token stats */
    int cached_tokens;
    /* Engine-clock times of its first token's path (kvd_event's queue/load/prefill). */
    uint64_t submit_ns, admit_ns, loaded_ns, first_token_ns;
    int prefill_steps, prefill_step_tokens;
    int num_unfinished;
    kvd_finish_reason abort_pending; /* cancelled while loading: ends once the load is back */
    eng_seq *seqs;               /* (n) */
};

/* ---- events (events.c) ---------------------------------------------------------- */

typedef struct eng_event_pool eng_event_pool;

/* A pool of preallocated event slabs, each holding one event with up to one token,
 * its logprobs and text_cap bytes of text, so delivering a token never mallocs while
 * the consumer keeps up. Larger or surplus events fall back to malloc. The pool
 * outlives the engine until the last pooled event is freed. */
eng_event_pool *eng_event_pool_create(int num_slabs, size_t text_cap);
/* The engine lets go; the pool frees itself once every event is back. */
void eng_event_pool_release(eng_event_pool *pool);
/* A zeroed event with room for num_tokens (0 or 1) tokens, their logprobs if
 * with_logprobs, and text_len bytes of text plus NUL. NULL on ENOMEM or num_tokens > 1. */
kvd_event *eng_event_new(eng_event_pool *pool, int num_tokens, bool with_logprobs, size_t text_len);

/* ---- sequences and text (sequence.c) -------------------------------------------- */

/* Builds a request from validated inputs; seqs and buffers sized for max_tokens. */
eng_request *eng_request_create(const int32_t *prompt, int num_prompt, const kvd_request_params *params,
                                int max_tokens, const kvd_tokenizer *tok, const kvd_model_config *mcfg,
                                kvd_error *err);
/* Frees a request; its tables must already be released. */
void eng_request_destroy(kvd_kv_pool *pool, eng_request *req);

/* Takes a sampled token: appends it, decodes its text, matches stop ids, EOS, stop
 * strings and max_tokens, and fills ev (whose text has room for seq->text_cap bytes)
 * with the token, its logprob, the deliverable text delta and the finish reason.
 * Returns the finish reason (NONE while the choice goes on). */
kvd_finish_reason eng_seq_accept_token(eng_seq *seq, const kvd_model_config *mcfg, int32_t token,
                                       const kvd_sample_result *sample, kvd_event *ev);

/* The request's first-token timing so far (kvd_event's timing). */
kvd_request_timing eng_request_timing(const eng_request *req);

/* Bytes of text an accept may deliver at most: the event text capacity to ask for. */
size_t eng_seq_text_capacity(const eng_seq *seq);

/* ---- queues (scheduler.c) ------------------------------------------------------- */

typedef struct eng_list {
    eng_seq *head, *tail;
    int len;
} eng_list;

void eng_list_push_back(eng_list *list, eng_seq *seq);
void eng_list_push_front(eng_list *list, eng_seq *seq);
void eng_list_remove(eng_list *list, eng_seq *seq);

typedef struct eng_sched_entry {
    eng_seq *seq;
    int num_new;
    bool logits;
} eng_sched_entry;

typedef struct eng_scheduler {
    kvd_kv_pool *pool;
    eng_list waiting;
    eng_list running;
    int max_num_seqs;
    int max_batched_tokens;
    int prefill_pack_tokens;      /* no further prompt joins a step with this many prefill tokens */
    int watermark_blocks;
    bool prefix_cache;
    int slots_used;               /* running sequences plus slots kept for unforked choices */
    uint64_t num_preemptions;
    uint64_t now_ns;              /* when the step began: stamps admissions and loads */
    uint64_t prompt_tokens_total;
    int fresh_admitted;           /* requests admitted for the first time (for the queue bound) */
    /* The disk tier (NULL: none). Loading sequences hold their slots and blocks but sit
     * in neither queue, so nothing preempts or schedules them until their pages are in. */
    kvd_kvdisk *disk;
    eng_list loading;
    kvd_kv_page_key *disk_keys;   /* (disk_keys_cap) scratch of one admission */
    void **disk_dst;              /* (disk_keys_cap) */
    int disk_keys_cap;
    uint64_t disk_queries, disk_hits, disk_misses, disk_hit_tokens;
    eng_sched_entry *entries;     /* (max_num_seqs) this step's schedule */
    int num_entries;
    int num_tokens;
} eng_scheduler;

/* Slots a sequence takes when running: n for a request's first sequence before the
 * fork (its choices will need them), else 1. */
int eng_seq_slots(const eng_seq *seq);

/* Plans one step into s->entries: decodes of running sequences first (oldest first),
 * then their prefill chunks, then admissions from the waiting queue (FCFS, prefix
 * cache lookup, watermark) unless this step preempted someone; prefills stop joining
 * once the step holds prefill_pack_tokens of them. Reserves the K/V
 * slots of every scheduled token. Returns the number of entries. */
int eng_schedule(eng_scheduler *s);

/* A load came back: the pages confirmed join the prefix cache, the rest of the
 * blocks go back, and the sequence runs from there (its prefill starts after them). */
void eng_load_finished(eng_scheduler *s, eng_seq *seq, int pages_loaded);

/* Takes a running sequence out: releases its blocks (full ones stay cached), forgets
 * what was computed and puts it at the front of the waiting queue. */
void eng_preempt(eng_scheduler *s, eng_seq *seq);

#endif
