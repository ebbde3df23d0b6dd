/* kvd-quantize - writes a Qwen2 checkpoint as a GGUF file of another tensor type.
 *
 *   kvd-quantize IN OUT.gguf --type T [--threads N]
 *
 * IN is a Hugging Face checkpoint directory (config.json, model.safetensors or shards,
 * tokenizer.json, tokenizer_config.json) or a qwen2 GGUF file. T is f32, f16, bf16, q8_0,
 * q4_0, q5_0, q4_k, q5_k, q6_k or llama.cpp's mixes q4_k_m / q5_k_m. 1-D tensors stay F32;
 * which type each matrix gets is llama-quantize's choice (kvd_gguf_mix_type). The
 * quantizers are llama.cpp's reference ones (kvd_quantize_row), so the values equal
 * llama-quantize's. The file carries the keys llama.cpp's qwen2 loader reads, the
 * tokenizer (tokenizer.ggml.*, as llama.cpp's converter writes it) and the chat template
 * of tokenizer_config.json; from a GGUF every key is copied except the file type.
 *
 * Rows are encoded by N threads (default: the online CPUs) a chunk at a time
 * (kvd_rows_convert: each row's bytes depend on that row alone, and the chunk is
 * written in row order), so the file is byte for byte the one a single thread writes. Source pages already read are dropped from
 * the process (kvd_st_release_pages): a 15 GB checkpoint does not stay resident.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvd/kvd_gguf.h"
#include "kvd/kvd_model.h"
#include "kvd/kvd_quant.h"
#include "kvd/kvd_safetensors.h"

/* One tensor to write: its source (a float or block row-major tensor) and its type. */
typedef struct out_tensor {
    char name[96];          /* GGUF name */
    int64_t rows, cols;     /* rows = 1 for vectors */
    bool matrix;
    kvd_dtype src_dtype, dtype;
    const uint8_t *src;
    uint64_t offset;
} out_tensor;

typedef struct source {
    kvd_st_file *st;        /* [num_st] */
    int num_st;
    kvd_gguf_file gguf;     /* when IN is a GGUF */
    bool is_gguf;
    kvd_model_config cfg;
    cJSON *tokenizer, *tokenizer_config;
    const char *dir;
} source;

static int die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("kvd-quantize: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 1;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    struct stat st;
    char *buf = NULL;
    if (fstat(fileno(f), &st) == 0 && (buf = malloc((size_t)st.st_size + 1)) &&
        fread(buf, 1, (size_t)st.st_size, f) == (size_t)st.st_size) {
        buf[st.st_size] = '\0';
        *len = (size_t)st.st_size;
    } else {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    return buf;
}

static cJSON *read_json(const char *dir, const char *file, bool required)
{
    char path[PATH_MAX];
    size_t len;
    snprintf(path, sizeof path, "%s/%s", dir, file);
    char *text = read_file(path, &len);
    if (!text) {
        if (required)
            die("%s: cannot read: %s", path, strerror(errno));
        return NULL;
    }
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    if (!root)
        die("%s: not valid JSON", path);
    return root;
}

/* ---- sources ---- */

static const kvd_st_tensor *st_find(source *s, const char *name, const kvd_st_file **file)
{
    for (int i = 0; i < s->num_st; i++) {
        const kvd_st_tensor *t = kvd_st_header_find(&s->st[i].header, name);
        if (t) {
            *file = &s->st[i];
            return t;
        }
    }
    return NULL;
}

static int open_hf(source *s, const char *dir)
{
    kvd_error err = {0};
    char path[PATH_MAX];
    size_t len;
    snprintf(path, sizeof path, "%s/config.json", dir);
    char *text = read_file(path, &len);
    if (!text)
        return die("%s: cannot read: %s", path, strerror(errno));
    int rc = kvd_model_config_parse(text, len, path, &s->cfg, &err);
    free(text);
    if (rc < 0)
        return die("%s", err.msg);
    cJSON *index = read_json(dir, "model.safetensors.index.json", false);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(index, "weight_map");
    int n = cJSON_IsObject(map) ? cJSON_GetArraySize(map) : 1;
    s->st = calloc((size_t)n, sizeof *s->st);
    if (!s->st)
        return die("out of memory");
    if (!cJSON_IsObject(map)) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        if (kvd_st_file_open(&s->st[0], path, &err) < 0)
            return die("%s", err.msg);
        s->num_st = 1;
    } else {
        const cJSON *e;
        cJSON_ArrayForEach(e, map) {
            if (!cJSON_IsString(e) || strchr(e->valuestring, '/'))
                return die("%s: bad weight_map entry", dir);
            snprintf(path, sizeof path, "%s/%s", dir, e->valuestring);
            bool open = false;
            for (int i = 0; i < s->num_st; i++)
                open = open || strcmp(s->st[i].path, path) == 0;
            if (!open && kvd_st_file_open(&s->st[s->num_st++], path, &err) < 0)
                return die("%s", err.msg);
        }
    }
    cJSON_Delete(index);
    s->tokenizer = read_json(dir, "tokenizer.json", true);
    s->tokenizer_config = read_json(dir, "tokenizer_config.json", false);
    return s->tokenizer ? 0 : 1;
}

