/* load.c - reads a Hugging Face tokenizer.json into the tables encode and decode use.
 *
 * Loading is where the format is checked: every option this tokenizer does not implement
 * (another model type, byte fallback, dropout, a normalizer other than NFC, a
 * pre-tokenizer other than Split + ByteLevel, a prefix space) is refused with
 * KVD_EUNSUPPORTED naming the key, rather than encoding silently differently. The
 * post-processor, truncation and padding are ignored: encode never adds tokens.
 *
 * Vocabulary entries are spelled in GPT-2's byte-level alphabet; they are converted to
 * the bytes they stand for here, once, and merges become (left id, right id) -> merged id.
 */
#include "tok_internal.h"

#include "kvd/kvd_buf.h"
#include "kvd/kvd_gguf.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* GPT-2's pre-tokenizer, what ByteLevel with use_regex applies. */
static const char gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

typedef struct loader {
    kvd_tokenizer *tok;
    const char *path;
    kvd_error *err;
    int16_t unicode_to_byte[TOK_BYTE_LEVEL_CODEPOINTS];
    /* Staging before the id-ordered table exists: id's bytes are blob[start[id]..+len[id]). */
    unsigned char *blob;
    size_t blob_len;
    uint32_t *start, *len; /* (num_ids) */
} loader;

static bool json_flag(const cJSON *obj, const char *key, bool fallback)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : fallback;
}

/* True when key is absent, null, false or "" (an option left at its neutral value). */
static bool json_unset(const cJSON *obj, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return !v || cJSON_IsNull(v) || cJSON_IsFalse(v) ||
           (cJSON_IsString(v) && v->valuestring[0] == '\0');
}

static bool json_type_is(const cJSON *obj, const char *type)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, "type");
    return cJSON_IsString(v) && strcmp(v->valuestring, type) == 0;
}

static const char *json_type(const cJSON *obj)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, "type");
    return cJSON_IsString(v) ? v->valuestring : "(none)";
}

/* A JSON number that is an id: an integer in [0, INT32_MAX). */
static bool json_id(const cJSON *v, int32_t *id)
{
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble >= (double)INT32_MAX ||
        v->valuedouble != (double)(int64_t)v->valuedouble)
        return false;
    *id = (int32_t)v->valuedouble;
    return true;
}

/* Converts a byte-level spelling (UTF-8 of alphabet code points) to its bytes in out
 * (room for strlen(s) bytes). Returns the byte count, or -1 for a foreign character. */
static long byte_level_to_bytes(const loader *ld, const char *s, unsigned char *out)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t avail = strlen(s), n = 0;
    while (avail > 0) {
        uint32_t cp;
        size_t step = tok_utf8_decode(p, avail, &cp);
        if (step == 0 || cp >= TOK_BYTE_LEVEL_CODEPOINTS || ld->unicode_to_byte[cp] < 0)
            return -1;
        out[n++] = (unsigned char)ld->unicode_to_byte[cp];
        p += step;
        avail -= step;
    }
    return (long)n;
}

static int check_model(loader *ld, const cJSON *model)
{
    if (!cJSON_IsObject(model))
        return kvd_error_set(ld->err, KVD_EFORMAT, "%s: no \"model\" object", ld->path);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(model, "type");
    if (type && !json_type_is(model, "BPE"))
        return kvd_error_set(ld->err, KVD_EUNSUPPORTED, "%s: model.type \"%s\" is not BPE",
                             ld->path, json_type(model));
    static const char *const neutral[] = {"dropout", "byte_fallback", "continuing_subword_prefix",
                                          "end_of_word_suffix"};
    for (size_t i = 0; i < sizeof neutral / sizeof *neutral; i++) {
        if (!json_unset(model, neutral[i]))
            return kvd_error_set(ld->err, KVD_EUNSUPPORTED, "%s: model.%s is set (unsupported)",
                                 ld->path, neutral[i]);
    }
    ld->tok->ignore_merges = json_flag(model, "ignore_merges", false);
    return KVD_OK;
}

