/* fuzz_chat_template.c - libFuzzer target: chat rendering through the built-in template
 * (Qwen2.5-Instruct's) and the provenance-aware encoder.
 *
 * Each input is parsed as JSON; a {"messages": [...], ...} object gives its array and
 * its tools/tool_choice/add_generation_prompt/continue_final_message fields (validated
 * as the chat route validates them), anything else is rendered as messages itself (so
 * non-arrays reach the renderer's refusals too). The real tokenizer is loaded once
 * ($KVD_TOKENIZER_JSON, else third_party/qwen-tokenizer/tokenizer.json from the working
 * directory). Checked, beyond ASan/UBSan and leaks:
 *   - a refusal is KVD_EINVAL (or KVD_ENOMEM/KVD_ETOOLONG) with a one-line message and
 *     a param naming "messages...", "tools..." or another request field;
 *   - an accepted conversation starts with a system turn (the default one exactly
 *     when the first message is not a system message and no tools are given), ends
 *     with the generation prompt when one was asked for, and its data spans are
 *     ordered and inside the text;
 *   - encoding yields <|im_start|>/<|im_end|> ids exactly where those tokens sit in
 *     the template's own text (outside every data span), and never <|endoftext|>: text
 *     a user types can never forge a turn;
 *   - decoding the ids gives the rendered text back, byte for byte, whenever that text
 *     is valid UTF-8 that NFC leaves alone (the tokenizer normalizes to NFC).
 * The tokenizer and template pointers are the global state: libFuzzer's entry points
 * take no context.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <utf8proc.h>

#include "chat.h"
#include "kvd/kvd_tokenizer.h"

#define CHECK(cond)                                                                             \
    do {                                                                                        \
        if (!(cond)) {                                                                          \
            fprintf(stderr, "fuzz_chat_template: ERROR: check failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                            \
        }                                                                                       \
    } while (0)

#define GENERATION_PROMPT "<|im_start|>assistant\n"
#define DEFAULT_SYSTEM_TURN "<|im_start|>system\n" KVD_CHAT_DEFAULT_SYSTEM "<|im_end|>\n"

static kvd_tokenizer *fuzz_tok;
static kvd_chat_template *fuzz_template;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *path = getenv("KVD_TOKENIZER_JSON");
    if (!path)
        path = "third_party/qwen-tokenizer/tokenizer.json";
    kvd_error err = {0};
    fuzz_tok = kvd_tokenizer_load(path, &err);
    fuzz_template = fuzz_tok ? kvd_chat_template_builtin(&err) : NULL;
    if (!fuzz_tok || !fuzz_template) {
        fprintf(stderr, "fuzz_chat_template: %s\n", err.msg);
        exit(1);
    }
    return 0;
}

/* True when s is valid UTF-8 and NFC leaves it unchanged. */
static bool nfc_stable(const char *s, size_t len)
{
    utf8proc_uint8_t *out = NULL;
    utf8proc_ssize_t n = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)len, &out,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (n < 0)
        return false;
    bool same = (size_t)n == len && memcmp(out, s, len) == 0;
    free(out);
    return same;
}

static bool in_data(const kvd_chat_prompt *p, size_t from, size_t len)
{
    for (size_t k = 0; k < p->num_data_spans; k++) {
        size_t a = p->data_spans[k].offset, b = a + p->data_spans[k].len;
        if (from < b && from + len > a)
            return true;
    }
    return false;
}

/* <|im_start|>/<|im_end|> occurrences in template text, in order: 0 start, 1 end. */
static int template_markers(const kvd_chat_prompt *p, int *kinds, int cap)
{
    static const char *const marks[2] = {"<|im_start|>", "<|im_end|>"};
    int n = 0;
    for (size_t i = 0; i < p->text.len; i++)
        for (int m = 0; m < 2; m++) {
            size_t ml = strlen(marks[m]);
            if (i + ml <= p->text.len && memcmp(p->text.data + i, marks[m], ml) == 0 && !in_data(p, i, ml) && n < cap)
                kinds[n++] = m;
        }
    return n;
}

