/* http.h - an HTTP/1.1 server over libuv and llhttp that knows nothing about models.
 *
 * The application sees one callback per complete request (URL, headers and body
 * accumulated across llhttp's fragments, chunked bodies decoded) and answers it, now
 * or later, with one whole response or a chunked stream. Requests on one connection
 * are handed over one at a time: the parser pauses after each message and resumes
 * once its response has been written, so pipelined requests are answered in order.
 * The layer enforces the transport limits itself (header and body size, header, body,
 * send and idle timeouts, connection count, per-connection write queue, request bytes
 * buffered across all connections), parses strictly (RFC 9112: no obs-fold, no
 * whitespace or control bytes in header names, CRLF after chunk data, Host required
 * once, only the chunked transfer coding), checks Host and Origin against allow-lists,
 * answers CORS preflights and HEAD (as GET without the body), and answers
 * Expect: 100-continue only after on_headers accepted the request. Its own error
 * responses carry OpenAI's JSON body {"error": {"message", "type", "param", "code"}}
 * with a string code.
 *
 * Lifetimes: a kvd_http_request belongs to its connection. It stays valid until the
 * application finishes it (kvd_http_respond or kvd_http_stream_end) or until
 * on_abort has been delivered for it, whichever comes first; on_abort is delivered
 * only for requests the application has not finished, and never from inside a
 * kvd_http_* call. All functions run on the loop thread.
 */
#ifndef KVD_SERVER_HTTP_H
#define KVD_SERVER_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "kvd/kvd_error.h"

typedef struct kvd_http_limits {
    size_t max_header_bytes;      /* request line plus headers; over it: 431 and close */
    int max_headers;              /* header lines; over it: 431 and close */
    size_t max_body_bytes;        /* over it (Content-Length or as a chunked body grows): 413 */
    uint64_t header_timeout_ms;   /* from accept or a request's first byte to its last header: 408 */
    uint64_t idle_timeout_ms;     /* silence while idle between requests or inside a body */
    uint64_t body_timeout_ms;     /* from the end of a request's headers to its body's end: 408; 0 = none */
    int max_connections;          /* more are answered 503 and closed */
    size_t max_write_queue_bytes; /* bytes queued unsent on one connection before it is cut */
    size_t socket_send_buffer;    /* SO_SNDBUF of accepted sockets; 0 = the kernel's autotuning */
    uint64_t send_timeout_ms;     /* a response's bytes wait this long without the peer taking any: cut */
    size_t max_buffered_body_bytes; /* request body bytes held across all connections; over: 503 */
    /* Comma-separated host names (no port; IPv6 in brackets) accepted in Host; "*": any.
     * NULL or "": "localhost,127.0.0.1,[::1]" when listening on a loopback address, any
     * otherwise (a page on another site cannot then reach a loopback daemon by DNS
     * rebinding). The string is copied. */
    const char *allowed_hosts;
    /* Comma-separated origins ("https://app.example:8443") whose cross-origin requests
     * are served, with CORS headers; "*": any. Requests whose Origin is neither listed
     * nor the daemon itself (http:// + Host) get 403. NULL or "": none. Copied. */
    const char *allowed_origins;
    /* POST bodies are JSON: text/plain and multipart/form-data are 415, and so are a
     * missing or form-urlencoded type when an Origin header is present (browsers send
     * Origin; curl -d sends form-urlencoded without one). */
    bool json_posts;
} kvd_http_limits;

/* 32 KiB headers, 100 header lines, 4 MiB bodies, 10 s, 60 s, 30 s, 1024 connections,
 * 1 MiB write queue, kernel send buffers left to autotuning, 30 s send timeout,
 * 64 MiB of buffered bodies, default host list, no cross-origin, JSON posts. */
kvd_http_limits kvd_http_limits_default(void);

typedef struct kvd_http_server kvd_http_server;
typedef struct kvd_http_request kvd_http_request;

/* How on_headers refuses a request: status (401, 403, ...), a message, an OpenAI
 * error code ("invalid_api_key") and optional extra header lines ending in "\r\n".
 * The strings are copied before on_headers returns. */
typedef struct kvd_http_refusal {
    int status;
    const char *message;
    const char *code;
    const char *extra_headers;
} kvd_http_refusal;

/* A response that did not reach the socket in full: its connection closed before the
 * last byte was taken by the kernel. */
typedef struct kvd_http_cut {
    const char *method;
    const char *path;
    int status;            /* 0 when the application had not answered yet */
    uint64_t bytes_sent;   /* taken by the kernel */
    uint64_t bytes_meant;  /* the whole response; 0 when unknown (a stream not ended) */
    bool by_server;        /* kvd_http_server_close cut it (not the peer, not a timeout) */
} kvd_http_cut;

typedef struct kvd_http_handlers {
    /* A complete request. Answer it with kvd_http_respond or a stream, now or later. */
    void (*on_request)(kvd_http_request *req, void *arg);
    /* The connection of a request the application has not finished went away (peer
     * closed, I/O error, write queue over its cap, server shut down). req is freed
     * when this returns. */
    void (*on_abort)(kvd_http_request *req, void *arg);
    /* Optional: a request's headers are complete (method, path, headers readable; no
     * body yet). Return true after filling *refusal to answer it at once without
     * reading its body (and without 100 Continue); the connection then closes. */
    bool (*on_headers)(const kvd_http_request *req, kvd_http_refusal *refusal, void *arg);
    /* Optional: a response was cut (see kvd_http_cut); for the log. */
    void (*on_cut)(const kvd_http_cut *cut, void *arg);
    /* Optional: after kvd_http_server_drain, no response is in progress any more
     * (kvd_http_server_busy() == 0). Called from the loop, never inside a kvd_http_* call. */
    void (*on_idle)(void *arg);
    void *arg;
} kvd_http_handlers;

