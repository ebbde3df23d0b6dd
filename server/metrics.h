/* metrics.h - request latency histograms, finish counters and the /metrics page.
 *
 * The engine keeps its own counters (tokens, preemptions, KV blocks, prefix-cache
 * lookups); the server adds what only it sees: time to first token, time per output
 * token and end-to-end latency of each request, and how requests finished. Both are
 * rendered together in the Prometheus text exposition format, names and buckets
 * following vLLM's (with the kvd: prefix). A kvd_metrics is owned and updated by the
 * loop thread only.
 */
#ifndef KVD_SERVER_METRICS_H
#define KVD_SERVER_METRICS_H

#include <stdint.h>

#include "kvd/kvd_engine.h"
#include "util.h"

#define KVD_HISTOGRAM_MAX_BOUNDS 32

typedef struct kvd_histogram {
    const double *bounds;                          /* upper bounds, ascending */
    int num_bounds;
    uint64_t counts[KVD_HISTOGRAM_MAX_BOUNDS + 1]; /* per bucket (not cumulative); last is +Inf */
    double sum;
    uint64_t count;
} kvd_histogram;

typedef struct kvd_metrics {
    kvd_histogram time_to_first_token;   /* seconds from arrival to the first token */
    kvd_histogram time_per_output_token; /* seconds between tokens after the first */
    kvd_histogram e2e_request_latency;   /* seconds from arrival to the last token */
    uint64_t finished[KVD_FINISH_COUNT];  /* choices by finish reason */
    uint64_t http_requests;              /* every request answered, any route or status */
    int open_connections;                /* set by the owner before rendering */
} kvd_metrics;

void kvd_metrics_init(kvd_metrics *m);
/* Records n observations of value. */
void kvd_histogram_observe(kvd_histogram *h, double value, uint64_t n);
/* Appends the whole exposition (engine counters from st, then the server's). */
void kvd_metrics_render(const kvd_metrics *m, const kvd_engine_stats *st, kvd_sbuf *out);

#endif
