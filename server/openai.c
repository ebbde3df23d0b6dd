/* openai.c - the routes: OpenAI completions and chat (whole and streamed), models,
 * tokenize/detokenize, health, metrics and the KV view.
 *
 * A generation request becomes a job: the body is parsed on the loop thread, the
 * prompt is tokenized on a libuv worker (encoding a multi-megabyte prompt takes long
 * enough to stall every other stream if done on the loop; the tokenizer is safe to
 * share across threads), then submitted to the engine. Engine events find their job
 * through the id map; streamed jobs write one SSE chunk per event, whole ones
 * accumulate text and logprobs until every choice has finished. A client that goes
 * away cancels its engine request; the job lingers until the engine confirms each
 * choice finished, so its blocks are known to be free before the job is.
 * GET /v1/kv is a job too: the engine's KV snapshot waits for the running step to
 * end, so it is taken (and its JSON document built) on a libuv worker as well.
 * The embedded web pages (web.h: a chat page at /, the KV view at /kv) are served
 * here too, without authentication: they are static files that hold no secret and
 * reach the model only through the API routes below.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "app.h"
#include "web.h"

enum route_id {
    ROUTE_HEALTH,
    ROUTE_MODELS,
    ROUTE_METRICS,
    ROUTE_COMPLETIONS,
    ROUTE_CHAT,
    ROUTE_TOKENIZE,
    ROUTE_DETOKENIZE,
    ROUTE_KV,
};

typedef struct route {
    const char *path;
    const char *method;
    enum route_id id;
    bool needs_auth;
    bool needs_model;
} route;

static const route routes[] = {
    {"/health", "GET", ROUTE_HEALTH, false, false},
    {"/v1/models", "GET", ROUTE_MODELS, true, true},
    {"/metrics", "GET", ROUTE_METRICS, false, false},
    {"/v1/completions", "POST", ROUTE_COMPLETIONS, true, true},
    {"/v1/chat/completions", "POST", ROUTE_CHAT, true, true},
    {"/tokenize", "POST", ROUTE_TOKENIZE, true, true},
    {"/detokenize", "POST", ROUTE_DETOKENIZE, true, true},
    {"/v1/kv", "GET", ROUTE_KV, true, true},
};

typedef struct choice_state {
    kvd_sbuf text;           /* whole responses: the text so far (raw bytes) */
    cJSON *logprobs;         /* whole responses: chat content array / completions object */
    size_t text_offset;      /* completions logprobs.text_offset of the next token */
    kvd_finish_reason finish;
    int completion_tokens;
    uint64_t last_token_ns;
    bool done;
} choice_state;

struct kvd_job {
    kvd_job *prev, *next;    /* app->live_jobs */
    kvd_app *app;
    kvd_http_request *req;   /* NULL once answered or aborted */
    enum route_id route;
    const char *path;        /* for the log line, after req is gone */
    char id[64];
    long long created;
    kvd_oai_request oai;
    int32_t *prompt;
    int num_prompt;
    uv_work_t work;
    bool working;            /* on a libuv worker; its after-callback frees the job */
    int work_rc;
    kvd_error work_err;
    uint8_t *kv_states;      /* GET /v1/kv: the snapshot the worker took */
    int kv_num_blocks;
    char *kv_tables;
    kvd_engine_stats kv_stats;
    uint64_t engine_id;      /* 0 until submitted */
    choice_state *choices;
    int num_choices;
    int num_done;
    int prompt_tokens;
    int cached_tokens;
    uint64_t arrival_ns;
    uint64_t first_token_ns;
    bool aborted;
    bool failed;
    char error[256];
    int status;
};

/* ---- small JSON helpers ---- */

static cJSON *sanitized_string(const char *s, size_t len)
{
    if (kvd_utf8_is_clean(s, len) && s[len] == '\0')
        return cJSON_CreateString(s);
    kvd_sbuf sb;
    kvd_sbuf_init(&sb);
    kvd_utf8_append_sanitized(&sb, s, len);
    cJSON *out = sb.failed ? NULL : cJSON_CreateString(sb.data ? sb.data : "");
    kvd_sbuf_deinit(&sb);
    return out;
}

static void add_sanitized(cJSON *obj, const char *name, const char *s, size_t len)
{
    cJSON *str = sanitized_string(s, len);
    if (str)
        cJSON_AddItemToObject(obj, name, str);
}

static double ms_between(uint64_t from_ns, uint64_t to_ns)
{
    return to_ns > from_ns ? (double)(to_ns - from_ns) / 1e6 : 0.0;
}

/* ---- responses ---- */

static void log_request(kvd_app *app, const char *id, const char *method, const char *path, int status,
                        int prompt, int cached, int completion, uint64_t arrival_ns, uint64_t first_ns)
{
    uint64_t now = uv_hrtime();
    char ttft[32];
    if (first_ns)
        snprintf(ttft, sizeof ttft, "%.1fms", ms_between(arrival_ns, first_ns));
    else
        snprintf(ttft, sizeof ttft, "-");
    kvd_log(&app->log, KVD_LOG_INFO,
            "request %s %s %s %d prompt_tokens=%d cached_tokens=%d completion_tokens=%d ttft=%s total=%.1fms", id,
            method, path, status, prompt, cached, completion, ttft, ms_between(arrival_ns, now));
}

static void respond_text(kvd_app *app, kvd_http_request *req, int status, const char *content_type,
                         const char *extra_headers, const char *body, size_t len)
{
    app->metrics.http_requests++;
    log_request(app, "-", kvd_http_method(req), kvd_http_path(req), status, 0, 0, 0, kvd_http_arrival_ns(req), 0);
    kvd_http_respond(req, status, content_type, extra_headers, body, len);
}

