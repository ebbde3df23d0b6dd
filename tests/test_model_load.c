/* test_model_load.c - checkpoint loading: config, safetensors, shapes, values, and every refusal.
 *
 * The group setup runs the built kvd-mkmodel (path in argv[1], else $KVD_MKMODEL, else
 * $KVD_BUILD_ROOT/tools/kvd-mkmodel) to write the tiny preset into a temporary
 * directory in bf16, f16, f32 and bf16 in 3 shards. Loaded values are compared with
 * the file's own bytes, located by an independent reading of the safetensors header
 * (cJSON here, not the loader's parser), and across dtypes and shardings (kvd-mkmodel
 * draws the same float32 values whatever the dtype). Each broken checkpoint is a
 * copy of the bf16 one (symlinks for the untouched files) with one file edited; its
 * test checks the exact error code and that the message names the file and the
 * tensor or key.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "test_files.h"

#include <cjson/cJSON.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvd/kvd_half.h"
#include "kvd/kvd_hugemem.h"
#include "kvd/kvd_model.h"
#include "kvd/kvd_safetensors.h"

#define TINY_VOCAB 151936
#define TINY_HIDDEN 64
#define TINY_INTERMEDIATE 128
#define TINY_LAYERS 2

static char mkmodel_path[PATH_MAX];
static char work_dir[PATH_MAX];  /* the temporary directory holding every fixture */
static char tok_path[PATH_MAX];

/* The fixtures; models loaded once in group setup. */
typedef struct fixtures {
    char bf16_dir[PATH_MAX], f16_dir[PATH_MAX], f32_dir[PATH_MAX], sharded_dir[PATH_MAX];
    kvd_model *bf16, *f16, *f32, *sharded;
} fixtures;

/* ---------- helpers ---------- */

/* snprintf that fails the test instead of truncating. */
static void fmt_path(char *out, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fmt_path(char *out, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, cap, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= cap)
        fail_msg("path too long: %s", out);
}

static int run_mkmodel(const char *out, const char *dtype, const char *shards)
{
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        char *argv[] = {mkmodel_path, "--out", (char *)out, "--preset", "tiny", "--seed", "1",
                        "--dtype", (char *)dtype, "--shards", (char *)shards, "--tokenizer",
                        tok_path, NULL};
        execv(mkmodel_path, argv);
        _exit(127);
    }
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
        return -1;
    return WEXITSTATUS(status);
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

