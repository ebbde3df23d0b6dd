/* http.c - HTTP/1.1 connections over libuv with llhttp parsing, one request at a time.
 *
 * Each connection moves through phases: HEAD (from accept or a message's first byte
 * until its headers are complete, under the header timer), BODY (under the idle
 * timer, reset by every read, and the body deadline, fixed when the headers end:
 * reads never move it, so trickling a body cannot hold a connection open), APP (the
 * application holds the request; no timer, reading continues so a disconnect is
 * noticed at once and cancels the request; a half-close only stops reading: the peer
 * still reads our answer), FLUSH (the application finished; the
 * response's last write is in flight), IDLE (keep-alive, waiting for the next request
 * under the idle timer) and LINGER (a closing response was sent: half-close, discard
 * input briefly, then close, so the peer reads our answer instead of a reset caused by
 * bytes it sent that we never read).
 *
 * Input is appended to a per-connection buffer and parsed from there; llhttp pauses
 * at the end of every message, so bytes of pipelined requests wait in the buffer
 * until the current response is written. While the application holds a request the
 * buffer may grow to a bounded backlog, then reading stops until it drains.
 * Every write is one malloc'ed uv_write_t carrying its bytes; the sum of bytes not
 * yet handed to the kernel is the connection's write queue, capped for streams. A
 * whole body the application hands over (kvd_http_respond_take) is not copied: it is
 * written from its own buffer in slices of BODY_SLICE_BYTES, one slice in flight at a
 * time, and freed off the loop once the last slice is written. While
 * bytes wait in it (APP and FLUSH), the timer is the send timer: a peer that takes
 * none of them for send_timeout_ms loses its connection, so one that pipelines and
 * never reads cannot hold a slot and its queued answer forever.
 *
 * Strictness: llhttp 8 is built with LLHTTP_STRICT_MODE (CRLF after chunk data,
 * header names of token characters only); what it still lets through (obs-fold,
 * empty names, control bytes, Host missing or repeated, codings other than chunked,
 * chunked on HTTP/1.0) is refused in the callbacks below.
 */
#include "http.h"

#include <llhttp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <ctype.h>
#include <string.h>
#include <strings.h>

#include "util.h"

enum conn_phase {
    PHASE_HEAD,
    PHASE_BODY,
    PHASE_APP,
    PHASE_FLUSH,
    PHASE_IDLE,
    PHASE_LINGER,
};

/* How often a half-closed connection is checked for a reset while its answer is made. */
#define PROBE_MS 100
/* How long a closing connection keeps discarding input before it closes. */
#define LINGER_MS 2000
/* Pipelined input kept while a request is with the application. */
#define MAX_BACKLOG_BYTES (64u << 10)
/* A body handed over whole goes to libuv this much at a time: a single write() to a
 * loopback peer that keeps reading copies as long as the peer drains its window, so a
 * 42 MB answer in one write held the loop for hundreds of milliseconds. */
#define BODY_SLICE_BYTES (256u << 10)
/* Request bodies keep their buffer between keep-alive requests up to this size. */
#define KEEP_BODY_CAP (64u << 10)

typedef struct header_ref {
    size_t name;  /* offsets into the request's head buffer */
    size_t value;
} header_ref;

struct kvd_http_request {
    struct http_conn *conn;
    const char *method;
    kvd_sbuf head;      /* url\0 name\0 value\0 name\0 value\0 ... */
    size_t token_start; /* where the URL/name/value being received began in head */
    size_t url;
    size_t header_name;
    header_ref *headers;
    int num_headers;
    int headers_cap;
    char *path;         /* malloc'ed copies split from the URL at dispatch */
    char *query;
    kvd_sbuf body;
    bool keep_alive;
    bool http10;
    bool upgrade;
    bool head_only;     /* HEAD: answered as GET, without the body */
    bool cors;          /* allowed cross-origin: responses carry Access-Control-Allow-Origin */
    size_t reserved;    /* body bytes counted against max_buffered_body_bytes */
    size_t framing;     /* chunk-extension bytes, counted against max_body_bytes */
    bool dispatched;    /* handed to on_request */
    bool finished;      /* answered by the application */
    bool streaming;
    bool chunked;
    uint64_t arrival_ns;
    void *user;
};

typedef struct http_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_timer_t probe;   /* a half-closed peer: still there to read the answer? */
    uv_shutdown_t shutdown;
    kvd_http_server *srv;
    struct http_conn *prev, *next;
    llhttp_t parser;
    enum conn_phase phase;
    kvd_sbuf in;        /* received bytes; [in_off, in.len) not parsed yet */
    size_t in_off;
    kvd_http_request req;
    uint64_t body_deadline_ms; /* uv_now() by which the body must be complete */
    size_t write_pending;
    int reject_status;  /* set by a parser callback that refuses the request */
    char reject_msg[320];
    char reject_code[48];
    char reject_headers[512];
    /* obs-fold detection: llhttp reports a folded line as a second span of the same
     * value; within one llhttp_execute the spans of an unfolded value are adjacent. */
    bool value_open;
    const char *value_span_end;
    bool value_gap;
    uint64_t bytes_queued;  /* all bytes ever queued; minus libuv's queue: taken by the kernel */
    uint64_t send_mark;     /* taken by the kernel at the last check that saw progress */
    uint64_t send_mark_ms;  /* uv_now() of that check */
    uint64_t idle_since_ms; /* IDLE: when the last answer was handed to the kernel */
    uint64_t resp_start;    /* bytes_queued when the current response began */
    uint64_t resp_meant;    /* its whole length once known */
    char *owned_body;       /* kvd_http_respond_take's body, written from here in slices */
    size_t owned_len;
    size_t owned_off;       /* bytes of it handed to libuv so far */
    int resp_status;
    bool busy;              /* a dispatched request whose response is not fully taken */
    bool by_server;         /* closed by kvd_http_server_close */
    bool shut_done;         /* LINGER: our FIN is sent (every queued byte went first) */
    bool reset_on_close;    /* cut for not reading: close with a reset (conn_cut) */
    uint64_t taken_at_close;
    int open_handles;
    bool closing;
    bool reading;
    bool close_after;   /* the current response is the connection's last */
    bool counted;       /* counts against max_connections */
} http_conn;

struct kvd_http_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    bool listener_open;
    bool draining;
    kvd_http_limits limits;
    kvd_http_handlers handlers;
    llhttp_settings_t settings;
    http_conn *conns;
    int num_conns;
    int num_counted;
    int num_busy;
    size_t buffered_body;
    char *allowed_hosts;    /* ",a,b," (lowercase, commas around each) or NULL: any */
    char *allowed_origins;  /* same form; NULL: none */
    bool any_origin;
    bool auto_hosts;        /* allowed_hosts not given: the loopback names on a loopback bind */
    uv_timer_t idle_notify; /* defers on_idle out of the call that ended the last response */
    char read_buf[64 * 1024]; /* shared: libuv hands it back in read_cb before reusing it */
};

typedef struct write_req {
    uv_write_t uv;
    http_conn *conn;
    size_t len;       /* data[] and the owned-body slice together */
    bool last;        /* completes the current response */
    bool body_slice;  /* also carries a slice of conn->owned_body */
    char data[];
} write_req;

kvd_http_limits kvd_http_limits_default(void)
{
    kvd_http_limits l = {
        .max_header_bytes = 32 * 1024,
        .max_headers = 100,
        .max_body_bytes = 4 * 1024 * 1024,
        .header_timeout_ms = 10000,
        .idle_timeout_ms = 60000,
        .body_timeout_ms = 30000,
        .max_connections = 1024,
        .max_write_queue_bytes = 1024 * 1024,
        .send_timeout_ms = 30000,
        .max_buffered_body_bytes = 64u << 20,
        .json_posts = true,
    };
    return l;
}

const char *kvd_http_status_text(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 411: return "Length Required";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
}

/* ---- connection lifetime ---- */

static void body_release(kvd_http_request *req)
{
    req->conn->srv->buffered_body -= req->reserved;
    req->reserved = 0;
}

