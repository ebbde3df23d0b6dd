/* safetensors.c - validating parser, read-only file mapping and header writer for safetensors.
 *
 * The header is untrusted input (a fuzzer feeds this parser arbitrary bytes), so
 * every number is checked before it is used: the header length against the file,
 * each JSON value's type, integers for being exact non-negative integers below
 * 2^53, the shape product and byte size for overflow, offsets for order and range.
 * The parsed tensors are sorted by name so lookups are binary searches and duplicate
 * names are caught (JSON allows them; a checkpoint must not). Messages name the file
 * and, when there is one, the tensor.
 */
#include "kvd/kvd_safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvd/kvd_buf.h"

/* Every dtype the format defines, so offsets can be checked even for tensors kvd
 * will never use. */
static const struct {
    const char *name;
    size_t size;
} st_dtypes[] = {
    {"BOOL", 1}, {"U8", 1}, {"I8", 1}, {"F8_E5M2", 1}, {"F8_E4M3", 1},
    {"I16", 2}, {"U16", 2}, {"F16", 2}, {"BF16", 2},
    {"I32", 4}, {"U32", 4}, {"F32", 4},
    {"I64", 8}, {"U64", 8}, {"F64", 8},
};

const char *kvd_st_dtype_name(kvd_dtype dtype)
{
    switch (dtype) {
    case KVD_DTYPE_F32: return "F32";
    case KVD_DTYPE_F16: return "F16";
    case KVD_DTYPE_BF16: return "BF16";
    default: return "?"; /* block formats have no safetensors name */
    }
}

const char *kvd_st_printable(char *buf, size_t cap, const char *s)
{
    if (cap == 0)
        return buf;
    size_t n = 0;
    for (; s && s[n] && n + 1 < cap; n++) {
        unsigned char c = (unsigned char)s[n];
        buf[n] = c < 0x20 || c == 0x7f ? '?' : (char)c;
    }
    buf[n] = '\0';
    if (s && s[n] && cap >= 4)
        memcpy(buf + cap - 4, "...", 4);
    return buf;
}

/* JSON numbers are doubles: only integers up to 2^53 are exact, which covers any
 * real file offset. */
static bool json_to_u64(const cJSON *item, uint64_t *out)
{
    if (!cJSON_IsNumber(item))
        return false;
    double v = item->valuedouble;
    if (!isfinite(v) || v < 0 || v > 9007199254740992.0 || floor(v) != v)
        return false;
    *out = (uint64_t)v;
    return true;
}

static int compare_tensor_names(const void *a, const void *b)
{
    const kvd_st_tensor *ta = a, *tb = b;
    return strcmp(ta->name, tb->name);
}

static void free_tensors(kvd_st_tensor *tensors, int n)
{
    for (int i = 0; i < n; i++)
        free(tensors[i].name);
    free(tensors);
}

