/* kvd_gguf.h - reading and writing llama.cpp's GGUF file format (versions 2 and 3).
 *
 * A GGUF file is: magic "GGUF", u32 version, u64 tensor count, u64 key/value count; the
 * key/value pairs (u64-length strings, a u32 value type, the value; arrays are an element
 * type, a u64 count and the elements); the tensor infos (name, u32 dimension count, u64
 * extents ne0 first = the fastest-varying one, the columns of a matrix, u32 ggml type, u64
 * offset within the data section); padding to general.alignment (default 32); the data.
 * Everything is little-endian.
 *
 * The parser trusts nothing: magic, version, every count against the bytes left, every
 * string length, value and element type (arrays of arrays are refused), duplicate keys and
 * tensor names, dimensions (1..4, each > 0, their product and byte size without overflow,
 * ne0 a whole number of blocks), general.alignment (a power of two), every tensor's offset
 * (aligned, inside the file, no two tensors overlapping). Any violation is a one-line error
 * naming the file and the key or tensor. Parsing works on bytes already in memory, so it
 * runs on arbitrary input (tests/fuzz/fuzz_gguf.c); kvd_gguf_file adds a read-only mmap.
 *
 * Ownership: a kvd_gguf owns its key and tensor arrays and their NUL-terminated names;
 * string values and array elements point into the parsed bytes, which the caller keeps
 * alive (kvd_gguf_file owns its mapping). Pure data: any thread.
 *
 * The writer (kvd_gguf_writer) builds the same format into a growable header buffer; the
 * caller then writes the tensor data at the offsets it assigned.
 */
#ifndef KVD_GGUF_H
#define KVD_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_error.h"
#include "kvd/kvd_model.h"

#define KVD_GGUF_MAX_DIMS 4
#define KVD_GGUF_DEFAULT_ALIGNMENT 32
#define KVD_GGUF_MAX_NAME 256 /* longest key or tensor name accepted */

/* Value types of the key/value section (the format's numbering). */
typedef enum kvd_gguf_type {
    KVD_GGUF_UINT8 = 0,
    KVD_GGUF_INT8 = 1,
    KVD_GGUF_UINT16 = 2,
    KVD_GGUF_INT16 = 3,
    KVD_GGUF_UINT32 = 4,
    KVD_GGUF_INT32 = 5,
    KVD_GGUF_FLOAT32 = 6,
    KVD_GGUF_BOOL = 7,
    KVD_GGUF_STRING = 8,
    KVD_GGUF_ARRAY = 9,
    KVD_GGUF_UINT64 = 10,
    KVD_GGUF_INT64 = 11,
    KVD_GGUF_FLOAT64 = 12,
} kvd_gguf_type;

/* ggml tensor type ids kvd reads (ggml.h's numbering). */
enum {
    KVD_GGML_F32 = 0,
    KVD_GGML_F16 = 1,
    KVD_GGML_Q4_0 = 2,
    KVD_GGML_Q5_0 = 6,
    KVD_GGML_Q8_0 = 8,
    KVD_GGML_Q4_K = 12,
    KVD_GGML_Q5_K = 13,
    KVD_GGML_Q6_K = 14,
    KVD_GGML_Q8_K = 15,
    KVD_GGML_BF16 = 30,
};

/* A string inside the parsed bytes: not NUL-terminated, may hold any bytes. */
typedef struct kvd_gguf_str {
    const char *ptr;
    uint64_t len;
} kvd_gguf_str;

typedef struct kvd_gguf_kv {
    char *key;               /* owned, NUL-terminated */
    kvd_gguf_type type;
    kvd_gguf_type elem_type; /* arrays: the element type */
    uint64_t count;          /* arrays: the element count */
    const uint8_t *data;     /* the value's bytes (arrays: the first element) */
    uint64_t size;           /* bytes from data to the value's end */
} kvd_gguf_kv;

