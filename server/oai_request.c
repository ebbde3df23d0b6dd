/* oai_request.c - field-by-field parsing of /v1/completions and /v1/chat/completions bodies.
 *
 * Ranges follow OpenAI's documented ones where OpenAI has them (temperature 0..2,
 * penalties -2..2, top_p in (0, 1]) and vLLM's for its extensions (top_k, min_p,
 * repetition_penalty, ignore_eos, stop_token_ids, skip_special_tokens). JSON numbers
 * arrive as doubles; integers must be integral and within range, so 1.5 tokens or
 * 1e300 are refused instead of truncated.
 */
#include "oai_request.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

void kvd_oai_request_init(kvd_oai_request *r)
{
    memset(r, 0, sizeof *r);
    kvd_chat_prompt_init(&r->chat);
}

void kvd_oai_request_deinit(kvd_oai_request *r)
{
    for (int i = 0; i < KVD_MAX_STOP_STRINGS; i++)
        free(r->stop_strings[i]);
    free(r->prompt_text);
    free(r->prompt_ids);
    kvd_chat_prompt_deinit(&r->chat);
    kvd_oai_request_init(r);
}

typedef struct parse_ctx {
    const cJSON *body;
    char *param;
    size_t param_cap;
    kvd_error *err;
} parse_ctx;

static int fail(parse_ctx *c, const char *name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(parse_ctx *c, const char *name, const char *fmt, ...)
{
    snprintf(c->param, c->param_cap, "%s", name);
    char message[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    return kvd_error_set(c->err, KVD_EINVAL, "%s: %s", name, message);
}

/* The field, or NULL when absent or null. */
static const cJSON *field(parse_ctx *c, const char *name)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(c->body, name);
    return item && !cJSON_IsNull(item) ? item : NULL;
}

static int get_bool(parse_ctx *c, const char *name, bool *out)
{
    const cJSON *item = field(c, name);
    if (!item)
        return 0;
    if (!cJSON_IsBool(item))
        return fail(c, name, "must be a boolean");
    *out = cJSON_IsTrue(item);
    return 0;
}

static int get_number(parse_ctx *c, const char *name, double min, double max, bool min_open, float *out)
{
    const cJSON *item = field(c, name);
    if (!item)
        return 0;
    if (!cJSON_IsNumber(item))
        return fail(c, name, "must be a number");
    double v = item->valuedouble;
    /* Checked again as the float the sampler gets: 1e-94 is above 0 as a double but
     * rounds to 0 as a float. */
    float f = (float)v;
    if (!isfinite(v) || v > max || v < min || (min_open && (v <= min || f <= (float)min))) {
        return fail(c, name, "must be a number in %s%g, %g]", min_open ? "(" : "[", min, max);
    }
    *out = f;
    return 0;
}

static int check_integer(parse_ctx *c, const char *name, const cJSON *item, long long min, long long max,
                         long long *out)
{
    if (!cJSON_IsNumber(item))
        return fail(c, name, "must be an integer");
    double v = item->valuedouble;
    if (!isfinite(v) || v != floor(v) || v < (double)min || v > (double)max) {
        return fail(c, name, "must be an integer in %lld..%lld", min, max);
    }
    *out = (long long)v;
    return 0;
}

static int get_int(parse_ctx *c, const char *name, long long min, long long max, bool *present,
                   long long *out)
{
    const cJSON *item = field(c, name);
    if (present)
        *present = item != NULL;
    if (!item)
        return 0;
    return check_integer(c, name, item, min, max, out);
}

static int parse_stop(parse_ctx *c, kvd_oai_request *r)
{
    const cJSON *stop = field(c, "stop");
    if (!stop)
        return 0;
    const cJSON *items[KVD_MAX_STOP_STRINGS];
    int count = 0;
    if (cJSON_IsString(stop)) {
        items[count++] = stop;
    } else if (cJSON_IsArray(stop)) {
        if (cJSON_GetArraySize(stop) > KVD_MAX_STOP_STRINGS) {
            return fail(c, "stop", "at most %d stop strings", KVD_MAX_STOP_STRINGS);
        }
        const cJSON *item;
        cJSON_ArrayForEach(item, stop) {
            if (!cJSON_IsString(item))
                return fail(c, "stop", "must be a string or an array of strings");
            items[count++] = item;
        }
    } else {
        return fail(c, "stop", "must be a string or an array of strings");
    }
    for (int i = 0; i < count; i++) {
        size_t len = strlen(items[i]->valuestring);
        if (len == 0)
            return fail(c, "stop", "stop strings must not be empty");
        if (len > KVD_OAI_MAX_STOP_BYTES) {
            return fail(c, "stop", "each stop string is at most %d bytes", KVD_OAI_MAX_STOP_BYTES);
        }
        r->stop_strings[i] = strdup(items[i]->valuestring);
        if (!r->stop_strings[i])
            return kvd_error_set(c->err, KVD_ENOMEM, "out of memory");
    }
    r->params.stop = (const char *const *)r->stop_strings;
    r->params.num_stop = count;
    return 0;
}

static int add_stop_id(parse_ctx *c, kvd_oai_request *r, int32_t id)
{
    for (int i = 0; i < r->params.num_stop_token_ids; i++)
        if (r->stop_token_ids[i] == id)
            return 0;
    if (r->params.num_stop_token_ids >= KVD_MAX_STOP_TOKEN_IDS) {
        return fail(c, "stop_token_ids", "at most %d ids", KVD_MAX_STOP_TOKEN_IDS);
    }
    r->stop_token_ids[r->params.num_stop_token_ids++] = id;
    r->params.stop_token_ids = r->stop_token_ids;
    return 0;
}

static int parse_stop_token_ids(parse_ctx *c, kvd_oai_request *r, const kvd_oai_model_info *info)
{
    const cJSON *ids = field(c, "stop_token_ids");
    if (!ids)
        return 0;
    if (!cJSON_IsArray(ids))
        return fail(c, "stop_token_ids", "must be an array of token ids");
    const cJSON *item;
    cJSON_ArrayForEach(item, ids) {
        long long id = 0;
        int rc = check_integer(c, "stop_token_ids", item, 0, info->vocab_size - 1, &id);
        if (rc)
            return rc;
        rc = add_stop_id(c, r, (int32_t)id);
        if (rc)
            return rc;
    }
    return 0;
}

/* Reads an array of token ids into a malloc'ed array. */
static int parse_ids(parse_ctx *c, const char *name, const cJSON *array, const kvd_oai_model_info *info,
                     int32_t **out, int *count)
{
    int n = cJSON_GetArraySize(array);
    int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
    if (!ids)
        return kvd_error_set(c->err, KVD_ENOMEM, "out of memory");
    int i = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, array) {
        long long id = 0;
        int rc = check_integer(c, name, item, 0, info->vocab_size - 1, &id);
        if (rc) {
            free(ids);
            return rc;
        }
        ids[i++] = (int32_t)id;
    }
    *out = ids;
    *count = n;
    return 0;
}

