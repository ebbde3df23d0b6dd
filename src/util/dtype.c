/* dtype.c - names and sizes of the element types weights and KV are stored in. */
#include "kvd/kvd_model.h"

#include <string.h>
#include <strings.h>

size_t kvd_dtype_size(kvd_dtype dtype)
{
    return dtype == KVD_DTYPE_F32 ? 4 : 2;
}

const char *kvd_dtype_name(kvd_dtype dtype)
{
    switch (dtype) {
    case KVD_DTYPE_F32: return "f32";
    case KVD_DTYPE_F16: return "f16";
    case KVD_DTYPE_BF16: return "bf16";
    }
    return "?";
}

int kvd_dtype_parse(const char *name, kvd_dtype *out)
{
    static const struct { const char *name; kvd_dtype dtype; } names[] = {
        {"f32", KVD_DTYPE_F32}, {"float32", KVD_DTYPE_F32},
        {"f16", KVD_DTYPE_F16}, {"float16", KVD_DTYPE_F16}, {"half", KVD_DTYPE_F16},
        {"bf16", KVD_DTYPE_BF16}, {"bfloat16", KVD_DTYPE_BF16},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (strcasecmp(name, names[i].name) == 0) {
            *out = names[i].dtype;
            return 0;
        }
    }
    return KVD_EINVAL;
}
