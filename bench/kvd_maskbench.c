/* kvd-maskbench - the MaskBench protocol over JSON schema test files.
 *
 *   kvd-maskbench --tokenizer tokenizer.json [--json OUT] [--ordered] [--cpu-time] [-v] FILE...
 *
 * Each FILE is {"schema": {...}, "tests": [{"valid": bool, "data": ...}, ...]}. Per
 * schema: compile it and compute the first mask (TTFM). Per test: write data as
 * Python's json.dumps(data, indent=None, ensure_ascii=False) does, tokenize it, and
 * before each token compute the mask (TBM) and commit the token; after the last token
 * the text must be allowed to end. A valid instance rejected anywhere is a validation
 * error, an invalid one accepted an invalidation error; a schema passes with neither
 * and no compile error. Objects are matched in any member order (as validators do)
 * unless --ordered. One thread. --cpu-time times with the thread's CPU clock instead
 * of the wall clock (for a loaded machine: the scheduler's pauses are left out).
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvd/kvd_grammar.h"
#include "kvd/kvd_tokenizer.h"

typedef struct buf {
    char *p;
    size_t n, cap;
} buf;

static void put(buf *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            fprintf(stderr, "kvd-maskbench: out of memory\n");
            exit(1);
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void puts_(buf *b, const char *s) { put(b, s, strlen(s)); }

/* CLOCK_MONOTONIC, or this thread's CPU time with --cpu-time: on a shared machine the
 * wall clock's tail is the scheduler's, not the mask's. */
