/* render.c - evaluating a parsed template: values, scopes, output with provenance.
 *
 * Semantics follow Jinja2 3.1 under Hugging Face's ImmutableSandboxedEnvironment:
 * - a for loop's body gets a fresh scope every iteration (sets inside do not leak out
 *   or into the next iteration; namespace() objects are how templates carry state);
 * - obj.name tries the object's methods first, then its key; obj[key] the key first;
 *   a missing key or index is Undefined, and using Undefined for anything but testing,
 *   printing (nothing), iterating (empty) or ~ is an error;
 * - printing follows Python's str(): None, True, 1.0, ['a', 1] (repr inside containers);
 * - tojson is json.dumps(x, ensure_ascii=False, indent=..., separators=..., sort_keys=...).
 * Lists and strings are never mutated in place (the sandbox forbids list.append).
 */
#include "value.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <utf8proc.h>

/* ---------------------------------------------------------------- state */

typedef struct var {
    const char *name;
    value v;
} var;

typedef struct frame {
    struct frame *parent;
    var *vars;
    size_t n, cap;
} frame;

typedef struct sbuild {
    char *data;
    uint8_t *mask;
    size_t len, cap;
    bool heap; /* the render's output: grown with realloc, not in the arena */
} sbuild;

enum flow { FLOW_NORMAL, FLOW_BREAK, FLOW_CONTINUE };

typedef struct render {
    tmpl_arena arena;
    kvd_template_limits lim;
    uint64_t steps;
    int depth;
    int failed;
    kvd_error *err;
    frame *root;
} render;

static bool rfail(render *r, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static bool rfail(render *r, int line, const char *fmt, ...)
{
    if (r->failed)
        return false;
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    r->failed = KVD_EINVAL;
    kvd_error_set(r->err, KVD_EINVAL, "chat template line %d: %s", line, msg);
    return false;
}

static bool rlimit(render *r, const char *what)
{
    if (!r->failed) {
        r->failed = KVD_ETOOLONG;
        kvd_error_set(r->err, KVD_ETOOLONG, "chat template: %s", what);
    }
    return false;
}

static void *ralloc(render *r, size_t size)
{
    void *p = tmpl_alloc(&r->arena, size);
    if (!p && !r->failed) {
        if (r->arena.over)
            rlimit(r, "rendering needs more memory than the limit");
        else {
            r->failed = KVD_ENOMEM;
            kvd_error_set(r->err, KVD_ENOMEM, "chat template: out of memory");
        }
    }
    return p;
}

static void *ralloc_raw(render *r, size_t size)
{
    void *p = tmpl_alloc_raw(&r->arena, size);
    if (!p)
        return ralloc(r, size); /* reports the failure */
    return p;
}

static bool step(render *r, uint64_t n)
{
    r->steps += n;
    if (r->steps > r->lim.max_steps)
        return rlimit(r, "too many loop iterations (the step limit was reached)");
    return true;
}

/* ---------------------------------------------------------------- string builder */

static bool sb_grow(render *r, sbuild *b, size_t extra)
{
    if (b->len + extra + 1 <= b->cap)
        return true;
    if (b->len + extra > r->lim.max_output)
        return rlimit(r, "the rendered text exceeds the output limit");
    size_t cap = b->cap ? b->cap * 2 : 64;
    while (cap < b->len + extra + 1)
        cap *= 2;
    if (b->heap) {
        /* the arena would keep every outgrown copy of the (large) output */
        char *data = realloc(b->data, cap);
        if (data)
            b->data = data;
        uint8_t *mask = data ? realloc(b->mask, cap) : NULL;
        if (!mask) {
            r->failed = KVD_ENOMEM;
            kvd_error_set(r->err, KVD_ENOMEM, "chat template: out of memory");
            return false;
        }
        b->mask = mask;
        b->cap = cap;
        return true;
    }
    char *data = ralloc_raw(r, cap);
    uint8_t *mask = ralloc_raw(r, cap);
    if (!data || !mask)
        return false;
    if (b->len) {
        memcpy(data, b->data, b->len);
        memcpy(mask, b->mask, b->len);
    }
    b->data = data;
    b->mask = mask;
    b->cap = cap;
    return true;
}

static bool sb_put(render *r, sbuild *b, const char *s, size_t n, int prov, const uint8_t *mask)
{
    if (!sb_grow(r, b, n))
        return false;
    if (n)
        memcpy(b->data + b->len, s, n);
    if (prov == P_MIXED)
        memcpy(b->mask + b->len, mask, n);
    else
        memset(b->mask + b->len, prov == P_DATA, n);
    b->len += n;
    b->data[b->len] = '\0';
    return true;
}

static bool sb_lit(render *r, sbuild *b, const char *s) { return sb_put(r, b, s, strlen(s), P_LIT, NULL); }

static bool sb_putc(render *r, sbuild *b, char c, int prov)
{
    return sb_put(r, b, &c, 1, prov, NULL);
}

static value sb_value(const sbuild *b)
{
    value v = {.type = V_STR};
    v.u.str.s = b->data ? b->data : "";
    v.u.str.len = b->len;
    bool any = false, all = true;
    for (size_t i = 0; i < b->len; i++) {
        any |= b->mask[i] != 0;
        all &= b->mask[i] != 0;
    }
    v.prov = !any ? P_LIT : all ? P_DATA : P_MIXED;
    if (v.prov == P_MIXED)
        v.u.str.mask = b->mask;
    return v;
}

/* ---------------------------------------------------------------- constructors */

static value mk_undef(const char *name)
{
    value v = {.type = V_UNDEF};
    v.u.str.s = name;
    return v;
}
static value mk_none(void) { return (value){.type = V_NONE}; }
static value mk_bool(bool b)
{
    value v = {.type = V_BOOL};
    v.u.b = b;
    return v;
}
static value mk_int(int64_t i)
{
    value v = {.type = V_INT};
    v.u.i = i;
    return v;
}
static value mk_float(double f)
{
    value v = {.type = V_FLOAT};
    v.u.f = f;
    return v;
}
static value mk_str(const char *s, size_t len, int prov)
{
    value v = {.type = V_STR, .prov = (uint8_t)prov};
    v.u.str.s = s;
    v.u.str.len = len;
    return v;
}
static value mk_lit(const char *s) { return mk_str(s, strlen(s), P_LIT); }

/* A copy of s in the arena with the given provenance (a derived string). */
static bool mk_copy(render *r, const char *s, size_t len, int prov, value *out)
{
    char *d = ralloc(r, len + 1);
    if (!d)
        return false;
    memcpy(d, s, len);
    *out = mk_str(d, len, prov);
    return true;
}

/* Provenance of a string derived from inputs of these provenances. */
static int derived(int a, int b) { return a == P_LIT && b == P_LIT ? P_LIT : P_DATA; }

static vlist *new_list(render *r, size_t cap)
{
    vlist *l = ralloc(r, sizeof *l);
    if (!l)
        return NULL;
    if (cap) {
        if (!(l->items = ralloc(r, cap * sizeof *l->items)))
            return NULL;
        l->cap = cap;
    }
    return l;
}

static bool list_push(render *r, vlist *l, value v)
{
    if (l->len == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        value *items = ralloc(r, cap * sizeof *items);
        if (!items)
            return false;
        if (l->len)
            memcpy(items, l->items, l->len * sizeof *items);
        l->items = items;
        l->cap = cap;
    }
    l->items[l->len++] = v;
    return true;
}

static value mk_list(vlist *l)
{
    value v = {.type = V_LIST};
    v.u.list = l;
    return v;
}

static bool dict_set(render *r, vdict *d, value key, value val);

static value json_value(const cJSON *j, int prov)
{
    if (!j)
        return mk_undef(NULL);
    if (cJSON_IsString(j))
        return mk_str(j->valuestring, strlen(j->valuestring), prov);
    if (cJSON_IsNumber(j)) {
        double d = j->valuedouble;
        if (d == floor(d) && fabs(d) < 9.2e18)
            return mk_int((int64_t)d);
        return mk_float(d);
    }
    if (cJSON_IsBool(j))
        return mk_bool(cJSON_IsTrue(j));
    if (cJSON_IsNull(j))
        return mk_none();
    value v = {.type = V_JSON, .prov = (uint8_t)prov};
    v.u.json = j;
    return v;
}

static bool is_json_obj(const value *v) { return v->type == V_JSON && cJSON_IsObject(v->u.json); }
static bool is_json_arr(const value *v) { return v->type == V_JSON && cJSON_IsArray(v->u.json); }
static bool is_mapping(const value *v) { return v->type == V_DICT || is_json_obj(v); }
static bool is_seq(const value *v) { return v->type == V_LIST || is_json_arr(v); }
static bool is_num(const value *v) { return v->type == V_INT || v->type == V_FLOAT || v->type == V_BOOL; }

static size_t seq_len(const value *v)
{
    if (v->type == V_LIST)
        return v->u.list->len;
    return (size_t)cJSON_GetArraySize(v->u.json);
}

static const char *type_name(const value *v)
{
    switch (v->type) {
    case V_UNDEF: return "undefined";
    case V_NONE: return "NoneType";
    case V_BOOL: return "bool";
    case V_INT: return "int";
    case V_FLOAT: return "float";
    case V_STR: return "str";
    case V_LIST: return v->tuple ? "tuple" : "list";
    case V_DICT: return "dict";
    case V_JSON: return cJSON_IsArray(v->u.json) ? "list" : "dict";
    case V_NS: return "Namespace";
    case V_LOOP: return "LoopContext";
    default: return "function";
    }
}

/* ---------------------------------------------------------------- formatting */

/* Python's repr(float): the shortest digits that round-trip, fixed notation for
 * decimal exponents in [-4, 16), else d.ddde+XX. */
static void fmt_float(double f, char *buf, size_t cap, bool json)
{
    if (isnan(f)) {
        snprintf(buf, cap, json ? "NaN" : "nan");
        return;
    }
    if (isinf(f)) {
        snprintf(buf, cap, "%s%s", f < 0 ? "-" : "", json ? "Infinity" : "inf");
        return;
    }
    char tmp[40];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec - 1, f);
        if (strtod(tmp, NULL) == f)
            break;
    }
    /* tmp: [-]d[.ddd]e[+-]XX */
    const char *s = tmp;
    bool neg = *s == '-';
    if (neg)
        s++;
    char digits[24];
    int nd = 0;
    for (; *s && *s != 'e'; s++)
        if (*s != '.')
            digits[nd++] = *s;
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = '\0';
    int exp = atoi(s + 1);
    char *o = buf;
    size_t left = cap;
#define PUT(...)                                           \
    do {                                                   \
        int w_ = snprintf(o, left, __VA_ARGS__);           \
        if (w_ > 0 && (size_t)w_ < left) {                 \
            o += w_;                                       \
            left -= (size_t)w_;                            \
        }                                                  \
    } while (0)
    if (neg)
        PUT("-");
    if (exp >= -4 && exp < 16) {
        if (exp < 0) {
            PUT("0.");
            for (int k = 0; k < -exp - 1; k++)
                PUT("0");
            PUT("%s", digits);
        } else if (nd <= exp + 1) {
            PUT("%s", digits);
            for (int k = nd; k < exp + 1; k++)
                PUT("0");
            PUT(".0");
        } else {
            PUT("%.*s.%s", exp + 1, digits, digits + exp + 1);
        }
    } else {
        PUT("%c", digits[0]);
        if (nd > 1)
            PUT(".%s", digits + 1);
        PUT("e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    }
#undef PUT
}

static bool repr_into(render *r, sbuild *b, const value *v);

static bool str_repr(render *r, sbuild *b, const char *s, size_t n)
{
    bool has_single = memchr(s, '\'', n) != NULL, has_double = memchr(s, '"', n) != NULL;
    char q = has_single && !has_double ? '"' : '\'';
    if (!sb_putc(r, b, q, P_DATA))
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[16];
        if (c == (unsigned char)q || c == '\\')
            snprintf(esc, sizeof esc, "\\%c", c);
        else if (c == '\n')
            snprintf(esc, sizeof esc, "\\n");
        else if (c == '\r')
            snprintf(esc, sizeof esc, "\\r");
        else if (c == '\t')
            snprintf(esc, sizeof esc, "\\t");
        else if (c < 0x20 || c == 0x7f)
            snprintf(esc, sizeof esc, "\\x%02x", c);
        else if (c >= 0x80) {
            /* Python escapes what str.isprintable() rejects: other, separator, unassigned */
            utf8proc_int32_t cp;
            utf8proc_ssize_t len = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
            if (len <= 0) {
                snprintf(esc, sizeof esc, "\\x%02x", c);
            } else {
                utf8proc_category_t cat = utf8proc_category(cp);
                bool printable = !(cat == UTF8PROC_CATEGORY_CC || cat == UTF8PROC_CATEGORY_CF ||
                                   cat == UTF8PROC_CATEGORY_CS || cat == UTF8PROC_CATEGORY_CO ||
                                   cat == UTF8PROC_CATEGORY_CN || cat == UTF8PROC_CATEGORY_ZL ||
                                   cat == UTF8PROC_CATEGORY_ZP || cat == UTF8PROC_CATEGORY_ZS);
                if (printable) {
                    if (!sb_put(r, b, s + i, (size_t)len, P_DATA, NULL))
                        return false;
                    i += (size_t)len - 1;
                    continue;
                }
                if (cp < 0x100)
                    snprintf(esc, sizeof esc, "\\x%02x", (unsigned)cp);
                else if (cp < 0x10000)
                    snprintf(esc, sizeof esc, "\\u%04x", (unsigned)cp);
                else
                    snprintf(esc, sizeof esc, "\\U%08x", (unsigned)cp);
                i += (size_t)len - 1;
            }
        } else {
            esc[0] = (char)c;
            esc[1] = '\0';
        }
        if (!sb_put(r, b, esc, strlen(esc), P_DATA, NULL))
            return false;
    }
    return sb_putc(r, b, q, P_DATA);
}

