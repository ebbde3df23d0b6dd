#!/usr/bin/env bash
# The KV disk tier's multi-turn benchmark (issue 17): S chat sessions of T turns, far more
# history than the RAM pool holds, run twice with the same seed: on a daemon without the
# tier and on one with an empty --kv-disk DIR. The load is chat users sharing a server:
# all S sessions are open at once and C clients cycle over them (kvd-bench --sessions),
# each sending the next turn of the session served longest ago, whole history resent.
# So between two turns of a session the S - 1 others each take a turn (their pages push
# its pages out of RAM: without the tier the history is prefilled again, with it the
# pages come back from disk), while the daemon never has more than C requests at once.
# Before each turn a client pauses (kvd-bench --think-time: exponential, seeded), and
# answers vary in length (--max-tokens A:B, uniform), so the clients do not run in lock
# step as they would with equal answers and no pause (then every turn arrives together
# with the others' and its TTFT is everyone's prefill).
# Prints kvd-bench's TTFT and cached share by turn for both runs, where each turn's
# server-side TTFT went (bench/kvdisk_phases.py over the daemon's request log), and the
# tier's metrics.
#   bench/kvdisk_multiturn.sh MODEL [SESSIONS] [TURNS] [CONCURRENCY] [POOL_MB]
#                             [USER_WORDS] [ANSWER_TOKENS] [THINK_S]
# Defaults: 200 sessions x 6 turns, 4 clients, a 256 MB pool (0.5B shape, f16 KV: 21,845
# tokens), 64-word user messages, answers of 32 to 96 tokens (uniform, mean 64; greedy,
# --ignore-eos), a 2 s mean pause before each turn: a turn-6 prompt is ~780 tokens, the
# 200 histories ~156,000 (7x the pool). docs/benchmarks.md says why and gives the run
# time.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/wait_kvd.sh
model=${1:?usage: bench/kvdisk_multiturn.sh MODEL [SESSIONS] [TURNS] [CONCURRENCY] [POOL_MB] [USER_WORDS] [ANSWER_TOKENS] [THINK_S]}
sessions=${2:-200}
turns=${3:-6}
concurrency=${4:-4}
pool_mb=${5:-256}
user_words=${6:-64}
answer_tokens=${7:-32:96}
think_s=${8:-2}
build=${KVD_BUILD_DIR:-build}
port=${PORT:-18932}
out=${OUT:-$(mktemp -d /tmp/kvd-multiturn-XXXXXX)}
mkdir -p "$out"
run() { # $1: label, $2: port, then daemon flags
  local label=$1 port=$2; shift 2
  "$build/server/kvd" --model "$model" --port "$port" --kv-cache-mb "$pool_mb" "$@" \
    > "$out/$label.log" 2>&1 &
  local pid=$!
  kvd_wait_listening "$out/$label.log" "$pid"
  echo "$label: start $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$build/bench/kvd-bench" --url "http://127.0.0.1:$port" --turns "$turns" --sessions "$sessions" \
    --concurrency "$concurrency" --prompt-tokens "$user_words" --max-tokens "$answer_tokens" \
    --ignore-eos --think-time "$think_s" --session-header --seed 17 --duration 36000 --timeout 3600 --no-progress \
    --json "$out/$label.json" > "$out/$label.txt"
  echo "$label: end $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)"
  curl -s "http://127.0.0.1:$port/metrics" | grep -E "^kvd:(kv_disk_|prefix_cache_|num_preemptions)" \
    > "$out/$label.metrics" || true
  kill -TERM "$pid"
  wait "$pid" || true
}
# PARALLEL=1 runs both halves at once (ports PORT and PORT+1): on a shared machine
# they then see the same load, at the price of sharing the CPUs with each other.
if [ "${PARALLEL:-0}" = 1 ]; then
  run ram-only "$port" &
  run disk-tier $((port + 1)) --kv-disk "$out/kv" --kv-disk-gb 8 &
  wait
else
  run ram-only "$port"
  run disk-tier "$port" --kv-disk "$out/kv" --kv-disk-gb 8
fi
for label in ram-only disk-tier; do
  echo "== $label"
  grep -E "^Load:|Benchmark duration|Failed requests" "$out/$label.txt"
  sed -n '/TTFT by turn/,/^Gap between turns/p' "$out/$label.txt"
  grep -vE "_bucket" "$out/$label.metrics" || true
  /usr/bin/python3 bench/kvdisk_phases.py "$out/$label.log"
done
echo "results in $out"
