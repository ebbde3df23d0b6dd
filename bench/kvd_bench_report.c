/* kvd_bench_report.c - per-request results into the figures kvd-bench prints and writes.
 *
 * Definitions follow vLLM's benchmark_serving so numbers compare across tools: TTFT is
 * the time from sending a request to its first text chunk; TPOT is (e2el - ttft) /
 * (output_tokens - 1) per request with more than one output token; ITL pools every gap
 * between consecutive chunks of every request; percentiles interpolate linearly between
 * closest ranks (numpy's default). Token totals and throughputs count completed requests
 * only; the duration is the wall time of the whole run, so failures lower throughput.
 */
#include "kvd_bench.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *kvd_bench_outcome_name(int outcome)
{
    switch (outcome) {
    case KVD_BENCH_OK: return "ok";
    case KVD_BENCH_ERR_CONNECT: return "connect";
    case KVD_BENCH_ERR_HTTP: return "http";
    case KVD_BENCH_ERR_TIMEOUT: return "timeout";
    case KVD_BENCH_ERR_STREAM: return "stream";
    case KVD_BENCH_INCOMPLETE: return "incomplete";
    default: return "unknown";
    }
}

int kvd_bench_results_add(kvd_bench_results *results, kvd_bench_result *r)
{
    if (results->count == results->cap) {
        size_t cap = results->cap ? results->cap * 2 : 256;
        kvd_bench_result *items = realloc(results->items, cap * sizeof *items);
        if (!items)
            return KVD_ENOMEM;
        results->items = items;
        results->cap = cap;
    }
    results->items[results->count++] = *r;
    r->itl_ms = NULL;
    r->n_itl = 0;
    return 0;
}

void kvd_bench_results_deinit(kvd_bench_results *results)
{
    for (size_t i = 0; i < results->count; i++)
        free(results->items[i].itl_ms);
    free(results->items);
    memset(results, 0, sizeof *results);
}

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double kvd_bench_percentile(const double *sorted, size_t n, double pct)
{
    if (n == 0)
        return 0.0;
    double rank = pct / 100.0 * (double)(n - 1);
    size_t below = (size_t)floor(rank);
    if (below >= n - 1)
        return sorted[n - 1];
    double frac = rank - (double)below;
    return sorted[below] + (sorted[below + 1] - sorted[below]) * frac;
}

void kvd_bench_summarize(kvd_bench_summary *out, double *values, size_t n)
{
    memset(out, 0, sizeof *out);
    out->n = n;
    if (n == 0)
        return;
    qsort(values, n, sizeof *values, compare_doubles);
    double sum = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += values[i];
    out->mean = sum / (double)n;
    double var = 0.0;
    for (size_t i = 0; i < n; i++)
        var += (values[i] - out->mean) * (values[i] - out->mean);
    out->std = sqrt(var / (double)n); /* population std, as numpy's np.std */
    out->median = kvd_bench_percentile(values, n, 50.0);
    out->p90 = kvd_bench_percentile(values, n, 90.0);
    out->p99 = kvd_bench_percentile(values, n, 99.0);
    out->min = values[0];
    out->max = values[n - 1];
}

static double request_tpot_ms(const kvd_bench_result *r)
{
    if (r->ttft_ms < 0.0 || r->output_tokens < 2)
        return 0.0;
    return (r->e2el_ms - r->ttft_ms) / (double)(r->output_tokens - 1);
}

static long request_input_tokens(const kvd_bench_result *r)
{
    /* Without usage the words sent are the best estimate (one token each). */
    return r->prompt_tokens >= 0 ? r->prompt_tokens : r->prompt_words;
}

static int cmp_session_turn(const void *a, const void *b)
{
    const kvd_bench_result *x = *(const kvd_bench_result *const *)a;
    const kvd_bench_result *y = *(const kvd_bench_result *const *)b;
    if (x->session != y->session)
        return (x->session > y->session) - (x->session < y->session);
    return (x->turn > y->turn) - (x->turn < y->turn);
}