static void request_reset(kvd_http_request *req)
{
    body_release(req);
    kvd_sbuf_reset(&req->head);
    req->token_start = 0;
    req->url = 0;
    req->header_name = 0;
    req->num_headers = 0;
    free(req->path);
    free(req->query);
    req->path = NULL;
    req->query = NULL;
    if (req->body.cap > KEEP_BODY_CAP) {
        kvd_free_off_loop(req->conn->srv->loop, req->body.data, req->body.cap);
        kvd_sbuf_init(&req->body);
    } else
        kvd_sbuf_reset(&req->body);
    req->method = "";
    req->keep_alive = false;
    req->http10 = false;
    req->upgrade = false;
    req->head_only = false;
    req->cors = false;
    req->framing = 0;
    req->dispatched = false;
    req->finished = false;
    req->streaming = false;
    req->chunked = false;
    req->arrival_ns = 0;
    req->user = NULL;
}

static void on_idle_notify(uv_timer_t *timer)
{
    kvd_http_server *srv = timer->data;
    if (srv->draining && srv->num_busy == 0 && srv->handlers.on_idle)
        srv->handlers.on_idle(srv->handlers.arg);
}

static void conn_set_busy(http_conn *conn, bool busy)
{
    kvd_http_server *srv = conn->srv;
    if (conn->busy == busy)
        return;
    conn->busy = busy;
    srv->num_busy += busy ? 1 : -1;
    if (srv->num_busy == 0 && srv->draining && srv->listener_open)
        uv_timer_start(&srv->idle_notify, on_idle_notify, 0, 0);
}

static uint64_t conn_bytes_taken(const http_conn *conn)
{
    return conn->bytes_queued - uv_stream_get_write_queue_size((const uv_stream_t *)&conn->tcp);
}

/* Bytes the kernel holds for the peer, not yet acknowledged (several MiB with
 * autotuned buffers: a peer that never reads leaves them there). */
static uint64_t kernel_unacked(const http_conn *conn)
{
    uv_os_fd_t fd;
    int n = 0;
    if (uv_fileno((const uv_handle_t *)&conn->tcp, &fd) != 0 || ioctl(fd, SIOCOUTQ, &n) != 0 || n < 0)
        return 0;
    return (uint64_t)n;
}

/* What the peer has taken: the progress the send timer watches. */
static uint64_t conn_bytes_acked(const http_conn *conn)
{
    uint64_t taken = conn_bytes_taken(conn), held = kernel_unacked(conn);
    return held < taken ? taken - held : 0;
}

static void conn_release_owned_body(http_conn *conn)
{
    kvd_free_off_loop(conn->srv->loop, conn->owned_body, conn->owned_len);
    conn->owned_body = NULL;
    conn->owned_len = conn->owned_off = 0;
}

static void conn_free(http_conn *conn)
{
    kvd_http_server *srv = conn->srv;
    kvd_http_request *req = &conn->req;
    if (conn->busy && srv->handlers.on_cut) {
        /* Handles are closed: what libuv still held was never written. */
        kvd_http_cut cut = {
            .method = req->method,
            .path = req->path ? req->path : "",
            .status = req->finished || req->streaming ? conn->resp_status : 0,
            .bytes_sent = conn->taken_at_close - conn->resp_start,
            .bytes_meant = req->finished ? conn->resp_meant : 0,
            .by_server = conn->by_server,
        };
        srv->handlers.on_cut(&cut, srv->handlers.arg);
    }
    conn_set_busy(conn, false);
    if (req->dispatched && !req->finished && srv->handlers.on_abort)
        srv->handlers.on_abort(req, srv->handlers.arg);
    if (conn->prev)
        conn->prev->next = conn->next;
    else
        srv->conns = conn->next;
    if (conn->next)
        conn->next->prev = conn->prev;
    srv->num_conns--;
    if (conn->counted)
        srv->num_counted--;
    request_reset(req);
    conn_release_owned_body(conn);
    kvd_sbuf_deinit(&req->head);
    kvd_sbuf_deinit(&req->body);
    free(req->headers);
    kvd_sbuf_deinit(&conn->in);
    free(conn);
}

static void on_handle_closed(uv_handle_t *handle)
{
    http_conn *conn = handle->data;
    if (--conn->open_handles == 0)
        conn_free(conn);
}

static void conn_close(http_conn *conn)
{
    if (conn->closing)
        return;
    conn->closing = true;
    conn->taken_at_close = conn_bytes_taken(conn);
    /* A finished response the kernel took whole was delivered, whether or not its write
     * callback ran: a peer that reads it and closes at once can have its EOF read in
     * the same read loop that wrote the answer, before that callback. Not a cut. */
    if (conn->req.finished && conn->resp_meant &&
        conn->taken_at_close - conn->resp_start >= conn->resp_meant)
        conn_set_busy(conn, false);
    if (conn->counted) {
        /* A closing connection holds no slot: the next client must not get 503 while
         * the close callbacks are still to run. */
        conn->counted = false;
        conn->srv->num_counted--;
    }
    uv_timer_stop(&conn->timer);
    uv_read_stop((uv_stream_t *)&conn->tcp);
    /* A peer cut for not reading gets a reset: a plain close would leave the kernel
     * delivering what it holds for it, and holding the memory, for minutes. */
    if (!conn->reset_on_close || uv_tcp_close_reset(&conn->tcp, on_handle_closed) != 0)
        uv_close((uv_handle_t *)&conn->tcp, on_handle_closed);
    uv_close((uv_handle_t *)&conn->timer, on_handle_closed);
    uv_close((uv_handle_t *)&conn->probe, on_handle_closed);
}

static void on_timer(uv_timer_t *timer);

/* Closes a connection whose peer does not read what we send. */
static void conn_cut(http_conn *conn)
{
    conn->reset_on_close = true;
    conn_close(conn);
}

static void conn_arm_timer(http_conn *conn, uint64_t ms)
{
    if (conn->closing)
        return;
    if (ms)
        uv_timer_start(&conn->timer, on_timer, ms, 0);
    else
        uv_timer_stop(&conn->timer);
}

/* ---- writing ---- */

static void on_shutdown(uv_shutdown_t *sreq, int status);
static void conn_response_done(http_conn *conn);
static int conn_write_slice(http_conn *conn, const char *head, size_t head_len);

static void on_write(uv_write_t *uvreq, int status)
{
    write_req *wr = (write_req *)uvreq;
    http_conn *conn = wr->conn;
    bool last = wr->last, body_slice = wr->body_slice;
    conn->write_pending -= wr->len;
    free(wr);
    if (status < 0) {
        conn_close(conn);
        return;
    }
    if (body_slice && !conn->closing) {
        if (!last) {
            conn_write_slice(conn, NULL, 0);
            return;
        }
        conn_release_owned_body(conn);
    }
    if (last && !conn->closing) {
        conn_set_busy(conn, false);
        conn_response_done(conn);
    }
}

/* The send timer checks four times per send_timeout_ms, so a peer that stopped
 * taking bytes is cut between 1 and 1.25 times that after the last byte it took. */
static uint64_t send_check_ms(const http_conn *conn)
{
    uint64_t every = conn->srv->limits.send_timeout_ms / 4;
    return every ? every : 1;
}

/* While a response is being written, the timer watches the peer take our bytes. */
static void conn_arm_send_timer(http_conn *conn)
{
    if (conn->closing || !conn->srv->limits.send_timeout_ms ||
        (conn->phase != PHASE_APP && conn->phase != PHASE_FLUSH) || uv_is_active((uv_handle_t *)&conn->timer))
        return;
    conn->send_mark = conn_bytes_acked(conn);
    conn->send_mark_ms = uv_now(conn->srv->loop);
    uv_timer_start(&conn->timer, on_timer, send_check_ms(conn), 0);
}

/* Queues the concatenation of up to three copied byte ranges and, with a slice, the
 * next slice of the connection's owned body (its bytes are in write_pending already)
 * as one write. */
