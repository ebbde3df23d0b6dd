/* oai_response.c - OpenAI response bytes from engine events.
 *
 * Small pieces (one token's logprob entry, one chunk) are built with cJSON and printed
 * (for whole responses on the worker that assembles the body: cJSON's number printing
 * of 21 entries per token was the loop's largest cost); the whole body is assembled
 * as text from those pieces, so its bytes are
 * exactly what printing one cJSON tree of it would give, without ever holding that
 * tree (for n=16 x 4000 tokens x 20 alternatives the tree was ~10x the body).
 */
#include "oai_response.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"
#include "kvd/kvd_error.h"
#include "util.h"

/* ---- JSON text helpers ---- */

static int append_escaped(kvd_sbuf *out, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    if (kvd_sbuf_reserve(out, len + 2) != 0)
        return KVD_ENOMEM;
    kvd_sbuf_append(out, "\"", 1);
    size_t run = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        kvd_sbuf_append(out, s + run, i - run);
        run = i + 1;
        char esc[6] = {'\\', 0};
        size_t n = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            memcpy(esc + 1, "u00", 3);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            n = 6;
        }
        kvd_sbuf_append(out, esc, n);
    }
    kvd_sbuf_append(out, s + run, len - run);
    kvd_sbuf_append(out, "\"", 1);
    return out->failed ? KVD_ENOMEM : 0;
}

int kvd_json_append_string(kvd_sbuf *out, const char *s, size_t len)
{
    if (kvd_utf8_is_clean(s, len))
        return append_escaped(out, s, len);
    kvd_sbuf clean = {0};
    kvd_utf8_append_sanitized(&clean, s, len);
    int rc = clean.failed ? KVD_ENOMEM : append_escaped(out, clean.data ? clean.data : "", clean.len);
    kvd_sbuf_deinit(&clean);
    return rc;
}

cJSON *kvd_json_sanitized_string(const char *s, size_t len)
{
    if (kvd_utf8_is_clean(s, len) && s[len] == '\0')
        return cJSON_CreateString(s);
    kvd_sbuf sb = {0};
    kvd_utf8_append_sanitized(&sb, s, len);
    cJSON *str = sb.failed ? NULL : cJSON_CreateString(sb.data ? sb.data : "");
    kvd_sbuf_deinit(&sb);
    return str;
}

static void add_sanitized(cJSON *obj, const char *name, const char *s, size_t len)
{
    cJSON *str = kvd_json_sanitized_string(s, len);
    if (str)
        cJSON_AddItemToObject(obj, name, str);
}

/* Prints item (then deletes it) after a comma when out already holds items. */
static int append_item(kvd_sbuf *out, cJSON *item)
{
    char *text = item ? cJSON_PrintUnformatted(item) : NULL;
    cJSON_Delete(item);
    if (!text)
        return KVD_ENOMEM;
    if (out->len)
        kvd_sbuf_append(out, ",", 1);
    kvd_sbuf_puts(out, text);
    free(text);
    return out->failed ? KVD_ENOMEM : 0;
}

/* ---- errors ---- */

const char *kvd_oai_error_type(int status)
{
    return kvd_http_error_type(status); /* one table, shared with the HTTP layer's own errors */
}

cJSON *kvd_oai_error_object(int status, const char *message, const char *param, const char *code)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *error = cJSON_AddObjectToObject(root, "error");
    if (!error) {
        cJSON_Delete(root);
        return NULL;
    }
    add_sanitized(error, "message", message, strlen(message));
    cJSON_AddStringToObject(error, "type", kvd_oai_error_type(status));
    if (param && param[0])
        cJSON_AddStringToObject(error, "param", param);
    else
        cJSON_AddNullToObject(error, "param");
    if (code)
        cJSON_AddStringToObject(error, "code", code);
    else
        cJSON_AddNullToObject(error, "code");
    return root;
}

char *kvd_oai_error_body(int status, const char *message, const char *param, const char *code, size_t *len)
{
    cJSON *obj = kvd_oai_error_object(status, message, param, code);
    char *text = obj ? cJSON_PrintUnformatted(obj) : NULL;
    cJSON_Delete(obj);
    if (text)
        *len = strlen(text);
    return text;
}

/* ---- logprobs in OpenAI's two shapes ---- */