static void count_status(kvd_bench_report *rep, int status)
{
    for (size_t i = 0; i < rep->n_statuses; i++) {
        if (rep->statuses[i] == status) {
            rep->status_counts[i]++;
            return;
        }
    }
    if (rep->n_statuses < KVD_BENCH_MAX_STATUSES) {
        rep->statuses[rep->n_statuses] = status;
        rep->status_counts[rep->n_statuses++] = 1;
    }
}

int kvd_bench_report_compute(kvd_bench_report *rep, const kvd_bench_options *opt,
                             const kvd_bench_results *results, long planned,
                             double duration_s, kvd_error *err)
{
    memset(rep, 0, sizeof *rep);
    size_t n = results->count;
    size_t n_itl = 0;
    for (size_t i = 0; i < n; i++)
        if (results->items[i].outcome == KVD_BENCH_OK)
            n_itl += results->items[i].n_itl;

    size_t n_turns = opt->turns > 0 ? (size_t)opt->turns : 1;
    /* (n) ttft, tpot, e2el, input, output; (n_itl) gaps; (n) scratch per turn */
    double *ttft = malloc((n + 1) * sizeof *ttft);
    double *tpot = malloc((n + 1) * sizeof *tpot);
    double *e2el = malloc((n + 1) * sizeof *e2el);
    double *in_len = malloc((n + 1) * sizeof *in_len);
    double *out_len = malloc((n + 1) * sizeof *out_len);
    double *turn_ttft = malloc((n + 1) * sizeof *turn_ttft);
    double *itl = malloc((n_itl + 1) * sizeof *itl);
    const kvd_bench_result **by_session = malloc((n + 1) * sizeof *by_session);
    rep->ttft_by_turn = calloc(n_turns, sizeof *rep->ttft_by_turn);
    rep->cached_requests_by_turn = calloc(n_turns, sizeof(long));
    rep->prompt_tokens_by_turn = calloc(n_turns, sizeof(long));
    rep->cached_tokens_by_turn = calloc(n_turns, sizeof(long));
    int rc = 0;
    if (!ttft || !tpot || !e2el || !in_len || !out_len || !turn_ttft || !itl || !by_session ||
        !rep->ttft_by_turn || !rep->cached_requests_by_turn || !rep->prompt_tokens_by_turn ||
        !rep->cached_tokens_by_turn) {
        rc = kvd_error_set(err, KVD_ENOMEM, "report: out of memory for %zu results", n);
        kvd_bench_report_deinit(rep);
        goto out;
    }
    rep->n_turns = n_turns;
    rep->duration_s = duration_s;
    rep->planned = planned;
    rep->abandoned = results->abandoned;

    size_t n_ttft = 0, n_tpot = 0, n_ok = 0;
    n_itl = 0;
    for (size_t i = 0; i < n; i++) {
        const kvd_bench_result *r = &results->items[i];
        if (r->outcome == KVD_BENCH_INCOMPLETE) {
            rep->incomplete++;
            continue;
        }
        if (r->outcome != KVD_BENCH_OK) {
            rep->failed++;
            if (r->outcome > 0 && r->outcome < KVD_BENCH_OUTCOMES)
                rep->errors[r->outcome]++;
            if (r->outcome == KVD_BENCH_ERR_HTTP)
                count_status(rep, r->http_status);
            continue;
        }
        rep->completed++;
        if (r->prompt_tokens >= 0)
            rep->usage_reported++;
        if (r->prompt_tokens >= 0 && r->cached_tokens >= 0 && r->turn >= 1 &&
            (size_t)r->turn <= n_turns) {
            rep->cached_requests_by_turn[r->turn - 1]++;
            rep->prompt_tokens_by_turn[r->turn - 1] += r->prompt_tokens;
            rep->cached_tokens_by_turn[r->turn - 1] += r->cached_tokens;
        }
        rep->total_input_tokens += request_input_tokens(r);
        rep->total_output_tokens += r->output_tokens;
        rep->total_prompt_words += r->prompt_words;
        in_len[n_ok] = (double)request_input_tokens(r);
        out_len[n_ok] = (double)r->output_tokens;
        e2el[n_ok++] = r->e2el_ms;
        if (r->ttft_ms >= 0.0)
            ttft[n_ttft++] = r->ttft_ms;
        if (r->ttft_ms >= 0.0 && r->output_tokens > 1)
            tpot[n_tpot++] = request_tpot_ms(r);
        for (size_t k = 0; k < r->n_itl; k++)
            itl[n_itl++] = r->itl_ms[k];
        if (opt->slo_ttft_ms > 0.0 || opt->slo_tpot_ms > 0.0) {
            double t = r->ttft_ms >= 0.0 ? r->ttft_ms : r->e2el_ms;
            int good = (opt->slo_ttft_ms <= 0.0 || t <= opt->slo_ttft_ms) &&
                       (opt->slo_tpot_ms <= 0.0 || request_tpot_ms(r) <= opt->slo_tpot_ms);
            rep->good += good;
        }
    }
    kvd_bench_summarize(&rep->ttft, ttft, n_ttft);
    kvd_bench_summarize(&rep->tpot, tpot, n_tpot);
    kvd_bench_summarize(&rep->itl, itl, n_itl);
    kvd_bench_summarize(&rep->e2el, e2el, n_ok);
    kvd_bench_summarize(&rep->input_len, in_len, n_ok);
    kvd_bench_summarize(&rep->output_len, out_len, n_ok);
    for (size_t t = 0; t < n_turns; t++) {
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            const kvd_bench_result *r = &results->items[i];
            if (r->outcome == KVD_BENCH_OK && r->ttft_ms >= 0.0 && r->turn == (long)t + 1)
                turn_ttft[m++] = r->ttft_ms;
        }
        kvd_bench_summarize(&rep->ttft_by_turn[t], turn_ttft, m);
    }
    /* Gaps between consecutive completed turns of one session (turn_ttft is free again). */
    size_t n_by_session = 0, n_gaps = 0;
    for (size_t i = 0; i < n; i++)
        if (results->items[i].outcome == KVD_BENCH_OK)
            by_session[n_by_session++] = &results->items[i];
    qsort(by_session, n_by_session, sizeof *by_session, cmp_session_turn);
    for (size_t i = 1; i < n_by_session; i++) {
        const kvd_bench_result *a = by_session[i - 1], *b = by_session[i];
        if (a->session == b->session && b->turn == a->turn + 1)
            turn_ttft[n_gaps++] = (b->start_s - a->start_s) * 1e3 - a->e2el_ms;
    }
    kvd_bench_summarize(&rep->turn_gap, turn_ttft, n_gaps);
    if (duration_s > 0.0) {
        rep->request_throughput = (double)rep->completed / duration_s;
        rep->request_goodput = (double)rep->good / duration_s;
        rep->output_throughput = (double)rep->total_output_tokens / duration_s;
        rep->total_token_throughput =
            (double)(rep->total_input_tokens + rep->total_output_tokens) / duration_s;
    }