static int conn_queue(http_conn *conn, const char *a, size_t alen, const char *b, size_t blen, const char *c,
                      size_t clen, size_t slice, bool last)
{
    if (conn->closing)
        return KVD_ECANCELED;
    size_t copied = alen + blen + clen;
    write_req *wr = malloc(sizeof *wr + copied);
    if (!wr) {
        conn_close(conn);
        return KVD_ENOMEM;
    }
    wr->conn = conn;
    wr->len = copied + slice;
    wr->last = last;
    wr->body_slice = slice > 0;
    if (alen)
        memcpy(wr->data, a, alen);
    if (blen)
        memcpy(wr->data + alen, b, blen);
    if (clen)
        memcpy(wr->data + alen + blen, c, clen);
    uv_buf_t bufs[2];
    unsigned nbufs = 0;
    if (copied || !slice)
        bufs[nbufs++] = uv_buf_init(wr->data, (unsigned)copied);
    if (slice)
        bufs[nbufs++] = uv_buf_init(conn->owned_body + conn->owned_off, (unsigned)slice);
    int rc = uv_write(&wr->uv, (uv_stream_t *)&conn->tcp, bufs, nbufs, on_write);
    if (rc < 0) {
        free(wr);
        conn_close(conn);
        return KVD_ECANCELED;
    }
    conn->owned_off += slice;
    conn->write_pending += copied;
    conn->bytes_queued += copied + slice;
    conn_arm_send_timer(conn);
    return 0;
}

static int conn_write3(http_conn *conn, const char *a, size_t alen, const char *b, size_t blen,
                       const char *c, size_t clen, bool last)
{
    return conn_queue(conn, a, alen, b, blen, c, clen, 0, last);
}

/* Queues the owned body's next slice (after head, when given); the last slice
 * completes the response. */
static int conn_write_slice(http_conn *conn, const char *head, size_t head_len)
{
    size_t left = conn->owned_len - conn->owned_off;
    size_t slice = left < BODY_SLICE_BYTES ? left : BODY_SLICE_BYTES;
    return conn_queue(conn, head, head_len, NULL, 0, NULL, 0, slice, slice == left);
}

static void conn_linger(http_conn *conn)
{
    if (conn->closing)
        return;
    conn->phase = PHASE_LINGER;
    /* uv_shutdown waits for queued writes, then sends FIN. */
    if (uv_shutdown(&conn->shutdown, (uv_stream_t *)&conn->tcp, on_shutdown) < 0)
        conn_close(conn);
}

static void on_shutdown(uv_shutdown_t *sreq, int status)
{
    http_conn *conn = sreq->data;
    if (status < 0 || conn->closing) {
        conn_close(conn);
        return;
    }
    conn->shut_done = true;
    conn_set_busy(conn, false); /* an HTTP/1.0 stream's end: every byte is with the kernel */
    if (!conn->reading) {
        conn_close(conn);
        return;
    }
    conn_arm_timer(conn, LINGER_MS);
}

static void format_head(kvd_sbuf *sb, const kvd_http_request *req, int status, const char *content_type,
                        bool keep_alive, const char *extra_headers)
{
    kvd_sbuf_printf(sb, "HTTP/1.1 %d %s\r\nServer: kvd\r\n", status, kvd_http_status_text(status));
    if (content_type)
        kvd_sbuf_printf(sb, "Content-Type: %s\r\n", content_type);
    kvd_sbuf_puts(sb, keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n");
    if (req->cors)
        kvd_sbuf_printf(sb, "Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n", kvd_http_header(req, "origin"));
    const char *request_id = kvd_http_request_id(req);
    if (request_id)
        kvd_sbuf_printf(sb, "X-Request-ID: %s\r\n", request_id);
    if (extra_headers)
        kvd_sbuf_puts(sb, extra_headers);
}

const char *kvd_http_error_type(int status)
{
    switch (status) {
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    case 503: return "service_unavailable";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
    }
}

/* The string code of the layer's own refusals. */
static const char *error_code(int status)
{
    switch (status) {
    case 400: return "bad_request";
    case 403: return "forbidden";
    case 405: return "method_not_allowed";
    case 408: return "request_timeout";
    case 413: return "body_too_large";
    case 415: return "unsupported_media_type";
    case 417: return "expectation_failed";
    case 431: return "headers_too_large";
    case 501: return "not_implemented";
    case 503: return "server_busy";
    default: return status >= 500 ? "internal_error" : "bad_request";
    }
}

static void json_error_body(kvd_sbuf *sb, int status, const char *message, const char *code)
{
    kvd_sbuf_puts(sb, "{\"error\":{\"message\":\"");
    for (const char *p = message; *p; p++) {
        if (*p == '"' || *p == '\\')
            kvd_sbuf_printf(sb, "\\%c", *p);
        else if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f)
            kvd_sbuf_printf(sb, "\\u%04x", (unsigned char)*p); /* bytes of the request quoted back: no UTF-8 promised */
        else
            kvd_sbuf_append(sb, p, 1);
    }
    kvd_sbuf_printf(sb, "\",\"type\":\"%s\",\"param\":null,\"code\":\"%s\"}}", kvd_http_error_type(status),
                    code && code[0] ? code : error_code(status));
}

/* Answers a request the HTTP layer itself refuses, then closes the connection. */
static void conn_reject(http_conn *conn, int status, const char *message)
{
    if (conn->closing || conn->phase == PHASE_LINGER)
        return;
    kvd_sbuf body, head;
    kvd_sbuf_init(&body);
    kvd_sbuf_init(&head);
    json_error_body(&body, status, message, conn->reject_code);
    format_head(&head, &conn->req, status, "application/json", false, conn->reject_headers);
    kvd_sbuf_printf(&head, "Content-Length: %zu\r\n\r\n", body.len);
    conn->close_after = true;
    conn->phase = PHASE_FLUSH;
    uv_timer_stop(&conn->timer);
    if (head.failed || body.failed)
        conn_close(conn);
    else if (conn_write3(conn, head.data, head.len, body.data, body.len, NULL, 0, false) == 0)
        conn_linger(conn);
    kvd_sbuf_deinit(&body);
    kvd_sbuf_deinit(&head);
}

/* ---- parsing ---- */

static void conn_process_input(http_conn *conn);
static void conn_resume_reading(http_conn *conn);

/* A CORS preflight from an origin the headers check let through (listed, or the
 * daemon's own): answered here, the application never sees it. The requested
 * headers are echoed: the OpenAI SDKs send their own (x-stainless-*), and the API
 * key still guards every route that needs it. */
static void answer_preflight(kvd_http_request *req)
{
    const char *asked = kvd_http_header(req, "access-control-request-headers");
    char headers[1024];
    int n = snprintf(headers, sizeof headers,
                     "Access-Control-Allow-Methods: GET, HEAD, POST, OPTIONS\r\n"
                     "Access-Control-Max-Age: 600\r\n"
                     "Vary: Access-Control-Request-Method, Access-Control-Request-Headers\r\n");
    if (asked && asked[0] && strlen(asked) < sizeof headers - (size_t)n - 64)
        snprintf(headers + n, sizeof headers - (size_t)n, "Access-Control-Allow-Headers: %s\r\n", asked);
    req->cors = true; /* the daemon's own origin too: a preflight always wants the header */
    kvd_http_respond(req, 204, NULL, headers, "", 0);
}

static void conn_dispatch(http_conn *conn)
{
    kvd_http_server *srv = conn->srv;
    kvd_http_request *req = &conn->req;
    conn->phase = PHASE_APP;
    uv_timer_stop(&conn->timer);
    req->dispatched = true;
    conn->resp_start = conn->bytes_queued;
    conn->resp_meant = 0;
    conn->resp_status = 0;
    conn_set_busy(conn, true);
    if (strcmp(req->method, "OPTIONS") == 0 && kvd_http_header(req, "origin") &&
        kvd_http_header(req, "access-control-request-method")) {
        answer_preflight(req);
        return;
    }
    srv->handlers.on_request(req, srv->handlers.arg);
}

