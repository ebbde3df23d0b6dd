/* util.c - growable buffers, UTF-8 repair, constant-time comparison, logging.
 *
 * The UTF-8 validator follows the Unicode well-formed byte sequence table (Unicode
 * 15, table 3-7) so that what it passes any strict JSON parser also accepts. Each
 * maximal ill-formed subpart becomes one U+FFFD, as the Unicode "substitution of
 * maximal subparts" practice (and Python's decoder with errors="replace") does.
 */
#include "util.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

void kvd_sbuf_init(kvd_sbuf *sb)
{
    sb->data = NULL;
    sb->len = 0;
    sb->cap = 0;
    sb->failed = false;
}

void kvd_sbuf_deinit(kvd_sbuf *sb)
{
    free(sb->data);
    kvd_sbuf_init(sb);
}

void kvd_sbuf_reset(kvd_sbuf *sb)
{
    sb->len = 0;
    sb->failed = false;
    if (sb->data)
        sb->data[0] = '\0';
}

int kvd_sbuf_reserve(kvd_sbuf *sb, size_t extra)
{
    if (sb->failed)
        return -1;
    if (extra > SIZE_MAX / 2 - sb->len) {
        sb->failed = true;
        return -1;
    }
    size_t need = sb->len + extra + 1;
    if (need <= sb->cap)
        return 0;
    size_t cap = sb->cap ? sb->cap : 256;
    while (cap < need)
        cap *= 2;
    char *grown = realloc(sb->data, cap);
    if (!grown) {
        sb->failed = true;
        return -1;
    }
    sb->data = grown;
    sb->cap = cap;
    return 0;
}

void kvd_sbuf_append(kvd_sbuf *sb, const void *data, size_t len)
{
    if (kvd_sbuf_reserve(sb, len) != 0)
        return;
    if (len)
        memcpy(sb->data + sb->len, data, len);
    sb->len += len;
    sb->data[sb->len] = '\0';
}

void kvd_sbuf_puts(kvd_sbuf *sb, const char *s)
{
    kvd_sbuf_append(sb, s, strlen(s));
}

void kvd_sbuf_printf(kvd_sbuf *sb, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char small[256];
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) {
        va_end(ap2);
        sb->failed = true;
        return;
    }
    if ((size_t)n < sizeof small) {
        va_end(ap2);
        kvd_sbuf_append(sb, small, (size_t)n);
        return;
    }
    if (kvd_sbuf_reserve(sb, (size_t)n) == 0) {
        vsnprintf(sb->data + sb->len, (size_t)n + 1, fmt, ap2);
        sb->len += (size_t)n;
    }
    va_end(ap2);
}

char *kvd_sbuf_take(kvd_sbuf *sb, size_t *len)
{
    if (sb->failed) {
        kvd_sbuf_deinit(sb);
        return NULL;
    }
    if (!sb->data && kvd_sbuf_reserve(sb, 0) != 0)
        return NULL;
    char *data = sb->data;
    if (len)
        *len = sb->len;
    kvd_sbuf_init(sb);
    return data;
}

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