out:
    free(ttft);
    free(tpot);
    free(e2el);
    free(in_len);
    free(out_len);
    free(turn_ttft);
    free(itl);
    free(by_session);
    return rc;
}

void kvd_bench_report_deinit(kvd_bench_report *rep)
{
    free(rep->ttft_by_turn);
    free(rep->cached_requests_by_turn);
    free(rep->prompt_tokens_by_turn);
    free(rep->cached_tokens_by_turn);
    memset(rep, 0, sizeof *rep);
}

static void print_metric(FILE *out, const char *title, const char *name,
                         const kvd_bench_summary *s)
{
    static const char *const stats[] = {"Mean", "Median", "P90", "P99"};
    const double values[] = {s->mean, s->median, s->p90, s->p99};
    char label[64];
    fprintf(out, "%s\n", title);
    for (size_t i = 0; i < sizeof stats / sizeof stats[0]; i++) {
        snprintf(label, sizeof label, "%s %s (ms):", stats[i], name);
        fprintf(out, "%-40s %.2f\n", label, values[i]);
    }
}

void kvd_bench_report_print(FILE *out, const kvd_bench_report *rep,
                            const kvd_bench_options *opt, const char *model)
{
    char label[64];
    fprintf(out, "============ Serving Benchmark Result ============\n");
    fprintf(out, "%-40s %s\n", "Model:", model);
    if (opt->rate > 0.0)
        fprintf(out, "%-40s open loop, %.3g sessions/s\n", "Load:", opt->rate);
    else if (opt->sessions > 0)
        fprintf(out, "%-40s closed loop, %ld clients cycling over %ld sessions\n", "Load:",
                opt->concurrency, opt->sessions);
    else
        fprintf(out, "%-40s closed loop, %ld clients\n", "Load:", opt->concurrency);
    if (opt->think_s > 0.0)
        fprintf(out, "%-40s %.3g s mean (exponential), before each turn\n", "Think time:", opt->think_s);
    fprintf(out, "%-40s %ld\n", "Successful requests:", rep->completed);
    fprintf(out, "%-40s %ld\n", "Failed requests:", rep->failed);
    for (int k = KVD_BENCH_ERR_CONNECT; k <= KVD_BENCH_ERR_STREAM; k++) {
        if (rep->errors[k]) {
            snprintf(label, sizeof label, "  %s errors:", kvd_bench_outcome_name(k));
            fprintf(out, "%-40s %ld\n", label, rep->errors[k]);
        }
    }
    for (size_t i = 0; i < rep->n_statuses; i++) {
        snprintf(label, sizeof label, "    HTTP %d:", rep->statuses[i]);
        fprintf(out, "%-40s %ld\n", label, rep->status_counts[i]);
    }
    if (rep->incomplete)
        fprintf(out, "%-40s %ld\n", "Cut by --duration:", rep->incomplete);
    if (rep->abandoned)
        fprintf(out, "%-40s %ld\n", "Turns skipped after a failed turn:", rep->abandoned);
    fprintf(out, "%-40s %.2f\n", "Benchmark duration (s):", rep->duration_s);
    fprintf(out, "%-40s %ld\n", "Total input tokens:", rep->total_input_tokens);
    fprintf(out, "%-40s %ld\n", "Total generated tokens:", rep->total_output_tokens);
    if (rep->usage_reported < rep->completed)
        fprintf(out, "%-40s %ld of %ld (others estimated)\n", "Requests with usage:",
                rep->usage_reported, rep->completed);
    fprintf(out, "%-40s %.2f\n", "Request throughput (req/s):", rep->request_throughput);
    if (opt->slo_ttft_ms > 0.0 || opt->slo_tpot_ms > 0.0)
        fprintf(out, "%-40s %.2f\n", "Request goodput (req/s):", rep->request_goodput);
    fprintf(out, "%-40s %.2f\n", "Output token throughput (tok/s):", rep->output_throughput);
    fprintf(out, "%-40s %.2f\n", "Total Token throughput (tok/s):", rep->total_token_throughput);
    print_metric(out, "---------------Time to First Token----------------", "TTFT", &rep->ttft);
    print_metric(out, "-----Time per Output Token (excl. 1st token)------", "TPOT", &rep->tpot);
    print_metric(out, "---------------Inter-token Latency----------------", "ITL", &rep->itl);
    print_metric(out, "----------------End-to-end Latency---------------", "E2EL", &rep->e2el);
    if (rep->n_turns > 1) {
        fprintf(out, "-------------TTFT by turn (ms): median, p99-------\n");
        for (size_t t = 0; t < rep->n_turns; t++) {
            snprintf(label, sizeof label, "Turn %zu (%zu requests):", t + 1,
                     rep->ttft_by_turn[t].n);
            fprintf(out, "%-40s %-10.2f %.2f\n", label, rep->ttft_by_turn[t].median,
                    rep->ttft_by_turn[t].p99);
        }
        fprintf(out, "-----Prompt tokens by turn: mean, cached share----\n");
        for (size_t t = 0; t < rep->n_turns; t++) {
            long k = rep->cached_requests_by_turn[t];
            snprintf(label, sizeof label, "Turn %zu (%ld with usage):", t + 1, k);
            if (k > 0)
                fprintf(out, "%-40s %-10.1f %.3f\n", label,
                        (double)rep->prompt_tokens_by_turn[t] / (double)k,
                        rep->prompt_tokens_by_turn[t] > 0
                            ? (double)rep->cached_tokens_by_turn[t] /
                                  (double)rep->prompt_tokens_by_turn[t]
                            : 0.0);
            else
                fprintf(out, "%-40s (no cached_tokens in usage)\n", label);
        }
        if (rep->turn_gap.n > 0)
            fprintf(out, "%-40s %-10.2f %.2f\n", "Gap between turns (s): median, p99:",
                    rep->turn_gap.median / 1e3, rep->turn_gap.p99 / 1e3);
    }
    fprintf(out, "==================================================\n");
}

