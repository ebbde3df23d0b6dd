/* kvd_bench_args.c - kvd-bench's command line, and URL parsing.
 *
 * Flags accept both "--flag VALUE" and "--flag=VALUE". Every value is checked in full
 * (no trailing junk, ranges ordered, counts positive) so a typo in a script fails loudly
 * instead of silently benchmarking something else.
 */
#include "kvd_bench.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

void kvd_bench_options_default(kvd_bench_options *opt)
{
    memset(opt, 0, sizeof *opt);
    snprintf(opt->url, sizeof opt->url, "http://127.0.0.1:8000");
    opt->concurrency = 1;
    opt->requests = 100;
    opt->turns = 1;
    opt->prompt_tokens = (kvd_bench_range){128, 128};
    opt->max_tokens = (kvd_bench_range){64, 64};
    opt->duration_s = 600.0;
    opt->timeout_s = 120.0;
    opt->progress = -1;
}

void kvd_bench_usage(FILE *out)
{
    fputs(
        "usage: kvd-bench [options]\n"
        "Load-tests an OpenAI-compatible server over HTTP/1.1 with streaming (SSE).\n"
        "\n"
        "target:\n"
        "  --url URL              server root (default http://127.0.0.1:8000)\n"
        "  --model NAME           model to request (default: first of GET /v1/models)\n"
        "  --api-key KEY          sent as 'Authorization: Bearer KEY'\n"
        "load:\n"
        "  --concurrency N        closed loop: N clients, each sends its next request when\n"
        "                         the previous answer ends (default 1); with --rate: at\n"
        "                         most N sessions at once (default unlimited)\n"
        "  --rate R               open loop: sessions arrive as a Poisson process, R/s\n"
        "  --requests N           HTTP requests in all, each turn counts (default 100;\n"
        "                         0 = until --duration)\n"
        "  --sessions N           with --turns: N chat sessions open at once; the clients\n"
        "                         cycle over them, each sending the next turn of the\n"
        "                         session served longest ago (all first turns, then all\n"
        "                         second turns, ...), so between two turns of a session\n"
        "                         every other session takes one (requests = N x turns)\n"
        "  --think-time S         closed-loop chat: before each turn the client pauses an\n"
        "                         exponential time of mean S seconds (the user reading\n"
        "                         the answer and typing; seeded per session and turn),\n"
        "                         so the clients do not run in lock step (default 0)\n"
        "  --duration S           hard time limit in seconds (default 600); requests still\n"
        "                         running then are cut and counted as incomplete\n"
        "  --timeout S            per-request time limit in seconds (default 120)\n"
        "workload:\n"
        "  --turns N              N > 1: multi-turn chat sessions on /v1/chat/completions,\n"
        "                         each turn resends the whole history (default 1:\n"
        "                         single prompts on /v1/completions)\n"
        "  --prompt-tokens A[:B]  words per prompt / per new user message, each word one\n"
        "                         Qwen token (default 128)\n"
        "  --max-tokens A[:B]     max_tokens per request (default 64)\n"
        "  --ignore-eos           send \"ignore_eos\": true so answers have max_tokens tokens\n"
        "  --session-header       send X-Session-ID: kvd-bench-SEED-SESSION with every turn, the\n"
        "                         key a load balancer keeps a conversation on one replica by\n"
        "                         (and X-Request-ID: kvd-bench-SEED-SESSION-TURN, for logs)\n"
        "  --temperature T        sampling temperature (default 0)\n"
        "  --seed N               workload seed: same seed, same prompts and arrivals\n"
        "                         (default 0)\n"
        "report:\n"
        "  --slo-ttft-ms MS       goodput counts requests with TTFT <= MS ...\n"
        "  --slo-tpot-ms MS       ... and TPOT <= MS (each only when given)\n"
        "  --json FILE            write every figure as JSON to FILE\n"
        "  --no-progress          no live progress line (it shows only on a terminal)\n"
        "  --help                 this text\n",
        out);
}

static int parse_long(long *out, const char *text, long min, const char *flag, kvd_error *err)
{
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end || v < min)
        return kvd_error_set(err, KVD_EINVAL, "%s: '%s' is not an integer >= %ld", flag, text,
                             min);
    *out = v;
    return 0;
}

static int parse_double(double *out, const char *text, double min, const char *flag,
                        kvd_error *err)
{
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || end == text || *end || !isfinite(v) || v < min)
        return kvd_error_set(err, KVD_EINVAL, "%s: '%s' is not a number >= %g", flag, text, min);
    *out = v;
    return 0;
}

