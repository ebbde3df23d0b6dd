/* buf.c - the one growable byte buffer (kvd_sbuf) every module builds text in.
 *
 * A failed allocation is remembered (`failed`), so builders may append freely and
 * check once at the end; each append also returns 0 or KVD_ENOMEM for callers that
 * stop at the first failure.
 */
#include "kvd/kvd_buf.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvd/kvd_error.h"

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
    /* A reserve before any append (an HTTP body sized from its Content-Length) must
     * still read as the empty string. */
    grown[sb->len] = '\0';
    sb->data = grown;
    sb->cap = cap;
    return 0;
}

int kvd_sbuf_append(kvd_sbuf *sb, const void *data, size_t len)
{
    if (kvd_sbuf_reserve(sb, len) != 0)
        return KVD_ENOMEM;
    if (len)
        memcpy(sb->data + sb->len, data, len);
    sb->len += len;
    sb->data[sb->len] = '\0';
    return 0;
}

int kvd_sbuf_puts(kvd_sbuf *sb, const char *s)
{
    return kvd_sbuf_append(sb, s, strlen(s));
}

int kvd_sbuf_printf(kvd_sbuf *sb, const char *fmt, ...)
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
        return KVD_ENOMEM;
    }
    if ((size_t)n < sizeof small) {
        va_end(ap2);
        return kvd_sbuf_append(sb, small, (size_t)n);
    }
    int rc = kvd_sbuf_reserve(sb, (size_t)n) == 0 ? 0 : KVD_ENOMEM;
    if (rc == 0) {
        vsnprintf(sb->data + sb->len, (size_t)n + 1, fmt, ap2);
        sb->len += (size_t)n;
    }
    va_end(ap2);
    return rc;
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

int kvd_sbuf_read_file(kvd_sbuf *sb, const char *path, kvd_error *err)
{
    /* A FIFO or a device is refused: reading it could block or never end. (Opening a
     * FIFO still waits for a writer, as any reader would; the daemon's loader relies on
     * SIGTERM, not on this, to stop a load stuck there.) */
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return kvd_error_set(err, KVD_EIO, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return kvd_error_set(err, KVD_EIO, "%s: not a regular file", path);
    }
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        close(fd);
        return kvd_error_set(err, KVD_ENOMEM, "%s: %s", path, strerror(errno));
    }
    size_t before = sb->len;
    char chunk[16384];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        kvd_sbuf_append(sb, chunk, n);
    bool read_error = ferror(f) != 0;
    fclose(f);
    if (kvd_sbuf_reserve(sb, 0) == 0) /* an empty file still leaves a NUL-terminated buffer */
        sb->data[sb->len] = '\0';
    int rc = read_error ? kvd_error_set(err, KVD_EIO, "%s: read error", path)
             : sb->failed ? kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", path) : 0;
    if (rc != 0 && sb->data) {
        sb->len = before;
        sb->data[before] = '\0';
    }
    return rc;
}