static int parse_prompt(parse_ctx *c, kvd_oai_request *r, const kvd_oai_model_info *info)
{
    const cJSON *prompt = field(c, "prompt");
    if (!prompt)
        return fail(c, "prompt", "is required");
    if (cJSON_IsArray(prompt)) {
        int n = cJSON_GetArraySize(prompt);
        const cJSON *first = cJSON_GetArrayItem(prompt, 0);
        if (n == 0)
            return fail(c, "prompt", "must not be empty");
        if (cJSON_IsNumber(first))
            return parse_ids(c, "prompt", prompt, info, &r->prompt_ids, &r->num_prompt_ids);
        if (n > 1 && (cJSON_IsString(first) || cJSON_IsArray(first)))
            return fail(c, "prompt",
                        "batch prompts (a list of several prompts) are not supported; send one request per prompt");
        if (cJSON_IsArray(first))
            return parse_ids(c, "prompt", first, info, &r->prompt_ids, &r->num_prompt_ids);
        prompt = first;
    }
    if (!cJSON_IsString(prompt))
        return fail(c, "prompt", "must be a string, an array of token ids, or a list holding one of them");
    r->prompt_len = strlen(prompt->valuestring);
    r->prompt_text = strdup(prompt->valuestring);
    if (!r->prompt_text)
        return kvd_error_set(c->err, KVD_ENOMEM, "out of memory");
    return 0;
}

static int refuse_unsupported(parse_ctx *c)
{
    bool echo = false;
    int rc = get_bool(c, "echo", &echo);
    if (rc)
        return rc;
    if (echo)
        return fail(c, "echo", "echo is not supported");
    const cJSON *best_of = field(c, "best_of");
    if (best_of && !(cJSON_IsNumber(best_of) && best_of->valuedouble == 1.0) &&
        !(cJSON_IsNumber(best_of) && cJSON_IsNumber(field(c, "n")) &&
          best_of->valuedouble == field(c, "n")->valuedouble))
        return fail(c, "best_of", "best_of other than n is not supported");
    const cJSON *bias = field(c, "logit_bias");
    if (bias && !(cJSON_IsObject(bias) && bias->child == NULL))
        return fail(c, "logit_bias", "logit_bias is not supported");
    const cJSON *format = field(c, "response_format");
    if (format) {
        const cJSON *type = cJSON_IsObject(format) ? cJSON_GetObjectItemCaseSensitive(format, "type") : NULL;
        if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") != 0)
            return fail(c, "response_format", "only {\"type\": \"text\"} is supported");
    }
    const cJSON *model = field(c, "model");
    if (model && !cJSON_IsString(model))
        return fail(c, "model", "must be a string");
    const cJSON *user = field(c, "user");
    if (user && !cJSON_IsString(user))
        return fail(c, "user", "must be a string");
    return 0;
}