/* Fills t from one header entry. Returns 0 or an error code with err set. */
static int parse_entry(kvd_st_tensor *t, const cJSON *entry, uint64_t data_size,
                       const char *path, kvd_error *err)
{
    char name[128];
    kvd_st_printable(name, sizeof name, t->name);
    if (!cJSON_IsObject(entry))
        return kvd_error_set(err, KVD_EFORMAT, "%s: tensor %s: header entry is not an object",
                             path, name);

    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(entry, "dtype");
    if (!cJSON_IsString(dtype))
        return kvd_error_set(err, KVD_EFORMAT, "%s: tensor %s: missing or non-string \"dtype\"",
                             path, name);
    size_t elem_size = 0;
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++) {
        if (strcmp(dtype->valuestring, st_dtypes[i].name) == 0) {
            elem_size = st_dtypes[i].size;
            snprintf(t->dtype_name, sizeof t->dtype_name, "%s", st_dtypes[i].name);
            break;
        }
    }
    if (elem_size == 0) {
        char dtype_text[24];
        return kvd_error_set(err, KVD_EUNSUPPORTED, "%s: tensor %s: unknown dtype \"%s\"", path,
                             name, kvd_st_printable(dtype_text, sizeof dtype_text,
                                                    dtype->valuestring));
    }
    t->elem_size = elem_size;
    t->supported = true;
    if (strcmp(t->dtype_name, "BF16") == 0)
        t->dtype = KVD_DTYPE_BF16;
    else if (strcmp(t->dtype_name, "F16") == 0)
        t->dtype = KVD_DTYPE_F16;
    else if (strcmp(t->dtype_name, "F32") == 0)
        t->dtype = KVD_DTYPE_F32;
    else
        t->supported = false;

    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(entry, "shape");
    if (!cJSON_IsArray(shape))
        return kvd_error_set(err, KVD_EFORMAT, "%s: tensor %s: missing or non-array \"shape\"",
                             path, name);
    int ndim = cJSON_GetArraySize(shape);
    if (ndim > KVD_ST_MAX_DIMS)
        return kvd_error_set(err, KVD_EFORMAT, "%s: tensor %s: %d dimensions (at most %d)",
                             path, name, ndim, KVD_ST_MAX_DIMS);
    uint64_t numel = 1;
    int d = 0;
    const cJSON *dim;
    cJSON_ArrayForEach(dim, shape) {
        uint64_t extent;
        if (!json_to_u64(dim, &extent) || extent > INT64_MAX)
            return kvd_error_set(err, KVD_EFORMAT,
                                 "%s: tensor %s: shape[%d] is not a non-negative integer",
                                 path, name, d);
        if (__builtin_mul_overflow(numel, extent, &numel))
            return kvd_error_set(err, KVD_EFORMAT, "%s: tensor %s: shape overflows", path, name);
        t->shape[d++] = (int64_t)extent;
    }
    t->ndim = ndim;
    t->numel = numel;

    const cJSON *offsets = cJSON_GetObjectItemCaseSensitive(entry, "data_offsets");
    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2)
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: tensor %s: \"data_offsets\" is not an array of 2 integers",
                             path, name);
    uint64_t begin, end;
    if (!json_to_u64(cJSON_GetArrayItem(offsets, 0), &begin) ||
        !json_to_u64(cJSON_GetArrayItem(offsets, 1), &end))
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: tensor %s: \"data_offsets\" are not non-negative integers",
                             path, name);
    if (begin > end)
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: tensor %s: data_offsets [%llu, %llu] end before they begin",
                             path, name, (unsigned long long)begin, (unsigned long long)end);
    if (end > data_size)
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: tensor %s: data_offsets [%llu, %llu] past the end of the data "
                             "(%llu bytes; file truncated?)",
                             path, name, (unsigned long long)begin, (unsigned long long)end,
                             (unsigned long long)data_size);
    uint64_t bytes;
    if (__builtin_mul_overflow(numel, (uint64_t)elem_size, &bytes) || bytes != end - begin)
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: tensor %s: data_offsets span %llu bytes but shape x %s needs "
                             "%llu x %zu",
                             path, name, (unsigned long long)(end - begin), t->dtype_name,
                             (unsigned long long)numel, elem_size);
    t->begin = begin;
    t->end = end;
    return 0;
}

