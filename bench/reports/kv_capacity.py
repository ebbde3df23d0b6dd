#!/usr/bin/python3
"""kv_capacity.py - report 3: KV capacity and waste, paged blocks versus contiguous buffers.

Two parts. First the exact block counts of bench/bench_kv (the real block pool driven
without a model: waste at the peak of a continuous batch per block size, and how many
sessions a 1 GiB budget holds per scheme), parsed from its Markdown output and plotted.
Second a live check through the daemon: kvd with a small --kv-cache-mb serves more clients
than the pool could hold at full length, and a sampler reads kvd:num_requests_running and
kvd:kv_blocks_used from /metrics every 0.1 s. Its peak is set against what a server
reserving one contiguous buffer per request would admit into the same bytes: prompt +
max_tokens per request, or the model's whole context (max_position_embeddings). Growing on
demand lets the paged pool overcommit; when it runs dry the engine preempts (the count is
recorded), which is the price of that admission policy.

Writes bench/results/kv_capacity.json, bench/results/kv_capacity.md, docs/serving_kv_capacity.png.
"""
import math
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvdreport as R  # noqa: E402


def parse_md_tables(text):
    """Each Markdown table of bench_kv's output under its ### heading: {heading: [rows]}."""
    tables, heading, rows = {}, None, None
    for line in text.splitlines():
        if line.startswith("### "):
            heading = line[4:].strip()
            rows = None
        elif line.startswith("|") and heading:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if rows is None:
                rows = tables.setdefault(heading, [])
                header = cells
            elif not set(line) <= set("|- "):
                rows.append(dict(zip(header, cells)))
    return tables


def number(cell):
    m = re.search(r"[-+]?\d+(\.\d+)?", cell.replace(",", ""))
    return float(m.group(0)) if m else None


