/* test_http.c - unit tests of server/http.c over real loopback sockets.
 *
 * Each test starts the HTTP layer on 127.0.0.1 with an ephemeral port and its own
 * libuv loop on the main thread, and a blocking client on a second thread that
 * speaks raw bytes: keep-alive, pipelining in order, chunked bodies, 100-continue,
 * every limit (413, 431, 408 for headers, stalled and trickled bodies, 503), malformed
 * input, streams, disconnects that
 * abort, and the write-queue cap for a client that never reads. Waits are for
 * events, never for durations (a receive timeout only keeps a bug from hanging the
 * suite), and every test ends with a loop that closes with no handle left.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "http.h"

typedef struct harness harness;
typedef void (*client_fn)(harness *h);

struct harness {
    uv_loop_t loop;
    kvd_http_server *srv;
    int port;
    uv_async_t done;
    client_fn client;
    int requests;
    int aborts;
    atomic_int aborted_flag;
    bool saw_busy;
    uv_timer_t slow_timer;
    uv_timer_t teardown; /* the server's close, after the callbacks already due */
    kvd_http_request *slow_req;
    uv_idle_t flood_idle;
    kvd_http_request *flood_req;
    kvd_http_request *held_req;
    atomic_int requests_seen;
    int cuts;
    kvd_http_cut last_cut;
    int idles;
    size_t buffered_at_end;  /* kvd_http_server_buffered_body_bytes when the client finished */
    struct client *left_open; /* a client the test closes only after the server has */
    jmp_buf client_jmp;  /* CHECK failures in the client thread land here */
    char failure[512];
};

/* cmocka's assertions may only fail on the thread running the test; the client
 * thread records its first failure and jumps out, and run() reports it. */
