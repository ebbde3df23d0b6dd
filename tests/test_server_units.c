/* test_server_units.c - unit tests of the daemon's pure parts: configuration, request
 * parsing, the ChatML template, metrics exposition and the UTF-8/buffer helpers.
 *
 * None of these needs a model or a socket; the chat encoding test loads the real
 * tokenizer from $KVD_TOKENIZER_JSON to check the exact ids around the template's
 * special tokens. Expected values are written out literally (exact strings, ids,
 * byte sequences), never recomputed with the code under test.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "chat.h"
#include "config.h"
#include "metrics.h"
#include "oai_request.h"
#include "tool_calls.h"
#include "util.h"

/* ---- util ---- */

static void assert_sanitized(const char *in, size_t len, const char *want)
{
    kvd_sbuf sb;
    kvd_sbuf_init(&sb);
    kvd_utf8_append_sanitized(&sb, in, len);
    assert_false(sb.failed);
    assert_string_equal(sb.data ? sb.data : "", want);
    kvd_sbuf_deinit(&sb);
}

static void test_utf8_sanitize(void **state)
{
    (void)state;
    assert_sanitized("plain ascii", 11, "plain ascii");
    assert_sanitized("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80", 14, "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80");
    /* A truncated 3-byte sequence is one maximal subpart: one U+FFFD. */
    assert_sanitized("\xE2\x82" "A", 3, "\xEF\xBF\xBD" "A");
    /* Overlong, surrogate and out-of-range forms: one U+FFFD per byte, as Python does. */
    assert_sanitized("\xC0\xAF", 2, "\xEF\xBF\xBD\xEF\xBF\xBD");
    assert_sanitized("\xED\xA0\x80", 3, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
    assert_sanitized("\xF4\x90\x80\x80", 4, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
    /* NUL would cut a C string short and is replaced too. */
    assert_sanitized("a\0b", 3, "a\xEF\xBF\xBD" "b");
    /* A lone lead byte at the very end. */
    assert_sanitized("x\xF0", 2, "x\xEF\xBF\xBD");
    assert_true(kvd_utf8_is_clean("\xE2\x82\xAC", 3));
    assert_false(kvd_utf8_is_clean("\xE2\x82", 2));
    assert_false(kvd_utf8_is_clean("a\0", 2));
}

/* kvd_sbuf_read_file: whole files appended after what the buffer held, an empty file
 * gives an empty NUL-terminated buffer, a missing one an error naming it. */
static void test_sbuf_read_file(void **state)
{
    (void)state;
    char path[] = "/tmp/kvd-sbuf-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    kvd_sbuf sb;
    kvd_sbuf_init(&sb);
    kvd_error err = {0};
    assert_int_equal(kvd_sbuf_read_file(&sb, path, &err), 0);
    assert_non_null(sb.data);
    assert_int_equal(sb.len, 0);
    assert_int_equal(sb.data[0], '\0');
    assert_int_equal(write(fd, "ab\0cd", 5), 5);
    close(fd);
    kvd_sbuf_puts(&sb, "x");
    assert_int_equal(kvd_sbuf_read_file(&sb, path, &err), 0);
    assert_int_equal(sb.len, 6);
    assert_memory_equal(sb.data, "xab\0cd", 7);
    unlink(path);
    assert_int_equal(kvd_sbuf_read_file(&sb, path, &err), KVD_EIO);
    assert_non_null(strstr(err.msg, path));
    assert_int_equal(sb.len, 6);
    /* A device (or a FIFO) is refused: it could block or never end. */
    assert_int_equal(kvd_sbuf_read_file(&sb, "/dev/zero", &err), KVD_EIO);
    assert_non_null(strstr(err.msg, "not a regular file"));
    assert_int_equal(sb.len, 6);
    kvd_sbuf_deinit(&sb);
}

static void test_sbuf_and_consttime(void **state)
{
    (void)state;
    kvd_sbuf sb;
    kvd_sbuf_init(&sb);
    for (int i = 0; i < 1000; i++)
        kvd_sbuf_printf(&sb, "%d,", i);
    assert_int_equal(sb.len, 10 * 2 + 90 * 3 + 900 * 4);
    assert_memory_equal(sb.data, "0,1,2,", 6);
    assert_string_equal(sb.data + sb.len - 4, "999,");
    char long_text[600];
    memset(long_text, 'q', sizeof long_text - 1);
    long_text[sizeof long_text - 1] = '\0';
    kvd_sbuf_reset(&sb);
    kvd_sbuf_printf(&sb, "<%s>", long_text);
    assert_int_equal(sb.len, 601);
    size_t len;
    char *taken = kvd_sbuf_take(&sb, &len);
    assert_int_equal(len, 601);
    assert_int_equal(taken[600], '>');
    free(taken);
    assert_null(sb.data);
    /* reserved but never appended to (a CONNECT's declared body): still "" */
    assert_int_equal(kvd_sbuf_reserve(&sb, 3), 0);
    assert_non_null(sb.data);
    assert_string_equal(sb.data, "");
    kvd_sbuf_deinit(&sb);

    assert_true(kvd_consttime_equal("secret", 6, "secret", 6));
    assert_false(kvd_consttime_equal("secreT", 6, "secret", 6));
    assert_false(kvd_consttime_equal("secret", 6, "secret2", 7));
    assert_false(kvd_consttime_equal("", 0, "x", 1));
    assert_true(kvd_consttime_equal("", 0, "", 0));

    kvd_log_level level;
    assert_int_equal(kvd_log_level_parse("WARNING", &level), 0);
    assert_int_equal(level, KVD_LOG_WARN);
    assert_int_equal(kvd_log_level_parse("loud", &level), -1);
}

/* ---- config ---- */

static void test_config_defaults_and_json(void **state)
{
    (void)state;
    kvd_server_config cfg;
    kvd_config_defaults(&cfg);
    assert_string_equal(cfg.host, "127.0.0.1");
    assert_int_equal(cfg.port, 8000);
    assert_int_equal(cfg.block_size, 16);
    assert_int_equal(cfg.max_body_bytes, 4 << 20);
    assert_int_equal(cfg.header_timeout_ms, 10000);
    assert_int_equal(cfg.idle_timeout_ms, 60000);
    assert_int_equal(cfg.body_timeout_ms, 30000);
    assert_int_equal(cfg.max_connections, 1024);
    assert_int_equal(cfg.drain_timeout_s, 30);
    assert_true(cfg.enable_prefix_cache);

    const char *json = "{\"host\": \"0.0.0.0\", \"port\": 9001, \"kv_cache_mb\": 64, \"kv_dtype\": \"bf16\","
                       " \"max_num_seqs\": 8, \"max_batched_tokens\": 256, \"max_queue\": 3,"
                       " \"max_body_bytes\": 65536, \"header_timeout_ms\": 500, \"idle_timeout_ms\": 700,"
                       " \"body_timeout_ms\": 900,"
                       " \"max_connections\": 5, \"drain_timeout_s\": 2, \"api_key\": \"k1\", \"threads\": 2,"
                       " \"enable_prefix_cache\": false, \"log_level\": \"debug\", \"block_size\": 32,"
                       " \"model\": \"/tmp/m\"}";
    kvd_error err = {0};
    assert_int_equal(kvd_config_apply_json(&cfg, json, strlen(json), "x.json", &err), 0);
    assert_string_equal(cfg.host, "0.0.0.0");
    assert_int_equal(cfg.port, 9001);
    assert_int_equal(cfg.kv_cache_bytes, 64ull << 20);
    assert_int_equal(cfg.kv_dtype, KVD_DTYPE_BF16);
    assert_int_equal(cfg.max_num_seqs, 8);
    assert_int_equal(cfg.max_batched_tokens, 256);
    assert_int_equal(cfg.max_queue, 3);
    assert_int_equal(cfg.max_body_bytes, 65536);
    assert_int_equal(cfg.header_timeout_ms, 500);
    assert_int_equal(cfg.idle_timeout_ms, 700);
    assert_int_equal(cfg.body_timeout_ms, 900);
    assert_int_equal(cfg.max_connections, 5);
    assert_int_equal(cfg.drain_timeout_s, 2);
    assert_string_equal(cfg.api_key, "k1");
    assert_int_equal(cfg.threads, 2);
    assert_false(cfg.enable_prefix_cache);
    assert_int_equal(cfg.log_level, KVD_LOG_DEBUG);
    assert_int_equal(cfg.block_size, 32);
    assert_string_equal(cfg.model, "/tmp/m");
}

static void assert_json_fails(const char *json, const char *message_part)
{
    kvd_server_config cfg, before;
    kvd_config_defaults(&cfg);
    before = cfg;
    kvd_error err = {0};
    int rc = kvd_config_apply_json(&cfg, json, strlen(json), "c.json", &err);
    assert_true(rc < 0);
    if (!strstr(err.msg, message_part))
        fail_msg("message \"%s\" lacks \"%s\"", err.msg, message_part);
    /* A failed file changes nothing. */
    assert_memory_equal(&cfg, &before, sizeof cfg);
}

static void test_config_json_errors(void **state)
{
    (void)state;
    assert_json_fails("{\"port\": 1, \"prot\": 2}", "c.json: unknown key \"prot\"");
    assert_json_fails("{\"port\": \"80\"}", "c.json: key \"port\": must be an integer");
    assert_json_fails("{\"port\": 70000}", "key \"port\": must be an integer in 0..65535");
    assert_json_fails("{\"port\": 80.5}", "key \"port\": must be an integer");
    assert_json_fails("{\"enable_prefix_cache\": 1}", "key \"enable_prefix_cache\": must be true or false");
    assert_json_fails("{\"kv_dtype\": \"int4\"}", "key \"kv_dtype\": \"int4\" is not one of f16, bf16, f32, int8, fp8");
    assert_json_fails("{\"log_level\": \"chatty\"}", "key \"log_level\"");
    assert_json_fails("{\"kv_cache_bytes\": 1024, \"kv_cache_mb\": 1}", "both set");
    assert_json_fails("[1, 2]", "c.json: must hold a JSON object");
    assert_json_fails("{\"port\": ", "c.json: not valid JSON");
    assert_json_fails("{\"max_connections\": 0}", "key \"max_connections\"");
    assert_json_fails("{\"body_timeout_ms\": 0}", "key \"body_timeout_ms\": must be an integer in 1..86400000");
}

static int parse_args(kvd_server_config *cfg, kvd_error *err, bool *help, ...)
{
    char *argv[32];
    int argc = 0;
    argv[argc++] = "kvd";
    va_list ap;
    va_start(ap, help);
    char *arg;
    while ((arg = va_arg(ap, char *)) != NULL)
        argv[argc++] = arg;
    va_end(ap);
    argv[argc] = NULL;
    return kvd_config_from_args(cfg, argc, argv, help, err);
}

static void test_config_flags(void **state)
{
    (void)state;
    char path[] = "/tmp/kvd-test-config-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *file = "{\"port\": 7000, \"max_queue\": 9, \"kv_dtype\": \"f32\", \"log_level\": \"warn\"}";
    assert_int_equal(write(fd, file, strlen(file)), (ssize_t)strlen(file));
    close(fd);

    kvd_server_config cfg;
    kvd_error err = {0};
    bool help;
    /* Flags win over the file wherever --config stands. */
    assert_int_equal(parse_args(&cfg, &err, &help, "--port", "0", "--config", path, "--max-queue=2",
                                "--no-prefix-cache", "--kv-cache-mb", "3", "--model", "/x/y/qwen-tiny/", NULL),
                     0);
    assert_false(help);
    assert_int_equal(cfg.port, 0);
    assert_int_equal(cfg.max_queue, 2);
    assert_int_equal(cfg.kv_dtype, KVD_DTYPE_F32);
    assert_int_equal(cfg.log_level, KVD_LOG_WARN);
    assert_false(cfg.enable_prefix_cache);
    assert_int_equal(cfg.kv_cache_bytes, 3ull << 20);
    assert_string_equal(cfg.config_path, path);
    char name[64];
    kvd_config_model_name(&cfg, name, sizeof name);
    assert_string_equal(name, "qwen-tiny");

    assert_int_equal(parse_args(&cfg, &err, &help, "--api-key", "s3", "--threads", "4", "--block-size", "8",
                                "--host", "::1", "--log-level", "error", "--kv-dtype", "bf16",
                                "--max-num-seqs", "3", "--max-batched-tokens", "100", "--body-timeout-ms=1500", NULL),
                     0);
    assert_string_equal(cfg.api_key, "s3");
    assert_int_equal(cfg.threads, 4);
    assert_int_equal(cfg.block_size, 8);
    assert_string_equal(cfg.host, "::1");
    assert_int_equal(cfg.log_level, KVD_LOG_ERROR);
    assert_int_equal(cfg.kv_dtype, KVD_DTYPE_BF16);
    assert_int_equal(cfg.max_num_seqs, 3);
    assert_int_equal(cfg.max_batched_tokens, 100);
    assert_int_equal(cfg.body_timeout_ms, 1500);

    assert_int_equal(parse_args(&cfg, &err, &help, "--port", "x", NULL), KVD_EINVAL);
    assert_string_equal(err.msg, "--port: \"x\" is not an integer");
    assert_int_equal(parse_args(&cfg, &err, &help, "--bogus", NULL), KVD_EINVAL);
    assert_string_equal(err.msg, "unknown flag --bogus (see --help)");
    assert_int_equal(parse_args(&cfg, &err, &help, "--kv-dtype", "f8", NULL), KVD_EINVAL);
    assert_string_equal(err.msg, "--kv-dtype: \"f8\" is not one of f16, bf16, f32, int8, fp8");
    assert_int_equal(parse_args(&cfg, &err, &help, "--port", NULL), KVD_EINVAL);
    assert_string_equal(err.msg, "--port: needs a value");
    assert_int_equal(parse_args(&cfg, &err, &help, "--body-timeout-ms", "soon", NULL), KVD_EINVAL);
    assert_string_equal(err.msg, "--body-timeout-ms: \"soon\" is not an integer");
    assert_int_equal(parse_args(&cfg, &err, &help, "--config", "/nonexistent/kvd.json", NULL), KVD_EIO);
    assert_non_null(strstr(err.msg, "/nonexistent/kvd.json"));
    assert_int_equal(parse_args(&cfg, &err, &help, "--port", "1", "--help", NULL), 0);
    assert_true(help);
    unlink(path);
}

static void test_config_validate(void **state)
{
    (void)state;
    kvd_server_config cfg;
    kvd_config_defaults(&cfg);
    kvd_error err = {0};
    assert_int_equal(kvd_config_validate(&cfg, &err), KVD_EINVAL);
    assert_string_equal(err.msg, "model: not set (use --model DIR or the \"model\" key)");
    snprintf(cfg.model, sizeof cfg.model, "/nonexistent-model-dir");
    assert_int_equal(kvd_config_validate(&cfg, &err), KVD_EINVAL);
    assert_string_equal(err.msg, "model: /nonexistent-model-dir is not a directory or a file");
    snprintf(cfg.model, sizeof cfg.model, "/tmp");
    assert_int_equal(kvd_config_validate(&cfg, &err), 0);
    cfg.block_size = 24;
    assert_int_equal(kvd_config_validate(&cfg, &err), KVD_EINVAL);
    assert_string_equal(err.msg, "block_size: 24 is not a power of two");
}

static void test_config_help_lists_every_flag(void **state)
{
    (void)state;
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    kvd_config_print_help(out, "kvd");
    fclose(out);
    static const char *const flags[] = {
        "--model DIR", "--config FILE", "--host ADDR", "--port N", "--block-size N", "--kv-cache-mb MIB",
        "--kv-dtype f16|bf16|f32", "--max-num-seqs N", "--max-batched-tokens N", "--max-queue N",
        "--api-key KEY", "--threads N", "--no-prefix-cache", "--log-level debug|info|warn|error",
        "--max-body-bytes BYTES", "--header-timeout-ms MS", "--idle-timeout-ms MS", "--max-connections N",
        "--drain-timeout-s S", "--kv-cache-bytes BYTES", "--body-timeout-ms MS",
    };
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        if (!strstr(text, flags[i]))
            fail_msg("--help lacks %s", flags[i]);
    assert_non_null(strstr(text, "[default 8000]"));
    assert_non_null(strstr(text, "[default \"127.0.0.1\"]"));
    assert_non_null(strstr(text, "[default 512]")); /* kv_cache_mb */
    const char *body_timeout = strstr(text, "--body-timeout-ms MS");
    const char *default_30s = strstr(body_timeout, "[default 30000]");
    assert_true(default_30s && default_30s < strchr(body_timeout, '\n')); /* on its own line */
    free(text);
}

/* ---- request parsing ---- */

static kvd_request_params test_defaults(void)
{
    kvd_request_params p;
    memset(&p, 0, sizeof p);
    p.sampling.temperature = 0.7f;
    p.sampling.top_p = 0.8f;
    p.sampling.top_k = 20;
    p.sampling.repetition_penalty = 1.05f;
    p.sampling.logprobs = -1;
    p.max_tokens = 16;
    p.n = 1;
    p.skip_special_tokens = true;
    return p;
}

/* The built-in chat template (Qwen2.5-Instruct's), parsed once for the whole run. */
static kvd_chat_template *test_template;

static const kvd_chat_template *builtin_template(void)
{
    if (!test_template) {
        kvd_error err = {0};
        test_template = kvd_chat_template_builtin(&err);
        if (!test_template)
            fail_msg("built-in template: %s", err.msg);
    }
    return test_template;
}

static kvd_oai_model_info test_info(void)
{
    kvd_oai_model_info info = {.max_model_len = 4096, .vocab_size = 151665, .num_chat_stop_ids = 2};
    info.chat_stop_ids[0] = 151645;
    info.chat_stop_ids[1] = 151643;
    info.chat_template = builtin_template();
    return info;
}

typedef struct parsed {
    kvd_oai_request req;
    char param[128];
    kvd_error err;
    int rc;
} parsed;

static void parse(parsed *p, kvd_oai_route route, const char *json)
{
    memset(p, 0, sizeof *p);
    kvd_oai_request_init(&p->req);
    cJSON *body = cJSON_Parse(json);
    assert_non_null(body);
    kvd_request_params defaults = test_defaults();
    kvd_oai_model_info info = test_info();
    p->rc = kvd_oai_parse(&p->req, route, body, &defaults, &info, p->param, sizeof p->param, &p->err);
    cJSON_Delete(body);
}

static void expect_error(kvd_oai_route route, const char *json, const char *param, const char *message)
{
    parsed p;
    parse(&p, route, json);
    if (p.rc != KVD_EINVAL)
        fail_msg("%s: rc %d, expected KVD_EINVAL", json, p.rc);
    if (strcmp(p.param, param) != 0)
        fail_msg("%s: param \"%s\", expected \"%s\"", json, p.param, param);
    if (!strstr(p.err.msg, message))
        fail_msg("%s: message \"%s\" lacks \"%s\"", json, p.err.msg, message);
    kvd_oai_request_deinit(&p.req);
}

static void test_parse_completion_fields(void **state)
{
    (void)state;
    parsed p;
    parse(&p, KVD_OAI_COMPLETIONS, "{\"model\": \"m\", \"prompt\": \"Hi\", \"suffix\": null}");
    assert_int_equal(p.rc, 0);
    assert_string_equal(p.req.prompt_text, "Hi");
    assert_int_equal(p.req.prompt_len, 2);
    assert_int_equal(p.req.params.max_tokens, 16);
    assert_float_equal(p.req.params.sampling.temperature, 0.7f, 1e-6);
    assert_float_equal(p.req.params.sampling.top_p, 0.8f, 1e-6);
    assert_int_equal(p.req.params.sampling.top_k, 20);
    assert_int_equal(p.req.params.sampling.logprobs, -1);
    assert_int_equal(p.req.params.n, 1);
    assert_int_equal(p.req.params.num_stop, 0);
    assert_int_equal(p.req.params.num_stop_token_ids, 0);
    assert_false(p.req.stream);
    assert_false(p.req.seed_given);
    kvd_oai_request_deinit(&p.req);

    parse(&p, KVD_OAI_COMPLETIONS,
          "{\"prompt\": [1, 2, 151664], \"max_tokens\": 5, \"temperature\": 0, \"top_p\": 0.5, \"top_k\": -1,"
          " \"min_p\": 0.1, \"presence_penalty\": 1.5, \"frequency_penalty\": -0.5, \"repetition_penalty\": 1.2,"
          " \"seed\": 42, \"stop\": [\"\\n\\n\", \"END\"], \"n\": 3, \"logprobs\": 2, \"stream\": true,"
          " \"stream_options\": {\"include_usage\": true}, \"ignore_eos\": true, \"user\": \"u\","
          " \"stop_token_ids\": [7, 7, 9], \"skip_special_tokens\": false, \"best_of\": 3}");
    assert_int_equal(p.rc, 0);
    assert_null(p.req.prompt_text);
    assert_int_equal(p.req.num_prompt_ids, 3);
    assert_int_equal(p.req.prompt_ids[2], 151664);
    assert_int_equal(p.req.params.max_tokens, 5);
    assert_float_equal(p.req.params.sampling.temperature, 0.0f, 0);
    assert_float_equal(p.req.params.sampling.top_p, 0.5f, 1e-6);
    assert_int_equal(p.req.params.sampling.top_k, 0);
    assert_float_equal(p.req.params.sampling.min_p, 0.1f, 1e-6);
    assert_float_equal(p.req.params.sampling.presence_penalty, 1.5f, 1e-6);
    assert_float_equal(p.req.params.sampling.frequency_penalty, -0.5f, 1e-6);
    assert_float_equal(p.req.params.sampling.repetition_penalty, 1.2f, 1e-6);
    assert_true(p.req.seed_given);
    assert_int_equal(p.req.params.sampling.seed, 42);
    assert_int_equal(p.req.params.num_stop, 2);
    assert_string_equal(p.req.params.stop[0], "\n\n");
    assert_string_equal(p.req.params.stop[1], "END");
    assert_int_equal(p.req.params.n, 3);
    assert_true(p.req.logprobs);
    assert_int_equal(p.req.top_logprobs, 2);
    assert_int_equal(p.req.params.sampling.logprobs, 2);
    assert_true(p.req.stream);
    assert_true(p.req.include_usage);
    assert_true(p.req.params.ignore_eos);
    assert_false(p.req.params.skip_special_tokens);
    assert_int_equal(p.req.params.num_stop_token_ids, 2);
    assert_int_equal(p.req.params.stop_token_ids[0], 7);
    assert_int_equal(p.req.params.stop_token_ids[1], 9);
    kvd_oai_request_deinit(&p.req);

    /* The single-prompt list forms, and null meaning absent. */
    parse(&p, KVD_OAI_COMPLETIONS, "{\"prompt\": [\"only\"], \"max_tokens\": null, \"stop\": \"X\", \"seed\": -1}");
    assert_int_equal(p.rc, 0);
    assert_string_equal(p.req.prompt_text, "only");
    assert_int_equal(p.req.params.max_tokens, 16);
    assert_int_equal(p.req.params.num_stop, 1);
    assert_false(p.req.seed_given); /* -1: a random seed, as llama-server */
    kvd_oai_request_deinit(&p.req);
    parse(&p, KVD_OAI_COMPLETIONS, "{\"prompt\": \"x\", \"seed\": -2}");
    assert_int_equal(p.rc, 0);
    assert_true(p.req.seed_given);
    assert_int_equal(p.req.params.sampling.seed, UINT64_MAX - 1);
    kvd_oai_request_deinit(&p.req);
    parse(&p, KVD_OAI_COMPLETIONS, "{\"prompt\": [[5, 6]], \"max_completion_tokens\": 9, \"max_tokens\": 3}");
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.req.num_prompt_ids, 2);
    assert_int_equal(p.req.prompt_ids[1], 6);
    assert_int_equal(p.req.params.max_tokens, 9);
    kvd_oai_request_deinit(&p.req);
}

static void test_parse_errors(void **state)
{
    (void)state;
    const kvd_oai_route C = KVD_OAI_COMPLETIONS, CHAT = KVD_OAI_CHAT;
    expect_error(C, "{}", "prompt", "is required");
    expect_error(C, "{\"prompt\": 5}", "prompt", "must be a string");
    expect_error(C, "{\"prompt\": []}", "prompt", "must not be empty");
    expect_error(C, "{\"prompt\": [\"a\", \"b\"]}", "prompt", "batch prompts");
    expect_error(C, "{\"prompt\": [1, 151665]}", "prompt", "0..151664");
    expect_error(C, "{\"prompt\": [1.5]}", "prompt", "integer");
    expect_error(C, "{\"prompt\": \"x\", \"max_tokens\": \"5\"}", "max_tokens", "must be an integer");
    expect_error(C, "{\"prompt\": \"x\", \"max_tokens\": 0}", "max_tokens", "1..4096");
    expect_error(C, "{\"prompt\": \"x\", \"max_tokens\": 4097}", "max_tokens", "1..4096");
    expect_error(C, "{\"prompt\": \"x\", \"max_tokens\": 2.5}", "max_tokens", "integer");
    expect_error(C, "{\"prompt\": \"x\", \"temperature\": \"hot\"}", "temperature", "must be a number");
    expect_error(C, "{\"prompt\": \"x\", \"temperature\": 2.5}", "temperature", "[0, 2]");
    expect_error(C, "{\"prompt\": \"x\", \"top_p\": 0}", "top_p", "(0, 1]");
    expect_error(C, "{\"prompt\": \"x\", \"top_p\": 1e-94}", "top_p", "(0, 1]"); /* 0 as a float */
    expect_error(C, "{\"prompt\": \"x\", \"presence_penalty\": -3}", "presence_penalty", "[-2, 2]");
    expect_error(C, "{\"prompt\": \"x\", \"repetition_penalty\": 0}", "repetition_penalty", "(0, 10]");
    expect_error(C, "{\"prompt\": \"x\", \"n\": 0}", "n", "1..16");
    expect_error(C, "{\"prompt\": \"x\", \"n\": 17}", "n", "1..16");
    expect_error(C, "{\"prompt\": \"x\", \"stop\": 3}", "stop", "string or an array");
    expect_error(C, "{\"prompt\": \"x\", \"stop\": [\"a\", 3]}", "stop", "string or an array");
    expect_error(C, "{\"prompt\": \"x\", \"stop\": [\"\"]}", "stop", "must not be empty");
    expect_error(C,
                 "{\"prompt\": \"x\", \"stop\": [\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\",\"10\","
                 "\"11\",\"12\",\"13\",\"14\",\"15\",\"16\",\"17\"]}",
                 "stop", "at most 16");
    expect_error(C, "{\"prompt\": \"x\", \"logprobs\": true}", "logprobs", "integer");
    expect_error(C, "{\"prompt\": \"x\", \"logprobs\": 21}", "logprobs", "0..20");
    expect_error(C, "{\"prompt\": \"x\", \"stream\": 1}", "stream", "boolean");
    expect_error(C, "{\"prompt\": \"x\", \"stream_options\": {\"include_usage\": true}}", "stream_options",
                 "only allowed when \"stream\" is true");
    expect_error(C, "{\"prompt\": \"x\", \"stream\": true, \"stream_options\": {\"include_usage\": 1}}",
                 "stream_options.include_usage", "boolean");
    expect_error(C, "{\"prompt\": \"x\", \"seed\": \"7\"}", "seed", "integer");
    expect_error(C, "{\"prompt\": \"x\", \"ignore_eos\": \"yes\"}", "ignore_eos", "boolean");
    expect_error(C, "{\"prompt\": \"x\", \"model\": 3}", "model", "must be a string");
    expect_error(C, "{\"prompt\": \"x\", \"user\": {}}", "user", "must be a string");
    expect_error(C, "{\"prompt\": \"x\", \"echo\": true, \"logprobs\": 1}", "echo", "prompt's logprobs");
    expect_error(CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"echo\": true}", "echo",
                 "/v1/completions only");
    expect_error(C, "{\"prompt\": \"x\", \"best_of\": 2}", "best_of", "not supported");
    expect_error(C, "{\"prompt\": \"x\", \"logit_bias\": {\"151665\": 1}}", "logit_bias", "0..151664");
    expect_error(C, "{\"prompt\": \"x\", \"logit_bias\": {\"-1\": 1}}", "logit_bias", "not a token id");
    expect_error(C, "{\"prompt\": \"x\", \"logit_bias\": {\"5x\": 1}}", "logit_bias", "not a token id");
    expect_error(C, "{\"prompt\": \"x\", \"logit_bias\": {\"5\": 101}}", "logit_bias", "[-100, 100]");
    expect_error(C, "{\"prompt\": \"x\", \"logit_bias\": {\"5\": \"1\"}}", "logit_bias", "[-100, 100]");
    expect_error(C, "{\"prompt\": \"x\", \"logit_bias\": {\"5\": 1, \"05\": 2}}", "logit_bias", "twice");
    expect_error(C, "{\"prompt\": \"x\", \"logit_bias\": [5]}", "logit_bias", "must be an object");
    expect_error(C, "{\"prompt\": \"x\", \"min_tokens\": -1}", "min_tokens", "0..4096");
    expect_error(C, "{\"prompt\": \"x\", \"min_tokens\": 17}", "min_tokens", "must not exceed max_tokens (16)");
    expect_error(C, "{\"prompt\": \"x\", \"include_stop_str_in_output\": 1}", "include_stop_str_in_output",
                 "boolean");
    /* Known, not implemented: refused with vLLM's words where vLLM refuses too. */
    expect_error(C, "{\"prompt\": \"x\", \"suffix\": \"\"}", "suffix", "suffix is not currently supported");
    expect_error(C, "{\"prompt\": \"x\", \"prompt_logprobs\": 0}", "prompt_logprobs", "not supported");
    expect_error(CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"prompt_logprobs\": 1}",
                 "prompt_logprobs", "not supported");
    /* Other servers' fields, and typos: refused by name, never ignored. */
    static const char *const foreign[] = {"mirostat", "guided_decoding_backend", "typical_p",
                                          "use_beam_search", "n_predict", "unknown_field", "top_logprobs"};
    for (size_t i = 0; i < sizeof foreign / sizeof foreign[0]; i++) {
        char json[128];
        snprintf(json, sizeof json, "{\"prompt\": \"x\", \"%s\": 1}", foreign[i]);
        expect_error(C, json, foreign[i], "not supported by kvd");
    }
    /* Chat-only fields on completions (tools are honored on chat). */
    expect_error(C, "{\"prompt\": \"x\", \"tools\": []}", "tools", "not supported by kvd");
    expect_error(CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"prompt\": \"x\"}",
                 "prompt", "not supported by kvd");
    expect_error(C, "{\"prompt\": \"x\", \"stream\": true, \"stream_options\": {\"continuous_usage_stats\": true}}",
                 "stream_options.continuous_usage_stats", "requires \"include_usage\": true");
    expect_error(C, "{\"prompt\": \"x\", \"stream\": true, \"stream_options\": {\"chunk_size\": 4}}",
                 "stream_options.chunk_size", "not supported");
    expect_error(C, "{\"prompt\": \"x\", \"stop_token_ids\": [-1]}", "stop_token_ids", "0..151664");
    expect_error(CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logprobs\": 2}", "logprobs",
                 "boolean");
    expect_error(CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"top_logprobs\": 3}",
                 "top_logprobs", "requires \"logprobs\": true");
    /* Structured output: shapes are checked here, schemas compile on a worker (jobs.c). */
    expect_error(CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"response_format\": "
                       "{\"type\": \"xml\"}}",
                 "response_format", "type must be");
    expect_error(CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"response_format\": "
                       "{\"type\": \"json_schema\", \"json_schema\": {\"name\": \"n\"}}}",
                 "response_format.json_schema.schema", "is required");
    expect_error(C, "{\"prompt\": \"x\", \"guided_json\": 1}", "guided_json", "JSON Schema");
    expect_error(C, "{\"prompt\": \"x\", \"guided_choice\": []}", "guided_choice", "non-empty array");
    expect_error(C, "{\"prompt\": \"x\", \"guided_regex\": \"a\", \"grammar\": \"root ::= \\\"a\\\"\"}", "grammar",
                 "only one of");
    expect_error(C, "{\"prompt\": \"x\", \"structured_outputs\": {\"xml\": 1}}", "structured_outputs.xml",
                 "not supported");
    expect_error(CHAT, "{}", "messages", "is required");
    expect_error(CHAT, "{\"messages\": []}", "messages", "must not be empty");
    expect_error(CHAT, "{\"messages\": {}}", "messages", "must be an array");
    expect_error(CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"robot\", \"content\": \"b\"}]}",
                 "messages[1].role", "must be one of");
    expect_error(CHAT, "{\"messages\": [{\"content\": \"a\"}]}", "messages[0].role", "must be a string");
    expect_error(CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}", "messages[0].content",
                 "must be a string or an array");
    expect_error(CHAT, "{\"messages\": [{\"role\": \"user\"}]}", "messages[0].content", "is required");
    expect_error(CHAT,
                 "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", \"image_url\": {}}]}]}",
                 "messages[0].content[0].type", "only \"text\" parts");
    expect_error(CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]}",
                 "messages[0].content[0].text", "must be a string");
    expect_error(CHAT, "{\"messages\": [\"hi\"]}", "messages[0]", "must be an object");
}

