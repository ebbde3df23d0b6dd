/* kvd_bench_stream.c - reads an OpenAI streaming (SSE) response body into timings and counts.
 *
 * Follows the server-sent events rules that OpenAI-style servers use: lines end in LF
 * or CRLF, "data:" lines (one optional space after the colon) accumulate into an event
 * that a blank line dispatches, ":" lines are comments, other fields are ignored. Bytes
 * arrive split anywhere, so partial lines wait in a buffer. A chunk is an event whose
 * first choice carries non-empty text; its timestamp is the read that completed it, which
 * is what a client really observes (two chunks in one read are 0 ms apart).
 */
#include "kvd_bench.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

/* A line longer than this is not a token stream; stop before eating all memory. */
#define MAX_LINE_BYTES (16u << 20)

void kvd_bench_stream_init(kvd_bench_stream *s, int chat)
{
    memset(s, 0, sizeof *s);
    s->chat = chat;
    s->prompt_tokens = -1;
    s->completion_tokens = -1;
    s->cached_tokens = -1;
}

void kvd_bench_stream_deinit(kvd_bench_stream *s)
{
    free(s->itl_ms);
    kvd_sbuf_deinit(&s->text);
    kvd_sbuf_deinit(&s->line);
    kvd_sbuf_deinit(&s->data);
    kvd_bench_stream_init(s, s->chat);
}

static int add_chunk(kvd_bench_stream *s, const char *text, uint64_t now_ns, kvd_error *err)
{
    if (s->n_chunks > 0) {
        if (s->n_itl == s->cap_itl) {
            size_t cap = s->cap_itl ? s->cap_itl * 2 : 64;
            float *itl = realloc(s->itl_ms, cap * sizeof *itl);
            if (!itl)
                return kvd_error_set(err, KVD_ENOMEM, "stream: out of memory for %zu gaps", cap);
            s->itl_ms = itl;
            s->cap_itl = cap;
        }
        s->itl_ms[s->n_itl++] = (float)((double)(now_ns - s->last_ns) / 1e6);
    } else {
        s->first_ns = now_ns;
    }
    if (kvd_sbuf_append(&s->text, text, strlen(text)) < 0)
        return kvd_error_set(err, KVD_ENOMEM, "stream: out of memory for the answer text");
    s->last_ns = now_ns;
    s->n_chunks++;
    return 0;
}

static const char *chunk_text(const kvd_bench_stream *s, const cJSON *event)
{
    const cJSON *choices = cJSON_GetObjectItemCaseSensitive(event, "choices");
    const cJSON *first = cJSON_IsArray(choices) ? cJSON_GetArrayItem(choices, 0) : NULL;
    if (!cJSON_IsObject(first))
        return NULL;
    const cJSON *holder = first;
    if (s->chat)
        holder = cJSON_GetObjectItemCaseSensitive(first, "delta");
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(holder, s->chat ? "content" : "text");
    return cJSON_IsString(text) ? text->valuestring : NULL;
}

