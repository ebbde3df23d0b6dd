/* oai_request.c - field-by-field parsing of /v1/completions and /v1/chat/completions bodies.
 *
 * Ranges follow OpenAI's documented ones where OpenAI has them (temperature 0..2,
 * penalties -2..2, top_p in (0, 1]) and vLLM's for its extensions (top_k, min_p,
 * repetition_penalty, ignore_eos, stop_token_ids, skip_special_tokens). JSON numbers
 * arrive as doubles; integers must be integral and within range, so 1.5 tokens or
 * 1e300 are refused instead of truncated.
 *
 * No field is ever silently ignored: each route reads a fixed list of fields
 * (known_fields below), and any other field, or a listed one kvd cannot honor
 * (suffix, prompt_logprobs, echo with logprobs, ...), is refused with 400 naming it.
 * Clients of other servers send tools, mirostat, guided_json and the like; running
 * without them would change the answer without saying so.
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
    free(r->logit_bias);
    free(r->prompt_text);
    free(r->prompt_ids);
    free(r->constraint_src);
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

/* The client's ids count against its 64; a chat's turn-ending ids come on top (the
 * array has room for them), so 64 client ids work in chat too. */
static int add_stop_id(parse_ctx *c, kvd_oai_request *r, int32_t id, bool from_client)
{
    for (int i = 0; i < r->params.num_stop_token_ids; i++)
        if (r->stop_token_ids[i] == id)
            return 0;
    if (from_client && r->params.num_stop_token_ids >= KVD_OAI_MAX_STOP_TOKEN_IDS)
        return fail(c, "stop_token_ids", "at most %d ids", KVD_OAI_MAX_STOP_TOKEN_IDS);
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
        rc = add_stop_id(c, r, (int32_t)id, true);
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

/* The fields each route reads (null counts as absent everywhere). A field the parser
 * reads must be listed here; `refusal` marks one kvd knows but does not implement. */
enum { ON_COMPLETIONS = 1, ON_CHAT = 2, ON_GENERATE = 3, ON_TOKENIZE = 4, ON_DETOKENIZE = 8, ON_ALL = 15 };

typedef struct known_field {
    const char *name;
    int routes;
    const char *refusal; /* NULL: honored */
} known_field;

static const known_field known_fields[] = {
    {"model", ON_ALL, NULL},
    {"prompt", ON_COMPLETIONS | ON_TOKENIZE, NULL},
    {"messages", ON_CHAT | ON_TOKENIZE, NULL},
    {"content", ON_TOKENIZE, NULL},
    {"add_generation_prompt", ON_CHAT | ON_TOKENIZE, NULL},
    {"continue_final_message", ON_CHAT | ON_TOKENIZE, NULL},
    {"chat_template_kwargs", ON_CHAT | ON_TOKENIZE, NULL},
    {"tools", ON_CHAT | ON_TOKENIZE, NULL},
    {"tool_choice", ON_CHAT | ON_TOKENIZE, NULL},
    {"parallel_tool_calls", ON_CHAT | ON_TOKENIZE, NULL},
    {"add_special_tokens", ON_TOKENIZE, NULL},
    {"tokens", ON_DETOKENIZE, NULL},
    {"max_tokens", ON_GENERATE, NULL},
    {"max_completion_tokens", ON_GENERATE, NULL},
    {"min_tokens", ON_GENERATE, NULL},
    {"n", ON_GENERATE, NULL},
    {"best_of", ON_GENERATE, NULL},
    {"temperature", ON_GENERATE, NULL},
    {"top_p", ON_GENERATE, NULL},
    {"top_k", ON_GENERATE, NULL},
    {"min_p", ON_GENERATE, NULL},
    {"presence_penalty", ON_GENERATE, NULL},
    {"frequency_penalty", ON_GENERATE, NULL},
    {"repetition_penalty", ON_GENERATE, NULL},
    {"logit_bias", ON_GENERATE, NULL},
    {"seed", ON_GENERATE, NULL},
    {"logprobs", ON_GENERATE, NULL},
    {"top_logprobs", ON_CHAT, NULL},
    {"stop", ON_GENERATE, NULL},
    {"stop_token_ids", ON_GENERATE, NULL},
    {"include_stop_str_in_output", ON_GENERATE, NULL},
    {"ignore_eos", ON_GENERATE, NULL},
    {"skip_special_tokens", ON_GENERATE, NULL},
    {"stream", ON_GENERATE, NULL},
    {"stream_options", ON_GENERATE, NULL},
    {"return_tokens_as_token_ids", ON_GENERATE, NULL},
    {"response_format", ON_GENERATE, NULL},
    {"guided_json", ON_GENERATE, NULL},
    {"guided_regex", ON_GENERATE, NULL},
    {"guided_choice", ON_GENERATE, NULL},
    {"guided_grammar", ON_GENERATE, NULL},
    {"structured_outputs", ON_GENERATE, NULL},
    {"json_schema", ON_GENERATE, NULL},
    {"grammar", ON_GENERATE, NULL},
    {"user", ON_GENERATE, NULL},
    {"echo", ON_COMPLETIONS, NULL},
    {"echo", ON_CHAT, "echo is supported on /v1/completions only"},
    {"suffix", ON_COMPLETIONS, "suffix is not currently supported"},
    {"prompt_logprobs", ON_GENERATE,
     "prompt_logprobs is not supported: kvd does not keep the logits of prompt positions"},
};

static int route_bit(kvd_oai_route route)
{
    return route == KVD_OAI_CHAT ? ON_CHAT : ON_COMPLETIONS;
}

/* A client's field name fit for a one-line message: at most 60 bytes, control bytes
 * as '?'. */
static void printable_name(const char *name, char *out, size_t cap)
{
    size_t n = 0;
    for (; name[n] && n < 60 && n + 1 < cap; n++)
        out[n] = (unsigned char)name[n] < 0x20 || name[n] == 0x7f ? '?' : name[n];
    out[n] = '\0';
}

/* 400 for the first field of body that `routes` does not read, or reads only to refuse. */
static int refuse_unknown_fields(parse_ctx *c, int routes)
{
    const cJSON *item;
    cJSON_ArrayForEach(item, c->body) {
        const known_field *known = NULL;
        for (size_t i = 0; i < sizeof known_fields / sizeof known_fields[0] && !known; i++)
            if ((known_fields[i].routes & routes) && strcmp(known_fields[i].name, item->string) == 0)
                known = &known_fields[i];
        if (!known) {
            char name[64];
            printable_name(item->string, name, sizeof name);
            return fail(c, name, "this field is not supported by kvd; leave it out (see docs/api.md)");
        }
        if (known->refusal && !cJSON_IsNull(item))
            return fail(c, item->string, "%s", known->refusal);
    }
    return 0;
}

static int check_plain_fields(parse_ctx *c)
{
    const cJSON *best_of = field(c, "best_of");
    if (best_of && !(cJSON_IsNumber(best_of) && best_of->valuedouble == 1.0) &&
        !(cJSON_IsNumber(best_of) && cJSON_IsNumber(field(c, "n")) &&
          best_of->valuedouble == field(c, "n")->valuedouble))
        return fail(c, "best_of", "best_of other than n is not supported");
    const cJSON *model = field(c, "model");
    if (model && !cJSON_IsString(model))
        return fail(c, "model", "must be a string");
    const cJSON *user = field(c, "user");
    if (user && !cJSON_IsString(user))
        return fail(c, "user", "must be a string");
    return 0;
}

/* OpenAI's shape: {"token id as a string": bias in [-100, 100]}. */
static int parse_logit_bias(parse_ctx *c, kvd_oai_request *r, const kvd_oai_model_info *info)
{
    const cJSON *bias = field(c, "logit_bias");
    if (!bias)
        return 0;
    if (!cJSON_IsObject(bias))
        return fail(c, "logit_bias", "must be an object mapping token ids to biases in [-100, 100]");
    int n = cJSON_GetArraySize(bias);
    if (n > KVD_MAX_LOGIT_BIAS)
        return fail(c, "logit_bias", "at most %d entries", KVD_MAX_LOGIT_BIAS);
    if (n == 0)
        return 0;
    r->logit_bias = malloc((size_t)n * sizeof *r->logit_bias);
    if (!r->logit_bias)
        return kvd_error_set(c->err, KVD_ENOMEM, "out of memory");
    int count = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, bias) {
        const char *key = item->string;
        char *end = NULL;
        long id = key[0] >= '0' && key[0] <= '9' ? strtol(key, &end, 10) : -1;
        if (id < 0 || *end || id >= info->vocab_size)
            return fail(c, "logit_bias", "a key is not a token id in 0..%d", info->vocab_size - 1);
        if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble) || item->valuedouble < -100.0 ||
            item->valuedouble > 100.0)
            return fail(c, "logit_bias", "the bias of token %ld must be a number in [-100, 100]", id);
        for (int i = 0; i < count; i++)
            if (r->logit_bias[i].token == (int32_t)id)
                return fail(c, "logit_bias", "token %ld is listed twice", id);
        r->logit_bias[count++] = (kvd_logit_bias){(int32_t)id, (float)item->valuedouble};
    }
    r->params.sampling.logit_bias = r->logit_bias;
    r->params.sampling.num_logit_bias = count;
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
    /* Negative seeds are accepted as OpenAI does and reinterpreted as unsigned, except
     * -1, which asks for a random seed as llama-server's does. */
    if ((rc = get_int(c, "seed", -9007199254740992LL, 9007199254740992LL, &r->seed_given, &seed)))
        return rc;
    if (seed == -1)
        r->seed_given = false;
    if (r->seed_given)
        s->seed = (uint64_t)seed;
    return parse_logit_bias(c, r, info);
}

