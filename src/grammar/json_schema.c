/* json_schema.c - JSON Schema -> grammar.
 *
 * Every schema node becomes one rule (memoised by node, so $ref recursion is a rule
 * that refers to itself). allOf, and $ref or anyOf/oneOf next to other keywords, are
 * merged into one schema first (intersection keyword by keyword; what cannot be
 * merged exactly is an error). oneOf is accepted when its branches cannot overlap
 * (different types), else it is an error: kvd never accepts a value the schema
 * rejects. Keywords that only annotate (title, description, default, ...) and
 * keywords outside the JSON Schema vocabulary are ignored, as validators do.
 */
#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "grammar_internal.h"

enum { T_NULL = 1, T_BOOL = 2, T_OBJECT = 4, T_ARRAY = 8, T_STRING = 16, T_INTEGER = 32, T_NUMBER = 64 };
#define T_ALL (T_NULL | T_BOOL | T_OBJECT | T_ARRAY | T_STRING | T_INTEGER | T_NUMBER)
#define MAX_DEPTH 200

typedef struct memo_ent {
    const cJSON *node;
    uint32_t rule;
} memo_ent;

typedef struct jctx {
    gr_builder *b;
    cJSON *root;
    bool any_order;
    bool ref_alone; /* drafts 4-7: keywords beside $ref are ignored */
    const kvd_grammar_vocab *vocab;
    memo_ent *memo;
    size_t nmemo, capmemo;
    cJSON **owned; /* merged schemas made here */
    size_t nowned, capowned;
    uint32_t jchar, any_value, any_string, number, integer;
    int depth;
    int nest; /* compiles inside compiles (literal checks), bounded */
} jctx;

static uint32_t compile_node(jctx *c, const cJSON *s);

static const char *const unsupported_kw[] = {
    "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
    "contains", "minContains", "maxContains", "propertyNames",
    "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef", NULL};

static bool own(jctx *c, cJSON *x)
{
    if (c->nowned == c->capowned) {
        size_t cap = c->capowned ? c->capowned * 2 : 16;
        cJSON **p = realloc(c->owned, cap * sizeof *p);
        if (!p) {
            cJSON_Delete(x);
            gr_fail(c->b, KVD_ENOMEM, "json schema: out of memory");
            return false;
        }
        c->owned = p;
        c->capowned = cap;
    }
    c->owned[c->nowned++] = x;
    return true;
}

/* --- shared lexical rules ------------------------------------------------------ */

/* Whitespace between tokens: at most one space or newline, then up to 20 spaces/tabs
 * (compact and indented output both pass; a model cannot pad forever). Inline byte
 * sets rather than a rule, so the mask cache sees what follows it. */
static void seq_ws(jctx *c, gr_seq *s)
{
    gr_bytes first = {{0}}, indent = {{0}};
    gr_bytes_add(&first, ' ');
    gr_bytes_add(&first, '\n');
    gr_bytes_add(&indent, ' ');
    gr_bytes_add(&indent, '\t');
    gr_seq_bytes(c->b, s, &first, 0, 1);
    gr_seq_bytes(c->b, s, &indent, 0, 20);
}

/* One character of a JSON string's text: unescaped (valid UTF-8) or an escape. */
static uint32_t jchar_rule(jctx *c)
{
    if (c->jchar != GR_NONE) return c->jchar;
    gr_builder *b = c->b;
    uint32_t r = gr_rule_new(b, "char", true);
    gr_seq s = {0};
    gr_bytes plain = {{0}};
    gr_bytes_add_range(&plain, 0x20, 0x7F);
    plain.w['"' >> 6] &= ~(1ull << ('"' & 63));
    plain.w['\\' >> 6] &= ~(1ull << ('\\' & 63));
    gr_seq_bytes(b, &s, &plain, 1, 1);
    gr_rule_add_alt(b, r, &s);
    gr_utf8_range(b, r, 0x80, 0x10FFFF);
    gr_bytes esc = {{0}};
    for (const char *p = "\"\\/bfnrt"; *p; p++) gr_bytes_add(&esc, (unsigned char)*p);
    gr_seq_byte(b, &s, '\\');
    gr_seq_bytes(b, &s, &esc, 1, 1);
    gr_rule_add_alt(b, r, &s);
    gr_bytes hex = {{0}};
    gr_bytes_add_range(&hex, '0', '9');
    gr_bytes_add_range(&hex, 'a', 'f');
    gr_bytes_add_range(&hex, 'A', 'F');
    gr_seq_lit(b, &s, "\\u", 2);
    gr_seq_bytes(b, &s, &hex, 4, 4);
    gr_rule_add_alt(b, r, &s);
    return c->jchar = r;
}

static uint32_t string_rule(jctx *c, uint32_t min, uint32_t max)
{
    if (min == 0 && max == GR_INF && c->any_string != GR_NONE) return c->any_string;
    gr_builder *b = c->b;
    uint32_t r = gr_rule_new(b, "string", true);
    gr_seq s = {0};
    gr_seq_byte(b, &s, '"');
    gr_seq_rule(b, &s, jchar_rule(c), min, max);
    gr_seq_byte(b, &s, '"');
    gr_rule_add_alt(b, r, &s);
    if (min == 0 && max == GR_INF) c->any_string = r;
    return r;
}

static void digits(gr_builder *b, gr_seq *s, unsigned lo, unsigned hi, uint32_t min, uint32_t max)
{
    gr_bytes d = {{0}};
    gr_bytes_add_range(&d, lo, hi);
    gr_seq_bytes(b, s, &d, min, max);
}

/* -?(0|[1-9][0-9]*) as a rule body helper: the integer part without sign */
static uint32_t uint_rule(jctx *c)
{
    gr_builder *b = c->b;
    uint32_t r = gr_rule_new(b, "uint", true);
    gr_seq s = {0};
    gr_seq_byte(b, &s, '0');
    gr_rule_add_alt(b, r, &s);
    digits(b, &s, '1', '9', 1, 1);
    digits(b, &s, '0', '9', 0, GR_INF);
    gr_rule_add_alt(b, r, &s);
    return r;
}

static uint32_t integer_rule(jctx *c)
{
    if (c->integer != GR_NONE) return c->integer;
    gr_builder *b = c->b;
    uint32_t u = uint_rule(c);
    uint32_t r = gr_rule_new(b, "integer", true);
    gr_seq s = {0};
    gr_seq_byte(b, &s, '-');
    s.el[s.n - 1].min = 0;
    gr_seq_rule(b, &s, u, 1, 1);
    gr_rule_add_alt(b, r, &s);
    return c->integer = r;
}

/* fraction and exponent */
static void seq_frac_exp(jctx *c, gr_seq *s)
{
    gr_builder *b = c->b;
    uint32_t frac = gr_rule_new(b, "frac", true);
    gr_seq f = {0};
    gr_seq_byte(b, &f, '.');
    digits(b, &f, '0', '9', 1, GR_INF);
    gr_rule_add_alt(b, frac, &f);
    uint32_t exp = gr_rule_new(b, "exp", true);
    gr_bytes e = {{0}}, sign = {{0}};
    gr_bytes_add(&e, 'e');
    gr_bytes_add(&e, 'E');
    gr_bytes_add(&sign, '+');
    gr_bytes_add(&sign, '-');
    gr_seq_bytes(b, &f, &e, 1, 1);
    gr_seq_bytes(b, &f, &sign, 0, 1);
    digits(b, &f, '0', '9', 1, GR_INF);
    gr_rule_add_alt(b, exp, &f);
    gr_seq_rule(b, s, frac, 0, 1);
    gr_seq_rule(b, s, exp, 0, 1);
}

static uint32_t number_rule(jctx *c)
{
    if (c->number != GR_NONE) return c->number;
    gr_builder *b = c->b;
    uint32_t u = uint_rule(c);
    uint32_t r = gr_rule_new(b, "number", true);
    gr_seq s = {0};
    gr_seq_byte(b, &s, '-');
    s.el[s.n - 1].min = 0;
    gr_seq_rule(b, &s, u, 1, 1);
    seq_frac_exp(c, &s);
    gr_rule_add_alt(b, r, &s);
    return c->number = r;
}

static uint32_t any_value_rule(jctx *c)
{
    if (c->any_value != GR_NONE) return c->any_value;
    gr_builder *b = c->b;
    uint32_t v = gr_rule_new(b, "value", false);
    c->any_value = v;
    uint32_t str = string_rule(c, 0, GR_INF);
    /* object */
    uint32_t member = gr_rule_new(b, "member", false), more = gr_rule_new(b, "more-members", false);
    gr_seq s = {0};
    gr_seq_rule(b, &s, str, 1, 1);
    seq_ws(c, &s);
    gr_seq_byte(b, &s, ':');
    seq_ws(c, &s);
    gr_seq_rule(b, &s, v, 1, 1);
    gr_rule_add_alt(b, member, &s);
    seq_ws(c, &s);
    gr_seq_byte(b, &s, ',');
    seq_ws(c, &s);
    gr_seq_rule(b, &s, member, 1, 1);
    gr_rule_add_alt(b, more, &s);
    uint32_t obody = gr_rule_new(b, "members", false);
    gr_seq_rule(b, &s, member, 1, 1);
    gr_seq_rule(b, &s, more, 0, GR_INF);
    gr_rule_add_alt(b, obody, &s);
    gr_seq_byte(b, &s, '{');
    seq_ws(c, &s);
    gr_seq_rule(b, &s, obody, 0, 1);
    seq_ws(c, &s);
    gr_seq_byte(b, &s, '}');
    gr_rule_add_alt(b, v, &s);
    /* array */
    uint32_t more_items = gr_rule_new(b, "more-items", false);
    seq_ws(c, &s);
    gr_seq_byte(b, &s, ',');
    seq_ws(c, &s);
    gr_seq_rule(b, &s, v, 1, 1);
    gr_rule_add_alt(b, more_items, &s);
    uint32_t abody = gr_rule_new(b, "items", false);
    gr_seq_rule(b, &s, v, 1, 1);
    gr_seq_rule(b, &s, more_items, 0, GR_INF);
    gr_rule_add_alt(b, abody, &s);
    gr_seq_byte(b, &s, '[');
    seq_ws(c, &s);
    gr_seq_rule(b, &s, abody, 0, 1);
    seq_ws(c, &s);
    gr_seq_byte(b, &s, ']');
    gr_rule_add_alt(b, v, &s);
    gr_seq_rule(b, &s, str, 1, 1);
    gr_rule_add_alt(b, v, &s);
    gr_seq_rule(b, &s, number_rule(c), 1, 1);
    gr_rule_add_alt(b, v, &s);
    static const char *const lits[] = {"true", "false", "null"};
    for (int i = 0; i < 3; i++) gr_seq_rule(b, &s, gr_rule_lit(b, lits[i], lits[i], strlen(lits[i])), 1, 1),
                                 gr_rule_add_alt(b, v, &s);
    return v;
}

/* --- literals (enum, const, keys) --------------------------------------------- */

/* A string as json.dumps(ensure_ascii=False) writes it, quotes included. */
static char *json_quote(const char *text)
{
    size_t n = strlen(text);
    char *out = malloc(n * 6 + 3), *o = out;
    if (!out) return NULL;
    *o++ = '"';
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        switch (*p) {
        case '"': *o++ = '\\', *o++ = '"'; break;
        case '\\': *o++ = '\\', *o++ = '\\'; break;
        case '\n': *o++ = '\\', *o++ = 'n'; break;
        case '\r': *o++ = '\\', *o++ = 'r'; break;
        case '\t': *o++ = '\\', *o++ = 't'; break;
        case '\b': *o++ = '\\', *o++ = 'b'; break;
        case '\f': *o++ = '\\', *o++ = 'f'; break;
        default:
            if (*p < 0x20) o += sprintf(o, "\\u%04x", *p);
            else *o++ = (char)*p;
        }
    }
    *o++ = '"';
    *o = 0;
    return out;
}

/* Shortest text that reads back as d (Python's repr of a float). */
static void number_text(double d, char *buf, size_t cap)
{
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, cap, "%.*g", prec, d);
        if (strtod(buf, NULL) == d) return;
    }
}

static void seq_value_lit(jctx *c, gr_seq *s, const cJSON *v);

static uint32_t value_lit_rule(jctx *c, const cJSON *v)
{
    uint32_t r = gr_rule_new(c->b, "const", false);
    gr_seq s = {0};
    seq_value_lit(c, &s, v);
    gr_rule_add_alt(c->b, r, &s);
    if (cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble) && fabs(v->valuedouble) < 1e15) {
        /* 3 and 3.0 are the same number to a validator */
        char buf[64];
        snprintf(buf, sizeof buf, "%.0f.0", v->valuedouble);
        gr_seq_lit(c->b, &s, buf, strlen(buf));
        gr_rule_add_alt(c->b, r, &s);
    }
    return r;
}

static void seq_value_lit(jctx *c, gr_seq *s, const cJSON *v)
{
    gr_builder *b = c->b;
    char buf[64];
    if (cJSON_IsNull(v)) gr_seq_lit(b, s, "null", 4);
    else if (cJSON_IsTrue(v)) gr_seq_lit(b, s, "true", 4);
    else if (cJSON_IsFalse(v)) gr_seq_lit(b, s, "false", 5);
    else if (cJSON_IsNumber(v)) {
        if (v->valuedouble == floor(v->valuedouble) && fabs(v->valuedouble) < 1e15)
            snprintf(buf, sizeof buf, "%.0f", v->valuedouble);
        else
            number_text(v->valuedouble, buf, sizeof buf);
        gr_seq_lit(b, s, buf, strlen(buf));
    } else if (cJSON_IsString(v)) {
        char *q = json_quote(v->valuestring);
        if (!q) {
            gr_fail(b, KVD_ENOMEM, "json schema: out of memory");
            return;
        }
        gr_seq_lit(b, s, q, strlen(q));
        free(q);
    } else if (cJSON_IsArray(v) || cJSON_IsObject(v)) {
        bool obj = cJSON_IsObject(v);
        gr_seq_byte(b, s, obj ? '{' : '[');
        seq_ws(c, s);
        bool first = true;
        for (const cJSON *x = v->child; x; x = x->next) {
            if (!first) {
                seq_ws(c, s);
                gr_seq_byte(b, s, ',');
                seq_ws(c, s);
            }
            first = false;
            if (obj) {
                char *q = json_quote(x->string);
                if (!q) {
                    gr_fail(b, KVD_ENOMEM, "json schema: out of memory");
                    return;
                }
                gr_seq_lit(b, s, q, strlen(q));
                free(q);
                seq_ws(c, s);
                gr_seq_byte(b, s, ':');
                seq_ws(c, s);
            }
            gr_seq_rule(b, s, value_lit_rule(c, x), 1, 1);
        }
        seq_ws(c, s);
        gr_seq_byte(b, s, obj ? '}' : ']');
    }
}

