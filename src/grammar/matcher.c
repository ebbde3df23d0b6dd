/* matcher.c - the pushdown matcher and its token masks.
 *
 * A matcher state is the set of stacks the bytes so far may have left, each stack a
 * chain of frames (element, repetition state) whose top waits at a byte set (a leaf).
 * Frames are hash-consed into a node arena, so a stack is one node id, equal stacks
 * are equal ids and history/rollback is a list of id sets.
 *
 * Masks come from a cache of context-independent token sets (as XGrammar does): the
 * key is the leaf frame plus the frames above it inside lexical rules (a string, a
 * number, a literal); the stack below is the context. Walking the vocabulary trie
 * once from the key alone sorts every token into accepted (it stays inside the key's
 * frames, whatever the context), rejected, or "leaves the key after k bytes" - for
 * those only the bytes after k depend on the context, and they are checked at mask
 * time against the real stack, each distinct remainder once.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "grammar_internal.h"

#define NODE_ACCEPT 0u /* the parent of the root frame: ending the root ends the text */
#define NODE_CTX 1u    /* the parent of a cache key's outermost frame */
#define CHAIN_MAX 12
#define EXPAND_DEPTH_MAX 4000

typedef struct gr_node {
    uint32_t el, parent;
    uint64_t state;
} gr_node;

/* An arena of hash-consed frames plus a per-operation visit mark. */
typedef struct gr_space {
    const kvd_grammar *g;
    gr_node *nodes;
    uint32_t *mark;
    size_t n, cap;
    uint32_t *slots; /* open addressing, 0 = empty, else node id + 1 */
    size_t slot_cap;
    uint32_t gen;
    bool oom;
    /* Leaf sets hash-consed too (sorted ids in pool), and advance() memoised on
     * (set, byte): the vocabulary walk meets the same sets over and over (every byte
     * of a string body leaves the same set), so most of its steps are one lookup. */
    struct gr_setrec *recs;
    size_t num_recs, cap_recs;
    uint32_t *pool;
    size_t pool_n, pool_cap;
    uint32_t *rec_slots; /* id + 1 */
    size_t rec_slot_cap;
    uint64_t *memo_keys; /* (set << 8 | byte) + 1; 0 = empty */
    uint32_t *memo_vals;
    size_t memo_n, memo_cap;
    struct gr_set *scratch; /* two sets for advance_id */
} gr_space;

typedef struct gr_setrec {
    uint64_t hash;
    uint32_t off, n;
    bool accept, ctx;
} gr_setrec;

/* A set of leaves plus whether the text may end here (accept) or the key's frames
 * ended here (ctx, only in cache walks). */
typedef struct gr_set {
    uint32_t *ids;
    size_t n, cap;
    bool accept, ctx;
} gr_set;

struct gr_ci {
    uint32_t *accepted; /* token ids (NULL when acc_bits holds them) */
    size_t num_accepted;
    uint32_t *acc_bits; /* a whole mask, for large sets */
    /* remainders: distinct byte strings in sorted order; rem_tok_start[i] ..
     * rem_tok_start[i+1] index rem_tok (the tokens leaving with that remainder) */
    size_t num_rem;
    uint32_t *rem_off, *rem_len, *rem_lcp; /* bytes: rem_bytes + rem_off[i] */
    uint8_t *rem_bytes;
    uint32_t *rem_tok_start, *rem_tok;
};

/* A grammar's cache slot: the key in this grammar's element numbering. */
struct gr_ci_slot {
    uint64_t hash;
    uint32_t len;
    uint32_t el[CHAIN_MAX];
    uint64_t st[CHAIN_MAX];
    gr_ci *ci;
    bool owned; /* else the vocabulary's shared cache owns ci */
};

/* The vocabulary's cache of entries for keys made only of lexical rules, which do not
 * depend on the grammar around them (a JSON string's body is the same everywhere):
 * keyed by the exact serialisation of the rules the key can reach. */
struct gr_shared_ci {
    uint64_t hash;
    uint8_t *key;
    size_t key_len;
    gr_ci *ci;
};

struct kvd_grammar_matcher {
    kvd_grammar *g;
    gr_space sp;
    gr_set cur;
    /* history: the leaf sets after each token (ids in hist_ids) */
    uint32_t *hist_ids;
    size_t hist_n, hist_cap;
    size_t *hist_off;
    uint8_t *hist_accept;
    size_t num_tokens, hist_slots;
    /* scratch */
    gr_set tmp[2];
    gr_set *depth_sets;
    size_t depth_cap;
    uint8_t *rem_ok;
    size_t rem_ok_cap;
    /* The tokens a cache entry's remainders add under one boundary node: the same pair
     * comes back at every item of an array or character of a string. */
    struct rem_memo {
        const gr_ci *ci;
        uint32_t boundary, n;
        uint32_t *tokens;
    } memo[256];
    int memo_used;
};

/* --- node arena --------------------------------------------------------------- */

static uint64_t mix(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

static uint64_t node_hash(uint32_t el, uint32_t parent, uint64_t state)
{
    return mix(((uint64_t)el << 32 | parent) ^ mix(state + 0x9e3779b97f4a7c15ull));
}

static int space_init(gr_space *sp, const kvd_grammar *g)
{
    memset(sp, 0, sizeof *sp);
    sp->g = g;
    sp->cap = 1024;
    sp->nodes = malloc(sp->cap * sizeof *sp->nodes);
    sp->mark = calloc(sp->cap, sizeof *sp->mark);
    sp->slot_cap = 2048;
    sp->slots = calloc(sp->slot_cap, sizeof *sp->slots);
    if (!sp->nodes || !sp->mark || !sp->slots) return KVD_ENOMEM;
    sp->n = 2; /* NODE_ACCEPT, NODE_CTX */
    sp->nodes[0] = (gr_node){0};
    sp->nodes[1] = (gr_node){0};
    return 0;
}

static void set_free(struct gr_set *s);

static void space_deinit(gr_space *sp)
{
    free(sp->nodes);
    free(sp->mark);
    free(sp->slots);
    free(sp->recs);
    free(sp->pool);
    free(sp->rec_slots);
    free(sp->memo_keys);
    free(sp->memo_vals);
    if (sp->scratch) {
        set_free(&sp->scratch[0]);
        set_free(&sp->scratch[1]);
        free(sp->scratch);
    }
    memset(sp, 0, sizeof *sp);
}

static bool space_rehash(gr_space *sp)
{
    size_t cap = sp->slot_cap * 2;
    uint32_t *slots = calloc(cap, sizeof *slots);
    if (!slots) return false;
    for (size_t i = 2; i < sp->n; i++) {
        const gr_node *x = &sp->nodes[i];
        size_t h = node_hash(x->el, x->parent, x->state) & (cap - 1);
        while (slots[h]) h = (h + 1) & (cap - 1);
        slots[h] = (uint32_t)i + 1;
    }
    free(sp->slots);
    sp->slots = slots;
    sp->slot_cap = cap;
    return true;
}

/* The node (el, state) over parent; UINT32_MAX when out of memory. */
static uint32_t intern(gr_space *sp, uint32_t el, uint64_t state, uint32_t parent)
{
    size_t h = node_hash(el, parent, state) & (sp->slot_cap - 1);
    for (uint32_t s; (s = sp->slots[h]) != 0; h = (h + 1) & (sp->slot_cap - 1)) {
        const gr_node *x = &sp->nodes[s - 1];
        if (x->el == el && x->parent == parent && x->state == state) return s - 1;
    }
    if (sp->n + 1 > sp->cap) {
        size_t cap = sp->cap * 2;
        gr_node *nodes = realloc(sp->nodes, cap * sizeof *nodes);
        if (!nodes) goto oom;
        sp->nodes = nodes;
        uint32_t *mark = realloc(sp->mark, cap * sizeof *mark);
        if (!mark) goto oom;
        memset(mark + sp->cap, 0, (cap - sp->cap) * sizeof *mark);
        sp->mark = mark;
        sp->cap = cap;
    }
    if (sp->n >= UINT32_MAX - 2) goto oom;
    uint32_t id = (uint32_t)sp->n++;
    sp->nodes[id] = (gr_node){.el = el, .parent = parent, .state = state};
    sp->mark[id] = 0;
    sp->slots[h] = id + 1;
    if (sp->n * 2 > sp->slot_cap && !space_rehash(sp)) goto oom;
    return id;
oom:
    sp->oom = true;
    return UINT32_MAX;
}

static void set_add(gr_space *sp, gr_set *s, uint32_t id)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 16;
        uint32_t *ids = realloc(s->ids, cap * sizeof *ids);
        if (!ids) {
            sp->oom = true;
            return;
        }
        s->ids = ids;
        s->cap = cap;
    }
    s->ids[s->n++] = id;
}

