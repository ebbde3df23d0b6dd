/* kvd_error.h - error codes and the message carrier every fallible call fills.
 *
 * Functions that can fail return a negative KVD_E* code (or NULL) and, when the
 * caller passed a kvd_error, leave a one-line human message in it naming the
 * file, key or tensor at fault. A failing call leaves its inputs as they were.
 */
#ifndef KVD_ERROR_H
#define KVD_ERROR_H

#include <stddef.h>

enum {
    KVD_OK = 0,
    KVD_ENOMEM = -1,       /* allocation failed */
    KVD_EIO = -2,          /* file missing, unreadable, short read */
    KVD_EINVAL = -3,       /* bad argument or value */
    KVD_EFORMAT = -4,      /* malformed file contents (JSON, safetensors, ...) */
    KVD_ENOSPC = -5,       /* KV pool has no free block now (retry later / preempt) */
    KVD_ETOOLONG = -6,     /* can never fit: longer than context or the whole pool */
    KVD_EUNSUPPORTED = -7, /* architecture, dtype or feature not supported */
    KVD_ECANCELED = -8,    /* request cancelled */
    KVD_EBUSY = -9,        /* queue full */
    KVD_ESTATE = -10,      /* call not valid in the object's current state */
};

typedef struct kvd_error {
    int code;
    char msg[512];
} kvd_error;

/* Records code and a printf-style message in err (err may be NULL). Returns code,
 * so callers can write `return kvd_error_set(err, KVD_EIO, "%s: ...", path);`. */
int kvd_error_set(kvd_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Short constant description of a code ("out of memory", ...). */
const char *kvd_strerror(int code);

#endif