static int add_summary(cJSON *root, const char *metric, const kvd_bench_summary *s)
{
    static const char *const stats[] = {"mean", "median", "std", "p90", "p99", "min", "max"};
    const double values[] = {s->mean, s->median, s->std, s->p90, s->p99, s->min, s->max};
    char key[64];
    for (size_t i = 0; i < sizeof stats / sizeof stats[0]; i++) {
        snprintf(key, sizeof key, "%s_%s_ms", stats[i], metric);
        if (!cJSON_AddNumberToObject(root, key, values[i]))
            return KVD_ENOMEM;
    }
    return 0;
}

static cJSON *range_json(kvd_bench_range r)
{
    cJSON *a = cJSON_CreateArray();
    if (!a)
        return NULL;
    cJSON_AddItemToArray(a, cJSON_CreateNumber((double)r.lo));
    cJSON_AddItemToArray(a, cJSON_CreateNumber((double)r.hi));
    return a;
}

static int add_config(cJSON *root, const kvd_bench_options *opt, const char *model)
{
    if (!cJSON_AddStringToObject(root, "backend", "openai") ||
        !cJSON_AddStringToObject(root, "url", opt->url) ||
        !cJSON_AddStringToObject(root, "model_id", model) ||
        !cJSON_AddStringToObject(root, "mode", opt->rate > 0.0 ? "open" : "closed") ||
        !cJSON_AddStringToObject(root, "endpoint",
                                 opt->turns > 1 ? "/v1/chat/completions" : "/v1/completions"))
        return KVD_ENOMEM;
    cJSON *rate = opt->rate > 0.0 ? cJSON_CreateNumber(opt->rate) : cJSON_CreateNull();
    cJSON *cap = opt->concurrency > 0 ? cJSON_CreateNumber((double)opt->concurrency)
                                      : cJSON_CreateNull();
    cJSON *prompt = range_json(opt->prompt_tokens);
    cJSON *max_tokens = range_json(opt->max_tokens);
    cJSON_AddItemToObject(root, "request_rate", rate);
    cJSON_AddItemToObject(root, "max_concurrency", cap);
    cJSON_AddItemToObject(root, "prompt_tokens", prompt);
    cJSON_AddItemToObject(root, "max_tokens", max_tokens);
    if (!rate || !cap || !prompt || !max_tokens ||
        !cJSON_AddNumberToObject(root, "turns", (double)opt->turns) ||
        !cJSON_AddNumberToObject(root, "sessions", (double)opt->sessions) ||
        !cJSON_AddNumberToObject(root, "think_time_s", opt->think_s) ||
        !cJSON_AddNumberToObject(root, "seed", (double)opt->seed) ||
        !cJSON_AddBoolToObject(root, "ignore_eos", opt->ignore_eos) ||
        !cJSON_AddBoolToObject(root, "session_header", opt->session_header) ||
        !cJSON_AddNumberToObject(root, "temperature", opt->temperature) ||
        !cJSON_AddNumberToObject(root, "timeout_s", opt->timeout_s) ||
        !cJSON_AddNumberToObject(root, "duration_limit_s", opt->duration_s))
        return KVD_ENOMEM;
    cJSON *slo_ttft = opt->slo_ttft_ms > 0 ? cJSON_CreateNumber(opt->slo_ttft_ms)
                                           : cJSON_CreateNull();
    cJSON *slo_tpot = opt->slo_tpot_ms > 0 ? cJSON_CreateNumber(opt->slo_tpot_ms)
                                           : cJSON_CreateNull();
    cJSON_AddItemToObject(root, "slo_ttft_ms", slo_ttft);
    cJSON_AddItemToObject(root, "slo_tpot_ms", slo_tpot);
    return slo_ttft && slo_tpot ? 0 : KVD_ENOMEM;
}

