/* jobs.c - jobs: the id map, worker offload, submission, event dispatch, abort.
 *
 * A generation request becomes a job: its body was parsed on the loop thread, the
 * prompt is tokenized on a libuv worker (encoding a multi-megabyte prompt takes long
 * enough to stall every other stream if done on the loop; the tokenizer is safe to
 * share across threads), then submitted to the engine. Engine events find their job
 * through the id map; streamed jobs write one SSE event per engine event, whole ones
 * keep each choice's JSON text until every choice has finished. A client that goes
 * away cancels its engine request; the job lingers until the engine confirms each
 * choice finished, so its blocks are known to be free before the job is.
 * /tokenize and /detokenize answers grow with their input, so they are built on the
 * worker too; GET /v1/kv waits for the running engine step, so its snapshot is taken
 * there as well.
 */
#include "jobs.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "oai_response.h"
#include "web.h"

typedef enum kvd_job_kind {
    KVD_JOB_COMPLETION,
    KVD_JOB_CHAT,
    KVD_JOB_TOKENIZE,
    KVD_JOB_DETOKENIZE,
    KVD_JOB_KV,
    KVD_JOB_BODY, /* a body being parsed, before the route's own job */
    KVD_JOB_APPLY_TEMPLATE,
} kvd_job_kind;

static const char *const job_paths[] = {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                                        "/v1/kv", "-", "/apply-template"};

typedef struct job_choice {
    kvd_oai_choice out;      /* whole responses: the choice's text and logprobs so far */
    kvd_tool_parser tools;   /* chat with tools: the model's calls out of its text */
    kvd_tool_delta primed;   /* calls a continued assistant message completed, sent first */
    int num_calls;           /* calls streamed so far */
    size_t text_offset;      /* streamed completions: logprobs.text_offset of the next token */
    int completion_tokens;
    uint64_t last_token_ns;
    bool done;
} job_choice;

struct kvd_job {
    kvd_job *prev, *next;    /* jobs->live */
    kvd_jobs *jobs;
    kvd_http_request *req;   /* NULL once answered or aborted */
    kvd_job_kind kind;
    const char *method;      /* for the log line, after req is gone */
    const char *path;        /* likewise (static) */
    char id[64];
    char request_id[129];    /* the request's X-Request-ID, "" when it had none */
    kvd_oai_request oai;
    kvd_oai_response resp;
    int32_t *prompt;         /* tokens (generation, tokenize) or ids to decode (detokenize) */
    int num_prompt;
    uv_work_t work;
    uv_work_cb work_fn;      /* what job_start_work runs on the worker */
    bool working;            /* on a libuv worker; its after-callback frees the job */
    int work_rc;
    kvd_error work_err;
    char *raw;               /* KVD_JOB_BODY: a copy of the request body, [raw_len] */
    size_t raw_len;
    cJSON *body;             /* KVD_JOB_BODY: raw parsed (NULL: not JSON); a route's job: its
                              * body until parse_work has read it */
    int parse_rc;            /* parse_work: the route's fields refused (KVD_EINVAL) or 0 */
    char parse_param[128];   /* the field refused */
    bool body_has_nul;       /* KVD_JOB_BODY: a string holds a NUL, in the field nul_field */
    char nul_field[128];
    kvd_jobs_body_cb then;
    void *then_arg;
    int then_tag;
    bool grammar_failed;     /* the structured-output source did not compile (a 400) */
    char *answer;            /* built on the worker: the 200 body */
    size_t answer_len;
    uint64_t engine_id;      /* 0 until submitted */
    job_choice *choices;
    int num_choices;
    int num_done;
    int prompt_tokens;
    int cached_tokens;
    uint64_t arrival_ns;
    uint64_t first_token_ns;
    kvd_request_timing timing; /* the engine's share of the ttft */
    bool aborted;
    bool failed;
    int fail_status;
    char error[400];
    int status;
};

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

/* ---- the set of jobs ---- */

uint64_t kvd_jobs_random(kvd_jobs *jobs)
{
    uint64_t s1 = jobs->rng[0];
    const uint64_t s0 = jobs->rng[1];
    jobs->rng[0] = s0;
    s1 ^= s1 << 23;
    jobs->rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return jobs->rng[1] + s0;
}

int kvd_jobs_init(kvd_jobs *jobs, uv_loop_t *loop, const kvd_logger *log, kvd_metrics *metrics,
                  const char *model_name)
{
    memset(jobs, 0, sizeof *jobs);
    if (uv_mutex_init(&jobs->parse_lock) != 0)
        return KVD_ENOMEM;
    jobs->loop = loop;
    jobs->log = log;
    jobs->metrics = metrics;
    jobs->model_name = model_name;
    jobs->rng[0] = uv_hrtime() ^ 0x9e3779b97f4a7c15ULL;
    jobs->rng[1] = ((uint64_t)uv_os_getpid() << 32) ^ (uint64_t)(uintptr_t)jobs ^ 0xbf58476d1ce4e5b9ULL;
    for (int i = 0; i < 8; i++)
        kvd_jobs_random(jobs);
    return 0;
}

/* ---- answers ---- */

static double ms_between(uint64_t from_ns, uint64_t to_ns)
{
    return to_ns > from_ns ? (double)(to_ns - from_ns) / 1e6 : 0.0;
}

static void log_request(const kvd_jobs *jobs, const char *id, const char *method, const char *path, int status,
                        int prompt, int cached, int completion, uint64_t arrival_ns, uint64_t first_ns,
                        const kvd_request_timing *timing, const char *request_id)
{
    uint64_t now = uv_hrtime();
    char ttft[160];
    if (first_ns)
        snprintf(ttft, sizeof ttft, "%.1fms queue=%.1fms load=%.1fms prefill=%.1fms prefill_steps=%d step_tokens=%d",
                 ms_between(arrival_ns, first_ns), (double)timing->queue_ms, (double)timing->load_ms,
                 (double)timing->prefill_ms, timing->prefill_steps, timing->prefill_step_tokens);
    else
        snprintf(ttft, sizeof ttft, "-");
    kvd_log(jobs->log, KVD_LOG_INFO,
            "request %s %s %s %d prompt_tokens=%d cached_tokens=%d completion_tokens=%d ttft=%s total=%.1fms"
            " request_id=%s", id, method, path, status, prompt, cached, completion, ttft, ms_between(arrival_ns, now),
            request_id && *request_id ? request_id : "-");
}

