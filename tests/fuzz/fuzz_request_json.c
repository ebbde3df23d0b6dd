/* fuzz_request_json.c - libFuzzer target: request bodies of both completion routes.
 *
 * Each input is parsed as a JSON body (as the daemon does, cJSON_ParseWithLength) and
 * given to kvd_oai_parse for /v1/completions and for /v1/chat/completions, with the
 * served model described as Qwen2.5-0.5B-Instruct (context 32768, vocabulary 151936,
 * chat turns ending at <|im_end|> 151645 or <|endoftext|> 151643) and its generation
 * defaults. Checked, beyond ASan/UBSan and leaks:
 *   - a refusal is KVD_EINVAL or KVD_ENOMEM with a one-line message and a
 *     NUL-terminated param inside its buffer;
 *   - an accepted request is one the engine can take as it is: max_tokens in
 *     1..context, n in 1..KVD_MAX_N, sampling parameters passing
 *     kvd_sampling_params_check, at most KVD_MAX_STOP_STRINGS non-empty stop strings
 *     of at most KVD_OAI_MAX_STOP_BYTES, stop ids inside the vocabulary, logprobs
 *     consistent, stream_options only with stream, min_tokens <= max_tokens,
 *     logit_bias ids inside the vocabulary and distinct, echo only on completions
 *     without logprobs;
 *   - completions carry exactly one prompt: text, or ids inside the vocabulary;
 *   - chat prompts (the built-in template, Qwen2.5's) end with the generation prompt
 *     unless the body turned it off or continues the last message, their data spans
 *     are ordered and inside the text, and the turn's stop ids are added unless
 *     ignore_eos;
 *   - parsing the same body twice gives the same result.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "oai_request.h"

#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "fuzz_request_json: ERROR: check failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

#define CONTEXT 32768
#define VOCAB 151936
#define IM_START_TEXT "<|im_start|>"
#define IM_END_TEXT "<|im_end|>"
#define GENERATION_PROMPT IM_START_TEXT "assistant\n"

static kvd_request_params qwen_defaults(void)
{
    /* Qwen2.5-0.5B-Instruct's generation_config.json. */
    kvd_request_params p;
    memset(&p, 0, sizeof p);
    p.sampling = kvd_sampling_params_default();
    p.sampling.temperature = 0.7f;
    p.sampling.top_p = 0.8f;
    p.sampling.top_k = 20;
    p.sampling.repetition_penalty = 1.05f;
    p.max_tokens = 16;
    p.n = 1;
    p.skip_special_tokens = true;
    return p;
}

static bool has_stop_id(const kvd_oai_request *r, int32_t id)
{
    for (int i = 0; i < r->params.num_stop_token_ids; i++)
        if (r->params.stop_token_ids[i] == id)
            return true;
    return false;
}

static void check_chat(const kvd_oai_request *r, const kvd_oai_model_info *info, const cJSON *body)
{
    const kvd_chat_prompt *chat = &r->chat;
    const char *text = chat->text.data;
    size_t len = chat->text.len;
    CHECK(text && text[len] == '\0');
    const cJSON *agp = cJSON_GetObjectItemCaseSensitive(body, "add_generation_prompt");
    const cJSON *cont = cJSON_GetObjectItemCaseSensitive(body, "continue_final_message");
    if (!cJSON_IsFalse(agp) && !cJSON_IsTrue(cont)) {
        /* a forced tool call (tool_choice required/named) opens its block in the turn */
        size_t forced = r->forced_tool_call ? strlen(KVD_CHAT_FORCED_CALL_PREFIX) : 0;
        size_t gen = strlen(GENERATION_PROMPT);
        CHECK(len >= gen + forced && memcmp(text + len - forced - gen, GENERATION_PROMPT, gen) == 0);
        CHECK(!forced || memcmp(text + len - forced, KVD_CHAT_FORCED_CALL_PREFIX, forced) == 0);
        CHECK(!forced || (r->constrained && r->constraint_src && !strcmp(r->constraint_field, "tool_choice")));
    }
    size_t prev_end = 0;
    for (size_t i = 0; i < chat->num_data_spans; i++) {
        CHECK(chat->data_spans[i].len > 0 && chat->data_spans[i].offset >= prev_end);
        prev_end = chat->data_spans[i].offset + chat->data_spans[i].len;
        CHECK(prev_end <= len);
    }
    if (!r->params.ignore_eos)
        for (int i = 0; i < info->num_chat_stop_ids; i++)
            CHECK(has_stop_id(r, info->chat_stop_ids[i]));
    CHECK(r->prompt_text == NULL && r->prompt_ids == NULL);
}