/* Python str(v) appended to b (strings keep their provenance). */
static bool str_into(render *r, sbuild *b, const value *v)
{
    char buf[64];
    switch (v->type) {
    case V_UNDEF: return true;
    case V_NONE: return sb_lit(r, b, "None");
    case V_BOOL: return sb_lit(r, b, v->u.b ? "True" : "False");
    case V_INT:
        snprintf(buf, sizeof buf, "%lld", (long long)v->u.i);
        return sb_lit(r, b, buf);
    case V_FLOAT:
        fmt_float(v->u.f, buf, sizeof buf, false);
        return sb_lit(r, b, buf);
    case V_STR: return sb_put(r, b, v->u.str.s, v->u.str.len, v->prov, v->u.str.mask);
    default: return repr_into(r, b, v);
    }
}

static bool repr_into(render *r, sbuild *b, const value *v)
{
    switch (v->type) {
    case V_STR: return str_repr(r, b, v->u.str.s, v->u.str.len);
    case V_LIST:
    case V_JSON:
    case V_DICT:
    case V_NS:
        break;
    case V_UNDEF: return true;
    case V_MACRO: case V_METHOD: case V_FUNC: return sb_put(r, b, "<function>", 10, P_DATA, NULL);
    case V_LOOP: return sb_put(r, b, "<LoopContext>", 13, P_DATA, NULL);
    default: {
        sbuild t = {0};
        if (!str_into(r, &t, v))
            return false;
        return sb_put(r, b, t.data, t.len, P_DATA, NULL);
    }
    }
    if (!step(r, 1))
        return false;
    if (v->type == V_LIST || is_json_arr(v)) {
        bool tuple = v->type == V_LIST && v->tuple;
        if (!sb_putc(r, b, tuple ? '(' : '[', P_DATA))
            return false;
        size_t n = seq_len(v);
        const cJSON *j = v->type == V_JSON ? v->u.json->child : NULL;
        for (size_t i = 0; i < n; i++) {
            value item = v->type == V_LIST ? v->u.list->items[i] : json_value(j, v->prov);
            if (j)
                j = j->next;
            if ((i && !sb_put(r, b, ", ", 2, P_DATA, NULL)) || !repr_into(r, b, &item))
                return false;
        }
        if (tuple && n == 1 && !sb_putc(r, b, ',', P_DATA))
            return false;
        return sb_putc(r, b, tuple ? ')' : ']', P_DATA);
    }
    if (v->type == V_NS && !sb_put(r, b, "<Namespace ", 11, P_DATA, NULL))
        return false;
    if (!sb_putc(r, b, '{', P_DATA))
        return false;
    if (v->type == V_JSON) {
        size_t i = 0;
        for (const cJSON *j = v->u.json->child; j; j = j->next, i++) {
            value item = json_value(j, v->prov);
            if ((i && !sb_put(r, b, ", ", 2, P_DATA, NULL)) || !str_repr(r, b, j->string, strlen(j->string)) ||
                !sb_put(r, b, ": ", 2, P_DATA, NULL) || !repr_into(r, b, &item))
                return false;
        }
    } else {
        for (size_t i = 0; i < v->u.dict->len; i++)
            if ((i && !sb_put(r, b, ", ", 2, P_DATA, NULL)) || !repr_into(r, b, &v->u.dict->keys[i]) ||
                !sb_put(r, b, ": ", 2, P_DATA, NULL) || !repr_into(r, b, &v->u.dict->vals[i]))
                return false;
    }
    if (!sb_putc(r, b, '}', P_DATA))
        return false;
    return v->type != V_NS || sb_putc(r, b, '>', P_DATA);
}

/* a + b for two strings, sized exactly; the mask only when provenance is mixed. */
static bool concat_str(render *r, const value *a_in, const value *b_in, value *out)
{
    value a_copy = *a_in, b_copy = *b_in; /* out may be one of the inputs */
    const value *a = &a_copy, *b = &b_copy;
    size_t la = a->u.str.len, lb = b->u.str.len;
    if (la == 0 || lb == 0) {
        *out = la ? *a : *b;
        return true;
    }
    char *d = ralloc_raw(r, la + lb + 1);
    if (!d)
        return false;
    memcpy(d, a->u.str.s, la);
    memcpy(d + la, b->u.str.s, lb);
    d[la + lb] = '\0';
    *out = mk_str(d, la + lb, a->prov);
    if (a->prov == b->prov && a->prov != P_MIXED)
        return true;
    uint8_t *mask = ralloc_raw(r, la + lb);
    if (!mask)
        return false;
    if (a->prov == P_MIXED)
        memcpy(mask, a->u.str.mask, la);
    else
        memset(mask, a->prov == P_DATA, la);
    if (b->prov == P_MIXED)
        memcpy(mask + la, b->u.str.mask, lb);
    else
        memset(mask + la, b->prov == P_DATA, lb);
    out->prov = P_MIXED;
    out->u.str.mask = mask;
    return true;
}

/* str(v) as a value (strings are returned as they are). */
static bool to_str(render *r, const value *v, value *out)
{
    if (v->type == V_STR) {
        *out = *v;
        return true;
    }
    sbuild b = {0};
    if (!str_into(r, &b, v))
        return false;
    *out = sb_value(&b);
    return true;
}

/* ---- tojson: json.dumps(x, ensure_ascii=False, indent, separators, sort_keys) ---- */

typedef struct json_opts {
    int indent;           /* -1: none */
    const char *item_sep; /* ", " without indent, "," with */
    const char *key_sep;
    bool sort_keys;
    int line;
} json_opts;

static bool json_str(render *r, sbuild *b, const char *s, size_t n)
{
    if (!sb_putc(r, b, '"', P_DATA))
        return false;
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        if (!sb_put(r, b, s + run, i - run, P_DATA, NULL))
            return false;
        char esc[8];
        switch (c) {
        case '"': strcpy(esc, "\\\""); break;
        case '\\': strcpy(esc, "\\\\"); break;
        case '\n': strcpy(esc, "\\n"); break;
        case '\r': strcpy(esc, "\\r"); break;
        case '\t': strcpy(esc, "\\t"); break;
        case '\b': strcpy(esc, "\\b"); break;
        case '\f': strcpy(esc, "\\f"); break;
        default: snprintf(esc, sizeof esc, "\\u%04x", c);
        }
        if (!sb_put(r, b, esc, strlen(esc), P_DATA, NULL))
            return false;
        run = i + 1;
    }
    return sb_put(r, b, s + run, n - run, P_DATA, NULL) && sb_putc(r, b, '"', P_DATA);
}

static bool json_newline(render *r, sbuild *b, const json_opts *o, int level)
{
    if (o->indent < 0)
        return true;
    if (!sb_putc(r, b, '\n', P_DATA))
        return false;
    for (int k = 0; k < o->indent * level; k++)
        if (!sb_putc(r, b, ' ', P_DATA))
            return false;
    return true;
}

static int cmp_bytes(const char *a, size_t an, const char *b, size_t bn)
{
    int c = memcmp(a, b, an < bn ? an : bn);
    return c ? c : (an < bn ? -1 : an > bn ? 1 : 0);
}

static bool json_into(render *r, sbuild *b, const value *v, const json_opts *o, int level);

static bool json_key(render *r, sbuild *b, const value *k, const json_opts *o)
{
    char buf[64];
    switch (k->type) {
    case V_STR: return json_str(r, b, k->u.str.s, k->u.str.len);
    case V_INT: snprintf(buf, sizeof buf, "\"%lld\"", (long long)k->u.i); break;
    case V_FLOAT: buf[0] = '"'; fmt_float(k->u.f, buf + 1, sizeof buf - 2, true); strcat(buf, "\""); break;
    case V_BOOL: strcpy(buf, k->u.b ? "\"true\"" : "\"false\""); break;
    case V_NONE: strcpy(buf, "\"null\""); break;
    default: return rfail(r, o->line, "tojson: keys must be str, int, float, bool or None, not %s", type_name(k));
    }
    return sb_put(r, b, buf, strlen(buf), P_DATA, NULL);
}

static bool json_into(render *r, sbuild *b, const value *v, const json_opts *o, int level)
{
    char buf[64];
    if (level > 200)
        return rlimit(r, "tojson: value nested too deeply");
    switch (v->type) {
    case V_NONE: return sb_put(r, b, "null", 4, P_DATA, NULL);
    case V_BOOL: return sb_put(r, b, v->u.b ? "true" : "false", v->u.b ? 4 : 5, P_DATA, NULL);
    case V_INT:
        snprintf(buf, sizeof buf, "%lld", (long long)v->u.i);
        return sb_put(r, b, buf, strlen(buf), P_DATA, NULL);
    case V_FLOAT:
        fmt_float(v->u.f, buf, sizeof buf, true);
        return sb_put(r, b, buf, strlen(buf), P_DATA, NULL);
    case V_STR: return json_str(r, b, v->u.str.s, v->u.str.len);
    case V_LIST:
    case V_JSON:
    case V_DICT:
        break;
    default: return rfail(r, o->line, "tojson: Object of type %s is not JSON serializable", type_name(v));
    }
    if (!step(r, 1))
        return false;
    if (v->type == V_LIST || is_json_arr(v)) {
        size_t n = seq_len(v);
        if (n == 0)
            return sb_put(r, b, "[]", 2, P_DATA, NULL);
        if (!sb_putc(r, b, '[', P_DATA))
            return false;
        const cJSON *j = v->type == V_JSON ? v->u.json->child : NULL;
        for (size_t i = 0; i < n; i++) {
            value item = v->type == V_LIST ? v->u.list->items[i] : json_value(j, v->prov);
            if (j)
                j = j->next;
            if (i && !sb_lit(r, b, o->item_sep))
                return false;
            if (!json_newline(r, b, o, level + 1) || !json_into(r, b, &item, o, level + 1))
                return false;
        }
        return json_newline(r, b, o, level) && sb_putc(r, b, ']', P_DATA);
    }
    /* mapping: collect (key, value) pairs so sort_keys can order them */
    size_t n = v->type == V_DICT ? v->u.dict->len : (size_t)cJSON_GetArraySize(v->u.json);
    if (n == 0)
        return sb_put(r, b, "{}", 2, P_DATA, NULL);
    value *keys = ralloc(r, n * sizeof *keys), *vals = ralloc(r, n * sizeof *vals);
    if (!keys || !vals)
        return false;
    if (v->type == V_DICT) {
        memcpy(keys, v->u.dict->keys, n * sizeof *keys);
        memcpy(vals, v->u.dict->vals, n * sizeof *vals);
    } else {
        size_t i = 0;
        for (const cJSON *j = v->u.json->child; j && i < n; j = j->next, i++) {
            keys[i] = mk_str(j->string, strlen(j->string), v->prov);
            vals[i] = json_value(j, v->prov);
        }
    }
    if (o->sort_keys) {
        for (size_t i = 1; i < n; i++) { /* insertion sort: dicts in templates are small */
            if (keys[i].type != V_STR)
                return rfail(r, o->line, "tojson: sort_keys needs string keys");
            for (size_t k = i; k > 0 && cmp_bytes(keys[k - 1].u.str.s, keys[k - 1].u.str.len, keys[k].u.str.s,
                                                   keys[k].u.str.len) > 0; k--) {
                value tk = keys[k], tv = vals[k];
                keys[k] = keys[k - 1];
                vals[k] = vals[k - 1];
                keys[k - 1] = tk;
                vals[k - 1] = tv;
            }
        }
    }
    if (!sb_putc(r, b, '{', P_DATA))
        return false;
    for (size_t i = 0; i < n; i++) {
        if (i && !sb_lit(r, b, o->item_sep))
            return false;
        if (!json_newline(r, b, o, level + 1) || !json_key(r, b, &keys[i], o) || !sb_lit(r, b, o->key_sep) ||
            !json_into(r, b, &vals[i], o, level + 1))
            return false;
    }
    return json_newline(r, b, o, level) && sb_putc(r, b, '}', P_DATA);
}

/* ---------------------------------------------------------------- semantics */

