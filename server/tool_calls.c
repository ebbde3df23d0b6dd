/* tool_calls.c - Hermes-style <tool_call> blocks out of streamed model text (tool_calls.h). */
#include "tool_calls.h"

#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "kvd/kvd_error.h"

#define OPEN_TAG "<tool_call>"
#define CLOSE_TAG "</tool_call>"

void kvd_tool_parser_init(kvd_tool_parser *p, bool parallel)
{
    memset(p, 0, sizeof *p);
    p->parallel = parallel;
}

void kvd_tool_parser_deinit(kvd_tool_parser *p)
{
    kvd_sbuf_deinit(&p->pending);
    kvd_sbuf_deinit(&p->body);
    kvd_sbuf_deinit(&p->held_ws);
}

void kvd_tool_delta_init(kvd_tool_delta *d) { memset(d, 0, sizeof *d); }

void kvd_tool_delta_deinit(kvd_tool_delta *d)
{
    kvd_sbuf_deinit(&d->content);
    for (int i = 0; i < d->num_calls; i++) {
        free(d->calls[i].name);
        free(d->calls[i].arguments);
    }
    free(d->calls);
    kvd_tool_delta_init(d);
}

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

/* Content with whitespace at its edges held back: it is emitted before later content
 * and dropped before a call (or after one). */
static int emit_content(kvd_tool_parser *p, const char *s, size_t n, kvd_tool_delta *d)
{
    if (p->after_call) {
        while (n && is_space(*s)) {
            s++;
            n--;
        }
        if (n == 0)
            return 0;
        p->after_call = false;
    }
    size_t end = n;
    while (end && is_space(s[end - 1]))
        end--;
    if (end == 0)
        return kvd_sbuf_append(&p->held_ws, s, n);
    int rc = kvd_sbuf_append(&d->content, p->held_ws.data, p->held_ws.len);
    kvd_sbuf_reset(&p->held_ws);
    rc |= kvd_sbuf_append(&d->content, s, end);
    rc |= kvd_sbuf_append(&p->held_ws, s + end, n - end);
    return rc ? KVD_ENOMEM : 0;
}

/* Length of the longest suffix of s[0..n) that is a proper prefix of tag. */
static size_t partial_tag(const char *s, size_t n, const char *tag)
{
    size_t t = strlen(tag);
    for (size_t k = t - 1; k > 0; k--)
        if (k <= n && memcmp(s + n - k, tag, k) == 0)
            return k;
    return 0;
}

/* The call in body[0..n), or false when it is not a well-formed call. */
static bool parse_call(const char *body, size_t n, kvd_tool_call *call)
{
    cJSON *root = cJSON_ParseWithLength(body, n);
    bool ok = false;
    if (cJSON_IsObject(root)) {
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(root, "name");
        const cJSON *args = cJSON_GetObjectItemCaseSensitive(root, "arguments");
        if (!args)
            args = cJSON_GetObjectItemCaseSensitive(root, "parameters");
        if (cJSON_IsString(name) && name->valuestring[0]) {
            call->name = strdup(name->valuestring);
            if (!args)
                call->arguments = strdup("{}");
            else if (cJSON_IsString(args))
                call->arguments = strdup(args->valuestring);
            else
                call->arguments = cJSON_PrintUnformatted(args);
            ok = call->name && call->arguments;
            if (!ok) {
                free(call->name);
                free(call->arguments);
            }
        }
    }
    cJSON_Delete(root);
    return ok;
}

static int add_call(kvd_tool_delta *d, kvd_tool_call call)
{
    kvd_tool_call *grown = realloc(d->calls, (size_t)(d->num_calls + 1) * sizeof *grown);
    if (!grown) {
        free(call.name);
        free(call.arguments);
        return KVD_ENOMEM;
    }
    d->calls = grown;
    d->calls[d->num_calls++] = call;
    return 0;
}