static void set_clear(gr_set *s)
{
    s->n = 0;
    s->accept = s->ctx = false;
}

static void set_free(gr_set *s)
{
    free(s->ids);
    memset(s, 0, sizeof *s);
}

static bool set_live(const gr_set *s) { return s->n > 0 || s->accept || s->ctx; }

/* --- closure ------------------------------------------------------------------- */

static inline uint64_t count_next(const gr_elem *e, uint64_t s)
{
    /* unbounded: counts above min are all alike */
    if (e->max == GR_INF) return s + 1 > e->min ? e->min : s + 1;
    return s + 1;
}

static void expand(gr_space *sp, uint32_t id, gr_set *out, int depth);

static void push_rule(gr_space *sp, uint32_t rule, uint32_t ret, gr_set *out, int depth)
{
    const kvd_grammar *g = sp->g;
    for (uint32_t a = g->rule_alt0[rule]; a < g->rule_alt0[rule] + g->rule_nalts[rule]; a++) {
        uint32_t first = g->alt_start[a];
        if (g->el[first].kind == EL_END && g->el[first].ref == 1) continue; /* left out */
        uint32_t c = intern(sp, first, 0, ret);
        if (c != UINT32_MAX) expand(sp, c, out, depth + 1);
    }
}

/* Adds the leaves reachable from node id without consuming a byte. */
static void expand(gr_space *sp, uint32_t id, gr_set *out, int depth)
{
    if (id == NODE_ACCEPT) {
        out->accept = true;
        return;
    }
    if (id == NODE_CTX) {
        out->ctx = true;
        return;
    }
    if (sp->mark[id] == sp->gen) return;
    sp->mark[id] = sp->gen;
    if (depth > EXPAND_DEPTH_MAX) return; /* nesting beyond this is treated as a dead end */
    const kvd_grammar *g = sp->g;
    const gr_node nd = sp->nodes[id];
    const gr_elem *e = &g->el[nd.el];
    switch (e->kind) {
    case EL_END:
        expand(sp, nd.parent, out, depth + 1);
        return;
    case EL_CHARSET:
        if (nd.state < e->max) set_add(sp, out, id);
        break;
    case EL_RULE:
        if (nd.state < e->max) {
            uint64_t next = count_next(e, nd.state);
            /* a last call returns straight to the caller's caller (right recursion as in
             * GBNF's `list ::= item list | ""` then keeps the stack flat) */
            uint32_t ret = e->max != GR_INF && next >= e->max && g->el[nd.el + 1].kind == EL_END
                               ? nd.parent
                               : intern(sp, nd.el, next, nd.parent);
            if (ret != UINT32_MAX) push_rule(sp, e->ref, ret, out, depth);
        }
        break;
    case EL_OBJECT: {
        const gr_object *o = &g->objects[e->ref];
        uint64_t seen = nd.state & ((1ull << GR_OBJ_MAX_MEMBERS) - 1);
        uint64_t extras = nd.state >> GR_OBJ_MAX_MEMBERS;
        uint32_t count = (uint32_t)__builtin_popcountll(seen) + (uint32_t)extras;
        bool empty = nd.state == 0;
        bool done = (seen & o->required) == o->required && count >= o->min_members;
        if (count < o->max_members) {
            /* ordered: only members after the last one seen, never skipping a required one */
            uint32_t from = 0;
            if (o->ordered && seen) from = 64 - (uint32_t)__builtin_clzll(seen);
            for (uint32_t k = from; k < o->num_members; k++) {
                if ((seen >> k) & 1) continue;
                uint32_t ret = intern(sp, nd.el, nd.state | (1ull << k), nd.parent);
                if (ret == UINT32_MAX) break;
                push_rule(sp, empty ? o->first_rule[k] : o->next_rule[k], ret, out, depth);
                if (o->ordered && ((o->required >> k) & 1)) break;
            }
            if (o->extra_first != GR_NONE) {
                uint64_t x = extras < 255 ? extras + 1 : 255;
                uint32_t ret = intern(sp, nd.el, seen | (x << GR_OBJ_MAX_MEMBERS), nd.parent);
                if (ret != UINT32_MAX) push_rule(sp, empty ? o->extra_first : o->extra_next, ret, out, depth);
            }
        }
        if (!done) return;
        break;
    }
    }
    /* past the element once its minimum is met */
    if (e->kind == EL_OBJECT || nd.state >= e->min) {
        uint32_t nx = intern(sp, nd.el + 1, 0, nd.parent);
        if (nx != UINT32_MAX) expand(sp, nx, out, depth + 1);
    }
}

/* out = the leaves after byte from the leaves of in (in->accept/ctx consume nothing). */
static void advance(gr_space *sp, const gr_set *in, unsigned byte, gr_set *out)
{
    set_clear(out);
    sp->gen++;
    const kvd_grammar *g = sp->g;
    for (size_t i = 0; i < in->n; i++) {
        const gr_node nd = sp->nodes[in->ids[i]];
        const gr_elem *e = &g->el[nd.el];
        if (!gr_bytes_has(&g->sets[e->ref], byte)) continue;
        uint32_t c = intern(sp, nd.el, count_next(e, nd.state), nd.parent);
        if (c != UINT32_MAX) expand(sp, c, out, 0);
    }
}

