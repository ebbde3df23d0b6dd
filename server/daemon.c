/* daemon.c - the daemon's lifecycle: listen, load, serve, drain, stop.
 *
 * The socket is bound before the model loads (on a libuv worker thread), so /health
 * can answer 503 while loading and a supervisor sees the port at once. The engine
 * thread reaches the loop only through uv_async_send; sends coalesce, so the async
 * callback always drains the whole event queue. Shutdown order matters: the HTTP
 * server closes first (its on_abort callbacks still cancel through a live engine),
 * the loop then runs dry with the async handle unreferenced, and only after uv_run
 * returns is the engine destroyed (joining its thread), so no notify can hit a
 * closed handle.
 */
#include "daemon.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <malloc.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvd/kvd_kernels.h"
#include "kvd/kvd_thread.h"

/* ---- engine bridge ---- */

/* The engine's warnings (the disk tier: DIR unusable, files ignored, tier off). */
static void engine_warn(void *arg, const char *msg)
{
    kvd_daemon *d = arg;
    kvd_log(&d->log, KVD_LOG_WARN, "%s", msg);
}

static void engine_notify(void *arg)
{
    kvd_daemon *d = arg;
    uv_async_send(&d->engine_async);
}

static void on_engine_async(uv_async_t *handle)
{
    kvd_daemon *d = handle->data;
    if (!d->engine)
        return;
    kvd_event *events = kvd_engine_poll_events(d->engine);
    if (events)
        kvd_jobs_on_events(&d->jobs, events);
}

/* Measures the loop thread's own CPU time per iteration (what it spent in callbacks,
 * never time it waited in epoll or was descheduled), so stalls the daemon causes can
 * be told from a busy machine's. */
static void on_loop_prepare(uv_prepare_t *handle)
{
    kvd_daemon *d = handle->data;
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    double now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    if (d->loop_cpu_seen) {
        double spent = now - d->loop_cpu;
        kvd_histogram_observe(&d->metrics.loop_iteration_cpu, spent, 1);
        if (spent > d->metrics.loop_iteration_cpu_max)
            d->metrics.loop_iteration_cpu_max = spent;
    }
    d->loop_cpu = now;
    d->loop_cpu_seen = true;
}

/* ---- lifecycle ---- */

static void daemon_shutdown(kvd_daemon *d);

/* The loader's own state, on the heap and shared with the loader thread under its
 * lock: a loader still blocked when the daemon stops (a FIFO for a checkpoint file, a
 * stalled network mount) is abandoned, frees what it made when it finishes, and never
 * writes into the daemon after that. */
struct kvd_loader {
    uv_mutex_t lock;
    pthread_t thread;
    bool done;              /* finished: the results below are final, notify was sent */
    bool abandoned;         /* the daemon stopped first */
    uv_async_t *notify;     /* the daemon's load_async, sent under the lock */
    kvd_server_config cfg;
    void (*engine_notify)(void *arg);
    void *engine_notify_arg;
    kvd_tokenizer *tok;
    kvd_model *model;
    kvd_chat_template *chat_template;
    kvd_grammar_cache *grammars; /* structured output: compiled grammars by source */
    kvd_engine *engine;     /* created, not started: its thread would notify the daemon */
    kvd_error err;
    int rc;
};

static void loader_free_results(kvd_loader *l)
{
    kvd_engine_destroy(l->engine);
    kvd_grammar_cache_destroy(l->grammars);
    kvd_chat_template_destroy(l->chat_template);
    kvd_model_destroy(l->model);
    kvd_tokenizer_destroy(l->tok);
    l->engine = NULL;
    l->chat_template = NULL;
    l->grammars = NULL;
    l->model = NULL;
    l->tok = NULL;
}

