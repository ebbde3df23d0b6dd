/* error.c - the kvd_error message carrier and code descriptions. */
#include "kvd/kvd_error.h"

#include <stdarg.h>
#include <stdio.h>

int kvd_error_set(kvd_error *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        err->code = code;
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

const char *kvd_strerror(int code)
{
    switch (code) {
    case KVD_OK: return "ok";
    case KVD_ENOMEM: return "out of memory";
    case KVD_EIO: return "i/o error";
    case KVD_EINVAL: return "invalid argument";
    case KVD_EFORMAT: return "malformed input";
    case KVD_ENOSPC: return "no free KV blocks";
    case KVD_ETOOLONG: return "too long";
    case KVD_EUNSUPPORTED: return "unsupported";
    case KVD_ECANCELED: return "cancelled";
    case KVD_EBUSY: return "busy";
    case KVD_ESTATE: return "invalid state";
    default: return "unknown error";
    }
}