static void respond_json(kvd_app *app, kvd_http_request *req, int status, cJSON *obj, const char *extra_headers)
{
    char *text = obj ? cJSON_PrintUnformatted(obj) : NULL;
    cJSON_Delete(obj);
    if (!text) {
        static const char oom[] =
            "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";
        respond_text(app, req, 500, "application/json", NULL, oom, sizeof oom - 1);
        return;
    }
    respond_text(app, req, status, "application/json", extra_headers, text, strlen(text));
    free(text);
}

static const char *error_type(int status)
{
    switch (status) {
    case 401:
        return "authentication_error";
    case 429:
        return "rate_limit_error";
    case 503:
        return "service_unavailable";
    default:
        return status >= 500 ? "server_error" : "invalid_request_error";
    }
}

static cJSON *error_object(int status, const char *message, const char *param, const char *code)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *error = cJSON_AddObjectToObject(root, "error");
    add_sanitized(error, "message", message, strlen(message));
    cJSON_AddStringToObject(error, "type", error_type(status));
    if (param && param[0])
        cJSON_AddStringToObject(error, "param", param);
    else
        cJSON_AddNullToObject(error, "param");
    if (code)
        cJSON_AddStringToObject(error, "code", code);
    else
        cJSON_AddNullToObject(error, "code");
    return root;
}

static void send_error(kvd_app *app, kvd_http_request *req, int status, const char *message, const char *param,
                       const char *code, const char *extra_headers)
{
    respond_json(app, req, status, error_object(status, message, param, code), extra_headers);
}

/* ---- jobs ---- */

static kvd_job *job_create(kvd_app *app, kvd_http_request *req, enum route_id route_id)
{
    kvd_job *job = calloc(1, sizeof *job);
    if (!job)
        return NULL;
    job->app = app;
    job->req = req;
    job->route = route_id;
    job->path = route_id == ROUTE_CHAT ? "/v1/chat/completions"
                : route_id == ROUTE_COMPLETIONS ? "/v1/completions"
                : route_id == ROUTE_KV          ? "/v1/kv"
                                                 : "/tokenize";
    job->created = (long long)time(NULL);
    job->arrival_ns = kvd_http_arrival_ns(req);
    job->status = 200;
    kvd_oai_request_init(&job->oai);
    if (route_id == ROUTE_KV)
        snprintf(job->id, sizeof job->id, "-"); /* its response has no id; logged like other such routes */
    else
        snprintf(job->id, sizeof job->id, "%s%016" PRIx64 "%08" PRIx32, route_id == ROUTE_CHAT ? "chatcmpl-" : "cmpl-",
                 kvd_app_random(app), (uint32_t)kvd_app_random(app));
    job->next = app->live_jobs;
    if (app->live_jobs)
        app->live_jobs->prev = job;
    app->live_jobs = job;
    app->num_jobs++;
    kvd_http_set_user(req, job);
    return job;
}

static void job_free(kvd_job *job)
{
    kvd_app *app = job->app;
    if (job->req) {
        /* Unreachable by design (every path answers first); answer rather than leave
         * the connection hanging with nobody owning its request. */
        kvd_http_request *req = job->req;
        job->req = NULL;
        kvd_http_set_user(req, NULL);
        kvd_http_respond(req, 500, NULL, NULL, "", 0);
    }
    if (job->engine_id)
        kvd_job_map_remove(&app->jobs, job->engine_id);
    if (job->prev)
        job->prev->next = job->next;
    else
        app->live_jobs = job->next;
    if (job->next)
        job->next->prev = job->prev;
    for (int i = 0; i < job->num_choices; i++) {
        kvd_sbuf_deinit(&job->choices[i].text);
        cJSON_Delete(job->choices[i].logprobs);
    }
    free(job->choices);
    free(job->prompt);
    free(job->kv_states);
    free(job->kv_tables);
    kvd_oai_request_deinit(&job->oai);
    free(job);
    app->num_jobs--;
    kvd_app_job_ended(app);
}

static int job_completion_tokens(const kvd_job *job)
{
    int total = 0;
    for (int i = 0; i < job->num_choices; i++)
        total += job->choices[i].completion_tokens;
    return total;
}

static void job_log(kvd_job *job, const char *method)
{
    log_request(job->app, job->id, method, job->path, job->status, job->prompt_tokens, job->cached_tokens,
                job_completion_tokens(job), job->arrival_ns, job->first_token_ns);
}

/* Answers a job's request with an error and frees the job. */
static void job_fail(kvd_job *job, int status, const char *message, const char *param, const char *code,
                     const char *extra_headers)
{
    kvd_app *app = job->app;
    if (job->req) {
        job->status = status;
        kvd_http_request *req = job->req;
        job->req = NULL;
        kvd_http_set_user(req, NULL);
        app->metrics.http_requests++;
        job_log(job, kvd_http_method(req));
        cJSON *obj = error_object(status, message, param, code);
        char *text = cJSON_PrintUnformatted(obj);
        cJSON_Delete(obj);
        if (text) {
            kvd_http_respond(req, status, "application/json", extra_headers, text, strlen(text));
            free(text);
        } else {
            kvd_http_respond(req, 500, NULL, NULL, "", 0);
        }
    }
    job_free(job);
}

static cJSON *usage_object(const kvd_job *job)
{
    cJSON *usage = cJSON_CreateObject();
    int completion = job_completion_tokens(job);
    cJSON_AddNumberToObject(usage, "prompt_tokens", job->prompt_tokens);
    cJSON_AddNumberToObject(usage, "completion_tokens", completion);
    cJSON_AddNumberToObject(usage, "total_tokens", job->prompt_tokens + completion);
    cJSON *details = cJSON_AddObjectToObject(usage, "prompt_tokens_details");
    cJSON_AddNumberToObject(details, "cached_tokens", job->cached_tokens);
    return usage;
}

