/* kvd_thread.h - threads that leave shutdown signals to the thread that handles them.
 *
 * The kernel hands a process-directed SIGINT or SIGTERM to any thread that does not
 * block it. The daemon handles them on its loop thread through libuv, and while libuv
 * removes its handler at shutdown the default action is back for a moment: a signal
 * taken then by a worker (an engine, forward or I/O thread) killed the daemon with
 * exit 143 in the middle of a clean exit. So every thread kvd starts blocks them, and
 * the loop thread can block them too while it swaps handlers. Any thread.
 */
#ifndef KVD_THREAD_H
#define KVD_THREAD_H

#include <pthread.h>
#include <signal.h>

/* pthread_create (same arguments and result: 0 or an errno value), with SIGINT and
 * SIGTERM blocked in the new thread. The caller's own mask is unchanged. */
int kvd_thread_start(pthread_t *thread, void *(*main_fn)(void *), void *arg);

/* Blocks SIGINT and SIGTERM in the calling thread; *saved receives the mask before,
 * for kvd_signals_restore. Threads started in between (by libuv, say) inherit the
 * blocked mask. */
void kvd_signals_block(sigset_t *saved);
void kvd_signals_restore(const sigset_t *saved);

#endif