/* The text of one token (special tokens as their content), raw bytes; with
 * return_tokens_as_token_ids, "token_id:N" so clients can recover exact ids. */
static char *token_text(const kvd_oai_response *r, int32_t token, size_t *len)
{
    if (r->tokens_as_ids) {
        char buf[32];
        int n = snprintf(buf, sizeof buf, "token_id:%d", (int)token);
        *len = (size_t)n;
        return strdup(buf);
    }
    char *text = kvd_tokenizer_decode(r->tok, &token, 1, false, len, NULL);
    if (!text) {
        *len = 0;
        return strdup("");
    }
    return text;
}

static cJSON *token_bytes(const char *text, size_t len)
{
    cJSON *bytes = cJSON_CreateArray();
    for (size_t i = 0; i < len; i++)
        cJSON_AddItemToArray(bytes, cJSON_CreateNumber((unsigned char)text[i]));
    return bytes;
}

/* Chat: {"token", "logprob", "bytes", "top_logprobs": [...]} for one token. */
static cJSON *chat_logprob_entry(const kvd_oai_response *r, const kvd_token_logprob *lp)
{
    size_t len;
    char *text = token_text(r, lp->token, &len);
    cJSON *entry = cJSON_CreateObject();
    add_sanitized(entry, "token", text ? text : "", text ? len : 0);
    cJSON_AddNumberToObject(entry, "logprob", lp->logprob);
    cJSON_AddItemToObject(entry, "bytes", token_bytes(text, text ? len : 0));
    free(text);
    cJSON *top = cJSON_AddArrayToObject(entry, "top_logprobs");
    int num_top = lp->num_top < r->top_logprobs ? lp->num_top : r->top_logprobs;
    for (int k = 0; k < num_top; k++) {
        char *alt = token_text(r, lp->top_tokens[k], &len);
        cJSON *alt_entry = cJSON_CreateObject();
        add_sanitized(alt_entry, "token", alt ? alt : "", alt ? len : 0);
        cJSON_AddNumberToObject(alt_entry, "logprob", lp->top_logprobs[k]);
        cJSON_AddItemToObject(alt_entry, "bytes", token_bytes(alt, alt ? len : 0));
        free(alt);
        cJSON_AddItemToArray(top, alt_entry);
    }
    return entry;
}

/* Completions: one token's items of the four parallel arrays; top_logprobs maps token
 * text to logprob for the top alternatives plus the sampled token, as vLLM reports
 * them. Appends to the four buffers (comma-separated items). */
static int completion_logprob_items(const kvd_oai_response *r, const kvd_token_logprob *lp, size_t *offset,
                                    kvd_sbuf *tokens, kvd_sbuf *values, kvd_sbuf *tops, kvd_sbuf *offsets)
{
    size_t len;
    char *text = token_text(r, lp->token, &len);
    cJSON *token_str = kvd_json_sanitized_string(text ? text : "", text ? len : 0);
    const char *key = token_str ? token_str->valuestring : "";
    cJSON *top = cJSON_CreateObject();
    int num_top = lp->num_top < r->top_logprobs ? lp->num_top : r->top_logprobs;
    for (int k = 0; k < num_top; k++) {
        size_t alt_len;
        char *alt = token_text(r, lp->top_tokens[k], &alt_len);
        cJSON *alt_str = kvd_json_sanitized_string(alt ? alt : "", alt ? alt_len : 0);
        if (alt_str && !cJSON_GetObjectItemCaseSensitive(top, alt_str->valuestring))
            cJSON_AddNumberToObject(top, alt_str->valuestring, lp->top_logprobs[k]);
        cJSON_Delete(alt_str);
        free(alt);
    }
    if (!cJSON_GetObjectItemCaseSensitive(top, key))
        cJSON_AddNumberToObject(top, key, lp->logprob);
    int rc = append_item(tokens, token_str ? token_str : cJSON_CreateString(""));
    rc |= append_item(values, cJSON_CreateNumber(lp->logprob));
    rc |= append_item(tops, top);
    rc |= append_item(offsets, cJSON_CreateNumber((double)*offset));
    *offset += text ? len : 0;
    free(text);
    return rc ? KVD_ENOMEM : 0;
}

/* ---- whole responses ---- */

void kvd_oai_choice_init(kvd_oai_choice *ch)
{
    memset(ch, 0, sizeof *ch);
}

