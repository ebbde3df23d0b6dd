/* kvd_safetensors.h - reading (and writing) the safetensors checkpoint format.
 *
 * A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
 * ({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}),
 * then the data section the offsets are relative to. The parser trusts nothing: the
 * header length is checked against the file size, every entry's dtype, shape and
 * offsets are checked for type, range, overflow and consistency (end - begin ==
 * product(shape) * dtype size, end within the data section), and names must be
 * unique. Any violation is a one-line error naming the file and the tensor or key.
 * Parsing works on bytes already in memory, so it can run on arbitrary input
 * (tests/fuzz/fuzz_safetensors.c); kvd_st_file adds a read-only mmap of a file.
 *
 * Dtypes: every dtype of the format is known so offsets can be validated, but only
 * BF16, F16 and F32 are "supported" (usable as kvd weights); the loader refuses a
 * needed tensor in any other dtype. An unknown dtype string is a parse error.
 *
 * Ownership: a kvd_st_header owns its tensor array and names (kvd_st_header_deinit);
 * a kvd_st_file owns its mapping and header (kvd_st_file_close). Tensor data pointers
 * point into the mapping and die with it.
 */
#ifndef KVD_SAFETENSORS_H
#define KVD_SAFETENSORS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_error.h"
#include "kvd/kvd_model.h"

#define KVD_ST_MAX_DIMS 8
/* Same cap as the reference implementation: bigger headers are refused unread. */
#define KVD_ST_MAX_HEADER_BYTES ((uint64_t)100 << 20)

typedef struct kvd_st_tensor {
    char *name;               /* owned by the header */
    char dtype_name[12];      /* as written in the file: "BF16", "I8", ... */
    bool supported;           /* BF16, F16 or F32: dtype below is valid */
    kvd_dtype dtype;
    size_t elem_size;         /* bytes per element of dtype_name */
    int ndim;
    int64_t shape[KVD_ST_MAX_DIMS];
    uint64_t numel;
    uint64_t begin;           /* byte range within the data section */
    uint64_t end;
} kvd_st_tensor;

typedef struct kvd_st_header {
    kvd_st_tensor *tensors;   /* [num_tensors], sorted by name */
    int num_tensors;
    uint64_t data_start;      /* file offset of the data section: 8 + header length */
    uint64_t data_size;       /* file size - data_start */
} kvd_st_header;

/* Parses and validates the header of a whole safetensors file held in bytes[size];
 * path only names the file in messages. Returns 0 and fills out, or KVD_EFORMAT
 * (truncated, corrupt, inconsistent), KVD_EUNSUPPORTED (unknown dtype string) or
 * KVD_ENOMEM with err set and out untouched. */
int kvd_st_header_parse(kvd_st_header *out, const void *bytes, size_t size, const char *path,
                        kvd_error *err);

/* Frees what the header owns and zeroes it. Safe on a zeroed header. */
void kvd_st_header_deinit(kvd_st_header *header);

/* The tensor called name, or NULL (binary search). */
const kvd_st_tensor *kvd_st_header_find(const kvd_st_header *header, const char *name);

typedef struct kvd_st_file {
    char *path;               /* owned copy */
    const uint8_t *map;       /* read-only mapping of the whole file */
    size_t size;
    kvd_st_header header;
} kvd_st_file;

/* Maps path read-only and parses its header. Returns 0, or KVD_EIO (missing,
 * unreadable) / the codes of kvd_st_header_parse, with f zeroed on failure. */
int kvd_st_file_open(kvd_st_file *f, const char *path, kvd_error *err);

/* Unmaps and frees. Safe on a zeroed or closed file. */
void kvd_st_file_close(kvd_st_file *f);

/* Drops the pages holding data[0, len) of a read-only file mapping (a kvd_st_file's or
 * a kvd_gguf_file's) from the process once they have been read: they stay in the page
 * cache, but no longer count in its resident set, and a later read maps them again.
 * Copying a file into memory this way peaks at the copy plus one chunk, not twice the
 * file. Advisory: a refused call changes nothing. */
void kvd_st_release_pages(const void *data, size_t len);

/* First byte of t's data in f's mapping (not aligned in general: read with memcpy). */
static inline const void *kvd_st_tensor_data(const kvd_st_file *f, const kvd_st_tensor *t)
{
    return f->map + f->header.data_start + t->begin;
}

/* What a writer lays out: tensors are stored back to back in the order given. */
typedef struct kvd_st_spec {
    const char *name;
    kvd_dtype dtype;
    int ndim;
    int64_t shape[KVD_ST_MAX_DIMS];
} kvd_st_spec;

/* Builds the bytes that start a safetensors file holding specs[n] in that order:
 * the 8-byte length and the JSON header (with "__metadata__": {"format": "pt"}),
 * space-padded so the data section starts 8-byte aligned. The caller then writes
 * each tensor's data, in order. On success *out is malloc'ed (caller frees), *out_len
 * its length and, when data_bytes is not NULL, *data_bytes the data section's size.
 * Returns 0, KVD_EINVAL (bad name, shape or ndim) or KVD_ENOMEM. */
int kvd_st_header_build(const kvd_st_spec *specs, int n, char **out, size_t *out_len,
                        uint64_t *data_bytes, kvd_error *err);

/* Copies s into buf[cap] fit for a one-line message: control bytes become '?', and a
 * string longer than cap - 1 is cut with "...". Names from untrusted files go through
 * this before they reach a kvd_error. Returns buf. */
const char *kvd_st_printable(char *buf, size_t cap, const char *s);

/* The format's dtype name for a kvd dtype: "F32", "F16", "BF16". */
const char *kvd_st_dtype_name(kvd_dtype dtype);

#endif
