/* test_kvd_bench_units.c - unit tests of kvd-bench's core: flags, URL, workload, SSE, statistics.
 *
 * Everything here is deterministic: streams are fed with chosen timestamps, statistics
 * are checked against values numpy gives for the same arrays, and the word list is
 * checked against the real Qwen tokenizer's vocabulary (KVD_TOKENIZER_JSON).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "test_files.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvd_bench.h"

/* ---- flags ---- */

static int parse(kvd_bench_options *opt, kvd_error *err, int argc, const char **argv)
{
    kvd_bench_options_default(opt);
    return kvd_bench_parse_args(opt, argc, (char **)argv, err);
}

static void test_defaults(void **state)
{
    (void)state;
    kvd_bench_options opt;
    kvd_error err = {0};
    const char *argv[] = {"kvd-bench"};
    assert_int_equal(parse(&opt, &err, 1, argv), 0);
    assert_string_equal(opt.url, "http://127.0.0.1:8000");
    assert_int_equal(opt.concurrency, 1);
    assert_int_equal(opt.requests, 100);
    assert_int_equal(opt.turns, 1);
    assert_true(opt.duration_s == 600.0);
    assert_int_equal(opt.max_tokens.lo, 64);
    assert_int_equal(opt.ignore_eos, 0);
    assert_string_equal(opt.model, "");
}

static void test_all_flags(void **state)
{
    (void)state;
    kvd_bench_options opt;
    kvd_error err = {0};
    const char *argv[] = {"kvd-bench", "--url", "http://10.0.0.2:9000/v1", "--model=m1",
                          "--api-key", "sk-1", "--concurrency", "7", "--requests", "33",
                          "--turns=3", "--prompt-tokens", "10:20", "--max-tokens", "5",
                          "--ignore-eos", "--seed", "18446744073709551615", "--duration",
                          "12.5", "--timeout", "3", "--temperature", "0.7",
                          "--slo-ttft-ms", "250", "--slo-tpot-ms=40", "--json", "out.json",
                          "--no-progress"};
    int argc = (int)(sizeof argv / sizeof argv[0]);
    assert_int_equal(parse(&opt, &err, argc, argv), 0);
    assert_string_equal(opt.url, "http://10.0.0.2:9000/v1");
    assert_string_equal(opt.model, "m1");
    assert_string_equal(opt.api_key, "sk-1");
    assert_int_equal(opt.concurrency, 7);
    assert_int_equal(opt.requests, 33);
    assert_int_equal(opt.turns, 3);
    assert_int_equal(opt.prompt_tokens.lo, 10);
    assert_int_equal(opt.prompt_tokens.hi, 20);
    assert_int_equal(opt.max_tokens.lo, 5);
    assert_int_equal(opt.max_tokens.hi, 5);
    assert_int_equal(opt.ignore_eos, 1);
    assert_true(opt.seed == UINT64_MAX);
    assert_true(opt.duration_s == 12.5);
    assert_true(opt.timeout_s == 3.0);
    assert_true(opt.temperature == 0.7);
    assert_true(opt.slo_ttft_ms == 250.0);
    assert_true(opt.slo_tpot_ms == 40.0);
    assert_string_equal(opt.json_path, "out.json");
    assert_int_equal(opt.progress, 0);
    assert_true(opt.rate == 0.0);
}

static void test_rate_makes_concurrency_a_cap(void **state)
{
    (void)state;
    kvd_bench_options opt;
    kvd_error err = {0};
    const char *open_loop[] = {"kvd-bench", "--rate", "2.5"};
    assert_int_equal(parse(&opt, &err, 3, open_loop), 0);
    assert_true(opt.rate == 2.5);
    assert_int_equal(opt.concurrency, 0); /* no cap unless asked */
    const char *capped[] = {"kvd-bench", "--rate", "2.5", "--concurrency", "4"};
    assert_int_equal(parse(&opt, &err, 5, capped), 0);
    assert_int_equal(opt.concurrency, 4);
}

static void test_help_wins(void **state)
{
    (void)state;
    kvd_bench_options opt;
    kvd_error err = {0};
    const char *argv[] = {"kvd-bench", "--bogus", "--help"};
    assert_int_equal(parse(&opt, &err, 3, argv), 1);
}

static void expect_bad(const char *flag, const char *value, const char *in_message)
{
    kvd_bench_options opt;
    kvd_error err = {0};
    const char *argv[] = {"kvd-bench", flag, value};
    int argc = value ? 3 : 2;
    assert_int_equal(parse(&opt, &err, argc, argv), KVD_EINVAL);
    if (!strstr(err.msg, in_message))
        fail_msg("message '%s' lacks '%s'", err.msg, in_message);
}