/* ---- the tokenizer, as llama.cpp's converter writes it ---- */

static int token_id(const cJSON *tok, const cJSON *vocab, const cJSON *value)
{
    if (cJSON_IsObject(value))
        value = cJSON_GetObjectItemCaseSensitive(value, "content");
    if (!cJSON_IsString(value))
        return -1;
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(vocab, value->valuestring);
    if (cJSON_IsNumber(id))
        return (int)id->valuedouble;
    const cJSON *a;
    cJSON_ArrayForEach(a, cJSON_GetObjectItemCaseSensitive(tok, "added_tokens")) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(a, "content");
        if (cJSON_IsString(c) && strcmp(c->valuestring, value->valuestring) == 0)
            return (int)cJSON_GetObjectItemCaseSensitive(a, "id")->valuedouble;
    }
    return -1;
}

static int write_tokenizer(kvd_gguf_writer *w, const source *s)
{
    int n = s->cfg.vocab_size;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(s->tokenizer, "model");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges))
        return die("%s: tokenizer.json has no BPE vocab and merges", s->dir);
    char **tokens = calloc((size_t)n, sizeof *tokens);
    int32_t *types = calloc((size_t)n, sizeof *types);
    int num_merges = cJSON_GetArraySize(merges);
    char **merge_text = calloc((size_t)num_merges + 1, sizeof *merge_text);
    int rc = 0;
    if (!tokens || !types || !merge_text) {
        rc = die("out of memory");
        goto done;
    }
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab) {
        int id = cJSON_IsNumber(e) ? (int)e->valuedouble : -1;
        if (id >= 0 && id < n) {
            tokens[id] = e->string;
            types[id] = 1; /* NORMAL */
        }
    }
    cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(s->tokenizer, "added_tokens")) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(e, "content");
        if (cJSON_IsNumber(id) && cJSON_IsString(c) && id->valuedouble >= 0 && id->valuedouble < n) {
            tokens[(int)id->valuedouble] = c->valuestring;
            types[(int)id->valuedouble] = 3; /* CONTROL, as llama.cpp writes Qwen2's */
        }
    }
    char pad[32];
    char **pads = calloc((size_t)n, sizeof *pads);
    if (!pads) {
        rc = die("out of memory");
        goto done;
    }
    for (int i = 0; i < n; i++) {
        if (!tokens[i]) {
            snprintf(pad, sizeof pad, "[PAD%d]", i);
            pads[i] = strdup(pad);
            tokens[i] = pads[i];
            types[i] = 5; /* UNUSED */
        }
    }
    int m = 0;
    cJSON_ArrayForEach(e, merges) {
        if (cJSON_IsString(e)) {
            merge_text[m] = strdup(e->valuestring);
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2) {
            const char *a = cJSON_GetArrayItem(e, 0)->valuestring, *b = cJSON_GetArrayItem(e, 1)->valuestring;
            size_t len = strlen(a) + strlen(b) + 2;
            merge_text[m] = malloc(len);
            if (merge_text[m])
                snprintf(merge_text[m], len, "%s %s", a, b);
        }
        if (!merge_text[m]) {
            rc = die("tokenizer.json: merge %d is not a pair", m);
            break;
        }
        m++;
    }
    if (rc == 0) {
        kvd_gguf_write_string(w, "tokenizer.ggml.model", "gpt2");
        kvd_gguf_write_string(w, "tokenizer.ggml.pre", "qwen2");
        kvd_gguf_write_string_array(w, "tokenizer.ggml.tokens", (const char *const *)tokens, NULL,
                                    (uint64_t)n);
        kvd_gguf_write_i32_array(w, "tokenizer.ggml.token_type", types, (uint64_t)n);
        kvd_gguf_write_string_array(w, "tokenizer.ggml.merges", (const char *const *)merge_text,
                                    NULL, (uint64_t)m);
        const cJSON *tc = s->tokenizer_config;
        int eos = token_id(s->tokenizer, vocab, cJSON_GetObjectItemCaseSensitive(tc, "eos_token"));
        if (eos < 0 && s->cfg.num_eos_token_ids > 0)
            eos = s->cfg.eos_token_ids[0];
        int padding = token_id(s->tokenizer, vocab, cJSON_GetObjectItemCaseSensitive(tc, "pad_token"));
        if (eos >= 0)
            kvd_gguf_write_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)eos);
        if (padding >= 0)
            kvd_gguf_write_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)padding);
        if (s->cfg.bos_token_id >= 0)
            kvd_gguf_write_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)s->cfg.bos_token_id);
        kvd_gguf_write_bool(w, "tokenizer.ggml.add_bos_token",
                            cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(tc, "add_bos_token")));
        const cJSON *tmpl = cJSON_GetObjectItemCaseSensitive(tc, "chat_template");
        if (cJSON_IsString(tmpl))
            kvd_gguf_write_string(w, "tokenizer.chat_template", tmpl->valuestring);
    }
    for (int i = 0; i < n; i++)
        free(pads[i]);
    free(pads);
