/* loader.c - loads a Qwen2 checkpoint directory into one anonymous weight arena.
 *
 * Steps: parse config.json (config.c) and the optional generation_config.json; map
 * every safetensors file read-only (one model.safetensors, or the shards named by
 * model.safetensors.index.json) and validate their headers (safetensors.c); list the
 * tensors the config implies and check each one's presence, dtype and shape before
 * anything is copied; then copy them into a single anonymous mapping. Matrices keep
 * the checkpoint's dtype (so bf16 weights cost 2 bytes each), the small vectors
 * (norm weights, q/k/v biases) become float32 because every kernel reads them as
 * float; every tensor starts 64-byte aligned for vector loads. The arena is 2 MiB
 * aligned and advised for transparent huge pages (fewer TLB misses when a decode step
 * streams all weights), then made read-only, and the file mappings are dropped: after
 * loading, decoding never touches the files and never page-faults on them. The source
 * pages of each chunk are released as soon as it is copied (kvd_st_release_pages), so
 * the resident set peaks at the arena plus one chunk, not at twice the weights.
 *
 * A GGUF file (--model FILE.gguf, or a directory holding one .gguf and no config.json)
 * goes the same way: the config from its qwen2.* keys (gguf_model.c), its tensors under
 * llama.cpp's names, copied out of the file mapping into the arena like safetensors.
 * Weight matrices may mix dtypes (a quantized GGUF does): each product dispatches on its
 * matrix's dtype. Tensors the model does not use, and lm_head.weight when the embeddings
 * are tied, are ignored. Assumes a little-endian host, as both formats do.
 */
#include "kvd/kvd_half.h"
#include "kvd/kvd_hugemem.h"
#include "kvd/kvd_model.h"
#include "kvd/kvd_quant.h"
#include "kvd/kvd_safetensors.h"
#include "kvd/kvd_thread.h"
#include "gguf_model.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TENSOR_ALIGN 64
#define MAX_JSON_FILE_BYTES ((size_t)64 << 20)
/* Progress is reported in steps of this fraction and copies are chunked so that a
 * single huge embedding still reports smoothly. */
#define PROGRESS_STEP_PERCENT 5
#define COPY_CHUNK_BYTES ((size_t)16 << 20)

typedef struct model_impl {
    void *arena;      /* anonymous mapping holding every weight */
    size_t arena_size;
} model_impl;

/* Where a tensor was found, in either file format: shape rows first (a GGUF's extents
 * reversed), dtype and bytes within a file mapping. */
typedef struct tensor_source {
    const char *file_path;
    const uint8_t *data;
    bool supported;         /* dtype is one kvd computes with */
    kvd_dtype dtype;
    const char *dtype_name; /* as the file names it */
    int ndim;
    int64_t shape[KVD_ST_MAX_DIMS];
    uint64_t numel, bytes;
} tensor_source;

/* A tensor the config says must exist, where it was found and where it goes. */
typedef struct wanted_tensor {
    char name[96];          /* the Hugging Face name; a GGUF's own name once found there */
    int rows;               /* matrix rows, or vector length */
    int cols;               /* matrix cols; 0 marks a vector (stored as float32) */
    kvd_matrix *matrix;     /* destination of a matrix */
    const float **vector;   /* destination of a vector */
    tensor_source src;
    kvd_dtype dtype;        /* what the arena holds: the source's, or --quantize's choice */
    size_t arena_offset;
} wanted_tensor;

typedef struct load_state {
    const char *dir;
    const char *config_name; /* what the shapes are checked against, for messages */
    kvd_st_file *files;     /* [num_files] */
    int num_files;
    kvd_gguf_file gguf;     /* a GGUF model's file (map == NULL otherwise) */
    const kvd_gguf_mix *quantize; /* --quantize's target, or NULL */
    wanted_tensor *wanted;  /* [num_wanted] */
    int num_wanted;
} load_state;

static void source_from_safetensors(wanted_tensor *w, const kvd_st_file *f, const kvd_st_tensor *t)
{
    w->src = (tensor_source){.file_path = f->path, .data = kvd_st_tensor_data(f, t),
                             .supported = t->supported, .dtype = t->dtype,
                             .dtype_name = t->dtype_name, .ndim = t->ndim, .numel = t->numel,
                             .bytes = t->end - t->begin};
    memcpy(w->src.shape, t->shape, sizeof w->src.shape);
}

static int join_path(char *out, size_t cap, const char *dir, const char *file, kvd_error *err)
{
    int n = snprintf(out, cap, "%s/%s", dir, file);
    if (n < 0 || (size_t)n >= cap)
        return kvd_error_set(err, KVD_EINVAL, "%s/%s: path too long", dir, file);
    return 0;
}

/* Reads a whole (small) file. Returns 0 and a malloc'ed NUL-terminated *text, or
 * KVD_EIO with err set; *missing says the file does not exist (optional files). */
