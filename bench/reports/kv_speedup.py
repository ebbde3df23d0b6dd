#!/usr/bin/python3
"""kv_speedup.py - report 1: generation time with and without the KV cache, 32..1024 tokens.

The tutorial's experiment, run with the real one-shot tool: `kvd-gen --ignore-eos --json`
generates N tokens greedily after an 8-token prompt, once with the paged KV cache and once
with --no-kv-cache (every step recomputes the whole sequence). The figure is kvd-gen's own
total_ms (prefill + decode; model loading excluded). Both modes must give the same ids.

Without a cache the work grows with the square of N, so on the qwen2.5-0.5b preset the
long runs would take far too long on a shared 2-core machine: it measures N <= 256, adds
512 only when the fitted curve predicts it under --max-recompute-s, and extrapolates the
rest with a least-squares fit of the per-step cost a + b*L + c*L^2 (L = tokens in the
sequence at that step, coefficients kept >= 0), clearly marked as extrapolated. The tiny
fixture model runs the full range in both modes, and the same fit made from its N <= 256
points is checked against its measured 512 and 1024 to show how far to trust the method.

Writes bench/results/kv_speedup.json, bench/results/kv_speedup.md, docs/serving_kv_speedup.png.
"""
import itertools
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvdreport as R  # noqa: E402

PROMPT = "The history of the printing press begins in"   # 8 Qwen2 tokens
ALL_N = [32, 64, 128, 256, 512, 1024]
FIT_FROM_N = 256   # the fit uses measured points up to here


def run_gen(args, model, n, kv_cache):
    cmd = [R.program(args, "tools/kvd-gen"), "--model", model, "--prompt", PROMPT,
           "--max-tokens", str(n), "--ignore-eos", "--json", "--threads", str(args.threads)]
    if not kv_cache:
        cmd.append("--no-kv-cache")
    with tempfile.NamedTemporaryFile("r", prefix="kvd-time-") as tf:
        load_before = R.loadavg()[0]
        r = subprocess.run(R.NICE + ["/usr/bin/time", "-f", "%U %S %e", "-o", tf.name] + cmd,
                           stdout=subprocess.PIPE, text=True)
        if r.returncode != 0:
            R.fail("kvd-gen failed (%d): %s" % (r.returncode, " ".join(cmd)))
        user, system, wall = (float(x) for x in tf.read().split()[-3:])
    out = json.loads(r.stdout)
    if out["generated_tokens"] != n:
        R.fail("kvd-gen generated %d tokens, asked %d" % (out["generated_tokens"], n))
    row = {"new_tokens": n, "kv_cache": kv_cache, "total_ms": out["total_ms"],
           "prefill_ms": out["prefill_ms"], "decode_ms": out["decode_ms"],
           "prompt_tokens": out["prompt_tokens"], "process_cpu_s": round(user + system, 2),
           "process_wall_s": wall, "load1_before": load_before, "load1_after": R.loadavg()[0],
           "ids": out["ids"]}
    print("  %-6s N=%-5d %10.1f ms  (load %.2f)" % ("cache" if kv_cache else "none", n,
                                                   out["total_ms"], load_before), file=sys.stderr)
    return row


def step_features(prompt_tokens, n):
    """Sums over the N steps of 1, L and L^2 (L = prompt + tokens so far)."""
    ls = [prompt_tokens + k for k in range(n)]
    return [float(n), float(sum(ls)), float(sum(l * l for l in ls))]


def fit_nonneg(points, prompt_tokens):
    """Least squares of total_ms = sum over steps of (a + b L + c L^2), all >= 0: the best of
    the unconstrained fits over every subset of the three terms whose coefficients are >= 0."""
    import numpy as np
    x = np.array([step_features(prompt_tokens, n) for n, _ in points])
    y = np.array([t for _, t in points])
    best = None
    for k in (3, 2, 1):
        for subset in itertools.combinations(range(3), k):
            coef, *_ = np.linalg.lstsq(x[:, subset], y, rcond=None)
            if (coef < 0).any():
                continue
            full = [0.0, 0.0, 0.0]
            for i, c in zip(subset, coef):
                full[i] = float(c)
            resid = float(((x @ np.array(full) - y) ** 2).sum())
            if best is None or resid < best[1]:
                best = (full, resid)
    return best[0]


def predict(coef, prompt_tokens, n):
    return sum(c * f for c, f in zip(coef, step_features(prompt_tokens, n)))


