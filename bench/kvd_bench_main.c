/* kvd_bench_main.c - kvd-bench: load-tests an OpenAI-compatible server and reports latencies.
 *
 * main only wires the parts together: options, the model name (asked from the server
 * unless given), the run, the report on stdout and the JSON file. Exit status: 0 when
 * every request completed, 1 when some failed (figures are still printed and written),
 * 2 when the run could not happen (bad flags, unreachable /v1/models, ...).
 */
#include "kvd_bench.h"

#include <signal.h>
#include <stdio.h>

int main(int argc, char **argv)
{
    kvd_bench_options opt;
    kvd_error err = {0};
    kvd_bench_options_default(&opt);
    int rc = kvd_bench_parse_args(&opt, argc, argv, &err);
    if (rc == 1) {
        kvd_bench_usage(stdout);
        return 0;
    }
    if (rc < 0) {
        fprintf(stderr, "kvd-bench: %s\n", err.msg);
        return 2;
    }
    kvd_bench_url url;
    if (kvd_bench_url_parse(&url, opt.url, &err) < 0) {
        fprintf(stderr, "kvd-bench: %s\n", err.msg);
        return 2;
    }
    /* A server that hangs up mid-write must surface as an error result, not kill us. */
    signal(SIGPIPE, SIG_IGN);

    char model[sizeof opt.model];
    snprintf(model, sizeof model, "%s", opt.model);
    if (!model[0] && kvd_bench_fetch_model(&opt, &url, model, sizeof model, &err) < 0) {
        fprintf(stderr, "kvd-bench: %s (pass --model to skip this)\n", err.msg);
        return 2;
    }

    kvd_bench_results results = {0};
    kvd_bench_report rep = {0};
    long planned = 0;
    double duration_s = 0.0;
    int status = 2;
    if (kvd_bench_run(&opt, &url, model, &results, &planned, &duration_s, &err) < 0) {
        fprintf(stderr, "kvd-bench: %s\n", err.msg);
        goto out;
    }
    if (kvd_bench_report_compute(&rep, &opt, &results, planned, duration_s, &err) < 0) {
        fprintf(stderr, "kvd-bench: %s\n", err.msg);
        goto out;
    }
    kvd_bench_report_print(stdout, &rep, &opt, model);
    for (size_t i = 0, shown = 0; i < results.count && shown < 3; i++) {
        const kvd_bench_result *r = &results.items[i];
        if (r->outcome != KVD_BENCH_OK && r->outcome != KVD_BENCH_INCOMPLETE) {
            fprintf(stderr, "kvd-bench: request %zu failed (%s): %s\n", i,
                    kvd_bench_outcome_name(r->outcome), r->message);
            shown++;
        }
    }
    if (opt.json_path[0] &&
        kvd_bench_report_write_json(opt.json_path, &rep, &opt, model, &results, &err) < 0) {
        fprintf(stderr, "kvd-bench: %s\n", err.msg);
        goto out;
    }
    status = rep.failed > 0 ? 1 : 0;
out:
    kvd_bench_report_deinit(&rep);
    kvd_bench_results_deinit(&results);
    return status;
}