static int read_text_file(const char *path, char **text, size_t *len, bool *missing,
                          kvd_error *err)
{
    if (missing)
        *missing = false;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (missing)
            *missing = errno == ENOENT;
        return kvd_error_set(err, KVD_EIO, "%s: cannot open: %s", path, strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (size_t)st.st_size > MAX_JSON_FILE_BYTES) {
        close(fd);
        return kvd_error_set(err, KVD_EIO, "%s: not a regular file of at most %zu bytes", path,
                             MAX_JSON_FILE_BYTES);
    }
    size_t size = (size_t)st.st_size;
    char *buf = malloc(size + 1);
    if (!buf) {
        close(fd);
        return kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", path);
    }
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fd, buf + got, size - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            int e = r < 0 ? errno : 0;
            free(buf);
            close(fd);
            return kvd_error_set(err, KVD_EIO, "%s: short read: %s", path,
                                 e ? strerror(e) : "file shrank");
        }
        got += (size_t)r;
    }
    close(fd);
    buf[size] = '\0';
    *text = buf;
    *len = size;
    return 0;
}

static int gen_number(const cJSON *root, const char *key, double min, double max, float *out,
                      const char *path, kvd_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!item || cJSON_IsNull(item))
        return 0;
    if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble) || item->valuedouble < min ||
        item->valuedouble > max)
        return kvd_error_set(err, KVD_EFORMAT, "%s: key \"%s\" must be a number in [%g, %g]",
                             path, key, min, max);
    *out = (float)item->valuedouble;
    return 0;
}

/* Merges generation_config.json's eos ids after config.json's (duplicates dropped). */
static int gen_eos_ids(const cJSON *root, kvd_model_config *cfg, const char *path,
                       kvd_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, "eos_token_id");
    if (!item || cJSON_IsNull(item))
        return 0;
    if (!cJSON_IsNumber(item) && !cJSON_IsArray(item))
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: key \"eos_token_id\" must be a token id or a list of ids", path);
    const cJSON *element = cJSON_IsNumber(item) ? item : item->child;
    for (; element; element = cJSON_IsNumber(item) ? NULL : element->next) {
        double v = element->valuedouble;
        if (!cJSON_IsNumber(element) || !isfinite(v) || floor(v) != v || v < 0 ||
            v >= cfg->vocab_size)
            return kvd_error_set(err, KVD_EFORMAT,
                                 "%s: key \"eos_token_id\" holds a value that is not a token id "
                                 "in [0, %d)",
                                 path, cfg->vocab_size);
        int id = (int)v;
        bool seen = false;
        for (int i = 0; i < cfg->num_eos_token_ids; i++)
            seen = seen || cfg->eos_token_ids[i] == id;
        if (seen)
            continue;
        if (cfg->num_eos_token_ids >= KVD_MAX_EOS_IDS)
            return kvd_error_set(err, KVD_EFORMAT, "%s: key \"eos_token_id\": more than %d ids",
                                 path, KVD_MAX_EOS_IDS);
        cfg->eos_token_ids[cfg->num_eos_token_ids++] = id;
    }
    return 0;
}

static const kvd_generation_defaults neutral_generation = {
    .temperature = 1.0f, .top_p = 1.0f, .top_k = 0, .min_p = 0.0f, .repetition_penalty = 1.0f,
    .do_sample = false};

/* Reads the optional generation_config.json: sampling defaults and extra eos ids. */
static int load_generation_config(kvd_model *model, kvd_error *err)
{
    kvd_generation_defaults *gen = &model->generation;
    *gen = neutral_generation;
    char path[PATH_MAX];
    int rc = join_path(path, sizeof path, model->dir, "generation_config.json", err);
    if (rc < 0)
        return rc;
    char *text;
    size_t len;
    bool missing;
    rc = read_text_file(path, &text, &len, &missing, err);
    if (rc < 0)
        return missing ? 0 : rc;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return kvd_error_set(err, KVD_EFORMAT, "%s: not a JSON object", path);
    }
    float top_k = 0;
    if ((rc = gen_number(root, "temperature", 0, 1e6, &gen->temperature, path, err)) < 0 ||
        (rc = gen_number(root, "top_p", 0, 1, &gen->top_p, path, err)) < 0 ||
        (rc = gen_number(root, "top_k", 0, 1 << 24, &top_k, path, err)) < 0 ||
        (rc = gen_number(root, "min_p", 0, 1, &gen->min_p, path, err)) < 0 ||
        (rc = gen_number(root, "repetition_penalty", 1e-6, 1e6, &gen->repetition_penalty, path,
                         err)) < 0 ||
        (rc = gen_eos_ids(root, &model->config, path, err)) < 0)
        goto done;
    if (floorf(top_k) != top_k) {
        rc = kvd_error_set(err, KVD_EFORMAT, "%s: key \"top_k\" must be an integer", path);
        goto done;
    }
    gen->top_k = (int)top_k;
    const cJSON *do_sample = cJSON_GetObjectItemCaseSensitive(root, "do_sample");
    if (do_sample && !cJSON_IsNull(do_sample)) {
        if (!cJSON_IsBool(do_sample)) {
            rc = kvd_error_set(err, KVD_EFORMAT, "%s: key \"do_sample\" must be a boolean", path);
            goto done;
        }
        gen->do_sample = cJSON_IsTrue(do_sample);
    }