typedef struct kvd_gguf_tensor {
    char *name;              /* owned, NUL-terminated */
    uint32_t ggml_type;
    bool supported;          /* a type kvd_dtype has: dtype is valid */
    kvd_dtype dtype;
    int ndim;
    uint64_t ne[KVD_GGUF_MAX_DIMS]; /* ne[0] = columns (fastest-varying) */
    uint64_t offset;         /* within the data section, a multiple of the alignment */
    uint64_t bytes;
} kvd_gguf_tensor;

typedef struct kvd_gguf {
    uint32_t version;
    uint64_t alignment;
    kvd_gguf_kv *kvs;        /* [num_kvs] in file order */
    uint64_t num_kvs;
    kvd_gguf_tensor *tensors; /* [num_tensors] in file order */
    uint64_t num_tensors;
    const uint8_t *bytes;    /* the parsed bytes (not owned) */
    uint64_t data_start;     /* file offset of the data section */
} kvd_gguf;

/* Parses and validates a whole GGUF file held in bytes[size]; path only names the file in
 * messages. Returns 0 and fills out, or KVD_EFORMAT (truncated, corrupt, inconsistent),
 * KVD_EUNSUPPORTED (a version or a tensor type whose size kvd does not know) or
 * KVD_ENOMEM with err set and out zeroed. */
int kvd_gguf_parse(kvd_gguf *out, const void *bytes, size_t size, const char *path,
                   kvd_error *err);
/* Frees what the parse allocated and zeroes g. Safe on a zeroed g. */
void kvd_gguf_deinit(kvd_gguf *g);

const kvd_gguf_kv *kvd_gguf_find_kv(const kvd_gguf *g, const char *key);
const kvd_gguf_tensor *kvd_gguf_find_tensor(const kvd_gguf *g, const char *name);
/* First byte of t's data (no alignment promised: read with memcpy or as bytes). */
static inline const void *kvd_gguf_tensor_data(const kvd_gguf *g, const kvd_gguf_tensor *t)
{
    return g->bytes + g->data_start + t->offset;
}

/* Typed reads of a required key (test optional ones with kvd_gguf_find_kv first); path
 * names the file in messages. Each returns 0, or KVD_EFORMAT when the key is missing or its
 * type or value does not fit. Integers accept any integer type whose value lies in
 * [min, max]; floats accept FLOAT32 and FLOAT64 (finite). */
int kvd_gguf_get_int(const kvd_gguf *g, const char *key, int64_t min, int64_t max, int64_t *out,
                     const char *path, kvd_error *err);
int kvd_gguf_get_float(const kvd_gguf *g, const char *key, double *out, const char *path,
                       kvd_error *err);
int kvd_gguf_get_bool(const kvd_gguf *g, const char *key, bool *out, const char *path,
                      kvd_error *err);
int kvd_gguf_get_string(const kvd_gguf *g, const char *key, kvd_gguf_str *out,
                        const char *path, kvd_error *err);
/* An array of elem_type: *kv is the key (count and data). */
int kvd_gguf_get_array(const kvd_gguf *g, const char *key, kvd_gguf_type elem_type,
                       const kvd_gguf_kv **kv, const char *path, kvd_error *err);
/* Reads the string at *cursor of an already validated string array and advances it. */
kvd_gguf_str kvd_gguf_next_string(const uint8_t **cursor);
/* Element i of a validated integer array (any integer type) as int64. */
int64_t kvd_gguf_array_int(const kvd_gguf_kv *kv, uint64_t i);

/* "F32", "Q4_K", ... for a ggml type id; "type N" style names are not returned: NULL when
 * kvd does not know the id. */
const char *kvd_gguf_ggml_type_name(uint32_t ggml_type);
/* The ggml type id of a kvd dtype. */
uint32_t kvd_gguf_ggml_type(kvd_dtype dtype);

/* Copies s[0..len) into buf[cap] fit for a one-line message (control bytes become '?',
 * a long string is cut with "..."). Returns buf. */
const char *kvd_gguf_printable(char *buf, size_t cap, const char *s, uint64_t len);