/* --- helpers ------------------------------------------------------------------- */

static int type_bit(const char *t)
{
    static const struct {
        const char *name;
        int bit;
    } tab[] = {{"null", T_NULL}, {"boolean", T_BOOL}, {"object", T_OBJECT}, {"array", T_ARRAY},
               {"string", T_STRING}, {"integer", T_INTEGER}, {"number", T_NUMBER | T_INTEGER}};
    for (size_t i = 0; i < sizeof tab / sizeof *tab; i++)
        if (!strcmp(t, tab[i].name)) return tab[i].bit;
    return -1;
}

/* The types a schema's "type" allows (T_ALL without one); -1 on a bad value. */
static int schema_types(jctx *c, const cJSON *s)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(s, "type");
    if (!t) return T_ALL;
    if (cJSON_IsString(t)) {
        int bit = type_bit(t->valuestring);
        if (bit < 0) gr_fail(c->b, KVD_EINVAL, "json schema: unknown type '%s'", t->valuestring);
        return bit;
    }
    if (cJSON_IsArray(t)) {
        int bits = 0;
        for (const cJSON *x = t->child; x; x = x->next) {
            int bit = cJSON_IsString(x) ? type_bit(x->valuestring) : -1;
            if (bit < 0) {
                gr_fail(c->b, KVD_EINVAL, "json schema: bad entry in 'type'");
                return -1;
            }
            bits |= bit;
        }
        return bits;
    }
    gr_fail(c->b, KVD_EINVAL, "json schema: 'type' must be a string or an array");
    return -1;
}

static int value_type(const cJSON *v)
{
    if (cJSON_IsNull(v)) return T_NULL;
    if (cJSON_IsBool(v)) return T_BOOL;
    if (cJSON_IsObject(v)) return T_OBJECT;
    if (cJSON_IsArray(v)) return T_ARRAY;
    if (cJSON_IsString(v)) return T_STRING;
    if (v->valuedouble == floor(v->valuedouble)) return T_INTEGER;
    return T_NUMBER;
}

static const cJSON *resolve_ref(jctx *c, const char *ref)
{
    if (ref[0] != '#') {
        gr_fail(c->b, KVD_EUNSUPPORTED, "json schema: $ref '%.100s' is not in this document", ref);
        return NULL;
    }
    const cJSON *x = c->root;
    const char *p = ref + 1;
    if (*p && *p != '/') {
        gr_fail(c->b, KVD_EUNSUPPORTED, "json schema: $ref anchors ('%.100s') are not supported", ref);
        return NULL;
    }
    while (*p == '/') {
        p++;
        char tok[512];
        size_t n = 0;
        while (*p && *p != '/' && n < sizeof tok - 1) {
            if (p[0] == '~' && p[1] == '0') tok[n++] = '~', p += 2;
            else if (p[0] == '~' && p[1] == '1') tok[n++] = '/', p += 2;
            else if (p[0] == '%' && p[1] && p[2]) {
                char hx[3] = {p[1], p[2], 0};
                tok[n++] = (char)strtol(hx, NULL, 16);
                p += 3;
            } else
                tok[n++] = *p++;
        }
        tok[n] = 0;
        if (cJSON_IsArray(x)) {
            char *end;
            long i = strtol(tok, &end, 10);
            x = *end ? NULL : cJSON_GetArrayItem(x, (int)i);
        } else
            x = cJSON_IsObject(x) ? cJSON_GetObjectItemCaseSensitive(x, tok) : NULL;
        if (!x) {
            gr_fail(c->b, KVD_EINVAL, "json schema: $ref '%.100s' points nowhere", ref);
            return NULL;
        }
    }
    return x;
}

static bool is_annotation(const char *k)
{
    static const char *const ann[] = {"title", "description", "default", "examples", "$schema", "$id",
                                      "$comment", "readOnly", "writeOnly", "deprecated", "$defs",
                                      "definitions", "$anchor", "contentMediaType", "contentEncoding",
                                      "$vocabulary", "id", "example", "$dynamicAnchor", NULL};
    for (int i = 0; ann[i]; i++)
        if (!strcmp(k, ann[i])) return true;
    /* not a validation keyword of any draft: ignored by validators too */
    static const char *const known[] = {
        "type", "enum", "const", "properties", "required", "additionalProperties", "items", "prefixItems",
        "additionalItems", "minItems", "maxItems", "uniqueItems", "minLength", "maxLength", "pattern",
        "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "anyOf",
        "oneOf", "allOf", "$ref", "minProperties", "maxProperties", "not", "if", "then", "else",
        "dependentRequired", "dependentSchemas", "dependencies", "contains", "minContains", "maxContains",
        "patternProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems", "$dynamicRef",
        "$recursiveRef", "$recursiveAnchor", NULL};
    for (int i = 0; known[i]; i++)
        if (!strcmp(k, known[i])) return false;
    return true;
}

/* --- merging (allOf, $ref/anyOf with siblings) --------------------------------- */

static cJSON *merge_into(jctx *c, cJSON *dst, const cJSON *src);

/* dst := dst AND src for one keyword */
static bool merge_key(jctx *c, cJSON *dst, const cJSON *v)
{
    const char *k = v->string;
    cJSON *have = cJSON_GetObjectItemCaseSensitive(dst, k);
    if (is_annotation(k)) return true;
    if (!have) return cJSON_AddItemToObject(dst, k, cJSON_Duplicate(v, true));
    if (cJSON_Compare(have, v, true)) return true;
    if (!strcmp(k, "required")) {
        for (const cJSON *x = v->child; x; x = x->next) {
            bool found = false;
            for (const cJSON *y = have->child; y && !found; y = y->next) found = cJSON_Compare(x, y, true);
            if (!found) cJSON_AddItemToArray(have, cJSON_Duplicate(x, true));
        }
        return true;
    }
    if (!strcmp(k, "properties") && cJSON_IsObject(have) && cJSON_IsObject(v)) {
        for (const cJSON *x = v->child; x; x = x->next) {
            cJSON *y = cJSON_GetObjectItemCaseSensitive(have, x->string);
            if (!y) {
                cJSON_AddItemToObject(have, x->string, cJSON_Duplicate(x, true));
                continue;
            }
            cJSON *both = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(both, "allOf");
            cJSON_AddItemToArray(arr, cJSON_Duplicate(y, true));
            cJSON_AddItemToArray(arr, cJSON_Duplicate(x, true));
            cJSON_ReplaceItemInObjectCaseSensitive(have, x->string, both);
        }
        return true;
    }
    if (!strcmp(k, "type")) {
        int a = schema_types(c, dst), bb = 0;
        cJSON tmp = {0};
        cJSON *holder = cJSON_CreateObject();
        cJSON_AddItemToObject(holder, "type", cJSON_Duplicate(v, true));
        bb = schema_types(c, holder);
        cJSON_Delete(holder);
        (void)tmp;
        if (a < 0 || bb < 0) return false;
        int t = a & bb;
        cJSON *arr = cJSON_CreateArray();
        static const char *const names[] = {"null", "boolean", "object", "array", "string", "integer", "number"};
        for (int i = 0; i < 7; i++)
            if (t & (1 << i)) {
                if (i == 5 && (t & T_NUMBER)) continue;
                cJSON_AddItemToArray(arr, cJSON_CreateString(names[i]));
            }
        return cJSON_ReplaceItemInObjectCaseSensitive(dst, "type", arr);
    }
    if (!strcmp(k, "enum") && cJSON_IsArray(have) && cJSON_IsArray(v)) {
        cJSON *arr = cJSON_CreateArray();
        for (const cJSON *x = have->child; x; x = x->next)
            for (const cJSON *y = v->child; y; y = y->next)
                if (cJSON_Compare(x, y, true)) {
                    cJSON_AddItemToArray(arr, cJSON_Duplicate(x, true));
                    break;
                }
        return cJSON_ReplaceItemInObjectCaseSensitive(dst, "enum", arr);
    }
    static const char *const lower[] = {"minimum", "minLength", "minItems", "minProperties", "exclusiveMinimum", NULL};
    static const char *const upper[] = {"maximum", "maxLength", "maxItems", "maxProperties", "exclusiveMaximum", NULL};
    for (int i = 0; lower[i]; i++)
        if (!strcmp(k, lower[i]) && cJSON_IsNumber(have) && cJSON_IsNumber(v)) {
            if (v->valuedouble > have->valuedouble) cJSON_SetNumberValue(have, v->valuedouble);
            return true;
        }
    for (int i = 0; upper[i]; i++)
        if (!strcmp(k, upper[i]) && cJSON_IsNumber(have) && cJSON_IsNumber(v)) {
            if (v->valuedouble < have->valuedouble) cJSON_SetNumberValue(have, v->valuedouble);
            return true;
        }
    if (!strcmp(k, "additionalProperties") || !strcmp(k, "items")) {
        if (cJSON_IsFalse(have)) return true;
        if (cJSON_IsFalse(v)) return cJSON_ReplaceItemInObjectCaseSensitive(dst, k, cJSON_CreateFalse());
        if (cJSON_IsTrue(have)) return cJSON_ReplaceItemInObjectCaseSensitive(dst, k, cJSON_Duplicate(v, true));
        if (cJSON_IsTrue(v)) return true;
        if (cJSON_IsObject(have) && cJSON_IsObject(v)) {
            cJSON *both = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(both, "allOf");
            cJSON_AddItemToArray(arr, cJSON_Duplicate(have, true));
            cJSON_AddItemToArray(arr, cJSON_Duplicate(v, true));
            return cJSON_ReplaceItemInObjectCaseSensitive(dst, k, both);
        }
    }
    if (!strcmp(k, "not")) { /* not A and not B: not (A or B) */
        cJSON *both = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(both, "anyOf");
        cJSON_AddItemToArray(arr, cJSON_Duplicate(have, true));
        cJSON_AddItemToArray(arr, cJSON_Duplicate(v, true));
        return cJSON_ReplaceItemInObjectCaseSensitive(dst, k, both);
    }
    if (!strcmp(k, "allOf") && cJSON_IsArray(have)) {
        for (const cJSON *x = v->child; x; x = x->next) cJSON_AddItemToArray(have, cJSON_Duplicate(x, true));
        return true;
    }
    gr_fail(c->b, KVD_EUNSUPPORTED, "json schema: cannot intersect two different '%s' (allOf)", k);
    return false;
}

/* a AND b as one schema (b NULL or true: a) */
static cJSON *schema_and(const cJSON *a, const cJSON *b)
{
    if (!b || cJSON_IsTrue(b)) return cJSON_Duplicate(a, true);
    if (cJSON_IsTrue(a)) return cJSON_Duplicate(b, true);
    if (cJSON_IsFalse(a) || cJSON_IsFalse(b)) return cJSON_CreateFalse();
    cJSON *both = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(both, "allOf");
    cJSON_AddItemToArray(arr, cJSON_Duplicate(a, true));
    cJSON_AddItemToArray(arr, cJSON_Duplicate(b, true));
    return both;
}

/* properties and additionalProperties of src into dst. additionalProperties only sees
 * the properties beside it, so a member one side declares and the other does not must
 * also pass the other side's additionalProperties (false: it cannot appear). */
static void merge_members(cJSON *dst, const cJSON *sp, const cJSON *sap)
{
    cJSON *dp = cJSON_GetObjectItemCaseSensitive(dst, "properties");
    cJSON *dap = cJSON_GetObjectItemCaseSensitive(dst, "additionalProperties");
    if (sap && !cJSON_IsTrue(sap) && cJSON_IsObject(dp))
        for (cJSON *x = dp->child, *next; x; x = next) {
            next = x->next; /* x is freed when replaced */
            if (!(cJSON_IsObject(sp) && cJSON_HasObjectItem(sp, x->string)))
                cJSON_ReplaceItemInObjectCaseSensitive(dp, x->string, schema_and(x, sap));
        }
    if (cJSON_IsObject(sp)) {
        if (!dp) dp = cJSON_AddObjectToObject(dst, "properties");
        for (const cJSON *y = sp->child; y; y = y->next) {
            cJSON *x = cJSON_GetObjectItemCaseSensitive(dp, y->string);
            if (x) cJSON_ReplaceItemInObjectCaseSensitive(dp, y->string, schema_and(x, y));
            else cJSON_AddItemToObject(dp, y->string, schema_and(y, dap));
        }
    }
    if (sap) {
        cJSON *ap = dap ? schema_and(dap, sap) : cJSON_Duplicate(sap, true);
        if (dap) cJSON_ReplaceItemInObjectCaseSensitive(dst, "additionalProperties", ap);
        else cJSON_AddItemToObject(dst, "additionalProperties", ap);
    }
}

/* Merges schema src (resolving its $ref and allOf) into dst. */
static cJSON *merge_into(jctx *c, cJSON *dst, const cJSON *src)
{
    if (++c->depth > MAX_DEPTH) {
        gr_fail(c->b, KVD_EUNSUPPORTED, "json schema: $ref/allOf nest too deeply (recursive allOf)");
        return NULL;
    }
    cJSON *r = dst;
    if (cJSON_IsFalse(src)) {
        cJSON_AddItemToObject(dst, "enum", cJSON_CreateArray()); /* nothing matches */
        if (!merge_key(c, dst, cJSON_GetObjectItemCaseSensitive(dst, "enum"))) r = NULL;
        goto out;
    }
    if (!cJSON_IsObject(src)) goto out;
    const cJSON *ref = cJSON_GetObjectItemCaseSensitive(src, "$ref");
    if (ref && c->ref_alone) { /* drafts 4-7: $ref replaces its siblings */
        const cJSON *t = cJSON_IsString(ref) ? resolve_ref(c, ref->valuestring) : NULL;
        if (!t || !merge_into(c, dst, t)) r = NULL;
        goto out;
    }
    merge_members(dst, cJSON_GetObjectItemCaseSensitive(src, "properties"),
                  cJSON_GetObjectItemCaseSensitive(src, "additionalProperties"));
    for (const cJSON *v = src->child; v && r; v = v->next) {
        if (!strcmp(v->string, "properties") || !strcmp(v->string, "additionalProperties")) continue;
        if (!strcmp(v->string, "$ref")) {
            const cJSON *t = cJSON_IsString(v) ? resolve_ref(c, v->valuestring) : NULL;
            if (!t || !merge_into(c, dst, t)) r = NULL;
        } else if (!strcmp(v->string, "allOf") && cJSON_IsArray(v)) {
            for (const cJSON *x = v->child; x && r; x = x->next)
                if (!merge_into(c, dst, x)) r = NULL;
        } else if ((!strcmp(v->string, "anyOf") || !strcmp(v->string, "oneOf")) &&
                   cJSON_GetObjectItemCaseSensitive(dst, v->string)) {
            /* two disjunctions: keep both as an allOf of the two, resolved later */
            gr_fail(c->b, KVD_EUNSUPPORTED, "json schema: two '%s' under allOf", v->string);
            r = NULL;
        } else if (!merge_key(c, dst, v))
            r = NULL;
    }
out:
    c->depth--;
    return r;
}