static void load_model(kvd_loader *l)
{
    const kvd_server_config *cfg = &l->cfg;
    l->tok = kvd_tokenizer_load_model(cfg->model, &l->err);
    if (!l->tok) {
        l->rc = l->err.code ? l->err.code : KVD_EIO;
        return;
    }
    /* Small checkpoints load in milliseconds: progress lines would only be noise. */
    kvd_model_load_options opts = {.progress = true, .progress_min_bytes = 64u << 20,
                                   .quantize = cfg->quantize[0] ? cfg->quantize : NULL,
                                   .threads = cfg->threads > 0 ? cfg->threads
                                                               : (int)sysconf(_SC_NPROCESSORS_ONLN)};
    l->model = kvd_model_load(cfg->model, &opts, &l->err);
    if (!l->model) {
        l->rc = l->err.code ? l->err.code : KVD_EIO;
        return;
    }
    /* The chat template is parsed now, so a template kvd cannot run stops the start,
     * not the first chat request. */
    l->chat_template = kvd_chat_template_load(cfg->chat_template, l->model->chat_template, cfg->model, &l->err);
    if (!l->chat_template) {
        l->rc = l->err.code ? l->err.code : KVD_EINVAL;
        return;
    }
    kvd_engine_config ecfg = kvd_engine_config_default();
    ecfg.block_size = cfg->block_size;
    ecfg.kv_dtype = cfg->kv_dtype;
    ecfg.kv_cache_bytes = (size_t)cfg->kv_cache_bytes;
    ecfg.kv_num_blocks = (size_t)cfg->kv_num_blocks;
    ecfg.enable_prefix_cache = cfg->enable_prefix_cache;
    ecfg.max_num_seqs = cfg->max_num_seqs;
    ecfg.max_batched_tokens = cfg->max_batched_tokens;
    ecfg.prefill_pack_tokens = cfg->prefill_pack_tokens;
    ecfg.max_queue = cfg->max_queue;
    ecfg.num_threads = cfg->threads;
    ecfg.kv_disk_dir = cfg->kv_disk[0] ? cfg->kv_disk : NULL;
    ecfg.kv_disk_bytes = (uint64_t)cfg->kv_disk_gb << 30;
    ecfg.warn = engine_warn;
    ecfg.warn_arg = l->engine_notify_arg;
    l->engine = kvd_engine_create(l->model, l->tok, &ecfg, l->engine_notify, l->engine_notify_arg, &l->err);
    if (!l->engine) {
        l->rc = l->err.code ? l->err.code : KVD_EINVAL;
        return;
    }
    /* Every token's bytes, for structured output's masks (as wide as a logits row). */
    kvd_grammar_vocab *gv = kvd_grammar_vocab_create(l->tok, l->model->config.vocab_size, &l->err);
    l->grammars = gv ? kvd_grammar_cache_create(gv, 64, &l->err) : NULL;
    if (!l->grammars) {
        kvd_grammar_vocab_destroy(gv);
        l->rc = l->err.code ? l->err.code : KVD_ENOMEM;
        return;
    }
    /* Parsing tokenizer.json and config leaves tens of MiB of freed heap behind;
     * hand it back so the resident set is weights + KV pool + a small overhead. */
    malloc_trim(0);
}

static void *loader_main(void *arg)
{
    kvd_loader *l = arg;
    load_model(l);
    uv_mutex_lock(&l->lock);
    bool abandoned = l->abandoned;
    if (!abandoned) {
        l->done = true;
        uv_async_send(l->notify);
    }
    uv_mutex_unlock(&l->lock);
    if (abandoned) {
        loader_free_results(l);
        uv_mutex_destroy(&l->lock);
        free(l);
    }
    return NULL;
}

/* Takes the loader's results (joining its thread) or abandons it. Loop thread. */
static void loader_release(kvd_daemon *d)
{
    kvd_loader *l = d->loader;
    if (!l)
        return;
    d->loader = NULL;
    uv_mutex_lock(&l->lock);
    bool done = l->done;
    l->abandoned = !done;
    uv_mutex_unlock(&l->lock);
    if (!done) {
        pthread_detach(l->thread);
        kvd_log(&d->log, KVD_LOG_ALWAYS, "stopping without waiting for the model loader");
        return;
    }
    pthread_join(l->thread, NULL);
    d->tok = l->tok;
    d->model = l->model;
    d->chat_template = l->chat_template;
    d->grammars = l->grammars;
    d->engine = l->engine;
    d->load_err = l->err;
    d->load_rc = l->rc;
    uv_mutex_destroy(&l->lock);
    free(l);
}

/* Drained: no job left and every answer handed to the kernel in full; a model still
 * loading is not waited for. */
static void check_drained(kvd_daemon *d)
{
    if (d->router.state == KVD_SERVE_DRAINING && d->jobs.count == 0 && kvd_http_server_busy(d->http) == 0)
        daemon_shutdown(d);
}

