/* regex.c - regular expressions (the Python/ECMAScript subset JSON Schema patterns use)
 * -> grammar rules over code points, written either as raw UTF-8 or as the inside of a
 * JSON string (so '"' must appear as \" and a newline as \n).
 *
 * Where Python's Unicode classes are wider than ASCII (\d, \w and their negations),
 * kvd takes the ASCII class: it may refuse a rare valid string, never accept an
 * invalid one. \s and \S follow Python exactly.
 */
#include <stdlib.h>
#include <string.h>

#include "grammar_internal.h"

typedef struct cp_range {
    uint32_t lo, hi;
} cp_range;

typedef struct cp_set {
    cp_range *r;
    size_t n, cap;
} cp_set;

/* The pattern for a message: at most 80 bytes (it need not end in a NUL). */
#define SRC(x) (int)((x)->end - (x)->src < 80 ? (x)->end - (x)->src : 80), (x)->src

#define LEN_INF UINT64_MAX
static uint64_t len_add(uint64_t a, uint64_t b) { return a == LEN_INF || b == LEN_INF || a + b < a ? LEN_INF : a + b; }
static uint64_t len_mul(uint64_t a, uint32_t n)
{
    if (n == GR_INF) return a == 0 ? 0 : LEN_INF;
    if (a == LEN_INF) return n == 0 ? 0 : LEN_INF;
    return n && a > LEN_INF / n ? LEN_INF : a * n;
}

typedef struct rx {
    gr_builder *b;
    const char *p, *end;
    bool json;
    const char *src;
    /* lengths in code points of the last atom / alternation parsed */
    uint64_t atom_min, atom_max, alt_min, alt_max;
    /* the last atom as one unit repeated rep_min..rep_max times */
    uint64_t unit_min, unit_max;
    uint32_t rep_min, rep_max;
    /* top-level alternatives are cut to texts of clip_min..clip_max code points */
    bool clip, clip_inexact;
    uint64_t clip_min, clip_max;
} rx;

/* One top-level atom of an alternative, for clipping its length (one element each). */
typedef struct rx_atom {
    uint64_t unit_min, unit_max;
    uint32_t rep_min, rep_max;
} rx_atom;

typedef struct rx_atoms {
    rx_atom *a;
    size_t n, cap;
} rx_atoms;

static const cp_range py_space[] = {{0x09, 0x0D}, {0x1C, 0x20}, {0x85, 0x85}, {0xA0, 0xA0}, {0x1680, 0x1680},
                                    {0x2000, 0x200A}, {0x2028, 0x2029}, {0x202F, 0x202F}, {0x205F, 0x205F},
                                    {0x3000, 0x3000}};

static void cs_add(rx *x, cp_set *s, uint32_t lo, uint32_t hi)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 8;
        cp_range *r = realloc(s->r, cap * sizeof *r);
        if (!r) {
            gr_fail(x->b, KVD_ENOMEM, "regex: out of memory");
            return;
        }
        s->r = r;
        s->cap = cap;
    }
    s->r[s->n++] = (cp_range){lo, hi};
}

