#!/usr/bin/env bash
# The extra CI stages, run after scripts/test.sh: the whole suite under sanitizers,
# then a short run of every fuzz target.
#
#   scripts/ci-extra.sh [asan] [fuzz]        (no argument: both, in that order)
#
# asan: configures build-asan (or $KVD_ASAN_BUILD_DIR) with AddressSanitizer and
#   UndefinedBehaviorSanitizer, prepares its fixtures and runs every registered test
#   (units, end-to-end, and the soak suite: bad models, slow clients, pool exhaustion,
#   the daemon's whole life under LeakSanitizer, a 60 s soak) with leak detection on
#   and UBSan halting at the first report; timeouts are tripled for the sanitizers' cost.
# fuzz: builds every libFuzzer target (tests/fuzz/build.sh: meson -Dfuzz=true with
#   clang in build-fuzz/, targets listed in tests/fuzz/meson.build) and runs each for
#   $KVD_FUZZ_SECONDS (default 30) seconds with tests/fuzz/run.sh, which fails on any
#   crash, leak, timeout or still-open known finding.
# Budget on 2 cores: about 25 minutes at most (each stage prints the time used so far).
# KVD_CI_EXTRA=0 skips everything (for a quick local scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${KVD_CI_EXTRA:-1}" = 0 ]; then
  echo "kvd ci-extra: skipped (KVD_CI_EXTRA=0)" >&2
  exit 0
fi
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(asan fuzz)
asan_dir=${KVD_ASAN_BUILD_DIR:-build-asan}
fuzz_seconds=${KVD_FUZZ_SECONDS:-30}
started=$(date +%s)
say() { echo "== kvd ci-extra: $* ($(( $(date +%s) - started )) s so far)" >&2; }

for stage in "${stages[@]}"; do
  case $stage in
    asan)
      say "ASan+UBSan build in $asan_dir"
      [ -f "$asan_dir/build.ninja" ] ||
        meson setup "$asan_dir" -Db_sanitize=address,undefined -Db_lundef=false >/dev/null
      ninja -C "$asan_dir" >/dev/null
      scripts/fixtures.sh "$asan_dir"
      say "whole suite under ASan+UBSan+LSan"
      ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        meson test -C "$asan_dir" --print-errorlogs --num-processes 2 --timeout-multiplier 3
      ;;
    fuzz)
      say "building the fuzz targets"
      tests/fuzz/build.sh
      say "fuzzing every target for $fuzz_seconds s"
      tests/fuzz/run.sh "$fuzz_seconds"
      ;;
    *)
      echo "usage: scripts/ci-extra.sh [asan] [fuzz]" >&2
      exit 2
      ;;
  esac
done
say "done"
