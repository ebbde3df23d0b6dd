/* test_quant_forward.c - the forward pass over quantized weights, on the tiny fixture
 * with every matrix (embedding and tied lm_head included) quantized to Q8_0, Q4_0 or
 * Q5_0 (its 64-wide rows take no 256-value K blocks; those are test_quant's).
 *
 * (1) Against the numpy reference (tests/reference/qwen2_ref.py, float64) run on the
 *     dequantized weights, written here as an F32 checkpoint: teacher-forced logits of a
 *     prompt + DECODE_STEPS steps stay within QUANT_TOLERANCE. kvd quantizes the
 *     activations to 8 bits per block of 32 (as llama.cpp does); the reference does not,
 *     so that rounding alone sets the error (measured figures are printed and in
 *     docs/benchmarks.md).
 * (2) Batch invariance: a sequence's logits alone == beside two others, in chunks, on 2
 *     threads (bitwise), and the scalar build == the AVX-512 VNNI build (bitwise).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "test_files.h"

#include "kvd/kvd_forward.h"
#include "kvd/kvd_kernels.h"
#include "kvd/kvd_kv.h"
#include "kvd/kvd_model.h"
#include "kvd/kvd_quant.h"

#define DECODE_STEPS 8
/* |kvd - reference| <= QUANT_TOLERANCE * max(1, |reference|) for every logit. Measured
 * on this fixture over the prompt + 8 steps (3.5M logits): 0.0545 (Q8_0), 0.0547 (Q4_0),
 * 0.0568 (Q5_0), greedy ids equal at every step; the 8-bit activations set it (the same
 * for every weight type), and the bound leaves a 1.8x margin. An indexing or format bug
 * moves logits by O(1). */
#define QUANT_TOLERANCE 0.1

static const int32_t prompt_a[] = {785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13, 576,
                                   3974, 13876, 38835, 34208};
static const int32_t prompt_b[] = {9707, 11, 1879, 0};
static const int32_t prompt_c[] = {1958, 600, 304, 2088, 7, 16, 15, 982, 262, 1173, 1956, 8, 198};
#define LEN(a) (int)(sizeof(a) / sizeof((a)[0]))

static kvd_model *g_base;
static int g_vocab;

typedef struct qmodel {
    kvd_model model;
    kvd_layer_weights *layers;
} qmodel;

static void quantize_into(kvd_matrix *m, kvd_dtype dtype)
{
    kvd_matrix q;
    kvd_error err = {0};
    if (kvd_quant_matrix_create(&q, dtype, m, &err) != 0)
        fail_msg("quantize: %s", err.msg);
    *m = q;
}

/* g_base with every matrix quantized to dtype (the tied lm_head shares the embedding). */
static qmodel make_qmodel(kvd_dtype dtype)
{
    qmodel q;
    q.model = *g_base;
    int L = g_base->config.num_layers;
    q.layers = malloc((size_t)L * sizeof *q.layers);
    memcpy(q.layers, g_base->layers, (size_t)L * sizeof *q.layers);
    for (int l = 0; l < L; l++) {
        kvd_layer_weights *w = &q.layers[l];
        kvd_matrix *mats[] = {&w->q_proj, &w->k_proj, &w->v_proj, &w->o_proj,
                              &w->gate_proj, &w->up_proj, &w->down_proj};
        for (int i = 0; i < 7; i++)
            quantize_into(mats[i], dtype);
    }
    q.model.layers = q.layers;
    bool tied = g_base->lm_head.data == g_base->embed_tokens.data;
    quantize_into(&q.model.embed_tokens, dtype);
    if (tied)
        q.model.lm_head = q.model.embed_tokens;
    else
        quantize_into(&q.model.lm_head, dtype);
    return q;
}