static bool truthy(const value *v)
{
    switch (v->type) {
    case V_UNDEF: case V_NONE: return false;
    case V_BOOL: return v->u.b;
    case V_INT: return v->u.i != 0;
    case V_FLOAT: return v->u.f != 0.0;
    case V_STR: return v->u.str.len != 0;
    case V_LIST: return v->u.list->len != 0;
    case V_DICT: return v->u.dict->len != 0;
    case V_JSON: return v->u.json->child != NULL;
    default: return true;
    }
}

static double num_f(const value *v)
{
    return v->type == V_FLOAT ? v->u.f : v->type == V_INT ? (double)v->u.i : (double)v->u.b;
}
static int64_t num_i(const value *v) { return v->type == V_INT ? v->u.i : (int64_t)v->u.b; }

static bool dict_get(const value *d, const char *key, size_t klen, value *out);

static bool py_eq(const value *a, const value *b)
{
    if (a->type == V_UNDEF || b->type == V_UNDEF)
        return a->type == b->type;
    if (is_num(a) && is_num(b)) {
        if (a->type == V_FLOAT || b->type == V_FLOAT)
            return num_f(a) == num_f(b);
        return num_i(a) == num_i(b);
    }
    if (a->type == V_STR && b->type == V_STR)
        return a->u.str.len == b->u.str.len && memcmp(a->u.str.s, b->u.str.s, a->u.str.len) == 0;
    if (a->type == V_NONE || b->type == V_NONE)
        return a->type == b->type;
    if (is_seq(a) && is_seq(b)) {
        if ((a->type == V_LIST && a->tuple) != (b->type == V_LIST && b->tuple))
            return false;
        size_t n = seq_len(a);
        if (n != seq_len(b))
            return false;
        const cJSON *ja = a->type == V_JSON ? a->u.json->child : NULL;
        const cJSON *jb = b->type == V_JSON ? b->u.json->child : NULL;
        for (size_t i = 0; i < n; i++) {
            value x = a->type == V_LIST ? a->u.list->items[i] : json_value(ja, a->prov);
            value y = b->type == V_LIST ? b->u.list->items[i] : json_value(jb, b->prov);
            if (ja)
                ja = ja->next;
            if (jb)
                jb = jb->next;
            if (!py_eq(&x, &y))
                return false;
        }
        return true;
    }
    if (is_mapping(a) && is_mapping(b)) {
        size_t na = a->type == V_DICT ? a->u.dict->len : (size_t)cJSON_GetArraySize(a->u.json);
        size_t nb = b->type == V_DICT ? b->u.dict->len : (size_t)cJSON_GetArraySize(b->u.json);
        if (na != nb)
            return false;
        for (size_t i = 0; i < na; i++) {
            value k, x, y;
            if (a->type == V_DICT) {
                k = a->u.dict->keys[i];
                x = a->u.dict->vals[i];
            } else {
                const cJSON *j = cJSON_GetArrayItem(a->u.json, (int)i);
                k = mk_str(j->string, strlen(j->string), P_DATA);
                x = json_value(j, P_DATA);
            }
            if (k.type != V_STR || !dict_get(b, k.u.str.s, k.u.str.len, &y) || !py_eq(&x, &y))
                return false;
        }
        return true;
    }
    if (a->type != b->type)
        return false;
    switch (a->type) {
    case V_NS: return a->u.dict == b->u.dict;
    case V_MACRO: return a->u.macro == b->u.macro;
    default: return a->id == b->id && a->u.self == b->u.self;
    }
}

/* Python ordering for numbers and strings; false with an error otherwise. */
static bool py_cmp(render *r, int line, const value *a, const value *b, int *res)
{
    if (is_num(a) && is_num(b)) {
        if (a->type == V_FLOAT || b->type == V_FLOAT) {
            double x = num_f(a), y = num_f(b);
            *res = x < y ? -1 : x > y ? 1 : 0;
        } else {
            int64_t x = num_i(a), y = num_i(b);
            *res = x < y ? -1 : x > y ? 1 : 0;
        }
        return true;
    }
    if (a->type == V_STR && b->type == V_STR) {
        *res = cmp_bytes(a->u.str.s, a->u.str.len, b->u.str.s, b->u.str.len); /* UTF-8 keeps code point order */
        return true;
    }
    if (a->type == V_UNDEF || b->type == V_UNDEF)
        return rfail(r, line, "'%s' is undefined", (a->type == V_UNDEF ? a : b)->u.str.s ? (a->type == V_UNDEF ? a : b)->u.str.s : "value");
    return rfail(r, line, "'<' not supported between instances of '%s' and '%s'", type_name(a), type_name(b));
}

static bool dict_get(const value *d, const char *key, size_t klen, value *out)
{
    if (d->type == V_DICT || d->type == V_NS) {
        for (size_t i = 0; i < d->u.dict->len; i++) {
            const value *k = &d->u.dict->keys[i];
            if (k->type == V_STR && k->u.str.len == klen && memcmp(k->u.str.s, key, klen) == 0) {
                *out = d->u.dict->vals[i];
                return true;
            }
        }
        return false;
    }
    if (is_json_obj(d)) {
        for (const cJSON *j = d->u.json->child; j; j = j->next)
            if (strlen(j->string) == klen && memcmp(j->string, key, klen) == 0) {
                *out = json_value(j, d->prov);
                return true;
            }
    }
    return false;
}

static bool dict_set(render *r, vdict *d, value key, value val)
{
    for (size_t i = 0; i < d->len; i++)
        if (py_eq(&d->keys[i], &key)) {
            d->vals[i] = val;
            return true;
        }
    if (d->len == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 8;
        value *keys = ralloc(r, cap * sizeof *keys), *vals = ralloc(r, cap * sizeof *vals);
        if (!keys || !vals)
            return false;
        if (d->len) {
            memcpy(keys, d->keys, d->len * sizeof *keys);
            memcpy(vals, d->vals, d->len * sizeof *vals);
        }
        d->keys = keys;
        d->vals = vals;
        d->cap = cap;
    }
    d->keys[d->len] = key;
    d->vals[d->len] = val;
    d->len++;
    return true;
}

/* ---- UTF-8 code points (Python indexes strings by code point) ---- */

static size_t cp_len(const char *s, size_t n)
{
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        count += ((unsigned char)s[i] & 0xC0) != 0x80;
    return count;
}

/* Byte offset of code point index k (k <= number of code points). */
static size_t cp_offset(const char *s, size_t n, size_t k)
{
    size_t i = 0;
    while (i < n && k > 0) {
        i++;
        while (i < n && ((unsigned char)s[i] & 0xC0) == 0x80)
            i++;
        k--;
    }
    return i;
}

static bool substr_value(render *r, const value *s, size_t from, size_t to, value *out)
{
    if (s->prov == P_MIXED)
        return mk_copy(r, s->u.str.s + from, to - from, P_DATA, out);
    *out = mk_str(s->u.str.s + from, to - from, s->prov);
    return true;
}

/* Materialises an iterable into a list: lists as they are, JSON arrays converted,
 * mappings as their keys, strings as their characters, Undefined as empty. */
static bool iterate(render *r, int line, const value *v, const vlist **out)
{
    if (v->type == V_LIST) {
        *out = v->u.list;
        return true;
    }
    if (v->type == V_UNDEF) {
        vlist *l = new_list(r, 0);
        *out = l;
        return l != NULL;
    }
    if (v->type == V_JSON) {
        size_t n = (size_t)cJSON_GetArraySize(v->u.json);
        vlist *l = new_list(r, n);
        if (!l)
            return false;
        for (const cJSON *j = v->u.json->child; j; j = j->next)
            l->items[l->len++] = cJSON_IsArray(v->u.json) ? json_value(j, v->prov)
                                                          : mk_str(j->string, strlen(j->string), v->prov);
        *out = l;
        return step(r, n);
    }
    if (v->type == V_DICT) {
        vlist *l = new_list(r, v->u.dict->len);
        if (!l)
            return false;
        for (size_t i = 0; i < v->u.dict->len; i++)
            l->items[l->len++] = v->u.dict->keys[i];
        *out = l;
        return true;
    }
    if (v->type == V_STR) {
        const char *s = v->u.str.s;
        size_t n = v->u.str.len;
        vlist *l = new_list(r, cp_len(s, n));
        if (!l)
            return false;
        for (size_t i = 0; i < n;) {
            size_t e = i + 1;
            while (e < n && ((unsigned char)s[e] & 0xC0) == 0x80)
                e++;
            if (!substr_value(r, v, i, e, &l->items[l->len++]))
                return false;
            i = e;
        }
        *out = l;
        return step(r, l->len);
    }
    return rfail(r, line, "'%s' object is not iterable", type_name(v));
}

/* ---------------------------------------------------------------- scopes */

static frame *new_frame(render *r, frame *parent)
{
    frame *f = ralloc(r, sizeof *f);
    if (f)
        f->parent = parent;
    return f;
}

static bool frame_set(render *r, frame *f, const char *name, value v)
{
    for (size_t i = 0; i < f->n; i++)
        if (!strcmp(f->vars[i].name, name)) {
            f->vars[i].v = v;
            return true;
        }
    if (f->n == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 4;
        var *vars = ralloc(r, cap * sizeof *vars);
        if (!vars)
            return false;
        if (f->n)
            memcpy(vars, f->vars, f->n * sizeof *vars);
        f->vars = vars;
        f->cap = cap;
    }
    f->vars[f->n].name = name;
    f->vars[f->n].v = v;
    f->n++;
    return true;
}

enum func_id { FN_RAISE, FN_NAMESPACE, FN_RANGE, FN_STRFTIME, FN_DICT };
static const char *const func_names[] = {"raise_exception", "namespace", "range", "strftime_now", "dict", NULL};

static value lookup(const frame *f, const char *name)
{
    for (; f; f = f->parent)
        for (size_t i = f->n; i-- > 0;)
            if (!strcmp(f->vars[i].name, name))
                return f->vars[i].v;
    for (int k = 0; func_names[k]; k++)
        if (!strcmp(func_names[k], name)) {
            value v = {.type = V_FUNC, .id = k};
            return v;
        }
    return mk_undef(name);
}

/* ---------------------------------------------------------------- builtins */

enum method_id {
    M_STARTSWITH, M_ENDSWITH, M_SPLIT, M_RSPLIT, M_STRIP, M_LSTRIP, M_RSTRIP, M_REPLACE, M_TITLE,
    M_UPPER, M_LOWER, M_CAPITALIZE, M_JOIN, M_FIND, M_COUNT, M_ISDIGIT, M_ISSPACE, M_SPLITLINES,
    M_STR_END,
    M_ITEMS = M_STR_END, M_KEYS, M_VALUES, M_GET, M_DICT_END,
    M_CYCLE = M_DICT_END,
};
static const char *const str_methods[] = {"startswith", "endswith", "split", "rsplit", "strip", "lstrip",
                                          "rstrip", "replace", "title", "upper", "lower", "capitalize",
                                          "join", "find", "count", "isdigit", "isspace", "splitlines", NULL};
static const char *const dict_methods[] = {"items", "keys", "values", "get", NULL};

static int name_index(const char *const *names, const char *name)
{
    for (int k = 0; names[k]; k++)
        if (!strcmp(names[k], name))
            return k;
    return -1;
}

enum filter_id {
    F_TOJSON, F_TRIM, F_LENGTH, F_COUNT, F_UPPER, F_LOWER, F_TITLE, F_CAPITALIZE, F_FIRST, F_LAST,
    F_JOIN, F_DEFAULT, F_D, F_STRING, F_INT, F_FLOAT, F_LIST, F_ITEMS, F_REVERSE, F_REPLACE, F_ABS,
    F_SAFE, F_SELECTATTR, F_REJECTATTR, F_MAP, F_SELECT, F_REJECT, F_UNIQUE, F_SUM, F_MIN, F_MAX,
    F_DICTSORT, F_BOOL,
};
static const char *const filter_names[] = {
    "tojson", "trim", "length", "count", "upper", "lower", "title", "capitalize", "first", "last",
    "join", "default", "d", "string", "int", "float", "list", "items", "reverse", "replace", "abs",
    "safe", "selectattr", "rejectattr", "map", "select", "reject", "unique", "sum", "min", "max",
    "dictsort", "bool", NULL};

enum test_id {
    X_DEFINED, X_UNDEFINED, X_NONE, X_STRING, X_MAPPING, X_ITERABLE, X_SEQUENCE, X_NUMBER, X_INTEGER,
    X_FLOAT, X_BOOLEAN, X_TRUE, X_FALSE, X_ODD, X_EVEN, X_DIVISIBLEBY, X_EQ, X_EQUALTO, X_EQ2, X_NE,
    X_NE2, X_LT, X_LESSTHAN, X_LT2, X_LE, X_LE2, X_GT, X_GREATERTHAN, X_GT2, X_GE, X_GE2, X_IN,
    X_SAMEAS, X_CALLABLE, X_LOWER, X_UPPER,
};
static const char *const test_names[] = {
    "defined", "undefined", "none", "string", "mapping", "iterable", "sequence", "number", "integer",
    "float", "boolean", "true", "false", "odd", "even", "divisibleby", "eq", "equalto", "==", "ne",
    "!=", "lt", "lessthan", "<", "le", "<=", "gt", "greaterthan", ">", "ge", ">=", "in",
    "sameas", "callable", "lower", "upper", NULL};

