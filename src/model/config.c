/* config.c - parses and checks a Qwen2 config.json into a kvd_model_config.
 *
 * Only what the forward pass depends on is read, and all of it is required (a
 * checkpoint missing hidden_size is broken, not small): every key is checked for
 * its JSON type, integer keys for being exact integers in a sane range, and the
 * shape relations the kernels assume (heads divide hidden, KV heads divide query
 * heads, an even head_dim for rotate-half RoPE) are verified here so later code can
 * rely on them. Features kvd does not implement (other architectures, sliding-window
 * attention, RoPE scaling, activations other than SiLU) are refused rather than
 * silently computed wrong. The result is built in a local and copied out only on
 * success, so a failing call leaves *cfg untouched.
 */
#include "kvd/kvd_model.h"
#include "kvd/kvd_safetensors.h"

#include <cjson/cJSON.h>
#include <float.h>
#include <math.h>
#include <string.h>

#define QWEN2_ARCHITECTURE "Qwen2ForCausalLM"

static const char *json_type_name(const cJSON *item)
{
    if (cJSON_IsNull(item)) return "null";
    if (cJSON_IsBool(item)) return "a boolean";
    if (cJSON_IsNumber(item)) return "a number";
    if (cJSON_IsString(item)) return "a string";
    if (cJSON_IsArray(item)) return "an array";
    if (cJSON_IsObject(item)) return "an object";
    return "invalid";
}

/* Reads required integer key into *out, within [min, max]. */
static int get_int(const cJSON *root, const char *key, int min, int max, int *out,
                   const char *path, kvd_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!item)
        return kvd_error_set(err, KVD_EFORMAT, "%s: missing key \"%s\"", path, key);
    if (!cJSON_IsNumber(item))
        return kvd_error_set(err, KVD_EFORMAT, "%s: key \"%s\" must be an integer, got %s",
                             path, key, json_type_name(item));
    double v = item->valuedouble;
    if (!isfinite(v) || floor(v) != v || v < min || v > max)
        return kvd_error_set(err, KVD_EFORMAT, "%s: key \"%s\" = %g is not an integer in [%d, %d]",
                             path, key, v, min, max);
    *out = (int)v;
    return 0;
}

/* Reads required number key into *out, within (min_exclusive, max]. */
static int get_float(const cJSON *root, const char *key, double min_exclusive, double max,
                     float *out, const char *path, kvd_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!item)
        return kvd_error_set(err, KVD_EFORMAT, "%s: missing key \"%s\"", path, key);
    if (!cJSON_IsNumber(item))
        return kvd_error_set(err, KVD_EFORMAT, "%s: key \"%s\" must be a number, got %s", path,
                             key, json_type_name(item));
    double v = item->valuedouble;
    /* Checked again as a float: 1e-60 is positive as a double but 0 as a float. */
    if (!isfinite(v) || v <= min_exclusive || v > max || !((float)v > min_exclusive))
        return kvd_error_set(err, KVD_EFORMAT, "%s: key \"%s\" = %g is out of range (%g, %g]",
                             path, key, v, min_exclusive, max);
    *out = (float)v;
    return 0;
}

/* A token id key: absent or null leaves nothing; an integer or a list of integers
 * is appended to ids (duplicates dropped). */
static int get_token_ids(const cJSON *root, const char *key, int vocab_size, int *ids,
                         int *num_ids, int max_ids, const char *path, kvd_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!item || cJSON_IsNull(item))
        return 0;
    const cJSON *single = cJSON_IsNumber(item) ? item : NULL;
    if (!single && !cJSON_IsArray(item))
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: key \"%s\" must be a token id or a list of ids, got %s", path,
                             key, json_type_name(item));
    const cJSON *element = single ? single : item->child;
    for (; element; element = single ? NULL : element->next) {
        double v = cJSON_IsNumber(element) ? element->valuedouble : -1;
        if (!cJSON_IsNumber(element) || !isfinite(v) || floor(v) != v || v < 0 ||
            v >= vocab_size)
            return kvd_error_set(err, KVD_EFORMAT,
                                 "%s: key \"%s\" holds %s that is not a token id in [0, %d)",
                                 path, key, json_type_name(element), vocab_size);
        int id = (int)v;
        bool seen = false;
        for (int i = 0; i < *num_ids; i++)
            seen = seen || ids[i] == id;
        if (seen)
            continue;
        if (*num_ids >= max_ids)
            return kvd_error_set(err, KVD_EFORMAT, "%s: key \"%s\": more than %d ids", path,
                                 key, max_ids);
        ids[(*num_ids)++] = id;
    }
    return 0;
}