void kvd_jobs_respond(kvd_jobs *jobs, kvd_http_request *req, int status, const char *content_type,
                      const char *extra_headers, const char *body, size_t len)
{
    jobs->metrics->http_requests++;
    log_request(jobs, "-", kvd_http_method(req), kvd_http_path(req), status, 0, 0, 0, kvd_http_arrival_ns(req), 0,
                NULL, kvd_http_request_id(req));
    kvd_http_respond(req, status, content_type, extra_headers, body, len);
}

static const char oom_body[] =
    "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";

void kvd_jobs_respond_json(kvd_jobs *jobs, kvd_http_request *req, int status, cJSON *obj,
                           const char *extra_headers)
{
    char *text = obj ? cJSON_PrintUnformatted(obj) : NULL;
    cJSON_Delete(obj);
    if (!text) {
        kvd_jobs_respond(jobs, req, 500, "application/json", NULL, oom_body, sizeof oom_body - 1);
        return;
    }
    kvd_jobs_respond(jobs, req, status, "application/json", extra_headers, text, strlen(text));
    free(text);
}

void kvd_jobs_send_error(kvd_jobs *jobs, kvd_http_request *req, int status, const char *message,
                         const char *param, const char *code, const char *extra_headers)
{
    kvd_jobs_respond_json(jobs, req, status, kvd_oai_error_object(status, message, param, code), extra_headers);
}

/* ---- job lifecycle ---- */

static kvd_job *job_create(kvd_jobs *jobs, kvd_http_request *req, kvd_job_kind kind)
{
    kvd_job *job = calloc(1, sizeof *job);
    if (!job)
        return NULL;
    job->jobs = jobs;
    job->req = req;
    job->kind = kind;
    job->method = kind == KVD_JOB_KV ? "GET" : "POST";
    job->path = job_paths[kind];
    job->arrival_ns = kvd_http_arrival_ns(req);
    job->status = 200;
    const char *request_id = kvd_http_request_id(req);
    if (request_id) /* kept: the job is logged after its request is answered and gone */
        snprintf(job->request_id, sizeof job->request_id, "%s", request_id);
    kvd_oai_request_init(&job->oai);
    if (kind == KVD_JOB_CHAT || kind == KVD_JOB_COMPLETION)
        snprintf(job->id, sizeof job->id, "%s%016" PRIx64 "%08" PRIx32, kind == KVD_JOB_CHAT ? "chatcmpl-" : "cmpl-",
                 kvd_jobs_random(jobs), (uint32_t)kvd_jobs_random(jobs));
    else
        snprintf(job->id, sizeof job->id, "-"); /* its response has no id; logged like other such routes */
    job->next = jobs->live;
    if (jobs->live)
        jobs->live->prev = job;
    jobs->live = job;
    jobs->count++;
    kvd_http_set_user(req, job);
    return job;
}

/* The bytes a job's buffers hold, roughly (the prompt as ids and text, the rendered
 * chat, the choices' texts and logprobs, an answer not handed over). */
static size_t job_heap_bytes(const kvd_job *job)
{
    size_t total = (size_t)job->num_prompt * sizeof *job->prompt + job->oai.prompt_len + job->oai.chat.text.cap +
                   job->answer_len + job->raw_len;
    for (int i = 0; i < job->num_choices; i++)
        total += kvd_oai_choice_bytes(&job->choices[i].out);
    return total;
}

#define JOB_FREE_OFF_LOOP_BYTES (1u << 20)

/* Frees what the job holds, on whichever thread (plain memory only). */
static void job_release_buffers(kvd_job *job)
{
    for (int i = 0; i < job->num_choices; i++) {
        kvd_oai_choice_deinit(&job->choices[i].out);
        kvd_tool_parser_deinit(&job->choices[i].tools);
        kvd_tool_delta_deinit(&job->choices[i].primed);
    }
    free(job->choices);
    free(job->prompt);
    free(job->answer);
    free(job->raw);
    cJSON_Delete(job->body);
    kvd_oai_request_deinit(&job->oai);
}

static void job_release_work(uv_work_t *work)
{
    job_release_buffers(work->data);
}

static void after_job_release(uv_work_t *work, int status)
{
    if (status == UV_ECANCELED) /* never ran */
        job_release_buffers(work->data);
    free(work->data);
}

static void job_free(kvd_job *job)
{
    kvd_jobs *jobs = job->jobs;
    if (job->req) {
        /* Unreachable by design (every path answers first); answer rather than leave
         * the connection hanging with nobody owning its request. */
        kvd_http_request *req = job->req;
        job->req = NULL;
        kvd_http_set_user(req, NULL);
        kvd_http_respond(req, 500, NULL, NULL, "", 0);
    }
    if (job->engine_id)
        kvd_job_map_remove(&jobs->map, job->engine_id);
    if (job->prev)
        job->prev->next = job->next;
    else
        jobs->live = job->next;
    if (job->next)
        job->next->prev = job->prev;
    kvd_grammar_release(job->oai.params.grammar); /* the engine holds its own reference */
    job->oai.params.grammar = NULL;
    /* A job that holds megabytes (a long prompt's text and ids, a whole answer's
     * choices) is freed on a worker: the frees would otherwise hold the loop. */
    job->work.data = job;
    if (job_heap_bytes(job) < JOB_FREE_OFF_LOOP_BYTES ||
        kvd_queue_work(jobs->loop, &job->work, job_release_work, after_job_release) != 0) {
        job_release_buffers(job);
        free(job);
    }
    jobs->count--;
    if (jobs->count == 0 && jobs->on_idle)
        jobs->on_idle(jobs->on_idle_arg);
}

/* Frees jobs still waiting for the engine at shutdown (the engine is gone). */
void kvd_jobs_deinit(kvd_jobs *jobs)
{
    jobs->on_idle = NULL;
    kvd_job *job = jobs->live;
    while (job) {
        kvd_job *next = job->next;
        if (!job->working) {
            job->req = NULL;
            job_free(job);
        }
        job = next;
    }
    kvd_job_map_deinit(&jobs->map);
    /* A job still on a worker may be parsing under the lock (its after-callback frees
     * it when the caller runs the loop once more): the lock then outlives this call,
     * and ends with the process. */
    if (!jobs->live)
        uv_mutex_destroy(&jobs->parse_lock);
}

