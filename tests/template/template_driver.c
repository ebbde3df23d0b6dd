/* template_driver.c - renders chat templates for the jinja2 oracle test (oracle.py).
 *
 * Reads JSON lines from stdin, {"template": PATH, "vars": {...}, "trusted": {...}},
 * and writes one JSON line per input: {"ok": true, "text": ..., "data_spans": [[off,len]...]}
 * or {"ok": false, "error": MESSAGE}. Templates are parsed once per path; a parse error
 * is reported for every line that uses the template.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "kvd/kvd_template.h"

typedef struct cached {
    char *path;
    kvd_template *t;
    char error[512];
} cached;

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[n] = '\0';
        *len = (size_t)n;
    }
    return buf;
}

int main(void)
{
    cached cache[64];
    int ncache = 0;
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    while ((got = getline(&line, &cap, stdin)) > 0) {
        cJSON *in = cJSON_ParseWithLength(line, (size_t)got);
        cJSON *out = cJSON_CreateObject();
        const cJSON *path = in ? cJSON_GetObjectItemCaseSensitive(in, "template") : NULL;
        if (!cJSON_IsString(path)) {
            cJSON_AddBoolToObject(out, "ok", 0);
            cJSON_AddStringToObject(out, "error", "bad input line");
        } else {
            cached *c = NULL;
            for (int k = 0; k < ncache; k++)
                if (!strcmp(cache[k].path, path->valuestring))
                    c = &cache[k];
            if (!c && ncache < 64) {
                c = &cache[ncache++];
                c->path = strdup(path->valuestring);
                c->error[0] = '\0';
                size_t len = 0;
                char *src = read_file(path->valuestring, &len);
                kvd_error err = {0};
                c->t = src ? kvd_template_parse(src, len, NULL, &err) : NULL;
                if (!src)
                    snprintf(c->error, sizeof c->error, "cannot read %s", path->valuestring);
                else if (!c->t)
                    snprintf(c->error, sizeof c->error, "%s", err.msg);
                free(src);
            }
            if (!c || !c->t) {
                cJSON_AddBoolToObject(out, "ok", 0);
                cJSON_AddStringToObject(out, "error", c ? c->error : "too many templates");
            } else {
                kvd_template_output o;
                kvd_error err = {0};
                int rc = kvd_template_render(c->t, cJSON_GetObjectItemCaseSensitive(in, "vars"),
                                             cJSON_GetObjectItemCaseSensitive(in, "trusted"), NULL, &o, &err);
                if (rc) {
                    cJSON_AddBoolToObject(out, "ok", 0);
                    cJSON_AddStringToObject(out, "error", err.msg);
                } else {
                    cJSON_AddBoolToObject(out, "ok", 1);
                    cJSON_AddStringToObject(out, "text", o.text);
                    cJSON *spans = cJSON_AddArrayToObject(out, "data_spans");
                    for (size_t k = 0; k < o.num_data_spans; k++) {
                        cJSON *pair = cJSON_CreateArray();
                        cJSON_AddItemToArray(pair, cJSON_CreateNumber((double)o.data_spans[k].offset));
                        cJSON_AddItemToArray(pair, cJSON_CreateNumber((double)o.data_spans[k].len));
                        cJSON_AddItemToArray(spans, pair);
                    }
                    kvd_template_output_free(&o);
                }
            }
        }
        char *text = cJSON_PrintUnformatted(out);
        fputs(text, stdout);
        fputc('\n', stdout);
        fflush(stdout);
        free(text);
        cJSON_Delete(out);
        cJSON_Delete(in);
    }
    free(line);
    for (int k = 0; k < ncache; k++) {
        free(cache[k].path);
        kvd_template_destroy(cache[k].t);
    }
    return 0;
}