int tmpl_filter_id(const char *name) { return name_index(filter_names, name); }
int tmpl_test_id(const char *name) { return name_index(test_names, name); }

/* Evaluated call arguments: positional then keyword. */
typedef struct args {
    value *pos;
    int npos;
    const char **kw_names;
    value *kw;
    int nkw;
    int line;
} args;

static const value *arg_get(const args *a, int index, const char *name)
{
    if (index >= 0 && index < a->npos)
        return &a->pos[index];
    for (int k = 0; name && k < a->nkw; k++)
        if (!strcmp(a->kw_names[k], name))
            return &a->kw[k];
    return NULL;
}

static bool want_str(render *r, int line, const value *v, const char *what)
{
    if (v && v->type == V_STR)
        return true;
    return rfail(r, line, "%s must be a string, not %s", what, v ? type_name(v) : "missing");
}

/* Python whitespace at s[i..]: its byte length, or 0. */
static size_t space_at(const char *s, size_t n, size_t i)
{
    unsigned char c = (unsigned char)s[i];
    if (c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f))
        return 1;
    if (c < 0x80)
        return 0;
    utf8proc_int32_t cp;
    utf8proc_ssize_t len = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
    if (len <= 0)
        return 0;
    if (cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
        cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000)
        return (size_t)len;
    return 0;
}

/* Length of the code point before byte end. */
static size_t cp_before(const char *s, size_t end)
{
    size_t i = end - 1;
    while (i > 0 && ((unsigned char)s[i] & 0xC0) == 0x80)
        i--;
    return end - i;
}

static bool in_chars(const char *chars, size_t nchars, const char *c, size_t clen)
{
    for (size_t i = 0; i + clen <= nchars;) {
        size_t l = 1;
        while (i + l < nchars && ((unsigned char)chars[i + l] & 0xC0) == 0x80)
            l++;
        if (l == clen && memcmp(chars + i, c, clen) == 0)
            return true;
        i += l;
    }
    return false;
}

/* strip/lstrip/rstrip with chars (NULL: whitespace). */
static bool do_strip(render *r, const value *s, const value *chars, bool left, bool right, value *out)
{
    const char *p = s->u.str.s;
    size_t n = s->u.str.len, from = 0, to = n;
    bool ws = !chars || chars->type == V_NONE;
    while (left && from < to) {
        size_t l;
        if (ws)
            l = space_at(p, n, from);
        else {
            l = 1;
            while (from + l < to && ((unsigned char)p[from + l] & 0xC0) == 0x80)
                l++;
            if (!in_chars(chars->u.str.s, chars->u.str.len, p + from, l))
                l = 0;
        }
        if (!l)
            break;
        from += l;
    }
    while (right && to > from) {
        size_t l = cp_before(p, to);
        bool hit = ws ? space_at(p, n, to - l) == l : in_chars(chars->u.str.s, chars->u.str.len, p + to - l, l);
        if (!hit)
            break;
        to -= l;
    }
    return substr_value(r, s, from, to, out);
}

/* Maps each code point through f (upper/lower/title casing). mode: 0 upper, 1 lower,
 * 2 Python str.title, 3 capitalize, 4 Jinja's title filter. */
static bool do_case(render *r, const value *s, int mode, value *out)
{
    const utf8proc_uint8_t *p = (const utf8proc_uint8_t *)s->u.str.s;
    size_t n = s->u.str.len;
    char *d = ralloc(r, n * 2 + 8); /* case mapping grows a code point by at most 1 byte here */
    if (!d)
        return false;
    size_t o = 0;
    bool prev_cased = false, first = true;
    for (size_t i = 0; i < n;) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t len = utf8proc_iterate(p + i, (utf8proc_ssize_t)(n - i), &cp);
        if (len <= 0) {
            d[o++] = (char)p[i++];
            continue;
        }
        utf8proc_int32_t mapped = cp;
        bool letter = utf8proc_islower(cp) || utf8proc_isupper(cp) ||
                      utf8proc_category(cp) == UTF8PROC_CATEGORY_LT;
        switch (mode) {
        case 0: mapped = utf8proc_toupper(cp); break;
        case 1: mapped = utf8proc_tolower(cp); break;
        case 2: mapped = prev_cased ? utf8proc_tolower(cp) : utf8proc_totitle(cp); break;
        case 3: mapped = first ? utf8proc_totitle(cp) : utf8proc_tolower(cp); break;
        case 4: {
            /* Jinja: words begin after runs of '-', whitespace, ( { [ < */
            bool sep = cp == '-' || cp == '(' || cp == '{' || cp == '[' || cp == '<' || space_at((const char *)p, n, i);
            mapped = prev_cased ? utf8proc_tolower(cp) : utf8proc_toupper(cp);
            prev_cased = !sep;
            break;
        }
        }
        if (mode == 2)
            prev_cased = letter;
        first = false;
        utf8proc_uint8_t enc[4];
        utf8proc_ssize_t el = utf8proc_encode_char(mapped, enc);
        memcpy(d + o, enc, (size_t)el);
        o += (size_t)el;
        i += (size_t)len;
    }
    *out = mk_str(d, o, s->prov == P_LIT ? P_LIT : P_DATA);
    return true;
}

static bool do_split(render *r, int line, const value *s, const value *sep, const value *maxsplit, bool from_right,
                     value *out)
{
    int64_t max = maxsplit && maxsplit->type == V_INT ? maxsplit->u.i : -1;
    vlist *l = new_list(r, 0);
    if (!l)
        return false;
    const char *p = s->u.str.s;
    size_t n = s->u.str.len;
    if (sep && sep->type != V_NONE) {
        if (!want_str(r, line, sep, "split: the separator"))
            return false;
        size_t sl = sep->u.str.len;
        if (sl == 0)
            return rfail(r, line, "split: empty separator");
        /* pieces as (from, to) offsets */
        size_t *cuts = ralloc(r, (n / sl + 2) * sizeof *cuts);
        if (!cuts)
            return false;
        size_t nc = 0;
        if (!from_right) {
            for (size_t i = 0; i + sl <= n && (max < 0 || (int64_t)nc < max);) {
                const char *hit = memmem(p + i, n - i, sep->u.str.s, sl);
                if (!hit)
                    break;
                cuts[nc++] = (size_t)(hit - p);
                i = (size_t)(hit - p) + sl;
            }
        } else {
            size_t end = n;
            size_t tmp_n = 0;
            while (end >= sl && (max < 0 || (int64_t)tmp_n < max)) {
                size_t found = (size_t)-1;
                for (size_t i = end - sl + 1; i-- > 0;)
                    if (memcmp(p + i, sep->u.str.s, sl) == 0) {
                        found = i;
                        break;
                    }
                if (found == (size_t)-1)
                    break;
                cuts[tmp_n++] = found;
                end = found;
            }
            for (size_t i = 0; i < tmp_n / 2; i++) { /* ascending order */
                size_t t = cuts[i];
                cuts[i] = cuts[tmp_n - 1 - i];
                cuts[tmp_n - 1 - i] = t;
            }
            nc = tmp_n;
        }
        size_t from = 0;
        for (size_t k = 0; k <= nc; k++) {
            size_t to = k < nc ? cuts[k] : n;
            value piece;
            if (!substr_value(r, s, from, to, &piece) || !list_push(r, l, piece))
                return false;
            from = to + sl;
        }
    } else {
        /* runs of whitespace; empty strings dropped */
        size_t i = 0;
        int64_t done = 0;
        while (i < n) {
            size_t w;
            while (i < n && (w = space_at(p, n, i)))
                i += w;
            if (i >= n)
                break;
            size_t start = i, end;
            if (max >= 0 && done >= max) {
                end = n;
                while (end > start && (w = space_at(p, n, end - cp_before(p, end))) == cp_before(p, end))
                    end -= w;
                i = n;
            } else {
                while (i < n && !space_at(p, n, i))
                    i += 1;
                end = i;
            }
            value piece;
            if (!substr_value(r, s, start, end, &piece) || !list_push(r, l, piece))
                return false;
            done++;
        }
    }
    *out = mk_list(l);
    return step(r, l->len);
}

static bool do_replace(render *r, int line, const value *s, const value *old, const value *new_s, const value *count,
                       value *out)
{
    if (!want_str(r, line, old, "replace: old") || !want_str(r, line, new_s, "replace: new"))
        return false;
    int64_t max = count && count->type == V_INT ? count->u.i : -1;
    sbuild b = {0};
    const char *p = s->u.str.s;
    size_t n = s->u.str.len, ol = old->u.str.len, i = 0;
    int prov = derived(s->prov, derived(old->prov, new_s->prov));
    int64_t done = 0;
    if (ol == 0) { /* Python inserts new between every character and at both ends */
        while (max < 0 || done < max) {
            if (!sb_put(r, &b, new_s->u.str.s, new_s->u.str.len, prov, NULL))
                return false;
            done++;
            if (i >= n)
                break;
            size_t l = 1;
            while (i + l < n && ((unsigned char)p[i + l] & 0xC0) == 0x80)
                l++;
            if (!sb_put(r, &b, p + i, l, prov, NULL))
                return false;
            i += l;
        }
    } else {
        while (i <= n && (max < 0 || done < max)) {
            const char *hit = memmem(p + i, n - i, old->u.str.s, ol);
            if (!hit)
                break;
            size_t at = (size_t)(hit - p);
            if (!sb_put(r, &b, p + i, at - i, prov, NULL) ||
                !sb_put(r, &b, new_s->u.str.s, new_s->u.str.len, prov, NULL))
                return false;
            i = at + ol;
            done++;
        }
    }
    if (!sb_put(r, &b, p + i, n - i, prov, NULL))
        return false;
    *out = mk_str(b.data ? b.data : "", b.len, prov);
    return true;
}

static bool join_values(render *r, int line, const vlist *l, const value *sep, const char *attribute, value *out);
static bool get_attr(render *r, int line, const value *obj, const char *name, value *out);

