#!/usr/bin/env bash
# Runs every libFuzzer target (or those named) for SECONDS each, one after the other.
#
#   tests/fuzz/run.sh SECONDS [TARGET...]      e.g. tests/fuzz/run.sh 120 fuzz_http
#
# Targets are tests/fuzz/fuzz_*.c, built by tests/fuzz/build.sh into build-fuzz/ (or
# $KVD_FUZZ_OUT) when missing. Each run starts from the seed corpus
# tests/fuzz/corpus/NAME plus what earlier runs found (build-fuzz/corpus-NAME), uses
# tests/fuzz/dict/NAME.dict when there is one, and runs under nice in libFuzzer's fork
# mode so that one crash does not end the run: every crash, leak, timeout or OOM is
# kept in build-fuzz/artifacts/NAME/ and listed with its first error line. Known
# findings (tests/fuzz/crashes/NAME/*) are replayed first and reported as still open
# or fixed. Prints executions per target; exits 1 if anything crashed or still
# reproduces, so CI fails until the finding is fixed.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-}
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
  echo "usage: tests/fuzz/run.sh SECONDS [TARGET...]" >&2
  exit 2
fi
shift
out=${KVD_FUZZ_OUT:-build-fuzz}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for src in tests/fuzz/fuzz_*.c; do targets+=("$(basename "$src" .c)"); done
fi
missing=()
for t in "${targets[@]}"; do [ -x "$out/$t" ] || missing+=("$t"); done
[ ${#missing[@]} -eq 0 ] || tests/fuzz/build.sh "${missing[@]}"
# The tokenizer targets load the real tokenizer once per process.
export KVD_TOKENIZER_JSON=${KVD_TOKENIZER_JSON:-$PWD/third_party/qwen-tokenizer/tokenizer.json}

# First error line of an input replayed through its target ("" when it passes).
replay() {
  local bin=$1 input=$2
  if "$bin" -runs=1 "$input" >"$out/logs/replay.log" 2>&1; then
    echo ""
  else
    # A target's own check message, else the sanitizer's verdict.
    grep -m1 -E '^fuzz_[a-z_]+: |runtime error|ERROR: (AddressSanitizer|LeakSanitizer)' \
      "$out/logs/replay.log" || grep -m1 -E 'SUMMARY|ERROR' "$out/logs/replay.log" || echo "exit status non-zero"
  fi
}

mkdir -p "$out/logs"
status=0
printf 'kvd fuzz: %s s per target, %s\n' "$secs" "$(date -u +%Y-%m-%dT%H:%MZ)"
for t in "${targets[@]}"; do
  name=${t#fuzz_}
  bin="$out/$t"
  seeds=tests/fuzz/corpus/$name
  work="$out/corpus-$name"
  art="$out/artifacts/$name"
  log="$out/logs/$name.log"
  mkdir -p "$work" "$art" "$seeds"
  for known in tests/fuzz/crashes/"$name"/*; do
    [ -f "$known" ] || continue
    why=$(replay "$bin" "$known")
    if [ -n "$why" ]; then
      printf '  %-20s KNOWN FINDING still reproduces: %s: %s\n' "$t" "$known" "$why"
      status=1
    else
      printf '  %-20s known finding fixed: %s\n' "$t" "$known"
    fi
  done
  dict=()
  [ -f "tests/fuzz/dict/$name.dict" ] && dict=(-dict="tests/fuzz/dict/$name.dict")
  marker="$out/logs/$name.start"
  touch "$marker"
  nice -n 10 "$bin" -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$art/" "${dict[@]}" "$work" "$seeds" >"$log" 2>&1 || true
  execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
  cov=$(grep -oE '^#[0-9]+: cov: [0-9]+' "$log" | tail -1 | sed 's/.*cov: //')
  corpus=$(find "$work" -type f | wc -l)
  found=$(find "$art" -type f -newer "$marker" | sort)
  printf '  %-20s %12s execs  cov %6s  corpus %6s  new findings %s\n' "$t" "${execs:-0}" "${cov:-?}" \
    "$corpus" "$(printf '%s' "$found" | grep -c . || true)"
  for f in $found; do
    why=$(replay "$bin" "$f")
    # Fork mode keeps only the children's lines naming an ERROR; they tell what a
    # finding that depends on earlier inputs (or on timing) was.
    [ -n "$why" ] || why="does not reproduce alone; the run logged: $(grep 'ERROR:' "$log" |
      grep -v 'deadly signal' | sort | uniq -c | tr -s ' ' | paste -sd ';' -)"
    printf '      %s: %s\n' "$f" "$why"
    status=1
  done
  if [ -z "$execs" ]; then
    echo "      the target did not run; see $log" >&2
    status=1
  fi
done
exit $status
