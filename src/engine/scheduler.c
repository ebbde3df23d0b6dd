/* scheduler.c - which sequences run in the next step, and with how many tokens.
 *
 * Every sequence is just "tokens[0..num_tokens), of which num_computed have K/V":
 * one uncomputed token is a decode, more is a prefill (a fresh prompt, or a preempted
 * sequence's prompt + output being recomputed). A step packs, under the token budget
 * and the sequence cap:
 *   1. one token for every running decode, oldest admission first;
 *   2. a chunk for every running prefill (shrunk to the blocks left before anyone is
 *      preempted for it);
 *   3. new admissions from the front of the waiting queue (FCFS: the queue never
 *      reorders), after a prefix-cache lookup, only while free blocks stay above the
 *      watermark, and not in a step that had to preempt. With the disk tier, the
 *      prompt's next full blocks after the RAM hit are looked up on disk; when all
 *      those found fit (with the first chunk after them) above the watermark they get
 *      blocks and a load, else the admission waits for the room. The sequence waits in
 *      `loading` (holding its slot, out of reach of preemption) until the engine sees
 *      the load back, then runs its prefill from after the loaded pages.
 * Prefills (2 and 3) stop joining a step once its prefill chunks hold
 * prefill_pack_tokens: a step's time grows with its tokens from about that size on, so
 * packing more prompts gains no throughput, and every prompt in a step gets its first
 * token only when the whole step ends. Turns that arrive together (chat users, or a
 * burst) then get their first tokens one after another instead of all at the end.
 * Short prompts still share a step up to that size; the first prefill always runs.
 * When a running sequence needs blocks that are not there, the most recently admitted
 * running sequence not yet scheduled this step is preempted (possibly itself): its
 * blocks go back (full ones stay in the prefix cache), and it returns to the front of
 * the waiting queue to be recomputed. Its tokens, rng and text state are untouched, so
 * its output is the one it would have produced uninterrupted.
 */
#include "engine_internal.h"

void eng_list_push_back(eng_list *list, eng_seq *seq)
{
    seq->next = NULL;
    seq->prev = list->tail;
    if (list->tail)
        list->tail->next = seq;
    else
        list->head = seq;
    list->tail = seq;
    list->len++;
}

void eng_list_push_front(eng_list *list, eng_seq *seq)
{
    seq->prev = NULL;
    seq->next = list->head;
    if (list->head)
        list->head->prev = seq;
    else
        list->tail = seq;
    list->head = seq;
    list->len++;
}

void eng_list_remove(eng_list *list, eng_seq *seq)
{
    if (seq->prev)
        seq->prev->next = seq->next;
    else
        list->head = seq->next;
    if (seq->next)
        seq->next->prev = seq->prev;
    else
        list->tail = seq->prev;
    seq->prev = seq->next = NULL;
    list->len--;
}

int eng_seq_slots(const eng_seq *seq)
{
    return seq->choice == 0 && !seq->req->forked ? seq->req->n : 1;
}

static int remaining(const eng_seq *seq)
{
    return seq->num_tokens - seq->num_computed;
}

void eng_preempt(eng_scheduler *s, eng_seq *seq)
{
    eng_list_remove(&s->running, seq);
    s->slots_used -= eng_seq_slots(seq);
    kvd_block_table_release(s->pool, &seq->table);
    seq->num_computed = 0;
    seq->scheduled = false;
    seq->state = SEQ_WAITING;
    eng_list_push_front(&s->waiting, seq);
    s->num_preemptions++;
}

static eng_seq *newest_unscheduled(eng_scheduler *s)
{
    for (eng_seq *seq = s->running.tail; seq; seq = seq->prev)
        if (!seq->scheduled)
            return seq;
    return NULL;
}

