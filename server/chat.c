/* chat.c - ChatML rendering and marker-aware encoding for Qwen2.5 chat requests.
 *
 * Content may be a string, null (an assistant turn that only called tools), or an
 * array of {"type": "text", "text": ...} parts joined with "\n" as vLLM does; other
 * part types (images, audio) are refused because the model reads only text.
 */
#include "chat.h"

#include <stdlib.h>
#include <string.h>

static const char *const marker_text[] = {"<|im_start|>", "<|im_end|>"};

void kvd_chat_prompt_init(kvd_chat_prompt *p)
{
    kvd_sbuf_init(&p->text);
    p->specials = NULL;
    p->num_specials = 0;
    p->cap_specials = 0;
}

void kvd_chat_prompt_deinit(kvd_chat_prompt *p)
{
    kvd_sbuf_deinit(&p->text);
    free(p->specials);
    kvd_chat_prompt_init(p);
}

static int add_marker(kvd_chat_prompt *p, enum kvd_chat_marker marker)
{
    if (p->num_specials == p->cap_specials) {
        int cap = p->cap_specials ? p->cap_specials * 2 : 16;
        kvd_chat_special *grown = realloc(p->specials, (size_t)cap * sizeof *grown);
        if (!grown)
            return KVD_ENOMEM;
        p->specials = grown;
        p->cap_specials = cap;
    }
    p->specials[p->num_specials].offset = p->text.len;
    p->specials[p->num_specials].marker = marker;
    p->num_specials++;
    kvd_sbuf_puts(&p->text, marker_text[marker]);
    return p->text.failed ? KVD_ENOMEM : 0;
}

static int bad(char *param, size_t cap, kvd_error *err, const char *message, int index, const char *field)
{
    if (index < 0)
        snprintf(param, cap, "messages");
    else
        snprintf(param, cap, "messages[%d]%s", index, field);
    return kvd_error_set(err, KVD_EINVAL, "%s: %s", param, message);
}

/* Appends a message's content; content may be NULL (absent). */
static int append_content(kvd_chat_prompt *p, const cJSON *content, int index, char *param, size_t cap,
                          kvd_error *err)
{
    if (!content || cJSON_IsNull(content))
        return 0;
    if (cJSON_IsString(content)) {
        kvd_sbuf_puts(&p->text, content->valuestring);
        return 0;
    }
    if (!cJSON_IsArray(content))
        return bad(param, cap, err, "must be a string or an array of content parts", index, ".content");
    int part_index = 0;
    const cJSON *part;
    cJSON_ArrayForEach(part, content) {
        char field[64];
        snprintf(field, sizeof field, ".content[%d]", part_index);
        if (!cJSON_IsObject(part))
            return bad(param, cap, err, "must be an object {\"type\": \"text\", \"text\": ...}", index, field);
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
        if (!cJSON_IsString(type)) {
            snprintf(field, sizeof field, ".content[%d].type", part_index);
            return bad(param, cap, err, "must be a string", index, field);
        }
        if (strcmp(type->valuestring, "text") != 0) {
            snprintf(field, sizeof field, ".content[%d].type", part_index);
            return bad(param, cap, err, "only \"text\" parts are supported", index, field);
        }
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsString(text)) {
            snprintf(field, sizeof field, ".content[%d].text", part_index);
            return bad(param, cap, err, "must be a string", index, field);
        }
        if (part_index > 0)
            kvd_sbuf_puts(&p->text, "\n");
        kvd_sbuf_puts(&p->text, text->valuestring);
        part_index++;
    }
    return 0;
}

static const char *role_of(const cJSON *message)
{
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(message, "role");
    return cJSON_IsString(role) ? role->valuestring : NULL;
}

