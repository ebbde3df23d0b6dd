/* jobs.h - a request's life from its parsed body to its last byte: the job.
 *
 * A job is one generation, tokenization or KV-snapshot request: a third object beside
 * the HTTP request (connection-scoped, may vanish first) and the engine's sequence
 * (named by its 64-bit id). jobs.c owns the one job type (tagged by kind), the id ->
 * job map, the work it hands to libuv workers (tokenizing prompts, building large
 * answers, the KV snapshot: anything that grows with the input stays off the loop),
 * submission to the engine, the dispatch of engine events to jobs, and abort/cancel.
 * It answers through oai_response.c and http.c and reports to metrics.c; it never
 * calls the router or the daemon above it: the daemon learns that the last job ended
 * through the on_idle callback.
 * Loop thread only, except the work functions that run on libuv workers (they touch
 * only their own job and the immutable model/tokenizer/engine handles).
 */
#ifndef KVD_SERVER_JOBS_H
#define KVD_SERVER_JOBS_H

#include <stdbool.h>
#include <stdint.h>

#include <cjson/cJSON.h>
#include <uv.h>

#include "http.h"
#include "kvd/kvd_engine.h"
#include "metrics.h"
#include "oai_request.h"
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

/* What the jobs need from the served model; filled by the daemon once loaded. */
typedef struct kvd_served_model {
    kvd_engine *engine;
    const kvd_tokenizer *tok;
    kvd_grammar_cache *grammars;   /* structured output (thread-safe: workers compile) */
    kvd_request_params defaults;   /* the model's generation defaults */
    kvd_oai_model_info info;
} kvd_served_model;

typedef struct kvd_jobs {
    uv_loop_t *loop;
    const kvd_logger *log;
    kvd_metrics *metrics;
    const char *model_name;        /* the served name, in every response */
    uint64_t max_response_bytes;   /* a whole response's bound (0: none) */
    kvd_served_model model;        /* engine NULL until loaded */
    bool stopping;                 /* set by the daemon: answers from workers are dropped */
    uv_mutex_t parse_lock;         /* cJSON's parser writes a process-wide error pointer */
    void (*on_idle)(void *arg);    /* called when a job ends and none is left */
    void *on_idle_arg;

    kvd_job_map map;               /* submitted jobs by engine id */
    kvd_job *live;                 /* every job not yet freed (doubly linked) */
    int count;
    uint64_t rng[2];               /* xorshift128+ for response ids and default seeds */
} kvd_jobs;

/* Returns 0 or KVD_ENOMEM (no lock could be made). */
int kvd_jobs_init(kvd_jobs *jobs, uv_loop_t *loop, const kvd_logger *log, kvd_metrics *metrics,
                  const char *model_name);
/* Frees jobs still waiting for the engine (after the engine is destroyed). */
void kvd_jobs_deinit(kvd_jobs *jobs);
uint64_t kvd_jobs_random(kvd_jobs *jobs);

/* Answers outside any job, counted and logged like job answers. */
void kvd_jobs_respond(kvd_jobs *jobs, kvd_http_request *req, int status, const char *content_type,
                      const char *extra_headers, const char *body, size_t len);
void kvd_jobs_respond_json(kvd_jobs *jobs, kvd_http_request *req, int status, cJSON *obj,
                           const char *extra_headers);
void kvd_jobs_send_error(kvd_jobs *jobs, kvd_http_request *req, int status, const char *message,
                         const char *param, const char *code, const char *extra_headers);

/* Parses req's body on a libuv worker (a 4 MiB body takes tens of milliseconds of
 * CPU, which on the loop would stall every stream), then calls then(req, &body, arg,
 * tag) back on the loop with the JSON object; a callee that keeps the tree sets *body
 * to NULL, else it is deleted after the call (off the loop when large). A body that
 * is not a JSON object is answered 400 here. path (static) names the route in the log
 * should the client leave first. */
typedef void (*kvd_jobs_body_cb)(kvd_http_request *req, cJSON **body, void *arg, int tag);
void kvd_jobs_parse_body(kvd_jobs *jobs, kvd_http_request *req, const char *path, kvd_jobs_body_cb then,
                         void *arg, int tag);

/* Each takes over req (answers it now or later) and *body (set to NULL): the route's
 * fields are read on a libuv worker, since reading them grows with the request (a
 * chat template rendered over megabytes of messages, a prompt's text copied, an id
 * array walked), and the tree is freed there. */
void kvd_jobs_generate(kvd_jobs *jobs, kvd_http_request *req, kvd_oai_route route, cJSON **body);
void kvd_jobs_tokenize(kvd_jobs *jobs, kvd_http_request *req, cJSON **body);
/* POST /apply-template (llama-server's route): {"prompt": the rendered chat}. */
void kvd_jobs_apply_template(kvd_jobs *jobs, kvd_http_request *req, cJSON **body);
void kvd_jobs_detokenize(kvd_jobs *jobs, kvd_http_request *req, cJSON **body);
void kvd_jobs_kv(kvd_jobs *jobs, kvd_http_request *req);

/* http.c's on_abort: the client went away. */
void kvd_jobs_on_abort(kvd_jobs *jobs, kvd_http_request *req);
/* Takes ownership of the event list. */
void kvd_jobs_on_events(kvd_jobs *jobs, kvd_event *events);
/* Cancels every submitted job (drain timeout, second signal). */
void kvd_jobs_cancel_all(kvd_jobs *jobs);

#endif
