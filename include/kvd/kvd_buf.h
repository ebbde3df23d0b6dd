/* kvd_buf.h - the growable byte buffer every module builds text and bytes in.
 *
 * A kvd_sbuf remembers an allocation failure instead of reporting it on every append
 * (`failed`, after which appends do nothing), so builders can append freely and check
 * once at the end; each append also returns 0 or KVD_ENOMEM for callers that want to
 * stop at once. The buffer belongs to whoever embeds it; one thread at a time.
 * `= {0}` is a valid empty buffer, as is kvd_sbuf_init.
 */
#ifndef KVD_BUF_H
#define KVD_BUF_H

#include <stdbool.h>
#include <stddef.h>

typedef struct kvd_sbuf {
    char *data;  /* NUL-terminated whenever not NULL; NULL until an append or reserve */
    size_t len;
    size_t cap;
    bool failed; /* an allocation failed; contents are then incomplete */
} kvd_sbuf;

void kvd_sbuf_init(kvd_sbuf *sb);
void kvd_sbuf_deinit(kvd_sbuf *sb);
/* Empties the buffer, keeping its allocation (and clearing `failed`). */
void kvd_sbuf_reset(kvd_sbuf *sb);
/* Makes room for extra more bytes (plus NUL). Returns 0 or -1 (and sets failed). */
int kvd_sbuf_reserve(kvd_sbuf *sb, size_t extra);
/* Each returns 0, or KVD_ENOMEM with `failed` set (the buffer keeps what it had). */
int kvd_sbuf_append(kvd_sbuf *sb, const void *data, size_t len);
int kvd_sbuf_puts(kvd_sbuf *sb, const char *s);
int kvd_sbuf_printf(kvd_sbuf *sb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Takes the buffer's memory (the caller frees it) and leaves sb empty. Never NULL
 * unless allocation failed (then NULL, and sb is emptied). */
char *kvd_sbuf_take(kvd_sbuf *sb, size_t *len);
/* Appends the whole file at path (NUL-terminated after, not counted in len). Returns 0,
 * KVD_EIO naming the file (cannot open or read, or not a regular file), or KVD_ENOMEM; sb keeps what it held
 * before on failure. */
struct kvd_error;
int kvd_sbuf_read_file(kvd_sbuf *sb, const char *path, struct kvd_error *err);

#endif