int kvd_bench_parse_range(kvd_bench_range *out, const char *text, const char *flag,
                          kvd_error *err)
{
    char first[64];
    const char *colon = strchr(text, ':');
    size_t n = colon ? (size_t)(colon - text) : strlen(text);
    if (n >= sizeof first)
        return kvd_error_set(err, KVD_EINVAL, "%s: '%s' is not A or A:B", flag, text);
    memcpy(first, text, n);
    first[n] = '\0';
    long lo = 0, hi = 0;
    if (parse_long(&lo, first, 0, flag, err) < 0)
        return KVD_EINVAL;
    hi = lo;
    if (colon && parse_long(&hi, colon + 1, 0, flag, err) < 0)
        return KVD_EINVAL;
    if (hi < lo)
        return kvd_error_set(err, KVD_EINVAL, "%s: '%s' has B < A", flag, text);
    out->lo = lo;
    out->hi = hi;
    return 0;
}

static int copy_string(char *dst, size_t cap, const char *text, const char *flag,
                       kvd_error *err)
{
    size_t n = strlen(text);
    if (n >= cap)
        return kvd_error_set(err, KVD_EINVAL, "%s: value longer than %zu bytes", flag, cap - 1);
    memcpy(dst, text, n + 1);
    return 0;
}

int kvd_bench_parse_args(kvd_bench_options *opt, int argc, char **argv, kvd_error *err)
{
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "--help") || !strcmp(arg, "-h"))
            return 1;
    }
    for (int i = 1; i < argc; i++) {
        char flag[64];
        const char *arg = argv[i];
        const char *value = NULL;
        const char *eq = strchr(arg, '=');
        if (strncmp(arg, "--", 2) != 0)
            return kvd_error_set(err, KVD_EINVAL, "unexpected argument '%s' (see --help)", arg);
        size_t flag_len = eq ? (size_t)(eq - arg) : strlen(arg);
        if (flag_len >= sizeof flag)
            return kvd_error_set(err, KVD_EINVAL, "unknown flag '%s' (see --help)", arg);
        memcpy(flag, arg, flag_len);
        flag[flag_len] = '\0';

        if (!strcmp(flag, "--ignore-eos") || !strcmp(flag, "--no-progress") ||
            !strcmp(flag, "--session-header")) {
            if (eq)
                return kvd_error_set(err, KVD_EINVAL, "%s takes no value", flag);
            if (!strcmp(flag, "--ignore-eos"))
                opt->ignore_eos = 1;
            else if (!strcmp(flag, "--session-header"))
                opt->session_header = 1;
            else
                opt->progress = 0;
            continue;
        }
        if (eq) {
            value = eq + 1;
        } else {
            if (i + 1 >= argc)
                return kvd_error_set(err, KVD_EINVAL, "%s needs a value", flag);
            value = argv[++i];
        }

        int rc;
        if (!strcmp(flag, "--url"))
            rc = copy_string(opt->url, sizeof opt->url, value, flag, err);
        else if (!strcmp(flag, "--model"))
            rc = copy_string(opt->model, sizeof opt->model, value, flag, err);
        else if (!strcmp(flag, "--api-key"))
            rc = copy_string(opt->api_key, sizeof opt->api_key, value, flag, err);
        else if (!strcmp(flag, "--json"))
            rc = copy_string(opt->json_path, sizeof opt->json_path, value, flag, err);
        else if (!strcmp(flag, "--concurrency")) {
            rc = parse_long(&opt->concurrency, value, 0, flag, err);
            opt->concurrency_given = 1;
        } else if (!strcmp(flag, "--rate"))
            rc = parse_double(&opt->rate, value, 0.0, flag, err);
        else if (!strcmp(flag, "--requests")) {
            rc = parse_long(&opt->requests, value, 0, flag, err);
            opt->requests_given = 1;
        } else if (!strcmp(flag, "--sessions"))
            rc = parse_long(&opt->sessions, value, 1, flag, err);
        else if (!strcmp(flag, "--think-time"))
            rc = parse_double(&opt->think_s, value, 0.0, flag, err);
        else if (!strcmp(flag, "--turns"))
            rc = parse_long(&opt->turns, value, 1, flag, err);
        else if (!strcmp(flag, "--prompt-tokens"))
            rc = kvd_bench_parse_range(&opt->prompt_tokens, value, flag, err);
        else if (!strcmp(flag, "--max-tokens"))
            rc = kvd_bench_parse_range(&opt->max_tokens, value, flag, err);
        else if (!strcmp(flag, "--seed")) {
            char *end;
            errno = 0;
            unsigned long long seed = strtoull(value, &end, 10);
            rc = (errno || end == value || *end || value[0] == '-')
                     ? kvd_error_set(err, KVD_EINVAL, "%s: '%s' is not an unsigned integer",
                                     flag, value)
                     : 0;
            opt->seed = (uint64_t)seed;
        } else if (!strcmp(flag, "--duration"))
            rc = parse_double(&opt->duration_s, value, 0.0, flag, err);
        else if (!strcmp(flag, "--timeout"))
            rc = parse_double(&opt->timeout_s, value, 0.0, flag, err);
        else if (!strcmp(flag, "--temperature"))
            rc = parse_double(&opt->temperature, value, 0.0, flag, err);
        else if (!strcmp(flag, "--slo-ttft-ms"))
            rc = parse_double(&opt->slo_ttft_ms, value, 0.0, flag, err);
        else if (!strcmp(flag, "--slo-tpot-ms"))
            rc = parse_double(&opt->slo_tpot_ms, value, 0.0, flag, err);
        else
            return kvd_error_set(err, KVD_EINVAL, "unknown flag '%s' (see --help)", flag);
        if (rc < 0)
            return rc;
    }

    /* With --rate, --concurrency becomes a cap, and "no cap" is the natural default. */
    if (opt->rate > 0.0 && !opt->concurrency_given)
        opt->concurrency = 0;
    if (opt->rate <= 0.0 && opt->concurrency < 1)
        return kvd_error_set(err, KVD_EINVAL,
                             "--concurrency: a closed loop needs at least 1 client");
    if (opt->sessions > 0) {
        if (opt->turns < 2)
            return kvd_error_set(err, KVD_EINVAL, "--sessions: needs --turns of 2 or more");
        if (opt->rate > 0.0)
            return kvd_error_set(err, KVD_EINVAL,
                                 "--sessions: the clients cycle over the sessions (closed "
                                 "loop); it does not combine with --rate");
        if (opt->sessions > LONG_MAX / opt->turns)
            return kvd_error_set(err, KVD_EINVAL, "--sessions: too many sessions");
        if (opt->requests_given && opt->requests != opt->sessions * opt->turns)
            return kvd_error_set(err, KVD_EINVAL,
                                 "--requests: %ld is not --sessions x --turns (%ld); leave it "
                                 "out", opt->requests, opt->sessions * opt->turns);
        opt->requests = opt->sessions * opt->turns;
    }
    if (opt->think_s > 0.0 && (opt->turns < 2 || opt->rate > 0.0))
        return kvd_error_set(err, KVD_EINVAL,
                             "--think-time: applies to closed-loop chat (--turns 2 or more, "
                             "no --rate)");
    if (opt->prompt_tokens.lo < 1)
        return kvd_error_set(err, KVD_EINVAL, "--prompt-tokens: prompts need at least 1 token");
    if (opt->max_tokens.lo < 1)
        return kvd_error_set(err, KVD_EINVAL, "--max-tokens: must be at least 1");
    if (opt->duration_s <= 0.0)
        return kvd_error_set(err, KVD_EINVAL, "--duration: must be more than 0 seconds");
    if (opt->timeout_s <= 0.0)
        return kvd_error_set(err, KVD_EINVAL, "--timeout: must be more than 0 seconds");
    kvd_bench_url url;
    return kvd_bench_url_parse(&url, opt->url, err);
}