static int add_errors(cJSON *root, const kvd_bench_report *rep,
                      const kvd_bench_results *results)
{
    cJSON *errors = cJSON_AddObjectToObject(root, "errors");
    if (!errors)
        return KVD_ENOMEM;
    for (int k = KVD_BENCH_ERR_CONNECT; k <= KVD_BENCH_ERR_STREAM; k++)
        if (!cJSON_AddNumberToObject(errors, kvd_bench_outcome_name(k), (double)rep->errors[k]))
            return KVD_ENOMEM;
    cJSON *statuses = cJSON_AddObjectToObject(errors, "http_status");
    if (!statuses)
        return KVD_ENOMEM;
    for (size_t i = 0; i < rep->n_statuses; i++) {
        char key[16];
        snprintf(key, sizeof key, "%d", rep->statuses[i]);
        if (!cJSON_AddNumberToObject(statuses, key, (double)rep->status_counts[i]))
            return KVD_ENOMEM;
    }
    /* A few messages say what went wrong better than counts. */
    cJSON *messages = cJSON_AddArrayToObject(errors, "messages");
    if (!messages)
        return KVD_ENOMEM;
    int shown = 0;
    for (size_t i = 0; i < results->count && shown < 20; i++) {
        const kvd_bench_result *r = &results->items[i];
        if (r->outcome == KVD_BENCH_OK || r->outcome == KVD_BENCH_INCOMPLETE ||
            !r->message[0])
            continue;
        char line[256];
        snprintf(line, sizeof line, "%s: %s", kvd_bench_outcome_name(r->outcome), r->message);
        cJSON_AddItemToArray(messages, cJSON_CreateString(line));
        shown++;
    }
    return 0;
}