static void conn_response_done(http_conn *conn)
{
    kvd_http_server *srv = conn->srv;
    if (conn->close_after || !conn->req.keep_alive || srv->draining) {
        conn_linger(conn);
        return;
    }
    request_reset(&conn->req);
    conn->phase = PHASE_IDLE;
    conn->idle_since_ms = uv_now(srv->loop);
    if (srv->limits.send_timeout_ms && kernel_unacked(conn) > 0) {
        /* The answer is with the kernel but not with the peer: keep watching it, so a
         * peer that pipelined and stopped reading cannot hold its slot as "idle". */
        conn->send_mark = conn_bytes_acked(conn);
        conn->send_mark_ms = conn->idle_since_ms;
        conn_arm_timer(conn, send_check_ms(conn));
    } else {
        conn_arm_timer(conn, srv->limits.idle_timeout_ms);
    }
    conn_resume_reading(conn);
    conn_process_input(conn);
}

static void conn_process_input(http_conn *conn)
{
    while (!conn->closing && conn->in_off < conn->in.len &&
           (conn->phase == PHASE_HEAD || conn->phase == PHASE_BODY || conn->phase == PHASE_IDLE)) {
        const char *data = conn->in.data + conn->in_off;
        size_t len = conn->in.len - conn->in_off;
        conn->value_span_end = NULL;
        llhttp_errno_t e = llhttp_execute(&conn->parser, data, len);
        /* A value left open with bytes after its last span: what follows must not be
         * another span of it (see on_header_value). */
        conn->value_gap = conn->value_open && conn->value_span_end != data + len;
        if (e == HPE_OK) {
            conn->in_off += len;
            break;
        }
        if (e == HPE_PAUSED) {
            conn->in_off += (size_t)(llhttp_get_error_pos(&conn->parser) - data);
            llhttp_resume(&conn->parser);
            conn_dispatch(conn);
            break;
        }
        if (conn->reject_status) {
            conn_reject(conn, conn->reject_status, conn->reject_msg);
        } else {
            char msg[200];
            snprintf(msg, sizeof msg, "malformed HTTP request: %s", llhttp_get_error_reason(&conn->parser));
            conn_reject(conn, 400, msg);
        }
        conn->in_off = conn->in.len;
        break;
    }
    if (conn->in_off == conn->in.len) {
        /* Idle connections keep no big buffer: a large body grew it to 64 KiB+. */
        if (conn->in.cap > KEEP_BODY_CAP / 4)
            kvd_sbuf_deinit(&conn->in);
        else
            kvd_sbuf_reset(&conn->in);
        conn->in_off = 0;
    } else if (conn->in_off > conn->in.len / 2) {
        memmove(conn->in.data, conn->in.data + conn->in_off, conn->in.len - conn->in_off);
        conn->in.len -= conn->in_off;
        conn->in_off = 0;
    }
}

static http_conn *parser_conn(llhttp_t *parser)
{
    return parser->data;
}

static int refuse_with(http_conn *conn, int status, const char *msg, const char *code, const char *headers)
{
    conn->reject_status = status;
    snprintf(conn->reject_msg, sizeof conn->reject_msg, "%s", msg ? msg : kvd_http_status_text(status));
    snprintf(conn->reject_code, sizeof conn->reject_code, "%s", code ? code : "");
    snprintf(conn->reject_headers, sizeof conn->reject_headers, "%s", headers ? headers : "");
    return -1;
}

static int refuse(http_conn *conn, int status, const char *msg)
{
    return refuse_with(conn, status, msg, NULL, NULL);
}

static int head_append(http_conn *conn, const char *at, size_t len)
{
    kvd_http_request *req = &conn->req;
    if (req->head.len + len + 1 > conn->srv->limits.max_header_bytes)
        return refuse(conn, 431, "request header too large");
    kvd_sbuf_append(&req->head, at, len);
    return req->head.failed ? refuse(conn, 500, "out of memory") : 0;
}

/* Closes the token being received with a NUL and returns its offset. */
static int head_end_token(http_conn *conn, size_t *offset)
{
    kvd_http_request *req = &conn->req;
    if (head_append(conn, "", 1) != 0)
        return -1;
    *offset = req->token_start;
    req->token_start = req->head.len;
    return 0;
}

static int on_message_begin(llhttp_t *parser)
{
    http_conn *conn = parser_conn(parser);
    request_reset(&conn->req);
    conn->value_open = false;
    conn->value_gap = false;
    if (conn->phase != PHASE_HEAD) {
        conn->phase = PHASE_HEAD;
        conn_arm_timer(conn, conn->srv->limits.header_timeout_ms);
    }
    return 0;
}

static int on_url(llhttp_t *parser, const char *at, size_t len)
{
    return head_append(parser_conn(parser), at, len);
}

static int on_url_complete(llhttp_t *parser)
{
    http_conn *conn = parser_conn(parser);
    return head_end_token(conn, &conn->req.url);
}

/* RFC 9110 tchar. */
static bool is_token_char(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static int on_header_field(llhttp_t *parser, const char *at, size_t len)
{
    http_conn *conn = parser_conn(parser);
    for (size_t i = 0; i < len; i++)
        if (!is_token_char((unsigned char)at[i]))
            return refuse(conn, 400, "malformed HTTP request: invalid character in a header name");
    return head_append(conn, at, len);
}

static int on_header_field_complete(llhttp_t *parser)
{
    http_conn *conn = parser_conn(parser);
    if (conn->req.head.len == conn->req.token_start)
        return refuse(conn, 400, "malformed HTTP request: empty header name");
    return head_end_token(conn, &conn->req.header_name);
}

static int on_header_value(llhttp_t *parser, const char *at, size_t len)
{
    http_conn *conn = parser_conn(parser);
    /* A second span of one value that does not continue the first is a folded line. */
    if (conn->value_open && (conn->value_span_end ? at != conn->value_span_end : conn->value_gap))
        return refuse(conn, 400, "malformed HTTP request: obsolete line folding in a header value");
    conn->value_open = true;
    conn->value_span_end = at + len;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)at[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return refuse(conn, 400, "malformed HTTP request: control character in a header value");
    }
    return head_append(conn, at, len);
}

static int on_header_value_complete(llhttp_t *parser)
{
    http_conn *conn = parser_conn(parser);
    kvd_http_request *req = &conn->req;
    conn->value_open = false;
    conn->value_gap = false;
    /* llhttp drops leading whitespace of a value but keeps trailing whitespace. */
    while (req->head.len > req->token_start &&
           (req->head.data[req->head.len - 1] == ' ' || req->head.data[req->head.len - 1] == '\t'))
        req->head.len--;
    size_t value;
    if (head_end_token(conn, &value) != 0)
        return -1;
    if (req->num_headers >= conn->srv->limits.max_headers)
        return refuse(conn, 431, "too many request headers");
    if (req->num_headers == req->headers_cap) {
        int cap = req->headers_cap ? req->headers_cap * 2 : 16;
        header_ref *grown = realloc(req->headers, (size_t)cap * sizeof *grown);
        if (!grown)
            return refuse(conn, 500, "out of memory");
        req->headers = grown;
        req->headers_cap = cap;
    }
    req->headers[req->num_headers].name = req->header_name;
    req->headers[req->num_headers].value = value;
    req->num_headers++;
    return 0;
}

/* While a body arrives, the timer fires at whichever comes first: the idle limit
 * (restarted by each read) or the body deadline (never moved). */
static void conn_arm_body_timer(http_conn *conn)
{
    const kvd_http_limits *limits = &conn->srv->limits;
    uint64_t wait = limits->idle_timeout_ms;
    if (limits->body_timeout_ms) {
        uint64_t now = uv_now(conn->srv->loop);
        /* At least 1 ms: a deadline already past must still fire (0 would disarm). */
        uint64_t left = conn->body_deadline_ms > now ? conn->body_deadline_ms - now : 1;
        if (wait == 0 || left < wait)
            wait = left;
    }
    conn_arm_timer(conn, wait);
}