/* --- interned sets ------------------------------------------------------------------ */

static int u32_cmp(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static bool grow_to(gr_space *sp, void **p, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap) return true;
    size_t n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *q = realloc(*p, n * size);
    if (!q) {
        sp->oom = true;
        return false;
    }
    *p = q;
    *cap = n;
    return true;
}

/* The id of set s (its ids get sorted); UINT32_MAX when out of memory. */
static uint32_t set_intern(gr_space *sp, gr_set *s)
{
    if (s->n > 1) qsort(s->ids, s->n, sizeof *s->ids, u32_cmp);
    uint64_t h = mix(s->n * 4 + s->accept * 2 + s->ctx);
    for (size_t i = 0; i < s->n; i++) h = mix(h ^ s->ids[i]);
    if (sp->rec_slot_cap) {
        for (size_t j = h & (sp->rec_slot_cap - 1); sp->rec_slots[j]; j = (j + 1) & (sp->rec_slot_cap - 1)) {
            const gr_setrec *r = &sp->recs[sp->rec_slots[j] - 1];
            if (r->hash == h && r->n == s->n && r->accept == s->accept && r->ctx == s->ctx &&
                (s->n == 0 || !memcmp(sp->pool + r->off, s->ids, s->n * sizeof *s->ids)))
                return sp->rec_slots[j] - 1;
        }
    }
    if (!grow_to(sp, (void **)&sp->recs, &sp->cap_recs, sp->num_recs + 1, sizeof *sp->recs) ||
        !grow_to(sp, (void **)&sp->pool, &sp->pool_cap, sp->pool_n + s->n, sizeof *sp->pool))
        return UINT32_MAX;
    if ((sp->num_recs + 1) * 2 > sp->rec_slot_cap) {
        size_t cap = sp->rec_slot_cap ? sp->rec_slot_cap * 2 : 256;
        uint32_t *t = calloc(cap, sizeof *t);
        if (!t) {
            sp->oom = true;
            return UINT32_MAX;
        }
        for (size_t k = 0; k < sp->num_recs; k++) {
            size_t j = sp->recs[k].hash & (cap - 1);
            while (t[j]) j = (j + 1) & (cap - 1);
            t[j] = (uint32_t)k + 1;
        }
        free(sp->rec_slots);
        sp->rec_slots = t;
        sp->rec_slot_cap = cap;
    }
    uint32_t id = (uint32_t)sp->num_recs++;
    sp->recs[id] = (gr_setrec){.hash = h, .off = (uint32_t)sp->pool_n, .n = (uint32_t)s->n, .accept = s->accept, .ctx = s->ctx};
    if (s->n) memcpy(sp->pool + sp->pool_n, s->ids, s->n * sizeof *s->ids);
    sp->pool_n += s->n;
    size_t j = h & (sp->rec_slot_cap - 1);
    while (sp->rec_slots[j]) j = (j + 1) & (sp->rec_slot_cap - 1);
    sp->rec_slots[j] = id + 1;
    return id;
}

static bool rec_live(const gr_space *sp, uint32_t id)
{
    const gr_setrec *r = &sp->recs[id];
    return r->n > 0 || r->accept || r->ctx;
}

/* advance() on interned sets, memoised. UINT32_MAX when out of memory. */
static uint32_t advance_id(gr_space *sp, uint32_t sid, unsigned byte)
{
    uint64_t key = ((uint64_t)sid << 8 | byte) + 1;
    if (sp->memo_cap) {
        for (size_t j = mix(key) & (sp->memo_cap - 1); sp->memo_keys[j]; j = (j + 1) & (sp->memo_cap - 1))
            if (sp->memo_keys[j] == key) return sp->memo_vals[j];
    }
    if (!sp->scratch) {
        sp->scratch = calloc(2, sizeof *sp->scratch);
        if (!sp->scratch) {
            sp->oom = true;
            return UINT32_MAX;
        }
    }
    gr_set *in = &sp->scratch[0], *out = &sp->scratch[1];
    const gr_setrec *r = &sp->recs[sid];
    set_clear(in);
    for (uint32_t k = 0; k < r->n; k++) set_add(sp, in, sp->pool[r->off + k]);
    advance(sp, in, byte, out);
    uint32_t res = sp->oom ? UINT32_MAX : set_intern(sp, out);
    if (res == UINT32_MAX) return res;
    if ((sp->memo_n + 1) * 2 > sp->memo_cap) {
        size_t cap = sp->memo_cap ? sp->memo_cap * 2 : 1024;
        uint64_t *k2 = calloc(cap, sizeof *k2);
        uint32_t *v2 = malloc(cap * sizeof *v2);
        if (!k2 || !v2) {
            free(k2);
            free(v2);
            sp->oom = true;
            return UINT32_MAX;
        }
        for (size_t i = 0; i < sp->memo_cap; i++) {
            if (!sp->memo_keys[i]) continue;
            size_t j = mix(sp->memo_keys[i]) & (cap - 1);
            while (k2[j]) j = (j + 1) & (cap - 1);
            k2[j] = sp->memo_keys[i];
            v2[j] = sp->memo_vals[i];
        }
        free(sp->memo_keys);
        free(sp->memo_vals);
        sp->memo_keys = k2;
        sp->memo_vals = v2;
        sp->memo_cap = cap;
    }
    size_t j = mix(key) & (sp->memo_cap - 1);
    while (sp->memo_keys[j]) j = (j + 1) & (sp->memo_cap - 1);
    sp->memo_keys[j] = key;
    sp->memo_vals[j] = res;
    sp->memo_n++;
    return res;
}

/* --- the mask cache -------------------------------------------------------------- */

/* The key's repetition state: counts that no token can tell apart share one value. */
static uint64_t canon_state(const kvd_grammar *g, uint32_t el, uint64_t s)
{
    const gr_elem *e = &g->el[el];
    if (e->kind != EL_CHARSET && e->kind != EL_RULE) return s;
    uint64_t t = (uint64_t)g->vocab->max_token_len + 1;
    bool far_max = e->max == GR_INF || e->max - s > t;
    if (far_max && s >= e->min) return UINT64_MAX;
    if (far_max && e->min - s > t) return UINT64_MAX - 1;
    return s;
}

/* The key frames of leaf id (leaf first: the leaf, then the frames above it while they
 * are inside lexical rules) and the boundary node under them (the context). */
