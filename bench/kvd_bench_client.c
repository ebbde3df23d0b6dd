/* kvd_bench_client.c - kvd-bench's network side: sessions, HTTP/1.1 exchanges, load control.
 *
 * Everything runs on one libuv loop. An exchange is one request on its own connection
 * ("Connection: close": nothing to re-use or race with the server's idle timeout, and on
 * loopback a connect costs microseconds); it owns a socket, a timeout timer and an
 * llhttp response parser, and its body bytes go straight to the SSE reader stamped with
 * uv_hrtime() at the read. A session is a run of turns; a chat session keeps its
 * history (user, assistant, ...) and resends it whole each turn. A closed loop keeps
 * --concurrency sessions going; an open loop starts sessions at Poisson arrival times
 * and, with --concurrency, holds arrivals back while that many sessions are active.
 * With --sessions all sessions are open from the start and wait in a rotation: a free
 * client sends the next turn of the session at its head, and a session whose turn ended
 * goes to its tail, which is how many chat users sharing a few servers' slots behave.
 * With --think-time a client pauses before each chat turn (a user reading and typing),
 * holding its session in a timer meanwhile; the pause is not part of any latency.
 * The --duration timer cuts whatever is still running, so a run always ends.
 */
#include "kvd_bench.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <llhttp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <uv.h>

/* Error bodies are only shown as a hint; the models list is small JSON. */
#define MAX_ERROR_BODY 4096
#define MAX_MODELS_BODY (1u << 20)
/* How long a server may take to end its HTTP message after data: [DONE]. */
#define DRAIN_GRACE_MS 2000
/* How long, and how often, to ask /v1/models again while the server answers 503. */
#define LOADING_WAIT_S 60.0
#define LOADING_POLL_MS 250

typedef struct bench_run bench_run;
typedef struct bench_session bench_session;
typedef struct bench_exchange bench_exchange;
typedef struct bench_think bench_think;

struct bench_session {
    long index;
    long n_turns;
    long turns_sent;
    kvd_bench_rng rng;
    kvd_sbuf *history; /* (2 * n_turns - 1): user, assistant, user, ... */
    size_t n_history;
};

struct bench_exchange {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_connect_t connect_req;
    uv_write_t write_req;
    int handles_open;
    llhttp_t parser;
    bench_run *run;
    bench_session *session;  /* NULL for GET /v1/models */
    bench_exchange *prev, *next; /* in-flight list */
    kvd_sbuf request;
    kvd_sbuf body;      /* body of an error answer or of the models list */
    kvd_sbuf header_field;
    kvd_sbuf content_type;
    int in_content_type;
    kvd_bench_stream stream;
    uint64_t start_ns;
    uint64_t read_ns;        /* time of the read being parsed */
    uint64_t done_ns;        /* time of the read that delivered data: [DONE] */
    int draining;            /* [DONE] seen, letting the server end its message */
    size_t bytes_received;
    int status;
    int message_complete;
    int finished;
    int deferred_outcome;    /* failure found before the loop could report it */
    int pending_outcome;     /* failure found inside a parser callback */
    kvd_bench_result result;
    char read_buf[64 * 1024];
};

/* A client thinking before it sends its session's next turn. */
struct bench_think {
    uv_timer_t timer;
    bench_run *run;
    bench_session *session;
    bench_think *prev, *next; /* the run's thinkers */
};

struct bench_run {
    uv_loop_t loop;
    const kvd_bench_options *opt;
    const kvd_bench_url *url;
    const char *model;
    struct sockaddr_storage addr;
    llhttp_settings_t settings;
    kvd_bench_results *results;
    int fatal;               /* negative code when the run itself broke */
    kvd_error fatal_err;
    uint64_t t0_ns, end_ns;
    long n_sessions;         /* LONG_MAX when only --duration bounds the run */
    long sessions_started, sessions_arrived, active_sessions;
    long planned;
    int stopping, closing;
    kvd_bench_rng arrival_rng;
    double next_arrival_s;
    uv_timer_t arrival_timer, deadline_timer, progress_timer;
    int progress_on, progress_shown;
    bench_exchange *inflight;
    bench_think *thinkers;
    long n_ok, n_failed, out_tokens;
    /* --sessions: sessions waiting for their next turn, a ring of opt->sessions */
    bench_session **rotation;
    long rotation_head, rotation_count;
    long turns_inflight;
    /* models request */
    char *model_out;
    size_t model_cap;
    kvd_error *model_err;
    int model_rc;
};