static void test_bad_flags(void **state)
{
    (void)state;
    expect_bad("--prompt-tokens", "20:10", "--prompt-tokens");
    expect_bad("--prompt-tokens", "0", "--prompt-tokens");
    expect_bad("--max-tokens", "x", "--max-tokens");
    expect_bad("--max-tokens", "4:", "--max-tokens");
    expect_bad("--concurrency", "0", "--concurrency");
    expect_bad("--concurrency", "-2", "--concurrency");
    expect_bad("--requests", "5x", "--requests");
    expect_bad("--turns", "0", "--turns");
    expect_bad("--rate", "-1", "--rate");
    expect_bad("--duration", "0", "--duration");
    expect_bad("--seed", "-3", "--seed");
    expect_bad("--url", "https://example.com", "--url");
    expect_bad("--frobnicate", "1", "--frobnicate");
    expect_bad("--json", NULL, "--json needs a value");
    expect_bad("--ignore-eos=1", NULL, "--ignore-eos");
}

static void test_range(void **state)
{
    (void)state;
    kvd_bench_range r;
    kvd_error err = {0};
    assert_int_equal(kvd_bench_parse_range(&r, "17", "--x", &err), 0);
    assert_int_equal(r.lo, 17);
    assert_int_equal(r.hi, 17);
    assert_int_equal(kvd_bench_parse_range(&r, "3:9", "--x", &err), 0);
    assert_int_equal(r.lo, 3);
    assert_int_equal(r.hi, 9);
    assert_int_equal(kvd_bench_parse_range(&r, "9:3", "--x", &err), KVD_EINVAL);
    assert_int_equal(r.lo, 3); /* unchanged on failure */
    assert_int_equal(kvd_bench_parse_range(&r, ":3", "--x", &err), KVD_EINVAL);
    assert_int_equal(kvd_bench_parse_range(&r, "1:2:3", "--x", &err), KVD_EINVAL);
}

/* ---- URL ---- */

static void test_url(void **state)
{
    (void)state;
    kvd_bench_url u;
    kvd_error err = {0};
    assert_int_equal(kvd_bench_url_parse(&u, "http://127.0.0.1:8000", &err), 0);
    assert_string_equal(u.host, "127.0.0.1");
    assert_int_equal(u.port, 8000);
    assert_string_equal(u.base_path, "");
    assert_string_equal(u.host_header, "127.0.0.1:8000");

    assert_int_equal(kvd_bench_url_parse(&u, "http://localhost/v1/", &err), 0);
    assert_string_equal(u.host, "localhost");
    assert_int_equal(u.port, 80);
    assert_string_equal(u.base_path, "");
    assert_string_equal(u.host_header, "localhost");

    assert_int_equal(kvd_bench_url_parse(&u, "http://[::1]:9000/proxy/v1", &err), 0);
    assert_string_equal(u.host, "::1");
    assert_int_equal(u.port, 9000);
    assert_string_equal(u.base_path, "/proxy");
    assert_string_equal(u.host_header, "[::1]:9000");

    assert_int_equal(kvd_bench_url_parse(&u, "https://a:1", &err), KVD_EINVAL);
    assert_int_equal(kvd_bench_url_parse(&u, "http://:80", &err), KVD_EINVAL);
    assert_int_equal(kvd_bench_url_parse(&u, "http://h:99999", &err), KVD_EINVAL);
    assert_int_equal(kvd_bench_url_parse(&u, "http://h:12x", &err), KVD_EINVAL);
    assert_int_equal(kvd_bench_url_parse(&u, "http://[::1", &err), KVD_EINVAL);
}

/* ---- random streams and workload ---- */

static void test_rng_reproducible_and_independent(void **state)
{
    (void)state;
    kvd_bench_rng a, b, c;
    kvd_bench_rng_seed(&a, 42, 0);
    kvd_bench_rng_seed(&b, 42, 0);
    kvd_bench_rng_seed(&c, 42, 1);
    int same_as_other_stream = 0;
    for (int i = 0; i < 1000; i++) {
        uint64_t x = kvd_bench_rng_next(&a);
        assert_true(x == kvd_bench_rng_next(&b));
        same_as_other_stream += x == kvd_bench_rng_next(&c);
    }
    assert_int_equal(same_as_other_stream, 0);
}

static void test_rng_pick_covers_range(void **state)
{
    (void)state;
    kvd_bench_rng rng;
    kvd_bench_rng_seed(&rng, 7, 0);
    int seen[6] = {0};
    for (int i = 0; i < 6000; i++) {
        long v = kvd_bench_rng_pick(&rng, (kvd_bench_range){10, 15});
        assert_in_range(v, 10, 15);
        seen[v - 10]++;
    }
    for (int i = 0; i < 6; i++)
        assert_in_range(seen[i], 800, 1200); /* 1000 expected; 6 sigma is ~190 */
    assert_int_equal(kvd_bench_rng_pick(&rng, (kvd_bench_range){5, 5}), 5);
    for (int i = 0; i < 1000; i++) {
        double u = kvd_bench_rng_uniform(&rng);
        assert_true(u >= 0.0 && u < 1.0);
    }
}