static void free_qmodel(qmodel *q)
{
    for (int l = 0; l < q->model.config.num_layers; l++) {
        kvd_layer_weights *w = &q->layers[l];
        const kvd_matrix *mats[] = {&w->q_proj, &w->k_proj, &w->v_proj, &w->o_proj,
                                    &w->gate_proj, &w->up_proj, &w->down_proj};
        for (int i = 0; i < 7; i++)
            free((void *)mats[i]->data);
    }
    if (q->model.lm_head.data != q->model.embed_tokens.data)
        free((void *)q->model.lm_head.data);
    free((void *)q->model.embed_tokens.data);
    free(q->layers);
}

static int setup(void **state)
{
    (void)state;
    const char *dir = getenv("KVD_TINY_MODEL");
    if (!dir || !getenv("KVD_SOURCE_ROOT")) {
        fprintf(stderr, "test_quant_forward: KVD_TINY_MODEL and KVD_SOURCE_ROOT must be set\n");
        return -1;
    }
    kvd_error err = {0};
    g_base = kvd_model_load(dir, NULL, &err);
    if (!g_base) {
        fprintf(stderr, "test_quant_forward: %s (run scripts/fixtures.sh BUILD_DIR)\n", err.msg);
        return -1;
    }
    g_vocab = g_base->config.vocab_size;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    kvd_model_destroy(g_base);
    return 0;
}

/* ---- a driver: one pool, one context ---------------------------------------------- */

typedef struct runner {
    kvd_kv_pool *pool;
    kvd_forward_ctx *ctx;
} runner;

static runner make_runner(const kvd_model *model, int block_size, int threads)
{
    kvd_kv_config cfg = {
        .num_layers = model->config.num_layers, .num_kv_heads = model->config.num_kv_heads,
        .head_dim = model->config.head_dim, .block_size = block_size, .dtype = KVD_DTYPE_F32,
        .num_blocks = (size_t)(1024 / block_size + 16),
    };
    kvd_error err = {0};
    runner r;
    r.pool = kvd_kv_pool_create(&cfg, &err);
    if (!r.pool)
        fail_msg("pool: %s", err.msg);
    r.ctx = kvd_forward_create(model, r.pool, 128, 4, 128, threads, &err);
    if (!r.ctx)
        fail_msg("forward: %s", err.msg);
    return r;
}

static void free_runner(runner *r)
{
    kvd_forward_destroy(r->ctx);
    kvd_kv_pool_destroy(r->pool);
}

/* Prompt (every row's logits), then steps decode steps feeding forced[k] (or the
 * argmax when forced is NULL, its ids to out_ids). logits: (n + steps) rows. */
static void decode(runner *r, const int32_t *prompt, int n, int steps, const int32_t *forced,
                   float *logits, int32_t *out_ids)
{
    int32_t ids[128];
    memcpy(ids, prompt, (size_t)n * sizeof(int32_t));
    kvd_block_table table;
    kvd_block_table_init(&table);
    kvd_error err = {0};
    for (int k = -1; k < steps; k++) {
        int past = k < 0 ? 0 : n + k, num = k < 0 ? n : 1;
        if (k >= 0) {
            int best = kvd_argmax(logits + (size_t)(n - 1 + k) * g_vocab, g_vocab);
            if (out_ids)
                out_ids[k] = best;
            ids[n + k] = forced ? forced[k] : best;
        }
        assert_int_equal(kvd_block_table_append(r->pool, &table, num, &err), 0);
        kvd_forward_seq seq = {&table, past, num, 0, k < 0 ? KVD_LOGITS_ALL : KVD_LOGITS_LAST};
        kvd_forward_batch batch = {ids + past, num, &seq, 1,
                                   logits + (size_t)(k < 0 ? 0 : n + k) * g_vocab};
        if (kvd_forward(r->ctx, &batch, &err) != 0)
            fail_msg("forward: %s", err.msg);
    }
    kvd_block_table_deinit(r->pool, &table);
}

/* ---- (1) against the numpy reference on the dequantized weights --------------------- */