static const char *finish_name(kvd_finish_reason reason)
{
    switch (reason) {
    case KVD_FINISH_STOP:
        return "stop";
    case KVD_FINISH_LENGTH:
        return "length";
    case KVD_FINISH_CANCELLED:
        return "abort";
    case KVD_FINISH_ERROR:
        return "error";
    default:
        return NULL;
    }
}

static cJSON *response_base(const kvd_job *job, const char *object)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "id", job->id);
    cJSON_AddStringToObject(root, "object", object);
    cJSON_AddNumberToObject(root, "created", (double)job->created);
    cJSON_AddStringToObject(root, "model", job->app->model_name);
    return root;
}

/* ---- logprobs in OpenAI's two shapes ---- */

/* The text of one token (special tokens as their content), raw bytes; with
 * return_tokens_as_token_ids, "token_id:N" so clients can recover exact ids. */
static char *token_text(const kvd_job *job, int32_t token, size_t *len)
{
    if (job->oai.tokens_as_ids) {
        char buf[32];
        int n = snprintf(buf, sizeof buf, "token_id:%d", (int)token);
        *len = (size_t)n;
        return strdup(buf);
    }
    char *text = kvd_tokenizer_decode(job->app->tok, &token, 1, false, len, NULL);
    if (!text) {
        *len = 0;
        return strdup("");
    }
    return text;
}

static cJSON *token_bytes(const char *text, size_t len)
{
    cJSON *bytes = cJSON_CreateArray();
    for (size_t i = 0; i < len; i++)
        cJSON_AddItemToArray(bytes, cJSON_CreateNumber((unsigned char)text[i]));
    return bytes;
}

/* Chat: appends {"token", "logprob", "bytes", "top_logprobs": [...]} per token. */
static void chat_logprobs_add(const kvd_job *job, cJSON *content, const kvd_event *ev, int top_n)
{
    for (int i = 0; i < ev->num_tokens; i++) {
        const kvd_token_logprob *lp = &ev->logprobs[i];
        size_t len;
        char *text = token_text(job, lp->token, &len);
        cJSON *entry = cJSON_CreateObject();
        add_sanitized(entry, "token", text, len);
        cJSON_AddNumberToObject(entry, "logprob", lp->logprob);
        cJSON_AddItemToObject(entry, "bytes", token_bytes(text, len));
        free(text);
        cJSON *top = cJSON_AddArrayToObject(entry, "top_logprobs");
        int num_top = lp->num_top < top_n ? lp->num_top : top_n;
        for (int k = 0; k < num_top; k++) {
            char *alt = token_text(job, lp->top_tokens[k], &len);
            cJSON *alt_entry = cJSON_CreateObject();
            add_sanitized(alt_entry, "token", alt, len);
            cJSON_AddNumberToObject(alt_entry, "logprob", lp->top_logprobs[k]);
            cJSON_AddItemToObject(alt_entry, "bytes", token_bytes(alt, len));
            free(alt);
            cJSON_AddItemToArray(top, alt_entry);
        }
        cJSON_AddItemToArray(content, entry);
    }
}

static cJSON *completion_logprobs_new(void)
{
    cJSON *obj = cJSON_CreateObject();
    cJSON_AddArrayToObject(obj, "tokens");
    cJSON_AddArrayToObject(obj, "token_logprobs");
    cJSON_AddArrayToObject(obj, "top_logprobs");
    cJSON_AddArrayToObject(obj, "text_offset");
    return obj;
}

/* Completions: appends to the four parallel arrays; top_logprobs maps token text to
 * logprob for the top alternatives plus the sampled token, as vLLM reports them. */
static void completion_logprobs_add(const kvd_job *job, cJSON *obj, const kvd_event *ev, int top_n, size_t *offset)
{
    cJSON *tokens = cJSON_GetObjectItemCaseSensitive(obj, "tokens");
    cJSON *token_logprobs = cJSON_GetObjectItemCaseSensitive(obj, "token_logprobs");
    cJSON *top_logprobs = cJSON_GetObjectItemCaseSensitive(obj, "top_logprobs");
    cJSON *text_offset = cJSON_GetObjectItemCaseSensitive(obj, "text_offset");
    for (int i = 0; i < ev->num_tokens; i++) {
        const kvd_token_logprob *lp = &ev->logprobs[i];
        size_t len;
        char *text = token_text(job, lp->token, &len);
        cJSON *token_str = sanitized_string(text, len);
        const char *key = token_str ? token_str->valuestring : "";
        cJSON *top = cJSON_CreateObject();
        int num_top = lp->num_top < top_n ? lp->num_top : top_n;
        for (int k = 0; k < num_top; k++) {
            size_t alt_len;
            char *alt = token_text(job, lp->top_tokens[k], &alt_len);
            cJSON *alt_str = sanitized_string(alt, alt_len);
            if (alt_str && !cJSON_GetObjectItemCaseSensitive(top, alt_str->valuestring))
                cJSON_AddNumberToObject(top, alt_str->valuestring, lp->top_logprobs[k]);
            cJSON_Delete(alt_str);
            free(alt);
        }
        if (!cJSON_GetObjectItemCaseSensitive(top, key))
            cJSON_AddNumberToObject(top, key, lp->logprob);
        cJSON_AddItemToArray(tokens, token_str ? token_str : cJSON_CreateString(""));
        cJSON_AddItemToArray(token_logprobs, cJSON_CreateNumber(lp->logprob));
        cJSON_AddItemToArray(top_logprobs, top);
        cJSON_AddItemToArray(text_offset, cJSON_CreateNumber((double)*offset));
        *offset += len;
        free(text);
    }
}

/* ---- streaming ---- */