/* One structured-output source into r (a second one is an error: they cannot combine). */
static int set_constraint(parse_ctx *c, kvd_oai_request *r, const char *name, kvd_grammar_kind kind, char *src,
                          size_t len)
{
    if (!src && kind != KVD_GRAMMAR_JSON_OBJECT)
        return kvd_error_set(c->err, KVD_ENOMEM, "out of memory");
    if (r->constrained) {
        free(src);
        return fail(c, name, "only one of response_format, guided_json, guided_regex, guided_choice, guided_grammar, "
                             "structured_outputs, json_schema and grammar may be given (%s is already)",
                    r->constraint_field);
    }
    r->constrained = true;
    r->constraint_kind = kind;
    r->constraint_src = src;
    r->constraint_len = len;
    snprintf(r->constraint_field, sizeof r->constraint_field, "%s", name);
    return 0;
}

static int constraint_schema(parse_ctx *c, kvd_oai_request *r, const char *name, const cJSON *schema)
{
    if (cJSON_IsString(schema)) { /* vLLM takes the schema as JSON text too */
        cJSON *parsed = cJSON_Parse(schema->valuestring);
        if (!parsed)
            return fail(c, name, "must be a JSON Schema (an object, or a string holding one)");
        char *text = cJSON_PrintUnformatted(parsed);
        cJSON_Delete(parsed);
        return set_constraint(c, r, name, KVD_GRAMMAR_JSON_SCHEMA, text, text ? strlen(text) : 0);
    }
    if (!cJSON_IsObject(schema) && !cJSON_IsBool(schema))
        return fail(c, name, "must be a JSON Schema (an object, or a string holding one)");
    char *text = cJSON_PrintUnformatted(schema);
    return set_constraint(c, r, name, KVD_GRAMMAR_JSON_SCHEMA, text, text ? strlen(text) : 0);
}