static void exchange_finish(bench_exchange *ex, int outcome, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void session_turn_done(bench_run *run, bench_exchange *ex);
static void on_exchange_timer(uv_timer_t *timer);
static void run_check_done(bench_run *run);
static int session_think_then_send(bench_run *run, bench_session *s);

static double seconds_since(const bench_run *run, uint64_t ns)
{
    return (double)(ns - run->t0_ns) / 1e9;
}

/* ---- exchange: one request, one connection ---- */

static void exchange_free(bench_exchange *ex)
{
    kvd_sbuf_deinit(&ex->request);
    kvd_sbuf_deinit(&ex->body);
    kvd_sbuf_deinit(&ex->header_field);
    kvd_sbuf_deinit(&ex->content_type);
    kvd_bench_stream_deinit(&ex->stream);
    free(ex->result.itl_ms);
    free(ex);
}

static void on_handle_closed(uv_handle_t *handle)
{
    bench_exchange *ex = handle->data;
    if (--ex->handles_open == 0)
        exchange_free(ex);
}

static void exchange_unlink(bench_exchange *ex)
{
    bench_run *run = ex->run;
    if (ex->prev)
        ex->prev->next = ex->next;
    else if (run->inflight == ex)
        run->inflight = ex->next;
    if (ex->next)
        ex->next->prev = ex->prev;
    ex->prev = ex->next = NULL;
}

static void fill_result(bench_exchange *ex, int outcome, uint64_t end_ns)
{
    kvd_bench_result *r = &ex->result;
    const kvd_bench_stream *s = &ex->stream;
    r->outcome = outcome;
    r->http_status = ex->status;
    r->start_s = seconds_since(ex->run, ex->start_ns);
    r->e2el_ms = (double)(end_ns - ex->start_ns) / 1e6;
    r->ttft_ms = s->n_chunks > 0 ? (double)(s->first_ns - ex->start_ns) / 1e6 : -1.0;
    r->prompt_tokens = s->prompt_tokens;
    r->cached_tokens = s->cached_tokens;
    r->output_tokens = s->completion_tokens >= 0 ? s->completion_tokens : s->n_chunks;
    r->n_chunks = s->n_chunks;
    if (outcome == KVD_BENCH_OK) {
        r->itl_ms = s->itl_ms;
        r->n_itl = s->n_itl;
        ex->stream.itl_ms = NULL;
        ex->stream.n_itl = ex->stream.cap_itl = 0;
    }
}

static void exchange_finish(bench_exchange *ex, int outcome, const char *fmt, ...)
{
    if (ex->finished)
        return;
    uint64_t now = uv_hrtime();
    /* A successful stream ends when [DONE] was read, not when the HTTP message did. */
    uint64_t end_ns = now;
    if (outcome == KVD_BENCH_OK)
        end_ns = ex->done_ns ? ex->done_ns : ex->read_ns ? ex->read_ns : now;
    ex->finished = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ex->result.message, sizeof ex->result.message, fmt, ap);
    va_end(ap);
    /* Messages quote server bodies; keep each on one line. */
    for (char *c = ex->result.message; *c; c++)
        if ((unsigned char)*c < 0x20)
            *c = ' ';
    fill_result(ex, outcome, end_ns);
    exchange_unlink(ex);
    uv_timer_stop(&ex->timer);
    uv_close((uv_handle_t *)&ex->timer, on_handle_closed);
    uv_close((uv_handle_t *)&ex->tcp, on_handle_closed);
    bench_run *run = ex->run;
    if (end_ns > run->end_ns)
        run->end_ns = end_ns;
    session_turn_done(run, ex);
}

/* Decides, after the parser moved, whether the exchange is over and how. */
static void exchange_settle(bench_exchange *ex, int at_eof)
{
    if (ex->finished)
        return;
    if (ex->pending_outcome) {
        char message[sizeof ex->result.message];
        memcpy(message, ex->result.message, sizeof message);
        exchange_finish(ex, ex->pending_outcome, "%s", message);
        return;
    }
    if (ex->message_complete) {
        if (ex->status != 200) {
            exchange_finish(ex, KVD_BENCH_ERR_HTTP, "HTTP %d: %.150s", ex->status,
                            ex->body.data ? ex->body.data : "");
            return;
        }
        if (!ex->session) {
            exchange_finish(ex, KVD_BENCH_OK, "%s", "");
            return;
        }
        kvd_error err = {0};
        if (kvd_bench_stream_finish(&ex->stream, ex->read_ns, &err) < 0) {
            exchange_finish(ex, KVD_BENCH_ERR_STREAM, "%s", err.msg);
        } else if (ex->stream.done) {
            if (!ex->done_ns)
                ex->done_ns = ex->read_ns;
            exchange_finish(ex, KVD_BENCH_OK, "%s", "");
        } else
            exchange_finish(ex, KVD_BENCH_ERR_STREAM,
                            "stream ended without 'data: [DONE]' after %ld events",
                            ex->stream.n_events);
        return;
    }
    if (ex->session && ex->status == 200 && ex->stream.done) {
        /* Closing now would reset a server still writing its chunk terminator (it may
         * count that as a client disconnect); give it a moment to end the message. */
        if (at_eof) {
            exchange_finish(ex, KVD_BENCH_OK, "%s", "");
        } else if (!ex->draining) {
            ex->draining = 1;
            uv_timer_start(&ex->timer, on_exchange_timer, DRAIN_GRACE_MS, 0);
        }
        return;
    }
    if (at_eof)
        exchange_finish(ex, KVD_BENCH_ERR_STREAM,
                        "server closed the connection after %zu bytes, before the response "
                        "ended",
                        ex->bytes_received);
}