static int job_completion_tokens(const kvd_job *job)
{
    int total = 0;
    for (int i = 0; i < job->num_choices; i++)
        total += job->choices[i].completion_tokens;
    return total;
}

static void job_log(kvd_job *job)
{
    log_request(job->jobs, job->id, job->method, job->path, job->status, job->prompt_tokens,
                job->cached_tokens, job_completion_tokens(job), job->arrival_ns, job->first_token_ns, &job->timing,
                job->request_id);
}

/* Takes the job's request to answer it: counted, logged, detached from the job. */
static kvd_http_request *job_take_request(kvd_job *job, int status)
{
    kvd_http_request *req = job->req;
    job->req = NULL;
    job->status = status;
    kvd_http_set_user(req, NULL);
    job->jobs->metrics->http_requests++;
    job_log(job);
    return req;
}

/* Answers a job's request with an error and frees the job. */
static void job_fail(kvd_job *job, int status, const char *message, const char *param, const char *code,
                     const char *extra_headers)
{
    if (job->req) {
        kvd_http_request *req = job_take_request(job, status);
        size_t len = 0;
        char *text = kvd_oai_error_body(status, message, param, code, &len);
        if (text)
            kvd_http_respond(req, status, "application/json", extra_headers, text, len);
        else
            kvd_http_respond(req, 500, "application/json", NULL, oom_body, sizeof oom_body - 1);
        free(text);
    }
    job_free(job);
}

/* Answers 200 with the body a worker built (job->answer, handed to the connection
 * without a copy) and frees the job. */
static void job_answer(kvd_job *job, const char *content_type)
{
    kvd_http_request *req = job_take_request(job, 200);
    char *body = job->answer;
    job->answer = NULL;
    kvd_http_respond_take(req, 200, content_type, NULL, body, job->answer_len);
    job_free(job);
}

/* ---- worker offload ---- */

/* A job's work came back from a libuv worker. Returns false (and frees the job) when
 * there is nobody left to answer: the client went away, or the server is stopping. */
static bool job_back_from_worker(kvd_job *job, int status)
{
    job->working = false;
    if (job->aborted || !job->req || job->jobs->stopping || status < 0) {
        if (job->aborted)
            job_log(job);
        job_free(job);
        return false;
    }
    return true;
}

static void job_run_work(uv_work_t *work)
{
    kvd_job *job = work->data;
    kvd_worker_yield_to_engine();
    job->work_fn(work);
}

/* Hands the job to a libuv worker; `after` runs back on the loop (and must start with
 * job_back_from_worker). */
static void job_start_work(kvd_job *job, uv_work_cb work, uv_after_work_cb after, const char *failure)
{
    job->work.data = job;
    job->work_fn = work;
    job->working = true;
    if (kvd_queue_work(job->jobs->loop, &job->work, job_run_work, after) < 0) {
        job->working = false;
        job_fail(job, 500, failure, NULL, NULL, NULL);
    }
}

/* ---- generation: events ---- */

static kvd_oai_usage job_usage(const kvd_job *job)
{
    kvd_oai_usage u = {job->prompt_tokens, job_completion_tokens(job), job->cached_tokens};
    return u;
}

/* Queues SSE bytes; a write refused for backpressure closes the connection, and
 * on_abort follows and cancels the engine request. */
static void stream_write(kvd_job *job, kvd_sbuf *sse)
{
    if (job->req && !sse->failed && sse->len)
        kvd_http_stream_write(job->req, sse->data, sse->len);
    kvd_sbuf_reset(sse);
}

static size_t job_held_bytes(const kvd_job *job)
{
    size_t total = 0;
    for (int i = 0; i < job->num_choices; i++)
        total += kvd_oai_choice_bytes(&job->choices[i].out);
    return total;
}

static void outgrew_message(uint64_t limit, char *msg, size_t cap)
{
    snprintf(msg, cap,
             "the response outgrew max_response_bytes %" PRIu64 "; lower n or max_tokens, or set \"stream\": true",
             limit);
}

/* Runs on a libuv worker: the logprobs are printed and the whole body built here (it
 * grows with n x max_tokens: tens of MB with logprobs). The job is done with the
 * engine, so only this thread touches it. */
static void whole_body_work(uv_work_t *work)
{
    kvd_job *job = work->data;
    for (int i = 0; i < job->num_choices; i++) {
        if (kvd_oai_choice_format(&job->resp, &job->choices[i].out) != 0) {
            job->work_rc = KVD_ENOMEM;
            return;
        }
    }
    uint64_t limit = job->jobs->max_response_bytes;
    if (limit && job_held_bytes(job) > limit) {
        job->failed = true;
        job->fail_status = 400;
        outgrew_message(limit, job->error, sizeof job->error);
        return;
    }
    kvd_oai_usage usage = job_usage(job);
    kvd_oai_choice *outs = malloc((size_t)job->num_choices * sizeof *outs);
    if (!outs) {
        job->work_rc = KVD_ENOMEM;
        return;
    }
    for (int i = 0; i < job->num_choices; i++)
        outs[i] = job->choices[i].out;
    job->answer = kvd_oai_whole_body(&job->resp, outs, job->num_choices, &usage, &job->answer_len);
    for (int i = 0; i < job->num_choices; i++) {
        kvd_oai_choice_deinit(&outs[i]);
        kvd_oai_choice_init(&job->choices[i].out);
    }
    free(outs);
    job->work_rc = job->answer ? 0 : KVD_ENOMEM;
}

static void after_whole_body(uv_work_t *work, int status)
{
    kvd_job *job = work->data;
    if (!job_back_from_worker(job, status))
        return;
    if (job->failed)
        job_fail(job, job->fail_status, job->error, NULL, NULL, NULL);
    else if (job->work_rc < 0)
        job_fail(job, 500, "out of memory", NULL, NULL, NULL);
    else
        job_answer(job, "application/json");
}