static void check_accepted(const kvd_oai_request *r, kvd_oai_route route, const kvd_oai_model_info *info,
                           const cJSON *body)
{
    const kvd_request_params *p = &r->params;
    CHECK(r->route == route);
    CHECK(p->max_tokens >= 1 && p->max_tokens <= info->max_model_len);
    CHECK(p->n >= 1 && p->n <= KVD_MAX_N);
    kvd_error err = {0};
    if (kvd_sampling_params_check(&p->sampling, &err) != 0) {
        fprintf(stderr, "fuzz_request_json: ERROR: accepted params fail the sampler's check: %s\n", err.msg);
        abort();
    }
    CHECK(p->num_stop >= 0 && p->num_stop <= KVD_MAX_STOP_STRINGS);
    CHECK(p->num_stop == 0 || p->stop == (const char *const *)r->stop_strings);
    for (int i = 0; i < p->num_stop; i++) {
        size_t len = strlen(p->stop[i]);
        CHECK(len >= 1 && len <= KVD_OAI_MAX_STOP_BYTES);
    }
    CHECK(p->num_stop_token_ids >= 0 && p->num_stop_token_ids <= KVD_MAX_STOP_TOKEN_IDS);
    for (int i = 0; i < p->num_stop_token_ids; i++)
        CHECK(p->stop_token_ids[i] >= 0 && p->stop_token_ids[i] < info->vocab_size);
    CHECK(r->top_logprobs >= 0 && r->top_logprobs <= KVD_MAX_TOP_LOGPROBS);
    CHECK(p->sampling.logprobs == (r->logprobs ? r->top_logprobs : -1));
    CHECK(!r->include_usage || r->stream);
    CHECK(!r->continuous_usage || r->include_usage);
    CHECK(!r->echo || (route == KVD_OAI_COMPLETIONS && !r->logprobs));
    CHECK(p->sampling.min_tokens >= 0 && p->sampling.min_tokens <= p->max_tokens);
    CHECK(p->sampling.num_logit_bias >= 0 && p->sampling.num_logit_bias <= KVD_MAX_LOGIT_BIAS);
    for (int i = 0; i < p->sampling.num_logit_bias; i++) {
        CHECK(p->sampling.logit_bias[i].token >= 0 && p->sampling.logit_bias[i].token < info->vocab_size);
        CHECK(p->sampling.logit_bias[i].bias >= -100.0f && p->sampling.logit_bias[i].bias <= 100.0f);
        for (int j = 0; j < i; j++)
            CHECK(p->sampling.logit_bias[j].token != p->sampling.logit_bias[i].token);
    }
    if (route == KVD_OAI_CHAT) {
        check_chat(r, info, body);
        return;
    }
    /* Completions: exactly one prompt. {"prompt": [[]]} passes with no ids: the route
     * refuses an empty prompt after parsing (400 "prompt: must not be empty"). */
    CHECK((r->prompt_text != NULL) != (r->prompt_ids != NULL));
    if (r->prompt_text) {
        CHECK(r->prompt_len == strlen(r->prompt_text));
    } else {
        CHECK(r->num_prompt_ids >= 0);
        for (int i = 0; i < r->num_prompt_ids; i++)
            CHECK(r->prompt_ids[i] >= 0 && r->prompt_ids[i] < info->vocab_size);
    }
    CHECK(r->chat.text.len == 0);
}