static bench_exchange *parser_exchange(llhttp_t *parser)
{
    return parser->data;
}

static int on_header_field(llhttp_t *parser, const char *at, size_t len)
{
    bench_exchange *ex = parser_exchange(parser);
    return kvd_sbuf_append(&ex->header_field, at, len) < 0 ? -1 : 0;
}

static int on_header_field_complete(llhttp_t *parser)
{
    bench_exchange *ex = parser_exchange(parser);
    ex->in_content_type =
        ex->header_field.data && !strcasecmp(ex->header_field.data, "content-type");
    kvd_sbuf_reset(&ex->header_field);
    return 0;
}

static int on_header_value(llhttp_t *parser, const char *at, size_t len)
{
    bench_exchange *ex = parser_exchange(parser);
    if (!ex->in_content_type || ex->content_type.len + len > 256)
        return 0;
    return kvd_sbuf_append(&ex->content_type, at, len) < 0 ? -1 : 0;
}

static int on_header_value_complete(llhttp_t *parser)
{
    parser_exchange(parser)->in_content_type = 0;
    return 0;
}

static int on_headers_complete(llhttp_t *parser)
{
    bench_exchange *ex = parser_exchange(parser);
    ex->status = llhttp_get_status_code(parser);
    if (ex->session && ex->status == 200 && ex->content_type.len > 0 &&
        !strstr(ex->content_type.data, "text/event-stream")) {
        ex->pending_outcome = KVD_BENCH_ERR_STREAM;
        snprintf(ex->result.message, sizeof ex->result.message,
                 "expected Content-Type text/event-stream, got '%.100s'",
                 ex->content_type.data);
        return -1;
    }
    return 0;
}

static int on_body(llhttp_t *parser, const char *at, size_t len)
{
    bench_exchange *ex = parser_exchange(parser);
    if (ex->session && ex->status == 200) {
        kvd_error err = {0};
        if (kvd_bench_stream_feed(&ex->stream, at, len, ex->read_ns, &err) < 0) {
            ex->pending_outcome = KVD_BENCH_ERR_STREAM;
            snprintf(ex->result.message, sizeof ex->result.message, "%.190s", err.msg);
            return -1;
        }
        if (ex->stream.done && !ex->done_ns)
            ex->done_ns = ex->read_ns;
        return 0;
    }
    size_t limit = ex->session ? MAX_ERROR_BODY : MAX_MODELS_BODY;
    if (ex->body.len + len > limit) {
        if (!ex->session) {
            ex->pending_outcome = KVD_BENCH_ERR_STREAM;
            snprintf(ex->result.message, sizeof ex->result.message,
                     "/v1/models answer longer than %zu bytes", limit);
            return -1;
        }
        len = limit - ex->body.len;
    }
    return kvd_sbuf_append(&ex->body, at, len) < 0 ? -1 : 0;
}

static int on_message_complete(llhttp_t *parser)
{
    parser_exchange(parser)->message_complete = 1;
    return HPE_PAUSED;
}

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf)
{
    bench_exchange *ex = handle->data;
    (void)suggested;
    *buf = uv_buf_init(ex->read_buf, sizeof ex->read_buf);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    bench_exchange *ex = stream->data;
    if (ex->finished || nread == 0)
        return;
    ex->read_ns = uv_hrtime();
    if (nread == UV_EOF) {
        if (!ex->message_complete) {
            llhttp_errno_t rc = llhttp_finish(&ex->parser);
            if (rc != HPE_OK && rc != HPE_PAUSED && !ex->pending_outcome) {
                exchange_finish(ex, KVD_BENCH_ERR_STREAM,
                                "connection closed mid-response after %zu bytes (%s)",
                                ex->bytes_received, llhttp_errno_name(rc));
                return;
            }
        }
        exchange_settle(ex, 1);
        return;
    }
    if (nread < 0) {
        exchange_finish(ex, ex->bytes_received ? KVD_BENCH_ERR_STREAM : KVD_BENCH_ERR_CONNECT,
                        "read failed after %zu bytes: %s", ex->bytes_received,
                        uv_strerror((int)nread));
        return;
    }
    ex->bytes_received += (size_t)nread;
    if (ex->message_complete)
        return; /* the answer is in; trailing bytes change nothing */
    llhttp_errno_t rc = llhttp_execute(&ex->parser, buf->base, (size_t)nread);
    if (rc != HPE_OK && rc != HPE_PAUSED && !ex->pending_outcome) {
        exchange_finish(ex, KVD_BENCH_ERR_STREAM, "bad HTTP response: %s (%s)",
                        llhttp_errno_name(rc), llhttp_get_error_reason(&ex->parser));
        return;
    }
    exchange_settle(ex, 0);
}

