#!/usr/bin/env bash
# The KV disk tier's multi-turn benchmark (issue 17): S chat sessions of T turns, far more
# history than the RAM pool holds, run twice with the same seed: on a daemon without the
# tier and on one with an empty --kv-disk DIR. The load is chat users sharing a server:
# all S sessions are open at once and C clients cycle over them (kvd-bench --sessions),
# each sending the next turn of the session served longest ago, whole history resent.
# So between two turns of a session the S - 1 others each take a turn (their pages push
# its pages out of RAM: without the tier the history is prefilled again, with it the
# pages come back from disk), while the daemon never has more than C requests at once.
# Prints kvd-bench's TTFT and cached share by turn for both runs, and the tier's metrics.
#   bench/kvdisk_multiturn.sh MODEL [SESSIONS] [TURNS] [CONCURRENCY] [POOL_MB]
#                             [USER_WORDS] [ANSWER_TOKENS]
# Defaults: 200 sessions x 6 turns, 4 clients, a 256 MB pool (0.5B shape, f16 KV: 21,845
# tokens), 64-word user messages, 64-token answers (greedy, --ignore-eos): a turn-6
# prompt is ~780 tokens, the 200 histories ~156,000 (7x the pool). docs/benchmarks.md
# says why and gives the run time.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/wait_kvd.sh
model=${1:?usage: bench/kvdisk_multiturn.sh MODEL [SESSIONS] [TURNS] [CONCURRENCY] [POOL_MB] [USER_WORDS] [ANSWER_TOKENS]}
sessions=${2:-200}
turns=${3:-6}
concurrency=${4:-4}
pool_mb=${5:-256}
user_words=${6:-64}
answer_tokens=${7:-64}
build=${KVD_BUILD_DIR:-build}
port=${PORT:-18932}
out=${OUT:-$(mktemp -d /tmp/kvd-multiturn-XXXXXX)}
mkdir -p "$out"
run() { # $1: label, then daemon flags
  local label=$1; shift
  "$build/server/kvd" --model "$model" --port "$port" --kv-cache-mb "$pool_mb" "$@" \
    > "$out/$label.log" 2>&1 &
  local pid=$!
  kvd_wait_listening "$out/$label.log" "$pid"
  echo "$label: start $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$build/bench/kvd-bench" --url "http://127.0.0.1:$port" --turns "$turns" --sessions "$sessions" \
    --concurrency "$concurrency" --prompt-tokens "$user_words" --max-tokens "$answer_tokens" \
    --ignore-eos --seed 17 --duration 36000 --timeout 3600 --no-progress \
    --json "$out/$label.json" > "$out/$label.txt"
  echo "$label: end $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)"
  curl -s "http://127.0.0.1:$port/metrics" | grep -E "^kvd:(kv_disk_|prefix_cache_|num_preemptions)" \
    > "$out/$label.metrics" || true
  kill -TERM "$pid"
  wait "$pid" || true
}
run ram-only
run disk-tier --kv-disk "$out/kv" --kv-disk-gb 8
for label in ram-only disk-tier; do
  echo "== $label"
  grep -E "^Load:|Benchmark duration|Failed requests" "$out/$label.txt"
  sed -n '/TTFT by turn/,/^Gap between turns/p' "$out/$label.txt"
  grep -vE "_bucket" "$out/$label.metrics" || true
done
echo "results in $out"
