/* bpe.c - byte-pair merging by rank, its lookup tables and the per-word cache.
 *
 * A piece's bytes start as single-byte symbols; the pair with the lowest merge rank is
 * merged first, ties going to the leftmost pair, until no adjacent pair has a merge. That
 * is the order Hugging Face's tokenizers (and @lenml/tokenizers) apply, and it differs
 * from "merge every occurrence of the best pair" only in how ties are broken, so the
 * tie rule matters. Candidates sit in a binary heap keyed by (rank, position); merged-away
 * candidates are detected when popped (their symbols changed), so a word of n bytes costs
 * O(n log n) even when a pre-tokenizer hands over 100 KB of one letter.
 *
 * Most text repeats its words, so results for pieces up to TOK_CACHE_MAX_WORD bytes are
 * kept in a direct-mapped cache split into shards, each behind its own mutex: encoders on
 * different threads rarely meet on one lock, and a collision simply replaces the entry.
 */
#include "tok_internal.h"

#include <stdlib.h>
#include <string.h>

#define TOK_CACHE_SHARDS 16
#define TOK_CACHE_SHARD_SLOTS 4096
#define TOK_CACHE_MAX_WORD 64

static uint64_t hash_bytes(const unsigned char *s, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a, then a final mix for the low bits */
    for (size_t i = 0; i < len; i++)
        h = (h ^ s[i]) * 0x100000001b3ull;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    return h;
}

static uint64_t hash_pair(uint64_t pair)
{
    pair *= 0x9e3779b97f4a7c15ull;
    return pair ^ (pair >> 29);
}

/* The smallest power of two at least 1.5x count: tables at most 2/3 full, where linear
 * probing still finds a key in ~2 probes and misses in ~5. At 2x, Qwen's 151k merges
 * and vocabulary each took the next power (2^19 slots: 8 + 2 MiB resident in every
 * daemon); at 1.5x they fit 2^18 (4 + 1 MiB). */
static size_t table_size_for(size_t count)
{
    size_t size = 64;
    while (size < count + count / 2)
        size *= 2;
    return size;
}

/* ---- vocabulary: bytes -> id ---- */

int tok_vocab_map_build(kvd_tokenizer *tok, kvd_error *err)
{
    size_t count = 0;
    for (int32_t id = 0; id < tok->num_ids; id++)
        count += (tok->id_flags[id] & TOK_ID_BPE) != 0;
    size_t size = table_size_for(count);
    int32_t *slots = malloc(size * sizeof *slots);
    if (!slots)
        return kvd_error_set(err, KVD_ENOMEM, "tokenizer: out of memory for the vocabulary map");
    for (size_t i = 0; i < size; i++)
        slots[i] = -1;
    tok->vocab.slots = slots;
    tok->vocab.mask = size - 1;
    for (int32_t id = 0; id < tok->num_ids; id++) {
        if (!(tok->id_flags[id] & TOK_ID_BPE))
            continue;
        const unsigned char *s = tok->token_bytes + tok->token_offset[id];
        size_t len = tok->token_offset[id + 1] - tok->token_offset[id];
        size_t i = hash_bytes(s, len) & tok->vocab.mask;
        while (slots[i] >= 0)
            i = (i + 1) & tok->vocab.mask;
        slots[i] = id;
    }
    return KVD_OK;
}

int32_t tok_vocab_lookup(const kvd_tokenizer *tok, const unsigned char *s, size_t len)
{
    size_t i = hash_bytes(s, len) & tok->vocab.mask;
    for (int32_t id; (id = tok->vocab.slots[i]) >= 0; i = (i + 1) & tok->vocab.mask) {
        uint32_t off = tok->token_offset[id];
        if (tok->token_offset[id + 1] - off == len && memcmp(tok->token_bytes + off, s, len) == 0)
            return id;
    }
    return -1;
}

/* ---- merges: (left, right) -> rank, merged id ---- */

int tok_merge_map_init(tok_merge_map *m, size_t num_merges)
{
    size_t size = table_size_for(num_merges);
    m->slots = malloc(size * sizeof *m->slots);
    if (!m->slots)
        return KVD_ENOMEM;
    for (size_t i = 0; i < size; i++)
        m->slots[i].pair = TOK_PAIR_EMPTY;
    m->mask = size - 1;
    return KVD_OK;
}

void tok_merge_map_put(tok_merge_map *m, int32_t left, int32_t right, uint32_t rank, int32_t merged)
{
    uint64_t pair = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    size_t i = hash_pair(pair) & m->mask;
    while (m->slots[i].pair != TOK_PAIR_EMPTY && m->slots[i].pair != pair)
        i = (i + 1) & m->mask;
    m->slots[i] = (tok_merge_slot){.pair = pair, .rank = rank, .merged = merged};
}