static void on_written(uv_write_t *req, int status)
{
    bench_exchange *ex = req->data;
    if (status < 0 && !ex->finished)
        exchange_finish(ex, KVD_BENCH_ERR_CONNECT, "sending the request failed: %s",
                        uv_strerror(status));
}

static void on_connected(uv_connect_t *req, int status)
{
    bench_exchange *ex = req->data;
    if (ex->finished)
        return;
    if (status < 0) {
        exchange_finish(ex, KVD_BENCH_ERR_CONNECT, "connect to %s:%d failed: %s",
                        ex->run->url->host, ex->run->url->port, uv_strerror(status));
        return;
    }
    uv_buf_t buf = uv_buf_init(ex->request.data, (unsigned)ex->request.len);
    ex->write_req.data = ex;
    int rc = uv_write(&ex->write_req, (uv_stream_t *)&ex->tcp, &buf, 1, on_written);
    if (rc == 0)
        rc = uv_read_start((uv_stream_t *)&ex->tcp, on_alloc, on_read);
    if (rc < 0)
        exchange_finish(ex, KVD_BENCH_ERR_CONNECT, "sending the request failed: %s",
                        uv_strerror(rc));
}

static void on_exchange_timer(uv_timer_t *timer)
{
    bench_exchange *ex = timer->data;
    if (ex->deferred_outcome) {
        char message[sizeof ex->result.message];
        memcpy(message, ex->result.message, sizeof message);
        exchange_finish(ex, ex->deferred_outcome, "%s", message);
    } else if (ex->draining) {
        exchange_finish(ex, KVD_BENCH_OK, "%s", "");
    } else
        exchange_finish(ex, KVD_BENCH_ERR_TIMEOUT, "no complete answer within %g s",
                        ex->run->opt->timeout_s);
}

static int build_request(bench_exchange *ex, const char *method, const char *route,
                         const kvd_sbuf *body)
{
    const bench_run *run = ex->run;
    kvd_sbuf *req = &ex->request;
    int rc = kvd_sbuf_printf(req,
                                   "%s %s%s HTTP/1.1\r\nHost: %s\r\n"
                                   "User-Agent: kvd-bench\r\nConnection: close\r\n",
                                   method, run->url->base_path, route, run->url->host_header);
    if (rc == 0 && run->opt->api_key[0])
        rc = kvd_sbuf_printf(req, "Authorization: Bearer %s\r\n", run->opt->api_key);
    if (rc == 0 && run->opt->session_header && ex->session)
        rc = kvd_sbuf_printf(req, "X-Session-ID: kvd-bench-%" PRIu64 "-%ld\r\n", run->opt->seed, ex->session->index);
    /* Names the turn in the server's request log (kvd logs X-Request-ID). */
    if (rc == 0 && run->opt->session_header && ex->session)
        rc = kvd_sbuf_printf(req, "X-Request-ID: kvd-bench-%" PRIu64 "-%ld-%ld\r\n", run->opt->seed,
                             ex->session->index, ex->result.turn);
    if (rc == 0 && body)
        rc = kvd_sbuf_printf(req,
                                   "Accept: text/event-stream\r\nContent-Type: application/json"
                                   "\r\nContent-Length: %zu\r\n",
                                   body->len);
    if (rc == 0)
        rc = kvd_sbuf_append(req, "\r\n", 2);
    if (rc == 0 && body)
        rc = kvd_sbuf_append(req, body->data, body->len);
    return rc;
}

/* Starts one exchange. On failure to even start, returns a negative code and frees
 * it; failures after start (connect refused, ...) arrive as results through the loop. */
static int exchange_start(bench_run *run, bench_session *session, const char *method,
                          const char *route, const kvd_sbuf *body, int chat,
                          kvd_bench_result *plan)
{
    bench_exchange *ex = calloc(1, sizeof *ex);
    if (!ex)
        return KVD_ENOMEM;
    ex->run = run;
    ex->session = session;
    if (plan)
        ex->result = *plan;
    kvd_bench_stream_init(&ex->stream, chat);
    if (build_request(ex, method, route, body) < 0) {
        exchange_free(ex);
        return KVD_ENOMEM;
    }
    llhttp_init(&ex->parser, HTTP_RESPONSE, &run->settings);
    ex->parser.data = ex;
    int rc = uv_tcp_init(&run->loop, &ex->tcp);
    if (rc < 0) {
        exchange_free(ex);
        return KVD_EIO;
    }
    ex->tcp.data = ex;
    ex->handles_open = 1;
    uv_timer_init(&run->loop, &ex->timer);
    ex->timer.data = ex;
    ex->handles_open = 2;
    ex->next = run->inflight;
    if (run->inflight)
        run->inflight->prev = ex;
    run->inflight = ex;
    ex->start_ns = uv_hrtime();
    ex->connect_req.data = ex;
    uv_tcp_nodelay(&ex->tcp, 1);
    rc = uv_tcp_connect(&ex->connect_req, &ex->tcp, (const struct sockaddr *)&run->addr,
                        on_connected);
    if (rc < 0) {
        /* Report through the loop so a burst of failures never recurses. */
        ex->deferred_outcome = KVD_BENCH_ERR_CONNECT;
        snprintf(ex->result.message, sizeof ex->result.message,
                 "connect to %.100s:%d failed: %.60s", run->url->host, run->url->port,
                 uv_strerror(rc));
        uv_timer_start(&ex->timer, on_exchange_timer, 0, 0);
    } else {
        uint64_t timeout_ms = (uint64_t)(run->opt->timeout_s * 1000.0 + 0.5);
        uv_timer_start(&ex->timer, on_exchange_timer, timeout_ms ? timeout_ms : 1, 0);
    }
    return 0;
}

