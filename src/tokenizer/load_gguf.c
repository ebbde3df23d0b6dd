/* load_gguf.c - the tokenizer of a GGUF file (tokenizer.ggml.*), built as tokenizer.json's.
 *
 * The GGUF keys say what a Qwen2 tokenizer.json says, in another shape: tokens[i] is id i's
 * spelling in the byte-level alphabet, token_type[i] says whether it is a vocabulary entry
 * (NORMAL), an added token (CONTROL, USER_DEFINED) or padding to the embedding's row count
 * (UNUSED, no id of the tokenizer), merges are "left right" strings in rank order, and
 * tokenizer.ggml.pre names the pre-tokenizer whose regex llama.cpp keeps in its code. They
 * are turned into the tree tokenizer.json parses to and loaded by the same code
 * (load.c), so both paths check and build the same tables.
 */
#include "tok_internal.h"

#include <cjson/cJSON.h>
#include <string.h>

#include "kvd/kvd_gguf.h"

/* Qwen2's Split pattern, as its tokenizer.json writes it (llama.cpp's "qwen2" pre). */
static const char qwen2_pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* Added tokens Qwen2's tokenizer_config.json declares "special": false. GGUF has no such
 * flag (llama.cpp's converter marks them CONTROL): matching and skip_special decoding of
 * these must stay as with tokenizer.json (tool calls are parsed from the decoded text). */
static const char *const qwen2_not_special[] = {
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
};

enum { TOKEN_NORMAL = 1, TOKEN_UNKNOWN = 2, TOKEN_CONTROL = 3, TOKEN_USER_DEFINED = 4,
       TOKEN_UNUSED = 5, TOKEN_BYTE = 6 };

static bool str_is(kvd_gguf_str s, const char *want)
{
    return s.len == strlen(want) && memcmp(s.ptr, want, s.len) == 0;
}

static bool qwen2_special(const char *content)
{
    for (size_t i = 0; i < sizeof qwen2_not_special / sizeof *qwen2_not_special; i++)
        if (strcmp(content, qwen2_not_special[i]) == 0)
            return false;
    return true;
}

/* A NUL-terminated copy for cJSON; GGUF strings may hold NUL bytes, tokens may not. */
static char *token_text(kvd_gguf_str s)
{
    if (memchr(s.ptr, '\0', s.len))
        return NULL;
    char *t = malloc(s.len + 1);
    if (t) {
        memcpy(t, s.ptr, s.len);
        t[s.len] = '\0';
    }
    return t;
}

static cJSON *pre_tokenizer_qwen2(void)
{
    cJSON *pre = cJSON_CreateObject(), *list = cJSON_AddArrayToObject(pre, "pretokenizers");
    cJSON_AddStringToObject(pre, "type", "Sequence");
    cJSON *split = cJSON_CreateObject(), *bl = cJSON_CreateObject();
    cJSON_AddStringToObject(split, "type", "Split");
    cJSON_AddStringToObject(cJSON_AddObjectToObject(split, "pattern"), "Regex", qwen2_pattern);
    cJSON_AddStringToObject(split, "behavior", "Isolated");
    cJSON_AddBoolToObject(split, "invert", false);
    cJSON_AddStringToObject(bl, "type", "ByteLevel");
    cJSON_AddBoolToObject(bl, "add_prefix_space", false);
    cJSON_AddBoolToObject(bl, "use_regex", false);
    cJSON_AddItemToArray(list, split);
    cJSON_AddItemToArray(list, bl);
    return pre;
}

/* Builds tokenizer.json's tree from g; NULL with err set. */
static cJSON *build_tree(const kvd_gguf *g, const char *path, kvd_error *err)
{
    kvd_gguf_str model, pre;
    const kvd_gguf_kv *tokens, *types, *merges;
    if (kvd_gguf_get_string(g, "tokenizer.ggml.model", &model, path, err) < 0 ||
        kvd_gguf_get_string(g, "tokenizer.ggml.pre", &pre, path, err) < 0 ||
        kvd_gguf_get_array(g, "tokenizer.ggml.tokens", KVD_GGUF_STRING, &tokens, path, err) < 0 ||
        kvd_gguf_get_array(g, "tokenizer.ggml.token_type", KVD_GGUF_INT32, &types, path, err) < 0 ||
        kvd_gguf_get_array(g, "tokenizer.ggml.merges", KVD_GGUF_STRING, &merges, path, err) < 0)
        return NULL;
    char shown[64];
    if (!str_is(model, "gpt2")) {
        kvd_error_set(err, KVD_EUNSUPPORTED,
                      "%s: tokenizer.ggml.model \"%s\" is not supported (only gpt2)", path,
                      kvd_gguf_printable(shown, sizeof shown, model.ptr, model.len));
        return NULL;
    }
    if (!str_is(pre, "qwen2")) {
        kvd_error_set(err, KVD_EUNSUPPORTED,
                      "%s: tokenizer.ggml.pre \"%s\" is not supported (only qwen2)", path,
                      kvd_gguf_printable(shown, sizeof shown, pre.ptr, pre.len));
        return NULL;
    }
    if (types->count != tokens->count || tokens->count > INT32_MAX) {
        kvd_error_set(err, KVD_EFORMAT,
                      "%s: tokenizer.ggml.token_type has %llu entries for %llu tokens", path,
                      (unsigned long long)types->count, (unsigned long long)tokens->count);
        return NULL;
    }
    cJSON *root = cJSON_CreateObject();
    cJSON *m = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(m, "type", "BPE");
    cJSON_AddBoolToObject(m, "ignore_merges", false);
    cJSON *vocab = cJSON_AddObjectToObject(m, "vocab");
    cJSON *merge_list = cJSON_AddArrayToObject(m, "merges");
    cJSON *added = cJSON_AddArrayToObject(root, "added_tokens");
    cJSON_AddStringToObject(cJSON_AddObjectToObject(root, "normalizer"), "type", "NFC");
    cJSON_AddItemToObject(root, "pre_tokenizer", pre_tokenizer_qwen2());
    cJSON_AddStringToObject(cJSON_AddObjectToObject(root, "decoder"), "type", "ByteLevel");
    if (!vocab || !merge_list || !added || !cJSON_GetObjectItem(root, "pre_tokenizer"))
        goto nomem;

    const uint8_t *cursor = tokens->data;
    for (uint64_t id = 0; id < tokens->count; id++) {
        kvd_gguf_str s = kvd_gguf_next_string(&cursor);
        int64_t type = kvd_gguf_array_int(types, id);
        if (type == TOKEN_UNUSED)
            continue;
        if (type != TOKEN_NORMAL && type != TOKEN_CONTROL && type != TOKEN_USER_DEFINED) {
            kvd_error_set(err, KVD_EUNSUPPORTED,
                          "%s: token %llu has token type %lld (kvd reads normal, control, "
                          "user-defined and unused tokens)",
                          path, (unsigned long long)id, (long long)type);
            goto fail;
        }
        char *text = token_text(s);
        if (!text) {
            if (!memchr(s.ptr, '\0', s.len))
                goto nomem;
            kvd_error_set(err, KVD_EFORMAT, "%s: token %llu holds a NUL byte", path,
                          (unsigned long long)id);
            goto fail;
        }
        cJSON *item;
        if (type == TOKEN_NORMAL) {
            item = cJSON_CreateNumber((double)id);
            if (item)
                cJSON_AddItemToObject(vocab, text, item);
        } else {
            item = cJSON_CreateObject();
            if (item) {
                cJSON_AddNumberToObject(item, "id", (double)id);
                cJSON_AddStringToObject(item, "content", text);
                cJSON_AddBoolToObject(item, "special",
                                      type == TOKEN_CONTROL && qwen2_special(text));
                cJSON_AddBoolToObject(item, "normalized", false);
                cJSON_AddItemToArray(added, item);
            }
        }
        free(text);
        if (!item)
            goto nomem;
    }
    cursor = merges->data;
    for (uint64_t i = 0; i < merges->count; i++) {
        kvd_gguf_str s = kvd_gguf_next_string(&cursor);
        char *text = token_text(s);
        if (!text) {
            if (!memchr(s.ptr, '\0', s.len))
                goto nomem;
            kvd_error_set(err, KVD_EFORMAT, "%s: merge %llu holds a NUL byte", path,
                          (unsigned long long)i);
            goto fail;
        }
        cJSON *item = cJSON_CreateString(text);
        free(text);
        if (!item)
            goto nomem;
        cJSON_AddItemToArray(merge_list, item);
    }
    return root;
nomem:
    kvd_error_set(err, KVD_ENOMEM, "%s: out of memory building the tokenizer", path);
fail:
    cJSON_Delete(root);
    return NULL;
}

kvd_tokenizer *tok_load_gguf(const char *path, kvd_error *err)
{
    kvd_gguf_file f;
    if (kvd_gguf_file_open(&f, path, err) < 0)
        return NULL;
    cJSON *root = build_tree(&f.gguf, path, err);
    kvd_gguf_file_close(&f);
    if (!root)
        return NULL;
    kvd_tokenizer *tok = tok_load_json_root(root, path, err);
    cJSON_Delete(root);
    return tok;
}
