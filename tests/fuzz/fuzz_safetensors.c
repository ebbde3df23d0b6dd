/* fuzz_safetensors.c - libFuzzer target: the safetensors header parser on arbitrary bytes.
 *
 * The input is a whole file. Besides "no crash, no leak, no undefined behaviour"
 * (ASan/UBSan), an accepted header must satisfy what the loader relies on: every
 * tensor's byte range lies inside the data section and matches its shape and dtype,
 * names are unique and each one is found by lookup. A violation aborts.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvd/kvd_safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kvd_st_header header = {0};
    kvd_error err = {0};
    int rc = kvd_st_header_parse(&header, data, size, "fuzz.safetensors", &err);
    if (rc != 0) {
        /* A refusal must explain itself in one line and leave the header empty. */
        if (err.code != rc || err.msg[0] == '\0' || strchr(err.msg, '\n') || header.tensors)
            abort();
        return 0;
    }
    if (header.data_start < 8 || header.data_start + header.data_size != size)
        abort();
    for (int i = 0; i < header.num_tensors; i++) {
        const kvd_st_tensor *t = &header.tensors[i];
        if (t->begin > t->end || t->end > header.data_size)
            abort();
        if (t->numel * t->elem_size != t->end - t->begin)
            abort();
        if (kvd_st_header_find(&header, t->name) != t)
            abort();
        if (i > 0 && strcmp(header.tensors[i - 1].name, t->name) >= 0)
            abort();
    }
    kvd_st_header_deinit(&header);
    return 0;
}
