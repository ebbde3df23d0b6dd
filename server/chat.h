/* chat.h - chat requests as the model was trained: its own chat template, tools, and
 * token ids that user text cannot forge.
 *
 * The template is the checkpoint's (tokenizer_config.json's chat_template, a string
 * or the named-list form; a GGUF's tokenizer.chat_template) or --chat-template FILE;
 * a model without one gets the built-in fallback, Qwen2.5-Instruct's template (ChatML
 * with the default Qwen system turn and Hermes-style tools), which is what kvd
 * rendered for every model before templates. It is parsed once at load
 * (kvd_chat_template_load) and rendered per request with src/template (Jinja as Hugging
 * Face's apply_chat_template runs it).
 *
 * Messages are checked and normalised before rendering, as vLLM does: content may be
 * a string, null (an assistant turn that only calls tools) or an array of
 * {"type": "text", "text": ...} parts joined with "\n"; other part types are refused
 * because the model reads only text; an assistant's tool_calls[].function.arguments
 * given as a JSON string (OpenAI's shape) is handed to the template as the object it
 * encodes, which is what chat templates expect.
 *
 * Encoding: the renderer knows which output bytes came from the template's own text.
 * Special tokens are matched only there (kvd_chat_encode); text a user (or a tool, or
 * an earlier model turn) wrote stays plain text, so "<|im_start|>" inside a message
 * cannot open a turn. Everything else is encoded as Hugging Face encodes it.
 *
 * Threading: a kvd_chat_template is immutable after load and shared by every request;
 * render and encode on libuv workers (jobs.c), any number at once.
 */
#ifndef KVD_SERVER_CHAT_H
#define KVD_SERVER_CHAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "kvd/kvd_error.h"
#include "kvd/kvd_template.h"
#include "kvd/kvd_tokenizer.h"
#include "util.h"

#define KVD_CHAT_DEFAULT_SYSTEM "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

typedef struct kvd_chat_template kvd_chat_template;

/* Picks and parses the template: override_path (--chat-template; "" or NULL: none)
 * first, then gguf_template (the model's, may be NULL), then model_dir's
 * tokenizer_config.json, else the built-in fallback. A template that does not parse is
 * an error naming its source and line (the daemon refuses to start). */
kvd_chat_template *kvd_chat_template_load(const char *override_path, const char *gguf_template,
                                          const char *model_dir, kvd_error *err);
/* The template of a tokenizer_config.json's text (its chat_template: a string or the
 * named-list form; bos_token/eos_token kept); NULL with err->code 0 when it has none.
 * path names it in messages. */
kvd_chat_template *kvd_chat_template_from_tokenizer_config(const char *text, size_t len, const char *path,
                                                           kvd_error *err);
/* t takes from's bos_token/eos_token (a --chat-template file keeps the model's). */
void kvd_chat_template_adopt_specials(kvd_chat_template *t, kvd_chat_template *from);
/* A template from its source text (origin names it in messages and the banner). */
kvd_chat_template *kvd_chat_template_from_source(const char *source, size_t len, const char *origin,
                                                 kvd_error *err);
/* The built-in fallback (Qwen2.5-Instruct's template). */
kvd_chat_template *kvd_chat_template_builtin(kvd_error *err);
void kvd_chat_template_destroy(kvd_chat_template *t);
/* "tokenizer_config.json", "--chat-template PATH", "GGUF tokenizer.chat_template", or
 * the fallback's description. */
const char *kvd_chat_template_origin(const kvd_chat_template *t);
bool kvd_chat_template_is_fallback(const kvd_chat_template *t);
/* The built-in template's source (tests compare it with Qwen2.5's file). */
const char *kvd_chat_template_builtin_source(void);

typedef enum kvd_tool_choice {
    KVD_TOOL_CHOICE_AUTO = 0, /* the default when tools are given */
    KVD_TOOL_CHOICE_NONE,     /* tools are not rendered and calls are not parsed */
    KVD_TOOL_CHOICE_REQUIRED, /* the answer is one call of some offered function (grammar-forced) */
    KVD_TOOL_CHOICE_NAMED,    /* the answer is one call of kvd_chat_tools.forced_name */
} kvd_tool_choice;