static void remove_tree(const char *dir)
{
    nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void write_file(const char *path, const void *data, size_t len)
{
    unlink(path); /* it may be a symlink into the pristine fixture */
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

/* A fresh directory name under work_dir whose files are symlinks to src's. */
static void clone_dir(const char *src, const char *name, char *out)
{
    fmt_path(out, PATH_MAX, "%s/%s", work_dir, name);
    assert_int_equal(mkdir(out, 0755), 0);
    static const char *files[] = {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "model.safetensors.index.json",
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    };
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char from[PATH_MAX], to[PATH_MAX];
        fmt_path(from, sizeof from, "%s/%s", src, files[i]);
        fmt_path(to, sizeof to, "%s/%s", out, files[i]);
        if (access(from, F_OK) == 0)
            assert_int_equal(symlink(from, to), 0);
    }
}

/* Replaces the first occurrence of old in dir/file (a real copy replaces the link). */
static void edit_text_file(const char *dir, const char *file, const char *old, const char *new)
{
    char path[PATH_MAX];
    fmt_path(path, sizeof path, "%s/%s", dir, file);
    size_t len;
    char *text = test_must_read_file(path, &len);
    char *at = strstr(text, old);
    if (!at)
        fail_msg("%s: \"%s\" not found", path, old);
    size_t out_len = len - strlen(old) + strlen(new);
    char *out = malloc(out_len + 1);
    assert_non_null(out);
    size_t head = (size_t)(at - text);
    memcpy(out, text, head);
    memcpy(out + head, new, strlen(new));
    memcpy(out + head + strlen(new), at + strlen(old), len - head - strlen(old));
    write_file(path, out, out_len);
    free(out);
    free(text);
}

/* Rewrites dir/file's safetensors header with old replaced by new, data unchanged. */
static void edit_header(const char *dir, const char *file, const char *old, const char *new)
{
    char path[PATH_MAX];
    fmt_path(path, sizeof path, "%s/%s", dir, file);
    size_t len;
    char *bytes = test_must_read_file(path, &len);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = header_len << 8 | (uint8_t)bytes[i];
    char *header = strndup(bytes + 8, header_len);
    char *at = strstr(header, old);
    if (!at)
        fail_msg("%s: \"%s\" not in the header", path, old);
    size_t new_len = header_len - strlen(old) + strlen(new);
    size_t out_len = 8 + new_len + (len - 8 - header_len);
    char *out = malloc(out_len);
    assert_non_null(out);
    for (int i = 0; i < 8; i++)
        out[i] = (char)(new_len >> (8 * i));
    size_t head = (size_t)(at - header);
    memcpy(out + 8, header, head);
    memcpy(out + 8 + head, new, strlen(new));
    memcpy(out + 8 + head + strlen(new), at + strlen(old), header_len - head - strlen(old));
    memcpy(out + 8 + new_len, bytes + 8 + header_len, len - 8 - header_len);
    write_file(path, out, out_len);
    free(out);
    free(header);
    free(bytes);
}

/* Writes the first keep bytes of src/file to dir/file. */
static void truncate_copy(const char *src, const char *dir, const char *file, size_t keep)
{
    char path[PATH_MAX];
    fmt_path(path, sizeof path, "%s/%s", src, file);
    size_t len;
    char *bytes = test_must_read_file(path, &len);
    assert_true(keep <= len);
    fmt_path(path, sizeof path, "%s/%s", dir, file);
    write_file(path, bytes, keep);
    free(bytes);
}

static uint64_t file_header_len(const char *dir, const char *file)
{
    char path[PATH_MAX];
    fmt_path(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    uint8_t b[8];
    assert_int_equal(fread(b, 1, 8, f), 8);
    fclose(f);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | b[i];
    return n;
}

/* Loading dir must fail with code and a message holding each of the needles. */
static void expect_load_error(const char *dir, int code, const char *needle1, const char *needle2)
{
    kvd_error err = {0};
    kvd_model *m = kvd_model_load(dir, NULL, &err);
    if (m)
        fail_msg("%s loaded but should fail (code %d, \"%s\")", dir, code, needle2);
    if (err.code != code)
        fail_msg("%s: code %d, expected %d; message: %s", dir, err.code, code, err.msg);
    if (needle1 && !strstr(err.msg, needle1))
        fail_msg("message \"%s\" does not name \"%s\"", err.msg, needle1);
    if (needle2 && !strstr(err.msg, needle2))
        fail_msg("message \"%s\" does not name \"%s\"", err.msg, needle2);
    assert_null(strchr(err.msg, '\n'));
}

/* The bytes of tensor name in a safetensors file, found through cJSON. */
typedef struct file_tensor {
    char *file_bytes;
    const uint8_t *data;
    size_t bytes;
    char dtype[16];
} file_tensor;

static file_tensor read_tensor(const char *path, const char *name)
{
    file_tensor t = {0};
    size_t len;
    t.file_bytes = test_must_read_file(path, &len);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = header_len << 8 | (uint8_t)t.file_bytes[i];
    cJSON *root = cJSON_ParseWithLength(t.file_bytes + 8, header_len);
    assert_non_null(root);
    cJSON *entry = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!entry)
        fail_msg("%s: no %s", path, name);
    cJSON *offsets = cJSON_GetObjectItemCaseSensitive(entry, "data_offsets");
    size_t begin = (size_t)cJSON_GetArrayItem(offsets, 0)->valuedouble;
    size_t end = (size_t)cJSON_GetArrayItem(offsets, 1)->valuedouble;
    fmt_path(t.dtype, sizeof t.dtype, "%s",
             cJSON_GetObjectItemCaseSensitive(entry, "dtype")->valuestring);
    assert_true(8 + header_len + end <= len);
    t.data = (const uint8_t *)t.file_bytes + 8 + header_len + begin;
    t.bytes = end - begin;
    cJSON_Delete(root);
    return t;
}

static void assert_matrix(const kvd_matrix *m, kvd_dtype dtype, int rows, int cols)
{
    assert_int_equal(m->dtype, dtype);
    assert_int_equal(m->rows, rows);
    assert_int_equal(m->cols, cols);
    assert_non_null(m->data);
    assert_int_equal((uintptr_t)m->data % 64, 0);
}

/* Bytes the loader holds for a matrix: packed in panels (kvd_model.h). */
static size_t matrix_bytes(const kvd_matrix *m)
{
    return kvd_matrix_packed_bytes(m->dtype, m->rows, m->cols);
}

/* The file's value of element i of a row-major tensor of dtype name `dtype`. */
static float file_value(const char *dtype, const uint8_t *data, size_t i)
{
    float v;
    if (strcmp(dtype, "F32") == 0) {
        memcpy(&v, data + 4 * i, 4);
        return v;
    }
    uint16_t h;
    memcpy(&h, data + 2 * i, 2);
    return strcmp(dtype, "BF16") == 0 ? kvd_bf16_to_f32(h) : kvd_f16_to_f32(h);
}

/* ---------- setup ---------- */

static int setup_fixtures(void **state);

/* cmocka skips the group teardown when setup fails: clean up here instead. */
static int group_setup(void **state)
{
    int rc = setup_fixtures(state);
    if (rc != 0 && work_dir[0])
        remove_tree(work_dir);
    return rc;
}

static int setup_fixtures(void **state)
{
    const char *tmp = getenv("TMPDIR");
    fmt_path(work_dir, sizeof work_dir, "%s/kvd-model-test-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(work_dir))
        return -1;
    /* The loader never reads tokenizer.json; a stand-in keeps the test independent of
     * the fetched tokenizer. */
    fmt_path(tok_path, sizeof tok_path, "%s/tokenizer.json", work_dir);
    FILE *f = fopen(tok_path, "w");
    if (!f)
        return -1;
    fputs("{\"model\": {\"type\": \"BPE\"}}\n", f);
    fclose(f);

    fixtures *fx = calloc(1, sizeof *fx);
    if (!fx)
        return -1;
    fmt_path(fx->bf16_dir, PATH_MAX, "%s/tiny-bf16", work_dir);
    fmt_path(fx->f16_dir, PATH_MAX, "%s/tiny-f16", work_dir);
    fmt_path(fx->f32_dir, PATH_MAX, "%s/tiny-f32", work_dir);
    fmt_path(fx->sharded_dir, PATH_MAX, "%s/tiny-sharded", work_dir);
    if (run_mkmodel(fx->bf16_dir, "bf16", "1") != 0 || run_mkmodel(fx->f16_dir, "f16", "1") != 0 ||
        run_mkmodel(fx->f32_dir, "f32", "1") != 0 ||
        run_mkmodel(fx->sharded_dir, "bf16", "3") != 0) {
        fprintf(stderr, "test_model_load: %s failed\n", mkmodel_path);
        return -1;
    }
    kvd_error err = {0};
    fx->bf16 = kvd_model_load(fx->bf16_dir, NULL, &err);
    if (fx->bf16)
        fx->f16 = kvd_model_load(fx->f16_dir, NULL, &err);
    if (fx->f16)
        fx->f32 = kvd_model_load(fx->f32_dir, NULL, &err);
    if (fx->f32)
        fx->sharded = kvd_model_load(fx->sharded_dir, NULL, &err);
    if (!fx->sharded) {
        fprintf(stderr, "test_model_load: fixture load failed: %s\n", err.msg);
        return -1;
    }
    *state = fx;
    return 0;
}

static int group_teardown(void **state)
{
    fixtures *fx = *state;
    if (fx) {
        kvd_model_destroy(fx->bf16);
        kvd_model_destroy(fx->f16);
        kvd_model_destroy(fx->f32);
        kvd_model_destroy(fx->sharded);
        free(fx);
    }
    if (work_dir[0])
        remove_tree(work_dir);
    return 0;
}

/* ---------- successful loads ---------- */

static void check_tiny_shapes(const kvd_model *m, kvd_dtype dtype)
{
    const kvd_model_config *c = &m->config;
    assert_int_equal(c->vocab_size, TINY_VOCAB);
    assert_int_equal(c->hidden_size, TINY_HIDDEN);
    assert_int_equal(c->intermediate_size, TINY_INTERMEDIATE);
    assert_int_equal(c->num_layers, TINY_LAYERS);
    assert_int_equal(c->num_heads, 4);
    assert_int_equal(c->num_kv_heads, 2);
    assert_int_equal(c->head_dim, 16);
    assert_int_equal(c->max_position_embeddings, 4096);
    assert_float_equal(c->rms_norm_eps, 1e-6f, 0);
    assert_float_equal(c->rope_theta, 1000000.0f, 0);
    assert_true(c->tie_word_embeddings);
    assert_int_equal(c->torch_dtype, dtype);
    assert_int_equal(c->bos_token_id, 151643);
    /* config.json's 151645, then generation_config.json's [151645, 151643] merged. */
    assert_int_equal(c->num_eos_token_ids, 2);
    assert_int_equal(c->eos_token_ids[0], 151645);
    assert_int_equal(c->eos_token_ids[1], 151643);

    assert_float_equal(m->generation.temperature, 0.7f, 1e-7);
    assert_float_equal(m->generation.top_p, 0.8f, 1e-7);
    assert_int_equal(m->generation.top_k, 20);
    assert_float_equal(m->generation.repetition_penalty, 1.1f, 1e-7);
    assert_float_equal(m->generation.min_p, 0.0f, 0);
    assert_true(m->generation.do_sample);

    assert_matrix(&m->embed_tokens, dtype, TINY_VOCAB, TINY_HIDDEN);
    assert_matrix(&m->lm_head, dtype, TINY_VOCAB, TINY_HIDDEN);
    assert_ptr_equal(m->lm_head.data, m->embed_tokens.data); /* tied */
    assert_non_null(m->final_norm);
    size_t expected_bytes = matrix_bytes(&m->embed_tokens) + TINY_HIDDEN * sizeof(float);
    for (int i = 0; i < TINY_LAYERS; i++) {
        const kvd_layer_weights *l = &m->layers[i];
        assert_matrix(&l->q_proj, dtype, 64, TINY_HIDDEN);
        assert_matrix(&l->k_proj, dtype, 32, TINY_HIDDEN);
        assert_matrix(&l->v_proj, dtype, 32, TINY_HIDDEN);
        assert_matrix(&l->o_proj, dtype, TINY_HIDDEN, 64);
        assert_matrix(&l->gate_proj, dtype, TINY_INTERMEDIATE, TINY_HIDDEN);
        assert_matrix(&l->up_proj, dtype, TINY_INTERMEDIATE, TINY_HIDDEN);
        assert_matrix(&l->down_proj, dtype, TINY_HIDDEN, TINY_INTERMEDIATE);
        const float *vectors[] = {l->q_bias, l->k_bias, l->v_bias, l->input_norm, l->post_norm};
        for (int v = 0; v < 5; v++) {
            assert_non_null(vectors[v]);
            assert_int_equal((uintptr_t)vectors[v] % 64, 0);
        }
        expected_bytes += matrix_bytes(&l->q_proj) + matrix_bytes(&l->k_proj) +
                          matrix_bytes(&l->v_proj) + matrix_bytes(&l->o_proj) +
                          matrix_bytes(&l->gate_proj) + matrix_bytes(&l->up_proj) +
                          matrix_bytes(&l->down_proj) + (64 + 32 + 32 + 2 * TINY_HIDDEN) * 4;
    }
    assert_int_equal(m->weight_bytes, expected_bytes);
}

static void test_tiny_bf16_config_and_shapes(void **state)
{
    fixtures *fx = *state;
    check_tiny_shapes(fx->bf16, KVD_DTYPE_BF16);
    assert_string_equal(fx->bf16->dir, fx->bf16_dir);
}

static void test_tiny_f16_f32_and_sharded_shapes(void **state)
{
    fixtures *fx = *state;
    check_tiny_shapes(fx->f16, KVD_DTYPE_F16);
    check_tiny_shapes(fx->f32, KVD_DTYPE_F32);
    check_tiny_shapes(fx->sharded, KVD_DTYPE_BF16);
}

/* Matrices hold the file's bytes; vectors the file's values widened to float32. */
static void check_values_match_file(const kvd_model *m, const char *dir)
{
    char path[PATH_MAX];
    fmt_path(path, sizeof path, "%s/model.safetensors", dir);
    const kvd_layer_weights *l1 = &m->layers[1];
    struct {
        const char *name;
        const kvd_matrix *matrix;
    } matrices[] = {
        {"model.embed_tokens.weight", &m->embed_tokens},
        {"model.layers.1.self_attn.q_proj.weight", &l1->q_proj},
        {"model.layers.1.mlp.down_proj.weight", &l1->down_proj},
        {"model.layers.0.self_attn.o_proj.weight", &m->layers[0].o_proj},
    };
    for (size_t i = 0; i < sizeof matrices / sizeof matrices[0]; i++) {
        file_tensor t = read_tensor(path, matrices[i].name);
        assert_string_equal(t.dtype, kvd_st_dtype_name(matrices[i].matrix->dtype));
        const kvd_matrix *mx = matrices[i].matrix;
        assert_int_equal(t.bytes, (size_t)mx->rows * mx->cols * kvd_dtype_size(mx->dtype));
        float *row = malloc((size_t)mx->cols * sizeof(float));
        assert_non_null(row);
        for (int r = 0; r < mx->rows; r++) {
            kvd_matrix_row(row, mx, r);
            for (int k = 0; k < mx->cols; k++) {
                float want = file_value(t.dtype, t.data, (size_t)r * mx->cols + k);
                if (memcmp(&row[k], &want, sizeof want) != 0)
                    fail_msg("%s[%d][%d]: loaded %g, file %g", matrices[i].name, r, k, row[k], want);
            }
        }
        free(row);
        free(t.file_bytes);
    }
    struct {
        const char *name;
        const float *values;
        int n;
    } vectors[] = {
        {"model.layers.1.self_attn.k_proj.bias", l1->k_bias, 32},
        {"model.layers.0.post_attention_layernorm.weight", m->layers[0].post_norm, TINY_HIDDEN},
        {"model.norm.weight", m->final_norm, TINY_HIDDEN},
    };
    for (size_t i = 0; i < sizeof vectors / sizeof vectors[0]; i++) {
        file_tensor t = read_tensor(path, vectors[i].name);
        for (int k = 0; k < vectors[i].n; k++) {
            float want = file_value(t.dtype, t.data, (size_t)k);
            if (vectors[i].values[k] != want)
                fail_msg("%s[%d]: loaded %g, file %g", vectors[i].name, k, vectors[i].values[k],
                         want);
        }
        free(t.file_bytes);
    }
}

static void test_values_equal_file_bytes(void **state)
{
    fixtures *fx = *state;
    check_values_match_file(fx->bf16, fx->bf16_dir);
    check_values_match_file(fx->f16, fx->f16_dir);
    check_values_match_file(fx->f32, fx->f32_dir);
}

/* kvd-mkmodel draws the same float32 values in every dtype: the 16-bit checkpoints
 * must hold exactly the rounded float32 ones, and the weights must be varied. */
static void test_dtypes_hold_the_same_values(void **state)
{
    fixtures *fx = *state;
    const kvd_matrix *pairs[][3] = {
        {&fx->f32->embed_tokens, &fx->bf16->embed_tokens, &fx->f16->embed_tokens},
        {&fx->f32->layers[0].gate_proj, &fx->bf16->layers[0].gate_proj,
         &fx->f16->layers[0].gate_proj},
    };
    for (size_t p = 0; p < 2; p++) {
        int rows = pairs[p][0]->rows, cols = pairs[p][0]->cols;
        size_t n = (size_t)rows * (size_t)cols;
        float *f32 = malloc((size_t)cols * sizeof(float)), *bf16 = malloc((size_t)cols * sizeof(float));
        float *f16 = malloc((size_t)cols * sizeof(float));
        assert_true(f32 && bf16 && f16);
        double sum = 0, sum_sq = 0;
        for (int r = 0; r < rows; r++) {
            kvd_matrix_row(f32, pairs[p][0], r);
            kvd_matrix_row(bf16, pairs[p][1], r);
            kvd_matrix_row(f16, pairs[p][2], r);
            for (int i = 0; i < cols; i++) {
                float want_bf16 = kvd_bf16_to_f32(kvd_f32_to_bf16(f32[i]));
                float want_f16 = kvd_f16_to_f32(kvd_f32_to_f16(f32[i]));
                if (memcmp(&bf16[i], &want_bf16, 4) != 0 || memcmp(&f16[i], &want_f16, 4) != 0)
                    fail_msg("matrix %zu [%d][%d]: f32 %a, bf16 %a, f16 %a", p, r, i,
                             (double)f32[i], (double)bf16[i], (double)f16[i]);
                sum += f32[i];
                sum_sq += (double)f32[i] * f32[i];
            }
        }
        free(f32);
        free(bf16);
        free(f16);
        double mean = sum / (double)n, std = sqrt(sum_sq / (double)n - mean * mean);
        /* embeddings: N(0, 0.05); gate_proj: N(0, 1/sqrt(64) = 0.125) */
        double want_std = p == 0 ? 0.05 : 0.125;
        if (fabs(mean) > 0.05 * want_std || fabs(std - want_std) > 0.03 * want_std)
            fail_msg("matrix %zu: mean %g std %g, expected 0 and %g", p, mean, std, want_std);
    }
    for (int k = 0; k < TINY_HIDDEN; k++) {
        float want = kvd_bf16_to_f32(kvd_f32_to_bf16(fx->f32->final_norm[k]));
        assert_true(fx->bf16->final_norm[k] == want);
    }
}

static void test_sharded_equals_single_file(void **state)
{
    fixtures *fx = *state;
    const kvd_model *a = fx->bf16, *b = fx->sharded;
    assert_memory_equal(a->embed_tokens.data, b->embed_tokens.data, matrix_bytes(&a->embed_tokens));
    assert_memory_equal(a->final_norm, b->final_norm, TINY_HIDDEN * sizeof(float));
    for (int i = 0; i < TINY_LAYERS; i++) {
        const kvd_layer_weights *la = &a->layers[i], *lb = &b->layers[i];
        const kvd_matrix *ma[] = {&la->q_proj, &la->k_proj, &la->v_proj, &la->o_proj,
                                  &la->gate_proj, &la->up_proj, &la->down_proj};
        const kvd_matrix *mb[] = {&lb->q_proj, &lb->k_proj, &lb->v_proj, &lb->o_proj,
                                  &lb->gate_proj, &lb->up_proj, &lb->down_proj};
        for (int k = 0; k < 7; k++)
            assert_memory_equal(ma[k]->data, mb[k]->data, matrix_bytes(ma[k]));
        assert_memory_equal(la->q_bias, lb->q_bias, 64 * sizeof(float));
        assert_memory_equal(la->k_bias, lb->k_bias, 32 * sizeof(float));
        assert_memory_equal(la->v_bias, lb->v_bias, 32 * sizeof(float));
        assert_memory_equal(la->input_norm, lb->input_norm, TINY_HIDDEN * sizeof(float));
        assert_memory_equal(la->post_norm, lb->post_norm, TINY_HIDDEN * sizeof(float));
    }
    /* The three shard files really exist and the index is what was read. */
    char path[PATH_MAX];
    fmt_path(path, sizeof path, "%s/model-00003-of-00003.safetensors", fx->sharded_dir);
    assert_int_equal(access(path, R_OK), 0);
    fmt_path(path, sizeof path, "%s/model.safetensors", fx->sharded_dir);
    assert_int_not_equal(access(path, F_OK), 0);
}

static void test_progress_lines(void **state)
{
    fixtures *fx = *state;
    char log_path[PATH_MAX];
    fmt_path(log_path, sizeof log_path, "%s/progress.log", work_dir);
    fflush(stderr);
    int saved = dup(2);
    int fd = open(log_path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    assert_true(saved >= 0 && fd >= 0);
    dup2(fd, 2);
    close(fd);
    kvd_model_load_options opts = {.progress = true};
    kvd_error err = {0};
    kvd_model *m = kvd_model_load(fx->f32_dir, &opts, &err);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    assert_non_null(m);
    kvd_model_destroy(m);
    size_t len;
    char *log = test_must_read_file(log_path, &len);
    assert_non_null(strstr(log, "kvd: loading"));
    assert_non_null(strstr(log, "tensors)"));
    assert_non_null(strstr(log, "kvd: loaded"));
    assert_non_null(strstr(log, "26 tensors")); /* embed + 2 layers x 12 + norm (tied) */
    int lines = 0;
    for (char *p = log; *p; p++)
        lines += *p == '\n';
    /* one line per 5% at most (19: 5..95%) plus the final one */
    assert_in_range(lines, 2, 20);
    free(log);
}

/* ---------- refusals ---------- */

static void test_missing_config(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "no-config", dir);
    char path[PATH_MAX];
    fmt_path(path, sizeof path, "%s/config.json", dir);
    unlink(path);
    expect_load_error(dir, KVD_EIO, path, "No such file");
}

static void test_missing_safetensors(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "no-weights", dir);
    char path[PATH_MAX];
    fmt_path(path, sizeof path, "%s/model.safetensors", dir);
    unlink(path);
    expect_load_error(dir, KVD_EIO, path, "index.json");
}

static void test_truncated_in_header(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "cut-header", dir);
    truncate_copy(fx->bf16_dir, dir, "model.safetensors", 8 + 100);
    expect_load_error(dir, KVD_EFORMAT, "model.safetensors", "header length");
    clone_dir(fx->bf16_dir, "cut-length", dir);
    truncate_copy(fx->bf16_dir, dir, "model.safetensors", 5);
    expect_load_error(dir, KVD_EFORMAT, "model.safetensors", "too short");
}