static int cr_cmp(const void *a, const void *b)
{
    const cp_range *x = a, *y = b;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

static void cs_norm(cp_set *s)
{
    if (!s->n) return;
    qsort(s->r, s->n, sizeof *s->r, cr_cmp);
    size_t k = 0;
    for (size_t i = 1; i < s->n; i++) {
        if (s->r[i].lo <= s->r[k].hi + 1) {
            if (s->r[i].hi > s->r[k].hi) s->r[k].hi = s->r[i].hi;
        } else
            s->r[++k] = s->r[i];
    }
    s->n = k + 1;
}

static void cs_negate(rx *x, cp_set *s)
{
    cs_norm(s);
    cp_set out = {0};
    uint32_t next = 0;
    for (size_t i = 0; i < s->n; i++) {
        if (s->r[i].lo > next) cs_add(x, &out, next, s->r[i].lo - 1);
        next = s->r[i].hi + 1;
    }
    if (next <= 0x10FFFF) cs_add(x, &out, next, 0x10FFFF);
    free(s->r);
    *s = out;
}

/* The escape classes; neg: \D \W \S. */
static void cs_class(rx *x, cp_set *s, char c)
{
    switch (c) {
    case 'd': cs_add(x, s, '0', '9'); break;
    case 'w':
        cs_add(x, s, '0', '9');
        cs_add(x, s, 'A', 'Z');
        cs_add(x, s, 'a', 'z');
        cs_add(x, s, '_', '_');
        break;
    case 's':
        for (size_t i = 0; i < sizeof py_space / sizeof *py_space; i++) cs_add(x, s, py_space[i].lo, py_space[i].hi);
        break;
    case 'D': case 'W': { /* ASCII complement only: never wider than Python's */
        cp_set t = {0};
        cs_class(x, &t, (char)(c - 'A' + 'a'));
        cs_add(x, &t, 0x80, 0x10FFFF);
        cs_negate(x, &t);
        for (size_t i = 0; i < t.n; i++) cs_add(x, s, t.r[i].lo, t.r[i].hi);
        free(t.r);
        break;
    }
    case 'S': {
        cp_set t = {0};
        cs_class(x, &t, 's');
        cs_negate(x, &t);
        for (size_t i = 0; i < t.n; i++) cs_add(x, s, t.r[i].lo, t.r[i].hi);
        free(t.r);
        break;
    }
    }
}

static uint32_t utf8_next(rx *x) { return gr_utf8_next(&x->p, x->end); }

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* After a backslash: a class letter goes into s (returns UINT32_MAX), else the literal
 * code point. in_class: \b is a backspace there. */
static uint32_t parse_escape(rx *x, cp_set *s, bool in_class)
{
    if (x->p >= x->end) {
        gr_fail(x->b, KVD_EINVAL, "regex: trailing backslash in '%.*s'", SRC(x));
        return 0;
    }
    char c = *x->p++;
    switch (c) {
    case 'd': case 'w': case 's': case 'D': case 'W': case 'S':
        cs_class(x, s, c);
        return UINT32_MAX;
    case 'n': return '\n';
    case 't': return '\t';
    case 'r': return '\r';
    case 'f': return '\f';
    case 'v': return '\v';
    case '0': return 0;
    case 'b':
        if (in_class) return '\b';
        break;
    case 'x': case 'u': {
        int n = c == 'x' ? 2 : 4;
        uint32_t v = 0;
        for (int i = 0; i < n; i++) {
            int h = x->p < x->end ? hexval(*x->p) : -1;
            if (h < 0) {
                gr_fail(x->b, KVD_EINVAL, "regex: bad \\%c escape in '%.*s'", c, SRC(x));
                return 0;
            }
            v = v * 16 + (uint32_t)h;
            x->p++;
        }
        return v;
    }
    default:
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '1' && c <= '9')) break;
        x->p--;
        return utf8_next(x);
    }
    gr_fail(x->b, KVD_EUNSUPPORTED, "regex: \\%c is not supported in '%.*s'", c, SRC(x));
    return 0;
}

