/* chat.c - chat templates (load, validate, render, encode) and tools validation.
 *
 * See chat.h. Reading the template's files at start-up is chat_load.c's. The one piece of Jinja kvd ships itself is the fallback below: it is
 * Qwen2.5-Instruct's tokenizer_config.json template byte for byte (tests compare it with
 * tests/template/templates/qwen2.5-instruct.jinja), so models without a template render
 * exactly as kvd's hand-written ChatML renderer did before templates.
 */
#include "chat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char builtin_source[] =
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n";

#define FALLBACK_ORIGIN "built-in fallback (ChatML as Qwen2.5-Instruct's template)"

struct kvd_chat_template {
    kvd_template *main;
    kvd_template *tool_use;  /* the named-list form's "tool_use" template, used with tools */
    char origin[512];
    bool fallback;
    cJSON *trusted;          /* bos_token, eos_token: template text, not request data */
};

const char *kvd_chat_template_builtin_source(void) { return builtin_source; }

void kvd_chat_template_destroy(kvd_chat_template *t)
{
    if (!t)
        return;
    kvd_template_destroy(t->main);
    kvd_template_destroy(t->tool_use);
    cJSON_Delete(t->trusted);
    free(t);
}

const char *kvd_chat_template_origin(const kvd_chat_template *t) { return t->origin; }
bool kvd_chat_template_is_fallback(const kvd_chat_template *t) { return t->fallback; }

static kvd_chat_template *template_new(const char *origin)
{
    kvd_chat_template *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    snprintf(t->origin, sizeof t->origin, "%s", origin);
    t->trusted = cJSON_CreateObject();
    if (!t->trusted) {
        free(t);
        return NULL;
    }
    return t;
}

kvd_chat_template *kvd_chat_template_from_source(const char *source, size_t len, const char *origin, kvd_error *err)
{
    kvd_chat_template *t = template_new(origin);
    if (!t) {
        kvd_error_set(err, KVD_ENOMEM, "chat template: out of memory");
        return NULL;
    }
    t->main = kvd_template_parse(source, len, origin, err);
    if (!t->main) {
        kvd_chat_template_destroy(t);
        return NULL;
    }
    return t;
}

kvd_chat_template *kvd_chat_template_builtin(kvd_error *err)
{
    kvd_chat_template *t = kvd_chat_template_from_source(builtin_source, sizeof builtin_source - 1, FALLBACK_ORIGIN, err);
    if (t) {
        t->fallback = true;
        cJSON_AddStringToObject(t->trusted, "bos_token", "");
        cJSON_AddStringToObject(t->trusted, "eos_token", "<|im_end|>");
    }
    return t;
}

/* bos_token / eos_token are strings or AddedToken objects {"content": ...}. */
static void copy_special(cJSON *trusted, const cJSON *config, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(config, key);
    if (cJSON_IsObject(v))
        v = cJSON_GetObjectItemCaseSensitive(v, "content");
    if (cJSON_IsString(v))
        cJSON_AddStringToObject(trusted, key, v->valuestring);
}