static void test_arrivals_are_poisson(void **state)
{
    (void)state;
    enum { N = 200001 };
    double *t = malloc(N * sizeof *t);
    double *again = malloc(N * sizeof *again);
    assert_non_null(t);
    assert_non_null(again);
    kvd_bench_arrivals(t, N, 4.0, 3);
    kvd_bench_arrivals(again, N, 4.0, 3);
    assert_true(t[0] == 0.0);
    double sum = 0.0, sum_sq = 0.0;
    for (size_t i = 1; i < N; i++) {
        double gap = t[i] - t[i - 1];
        assert_true(gap >= 0.0);
        assert_true(t[i] == again[i]);
        sum += gap;
        sum_sq += gap * gap;
    }
    double mean = sum / (N - 1);
    double var = sum_sq / (N - 1) - mean * mean;
    /* Exponential(rate 4): mean 0.25, variance 0.0625; 200k samples: <1% error. */
    assert_true(fabs(mean - 0.25) < 0.0025);
    assert_true(fabs(var - 0.0625) < 0.0025);
    free(t);
    free(again);
}

static void test_think_times_are_exponential_and_seeded(void **state)
{
    (void)state;
    assert_true(kvd_bench_think_time(5, 3, 2, 0.0) == 0.0);
    /* Fixed by (seed, session, turn): the same pause whatever ran before it. */
    assert_true(kvd_bench_think_time(5, 3, 2, 2.0) == kvd_bench_think_time(5, 3, 2, 2.0));
    assert_true(kvd_bench_think_time(5, 3, 2, 2.0) != kvd_bench_think_time(5, 3, 3, 2.0));
    assert_true(kvd_bench_think_time(5, 3, 2, 2.0) != kvd_bench_think_time(5, 4, 2, 2.0));
    assert_true(kvd_bench_think_time(5, 3, 2, 2.0) != kvd_bench_think_time(6, 3, 2, 2.0));
    /* Exponential, mean 2 s (variance 4) over sessions x turns; 200k samples: <1%. */
    double sum = 0.0, sum_sq = 0.0;
    long n = 0;
    for (long session = 0; session < 20000; session++)
        for (long turn = 1; turn <= 10; turn++) {
            double t = kvd_bench_think_time(11, session, turn, 2.0);
            assert_true(t >= 0.0);
            sum += t;
            sum_sq += t * t;
            n++;
        }
    double mean = sum / (double)n;
    double var = sum_sq / (double)n - mean * mean;
    assert_true(fabs(mean - 2.0) < 0.02);
    assert_true(fabs(var - 4.0) < 0.08);
}

static void test_words_are_single_qwen_tokens(void **state)
{
    (void)state;
    const char *path = getenv("KVD_TOKENIZER_JSON");
    assert_non_null(path);
    size_t size;
    char *text = test_must_read_file(path, &size);
    cJSON *root = cJSON_ParseWithLength(text, size);
    free(text);
    const cJSON *vocab =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "model"), "vocab");
    assert_true(cJSON_IsObject(vocab));
    size_t n = kvd_bench_word_count();
    assert_true(n >= 400);
    assert_null(kvd_bench_word(n));
    for (size_t i = 0; i < n; i++) {
        char key[64];
        /* Byte-level BPE writes the leading space as U+0120 'Ġ' (UTF-8 c4 a0). */
        snprintf(key, sizeof key, "\xc4\xa0%s", kvd_bench_word(i));
        if (!cJSON_GetObjectItemCaseSensitive(vocab, key))
            fail_msg("word %zu ' %s' is not one token", i, kvd_bench_word(i));
        for (size_t j = 0; j < i; j++)
            if (!strcmp(kvd_bench_word(i), kvd_bench_word(j)))
                fail_msg("word '%s' listed twice", kvd_bench_word(i));
    }
    cJSON_Delete(root);
}

static size_t count_words(const char *s)
{
    size_t n = 0;
    int in_word = 0;
    for (; *s; s++) {
        if (*s == ' ')
            in_word = 0;
        else if (!in_word) {
            in_word = 1;
            n++;
        }
    }
    return n;
}

