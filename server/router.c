/* router.c - routes: path and method to handler, the API key, health, models,
 * metrics, the web pages; generation, tokenize and the KV view go to jobs.c.
 *
 * The embedded web pages (web.h: a chat page at /, the KV view at /kv) are served
 * without authentication: they are static files that hold no secret and reach the
 * model only through the API routes.
 */
#include "router.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "web.h"

enum route_id {
    ROUTE_HEALTH,
    ROUTE_MODELS,
    ROUTE_METRICS,
    ROUTE_COMPLETIONS,
    ROUTE_CHAT,
    ROUTE_TOKENIZE,
    ROUTE_DETOKENIZE,
    ROUTE_APPLY_TEMPLATE,
    ROUTE_KV,
    ROUTE_VERSION,
    ROUTE_MODEL, /* /v1/models/{id} */
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
    {"/apply-template", "POST", ROUTE_APPLY_TEMPLATE, true, true},
    {"/v1/kv", "GET", ROUTE_KV, true, true},
    {"/version", "GET", ROUTE_VERSION, false, false},
    {"/v1/models/", "GET", ROUTE_MODEL, true, true}, /* a prefix: the rest is the id */
};

#define MODEL_PREFIX "/v1/models/"

/* Whether name is the served model's name or one of its aliases. */
static bool serves_model(const kvd_router *r, const char *name)
{
    for (int i = 0; i < r->num_model_names; i++)
        if (strcmp(r->model_names[i], name) == 0)
            return true;
    return false;
}

static void model_not_found(kvd_router *r, kvd_http_request *req, const char *name)
{
    char msg[400];
    snprintf(msg, sizeof msg, "The model `%.200s` does not exist; this server serves `%s`.", name,
             r->model_names[0]);
    kvd_jobs_send_error(r->jobs, req, 404, msg, "model", "model_not_found", NULL);
}

/* No filesystem path: "root" names the model as it is served. */
static cJSON *model_object(const kvd_router *r, const char *id)
{
    cJSON *model = cJSON_CreateObject();
    cJSON_AddStringToObject(model, "id", id);
    cJSON_AddStringToObject(model, "object", "model");
    cJSON_AddNumberToObject(model, "created", (double)time(NULL));
    cJSON_AddStringToObject(model, "owned_by", "kvd");
    cJSON_AddStringToObject(model, "root", r->model_names[0]);
    cJSON_AddNullToObject(model, "parent");
    cJSON_AddNumberToObject(model, "max_model_len", r->jobs->model.info.max_model_len);
    return model;
}

static void handle_models(kvd_router *r, kvd_http_request *req)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(root, "data");
    cJSON_AddItemToArray(data, model_object(r, r->model_names[0]));
    kvd_jobs_respond_json(r->jobs, req, 200, root, NULL);
}

/* GET /v1/models/{id}: the served name or an alias, as OpenAI's retrieve. */
static void handle_model(kvd_router *r, kvd_http_request *req)
{
    const char *id = kvd_http_path(req) + strlen(MODEL_PREFIX);
    if (!serves_model(r, id)) {
        model_not_found(r, req, id);
        return;
    }
    kvd_jobs_respond_json(r->jobs, req, 200, model_object(r, id), NULL);
}

static void handle_version(kvd_router *r, kvd_http_request *req)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "version", KVD_VERSION);
    kvd_jobs_respond_json(r->jobs, req, 200, root, NULL);
}

static void handle_metrics(kvd_router *r, kvd_http_request *req)
{
    kvd_engine_stats st;
    memset(&st, 0, sizeof st);
    if (r->jobs->model.engine)
        kvd_engine_stats_get(r->jobs->model.engine, &st);
    kvd_metrics *m = r->jobs->metrics;
    m->open_connections = kvd_http_server_num_connections(r->http);
    kvd_sbuf out = {0};
    kvd_metrics_render(m, &st, &out);
    if (out.failed)
        kvd_jobs_send_error(r->jobs, req, 500, "out of memory", NULL, NULL, NULL);
    else
        kvd_jobs_respond(r->jobs, req, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, out.data, out.len);
    kvd_sbuf_deinit(&out);
}

static bool authorized(const kvd_router *r, const kvd_http_request *req)
{
    const char *key = r->cfg->api_key;
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

/* Back from the worker that parsed the body (jobs.c), on the loop. */
static void with_body(kvd_http_request *req, cJSON **body, void *arg, int id)
{
    kvd_router *r = arg;
    /* A request names the model it was written for: another one's answer would be
     * a silent substitution (vLLM answers 404 the same way). */
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(*body, "model");
    if (cJSON_IsString(model) && !serves_model(r, model->valuestring)) {
        model_not_found(r, req, model->valuestring);
        return;
    }
    switch (id) {
    case ROUTE_COMPLETIONS:
        kvd_jobs_generate(r->jobs, req, KVD_OAI_COMPLETIONS, body);
        break;
    case ROUTE_CHAT:
        kvd_jobs_generate(r->jobs, req, KVD_OAI_CHAT, body);
        break;
    case ROUTE_TOKENIZE:
        kvd_jobs_tokenize(r->jobs, req, body);
        break;
    case ROUTE_APPLY_TEMPLATE:
        kvd_jobs_apply_template(r->jobs, req, body);
        break;
    default:
        kvd_jobs_detokenize(r->jobs, req, body);
        break;
    }
}

static const route *find_route(const char *path)
{
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++)
        if (strcmp(routes[i].path, path) == 0 ||
            (routes[i].id == ROUTE_MODEL && strncmp(path, MODEL_PREFIX, strlen(MODEL_PREFIX)) == 0 &&
             path[strlen(MODEL_PREFIX)]))
            return &routes[i];
    return NULL;
}