/* --- strings ------------------------------------------------------------------- */

static const char *format_regex(const char *f)
{
    static const char *const tab[][2] = {
        {"date", "^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])$|"
                 "^[0-9]{4}-(0[13-9]|1[0-2])-(29|30)$|^[0-9]{4}-(0[13578]|1[02])-31$|"
                 "^([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)-02-29$"},
        {"time", "^([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"},
        {"date-time", "^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$|"
                      "^[0-9]{4}-(0[13-9]|1[0-2])-(29|30)[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$|"
                      "^[0-9]{4}-(0[13578]|1[02])-31[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$|"
                      "^([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)-02-29[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"},
        /* RFC 3986 (IP-literal hosts left out): what the format checker's rfc3987 takes */
        {"uri", "^[A-Za-z][A-Za-z0-9+.-]*:(//(([A-Za-z0-9._~!$&'()*+,;=:-]|%[0-9A-Fa-f]{2})*@)?([A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*(:[0-9]*)?(/([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})*)*|/(([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})+(/([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})*)*)?|([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})+(/([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})*)*)?(\\?(([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})|[/?])*)?(#(([A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})|[/?])*)?$"},
        {"ipv4", "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$"},
        {"uuid", "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"},
        {"email", "^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+$"},
    };
    for (size_t i = 0; i < sizeof tab / sizeof *tab; i++)
        if (!strcmp(f, tab[i][0])) return tab[i][1];
    return NULL;
}

/* The formats JSON Schema (drafts 3 to 2020-12) defines: a validator may check them,
 * so kvd either enforces one exactly or refuses it. Others are annotations. */
static bool format_known(const char *f)
{
    static const char *const known[] = {"date-time", "date", "time", "duration", "email", "idn-email", "hostname",
                                        "idn-hostname", "ipv4", "ipv6", "uri", "uri-reference", "iri",
                                        "iri-reference", "uuid", "uri-template", "json-pointer",
                                        "relative-json-pointer", "regex", "color", "host-name", "ip-address",
                                        "utc-millisec", NULL};
    for (int i = 0; known[i]; i++)
        if (!strcmp(f, known[i])) return true;
    return false;
}

static uint32_t get_count(jctx *c, const cJSON *s, const char *k, uint32_t dflt)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(s, k);
    if (!x) return dflt;
    if (!cJSON_IsNumber(x) || x->valuedouble < 0) {
        gr_fail(c->b, KVD_EINVAL, "json schema: '%s' must be a non-negative number", k);
        return dflt;
    }
    if (x->valuedouble >= 1e9) return dflt == 0 ? (uint32_t)1e9 : GR_INF;
    return (uint32_t)ceil(x->valuedouble);
}

static void alt_string(jctx *c, const cJSON *s, uint32_t rule)
{
    gr_builder *b = c->b;
    uint32_t min = get_count(c, s, "minLength", 0), max = get_count(c, s, "maxLength", GR_INF);
    if (!cJSON_HasObjectItem(s, "maxLength")) max = GR_INF;
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(s, "pattern");
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(s, "format");
    const char *re = NULL;
    bool anchored_whole = false;
    if (fmt && cJSON_IsString(fmt) && !format_known(fmt->valuestring))
        fmt = NULL; /* a format no validator defines constrains nothing (it is an annotation) */
    if (fmt && cJSON_IsString(fmt)) {
        re = format_regex(fmt->valuestring);
        if (!re) {
            gr_fail(b, KVD_EUNSUPPORTED, "json schema: format '%.60s' is not supported", fmt->valuestring);
            return;
        }
        anchored_whole = true;
        if (pat) {
            gr_fail(b, KVD_EUNSUPPORTED, "json schema: pattern together with format is not supported");
            return;
        }
    } else if (pat) {
        if (!cJSON_IsString(pat)) {
            gr_fail(b, KVD_EINVAL, "json schema: 'pattern' must be a string");
            return;
        }
        re = pat->valuestring;
    }
    gr_seq q = {0};
    if (re) {
        uint32_t rr;
        if (min > 0 || max != GR_INF) {
            /* The lengths cut the regex's own repetitions (^[a-z]+$ with maxLength 8 is
             * ^[a-z]{1,8}$); where that cannot be exact, refuse. */
            bool exact = false;
            rr = gr_regex_clipped(b, re, strlen(re), anchored_whole, min, max == GR_INF ? UINT64_MAX : max, &exact);
            if (b->failed) return;
            if (!exact) {
                gr_fail(b, KVD_EUNSUPPORTED,
                        "json schema: minLength/maxLength together with %s is not supported (only where the "
                        "%s has one repeated part between fixed-length parts)",
                        pat ? "pattern" : "format", pat ? "pattern" : "format");
                return;
            }
        } else
            rr = gr_regex(b, re, strlen(re), true, anchored_whole, NULL, NULL);
        if (b->failed) return;
        uint32_t sr = gr_rule_new(b, "pattern-string", true);
        gr_seq_byte(b, &q, '"');
        gr_seq_rule(b, &q, rr, 1, 1);
        gr_seq_byte(b, &q, '"');
        gr_rule_add_alt(b, sr, &q);
        gr_seq_rule(b, &q, sr, 1, 1);
    } else {
        if (min > max) return; /* nothing */
        gr_seq_rule(b, &q, string_rule(c, min, max), 1, 1);
    }
    gr_rule_add_alt(b, rule, &q);
}

/* --- integers with bounds -------------------------------------------------------- */

/* Alternatives for the decimal numbers of equal length lo..hi (digit strings). */
static void digit_range(gr_builder *b, uint32_t rule, const gr_seq *prefix, const char *lo, const char *hi, size_t n)
{
    gr_seq s = {0};
    for (size_t i = 0; i < prefix->n; i++) gr_seq_push(b, &s, prefix->el[i]);
    size_t i = 0;
    while (i < n && lo[i] == hi[i]) gr_seq_byte(b, &s, (unsigned char)lo[i]), i++;
    if (i == n) {
        gr_rule_add_alt(b, rule, &s);
        return;
    }
    size_t rest = n - i - 1;
    bool lo_zeros = strspn(lo + i + 1, "0") == rest, hi_nines = strspn(hi + i + 1, "9") == rest;
    unsigned a = (unsigned char)lo[i] + (lo_zeros ? 0 : 1), z = (unsigned char)hi[i] - (hi_nines ? 0 : 1);
    if (!lo_zeros) {
        gr_seq p = {0};
        for (size_t k = 0; k < s.n; k++) gr_seq_push(b, &p, s.el[k]);
        gr_seq_byte(b, &p, (unsigned char)lo[i]);
        char nines[32];
        memset(nines, '9', rest);
        digit_range(b, rule, &p, lo + i + 1, nines, rest);
        gr_seq_free(&p);
    }
    if (a <= z) {
        gr_seq p = {0};
        for (size_t k = 0; k < s.n; k++) gr_seq_push(b, &p, s.el[k]);
        digits(b, &p, a, z, 1, 1);
        if (rest) digits(b, &p, '0', '9', (uint32_t)rest, (uint32_t)rest);
        gr_rule_add_alt(b, rule, &p);
    }
    if (!hi_nines) {
        gr_seq p = {0};
        for (size_t k = 0; k < s.n; k++) gr_seq_push(b, &p, s.el[k]);
        gr_seq_byte(b, &p, (unsigned char)hi[i]);
        char zeros[32];
        memset(zeros, '0', rest);
        digit_range(b, rule, &p, zeros, hi + i + 1, rest);
        gr_seq_free(&p);
    }
    gr_seq_free(&s);
}

/* Alternatives of rule for the naturals lo..hi (hi < 0: unbounded), after prefix. */
static void nat_range(gr_builder *b, uint32_t rule, const gr_seq *prefix, long long lo, long long hi)
{
    char a[32], z[32];
    int la = snprintf(a, sizeof a, "%lld", lo);
    int lz = hi >= 0 ? snprintf(z, sizeof z, "%lld", hi) : 19;
    for (int d = la; d <= lz; d++) {
        char from[32], to[32];
        if (d == la) memcpy(from, a, (size_t)d + 1);
        else from[0] = '1', memset(from + 1, '0', (size_t)d - 1), from[d] = 0;
        if (hi >= 0 && d == lz) memcpy(to, z, (size_t)d + 1);
        else memset(to, '9', (size_t)d), to[d] = 0;
        if (d == 1 && from[0] == '0' && d == la) { /* 0..x: one digit */
        }
        if (hi < 0 && d == lz) { /* anything longer than lo: [1-9][0-9]{d-1,} */
            gr_seq p = {0};
            for (size_t k = 0; k < prefix->n; k++) gr_seq_push(b, &p, prefix->el[k]);
            digits(b, &p, '1', '9', 1, 1);
            digits(b, &p, '0', '9', (uint32_t)d - 1, GR_INF);
            gr_rule_add_alt(b, rule, &p);
            break;
        }
        digit_range(b, rule, prefix, from, to, (size_t)d);
    }
}

static bool bound(const cJSON *s, const char *k, const char *ex, bool lower, double *out)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(s, k), *e = cJSON_GetObjectItemCaseSensitive(s, ex);
    bool have = false;
    double v = lower ? -INFINITY : INFINITY;
    if (cJSON_IsNumber(x)) {
        v = x->valuedouble;
        have = true;
        if (cJSON_IsTrue(e)) v = lower ? nextafter(v, INFINITY) : nextafter(v, -INFINITY); /* draft 4 */
    }
    if (cJSON_IsNumber(e)) {
        double w = lower ? nextafter(e->valuedouble, INFINITY) : nextafter(e->valuedouble, -INFINITY);
        if (!have || (lower ? w > v : w < v)) v = w;
        have = true;
    }
    *out = v;
    return have;
}

static void alt_integer(jctx *c, const cJSON *s, uint32_t rule)
{
    gr_builder *b = c->b;
    double lo, hi;
    bool hl = bound(s, "minimum", "exclusiveMinimum", true, &lo), hh = bound(s, "maximum", "exclusiveMaximum", false, &hi);
    gr_seq q = {0};
    if (!hl && !hh) {
        gr_seq_rule(b, &q, integer_rule(c), 1, 1);
        gr_rule_add_alt(b, rule, &q);
        return;
    }
    if ((hl && fabs(lo) > 1e17) || (hh && fabs(hi) > 1e17)) {
        gr_fail(b, KVD_EUNSUPPORTED, "json schema: minimum/maximum beyond 1e17 is not supported");
        return;
    }
    long long l = hl ? (long long)ceil(lo) : LLONG_MIN, h = hh ? (long long)floor(hi) : LLONG_MAX;
    if (l > h) return;
    uint32_t r = gr_rule_new(b, "int-range", true);
    gr_seq empty = {0};
    if (l < 0) { /* negatives -max(1,-h) .. -l */
        gr_seq minus = {0};
        gr_seq_byte(b, &minus, '-');
        long long nlo = h < 0 ? -h : 1, nhi = hl ? -l : -1;
        nat_range(b, r, &minus, nlo, nhi);
        gr_seq_free(&minus);
    }
    if (h >= 0) nat_range(b, r, &empty, l > 0 ? l : 0, hh ? h : -1);
    gr_seq_rule(b, &q, r, 1, 1);
    gr_rule_add_alt(b, rule, &q);
}

/* A bound as written: its value and whether it is exclusive (draft 4's boolean
 * exclusiveMinimum/Maximum or draft 6's numbers; the tighter one wins). */
static bool num_bound(const cJSON *s, bool lower, double *val, bool *excl)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(s, lower ? "minimum" : "maximum");
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(s, lower ? "exclusiveMinimum" : "exclusiveMaximum");
    bool have = false;
    *excl = false;
    if (cJSON_IsNumber(x)) {
        *val = x->valuedouble;
        *excl = cJSON_IsTrue(e);
        have = true;
    }
    if (cJSON_IsNumber(e) && (!have || (lower ? e->valuedouble >= *val : e->valuedouble <= *val))) {
        *val = e->valuedouble;
        *excl = true;
        have = true;
    }
    return have;
}

enum { FRAC_ANY, FRAC_ZERO, FRAC_NONZERO };

static void seq_frac(jctx *c, gr_seq *q, int kind)
{
    gr_builder *b = c->b;
    uint32_t r = gr_rule_new(b, "frac", true);
    gr_seq f = {0};
    gr_seq_byte(b, &f, '.');
    if (kind == FRAC_ANY) digits(b, &f, '0', '9', 1, GR_INF);
    else if (kind == FRAC_ZERO) gr_seq_byte(b, &f, '0'), f.el[f.n - 1].max = GR_INF;
    else {
        digits(b, &f, '0', '9', 0, GR_INF);
        digits(b, &f, '1', '9', 1, 1);
        digits(b, &f, '0', '9', 0, GR_INF);
    }
    gr_rule_add_alt(b, r, &f);
    gr_seq_rule(b, q, r, kind == FRAC_NONZERO ? 1 : 0, 1);
}

/* rule += [minus] i frac for i in [from, to] (to < 0: unbounded). */
static void num_alt(jctx *c, uint32_t rule, bool minus, long long from, long long to, int frac)
{
    gr_builder *b = c->b;
    if (to >= 0 && from > to) return;
    uint32_t ir = gr_rule_new(b, "int-part", true);
    gr_seq empty = {0};
    nat_range(b, ir, &empty, from, to);
    gr_seq q = {0};
    if (minus) gr_seq_byte(b, &q, '-');
    gr_seq_rule(b, &q, ir, 1, 1);
    seq_frac(c, &q, frac);
    gr_rule_add_alt(b, rule, &q);
}

/* One side (non-negative magnitudes m, sign minus or none) of lo <= m <= hi, with
 * integer bounds: integer parts strictly inside take any fraction, a bound itself only
 * zeros (or, exclusive at the low end, a non-zero fraction). */
static void num_side(jctx *c, uint32_t rule, bool minus, long long lo, bool lo_excl, long long hi, bool hi_excl, bool has_hi)
{
    if (has_hi && hi < lo) return;
    if (!has_hi) {
        num_alt(c, rule, minus, lo, lo, lo_excl ? FRAC_NONZERO : FRAC_ANY);
        num_alt(c, rule, minus, lo + 1, -1, FRAC_ANY);
        return;
    }
    if (lo == hi) {
        if (!lo_excl && !hi_excl) num_alt(c, rule, minus, lo, lo, FRAC_ZERO);
        return;
    }
    num_alt(c, rule, minus, lo, lo, lo_excl ? FRAC_NONZERO : FRAC_ANY);
    if (hi - 1 >= lo + 1) num_alt(c, rule, minus, lo + 1, hi - 1, FRAC_ANY);
    if (!hi_excl) num_alt(c, rule, minus, hi, hi, FRAC_ZERO);
}