done:
    for (int i = 0; merge_text && i < num_merges; i++)
        free(merge_text[i]);
    free(merge_text);
    free(tokens);
    free(types);
    return rc;
}

static void write_hparams(kvd_gguf_writer *w, const kvd_model_config *c, const char *name)
{
    kvd_gguf_write_string(w, "general.architecture", "qwen2");
    kvd_gguf_write_string(w, "general.type", "model");
    kvd_gguf_write_string(w, "general.name", name);
    kvd_gguf_write_u32(w, "qwen2.block_count", (uint32_t)c->num_layers);
    kvd_gguf_write_u32(w, "qwen2.context_length", (uint32_t)c->max_position_embeddings);
    kvd_gguf_write_u32(w, "qwen2.embedding_length", (uint32_t)c->hidden_size);
    kvd_gguf_write_u32(w, "qwen2.feed_forward_length", (uint32_t)c->intermediate_size);
    kvd_gguf_write_u32(w, "qwen2.attention.head_count", (uint32_t)c->num_heads);
    kvd_gguf_write_u32(w, "qwen2.attention.head_count_kv", (uint32_t)c->num_kv_heads);
    kvd_gguf_write_f32(w, "qwen2.rope.freq_base", c->rope_theta);
    kvd_gguf_write_f32(w, "qwen2.attention.layer_norm_rms_epsilon", c->rms_norm_eps);
}

/* ---- tensors ---- */

static int plan(source *s, const kvd_gguf_mix *tg, out_tensor **out, int *count)
{
    const kvd_model_config *c = &s->cfg;
    int max = 3 + 12 * c->num_layers, n = 0;
    out_tensor *ts = calloc((size_t)max, sizeof *ts);
    if (!ts)
        return die("out of memory");
    static const char *const per_layer[] = {
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
        "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
        "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
    };
    for (int i = -1; i <= c->num_layers; i++) {
        int k_max = i < 0 || i == c->num_layers ? 2 : 12;
        for (int k = 0; k < k_max; k++) {
            char hf[96];
            if (i < 0)
                snprintf(hf, sizeof hf, "%s", k == 0 ? "model.embed_tokens.weight" : "model.norm.weight");
            else if (i == c->num_layers && k == 0 && !c->tie_word_embeddings)
                snprintf(hf, sizeof hf, "lm_head.weight");
            else if (i == c->num_layers)
                continue;
            else
                snprintf(hf, sizeof hf, "model.layers.%d.%s", i, per_layer[k]);
            out_tensor *t = &ts[n];
            if (kvd_gguf_qwen2_name(hf, t->name, sizeof t->name) < 0)
                return die("no GGUF name for %s", hf);
            int ndim;
            int64_t shape[2];
            if (s->is_gguf) {
                const kvd_gguf_tensor *g = kvd_gguf_find_tensor(&s->gguf.gguf, t->name);
                if (!g || !g->supported || g->ndim > 2)
                    return die("%s: tensor %s is missing or of a type kvd does not read",
                               s->dir, t->name);
                ndim = g->ndim;
                shape[0] = ndim == 2 ? (int64_t)g->ne[1] : (int64_t)g->ne[0];
                shape[1] = (int64_t)g->ne[0];
                t->src_dtype = g->dtype;
                t->src = kvd_gguf_tensor_data(&s->gguf.gguf, g);
            } else {
                const kvd_st_file *f;
                const kvd_st_tensor *st = st_find(s, hf, &f);
                if (!st || !st->supported || st->ndim > 2)
                    return die("%s: tensor %s is missing or not BF16/F16/F32", s->dir, hf);
                ndim = st->ndim;
                shape[0] = st->shape[0];
                shape[1] = ndim == 2 ? st->shape[1] : st->shape[0];
                t->src_dtype = st->dtype;
                t->src = kvd_st_tensor_data(f, st);
            }
            t->matrix = ndim == 2;
            t->rows = t->matrix ? shape[0] : 1;
            t->cols = shape[1];
            t->dtype = t->matrix ? kvd_gguf_mix_type(tg, t->name, t->cols, c->num_layers,
                                                     c->tie_word_embeddings)
                                 : KVD_DTYPE_F32;
            n++;
        }
    }
    *out = ts;
    *count = n;
    return 0;
}