/* One code point set as a sequence element (appended to seq). */
static void emit_set(rx *x, gr_seq *seq, cp_set *s, uint32_t min, uint32_t max)
{
    gr_builder *b = x->b;
    cs_norm(s);
    bool ascii_plain = true;
    for (size_t i = 0; i < s->n; i++) {
        if (s->r[i].hi >= 0x80) ascii_plain = false;
        if (x->json && (s->r[i].lo < 0x20 || (s->r[i].lo <= '"' && s->r[i].hi >= '"') ||
                        (s->r[i].lo <= '\\' && s->r[i].hi >= '\\')))
            ascii_plain = false;
    }
    if (ascii_plain) {
        gr_bytes set = {{0}};
        for (size_t i = 0; i < s->n; i++) gr_bytes_add_range(&set, s->r[i].lo, s->r[i].hi);
        gr_seq_bytes(b, seq, &set, min, max);
        return;
    }
    uint32_t r = gr_rule_new(b, "class", true);
    gr_bytes plain = {{0}};
    gr_seq q = {0};
    for (size_t i = 0; i < s->n; i++) {
        uint32_t lo = s->r[i].lo, hi = s->r[i].hi;
        for (uint32_t c = lo; c <= hi && c < 0x80; c++) {
            if (x->json && c < 0x20) {
                static const char short_esc[][2] = {{'\n', 'n'}, {'\r', 'r'}, {'\t', 't'}, {'\b', 'b'}, {'\f', 'f'}};
                for (size_t k = 0; k < 5; k++)
                    if (short_esc[k][0] == (char)c) {
                        gr_seq_byte(b, &q, '\\');
                        gr_seq_byte(b, &q, (unsigned char)short_esc[k][1]);
                        gr_rule_add_alt(b, r, &q);
                    }
                gr_seq_lit(b, &q, "\\u00", 4);
                const char *hx = "0123456789abcdef", *HX = "0123456789ABCDEF";
                gr_seq_byte(b, &q, hx[c >> 4]);
                gr_bytes last = {{0}};
                gr_bytes_add(&last, (unsigned char)hx[c & 15]);
                gr_bytes_add(&last, (unsigned char)HX[c & 15]);
                gr_seq_bytes(b, &q, &last, 1, 1);
                gr_rule_add_alt(b, r, &q);
            } else if (x->json && (c == '"' || c == '\\')) {
                gr_seq_byte(b, &q, '\\');
                gr_seq_byte(b, &q, c);
                gr_rule_add_alt(b, r, &q);
            } else {
                gr_bytes_add(&plain, c);
                if (x->json && c == '/') { /* "\/" is a slash too */
                    gr_seq_lit(b, &q, "\\/", 2);
                    gr_rule_add_alt(b, r, &q);
                }
            }
        }
        if (hi >= 0x80) gr_utf8_range(b, r, lo < 0x80 ? 0x80 : lo, hi);
    }
    if (plain.w[0] | plain.w[1]) {
        gr_seq_bytes(b, &q, &plain, 1, 1);
        gr_rule_add_alt(b, r, &q);
    }
    gr_seq_rule(b, seq, r, min, max);
}

static uint32_t parse_alt(rx *x, int depth);

