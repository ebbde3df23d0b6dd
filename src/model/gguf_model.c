/* gguf_model.c - the hyper-parameters of a qwen2 GGUF (llama.cpp's key names).
 *
 * The keys and bounds mirror config.c's for config.json, so a GGUF and the checkpoint it
 * was converted from give the same kvd_model_config. GGUF files carry no sampling
 * defaults (generation_config.json), so those stay neutral.
 */
#include "gguf_model.h"

#include <float.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* EOS ids besides tokenizer.ggml.eos_token_id: llama.cpp ends generation on these control
 * tokens too, as a Qwen2.5 generation_config.json lists both. */
static const char *const end_of_generation[] = {"<|im_end|>", "<|endoftext|>"};

static int add_eos(kvd_model_config *cfg, int id)
{
    for (int i = 0; i < cfg->num_eos_token_ids; i++)
        if (cfg->eos_token_ids[i] == id)
            return 0;
    if (cfg->num_eos_token_ids >= KVD_MAX_EOS_IDS)
        return -1;
    cfg->eos_token_ids[cfg->num_eos_token_ids++] = id;
    return 0;
}

static int token_ids(const kvd_gguf *g, const char *path, kvd_model_config *cfg, kvd_error *err)
{
    int64_t v;
    int rc;
    cfg->bos_token_id = -1;
    cfg->num_eos_token_ids = 0;
    if (kvd_gguf_find_kv(g, "tokenizer.ggml.bos_token_id")) {
        if ((rc = kvd_gguf_get_int(g, "tokenizer.ggml.bos_token_id", 0, cfg->vocab_size - 1, &v,
                                   path, err)) < 0)
            return rc;
        cfg->bos_token_id = (int)v;
    }
    if (kvd_gguf_find_kv(g, "tokenizer.ggml.eos_token_id")) {
        if ((rc = kvd_gguf_get_int(g, "tokenizer.ggml.eos_token_id", 0, cfg->vocab_size - 1, &v,
                                   path, err)) < 0)
            return rc;
        add_eos(cfg, (int)v);
    }
    const kvd_gguf_kv *tokens = kvd_gguf_find_kv(g, "tokenizer.ggml.tokens");
    const kvd_gguf_kv *types = kvd_gguf_find_kv(g, "tokenizer.ggml.token_type");
    if (!tokens || !types || tokens->type != KVD_GGUF_ARRAY || types->type != KVD_GGUF_ARRAY ||
        tokens->elem_type != KVD_GGUF_STRING || types->count != tokens->count ||
        (types->elem_type != KVD_GGUF_INT32 && types->elem_type != KVD_GGUF_UINT32))
        return 0; /* the tokenizer loader reports a broken tokenizer */
    const uint8_t *cursor = tokens->data;
    uint64_t n = tokens->count < (uint64_t)cfg->vocab_size ? tokens->count : (uint64_t)cfg->vocab_size;
    for (uint64_t id = 0; id < n; id++) {
        kvd_gguf_str s = kvd_gguf_next_string(&cursor);
        if (kvd_gguf_array_int(types, id) != 3) /* CONTROL */
            continue;
        for (size_t k = 0; k < sizeof end_of_generation / sizeof *end_of_generation; k++)
            if (s.len == strlen(end_of_generation[k]) &&
                memcmp(s.ptr, end_of_generation[k], s.len) == 0)
                add_eos(cfg, (int)id);
    }
    return 0;
}