done:
    cJSON_Delete(root);
    return rc;
}

/* A shard name from the index must stay inside the checkpoint directory. */
static bool is_plain_file_name(const char *name)
{
    for (const char *p = name; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f) /* it ends up in messages */
            return false;
    return name[0] && !strchr(name, '/') && strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
}

static int find_or_open_file(load_state *st, const char *file_name, const kvd_st_file **out,
                             kvd_error *err)
{
    char path[PATH_MAX];
    int rc = join_path(path, sizeof path, st->dir, file_name, err);
    if (rc < 0)
        return rc;
    for (int i = 0; i < st->num_files; i++) {
        if (strcmp(st->files[i].path, path) == 0) {
            *out = &st->files[i];
            return 0;
        }
    }
    rc = kvd_st_file_open(&st->files[st->num_files], path, err);
    if (rc < 0)
        return rc;
    *out = &st->files[st->num_files++];
    return 0;
}

/* Finds each wanted tensor through the index's weight_map (sharded checkpoints). */
static int locate_sharded(load_state *st, const char *index_path, const char *text, size_t len,
                          kvd_error *err)
{
    cJSON *root = cJSON_ParseWithLength(text, len);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    int rc = 0;
    if (!cJSON_IsObject(root) || !cJSON_IsObject(map)) {
        rc = kvd_error_set(err, KVD_EFORMAT, "%s: not a JSON object with a \"weight_map\" object",
                           index_path);
        goto done;
    }
    int num_entries = cJSON_GetArraySize(map);
    st->files = calloc(num_entries > 0 ? (size_t)num_entries : 1, sizeof *st->files);
    if (!st->files) {
        rc = kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", index_path);
        goto done;
    }
    /* Open every shard the index names, used or not: a missing or corrupt shard means
     * a broken checkpoint even if kvd would not read it. */
    const cJSON *entry;
    cJSON_ArrayForEach(entry, map) {
        if (!cJSON_IsString(entry) || !is_plain_file_name(entry->valuestring)) {
            char name[128];
            rc = kvd_error_set(err, KVD_EFORMAT,
                               "%s: weight_map entry for tensor %s is not a file name in the "
                               "checkpoint directory",
                               index_path, kvd_st_printable(name, sizeof name, entry->string));
            goto done;
        }
        const kvd_st_file *file;
        if ((rc = find_or_open_file(st, entry->valuestring, &file, err)) < 0)
            goto done;
    }
    for (int i = 0; i < st->num_wanted; i++) {
        wanted_tensor *w = &st->wanted[i];
        const cJSON *file_name = cJSON_GetObjectItemCaseSensitive(map, w->name);
        if (!file_name) {
            rc = kvd_error_set(err, KVD_EFORMAT, "%s: missing tensor %s in weight_map",
                               index_path, w->name);
            goto done;
        }
        const kvd_st_file *file;
        if ((rc = find_or_open_file(st, file_name->valuestring, &file, err)) < 0)
            goto done;
        const kvd_st_tensor *t = kvd_st_header_find(&file->header, w->name);
        if (!t) {
            rc = kvd_error_set(err, KVD_EFORMAT, "%s: missing tensor %s (the index puts it there)",
                               file->path, w->name);
            goto done;
        }
        source_from_safetensors(w, file, t);
    }
done:
    cJSON_Delete(root);
    return rc;
}

/* Finds every wanted tensor in the GGUF file under its llama.cpp name (which replaces the
 * Hugging Face name in messages); shapes are rows first, the reverse of GGUF's extents. */
static int locate_gguf(load_state *st, kvd_error *err)
{
    const kvd_gguf *g = &st->gguf.gguf;
    for (int i = 0; i < st->num_wanted; i++) {
        wanted_tensor *w = &st->wanted[i];
        char name[sizeof w->name];
        if (kvd_gguf_qwen2_name(w->name, name, sizeof name) < 0)
            return kvd_error_set(err, KVD_EINVAL, "%s: no GGUF name for %s", st->gguf.path,
                                 w->name);
        memcpy(w->name, name, sizeof name);
        const kvd_gguf_tensor *t = kvd_gguf_find_tensor(g, name);
        if (!t)
            return kvd_error_set(err, KVD_EFORMAT, "%s: missing tensor %s", st->gguf.path, name);
        const char *type_name = kvd_gguf_ggml_type_name(t->ggml_type);
        w->src = (tensor_source){.file_path = st->gguf.path, .data = kvd_gguf_tensor_data(g, t),
                                 .supported = t->supported, .dtype = t->dtype,
                                 .dtype_name = type_name ? type_name : "?", .ndim = t->ndim,
                                 .numel = 1, .bytes = t->bytes};
        for (int d = 0; d < t->ndim; d++) {
            w->src.shape[d] = (int64_t)t->ne[t->ndim - 1 - d];
            w->src.numel *= t->ne[d];
        }
    }
    return 0;
}