static void alt_number(jctx *c, const cJSON *s, uint32_t rule)
{
    gr_builder *b = c->b;
    double lo = 0, hi = 0;
    bool lx, hx;
    bool hl = num_bound(s, true, &lo, &lx), hh = num_bound(s, false, &hi, &hx);
    gr_seq q = {0};
    if (!hl && !hh) {
        gr_seq_rule(b, &q, number_rule(c), 1, 1);
        gr_rule_add_alt(b, rule, &q);
        return;
    }
    if ((hl && (lo != floor(lo) || fabs(lo) > 1e15)) || (hh && (hi != floor(hi) || fabs(hi) > 1e15))) {
        gr_fail(b, KVD_EUNSUPPORTED, "json schema: minimum/maximum other than whole numbers on a number is not supported");
        return;
    }
    if (hl && !hh && lo == 0 && !lx) { /* minimum 0, the common case: exact with exponents too */
        uint32_t r = gr_rule_new(b, "nonneg-number", true);
        gr_seq t = {0};
        gr_seq_rule(b, &t, uint_rule(c), 1, 1);
        seq_frac_exp(c, &t);
        gr_rule_add_alt(b, r, &t);
        gr_seq_rule(b, &q, r, 1, 1);
        gr_rule_add_alt(b, rule, &q);
        return;
    }
    /* Bounded numbers are written without an exponent (1e2 is refused, never wrongly
     * accepted). x >= 0: magnitudes from max(lo, 0); x < 0: magnitudes up to -lo. */
    uint32_t r = gr_rule_new(b, "num-range", true);
    long long L = (long long)lo, H = (long long)hi;
    if (!hh || H >= 0) {
        bool from_zero = !hl || L < 0;
        num_side(c, r, false, from_zero ? 0 : L, from_zero ? false : lx, H, hx, hh);
    }
    if (!hl || L < 0) {
        /* -m with m in [max(-H, 0), -L]; -0 is 0, so it is fine exactly when 0 is */
        bool to_zero = !hh || H >= 0;
        long long mlo = to_zero ? 0 : -H;
        /* x < 0 exactly (maximum 0 exclusive): "-0" is 0, so the magnitude must not be */
        bool mlo_excl = to_zero ? (hh && H == 0 && hx) : hx;
        num_side(c, r, true, mlo, mlo_excl, hl ? -L : 0, lx, hl);
    }
    gr_seq_rule(b, &q, r, 1, 1);
    gr_rule_add_alt(b, rule, &q);
}

/* --- strings other than some ------------------------------------------------------ */

/* One character as json.dumps(ensure_ascii=False) writes it: printable ASCII and
 * non-ASCII as they are, '"' '\\' and control characters escaped. Texts written this
 * way are equal exactly when their bytes are, which is what lets a trie of the
 * excluded strings give their complement exactly. */
