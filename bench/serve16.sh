#!/usr/bin/env bash
# bench/serve16.sh - output tokens/s of the daemon through HTTP with 16 concurrent streams,
# one daemon per model given, each measured alone, with its resident memory.
#
#   bench/serve16.sh [--build DIR] [--threads N] [--requests R] MODEL...
#
# The request shape of docs/benchmarks.md "Serving reports" (report 2 at 16 clients):
# kvd --model MODEL --threads N (defaults otherwise: 512 MiB pool, max_num_seqs 64,
# 512-token steps), one warm-up request, then kvd-bench --concurrency 16 --requests 32
# --prompt-tokens 128 --max-tokens 128 --ignore-eos --seed 116. Prints a Markdown row per
# model: output tok/s, TPOT p50, the daemon's VmRSS idle and after the run, VmHWM, the
# weights and KV pool of its banner, and the load average before and after.
# Run time: about 1 minute per model on an idle 2-core machine (4096 output tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/wait_kvd.sh
build=build threads=2 requests=32
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    -*) echo "usage: $0 [--build DIR] [--threads N] [--requests R] MODEL..." >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: $0 [--build DIR] [--threads N] [--requests R] MODEL..." >&2; exit 2; }
tmp=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -INT "$pid"
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
status_kb() { awk -v key="$2:" '$1 == key {print $2}' "/proc/$1/status"; }

echo "| model | output tok/s | TPOT p50 ms | VmRSS idle MiB | VmRSS after MiB | VmHWM MiB | weights MiB | KV pool MiB | overhead after (RSS - weights - KV resident) | load avg before / after |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
for model in "$@"; do
  "$build/server/kvd" --model "$model" --port 0 --threads "$threads" > "$tmp/kvd.log" 2>&1 &
  pid=$!
  kvd_wait_listening "$tmp/kvd.log" "$pid"
  url=$(grep -o "kvd: listening on http://[^ ]*" "$tmp/kvd.log" | cut -d' ' -f4)
  "$build/bench/kvd-bench" --url "$url" --no-progress --json "$tmp/warm.json" --requests 1 \
    --prompt-tokens 16 --max-tokens 8 --ignore-eos --seed 99 > /dev/null
  sleep 1
  idle=$(status_kb "$pid" VmRSS)
  before=$(cut -d' ' -f1 /proc/loadavg)
  "$build/bench/kvd-bench" --url "$url" --no-progress --json "$tmp/run.json" --concurrency 16 \
    --requests "$requests" --prompt-tokens 128 --max-tokens 128 --ignore-eos --seed 116 \
    --timeout 1800 > /dev/null
  after=$(status_kb "$pid" VmRSS) hwm=$(status_kb "$pid" VmHWM)
  # the weights arena and the KV pool are the mappings of the banner's sizes (smaps)
  read -r weights_res pool_res < <(/usr/bin/python3 - "$pid" "$tmp/kvd.log" <<'EOF2'
import re, sys
pid, log = int(sys.argv[1]), open(sys.argv[2]).read()
weights = int(re.search(r"(\d+) bytes of weights", log).group(1))
pool = int(re.search(r"KV pool: \d+ blocks of \d+ tokens, (\d+) bytes", log).group(1))
res = {"weights": 0, "pool": 0}
for b in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/%d/smaps" % pid).read()):
    lo, hi = (int(x, 16) for x in b.split()[0].split("-"))
    rss = int(re.search(r"\nRss:\s+(\d+)", b).group(1))
    for name, size in (("weights", weights), ("pool", pool)):
        if size <= hi - lo < size + (4 << 20):
            res[name] = max(res[name], rss)
print(res["weights"], res["pool"])
EOF2
)
  kill -INT "$pid"; wait "$pid" 2>/dev/null || true; pid=
  read -r tps tpot < <(/usr/bin/python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("%.1f %.1f" % (r["output_throughput"], r["median_tpot_ms"]))' "$tmp/run.json")
  echo "| $model | $tps | $tpot | $(mib "$idle") | $(mib "$after") | $(mib "$hwm") | $(mib "$weights_res") | $(mib "$pool_res") | $(mib $((after - weights_res - pool_res))) | $before / $(cut -d' ' -f1 /proc/loadavg) |"
done