static uint32_t leaf_chain(const gr_space *sp, uint32_t id, uint32_t *els, uint64_t *sts, uint64_t *canon,
                           uint32_t *len)
{
    const kvd_grammar *g = sp->g;
    uint32_t n = 0;
    for (;;) {
        const gr_node *nd = &sp->nodes[id];
        els[n] = nd->el;
        sts[n] = nd->state;
        canon[n] = canon_state(g, nd->el, nd->state);
        n++;
        uint32_t p = nd->parent;
        if (!g->rule_lexical[g->el_rule[nd->el]] || n == CHAIN_MAX || p <= NODE_CTX ||
            !g->rule_lexical[g->el_rule[sp->nodes[p].el]]) {
            *len = n;
            return p;
        }
        id = p;
    }
}

static uint64_t chain_hash(const uint32_t *els, const uint64_t *canon, uint32_t len)
{
    uint64_t h = len;
    for (uint32_t i = 0; i < len; i++) h = mix(h ^ els[i]) ^ mix(canon[i] + i);
    return h;
}

void gr_ci_free(gr_ci *c)
{
    if (!c) return;
    free(c->accepted);
    free(c->acc_bits);
    free(c->rem_off);
    free(c->rem_len);
    free(c->rem_lcp);
    free(c->rem_bytes);
    free(c->rem_tok_start);
    free(c->rem_tok);
    free(c);
}

typedef struct rem_pair {
    const uint8_t *s; /* the remainder: the token's bytes after the key ended */
    uint32_t len, tok;
} rem_pair;

typedef struct vec {
    void *p;
    size_t n, cap, size;
    bool oom;
} vec;

static void *vec_push(vec *v)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 256;
        void *p = realloc(v->p, cap * v->size);
        if (!p) {
            v->oom = true;
            return NULL;
        }
        v->p = p;
        v->cap = cap;
    }
    return (char *)v->p + v->size * v->n++;
}

static int rem_cmp(const void *a, const void *b)
{
    const rem_pair *x = a, *y = b;
    int c = memcmp(x->s, y->s, x->len < y->len ? x->len : y->len);
    if (c) return c;
    if (x->len != y->len) return x->len < y->len ? -1 : 1;
    return x->tok < y->tok ? -1 : x->tok > y->tok;
}

/* The vocabulary walk's transitions, dense per set it meets: a trie node's step is
 * one array read instead of a probe of the space's memo (a walk meets few distinct
 * sets, each with many bytes, while the memo holds every walk the grammar made). */
#define WALK_NONE UINT32_MAX
#define WALK_LOCAL_MAX 4096 /* sets with a dense row (1 KiB each); the rest use the memo */
enum { WALK_LIVE = 1, WALK_CTX = 2 };

typedef struct walk_cache {
    uint32_t *trans;  /* local set * 256 + byte -> local set + 1 (0: not known yet) */
    uint32_t *global; /* local -> interned set */
    uint8_t *flags;   /* local -> WALK_LIVE | WALK_CTX */
    gr_bytes *first;  /* local -> the bytes some leaf takes (any other byte is dead) */
    uint32_t n, cap;
    uint32_t *slots;  /* interned set hash -> local + 1 */
    uint32_t slot_cap;
} walk_cache;

static void walk_cache_free(walk_cache *wc)
{
    free(wc->trans);
    free(wc->global);
    free(wc->flags);
    free(wc->first);
    free(wc->slots);
}

/* The local index of interned set sid (added on first sight); WALK_NONE when the cache
 * is full or out of memory (the walk then steps through the memo). */
static uint32_t walk_local(walk_cache *wc, const gr_space *sp, uint32_t sid)
{
    if (wc->slot_cap) {
        for (uint32_t j = (uint32_t)mix(sid) & (wc->slot_cap - 1); wc->slots[j]; j = (j + 1) & (wc->slot_cap - 1))
            if (wc->global[wc->slots[j] - 1] == sid) return wc->slots[j] - 1;
    }
    if (wc->n == WALK_LOCAL_MAX) return WALK_NONE;
    if (wc->n == wc->cap) {
        uint32_t cap = wc->cap ? wc->cap * 2 : 16;
        uint32_t *trans = realloc(wc->trans, (size_t)cap * 256 * sizeof *trans);
        if (!trans) return WALK_NONE;
        wc->trans = trans;
        memset(trans + (size_t)wc->cap * 256, 0, (size_t)(cap - wc->cap) * 256 * sizeof *trans);
        uint32_t *global = realloc(wc->global, cap * sizeof *global);
        if (!global) return WALK_NONE;
        wc->global = global;
        uint8_t *flags = realloc(wc->flags, cap);
        if (!flags) return WALK_NONE;
        wc->flags = flags;
        gr_bytes *first = realloc(wc->first, cap * sizeof *first);
        if (!first) return WALK_NONE;
        wc->first = first;
        uint32_t *slots = calloc((size_t)cap * 2, sizeof *slots);
        if (!slots) return WALK_NONE;
        for (uint32_t k = 0; k < wc->n; k++) {
            uint32_t j = (uint32_t)mix(wc->global[k]) & (cap * 2 - 1);
            while (slots[j]) j = (j + 1) & (cap * 2 - 1);
            slots[j] = k + 1;
        }
        free(wc->slots);
        wc->slots = slots;
        wc->slot_cap = cap * 2;
        wc->cap = cap;
    }
    uint32_t k = wc->n++;
    wc->global[k] = sid;
    wc->flags[k] = (uint8_t)((rec_live(sp, sid) ? WALK_LIVE : 0) | (sp->recs[sid].ctx ? WALK_CTX : 0));
    const gr_setrec *r = &sp->recs[sid];
    gr_bytes first = {{0}};
    for (uint32_t i = 0; i < r->n; i++) {
        const gr_bytes *b = &sp->g->sets[sp->g->el[sp->nodes[sp->pool[r->off + i]].el].ref];
        for (int w = 0; w < 4; w++) first.w[w] |= b->w[w];
    }
    wc->first[k] = first;
    uint32_t j = (uint32_t)mix(sid) & (wc->slot_cap - 1);
    while (wc->slots[j]) j = (j + 1) & (wc->slot_cap - 1);
    wc->slots[j] = k + 1;
    return k;
}

