/* fuzz_gguf.c - libFuzzer target: the GGUF parser on arbitrary bytes.
 *
 * The input is a whole file. Besides "no crash, no leak, no undefined behaviour"
 * (ASan/UBSan), an accepted file must satisfy what the loader and tokenizer rely on:
 * every tensor's bytes lie inside the data section at an aligned offset, names are
 * found by lookup, every string array can be walked without leaving the input, and the
 * typed getters answer for every key without reading out of bounds. A violation aborts.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvd/kvd_gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kvd_gguf g;
    kvd_error err = {0};
    int rc = kvd_gguf_parse(&g, data, size, "fuzz.gguf", &err);
    if (rc != 0) {
        /* A refusal must explain itself in one line and leave nothing allocated. */
        if (err.code != rc || err.msg[0] == '\0' || strchr(err.msg, '\n') || g.kvs || g.tensors)
            abort();
        return 0;
    }
    if (g.alignment == 0 || (g.alignment & (g.alignment - 1)) != 0)
        abort();
    for (uint64_t i = 0; i < g.num_tensors; i++) {
        const kvd_gguf_tensor *t = &g.tensors[i];
        if (t->offset % g.alignment != 0 || g.data_start > size ||
            t->offset > size - g.data_start || t->bytes > size - g.data_start - t->offset)
            abort();
        if (kvd_gguf_find_tensor(&g, t->name) != t)
            abort();
        volatile uint8_t sink = t->bytes ? ((const uint8_t *)kvd_gguf_tensor_data(&g, t))[t->bytes - 1] : 0;
        (void)sink;
    }
    const uint8_t *end = data + size;
    for (uint64_t i = 0; i < g.num_kvs; i++) {
        const kvd_gguf_kv *kv = &g.kvs[i];
        if (kvd_gguf_find_kv(&g, kv->key) != kv)
            abort();
        int64_t v;
        double f;
        bool b;
        kvd_gguf_str s;
        kvd_gguf_get_int(&g, kv->key, INT64_MIN, INT64_MAX, &v, "fuzz.gguf", &err);
        kvd_gguf_get_float(&g, kv->key, &f, "fuzz.gguf", &err);
        kvd_gguf_get_bool(&g, kv->key, &b, "fuzz.gguf", &err);
        if (kvd_gguf_get_string(&g, kv->key, &s, "fuzz.gguf", &err) == 0 &&
            (const uint8_t *)s.ptr + s.len > end)
            abort();
        const kvd_gguf_kv *arr;
        if (kvd_gguf_get_array(&g, kv->key, KVD_GGUF_STRING, &arr, "fuzz.gguf", &err) == 0) {
            const uint8_t *cursor = arr->data;
            for (uint64_t e = 0; e < arr->count; e++) {
                kvd_gguf_str x = kvd_gguf_next_string(&cursor);
                if ((const uint8_t *)x.ptr + x.len > end)
                    abort();
            }
        }
        if (kvd_gguf_get_array(&g, kv->key, KVD_GGUF_INT32, &arr, "fuzz.gguf", &err) == 0)
            for (uint64_t e = 0; e < arr->count; e++)
                (void)kvd_gguf_array_int(arr, e);
    }
    kvd_gguf_deinit(&g);
    return 0;
}
