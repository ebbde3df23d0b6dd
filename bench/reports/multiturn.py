#!/usr/bin/python3
"""multiturn.py - report 4: multi-turn chat, time to first token per turn, prefix cache on/off.

kvd-bench --turns 6 runs chat sessions that resend their whole history each turn (system,
every user message, every assistant answer as streamed, plus a new user message), so turn
t's prompt is mostly turn t-1's prompt and answer. The same workload (same seed, so the
same words) runs against two fresh daemons: the default one (prefix cache on) and one with
--no-prefix-cache. kvd-bench gives TTFT by turn. The cached share comes from the daemon:
kvd:prefix_cache_hits_total / kvd:prefix_cache_queries_total on /metrics for the whole run,
and per turn from the request log's cached_tokens (the same figure as the response's
usage.prompt_tokens_details.cached_tokens), matched to kvd-bench's requests by their exact
(prompt_tokens, completion_tokens). Each daemon first serves one plain completion with
random words to warm it up; it shares no prefix with the chat template.

Writes bench/results/multiturn.json, bench/results/multiturn.md, docs/serving_multiturn.png.
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvdreport as R  # noqa: E402


def cached_by_turn(bench, log_rows):
    """Sums prompt and cached tokens per turn, pairing each kvd-bench request with an unused
    log line of the same prompt/completion token counts."""
    pool = [r for r in log_rows if r["path"] == "/v1/chat/completions"]
    turns, unmatched = {}, 0
    for inp, outp, turn in zip(bench["input_lens"], bench["output_lens"], bench["turn_of_request"]):
        hit = next((r for r in pool if r["prompt_tokens"] == inp and r["completion_tokens"] == outp), None)
        t = turns.setdefault(turn, {"turn": turn, "requests": 0, "prompt_tokens": 0, "cached_tokens": 0})
        if hit is None:
            unmatched += 1
            continue
        pool.remove(hit)
        t["requests"] += 1
        t["prompt_tokens"] += inp
        t["cached_tokens"] += hit["cached_tokens"]
    return [turns[k] for k in sorted(turns)], unmatched


def reusable_by_turn(bench, block_size):
    """Per turn, the prompt tokens a prefix cache could serve at best: the session's previous
    prompt and answer, whole blocks only, never the prompt's last token (it is recomputed for
    its logits). Turn 1 is left out: what it shares (the system message) is not known here."""
    where = {}
    for i, (sess, turn) in enumerate(zip(bench["session_of_request"], bench["turn_of_request"])):
        where[(sess, turn)] = i
    out = {}
    for (sess, turn), i in where.items():
        prev = where.get((sess, turn - 1))
        if prev is None:
            continue
        held = bench["input_lens"][prev] + bench["output_lens"][prev]
        best = min(held, bench["input_lens"][i] - 1) // block_size * block_size
        out[turn] = out.get(turn, 0) + best
    return out


def run_one(args, model, extra, flags, tmp, name):
    with R.Daemon(args, model, extra, os.path.join(tmp, name + ".log")) as d:
        R.run_kvd_bench(args, d.url, ["--requests", "1", "--prompt-tokens", "16", "--max-tokens", "8",
                                      "--ignore-eos", "--seed", "99"], os.path.join(tmp, name + "-warm.json"))
        before = d.metrics()
        load_before = R.loadavg()[0]
        with R.Sampler(d, 0.5) as s:
            bench = R.run_kvd_bench(args, d.url, flags, os.path.join(tmp, name + ".json"))
        after = d.metrics()
        rows = d.request_log()
    per_turn, unmatched = cached_by_turn(bench, rows)
    q = after["kvd:prefix_cache_queries_total"] - before["kvd:prefix_cache_queries_total"]
    h = after["kvd:prefix_cache_hits_total"] - before["kvd:prefix_cache_hits_total"]
    print("  %s: %d/%d completed, TTFT p50 %.0f ms, prefix hits %d of %d tokens" % (
        name, bench["completed"], bench["num_prompts"], bench["median_ttft_ms"], h, q), file=sys.stderr)
    return {"daemon_flags": " ".join(extra + ["--threads", str(args.threads)]), "banner": d.banner,
            "load1_before": load_before, "load1_max": s.max_load1, "load1_after": R.loadavg()[0],
            "prefix_cache_queries": q, "prefix_cache_hits": h,
            "preemptions": after["kvd:num_preemptions_total"] - before["kvd:num_preemptions_total"],
            "cached_by_turn": per_turn, "unmatched_log_lines": unmatched,
            "reusable_by_turn": reusable_by_turn(bench, d.banner["block_size"]), "kvd_bench": bench}


def measure(args):
    model = R.ensure_model(args)
    flags = ["--turns", str(args.turns), "--concurrency", str(args.concurrency),
             "--requests", str(args.turns * args.sessions), "--prompt-tokens", str(args.prompt_tokens),
             "--max-tokens", str(args.max_tokens), "--ignore-eos", "--seed", "400",
             "--timeout", "1800", "--duration", "3600"]
    result = {"report": "multiturn", "command": R.command_line(), "machine": R.machine(),
              "load1_start": R.loadavg(), "model": args.model, "threads": args.threads,
              "kvd_bench_flags": " ".join(flags)}
    with tempfile.TemporaryDirectory(prefix="kvd-report-") as tmp:
        result["prefix_on"] = run_one(args, model, [], flags, tmp, "prefix-on")
        result["prefix_off"] = run_one(args, model, ["--no-prefix-cache"], flags, tmp, "prefix-off")
    result["load1_end"] = R.loadavg()
    R.write_json(R.results_file(args, "multiturn.json"), result)


def render(args):
    res = R.read_json(R.results_file(args, "multiturn.json"))
    on, off = res["prefix_on"], res["prefix_off"]
    t_on = {t["turn"]: t for t in on["kvd_bench"]["ttft_by_turn"]}
    t_off = {t["turn"]: t for t in off["kvd_bench"]["ttft_by_turn"]}
    c_on = {t["turn"]: t for t in on["cached_by_turn"]}
    reusable = {int(k): v for k, v in on["reusable_by_turn"].items()}
    rows, data = [], {"turns": []}
    for turn in sorted(t_on):
        a, b, c = t_on[turn], t_off.get(turn), c_on.get(turn)
        share = 100.0 * c["cached_tokens"] / c["prompt_tokens"] if c and c["prompt_tokens"] else 0
        mean_prompt = c["prompt_tokens"] / c["requests"] if c and c["requests"] else 0
        rows.append([turn, a["completed"], R.fmt(mean_prompt, 0), R.fmt(a["median_ttft_ms"], 0),
                     R.fmt(a["p99_ttft_ms"], 0), R.fmt(b["median_ttft_ms"], 0) if b else "-",
                     R.fmt(b["p99_ttft_ms"], 0) if b else "-",
                     (R.fmt(b["median_ttft_ms"] / a["median_ttft_ms"], 1) + "x") if b else "-",
                     "%.0f%%" % share,
                     "%.0f%%" % (100.0 * reusable[turn] / c["prompt_tokens"]) if turn in reusable and c
                     and c["prompt_tokens"] else "-"])
        data["turns"].append((turn, a["median_ttft_ms"] / 1000, b["median_ttft_ms"] / 1000 if b else "NaN",
                              share, a["p99_ttft_ms"] / 1000, b["p99_ttft_ms"] / 1000 if b else "NaN"))
    md = [R.md_table(["turn", "requests", "mean prompt tokens", "TTFT p50 on (ms)", "TTFT p99 on (ms)",
                      "TTFT p50 off (ms)", "TTFT p99 off (ms)", "off / on (p50)", "cached share (on)",
                      "reusable at best"], rows)]
    for name, r in (("prefix cache on", on), ("prefix cache off", off)):
        b = r["kvd_bench"]
        share = 100.0 * r["prefix_cache_hits"] / r["prefix_cache_queries"] if r["prefix_cache_queries"] else 0
        md.append("%s: %d/%d requests, duration %.1f s, %.1f output tok/s, TTFT p50 %.0f ms, "
                  "/metrics prefix cache hits %d of %d prompt tokens (%.1f%%), %d preemptions, "
                  "load average up to %.1f.\n" % (
                      name, b["completed"], b["num_prompts"], b["duration"], b["output_throughput"],
                      b["median_ttft_ms"], r["prefix_cache_hits"], r["prefix_cache_queries"], share,
                      r["preemptions"], r["load1_max"]))
    if on["unmatched_log_lines"] or off["unmatched_log_lines"]:
        md.append("(%d requests could not be paired with a log line.)\n" %
                  (on["unmatched_log_lines"] + off["unmatched_log_lines"]))
    R.write_text(R.results_file(args, "multiturn.md"), "\n".join(md))

    out = os.path.join(R.path(args.docs), "serving_multiturn.png")
    script = R.png_header(out, 1000, 560) + """