static void job_complete(kvd_job *job)
{
    kvd_jobs *jobs = job->jobs;
    uint64_t now = uv_hrtime();
    if (!job->aborted)
        kvd_histogram_observe(&jobs->metrics->e2e_request_latency, (double)(now - job->arrival_ns) / 1e9, 1);
    if (!job->req) {
        job_log(job);
        job_free(job);
    } else if (job->oai.stream) {
        kvd_sbuf sse = {0};
        kvd_oai_usage usage = job_usage(job);
        kvd_oai_sse_end(&job->resp, &usage, &sse);
        stream_write(job, &sse);
        kvd_sbuf_deinit(&sse);
        kvd_http_request *req = job_take_request(job, job->status);
        kvd_http_stream_end(req);
        job_free(job);
    } else if (job->failed) {
        job_fail(job, job->fail_status, job->error, NULL, NULL, NULL);
    } else {
        job_start_work(job, whole_body_work, after_whole_body, "cannot queue the response");
    }
}

/* Gives up on a whole response: frees what it holds and cancels the rest; the error
 * is answered once the engine confirms every choice ended. */
static void job_stop(kvd_job *job, int status, const char *message)
{
    job->failed = true;
    job->fail_status = status;
    snprintf(job->error, sizeof job->error, "%s", message);
    for (int i = 0; i < job->num_choices; i++) {
        kvd_oai_choice_deinit(&job->choices[i].out);
        kvd_oai_choice_init(&job->choices[i].out);
    }
    if (job->engine_id && job->jobs->model.engine)
        kvd_engine_cancel(job->jobs->model.engine, job->engine_id);
}

/* Stops a whole response that outgrew max_response_bytes. */
static void job_check_held(kvd_job *job)
{
    uint64_t limit = job->jobs->max_response_bytes;
    if (!limit || job_held_bytes(job) <= limit)
        return;
    char msg[256];
    outgrew_message(limit, msg, sizeof msg);
    job_stop(job, 400, msg);
}

/* A chat with tools: the event's text goes through the choice's tool-call parser;
 * content and calls are sent (streams) or kept (whole responses) as they resolve. */
static void handle_tool_event(kvd_job *job, job_choice *ch, const kvd_event *ev)
{
    kvd_tool_delta d;
    kvd_tool_delta_init(&d);
    /* calls the prefill completed go out with the first event */
    d.calls = ch->primed.calls;
    d.num_calls = ch->primed.num_calls;
    ch->primed.calls = NULL;
    ch->primed.num_calls = 0;
    bool last = ev->finish != KVD_FINISH_NONE;
    const char *text = ev->text;
    size_t text_len = ev->text_len;
    char *closed = NULL;
    if (job->oai.forced_tool_call && ev->finish == KVD_FINISH_STOP) {
        /* The grammar ended the forced call's JSON: close the block the prompt opened
         * (a stop string cut before that leaves bad JSON, which the reader keeps as content). */
        size_t suffix_len = strlen(KVD_CHAT_FORCED_CALL_SUFFIX);
        closed = malloc(text_len + suffix_len + 1);
        if (closed) {
            if (text_len)
                memcpy(closed, text, text_len);
            memcpy(closed + text_len, KVD_CHAT_FORCED_CALL_SUFFIX, suffix_len + 1);
            text = closed;
            text_len += suffix_len;
        }
    }
    int rc = closed || !(job->oai.forced_tool_call && ev->finish == KVD_FINISH_STOP)
                 ? kvd_tool_parser_feed(&ch->tools, text, text_len, last, &d)
                 : KVD_ENOMEM;
    free(closed);
    kvd_event content = *ev;
    content.text = d.content.data ? d.content.data : "";
    content.text_len = d.content.len;
    content.finish = KVD_FINISH_NONE;
    if (!job->oai.logprobs && content.text_len == 0)
        content.num_tokens = 0; /* no empty chunk for tokens that were all held back */
    if (rc != 0) {
        job_stop(job, 500, "out of memory");
    } else if (job->oai.stream) {
        kvd_sbuf sse = {0};
        kvd_oai_sse_event(&job->resp, &ch->text_offset, &content, &sse);
        kvd_oai_sse_tool_calls(&job->resp, ev->choice, ch->num_calls, d.calls, d.num_calls, &sse);
        ch->num_calls += d.num_calls;
        if (ev->finish == KVD_FINISH_ERROR) {
            kvd_event end = *ev;
            end.num_tokens = 0;
            end.text_len = 0;
            kvd_oai_sse_event(&job->resp, &ch->text_offset, &end, &sse);
        } else if (ev->finish == KVD_FINISH_STOP || ev->finish == KVD_FINISH_LENGTH) {
            bool calls = ch->num_calls > 0 && ev->finish == KVD_FINISH_STOP;
            kvd_oai_sse_finish(&job->resp, ev->choice, calls ? "tool_calls" : kvd_finish_reason_name(ev->finish), &sse);
        }
        stream_write(job, &sse);
        kvd_sbuf_deinit(&sse);
    } else if (!job->failed) {
        if (kvd_oai_choice_add(&job->resp, &ch->out, &content) != 0 ||
            kvd_oai_choice_add_calls(&job->resp, &ch->out, ev->choice, d.calls, d.num_calls) != 0) {
            job_stop(job, 500, "out of memory");
        } else {
            job_check_held(job);
        }
    }
    kvd_tool_delta_deinit(&d);
}

