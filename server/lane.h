/* lane.h - the bulk lane: one thread at the lowest CPU priority (SCHED_IDLE) for request
 * work that grows with a request (tokenizing megabytes of prompt, building a whole
 * answer of tens of megabytes).
 *
 * Why not libuv's workers: the engine's forward threads meet at barriers several times
 * per layer, so any time slice another thread takes from one of them stalls both, and
 * with no more cores than engine threads a burst of bulk work on four workers (nice 10)
 * stretched the running streams' steps. A SCHED_IDLE thread runs only on CPU time no
 * other thread wants: a waking engine thread preempts it at once and the scheduler
 * treats its core as idle when placing one, and whatever nice the daemon runs at, it
 * stays below (nice 10 is no lower than a daemon started at nice 10 or more). One
 * thread also caps bulk jobs at one at a time; small jobs (the parsing and tokenizing
 * of ordinary requests, which admission waits for) stay on libuv's workers and never
 * queue behind bulk ones.
 * Priority inversion: a SCHED_IDLE thread that holds a lock another thread waits for
 * keeps it while the cores are busy, so work on the lane takes no lock the loop or the
 * engine take: the JSON parser's lock and the grammar cache's stay with the workers, and
 * the lane's own queues are lock-free. The tokenizer's merge cache locks a shard for a
 * copy of a word's ids: a worker tokenizing beside a bulk tokenization can wait for a
 * preempted lane thread until a core idles (in a step's sampling at the latest).
 *
 * The loop thread queues, and runs every after-callback (status 0), in order. Work
 * queued before kvd_lane_close still runs; the loop stays alive until it is done.
 */
#ifndef KVD_LANE_H
#define KVD_LANE_H

#include <uv.h>

typedef struct kvd_lane kvd_lane;

/* A lane whose completions run on loop. NULL when its thread or handle cannot be made
 * (callers then use libuv's workers). */
kvd_lane *kvd_lane_create(uv_loop_t *loop);
/* Runs work_cb(work) on the lane, then after_cb(work, 0) on the loop. Returns 0, or
 * UV_ENOMEM / UV_EINVAL (closing) with nothing queued. */
int kvd_lane_queue(kvd_lane *lane, uv_work_t *work, uv_work_cb work_cb, uv_after_work_cb after_cb);
/* Starts closing (loop thread): the thread ends once queued work is done, and the lane
 * frees itself on the loop after the last after-callback. NULL does nothing. */
void kvd_lane_close(kvd_lane *lane);

#endif
