/* kvd_bench.h - internal interfaces of kvd-bench, the load tester for OpenAI-compatible servers.
 *
 * kvd-bench is split so that everything but the network is plain, testable C: option
 * parsing, the seeded workload (prompts from a word list, lengths, Poisson arrivals),
 * request bodies, the SSE stream reader and the statistics live in a core library the
 * unit tests link; the libuv/llhttp client (kvd_bench_client.c) and main only move bytes
 * and timestamps into it. Workloads depend only on --seed and the session index, never
 * on completion order, so two runs with one seed send the same prompts.
 */
#ifndef KVD_BENCH_H
#define KVD_BENCH_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kvd/kvd_buf.h"
#include "kvd/kvd_error.h"

/* Byte buffers are kvd_sbuf (kvd/kvd_buf.h); appends return 0 or KVD_ENOMEM. */

/* ---- options ---- */

typedef struct kvd_bench_range {
    long lo, hi; /* inclusive; lo == hi for a fixed value */
} kvd_bench_range;

typedef struct kvd_bench_options {
    char url[1024];
    char model[256];     /* empty: ask GET /v1/models */
    char api_key[512];   /* empty: no Authorization header */
    char json_path[1024]; /* empty: no JSON file */
    long concurrency;    /* closed loop: clients; open loop: cap on active sessions (0 = none) */
    double rate;         /* > 0: open loop, Poisson arrivals of sessions per second */
    long requests;       /* total HTTP requests (turns count one each); 0 = until --duration */
    long turns;          /* 1: /v1/completions; > 1: chat sessions of that many turns */
    long sessions;       /* > 0: that many chat sessions open at once, the clients
                          * cycling over them one turn at a time (closed loop only) */
    double think_s;      /* closed loop: mean of the exponential pause before each chat
                          * turn (a user reading and typing); 0: none */
    kvd_bench_range prompt_tokens; /* words per prompt (per new user message in chat) */
    kvd_bench_range max_tokens;
    int ignore_eos;
    int session_header;  /* send X-Session-ID: kvd-bench-<seed>-<session> (balancer affinity) */
    uint64_t seed;
    double duration_s;   /* hard limit on the whole run */
    double timeout_s;    /* per request */
    double temperature;
    double slo_ttft_ms;  /* 0: no SLO */
    double slo_tpot_ms;  /* 0: no SLO */
    int progress;        /* -1: when stderr is a tty; 0: never */
    int concurrency_given; /* whether --concurrency was on the command line */
    int requests_given;  /* whether --requests was on the command line */
} kvd_bench_options;

void kvd_bench_options_default(kvd_bench_options *opt);

/* Parses "A" or "A:B" (0 <= A <= B) into out. Returns 0 or KVD_EINVAL naming flag. */
int kvd_bench_parse_range(kvd_bench_range *out, const char *text, const char *flag,
                          kvd_error *err);

/* Fills opt (already defaulted) from argv. Returns 0, 1 when --help was given (nothing
 * else checked), or KVD_EINVAL with a message naming the flag; opt may be partly
 * filled on failure. */
int kvd_bench_parse_args(kvd_bench_options *opt, int argc, char **argv, kvd_error *err);

void kvd_bench_usage(FILE *out);

/* ---- URL ---- */

typedef struct kvd_bench_url {
    char host[256];        /* without brackets */
    int port;
    char base_path[512];   /* "" or "/prefix" without a trailing slash or "/v1" */
    char host_header[300]; /* host[:port] as sent in Host: */
} kvd_bench_url;

/* Accepts http://host[:port][/path]; a trailing "/v1" is dropped since routes add it.
 * Returns 0 or KVD_EINVAL (https, missing host, bad port). */
int kvd_bench_url_parse(kvd_bench_url *out, const char *url, kvd_error *err);

/* ---- seeded random numbers (splitmix64: tiny, fast, good enough for workloads) ---- */

typedef struct kvd_bench_rng {
    uint64_t state;
} kvd_bench_rng;

void kvd_bench_rng_seed(kvd_bench_rng *rng, uint64_t seed, uint64_t stream);
uint64_t kvd_bench_rng_next(kvd_bench_rng *rng);
double kvd_bench_rng_uniform(kvd_bench_rng *rng);            /* [0, 1) */
long kvd_bench_rng_pick(kvd_bench_rng *rng, kvd_bench_range range); /* uniform in range */
double kvd_bench_rng_exponential(kvd_bench_rng *rng, double rate); /* mean 1/rate */

/* ---- workload ---- */

/* Words that each encode to exactly one Qwen2 BPE token when preceded by a space, so a
 * prompt of N words is about N tokens (the server's usage tells the exact count). */
size_t kvd_bench_word_count(void);
const char *kvd_bench_word(size_t index);

/* The chat system message every session starts with (same text in every session, as in
 * real deployments, so it is a prefix the server may cache across sessions). */
