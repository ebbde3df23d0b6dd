/* kvd_model.h - a Qwen2 checkpoint in memory: its config, generation defaults and weights.
 *
 * kvd_model_load() reads a Hugging Face checkpoint directory (config.json,
 * model.safetensors or sharded model-*-of-*.safetensors + model.safetensors.index.json,
 * optional generation_config.json) or a qwen2 GGUF file (a path to the file, or a
 * directory holding one .gguf and no config.json; kvd_gguf.h), checks every tensor's shape against the config
 * and copies the weights into anonymous memory (huge pages where the kernel gives
 * them), so decoding never faults on the file mapping. The kvd_model owns all of its
 * memory; kvd_model_destroy() frees it. The tokenizer is loaded separately
 * (kvd_tokenizer.h) from the same directory.
 */
#ifndef KVD_MODEL_H
#define KVD_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_error.h"

/* Element types of weights and KV. The quantized ones are ggml's block formats (the same
 * bytes as in a GGUF file, described in ggml-common.h): a row of n values is n / block
 * values' blocks, each block a scale (and for some a minimum) plus packed integers.
 * Their arithmetic lives in kvd_quant.h. */
typedef enum kvd_dtype {
    KVD_DTYPE_F32 = 0,
    KVD_DTYPE_F16 = 1,
    KVD_DTYPE_BF16 = 2,
    KVD_DTYPE_Q8_0 = 3,  /* 32 values: f16 scale, 32 x int8 */
    KVD_DTYPE_Q4_0 = 4,  /* 32 values: f16 scale, 32 x 4-bit (offset 8) */
    KVD_DTYPE_Q5_0 = 5,  /* 32 values: f16 scale, high bits, 32 x 4-bit (offset 16) */
    KVD_DTYPE_Q4_K = 6,  /* 256 values: super-block f16 scale/min, 8 x 6-bit scales/mins */
    KVD_DTYPE_Q5_K = 7,  /* 256 values: as Q4_K plus one high bit per value */
    KVD_DTYPE_Q6_K = 8,  /* 256 values: 16 x int8 scales, 6-bit values (offset 32) */
    KVD_DTYPE_Q8_K = 9,  /* 256 values: f32 scale, 256 x int8, 16 block sums */
    KVD_DTYPE_I8 = 10,   /* int8 (KV pages: each row of head_dim values with an f16 scale) */
    KVD_DTYPE_F8 = 11,   /* fp8 e4m3 (KV pages: each row of head_dim values with an f16 scale) */
} kvd_dtype;
#define KVD_DTYPE_COUNT 12

/* Bytes per element of the float types (4 or 2), int8 and fp8 (1); 0 for block-quantized types. */
size_t kvd_dtype_size(kvd_dtype dtype);
/* Values per block: 1 for the float types, 32 or 256 for the quantized ones. */
int kvd_dtype_block_values(kvd_dtype dtype);
/* Bytes per block (element size for the float types). */
size_t kvd_dtype_block_bytes(kvd_dtype dtype);
/* True for the ggml block formats. */
bool kvd_dtype_is_quantized(kvd_dtype dtype);
/* Bytes of one row of cols values as a file stores it; 0 when cols is not a whole
 * number of blocks. */
size_t kvd_dtype_row_bytes(kvd_dtype dtype, int64_t cols);
/* "f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q5_k", "q6_k", "q8_k", "int8". */
const char *kvd_dtype_name(kvd_dtype dtype);
/* Parses "f32"/"float32"/"F32", "f16"/"float16"/"F16", "bf16"/"bfloat16"/"BF16" and the
 * quantized names above (any case). Returns 0 or KVD_EINVAL. */
int kvd_dtype_parse(const char *name, kvd_dtype *out);

#define KVD_MAX_EOS_IDS 8

/* The blueprint: what config.json says. */
typedef struct kvd_model_config {
    int vocab_size;              /* rows of the embedding / lm_head (151936 for Qwen2.5) */
    int hidden_size;             /* d_model */
    int intermediate_size;       /* MLP width */
    int num_layers;              /* num_hidden_layers */
    int num_heads;               /* num_attention_heads (query heads) */
    int num_kv_heads;            /* num_key_value_heads (GQA) */
    int head_dim;                /* hidden_size / num_heads */
    int max_position_embeddings; /* context limit */
    float rms_norm_eps;
    float rope_theta;
    bool tie_word_embeddings;
    kvd_dtype torch_dtype;       /* dtype the checkpoint declares (informational) */
    int bos_token_id;            /* -1 when absent */
    int eos_token_ids[KVD_MAX_EOS_IDS]; /* config.json's eos plus generation_config's */
    int num_eos_token_ids;
} kvd_model_config;

/* Sampling defaults from generation_config.json; fields absent there keep the
 * neutral value (temperature 1, top_p 1, top_k 0 = off, repetition_penalty 1). */
typedef struct kvd_generation_defaults {
    float temperature;
    float top_p;
    int top_k;
    float min_p;
    float repetition_penalty;
    bool do_sample;
} kvd_generation_defaults;

/* A weight matrix W (rows = out_features n, cols = in_features k) in the checkpoint's
 * dtype, stored in panels so that a matrix product reads it as one contiguous stream:
 * - rows are grouped by KVD_PANEL_ROWS (the last panel padded with zero rows);
 * - f32 and f16: panel p holds, for k = 0 .. cols-1 in order, the 32 weights
 *   W[32p + j][k], j = 0..31;
 * - bf16: panel p holds, for each pair of inputs (2i, 2i+1) in order, 32 32-bit words,
 *   word j holding W[32p + j][2i] in its low half and W[32p + j][2i+1] in its high
 *   half: 16 pairs of one half-panel at a stride of 128 bytes are an AMX B tile
 *   (TDPBF16PS, which the bf16 products are defined by, kvd_kernels.h). The inputs
 *   are padded with zeros to a multiple of 32, and subnormal weights are stored as
 *   zero (the instruction reads them so).
 * kvd_matrix_pack builds it from the checkpoint's row-major tensor. */
