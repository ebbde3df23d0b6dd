#!/usr/bin/env bash
# Builds the libFuzzer targets (clang -fsanitize=fuzzer,address,undefined) into build-fuzz/
# (or $KVD_FUZZ_OUT). Run one with its seed corpus, e.g.
#   build-fuzz/fuzz_safetensors -max_total_time=60 tests/fuzz/corpus/safetensors
# Each owner adds its targets in its own section below with fuzz_target NAME SOURCES... LIBS.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${KVD_FUZZ_OUT:-build-fuzz}
cc=${KVD_FUZZ_CC:-clang}
mkdir -p "$out"
cflags=(-std=c17 -D_GNU_SOURCE -g -O1 -Wall -Wextra -Werror
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Iinclude)

fuzz_target() {
  local name=$1; shift
  "$cc" "${cflags[@]}" -o "$out/$name" "$@"
  echo "kvd: fuzz target $out/$name" >&2
}

# --- model: safetensors header and config.json parsers ---
cjson_flags=($(pkg-config --cflags --libs libcjson))
fuzz_target fuzz_safetensors tests/fuzz/fuzz_safetensors.c src/model/safetensors.c \
  src/util/error.c src/util/dtype.c "${cjson_flags[@]}" -lm
fuzz_target fuzz_config tests/fuzz/fuzz_config.c src/model/config.c src/model/safetensors.c \
  src/util/error.c src/util/dtype.c "${cjson_flags[@]}" -lm
# --- end model ---

# --- tokenizer (owner: tok): encode/decode/stream of arbitrary bytes ---
# Run from the source root so the target finds third_party/qwen-tokenizer/tokenizer.json
# (or set KVD_TOKENIZER_JSON): build-fuzz/fuzz_tokenizer -max_total_time=60 tests/fuzz/corpus/tokenizer
tok_flags=($(pkg-config --cflags --libs libcjson libpcre2-8 libutf8proc))
fuzz_target fuzz_tokenizer tests/fuzz/fuzz_tokenizer.c src/tokenizer/load.c src/tokenizer/encode.c \
  src/tokenizer/bpe.c src/tokenizer/decode.c src/tokenizer/utf8.c src/util/error.c \
  "${tok_flags[@]}" -lpthread
# --- end tokenizer ---