static void handle_event(kvd_job *job, const kvd_event *ev)
{
    kvd_jobs *jobs = job->jobs;
    if (ev->choice < 0 || ev->choice >= job->num_choices)
        return;
    job_choice *ch = &job->choices[ev->choice];
    if (ch->done)
        return;
    uint64_t now = uv_hrtime();
    job->prompt_tokens = ev->prompt_tokens;
    job->cached_tokens = ev->cached_tokens;
    if (ev->num_tokens > 0) {
        if (!job->first_token_ns) {
            job->first_token_ns = now;
            job->timing = ev->timing;
            if (!job->aborted)
                kvd_histogram_observe(&jobs->metrics->time_to_first_token, (double)(now - job->arrival_ns) / 1e9, 1);
        } else if (ch->last_token_ns && !job->aborted) {
            kvd_histogram_observe(&jobs->metrics->time_per_output_token,
                                  (double)(now - ch->last_token_ns) / 1e9 / ev->num_tokens, (uint64_t)ev->num_tokens);
        }
        ch->last_token_ns = now;
    }
    ch->completion_tokens = ev->completion_tokens;
    if (job->oai.tool_calls && job->req) {
        handle_tool_event(job, ch, ev);
    } else if (job->req && job->oai.stream) {
        kvd_sbuf sse = {0};
        kvd_oai_sse_event(&job->resp, &ch->text_offset, ev, &sse);
        stream_write(job, &sse);
        kvd_sbuf_deinit(&sse);
    } else if (job->req && !job->failed) {
        if (kvd_oai_choice_add(&job->resp, &ch->out, ev) != 0) {
            job_stop(job, 500, "out of memory");
        } else {
            job_check_held(job);
        }
    }
    if (ev->finish != KVD_FINISH_NONE) {
        ch->done = true;
        ch->out.finish = ev->finish;
        if (job->failed) /* job_stop freed the buffers; nothing more is kept */
            kvd_oai_choice_deinit(&ch->out);
        job->num_done++;
        jobs->metrics->finished[ev->finish]++;
        if (ev->finish == KVD_FINISH_ERROR && !job->failed) {
            job->failed = true;
            job->fail_status = 500;
            snprintf(job->error, sizeof job->error, "%s", ev->error[0] ? ev->error : "generation failed");
        }
    }
    if (job->num_done == job->num_choices)
        job_complete(job);
}

void kvd_jobs_on_events(kvd_jobs *jobs, kvd_event *events)
{
    for (kvd_event *ev = events; ev; ev = ev->next) {
        kvd_job *job = kvd_job_map_get(&jobs->map, ev->request_id);
        if (job)
            handle_event(job, ev);
    }
    kvd_event_free(events);
}

/* ---- generation: submission ---- */

/* echo (completions): every choice's text starts with the prompt's, as vLLM does: the
 * prompt as sent, or its ids decoded. Streams get it as each choice's first chunk. */
static void job_echo_prompt(kvd_job *job)
{
    size_t len = job->oai.prompt_len;
    char *decoded = NULL;
    const char *text = job->oai.prompt_text;
    if (!text) {
        decoded = kvd_tokenizer_decode(job->jobs->model.tok, job->prompt, (size_t)job->num_prompt, false, &len, NULL);
        text = decoded ? decoded : "";
        len = decoded ? len : 0;
    }
    kvd_sbuf sse = {0};
    for (int i = 0; i < job->num_choices; i++) {
        if (job->oai.stream) {
            kvd_event ev = {.choice = i, .text = (char *)text, .text_len = len, .prompt_tokens = job->num_prompt};
            kvd_oai_sse_event(&job->resp, &job->choices[i].text_offset, &ev, &sse);
        } else {
            kvd_sbuf_append(&job->choices[i].out.text, text, len);
        }
    }
    stream_write(job, &sse);
    kvd_sbuf_deinit(&sse);
    free(decoded);
}

static void job_submit(kvd_job *job)
{
    kvd_jobs *jobs = job->jobs;
    kvd_engine *engine = jobs->model.engine;
    if (job->num_prompt == 0) {
        job_fail(job, 400, "prompt: must not be empty", "prompt", NULL, NULL);
        return;
    }
    if (!job->oai.seed_given)
        job->oai.params.sampling.seed = kvd_jobs_random(jobs);
    job->num_choices = job->oai.params.n;
    job->choices = calloc((size_t)job->num_choices, sizeof *job->choices);
    if (!job->choices) {
        job_fail(job, 500, "out of memory", NULL, NULL, NULL);
        return;
    }
    for (int i = 0; i < job->num_choices; i++) {
        job_choice *ch = &job->choices[i];
        kvd_tool_parser_init(&ch->tools, job->oai.parallel_tool_calls);
        /* a prefilled assistant turn that opened a <tool_call> is finished by the model */
        const char *prefill = job->oai.forced_tool_call ? KVD_CHAT_FORCED_CALL_PREFIX : job->oai.chat.continued;
        size_t prefill_len = job->oai.forced_tool_call ? strlen(prefill) : job->oai.chat.continued_len;
        if (job->oai.tool_calls && prefill &&
            kvd_tool_parser_prime(&ch->tools, prefill, prefill_len, &ch->primed) != 0) {
            job_fail(job, 500, "out of memory", NULL, NULL, NULL);
            return;
        }
    }
    job->prompt_tokens = job->num_prompt;
    kvd_error err = {0};
    int64_t id = kvd_engine_submit(engine, job->prompt, job->num_prompt, &job->oai.params, &err);
    if (id <= 0) {
        const char *msg = err.msg[0] ? err.msg : kvd_strerror((int)id);
        switch ((int)id) {
        case KVD_ETOOLONG: {
            char text[640];
            snprintf(text, sizeof text, "the prompt of %d tokens does not fit: %s", job->num_prompt, msg);
            job_fail(job, 400, text, job->kind == KVD_JOB_CHAT ? "messages" : "prompt", "context_length_exceeded",
                     NULL);
            break;
        }
        case KVD_EBUSY:
            job_fail(job, 429, "the waiting queue is full; retry later", NULL, "queue_full", "Retry-After: 1\r\n");
            break;
        case KVD_EINVAL:
            job_fail(job, 400, msg, NULL, NULL, NULL);
            break;
        default:
            job_fail(job, 500, msg, NULL, NULL, NULL);
            break;
        }
        return;
    }
    job->engine_id = (uint64_t)id;
    if (kvd_job_map_put(&jobs->map, job->engine_id, job) != 0) {
        kvd_engine_cancel(engine, job->engine_id);
        job->engine_id = 0;
        job_fail(job, 500, "out of memory", NULL, NULL, NULL);
        return;
    }
    if (job->oai.stream) {
        /* Headers (and the chat role chunk) go out now, so the client's time to
         * first token measures the model, not our buffering. */
        kvd_http_stream_begin(job->req, 200, "text/event-stream; charset=utf-8", "X-Accel-Buffering: no\r\n");
        if (job->kind == KVD_JOB_CHAT) {
            kvd_sbuf sse = {0};
            for (int i = 0; i < job->num_choices; i++)
                kvd_oai_sse_role(&job->resp, i, &sse);
            stream_write(job, &sse);
            kvd_sbuf_deinit(&sse);
        }
    }
    if (job->oai.echo)
        job_echo_prompt(job);
}

/* ---- tokenization on a worker ---- */