#define KVD_PANEL_ROWS 32
typedef struct kvd_matrix {
    kvd_dtype dtype;
    int rows;
    int cols;
    const void *data; /* kvd_matrix_packed_bytes(dtype, rows, cols), 64-byte aligned */
} kvd_matrix;

/* Bytes of a packed rows x cols matrix of dtype (a whole number of 64-byte lines). */
size_t kvd_matrix_packed_bytes(kvd_dtype dtype, int rows, int cols);
/* Packs a row-major rows x cols tensor of dtype (src: any alignment, e.g. straight from
 * a safetensors mapping) into panels [panel_begin, panel_end) of dst, which holds
 * kvd_matrix_packed_bytes(...) bytes (panels are independent, so a large matrix can be
 * packed in pieces). */
void kvd_matrix_pack(void *dst, kvd_dtype dtype, int rows, int cols, const void *src,
                     int panel_begin, int panel_end);
/* Panels of a matrix with `rows` rows. */
int kvd_matrix_panels(int rows);
/* out[cols] = row `row` of w widened to float (embedding lookup, tests). */
void kvd_matrix_row(float *out, const kvd_matrix *w, int row);

typedef struct kvd_layer_weights {
    kvd_matrix q_proj;         /* (num_heads*head_dim, hidden) */
    kvd_matrix k_proj;         /* (num_kv_heads*head_dim, hidden) */
    kvd_matrix v_proj;         /* (num_kv_heads*head_dim, hidden) */
    kvd_matrix o_proj;         /* (hidden, num_heads*head_dim) */
    kvd_matrix gate_proj;      /* (intermediate, hidden) */
    kvd_matrix up_proj;        /* (intermediate, hidden) */
    kvd_matrix down_proj;      /* (hidden, intermediate) */
    const float *q_bias;       /* (num_heads*head_dim) */
    const float *k_bias;       /* (num_kv_heads*head_dim) */
    const float *v_bias;       /* (num_kv_heads*head_dim) */
    const float *input_norm;   /* (hidden) input_layernorm.weight */
    const float *post_norm;    /* (hidden) post_attention_layernorm.weight */
} kvd_layer_weights;

typedef struct kvd_model {
    kvd_model_config config;
    kvd_generation_defaults generation;
    kvd_matrix embed_tokens;   /* (vocab, hidden) */
    kvd_matrix lm_head;        /* (vocab, hidden); same data as embed_tokens when tied */
    const float *final_norm;   /* (hidden) model.norm.weight */
    kvd_layer_weights *layers; /* [num_layers] */
    size_t weight_bytes;       /* bytes of weights held (matrices + vectors) */
    char *dir;                 /* checkpoint directory (or GGUF file) as given */
    char *chat_template;       /* a GGUF's tokenizer.chat_template; NULL for a Hugging Face
                                * directory (its template is in tokenizer_config.json) */
    void *impl;                /* loader-private: arena and bookkeeping */
} kvd_model;

typedef struct kvd_model_load_options {
    bool progress;             /* print bytes/tensors progress to stderr */
    uint64_t progress_min_bytes; /* ... only for checkpoints at least this large */
    const char *quantize;      /* NULL, or a target of kvd_gguf_mix_find (q8_0, q4_k_m, ...):
                                * matrices are converted to its types while loading */
    int threads;               /* threads converting for quantize (0 or 1: the caller's alone);
                                * the weights are the same for every count */
} kvd_model_load_options;

/* dst (kvd_dtype_row_bytes(dtype, n) bytes) = src[n] stored as dtype: float types rounded
 * to nearest even, quantized ones by kvd_quantize_row. Returns 0 or KVD_EINVAL. */
int kvd_row_encode(kvd_dtype dtype, const float *src, void *dst, int64_t n);

/* dst = rows x cols of src (src_dtype, row-major) converted row by row to dst_dtype
 * (kvd_dequantize_row, then kvd_row_encode) by up to `threads` threads (capped at
 * KVD_CONVERT_MAX_THREADS) that take rows from a shared counter: each row's bytes depend
 * on that row alone, so dst is the same for every thread count. Returns 0, KVD_ENOMEM,
 * or KVD_EINVAL when a type cannot be converted (dst partly written). */
#define KVD_CONVERT_MAX_THREADS 64
int kvd_rows_convert(kvd_dtype dst_dtype, void *dst, kvd_dtype src_dtype, const void *src,
                     int64_t rows, int64_t cols, int threads);

/* Loads the checkpoint in dir. Returns NULL on any problem with a one-line message
 * in err naming the file and the key or tensor (missing file, truncated or corrupt
 * safetensors header, wrong shape, unknown dtype, unsupported architecture).
 * opts may be NULL. */
kvd_model *kvd_model_load(const char *dir, const kvd_model_load_options *opts, kvd_error *err);

/* Frees everything the model holds. NULL does nothing. */
void kvd_model_destroy(kvd_model *model);

/* Parses a config.json text (already read) into cfg; path is used in messages.
 * Returns 0 or KVD_EFORMAT / KVD_EUNSUPPORTED with err set. */
int kvd_model_config_parse(const char *json_text, size_t len, const char *path,
                           kvd_model_config *cfg, kvd_error *err);

#endif
