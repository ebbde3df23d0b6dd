/* engine.c - the engine: public API, engine thread, inbox/outbox, one step end to end.
 *
 * A step: take the inbox (new requests, cancellations) under the mutex; cancel what
 * was asked; plan the batch (scheduler.c); run one kvd_forward over every scheduled
 * sequence; register newly full blocks in the prefix cache; for each sequence whose
 * uncomputed tokens are all in, sample the next token (forking a request's choices at
 * the end of its prompt; the samples run on the forward's threads, sample_step.c), turn
 * each into an event in schedule order, retire finished sequences; then
 * append the step's events to the outbox and refresh the published stats under the
 * mutex, and call notify. The step itself runs without the mutex, so submit, cancel,
 * poll and stats never wait for model work.
 *
 * Memory: every step buffer (batch tokens, forward descriptors, logits rows, events)
 * is allocated at creation and every request's arrays at submit, so steps do not
 * malloc. The thread sleeps on a condition variable whenever nothing is waiting or
 * running, and wakes on submit, cancel or destroy.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine_internal.h"
#include "kvd/kvd_clock.h"
#include "kvd/kvd_hugemem.h"
#include "kvd/kvd_thread.h"

struct kvd_engine {
    const kvd_model *model;
    const kvd_tokenizer *tok;
    kvd_engine_config cfg;
    int vocab_size;
    kvd_kv_pool *pool;
    kvd_forward_ctx *fwd;
    eng_sampling *sampling;         /* this step's samples, run on the forward's threads */
    eng_scheduler sched;
    eng_event_pool *events;

    /* Step buffers (engine thread). */
    int32_t *batch_tokens;          /* (max_batched_tokens) */
    kvd_forward_seq *batch_seqs;    /* (max_num_seqs) */
    float *logits;                  /* (max_num_seqs, vocab) on huge pages: see kvd_hugemem.h */
    size_t logits_mapped;
    uint64_t *cancel_ids;           /* (cancel_cap) swapped with the shared array */
    int cancel_cap;
    kvd_event *step_head, *step_tail;
    eng_request *active;            /* requests taken from the inbox, not yet done */
    eng_request *done;              /* finished this step, freed at its end */
    int unadmitted_gone;            /* requests leaving the queue bound this step */
    uint64_t generation_tokens_total;
    uint64_t steps;
    uint64_t step_ns, forward_ns, schedule_ns, sample_ns;
    uint64_t batched_tokens_total;

    /* Shared with other threads, under lock. */
    pthread_mutex_t lock;
    pthread_cond_t work_cond;       /* the engine thread waits for work */
    pthread_cond_t event_cond;      /* kvd_engine_wait_events waits for events */
    eng_request *inbox_head, *inbox_tail;
    int inbox_len;
    uint64_t *shared_cancels;       /* (shared_cancel_cap) */
    int num_shared_cancels, shared_cancel_cap;
    kvd_event *out_head, *out_tail;
    bool disk_ready;                /* a disk load finished since the last intake */
    uint64_t next_id;
    int queued;                     /* submitted, not yet admitted: the max_queue bound */
    kvd_engine_stats stats;
    bool stopping;
    bool started;
    pthread_t thread;
    pthread_mutex_t step_lock;      /* held around each step on the engine thread */
    int step_waiters;               /* threads waiting for step_lock (under lock) */
    pthread_cond_t step_waiters_cond; /* signalled when one of them got it */

    void (*notify)(void *arg);
    void *notify_arg;
};

/* CLOCK_REALTIME, as pthread_cond_timedwait wants it. */
static struct timespec deadline_in(int timeout_ms)
{
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    return deadline;
}

/* ---- defaults ------------------------------------------------------------------ */

kvd_engine_config kvd_engine_config_default(void)
{
    kvd_engine_config cfg = KVD_ENGINE_CONFIG_DEFAULT;
    return cfg;
}

kvd_request_params kvd_request_params_default(const kvd_model *model)
{
    kvd_request_params p;
    memset(&p, 0, sizeof p);
    p.sampling = kvd_sampling_params_default();
    if (model) {
        const kvd_generation_defaults *g = &model->generation;
        p.sampling.temperature = g->do_sample ? g->temperature : 0.0f;
        p.sampling.top_p = g->top_p;
        p.sampling.top_k = g->top_k;
        p.sampling.min_p = g->min_p;
        p.sampling.repetition_penalty = g->repetition_penalty;
    }
    p.max_tokens = 16;
    p.n = 1;
    p.ignore_eos = false;
    p.skip_special_tokens = true;
    return p;
}

/* ---- creation ------------------------------------------------------------------ */

static int check_config(const kvd_engine_config *cfg, kvd_error *err)
{
    if (cfg->max_num_seqs < 1)
        return kvd_error_set(err, KVD_EINVAL, "engine config: max_num_seqs %d must be >= 1", cfg->max_num_seqs);
    if (cfg->max_batched_tokens < 1)
        return kvd_error_set(err, KVD_EINVAL, "engine config: max_batched_tokens %d must be >= 1",
                             cfg->max_batched_tokens);
    if (cfg->prefill_pack_tokens < 0)
        return kvd_error_set(err, KVD_EINVAL, "engine config: prefill_pack_tokens %d must be >= 0 (0 = no limit)",
                             cfg->prefill_pack_tokens);
    if (cfg->max_queue < 0)
        return kvd_error_set(err, KVD_EINVAL, "engine config: max_queue %d must be >= 0 (0 = unbounded)",
                             cfg->max_queue);
    if (!(cfg->watermark >= 0.0f && cfg->watermark < 1.0f))
        return kvd_error_set(err, KVD_EINVAL, "engine config: watermark %g must be in [0, 1)",
                             (double)cfg->watermark);
    return 0;
}

/* ---- the disk tier ------------------------------------------------------------- */