static bool body_deadline_passed(const http_conn *conn)
{
    return conn->srv->limits.body_timeout_ms && uv_now(conn->srv->loop) >= conn->body_deadline_ms;
}

static int header_count(const kvd_http_request *req, const char *name)
{
    int n = 0;
    for (int i = 0; i < req->num_headers; i++)
        n += strcasecmp(req->head.data + req->headers[i].name, name) == 0;
    return n;
}

/* Is the len bytes at s, lowercased, one of the entries of list (",a,b,")? */
static bool listed(const char *list, const char *s, size_t len)
{
    if (!list || len == 0 || len > 255)
        return false;
    char key[260];
    key[0] = ',';
    for (size_t i = 0; i < len; i++)
        key[i + 1] = (char)tolower((unsigned char)s[i]);
    key[len + 1] = ',';
    key[len + 2] = '\0';
    return strstr(list, key) != NULL;
}

/* Host names this server answers to; the port, if any, is not compared. */
static bool host_allowed(const kvd_http_server *srv, const char *host)
{
    if (!srv->allowed_hosts)
        return true;
    size_t name_len;
    const char *port;
    if (host[0] == '[') {
        const char *close = strchr(host, ']');
        if (!close)
            return false;
        name_len = (size_t)(close - host) + 1;
        port = close + 1;
    } else {
        name_len = strcspn(host, ":");
        port = host + name_len;
    }
    if (*port == ':') {
        port++;
        if (!*port || strspn(port, "0123456789") != strlen(port))
            return false;
    } else if (*port) {
        return false;
    }
    return listed(srv->allowed_hosts, host, name_len);
}

/* The request's Origin is the daemon's own page: http:// + the Host it was sent to. */
static bool same_origin(const char *origin, const char *host)
{
    return host && strncasecmp(origin, "http://", 7) == 0 && strcasecmp(origin + 7, host) == 0;
}

/* The media type of a Content-Type value, lowercased, without parameters. */
static void media_type(const char *value, char *out, size_t cap)
{
    size_t n = 0;
    for (const char *p = value; *p && *p != ';' && n + 1 < cap; p++)
        if (*p != ' ' && *p != '\t')
            out[n++] = (char)tolower((unsigned char)*p);
    out[n] = '\0';
}

static bool json_media(const char *media)
{
    size_t n = strlen(media);
    return strcmp(media, "application/json") == 0 || (n > 5 && strcmp(media + n - 5, "+json") == 0);
}

/* The checks that need the whole head: framing, Host, Origin, the body's type, then
 * the application's own (the API key), all before a byte of the body is read. */
static int on_headers_complete(llhttp_t *parser)
{
    http_conn *conn = parser_conn(parser);
    kvd_http_server *srv = conn->srv;
    kvd_http_request *req = &conn->req;
    const kvd_http_limits *limits = &srv->limits;
    char msg[320];
    req->method = llhttp_method_name((llhttp_method_t)parser->method);
    req->http10 = parser->http_major == 1 && parser->http_minor == 0;
    if (strcmp(req->method, "HEAD") == 0) {
        req->head_only = true;
        req->method = "GET";
    }
    const char *url = req->head.data ? req->head.data + req->url : "";
    const char *q = strchr(url, '?');
    size_t path_len = q ? (size_t)(q - url) : strlen(url);
    req->path = strndup(url, path_len);
    req->query = strdup(q ? q + 1 : "");
    if (!req->path || !req->query)
        return refuse(conn, 500, "out of memory");

    int hosts = header_count(req, "host");
    if (hosts > 1 || (hosts == 0 && !req->http10))
        return refuse(conn, 400, "malformed HTTP request: an HTTP/1.1 request carries exactly one Host header");
    const char *te = kvd_http_header(req, "transfer-encoding");
    if (te) {
        if (req->http10)
            return refuse(conn, 400, "malformed HTTP request: Transfer-Encoding in an HTTP/1.0 request");
        if (header_count(req, "transfer-encoding") > 1 || strcasecmp(te, "chunked") != 0) {
            snprintf(msg, sizeof msg, "Transfer-Encoding \"%.100s\" is not supported; send chunked or Content-Length",
                     te);
            return refuse(conn, 501, msg);
        }
    }
    if ((parser->flags & F_CONTENT_LENGTH) && parser->content_length > limits->max_body_bytes) {
        snprintf(msg, sizeof msg, "request body of %llu bytes is over the limit of %zu bytes",
                 (unsigned long long)parser->content_length, limits->max_body_bytes);
        return refuse(conn, 413, msg);
    }

    const char *host = kvd_http_header(req, "host");
    if (host && !host_allowed(srv, host)) {
        snprintf(msg, sizeof msg, "Host \"%.100s\" is not served here (see --allowed-hosts)", host);
        return refuse_with(conn, 403, msg, "host_not_allowed", NULL);
    }
    const char *origin = kvd_http_header(req, "origin");
    if (origin && !same_origin(origin, host)) {
        if (!srv->any_origin && !listed(srv->allowed_origins, origin, strlen(origin))) {
            snprintf(msg, sizeof msg, "cross-origin request from \"%.100s\" refused (see --allowed-origins)", origin);
            return refuse_with(conn, 403, msg, "origin_not_allowed", NULL);
        }
        req->cors = true;
    }
    if (limits->json_posts && strcmp(req->method, "POST") == 0) {
        const char *type = kvd_http_header(req, "content-type");
        char media[64];
        media_type(type ? type : "", media, sizeof media);
        bool plain_client = !origin && (!type || strcmp(media, "application/x-www-form-urlencoded") == 0);
        if (!json_media(media) && !plain_client) {
            snprintf(msg, sizeof msg, "Content-Type \"%.80s\" is not accepted: send application/json",
                     type ? type : "");
            return refuse(conn, 415, msg);
        }
    }
    if (srv->handlers.on_headers) {
        kvd_http_refusal refusal = {0};
        if (srv->handlers.on_headers(req, &refusal, srv->handlers.arg))
            return refuse_with(conn, refusal.status ? refusal.status : 400, refusal.message, refusal.code,
                               refusal.extra_headers);
    }
    if (parser->flags & F_CONTENT_LENGTH) {
        size_t declared = (size_t)parser->content_length;
        if (srv->buffered_body + declared > limits->max_buffered_body_bytes)
            return refuse_with(conn, 503, "the server holds too many request bodies; retry shortly", "server_busy",
                               "Retry-After: 1\r\n");
        req->reserved = declared;
        srv->buffered_body += declared;
        /* The whole declared size at once (counted above already; untouched pages cost
         * nothing): growing by doubling copied a 4 MiB body several times on the loop. */
        if (kvd_sbuf_reserve(&req->body, declared) != 0)
            return refuse(conn, 500, "out of memory");
    }

    const char *expect = kvd_http_header(req, "expect");
    if (expect && !req->http10) {
        if (strcasecmp(expect, "100-continue") != 0)
            return refuse(conn, 417, "only Expect: 100-continue is supported");
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        if (conn_write3(conn, cont, sizeof cont - 1, NULL, 0, NULL, 0, false) != 0)
            return refuse(conn, 500, "connection lost");
    }
    conn->phase = PHASE_BODY;
    conn->body_deadline_ms = uv_now(srv->loop) + limits->body_timeout_ms;
    conn_arm_body_timer(conn);
    return 0;
}

static int body_over_limit(http_conn *conn, uint64_t extra)
{
    const kvd_http_request *req = &conn->req;
    size_t max = conn->srv->limits.max_body_bytes;
    if (req->body.len + req->framing + extra <= max)
        return 0;
    char msg[160];
    snprintf(msg, sizeof msg, "request body is over the limit of %zu bytes", max);
    return refuse(conn, 413, msg);
}

/* A declared chunk that cannot fit is refused before any of its bytes arrive. */
static int on_chunk_header(llhttp_t *parser)
{
    return body_over_limit(parser_conn(parser), parser->content_length);
}