static void test_truncated_in_data(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX], path[PATH_MAX];
    clone_dir(fx->bf16_dir, "cut-data", dir);
    fmt_path(path, sizeof path, "%s/model.safetensors", fx->bf16_dir);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    truncate_copy(fx->bf16_dir, dir, "model.safetensors", (size_t)st.st_size - 10);
    /* model.norm.weight is the last tensor in the file */
    expect_load_error(dir, KVD_EFORMAT, "model.safetensors", "model.norm.weight");
}

static void test_header_length_beyond_file(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX], path[PATH_MAX];
    clone_dir(fx->bf16_dir, "huge-length", dir);
    fmt_path(path, sizeof path, "%s/model.safetensors", fx->bf16_dir);
    size_t len;
    char *bytes = test_must_read_file(path, &len);
    uint64_t huge = (uint64_t)1 << 40;
    for (int i = 0; i < 8; i++)
        bytes[i] = (char)(huge >> (8 * i));
    fmt_path(path, sizeof path, "%s/model.safetensors", dir);
    write_file(path, bytes, len);
    free(bytes);
    expect_load_error(dir, KVD_EFORMAT, path, "header length 1099511627776 exceeds");
}

static void test_corrupt_json_header(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "bad-json", dir);
    edit_header(dir, "model.safetensors", "\"model.layers.0.self_attn.k_proj.bias\":{",
                "\"model.layers.0.self_attn.k_proj.bias\":[");
    expect_load_error(dir, KVD_EFORMAT, "model.safetensors", "corrupt JSON header");
    /* Same length, so the data section stays where it was. */
    assert_int_equal(file_header_len(dir, "model.safetensors"),
                     file_header_len(fx->bf16_dir, "model.safetensors"));
}