/* Output bytes encoded per chunk: large enough that starting the threads is noise,
 * small enough to stay a few tens of MB. */
#define CHUNK_BYTES ((size_t)32 << 20)

/* Writes one tensor's rows in its target type, a chunk at a time converted by `threads`
 * threads (kvd_rows_convert) into out (CHUNK_BYTES, or one row if that is larger). */
static int write_tensor(FILE *f, const out_tensor *t, int threads, uint8_t *out)
{
    size_t src_row = kvd_dtype_row_bytes(t->src_dtype, t->cols);
    size_t dst_row = kvd_dtype_row_bytes(t->dtype, t->cols);
    int64_t rows_per_chunk = (int64_t)(CHUNK_BYTES / dst_row);
    if (rows_per_chunk < 1)
        rows_per_chunk = 1;
    for (int64_t first = 0; first < t->rows; first += rows_per_chunk) {
        int64_t count = t->rows - first < rows_per_chunk ? t->rows - first : rows_per_chunk;
        const uint8_t *in = t->src + (size_t)first * src_row;
        size_t bytes = (size_t)count * dst_row;
        if (t->src_dtype == t->dtype) { /* same type: the bytes as they are */
            if (fwrite(in, 1, bytes, f) != bytes)
                return -1;
        } else if (kvd_rows_convert(t->dtype, out, t->src_dtype, in, count, t->cols, threads) < 0 ||
                   fwrite(out, 1, bytes, f) != bytes) {
            return -1;
        }
        kvd_st_release_pages(in, (size_t)count * src_row);
    }
    return 0;
}

static const char *base_name(const char *path)
{
    size_t len = strlen(path);
    while (len > 1 && path[len - 1] == '/')
        len--;
    const char *slash = memrchr(path, '/', len - 1);
    return slash ? slash + 1 : path;
}