static void stream_send(kvd_job *job, cJSON *chunk)
{
    char *text = cJSON_PrintUnformatted(chunk);
    cJSON_Delete(chunk);
    if (!text || !job->req) {
        free(text);
        return;
    }
    kvd_sbuf sse;
    kvd_sbuf_init(&sse);
    kvd_sbuf_printf(&sse, "data: %s\n\n", text);
    free(text);
    if (!sse.failed)
        kvd_http_stream_write(job->req, sse.data, sse.len);
    kvd_sbuf_deinit(&sse);
    /* A write refused for backpressure closes the connection; on_abort follows and
     * cancels the engine request. */
}

/* A chunk with one choice; fills the choice's payload through the returned pointer. */
static cJSON *chunk_new(kvd_job *job, int index, cJSON **choice_out)
{
    bool chat = job->route == ROUTE_CHAT;
    cJSON *chunk = response_base(job, chat ? "chat.completion.chunk" : "text_completion");
    cJSON *choices = cJSON_AddArrayToObject(chunk, "choices");
    cJSON *choice = cJSON_CreateObject();
    cJSON_AddNumberToObject(choice, "index", index);
    cJSON_AddItemToArray(choices, choice);
    if (job->oai.include_usage)
        cJSON_AddNullToObject(chunk, "usage");
    *choice_out = choice;
    return chunk;
}

static void stream_role_chunks(kvd_job *job)
{
    for (int i = 0; i < job->num_choices; i++) {
        cJSON *choice;
        cJSON *chunk = chunk_new(job, i, &choice);
        cJSON *delta = cJSON_AddObjectToObject(choice, "delta");
        cJSON_AddStringToObject(delta, "role", "assistant");
        cJSON_AddStringToObject(delta, "content", "");
        cJSON_AddNullToObject(choice, "logprobs");
        cJSON_AddNullToObject(choice, "finish_reason");
        stream_send(job, chunk);
    }
}

static void stream_event(kvd_job *job, const kvd_event *ev)
{
    bool chat = job->route == ROUTE_CHAT;
    choice_state *ch = &job->choices[ev->choice];
    if (ev->num_tokens > 0 || ev->text_len > 0) {
        cJSON *choice;
        cJSON *chunk = chunk_new(job, ev->choice, &choice);
        if (chat) {
            cJSON *delta = cJSON_AddObjectToObject(choice, "delta");
            add_sanitized(delta, "content", ev->text, ev->text_len);
        } else {
            add_sanitized(choice, "text", ev->text, ev->text_len);
        }
        if (job->oai.logprobs && ev->logprobs) {
            if (chat) {
                cJSON *lp = cJSON_AddObjectToObject(choice, "logprobs");
                chat_logprobs_add(job, cJSON_AddArrayToObject(lp, "content"), ev, job->oai.top_logprobs);
                cJSON_AddNullToObject(lp, "refusal");
            } else {
                cJSON *lp = completion_logprobs_new();
                completion_logprobs_add(job, lp, ev, job->oai.top_logprobs, &ch->text_offset);
                cJSON_AddItemToObject(choice, "logprobs", lp);
            }
        } else {
            cJSON_AddNullToObject(choice, "logprobs");
        }
        cJSON_AddNullToObject(choice, "finish_reason");
        stream_send(job, chunk);
    }
    if (ev->finish == KVD_FINISH_ERROR) {
        cJSON *err = error_object(500, ev->error[0] ? ev->error : "generation failed", NULL, NULL);
        stream_send(job, err);
    } else if (ev->finish == KVD_FINISH_STOP || ev->finish == KVD_FINISH_LENGTH) {
        cJSON *choice;
        cJSON *chunk = chunk_new(job, ev->choice, &choice);
        if (chat)
            cJSON_AddObjectToObject(choice, "delta");
        else
            cJSON_AddStringToObject(choice, "text", "");
        cJSON_AddNullToObject(choice, "logprobs");
        cJSON_AddStringToObject(choice, "finish_reason", finish_name(ev->finish));
        stream_send(job, chunk);
    }
}

static void stream_finish(kvd_job *job)
{
    if (job->oai.include_usage) {
        cJSON *chunk = response_base(job, job->route == ROUTE_CHAT ? "chat.completion.chunk" : "text_completion");
        cJSON_AddArrayToObject(chunk, "choices");
        cJSON_AddItemToObject(chunk, "usage", usage_object(job));
        stream_send(job, chunk);
    }
    static const char done[] = "data: [DONE]\n\n";
    kvd_http_stream_write(job->req, done, sizeof done - 1);
    kvd_http_stream_end(job->req);
}

/* ---- whole responses ---- */

static void accumulate_event(kvd_job *job, const kvd_event *ev)
{
    choice_state *ch = &job->choices[ev->choice];
    kvd_sbuf_append(&ch->text, ev->text, ev->text_len);
    if (!job->oai.logprobs || !ev->logprobs || ev->num_tokens == 0)
        return;
    if (job->route == ROUTE_CHAT) {
        if (!ch->logprobs)
            ch->logprobs = cJSON_CreateArray();
        chat_logprobs_add(job, ch->logprobs, ev, job->oai.top_logprobs);
    } else {
        if (!ch->logprobs)
            ch->logprobs = completion_logprobs_new();
        completion_logprobs_add(job, ch->logprobs, ev, job->oai.top_logprobs, &ch->text_offset);
    }
}