static void test_offsets_out_of_range(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "bad-offsets", dir);
    /* q_proj of layer 0: [19447808, 19456000] moved past the end of the data. */
    edit_header(dir, "model.safetensors", "\"data_offsets\":[19447808,19456000]",
                "\"data_offsets\":[99447808,99456000]");
    expect_load_error(dir, KVD_EFORMAT, "model.safetensors",
                      "tensor model.layers.0.self_attn.q_proj.weight");
    clone_dir(fx->bf16_dir, "reversed-offsets", dir);
    edit_header(dir, "model.safetensors", "\"data_offsets\":[19447808,19456000]",
                "\"data_offsets\":[19456000,19447808]");
    expect_load_error(dir, KVD_EFORMAT, "model.layers.0.self_attn.q_proj.weight", "end before");
    clone_dir(fx->bf16_dir, "short-offsets", dir);
    edit_header(dir, "model.safetensors", "\"data_offsets\":[19447808,19456000]",
                "\"data_offsets\":[19447808,19455998]");
    expect_load_error(dir, KVD_EFORMAT, "model.layers.0.self_attn.q_proj.weight", "needs");
}

static void test_wrong_shape(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "bad-shape", dir);
    /* Same element count, so the header stays consistent and only the loader objects. */
    edit_header(dir, "model.safetensors",
                "\"model.layers.1.mlp.gate_proj.weight\":{\"dtype\":\"BF16\",\"shape\":[128,64]",
                "\"model.layers.1.mlp.gate_proj.weight\":{\"dtype\":\"BF16\",\"shape\":[64,128]");
    expect_load_error(dir, KVD_EFORMAT, "model.layers.1.mlp.gate_proj.weight",
                      "shape [64, 128] but config.json implies [128, 64]");
    /* A config that disagrees with the file is the same fault seen from the other side. */
    clone_dir(fx->bf16_dir, "bad-shape-config", dir);
    edit_text_file(dir, "config.json", "\"intermediate_size\": 128", "\"intermediate_size\": 96");
    expect_load_error(dir, KVD_EFORMAT, "model.layers.0.mlp.gate_proj.weight", "[96, 64]");
}