static kvd_daemon *daemon_of(void *router)
{
    return (kvd_daemon *)((char *)router - offsetof(kvd_daemon, router));
}

static void on_http_idle(void *arg)
{
    check_drained(daemon_of(arg));
}

/* A response that did not reach the socket in full. One cut by the shutdown itself
 * (drain timeout, second signal) makes the exit status say so. */
static void on_http_cut(const kvd_http_cut *cut, void *arg)
{
    kvd_daemon *d = daemon_of(arg);
    char meant[32];
    if (cut->bytes_meant)
        snprintf(meant, sizeof meant, "%" PRIu64, cut->bytes_meant);
    else
        snprintf(meant, sizeof meant, "unknown (stream not ended)");
    kvd_log(&d->log, cut->by_server ? KVD_LOG_ERROR : KVD_LOG_WARN,
            "response cut %s: %s %s status %d, %" PRIu64 " of %s bytes written",
            cut->by_server ? "by shutdown" : "(client not reading or gone)", cut->method, cut->path, cut->status,
            cut->bytes_sent, meant);
    if (cut->by_server) {
        d->responses_cut++;
        d->exit_code = d->exit_code ? d->exit_code : KVD_EXIT_RESPONSES_CUT;
    }
}

static void print_banner(kvd_daemon *d)
{
    const kvd_model_config *mc = &d->model->config;
    kvd_engine_stats st;
    kvd_engine_stats_get(d->engine, &st);
    kvd_log(&d->log, KVD_LOG_ALWAYS,
            "model %s (%s): %d layers, hidden %d, %d heads / %d kv heads, vocab %d, context %d, "
            "%zu bytes of weights",
            d->model_name, d->cfg.model, mc->num_layers, mc->hidden_size, mc->num_heads, mc->num_kv_heads,
            mc->vocab_size, mc->max_position_embeddings, d->model->weight_bytes);
    /* the forward pass detects the same (kvd_forward_create) */
    kvd_log(&d->log, KVD_LOG_ALWAYS, "kernels %s", kvd_isa_name(kvd_isa_detect()));
    kvd_log(&d->log, KVD_LOG_ALWAYS,
            "KV pool: %" PRId64 " blocks of %d tokens, %zu bytes (%zu per block, %s), prefix cache %s",
            st.kv.blocks_total, d->cfg.block_size, st.kv.pool_bytes, st.kv.block_bytes,
            kvd_dtype_name(d->cfg.kv_dtype), d->cfg.enable_prefix_cache ? "on" : "off");
    if (st.disk_configured)
        kvd_log(&d->log, KVD_LOG_ALWAYS, "KV disk tier: %s, %" PRId64 " pages (%" PRId64 " bytes) found, cap %d GiB",
                d->cfg.kv_disk, st.disk.pages, st.disk.bytes, d->cfg.kv_disk_gb);
    bool v6 = strchr(d->cfg.host, ':') != NULL;
    /* Scripts and tests wait for this exact line: from here on requests are served. */
    kvd_log(&d->log, KVD_LOG_ALWAYS,
            "listening on http://%s%s%s:%d (max_num_seqs %d, max_batched_tokens %d, max_queue %d)",
            v6 ? "[" : "", d->cfg.host, v6 ? "]" : "", d->bound_port, d->cfg.max_num_seqs,
            d->cfg.max_batched_tokens, d->cfg.max_queue);
}

