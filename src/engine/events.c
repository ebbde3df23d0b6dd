/* events.c - token events: preallocated slabs the consumer hands back by freeing them.
 *
 * Every generated token becomes a kvd_event that crosses to another thread, which
 * frees it with kvd_event_free. To keep the decode step free of malloc, events come
 * from a pool of fixed-size slabs made at engine creation: the slab remembers its
 * pool, and kvd_event_free puts it back on the pool's free list under the pool's own
 * lock (the engine's queue lock is not involved). When the consumer falls behind and
 * the pool is empty, or an event is larger than a slab (an unusually long stop
 * string), the event is malloc'ed instead. The pool is reference counted by its
 * outstanding slabs so events may outlive the engine.
 */
#include <stdalign.h>
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

typedef struct eng_slab {
    kvd_event ev;                /* first: a kvd_event pointer is a slab pointer */
    eng_event_pool *pool;        /* NULL when malloc'ed on its own */
    struct eng_slab *next_free;
    int32_t token_space[1];
    kvd_token_logprob logprob_space[1];
    alignas(8) char text_space[]; /* pool->text_cap + 1 bytes in pooled slabs */
} eng_slab;

struct eng_event_pool {
    pthread_mutex_t lock;
    eng_slab *free_list;
    int outstanding;             /* slabs handed out and not yet freed */
    bool engine_alive;
    size_t text_cap;
    size_t slab_bytes;
    char *arena;                 /* (num_slabs * slab_bytes) */
};

eng_event_pool *eng_event_pool_create(int num_slabs, size_t text_cap)
{
    eng_event_pool *pool = calloc(1, sizeof *pool);
    if (!pool)
        return NULL;
    pool->text_cap = text_cap;
    pool->slab_bytes = (sizeof(eng_slab) + text_cap + 1 + 15) & ~(size_t)15;
    pool->arena = malloc((size_t)num_slabs * pool->slab_bytes);
    if (!pool->arena || pthread_mutex_init(&pool->lock, NULL) != 0) {
        free(pool->arena);
        free(pool);
        return NULL;
    }
    pool->engine_alive = true;
    for (int i = num_slabs - 1; i >= 0; i--) {
        eng_slab *slab = (eng_slab *)(pool->arena + (size_t)i * pool->slab_bytes);
        slab->pool = pool;
        slab->next_free = pool->free_list;
        pool->free_list = slab;
    }
    return pool;
}

static void pool_free(eng_event_pool *pool)
{
    pthread_mutex_destroy(&pool->lock);
    free(pool->arena);
    free(pool);
}

void eng_event_pool_release(eng_event_pool *pool)
{
    if (!pool)
        return;
    pthread_mutex_lock(&pool->lock);
    pool->engine_alive = false;
    bool last = pool->outstanding == 0;
    pthread_mutex_unlock(&pool->lock);
    if (last)
        pool_free(pool);
}

kvd_event *eng_event_new(eng_event_pool *pool, int num_tokens, bool with_logprobs, size_t text_len)
{
    eng_slab *slab = NULL;
    if (num_tokens > 1)
        return NULL; /* the engine delivers one token per event */
    if (pool && text_len <= pool->text_cap) {
        pthread_mutex_lock(&pool->lock);
        slab = pool->free_list;
        if (slab) {
            pool->free_list = slab->next_free;
            pool->outstanding++;
        }
        pthread_mutex_unlock(&pool->lock);
    }
    if (slab) {
        memset(&slab->ev, 0, sizeof slab->ev);
        slab->ev.tokens = slab->token_space;
        slab->ev.logprobs = with_logprobs ? slab->logprob_space : NULL;
        slab->ev.text = slab->text_space;
        slab->text_space[0] = '\0';
        return &slab->ev;
    }
    /* A slab of its own, sized for this text. */
    slab = calloc(1, sizeof(eng_slab) + text_len + 1);
    if (!slab)
        return NULL;
    slab->pool = NULL;
    slab->ev.tokens = slab->token_space;
    slab->ev.logprobs = with_logprobs ? slab->logprob_space : NULL;
    slab->ev.text = slab->text_space;
    return &slab->ev;
}

void kvd_event_free(kvd_event *list)
{
    while (list) {
        kvd_event *next = list->next;
        eng_slab *slab = (eng_slab *)list;
        eng_event_pool *pool = slab->pool;
        if (!pool) {
            free(slab);
        } else {
            pthread_mutex_lock(&pool->lock);
            slab->next_free = pool->free_list;
            pool->free_list = slab;
            pool->outstanding--;
            bool last = !pool->engine_alive && pool->outstanding == 0;
            pthread_mutex_unlock(&pool->lock);
            if (last)
                pool_free(pool);
        }
        list = next;
    }
}