static void engine_warn(const kvd_engine *e, const char *msg)
{
    if (e->cfg.warn)
        e->cfg.warn(e->cfg.warn_arg, msg);
}

/* I/O thread: wakes the engine thread, whose intake takes the finished loads. */
static void on_disk_load_done(void *arg)
{
    kvd_engine *e = arg;
    pthread_mutex_lock(&e->lock);
    e->disk_ready = true;
    pthread_cond_signal(&e->work_cond);
    pthread_mutex_unlock(&e->lock);
}

/* Inside an allocation on the engine thread: the store copies the page and returns;
 * the file is written on its I/O thread. */
static void on_page_evicted(void *arg, const kvd_kv_page *page)
{
    kvd_engine *e = arg;
    (void)kvd_kvdisk_write(e->sched.disk, &page->key, page->tokens, page->data, false);
}

static void on_page_flushed(void *arg, const kvd_kv_page *page)
{
    kvd_engine *e = arg;
    (void)kvd_kvdisk_write(e->sched.disk, &page->key, page->tokens, page->data, true);
}

/* Fails only on memory; a directory that cannot be used leaves the engine without
 * the tier and a warning. */
static int disk_open(kvd_engine *e, kvd_error *err)
{
    const kvd_kv_config *kc = kvd_kv_pool_config(e->pool);
    kvd_kvdisk_config dc = {
        .dir = e->cfg.kv_disk_dir,
        .capacity_bytes = e->cfg.kv_disk_bytes,
        .fingerprint = kvd_kvdisk_fingerprint(e->model, e->tok, (int)kc->dtype, kc->block_size),
        .dtype = (int)kc->dtype,
        .block_size = kc->block_size,
        .page_bytes = kvd_kv_block_bytes(kc),
        .warn = e->cfg.warn,
        .warn_arg = e->cfg.warn_arg,
        .notify = on_disk_load_done,
        .notify_arg = e,
    };
    kvd_error derr = {0};
    e->sched.disk = kvd_kvdisk_open(&dc, &derr);
    if (!e->sched.disk) {
        if (derr.code == KVD_ENOMEM)
            return kvd_error_set(err, KVD_ENOMEM, "%s", derr.msg);
        char msg[sizeof derr.msg + 64];
        snprintf(msg, sizeof msg, "%s; running without the disk tier", derr.msg);
        engine_warn(e, msg);
        return 0;
    }
    e->sched.disk_keys_cap = e->model->config.max_position_embeddings / kc->block_size + 1;
    e->sched.disk_keys = malloc((size_t)e->sched.disk_keys_cap * sizeof *e->sched.disk_keys);
    e->sched.disk_dst = malloc((size_t)e->sched.disk_keys_cap * sizeof *e->sched.disk_dst);
    if (!e->sched.disk_keys || !e->sched.disk_dst)
        return kvd_error_set(err, KVD_ENOMEM, "engine: out of memory for the disk tier");
    kvd_kv_pool_set_evict_hook(e->pool, on_page_evicted, e);
    return 0;
}

kvd_engine *kvd_engine_create(const kvd_model *model, const kvd_tokenizer *tok,
                              const kvd_engine_config *cfg_in, void (*notify)(void *arg),
                              void *notify_arg, kvd_error *err)
{
    if (!model || !tok) {
        kvd_error_set(err, KVD_EINVAL, "engine: model and tokenizer are required");
        return NULL;
    }
    kvd_engine_config cfg = cfg_in ? *cfg_in : kvd_engine_config_default();
    if (check_config(&cfg, err) < 0)
        return NULL;
    kvd_engine *e = calloc(1, sizeof *e);
    if (!e) {
        kvd_error_set(err, KVD_ENOMEM, "engine: out of memory");
        return NULL;
    }
    e->model = model;
    e->tok = tok;
    e->cfg = cfg;
    e->vocab_size = model->config.vocab_size;
    e->notify = notify;
    e->notify_arg = notify_arg;
    e->next_id = 1;
    pthread_mutex_init(&e->lock, NULL);
    pthread_mutex_init(&e->step_lock, NULL);
    pthread_cond_init(&e->work_cond, NULL);
    pthread_cond_init(&e->step_waiters_cond, NULL);
    pthread_cond_init(&e->event_cond, NULL);

    kvd_kv_config kv = {
        .num_layers = model->config.num_layers,
        .num_kv_heads = model->config.num_kv_heads,
        .head_dim = model->config.head_dim,
        .block_size = cfg.block_size,
        .dtype = cfg.kv_dtype,
        .num_blocks = cfg.kv_num_blocks,
        .cache_bytes = cfg.kv_cache_bytes,
        .enable_prefix_cache = cfg.enable_prefix_cache,
    };
    e->pool = kvd_kv_pool_create(&kv, err);
    if (!e->pool)
        goto fail;
    e->fwd = kvd_forward_create(model, e->pool, cfg.max_batched_tokens, cfg.max_num_seqs, cfg.max_num_seqs,
                                cfg.num_threads, err);
    if (!e->fwd)
        goto fail;
    /* Rows past the tokenizer are padding without text: never sample them. */
    const int tok_ids = kvd_tokenizer_vocab_size(tok);
    /* At most max_num_seqs sequences run, forked choices included: one job each. */
    e->sampling = eng_sampling_create(&model->config, e->vocab_size, tok_ids < e->vocab_size ? tok_ids : e->vocab_size,
                                      kvd_forward_num_threads(e->fwd), cfg.max_num_seqs);
    /* Slabs for a few steps of every running sequence; stop strings up to 256 bytes fit. */
    e->events = eng_event_pool_create(4 * cfg.max_num_seqs + 64, kvd_tokenizer_max_token_bytes(tok) + 64 + 256);
    e->batch_tokens = malloc((size_t)cfg.max_batched_tokens * sizeof *e->batch_tokens);
    e->batch_seqs = malloc((size_t)cfg.max_num_seqs * sizeof *e->batch_seqs);
    /* Rows are first written when the batch first grows that wide, in the middle of a
     * step: with 4 KiB pages the first 49-sequence step of a burst spent 50 ms of each
     * forward thread in page faults. */
    e->logits = kvd_huge_alloc((size_t)cfg.max_num_seqs * (size_t)e->vocab_size * sizeof *e->logits,
                               &e->logits_mapped);
    e->sched.entries = malloc((size_t)cfg.max_num_seqs * sizeof *e->sched.entries);
    e->cancel_cap = 64;
    e->cancel_ids = malloc((size_t)e->cancel_cap * sizeof *e->cancel_ids);
    e->shared_cancel_cap = 64;
    e->shared_cancels = malloc((size_t)e->shared_cancel_cap * sizeof *e->shared_cancels);
    if (!e->sampling || !e->events || !e->batch_tokens || !e->batch_seqs || !e->logits ||
        !e->sched.entries || !e->cancel_ids || !e->shared_cancels) {
        kvd_error_set(err, KVD_ENOMEM, "engine: out of memory for step buffers (%d seqs x %d vocab logits)",
                      cfg.max_num_seqs, e->vocab_size);
        goto fail;
    }
    const kvd_kv_config *pool_cfg = kvd_kv_pool_config(e->pool);
    e->sched.pool = e->pool;
    e->sched.max_num_seqs = cfg.max_num_seqs;
    e->sched.max_batched_tokens = cfg.max_batched_tokens;
    e->sched.prefill_pack_tokens = cfg.prefill_pack_tokens > 0 ? cfg.prefill_pack_tokens : cfg.max_batched_tokens;
    e->sched.watermark_blocks = (int)((double)cfg.watermark * (double)pool_cfg->num_blocks + 0.999999);
    e->sched.prefix_cache = cfg.enable_prefix_cache;
    if (cfg.kv_disk_dir && cfg.kv_disk_dir[0] && cfg.enable_prefix_cache && disk_open(e, err) < 0)
        goto fail;
    /* Stats are valid before the first step (the pool's size, all blocks free). */
    kvd_kv_stats_get(e->pool, &e->stats.kv);
    e->stats.disk_configured = e->sched.disk != NULL;
    if (e->sched.disk)
        kvd_kvdisk_stats_get(e->sched.disk, &e->stats.disk);
    return e;

fail:
    kvd_engine_destroy(e);
    return NULL;
}