#define CHECK(cond) check_or_bail(h, (cond), __LINE__, #cond, NULL, NULL)
#define CHECK_INT(a, b) do { long long a_ = (a), b_ = (b); char x_[32], y_[32]; \
        snprintf(x_, sizeof x_, "%lld", a_); snprintf(y_, sizeof y_, "%lld", b_); \
        check_or_bail(h, a_ == b_, __LINE__, #a " == " #b, x_, y_); } while (0)
#define CHECK_STR(a, b) check_or_bail(h, strcmp((a), (b)) == 0, __LINE__, #a " == " #b, (a), (b))

static void check_or_bail(harness *h, bool ok, int line, const char *what, const char *got, const char *want)
{
    if (ok)
        return;
    snprintf(h->failure, sizeof h->failure, "test_http.c:%d: %s%s%s%s%s", line, what, got ? " (got \"" : "",
             got ? got : "", got ? "\", want \"" : "", got ? want : "");
    if (got)
        strncat(h->failure, "\")", sizeof h->failure - strlen(h->failure) - 1);
    longjmp(h->client_jmp, 1);
}

/* ---- server side: handlers by path ---- */

#define BIG_LEN ((4u << 20) + 12345)

static char big_byte(size_t i)
{
    return (char)(i % 251);
}

static void echo(kvd_http_request *req)
{
    size_t len;
    const char *body = kvd_http_body(req, &len);
    const char *tag = kvd_http_header(req, "x-tag");
    char out[70000];
    int n = snprintf(out, sizeof out, "%s %s?%s tag=%s body=%.*s", kvd_http_method(req), kvd_http_path(req),
                     kvd_http_query(req), tag ? tag : "-", (int)len, body);
    kvd_http_respond(req, 200, "text/plain", "X-Echo: 1\r\n", out, (size_t)n);
}

static void on_slow_timer(uv_timer_t *timer)
{
    harness *h = timer->data;
    if (h->slow_req) {
        kvd_http_request *req = h->slow_req;
        h->slow_req = NULL;
        echo(req);
    }
}

static void on_flood(uv_idle_t *idle)
{
    harness *h = idle->data;
    static char chunk[64 * 1024];
    memset(chunk, 'x', sizeof chunk);
    if (!h->flood_req) {
        uv_idle_stop(idle);
        return;
    }
    int rc = kvd_http_stream_write(h->flood_req, chunk, sizeof chunk);
    if (rc == KVD_EBUSY) {
        h->saw_busy = true;
        uv_idle_stop(idle);
    } else if (rc != 0) {
        uv_idle_stop(idle);
    }
}

static void on_request(kvd_http_request *req, void *arg)
{
    harness *h = arg;
    h->requests++;
    atomic_fetch_add(&h->requests_seen, 1);
    const char *path = kvd_http_path(req);
    if (strcmp(path, "/big") == 0) {
        /* Over 4 MiB: more than a non-reading peer's socket buffers take; handed over
         * without a copy, so it goes out in slices (not a multiple of the slice). */
        size_t len = BIG_LEN;
        char *body = malloc(len);
        for (size_t i = 0; i < len; i++)
            body[i] = big_byte(i);
        kvd_http_respond_take(req, 200, "application/octet-stream", NULL, body, len);
    } else if (strcmp(path, "/take") == 0) {
        size_t len = 0;
        char *body = kvd_http_take_body(req, &len);
        kvd_http_respond_take(req, 200, "application/octet-stream", NULL, body, len);
    } else if (strcmp(path, "/mid") == 0) {
        static char mid[256 * 1024];
        memset(mid, 'm', sizeof mid);
        kvd_http_respond(req, 200, "application/octet-stream", NULL, mid, sizeof mid);
    } else if (strcmp(path, "/drain") == 0) {
        kvd_http_server_drain(h->srv);
        h->slow_req = req;
        uv_timer_start(&h->slow_timer, on_slow_timer, 30, 0);
    } else if (strcmp(path, "/slow") == 0) {
        h->slow_req = req;
        uv_timer_start(&h->slow_timer, on_slow_timer, 30, 0);
    } else if (strcmp(path, "/hold") == 0) {
        h->held_req = req;
    } else if (strcmp(path, "/stream") == 0) {
        kvd_http_stream_begin(req, 200, "text/event-stream", NULL);
        kvd_http_stream_write(req, "data: a\n\n", 9);
        kvd_http_stream_write(req, "", 0);
        kvd_http_stream_write(req, "data: bc\n\n", 10);
        kvd_http_stream_end(req);
    } else if (strcmp(path, "/flood") == 0) {
        kvd_http_stream_begin(req, 200, "application/octet-stream", NULL);
        h->flood_req = req;
        uv_idle_start(&h->flood_idle, on_flood);
    } else {
        echo(req);
    }
}

static void on_abort(kvd_http_request *req, void *arg)
{
    harness *h = arg;
    h->aborts++;
    if (req == h->slow_req)
        h->slow_req = NULL;
    if (req == h->flood_req)
        h->flood_req = NULL;
    if (req == h->held_req)
        h->held_req = NULL;
    atomic_store(&h->aborted_flag, 1);
}

static bool on_headers(const kvd_http_request *req, kvd_http_refusal *refusal, void *arg)
{
    (void)arg;
    const char *auth = kvd_http_header(req, "authorization");
    if (strcmp(kvd_http_path(req), "/secret") != 0 || (auth && strcmp(auth, "Bearer k") == 0))
        return false;
    refusal->status = 401;
    refusal->message = "Incorrect or missing API key";
    refusal->code = "invalid_api_key";
    refusal->extra_headers = "WWW-Authenticate: Bearer\r\n";
    return true;
}

static void on_cut(const kvd_http_cut *cut, void *arg)
{
    harness *h = arg;
    h->cuts++;
    h->last_cut = *cut;
    h->last_cut.method = NULL; /* the strings die with the request */
    h->last_cut.path = NULL;
}

static void on_idle(void *arg)
{
    harness *h = arg;
    h->idles++;
}

static void on_teardown(uv_timer_t *timer)
{
    harness *h = timer->data;
    h->buffered_at_end = kvd_http_server_buffered_body_bytes(h->srv);
    kvd_http_server_close(h->srv);
    uv_close((uv_handle_t *)&h->done, NULL);
    uv_close((uv_handle_t *)&h->slow_timer, NULL);
    uv_close((uv_handle_t *)&h->flood_idle, NULL);
    uv_close((uv_handle_t *)&h->teardown, NULL);
}

/* The client can see the server's last bytes and EOF before the server's own due
 * callbacks ran (its idle notice is a timer started when the last write completed):
 * the teardown waits for them behind a timer of its own. */
static void on_client_done(uv_async_t *async)
{
    harness *h = async->data;
    uv_timer_start(&h->teardown, on_teardown, 0, 0);
}

static void *client_main(void *arg)
{
    harness *h = arg;
    if (setjmp(h->client_jmp) == 0)
        h->client(h);
    uv_async_send(&h->done);
    return NULL;
}

static kvd_http_limits test_limits(void)
{
    kvd_http_limits limits = kvd_http_limits_default();
    limits.max_body_bytes = 1000;
    limits.max_header_bytes = 2048;
    limits.allowed_hosts = "*";
    return limits;
}

static void run(harness *h, const kvd_http_limits *limits, client_fn client)
{
    memset(h, 0, sizeof *h);
    assert_int_equal(uv_loop_init(&h->loop), 0);
    kvd_http_handlers handlers = {.on_request = on_request, .on_abort = on_abort, .on_headers = on_headers,
                                  .on_cut = on_cut, .on_idle = on_idle, .arg = h};
    kvd_error err = {0};
    h->srv = kvd_http_server_create(&h->loop, limits, &handlers, &err);
    assert_non_null(h->srv);
    assert_int_equal(kvd_http_server_listen(h->srv, "127.0.0.1", 0, &h->port, &err), 0);
    assert_true(h->port > 0);
    uv_async_init(&h->loop, &h->done, on_client_done);
    h->done.data = h;
    uv_timer_init(&h->loop, &h->slow_timer);
    h->slow_timer.data = h;
    uv_timer_init(&h->loop, &h->teardown);
    h->teardown.data = h;
    uv_idle_init(&h->loop, &h->flood_idle);
    h->flood_idle.data = h;
    h->client = client;
    pthread_t thread;
    assert_int_equal(pthread_create(&thread, NULL, client_main, h), 0);
    uv_run(&h->loop, UV_RUN_DEFAULT);
    pthread_join(thread, NULL);
    if (h->failure[0])
        fail_msg("client: %s", h->failure);
    assert_int_equal(kvd_http_server_num_connections(h->srv), 0);
    kvd_http_server_destroy(h->srv);
    assert_int_equal(uv_loop_close(&h->loop), 0);
}

/* ---- client side: blocking sockets ---- */

typedef struct client client;
struct client {
    harness *h;
    int fd;
    char buf[1 << 18];
    size_t len;
};

typedef struct response {
    int status;
    char head[4096];
    char body[1 << 17];
    size_t body_len;
} response;

/* rcvbuf > 0: a receive buffer set before connecting, so the window stays that small. */
static client *client_open_rcvbuf(harness *h, int rcvbuf)
{
    client *c = calloc(1, sizeof *c);
    CHECK(c != NULL);
    c->h = h;
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(c->fd >= 0);
    if (rcvbuf > 0)
        setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct timeval tv = {.tv_sec = 20};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)h->port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    CHECK_INT(connect(c->fd, (struct sockaddr *)&addr, sizeof addr), 0);
    return c;
}

static client *client_open(harness *h)
{
    return client_open_rcvbuf(h, 0);
}

static void client_close(client *c)
{
    close(c->fd);
    free(c);
}

static void send_str(client *c, const char *s)
{
    size_t len = strlen(s);
    while (len) {
        ssize_t n = send(c->fd, s, len, MSG_NOSIGNAL);
        if (n <= 0)
            return; /* the server may have closed on purpose; reads tell */
        s += n;
        len -= (size_t)n;
    }
}

/* Reads more bytes; false on EOF, reset or timeout. */
static bool fill(client *c)
{
    if (c->len == sizeof c->buf)
        return false;
    ssize_t n = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
    if (n <= 0)
        return false;
    c->len += (size_t)n;
    return true;
}

static void consume(client *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
}

static char *find(client *c, const char *needle)
{
    c->buf[c->len < sizeof c->buf ? c->len : sizeof c->buf - 1] = '\0';
    return memmem(c->buf, c->len, needle, strlen(needle));
}