static void test_unknown_dtype(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "i8", dir);
    /* 64 BF16 = 128 bytes = 128 I8: a valid file kvd cannot compute with. */
    edit_header(dir, "model.safetensors",
                "\"model.layers.0.input_layernorm.weight\":{\"dtype\":\"BF16\",\"shape\":[64]",
                "\"model.layers.0.input_layernorm.weight\":{\"dtype\":\"I8\",\"shape\":[128]");
    expect_load_error(dir, KVD_EUNSUPPORTED, "model.layers.0.input_layernorm.weight",
                      "dtype I8");
    clone_dir(fx->bf16_dir, "q4", dir);
    edit_header(dir, "model.safetensors",
                "\"model.norm.weight\":{\"dtype\":\"BF16\"", "\"model.norm.weight\":{\"dtype\":\"Q4\"");
    expect_load_error(dir, KVD_EUNSUPPORTED, "model.norm.weight", "unknown dtype \"Q4\"");
}

static void test_mixed_matrix_dtypes(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "mixed", dir);
    edit_header(dir, "model.safetensors",
                "\"model.layers.1.mlp.up_proj.weight\":{\"dtype\":\"BF16\"",
                "\"model.layers.1.mlp.up_proj.weight\":{\"dtype\":\"F16\"");
    /* Matrices may mix dtypes (quantized GGUFs do): each keeps its own. */
    kvd_error err = {0};
    kvd_model *m = kvd_model_load(dir, NULL, &err);
    if (!m)
        fail_msg("%s", err.msg);
    assert_int_equal(m->layers[1].up_proj.dtype, KVD_DTYPE_F16);
    assert_int_equal(m->layers[1].gate_proj.dtype, KVD_DTYPE_BF16);
    assert_int_equal(m->layers[0].up_proj.dtype, KVD_DTYPE_BF16);
    kvd_model_destroy(m);
}