static int check_architecture(const cJSON *root, const char *path, kvd_error *err)
{
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(root, "architectures");
    if (!archs)
        return kvd_error_set(err, KVD_EFORMAT, "%s: missing key \"architectures\"", path);
    if (!cJSON_IsArray(archs) || cJSON_GetArraySize(archs) < 1)
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: key \"architectures\" must be a non-empty list of names", path);
    const cJSON *arch;
    cJSON_ArrayForEach(arch, archs) {
        if (!cJSON_IsString(arch))
            return kvd_error_set(err, KVD_EFORMAT,
                                 "%s: key \"architectures\" holds %s, not a name", path,
                                 json_type_name(arch));
        if (strcmp(arch->valuestring, QWEN2_ARCHITECTURE) != 0) {
            char name[64];
            return kvd_error_set(err, KVD_EUNSUPPORTED,
                                 "%s: architecture \"%s\" is not supported (kvd runs %s)", path,
                                 kvd_st_printable(name, sizeof name, arch->valuestring),
                                 QWEN2_ARCHITECTURE);
        }
    }
    const cJSON *model_type = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    if (model_type && !(cJSON_IsString(model_type) && strcmp(model_type->valuestring, "qwen2") == 0))
        return kvd_error_set(err, KVD_EUNSUPPORTED,
                             "%s: key \"model_type\" must be \"qwen2\" (kvd runs %s)", path,
                             QWEN2_ARCHITECTURE);
    return 0;
}

/* Refuses the options that would change the computation in ways kvd does not implement. */
static int check_unsupported_features(const cJSON *root, const char *path, kvd_error *err)
{
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "hidden_act");
    if (act && !(cJSON_IsString(act) && strcmp(act->valuestring, "silu") == 0))
        return kvd_error_set(err, KVD_EUNSUPPORTED,
                             "%s: key \"hidden_act\" must be \"silu\" (the Qwen2 MLP)", path);
    const cJSON *sliding = cJSON_GetObjectItemCaseSensitive(root, "use_sliding_window");
    if (sliding && !cJSON_IsBool(sliding))
        return kvd_error_set(err, KVD_EFORMAT, "%s: key \"use_sliding_window\" must be a boolean, got %s",
                             path, json_type_name(sliding));
    if (cJSON_IsTrue(sliding))
        return kvd_error_set(err, KVD_EUNSUPPORTED,
                             "%s: key \"use_sliding_window\" is true: sliding-window attention "
                             "is not supported",
                             path);
    const cJSON *scaling = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    if (scaling && !cJSON_IsNull(scaling))
        return kvd_error_set(err, KVD_EUNSUPPORTED,
                             "%s: key \"rope_scaling\" is set: only plain RoPE is supported",
                             path);
    return 0;
}

