/* grammar.c - the builder the front ends share and the checks that turn its rules into
 * a kvd_grammar (flattened elements, no left recursion, no rule that can never end). */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "grammar_internal.h"

void gr_builder_init(gr_builder *b, kvd_error *err)
{
    memset(b, 0, sizeof *b);
    b->err = err;
}

void gr_seq_free(gr_seq *s)
{
    free(s->el);
    memset(s, 0, sizeof *s);
}

static void free_objects(gr_object *objects, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(objects[i].first_rule);
        free(objects[i].next_rule);
    }
    free(objects);
}

void gr_builder_deinit(gr_builder *b)
{
    for (size_t i = 0; i < b->num_rules; i++) free(b->rules[i].name);
    for (size_t i = 0; i < b->num_alts; i++) gr_seq_free(&b->alts[i]);
    free_objects(b->objects, b->num_objects);
    free(b->rules);
    free(b->alts);
    free(b->alt_rule);
    free(b->sets);
    memset(b, 0, sizeof *b);
}

int gr_fail(gr_builder *b, int code, const char *fmt, ...)
{
    if (b->failed) return code;
    b->failed = code;
    if (b->err) {
        char msg[sizeof b->err->msg];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        kvd_error_set(b->err, code, "%s", msg);
    }
    return code;
}

static bool grow(gr_builder *b, void **p, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap) return true;
    size_t n = *cap ? *cap * 2 : 16;
    while (n < need) n *= 2;
    void *q = realloc(*p, n * size);
    if (!q) {
        b->oom = true;
        gr_fail(b, KVD_ENOMEM, "grammar: out of memory");
        return false;
    }
    *p = q;
    *cap = n;
    return true;
}

uint32_t gr_rule_new(gr_builder *b, const char *name, bool lexical)
{
    if (!grow(b, (void **)&b->rules, &b->cap_rules, b->num_rules + 1, sizeof *b->rules)) return 0;
    gr_rule *r = &b->rules[b->num_rules];
    memset(r, 0, sizeof *r);
    r->name = strdup(name ? name : "");
    r->lexical = lexical;
    return (uint32_t)b->num_rules++;
}

void gr_rule_add_alt(gr_builder *b, uint32_t rule, gr_seq *seq)
{
    size_t cap = b->cap_alts;
    if (!grow(b, (void **)&b->alts, &cap, b->num_alts + 1, sizeof *b->alts)) {
        gr_seq_free(seq);
        return;
    }
    size_t cap2 = b->cap_alts;
    if (!grow(b, (void **)&b->alt_rule, &cap2, b->num_alts + 1, sizeof *b->alt_rule)) {
        b->cap_alts = cap < cap2 ? cap : cap2;
        gr_seq_free(seq);
        return;
    }
    b->cap_alts = cap < cap2 ? cap : cap2;
    b->alts[b->num_alts] = *seq;
    b->alt_rule[b->num_alts] = rule;
    b->num_alts++;
    memset(seq, 0, sizeof *seq);
}

void gr_seq_push(gr_builder *b, gr_seq *s, gr_elem e)
{
    if (!grow(b, (void **)&s->el, &s->cap, s->n + 1, sizeof *s->el)) return;
    s->el[s->n++] = e;
}

static uint32_t set_index(gr_builder *b, const gr_bytes *set)
{
    for (size_t i = b->num_sets; i-- > 0;)
        if (!memcmp(&b->sets[i], set, sizeof *set)) return (uint32_t)i;
    if (!grow(b, (void **)&b->sets, &b->cap_sets, b->num_sets + 1, sizeof *b->sets)) return 0;
    b->sets[b->num_sets] = *set;
    return (uint32_t)b->num_sets++;
}

void gr_seq_bytes(gr_builder *b, gr_seq *s, const gr_bytes *set, uint32_t min, uint32_t max)
{
    gr_elem e = {.kind = EL_CHARSET, .ref = set_index(b, set), .min = min, .max = max};
    gr_seq_push(b, s, e);
}

void gr_seq_byte(gr_builder *b, gr_seq *s, unsigned byte)
{
    gr_bytes set = {{0}};
    gr_bytes_add(&set, byte);
    gr_seq_bytes(b, s, &set, 1, 1);
}

void gr_seq_lit(gr_builder *b, gr_seq *s, const char *text, size_t n)
{
    for (size_t i = 0; i < n; i++) gr_seq_byte(b, s, (unsigned char)text[i]);
}

void gr_seq_rule(gr_builder *b, gr_seq *s, uint32_t rule, uint32_t min, uint32_t max)
{
    gr_elem e = {.kind = EL_RULE, .ref = rule, .min = min, .max = max};
    gr_seq_push(b, s, e);
}