static void test_make_words(void **state)
{
    (void)state;
    kvd_bench_rng rng;
    kvd_bench_session_rng(&rng, 5, 0);
    kvd_sbuf buf = {0};
    assert_int_equal(kvd_bench_make_words(&buf, &rng, 300), 0);
    assert_int_equal(count_words(buf.data), 300);
    assert_int_equal(strlen(buf.data), buf.len);
    assert_true(buf.data[0] != ' ' && buf.data[buf.len - 1] != ' ');
    assert_null(strstr(buf.data, "  "));
    /* A session's prompts depend only on (seed, session), not on other sessions. */
    kvd_bench_rng fresh;
    kvd_bench_session_rng(&fresh, 5, 3);
    kvd_sbuf direct = {0};
    assert_int_equal(kvd_bench_make_words(&direct, &fresh, 50), 0);
    kvd_bench_rng other;
    kvd_bench_session_rng(&other, 5, 2);
    kvd_sbuf unrelated = {0};
    assert_int_equal(kvd_bench_make_words(&unrelated, &other, 50), 0);
    kvd_bench_session_rng(&fresh, 5, 3);
    kvd_sbuf again = {0};
    assert_int_equal(kvd_bench_make_words(&again, &fresh, 50), 0);
    assert_string_equal(direct.data, again.data);
    assert_string_not_equal(direct.data, unrelated.data);
    kvd_sbuf_deinit(&buf);
    kvd_sbuf_deinit(&direct);
    kvd_sbuf_deinit(&unrelated);
    kvd_sbuf_deinit(&again);
}

static void test_completion_body(void **state)
{
    (void)state;
    kvd_bench_options opt;
    kvd_bench_options_default(&opt);
    kvd_sbuf body = {0};
    assert_int_equal(kvd_bench_body_completion(&body, &opt, "qwen", "the \"cat\"", 12), 0);
    cJSON *root = cJSON_Parse(body.data);
    assert_non_null(root);
    assert_string_equal(cJSON_GetObjectItem(root, "model")->valuestring, "qwen");
    assert_string_equal(cJSON_GetObjectItem(root, "prompt")->valuestring, "the \"cat\"");
    assert_int_equal(cJSON_GetObjectItem(root, "max_tokens")->valueint, 12);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(root, "stream")));
    assert_true(cJSON_IsTrue(
        cJSON_GetObjectItem(cJSON_GetObjectItem(root, "stream_options"), "include_usage")));
    assert_null(cJSON_GetObjectItem(root, "ignore_eos"));
    assert_true(cJSON_GetObjectItem(root, "temperature")->valuedouble == 0.0);
    cJSON_Delete(root);

    opt.ignore_eos = 1;
    assert_int_equal(kvd_bench_body_completion(&body, &opt, "qwen", "x", 1), 0);
    root = cJSON_Parse(body.data);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(root, "ignore_eos")));
    cJSON_Delete(root);
    kvd_sbuf_deinit(&body);
}

static void test_chat_body_resends_history(void **state)
{
    (void)state;
    kvd_bench_options opt;
    kvd_bench_options_default(&opt);
    kvd_sbuf history[3] = {{0}};
    kvd_sbuf_printf(&history[0], "first question");
    kvd_sbuf_printf(&history[1], "an answer\nwith a newline");
    kvd_sbuf_printf(&history[2], "second question");
    kvd_sbuf body = {0};
    assert_int_equal(kvd_bench_body_chat(&body, &opt, "m", history, 3, 9), 0);
    cJSON *root = cJSON_Parse(body.data);
    const cJSON *messages = cJSON_GetObjectItem(root, "messages");
    assert_int_equal(cJSON_GetArraySize(messages), 4);
    static const char *const roles[] = {"system", "user", "assistant", "user"};
    const char *contents[] = {kvd_bench_system_prompt, "first question",
                              "an answer\nwith a newline", "second question"};
    for (int i = 0; i < 4; i++) {
        const cJSON *m = cJSON_GetArrayItem(messages, i);
        assert_string_equal(cJSON_GetObjectItem(m, "role")->valuestring, roles[i]);
        assert_string_equal(cJSON_GetObjectItem(m, "content")->valuestring, contents[i]);
    }
    assert_int_equal(cJSON_GetObjectItem(root, "max_tokens")->valueint, 9);
    cJSON_Delete(root);
    for (int i = 0; i < 3; i++)
        kvd_sbuf_deinit(&history[i]);
    kvd_sbuf_deinit(&body);
}

/* ---- SSE stream ---- */

static const char completion_stream[] =
    "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"text\":\"Hello\",\"finish_reason\":null}]}\n"
    "\n"
    "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"text\":\" w\\u00f6rld\","
    "\"finish_reason\":null}]}\n"
    "\n"
    ": keep-alive comment\n"
    "\n"
    "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"text\":\"!\","
    "\"finish_reason\":\"length\"}]}\n"
    "\n"
    "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,"
    "\"completion_tokens\":3,\"total_tokens\":14}}\n"
    "\n"
    "data: [DONE]\n"
    "\n";