static int parse_logprobs(parse_ctx *c, kvd_oai_request *r, kvd_oai_route route)
{
    long long value = 0;
    bool present = false;
    int rc;
    if (route == KVD_OAI_COMPLETIONS) {
        rc = get_int(c, "logprobs", 0, KVD_MAX_TOP_LOGPROBS, &present, &value);
        if (rc)
            return rc;
        r->logprobs = present;
        r->top_logprobs = (int)value;
    } else {
        rc = get_bool(c, "logprobs", &r->logprobs);
        if (rc)
            return rc;
        rc = get_int(c, "top_logprobs", 0, KVD_MAX_TOP_LOGPROBS, &present, &value);
        if (rc)
            return rc;
        if (present && value > 0 && !r->logprobs)
            return fail(c, "top_logprobs", "requires \"logprobs\": true");
        r->top_logprobs = (int)value;
    }
    r->params.sampling.logprobs = r->logprobs ? r->top_logprobs : -1;
    return 0;
}

static int parse_sampling(parse_ctx *c, kvd_oai_request *r, const kvd_oai_model_info *info)
{
    kvd_sampling_params *s = &r->params.sampling;
    int rc;
    if ((rc = get_number(c, "temperature", 0.0, 2.0, false, &s->temperature)) ||
        (rc = get_number(c, "top_p", 0.0, 1.0, true, &s->top_p)) ||
        (rc = get_number(c, "min_p", 0.0, 1.0, false, &s->min_p)) ||
        (rc = get_number(c, "presence_penalty", -2.0, 2.0, false, &s->presence_penalty)) ||
        (rc = get_number(c, "frequency_penalty", -2.0, 2.0, false, &s->frequency_penalty)) ||
        (rc = get_number(c, "repetition_penalty", 0.0, 10.0, true, &s->repetition_penalty)))
        return rc;
    long long top_k = 0;
    bool present;
    if ((rc = get_int(c, "top_k", -1, info->vocab_size, &present, &top_k)))
        return rc;
    if (present)
        s->top_k = top_k < 0 ? 0 : (int)top_k;
    long long seed = 0;
    /* Negative seeds are accepted as OpenAI does and reinterpreted as unsigned. */
    if ((rc = get_int(c, "seed", -9007199254740992LL, 9007199254740992LL, &r->seed_given, &seed)))
        return rc;
    if (r->seed_given)
        s->seed = (uint64_t)seed;
    return 0;
}

/* messages (+ tools, tool_choice, add_generation_prompt, continue_final_message,
 * chat_template_kwargs) through the model's chat template. */
static int render_chat(parse_ctx *c, kvd_oai_request *r, const kvd_oai_model_info *info)
{
    const cJSON *messages = field(c, "messages");
    if (!messages)
        return fail(c, "messages", "is required");
    if (!info || !info->chat_template)
        return kvd_error_set(c->err, KVD_ESTATE, "no chat template is loaded");
    kvd_chat_tools tools;
    kvd_chat_options opts;
    int rc = kvd_chat_parse_tools(c->body, &tools, c->param, c->param_cap, c->err);
    if (rc == 0)
        rc = kvd_chat_parse_options(c->body, &tools, &opts, c->param, c->param_cap, c->err);
    if (rc == 0)
        rc = kvd_chat_render(info->chat_template, messages, &opts, &r->chat, c->param, c->param_cap, c->err);
    if (rc == 0) {
        r->tool_calls = tools.tools != NULL;
        r->parallel_tool_calls = tools.parallel;
    }
    return rc;
}

