/* bench_template.c - how long the chat template engine takes to render a request.
 *
 * Usage: bench_template [TEMPLATE.jinja ...]
 * Defaults to the three model templates in tests/template/templates (run from the source
 * root). The conversation is the yardstick: a system turn, 20 user/assistant
 * turns (every fourth assistant turn calls two tools, answered by two tool messages) and
 * 10 tools with 3-property JSON schemas. Prints the parse time and, for rendering, the
 * median and the 95th percentile of 2000 renders (the target: under 1 ms). Record the
 * figures in docs/benchmarks.md with the command, the CPU and the load.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "kvd/kvd_buf.h"
#include "kvd/kvd_error.h"
#include "kvd/kvd_template.h"

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

static cJSON *conversation(void)
{
    cJSON *vars = cJSON_CreateObject();
    cJSON *msgs = cJSON_AddArrayToObject(vars, "messages");
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "role", "system");
    cJSON_AddStringToObject(m, "content", "You are a careful assistant. Answer briefly and call tools when useful.");
    cJSON_AddItemToArray(msgs, m);
    for (int turn = 0; turn < 20; turn++) {
        char text[256];
        snprintf(text, sizeof text, "Question %d: what is the weather in city number %d, and should I take an umbrella "
                 "for the trip next week? Please compare with last year.", turn, turn * 7);
        m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", "user");
        cJSON_AddStringToObject(m, "content", text);
        cJSON_AddItemToArray(msgs, m);
        m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", "assistant");
        if (turn % 4 == 3) {
            cJSON_AddStringToObject(m, "content", ""); /* Qwen3's template fails on null content */
            cJSON *calls = cJSON_AddArrayToObject(m, "tool_calls");
            for (int c = 0; c < 2; c++) {
                char id[32];
                snprintf(id, sizeof id, "call_%d_%d", turn, c);
                cJSON *call = cJSON_CreateObject();
                cJSON_AddStringToObject(call, "id", id);
                cJSON_AddStringToObject(call, "type", "function");
                cJSON *fn = cJSON_AddObjectToObject(call, "function");
                cJSON_AddStringToObject(fn, "name", "get_weather");
                cJSON_AddStringToObject(fn, "arguments", "{\"city\": \"Paris\", \"unit\": \"celsius\"}");
                cJSON_AddItemToArray(calls, call);
            }
            cJSON_AddItemToArray(msgs, m);
            for (int c = 0; c < 2; c++) {
                m = cJSON_CreateObject();
                cJSON_AddStringToObject(m, "role", "tool");
                cJSON_AddStringToObject(m, "content", "{\"temperature\": 21, \"rain_probability\": 0.3}");
                cJSON_AddItemToArray(msgs, m);
            }
            m = cJSON_CreateObject();
            cJSON_AddStringToObject(m, "role", "assistant");
        }
        cJSON_AddStringToObject(m, "content", "It will be mild, around 21 degrees, with a 30% chance of rain: take a "
                                              "light umbrella. Last year was two degrees cooler.");
        cJSON_AddItemToArray(msgs, m);
    }
    cJSON *tools = cJSON_AddArrayToObject(vars, "tools");
    for (int t = 0; t < 10; t++) {
        char buf[1024];
        snprintf(buf, sizeof buf,
                 "{\"type\": \"function\", \"function\": {\"name\": \"tool_%d\", \"description\": \"Tool number %d: "
                 "looks things up.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": "
                 "\"string\", \"description\": \"City name\"}, \"unit\": {\"type\": \"string\", \"enum\": [\"celsius\", "
                 "\"fahrenheit\"]}, \"days\": {\"type\": \"integer\"}}, \"required\": [\"city\"]}}}", t, t);
        cJSON_AddItemToArray(tools, cJSON_Parse(buf));
    }
    cJSON_AddBoolToObject(vars, "add_generation_prompt", 1);
    return vars;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    static const char *const defaults[] = {"tests/template/templates/qwen2.5-instruct.jinja",
                                           "tests/template/templates/qwen3.jinja",
                                           "tests/template/templates/deepseek-r1-distill-qwen.jinja"};
    int n = argc > 1 ? argc - 1 : 3;
    cJSON *vars = conversation();
    enum { RUNS = 2000 };
    static double times[RUNS];
    for (int k = 0; k < n; k++) {
        const char *path = argc > 1 ? argv[k + 1] : defaults[k];
        kvd_error err = {0};
        kvd_sbuf src;
        kvd_sbuf_init(&src);
        if (kvd_sbuf_read_file(&src, path, &err) != 0) {
            fprintf(stderr, "bench_template: %s\n", err.msg);
            return 1;
        }
        double t0 = now_us();
        kvd_template *t = kvd_template_parse(src.data, src.len, path, &err);
        double parse_us = now_us() - t0;
        if (!t) {
            fprintf(stderr, "bench_template: %s\n", err.msg);
            return 1;
        }
        kvd_template_output out;
        size_t out_len = 0;
        for (int i = 0; i < RUNS; i++) {
            double s = now_us();
            if (kvd_template_render(t, vars, NULL, NULL, &out, &err) != 0) {
                fprintf(stderr, "bench_template: %s: %s\n", path, err.msg);
                return 1;
            }
            times[i] = now_us() - s;
            out_len = out.len;
            kvd_template_output_free(&out);
        }
        qsort(times, RUNS, sizeof times[0], cmp_double);
        printf("%-58s parse %7.1f us  render median %7.1f us  p95 %7.1f us  (%zu bytes out)\n", path, parse_us,
               times[RUNS / 2], times[RUNS * 95 / 100], out_len);
        kvd_template_destroy(t);
        kvd_sbuf_deinit(&src);
    }
    cJSON_Delete(vars);
    return 0;
}