static clockid_t bench_clock = CLOCK_MONOTONIC;

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(bench_clock, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/* --- Python's json.dumps over the raw JSON text -------------------------------- */

static void skip_ws(const char **p)
{
    while (**p == ' ' || **p == '\t' || **p == '\n' || **p == '\r') (*p)++;
}

static void put_cp(buf *b, unsigned cp)
{
    char o[8];
    int n;
    if (cp < 0x80) o[0] = (char)cp, n = 1;
    else if (cp < 0x800) o[0] = (char)(0xC0 | cp >> 6), o[1] = (char)(0x80 | (cp & 63)), n = 2;
    else if (cp < 0x10000)
        o[0] = (char)(0xE0 | cp >> 12), o[1] = (char)(0x80 | ((cp >> 6) & 63)), o[2] = (char)(0x80 | (cp & 63)), n = 3;
    else
        o[0] = (char)(0xF0 | cp >> 18), o[1] = (char)(0x80 | ((cp >> 12) & 63)), o[2] = (char)(0x80 | ((cp >> 6) & 63)),
        o[3] = (char)(0x80 | (cp & 63)), n = 4;
    put(b, o, (size_t)n);
}

static int dump_string(const char **p, buf *b)
{
    const char *s = *p + 1;
    puts_(b, "\"");
    while (*s && *s != '"') {
        unsigned cp;
        if (*s == '\\') {
            s++;
            switch (*s) {
            case 'n': cp = '\n'; break;
            case 't': cp = '\t'; break;
            case 'r': cp = '\r'; break;
            case 'b': cp = '\b'; break;
            case 'f': cp = '\f'; break;
            case 'u': {
                cp = (unsigned)strtoul((char[]){s[1], s[2], s[3], s[4], 0}, NULL, 16);
                s += 4;
                if (cp >= 0xD800 && cp < 0xDC00 && s[1] == '\\' && s[2] == 'u') {
                    unsigned lo = (unsigned)strtoul((char[]){s[3], s[4], s[5], s[6], 0}, NULL, 16);
                    if (lo >= 0xDC00 && lo < 0xE000) {
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        s += 6;
                    }
                }
                break;
            }
            default: cp = (unsigned char)*s;
            }
            s++;
            if (cp >= 0xD800 && cp < 0xE000) return -1; /* a lone surrogate: not UTF-8 */
        } else {
            put(b, s, 1);
            s++;
            continue;
        }
        char esc[8];
        switch (cp) {
        case '"': puts_(b, "\\\""); break;
        case '\\': puts_(b, "\\\\"); break;
        case '\n': puts_(b, "\\n"); break;
        case '\r': puts_(b, "\\r"); break;
        case '\t': puts_(b, "\\t"); break;
        case '\b': puts_(b, "\\b"); break;
        case '\f': puts_(b, "\\f"); break;
        default:
            if (cp < 0x20) {
                snprintf(esc, sizeof esc, "\\u%04x", cp);
                puts_(b, esc);
            } else
                put_cp(b, cp);
        }
    }
    /* raw control characters were copied as is: json would escape them */
    puts_(b, "\"");
    *p = s + 1;
    return 0;
}

/* repr(float) */
static void py_float(double d, buf *b)
{
    char tmp[64], out[64];
    if (d == 0) {
        puts_(b, signbit(d) ? "-0.0" : "0.0");
        return;
    }
    if (isinf(d)) {
        puts_(b, d > 0 ? "Infinity" : "-Infinity");
        return;
    }
    int prec = 0;
    for (; prec < 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec, d);
        if (strtod(tmp, NULL) == d) break;
    }
    /* tmp: [-]D.DDDe[+-]XX */
    char digits[32];
    int nd = 0;
    const char *q = tmp;
    bool neg = *q == '-';
    if (neg) q++;
    for (; *q && *q != 'e'; q++)
        if (*q != '.') digits[nd++] = *q;
    int exp = atoi(q + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = 0;
    char *o = out;
    if (neg) *o++ = '-';
    if (exp >= -5 + 1 && exp < 16) { /* Python: fixed for -4 <= exp < 16 */
        if (exp < 0) {
            o += sprintf(o, "0.");
            for (int i = 0; i < -exp - 1; i++) *o++ = '0';
            o += sprintf(o, "%s", digits);
        } else {
            for (int i = 0; i <= exp; i++) *o++ = i < nd ? digits[i] : '0';
            *o++ = '.';
            if (nd > exp + 1) o += sprintf(o, "%s", digits + exp + 1);
            else *o++ = '0';
        }
        *o = 0;
    } else {
        *o++ = digits[0];
        if (nd > 1) {
            *o++ = '.';
            o += sprintf(o, "%s", digits + 1);
        }
        sprintf(o, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    }
    puts_(b, out);
}

static int dump_value(const char **p, buf *b)
{
    skip_ws(p);
    char c = **p;
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        put(b, &c, 1);
        (*p)++;
        skip_ws(p);
        bool first = true;
        while (**p != close) {
            if (!first) {
                if (**p != ',') return -1;
                (*p)++;
                puts_(b, ", ");
            }
            first = false;
            skip_ws(p);
            if (c == '{') {
                if (dump_string(p, b)) return -1;
                skip_ws(p);
                if (**p != ':') return -1;
                (*p)++;
                puts_(b, ": ");
            }
            if (dump_value(p, b)) return -1;
            skip_ws(p);
        }
        (*p)++;
        put(b, &close, 1);
        return 0;
    }
    if (c == '"') return dump_string(p, b);
    if (!strncmp(*p, "true", 4)) return puts_(b, "true"), *p += 4, 0;
    if (!strncmp(*p, "false", 5)) return puts_(b, "false"), *p += 5, 0;
    if (!strncmp(*p, "null", 4)) return puts_(b, "null"), *p += 4, 0;
    const char *s = *p;
    bool is_float = false;
    while (strchr("+-0123456789.eE", **p) && **p) {
        if (**p == '.' || **p == 'e' || **p == 'E') is_float = true;
        (*p)++;
    }
    if (*p == s) return -1;
    if (is_float) py_float(strtod(s, NULL), b);
    else {
        const char *d = s;
        bool neg = *d == '-';
        if (neg) d++;
        while (*d == '0' && d + 1 < *p) d++;
        if (neg && !(d + 1 == *p && *d == '0')) puts_(b, "-");
        put(b, d, (size_t)(*p - d));
    }
    return 0;
}

/* Finds the raw text of key's value in the object at p (top level only). */
static const char *find_key(const char *p, const char *key)
{
    int depth = 0;
    size_t kl = strlen(key);
    for (; *p; p++) {
        if (*p == '"') {
            const char *s = p + 1;
            while (*s && *s != '"') s += *s == '\\' ? 2 : 1;
            if (depth == 1 && (size_t)(s - p - 1) == kl && !strncmp(p + 1, key, kl)) {
                const char *q = s + 1;
                skip_ws(&q);
                if (*q == ':') {
                    q++;
                    skip_ws(&q);
                    return q;
                }
            }
            p = s;
        } else if (*p == '{' || *p == '[')
            depth++;
        else if (*p == '}' || *p == ']')
            depth--;
    }
    return NULL;
}

/* Raw text of each element of the array at p. */
static int array_items(const char *p, const char ***items)
{
    int n = 0, cap = 16;
    *items = malloc(cap * sizeof **items);
    p++;
    for (;;) {
        skip_ws(&p);
        if (*p == ']' || !*p) break;
        if (n == cap) *items = realloc(*items, (cap *= 2) * sizeof **items);
        (*items)[n++] = p;
        int depth = 0;
        for (; *p; p++) {
            if (*p == '"') {
                p++;
                while (*p && *p != '"') p += *p == '\\' ? 2 : 1;
            } else if (*p == '{' || *p == '[')
                depth++;
            else if (*p == '}' || *p == ']') {
                if (depth == 0) break;
                depth--;
            } else if (*p == ',' && depth == 0)
                break;
        }
        if (*p == ',') p++;
    }
    return n;
}

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) {
        free(s);
        s = NULL;
    }
    if (s) s[n] = 0;
    fclose(f);
    return s;
}