static int add_per_request(cJSON *root, const kvd_bench_results *results)
{
    cJSON *in = cJSON_AddArrayToObject(root, "input_lens");
    cJSON *out = cJSON_AddArrayToObject(root, "output_lens");
    cJSON *ttfts = cJSON_AddArrayToObject(root, "ttfts");
    cJSON *e2els = cJSON_AddArrayToObject(root, "e2els");
    cJSON *turns = cJSON_AddArrayToObject(root, "turn_of_request");
    cJSON *sessions = cJSON_AddArrayToObject(root, "session_of_request");
    cJSON *cached = cJSON_AddArrayToObject(root, "cached_tokens_of_request");
    cJSON *itls = cJSON_AddArrayToObject(root, "itls");
    if (!in || !out || !ttfts || !e2els || !turns || !sessions || !cached || !itls)
        return KVD_ENOMEM;
    /* vLLM's per-request arrays hold completed requests, times in seconds. */
    for (size_t i = 0; i < results->count; i++) {
        const kvd_bench_result *r = &results->items[i];
        if (r->outcome != KVD_BENCH_OK)
            continue;
        cJSON_AddItemToArray(in, cJSON_CreateNumber((double)request_input_tokens(r)));
        cJSON_AddItemToArray(out, cJSON_CreateNumber((double)r->output_tokens));
        cJSON_AddItemToArray(ttfts, cJSON_CreateNumber(r->ttft_ms >= 0 ? r->ttft_ms / 1e3 : 0));
        cJSON_AddItemToArray(e2els, cJSON_CreateNumber(r->e2el_ms / 1e3));
        cJSON_AddItemToArray(turns, cJSON_CreateNumber((double)r->turn));
        cJSON_AddItemToArray(sessions, cJSON_CreateNumber((double)r->session));
        cJSON_AddItemToArray(cached, cJSON_CreateNumber((double)r->cached_tokens));
        cJSON *gaps = cJSON_CreateArray();
        if (!gaps)
            return KVD_ENOMEM;
        for (size_t k = 0; k < r->n_itl; k++)
            cJSON_AddItemToArray(gaps, cJSON_CreateNumber((double)r->itl_ms[k] / 1e3));
        cJSON_AddItemToArray(itls, gaps);
    }
    return 0;
}