static void on_loaded(uv_async_t *handle)
{
    kvd_daemon *d = handle->data;
    if (d->router.state == KVD_SERVE_STOPPING)
        return; /* deinit takes or abandons the loader */
    loader_release(d);
    if (d->load_rc == 0) {
        int rc = kvd_engine_start(d->engine, &d->load_err);
        if (rc < 0)
            d->load_rc = rc;
    }
    if (d->load_rc != 0) {
        kvd_log(&d->log, KVD_LOG_ERROR, "cannot load model: %s",
                d->load_err.msg[0] ? d->load_err.msg : kvd_strerror(d->load_rc));
        d->exit_code = 1;
        daemon_shutdown(d);
        return;
    }
    kvd_served_model *m = &d->jobs.model;
    m->engine = d->engine;
    m->tok = d->tok;
    m->grammars = d->grammars;
    m->defaults = kvd_request_params_default(d->model);
    int tok_vocab = kvd_tokenizer_vocab_size(d->tok);
    int model_vocab = d->model->config.vocab_size;
    m->info.vocab_size = tok_vocab < model_vocab ? tok_vocab : model_vocab;
    m->info.max_model_len = d->model->config.max_position_embeddings;
    m->info.num_chat_stop_ids = 0;
    static const char *const turn_enders[] = {"<|im_end|>", "<|endoftext|>"};
    for (int i = 0; i < 2; i++) {
        int id = kvd_tokenizer_token_id(d->tok, turn_enders[i]);
        if (id >= 0)
            m->info.chat_stop_ids[m->info.num_chat_stop_ids++] = id;
    }
    m->info.chat_template = d->chat_template;
    if (kvd_chat_template_is_fallback(d->chat_template))
        kvd_log(&d->log, KVD_LOG_ALWAYS, "chat template: the model has none; falling back to ChatML (%s)",
                kvd_chat_template_origin(d->chat_template));
    else
        kvd_log(&d->log, KVD_LOG_ALWAYS, "chat template: %s", kvd_chat_template_origin(d->chat_template));
    if (d->router.state == KVD_SERVE_LOADING) {
        d->router.state = KVD_SERVE_READY;
        print_banner(d);
    } else {
        check_drained(d);
    }
}

static void on_drain_timeout(uv_timer_t *timer)
{
    kvd_daemon *d = timer->data;
    kvd_log(&d->log, KVD_LOG_ALWAYS, "drain timeout after %d s: cancelling %d request(s)", d->cfg.drain_timeout_s,
            d->jobs.count);
    kvd_jobs_cancel_all(&d->jobs);
    daemon_shutdown(d);
}

void kvd_daemon_drain(kvd_daemon *d)
{
    if (d->router.state == KVD_SERVE_DRAINING || d->router.state == KVD_SERVE_STOPPING)
        return;
    d->router.state = KVD_SERVE_DRAINING;
    kvd_log(&d->log, KVD_LOG_ALWAYS, "draining: %d request(s) in flight, grace period %d s", d->jobs.count,
            d->cfg.drain_timeout_s);
    kvd_http_server_drain(d->http);
    uv_timer_start(&d->drain_timer, on_drain_timeout, (uint64_t)d->cfg.drain_timeout_s * 1000, 0);
    check_drained(d);
}

static void on_jobs_idle(void *arg)
{
    check_drained(arg);
}

static void on_signal(uv_signal_t *handle, int signum)
{
    kvd_daemon *d = handle->data;
    if (d->router.state == KVD_SERVE_STOPPING)
        return; /* already on the way out */
    d->signals_seen++;
    if (d->signals_seen == 1) {
        kvd_log(&d->log, KVD_LOG_ALWAYS, "received %s", signum == SIGINT ? "SIGINT" : "SIGTERM");
        kvd_daemon_drain(d);
    } else {
        kvd_log(&d->log, KVD_LOG_ALWAYS, "second signal: cancelling %d request(s) and stopping now", d->jobs.count);
        kvd_jobs_cancel_all(&d->jobs);
        daemon_shutdown(d);
    }
}

static void daemon_shutdown(kvd_daemon *d)
{
    if (d->router.state == KVD_SERVE_STOPPING)
        return;
    d->router.state = KVD_SERVE_STOPPING;
    d->jobs.stopping = true;
    kvd_http_server_close(d->http);
    /* The signal handles stay installed (unreferenced) until deinit: closed, they
     * would restore the default action, and a second quick SIGTERM would kill the
     * process mid-shutdown (exit 143). */
    uv_unref((uv_handle_t *)&d->sigint);
    uv_unref((uv_handle_t *)&d->sigterm);
    uv_unref((uv_handle_t *)&d->load_async);
    uv_close((uv_handle_t *)&d->loop_prepare, NULL);
    uv_timer_stop(&d->drain_timer);
    uv_close((uv_handle_t *)&d->drain_timer, NULL);
    /* The async handle stays open for the engine thread until kvd_daemon_deinit; it
     * just no longer keeps the loop running. */
    uv_unref((uv_handle_t *)&d->engine_async);
}

