#!/usr/bin/env bash
# The KV disk tier's restart benchmark (issue 17): N chat sessions of P tokens of history,
# SIGTERM, a new daemon on the same --kv-disk DIR, the next turn of every session: its
# TTFT against a cold daemon's, and its answers against a daemon that never restarted.
#   1. daemon A, empty DIR: turn 1 of the N sessions (P token ids each, greedy), SIGTERM
#      (the pages still in RAM are written to DIR);
#   2. daemon B on the same DIR: turn 2 of every session (turn 1 + its answer + 16 new
#      tokens; 32 greedy tokens with logprobs): TTFT "after restart";
#   3. daemon C without the tier, never restarted: turn 1 of every session, then turn 2:
#      by then the other N - 1 sessions have pushed each one's pages out of its pool, so
#      turn 2 prefills the whole history (cached_tokens says so): TTFT "cold daemon".
# Checks: C's turn-1 answers equal A's and C's turn-2 answers equal B's (text and every
# logprob); exits 1 otherwise. One request at a time.
#   bench/kvdisk_restart.sh MODEL [N] [P]   (results in $OUT, default a temporary dir)
# Defaults 50 x 2000 (issue 17's figure): ~9 minutes on an idle 2-core Zen 5 with the
# 0.5B shape (three passes of 100,000 prompt tokens, B's pass is short).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/wait_kvd.sh
model=${1:?usage: bench/kvdisk_restart.sh MODEL [N] [P]}
n=${2:-50}
p=${3:-2000}
build=${KVD_BUILD_DIR:-build}
port=${PORT:-18931}
out=${OUT:-$(mktemp -d /tmp/kvd-disk-bench-XXXXXX)}
mkdir -p "$out"
dir=$out/kv
pid=
trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; true' EXIT
driver() { /usr/bin/python3 bench/kvdisk_restart.py "$@" --url "http://127.0.0.1:$port" \
  --sessions "$n" --prompt-tokens "$p"; }
start() { # $1: label, then daemon flags
  local label=$1; shift
  "$build/server/kvd" --model "$model" --port "$port" --kv-cache-mb 256 "$@" > "$out/$label.log" 2>&1 &
  pid=$!
  kvd_wait_listening "$out/$label.log" "$pid"
  echo "$label: start $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)"
}
stop() { # $1: label
  curl -s "http://127.0.0.1:$port/metrics" | grep -E "^kvd:kv_disk_" > "$out/$1.metrics" || true
  echo "$1: end $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)"
  kill -TERM "$pid"
  wait "$pid"
  pid=
}
start A --kv-disk "$dir" --kv-disk-gb 4
driver first --out "$out/A-turn1.json" 2> "$out/A-turn1.txt"
stop A
start B --kv-disk "$dir" --kv-disk-gb 4
driver next --state "$out/A-turn1.json" --out "$out/B-turn2.json" 2> "$out/B-turn2.txt"
stop B
start C
driver first --out "$out/C-turn1.json" 2> "$out/C-turn1.txt"
driver next --state "$out/C-turn1.json" --out "$out/C-turn2.json" 2> "$out/C-turn2.txt"
stop C
/usr/bin/python3 bench/kvdisk_restart.py report "$out/C-turn2.json" "$out/B-turn2.json"
grep -E "^kvd:kv_disk_(pages|hits_total|misses_total|hit_tokens_total|pages_corrupt_total|load_seconds_(sum|count)) " "$out/B.metrics"
echo "results in $out"
/usr/bin/python3 bench/kvdisk_restart.py compare "$out/A-turn1.json" "$out/C-turn1.json" \
  "$out/B-turn2.json" "$out/C-turn2.json"