kvd_chat_template *kvd_chat_template_from_tokenizer_config(const char *text, size_t len, const char *path,
                                                           kvd_error *err)
{
    cJSON *config = cJSON_ParseWithLength(text, len);
    if (!cJSON_IsObject(config)) {
        cJSON_Delete(config);
        kvd_error_set(err, KVD_EFORMAT, "%s: not a JSON object", path);
        return NULL;
    }
    const cJSON *tmpl = cJSON_GetObjectItemCaseSensitive(config, "chat_template");
    kvd_chat_template *t = NULL;
    if (cJSON_IsString(tmpl)) {
        t = kvd_chat_template_from_source(tmpl->valuestring, strlen(tmpl->valuestring), "tokenizer_config.json", err);
    } else if (cJSON_IsArray(tmpl)) {
        /* [{"name": "default", "template": ...}, {"name": "tool_use", ...}]: Hugging Face
         * uses "tool_use" when tools are given and it exists, else "default" */
        const cJSON *main_src = NULL, *tool_src = NULL, *item;
        cJSON_ArrayForEach(item, tmpl) {
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(item, "name");
            const cJSON *src = cJSON_GetObjectItemCaseSensitive(item, "template");
            if (!cJSON_IsString(name) || !cJSON_IsString(src))
                continue;
            if (!strcmp(name->valuestring, "default"))
                main_src = src;
            else if (!strcmp(name->valuestring, "tool_use"))
                tool_src = src;
        }
        if (!main_src) {
            kvd_error_set(err, KVD_EFORMAT, "%s: chat_template lists no template named \"default\"", path);
        } else {
            t = kvd_chat_template_from_source(main_src->valuestring, strlen(main_src->valuestring),
                                              "tokenizer_config.json (\"default\")", err);
            if (t && tool_src) {
                t->tool_use = kvd_template_parse(tool_src->valuestring, strlen(tool_src->valuestring),
                                                 "tokenizer_config.json (\"tool_use\")", err);
                if (!t->tool_use) {
                    kvd_chat_template_destroy(t);
                    t = NULL;
                } else {
                    snprintf(t->origin, sizeof t->origin, "tokenizer_config.json (\"default\" and \"tool_use\")");
                }
            }
        }
    } else if (tmpl && !cJSON_IsNull(tmpl)) {
        kvd_error_set(err, KVD_EFORMAT, "%s: chat_template must be a string or a list of named templates", path);
    }
    if (t) {
        copy_special(t->trusted, config, "bos_token");
        copy_special(t->trusted, config, "eos_token");
    }
    cJSON_Delete(config);
    return t;
}

void kvd_chat_template_adopt_specials(kvd_chat_template *t, kvd_chat_template *from)
{
    cJSON_Delete(t->trusted);
    t->trusted = from->trusted;
    from->trusted = NULL;
}

/* ---- tools ---- */

static int bad_field(char *param, size_t cap, kvd_error *err, const char *field, const char *message)
{
    snprintf(param, cap, "%s", field);
    return kvd_error_set(err, KVD_EINVAL, "%s: %s", field, message);
}

static bool valid_function_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-'))
            return false;
    }
    return true;
}