/* ---- events -------------------------------------------------------------------- */

static void step_event(kvd_engine *e, kvd_event *ev)
{
    ev->next = NULL;
    if (e->step_tail)
        e->step_tail->next = ev;
    else
        e->step_head = ev;
    e->step_tail = ev;
}

/* A closing event without a token (cancel, error). Dropped only if memory is gone. */
static void closing_event(kvd_engine *e, eng_seq *seq, kvd_finish_reason reason, const char *msg)
{
    kvd_event *ev = eng_event_new(e->events, 0, false, 0);
    if (!ev)
        return;
    eng_request *req = seq->req;
    ev->request_id = req->id;
    ev->choice = seq->choice;
    ev->finish = reason;
    ev->prompt_tokens = req->num_prompt;
    ev->cached_tokens = req->cached_tokens;
    ev->timing = eng_request_timing(req);
    ev->completion_tokens = seq->num_tokens > req->num_prompt ? seq->num_tokens - req->num_prompt : 0;
    if (msg)
        snprintf(ev->error, sizeof ev->error, "%s", msg);
    step_event(e, ev);
}

/* ---- request lifecycle (engine thread) ----------------------------------------- */

static void active_unlink(kvd_engine *e, eng_request *req)
{
    if (req->prev_active)
        req->prev_active->next_active = req->next_active;
    else
        e->active = req->next_active;
    if (req->next_active)
        req->next_active->prev_active = req->prev_active;
    req->prev_active = req->next_active = NULL;
}

static void request_done(kvd_engine *e, eng_request *req)
{
    active_unlink(e, req);
    req->next_inbox = e->done;
    e->done = req;
}

/* Takes a sequence out of its queue and gives its blocks back. */
static void seq_retire(kvd_engine *e, eng_seq *seq)
{
    if (seq->state == SEQ_RUNNING) {
        eng_list_remove(&e->sched.running, seq);
        e->sched.slots_used -= eng_seq_slots(seq);
    } else if (seq->state == SEQ_WAITING) {
        eng_list_remove(&e->sched.waiting, seq);
    }
    kvd_block_table_release(e->pool, &seq->table);
    seq->state = SEQ_FINISHED;
}

/* Ends every unfinished choice of a request with reason (cancel or error). */
static void request_abort(kvd_engine *e, eng_request *req, kvd_finish_reason reason, const char *msg)
{
    /* The I/O thread writes into the loading sequence's blocks: they cannot go back
     * before the load does. The request ends when it is back (a few milliseconds). */
    if (req->seqs[0].state == SEQ_LOADING) {
        req->abort_pending = reason;
        return;
    }
    if (!req->admitted)
        e->unadmitted_gone++;
    for (int c = 0; c < req->n; c++) {
        eng_seq *seq = &req->seqs[c];
        if (seq->state == SEQ_FINISHED)
            continue;
        seq_retire(e, seq);
        seq->finish = reason;
        closing_event(e, seq, reason, msg);
        req->num_unfinished--;
    }
    request_done(e, req);
}

static void seq_finished(kvd_engine *e, eng_seq *seq)
{
    seq_retire(e, seq);
    if (--seq->req->num_unfinished == 0)
        request_done(e, seq->req);
}

