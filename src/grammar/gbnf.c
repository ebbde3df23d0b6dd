/* gbnf.c - llama.cpp's GBNF grammar syntax -> grammar rules.
 *
 *   root ::= "{" ws pair ("," ws pair)* "}"      # comments run to the end of line
 *   pair ::= [a-z]+ ":" ( "yes" | "no" )?
 *
 * Literals and [classes] are over code points (written as UTF-8); . is any code point;
 * postfix * + ? {m} {m,} {m,n}. A rule body ends at a newline outside parentheses,
 * as in llama.cpp. Token references (<[id]>, <name>) are not supported.
 */
#include <stdlib.h>
#include <string.h>

#include "grammar_internal.h"

typedef struct gb {
    gr_builder *b;
    const char *p, *end;
    char **names;
    uint32_t *rules;
    uint8_t *defined;
    size_t n, cap;
    int line;
} gb;

static void skip_space(gb *g, bool newlines)
{
    while (g->p < g->end) {
        char c = *g->p;
        if (c == '#') {
            while (g->p < g->end && *g->p != '\n') g->p++;
        } else if (c == ' ' || c == '\t' || c == '\r' || (newlines && c == '\n')) {
            if (c == '\n') g->line++;
            g->p++;
        } else
            break;
    }
}

static bool is_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
}

static uint32_t rule_ref(gb *g, const char *name, size_t len)
{
    for (size_t i = 0; i < g->n; i++)
        if (strlen(g->names[i]) == len && !memcmp(g->names[i], name, len)) return g->rules[i];
    if (g->n == g->cap) {
        size_t cap = g->cap ? g->cap * 2 : 16;
        char **nm = realloc(g->names, cap * sizeof *nm);
        if (nm) g->names = nm;
        uint32_t *r = realloc(g->rules, cap * sizeof *r);
        if (r) g->rules = r;
        uint8_t *d = realloc(g->defined, cap);
        if (d) g->defined = d;
        if (!nm || !r || !d) {
            gr_fail(g->b, KVD_ENOMEM, "gbnf: out of memory");
            return 0;
        }
        g->cap = cap;
    }
    g->names[g->n] = strndup(name, len);
    g->rules[g->n] = gr_rule_new(g->b, g->names[g->n] ? g->names[g->n] : "?", false);
    g->defined[g->n] = 0;
    return g->rules[g->n++];
}

static uint32_t decode_utf8(gb *g) { return gr_utf8_next(&g->p, g->end); }

static uint32_t parse_char(gb *g)
{
    if (*g->p != '\\') return decode_utf8(g);
    g->p++;
    if (g->p >= g->end) return 0;
    char c = *g->p++;
    int n = 0;
    switch (c) {
    case 'n': return '\n';
    case 'r': return '\r';
    case 't': return '\t';
    case 'x': n = 2; break;
    case 'u': n = 4; break;
    case 'U': n = 8; break;
    default: return (unsigned char)c;
    }
    uint32_t v = 0;
    for (int i = 0; i < n && g->p < g->end; i++) {
        char h = *g->p++;
        int d = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
        if (d < 0) {
            gr_fail(g->b, KVD_EINVAL, "gbnf: bad \\%c escape on line %d", c, g->line);
            return 0;
        }
        v = v * 16 + (uint32_t)d;
    }
    return v;
}

static void emit_cp(gb *g, gr_seq *s, uint32_t cp)
{
    char buf[4];
    int n = gr_utf8_encode(cp > 0x10FFFF ? 0xFFFD : cp, buf);
    gr_seq_lit(g->b, s, buf, (size_t)n);
}

static uint32_t parse_alts(gb *g, bool nested, int depth);