void kvd_oai_choice_deinit(kvd_oai_choice *ch)
{
    kvd_sbuf_deinit(&ch->text);
    kvd_sbuf_deinit(&ch->raw_lp);
    ch->raw_lp_estimate = 0;
    kvd_sbuf_deinit(&ch->lp_entries);
    kvd_sbuf_deinit(&ch->lp_values);
    kvd_sbuf_deinit(&ch->lp_top);
    kvd_sbuf_deinit(&ch->lp_offsets);
    kvd_sbuf_deinit(&ch->tool_calls);
}

size_t kvd_oai_choice_bytes(const kvd_oai_choice *ch)
{
    return ch->text.len + ch->lp_entries.len + ch->lp_values.len + ch->lp_top.len + ch->lp_offsets.len +
           ch->tool_calls.len + ch->raw_lp_estimate;
}

void kvd_oai_tool_call_id(const kvd_oai_response *r, int choice_index, int call_index, char *out, size_t cap)
{
    const char *dash = strchr(r->id, '-');
    snprintf(out, cap, "call_%s_%d_%d", dash ? dash + 1 : r->id, choice_index, call_index);
}

static cJSON *tool_call_object(const kvd_oai_response *r, int choice_index, int call_index, const kvd_tool_call *call,
                               bool with_index, bool with_arguments)
{
    char id[96];
    kvd_oai_tool_call_id(r, choice_index, call_index, id, sizeof id);
    cJSON *obj = cJSON_CreateObject();
    if (with_index)
        cJSON_AddNumberToObject(obj, "index", call_index);
    cJSON_AddStringToObject(obj, "id", id);
    cJSON_AddStringToObject(obj, "type", "function");
    cJSON *fn = cJSON_AddObjectToObject(obj, "function");
    add_sanitized(fn, "name", call->name, strlen(call->name));
    if (with_arguments)
        add_sanitized(fn, "arguments", call->arguments, strlen(call->arguments));
    else
        cJSON_AddStringToObject(fn, "arguments", "");
    return obj;
}

int kvd_oai_choice_add_calls(const kvd_oai_response *r, kvd_oai_choice *ch, int choice_index,
                             const kvd_tool_call *calls, int num_calls)
{
    for (int k = 0; k < num_calls; k++) {
        int rc = append_item(&ch->tool_calls, tool_call_object(r, choice_index, ch->num_tool_calls, &calls[k], false, true));
        if (rc)
            return rc;
        ch->num_tool_calls++;
    }
    return 0;
}

int kvd_oai_choice_add(const kvd_oai_response *r, kvd_oai_choice *ch, const kvd_event *ev)
{
    if (kvd_sbuf_append(&ch->text, ev->text, ev->text_len) != 0)
        return KVD_ENOMEM;
    if (!r->logprobs || !ev->logprobs || ev->num_tokens <= 0)
        return 0;
    size_t n = (size_t)ev->num_tokens;
    /* Whole structs at multiples of their size in malloc'ed memory: aligned. */
    if (kvd_sbuf_append(&ch->raw_lp, ev->logprobs, n * sizeof *ev->logprobs) != 0)
        return KVD_ENOMEM;
    size_t entry = r->chat ? KVD_OAI_CHAT_LOGPROB_ENTRY_BYTES : KVD_OAI_COMPLETION_LOGPROB_ENTRY_BYTES;
    for (size_t i = 0; i < n; i++) {
        int num_top = ev->logprobs[i].num_top < r->top_logprobs ? ev->logprobs[i].num_top : r->top_logprobs;
        ch->raw_lp_estimate += (size_t)(1 + (num_top > 0 ? num_top : 0)) * entry;
    }
    return 0;
}

int kvd_oai_choice_format(const kvd_oai_response *r, kvd_oai_choice *ch)
{
    int rc = 0;
    const kvd_token_logprob *raw = (const kvd_token_logprob *)(const void *)ch->raw_lp.data;
    size_t n = ch->raw_lp.len / sizeof *raw;
    for (size_t i = 0; i < n && rc == 0; i++)
        rc = r->chat ? append_item(&ch->lp_entries, chat_logprob_entry(r, &raw[i]))
                     : completion_logprob_items(r, &raw[i], &ch->text_offset, &ch->lp_entries, &ch->lp_values,
                                                &ch->lp_top, &ch->lp_offsets);
    kvd_sbuf_deinit(&ch->raw_lp);
    ch->raw_lp_estimate = 0;
    return rc;
}

