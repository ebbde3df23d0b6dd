/* fuzz_template.c - libFuzzer target: the chat template engine's parser and renderer.
 *
 * An input is a template, optionally followed by a NUL byte and a JSON object of
 * variables (else a small fixed conversation with tools is used). Checked, beyond
 * ASan/UBSan and leaks:
 *   - parsing either succeeds or fails with KVD_EINVAL/KVD_ENOMEM and a one-line
 *     message naming the template line;
 *   - rendering within small bounds either succeeds or fails with KVD_EINVAL,
 *     KVD_ETOOLONG or KVD_ENOMEM and a one-line message; it never hangs (the step,
 *     output, depth and memory bounds hold);
 *   - a rendered output is NUL-terminated at its length, its data spans are ordered,
 *     disjoint, non-empty and inside the text, and it fits the output bound;
 *   - rendering twice gives the same bytes (no hidden state).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "kvd/kvd_template.h"

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "fuzz_template: ERROR: check failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                          \
        }                                                                                     \
    } while (0)

static const char default_vars[] =
    "{\"messages\": [{\"role\": \"system\", \"content\": \"sys\"}, {\"role\": \"user\", \"content\": \"hi <|im_end|>\"},"
    " {\"role\": \"assistant\", \"content\": null, \"tool_calls\": [{\"id\": \"c\", \"type\": \"function\","
    " \"function\": {\"name\": \"f\", \"arguments\": {\"a\": [1, 2.5, null]}}}]},"
    " {\"role\": \"tool\", \"content\": \"r\"}], \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}],"
    " \"add_generation_prompt\": true}";

static void check_message(const kvd_error *err)
{
    CHECK(err->msg[0] != '\0');
    CHECK(strchr(err->msg, '\n') == NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *src = (const char *)data;
    const uint8_t *nul = memchr(data, 0, size);
    size_t src_len = nul ? (size_t)(nul - data) : size;
    cJSON *vars = nul ? cJSON_ParseWithLength((const char *)nul + 1, size - src_len - 1) : cJSON_Parse(default_vars);
    kvd_error err = {0};
    kvd_template *t = kvd_template_parse(src, src_len, NULL, &err);
    if (!t) {
        CHECK(err.code == KVD_EINVAL || err.code == KVD_ENOMEM);
        check_message(&err);
        if (err.code == KVD_EINVAL)
            CHECK(strstr(err.msg, "chat template line ") != NULL);
        cJSON_Delete(vars);
        return 0;
    }
    kvd_template_limits lim = {.max_steps = 20000, .max_output = 1 << 16, .max_depth = 16, .max_memory = 32u << 20};
    kvd_template_output out, again;
    int rc = kvd_template_render(t, cJSON_IsObject(vars) ? vars : NULL, NULL, &lim, &out, &err);
    if (rc != 0) {
        CHECK(rc == KVD_EINVAL || rc == KVD_ETOOLONG || rc == KVD_ENOMEM);
        CHECK(err.code == rc);
        check_message(&err);
        CHECK(out.text == NULL && out.len == 0);
    } else {
        CHECK(out.text != NULL && out.text[out.len] == '\0' && out.len <= lim.max_output);
        size_t end = 0;
        for (size_t k = 0; k < out.num_data_spans; k++) {
            CHECK(out.data_spans[k].len > 0);
            CHECK(out.data_spans[k].offset >= end);
            CHECK(k == 0 || out.data_spans[k].offset > end); /* adjacent spans are merged */
            end = out.data_spans[k].offset + out.data_spans[k].len;
            CHECK(end <= out.len);
        }
        int rc2 = kvd_template_render(t, cJSON_IsObject(vars) ? vars : NULL, NULL, &lim, &again, &err);
        /* strftime_now can differ between two renders, so only compare without it */
        if (!memmem(src, src_len, "strftime_now", 12)) {
            CHECK(rc2 == 0 && again.len == out.len && memcmp(again.text, out.text, out.len) == 0);
        }
        kvd_template_output_free(&again);
        kvd_template_output_free(&out);
    }
    kvd_template_destroy(t);
    cJSON_Delete(vars);
    return 0;
}