static bool call_method(render *r, int line, const value *self, int id, const args *a, value *out)
{
    const value *a0 = arg_get(a, 0, NULL), *a1 = arg_get(a, 1, NULL), *a2 = arg_get(a, 2, NULL);
    if (id < M_STR_END) {
        switch (id) {
        case M_STARTSWITH:
        case M_ENDSWITH: {
            if (!a0)
                return rfail(r, line, "%s() takes at least 1 argument", str_methods[id]);
            const vlist *options = NULL;
            vlist single = {.items = (value *)a0, .len = 1};
            if (a0->type == V_LIST && a0->tuple)
                options = a0->u.list;
            else if (!want_str(r, line, a0, str_methods[id]))
                return false;
            else
                options = &single;
            bool hit = false;
            for (size_t k = 0; k < options->len && !hit; k++) {
                const value *o = &options->items[k];
                if (!want_str(r, line, o, str_methods[id]))
                    return false;
                size_t ol = o->u.str.len, sl = self->u.str.len;
                if (ol <= sl)
                    hit = memcmp(self->u.str.s + (id == M_STARTSWITH ? 0 : sl - ol), o->u.str.s, ol) == 0;
            }
            *out = mk_bool(hit);
            return true;
        }
        case M_SPLIT: return do_split(r, line, self, arg_get(a, 0, "sep"), arg_get(a, 1, "maxsplit"), false, out);
        case M_RSPLIT: return do_split(r, line, self, arg_get(a, 0, "sep"), arg_get(a, 1, "maxsplit"), true, out);
        case M_STRIP:
        case M_LSTRIP:
        case M_RSTRIP:
            if (a0 && a0->type != V_NONE && !want_str(r, line, a0, "strip: chars"))
                return false;
            return do_strip(r, self, a0, id != M_RSTRIP, id != M_LSTRIP, out);
        case M_REPLACE: return do_replace(r, line, self, a0, a1, a2, out);
        case M_TITLE: return do_case(r, self, 2, out);
        case M_UPPER: return do_case(r, self, 0, out);
        case M_LOWER: return do_case(r, self, 1, out);
        case M_CAPITALIZE: return do_case(r, self, 3, out);
        case M_JOIN: {
            const vlist *l;
            if (!a0 || !iterate(r, line, a0, &l))
                return a0 ? false : rfail(r, line, "join() takes exactly one argument");
            for (size_t k = 0; k < l->len; k++)
                if (l->items[k].type != V_STR)
                    return rfail(r, line, "join: sequence item %zu: expected str, found %s", k, type_name(&l->items[k]));
            return join_values(r, line, l, self, NULL, out);
        }
        case M_FIND:
        case M_COUNT: {
            if (!want_str(r, line, a0, str_methods[id]))
                return false;
            const char *p = self->u.str.s;
            size_t n = self->u.str.len, sl = a0->u.str.len;
            if (id == M_FIND) {
                const char *hit = memmem(p, n, a0->u.str.s, sl);
                *out = mk_int(hit ? (int64_t)cp_len(p, (size_t)(hit - p)) : -1);
                return true;
            }
            int64_t count = 0;
            if (sl == 0)
                count = (int64_t)cp_len(p, n) + 1;
            else
                for (size_t i = 0; i + sl <= n;) {
                    const char *hit = memmem(p + i, n - i, a0->u.str.s, sl);
                    if (!hit)
                        break;
                    count++;
                    i = (size_t)(hit - p) + sl;
                }
            *out = mk_int(count);
            return true;
        }
        case M_ISDIGIT:
        case M_ISSPACE: {
            bool all = self->u.str.len > 0;
            for (size_t i = 0; i < self->u.str.len && all;) {
                if (id == M_ISSPACE) {
                    size_t w = space_at(self->u.str.s, self->u.str.len, i);
                    all = w > 0;
                    i += w ? w : 1;
                } else {
                    all = self->u.str.s[i] >= '0' && self->u.str.s[i] <= '9';
                    i++;
                }
            }
            *out = mk_bool(all);
            return true;
        }
        case M_SPLITLINES: {
            vlist *l = new_list(r, 0);
            if (!l)
                return false;
            const char *p = self->u.str.s;
            size_t n = self->u.str.len, start = 0;
            for (size_t i = 0; i < n; i++) {
                if (p[i] != '\n' && p[i] != '\r')
                    continue;
                value piece;
                if (!substr_value(r, self, start, i, &piece) || !list_push(r, l, piece))
                    return false;
                if (p[i] == '\r' && i + 1 < n && p[i + 1] == '\n')
                    i++;
                start = i + 1;
            }
            if (start < n) {
                value piece;
                if (!substr_value(r, self, start, n, &piece) || !list_push(r, l, piece))
                    return false;
            }
            *out = mk_list(l);
            return true;
        }
        }
    }
    if (id < M_DICT_END) {
        if (id == M_GET) {
            if (!a0)
                return rfail(r, line, "get() takes at least 1 argument");
            if (a0->type != V_STR || !dict_get(self, a0->u.str.s, a0->u.str.len, out))
                *out = a1 ? *a1 : mk_none();
            return true;
        }
        const vlist *keys;
        if (!iterate(r, line, self, &keys))
            return false;
        vlist *l = new_list(r, keys->len);
        if (!l)
            return false;
        for (size_t k = 0; k < keys->len; k++) {
            value v;
            dict_get(self, keys->items[k].u.str.s, keys->items[k].u.str.len, &v);
            if (self->type == V_DICT)
                v = self->u.dict->vals[k];
            if (id == M_KEYS) {
                l->items[l->len++] = keys->items[k];
            } else if (id == M_VALUES) {
                l->items[l->len++] = v;
            } else {
                vlist *pair = new_list(r, 2);
                if (!pair)
                    return false;
                pair->items[0] = self->type == V_DICT ? self->u.dict->keys[k] : keys->items[k];
                pair->items[1] = v;
                pair->len = 2;
                value t = mk_list(pair);
                t.tuple = 1;
                l->items[l->len++] = t;
            }
        }
        *out = mk_list(l);
        return step(r, l->len);
    }
    /* loop.cycle(a, b, ...) */
    if (a->npos == 0)
        return rfail(r, line, "loop.cycle() needs at least one argument");
    *out = a->pos[self->u.loop->index0 % (size_t)a->npos];
    return true;
}

static bool get_attr(render *r, int line, const value *obj, const char *name, value *out)
{
    int m;
    switch (obj->type) {
    case V_UNDEF:
        if (obj->u.str.s)
            return rfail(r, line, "'%s' is undefined", obj->u.str.s);
        return rfail(r, line, "undefined value has no attribute '%s'", name);
    case V_STR:
        if ((m = name_index(str_methods, name)) >= 0)
            goto method;
        break;
    case V_DICT:
    case V_JSON:
        if (obj->type == V_DICT || cJSON_IsObject(obj->u.json)) {
            if ((m = name_index(dict_methods, name)) >= 0) {
                m += M_STR_END;
                goto method;
            }
            if (dict_get(obj, name, strlen(name), out))
                return true;
        }
        break;
    case V_NS:
        if (dict_get(obj, name, strlen(name), out))
            return true;
        break;
    case V_LOOP: {
        const loopinfo *l = obj->u.loop;
        if (!strcmp(name, "index"))
            *out = mk_int((int64_t)l->index0 + 1);
        else if (!strcmp(name, "index0"))
            *out = mk_int((int64_t)l->index0);
        else if (!strcmp(name, "first"))
            *out = mk_bool(l->index0 == 0);
        else if (!strcmp(name, "last"))
            *out = mk_bool(l->index0 + 1 == l->length);
        else if (!strcmp(name, "length"))
            *out = mk_int((int64_t)l->length);
        else if (!strcmp(name, "revindex"))
            *out = mk_int((int64_t)(l->length - l->index0));
        else if (!strcmp(name, "revindex0"))
            *out = mk_int((int64_t)(l->length - l->index0 - 1));
        else if (!strcmp(name, "depth"))
            *out = mk_int(1);
        else if (!strcmp(name, "depth0"))
            *out = mk_int(0);
        else if (!strcmp(name, "previtem"))
            *out = l->index0 > 0 ? l->items->items[l->index0 - 1] : mk_undef("previtem");
        else if (!strcmp(name, "nextitem"))
            *out = l->index0 + 1 < l->length ? l->items->items[l->index0 + 1] : mk_undef("nextitem");
        else if (!strcmp(name, "cycle")) {
            m = M_CYCLE;
            goto method;
        } else
            break;
        return true;
    }
    default:
        break;
    }
    *out = mk_undef(NULL);
    return true;
method : {
    value *self = ralloc(r, sizeof *self);
    if (!self)
        return false;
    *self = *obj;
    value v = {.type = V_METHOD, .id = m};
    v.u.self = self;
    *out = v;
    return true;
}
}

static bool get_item(render *r, int line, const value *obj, const value *key, value *out)
{
    if (obj->type == V_UNDEF)
        return get_attr(r, line, obj, "[]", out);
    if ((is_seq(obj) || obj->type == V_STR) && (key->type == V_INT || key->type == V_BOOL)) {
        int64_t i = num_i(key);
        size_t n = obj->type == V_STR ? cp_len(obj->u.str.s, obj->u.str.len) : seq_len(obj);
        if (i < 0)
            i += (int64_t)n;
        if (i < 0 || (uint64_t)i >= n) {
            *out = mk_undef(NULL);
            return true;
        }
        if (obj->type == V_LIST)
            *out = obj->u.list->items[i];
        else if (obj->type == V_JSON)
            *out = json_value(cJSON_GetArrayItem(obj->u.json, (int)i), obj->prov);
        else {
            size_t from = cp_offset(obj->u.str.s, obj->u.str.len, (size_t)i);
            size_t to = cp_offset(obj->u.str.s, obj->u.str.len, (size_t)i + 1);
            return substr_value(r, obj, from, to, out);
        }
        return true;
    }
    if (is_mapping(obj) || obj->type == V_NS) {
        if (key->type == V_STR && dict_get(obj, key->u.str.s, key->u.str.len, out))
            return true;
        if (obj->type == V_DICT)
            for (size_t k = 0; k < obj->u.dict->len; k++)
                if (py_eq(&obj->u.dict->keys[k], key)) {
                    *out = obj->u.dict->vals[k];
                    return true;
                }
    }
    if (key->type == V_STR) {
        char *name = ralloc(r, key->u.str.len + 1);
        if (!name)
            return false;
        memcpy(name, key->u.str.s, key->u.str.len);
        return get_attr(r, line, obj, name, out);
    }
    *out = mk_undef(NULL);
    return true;
}

/* Python slice semantics (PySlice_AdjustIndices). */
static bool get_slice(render *r, int line, const value *obj, const value *start, const value *stop,
                      const value *stepv, value *out)
{
    int64_t st = 1;
    if (stepv && stepv->type != V_NONE) {
        if (stepv->type != V_INT)
            return rfail(r, line, "slice indices must be integers or None");
        st = stepv->u.i;
        if (st == 0)
            return rfail(r, line, "slice step cannot be zero");
    }
    if ((start && start->type != V_NONE && start->type != V_INT) || (stop && stop->type != V_NONE && stop->type != V_INT))
        return rfail(r, line, "slice indices must be integers or None");
    bool str = obj->type == V_STR;
    if (!str && !is_seq(obj))
        return rfail(r, line, "'%s' object is not subscriptable", type_name(obj));
    int64_t n = (int64_t)(str ? cp_len(obj->u.str.s, obj->u.str.len) : seq_len(obj));
    int64_t lo, hi;
    if (!start || start->type == V_NONE)
        lo = st < 0 ? n - 1 : 0;
    else {
        lo = start->u.i;
        if (lo < 0) {
            lo += n;
            if (lo < 0)
                lo = st < 0 ? -1 : 0;
        } else if (lo >= n)
            lo = st < 0 ? n - 1 : n;
    }
    if (!stop || stop->type == V_NONE)
        hi = st < 0 ? -1 : n;
    else {
        hi = stop->u.i;
        if (hi < 0) {
            hi += n;
            if (hi < 0)
                hi = st < 0 ? -1 : 0;
        } else if (hi >= n)
            hi = st < 0 ? n - 1 : n;
    }
    if (str && st == 1) {
        size_t from = cp_offset(obj->u.str.s, obj->u.str.len, (size_t)lo);
        size_t to = hi > lo ? cp_offset(obj->u.str.s, obj->u.str.len, (size_t)hi) : from;
        return substr_value(r, obj, from, to, out);
    }
    const vlist *items;
    if (!iterate(r, line, obj, &items))
        return false;
    vlist *l = new_list(r, 0);
    if (!l)
        return false;
    for (int64_t i = lo; st > 0 ? i < hi : i > hi; i += st)
        if (!list_push(r, l, items->items[i]))
            return false;
    if (!step(r, l->len))
        return false;
    if (!str) {
        *out = mk_list(l);
        return true;
    }
    sbuild b = {0};
    for (size_t k = 0; k < l->len; k++)
        if (!str_into(r, &b, &l->items[k]))
            return false;
    *out = sb_value(&b);
    if (out->prov == P_MIXED)
        out->prov = P_DATA, out->u.str.mask = NULL;
    return true;
}

static bool join_values(render *r, int line, const vlist *l, const value *sep, const char *attribute, value *out)
{
    sbuild b = {0};
    for (size_t k = 0; k < l->len; k++) {
        value item = l->items[k];
        if (attribute && !get_attr(r, line, &item, attribute, &item))
            return false;
        if (k && sep && !str_into(r, &b, sep))
            return false;
        if (!str_into(r, &b, &item))
            return false;
    }
    *out = sb_value(&b);
    return true;
}

/* ---------------------------------------------------------------- evaluation */

static bool eval(render *r, frame *f, const tmpl_expr *e, value *out);
static bool render_nodes(render *r, frame *f, const tmpl_node *n, sbuild *b, int *flow);
static bool run_test(render *r, frame *f, const tmpl_expr *e, const value *v, bool *res);

static bool eval_args(render *r, frame *f, const tmpl_expr *e, args *a)
{
    memset(a, 0, sizeof *a);
    a->line = e->line;
    if (e->nargs == 0)
        return true;
    a->pos = ralloc(r, (size_t)e->nargs * sizeof *a->pos);
    a->kw = ralloc(r, (size_t)e->nargs * sizeof *a->kw);
    a->kw_names = ralloc(r, (size_t)e->nargs * sizeof *a->kw_names);
    if (!a->pos || !a->kw || !a->kw_names)
        return false;
    for (int k = 0; k < e->nargs; k++) {
        value v;
        if (!eval(r, f, e->args[k], &v))
            return false;
        if (e->arg_names[k]) {
            a->kw_names[a->nkw] = e->arg_names[k];
            a->kw[a->nkw++] = v;
        } else
            a->pos[a->npos++] = v;
    }
    return true;
}

