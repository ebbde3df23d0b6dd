/* util.c - UTF-8 repair, constant-time comparison, logging.
 *
 * The UTF-8 validator follows the Unicode well-formed byte sequence table (Unicode
 * 15, table 3-7) so that what it passes any strict JSON parser also accepts. Each
 * maximal ill-formed subpart becomes one U+FFFD, as the Unicode "substitution of
 * maximal subparts" practice (and Python's decoder with errors="replace") does.
 */
#include "util.h"
#include "kvd/kvd_thread.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <unistd.h>

/* Length of the well-formed UTF-8 sequence starting at s[0] (1..4), or 0 when the
 * bytes there are ill-formed; *bad_len then says how many bytes form the maximal
 * ill-formed subpart to replace with one U+FFFD. */
static size_t utf8_sequence(const unsigned char *s, size_t avail, size_t *bad_len)
{
    unsigned char c = s[0];
    *bad_len = 1;
    if (c >= 0x01 && c <= 0x7F)
        return 1;
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else {
        return 0; /* NUL, continuation byte, C0/C1, F5..FF */
    }
    for (size_t i = 1; i < need; i++) {
        if (i >= avail) {
            *bad_len = i;
            return 0;
        }
        unsigned char b = s[i];
        unsigned char min = i == 1 ? lo : 0x80, max = i == 1 ? hi : 0xBF;
        if (b < min || b > max) {
            *bad_len = i;
            return 0;
        }
    }
    return need;
}

void kvd_utf8_append_sanitized(kvd_sbuf *sb, const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, run_start = 0;
    while (i < len) {
        size_t bad;
        size_t n = utf8_sequence(p + i, len - i, &bad);
        if (n) {
            i += n;
            continue;
        }
        kvd_sbuf_append(sb, s + run_start, i - run_start);
        kvd_sbuf_append(sb, "\xEF\xBF\xBD", 3);
        i += bad;
        run_start = i;
    }
    kvd_sbuf_append(sb, s + run_start, len - run_start);
}

bool kvd_utf8_is_clean(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        size_t bad;
        size_t n = utf8_sequence(p + i, len - i, &bad);
        if (!n)
            return false;
        i += n;
    }
    return true;
}

bool kvd_consttime_equal(const char *a, size_t a_len, const char *b, size_t b_len)
{
    /* Walk the full length of the expected key whatever the input, comparing against
     * a zero byte past the end of the shorter one, so only lengths leak. */
    volatile unsigned char diff = (unsigned char)(a_len != b_len);
    size_t n = a_len > b_len ? a_len : b_len;
    for (size_t i = 0; i < n; i++) {
        unsigned char x = i < a_len ? (unsigned char)a[i] : 0;
        unsigned char y = i < b_len ? (unsigned char)b[i] : 0;
        diff |= (unsigned char)(x ^ y);
    }
    return diff == 0;
}

static const char *const level_names[] = {"debug", "info", "warn", "error"};

int kvd_log_level_parse(const char *name, kvd_log_level *out)
{
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(name, level_names[i]) == 0) {
            *out = (kvd_log_level)i;
            return 0;
        }
    }
    if (strcasecmp(name, "warning") == 0) {
        *out = KVD_LOG_WARN;
        return 0;
    }
    return -1;
}

const char *kvd_log_level_name(kvd_log_level level)
{
    return level >= KVD_LOG_DEBUG && level <= KVD_LOG_ERROR ? level_names[level] : "?";
}

void kvd_log(const kvd_logger *log, kvd_log_level level, const char *fmt, ...)
{
    if (!log || level < log->level)
        return;
    /* One fprintf per line keeps lines whole when several threads log. */
    char line[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    fprintf(log->out ? log->out : stderr, "kvd: %s\n", line);
    fflush(log->out ? log->out : stderr);
}

/* Below this a free costs microseconds: not worth a trip to a worker. */
#define OFF_LOOP_FREE_MIN_BYTES (1u << 20)

typedef struct off_loop_free {
    uv_work_t work;
    void *p;
} off_loop_free;

static void off_loop_free_work(uv_work_t *work)
{
    off_loop_free *f = work->data;
    free(f->p);
}

static void after_off_loop_free(uv_work_t *work, int status)
{
    off_loop_free *f = work->data;
    if (status == UV_ECANCELED) /* never ran */
        free(f->p);
    free(f);
}

void kvd_worker_yield_to_engine(void)
{
    /* PRIO_PROCESS names one thread on Linux: 0 the caller, getpid() the main thread
     * (whose nice the engine and the loop share). getpriority can return -1 as a value,
     * so errno tells a failure apart. */
    errno = 0;
    int daemon_nice = getpriority(PRIO_PROCESS, (id_t)getpid());
    int nice_now = getpriority(PRIO_PROCESS, 0);
    if (errno != 0)
        return;
    int target = daemon_nice + KVD_WORKER_NICE_STEPS < 19 ? daemon_nice + KVD_WORKER_NICE_STEPS : 19;
    if (nice_now < target)
        (void)setpriority(PRIO_PROCESS, 0, target);
}

int kvd_queue_work(uv_loop_t *loop, uv_work_t *work, uv_work_cb run, uv_after_work_cb after)
{
    sigset_t saved;
    kvd_signals_block(&saved);
    int rc = uv_queue_work(loop, work, run, after);
    kvd_signals_restore(&saved);
    return rc;
}

void kvd_free_off_loop(uv_loop_t *loop, void *p, size_t len)
{
    if (!p)
        return;
    off_loop_free *f = len >= OFF_LOOP_FREE_MIN_BYTES ? malloc(sizeof *f) : NULL;
    if (f) {
        f->p = p;
        f->work.data = f;
        if (kvd_queue_work(loop, &f->work, off_loop_free_work, after_off_loop_free) == 0)
            return;
        free(f);
    }
    free(p); /* small, or no worker to be had: here, as before */
}