/* Moves the items of src into out as a JSON array and frees src. */
static void append_array(kvd_sbuf *out, const char *name, kvd_sbuf *src)
{
    kvd_sbuf_printf(out, "\"%s\":[", name);
    kvd_sbuf_append(out, src->data, src->len);
    kvd_sbuf_append(out, "]", 1);
    kvd_sbuf_deinit(src);
}

static void append_head(kvd_sbuf *out, const kvd_oai_response *r, const char *object)
{
    kvd_sbuf_puts(out, "{\"id\":");
    kvd_json_append_string(out, r->id, strlen(r->id));
    kvd_sbuf_printf(out, ",\"object\":\"%s\",\"created\":%lld,\"model\":", object, r->created);
    kvd_json_append_string(out, r->model, strlen(r->model));
}

static void append_usage(kvd_sbuf *out, const kvd_oai_usage *u)
{
    kvd_sbuf_printf(out,
                    "\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d,"
                    "\"prompt_tokens_details\":{\"cached_tokens\":%d}}",
                    u->prompt_tokens, u->completion_tokens, u->prompt_tokens + u->completion_tokens,
                    u->cached_tokens);
}

char *kvd_oai_whole_body(const kvd_oai_response *r, kvd_oai_choice *choices, int num_choices,
                         const kvd_oai_usage *usage, size_t *len)
{
    kvd_sbuf out = {0};
    size_t total = 256;
    for (int i = 0; i < num_choices; i++)
        total += kvd_oai_choice_bytes(&choices[i]) + 256;
    kvd_sbuf_reserve(&out, total);
    append_head(&out, r, r->chat ? "chat.completion" : "text_completion");
    kvd_sbuf_puts(&out, ",\"choices\":[");
    for (int i = 0; i < num_choices; i++) {
        kvd_oai_choice *ch = &choices[i];
        kvd_sbuf_printf(&out, "%s{\"index\":%d,", i ? "," : "", i);
        if (r->chat) {
            kvd_sbuf_puts(&out, "\"message\":{\"role\":\"assistant\",\"content\":");
            if (ch->num_tool_calls && ch->text.len == 0)
                kvd_sbuf_puts(&out, "null");
            else
                kvd_json_append_string(&out, ch->text.data ? ch->text.data : "", ch->text.len);
            kvd_sbuf_puts(&out, ",\"refusal\":null");
            if (ch->num_tool_calls) {
                kvd_sbuf_puts(&out, ",\"tool_calls\":[");
                kvd_sbuf_append(&out, ch->tool_calls.data, ch->tool_calls.len);
                kvd_sbuf_puts(&out, "]");
            }
            kvd_sbuf_deinit(&ch->tool_calls);
            kvd_sbuf_puts(&out, "},");
        } else {
            kvd_sbuf_puts(&out, "\"text\":");
            kvd_json_append_string(&out, ch->text.data ? ch->text.data : "", ch->text.len);
            kvd_sbuf_puts(&out, ",");
        }
        kvd_sbuf_deinit(&ch->text);
        if (!r->logprobs) {
            kvd_sbuf_puts(&out, "\"logprobs\":null");
        } else if (r->chat) {
            kvd_sbuf_puts(&out, "\"logprobs\":{");
            append_array(&out, "content", &ch->lp_entries);
            kvd_sbuf_puts(&out, ",\"refusal\":null}");
        } else {
            kvd_sbuf_puts(&out, "\"logprobs\":{");
            append_array(&out, "tokens", &ch->lp_entries);
            kvd_sbuf_puts(&out, ",");
            append_array(&out, "token_logprobs", &ch->lp_values);
            kvd_sbuf_puts(&out, ",");
            append_array(&out, "top_logprobs", &ch->lp_top);
            kvd_sbuf_puts(&out, ",");
            append_array(&out, "text_offset", &ch->lp_offsets);
            kvd_sbuf_puts(&out, "}");
        }
        kvd_sbuf_printf(&out, ",\"finish_reason\":\"%s\"}",
                        ch->num_tool_calls && ch->finish == KVD_FINISH_STOP ? "tool_calls"
                                                                            : kvd_finish_reason_name(ch->finish));
    }
    kvd_sbuf_puts(&out, "],");
    append_usage(&out, usage);
    kvd_sbuf_puts(&out, "}");
    return kvd_sbuf_take(&out, len);
}