set title "Multi-turn chat on %s: TTFT per turn, prefix cache on vs off\\n(%s)"
set xlabel 'turn'
set ylabel 'time to first token (s)'
set y2label 'prompt tokens served from the prefix cache (%%)'
set ytics nomirror
set y2tics
set yrange [0:*]
set y2range [0:100]
set xtics 1
set key top left
set style fill solid 0.85 border -1
set boxwidth 0.35
plot $turns using ($1-0.18):3 with boxes lc rgb '#d9534f' title 'TTFT p50, --no-prefix-cache', \
     $turns using ($1+0.18):2 with boxes lc rgb '#2a7ab9' title 'TTFT p50, prefix cache on', \
     $turns using ($1-0.18):6 with points pt 2 lc rgb '#8b0000' title 'p99 off', \
     $turns using ($1+0.18):5 with points pt 2 lc rgb '#0b3d66' title 'p99 on', \
     $turns using 1:4 axes x1y2 with linespoints lw 2 pt 7 lc rgb '#5cb85c' title 'cached share, on (right axis)'
""" % (os.path.basename(res["model"]), res["kvd_bench_flags"].replace(" --timeout 1800 --duration 3600", ""))
    R.gnuplot(script, data)
    print("wrote %s" % os.path.relpath(out, R.SOURCE_ROOT), file=sys.stderr)


def main():
    p = R.common_args(__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--sessions", type=int, default=4, help="sessions in all (requests = turns x sessions)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="words per new user message")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    if args.quick:
        args.turns, args.sessions = 3, 2
    if not args.render_only:
        measure(args)
    render(args)


if __name__ == "__main__":
    main()