int kvd_chat_parse_tools(const cJSON *body, kvd_chat_tools *out, char *param, size_t param_cap, kvd_error *err)
{
    memset(out, 0, sizeof *out);
    out->parallel = true;
    char field[96];
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(body, "tools");
    if (tools && !cJSON_IsNull(tools)) {
        if (!cJSON_IsArray(tools))
            return bad_field(param, param_cap, err, "tools", "must be an array of {\"type\": \"function\", \"function\": {...}}");
        int i = 0;
        const cJSON *tool;
        cJSON_ArrayForEach(tool, tools) {
            snprintf(field, sizeof field, "tools[%d]", i);
            if (!cJSON_IsObject(tool))
                return bad_field(param, param_cap, err, field, "must be an object");
            const cJSON *type = cJSON_GetObjectItemCaseSensitive(tool, "type");
            snprintf(field, sizeof field, "tools[%d].type", i);
            if (!cJSON_IsString(type) || strcmp(type->valuestring, "function") != 0)
                return bad_field(param, param_cap, err, field, "must be \"function\" (the only tool type)");
            const cJSON *fn = cJSON_GetObjectItemCaseSensitive(tool, "function");
            snprintf(field, sizeof field, "tools[%d].function", i);
            if (!cJSON_IsObject(fn))
                return bad_field(param, param_cap, err, field, "must be an object with \"name\"");
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(fn, "name");
            snprintf(field, sizeof field, "tools[%d].function.name", i);
            if (!cJSON_IsString(name))
                return bad_field(param, param_cap, err, field, "is required (a string)");
            if (!valid_function_name(name->valuestring))
                return bad_field(param, param_cap, err, field, "must be 1 to 64 of a-z, A-Z, 0-9, _ and -");
            const cJSON *desc = cJSON_GetObjectItemCaseSensitive(fn, "description");
            snprintf(field, sizeof field, "tools[%d].function.description", i);
            if (desc && !cJSON_IsNull(desc) && !cJSON_IsString(desc))
                return bad_field(param, param_cap, err, field, "must be a string");
            const cJSON *params = cJSON_GetObjectItemCaseSensitive(fn, "parameters");
            snprintf(field, sizeof field, "tools[%d].function.parameters", i);
            if (params && !cJSON_IsNull(params)) {
                const cJSON *ptype = cJSON_IsObject(params) ? cJSON_GetObjectItemCaseSensitive(params, "type") : NULL;
                if (!cJSON_IsObject(params) || (ptype && !(cJSON_IsString(ptype) && !strcmp(ptype->valuestring, "object"))))
                    return bad_field(param, param_cap, err, field, "must be a JSON Schema object ({\"type\": \"object\", ...})");
            }
            i++;
        }
        if (i > 0)
            out->tools = tools;
    }
    const cJSON *choice = cJSON_GetObjectItemCaseSensitive(body, "tool_choice");
    if (choice && !cJSON_IsNull(choice)) {
        if (cJSON_IsString(choice)) {
            const char *c = choice->valuestring;
            if (!strcmp(c, "none"))
                out->choice = KVD_TOOL_CHOICE_NONE;
            else if (!strcmp(c, "auto"))
                out->choice = KVD_TOOL_CHOICE_AUTO;
            else if (!strcmp(c, "required"))
                out->choice = KVD_TOOL_CHOICE_REQUIRED;
            else
                return bad_field(param, param_cap, err, "tool_choice",
                                 "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}");
        } else if (cJSON_IsObject(choice)) {
            const cJSON *type = cJSON_GetObjectItemCaseSensitive(choice, "type");
            const cJSON *fn = cJSON_GetObjectItemCaseSensitive(choice, "function");
            const cJSON *name = cJSON_IsObject(fn) ? cJSON_GetObjectItemCaseSensitive(fn, "name") : NULL;
            if (!cJSON_IsString(type) || strcmp(type->valuestring, "function") != 0)
                return bad_field(param, param_cap, err, "tool_choice.type", "must be \"function\"");
            if (!cJSON_IsString(name))
                return bad_field(param, param_cap, err, "tool_choice.function.name", "is required (a string)");
            bool known = false;
            const cJSON *tool;
            cJSON_ArrayForEach(tool, out->tools) {
                const cJSON *tn = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(tool, "function"), "name");
                known |= cJSON_IsString(tn) && !strcmp(tn->valuestring, name->valuestring);
            }
            if (!known)
                return bad_field(param, param_cap, err, "tool_choice.function.name", "names no function in \"tools\"");
            out->choice = KVD_TOOL_CHOICE_NAMED;
            out->forced_name = name->valuestring;
        } else {
            return bad_field(param, param_cap, err, "tool_choice", "must be a string or an object");
        }
    }
    const cJSON *parallel = cJSON_GetObjectItemCaseSensitive(body, "parallel_tool_calls");
    if (parallel && !cJSON_IsNull(parallel)) {
        if (!cJSON_IsBool(parallel))
            return bad_field(param, param_cap, err, "parallel_tool_calls", "must be a boolean");
        out->parallel = cJSON_IsTrue(parallel);
    }
    if (out->choice == KVD_TOOL_CHOICE_NONE)
        out->tools = NULL;
    if (out->choice == KVD_TOOL_CHOICE_REQUIRED && !out->tools)
        return bad_field(param, param_cap, err, "tool_choice", "\"required\" needs \"tools\" to choose from");
    return 0;
}

/* One tool's call body: {"name": const, "arguments": its parameters} (the empty
 * object when it declares none: OpenAI's function without arguments), both required,
 * nothing else. */