extern const char kvd_bench_system_prompt[];

/* Appends n_words words drawn from rng, separated by single spaces. */
int kvd_bench_make_words(kvd_sbuf *out, kvd_bench_rng *rng, long n_words);

/* One session's random stream: depends only on (seed, session). */
void kvd_bench_session_rng(kvd_bench_rng *rng, uint64_t seed, long session);

/* Poisson arrivals draw from a stream of their own so they do not depend on prompts.
 * The runner seeds rng with kvd_bench_arrival_rng and asks for one gap at a time; the
 * first session starts at 0 (as in vLLM's benchmark_serving). */
void kvd_bench_arrival_rng(kvd_bench_rng *rng, uint64_t seed);
double kvd_bench_arrival_gap(kvd_bench_rng *rng, double rate);

/* The think time before turn (1-based) of session, exponential with mean mean_s: the
 * user reading the last answer and typing. Depends only on (seed, session, turn), so it
 * does not shift with completion order or change any prompt. 0 when mean_s is 0. */
double kvd_bench_think_time(uint64_t seed, long session, long turn, double mean_s);

/* Arrival times (seconds from start) of the first n sessions at rate per second:
 * 0, then running sums of kvd_bench_arrival_gap. */
void kvd_bench_arrivals(double *out, size_t n, double rate, uint64_t seed);

/* Request bodies (JSON). history holds user, assistant, user, ... texts, ending with
 * the new user message (odd count). Both return 0 or KVD_ENOMEM. */
int kvd_bench_body_completion(kvd_sbuf *out, const kvd_bench_options *opt,
                              const char *model, const char *prompt, long max_tokens);
int kvd_bench_body_chat(kvd_sbuf *out, const kvd_bench_options *opt, const char *model,
                        const kvd_sbuf *history, size_t n_history, long max_tokens);

/* ---- SSE stream reader ---- */

/* Reads an OpenAI streaming response body: `data: {json}` events separated by blank
 * lines, ending with `data: [DONE]`. Bytes may arrive split anywhere. Each event whose
 * first choice carries non-empty text counts as one chunk, stamped with the time of
 * the read that completed it. */
typedef struct kvd_bench_stream {
    int chat;            /* choices[0].delta.content instead of choices[0].text */
    int done;            /* saw data: [DONE] */
    long n_chunks;       /* events carrying text */
    long n_events;       /* all data events, [DONE] excluded */
    uint64_t first_ns;   /* time of the first chunk (valid when n_chunks > 0) */
    uint64_t last_ns;    /* time of the latest chunk */
    float *itl_ms;       /* (n_chunks - 1) gaps between consecutive chunks */
    size_t n_itl, cap_itl;
    long prompt_tokens;     /* usage.prompt_tokens, -1 until seen */
    long completion_tokens; /* usage.completion_tokens, -1 until seen */
    long cached_tokens;     /* usage.prompt_tokens_details.cached_tokens, -1 until seen */
    kvd_sbuf text;     /* all text received (the assistant turn in chat) */
    kvd_sbuf line;     /* partial line */
    kvd_sbuf data;     /* data lines of the event being read */
    int has_data;
} kvd_bench_stream;

void kvd_bench_stream_init(kvd_bench_stream *s, int chat);
void kvd_bench_stream_deinit(kvd_bench_stream *s);

/* Consumes body bytes received at now_ns. Returns 0, or KVD_EFORMAT (an event is not
 * JSON, or carries an "error" object) / KVD_ENOMEM with a message. Bytes after
 * [DONE] are ignored. */
int kvd_bench_stream_feed(kvd_bench_stream *s, const char *bytes, size_t len,
                          uint64_t now_ns, kvd_error *err);

/* At end of body: dispatches an event left without its blank line. Same returns. */
int kvd_bench_stream_finish(kvd_bench_stream *s, uint64_t now_ns, kvd_error *err);

/* ---- results and statistics ---- */

enum kvd_bench_outcome {
    KVD_BENCH_OK = 0,
    KVD_BENCH_ERR_CONNECT,   /* could not connect or send */
    KVD_BENCH_ERR_HTTP,      /* status other than 200 */
    KVD_BENCH_ERR_TIMEOUT,   /* no complete answer within --timeout */
    KVD_BENCH_ERR_STREAM,    /* malformed HTTP or SSE, error event, cut before [DONE] */
    KVD_BENCH_INCOMPLETE,    /* still running when --duration ran out (not an error) */
    KVD_BENCH_OUTCOMES
};

const char *kvd_bench_outcome_name(int outcome);