static int on_chunk_extension(llhttp_t *parser, const char *at, size_t len)
{
    (void)at;
    http_conn *conn = parser_conn(parser);
    conn->req.framing += len;
    return body_over_limit(conn, 0);
}

static int on_body(llhttp_t *parser, const char *at, size_t len)
{
    http_conn *conn = parser_conn(parser);
    kvd_http_server *srv = conn->srv;
    kvd_http_request *req = &conn->req;
    if (body_over_limit(conn, len))
        return -1;
    if (req->body.len + len > req->reserved) {
        size_t more = req->body.len + len - req->reserved;
        if (srv->buffered_body + more > srv->limits.max_buffered_body_bytes)
            return refuse_with(conn, 503, "the server holds too many request bodies; retry shortly", "server_busy",
                               "Retry-After: 1\r\n");
        req->reserved += more;
        srv->buffered_body += more;
    }
    kvd_sbuf_append(&req->body, at, len);
    return req->body.failed ? refuse(conn, 500, "out of memory") : 0;
}

static int on_message_complete(llhttp_t *parser)
{
    http_conn *conn = parser_conn(parser);
    kvd_http_request *req = &conn->req;
    req->keep_alive = llhttp_should_keep_alive(parser) != 0;
    req->upgrade = parser->upgrade != 0;
    if (req->upgrade)
        req->keep_alive = false; /* nothing here speaks another protocol afterwards */
    req->arrival_ns = uv_hrtime();
    /* Pause so pipelined requests wait in the buffer until this one is answered. */
    return HPE_PAUSED;
}

/* ---- reading ---- */

/* Has the peer's kernel reset the connection (it closed its socket entirely)? */
static bool peer_reset(http_conn *conn)
{
    uv_os_fd_t fd;
    if (uv_fileno((uv_handle_t *)&conn->tcp, &fd) != 0)
        return true;
    int error = 0;
    socklen_t len = sizeof error;
    struct tcp_info info;
    socklen_t info_len = sizeof info;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) == 0 && error != 0)
        return true;
    return getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &info_len) == 0 && info.tcpi_state == TCP_CLOSE;
}

static void on_probe(uv_timer_t *timer)
{
    http_conn *conn = timer->data;
    if (conn->closing || conn->phase != PHASE_APP)
        return;
    if (peer_reset(conn)) {
        conn_close(conn); /* on_abort: nobody will read the answer */
        return;
    }
    uv_timer_start(&conn->probe, on_probe, PROBE_MS, 0);
}

/* The end of input arrived while the application holds the request: a half-close
 * (the peer still reads) or a full close (nobody will). TCP tells them apart only when
 * we send: a closed socket answers with a reset. Before any byte of the answer, the
 * probe is an interim 100 Continue, which every HTTP/1.1 client must accept before the
 * final response (RFC 9110 15.2); then the socket is checked every PROBE_MS until the
 * application answers, so a client that left cancels its request as before. */
static void conn_probe_peer(http_conn *conn)
{
    kvd_http_request *req = &conn->req;
    if (req->http10 || req->streaming)
        return; /* no 1xx for HTTP/1.0; a stream's own writes find out */
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    if (conn_write3(conn, cont, sizeof cont - 1, NULL, 0, NULL, 0, false) == 0)
        uv_timer_start(&conn->probe, on_probe, PROBE_MS, 0);
}

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    http_conn *conn = handle->data;
    buf->base = conn->srv->read_buf;
    buf->len = sizeof conn->srv->read_buf;
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    http_conn *conn = stream->data;
    if (conn->closing)
        return;
    if (nread < 0) {
        /* End of input once a whole request is in: a half-close (the peer may still
         * read our answer), so the answer is written and the connection then closes.
         * A peer gone for good is noticed when a write fails. A reset, or an end of
         * input inside a request, closes at once (on_abort for a request the
         * application holds). */
        if ((conn->phase == PHASE_FLUSH || conn->phase == PHASE_APP) && nread == UV_EOF) {
            conn->close_after = true;
            uv_read_stop(stream);
            conn->reading = false;
            if (conn->phase == PHASE_APP)
                conn_probe_peer(conn);
        } else {
            conn_close(conn);
        }
        return;
    }
    if (nread == 0)
        return;
    if (conn->phase == PHASE_LINGER)
        return; /* discarded: we are closing */
    kvd_sbuf_append(&conn->in, buf->base, (size_t)nread);
    if (conn->in.failed) {
        conn_close(conn);
        return;
    }
    switch (conn->phase) {
    case PHASE_BODY:
        conn_arm_body_timer(conn);
        conn_process_input(conn);
        break;
    case PHASE_HEAD:
    case PHASE_IDLE:
        conn_process_input(conn);
        break;
    case PHASE_APP:
    case PHASE_FLUSH:
        if (conn->in.len - conn->in_off > MAX_BACKLOG_BYTES) {
            uv_read_stop(stream);
            conn->reading = false;
        }
        break;
    case PHASE_LINGER:
        break;
    }
}

static void conn_resume_reading(http_conn *conn)
{
    if (conn->closing || conn->reading)
        return;
    if (uv_read_start((uv_stream_t *)&conn->tcp, on_alloc, on_read) == 0)
        conn->reading = true;
    else
        conn_close(conn);
}

/* Re-arms the send timer unless the peer has taken no byte for send_timeout_ms. */
static bool conn_send_progressed(http_conn *conn)
{
    if (!conn->srv->limits.send_timeout_ms)
        return false;
    uint64_t now = uv_now(conn->srv->loop);
    uint64_t taken = conn_bytes_acked(conn);
    if (taken != conn->send_mark) {
        conn->send_mark = taken;
        conn->send_mark_ms = now;
    } else if (now - conn->send_mark_ms >= conn->srv->limits.send_timeout_ms) {
        return false;
    }
    uv_timer_start(&conn->timer, on_timer, send_check_ms(conn), 0);
    return true;
}

static void on_timer(uv_timer_t *timer)
{
    http_conn *conn = timer->data;
    char msg[160];
    switch (conn->phase) {
    case PHASE_HEAD:
        snprintf(msg, sizeof msg, "no complete request header within %llu ms",
                 (unsigned long long)conn->srv->limits.header_timeout_ms);
        conn_reject(conn, 408, msg);
        break;
    case PHASE_BODY:
        if (body_deadline_passed(conn))
            snprintf(msg, sizeof msg, "request body not complete within %llu ms after its headers",
                     (unsigned long long)conn->srv->limits.body_timeout_ms);
        else
            snprintf(msg, sizeof msg, "request body stalled for %llu ms",
                     (unsigned long long)conn->srv->limits.idle_timeout_ms);
        conn_reject(conn, 408, msg);
        break;
    case PHASE_LINGER:
        if (conn->shut_done)
            conn_close(conn);
        else if (!conn_send_progressed(conn))
            conn_cut(conn); /* an HTTP/1.0 stream its peer stopped reading */
        break;
    case PHASE_IDLE: {
        if (conn->srv->limits.send_timeout_ms && kernel_unacked(conn) > 0) {
            if (!conn_send_progressed(conn))
                conn_cut(conn); /* our last answer has sat unread for send_timeout_ms */
            break;
        }
        uint64_t idle_for = uv_now(conn->srv->loop) - conn->idle_since_ms;
        if (idle_for >= conn->srv->limits.idle_timeout_ms)
            conn_close(conn);
        else
            conn_arm_timer(conn, conn->srv->limits.idle_timeout_ms - idle_for);
        break;
    }
    case PHASE_APP:
    case PHASE_FLUSH:
        if (uv_stream_get_write_queue_size((uv_stream_t *)&conn->tcp) == 0 && kernel_unacked(conn) == 0)
            break; /* nothing waits; the next write re-arms */
        if (!conn_send_progressed(conn))
            conn_cut(conn); /* the peer took nothing for send_timeout_ms: it is not reading */
        break;
    }
}

