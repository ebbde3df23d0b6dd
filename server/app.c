/* app.c - the daemon's lifecycle: listen, load, serve, drain, stop.
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
#include "app.h"

#include <inttypes.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvd/kvd_kernels.h"

/* ---- job map ---- */

static size_t slot_of(uint64_t key, size_t cap)
{
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdULL;
    key ^= key >> 33;
    return (size_t)key & (cap - 1);
}

static int job_map_grow(kvd_job_map *map)
{
    size_t cap = map->cap ? map->cap * 2 : 64;
    uint64_t *keys = calloc(cap, sizeof *keys);
    kvd_job **values = calloc(cap, sizeof *values);
    if (!keys || !values) {
        free(keys);
        free(values);
        return KVD_ENOMEM;
    }
    for (size_t i = 0; i < map->cap; i++) {
        if (!map->keys[i])
            continue;
        size_t s = slot_of(map->keys[i], cap);
        while (keys[s])
            s = (s + 1) & (cap - 1);
        keys[s] = map->keys[i];
        values[s] = map->values[i];
    }
    free(map->keys);
    free(map->values);
    map->keys = keys;
    map->values = values;
    map->cap = cap;
    return 0;
}

int kvd_job_map_put(kvd_job_map *map, uint64_t key, kvd_job *job)
{
    if ((map->count + 1) * 2 > map->cap && job_map_grow(map) != 0)
        return KVD_ENOMEM;
    size_t s = slot_of(key, map->cap);
    while (map->keys[s] && map->keys[s] != key)
        s = (s + 1) & (map->cap - 1);
    if (!map->keys[s])
        map->count++;
    map->keys[s] = key;
    map->values[s] = job;
    return 0;
}

kvd_job *kvd_job_map_get(const kvd_job_map *map, uint64_t key)
{
    if (!map->cap)
        return NULL;
    size_t s = slot_of(key, map->cap);
    while (map->keys[s]) {
        if (map->keys[s] == key)
            return map->values[s];
        s = (s + 1) & (map->cap - 1);
    }
    return NULL;
}

void kvd_job_map_remove(kvd_job_map *map, uint64_t key)
{
    if (!map->cap)
        return;
    size_t mask = map->cap - 1;
    size_t s = slot_of(key, map->cap);
    while (map->keys[s] && map->keys[s] != key)
        s = (s + 1) & mask;
    if (!map->keys[s])
        return;
    /* Backward-shift deletion keeps probe chains intact without tombstones. */
    size_t hole = s;
    size_t next = (hole + 1) & mask;
    while (map->keys[next]) {
        size_t home = slot_of(map->keys[next], map->cap);
        bool movable = hole <= next ? (home <= hole || home > next) : (home <= hole && home > next);
        if (movable) {
            map->keys[hole] = map->keys[next];
            map->values[hole] = map->values[next];
            hole = next;
        }
        next = (next + 1) & mask;
    }
    map->keys[hole] = 0;
    map->values[hole] = NULL;
    map->count--;
}

void kvd_job_map_deinit(kvd_job_map *map)
{
    free(map->keys);
    free(map->values);
    memset(map, 0, sizeof *map);
}

/* ---- engine bridge ---- */

static void engine_notify(void *arg)
{
    kvd_app *app = arg;
    uv_async_send(&app->engine_async);
}

static void on_engine_async(uv_async_t *handle)
{
    kvd_app *app = handle->data;
    if (!app->engine)
        return;
    kvd_event *events = kvd_engine_poll_events(app->engine);
    if (events)
        kvd_openai_on_events(app, events);
}

uint64_t kvd_app_random(kvd_app *app)
{
    uint64_t s1 = app->rng[0];
    const uint64_t s0 = app->rng[1];
    app->rng[0] = s0;
    s1 ^= s1 << 23;
    app->rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return app->rng[1] + s0;
}

/* ---- lifecycle ---- */

static void app_shutdown(kvd_app *app);