typedef struct kvd_bench_result {
    long session;
    long turn;            /* 1-based */
    int outcome;          /* enum kvd_bench_outcome */
    int http_status;      /* 0 when no status line arrived */
    double start_s;       /* when the request started, seconds since the run began */
    double ttft_ms;       /* < 0 when no text arrived */
    double e2el_ms;
    long prompt_words;    /* words in the new prompt or user message */
    long max_tokens;      /* requested */
    long prompt_tokens;   /* from usage; -1 when the server did not say */
    long cached_tokens;   /* prompt tokens the server reused (usage); -1 when not said */
    long output_tokens;   /* from usage, else the number of chunks */
    long n_chunks;
    float *itl_ms;        /* owned; n_itl gaps */
    size_t n_itl;
    char message[200];    /* first line of what went wrong, "" when OK */
} kvd_bench_result;

typedef struct kvd_bench_results {
    kvd_bench_result *items;
    size_t count, cap;
    long abandoned;       /* later turns not sent because an earlier turn failed */
} kvd_bench_results;

/* Appends a copy of r and takes ownership of r->itl_ms. Returns 0 or KVD_ENOMEM. */
int kvd_bench_results_add(kvd_bench_results *results, kvd_bench_result *r);
void kvd_bench_results_deinit(kvd_bench_results *results);

typedef struct kvd_bench_summary {
    size_t n;
    double mean, std, median, p90, p99, min, max; /* all 0 when n == 0 */
} kvd_bench_summary;

/* Linear interpolation between closest ranks (numpy's default), sorted input. */
double kvd_bench_percentile(const double *sorted, size_t n, double pct);

/* Sorts values in place and summarizes them. */
void kvd_bench_summarize(kvd_bench_summary *out, double *values, size_t n);

enum { KVD_BENCH_MAX_STATUSES = 16 };

typedef struct kvd_bench_report {
    double duration_s;
    long planned;         /* requests the workload would send */
    long completed;
    long failed;
    long incomplete;
    long abandoned;
    long errors[KVD_BENCH_OUTCOMES]; /* by kind; [OK] and [INCOMPLETE] unused */
    int statuses[KVD_BENCH_MAX_STATUSES]; /* distinct HTTP error statuses seen */
    long status_counts[KVD_BENCH_MAX_STATUSES];
    size_t n_statuses;
    long usage_reported;  /* completed requests whose server sent usage */
    long total_input_tokens, total_output_tokens;
    long total_prompt_words;
    long good;            /* completed requests meeting every SLO given */
    double request_throughput, request_goodput, output_throughput, total_token_throughput;
    kvd_bench_summary ttft, tpot, itl, e2el, input_len, output_len;
    size_t n_turns;
    kvd_bench_summary *ttft_by_turn; /* n_turns entries, index 0 = turn 1 */
    /* Per turn: requests whose usage gave prompt and cached tokens, and their sums
     * (the cached share shows whether a session's history was still in the cache). */
    long *cached_requests_by_turn, *prompt_tokens_by_turn, *cached_tokens_by_turn;
    /* Seconds from the end of a session's turn to the start of its next one: the
     * "think time" the load gave each user (n = 0 for single-turn runs). */
    kvd_bench_summary turn_gap;
} kvd_bench_report;

/* Computes every figure from the results. Returns 0 or KVD_ENOMEM. */
int kvd_bench_report_compute(kvd_bench_report *rep, const kvd_bench_options *opt,
                             const kvd_bench_results *results, long planned,
                             double duration_s, kvd_error *err);
void kvd_bench_report_deinit(kvd_bench_report *rep);

/* Human-readable summary (vLLM benchmark_serving's layout). */
void kvd_bench_report_print(FILE *out, const kvd_bench_report *rep,
                            const kvd_bench_options *opt, const char *model);

/* Writes the JSON document (figures named as vLLM's benchmark_serving names them, plus
 * errors, per-turn TTFT and per-request arrays) to path. Returns 0, KVD_EIO or
 * KVD_ENOMEM. */
int kvd_bench_report_write_json(const char *path, const kvd_bench_report *rep,
                                const kvd_bench_options *opt, const char *model,
                                const kvd_bench_results *results, kvd_error *err);

/* ---- the network side (kvd_bench_client.c) ---- */

/* GET /v1/models and copy the first model id into model; while the server answers 503
 * (still loading) ask again for up to 60 s (or opt->timeout_s). Returns 0 or a negative
 * code with the reason (connect, status, JSON). */
int kvd_bench_fetch_model(const kvd_bench_options *opt, const kvd_bench_url *url,
                          char *model, size_t model_cap, kvd_error *err);

/* Runs the whole workload and appends one result per request sent. planned receives
 * the number of requests the workload holds and duration_s the wall time from the
 * first request to the last answer. Returns 0 (even when requests failed: they are
 * results) or a negative code when the run could not happen at all. */
int kvd_bench_run(const kvd_bench_options *opt, const kvd_bench_url *url, const char *model,
                  kvd_bench_results *results, long *planned, double *duration_s,
                  kvd_error *err);

#endif