static void on_connection(uv_stream_t *listener, int status)
{
    kvd_http_server *srv = listener->data;
    if (status < 0)
        return;
    http_conn *conn = calloc(1, sizeof *conn);
    if (!conn)
        return; /* the connection stays in the backlog; libuv offers it again */
    conn->srv = srv;
    kvd_sbuf_init(&conn->in);
    kvd_sbuf_init(&conn->req.head);
    kvd_sbuf_init(&conn->req.body);
    conn->req.conn = conn;
    conn->req.method = "";
    uv_tcp_init(srv->loop, &conn->tcp);
    uv_timer_init(srv->loop, &conn->timer);
    uv_timer_init(srv->loop, &conn->probe);
    conn->probe.data = conn;
    conn->tcp.data = conn;
    conn->timer.data = conn;
    conn->shutdown.data = conn;
    conn->open_handles = 3;
    conn->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = conn;
    srv->conns = conn;
    srv->num_conns++;
    llhttp_init(&conn->parser, HTTP_REQUEST, &srv->settings);
    conn->parser.data = conn;
    if (uv_accept(listener, (uv_stream_t *)&conn->tcp) != 0) {
        conn_close(conn);
        return;
    }
    uv_tcp_nodelay(&conn->tcp, 1);
    if (srv->limits.socket_send_buffer) {
        /* Bounds what the kernel holds for a client that does not read, so the
         * write-queue cap is reached after that much instead of after the several
         * MiB autotuning allows (tcp_wmem). */
        int size = (int)srv->limits.socket_send_buffer;
        uv_send_buffer_size((uv_handle_t *)&conn->tcp, &size);
    }
    conn->phase = PHASE_HEAD;
    conn_resume_reading(conn);
    if (srv->num_counted >= srv->limits.max_connections) {
        conn_reject(conn, 503, "too many open connections");
        return;
    }
    conn->counted = true;
    srv->num_counted++;
    conn_arm_timer(conn, srv->limits.header_timeout_ms);
}

/* ---- server ---- */

/* "A, b ,c" -> ",a,b,c," (lowercase, no blanks), the form listed() searches. */
static char *comma_list(const char *text)
{
    size_t len = strlen(text);
    char *out = malloc(len + 3);
    if (!out)
        return NULL;
    size_t n = 0;
    out[n++] = ',';
    for (const char *p = text; *p; p++) {
        if (*p == ' ' || *p == '\t')
            continue;
        if (*p == ',' && out[n - 1] == ',')
            continue;
        out[n++] = (char)tolower((unsigned char)*p);
    }
    if (out[n - 1] != ',')
        out[n++] = ',';
    out[n] = '\0';
    return out;
}

kvd_http_server *kvd_http_server_create(uv_loop_t *loop, const kvd_http_limits *limits,
                                        const kvd_http_handlers *handlers, kvd_error *err)
{
    if (!handlers || !handlers->on_request) {
        kvd_error_set(err, KVD_EINVAL, "http: on_request handler is required");
        return NULL;
    }
    if (limits->max_header_bytes < 256 || limits->max_connections < 1 || limits->max_headers < 1 ||
        limits->max_write_queue_bytes < 1) {
        kvd_error_set(err, KVD_EINVAL, "http: limits out of range");
        return NULL;
    }
    if (limits->max_buffered_body_bytes < limits->max_body_bytes) {
        kvd_error_set(err, KVD_EINVAL, "http: max_buffered_body_bytes (%zu) is below max_body_bytes (%zu)",
                      limits->max_buffered_body_bytes, limits->max_body_bytes);
        return NULL;
    }
    kvd_http_server *srv = calloc(1, sizeof *srv);
    if (!srv) {
        kvd_error_set(err, KVD_ENOMEM, "http: out of memory");
        return NULL;
    }
    srv->loop = loop;
    srv->limits = *limits;
    srv->handlers = *handlers;
    srv->any_origin = limits->allowed_origins && strcmp(limits->allowed_origins, "*") == 0;
    bool any_host = limits->allowed_hosts && strcmp(limits->allowed_hosts, "*") == 0;
    if ((!any_host && limits->allowed_hosts && limits->allowed_hosts[0] &&
         !(srv->allowed_hosts = comma_list(limits->allowed_hosts))) ||
        (!srv->any_origin && limits->allowed_origins && limits->allowed_origins[0] &&
         !(srv->allowed_origins = comma_list(limits->allowed_origins)))) {
        kvd_http_server_destroy(srv);
        kvd_error_set(err, KVD_ENOMEM, "http: out of memory");
        return NULL;
    }
    srv->auto_hosts = !any_host && !srv->allowed_hosts;
    srv->limits.allowed_hosts = NULL; /* the caller's strings are not kept */
    srv->limits.allowed_origins = NULL;
    uv_timer_init(loop, &srv->idle_notify);
    srv->idle_notify.data = srv;
    llhttp_settings_init(&srv->settings);
    srv->settings.on_message_begin = on_message_begin;
    srv->settings.on_url = on_url;
    srv->settings.on_url_complete = on_url_complete;
    srv->settings.on_header_field = on_header_field;
    srv->settings.on_header_field_complete = on_header_field_complete;
    srv->settings.on_header_value = on_header_value;
    srv->settings.on_header_value_complete = on_header_value_complete;
    srv->settings.on_headers_complete = on_headers_complete;
    srv->settings.on_body = on_body;
    srv->settings.on_chunk_header = on_chunk_header;
    srv->settings.on_chunk_extension_name = on_chunk_extension;
    srv->settings.on_chunk_extension_value = on_chunk_extension;
    srv->settings.on_message_complete = on_message_complete;
    return srv;
}

int kvd_http_server_listen(kvd_http_server *srv, const char *host, int port, int *bound_port,
                           kvd_error *err)
{
    struct sockaddr_storage addr;
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) != 0 &&
        uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) != 0)
        return kvd_error_set(err, KVD_EINVAL, "host: \"%s\" is not an IPv4 or IPv6 address", host);
    int rc = uv_tcp_init(srv->loop, &srv->listener);
    if (rc < 0)
        return kvd_error_set(err, KVD_EIO, "listen: %s", uv_strerror(rc));
    srv->listener.data = srv;
    srv->listener_open = true;
    rc = uv_tcp_bind(&srv->listener, (const struct sockaddr *)&addr, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&srv->listener, 511, on_connection);
    if (rc < 0) {
        uv_close((uv_handle_t *)&srv->listener, NULL);
        srv->listener_open = false;
        return kvd_error_set(err, KVD_EIO, "listen on %s:%d: %s", host, port, uv_strerror(rc));
    }
    struct sockaddr_storage bound;
    int namelen = sizeof bound;
    uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&bound, &namelen);
    bool loopback = bound.ss_family == AF_INET6
                        ? IN6_IS_ADDR_LOOPBACK(&((struct sockaddr_in6 *)&bound)->sin6_addr)
                        : (ntohl(((struct sockaddr_in *)&bound)->sin_addr.s_addr) >> 24) == 127;
    if (srv->auto_hosts && loopback && !srv->allowed_hosts) {
        /* A loopback daemon answers to its loopback names only: a page whose own host
         * name resolves to 127.0.0.1 (DNS rebinding) still sends its own name. */
        srv->allowed_hosts = comma_list("localhost,127.0.0.1,[::1]");
        if (!srv->allowed_hosts)
            return kvd_error_set(err, KVD_ENOMEM, "http: out of memory");
    }
    if (bound_port) {
        if (bound.ss_family == AF_INET6)
            *bound_port = ntohs(((struct sockaddr_in6 *)&bound)->sin6_port);
        else
            *bound_port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    }
    return 0;
}

void kvd_http_server_drain(kvd_http_server *srv)
{
    srv->draining = true;
    http_conn *next;
    for (http_conn *conn = srv->conns; conn; conn = next) {
        next = conn->next;
        if (conn->phase == PHASE_IDLE)
            conn_close(conn);
        else
            conn->close_after = true;
    }
}

