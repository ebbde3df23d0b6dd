/* app.h - the daemon as one object: configuration, loop handles, model, engine, jobs.
 *
 * app.c owns the lifecycle (listen, load the model on a worker thread, signals,
 * drain, shutdown) and the bridge from the engine thread: the engine's notify
 * callback only calls uv_async_send, and the async callback on the loop thread
 * takes every queued event at once. openai.c owns the routes and jobs: a job is one
 * generation or tokenization request from arrival to its last byte, a third object
 * beside the HTTP request (connection-scoped) and the engine's sequence (named by
 * its 64-bit id). Everything here runs on the loop thread except the loader.
 */
#ifndef KVD_SERVER_APP_H
#define KVD_SERVER_APP_H

#include <stdbool.h>
#include <stdint.h>

#include <uv.h>

#include "config.h"
#include "http.h"
#include "kvd/kvd_engine.h"
#include "metrics.h"
#include "oai.h"
#include "util.h"

typedef struct kvd_job kvd_job;

/* Open-addressing map from engine request id to its job. */
typedef struct kvd_job_map {
    uint64_t *keys;  /* 0 = empty slot (engine ids are > 0) */
    kvd_job **values;
    size_t cap;      /* power of two */
    size_t count;
} kvd_job_map;

int kvd_job_map_put(kvd_job_map *map, uint64_t key, kvd_job *job);
kvd_job *kvd_job_map_get(const kvd_job_map *map, uint64_t key);
void kvd_job_map_remove(kvd_job_map *map, uint64_t key);
void kvd_job_map_deinit(kvd_job_map *map);

typedef enum kvd_app_state {
    KVD_APP_LOADING,
    KVD_APP_READY,
    KVD_APP_DRAINING,
    KVD_APP_STOPPING,
} kvd_app_state;

typedef struct kvd_app {
    uv_loop_t *loop;
    kvd_server_config cfg;
    kvd_logger log;
    char model_name[256];
    kvd_app_state state;
    int exit_code;
    int bound_port;
    int signals_seen;

    kvd_http_server *http;
    uv_async_t engine_async;
    uv_signal_t sigint, sigterm;
    uv_timer_t drain_timer;
    uv_work_t load_work;
    bool load_pending;

    /* Set by the loader; read-only afterwards. */
    kvd_model *model;
    kvd_tokenizer *tok;
    kvd_engine *engine;
    kvd_error load_err;
    int load_rc;
    kvd_request_params defaults;
    kvd_oai_model_info info;

    kvd_metrics metrics;
    kvd_job_map jobs;    /* submitted jobs by engine id */
    kvd_job *live_jobs;  /* every job not yet freed (doubly linked) */
    int num_jobs;
    uint64_t rng[2];     /* xorshift128+ for response ids and default seeds */
} kvd_app;

/* Sets up handles and the HTTP server. Returns 0 or a negative code with err set. */
int kvd_app_init(kvd_app *app, uv_loop_t *loop, const kvd_server_config *cfg, kvd_error *err);
/* Listens, prints the address, starts loading the model. */
int kvd_app_start(kvd_app *app, kvd_error *err);
/* After uv_run returned: stops the engine, frees everything. */
void kvd_app_deinit(kvd_app *app);

/* Begins a graceful drain (as SIGTERM does). */
void kvd_app_drain(kvd_app *app);
/* Called by openai.c when a job is freed, to finish a drain. */
void kvd_app_job_ended(kvd_app *app);
uint64_t kvd_app_random(kvd_app *app);
/* Engine statistics (zeros before the model is loaded), with the pool's size filled
 * in even before the engine's first step. */
void kvd_app_engine_stats(kvd_app *app, kvd_engine_stats *st);

/* openai.c */
void kvd_openai_on_request(kvd_http_request *req, void *arg);
void kvd_openai_on_abort(kvd_http_request *req, void *arg);
/* Takes ownership of the event list. */
void kvd_openai_on_events(kvd_app *app, kvd_event *events);
/* Cancels every submitted job (drain timeout). */
void kvd_openai_cancel_all(kvd_app *app);
/* Frees jobs still waiting for the engine at shutdown. */
void kvd_openai_free_all(kvd_app *app);

#endif
