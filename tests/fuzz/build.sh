#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/meson.build, meson -Dfuzz=true with clang,
# AddressSanitizer and UndefinedBehaviorSanitizer) in build-fuzz/ (or $KVD_FUZZ_OUT):
# all of them, or those named as arguments. Each binary is linked as $out/NAME, where
# tests/fuzz/run.sh SECONDS looks for it; run one by hand with its seed corpus, e.g.
#   build-fuzz/fuzz_safetensors -max_total_time=60 tests/fuzz/corpus/safetensors
# A new target is a row in tests/fuzz/meson.build naming the libraries it links.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${KVD_FUZZ_OUT:-build-fuzz}
if [ ! -f "$out/build.ninja" ]; then
  CC=${KVD_FUZZ_CC:-clang} meson setup "$out" -Dfuzz=true -Db_sanitize=address,undefined \
    -Db_lundef=false -Dbuildtype=plain -Doptimization=1 -Ddebug=true >/dev/null
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for src in tests/fuzz/fuzz_*.c; do targets+=("$(basename "$src" .c)"); done
fi
ninja -C "$out" "${targets[@]/#/tests/fuzz/}" >/dev/null
for t in "${targets[@]}"; do
  ln -sfn "tests/fuzz/$t" "$out/$t"
  echo "kvd: fuzz target $out/$t" >&2
done