static cJSON *forced_call_branch(const cJSON *fn)
{
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(fn, "name");
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(fn, "parameters");
    cJSON *branch = cJSON_CreateObject();
    cJSON *props = cJSON_AddObjectToObject(branch, "properties");
    cJSON *name_schema = cJSON_AddObjectToObject(props, "name");
    cJSON_AddStringToObject(name_schema, "const", name->valuestring);
    cJSON *args = cJSON_IsObject(params) ? cJSON_Duplicate(params, true) : cJSON_CreateObject();
    if (args && !cJSON_IsObject(params)) {
        cJSON_AddStringToObject(args, "type", "object");
        cJSON_AddFalseToObject(args, "additionalProperties");
    }
    cJSON_AddItemToObject(props, "arguments", args);
    cJSON *required = cJSON_AddArrayToObject(branch, "required");
    cJSON_AddItemToArray(required, cJSON_CreateString("name"));
    cJSON_AddItemToArray(required, cJSON_CreateString("arguments"));
    cJSON_AddStringToObject(branch, "type", "object");
    cJSON_AddFalseToObject(branch, "additionalProperties");
    return branch;
}

char *kvd_chat_forced_call_schema(const kvd_chat_tools *tools)
{
    cJSON *schema = NULL, *any = cJSON_CreateArray();
    const cJSON *tool;
    cJSON_ArrayForEach(tool, tools->tools) {
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(tool, "function");
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(fn, "name");
        if (tools->choice == KVD_TOOL_CHOICE_NAMED && strcmp(name->valuestring, tools->forced_name) != 0)
            continue;
        cJSON_AddItemToArray(any, forced_call_branch(fn));
    }
    if (cJSON_GetArraySize(any) == 1) {
        schema = cJSON_DetachItemFromArray(any, 0);
    } else {
        schema = cJSON_CreateObject();
        cJSON_AddItemToObject(schema, "anyOf", any);
        any = NULL;
    }
    cJSON_Delete(any);
    char *text = schema ? cJSON_PrintUnformatted(schema) : NULL;
    cJSON_Delete(schema);
    return text;
}

int kvd_chat_parse_options(const cJSON *body, const kvd_chat_tools *tools, kvd_chat_options *out, char *param,
                           size_t param_cap, kvd_error *err)
{
    memset(out, 0, sizeof *out);
    out->tools = tools ? tools->tools : NULL;
    out->add_generation_prompt = true;
    const cJSON *agp = cJSON_GetObjectItemCaseSensitive(body, "add_generation_prompt");
    bool agp_given = agp && !cJSON_IsNull(agp);
    if (agp_given) {
        if (!cJSON_IsBool(agp))
            return bad_field(param, param_cap, err, "add_generation_prompt", "must be a boolean");
        out->add_generation_prompt = cJSON_IsTrue(agp);
    }
    const cJSON *cont = cJSON_GetObjectItemCaseSensitive(body, "continue_final_message");
    if (cont && !cJSON_IsNull(cont)) {
        if (!cJSON_IsBool(cont))
            return bad_field(param, param_cap, err, "continue_final_message", "must be a boolean");
        out->continue_final_message = cJSON_IsTrue(cont);
    }
    if (out->continue_final_message && agp_given && out->add_generation_prompt)
        return bad_field(param, param_cap, err, "continue_final_message",
                         "cannot be combined with \"add_generation_prompt\": true (the last message is "
                         "continued, no new turn is opened)");
    const cJSON *kwargs = cJSON_GetObjectItemCaseSensitive(body, "chat_template_kwargs");
    if (kwargs && !cJSON_IsNull(kwargs)) {
        if (!cJSON_IsObject(kwargs))
            return bad_field(param, param_cap, err, "chat_template_kwargs", "must be an object");
        out->template_kwargs = kwargs;
    }
    return 0;
}

/* ---- rendering ---- */

void kvd_chat_prompt_init(kvd_chat_prompt *p)
{
    kvd_sbuf_init(&p->text);
    p->data_spans = NULL;
    p->num_data_spans = 0;
    p->continued = NULL;
    p->continued_len = 0;
}

void kvd_chat_prompt_deinit(kvd_chat_prompt *p)
{
    kvd_sbuf_deinit(&p->text);
    free(p->data_spans);
    free(p->continued);
    kvd_chat_prompt_init(p);
}

