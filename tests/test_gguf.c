/* test_gguf.c - GGUF models: the parser's checks, the loader's, and values against the
 * safetensors checkpoint the file was made from.
 *
 * KVD_TINY_GGUF is the tiny fixture written as a BF16 GGUF by tests/reference/gguf_from_hf.py
 * (an independent writer whose keys are byte for byte llama.cpp's); KVD_TINY_MODEL is the
 * same checkpoint in safetensors. A model loaded from the GGUF must hold exactly the same
 * config and weights. Each damaged file is a copy of the GGUF with one field edited, the
 * field found by this file's own walk over the format (not the parser under test); each
 * test checks the exact error code and that the one-line message names what is wrong.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "test_files.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvd/kvd_gguf.h"
#include "kvd/kvd_model.h"

static char work_dir[PATH_MAX / 2];

typedef struct fixture {
    char *bytes; /* the pristine GGUF */
    size_t size;
    kvd_model *from_gguf, *from_st;
} fixture;

/* ---- an independent walk over the format: where each field lies ---- */

typedef struct walked_kv {
    size_t at;        /* the key's length field */
    size_t type_at;   /* its value type */
    size_t value_at;  /* its value (arrays: the element type) */
    char key[96];
} walked_kv;

typedef struct walked_tensor {
    size_t at;        /* the name's length field */
    size_t ndim_at, type_at, offset_at;
    char name[96];
} walked_tensor;

typedef struct walk {
    walked_kv kv[64];
    int num_kv;
    walked_tensor t[64];
    int num_t;
} walk;

static uint64_t rd64(const char *b, size_t at)
{
    uint64_t v;
    memcpy(&v, b + at, 8);
    return v;
}

static uint32_t rd32(const char *b, size_t at)
{
    uint32_t v;
    memcpy(&v, b + at, 4);
    return v;
}

static size_t skip_scalar_or_string(const char *b, size_t at, uint32_t type)
{
    static const size_t sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return type == 8 ? at + 8 + rd64(b, at) : at + sizes[type];
}

static walk walk_file(const char *b)
{
    walk w = {0};
    size_t at = 24;
    uint64_t nt = rd64(b, 8), nkv = rd64(b, 16);
    assert_true(nkv <= 64 && nt <= 64);
    for (uint64_t i = 0; i < nkv; i++) {
        walked_kv *k = &w.kv[w.num_kv++];
        k->at = at;
        uint64_t len = rd64(b, at);
        snprintf(k->key, sizeof k->key, "%.*s", (int)len, b + at + 8);
        k->type_at = at + 8 + len;
        k->value_at = k->type_at + 4;
        uint32_t type = rd32(b, k->type_at);
        at = k->value_at;
        if (type == 9) {
            uint32_t elem = rd32(b, at);
            uint64_t n = rd64(b, at + 4);
            at += 12;
            for (uint64_t e = 0; e < n; e++)
                at = skip_scalar_or_string(b, at, elem);
        } else {
            at = skip_scalar_or_string(b, at, type);
        }
    }
    for (uint64_t i = 0; i < nt; i++) {
        walked_tensor *t = &w.t[w.num_t++];
        t->at = at;
        uint64_t len = rd64(b, at);
        snprintf(t->name, sizeof t->name, "%.*s", (int)len, b + at + 8);
        t->ndim_at = at + 8 + len;
        uint32_t ndim = rd32(b, t->ndim_at);
        t->type_at = t->ndim_at + 4 + 8 * ndim;
        t->offset_at = t->type_at + 4;
        at = t->offset_at + 8;
    }
    return w;
}

static const walked_kv *kv_named(const walk *w, const char *key)
{
    for (int i = 0; i < w->num_kv; i++)
        if (strcmp(w->kv[i].key, key) == 0)
            return &w->kv[i];
    fail_msg("the fixture has no key %s", key);
    return NULL;
}

static const walked_tensor *tensor_named(const walk *w, const char *name)
{
    for (int i = 0; i < w->num_t; i++)
        if (strcmp(w->t[i].name, name) == 0)
            return &w->t[i];
    fail_msg("the fixture has no tensor %s", name);
    return NULL;
}

