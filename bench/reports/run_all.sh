#!/usr/bin/env bash
# run_all.sh - runs the five serving reports one after another (about 35 minutes).
#
# Each report measures with the real programs of a build directory, writes its raw JSON
# and a Markdown table into bench/results/ and its plot into docs/serving_*.png (see
# docs/benchmarks.md, "Serving reports"). They run in sequence, never in parallel: they
# share two cores with each other and with whatever else runs. Extra flags go to every
# report, e.g. `--render-only` (redraw from the JSON) or `--quick` with `--results DIR
# --docs DIR` (a fast smoke run of the scripts themselves, on another model if wanted).
#
# Usage: KVD_BUILD=build bench/reports/run_all.sh [--model DIR] [--threads N] [...]
# Needs: the build's server/kvd, bench/kvd-bench, bench/bench_kv, tools/kvd-gen,
# tools/kvd-mkmodel; gnuplot; /usr/bin/python3 with numpy; heaptrack (optional).
set -euo pipefail
cd "$(dirname "$0")/../.."

build=${KVD_BUILD:-build}
for target in server/kvd bench/kvd-bench bench/bench_kv tools/kvd-gen tools/kvd-mkmodel; do
  if [ ! -x "$build/$target" ]; then
    echo "run_all.sh: $build/$target is missing: ninja -C $build $target" >&2
    exit 1
  fi
done
command -v gnuplot >/dev/null || { echo "run_all.sh: gnuplot is missing (scripts/deps.sh)" >&2; exit 1; }

for report in kv_speedup concurrency kv_capacity multiturn memory; do
  echo "== $report ($(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  /usr/bin/python3 "bench/reports/$report.py" --build "$build" "$@"
done