static void canon_chars(jctx *c, uint32_t rule, uint32_t lo, uint32_t hi)
{
    gr_builder *b = c->b;
    gr_bytes plain = {{0}};
    gr_seq q = {0};
    for (uint32_t cp = lo; cp <= hi && cp < 0x80; cp++) {
        if (cp >= 0x20 && cp != '"' && cp != '\\') {
            gr_bytes_add(&plain, cp);
            continue;
        }
        char one[2] = {(char)cp, 0};
        if (cp == 0) { /* json_quote stops at a NUL */
            gr_seq_lit(b, &q, "\\u0000", 6);
        } else {
            char *e = json_quote(one);
            if (!e) {
                gr_fail(b, KVD_ENOMEM, "json schema: out of memory");
                return;
            }
            gr_seq_lit(b, &q, e + 1, strlen(e) - 2);
            free(e);
        }
        gr_rule_add_alt(b, rule, &q);
    }
    if (plain.w[0] | plain.w[1]) {
        gr_seq_bytes(b, &q, &plain, 1, 1);
        gr_rule_add_alt(b, rule, &q);
    }
    if (hi >= 0x80) gr_utf8_range(b, rule, lo < 0x80 ? 0x80 : lo, hi);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

/* Excluded strings, and the lengths (in code points) the string may have. */
typedef struct not_in {
    uint32_t canon_char;      /* one character as json.dumps writes it */
    uint32_t min_len, max_len; /* max_len GR_INF: unbounded */
} not_in;

/* Any characters, so many that the string's length ends within bounds after cps
 * code points so far, then the closing quote. */
static uint32_t string_tail(jctx *c, const not_in *ni, uint32_t cps)
{
    gr_builder *b = c->b;
    uint32_t r = gr_rule_new(b, "string-tail", true);
    uint32_t lo = ni->min_len > cps ? ni->min_len - cps : 0;
    uint32_t hi = ni->max_len == GR_INF ? GR_INF : ni->max_len - cps;
    gr_seq q = {0};
    gr_seq_rule(b, &q, ni->canon_char, lo, hi);
    gr_seq_byte(b, &q, '"');
    gr_rule_add_alt(b, r, &q);
    return r;
}

/* The rest of a JSON string that is none of names (raw UTF-8, sorted, sharing their
 * first depth bytes, which are cps code points), then the closing quote. */
static uint32_t string_not_in_from(jctx *c, const not_in *ni, const char **names, size_t n, size_t depth,
                                   uint32_t cps)
{
    gr_builder *b = c->b;
    uint32_t r = gr_rule_new(b, "other-string", true);
    gr_seq q = {0};
    size_t i = 0;
    if (n && strlen(names[0]) == depth) /* a name ends here (sorted: it comes first) */
        while (i < n && strlen(names[i]) == depth) i++;
    else if (cps >= ni->min_len) {
        gr_seq_byte(b, &q, '"');
        gr_rule_add_alt(b, r, &q);
    }
    if (ni->max_len != GR_INF && cps >= ni->max_len) return r; /* no room for another character */
    /* characters that continue some name, and the gaps between them */
    uint32_t other = gr_rule_new(b, "other-char", true);
    uint32_t next_free = 0;
    while (i < n) {
        const char *p = names[i] + depth, *end = p + strlen(p);
        uint32_t cp = gr_utf8_next(&p, end);
        size_t len = (size_t)(p - (names[i] + depth)), j = i;
        while (j < n && !strncmp(names[j] + depth, names[i] + depth, len) && strlen(names[j]) > depth) j++;
        if (cp > next_free) canon_chars(c, other, next_free, cp - 1);
        next_free = cp + 1;
        char enc[8] = {0};
        memcpy(enc, names[i] + depth, len);
        char *e = json_quote(enc);
        if (!e) {
            gr_fail(b, KVD_ENOMEM, "json schema: out of memory");
            return r;
        }
        gr_seq_lit(b, &q, e + 1, strlen(e) - 2);
        free(e);
        gr_seq_rule(b, &q, string_not_in_from(c, ni, names + i, j - i, depth + len, cps + 1), 1, 1);
        gr_rule_add_alt(b, r, &q);
        i = j;
    }
    if (next_free <= 0x10FFFF) canon_chars(c, other, next_free, 0x10FFFF);
    gr_seq_rule(b, &q, other, 1, 1);
    gr_seq_rule(b, &q, string_tail(c, ni, cps + 1), 1, 1);
    gr_rule_add_alt(b, r, &q);
    return r;
}

/* A JSON string of min_len..max_len code points, written as json.dumps writes it,
 * that is none of names. */
static uint32_t string_not_in(jctx *c, const char **names, size_t n, uint32_t min_len, uint32_t max_len)
{
    gr_builder *b = c->b;
    qsort(names, n, sizeof *names, cmp_str);
    not_in ni = {gr_rule_new(b, "canon-char", true), min_len, max_len};
    canon_chars(c, ni.canon_char, 0, 0x10FFFF);
    uint32_t r = gr_rule_new(b, "string-not-in", true);
    gr_seq q = {0};
    if (min_len > max_len) return r;
    gr_seq_byte(b, &q, '"');
    gr_seq_rule(b, &q, string_not_in_from(c, &ni, names, n, 0, 0), 1, 1);
    gr_rule_add_alt(b, r, &q);
    return r;
}

/* --- objects ------------------------------------------------------------------- */

/* The rule for a key that is none of names (JSON text between the quotes, escaped),
 * built as the complement of their trie. */
typedef struct kw_trie {
    const char **names;
    size_t n;
} kw_trie;

static uint32_t key_not_in(jctx *c, const char **names, size_t n, size_t depth, uint32_t tail)
{
    gr_builder *b = c->b;
    uint32_t r = gr_rule_new(b, "other-key", true);
    /* names[] share their first depth bytes; is one of them exactly this prefix? */
    bool terminal = false;
    for (size_t i = 0; i < n; i++) terminal = terminal || strlen(names[i]) == depth;
    gr_seq s = {0};
    if (!terminal) {
        gr_seq_byte(b, &s, '"');
        gr_rule_add_alt(b, r, &s);
    }
    gr_bytes other = {{0}};
    gr_bytes_add_range(&other, 0x20, 0xFF);
    other.w['"' >> 6] &= ~(1ull << ('"' & 63));
    other.w['\\' >> 6] &= ~(1ull << ('\\' & 63));
    bool esc_child = false;
    for (size_t i = 0; i < n;) {
        size_t len = strlen(names[i]);
        if (len == depth) {
            i++;
            continue;
        }
        unsigned char ch = (unsigned char)names[i][depth];
        size_t j = i;
        while (j < n && strlen(names[j]) > depth && (unsigned char)names[j][depth] == ch) j++;
        other.w[ch >> 6] &= ~(1ull << (ch & 63));
        if (ch == '\\') esc_child = true;
        gr_seq_byte(b, &s, ch);
        gr_seq_rule(b, &s, key_not_in(c, names + i, j - i, depth + 1, tail), 1, 1);
        gr_rule_add_alt(b, r, &s);
        i = j;
    }
    gr_seq_bytes(b, &s, &other, 1, 1);
    gr_seq_rule(b, &s, tail, 1, 1);
    gr_rule_add_alt(b, r, &s);
    if (!esc_child) { /* an escape here diverges from every name */
        gr_seq_byte(b, &s, '\\');
        gr_bytes esc = {{0}};
        for (const char *p = "\"\\/bfnrt"; *p; p++) gr_bytes_add(&esc, (unsigned char)*p);
        gr_seq_bytes(b, &s, &esc, 1, 1);
        gr_seq_rule(b, &s, tail, 1, 1);
        gr_rule_add_alt(b, r, &s);
    }
    return r;
}

/* An object member `key ws : ws value` as two rules: `first` for the member that opens
 * the object, `next` for one after a comma (the comma and its whitespace first). */
static void member_rules(jctx *c, uint32_t key, uint32_t val, const char *name, uint32_t *first,
                         uint32_t *next)
{
    gr_builder *b = c->b;
    gr_seq q = {0};
    gr_seq_rule(b, &q, key, 1, 1);
    seq_ws(c, &q);
    gr_seq_byte(b, &q, ':');
    seq_ws(c, &q);
    gr_seq_rule(b, &q, val, 1, 1);
    gr_seq copy = {0};
    for (size_t i = 0; i < q.n; i++) gr_seq_push(b, &copy, q.el[i]);
    *first = gr_rule_new(b, name, false);
    gr_rule_add_alt(b, *first, &q);
    *next = gr_rule_new(b, name, false);
    seq_ws(c, &q);
    gr_seq_byte(b, &q, ',');
    seq_ws(c, &q);
    for (size_t i = 0; i < copy.n; i++) gr_seq_push(b, &q, copy.el[i]);
    gr_seq_free(&copy);
    gr_rule_add_alt(b, *next, &q);
}

static void alt_object(jctx *c, const cJSON *s, uint32_t rule)
{
    gr_builder *b = c->b;
    const cJSON *props = cJSON_GetObjectItemCaseSensitive(s, "properties");
    const cJSON *req = cJSON_GetObjectItemCaseSensitive(s, "required");
    const cJSON *addl = cJSON_GetObjectItemCaseSensitive(s, "additionalProperties");
    if (props && !cJSON_IsObject(props)) {
        gr_fail(b, KVD_EINVAL, "json schema: 'properties' must be an object");
        return;
    }
    /* members: properties in order, then required names not among them */
    size_t n = 0;
    const char *names[GR_OBJ_MAX_MEMBERS + 1];
    const cJSON *schemas[GR_OBJ_MAX_MEMBERS + 1];
    for (const cJSON *p = props ? props->child : NULL; p; p = p->next) {
        if (n == GR_OBJ_MAX_MEMBERS) {
            gr_fail(b, KVD_EUNSUPPORTED, "json schema: more than %d properties in one object", GR_OBJ_MAX_MEMBERS);
            return;
        }
        names[n] = p->string;
        schemas[n++] = p;
    }
    uint64_t required = 0;
    for (const cJSON *r = req ? req->child : NULL; r; r = r->next) {
        if (!cJSON_IsString(r)) {
            gr_fail(b, KVD_EINVAL, "json schema: 'required' must list strings");
            return;
        }
        size_t k = 0;
        while (k < n && strcmp(names[k], r->valuestring)) k++;
        if (k == n) {
            if (n == GR_OBJ_MAX_MEMBERS) {
                gr_fail(b, KVD_EUNSUPPORTED, "json schema: more than %d properties in one object", GR_OBJ_MAX_MEMBERS);
                return;
            }
            /* a required name not in properties: any value, unless additionalProperties says */
            names[n] = r->valuestring;
            schemas[n++] = addl ? addl : NULL;
        }
        required |= 1ull << k;
    }
    gr_object o = {0};
    o.num_members = (uint32_t)n;
    o.first_rule = malloc((n + 1) * sizeof *o.first_rule);
    o.next_rule = malloc((n + 1) * sizeof *o.next_rule);
    char **quoted = calloc(n + 1, sizeof *quoted);
    if (!o.first_rule || !o.next_rule || !quoted) {
        free(o.first_rule);
        free(o.next_rule);
        free(quoted);
        gr_fail(b, KVD_ENOMEM, "json schema: out of memory");
        return;
    }
    o.required = required;
    o.ordered = !c->any_order;
    o.min_members = get_count(c, s, "minProperties", 0);
    o.max_members = cJSON_HasObjectItem(s, "maxProperties") ? get_count(c, s, "maxProperties", GR_INF) : GR_INF;
    for (size_t k = 0; k < n; k++) {
        quoted[k] = json_quote(names[k]);
        if (!quoted[k]) {
            gr_fail(b, KVD_ENOMEM, "json schema: out of memory");
            break;
        }
        uint32_t key = gr_rule_lit(b, "key", quoted[k], strlen(quoted[k]));
        uint32_t val = schemas[k] ? compile_node(c, schemas[k]) : any_value_rule(c);
        member_rules(c, key, val, names[k], &o.first_rule[k], &o.next_rule[k]);
    }
    o.extra_first = o.extra_next = GR_NONE;
    /* patternProperties: exact in the closed form, one pattern and additionalProperties
     * false, when no declared name matches it (then the other members are exactly the
     * keys the pattern finds, and no declared member can come back under it). */
    const cJSON *pp = cJSON_GetObjectItemCaseSensitive(s, "patternProperties");
    if (!b->failed && cJSON_IsObject(pp) && pp->child) {
        const cJSON *pat = pp->child;
        bool closed = cJSON_IsFalse(addl) && !pat->next;
        for (size_t k = 0; closed && k < n; k++) {
            if (!quoted[k]) break;
            int hit = gr_regex_search(c->vocab, pat->string, quoted[k] + 1, strlen(quoted[k]) - 2);
            closed = hit == 0;
        }
        if (!closed) {
            gr_fail(b, KVD_EUNSUPPORTED,
                    "json schema: keyword 'patternProperties' is not supported (only one pattern, with "
                    "additionalProperties false, matching no declared property)");
        } else {
            uint32_t val = compile_node(c, pat);
            uint32_t re = gr_regex(b, pat->string, strlen(pat->string), true, false, NULL, NULL);
            uint32_t key = gr_rule_new(b, "pattern-key", true);
            gr_seq q = {0};
            gr_seq_byte(b, &q, '"');
            gr_seq_rule(b, &q, re, 1, 1);
            gr_seq_byte(b, &q, '"');
            gr_rule_add_alt(b, key, &q);
            member_rules(c, key, val, "pattern-member", &o.extra_first, &o.extra_next);
        }
    } else if (!b->failed && !cJSON_IsFalse(addl)) {
        uint32_t val = addl && !cJSON_IsTrue(addl) ? compile_node(c, addl) : any_value_rule(c);
        /* the key: a string none of the declared names (compared as written: escapes in
         * a key are only allowed where they cannot spell a declared name) */
        uint32_t tail = gr_rule_new(b, "key-tail", true);
        gr_seq q = {0};
        gr_bytes raw = {{0}};
        gr_bytes_add_range(&raw, 0x20, 0xFF);
        raw.w['"' >> 6] &= ~(1ull << ('"' & 63));
        raw.w['\\' >> 6] &= ~(1ull << ('\\' & 63));
        uint32_t tchar = gr_rule_new(b, "key-char", true);
        gr_seq_bytes(b, &q, &raw, 1, 1);
        gr_rule_add_alt(b, tchar, &q);
        gr_seq_byte(b, &q, '\\');
        gr_bytes esc = {{0}};
        for (const char *p = "\"\\/bfnrt"; *p; p++) gr_bytes_add(&esc, (unsigned char)*p);
        gr_seq_bytes(b, &q, &esc, 1, 1);
        gr_rule_add_alt(b, tchar, &q);
        gr_seq_rule(b, &q, tchar, 0, GR_INF);
        gr_seq_byte(b, &q, '"');
        gr_rule_add_alt(b, tail, &q);
        const char **inner = malloc((n + 1) * sizeof *inner);
        char **strip = calloc(n + 1, sizeof *strip);
        if (!inner || !strip) {
            free(inner);
            free(strip);
            gr_fail(b, KVD_ENOMEM, "json schema: out of memory");
        } else {
            for (size_t k = 0; k < n && quoted[k]; k++) {
                size_t l = strlen(quoted[k]);
                strip[k] = strndup(quoted[k] + 1, l - 2);
                inner[k] = strip[k] ? strip[k] : "";
            }
            qsort(inner, n, sizeof *inner, cmp_str);
            uint32_t other = key_not_in(c, inner, n, 0, tail);
            uint32_t key = gr_rule_new(b, "extra-key", true);
            gr_seq_byte(b, &q, '"');
            gr_seq_rule(b, &q, other, 1, 1);
            gr_rule_add_alt(b, key, &q);
            for (size_t k = 0; k < n; k++) free(strip[k]);
            free(strip);
            free(inner);
            member_rules(c, key, val, "extra-member", &o.extra_first, &o.extra_next);
        }
    }
    for (size_t k = 0; k < n; k++) free(quoted[k]);
    free(quoted);
    if (b->failed) {
        free(o.first_rule);
        free(o.next_rule);
        return;
    }
    uint32_t oi = gr_object_add(b, &o);
    gr_seq q = {0};
    gr_seq_byte(b, &q, '{');
    seq_ws(c, &q);
    gr_seq_push(b, &q, (gr_elem){.kind = EL_OBJECT, .ref = oi, .min = 1, .max = 1});
    seq_ws(c, &q);
    gr_seq_byte(b, &q, '}');
    gr_rule_add_alt(b, rule, &q);
}

/* --- arrays -------------------------------------------------------------------- */

static void alt_array(jctx *c, const cJSON *s, uint32_t rule)
{
    gr_builder *b = c->b;
    const cJSON *items = cJSON_GetObjectItemCaseSensitive(s, "items");
    const cJSON *prefix = cJSON_GetObjectItemCaseSensitive(s, "prefixItems");
    if (cJSON_IsArray(items)) { /* draft 4-2019 tuple form */
        prefix = items;
        items = cJSON_GetObjectItemCaseSensitive(s, "additionalItems");
    } /* additionalItems without a tuple (items as an array) does nothing */
    const cJSON *uniq = cJSON_GetObjectItemCaseSensitive(s, "uniqueItems");
    const cJSON *max_items = cJSON_GetObjectItemCaseSensitive(s, "maxItems");
    /* at most one item is always unique */
    if (cJSON_IsTrue(uniq) && !(cJSON_IsNumber(max_items) && max_items->valuedouble <= 1)) {
        gr_fail(b, KVD_EUNSUPPORTED, "json schema: uniqueItems is not supported");
        return;
    }
    uint32_t min = get_count(c, s, "minItems", 0);
    uint32_t max = cJSON_HasObjectItem(s, "maxItems") ? get_count(c, s, "maxItems", GR_INF) : GR_INF;
    uint32_t k = prefix ? (uint32_t)cJSON_GetArraySize(prefix) : 0;
    if (min > max) return;
    bool items_allowed = !cJSON_IsFalse(items);
    if (!items_allowed && min > k) return;
    if (!items_allowed && max > k) max = k;
    uint32_t item = items_allowed ? (items && !cJSON_IsTrue(items) ? compile_node(c, items) : any_value_rule(c)) : GR_NONE;
    uint32_t nk = k < max ? k : max; /* prefix items that may appear */
    uint32_t *pre = malloc((nk + 1) * sizeof *pre);
    if (!pre) {
        gr_fail(b, KVD_ENOMEM, "json schema: out of memory");
        return;
    }
    const cJSON *p = prefix ? prefix->child : NULL;
    for (uint32_t i = 0; i < nk; i++, p = p->next) pre[i] = compile_node(c, p);
    /* tail_i: the items after i of them; the last is a counted loop of `, item` */
    gr_seq q = {0};
    uint32_t next = GR_NONE; /* rule for "i items so far", built from the back */
    uint32_t tail = GR_NONE;
    if (item != GR_NONE && max > nk) {
        uint32_t more = gr_rule_new(b, "more-items", false);
        seq_ws(c, &q);
        gr_seq_byte(b, &q, ',');
        seq_ws(c, &q);
        gr_seq_rule(b, &q, item, 1, 1);
        gr_rule_add_alt(b, more, &q);
        tail = more;
    }
    /* F_nk: (more){max(0,min-nk), max-nk} when nk >= 1 */
    for (uint32_t i = nk; i >= 1; i--) {
        uint32_t r = gr_rule_new(b, "items-from", false);
        if (i == nk) {
            if (tail != GR_NONE) {
                uint32_t lo = min > i ? min - i : 0, hi = max == GR_INF ? GR_INF : max - i;
                gr_seq_rule(b, &q, tail, lo, hi);
            } else if (min > i)
                gr_seq_free(&q);
            if (tail != GR_NONE || min <= i) gr_rule_add_alt(b, r, &q);
        } else {
            seq_ws(c, &q);
            gr_seq_byte(b, &q, ',');
            seq_ws(c, &q);
            gr_seq_rule(b, &q, pre[i], 1, 1);
            gr_seq_rule(b, &q, next, 1, 1);
            gr_rule_add_alt(b, r, &q);
            if (i >= min) gr_rule_add_alt(b, r, &q); /* empty: stop after i items */
        }
        next = r;
    }
    uint32_t body = gr_rule_new(b, "array-items", false);
    if (nk >= 1) {
        gr_seq_rule(b, &q, pre[0], 1, 1);
        gr_seq_rule(b, &q, next, 1, 1);
        gr_rule_add_alt(b, body, &q);
    } else if (item != GR_NONE && max >= 1) {
        gr_seq_rule(b, &q, item, 1, 1);
        uint32_t lo = min > 1 ? min - 1 : 0, hi = max == GR_INF ? GR_INF : max - 1;
        gr_seq_rule(b, &q, tail, lo, hi);
        gr_rule_add_alt(b, body, &q);
    }
    free(pre);
    gr_seq_byte(b, &q, '[');
    seq_ws(c, &q);
    gr_seq_rule(b, &q, body, min > 0 ? 1 : 0, 1);
    seq_ws(c, &q);
    gr_seq_byte(b, &q, ']');
    gr_rule_add_alt(b, rule, &q);
}

/* --- one schema node -------------------------------------------------------------- */

static bool has_constraints(const cJSON *s, const char *skip)
{
    for (const cJSON *v = s->child; v; v = v->next)
        if (strcmp(v->string, skip) && !is_annotation(v->string)) return true;
    return false;
}

static bool memo_get(jctx *c, const cJSON *s, uint32_t *rule)
{
    for (size_t i = c->nmemo; i-- > 0;)
        if (c->memo[i].node == s) {
            *rule = c->memo[i].rule;
            return true;
        }
    return false;
}

static void memo_put(jctx *c, const cJSON *s, uint32_t rule)
{
    if (c->nmemo == c->capmemo) {
        size_t cap = c->capmemo ? c->capmemo * 2 : 64;
        memo_ent *p = realloc(c->memo, cap * sizeof *p);
        if (!p) {
            gr_fail(c->b, KVD_ENOMEM, "json schema: out of memory");
            return;
        }
        c->memo = p;
        c->capmemo = cap;
    }
    c->memo[c->nmemo++] = (memo_ent){s, rule};
}

/* The types a compiled schema may produce (for oneOf's disjointness). */
static int produced_types(jctx *c, const cJSON *s, int depth)
{
    if (depth > 20 || !cJSON_IsObject(s)) return T_ALL;
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(s, "$ref");
    if (cJSON_IsString(r)) {
        const cJSON *t = resolve_ref(c, r->valuestring);
        int x = t ? produced_types(c, t, depth + 1) : T_ALL;
        if (cJSON_HasObjectItem(s, "type")) x &= schema_types(c, s);
        return x;
    }
    int t = schema_types(c, s);
    if (t < 0) return T_ALL;
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(s, "enum");
    const cJSON *k = cJSON_GetObjectItemCaseSensitive(s, "const");
    if (k) return value_type(k) | (value_type(k) == T_INTEGER ? T_NUMBER : 0);
    if (cJSON_IsArray(e)) {
        int x = 0;
        for (const cJSON *v = e->child; v; v = v->next) x |= value_type(v) | (value_type(v) == T_INTEGER ? T_NUMBER : 0);
        return x & (t | T_NUMBER);
    }
    const cJSON *any = cJSON_GetObjectItemCaseSensitive(s, "anyOf");
    if (!any) any = cJSON_GetObjectItemCaseSensitive(s, "oneOf");
    if (cJSON_IsArray(any)) {
        int x = 0;
        for (const cJSON *v = any->child; v; v = v->next) x |= produced_types(c, v, depth + 1);
        return x & t;
    }
    const cJSON *all = cJSON_GetObjectItemCaseSensitive(s, "allOf");
    if (cJSON_IsArray(all))
        for (const cJSON *v = all->child; v; v = v->next) t &= produced_types(c, v, depth + 1);
    /* a number may be an integer and the other way round */
    if (t & (T_NUMBER | T_INTEGER)) t |= T_NUMBER | T_INTEGER;
    return t;
}

static uint32_t compile_body(jctx *c, const cJSON *s, uint32_t rule);

/* s with a lone $ref followed (NULL when it leads nowhere or too deep). */
static const cJSON *follow_ref(jctx *c, const cJSON *s)
{
    for (int depth = 0; depth < 20 && cJSON_IsObject(s); depth++) {
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(s, "$ref");
        if (!r) return s;
        if (!cJSON_IsString(r) || (!c->ref_alone && has_constraints(s, "$ref"))) return NULL;
        s = resolve_ref(c, r->valuestring);
    }
    return NULL;
}

static bool required_has(const cJSON *s, const char *name)
{
    const cJSON *req = cJSON_GetObjectItemCaseSensitive(s, "required");
    const cJSON *x;
    cJSON_ArrayForEach(x, req)
        if (cJSON_IsString(x) && !strcmp(x->valuestring, name)) return true;
    return false;
}

/* True when s can never hold member name (closed objects, or the member is false). */
static bool forbids(jctx *c, const cJSON *s, const char *name)
{
    const cJSON *props = cJSON_GetObjectItemCaseSensitive(s, "properties");
    const cJSON *p = cJSON_IsObject(props) ? cJSON_GetObjectItemCaseSensitive(props, name) : NULL;
    if (p) return cJSON_IsFalse(follow_ref(c, p));
    return cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(s, "additionalProperties")) &&
           !cJSON_HasObjectItem(s, "patternProperties");
}

/* The literal values schema s allows (its enum or const), or NULL. */
static const cJSON *literals(const cJSON *s, cJSON **tmp)
{
    const cJSON *k = cJSON_GetObjectItemCaseSensitive(s, "const");
    if (k) {
        *tmp = cJSON_CreateArray();
        cJSON_AddItemToArray(*tmp, cJSON_Duplicate(k, true));
        return *tmp;
    }
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(s, "enum");
    return cJSON_IsArray(e) ? e : NULL;
}