void kvd_http_server_close(kvd_http_server *srv)
{
    srv->draining = true;
    if (srv->listener_open) {
        uv_close((uv_handle_t *)&srv->listener, NULL);
        srv->listener_open = false;
    }
    if (!uv_is_closing((uv_handle_t *)&srv->idle_notify))
        uv_close((uv_handle_t *)&srv->idle_notify, NULL);
    for (http_conn *conn = srv->conns; conn; conn = conn->next) {
        /* An answer wholly with the kernel: let the linger end it (the peer's EOF, or
         * LINGER_MS), so the peer reads the answer instead of a reset. */
        if (conn->phase == PHASE_LINGER && !conn->busy)
            continue;
        conn->by_server = true;
        conn_close(conn);
    }
}

void kvd_http_server_destroy(kvd_http_server *srv)
{
    if (!srv)
        return;
    free(srv->allowed_hosts);
    free(srv->allowed_origins);
    free(srv);
}

int kvd_http_server_num_connections(const kvd_http_server *srv)
{
    return srv->num_conns;
}

int kvd_http_server_busy(const kvd_http_server *srv)
{
    return srv->num_busy;
}

size_t kvd_http_server_buffered_body_bytes(const kvd_http_server *srv)
{
    return srv->buffered_body;
}

/* ---- requests ---- */

const char *kvd_http_method(const kvd_http_request *req)
{
    return req->method;
}

bool kvd_http_is_head(const kvd_http_request *req)
{
    return req->head_only;
}

const char *kvd_http_path(const kvd_http_request *req)
{
    return req->path ? req->path : "";
}

const char *kvd_http_query(const kvd_http_request *req)
{
    return req->query ? req->query : "";
}

const char *kvd_http_request_id(const kvd_http_request *req)
{
    const char *id = kvd_http_header(req, "x-request-id");
    if (!id || !*id)
        return NULL;
    size_t n = 0;
    for (; id[n]; n++) {
        if (n == 128 || (unsigned char)id[n] <= 0x20 || (unsigned char)id[n] >= 0x7f)
            return NULL;
    }
    return id;
}

const char *kvd_http_header(const kvd_http_request *req, const char *name)
{
    for (int i = 0; i < req->num_headers; i++) {
        if (strcasecmp(req->head.data + req->headers[i].name, name) == 0)
            return req->head.data + req->headers[i].value;
    }
    return NULL;
}

const char *kvd_http_body(const kvd_http_request *req, size_t *len)
{
    if (len)
        *len = req->body.len;
    return req->body.data ? req->body.data : "";
}

char *kvd_http_take_body(kvd_http_request *req, size_t *len)
{
    /* Still counted in buffered_body (req->reserved) until the request ends: the
     * memory is as pinned as before, only by its new owner. */
    return kvd_sbuf_take(&req->body, len);
}

uint64_t kvd_http_arrival_ns(const kvd_http_request *req)
{
    return req->arrival_ns;
}

void kvd_http_set_user(kvd_http_request *req, void *user)
{
    req->user = user;
}

void *kvd_http_user(const kvd_http_request *req)
{
    return req->user;
}

size_t kvd_http_write_queue_bytes(const kvd_http_request *req)
{
    return req->conn->write_pending;
}

static bool response_keeps_alive(http_conn *conn)
{
    return conn->req.keep_alive && !conn->close_after && !conn->srv->draining;
}

/* Sends a whole response: body is copied (copy) or, owned, written from its own
 * buffer, which the connection then frees. */
static int respond(kvd_http_request *req, int status, const char *content_type, const char *extra_headers,
                   const char *body, char *owned, size_t len)
{
    http_conn *conn = req->conn;
    size_t owned_size = owned ? len : 0; /* HEAD sends none of it, but frees all */
    req->finished = true;
    if (conn->closing) {
        kvd_free_off_loop(conn->srv->loop, owned, owned_size);
        return KVD_ECANCELED;
    }
    bool keep = response_keeps_alive(conn);
    if (!keep)
        conn->close_after = true;
    kvd_sbuf head;
    kvd_sbuf_init(&head);
    format_head(&head, req, status, content_type, keep, extra_headers);
    kvd_sbuf_printf(&head, "Content-Length: %zu\r\n\r\n", len);
    conn->phase = PHASE_FLUSH;
    conn->resp_status = status;
    int rc;
    if (head.failed) {
        conn_close(conn);
        rc = KVD_ENOMEM;
    } else {
        /* A response to HEAD announces the body's length but never carries it, or a
         * client reusing the connection would read the body as the next response. */
        if (req->head_only)
            len = 0;
        conn->resp_meant = conn->bytes_queued - conn->resp_start + head.len + len;
        if (owned && len) {
            conn->owned_body = owned;
            conn->owned_len = len;
            conn->owned_off = 0;
            owned = NULL;
            conn->write_pending += len; /* counted whole now; the slices only take it */
            rc = conn_write_slice(conn, head.data, head.len);
        } else {
            rc = conn_write3(conn, head.data, head.len, body, owned ? 0 : len, NULL, 0, true);
        }
    }
    kvd_free_off_loop(conn->srv->loop, owned, owned_size); /* not handed over */
    kvd_sbuf_deinit(&head);
    return rc;
}

int kvd_http_respond(kvd_http_request *req, int status, const char *content_type,
                     const char *extra_headers, const char *body, size_t len)
{
    return respond(req, status, content_type, extra_headers, body, NULL, len);
}

int kvd_http_respond_take(kvd_http_request *req, int status, const char *content_type,
                          const char *extra_headers, char *body, size_t len)
{
    return respond(req, status, content_type, extra_headers, NULL, body, len);
}

int kvd_http_stream_begin(kvd_http_request *req, int status, const char *content_type,
                          const char *extra_headers)
{
    http_conn *conn = req->conn;
    if (conn->closing)
        return KVD_ECANCELED;
    req->streaming = true;
    req->chunked = !req->http10;
    if (!req->chunked)
        conn->close_after = true; /* HTTP/1.0: the end of the body is the end of the connection */
    bool keep = response_keeps_alive(conn);
    if (!keep)
        conn->close_after = true;
    conn->resp_status = status;
    kvd_sbuf head;
    kvd_sbuf_init(&head);
    format_head(&head, req, status, content_type, keep, extra_headers);
    kvd_sbuf_puts(&head, "Cache-Control: no-cache\r\n");
    if (req->chunked)
        kvd_sbuf_puts(&head, "Transfer-Encoding: chunked\r\n");
    kvd_sbuf_puts(&head, "\r\n");
    int rc;
    if (head.failed) {
        conn_close(conn);
        rc = KVD_ENOMEM;
    } else {
        rc = conn_write3(conn, head.data, head.len, NULL, 0, NULL, 0, false);
    }
    kvd_sbuf_deinit(&head);
    return rc;
}

int kvd_http_stream_write(kvd_http_request *req, const char *data, size_t len)
{
    http_conn *conn = req->conn;
    if (conn->closing)
        return KVD_ECANCELED;
    if (len == 0 || req->head_only)
        return 0; /* an empty chunk would end the body; HEAD has none */
    if (conn->write_pending + len > conn->srv->limits.max_write_queue_bytes) {
        conn_cut(conn);
        return KVD_EBUSY;
    }
    if (!req->chunked)
        return conn_write3(conn, data, len, NULL, 0, NULL, 0, false);
    char size_line[24];
    int n = snprintf(size_line, sizeof size_line, "%zx\r\n", len);
    return conn_write3(conn, size_line, (size_t)n, data, len, "\r\n", 2, false);
}

int kvd_http_stream_end(kvd_http_request *req)
{
    http_conn *conn = req->conn;
    req->finished = true;
    if (conn->closing)
        return KVD_ECANCELED;
    conn->phase = PHASE_FLUSH;
    if (!req->chunked) {
        conn->resp_meant = conn->bytes_queued - conn->resp_start;
        conn_linger(conn);
        return 0;
    }
    static const char last_chunk[] = "0\r\n\r\n";
    size_t n = req->head_only ? 0 : sizeof last_chunk - 1;
    conn->resp_meant = conn->bytes_queued - conn->resp_start + n;
    return conn_write3(conn, last_chunk, n, NULL, 0, NULL, 0, true);
}
