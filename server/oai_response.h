/* oai_response.h - OpenAI response bodies: whole responses, stream chunks, logprobs in
 * both of OpenAI's shapes, usage, and the one error shape every route answers with.
 *
 * Nothing here knows about connections or jobs: it turns engine events into bytes.
 * A whole (non-streamed) response keeps, per choice, its text and its tokens' raw
 * logprobs while it grows (kvd_oai_choice_add, loop thread: a copy of each event's
 * few tokens, no formatting); kvd_oai_choice_format and kvd_oai_whole_body, on a
 * worker, print the logprobs as JSON text and concatenate, so the loop never formats
 * or copies anything that grows with the answer, and never holds a document tree of
 * it. kvd_oai_choice_bytes says what a choice will add to the body (raw logprobs
 * counted at the per-entry estimates below until they are formatted). Streamed
 * responses are one SSE event per engine event (loop thread). Error bodies are
 *   {"error": {"message", "type", "param", "code"}}
 * with type derived from the status, param and code strings or null.
 */
#ifndef KVD_SERVER_OAI_RESPONSE_H
#define KVD_SERVER_OAI_RESPONSE_H

#include <stdbool.h>
#include <stddef.h>

#include <cjson/cJSON.h>

#include "kvd/kvd_buf.h"
#include "kvd/kvd_engine.h"
#include "kvd/kvd_tokenizer.h"
#include "tool_calls.h"

/* What one logprob entry (the sampled token or one alternative) prints as, a little
 * above the average: chat entries came to 81-83 bytes (n=16 x 4000 x 21 entries made
 * a 109 MB body), completions' (items of three parallel arrays and a map) to under 32.
 * Used to refuse a whole response before any work and to count raw logprobs held. */
#define KVD_OAI_CHAT_LOGPROB_ENTRY_BYTES 88
#define KVD_OAI_COMPLETION_LOGPROB_ENTRY_BYTES 32

/* What every part of one response shares. */
typedef struct kvd_oai_response {
    const char *id;            /* "chatcmpl-..." / "cmpl-..." */
    long long created;         /* unix seconds */
    const char *model;         /* the served model name */
    bool chat;                 /* chat.completion(.chunk) vs text_completion */
    bool logprobs;             /* report logprobs of sampled tokens */
    int top_logprobs;          /* alternatives per token */
    bool tokens_as_ids;        /* logprob tokens as "token_id:N" */
    bool include_usage;        /* streams: a usage chunk before [DONE] */
    bool continuous_usage;     /* streams: usage (the choice's tokens so far) in every chunk too */
    const kvd_tokenizer *tok;  /* token texts for logprobs */
} kvd_oai_response;

typedef struct kvd_oai_usage {
    int prompt_tokens;
    int completion_tokens;
    int cached_tokens;
} kvd_oai_usage;

/* One choice of a whole response: text and raw logprobs while it grows, JSON text
 * fragments once formatted. */
typedef struct kvd_oai_choice {
    kvd_sbuf text;          /* the raw text so far */
    kvd_sbuf raw_lp;        /* kvd_token_logprob of the tokens so far, not formatted yet */
    size_t raw_lp_estimate; /* what they will print as (the entry estimates above) */
    kvd_sbuf lp_entries;    /* chat: content entries; completions: "tokens" items (comma-separated) */
    kvd_sbuf lp_values;     /* completions: token_logprobs items */
    kvd_sbuf lp_top;        /* completions: top_logprobs items */
    kvd_sbuf lp_offsets;    /* completions: text_offset items */
    size_t text_offset;     /* completions: text_offset of the next token */
    kvd_finish_reason finish;
    kvd_sbuf tool_calls;    /* chat with tools: the calls' JSON objects (comma-separated) */
    int num_tool_calls;
} kvd_oai_choice;