static bool arith(render *r, int line, int op, const value *a, const value *b, value *out)
{
    if (a->type == V_UNDEF || b->type == V_UNDEF) {
        const value *u = a->type == V_UNDEF ? a : b;
        return rfail(r, line, "'%s' is undefined", u->u.str.s ? u->u.str.s : "value");
    }
    if (op == OP_ADD && a->type == V_STR && b->type == V_STR)
        return concat_str(r, a, b, out);
    if (op == OP_ADD && is_seq(a) && is_seq(b)) {
        const vlist *x, *y;
        if (!iterate(r, line, a, &x) || !iterate(r, line, b, &y))
            return false;
        vlist *l = new_list(r, x->len + y->len);
        if (!l)
            return false;
        if (x->len)
            memcpy(l->items, x->items, x->len * sizeof *l->items);
        if (y->len)
            memcpy(l->items + x->len, y->items, y->len * sizeof *l->items);
        l->len = x->len + y->len;
        *out = mk_list(l);
        return step(r, l->len);
    }
    if (op == OP_MUL && ((a->type == V_STR && b->type == V_INT) || (a->type == V_INT && b->type == V_STR))) {
        const value *s = a->type == V_STR ? a : b;
        int64_t times = a->type == V_INT ? a->u.i : b->u.i;
        sbuild sb = {0};
        for (int64_t k = 0; k < times; k++)
            if (!str_into(r, &sb, s))
                return false;
        *out = sb_value(&sb);
        return true;
    }
    if (!is_num(a) || !is_num(b))
        return rfail(r, line, "unsupported operand types for arithmetic: '%s' and '%s'", type_name(a), type_name(b));
    bool fl = a->type == V_FLOAT || b->type == V_FLOAT || op == OP_DIV;
    if (op == OP_POW && !fl && num_i(b) < 0)
        fl = true;
    if (fl) {
        double x = num_f(a), y = num_f(b), z;
        switch (op) {
        case OP_ADD: z = x + y; break;
        case OP_SUB: z = x - y; break;
        case OP_MUL: z = x * y; break;
        case OP_POW: z = pow(x, y); break;
        default:
            if (y == 0.0)
                return rfail(r, line, "division by zero");
            z = op == OP_DIV ? x / y : op == OP_FLOORDIV ? floor(x / y) : x - floor(x / y) * y;
        }
        *out = mk_float(z);
        return true;
    }
    int64_t x = num_i(a), y = num_i(b), z = 0;
    bool overflow = false;
    switch (op) {
    case OP_ADD: overflow = __builtin_add_overflow(x, y, &z); break;
    case OP_SUB: overflow = __builtin_sub_overflow(x, y, &z); break;
    case OP_MUL: overflow = __builtin_mul_overflow(x, y, &z); break;
    case OP_POW:
        z = 1;
        for (int64_t k = 0; k < y && !overflow; k++)
            overflow = __builtin_mul_overflow(z, x, &z);
        break;
    default:
        if (y == 0)
            return rfail(r, line, "integer division or modulo by zero");
        if (x == INT64_MIN && y == -1)
            overflow = true;
        else {
            int64_t q = x / y, m = x % y;
            if (m != 0 && ((m < 0) != (y < 0))) {
                q--;
                m += y;
            }
            z = op == OP_FLOORDIV ? q : m;
        }
    }
    if (overflow)
        return rfail(r, line, "integer overflow");
    *out = mk_int(z);
    return true;
}

static bool contains(render *r, int line, const value *needle, const value *hay, bool *res)
{
    if (hay->type == V_STR) {
        if (needle->type != V_STR)
            return rfail(r, line, "'in <string>' requires string as left operand, not %s", type_name(needle));
        *res = needle->u.str.len == 0 || memmem(hay->u.str.s, hay->u.str.len, needle->u.str.s, needle->u.str.len);
        return true;
    }
    if (is_mapping(hay) || hay->type == V_NS) {
        value tmp;
        *res = needle->type == V_STR && dict_get(hay, needle->u.str.s, needle->u.str.len, &tmp);
        if (!*res && hay->type == V_DICT)
            for (size_t k = 0; k < hay->u.dict->len && !*res; k++)
                *res = py_eq(&hay->u.dict->keys[k], needle);
        return true;
    }
    if (hay->type == V_UNDEF) {
        *res = false;
        return true;
    }
    const vlist *l;
    if (!iterate(r, line, hay, &l))
        return false;
    *res = false;
    for (size_t k = 0; k < l->len && !*res; k++)
        *res = py_eq(&l->items[k], needle);
    return true;
}

static bool call_macro(render *r, int line, const tmpl_node *m, const args *a, value *out)
{
    if (++r->depth > r->lim.max_depth)
        return rlimit(r, "macro calls nested too deeply");
    if (!step(r, 1))
        return false;
    frame *f = new_frame(r, r->root);
    if (!f)
        return false;
    if (a->npos > m->num_params)
        return rfail(r, line, "macro '%s' takes %d arguments, %d given", m->names[0], m->num_params, a->npos);
    for (int k = 0; k < m->num_params; k++) {
        const value *given = arg_get(a, k, m->params[k]);
        value v;
        if (given)
            v = *given;
        else if (m->defaults[k]) {
            if (!eval(r, f, m->defaults[k], &v))
                return false;
        } else
            v = mk_undef(m->params[k]);
        if (!frame_set(r, f, m->params[k], v))
            return false;
    }
    for (int k = 0; k < a->nkw; k++) {
        bool known = false;
        for (int p = 0; p < m->num_params; p++)
            known |= !strcmp(m->params[p], a->kw_names[k]);
        if (!known)
            return rfail(r, line, "macro '%s' takes no keyword argument '%s'", m->names[0], a->kw_names[k]);
    }
    sbuild b = {0};
    int flow = FLOW_NORMAL;
    if (!render_nodes(r, f, m->body, &b, &flow))
        return false;
    r->depth--;
    *out = sb_value(&b);
    return true;
}

static bool call_func(render *r, int line, int id, const args *a, value *out)
{
    switch (id) {
    case FN_RAISE: {
        const value *msg = arg_get(a, 0, NULL);
        value s = mk_lit("");
        if (msg && !to_str(r, msg, &s))
            return false;
        return rfail(r, line, "%.*s", (int)(s.u.str.len > 300 ? 300 : s.u.str.len), s.u.str.s);
    }
    case FN_NAMESPACE:
    case FN_DICT: {
        vdict *d = ralloc(r, sizeof *d);
        if (!d)
            return false;
        const value *init = arg_get(a, 0, NULL);
        if (init) {
            if (!is_mapping(init))
                return rfail(r, line, "%s() takes a mapping or keyword arguments", func_names[id]);
            const vlist *keys;
            if (!iterate(r, line, init, &keys))
                return false;
            for (size_t k = 0; k < keys->len; k++) {
                value v;
                get_item(r, line, init, &keys->items[k], &v);
                if (!dict_set(r, d, keys->items[k], v))
                    return false;
            }
        }
        for (int k = 0; k < a->nkw; k++)
            if (!dict_set(r, d, mk_lit(a->kw_names[k]), a->kw[k]))
                return false;
        value v = {.type = id == FN_NAMESPACE ? V_NS : V_DICT};
        v.u.dict = d;
        *out = v;
        return true;
    }
    case FN_RANGE: {
        int64_t lo = 0, hi, st = 1;
        for (int k = 0; k < a->npos; k++)
            if (a->pos[k].type != V_INT)
                return rfail(r, line, "range() takes integers");
        if (a->npos == 1)
            hi = a->pos[0].u.i;
        else if (a->npos == 2 || a->npos == 3) {
            lo = a->pos[0].u.i;
            hi = a->pos[1].u.i;
            if (a->npos == 3)
                st = a->pos[2].u.i;
        } else
            return rfail(r, line, "range() takes 1 to 3 arguments");
        if (st == 0)
            return rfail(r, line, "range() step must not be zero");
        double count = st > 0 ? ceil(((double)hi - (double)lo) / (double)st) : ceil(((double)lo - (double)hi) / (double)-st);
        if (count < 0)
            count = 0;
        if (!step(r, (uint64_t)fmin(count, 1e18)))
            return false;
        vlist *l = new_list(r, (size_t)count);
        if (!l)
            return false;
        for (int64_t i = lo; st > 0 ? i < hi : i > hi; i += st)
            l->items[l->len++] = mk_int(i);
        *out = mk_list(l);
        return true;
    }
    case FN_STRFTIME: {
        const value *fmt = arg_get(a, 0, NULL);
        if (!want_str(r, line, fmt, "strftime_now: the format"))
            return false;
        char *f = ralloc(r, fmt->u.str.len + 1);
        char *buf = ralloc(r, 512);
        if (!f || !buf)
            return false;
        memcpy(f, fmt->u.str.s, fmt->u.str.len);
        time_t now = time(NULL);
        struct tm tm;
        localtime_r(&now, &tm);
        size_t n = strftime(buf, 512, f, &tm);
        *out = mk_str(buf, n, P_LIT);
        return true;
    }
    }
    return rfail(r, line, "unknown function");
}

static bool apply_filter(render *r, frame *f, const tmpl_expr *e, const value *v, value *out);

static bool eval(render *r, frame *f, const tmpl_expr *e, value *out)
{
    if (r->failed)
        return false;
    value a, b;
    switch (e->kind) {
    case E_STR: *out = mk_str(e->str, e->len, P_LIT); return true;
    case E_INT: *out = mk_int(e->i); return true;
    case E_FLOAT: *out = mk_float(e->f); return true;
    case E_BOOL: *out = mk_bool(e->i != 0); return true;
    case E_NONE: *out = mk_none(); return true;
    case E_NAME: *out = lookup(f, e->str); return true;
    case E_LIST:
    case E_TUPLE: {
        vlist *l = new_list(r, (size_t)e->nargs);
        if (!l)
            return false;
        for (int k = 0; k < e->nargs; k++)
            if (!eval(r, f, e->args[k], &l->items[l->len++]))
                return false;
        *out = mk_list(l);
        out->tuple = e->kind == E_TUPLE;
        return step(r, l->len);
    }
    case E_DICT: {
        vdict *d = ralloc(r, sizeof *d);
        if (!d)
            return false;
        for (int k = 0; k < e->nargs; k++) {
            if (!eval(r, f, e->args[k], &a) || !eval(r, f, e->vals[k], &b) || !dict_set(r, d, a, b))
                return false;
        }
        value v = {.type = V_DICT};
        v.u.dict = d;
        *out = v;
        return true;
    }
    case E_ATTR:
        return eval(r, f, e->a, &a) && get_attr(r, e->line, &a, e->str, out);
    case E_ITEM:
        return eval(r, f, e->a, &a) && eval(r, f, e->b, &b) && get_item(r, e->line, &a, &b, out);
    case E_SLICE: {
        value parts[3];
        const tmpl_expr *pe[3] = {e->b, e->c, e->d};
        if (!eval(r, f, e->a, &a))
            return false;
        for (int k = 0; k < 3; k++) {
            parts[k] = mk_none();
            if (pe[k] && !eval(r, f, pe[k], &parts[k]))
                return false;
        }
        if (a.type == V_UNDEF)
            return get_attr(r, e->line, &a, "[]", out);
        return get_slice(r, e->line, &a, &parts[0], &parts[1], &parts[2], out);
    }
    case E_CALL: {
        args ar;
        if (!eval(r, f, e->a, &a) || !eval_args(r, f, e, &ar))
            return false;
        if (a.type == V_METHOD)
            return call_method(r, e->line, a.u.self, a.id, &ar, out);
        if (a.type == V_FUNC)
            return call_func(r, e->line, a.id, &ar, out);
        if (a.type == V_MACRO)
            return call_macro(r, e->line, a.u.macro, &ar, out);
        if (a.type == V_UNDEF)
            return rfail(r, e->line, "'%s' is undefined", a.u.str.s ? a.u.str.s : "value");
        return rfail(r, e->line, "'%s' object is not callable", type_name(&a));
    }
    case E_FILTER:
        return eval(r, f, e->a, &a) && apply_filter(r, f, e, &a, out);
    case E_TEST: {
        bool res;
        if (!eval(r, f, e->a, &a) || !run_test(r, f, e, &a, &res))
            return false;
        *out = mk_bool(e->i ? !res : res);
        return true;
    }
    case E_NOT:
        if (!eval(r, f, e->a, &a))
            return false;
        *out = mk_bool(!truthy(&a));
        return true;
    case E_NEG:
    case E_POS:
        if (!eval(r, f, e->a, &a))
            return false;
        if (!is_num(&a))
            return rfail(r, e->line, "bad operand type for unary %c: '%s'", e->kind == E_NEG ? '-' : '+', type_name(&a));
        if (e->kind == E_POS)
            *out = a.type == V_BOOL ? mk_int(a.u.b) : a;
        else if (a.type == V_FLOAT)
            *out = mk_float(-a.u.f);
        else if (num_i(&a) == INT64_MIN)
            return rfail(r, e->line, "integer overflow");
        else
            *out = mk_int(-num_i(&a));
        return true;
    case E_AND:
    case E_OR:
        /* Python's and/or return an operand, not a bool */
        if (!eval(r, f, e->a, &a))
            return false;
        if (truthy(&a) == (e->kind == E_OR)) {
            *out = a;
            return true;
        }
        return eval(r, f, e->b, out);
    case E_COND:
        if (!eval(r, f, e->b, &a))
            return false;
        if (truthy(&a))
            return eval(r, f, e->a, out);
        if (e->c)
            return eval(r, f, e->c, out);
        *out = mk_undef(NULL);
        return true;
    case E_BIN: {
        if (!eval(r, f, e->a, &a) || !eval(r, f, e->b, &b))
            return false;
        int c;
        bool res;
        switch (e->op) {
        case OP_CONCAT: {
            value sa, sb;
            return to_str(r, &a, &sa) && to_str(r, &b, &sb) && concat_str(r, &sa, &sb, out);
        }
        case OP_EQ: *out = mk_bool(py_eq(&a, &b)); return true;
        case OP_NE: *out = mk_bool(!py_eq(&a, &b)); return true;
        case OP_LT: case OP_LE: case OP_GT: case OP_GE:
            if (!py_cmp(r, e->line, &a, &b, &c))
                return false;
            *out = mk_bool(e->op == OP_LT ? c < 0 : e->op == OP_LE ? c <= 0 : e->op == OP_GT ? c > 0 : c >= 0);
            return true;
        case OP_IN:
        case OP_NOTIN:
            if (!contains(r, e->line, &a, &b, &res))
                return false;
            *out = mk_bool(e->op == OP_IN ? res : !res);
            return true;
        default:
            return arith(r, e->line, e->op, &a, &b, out);
        }
    }
    }
    return rfail(r, e->line, "unsupported expression");
}