/* ---- damaged copies ---- */

static char *copy_bytes(const fixture *fx)
{
    char *b = malloc(fx->size);
    assert_non_null(b);
    memcpy(b, fx->bytes, fx->size);
    return b;
}

static void write_gguf(const char *name, const char *b, size_t len, char *path)
{
    snprintf(path, PATH_MAX, "%s/%s.gguf", work_dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

/* Loading the damaged bytes must fail with code and a message holding both needles; the
 * parser alone (on the bytes in memory) must fail the same way when parse_fails. */
static void expect_error(const char *name, const char *b, size_t len, int code, const char *n1,
                         const char *n2, bool parse_fails)
{
    char path[PATH_MAX];
    write_gguf(name, b, len, path);
    kvd_error err = {0};
    kvd_model *m = kvd_model_load(path, NULL, &err);
    if (m)
        fail_msg("%s loaded but should fail (\"%s\")", name, n2 ? n2 : n1);
    if (err.code != code)
        fail_msg("%s: code %d, expected %d; message: %s", name, err.code, code, err.msg);
    if ((n1 && !strstr(err.msg, n1)) || (n2 && !strstr(err.msg, n2)) || !strstr(err.msg, path))
        fail_msg("%s: message \"%s\" does not name \"%s\" / \"%s\" / the file", name, err.msg,
                 n1 ? n1 : "", n2 ? n2 : "");
    assert_null(strchr(err.msg, '\n'));
    if (parse_fails) {
        kvd_gguf g;
        kvd_error perr = {0};
        assert_int_equal(kvd_gguf_parse(&g, b, len, "mem", &perr), code);
        assert_null(g.kvs);
    }
    unlink(path);
}

static void put32(char *b, size_t at, uint32_t v)
{
    memcpy(b + at, &v, 4);
}

static void put64(char *b, size_t at, uint64_t v)
{
    memcpy(b + at, &v, 8);
}

/* ---- setup ---- */

static int setup(void **state)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(work_dir, sizeof work_dir, "%s/kvd-gguf-test-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(work_dir))
        return -1;
    fixture *fx = calloc(1, sizeof *fx);
    const char *gguf = getenv("KVD_TINY_GGUF"), *st = getenv("KVD_TINY_MODEL");
    if (!fx || !gguf || !st) {
        print_error("KVD_TINY_GGUF and KVD_TINY_MODEL must be set (run through meson test)\n");
        return -1;
    }
    fx->bytes = test_read_file(gguf, &fx->size);
    kvd_error err = {0};
    fx->from_gguf = kvd_model_load(gguf, NULL, &err);
    if (!fx->from_gguf)
        print_error("%s\n", err.msg);
    fx->from_st = kvd_model_load(st, NULL, &err);
    if (!fx->bytes || !fx->from_gguf || !fx->from_st)
        return -1;
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fixture *fx = *state;
    kvd_model_destroy(fx->from_gguf);
    kvd_model_destroy(fx->from_st);
    free(fx->bytes);
    free(fx);
    rmdir(work_dir);
    return 0;
}

/* ---- the good file ---- */

static void same_matrix(const kvd_matrix *a, const kvd_matrix *b)
{
    assert_int_equal(a->dtype, b->dtype);
    assert_int_equal(a->rows, b->rows);
    assert_int_equal(a->cols, b->cols);
    assert_memory_equal(a->data, b->data, kvd_matrix_packed_bytes(a->dtype, a->rows, a->cols));
}

static void same_vector(const float *a, const float *b, int n)
{
    assert_memory_equal(a, b, (size_t)n * sizeof *a);
}

static void test_gguf_equals_safetensors(void **state)
{
    fixture *fx = *state;
    const kvd_model *g = fx->from_gguf, *s = fx->from_st;
    const kvd_model_config *a = &g->config, *b = &s->config;
    assert_int_equal(a->vocab_size, b->vocab_size);
    assert_int_equal(a->hidden_size, b->hidden_size);
    assert_int_equal(a->intermediate_size, b->intermediate_size);
    assert_int_equal(a->num_layers, b->num_layers);
    assert_int_equal(a->num_heads, b->num_heads);
    assert_int_equal(a->num_kv_heads, b->num_kv_heads);
    assert_int_equal(a->head_dim, b->head_dim);
    assert_int_equal(a->max_position_embeddings, b->max_position_embeddings);
    assert_true(a->rms_norm_eps == b->rms_norm_eps);
    assert_true(a->rope_theta == b->rope_theta);
    assert_true(a->tie_word_embeddings && b->tie_word_embeddings);
    assert_int_equal(a->bos_token_id, b->bos_token_id);
    /* config.json says 151645; the GGUF adds <|endoftext|>, as llama.cpp ends on it too */
    assert_int_equal(a->num_eos_token_ids, 2);
    assert_int_equal(a->eos_token_ids[0], 151645);
    assert_int_equal(a->eos_token_ids[1], 151643);
    assert_null(g->chat_template); /* the fixture's tokenizer_config.json has none */
    assert_true(g->generation.temperature == 1.0f && g->generation.top_k == 0);
    same_matrix(&g->embed_tokens, &s->embed_tokens);
    assert_ptr_equal(g->lm_head.data, g->embed_tokens.data);
    same_vector(g->final_norm, s->final_norm, a->hidden_size);
    int q = a->num_heads * a->head_dim, kv = a->num_kv_heads * a->head_dim;
    for (int l = 0; l < a->num_layers; l++) {
        const kvd_layer_weights *x = &g->layers[l], *y = &s->layers[l];
        same_matrix(&x->q_proj, &y->q_proj);
        same_matrix(&x->k_proj, &y->k_proj);
        same_matrix(&x->v_proj, &y->v_proj);
        same_matrix(&x->o_proj, &y->o_proj);
        same_matrix(&x->gate_proj, &y->gate_proj);
        same_matrix(&x->up_proj, &y->up_proj);
        same_matrix(&x->down_proj, &y->down_proj);
        same_vector(x->q_bias, y->q_bias, q);
        same_vector(x->k_bias, y->k_bias, kv);
        same_vector(x->v_bias, y->v_bias, kv);
        same_vector(x->input_norm, y->input_norm, a->hidden_size);
        same_vector(x->post_norm, y->post_norm, a->hidden_size);
    }
    assert_int_equal(g->weight_bytes, s->weight_bytes);
}

/* --model DIR with exactly one .gguf (and no config.json); two are refused. */
static void test_directory_with_one_gguf(void **state)
{
    fixture *fx = *state;
    char dir[PATH_MAX / 2 + 16], path[PATH_MAX], second[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/one", work_dir);
    assert_int_equal(mkdir(dir, 0755), 0);
    snprintf(path, sizeof path, "%s/model.gguf", dir);
    assert_int_equal(symlink(getenv("KVD_TINY_GGUF"), path), 0);
    kvd_error err = {0};
    kvd_model *m = kvd_model_load(dir, NULL, &err);
    if (!m)
        fail_msg("%s", err.msg);
    same_matrix(&m->layers[1].down_proj, &fx->from_st->layers[1].down_proj);
    kvd_model_destroy(m);
    snprintf(second, sizeof second, "%s/other.gguf", dir);
    assert_int_equal(symlink(getenv("KVD_TINY_GGUF"), second), 0);
    assert_null(kvd_model_load(dir, NULL, &err));
    assert_int_equal(err.code, KVD_EINVAL);
    assert_non_null(strstr(err.msg, "2 .gguf files"));
    unlink(second);
    unlink(path);
    rmdir(dir);
}

/* A chat template in the file reaches model->chat_template. */
static void test_chat_template_key(void **state)
{
    fixture *fx = *state;
    /* The fixture with one more key after the others: keys and tensor infos copied
     * verbatim, the data section moved to the next aligned start. */
    walk w = walk_file(fx->bytes);
    size_t kv_begin = w.kv[0].at, kv_end = w.t[0].at;
    uint64_t nkv = rd64(fx->bytes, 16), nt = rd64(fx->bytes, 8);
    size_t tinfo_end = w.t[w.num_t - 1].offset_at + 8;
    uint64_t align = 32;
    size_t data_start = (tinfo_end + align - 1) / align * align;
    static const char key[] = "tokenizer.chat_template", value[] = "{{ messages }}";
    size_t extra = 8 + strlen(key) + 4 + 8 + strlen(value);
    size_t new_tinfo_end = tinfo_end + extra;
    size_t new_data_start = (new_tinfo_end + align - 1) / align * align;
    size_t len = new_data_start + (fx->size - data_start);
    char *n = calloc(1, len);
    assert_non_null(n);
    memcpy(n, fx->bytes, 24);
    put64(n, 16, nkv + 1);
    put64(n, 8, nt);
    memcpy(n + 24, fx->bytes + kv_begin, kv_end - kv_begin);
    size_t at = 24 + (kv_end - kv_begin);
    put64(n, at, strlen(key));
    memcpy(n + at + 8, key, strlen(key));
    put32(n, at + 8 + strlen(key), KVD_GGUF_STRING);
    put64(n, at + 12 + strlen(key), strlen(value));
    memcpy(n + at + 20 + strlen(key), value, strlen(value));
    at += extra;
    memcpy(n + at, fx->bytes + kv_end, tinfo_end - kv_end);
    memcpy(n + new_data_start, fx->bytes + data_start, fx->size - data_start);
    char path[PATH_MAX];
    write_gguf("template", n, len, path);
    kvd_error err = {0};
    kvd_model *m = kvd_model_load(path, NULL, &err);
    if (!m)
        fail_msg("%s", err.msg);
    assert_string_equal(m->chat_template, value);
    kvd_model_destroy(m);
    unlink(path);
    free(n);
}

/* --quantize at load: llama-quantize's type per matrix for the tiny shape (64-wide rows:
 * the k-quants fall back), and an unknown name refused. */
static void test_quantize_at_load(void **state)
{
    (void)state;
    kvd_error err = {0};
    kvd_model_load_options opts = {.quantize = "q4_k_m"};
    kvd_model *m = kvd_model_load(getenv("KVD_TINY_MODEL"), &opts, &err);
    if (!m)
        fail_msg("%s", err.msg);
    assert_int_equal(m->embed_tokens.dtype, KVD_DTYPE_Q8_0); /* tied output: Q6_K -> Q8_0 */
    assert_int_equal(m->layers[0].q_proj.dtype, KVD_DTYPE_Q5_0); /* Q4_K -> Q5_0 */
    assert_int_equal(m->layers[0].v_proj.dtype, KVD_DTYPE_Q5_0);
    assert_int_equal(m->layers[1].v_proj.dtype, KVD_DTYPE_Q8_0); /* use_more_bits(1, 2) */
    assert_int_equal(m->layers[1].down_proj.dtype, KVD_DTYPE_Q8_0);
    assert_int_equal(m->layers[1].up_proj.dtype, KVD_DTYPE_Q5_0);
    assert_ptr_equal(m->lm_head.data, m->embed_tokens.data);
    /* converted by several threads: the same bytes as by one */
    opts.threads = 3;
    kvd_model *threaded = kvd_model_load(getenv("KVD_TINY_MODEL"), &opts, &err);
    if (!threaded)
        fail_msg("%s", err.msg);
    const kvd_matrix *one[] = {&m->embed_tokens, &m->layers[0].q_proj, &m->layers[1].down_proj,
                               &m->layers[1].up_proj};
    const kvd_matrix *many[] = {&threaded->embed_tokens, &threaded->layers[0].q_proj,
                                &threaded->layers[1].down_proj, &threaded->layers[1].up_proj};
    for (size_t i = 0; i < sizeof one / sizeof one[0]; i++) {
        assert_int_equal(one[i]->dtype, many[i]->dtype);
        assert_memory_equal(one[i]->data, many[i]->data,
                            kvd_matrix_packed_bytes(one[i]->dtype, one[i]->rows, one[i]->cols));
    }
    kvd_model_destroy(threaded);
    kvd_model_destroy(m);
    opts.threads = 0;
    opts.quantize = "q3_k";
    assert_null(kvd_model_load(getenv("KVD_TINY_MODEL"), &opts, &err));
    assert_int_equal(err.code, KVD_EINVAL);
    assert_non_null(strstr(err.msg, "q3_k"));
    /* the mix itself at a 256-wide shape: no fallback */
    const kvd_gguf_mix *mix = kvd_gguf_mix_find("Q4_K_M");
    assert_non_null(mix);
    assert_int_equal(kvd_gguf_mix_type(mix, "blk.0.attn_v.weight", 256, 24, true), KVD_DTYPE_Q6_K);
    assert_int_equal(kvd_gguf_mix_type(mix, "blk.4.attn_v.weight", 256, 24, true), KVD_DTYPE_Q4_K);
    assert_int_equal(kvd_gguf_mix_type(mix, "blk.5.attn_v.weight", 256, 24, true), KVD_DTYPE_Q6_K);
    assert_int_equal(kvd_gguf_mix_type(mix, "blk.21.ffn_down.weight", 256, 24, true), KVD_DTYPE_Q6_K);
    assert_int_equal(kvd_gguf_mix_type(mix, "token_embd.weight", 256, 24, false), KVD_DTYPE_Q4_K);
    assert_int_equal(kvd_gguf_mix_type(mix, "token_embd.weight", 896, 24, true), KVD_DTYPE_Q8_0);
    assert_int_equal(kvd_gguf_mix_type(mix, "output.weight", 3584, 28, false), KVD_DTYPE_Q6_K);
    assert_int_equal(kvd_gguf_mix_type(kvd_gguf_mix_find("q8_0"), "output.weight", 896, 24, false),
                     KVD_DTYPE_Q8_0);
    assert_int_equal(kvd_gguf_mix_type(kvd_gguf_mix_find("bf16"), "output.weight", 896, 24, false),
                     KVD_DTYPE_BF16);
}

/* ---- damaged files ---- */

static void test_truncated(void **state)
{
    fixture *fx = *state;
    walk w = walk_file(fx->bytes);
    size_t cuts[] = {0, 3, 10, 23, w.kv[1].at + 5, kv_named(&w, "tokenizer.ggml.tokens")->value_at + 100,
                     w.t[3].at + 2, w.t[w.num_t - 1].offset_at + 4};
    for (size_t i = 0; i < sizeof cuts / sizeof *cuts; i++)
        expect_error("truncated", fx->bytes, cuts[i], KVD_EFORMAT, NULL, NULL, true);
    /* cut inside the data: the last tensor's bytes run past the end */
    expect_error("truncated_data", fx->bytes, fx->size - 1, KVD_EFORMAT, "past the end", NULL, true);
}

static void test_bad_magic_and_version(void **state)
{
    fixture *fx = *state;
    char *b = copy_bytes(fx);
    b[0] = 'X';
    expect_error("magic", b, fx->size, KVD_EFORMAT, "bad magic", NULL, true);
    b[0] = 'G';
    put32(b, 4, 1);
    expect_error("version1", b, fx->size, KVD_EUNSUPPORTED, "version 1", NULL, true);
    put32(b, 4, 4);
    expect_error("version4", b, fx->size, KVD_EUNSUPPORTED, "version 4", NULL, true);
    put32(b, 4, 2); /* version 2 has the same layout: it loads */
    char path[PATH_MAX];
    write_gguf("v2", b, fx->size, path);
    kvd_error err = {0};
    kvd_model *m = kvd_model_load(path, NULL, &err);
    assert_non_null(m);
    kvd_model_destroy(m);
    unlink(path);
    free(b);
}

static void test_huge_counts_and_lengths(void **state)
{
    fixture *fx = *state;
    walk w = walk_file(fx->bytes);
    char *b = copy_bytes(fx);
    put64(b, 8, UINT64_C(1) << 60);
    expect_error("tensors", b, fx->size, KVD_EFORMAT, "cannot fit", NULL, true);
    memcpy(b, fx->bytes, 24);
    put64(b, 16, UINT64_MAX);
    expect_error("kvs", b, fx->size, KVD_EFORMAT, "cannot fit", NULL, true);
    memcpy(b, fx->bytes, 24);
    /* a key's length past the end */
    put64(b, w.kv[2].at, UINT64_MAX - 3);
    expect_error("keylen", b, fx->size, KVD_EFORMAT, "string length", NULL, true);
    memcpy(b, fx->bytes, fx->size);
    /* a string value's length past the end */
    const walked_kv *name = kv_named(&w, "general.name");
    put64(b, name->value_at, (uint64_t)fx->size);
    expect_error("strlen", b, fx->size, KVD_EFORMAT, "general.name", "string length", true);
    memcpy(b, fx->bytes, fx->size);
    /* an array count past the end */
    const walked_kv *tokens = kv_named(&w, "tokenizer.ggml.tokens");
    put64(b, tokens->value_at + 4, UINT64_C(1) << 61);
    expect_error("arraylen", b, fx->size, KVD_EFORMAT, "tokenizer.ggml.tokens", "array of", true);
    memcpy(b, fx->bytes, fx->size);
    /* an array of arrays */
    put32(b, tokens->value_at, KVD_GGUF_ARRAY);
    expect_error("nested", b, fx->size, KVD_EFORMAT, "tokenizer.ggml.tokens", "arrays of arrays", true);
    memcpy(b, fx->bytes, fx->size);
    /* an unknown value type */
    put32(b, kv_named(&w, "qwen2.block_count")->type_at, 99);
    expect_error("valuetype", b, fx->size, KVD_EFORMAT, "qwen2.block_count", "unknown value type", true);
    memcpy(b, fx->bytes, fx->size);
    /* a tensor with 5 dimensions, and one with a zero extent */
    put32(b, tensor_named(&w, "output_norm.weight")->ndim_at, 5);
    expect_error("ndim", b, fx->size, KVD_EFORMAT, "output_norm.weight", "5 dimensions", true);
    memcpy(b, fx->bytes, fx->size);
    put64(b, tensor_named(&w, "output_norm.weight")->ndim_at + 4, 0);
    expect_error("zero", b, fx->size, KVD_EFORMAT, "output_norm.weight", "zero or too large", true);
    memcpy(b, fx->bytes, fx->size);
    /* extents whose product overflows */
    const walked_tensor *embd = tensor_named(&w, "token_embd.weight");
    put64(b, embd->ndim_at + 4, UINT64_C(1) << 40);
    put64(b, embd->ndim_at + 12, UINT64_C(1) << 40);
    expect_error("overflow", b, fx->size, KVD_EFORMAT, "token_embd.weight", "too large", true);
    free(b);
}

static void test_offsets(void **state)
{
    fixture *fx = *state;
    walk w = walk_file(fx->bytes);
    char *b = copy_bytes(fx);
    const walked_tensor *a = tensor_named(&w, "blk.0.attn_q.weight");
    const walked_tensor *c = tensor_named(&w, "blk.0.attn_k.weight");
    uint64_t off = rd64(b, a->offset_at);
    put64(b, a->offset_at, off + 2);
    expect_error("misaligned", b, fx->size, KVD_EFORMAT, "blk.0.attn_q.weight", "alignment", true);
    put64(b, a->offset_at, (uint64_t)fx->size);
    expect_error("outside", b, fx->size, KVD_EFORMAT, "blk.0.attn_q.weight", "past the end", true);
    put64(b, a->offset_at, UINT64_MAX - 31);
    expect_error("wrap", b, fx->size, KVD_EFORMAT, "blk.0.attn_q.weight", "past the end", true);
    put64(b, a->offset_at, rd64(b, c->offset_at));
    expect_error("overlap", b, fx->size, KVD_EFORMAT, "overlap", NULL, true);
    free(b);
}

static void test_duplicates(void **state)
{
    fixture *fx = *state;
    walk w = walk_file(fx->bytes);
    char *b = copy_bytes(fx);
    /* blk.1.attn_q.bias becomes a second blk.0.attn_q.bias */
    const walked_tensor *t = tensor_named(&w, "blk.1.attn_q.bias");
    b[t->at + 8 + 4] = '0';
    expect_error("duptensor", b, fx->size, KVD_EFORMAT, "tensor blk.0.attn_q.bias", "twice", true);
    memcpy(b, fx->bytes, fx->size);
    /* general.type becomes a second general.name (both 12 bytes) */
    memcpy(b + kv_named(&w, "general.type")->at + 8, "general.name", 12);
    expect_error("dupkey", b, fx->size, KVD_EFORMAT, "key general.name", "twice", true);
    free(b);
}

static void test_alignment_key(void **state)
{
    fixture *fx = *state;
    walk w = walk_file(fx->bytes);
    char *b = copy_bytes(fx);
    /* qwen2.block_count (17 bytes) -> "general.alignment" (17 bytes): value 2, a power of two
     * that every offset (multiples of 32) honours, but then qwen2.block_count is missing */
    const walked_kv *k = kv_named(&w, "qwen2.block_count");
    memcpy(b + k->at + 8, "general.alignment", 17);
    expect_error("align2", b, fx->size, KVD_EFORMAT, "missing key qwen2.block_count", NULL, false);
    put32(b, k->value_at, 3);
    expect_error("align3", b, fx->size, KVD_EFORMAT, "general.alignment", "power of two", true);
    put32(b, k->value_at, 0);
    expect_error("align0", b, fx->size, KVD_EFORMAT, "general.alignment", NULL, true);
    free(b);
}

static void test_loader_refusals(void **state)
{
    fixture *fx = *state;
    walk w = walk_file(fx->bytes);
    char *b = copy_bytes(fx);
    /* wrong architecture */
    memcpy(b + kv_named(&w, "general.architecture")->value_at + 8, "llama", 5);
    expect_error("arch", b, fx->size, KVD_EUNSUPPORTED, "general.architecture", "llama", false);
    memcpy(b, fx->bytes, fx->size);
    /* missing key */
    memcpy(b + kv_named(&w, "qwen2.attention.head_count_kv")->at + 8 + 24, "XX", 2);
    expect_error("nokey", b, fx->size, KVD_EFORMAT, "missing key qwen2.attention.head_count_kv",
                 NULL, false);
    memcpy(b, fx->bytes, fx->size);
    /* a key of the wrong type, a value out of range */
    put32(b, kv_named(&w, "qwen2.rope.freq_base")->type_at, KVD_GGUF_UINT32);
    expect_error("keytype", b, fx->size, KVD_EFORMAT, "qwen2.rope.freq_base", "float", false);
    memcpy(b, fx->bytes, fx->size);
    put32(b, kv_named(&w, "qwen2.attention.head_count")->value_at, 0);
    expect_error("range", b, fx->size, KVD_EFORMAT, "qwen2.attention.head_count", "not in", false);
    memcpy(b, fx->bytes, fx->size);
    put32(b, kv_named(&w, "qwen2.attention.head_count")->value_at, 3);
    expect_error("heads", b, fx->size, KVD_EFORMAT, "head_count 3", NULL, false);
    memcpy(b, fx->bytes, fx->size);
    /* missing tensor */
    const walked_tensor *up = tensor_named(&w, "blk.1.ffn_up.weight");
    b[up->at + 8 + 10] = 'X';
    expect_error("notensor", b, fx->size, KVD_EFORMAT, "missing tensor blk.1.ffn_up.weight", NULL,
                 false);
    memcpy(b, fx->bytes, fx->size);
    /* wrong shape: 64 x 64 attn_q declared 64 x 32 (fewer bytes: the offsets still hold) */
    const walked_tensor *q = tensor_named(&w, "blk.0.attn_q.weight");
    put64(b, q->ndim_at + 12, 32);
    expect_error("shape", b, fx->size, KVD_EFORMAT, "blk.0.attn_q.weight", "[32, 64]", false);
    memcpy(b, fx->bytes, fx->size);
    /* unknown ggml type, and a known one kvd does not read */
    put32(b, q->type_at, 99);
    expect_error("type99", b, fx->size, KVD_EUNSUPPORTED, "blk.0.attn_q.weight", "type 99", true);
    put32(b, q->type_at, 3); /* Q4_1 */
    expect_error("q4_1", b, fx->size, KVD_EUNSUPPORTED, "blk.0.attn_q.weight", "Q4_1", false);
    /* a quantized vector: Q8_0 output_norm */
    memcpy(b, fx->bytes, fx->size);
    put32(b, tensor_named(&w, "output_norm.weight")->type_at, 8);
    expect_error("qvector", b, fx->size, KVD_EUNSUPPORTED, "output_norm.weight", "vector", false);
    /* columns not a whole number of blocks: 64 -> 48 columns of Q4_K (256) */
    memcpy(b, fx->bytes, fx->size);
    put32(b, q->type_at, 12);
    expect_error("blocks", b, fx->size, KVD_EFORMAT, "blk.0.attn_q.weight", "whole number", true);
    /* an untied model whose output.weight is missing cannot be told apart from a tied one;
     * a broken tokenizer id is: eos past the vocabulary */
    memcpy(b, fx->bytes, fx->size);
    put32(b, kv_named(&w, "tokenizer.ggml.eos_token_id")->value_at, 151936);
    expect_error("eos", b, fx->size, KVD_EFORMAT, "tokenizer.ggml.eos_token_id", NULL, false);
    free(b);
}

/* The parser on a minimal file built by hand: no tensors, no keys; and the typed getters. */
static void test_parser_small_cases(void **state)
{
    (void)state;
    char b[256] = "GGUF";
    put32(b, 4, 3);
    put64(b, 8, 0);
    put64(b, 16, 0);
    kvd_gguf g;
    kvd_error err = {0};
    assert_int_equal(kvd_gguf_parse(&g, b, 24, "mem", &err), 0);
    assert_int_equal(g.num_kvs, 0);
    kvd_gguf_deinit(&g);
    /* one u64 key too big for int64, one bool of value 2 */
    put64(b, 16, 1);
    put64(b, 24, 1);
    b[32] = 'k';
    put32(b, 33, KVD_GGUF_UINT64);
    put64(b, 37, UINT64_MAX);
    assert_int_equal(kvd_gguf_parse(&g, b, 45, "mem", &err), 0);
    int64_t v;
    assert_int_equal(kvd_gguf_get_int(&g, "k", 0, INT64_MAX, &v, "mem", &err), KVD_EFORMAT);
    assert_int_equal(kvd_gguf_get_int(&g, "nope", 0, 1, &v, "mem", &err), KVD_EFORMAT);
    assert_non_null(strstr(err.msg, "missing key nope"));
    kvd_gguf_deinit(&g);
    put32(b, 33, KVD_GGUF_BOOL);
    b[37] = 2;
    assert_int_equal(kvd_gguf_parse(&g, b, 38, "mem", &err), KVD_EFORMAT);
    assert_non_null(strstr(err.msg, "bool"));
    /* a key holding a NUL byte */
    b[37] = 1;
    b[32] = '\0';
    assert_int_equal(kvd_gguf_parse(&g, b, 38, "mem", &err), KVD_EFORMAT);
    assert_non_null(strstr(err.msg, "control byte"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gguf_equals_safetensors),
        cmocka_unit_test(test_directory_with_one_gguf),
        cmocka_unit_test(test_chat_template_key),
        cmocka_unit_test(test_quantize_at_load),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_bad_magic_and_version),
        cmocka_unit_test(test_huge_counts_and_lengths),
        cmocka_unit_test(test_offsets),
        cmocka_unit_test(test_duplicates),
        cmocka_unit_test(test_alignment_key),
        cmocka_unit_test(test_loader_refusals),
        cmocka_unit_test(test_parser_small_cases),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