static int constraint_string(parse_ctx *c, kvd_oai_request *r, const char *name, const cJSON *v, kvd_grammar_kind kind)
{
    if (!cJSON_IsString(v) || !v->valuestring[0])
        return fail(c, name, "must be a non-empty string");
    return set_constraint(c, r, name, kind, strdup(v->valuestring), strlen(v->valuestring));
}

static int constraint_choice(parse_ctx *c, kvd_oai_request *r, const char *name, const cJSON *v)
{
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) < 1)
        return fail(c, name, "must be a non-empty array of strings");
    size_t len = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, v) {
        if (!cJSON_IsString(x))
            return fail(c, name, "must be a non-empty array of strings");
        len += strlen(x->valuestring) + 1;
    }
    char *src = malloc(len + 1), *o = src;
    if (src)
        cJSON_ArrayForEach(x, v) {
            size_t n = strlen(x->valuestring) + 1;
            memcpy(o, x->valuestring, n);
            o += n;
        }
    return set_constraint(c, r, name, KVD_GRAMMAR_CHOICE, src, len);
}

/* response_format (OpenAI), guided_* and structured_outputs (vLLM), json_schema and
 * grammar (llama-server). */
static int parse_constraint(parse_ctx *c, kvd_oai_request *r)
{
    int rc;
    const cJSON *format = field(c, "response_format");
    if (format) {
        const cJSON *type = cJSON_IsObject(format) ? cJSON_GetObjectItemCaseSensitive(format, "type") : NULL;
        if (!cJSON_IsString(type))
            return fail(c, "response_format", "must be an object with a \"type\"");
        if (!strcmp(type->valuestring, "json_schema")) {
            const cJSON *js = cJSON_GetObjectItemCaseSensitive(format, "json_schema");
            const cJSON *schema = cJSON_IsObject(js) ? cJSON_GetObjectItemCaseSensitive(js, "schema") : NULL;
            if (!schema)
                return fail(c, "response_format.json_schema.schema", "is required for type json_schema");
            if ((rc = constraint_schema(c, r, "response_format.json_schema.schema", schema)))
                return rc;
        } else if (!strcmp(type->valuestring, "json_object")) {
            /* llama-server lets a schema ride along */
            const cJSON *schema = cJSON_GetObjectItemCaseSensitive(format, "schema");
            if (schema && (rc = constraint_schema(c, r, "response_format.schema", schema)))
                return rc;
            if (!schema && (rc = set_constraint(c, r, "response_format", KVD_GRAMMAR_JSON_OBJECT, NULL, 0)))
                return rc;
        } else if (strcmp(type->valuestring, "text") != 0)
            return fail(c, "response_format", "type must be \"text\", \"json_object\" or \"json_schema\"");
    }
    const cJSON *v;
    if ((v = field(c, "guided_json")) && (rc = constraint_schema(c, r, "guided_json", v)))
        return rc;
    if ((v = field(c, "json_schema")) && (rc = constraint_schema(c, r, "json_schema", v)))
        return rc;
    if ((v = field(c, "guided_regex")) && (rc = constraint_string(c, r, "guided_regex", v, KVD_GRAMMAR_REGEX)))
        return rc;
    if ((v = field(c, "guided_grammar")) && (rc = constraint_string(c, r, "guided_grammar", v, KVD_GRAMMAR_GBNF)))
        return rc;
    if ((v = field(c, "grammar")) && (rc = constraint_string(c, r, "grammar", v, KVD_GRAMMAR_GBNF)))
        return rc;
    if ((v = field(c, "guided_choice")) && (rc = constraint_choice(c, r, "guided_choice", v)))
        return rc;
    const cJSON *so = field(c, "structured_outputs");
    if (so) {
        if (!cJSON_IsObject(so))
            return fail(c, "structured_outputs", "must be an object");
        cJSON_ArrayForEach(v, so) {
            char name[96], key[64];
            printable_name(v->string, key, sizeof key);
            snprintf(name, sizeof name, "structured_outputs.%s", key);
            if (cJSON_IsNull(v))
                continue;
            if (!strcmp(v->string, "json")) rc = constraint_schema(c, r, name, v);
            else if (!strcmp(v->string, "regex")) rc = constraint_string(c, r, name, v, KVD_GRAMMAR_REGEX);
            else if (!strcmp(v->string, "grammar")) rc = constraint_string(c, r, name, v, KVD_GRAMMAR_GBNF);
            else if (!strcmp(v->string, "choice")) rc = constraint_choice(c, r, name, v);
            else if (!strcmp(v->string, "json_object"))
                rc = cJSON_IsTrue(v) ? set_constraint(c, r, name, KVD_GRAMMAR_JSON_OBJECT, NULL, 0)
                                     : cJSON_IsFalse(v) ? 0 : fail(c, name, "must be a boolean");
            else
                rc = fail(c, name, "this option is not supported by kvd; leave it out");
            if (rc)
                return rc;
        }
    }
    return 0;
}