static bool run_test(render *r, frame *f, const tmpl_expr *e, const value *v, bool *res)
{
    args a;
    if (!eval_args(r, f, e, &a))
        return false;
    const value *a0 = arg_get(&a, 0, NULL);
    int c;
    switch (e->op) {
    case X_DEFINED: *res = v->type != V_UNDEF; return true;
    case X_UNDEFINED: *res = v->type == V_UNDEF; return true;
    case X_NONE: *res = v->type == V_NONE; return true;
    case X_STRING: *res = v->type == V_STR; return true;
    case X_MAPPING: *res = is_mapping(v); return true;
    case X_ITERABLE:
        *res = v->type == V_STR || is_seq(v) || is_mapping(v) || v->type == V_UNDEF;
        return true;
    case X_SEQUENCE: *res = v->type == V_STR || is_seq(v) || is_mapping(v) || v->type == V_UNDEF; return true;
    case X_NUMBER: *res = is_num(v); return true;
    case X_INTEGER: *res = v->type == V_INT; return true;
    case X_FLOAT: *res = v->type == V_FLOAT; return true;
    case X_BOOLEAN: *res = v->type == V_BOOL; return true;
    case X_TRUE: *res = v->type == V_BOOL && v->u.b; return true;
    case X_FALSE: *res = v->type == V_BOOL && !v->u.b; return true;
    case X_CALLABLE: *res = v->type == V_METHOD || v->type == V_FUNC || v->type == V_MACRO; return true;
    case X_ODD:
    case X_EVEN:
    case X_DIVISIBLEBY: {
        if (!is_num(v) || v->type == V_FLOAT)
            return rfail(r, e->line, "test '%s' needs an integer", e->str);
        int64_t x = num_i(v), d = e->op == X_DIVISIBLEBY ? (a0 && a0->type == V_INT ? a0->u.i : 0) : 2;
        if (d == 0)
            return rfail(r, e->line, "divisibleby needs a non-zero integer");
        bool even = x % d == 0;
        *res = e->op == X_ODD ? !even : even;
        return true;
    }
    case X_LOWER:
    case X_UPPER: {
        value s, m;
        if (!to_str(r, v, &s) || !do_case(r, &s, e->op == X_LOWER ? 1 : 0, &m))
            return false;
        bool cased = false;
        for (size_t i = 0; i < s.u.str.len; i++)
            cased |= isalpha((unsigned char)s.u.str.s[i]) != 0;
        *res = cased && py_eq(&s, &m);
        return true;
    }
    default:
        break;
    }
    if (!a0)
        return rfail(r, e->line, "test '%s' needs an argument", e->str);
    switch (e->op) {
    case X_EQ: case X_EQUALTO: case X_EQ2: *res = py_eq(v, a0); return true;
    case X_NE: case X_NE2: *res = !py_eq(v, a0); return true;
    case X_SAMEAS:
        *res = v->type == a0->type && (v->type == V_NONE || v->type == V_UNDEF || py_eq(v, a0)) &&
               (v->type != V_STR || v->u.str.s == a0->u.str.s);
        return true;
    case X_IN: return contains(r, e->line, v, a0, res);
    default:
        if (!py_cmp(r, e->line, v, a0, &c))
            return false;
        switch (e->op) {
        case X_LT: case X_LESSTHAN: case X_LT2: *res = c < 0; break;
        case X_LE: case X_LE2: *res = c <= 0; break;
        case X_GT: case X_GREATERTHAN: case X_GT2: *res = c > 0; break;
        default: *res = c >= 0;
        }
        return true;
    }
}

/* select/reject/selectattr/rejectattr: the test named by a string argument. */
static bool filter_by_test(render *r, frame *f, const tmpl_expr *e, const vlist *l, const args *a, bool by_attr,
                           bool keep, value *out)
{
    int first_test_arg = by_attr ? 1 : 0;
    const char *attr = NULL;
    if (by_attr) {
        const value *av = arg_get(a, 0, NULL);
        if (!want_str(r, e->line, av, "the attribute"))
            return false;
        char *name = ralloc(r, av->u.str.len + 1);
        if (!name)
            return false;
        memcpy(name, av->u.str.s, av->u.str.len);
        attr = name;
    }
    const value *tn = arg_get(a, first_test_arg, NULL);
    int test = -1;
    if (tn) {
        char name[32];
        if (tn->type != V_STR || tn->u.str.len >= sizeof name)
            return rfail(r, e->line, "%s: the test must be a name", e->str);
        memcpy(name, tn->u.str.s, tn->u.str.len);
        name[tn->u.str.len] = '\0';
        if ((test = tmpl_test_id(name)) < 0)
            return rfail(r, e->line, "%s: unknown test '%s'", e->str, name);
    }
    /* a synthetic test expression whose argument (if any) is a constant */
    tmpl_expr tx = {.kind = E_TEST, .line = e->line, .op = test, .str = e->str};
    tmpl_expr argx = {.kind = E_NAME, .line = e->line, .str = "\x01arg"};
    tmpl_expr *argp = &argx;
    const char *no_name = NULL;
    const value *targ = arg_get(a, first_test_arg + 1, NULL);
    frame *tf = new_frame(r, f);
    if (!tf)
        return false;
    if (targ) {
        if (!frame_set(r, tf, "\x01arg", *targ))
            return false;
        tx.args = &argp;
        tx.arg_names = &no_name;
        tx.nargs = 1;
    }
    vlist *res = new_list(r, 0);
    if (!res)
        return false;
    for (size_t k = 0; k < l->len; k++) {
        value item = l->items[k];
        if (attr && item.type != V_UNDEF && !get_attr(r, e->line, &item, attr, &item))
            return false;
        bool ok;
        if (test < 0)
            ok = truthy(&item);
        else if (!run_test(r, tf, &tx, &item, &ok))
            return false;
        if (ok == keep && !list_push(r, res, l->items[k]))
            return false;
    }
    *out = mk_list(res);
    return step(r, l->len);
}

/* tojson's keyword arguments: indent, separators, sort_keys (ensure_ascii is always off). */
static bool tojson_opts(render *r, frame *f, const tmpl_expr *e, json_opts *o)
{
    args a;
    if (!eval_args(r, f, e, &a))
        return false;
    int line = e->line;
    const value *indent = arg_get(&a, 0, "indent"), *sort = arg_get(&a, -1, "sort_keys");
    const value *seps = arg_get(&a, -1, "separators");
    *o = (json_opts){.indent = -1, .item_sep = ", ", .key_sep = ": ", .line = line};
    if (indent && indent->type == V_INT) {
        o->indent = (int)(indent->u.i < 0 ? 0 : indent->u.i > 64 ? 64 : indent->u.i);
        o->item_sep = ",";
    } else if (indent && indent->type != V_NONE)
        return rfail(r, line, "tojson: indent must be an integer");
    if (seps && seps->type != V_NONE) {
        if (!is_seq(seps) || seq_len(seps) != 2)
            return rfail(r, line, "tojson: separators must be a pair of strings");
        const vlist *sl;
        if (!iterate(r, line, seps, &sl))
            return false;
        for (int k = 0; k < 2; k++) {
            if (sl->items[k].type != V_STR)
                return rfail(r, line, "tojson: separators must be a pair of strings");
            char *sep = ralloc(r, sl->items[k].u.str.len + 1);
            if (!sep)
                return false;
            memcpy(sep, sl->items[k].u.str.s, sl->items[k].u.str.len);
            *(k ? &o->key_sep : &o->item_sep) = sep;
        }
    }
    o->sort_keys = sort && truthy(sort);
    return true;
}

static bool apply_filter(render *r, frame *f, const tmpl_expr *e, const value *v, value *out)
{
    if (e->op == F_TOJSON) {
        json_opts o;
        sbuild b = {0};
        if (!tojson_opts(r, f, e, &o) || !json_into(r, &b, v, &o, 0))
            return false;
        *out = mk_str(b.data ? b.data : "", b.len, P_DATA);
        return true;
    }
    args a;
    if (!eval_args(r, f, e, &a))
        return false;
    const value *a0 = arg_get(&a, 0, NULL);
    int line = e->line;
    value s;
    const vlist *l;
    switch (e->op) {
    case F_TRIM:
        if (!to_str(r, v, &s))
            return false;
        if (a0 && a0->type != V_NONE && !want_str(r, line, a0, "trim: chars"))
            return false;
        return do_strip(r, &s, a0, true, true, out);
    case F_LENGTH:
    case F_COUNT:
        if (v->type == V_STR)
            *out = mk_int((int64_t)cp_len(v->u.str.s, v->u.str.len));
        else if (is_seq(v))
            *out = mk_int((int64_t)seq_len(v));
        else if (v->type == V_DICT || v->type == V_NS)
            *out = mk_int((int64_t)v->u.dict->len);
        else if (is_json_obj(v))
            *out = mk_int(cJSON_GetArraySize(v->u.json));
        else if (v->type == V_UNDEF)
            *out = mk_int(0);
        else
            return rfail(r, line, "object of type '%s' has no len()", type_name(v));
        return true;
    case F_UPPER: return to_str(r, v, &s) && do_case(r, &s, 0, out);
    case F_LOWER: return to_str(r, v, &s) && do_case(r, &s, 1, out);
    case F_TITLE: return to_str(r, v, &s) && do_case(r, &s, 4, out);
    case F_CAPITALIZE: return to_str(r, v, &s) && do_case(r, &s, 3, out);
    case F_FIRST:
    case F_LAST:
        if (!iterate(r, line, v, &l))
            return false;
        *out = l->len ? l->items[e->op == F_FIRST ? 0 : l->len - 1] : mk_undef(NULL);
        return true;
    case F_JOIN: {
        const value *sep = arg_get(&a, 0, "d"), *attr = arg_get(&a, 1, "attribute");
        value empty = mk_lit("");
        char *attr_name = NULL;
        if (attr) {
            if (!want_str(r, line, attr, "join: attribute") || !(attr_name = ralloc(r, attr->u.str.len + 1)))
                return false;
            memcpy(attr_name, attr->u.str.s, attr->u.str.len);
        }
        return iterate(r, line, v, &l) && join_values(r, line, l, sep ? sep : &empty, attr_name, out);
    }
    case F_DEFAULT:
    case F_D: {
        const value *boolean = arg_get(&a, 1, "boolean");
        bool use_default = v->type == V_UNDEF || (boolean && truthy(boolean) && !truthy(v));
        *out = use_default ? (a0 ? *a0 : mk_lit("")) : *v;
        return true;
    }
    case F_STRING: return to_str(r, v, out);
    case F_INT:
    case F_FLOAT: {
        double d = 0;
        bool ok = true;
        if (is_num(v))
            d = num_f(v);
        else if (v->type == V_STR) {
            char buf[64];
            size_t n = v->u.str.len < sizeof buf - 1 ? v->u.str.len : sizeof buf - 1;
            memcpy(buf, v->u.str.s, n);
            buf[n] = '\0';
            char *end;
            d = strtod(buf, &end);
            ok = end != buf;
        } else
            ok = false;
        if (!ok) {
            *out = a0 ? *a0 : (e->op == F_INT ? mk_int(0) : mk_float(0.0));
            return true;
        }
        if (e->op == F_INT) {
            if (v->type == V_INT) {
                *out = *v;
                return true;
            }
            if (!(fabs(d) < 9.2e18))
                return rfail(r, line, "int: value out of range");
            *out = mk_int((int64_t)d);
        } else
            *out = mk_float(d);
        return true;
    }
    case F_BOOL: *out = mk_bool(truthy(v)); return true;
    case F_LIST:
        if (!iterate(r, line, v, &l))
            return false;
        *out = mk_list((vlist *)l);
        return true;
    case F_ITEMS:
        if (v->type == V_UNDEF) {
            vlist *empty = new_list(r, 0);
            *out = mk_list(empty);
            return empty != NULL;
        }
        if (!is_mapping(v))
            return rfail(r, line, "items: can only get item pairs from a mapping");
        return call_method(r, line, v, M_ITEMS, &a, out);
    case F_DICTSORT: {
        if (!is_mapping(v))
            return rfail(r, line, "dictsort: needs a mapping");
        value items;
        if (!call_method(r, line, v, M_ITEMS, &a, &items))
            return false;
        vlist *il = items.u.list;
        for (size_t i = 1; i < il->len; i++)
            for (size_t k = i; k > 0; k--) {
                int c;
                if (!py_cmp(r, line, &il->items[k - 1].u.list->items[0], &il->items[k].u.list->items[0], &c))
                    return false;
                if (c <= 0)
                    break;
                value t = il->items[k];
                il->items[k] = il->items[k - 1];
                il->items[k - 1] = t;
            }
        *out = items;
        return true;
    }
    case F_REVERSE:
        if (v->type == V_STR) {
            value neg = mk_int(-1), none = mk_none();
            return get_slice(r, line, v, &none, &none, &neg, out);
        }
        if (!iterate(r, line, v, &l))
            return false;
        {
            vlist *rl = new_list(r, l->len);
            if (!rl)
                return false;
            for (size_t k = 0; k < l->len; k++)
                rl->items[rl->len++] = l->items[l->len - 1 - k];
            *out = mk_list(rl);
        }
        return true;
    case F_REPLACE:
        return to_str(r, v, &s) && do_replace(r, line, &s, a0, arg_get(&a, 1, NULL), arg_get(&a, 2, "count"), out);
    case F_ABS:
        if (!is_num(v))
            return rfail(r, line, "bad operand type for abs(): '%s'", type_name(v));
        if (v->type == V_FLOAT)
            *out = mk_float(fabs(v->u.f));
        else if (num_i(v) == INT64_MIN)
            return rfail(r, line, "integer overflow");
        else
            *out = mk_int(num_i(v) < 0 ? -num_i(v) : num_i(v));
        return true;
    case F_SAFE: *out = *v; return true;
    case F_SELECTATTR:
    case F_REJECTATTR:
    case F_SELECT:
    case F_REJECT:
        return iterate(r, line, v, &l) &&
               filter_by_test(r, f, e, l, &a, e->op == F_SELECTATTR || e->op == F_REJECTATTR,
                              e->op == F_SELECTATTR || e->op == F_SELECT, out);
    case F_MAP: {
        const value *attr = arg_get(&a, -1, "attribute");
        if (!attr || !want_str(r, line, attr, "map: attribute"))
            return attr ? false : rfail(r, line, "map: only map(attribute=...) is supported");
        char *name = ralloc(r, attr->u.str.len + 1);
        if (!name || !iterate(r, line, v, &l))
            return false;
        memcpy(name, attr->u.str.s, attr->u.str.len);
        const value *def = arg_get(&a, -1, "default");
        vlist *ml = new_list(r, l->len);
        if (!ml)
            return false;
        for (size_t k = 0; k < l->len; k++) {
            value item;
            if (!get_attr(r, line, &l->items[k], name, &item))
                return false;
            if (item.type == V_UNDEF && def)
                item = *def;
            ml->items[ml->len++] = item;
        }
        *out = mk_list(ml);
        return true;
    }
    case F_UNIQUE: {
        if (!iterate(r, line, v, &l))
            return false;
        vlist *ul = new_list(r, 0);
        if (!ul)
            return false;
        for (size_t k = 0; k < l->len; k++) {
            bool seen = false;
            for (size_t j = 0; j < ul->len && !seen; j++)
                seen = py_eq(&ul->items[j], &l->items[k]);
            if (!seen && !list_push(r, ul, l->items[k]))
                return false;
        }
        *out = mk_list(ul);
        return step(r, l->len * (ul->len + 1));
    }
    case F_SUM:
    case F_MIN:
    case F_MAX: {
        if (!iterate(r, line, v, &l))
            return false;
        if (e->op == F_SUM) {
            value acc = a0 ? *a0 : mk_int(0);
            for (size_t k = 0; k < l->len; k++)
                if (!arith(r, line, OP_ADD, &acc, &l->items[k], &acc))
                    return false;
            *out = acc;
            return true;
        }
        if (l->len == 0) {
            *out = mk_undef(NULL);
            return true;
        }
        value best = l->items[0];
        for (size_t k = 1; k < l->len; k++) {
            int c;
            if (!py_cmp(r, line, &l->items[k], &best, &c))
                return false;
            if ((e->op == F_MIN && c < 0) || (e->op == F_MAX && c > 0))
                best = l->items[k];
        }
        *out = best;
        return true;
    }
    }
    return rfail(r, line, "unsupported filter '%s'", e->str);
}