/* ---- sessions and load control ---- */

static void run_fail(bench_run *run, int code, const char *what)
{
    if (!run->fatal) {
        run->fatal = code;
        kvd_error_set(&run->fatal_err, code, "kvd-bench: %s: %s", what, kvd_strerror(code));
    }
    run->stopping = 1;
}

static void session_free(bench_session *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < (size_t)(2 * s->n_turns); i++)
        kvd_sbuf_deinit(&s->history[i]);
    free(s->history);
    free(s);
}

static int session_send_turn(bench_run *run, bench_session *s)
{
    const kvd_bench_options *opt = run->opt;
    kvd_bench_result plan = {0};
    plan.session = s->index;
    plan.turn = s->turns_sent + 1;
    /* Draw order is fixed (lengths, then words), so answers never shift the stream. */
    plan.prompt_words = kvd_bench_rng_pick(&s->rng, opt->prompt_tokens);
    plan.max_tokens = kvd_bench_rng_pick(&s->rng, opt->max_tokens);
    kvd_sbuf *user = &s->history[s->n_history];
    kvd_sbuf body = {0};
    kvd_sbuf_reset(user);
    int rc = kvd_bench_make_words(user, &s->rng, plan.prompt_words);
    if (rc == 0 && opt->turns > 1)
        rc = kvd_bench_body_chat(&body, opt, run->model, s->history, s->n_history + 1,
                                 plan.max_tokens);
    else if (rc == 0)
        rc = kvd_bench_body_completion(&body, opt, run->model, user->data, plan.max_tokens);
    if (rc == 0)
        rc = exchange_start(run, s, "POST",
                            opt->turns > 1 ? "/v1/chat/completions" : "/v1/completions", &body,
                            opt->turns > 1, &plan);
    kvd_sbuf_deinit(&body);
    if (rc < 0)
        return rc;
    s->n_history++;
    s->turns_sent++;
    return 0;
}

/* Allocates session index with its random stream; NULL when out of memory. */
static bench_session *session_create(const kvd_bench_options *opt, long index)
{
    bench_session *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->index = index;
    s->n_turns = opt->turns;
    if (opt->requests > 0 && opt->requests - index * opt->turns < opt->turns)
        s->n_turns = opt->requests - index * opt->turns;
    s->history = calloc((size_t)(2 * s->n_turns), sizeof *s->history);
    if (!s->history) {
        free(s);
        return NULL;
    }
    kvd_bench_session_rng(&s->rng, opt->seed, index);
    return s;
}

static void session_start_next(bench_run *run)
{
    if (run->stopping || run->sessions_started >= run->n_sessions)
        return;
    bench_session *s = session_create(run->opt, run->sessions_started);
    if (!s) {
        run_fail(run, KVD_ENOMEM, "starting a session");
        return;
    }
    run->sessions_started++;
    run->active_sessions++;
    int rc = run->opt->rate > 0.0 ? session_send_turn(run, s) : session_think_then_send(run, s);
    if (rc < 0) {
        run->active_sessions--;
        session_free(s);
        run_fail(run, rc, "sending a request");
    }
}

/* --sessions: free clients take the sessions at the head of the rotation; once the run
 * stops, the sessions still waiting are dropped (their turns are simply not sent). */
static void rotation_dispatch(bench_run *run)
{
    long n = run->opt->sessions;
    while (!run->stopping && run->turns_inflight < run->opt->concurrency &&
           run->rotation_count > 0) {
        bench_session *s = run->rotation[run->rotation_head];
        run->rotation_head = (run->rotation_head + 1) % n;
        run->rotation_count--;
        run->turns_inflight++;
        int rc = session_think_then_send(run, s);
        if (rc < 0) {
            run->turns_inflight--;
            run->active_sessions--;
            session_free(s);
            run_fail(run, rc, "sending a request");
            break;
        }
    }
    while (run->stopping && run->rotation_count > 0) {
        session_free(run->rotation[run->rotation_head]);
        run->rotation_head = (run->rotation_head + 1) % n;
        run->rotation_count--;
        run->active_sessions--;
    }
}

static void rotation_push(bench_run *run, bench_session *s)
{
    long n = run->opt->sessions;
    run->rotation[(run->rotation_head + run->rotation_count) % n] = s;
    run->rotation_count++;
}