/* tool_choice "required" or a named function: the assistant turn starts with
 * "<tool_call>\n" (template text, so the model's own tag token) and the rest is forced
 * by a JSON Schema grammar to one call's body; jobs.c closes the block when the grammar
 * completes. Only for generation (generate false: /tokenize shows the prompt only). */
static int force_tool_call(parse_ctx *c, kvd_oai_request *r, const kvd_chat_tools *tools,
                           const kvd_chat_options *opts, bool generate)
{
    if (tools->choice != KVD_TOOL_CHOICE_REQUIRED && tools->choice != KVD_TOOL_CHOICE_NAMED)
        return 0;
    if (opts->continue_final_message || !opts->add_generation_prompt)
        return fail(c, "tool_choice",
                    "\"required\" and a named function need a new assistant turn (no continue_final_message, "
                    "add_generation_prompt true)");
    if (kvd_sbuf_puts(&r->chat.text, KVD_CHAT_FORCED_CALL_PREFIX) != 0)
        return kvd_error_set(c->err, KVD_ENOMEM, "out of memory");
    if (!generate)
        return 0;
    char *schema = kvd_chat_forced_call_schema(tools);
    int rc = set_constraint(c, r, "tool_choice", KVD_GRAMMAR_JSON_SCHEMA, schema, schema ? strlen(schema) : 0);
    if (rc == 0) {
        r->forced_tool_call = true;
        r->parallel_tool_calls = false; /* one forced call per answer */
    }
    return rc;
}

