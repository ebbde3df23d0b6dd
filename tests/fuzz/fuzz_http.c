/* fuzz_http.c - libFuzzer target: arbitrary bytes through the daemon's HTTP layer.
 *
 * The real server/http.c runs on its own libuv loop, listening on 127.0.0.1 with an
 * ephemeral port; each input is sent over a fresh loopback connection, in pieces the
 * input chooses (so llhttp sees URLs, headers and bodies split at every place), and
 * the loop is run from this thread until the connection is gone. No socket-free
 * entry point exists in http.h, and driving the accept/read/write path is the point:
 * parse errors, limits (431, 413), pipelining, deferred answers, streams, write-queue
 * cuts and client disconnects all go through the same code as in the daemon.
 *
 * Input: byte 0 chooses the piece size (bits 0-2: 2^k bytes, 7 = all at once) and
 * whether the client half-closes at once (bit 3) or only once the server went quiet;
 * the rest is the byte stream. The handler routes by path: "/defer" answers on a
 * later loop turn (or is aborted by the disconnect), "/stream" streams the body back
 * in chunks of a size its first byte picks, "/flood" streams past the write-queue cap, anything else is answered
 * at once. Checked, beyond ASan/UBSan:
 *   - what a request exposes agrees with itself (NUL-terminated body within the body
 *     limit and equal to Content-Length when one was sent, except for CONNECT whose
 *     body llhttp never reads; path without '?');
 *   - on_abort comes only for a request the handler has not finished, and when the
 *     connection is gone no request is left unfinished and unaborted (nothing lost);
 *   - the bytes the client reads parse as HTTP/1.1 responses (llhttp in response
 *     mode): one final response per answered request plus at most one error from
 *     the layer itself, whose body is a JSON error object;
 *   - the connection always closes (a hang aborts after 10 s).
 * The seed corpus holds the smuggling and malformed requests test_http.c refuses
 * (strict_*: chunk CRLF, obs-fold, CL+TE, codings, NUL/CTL, bare LF, chunk sizes and
 * extensions), so the fuzzer starts at the edges of the strict rules.
 * The server is the one piece of global state: libFuzzer's entry points take no context.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <llhttp.h>
#include <uv.h>

#include "http.h"

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "fuzz_http: ERROR: check failed: %s (line %d)\n", #cond, __LINE__);   \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

/* Small limits so that inputs of a few KiB reach every one of them. */
#define FUZZ_MAX_HEADER_BYTES 2048
#define FUZZ_MAX_HEADERS 24
#define FUZZ_MAX_BODY_BYTES 4096
#define FUZZ_MAX_WRITE_QUEUE 4096
#define MAX_OPEN 64
#define HANG_NS (10ull * 1000 * 1000 * 1000)

typedef struct fuzz_server {
    uv_loop_t loop;
    kvd_http_server *srv;
    int port;
    /* Requests dispatched and not finished by the handler; "/defer" ones wait in order. */
    kvd_http_request *open[MAX_OPEN];
    uint64_t open_turn[MAX_OPEN]; /* driver turn at dispatch */
    int num_open;
    uint64_t turns;
    uint64_t connections;
    int answered;   /* final responses the handler queued */
    bool cut;       /* the handler's stream was cut (write-queue cap): output truncated */
} fuzz_server;

static fuzz_server *fz;

static int open_index(kvd_http_request *req)
{
    for (int i = 0; i < fz->num_open; i++)
        if (fz->open[i] == req)
            return i;
    return -1;
}

static void open_remove(kvd_http_request *req)
{
    int i = open_index(req);
    CHECK(i >= 0);
    memmove(&fz->open[i], &fz->open[i + 1], (size_t)(fz->num_open - i - 1) * sizeof fz->open[0]);
    memmove(&fz->open_turn[i], &fz->open_turn[i + 1], (size_t)(fz->num_open - i - 1) * sizeof fz->open_turn[0]);
    fz->num_open--;
}