/* A read-only mapping of a GGUF file with its parse. */
typedef struct kvd_gguf_file {
    char *path;              /* owned copy */
    const uint8_t *map;
    size_t size;
    kvd_gguf gguf;
} kvd_gguf_file;

/* Returns 0, KVD_EIO (missing, unreadable) or the codes of kvd_gguf_parse; f zeroed on
 * failure. */
int kvd_gguf_file_open(kvd_gguf_file *f, const char *path, kvd_error *err);
void kvd_gguf_file_close(kvd_gguf_file *f);

/* True when the file at path starts with the GGUF magic. */
bool kvd_gguf_is_gguf_file(const char *path);
/* Resolves a --model argument: a GGUF file itself, or a directory without config.json
 * holding exactly one *.gguf. Returns 1 with the file's path in out[cap], 0 when path is
 * a Hugging Face checkpoint directory (or anything else: the caller's loader reports it),
 * or KVD_EINVAL when a directory holds several .gguf files and no config.json. */
int kvd_gguf_resolve(const char *path, char *out, size_t cap, kvd_error *err);

/* The GGUF (llama.cpp) name of a Qwen2 tensor's Hugging Face name:
 * model.embed_tokens.weight -> token_embd.weight, lm_head.weight -> output.weight,
 * model.norm.weight -> output_norm.weight, model.layers.N.self_attn.q_proj.bias ->
 * blk.N.attn_q.bias, ... Returns 0, or KVD_EINVAL for a name Qwen2 does not have. */
int kvd_gguf_qwen2_name(const char *hf_name, char *out, size_t cap);

/* ---- writing ---- */

typedef struct kvd_gguf_writer {
    uint8_t *buf;            /* the header being built */
    size_t len, cap;
    uint64_t num_kvs, num_tensors;
    uint64_t data_bytes;     /* the data section so far (aligned ends) */
    uint64_t alignment;
    bool failed;             /* an allocation failed: finish reports KVD_ENOMEM */
    /* tensor infos are kept apart: the format puts them after every key */
    uint8_t *tinfo;
    size_t tinfo_len, tinfo_cap;
} kvd_gguf_writer;

void kvd_gguf_writer_init(kvd_gguf_writer *w);
void kvd_gguf_writer_deinit(kvd_gguf_writer *w);
void kvd_gguf_write_string(kvd_gguf_writer *w, const char *key, const char *value);
void kvd_gguf_write_u32(kvd_gguf_writer *w, const char *key, uint32_t value);
void kvd_gguf_write_i32(kvd_gguf_writer *w, const char *key, int32_t value);
void kvd_gguf_write_f32(kvd_gguf_writer *w, const char *key, float value);
void kvd_gguf_write_bool(kvd_gguf_writer *w, const char *key, bool value);
/* An array of n strings (lens[i] bytes each; lens NULL: NUL-terminated). */
void kvd_gguf_write_string_array(kvd_gguf_writer *w, const char *key, const char *const *values,
                                 const size_t *lens, uint64_t n);
void kvd_gguf_write_i32_array(kvd_gguf_writer *w, const char *key, const int32_t *values,
                              uint64_t n);
/* A key/value of a parsed file, copied as it is. */
void kvd_gguf_write_kv_copy(kvd_gguf_writer *w, const kvd_gguf_kv *kv);
/* Declares a tensor of ggml_type with extents ne[ndim] (ne[0] = columns) holding bytes
 * bytes; returns its offset in the data section (each tensor starts aligned). */
uint64_t kvd_gguf_write_tensor_info(kvd_gguf_writer *w, const char *name, uint32_t ggml_type,
                                    int ndim, const uint64_t *ne, uint64_t bytes);
/* The complete header (version 3), padded so the data section starts aligned: *out points
 * into w (valid until deinit), *len its length. The caller writes the data section after it,
 * each tensor at the offset write_tensor_info gave, zero bytes between. Call it once.
 * Returns 0 or KVD_ENOMEM. */
int kvd_gguf_writer_finish(kvd_gguf_writer *w, const uint8_t **out, size_t *len,
                           kvd_error *err);

#endif
