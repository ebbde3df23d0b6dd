/* oai_request.h - request bodies (completions, chat, tokenize, detokenize) -> request
 * structs, with OpenAI-style field errors.
 *
 * Parsing is separate from the routes so every field rule can be tested without a
 * model or a socket. A field the route does not read, a known field with the wrong
 * type or an out-of-range value fails with the field's name in `param` (as OpenAI's
 * error.param does); null means "absent" for every optional field. Fields that would
 * silently change what a client expects but are not implemented (suffix,
 * prompt_logprobs, echo with logprobs, best_of > n, batch prompts, other servers'
 * extensions) are refused, never ignored. docs/api.md lists
 * every field with honored / refused.
 */
#ifndef KVD_SERVER_OAI_REQUEST_H
#define KVD_SERVER_OAI_REQUEST_H

#include <stdbool.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "chat.h"
#include "kvd/kvd_engine.h"
#include "kvd/kvd_grammar.h"

#define KVD_OAI_MAX_STOP_BYTES 256
/* stop_token_ids a client may list; a chat's turn-ending ids come on top. */
#define KVD_OAI_MAX_STOP_TOKEN_IDS 64
#define KVD_OAI_MAX_CHAT_STOP_IDS 4

typedef enum kvd_oai_route {
    KVD_OAI_COMPLETIONS,
    KVD_OAI_CHAT,
} kvd_oai_route;

/* What the parser needs to know about the served model. */
typedef struct kvd_oai_model_info {
    int max_model_len;             /* context length */
    int vocab_size;                /* token ids must be below this */
    int32_t chat_stop_ids[KVD_OAI_MAX_CHAT_STOP_IDS]; /* ids that end an assistant turn (<|im_end|>, <|endoftext|>) */
    int num_chat_stop_ids;
    const kvd_chat_template *chat_template; /* the served model's (chat.h) */
} kvd_oai_model_info;

typedef struct kvd_oai_request {
    kvd_oai_route route;
    kvd_request_params params;     /* stop/stop_token_ids point into the fields below */
    char *stop_strings[KVD_MAX_STOP_STRINGS];
    int32_t stop_token_ids[KVD_OAI_MAX_STOP_TOKEN_IDS + KVD_OAI_MAX_CHAT_STOP_IDS];
    bool stream;
    bool include_usage;            /* stream_options.include_usage */
    bool logprobs;                 /* report logprobs of sampled tokens */
    int top_logprobs;              /* alternatives per token when logprobs */
    bool seed_given;               /* otherwise (absent, or -1) the caller draws a seed */
    bool continuous_usage;         /* stream_options.continuous_usage_stats: usage in every chunk */
    bool echo;                     /* completions: the prompt's text leads every choice's text */
    kvd_logit_bias *logit_bias;    /* (params.sampling.num_logit_bias) */
    bool tokens_as_ids;            /* vLLM's return_tokens_as_token_ids: logprob tokens as "token_id:N" */
    /* completions: the prompt as text (prompt_ids NULL) or as ids */
    char *prompt_text;
    size_t prompt_len;
    int32_t *prompt_ids;
    int num_prompt_ids;
    /* chat: the rendered conversation */
    kvd_chat_prompt chat;
    bool tool_calls;               /* tools were rendered: parse the model's calls */
    bool parallel_tool_calls;      /* more than one call per answer allowed */
    bool forced_tool_call;         /* tool_choice required/named: the turn was primed with
                                    * "<tool_call>\n" and a grammar forces the call's JSON */
    /* Structured output (response_format, guided_*, structured_outputs, llama-server's
     * json_schema and grammar): compiled on a worker from this source, see jobs.c. */
    bool constrained;
    kvd_grammar_kind constraint_kind;
    char *constraint_src;          /* a schema's JSON text, a regex, GBNF, or NUL-ended choices */
    size_t constraint_len;
    char constraint_field[96];     /* the request field it came from (an error's param) */
} kvd_oai_request;

void kvd_oai_request_init(kvd_oai_request *r);
void kvd_oai_request_deinit(kvd_oai_request *r);

/* Parses body for route into r (freshly initialised) starting from defaults (the
 * model's generation defaults). Returns 0, or KVD_EINVAL with param naming the field
 * (param_cap bytes; "" when the body as a whole is wrong) and err holding the
 * message; KVD_ENOMEM. r must be deinitialised either way. */
int kvd_oai_parse(kvd_oai_request *r, kvd_oai_route route, const cJSON *body,
                  const kvd_request_params *defaults, const kvd_oai_model_info *info, char *param,
                  size_t param_cap, kvd_error *err);

/* POST /tokenize: "prompt" (or "content") as text, or "messages" (with tools and the
 * template options) rendered as chat (r->route is then KVD_OAI_CHAT). POST
 * /apply-template: the same, messages required. Same returns as kvd_oai_parse. */
int kvd_oai_parse_tokenize(kvd_oai_request *r, const cJSON *body, const kvd_oai_model_info *info, char *param,
                           size_t param_cap, kvd_error *err);
/* True when the JSON text holds a NUL character (a \u0000 escape) in some string, with
 * the top-level field holding it in field_name (cap bytes). cJSON strings end at the
 * first NUL, so such a prompt, message or stop string would be cut without a word:
 * the body parse (jobs.c, on a worker) refuses the body instead. json must already
 * have parsed as an object. */
bool kvd_oai_find_nul(const char *json, size_t len, char *field_name, size_t cap);

/* POST /detokenize: "tokens", ids below info->vocab_size, into a malloc'ed array. */
int kvd_oai_parse_detokenize(const cJSON *body, const kvd_oai_model_info *info, int32_t **ids, int *count,
                             char *param, size_t param_cap, kvd_error *err);

#endif
