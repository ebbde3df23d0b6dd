/* metrics.c - Prometheus text exposition of engine and server metrics.
 *
 * Every family gets its # HELP and # TYPE lines; counters end in _total and
 * histograms expose cumulative _bucket{le=...} lines up to +Inf, then _sum and
 * _count, as the exposition format requires. Bucket bounds are vLLM's, extended
 * downwards for time per output token because a CPU daemon serving small models
 * produces tokens in single milliseconds.
 */
#include "metrics.h"

#include <inttypes.h>
#include <string.h>

static const double ttft_bounds[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                                     0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
                                     640.0, 2560.0};
static const double tpot_bounds[] = {0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1,
                                     0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                                     20.0, 40.0, 80.0};
static const double e2e_bounds[] = {0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0,
                                    10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                                    960.0, 1920.0, 7680.0};

/* Work the loop thread does between two polls: anything near 50 ms is a stall every
 * stream and health check feels. */
static const double loop_bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5};

#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

static void histogram_init(kvd_histogram *h, const double *bounds, int num_bounds)
{
    memset(h, 0, sizeof *h);
    h->bounds = bounds;
    h->num_bounds = num_bounds < KVD_HISTOGRAM_MAX_BOUNDS ? num_bounds : KVD_HISTOGRAM_MAX_BOUNDS;
}

void kvd_metrics_init(kvd_metrics *m)
{
    memset(m, 0, sizeof *m);
    histogram_init(&m->time_to_first_token, ttft_bounds, COUNT(ttft_bounds));
    histogram_init(&m->time_per_output_token, tpot_bounds, COUNT(tpot_bounds));
    histogram_init(&m->e2e_request_latency, e2e_bounds, COUNT(e2e_bounds));
    histogram_init(&m->loop_iteration_cpu, loop_bounds, COUNT(loop_bounds));
}

void kvd_histogram_observe(kvd_histogram *h, double value, uint64_t n)
{
    if (n == 0)
        return;
    int i = 0;
    while (i < h->num_bounds && value > h->bounds[i])
        i++;
    h->counts[i] += n;
    h->count += n;
    h->sum += value * (double)n;
}

