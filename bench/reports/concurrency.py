#!/usr/bin/python3
"""concurrency.py - report 2: throughput and latency of the daemon versus concurrency.

One kvd daemon (default configuration but --threads) serves a closed-loop kvd-bench run at
each concurrency C in 1, 2, 4, ..., 64: prompts of 128 words (about 128 tokens), exactly
128 output tokens (--ignore-eos), greedy. Low concurrencies send fewer requests so the
sweep stays around a quarter of an hour on a shared 2-core machine; each level uses its
own seed so no level's prompts are in the prefix cache from an earlier one (the hit count
is recorded to show it). A sampler polls /metrics meanwhile: the peak and time-averaged
kvd:num_requests_running show whether the engine really batched C requests at once.
Before the sweep one short request warms the daemon up (first-touch of its buffers).

Writes bench/results/concurrency.json, bench/results/concurrency.md, docs/serving_concurrency.png.
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvdreport as R  # noqa: E402

LEVELS = "1:3,2:4,4:8,8:16,16:32,32:48,64:64"
PROMPT_TOKENS = 128
OUTPUT_TOKENS = 128


def measure(args):
    model = R.ensure_model(args)
    levels = [tuple(int(x) for x in lv.split(":")) for lv in args.levels.split(",")]
    result = {"report": "concurrency", "command": R.command_line(), "machine": R.machine(),
              "load1_start": R.loadavg(), "threads": args.threads, "model": args.model,
              "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens, "levels": []}
    with tempfile.TemporaryDirectory(prefix="kvd-report-") as tmp, \
            R.Daemon(args, model, [], os.path.join(tmp, "kvd.log")) as d:
        result["banner"] = d.banner
        result["daemon_flags"] = "--threads %d" % args.threads
        R.run_kvd_bench(args, d.url, ["--requests", "1", "--prompt-tokens", "16", "--max-tokens", "8",
                                      "--ignore-eos", "--seed", "99"], os.path.join(tmp, "warm.json"))
        for c, n in levels:
            before = d.metrics()
            load_before = R.loadavg()[0]
            flags = ["--concurrency", str(c), "--requests", str(n), "--prompt-tokens",
                     str(args.prompt_tokens), "--max-tokens", str(args.output_tokens), "--ignore-eos",
                     "--seed", str(100 + c), "--timeout", "1800", "--duration", "3600"]
            with R.Sampler(d, 0.2) as s:
                bench = R.run_kvd_bench(args, d.url, flags, os.path.join(tmp, "c%d.json" % c))
            after = d.metrics()
            level = {"concurrency": c, "requests": n, "load1_before": load_before,
                     "load1_after": R.loadavg()[0], "load1_max": s.max_load1,
                     "peak_running": s.peak.get("num_requests_running"),
                     "mean_running": round(s.mean("num_requests_running"), 2),
                     "peak_waiting": s.peak.get("num_requests_waiting"),
                     "peak_kv_blocks_used": s.peak.get("kv_blocks_used"),
                     "preemptions": after["kvd:num_preemptions_total"] - before["kvd:num_preemptions_total"],
                     "prefix_cache_hit_tokens": after["kvd:prefix_cache_hits_total"]
                     - before["kvd:prefix_cache_hits_total"],
                     "kvd_bench": bench}
            result["levels"].append(level)
            print("  C=%-3d %7.1f tok/s  TTFT p50 %8.0f ms  TPOT p50 %7.1f ms  running peak %s (load %.2f)" % (
                c, bench["output_throughput"], bench["median_ttft_ms"], bench["median_tpot_ms"],
                level["peak_running"], load_before), file=sys.stderr)
            if bench["failed"] or bench["incomplete"]:
                print("  C=%d: %d failed, %d incomplete: %s" % (c, bench["failed"], bench["incomplete"],
                                                              bench["errors"]), file=sys.stderr)
    result["load1_end"] = R.loadavg()
    R.write_json(R.results_file(args, "concurrency.json"), result)


def render(args):
    res = R.read_json(R.results_file(args, "concurrency.json"))
    rows, data = [], {"thr": [], "lat": []}
    for lv in res["levels"]:
        b = lv["kvd_bench"]
        rows.append([lv["concurrency"], "%d/%d" % (b["completed"], b["num_prompts"]),
                     R.fmt(b["output_throughput"]), R.fmt(b["request_throughput"], 3),
                     R.fmt(b["median_ttft_ms"], 0), R.fmt(b["p99_ttft_ms"], 0),
                     R.fmt(b["median_tpot_ms"]), R.fmt(b["p99_tpot_ms"]),
                     R.fmt(b["median_e2el_ms"] / 1000), "%g / %.1f" % (lv["peak_running"], lv["mean_running"]),
                     "%.1f" % lv["load1_max"]])
        data["thr"].append((lv["concurrency"], b["output_throughput"], b["request_throughput"]))
        data["lat"].append((lv["concurrency"], b["median_ttft_ms"] / 1000, b["p99_ttft_ms"] / 1000,
                            b["median_tpot_ms"] / 1000, b["p99_tpot_ms"] / 1000))
    md = R.md_table(["C", "completed", "output tok/s", "req/s", "TTFT p50 (ms)", "TTFT p99 (ms)",
                     "TPOT p50 (ms)", "TPOT p99 (ms)", "E2E p50 (s)", "running peak / mean",
                     "load avg max"], rows)
    R.write_text(R.results_file(args, "concurrency.md"), md)

    out = os.path.join(R.path(args.docs), "serving_concurrency.png")
    script = R.png_header(out, 1200, 520) + """
set multiplot layout 1,2 title "kvd on the %s preset, %d threads: closed loop, %d-token prompts, %d output tokens"
set logscale x 2
set xrange [0.8:80]
set xtics (1, 2, 4, 8, 16, 32, 64)
set xlabel 'concurrent clients'
set ylabel 'output tokens/s'
set y2label 'requests/s'
set ytics nomirror
set y2tics
set yrange [0:*]
set y2range [0:*]
set key top left
plot $thr using 1:2 with linespoints lw 2 pt 7 lc rgb '#2a7ab9' title 'output tokens/s', \
     $thr using 1:3 axes x1y2 with linespoints lw 2 pt 5 lc rgb '#5cb85c' title 'requests/s (right axis)'
unset y2tics
unset y2label
set ytics mirror
set logscale y
set yrange [*:*]
set ylabel 'seconds, log scale'
set key top left
plot $lat using 1:2 with linespoints lw 2 pt 7 lc rgb '#d9534f' title 'TTFT p50', \
     $lat using 1:3 with linespoints lw 1 dt 2 pt 6 lc rgb '#d9534f' title 'TTFT p99', \
     $lat using 1:4 with linespoints lw 2 pt 5 lc rgb '#2a7ab9' title 'TPOT p50', \
     $lat using 1:5 with linespoints lw 1 dt 2 pt 4 lc rgb '#2a7ab9' title 'TPOT p99'
unset multiplot
""" % (os.path.basename(res["model"]), res["threads"], res["prompt_tokens"], res["output_tokens"])
    R.gnuplot(script, data)
    print("wrote %s" % os.path.relpath(out, R.SOURCE_ROOT), file=sys.stderr)


def main():
    p = R.common_args(__doc__.splitlines()[0])
    p.add_argument("--levels", default=LEVELS, help="concurrency:requests pairs (default %s)" % LEVELS)
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    p.add_argument("--output-tokens", type=int, default=OUTPUT_TOKENS)
    args = p.parse_args()
    if args.quick:
        args.levels = "1:2,4:4"
    if not args.render_only:
        measure(args)
    render(args)


if __name__ == "__main__":
    main()
