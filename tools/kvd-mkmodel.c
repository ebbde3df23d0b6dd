/* kvd-mkmodel.c - writes a complete Qwen2 checkpoint directory with seeded random weights.
 *
 * Fixtures for tests and benchmarks: the same files a Hugging Face Qwen2 checkpoint
 * has (config.json, generation_config.json, model.safetensors or shards + index,
 * tokenizer.json, tokenizer_config.json) in real safetensors format, so the loader
 * and the numpy reference read them exactly as they would read a published model.
 *
 * Weights: every tensor draws from its own generator, seeded from --seed and the
 * tensor's name (splitmix64 stream, polar Box-Muller normals), so values do not depend on
 * the dtype, the sharding or the order of writing, and the bytes are identical from
 * run to run. Scales keep activations O(1) through the layers so the logits depend
 * on the whole context: embeddings N(0, 0.05), projections N(0, 1/fan_in), norm
 * weights 1 + N(0, 0.1), biases N(0, 0.1). Values are drawn in float32 and rounded
 * once to the output dtype (round to nearest even).
 *
 * Streaming: each file's header is computed up front from the shapes, then tensors
 * are generated and written a chunk at a time, so even the 494M-parameter preset
 * needs a few MB of memory. Files are written under a temporary name and renamed
 * when complete, so an interrupted run never leaves a plausible-looking checkpoint.
 */
#include "kvd/kvd_half.h"
#include "kvd/kvd_model.h"
#include "kvd/kvd_safetensors.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHUNK_ELEMS 65536
#define MAX_SHARDS 99

typedef struct preset {
    const char *name;
    int vocab_size;
    int hidden_size;
    int intermediate_size;
    int num_layers;
    int num_heads;
    int num_kv_heads;
    int max_position_embeddings;
    int max_window_layers;
    double rope_theta;
    double rms_norm_eps;
    bool tie_word_embeddings;
} preset;

/* qwen2.5-*: the published Qwen2.5-{0.5B,1.5B,7B}-Instruct config.json, value for value
 * (7B is untied, with 152,064 embedding rows: more than the tokenizer's ids). */
static const preset presets[] = {
    {"tiny", 151936, 64, 128, 2, 4, 2, 4096, 2, 1000000.0, 1e-6, true},
    {"qwen2.5-0.5b", 151936, 896, 4864, 24, 14, 2, 32768, 21, 1000000.0, 1e-6, true},
    {"qwen2.5-1.5b", 151936, 1536, 8960, 28, 12, 2, 32768, 21, 1000000.0, 1e-6, true},
    {"qwen2.5-7b", 152064, 3584, 18944, 28, 28, 4, 32768, 28, 1000000.0, 1e-6, false},
};

/* Published generation_config.json of Qwen2.5-0.5B-Instruct (used for every preset). */
#define GEN_TEMPERATURE "0.7"
#define GEN_TOP_P "0.8"
#define GEN_TOP_K 20
#define GEN_REPETITION_PENALTY "1.1"
#define QWEN_ENDOFTEXT_ID 151643
#define QWEN_IM_END_ID 151645

typedef enum init_kind { INIT_EMBED, INIT_PROJ, INIT_NORM, INIT_BIAS } init_kind;

typedef struct tensor_plan {
    char name[96];
    int ndim;
    int64_t shape[2];
    init_kind init;
    int shard;
} tensor_plan;

typedef struct options {
    const char *out_dir;
    const preset *preset;
    kvd_dtype dtype;
    uint64_t seed;
    int shards;
    const char *tokenizer;
} options;

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t fnv1a64(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
    return h;
}

/* Standard normals by Marsaglia's polar form of Box-Muller (no sin/cos: the 0.5b
 * preset draws 494M of them), two per accepted draw; the spare waits for the next call. */
typedef struct normal_rng {
    uint64_t state;
    bool has_spare;
    float spare;
} normal_rng;

static float next_normal(normal_rng *rng)
{
    if (rng->has_spare) {
        rng->has_spare = false;
        return rng->spare;
    }
    for (;;) {
        uint64_t bits = splitmix64(&rng->state);
        /* Two 24-bit uniforms in [-1, 1): plenty of resolution for fixtures. */
        float x = (float)(bits >> 40) * (2.0f / 16777216.0f) - 1.0f;
        float y = (float)((bits >> 8) & 0xffffff) * (2.0f / 16777216.0f) - 1.0f;
        float q = x * x + y * y;
        if (q >= 1.0f || q == 0.0f)
            continue;
        float scale = sqrtf(-2.0f * logf(q) / q);
        rng->spare = y * scale;
        rng->has_spare = true;
        return x * scale;
    }
}