uint32_t gr_rule_lit(gr_builder *b, const char *name, const char *text, size_t n)
{
    uint32_t r = gr_rule_new(b, name, true);
    gr_seq s = {0};
    gr_seq_lit(b, &s, text, n);
    gr_rule_add_alt(b, r, &s);
    return r;
}

uint32_t gr_object_add(gr_builder *b, gr_object *obj)
{
    if (!grow(b, (void **)&b->objects, &b->cap_objects, b->num_objects + 1, sizeof *b->objects)) {
        free(obj->first_rule);
        free(obj->next_rule);
        return 0;
    }
    b->objects[b->num_objects] = *obj;
    return (uint32_t)b->num_objects++;
}

uint32_t gr_utf8_next(const char **pp, const char *end)
{
    const unsigned char *p = (const unsigned char *)*pp;
    uint32_t c = *p;
    int n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if (*pp + n > end) n = 1;
    if (n > 1) {
        c &= 0x3F >> (n - 1);
        for (int i = 1; i < n; i++) c = (c << 6) | (p[i] & 0x3F);
    }
    *pp += n;
    return c;
}

int gr_utf8_encode(uint32_t cp, char out[4])
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Byte sequences for [lo, hi] where both encode to the same length: split until each
 * piece is a fixed prefix followed by full continuation ranges (the classic UTF-8
 * range split). Surrogates are left out by the caller. */
static void utf8_same_len(gr_builder *b, uint32_t rule, uint32_t lo, uint32_t hi)
{
    char a[4], z[4];
    int n = gr_utf8_encode(lo, a);
    gr_utf8_encode(hi, z);
    if (n == 1) {
        gr_bytes set = {{0}};
        gr_bytes_add_range(&set, (unsigned char)a[0], (unsigned char)z[0]);
        gr_seq s = {0};
        gr_seq_bytes(b, &s, &set, 1, 1);
        gr_rule_add_alt(b, rule, &s);
        return;
    }
    /* Find the first byte where lo and hi differ; the tail after it must be full
     * ranges (80..BF) for lo's tail = all 80 and hi's tail = all BF, else split. */
    for (int i = 1; i < n; i++) {
        uint32_t mask = (1u << (6 * (n - i))) - 1; /* bits below position i */
        if ((lo & ~mask) != (hi & ~mask)) {
            if ((lo & mask) != 0) {
                utf8_same_len(b, rule, lo, lo | mask);
                utf8_same_len(b, rule, (lo | mask) + 1, hi);
                return;
            }
            if ((hi & mask) != mask) {
                utf8_same_len(b, rule, lo, (hi & ~mask) - 1);
                utf8_same_len(b, rule, hi & ~mask, hi);
                return;
            }
        }
    }
    gr_seq s = {0};
    for (int i = 0; i < n; i++) {
        gr_bytes set = {{0}};
        gr_bytes_add_range(&set, (unsigned char)a[i], (unsigned char)z[i]);
        gr_seq_bytes(b, &s, &set, 1, 1);
    }
    gr_rule_add_alt(b, rule, &s);
}

void gr_utf8_range(gr_builder *b, uint32_t rule, uint32_t lo, uint32_t hi)
{
    static const uint32_t edges[] = {0x7F, 0x7FF, 0xD7FF, 0xDFFF, 0xFFFF, 0x10FFFF};
    if (hi > 0x10FFFF) hi = 0x10FFFF;
    uint32_t start = 0;
    for (size_t i = 0; i < sizeof edges / sizeof *edges; i++) {
        uint32_t end = edges[i];
        uint32_t a = lo > start ? lo : start, z = hi < end ? hi : end;
        if (a <= z && end != 0xDFFF) utf8_same_len(b, rule, a, z);
        start = end + 1;
    }
}

/* --- finish: flatten and check --------------------------------------------- */

static bool elem_nullable(const gr_builder *b, const gr_elem *e, const uint8_t *nullable)
{
    if (e->min == 0) return true;
    if (e->kind == EL_RULE) return nullable[e->ref];
    if (e->kind == EL_OBJECT) return b->objects[e->ref].required == 0 && b->objects[e->ref].min_members == 0;
    return false;
}

static bool elem_productive(const gr_builder *b, const gr_elem *e, const uint8_t *prod)
{
    if (e->min == 0) return true;
    if (e->kind == EL_CHARSET) {
        const gr_bytes *s = &b->sets[e->ref];
        return (s->w[0] | s->w[1] | s->w[2] | s->w[3]) != 0;
    }
    if (e->kind == EL_RULE) return prod[e->ref];
    const gr_object *o = &b->objects[e->ref];
    for (uint32_t k = 0; k < o->num_members; k++)
        if (((o->required >> k) & 1) && (!prod[o->first_rule[k]] || !prod[o->next_rule[k]])) return false;
    return true;
}

