/* vocab.c - every token's bytes and a byte trie over them (depth-first order, so a
 * subtree is a contiguous range the mask walk can skip in one step). */
#include <stdlib.h>
#include <string.h>

#include "grammar_internal.h"

typedef struct tok_ref {
    const uint8_t *s;
    uint32_t len;
    int32_t id;
} tok_ref;

static int tok_cmp(const void *a, const void *b)
{
    const tok_ref *x = a, *y = b;
    int c = memcmp(x->s, y->s, x->len < y->len ? x->len : y->len);
    if (c) return c;
    if (x->len != y->len) return x->len < y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

void kvd_grammar_vocab_destroy(kvd_grammar_vocab *v)
{
    if (!v) return;
    gr_vocab_free_shared(v);
    pthread_mutex_destroy(&v->lock);
    free(v->bytes);
    free(v->off);
    free(v->node_byte);
    free(v->node_token);
    free(v->node_end);
    free(v->node_depth);
    free(v->same_next);
    free(v->node_dup);
    free(v);
}

int kvd_grammar_mask_words(const kvd_grammar_vocab *v) { return v->num_words; }

kvd_grammar_vocab *kvd_grammar_vocab_create(const kvd_tokenizer *tok, int num_ids, kvd_error *err)
{
    int tok_ids = kvd_tokenizer_vocab_size(tok);
    if (num_ids < tok_ids) num_ids = tok_ids;
    kvd_grammar_vocab *v = calloc(1, sizeof *v);
    tok_ref *refs = NULL;
    if (!v) goto oom;
    pthread_mutex_init(&v->lock, NULL);
    v->num_ids = num_ids;
    v->num_words = (num_ids + 31) / 32;
    v->off = calloc((size_t)num_ids + 1, sizeof *v->off);
    v->same_next = malloc((size_t)num_ids * sizeof *v->same_next);
    size_t cap = 1u << 20, n = 0;
    v->bytes = malloc(cap);
    if (!v->off || !v->same_next || !v->bytes) goto oom;
    for (int id = 0; id < num_ids; id++) {
        v->off[id] = (uint32_t)n;
        v->same_next[id] = -1;
        if (id >= tok_ids || kvd_tokenizer_is_special(tok, id)) continue;
        int32_t one = id;
        size_t len = 0;
        char *text = kvd_tokenizer_decode(tok, &one, 1, false, &len, NULL);
        if (!text) continue; /* an id the tokenizer does not define */
        if (len > 65535) len = 0;
        if (n + len > cap) {
            while (n + len > cap) cap *= 2;
            uint8_t *p = realloc(v->bytes, cap);
            if (!p) {
                free(text);
                goto oom;
            }
            v->bytes = p;
        }
        memcpy(v->bytes + n, text, len);
        n += len;
        free(text);
        if ((int)len > v->max_token_len) v->max_token_len = (int)len;
    }
    v->off[num_ids] = (uint32_t)n;
    refs = malloc((size_t)num_ids * sizeof *refs);
    if (!refs) goto oom;
    size_t nt = 0, total = 0;
    for (int id = 0; id < num_ids; id++) {
        uint32_t len = v->off[id + 1] - v->off[id];
        if (!len) continue;
        refs[nt++] = (tok_ref){v->bytes + v->off[id], len, id};
        total += len;
    }
    qsort(refs, nt, sizeof *refs, tok_cmp);
    size_t max_nodes = total + 1;
    v->node_byte = malloc(max_nodes);
    v->node_token = malloc(max_nodes * sizeof *v->node_token);
    v->node_end = malloc(max_nodes * sizeof *v->node_end);
    v->node_depth = malloc(max_nodes * sizeof *v->node_depth);
    v->node_dup = calloc(max_nodes, 1);
    uint32_t *open = malloc(((size_t)v->max_token_len + 1) * sizeof *open); /* node at each depth */
    if (!v->node_byte || !v->node_token || !v->node_end || !v->node_depth || !v->node_dup || !open) {
        free(open);
        goto oom;
    }
    size_t nn = 1;
    v->node_byte[0] = 0;
    v->node_token[0] = -1;
    v->node_depth[0] = 0;
    open[0] = 0;
    uint32_t depth = 0; /* depth of the deepest open node */
    const tok_ref *prev = NULL;
    for (size_t i = 0; i < nt; i++) {
        const tok_ref *t = &refs[i];
        uint32_t lcp = 0;
        if (prev)
            while (lcp < t->len && lcp < prev->len && t->s[lcp] == prev->s[lcp]) lcp++;
        if (prev && lcp == t->len && lcp == prev->len) { /* same bytes as the previous id */
            int32_t x = v->node_token[open[depth]];
            v->node_dup[open[depth]] = 1;
            while (v->same_next[x] >= 0) x = v->same_next[x];
            v->same_next[x] = t->id;
            continue;
        }
        while (depth > lcp) v->node_end[open[depth--]] = (uint32_t)nn;
        for (uint32_t d = lcp; d < t->len; d++) {
            v->node_byte[nn] = t->s[d];
            v->node_token[nn] = -1;
            v->node_depth[nn] = (uint16_t)(d + 1);
            open[++depth] = (uint32_t)nn++;
        }
        v->node_token[open[depth]] = t->id;
        prev = t;
    }
    while (depth > 0) v->node_end[open[depth--]] = (uint32_t)nn;
    v->node_end[0] = (uint32_t)nn;
    v->num_nodes = nn;
    free(open);
    free(refs);
    return v;
oom:
    free(refs);
    kvd_grammar_vocab_destroy(v);
    kvd_error_set(err, KVD_ENOMEM, "grammar vocabulary: out of memory");
    return NULL;
}