/* The fields kvd honors beyond OpenAI's basics, and the chat stop ids coming on top
 * of a client's 64 stop_token_ids. */
static void test_parse_request_features(void **state)
{
    (void)state;
    parsed p;
    parse(&p, KVD_OAI_COMPLETIONS,
          "{\"prompt\": \"x\", \"max_tokens\": 9, \"min_tokens\": 9, \"include_stop_str_in_output\": true,"
          " \"echo\": true, \"logit_bias\": {\"5\": -100, \"151664\": 2.5}, \"stream\": true,"
          " \"stream_options\": {\"include_usage\": true, \"continuous_usage_stats\": true}}");
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.req.params.sampling.min_tokens, 9);
    assert_true(p.req.params.include_stop_str_in_output);
    assert_true(p.req.echo);
    assert_true(p.req.continuous_usage);
    assert_int_equal(p.req.params.sampling.num_logit_bias, 2);
    assert_int_equal(p.req.params.sampling.logit_bias[0].token, 5);
    assert_float_equal(p.req.params.sampling.logit_bias[0].bias, -100.0f, 0.0f);
    assert_int_equal(p.req.params.sampling.logit_bias[1].token, 151664);
    assert_float_equal(p.req.params.sampling.logit_bias[1].bias, 2.5f, 0.0f);
    kvd_oai_request_deinit(&p.req);

    /* 64 client ids plus the two chat stop ids (one of them listed by the client too). */
    char json[2048];
    int len = snprintf(json, sizeof json, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stop_token_ids\": [");
    for (int i = 0; i < 64; i++)
        len += snprintf(json + len, sizeof json - (size_t)len, "%s%d", i ? "," : "", i == 63 ? 151645 : 100 + i);
    snprintf(json + len, sizeof json - (size_t)len, "]}");
    parse(&p, KVD_OAI_CHAT, json);
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.req.params.num_stop_token_ids, 65);
    assert_int_equal(p.req.params.stop_token_ids[63], 151645);
    assert_int_equal(p.req.params.stop_token_ids[64], 151643);
    kvd_oai_request_deinit(&p.req);
    len = snprintf(json, sizeof json, "{\"prompt\": \"x\", \"stop_token_ids\": [");
    for (int i = 0; i < 65; i++)
        len += snprintf(json + len, sizeof json - (size_t)len, "%s%d", i ? "," : "", 100 + i);
    snprintf(json + len, sizeof json - (size_t)len, "]}");
    expect_error(KVD_OAI_COMPLETIONS, json, "stop_token_ids", "at most 64 ids");
}