/* Choices 1..n-1 share choice 0's blocks from the end of the prompt on. */
static int fork_choices(kvd_engine *e, eng_request *req, kvd_error *err)
{
    eng_seq *first = &req->seqs[0];
    for (int c = 1; c < req->n; c++) {
        eng_seq *seq = &req->seqs[c];
        (void)kvd_block_table_reserve(e->pool, &seq->table, req->num_prompt + req->max_tokens, NULL);
        int rc = kvd_block_table_fork(e->pool, &first->table, &seq->table, err);
        if (rc < 0) {
            for (int k = 1; k < c; k++)
                kvd_block_table_release(e->pool, &req->seqs[k].table);
            return rc;
        }
    }
    /* All or nothing: only now do the choices become running sequences. */
    e->sched.slots_used -= eng_seq_slots(first);
    req->forked = true;
    e->sched.slots_used += 1;
    for (int c = 1; c < req->n; c++) {
        eng_seq *seq = &req->seqs[c];
        seq->num_computed = first->num_computed;
        seq->state = SEQ_RUNNING;
        eng_list_push_back(&e->sched.running, seq);
        e->sched.slots_used += 1;
    }
    return 0;
}

/* Turns a sampled job into seq's event, ends the choice if it is done. */
static void deliver_sample(kvd_engine *e, const eng_sample_job *job)
{
    eng_seq *seq = job->seq;
    eng_request *req = seq->req;
    kvd_event *ev = job->rc == 0 ? eng_event_new(e->events, 1, req->params.sampling.logprobs >= 0,
                                                 eng_seq_text_capacity(seq))
                                 : NULL;
    if (!ev) {
        /* Parameters were checked at submit, so only memory can fail here. */
        seq_retire(e, seq);
        seq->finish = KVD_FINISH_ERROR;
        closing_event(e, seq, KVD_FINISH_ERROR, job->rc < 0 ? "engine: sampling failed" : "engine: out of memory");
        if (--req->num_unfinished == 0)
            request_done(e, req);
        return;
    }
    e->generation_tokens_total++;
    kvd_finish_reason finish = eng_seq_accept_token(seq, &e->model->config, job->res.token, &job->res, ev);
    step_event(e, ev);
    if (finish != KVD_FINISH_NONE)
        seq_finished(e, seq);
}

/* Samples every queued job across the forward's threads, then delivers them in order. */
static void sample_queued(kvd_engine *e)
{
    eng_sampling_run(e->sampling, e->fwd);
    for (int i = 0; i < eng_sampling_num_jobs(e->sampling); i++)
        deliver_sample(e, eng_sampling_job(e->sampling, i));
    eng_sampling_clear(e->sampling);
}

static void queue_sample(kvd_engine *e, eng_seq *seq, float *row, bool copy)
{
    /* Never full (one job per running sequence), but if it were, empty it first. */
    if (!eng_sampling_add(e->sampling, seq, row, copy)) {
        sample_queued(e);
        (void)eng_sampling_add(e->sampling, seq, row, copy);
    }
}

/* Queues the samples row's logits give: seq's, or at the end of a prompt with n > 1
 * every choice's, each from its own copy (sampling rewrites the row with penalties). */
static void take_logits(kvd_engine *e, eng_seq *seq, float *row)
{
    eng_request *req = seq->req;
    if (req->forked) {
        queue_sample(e, seq, row, false);
        return;
    }
    kvd_error err = {0};
    if (fork_choices(e, req, &err) < 0) {
        request_abort(e, req, KVD_FINISH_ERROR, err.msg);
        return;
    }
    for (int c = 0; c < req->n; c++)
        queue_sample(e, &req->seqs[c], row, true);
}

static eng_request *find_active(kvd_engine *e, uint64_t id)
{
    for (eng_request *r = e->active; r; r = r->next_active)
        if (r->id == id)
            return r;
    return NULL;
}

/* ---- the step ------------------------------------------------------------------ */

static void publish(kvd_engine *e)
{
    kvd_event *events = e->step_head;
    kvd_event *events_tail = e->step_tail;
    e->step_head = e->step_tail = NULL;
    kvd_kv_stats kv;
    kvd_kv_stats_get(e->pool, &kv);

    pthread_mutex_lock(&e->lock);
    if (events) {
        if (e->out_tail)
            e->out_tail->next = events;
        else
            e->out_head = events;
        e->out_tail = events_tail;
        pthread_cond_broadcast(&e->event_cond);
    }
    e->queued -= e->unadmitted_gone + e->sched.fresh_admitted;
    e->unadmitted_gone = 0;
    e->sched.fresh_admitted = 0;
    kvd_engine_stats *st = &e->stats;
    st->num_running = e->sched.running.len;
    st->num_waiting = e->sched.waiting.len + e->sched.loading.len + e->inbox_len;
    st->num_loading = e->sched.loading.len;
    st->disk_configured = e->sched.disk != NULL;
    st->disk_queries = e->sched.disk_queries;
    st->disk_hits = e->sched.disk_hits;
    st->disk_misses = e->sched.disk_misses;
    st->disk_hit_tokens = e->sched.disk_hit_tokens;
    if (e->sched.disk)
        kvd_kvdisk_stats_get(e->sched.disk, &st->disk);
    st->num_preemptions = e->sched.num_preemptions;
    st->prompt_tokens_total = e->sched.prompt_tokens_total;
    st->generation_tokens_total = e->generation_tokens_total;
    st->steps = e->steps;
    st->kv = kv;
    st->step_ns = e->step_ns;
    st->forward_ns = e->forward_ns;
    st->schedule_ns = e->schedule_ns;
    st->sample_ns = e->sample_ns;
    st->batched_tokens_total = e->batched_tokens_total;
    pthread_mutex_unlock(&e->lock);

    if (events && e->notify)
        e->notify(e->notify_arg);
}