/* First pass: the largest id and the staging space every spelling needs. */
static int measure(loader *ld, const cJSON *vocab, const cJSON *added, int32_t *max_id,
                   size_t *blob_cap)
{
    *max_id = -1;
    *blob_cap = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, vocab) {
        int32_t id;
        if (!json_id(item, &id))
            return kvd_error_set(ld->err, KVD_EFORMAT, "%s: model.vocab[\"%s\"] is not a valid id",
                                 ld->path, item->string);
        *max_id = id > *max_id ? id : *max_id;
        *blob_cap += strlen(item->string);
    }
    size_t index = 0;
    cJSON_ArrayForEach(item, added) {
        int32_t id;
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(item, "content");
        if (!json_id(cJSON_GetObjectItemCaseSensitive(item, "id"), &id) || !cJSON_IsString(content))
            return kvd_error_set(ld->err, KVD_EFORMAT,
                                 "%s: added_tokens[%zu] lacks an integer id or a string content",
                                 ld->path, index);
        *max_id = id > *max_id ? id : *max_id;
        *blob_cap += strlen(content->valuestring);
        index++;
    }
    if (*max_id < 0)
        return kvd_error_set(ld->err, KVD_EFORMAT, "%s: model.vocab is empty", ld->path);
    if (*max_id >= INT32_MAX - 1)
        return kvd_error_set(ld->err, KVD_EFORMAT, "%s: id %d is too large", ld->path, *max_id);
    return KVD_OK;
}

static int stage_vocab(loader *ld, const cJSON *vocab)
{
    kvd_tokenizer *tok = ld->tok;
    const cJSON *item;
    cJSON_ArrayForEach(item, vocab) {
        int32_t id = 0;
        json_id(item, &id); /* validated by measure() */
        if (tok->id_flags[id] & TOK_ID_BPE)
            return kvd_error_set(ld->err, KVD_EFORMAT, "%s: model.vocab gives id %d twice",
                                 ld->path, id);
        long n = byte_level_to_bytes(ld, item->string, ld->blob + ld->blob_len);
        if (n < 0)
            return kvd_error_set(ld->err, KVD_EFORMAT,
                                 "%s: model.vocab entry \"%s\" is not in the byte-level alphabet",
                                 ld->path, item->string);
        ld->start[id] = (uint32_t)ld->blob_len;
        ld->len[id] = (uint32_t)n;
        ld->blob_len += (size_t)n;
        tok->id_flags[id] |= TOK_ID_PRESENT | TOK_ID_BPE;
    }
    return KVD_OK;
}

static int stage_added(loader *ld, const cJSON *added)
{
    kvd_tokenizer *tok = ld->tok;
    size_t count = (size_t)cJSON_GetArraySize(added);
    tok->added = calloc(count ? count : 1, sizeof *tok->added);
    tok->added_order = calloc(count ? count : 1, sizeof *tok->added_order);
    if (!tok->added || !tok->added_order)
        return kvd_error_set(ld->err, KVD_ENOMEM, "%s: out of memory for added tokens", ld->path);
    const cJSON *item;
    cJSON_ArrayForEach(item, added) {
        int32_t id = 0;
        json_id(cJSON_GetObjectItemCaseSensitive(item, "id"), &id); /* validated by measure() */
        const char *content = cJSON_GetObjectItemCaseSensitive(item, "content")->valuestring;
        size_t len = strlen(content);
        if (len == 0)
            continue; /* Hugging Face ignores empty added tokens too */
        tok_added *a = &tok->added[tok->num_added];
        a->id = id;
        a->special = json_flag(item, "special", false);
        a->lstrip = json_flag(item, "lstrip", false);
        a->rstrip = json_flag(item, "rstrip", false);
        a->single_word = json_flag(item, "single_word", false);
        a->normalized = json_flag(item, "normalized", !a->special);
        /* The id decodes to the content as written; a normalized token matches its NFC. */
        memcpy(ld->blob + ld->blob_len, content, len);
        ld->start[id] = (uint32_t)ld->blob_len;
        ld->len[id] = (uint32_t)len;
        ld->blob_len += len;
        const unsigned char *match = (const unsigned char *)content;
        size_t match_len = len;
        unsigned char *nfc = NULL;
        if (a->normalized && tok->nfc) {
            int rc = tok_nfc(match, len, &nfc, &match_len);
            if (rc < 0)
                return kvd_error_set(ld->err, KVD_ENOMEM, "%s: out of memory", ld->path);
            if (rc == 0)
                nfc = NULL;
            else
                match = nfc;
        }
        a->content = malloc(match_len);
        if (!a->content) {
            free(nfc);
            return kvd_error_set(ld->err, KVD_ENOMEM, "%s: out of memory", ld->path);
        }
        memcpy(a->content, match, match_len);
        a->len = match_len;
        free(nfc);
        tok->id_flags[id] |= TOK_ID_PRESENT | TOK_ID_ADDED | (a->special ? TOK_ID_SPECIAL : 0);
        tok->any_normalized_added |= a->normalized;
        tok->num_added++;
    }
    return KVD_OK;
}