/* The flattened rule tables and g itself (what a failed compile has built so far). */
static void free_tables(kvd_grammar *g)
{
    free(g->el);
    free(g->el_rule);
    free(g->alt_start);
    free(g->rule_alt0);
    free(g->rule_nalts);
    free(g->rule_lexical);
    free(g);
}

/* Depth-first search over "may call first" edges; 1 = on the stack, 2 = done. */
static int left_dfs(gr_builder *b, uint32_t r, uint8_t *color, const uint8_t *nullable, int depth)
{
    if (color[r] == 2) return 0;
    if (color[r] == 1)
        return gr_fail(b, KVD_EINVAL, "grammar: rule '%s' is left-recursive", b->rules[r].name);
    if (depth > 100000) return gr_fail(b, KVD_EINVAL, "grammar: rules nested too deeply");
    color[r] = 1;
    for (uint32_t a = b->rules[r].first_alt; a < b->rules[r].first_alt + b->rules[r].num_alts; a++) {
        const gr_seq *s = &b->alts[a];
        for (size_t i = 0; i < s->n; i++) {
            const gr_elem *e = &s->el[i];
            if (e->kind == EL_RULE && left_dfs(b, e->ref, color, nullable, depth + 1)) return b->failed;
            if (e->kind == EL_OBJECT) {
                const gr_object *o = &b->objects[e->ref];
                for (uint32_t k = 0; k < o->num_members; k++)
                    if (left_dfs(b, o->first_rule[k], color, nullable, depth + 1)) return b->failed;
                if (o->extra_first != GR_NONE && left_dfs(b, o->extra_first, color, nullable, depth + 1))
                    return b->failed;
            }
            if (!elem_nullable(b, e, nullable)) break;
        }
    }
    color[r] = 2;
    return 0;
}

