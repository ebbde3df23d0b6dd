/* dtype.c - names and sizes of the element types weights and KV are stored in. */
#include "kvd/kvd_model.h"

#include <string.h>
#include <strings.h>

/* One row per dtype, indexed by its value: the single table of names and block sizes. */
static const struct {
    const char *name;
    int block_values;
    size_t block_bytes;
} dtype_table[KVD_DTYPE_COUNT] = {
    [KVD_DTYPE_F32] = {"f32", 1, 4},
    [KVD_DTYPE_F16] = {"f16", 1, 2},
    [KVD_DTYPE_BF16] = {"bf16", 1, 2},
    [KVD_DTYPE_Q8_0] = {"q8_0", 32, 2 + 32},
    [KVD_DTYPE_Q4_0] = {"q4_0", 32, 2 + 16},
    [KVD_DTYPE_Q5_0] = {"q5_0", 32, 2 + 4 + 16},
    [KVD_DTYPE_Q4_K] = {"q4_k", 256, 2 + 2 + 12 + 128},
    [KVD_DTYPE_Q5_K] = {"q5_k", 256, 2 + 2 + 12 + 32 + 128},
    [KVD_DTYPE_Q6_K] = {"q6_k", 256, 128 + 64 + 16 + 2},
    [KVD_DTYPE_Q8_K] = {"q8_k", 256, 4 + 256 + 2 * 16},
    [KVD_DTYPE_I8] = {"int8", 1, 1},
    [KVD_DTYPE_F8] = {"fp8", 1, 1},
};

static bool dtype_valid(kvd_dtype dtype)
{
    return (unsigned)dtype < KVD_DTYPE_COUNT;
}

size_t kvd_dtype_size(kvd_dtype dtype)
{
    return kvd_dtype_is_quantized(dtype) || !dtype_valid(dtype) ? 0 : dtype_table[dtype].block_bytes;
}

int kvd_dtype_block_values(kvd_dtype dtype)
{
    return dtype_valid(dtype) ? dtype_table[dtype].block_values : 0;
}

size_t kvd_dtype_block_bytes(kvd_dtype dtype)
{
    return dtype_valid(dtype) ? dtype_table[dtype].block_bytes : 0;
}

bool kvd_dtype_is_quantized(kvd_dtype dtype)
{
    return dtype_valid(dtype) && dtype_table[dtype].block_values > 1;
}

size_t kvd_dtype_row_bytes(kvd_dtype dtype, int64_t cols)
{
    int per_block = kvd_dtype_block_values(dtype);
    if (per_block <= 0 || cols < 0 || cols % per_block != 0)
        return 0;
    return (size_t)(cols / per_block) * dtype_table[dtype].block_bytes;
}

const char *kvd_dtype_name(kvd_dtype dtype)
{
    return dtype_valid(dtype) ? dtype_table[dtype].name : "?";
}

int kvd_dtype_parse(const char *name, kvd_dtype *out)
{
    static const struct { const char *name; kvd_dtype dtype; } aliases[] = {
        {"float32", KVD_DTYPE_F32}, {"float16", KVD_DTYPE_F16}, {"half", KVD_DTYPE_F16},
        {"bfloat16", KVD_DTYPE_BF16}, {"i8", KVD_DTYPE_I8},
        {"fp8_e4m3", KVD_DTYPE_F8}, {"e4m3", KVD_DTYPE_F8},
    };
    for (int d = 0; d < KVD_DTYPE_COUNT; d++) {
        if (strcasecmp(name, dtype_table[d].name) == 0) {
            *out = (kvd_dtype)d;
            return 0;
        }
    }
    for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++) {
        if (strcasecmp(name, aliases[i].name) == 0) {
            *out = aliases[i].dtype;
            return 0;
        }
    }
    return KVD_EINVAL;
}