/* Reads one response (Content-Length or chunked). Returns false at EOF. */
static bool read_response(client *c, response *r)
{
    harness *h = c->h;
    memset(r, 0, sizeof *r);
    char *end;
    while (!(end = find(c, "\r\n\r\n")))
        if (!fill(c))
            return false;
    size_t head_len = (size_t)(end - c->buf) + 4;
    CHECK(head_len < sizeof r->head);
    memcpy(r->head, c->buf, head_len);
    r->head[head_len] = '\0';
    CHECK_INT(sscanf(r->head, "HTTP/1.1 %d", &r->status), 1);
    consume(c, head_len);
    const char *cl = strcasestr(r->head, "\r\nContent-Length: ");
    if (cl) {
        size_t want = (size_t)strtoul(cl + 18, NULL, 10);
        while (c->len < want)
            CHECK(fill(c));
        memcpy(r->body, c->buf, want);
        r->body_len = want;
        consume(c, want);
    } else if (strcasestr(r->head, "\r\nTransfer-Encoding: chunked")) {
        for (;;) {
            char *line_end;
            while (!(line_end = find(c, "\r\n")))
                CHECK(fill(c));
            size_t size = (size_t)strtoul(c->buf, NULL, 16);
            size_t line = (size_t)(line_end - c->buf) + 2;
            while (c->len < line + size + 2)
                CHECK(fill(c));
            memcpy(r->body + r->body_len, c->buf + line, size);
            r->body_len += size;
            CHECK(memcmp(c->buf + line + size, "\r\n", 2) == 0);
            consume(c, line + size + 2);
            if (size == 0)
                break;
        }
    }
    r->body[r->body_len] = '\0';
    return true;
}

/* True when the server has closed the connection (EOF or reset), after any bytes. */
static bool reads_eof(client *c)
{
    char tmp[4096];
    for (;;) {
        ssize_t n = recv(c->fd, tmp, sizeof tmp, 0);
        if (n == 0)
            return true;
        if (n < 0)
            return errno == ECONNRESET;
    }
}

static bool has_header(const response *r, const char *line)
{
    return strcasestr(r->head, line) != NULL;
}

/* ---- tests ---- */

static void client_keep_alive(harness *h)
{
    client *c = client_open(h);
    response r;
    send_str(c, "GET /a?x=1 HTTP/1.1\r\nHost: t\r\nX-Tag:  first  \r\n\r\n");
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 200);
    CHECK_STR(r.body, "GET /a?x=1 tag=first body=");
    CHECK(has_header(&r, "Connection: keep-alive"));
    CHECK(has_header(&r, "X-Echo: 1\r\n"));
    send_str(c, "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
    CHECK(read_response(c, &r));
    CHECK_STR(r.body, "POST /b? tag=- body=hello");
    client_close(c);
}

static void test_keep_alive(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_keep_alive);
    assert_int_equal(h.requests, 2);
    assert_int_equal(h.aborts, 0);
}

static void client_pipelined(harness *h)
{
    client *c = client_open(h);
    /* The first answer is delayed by a timer; the others must still come after it. */
    send_str(c, "GET /slow?1 HTTP/1.1\r\nHost: t\r\n\r\n"
                "POST /fast?2 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
                "GET /fast?3 HTTP/1.1\r\nHost: t\r\nX-Tag: three\r\n\r\n");
    response r;
    CHECK(read_response(c, &r));
    CHECK_STR(r.body, "GET /slow?1 tag=- body=");
    CHECK(read_response(c, &r));
    CHECK_STR(r.body, "POST /fast?2 tag=- body=abc");
    CHECK(read_response(c, &r));
    CHECK_STR(r.body, "GET /fast?3 tag=three body=");
    client_close(c);
}

static void test_pipelined_in_order(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_pipelined);
    assert_int_equal(h.requests, 3);
}

static void client_chunked_body(harness *h)
{
    client *c = client_open(h);
    send_str(c, "POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n");
    send_str(c, "5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n");
    response r;
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 200);
    CHECK_STR(r.body, "POST /c? tag=- body=Wikipedia in\r\n\r\nchunks.");
    client_close(c);
}

static void test_chunked_body(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_chunked_body);
}

static void client_expect_continue(harness *h)
{
    client *c = client_open(h);
    send_str(c, "POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    while (c->len < 25)
        CHECK(fill(c));
    CHECK(memcmp(c->buf, "HTTP/1.1 100 Continue\r\n\r\n", 25) == 0);
    consume(c, 25);
    send_str(c, "12345");
    response r;
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 200);
    CHECK_STR(r.body, "POST /e? tag=- body=12345");
    client_close(c);
}

static void test_expect_continue(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_expect_continue);
}

static void client_too_large_declared(harness *h)
{
    client *c = client_open(h);
    /* Refused from the header alone: the client never sends the body. */
    send_str(c, "POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\nExpect: 100-continue\r\n\r\n");
    response r;
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 413);
    CHECK(has_header(&r, "Connection: close"));
    CHECK(strstr(r.body, "\"error\""));
    CHECK(strstr(r.body, "1001 bytes"));
    CHECK(reads_eof(c));
    client_close(c);
}

static void test_body_too_large_declared(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_too_large_declared);
    assert_int_equal(h.requests, 0);
}

static void client_too_large_chunked(harness *h)
{
    client *c = client_open(h);
    send_str(c, "POST /big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    char chunk[700];
    memset(chunk, 'y', sizeof chunk);
    char line[800];
    snprintf(line, sizeof line, "1f4\r\n%.*s\r\n", 500, chunk);
    send_str(c, line); /* 500 bytes: fine */
    send_str(c, line); /* 1000: still fine */
    send_str(c, "1\r\nz\r\n"); /* 1001: over */
    response r;
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 413);
    CHECK(reads_eof(c));
    client_close(c);
}

static void test_body_too_large_chunked(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_too_large_chunked);
    assert_int_equal(h.requests, 0);
}

static void client_malformed(harness *h)
{
    client *c = client_open(h);
    send_str(c, "THIS IS NOT HTTP\r\n\r\n");
    response r;
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 400);
    CHECK(strstr(r.body, "malformed HTTP request"));
    CHECK(reads_eof(c));
    client_close(c);
    /* A bad chunk size line after a good request: the good one is answered first. */
    c = client_open(h);
    send_str(c, "GET /ok HTTP/1.1\r\nHost: t\r\n\r\nPOST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 200);
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 400);
    CHECK(reads_eof(c));
    client_close(c);
}