/* The request's tools after validation (borrowed from the request body). */
typedef struct kvd_chat_tools {
    const cJSON *tools;          /* the array, or NULL when absent/empty */
    kvd_tool_choice choice;
    const char *forced_name;     /* KVD_TOOL_CHOICE_NAMED: the function (borrowed) */
    bool parallel;               /* parallel_tool_calls (default true) */
} kvd_chat_tools;

/* Validates "tools", "tool_choice" and "parallel_tool_calls" of a chat body. Returns 0,
 * or KVD_EINVAL naming the field in param ("tools[1].function.parameters"). tool_choice
 * "required" and a named function need tools; the caller forces the call with a grammar
 * (kvd_chat_forced_call_schema). */
int kvd_chat_parse_tools(const cJSON *body, kvd_chat_tools *out, char *param, size_t param_cap, kvd_error *err);

/* The JSON Schema a forced call's body must match (the Hermes <tool_call> JSON):
 * {"name": const, "arguments": that tool's parameters}, anyOf over the tools for
 * "required", the named one only otherwise. A malloc'ed string, or NULL (out of memory). */
char *kvd_chat_forced_call_schema(const kvd_chat_tools *tools);

/* What a forced call's assistant turn starts with (the tool-call reader is primed with it). */
#define KVD_CHAT_FORCED_CALL_PREFIX "<tool_call>\n"
#define KVD_CHAT_FORCED_CALL_SUFFIX "\n</tool_call>"

typedef struct kvd_chat_options {
    const cJSON *tools;            /* rendered when non-NULL */
    bool add_generation_prompt;    /* open the assistant's turn (default true) */
    bool continue_final_message;   /* a final assistant message is left open and continued (a
                                    * prefill); a conversation ending otherwise gets a new turn */
    const cJSON *template_kwargs;  /* chat_template_kwargs: extra template variables, or NULL */
} kvd_chat_options;

/* Reads add_generation_prompt, continue_final_message and chat_template_kwargs from a
 * body (absent: true, false, none); tools as kvd_chat_parse_tools decided. Returns 0 or
 * KVD_EINVAL naming the field. */
int kvd_chat_parse_options(const cJSON *body, const kvd_chat_tools *tools, kvd_chat_options *out, char *param,
                           size_t param_cap, kvd_error *err);

typedef struct kvd_chat_prompt {
    kvd_sbuf text;                /* the rendered conversation */
    kvd_template_span *data_spans; /* bytes that came from the request, not the template */
    size_t num_data_spans;
    char *continued;              /* the continued assistant message's text (the turn so far:
                                   * tool-call parsing starts from it), else NULL */
    size_t continued_len;
} kvd_chat_prompt;

void kvd_chat_prompt_init(kvd_chat_prompt *p);
void kvd_chat_prompt_deinit(kvd_chat_prompt *p);

/* Renders an OpenAI "messages" array into p (freshly initialised) with template t.
 * opts may be NULL (no tools, generation prompt on). Returns 0, or KVD_EINVAL with err
 * set and param (cap bytes) naming the offending field ("messages[1].content", or
 * "messages" when the template itself refuses the conversation); KVD_ETOOLONG when the
 * template exceeds its bounds; KVD_ENOMEM. */
int kvd_chat_render(const kvd_chat_template *t, const cJSON *messages, const kvd_chat_options *opts,
                    kvd_chat_prompt *p, char *param, size_t param_cap, kvd_error *err);

/* Token ids of a rendered prompt: special tokens matched only in the template's own
 * text, everything between them encoded as plain text. Returns the count and a
 * malloc'ed array in *ids, or a negative code with err set. */
int kvd_chat_encode(const kvd_chat_prompt *p, const kvd_tokenizer *tok, int32_t **ids, kvd_error *err);

#endif
