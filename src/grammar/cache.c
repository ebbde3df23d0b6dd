/* cache.c - compiled grammars by (kind, source), least recently used out. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "grammar_internal.h"

typedef struct entry {
    uint64_t hash, last_use;
    kvd_grammar_kind kind;
    char *src;
    size_t len;
    kvd_grammar *g; /* one reference held by the cache */
} entry;

struct kvd_grammar_cache {
    kvd_grammar_vocab *vocab;
    pthread_mutex_t lock;
    entry *e;
    int cap, n;
    uint64_t clock, hits, misses;
};

kvd_grammar_cache *kvd_grammar_cache_create(kvd_grammar_vocab *vocab, int capacity, kvd_error *err)
{
    kvd_grammar_cache *c = calloc(1, sizeof *c);
    if (c) c->e = calloc((size_t)(capacity > 0 ? capacity : 1), sizeof *c->e);
    if (!c || !c->e) {
        free(c);
        kvd_error_set(err, KVD_ENOMEM, "grammar cache: out of memory");
        return NULL;
    }
    c->vocab = vocab;
    c->cap = capacity > 0 ? capacity : 1;
    pthread_mutex_init(&c->lock, NULL);
    return c;
}

void kvd_grammar_cache_destroy(kvd_grammar_cache *c)
{
    if (!c) return;
    for (int i = 0; i < c->n; i++) {
        free(c->e[i].src);
        kvd_grammar_release(c->e[i].g);
    }
    free(c->e);
    pthread_mutex_destroy(&c->lock);
    kvd_grammar_vocab_destroy(c->vocab);
    free(c);
}

void kvd_grammar_cache_stats(kvd_grammar_cache *c, uint64_t *hits, uint64_t *misses)
{
    pthread_mutex_lock(&c->lock);
    *hits = c->hits;
    *misses = c->misses;
    pthread_mutex_unlock(&c->lock);
}

static kvd_grammar *compile(kvd_grammar_cache *c, kvd_grammar_kind kind, const char *src, size_t len, kvd_error *err)
{
    switch (kind) {
    case KVD_GRAMMAR_JSON_SCHEMA: return kvd_grammar_compile_json_schema(c->vocab, src, len, NULL, err);
    case KVD_GRAMMAR_JSON_OBJECT: return kvd_grammar_compile_json_object(c->vocab, err);
    case KVD_GRAMMAR_REGEX: return kvd_grammar_compile_regex(c->vocab, src, len, err);
    case KVD_GRAMMAR_GBNF: return kvd_grammar_compile_gbnf(c->vocab, src, len, err);
    case KVD_GRAMMAR_CHOICE: {
        size_t n = 0;
        for (size_t i = 0; i < len; i++) n += src[i] == 0;
        const char **ch = malloc((n + 1) * sizeof *ch);
        if (!ch) {
            kvd_error_set(err, KVD_ENOMEM, "grammar: out of memory");
            return NULL;
        }
        size_t k = 0;
        for (size_t i = 0; i < len; i += strlen(src + i) + 1) ch[k++] = src + i;
        kvd_grammar *g = kvd_grammar_compile_choice(c->vocab, ch, k, err);
        free(ch);
        return g;
    }
    }
    kvd_error_set(err, KVD_EINVAL, "grammar: unknown kind");
    return NULL;
}

kvd_grammar *kvd_grammar_cache_get(kvd_grammar_cache *c, kvd_grammar_kind kind, const char *src, size_t len,
                                   kvd_error *err)
{
    uint64_t h = XXH3_64bits(src, len) ^ (uint64_t)kind;
    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < c->n; i++) {
        entry *e = &c->e[i];
        if (e->hash == h && e->kind == kind && e->len == len && !memcmp(e->src, src, len)) {
            e->last_use = ++c->clock;
            c->hits++;
            kvd_grammar *g = kvd_grammar_retain(e->g);
            pthread_mutex_unlock(&c->lock);
            return g;
        }
    }
    c->misses++;
    pthread_mutex_unlock(&c->lock);
    kvd_grammar *g = compile(c, kind, src, len, err);
    char *copy = g ? malloc(len + 1) : NULL;
    if (!copy) return g; /* compiled (or failed) but not cached */
    memcpy(copy, src, len);
    copy[len] = 0;
    pthread_mutex_lock(&c->lock);
    int slot = c->n;
    if (c->n == c->cap) {
        slot = 0;
        for (int i = 1; i < c->n; i++)
            if (c->e[i].last_use < c->e[slot].last_use) slot = i;
        free(c->e[slot].src);
        kvd_grammar_release(c->e[slot].g);
    } else
        c->n++;
    c->e[slot] = (entry){h, ++c->clock, kind, copy, len, kvd_grammar_retain(g)};
    pthread_mutex_unlock(&c->lock);
    return g;
}