/* --- statistics ---------------------------------------------------------------- */

typedef struct samples {
    double *v;
    size_t n, cap;
} samples;

static void add(samples *s, double x)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1024;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
    }
    s->v[s->n++] = x;
}

static int dcmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const samples *s, double p)
{
    if (!s->n) return 0;
    size_t i = (size_t)(p / 100.0 * (double)(s->n - 1) + 0.5);
    return s->v[i];
}

static double mean(const samples *s)
{
    double t = 0;
    for (size_t i = 0; i < s->n; i++) t += s->v[i];
    return s->n ? t / (double)s->n : 0;
}

static cJSON *stats_json(samples *s)
{
    qsort(s->v, s->n, sizeof *s->v, dcmp);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "p50", pct(s, 50));
    cJSON_AddNumberToObject(o, "p90", pct(s, 90));
    cJSON_AddNumberToObject(o, "p99", pct(s, 99));
    cJSON_AddNumberToObject(o, "max", s->n ? s->v[s->n - 1] : 0);
    cJSON_AddNumberToObject(o, "mean", mean(s));
    cJSON_AddNumberToObject(o, "count", (double)s->n);
    return o;
}

int main(int argc, char **argv)
{
    const char *tok_path = NULL, *json_out = NULL;
    bool ordered = false, verbose = false;
    int first_file = argc;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc) tok_path = argv[++i];
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) json_out = argv[++i];
        else if (!strcmp(argv[i], "--ordered")) ordered = true;
        else if (!strcmp(argv[i], "-v")) verbose = true;
        else if (!strcmp(argv[i], "--cpu-time")) bench_clock = CLOCK_THREAD_CPUTIME_ID;
        else if (argv[i][0] == '-') {
            fprintf(stderr, "usage: kvd-maskbench --tokenizer tokenizer.json [--json OUT] [--ordered] [--cpu-time] [-v] FILE...\n");
            return 2;
        } else {
            first_file = i;
            break;
        }
    }
    if (!tok_path || first_file >= argc) {
        fprintf(stderr, "usage: kvd-maskbench --tokenizer tokenizer.json [--json OUT] [--ordered] [--cpu-time] [-v] FILE...\n");
        return 2;
    }
    kvd_error err = {0};
    kvd_tokenizer *tok = kvd_tokenizer_load(tok_path, &err);
    if (!tok) {
        fprintf(stderr, "kvd-maskbench: %s\n", err.msg);
        return 1;
    }
    /* Qwen2's model vocabulary is wider than the tokenizer's: 151,936 ids */
    int num_ids = kvd_tokenizer_vocab_size(tok) > 151936 ? kvd_tokenizer_vocab_size(tok) : 151936;
    double t0 = now_us();
    kvd_grammar_vocab *voc = kvd_grammar_vocab_create(tok, num_ids, &err);
    if (!voc) {
        fprintf(stderr, "kvd-maskbench: %s\n", err.msg);
        return 1;
    }
    double vocab_ms = (now_us() - t0) / 1e3;
    uint32_t *mask = malloc((size_t)kvd_grammar_mask_words(voc) * sizeof *mask);
    samples tbm = {0}, ttfm = {0};
    long passing = 0, compile_error = 0, validation_error = 0, invalidation_error = 0, schemas = 0, tests = 0,
         inconsistent = 0, skipped = 0;
    kvd_grammar_json_options opts = {.any_order = !ordered};
    for (int fi = first_file; fi < argc; fi++) {
        char *text = read_file(argv[fi]);
        cJSON *doc = text ? cJSON_Parse(text) : NULL;
        const cJSON *schema = cJSON_GetObjectItemCaseSensitive(doc, "schema");
        const char *tests_raw = text ? find_key(text, "tests") : NULL;
        if (!schema || !tests_raw || *tests_raw != '[') {
            fprintf(stderr, "kvd-maskbench: %s: not a MaskBench file\n", argv[fi]);
            cJSON_Delete(doc);
            free(text);
            continue;
        }
        schemas++;
        if (verbose) fprintf(stderr, "FILE %s\n", argv[fi]);
        char *schema_text = cJSON_PrintUnformatted(schema);
        double c0 = now_us();
        kvd_grammar *g = kvd_grammar_compile_json_schema(voc, schema_text, strlen(schema_text), &opts, &err);
        free(schema_text);
        kvd_grammar_matcher *m0 = NULL;
        if (g) m0 = kvd_grammar_matcher_create(g, &err);
        if (m0 && kvd_grammar_matcher_fill_mask(m0, mask, &err)) {
            kvd_grammar_matcher_destroy(m0);
            m0 = NULL;
        }
        if (!g || !m0) {
            compile_error++;
            if (verbose) printf("COMPILE %s: %s\n", argv[fi], err.msg);
            kvd_grammar_release(g);
            cJSON_Delete(doc);
            free(text);
            continue;
        }
        add(&ttfm, now_us() - c0);
        kvd_grammar_matcher_destroy(m0);
        const char **items;
        int nitems = array_items(tests_raw, &items);
        const cJSON *tj = cJSON_GetObjectItemCaseSensitive(doc, "tests");
        bool ok = true;
        int ti = 0;
        for (const cJSON *t = tj ? tj->child : NULL; t && ti < nitems; t = t->next, ti++) {
            bool valid = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(t, "valid"));
            const char *data = find_key(items[ti], "data");
            buf out = {0};
            if (!data || dump_value(&data, &out)) {
                skipped++;
                free(out.p);
                continue;
            }
            tests++;
            int32_t *ids = NULL;
            int n = kvd_tokenizer_encode(tok, out.p, out.n, false, &ids);
            kvd_grammar_matcher *m = kvd_grammar_matcher_create(g, &err);
            bool accepted = m != NULL && n >= 0;
            int at = -1;
            for (int k = 0; accepted && k <= n; k++) {
                double m0t = now_us();
                if (kvd_grammar_matcher_fill_mask(m, mask, &err)) {
                    accepted = false;
                    break;
                }
                add(&tbm, now_us() - m0t);
                if (k == n) {
                    accepted = kvd_grammar_matcher_can_end(m);
                    if (!accepted) at = k;
                    break;
                }
                bool in_mask = (mask[ids[k] >> 5] >> (ids[k] & 31)) & 1;
                int rc = kvd_grammar_matcher_accept(m, ids[k], NULL);
                if (in_mask != (rc == 0)) {
                    inconsistent++;
                    if (verbose) printf("INCONSISTENT %s test %d token %d (id %d): mask %d accept %d\n", argv[fi], ti, k, ids[k], in_mask, rc);
                }
                if (rc) {
                    accepted = false;
                    at = k;
                }
            }
            if (valid && !accepted) {
                validation_error++;
                ok = false;
                if (verbose) {
                    int off = 0;
                    for (int k = 0; k < at && k < n; k++) {
                        char *s = kvd_tokenizer_decode(tok, &ids[k], 1, false, NULL, NULL);
                        off += s ? (int)strlen(s) : 0;
                        free(s);
                    }
                    printf("VALIDATION %s test %d: rejected at byte %d: %.60s|%.40s\n", argv[fi], ti, off, out.p + (off > 60 ? off - 60 : 0), out.p + off);
                }
            }
            if (!valid && accepted) {
                invalidation_error++;
                ok = false;
                if (verbose) printf("INVALIDATION %s test %d: %.200s\n", argv[fi], ti, out.p);
            }
            kvd_grammar_matcher_destroy(m);
            free(ids);
            free(out.p);
        }
        free(items);
        if (ok) passing++;
        kvd_grammar_release(g);
        cJSON_Delete(doc);
        free(text);
    }
    if (tbm.n) qsort(tbm.v, tbm.n, sizeof *tbm.v, dcmp); /* (no masks: files without tests) */
    if (ttfm.n) qsort(ttfm.v, ttfm.n, sizeof *ttfm.v, dcmp);
    printf("kvd-maskbench: %ld schemas, %ld tests (%ld skipped), members in %s order, vocabulary %d ids (%.0f ms)%s\n",
           schemas, tests, skipped, ordered ? "schema" : "any", num_ids, vocab_ms,
           bench_clock == CLOCK_MONOTONIC ? "" : ", thread CPU time");
    printf("passing             %6ld  (%.1f%%)\n", passing, schemas ? 100.0 * passing / schemas : 0);
    printf("compile errors      %6ld\n", compile_error);
    printf("validation errors   %6ld  (%.2f%% of tests)\n", validation_error, tests ? 100.0 * validation_error / tests : 0);
    printf("invalidation errors %6ld\n", invalidation_error);
    if (inconsistent) printf("mask/accept disagreements %ld\n", inconsistent);
    printf("TBM us   p50 %.1f  p90 %.1f  p99 %.1f  max %.0f  mean %.1f  (%zu masks)\n", pct(&tbm, 50), pct(&tbm, 90),
           pct(&tbm, 99), tbm.n ? tbm.v[tbm.n - 1] : 0, mean(&tbm), tbm.n);
    printf("TTFM us  p50 %.1f  p90 %.1f  p99 %.1f  max %.0f  mean %.1f\n", pct(&ttfm, 50), pct(&ttfm, 90), pct(&ttfm, 99),
           ttfm.n ? ttfm.v[ttfm.n - 1] : 0, mean(&ttfm));
    if (json_out) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "schemas", (double)schemas);
        cJSON_AddNumberToObject(o, "tests", (double)tests);
        cJSON_AddNumberToObject(o, "passing", (double)passing);
        cJSON_AddNumberToObject(o, "compile_error", (double)compile_error);
        cJSON_AddNumberToObject(o, "validation_error", (double)validation_error);
        cJSON_AddNumberToObject(o, "invalidation_error", (double)invalidation_error);
        cJSON_AddNumberToObject(o, "mask_accept_disagreements", (double)inconsistent);
        cJSON_AddStringToObject(o, "member_order", ordered ? "schema" : "any");
        cJSON_AddStringToObject(o, "clock", bench_clock == CLOCK_MONOTONIC ? "wall" : "thread_cpu");
        cJSON_AddItemToObject(o, "tbm_us", stats_json(&tbm));
        cJSON_AddItemToObject(o, "ttfm_us", stats_json(&ttfm));
        char *s = cJSON_Print(o);
        FILE *f = fopen(json_out, "w");
        if (!f || fputs(s, f) < 0 || fputc('\n', f) < 0) fprintf(stderr, "kvd-maskbench: cannot write %s\n", json_out);
        if (f) fclose(f);
        free(s);
        cJSON_Delete(o);
    }
    free(tbm.v);
    free(ttfm.v);
    free(mask);
    kvd_grammar_vocab_destroy(voc);
    kvd_tokenizer_destroy(tok);
    return inconsistent ? 1 : 0;
}