static void put_u64(FILE *f, uint64_t v)
{
    fwrite(&v, sizeof v, 1, f);
}

/* dir/model.safetensors: the quantized model's matrices dequantized (F32) and the base
 * model's vectors; dir/config.json: the base's. */
static void write_dequantized(const qmodel *q, const char *dir)
{
    const kvd_model *m = &q->model;
    int L = m->config.num_layers, H = m->config.hidden_size;
    typedef struct { char name[96]; const kvd_matrix *mat; const float *vec; int n; } entry;
    entry e[16 * 16 + 4];
    int ne = 0;
    e[ne++] = (entry){"model.embed_tokens.weight", &m->embed_tokens, NULL, 0};
    e[ne++] = (entry){"model.norm.weight", NULL, m->final_norm, H};
    static const char *const mat_names[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                            "mlp.down_proj"};
    for (int l = 0; l < L; l++) {
        const kvd_layer_weights *w = &m->layers[l];
        const kvd_matrix *mats[] = {&w->q_proj, &w->k_proj, &w->v_proj, &w->o_proj,
                                    &w->gate_proj, &w->up_proj, &w->down_proj};
        for (int i = 0; i < 7; i++) {
            e[ne] = (entry){"", mats[i], NULL, 0};
            snprintf(e[ne++].name, 96, "model.layers.%d.%s.weight", l, mat_names[i]);
        }
        const float *vecs[] = {w->q_bias, w->k_bias, w->v_bias, w->input_norm, w->post_norm};
        int lens[] = {w->q_proj.rows, w->k_proj.rows, w->v_proj.rows, H, H};
        static const char *const vec_names[] = {"self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                                "self_attn.v_proj.bias", "input_layernorm.weight",
                                                "post_attention_layernorm.weight"};
        for (int i = 0; i < 5; i++) {
            e[ne] = (entry){"", NULL, vecs[i], lens[i]};
            snprintf(e[ne++].name, 96, "model.layers.%d.%s", l, vec_names[i]);
        }
    }
    char header[65536] = "{";
    size_t offset = 0;
    for (int i = 0; i < ne; i++) {
        size_t bytes = e[i].mat ? (size_t)e[i].mat->rows * e[i].mat->cols * 4 : (size_t)e[i].n * 4;
        char shape[64];
        if (e[i].mat)
            snprintf(shape, sizeof shape, "[%d,%d]", e[i].mat->rows, e[i].mat->cols);
        else
            snprintf(shape, sizeof shape, "[%d]", e[i].n);
        snprintf(header + strlen(header), sizeof header - strlen(header),
                 "%s\"%s\":{\"dtype\":\"F32\",\"shape\":%s,\"data_offsets\":[%zu,%zu]}", i ? "," : "",
                 e[i].name, shape, offset, offset + bytes);
        offset += bytes;
    }
    strcat(header, "}");
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    put_u64(f, strlen(header));
    fwrite(header, 1, strlen(header), f);
    for (int i = 0; i < ne; i++) {
        if (!e[i].mat) {
            fwrite(e[i].vec, sizeof(float), (size_t)e[i].n, f);
            continue;
        }
        float *row = malloc((size_t)e[i].mat->cols * sizeof(float));
        for (int r = 0; r < e[i].mat->rows; r++) {
            kvd_matrix_row(row, e[i].mat, r);
            fwrite(row, sizeof(float), (size_t)e[i].mat->cols, f);
        }
        free(row);
    }
    assert_int_equal(fclose(f), 0);
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "cp '%s/config.json' '%s/config.json'", getenv("KVD_TINY_MODEL"), dir);
    assert_int_equal(system(cmd), 0);
}