/* Walks the trie from the key frames alone (parent NODE_CTX). Runs under g->lock. */
static gr_ci *build_ci(kvd_grammar *g, gr_space *sp, const uint32_t *els, const uint64_t *sts, uint32_t len)
{
    const kvd_grammar_vocab *v = g->vocab;
    gr_ci *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    uint32_t parent = NODE_CTX;
    for (uint32_t i = len; i-- > 0;) parent = intern(sp, els[i], sts[i], parent);
    int maxd = v->max_token_len + 1;
    uint32_t *sets = malloc(((size_t)maxd + 1) * sizeof *sets); /* interned set at each depth */
    uint32_t *accepted = calloc((size_t)v->num_words, sizeof *accepted); /* bit per token */
    vec acc = {.size = sizeof(uint32_t)}, pairs = {.size = sizeof(rem_pair)};
    if (!sets || !accepted || parent == UINT32_MAX) goto fail;
    {
        gr_set s0 = {0};
        set_add(sp, &s0, parent);
        sets[0] = set_intern(sp, &s0);
        set_free(&s0);
        if (sets[0] == UINT32_MAX) goto fail;
    }
    walk_cache wc = {0};
    uint32_t *loc = malloc(((size_t)maxd + 1) * sizeof *loc); /* local set at each depth */
    if (!loc) goto fail;
    loc[0] = walk_local(&wc, sp, sets[0]);
    for (size_t i = 1; i < v->num_nodes;) {
        int d = v->node_depth[i];
        const uint32_t pl = loc[d - 1];
        const unsigned byte = v->node_byte[i];
        if (pl != WALK_NONE ? wc.flags[pl] & WALK_CTX : sp->recs[sets[d - 1]].ctx) {
            /* the key ended before this byte: the rest is the context's */
            for (size_t j = i; j < v->node_end[i]; j++)
                for (int32_t t = v->node_token[j]; t >= 0; t = v->node_dup[j] ? v->same_next[t] : -1) {
                    rem_pair *p = vec_push(&pairs);
                    if (p)
                        *p = (rem_pair){v->bytes + v->off[t] + d - 1, v->off[t + 1] - v->off[t] - (uint32_t)(d - 1),
                                        (uint32_t)t};
                }
        }
        if (pl != WALK_NONE && !gr_bytes_has(&wc.first[pl], byte)) { /* no leaf takes it */
            i = v->node_end[i];
            continue;
        }
        uint32_t cl = pl != WALK_NONE ? wc.trans[(size_t)pl * 256 + byte] : 0;
        bool live;
        if (cl) {
            cl--;
            sets[d] = wc.global[cl];
            live = wc.flags[cl] & WALK_LIVE;
        } else {
            uint32_t cur = advance_id(sp, sets[d - 1], byte);
            if (cur == UINT32_MAX) break;
            sets[d] = cur;
            cl = walk_local(&wc, sp, cur);
            if (pl != WALK_NONE && cl != WALK_NONE) wc.trans[(size_t)pl * 256 + byte] = cl + 1;
            live = rec_live(sp, cur);
        }
        loc[d] = cl;
        if (!live) {
            i = v->node_end[i];
            continue;
        }
        for (int32_t t = v->node_token[i]; t >= 0; t = v->node_dup[i] ? v->same_next[t] : -1) {
            accepted[t >> 5] |= 1u << (t & 31);
            uint32_t *p = vec_push(&acc);
            if (p) *p = (uint32_t)t;
        }
        i++;
    }
    walk_cache_free(&wc);
    free(loc);
    if (sp->oom || acc.oom || pairs.oom) goto fail;
    /* remainders of tokens not accepted outright, sorted and grouped */
    rem_pair *pr = pairs.p;
    size_t np = 0;
    for (size_t i = 0; i < pairs.n; i++)
        if (!((accepted[pr[i].tok >> 5] >> (pr[i].tok & 31)) & 1)) pr[np++] = pr[i];
    c->num_accepted = acc.n;
    if (acc.n > 2048) { /* or-ing a whole mask beats setting this many bits */
        c->acc_bits = accepted;
        accepted = NULL;
        free(acc.p);
    } else
        c->accepted = acc.p;
    acc.p = NULL;
    if (np > 1) qsort(pr, np, sizeof *pr, rem_cmp);
    size_t total = 0;
    for (size_t i = 0; i < np; i++) total += pr[i].len;
    c->rem_off = malloc((np + 1) * sizeof *c->rem_off);
    c->rem_len = malloc((np + 1) * sizeof *c->rem_len);
    c->rem_lcp = malloc((np + 1) * sizeof *c->rem_lcp);
    c->rem_tok_start = malloc((np + 2) * sizeof *c->rem_tok_start);
    c->rem_tok = malloc((np + 1) * sizeof *c->rem_tok);
    c->rem_bytes = malloc(total + 1);
    if (!c->rem_off || !c->rem_len || !c->rem_lcp || !c->rem_tok_start || !c->rem_tok || !c->rem_bytes) goto fail;
    size_t nb = 0, nr = 0;
    const uint8_t *last = NULL;
    uint32_t last_len = 0;
    for (size_t i = 0; i < np; i++) {
        const uint8_t *s = pr[i].s;
        uint32_t l = pr[i].len;
        if (!last || l != last_len || memcmp(s, last, l)) {
            uint32_t lcp = 0;
            if (last)
                while (lcp < l && lcp < last_len && s[lcp] == last[lcp]) lcp++;
            c->rem_off[nr] = (uint32_t)nb;
            c->rem_len[nr] = l;
            c->rem_lcp[nr] = lcp;
            c->rem_tok_start[nr] = (uint32_t)i;
            memcpy(c->rem_bytes + nb, s, l);
            last = c->rem_bytes + nb;
            last_len = l;
            nb += l;
            nr++;
        }
        c->rem_tok[i] = pr[i].tok;
    }
    c->rem_tok_start[nr] = (uint32_t)np;
    c->num_rem = nr;
    free(pairs.p);
    free(sets);
    free(accepted);
    return c;
fail:
    free(acc.p);
    free(pairs.p);
    free(sets);
    free(accepted);
    gr_ci_free(c);
    return NULL;
}

static gr_space *grammar_space(kvd_grammar *g);

typedef struct sbuf {
    uint8_t *p;
    size_t n, cap;
    bool bad;
} sbuf;

static void sput(sbuf *b, const void *x, size_t n)
{
    if (b->bad) return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 512;
        while (cap < b->n + n) cap *= 2;
        if (cap > (1u << 16)) { /* too big to be worth sharing */
            b->bad = true;
            return;
        }
        uint8_t *p = realloc(b->p, cap);
        if (!p) {
            b->bad = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, x, n);
    b->n += n;
}

/* Serialises the elements from el to the end of its alternative; rules met are
 * numbered in order of discovery (rules[], *nrules). */
static void ser_elems(const kvd_grammar *g, sbuf *b, uint32_t el, uint32_t *rules, uint32_t *nrules)
{
    for (;; el++) {
        const gr_elem *e = &g->el[el];
        uint8_t kind = e->kind;
        sput(b, &kind, 1);
        if (kind == EL_END) return;
        if (kind == EL_OBJECT || !g->rule_lexical[g->el_rule[el]]) {
            b->bad = true;
            return;
        }
        sput(b, &e->min, sizeof e->min);
        sput(b, &e->max, sizeof e->max);
        if (kind == EL_CHARSET) sput(b, &g->sets[e->ref], sizeof g->sets[e->ref]);
        else {
            uint32_t k = 0;
            while (k < *nrules && rules[k] != e->ref) k++;
            if (k == *nrules) {
                if (*nrules == 256) {
                    b->bad = true;
                    return;
                }
                rules[(*nrules)++] = e->ref;
            }
            sput(b, &k, sizeof k);
        }
    }
}

