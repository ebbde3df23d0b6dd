/* kvd_clock.h - the monotonic clock in nanoseconds, the one time base of the engine's step
 * timings, the request timings and the disk tier's load times (so they compare). Any
 * thread; nothing to free.
 */
#ifndef KVD_CLOCK_H
#define KVD_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline uint64_t kvd_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#endif
