/* gguf_tool - the C side of tests/test_gguf_golden.py: teacher-forced logits of a model.
 *
 *   gguf_tool logits MODEL PROMPT_LEN ID,ID,...
 *
 * Runs the prompt (the first PROMPT_LEN ids) as one prefill, then the rest one token at a
 * time with an f32 KV cache, as a greedy decode would, and prints one line per position
 * from PROMPT_LEN - 1 on: "argmax max_logit logit_of_the_next_given_id" (the last line has
 * no next id: -inf). The Python test compares llama.cpp's greedy ids with these.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvd/kvd_forward.h"
#include "kvd/kvd_kv.h"
#include "kvd/kvd_model.h"

int main(int argc, char **argv)
{
    if (argc != 5 || strcmp(argv[1], "logits") != 0) {
        fprintf(stderr, "usage: gguf_tool logits MODEL PROMPT_LEN ID,ID,...\n");
        return 2;
    }
    int prompt = atoi(argv[3]), n = 0;
    int32_t ids[4096];
    for (char *p = argv[4]; *p && n < 4096; n++) {
        ids[n] = (int32_t)strtol(p, &p, 10);
        if (*p == ',')
            p++;
    }
    kvd_error err = {0};
    kvd_model *m = kvd_model_load(argv[2], NULL, &err);
    if (!m || prompt < 1 || prompt > n) {
        fprintf(stderr, "gguf_tool: %s\n", m ? "bad PROMPT_LEN" : err.msg);
        return 1;
    }
    const kvd_model_config *c = &m->config;
    kvd_kv_config kv = {.num_layers = c->num_layers, .num_kv_heads = c->num_kv_heads,
                        .head_dim = c->head_dim, .block_size = 16, .dtype = KVD_DTYPE_F32,
                        .num_blocks = (size_t)(n / 16 + 2)};
    kvd_kv_pool *pool = kvd_kv_pool_create(&kv, &err);
    kvd_forward_ctx *ctx = pool ? kvd_forward_create(m, pool, n, 1, 1, 1, &err) : NULL;
    float *logits = malloc((size_t)c->vocab_size * sizeof *logits);
    if (!ctx || !logits) {
        fprintf(stderr, "gguf_tool: %s\n", err.msg);
        return 1;
    }
    kvd_block_table table;
    kvd_block_table_init(&table);
    for (int past = 0, len = prompt; past < n; past += len, len = 1) {
        if (kvd_block_table_append(pool, &table, len, &err) != 0)
            return 1;
        kvd_forward_seq seq = {&table, past, len, 0, KVD_LOGITS_LAST};
        kvd_forward_batch batch = {ids + past, len, &seq, 1, logits};
        if (kvd_forward(ctx, &batch, &err) != 0) {
            fprintf(stderr, "gguf_tool: %s\n", err.msg);
            return 1;
        }
        int best = 0;
        for (int v = 1; v < c->vocab_size; v++)
            if (logits[v] > logits[best])
                best = v;
        int next = past + len;
        printf("%d %.9g %.9g\n", best, logits[best], next < n ? logits[ids[next]] : -INFINITY);
    }
    kvd_block_table_deinit(pool, &table);
    free(logits);
    kvd_forward_destroy(ctx);
    kvd_kv_pool_destroy(pool);
    kvd_model_destroy(m);
    return 0;
}