/* The exact serialisation of a lexical key (false: not shareable). */
static bool ser_chain(const kvd_grammar *g, const uint32_t *els, const uint64_t *canon, uint32_t len, sbuf *b)
{
    uint32_t rules[256], nrules = 0;
    for (uint32_t i = 0; i < len && !b->bad; i++) {
        sput(b, &canon[i], sizeof canon[i]);
        const gr_elem *e = &g->el[els[i]];
        /* a frame above the leaf whose element ran out of repeats can only move on: the
         * rule it called does not matter (the complement tries of object keys nest many) */
        if (i > 0 && e->kind == EL_RULE && canon[i] >= e->max) {
            uint8_t done = 0xEE;
            sput(b, &done, 1);
            ser_elems(g, b, els[i] + 1, rules, &nrules);
        } else
            ser_elems(g, b, els[i], rules, &nrules);
    }
    for (uint32_t k = 0; k < nrules && !b->bad; k++) {
        uint32_t r = rules[k];
        if (!g->rule_lexical[r]) b->bad = true;
        for (uint32_t a = g->rule_alt0[r]; a < g->rule_alt0[r] + g->rule_nalts[r] && !b->bad; a++) {
            uint32_t first = g->alt_start[a];
            if (g->el[first].kind == EL_END && g->el[first].ref == 1) continue;
            uint8_t mark = 0xA5;
            sput(b, &mark, 1);
            ser_elems(g, b, first, rules, &nrules);
        }
        uint8_t end = 0x5A;
        sput(b, &end, 1);
    }
    return !b->bad;
}

static uint64_t bytes_hash(const uint8_t *p, size_t n)
{
    uint64_t h = 0x243f6a8885a308d3ull ^ n;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return mix(h);
}

/* The shared entry for key bytes (built from this grammar on a miss). Runs under
 * g->lock; takes the vocabulary's lock (always in that order). */
static gr_ci *shared_get(kvd_grammar *g, const sbuf *key, const uint32_t *els, const uint64_t *sts, uint32_t len)
{
    kvd_grammar_vocab *v = (kvd_grammar_vocab *)g->vocab;
    uint64_t h = bytes_hash(key->p, key->n);
    gr_ci *found = NULL;
    pthread_mutex_lock(&v->lock);
    if (v->shared_cap)
        for (size_t i = h & (v->shared_cap - 1); v->shared[i].key; i = (i + 1) & (v->shared_cap - 1))
            if (v->shared[i].hash == h && v->shared[i].key_len == key->n && !memcmp(v->shared[i].key, key->p, key->n)) {
                found = v->shared[i].ci;
                goto out;
            }
    if ((v->shared_count + 1) * 2 > v->shared_cap) {
        size_t cap = v->shared_cap ? v->shared_cap * 2 : 64;
        struct gr_shared_ci *t = calloc(cap, sizeof *t);
        if (!t) goto out;
        for (size_t i = 0; i < v->shared_cap; i++) {
            if (!v->shared[i].key) continue;
            size_t j = v->shared[i].hash & (cap - 1);
            while (t[j].key) j = (j + 1) & (cap - 1);
            t[j] = v->shared[i];
        }
        free(v->shared);
        v->shared = t;
        v->shared_cap = cap;
    }
    gr_space *sp = grammar_space(g);
    uint8_t *kcopy = malloc(key->n);
    if (!sp || !kcopy) {
        free(kcopy);
        goto out;
    }
    memcpy(kcopy, key->p, key->n);
    found = build_ci(g, sp, els, sts, len);
    if (!found) {
        free(kcopy);
        goto out;
    }
    size_t j = h & (v->shared_cap - 1);
    while (v->shared[j].key) j = (j + 1) & (v->shared_cap - 1);
    v->shared[j] = (struct gr_shared_ci){h, kcopy, key->n, found};
    v->shared_count++;
out:
    pthread_mutex_unlock(&v->lock);
    return found;
}

void gr_vocab_free_shared(kvd_grammar_vocab *v)
{
    for (size_t i = 0; i < v->shared_cap; i++)
        if (v->shared[i].key) {
            free(v->shared[i].key);
            gr_ci_free(v->shared[i].ci);
        }
    free(v->shared);
    v->shared = NULL;
    v->shared_cap = v->shared_count = 0;
}

/* The cache entry for a key, built on first use. */
static gr_ci *ci_get(kvd_grammar *g, const uint32_t *els, const uint64_t *sts, const uint64_t *canon,
                     uint32_t len)
{
    uint64_t h = chain_hash(els, canon, len);
    pthread_mutex_lock(&g->lock);
    gr_ci *found = NULL;
    if (g->ci_cap) {
        for (size_t i = h & (g->ci_cap - 1);; i = (i + 1) & (g->ci_cap - 1)) {
            struct gr_ci_slot *c = &g->ci_table[i];
            if (!c->ci) break;
            if (c->hash == h && c->len == len && !memcmp(c->el, els, len * sizeof *els) &&
                !memcmp(c->st, canon, len * sizeof *canon)) {
                found = c->ci;
                goto out;
            }
        }
    }
    if ((g->ci_count + 1) * 2 > g->ci_cap) {
        size_t cap = g->ci_cap ? g->ci_cap * 2 : 64;
        struct gr_ci_slot *t = calloc(cap, sizeof *t);
        if (!t) goto out;
        for (size_t i = 0; i < g->ci_cap; i++) {
            if (!g->ci_table[i].ci) continue;
            size_t j = g->ci_table[i].hash & (cap - 1);
            while (t[j].ci) j = (j + 1) & (cap - 1);
            t[j] = g->ci_table[i];
        }
        free(g->ci_table);
        g->ci_table = t;
        g->ci_cap = cap;
    }
    bool owned = true;
    sbuf key = {0};
    if (g->rule_lexical[g->el_rule[els[0]]] && ser_chain(g, els, canon, len, &key)) {
        found = shared_get(g, &key, els, sts, len);
        owned = false;
    } else {
        gr_space *sp = grammar_space(g);
        if (sp) found = build_ci(g, sp, els, sts, len);
    }
    free(key.p);
    /* the walk's nodes are not needed again: keep the arena from growing without bound */
    if (g->ci_space && g->ci_space->n > (1u << 20)) {
        space_deinit(g->ci_space);
        free(g->ci_space);
        g->ci_space = NULL;
    }
    if (!found) goto out;
    struct gr_ci_slot slot = {.hash = h, .len = len, .ci = found, .owned = owned};
    memcpy(slot.el, els, len * sizeof *els);
    memcpy(slot.st, canon, len * sizeof *canon);
    size_t j = h & (g->ci_cap - 1);
    while (g->ci_table[j].ci) j = (j + 1) & (g->ci_cap - 1);
    g->ci_table[j] = slot;
    g->ci_count++;
out:
    pthread_mutex_unlock(&g->lock);
    return found;
}