/* /tokenize's parse of json into r (initialised here); returns its code. */
static int parse_tokenize(kvd_oai_request *r, const char *json, char *param, size_t cap)
{
    kvd_oai_request_init(r);
    cJSON *body = cJSON_Parse(json);
    assert_non_null(body);
    kvd_error err = {0};
    kvd_oai_model_info info = test_info();
    int rc = kvd_oai_parse_tokenize(r, body, &info, param, cap, &err);
    cJSON_Delete(body);
    return rc;
}

static void test_parse_tokenize_fields(void **state)
{
    (void)state;
    kvd_oai_request r;
    char param[128];
    const char *user_turn = "Hi<|im_end|>\n", *generation = "<|im_start|>assistant\n";
    assert_int_equal(parse_tokenize(&r, "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}", param,
                                    sizeof param), 0);
    size_t n = r.chat.text.len;
    assert_string_equal(r.chat.text.data + n - strlen(generation), generation);
    kvd_oai_request_deinit(&r);
    assert_int_equal(parse_tokenize(&r, "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], "
                                        "\"add_generation_prompt\": false}", param, sizeof param), 0);
    n = r.chat.text.len;
    assert_int_equal(strlen(r.chat.text.data), n);
    assert_string_equal(r.chat.text.data + n - strlen(user_turn), user_turn);
    kvd_oai_request_deinit(&r);

    static const char *const refused[][2] = {
        {"{\"prompt\": \"x\", \"add_generation_prompt\": true}", "add_generation_prompt"},
        {"{\"prompt\": \"x\", \"continue_final_message\": true}", "continue_final_message"},
        {"{\"prompt\": \"x\", \"add_special_tokens\": 1}", "add_special_tokens"},
    };
    for (int i = 0; i < 3; i++) {
        assert_int_equal(parse_tokenize(&r, refused[i][0], param, sizeof param), KVD_EINVAL);
        assert_string_equal(param, refused[i][1]);
        kvd_oai_request_deinit(&r);
    }
}