/* Lays the staged spellings out in id order: the table decode reads. */
static int build_id_table(loader *ld)
{
    kvd_tokenizer *tok = ld->tok;
    tok->token_offset = malloc(((size_t)tok->num_ids + 1) * sizeof *tok->token_offset);
    tok->token_bytes = malloc(ld->blob_len ? ld->blob_len : 1);
    if (!tok->token_offset || !tok->token_bytes)
        return kvd_error_set(ld->err, KVD_ENOMEM, "%s: out of memory for the id table", ld->path);
    uint32_t off = 0;
    for (int32_t id = 0; id < tok->num_ids; id++) {
        tok->token_offset[id] = off;
        if (tok->id_flags[id] & TOK_ID_PRESENT) {
            memcpy(tok->token_bytes + off, ld->blob + ld->start[id], ld->len[id]);
            off += ld->len[id];
            tok->max_token_len = ld->len[id] > tok->max_token_len ? ld->len[id] : tok->max_token_len;
        }
    }
    tok->token_offset[tok->num_ids] = off;
    return KVD_OK;
}

static int load_merges(loader *ld, const cJSON *merges)
{
    kvd_tokenizer *tok = ld->tok;
    if (!cJSON_IsArray(merges))
        return kvd_error_set(ld->err, KVD_EFORMAT, "%s: model.merges is not an array", ld->path);
    size_t count = (size_t)cJSON_GetArraySize(merges);
    if (count >= UINT32_MAX || tok_merge_map_init(&tok->merges, count) < 0)
        return kvd_error_set(ld->err, KVD_ENOMEM, "%s: out of memory for %zu merges", ld->path, count);
    unsigned char *buf = NULL;
    size_t buf_cap = 0;
    int rc = KVD_OK;
    uint32_t rank = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, merges) {
        /* Two spellings: ["a", "b"] (tokenizers >= 0.20) or "a b" (a byte-level token
         * never contains a space, so one space separates the halves). */
        const char *left_s, *right_s;
        char *joined = NULL;
        if (cJSON_IsArray(item) && cJSON_GetArraySize(item) == 2 &&
            cJSON_IsString(cJSON_GetArrayItem(item, 0)) && cJSON_IsString(cJSON_GetArrayItem(item, 1))) {
            left_s = cJSON_GetArrayItem(item, 0)->valuestring;
            right_s = cJSON_GetArrayItem(item, 1)->valuestring;
        } else if (cJSON_IsString(item) && strchr(item->valuestring, ' ') &&
                   !strchr(strchr(item->valuestring, ' ') + 1, ' ')) {
            joined = strdup(item->valuestring);
            if (!joined) {
                rc = kvd_error_set(ld->err, KVD_ENOMEM, "%s: out of memory", ld->path);
                break;
            }
            char *space = strchr(joined, ' ');
            *space = '\0';
            left_s = joined;
            right_s = space + 1;
        } else {
            rc = kvd_error_set(ld->err, KVD_EFORMAT, "%s: model.merges[%u] is not a pair", ld->path, rank);
            break;
        }
        size_t need = strlen(left_s) + strlen(right_s);
        if (need > buf_cap) {
            unsigned char *grown = realloc(buf, need * 2);
            if (!grown) {
                free(joined);
                rc = kvd_error_set(ld->err, KVD_ENOMEM, "%s: out of memory", ld->path);
                break;
            }
            buf = grown;
            buf_cap = need * 2;
        }
        long left_len = byte_level_to_bytes(ld, left_s, buf);
        long right_len = left_len < 0 ? -1 : byte_level_to_bytes(ld, right_s, buf + left_len);
        int32_t left = -1, right = -1, merged = -1;
        if (left_len > 0 && right_len > 0) {
            left = tok_vocab_lookup(tok, buf, (size_t)left_len);
            right = tok_vocab_lookup(tok, buf + left_len, (size_t)right_len);
            merged = tok_vocab_lookup(tok, buf, (size_t)(left_len + right_len));
        }
        if (left < 0 || right < 0 || merged < 0) {
            rc = kvd_error_set(ld->err, KVD_EFORMAT,
                               "%s: model.merges[%u] (\"%s\" + \"%s\") is not in model.vocab",
                               ld->path, rank, left_s, right_s);
            free(joined);
            break;
        }
        free(joined);
        tok_merge_map_put(&tok->merges, left, right, rank, merged);
        rank++;
    }
    free(buf);
    return rc;
}