static void test_missing_tensor(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "no-tensor", dir);
    edit_header(dir, "model.safetensors", "\"model.layers.1.mlp.up_proj.weight\"",
                "\"model.layers.1.mlp.up_proj.weigh_\"");
    expect_load_error(dir, KVD_EFORMAT, "model.safetensors",
                      "missing tensor model.layers.1.mlp.up_proj.weight");
    /* Untied embeddings need an lm_head the file does not have. */
    clone_dir(fx->bf16_dir, "untied", dir);
    edit_text_file(dir, "config.json", "\"tie_word_embeddings\": true",
                   "\"tie_word_embeddings\": false");
    expect_load_error(dir, KVD_EFORMAT, "model.safetensors", "missing tensor lm_head.weight");
}

static void test_duplicate_tensor(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "dup", dir);
    edit_header(dir, "model.safetensors", "\"model.layers.0.self_attn.v_proj.bias\"",
                "\"model.layers.0.self_attn.k_proj.bias\"");
    expect_load_error(dir, KVD_EFORMAT, "model.layers.0.self_attn.k_proj.bias", "twice");
}

static void test_unsupported_architecture(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "llama", dir);
    edit_text_file(dir, "config.json", "Qwen2ForCausalLM", "LlamaForCausalLM");
    expect_load_error(dir, KVD_EUNSUPPORTED, "config.json", "\"LlamaForCausalLM\"");
}

static void test_missing_config_key(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "no-hidden", dir);
    edit_text_file(dir, "config.json", "\"hidden_size\": 64,", "");
    expect_load_error(dir, KVD_EFORMAT, "config.json", "missing key \"hidden_size\"");
}

static void test_non_numeric_config_value(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "layers-two", dir);
    edit_text_file(dir, "config.json", "\"num_hidden_layers\": 2", "\"num_hidden_layers\": \"two\"");
    expect_load_error(dir, KVD_EFORMAT, "config.json", "\"num_hidden_layers\" must be an integer");
    clone_dir(fx->bf16_dir, "eps-string", dir);
    edit_text_file(dir, "config.json", "\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": \"1e-6\"");
    expect_load_error(dir, KVD_EFORMAT, "config.json", "\"rms_norm_eps\" must be a number");
    clone_dir(fx->bf16_dir, "heads-fraction", dir);
    edit_text_file(dir, "config.json", "\"num_attention_heads\": 4", "\"num_attention_heads\": 4.5");
    expect_load_error(dir, KVD_EFORMAT, "config.json", "num_attention_heads");
}

static void test_corrupt_generation_config(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX];
    clone_dir(fx->bf16_dir, "bad-gen", dir);
    edit_text_file(dir, "generation_config.json", "\"top_k\": 20", "\"top_k\": \"twenty\"");
    expect_load_error(dir, KVD_EFORMAT, "generation_config.json", "top_k");
    /* Absent is fine: neutral defaults, config.json's eos only. */
    clone_dir(fx->bf16_dir, "no-gen", dir);
    char path[PATH_MAX];
    fmt_path(path, sizeof path, "%s/generation_config.json", dir);
    unlink(path);
    kvd_error err = {0};
    kvd_model *m = kvd_model_load(dir, NULL, &err);
    assert_non_null(m);
    assert_float_equal(m->generation.temperature, 1.0f, 0);
    assert_float_equal(m->generation.top_p, 1.0f, 0);
    assert_int_equal(m->generation.top_k, 0);
    assert_float_equal(m->generation.repetition_penalty, 1.0f, 0);
    assert_false(m->generation.do_sample);
    assert_int_equal(m->config.num_eos_token_ids, 1);
    assert_int_equal(m->config.eos_token_ids[0], 151645);
    kvd_model_destroy(m);
}

static void test_sharded_refusals(void **state)
{
    fixtures *fx = *state;
    char dir[PATH_MAX], path[PATH_MAX];
    clone_dir(fx->sharded_dir, "shard-missing", dir);
    fmt_path(path, sizeof path, "%s/model-00002-of-00003.safetensors", dir);
    unlink(path);
    expect_load_error(dir, KVD_EIO, path, "No such file");

    clone_dir(fx->sharded_dir, "index-lacks", dir);
    edit_text_file(dir, "model.safetensors.index.json", "\"model.norm.weight\"",
                   "\"model.norm.weigh_\"");
    expect_load_error(dir, KVD_EFORMAT, "model.safetensors.index.json",
                      "missing tensor model.norm.weight");

    clone_dir(fx->sharded_dir, "index-escape", dir);
    edit_text_file(dir, "model.safetensors.index.json", "\"model-00002-of-00003.safetensors\"",
                   "\"../model-00002-of-00003.safetensors\"");
    expect_load_error(dir, KVD_EFORMAT, "model.safetensors.index.json", "not a file name");

    /* The index names shard 1 for a tensor that lives in shard 3. */
    clone_dir(fx->sharded_dir, "index-wrong-shard", dir);
    edit_text_file(dir, "model.safetensors.index.json",
                   "\"model.norm.weight\": \"model-00003-of-00003.safetensors\"",
                   "\"model.norm.weight\": \"model-00001-of-00003.safetensors\"");
    expect_load_error(dir, KVD_EFORMAT, "model-00001-of-00003.safetensors",
                      "missing tensor model.norm.weight");

    clone_dir(fx->sharded_dir, "index-corrupt", dir);
    edit_text_file(dir, "model.safetensors.index.json", "\"weight_map\"", "\"weights\"");
    expect_load_error(dir, KVD_EFORMAT, "model.safetensors.index.json", "weight_map");
}

/* ---------- the parsers on bytes in memory ---------- */