static bool values_disjoint(const cJSON *a, const cJSON *b)
{
    for (const cJSON *x = a->child; x; x = x->next)
        for (const cJSON *y = b->child; y; y = y->next)
            if (cJSON_Compare(x, y, true) || (cJSON_IsNumber(x) && cJSON_IsNumber(y) && x->valuedouble == y->valuedouble))
                return false;
    return true;
}

/* True when no value can match both branches (sound, not complete): their types differ,
 * their enum/const values differ, or both are objects and one requires a member the
 * other forbids or whose enum/const values the other's exclude. */
static bool disjoint(jctx *c, const cJSON *x, const cJSON *y)
{
    if (!(produced_types(c, x, 0) & produced_types(c, y, 0))) return true;
    const cJSON *a = follow_ref(c, x), *b = follow_ref(c, y);
    if (!cJSON_IsObject(a) || !cJSON_IsObject(b) || cJSON_HasObjectItem(a, "allOf") || cJSON_HasObjectItem(b, "allOf") ||
        cJSON_HasObjectItem(a, "anyOf") || cJSON_HasObjectItem(b, "anyOf") || cJSON_HasObjectItem(a, "oneOf") ||
        cJSON_HasObjectItem(b, "oneOf"))
        return false;
    cJSON *ta = NULL, *tb = NULL;
    const cJSON *la = literals(a, &ta), *lb = literals(b, &tb);
    bool lit = la && lb && values_disjoint(la, lb);
    cJSON_Delete(ta);
    cJSON_Delete(tb);
    if (lit) return true;
    if ((produced_types(c, a, 0) | produced_types(c, b, 0)) & ~T_OBJECT) return false; /* objects only below */
    for (int side = 0; side < 2; side++) {
        const cJSON *p = side ? b : a, *q = side ? a : b;
        const cJSON *req = cJSON_GetObjectItemCaseSensitive(p, "required");
        const cJSON *r;
        cJSON_ArrayForEach(r, req) {
            if (!cJSON_IsString(r)) continue;
            if (forbids(c, q, r->valuestring)) return true;
            if (!required_has(q, r->valuestring)) continue;
            const cJSON *pp = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(p, "properties"), r->valuestring);
            const cJSON *qp = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(q, "properties"), r->valuestring);
            pp = pp ? follow_ref(c, pp) : NULL;
            qp = qp ? follow_ref(c, qp) : NULL;
            if (!cJSON_IsObject(pp) || !cJSON_IsObject(qp)) continue;
            cJSON *t1 = NULL, *t2 = NULL;
            const cJSON *l1 = literals(pp, &t1), *l2 = literals(qp, &t2);
            bool d = l1 && l2 && values_disjoint(l1, l2);
            cJSON_Delete(t1);
            cJSON_Delete(t2);
            if (d) return true;
        }
    }
    return false;
}

/* --- literals checked against a schema -------------------------------------------- */

typedef struct text_buf {
    char *p;
    size_t n, cap;
    bool bad;
} text_buf;

static void tb_put(text_buf *t, const char *x, size_t n)
{
    if (t->bad) return;
    if (t->n + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 64;
        while (cap < t->n + n + 1) cap *= 2;
        char *q = realloc(t->p, cap);
        if (!q) {
            t->bad = true;
            return;
        }
        t->p = q;
        t->cap = cap;
    }
    memcpy(t->p + t->n, x, n);
    t->n += n;
    t->p[t->n] = 0;
}

/* v as kvd's grammars spell it (json.dumps style). bad: a number kvd cannot spell as
 * its grammars read it (an integer beyond 1e15 would print with an exponent). */
static void literal_text(text_buf *t, const cJSON *v)
{
    char buf[64];
    if (cJSON_IsNull(v)) tb_put(t, "null", 4);
    else if (cJSON_IsTrue(v)) tb_put(t, "true", 4);
    else if (cJSON_IsFalse(v)) tb_put(t, "false", 5);
    else if (cJSON_IsNumber(v)) {
        if (v->valuedouble == floor(v->valuedouble)) {
            if (fabs(v->valuedouble) >= 1e15) t->bad = true;
            snprintf(buf, sizeof buf, "%.0f", v->valuedouble);
        } else
            number_text(v->valuedouble, buf, sizeof buf);
        tb_put(t, buf, strlen(buf));
    } else if (cJSON_IsString(v)) {
        char *q = json_quote(v->valuestring);
        if (!q) t->bad = true;
        else tb_put(t, q, strlen(q));
        free(q);
    } else if (cJSON_IsArray(v) || cJSON_IsObject(v)) {
        bool obj = cJSON_IsObject(v);
        tb_put(t, obj ? "{" : "[", 1);
        for (const cJSON *x = v->child; x; x = x->next) {
            if (x != v->child) tb_put(t, ", ", 2);
            if (obj) {
                char *q = json_quote(x->string);
                if (!q) t->bad = true;
                else tb_put(t, q, strlen(q));
                free(q);
                tb_put(t, ": ", 2);
            }
            literal_text(t, x);
        }
        tb_put(t, obj ? "}" : "]", 1);
    } else
        t->bad = true;
}

static void jctx_init(jctx *c, gr_builder *b, bool any_order);
static void jctx_deinit(jctx *c);
static bool has_constraints(const cJSON *s, const char *skip);

/* Whether kvd's own grammar for s accepts v: 1 yes, 0 no, negative (with the reason
 * in *why) when s does not compile. The grammar takes members in any order. */
static int grammar_accepts(jctx *c, const cJSON *s, const cJSON *v, kvd_error *why)
{
    if (c->nest >= 6) {
        kvd_error_set(why, KVD_EUNSUPPORTED, "json schema: literal checks nest too deeply");
        return KVD_EUNSUPPORTED;
    }
    text_buf t = {0};
    literal_text(&t, v);
    if (t.bad) {
        free(t.p);
        kvd_error_set(why, KVD_EUNSUPPORTED, "json schema: a number in enum/const/not beyond 1e15");
        return KVD_EUNSUPPORTED;
    }
    gr_builder b;
    gr_builder_init(&b, why);
    jctx sub;
    jctx_init(&sub, &b, true);
    sub.vocab = c->vocab;
    sub.root = c->root;
    sub.ref_alone = c->ref_alone;
    sub.nest = c->nest + 1;
    uint32_t value = compile_node(&sub, s);
    /* a second alternative no JSON text starts with keeps the start rule productive
     * when s matches nothing */
    uint32_t r = gr_rule_new(&b, "root", false);
    gr_seq q = {0};
    gr_seq_rule(&b, &q, value, 1, 1);
    gr_rule_add_alt(&b, r, &q);
    gr_seq_byte(&b, &q, 1);
    gr_rule_add_alt(&b, r, &q);
    jctx_deinit(&sub);
    kvd_grammar *g = gr_finish(&b, c->vocab, r, why);
    int rc = g ? gr_accepts_text(g, t.p, t.n) : (why->code ? why->code : KVD_EUNSUPPORTED);
    if (g) kvd_grammar_release(g);
    free(t.p);
    return rc;
}

/* Keywords that only constrain another type than v's hold for v whatever they say
 * (leaving them out keeps a keyword kvd cannot compile from refusing the literal). */
static bool keyword_vacuous_for(const char *k, const cJSON *v)
{
    static const char *const obj[] = {"properties", "required", "additionalProperties", "patternProperties",
                                      "minProperties", "maxProperties", "propertyNames", "dependencies",
                                      "dependentRequired", "dependentSchemas", "unevaluatedProperties", NULL};
    static const char *const arr[] = {"items", "prefixItems", "additionalItems", "minItems", "maxItems",
                                      "uniqueItems", "contains", "minContains", "maxContains",
                                      "unevaluatedItems", NULL};
    static const char *const str[] = {"minLength", "maxLength", "pattern", NULL};
    static const char *const num[] = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                                      NULL};
    const char *const *own_kw = cJSON_IsObject(v) ? obj : cJSON_IsArray(v) ? arr : cJSON_IsString(v) ? str
                                : cJSON_IsNumber(v) ? num : NULL;
    const char *const *const sets[] = {obj, arr, str, num};
    for (size_t i = 0; i < sizeof sets / sizeof *sets; i++) {
        if (sets[i] == own_kw) continue;
        for (const char *const *x = sets[i]; *x; x++)
            if (!strcmp(k, *x)) return true;
    }
    return false;
}

/* Whether literal v is valid against schema s: 1 yes, 0 no, negative when kvd cannot
 * tell (the reason in *why). not/allOf/anyOf/oneOf/enum/const/$ref are decided here,
 * the rest by kvd's grammar for it (exact or refused, never approximate). */
static int literal_valid(jctx *c, const cJSON *s, const cJSON *v, int depth, kvd_error *why)
{
    if (cJSON_IsTrue(s)) return 1;
    if (cJSON_IsFalse(s)) return 0;
    if (!cJSON_IsObject(s) || depth > 20) {
        kvd_error_set(why, KVD_EUNSUPPORTED, "json schema: schema too deep for an enum/const/not check");
        return KVD_EUNSUPPORTED;
    }
    const cJSON *ref = cJSON_GetObjectItemCaseSensitive(s, "$ref");
    if (ref && c->ref_alone) { /* drafts 4-7: $ref replaces its siblings */
        const cJSON *t = cJSON_IsString(ref) ? resolve_ref(c, ref->valuestring) : NULL;
        if (!t) {
            kvd_error_set(why, KVD_EINVAL, "json schema: bad $ref");
            return KVD_EINVAL;
        }
        return literal_valid(c, t, v, depth + 1, why);
    }
    cJSON *rest = cJSON_CreateObject();
    if (!rest) return KVD_ENOMEM;
    int ok = 1;
    for (const cJSON *x = s->child; x && ok == 1; x = x->next) {
        const char *k = x->string;
        int r = 1;
        if (!strcmp(k, "not")) {
            r = literal_valid(c, x, v, depth + 1, why);
            if (r >= 0) r = !r;
        } else if (!strcmp(k, "$ref")) {
            const cJSON *t = cJSON_IsString(x) ? resolve_ref(c, x->valuestring) : NULL;
            r = t ? literal_valid(c, t, v, depth + 1, why) : KVD_EINVAL;
            if (!t) kvd_error_set(why, KVD_EINVAL, "json schema: bad $ref");
        } else if (!strcmp(k, "allOf") || !strcmp(k, "anyOf") || !strcmp(k, "oneOf")) {
            int hits = 0, n = 0;
            for (const cJSON *y = cJSON_IsArray(x) ? x->child : NULL; y && r >= 0; y = y->next, n++) {
                int h = literal_valid(c, y, v, depth + 1, why);
                if (h < 0) r = h;
                else hits += h;
            }
            if (r >= 0) r = !strcmp(k, "allOf") ? hits == n : !strcmp(k, "anyOf") ? hits > 0 : hits == 1;
        } else if (!strcmp(k, "enum") && cJSON_IsArray(x)) {
            r = 0;
            for (const cJSON *y = x->child; y && !r; y = y->next) r = cJSON_Compare(y, v, true);
        } else if (!strcmp(k, "const")) {
            r = cJSON_Compare(x, v, true);
        } else if (!is_annotation(k) && !keyword_vacuous_for(k, v))
            cJSON_AddItemToObject(rest, k, cJSON_Duplicate(x, true));
        if (r < 0) ok = r;
        else if (!r) ok = 0;
    }
    if (ok == 1 && has_constraints(rest, "")) ok = grammar_accepts(c, rest, v, why);
    cJSON_Delete(rest);
    return ok;
}

/* Alternatives of rule for the enum/const literals that are valid against every other
 * keyword of s (decided literal by literal, so any keyword kvd can compile or decide
 * works beside enum/const). */
static void literal_alts(jctx *c, const cJSON *s, uint32_t rule)
{
    gr_builder *b = c->b;
    const cJSON *en = cJSON_GetObjectItemCaseSensitive(s, "enum");
    const cJSON *k = cJSON_GetObjectItemCaseSensitive(s, "const");
    if (en && !cJSON_IsArray(en)) {
        gr_fail(b, KVD_EINVAL, "json schema: 'enum' must be an array");
        return;
    }
    for (const cJSON *v = k ? k : en->child; v && !b->failed; v = k ? NULL : v->next) {
        kvd_error why = {0};
        int r = literal_valid(c, s, v, 0, &why);
        if (r < 0) {
            gr_fail(b, r, "%s", why.msg);
            return;
        }
        if (r) {
            gr_seq q = {0};
            gr_seq_rule(b, &q, value_lit_rule(c, v), 1, 1);
            gr_rule_add_alt(b, rule, &q);
        }
    }
}

/* enum/const beside keywords kvd folds into the literals directly (types, lengths,
 * bounds) take the plain path; any other keyword is checked literal by literal. */
static bool needs_literal_check(const cJSON *s)
{
    static const char *const plain[] = {"enum", "const", "type", "minLength", "maxLength", "minimum", "maximum",
                                        "exclusiveMinimum", "exclusiveMaximum", NULL};
    for (const cJSON *x = s->child; x; x = x->next) {
        if (is_annotation(x->string)) continue;
        bool p = false;
        for (int i = 0; plain[i] && !p; i++) p = !strcmp(x->string, plain[i]);
        if (!p) return true;
    }
    return false;
}

/* --- not -------------------------------------------------------------------------- */

#define MAX_NOTS 64

/* The schemas a "not" negates, each alone: not {anyOf: [A, B]} is not A and not B. */
static bool flatten_not(jctx *c, const cJSON *x, const cJSON **out, size_t *n, int depth)
{
    const cJSON *t = follow_ref(c, x);
    if (t) x = t;
    const cJSON *any = cJSON_IsObject(x) ? cJSON_GetObjectItemCaseSensitive(x, "anyOf") : NULL;
    if (cJSON_IsArray(any) && !has_constraints(x, "anyOf") && depth < 8) {
        for (const cJSON *y = any->child; y; y = y->next)
            if (!flatten_not(c, y, out, n, depth + 1)) return false;
        return true;
    }
    if (*n == MAX_NOTS) return false;
    out[(*n)++] = x;
    return true;
}

static bool only_key(const cJSON *x, const char *k)
{
    return cJSON_IsObject(x) && cJSON_HasObjectItem(x, k) && !has_constraints(x, k);
}

static bool fail_not(jctx *c)
{
    if (!c->b->failed)
        gr_fail(c->b, KVD_EUNSUPPORTED,
                "json schema: keyword 'not' is not supported (only false, true, a type, enum/const of null, "
                "booleans or strings, an object shape of properties/required, not, or anyOf of these)");
    return false;
}

/* An object shape x (type object, properties, required, additionalProperties absent
 * or true) fails exactly when one of these holds: the value is no object (only with
 * type object), a required member is missing, or a declared member is present with a
 * value its schema refuses. Returns those cases as schemas (an array), or NULL when x
 * is not such a shape. */