static cJSON *report_json(const kvd_bench_report *rep, const kvd_bench_options *opt,
                          const char *model, const kvd_bench_results *results)
{
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return NULL;
    cJSON *good = (opt->slo_ttft_ms > 0.0 || opt->slo_tpot_ms > 0.0)
                      ? cJSON_CreateNumber(rep->request_goodput)
                      : cJSON_CreateNull();
    cJSON_AddItemToObject(root, "request_goodput", good);
    int ok = good && add_config(root, opt, model) == 0 &&
             cJSON_AddNumberToObject(root, "duration", rep->duration_s) &&
             cJSON_AddNumberToObject(root, "num_prompts", (double)rep->planned) &&
             cJSON_AddNumberToObject(root, "completed", (double)rep->completed) &&
             cJSON_AddNumberToObject(root, "failed", (double)rep->failed) &&
             cJSON_AddNumberToObject(root, "incomplete", (double)rep->incomplete) &&
             cJSON_AddNumberToObject(root, "abandoned", (double)rep->abandoned) &&
             cJSON_AddNumberToObject(root, "usage_reported", (double)rep->usage_reported) &&
             cJSON_AddNumberToObject(root, "total_input_tokens",
                                     (double)rep->total_input_tokens) &&
             cJSON_AddNumberToObject(root, "total_output_tokens",
                                     (double)rep->total_output_tokens) &&
             cJSON_AddNumberToObject(root, "total_prompt_words",
                                     (double)rep->total_prompt_words) &&
             cJSON_AddNumberToObject(root, "mean_input_tokens", rep->input_len.mean) &&
             cJSON_AddNumberToObject(root, "mean_output_tokens", rep->output_len.mean) &&
             cJSON_AddNumberToObject(root, "request_throughput", rep->request_throughput) &&
             cJSON_AddNumberToObject(root, "good_requests", (double)rep->good) &&
             cJSON_AddNumberToObject(root, "output_throughput", rep->output_throughput) &&
             cJSON_AddNumberToObject(root, "total_token_throughput",
                                     rep->total_token_throughput) &&
             add_summary(root, "ttft", &rep->ttft) == 0 &&
             add_summary(root, "tpot", &rep->tpot) == 0 &&
             add_summary(root, "itl", &rep->itl) == 0 &&
             add_summary(root, "e2el", &rep->e2el) == 0 && add_errors(root, rep, results) == 0;
    cJSON *by_turn = ok ? cJSON_AddArrayToObject(root, "ttft_by_turn") : NULL;
    for (size_t t = 0; by_turn && t < rep->n_turns; t++) {
        cJSON *entry = cJSON_CreateObject();
        if (!entry) {
            by_turn = NULL;
            break;
        }
        cJSON_AddItemToArray(by_turn, entry);
        if (!cJSON_AddNumberToObject(entry, "turn", (double)(t + 1)) ||
            !cJSON_AddNumberToObject(entry, "completed", (double)rep->ttft_by_turn[t].n) ||
            add_summary(entry, "ttft", &rep->ttft_by_turn[t]) < 0 ||
            !cJSON_AddNumberToObject(entry, "with_cached_tokens",
                                     (double)rep->cached_requests_by_turn[t]) ||
            !cJSON_AddNumberToObject(entry, "prompt_tokens",
                                     (double)rep->prompt_tokens_by_turn[t]) ||
            !cJSON_AddNumberToObject(entry, "cached_tokens",
                                     (double)rep->cached_tokens_by_turn[t]))
            by_turn = NULL;
    }
    if (by_turn && rep->n_turns > 1 && add_summary(root, "turn_gap", &rep->turn_gap) < 0)
        by_turn = NULL;
    if (!by_turn || add_per_request(root, results) < 0) {
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}

int kvd_bench_report_write_json(const char *path, const kvd_bench_report *rep,
                                const kvd_bench_options *opt, const char *model,
                                const kvd_bench_results *results, kvd_error *err)
{
    cJSON *root = report_json(rep, opt, model, results);
    char *text = root ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    if (!text)
        return kvd_error_set(err, KVD_ENOMEM, "%s: out of memory building the JSON", path);
    FILE *f = fopen(path, "w");
    int rc = 0;
    if (!f) {
        rc = kvd_error_set(err, KVD_EIO, "%s: cannot open for writing", path);
    } else {
        size_t len = strlen(text);
        int bad = fwrite(text, 1, len, f) != len || fputc('\n', f) == EOF;
        bad |= fclose(f) != 0;
        if (bad)
            rc = kvd_error_set(err, KVD_EIO, "%s: write failed", path);
    }
    cJSON_free(text);
    return rc;
}