int kvd_daemon_init(kvd_daemon *d, uv_loop_t *loop, const kvd_server_config *cfg, kvd_error *err)
{
    memset(d, 0, sizeof *d);
    d->loop = loop;
    d->cfg = *cfg;
    d->log.out = stderr;
    d->log.level = cfg->log_level;
    kvd_config_model_name(cfg, d->model_name, sizeof d->model_name);
    kvd_metrics_init(&d->metrics);
    if (kvd_jobs_init(&d->jobs, loop, &d->log, &d->metrics, d->model_name) != 0)
        return kvd_error_set(err, KVD_ENOMEM, "out of memory");
    d->jobs.on_idle = on_jobs_idle;
    d->jobs.max_response_bytes = cfg->max_response_bytes;
    d->jobs.on_idle_arg = d;
    int num_names = 0;
    d->model_names[num_names++] = d->model_name;
    snprintf(d->model_aliases, sizeof d->model_aliases, "%s", cfg->served_model_name);
    for (char *p = strchr(d->model_aliases, ','); p && num_names < 8; p = strchr(p, ',')) {
        *p++ = '\0';
        p += strspn(p, " ");
        if (*p && *p != ',')
            d->model_names[num_names++] = p;
    }
    d->router = (kvd_router){.cfg = &d->cfg, .state = KVD_SERVE_LOADING, .jobs = &d->jobs,
                             .model_names = d->model_names, .num_model_names = num_names};

    kvd_http_limits limits = kvd_http_limits_default();
    limits.max_header_bytes = (size_t)cfg->max_header_bytes;
    limits.max_body_bytes = (size_t)cfg->max_body_bytes;
    limits.header_timeout_ms = cfg->header_timeout_ms;
    limits.idle_timeout_ms = cfg->idle_timeout_ms;
    limits.body_timeout_ms = cfg->body_timeout_ms;
    limits.max_connections = cfg->max_connections;
    limits.max_write_queue_bytes = (size_t)cfg->max_write_queue_bytes;
    limits.socket_send_buffer = (size_t)cfg->socket_send_buffer_bytes;
    limits.send_timeout_ms = cfg->send_timeout_ms;
    limits.max_buffered_body_bytes = (size_t)cfg->max_buffered_body_bytes;
    limits.allowed_hosts = cfg->allowed_hosts;
    limits.allowed_origins = cfg->allowed_origins;
    /* One arg for all: the router; the daemon's own callbacks step out to it (daemon_of). */
    kvd_http_handlers handlers = {.on_request = kvd_router_on_request, .on_abort = kvd_router_on_abort,
                                  .on_headers = kvd_router_on_headers, .on_cut = on_http_cut,
                                  .on_idle = on_http_idle, .arg = &d->router};
    d->http = kvd_http_server_create(loop, &limits, &handlers, err);
    if (!d->http)
        return err ? err->code : KVD_EINVAL;
    d->router.http = d->http;

    uv_prepare_init(loop, &d->loop_prepare);
    d->loop_prepare.data = d;
    uv_prepare_start(&d->loop_prepare, on_loop_prepare);
    uv_unref((uv_handle_t *)&d->loop_prepare);
    uv_async_init(loop, &d->engine_async, on_engine_async);
    d->engine_async.data = d;
    uv_signal_init(loop, &d->sigint);
    uv_signal_init(loop, &d->sigterm);
    d->sigint.data = d;
    d->sigterm.data = d;
    uv_timer_init(loop, &d->drain_timer);
    d->drain_timer.data = d;
    uv_async_init(loop, &d->load_async, on_loaded);
    d->load_async.data = d;
    return 0;
}

/* Listens on cfg.host: an address literal as it is, a host name ("localhost") on
 * the first of its addresses that can be bound. Resolving blocks, which is fine
 * before anything is served. */