void kvd_oai_choice_init(kvd_oai_choice *ch);
void kvd_oai_choice_deinit(kvd_oai_choice *ch);
/* Appends one event's text (and its tokens' raw logprobs when asked for). Returns 0 or
 * KVD_ENOMEM. Loop thread: cost of the event's size only. */
int kvd_oai_choice_add(const kvd_oai_response *r, kvd_oai_choice *ch, const kvd_event *ev);
/* Prints the raw logprobs as the response's JSON fragments and frees them. Any thread
 * (the choice is its caller's alone; the tokenizer is only read). Returns 0 or
 * KVD_ENOMEM. */
int kvd_oai_choice_format(const kvd_oai_response *r, kvd_oai_choice *ch);
/* Appends the model's tool calls (chat with tools): message.tool_calls gets them, with
 * ids kvd_oai_tool_call_id makes; a choice with calls has content null when it has no
 * other text, and finish_reason "tool_calls" when the model stopped by itself. */
int kvd_oai_choice_add_calls(const kvd_oai_response *r, kvd_oai_choice *ch, int choice_index,
                             const kvd_tool_call *calls, int num_calls);
/* "call_" + the response id's random part + choice and call index: unique per call. */
void kvd_oai_tool_call_id(const kvd_oai_response *r, int choice_index, int call_index, char *out, size_t cap);
/* What the choice adds to the body: its fragments' bytes, plus the estimate for raw
 * logprobs not formatted yet. */
size_t kvd_oai_choice_bytes(const kvd_oai_choice *ch);

/* The whole chat.completion / text_completion body (malloc'ed, *len bytes), or NULL
 * when out of memory. Empties the choices' buffers as it goes, so the peak is about
 * one body, not two. */
char *kvd_oai_whole_body(const kvd_oai_response *r, kvd_oai_choice *choices, int num_choices,
                         const kvd_oai_usage *usage, size_t *len);

/* SSE events ("data: {...}\n\n") appended to out; each returns 0 or KVD_ENOMEM. */
int kvd_oai_sse_role(const kvd_oai_response *r, int index, kvd_sbuf *out);
/* The event's text/logprobs chunk (if any), then its finish chunk or error event.
 * text_offset: the choice's completions text_offset, advanced. */
int kvd_oai_sse_event(const kvd_oai_response *r, size_t *text_offset, const kvd_event *ev, kvd_sbuf *out);
/* Tool calls as OpenAI streams them: per call one chunk with its index, id, type and
 * name (arguments ""), then one with the arguments. first_index: the choice's calls
 * before these. */
int kvd_oai_sse_tool_calls(const kvd_oai_response *r, int index, int first_index, const kvd_tool_call *calls,
                           int num_calls, kvd_sbuf *out);
/* A choice's last chunk with an explicit finish_reason ("tool_calls"). */
int kvd_oai_sse_finish(const kvd_oai_response *r, int index, const char *reason, kvd_sbuf *out);
/* include_usage's last chunk (nothing otherwise) and "data: [DONE]". */
int kvd_oai_sse_end(const kvd_oai_response *r, const kvd_oai_usage *usage, kvd_sbuf *out);

/* The error object (a new cJSON the caller deletes; NULL when out of memory). */
cJSON *kvd_oai_error_object(int status, const char *message, const char *param, const char *code);
/* The same as text (malloc'ed), or NULL when out of memory. */
char *kvd_oai_error_body(int status, const char *message, const char *param, const char *code, size_t *len);
/* OpenAI's error.type for an HTTP status. */
const char *kvd_oai_error_type(int status);

/* Appends s[0..len) as a JSON string (quotes included), byte sequences that are not
 * UTF-8 and NUL bytes replaced by U+FFFD, escaped as cJSON escapes. */
int kvd_json_append_string(kvd_sbuf *out, const char *s, size_t len);
/* A cJSON string of s[0..len) repaired the same way (NULL when out of memory). */
cJSON *kvd_json_sanitized_string(const char *s, size_t len);

#endif
