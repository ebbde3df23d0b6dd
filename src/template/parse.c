/* parse.c - arenas, the lexer and the parser of the Jinja subset.
 *
 * The lexer follows Jinja2's (3.x) with Hugging Face's settings: newlines normalised to
 * "\n", one trailing newline dropped (keep_trailing_newline=False), trim_blocks (the
 * first newline after a block or comment tag is removed), lstrip_blocks (spaces and
 * tabs from the start of a line to a block or comment tag are removed, unless "{%+"),
 * and "-" modifiers that strip all whitespace on their side. Operator precedence
 * follows Jinja2's parser: conditional < or < and < not < comparisons < + - < ~ <
 * * / // % < ** < unary - + < postfix (. [] ()) and filters/tests.
 */
#include "tmpl.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- arena */

struct tmpl_arena_chunk {
    tmpl_arena_chunk *next;
    size_t size, used;
    _Alignas(16) unsigned char data[];
};

void tmpl_arena_init(tmpl_arena *a, size_t budget)
{
    a->head = NULL;
    a->used_total = 0;
    a->budget = budget;
    a->over = false;
}

void tmpl_arena_free(tmpl_arena *a)
{
    tmpl_arena_chunk *c = a->head;
    while (c) {
        tmpl_arena_chunk *next = c->next;
        free(c);
        c = next;
    }
    a->head = NULL;
    a->used_total = 0;
}

void *tmpl_alloc_raw(tmpl_arena *a, size_t size)
{
    size = (size + 15) & ~(size_t)15;
    if (size == 0)
        size = 16;
    tmpl_arena_chunk *c = a->head;
    if (!c || c->size - c->used < size) {
        /* chunks grow with the arena (16 KiB first), so a small render stays in one
         * or two and a large one does not make thousands */
        size_t chunk = 16 * 1024;
        while (chunk < a->used_total && chunk < (1u << 20))
            chunk *= 2;
        if (size > chunk / 4)
            chunk = size; /* big blocks get their own chunk, so small ones keep packing */
        if (a->budget && a->used_total + chunk > a->budget) {
            a->over = true;
            return NULL;
        }
        tmpl_arena_chunk *n = malloc(sizeof *n + chunk);
        if (!n)
            return NULL;
        n->size = chunk;
        n->used = 0;
        a->used_total += chunk;
        if (c && chunk == size && c->size - c->used >= 1024) {
            /* keep packing into the current chunk: put the dedicated one behind it */
            n->next = c->next;
            c->next = n;
            n->used = size;
            return n->data;
        }
        n->next = c;
        a->head = n;
        c = n;
    }
    void *p = c->data + c->used;
    c->used += size;
    return p;
}

void *tmpl_alloc(tmpl_arena *a, size_t size)
{
    void *p = tmpl_alloc_raw(a, size);
    if (p)
        memset(p, 0, size);
    return p;
}

/* ---------------------------------------------------------------- lexer */

enum tok_type {
    T_EOF, T_TEXT, T_VAR_BEGIN, T_VAR_END, T_BLOCK_BEGIN, T_BLOCK_END,
    T_NAME, T_STRING, T_INT, T_FLOAT, T_OP,
};

typedef struct token {
    int type;
    int line;
    const char *s; /* T_TEXT/T_NAME/T_STRING (arena, NUL-terminated), T_OP (static) */
    size_t len;
    int64_t i;
    double f;
} token;

typedef struct parser {
    tmpl_arena *arena;
    const char *name;
    kvd_error *err;
    int failed;
    token *toks;
    size_t ntoks, cap, pos;
    int depth;
} parser;

#define MAX_PARSE_DEPTH 200

