/* thread.c - threads started with the shutdown signals blocked (kvd_thread.h). */
#include "kvd/kvd_thread.h"

void kvd_signals_block(sigset_t *saved)
{
    sigset_t shutdown;
    sigemptyset(&shutdown);
    sigaddset(&shutdown, SIGINT);
    sigaddset(&shutdown, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &shutdown, saved);
}

void kvd_signals_restore(const sigset_t *saved)
{
    pthread_sigmask(SIG_SETMASK, saved, NULL);
}

int kvd_thread_start(pthread_t *thread, void *(*main_fn)(void *), void *arg)
{
    /* A new thread inherits its creator's mask: block around the call rather than in
     * the new thread, which could take a signal before its first instruction. */
    sigset_t saved;
    kvd_signals_block(&saved);
    int rc = pthread_create(thread, NULL, main_fn, arg);
    kvd_signals_restore(&saved);
    return rc;
}