def measure_model(args, model, label, ns, nocache_all, repeats):
    rows = {"cache": {}, "none": {}}
    for kv_cache, key in ((True, "cache"), (False, "none")):
        for n in ns:
            if not kv_cache and not nocache_all and n > FIT_FROM_N:
                points = [(m, rows["none"][m]["total_ms"]) for m in sorted(rows["none"])]
                guess = predict(fit_nonneg(points, rows["none"][32]["prompt_tokens"]),
                                rows["none"][32]["prompt_tokens"], n) / 1000
                if guess > args.max_recompute_s:
                    print("  none   N=%-5d skipped: fit predicts %.0f s > %.0f s" %
                          (n, guess, args.max_recompute_s), file=sys.stderr)
                    continue
            runs = [run_gen(args, model, n, kv_cache) for _ in range(repeats)]
            rows[key][n] = min(runs, key=lambda r: r["total_ms"])
            rows[key][n]["runs_ms"] = [r["total_ms"] for r in runs]
    for n, r in rows["none"].items():
        r["ids_equal_to_cached"] = r["ids"] == rows["cache"][n]["ids"]
        if not r["ids_equal_to_cached"]:
            R.fail("%s N=%d: ids with and without the KV cache differ" % (label, n))
    for key in rows:
        for r in rows[key].values():
            r.pop("ids")
    return {"label": label, "model": os.path.relpath(model, R.SOURCE_ROOT), "repeats": repeats,
            "new_tokens": ns,
            "with_cache": [rows["cache"][n] for n in sorted(rows["cache"])],
            "without_cache": [rows["none"][n] for n in sorted(rows["none"])]}


def analyse(entry):
    """Adds the fit of the recompute curve and the speedup per N (measured or extrapolated)."""
    prompt = entry["with_cache"][0]["prompt_tokens"]
    none = {r["new_tokens"]: r["total_ms"] for r in entry["without_cache"]}
    cache = {r["new_tokens"]: r["total_ms"] for r in entry["with_cache"]}
    coef = fit_nonneg([(n, t) for n, t in sorted(none.items()) if n <= FIT_FROM_N], prompt)
    entry["fit"] = {"per_step_ms": "a + b*L + c*L^2, L = sequence length at the step",
                    "a_ms": coef[0], "b_ms_per_token": coef[1], "c_ms_per_token2": coef[2],
                    "fitted_on_n": sorted(n for n in none if n <= FIT_FROM_N)}
    table = []
    for n in entry["new_tokens"]:
        measured = n in none
        without = none[n] if measured else predict(coef, prompt, n)
        row = {"new_tokens": n, "with_ms": cache.get(n), "without_ms": without,
               "without_measured": measured, "fit_ms": predict(coef, prompt, n)}
        row["speedup"] = without / cache[n] if n in cache else None
        table.append(row)
    entry["table"] = table
    return entry


def measure(args):
    model = R.ensure_model(args)
    tiny = os.path.join(R.path(args.build), "fixtures", "tiny")
    if not os.path.isfile(os.path.join(tiny, "model.safetensors")):
        subprocess.run([R.program(args, "tools/kvd-mkmodel"), "--out", tiny, "--preset", "tiny",
                        "--seed", "1", "--tokenizer",
                        R.path("third_party/qwen-tokenizer/tokenizer.json")], check=True)
    result = {"report": "kv_speedup", "command": R.command_line(), "machine": R.machine(),
              "load1_start": R.loadavg(), "prompt": PROMPT, "threads": args.threads}
    ns = ALL_N[:-1] if args.quick else ALL_N
    print("tiny fixture:", file=sys.stderr)
    result["tiny"] = analyse(measure_model(args, tiny, "tiny fixture", ns, True, 3))
    if not args.quick:
        print("%s:" % args.model, file=sys.stderr)
        result["main"] = analyse(measure_model(args, model, os.path.basename(model), ns, False, 1))
    result["load1_end"] = R.loadavg()
    loads = [r["load1_before"] for m in ("tiny", "main") if m in result
             for k in ("with_cache", "without_cache") for r in result[m][k]]
    result["load1_max_seen"] = max(loads)
    # How well does the fit made from N <= 256 predict what was measured beyond it?
    check = []
    for row in result["tiny"]["table"]:
        if row["new_tokens"] > FIT_FROM_N and row["without_measured"]:
            check.append({"new_tokens": row["new_tokens"], "measured_ms": row["without_ms"],
                          "fit_ms": row["fit_ms"],
                          "error_pct": 100 * (row["fit_ms"] - row["without_ms"]) / row["without_ms"]})
    result["tiny"]["fit_check"] = check
    R.write_json(R.results_file(args, "kv_speedup.json"), result)