static void load_model(uv_work_t *work)
{
    kvd_app *app = work->data;
    const kvd_server_config *cfg = &app->cfg;
    app->tok = kvd_tokenizer_load_model(cfg->model, &app->load_err);
    if (!app->tok) {
        app->load_rc = app->load_err.code ? app->load_err.code : KVD_EIO;
        return;
    }
    /* Small checkpoints load in milliseconds: progress lines would only be noise. */
    kvd_model_load_options opts = {.progress = true, .progress_min_bytes = 64u << 20};
    app->model = kvd_model_load(cfg->model, &opts, &app->load_err);
    if (!app->model) {
        app->load_rc = app->load_err.code ? app->load_err.code : KVD_EIO;
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
    app->engine = kvd_engine_create(app->model, app->tok, &ecfg, engine_notify, app, &app->load_err);
    if (!app->engine) {
        app->load_rc = app->load_err.code ? app->load_err.code : KVD_EINVAL;
        return;
    }
    /* Parsing tokenizer.json and config leaves tens of MiB of freed heap behind;
     * hand it back so the resident set is weights + KV pool + a small overhead. */
    malloc_trim(0);
    int rc = kvd_engine_start(app->engine, &app->load_err);
    if (rc < 0)
        app->load_rc = rc;
}

static void check_drained(kvd_app *app)
{
    if (app->state == KVD_APP_DRAINING && app->num_jobs == 0 && !app->load_pending)
        app_shutdown(app);
}

void kvd_app_engine_stats(kvd_app *app, kvd_engine_stats *st)
{
    memset(st, 0, sizeof *st);
    if (!app->engine)
        return;
    kvd_engine_stats_get(app->engine, st);
    if (st->kv.blocks_total == 0) {
        /* The engine publishes pool statistics after its first step; until then the
         * pool's size follows from the same formula the pool uses. */
        const kvd_model_config *mc = &app->model->config;
        kvd_kv_config kc = {.num_layers = mc->num_layers,
                            .num_kv_heads = mc->num_kv_heads,
                            .head_dim = mc->head_dim,
                            .block_size = app->cfg.block_size,
                            .dtype = app->cfg.kv_dtype};
        st->kv.block_bytes = kvd_kv_block_bytes(&kc);
        st->kv.blocks_total = app->cfg.kv_num_blocks ? (int64_t)app->cfg.kv_num_blocks
                              : st->kv.block_bytes ? (int64_t)(app->cfg.kv_cache_bytes / st->kv.block_bytes)
                                                   : 0;
        st->kv.blocks_free = st->kv.blocks_total;
        st->kv.pool_bytes = (size_t)st->kv.blocks_total * st->kv.block_bytes;
    }
}

static void print_banner(kvd_app *app)
{
    const kvd_model_config *mc = &app->model->config;
    kvd_engine_stats st;
    kvd_app_engine_stats(app, &st);
    kvd_log(&app->log, KVD_LOG_ALWAYS,
            "model %s (%s): %d layers, hidden %d, %d heads / %d kv heads, vocab %d, context %d, "
            "%zu bytes of weights",
            app->model_name, app->cfg.model, mc->num_layers, mc->hidden_size, mc->num_heads, mc->num_kv_heads,
            mc->vocab_size, mc->max_position_embeddings, app->model->weight_bytes);
    /* the forward pass detects the same (kvd_forward_create) */
    kvd_log(&app->log, KVD_LOG_ALWAYS, "kernels %s", kvd_isa_name(kvd_isa_detect()));
    kvd_log(&app->log, KVD_LOG_ALWAYS,
            "KV pool: %" PRId64 " blocks of %d tokens, %zu bytes (%zu per block, %s), prefix cache %s",
            st.kv.blocks_total, app->cfg.block_size, st.kv.pool_bytes, st.kv.block_bytes,
            kvd_dtype_name(app->cfg.kv_dtype), app->cfg.enable_prefix_cache ? "on" : "off");
    bool v6 = strchr(app->cfg.host, ':') != NULL;
    /* Scripts and tests wait for this exact line: from here on requests are served. */
    kvd_log(&app->log, KVD_LOG_ALWAYS,
            "listening on http://%s%s%s:%d (max_num_seqs %d, max_batched_tokens %d, max_queue %d)",
            v6 ? "[" : "", app->cfg.host, v6 ? "]" : "", app->bound_port, app->cfg.max_num_seqs,
            app->cfg.max_batched_tokens, app->cfg.max_queue);
}

static void after_load(uv_work_t *work, int status)
{
    kvd_app *app = work->data;
    app->load_pending = false;
    if (status < 0 && app->load_rc == 0)
        app->load_rc = KVD_ECANCELED;
    if (app->load_rc != 0) {
        kvd_log(&app->log, KVD_LOG_ERROR, "cannot load model: %s",
                app->load_err.msg[0] ? app->load_err.msg : kvd_strerror(app->load_rc));
        app->exit_code = 1;
        app_shutdown(app);
        return;
    }
    app->defaults = kvd_request_params_default(app->model);
    int tok_vocab = kvd_tokenizer_vocab_size(app->tok);
    int model_vocab = app->model->config.vocab_size;
    app->info.vocab_size = tok_vocab < model_vocab ? tok_vocab : model_vocab;
    app->info.max_model_len = app->model->config.max_position_embeddings;
    app->info.num_chat_stop_ids = 0;
    static const char *const turn_enders[] = {"<|im_end|>", "<|endoftext|>"};
    for (int i = 0; i < 2; i++) {
        int id = kvd_tokenizer_token_id(app->tok, turn_enders[i]);
        if (id >= 0)
            app->info.chat_stop_ids[app->info.num_chat_stop_ids++] = id;
    }
    if (app->state == KVD_APP_LOADING) {
        app->state = KVD_APP_READY;
        print_banner(app);
    } else {
        check_drained(app);
    }
}

static void on_drain_timeout(uv_timer_t *timer)
{
    kvd_app *app = timer->data;
    kvd_log(&app->log, KVD_LOG_ALWAYS, "drain timeout after %d s: cancelling %d request(s)", app->cfg.drain_timeout_s,
            app->num_jobs);
    kvd_openai_cancel_all(app);
    app_shutdown(app);
}

void kvd_app_drain(kvd_app *app)
{
    if (app->state == KVD_APP_DRAINING || app->state == KVD_APP_STOPPING)
        return;
    app->state = KVD_APP_DRAINING;
    kvd_log(&app->log, KVD_LOG_ALWAYS, "draining: %d request(s) in flight, grace period %d s", app->num_jobs,
            app->cfg.drain_timeout_s);
    kvd_http_server_drain(app->http);
    uv_timer_start(&app->drain_timer, on_drain_timeout, (uint64_t)app->cfg.drain_timeout_s * 1000, 0);
    check_drained(app);
}

void kvd_app_job_ended(kvd_app *app)
{
    check_drained(app);
}

static void on_signal(uv_signal_t *handle, int signum)
{
    kvd_app *app = handle->data;
    app->signals_seen++;
    if (app->signals_seen == 1) {
        kvd_log(&app->log, KVD_LOG_ALWAYS, "received %s", signum == SIGINT ? "SIGINT" : "SIGTERM");
        kvd_app_drain(app);
    } else {
        kvd_log(&app->log, KVD_LOG_ALWAYS, "second signal: cancelling %d request(s) and stopping now", app->num_jobs);
        kvd_openai_cancel_all(app);
        app_shutdown(app);
    }
}

static void app_shutdown(kvd_app *app)
{
    if (app->state == KVD_APP_STOPPING)
        return;
    app->state = KVD_APP_STOPPING;
    kvd_http_server_close(app->http);
    uv_close((uv_handle_t *)&app->sigint, NULL);
    uv_close((uv_handle_t *)&app->sigterm, NULL);
    uv_timer_stop(&app->drain_timer);
    uv_close((uv_handle_t *)&app->drain_timer, NULL);
    /* The async handle stays open for the engine thread until kvd_app_deinit; it
     * just no longer keeps the loop running. */
    uv_unref((uv_handle_t *)&app->engine_async);
}

int kvd_app_init(kvd_app *app, uv_loop_t *loop, const kvd_server_config *cfg, kvd_error *err)
{
    memset(app, 0, sizeof *app);
    app->loop = loop;
    app->cfg = *cfg;
    app->log.out = stderr;
    app->log.level = cfg->log_level;
    app->state = KVD_APP_LOADING;
    kvd_config_model_name(cfg, app->model_name, sizeof app->model_name);
    kvd_metrics_init(&app->metrics);
    app->rng[0] = uv_hrtime() ^ 0x9e3779b97f4a7c15ULL;
    app->rng[1] = ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)app ^ 0xbf58476d1ce4e5b9ULL;
    for (int i = 0; i < 8; i++)
        kvd_app_random(app);

    kvd_http_limits limits = kvd_http_limits_default();
    limits.max_header_bytes = (size_t)cfg->max_header_bytes;
    limits.max_body_bytes = (size_t)cfg->max_body_bytes;
    limits.header_timeout_ms = cfg->header_timeout_ms;
    limits.idle_timeout_ms = cfg->idle_timeout_ms;
    limits.body_timeout_ms = cfg->body_timeout_ms;
    limits.max_connections = cfg->max_connections;
    limits.max_write_queue_bytes = (size_t)cfg->max_write_queue_bytes;
    limits.socket_send_buffer = (size_t)cfg->socket_send_buffer_bytes;
    kvd_http_handlers handlers = {kvd_openai_on_request, kvd_openai_on_abort, app};
    app->http = kvd_http_server_create(loop, &limits, &handlers, err);
    if (!app->http)
        return err ? err->code : KVD_EINVAL;

    uv_async_init(loop, &app->engine_async, on_engine_async);
    app->engine_async.data = app;
    uv_signal_init(loop, &app->sigint);
    uv_signal_init(loop, &app->sigterm);
    app->sigint.data = app;
    app->sigterm.data = app;
    uv_timer_init(loop, &app->drain_timer);
    app->drain_timer.data = app;
    app->load_work.data = app;
    return 0;
}