static void test_malformed(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_malformed);
    assert_int_equal(h.requests, 1);
}

static void client_header_too_large(harness *h)
{
    client *c = client_open(h);
    char big[3000];
    memset(big, 'h', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    send_str(c, "GET / HTTP/1.1\r\nX-Big: ");
    send_str(c, big);
    send_str(c, "\r\n\r\n");
    response r;
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 431);
    CHECK(reads_eof(c));
    client_close(c);
}

static void test_header_too_large(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_header_too_large);
    assert_int_equal(h.requests, 0);
}

static void client_header_timeout(harness *h)
{
    client *c = client_open(h);
    send_str(c, "GET / HTTP/1.1\r\nHost: t\r\n"); /* never finished */
    response r;
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 408);
    CHECK(reads_eof(c));
    client_close(c);
    /* A connection that sends nothing at all is timed out the same way. */
    c = client_open(h);
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 408);
    client_close(c);
}

static void test_header_timeout(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    limits.header_timeout_ms = 50;
    run(&h, &limits, client_header_timeout);
    assert_int_equal(h.requests, 0);
}

static void client_idle_timeout(harness *h)
{
    client *c = client_open(h);
    send_str(c, "GET /i HTTP/1.1\r\nHost: t\r\n\r\n");
    response r;
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 200);
    CHECK(reads_eof(c)); /* closed silently once idle */
    client_close(c);
}

static void test_idle_timeout(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    limits.idle_timeout_ms = 50;
    run(&h, &limits, client_idle_timeout);
}

static void client_body_timeout(harness *h)
{
    client *c = client_open(h);
    response r;
    /* Bodies sent promptly are served, on a keep-alive connection whose second request
     * starts well after the first one's deadline: the deadline is per request. */
    send_str(c, "POST /first HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 200);
    CHECK_STR(r.body, "POST /first? tag=- body=hello");
    struct timespec past_deadline = {0, 600 * 1000000L};
    nanosleep(&past_deadline, NULL);
    send_str(c, "POST /second HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    send_str(c, "3\r\nabc\r\n");
    send_str(c, "2\r\nde\r\n0\r\n\r\n");
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 200);
    CHECK_STR(r.body, "POST /second? tag=- body=abcde");
    /* One byte per 25 ms: the idle timer (60 s) is re-armed long before it could fire,
     * and the 400 bytes would take 10 s, far past the 300 ms deadline. The client stops
     * as soon as the server answers. */
    send_str(c, "POST /trickle HTTP/1.1\r\nHost: t\r\nContent-Length: 400\r\n\r\n");
    struct pollfd answered = {.fd = c->fd, .events = POLLIN};
    int sent = 0;
    while (sent < 400 && poll(&answered, 1, 25) == 0) {
        send_str(c, "x");
        sent++;
    }
    CHECK(sent < 400);
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 408);
    CHECK(has_header(&r, "Connection: close"));
    CHECK_STR(r.body, "{\"error\":{\"message\":\"request body not complete within 300 ms after its headers\","
                      "\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"request_timeout\"}}");
    CHECK(reads_eof(c));
    client_close(c);
}

static void test_body_timeout(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    limits.body_timeout_ms = 300;
    run(&h, &limits, client_body_timeout);
    assert_int_equal(h.requests, 2); /* the trickled request never reached the application */
    assert_int_equal(h.aborts, 0);
}

static void client_body_stalled(harness *h)
{
    client *c = client_open(h);
    send_str(c, "POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc"); /* and then nothing */
    response r;
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 408);
    CHECK(strstr(r.body, "request body stalled for 50 ms"));
    CHECK(reads_eof(c));
    client_close(c);
}

static void test_body_stalled(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    limits.idle_timeout_ms = 50; /* the sooner of the two limits decides */
    limits.body_timeout_ms = 60000;
    run(&h, &limits, client_body_stalled);
    assert_int_equal(h.requests, 0);
}

static void client_max_connections(harness *h)
{
    client *a = client_open(h), *b = client_open(h);
    response r;
    /* A full round trip on each proves both were accepted before the third. */
    send_str(a, "GET /1 HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK(read_response(a, &r));
    send_str(b, "GET /2 HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK(read_response(b, &r));
    client *c = client_open(h);
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 503);
    CHECK(strstr(r.body, "too many open connections"));
    CHECK(reads_eof(c));
    client_close(c);
    client_close(a);
    client_close(b);
}

static void test_max_connections(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    limits.max_connections = 2;
    run(&h, &limits, client_max_connections);
    assert_int_equal(h.requests, 2);
}

static void client_stream(harness *h)
{
    client *c = client_open(h);
    send_str(c, "GET /stream HTTP/1.1\r\nHost: t\r\n\r\n");
    response r;
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 200);
    CHECK(has_header(&r, "Transfer-Encoding: chunked"));
    CHECK(has_header(&r, "Content-Type: text/event-stream"));
    CHECK_STR(r.body, "data: a\n\ndata: bc\n\n");
    /* The connection is still usable after a stream. */
    send_str(c, "GET /after HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK(read_response(c, &r));
    CHECK_STR(r.body, "GET /after? tag=- body=");
    client_close(c);
    /* HTTP/1.0 gets the stream delimited by the end of the connection. */
    c = client_open(h);
    send_str(c, "GET /stream HTTP/1.0\r\n\r\n");
    char *end;
    while (!(end = find(c, "\r\n\r\n")))
        CHECK(fill(c));
    while (fill(c))
        ;
    CHECK(find(c, "Connection: close"));
    end = find(c, "\r\n\r\n");
    CHECK_STR(end + 4, "data: a\n\ndata: bc\n\n");
    client_close(c);
}

static void test_stream(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_stream);
    assert_int_equal(h.aborts, 0);
}

static void wait_flag(atomic_int *flag)
{
    /* Bounded: 20 s of 1 ms naps, then the assertion below reports the failure. */
    for (int i = 0; i < 20000 && !atomic_load(flag); i++) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
}

