/* quant_tool - the C side of tests/test_quant_golden.py: runs kvd's block codecs and
 * packed products on files so the Python test can hold them against llama.cpp's
 * checksums and the numpy reference (tests/reference/ggml_ref.py).
 *
 *   quant_tool dequant TYPE IN OUT        IN: raw blocks, OUT: float32 values
 *   quant_tool quantize TYPE IN OUT       IN: float32 values, OUT: raw blocks
 *   quant_tool rows TYPE ROWS COLS IN OUT packs IN, writes every row via kvd_matrix_row
 *   quant_tool matmul TYPE ROWS COLS IN X M OUT   out[M][ROWS] = x[M][COLS] W^T (scalar
 *                                         and best ISA; exits 1 if they differ in a bit)
 *   quant_tool logits MODEL IDS OUT       loads MODEL (directory or GGUF), writes the logits
 *                                         of every position of the comma-separated IDS
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvd/kvd_forward.h"
#include "kvd/kvd_kernels.h"
#include "kvd/kvd_kv.h"
#include "kvd/kvd_quant.h"

static void *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "%s: read failed\n", path);
        exit(2);
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void write_all(const char *path, const void *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, len, f) != len || fclose(f) != 0) {
        fprintf(stderr, "%s: write failed\n", path);
        exit(2);
    }
}

static int logits(const char *model_path, const char *ids_arg, const char *out_path)
{
    kvd_error err = {0};
    kvd_model *model = kvd_model_load(model_path, NULL, &err);
    if (!model)
        return fprintf(stderr, "%s\n", err.msg), 1;
    int32_t ids[512];
    int n = 0;
    for (const char *p = ids_arg; *p && n < 512; p += strspn(p, ","))
        ids[n++] = (int32_t)strtol(p, (char **)&p, 10);
    const kvd_model_config *c = &model->config;
    kvd_kv_config kv = {.num_layers = c->num_layers, .num_kv_heads = c->num_kv_heads,
                        .head_dim = c->head_dim, .block_size = 16, .dtype = KVD_DTYPE_F32,
                        .num_blocks = (size_t)n / 16 + 2};
    kvd_kv_pool *pool = kvd_kv_pool_create(&kv, &err);
    kvd_forward_ctx *ctx = pool ? kvd_forward_create(model, pool, n, 1, n, 2, &err) : NULL;
    float *out = malloc((size_t)n * c->vocab_size * sizeof(float));
    kvd_block_table table;
    kvd_block_table_init(&table);
    if (!ctx || !out || kvd_block_table_append(pool, &table, n, &err) != 0)
        return fprintf(stderr, "%s\n", err.msg), 1;
    kvd_forward_seq seq = {&table, 0, n, 0, KVD_LOGITS_ALL};
    kvd_forward_batch batch = {ids, n, &seq, 1, out};
    if (kvd_forward(ctx, &batch, &err) != 0)
        return fprintf(stderr, "%s\n", err.msg), 1;
    write_all(out_path, out, (size_t)n * c->vocab_size * sizeof(float));
    kvd_block_table_deinit(pool, &table);
    kvd_forward_destroy(ctx);
    kvd_kv_pool_destroy(pool);
    kvd_model_destroy(model);
    free(out);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: see the header of tests/quant_tool.c\n");
        return 2;
    }
    if (strcmp(argv[1], "logits") == 0)
        return logits(argv[2], argv[3], argv[4]);
    kvd_dtype dtype;
    if (kvd_dtype_parse(argv[2], &dtype) != 0) {
        fprintf(stderr, "unknown type %s\n", argv[2]);
        return 2;
    }
    size_t len;
    if (strcmp(argv[1], "dequant") == 0) {
        void *in = read_all(argv[3], &len);
        size_t block = kvd_dtype_block_bytes(dtype);
        int64_t n = (int64_t)(len / block) * kvd_dtype_block_values(dtype);
        float *out = malloc((size_t)n * sizeof(float) + 1);
        int rc = len % block || kvd_dequantize_row(dtype, in, out, n) != 0;
        if (rc)
            fprintf(stderr, "dequantize failed\n");
        else
            write_all(argv[4], out, (size_t)n * sizeof(float));
        free(in);
        free(out);
        return rc;
    }
    if (strcmp(argv[1], "quantize") == 0) {
        float *in = read_all(argv[3], &len);
        int64_t n = (int64_t)(len / sizeof(float));
        size_t bytes = kvd_dtype_row_bytes(dtype, n);
        void *out = malloc(bytes + 1);
        int rc = kvd_quantize_row(dtype, in, out, n) != 0;
        if (rc)
            fprintf(stderr, "quantize failed\n");
        else
            write_all(argv[4], out, bytes);
        free(in);
        free(out);
        return rc;
    }
    if (argc < 7)
        return 2;
    int rows = atoi(argv[3]), cols = atoi(argv[4]);
    void *src = read_all(argv[5], &len);
    if (len != kvd_dtype_row_bytes(dtype, cols) * (size_t)rows) {
        free(src);
        return fprintf(stderr, "size mismatch\n"), 1;
    }
    size_t packed_bytes = kvd_matrix_packed_bytes(dtype, rows, cols);
    void *packed = aligned_alloc(64, packed_bytes);
    kvd_matrix_pack(packed, dtype, rows, cols, src, 0, kvd_matrix_panels(rows));
    kvd_matrix w = {.dtype = dtype, .rows = rows, .cols = cols, .data = packed};
    if (strcmp(argv[1], "rows") == 0) {
        float *out = malloc((size_t)rows * cols * sizeof(float));
        for (int r = 0; r < rows; r++)
            kvd_matrix_row(out + (size_t)r * cols, &w, r);
        write_all(argv[6], out, (size_t)rows * cols * sizeof(float));
        free(out);
        free(packed);
        free(src);
        return 0;
    }
    if (strcmp(argv[1], "matmul") == 0 && argc >= 9) {
        float *x = read_all(argv[6], &len);
        int m = atoi(argv[7]);
        float *out = calloc((size_t)m * rows, sizeof(float));
        float *out2 = calloc((size_t)m * rows, sizeof(float));
        kvd_matmul(KVD_ISA_SCALAR, out, rows, x, cols, m, &w, NULL, false, 1);
        kvd_matmul(kvd_isa_detect(), out2, rows, x, cols, m, &w, NULL, false, 2);
        int rc = memcmp(out, out2, (size_t)m * rows * sizeof(float)) != 0;
        if (rc)
            fprintf(stderr, "scalar and %s differ\n", kvd_isa_name(kvd_isa_detect()));
        else
            write_all(argv[8], out, (size_t)m * rows * sizeof(float));
        free(x);
        free(out);
        free(out2);
        free(packed);
        free(src);
        return rc;
    }
    free(packed);
    free(src);
    return 2;
}
