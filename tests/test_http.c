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
    kvd_http_request *slow_req;
    uv_idle_t flood_idle;
    kvd_http_request *flood_req;
    kvd_http_request *held_req;
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
    const char *path = kvd_http_path(req);
    if (strcmp(path, "/slow") == 0) {
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

static void on_client_done(uv_async_t *async)
{
    harness *h = async->data;
    kvd_http_server_close(h->srv);
    uv_close((uv_handle_t *)&h->done, NULL);
    uv_close((uv_handle_t *)&h->slow_timer, NULL);
    uv_close((uv_handle_t *)&h->flood_idle, NULL);
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
    return limits;
}

static void run(harness *h, const kvd_http_limits *limits, client_fn client)
{
    memset(h, 0, sizeof *h);
    assert_int_equal(uv_loop_init(&h->loop), 0);
    kvd_http_handlers handlers = {on_request, on_abort, h};
    kvd_error err = {0};
    h->srv = kvd_http_server_create(&h->loop, limits, &handlers, &err);
    assert_non_null(h->srv);
    assert_int_equal(kvd_http_server_listen(h->srv, "127.0.0.1", 0, &h->port, &err), 0);
    assert_true(h->port > 0);
    uv_async_init(&h->loop, &h->done, on_client_done);
    h->done.data = h;
    uv_timer_init(&h->loop, &h->slow_timer);
    h->slow_timer.data = h;
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

typedef struct client {
    harness *h;
    int fd;
    char buf[1 << 18];
    size_t len;
} client;

typedef struct response {
    int status;
    char head[4096];
    char body[1 << 17];
    size_t body_len;
} response;

static client *client_open(harness *h)
{
    client *c = calloc(1, sizeof *c);
    CHECK(c != NULL);
    c->h = h;
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(c->fd >= 0);
    struct timeval tv = {.tv_sec = 20};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)h->port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    CHECK_INT(connect(c->fd, (struct sockaddr *)&addr, sizeof addr), 0);
    return c;
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
                      "\"type\":\"invalid_request_error\",\"param\":null,\"code\":408}}");
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
    send_str(a, "GET /1 HTTP/1.1\r\n\r\n");
    CHECK(read_response(a, &r));
    send_str(b, "GET /2 HTTP/1.1\r\n\r\n");
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
    /* The request bytes arrive before the FIN, so the application holds the request
     * by the time the server reads the end of the stream. */
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
    kvd_http_handlers handlers = {on_request, on_abort, NULL};
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
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