static void client_disconnect(harness *h)
{
    client *c = client_open(h);
    send_str(c, "GET /hold HTTP/1.1\r\nHost: t\r\n\r\n");
    /* Once the application holds the request. The FIN alone could be a half-close
     * (test_half_close); the server's 100 Continue probe meets the closed socket's
     * reset, and that aborts the request. */
    while (atomic_load(&h->requests_seen) < 1) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    client_close(c);
    wait_flag(&h->aborted_flag);
    CHECK(atomic_load(&h->aborted_flag));
}

static void test_disconnect_aborts(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_disconnect);
    assert_int_equal(h.requests, 1);
    assert_int_equal(h.aborts, 1);
    assert_null(h.held_req);
}

static void client_never_reads(harness *h)
{
    client *c = client_open(h);
    int small = 4096;
    setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    send_str(c, "GET /flood HTTP/1.1\r\nHost: t\r\n\r\n");
    wait_flag(&h->aborted_flag);
    CHECK(atomic_load(&h->aborted_flag));
    client_close(c);
}

static void test_write_queue_cap(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    limits.max_write_queue_bytes = 256 * 1024;
    run(&h, &limits, client_never_reads);
    assert_true(h.saw_busy);
    assert_int_equal(h.aborts, 1);
}

static void client_connection_close(harness *h)
{
    client *c = client_open(h);
    send_str(c, "GET /bye HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    response r;
    CHECK(read_response(c, &r));
    CHECK(has_header(&r, "Connection: close"));
    CHECK(reads_eof(c));
    client_close(c);
    c = client_open(h);
    send_str(c, "GET /old HTTP/1.0\r\n\r\n");
    CHECK(read_response(c, &r));
    CHECK_STR(r.body, "GET /old? tag=- body=");
    CHECK(reads_eof(c));
    client_close(c);
}

static void test_connection_close(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_connection_close);
}

static void test_listen_errors(void **state)
{
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    kvd_http_handlers handlers = {.on_request = on_request, .on_abort = on_abort};
    kvd_http_limits limits = test_limits();
    kvd_error err = {0};
    kvd_http_server *srv = kvd_http_server_create(&loop, &limits, &handlers, &err);
    assert_non_null(srv);
    assert_int_equal(kvd_http_server_listen(srv, "not-an-address", 0, NULL, &err), KVD_EINVAL);
    assert_non_null(strstr(err.msg, "not-an-address"));
    kvd_http_server_close(srv);
    uv_run(&loop, UV_RUN_DEFAULT);
    kvd_http_server_destroy(srv);
    assert_int_equal(uv_loop_close(&loop), 0);
    assert_string_equal(kvd_http_status_text(429), "Too Many Requests");
}

/* ---- strict HTTP/1.1 (RFC 9112): smuggling and malformed requests ---- */

static void send_bytes(client *c, const char *s, size_t len)
{
    while (len) {
        ssize_t n = send(c->fd, s, len, MSG_NOSIGNAL);
        if (n <= 0)
            return;
        s += n;
        len -= (size_t)n;
    }
}

typedef struct bad_request {
    const char *name;
    const char *bytes;
    size_t len;  /* sizeof - 1: some carry a NUL */
    int status;
} bad_request;

#define BAD(name, text, status) {name, text, sizeof(text) - 1, status}

/* Each is refused with its status, nothing reaches the application, and the
 * connection closes: the bytes after it are never read as another request. The same
 * requests seed the fuzz target (tests/fuzz/corpus/http/strict_*). */