static int load_normalizer(loader *ld, const cJSON *norm)
{
    if (!norm || cJSON_IsNull(norm))
        return KVD_OK;
    if (json_type_is(norm, "NFC")) {
        ld->tok->nfc = true;
        return KVD_OK;
    }
    if (json_type_is(norm, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(norm, "normalizers"), *item;
        cJSON_ArrayForEach(item, list) {
            if (!json_type_is(item, "NFC"))
                return kvd_error_set(ld->err, KVD_EUNSUPPORTED,
                                     "%s: normalizer \"%s\" is not supported (only NFC)",
                                     ld->path, json_type(item));
            ld->tok->nfc = true;
        }
        return KVD_OK;
    }
    return kvd_error_set(ld->err, KVD_EUNSUPPORTED, "%s: normalizer \"%s\" is not supported (only NFC)",
                         ld->path, json_type(norm));
}

static int compile_split(loader *ld, const char *pattern, size_t len, uint32_t options)
{
    int code;
    PCRE2_SIZE offset;
    ld->tok->split_re = pcre2_compile((PCRE2_SPTR)pattern, len, options | PCRE2_UTF | PCRE2_UCP,
                                      &code, &offset, NULL);
    if (!ld->tok->split_re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        return kvd_error_set(ld->err, KVD_EFORMAT, "%s: pre_tokenizer pattern: %s at offset %zu",
                             ld->path, (const char *)msg, (size_t)offset);
    }
    /* Without JIT (an unsupported CPU) matching still works, only slower. */
    pcre2_jit_compile(ld->tok->split_re, PCRE2_JIT_COMPLETE);
    return KVD_OK;
}

static int load_byte_level(loader *ld, const cJSON *bl, bool *use_regex)
{
    if (json_flag(bl, "add_prefix_space", false))
        return kvd_error_set(ld->err, KVD_EUNSUPPORTED,
                             "%s: ByteLevel add_prefix_space is not supported", ld->path);
    *use_regex = json_flag(bl, "use_regex", true);
    return KVD_OK;
}

static int load_split(loader *ld, const cJSON *split)
{
    const cJSON *behavior = cJSON_GetObjectItemCaseSensitive(split, "behavior");
    if (!cJSON_IsString(behavior) || strcmp(behavior->valuestring, "Isolated") != 0 ||
        json_flag(split, "invert", false))
        return kvd_error_set(ld->err, KVD_EUNSUPPORTED,
                             "%s: pre_tokenizer Split must be behavior Isolated, invert false",
                             ld->path);
    const cJSON *pattern = cJSON_GetObjectItemCaseSensitive(split, "pattern");
    const cJSON *regex = cJSON_GetObjectItemCaseSensitive(pattern, "Regex");
    const cJSON *literal = cJSON_GetObjectItemCaseSensitive(pattern, "String");
    if (cJSON_IsString(regex))
        return compile_split(ld, regex->valuestring, strlen(regex->valuestring), 0);
    if (cJSON_IsString(literal) && literal->valuestring[0])
        return compile_split(ld, literal->valuestring, strlen(literal->valuestring), PCRE2_LITERAL);
    return kvd_error_set(ld->err, KVD_EFORMAT, "%s: pre_tokenizer Split has no pattern", ld->path);
}

/* Accepted shapes: ByteLevel alone, or Sequence [Split, ByteLevel(use_regex false)]. */
static int load_pre_tokenizer(loader *ld, const cJSON *pre)
{
    bool use_regex = false;
    int rc;
    if (json_type_is(pre, "ByteLevel")) {
        if ((rc = load_byte_level(ld, pre, &use_regex)) < 0)
            return rc;
        return use_regex ? compile_split(ld, gpt2_pattern, sizeof gpt2_pattern - 1, 0) : KVD_OK;
    }
    if (json_type_is(pre, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(pre, "pretokenizers");
        int n = cJSON_GetArraySize(list);
        const cJSON *split = n == 2 ? cJSON_GetArrayItem(list, 0) : NULL;
        const cJSON *bl = n == 2 ? cJSON_GetArrayItem(list, 1) : NULL;
        if (split && json_type_is(split, "Split") && json_type_is(bl, "ByteLevel")) {
            if ((rc = load_byte_level(ld, bl, &use_regex)) < 0)
                return rc;
            if (use_regex)
                return kvd_error_set(ld->err, KVD_EUNSUPPORTED,
                                     "%s: pre_tokenizer Split followed by ByteLevel use_regex",
                                     ld->path);
            return load_split(ld, split);
        }
    }
    return kvd_error_set(ld->err, KVD_EUNSUPPORTED,
                         "%s: pre_tokenizer \"%s\" is not supported (ByteLevel, or Sequence of "
                         "Split and ByteLevel)", ld->path, json_type(pre));
}

/* Groups added tokens by first byte, longest first, for leftmost-longest matching. */
static void index_added(kvd_tokenizer *tok)
{
    uint32_t count[256] = {0};
    for (size_t i = 0; i < tok->num_added; i++)
        count[tok->added[i].content[0]]++;
    tok->added_first[0] = 0;
    for (int b = 0; b < 256; b++)
        tok->added_first[b + 1] = tok->added_first[b] + count[b];
    uint32_t fill[256];
    memcpy(fill, tok->added_first, sizeof fill);
    for (size_t i = 0; i < tok->num_added; i++) {
        unsigned char b = tok->added[i].content[0];
        uint32_t at = fill[b]++;
        /* Insertion sort within the bucket: longer first, then file order. */
        while (at > tok->added_first[b] && tok->added[tok->added_order[at - 1]].len < tok->added[i].len) {
            tok->added_order[at] = tok->added_order[at - 1];
            at--;
        }
        tok->added_order[at] = (uint32_t)i;
    }
}

static int load_root(loader *ld, const cJSON *root)
{
    kvd_tokenizer *tok = ld->tok;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    int rc = check_model(ld, model);
    if (rc < 0)
        return rc;
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    if (!cJSON_IsObject(vocab))
        return kvd_error_set(ld->err, KVD_EFORMAT, "%s: model.vocab is not an object", ld->path);
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (added && !cJSON_IsArray(added) && !cJSON_IsNull(added))
        return kvd_error_set(ld->err, KVD_EFORMAT, "%s: added_tokens is not an array", ld->path);
    if ((rc = load_normalizer(ld, cJSON_GetObjectItemCaseSensitive(root, "normalizer"))) < 0)
        return rc;
    const cJSON *decoder = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (decoder && !cJSON_IsNull(decoder) && !json_type_is(decoder, "ByteLevel"))
        return kvd_error_set(ld->err, KVD_EUNSUPPORTED, "%s: decoder \"%s\" is not ByteLevel",
                             ld->path, json_type(decoder));
    const cJSON *pre = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    if ((rc = load_pre_tokenizer(ld, pre)) < 0)
        return rc;

    int32_t max_id;
    size_t blob_cap;
    if ((rc = measure(ld, vocab, added, &max_id, &blob_cap)) < 0)
        return rc;
    if (blob_cap >= UINT32_MAX)
        return kvd_error_set(ld->err, KVD_EFORMAT, "%s: vocabulary too large", ld->path);
    tok->num_ids = max_id + 1;
    tok->id_flags = calloc((size_t)tok->num_ids, 1);
    ld->start = calloc((size_t)tok->num_ids, sizeof *ld->start);
    ld->len = calloc((size_t)tok->num_ids, sizeof *ld->len);
    ld->blob = malloc(blob_cap ? blob_cap : 1);
    if (!tok->id_flags || !ld->start || !ld->len || !ld->blob)
        return kvd_error_set(ld->err, KVD_ENOMEM, "%s: out of memory for %d ids", ld->path, tok->num_ids);
    if ((rc = stage_vocab(ld, vocab)) < 0 || (rc = stage_added(ld, added)) < 0 ||
        (rc = build_id_table(ld)) < 0 || (rc = tok_vocab_map_build(tok, ld->err)) < 0)
        return rc;
    for (int b = 0; b < 256; b++) {
        unsigned char byte = (unsigned char)b;
        tok->byte_id[b] = tok_vocab_lookup(tok, &byte, 1);
        if (tok->byte_id[b] < 0)
            return kvd_error_set(ld->err, KVD_EFORMAT, "%s: model.vocab has no token for byte 0x%02X",
                                 ld->path, b);
    }
    if ((rc = load_merges(ld, cJSON_GetObjectItemCaseSensitive(model, "merges"))) < 0)
        return rc;
    index_added(tok);
    tok->cache = tok_cache_create();
    if (!tok->cache)
        return kvd_error_set(ld->err, KVD_ENOMEM, "%s: out of memory for the word cache", ld->path);
    return KVD_OK;
}

kvd_tokenizer *tok_load_json_root(const cJSON *root, const char *path, kvd_error *err)
{
    loader ld = {.path = path, .err = err};
    tok_byte_level_inverse(ld.unicode_to_byte);
    ld.tok = calloc(1, sizeof *ld.tok);
    int rc = ld.tok ? load_root(&ld, root) : kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", path);
    free(ld.blob);
    free(ld.start);
    free(ld.len);
    if (rc < 0) {
        kvd_tokenizer_destroy(ld.tok);
        return NULL;
    }
    return ld.tok;
}

kvd_tokenizer *kvd_tokenizer_load(const char *path, kvd_error *err)
{
    if (!path) {
        kvd_error_set(err, KVD_EINVAL, "tokenizer: no path given");
        return NULL;
    }
    if (kvd_gguf_is_gguf_file(path))
        return tok_load_gguf(path, err);
    kvd_sbuf text;
    kvd_sbuf_init(&text);
    if (kvd_sbuf_read_file(&text, path, err) < 0)
        return NULL;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text.data, text.len, &end, false);
    if (!root) {
        kvd_error_set(err, KVD_EFORMAT, "%s: invalid JSON near byte %zu", path,
                      end ? (size_t)(end - text.data) : (size_t)0);
        kvd_sbuf_deinit(&text);
        return NULL;
    }
    kvd_sbuf_deinit(&text);
    kvd_tokenizer *tok = tok_load_json_root(root, path, err);
    cJSON_Delete(root);
    return tok;
}

kvd_tokenizer *kvd_tokenizer_load_model(const char *model, kvd_error *err)
{
    if (!model) {
        kvd_error_set(err, KVD_EINVAL, "tokenizer: no model path given");
        return NULL;
    }
    char path[PATH_MAX];
    int rc = kvd_gguf_resolve(model, path, sizeof path, err);
    if (rc < 0)
        return NULL;
    if (rc == 0 && (size_t)snprintf(path, sizeof path, "%s/tokenizer.json", model) >= sizeof path) {
        kvd_error_set(err, KVD_EINVAL, "%s: path too long", model);
        return NULL;
    }
    return rc == 1 ? tok_load_gguf(path, err) : kvd_tokenizer_load(path, err);
}

void kvd_tokenizer_destroy(kvd_tokenizer *tok)
{
    if (!tok)
        return;
    for (size_t i = 0; i < tok->num_added; i++)
        free(tok->added[i].content);
    free(tok->added);
    free(tok->added_order);
    free(tok->token_offset);
    free(tok->token_bytes);
    free(tok->id_flags);
    free(tok->vocab.slots);
    free(tok->merges.slots);
    pcre2_code_free(tok->split_re);
    tok_cache_destroy(tok->cache);
    free(tok);
}
