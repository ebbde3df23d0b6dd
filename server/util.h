/* util.h - small helpers the daemon's modules share: UTF-8 repair, constant-time
 * comparison and levelled logging (the growable buffer is kvd/kvd_buf.h).
 *
 * Text bound for JSON goes through kvd_utf8_append_sanitized first: cJSON copies bytes
 * verbatim, and a model can emit byte sequences that are not UTF-8, which would make
 * the output invalid JSON.
 */
#ifndef KVD_SERVER_UTIL_H
#define KVD_SERVER_UTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <uv.h>

#include "kvd/kvd_buf.h" /* kvd_sbuf; http.c should include it directly */

/* Appends s[0..len) to sb with every byte sequence that is not well-formed UTF-8
 * (overlongs, surrogates, > U+10FFFF, truncated) replaced by U+FFFD, and NUL bytes
 * replaced by U+FFFD too, so the result is a valid C string and valid JSON text. */
void kvd_utf8_append_sanitized(kvd_sbuf *sb, const char *s, size_t len);
/* True when s[0..len) is well-formed UTF-8 without NUL bytes. */
bool kvd_utf8_is_clean(const char *s, size_t len);

/* Compares two byte strings in time that depends only on their lengths, so a
 * network client cannot learn a secret key prefix by timing. */
bool kvd_consttime_equal(const char *a, size_t a_len, const char *b, size_t b_len);

/* uv_queue_work, with SIGINT and SIGTERM blocked in the loop thread for the call: the
 * first call starts libuv's pool threads, which inherit the mask (kvd_thread.h says
 * why no worker may take them). Loop thread. */
int kvd_queue_work(uv_loop_t *loop, uv_work_t *work, uv_work_cb run, uv_after_work_cb after);

/* Frees p, of about len bytes. A large block is freed on a libuv worker: returning
 * tens of MB to the system (munmap of every page) would otherwise hold the loop
 * thread for milliseconds. Runs on the loop thread; p must not be used afterwards.
 * The loop stays alive until the worker is done. */
void kvd_free_off_loop(uv_loop_t *loop, void *p, size_t len);

/* How many nice steps below the daemon's own threads (the loop, the engine) libuv's
 * workers run request work (parsing bodies, rendering templates, tokenizing, building
 * whole answers). */
#define KVD_WORKER_NICE_STEPS 10

/* Lowers the calling thread (a libuv worker) to KVD_WORKER_NICE_STEPS below the daemon's
 * main thread (at most to 19) unless it is that low already. On a machine with no more
 * cores than engine threads, a burst of such work would otherwise take the cores from
 * the engine and stretch every running stream's token gap; the work itself only waits a
 * little longer. Relative, so a daemon started under nice keeps its workers below it.
 * Linux keeps nice per thread, and a lowered worker stays lowered, which is what the
 * pool needs. Never fails: a refusal leaves the thread as it was. */
void kvd_worker_yield_to_engine(void);

typedef enum kvd_log_level {
    KVD_LOG_DEBUG = 0,
    KVD_LOG_INFO = 1,
    KVD_LOG_WARN = 2,
    KVD_LOG_ERROR = 3,
    KVD_LOG_ALWAYS = 4, /* start-up banner and lifecycle lines, whatever the level */
} kvd_log_level;

/* Parses "debug", "info", "warn"/"warning", "error". Returns 0 or -1. */
int kvd_log_level_parse(const char *name, kvd_log_level *out);
const char *kvd_log_level_name(kvd_log_level level);

/* Where the daemon logs and from which level on; owned by whoever logs. */
typedef struct kvd_logger {
    FILE *out;
    kvd_log_level level;
} kvd_logger;

void kvd_log(const kvd_logger *log, kvd_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