/* The open block as content, tags included (a block that is not a call). */
static int block_as_content(kvd_tool_parser *p, bool closed, kvd_tool_delta *d)
{
    kvd_sbuf text = {0};
    kvd_sbuf_puts(&text, OPEN_TAG);
    kvd_sbuf_append(&text, p->body.data, p->body.len);
    if (closed)
        kvd_sbuf_puts(&text, CLOSE_TAG);
    int rc = text.failed ? KVD_ENOMEM : emit_content(p, text.data, text.len, d);
    kvd_sbuf_deinit(&text);
    kvd_sbuf_reset(&p->body);
    return rc;
}

int kvd_tool_parser_feed(kvd_tool_parser *p, const char *text, size_t len, bool final, kvd_tool_delta *d)
{
    if (len && kvd_sbuf_append(&p->pending, text, len) != 0)
        return KVD_ENOMEM;
    int rc = 0;
    size_t pos = 0;
    const char *buf = p->pending.data;
    size_t n = p->pending.len;
    while (rc == 0 && pos < n) {
        if (!p->in_call) {
            const char *open = (p->parallel || p->num_calls == 0) ? memmem(buf + pos, n - pos, OPEN_TAG, strlen(OPEN_TAG)) : NULL;
            if (!open) {
                size_t keep = final || !(p->parallel || p->num_calls == 0) ? 0 : partial_tag(buf + pos, n - pos, OPEN_TAG);
                rc = emit_content(p, buf + pos, n - pos - keep, d);
                pos = n - keep;
                break;
            }
            size_t at = (size_t)(open - buf);
            rc = emit_content(p, buf + pos, at - pos, d);
            p->in_call = true;
            pos = at + strlen(OPEN_TAG);
        } else {
            const char *close = memmem(buf + pos, n - pos, CLOSE_TAG, strlen(CLOSE_TAG));
            if (!close) {
                size_t keep = final ? 0 : partial_tag(buf + pos, n - pos, CLOSE_TAG);
                rc = kvd_sbuf_append(&p->body, buf + pos, n - pos - keep);
                pos = n - keep;
                break;
            }
            size_t at = (size_t)(close - buf);
            rc = kvd_sbuf_append(&p->body, buf + pos, at - pos);
            pos = at + strlen(CLOSE_TAG);
            p->in_call = false;
            kvd_tool_call call;
            if (rc == 0 && parse_call(p->body.data ? p->body.data : "", p->body.len, &call)) {
                kvd_sbuf_reset(&p->held_ws); /* whitespace before a call is dropped */
                rc = add_call(d, call);
                kvd_sbuf_reset(&p->body);
                p->num_calls++;
                p->after_call = true;
            } else if (rc == 0) {
                rc = block_as_content(p, true, d);
            }
        }
    }
    /* keep what is still undecided */
    if (rc == 0) {
        size_t rest = n - pos;
        if (rest && pos)
            memmove(p->pending.data, p->pending.data + pos, rest);
        p->pending.len = rest;
        if (p->pending.data)
            p->pending.data[rest] = '\0';
    }
    if (rc == 0 && final) {
        if (p->in_call) {
            p->in_call = false;
            rc = block_as_content(p, false, d);
        }
        /* trailing whitespace: dropped after calls, kept in a plain answer */
        if (rc == 0 && p->num_calls == 0 && p->held_ws.len)
            rc = kvd_sbuf_append(&d->content, p->held_ws.data, p->held_ws.len);
        kvd_sbuf_reset(&p->held_ws);
    }
    return rc ? KVD_ENOMEM : 0;
}

int kvd_tool_parser_prime(kvd_tool_parser *p, const char *text, size_t len, kvd_tool_delta *d)
{
    int rc = kvd_tool_parser_feed(p, text, len, false, d);
    kvd_sbuf_reset(&d->content);
    kvd_sbuf_reset(&p->held_ws);
    return rc;
}