int kvd_oai_parse(kvd_oai_request *r, kvd_oai_route route, const cJSON *body,
                  const kvd_request_params *defaults, const kvd_oai_model_info *info, char *param,
                  size_t param_cap, kvd_error *err)
{
    parse_ctx c = {body, param, param_cap, err};
    param[0] = '\0';
    r->route = route;
    r->params = *defaults;
    r->params.stop = NULL;
    r->params.num_stop = 0;
    r->params.stop_token_ids = NULL;
    r->params.num_stop_token_ids = 0;
    r->params.n = 1;
    r->params.sampling.logprobs = -1;
    if (!cJSON_IsObject(body))
        return kvd_error_set(err, KVD_EINVAL, "request body must be a JSON object");
    int rc;
    if ((rc = refuse_unsupported(&c)))
        return rc;

    /* max_completion_tokens is the newer name; it wins when both are given. */
    long long max_tokens = 0;
    bool have_max = false, have_new = false;
    if ((rc = get_int(&c, "max_tokens", 1, info->max_model_len, &have_max, &max_tokens)))
        return rc;
    long long newer = 0;
    if ((rc = get_int(&c, "max_completion_tokens", 1, info->max_model_len, &have_new, &newer)))
        return rc;
    if (have_new)
        max_tokens = newer;
    if (have_max || have_new)
        r->params.max_tokens = (int)max_tokens;
    else if (route == KVD_OAI_CHAT)
        r->params.max_tokens = info->max_model_len; /* the rest of the context, as vLLM and OpenAI chat */
    else
        r->params.max_tokens = 16; /* OpenAI's completions default */

    long long n = 1;
    if ((rc = get_int(&c, "n", 1, KVD_MAX_N, NULL, &n)))
        return rc;
    r->params.n = (int)n;
    if ((rc = parse_sampling(&c, r, info)) || (rc = parse_logprobs(&c, r, route)) ||
        (rc = parse_stop(&c, r)) || (rc = parse_stop_token_ids(&c, r, info)))
        return rc;
    if ((rc = get_bool(&c, "ignore_eos", &r->params.ignore_eos)) ||
        (rc = get_bool(&c, "skip_special_tokens", &r->params.skip_special_tokens)) ||
        (rc = get_bool(&c, "stream", &r->stream)) ||
        (rc = get_bool(&c, "return_tokens_as_token_ids", &r->tokens_as_ids)))
        return rc;

    const cJSON *options = field(&c, "stream_options");
    if (options) {
        if (!cJSON_IsObject(options))
            return fail(&c, "stream_options", "must be an object");
        if (!r->stream)
            return fail(&c, "stream_options", "only allowed when \"stream\" is true");
        const cJSON *usage = cJSON_GetObjectItemCaseSensitive(options, "include_usage");
        if (usage && !cJSON_IsNull(usage)) {
            if (!cJSON_IsBool(usage))
                return fail(&c, "stream_options.include_usage", "must be a boolean");
            r->include_usage = cJSON_IsTrue(usage);
        }
    }

    if (route == KVD_OAI_COMPLETIONS)
        return parse_prompt(&c, r, info);

    if ((rc = render_chat(&c, r, info)) != 0)
        return rc;
    /* The assistant's turn ends at <|im_end|> (or <|endoftext|>) unless the client
     * asked to run on regardless. */
    if (!r->params.ignore_eos)
        for (int i = 0; i < info->num_chat_stop_ids; i++)
            if ((rc = add_stop_id(&c, r, info->chat_stop_ids[i])))
                return rc;
    return 0;
}

int kvd_oai_parse_tokenize(kvd_oai_request *r, const cJSON *body, const kvd_oai_model_info *info, char *param,
                           size_t param_cap, kvd_error *err)
{
    parse_ctx c = {body, param, param_cap, err};
    param[0] = '\0';
    const char *name = "prompt";
    const cJSON *prompt = field(&c, "prompt");
    if (!prompt) {
        name = "content";
        prompt = field(&c, "content");
    }
    if (prompt) {
        if (!cJSON_IsString(prompt))
            return fail(&c, name, "must be a string");
        r->prompt_len = strlen(prompt->valuestring);
        r->prompt_text = strdup(prompt->valuestring);
        return r->prompt_text ? 0 : kvd_error_set(err, KVD_ENOMEM, "out of memory");
    }
    if (!field(&c, "messages"))
        return fail(&c, "prompt", "is required (or \"content\", or \"messages\")");
    r->route = KVD_OAI_CHAT;
    return render_chat(&c, r, info);
}

int kvd_oai_parse_detokenize(const cJSON *body, const kvd_oai_model_info *info, int32_t **ids, int *count,
                             char *param, size_t param_cap, kvd_error *err)
{
    parse_ctx c = {body, param, param_cap, err};
    param[0] = '\0';
    const cJSON *tokens = field(&c, "tokens");
    if (!cJSON_IsArray(tokens))
        return fail(&c, "tokens", "must be an array of token ids");
    int n = cJSON_GetArraySize(tokens);
    int32_t *out = malloc(((size_t)n + 1) * sizeof *out);
    if (!out)
        return kvd_error_set(err, KVD_ENOMEM, "out of memory");
    int i = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, tokens) {
        double v = item->valuedouble;
        if (!cJSON_IsNumber(item) || v != (double)(int32_t)v || v < 0 || v >= info->vocab_size) {
            free(out);
            return fail(&c, "tokens", "item %d is not a token id in 0..%d", i, info->vocab_size - 1);
        }
        out[i++] = (int32_t)v;
    }
    *ids = out;
    *count = n;
    return 0;
}
