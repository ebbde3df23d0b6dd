/* threads.h - the forward pass's small persistent thread team (private to src/model).
 *
 * kvd_team_run() runs one function on all n threads of the team (the caller is
 * thread 0) and returns when every thread has returned; inside it, kvd_team_barrier()
 * separates dependent stages and kvd_team_next() hands out work items dynamically.
 * Waiting spins briefly, then sleeps on a futex: on a dedicated machine a barrier
 * costs well under a microsecond, and on a loaded one a thread whose partner was
 * descheduled gives its core away instead of spinning through its time slice (what
 * made OpenMP's default 300k-iteration spin 10x slower here under load).
 * A team is used by one calling thread at a time.
 */
#ifndef KVD_THREADS_H
#define KVD_THREADS_H

#include <stdatomic.h>
#include <stdint.h>

typedef struct kvd_team kvd_team;

/* ith in [0, nth). */
typedef void (*kvd_team_fn)(void *arg, int ith, int nth);

/* A team of n threads (n - 1 workers besides the caller). NULL if threads cannot be
 * created. */
kvd_team *kvd_team_create(int n);
void kvd_team_destroy(kvd_team *team);

/* Runs fn(arg, ith, nth) on the first nth threads (1 <= nth <= size); returns when all
 * have finished. */
void kvd_team_run(kvd_team *team, int nth, kvd_team_fn fn, void *arg);

/* Inside fn: waits until all nth threads of the current run arrive. */
void kvd_team_barrier(kvd_team *team);

/* Inside fn: a shared counter for dynamic scheduling. kvd_team_reset_counter must be
 * called by one thread and followed by a barrier before the others take items. */
void kvd_team_reset_counter(kvd_team *team);
int kvd_team_next(kvd_team *team);

#endif