static void intake(kvd_engine *e)
{
    pthread_mutex_lock(&e->lock);
    eng_request *inbox = e->inbox_head;
    e->inbox_head = e->inbox_tail = NULL;
    /* Until this step publishes, count the taken requests as waiting (busy stays true). */
    e->stats.num_waiting += e->inbox_len;
    e->inbox_len = 0;
    uint64_t *cancels = e->shared_cancels;
    int num_cancels = e->num_shared_cancels, cap = e->shared_cancel_cap;
    e->shared_cancels = e->cancel_ids;
    e->shared_cancel_cap = e->cancel_cap;
    e->num_shared_cancels = 0;
    pthread_mutex_unlock(&e->lock);
    e->cancel_ids = cancels;
    e->cancel_cap = cap;
    e->disk_ready = false;

    while (inbox) {
        eng_request *req = inbox;
        inbox = req->next_inbox;
        req->next_inbox = NULL;
        req->next_active = e->active;
        req->prev_active = NULL;
        if (e->active)
            e->active->prev_active = req;
        e->active = req;
        eng_seq *first = &req->seqs[0];
        first->state = SEQ_WAITING;
        eng_list_push_back(&e->sched.waiting, first);
    }
    for (int i = 0; i < num_cancels; i++) {
        eng_request *req = find_active(e, e->cancel_ids[i]);
        if (req)
            request_abort(e, req, KVD_FINISH_CANCELLED, NULL);
    }
    if (!e->sched.disk)
        return;
    for (kvd_kvdisk_load *load = kvd_kvdisk_load_poll(e->sched.disk); load;) {
        kvd_kvdisk_load *next = load->next;
        eng_seq *seq = load->user;
        eng_load_finished(&e->sched, seq, load->pages_loaded);
        kvd_kvdisk_load_free(load);
        if (seq->req->abort_pending != KVD_FINISH_NONE)
            request_abort(e, seq->req, seq->req->abort_pending, NULL);
        load = next;
    }
}

static void free_done(kvd_engine *e)
{
    while (e->done) {
        eng_request *req = e->done;
        e->done = req->next_inbox;
        eng_request_destroy(e->pool, req);
    }
}

static int engine_step(kvd_engine *e, kvd_error *err)
{
    const uint64_t t0 = kvd_now_ns();
    e->sched.now_ns = t0;
    intake(e);
    eng_schedule(&e->sched);
    /* An abort retires the request's other choices too: rescan from the head. */
    for (eng_seq *seq = e->sched.running.head; seq;) {
        if (seq->sched_error) {
            request_abort(e, seq->req, KVD_FINISH_ERROR, "engine: out of memory growing a block table");
            seq = e->sched.running.head;
        } else {
            seq = seq->next;
        }
    }
    /* A request aborted above may have had a scheduled sequence: drop those entries. */
    int num_entries = 0;
    for (int i = 0; i < e->sched.num_entries; i++)
        if (e->sched.entries[i].seq->state == SEQ_RUNNING)
            e->sched.entries[num_entries++] = e->sched.entries[i];
    e->sched.num_entries = num_entries;

    const uint64_t t1 = kvd_now_ns();
    int rc = 0;
    kvd_error fwd_err = {0};
    int offset_total = 0;
    if (num_entries > 0) {
        int offset = 0;
        for (int i = 0; i < num_entries; i++) {
            const eng_sched_entry *en = &e->sched.entries[i];
            eng_seq *seq = en->seq;
            memcpy(e->batch_tokens + offset, seq->tokens + seq->num_computed, (size_t)en->num_new * sizeof(int32_t));
            e->batch_seqs[i] = (kvd_forward_seq){
                .table = &seq->table,
                .num_past = seq->num_computed,
                .num_new = en->num_new,
                .token_offset = offset,
                .logits = en->logits ? KVD_LOGITS_LAST : KVD_LOGITS_NONE,
            };
            offset += en->num_new;
        }
        kvd_forward_batch batch = {
            .tokens = e->batch_tokens,
            .num_tokens = offset,
            .seqs = e->batch_seqs,
            .num_seqs = num_entries,
            .logits = e->logits,
        };
        rc = kvd_forward(e->fwd, &batch, &fwd_err);
        e->batched_tokens_total += (uint64_t)offset;
        offset_total = offset;
    }
    const uint64_t t2 = kvd_now_ns();

    if (rc < 0) {
        char msg[sizeof fwd_err.msg + 32];
        snprintf(msg, sizeof msg, "engine: forward failed: %s", fwd_err.msg);
        kvd_error_set(err, rc, "%s", msg);
        for (int i = 0; i < num_entries; i++) {
            eng_seq *seq = e->sched.entries[i].seq;
            if (seq->state == SEQ_RUNNING)
                request_abort(e, seq->req, KVD_FINISH_ERROR, msg);
        }
    } else {
        int row = 0;
        for (int i = 0; i < num_entries; i++) {
            const eng_sched_entry *en = &e->sched.entries[i];
            eng_seq *seq = en->seq;
            if (seq->state != SEQ_RUNNING) {
                row += en->logits; /* its request was aborted by an earlier entry */
                continue;
            }
            seq->num_computed += en->num_new;
            kvd_prefix_cache_commit(e->pool, &seq->table, seq->tokens, seq->num_computed);
            eng_request *req = seq->req;
            if (!req->first_token_ns) {
                req->prefill_steps++;
                req->prefill_step_tokens += offset_total;
                if (en->logits)
                    req->first_token_ns = t2;
            }
            if (en->logits)
                take_logits(e, seq, e->logits + (size_t)row++ * (size_t)e->vocab_size);
        }
        sample_queued(e);
    }
    free_done(e);
    const uint64_t t3 = kvd_now_ns();
    if (num_entries > 0) {
        e->steps++;
        e->forward_ns += t2 - t1;
        e->schedule_ns += t1 - t0;
        e->sample_ns += t3 - t2;
        e->step_ns += t3 - t0;
    }
    publish(e);
    return rc < 0 ? rc : num_entries;
}