static int listen_on_host(kvd_daemon *d, kvd_error *err)
{
    const char *host = d->cfg.host;
    unsigned char probe[sizeof(struct in6_addr)];
    if (inet_pton(AF_INET, host, probe) == 1 || inet_pton(AF_INET6, host, probe) == 1)
        return kvd_http_server_listen(d->http, host, d->cfg.port, &d->bound_port, err);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_ADDRCONFIG};
    struct addrinfo *found = NULL;
    int gai = getaddrinfo(host, NULL, &hints, &found);
    if (gai != 0)
        return kvd_error_set(err, KVD_EINVAL, "host: cannot resolve \"%s\": %s", host, gai_strerror(gai));
    int rc = kvd_error_set(err, KVD_EINVAL, "host: \"%s\" has no IPv4 or IPv6 address", host);
    for (struct addrinfo *ai = found; ai; ai = ai->ai_next) {
        char literal[INET6_ADDRSTRLEN];
        const void *addr = ai->ai_family == AF_INET ? (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr
                           : ai->ai_family == AF_INET6 ? (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr
                                                       : NULL;
        if (!addr || !inet_ntop(ai->ai_family, addr, literal, sizeof literal))
            continue;
        rc = kvd_http_server_listen(d->http, literal, d->cfg.port, &d->bound_port, err);
        if (rc == 0)
            break;
    }
    freeaddrinfo(found);
    return rc;
}

int kvd_daemon_start(kvd_daemon *d, kvd_error *err)
{
    int rc = listen_on_host(d, err);
    if (rc < 0) {
        daemon_shutdown(d);
        return rc;
    }
    uv_signal_start(&d->sigint, on_signal, SIGINT);
    uv_signal_start(&d->sigterm, on_signal, SIGTERM);
    const char *host = d->cfg.host;
    bool v6 = strchr(host, ':') != NULL;
    /* Bound but not serving yet (503 until the model is loaded); the port is known now. */
    kvd_log(&d->log, KVD_LOG_ALWAYS, "bound to http://%s%s%s:%d, loading %s", v6 ? "[" : "", host,
            v6 ? "]" : "", d->bound_port, d->cfg.model);
    kvd_loader *l = calloc(1, sizeof *l);
    if (!l || uv_mutex_init(&l->lock) != 0) {
        free(l);
        daemon_shutdown(d);
        return kvd_error_set(err, KVD_ENOMEM, "cannot start the model loader: out of memory");
    }
    l->notify = &d->load_async;
    l->cfg = d->cfg;
    l->engine_notify = engine_notify;
    l->engine_notify_arg = d;
    rc = kvd_thread_start(&l->thread, loader_main, l);
    if (rc != 0) {
        uv_mutex_destroy(&l->lock);
        free(l);
        daemon_shutdown(d);
        return kvd_error_set(err, KVD_EIO, "cannot start the model loader: %s", strerror(rc));
    }
    d->loader = l;
    return 0;
}

void kvd_daemon_deinit(kvd_daemon *d)
{
    /* A loader that finished is taken (and its engine, never started, destroyed
     * below); one still running is left to free its own work. */
    loader_release(d);
    if (!uv_is_closing((uv_handle_t *)&d->load_async))
        uv_close((uv_handle_t *)&d->load_async, NULL);
    kvd_engine_destroy(d->engine);
    d->engine = NULL;
    kvd_jobs_deinit(&d->jobs);
    if (!uv_is_closing((uv_handle_t *)&d->engine_async))
        uv_close((uv_handle_t *)&d->engine_async, NULL);
    if (!uv_is_closing((uv_handle_t *)&d->loop_prepare))
        uv_close((uv_handle_t *)&d->loop_prepare, NULL);
    if (!uv_is_closing((uv_handle_t *)&d->drain_timer))
        uv_close((uv_handle_t *)&d->drain_timer, NULL);
    /* Closing the signal handles restores the default actions, which would kill the
     * process mid-exit (exit 143). Blocked here (every other thread blocks them
     * already), a signal stays pending until SIG_IGN discards it: from here on a
     * signal has nothing left to stop. */
    sigset_t saved;
    kvd_signals_block(&saved);
    if (!uv_is_closing((uv_handle_t *)&d->sigint))
        uv_close((uv_handle_t *)&d->sigint, NULL);
    if (!uv_is_closing((uv_handle_t *)&d->sigterm))
        uv_close((uv_handle_t *)&d->sigterm, NULL);
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_IGN);
    kvd_signals_restore(&saved);
    uv_run(d->loop, UV_RUN_DEFAULT);
    kvd_http_server_destroy(d->http);
    d->http = NULL;
    kvd_chat_template_destroy(d->chat_template);
    kvd_grammar_cache_destroy(d->grammars);
    d->grammars = NULL;
    kvd_model_destroy(d->model);
    kvd_tokenizer_destroy(d->tok);
    d->model = NULL;
    d->tok = NULL;
}
