/* lane.c - the bulk lane (lane.h): a SCHED_IDLE thread fed through lock-free stacks.
 *
 * The loop pushes items onto `incoming` (a Treiber stack) and posts a semaphore; the
 * thread takes the whole stack at once (atomic exchange), reverses it into arrival
 * order and runs it, pushing each finished item onto `done` and waking the loop with
 * uv_async_send. The loop likewise takes `done` whole. Neither side ever waits for the
 * other while the other holds something: no mutex is shared (see lane.h).
 */
#include "lane.h"

#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/resource.h>

typedef struct lane_item {
    struct lane_item *next;
    uv_work_t *work;
    uv_work_cb work_cb;
    uv_after_work_cb after_cb;
} lane_item;

struct kvd_lane {
    uv_loop_t *loop;
    uv_async_t async;             /* referenced only while items are in flight */
    pthread_t thread;
    sem_t wake;                   /* one post per queued item, and one to stop */
    _Atomic(lane_item *) incoming;
    _Atomic(lane_item *) done;
    atomic_bool stop;
    int in_flight;                /* loop thread: queued, after-callback not yet run */
    bool closing;                 /* loop thread */
};

static void push(_Atomic(lane_item *) *stack, lane_item *item)
{
    lane_item *head = atomic_load_explicit(stack, memory_order_relaxed);
    do
        item->next = head;
    while (!atomic_compare_exchange_weak_explicit(stack, &head, item, memory_order_release,
                                                  memory_order_relaxed));
}

/* Takes the whole stack, oldest first. */
static lane_item *take_all(_Atomic(lane_item *) *stack)
{
    lane_item *item = atomic_exchange_explicit(stack, NULL, memory_order_acquire), *ordered = NULL;
    while (item) {
        lane_item *next = item->next;
        item->next = ordered;
        ordered = item;
        item = next;
    }
    return ordered;
}

static void *lane_main(void *arg)
{
    kvd_lane *lane = arg;
    /* The thread's own policy (Linux keeps it per thread). Where SCHED_IDLE is refused,
     * the lowest nice is the next best thing. */
    struct sched_param param = {0};
    if (pthread_setschedparam(pthread_self(), SCHED_IDLE, &param) != 0)
        (void)setpriority(PRIO_PROCESS, 0, 19);
    for (;;) {
        lane_item *item = take_all(&lane->incoming);
        if (!item) {
            if (atomic_load(&lane->stop))
                return NULL;
            while (sem_wait(&lane->wake) != 0) {
                /* EINTR: wait again */
            }
            continue;
        }
        while (item) {
            lane_item *next = item->next;
            item->work_cb(item->work);
            push(&lane->done, item);
            uv_async_send(&lane->async);
            item = next;
        }
    }
}

static void on_lane_closed(uv_handle_t *handle)
{
    kvd_lane *lane = handle->data;
    sem_destroy(&lane->wake);
    free(lane);
}

static void finish_close(kvd_lane *lane)
{
    atomic_store(&lane->stop, true);
    sem_post(&lane->wake);
    pthread_join(lane->thread, NULL);
    uv_close((uv_handle_t *)&lane->async, on_lane_closed);
}

static void on_lane_done(uv_async_t *async)
{
    kvd_lane *lane = async->data;
    for (lane_item *item = take_all(&lane->done); item;) {
        lane_item *next = item->next;
        uv_work_t *work = item->work;
        uv_after_work_cb after_cb = item->after_cb;
        free(item);
        if (--lane->in_flight == 0)
            uv_unref((uv_handle_t *)&lane->async);
        after_cb(work, 0);
        item = next;
    }
    if (lane->closing && lane->in_flight == 0 && !uv_is_closing((uv_handle_t *)&lane->async))
        finish_close(lane);
}

kvd_lane *kvd_lane_create(uv_loop_t *loop)
{
    kvd_lane *lane = calloc(1, sizeof *lane);
    if (!lane)
        return NULL;
    lane->loop = loop;
    atomic_init(&lane->incoming, NULL);
    atomic_init(&lane->done, NULL);
    atomic_init(&lane->stop, false);
    if (sem_init(&lane->wake, 0, 0) != 0) {
        free(lane);
        return NULL;
    }
    if (uv_async_init(loop, &lane->async, on_lane_done) != 0) {
        sem_destroy(&lane->wake);
        free(lane);
        return NULL;
    }
    lane->async.data = lane;
    uv_unref((uv_handle_t *)&lane->async);
    if (pthread_create(&lane->thread, NULL, lane_main, lane) != 0) {
        uv_close((uv_handle_t *)&lane->async, on_lane_closed);
        return NULL;
    }
    return lane;
}

int kvd_lane_queue(kvd_lane *lane, uv_work_t *work, uv_work_cb work_cb, uv_after_work_cb after_cb)
{
    if (lane->closing)
        return UV_EINVAL;
    lane_item *item = malloc(sizeof *item);
    if (!item)
        return UV_ENOMEM;
    *item = (lane_item){.work = work, .work_cb = work_cb, .after_cb = after_cb};
    if (lane->in_flight++ == 0)
        uv_ref((uv_handle_t *)&lane->async);
    push(&lane->incoming, item);
    sem_post(&lane->wake);
    return 0;
}

void kvd_lane_close(kvd_lane *lane)
{
    if (!lane || lane->closing)
        return;
    lane->closing = true;
    if (lane->in_flight == 0)
        finish_close(lane);
}