static int fail(parser *p, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(parser *p, int line, const char *fmt, ...)
{
    if (p->failed)
        return p->failed;
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    p->failed = KVD_EINVAL;
    kvd_error_set(p->err, KVD_EINVAL, "%s%schat template line %d: %s", p->name ? p->name : "",
                  p->name ? ": " : "", line, msg);
    return p->failed;
}

static int oom(parser *p)
{
    if (!p->failed) {
        p->failed = KVD_ENOMEM;
        kvd_error_set(p->err, KVD_ENOMEM, "chat template: out of memory");
    }
    return p->failed;
}

static token *push_tok(parser *p, int type, int line)
{
    if (p->ntoks == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 256;
        token *grown = realloc(p->toks, cap * sizeof *grown);
        if (!grown) {
            oom(p);
            return NULL;
        }
        p->toks = grown;
        p->cap = cap;
    }
    token *t = &p->toks[p->ntoks++];
    memset(t, 0, sizeof *t);
    t->type = type;
    t->line = line;
    return t;
}

static char *arena_strndup(tmpl_arena *a, const char *s, size_t n)
{
    char *d = tmpl_alloc(a, n + 1);
    if (d && n)
        memcpy(d, s, n);
    return d;
}

static bool is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

static int count_lines(const char *s, size_t n)
{
    int lines = 0;
    for (size_t i = 0; i < n; i++)
        lines += s[i] == '\n';
    return lines;
}

static int emit_text(parser *p, const char *s, size_t n, int line)
{
    if (n == 0)
        return 0;
    token *t = push_tok(p, T_TEXT, line);
    if (!t)
        return p->failed;
    t->s = s;
    t->len = n;
    return 0;
}

static void utf8_put(char **o, uint32_t cp)
{
    unsigned char *u = (unsigned char *)*o;
    if (cp < 0x80) {
        *u++ = (unsigned char)cp;
    } else if (cp < 0x800) {
        *u++ = (unsigned char)(0xC0 | (cp >> 6));
        *u++ = (unsigned char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *u++ = (unsigned char)(0xE0 | (cp >> 12));
        *u++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        *u++ = (unsigned char)(0x80 | (cp & 0x3F));
    } else {
        *u++ = (unsigned char)(0xF0 | (cp >> 18));
        *u++ = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        *u++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        *u++ = (unsigned char)(0x80 | (cp & 0x3F));
    }
    *o = (char *)u;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* A string literal at src[*pos] (the quote); Python escapes as Jinja unescapes them. */
static int lex_string(parser *p, const char *src, size_t len, size_t *pos, int *line)
{
    char quote = src[*pos];
    size_t i = *pos + 1;
    int start_line = *line;
    char *buf = tmpl_alloc(p->arena, len - *pos + 1);
    if (!buf)
        return oom(p);
    char *o = buf;
    while (i < len && src[i] != quote) {
        char c = src[i];
        if (c == '\n')
            (*line)++;
        if (c != '\\') {
            *o++ = c;
            i++;
            continue;
        }
        if (i + 1 >= len)
            break;
        char e = src[i + 1];
        i += 2;
        switch (e) {
        case 'n': *o++ = '\n'; break;
        case 't': *o++ = '\t'; break;
        case 'r': *o++ = '\r'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'v': *o++ = '\v'; break;
        case 'a': *o++ = '\a'; break;
        case '0': *o++ = '\0'; break;
        case '\\': *o++ = '\\'; break;
        case '\'': *o++ = '\''; break;
        case '"': *o++ = '"'; break;
        case '\n': (*line)++; break; /* line continuation */
        case 'x': case 'u': case 'U': {
            int digits = e == 'x' ? 2 : e == 'u' ? 4 : 8;
            uint32_t cp = 0;
            for (int k = 0; k < digits; k++) {
                int h = i + (size_t)k < len ? hexval(src[i + (size_t)k]) : -1;
                if (h < 0)
                    return fail(p, *line, "bad \\%c escape in a string literal", e);
                cp = cp * 16 + (uint32_t)h;
            }
            if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
                return fail(p, *line, "escape \\%c names no Unicode character", e);
            i += (size_t)digits;
            utf8_put(&o, cp);
            break;
        }
        default: /* Python keeps unknown escapes as they are */
            *o++ = '\\';
            *o++ = e;
        }
    }
    if (i >= len)
        return fail(p, start_line, "unterminated string literal");
    token *t = push_tok(p, T_STRING, start_line);
    if (!t)
        return p->failed;
    *o = '\0';
    t->s = buf;
    t->len = (size_t)(o - buf);
    *pos = i + 1;
    return 0;
}

static const char *const two_char_ops[] = {"//", "**", "==", "!=", "<=", ">=", NULL};
static const char single_ops[] = "+-*/%~<>=()[]{},.:|";

/* Lexes inside a {{ }} or {% %} tag from *pos; stops after the end delimiter. */
static int lex_tag(parser *p, const char *src, size_t len, size_t *pos, int *line, bool block,
                   bool *strip_after)
{
    const char *end = block ? "%}" : "}}";
    int depth = 0;
    size_t i = *pos;
    while (i < len) {
        char c = src[i];
        if (is_ws(c)) {
            if (c == '\n')
                (*line)++;
            i++;
            continue;
        }
        if (depth == 0) {
            if (c == '-' && i + 2 < len + 0 && strncmp(src + i + 1, end, 2) == 0) {
                *strip_after = true;
                *pos = i + 3;
                return push_tok(p, block ? T_BLOCK_END : T_VAR_END, *line) ? 0 : p->failed;
            }
            if (i + 1 < len && strncmp(src + i, end, 2) == 0) {
                *strip_after = false;
                *pos = i + 2;
                return push_tok(p, block ? T_BLOCK_END : T_VAR_END, *line) ? 0 : p->failed;
            }
        }
        if (c == '\'' || c == '"') {
            int rc = lex_string(p, src, len, &i, line);
            if (rc)
                return rc;
            continue;
        }
        if (isalpha((unsigned char)c) || c == '_') {
            size_t s = i;
            while (i < len && (isalnum((unsigned char)src[i]) || src[i] == '_'))
                i++;
            token *t = push_tok(p, T_NAME, *line);
            if (!t)
                return p->failed;
            t->s = arena_strndup(p->arena, src + s, i - s);
            if (!t->s)
                return oom(p);
            t->len = i - s;
            continue;
        }
        if (isdigit((unsigned char)c)) {
            size_t s = i;
            bool is_float = false;
            while (i < len && (isdigit((unsigned char)src[i]) || src[i] == '_'))
                i++;
            if (i + 1 < len && src[i] == '.' && isdigit((unsigned char)src[i + 1])) {
                is_float = true;
                i++;
                while (i < len && (isdigit((unsigned char)src[i]) || src[i] == '_'))
                    i++;
            }
            if (i < len && (src[i] == 'e' || src[i] == 'E')) {
                size_t k = i + 1;
                if (k < len && (src[k] == '+' || src[k] == '-'))
                    k++;
                if (k < len && isdigit((unsigned char)src[k])) {
                    is_float = true;
                    i = k;
                    while (i < len && isdigit((unsigned char)src[i]))
                        i++;
                }
            }
            char digits[64];
            size_t n = 0;
            for (size_t k = s; k < i && n + 1 < sizeof digits; k++)
                if (src[k] != '_')
                    digits[n++] = src[k];
            digits[n] = '\0';
            token *t = push_tok(p, is_float ? T_FLOAT : T_INT, *line);
            if (!t)
                return p->failed;
            errno = 0;
            if (is_float) {
                t->f = strtod(digits, NULL);
            } else {
                t->i = strtoll(digits, NULL, 10);
                if (errno == ERANGE)
                    return fail(p, *line, "integer literal %s is too large", digits);
            }
            continue;
        }
        const char *op = NULL;
        for (int k = 0; two_char_ops[k]; k++)
            if (i + 1 < len && strncmp(src + i, two_char_ops[k], 2) == 0)
                op = two_char_ops[k];
        if (!op) {
            const char *hit = c ? strchr(single_ops, c) : NULL;
            if (!hit)
                return fail(p, *line, "unexpected character '%c'", c);
            static const char *const singles[] = {"+", "-", "*", "/", "%", "~", "<", ">", "=", "(", ")",
                                                  "[", "]", "{", "}", ",", ".", ":", "|"};
            op = singles[hit - single_ops];
        }
        if (op[0] == '(' || op[0] == '[' || op[0] == '{')
            depth++;
        else if ((op[0] == ')' || op[0] == ']' || op[0] == '}') && depth > 0)
            depth--;
        token *t = push_tok(p, T_OP, *line);
        if (!t)
            return p->failed;
        t->s = op;
        t->len = strlen(op);
        i += t->len;
    }
    return fail(p, *line, "missing '%s'", end);
}

static int lex(parser *p, const char *raw, size_t raw_len)
{
    /* Jinja normalises \r\n and \r to \n and drops one trailing newline. */
    char *src = tmpl_alloc(p->arena, raw_len + 1);
    if (!src)
        return oom(p);
    size_t len = 0;
    for (size_t i = 0; i < raw_len; i++) {
        if (raw[i] == '\r') {
            src[len++] = '\n';
            if (i + 1 < raw_len && raw[i + 1] == '\n')
                i++;
        } else {
            src[len++] = raw[i];
        }
    }
    if (len > 0 && src[len - 1] == '\n')
        len--;
    src[len] = '\0';

    size_t pos = 0;
    int line = 1;
    bool line_starting = true, strip_next = false;
    while (pos < len) {
        size_t start = pos;
        while (start + 1 < len && !(src[start] == '{' && (src[start + 1] == '{' || src[start + 1] == '%' ||
                                                          src[start + 1] == '#')))
            start++;
        if (start + 1 >= len)
            start = len;
        const char *text = src + pos;
        size_t text_len = start - pos;
        if (strip_next) {
            while (text_len && is_ws(*text)) {
                text++;
                text_len--;
            }
        }
        int text_line = line;
        line += count_lines(src + pos, start - pos);
        if (start == len) {
            int rc = emit_text(p, text, text_len, text_line);
            if (rc)
                return rc;
            break;
        }
        char kind = src[start + 1];
        char mod = start + 2 < len ? src[start + 2] : '\0';
        if (mod == '-') {
            while (text_len && is_ws(text[text_len - 1]))
                text_len--;
        } else if (mod != '+' && kind != '{') {
            size_t l_pos = text_len;
            while (l_pos > 0 && text[l_pos - 1] != '\n')
                l_pos--;
            if (l_pos > 0 || line_starting) {
                bool blank = l_pos < text_len;
                for (size_t k = l_pos; k < text_len; k++)
                    if (!is_ws(text[k]))
                        blank = false;
                if (blank)
                    text_len = l_pos;
            }
        }
        int rc = emit_text(p, text, text_len, text_line);
        if (rc)
            return rc;
        pos = start + 2 + (mod == '-' || mod == '+');
        bool strip_after = false;
        if (kind == '#') {
            const char *close = strstr(src + pos, "#}");
            if (!close)
                return fail(p, line, "unterminated comment");
            strip_after = close > src + pos && close[-1] == '-';
            line += count_lines(src + pos, (size_t)(close - (src + pos)));
            pos = (size_t)(close - src) + 2;
        } else if (kind == '%') {
            if (!push_tok(p, T_BLOCK_BEGIN, line))
                return p->failed;
            rc = lex_tag(p, src, len, &pos, &line, true, &strip_after);
            if (rc)
                return rc;
        } else {
            if (!push_tok(p, T_VAR_BEGIN, line))
                return p->failed;
            rc = lex_tag(p, src, len, &pos, &line, false, &strip_after);
            if (rc)
                return rc;
        }
        line_starting = false;
        strip_next = false;
        if (strip_after) {
            /* "-%}" consumes the whitespace after it as part of the tag */
            size_t k = pos;
            while (k < len && is_ws(src[k]))
                k++;
            line_starting = k > pos && src[k - 1] == '\n';
            line += count_lines(src + pos, k - pos);
            pos = k;
        } else if (kind != '{' && pos < len && src[pos] == '\n') {
            pos++; /* trim_blocks */
            line++;
            line_starting = true;
        }
    }
    return push_tok(p, T_EOF, line) ? 0 : p->failed;
}

/* ---------------------------------------------------------------- parser */

static token *cur(parser *p) { return &p->toks[p->pos]; }
static token *peek(parser *p, size_t k)
{
    size_t i = p->pos + k;
    return &p->toks[i < p->ntoks ? i : p->ntoks - 1];
}
static void advance(parser *p)
{
    if (p->toks[p->pos].type != T_EOF)
        p->pos++;
}
static bool is_op(const token *t, const char *op) { return t->type == T_OP && strcmp(t->s, op) == 0; }
static bool is_name(const token *t, const char *name) { return t->type == T_NAME && strcmp(t->s, name) == 0; }

static const char *describe(const token *t)
{
    switch (t->type) {
    case T_EOF: return "end of template";
    case T_TEXT: return "text";
    case T_VAR_BEGIN: return "'{{'";
    case T_VAR_END: return "'}}'";
    case T_BLOCK_BEGIN: return "'{%'";
    case T_BLOCK_END: return "'%}'";
    case T_NAME: return t->s;
    case T_STRING: return "a string";
    case T_INT: case T_FLOAT: return "a number";
    default: return t->s;
    }
}

static bool expect_op(parser *p, const char *op)
{
    if (is_op(cur(p), op)) {
        advance(p);
        return true;
    }
    fail(p, cur(p)->line, "expected '%s', found %s", op, describe(cur(p)));
    return false;
}

static tmpl_expr *new_expr(parser *p, int kind, int line)
{
    tmpl_expr *e = tmpl_alloc(p->arena, sizeof *e);
    if (!e) {
        oom(p);
        return NULL;
    }
    e->kind = kind;
    e->line = line;
    return e;
}

static tmpl_expr *parse_expr(parser *p);
static tmpl_expr *parse_or(parser *p);
static tmpl_expr *parse_unary(parser *p, bool with_filter);
static tmpl_expr *parse_primary(parser *p);
static tmpl_expr *parse_postfix(parser *p, tmpl_expr *e);

/* Growable array of expression pointers in the arena (old copies are left behind). */
typedef struct expr_vec {
    tmpl_expr **items;
    const char **names;
    tmpl_expr **vals;
    int n, cap;
} expr_vec;

static bool vec_push(parser *p, expr_vec *v, tmpl_expr *e, const char *name, tmpl_expr *val)
{
    if (v->n == v->cap) {
        int cap = v->cap ? v->cap * 2 : 4;
        tmpl_expr **items = tmpl_alloc(p->arena, (size_t)cap * sizeof *items);
        const char **names = tmpl_alloc(p->arena, (size_t)cap * sizeof *names);
        tmpl_expr **vals = tmpl_alloc(p->arena, (size_t)cap * sizeof *vals);
        if (!items || !names || !vals) {
            oom(p);
            return false;
        }
        if (v->n) {
            memcpy(items, v->items, (size_t)v->n * sizeof *items);
            memcpy(names, v->names, (size_t)v->n * sizeof *names);
            memcpy(vals, v->vals, (size_t)v->n * sizeof *vals);
        }
        v->items = items;
        v->names = names;
        v->vals = vals;
        v->cap = cap;
    }
    v->items[v->n] = e;
    v->names[v->n] = name;
    v->vals[v->n] = val;
    v->n++;
    return true;
}

/* Arguments after '(' up to and including ')'. */
static bool parse_args(parser *p, tmpl_expr *call)
{
    expr_vec v = {0};
    bool seen_keyword = false;
    while (!is_op(cur(p), ")")) {
        if (v.n > 0 && !expect_op(p, ","))
            return false;
        if (is_op(cur(p), ")"))
            break;
        if (is_op(cur(p), "*") || is_op(cur(p), "**")) {
            fail(p, cur(p)->line, "*args and **kwargs are not supported");
            return false;
        }
        const char *name = NULL;
        if (cur(p)->type == T_NAME && is_op(peek(p, 1), "=")) {
            name = cur(p)->s;
            advance(p);
            advance(p);
            seen_keyword = true;
        } else if (seen_keyword) {
            fail(p, cur(p)->line, "positional argument after a keyword argument");
            return false;
        }
        tmpl_expr *e = parse_expr(p);
        if (!e || !vec_push(p, &v, e, name, NULL))
            return false;
    }
    advance(p);
    call->args = v.items;
    call->arg_names = v.names;
    call->nargs = v.n;
    return true;
}

/* A tuple or a single expression ("a, b" as in set x = a, b and for x in a, b). */
static tmpl_expr *parse_tuple(parser *p, bool with_condexpr)
{
    int line = cur(p)->line;
    tmpl_expr *first = with_condexpr ? parse_expr(p) : parse_or(p);
    if (!first || !is_op(cur(p), ","))
        return first;
    expr_vec v = {0};
    if (!vec_push(p, &v, first, NULL, NULL))
        return NULL;
    while (is_op(cur(p), ",")) {
        advance(p);
        token *t = cur(p);
        if (t->type == T_BLOCK_END || t->type == T_VAR_END || is_op(t, ")") || is_name(t, "if"))
            break;
        tmpl_expr *e = with_condexpr ? parse_expr(p) : parse_or(p);
        if (!e || !vec_push(p, &v, e, NULL, NULL))
            return NULL;
    }
    tmpl_expr *tuple = new_expr(p, E_TUPLE, line);
    if (!tuple)
        return NULL;
    tuple->args = v.items;
    tuple->nargs = v.n;
    return tuple;
}

static tmpl_expr *parse_primary(parser *p)
{
    token *t = cur(p);
    int line = t->line;
    if (++p->depth > MAX_PARSE_DEPTH) {
        fail(p, line, "expression nested too deeply");
        return NULL;
    }
    tmpl_expr *e = NULL;
    if (t->type == T_NAME) {
        const char *n = t->s;
        if (!strcmp(n, "true") || !strcmp(n, "True") || !strcmp(n, "false") || !strcmp(n, "False")) {
            if ((e = new_expr(p, E_BOOL, line)))
                e->i = n[0] == 't' || n[0] == 'T';
        } else if (!strcmp(n, "none") || !strcmp(n, "None")) {
            e = new_expr(p, E_NONE, line);
        } else if ((e = new_expr(p, E_NAME, line))) {
            e->str = n;
            e->len = t->len;
        }
        advance(p);
    } else if (t->type == T_STRING) {
        /* adjacent literals concatenate, as in Python */
        size_t total = 0, k = 0;
        while (peek(p, k)->type == T_STRING)
            total += peek(p, k++)->len;
        char *buf = tmpl_alloc(p->arena, total + 1);
        if (!buf) {
            oom(p);
            return NULL;
        }
        size_t off = 0;
        while (cur(p)->type == T_STRING) {
            memcpy(buf + off, cur(p)->s, cur(p)->len);
            off += cur(p)->len;
            advance(p);
        }
        if ((e = new_expr(p, E_STR, line))) {
            e->str = buf;
            e->len = total;
        }
    } else if (t->type == T_INT) {
        if ((e = new_expr(p, E_INT, line)))
            e->i = t->i;
        advance(p);
    } else if (t->type == T_FLOAT) {
        if ((e = new_expr(p, E_FLOAT, line)))
            e->f = t->f;
        advance(p);
    } else if (is_op(t, "(")) {
        advance(p);
        if (is_op(cur(p), ")")) {
            advance(p);
            e = new_expr(p, E_TUPLE, line);
        } else {
            e = parse_tuple(p, true);
            if (e && !expect_op(p, ")"))
                e = NULL;
        }
    } else if (is_op(t, "[") || is_op(t, "{")) {
        bool dict = is_op(t, "{");
        const char *close = dict ? "}" : "]";
        advance(p);
        expr_vec v = {0};
        while (!p->failed && !is_op(cur(p), close)) {
            if (v.n > 0 && !expect_op(p, ","))
                break;
            if (is_op(cur(p), close))
                break;
            tmpl_expr *item = parse_expr(p);
            tmpl_expr *val = NULL;
            if (item && dict && expect_op(p, ":"))
                val = parse_expr(p);
            if (!item || (dict && !val))
                break;
            vec_push(p, &v, item, NULL, val);
        }
        if (!p->failed && expect_op(p, close) && (e = new_expr(p, dict ? E_DICT : E_LIST, line))) {
            e->args = v.items;
            e->vals = v.vals;
            e->nargs = v.n;
        }
    } else {
        fail(p, line, "unexpected %s", describe(t));
    }
    p->depth--;
    return p->failed ? NULL : e;
}

static tmpl_expr *parse_subscript(parser *p, tmpl_expr *target, int line)
{
    /* after '[' */
    tmpl_expr *parts[3] = {NULL, NULL, NULL};
    int nparts = 1;
    bool slice = false;
    for (;;) {
        if (is_op(cur(p), ":")) {
            slice = true;
            if (nparts == 3) {
                fail(p, line, "a slice has at most three parts");
                return NULL;
            }
            advance(p);
            nparts++;
            continue;
        }
        if (is_op(cur(p), "]"))
            break;
        if (parts[nparts - 1]) {
            fail(p, cur(p)->line, "expected ']', found %s", describe(cur(p)));
            return NULL;
        }
        parts[nparts - 1] = parse_expr(p);
        if (!parts[nparts - 1])
            return NULL;
    }
    advance(p);
    tmpl_expr *e = new_expr(p, slice ? E_SLICE : E_ITEM, line);
    if (!e)
        return NULL;
    e->a = target;
    if (slice) {
        e->b = parts[0];
        e->c = parts[1];
        e->d = parts[2];
    } else {
        if (!parts[0]) {
            fail(p, line, "empty subscript");
            return NULL;
        }
        e->b = parts[0];
    }
    return e;
}

/* callee(args), after the '('. */
static tmpl_expr *parse_call(parser *p, tmpl_expr *callee, int line)
{
    tmpl_expr *c = new_expr(p, E_CALL, line);
    if (!c)
        return NULL;
    c->a = callee;
    return parse_args(p, c) ? c : NULL;
}

static tmpl_expr *parse_postfix(parser *p, tmpl_expr *e)
{
    while (e && !p->failed) {
        token *t = cur(p);
        int line = t->line;
        if (is_op(t, ".")) {
            advance(p);
            token *n = cur(p);
            if (n->type == T_NAME) {
                tmpl_expr *a = new_expr(p, E_ATTR, line);
                if (!a)
                    return NULL;
                a->a = e;
                a->str = n->s;
                a->len = n->len;
                advance(p);
                e = a;
            } else if (n->type == T_INT) {
                tmpl_expr *idx = new_expr(p, E_INT, line);
                tmpl_expr *it = new_expr(p, E_ITEM, line);
                if (!idx || !it)
                    return NULL;
                idx->i = n->i;
                it->a = e;
                it->b = idx;
                advance(p);
                e = it;
            } else {
                fail(p, line, "expected a name after '.', found %s", describe(n));
                return NULL;
            }
        } else if (is_op(t, "[")) {
            advance(p);
            e = parse_subscript(p, e, line);
        } else if (is_op(t, "(")) {
            advance(p);
            if (!(e = parse_call(p, e, line)))
                return NULL;
        } else {
            break;
        }
    }
    return p->failed ? NULL : e;
}

/* A filter or test applied to target: its name, checked against the engine's builtins
 * now, so an unknown one fails when the template loads. */
static tmpl_expr *builtin_node(parser *p, tmpl_expr *target, int kind, int line)
{
    const char *what = kind == E_FILTER ? "filter" : "test";
    token *n = cur(p);
    if (n->type != T_NAME) {
        fail(p, line, "expected a %s name, found %s", what, describe(n));
        return NULL;
    }
    int id = kind == E_FILTER ? tmpl_filter_id(n->s) : tmpl_test_id(n->s);
    if (id < 0) {
        fail(p, line, "unknown %s '%s'", what, n->s);
        return NULL;
    }
    tmpl_expr *x = new_expr(p, kind, line);
    if (!x)
        return NULL;
    x->a = target;
    x->str = n->s;
    x->op = id;
    advance(p);
    return x;
}

static tmpl_expr *parse_filter_expr(parser *p, tmpl_expr *e)
{
    while (e && !p->failed) {
        token *t = cur(p);
        int line = t->line;
        if (is_op(t, "|")) {
            advance(p);
            tmpl_expr *f = builtin_node(p, e, E_FILTER, line);
            if (!f)
                return NULL;
            if (is_op(cur(p), "(")) {
                advance(p);
                if (!parse_args(p, f))
                    return NULL;
            }
            e = f;
        } else if (is_name(t, "is")) {
            advance(p);
            bool negated = false;
            if (is_name(cur(p), "not")) {
                negated = true;
                advance(p);
            }
            tmpl_expr *x = builtin_node(p, e, E_TEST, line);
            if (!x)
                return NULL;
            x->i = negated;
            token *a = cur(p);
            if (is_op(a, "(")) {
                advance(p);
                if (!parse_args(p, x))
                    return NULL;
            } else if ((a->type == T_NAME || a->type == T_STRING || a->type == T_INT || a->type == T_FLOAT ||
                        is_op(a, "[") || is_op(a, "{")) &&
                       !is_name(a, "else") && !is_name(a, "or") && !is_name(a, "and")) {
                if (is_name(a, "is")) {
                    fail(p, a->line, "you cannot chain multiple tests with 'is'");
                    return NULL;
                }
                tmpl_expr *arg = parse_postfix(p, parse_primary(p));
                if (!arg)
                    return NULL;
                x->args = tmpl_alloc(p->arena, sizeof *x->args);
                x->arg_names = tmpl_alloc(p->arena, sizeof *x->arg_names);
                if (!x->args || !x->arg_names) {
                    oom(p);
                    return NULL;
                }
                x->args[0] = arg;
                x->nargs = 1;
            }
            e = x;
        } else if (is_op(t, "(")) {
            advance(p);
            if (!(e = parse_call(p, e, line)))
                return NULL;
        } else {
            break;
        }
    }
    return p->failed ? NULL : e;
}

static tmpl_expr *parse_unary(parser *p, bool with_filter)
{
    token *t = cur(p);
    int line = t->line;
    tmpl_expr *e;
    if (++p->depth > MAX_PARSE_DEPTH) {
        fail(p, line, "expression nested too deeply");
        return NULL;
    }
    if (is_op(t, "-") || is_op(t, "+")) {
        int kind = is_op(t, "-") ? E_NEG : E_POS;
        advance(p);
        tmpl_expr *inner = parse_unary(p, false);
        e = inner ? new_expr(p, kind, line) : NULL;
        if (e)
            e->a = inner;
    } else {
        e = parse_postfix(p, parse_primary(p));
    }
    if (e && with_filter)
        e = parse_filter_expr(p, e);
    p->depth--;
    return e;
}

static tmpl_expr *binary(parser *p, int op, tmpl_expr *a, tmpl_expr *b, int line)
{
    if (!a || !b)
        return NULL;
    tmpl_expr *e = new_expr(p, E_BIN, line);
    if (e) {
        e->op = op;
        e->a = a;
        e->b = b;
    }
    return e;
}

static tmpl_expr *parse_pow(parser *p)
{
    tmpl_expr *e = parse_unary(p, true);
    while (e && is_op(cur(p), "**")) {
        int line = cur(p)->line;
        advance(p);
        e = binary(p, OP_POW, e, parse_unary(p, true), line);
    }
    return e;
}

static tmpl_expr *parse_math2(parser *p)
{
    tmpl_expr *e = parse_pow(p);
    for (;;) {
        token *t = cur(p);
        int op = is_op(t, "*") ? OP_MUL : is_op(t, "/") ? OP_DIV : is_op(t, "//") ? OP_FLOORDIV
               : is_op(t, "%") ? OP_MOD : -1;
        if (!e || op < 0)
            return e;
        advance(p);
        e = binary(p, op, e, parse_pow(p), t->line);
    }
}

static tmpl_expr *parse_concat(parser *p)
{
    tmpl_expr *e = parse_math2(p);
    while (e && is_op(cur(p), "~")) {
        int line = cur(p)->line;
        advance(p);
        e = binary(p, OP_CONCAT, e, parse_math2(p), line);
    }
    return e;
}

static tmpl_expr *parse_math1(parser *p)
{
    tmpl_expr *e = parse_concat(p);
    for (;;) {
        token *t = cur(p);
        int op = is_op(t, "+") ? OP_ADD : is_op(t, "-") ? OP_SUB : -1;
        if (!e || op < 0)
            return e;
        advance(p);
        e = binary(p, op, e, parse_concat(p), t->line);
    }
}

static tmpl_expr *parse_compare(parser *p)
{
    tmpl_expr *e = parse_math1(p);
    tmpl_expr *prev_right = NULL; /* chained a < b < c: (a < b) and (b < c) */
    tmpl_expr *result = e;
    for (;;) {
        token *t = cur(p);
        int op = is_op(t, "==") ? OP_EQ : is_op(t, "!=") ? OP_NE : is_op(t, "<") ? OP_LT
               : is_op(t, "<=") ? OP_LE : is_op(t, ">") ? OP_GT : is_op(t, ">=") ? OP_GE
               : is_name(t, "in") ? OP_IN : (is_name(t, "not") && is_name(peek(p, 1), "in")) ? OP_NOTIN : -1;
        if (!result || op < 0)
            return result;
        advance(p);
        if (op == OP_NOTIN)
            advance(p);
        tmpl_expr *right = parse_math1(p);
        tmpl_expr *left = prev_right ? prev_right : e;
        tmpl_expr *cmp = binary(p, op, left, right, t->line);
        if (!cmp)
            return NULL;
        if (!prev_right) {
            result = cmp;
        } else {
            tmpl_expr *both = new_expr(p, E_AND, t->line);
            if (!both)
                return NULL;
            both->a = result;
            both->b = cmp;
            result = both;
        }
        prev_right = right;
    }
}

static tmpl_expr *parse_not(parser *p)
{
    if (is_name(cur(p), "not")) {
        int line = cur(p)->line;
        advance(p);
        if (++p->depth > MAX_PARSE_DEPTH) {
            fail(p, line, "expression nested too deeply");
            return NULL;
        }
        tmpl_expr *inner = parse_not(p);
        p->depth--;
        tmpl_expr *e = inner ? new_expr(p, E_NOT, line) : NULL;
        if (e)
            e->a = inner;
        return e;
    }
    return parse_compare(p);
}

/* and binds tighter than or: each is a left-associative chain of the level below. */
static tmpl_expr *parse_and(parser *p);

static tmpl_expr *parse_bool_chain(parser *p, bool is_or)
{
    tmpl_expr *(*operand)(parser *) = is_or ? parse_and : parse_not;
    const char *word = is_or ? "or" : "and";
    tmpl_expr *e = operand(p);
    while (e && is_name(cur(p), word)) {
        int line = cur(p)->line;
        advance(p);
        tmpl_expr *b = operand(p);
        tmpl_expr *n = b ? new_expr(p, is_or ? E_OR : E_AND, line) : NULL;
        if (!n)
            return NULL;
        n->a = e;
        n->b = b;
        e = n;
    }
    return e;
}

static tmpl_expr *parse_and(parser *p) { return parse_bool_chain(p, false); }
static tmpl_expr *parse_or(parser *p) { return parse_bool_chain(p, true); }

static tmpl_expr *parse_expr(parser *p)
{
    if (++p->depth > MAX_PARSE_DEPTH) {
        fail(p, cur(p)->line, "expression nested too deeply");
        return NULL;
    }
    tmpl_expr *e = parse_or(p);
    while (e && is_name(cur(p), "if")) {
        int line = cur(p)->line;
        advance(p);
        tmpl_expr *cond = parse_or(p);
        tmpl_expr *otherwise = NULL;
        if (cond && is_name(cur(p), "else")) {
            advance(p);
            otherwise = parse_expr(p);
            if (!otherwise)
                return NULL;
        }
        tmpl_expr *n = cond ? new_expr(p, E_COND, line) : NULL;
        if (!n)
            return NULL;
        n->a = e;
        n->b = cond;
        n->c = otherwise;
        e = n;
    }
    p->depth--;
    return e;
}

/* ---- statements ---- */

static tmpl_node *new_node(parser *p, int kind, int line)
{
    tmpl_node *n = tmpl_alloc(p->arena, sizeof *n);
    if (!n)
        oom(p);
    else {
        n->kind = kind;
        n->line = line;
    }
    return n;
}

static bool expect_block_end(parser *p)
{
    if (cur(p)->type == T_BLOCK_END) {
        advance(p);
        return true;
    }
    fail(p, cur(p)->line, "expected '%%}', found %s", describe(cur(p)));
    return false;
}

/* Parses nodes until a {% tag %} whose name is in ends (NULL-terminated); leaves the
 * stream at that tag's name and stores it in *which. */
static tmpl_node *parse_body(parser *p, const char *const *ends, const char **which);

static const char *expect_end_tag(parser *p, const char *const *ends, int open_line, const char *what)
{
    (void)ends;
    token *t = cur(p);
    if (t->type == T_EOF) {
        fail(p, open_line, "'%s' is never closed", what);
        return NULL;
    }
    return t->s;
}

/* After {% else: the else body up to {% end_tag, whose name is consumed. */
static bool parse_else(parser *p, tmpl_node *n, const char *end_tag, int line, const char *what)
{
    const char *const end_only[] = {end_tag, NULL};
    const char *which = NULL;
    if (!expect_block_end(p))
        return false;
    n->else_body = parse_body(p, end_only, &which);
    if (p->failed || !expect_end_tag(p, end_only, line, what))
        return false;
    advance(p);
    return true;
}

static tmpl_node *parse_if(parser *p, int line)
{
    static const char *const ends[] = {"elif", "else", "endif", NULL};
    tmpl_node *n = new_node(p, N_IF, line);
    if (!n || !(n->expr = parse_expr(p)) || !expect_block_end(p))
        return NULL;
    const char *which = NULL;
    n->body = parse_body(p, ends, &which);
    if (p->failed || !expect_end_tag(p, ends, line, "if"))
        return NULL;
    int tag_line = cur(p)->line;
    advance(p);
    if (!strcmp(which, "elif")) {
        n->else_body = parse_if(p, tag_line);
        return p->failed ? NULL : n;
    }
    if (!strcmp(which, "else") && !parse_else(p, n, "endif", line, "if"))
        return NULL;
    return expect_block_end(p) ? n : NULL;
}

static tmpl_node *parse_for(parser *p, int line)
{
    tmpl_node *n = new_node(p, N_FOR, line);
    if (!n)
        return NULL;
    bool paren = is_op(cur(p), "(");
    if (paren)
        advance(p);
    for (;;) {
        if (cur(p)->type != T_NAME) {
            fail(p, cur(p)->line, "expected a loop variable name, found %s", describe(cur(p)));
            return NULL;
        }
        if (n->num_names == 2) {
            fail(p, line, "at most two loop variables are supported");
            return NULL;
        }
        n->names[n->num_names++] = cur(p)->s;
        advance(p);
        if (!is_op(cur(p), ","))
            break;
        advance(p);
    }
    if (paren && !expect_op(p, ")"))
        return NULL;
    if (!is_name(cur(p), "in")) {
        fail(p, cur(p)->line, "expected 'in', found %s", describe(cur(p)));
        return NULL;
    }
    advance(p);
    if (!(n->expr = parse_tuple(p, false)))
        return NULL;
    if (is_name(cur(p), "if")) {
        advance(p);
        if (!(n->filter = parse_expr(p)))
            return NULL;
    }
    if (is_name(cur(p), "recursive")) {
        fail(p, cur(p)->line, "recursive loops are not supported");
        return NULL;
    }
    if (!expect_block_end(p))
        return NULL;
    static const char *const ends[] = {"else", "endfor", NULL};
    const char *which = NULL;
    n->body = parse_body(p, ends, &which);
    if (p->failed || !expect_end_tag(p, ends, line, "for"))
        return NULL;
    advance(p);
    if (!strcmp(which, "else") && !parse_else(p, n, "endfor", line, "for"))
        return NULL;
    return expect_block_end(p) ? n : NULL;
}

/* A set or macro node and the name that follows its keyword. */
static tmpl_node *named_node(parser *p, int kind, int line, const char *what)
{
    tmpl_node *n = new_node(p, kind, line);
    if (!n)
        return NULL;
    if (cur(p)->type != T_NAME) {
        fail(p, cur(p)->line, "expected %s, found %s", what, describe(cur(p)));
        return NULL;
    }
    n->names[0] = cur(p)->s;
    n->num_names = 1;
    advance(p);
    return n;
}

static tmpl_node *parse_set(parser *p, int line)
{
    tmpl_node *n = named_node(p, N_SET, line, "a variable name after 'set'");
    if (!n)
        return NULL;
    if (is_op(cur(p), ".")) {
        advance(p);
        if (cur(p)->type != T_NAME) {
            fail(p, cur(p)->line, "expected an attribute name, found %s", describe(cur(p)));
            return NULL;
        }
        n->attr = cur(p)->s;
        advance(p);
    }
    if (is_op(cur(p), ",")) {
        fail(p, line, "unpacking assignments (set a, b = ...) are not supported");
        return NULL;
    }
    if (is_op(cur(p), "=")) {
        advance(p);
        if (!(n->expr = parse_tuple(p, true)))
            return NULL;
        return expect_block_end(p) ? n : NULL;
    }
    if (n->attr) {
        fail(p, line, "block assignment to an attribute is not supported");
        return NULL;
    }
    if (is_op(cur(p), "|")) {
        fail(p, line, "filtered block assignment is not supported");
        return NULL;
    }
    if (!expect_block_end(p))
        return NULL;
    n->kind = N_SET_BLOCK;
    static const char *const ends[] = {"endset", NULL};
    const char *which = NULL;
    n->body = parse_body(p, ends, &which);
    if (p->failed || !expect_end_tag(p, ends, line, "set"))
        return NULL;
    advance(p);
    return expect_block_end(p) ? n : NULL;
}

static tmpl_node *parse_macro(parser *p, int line)
{
    tmpl_node *n = named_node(p, N_MACRO, line, "a macro name");
    if (!n)
        return NULL;
    if (!expect_op(p, "("))
        return NULL;
    expr_vec v = {0};
    bool defaults = false;
    while (!is_op(cur(p), ")")) {
        if (v.n > 0 && !expect_op(p, ","))
            return NULL;
        if (is_op(cur(p), ")"))
            break;
        if (cur(p)->type != T_NAME) {
            fail(p, cur(p)->line, "expected a parameter name, found %s", describe(cur(p)));
            return NULL;
        }
        const char *name = cur(p)->s;
        advance(p);
        tmpl_expr *def = NULL;
        if (is_op(cur(p), "=")) {
            advance(p);
            if (!(def = parse_expr(p)))
                return NULL;
            defaults = true;
        } else if (defaults) {
            fail(p, line, "parameter '%s' without a default follows one with a default", name);
            return NULL;
        }
        if (!vec_push(p, &v, def, name, NULL))
            return NULL;
    }
    advance(p);
    n->params = v.names;
    n->defaults = v.items;
    n->num_params = v.n;
    if (!expect_block_end(p))
        return NULL;
    static const char *const ends[] = {"endmacro", NULL};
    const char *which = NULL;
    n->body = parse_body(p, ends, &which);
    if (p->failed || !expect_end_tag(p, ends, line, "macro"))
        return NULL;
    advance(p);
    if (cur(p)->type == T_NAME)
        advance(p); /* {% endmacro name %} */
    return expect_block_end(p) ? n : NULL;
}

static tmpl_node *parse_body(parser *p, const char *const *ends, const char **which)
{
    tmpl_node *head = NULL, **tail = &head;
    if (++p->depth > MAX_PARSE_DEPTH) {
        fail(p, cur(p)->line, "blocks nested too deeply");
        return NULL;
    }
    while (!p->failed) {
        token *t = cur(p);
        tmpl_node *n = NULL;
        if (t->type == T_EOF) {
            break;
        } else if (t->type == T_TEXT) {
            if ((n = new_node(p, N_TEXT, t->line))) {
                n->text = t->s;
                n->len = t->len;
            }
            advance(p);
        } else if (t->type == T_VAR_BEGIN) {
            advance(p);
            if ((n = new_node(p, N_OUTPUT, t->line)) && (n->expr = parse_tuple(p, true))) {
                if (cur(p)->type != T_VAR_END)
                    fail(p, cur(p)->line, "expected '}}', found %s", describe(cur(p)));
                advance(p);
            }
        } else if (t->type == T_BLOCK_BEGIN) {
            advance(p);
            token *kw = cur(p);
            int line = kw->line;
            if (kw->type != T_NAME) {
                fail(p, line, "expected a tag name after '{%%', found %s", describe(kw));
                break;
            }
            for (int k = 0; ends && ends[k]; k++)
                if (!strcmp(kw->s, ends[k])) {
                    *which = ends[k];
                    p->depth--;
                    return head;
                }
            advance(p);
            const char *name = kw->s;
            if (!strcmp(name, "if")) {
                n = parse_if(p, line);
            } else if (!strcmp(name, "for")) {
                n = parse_for(p, line);
            } else if (!strcmp(name, "set")) {
                n = parse_set(p, line);
            } else if (!strcmp(name, "macro")) {
                n = parse_macro(p, line);
            } else if (!strcmp(name, "break") || !strcmp(name, "continue")) {
                if ((n = new_node(p, name[0] == 'b' ? N_BREAK : N_CONTINUE, line)) && !expect_block_end(p))
                    n = NULL;
            } else if (!strcmp(name, "generation")) {
                /* Hugging Face's assistant-mask marker: renders its body as it is */
                static const char *const gen_end[] = {"endgeneration", NULL};
                const char *w = NULL;
                if (!expect_block_end(p))
                    break;
                if ((n = new_node(p, N_IF, line))) {
                    n->body = parse_body(p, gen_end, &w);
                    if (!p->failed && expect_end_tag(p, gen_end, line, "generation")) {
                        advance(p);
                        expect_block_end(p);
                    }
                }
            } else {
                bool known_end = !strncmp(name, "end", 3) || !strcmp(name, "else") || !strcmp(name, "elif");
                if (known_end)
                    fail(p, line, "unexpected '%s'", name);
                else
                    fail(p, line, "unsupported tag '%s'", name);
            }
        } else {
            fail(p, t->line, "unexpected %s", describe(t));
        }
        if (n) {
            *tail = n;
            tail = &n->next;
        }
    }
    p->depth--;
    if (!p->failed && ends) {
        /* EOF before the closing tag; the caller names the opening one */
        *which = NULL;
    }
    return head;
}

kvd_template *kvd_template_parse(const char *source, size_t len, const char *name, kvd_error *err)
{
    kvd_template *t = calloc(1, sizeof *t);
    if (!t) {
        kvd_error_set(err, KVD_ENOMEM, "chat template: out of memory");
        return NULL;
    }
    tmpl_arena_init(&t->arena, 0);
    parser p = {.arena = &t->arena, .name = name, .err = err};
    if (lex(&p, source, len) == 0) {
        const char *which = NULL;
        t->root = parse_body(&p, NULL, &which);
    }
    free(p.toks);
    if (p.failed) {
        kvd_template_destroy(t);
        return NULL;
    }
    return t;
}

void kvd_template_destroy(kvd_template *t)
{
    if (!t)
        return;
    tmpl_arena_free(&t->arena);
    free(t);
}