static cJSON *object_negation(jctx *c, const cJSON *x)
{
    if (!cJSON_IsObject(x)) return NULL;
    const cJSON *type = NULL, *props = NULL, *req = NULL;
    for (const cJSON *k = x->child; k; k = k->next) {
        if (is_annotation(k->string)) continue;
        if (!strcmp(k->string, "type") && cJSON_IsString(k) && !strcmp(k->valuestring, "object")) type = k;
        else if (!strcmp(k->string, "properties") && cJSON_IsObject(k)) props = k;
        else if (!strcmp(k->string, "required") && cJSON_IsArray(k)) req = k;
        else if (!(!strcmp(k->string, "additionalProperties") && cJSON_IsTrue(k))) return NULL;
    }
    if (!props && !req) return NULL;
    cJSON *out = cJSON_CreateArray();
    if (!out) return NULL;
    if (type) {
        cJSON *d = cJSON_CreateObject(), *t = cJSON_AddArrayToObject(d, "type");
        for (const char *const *n = (const char *const[]){"null", "boolean", "string", "number", "array", NULL}; *n; n++)
            cJSON_AddItemToArray(t, cJSON_CreateString(*n));
        cJSON_AddItemToArray(out, d);
    }
    const cJSON *r;
    cJSON_ArrayForEach(r, req) {
        if (!cJSON_IsString(r)) continue;
        cJSON *d = cJSON_CreateObject();
        cJSON_AddStringToObject(d, "type", "object");
        cJSON_AddItemToObject(cJSON_AddObjectToObject(d, "properties"), r->valuestring, cJSON_CreateFalse());
        cJSON_AddItemToArray(out, d);
    }
    for (const cJSON *p = props ? props->child : NULL; p; p = p->next) {
        if (cJSON_IsTrue(p) || (cJSON_IsObject(p) && !has_constraints(p, ""))) continue; /* always passes */
        cJSON *d = cJSON_CreateObject();
        cJSON_AddStringToObject(d, "type", "object");
        cJSON_AddItemToArray(cJSON_AddArrayToObject(d, "required"), cJSON_CreateString(p->string));
        cJSON *np = cJSON_CreateObject();
        cJSON_AddItemToObject(np, "not", cJSON_Duplicate(p, true));
        cJSON_AddItemToObject(cJSON_AddObjectToObject(d, "properties"), p->string, np);
        cJSON_AddItemToArray(out, d);
    }
    (void)c;
    return out;
}

/* The ways the other shapes not can take apart fail: allOf fails where one of its
 * schemas does; a string length shape (type string, minLength, maxLength) where the
 * value is no string (only with type string) or a string too short or too long.
 * NULL: x is none of these. */
static cJSON *other_negation(const cJSON *x)
{
    if (only_key(x, "allOf")) {
        const cJSON *all = cJSON_GetObjectItemCaseSensitive(x, "allOf");
        if (!cJSON_IsArray(all)) return NULL;
        cJSON *out = cJSON_CreateArray();
        for (const cJSON *y = all->child; y; y = y->next) {
            cJSON *d = cJSON_CreateObject();
            cJSON_AddItemToObject(d, "not", cJSON_Duplicate(y, true));
            cJSON_AddItemToArray(out, d);
        }
        return out;
    }
    if (!cJSON_IsObject(x)) return NULL;
    const cJSON *type = NULL, *lo = NULL, *hi = NULL;
    for (const cJSON *k = x->child; k; k = k->next) {
        if (is_annotation(k->string)) continue;
        if (!strcmp(k->string, "type") && cJSON_IsString(k) && !strcmp(k->valuestring, "string")) type = k;
        else if (!strcmp(k->string, "minLength") && cJSON_IsNumber(k) && k->valuedouble >= 0 && k->valuedouble < 1e9)
            lo = k;
        else if (!strcmp(k->string, "maxLength") && cJSON_IsNumber(k) && k->valuedouble >= 0 && k->valuedouble < 1e9)
            hi = k;
        else
            return NULL;
    }
    if (!lo && !hi) return NULL;
    cJSON *out = cJSON_CreateArray();
    if (type) {
        cJSON *d = cJSON_CreateObject(), *t = cJSON_AddArrayToObject(d, "type");
        for (const char *const *n = (const char *const[]){"null", "boolean", "object", "number", "array", NULL}; *n; n++)
            cJSON_AddItemToArray(t, cJSON_CreateString(*n));
        cJSON_AddItemToArray(out, d);
    }
    double min = lo ? ceil(lo->valuedouble) : 0;
    if (min >= 1) {
        cJSON *d = cJSON_CreateObject();
        cJSON_AddStringToObject(d, "type", "string");
        cJSON_AddNumberToObject(d, "maxLength", min - 1);
        cJSON_AddItemToArray(out, d);
    }
    if (hi) {
        cJSON *d = cJSON_CreateObject();
        cJSON_AddStringToObject(d, "type", "string");
        cJSON_AddNumberToObject(d, "minLength", floor(hi->valuedouble) + 1);
        cJSON_AddItemToArray(out, d);
    }
    return out;
}

#define MAX_NOT_CASES 64

/* not {not: X} is X, and not of an object shape is the anyOf of the ways it fails
 * (object_negation): those are rewritten into plain keywords and s compiled again as
 * that. Returns true when it did so (rule is then done). */
static bool rewrite_not(jctx *c, const cJSON *s, const cJSON *not, uint32_t rule)
{
    const cJSON *items[MAX_NOTS];
    size_t n = 0;
    if (!flatten_not(c, not, items, &n, 0)) return fail_not(c), true;
    cJSON *cases[MAX_NOTS] = {0};
    bool any = false;
    for (size_t i = 0; i < n; i++) {
        if (!only_key(items[i], "not")) cases[i] = object_negation(c, items[i]);
        if (!only_key(items[i], "not") && !cases[i]) cases[i] = other_negation(items[i]);
        any = any || only_key(items[i], "not") || cases[i];
    }
    if (!any) return false;
    cJSON *src = cJSON_Duplicate(s, true);
    if (!src || !own(c, src)) {
        for (size_t i = 0; i < n; i++) cJSON_Delete(cases[i]);
        return true;
    }
    cJSON_DeleteItemFromObjectCaseSensitive(src, "not");
    cJSON *all = cJSON_CreateArray(), *rest = cJSON_CreateArray();
    cJSON *product = NULL; /* anyOf of the cases of every object shape negated, multiplied out */
    bool too_many = false;
    for (size_t i = 0; i < n; i++) {
        if (only_key(items[i], "not")) {
            cJSON_AddItemToArray(all, cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(items[i], "not"), true));
        } else if (cases[i]) {
            if (!product) {
                product = cases[i];
                cases[i] = NULL;
                continue;
            }
            int np = cJSON_GetArraySize(product), nc = cJSON_GetArraySize(cases[i]);
            if ((long)np * nc > MAX_NOT_CASES) {
                too_many = true;
                continue;
            }
            cJSON *next = cJSON_CreateArray();
            const cJSON *a, *b2;
            cJSON_ArrayForEach(a, product) cJSON_ArrayForEach(b2, cases[i]) {
                cJSON *both = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(both, "allOf");
                cJSON_AddItemToArray(arr, cJSON_Duplicate(a, true));
                cJSON_AddItemToArray(arr, cJSON_Duplicate(b2, true));
                cJSON_AddItemToArray(next, both);
            }
            cJSON_Delete(product);
            product = next;
        } else
            cJSON_AddItemToArray(rest, cJSON_Duplicate(items[i], true));
    }
    for (size_t i = 0; i < n; i++) cJSON_Delete(cases[i]);
    if (too_many || (product && (cJSON_HasObjectItem(src, "anyOf") || cJSON_HasObjectItem(src, "oneOf")))) {
        cJSON_Delete(product);
        cJSON_Delete(all);
        cJSON_Delete(rest);
        fail_not(c);
        return true;
    }
    if (product) {
        cJSON *w = cJSON_CreateObject();
        cJSON_AddItemToObject(w, "anyOf", product);
        cJSON_AddItemToArray(all, w);
    }
    if (cJSON_GetArraySize(rest) == 1) {
        cJSON_AddItemToObject(src, "not", cJSON_DetachItemFromArray(rest, 0));
        cJSON_Delete(rest);
    } else if (cJSON_GetArraySize(rest) > 1) {
        cJSON *w = cJSON_CreateObject();
        cJSON_AddItemToObject(w, "anyOf", rest);
        cJSON_AddItemToObject(src, "not", w);
    } else
        cJSON_Delete(rest);
    cJSON *had = cJSON_GetObjectItemCaseSensitive(src, "allOf");
    if (cJSON_IsArray(had)) {
        while (all->child) cJSON_AddItemToArray(had, cJSON_DetachItemFromArray(all, 0));
        cJSON_Delete(all);
    } else
        cJSON_AddItemToObject(src, "allOf", all);
    cJSON *m = cJSON_CreateObject();
    if (!m || !own(c, m)) return true;
    if (!merge_into(c, m, src)) return true;
    gr_seq q = {0};
    gr_seq_rule(c->b, &q, compile_node(c, m), 1, 1);
    gr_rule_add_alt(c->b, rule, &q);
    return true;
}

/* The other forms of not take values out: types, true/false, null and strings (any
 * enum/const, whatever keywords stand beside it, is the finite set of its literals
 * valid against them). Returns false (with the error set) when not cannot be exact. */
static bool not_exclusions(jctx *c, const cJSON *s, const cJSON *not, int *types, int *bools,
                           const char ***strings, size_t *num_strings)
{
    const cJSON *items[MAX_NOTS];
    size_t n = 0;
    if (!flatten_not(c, not, items, &n, 0)) return fail_not(c);
    static const char *const string_kw[] = {"pattern", "format", NULL}; /* lengths are kept exactly */
    bool string_constrained = false;
    for (int i = 0; string_kw[i]; i++) string_constrained = string_constrained || cJSON_HasObjectItem(s, string_kw[i]);
    for (size_t i = 0; i < n; i++) {
        const cJSON *x = items[i];
        if (cJSON_IsFalse(x)) continue;
        if (cJSON_IsTrue(x) || (cJSON_IsObject(x) && !has_constraints(x, ""))) {
            *types = 0; /* nothing matches */
            continue;
        }
        if (only_key(x, "type")) {
            int nt = schema_types(c, x);
            if (nt < 0) return false;
            /* a number that is not an integer: kvd's number text cannot say that */
            if ((*types & T_NUMBER) && (nt & T_INTEGER) && !(nt & T_NUMBER)) return fail_not(c);
            *types &= ~nt;
            continue;
        }
        const cJSON *en = cJSON_GetObjectItemCaseSensitive(x, "enum");
        const cJSON *k = cJSON_GetObjectItemCaseSensitive(x, "const");
        if (!cJSON_IsObject(x) || !(cJSON_IsArray(en) || k)) return fail_not(c);
        for (const cJSON *v = k ? k : en->child; v; v = k ? NULL : v->next) {
            kvd_error why = {0};
            int in = literal_valid(c, x, v, 0, &why);
            if (in < 0) {
                gr_fail(c->b, in, "%s", why.msg);
                return false;
            }
            int vt = value_type(v);
            if (!in || !((*types & vt) || (vt == T_INTEGER && (*types & T_NUMBER)))) continue;
            if (vt == T_STRING && string_constrained) {
                /* a string the other keywords refuse anyway needs no exclusion */
                cJSON *base = cJSON_Duplicate(s, true);
                if (!base) return false;
                cJSON_DeleteItemFromObjectCaseSensitive(base, "not");
                int there = literal_valid(c, base, v, 0, &why);
                cJSON_Delete(base);
                if (there < 0) {
                    gr_fail(c->b, there, "%s", why.msg);
                    return false;
                }
                if (!there) continue;
            }
            if (vt == T_NULL) *types &= ~T_NULL;
            else if (vt == T_BOOL) *bools &= cJSON_IsTrue(v) ? ~1 : ~2;
            else if (vt == T_STRING && !string_constrained) {
                const char **p = realloc(*strings, (*num_strings + 1) * sizeof *p);
                if (!p) {
                    gr_fail(c->b, KVD_ENOMEM, "json schema: out of memory");
                    return false;
                }
                *strings = p;
                p[(*num_strings)++] = v->valuestring;
            } else
                return fail_not(c);
        }
    }
    if (!(*bools & 3)) *types &= ~T_BOOL;
    return true;
}

/* --- patternProperties, rewritten where they reduce to plain keywords ------------------ */

/* Patterns that find a match in every string (search semantics). */
static bool pattern_matches_all(const char *re)
{
    static const char *const all[] = {"", ".*", "^.*", ".*$", "(.*)", "^(.*)", NULL};
    for (int i = 0; all[i]; i++)
        if (!strcmp(re, all[i])) return true;
    return false;
}

/* patternProperties that constrain nothing (a schema every value passes, when keys
 * that match no pattern may hold anything anyway) are dropped, and one pattern every
 * key matches becomes properties/additionalProperties: each member must pass it, so
 * additionalProperties never applies. Returns a rewritten copy of s (owned by c), s
 * itself when nothing changes, or NULL on error. */
static const cJSON *simplify_pattern_properties(jctx *c, const cJSON *s)
{
    const cJSON *pp = cJSON_GetObjectItemCaseSensitive(s, "patternProperties");
    if (!cJSON_IsObject(pp)) return s;
    const cJSON *addl = cJSON_GetObjectItemCaseSensitive(s, "additionalProperties");
    bool open = !addl || cJSON_IsTrue(addl);
    size_t n = 0, vacuous = 0;
    const cJSON *every = NULL;
    for (const cJSON *x = pp->child; x; x = x->next, n++) {
        if (open && (cJSON_IsTrue(x) || (cJSON_IsObject(x) && !has_constraints(x, "")))) vacuous++;
        else if (pattern_matches_all(x->string)) every = x;
    }
    if (!vacuous && !(every && n == 1)) return s;
    cJSON *m = cJSON_Duplicate(s, true);
    if (!m || !own(c, m)) return NULL;
    cJSON *mpp = cJSON_GetObjectItemCaseSensitive(m, "patternProperties");
    for (cJSON *x = mpp->child, *next; x; x = next) {
        next = x->next;
        if (open && (cJSON_IsTrue(x) || (cJSON_IsObject(x) && !has_constraints(x, ""))))
            cJSON_DeleteItemFromObjectCaseSensitive(mpp, x->string);
    }
    if (every && n == 1 && !vacuous) {
        cJSON *props = cJSON_GetObjectItemCaseSensitive(m, "properties");
        if (cJSON_IsObject(props))
            for (cJSON *x = props->child, *next; x; x = next) {
                next = x->next;
                cJSON_ReplaceItemInObjectCaseSensitive(props, x->string, schema_and(x, every));
            }
        cJSON_DeleteItemFromObjectCaseSensitive(m, "additionalProperties");
        cJSON_AddItemToObject(m, "additionalProperties", cJSON_Duplicate(every, true));
        cJSON_DeleteItemFromObjectCaseSensitive(m, "patternProperties");
    } else if (!mpp->child)
        cJSON_DeleteItemFromObjectCaseSensitive(m, "patternProperties");
    return m;
}