/* The sampling fields by value: logit_bias is a pointer to each parse's own copy. */
static bool same_sampling(const kvd_sampling_params *a, const kvd_sampling_params *b)
{
    kvd_sampling_params x = *a, y = *b;
    x.logit_bias = y.logit_bias = NULL;
    if (memcmp(&x, &y, sizeof x) != 0)
        return false;
    return a->num_logit_bias == 0 ||
           memcmp(a->logit_bias, b->logit_bias, (size_t)a->num_logit_bias * sizeof a->logit_bias[0]) == 0;
}

static bool same_result(const kvd_oai_request *a, const kvd_oai_request *b)
{
    if (a->params.max_tokens != b->params.max_tokens || a->params.n != b->params.n ||
        !same_sampling(&a->params.sampling, &b->params.sampling) ||
        a->params.num_stop != b->params.num_stop || a->params.num_stop_token_ids != b->params.num_stop_token_ids ||
        a->stream != b->stream || a->num_prompt_ids != b->num_prompt_ids || a->prompt_len != b->prompt_len ||
        a->chat.text.len != b->chat.text.len)
        return false;
    if (a->chat.text.len && memcmp(a->chat.text.data, b->chat.text.data, a->chat.text.len) != 0)
        return false;
    if (a->num_prompt_ids &&
        memcmp(a->prompt_ids, b->prompt_ids, (size_t)a->num_prompt_ids * sizeof a->prompt_ids[0]) != 0)
        return false;
    return true;
}

static void parse_route(const cJSON *body, kvd_oai_route route, const kvd_request_params *defaults,
                        const kvd_oai_model_info *info)
{
    kvd_oai_request r, again;
    kvd_oai_request_init(&r);
    kvd_oai_request_init(&again);
    char param[128];
    memset(param, 'x', sizeof param);
    kvd_error err = {0};
    int rc = kvd_oai_parse(&r, route, body, defaults, info, param, sizeof param, &err);
    CHECK(memchr(param, '\0', sizeof param) != NULL);
    if (rc != 0) {
        CHECK(rc == KVD_EINVAL || rc == KVD_ENOMEM || rc == KVD_ETOOLONG);
        CHECK(err.code == rc && err.msg[0] != '\0' && strchr(err.msg, '\n') == NULL);
    } else {
        check_accepted(&r, route, info, body);
    }
    char param2[128];
    kvd_error err2 = {0};
    int rc2 = kvd_oai_parse(&again, route, body, defaults, info, param2, sizeof param2, &err2);
    CHECK(rc2 == rc);
    if (rc == 0)
        CHECK(same_result(&r, &again));
    else
        CHECK(strcmp(param, param2) == 0 && strcmp(err.msg, err2.msg) == 0);
    kvd_oai_request_deinit(&again);
    kvd_oai_request_deinit(&r);
}

/* The built-in chat template, parsed once: libFuzzer's entry points take no context. */
static kvd_chat_template *fuzz_template;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    kvd_error err = {0};
    fuzz_template = kvd_chat_template_builtin(&err);
    if (!fuzz_template) {
        fprintf(stderr, "fuzz_request_json: %s\n", err.msg);
        exit(1);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cJSON *body = cJSON_ParseWithLength((const char *)data, size);
    if (!body)
        return 0; /* the route answers 400 invalid_json before the parser runs */
    kvd_oai_model_info info = {
        .max_model_len = CONTEXT,
        .vocab_size = VOCAB,
        .chat_stop_ids = {151645, 151643},
        .num_chat_stop_ids = 2,
        .chat_template = fuzz_template,
    };
    kvd_request_params defaults = qwen_defaults();
    parse_route(body, KVD_OAI_COMPLETIONS, &defaults, &info);
    parse_route(body, KVD_OAI_CHAT, &defaults, &info);
    cJSON_Delete(body);
    return 0;
}