static void test_stream_events_and_timestamps(void **state)
{
    (void)state;
    kvd_bench_stream s;
    kvd_error err = {0};
    kvd_bench_stream_init(&s, 0);
    /* Feed line by line with a clock that advances 10 ms per line. */
    const char *p = completion_stream;
    uint64_t t = 1000000000ull;
    while (*p) {
        const char *nl = strchr(p, '\n');
        size_t len = (size_t)(nl - p) + 1;
        assert_int_equal(kvd_bench_stream_feed(&s, p, len, t, &err), 0);
        p += len;
        t += 10000000ull;
    }
    assert_int_equal(s.done, 1);
    assert_int_equal(s.n_chunks, 3);
    assert_int_equal(s.n_events, 4);
    assert_string_equal(s.text.data, "Hello w\xc3\xb6rld!");
    assert_int_equal(s.prompt_tokens, 11);
    assert_int_equal(s.completion_tokens, 3);
    /* Chunks complete on lines 2, 4 and 8 (the blank lines): t0+10, +30, +70 ms. */
    assert_true(s.first_ns == 1000000000ull + 10000000ull);
    assert_int_equal(s.n_itl, 2);
    assert_float_equal(s.itl_ms[0], 20.0, 1e-4);
    assert_float_equal(s.itl_ms[1], 40.0, 1e-4);
    kvd_bench_stream_deinit(&s);
}

static void test_stream_split_anywhere(void **state)
{
    (void)state;
    size_t len = strlen(completion_stream);
    for (size_t cut = 0; cut <= len; cut++) {
        kvd_bench_stream s;
        kvd_error err = {0};
        kvd_bench_stream_init(&s, 0);
        assert_int_equal(kvd_bench_stream_feed(&s, completion_stream, cut, 1, &err), 0);
        assert_int_equal(kvd_bench_stream_feed(&s, completion_stream + cut, len - cut, 2, &err),
                         0);
        assert_int_equal(s.done, 1);
        assert_int_equal(s.n_chunks, 3);
        assert_string_equal(s.text.data, "Hello w\xc3\xb6rld!");
        assert_int_equal(s.completion_tokens, 3);
        kvd_bench_stream_deinit(&s);
    }
}

static void test_stream_chat_crlf_and_multiline(void **state)
{
    (void)state;
    static const char chat[] =
        "event: message\r\n"
        "data:{\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\r\n"
        "\r\n"
        "data: {\"choices\":[{\"delta\":\r\n"
        "data: {\"content\":\"Hi\"}}]}\r\n"
        "\r\n"
        "id: 7\r\n"
        "data: {\"choices\":[{\"delta\":{\"content\":\" there\"},\"finish_reason\":null}]}\r\n"
        "\r\n"
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n"
        "\r\n"
        "data: [DONE]\r\n"
        "\r\n"
        "data: {not even json after DONE\r\n";
    kvd_bench_stream s;
    kvd_error err = {0};
    kvd_bench_stream_init(&s, 1);
    assert_int_equal(kvd_bench_stream_feed(&s, chat, strlen(chat), 5, &err), 0);
    assert_int_equal(s.done, 1);
    assert_int_equal(s.n_chunks, 2); /* the role-only delta carries no text */
    assert_string_equal(s.text.data, "Hi there");
    assert_int_equal(s.prompt_tokens, -1);
    assert_int_equal(s.completion_tokens, -1);
    kvd_bench_stream_deinit(&s);
}

static void test_stream_errors(void **state)
{
    (void)state;
    kvd_bench_stream s;
    kvd_error err = {0};
    static const char bad_json[] = "data: {\"choices\": [\n\n";
    kvd_bench_stream_init(&s, 0);
    assert_int_equal(kvd_bench_stream_feed(&s, bad_json, strlen(bad_json), 1, &err),
                     KVD_EFORMAT);
    assert_non_null(strstr(err.msg, "not a JSON object"));
    kvd_bench_stream_deinit(&s);

    static const char error_event[] =
        "data: {\"choices\":[{\"text\":\"a\"}]}\n\n"
        "data: {\"error\":{\"message\":\"KV cache exhausted\",\"type\":\"server_error\"}}\n\n";
    kvd_bench_stream_init(&s, 0);
    assert_int_equal(kvd_bench_stream_feed(&s, error_event, strlen(error_event), 1, &err),
                     KVD_EFORMAT);
    assert_non_null(strstr(err.msg, "KV cache exhausted"));
    assert_int_equal(s.n_chunks, 1);
    kvd_bench_stream_deinit(&s);
}