static int parse_bytes(kvd_st_header *h, const char *json, kvd_error *err)
{
    size_t n = strlen(json);
    uint8_t *buf = calloc(1, 8 + n + 16);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)((uint64_t)n >> (8 * i));
    memcpy(buf + 8, json, n);
    /* 16 data bytes follow the header */
    int rc = kvd_st_header_parse(h, buf, 8 + n + 16, "mem.safetensors", err);
    free(buf);
    return rc;
}

static void test_header_parser_cases(void **state)
{
    (void)state;
    kvd_st_header h = {0};
    kvd_error err = {0};
    assert_int_equal(parse_bytes(&h, "{}", &err), 0);
    assert_int_equal(h.num_tensors, 0);
    assert_int_equal(h.data_start, 10);
    assert_int_equal(h.data_size, 16);
    kvd_st_header_deinit(&h);

    assert_int_equal(parse_bytes(&h,
                                 "{\"b\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
                                 "\"a\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[3,4]},"
                                 "\"__metadata__\":{\"format\":\"pt\"}}   ",
                                 &err),
                     0);
    assert_int_equal(h.num_tensors, 2);
    const kvd_st_tensor *a = kvd_st_header_find(&h, "a"), *b = kvd_st_header_find(&h, "b");
    assert_non_null(a);
    assert_non_null(b);
    assert_null(kvd_st_header_find(&h, "c"));
    assert_false(a->supported);
    assert_int_equal(a->ndim, 0);
    assert_int_equal(a->numel, 1);
    assert_true(b->supported);
    assert_int_equal(b->dtype, KVD_DTYPE_F32);
    assert_int_equal(b->shape[0], 2);
    assert_int_equal(b->end, 16);
    kvd_st_header_deinit(&h);

    static const struct {
        const char *json;
        const char *needle;
    } bad[] = {
        {"[]", "not a JSON object"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}} x", "junk"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,17]}}", "past the end"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,-16]}}", "non-negative"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4.5],\"data_offsets\":[0,16]}}", "shape[0]"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
         "\"data_offsets\":[0,16]}}",
         "overflows"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}",
         "dimensions"},
        {"{\"a\":{\"dtype\":7,\"shape\":[4],\"data_offsets\":[0,16]}}", "dtype"},
        {"{\"a\":{\"shape\":[4],\"data_offsets\":[0,16]}}", "dtype"},
        {"{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,16]}}", "shape"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4]}}", "data_offsets"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0]}}", "data_offsets"},
        {"{\"a\":5}", "not an object"},
        {"{\"__metadata__\":[1]}", "__metadata__"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,1e400]}}", "non-negative"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err = (kvd_error){0};
        int rc = parse_bytes(&h, bad[i].json, &err);
        if (rc != KVD_EFORMAT || !strstr(err.msg, bad[i].needle) ||
            !strstr(err.msg, "mem.safetensors"))
            fail_msg("case %zu: rc %d, message \"%s\", wanted \"%s\"", i, rc, err.msg,
                     bad[i].needle);
        assert_null(h.tensors); /* untouched on failure */
    }
    uint8_t tiny[4] = {1, 2, 3, 4};
    assert_int_equal(kvd_st_header_parse(&h, tiny, sizeof tiny, "t", &err), KVD_EFORMAT);
}

static void test_header_builder_round_trip(void **state)
{
    (void)state;
    kvd_st_spec specs[] = {
        {.name = "w \"quoted\"", .dtype = KVD_DTYPE_BF16, .ndim = 2, .shape = {3, 5}},
        {.name = "v", .dtype = KVD_DTYPE_F32, .ndim = 1, .shape = {7}},
    };
    char *bytes;
    size_t len;
    uint64_t data_bytes;
    kvd_error err = {0};
    assert_int_equal(kvd_st_header_build(specs, 2, &bytes, &len, &data_bytes, &err), 0);
    assert_int_equal(len % 8, 0);
    assert_int_equal(data_bytes, 3 * 5 * 2 + 7 * 4);
    char *file = calloc(1, len + data_bytes);
    assert_non_null(file);
    memcpy(file, bytes, len);
    kvd_st_header h = {0};
    assert_int_equal(kvd_st_header_parse(&h, file, len + data_bytes, "rt", &err), 0);
    assert_int_equal(h.data_start, len);
    const kvd_st_tensor *w = kvd_st_header_find(&h, "w \"quoted\"");
    assert_non_null(w);
    assert_int_equal(w->begin, 0);
    assert_int_equal(w->end, 30);
    const kvd_st_tensor *v = kvd_st_header_find(&h, "v");
    assert_int_equal(v->begin, 30);
    assert_int_equal(v->end, 58);
    kvd_st_header_deinit(&h);
    /* One byte short of the data: the last tensor is out of range. */
    assert_int_equal(kvd_st_header_parse(&h, file, len + data_bytes - 1, "rt", &err), KVD_EFORMAT);
    assert_non_null(strstr(err.msg, "tensor v"));
    free(file);
    free(bytes);
}

static const char *good_config =
    "{\"architectures\": [\"Qwen2ForCausalLM\"], \"model_type\": \"qwen2\", \"vocab_size\": 1000,"
    " \"hidden_size\": 64, \"intermediate_size\": 96, \"num_hidden_layers\": 3,"
    " \"num_attention_heads\": 8, \"num_key_value_heads\": 2, \"max_position_embeddings\": 512,"
    " \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000, \"tie_word_embeddings\": false,"
    " \"torch_dtype\": \"float16\", \"eos_token_id\": [7, 9, 7], \"head_dim\": 8%s}";

static int parse_config_variant(const char *extra, kvd_model_config *cfg, kvd_error *err)
{
    char text[2048];
    fmt_path(text, sizeof text, good_config, extra);
    return kvd_model_config_parse(text, strlen(text), "cfg.json", cfg, err);
}