const tok_merge_slot *tok_merge_lookup(const tok_merge_map *m, int32_t left, int32_t right)
{
    uint64_t pair = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (size_t i = hash_pair(pair) & m->mask; m->slots[i].pair != TOK_PAIR_EMPTY;
         i = (i + 1) & m->mask) {
        if (m->slots[i].pair == pair)
            return &m->slots[i];
    }
    return NULL;
}

/* ---- the word cache ---- */

typedef struct tok_cache_entry {
    uint64_t hash;
    uint32_t len, num_ids;
    int32_t ids[]; /* (num_ids), then the word's len bytes */
} tok_cache_entry;

struct tok_cache {
    struct tok_cache_shard {
        pthread_mutex_t lock;
        tok_cache_entry *slots[TOK_CACHE_SHARD_SLOTS];
    } shards[TOK_CACHE_SHARDS];
};

tok_cache *tok_cache_create(void)
{
    tok_cache *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    for (size_t s = 0; s < TOK_CACHE_SHARDS; s++) {
        if (pthread_mutex_init(&c->shards[s].lock, NULL) != 0) {
            while (s-- > 0)
                pthread_mutex_destroy(&c->shards[s].lock);
            free(c);
            return NULL;
        }
    }
    return c;
}

void tok_cache_destroy(tok_cache *c)
{
    if (!c)
        return;
    for (size_t s = 0; s < TOK_CACHE_SHARDS; s++) {
        for (size_t i = 0; i < TOK_CACHE_SHARD_SLOTS; i++)
            free(c->shards[s].slots[i]);
        pthread_mutex_destroy(&c->shards[s].lock);
    }
    free(c);
}

static struct tok_cache_shard *cache_shard(tok_cache *c, uint64_t hash, size_t *slot)
{
    *slot = hash & (TOK_CACHE_SHARD_SLOTS - 1);
    return &c->shards[hash >> 60];
}

/* Appends the cached ids of the word to out (which has room for len ids). */
static bool cache_get(tok_cache *c, uint64_t hash, const unsigned char *word, size_t len,
                      tok_ids *out)
{
    size_t slot;
    struct tok_cache_shard *shard = cache_shard(c, hash, &slot);
    bool hit = false;
    pthread_mutex_lock(&shard->lock);
    const tok_cache_entry *e = shard->slots[slot];
    if (e && e->hash == hash && e->len == len &&
        memcmp((const unsigned char *)(e->ids + e->num_ids), word, len) == 0) {
        memcpy(out->ids + out->len, e->ids, e->num_ids * sizeof *e->ids);
        out->len += e->num_ids;
        hit = true;
    }
    pthread_mutex_unlock(&shard->lock);
    return hit;
}

static void cache_put(tok_cache *c, uint64_t hash, const unsigned char *word, size_t len,
                      const int32_t *ids, size_t num_ids)
{
    tok_cache_entry *e = malloc(sizeof *e + num_ids * sizeof *ids + len);
    if (!e)
        return; /* a word left uncached only costs time */
    e->hash = hash;
    e->len = (uint32_t)len;
    e->num_ids = (uint32_t)num_ids;
    memcpy(e->ids, ids, num_ids * sizeof *ids);
    memcpy((unsigned char *)(e->ids + num_ids), word, len);
    size_t slot;
    struct tok_cache_shard *shard = cache_shard(c, hash, &slot);
    pthread_mutex_lock(&shard->lock);
    tok_cache_entry *old = shard->slots[slot];
    shard->slots[slot] = e;
    pthread_mutex_unlock(&shard->lock);
    free(old);
}

/* ---- the merge loop ---- */

int tok_ids_reserve(tok_ids *v, size_t more)
{
    if (v->cap - v->len >= more)
        return KVD_OK;
    size_t cap = v->cap ? v->cap * 2 : 64;
    while (cap - v->len < more)
        cap *= 2;
    int32_t *ids = realloc(v->ids, cap * sizeof *ids);
    if (!ids)
        return KVD_ENOMEM;
    v->ids = ids;
    v->cap = cap;
    return KVD_OK;
}

typedef struct merge_candidate {
    uint32_t rank;
    uint32_t pos; /* left symbol's first byte: the tie-break */
    int32_t left, right, merged;
} merge_candidate;

static bool candidate_before(const merge_candidate *a, const merge_candidate *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(merge_candidate *heap, size_t *n, merge_candidate c)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!candidate_before(&c, &heap[parent]))
            break;
        heap[i] = heap[parent];
        i = parent;
    }
    heap[i] = c;
}