bool kvd_router_on_headers(const kvd_http_request *req, kvd_http_refusal *refusal, void *arg)
{
    const kvd_router *r = arg;
    const route *found = find_route(kvd_http_path(req));
    if (!found || !found->needs_auth || strcmp(found->method, kvd_http_method(req)) != 0 || authorized(r, req))
        return false;
    /* Before the body: an unauthorized client gets no 100 Continue and buffers nothing. */
    refusal->status = 401;
    refusal->message = "Incorrect or missing API key: send Authorization: Bearer <key>";
    refusal->code = "invalid_api_key";
    refusal->extra_headers = "WWW-Authenticate: Bearer\r\n";
    return true;
}

void kvd_router_on_request(kvd_http_request *req, void *arg)
{
    kvd_router *r = arg;
    kvd_jobs *jobs = r->jobs;
    const char *path = kvd_http_path(req);
    const char *method = kvd_http_method(req);
    const route *found = find_route(path);
    /* The daemon's own pages (server/web/): static, so no API key and no model needed. */
    const kvd_web_asset *asset = found ? NULL : kvd_web_find(path);
    if (asset) {
        if (strcmp(method, "GET") != 0) {
            char msg[300];
            snprintf(msg, sizeof msg, "Method %s is not allowed on %s; use GET", method, path);
            kvd_jobs_send_error(jobs, req, 405, msg, NULL, "method_not_allowed", "Allow: GET\r\n");
            return;
        }
        kvd_jobs_respond(jobs, req, 200, asset->content_type, KVD_WEB_HEADERS, (const char *)asset->data,
                         asset->len);
        return;
    }
    if (!found) {
        char msg[300];
        snprintf(msg, sizeof msg, "Invalid URL (%s %.200s)", method, path);
        kvd_jobs_send_error(jobs, req, 404, msg, NULL, "not_found", NULL);
        return;
    }
    if (strcmp(found->method, method) != 0) {
        char msg[300], allow[64];
        snprintf(msg, sizeof msg, "Method %s is not allowed on %.200s; use %s", method, path, found->method);
        snprintf(allow, sizeof allow, "Allow: %s\r\n", found->method);
        kvd_jobs_send_error(jobs, req, 405, msg, NULL, "method_not_allowed", allow);
        return;
    }
    if (found->needs_auth && !authorized(r, req)) {
        kvd_jobs_send_error(jobs, req, 401, "Incorrect or missing API key: send Authorization: Bearer <key>", NULL,
                            "invalid_api_key", "WWW-Authenticate: Bearer\r\n");
        return;
    }
    if (found->id == ROUTE_HEALTH) {
        if (r->state == KVD_SERVE_READY) {
            static const char ok[] = "{\"status\":\"ok\"}";
            kvd_jobs_respond(jobs, req, 200, "application/json", NULL, ok, sizeof ok - 1);
        } else {
            bool loading = r->state == KVD_SERVE_LOADING;
            kvd_jobs_send_error(jobs, req, 503, loading ? "the model is loading" : "the server is shutting down", NULL,
                                loading ? "loading" : "draining", "Retry-After: 1\r\n");
        }
        return;
    }
    if (found->id == ROUTE_METRICS) {
        handle_metrics(r, req);
        return;
    }
    if (found->id == ROUTE_VERSION) {
        handle_version(r, req);
        return;
    }
    if (found->needs_model && r->state != KVD_SERVE_READY) {
        bool loading = r->state == KVD_SERVE_LOADING;
        kvd_jobs_send_error(jobs, req, 503, loading ? "the model is loading; retry shortly" : "the server is shutting down",
                            NULL, loading ? "loading" : "draining", loading ? "Retry-After: 1\r\n" : NULL);
        return;
    }
    switch (found->id) {
    case ROUTE_MODELS:
        handle_models(r, req);
        break;
    case ROUTE_MODEL:
        handle_model(r, req);
        break;
    case ROUTE_KV:
        kvd_jobs_kv(jobs, req);
        break;
    default:
        kvd_jobs_parse_body(jobs, req, found->path, with_body, r, found->id);
        break;
    }
}

void kvd_router_on_abort(kvd_http_request *req, void *arg)
{
    kvd_router *r = arg;
    kvd_jobs_on_abort(r->jobs, req);
}