static void check_rendered(const cJSON *messages, const kvd_chat_options *opts, const kvd_chat_prompt *p)
{
    const char *text = p->text.data;
    size_t len = p->text.len;
    CHECK(text && text[len] == '\0' && !p->text.failed);
    if (opts->add_generation_prompt && !opts->continue_final_message) {
        size_t gen = strlen(GENERATION_PROMPT);
        CHECK(len >= gen && memcmp(text + len - gen, GENERATION_PROMPT, gen) == 0);
    }
    size_t prev_end = 0;
    for (size_t k = 0; k < p->num_data_spans; k++) {
        CHECK(p->data_spans[k].len > 0 && p->data_spans[k].offset >= prev_end);
        prev_end = p->data_spans[k].offset + p->data_spans[k].len;
        CHECK(prev_end <= len);
    }
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(messages, 0), "role");
    bool opens_with_system = cJSON_IsString(role) && strcmp(role->valuestring, "system") == 0;
    CHECK(strncmp(text, "<|im_start|>system\n", strlen("<|im_start|>system\n")) == 0);
    if (!opens_with_system && !opts->tools)
        CHECK(strncmp(text, DEFAULT_SYSTEM_TURN, strlen(DEFAULT_SYSTEM_TURN)) == 0);
}

static void check_encoded(const kvd_chat_prompt *p)
{
    int32_t im_start = kvd_tokenizer_token_id(fuzz_tok, "<|im_start|>");
    int32_t im_end = kvd_tokenizer_token_id(fuzz_tok, "<|im_end|>");
    int32_t eot = kvd_tokenizer_token_id(fuzz_tok, "<|endoftext|>");
    CHECK(im_start >= 0 && im_end >= 0 && eot >= 0);
    enum { MAX_MARKS = 4096 };
    static int kinds[MAX_MARKS];
    int num_marks = template_markers(p, kinds, MAX_MARKS);
    int32_t *ids = NULL;
    kvd_error err = {0};
    int n = kvd_chat_encode(p, fuzz_tok, &ids, &err);
    CHECK(n >= 0 && ids != NULL);
    int seen = 0;
    for (int i = 0; i < n; i++) {
        CHECK(ids[i] >= 0 && ids[i] < kvd_tokenizer_vocab_size(fuzz_tok));
        CHECK(ids[i] != eot);
        if (ids[i] == im_start || ids[i] == im_end) {
            CHECK(seen < num_marks);
            CHECK(ids[i] == (kinds[seen] == 0 ? im_start : im_end));
            seen++;
        }
    }
    if (num_marks < MAX_MARKS)
        CHECK(seen == num_marks);
    size_t back_len = 0;
    char *back = kvd_tokenizer_decode(fuzz_tok, ids, (size_t)n, false, &back_len, NULL);
    CHECK(back != NULL);
    if (nfc_stable(p->text.data, p->text.len))
        CHECK(back_len == p->text.len && memcmp(back, p->text.data, back_len) == 0);
    free(back);
    free(ids);
}

static void check_refusal(int rc, const kvd_error *err, const char *param, size_t cap)
{
    CHECK(memchr(param, '\0', cap) != NULL);
    CHECK(rc == KVD_EINVAL || rc == KVD_ENOMEM || rc == KVD_ETOOLONG);
    CHECK(err->code == rc && err->msg[0] != '\0' && strchr(err->msg, '\n') == NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cJSON *root = cJSON_ParseWithLength((const char *)data, size);
    if (!root)
        return 0;
    const cJSON *messages = root;
    bool body = cJSON_IsObject(root) && cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (body)
        messages = cJSON_GetObjectItemCaseSensitive(root, "messages");
    char param[96];
    memset(param, 'x', sizeof param);
    kvd_error err = {0};
    kvd_chat_tools tools = {0};
    kvd_chat_options opts = {.add_generation_prompt = true};
    int rc = 0;
    if (body) {
        rc = kvd_chat_parse_tools(root, &tools, param, sizeof param, &err);
        if (rc == 0)
            rc = kvd_chat_parse_options(root, &tools, &opts, param, sizeof param, &err);
        if (rc != 0) {
            check_refusal(rc, &err, param, sizeof param);
            cJSON_Delete(root);
            return 0;
        }
    }
    kvd_chat_prompt p;
    kvd_chat_prompt_init(&p);
    rc = kvd_chat_render(fuzz_template, messages, &opts, &p, param, sizeof param, &err);
    if (rc != 0) {
        check_refusal(rc, &err, param, sizeof param);
        if (rc == KVD_EINVAL)
            CHECK(strncmp(param, "messages", 8) == 0);
    } else {
        check_rendered(messages, &opts, &p);
        check_encoded(&p);
    }
    kvd_chat_prompt_deinit(&p);
    cJSON_Delete(root);
    return 0;
}