def render(args):
    res = R.read_json(R.results_file(args, "kv_speedup.json"))
    entries = [res[k] for k in ("main", "tiny") if k in res]
    md = []
    for e in entries:
        md.append("%s (`%s`), %d-token prompt, best of %d run%s per point:\n" % (
            e["label"], e["model"], e["with_cache"][0]["prompt_tokens"], e["repeats"],
            "s" if e["repeats"] > 1 else ""))
        rows = []
        for t in e["table"]:
            without = R.fmt(t["without_ms"] / 1000, 2) + ("" if t["without_measured"] else " (fit)")
            sp = R.fmt(t["speedup"], 1) + "x" + ("" if t["without_measured"] else " (fit)")
            rows.append([t["new_tokens"], R.fmt(t["with_ms"] / 1000, 2) if t["with_ms"] else "-",
                         without, sp])
        md.append(R.md_table(["new tokens", "with KV cache (s)", "without cache (s)", "speedup"], rows))
        f = e["fit"]
        md.append("Fit of the recompute time per step (from N = %s): %.3g ms + %.3g ms x L + %.3g ms x L^2.\n" % (
            ", ".join(str(n) for n in f["fitted_on_n"]), f["a_ms"], f["b_ms_per_token"], f["c_ms_per_token2"]))
    for c in res["tiny"].get("fit_check", []):
        md.append("Fit check on the tiny model: N = %d predicted %.2f s, measured %.2f s (%+.0f%%).\n" % (
            c["new_tokens"], c["fit_ms"] / 1000, c["measured_ms"] / 1000, c["error_pct"]))
    R.write_text(R.results_file(args, "kv_speedup.md"), "\n".join(md))

    out = os.path.join(R.path(args.docs), "serving_kv_speedup.png")
    data, plots_t, plots_s = {}, [], []
    styles = {"main": ("#2a7ab9", "#d9534f"), "tiny": ("#7fb3d5", "#f1a9a0")}
    for key in ("main", "tiny"):
        if key not in res:
            continue
        e = res[key]
        c_with, c_none = styles[key]
        data[key + "_with"] = [(t["new_tokens"], t["with_ms"] / 1000) for t in e["table"] if t["with_ms"]]
        data[key + "_none"] = [(t["new_tokens"], t["without_ms"] / 1000) for t in e["table"] if t["without_measured"]]
        coef = (e["fit"]["a_ms"], e["fit"]["b_ms_per_token"], e["fit"]["c_ms_per_token2"])
        data[key + "_fit"] = [(n, predict(coef, e["with_cache"][0]["prompt_tokens"], n) / 1000)
                              for n in range(32, 1025, 16)]
        data[key + "_fitpts"] = [(t["new_tokens"], t["without_ms"] / 1000) for t in e["table"]
                                 if not t["without_measured"]]
        data[key + "_sp"] = [(t["new_tokens"], t["speedup"]) for t in e["table"] if t["without_measured"]]
        data[key + "_spx"] = [(t["new_tokens"], t["speedup"]) for t in e["table"]
                              if not t["without_measured"] or t["new_tokens"] == max(
                                  x["new_tokens"] for x in e["table"] if x["without_measured"])]
        lw = 2 if key == "main" else 1
        plots_t += ["$%s_with with linespoints lw %d pt 7 lc rgb '%s' title '%s: with KV cache'" % (key, lw, c_with, e["label"]),
                    "$%s_none with linespoints lw %d pt 5 lc rgb '%s' title '%s: without cache (measured)'" % (key, lw, c_none, e["label"])]
        if key == "main" and len(data["main_spx"]) > 1:
            plots_t.append("$main_fit with lines dt 2 lw 1 lc rgb '%s' title '%s: without cache, fitted curve (extrapolated past %d)'" % (
                c_none, e["label"], max(n for n, _ in data["main_none"])))
            plots_t.append("$main_fitpts with points pt 4 ps 1.3 lc rgb '%s' title '%s: without cache, extrapolated'" % (
                c_none, e["label"]))
            plots_s.append("$main_spx with linespoints dt 2 pt 6 lw 2 lc rgb '%s' title '%s (extrapolated)'" % (c_with, e["label"]))
        plots_s.append("$%s_sp with linespoints lw %d pt 7 lc rgb '%s' title '%s (measured)'" % (key, lw, c_with, e["label"]))
    script = R.png_header(out, 1200, 540) + """
set multiplot layout 1,2 title "Generating N tokens after an 8-token prompt: paged KV cache vs recompute (kvd-gen, %d threads)"
set logscale x 2
set xrange [28:1150]
set xtics (32, 64, 128, 256, 512, 1024)
set logscale y
set xlabel 'new tokens N'
set ylabel 'generation time (s), log scale'
set yrange [0.01:1e6]
set format y '%%g'
set key top left font ',9'
plot %s
unset logscale y
set ylabel 'speedup (time without / with cache)'
set yrange [0:*]
plot %s
unset multiplot
""" % (res["threads"], ", ".join(plots_t), ", ".join(plots_s))
    R.gnuplot(script, data)
    print("wrote %s" % os.path.relpath(out, R.SOURCE_ROOT), file=sys.stderr)


def main():
    p = R.common_args(__doc__.splitlines()[0])
    p.add_argument("--max-recompute-s", type=float, default=600,
                   help="skip a recompute run the fit predicts longer than this")
    args = p.parse_args()
    if not args.render_only:
        measure(args)
    render(args)


if __name__ == "__main__":
    main()