static void respond_whole(kvd_job *job)
{
    bool chat = job->route == ROUTE_CHAT;
    cJSON *root = response_base(job, chat ? "chat.completion" : "text_completion");
    cJSON *choices = cJSON_AddArrayToObject(root, "choices");
    for (int i = 0; i < job->num_choices; i++) {
        choice_state *ch = &job->choices[i];
        cJSON *choice = cJSON_CreateObject();
        cJSON_AddNumberToObject(choice, "index", i);
        const char *text = ch->text.data ? ch->text.data : "";
        if (chat) {
            cJSON *message = cJSON_AddObjectToObject(choice, "message");
            cJSON_AddStringToObject(message, "role", "assistant");
            add_sanitized(message, "content", text, ch->text.len);
            cJSON_AddNullToObject(message, "refusal");
        } else {
            add_sanitized(choice, "text", text, ch->text.len);
        }
        if (job->oai.logprobs) {
            if (chat) {
                cJSON *lp = cJSON_AddObjectToObject(choice, "logprobs");
                cJSON_AddItemToObject(lp, "content", ch->logprobs ? ch->logprobs : cJSON_CreateArray());
                cJSON_AddNullToObject(lp, "refusal");
            } else {
                cJSON_AddItemToObject(choice, "logprobs", ch->logprobs ? ch->logprobs : completion_logprobs_new());
            }
            ch->logprobs = NULL;
        } else {
            cJSON_AddNullToObject(choice, "logprobs");
        }
        cJSON_AddStringToObject(choice, "finish_reason", finish_name(ch->finish));
        cJSON_AddItemToArray(choices, choice);
    }
    cJSON_AddItemToObject(root, "usage", usage_object(job));
    kvd_http_request *req = job->req;
    job->req = NULL;
    kvd_http_set_user(req, NULL);
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (text) {
        kvd_http_respond(req, 200, "application/json", NULL, text, strlen(text));
        free(text);
    } else {
        job->status = 500;
        kvd_http_respond(req, 500, NULL, NULL, "", 0);
    }
}

static void job_complete(kvd_job *job)
{
    kvd_app *app = job->app;
    uint64_t now = uv_hrtime();
    if (!job->aborted)
        kvd_histogram_observe(&app->metrics.e2e_request_latency, (double)(now - job->arrival_ns) / 1e9, 1);
    const char *method = job->req ? kvd_http_method(job->req) : "POST";
    if (job->req) {
        app->metrics.http_requests++;
        if (job->oai.stream) {
            kvd_http_request *req = job->req;
            stream_finish(job);
            job->req = NULL;
            kvd_http_set_user(req, NULL);
        } else if (job->failed) {
            job_fail(job, 500, job->error, NULL, NULL, NULL);
            return;
        } else {
            respond_whole(job);
        }
    }
    job_log(job, method);
    job_free(job);
}

static void handle_event(kvd_job *job, const kvd_event *ev)
{
    kvd_app *app = job->app;
    if (ev->choice < 0 || ev->choice >= job->num_choices)
        return;
    choice_state *ch = &job->choices[ev->choice];
    if (ch->done)
        return;
    uint64_t now = uv_hrtime();
    job->prompt_tokens = ev->prompt_tokens;
    job->cached_tokens = ev->cached_tokens;
    if (ev->num_tokens > 0) {
        if (!job->first_token_ns) {
            job->first_token_ns = now;
            if (!job->aborted)
                kvd_histogram_observe(&app->metrics.time_to_first_token, (double)(now - job->arrival_ns) / 1e9, 1);
        } else if (ch->last_token_ns && !job->aborted) {
            kvd_histogram_observe(&app->metrics.time_per_output_token,
                                  (double)(now - ch->last_token_ns) / 1e9 / ev->num_tokens, (uint64_t)ev->num_tokens);
        }
        ch->last_token_ns = now;
    }
    ch->completion_tokens = ev->completion_tokens;
    if (job->req) {
        if (job->oai.stream)
            stream_event(job, ev);
        else
            accumulate_event(job, ev);
    }
    if (ev->finish != KVD_FINISH_NONE) {
        ch->done = true;
        ch->finish = ev->finish;
        job->num_done++;
        app->metrics.finished[kvd_finish_label_of(ev->finish)]++;
        if (ev->finish == KVD_FINISH_ERROR && !job->failed) {
            job->failed = true;
            snprintf(job->error, sizeof job->error, "%s", ev->error[0] ? ev->error : "generation failed");
        }
    }
    if (job->num_done == job->num_choices)
        job_complete(job);
}

void kvd_openai_on_events(kvd_app *app, kvd_event *events)
{
    for (kvd_event *ev = events; ev; ev = ev->next) {
        kvd_job *job = kvd_job_map_get(&app->jobs, ev->request_id);
        if (job)
            handle_event(job, ev);
    }
    kvd_event_free(events);
}

/* ---- submission ---- */

