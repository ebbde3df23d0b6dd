/* gguf.c - the GGUF parser and writer (format and checks: kvd_gguf.h).
 *
 * The parser walks the bytes with a bounds-checked cursor: every read first checks the
 * bytes left, every count is checked against the smallest size its elements can take
 * before anything is allocated for it, so a forged count can neither overrun the input
 * nor make the parser allocate more than a small multiple of the file's size.
 */
#include "kvd/kvd_gguf.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC "GGUF"

/* Sizes of the ggml types a file may hold: kvd reads the ones with a kvd_dtype; the
 * others are known so that their offsets can still be checked. */
static const struct {
    uint32_t id;
    const char *name;
    int block_values;
    int block_bytes;
    int dtype; /* kvd_dtype, -1 when kvd cannot compute with it */
} ggml_types[] = {
    {0, "F32", 1, 4, KVD_DTYPE_F32},     {1, "F16", 1, 2, KVD_DTYPE_F16},
    {2, "Q4_0", 32, 18, KVD_DTYPE_Q4_0}, {3, "Q4_1", 32, 20, -1},
    {6, "Q5_0", 32, 22, KVD_DTYPE_Q5_0}, {7, "Q5_1", 32, 24, -1},
    {8, "Q8_0", 32, 34, KVD_DTYPE_Q8_0}, {9, "Q8_1", 32, 36, -1},
    {10, "Q2_K", 256, 84, -1},           {11, "Q3_K", 256, 110, -1},
    {12, "Q4_K", 256, 144, KVD_DTYPE_Q4_K}, {13, "Q5_K", 256, 176, KVD_DTYPE_Q5_K},
    {14, "Q6_K", 256, 210, KVD_DTYPE_Q6_K}, {15, "Q8_K", 256, 292, KVD_DTYPE_Q8_K},
    {16, "IQ2_XXS", 256, 66, -1},        {17, "IQ2_XS", 256, 74, -1},
    {18, "IQ3_XXS", 256, 98, -1},        {19, "IQ1_S", 256, 50, -1},
    {20, "IQ4_NL", 32, 18, -1},          {21, "IQ3_S", 256, 110, -1},
    {22, "IQ2_S", 256, 82, -1},          {23, "IQ4_XS", 256, 136, -1},
    {24, "I8", 1, 1, -1},                {25, "I16", 1, 2, -1},
    {26, "I32", 1, 4, -1},               {27, "I64", 1, 8, -1},
    {28, "F64", 1, 8, -1},               {29, "IQ1_M", 256, 56, -1},
    {30, "BF16", 1, 2, KVD_DTYPE_BF16},  {34, "TQ1_0", 256, 54, -1},
    {35, "TQ2_0", 256, 66, -1},
};
#define NUM_GGML_TYPES (sizeof ggml_types / sizeof ggml_types[0])

static int ggml_type_index(uint32_t id)
{
    for (size_t i = 0; i < NUM_GGML_TYPES; i++)
        if (ggml_types[i].id == id)
            return (int)i;
    return -1;
}

const char *kvd_gguf_ggml_type_name(uint32_t ggml_type)
{
    int i = ggml_type_index(ggml_type);
    return i < 0 ? NULL : ggml_types[i].name;
}

uint32_t kvd_gguf_ggml_type(kvd_dtype dtype)
{
    for (size_t i = 0; i < NUM_GGML_TYPES; i++)
        if (ggml_types[i].dtype == (int)dtype)
            return ggml_types[i].id;
    return UINT32_MAX;
}