static void family(kvd_sbuf *out, const char *name, const char *type, const char *help)
{
    kvd_sbuf_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void gauge_i(kvd_sbuf *out, const char *name, const char *help, int64_t value)
{
    family(out, name, "gauge", help);
    kvd_sbuf_printf(out, "%s %" PRId64 "\n", name, value);
}

static void counter_u(kvd_sbuf *out, const char *name, const char *help, uint64_t value)
{
    family(out, name, "counter", help);
    kvd_sbuf_printf(out, "%s %" PRIu64 "\n", name, value);
}

static void histogram(kvd_sbuf *out, const char *name, const char *help, const kvd_histogram *h)
{
    family(out, name, "histogram", help);
    uint64_t cumulative = 0;
    for (int i = 0; i < h->num_bounds; i++) {
        cumulative += h->counts[i];
        kvd_sbuf_printf(out, "%s_bucket{le=\"%g\"} %" PRIu64 "\n", name, h->bounds[i], cumulative);
    }
    cumulative += h->counts[h->num_bounds];
    kvd_sbuf_printf(out, "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name, cumulative);
    kvd_sbuf_printf(out, "%s_sum %.9g\n", name, h->sum);
    kvd_sbuf_printf(out, "%s_count %" PRIu64 "\n", name, h->count);
}

static void render_disk(kvd_sbuf *out, const kvd_engine_stats *st)
{
    const kvd_kvdisk_stats *d = &st->disk;
    gauge_i(out, "kvd:kv_disk_enabled", "1 while the KV disk tier works; 0 once an I/O error turned it off.",
            d->enabled);
    gauge_i(out, "kvd:kv_disk_pages", "KV pages in files of the disk tier.", d->pages);
    gauge_i(out, "kvd:kv_disk_bytes", "Bytes of the disk tier's page files.", d->bytes);
    counter_u(out, "kvd:kv_disk_queries_total", "Admissions whose prompt had full blocks past the RAM prefix hit.",
              st->disk_queries);
    counter_u(out, "kvd:kv_disk_hits_total", "Of those, admissions that loaded at least one page from disk.",
              st->disk_hits);
    counter_u(out, "kvd:kv_disk_misses_total", "Of those, admissions that loaded nothing.", st->disk_misses);
    counter_u(out, "kvd:kv_disk_hit_tokens_total", "Prompt tokens served from disk (part of cached_tokens).",
              st->disk_hit_tokens);
    counter_u(out, "kvd:kv_disk_read_bytes_total", "Bytes of page files read and confirmed.", d->bytes_read);
    counter_u(out, "kvd:kv_disk_written_bytes_total", "Bytes of page files written.", d->bytes_written);
    counter_u(out, "kvd:kv_disk_pages_written_total", "Page files written.", d->pages_written);
    counter_u(out, "kvd:kv_disk_pages_evicted_total", "Page files removed to stay under --kv-disk-gb.",
              d->pages_evicted);
    counter_u(out, "kvd:kv_disk_pages_corrupt_total", "Page files dropped: short, bad header or checksum.",
              d->pages_corrupt);
    counter_u(out, "kvd:kv_disk_writes_dropped_total", "Evicted pages not written (queue full or tier off).",
              d->writes_dropped);
    static const double bounds[KVD_KVDISK_LATENCY_BUCKETS] = KVD_KVDISK_LATENCY_BOUNDS;
    kvd_histogram load;
    histogram_init(&load, bounds, KVD_KVDISK_LATENCY_BUCKETS);
    memcpy(load.counts, d->load_latency_counts, sizeof d->load_latency_counts);
    load.sum = d->load_latency_sum;
    load.count = d->loads;
    histogram(out, "kvd:kv_disk_load_seconds", "Time from queueing a load of a prompt's pages to having them in the pool.",
              &load);
}

void kvd_metrics_render(const kvd_metrics *m, const kvd_engine_stats *st, kvd_sbuf *out)
{
    gauge_i(out, "kvd:num_requests_running", "Requests whose sequences are scheduled (prefill or decode).",
            st->num_running);
    gauge_i(out, "kvd:num_requests_waiting", "Requests waiting for admission (queued or preempted).",
            st->num_waiting);
    family(out, "kvd:kv_cache_usage_perc", "gauge",
           "Fraction of KV cache blocks in use (1 = all), as vLLM's gpu_cache_usage_perc.");
    double usage = st->kv.blocks_total > 0 ? (double)st->kv.blocks_used / (double)st->kv.blocks_total : 0.0;
    kvd_sbuf_printf(out, "kvd:kv_cache_usage_perc %.6g\n", usage);
    family(out, "kvd:kv_cache_info", "gauge", "The KV pool's page element type (label dtype); always 1.");
    kvd_sbuf_printf(out, "kvd:kv_cache_info{dtype=\"%s\"} 1\n", kvd_dtype_name(st->kv.dtype));
    gauge_i(out, "kvd:kv_pool_bytes", "Bytes of the KV pool (blocks x bytes per block).", (int64_t)st->kv.pool_bytes);
    gauge_i(out, "kvd:kv_block_bytes", "Bytes of one KV block (every layer's K and V, scales included).",
            (int64_t)st->kv.block_bytes);
    gauge_i(out, "kvd:kv_blocks_total", "KV cache blocks in the pool.", st->kv.blocks_total);
    gauge_i(out, "kvd:kv_blocks_used", "KV cache blocks referenced by at least one sequence.",
            st->kv.blocks_used);
    gauge_i(out, "kvd:kv_blocks_cached", "Unreferenced KV blocks kept for prefix-cache reuse.",
            st->kv.blocks_cached);
    counter_u(out, "kvd:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
              st->kv.prefix_query_tokens);
    counter_u(out, "kvd:prefix_cache_hits_total", "Prompt tokens served from the prefix cache.",
              st->kv.prefix_hit_tokens);
    if (st->disk_configured)
        render_disk(out, st);
    counter_u(out, "kvd:num_preemptions_total", "Sequences preempted (blocks freed, recomputed later).",
              st->num_preemptions);
    counter_u(out, "kvd:prompt_tokens_total", "Prompt tokens of admitted requests.", st->prompt_tokens_total);
    counter_u(out, "kvd:generation_tokens_total", "Tokens generated.", st->generation_tokens_total);

    family(out, "kvd:request_success_total", "counter",
           "Finished sequences (one per choice) by finish reason; abort: cancelled or client gone.");
    for (int i = KVD_FINISH_STOP; i < KVD_FINISH_COUNT; i++)
        kvd_sbuf_printf(out, "kvd:request_success_total{finished_reason=\"%s\"} %" PRIu64 "\n",
                        kvd_finish_reason_name((kvd_finish_reason)i), m->finished[i]);

    histogram(out, "kvd:time_to_first_token_seconds", "Time from request arrival to its first token.",
              &m->time_to_first_token);
    histogram(out, "kvd:time_per_output_token_seconds",
              "Time between output tokens after the first (inter-token latency).", &m->time_per_output_token);
    histogram(out, "kvd:e2e_request_latency_seconds", "Time from request arrival to its last token.",
              &m->e2e_request_latency);
    counter_u(out, "kvd:http_requests_total", "HTTP requests answered, any route or status.", m->http_requests);
    gauge_i(out, "kvd:http_connections", "Open HTTP connections.", m->open_connections);
    histogram(out, "kvd:event_loop_iteration_cpu_seconds",
              "CPU time the event loop thread spent per loop iteration (its callbacks: parsing, answers).",
              &m->loop_iteration_cpu);
    family(out, "kvd:event_loop_iteration_cpu_max_seconds", "gauge", "The longest loop iteration so far, CPU seconds.");
    kvd_sbuf_printf(out, "kvd:event_loop_iteration_cpu_max_seconds %.6g\n", m->loop_iteration_cpu_max);
}