/* Opens every session and queues it in index order. Returns 0 or KVD_ENOMEM. */
static int rotation_start(bench_run *run)
{
    long n = run->opt->sessions;
    run->rotation = calloc((size_t)n, sizeof *run->rotation);
    if (!run->rotation)
        return KVD_ENOMEM;
    for (long i = 0; i < n; i++) {
        bench_session *s = session_create(run->opt, i);
        if (!s)
            return KVD_ENOMEM;
        rotation_push(run, s);
        run->sessions_started++;
        run->active_sessions++;
    }
    rotation_dispatch(run);
    return 0;
}

/* ---- think time ---- */

static void on_think_closed(uv_handle_t *handle)
{
    free(handle->data);
}

static void think_remove(bench_run *run, bench_think *t)
{
    if (t->prev)
        t->prev->next = t->next;
    else
        run->thinkers = t->next;
    if (t->next)
        t->next->prev = t->prev;
    uv_close((uv_handle_t *)&t->timer, on_think_closed);
}

/* A session that will send nothing more: its client is free again. */
static void think_drop(bench_run *run, bench_session *s)
{
    if (run->opt->sessions > 0)
        run->turns_inflight--;
    run->active_sessions--;
    session_free(s);
}

static void on_think_done(uv_timer_t *timer)
{
    bench_think *t = timer->data;
    bench_run *run = t->run;
    bench_session *s = t->session;
    think_remove(run, t);
    if (run->stopping) {
        think_drop(run, s);
        run_check_done(run);
        return;
    }
    int rc = session_send_turn(run, s);
    if (rc < 0) {
        think_drop(run, s);
        run_fail(run, rc, "sending a request");
        run_check_done(run);
    }
}

/* Sends s's next turn after its think time (at once without --think-time). */
static int session_think_then_send(bench_run *run, bench_session *s)
{
    const double think_s = kvd_bench_think_time(run->opt->seed, s->index, s->turns_sent + 1, run->opt->think_s);
    if (think_s <= 0.0)
        return session_send_turn(run, s);
    bench_think *t = calloc(1, sizeof *t);
    if (!t)
        return KVD_ENOMEM;
    t->run = run;
    t->session = s;
    uv_timer_init(&run->loop, &t->timer);
    t->timer.data = t;
    t->next = run->thinkers;
    if (run->thinkers)
        run->thinkers->prev = t;
    run->thinkers = t;
    uv_timer_start(&t->timer, on_think_done, (uint64_t)(think_s * 1000.0 + 0.5), 0);
    return 0;
}

/* Open loop: start arrived sessions while the concurrency cap allows. */
static void run_admit(bench_run *run)
{
    long cap = run->opt->concurrency;
    while (!run->stopping && run->sessions_started < run->sessions_arrived &&
           (cap <= 0 || run->active_sessions < cap))
        session_start_next(run);
}

static void session_turn_done(bench_run *run, bench_exchange *ex)
{
    bench_session *s = ex->session;
    if (!s)
        return; /* GET /v1/models: kvd_bench_fetch_model reads the answer */
    kvd_bench_result *r = &ex->result;
    if (r->outcome == KVD_BENCH_OK) {
        run->n_ok++;
        run->out_tokens += r->output_tokens;
    } else if (r->outcome != KVD_BENCH_INCOMPLETE) {
        run->n_failed++;
    }
    if (kvd_bench_results_add(run->results, r) < 0)
        run_fail(run, KVD_ENOMEM, "recording a result");

    int more = s->turns_sent < s->n_turns;
    int rotating = run->opt->sessions > 0;
    if (rotating)
        run->turns_inflight--;
    if (more && r->outcome == KVD_BENCH_OK && !run->stopping) {
        /* The next turn carries the answer exactly as received. */
        kvd_sbuf answer = ex->stream.text;
        ex->stream.text = s->history[s->n_history];
        s->history[s->n_history++] = answer;
        if (rotating) {
            rotation_push(run, s);
            ex->session = NULL;
            rotation_dispatch(run);
            run_check_done(run);
            return;
        }
        int rc = session_think_then_send(run, s);
        if (rc == 0)
            return;
        run_fail(run, rc, "sending a request");
    }
    if (more && r->outcome != KVD_BENCH_OK && r->outcome != KVD_BENCH_INCOMPLETE)
        run->results->abandoned += s->n_turns - s->turns_sent;
    run->active_sessions--;
    session_free(s);
    ex->session = NULL;
    if (rotating)
        rotation_dispatch(run);
    else if (run->opt->rate > 0.0)
        run_admit(run);
    else
        session_start_next(run);
    run_check_done(run);
}

static void close_run_timer(uv_timer_t *timer)
{
    if (!uv_is_closing((uv_handle_t *)timer)) {
        uv_timer_stop(timer);
        uv_close((uv_handle_t *)timer, NULL);
    }
}