static void test_stream_finish_without_blank_line(void **state)
{
    (void)state;
    kvd_bench_stream s;
    kvd_error err = {0};
    static const char tail[] = "data: {\"choices\":[{\"text\":\"z\"}]}\n\ndata: [DONE]";
    kvd_bench_stream_init(&s, 0);
    assert_int_equal(kvd_bench_stream_feed(&s, tail, strlen(tail), 1, &err), 0);
    assert_int_equal(s.done, 0);
    assert_int_equal(kvd_bench_stream_finish(&s, 2, &err), 0);
    assert_int_equal(s.done, 1);
    assert_int_equal(s.n_chunks, 1);
    kvd_bench_stream_deinit(&s);

    static const char cut[] = "data: {\"choices\":[{\"text\":\"z\"}]}\n\n";
    kvd_bench_stream_init(&s, 0);
    assert_int_equal(kvd_bench_stream_feed(&s, cut, strlen(cut), 1, &err), 0);
    assert_int_equal(kvd_bench_stream_finish(&s, 2, &err), 0);
    assert_int_equal(s.done, 0); /* the caller reports a cut stream */
    kvd_bench_stream_deinit(&s);
}

/* ---- statistics ---- */

static void test_percentiles_match_numpy(void **state)
{
    (void)state;
    /* np.percentile([1, 2, 3, 4], [50, 90, 99]) == [2.5, 3.7, 3.97] */
    const double four[] = {1, 2, 3, 4};
    assert_float_equal(kvd_bench_percentile(four, 4, 50), 2.5, 1e-12);
    assert_float_equal(kvd_bench_percentile(four, 4, 90), 3.7, 1e-12);
    assert_float_equal(kvd_bench_percentile(four, 4, 99), 3.97, 1e-12);
    assert_float_equal(kvd_bench_percentile(four, 4, 0), 1.0, 1e-12);
    assert_float_equal(kvd_bench_percentile(four, 4, 100), 4.0, 1e-12);
    const double one[] = {7.5};
    assert_float_equal(kvd_bench_percentile(one, 1, 99), 7.5, 1e-12);
    assert_float_equal(kvd_bench_percentile(NULL, 0, 50), 0.0, 0);

    /* np.mean/median/std/percentile of [10, 1, 7, 3, 100]: 24.2, 7, 38.0783..., 64, 96.4 */
    double v[] = {10, 1, 7, 3, 100};
    kvd_bench_summary s;
    kvd_bench_summarize(&s, v, 5);
    assert_int_equal(s.n, 5);
    assert_float_equal(s.mean, 24.2, 1e-12);
    assert_float_equal(s.median, 7.0, 1e-12);
    assert_float_equal(s.std, 38.028410432201866, 1e-9);
    assert_float_equal(s.p90, 64.0, 1e-12);
    assert_float_equal(s.p99, 96.4, 1e-12);
    assert_float_equal(s.min, 1.0, 0);
    assert_float_equal(s.max, 100.0, 0);
    kvd_bench_summarize(&s, NULL, 0);
    assert_int_equal(s.n, 0);
    assert_float_equal(s.mean, 0.0, 0);
}

static void add_result(kvd_bench_results *rs, long turn, int outcome, int status, double ttft,
                       double e2el, long in, long out, const float *itl, size_t n_itl)
{
    kvd_bench_result r = {0};
    r.session = (long)rs->count;
    r.turn = turn;
    r.outcome = outcome;
    r.http_status = status;
    r.ttft_ms = ttft;
    r.e2el_ms = e2el;
    r.prompt_words = in;
    r.prompt_tokens = in + 1; /* the server counts one token more than words */
    r.output_tokens = out;
    if (n_itl) {
        r.itl_ms = malloc(n_itl * sizeof *r.itl_ms);
        memcpy(r.itl_ms, itl, n_itl * sizeof *itl);
        r.n_itl = n_itl;
    }
    snprintf(r.message, sizeof r.message, "%s", outcome == KVD_BENCH_OK ? "" : "went wrong");
    assert_int_equal(kvd_bench_results_add(rs, &r), 0);
    assert_null(r.itl_ms); /* ownership moved */
}

static void fill_results(kvd_bench_results *rs)
{
    const float gaps_a[] = {10, 20, 30};
    const float gaps_b[] = {5};
    add_result(rs, 1, KVD_BENCH_OK, 200, 100, 160, 20, 4, gaps_a, 3); /* tpot 20 */
    add_result(rs, 2, KVD_BENCH_OK, 200, 300, 310, 40, 2, gaps_b, 1); /* tpot 10 */
    add_result(rs, 1, KVD_BENCH_OK, 200, 50, 50, 30, 1, NULL, 0);     /* no tpot */
    add_result(rs, 2, KVD_BENCH_ERR_HTTP, 503, -1, 5, 10, 0, NULL, 0);
    add_result(rs, 1, KVD_BENCH_ERR_HTTP, 503, -1, 5, 10, 0, NULL, 0);
    add_result(rs, 1, KVD_BENCH_ERR_TIMEOUT, 200, 40, 1000, 10, 2, NULL, 0);
    add_result(rs, 2, KVD_BENCH_INCOMPLETE, 200, 40, 900, 10, 2, NULL, 0);
    rs->abandoned = 2;
}