static void test_matches_reference(void **state)
{
    (void)state;
    static const kvd_dtype types[] = {KVD_DTYPE_Q8_0, KVD_DTYPE_Q4_0, KVD_DTYPE_Q5_0};
    int n = LEN(prompt_a);
    size_t V = (size_t)g_vocab, rows = (size_t)(n + DECODE_STEPS);
    for (int t = 0; t < 3; t++) {
        qmodel q = make_qmodel(types[t]);
        char dir[] = "/tmp/kvd-quant-forward-XXXXXX";
        assert_non_null(mkdtemp(dir));
        write_dequantized(&q, dir);
        char ids[512] = "", cmd[8192], out[4200];
        for (int i = 0; i < n; i++)
            snprintf(ids + strlen(ids), sizeof ids - strlen(ids), "%s%d", i ? "," : "", prompt_a[i]);
        snprintf(out, sizeof out, "%s/ref.bin", dir);
        snprintf(cmd, sizeof cmd,
                 "/usr/bin/python3 '%s/tests/reference/qwen2_ref.py' --model '%s' --prompt-ids %s "
                 "--decode-steps %d --out '%s'",
                 getenv("KVD_SOURCE_ROOT"), dir, ids, DECODE_STEPS, out);
        if (system(cmd) != 0)
            fail_msg("could not run the reference: %s", cmd);
        size_t len = 0;
        float *ref = (float *)test_read_file(out, &len);
        assert_non_null(ref);
        assert_int_equal(len, rows * V * sizeof(float));
        /* the reference's greedy ids, teacher-forced into kvd */
        int32_t forced[DECODE_STEPS];
        for (int k = 0; k < DECODE_STEPS; k++)
            forced[k] = kvd_argmax(ref + (size_t)(n - 1 + k) * V, g_vocab);
        float *got = malloc(rows * V * sizeof(float));
        int32_t got_ids[DECODE_STEPS];
        runner r = make_runner(&q.model, 16, 1);
        decode(&r, prompt_a, n, DECODE_STEPS, forced, got, got_ids);
        free_runner(&r);
        double worst = 0;
        int same_ids = 0;
        for (size_t i = 0; i < rows * V; i++) {
            double err = fabs((double)got[i] - ref[i]) / fmax(1.0, fabs(ref[i]));
            worst = err > worst ? err : worst;
        }
        for (int k = 0; k < DECODE_STEPS; k++)
            same_ids += got_ids[k] == forced[k];
        print_message("%s: max |kvd - numpy(dequantized)| / max(1,|ref|) = %.3g over %zu logits; "
                      "greedy ids equal at %d of %d steps\n",
                      kvd_dtype_name(types[t]), worst, rows * V, same_ids, DECODE_STEPS);
        if (worst > QUANT_TOLERANCE)
            fail_msg("%s: logit error %g > %g", kvd_dtype_name(types[t]), worst, QUANT_TOLERANCE);
        free(got);
        free(ref);
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        assert_int_equal(system(cmd), 0);
        free_qmodel(&q);
    }
}

/* ---- (2) batch invariance, scalar == VNNI ------------------------------------------ */