/* ---- threads ------------------------------------------------------------------- */

static bool has_input(const kvd_engine *e)
{
    return e->inbox_head || e->num_shared_cancels > 0 || e->disk_ready;
}

static void *engine_main(void *arg)
{
    kvd_engine *e = arg;
    bool keep_going = false; /* sequences remain and the last step made progress */
    for (;;) {
        pthread_mutex_lock(&e->lock);
        /* Mutexes are not fair: relocking step_lock right after a step would starve a
         * snapshot waiting for it (seen: /v1/kv unanswered for 30 s beside a stream once
         * steps took a few ms). Between steps, waiters go first. */
        while (e->step_waiters > 0)
            pthread_cond_wait(&e->step_waiters_cond, &e->lock);
        while (!e->stopping && !keep_going && !has_input(e))
            pthread_cond_wait(&e->work_cond, &e->lock);
        bool stop = e->stopping;
        pthread_mutex_unlock(&e->lock);
        if (stop)
            break;
        kvd_error err = {0};
        pthread_mutex_lock(&e->step_lock);
        const uint64_t preemptions = e->sched.num_preemptions;
        int ran = engine_step(e, &err);
        /* A step that only preempted ran nothing but changed the state: the next one
         * admits. A step that did neither cannot be followed by a different one until
         * new input arrives, so the thread sleeps. */
        keep_going = (ran != 0 || e->sched.num_preemptions != preemptions) &&
                     e->sched.running.len + e->sched.waiting.len > 0;
        pthread_mutex_unlock(&e->step_lock);
    }
    return NULL;
}

int kvd_engine_start(kvd_engine *e, kvd_error *err)
{
    pthread_mutex_lock(&e->lock);
    if (e->started) {
        pthread_mutex_unlock(&e->lock);
        return kvd_error_set(err, KVD_ESTATE, "engine: already started");
    }
    int rc = kvd_thread_start(&e->thread, engine_main, e);
    if (rc == 0)
        e->started = true;
    pthread_mutex_unlock(&e->lock);
    if (rc != 0)
        return kvd_error_set(err, KVD_ENOMEM, "engine: cannot start its thread: %s", strerror(rc));
    return 0;
}

int kvd_engine_step(kvd_engine *e, kvd_error *err)
{
    pthread_mutex_lock(&e->lock);
    bool started = e->started;
    pthread_mutex_unlock(&e->lock);
    if (started)
        return kvd_error_set(err, KVD_ESTATE, "engine: kvd_engine_step while the engine thread runs");
    /* Only loads can make progress (the queue's head may be waiting for the room they
     * free): the caller's loop would spin until they are back. */
    if (e->sched.loading.len > 0 && e->sched.running.len == 0) {
        struct timespec deadline = deadline_in(100);
        pthread_mutex_lock(&e->lock);
        while (!e->disk_ready && pthread_cond_timedwait(&e->work_cond, &e->lock, &deadline) != ETIMEDOUT)
            ;
        pthread_mutex_unlock(&e->lock);
    }
    return engine_step(e, err);
}

void kvd_engine_destroy(kvd_engine *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->lock);
    bool started = e->started;
    e->stopping = true;
    pthread_cond_broadcast(&e->work_cond);
    pthread_mutex_unlock(&e->lock);
    if (started)
        pthread_join(e->thread, NULL);

    /* The pages still in RAM go to disk, so a restart finds them; the store finishes
     * every queued write and load before it closes. */
    if (e->sched.disk) {
        kvd_kv_pool_for_each_page(e->pool, on_page_flushed, e);
        kvd_kvdisk_close(e->sched.disk);
        e->sched.disk = NULL;
    }
    free(e->sched.disk_keys);
    free(e->sched.disk_dst);

    /* Whatever is left is dropped without events: nobody will read them. */
    while (e->inbox_head) {
        eng_request *req = e->inbox_head;
        e->inbox_head = req->next_inbox;
        eng_request_destroy(e->pool, req);
    }
    while (e->active) {
        eng_request *req = e->active;
        active_unlink(e, req);
        for (int c = 0; c < req->n; c++)
            if (req->seqs[c].state != SEQ_FINISHED && e->pool)
                kvd_block_table_release(e->pool, &req->seqs[c].table);
        eng_request_destroy(e->pool, req);
    }
    kvd_event_free(e->step_head);
    kvd_event_free(e->out_head);
    eng_event_pool_release(e->events);
    kvd_forward_destroy(e->fwd);
    eng_sampling_destroy(e->sampling);
    kvd_kv_pool_destroy(e->pool);
    free(e->batch_tokens);
    free(e->batch_seqs);
    kvd_huge_free(e->logits, e->logits_mapped);
    free(e->sched.entries);
    free(e->cancel_ids);
    free(e->shared_cancels);
    pthread_cond_destroy(&e->work_cond);
    pthread_cond_destroy(&e->step_waiters_cond);
    pthread_cond_destroy(&e->event_cond);
    pthread_mutex_destroy(&e->step_lock);
    pthread_mutex_destroy(&e->lock);
    free(e);
}

/* ---- submit, cancel, events, stats (any thread) -------------------------------- */