static void finish_with(kvd_http_request *req, int status, const char *body, size_t len)
{
    open_remove(req);
    fz->answered++;
    /* The request is finished whatever this returns (the peer may be gone). */
    (void)kvd_http_respond(req, status, "text/plain", NULL, body, len);
}

static void check_request(const kvd_http_request *req)
{
    const char *method = kvd_http_method(req);
    const char *path = kvd_http_path(req);
    CHECK(method && method[0] != '\0');
    CHECK(path && strchr(path, '?') == NULL);
    CHECK(kvd_http_query(req) != NULL);
    size_t len = 12345;
    const char *body = kvd_http_body(req, &len);
    CHECK(body && len <= FUZZ_MAX_BODY_BYTES && body[len] == '\0');
    const char *content_length = kvd_http_header(req, "content-length");
    /* A CONNECT request has no body whatever it declares: what follows is tunnel data. */
    if (content_length && !kvd_http_header(req, "transfer-encoding") && strcmp(method, "CONNECT") != 0) {
        char *end;
        unsigned long long declared = strtoull(content_length, &end, 10);
        CHECK(*end == '\0' && declared == len);
    }
}

static void stream_back(kvd_http_request *req, size_t chunk, int repeat)
{
    size_t len;
    const char *body = kvd_http_body(req, &len);
    if (kvd_http_stream_begin(req, 200, "text/event-stream", NULL) != 0)
        return; /* connection gone: on_abort follows */
    for (int r = 0; r < repeat; r++) {
        for (size_t off = 0; off < len; off += chunk) {
            size_t n = len - off < chunk ? len - off : chunk;
            int rc = kvd_http_stream_write(req, body + off, n);
            if (rc == KVD_EBUSY)
                fz->cut = true;
            if (rc != 0)
                return; /* on_abort follows */
        }
        if (kvd_http_stream_write(req, "\n", 1) != 0)
            return;
    }
    open_remove(req);
    fz->answered++;
    (void)kvd_http_stream_end(req);
}

static void on_request(kvd_http_request *req, void *arg)
{
    (void)arg;
    check_request(req);
    CHECK(open_index(req) < 0 && fz->num_open < MAX_OPEN);
    fz->open_turn[fz->num_open] = fz->turns;
    fz->open[fz->num_open++] = req;
    const char *path = kvd_http_path(req);
    if (kvd_http_is_head(req)) {
        finish_with(req, 200, NULL, 0); /* a HEAD answer carries no body */
    } else if (strcmp(path, "/defer") == 0) {
        /* answered by the driver on a later loop turn */
    } else if (strcmp(path, "/stream") == 0) {
        /* The body's first byte picks the chunk size, so chunk framing of any size is checked. */
        size_t len;
        const char *body = kvd_http_body(req, &len);
        stream_back(req, len ? 1 + (unsigned char)body[0] % 64 : 1, 1);
    } else if (strcmp(path, "/flood") == 0) {
        stream_back(req, 1000, 16);
    } else {
        char out[256];
        size_t len;
        (void)kvd_http_body(req, &len);
        int n = snprintf(out, sizeof out, "%s %.100s %zu", kvd_http_method(req), path, len);
        finish_with(req, strcmp(path, "/missing") == 0 ? 404 : 200, out, (size_t)n);
    }
}

static void on_abort(kvd_http_request *req, void *arg)
{
    (void)arg;
    /* Only requests the handler has not finished may be aborted. */
    open_remove(req);
}

/* ---- the client's view: responses parsed by llhttp ---- */

typedef struct response_check {
    int finals;      /* responses with status >= 200 */
    int errors;      /* of which status >= 400 */
    int preflights;  /* 204s: CORS preflights the layer answered itself */
    int status;
    char body[1024];
    size_t body_len;
    bool body_over;
} response_check;

static int resp_on_body(llhttp_t *p, const char *at, size_t len)
{
    response_check *rc = p->data;
    if (rc->body_len + len >= sizeof rc->body) {
        rc->body_over = true;
        return 0;
    }
    memcpy(rc->body + rc->body_len, at, len);
    rc->body_len += len;
    return 0;
}