/* One item (with its repetition) appended to seq; false at the end of a sequence. */
static bool parse_item(gb *g, gr_seq *seq, bool nested, int depth)
{
    gr_builder *b = g->b;
    skip_space(g, nested);
    if (g->p >= g->end) return false;
    char c = *g->p;
    size_t start = seq->n;
    if (c == '"') {
        g->p++;
        while (g->p < g->end && *g->p != '"') emit_cp(g, seq, parse_char(g));
        if (g->p >= g->end) {
            gr_fail(b, KVD_EINVAL, "gbnf: unterminated string on line %d", g->line);
            return false;
        }
        g->p++;
        if (seq->n > start + 1 || seq->n == start) {
            /* repeat a multi-byte literal as one unit */
            uint32_t r = gr_rule_new(b, "literal", true);
            gr_seq lit = {0};
            for (size_t i = start; i < seq->n; i++) gr_seq_push(b, &lit, seq->el[i]);
            seq->n = start;
            gr_rule_add_alt(b, r, &lit);
            gr_seq_rule(b, seq, r, 1, 1);
        }
    } else if (c == '[' || c == '.') {
        bool neg = false;
        uint32_t r = gr_rule_new(b, "class", true);
        gr_seq q = {0};
        typedef struct {
            uint32_t lo, hi;
        } rng;
        rng rs[256];
        size_t nr = 0;
        if (c == '.') {
            g->p++;
            rs[nr++] = (rng){0, 0x10FFFF};
        } else {
            g->p++;
            if (g->p < g->end && *g->p == '^') neg = true, g->p++;
            while (g->p < g->end && *g->p != ']') {
                uint32_t lo = parse_char(g), hi = lo;
                if (g->p + 1 < g->end && *g->p == '-' && g->p[1] != ']') {
                    g->p++;
                    hi = parse_char(g);
                }
                if (hi < lo || nr == 255) {
                    gr_fail(b, KVD_EINVAL, "gbnf: bad character class on line %d", g->line);
                    return false;
                }
                rs[nr++] = (rng){lo, hi};
            }
            if (g->p >= g->end) {
                gr_fail(b, KVD_EINVAL, "gbnf: unterminated character class on line %d", g->line);
                return false;
            }
            g->p++;
        }
        /* sort and merge, then complement if negated */
        for (size_t i = 1; i < nr; i++)
            for (size_t j = i; j > 0 && rs[j].lo < rs[j - 1].lo; j--) {
                rng t = rs[j];
                rs[j] = rs[j - 1];
                rs[j - 1] = t;
            }
        size_t k = 0;
        for (size_t i = 0; i < nr; i++) {
            if (k && rs[i].lo <= rs[k - 1].hi + 1) {
                if (rs[i].hi > rs[k - 1].hi) rs[k - 1].hi = rs[i].hi;
            } else
                rs[k++] = rs[i];
        }
        nr = k;
        if (neg) {
            rng out[257];
            size_t no = 0;
            uint32_t next = 0;
            for (size_t i = 0; i < nr; i++) {
                if (rs[i].lo > next) out[no++] = (rng){next, rs[i].lo - 1};
                next = rs[i].hi + 1;
            }
            if (next <= 0x10FFFF) out[no++] = (rng){next, 0x10FFFF};
            memcpy(rs, out, no * sizeof *rs);
            nr = no;
        }
        gr_bytes ascii = {{0}};
        for (size_t i = 0; i < nr; i++) {
            if (rs[i].lo < 0x80) gr_bytes_add_range(&ascii, rs[i].lo, rs[i].hi < 0x80 ? rs[i].hi : 0x7F);
            if (rs[i].hi >= 0x80) gr_utf8_range(b, r, rs[i].lo < 0x80 ? 0x80 : rs[i].lo, rs[i].hi);
        }
        if (ascii.w[0] | ascii.w[1]) {
            gr_seq_bytes(b, &q, &ascii, 1, 1);
            gr_rule_add_alt(b, r, &q);
        }
        gr_seq_rule(b, seq, r, 1, 1);
    } else if (c == '(') {
        g->p++;
        uint32_t r = parse_alts(g, true, depth + 1);
        skip_space(g, true);
        if (g->p >= g->end || *g->p != ')') {
            gr_fail(b, KVD_EINVAL, "gbnf: missing ')' on line %d", g->line);
            return false;
        }
        g->p++;
        gr_seq_rule(b, seq, r, 1, 1);
    } else if (is_name_char(c)) {
        const char *s = g->p;
        while (g->p < g->end && is_name_char(*g->p)) g->p++;
        /* the next rule's definition starts here: this sequence is over */
        const char *save = g->p;
        skip_space(g, false);
        if (g->end - g->p >= 3 && !memcmp(g->p, "::=", 3)) {
            g->p = s;
            return false;
        }
        g->p = save;
        gr_seq_rule(b, seq, rule_ref(g, s, (size_t)(g->p - s)), 1, 1);
    } else if (c == '<') {
        gr_fail(b, KVD_EUNSUPPORTED, "gbnf: token references (<...>) are not supported (line %d)", g->line);
        return false;
    } else
        return false;
    /* repetition */
    if (g->p < g->end) {
        uint32_t min = 1, max = 1;
        char q = *g->p;
        if (q == '*') min = 0, max = GR_INF, g->p++;
        else if (q == '+') min = 1, max = GR_INF, g->p++;
        else if (q == '?') min = 0, max = 1, g->p++;
        else if (q == '{') {
            g->p++;
            char *e;
            unsigned long a = strtoul(g->p, &e, 10), z = a;
            if (e == g->p) {
                gr_fail(b, KVD_EINVAL, "gbnf: bad repetition on line %d", g->line);
                return false;
            }
            g->p = e;
            if (g->p < g->end && *g->p == ',') {
                g->p++;
                if (g->p < g->end && *g->p == '}') z = GR_INF;
                else {
                    z = strtoul(g->p, &e, 10);
                    g->p = e;
                }
            }
            if (g->p >= g->end || *g->p != '}' || a > 100000 || (z != GR_INF && (z < a || z > 100000))) {
                gr_fail(b, KVD_EINVAL, "gbnf: bad repetition on line %d", g->line);
                return false;
            }
            g->p++;
            min = (uint32_t)a;
            max = (uint32_t)z;
        }
        if (min != 1 || max != 1) {
            gr_elem *e = &seq->el[seq->n - 1];
            e->min = min;
            e->max = max;
        }
    }
    return true;
}