static gr_space *grammar_space(kvd_grammar *g)
{
    if (g->ci_space) return g->ci_space;
    gr_space *sp = malloc(sizeof *sp);
    if (!sp) return NULL;
    if (space_init(sp, g)) {
        space_deinit(sp);
        free(sp);
        return NULL;
    }
    g->ci_space = sp;
    return sp;
}

void gr_grammar_free_cache(kvd_grammar *g)
{
    for (size_t i = 0; i < g->ci_cap; i++)
        if (g->ci_table[i].owned) gr_ci_free(g->ci_table[i].ci);
    free(g->ci_table);
    if (g->ci_space) {
        space_deinit(g->ci_space);
        free(g->ci_space);
    }
    g->ci_table = NULL;
    g->ci_space = NULL;
}

/* --- matcher --------------------------------------------------------------------- */

kvd_grammar_matcher *kvd_grammar_matcher_create(kvd_grammar *g, kvd_error *err)
{
    kvd_grammar_matcher *m = calloc(1, sizeof *m);
    if (!m || space_init(&m->sp, g)) goto oom;
    m->g = kvd_grammar_retain(g);
    m->sp.gen++;
    push_rule(&m->sp, g->root, NODE_ACCEPT, &m->cur, 0);
    m->hist_slots = 16;
    m->hist_off = malloc(m->hist_slots * sizeof *m->hist_off);
    m->hist_accept = malloc(m->hist_slots);
    if (m->sp.oom || !m->hist_off || !m->hist_accept) goto oom;
    m->hist_off[0] = 0;
    m->hist_accept[0] = m->cur.accept;
    for (size_t i = 0; i < m->cur.n; i++) {
        if (m->hist_n == m->hist_cap) {
            size_t cap = m->hist_cap ? m->hist_cap * 2 : 64;
            uint32_t *p = realloc(m->hist_ids, cap * sizeof *p);
            if (!p) goto oom;
            m->hist_ids = p;
            m->hist_cap = cap;
        }
        m->hist_ids[m->hist_n++] = m->cur.ids[i];
    }
    return m;
oom:
    kvd_error_set(err, KVD_ENOMEM, "grammar matcher: out of memory");
    kvd_grammar_matcher_destroy(m);
    return NULL;
}

void kvd_grammar_matcher_destroy(kvd_grammar_matcher *m)
{
    if (!m) return;
    space_deinit(&m->sp);
    set_free(&m->cur);
    set_free(&m->tmp[0]);
    set_free(&m->tmp[1]);
    for (size_t i = 0; i < m->depth_cap; i++) set_free(&m->depth_sets[i]);
    free(m->depth_sets);
    free(m->hist_ids);
    free(m->hist_off);
    free(m->hist_accept);
    free(m->rem_ok);
    for (int k = 0; k < 256; k++) free(m->memo[k].tokens);
    kvd_grammar_release(m->g);
    free(m);
}

bool kvd_grammar_matcher_can_end(const kvd_grammar_matcher *m) { return m->cur.accept; }
bool kvd_grammar_matcher_is_complete(const kvd_grammar_matcher *m) { return m->cur.accept && m->cur.n == 0; }
size_t kvd_grammar_matcher_num_tokens(const kvd_grammar_matcher *m) { return m->num_tokens; }

static bool ensure_depth(kvd_grammar_matcher *m, size_t n)
{
    if (n <= m->depth_cap) return true;
    gr_set *p = realloc(m->depth_sets, n * sizeof *p);
    if (!p) return false;
    memset(p + m->depth_cap, 0, (n - m->depth_cap) * sizeof *p);
    m->depth_sets = p;
    m->depth_cap = n;
    return true;
}

/* Which of c's remainders the context under boundary accepts: ok[i] for group i. */
static int check_remainders(kvd_grammar_matcher *m, const gr_ci *c, uint32_t boundary, uint8_t *ok)
{
    gr_space *sp = &m->sp;
    if (!ensure_depth(m, (size_t)m->g->vocab->max_token_len + 2)) return KVD_ENOMEM;
    gr_set *ds = m->depth_sets;
    set_clear(&ds[0]);
    sp->gen++;
    expand(sp, boundary, &ds[0], 0);
    ds[0].ctx = false; /* the boundary is a real stack: NODE_CTX never appears here */
    uint32_t fail_depth = UINT32_MAX; /* the previous remainder died after this many bytes */
    for (size_t r = 0; r < c->num_rem; r++) {
        const uint8_t *s = c->rem_bytes + c->rem_off[r];
        uint32_t len = c->rem_len[r], lcp = c->rem_lcp[r];
        ok[r] = 0;
        if (fail_depth != UINT32_MAX && lcp > fail_depth) continue; /* shares the dead prefix */
        fail_depth = UINT32_MAX;
        uint32_t d = lcp;
        for (; d < len; d++) {
            advance(sp, &ds[d], s[d], &ds[d + 1]);
            if (ds[d + 1].n == 0) {
                /* accept at the end is fine only after the last byte */
                if (!(ds[d + 1].accept && d + 1 == len)) break;
            }
        }
        if (d == len) ok[r] = 1;
        else fail_depth = d;
    }
    return sp->oom ? KVD_ENOMEM : 0;
}