/* ---------------------------------------------------------------- statements */

/* Prints an expression. String concatenations ('<|im_start|>' + m.role + '\n' + ...,
 * the bulk of a chat template) go straight to the output piece by piece instead of
 * building each intermediate string: the same bytes, a fraction of the memory. */
static bool emit_expr(render *r, frame *f, const tmpl_expr *e, sbuild *b)
{
    if (e->kind == E_BIN && e->op == OP_CONCAT)
        return emit_expr(r, f, e->a, b) && emit_expr(r, f, e->b, b);
    value v;
    if (e->kind == E_BIN && e->op == OP_ADD) {
        const tmpl_expr *leaves[32];
        int n = 0;
        const tmpl_expr *x = e;
        while (x->kind == E_BIN && x->op == OP_ADD && n < 31) {
            leaves[n++] = x->b;
            x = x->a;
        }
        leaves[n++] = x; /* leaves in reverse order; x may still be a (longer) sum */
        value vals[32];
        bool all_str = true;
        for (int k = n - 1; k >= 0; k--) {
            if (!eval(r, f, leaves[k], &vals[k]))
                return false;
            all_str &= vals[k].type == V_STR;
        }
        if (all_str) {
            for (int k = n - 1; k >= 0; k--)
                if (!str_into(r, b, &vals[k]))
                    return false;
            return true;
        }
        v = vals[n - 1];
        for (int k = n - 2; k >= 0; k--)
            if (!arith(r, e->line, OP_ADD, &v, &vals[k], &v))
                return false;
        return str_into(r, b, &v);
    }
    if (e->kind == E_FILTER && e->op == F_TOJSON) {
        json_opts o;
        return eval(r, f, e->a, &v) && tojson_opts(r, f, e, &o) && json_into(r, b, &v, &o, 0);
    }
    return eval(r, f, e, &v) && str_into(r, b, &v);
}

static bool bind_targets(render *r, int line, frame *f, const tmpl_node *n, const value *item)
{
    if (n->num_names == 1)
        return frame_set(r, f, n->names[0], *item);
    const vlist *parts;
    if (item->type == V_STR || !iterate(r, line, item, &parts))
        return r->failed ? false : rfail(r, line, "cannot unpack a %s into two loop variables", type_name(item));
    if (parts->len != 2)
        return rfail(r, line, "expected 2 values to unpack, got %zu", parts->len);
    return frame_set(r, f, n->names[0], parts->items[0]) && frame_set(r, f, n->names[1], parts->items[1]);
}

static bool render_for(render *r, frame *f, const tmpl_node *n, sbuild *b)
{
    value it;
    const vlist *items;
    if (!eval(r, f, n->expr, &it))
        return false;
    if (it.type != V_UNDEF && !(it.type == V_STR || is_seq(&it) || is_mapping(&it)))
        return rfail(r, n->line, "'%s' object is not iterable", type_name(&it));
    if (!iterate(r, n->line, &it, &items))
        return false;
    if (n->filter) {
        vlist *kept = new_list(r, 0);
        if (!kept)
            return false;
        for (size_t k = 0; k < items->len; k++) {
            frame *tf = new_frame(r, f);
            value ok;
            if (!tf || !bind_targets(r, n->line, tf, n, &items->items[k]) || !eval(r, tf, n->filter, &ok))
                return false;
            if (truthy(&ok) && !list_push(r, kept, items->items[k]))
                return false;
        }
        items = kept;
    }
    if (items->len == 0)
        return !n->else_body || render_nodes(r, f, n->else_body, b, &(int){FLOW_NORMAL});
    loopinfo *li = ralloc(r, sizeof *li);
    if (!li)
        return false;
    li->length = items->len;
    li->items = items;
    value loopv = {.type = V_LOOP};
    loopv.u.loop = li;
    for (size_t k = 0; k < items->len; k++) {
        if (!step(r, 1))
            return false;
        /* a fresh scope every iteration, as Jinja2 */
        frame *lf = new_frame(r, f);
        li->index0 = k;
        if (!lf || !bind_targets(r, n->line, lf, n, &items->items[k]) || !frame_set(r, lf, "loop", loopv))
            return false;
        int flow = FLOW_NORMAL;
        if (!render_nodes(r, lf, n->body, b, &flow))
            return false;
        if (flow == FLOW_BREAK)
            break;
    }
    return true;
}

static bool render_nodes(render *r, frame *f, const tmpl_node *n, sbuild *b, int *flow)
{
    for (; n; n = n->next) {
        value v;
        switch (n->kind) {
        case N_TEXT:
            if (!sb_put(r, b, n->text, n->len, P_LIT, NULL))
                return false;
            break;
        case N_OUTPUT:
            if (!emit_expr(r, f, n->expr, b))
                return false;
            break;
        case N_IF:
            if (n->expr && !eval(r, f, n->expr, &v))
                return false;
            if (!n->expr || truthy(&v)) {
                if (!render_nodes(r, f, n->body, b, flow))
                    return false;
            } else if (n->else_body && !render_nodes(r, f, n->else_body, b, flow))
                return false;
            if (*flow != FLOW_NORMAL)
                return true;
            break;
        case N_FOR:
            if (!render_for(r, f, n, b))
                return false;
            break;
        case N_SET:
            if (!eval(r, f, n->expr, &v))
                return false;
            if (n->attr) {
                value ns = lookup(f, n->names[0]);
                if (ns.type != V_NS)
                    return rfail(r, n->line, "cannot assign attribute '%s' on '%s': not a namespace", n->attr, n->names[0]);
                if (!dict_set(r, ns.u.dict, mk_lit(n->attr), v))
                    return false;
            } else if (!frame_set(r, f, n->names[0], v))
                return false;
            break;
        case N_SET_BLOCK: {
            sbuild cap = {0};
            int inner = FLOW_NORMAL;
            if (!render_nodes(r, f, n->body, &cap, &inner) || !frame_set(r, f, n->names[0], sb_value(&cap)))
                return false;
            break;
        }
        case N_MACRO: {
            value m = {.type = V_MACRO};
            m.u.macro = n;
            if (!frame_set(r, f, n->names[0], m))
                return false;
            break;
        }
        case N_BREAK:
        case N_CONTINUE:
            *flow = n->kind == N_BREAK ? FLOW_BREAK : FLOW_CONTINUE;
            return true;
        }
    }
    return true;
}

/* ---------------------------------------------------------------- API */

kvd_template_limits kvd_template_default_limits(void)
{
    return (kvd_template_limits){.max_steps = 1000000, .max_output = 16u << 20, .max_depth = 64,
                                 .max_memory = 256u << 20};
}

static bool bind_object(render *r, frame *f, const cJSON *obj, int prov)
{
    if (!obj)
        return true;
    if (!cJSON_IsObject(obj))
        return rfail(r, 0, "the template's variables must be a JSON object");
    for (const cJSON *j = obj->child; j; j = j->next)
        if (j->string && !frame_set(r, f, j->string, json_value(j, prov)))
            return false;
    return true;
}

int kvd_template_render(const kvd_template *t, const cJSON *vars, const cJSON *trusted,
                        const kvd_template_limits *limits, kvd_template_output *out, kvd_error *err)
{
    memset(out, 0, sizeof *out);
    render r = {.err = err};
    r.lim = limits ? *limits : kvd_template_default_limits();
    tmpl_arena_init(&r.arena, r.lim.max_memory);
    sbuild b = {.heap = true};
    int flow = FLOW_NORMAL;
    r.root = new_frame(&r, NULL);
    if (r.root && bind_object(&r, r.root, trusted, P_LIT) && bind_object(&r, r.root, vars, P_DATA))
        render_nodes(&r, r.root, t->root, &b, &flow);
    if (!r.failed && !b.data && !sb_grow(&r, &b, 1)) /* an empty output still gets a buffer */
        b.data = NULL;
    if (!r.failed) {
        size_t spans = 0;
        for (size_t i = 0; i < b.len; i++)
            spans += b.mask[i] && (i == 0 || !b.mask[i - 1]);
        out->data_spans = malloc((spans ? spans : 1) * sizeof *out->data_spans);
        if (!out->data_spans) {
            r.failed = kvd_error_set(err, KVD_ENOMEM, "chat template: out of memory");
        } else {
            b.data[b.len] = '\0';
            out->text = b.data;
            out->len = b.len;
            b.data = NULL;
            for (size_t i = 0; i < out->len; i++) {
                if (!b.mask[i])
                    continue;
                if (i == 0 || !b.mask[i - 1])
                    out->data_spans[out->num_data_spans++] = (kvd_template_span){.offset = i, .len = 0};
                out->data_spans[out->num_data_spans - 1].len++;
            }
        }
    }
    free(b.data);
    free(b.mask);
    tmpl_arena_free(&r.arena);
    return r.failed;
}

void kvd_template_output_free(kvd_template_output *out)
{
    if (!out)
        return;
    free(out->text);
    free(out->data_spans);
    memset(out, 0, sizeof *out);
}