static int bad(char *param, size_t cap, kvd_error *err, const char *message, int index, const char *field)
{
    if (index < 0)
        snprintf(param, cap, "messages");
    else
        snprintf(param, cap, "messages[%d]%s", index, field);
    return kvd_error_set(err, KVD_EINVAL, "%s: %s", param, message);
}

/* Replaces an array of text parts by their texts joined with "\n". */
static int flatten_content(cJSON *message, cJSON *content, int index, char *param, size_t cap, kvd_error *err)
{
    kvd_sbuf joined = {0};
    int part_index = 0;
    const cJSON *part;
    cJSON_ArrayForEach(part, content) {
        char field[64];
        snprintf(field, sizeof field, ".content[%d]", part_index);
        if (!cJSON_IsObject(part)) {
            kvd_sbuf_deinit(&joined);
            return bad(param, cap, err, "must be an object {\"type\": \"text\", \"text\": ...}", index, field);
        }
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
        snprintf(field, sizeof field, ".content[%d].type", part_index);
        if (!cJSON_IsString(type)) {
            kvd_sbuf_deinit(&joined);
            return bad(param, cap, err, "must be a string", index, field);
        }
        if (strcmp(type->valuestring, "text") != 0) {
            kvd_sbuf_deinit(&joined);
            return bad(param, cap, err, "only \"text\" parts are supported", index, field);
        }
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsString(text)) {
            snprintf(field, sizeof field, ".content[%d].text", part_index);
            kvd_sbuf_deinit(&joined);
            return bad(param, cap, err, "must be a string", index, field);
        }
        if (part_index > 0)
            kvd_sbuf_puts(&joined, "\n");
        kvd_sbuf_puts(&joined, text->valuestring);
        part_index++;
    }
    cJSON *flat = cJSON_CreateString(joined.data ? joined.data : "");
    bool failed = joined.failed || !flat;
    kvd_sbuf_deinit(&joined);
    if (failed) {
        cJSON_Delete(flat);
        return kvd_error_set(err, KVD_ENOMEM, "chat template: out of memory");
    }
    cJSON_ReplaceItemInObjectCaseSensitive(message, "content", flat);
    return 0;
}

/* Checks an assistant's tool_calls and turns string arguments into objects. */
static int normalise_tool_calls(cJSON *calls, int index, char *param, size_t cap, kvd_error *err)
{
    char field[96];
    if (!cJSON_IsArray(calls))
        return bad(param, cap, err, "must be an array", index, ".tool_calls");
    int k = 0;
    cJSON *call;
    cJSON_ArrayForEach(call, calls) {
        snprintf(field, sizeof field, ".tool_calls[%d]", k);
        if (!cJSON_IsObject(call))
            return bad(param, cap, err, "must be an object", index, field);
        cJSON *fn = cJSON_GetObjectItemCaseSensitive(call, "function");
        snprintf(field, sizeof field, ".tool_calls[%d].function", k);
        if (!cJSON_IsObject(fn))
            return bad(param, cap, err, "must be an object with \"name\" and \"arguments\"", index, field);
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(fn, "name");
        snprintf(field, sizeof field, ".tool_calls[%d].function.name", k);
        if (!cJSON_IsString(name))
            return bad(param, cap, err, "must be a string", index, field);
        cJSON *args = cJSON_GetObjectItemCaseSensitive(fn, "arguments");
        if (cJSON_IsString(args)) {
            cJSON *parsed = cJSON_Parse(args->valuestring);
            if (cJSON_IsObject(parsed))
                cJSON_ReplaceItemInObjectCaseSensitive(fn, "arguments", parsed);
            else
                cJSON_Delete(parsed); /* not a JSON object: the template gets the string */
        }
        k++;
    }
    return 0;
}

static const char *role_of(const cJSON *message)
{
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(message, "role");
    return cJSON_IsString(role) ? role->valuestring : NULL;
}

