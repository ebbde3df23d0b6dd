/* threads.c - a persistent team of threads with spin-then-futex barriers.
 *
 * Two waits exist: workers waiting for the next job (job generation counter) and
 * threads waiting at a barrier (barrier generation counter). Both spin on their
 * counter for a short while (SPIN_ITERATIONS pauses, a few microseconds), then
 * register as sleepers and FUTEX_WAIT on it; whoever advances a counter wakes the
 * sleepers only if there are any, so the common, balanced case makes no system call.
 * The sleeper count and the counter are touched with sequentially consistent atomics
 * so that a waker either sees the sleeper or the sleeper sees the new generation.
 */
#include "threads.h"
#include "kvd/kvd_thread.h"

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

/* ~5-20 us of pause instructions: longer than a balanced stage's skew, shorter than a
 * scheduler time slice. */
#define SPIN_ITERATIONS 4000
/* Workers between jobs spin longer: the next decode step usually follows within the
 * time the caller takes to sample a token. */
#define IDLE_SPIN_ITERATIONS 40000

typedef struct waitpoint {
    _Atomic uint32_t generation;
    _Atomic int sleepers;
} waitpoint;

struct kvd_team {
    int size;
    pthread_t *workers;   /* (size - 1) */
    int started;          /* workers actually created */
    /* the current job */
    kvd_team_fn fn;
    void *arg;
    int nth;
    bool stop;
    waitpoint job;        /* advanced when a job is posted */
    /* barrier of the current run */
    _Atomic int arrived;
    waitpoint barrier;
    /* completion: workers of the run count down */
    _Atomic int running;
    waitpoint done;
    _Atomic int counter;
    struct worker_arg { kvd_team *team; int ith; } *args;
};

static void futex_wait(_Atomic uint32_t *addr, uint32_t expected)
{
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *addr)
{
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* Waits until w's generation differs from seen. */
static void wait_change(waitpoint *w, uint32_t seen, int spin)
{
    for (int i = 0; i < spin; i++) {
        if (atomic_load_explicit(&w->generation, memory_order_acquire) != seen)
            return;
        CPU_RELAX();
    }
    atomic_fetch_add(&w->sleepers, 1);
    while (atomic_load(&w->generation) == seen)
        futex_wait(&w->generation, seen);
    atomic_fetch_sub(&w->sleepers, 1);
}

static void advance(waitpoint *w)
{
    atomic_fetch_add(&w->generation, 1);
    if (atomic_load(&w->sleepers) > 0)
        futex_wake_all(&w->generation);
}

static void *worker_main(void *p)
{
    struct worker_arg *wa = p;
    kvd_team *t = wa->team;
    uint32_t seen = 0;
    for (;;) {
        wait_change(&t->job, seen, IDLE_SPIN_ITERATIONS);
        seen = atomic_load_explicit(&t->job.generation, memory_order_acquire);
        if (t->stop)
            return NULL;
        if (wa->ith < t->nth)
            t->fn(t->arg, wa->ith, t->nth);
        /* every worker reports, busy or not, so no worker is still reading this job's
         * fields when the caller posts the next one */
        if (atomic_fetch_sub(&t->running, 1) == 1)
            advance(&t->done);
    }
}

kvd_team *kvd_team_create(int n)
{
    if (n < 1)
        return NULL;
    kvd_team *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->size = n;
    t->workers = calloc((size_t)n, sizeof *t->workers);
    t->args = calloc((size_t)n, sizeof *t->args);
    if (!t->workers || !t->args) {
        kvd_team_destroy(t);
        return NULL;
    }
    for (int i = 1; i < n; i++) {
        t->args[i] = (struct worker_arg){t, i};
        if (kvd_thread_start(&t->workers[i - 1], worker_main, &t->args[i]) != 0) {
            kvd_team_destroy(t);
            return NULL;
        }
        t->started++;
    }
    return t;
}

void kvd_team_destroy(kvd_team *t)
{
    if (!t)
        return;
    t->stop = true;
    advance(&t->job);
    for (int i = 0; i < t->started; i++)
        pthread_join(t->workers[i], NULL);
    free(t->workers);
    free(t->args);
    free(t);
}

void kvd_team_run(kvd_team *t, int nth, kvd_team_fn fn, void *arg)
{
    if (nth > t->size)
        nth = t->size;
    if (nth <= 1) {
        t->nth = 1;
        fn(arg, 0, 1);
        return;
    }
    t->fn = fn;
    t->arg = arg;
    t->nth = nth;
    atomic_store(&t->arrived, 0);
    atomic_store(&t->running, t->size - 1);
    uint32_t done_seen = atomic_load(&t->done.generation);
    advance(&t->job); /* publishes fn/arg/nth (seq_cst) */
    fn(arg, 0, nth);
    wait_change(&t->done, done_seen, SPIN_ITERATIONS);
}

void kvd_team_barrier(kvd_team *t)
{
    if (t->nth <= 1)
        return;
    uint32_t seen = atomic_load_explicit(&t->barrier.generation, memory_order_acquire);
    if (atomic_fetch_add(&t->arrived, 1) == t->nth - 1) {
        atomic_store(&t->arrived, 0);
        advance(&t->barrier);
        return;
    }
    wait_change(&t->barrier, seen, SPIN_ITERATIONS);
}

void kvd_team_reset_counter(kvd_team *t)
{
    atomic_store_explicit(&t->counter, 0, memory_order_relaxed);
}

int kvd_team_next(kvd_team *t)
{
    return atomic_fetch_add_explicit(&t->counter, 1, memory_order_relaxed);
}