int kvd_app_start(kvd_app *app, kvd_error *err)
{
    int rc = kvd_http_server_listen(app->http, app->cfg.host, app->cfg.port, &app->bound_port, err);
    if (rc < 0) {
        app_shutdown(app);
        return rc;
    }
    uv_signal_start(&app->sigint, on_signal, SIGINT);
    uv_signal_start(&app->sigterm, on_signal, SIGTERM);
    const char *host = app->cfg.host;
    bool v6 = strchr(host, ':') != NULL;
    /* Bound but not serving yet (503 until the model is loaded); the port is known now. */
    kvd_log(&app->log, KVD_LOG_ALWAYS, "bound to http://%s%s%s:%d, loading %s", v6 ? "[" : "", host,
            v6 ? "]" : "", app->bound_port, app->cfg.model);
    app->load_pending = true;
    rc = uv_queue_work(app->loop, &app->load_work, load_model, after_load);
    if (rc < 0) {
        app->load_pending = false;
        app_shutdown(app);
        return kvd_error_set(err, KVD_EIO, "cannot start the model loader: %s", uv_strerror(rc));
    }
    return 0;
}

void kvd_app_deinit(kvd_app *app)
{
    kvd_engine_destroy(app->engine);
    app->engine = NULL;
    kvd_openai_free_all(app);
    if (!uv_is_closing((uv_handle_t *)&app->engine_async))
        uv_close((uv_handle_t *)&app->engine_async, NULL);
    if (!uv_is_closing((uv_handle_t *)&app->drain_timer))
        uv_close((uv_handle_t *)&app->drain_timer, NULL);
    if (!uv_is_closing((uv_handle_t *)&app->sigint))
        uv_close((uv_handle_t *)&app->sigint, NULL);
    if (!uv_is_closing((uv_handle_t *)&app->sigterm))
        uv_close((uv_handle_t *)&app->sigterm, NULL);
    uv_run(app->loop, UV_RUN_DEFAULT);
    kvd_http_server_destroy(app->http);
    app->http = NULL;
    kvd_model_destroy(app->model);
    kvd_tokenizer_destroy(app->tok);
    app->model = NULL;
    app->tok = NULL;
    kvd_job_map_deinit(&app->jobs);
}