static void job_submit(kvd_job *job)
{
    kvd_app *app = job->app;
    if (job->num_prompt == 0) {
        job_fail(job, 400, "prompt: must not be empty", "prompt", NULL, NULL);
        return;
    }
    if (!job->oai.seed_given)
        job->oai.params.sampling.seed = kvd_app_random(app);
    job->num_choices = job->oai.params.n;
    job->choices = calloc((size_t)job->num_choices, sizeof *job->choices);
    if (!job->choices) {
        job_fail(job, 500, "out of memory", NULL, NULL, NULL);
        return;
    }
    for (int i = 0; i < job->num_choices; i++)
        kvd_sbuf_init(&job->choices[i].text);
    job->prompt_tokens = job->num_prompt;
    kvd_error err = {0};
    int64_t id = kvd_engine_submit(app->engine, job->prompt, job->num_prompt, &job->oai.params, &err);
    if (id <= 0) {
        const char *msg = err.msg[0] ? err.msg : kvd_strerror((int)id);
        switch ((int)id) {
        case KVD_ETOOLONG: {
            char text[640];
            snprintf(text, sizeof text, "the prompt of %d tokens does not fit: %s", job->num_prompt, msg);
            job_fail(job, 400, text, job->route == ROUTE_CHAT ? "messages" : "prompt", "context_length_exceeded",
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
    if (kvd_job_map_put(&app->jobs, job->engine_id, job) != 0) {
        kvd_engine_cancel(app->engine, job->engine_id);
        job->engine_id = 0;
        job_fail(job, 500, "out of memory", NULL, NULL, NULL);
        return;
    }
    if (job->oai.stream) {
        /* Headers (and the chat role chunk) go out now, so the client's time to
         * first token measures the model, not our buffering. */
        kvd_http_stream_begin(job->req, 200, "text/event-stream; charset=utf-8", "X-Accel-Buffering: no\r\n");
        if (job->route == ROUTE_CHAT)
            stream_role_chunks(job);
    }
}

static void respond_tokens(kvd_job *job)
{
    kvd_app *app = job->app;
    cJSON *root = cJSON_CreateObject();
    cJSON *tokens = cJSON_AddArrayToObject(root, "tokens");
    for (int i = 0; i < job->num_prompt; i++)
        cJSON_AddItemToArray(tokens, cJSON_CreateNumber(job->prompt[i]));
    cJSON_AddNumberToObject(root, "count", job->num_prompt);
    cJSON_AddNumberToObject(root, "max_model_len", app->info.max_model_len);
    kvd_http_request *req = job->req;
    job->req = NULL;
    kvd_http_set_user(req, NULL);
    job->prompt_tokens = job->num_prompt;
    respond_json(app, req, 200, root, NULL);
    job_free(job);
}

static void tokenize_work(uv_work_t *work)
{
    kvd_job *job = work->data;
    kvd_app *app = job->app;
    if (job->oai.prompt_text) {
        job->work_rc = kvd_tokenizer_encode(app->tok, job->oai.prompt_text, job->oai.prompt_len, true, &job->prompt);
        if (job->work_rc < 0)
            kvd_error_set(&job->work_err, job->work_rc, "prompt: tokenization failed");
    } else {
        job->work_rc = kvd_chat_encode(&job->oai.chat, app->tok, &job->prompt, &job->work_err);
    }
    job->num_prompt = job->work_rc > 0 ? job->work_rc : 0;
}

/* A job's work came back from a libuv worker. Returns false (and frees the job) when
 * there is nobody left to answer: the client went away, or the server is stopping. */
static bool job_back_from_worker(kvd_job *job, int status, const char *method)
{
    job->working = false;
    if (job->aborted || !job->req || job->app->state == KVD_APP_STOPPING || status < 0) {
        if (job->aborted)
            job_log(job, method);
        job_free(job);
        return false;
    }
    return true;
}

static void after_tokenize(uv_work_t *work, int status)
{
    kvd_job *job = work->data;
    if (!job_back_from_worker(job, status, "POST"))
        return;
    if (job->work_rc < 0) {
        job_fail(job, 500, job->work_err.msg[0] ? job->work_err.msg : "tokenization failed", NULL, NULL, NULL);
        return;
    }
    if (job->route == ROUTE_TOKENIZE)
        respond_tokens(job);
    else
        job_submit(job);
}

/* Hands the job to a libuv worker; `after` runs back on the loop (and must start with
 * job_back_from_worker). */
static void job_start_work(kvd_job *job, uv_work_cb work, uv_after_work_cb after, const char *failure)
{
    job->work.data = job;
    job->working = true;
    if (uv_queue_work(job->app->loop, &job->work, work, after) < 0) {
        job->working = false;
        job_fail(job, 500, failure, NULL, NULL, NULL);
    }
}

static void job_start_tokenizing(kvd_job *job)
{
    job_start_work(job, tokenize_work, after_tokenize, "cannot queue tokenization");
}

/* ---- routes ---- */

static cJSON *parse_body(kvd_app *app, kvd_http_request *req)
{
    size_t len;
    const char *body = kvd_http_body(req, &len);
    cJSON *root = cJSON_ParseWithLength(body, len);
    if (!root) {
        char msg[160];
        if (len == 0)
            snprintf(msg, sizeof msg, "the request body is empty; expected a JSON object");
        else
            snprintf(msg, sizeof msg, "malformed JSON in the request body");
        send_error(app, req, 400, msg, NULL, "invalid_json", NULL);
        return NULL;
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        send_error(app, req, 400, "the request body must be a JSON object", NULL, "invalid_json", NULL);
        return NULL;
    }
    return root;
}

static void handle_generate(kvd_app *app, kvd_http_request *req, enum route_id route_id)
{
    cJSON *body = parse_body(app, req);
    if (!body)
        return;
    kvd_job *job = job_create(app, req, route_id);
    if (!job) {
        cJSON_Delete(body);
        send_error(app, req, 500, "out of memory", NULL, NULL, NULL);
        return;
    }
    char param[128];
    kvd_error err = {0};
    int rc = kvd_oai_parse(&job->oai, route_id == ROUTE_CHAT ? KVD_OAI_CHAT : KVD_OAI_COMPLETIONS, body,
                           &app->defaults, &app->info, param, sizeof param, &err);
    cJSON_Delete(body);
    if (rc) {
        job_fail(job, rc == KVD_ENOMEM ? 500 : 400, err.msg, param, NULL, NULL);
        return;
    }
    if (job->oai.prompt_ids) {
        job->prompt = job->oai.prompt_ids;
        job->num_prompt = job->oai.num_prompt_ids;
        job->oai.prompt_ids = NULL;
        job_submit(job);
        return;
    }
    job_start_tokenizing(job);
}

static void handle_tokenize(kvd_app *app, kvd_http_request *req)
{
    cJSON *body = parse_body(app, req);
    if (!body)
        return;
    const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(body, "prompt");
    const char *name = "prompt";
    if (!prompt || cJSON_IsNull(prompt)) {
        prompt = cJSON_GetObjectItemCaseSensitive(body, "content");
        name = "content";
    }
    const cJSON *messages = cJSON_GetObjectItemCaseSensitive(body, "messages");
    kvd_job *job = NULL;
    if (prompt && !cJSON_IsNull(prompt)) {
        if (!cJSON_IsString(prompt)) {
            cJSON_Delete(body);
            send_error(app, req, 400, name[0] == 'p' ? "prompt: must be a string" : "content: must be a string", name,
                       NULL, NULL);
            return;
        }
        job = job_create(app, req, ROUTE_TOKENIZE);
        if (job) {
            job->oai.prompt_text = strdup(prompt->valuestring);
            job->oai.prompt_len = strlen(prompt->valuestring);
        }
    } else if (messages && !cJSON_IsNull(messages)) {
        job = job_create(app, req, ROUTE_TOKENIZE);
        if (job) {
            char param[128];
            kvd_error err = {0};
            if (kvd_chat_render(messages, &job->oai.chat, param, sizeof param, &err) != 0) {
                cJSON_Delete(body);
                job_fail(job, 400, err.msg, param, NULL, NULL);
                return;
            }
        }
    } else {
        cJSON_Delete(body);
        send_error(app, req, 400, "prompt: is required (or \"content\", or \"messages\")", "prompt", NULL, NULL);
        return;
    }
    cJSON_Delete(body);
    if (!job) {
        send_error(app, req, 500, "out of memory", NULL, NULL, NULL);
        return;
    }
    if (!job->oai.prompt_text && job->oai.chat.text.len == 0) {
        job_fail(job, 500, "out of memory", NULL, NULL, NULL);
        return;
    }
    job_start_tokenizing(job);
}

static void handle_detokenize(kvd_app *app, kvd_http_request *req)
{
    cJSON *body = parse_body(app, req);
    if (!body)
        return;
    const cJSON *tokens = cJSON_GetObjectItemCaseSensitive(body, "tokens");
    if (!cJSON_IsArray(tokens)) {
        cJSON_Delete(body);
        send_error(app, req, 400, "tokens: must be an array of token ids", "tokens", NULL, NULL);
        return;
    }
    int n = cJSON_GetArraySize(tokens);
    int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
    if (!ids) {
        cJSON_Delete(body);
        send_error(app, req, 500, "out of memory", NULL, NULL, NULL);
        return;
    }
    int i = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, tokens) {
        double v = item->valuedouble;
        if (!cJSON_IsNumber(item) || v != (double)(int32_t)v || v < 0 || v >= app->info.vocab_size) {
            char msg[128];
            snprintf(msg, sizeof msg, "tokens: item %d is not a token id in 0..%d", i, app->info.vocab_size - 1);
            free(ids);
            cJSON_Delete(body);
            send_error(app, req, 400, msg, "tokens", NULL, NULL);
            return;
        }
        ids[i++] = (int32_t)v;
    }
    cJSON_Delete(body);
    size_t len = 0;
    kvd_error err = {0};
    char *text = kvd_tokenizer_decode(app->tok, ids, (size_t)n, false, &len, &err);
    free(ids);
    if (!text) {
        send_error(app, req, 400, err.msg[0] ? err.msg : "tokens: cannot decode", "tokens", NULL, NULL);
        return;
    }
    cJSON *root = cJSON_CreateObject();
    add_sanitized(root, "prompt", text, len);
    free(text);
    respond_json(app, req, 200, root, NULL);
}

static void handle_models(kvd_app *app, kvd_http_request *req)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(root, "data");
    cJSON *model = cJSON_CreateObject();
    cJSON_AddStringToObject(model, "id", app->model_name);
    cJSON_AddStringToObject(model, "object", "model");
    cJSON_AddNumberToObject(model, "created", (double)time(NULL));
    cJSON_AddStringToObject(model, "owned_by", "kvd");
    cJSON_AddStringToObject(model, "root", app->cfg.model);
    cJSON_AddNullToObject(model, "parent");
    cJSON_AddNumberToObject(model, "max_model_len", app->info.max_model_len);
    cJSON_AddItemToArray(data, model);
    respond_json(app, req, 200, root, NULL);
}

static void handle_metrics(kvd_app *app, kvd_http_request *req)
{
    kvd_engine_stats st;
    kvd_app_engine_stats(app, &st);
    app->metrics.open_connections = kvd_http_server_num_connections(app->http);
    kvd_sbuf out;
    kvd_sbuf_init(&out);
    kvd_metrics_render(&app->metrics, &st, &out);
    if (out.failed)
        send_error(app, req, 500, "out of memory", NULL, NULL, NULL);
    else
        respond_text(app, req, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, out.data, out.len);
    kvd_sbuf_deinit(&out);
}

/* Runs on a libuv worker: the snapshot waits for the engine's running step (tens of
 * milliseconds on a big model), which on the loop would stall every other connection.
 * The engine, model and configuration it reads are fixed once the model is loaded.
 * The document is built back on the loop: cJSON's parser writes a process-wide error
 * pointer, so it must not run on two threads at once. */
static void kv_work(uv_work_t *work)
{
    kvd_job *job = work->data;
    kvd_app *app = job->app;
    job->work_rc = kvd_engine_kv_snapshot(app->engine, &job->kv_states, &job->kv_num_blocks,
                                          &job->kv_tables);
    if (job->work_rc == 0)
        kvd_app_engine_stats(app, &job->kv_stats);
}

static void after_kv(uv_work_t *work, int status)
{
    kvd_job *job = work->data;
    kvd_app *app = job->app;
    if (!job_back_from_worker(job, status, "GET"))
        return;
    kvd_http_request *req = job->req;
    job->req = NULL;
    kvd_http_set_user(req, NULL);
    cJSON *root = job->work_rc != 0 ? NULL
                                    : kvd_web_kv_json(app->cfg.block_size, job->kv_states,
                                                      job->kv_num_blocks, job->kv_tables, &job->kv_stats);
    if (!root)
        send_error(app, req, 500, "out of memory", NULL, NULL, NULL);
    else
        respond_json(app, req, 200, root, NULL);
    job_free(job);
}

static void handle_kv(kvd_app *app, kvd_http_request *req)
{
    kvd_job *job = job_create(app, req, ROUTE_KV);
    if (!job) {
        send_error(app, req, 500, "out of memory", NULL, NULL, NULL);
        return;
    }
    job_start_work(job, kv_work, after_kv, "cannot queue the KV snapshot");
}

static bool authorized(const kvd_app *app, const kvd_http_request *req)
{
    const char *key = app->cfg.api_key;
    size_t key_len = strlen(key);
    if (key_len == 0)
        return true;
    const char *auth = kvd_http_header(req, "authorization");
    if (!auth || strncasecmp(auth, "Bearer ", 7) != 0)
        return false;
    const char *given = auth + 7;
    while (*given == ' ')
        given++;
    return kvd_consttime_equal(given, strlen(given), key, key_len);
}

void kvd_openai_on_request(kvd_http_request *req, void *arg)
{
    kvd_app *app = arg;
    const char *path = kvd_http_path(req);
    const char *method = kvd_http_method(req);
    const route *found = NULL;
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++) {
        if (strcmp(routes[i].path, path) == 0) {
            found = &routes[i];
            break;
        }
    }
    /* The daemon's own pages (server/web/): static, so no API key and no model needed. */
    const kvd_web_asset *page = found ? NULL : kvd_web_find(path);
    if (page && strcmp(method, "GET") == 0) {
        respond_text(app, req, 200, page->content_type, KVD_WEB_HEADERS, (const char *)page->data, page->len);
        return;
    }
    const kvd_web_asset *asset = found ? NULL : kvd_web_find(path);
    if (asset) {
        if (strcmp(method, "GET") != 0) {
            char msg[300];
            snprintf(msg, sizeof msg, "Method %s is not allowed on %s; use GET", method, path);
            send_error(app, req, 405, msg, NULL, "method_not_allowed", "Allow: GET\r\n");
            return;
        }
        respond_text(app, req, 200, asset->content_type, KVD_WEB_HEADERS, (const char *)asset->data, asset->len);
        return;
    }
    if (!found) {
        char msg[300];
        snprintf(msg, sizeof msg, "Invalid URL (%s %.200s)", method, path);
        send_error(app, req, 404, msg, NULL, "not_found", NULL);
        return;
    }
    if (strcmp(found->method, method) != 0) {
        char msg[300], allow[64];
        snprintf(msg, sizeof msg, "Method %s is not allowed on %s; use %s", method, found->path, found->method);
        snprintf(allow, sizeof allow, "Allow: %s\r\n", found->method);
        send_error(app, req, 405, msg, NULL, "method_not_allowed", allow);
        return;
    }
    if (found->needs_auth && !authorized(app, req)) {
        send_error(app, req, 401, "Incorrect or missing API key: send Authorization: Bearer <key>", NULL,
                   "invalid_api_key", "WWW-Authenticate: Bearer\r\n");
        return;
    }
    if (found->id == ROUTE_HEALTH) {
        if (app->state == KVD_APP_READY) {
            static const char ok[] = "{\"status\":\"ok\"}";
            respond_text(app, req, 200, "application/json", NULL, ok, sizeof ok - 1);
        } else {
            send_error(app, req, 503, app->state == KVD_APP_LOADING ? "the model is loading" : "the server is shutting down",
                       NULL, app->state == KVD_APP_LOADING ? "loading" : "draining", "Retry-After: 1\r\n");
        }
        return;
    }
    if (found->id == ROUTE_METRICS) {
        handle_metrics(app, req);
        return;
    }
    if (found->needs_model && app->state != KVD_APP_READY) {
        bool loading = app->state == KVD_APP_LOADING;
        send_error(app, req, 503, loading ? "the model is loading; retry shortly" : "the server is shutting down", NULL,
                   loading ? "loading" : "draining", loading ? "Retry-After: 1\r\n" : NULL);
        return;
    }
    switch (found->id) {
    case ROUTE_MODELS:
        handle_models(app, req);
        break;
    case ROUTE_COMPLETIONS:
    case ROUTE_CHAT:
        handle_generate(app, req, found->id);
        break;
    case ROUTE_TOKENIZE:
        handle_tokenize(app, req);
        break;
    case ROUTE_DETOKENIZE:
        handle_detokenize(app, req);
        break;
    case ROUTE_KV:
        handle_kv(app, req);
        break;
    default:
        send_error(app, req, 500, "route not implemented", NULL, NULL, NULL);
        break;
    }
}

void kvd_openai_on_abort(kvd_http_request *req, void *arg)
{
    kvd_app *app = arg;
    kvd_job *job = kvd_http_user(req);
    if (!job)
        return;
    job->req = NULL;
    job->aborted = true;
    job->status = 499; /* nginx's "client closed request": logged, never sent */
    if (job->engine_id && app->engine)
        kvd_engine_cancel(app->engine, job->engine_id);
    /* A job on a worker (tokenizing, KV snapshot) is freed by its after-callback; a
     * submitted one when the engine reports every choice finished or cancelled. */
}

void kvd_openai_cancel_all(kvd_app *app)
{
    for (kvd_job *job = app->live_jobs; job; job = job->next)
        if (job->engine_id && app->engine)
            kvd_engine_cancel(app->engine, job->engine_id);
}

void kvd_openai_free_all(kvd_app *app)
{
    kvd_job *job = app->live_jobs;
    while (job) {
        kvd_job *next = job->next;
        if (!job->working) {
            job->req = NULL;
            job_free(job);
        }
        job = next;
    }
}