static uint32_t parse_alts(gb *g, bool nested, int depth)
{
    gr_builder *b = g->b;
    if (depth > 100) {
        gr_fail(b, KVD_EUNSUPPORTED, "gbnf: groups nest too deeply");
        return 0;
    }
    uint32_t r = gr_rule_new(b, "group", false);
    for (;;) {
        gr_seq seq = {0};
        while (!b->failed && parse_item(g, &seq, nested, depth)) {
        }
        if (b->failed) {
            gr_seq_free(&seq);
            return r;
        }
        gr_rule_add_alt(b, r, &seq);
        skip_space(g, nested);
        if (g->p < g->end && *g->p == '|') {
            g->p++;
            skip_space(g, true); /* an alternative may start on the next line */
            continue;
        }
        return r;
    }
}

kvd_grammar *kvd_grammar_compile_gbnf(const kvd_grammar_vocab *v, const char *text, size_t len, kvd_error *err)
{
    gr_builder b;
    gr_builder_init(&b, err);
    gb g = {.b = &b, .p = text, .end = text + len, .line = 1};
    for (;;) {
        skip_space(&g, true);
        if (g.p >= g.end || b.failed) break;
        const char *s = g.p;
        while (g.p < g.end && is_name_char(*g.p)) g.p++;
        if (g.p == s) {
            gr_fail(&b, KVD_EINVAL, "gbnf: expected a rule name on line %d", g.line);
            break;
        }
        size_t nl = (size_t)(g.p - s);
        skip_space(&g, false);
        if (g.end - g.p < 3 || memcmp(g.p, "::=", 3)) {
            gr_fail(&b, KVD_EINVAL, "gbnf: expected '::=' on line %d", g.line);
            break;
        }
        g.p += 3;
        uint32_t r = rule_ref(&g, s, nl);
        size_t idx = 0;
        while (idx < g.n && g.rules[idx] != r) idx++;
        if (idx < g.n && g.defined[idx]) {
            gr_fail(&b, KVD_EINVAL, "gbnf: rule '%.*s' defined twice", (int)nl, s);
            break;
        }
        if (idx < g.n) g.defined[idx] = 1;
        uint32_t body = parse_alts(&g, false, 0);
        gr_seq q = {0};
        gr_seq_rule(&b, &q, body, 1, 1);
        gr_rule_add_alt(&b, r, &q);
    }
    uint32_t root = GR_NONE;
    for (size_t i = 0; i < g.n && !b.failed; i++) {
        if (!g.defined[i]) gr_fail(&b, KVD_EINVAL, "gbnf: rule '%s' is used but not defined", g.names[i]);
        if (!strcmp(g.names[i], "root")) root = g.rules[i];
    }
    if (!b.failed && root == GR_NONE) gr_fail(&b, KVD_EINVAL, "gbnf: no 'root' rule");
    for (size_t i = 0; i < g.n; i++) free(g.names[i]);
    free(g.names);
    free(g.rules);
    free(g.defined);
    return gr_finish(&b, v, root == GR_NONE ? 0 : root, err);
}