int kvd_chat_render(const cJSON *messages, kvd_chat_prompt *p, char *param, size_t param_cap,
                    kvd_error *err)
{
    if (!cJSON_IsArray(messages))
        return bad(param, param_cap, err, "must be an array of messages", -1, "");
    int count = cJSON_GetArraySize(messages);
    if (count == 0)
        return bad(param, param_cap, err, "must not be empty", -1, "");
    /* Check every message before rendering any, so errors name the first bad field. */
    int index = 0;
    const cJSON *message;
    cJSON_ArrayForEach(message, messages) {
        if (!cJSON_IsObject(message))
            return bad(param, param_cap, err, "must be an object with \"role\" and \"content\"", index, "");
        const char *role = role_of(message);
        if (!role)
            return bad(param, param_cap, err, "must be a string", index, ".role");
        if (strcmp(role, "system") != 0 && strcmp(role, "user") != 0 && strcmp(role, "assistant") != 0 &&
            strcmp(role, "tool") != 0)
            return bad(param, param_cap, err, "must be one of system, user, assistant, tool", index, ".role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(message, "content");
        bool may_be_empty = strcmp(role, "assistant") == 0;
        if ((!content || cJSON_IsNull(content)) && !may_be_empty)
            return bad(param, param_cap, err, "is required", index, ".content");
        index++;
    }

    const cJSON *first = cJSON_GetArrayItem(messages, 0);
    if (strcmp(role_of(first), "system") != 0) {
        if (add_marker(p, KVD_CHAT_IM_START) != 0)
            goto oom;
        kvd_sbuf_puts(&p->text, "system\n" KVD_CHAT_DEFAULT_SYSTEM);
        if (add_marker(p, KVD_CHAT_IM_END) != 0)
            goto oom;
        kvd_sbuf_puts(&p->text, "\n");
    }
    const char *previous_role = NULL;
    index = 0;
    cJSON_ArrayForEach(message, messages) {
        const char *role = role_of(message);
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(message, "content");
        const cJSON *next = message->next;
        bool tool = strcmp(role, "tool") == 0;
        bool opens = !tool || !previous_role || strcmp(previous_role, "tool") != 0;
        bool closes = !tool || !next || strcmp(role_of(next), "tool") != 0;
        if (opens) {
            if (add_marker(p, KVD_CHAT_IM_START) != 0)
                goto oom;
            kvd_sbuf_printf(&p->text, "%s", tool ? "user" : role);
        }
        kvd_sbuf_puts(&p->text, tool ? "\n<tool_response>\n" : "\n");
        int rc = append_content(p, content, index, param, param_cap, err);
        if (rc)
            return rc;
        if (tool)
            kvd_sbuf_puts(&p->text, "\n</tool_response>");
        if (closes) {
            if (add_marker(p, KVD_CHAT_IM_END) != 0)
                goto oom;
            kvd_sbuf_puts(&p->text, "\n");
        }
        previous_role = role;
        index++;
    }
    if (add_marker(p, KVD_CHAT_IM_START) != 0)
        goto oom;
    kvd_sbuf_puts(&p->text, "assistant\n");
    if (p->text.failed)
        goto oom;
    return 0;
oom:
    return kvd_error_set(err, KVD_ENOMEM, "chat template: out of memory");
}

int kvd_chat_encode(const kvd_chat_prompt *p, const kvd_tokenizer *tok, int32_t **ids, kvd_error *err)
{
    int32_t marker_ids[2];
    for (int m = 0; m < 2; m++) {
        marker_ids[m] = kvd_tokenizer_token_id(tok, marker_text[m]);
        if (marker_ids[m] < 0)
            return kvd_error_set(err, KVD_EUNSUPPORTED, "tokenizer: no %s token for the chat template",
                                 marker_text[m]);
    }
    int32_t *out = NULL;
    size_t len = 0, cap = 0;
    size_t pos = 0;
    for (int s = 0; s <= p->num_specials; s++) {
        size_t end = s < p->num_specials ? p->specials[s].offset : p->text.len;
        int num = 0;
        int32_t *span = NULL;
        if (end > pos) {
            num = kvd_tokenizer_encode(tok, p->text.data + pos, end - pos, false, &span);
            if (num < 0) {
                free(out);
                return kvd_error_set(err, num, "chat template: encoding failed");
            }
        }
        size_t need = len + (size_t)num + 1;
        if (need > cap) {
            size_t grown_cap = cap ? cap : 64;
            while (grown_cap < need)
                grown_cap *= 2;
            int32_t *grown = realloc(out, grown_cap * sizeof *grown);
            if (!grown) {
                free(span);
                free(out);
                return kvd_error_set(err, KVD_ENOMEM, "chat template: out of memory");
            }
            out = grown;
            cap = grown_cap;
        }
        if (num)
            memcpy(out + len, span, (size_t)num * sizeof *span);
        len += (size_t)num;
        free(span);
        if (s < p->num_specials) {
            out[len++] = marker_ids[p->specials[s].marker];
            pos = end + strlen(marker_text[p->specials[s].marker]);
        }
    }
    *ids = out;
    return (int)len;
}

void kvd_chat_drop_generation_prompt(kvd_chat_prompt *p)
{
    /* The render always ends with the marker <|im_start|> and "assistant\n". */
    if (p->num_specials > 0 && p->specials[p->num_specials - 1].marker == KVD_CHAT_IM_START) {
        p->text.len = p->specials[p->num_specials - 1].offset;
        p->num_specials--;
        if (p->text.data)
            p->text.data[p->text.len] = '\0';
    }
}