/* NUL characters are found wherever a string holds one, with the top-level field. */
static void test_find_nul(void **state)
{
    (void)state;
    static const char *const cases[][2] = {
        {"{\"prompt\": \"a\\u0000b\"}", "prompt"},
        {"{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"x\\u0000\"}]}", "messages"},
        {"{\"stop\": [\"ok\", \"\\u0000\"], \"prompt\": \"p\"}", "stop"},
        {"{\"a\\u0000\": 1}", "(a field name)"},
        {"{\"prompt\": \"a\\\\u0000b\"}", NULL},  /* an escaped backslash, then plain text */
        {"{\"prompt\": \"\\\\\\u0000\"}", "prompt"}, /* a backslash, then a NUL */
        {"{\"prompt\": \"u0000\", \"x\": [\"\\u0001\"]}", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char field[64];
        bool found = kvd_oai_find_nul(cases[i][0], strlen(cases[i][0]), field, sizeof field);
        if (found != (cases[i][1] != NULL))
            fail_msg("%s: found %d", cases[i][0], found);
        if (found)
            assert_string_equal(field, cases[i][1]);
    }
    const char raw[] = "{\"prompt\": \"a\0b\"}";
    char field[64];
    assert_true(kvd_oai_find_nul(raw, sizeof raw - 1, field, sizeof field));
    assert_string_equal(field, "prompt");
}

static void test_parse_chat_defaults(void **state)
{
    (void)state;
    parsed p;
    parse(&p, KVD_OAI_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"logprobs\": true, "
                            "\"top_logprobs\": 3}");
    assert_int_equal(p.rc, 0);
    /* Chat runs to the end of the context unless told otherwise, and stops at the
     * end of the assistant's turn. */
    assert_int_equal(p.req.params.max_tokens, 4096);
    assert_int_equal(p.req.params.num_stop_token_ids, 2);
    assert_int_equal(p.req.params.stop_token_ids[0], 151645);
    assert_int_equal(p.req.params.stop_token_ids[1], 151643);
    assert_true(p.req.logprobs);
    assert_int_equal(p.req.params.sampling.logprobs, 3);
    assert_string_equal(p.req.chat.text.data,
                        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                        "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    kvd_oai_request_deinit(&p.req);

    parse(&p, KVD_OAI_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"ignore_eos\": true, "
                            "\"max_tokens\": 7}");
    assert_int_equal(p.rc, 0);
    assert_int_equal(p.req.params.num_stop_token_ids, 0);
    assert_int_equal(p.req.params.max_tokens, 7);
    assert_int_equal(p.req.params.sampling.logprobs, -1);
    kvd_oai_request_deinit(&p.req);
}

/* ---- chat template ---- */

static void render_with(const kvd_chat_template *t, const char *messages_json, const kvd_chat_options *opts,
                        kvd_chat_prompt *p)
{
    cJSON *messages = cJSON_Parse(messages_json);
    assert_non_null(messages);
    kvd_chat_prompt_init(p);
    char param[64];
    kvd_error err = {0};
    int rc = kvd_chat_render(t, messages, opts, p, param, sizeof param, &err);
    if (rc)
        fail_msg("render failed: %s", err.msg);
    cJSON_Delete(messages);
}

static void render_ok(const char *messages_json, const char *want)
{
    kvd_chat_prompt p;
    render_with(builtin_template(), messages_json, NULL, &p);
    assert_string_equal(p.text.data, want);
    kvd_chat_prompt_deinit(&p);
}

static void test_chat_render(void **state)
{
    (void)state;
    /* Exactly what kvd's hand-written ChatML renderer produced before templates. */
    render_ok("[{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"},"
              " {\"role\": \"assistant\", \"content\": \"Hello!\"}, {\"role\": \"user\", \"content\": \"Bye\"}]",
              "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n");
    render_ok("[{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"a\"}, {\"type\": \"text\", "
              "\"text\": \"b\"}]}]",
              "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n");
    /* Tool results are grouped into one user turn, as Qwen2.5's template does; an
     * assistant turn with null content renders empty; a later system turn renders in place. */
    render_ok("[{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"assistant\", \"content\": null},"
              " {\"role\": \"tool\", \"content\": \"r1\"}, {\"role\": \"tool\", \"content\": \"r2\"},"
              " {\"role\": \"system\", \"content\": \"S2\"}]",
              "<|im_start|>system\nS<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
              "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response>"
              "<|im_end|>\n<|im_start|>system\nS2<|im_end|>\n<|im_start|>assistant\n");
}

static void test_chat_builtin_is_qwen25(void **state)
{
    (void)state;
    const char *root = getenv("KVD_SOURCE_ROOT");
    assert_non_null(root);
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/template/templates/qwen2.5-instruct.jinja", root);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    static char file[8192];
    size_t n = fread(file, 1, sizeof file - 1, f);
    fclose(f);
    file[n] = '\0';
    assert_string_equal(kvd_chat_template_builtin_source(), file);
}

static const char tools_json[] =
    "[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather\","
    " \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}}]";

static void test_chat_tools_and_history(void **state)
{
    (void)state;
    cJSON *tools = cJSON_Parse(tools_json);
    kvd_chat_options opts = {.tools = tools, .add_generation_prompt = true};
    kvd_chat_prompt p;
    /* OpenAI's history shape: arguments as a JSON string, null content, tool_call_id */
    render_with(builtin_template(),
                "[{\"role\": \"user\", \"content\": \"Paris?\"}, {\"role\": \"assistant\", \"content\": null,"
                " \"tool_calls\": [{\"id\": \"c1\", \"type\": \"function\", \"function\": {\"name\": \"get_weather\","
                " \"arguments\": \"{\\\"city\\\": \\\"Paris\\\"}\"}}]}, {\"role\": \"tool\", \"tool_call_id\": \"c1\","
                " \"content\": \"sunny\"}]",
                &opts, &p);
    assert_string_equal(p.text.data,
                        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n"
                        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
                        "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather\", "
                        "\"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}}\n"
                        "</tools>\n\nFor each function call, return a json object with function name and arguments "
                        "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                        "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
                        "<|im_start|>user\nParis?<|im_end|>\n"
                        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": "
                        "\"Paris\"}}\n</tool_call><|im_end|>\n"
                        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
                        "<|im_start|>assistant\n");
    kvd_chat_prompt_deinit(&p);
    /* continue_final_message: the last assistant message stays open */
    kvd_chat_options cont = {.continue_final_message = true, .add_generation_prompt = true}; /* as a request parses */
    render_with(builtin_template(),
                "[{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"<tool_call>\\n\"}]",
                &cont, &p);
    assert_string_equal(p.text.data,
                        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<tool_call>");
    assert_string_equal(p.continued, "<tool_call>\n");
    kvd_chat_prompt_deinit(&p);
    /* continue_final_message with a conversation that does not end with the assistant:
     * a new turn, as an agent loop that keeps the flag on needs */
    render_with(builtin_template(), "[{\"role\": \"user\", \"content\": \"Hi\"}]", &cont, &p);
    assert_string_equal(p.text.data + p.text.len - strlen("Hi<|im_end|>\n<|im_start|>assistant\n"),
                        "Hi<|im_end|>\n<|im_start|>assistant\n");
    assert_null(p.continued);
    kvd_chat_prompt_deinit(&p);
    /* add_generation_prompt false: no open turn */
    kvd_chat_options closed = {0};
    render_with(builtin_template(), "[{\"role\": \"user\", \"content\": \"Hi\"}]", &closed, &p);
    assert_string_equal(p.text.data + p.text.len - strlen("Hi<|im_end|>\n"), "Hi<|im_end|>\n");
    kvd_chat_prompt_deinit(&p);
    cJSON_Delete(tools);
}

static void expect_chat_error(const char *json, const char *param, const char *message)
{
    expect_error(KVD_OAI_CHAT, json, param, message);
}

static void test_chat_tool_fields(void **state)
{
    (void)state;
#define MSG "\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]"
    expect_chat_error("{" MSG ", \"tools\": {}}", "tools", "must be an array");
    expect_chat_error("{" MSG ", \"tools\": [{\"type\": \"retrieval\"}]}", "tools[0].type", "\"function\"");
    expect_chat_error("{" MSG ", \"tools\": [{\"type\": \"function\"}]}", "tools[0].function", "must be an object");
    expect_chat_error("{" MSG ", \"tools\": [{\"type\": \"function\", \"function\": {}}]}", "tools[0].function.name",
                      "is required");
    expect_chat_error("{" MSG ", \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"a b\"}}]}",
                      "tools[0].function.name", "a-z");
    expect_chat_error("{" MSG ", \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": "
                      "{\"type\": \"string\"}}}]}",
                      "tools[0].function.parameters", "JSON Schema object");
    expect_chat_error("{" MSG ", \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": 3}}]}",
                      "tools[0].function.parameters", "JSON Schema object");
    expect_chat_error("{" MSG ", \"tool_choice\": \"sometimes\"}", "tool_choice", "must be");