int kvd_st_header_parse(kvd_st_header *out, const void *bytes, size_t size, const char *path,
                        kvd_error *err)
{
    const uint8_t *p = bytes;
    if (size < 8)
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: %zu bytes, too short for a safetensors header length", path,
                             size);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = header_len << 8 | p[i];
    if (header_len > size - 8)
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: header length %llu exceeds the file (%zu bytes; truncated?)",
                             path, (unsigned long long)header_len, size);
    if (header_len > KVD_ST_MAX_HEADER_BYTES)
        return kvd_error_set(err, KVD_EFORMAT, "%s: header length %llu over the %llu-byte limit",
                             path, (unsigned long long)header_len,
                             (unsigned long long)KVD_ST_MAX_HEADER_BYTES);
    if (header_len < 2 || p[8] != '{')
        return kvd_error_set(err, KVD_EFORMAT, "%s: header is not a JSON object", path);

    const char *json = (const char *)p + 8;
    const char *json_end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, (size_t)header_len, &json_end, false);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        long offset = (at && at >= json && at <= json + header_len) ? (long)(at - json) : -1;
        return kvd_error_set(err, KVD_EFORMAT, "%s: corrupt JSON header (near byte %ld of %llu)",
                             path, offset, (unsigned long long)header_len);
    }
    int rc = 0;
    kvd_st_tensor *tensors = NULL;
    int n = 0;
    /* Writers pad the header with spaces; anything else after the object is junk. */
    for (const char *q = json_end; q && q < json + header_len; q++) {
        if (*q != ' ' && *q != '\t' && *q != '\n' && *q != '\r' && *q != '\0') {
            rc = kvd_error_set(err, KVD_EFORMAT, "%s: junk after the JSON header at byte %ld",
                               path, (long)(q - json));
            goto done;
        }
    }
    if (!cJSON_IsObject(root)) {
        rc = kvd_error_set(err, KVD_EFORMAT, "%s: header is not a JSON object", path);
        goto done;
    }

    int capacity = cJSON_GetArraySize(root);
    tensors = calloc(capacity > 0 ? (size_t)capacity : 1, sizeof *tensors);
    if (!tensors) {
        rc = kvd_error_set(err, KVD_ENOMEM, "%s: out of memory for %d header entries", path,
                           capacity);
        goto done;
    }
    uint64_t data_size = size - 8 - header_len;
    const cJSON *entry;
    cJSON_ArrayForEach(entry, root) {
        if (!entry->string) {
            rc = kvd_error_set(err, KVD_EFORMAT, "%s: header entry without a name", path);
            goto done;
        }
        if (strcmp(entry->string, "__metadata__") == 0) {
            if (!cJSON_IsObject(entry)) {
                rc = kvd_error_set(err, KVD_EFORMAT, "%s: \"__metadata__\" is not an object",
                                   path);
                goto done;
            }
            continue;
        }
        kvd_st_tensor *t = &tensors[n];
        t->name = strdup(entry->string);
        if (!t->name) {
            rc = kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", path);
            goto done;
        }
        n++;
        rc = parse_entry(t, entry, data_size, path, err);
        if (rc < 0)
            goto done;
    }
    qsort(tensors, (size_t)n, sizeof *tensors, compare_tensor_names);
    for (int i = 1; i < n; i++) {
        if (strcmp(tensors[i - 1].name, tensors[i].name) == 0) {
            char name[128];
            rc = kvd_error_set(err, KVD_EFORMAT, "%s: tensor %s appears twice in the header",
                               path, kvd_st_printable(name, sizeof name, tensors[i].name));
            goto done;
        }
    }
    out->tensors = tensors;
    out->num_tensors = n;
    out->data_start = 8 + header_len;
    out->data_size = data_size;
    tensors = NULL;
done:
    if (tensors)
        free_tensors(tensors, n);
    cJSON_Delete(root);
    return rc;
}

void kvd_st_header_deinit(kvd_st_header *header)
{
    if (!header)
        return;
    free_tensors(header->tensors, header->num_tensors);
    memset(header, 0, sizeof *header);
}