/* messages (+ tools, tool_choice, add_generation_prompt, continue_final_message,
 * chat_template_kwargs) through the model's chat template. */
static int render_chat(parse_ctx *c, kvd_oai_request *r, const kvd_oai_model_info *info, bool generate)
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
        rc = force_tool_call(c, r, &tools, &opts, generate);
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
    if ((rc = refuse_unknown_fields(&c, route_bit(route))) || (rc = check_plain_fields(&c)) ||
        (rc = parse_constraint(&c, r)))
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
        (rc = get_bool(&c, "include_stop_str_in_output", &r->params.include_stop_str_in_output)) ||
        (rc = get_bool(&c, "stream", &r->stream)) ||
        (rc = get_bool(&c, "return_tokens_as_token_ids", &r->tokens_as_ids)) ||
        (rc = get_bool(&c, "echo", &r->echo)))
        return rc;
    if (r->echo && r->logprobs)
        return fail(&c, "echo", "echo with logprobs needs the prompt's logprobs, which kvd does not compute");
    long long min_tokens = 0;
    if ((rc = get_int(&c, "min_tokens", 0, info->max_model_len, NULL, &min_tokens)))
        return rc;
    if (min_tokens > r->params.max_tokens)
        return fail(&c, "min_tokens", "%lld must not exceed max_tokens (%d)", min_tokens, r->params.max_tokens);
    r->params.sampling.min_tokens = (int)min_tokens;

    const cJSON *options = field(&c, "stream_options");
    if (options) {
        if (!cJSON_IsObject(options))
            return fail(&c, "stream_options", "must be an object");
        if (!r->stream)
            return fail(&c, "stream_options", "only allowed when \"stream\" is true");
        const cJSON *option;
        cJSON_ArrayForEach(option, options) {
            bool *target = strcmp(option->string, "include_usage") == 0            ? &r->include_usage
                           : strcmp(option->string, "continuous_usage_stats") == 0 ? &r->continuous_usage
                                                                                   : NULL;
            char name[96], option_name[64];
            printable_name(option->string, option_name, sizeof option_name);
            snprintf(name, sizeof name, "stream_options.%s", option_name);
            if (!target)
                return fail(&c, name, "this option is not supported by kvd; leave it out");
            if (!cJSON_IsNull(option) && !cJSON_IsBool(option))
                return fail(&c, name, "must be a boolean");
            *target = cJSON_IsTrue(option);
        }
        if (r->continuous_usage && !r->include_usage)
            return fail(&c, "stream_options.continuous_usage_stats", "requires \"include_usage\": true");
    }

    if (route == KVD_OAI_COMPLETIONS)
        return parse_prompt(&c, r, info);

    if ((rc = render_chat(&c, r, info, true)) != 0)
        return rc;
    /* The assistant's turn ends at <|im_end|> (or <|endoftext|>) unless the client
     * asked to run on regardless. */
    if (!r->params.ignore_eos)
        for (int i = 0; i < info->num_chat_stop_ids; i++)
            if ((rc = add_stop_id(&c, r, info->chat_stop_ids[i], false)))
                return rc;
    return 0;
}