int main(int argc, char **argv)
{
    const char *in = NULL, *out = NULL, *type = NULL, *threads_arg = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--type") == 0 && i + 1 < argc)
            type = argv[++i];
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads_arg = argv[++i];
        else if (strncmp(argv[i], "--threads=", 10) == 0)
            threads_arg = argv[i] + 10;
        else if (strncmp(argv[i], "--type=", 7) == 0)
            type = argv[i] + 7;
        else if (argv[i][0] == '-')
            in = out = NULL, i = argc;
        else if (!in)
            in = argv[i];
        else if (!out)
            out = argv[i];
        else
            in = out = NULL, i = argc;
    }
    const kvd_gguf_mix *tg = kvd_gguf_mix_find(type);
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    long nthreads = online < 1 ? 1 : online > KVD_CONVERT_MAX_THREADS ? KVD_CONVERT_MAX_THREADS : online;
    char *end = NULL;
    if (threads_arg) {
        errno = 0;
        nthreads = strtol(threads_arg, &end, 10);
    }
    bool threads_ok = !threads_arg || (errno == 0 && end != threads_arg && *end == '\0' &&
                                       nthreads >= 1 && nthreads <= KVD_CONVERT_MAX_THREADS);
    if (!in || !out || !tg || !threads_ok) {
        fprintf(stderr, "usage: kvd-quantize IN OUT.gguf --type T [--threads N]\n"
                        "  IN: a Hugging Face Qwen2 checkpoint directory or a qwen2 GGUF file\n"
                        "  T: %s\n"
                        "  N: encoding threads, 1-%d (default: the online CPUs); the file is\n"
                        "     the same for every N\n", kvd_gguf_mix_names(), KVD_CONVERT_MAX_THREADS);
        return 2;
    }
    source s = {.dir = in};
    kvd_error err = {0};
    char gguf_path[PATH_MAX];
    int found = kvd_gguf_resolve(in, gguf_path, sizeof gguf_path, &err);
    if (found < 0)
        return die("%s", err.msg);
    if (found == 1) {
        s.is_gguf = true;
        kvd_model *probe = kvd_model_load(gguf_path, NULL, &err); /* every check, once */
        if (!probe)
            return die("%s", err.msg);
        s.cfg = probe->config;
        kvd_model_destroy(probe);
        if (kvd_gguf_file_open(&s.gguf, gguf_path, &err) < 0)
            return die("%s", err.msg);
    } else if (open_hf(&s, in) != 0) {
        return 1;
    }

    kvd_gguf_writer w;
    kvd_gguf_writer_init(&w);
    if (s.is_gguf) {
        for (uint64_t i = 0; i < s.gguf.gguf.num_kvs; i++) {
            const kvd_gguf_kv *kv = &s.gguf.gguf.kvs[i];
            if (strcmp(kv->key, "general.file_type") != 0 && strcmp(kv->key, "general.alignment") != 0 &&
                strcmp(kv->key, "general.quantization_version") != 0)
                kvd_gguf_write_kv_copy(&w, kv);
        }
    } else {
        write_hparams(&w, &s.cfg, base_name(in));
        if (write_tokenizer(&w, &s) != 0)
            return 1;
    }
    kvd_gguf_write_u32(&w, "general.file_type", tg->ftype);
    kvd_gguf_write_u32(&w, "general.quantization_version", 2);

    out_tensor *ts = NULL;
    int n = 0;
    if (plan(&s, tg, &ts, &n) != 0)
        return 1;
    int64_t max_cols = 0;
    for (int i = 0; i < n; i++) {
        ts[i].offset = kvd_gguf_write_tensor_info(
            &w, ts[i].name, kvd_gguf_ggml_type(ts[i].dtype), ts[i].matrix ? 2 : 1,
            (const uint64_t[]){(uint64_t)ts[i].cols, (uint64_t)ts[i].rows},
            (uint64_t)kvd_dtype_row_bytes(ts[i].dtype, ts[i].cols) * (uint64_t)ts[i].rows);
        max_cols = ts[i].cols > max_cols ? ts[i].cols : max_cols;
    }
    const uint8_t *header;
    size_t header_len;
    if (kvd_gguf_writer_finish(&w, &header, &header_len, &err) < 0)
        return die("%s", err.msg);
    FILE *f = fopen(out, "wb");
    if (!f)
        return die("%s: cannot create: %s", out, strerror(errno));
    size_t max_row_bytes = (size_t)max_cols * 4; /* no type takes more than f32 */
    uint8_t *chunk = malloc(CHUNK_BYTES > max_row_bytes ? CHUNK_BYTES : max_row_bytes);
    int rc = chunk && fwrite(header, 1, header_len, f) == header_len ? 0 : -1;
    uint64_t written = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        static const uint8_t zeros[64];
        if (written < ts[i].offset)
            rc = fwrite(zeros, 1, (size_t)(ts[i].offset - written), f) ==
                         (size_t)(ts[i].offset - written) ? 0 : -1;
        if (rc == 0)
            rc = write_tensor(f, &ts[i], (int)nthreads, chunk);
        written = ts[i].offset + kvd_dtype_row_bytes(ts[i].dtype, ts[i].cols) * (uint64_t)ts[i].rows;
    }
    if (fclose(f) != 0 || rc != 0) {
        remove(out);
        return die("%s: write failed", out);
    }
    int counts[KVD_DTYPE_COUNT] = {0};
    for (int i = 0; i < n; i++)
        counts[ts[i].dtype]++;
    fprintf(stderr, "kvd-quantize: wrote %s (%s, %ld thread%s):", out, tg->name, nthreads,
            nthreads == 1 ? "" : "s");
    for (int d = 0; d < KVD_DTYPE_COUNT; d++)
        if (counts[d])
            fprintf(stderr, " %d %s", counts[d], kvd_dtype_name((kvd_dtype)d));
    fputc('\n', stderr);
    free(chunk);
    free(ts);
    kvd_gguf_writer_deinit(&w);
    for (int i = 0; i < s.num_st; i++)
        kvd_st_file_close(&s.st[i]);
    free(s.st);
    kvd_gguf_file_close(&s.gguf);
    cJSON_Delete(s.tokenizer);
    cJSON_Delete(s.tokenizer_config);
    return 0;
}