static void test_batch_invariance(void **state)
{
    (void)state;
    static const kvd_dtype types[] = {KVD_DTYPE_Q8_0, KVD_DTYPE_Q4_0, KVD_DTYPE_Q5_0};
    size_t V = (size_t)g_vocab;
    int na = LEN(prompt_a);
    for (int t = 0; t < 3; t++) {
        qmodel q = make_qmodel(types[t]);
        float *alone = malloc((size_t)(na + DECODE_STEPS) * V * sizeof(float));
        int32_t alone_ids[DECODE_STEPS];
        runner r1 = make_runner(&q.model, 16, 1);
        decode(&r1, prompt_a, na, DECODE_STEPS, NULL, alone, alone_ids);
        free_runner(&r1);

        /* A in chunks of 4 beside B and C (prompt then decode), 2 threads forced */
        runner r = make_runner(&q.model, 4, 2);
        kvd_forward_force_threads(r.ctx, true);
        const int32_t *prompts[3] = {prompt_a, prompt_b, prompt_c};
        int lens[3] = {na, LEN(prompt_b), LEN(prompt_c)};
        int32_t ids[3][128];
        int done[3] = {0}, decoded[3] = {0};
        kvd_block_table tables[3];
        for (int s = 0; s < 3; s++) {
            kvd_block_table_init(&tables[s]);
            memcpy(ids[s], prompts[s], (size_t)lens[s] * sizeof(int32_t));
        }
        float *logits = malloc(16 * V * sizeof(float));
        float *a_rows = malloc((size_t)(na + DECODE_STEPS) * V * sizeof(float));
        int a_done_rows = 0;
        while (done[0] < na + DECODE_STEPS) {
            int32_t tokens[64];
            kvd_forward_seq seqs[3];
            int ns = 0, nt = 0;
            for (int s = 0; s < 3; s++) {
                int available = lens[s] + decoded[s] - done[s];
                int want = s == 0 ? (available < 4 ? available : 4) : available;
                if (want <= 0 || (s > 0 && decoded[s] >= DECODE_STEPS))
                    continue;
                kvd_error err = {0};
                assert_int_equal(kvd_block_table_append(r.pool, &tables[s], want, &err), 0);
                memcpy(tokens + nt, ids[s] + done[s], (size_t)want * sizeof(int32_t));
                seqs[ns++] = (kvd_forward_seq){&tables[s], done[s], want, nt,
                                               s == 0 ? KVD_LOGITS_ALL : KVD_LOGITS_LAST};
                nt += want;
            }
            kvd_forward_batch batch = {tokens, nt, seqs, ns, logits};
            kvd_error err = {0};
            if (kvd_forward(r.ctx, &batch, &err) != 0)
                fail_msg("forward: %s", err.msg);
            int row = 0;
            for (int i = 0; i < ns; i++) {
                int s = (int)(seqs[i].table - tables);
                int nrows = s == 0 ? seqs[i].num_new : 1;
                if (s == 0) {
                    memcpy(a_rows + (size_t)a_done_rows * V, logits + (size_t)row * V,
                           (size_t)nrows * V * sizeof(float));
                    a_done_rows += nrows;
                }
                done[s] += seqs[i].num_new;
                row += nrows;
                if (done[s] >= lens[s] && decoded[s] < DECODE_STEPS) {
                    ids[s][lens[s] + decoded[s]] = kvd_argmax(logits + (size_t)(row - 1) * V, g_vocab);
                    decoded[s]++;
                }
            }
        }
        for (int k = 0; k < DECODE_STEPS; k++)
            assert_int_equal(ids[0][na + k], alone_ids[k]);
        if (memcmp(a_rows, alone, (size_t)(na + DECODE_STEPS) * V * sizeof(float)) != 0)
            fail_msg("%s: A's logits batched differ from A alone", kvd_dtype_name(types[t]));
        for (int s = 0; s < 3; s++)
            kvd_block_table_deinit(r.pool, &tables[s]);
        free_runner(&r);

        /* the other build, end to end */
        if (kvd_isa_supported(KVD_ISA_AVX512) && kvd_quant_vnni_supported()) {
            const char *other = kvd_isa_detect() == KVD_ISA_SCALAR ? "avx512" : "scalar";
            setenv("KVD_ISA", other, 1);
            runner r2 = make_runner(&q.model, 16, 2);
            unsetenv("KVD_ISA");
            float *b = malloc((size_t)(na + DECODE_STEPS) * V * sizeof(float));
            decode(&r2, prompt_a, na, DECODE_STEPS, NULL, b, NULL);
            free_runner(&r2);
            if (memcmp(b, alone, (size_t)(na + DECODE_STEPS) * V * sizeof(float)) != 0)
                fail_msg("%s: the %s build differs", kvd_dtype_name(types[t]), other);
            free(b);
        }
        free(logits);
        free(a_rows);
        free(alone);
        free_qmodel(&q);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matches_reference),
        cmocka_unit_test(test_batch_invariance),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