int kvd_oai_parse_tokenize(kvd_oai_request *r, const cJSON *body, const kvd_oai_model_info *info, char *param,
                           size_t param_cap, kvd_error *err)
{
    parse_ctx c = {body, param, param_cap, err};
    param[0] = '\0';
    int rc = refuse_unknown_fields(&c, ON_TOKENIZE);
    if (rc)
        return rc;
    const cJSON *model = field(&c, "model");
    if (model && !cJSON_IsString(model))
        return fail(&c, "model", "must be a string");
    /* Qwen2's tokenizer adds no BOS/EOS either way, so the value is honored;
     * add_generation_prompt goes to the template (render_chat). */
    bool add_special = true;
    if ((rc = get_bool(&c, "add_special_tokens", &add_special)))
        return rc;
    const char *name = "prompt";
    const cJSON *prompt = field(&c, "prompt");
    if (!prompt) {
        name = "content";
        prompt = field(&c, "content");
    }
    if (prompt) {
        if (!cJSON_IsString(prompt))
            return fail(&c, name, "must be a string");
        static const char *const chat_only[] = {"add_generation_prompt", "continue_final_message",
                                                "chat_template_kwargs", "tools", "tool_choice",
                                                "parallel_tool_calls"};
        for (size_t i = 0; i < sizeof chat_only / sizeof chat_only[0]; i++)
            if (field(&c, chat_only[i]))
                return fail(&c, chat_only[i], "applies to \"messages\" only");
        r->prompt_len = strlen(prompt->valuestring);
        r->prompt_text = strdup(prompt->valuestring);
        return r->prompt_text ? 0 : kvd_error_set(err, KVD_ENOMEM, "out of memory");
    }
    if (!field(&c, "messages"))
        return fail(&c, "prompt", "is required (or \"content\", or \"messages\")");
    r->route = KVD_OAI_CHAT;
    return render_chat(&c, r, info, false);
}

int kvd_oai_parse_detokenize(const cJSON *body, const kvd_oai_model_info *info, int32_t **ids, int *count,
                             char *param, size_t param_cap, kvd_error *err)
{
    parse_ctx c = {body, param, param_cap, err};
    param[0] = '\0';
    int rc = refuse_unknown_fields(&c, ON_DETOKENIZE);
    if (rc)
        return rc;
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

bool kvd_oai_find_nul(const char *json, size_t len, char *field_name, size_t cap)
{
    int depth = 0;
    bool in_string = false, expect_key = false, string_is_key = false;
    size_t string_start = 0;
    snprintf(field_name, cap, "%s", "");
    for (size_t i = 0; i < len; i++) {
        char ch = json[i];
        if (in_string) {
            if (ch == '\0') {
                if (string_is_key)
                    snprintf(field_name, cap, "%s", "(a field name)");
                return true; /* a raw NUL byte, which cJSON also takes into a string */
            }
            if (ch == '\\') {
                /* Skip the escaped character; the escape u0000 is a NUL. */
                if (i + 5 < len && json[i + 1] == 'u' && memcmp(json + i + 2, "0000", 4) == 0) {
                    if (string_is_key)
                        snprintf(field_name, cap, "%s", "(a field name)");
                    return true;
                }
                i++;
            } else if (ch == '"') {
                in_string = false;
                if (string_is_key) {
                    size_t n = i - string_start;
                    snprintf(field_name, cap, "%.*s", (int)(n < 100 ? n : 100), json + string_start);
                }
            }
            continue;
        }
        if (ch == '"') {
            in_string = true;
            string_is_key = depth == 1 && expect_key;
            expect_key = false;
            string_start = i + 1;
        } else if (ch == '{' || ch == '[') {
            depth++;
            expect_key = depth == 1;
        } else if (ch == '}' || ch == ']') {
            depth--;
        } else if (ch == ',' && depth == 1) {
            expect_key = true;
        }
    }
    return false;
}