static void print_progress(bench_run *run, int final)
{
    double t = seconds_since(run, uv_hrtime());
    long inflight = 0;
    for (const bench_exchange *ex = run->inflight; ex; ex = ex->next)
        inflight++;
    char total[32] = "?";
    if (run->planned > 0)
        snprintf(total, sizeof total, "%ld", run->planned);
    fprintf(stderr, "\r[%6.1fs] %ld/%s done, %ld failed, %ld running | %.2f req/s, %.1f tok/s  ",
            t, run->n_ok, total, run->n_failed, inflight, t > 0 ? (double)run->n_ok / t : 0.0,
            t > 0 ? (double)run->out_tokens / t : 0.0);
    if (final)
        fputc('\n', stderr);
    fflush(stderr);
    run->progress_shown = 1;
}

static void run_check_done(bench_run *run)
{
    if (run->closing || run->inflight || run->active_sessions > 0)
        return;
    if (!run->stopping && run->sessions_started < run->n_sessions)
        return;
    run->closing = 1;
    if (run->progress_on && run->progress_shown)
        print_progress(run, 1);
    close_run_timer(&run->arrival_timer);
    close_run_timer(&run->deadline_timer);
    close_run_timer(&run->progress_timer);
}

static void on_arrival(uv_timer_t *timer)
{
    bench_run *run = timer->data;
    double now_s = seconds_since(run, uv_hrtime());
    while (run->sessions_arrived < run->n_sessions && run->next_arrival_s <= now_s) {
        run->sessions_arrived++;
        run->next_arrival_s += kvd_bench_arrival_gap(&run->arrival_rng, run->opt->rate);
    }
    run_admit(run);
    if (run->stopping || run->sessions_arrived >= run->n_sessions) {
        run_check_done(run);
        return;
    }
    double wait_ms = (run->next_arrival_s - seconds_since(run, uv_hrtime())) * 1000.0;
    uv_timer_start(&run->arrival_timer, on_arrival, wait_ms > 0 ? (uint64_t)wait_ms + 1 : 0,
                   0);
}

static void on_deadline(uv_timer_t *timer)
{
    bench_run *run = timer->data;
    run->stopping = 1;
    uv_timer_stop(&run->arrival_timer);
    while (run->inflight) {
        bench_exchange *ex = run->inflight;
        if (ex->draining) /* its answer is complete */
            exchange_finish(ex, KVD_BENCH_OK, "%s", "");
        else
            exchange_finish(ex, KVD_BENCH_INCOMPLETE, "cut by --duration %g s",
                            run->opt->duration_s);
    }
    while (run->thinkers) {
        bench_session *s = run->thinkers->session;
        think_remove(run, run->thinkers);
        think_drop(run, s);
    }
    if (run->opt->sessions > 0)
        rotation_dispatch(run);
    run_check_done(run);
}

static void on_progress(uv_timer_t *timer)
{
    print_progress(timer->data, 0);
}

/* ---- set-up shared by the models request and the workload ---- */

static int resolve(bench_run *run, kvd_error *err)
{
    char port[16];
    snprintf(port, sizeof port, "%d", run->url->port);
    uv_getaddrinfo_t req;
    /* kvd listens on IPv4 loopback; "localhost" must not land on ::1 first. */
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM};
    int rc = uv_getaddrinfo(&run->loop, &req, NULL, run->url->host, port, &hints);
    if (rc < 0) {
        hints.ai_family = AF_UNSPEC;
        rc = uv_getaddrinfo(&run->loop, &req, NULL, run->url->host, port, &hints);
    }
    if (rc < 0)
        return kvd_error_set(err, KVD_EINVAL, "--url: cannot resolve '%s': %s", run->url->host,
                             uv_strerror(rc));
    memcpy(&run->addr, req.addrinfo->ai_addr, req.addrinfo->ai_addrlen);
    uv_freeaddrinfo(req.addrinfo);
    return 0;
}

static int run_init(bench_run *run, const kvd_bench_options *opt, const kvd_bench_url *url,
                    kvd_error *err)
{
    memset(run, 0, sizeof *run);
    run->opt = opt;
    run->url = url;
    int rc = uv_loop_init(&run->loop);
    if (rc < 0)
        return kvd_error_set(err, KVD_EIO, "uv_loop_init: %s", uv_strerror(rc));
    rc = resolve(run, err);
    if (rc < 0) {
        uv_loop_close(&run->loop);
        return rc;
    }
    llhttp_settings_init(&run->settings);
    run->settings.on_header_field = on_header_field;
    run->settings.on_header_field_complete = on_header_field_complete;
    run->settings.on_header_value = on_header_value;
    run->settings.on_header_value_complete = on_header_value_complete;
    run->settings.on_headers_complete = on_headers_complete;
    run->settings.on_body = on_body;
    run->settings.on_message_complete = on_message_complete;
    return 0;
}

static int run_close(bench_run *run, kvd_error *err)
{
    int rc = uv_loop_close(&run->loop);
    if (rc < 0)
        return kvd_error_set(err, KVD_ESTATE, "kvd-bench: handles left open at exit: %s",
                             uv_strerror(rc));
    return 0;
}

/* ---- GET /v1/models ---- */