const kvd_st_tensor *kvd_st_header_find(const kvd_st_header *header, const char *name)
{
    int lo = 0, hi = header->num_tensors - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(name, header->tensors[mid].name);
        if (c == 0)
            return &header->tensors[mid];
        if (c < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return NULL;
}

int kvd_st_file_open(kvd_st_file *f, const char *path, kvd_error *err)
{
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return kvd_error_set(err, KVD_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return kvd_error_set(err, KVD_EIO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return kvd_error_set(err, KVD_EIO, "%s: not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    if (size < 8) {
        close(fd);
        return kvd_error_set(err, KVD_EFORMAT,
                             "%s: %zu bytes, too short for a safetensors header length", path,
                             size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd);
    if (map == MAP_FAILED)
        return kvd_error_set(err, KVD_EIO, "%s: cannot mmap %zu bytes: %s", path, size,
                             strerror(map_errno));
    /* The loader reads each tensor once, front to back. */
    madvise(map, size, MADV_SEQUENTIAL);
    kvd_st_header header = {0};
    int rc = kvd_st_header_parse(&header, map, size, path, err);
    char *path_copy = rc == 0 ? strdup(path) : NULL;
    if (rc == 0 && !path_copy) {
        kvd_st_header_deinit(&header);
        rc = kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", path);
    }
    if (rc < 0) {
        munmap(map, size);
        return rc;
    }
    f->path = path_copy;
    f->map = map;
    f->size = size;
    f->header = header;
    return 0;
}

void kvd_st_release_pages(const void *data, size_t len)
{
    if (!data || len == 0)
        return;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    /* Whole pages around the range: the mapping starts on a page and its last page is
     * mapped whole, so the rounded range stays inside it; a neighbour's page dropped
     * here is simply read back from the page cache. */
    uintptr_t begin = (uintptr_t)data & ~(page - 1);
    uintptr_t end = ((uintptr_t)data + len + page - 1) & ~(page - 1);
    madvise((void *)begin, end - begin, MADV_DONTNEED);
}

void kvd_st_file_close(kvd_st_file *f)
{
    if (!f)
        return;
    if (f->map)
        munmap((void *)f->map, f->size);
    kvd_st_header_deinit(&f->header);
    free(f->path);
    memset(f, 0, sizeof *f);
}

static void buf_json_string(kvd_sbuf *b, const char *s)
{
    kvd_sbuf_append(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            kvd_sbuf_append(b, esc, 2);
        } else if (c < 0x20) {
            kvd_sbuf_printf(b, "\\u%04x", c);
        } else {
            kvd_sbuf_append(b, (const char *)&c, 1);
        }
    }
    kvd_sbuf_append(b, "\"", 1);
}

int kvd_st_header_build(const kvd_st_spec *specs, int n, char **out, size_t *out_len,
                        uint64_t *data_bytes, kvd_error *err)
{
    kvd_sbuf b = {0};
    kvd_sbuf_append(&b, "12345678", 8); /* the length, patched below */
    kvd_sbuf_append(&b, "{\"__metadata__\":{\"format\":\"pt\"}", 31);
    uint64_t offset = 0;
    for (int i = 0; i < n; i++) {
        const kvd_st_spec *s = &specs[i];
        if (!s->name || !s->name[0] || strcmp(s->name, "__metadata__") == 0 || s->ndim < 0 ||
            s->ndim > KVD_ST_MAX_DIMS) {
            free(b.data);
            return kvd_error_set(err, KVD_EINVAL, "safetensors writer: bad tensor spec #%d (%s)",
                                 i, s->name ? s->name : "(null)");
        }
        uint64_t bytes = kvd_dtype_size(s->dtype);
        for (int d = 0; d < s->ndim; d++) {
            if (s->shape[d] < 0 || __builtin_mul_overflow(bytes, (uint64_t)s->shape[d], &bytes)) {
                free(b.data);
                return kvd_error_set(err, KVD_EINVAL, "safetensors writer: tensor %s: bad shape",
                                     s->name);
            }
        }
        kvd_sbuf_append(&b, ",", 1);
        buf_json_string(&b, s->name);
        kvd_sbuf_printf(&b, ":{\"dtype\":\"%s\",\"shape\":[", kvd_st_dtype_name(s->dtype));
        for (int d = 0; d < s->ndim; d++)
            kvd_sbuf_printf(&b, d ? ",%lld" : "%lld", (long long)s->shape[d]);
        kvd_sbuf_printf(&b, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)offset,
                   (unsigned long long)(offset + bytes));
        offset += bytes;
    }
    kvd_sbuf_append(&b, "}", 1);
    while (!b.failed && b.len % 8 != 0)
        kvd_sbuf_append(&b, " ", 1);
    if (b.failed) {
        free(b.data);
        return kvd_error_set(err, KVD_ENOMEM, "safetensors writer: out of memory");
    }
    uint64_t header_len = b.len - 8;
    for (int i = 0; i < 8; i++)
        b.data[i] = (char)(header_len >> (8 * i) & 0xff);
    *out = b.data;
    *out_len = b.len;
    if (data_bytes)
        *data_bytes = offset;
    return 0;
}