/* An atom into seq: returns false at the end of a sequence ('|', ')', end). */
static bool parse_atom(rx *x, gr_seq *atom, int depth)
{
    gr_builder *b = x->b;
    if (x->p >= x->end || *x->p == '|' || *x->p == ')') return false;
    char c = *x->p;
    cp_set s = {0};
    if (c == '(') {
        x->p++;
        if (x->p < x->end && *x->p == '?') {
            x->p++;
            if (x->p < x->end && *x->p == ':') x->p++;
            else if (x->p + 1 < x->end && x->p[0] == 'P' && x->p[1] == '<') {
                while (x->p < x->end && *x->p != '>') x->p++;
                x->p++;
            } else if (x->p < x->end && *x->p == '<' && x->p + 1 < x->end && x->p[1] != '=' && x->p[1] != '!') {
                while (x->p < x->end && *x->p != '>') x->p++;
                x->p++;
            } else {
                gr_fail(b, KVD_EUNSUPPORTED, "regex: lookaround and inline flags are not supported in '%.*s'", SRC(x));
                return false;
            }
        }
        uint32_t r = parse_alt(x, depth + 1);
        x->atom_min = x->alt_min;
        x->atom_max = x->alt_max;
        if (x->p >= x->end || *x->p != ')') {
            gr_fail(b, KVD_EINVAL, "regex: missing ')' in '%.*s'", SRC(x));
            return false;
        }
        x->p++;
        gr_seq_rule(b, atom, r, 1, 1);
    } else if (c == '[') {
        x->p++;
        bool neg = false;
        if (x->p < x->end && *x->p == '^') neg = true, x->p++;
        bool first = true;
        while (x->p < x->end && (*x->p != ']' || first)) {
            first = false;
            uint32_t lo;
            if (*x->p == '\\') {
                x->p++;
                lo = parse_escape(x, &s, true);
                if (lo == UINT32_MAX) continue;
            } else if (*x->p == '[' && x->p + 1 < x->end && x->p[1] == ':') {
                gr_fail(b, KVD_EUNSUPPORTED, "regex: POSIX classes are not supported in '%.*s'", SRC(x));
                free(s.r);
                return false;
            } else
                lo = utf8_next(x);
            uint32_t hi = lo;
            if (x->p + 1 < x->end && *x->p == '-' && x->p[1] != ']') {
                x->p++;
                if (*x->p == '\\') {
                    x->p++;
                    hi = parse_escape(x, &s, true);
                    if (hi == UINT32_MAX) {
                        gr_fail(b, KVD_EINVAL, "regex: bad range in '%.*s'", SRC(x));
                        free(s.r);
                        return false;
                    }
                } else
                    hi = utf8_next(x);
            }
            if (hi < lo) {
                gr_fail(b, KVD_EINVAL, "regex: bad range in '%.*s'", SRC(x));
                free(s.r);
                return false;
            }
            cs_add(x, &s, lo, hi);
        }
        if (x->p >= x->end) {
            gr_fail(b, KVD_EINVAL, "regex: missing ']' in '%.*s'", SRC(x));
            free(s.r);
            return false;
        }
        x->p++;
        if (neg) cs_negate(x, &s);
    } else if (c == '.') {
        x->p++;
        cs_add(x, &s, 0, '\n' - 1);
        cs_add(x, &s, '\n' + 1, 0x10FFFF);
    } else if (c == '\\') {
        x->p++;
        uint32_t v = parse_escape(x, &s, false);
        if (v != UINT32_MAX) cs_add(x, &s, v, v);
    } else if (c == '^' || c == '$') {
        gr_fail(b, KVD_EUNSUPPORTED, "regex: '%c' inside the pattern is not supported in '%.*s'", c, SRC(x));
        return false;
    } else if (c == '*' || c == '+' || c == '?' || c == '{') {
        if (c == '{' && !(x->p + 1 < x->end && x->p[1] >= '0' && x->p[1] <= '9')) {
            x->p++;
            cs_add(x, &s, '{', '{');
        } else {
            gr_fail(b, KVD_EINVAL, "regex: nothing to repeat in '%.*s'", SRC(x));
            return false;
        }
    } else {
        uint32_t v = utf8_next(x);
        cs_add(x, &s, v, v);
    }
    /* quantifier */
    if (c != '(') x->atom_min = x->atom_max = 1; /* one code point */
    uint32_t min = 1, max = 1;
    if (x->p < x->end) {
        char q = *x->p;
        if (q == '*') min = 0, max = GR_INF, x->p++;
        else if (q == '+') min = 1, max = GR_INF, x->p++;
        else if (q == '?') min = 0, max = 1, x->p++;
        else if (q == '{' && x->p + 1 < x->end && x->p[1] >= '0' && x->p[1] <= '9') {
            const char *save = x->p;
            x->p++;
            char *e;
            unsigned long a = strtoul(x->p, &e, 10), z = a;
            x->p = e;
            if (x->p < x->end && *x->p == ',') {
                x->p++;
                if (x->p < x->end && *x->p == '}') z = GR_INF;
                else {
                    z = strtoul(x->p, &e, 10);
                    x->p = e;
                }
            }
            if (x->p >= x->end || *x->p != '}' || a > 100000 || (z != GR_INF && (z > 100000 || z < a))) {
                x->p = save;
                gr_fail(b, KVD_EUNSUPPORTED, "regex: bad or too large repetition in '%.*s'", SRC(x));
                free(s.r);
                return false;
            }
            x->p++;
            min = (uint32_t)a;
            max = (uint32_t)z;
        }
        if (min != 1 || max != 1) {
            if (x->p < x->end && *x->p == '?') x->p++; /* lazy: same language */
            else if (x->p < x->end && *x->p == '+') {
                gr_fail(b, KVD_EUNSUPPORTED, "regex: possessive repetition is not supported in '%.*s'", SRC(x));
                free(s.r);
                return false;
            }
        }
    }
    x->unit_min = x->atom_min;
    x->unit_max = x->atom_max;
    x->rep_min = min;
    x->rep_max = max;
    x->atom_min = len_mul(x->atom_min, min);
    x->atom_max = len_mul(x->atom_max, max);
    if (c == '(') {
        atom->el[atom->n - 1].min = min;
        atom->el[atom->n - 1].max = max;
    } else
        emit_set(x, atom, &s, min, max);
    free(s.r);
    return !b->failed;
}

