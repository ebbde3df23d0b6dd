/* fuzz_chat_template.c - libFuzzer target: the ChatML renderer and its encoder.
 *
 * Each input is parsed as JSON; a {"messages": [...]} object gives its array, anything
 * else is rendered as it is (so non-arrays reach the renderer's refusals too). The real
 * tokenizer is loaded once ($KVD_TOKENIZER_JSON, else
 * third_party/qwen-tokenizer/tokenizer.json from the working directory). Checked,
 * beyond ASan/UBSan and leaks:
 *   - a refusal is KVD_EINVAL with a one-line message and a param naming "messages...";
 *   - an accepted conversation renders as ChatML: markers alternate open/close at the
 *     offsets the renderer recorded, the default system turn comes first exactly when
 *     the first message is not a system one, and the text ends with the generation
 *     prompt;
 *   - encoding yields exactly one special id per recorded marker, in the same order,
 *     and no other <|im_start|>/<|im_end|>/<|endoftext|> id: text a user types can
 *     never forge a turn;
 *   - decoding the ids gives the rendered text back, byte for byte, whenever that text
 *     is valid UTF-8 that NFC leaves alone (the tokenizer normalizes to NFC).
 * The tokenizer pointer is the one piece of global state: libFuzzer's entry points
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

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *path = getenv("KVD_TOKENIZER_JSON");
    if (!path)
        path = "third_party/qwen-tokenizer/tokenizer.json";
    kvd_error err = {0};
    fuzz_tok = kvd_tokenizer_load(path, &err);
    if (!fuzz_tok) {
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

static void check_rendered(const cJSON *messages, const kvd_chat_prompt *p)
{
    const char *text = p->text.data;
    size_t len = p->text.len;
    size_t gen = strlen(GENERATION_PROMPT);
    CHECK(text && len >= gen && text[len] == '\0' && !p->text.failed);
    CHECK(memcmp(text + len - gen, GENERATION_PROMPT, gen) == 0);
    CHECK(p->num_specials >= 3 && p->num_specials % 2 == 1);
    size_t prev_end = 0;
    for (int i = 0; i < p->num_specials; i++) {
        const kvd_chat_special *s = &p->specials[i];
        CHECK(s->marker == (i % 2 == 0 ? KVD_CHAT_IM_START : KVD_CHAT_IM_END));
        const char *marker = s->marker == KVD_CHAT_IM_START ? "<|im_start|>" : "<|im_end|>";
        size_t mlen = strlen(marker);
        CHECK(s->offset >= prev_end && s->offset + mlen <= len);
        CHECK(memcmp(text + s->offset, marker, mlen) == 0);
        prev_end = s->offset + mlen;
    }
    CHECK(p->specials[p->num_specials - 1].offset == len - gen);
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(messages, 0), "role");
    bool opens_with_system = cJSON_IsString(role) && strcmp(role->valuestring, "system") == 0;
    bool default_first = strncmp(text, DEFAULT_SYSTEM_TURN, strlen(DEFAULT_SYSTEM_TURN)) == 0;
    if (!opens_with_system)
        CHECK(default_first);
    else
        CHECK(strncmp(text, "<|im_start|>system\n", strlen("<|im_start|>system\n")) == 0);
}

static void check_encoded(const kvd_chat_prompt *p)
{
    int32_t im_start = kvd_tokenizer_token_id(fuzz_tok, "<|im_start|>");
    int32_t im_end = kvd_tokenizer_token_id(fuzz_tok, "<|im_end|>");
    int32_t eot = kvd_tokenizer_token_id(fuzz_tok, "<|endoftext|>");
    CHECK(im_start >= 0 && im_end >= 0 && eot >= 0);
    int32_t *ids = NULL;
    kvd_error err = {0};
    int n = kvd_chat_encode(p, fuzz_tok, &ids, &err);
    CHECK(n >= p->num_specials && ids != NULL);
    int seen = 0;
    for (int i = 0; i < n; i++) {
        CHECK(ids[i] >= 0 && ids[i] < kvd_tokenizer_vocab_size(fuzz_tok));
        CHECK(ids[i] != eot);
        if (ids[i] == im_start || ids[i] == im_end) {
            CHECK(seen < p->num_specials);
            int32_t want = p->specials[seen].marker == KVD_CHAT_IM_START ? im_start : im_end;
            CHECK(ids[i] == want);
            seen++;
        }
    }
    CHECK(seen == p->num_specials);
    CHECK(ids[n - 1] != im_start); /* "assistant\n" follows the last marker */
    size_t back_len = 0;
    char *back = kvd_tokenizer_decode(fuzz_tok, ids, (size_t)n, false, &back_len, NULL);
    CHECK(back != NULL);
    if (nfc_stable(p->text.data, p->text.len))
        CHECK(back_len == p->text.len && memcmp(back, p->text.data, back_len) == 0);
    free(back);
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cJSON *root = cJSON_ParseWithLength((const char *)data, size);
    if (!root)
        return 0;
    const cJSON *messages = root;
    if (cJSON_IsObject(root) && cJSON_GetObjectItemCaseSensitive(root, "messages"))
        messages = cJSON_GetObjectItemCaseSensitive(root, "messages");
    kvd_chat_prompt p;
    kvd_chat_prompt_init(&p);
    char param[96];
    memset(param, 'x', sizeof param);
    kvd_error err = {0};
    int rc = kvd_chat_render(messages, &p, param, sizeof param, &err);
    if (rc != 0) {
        /* param is written only on failure */
        CHECK(memchr(param, '\0', sizeof param) != NULL);
        CHECK(rc == KVD_EINVAL || rc == KVD_ENOMEM);
        CHECK(err.code == rc && err.msg[0] != '\0' && strchr(err.msg, '\n') == NULL);
        if (rc == KVD_EINVAL)
            CHECK(strncmp(param, "messages", 8) == 0);
    } else {
        check_rendered(messages, &p);
        check_encoded(&p);
    }
    kvd_chat_prompt_deinit(&p);
    cJSON_Delete(root);
    return 0;
}
