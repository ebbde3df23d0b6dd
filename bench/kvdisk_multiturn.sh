#!/usr/bin/env bash
# The KV disk tier's multi-turn benchmark (issue 17): S chat sessions of T turns, more
# history than the RAM pool holds, run twice with the same seed: on a daemon without the
# tier and on one with an empty --kv-disk DIR. kvd-bench keeps C sessions going at once,
# each turn resending the whole history, so a session's pages are evicted from RAM by
# the others' before its next turn: without the tier that history is prefilled again,
# with it the pages come back from disk. Prints kvd-bench's TTFT by turn for both runs.
#   bench/kvdisk_multiturn.sh MODEL [SESSIONS] [TURNS] [CONCURRENCY] [POOL_MB]
# Defaults: 48 sessions x 6 turns, 16 at once, a 64 MB pool (0.5B shape, f16 KV:
# 5,461 tokens; the sessions' histories reach ~1,100 tokens each, 53k in all), 128
# words per user message, 32 tokens per answer. Run time on an idle 2-core Zen 5:
# about 5 minutes without the tier, 2 with it.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/wait_kvd.sh
model=${1:?usage: bench/kvdisk_multiturn.sh MODEL [SESSIONS] [TURNS] [CONCURRENCY] [POOL_MB]}
sessions=${2:-48}
turns=${3:-6}
concurrency=${4:-16}
pool_mb=${5:-64}
build=${KVD_BUILD_DIR:-build}
port=${PORT:-18932}
out=${OUT:-$(mktemp -d /tmp/kvd-multiturn-XXXXXX)}
mkdir -p "$out"
run() { # $1: label, then daemon flags
  local label=$1; shift
  "$build/server/kvd" --model "$model" --port "$port" --kv-cache-mb "$pool_mb" "$@" > "$out/$label.log" 2>&1 &
  local pid=$!
  kvd_wait_listening "$out/$label.log" "$pid"
  "$build/bench/kvd-bench" --url "http://127.0.0.1:$port" --turns "$turns" --requests $((sessions * turns)) \
    --concurrency "$concurrency" --prompt-tokens 128 --max-tokens 32 --ignore-eos --seed 17 --duration 3600 \
    --timeout 1800 --no-progress --json "$out/$label.json" > "$out/$label.txt"
  curl -s "http://127.0.0.1:$port/metrics" | grep -E "^kvd:(kv_disk_|prefix_cache_|num_preemptions)" \
    > "$out/$label.metrics" || true
  kill -TERM "$pid"
  wait "$pid" || true
}
echo "load before: $(uptime)"
run ram-only
run disk-tier --kv-disk "$out/kv" --kv-disk-gb 4
echo "load after: $(uptime)"
for label in ram-only disk-tier; do
  echo "== $label"
  sed -n '/TTFT by turn/,/^---/p' "$out/$label.txt" | head -$((turns + 1))
  grep -E "Output token throughput|Mean TTFT|Median TTFT" "$out/$label.txt" || true
  cat "$out/$label.metrics"
done
echo "results in $out"