static int parse_root(const cJSON *root, const char *path, kvd_model_config *cfg, kvd_error *err)
{
    int rc;
    if (!cJSON_IsObject(root))
        return kvd_error_set(err, KVD_EFORMAT, "%s: top level is not a JSON object", path);
    if ((rc = check_architecture(root, path, err)) < 0 ||
        (rc = check_unsupported_features(root, path, err)) < 0)
        return rc;

    /* Ranges are generous bounds that keep every product of them within int64. */
    if ((rc = get_int(root, "vocab_size", 1, 1 << 24, &cfg->vocab_size, path, err)) < 0 ||
        (rc = get_int(root, "hidden_size", 1, 1 << 16, &cfg->hidden_size, path, err)) < 0 ||
        (rc = get_int(root, "intermediate_size", 1, 1 << 18, &cfg->intermediate_size, path,
                      err)) < 0 ||
        (rc = get_int(root, "num_hidden_layers", 1, 1024, &cfg->num_layers, path, err)) < 0 ||
        (rc = get_int(root, "num_attention_heads", 1, 1024, &cfg->num_heads, path, err)) < 0 ||
        (rc = get_int(root, "num_key_value_heads", 1, 1024, &cfg->num_kv_heads, path, err)) < 0 ||
        (rc = get_int(root, "max_position_embeddings", 1, 1 << 24,
                      &cfg->max_position_embeddings, path, err)) < 0 ||
        (rc = get_float(root, "rms_norm_eps", 0.0, 1.0, &cfg->rms_norm_eps, path, err)) < 0 ||
        (rc = get_float(root, "rope_theta", 0.0, FLT_MAX, &cfg->rope_theta, path, err)) < 0)
        return rc;

    if (cfg->hidden_size % cfg->num_heads != 0)
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: hidden_size %d is not a multiple of num_attention_heads %d",
                             path, cfg->hidden_size, cfg->num_heads);
    cfg->head_dim = cfg->hidden_size / cfg->num_heads;
    if (cJSON_GetObjectItemCaseSensitive(root, "head_dim")) {
        int head_dim;
        if ((rc = get_int(root, "head_dim", 1, 1 << 16, &head_dim, path, err)) < 0)
            return rc;
        if (head_dim != cfg->head_dim)
            return kvd_error_set(err, KVD_EFORMAT,
                                 "%s: key \"head_dim\" = %d but hidden_size / "
                                 "num_attention_heads = %d",
                                 path, head_dim, cfg->head_dim);
    }
    if (cfg->head_dim % 2 != 0)
        return kvd_error_set(err, KVD_EFORMAT, "%s: head_dim %d is odd (RoPE pairs dimensions)",
                             path, cfg->head_dim);
    if (cfg->num_heads % cfg->num_kv_heads != 0)
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: num_attention_heads %d is not a multiple of "
                             "num_key_value_heads %d",
                             path, cfg->num_heads, cfg->num_kv_heads);

    const cJSON *tie = cJSON_GetObjectItemCaseSensitive(root, "tie_word_embeddings");
    if (tie && !cJSON_IsBool(tie))
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: key \"tie_word_embeddings\" must be a boolean, got %s", path,
                             json_type_name(tie));
    cfg->tie_word_embeddings = cJSON_IsTrue(tie); /* Qwen2Config defaults to untied */

    /* Informational only (newer writers call it "dtype"); a value kvd does not know
     * is no reason to refuse a checkpoint whose tensors it can read. */
    cfg->torch_dtype = KVD_DTYPE_BF16;
    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(root, "torch_dtype");
    if (!dtype)
        dtype = cJSON_GetObjectItemCaseSensitive(root, "dtype");
    if (cJSON_IsString(dtype))
        kvd_dtype_parse(dtype->valuestring, &cfg->torch_dtype);

    int bos[1], num_bos = 0;
    if ((rc = get_token_ids(root, "bos_token_id", cfg->vocab_size, bos, &num_bos, 1, path,
                            err)) < 0)
        return rc;
    cfg->bos_token_id = num_bos ? bos[0] : -1;
    cfg->num_eos_token_ids = 0;
    return get_token_ids(root, "eos_token_id", cfg->vocab_size, cfg->eos_token_ids,
                         &cfg->num_eos_token_ids, KVD_MAX_EOS_IDS, path, err);
}

int kvd_model_config_parse(const char *json_text, size_t len, const char *path,
                           kvd_model_config *cfg, kvd_error *err)
{
    if (!path)
        path = "config.json";
    if (!json_text)
        return kvd_error_set(err, KVD_EFORMAT, "%s: no text", path);
    cJSON *root = cJSON_ParseWithLength(json_text, len);
    if (!root)
        return kvd_error_set(err, KVD_EFORMAT, "%s: not valid JSON", path);
    kvd_model_config parsed;
    memset(&parsed, 0, sizeof parsed);
    int rc = parse_root(root, path, &parsed, err);
    cJSON_Delete(root);
    if (rc == 0)
        *cfg = parsed;
    return rc;
}