/* Returns NULL (err set) on a bad limit or allocation failure. */
kvd_http_server *kvd_http_server_create(uv_loop_t *loop, const kvd_http_limits *limits,
                                        const kvd_http_handlers *handlers, kvd_error *err);
/* Binds and listens on host:port (IPv4 or IPv6 literal; port 0 picks a free one,
 * stored in *bound_port). Returns 0 or a negative code with err set. */
int kvd_http_server_listen(kvd_http_server *srv, const char *host, int port, int *bound_port,
                           kvd_error *err);
/* Closes idle connections and makes every response from now on close its
 * connection; requests in progress continue and their responses are written in full
 * (on_idle tells when none is left). The listener stays open so that new
 * clients can still be told (by the application: 503) that the server is going away
 * and load balancers can see /health fail; kvd_http_server_close closes it. */
void kvd_http_server_drain(kvd_http_server *srv);
/* Closes the listener and every connection (on_abort for unfinished requests and
 * on_cut for responses not fully written, from the close callbacks); connections whose
 * response is fully written finish their short linger (at most 2 s) first, so the
 * peer reads the answer rather than a reset. Run the loop afterwards so the handles close, then destroy. */
void kvd_http_server_close(kvd_http_server *srv);
/* Frees the server. Call after kvd_http_server_close and once the loop has run the
 * close callbacks (kvd_http_server_num_connections() == 0). NULL does nothing. */
void kvd_http_server_destroy(kvd_http_server *srv);
/* Open connections, including ones being closed. */
int kvd_http_server_num_connections(const kvd_http_server *srv);
/* Requests handed to the application whose response is not yet fully taken by the kernel. */
int kvd_http_server_busy(const kvd_http_server *srv);
/* Request body bytes held now across all connections. */
size_t kvd_http_server_buffered_body_bytes(const kvd_http_server *srv);

/* Request accessors: strings are NUL-terminated and live as long as the request. */
/* "GET", "POST", ...; a HEAD request reads as "GET" (its response carries no body). */
const char *kvd_http_method(const kvd_http_request *req);
bool kvd_http_is_head(const kvd_http_request *req);
const char *kvd_http_path(const kvd_http_request *req);    /* URL path, without the query */
const char *kvd_http_query(const kvd_http_request *req);   /* after '?', or "" */
/* Value of the first header named name (case-insensitive), or NULL. */
const char *kvd_http_header(const kvd_http_request *req, const char *name);
/* The request's X-Request-ID (set by a load balancer or the client) when it is 1-128
 * visible ASCII characters, so it can go into a log line and the response as it is;
 * NULL otherwise. Every response to the request echoes it. */
const char *kvd_http_request_id(const kvd_http_request *req);
/* The decoded body (NUL-terminated for convenience; may contain NULs). */
const char *kvd_http_body(const kvd_http_request *req, size_t *len);
/* Takes the body's buffer (malloc'ed, NUL-terminated, *len bytes; NULL when out of
 * memory): the caller frees it, and the request's body reads as empty afterwards.
 * Saves a copy of a body of megabytes on the loop thread. */
char *kvd_http_take_body(kvd_http_request *req, size_t *len);
/* uv_hrtime() when the request's last byte arrived. */
uint64_t kvd_http_arrival_ns(const kvd_http_request *req);
/* One slot for the application's per-request state. */
void kvd_http_set_user(kvd_http_request *req, void *user);
void *kvd_http_user(const kvd_http_request *req);

/* Sends a whole response with Content-Length and finishes the request.
 * extra_headers: NULL or complete header lines, each ending in "\r\n".
 * Returns 0, or a negative code when the connection is already gone (the request
 * is finished either way and must not be used again). */
int kvd_http_respond(kvd_http_request *req, int status, const char *content_type,
                     const char *extra_headers, const char *body, size_t len);
/* The same, taking body (malloc'ed, len bytes; may be NULL when len is 0): it is
 * written from that buffer without a copy and freed by the connection (a large one on
 * a libuv worker), whatever the outcome. For bodies that grow with the input: a copy
 * and a free of tens of MB on the loop thread stall every other connection. */
int kvd_http_respond_take(kvd_http_request *req, int status, const char *content_type,
                          const char *extra_headers, char *body, size_t len);

/* Starts a streamed response: headers go out now; the body follows as chunks
 * (chunked transfer encoding; HTTP/1.0 clients get close-delimited framing). */
int kvd_http_stream_begin(kvd_http_request *req, int status, const char *content_type,
                          const char *extra_headers);
/* Queues len bytes as one chunk. Returns 0; KVD_ECANCELED when the connection is
 * gone; KVD_EBUSY when the peer is not reading and the connection's unsent bytes
 * would pass max_write_queue_bytes: the connection is then closed and on_abort will
 * follow. The request stays valid until on_abort or stream_end. */
int kvd_http_stream_write(kvd_http_request *req, const char *data, size_t len);
/* Ends the stream and finishes the request. */
int kvd_http_stream_end(kvd_http_request *req);

/* Bytes queued on the request's connection and not yet taken by the kernel. */
size_t kvd_http_write_queue_bytes(const kvd_http_request *req);

/* Reason phrase of a status code ("Not Found"). */
const char *kvd_http_status_text(int status);
/* OpenAI's error "type" for a status ("authentication_error" for 401, ...): the one
 * table for the layer's own errors and the application's. */
const char *kvd_http_error_type(int status);

#endif