int kvd_grammar_matcher_fill_mask(kvd_grammar_matcher *m, uint32_t *mask, kvd_error *err)
{
    kvd_grammar *g = m->g;
    const kvd_grammar_vocab *v = g->vocab;
    /* the first whole-mask entry is copied rather than or-ed into zeros */
    bool started = false;
    /* distinct (key, boundary) pairs of the current leaves */
    const gr_ci *done_c[64];
    uint32_t done_b[64];
    size_t ndone = 0;
    for (size_t i = 0; i < m->cur.n; i++) {
        uint32_t els[CHAIN_MAX], len;
        uint64_t sts[CHAIN_MAX], canon[CHAIN_MAX];
        uint32_t boundary = leaf_chain(&m->sp, m->cur.ids[i], els, sts, canon, &len);
        gr_ci *c = ci_get(g, els, sts, canon, len);
        if (!c) return kvd_error_set(err, KVD_ENOMEM, "grammar mask: out of memory");
        bool seen = false;
        for (size_t k = 0; k < ndone && !seen; k++) seen = done_c[k] == c && done_b[k] == boundary;
        if (seen) continue;
        if (ndone < 64) {
            done_c[ndone] = c;
            done_b[ndone] = boundary;
            ndone++;
        }
        if (!started) {
            if (c->acc_bits) memcpy(mask, c->acc_bits, (size_t)v->num_words * sizeof *mask);
            else memset(mask, 0, (size_t)v->num_words * sizeof *mask);
        } else if (c->acc_bits)
            for (int w = 0; w < v->num_words; w++) mask[w] |= c->acc_bits[w];
        if (!c->acc_bits)
            for (size_t k = 0; k < c->num_accepted; k++) mask[c->accepted[k] >> 5] |= 1u << (c->accepted[k] & 31);
        started = true;
        if (!c->num_rem || boundary == NODE_CTX) continue;
        size_t slot = (size_t)(mix((uint64_t)(uintptr_t)c ^ ((uint64_t)boundary << 40)) & 255);
        while (m->memo[slot].ci && !(m->memo[slot].ci == c && m->memo[slot].boundary == boundary))
            slot = (slot + 1) & 255;
        if (m->memo[slot].ci) {
            for (uint32_t k = 0; k < m->memo[slot].n; k++)
                mask[m->memo[slot].tokens[k] >> 5] |= 1u << (m->memo[slot].tokens[k] & 31);
            continue;
        }
        if (c->num_rem > m->rem_ok_cap) {
            uint8_t *p = realloc(m->rem_ok, c->num_rem);
            if (!p) return kvd_error_set(err, KVD_ENOMEM, "grammar mask: out of memory");
            m->rem_ok = p;
            m->rem_ok_cap = c->num_rem;
        }
        if (check_remainders(m, c, boundary, m->rem_ok))
            return kvd_error_set(err, KVD_ENOMEM, "grammar mask: out of memory");
        uint32_t n = 0;
        for (size_t r = 0; r < c->num_rem; r++) {
            if (!m->rem_ok[r]) continue;
            n += c->rem_tok_start[r + 1] - c->rem_tok_start[r];
            for (uint32_t k = c->rem_tok_start[r]; k < c->rem_tok_start[r + 1]; k++)
                mask[c->rem_tok[k] >> 5] |= 1u << (c->rem_tok[k] & 31);
        }
        if (m->memo_used >= 192) { /* keep probing short: start over */
            for (int k = 0; k < 256; k++) free(m->memo[k].tokens);
            memset(m->memo, 0, sizeof m->memo);
            m->memo_used = 0;
            slot = (size_t)(mix((uint64_t)(uintptr_t)c ^ ((uint64_t)boundary << 40)) & 255);
        }
        uint32_t *list = malloc(((size_t)n + 1) * sizeof *list);
        if (!list) continue; /* only the memo is lost */
        uint32_t k2 = 0;
        for (size_t r = 0; r < c->num_rem; r++)
            if (m->rem_ok[r])
                for (uint32_t k = c->rem_tok_start[r]; k < c->rem_tok_start[r + 1]; k++) list[k2++] = c->rem_tok[k];
        m->memo[slot] = (struct rem_memo){c, boundary, n, list};
        m->memo_used++;
    }
    if (!started) memset(mask, 0, (size_t)v->num_words * sizeof *mask); /* no leaf: nothing but the end */
    return 0;
}

int kvd_grammar_matcher_accept(kvd_grammar_matcher *m, int32_t id, kvd_error *err)
{
    const kvd_grammar_vocab *v = m->g->vocab;
    if (id < 0 || id >= v->num_ids || v->off[id + 1] == v->off[id])
        return kvd_error_set(err, KVD_EINVAL, "grammar: token %d is not allowed here", (int)id);
    gr_set *a = &m->tmp[0], *b = &m->tmp[1];
    set_clear(a);
    for (size_t i = 0; i < m->cur.n; i++) set_add(&m->sp, a, m->cur.ids[i]);
    for (uint32_t k = v->off[id]; k < v->off[id + 1]; k++) {
        advance(&m->sp, a, v->bytes[k], b);
        gr_set t = *a;
        *a = *b;
        *b = t;
        if (!set_live(a)) break;
    }
    if (m->sp.oom) return kvd_error_set(err, KVD_ENOMEM, "grammar: out of memory");
    if (!set_live(a)) return kvd_error_set(err, KVD_EINVAL, "grammar: token %d is not allowed here", (int)id);
    /* record the new state in the history */
    if (m->num_tokens + 2 > m->hist_slots) {
        size_t n = m->hist_slots * 2;
        size_t *off = realloc(m->hist_off, n * sizeof *off);
        if (!off) return kvd_error_set(err, KVD_ENOMEM, "grammar: out of memory");
        m->hist_off = off;
        uint8_t *acc = realloc(m->hist_accept, n);
        if (!acc) return kvd_error_set(err, KVD_ENOMEM, "grammar: out of memory");
        m->hist_accept = acc;
        m->hist_slots = n;
    }
    if (m->hist_n + a->n > m->hist_cap) {
        size_t cap = m->hist_cap ? m->hist_cap : 64;
        while (cap < m->hist_n + a->n) cap *= 2;
        uint32_t *p = realloc(m->hist_ids, cap * sizeof *p);
        if (!p) return kvd_error_set(err, KVD_ENOMEM, "grammar: out of memory");
        m->hist_ids = p;
        m->hist_cap = cap;
    }
    m->num_tokens++;
    m->hist_off[m->num_tokens] = m->hist_n;
    m->hist_accept[m->num_tokens] = a->accept;
    if (a->n) memcpy(m->hist_ids + m->hist_n, a->ids, a->n * sizeof *a->ids);
    m->hist_n += a->n;
    gr_set t = m->cur;
    m->cur = *a;
    *a = t;
    return 0;
}

int kvd_grammar_matcher_rollback(kvd_grammar_matcher *m, size_t n)
{
    if (n > m->num_tokens) return KVD_EINVAL;
    size_t k = m->num_tokens - n;
    size_t start = m->hist_off[k], end = k < m->num_tokens ? m->hist_off[k + 1] : m->hist_n;
    set_clear(&m->cur);
    for (size_t i = start; i < end; i++) set_add(&m->sp, &m->cur, m->hist_ids[i]);
    if (m->sp.oom) return KVD_ENOMEM;
    m->cur.accept = m->hist_accept[k];
    m->hist_n = end;
    m->num_tokens = k;
    return 0;
}

int gr_accepts_text(const kvd_grammar *g, const char *text, size_t len)
{
    gr_space sp;
    gr_set a = {0}, c = {0};
    int found = KVD_ENOMEM;
    if (space_init(&sp, g) == 0) {
        sp.gen++;
        push_rule(&sp, g->root, NODE_ACCEPT, &a, 0);
        for (size_t i = 0; i < len && set_live(&a); i++) {
            advance(&sp, &a, (unsigned char)text[i], &c);
            gr_set t = a;
            a = c;
            c = t;
        }
        found = sp.oom ? KVD_ENOMEM : a.accept;
    }
    space_deinit(&sp);
    set_free(&a);
    set_free(&c);
    return found;
}

int gr_regex_search(const kvd_grammar_vocab *v, const char *re, const char *text, size_t len)
{
    gr_builder b;
    gr_builder_init(&b, NULL);
    uint32_t r = gr_regex(&b, re, strlen(re), true, false, NULL, NULL);
    kvd_grammar *g = gr_finish(&b, v, r, NULL);
    if (!g) return KVD_EINVAL;
    int found = gr_accepts_text(g, text, len);
    kvd_grammar_release(g);
    return found;
}
