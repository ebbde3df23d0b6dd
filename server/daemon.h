/* daemon.h - the daemon as one object: configuration, loop handles, model, engine,
 * and the router and jobs it serves with.
 *
 * daemon.c owns the lifecycle (listen, load the model on a worker thread, signals,
 * drain, shutdown) and the bridge from the engine thread: the engine's notify
 * callback only calls uv_async_send, and the async callback on the loop thread takes
 * every queued event at once and hands it to jobs.c. Everything here runs on the loop
 * thread except the loader.
 */
#ifndef KVD_SERVER_DAEMON_H
#define KVD_SERVER_DAEMON_H

#include <stdbool.h>
#include <stdint.h>

#include <uv.h>

#include "chat.h"
#include "config.h"
#include "http.h"
#include "jobs.h"
#include "kvd/kvd_engine.h"
#include "metrics.h"
#include "router.h"
#include "util.h"

typedef struct kvd_loader kvd_loader;

/* Exit status when the shutdown cut responses it had accepted (drain timeout, second
 * signal): the log names each, with the bytes written. */
#define KVD_EXIT_RESPONSES_CUT 3

typedef struct kvd_daemon {
    uv_loop_t *loop;
    kvd_server_config cfg;
    kvd_logger log;
    char model_name[256];          /* the served name */
    char model_aliases[256];       /* served_model_name split in place at its commas */
    const char *model_names[8];    /* the served name, then its aliases */
    int exit_code;
    int responses_cut;  /* by the shutdown, not by their clients */
    int bound_port;
    int signals_seen;

    kvd_http_server *http;
    uv_async_t engine_async;
    uv_signal_t sigint, sigterm;
    uv_timer_t drain_timer;
    uv_prepare_t loop_prepare;  /* the loop's CPU time per iteration (metrics) */
    double loop_cpu;
    bool loop_cpu_seen;
    uv_async_t load_async;      /* the loader thread is done */
    kvd_loader *loader;         /* NULL once taken or abandoned */

    /* From the loader; read-only afterwards. */
    kvd_model *model;
    kvd_tokenizer *tok;
    kvd_engine *engine;
    kvd_chat_template *chat_template;
    kvd_grammar_cache *grammars;   /* structured output: compiled grammars by source */
    kvd_error load_err;
    int load_rc;

    kvd_metrics metrics;
    kvd_jobs jobs;
    kvd_router router;  /* router.state is the daemon's state */
} kvd_daemon;

/* Sets up handles and the HTTP server. Returns 0 or a negative code with err set. */
int kvd_daemon_init(kvd_daemon *d, uv_loop_t *loop, const kvd_server_config *cfg, kvd_error *err);
/* Listens, prints the address, starts loading the model. */
int kvd_daemon_start(kvd_daemon *d, kvd_error *err);
/* After uv_run returned: stops the engine, frees everything. */
void kvd_daemon_deinit(kvd_daemon *d);
/* Begins a graceful drain (as SIGTERM does). */
void kvd_daemon_drain(kvd_daemon *d);

#endif