def measure(args):
    result = {"report": "kv_capacity", "command": R.command_line(), "machine": R.machine(),
              "load1_start": R.loadavg(), "model": args.model, "threads": args.threads}
    exe = R.program(args, "bench/bench_kv")
    out = subprocess.run(R.NICE + [exe], stdout=subprocess.PIPE, text=True, check=True).stdout
    tables = parse_md_tables(out)
    waste = next(v for k, v in tables.items() if k.startswith("Waste"))
    capacity = next(v for k, v in tables.items() if k.startswith("Capacity"))
    result["bench_kv"] = {"command": "build/bench/bench_kv", "waste": waste, "capacity": capacity,
                          "headings": list(tables)}

    model = R.ensure_model(args)
    flags = ["--concurrency", str(args.clients), "--requests", str(args.requests),
             "--prompt-tokens", "128", "--max-tokens", str(args.max_tokens), "--ignore-eos",
             "--seed", "300", "--timeout", "1800", "--duration", "3600"]
    extra = ["--kv-cache-mb", str(args.kv_mb)]
    with tempfile.TemporaryDirectory(prefix="kvd-report-") as tmp, \
            R.Daemon(args, model, extra, os.path.join(tmp, "kvd.log")) as d:
        before = d.metrics()
        with R.Sampler(d, 0.1) as s:
            bench = R.run_kvd_bench(args, d.url, flags, os.path.join(tmp, "live.json"))
        after = d.metrics()
        b = d.banner
    bytes_per_token = b["kv_block_bytes"] / b["block_size"]
    # The typical request (median prompt) sets the full-length figures: kvd-bench's words
    # make most prompts exactly 128 tokens, a few 129.
    mean_prompt = bench["total_input_tokens"] / max(1, bench["completed"])
    full_len = sorted(bench["input_lens"])[len(bench["input_lens"]) // 2] + args.max_tokens
    series = s.series[::max(1, len(s.series) // 400)]
    columns = ["t", "num_requests_running", "num_requests_waiting", "kv_blocks_used"]
    result["live"] = {
        "daemon_flags": " ".join(extra + ["--threads", str(args.threads)]),
        "kvd_bench_flags": " ".join(flags), "banner": b,
        "budget_tokens": b["kv_blocks"] * b["block_size"],
        "bytes_per_token": bytes_per_token, "mean_prompt_tokens": mean_prompt,
        "full_length_tokens": full_len,
        "paged_peak_running": s.peak.get("num_requests_running"),
        "paged_mean_running": round(s.mean("num_requests_running"), 2),
        "paged_peak_blocks_used": s.peak.get("kv_blocks_used"),
        "paged_sessions_at_full_length": b["kv_blocks"] // math.ceil(full_len / b["block_size"]),
        "contiguous_prompt_plus_max_tokens": int(b["kv_pool_bytes"] // (full_len * bytes_per_token)),
        "contiguous_max_position_embeddings": int(b["kv_pool_bytes"] // (b["context"] * bytes_per_token)),
        "context": b["context"],
        "preemptions": after["kvd:num_preemptions_total"] - before["kvd:num_preemptions_total"],
        "load1_max": s.max_load1,
        "series_columns": columns,
        "series": [" ".join("%g" % (r.get(k) or 0) for k in columns) for r in series],
        "kvd_bench": {k: v for k, v in bench.items() if not isinstance(v, list)},
    }
    result["load1_end"] = R.loadavg()
    R.write_json(R.results_file(args, "kv_capacity.json"), result)


def render(args):
    res = R.read_json(R.results_file(args, "kv_capacity.json"))
    bk, live = res["bench_kv"], res["live"]
    b = live["banner"]
    md = ["bench_kv (exact block counts; see \"KV cache manager\" above for its full tables):\n",
          R.md_table(["scheme", "waste at peak"], [[r["scheme"], r["waste at peak"]] for r in bk["waste"]]),
          R.md_table(["scheme (1 GiB budget)", "sessions at once"],
                     [[r["scheme"], r["sessions at once"]] for r in bk["capacity"]]),
          "Live: kvd %s on %s, pool of %d blocks x %d tokens = %d tokens (%d bytes); "
          "kvd-bench %s. Prompts averaged %.2f tokens; a typical finished request holds %d tokens.\n" % (
              live["daemon_flags"], os.path.basename(res.get("model", "models/bench-0.5b")),
              b["kv_blocks"], b["block_size"], live["budget_tokens"], b["kv_pool_bytes"],
              live["kvd_bench_flags"], live["mean_prompt_tokens"], live["full_length_tokens"]),
          R.md_table(["scheme, same KV bytes", "requests running at once"], [
              ["paged (kvd), peak of kvd:num_requests_running", "%g" % live["paged_peak_running"]],
              ["paged (kvd), time average while loaded", "%.1f" % live["paged_mean_running"]],
              ["paged, every request at full length (no overcommit)", live["paged_sessions_at_full_length"]],
              ["contiguous, reserve prompt + max_tokens", live["contiguous_prompt_plus_max_tokens"]],
              ["contiguous, reserve the whole context (%d tokens)" % live["context"],
               live["contiguous_max_position_embeddings"]]]),
          "Peak kvd:kv_blocks_used %g of %d; %d preemptions; %d/%d requests completed, %.1f output tok/s.\n" % (
              live["paged_peak_blocks_used"], b["kv_blocks"], live["preemptions"],
              live["kvd_bench"]["completed"], live["kvd_bench"]["num_prompts"],
              live["kvd_bench"]["output_throughput"])]
    R.write_text(R.results_file(args, "kv_capacity.md"), "\n".join(md))

    out = os.path.join(R.path(args.docs), "serving_kv_capacity.png")
    waste = [(i, r["scheme"].replace("contiguous, ", "contig. ").replace("max_position_embeddings", "max ctx"),
              number(r["waste at peak"])) for i, r in enumerate(bk["waste"])]
    cap = [(i, r["scheme"].replace("reserve ", "").replace("max_position_embeddings", "max ctx"),
            number(r["sessions at once"])) for i, r in enumerate(bk["capacity"])]
    data = {"waste": [(i, '"%s"' % name, v) for i, name, v in waste],
            "cap": [(i, '"%s"' % name, v) for i, name, v in cap],
            "run": [(t, running, blocks, waiting) for t, running, waiting, blocks in
                    (row.split() for row in live["series"])]}
    script = R.png_header(out, 1500, 560) + """
set multiplot layout 1,3 title "KV memory: paged blocks vs contiguous per-request buffers"
set style fill solid 0.85 border -1
set boxwidth 0.7
set title 'bench_kv: waste at the peak of a batch (%%)'
set xtics rotate by -35 font ',8'
set logscale y
set yrange [0.1:150]
set ylabel 'allocated bytes holding no token (%%), log scale'
plot $waste using 1:3:xtic(2) with boxes lc rgb '#2a7ab9' notitle, \
     $waste using 1:($3*1.25):(sprintf('%%.1f', $3)) with labels font ',8' notitle
set title 'bench_kv: sessions in a 1 GiB budget'
set yrange [1:200]
set ylabel 'sessions at full length, log scale'
plot $cap using 1:3:xtic(2) with boxes lc rgb '#5cb85c' notitle, \
     $cap using 1:($3*1.25):(sprintf('%%d', $3)) with labels font ',9' notitle
unset logscale y
set xtics norotate font ',10'
set title sprintf('live: kvd --kv-cache-mb %d, %d clients', %d, %d)
set xlabel 'seconds'
set ylabel 'requests'
set y2label 'KV blocks used'
set ytics nomirror
set y2tics
set yrange [0:%d]
set y2range [0:%d]
set key below font ',9' maxrows 3
plot $run using 1:2 with steps lw 2 lc rgb '#2a7ab9' title 'kvd:num_requests_running', \
     $run using 1:4 with steps lw 1 lc rgb '#aaaaaa' title 'kvd:num_requests_waiting', \
     $run using 1:3 axes x1y2 with lines lw 1 lc rgb '#f0ad4e' title 'kvd:kv_blocks_used (right)', \
     %d with lines dt 2 lw 2 lc rgb '#d9534f' title 'contiguous prompt+max_tokens: %d', \
     %d with lines dt 3 lw 2 lc rgb '#000000' title 'contiguous whole context: %d'
unset multiplot
""" % (args_kv_mb(live), args_clients(live), args_kv_mb(live), args_clients(live),
       args_clients(live) + 2, int(b["kv_blocks"] * (args_clients(live) + 2) / max(1, args_clients(live))),
       live["contiguous_prompt_plus_max_tokens"], live["contiguous_prompt_plus_max_tokens"],
       live["contiguous_max_position_embeddings"], live["contiguous_max_position_embeddings"])
    R.gnuplot(script, data)
    print("wrote %s" % os.path.relpath(out, R.SOURCE_ROOT), file=sys.stderr)


def args_kv_mb(live):
    return int(re.search(r"--kv-cache-mb (\d+)", live["daemon_flags"]).group(1))


def args_clients(live):
    return int(re.search(r"--concurrency (\d+)", live["kvd_bench_flags"]).group(1))


def main():
    p = R.common_args(__doc__.splitlines()[0])
    p.add_argument("--kv-mb", type=int, default=24, help="the daemon's --kv-cache-mb")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    if args.quick:
        args.requests = args.clients
    if not args.render_only:
        measure(args)
    render(args)


if __name__ == "__main__":
    main()