/* A checked, normalised copy of messages (the caller deletes it). */
static cJSON *normalise_messages(const cJSON *messages, char *param, size_t cap, kvd_error *err)
{
    if (!cJSON_IsArray(messages)) {
        bad(param, cap, err, "must be an array of messages", -1, "");
        return NULL;
    }
    if (cJSON_GetArraySize(messages) == 0) {
        bad(param, cap, err, "must not be empty", -1, "");
        return NULL;
    }
    int index = 0;
    const cJSON *message;
    cJSON_ArrayForEach(message, messages) {
        if (!cJSON_IsObject(message)) {
            bad(param, cap, err, "must be an object with \"role\" and \"content\"", index, "");
            return NULL;
        }
        const char *role = role_of(message);
        if (!role) {
            bad(param, cap, err, "must be a string", index, ".role");
            return NULL;
        }
        if (strcmp(role, "system") != 0 && strcmp(role, "user") != 0 && strcmp(role, "assistant") != 0 &&
            strcmp(role, "tool") != 0) {
            bad(param, cap, err, "must be one of system, user, assistant, tool", index, ".role");
            return NULL;
        }
        index++;
    }
    cJSON *copy = cJSON_Duplicate(messages, true);
    if (!copy) {
        kvd_error_set(err, KVD_ENOMEM, "chat template: out of memory");
        return NULL;
    }
    index = 0;
    cJSON *m;
    cJSON_ArrayForEach(m, copy) {
        const char *role = role_of(m);
        bool assistant = strcmp(role, "assistant") == 0;
        cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
        cJSON *calls = cJSON_GetObjectItemCaseSensitive(m, "tool_calls");
        bool has_calls = assistant && calls && !cJSON_IsNull(calls);
        int rc = 0;
        if (has_calls && (rc = normalise_tool_calls(calls, index, param, cap, err)) != 0)
            goto fail;
        if (!content || cJSON_IsNull(content)) {
            if (!assistant) {
                rc = bad(param, cap, err, "is required", index, ".content");
                goto fail;
            }
            /* An assistant turn without content (OpenAI sends null beside tool_calls)
             * reaches the template as "", as vLLM passes it: Qwen's templates test it
             * for truth, and Qwen3's would fail on None ('</think>' in content). */
            cJSON *empty = cJSON_CreateString("");
            if (!empty || (content ? !cJSON_ReplaceItemInObjectCaseSensitive(m, "content", empty)
                                   : !cJSON_AddItemToObject(m, "content", empty))) {
                cJSON_Delete(empty); /* not taken on failure */
                rc = kvd_error_set(err, KVD_ENOMEM, "chat template: out of memory");
                goto fail;
            }
        } else if (cJSON_IsArray(content)) {
            if ((rc = flatten_content(m, content, index, param, cap, err)) != 0)
                goto fail;
        } else if (!cJSON_IsString(content)) {
            rc = bad(param, cap, err, "must be a string or an array of content parts", index, ".content");
            goto fail;
        }
        index++;
        continue;
    fail:
        cJSON_Delete(copy);
        (void)rc;
        return NULL;
    }
    return copy;
}

/* Cuts the output after the final message's content (Hugging Face's
 * continue_final_message: the rindex of the stripped content). */
static int cut_after_final(kvd_template_output *out, const cJSON *messages, char *param, size_t cap, kvd_error *err)
{
    const cJSON *last = cJSON_GetArrayItem(messages, cJSON_GetArraySize(messages) - 1);
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(last, "content");
    if (!cJSON_IsString(content))
        return bad(param, cap, err, "continue_final_message needs the assistant message to have content",
                   cJSON_GetArraySize(messages) - 1, ".content");
    const char *s = content->valuestring ? content->valuestring : "";
    size_t n = strlen(s);
    while (n && strchr(" \t\n\r\f\v", s[n - 1]))
        n--;
    while (n && strchr(" \t\n\r\f\v", *s)) {
        s++;
        n--;
    }
    if (n == 0 || !out->text)
        return 0; /* nothing to find: the rendered text stays as it is */
    const char *hit = NULL;
    for (const char *p = out->text; (p = memmem(p, out->len - (size_t)(p - out->text), s, n)) != NULL; p++)
        hit = p;
    if (!hit)
        return bad(param, cap, err, "continue_final_message: the template did not render the final message's content",
                   cJSON_GetArraySize(messages) - 1, ".content");
    size_t end = (size_t)(hit - out->text) + n;
    out->len = end;
    out->text[end] = '\0';
    size_t kept = 0;
    for (size_t k = 0; k < out->num_data_spans; k++) {
        kvd_template_span sp = out->data_spans[k];
        if (sp.offset >= end)
            break;
        if (sp.offset + sp.len > end)
            sp.len = end - sp.offset;
        out->data_spans[kept++] = sp;
    }
    out->num_data_spans = kept;
    return 0;
}