/* Maps the checkpoint's safetensors file(s) and finds every wanted tensor. */
static int locate_tensors(load_state *st, kvd_error *err)
{
    char index_path[PATH_MAX], single_path[PATH_MAX];
    int rc;
    if ((rc = join_path(index_path, sizeof index_path, st->dir, "model.safetensors.index.json",
                        err)) < 0 ||
        (rc = join_path(single_path, sizeof single_path, st->dir, "model.safetensors", err)) < 0)
        return rc;
    char *text;
    size_t len;
    bool missing;
    rc = read_text_file(index_path, &text, &len, &missing, err);
    if (rc == 0) {
        rc = locate_sharded(st, index_path, text, len, err);
        free(text);
        return rc;
    }
    if (!missing)
        return rc;

    st->files = calloc(1, sizeof *st->files);
    if (!st->files)
        return kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", single_path);
    rc = kvd_st_file_open(&st->files[0], single_path, err);
    if (rc < 0) {
        if (rc == KVD_EIO && access(single_path, F_OK) != 0)
            kvd_error_set(err, KVD_EIO,
                          "%s: cannot open: %s (and no model.safetensors.index.json either)",
                          single_path, strerror(ENOENT));
        return rc;
    }
    st->num_files = 1;
    for (int i = 0; i < st->num_wanted; i++) {
        wanted_tensor *w = &st->wanted[i];
        const kvd_st_tensor *t = kvd_st_header_find(&st->files[0].header, w->name);
        if (!t)
            return kvd_error_set(err, KVD_EFORMAT, "%s: missing tensor %s", single_path, w->name);
        source_from_safetensors(w, &st->files[0], t);
    }
    return 0;
}

static void want_matrix(load_state *st, const char *name, int rows, int cols, kvd_matrix *dest)
{
    wanted_tensor *w = &st->wanted[st->num_wanted++];
    snprintf(w->name, sizeof w->name, "%s", name);
    w->rows = rows;
    w->cols = cols;
    w->matrix = dest;
}

static void want_vector(load_state *st, const char *name, int len, const float **dest)
{
    wanted_tensor *w = &st->wanted[st->num_wanted++];
    snprintf(w->name, sizeof w->name, "%s", name);
    w->rows = len;
    w->cols = 0;
    w->vector = dest;
}

/* The complete list of tensors a Qwen2 model of this config reads. */
static int list_wanted(load_state *st, kvd_model *model, kvd_error *err)
{
    const kvd_model_config *c = &model->config;
    int max = 3 + 12 * c->num_layers;
    st->wanted = calloc((size_t)max, sizeof *st->wanted);
    if (!st->wanted)
        return kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", st->dir);
    int q_dim = c->num_heads * c->head_dim, kv_dim = c->num_kv_heads * c->head_dim;
    want_matrix(st, "model.embed_tokens.weight", c->vocab_size, c->hidden_size,
                &model->embed_tokens);
    for (int i = 0; i < c->num_layers; i++) {
        kvd_layer_weights *l = &model->layers[i];
        char name[96];
#define LAYER_NAME(suffix) (snprintf(name, sizeof name, "model.layers.%d.%s", i, suffix), name)
        want_matrix(st, LAYER_NAME("self_attn.q_proj.weight"), q_dim, c->hidden_size, &l->q_proj);
        want_matrix(st, LAYER_NAME("self_attn.k_proj.weight"), kv_dim, c->hidden_size, &l->k_proj);
        want_matrix(st, LAYER_NAME("self_attn.v_proj.weight"), kv_dim, c->hidden_size, &l->v_proj);
        want_matrix(st, LAYER_NAME("self_attn.o_proj.weight"), c->hidden_size, q_dim, &l->o_proj);
        want_vector(st, LAYER_NAME("self_attn.q_proj.bias"), q_dim, &l->q_bias);
        want_vector(st, LAYER_NAME("self_attn.k_proj.bias"), kv_dim, &l->k_bias);
        want_vector(st, LAYER_NAME("self_attn.v_proj.bias"), kv_dim, &l->v_bias);
        want_matrix(st, LAYER_NAME("mlp.gate_proj.weight"), c->intermediate_size, c->hidden_size,
                    &l->gate_proj);
        want_matrix(st, LAYER_NAME("mlp.up_proj.weight"), c->intermediate_size, c->hidden_size,
                    &l->up_proj);
        want_matrix(st, LAYER_NAME("mlp.down_proj.weight"), c->hidden_size, c->intermediate_size,
                    &l->down_proj);
        want_vector(st, LAYER_NAME("input_layernorm.weight"), c->hidden_size, &l->input_norm);
        want_vector(st, LAYER_NAME("post_attention_layernorm.weight"), c->hidden_size,
                    &l->post_norm);
#undef LAYER_NAME
    }
    want_vector(st, "model.norm.weight", c->hidden_size, &model->final_norm);
    if (!c->tie_word_embeddings)
        want_matrix(st, "lm_head.weight", c->vocab_size, c->hidden_size, &model->lm_head);
    return 0;
}