static int check_request(const kvd_engine *e, const int32_t *prompt, int num_prompt,
                         const kvd_request_params *p, kvd_error *err)
{
    const int max_pos = e->model->config.max_position_embeddings;
    if (!prompt || num_prompt < 1)
        return kvd_error_set(err, KVD_EINVAL, "request: the prompt is empty");
    if (num_prompt + 1 > max_pos)
        return kvd_error_set(err, KVD_ETOOLONG,
                             "request: prompt of %d tokens leaves no room in the context of %d tokens "
                             "(prompt + 1 generated token must fit)",
                             num_prompt, max_pos);
    if (!kvd_kv_can_ever_fit(e->pool, num_prompt + 1)) {
        const kvd_kv_config *kc = kvd_kv_pool_config(e->pool);
        return kvd_error_set(err, KVD_ETOOLONG,
                             "request: prompt of %d tokens (+1) cannot fit in the whole KV pool of %zu blocks "
                             "x %d tokens = %zu tokens",
                             num_prompt, kc->num_blocks, kc->block_size, kc->num_blocks * (size_t)kc->block_size);
    }
    if (p->grammar && kvd_grammar_num_ids(p->grammar) != e->vocab_size)
        return kvd_error_set(err, KVD_EINVAL, "request: the grammar's masks are %d ids wide, the model's rows %d",
                             kvd_grammar_num_ids(p->grammar), e->vocab_size);
    for (int i = 0; i < num_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= e->vocab_size)
            return kvd_error_set(err, KVD_EINVAL, "request: prompt token %d at position %d is outside the vocabulary (%d)",
                                 prompt[i], i, e->vocab_size);
    if (p->max_tokens < 1)
        return kvd_error_set(err, KVD_EINVAL, "request: max_tokens %d must be >= 1", p->max_tokens);
    if (p->n < 1 || p->n > KVD_MAX_N || p->n > e->cfg.max_num_seqs)
        return kvd_error_set(err, KVD_EINVAL, "request: n %d must be in 1..%d", p->n,
                             KVD_MAX_N < e->cfg.max_num_seqs ? KVD_MAX_N : e->cfg.max_num_seqs);
    if (p->num_stop < 0 || p->num_stop > KVD_MAX_STOP_STRINGS || (p->num_stop > 0 && !p->stop))
        return kvd_error_set(err, KVD_EINVAL, "request: stop: %d strings, at most %d", p->num_stop,
                             KVD_MAX_STOP_STRINGS);
    for (int i = 0; i < p->num_stop; i++)
        if (!p->stop[i] || (p->stop_len ? p->stop_len[i] == 0 : !p->stop[i][0]))
            return kvd_error_set(err, KVD_EINVAL, "request: stop string %d is empty", i);
    if (p->num_stop_token_ids < 0 || p->num_stop_token_ids > KVD_MAX_STOP_TOKEN_IDS ||
        (p->num_stop_token_ids > 0 && !p->stop_token_ids))
        return kvd_error_set(err, KVD_EINVAL, "request: stop_token_ids: %d ids, at most %d",
                             p->num_stop_token_ids, KVD_MAX_STOP_TOKEN_IDS);
    for (int i = 0; i < p->num_stop_token_ids; i++)
        if (p->stop_token_ids[i] < 0 || p->stop_token_ids[i] >= e->vocab_size)
            return kvd_error_set(err, KVD_EINVAL, "request: stop_token_ids[%d] = %d is outside the vocabulary (%d)", i,
                                 p->stop_token_ids[i], e->vocab_size);
    int rc = kvd_sampling_params_check(&p->sampling, err);
    if (rc < 0)
        return rc;
    for (int i = 0; i < p->sampling.num_logit_bias; i++)
        if (p->sampling.logit_bias[i].token < 0 || p->sampling.logit_bias[i].token >= e->vocab_size)
            return kvd_error_set(err, KVD_EINVAL, "request: logit_bias token %d is outside the vocabulary (%d)",
                                 p->sampling.logit_bias[i].token, e->vocab_size);
    if (p->sampling.min_tokens > p->max_tokens)
        return kvd_error_set(err, KVD_EINVAL, "request: min_tokens %d must not exceed max_tokens %d",
                             p->sampling.min_tokens, p->max_tokens);
    return 0;
}

int64_t kvd_engine_submit(kvd_engine *e, const int32_t *prompt, int num_prompt, const kvd_request_params *params,
                          kvd_error *err)
{
    if (!params)
        return kvd_error_set(err, KVD_EINVAL, "request: no parameters");
    /* The pool's size and block size never change, so reading them here is safe. */
    int rc = check_request(e, prompt, num_prompt, params, err);
    if (rc < 0)
        return rc;
    const kvd_kv_config *kc = kvd_kv_pool_config(e->pool);
    const int64_t pool_tokens = (int64_t)kc->num_blocks * kc->block_size;
    int64_t max_tokens = params->max_tokens;
    const int64_t context_left = e->model->config.max_position_embeddings - num_prompt;
    if (max_tokens > context_left)
        max_tokens = context_left;
    if (max_tokens > pool_tokens - num_prompt)
        max_tokens = pool_tokens - num_prompt;

    pthread_mutex_lock(&e->lock);
    bool full = e->cfg.max_queue > 0 && e->queued >= e->cfg.max_queue;
    int queued = e->queued;
    pthread_mutex_unlock(&e->lock);
    if (full)
        return kvd_error_set(err, KVD_EBUSY, "engine: queue full (%d requests waiting, max_queue %d)", queued,
                             e->cfg.max_queue);

    eng_request *req = eng_request_create(prompt, num_prompt, params, (int)max_tokens, e->tok, &e->model->config, err);
    if (!req)
        return KVD_ENOMEM;

    pthread_mutex_lock(&e->lock);
    if (e->cfg.max_queue > 0 && e->queued >= e->cfg.max_queue) {
        /* Lost a race with another submitter. */
        pthread_mutex_unlock(&e->lock);
        eng_request_destroy(NULL, req);
        return kvd_error_set(err, KVD_EBUSY, "engine: queue full (max_queue %d)", e->cfg.max_queue);
    }
    req->id = e->next_id++;
    req->submit_ns = kvd_now_ns();
    if (e->inbox_tail)
        e->inbox_tail->next_inbox = req;
    else
        e->inbox_head = req;
    e->inbox_tail = req;
    e->inbox_len++;
    e->queued++;
    pthread_cond_signal(&e->work_cond);
    int64_t id = (int64_t)req->id;
    pthread_mutex_unlock(&e->lock);
    return id;
}