int kvd_bench_url_parse(kvd_bench_url *out, const char *url, kvd_error *err)
{
    kvd_bench_url u;
    memset(&u, 0, sizeof u);
    if (strncmp(url, "http://", 7) != 0)
        return kvd_error_set(err, KVD_EINVAL, "--url: '%s' must start with http:// (no TLS)",
                             url);
    const char *host = url + 7;
    const char *host_end;
    const char *after;
    if (*host == '[') {
        host_end = strchr(host, ']');
        if (!host_end)
            return kvd_error_set(err, KVD_EINVAL, "--url: '%s' has an unclosed '['", url);
        host++;
        after = host_end + 1;
    } else {
        host_end = host + strcspn(host, ":/");
        after = host_end;
    }
    size_t host_len = (size_t)(host_end - host);
    if (host_len == 0 || host_len >= sizeof u.host)
        return kvd_error_set(err, KVD_EINVAL, "--url: '%s' has no usable host", url);
    memcpy(u.host, host, host_len);
    u.port = 80;
    if (*after == ':') {
        char *end;
        errno = 0;
        long port = strtol(after + 1, &end, 10);
        if (errno || end == after + 1 || port < 1 || port > 65535 || (*end && *end != '/'))
            return kvd_error_set(err, KVD_EINVAL, "--url: '%s' has a bad port", url);
        u.port = (int)port;
        after = end;
    } else if (*after && *after != '/') {
        return kvd_error_set(err, KVD_EINVAL, "--url: '%s' is malformed", url);
    }
    size_t path_len = strlen(after);
    while (path_len > 0 && after[path_len - 1] == '/')
        path_len--;
    /* Users often paste the OpenAI "base_url" (ending in /v1); routes add /v1 again. */
    if (path_len >= 3 && !strncmp(after + path_len - 3, "/v1", 3))
        path_len -= 3;
    if (path_len >= sizeof u.base_path)
        return kvd_error_set(err, KVD_EINVAL, "--url: '%s' has too long a path", url);
    memcpy(u.base_path, after, path_len);
    int ipv6 = strchr(u.host, ':') != NULL;
    if (u.port == 80)
        snprintf(u.host_header, sizeof u.host_header, ipv6 ? "[%s]" : "%s", u.host);
    else
        snprintf(u.host_header, sizeof u.host_header, ipv6 ? "[%s]:%d" : "%s:%d", u.host,
                 u.port);
    *out = u;
    return 0;
}