/* ---- streaming ---- */

static int sse_send(kvd_sbuf *out, cJSON *chunk)
{
    char *text = chunk ? cJSON_PrintUnformatted(chunk) : NULL;
    cJSON_Delete(chunk);
    if (!text)
        return KVD_ENOMEM;
    int rc = kvd_sbuf_printf(out, "data: %s\n\n", text);
    free(text);
    return rc;
}

static cJSON *chunk_base(const kvd_oai_response *r)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "id", r->id);
    cJSON_AddStringToObject(root, "object", r->chat ? "chat.completion.chunk" : "text_completion");
    cJSON_AddNumberToObject(root, "created", (double)r->created);
    cJSON_AddStringToObject(root, "model", r->model);
    return root;
}

/* A chunk with one choice; fills the choice's payload through the returned pointer. */
static cJSON *chunk_new(const kvd_oai_response *r, int index, cJSON **choice_out)
{
    cJSON *chunk = chunk_base(r);
    cJSON *choices = cJSON_AddArrayToObject(chunk, "choices");
    cJSON *choice = cJSON_CreateObject();
    cJSON_AddNumberToObject(choice, "index", index);
    cJSON_AddItemToArray(choices, choice);
    if (r->include_usage)
        cJSON_AddNullToObject(chunk, "usage");
    *choice_out = choice;
    return chunk;
}

int kvd_oai_sse_role(const kvd_oai_response *r, int index, kvd_sbuf *out)
{
    cJSON *choice;
    cJSON *chunk = chunk_new(r, index, &choice);
    cJSON *delta = cJSON_AddObjectToObject(choice, "delta");
    cJSON_AddStringToObject(delta, "role", "assistant");
    cJSON_AddStringToObject(delta, "content", "");
    cJSON_AddNullToObject(choice, "logprobs");
    cJSON_AddNullToObject(choice, "finish_reason");
    return sse_send(out, chunk);
}

/* vLLM's continuous_usage_stats: the chunk's usage is the choice's so far. */
static cJSON *event_chunk_new(const kvd_oai_response *r, const kvd_event *ev, cJSON **choice)
{
    cJSON *chunk = chunk_new(r, ev->choice, choice);
    if (r->continuous_usage) {
        cJSON *usage = cJSON_CreateObject();
        cJSON_AddNumberToObject(usage, "prompt_tokens", ev->prompt_tokens);
        cJSON_AddNumberToObject(usage, "completion_tokens", ev->completion_tokens);
        cJSON_AddNumberToObject(usage, "total_tokens", ev->prompt_tokens + ev->completion_tokens);
        cJSON_ReplaceItemInObjectCaseSensitive(chunk, "usage", usage);
    }
    return chunk;
}