static void atoms_push(rx *x, rx_atoms *at, rx_atom a)
{
    if (at->n == at->cap) {
        size_t cap = at->cap ? at->cap * 2 : 8;
        rx_atom *p = realloc(at->a, cap * sizeof *p);
        if (!p) {
            gr_fail(x->b, KVD_ENOMEM, "regex: out of memory");
            return;
        }
        at->a = p;
        at->cap = cap;
    }
    at->a[at->n++] = a;
}

static void any_chars(rx *x, gr_seq *seq, rx_atoms *at)
{
    cp_set s = {0};
    cs_add(x, &s, 0, 0x10FFFF);
    emit_set(x, seq, &s, 0, GR_INF);
    free(s.r);
    atoms_push(x, at, (rx_atom){1, 1, 0, GR_INF});
}

static void atoms_push_last(rx *x, rx_atoms *at)
{
    atoms_push(x, at, (rx_atom){x->unit_min, x->unit_max, x->rep_min, x->rep_max});
}

/* Intersects one top-level alternative (its atoms, one element each) with the lengths
 * x->clip_min..clip_max in code points. Exact when every atom but one has a fixed
 * length and that one repeats a unit of fixed length: its repeat count is narrowed.
 * Returns false when no text of those lengths matches (the alternative is left out);
 * sets x->clip_inexact when the lengths cannot be enforced this way. */
static bool clip_alt(rx *x, gr_seq *seq, const rx_atoms *at)
{
    uint64_t lo = 0, hi = 0, fixed = 0;
    size_t var = SIZE_MAX;
    for (size_t i = 0; i < at->n; i++) {
        lo = len_add(lo, len_mul(at->a[i].unit_min, at->a[i].rep_min));
        hi = len_add(hi, len_mul(at->a[i].unit_max, at->a[i].rep_max));
    }
    if (hi < x->clip_min || lo > x->clip_max) return false;
    if (lo >= x->clip_min && hi <= x->clip_max) return true;
    if (seq->n != at->n) {
        x->clip_inexact = true;
        return true;
    }
    for (size_t i = 0; i < at->n; i++) {
        const rx_atom *a = &at->a[i];
        if (a->unit_min == a->unit_max && (a->rep_min == a->rep_max || a->unit_min == 0))
            fixed = len_add(fixed, len_mul(a->unit_min, a->rep_min));
        else if (var == SIZE_MAX && a->unit_min == a->unit_max && a->unit_min != LEN_INF)
            var = i;
        else {
            x->clip_inexact = true;
            return true;
        }
    }
    if (var == SIZE_MAX || fixed == LEN_INF) { /* cannot happen: lo < hi needs a variable atom */
        x->clip_inexact = true;
        return true;
    }
    uint64_t u = at->a[var].unit_min;
    uint64_t need_lo = x->clip_min > fixed ? (x->clip_min - fixed + u - 1) / u : 0;
    if (x->clip_max != LEN_INF && x->clip_max < fixed) return false;
    uint64_t need_hi = x->clip_max == LEN_INF ? LEN_INF : (x->clip_max - fixed) / u;
    uint64_t rmin = at->a[var].rep_min, rmax = at->a[var].rep_max == GR_INF ? LEN_INF : at->a[var].rep_max;
    if (need_lo > rmin) rmin = need_lo;
    if (need_hi < rmax) rmax = need_hi;
    if (rmin > rmax) return false;
    if (rmin >= GR_INF) { /* beyond what a counter holds */
        x->clip_inexact = true;
        return true;
    }
    seq->el[var].min = (uint32_t)rmin;
    seq->el[var].max = rmax >= GR_INF ? GR_INF : (uint32_t)rmax;
    return true;
}