static uint32_t compile_node(jctx *c, const cJSON *s)
{
    gr_builder *b = c->b;
    if (b->failed) return 0;
    uint32_t rule;
    if (memo_get(c, s, &rule)) return rule;
    if (cJSON_IsTrue(s)) return any_value_rule(c);
    rule = gr_rule_new(b, s->string ? s->string : "schema", false);
    memo_put(c, s, rule);
    if (cJSON_IsFalse(s)) return rule; /* no alternative: nothing matches */
    if (!cJSON_IsObject(s)) {
        gr_fail(b, KVD_EINVAL, "json schema: a schema must be an object or a boolean");
        return rule;
    }
    if (++c->depth > MAX_DEPTH) {
        gr_fail(b, KVD_EUNSUPPORTED, "json schema: schema nests too deeply");
        return rule;
    }
    compile_body(c, s, rule);
    c->depth--;
    return rule;
}

static uint32_t compile_body(jctx *c, const cJSON *s, uint32_t rule)
{
    gr_builder *b = c->b;
    gr_seq q = {0};
    const cJSON *ref = cJSON_GetObjectItemCaseSensitive(s, "$ref");
    const cJSON *all = cJSON_GetObjectItemCaseSensitive(s, "allOf");
    if ((ref && !c->ref_alone && has_constraints(s, "$ref")) || all) {
        cJSON *m = cJSON_CreateObject();
        if (!m || !own(c, m)) return rule;
        if (!merge_into(c, m, s)) return rule;
        gr_seq_rule(b, &q, compile_node(c, m), 1, 1);
        gr_rule_add_alt(b, rule, &q);
        return rule;
    }
    if (ref) {
        const cJSON *t = cJSON_IsString(ref) ? resolve_ref(c, ref->valuestring) : NULL;
        if (!t) {
            if (!b->failed) gr_fail(b, KVD_EINVAL, "json schema: bad $ref");
            return rule;
        }
        gr_seq_rule(b, &q, compile_node(c, t), 1, 1);
        gr_rule_add_alt(b, rule, &q);
        return rule;
    }
    const cJSON *simple = simplify_pattern_properties(c, s);
    if (simple != s) {
        if (simple) gr_seq_rule(b, &q, compile_node(c, simple), 1, 1), gr_rule_add_alt(b, rule, &q);
        return rule;
    }
    if ((cJSON_HasObjectItem(s, "enum") || cJSON_HasObjectItem(s, "const")) && needs_literal_check(s)) {
        literal_alts(c, s, rule);
        return rule;
    }
    for (int i = 0; unsupported_kw[i]; i++)
        if (cJSON_HasObjectItem(s, unsupported_kw[i])) {
            const cJSON *x = cJSON_GetObjectItemCaseSensitive(s, unsupported_kw[i]);
            /* an empty patternProperties or an always-true "not": false constrains nothing */
            if (cJSON_IsObject(x) && !x->child && strcmp(unsupported_kw[i], "not")) continue;
            gr_fail(b, KVD_EUNSUPPORTED, "json schema: keyword '%s' is not supported", unsupported_kw[i]);
            return rule;
        }
    const cJSON *mult = cJSON_GetObjectItemCaseSensitive(s, "multipleOf");
    bool int_only = false;
    if (mult) {
        if (!cJSON_IsNumber(mult) || mult->valuedouble != 1) {
            gr_fail(b, KVD_EUNSUPPORTED, "json schema: keyword 'multipleOf' is not supported (only 1)");
            return rule;
        }
        int_only = true;
    }
    const cJSON *any = cJSON_GetObjectItemCaseSensitive(s, "anyOf");
    const cJSON *one = cJSON_GetObjectItemCaseSensitive(s, "oneOf");
    if (any && one) {
        gr_fail(b, KVD_EUNSUPPORTED, "json schema: anyOf together with oneOf is not supported");
        return rule;
    }
    bool one_rewritten = false;
    int failed_before = b->failed;
    if (one && cJSON_IsArray(one)) {
        /* Branches that may overlap each take the others' negations: exactly one
         * branch then matches (refused where a negation cannot be exact). */
        cJSON *branches = NULL;
        int i = 0;
        for (const cJSON *x = one->child; x; x = x->next, i++) {
            cJSON *nots = NULL;
            for (const cJSON *y = one->child; y; y = y->next)
                if (y != x && !disjoint(c, x, y)) {
                    if (!nots) nots = cJSON_CreateArray();
                    cJSON *n1 = cJSON_CreateObject();
                    cJSON_AddItemToObject(n1, "not", cJSON_Duplicate(y, true));
                    cJSON_AddItemToArray(nots, n1);
                }
            if (!branches && nots) { /* first overlap: copy the branches so far */
                branches = cJSON_CreateArray();
                if (!branches || !own(c, branches)) {
                    cJSON_Delete(nots);
                    return rule;
                }
                int k = 0;
                for (const cJSON *z = one->child; k < i; z = z->next, k++)
                    cJSON_AddItemToArray(branches, cJSON_Duplicate(z, true));
            }
            if (!branches) continue;
            if (!nots) {
                cJSON_AddItemToArray(branches, cJSON_Duplicate(x, true));
                continue;
            }
            cJSON *br = cJSON_CreateObject(), *all = cJSON_AddArrayToObject(br, "allOf");
            cJSON_AddItemToArray(all, cJSON_Duplicate(x, true));
            while (nots->child) cJSON_AddItemToArray(all, cJSON_DetachItemFromArray(nots, 0));
            cJSON_Delete(nots);
            cJSON_AddItemToArray(branches, br);
        }
        if (branches) {
            any = branches;
            one_rewritten = true;
        } else
            any = one;
    }
    if (any) {
        if (!cJSON_IsArray(any)) {
            gr_fail(b, KVD_EINVAL, "json schema: anyOf/oneOf must be an array");
            return rule;
        }
        const char *any_key = one ? "oneOf" : "anyOf";
        bool siblings = has_constraints(s, any_key);
        for (const cJSON *x = any->child; x && !b->failed; x = x->next) {
            uint32_t br;
            if (siblings) {
                cJSON *m = cJSON_CreateObject();
                if (!m || !own(c, m)) break;
                for (const cJSON *v = s->child; v; v = v->next)
                    if (strcmp(v->string, any_key)) cJSON_AddItemToObject(m, v->string, cJSON_Duplicate(v, true));
                if (!merge_into(c, m, x)) break;
                br = compile_node(c, m);
            } else
                br = compile_node(c, x);
            gr_seq_rule(b, &q, br, 1, 1);
            gr_rule_add_alt(b, rule, &q);
        }
        gr_seq_free(&q);
        if (one_rewritten && b->failed == KVD_EUNSUPPORTED && !failed_before && b->err &&
            !strstr(b->err->msg, "oneOf whose branches")) {
            /* name the keyword the user wrote */
            char inner[sizeof b->err->msg];
            const char *m = b->err->msg;
            if (!strncmp(m, "json schema: ", 13)) m += 13;
            snprintf(inner, sizeof inner, "%s", m);
            kvd_error_set(b->err, KVD_EUNSUPPORTED, "json schema: oneOf whose branches may overlap is not supported "
                                                    "here (telling them apart: %.400s)", inner);
        }
        return rule;
    }
    int types = schema_types(c, s);
    if (types < 0) return rule;
    if (int_only) types &= T_INTEGER;
    const cJSON *not = cJSON_GetObjectItemCaseSensitive(s, "not");
    int bools = 3; /* bit 0: true allowed, bit 1: false allowed */
    const char **no_strings = NULL;
    size_t num_no_strings = 0;
    if (not) {
        if (rewrite_not(c, s, not, rule)) return rule;
        if (!not_exclusions(c, s, not, &types, &bools, &no_strings, &num_no_strings)) {
            free(no_strings);
            return rule;
        }
    }
    const cJSON *en = cJSON_GetObjectItemCaseSensitive(s, "enum");
    const cJSON *k = cJSON_GetObjectItemCaseSensitive(s, "const");
    if (en || k) {
        if (cJSON_HasObjectItem(s, "pattern") || cJSON_HasObjectItem(s, "format")) {
            gr_fail(b, KVD_EUNSUPPORTED, "json schema: enum/const together with pattern/format is not supported");
            return rule;
        }
        if (en && !cJSON_IsArray(en)) {
            gr_fail(b, KVD_EINVAL, "json schema: 'enum' must be an array");
            return rule;
        }
        for (const cJSON *v = k ? k : en->child; v; v = k ? NULL : v->next) {
            if (k && en) {
                bool in = false;
                for (const cJSON *y = en->child; y && !in; y = y->next) in = cJSON_Compare(k, y, true);
                if (!in) break;
            }
            int vt = value_type(v);
            if (!(types & vt) && !(vt == T_INTEGER && (types & T_NUMBER))) continue;
            if (vt == T_STRING) {
                size_t cps = 0;
                for (const unsigned char *p = (const unsigned char *)v->valuestring; *p; p++) cps += (*p & 0xC0) != 0x80;
                if (cps < get_count(c, s, "minLength", 0)) continue;
                if (cJSON_HasObjectItem(s, "maxLength") && cps > get_count(c, s, "maxLength", GR_INF)) continue;
            }
            if (vt & (T_INTEGER | T_NUMBER)) {
                double lo, hi;
                if (bound(s, "minimum", "exclusiveMinimum", true, &lo) && v->valuedouble < lo) continue;
                if (bound(s, "maximum", "exclusiveMaximum", false, &hi) && v->valuedouble > hi) continue;
            }
            if (vt == T_OBJECT || vt == T_ARRAY) {
                static const char *const deep[] = {"properties", "required", "additionalProperties", "items",
                                                   "prefixItems", "minItems", "maxItems", "minProperties",
                                                   "maxProperties", NULL};
                for (int i = 0; deep[i]; i++)
                    if (cJSON_HasObjectItem(s, deep[i])) {
                        gr_fail(b, KVD_EUNSUPPORTED,
                                "json schema: enum/const of objects or arrays with '%s' is not supported", deep[i]);
                        return rule;
                    }
            }
            gr_seq_rule(b, &q, value_lit_rule(c, v), 1, 1);
            gr_rule_add_alt(b, rule, &q);
        }
        return rule;
    }
    if (types & T_NULL) gr_seq_lit(b, &q, "null", 4), gr_rule_add_alt(b, rule, &q);
    if ((types & T_BOOL) && (bools & 1)) gr_seq_lit(b, &q, "true", 4), gr_rule_add_alt(b, rule, &q);
    if ((types & T_BOOL) && (bools & 2)) gr_seq_lit(b, &q, "false", 5), gr_rule_add_alt(b, rule, &q);
    if ((types & T_STRING) && num_no_strings) {
        uint32_t min = get_count(c, s, "minLength", 0);
        uint32_t max = cJSON_HasObjectItem(s, "maxLength") ? get_count(c, s, "maxLength", GR_INF) : GR_INF;
        gr_seq_rule(b, &q, string_not_in(c, no_strings, num_no_strings, min, max), 1, 1);
        gr_rule_add_alt(b, rule, &q);
    } else if (types & T_STRING)
        alt_string(c, s, rule);
    free(no_strings);
    if (types & T_NUMBER) alt_number(c, s, rule);
    else if (types & T_INTEGER) alt_integer(c, s, rule);
    if (types & T_OBJECT) alt_object(c, s, rule);
    if (types & T_ARRAY) alt_array(c, s, rule);
    return rule;
}

static void jctx_init(jctx *c, gr_builder *b, bool any_order)
{
    memset(c, 0, sizeof *c);
    c->b = b;
    c->any_order = any_order;
    c->jchar = c->any_value = c->any_string = c->number = c->integer = GR_NONE;
}

static void jctx_deinit(jctx *c)
{
    for (size_t i = 0; i < c->nowned; i++) cJSON_Delete(c->owned[i]);
    free(c->owned);
    free(c->memo);
}

/* root ::= ws value ws (leading/trailing whitespace as json.loads allows) */
static uint32_t wrap_root(jctx *c, uint32_t value)
{
    gr_builder *b = c->b;
    uint32_t r = gr_rule_new(b, "root", false);
    gr_seq q = {0};
    gr_seq_rule(b, &q, value, 1, 1);
    gr_rule_add_alt(b, r, &q);
    return r;
}

kvd_grammar *kvd_grammar_compile_json_schema(const kvd_grammar_vocab *v, const char *schema, size_t len,
                                             const kvd_grammar_json_options *opts, kvd_error *err)
{
    cJSON *root = cJSON_ParseWithLength(schema, len);
    if (!root) {
        kvd_error_set(err, KVD_EINVAL, "json schema: not valid JSON");
        return NULL;
    }
    gr_builder b;
    gr_builder_init(&b, err);
    jctx c;
    jctx_init(&c, &b, opts && opts->any_order);
    c.vocab = v;
    c.root = root;
    const cJSON *draft = cJSON_GetObjectItemCaseSensitive(root, "$schema");
    if (cJSON_IsString(draft))
        for (const char *const *d = (const char *const[]){"draft-03", "draft-04", "draft-06", "draft-07", NULL}; *d; d++)
            c.ref_alone = c.ref_alone || strstr(draft->valuestring, *d) != NULL;
    uint32_t value = compile_node(&c, root);
    uint32_t r = wrap_root(&c, value);
    jctx_deinit(&c);
    kvd_grammar *g = gr_finish(&b, v, r, err);
    cJSON_Delete(root);
    return g;
}

kvd_grammar *kvd_grammar_compile_json_object(const kvd_grammar_vocab *v, kvd_error *err)
{
    static const char obj[] = "{\"type\": \"object\"}";
    return kvd_grammar_compile_json_schema(v, obj, sizeof obj - 1, NULL, err);
}

kvd_grammar *kvd_grammar_compile_choice(const kvd_grammar_vocab *v, const char *const *choices, size_t n,
                                        kvd_error *err)
{
    gr_builder b;
    gr_builder_init(&b, err);
    uint32_t r = gr_rule_new(&b, "root", false);
    for (size_t i = 0; i < n; i++) {
        gr_seq q = {0};
        gr_seq_lit(&b, &q, choices[i], strlen(choices[i]));
        gr_rule_add_alt(&b, r, &q);
    }
    if (n == 0) gr_fail(&b, KVD_EINVAL, "guided_choice: no choices");
    return gr_finish(&b, v, r, err);
}