static void test_report_figures(void **state)
{
    (void)state;
    kvd_bench_options opt;
    kvd_bench_options_default(&opt);
    opt.turns = 2;
    opt.slo_ttft_ms = 200;
    opt.slo_tpot_ms = 15;
    kvd_bench_results rs = {0};
    fill_results(&rs);
    kvd_bench_report rep;
    kvd_error err = {0};
    assert_int_equal(kvd_bench_report_compute(&rep, &opt, &rs, 10, 2.0, &err), 0);
    assert_int_equal(rep.planned, 10);
    assert_int_equal(rep.completed, 3);
    assert_int_equal(rep.failed, 3);
    assert_int_equal(rep.incomplete, 1);
    assert_int_equal(rep.abandoned, 2);
    assert_int_equal(rep.errors[KVD_BENCH_ERR_HTTP], 2);
    assert_int_equal(rep.errors[KVD_BENCH_ERR_TIMEOUT], 1);
    assert_int_equal(rep.errors[KVD_BENCH_ERR_CONNECT], 0);
    assert_int_equal(rep.n_statuses, 1);
    assert_int_equal(rep.statuses[0], 503);
    assert_int_equal(rep.status_counts[0], 2);
    assert_int_equal(rep.usage_reported, 3);
    assert_int_equal(rep.total_input_tokens, 21 + 41 + 31);
    assert_int_equal(rep.total_prompt_words, 90);
    assert_int_equal(rep.total_output_tokens, 7);
    assert_float_equal(rep.request_throughput, 1.5, 1e-12);
    assert_float_equal(rep.output_throughput, 3.5, 1e-12);
    assert_float_equal(rep.total_token_throughput, 50.0, 1e-12);
    /* TTFT {50, 100, 300}; TPOT {20, 10}; ITL {10, 20, 30, 5}; E2EL {50, 160, 310} */
    assert_int_equal(rep.ttft.n, 3);
    assert_float_equal(rep.ttft.mean, 150.0, 1e-9);
    assert_float_equal(rep.ttft.median, 100.0, 1e-9);
    assert_float_equal(rep.ttft.p90, 260.0, 1e-9);
    assert_int_equal(rep.tpot.n, 2);
    assert_float_equal(rep.tpot.mean, 15.0, 1e-9);
    assert_float_equal(rep.tpot.p99, 19.9, 1e-9);
    assert_int_equal(rep.itl.n, 4);
    assert_float_equal(rep.itl.mean, 16.25, 1e-6);
    assert_float_equal(rep.itl.median, 15.0, 1e-6);
    assert_float_equal(rep.e2el.median, 160.0, 1e-9);
    assert_float_equal(rep.e2el.max, 310.0, 1e-9);
    /* SLO ttft <= 200 and tpot <= 15: only the 1-token request (ttft 50, tpot 0). */
    assert_int_equal(rep.good, 1);
    assert_float_equal(rep.request_goodput, 0.5, 1e-12);
    assert_int_equal(rep.n_turns, 2);
    assert_int_equal(rep.ttft_by_turn[0].n, 2);
    assert_float_equal(rep.ttft_by_turn[0].mean, 75.0, 1e-9);
    assert_int_equal(rep.ttft_by_turn[1].n, 1);
    assert_float_equal(rep.ttft_by_turn[1].median, 300.0, 1e-9);
    kvd_bench_report_deinit(&rep);
    kvd_bench_results_deinit(&rs);
}

static double json_number(const cJSON *root, const char *key)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!cJSON_IsNumber(item))
        fail_msg("JSON key '%s' missing or not a number", key);
    return item->valuedouble;
}