#define TOOLS_FG "\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}, {\"type\": \"function\", " \
    "\"function\": {\"name\": \"g\", \"parameters\": {\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"integer\"}}}}}]"
    expect_chat_error("{" MSG ", \"tool_choice\": \"required\"}", "tool_choice", "needs \"tools\"");
    expect_chat_error("{" MSG ", " TOOLS_FG ", \"tool_choice\": \"required\", \"response_format\": {\"type\": \"json_object\"}}",
                      "tool_choice", "only one of");
    expect_chat_error("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}], "
                      TOOLS_FG ", \"tool_choice\": \"required\", \"continue_final_message\": true}",
                      "tool_choice", "new assistant turn");
    /* Forced calls: the turn is primed with <tool_call> and a schema forces the body. */
    parsed p;
    parse(&p, KVD_OAI_CHAT, "{" MSG ", " TOOLS_FG ", \"tool_choice\": \"required\"}");
    assert_int_equal(p.rc, 0);
    assert_true(p.req.forced_tool_call && p.req.constrained && !p.req.parallel_tool_calls);
    assert_string_equal(p.req.constraint_field, "tool_choice");
    assert_string_equal(p.req.constraint_src,
                        "{\"anyOf\":[{\"properties\":{\"name\":{\"const\":\"f\"},\"arguments\":{\"type\":\"object\","
                        "\"additionalProperties\":false}},"
                        "\"required\":[\"name\",\"arguments\"],\"type\":\"object\",\"additionalProperties\":false},"
                        "{\"properties\":{\"name\":{\"const\":\"g\"},\"arguments\":{\"type\":\"object\",\"properties\":"
                        "{\"x\":{\"type\":\"integer\"}}}},\"required\":[\"name\",\"arguments\"],\"type\":\"object\","
                        "\"additionalProperties\":false}]}");
    const char *primed = "<|im_start|>assistant\n<tool_call>\n";
    assert_string_equal(p.req.chat.text.data + p.req.chat.text.len - strlen(primed), primed);
    kvd_oai_request_deinit(&p.req);
    parse(&p, KVD_OAI_CHAT,
          "{" MSG ", " TOOLS_FG ", \"tool_choice\": {\"type\": \"function\", \"function\": {\"name\": \"g\"}}}");
    assert_int_equal(p.rc, 0);
    assert_string_equal(p.req.constraint_src,
                        "{\"properties\":{\"name\":{\"const\":\"g\"},\"arguments\":{\"type\":\"object\",\"properties\":"
                        "{\"x\":{\"type\":\"integer\"}}}},\"required\":[\"name\",\"arguments\"],\"type\":\"object\","
                        "\"additionalProperties\":false}");
    kvd_oai_request_deinit(&p.req);
