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

#include <inttypes.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvd/kvd_kernels.h"

/* ---- engine bridge ---- */

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

/* ---- lifecycle ---- */

static void daemon_shutdown(kvd_daemon *d);

static void load_model(uv_work_t *work)
{
    kvd_daemon *d = work->data;
    const kvd_server_config *cfg = &d->cfg;
    char path[KVD_CONFIG_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/tokenizer.json", cfg->model);
    d->tok = kvd_tokenizer_load(path, &d->load_err);
    if (!d->tok) {
        d->load_rc = d->load_err.code ? d->load_err.code : KVD_EIO;
        return;
    }
    /* Small checkpoints load in milliseconds: progress lines would only be noise. */
    kvd_model_load_options opts = {.progress = true, .progress_min_bytes = 64u << 20};
    d->model = kvd_model_load(cfg->model, &opts, &d->load_err);
    if (!d->model) {
        d->load_rc = d->load_err.code ? d->load_err.code : KVD_EIO;
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
    ecfg.max_queue = cfg->max_queue;
    ecfg.num_threads = cfg->threads;
    d->engine = kvd_engine_create(d->model, d->tok, &ecfg, engine_notify, d, &d->load_err);
    if (!d->engine) {
        d->load_rc = d->load_err.code ? d->load_err.code : KVD_EINVAL;
        return;
    }
    /* Every token's bytes, for structured output's masks (as wide as a logits row). */
    kvd_grammar_vocab *gv = kvd_grammar_vocab_create(d->tok, d->model->config.vocab_size, &d->load_err);
    d->grammars = gv ? kvd_grammar_cache_create(gv, 64, &d->load_err) : NULL;
    if (!d->grammars) {
        kvd_grammar_vocab_destroy(gv);
        d->load_rc = d->load_err.code ? d->load_err.code : KVD_ENOMEM;
        return;
    }
    /* Parsing tokenizer.json and config leaves tens of MiB of freed heap behind;
     * hand it back so the resident set is weights + KV pool + a small overhead. */
    malloc_trim(0);
    int rc = kvd_engine_start(d->engine, &d->load_err);
    if (rc < 0)
        d->load_rc = rc;
}

static void check_drained(kvd_daemon *d)
{
    if (d->router.state == KVD_SERVE_DRAINING && d->jobs.count == 0 && !d->load_pending)
        daemon_shutdown(d);
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
    bool v6 = strchr(d->cfg.host, ':') != NULL;
    /* Scripts and tests wait for this exact line: from here on requests are served. */
    kvd_log(&d->log, KVD_LOG_ALWAYS,
            "listening on http://%s%s%s:%d (max_num_seqs %d, max_batched_tokens %d, max_queue %d)",
            v6 ? "[" : "", d->cfg.host, v6 ? "]" : "", d->bound_port, d->cfg.max_num_seqs,
            d->cfg.max_batched_tokens, d->cfg.max_queue);
}

static void after_load(uv_work_t *work, int status)
{
    kvd_daemon *d = work->data;
    d->load_pending = false;
    if (status < 0 && d->load_rc == 0)
        d->load_rc = KVD_ECANCELED;
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
    uv_close((uv_handle_t *)&d->sigint, NULL);
    uv_close((uv_handle_t *)&d->sigterm, NULL);
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
    kvd_jobs_init(&d->jobs, loop, &d->log, &d->metrics, d->model_name);
    d->jobs.on_idle = on_jobs_idle;
    d->jobs.max_response_bytes = cfg->max_response_bytes;
    d->jobs.on_idle_arg = d;
    d->model_names[0] = d->model_name;
    d->router = (kvd_router){.cfg = &d->cfg, .state = KVD_SERVE_LOADING, .jobs = &d->jobs,
                             .model_names = d->model_names, .num_model_names = 1};

    kvd_http_limits limits = kvd_http_limits_default();
    limits.max_header_bytes = (size_t)cfg->max_header_bytes;
    limits.max_body_bytes = (size_t)cfg->max_body_bytes;
    limits.header_timeout_ms = cfg->header_timeout_ms;
    limits.idle_timeout_ms = cfg->idle_timeout_ms;
    limits.body_timeout_ms = cfg->body_timeout_ms;
    limits.max_connections = cfg->max_connections;
    limits.max_write_queue_bytes = (size_t)cfg->max_write_queue_bytes;
    limits.socket_send_buffer = (size_t)cfg->socket_send_buffer_bytes;
    kvd_http_handlers handlers = {kvd_router_on_request, kvd_router_on_abort, &d->router};
    d->http = kvd_http_server_create(loop, &limits, &handlers, err);
    if (!d->http)
        return err ? err->code : KVD_EINVAL;
    d->router.http = d->http;

    uv_async_init(loop, &d->engine_async, on_engine_async);
    d->engine_async.data = d;
    uv_signal_init(loop, &d->sigint);
    uv_signal_init(loop, &d->sigterm);
    d->sigint.data = d;
    d->sigterm.data = d;
    uv_timer_init(loop, &d->drain_timer);
    d->drain_timer.data = d;
    d->load_work.data = d;
    return 0;
}

int kvd_daemon_start(kvd_daemon *d, kvd_error *err)
{
    int rc = kvd_http_server_listen(d->http, d->cfg.host, d->cfg.port, &d->bound_port, err);
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
    d->load_pending = true;
    rc = uv_queue_work(d->loop, &d->load_work, load_model, after_load);
    if (rc < 0) {
        d->load_pending = false;
        daemon_shutdown(d);
        return kvd_error_set(err, KVD_EIO, "cannot start the model loader: %s", uv_strerror(rc));
    }
    return 0;
}

void kvd_daemon_deinit(kvd_daemon *d)
{
    kvd_engine_destroy(d->engine);
    d->engine = NULL;
    kvd_jobs_deinit(&d->jobs);
    if (!uv_is_closing((uv_handle_t *)&d->engine_async))
        uv_close((uv_handle_t *)&d->engine_async, NULL);
    if (!uv_is_closing((uv_handle_t *)&d->drain_timer))
        uv_close((uv_handle_t *)&d->drain_timer, NULL);
    if (!uv_is_closing((uv_handle_t *)&d->sigint))
        uv_close((uv_handle_t *)&d->sigint, NULL);
    if (!uv_is_closing((uv_handle_t *)&d->sigterm))
        uv_close((uv_handle_t *)&d->sigterm, NULL);
    uv_run(d->loop, UV_RUN_DEFAULT);
    kvd_http_server_destroy(d->http);
    d->http = NULL;
    kvd_grammar_cache_destroy(d->grammars);
    d->grammars = NULL;
    kvd_model_destroy(d->model);
    kvd_tokenizer_destroy(d->tok);
    d->model = NULL;
    d->tok = NULL;
}
