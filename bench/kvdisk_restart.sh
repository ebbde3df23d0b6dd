#!/usr/bin/env bash
# The KV disk tier's restart benchmark (issue 17): N prompts of P tokens on a daemon with
# an empty --kv-disk DIR (cold: every prompt is prefilled), SIGTERM (the pages in RAM are
# written to DIR), a new daemon on the same DIR, the same N prompts again (kvd-bench's
# prompts are a function of --seed): TTFT cold vs after the restart.
#   bench/kvdisk_restart.sh MODEL [N] [P]    (results in $OUT, default a temporary dir)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/wait_kvd.sh
model=${1:?usage: bench/kvdisk_restart.sh MODEL [N] [P]}
n=${2:-6}
p=${3:-1024}
build=${KVD_BUILD_DIR:-build}
port=${PORT:-18931}
out=${OUT:-$(mktemp -d /tmp/kvd-disk-bench-XXXXXX)}
mkdir -p "$out"
dir=$out/kv
run() { # $1: label
  "$build/server/kvd" --model "$model" --port "$port" --kv-disk "$dir" --kv-disk-gb 4 --kv-cache-mb 256 \
    > "$out/$1.log" 2>&1 &
  local pid=$!
  kvd_wait_listening "$out/$1.log" "$pid"
  "$build/bench/kvd-bench" --url "http://127.0.0.1:$port" --requests "$n" --concurrency 1 --prompt-tokens "$p" \
    --max-tokens 1 --seed 7 --no-progress --json "$out/$1.json" > "$out/$1.txt"
  curl -s "http://127.0.0.1:$port/metrics" | grep -E "^kvd:kv_disk_" > "$out/$1.metrics" || true
  kill -TERM "$pid"
  wait "$pid"
}
echo "load before: $(uptime)"
run cold
run restart
echo "load after: $(uptime)"
for r in cold restart; do
  echo "$r: $(grep -E '^Median TTFT' "$out/$r.txt")  $(grep -E '^P99 TTFT' "$out/$r.txt")"
done
grep -E "^kvd:kv_disk_(pages|hits_total|hit_tokens_total|load_seconds_(sum|count)) " "$out/restart.metrics"
echo "results in $out"