#undef TOOLS_FG
    expect_chat_error("{" MSG ", \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}], \"tool_choice\": "
                      "{\"type\": \"function\", \"function\": {\"name\": \"g\"}}}", "tool_choice.function.name", "names no");
    expect_chat_error("{" MSG ", \"parallel_tool_calls\": 1}", "parallel_tool_calls", "boolean");
    expect_chat_error("{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\"}], \"continue_final_message\": true, "
                      "\"add_generation_prompt\": true}", "continue_final_message", "cannot be combined");
    expect_chat_error("{\"messages\": [{\"role\": \"assistant\", \"content\": null, \"tool_calls\": 5}]}",
                      "messages[0].tool_calls", "must be an array");
    expect_chat_error("{\"messages\": [{\"role\": \"assistant\", \"content\": null, \"tool_calls\": [{\"function\": "
                      "{\"arguments\": \"{}\"}}]}]}", "messages[0].tool_calls[0].function.name", "must be a string");
    /* tool_choice none: tools are not rendered and calls are not parsed */
    parse(&p, KVD_OAI_CHAT, "{" MSG ", \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}], "
                            "\"tool_choice\": \"none\"}");
    assert_int_equal(p.rc, 0);
    assert_false(p.req.tool_calls);
    assert_null(strstr(p.req.chat.text.data, "# Tools"));
    kvd_oai_request_deinit(&p.req);
    parse(&p, KVD_OAI_CHAT, "{" MSG ", \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}], "
                            "\"parallel_tool_calls\": false}");
    assert_int_equal(p.rc, 0);
    assert_true(p.req.tool_calls);
    assert_false(p.req.parallel_tool_calls);
    assert_non_null(strstr(p.req.chat.text.data, "{\"type\": \"function\", \"function\": {\"name\": \"f\"}}"));
    kvd_oai_request_deinit(&p.req);