static const bad_request bad_requests[] = {
    BAD("chunk data not followed by CRLF (smuggles a second request)",
        "POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"prompt\":\"abc\"}ZZ0\r\n\r\n"
        "GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    BAD("obs-fold", "GET /t HTTP/1.1\r\nHost: t\r\nX-A: b\r\n c\r\n\r\n", 400),
    BAD("obs-fold with a tab", "GET /t HTTP/1.1\r\nHost: t\r\nX-A: b\r\n\tc\r\n\r\n", 400),
    BAD("space inside a header name", "GET /t HTTP/1.1\r\nHost: t\r\nX A: b\r\n\r\n", 400),
    BAD("space before the colon", "POST /t HTTP/1.1\r\nHost: t\r\nContent-Length : 3\r\n\r\nabc", 400),
    BAD("empty header name", "GET /t HTTP/1.1\r\nHost: t\r\n: b\r\n\r\n", 400),
    BAD("Content-Length and Transfer-Encoding",
        "POST /t HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    BAD("Transfer-Encoding then Content-Length",
        "POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400),
    BAD("chunked after another coding", "POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501),
    BAD("chunked not last", "POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    BAD("Transfer-Encoding twice",
        "POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    BAD("Transfer-Encoding in HTTP/1.0", "POST /t HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    BAD("duplicate Content-Length", "POST /t HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    BAD("Content-Length list", "POST /t HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    BAD("signed Content-Length", "POST /t HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc", 400),
    BAD("bad chunk size", "POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    BAD("space after the chunk size", "POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n",
        400),
    BAD("chunk size overflowing 64 bits",
        "POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n", 400),
    BAD("declared chunk over the body limit", "POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nfffffff\r\n",
        413),
    BAD("chunk extensions over the body limit",
        "POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1;aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaa=b\r\nx\r\n0\r\n\r\n", 413),
    BAD("NUL in a header value", "GET /t HTTP/1.1\r\nHost: t\r\nX-A: b\0c\r\n\r\n", 400),
    BAD("control byte in a header value", "GET /t HTTP/1.1\r\nHost: t\r\nX-A: b\001c\r\n\r\n", 400),
    BAD("DEL in a header value", "GET /t HTTP/1.1\r\nHost: t\r\nX-A: b\177c\r\n\r\n", 400),
    BAD("NUL in a header name", "GET /t HTTP/1.1\r\nHost: t\r\nX\0A: b\r\n\r\n", 400),
    BAD("bare LF line ends", "GET /t HTTP/1.1\nHost: t\n\n", 400),
    BAD("bare LF inside the head", "GET /t HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n", 400),
    BAD("bare CR", "GET /t HTTP/1.1\r\nHost: t\rX-A: b\r\n\r\n", 400),
    BAD("bare LF after a chunk size", "POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n", 400),
    BAD("no Host", "GET /t HTTP/1.1\r\n\r\n", 400),
    BAD("two Host headers", "GET /t HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n", 400),
    BAD("HTTP/1.2", "GET /t HTTP/1.2\r\nHost: t\r\n\r\n", 400),
    BAD("leading whitespace before the first header", "GET /t HTTP/1.1\r\n Host: t\r\n\r\n", 400),
};

static void client_strict(harness *h)
{
    for (size_t i = 0; i < sizeof bad_requests / sizeof bad_requests[0]; i++) {
        const bad_request *bad = &bad_requests[i];
        client *c = client_open(h);
        send_bytes(c, bad->bytes, bad->len);
        response r;
        if (!read_response(c, &r) || r.status != bad->status) {
            snprintf(h->failure, sizeof h->failure, "test_http.c: \"%s\": status %d, want %d", bad->name, r.status,
                     bad->status);
            longjmp(h->client_jmp, 1);
        }
        CHECK(strstr(r.body, "{\"error\":{\"message\":\"") == r.body);
        CHECK(strstr(r.body, "\"code\":\""));
        CHECK(reads_eof(c));
        client_close(c);
    }
    /* What the strict rules allow still works: a chunk extension, a trailer, a tab. */
    client *c = client_open(h);
    send_str(c, "POST /ok HTTP/1.1\r\nHost: t\r\nX-A: a\tb\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n"
                "0\r\nX-Trailer: 1\r\n\r\n");
    response r;
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 200);
    CHECK_STR(r.body, "POST /ok? tag=- body=abc");
    client_close(c);
}

static void test_strict_parsing(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_strict);
    assert_int_equal(h.requests, 1); /* only the last, well-formed one */
}

/* ---- HEAD ---- */

static void client_head(harness *h)
{
    client *c = client_open(h);
    send_str(c, "HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n");
    /* The head announces GET's body length; no body follows, and the next response
     * on the connection starts right after the head. */
    char *end;
    while (!(end = find(c, "\r\n\r\n")))
        CHECK(fill(c));
    CHECK(find(c, "HTTP/1.1 200 OK\r\n") == c->buf);
    CHECK(find(c, "Content-Length: 19\r\n"));
    consume(c, (size_t)(end - c->buf) + 4);
    send_str(c, "GET /h HTTP/1.1\r\nHost: t\r\n\r\n");
    response r;
    CHECK(read_response(c, &r));
    CHECK_STR(r.body, "GET /h? tag=- body="); /* HEAD reached the handler as GET */
    client_close(c);
}

static void test_head(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_head);
    assert_int_equal(h.requests, 2);
}

/* ---- whole bodies handed over (kvd_http_respond_take, kvd_http_take_body) ---- */

static void client_big_whole(harness *h)
{
    client *c = client_open(h);
    /* HEAD first: the length of GET's body, none of its bytes. Then the body itself,
     * every byte in order, and the connection still frames the next answer. */
    send_str(c, "HEAD /big HTTP/1.1\r\nHost: t\r\n\r\nGET /big HTTP/1.1\r\nHost: t\r\n\r\n");
    for (int round = 0; round < 2; round++) {
        char *end;
        while (!(end = find(c, "\r\n\r\n")))
            CHECK(fill(c));
        char want_len[64];
        snprintf(want_len, sizeof want_len, "Content-Length: %u\r\n", BIG_LEN);
        CHECK(find(c, "HTTP/1.1 200 OK\r\n") == c->buf);
        CHECK(find(c, want_len) != NULL);
        consume(c, (size_t)(end - c->buf) + 4);
        if (round == 0)
            continue;
        size_t got = 0;
        while (got < BIG_LEN) {
            if (c->len == 0)
                CHECK(fill(c));
            size_t n = c->len < BIG_LEN - got ? c->len : BIG_LEN - got;
            for (size_t i = 0; i < n; i++)
                if (c->buf[i] != big_byte(got + i))
                    CHECK_INT((long long)(got + i), -1); /* the offset of the first wrong byte */
            consume(c, n);
            got += n;
        }
    }
    send_str(c, "GET /after HTTP/1.1\r\nHost: t\r\n\r\n");
    response r;
    CHECK(read_response(c, &r));
    CHECK_STR(r.body, "GET /after? tag=- body=");
    /* A taken request body (past the kept-buffer size) comes back whole, and the next
     * request on the connection reads its own body, not an empty or stale one. */
    size_t len = 100000;
    char *req_text = malloc(len + 128);
    CHECK(req_text != NULL);
    int head = snprintf(req_text, 128, "POST /take HTTP/1.1\r\nHost: t\r\nContent-Length: %zu\r\n\r\n", len);
    for (size_t i = 0; i < len; i++)
        req_text[head + (int)i] = (char)('a' + i % 26);
    req_text[head + (int)len] = '\0';
    send_str(c, req_text);
    CHECK(read_response(c, &r));
    CHECK_INT((long long)r.body_len, (long long)len);
    CHECK(memcmp(r.body, req_text + head, len) == 0);
    free(req_text);
    send_str(c, "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
    CHECK(read_response(c, &r));
    CHECK_STR(r.body, "POST /b? tag=- body=hello");
    client_close(c);
}

static void test_big_whole(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    limits.socket_send_buffer = 65536; /* many partial writes, slices queued one by one */
    limits.max_body_bytes = 1 << 20;
    run(&h, &limits, client_big_whole);
    assert_int_equal(h.requests, 5);
    assert_int_equal(h.cuts, 0);
}

/* ---- a peer that pipelines and never reads ---- */

static void client_pipeline_never_read(harness *h)
{
    client *c = client_open(h);
    int small = 4096;
    setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    char many[4000] = "";
    for (int i = 0; i < 40; i++)
        strcat(many, "GET /big HTTP/1.1\r\nHost: t\r\n\r\n");
    send_str(c, many);
    /* The server cuts the connection after the send timeout: a read then ends in a
     * reset or EOF, after whatever the buffers held. */
    CHECK(reads_eof(c));
    client_close(c);
    /* The slot is free again. */
    c = client_open(h);
    send_str(c, "GET /after HTTP/1.1\r\nHost: t\r\n\r\n");
    response r;
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 200);
    client_close(c);
}

static void test_send_timeout(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    limits.send_timeout_ms = 200;
    limits.max_connections = 1;
    limits.socket_send_buffer = 16384;
    run(&h, &limits, client_pipeline_never_read);
    assert_int_equal(h.requests, 2); /* one /big (the rest were never parsed) and /after */
    assert_int_equal(h.cuts, 1);
    assert_int_equal(h.last_cut.status, 200);
    assert_false(h.last_cut.by_server);
    assert_true(h.last_cut.bytes_sent < h.last_cut.bytes_meant);
    assert_true(h.last_cut.bytes_meant > (4u << 20));
}

/* An answer the kernel took whole but the peer never read: the connection looks idle
 * to libuv, yet the send deadline (on acknowledged bytes) still closes it, long
 * before the 60 s idle timeout. */
static void client_idle_unread(harness *h)
{
    client *c = client_open_rcvbuf(h, 4096);
    send_str(c, "GET /mid HTTP/1.1\r\nHost: t\r\n\r\n");
    struct timespec wait = {1, 0};
    nanosleep(&wait, NULL);
    size_t got = 0;
    char tmp[4096];
    for (;;) {
        ssize_t n = recv(c->fd, tmp, sizeof tmp, 0);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    CHECK(got < 256 * 1024); /* cut: the rest of the answer never came */
    client_close(c);
}

static void test_send_timeout_idle(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    limits.send_timeout_ms = 200;
    limits.socket_send_buffer = 1 << 20; /* the kernel takes the whole 256 KiB answer */
    run(&h, &limits, client_idle_unread);
    assert_int_equal(h.requests, 1);
}

/* ---- half-close ---- */

static void client_half_close(harness *h)
{
    client *c = client_open(h);
    send_str(c, "GET /slow HTTP/1.1\r\nHost: t\r\n\r\n");
    shutdown(c->fd, SHUT_WR); /* done sending; still reading */
    response r;
    CHECK(read_response(c, &r));
    if (r.status == 100) /* the probe, when the end of input came before the answer */
        CHECK(read_response(c, &r));
    CHECK_INT(r.status, 200);
    CHECK_STR(r.body, "GET /slow? tag=- body=");
    CHECK(has_header(&r, "Connection: close"));
    CHECK(reads_eof(c));
    client_close(c);
}

static void test_half_close(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_half_close);
    assert_int_equal(h.requests, 1);
    assert_int_equal(h.aborts, 0);
}

/* ---- the key before the body; bodies buffered across connections ---- */

static void client_auth_before_body(harness *h)
{
    client *c = client_open(h);
    response r;
    /* No 100 Continue for a request refused on its headers, and no body read. */
    send_str(c, "POST /secret HTTP/1.1\r\nHost: t\r\nContent-Length: 500\r\nExpect: 100-continue\r\n\r\n");
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 401);
    CHECK(has_header(&r, "WWW-Authenticate: Bearer\r\n"));
    CHECK_STR(r.body, "{\"error\":{\"message\":\"Incorrect or missing API key\",\"type\":\"authentication_error\","
                      "\"param\":null,\"code\":\"invalid_api_key\"}}");
    CHECK(reads_eof(c));
    client_close(c);
    c = client_open(h);
    send_str(c, "POST /secret HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer k\r\nContent-Length: 3\r\n"
                "Expect: 100-continue\r\n\r\n");
    while (c->len < 25)
        CHECK(fill(c));
    CHECK(memcmp(c->buf, "HTTP/1.1 100 Continue\r\n\r\n", 25) == 0);
    consume(c, 25);
    send_str(c, "abc");
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 200);
    client_close(c);
}