static int64_t plan_numel(const tensor_plan *t)
{
    return t->ndim == 2 ? t->shape[0] * t->shape[1] : t->shape[0];
}

static void add_tensor(tensor_plan *plans, int *n, const char *name, int64_t rows, int64_t cols,
                       init_kind init)
{
    tensor_plan *t = &plans[(*n)++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = cols ? 2 : 1;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->init = init;
}

/* The tensors of a Qwen2ForCausalLM, in the order Hugging Face lists its modules. */
static int plan_tensors(const preset *p, tensor_plan *plans)
{
    int n = 0;
    int64_t hidden = p->hidden_size, head_dim = p->hidden_size / p->num_heads;
    int64_t q_dim = p->num_heads * head_dim, kv_dim = p->num_kv_heads * head_dim;
    char name[96];
    add_tensor(plans, &n, "model.embed_tokens.weight", p->vocab_size, hidden, INIT_EMBED);
    for (int i = 0; i < p->num_layers; i++) {
#define LAYER(suffix) (snprintf(name, sizeof name, "model.layers.%d.%s", i, suffix), name)
        add_tensor(plans, &n, LAYER("self_attn.q_proj.weight"), q_dim, hidden, INIT_PROJ);
        add_tensor(plans, &n, LAYER("self_attn.q_proj.bias"), q_dim, 0, INIT_BIAS);
        add_tensor(plans, &n, LAYER("self_attn.k_proj.weight"), kv_dim, hidden, INIT_PROJ);
        add_tensor(plans, &n, LAYER("self_attn.k_proj.bias"), kv_dim, 0, INIT_BIAS);
        add_tensor(plans, &n, LAYER("self_attn.v_proj.weight"), kv_dim, hidden, INIT_PROJ);
        add_tensor(plans, &n, LAYER("self_attn.v_proj.bias"), kv_dim, 0, INIT_BIAS);
        add_tensor(plans, &n, LAYER("self_attn.o_proj.weight"), hidden, q_dim, INIT_PROJ);
        add_tensor(plans, &n, LAYER("mlp.gate_proj.weight"), p->intermediate_size, hidden,
                   INIT_PROJ);
        add_tensor(plans, &n, LAYER("mlp.up_proj.weight"), p->intermediate_size, hidden,
                   INIT_PROJ);
        add_tensor(plans, &n, LAYER("mlp.down_proj.weight"), hidden, p->intermediate_size,
                   INIT_PROJ);
        add_tensor(plans, &n, LAYER("input_layernorm.weight"), hidden, 0, INIT_NORM);
        add_tensor(plans, &n, LAYER("post_attention_layernorm.weight"), hidden, 0, INIT_NORM);
#undef LAYER
    }
    add_tensor(plans, &n, "model.norm.weight", hidden, 0, INIT_NORM);
    if (!p->tie_word_embeddings)
        add_tensor(plans, &n, "lm_head.weight", p->vocab_size, hidden, INIT_PROJ);
    return n;
}

/* Splits tensors, in order, into shards of roughly equal bytes, none empty. */
static void assign_shards(tensor_plan *plans, int n, int shards, size_t elem_size)
{
    uint64_t total = 0;
    for (int i = 0; i < n; i++)
        total += (uint64_t)plan_numel(&plans[i]) * elem_size;
    uint64_t before = 0;
    int shard = 0, in_shard = 0;
    for (int i = 0; i < n; i++) {
        bool full = before >= total * (uint64_t)(shard + 1) / (uint64_t)shards;
        bool others_need_rest = n - i <= shards - 1 - shard;
        if (in_shard > 0 && shard < shards - 1 && (full || others_need_rest)) {
            shard++;
            in_shard = 0;
        }
        plans[i].shard = shard;
        in_shard++;
        before += (uint64_t)plan_numel(&plans[i]) * elem_size;
    }
}

static float init_value(const tensor_plan *t, normal_rng *rng)
{
    float z = next_normal(rng);
    switch (t->init) {
    case INIT_EMBED: return 0.05f * z;
    case INIT_PROJ: return z / sqrtf((float)t->shape[1]);
    case INIT_NORM: return 1.0f + 0.1f * z;
    case INIT_BIAS: return 0.1f * z;
    }
    return 0;
}

static int write_tensor_data(FILE *f, const tensor_plan *t, kvd_dtype dtype, uint64_t seed,
                             const char *path)
{
    normal_rng rng = {.state = seed * 0x9e3779b97f4a7c15ull ^ fnv1a64(t->name)};
    union {
        float f32[CHUNK_ELEMS];
        uint16_t u16[CHUNK_ELEMS];
    } *buf = malloc(sizeof *buf);
    if (!buf) {
        fprintf(stderr, "kvd-mkmodel: %s: out of memory\n", path);
        return -1;
    }
    int64_t numel = plan_numel(t);
    for (int64_t done = 0; done < numel;) {
        int n = numel - done < CHUNK_ELEMS ? (int)(numel - done) : CHUNK_ELEMS;
        for (int i = 0; i < n; i++) {
            float v = init_value(t, &rng);
            if (dtype == KVD_DTYPE_F32)
                buf->f32[i] = v;
            else
                buf->u16[i] = dtype == KVD_DTYPE_BF16 ? kvd_f32_to_bf16(v) : kvd_f32_to_f16(v);
        }
        if (fwrite(buf, kvd_dtype_size(dtype), (size_t)n, f) != (size_t)n) {
            fprintf(stderr, "kvd-mkmodel: %s: write failed: %s\n", path, strerror(errno));
            free(buf);
            return -1;
        }
        done += n;
    }
    free(buf);
    return 0;
}

/* Closes f and renames tmp_path to path; reports and returns -1 on any failure. */
static int finish_file(FILE *f, const char *tmp_path, const char *path)
{
    bool ok = !ferror(f);
    if (fclose(f) != 0)
        ok = false;
    if (!ok) {
        fprintf(stderr, "kvd-mkmodel: %s: write failed: %s\n", tmp_path, strerror(errno));
        unlink(tmp_path);
        return -1;
    }
    if (rename(tmp_path, path) != 0) {
        fprintf(stderr, "kvd-mkmodel: %s: cannot rename to %s: %s\n", tmp_path, path,
                strerror(errno));
        unlink(tmp_path);
        return -1;
    }
    return 0;
}

static FILE *open_tmp(const char *path, char *tmp_path, size_t cap)
{
    if ((size_t)snprintf(tmp_path, cap, "%s.tmp", path) >= cap) {
        fprintf(stderr, "kvd-mkmodel: %s: path too long\n", path);
        return NULL;
    }
    FILE *f = fopen(tmp_path, "wb");
    if (!f)
        fprintf(stderr, "kvd-mkmodel: %s: cannot create: %s\n", tmp_path, strerror(errno));
    return f;
}

static int write_shard(const options *o, const tensor_plan *plans, int n, int shard,
                       const char *path)
{
    kvd_st_spec *specs = calloc((size_t)n, sizeof *specs);
    if (!specs) {
        fprintf(stderr, "kvd-mkmodel: out of memory\n");
        return -1;
    }
    int count = 0;
    for (int i = 0; i < n; i++) {
        if (plans[i].shard != shard)
            continue;
        kvd_st_spec *s = &specs[count++];
        s->name = plans[i].name;
        s->dtype = o->dtype;
        s->ndim = plans[i].ndim;
        s->shape[0] = plans[i].shape[0];
        s->shape[1] = plans[i].shape[1];
    }
    char *header;
    size_t header_len;
    kvd_error err = {0};
    int rc = kvd_st_header_build(specs, count, &header, &header_len, NULL, &err);
    free(specs);
    if (rc < 0) {
        fprintf(stderr, "kvd-mkmodel: %s: %s\n", path, err.msg);
        return -1;
    }
    char tmp_path[PATH_MAX];
    FILE *f = open_tmp(path, tmp_path, sizeof tmp_path);
    if (!f) {
        free(header);
        return -1;
    }
    setvbuf(f, NULL, _IOFBF, 1 << 20);
    rc = fwrite(header, 1, header_len, f) == header_len ? 0 : -1;
    free(header);
    for (int i = 0; i < n && rc == 0; i++)
        if (plans[i].shard == shard)
            rc = write_tensor_data(f, &plans[i], o->dtype, o->seed, tmp_path);
    if (rc < 0) {
        fclose(f);
        unlink(tmp_path);
        return -1;
    }
    return finish_file(f, tmp_path, path);
}

static int compare_plan_names(const void *a, const void *b)
{
    return strcmp((*(const tensor_plan *const *)a)->name, (*(const tensor_plan *const *)b)->name);
}

static int write_index(const options *o, tensor_plan *plans, int n, const char *path)
{
    const tensor_plan **sorted = malloc((size_t)n * sizeof *sorted);
    if (!sorted) {
        fprintf(stderr, "kvd-mkmodel: out of memory\n");
        return -1;
    }
    uint64_t total = 0;
    for (int i = 0; i < n; i++) {
        sorted[i] = &plans[i];
        total += (uint64_t)plan_numel(&plans[i]) * kvd_dtype_size(o->dtype);
    }
    qsort(sorted, (size_t)n, sizeof *sorted, compare_plan_names);
    char tmp_path[PATH_MAX];
    FILE *f = open_tmp(path, tmp_path, sizeof tmp_path);
    if (!f) {
        free(sorted);
        return -1;
    }
    fprintf(f, "{\n  \"metadata\": {\n    \"total_size\": %llu\n  },\n  \"weight_map\": {\n",
            (unsigned long long)total);
    for (int i = 0; i < n; i++)
        fprintf(f, "    \"%s\": \"model-%05d-of-%05d.safetensors\"%s\n", sorted[i]->name,
                sorted[i]->shard + 1, o->shards, i + 1 < n ? "," : "");
    fprintf(f, "  }\n}\n");
    free(sorted);
    return finish_file(f, tmp_path, path);
}

static int write_config(const options *o, const char *path)
{
    const preset *p = o->preset;
    char tmp_path[PATH_MAX];
    FILE *f = open_tmp(path, tmp_path, sizeof tmp_path);
    if (!f)
        return -1;
    static const char *torch_names[] = {"float32", "float16", "bfloat16"};
    fprintf(f,
            "{\n"
            "  \"architectures\": [\n    \"Qwen2ForCausalLM\"\n  ],\n"
            "  \"attention_dropout\": 0.0,\n"
            "  \"bos_token_id\": %d,\n"
            "  \"eos_token_id\": %d,\n"
            "  \"hidden_act\": \"silu\",\n"
            "  \"hidden_size\": %d,\n"
            "  \"initializer_range\": 0.02,\n"
            "  \"intermediate_size\": %d,\n"
            "  \"max_position_embeddings\": %d,\n"
            "  \"max_window_layers\": %d,\n"
            "  \"model_type\": \"qwen2\",\n"
            "  \"num_attention_heads\": %d,\n"
            "  \"num_hidden_layers\": %d,\n"
            "  \"num_key_value_heads\": %d,\n"
            "  \"rms_norm_eps\": %g,\n"
            "  \"rope_theta\": %.1f,\n"
            "  \"sliding_window\": %d,\n"
            "  \"tie_word_embeddings\": %s,\n"
            "  \"torch_dtype\": \"%s\",\n"
            "  \"transformers_version\": \"4.43.1\",\n"
            "  \"use_cache\": true,\n"
            "  \"use_sliding_window\": false,\n"
            "  \"vocab_size\": %d\n"
            "}\n",
            QWEN_ENDOFTEXT_ID, QWEN_IM_END_ID, p->hidden_size, p->intermediate_size,
            p->max_position_embeddings, p->max_window_layers, p->num_heads, p->num_layers,
            p->num_kv_heads, p->rms_norm_eps, p->rope_theta, p->max_position_embeddings,
            p->tie_word_embeddings ? "true" : "false", torch_names[o->dtype], p->vocab_size);
    return finish_file(f, tmp_path, path);
}

static int write_generation_config(const char *path)
{
    char tmp_path[PATH_MAX];
    FILE *f = open_tmp(path, tmp_path, sizeof tmp_path);
    if (!f)
        return -1;
    fprintf(f,
            "{\n"
            "  \"bos_token_id\": %d,\n"
            "  \"pad_token_id\": %d,\n"
            "  \"do_sample\": true,\n"
            "  \"eos_token_id\": [\n    %d,\n    %d\n  ],\n"
            "  \"repetition_penalty\": " GEN_REPETITION_PENALTY ",\n"
            "  \"temperature\": " GEN_TEMPERATURE ",\n"
            "  \"top_p\": " GEN_TOP_P ",\n"
            "  \"top_k\": %d,\n"
            "  \"transformers_version\": \"4.37.0\"\n"
            "}\n",
            QWEN_ENDOFTEXT_ID, QWEN_ENDOFTEXT_ID, QWEN_IM_END_ID, QWEN_ENDOFTEXT_ID, GEN_TOP_K);
    return finish_file(f, tmp_path, path);
}

static int write_tokenizer_config(const options *o, const char *path)
{
    char tmp_path[PATH_MAX];
    FILE *f = open_tmp(path, tmp_path, sizeof tmp_path);
    if (!f)
        return -1;
    fprintf(f,
            "{\n"
            "  \"add_bos_token\": false,\n"
            "  \"add_prefix_space\": false,\n"
            "  \"bos_token\": null,\n"
            "  \"eos_token\": \"<|im_end|>\",\n"
            "  \"pad_token\": \"<|endoftext|>\",\n"
            "  \"model_max_length\": %d,\n"
            "  \"tokenizer_class\": \"Qwen2Tokenizer\"\n"
            "}\n",
            o->preset->max_position_embeddings);
    return finish_file(f, tmp_path, path);
}

static int copy_file(const char *from, const char *path)
{
    FILE *in = fopen(from, "rb");
    if (!in) {
        fprintf(stderr, "kvd-mkmodel: %s: cannot open: %s\n", from, strerror(errno));
        return -1;
    }
    char tmp_path[PATH_MAX];
    FILE *out = open_tmp(path, tmp_path, sizeof tmp_path);
    if (!out) {
        fclose(in);
        return -1;
    }
    char *buf = malloc(1 << 20);
    size_t n = 0;
    bool ok = buf != NULL;
    while (ok && (n = fread(buf, 1, 1 << 20, in)) > 0)
        ok = fwrite(buf, 1, n, out) == n;
    if (ok && ferror(in)) {
        fprintf(stderr, "kvd-mkmodel: %s: read failed\n", from);
        ok = false;
    }
    free(buf);
    fclose(in);
    if (!ok) {
        fclose(out);
        unlink(tmp_path);
        return -1;
    }
    return finish_file(out, tmp_path, path);
}

static int make_dirs(const char *dir)
{
    char path[PATH_MAX];
    if ((size_t)snprintf(path, sizeof path, "%s", dir) >= sizeof path)
        return -1;
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(path, 0755) != 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    return mkdir(path, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

static int join(char *out, size_t cap, const char *dir, const char *name)
{
    if ((size_t)snprintf(out, cap, "%s/%s", dir, name) >= cap) {
        fprintf(stderr, "kvd-mkmodel: %s/%s: path too long\n", dir, name);
        return -1;
    }
    return 0;
}

static int write_checkpoint(const options *o)
{
    if (make_dirs(o->out_dir) != 0) {
        fprintf(stderr, "kvd-mkmodel: %s: cannot create directory: %s\n", o->out_dir,
                strerror(errno));
        return -1;
    }
    const preset *p = o->preset;
    tensor_plan *plans = calloc((size_t)(3 + 12 * p->num_layers), sizeof *plans);
    if (!plans) {
        fprintf(stderr, "kvd-mkmodel: out of memory\n");
        return -1;
    }
    int n = plan_tensors(p, plans);
    int rc = 0;
    if (o->shards > n) {
        fprintf(stderr, "kvd-mkmodel: --shards %d: the model has only %d tensors\n", o->shards, n);
        rc = -1;
    }
    char path[PATH_MAX], stale[PATH_MAX];
    if (rc == 0)
        assign_shards(plans, n, o->shards, kvd_dtype_size(o->dtype));
    /* A checkpoint left in the directory by an earlier run would shadow or contradict
     * this one (the loader prefers an index to model.safetensors). */
    if (rc == 0 && o->shards == 1) {
        rc = join(path, sizeof path, o->out_dir, "model.safetensors");
        if (rc == 0)
            rc = join(stale, sizeof stale, o->out_dir, "model.safetensors.index.json");
        if (rc == 0)
            unlink(stale);
        if (rc == 0)
            rc = write_shard(o, plans, n, 0, path);
    } else if (rc == 0) {
        rc = join(stale, sizeof stale, o->out_dir, "model.safetensors");
        if (rc == 0)
            unlink(stale);
        for (int s = 0; s < o->shards && rc == 0; s++) {
            char name[64];
            snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", s + 1, o->shards);
            rc = join(path, sizeof path, o->out_dir, name);
            if (rc == 0)
                rc = write_shard(o, plans, n, s, path);
        }
        if (rc == 0)
            rc = join(path, sizeof path, o->out_dir, "model.safetensors.index.json");
        if (rc == 0)
            rc = write_index(o, plans, n, path);
    }
    free(plans);
    if (rc == 0)
        rc = join(path, sizeof path, o->out_dir, "config.json");
    if (rc == 0)
        rc = write_config(o, path);
    if (rc == 0)
        rc = join(path, sizeof path, o->out_dir, "generation_config.json");
    if (rc == 0)
        rc = write_generation_config(path);
    if (rc == 0)
        rc = join(path, sizeof path, o->out_dir, "tokenizer_config.json");
    if (rc == 0)
        rc = write_tokenizer_config(o, path);
    if (rc == 0)
        rc = join(path, sizeof path, o->out_dir, "tokenizer.json");
    if (rc == 0)
        rc = copy_file(o->tokenizer, path);
    return rc;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvd-mkmodel --out DIR --preset tiny|qwen2.5-0.5b|qwen2.5-1.5b|qwen2.5-7b --tokenizer FILE\n"
            "                   [--dtype bf16|f16|f32] [--seed N] [--shards K]\n"
            "Writes a Qwen2 checkpoint directory with seeded random weights (bf16 by default,\n"
            "seed 1, one model.safetensors unless K > 1).\n");
}

static int parse_options(int argc, char **argv, options *o)
{
    static const struct option longopts[] = {
        {"out", required_argument, NULL, 'o'},   {"preset", required_argument, NULL, 'p'},
        {"dtype", required_argument, NULL, 'd'}, {"seed", required_argument, NULL, 's'},
        {"shards", required_argument, NULL, 'k'}, {"tokenizer", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},        {NULL, 0, NULL, 0},
    };
    *o = (options){.dtype = KVD_DTYPE_BF16, .seed = 1, .shards = 1};
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        char *end;
        switch (c) {
        case 'o': o->out_dir = optarg; break;
        case 't': o->tokenizer = optarg; break;
        case 'p':
            for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++)
                if (strcmp(optarg, presets[i].name) == 0)
                    o->preset = &presets[i];
            if (!o->preset) {
                fprintf(stderr, "kvd-mkmodel: unknown --preset \"%s\" (tiny, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b)\n", optarg);
                return -1;
            }
            break;
        case 'd':
            if (kvd_dtype_parse(optarg, &o->dtype) != 0 || kvd_dtype_size(o->dtype) < 2) {
                fprintf(stderr, "kvd-mkmodel: unknown --dtype \"%s\" (bf16, f16, f32)\n", optarg);
                return -1;
            }
            break;
        case 's':
            errno = 0;
            o->seed = strtoull(optarg, &end, 0);
            if (errno || end == optarg || *end) {
                fprintf(stderr, "kvd-mkmodel: --seed \"%s\" is not an unsigned integer\n", optarg);
                return -1;
            }
            break;
        case 'k': {
            errno = 0;
            long k = strtol(optarg, &end, 10);
            if (errno || end == optarg || *end || k < 1 || k > MAX_SHARDS) {
                fprintf(stderr, "kvd-mkmodel: --shards \"%s\" is not in 1..%d\n", optarg, MAX_SHARDS);
                return -1;
            }
            o->shards = (int)k;
            break;
        }
        case 'h': return 1;
        default: return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "kvd-mkmodel: unexpected argument \"%s\"\n", argv[optind]);
        return -1;
    }
    if (!o->out_dir || !o->preset || !o->tokenizer) {
        fprintf(stderr, "kvd-mkmodel: --out, --preset and --tokenizer are required\n");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    options o;
    int parsed = parse_options(argc, argv, &o);
    if (parsed != 0) {
        usage(parsed > 0 ? stdout : stderr);
        return parsed > 0 ? 0 : 2;
    }
    if (access(o.tokenizer, R_OK) != 0) {
        fprintf(stderr, "kvd-mkmodel: %s: cannot read tokenizer: %s\n", o.tokenizer,
                strerror(errno));
        return 1;
    }
    return write_checkpoint(&o) == 0 ? 0 : 1;
}