#undef MSG
}

static char *write_temp(const char *dir, const char *name, const char *text)
{
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    return path;
}

static void test_chat_template_load(void **state)
{
    (void)state;
    char dir[] = "/tmp/kvd_chat_XXXXXX";
    assert_non_null(mkdtemp(dir));
    kvd_error err = {0};
    /* no tokenizer_config.json: the fallback */
    kvd_chat_template *t = kvd_chat_template_load(NULL, NULL, dir, &err);
    assert_non_null(t);
    assert_true(kvd_chat_template_is_fallback(t));
    kvd_chat_template_destroy(t);
    /* a string template, with bos/eos from the config as template text */
    write_temp(dir, "tokenizer_config.json",
               "{\"bos_token\": {\"content\": \"<s>\"}, \"eos_token\": \"</s>\", \"chat_template\": "
               "\"{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}\"}");
    t = kvd_chat_template_load("", NULL, dir, &err);
    assert_non_null(t);
    assert_false(kvd_chat_template_is_fallback(t));
    assert_string_equal(kvd_chat_template_origin(t), "tokenizer_config.json");
    kvd_chat_prompt p;
    render_with(t, "[{\"role\": \"user\", \"content\": \"hi\"}]", NULL, &p);
    assert_string_equal(p.text.data, "<s>[user]hi</s>");
    assert_int_equal(p.num_data_spans, 2); /* "user" and "hi"; <s> and </s> are template text */
    kvd_chat_prompt_deinit(&p);
    kvd_chat_template_destroy(t);
    /* the named-list form: "tool_use" when tools are given */
    write_temp(dir, "tokenizer_config.json",
               "{\"chat_template\": [{\"name\": \"default\", \"template\": \"plain\"}, {\"name\": \"tool_use\", "
               "\"template\": \"tools={{ tools | length }}\"}]}");
    t = kvd_chat_template_load(NULL, NULL, dir, &err);
    assert_non_null(t);
    render_with(t, "[{\"role\": \"user\", \"content\": \"hi\"}]", NULL, &p);
    assert_string_equal(p.text.data, "plain");
    kvd_chat_prompt_deinit(&p);
    cJSON *tools = cJSON_Parse(tools_json);
    kvd_chat_options opts = {.tools = tools};
    render_with(t, "[{\"role\": \"user\", \"content\": \"hi\"}]", &opts, &p);
    assert_string_equal(p.text.data, "tools=1");
    kvd_chat_prompt_deinit(&p);
    cJSON_Delete(tools);
    kvd_chat_template_destroy(t);
    /* a GGUF's template wins over tokenizer_config.json; --chat-template over both */
    t = kvd_chat_template_load(NULL, "gguf", dir, &err);
    assert_string_equal(kvd_chat_template_origin(t), "GGUF tokenizer.chat_template");
    kvd_chat_template_destroy(t);
    char *file = write_temp(dir, "override.jinja", "override\n");
    t = kvd_chat_template_load(file, "gguf", dir, &err);
    assert_non_null(t);
    render_with(t, "[{\"role\": \"user\", \"content\": \"hi\"}]", NULL, &p);
    assert_string_equal(p.text.data, "override");
    kvd_chat_prompt_deinit(&p);
    kvd_chat_template_destroy(t);
    /* an unsupported construct fails at load, naming the source and line */
    write_temp(dir, "tokenizer_config.json", "{\"chat_template\": \"ok\\n{% include 'x' %}\"}");
    t = kvd_chat_template_load(NULL, NULL, dir, &err);
    assert_null(t);
    assert_non_null(strstr(err.msg, "tokenizer_config.json: chat template line 2: unsupported tag 'include'"));
    t = kvd_chat_template_load("/nonexistent/template.jinja", NULL, dir, &err);
    assert_null(t);
    assert_int_equal(err.code, KVD_EIO);
    /* a template that refuses the conversation is a 400 naming messages */
    t = kvd_chat_template_from_source("{{ raise_exception('Conversation roles must alternate') }}", 58, "test", &err);
    assert_non_null(t);
    cJSON *messages = cJSON_Parse("[{\"role\": \"user\", \"content\": \"hi\"}]");
    kvd_chat_prompt_init(&p);
    char param[64];
    assert_int_equal(kvd_chat_render(t, messages, NULL, &p, param, sizeof param, &err), KVD_EINVAL);
    assert_string_equal(param, "messages");
    assert_non_null(strstr(err.msg, "Conversation roles must alternate"));
    kvd_chat_prompt_deinit(&p);
    cJSON_Delete(messages);
    kvd_chat_template_destroy(t);
    unlink(write_temp(dir, "tokenizer_config.json", ""));
    unlink(write_temp(dir, "override.jinja", ""));
    rmdir(dir);
}

static void test_chat_encode_markers_only(void **state)
{
    (void)state;
    const char *path = getenv("KVD_TOKENIZER_JSON");
    assert_non_null(path);
    kvd_error err = {0};
    kvd_tokenizer *tok = kvd_tokenizer_load(path, &err);
    if (!tok)
        fail_msg("tokenizer: %s", err.msg);
    kvd_chat_prompt p;
    render_with(builtin_template(), "[{\"role\": \"user\", \"content\": \"<|im_end|>x\"}]", NULL, &p);
    int32_t *ids = NULL;
    int n = kvd_chat_encode(&p, tok, &ids, &err);
    assert_true(n > 0);
    /* The whole text encoded with special-token matching has one more <|im_end|>:
     * the one the user typed, which the provenance-aware encoding keeps as plain text. */
    int32_t *all = NULL;
    int n_all = kvd_tokenizer_encode(tok, p.text.data, p.text.len, true, &all);
    assert_true(n_all > 0);
    int ends = 0, ends_all = 0;
    for (int i = 0; i < n; i++)
        ends += ids[i] == 151645;
    for (int i = 0; i < n_all; i++)
        ends_all += all[i] == 151645;
    assert_int_equal(ends, 2);     /* the system turn's and the user turn's */
    assert_int_equal(ends_all, 3);
    assert_int_equal(ids[0], 151644);
    assert_int_equal(ids[n - 1], 198); /* "\n" after "assistant" */
    assert_int_equal(ids[n - 2], 77091); /* "assistant" */
    assert_int_equal(ids[n - 3], 151644);
    free(ids);
    free(all);
    kvd_chat_prompt_deinit(&p);

    /* Without special text in the content both encodings agree exactly. */
    render_with(builtin_template(),
                "[{\"role\": \"system\", \"content\": \"Be nice.\"}, {\"role\": \"user\", \"content\": "
                "\"Hello, world! 123\"}]",
                NULL, &p);
    n = kvd_chat_encode(&p, tok, &ids, &err);
    n_all = kvd_tokenizer_encode(tok, p.text.data, p.text.len, true, &all);
    assert_int_equal(n, n_all);
    assert_memory_equal(ids, all, (size_t)n * sizeof *ids);
    free(ids);
    free(all);
    kvd_chat_prompt_deinit(&p);
    kvd_tokenizer_destroy(tok);
}

/* ---- tool calls out of the model's text ---- */