static int resp_on_begin(llhttp_t *p)
{
    response_check *rc = p->data;
    rc->body_len = 0;
    rc->body_over = false;
    return 0;
}

static int resp_on_complete(llhttp_t *p)
{
    response_check *rc = p->data;
    int status = p->status_code;
    if (status < 200)
        return 0;
    if (status == 204) {
        rc->preflights++; /* CORS preflights are answered by the layer, never by the handler */
        return 0;
    }
    rc->finals++;
    if (status >= 400 && status != 404) {
        /* The layer's own errors are OpenAI's JSON: {"error": {"message", "type", "param", "code"}}. */
        rc->errors++;
        CHECK(!rc->body_over);
        cJSON *root = cJSON_ParseWithLength(rc->body, rc->body_len);
        CHECK(root != NULL);
        const cJSON *error = cJSON_GetObjectItemCaseSensitive(root, "error");
        const cJSON *message = cJSON_GetObjectItemCaseSensitive(error, "message");
        const cJSON *code = cJSON_GetObjectItemCaseSensitive(error, "code");
        CHECK(cJSON_IsString(message) && message->valuestring[0] != '\0');
        CHECK(cJSON_IsString(code) && code->valuestring[0] != '\0');
        CHECK(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(error, "type")));
        cJSON_Delete(root);
    }
    return 0;
}

static void check_responses(const char *data, size_t len)
{
    llhttp_settings_t settings;
    llhttp_settings_init(&settings);
    settings.on_message_begin = resp_on_begin;
    settings.on_body = resp_on_body;
    settings.on_message_complete = resp_on_complete;
    llhttp_t parser;
    response_check rc = {0};
    llhttp_init(&parser, HTTP_RESPONSE, &settings);
    parser.data = &rc;
    llhttp_errno_t e = llhttp_execute(&parser, data, len);
    if (e == HPE_OK)
        e = llhttp_finish(&parser);
    if (e != HPE_OK) {
        fprintf(stderr, "fuzz_http: ERROR: the server's output does not parse: %s\n", llhttp_get_error_reason(&parser));
        abort();
    }
    /* Every answer the handler gave arrived; the layer adds at most one error of its own. */
    CHECK(rc.finals == fz->answered || (rc.finals == fz->answered + 1 && rc.errors >= 1));
}

/* ---- driver ---- */

typedef struct client {
    int fd;
    char *got;
    size_t got_len, got_cap;
    bool eof;
} client;

