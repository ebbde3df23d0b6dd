/* tool_calls.h - the model's tool calls, parsed out of its text as it streams.
 *
 * Qwen-family templates teach the Hermes format: each call is
 *   <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>
 * The parser takes the answer's text in pieces (as the engine's events bring it) and
 * splits it into content and complete calls. A call is reported only once its closing
 * tag arrives and its JSON parses to {"name": non-empty string, "arguments": any
 * (object, or a string already holding JSON; "parameters" is accepted for it)}; a
 * block that does not parse, or that is still open when the answer ends, is content,
 * byte for byte, never dropped. Text that may be the start of "<tool_call>" is held
 * back until it is known not to be. Whitespace between calls and around them is
 * dropped; content elsewhere is passed on as it is. With parallel off, only the first
 * call is a call: later blocks stay content.
 * One parser per choice; loop thread.
 */
#ifndef KVD_SERVER_TOOL_CALLS_H
#define KVD_SERVER_TOOL_CALLS_H

#include <stdbool.h>
#include <stddef.h>

#include "kvd/kvd_buf.h"

typedef struct kvd_tool_call {
    char *name;
    char *arguments; /* JSON text */
} kvd_tool_call;

typedef struct kvd_tool_parser {
    kvd_sbuf pending;   /* text not yet classified */
    kvd_sbuf body;      /* inside an open <tool_call> */
    kvd_sbuf held_ws;   /* whitespace held until it is known to sit between content */
    bool in_call;
    bool after_call;    /* drop whitespace that follows a call */
    bool parallel;
    int num_calls;
} kvd_tool_parser;

/* What one feed produced: a content delta and the calls completed, in order. */
typedef struct kvd_tool_delta {
    kvd_sbuf content;
    kvd_tool_call *calls;
    int num_calls;
} kvd_tool_delta;

void kvd_tool_parser_init(kvd_tool_parser *p, bool parallel);
void kvd_tool_parser_deinit(kvd_tool_parser *p);
void kvd_tool_delta_init(kvd_tool_delta *d);
void kvd_tool_delta_deinit(kvd_tool_delta *d);

/* Feeds the turn's text so far (a continued assistant message) without reporting it:
 * its content is the client's already; a call it completes is reported (in d). */
int kvd_tool_parser_prime(kvd_tool_parser *p, const char *text, size_t len, kvd_tool_delta *d);
/* Feeds text (final: the answer ended; everything held back is resolved) and appends
 * what can be said to d. Returns 0 or KVD_ENOMEM. */
int kvd_tool_parser_feed(kvd_tool_parser *p, const char *text, size_t len, bool final, kvd_tool_delta *d);

#endif