int kvd_oai_sse_event(const kvd_oai_response *r, size_t *text_offset, const kvd_event *ev, kvd_sbuf *out)
{
    int rc = 0;
    if (ev->num_tokens > 0 || ev->text_len > 0) {
        cJSON *choice;
        cJSON *chunk = event_chunk_new(r, ev, &choice);
        if (r->chat) {
            cJSON *delta = cJSON_AddObjectToObject(choice, "delta");
            add_sanitized(delta, "content", ev->text, ev->text_len);
        } else {
            add_sanitized(choice, "text", ev->text, ev->text_len);
        }
        if (r->logprobs && ev->logprobs) {
            if (r->chat) {
                cJSON *lp = cJSON_AddObjectToObject(choice, "logprobs");
                cJSON *content = cJSON_AddArrayToObject(lp, "content");
                for (int i = 0; i < ev->num_tokens; i++)
                    cJSON_AddItemToArray(content, chat_logprob_entry(r, &ev->logprobs[i]));
                cJSON_AddNullToObject(lp, "refusal");
            } else {
                kvd_sbuf items[4] = {{0}};
                for (int i = 0; i < ev->num_tokens && rc == 0; i++)
                    rc = completion_logprob_items(r, &ev->logprobs[i], text_offset, &items[0], &items[1],
                                                  &items[2], &items[3]);
                kvd_sbuf lp = {0};
                kvd_sbuf_puts(&lp, "{");
                append_array(&lp, "tokens", &items[0]);
                kvd_sbuf_puts(&lp, ",");
                append_array(&lp, "token_logprobs", &items[1]);
                kvd_sbuf_puts(&lp, ",");
                append_array(&lp, "top_logprobs", &items[2]);
                kvd_sbuf_puts(&lp, ",");
                append_array(&lp, "text_offset", &items[3]);
                kvd_sbuf_puts(&lp, "}");
                cJSON *raw = lp.failed ? NULL : cJSON_CreateRaw(lp.data);
                kvd_sbuf_deinit(&lp);
                if (!raw)
                    rc = KVD_ENOMEM;
                else
                    cJSON_AddItemToObject(choice, "logprobs", raw);
            }
        } else {
            cJSON_AddNullToObject(choice, "logprobs");
        }
        cJSON_AddNullToObject(choice, "finish_reason");
        rc |= sse_send(out, chunk);
    }
    if (ev->finish == KVD_FINISH_ERROR) {
        rc |= sse_send(out, kvd_oai_error_object(500, ev->error[0] ? ev->error : "generation failed", NULL, NULL));
    } else if (ev->finish == KVD_FINISH_STOP || ev->finish == KVD_FINISH_LENGTH) {
        cJSON *choice;
        cJSON *chunk = event_chunk_new(r, ev, &choice);
        if (r->chat)
            cJSON_AddObjectToObject(choice, "delta");
        else
            cJSON_AddStringToObject(choice, "text", "");
        cJSON_AddNullToObject(choice, "logprobs");
        cJSON_AddStringToObject(choice, "finish_reason", kvd_finish_reason_name(ev->finish));
        rc |= sse_send(out, chunk);
    }
    return rc ? KVD_ENOMEM : 0;
}

int kvd_oai_sse_tool_calls(const kvd_oai_response *r, int index, int first_index, const kvd_tool_call *calls,
                           int num_calls, kvd_sbuf *out)
{
    int rc = 0;
    for (int k = 0; k < num_calls; k++) {
        for (int part = 0; part < 2; part++) {
            cJSON *choice;
            cJSON *chunk = chunk_new(r, index, &choice);
            cJSON *delta = cJSON_AddObjectToObject(choice, "delta");
            cJSON *list = cJSON_AddArrayToObject(delta, "tool_calls");
            cJSON *item;
            if (part == 0) {
                item = tool_call_object(r, index, first_index + k, &calls[k], true, false);
            } else {
                item = cJSON_CreateObject();
                cJSON_AddNumberToObject(item, "index", first_index + k);
                cJSON *fn = cJSON_AddObjectToObject(item, "function");
                add_sanitized(fn, "arguments", calls[k].arguments, strlen(calls[k].arguments));
            }
            cJSON_AddItemToArray(list, item);
            cJSON_AddNullToObject(choice, "logprobs");
            cJSON_AddNullToObject(choice, "finish_reason");
            rc |= sse_send(out, chunk);
        }
    }
    return rc ? KVD_ENOMEM : 0;
}

int kvd_oai_sse_finish(const kvd_oai_response *r, int index, const char *reason, kvd_sbuf *out)
{
    cJSON *choice;
    cJSON *chunk = chunk_new(r, index, &choice);
    if (r->chat)
        cJSON_AddObjectToObject(choice, "delta");
    else
        cJSON_AddStringToObject(choice, "text", "");
    cJSON_AddNullToObject(choice, "logprobs");
    cJSON_AddStringToObject(choice, "finish_reason", reason);
    return sse_send(out, chunk);
}

int kvd_oai_sse_end(const kvd_oai_response *r, const kvd_oai_usage *usage, kvd_sbuf *out)
{
    if (r->include_usage) {
        kvd_sbuf chunk = {0};
        kvd_sbuf head = {0};
        append_head(&head, r, r->chat ? "chat.completion.chunk" : "text_completion");
        kvd_sbuf_printf(&chunk, "data: %s,\"choices\":[],", head.data ? head.data : "");
        kvd_sbuf_deinit(&head);
        append_usage(&chunk, usage);
        kvd_sbuf_puts(&chunk, "}\n\n");
        kvd_sbuf_append(out, chunk.data, chunk.len);
        bool failed = chunk.failed;
        kvd_sbuf_deinit(&chunk);
        if (failed)
            return KVD_ENOMEM;
    }
    return kvd_sbuf_puts(out, "data: [DONE]\n\n");
}