static void test_report_json(void **state)
{
    (void)state;
    kvd_bench_options opt;
    kvd_bench_options_default(&opt);
    opt.turns = 2;
    kvd_bench_results rs = {0};
    fill_results(&rs);
    kvd_bench_report rep;
    kvd_error err = {0};
    assert_int_equal(kvd_bench_report_compute(&rep, &opt, &rs, 10, 2.0, &err), 0);
    char path[] = "/tmp/kvd_bench_report_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(kvd_bench_report_write_json(path, &rep, &opt, "qwen", &rs, &err), 0);
    FILE *f = fopen(path, "rb");
    char text[65536];
    size_t len = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    unlink(path);
    text[len] = '\0';
    cJSON *root = cJSON_Parse(text);
    assert_non_null(root);
    assert_float_equal(json_number(root, "completed"), 3, 0);
    assert_float_equal(json_number(root, "failed"), 3, 0);
    assert_float_equal(json_number(root, "num_prompts"), 10, 0);
    assert_float_equal(json_number(root, "total_input_tokens"), 93, 0);
    assert_float_equal(json_number(root, "total_output_tokens"), 7, 0);
    assert_float_equal(json_number(root, "request_throughput"), 1.5, 1e-12);
    assert_float_equal(json_number(root, "output_throughput"), 3.5, 1e-12);
    assert_float_equal(json_number(root, "total_token_throughput"), 50, 1e-12);
    assert_float_equal(json_number(root, "mean_ttft_ms"), 150, 1e-9);
    assert_float_equal(json_number(root, "median_ttft_ms"), 100, 1e-9);
    assert_float_equal(json_number(root, "p90_ttft_ms"), 260, 1e-9);
    assert_float_equal(json_number(root, "p99_ttft_ms"), 296, 1e-9);
    assert_float_equal(json_number(root, "mean_tpot_ms"), 15, 1e-9);
    assert_float_equal(json_number(root, "median_itl_ms"), 15, 1e-6);
    assert_float_equal(json_number(root, "mean_e2el_ms"), 520.0 / 3.0, 1e-9);
    assert_float_equal(json_number(root, "duration"), 2.0, 0);
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(root, "request_goodput")));
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(root, "request_rate")));
    assert_string_equal(cJSON_GetObjectItem(root, "model_id")->valuestring, "qwen");
    const cJSON *errors = cJSON_GetObjectItem(root, "errors");
    assert_float_equal(json_number(errors, "http"), 2, 0);
    assert_float_equal(json_number(errors, "timeout"), 1, 0);
    assert_float_equal(json_number(errors, "connect"), 0, 0);
    assert_float_equal(json_number(errors, "stream"), 0, 0);
    assert_float_equal(json_number(cJSON_GetObjectItem(errors, "http_status"), "503"), 2, 0);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(errors, "messages")), 3);
    const cJSON *by_turn = cJSON_GetObjectItem(root, "ttft_by_turn");
    assert_int_equal(cJSON_GetArraySize(by_turn), 2);
    assert_float_equal(json_number(cJSON_GetArrayItem(by_turn, 1), "turn"), 2, 0);
    assert_float_equal(json_number(cJSON_GetArrayItem(by_turn, 1), "median_ttft_ms"), 300, 1e-9);
    const cJSON *ttfts = cJSON_GetObjectItem(root, "ttfts");
    assert_int_equal(cJSON_GetArraySize(ttfts), 3);
    assert_float_equal(cJSON_GetArrayItem(ttfts, 0)->valuedouble, 0.1, 1e-12);
    const cJSON *itls = cJSON_GetObjectItem(root, "itls");
    assert_int_equal(cJSON_GetArraySize(cJSON_GetArrayItem(itls, 0)), 3);
    assert_float_equal(cJSON_GetArrayItem(cJSON_GetArrayItem(itls, 0), 2)->valuedouble, 0.03,
                       1e-9);
    cJSON_Delete(root);
    kvd_bench_report_deinit(&rep);
    kvd_bench_results_deinit(&rs);

    /* An unwritable path is an error naming it. */
    kvd_bench_results empty = {0};
    assert_int_equal(kvd_bench_report_compute(&rep, &opt, &empty, 0, 0.0, &err), 0);
    assert_int_equal(kvd_bench_report_write_json("/nonexistent-dir/x.json", &rep, &opt, "q",
                                                 &empty, &err),
                     KVD_EIO);
    assert_non_null(strstr(err.msg, "/nonexistent-dir/x.json"));
    kvd_bench_report_deinit(&rep);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_all_flags),
        cmocka_unit_test(test_rate_makes_concurrency_a_cap),
        cmocka_unit_test(test_help_wins),
        cmocka_unit_test(test_bad_flags),
        cmocka_unit_test(test_range),
        cmocka_unit_test(test_url),
        cmocka_unit_test(test_rng_reproducible_and_independent),
        cmocka_unit_test(test_rng_pick_covers_range),
        cmocka_unit_test(test_arrivals_are_poisson),
        cmocka_unit_test(test_think_times_are_exponential_and_seeded),
        cmocka_unit_test(test_words_are_single_qwen_tokens),
        cmocka_unit_test(test_make_words),
        cmocka_unit_test(test_completion_body),
        cmocka_unit_test(test_chat_body_resends_history),
        cmocka_unit_test(test_stream_events_and_timestamps),
        cmocka_unit_test(test_stream_split_anywhere),
        cmocka_unit_test(test_stream_chat_crlf_and_multiline),
        cmocka_unit_test(test_stream_errors),
        cmocka_unit_test(test_stream_finish_without_blank_line),
        cmocka_unit_test(test_percentiles_match_numpy),
        cmocka_unit_test(test_report_figures),
        cmocka_unit_test(test_report_json),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