static merge_candidate heap_pop(merge_candidate *heap, size_t *n)
{
    merge_candidate top = heap[0], last = heap[--*n];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= *n)
            break;
        if (child + 1 < *n && candidate_before(&heap[child + 1], &heap[child]))
            child++;
        if (!candidate_before(&heap[child], &last))
            break;
        heap[i] = heap[child];
        i = child;
    }
    if (*n > 0)
        heap[i] = last;
    return top;
}

void tok_bpe_scratch_free(tok_bpe_scratch *s)
{
    free(s->sym);
    free(s->prev);
    free(s->next);
    free(s->heap);
    *s = (tok_bpe_scratch){0};
}

static int scratch_reserve(tok_bpe_scratch *s, size_t len)
{
    if (s->cap >= len)
        return KVD_OK;
    size_t cap = s->cap ? s->cap : 256;
    while (cap < len)
        cap *= 2;
    tok_bpe_scratch grown = {
        .sym = malloc(cap * sizeof(int32_t)),
        .prev = malloc(cap * sizeof(int32_t)),
        .next = malloc(cap * sizeof(int32_t)),
        .heap = malloc(3 * cap * sizeof(merge_candidate)),
        .cap = cap,
    };
    if (!grown.sym || !grown.prev || !grown.next || !grown.heap) {
        tok_bpe_scratch_free(&grown);
        return KVD_ENOMEM;
    }
    tok_bpe_scratch_free(s);
    *s = grown;
    return KVD_OK;
}

static void push_candidate(const kvd_tokenizer *tok, const int32_t *sym, const int32_t *next,
                           int32_t pos, merge_candidate *heap, size_t *n)
{
    const tok_merge_slot *m = tok_merge_lookup(&tok->merges, sym[pos], sym[next[pos]]);
    if (m)
        heap_push(heap, n, (merge_candidate){m->rank, (uint32_t)pos, sym[pos], sym[next[pos]], m->merged});
}

/* Appends the merged ids of word (len >= 2) to out, which has room for len ids. */
static int bpe_merge(const kvd_tokenizer *tok, const unsigned char *word, size_t len,
                     tok_bpe_scratch *scratch, tok_ids *out)
{
    if (len > INT32_MAX || scratch_reserve(scratch, len) < 0)
        return KVD_ENOMEM;
    int32_t *sym = scratch->sym, *prev = scratch->prev, *next = scratch->next;
    merge_candidate *heap = scratch->heap; /* (3 * len): n-1 initial + 2 per merge */
    size_t num_heap = 0;
    int32_t n = (int32_t)len;
    for (int32_t i = 0; i < n; i++) {
        sym[i] = tok->byte_id[word[i]];
        prev[i] = i - 1;
        next[i] = i + 1 < n ? i + 1 : -1;
    }
    for (int32_t i = 0; i + 1 < n; i++)
        push_candidate(tok, sym, next, i, heap, &num_heap);
    while (num_heap > 0) {
        merge_candidate c = heap_pop(heap, &num_heap);
        int32_t pos = (int32_t)c.pos, right = next[pos];
        /* Stale when either symbol has been merged into something else since. */
        if (sym[pos] != c.left || right < 0 || sym[right] != c.right)
            continue;
        sym[pos] = c.merged;
        sym[right] = -1;
        next[pos] = next[right];
        if (next[pos] >= 0)
            prev[next[pos]] = pos;
        if (prev[pos] >= 0)
            push_candidate(tok, sym, next, prev[pos], heap, &num_heap);
        if (next[pos] >= 0)
            push_candidate(tok, sym, next, pos, heap, &num_heap);
    }
    for (int32_t i = 0; i >= 0; i = next[i])
        out->ids[out->len++] = sym[i];
    return KVD_OK;
}

int tok_bpe_piece(const kvd_tokenizer *tok, const unsigned char *piece, size_t len,
                  tok_bpe_scratch *scratch, tok_ids *out)
{
    if (tok_ids_reserve(out, len) < 0) /* merging never yields more ids than bytes */
        return KVD_ENOMEM;
    if (len == 1) {
        out->ids[out->len++] = tok->byte_id[piece[0]];
        return KVD_OK;
    }
    if (tok->ignore_merges) {
        int32_t id = tok_vocab_lookup(tok, piece, len);
        if (id >= 0) {
            out->ids[out->len++] = id;
            return KVD_OK;
        }
    }
    bool cacheable = len <= TOK_CACHE_MAX_WORD;
    uint64_t hash = cacheable ? hash_bytes(piece, len) : 0;
    if (cacheable && cache_get(tok->cache, hash, piece, len, out))
        return KVD_OK;
    size_t start = out->len;
    int rc = bpe_merge(tok, piece, len, scratch, out);
    if (rc < 0)
        return rc;
    if (cacheable)
        cache_put(tok->cache, hash, piece, len, out->ids + start, out->len - start);
    return KVD_OK;
}