/* alt ::= seq ('|' seq)*; top level (depth 0) handles ^ and $ per alternative. */
static uint32_t parse_alt(rx *x, int depth)
{
    gr_builder *b = x->b;
    if (depth > 200) {
        gr_fail(b, KVD_EUNSUPPORTED, "regex: groups nest too deeply");
        return 0;
    }
    uint32_t r = gr_rule_new(b, "regex", true);
    uint64_t amin = LEN_INF, amax = 0;
    rx_atoms at = {0};
    for (;;) {
        gr_seq seq = {0};
        uint64_t smin = 0, smax = 0;
        bool head = false, tail = false;
        at.n = 0;
        if (depth == 0 && x->p < x->end && *x->p == '^') head = true, x->p++;
        if (depth == 0 && !head && !x->json) head = true;
        if (depth == 0 && !head) any_chars(x, &seq, &at), smax = LEN_INF;
        for (;;) {
            if (depth == 0 && x->p < x->end && *x->p == '$' && (x->p + 1 == x->end || x->p[1] == '|')) {
                tail = true;
                x->p++;
                break;
            }
            if (!parse_atom(x, &seq, depth)) break;
            if (depth == 0) atoms_push_last(x, &at);
            smin = len_add(smin, x->atom_min);
            smax = len_add(smax, x->atom_max);
        }
        if (b->failed) {
            gr_seq_free(&seq);
            free(at.a);
            return r;
        }
        if (depth == 0 && !tail && x->json) any_chars(x, &seq, &at), smax = LEN_INF;
        amin = smin < amin ? smin : amin;
        amax = smax > amax ? smax : amax;
        if (depth == 0 && x->clip && !clip_alt(x, &seq, &at)) gr_seq_free(&seq);
        else gr_rule_add_alt(b, r, &seq);
        if (x->p < x->end && *x->p == '|') {
            x->p++;
            continue;
        }
        break;
    }
    free(at.a);
    x->alt_min = amin;
    x->alt_max = amax;
    return r;
}

static uint32_t regex_rule(rx *x, bool anchored, uint64_t *min_len, uint64_t *max_len)
{
    gr_builder *b = x->b;
    /* JSON Schema's pattern searches; guided_regex and formats match the whole text */
    bool search = x->json && !anchored;
    uint32_t r;
    if (search) r = parse_alt(x, 0);
    else {
        /* whole-text match: ^ and $ at the ends of an alternative mean nothing more */
        r = gr_rule_new(b, "regex", true);
        rx_atoms at = {0};
        for (;;) {
            gr_seq seq = {0};
            at.n = 0;
            if (x->p < x->end && *x->p == '^') x->p++;
            for (;;) {
                if (x->p < x->end && *x->p == '$' && (x->p + 1 == x->end || x->p[1] == '|')) {
                    x->p++;
                    break;
                }
                if (!parse_atom(x, &seq, 1)) break;
                atoms_push_last(x, &at);
            }
            if (b->failed) {
                gr_seq_free(&seq);
                free(at.a);
                return r;
            }
            if (x->clip && !clip_alt(x, &seq, &at)) gr_seq_free(&seq);
            else gr_rule_add_alt(b, r, &seq);
            if (x->p < x->end && *x->p == '|') {
                x->p++;
                continue;
            }
            break;
        }
        free(at.a);
    }
    if (!b->failed && x->p != x->end) gr_fail(b, KVD_EINVAL, "regex: unbalanced ')' in '%.*s'", SRC(x));
    if (min_len) *min_len = search ? x->alt_min : 0; /* whole-text lengths are not tracked */
    if (max_len) *max_len = search ? x->alt_max : LEN_INF;
    return r;
}

uint32_t gr_regex(gr_builder *b, const char *re, size_t len, bool json_string, bool anchored, uint64_t *min_len,
                  uint64_t *max_len)
{
    rx x = {.b = b, .p = re, .end = re + len, .json = json_string, .src = re, .alt_min = 0, .alt_max = LEN_INF};
    return regex_rule(&x, anchored, min_len, max_len);
}

uint32_t gr_regex_clipped(gr_builder *b, const char *re, size_t len, bool anchored, uint64_t min_len,
                          uint64_t max_len, bool *exact)
{
    rx x = {.b = b, .p = re, .end = re + len, .json = true, .src = re, .alt_min = 0, .alt_max = LEN_INF,
            .clip = true, .clip_min = min_len, .clip_max = max_len};
    uint32_t r = regex_rule(&x, anchored, NULL, NULL);
    *exact = !x.clip_inexact;
    return r;
}

kvd_grammar *kvd_grammar_compile_regex(const kvd_grammar_vocab *v, const char *re, size_t len, kvd_error *err)
{
    gr_builder b;
    gr_builder_init(&b, err);
    uint32_t r = gr_regex(&b, re, len, false, true, NULL, NULL);
    return gr_finish(&b, v, r, err);
}