static void tokenize_work(uv_work_t *work)
{
    kvd_job *job = work->data;
    const kvd_tokenizer *tok = job->jobs->model.tok;
    if (job->oai.constrained) {
        /* Compiling a schema can take milliseconds: here, never on the loop or in a step. */
        job->oai.params.grammar = kvd_grammar_cache_get(job->jobs->model.grammars, job->oai.constraint_kind,
                                                        job->oai.constraint_src, job->oai.constraint_len,
                                                        &job->work_err);
        if (!job->oai.params.grammar) {
            job->grammar_failed = true;
            job->work_rc = job->work_err.code ? job->work_err.code : KVD_EINVAL;
            return;
        }
    }
    if (job->prompt) /* the client sent ids: only the grammar needed a worker */
        return;
    if (job->oai.prompt_text) {
        job->work_rc = kvd_tokenizer_encode(tok, job->oai.prompt_text, job->oai.prompt_len, true, &job->prompt);
        if (job->work_rc < 0)
            kvd_error_set(&job->work_err, job->work_rc, "prompt: tokenization failed");
    } else {
        job->work_rc = kvd_chat_encode(&job->oai.chat, tok, &job->prompt, &job->work_err);
    }
    job->num_prompt = job->work_rc > 0 ? job->work_rc : 0;
    if (job->kind != KVD_JOB_TOKENIZE || job->work_rc < 0)
        return;
    /* The /tokenize answer grows with the prompt (megabytes for a 4 MiB body). */
    kvd_sbuf out = {0};
    kvd_sbuf_reserve(&out, (size_t)job->num_prompt * 8 + 64);
    kvd_sbuf_puts(&out, "{\"tokens\":[");
    for (int i = 0; i < job->num_prompt; i++)
        kvd_sbuf_printf(&out, i ? ",%d" : "%d", (int)job->prompt[i]);
    kvd_sbuf_printf(&out, "],\"count\":%d,\"max_model_len\":%d}", job->num_prompt,
                    job->jobs->model.info.max_model_len);
    job->answer = kvd_sbuf_take(&out, &job->answer_len);
    if (!job->answer)
        job->work_rc = kvd_error_set(&job->work_err, KVD_ENOMEM, "out of memory");
}

/* Back on the loop after tokenize_work: answers /tokenize, or submits. */
static void finish_tokenize(kvd_job *job)
{
    if (job->grammar_failed) {
        char msg[700];
        snprintf(msg, sizeof msg, "%s: %s", job->oai.constraint_field, job->work_err.msg);
        job_fail(job, job->work_rc == KVD_ENOMEM ? 500 : 400, msg, job->oai.constraint_field, NULL, NULL);
        return;
    }
    if (job->work_rc < 0) {
        job_fail(job, 500, job->work_err.msg[0] ? job->work_err.msg : "tokenization failed", NULL, NULL, NULL);
        return;
    }
    if (job->kind == KVD_JOB_TOKENIZE) {
        job->prompt_tokens = job->num_prompt;
        job_answer(job, "application/json");
    } else {
        job_submit(job);
    }
}


/* ---- request bodies, parsed on a worker ---- */

static void body_work(uv_work_t *work)
{
    kvd_job *job = work->data;
    uv_mutex_lock(&job->jobs->parse_lock);
    job->body = cJSON_ParseWithLength(job->raw, job->raw_len);
    uv_mutex_unlock(&job->jobs->parse_lock);
    if (cJSON_IsObject(job->body))
        job->body_has_nul = kvd_oai_find_nul(job->raw, job->raw_len, job->nul_field, sizeof job->nul_field);
    free(job->raw);
    job->raw = NULL;
}

static void after_body(uv_work_t *work, int status)
{
    kvd_job *job = work->data;
    if (!job_back_from_worker(job, status))
        return;
    if (!job->body) {
        job_fail(job, 400,
                 job->raw_len == 0 ? "the request body is empty; expected a JSON object"
                                   : "malformed JSON in the request body",
                 NULL, "invalid_json", NULL);
        return;
    }
    if (!cJSON_IsObject(job->body)) {
        job_fail(job, 400, "the request body must be a JSON object", NULL, "invalid_json", NULL);
        return;
    }
    if (job->body_has_nul) {
        /* cJSON strings end at a NUL: refuse rather than cut the text silently. */
        char msg[256];
        snprintf(msg, sizeof msg, "%s: a string holds a NUL character (\\u0000), which kvd does not accept",
                 job->nul_field);
        kvd_log(job->jobs->log, KVD_LOG_WARN, "refused %s %s: %s", job->method, job->path, msg);
        job_fail(job, 400, msg, job->nul_field, NULL, NULL);
        return;
    }
    kvd_http_request *req = job->req;
    job->req = NULL;
    kvd_http_set_user(req, NULL);
    /* The route's own job exists before this one is freed, so a drain never sees a
     * moment with no job in between. */
    job->then(req, &job->body, job->then_arg, job->then_tag);
    if (!job->body)
        job->raw_len = 0; /* handed over: nothing big left to free here */
    job_free(job);
}

void kvd_jobs_parse_body(kvd_jobs *jobs, kvd_http_request *req, const char *path, kvd_jobs_body_cb then,
                         void *arg, int tag)
{
    kvd_job *job = job_create(jobs, req, KVD_JOB_BODY);
    size_t len = 0;
    /* Taken, not copied (megabytes on the loop): the connection may go while the
     * worker parses. */
    char *raw = job ? kvd_http_take_body(req, &len) : NULL;
    if (!raw) {
        if (job)
            job_fail(job, 500, "out of memory", NULL, NULL, NULL);
        else
            kvd_jobs_send_error(jobs, req, 500, "out of memory", NULL, NULL, NULL);
        return;
    }
    job->raw = raw;
    job->raw_len = len;
    job->path = path;
    job->then = then;
    job->then_arg = arg;
    job->then_tag = tag;
    job_start_work(job, body_work, after_body, "cannot queue the request body");
}

/* ---- starting jobs ---- */

/* A new job for req, or NULL after answering 500. */
static kvd_job *job_begin(kvd_jobs *jobs, kvd_http_request *req, kvd_job_kind kind)
{
    kvd_job *job = job_create(jobs, req, kind);
    if (!job)
        kvd_jobs_send_error(jobs, req, 500, "out of memory", NULL, NULL, NULL);
    return job;
}