int kvd_bench_fetch_model(const kvd_bench_options *opt, const kvd_bench_url *url,
                          char *model, size_t model_cap, kvd_error *err)
{
    bench_run run;
    int rc = run_init(&run, opt, url, err);
    if (rc < 0)
        return rc;
    kvd_bench_results results = {0};
    run.results = &results;
    run.t0_ns = uv_hrtime();
    /* A server started just before us may still be loading its model (503): wait. */
    double wait_s = opt->timeout_s < LOADING_WAIT_S ? opt->timeout_s : LOADING_WAIT_S;
    bench_exchange *ex = NULL;
    for (int attempt = 0;; attempt++) {
        rc = exchange_start(&run, NULL, "GET", "/v1/models", NULL, 0, NULL);
        if (rc < 0) {
            run_close(&run, NULL);
            return kvd_error_set(err, rc, "GET /v1/models: cannot start: %s", kvd_strerror(rc));
        }
        ex = run.inflight;
        ex->handles_open++; /* hold the memory until we read the answer */
        uv_run(&run.loop, UV_RUN_DEFAULT);
        if (ex->result.outcome != KVD_BENCH_ERR_HTTP || ex->status != 503 ||
            seconds_since(&run, uv_hrtime()) >= wait_s)
            break;
        if (attempt == 0)
            fprintf(stderr, "kvd-bench: %s answers 503 (loading?); waiting up to %g s\n",
                    opt->url, wait_s);
        exchange_free(ex);
        uv_sleep(LOADING_POLL_MS);
    }
    if (ex->result.outcome != KVD_BENCH_OK) {
        rc = kvd_error_set(err, KVD_EIO, "GET %s/v1/models: %s", opt->url, ex->result.message);
    } else {
        cJSON *root = cJSON_ParseWithLength(ex->body.data ? ex->body.data : "", ex->body.len);
        const cJSON *data = cJSON_GetObjectItemCaseSensitive(root, "data");
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(data, 0), "id");
        if (!cJSON_IsString(id))
            rc = kvd_error_set(err, KVD_EFORMAT, "GET %s/v1/models: no data[0].id in '%.100s'",
                               opt->url, ex->body.data ? ex->body.data : "");
        else if (strlen(id->valuestring) >= model_cap)
            rc = kvd_error_set(err, KVD_EFORMAT, "GET %s/v1/models: model id too long",
                               opt->url);
        else
            snprintf(model, model_cap, "%s", id->valuestring);
        cJSON_Delete(root);
    }
    exchange_free(ex);
    int close_rc = run_close(&run, rc < 0 ? NULL : err);
    kvd_bench_results_deinit(&results);
    return rc < 0 ? rc : close_rc;
}

/* ---- the workload ---- */

int kvd_bench_run(const kvd_bench_options *opt, const kvd_bench_url *url, const char *model,
                  kvd_bench_results *results, long *planned, double *duration_s,
                  kvd_error *err)
{
    bench_run *run = calloc(1, sizeof *run);
    if (!run)
        return kvd_error_set(err, KVD_ENOMEM, "kvd-bench: out of memory");
    int rc = run_init(run, opt, url, err);
    if (rc < 0) {
        free(run);
        return rc;
    }
    run->model = model;
    run->results = results;
    run->n_sessions = opt->requests > 0 ? (opt->requests + opt->turns - 1) / opt->turns
                                        : LONG_MAX;
    run->planned = opt->requests;
    run->progress_on = opt->progress != 0 && isatty(STDERR_FILENO);
    uv_timer_init(&run->loop, &run->arrival_timer);
    uv_timer_init(&run->loop, &run->deadline_timer);
    uv_timer_init(&run->loop, &run->progress_timer);
    run->arrival_timer.data = run->deadline_timer.data = run->progress_timer.data = run;
    run->t0_ns = uv_hrtime();
    run->end_ns = run->t0_ns;
    uv_timer_start(&run->deadline_timer, on_deadline, (uint64_t)(opt->duration_s * 1000.0), 0);
    if (run->progress_on)
        uv_timer_start(&run->progress_timer, on_progress, 1000, 1000);
    if (opt->sessions > 0) {
        rc = rotation_start(run);
        if (rc < 0)
            run_fail(run, rc, "opening the sessions");
        rotation_dispatch(run);
    } else if (opt->rate > 0.0) {
        kvd_bench_arrival_rng(&run->arrival_rng, opt->seed);
        run->next_arrival_s = 0.0;
        on_arrival(&run->arrival_timer);
    } else {
        for (long c = 0; c < opt->concurrency && !run->stopping; c++)
            session_start_next(run);
    }
    run_check_done(run);
    uv_run(&run->loop, UV_RUN_DEFAULT);
    *planned = opt->requests;
    *duration_s = (double)(run->end_ns - run->t0_ns) / 1e9;
    rc = run->fatal;
    if (rc < 0)
        *err = run->fatal_err;
    int close_rc = run_close(run, rc < 0 ? NULL : err);
    free(run->rotation);
    free(run);
    return rc < 0 ? rc : close_rc;
}