static void test_auth_before_body(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_auth_before_body);
    assert_int_equal(h.requests, 1);
}

static void client_buffered_cap(harness *h)
{
    client *a = client_open(h), *b = client_open(h);
    response r;
    send_str(a, "POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\nxyz"); /* and stalls */
    /* b's declared body would take the total over 1500 bytes: refused at once. */
    struct timespec ts = {0, 50 * 1000000L};
    nanosleep(&ts, NULL);
    send_str(b, "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n");
    CHECK(read_response(b, &r));
    CHECK_INT(r.status, 503);
    CHECK(has_header(&r, "Retry-After: 1\r\n"));
    CHECK(strstr(r.body, "\"code\":\"server_busy\""));
    client_close(b);
    char rest[998];
    memset(rest, 'x', sizeof rest);
    rest[sizeof rest - 1] = '\0';
    send_str(a, rest);
    CHECK(read_response(a, &r));
    CHECK_INT(r.status, 200);
    client_close(a);
    /* Released with the request: a full body fits again. */
    b = client_open(h);
    send_str(b, "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n");
    send_str(b, rest);
    send_str(b, "xyz");
    CHECK(read_response(b, &r));
    CHECK_INT(r.status, 200);
    client_close(b);
}

static void test_buffered_body_cap(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    limits.max_buffered_body_bytes = 1500;
    run(&h, &limits, client_buffered_cap);
    assert_int_equal(h.requests, 2);
    assert_int_equal(h.buffered_at_end, 0);
}

/* ---- Host, Origin, CORS, content types ---- */

static int status_of(harness *h, const char *request, response *r)
{
    client *c = client_open(h);
    send_str(c, request);
    bool ok = read_response(c, r);
    client_close(c);
    return ok ? r->status : -1;
}