int kvd_gguf_model_config(const kvd_gguf *g, const char *path, kvd_model_config *out,
                          char **chat_template, kvd_error *err)
{
    kvd_gguf_str arch;
    int rc = kvd_gguf_get_string(g, "general.architecture", &arch, path, err);
    if (rc < 0)
        return rc;
    if (arch.len != 5 || memcmp(arch.ptr, "qwen2", 5) != 0) {
        char shown[64];
        return kvd_error_set(err, KVD_EUNSUPPORTED,
                             "%s: general.architecture is \"%s\"; kvd serves qwen2", path,
                             kvd_gguf_printable(shown, sizeof shown, arch.ptr, arch.len));
    }
    kvd_model_config cfg;
    memset(&cfg, 0, sizeof cfg);
    /* the same generous bounds as config.c: every product of them fits in int64 */
    static const struct { const char *key; int64_t max; size_t field; } ints[] = {
        {"qwen2.block_count", 1024, offsetof(kvd_model_config, num_layers)},
        {"qwen2.context_length", 1 << 24, offsetof(kvd_model_config, max_position_embeddings)},
        {"qwen2.embedding_length", 1 << 16, offsetof(kvd_model_config, hidden_size)},
        {"qwen2.feed_forward_length", 1 << 18, offsetof(kvd_model_config, intermediate_size)},
        {"qwen2.attention.head_count", 1024, offsetof(kvd_model_config, num_heads)},
        {"qwen2.attention.head_count_kv", 1024, offsetof(kvd_model_config, num_kv_heads)},
    };
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++) {
        int64_t v;
        if ((rc = kvd_gguf_get_int(g, ints[i].key, 1, ints[i].max, &v, path, err)) < 0)
            return rc;
        *(int *)(void *)((char *)&cfg + ints[i].field) = (int)v;
    }
    double eps, theta = 10000.0; /* llama.cpp's default when the key is absent */
    if ((rc = kvd_gguf_get_float(g, "qwen2.attention.layer_norm_rms_epsilon", &eps, path, err)) < 0)
        return rc;
    if (kvd_gguf_find_kv(g, "qwen2.rope.freq_base") &&
        (rc = kvd_gguf_get_float(g, "qwen2.rope.freq_base", &theta, path, err)) < 0)
        return rc;
    if (!(eps > 0 && eps <= 1) || !(theta > 0 && theta <= FLT_MAX))
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: qwen2.attention.layer_norm_rms_epsilon %g must be in (0, 1] and "
                             "qwen2.rope.freq_base %g positive",
                             path, eps, theta);
    cfg.rms_norm_eps = (float)eps;
    cfg.rope_theta = (float)theta;
    if (cfg.hidden_size % cfg.num_heads != 0 || (cfg.hidden_size / cfg.num_heads) % 2 != 0 ||
        cfg.num_heads % cfg.num_kv_heads != 0)
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: embedding_length %d, head_count %d and head_count_kv %d do not "
                             "give an even head size shared by whole groups of heads",
                             path, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads);
    cfg.head_dim = cfg.hidden_size / cfg.num_heads;
    int64_t key_length;
    if (kvd_gguf_find_kv(g, "qwen2.attention.key_length") &&
        ((rc = kvd_gguf_get_int(g, "qwen2.attention.key_length", 1, 1 << 16, &key_length, path,
                                err)) < 0 ||
         key_length != cfg.head_dim))
        return rc < 0 ? rc
                      : kvd_error_set(err, KVD_EFORMAT,
                                      "%s: qwen2.attention.key_length %lld is not "
                                      "embedding_length / head_count = %d",
                                      path, (long long)key_length, cfg.head_dim);
    const kvd_gguf_tensor *embd = kvd_gguf_find_tensor(g, "token_embd.weight");
    if (!embd)
        return kvd_error_set(err, KVD_EFORMAT, "%s: missing tensor token_embd.weight", path);
    if (embd->ndim != 2 || embd->ne[1] > (1 << 24))
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: tensor token_embd.weight is not a matrix of at most 2^24 rows",
                             path);
    cfg.vocab_size = (int)embd->ne[1];
    cfg.tie_word_embeddings = kvd_gguf_find_tensor(g, "output.weight") == NULL;
    cfg.torch_dtype = embd->supported ? embd->dtype : KVD_DTYPE_BF16;
    if ((rc = token_ids(g, path, &cfg, err)) < 0)
        return rc;

    char *tmpl = NULL;
    if (kvd_gguf_find_kv(g, "tokenizer.chat_template")) {
        kvd_gguf_str t;
        if ((rc = kvd_gguf_get_string(g, "tokenizer.chat_template", &t, path, err)) < 0)
            return rc;
        if (memchr(t.ptr, '\0', t.len))
            return kvd_error_set(err, KVD_EFORMAT, "%s: tokenizer.chat_template holds a NUL byte",
                                 path);
        tmpl = malloc(t.len + 1);
        if (!tmpl)
            return kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", path);
        memcpy(tmpl, t.ptr, t.len);
        tmpl[t.len] = '\0';
    }
    *out = cfg;
    *chat_template = tmpl;
    return 0;
}