/* Bytes of one scalar value type; 0 for STRING/ARRAY and unknown types. */
static size_t scalar_size(uint32_t type)
{
    switch (type) {
    case KVD_GGUF_UINT8: case KVD_GGUF_INT8: case KVD_GGUF_BOOL: return 1;
    case KVD_GGUF_UINT16: case KVD_GGUF_INT16: return 2;
    case KVD_GGUF_UINT32: case KVD_GGUF_INT32: case KVD_GGUF_FLOAT32: return 4;
    case KVD_GGUF_UINT64: case KVD_GGUF_INT64: case KVD_GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

const char *kvd_gguf_printable(char *buf, size_t cap, const char *s, uint64_t len)
{
    if (cap == 0)
        return buf;
    size_t n = 0;
    bool cut = len > cap - 1;
    uint64_t take = cut ? (cap > 4 ? cap - 4 : 0) : len;
    for (uint64_t i = 0; i < take; i++) {
        unsigned char c = (unsigned char)s[i];
        buf[n++] = c < 0x20 || c == 0x7f ? '?' : (char)c;
    }
    if (cut && cap > 4) {
        memcpy(buf + n, "...", 3);
        n += 3;
    }
    buf[n] = '\0';
    return buf;
}

typedef struct cursor {
    const uint8_t *p;
    uint64_t left;
    const char *path;
    kvd_error *err;
} cursor;

static uint64_t consumed(const cursor *c, const uint8_t *start)
{
    return (uint64_t)(c->p - start);
}

static int take(cursor *c, void *out, size_t n, const char *what)
{
    if (c->left < n)
        return kvd_error_set(c->err, KVD_EFORMAT, "%s: truncated in %s", c->path, what);
    if (out)
        memcpy(out, c->p, n);
    c->p += n;
    c->left -= n;
    return 0;
}

static int take_u32(cursor *c, uint32_t *v, const char *what)
{
    return take(c, v, 4, what);
}

static int take_u64(cursor *c, uint64_t *v, const char *what)
{
    return take(c, v, 8, what);
}

/* A length-prefixed string: checks the length against the bytes left. */
static int take_string(cursor *c, kvd_gguf_str *s, const char *what)
{
    uint64_t len = 0;
    int rc = take_u64(c, &len, what);
    if (rc < 0)
        return rc;
    if (len > c->left)
        return kvd_error_set(c->err, KVD_EFORMAT,
                             "%s: %s: string length %llu runs past the end of the file", c->path,
                             what, (unsigned long long)len);
    s->ptr = (const char *)c->p;
    s->len = len;
    c->p += len;
    c->left -= len;
    return 0;
}

/* Keys and tensor names become NUL-terminated copies: bounded length, no control bytes
 * (they end up in one-line messages as they are). */
static int copy_name(cursor *c, const kvd_gguf_str *s, char **out, const char *what)
{
    char shown[80];
    bool control = false;
    for (uint64_t i = 0; i < s->len && i <= KVD_GGUF_MAX_NAME; i++)
        control |= (unsigned char)s->ptr[i] < 0x20 || s->ptr[i] == 0x7f;
    if (s->len == 0 || s->len > KVD_GGUF_MAX_NAME || control)
        return kvd_error_set(c->err, KVD_EFORMAT,
                             "%s: %s \"%s\" is empty, longer than %d bytes or holds a control "
                             "byte",
                             c->path, what, kvd_gguf_printable(shown, sizeof shown, s->ptr, s->len),
                             KVD_GGUF_MAX_NAME);
    *out = malloc(s->len + 1);
    if (!*out)
        return kvd_error_set(c->err, KVD_ENOMEM, "%s: out of memory", c->path);
    memcpy(*out, s->ptr, s->len);
    (*out)[s->len] = '\0';
    return 0;
}

/* Skips one value of type type (not an array), checking it fits. */
static int skip_value(cursor *c, uint32_t type, const char *key)
{
    if (type == KVD_GGUF_STRING) {
        kvd_gguf_str s;
        return take_string(c, &s, key);
    }
    size_t size = scalar_size(type);
    if (size == 0)
        return kvd_error_set(c->err, KVD_EFORMAT, "%s: key %s has unknown value type %u", c->path,
                             key, type);
    if (type == KVD_GGUF_BOOL && c->left >= 1 && c->p[0] > 1)
        return kvd_error_set(c->err, KVD_EFORMAT, "%s: key %s: bool value %u is not 0 or 1",
                             c->path, key, c->p[0]);
    return take(c, NULL, size, key);
}

static int parse_kv(cursor *c, kvd_gguf_kv *kv)
{
    kvd_gguf_str key;
    int rc;
    if ((rc = take_string(c, &key, "a key")) < 0 || (rc = copy_name(c, &key, &kv->key, "key")) < 0)
        return rc;
    uint32_t type = 0;
    if ((rc = take_u32(c, &type, kv->key)) < 0)
        return rc;
    kv->type = (kvd_gguf_type)type;
    if (type != KVD_GGUF_ARRAY) {
        kv->data = c->p;
        kv->count = 1;
        rc = skip_value(c, type, kv->key);
        kv->size = (uint64_t)(c->p - kv->data);
        return rc;
    }
    uint32_t elem = 0;
    uint64_t count = 0;
    if ((rc = take_u32(c, &elem, kv->key)) < 0 || (rc = take_u64(c, &count, kv->key)) < 0)
        return rc;
    if (elem == KVD_GGUF_ARRAY)
        return kvd_error_set(c->err, KVD_EFORMAT, "%s: key %s: arrays of arrays are not supported",
                             c->path, kv->key);
    if (elem != KVD_GGUF_STRING && scalar_size(elem) == 0)
        return kvd_error_set(c->err, KVD_EFORMAT, "%s: key %s: unknown array element type %u",
                             c->path, kv->key, elem);
    size_t min_size = elem == KVD_GGUF_STRING ? 8 : scalar_size(elem);
    if (count > c->left / min_size)
        return kvd_error_set(c->err, KVD_EFORMAT,
                             "%s: key %s: array of %llu elements runs past the end of the file",
                             c->path, kv->key, (unsigned long long)count);
    kv->elem_type = (kvd_gguf_type)elem;
    kv->count = count;
    kv->data = c->p;
    if (elem == KVD_GGUF_STRING || elem == KVD_GGUF_BOOL) {
        for (uint64_t i = 0; i < count; i++)
            if ((rc = skip_value(c, elem, kv->key)) < 0)
                return rc;
    } else if ((rc = take(c, NULL, (size_t)(count * min_size), kv->key)) < 0) {
        return rc;
    }
    kv->size = (uint64_t)(c->p - kv->data);
    return 0;
}

static int parse_tensor_info(cursor *c, kvd_gguf_tensor *t)
{
    kvd_gguf_str name;
    int rc;
    if ((rc = take_string(c, &name, "a tensor name")) < 0 ||
        (rc = copy_name(c, &name, &t->name, "tensor name")) < 0)
        return rc;
    uint32_t ndim = 0;
    if ((rc = take_u32(c, &ndim, t->name)) < 0)
        return rc;
    if (ndim < 1 || ndim > KVD_GGUF_MAX_DIMS)
        return kvd_error_set(c->err, KVD_EFORMAT, "%s: tensor %s has %u dimensions (1 to %d)",
                             c->path, t->name, ndim, KVD_GGUF_MAX_DIMS);
    t->ndim = (int)ndim;
    uint64_t numel = 1;
    for (uint32_t d = 0; d < ndim; d++) {
        if ((rc = take_u64(c, &t->ne[d], t->name)) < 0)
            return rc;
        /* int64 in ggml; a bound far above any real tensor keeps every product exact */
        if (t->ne[d] == 0 || t->ne[d] > ((uint64_t)1 << 40) || numel > (UINT64_C(1) << 62) / t->ne[d])
            return kvd_error_set(c->err, KVD_EFORMAT,
                                 "%s: tensor %s: dimension %u = %llu is zero or too large",
                                 c->path, t->name, d, (unsigned long long)t->ne[d]);
        numel *= t->ne[d];
    }
    for (int d = t->ndim; d < KVD_GGUF_MAX_DIMS; d++)
        t->ne[d] = 1;
    if ((rc = take_u32(c, &t->ggml_type, t->name)) < 0 || (rc = take_u64(c, &t->offset, t->name)) < 0)
        return rc;
    int ti = ggml_type_index(t->ggml_type);
    if (ti < 0)
        return kvd_error_set(c->err, KVD_EUNSUPPORTED, "%s: tensor %s has unknown ggml type %u",
                             c->path, t->name, t->ggml_type);
    if (t->ne[0] % (uint64_t)ggml_types[ti].block_values != 0)
        return kvd_error_set(c->err, KVD_EFORMAT,
                             "%s: tensor %s: %llu columns are not a whole number of %s blocks "
                             "of %d",
                             c->path, t->name, (unsigned long long)t->ne[0], ggml_types[ti].name,
                             ggml_types[ti].block_values);
    /* numel < 2^62 and block_bytes / block_values <= 4 for 1-value blocks, < 2 otherwise */
    uint64_t blocks = numel / (uint64_t)ggml_types[ti].block_values;
    if (blocks > UINT64_MAX / (uint64_t)ggml_types[ti].block_bytes)
        return kvd_error_set(c->err, KVD_EFORMAT, "%s: tensor %s is too large", c->path, t->name);
    t->bytes = blocks * (uint64_t)ggml_types[ti].block_bytes;
    t->supported = ggml_types[ti].dtype >= 0;
    t->dtype = t->supported ? (kvd_dtype)ggml_types[ti].dtype : KVD_DTYPE_F32;
    return 0;
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Sorted copies of the names find duplicates in n log n (a file may hold 10^5 keys). */
static int check_unique(char **names, uint64_t n, const char *what, const char *path,
                        kvd_error *err)
{
    if (n < 2)
        return 0;
    char **sorted = malloc((size_t)n * sizeof *sorted);
    if (!sorted)
        return kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", path);
    memcpy(sorted, names, (size_t)n * sizeof *sorted);
    qsort(sorted, (size_t)n, sizeof *sorted, compare_names);
    int rc = 0;
    for (uint64_t i = 1; i < n && rc == 0; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0)
            rc = kvd_error_set(err, KVD_EFORMAT, "%s: %s %s appears twice", path, what, sorted[i]);
    free(sorted);
    return rc;
}

typedef struct extent {
    uint64_t begin, end;
    const char *name;
} extent;

static int compare_extents(const void *a, const void *b)
{
    const extent *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

static int check_offsets(kvd_gguf *g, uint64_t data_size, const char *path, kvd_error *err)
{
    if (g->num_tensors == 0)
        return 0;
    extent *ex = malloc((size_t)g->num_tensors * sizeof *ex);
    if (!ex)
        return kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", path);
    int rc = 0;
    for (uint64_t i = 0; i < g->num_tensors && rc == 0; i++) {
        const kvd_gguf_tensor *t = &g->tensors[i];
        if (t->offset % g->alignment != 0)
            rc = kvd_error_set(err, KVD_EFORMAT,
                               "%s: tensor %s: offset %llu is not a multiple of the alignment %llu",
                               path, t->name, (unsigned long long)t->offset,
                               (unsigned long long)g->alignment);
        else if (t->offset > data_size || t->bytes > data_size - t->offset)
            rc = kvd_error_set(err, KVD_EFORMAT,
                               "%s: tensor %s: bytes [%llu, +%llu) run past the end of the data "
                               "section (%llu bytes)",
                               path, t->name, (unsigned long long)t->offset,
                               (unsigned long long)t->bytes, (unsigned long long)data_size);
        ex[i] = (extent){t->offset, t->offset + t->bytes, t->name};
    }
    if (rc == 0) {
        qsort(ex, (size_t)g->num_tensors, sizeof *ex, compare_extents);
        for (uint64_t i = 1; i < g->num_tensors && rc == 0; i++)
            if (ex[i].begin < ex[i - 1].end)
                rc = kvd_error_set(err, KVD_EFORMAT, "%s: tensors %s and %s overlap", path,
                                   ex[i - 1].name, ex[i].name);
    }
    free(ex);
    return rc;
}

static int read_alignment(kvd_gguf *g, const char *path, kvd_error *err)
{
    g->alignment = KVD_GGUF_DEFAULT_ALIGNMENT;
    if (!kvd_gguf_find_kv(g, "general.alignment"))
        return 0;
    int64_t a;
    int rc = kvd_gguf_get_int(g, "general.alignment", 1, 1 << 30, &a, path, err);
    if (rc < 0)
        return rc;
    if ((a & (a - 1)) != 0)
        return kvd_error_set(err, KVD_EFORMAT, "%s: general.alignment %lld is not a power of two",
                             path, (long long)a);
    g->alignment = (uint64_t)a;
    return 0;
}

int kvd_gguf_parse(kvd_gguf *out, const void *bytes, size_t size, const char *path,
                   kvd_error *err)
{
    if (!path)
        path = "gguf";
    memset(out, 0, sizeof *out);
    cursor c = {.p = bytes, .left = size, .path = path, .err = err};
    char magic[4] = {0};
    uint32_t version = 0;
    uint64_t num_tensors = 0, num_kvs = 0;
    int rc;
    if ((rc = take(&c, magic, 4, "the header")) < 0)
        return rc;
    if (memcmp(magic, GGUF_MAGIC, 4) != 0)
        return kvd_error_set(err, KVD_EFORMAT, "%s: not a GGUF file (bad magic)", path);
    if ((rc = take_u32(&c, &version, "the header")) < 0)
        return rc;
    if (version != 2 && version != 3)
        return kvd_error_set(err, KVD_EUNSUPPORTED, "%s: GGUF version %u (kvd reads 2 and 3)",
                             path, version);
    if ((rc = take_u64(&c, &num_tensors, "the header")) < 0 ||
        (rc = take_u64(&c, &num_kvs, "the header")) < 0)
        return rc;
    /* smallest key/value: 8-byte length, 1-byte key, type, 1-byte value;
     * smallest tensor info: 8 + 1 name, ndim, one extent, type, offset */
    if (num_kvs > c.left / 14 || num_tensors > c.left / 33)
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: %llu keys and %llu tensors cannot fit in %zu bytes", path,
                             (unsigned long long)num_kvs, (unsigned long long)num_tensors, size);
    kvd_gguf g = {.version = version, .bytes = bytes};
    g.kvs = calloc(num_kvs ? (size_t)num_kvs : 1, sizeof *g.kvs);
    g.tensors = calloc(num_tensors ? (size_t)num_tensors : 1, sizeof *g.tensors);
    if (!g.kvs || !g.tensors) {
        rc = kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", path);
        goto fail;
    }
    for (uint64_t i = 0; i < num_kvs; i++) {
        g.num_kvs = i + 1; /* so deinit frees a partly parsed key */
        if ((rc = parse_kv(&c, &g.kvs[i])) < 0)
            goto fail;
    }
    for (uint64_t i = 0; i < num_tensors; i++) {
        g.num_tensors = i + 1;
        if ((rc = parse_tensor_info(&c, &g.tensors[i])) < 0)
            goto fail;
    }
    char **names = malloc((size_t)(num_kvs > num_tensors ? num_kvs : num_tensors) * sizeof *names + 1);
    if (!names) {
        rc = kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", path);
        goto fail;
    }
    for (uint64_t i = 0; i < num_kvs; i++)
        names[i] = g.kvs[i].key;
    rc = check_unique(names, num_kvs, "key", path, err);
    for (uint64_t i = 0; rc == 0 && i < num_tensors; i++)
        names[i] = g.tensors[i].name;
    if (rc == 0)
        rc = check_unique(names, num_tensors, "tensor", path, err);
    free(names);
    if (rc < 0 || (rc = read_alignment(&g, path, err)) < 0)
        goto fail;
    uint64_t header_end = consumed(&c, bytes);
    g.data_start = (header_end + g.alignment - 1) / g.alignment * g.alignment;
    if (g.data_start > size && num_tensors > 0) {
        rc = kvd_error_set(err, KVD_EFORMAT, "%s: the data section would start past the end",
                           path);
        goto fail;
    }
    if ((rc = check_offsets(&g, g.data_start <= size ? size - g.data_start : 0, path, err)) < 0)
        goto fail;
    *out = g;
    return 0;
fail:
    kvd_gguf_deinit(&g);
    return rc;
}

void kvd_gguf_deinit(kvd_gguf *g)
{
    for (uint64_t i = 0; g->kvs && i < g->num_kvs; i++)
        free(g->kvs[i].key);
    for (uint64_t i = 0; g->tensors && i < g->num_tensors; i++)
        free(g->tensors[i].name);
    free(g->kvs);
    free(g->tensors);
    memset(g, 0, sizeof *g);
}

const kvd_gguf_kv *kvd_gguf_find_kv(const kvd_gguf *g, const char *key)
{
    for (uint64_t i = 0; i < g->num_kvs; i++)
        if (strcmp(g->kvs[i].key, key) == 0)
            return &g->kvs[i];
    return NULL;
}

const kvd_gguf_tensor *kvd_gguf_find_tensor(const kvd_gguf *g, const char *name)
{
    for (uint64_t i = 0; i < g->num_tensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0)
            return &g->tensors[i];
    return NULL;
}

static const char *type_name(kvd_gguf_type t)
{
    static const char *const names[] = {"uint8", "int8", "uint16", "int16", "uint32", "int32",
                                        "float32", "bool", "string", "array", "uint64", "int64",
                                        "float64"};
    return (unsigned)t < sizeof names / sizeof *names ? names[t] : "unknown";
}

static const kvd_gguf_kv *required(const kvd_gguf *g, const char *key, const char *path,
                                   kvd_error *err)
{
    const kvd_gguf_kv *kv = kvd_gguf_find_kv(g, key);
    if (!kv)
        kvd_error_set(err, KVD_EFORMAT, "%s: missing key %s", path, key);
    return kv;
}

/* Integer value of a scalar of integer type at p; false for non-integer types. */
static bool read_int(kvd_gguf_type type, const uint8_t *p, int64_t *v, bool *too_big)
{
    *too_big = false;
    switch (type) {
    case KVD_GGUF_UINT8: *v = p[0]; return true;
    case KVD_GGUF_INT8: *v = (int8_t)p[0]; return true;
    case KVD_GGUF_UINT16: { uint16_t x; memcpy(&x, p, 2); *v = x; return true; }
    case KVD_GGUF_INT16: { int16_t x; memcpy(&x, p, 2); *v = x; return true; }
    case KVD_GGUF_UINT32: { uint32_t x; memcpy(&x, p, 4); *v = x; return true; }
    case KVD_GGUF_INT32: { int32_t x; memcpy(&x, p, 4); *v = x; return true; }
    case KVD_GGUF_UINT64: {
        uint64_t x;
        memcpy(&x, p, 8);
        *too_big = x > INT64_MAX;
        *v = (int64_t)(x & INT64_MAX);
        return true;
    }
    case KVD_GGUF_INT64: memcpy(v, p, 8); return true;
    default: return false;
    }
}

int kvd_gguf_get_int(const kvd_gguf *g, const char *key, int64_t min, int64_t max, int64_t *out,
                     const char *path, kvd_error *err)
{
    const kvd_gguf_kv *kv = required(g, key, path, err);
    if (!kv)
        return KVD_EFORMAT;
    int64_t v;
    bool too_big;
    if (!read_int(kv->type, kv->data, &v, &too_big))
        return kvd_error_set(err, KVD_EFORMAT, "%s: key %s must be an integer, got %s", path, key,
                             type_name(kv->type));
    if (too_big || v < min || v > max)
        return kvd_error_set(err, KVD_EFORMAT, "%s: key %s = %s%lld is not in [%lld, %lld]", path,
                             key, too_big ? ">" : "", (long long)v, (long long)min, (long long)max);
    *out = v;
    return 0;
}

int64_t kvd_gguf_array_int(const kvd_gguf_kv *kv, uint64_t i)
{
    int64_t v = 0;
    bool too_big;
    read_int(kv->elem_type, kv->data + i * scalar_size(kv->elem_type), &v, &too_big);
    return too_big ? INT64_MAX : v;
}

int kvd_gguf_get_float(const kvd_gguf *g, const char *key, double *out, const char *path,
                       kvd_error *err)
{
    const kvd_gguf_kv *kv = required(g, key, path, err);
    if (!kv)
        return KVD_EFORMAT;
    double v;
    if (kv->type == KVD_GGUF_FLOAT32) {
        float f;
        memcpy(&f, kv->data, 4);
        v = f;
    } else if (kv->type == KVD_GGUF_FLOAT64) {
        memcpy(&v, kv->data, 8);
    } else {
        return kvd_error_set(err, KVD_EFORMAT, "%s: key %s must be a float, got %s", path, key,
                             type_name(kv->type));
    }
    if (!isfinite(v))
        return kvd_error_set(err, KVD_EFORMAT, "%s: key %s is not finite", path, key);
    *out = v;
    return 0;
}

int kvd_gguf_get_bool(const kvd_gguf *g, const char *key, bool *out, const char *path,
                      kvd_error *err)
{
    const kvd_gguf_kv *kv = required(g, key, path, err);
    if (!kv)
        return KVD_EFORMAT;
    if (kv->type != KVD_GGUF_BOOL)
        return kvd_error_set(err, KVD_EFORMAT, "%s: key %s must be a bool, got %s", path, key,
                             type_name(kv->type));
    *out = kv->data[0] != 0;
    return 0;
}

kvd_gguf_str kvd_gguf_next_string(const uint8_t **cursor)
{
    kvd_gguf_str s;
    memcpy(&s.len, *cursor, 8);
    s.ptr = (const char *)*cursor + 8;
    *cursor += 8 + s.len;
    return s;
}

int kvd_gguf_get_string(const kvd_gguf *g, const char *key, kvd_gguf_str *out,
                        const char *path, kvd_error *err)
{
    const kvd_gguf_kv *kv = required(g, key, path, err);
    if (!kv)
        return KVD_EFORMAT;
    if (kv->type != KVD_GGUF_STRING)
        return kvd_error_set(err, KVD_EFORMAT, "%s: key %s must be a string, got %s", path, key,
                             type_name(kv->type));
    const uint8_t *p = kv->data;
    *out = kvd_gguf_next_string(&p);
    return 0;
}

int kvd_gguf_get_array(const kvd_gguf *g, const char *key, kvd_gguf_type elem_type,
                       const kvd_gguf_kv **out, const char *path, kvd_error *err)
{
    const kvd_gguf_kv *kv = required(g, key, path, err);
    if (!kv)
        return KVD_EFORMAT;
    bool want_int = elem_type != KVD_GGUF_STRING && elem_type != KVD_GGUF_FLOAT32 &&
                    elem_type != KVD_GGUF_FLOAT64 && elem_type != KVD_GGUF_BOOL;
    int64_t v;
    bool too_big;
    uint8_t probe[8] = {0};
    bool is_int = kv->type == KVD_GGUF_ARRAY && read_int(kv->elem_type, probe, &v, &too_big);
    if (kv->type != KVD_GGUF_ARRAY || (want_int ? !is_int : kv->elem_type != elem_type))
        return kvd_error_set(err, KVD_EFORMAT, "%s: key %s must be an array of %s", path, key,
                             want_int ? "integers" : type_name(elem_type));
    *out = kv;
    return 0;
}

int kvd_gguf_file_open(kvd_gguf_file *f, const char *path, kvd_error *err)
{
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return kvd_error_set(err, KVD_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return kvd_error_set(err, KVD_EIO, "%s: not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    void *map = size ? mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    int e = errno;
    close(fd);
    if (map == MAP_FAILED)
        return kvd_error_set(err, KVD_EIO, "%s: cannot map: %s", path, strerror(e));
    f->path = strdup(path);
    if (!f->path) {
        if (map)
            munmap(map, size);
        return kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", path);
    }
    f->map = map;
    f->size = size;
    int rc = kvd_gguf_parse(&f->gguf, map ? map : "", size, path, err);
    if (rc < 0)
        kvd_gguf_file_close(f);
    return rc;
}

void kvd_gguf_file_close(kvd_gguf_file *f)
{
    kvd_gguf_deinit(&f->gguf);
    if (f->map)
        munmap((void *)f->map, f->size);
    free(f->path);
    memset(f, 0, sizeof *f);
}

bool kvd_gguf_is_gguf_file(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    char magic[4];
    bool yes = read(fd, magic, 4) == 4 && memcmp(magic, GGUF_MAGIC, 4) == 0;
    close(fd);
    return yes;
}

static bool has_suffix(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n > m && strcmp(s + n - m, suffix) == 0;
}

int kvd_gguf_resolve(const char *path, char *out, size_t cap, kvd_error *err)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return 0;
    if (S_ISREG(st.st_mode)) {
        if (!has_suffix(path, ".gguf") && !kvd_gguf_is_gguf_file(path))
            return 0;
        if ((size_t)snprintf(out, cap, "%s", path) >= cap)
            return kvd_error_set(err, KVD_EINVAL, "%s: path too long", path);
        return 1;
    }
    if (!S_ISDIR(st.st_mode))
        return 0;
    char probe[PATH_MAX];
    if ((size_t)snprintf(probe, sizeof probe, "%s/config.json", path) < sizeof probe &&
        access(probe, F_OK) == 0)
        return 0;
    DIR *d = opendir(path);
    if (!d)
        return 0;
    int found = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!has_suffix(e->d_name, ".gguf"))
            continue;
        if (found++ == 0 && (size_t)snprintf(out, cap, "%s/%s", path, e->d_name) >= cap) {
            closedir(d);
            return kvd_error_set(err, KVD_EINVAL, "%s: path too long", path);
        }
    }
    closedir(d);
    if (found > 1)
        return kvd_error_set(err, KVD_EINVAL,
                             "%s: holds %d .gguf files and no config.json: name the file", path,
                             found);
    return found;
}

int kvd_gguf_qwen2_name(const char *hf_name, char *out, size_t cap)
{
    static const char *const whole[][2] = {
        {"model.embed_tokens.weight", "token_embd.weight"},
        {"model.norm.weight", "output_norm.weight"},
        {"lm_head.weight", "output.weight"},
    };
    static const char *const layer[][2] = {
        {"self_attn.q_proj.", "attn_q."}, {"self_attn.k_proj.", "attn_k."},
        {"self_attn.v_proj.", "attn_v."}, {"self_attn.o_proj.", "attn_output."},
        {"mlp.gate_proj.", "ffn_gate."},  {"mlp.up_proj.", "ffn_up."},
        {"mlp.down_proj.", "ffn_down."},  {"input_layernorm.", "attn_norm."},
        {"post_attention_layernorm.", "ffn_norm."},
    };
    for (size_t i = 0; i < sizeof whole / sizeof *whole; i++)
        if (strcmp(hf_name, whole[i][0]) == 0)
            return (size_t)snprintf(out, cap, "%s", whole[i][1]) < cap ? 0 : KVD_EINVAL;
    unsigned n;
    int used = 0;
    if (sscanf(hf_name, "model.layers.%u.%n", &n, &used) != 1 || used == 0)
        return KVD_EINVAL;
    const char *rest = hf_name + used;
    for (size_t i = 0; i < sizeof layer / sizeof *layer; i++) {
        size_t len = strlen(layer[i][0]);
        const char *suffix = rest + len;
        if (strncmp(rest, layer[i][0], len) == 0 &&
            (strcmp(suffix, "weight") == 0 || strcmp(suffix, "bias") == 0))
            return (size_t)snprintf(out, cap, "blk.%u.%s%s", n, layer[i][1], suffix) < cap
                       ? 0
                       : KVD_EINVAL;
    }
    return KVD_EINVAL;
}

/* ---- writer ---- */

static void put(kvd_gguf_writer *w, uint8_t **buf, size_t *len, size_t *cap, const void *p,
                size_t n)
{
    if (w->failed)
        return;
    if (*len + n > *cap) {
        size_t grown = *cap ? *cap : 4096;
        while (grown < *len + n)
            grown *= 2;
        uint8_t *b = realloc(*buf, grown);
        if (!b) {
            w->failed = true;
            return;
        }
        *buf = b;
        *cap = grown;
    }
    memcpy(*buf + *len, p, n);
    *len += n;
}

static void put_h(kvd_gguf_writer *w, const void *p, size_t n)
{
    put(w, &w->buf, &w->len, &w->cap, p, n);
}

static void put_u32(kvd_gguf_writer *w, uint32_t v)
{
    put_h(w, &v, 4);
}

static void put_u64(kvd_gguf_writer *w, uint64_t v)
{
    put_h(w, &v, 8);
}

static void put_str(kvd_gguf_writer *w, const char *s, size_t n)
{
    put_u64(w, n);
    put_h(w, s, n);
}

void kvd_gguf_writer_init(kvd_gguf_writer *w)
{
    memset(w, 0, sizeof *w);
    w->alignment = KVD_GGUF_DEFAULT_ALIGNMENT;
    /* magic, version and the two counts are filled in by finish */
    uint8_t head[24] = {0};
    put_h(w, head, sizeof head);
}

void kvd_gguf_writer_deinit(kvd_gguf_writer *w)
{
    free(w->buf);
    free(w->tinfo);
    memset(w, 0, sizeof *w);
}

static void put_key(kvd_gguf_writer *w, const char *key, kvd_gguf_type type)
{
    put_str(w, key, strlen(key));
    put_u32(w, type);
    w->num_kvs++;
}

void kvd_gguf_write_string(kvd_gguf_writer *w, const char *key, const char *value)
{
    put_key(w, key, KVD_GGUF_STRING);
    put_str(w, value, strlen(value));
}

void kvd_gguf_write_u32(kvd_gguf_writer *w, const char *key, uint32_t value)
{
    put_key(w, key, KVD_GGUF_UINT32);
    put_u32(w, value);
}

void kvd_gguf_write_i32(kvd_gguf_writer *w, const char *key, int32_t value)
{
    put_key(w, key, KVD_GGUF_INT32);
    put_h(w, &value, 4);
}

void kvd_gguf_write_f32(kvd_gguf_writer *w, const char *key, float value)
{
    put_key(w, key, KVD_GGUF_FLOAT32);
    put_h(w, &value, 4);
}

void kvd_gguf_write_bool(kvd_gguf_writer *w, const char *key, bool value)
{
    put_key(w, key, KVD_GGUF_BOOL);
    uint8_t b = value;
    put_h(w, &b, 1);
}

void kvd_gguf_write_string_array(kvd_gguf_writer *w, const char *key, const char *const *values,
                                 const size_t *lens, uint64_t n)
{
    put_key(w, key, KVD_GGUF_ARRAY);
    put_u32(w, KVD_GGUF_STRING);
    put_u64(w, n);
    for (uint64_t i = 0; i < n; i++)
        put_str(w, values[i], lens ? lens[i] : strlen(values[i]));
}

void kvd_gguf_write_i32_array(kvd_gguf_writer *w, const char *key, const int32_t *values,
                              uint64_t n)
{
    put_key(w, key, KVD_GGUF_ARRAY);
    put_u32(w, KVD_GGUF_INT32);
    put_u64(w, n);
    put_h(w, values, (size_t)n * 4);
}

void kvd_gguf_write_kv_copy(kvd_gguf_writer *w, const kvd_gguf_kv *kv)
{
    put_key(w, kv->key, kv->type);
    if (kv->type == KVD_GGUF_ARRAY) {
        put_u32(w, kv->elem_type);
        put_u64(w, kv->count);
    }
    put_h(w, kv->data, (size_t)kv->size);
}

uint64_t kvd_gguf_write_tensor_info(kvd_gguf_writer *w, const char *name, uint32_t ggml_type,
                                    int ndim, const uint64_t *ne, uint64_t bytes)
{
    uint64_t offset = w->data_bytes;
    uint64_t len = strlen(name);
    uint32_t nd = (uint32_t)ndim;
    put(w, &w->tinfo, &w->tinfo_len, &w->tinfo_cap, &len, 8);
    put(w, &w->tinfo, &w->tinfo_len, &w->tinfo_cap, name, len);
    put(w, &w->tinfo, &w->tinfo_len, &w->tinfo_cap, &nd, 4);
    put(w, &w->tinfo, &w->tinfo_len, &w->tinfo_cap, ne, (size_t)ndim * 8);
    put(w, &w->tinfo, &w->tinfo_len, &w->tinfo_cap, &ggml_type, 4);
    put(w, &w->tinfo, &w->tinfo_len, &w->tinfo_cap, &offset, 8);
    w->num_tensors++;
    w->data_bytes = (offset + bytes + w->alignment - 1) / w->alignment * w->alignment;
    return offset;
}

int kvd_gguf_writer_finish(kvd_gguf_writer *w, const uint8_t **out, size_t *len, kvd_error *err)
{
    put_h(w, w->tinfo, w->tinfo_len);
    static const uint8_t zeros[64];
    size_t pad = (size_t)((w->alignment - w->len % w->alignment) % w->alignment);
    put_h(w, zeros, pad);
    if (w->failed)
        return kvd_error_set(err, KVD_ENOMEM, "gguf writer: out of memory");
    uint32_t version = 3;
    memcpy(w->buf, GGUF_MAGIC, 4);
    memcpy(w->buf + 4, &version, 4);
    memcpy(w->buf + 8, &w->num_tensors, 8);
    memcpy(w->buf + 16, &w->num_kvs, 8);
    *out = w->buf;
    *len = w->len;
    return 0;
}