/* Feeds text split at every position (and byte by byte) and checks the result is the
 * same as one feed: content and calls do not depend on how events cut the text. */
static void parse_calls(const char *text, bool parallel, const char *want_content, int want_calls,
                        const char *const *want)
{
    size_t len = strlen(text);
    for (size_t split = 0; split <= len + 1; split++) {
        kvd_tool_parser tp;
        kvd_tool_parser_init(&tp, parallel);
        kvd_tool_delta d;
        kvd_tool_delta_init(&d);
        if (split == len + 1) {
            for (size_t i = 0; i < len; i++)
                assert_int_equal(kvd_tool_parser_feed(&tp, text + i, 1, false, &d), 0);
            assert_int_equal(kvd_tool_parser_feed(&tp, NULL, 0, true, &d), 0);
        } else {
            assert_int_equal(kvd_tool_parser_feed(&tp, text, split, false, &d), 0);
            assert_int_equal(kvd_tool_parser_feed(&tp, text + split, len - split, true, &d), 0);
        }
        const char *content = d.content.data ? d.content.data : "";
        if (strcmp(content, want_content) != 0)
            fail_msg("split %zu of [%s]: content [%s], want [%s]", split, text, content, want_content);
        assert_int_equal(d.num_calls, want_calls);
        for (int k = 0; k < want_calls; k++) {
            assert_string_equal(d.calls[k].name, want[2 * k]);
            assert_string_equal(d.calls[k].arguments, want[2 * k + 1]);
        }
        kvd_tool_delta_deinit(&d);
        kvd_tool_parser_deinit(&tp);
    }
}

static void test_tool_call_parser(void **state)
{
    (void)state;
    parse_calls("Just an answer.\n", true, "Just an answer.\n", 0, NULL);
    parse_calls("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", true,
                "", 1, (const char *const[]){"get_weather", "{\"city\":\"Paris\"}"});
    parse_calls("Let me check.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n"
                "{\"name\": \"b\", \"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>",
                true, "Let me check.", 2, (const char *const[]){"a", "{}", "b", "{\"x\": 1}"});
    /* a block whose JSON does not parse is content, tags and all */
    parse_calls("<tool_call>\n{\"name\": \"a\", \"arguments\": {oops}\n</tool_call>", true,
                "<tool_call>\n{\"name\": \"a\", \"arguments\": {oops}\n</tool_call>", 0, NULL);
    parse_calls("<tool_call>\n{\"arguments\": {}}\n</tool_call>", true, "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
                0, NULL);
    /* cut off before its closing tag: content */
    parse_calls("x <tool_call>\n{\"name\": \"a\"", true, "x <tool_call>\n{\"name\": \"a\"", 0, NULL);
    /* "<tool_" that never becomes a tag is content */
    parse_calls("a <tool_ b", true, "a <tool_ b", 0, NULL);
    /* parallel_tool_calls false: the second block stays content */
    parse_calls("<tool_call>{\"name\": \"a\"}</tool_call><tool_call>{\"name\": \"b\"}</tool_call>", false,
                "<tool_call>{\"name\": \"b\"}</tool_call>", 1, (const char *const[]){"a", "{}"});
}

/* ---- metrics ---- */

static void test_metrics_render(void **state)
{
    (void)state;
    kvd_metrics m;
    kvd_metrics_init(&m);
    kvd_histogram_observe(&m.time_to_first_token, 0.003, 1);  /* bucket le=0.005 */
    kvd_histogram_observe(&m.time_to_first_token, 0.5, 2);    /* le=0.5, twice */
    kvd_histogram_observe(&m.time_to_first_token, 9999.0, 1); /* +Inf only */
    m.finished[KVD_FINISH_STOP] = 3;
    m.finished[KVD_FINISH_LENGTH] = 2;
    m.finished[KVD_FINISH_CANCELLED] = 1;
    kvd_engine_stats st;
    memset(&st, 0, sizeof st);
    st.num_running = 4;
    st.num_waiting = 1;
    st.num_preemptions = 7;
    st.prompt_tokens_total = 100;
    st.generation_tokens_total = 50;
    st.kv.blocks_total = 200;
    st.kv.blocks_used = 50;
    st.kv.blocks_cached = 10;
    st.kv.prefix_query_tokens = 64;
    st.kv.prefix_hit_tokens = 32;
    kvd_sbuf out;
    kvd_sbuf_init(&out);
    kvd_metrics_render(&m, &st, &out);
    static const char *const lines[] = {
        "# HELP kvd:num_requests_running ",
        "# TYPE kvd:num_requests_running gauge\nkvd:num_requests_running 4\n",
        "# TYPE kvd:num_requests_waiting gauge\nkvd:num_requests_waiting 1\n",
        "# TYPE kvd:kv_cache_usage_perc gauge\nkvd:kv_cache_usage_perc 0.25\n",
        "kvd:kv_blocks_total 200\n",
        "kvd:kv_blocks_used 50\n",
        "kvd:kv_blocks_cached 10\n",
        "# TYPE kvd:prefix_cache_queries_total counter\nkvd:prefix_cache_queries_total 64\n",
        "kvd:prefix_cache_hits_total 32\n",
        "kvd:num_preemptions_total 7\n",
        "kvd:prompt_tokens_total 100\n",
        "kvd:generation_tokens_total 50\n",
        "kvd:request_success_total{finished_reason=\"stop\"} 3\n",
        "kvd:request_success_total{finished_reason=\"length\"} 2\n",
        "kvd:request_success_total{finished_reason=\"abort\"} 1\n",
        "kvd:request_success_total{finished_reason=\"error\"} 0\n",
        "# TYPE kvd:time_to_first_token_seconds histogram\n",
        "kvd:time_to_first_token_seconds_bucket{le=\"0.001\"} 0\n"
        "kvd:time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n",
        "kvd:time_to_first_token_seconds_bucket{le=\"0.25\"} 1\n"
        "kvd:time_to_first_token_seconds_bucket{le=\"0.5\"} 3\n",
        "kvd:time_to_first_token_seconds_bucket{le=\"2560\"} 3\n"
        "kvd:time_to_first_token_seconds_bucket{le=\"+Inf\"} 4\n"
        "kvd:time_to_first_token_seconds_sum 10000.003\n"
        "kvd:time_to_first_token_seconds_count 4\n",
        "# TYPE kvd:time_per_output_token_seconds histogram\n",
        "kvd:time_per_output_token_seconds_count 0\n",
        "# TYPE kvd:e2e_request_latency_seconds histogram\n",
        "# TYPE kvd:event_loop_iteration_cpu_seconds histogram\n",
        "kvd:event_loop_iteration_cpu_max_seconds 0\n",
    };
    for (size_t i = 0; i < sizeof lines / sizeof lines[0]; i++)
        if (!strstr(out.data, lines[i]))
            fail_msg("exposition lacks:\n%s\n--- got ---\n%s", lines[i], out.data);
    /* Every sample line belongs to a family announced by # TYPE before it. */
    int types = 0;
    for (const char *p = out.data; (p = strstr(p, "# TYPE ")); p++)
        types++;
    assert_int_equal(types, 22);
    kvd_sbuf_deinit(&out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_utf8_sanitize),
        cmocka_unit_test(test_sbuf_read_file),
        cmocka_unit_test(test_sbuf_and_consttime),
        cmocka_unit_test(test_config_defaults_and_json),
        cmocka_unit_test(test_config_json_errors),
        cmocka_unit_test(test_config_flags),
        cmocka_unit_test(test_config_validate),
        cmocka_unit_test(test_config_help_lists_every_flag),
        cmocka_unit_test(test_parse_completion_fields),
        cmocka_unit_test(test_parse_errors),
        cmocka_unit_test(test_parse_chat_defaults),
        cmocka_unit_test(test_parse_request_features),
        cmocka_unit_test(test_parse_tokenize_fields),
        cmocka_unit_test(test_find_nul),
        cmocka_unit_test(test_chat_render),
        cmocka_unit_test(test_chat_builtin_is_qwen25),
        cmocka_unit_test(test_chat_tools_and_history),
        cmocka_unit_test(test_chat_tool_fields),
        cmocka_unit_test(test_chat_template_load),
        cmocka_unit_test(test_chat_encode_markers_only),
        cmocka_unit_test(test_tool_call_parser),
        cmocka_unit_test(test_metrics_render),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    kvd_chat_template_destroy(test_template);
    return failed;
}