int kvd_chat_render(const kvd_chat_template *t, const cJSON *messages, const kvd_chat_options *opts,
                    kvd_chat_prompt *p, char *param, size_t param_cap, kvd_error *err)
{
    kvd_chat_options defaults = {.add_generation_prompt = true};
    if (!opts)
        opts = &defaults;
    cJSON *msgs = normalise_messages(messages, param, param_cap, err);
    if (!msgs)
        return err && err->code ? err->code : KVD_EINVAL;
    cJSON *vars = cJSON_CreateObject();
    int rc = KVD_ENOMEM;
    if (!vars)
        goto out;
    /* Hugging Face's variables: the request's template kwargs first, then ours over them */
    if (opts->template_kwargs) {
        const cJSON *kw;
        cJSON_ArrayForEach(kw, opts->template_kwargs) {
            if (!strcmp(kw->string, "messages") || !strcmp(kw->string, "tools") ||
                !strcmp(kw->string, "add_generation_prompt"))
                continue;
            cJSON *dup = cJSON_Duplicate(kw, true);
            if (!dup)
                goto out;
            cJSON_AddItemToObject(vars, kw->string, dup);
        }
    }
    /* Only a final assistant message is continued (llama-server's prefill rule); an
     * agent loop that keeps the flag on gets a new turn once tools have answered. */
    const cJSON *last = cJSON_GetArrayItem(msgs, cJSON_GetArraySize(msgs) - 1);
    bool continuing = opts->continue_final_message && !strcmp(role_of(last), "assistant");
    const cJSON *last_content = cJSON_GetObjectItemCaseSensitive(last, "content");
    if (continuing && cJSON_IsString(last_content)) {
        free(p->continued);
        p->continued_len = strlen(last_content->valuestring);
        if (!(p->continued = strdup(last_content->valuestring)))
            goto out;
    }
    cJSON_AddItemToObject(vars, "messages", msgs);
    msgs = NULL;
    cJSON *tools = opts->tools ? cJSON_Duplicate(opts->tools, true) : cJSON_CreateNull();
    if (!tools)
        goto out;
    cJSON_AddItemToObject(vars, "tools", tools);
    if (!cJSON_AddBoolToObject(vars, "add_generation_prompt", opts->add_generation_prompt && !continuing))
        goto out;
    const kvd_template *tmpl = opts->tools && t->tool_use ? t->tool_use : t->main;
    kvd_template_output out;
    rc = kvd_template_render(tmpl, vars, t->trusted, NULL, &out, err);
    if (rc != 0) {
        snprintf(param, param_cap, "messages");
        goto out;
    }
    if (continuing &&
        (rc = cut_after_final(&out, cJSON_GetObjectItemCaseSensitive(vars, "messages"), param, param_cap, err)) != 0) {
        kvd_template_output_free(&out);
        goto out;
    }
    kvd_sbuf_reset(&p->text);
    if (kvd_sbuf_append(&p->text, out.text, out.len) != 0 || kvd_sbuf_reserve(&p->text, 1) != 0) {
        kvd_template_output_free(&out);
        rc = kvd_error_set(err, KVD_ENOMEM, "chat template: out of memory");
        goto out;
    }
    p->text.data[p->text.len] = '\0';
    free(p->data_spans);
    p->data_spans = out.data_spans;
    p->num_data_spans = out.num_data_spans;
    out.data_spans = NULL;
    kvd_template_output_free(&out);
    rc = 0;
out:
    if (rc == KVD_ENOMEM && err && !err->msg[0])
        kvd_error_set(err, KVD_ENOMEM, "chat template: out of memory");
    cJSON_Delete(msgs);
    cJSON_Delete(vars);
    return rc;
}