/* Answers a refused body (400 naming param, or 500) and frees the job; false when
 * rc is 0. */
static bool job_parse_failed(kvd_job *job, int rc, const kvd_error *err, const char *param)
{
    if (rc == 0)
        return false;
    /* The log says which field was refused (unsupported ones included). */
    kvd_log(job->jobs->log, KVD_LOG_WARN, "refused %s: %s", job_paths[job->kind], err->msg);
    job_fail(job, rc == KVD_ENOMEM ? 500 : 400, err->msg, param, NULL, NULL);
    return true;
}

/* A whole response is held in memory until its last choice ends, so its size is
 * bounded: requests whose answer would be larger than max_response_bytes are refused
 * before any work, counting per logprob entry (the sampled token and each alternative,
 * of every token of every choice) a little more than one prints as on average
 * (KVD_OAI_*_LOGPROB_ENTRY_BYTES), one byte per token without logprobs. One that
 * outgrows the bound anyway is stopped when it does (handle_event: raw logprobs count
 * at the estimate), or once its logprobs are printed (whole_body_work: at their
 * printed size). Streams are bounded by the connection's write queue instead. */

/* Whether a whole answer would pass max_response_bytes (streams never do). */
static bool response_too_large(const kvd_job *job, uint64_t *estimate, uint64_t *per_token)
{
    uint64_t limit = job->jobs->max_response_bytes;
    const kvd_request_params *p = &job->oai.params;
    uint64_t entry =
        job->kind == KVD_JOB_CHAT ? KVD_OAI_CHAT_LOGPROB_ENTRY_BYTES : KVD_OAI_COMPLETION_LOGPROB_ENTRY_BYTES;
    *per_token = job->oai.logprobs ? (uint64_t)(1 + job->oai.top_logprobs) * entry : 1;
    *estimate = (uint64_t)p->n * (uint64_t)p->max_tokens * *per_token;
    return !job->oai.stream && limit && *estimate > limit;
}

static bool refuse_large_response(kvd_job *job)
{
    uint64_t limit = job->jobs->max_response_bytes, estimate, per_token;
    const kvd_request_params *p = &job->oai.params;
    if (!response_too_large(job, &estimate, &per_token))
        return false;
    char msg[400];
    snprintf(msg, sizeof msg,
             "the response would hold about %" PRIu64 " bytes (n %d x max_tokens %d x %" PRIu64
             " bytes per token%s), above max_response_bytes %" PRIu64
             "; lower n, max_tokens or top_logprobs, or set \"stream\": true",
             estimate, p->n, p->max_tokens, per_token, job->oai.logprobs ? " with logprobs" : "", limit);
    job_fail(job, 400, msg, job->oai.logprobs ? "top_logprobs" : "max_tokens", "response_too_large", NULL);
    return true;
}

static void detokenize_work(uv_work_t *work)
{
    kvd_job *job = work->data;
    size_t len = 0;
    char *text = kvd_tokenizer_decode(job->jobs->model.tok, job->prompt, (size_t)job->num_prompt, false, &len,
                                      &job->work_err);
    if (!text) {
        job->work_rc = job->work_err.code ? job->work_err.code : KVD_EINVAL;
        return;
    }
    kvd_sbuf out = {0};
    kvd_sbuf_reserve(&out, len + 32);
    kvd_sbuf_puts(&out, "{\"prompt\":");
    kvd_json_append_string(&out, text, len);
    kvd_sbuf_puts(&out, "}");
    free(text);
    job->answer = kvd_sbuf_take(&out, &job->answer_len);
    job->work_rc = job->answer ? 0 : kvd_error_set(&job->work_err, KVD_ENOMEM, "out of memory");
}

static void finish_detokenize(kvd_job *job)
{
    if (job->work_rc == KVD_ENOMEM)
        job_fail(job, 500, "out of memory", NULL, NULL, NULL);
    else if (job->work_rc < 0)
        job_fail(job, 400, job->work_err.msg[0] ? job->work_err.msg : "tokens: cannot decode", "tokens", NULL, NULL);
    else
        job_answer(job, "application/json");
}

/* ---- a route's fields, read on a worker ---- */

/* /apply-template's answer, built here: it grows with the messages. */
static void apply_template_work(kvd_job *job)
{
    cJSON *answer = cJSON_CreateObject();
    const kvd_chat_prompt *chat = &job->oai.chat;
    cJSON *prompt = answer ? kvd_json_sanitized_string(chat->text.data ? chat->text.data : "", chat->text.len) : NULL;
    if (prompt)
        cJSON_AddItemToObject(answer, "prompt", prompt);
    job->answer = prompt ? cJSON_PrintUnformatted(answer) : NULL;
    cJSON_Delete(answer);
    job->answer_len = job->answer ? strlen(job->answer) : 0;
    job->work_rc = job->answer ? 0 : KVD_ENOMEM;
}

/* Runs on a libuv worker: the route's fields out of the body (a chat template
 * rendered, a prompt's text copied, an id array walked: each grows with the request),
 * the tree freed, then the route's own work (tokenization, detokenization). */