static void format_shape(char *out, size_t cap, const tensor_source *t)
{
    size_t used = (size_t)snprintf(out, cap, "[");
    for (int d = 0; d < t->ndim && used < cap; d++)
        used += (size_t)snprintf(out + used, cap - used, d ? ", %lld" : "%lld",
                                 (long long)t->shape[d]);
    if (used < cap)
        snprintf(out + used, cap - used, "]");
}

/* Checks dtype and shape of every wanted tensor and plans the arena layout.
 * Returns the arena bytes needed in *arena_bytes. Matrices may differ in dtype (a
 * quantized GGUF mixes types; each product dispatches on its matrix's dtype). */
static int check_and_plan(load_state *st, kvd_model *model, size_t *arena_bytes,
                          uint64_t *source_bytes, kvd_error *err)
{
    size_t offset = 0;
    uint64_t source = 0;
    model->weight_bytes = 0;
    for (int i = 0; i < st->num_wanted; i++) {
        wanted_tensor *w = &st->wanted[i];
        const tensor_source *t = &w->src;
        bool is_matrix = w->cols > 0;
        if (!t->supported || (!is_matrix && kvd_dtype_is_quantized(t->dtype)))
            return kvd_error_set(err, KVD_EUNSUPPORTED,
                                 "%s: tensor %s has dtype %s, which kvd does not read%s",
                                 t->file_path, w->name, t->dtype_name,
                                 is_matrix ? "" : " for a vector (F32, F16 or BF16)");
        bool shape_ok = is_matrix ? t->ndim == 2 && t->shape[0] == w->rows && t->shape[1] == w->cols
                                  : t->ndim == 1 && t->shape[0] == w->rows;
        if (!shape_ok) {
            char have[160], want[64];
            format_shape(have, sizeof have, t);
            if (is_matrix)
                snprintf(want, sizeof want, "[%d, %d]", w->rows, w->cols);
            else
                snprintf(want, sizeof want, "[%d]", w->rows);
            return kvd_error_set(err, KVD_EFORMAT,
                                 "%s: tensor %s has shape %s but %s implies %s",
                                 t->file_path, w->name, have, st->config_name, want);
        }
        w->dtype = t->dtype;
        if (is_matrix && st->quantize) {
            char gguf_name[sizeof w->name];
            if (kvd_gguf_qwen2_name(w->name, gguf_name, sizeof gguf_name) < 0)
                memcpy(gguf_name, w->name, sizeof gguf_name); /* already the GGUF's name */
            w->dtype = kvd_gguf_mix_type(st->quantize, gguf_name, w->cols,
                                         model->config.num_layers,
                                         model->config.tie_word_embeddings);
        }
        if (is_matrix && kvd_dtype_is_quantized(w->dtype) && w->cols > KVD_QUANT_MAX_COLS)
            return kvd_error_set(err, KVD_EUNSUPPORTED,
                                 "%s: tensor %s: %d inputs per row is more than the %d the "
                                 "quantized products take",
                                 t->file_path, w->name, w->cols, KVD_QUANT_MAX_COLS);
        size_t bytes = is_matrix ? kvd_matrix_packed_bytes(w->dtype, w->rows, w->cols)
                                 : (size_t)t->numel * sizeof(float);
        w->arena_offset = offset;
        offset += (bytes + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
        source += t->bytes;
        model->weight_bytes += bytes;
    }
    *arena_bytes = offset;
    *source_bytes = source;
    return 0;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct progress {
    bool enabled;
    const char *dir;
    uint64_t total_bytes;
    uint64_t min_bytes;
    uint64_t done_bytes;
    int total_tensors;
    int next_percent;
} progress;

static void progress_advance(progress *p, uint64_t bytes, int tensors_done)
{
    p->done_bytes += bytes;
    if (!p->enabled || p->total_bytes == 0 || p->total_bytes < p->min_bytes)
        return;
    int percent = (int)(p->done_bytes * 100 / p->total_bytes);
    if (percent < p->next_percent || percent >= 100)
        return;
    fprintf(stderr, "kvd: loading %s: %3d%% (%.1f / %.1f MB, %d / %d tensors)\n", p->dir, percent,
            (double)p->done_bytes / 1e6, (double)p->total_bytes / 1e6, tensors_done,
            p->total_tensors);
    p->next_percent = (percent / PROGRESS_STEP_PERCENT + 1) * PROGRESS_STEP_PERCENT;
}

static void convert_to_f32(float *out, const uint8_t *src, const tensor_source *t)
{
    for (uint64_t i = 0; i < t->numel; i++) {
        if (t->dtype == KVD_DTYPE_F32) {
            memcpy(&out[i], src + 4 * i, 4);
        } else {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            out[i] = t->dtype == KVD_DTYPE_BF16 ? kvd_bf16_to_f32(h) : kvd_f16_to_f32(h);
        }
    }
}

int kvd_row_encode(kvd_dtype dtype, const float *src, void *dst, int64_t n)
{
    if (kvd_dtype_is_quantized(dtype))
        return kvd_quantize_row(dtype, src, dst, n) < 0 ? KVD_EINVAL : 0;
    uint8_t *out = dst;
    for (int64_t i = 0; i < n; i++) {
        if (dtype == KVD_DTYPE_F32) {
            memcpy(out + 4 * i, &src[i], 4);
        } else {
            uint16_t h = dtype == KVD_DTYPE_BF16 ? kvd_f32_to_bf16(src[i]) : kvd_f32_to_f16(src[i]);
            memcpy(out + 2 * i, &h, 2);
        }
    }
    return dtype == KVD_DTYPE_F32 || dtype == KVD_DTYPE_F16 || dtype == KVD_DTYPE_BF16 ? 0
                                                                                    : KVD_EINVAL;
}

/* Rows a converting thread takes at a time from the shared counter. */
#define CONVERT_ROWS_PER_TAKE 8

typedef struct convert_job {
    kvd_dtype dst_dtype, src_dtype;
    uint8_t *dst;
    const uint8_t *src;
    size_t dst_row, src_row;
    int64_t rows, cols;
    atomic_llong next;      /* next row to take */
    atomic_int failed;
} convert_job;

typedef struct convert_worker {
    convert_job *job;
    float *row;             /* cols floats, this thread's own */
} convert_worker;

static void *convert_rows_worker(void *arg)
{
    convert_worker *wk = arg;
    convert_job *j = wk->job;
    for (;;) {
        int64_t r0 = atomic_fetch_add(&j->next, CONVERT_ROWS_PER_TAKE);
        if (r0 >= j->rows)
            break;
        int64_t r1 = r0 + CONVERT_ROWS_PER_TAKE < j->rows ? r0 + CONVERT_ROWS_PER_TAKE : j->rows;
        for (int64_t r = r0; r < r1; r++)
            if (kvd_dequantize_row(j->src_dtype, j->src + (size_t)r * j->src_row, wk->row,
                                   j->cols) < 0 ||
                kvd_row_encode(j->dst_dtype, wk->row, j->dst + (size_t)r * j->dst_row, j->cols) < 0)
                atomic_store(&j->failed, 1);
    }
    return NULL;
}

int kvd_rows_convert(kvd_dtype dst_dtype, void *dst, kvd_dtype src_dtype, const void *src,
                     int64_t rows, int64_t cols, int threads)
{
    convert_job job = {.dst_dtype = dst_dtype, .src_dtype = src_dtype, .dst = dst, .src = src,
                       .dst_row = kvd_dtype_row_bytes(dst_dtype, cols),
                       .src_row = kvd_dtype_row_bytes(src_dtype, cols), .rows = rows,
                       .cols = cols};
    atomic_init(&job.next, 0);
    atomic_init(&job.failed, 0);
    int64_t takes = (rows + CONVERT_ROWS_PER_TAKE - 1) / CONVERT_ROWS_PER_TAKE;
    int n = threads < 1 ? 1 : threads > KVD_CONVERT_MAX_THREADS ? KVD_CONVERT_MAX_THREADS : threads;
    if (n > takes)
        n = takes < 1 ? 1 : (int)takes;
    convert_worker workers[KVD_CONVERT_MAX_THREADS];
    pthread_t tids[KVD_CONVERT_MAX_THREADS];
    int made = 0, started = 0, rc = 0;
    for (; made < n; made++) {
        workers[made] = (convert_worker){.job = &job, .row = malloc((size_t)cols * sizeof(float))};
        if (!workers[made].row)
            break;
    }
    if (made == 0)
        return KVD_ENOMEM;
    /* Threads that cannot start are not needed: the running ones take every row. */
    for (int i = 1; i < made; i++, started++)
        if (kvd_thread_start(&tids[started], convert_rows_worker, &workers[i]) != 0)
            break;
    convert_rows_worker(&workers[0]);
    for (int i = 0; i < started; i++)
        pthread_join(tids[i], NULL);
    for (int i = 0; i < made; i++)
        free(workers[i].row);
    if (atomic_load(&job.failed))
        rc = KVD_EINVAL;
    return rc;
}

/* Packs w converted to w->dtype: groups of panels (about COPY_CHUNK_BYTES of encoded
 * rows) are converted row by row by `threads` threads (kvd_rows_convert: llama.cpp's
 * reference quantizers, the same bytes for any thread count) into scratch rows, then
 * packed; packed panels are independent, so panel p goes to its own place. Returns
 * KVD_ENOMEM or 0. */
static int convert_matrix(const wanted_tensor *w, uint8_t *dst, int threads, progress *p,
                          int tensors_done)
{
    const tensor_source *t = &w->src;
    size_t src_row = kvd_dtype_row_bytes(t->dtype, w->cols);
    size_t dst_row = kvd_dtype_row_bytes(w->dtype, w->cols);
    size_t panel_bytes = kvd_matrix_packed_bytes(w->dtype, KVD_PANEL_ROWS, w->cols);
    int panels = kvd_matrix_panels(w->rows);
    int group = (int)(COPY_CHUNK_BYTES / (dst_row * KVD_PANEL_ROWS)) + 1;
    if (group > panels)
        group = panels;
    uint8_t *scratch = malloc(dst_row * KVD_PANEL_ROWS * (size_t)group);
    if (!scratch)
        return KVD_ENOMEM;
    for (int p0 = 0; p0 < panels; p0 += group) {
        int p1 = panels - p0 < group ? panels : p0 + group;
        int first = p0 * KVD_PANEL_ROWS;
        int n = (p1 * KVD_PANEL_ROWS < w->rows ? p1 * KVD_PANEL_ROWS : w->rows) - first;
        const uint8_t *src = t->data + (size_t)first * src_row;
        if (kvd_rows_convert(w->dtype, scratch, t->dtype, src, n, w->cols, threads) < 0) {
            free(scratch);
            return KVD_ENOMEM;
        }
        for (int pn = p0; pn < p1; pn++) {
            int rows = w->rows - pn * KVD_PANEL_ROWS < KVD_PANEL_ROWS ? w->rows - pn * KVD_PANEL_ROWS
                                                                     : KVD_PANEL_ROWS;
            kvd_matrix_pack(dst + (size_t)pn * panel_bytes, w->dtype, rows, w->cols,
                            scratch + (size_t)(pn - p0) * KVD_PANEL_ROWS * dst_row, 0, 1);
        }
        kvd_st_release_pages(src, (size_t)n * src_row);
        progress_advance(p, src_row * (uint64_t)n, tensors_done + (p1 == panels));
    }
    free(scratch);
    return 0;
}

static int copy_tensors(load_state *st, uint8_t *arena, int threads, progress *p, kvd_error *err)
{
    for (int i = 0; i < st->num_wanted; i++) {
        const wanted_tensor *w = &st->wanted[i];
        const tensor_source *t = &w->src;
        const uint8_t *src = t->data;
        uint8_t *dst = arena + w->arena_offset;
        if (w->cols > 0 && w->dtype != t->dtype) {
            if (convert_matrix(w, dst, threads, p, i) < 0)
                return kvd_error_set(err, KVD_ENOMEM, "%s: out of memory converting %s",
                                     st->dir, w->name);
            *w->matrix = (kvd_matrix){.dtype = w->dtype, .rows = w->rows, .cols = w->cols,
                                      .data = dst};
        } else if (w->cols > 0) {
            /* packed a few panels at a time so a huge embedding still reports smoothly */
            size_t panel_bytes = (size_t)KVD_PANEL_ROWS * kvd_dtype_row_bytes(t->dtype, w->cols);
            int panels = kvd_matrix_panels(w->rows);
            int step = (int)(COPY_CHUNK_BYTES / panel_bytes) + 1;
            for (int p0 = 0; p0 < panels; p0 += step) {
                int p1 = panels - p0 < step ? panels : p0 + step;
                kvd_matrix_pack(dst, t->dtype, w->rows, w->cols, src, p0, p1);
                uint64_t done = t->bytes * (uint64_t)p1 / (uint64_t)panels;
                uint64_t before = t->bytes * (uint64_t)p0 / (uint64_t)panels;
                kvd_st_release_pages(src + before, (size_t)(done - before));
                progress_advance(p, done - before, i + (p1 == panels));
            }
            *w->matrix = (kvd_matrix){.dtype = t->dtype, .rows = w->rows, .cols = w->cols,
                                      .data = dst};
        } else {
            convert_to_f32((float *)(void *)dst, src, t);
            kvd_st_release_pages(src, (size_t)t->bytes);
            *w->vector = (const float *)(const void *)dst;
            progress_advance(p, t->bytes, i + 1);
        }
    }
    return 0;
}

static void close_files(load_state *st)
{
    for (int i = 0; i < st->num_files; i++)
        kvd_st_file_close(&st->files[i]);
    free(st->files);
    st->files = NULL;
    st->num_files = 0;
    kvd_gguf_file_close(&st->gguf);
}

kvd_model *kvd_model_load(const char *dir, const kvd_model_load_options *opts, kvd_error *err)
{
    if (!dir) {
        kvd_error_set(err, KVD_EINVAL, "kvd_model_load: no checkpoint directory given");
        return NULL;
    }
    double start = now_seconds();
    load_state st = {.dir = dir};
    kvd_model *model = calloc(1, sizeof *model);
    model_impl *impl = calloc(1, sizeof *impl);
    char *dir_copy = strdup(dir);
    if (!model || !impl || !dir_copy) {
        kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", dir);
        free(model);
        free(impl);
        free(dir_copy);
        return NULL;
    }
    model->dir = dir_copy;
    model->impl = impl;

    char config_path[PATH_MAX];
    char *text = NULL;
    size_t len;
    int rc = kvd_gguf_resolve(dir, config_path, sizeof config_path, err);
    bool is_gguf = rc == 1;
    if (rc < 0)
        goto fail;
    if (opts && opts->quantize && !(st.quantize = kvd_gguf_mix_find(opts->quantize))) {
        kvd_error_set(err, KVD_EINVAL, "--quantize %s: not a known type (%s)", opts->quantize,
                      kvd_gguf_mix_names());
        goto fail;
    }
    if (is_gguf) {
        st.config_name = "the GGUF's qwen2.* keys";
        model->generation = neutral_generation;
        if ((rc = kvd_gguf_file_open(&st.gguf, config_path, err)) < 0 ||
            (rc = kvd_gguf_model_config(&st.gguf.gguf, config_path, &model->config,
                                        &model->chat_template, err)) < 0)
            goto fail;
    } else {
        st.config_name = "config.json";
        if ((rc = join_path(config_path, sizeof config_path, dir, "config.json", err)) < 0 ||
            (rc = read_text_file(config_path, &text, &len, NULL, err)) < 0)
            goto fail;
        rc = kvd_model_config_parse(text, len, config_path, &model->config, err);
        free(text);
        if (rc < 0 || (rc = load_generation_config(model, err)) < 0)
            goto fail;
    }

    model->layers = calloc((size_t)model->config.num_layers, sizeof *model->layers);
    if (!model->layers) {
        kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", dir);
        goto fail;
    }
    size_t arena_bytes = 0;
    uint64_t source_bytes = 0;
    if ((rc = list_wanted(&st, model, err)) < 0 ||
        (rc = is_gguf ? locate_gguf(&st, err) : locate_tensors(&st, err)) < 0 ||
        (rc = check_and_plan(&st, model, &arena_bytes, &source_bytes, err)) < 0)
        goto fail;

    impl->arena = kvd_huge_alloc(arena_bytes, &impl->arena_size);
    if (!impl->arena) {
        kvd_error_set(err, KVD_ENOMEM, "%s: cannot map %zu bytes for the weights: %s", dir,
                      arena_bytes, strerror(errno));
        goto fail;
    }
    progress prog = {.enabled = opts && opts->progress, .dir = dir, .total_bytes = source_bytes,
                     .min_bytes = opts ? opts->progress_min_bytes : 0,
                     .total_tensors = st.num_wanted, .next_percent = PROGRESS_STEP_PERCENT};
    if ((rc = copy_tensors(&st, impl->arena, opts ? opts->threads : 1, &prog, err)) < 0)
        goto fail;
    if (model->config.tie_word_embeddings)
        model->lm_head = model->embed_tokens;
    /* Weights never change after loading: a stray write should fault, not corrupt. */
    mprotect(impl->arena, impl->arena_size, PROT_READ);
    int num_files = is_gguf ? 1 : st.num_files;
    close_files(&st);
    free(st.wanted);
    if (prog.enabled)
        fprintf(stderr, "kvd: loaded %s: %d tensors from %d file%s, %.2f GB of %s weights in %.2f s\n",
                dir, prog.total_tensors, num_files, num_files == 1 ? "" : "s",
                (double)model->weight_bytes / 1e9,
                is_gguf ? "GGUF" : kvd_dtype_name(model->embed_tokens.dtype),
                now_seconds() - start);
    return model;

fail:
    close_files(&st);
    free(st.wanted);
    kvd_model_destroy(model);
    return NULL;
}

void kvd_model_destroy(kvd_model *model)
{
    if (!model)
        return;
    model_impl *impl = model->impl;
    if (impl)
        kvd_huge_free(impl->arena, impl->arena_size);
    free(impl);
    free(model->layers);
    free(model->dir);
    free(model->chat_template);
    free(model);
}