static void client_origins(harness *h)
{
    response r;
    char req[512];
    /* Host: the loopback names (with or without a port) and nothing else. */
    CHECK_INT(status_of(h, "GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n", &r), 200);
    CHECK_INT(status_of(h, "GET /x HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n", &r), 200);
    CHECK_INT(status_of(h, "GET /x HTTP/1.1\r\nHost: [::1]:8000\r\n\r\n", &r), 200);
    CHECK_INT(status_of(h, "GET /x HTTP/1.1\r\nHost: LocalHost:1\r\n\r\n", &r), 200);
    CHECK_INT(status_of(h, "GET /x HTTP/1.1\r\nHost: rebind.example:8000\r\n\r\n", &r), 403);
    CHECK(strstr(r.body, "\"code\":\"host_not_allowed\""));
    CHECK_INT(status_of(h, "GET /x HTTP/1.1\r\nHost: localhost:80x\r\n\r\n", &r), 403);
    CHECK_INT(status_of(h, "GET /x HTTP/1.1\r\nHost: localhost.evil\r\n\r\n", &r), 403);
    /* Origin: the daemon's own pages; a listed origin with CORS headers; no other. */
    snprintf(req, sizeof req,
             "POST /x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nOrigin: http://127.0.0.1:%d\r\n"
             "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", h->port, h->port);
    CHECK_INT(status_of(h, req, &r), 200);
    CHECK(!has_header(&r, "Access-Control-Allow-Origin"));
    CHECK_INT(status_of(h, "POST /x HTTP/1.1\r\nHost: localhost\r\nOrigin: https://evil.example\r\n"
                           "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", &r), 403);
    CHECK(strstr(r.body, "\"code\":\"origin_not_allowed\""));
    CHECK_INT(status_of(h, "GET /x HTTP/1.1\r\nHost: localhost\r\nOrigin: null\r\n\r\n", &r), 403);
    CHECK_INT(status_of(h, "POST /x HTTP/1.1\r\nHost: localhost\r\nOrigin: https://App.example\r\n"
                           "Content-Type: application/json; charset=utf-8\r\nContent-Length: 2\r\n\r\n{}", &r), 200);
    CHECK(has_header(&r, "Access-Control-Allow-Origin: https://App.example\r\n"));
    CHECK(has_header(&r, "Vary: Origin\r\n"));
    /* Preflight: answered by the layer for a listed origin, refused for others. */
    CHECK_INT(status_of(h, "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                           "Origin: https://app.example\r\nAccess-Control-Request-Method: POST\r\n"
                           "Access-Control-Request-Headers: authorization, content-type\r\n\r\n", &r), 204);
    CHECK(has_header(&r, "Access-Control-Allow-Origin: https://app.example\r\n"));
    CHECK(has_header(&r, "Access-Control-Allow-Methods: GET, HEAD, POST, OPTIONS\r\n"));
    CHECK(has_header(&r, "Access-Control-Allow-Headers: authorization, content-type\r\n"));
    CHECK(has_header(&r, "Access-Control-Max-Age: 600\r\n"));
    CHECK_INT(status_of(h, "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                           "Origin: https://evil.example\r\nAccess-Control-Request-Method: POST\r\n\r\n", &r), 403);
    /* Content types a page can send without a preflight never reach a POST handler. */
    CHECK_INT(status_of(h, "POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
                           "Content-Length: 2\r\n\r\n{}", &r), 415);
    CHECK(strstr(r.body, "\"code\":\"unsupported_media_type\""));
    CHECK_INT(status_of(h, "POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=a\r\n"
                           "Content-Length: 2\r\n\r\n{}", &r), 415);
    CHECK_INT(status_of(h, "POST /x HTTP/1.1\r\nHost: localhost\r\nOrigin: https://app.example\r\n"
                           "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 2\r\n\r\n{}", &r), 415);
    CHECK_INT(status_of(h, "POST /x HTTP/1.1\r\nHost: localhost\r\nOrigin: https://app.example\r\n"
                           "Content-Length: 2\r\n\r\n{}", &r), 415);
    /* curl -d (form-urlencoded, no Origin) and a bare POST keep working. */
    CHECK_INT(status_of(h, "POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                           "Content-Length: 2\r\n\r\n{}", &r), 200);
    CHECK_INT(status_of(h, "POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}", &r), 200);
}

static void test_host_origin(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    limits.allowed_hosts = NULL; /* the default: loopback names on a loopback bind */
    limits.allowed_origins = "https://app.example, http://other.example:3000";
    run(&h, &limits, client_origins);
}

/* ---- drain: answers written in full, then on_idle; a cut is reported ---- */

static void client_drain(harness *h)
{
    client *c = client_open(h);
    send_str(c, "GET /drain HTTP/1.1\r\nHost: t\r\n\r\n");
    response r;
    CHECK(read_response(c, &r));
    CHECK_INT(r.status, 200);
    CHECK(has_header(&r, "Connection: close"));
    CHECK(reads_eof(c));
    client_close(c);
}

static void test_drain_idle(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    run(&h, &limits, client_drain);
    assert_int_equal(h.idles, 1);
    assert_int_equal(h.cuts, 0);
}

static void client_cut_by_close(harness *h)
{
    client *c = client_open(h);
    int small = 4096;
    setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    send_str(c, "GET /big HTTP/1.1\r\nHost: t\r\n\r\n");
    while (atomic_load(&h->requests_seen) < 1) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    /* Returning closes the server while the 4 MiB answer is still queued. */
    h->left_open = c;
}

static void test_cut_reported(void **state)
{
    (void)state;
    harness h;
    kvd_http_limits limits = test_limits();
    limits.socket_send_buffer = 16384;
    run(&h, &limits, client_cut_by_close);
    client_close(h.left_open);
    assert_int_equal(h.cuts, 1);
    assert_true(h.last_cut.by_server);
    assert_int_equal(h.last_cut.status, 200);
    assert_true(h.last_cut.bytes_sent < h.last_cut.bytes_meant);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keep_alive),
        cmocka_unit_test(test_pipelined_in_order),
        cmocka_unit_test(test_chunked_body),
        cmocka_unit_test(test_expect_continue),
        cmocka_unit_test(test_body_too_large_declared),
        cmocka_unit_test(test_body_too_large_chunked),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_header_too_large),
        cmocka_unit_test(test_header_timeout),
        cmocka_unit_test(test_idle_timeout),
        cmocka_unit_test(test_body_timeout),
        cmocka_unit_test(test_body_stalled),
        cmocka_unit_test(test_max_connections),
        cmocka_unit_test(test_stream),
        cmocka_unit_test(test_disconnect_aborts),
        cmocka_unit_test(test_write_queue_cap),
        cmocka_unit_test(test_connection_close),
        cmocka_unit_test(test_listen_errors),
        cmocka_unit_test(test_strict_parsing),
        cmocka_unit_test(test_head),
        cmocka_unit_test(test_big_whole),
        cmocka_unit_test(test_send_timeout),
        cmocka_unit_test(test_send_timeout_idle),
        cmocka_unit_test(test_half_close),
        cmocka_unit_test(test_auth_before_body),
        cmocka_unit_test(test_buffered_body_cap),
        cmocka_unit_test(test_host_origin),
        cmocka_unit_test(test_drain_idle),
        cmocka_unit_test(test_cut_reported),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