static void parse_work(uv_work_t *work)
{
    kvd_job *job = work->data;
    kvd_jobs *jobs = job->jobs;
    const kvd_oai_model_info *info = &jobs->model.info;
    char *param = job->parse_param;
    size_t cap = sizeof job->parse_param;
    /* Tool arguments and schemas are parsed with cJSON, whose parser writes a
     * process-wide error pointer (see body_work). */
    uv_mutex_lock(&jobs->parse_lock);
    switch (job->kind) {
    case KVD_JOB_COMPLETION:
    case KVD_JOB_CHAT:
        job->parse_rc = kvd_oai_parse(&job->oai, job->kind == KVD_JOB_CHAT ? KVD_OAI_CHAT : KVD_OAI_COMPLETIONS,
                                      job->body, &jobs->model.defaults, info, param, cap, &job->work_err);
        break;
    case KVD_JOB_TOKENIZE:
        job->parse_rc = kvd_oai_parse_tokenize(&job->oai, job->body, info, param, cap, &job->work_err);
        break;
    case KVD_JOB_APPLY_TEMPLATE:
        if (!cJSON_GetObjectItemCaseSensitive(job->body, "messages")) {
            snprintf(param, cap, "messages");
            job->parse_rc = kvd_error_set(&job->work_err, KVD_EINVAL, "messages: is required");
        } else {
            job->parse_rc = kvd_oai_parse_tokenize(&job->oai, job->body, info, param, cap, &job->work_err);
        }
        break;
    case KVD_JOB_DETOKENIZE:
        job->parse_rc = kvd_oai_parse_detokenize(job->body, info, &job->prompt, &job->num_prompt, param, cap,
                                                 &job->work_err);
        break;
    default:
        break;
    }
    uv_mutex_unlock(&jobs->parse_lock);
    cJSON_Delete(job->body);
    job->body = NULL;
    if (job->parse_rc != 0)
        return;
    switch (job->kind) {
    case KVD_JOB_DETOKENIZE:
        detokenize_work(work);
        break;
    case KVD_JOB_APPLY_TEMPLATE:
        apply_template_work(job);
        break;
    case KVD_JOB_TOKENIZE:
        tokenize_work(work);
        break;
    default: {
        uint64_t estimate, per_token;
        if (response_too_large(job, &estimate, &per_token))
            return; /* refused on the loop, before any work */
        if (job->oai.prompt_ids) {
            job->prompt = job->oai.prompt_ids;
            job->num_prompt = job->oai.num_prompt_ids;
            job->oai.prompt_ids = NULL;
            if (!job->oai.constrained)
                return; /* ids to submit as they are */
        }
        tokenize_work(work);
        break;
    }
    }
}

static void after_parse(uv_work_t *work, int status)
{
    kvd_job *job = work->data;
    if (!job_back_from_worker(job, status))
        return;
    if (job_parse_failed(job, job->parse_rc, &job->work_err, job->parse_param))
        return;
    kvd_jobs *jobs = job->jobs;
    switch (job->kind) {
    case KVD_JOB_DETOKENIZE:
        finish_detokenize(job);
        break;
    case KVD_JOB_APPLY_TEMPLATE:
        if (job->work_rc < 0)
            job_fail(job, 500, "out of memory", NULL, NULL, NULL);
        else
            job_answer(job, "application/json");
        break;
    case KVD_JOB_TOKENIZE:
        finish_tokenize(job);
        break;
    default:
        if (refuse_large_response(job))
            return;
        job->resp = (kvd_oai_response){
            .id = job->id,
            .created = (long long)time(NULL),
            .model = jobs->model_name,
            .chat = job->kind == KVD_JOB_CHAT,
            .logprobs = job->oai.logprobs,
            .top_logprobs = job->oai.top_logprobs,
            .tokens_as_ids = job->oai.tokens_as_ids,
            .include_usage = job->oai.include_usage,
            .continuous_usage = job->oai.continuous_usage,
            .tok = jobs->model.tok,
        };
        finish_tokenize(job);
        break;
    }
}

/* Starts a route's job on its body: the tree is the job's from here on. */
static void job_start_route(kvd_jobs *jobs, kvd_http_request *req, kvd_job_kind kind, cJSON **body)
{
    kvd_job *job = job_begin(jobs, req, kind);
    if (!job)
        return;
    job->body = *body;
    *body = NULL;
    job_start_work(job, parse_work, after_parse, "cannot queue the request");
}

void kvd_jobs_generate(kvd_jobs *jobs, kvd_http_request *req, kvd_oai_route route, cJSON **body)
{
    job_start_route(jobs, req, route == KVD_OAI_CHAT ? KVD_JOB_CHAT : KVD_JOB_COMPLETION, body);
}

void kvd_jobs_tokenize(kvd_jobs *jobs, kvd_http_request *req, cJSON **body)
{
    job_start_route(jobs, req, KVD_JOB_TOKENIZE, body);
}

void kvd_jobs_apply_template(kvd_jobs *jobs, kvd_http_request *req, cJSON **body)
{
    job_start_route(jobs, req, KVD_JOB_APPLY_TEMPLATE, body);
}

void kvd_jobs_detokenize(kvd_jobs *jobs, kvd_http_request *req, cJSON **body)
{
    job_start_route(jobs, req, KVD_JOB_DETOKENIZE, body);
}

/* Runs on a libuv worker: the snapshot waits for the engine's running step (tens of
 * milliseconds on a big model), which on the loop would stall every other connection,
 * and the document grows with the pool. */
static void kv_work(uv_work_t *work)
{
    kvd_job *job = work->data;
    kvd_kv_snapshot snap;
    job->work_rc = kvd_engine_kv_snapshot(job->jobs->model.engine, &snap);
    cJSON *root = job->work_rc == 0 ? kvd_web_kv_json(&snap) : NULL;
    kvd_kv_snapshot_deinit(&snap);
    job->answer = root ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    job->answer_len = job->answer ? strlen(job->answer) : 0;
}

static void after_kv(uv_work_t *work, int status)
{
    kvd_job *job = work->data;
    if (!job_back_from_worker(job, status))
        return;
    if (!job->answer)
        job_fail(job, 500, "out of memory", NULL, NULL, NULL);
    else
        job_answer(job, "application/json");
}

void kvd_jobs_kv(kvd_jobs *jobs, kvd_http_request *req)
{
    kvd_job *job = job_begin(jobs, req, KVD_JOB_KV);
    if (!job)
        return;
    job_start_work(job, kv_work, after_kv, "cannot queue the KV snapshot");
}

/* ---- abort and cancel ---- */

void kvd_jobs_on_abort(kvd_jobs *jobs, kvd_http_request *req)
{
    kvd_job *job = kvd_http_user(req);
    if (!job)
        return;
    job->req = NULL;
    job->aborted = true;
    job->status = 499; /* nginx's "client closed request": logged, never sent */
    if (job->engine_id && jobs->model.engine)
        kvd_engine_cancel(jobs->model.engine, job->engine_id);
    /* A job on a worker (tokenizing, KV snapshot) is freed by its after-callback; a
     * submitted one when the engine reports every choice finished or cancelled. */
}

void kvd_jobs_cancel_all(kvd_jobs *jobs)
{
    for (kvd_job *job = jobs->live; job; job = job->next)
        if (job->engine_id && jobs->model.engine)
            kvd_engine_cancel(jobs->model.engine, job->engine_id);
}