kvd_grammar *gr_finish(gr_builder *b, const kvd_grammar_vocab *vocab, uint32_t root, kvd_error *err)
{
    kvd_grammar *g = NULL;
    uint8_t *nullable = NULL, *prod = NULL, *color = NULL;
    if (b->failed) goto out;
    size_t nr = b->num_rules;
    /* Group alternatives by rule (stable). */
    uint32_t *order = malloc((b->num_alts + 1) * sizeof *order);
    uint32_t *count = calloc(nr + 1, sizeof *count);
    if (!order || !count) {
        free(order);
        free(count);
        gr_fail(b, KVD_ENOMEM, "grammar: out of memory");
        goto out;
    }
    for (size_t a = 0; a < b->num_alts; a++) count[b->alt_rule[a] + 1]++;
    for (size_t r = 0; r < nr; r++) count[r + 1] += count[r];
    for (size_t r = 0; r < nr; r++) {
        b->rules[r].first_alt = count[r];
        b->rules[r].num_alts = count[r + 1] - count[r];
    }
    for (size_t a = 0; a < b->num_alts; a++) order[count[b->alt_rule[a]]++] = (uint32_t)a;
    free(count);
    /* Reorder alts in place through a copy. */
    gr_seq *sorted = malloc((b->num_alts + 1) * sizeof *sorted);
    if (!sorted) {
        free(order);
        gr_fail(b, KVD_ENOMEM, "grammar: out of memory");
        goto out;
    }
    for (size_t i = 0; i < b->num_alts; i++) sorted[i] = b->alts[order[i]];
    for (size_t i = 0; i < b->num_alts; i++) {
        b->alts[i] = sorted[i];
        b->alt_rule[i] = b->alt_rule[order[i]];
    }
    /* alt_rule was overwritten while read: recompute from the rule ranges. */
    for (size_t r = 0; r < nr; r++)
        for (uint32_t a = b->rules[r].first_alt; a < b->rules[r].first_alt + b->rules[r].num_alts; a++)
            b->alt_rule[a] = (uint32_t)r;
    free(sorted);
    free(order);

    nullable = calloc(nr, 1);
    prod = calloc(nr, 1);
    color = calloc(nr, 1);
    if (!nullable || !prod || !color) {
        gr_fail(b, KVD_ENOMEM, "grammar: out of memory");
        goto out;
    }
    for (bool changed = true; changed;) {
        changed = false;
        for (size_t r = 0; r < nr; r++) {
            const gr_rule *rr = &b->rules[r];
            for (uint32_t a = rr->first_alt; a < rr->first_alt + rr->num_alts; a++) {
                const gr_seq *s = &b->alts[a];
                bool all_null = true, all_prod = true;
                for (size_t i = 0; i < s->n; i++) {
                    all_null = all_null && elem_nullable(b, &s->el[i], nullable);
                    all_prod = all_prod && elem_productive(b, &s->el[i], prod);
                }
                if (all_null && !nullable[r]) nullable[r] = 1, changed = true;
                if (all_prod && !prod[r]) prod[r] = 1, changed = true;
            }
        }
    }
    if (root >= nr || !prod[root]) {
        gr_fail(b, KVD_EINVAL, "grammar: the start rule '%s' matches nothing",
                root < nr ? b->rules[root].name : "?");
        goto out;
    }
    for (size_t r = 0; r < nr; r++)
        if (left_dfs(b, (uint32_t)r, color, nullable, 0)) goto out;

    g = calloc(1, sizeof *g);
    if (!g) {
        gr_fail(b, KVD_ENOMEM, "grammar: out of memory");
        goto out;
    }
    size_t nel = 0;
    for (size_t a = 0; a < b->num_alts; a++) nel += b->alts[a].n + 1;
    g->el = malloc((nel + 1) * sizeof *g->el);
    g->el_rule = malloc((nel + 1) * sizeof *g->el_rule);
    g->alt_start = malloc((b->num_alts + 1) * sizeof *g->alt_start);
    g->rule_alt0 = malloc((nr + 1) * sizeof *g->rule_alt0);
    g->rule_nalts = malloc((nr + 1) * sizeof *g->rule_nalts);
    g->rule_lexical = malloc(nr + 1);
    if (!g->el || !g->el_rule || !g->alt_start || !g->rule_alt0 || !g->rule_nalts || !g->rule_lexical) {
        gr_fail(b, KVD_ENOMEM, "grammar: out of memory");
        goto fail_g;
    }
    size_t k = 0;
    for (size_t a = 0; a < b->num_alts; a++) {
        g->alt_start[a] = (uint32_t)k;
        /* An unproductive alternative can never complete: leave it out so every state
         * the matcher reaches can still finish (masks never lead into a dead end). */
        bool ok = true;
        for (size_t i = 0; i < b->alts[a].n; i++) ok = ok && elem_productive(b, &b->alts[a].el[i], prod);
        if (ok)
            for (size_t i = 0; i < b->alts[a].n; i++) {
                g->el_rule[k] = b->alt_rule[a];
                g->el[k] = b->alts[a].el[i];
                /* a repeated element with an unproductive body may only be skipped */
                if (!elem_productive(b, &(gr_elem){.kind = g->el[k].kind, .ref = g->el[k].ref, .min = 1},
                                     prod))
                    g->el[k].max = 0;
                k++;
            }
        g->el_rule[k] = b->alt_rule[a];
        /* ref 1 marks an alternative left out (the matcher skips it) */
        g->el[k++] = (gr_elem){.kind = EL_END, .ref = ok ? 0 : 1};
    }
    g->num_el = k;
    for (size_t r = 0; r < nr; r++) {
        g->rule_alt0[r] = b->rules[r].first_alt;
        g->rule_nalts[r] = b->rules[r].num_alts;
        g->rule_lexical[r] = b->rules[r].lexical;
    }
    g->num_rules = nr;
    g->sets = b->sets;
    g->num_sets = b->num_sets;
    b->sets = NULL;
    g->objects = b->objects;
    g->num_objects = b->num_objects;
    b->objects = NULL;
    b->num_objects = 0;
    g->root = root;
    g->vocab = vocab;
    g->refs = 1;
    pthread_mutex_init(&g->lock, NULL);
    goto out;
fail_g:
    free_tables(g);
    g = NULL;
out:
    if (!g && !b->failed) gr_fail(b, KVD_EINVAL, "grammar: compile failed");
    (void)err; /* the builder reports through the kvd_error it was given */
    free(nullable);
    free(prod);
    free(color);
    gr_builder_deinit(b);
    return g;
}

kvd_grammar *kvd_grammar_retain(kvd_grammar *g)
{
    if (g) atomic_fetch_add_explicit(&g->refs, 1, memory_order_relaxed);
    return g;
}

void kvd_grammar_release(kvd_grammar *g)
{
    if (!g || atomic_fetch_sub_explicit(&g->refs, 1, memory_order_acq_rel) != 1) return;
    gr_grammar_free_cache(g);
    pthread_mutex_destroy(&g->lock);
    free_objects(g->objects, g->num_objects);
    free(g->sets);
    free_tables(g);
}

int kvd_grammar_num_ids(const kvd_grammar *g) { return g->vocab->num_ids; }