static int dispatch(kvd_bench_stream *s, uint64_t now_ns, kvd_error *err)
{
    const char *data = s->data.data ? s->data.data : "";
    size_t len = s->data.len;
    s->has_data = 0;
    if (len == 6 && !memcmp(data, "[DONE]", 6)) {
        s->done = 1;
        kvd_sbuf_reset(&s->data);
        return 0;
    }
    cJSON *event = cJSON_ParseWithLength(data, len);
    if (!cJSON_IsObject(event)) {
        cJSON_Delete(event);
        int rc = kvd_error_set(err, KVD_EFORMAT, "stream: event is not a JSON object: '%.60s'",
                               data);
        kvd_sbuf_reset(&s->data);
        return rc;
    }
    kvd_sbuf_reset(&s->data);
    int rc = 0;
    const cJSON *error = cJSON_GetObjectItemCaseSensitive(event, "error");
    if (error && !cJSON_IsNull(error)) {
        const cJSON *message = cJSON_GetObjectItemCaseSensitive(error, "message");
        rc = kvd_error_set(err, KVD_EFORMAT, "stream: server sent an error: %.150s",
                           cJSON_IsString(message) ? message->valuestring
                           : cJSON_IsString(error) ? error->valuestring
                                                   : "(no message)");
        goto out;
    }
    s->n_events++;
    const cJSON *usage = cJSON_GetObjectItemCaseSensitive(event, "usage");
    if (cJSON_IsObject(usage)) {
        const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(usage, "prompt_tokens");
        const cJSON *completion = cJSON_GetObjectItemCaseSensitive(usage, "completion_tokens");
        if (cJSON_IsNumber(prompt))
            s->prompt_tokens = (long)prompt->valuedouble;
        if (cJSON_IsNumber(completion))
            s->completion_tokens = (long)completion->valuedouble;
        const cJSON *details = cJSON_GetObjectItemCaseSensitive(usage, "prompt_tokens_details");
        const cJSON *cached = cJSON_GetObjectItemCaseSensitive(details, "cached_tokens");
        if (cJSON_IsNumber(cached))
            s->cached_tokens = (long)cached->valuedouble;
    }
    const char *text = chunk_text(s, event);
    if (text && *text)
        rc = add_chunk(s, text, now_ns, err);
out:
    cJSON_Delete(event);
    return rc;
}

static int process_line(kvd_bench_stream *s, const char *line, size_t len, uint64_t now_ns,
                        kvd_error *err)
{
    if (len > 0 && line[len - 1] == '\r')
        len--;
    if (len == 0)
        return s->has_data ? dispatch(s, now_ns, err) : 0;
    if (line[0] == ':')
        return 0;
    if (len < 5 || memcmp(line, "data:", 5) != 0)
        return 0; /* event:, id:, retry: carry nothing we measure */
    const char *value = line + 5;
    size_t value_len = len - 5;
    if (value_len > 0 && value[0] == ' ') {
        value++;
        value_len--;
    }
    if ((s->has_data && kvd_sbuf_append(&s->data, "\n", 1) < 0) ||
        kvd_sbuf_append(&s->data, value, value_len) < 0)
        return kvd_error_set(err, KVD_ENOMEM, "stream: out of memory for an event");
    s->has_data = 1;
    return 0;
}

int kvd_bench_stream_feed(kvd_bench_stream *s, const char *bytes, size_t len,
                          uint64_t now_ns, kvd_error *err)
{
    while (len > 0 && !s->done) {
        const char *nl = memchr(bytes, '\n', len);
        size_t take = nl ? (size_t)(nl - bytes) : len;
        if (s->line.len + take > MAX_LINE_BYTES)
            return kvd_error_set(err, KVD_EFORMAT, "stream: line longer than %u bytes",
                                 MAX_LINE_BYTES);
        int rc;
        if (!nl) {
            if (kvd_sbuf_append(&s->line, bytes, take) < 0)
                return kvd_error_set(err, KVD_ENOMEM, "stream: out of memory for a line");
            return 0;
        }
        if (s->line.len > 0) {
            if (kvd_sbuf_append(&s->line, bytes, take) < 0)
                return kvd_error_set(err, KVD_ENOMEM, "stream: out of memory for a line");
            rc = process_line(s, s->line.data, s->line.len, now_ns, err);
            kvd_sbuf_reset(&s->line);
        } else {
            rc = process_line(s, bytes, take, now_ns, err);
        }
        if (rc < 0)
            return rc;
        bytes += take + 1;
        len -= take + 1;
    }
    return 0;
}

int kvd_bench_stream_finish(kvd_bench_stream *s, uint64_t now_ns, kvd_error *err)
{
    if (s->done)
        return 0;
    if (s->line.len > 0) {
        int rc = process_line(s, s->line.data, s->line.len, now_ns, err);
        kvd_sbuf_reset(&s->line);
        if (rc < 0)
            return rc;
    }
    return s->has_data ? dispatch(s, now_ns, err) : 0;
}