static void test_config_parser_cases(void **state)
{
    (void)state;
    kvd_model_config cfg;
    kvd_error err = {0};
    assert_int_equal(parse_config_variant("", &cfg, &err), 0);
    assert_int_equal(cfg.vocab_size, 1000);
    assert_int_equal(cfg.num_layers, 3);
    assert_int_equal(cfg.head_dim, 8);
    assert_false(cfg.tie_word_embeddings);
    assert_int_equal(cfg.torch_dtype, KVD_DTYPE_F16);
    assert_int_equal(cfg.bos_token_id, -1);
    assert_int_equal(cfg.num_eos_token_ids, 2);
    assert_int_equal(cfg.eos_token_ids[0], 7);
    assert_int_equal(cfg.eos_token_ids[1], 9);
    assert_float_equal(cfg.rms_norm_eps, 1e-5f, 0);

    /* Each case appends a key; when the base already has it, the base's copy is renamed
     * (cJSON would return the first of two equal keys). */
    static const struct {
        const char *key;
        const char *extra;
        int code;
        const char *needle;
    } bad[] = {
        {"\"head_dim\"", ", \"head_dim\": 16", KVD_EFORMAT, "head_dim"},
        {"\"rope_scaling\"", ", \"rope_scaling\": {\"type\": \"yarn\"}", KVD_EUNSUPPORTED,
         "rope_scaling"},
        {"\"use_sliding_window\"", ", \"use_sliding_window\": true", KVD_EUNSUPPORTED,
         "use_sliding_window"},
        {"\"hidden_act\"", ", \"hidden_act\": \"gelu\"", KVD_EUNSUPPORTED, "hidden_act"},
        {"\"model_type\"", ", \"model_type\": \"llama\"", KVD_EUNSUPPORTED, "model_type"},
        {"\"num_key_value_heads\"", ", \"num_key_value_heads\": 3", KVD_EFORMAT,
         "num_key_value_heads"},
        {"\"vocab_size\"", ", \"vocab_size\": 0", KVD_EFORMAT, "vocab_size"},
        {"\"rope_theta\"", ", \"rope_theta\": -1", KVD_EFORMAT, "rope_theta"},
        {"\"bos_token_id\"", ", \"bos_token_id\": 5000", KVD_EFORMAT, "bos_token_id"},
        {"\"eos_token_id\"", ", \"eos_token_id\": \"</s>\"", KVD_EFORMAT, "eos_token_id"},
        {"\"tie_word_embeddings\"", ", \"tie_word_embeddings\": 1", KVD_EFORMAT,
         "tie_word_embeddings"},
        {"\"architectures\"", ", \"architectures\": []", KVD_EFORMAT, "architectures"},
        {"\"rms_norm_eps\"", ", \"rms_norm_eps\": null", KVD_EFORMAT, "rms_norm_eps"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char text[2048];
        fmt_path(text, sizeof text, good_config, bad[i].extra);
        char *first = strstr(text, bad[i].key);
        char *second = first ? strstr(first + 1, bad[i].key) : NULL;
        if (second)
            first[1] = 'X';
        kvd_model_config before = cfg;
        err = (kvd_error){0};
        int rc = kvd_model_config_parse(text, strlen(text), "cfg.json", &cfg, &err);
        if (rc != bad[i].code || !strstr(err.msg, bad[i].needle) || !strstr(err.msg, "cfg.json"))
            fail_msg("case %zu (%s): rc %d, message \"%s\"", i, bad[i].extra, rc, err.msg);
        assert_memory_equal(&before, &cfg, sizeof cfg); /* untouched on failure */
    }
    assert_int_equal(kvd_model_config_parse("{\"architectures\": [", 19, "x.json", &cfg, &err),
                     KVD_EFORMAT);
    assert_non_null(strstr(err.msg, "x.json"));
    assert_int_equal(kvd_model_config_parse("", 0, "x.json", &cfg, &err), KVD_EFORMAT);
}

/* The weights arena and the engine's logits come from kvd_huge_alloc: 2 MiB aligned,
 * whole huge pages, zero-filled and writable, whatever size is asked. */
static void test_huge_alloc(void **state)
{
    (void)state;
    const size_t sizes[] = {0, 1, 4096, ((size_t)2 << 20) - 1, (size_t)2 << 20, ((size_t)5 << 20) + 3};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        size_t mapped = 0;
        unsigned char *p = kvd_huge_alloc(sizes[i], &mapped);
        assert_non_null(p);
        assert_int_equal((uintptr_t)p % ((size_t)2 << 20), 0);
        assert_int_equal(mapped % ((size_t)2 << 20), 0);
        assert_true(mapped >= sizes[i] && mapped - sizes[i] < ((size_t)2 << 20) + (sizes[i] == 0));
        for (size_t b = 0; b < mapped; b += 4096) {
            assert_int_equal(p[b], 0);
            p[b] = 0xA5;
        }
        assert_int_equal(p[mapped - 1], 0);
        kvd_huge_free(p, mapped);
    }
    kvd_huge_free(NULL, 0);
}

int main(int argc, char **argv)
{
    const char *mk = argc > 1 ? argv[1] : getenv("KVD_MKMODEL");
    if (mk && *mk) {
        fmt_path(mkmodel_path, sizeof mkmodel_path, "%s", mk);
    } else {
        const char *root = getenv("KVD_BUILD_ROOT");
        fmt_path(mkmodel_path, sizeof mkmodel_path, "%s/tools/kvd-mkmodel", root ? root : ".");
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_bf16_config_and_shapes),
        cmocka_unit_test(test_tiny_f16_f32_and_sharded_shapes),
        cmocka_unit_test(test_values_equal_file_bytes),
        cmocka_unit_test(test_dtypes_hold_the_same_values),
        cmocka_unit_test(test_sharded_equals_single_file),
        cmocka_unit_test(test_progress_lines),
        cmocka_unit_test(test_missing_config),
        cmocka_unit_test(test_missing_safetensors),
        cmocka_unit_test(test_truncated_in_header),
        cmocka_unit_test(test_truncated_in_data),
        cmocka_unit_test(test_header_length_beyond_file),
        cmocka_unit_test(test_corrupt_json_header),
        cmocka_unit_test(test_offsets_out_of_range),
        cmocka_unit_test(test_wrong_shape),
        cmocka_unit_test(test_unknown_dtype),
        cmocka_unit_test(test_mixed_matrix_dtypes),
        cmocka_unit_test(test_missing_tensor),
        cmocka_unit_test(test_duplicate_tensor),
        cmocka_unit_test(test_unsupported_architecture),
        cmocka_unit_test(test_missing_config_key),
        cmocka_unit_test(test_non_numeric_config_value),
        cmocka_unit_test(test_corrupt_generation_config),
        cmocka_unit_test(test_sharded_refusals),
        cmocka_unit_test(test_header_parser_cases),
        cmocka_unit_test(test_header_builder_round_trip),
        cmocka_unit_test(test_config_parser_cases),
        cmocka_unit_test(test_huge_alloc),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