/* Most tokens in [1, want] whose slots the free blocks cover now; 0 if none. */
static int tokens_that_fit(const eng_scheduler *s, const eng_seq *seq, int want)
{
    const int64_t avail = kvd_kv_available_blocks(s->pool);
    int lo = 0, hi = want;
    while (lo < hi) {
        int mid = lo + (hi - lo + 1) / 2;
        if (kvd_kv_blocks_needed(s->pool, &seq->table, mid) <= avail)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

static void add_entry(eng_scheduler *s, eng_seq *seq, int num_new)
{
    eng_sched_entry *e = &s->entries[s->num_entries++];
    e->seq = seq;
    e->num_new = num_new;
    e->logits = seq->num_computed + num_new == seq->num_tokens;
    seq->scheduled = true;
    seq->sched_tokens = num_new;
    s->num_tokens += num_new;
}

/* Reserves slots for up to want tokens of a running sequence, shrinking a prefill
 * chunk first and preempting newer sequences after. Returns the tokens reserved; 0
 * when the sequence does not run this step (it may have been preempted itself). */
static int grow_running(eng_scheduler *s, eng_seq *seq, int want, bool *preempted)
{
    for (;;) {
        if (kvd_kv_blocks_needed(s->pool, &seq->table, want) <= kvd_kv_available_blocks(s->pool))
            break;
        int fit = want > 1 ? tokens_that_fit(s, seq, want) : 0;
        if (fit > 0) {
            want = fit;
            break;
        }
        eng_seq *victim = newest_unscheduled(s);
        eng_preempt(s, victim);
        *preempted = true;
        if (victim == seq)
            return 0;
    }
    int rc = kvd_block_table_append(s->pool, &seq->table, want, NULL);
    if (rc < 0) {
        seq->sched_error = rc; /* out of memory growing the table: the engine fails it */
        return 0;
    }
    return want;
}

static void count_admission(eng_scheduler *s, eng_seq *seq, int cached)
{
    eng_request *req = seq->req;
    eng_list_remove(&s->waiting, seq);
    s->slots_used += eng_seq_slots(seq);
    if (!req->admitted) {
        req->admitted = true;
        req->admit_ns = s->now_ns;
        req->cached_tokens = cached;
        s->prompt_tokens_total += (uint64_t)req->num_prompt;
        s->fresh_admitted++;
    }
}

typedef enum disk_admission {
    DISK_NONE,     /* no full page past the RAM hit: admit as usual */
    DISK_MISS,     /* full pages past the RAM hit, the first not on disk: admit as usual */
    DISK_LOADING,  /* admitted: its pages are being loaded */
    DISK_WAIT,     /* its pages are on disk but do not fit yet: the queue waits */
} disk_admission;

/* After a RAM lookup covered seq->num_computed tokens: if the prompt's next pages are
 * on disk, takes blocks for them, queues their load and parks the sequence in
 * `loading`. All of them or none: a sequence needs every page of its prompt in RAM to
 * run, so loading the part that fits now would only mean recomputing the rest (and,
 * under pressure, preempting others for it) while the rest sits on disk. When they
 * and the first chunk after them do not fit above the watermark, the admission waits
 * as one whose first chunk does not fit would; only with nothing running or loading
 * (the whole pool free but too small for the prefix) are the pages that fit loaded. */
static disk_admission admit_from_disk(eng_scheduler *s, eng_seq *seq, int budget, int64_t keep_free)
{
    int n = kvd_prefix_cache_next_keys(s->pool, &seq->table, seq->tokens, seq->num_tokens, s->disk_keys,
                                       s->disk_keys_cap);
    if (n <= 0)
        return DISK_NONE;
    int pages = 0;
    while (pages < n && kvd_kvdisk_contains(s->disk, s->disk_keys[pages].hash))
        pages++;
    if (pages == 0)
        return DISK_MISS;
    const int64_t avail = kvd_kv_available_blocks(s->pool);
    const int bs = kvd_kv_pool_config(s->pool)->block_size;
    const int after = seq->num_tokens - seq->num_computed - pages * bs;
    const int64_t need = kvd_kv_blocks_needed(s->pool, &seq->table, pages * bs + (after < budget ? after : budget));
    if (avail - need < keep_free) {
        if (s->running.len > 0 || s->loading.len > 0)
            return DISK_WAIT;
        if (pages > avail)
            pages = (int)avail;
        if (pages == 0)
            return DISK_MISS;
    }
    eng_request *req = seq->req;
    const int cached = seq->num_computed;
    (void)kvd_block_table_reserve(s->pool, &seq->table, req->num_prompt + req->max_tokens, NULL);
    if (kvd_block_table_append(s->pool, &seq->table, pages * bs, NULL) < 0)
        return DISK_MISS;
    const int first = cached / bs;
    for (int i = 0; i < pages; i++)
        s->disk_dst[i] = kvd_kv_block_data(s->pool, seq->table.blocks[first + i]);
    if (!kvd_kvdisk_load_submit(s->disk, s->disk_keys, seq->tokens + cached, s->disk_dst, pages, seq, NULL)) {
        (void)kvd_block_table_truncate(s->pool, &seq->table, cached);
        return DISK_MISS;
    }
    s->disk_queries++;
    seq->load_first_admission = !req->admitted;
    count_admission(s, seq, cached);
    seq->state = SEQ_LOADING;
    eng_list_push_back(&s->loading, seq);
    return DISK_LOADING;
}

void eng_load_finished(eng_scheduler *s, eng_seq *seq, int pages_loaded)
{
    const int bs = kvd_kv_pool_config(s->pool)->block_size;
    const int computed = seq->num_computed + pages_loaded * bs;
    (void)kvd_block_table_truncate(s->pool, &seq->table, computed);
    kvd_prefix_cache_commit(s->pool, &seq->table, seq->tokens, computed);
    seq->num_computed = computed;
    if (pages_loaded > 0) {
        s->disk_hits++;
        s->disk_hit_tokens += (uint64_t)pages_loaded * (uint64_t)bs;
    } else {
        s->disk_misses++;
    }
    if (seq->load_first_admission) {
        seq->req->cached_tokens = computed;
        seq->req->loaded_ns = s->now_ns;
    }
    eng_list_remove(&s->loading, seq);
    seq->state = SEQ_RUNNING;
    eng_list_push_back(&s->running, seq);
}

static bool admit_one(eng_scheduler *s, eng_seq *seq, int budget)
{
    eng_request *req = seq->req;
    if (s->slots_used + eng_seq_slots(seq) > s->max_num_seqs)
        return false;
    int cached = 0;
    if (s->prefix_cache) {
        cached = kvd_prefix_cache_lookup(s->pool, &seq->table, seq->tokens, seq->num_tokens);
        if (cached < 0)
            cached = 0;
    }
    seq->num_computed = cached;
    /* With nothing running the watermark would only stall the queue. */
    const int64_t keep_free = s->running.len > 0 ? s->watermark_blocks : 0;
    disk_admission disk = s->disk ? admit_from_disk(s, seq, budget, keep_free) : DISK_NONE;
    if (disk == DISK_LOADING)
        return true;
    int chunk = remaining(seq) < budget ? remaining(seq) : budget;
    const int64_t need = kvd_kv_blocks_needed(s->pool, &seq->table, chunk);
    if (disk == DISK_WAIT || kvd_kv_available_blocks(s->pool) - need < keep_free) {
        kvd_block_table_release(s->pool, &seq->table);
        seq->num_computed = 0;
        return false;
    }
    /* Sized once for the whole life, so later appends never allocate. */
    (void)kvd_block_table_reserve(s->pool, &seq->table, req->num_prompt + req->max_tokens, NULL);
    int rc = kvd_block_table_append(s->pool, &seq->table, chunk, NULL);
    count_admission(s, seq, cached);
    if (disk == DISK_MISS) { /* counted once per admission, not per attempt */
        s->disk_queries++;
        s->disk_misses++;
    }
    seq->state = SEQ_RUNNING;
    eng_list_push_back(&s->running, seq);
    if (rc < 0) {
        seq->sched_error = rc;
        return true;
    }
    add_entry(s, seq, chunk);
    return true;
}

int eng_schedule(eng_scheduler *s)
{
    int budget = s->max_batched_tokens;
    bool preempted = false;
    s->num_entries = 0;
    s->num_tokens = 0;
    for (eng_seq *seq = s->running.head; seq; seq = seq->next)
        seq->scheduled = false;

    /* 1. Decodes, oldest first. A victim is always newer and unscheduled, so the
     *    iteration's next pointer is read only after the preemptions. */
    for (eng_seq *seq = s->running.head; seq && budget > 0;) {
        if (remaining(seq) != 1 || seq->sched_error) {
            seq = seq->next;
            continue;
        }
        int got = grow_running(s, seq, 1, &preempted);
        eng_seq *next = seq->state == SEQ_RUNNING ? seq->next : NULL;
        if (got > 0) {
            add_entry(s, seq, got);
            budget -= got;
        }
        seq = next;
    }

    /* 2. Running prefills (chunked), oldest first. */
    int prefill_tokens = 0;
    for (eng_seq *seq = s->running.head; seq && budget > 0 && prefill_tokens < s->prefill_pack_tokens;) {
        if (seq->scheduled || remaining(seq) < 2 || seq->sched_error) {
            seq = seq->next;
            continue;
        }
        int want = remaining(seq) < budget ? remaining(seq) : budget;
        int got = grow_running(s, seq, want, &preempted);
        eng_seq *next = seq->state == SEQ_RUNNING ? seq->next : NULL;
        if (got > 0) {
            add_entry(s, seq, got);
            budget -= got;
            prefill_tokens += got;
        }
        seq = next;
    }

    /* 3. Admissions, in queue order, while everything fits. */
    while (!preempted && budget > 0 && prefill_tokens < s->prefill_pack_tokens && s->waiting.head) {
        eng_seq *seq = s->waiting.head;
        if (!admit_one(s, seq, budget))
            break;
        if (seq->scheduled)
            budget -= seq->sched_tokens;
        if (seq->scheduled && seq->sched_tokens > 1)
            prefill_tokens += seq->sched_tokens;
    }
    return s->num_entries;
}
