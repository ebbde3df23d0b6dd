/* mix.c - which ggml type each tensor gets for a --type / --quantize name (llama-quantize's
 * choices without an importance matrix; see kvd_gguf.h). */
#include "kvd/kvd_gguf.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

static const kvd_gguf_mix mixes[] = {
    {"f32", KVD_DTYPE_F32, false, 0},    {"f16", KVD_DTYPE_F16, false, 1},
    {"bf16", KVD_DTYPE_BF16, false, 32}, {"q8_0", KVD_DTYPE_Q8_0, false, 7},
    {"q4_0", KVD_DTYPE_Q4_0, false, 2},  {"q5_0", KVD_DTYPE_Q5_0, false, 8},
    {"q4_k", KVD_DTYPE_Q4_K, false, 14}, {"q5_k", KVD_DTYPE_Q5_K, false, 16},
    {"q6_k", KVD_DTYPE_Q6_K, false, 18}, {"q4_k_m", KVD_DTYPE_Q4_K, true, 15},
    {"q5_k_m", KVD_DTYPE_Q5_K, true, 17},
};

const kvd_gguf_mix *kvd_gguf_mix_find(const char *name)
{
    for (size_t i = 0; name && i < sizeof mixes / sizeof *mixes; i++)
        if (strcasecmp(name, mixes[i].name) == 0)
            return &mixes[i];
    return NULL;
}

const char *kvd_gguf_mix_names(void)
{
    return "f32 f16 bf16 q8_0 q4_0 q5_0 q4_k q5_k q6_k q4_k_m q5_k_m";
}

/* llama.cpp's use_more_bits: the first and last eighth of the layers and every third
 * between them. */
static bool use_more_bits(int i, int n)
{
    return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
}

/* llama.cpp's fallback for rows that are not whole super-blocks, for the types kvd reads
 * (Q5_K's own fallback, Q5_1, is not one of them: Q8_0). */
static kvd_dtype fit_width(kvd_dtype t, int64_t cols)
{
    if (cols % kvd_dtype_block_values(t) == 0)
        return t;
    if (cols % 32 != 0)
        return KVD_DTYPE_F16;
    return t == KVD_DTYPE_Q4_K ? KVD_DTYPE_Q5_0 : KVD_DTYPE_Q8_0;
}

kvd_dtype kvd_gguf_mix_type(const kvd_gguf_mix *mix, const char *gguf_name, int64_t cols,
                            int num_layers, bool tied)
{
    kvd_dtype type = mix->base;
    if (!kvd_dtype_is_quantized(type))
        return type;
    bool is_output = strcmp(gguf_name, "output.weight") == 0 ||
                     (tied && strcmp(gguf_name, "token_embd.weight") == 0);
    unsigned layer;
    int used = 0;
    if (is_output) {
        if (cols % kvd_dtype_block_values(type) != 0)
            type = KVD_DTYPE_Q8_0;
        else if (type != KVD_DTYPE_Q8_0)
            type = KVD_DTYPE_Q6_K;
    } else if (mix->k_mix && sscanf(gguf_name, "blk.%u.%n", &layer, &used) == 1 && used > 0 &&
               (strcmp(gguf_name + used, "attn_v.weight") == 0 ||
                strcmp(gguf_name + used, "ffn_down.weight") == 0) &&
               use_more_bits((int)layer, num_layers)) {
        type = KVD_DTYPE_Q6_K;
    }
    return fit_width(type, cols);
}