void kvd_engine_cancel(kvd_engine *e, uint64_t request_id)
{
    pthread_mutex_lock(&e->lock);
    if (e->num_shared_cancels == e->shared_cancel_cap) {
        int cap = e->shared_cancel_cap * 2;
        uint64_t *grown = realloc(e->shared_cancels, (size_t)cap * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&e->lock);
            return; /* out of memory: the request simply runs to its end */
        }
        e->shared_cancels = grown;
        e->shared_cancel_cap = cap;
    }
    e->shared_cancels[e->num_shared_cancels++] = request_id;
    pthread_cond_signal(&e->work_cond);
    pthread_mutex_unlock(&e->lock);
}

kvd_event *kvd_engine_poll_events(kvd_engine *e)
{
    pthread_mutex_lock(&e->lock);
    kvd_event *list = e->out_head;
    e->out_head = e->out_tail = NULL;
    pthread_mutex_unlock(&e->lock);
    return list;
}

void kvd_engine_wait_events(kvd_engine *e, int timeout_ms)
{
    struct timespec deadline = deadline_in(timeout_ms);
    pthread_mutex_lock(&e->lock);
    while (!e->out_head) {
        if (pthread_cond_timedwait(&e->event_cond, &e->lock, &deadline) == ETIMEDOUT)
            break;
    }
    pthread_mutex_unlock(&e->lock);
}

bool kvd_engine_busy(kvd_engine *e)
{
    pthread_mutex_lock(&e->lock);
    bool busy = e->inbox_head || e->num_shared_cancels > 0 || e->stats.num_running > 0 || e->stats.num_waiting > 0;
    pthread_mutex_unlock(&e->lock);
    return busy;
}

void kvd_engine_stats_get(kvd_engine *e, kvd_engine_stats *out)
{
    pthread_mutex_lock(&e->lock);
    *out = e->stats;
    out->num_waiting = e->stats.num_waiting + e->inbox_len;
    pthread_mutex_unlock(&e->lock);
}

/* ---- KV views (between steps) -------------------------------------------------- */

/* Waits out a running step (engine thread mode); without the thread the caller is
 * the only stepping thread and the lock is free. */
static void lock_steps(kvd_engine *e)
{
    pthread_mutex_lock(&e->lock);
    e->step_waiters++;
    pthread_mutex_unlock(&e->lock);
    pthread_mutex_lock(&e->step_lock);
    pthread_mutex_lock(&e->lock);
    e->step_waiters--;
    pthread_cond_broadcast(&e->step_waiters_cond);
    pthread_mutex_unlock(&e->lock);
}

static void unlock_steps(kvd_engine *e)
{
    pthread_mutex_unlock(&e->step_lock);
}

void kvd_kv_snapshot_deinit(kvd_kv_snapshot *snap)
{
    free(snap->states);
    free(snap->seqs);
    free(snap->block_ids);
    memset(snap, 0, sizeof *snap);
}

int kvd_engine_kv_snapshot(kvd_engine *e, kvd_kv_snapshot *out)
{
    memset(out, 0, sizeof *out);
    lock_steps(e);
    const kvd_kv_config *kc = kvd_kv_pool_config(e->pool);
    int num_seqs = 0, num_ids = 0;
    for (eng_seq *seq = e->sched.running.head; seq; seq = seq->next) {
        num_seqs++;
        num_ids += seq->table.num_blocks;
    }
    out->block_size = kc->block_size;
    out->num_blocks = (int)kc->num_blocks;
    out->states = malloc(out->num_blocks > 0 ? (size_t)out->num_blocks : 1);
    out->seqs = malloc((size_t)(num_seqs > 0 ? num_seqs : 1) * sizeof *out->seqs);
    out->block_ids = malloc((size_t)(num_ids > 0 ? num_ids : 1) * sizeof *out->block_ids);
    if (!out->states || !out->seqs || !out->block_ids) {
        unlock_steps(e);
        kvd_kv_snapshot_deinit(out);
        return KVD_ENOMEM;
    }
    kvd_kv_block_states(e->pool, out->states, NULL);
    int32_t *ids = out->block_ids;
    for (eng_seq *seq = e->sched.running.head; seq; seq = seq->next) {
        kvd_kv_seq_view *v = &out->seqs[out->num_seqs++];
        *v = (kvd_kv_seq_view){.request_id = seq->req->id,
                               .choice = seq->choice,
                               .num_tokens = seq->table.num_tokens,
                               .num_computed = seq->num_computed,
                               .num_blocks = seq->table.num_blocks,
                               .blocks = ids};
        memcpy(ids, seq->table.blocks, (size_t)seq->table.num_blocks * sizeof *ids);
        ids += seq->table.num_blocks;
    }
    kvd_engine_stats_get(e, &out->stats);
    unlock_steps(e);
    return 0;
}

int kvd_engine_check_invariants(kvd_engine *e, kvd_error *err)
{
    lock_steps(e);
    int count = 0;
    for (eng_request *r = e->active; r; r = r->next_active)
        count += r->n;
    const kvd_block_table **tables = malloc((size_t)(count > 0 ? count : 1) * sizeof *tables);
    if (!tables) {
        unlock_steps(e);
        return kvd_error_set(err, KVD_ENOMEM, "engine: out of memory");
    }
    int k = 0;
    for (eng_request *r = e->active; r; r = r->next_active)
        for (int c = 0; c < r->n; c++)
            if (r->seqs[c].table.num_blocks > 0)
                tables[k++] = &r->seqs[c].table;
    int rc = kvd_kv_check_invariants(e->pool, tables, k, err);
    unlock_steps(e);
    free(tables);
    return rc;
}