/* ---- encoding ---- */

typedef struct marker {
    size_t offset, len;
    int32_t id;
} marker;

typedef struct marker_list {
    marker *items;
    size_t count, cap;
} marker_list;

static int add_marker(marker_list *m, size_t offset, size_t len, int32_t id)
{
    if (m->count == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 32;
        marker *grown = realloc(m->items, cap * sizeof *grown);
        if (!grown)
            return KVD_ENOMEM;
        m->items = grown;
        m->cap = cap;
    }
    m->items[m->count++] = (marker){offset, len, id};
    return 0;
}

/* Special tokens in text[from, to) (template text): encode it with special-token
 * matching, then find each special id's text in order. */
static int find_specials(const kvd_tokenizer *tok, const char *text, size_t from, size_t to, marker_list *m)
{
    if (to <= from)
        return 0;
    int32_t *ids = NULL;
    int n = kvd_tokenizer_encode(tok, text + from, to - from, true, &ids);
    if (n < 0)
        return n;
    size_t cursor = from;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        if (!kvd_tokenizer_is_special(tok, ids[i]))
            continue;
        size_t len = 0;
        char *piece = kvd_tokenizer_decode(tok, &ids[i], 1, false, &len, NULL);
        if (!piece) {
            rc = KVD_ENOMEM;
            break;
        }
        const char *hit = len ? memmem(text + cursor, to - cursor, piece, len) : NULL;
        free(piece);
        if (!hit)
            continue;
        size_t at = (size_t)(hit - text);
        rc = add_marker(m, at, len, ids[i]);
        cursor = at + len;
    }
    free(ids);
    return rc;
}

int kvd_chat_encode(const kvd_chat_prompt *p, const kvd_tokenizer *tok, int32_t **ids, kvd_error *err)
{
    const char *text = p->text.data ? p->text.data : "";
    size_t len = p->text.len;
    marker_list markers = {0};
    int rc = 0;
    size_t pos = 0;
    for (size_t k = 0; k <= p->num_data_spans && rc == 0; k++) {
        size_t end = k < p->num_data_spans ? p->data_spans[k].offset : len;
        rc = find_specials(tok, text, pos, end, &markers);
        if (k < p->num_data_spans)
            pos = p->data_spans[k].offset + p->data_spans[k].len;
    }
    int32_t *out = NULL;
    size_t count = 0, cap = 0;
    pos = 0;
    for (size_t s = 0; s <= markers.count && rc == 0; s++) {
        size_t end = s < markers.count ? markers.items[s].offset : len;
        int32_t *span = NULL;
        int num = 0;
        if (end > pos) {
            num = kvd_tokenizer_encode(tok, text + pos, end - pos, false, &span);
            if (num < 0) {
                rc = num;
                break;
            }
        }
        size_t need = count + (size_t)num + 1;
        if (need > cap) {
            size_t grown_cap = cap ? cap : 64;
            while (grown_cap < need)
                grown_cap *= 2;
            int32_t *grown = realloc(out, grown_cap * sizeof *grown);
            if (!grown) {
                free(span);
                rc = KVD_ENOMEM;
                break;
            }
            out = grown;
            cap = grown_cap;
        }
        if (num)
            memcpy(out + count, span, (size_t)num * sizeof *span);
        count += (size_t)num;
        free(span);
        if (s < markers.count) {
            out[count++] = markers.items[s].id;
            pos = end + markers.items[s].len;
        }
    }
    free(markers.items);
    if (rc != 0) {
        free(out);
        return kvd_error_set(err, rc, "chat template: %s", rc == KVD_ENOMEM ? "out of memory" : "encoding failed");
    }
    if (!out && !(out = malloc(sizeof *out))) /* never NULL on success */
        return kvd_error_set(err, KVD_ENOMEM, "chat template: out of memory");
    *ids = out;
    return (int)count;
}