static void client_read(client *c)
{
    for (;;) {
        if (c->got_cap - c->got_len < 4096) {
            c->got_cap = c->got_cap ? c->got_cap * 2 : 16384;
            c->got = realloc(c->got, c->got_cap);
            CHECK(c->got != NULL);
        }
        ssize_t n = recv(c->fd, c->got + c->got_len, c->got_cap - c->got_len, 0);
        if (n > 0) {
            c->got_len += (size_t)n;
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            c->eof = true; /* EOF or reset */
        return;
    }
}

/* One loop turn, then what the client can read, then one deferred answer: a request
 * dispatched in an earlier turn, so a client that hangs up at once aborts it first. */
static void turn(client *c)
{
    fz->turns++;
    uv_run(&fz->loop, UV_RUN_NOWAIT);
    client_read(c);
    for (int i = 0; i < fz->num_open; i++) {
        kvd_http_request *req = fz->open[i];
        if (fz->open_turn[i] < fz->turns && strcmp(kvd_http_path(req), "/defer") == 0) {
            size_t len;
            const char *body = kvd_http_body(req, &len);
            finish_with(req, 200, body, len);
            break;
        }
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fz = calloc(1, sizeof *fz);
    CHECK(fz != NULL);
    CHECK(uv_loop_init(&fz->loop) == 0);
    kvd_http_limits limits = kvd_http_limits_default();
    limits.max_header_bytes = FUZZ_MAX_HEADER_BYTES;
    limits.max_headers = FUZZ_MAX_HEADERS;
    limits.max_body_bytes = FUZZ_MAX_BODY_BYTES;
    limits.max_write_queue_bytes = FUZZ_MAX_WRITE_QUEUE;
    limits.allowed_hosts = "*"; /* the Host check is one branch; refusing most inputs on it would hide the rest */
    limits.allowed_origins = "https://app.example";
    kvd_http_handlers handlers = {.on_request = on_request, .on_abort = on_abort, .arg = NULL};
    kvd_error err = {0};
    fz->srv = kvd_http_server_create(&fz->loop, &limits, &handlers, &err);
    if (!fz->srv || kvd_http_server_listen(fz->srv, "127.0.0.1", 0, &fz->port, &err) != 0) {
        fprintf(stderr, "fuzz_http: %s\n", err.msg);
        exit(1);
    }
    return 0;
}

/* connect(), waiting out an interruption: libFuzzer's SIGALRM (its timeout clock) can
 * land in the middle of it (seen: "connect: Interrupted system call" failing a CI run),
 * and the connection then completes on its own; poll for it and read its outcome. */
static int connect_waiting(int fd, const struct sockaddr *addr, socklen_t len)
{
    if (connect(fd, addr, len) == 0)
        return 0;
    if (errno != EINTR)
        return -1;
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int rc;
    do
        rc = poll(&p, 1, 10000);
    while (rc < 0 && errno == EINTR);
    if (rc <= 0) {
        errno = rc == 0 ? ETIMEDOUT : errno;
        return -1;
    }
    int err = 0;
    socklen_t err_len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &err_len) != 0)
        return -1;
    errno = err;
    return err == 0 ? 0 : -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    unsigned piece_bits = data[0] & 7;
    bool close_early = (data[0] & 8) != 0;
    size_t piece = piece_bits == 7 ? SIZE_MAX : (size_t)1 << piece_bits;
    data++;
    size--;

    fz->answered = 0;
    fz->cut = false;
    client c = {.fd = socket(AF_INET, SOCK_STREAM, 0)};
    CHECK(c.fd >= 0);
    /* Each connection from another address of 127/8: a client that half-closes first
     * leaves a TIME_WAIT socket per connection, and at a thousand connections a second
     * one source address runs out of ports within a minute. */
    struct sockaddr_in from = {.sin_family = AF_INET};
    from.sin_addr.s_addr = htonl(INADDR_LOOPBACK + 1 + (uint32_t)(fz->connections++ % 4000000));
    CHECK(bind(c.fd, (struct sockaddr *)&from, sizeof from) == 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)fz->port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect_waiting(c.fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        fprintf(stderr, "fuzz_http: ERROR: connect: %s\n", strerror(errno));
        abort();
    }
    CHECK(fcntl(c.fd, F_SETFL, O_NONBLOCK) == 0);
    /* Reset on close: no TIME_WAIT pile-up over millions of connections. */
    struct linger reset = {.l_onoff = 1, .l_linger = 0};
    CHECK(setsockopt(c.fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset) == 0);

    uint64_t start = uv_hrtime();
    size_t off = 0;
    while (off < size && !c.eof) {
        size_t n = size - off < piece ? size - off : piece;
        ssize_t sent = send(c.fd, data + off, n, MSG_NOSIGNAL);
        if (sent > 0)
            off += (size_t)sent;
        else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            break; /* the server closed on us (it refused the request) */
        turn(&c);
        CHECK(uv_hrtime() - start < HANG_NS);
    }
    if (!close_early) {
        /* Let the server answer everything it will while the client still listens. */
        for (int i = 0; i < 16 && !c.eof; i++)
            turn(&c);
    }
    shutdown(c.fd, SHUT_WR);
    while (kvd_http_server_num_connections(fz->srv) > 0 || !c.eof) {
        turn(&c);
        if (uv_hrtime() - start >= HANG_NS) {
            fprintf(stderr, "fuzz_http: ERROR: connection still open after 10 s (%d open requests)\n", fz->num_open);
            abort();
        }
    }
    /* The connection is gone: every request was either answered or aborted. */
    CHECK(fz->num_open == 0);
    if (!fz->cut)
        check_responses(c.got, c.got_len);
    close(c.fd);
    free(c.got);
    return 0;
}
