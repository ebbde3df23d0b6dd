#!/usr/bin/env bash
# Builds the libFuzzer targets (clang -fsanitize=fuzzer,address,undefined) into build-fuzz/
# (or $KVD_FUZZ_OUT): all of them, or those named as arguments. tests/fuzz/run.sh SECONDS
# runs every target; run one by hand with its seed corpus, e.g.
#   build-fuzz/fuzz_safetensors -max_total_time=60 tests/fuzz/corpus/safetensors
# Each owner adds its targets in its own section below with fuzz_target NAME SOURCES... LIBS.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${KVD_FUZZ_OUT:-build-fuzz}
cc=${KVD_FUZZ_CC:-clang}
mkdir -p "$out"
cflags=(-std=c17 -D_GNU_SOURCE -g -O1 -Wall -Wextra -Werror
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Iinclude)

# Arguments, if any, name the targets to build (e.g. `tests/fuzz/build.sh fuzz_http`).
only=" $* "
fuzz_target() {
  local name=$1; shift
  [ "$only" = "  " ] || [[ "$only" == *" $name "* ]] || return 0
  "$cc" "${cflags[@]}" -o "$out/$name" "$@"
  echo "kvd: fuzz target $out/$name" >&2
}

# --- model: safetensors header and config.json parsers ---
cjson_flags=($(pkg-config --cflags --libs libcjson))
fuzz_target fuzz_safetensors tests/fuzz/fuzz_safetensors.c src/model/safetensors.c \
  src/util/error.c src/util/dtype.c src/util/buf.c "${cjson_flags[@]}" -lm
fuzz_target fuzz_config tests/fuzz/fuzz_config.c src/model/config.c src/model/safetensors.c \
  src/util/error.c src/util/dtype.c src/util/buf.c "${cjson_flags[@]}" -lm
# --- end model ---

# --- tokenizer (owner: tok): encode/decode/stream of arbitrary bytes ---
# Run from the source root so the target finds third_party/qwen-tokenizer/tokenizer.json
# (or set KVD_TOKENIZER_JSON): build-fuzz/fuzz_tokenizer -max_total_time=60 tests/fuzz/corpus/tokenizer
tok_flags=($(pkg-config --cflags --libs libcjson libpcre2-8 libutf8proc))
fuzz_target fuzz_tokenizer tests/fuzz/fuzz_tokenizer.c src/tokenizer/load.c src/tokenizer/encode.c \
  src/tokenizer/bpe.c src/tokenizer/decode.c src/tokenizer/utf8.c src/util/error.c \
  "${tok_flags[@]}" -lpthread
# --- end tokenizer ---

# --- grammar (owner: grammar): JSON Schema / regex / GBNF compilers and the matcher ---
# Loads the real tokenizer like fuzz_tokenizer: build-fuzz/fuzz_grammar -max_total_time=60 tests/fuzz/corpus/grammar
fuzz_target fuzz_grammar tests/fuzz/fuzz_grammar.c src/grammar/grammar.c src/grammar/matcher.c src/grammar/vocab.c \
  src/grammar/json_schema.c src/grammar/regex.c src/grammar/gbnf.c src/grammar/cache.c src/tokenizer/load.c \
  src/tokenizer/encode.c src/tokenizer/bpe.c src/tokenizer/decode.c src/tokenizer/utf8.c src/util/error.c \
  "${tok_flags[@]}" $(pkg-config --cflags --libs libxxhash) -lpthread -lm
# --- end grammar ---

# --- harden: the HTTP request path, request JSON of both completion routes, chat template ---
# llhttp's generated sources are compiled once without -Werror (as meson.build does) but
# with the sanitizers and coverage, so the fuzzer is guided through the parser's states too.
mkdir -p "$out/obj"
llhttp_objs=()
for src in /usr/share/llhttp/api.c /usr/share/llhttp/http.c /usr/share/llhttp/llhttp.c; do
  obj="$out/obj/llhttp_$(basename "$src" .c).o"
  llhttp_objs+=("$obj")
  [ "$obj" -nt "$src" ] && continue
  "$cc" -std=c17 -g -O1 -w -fsanitize=fuzzer-no-link,address,undefined -I/usr/share/include/llhttp \
    -c "$src" -o "$obj"
done
uv_flags=($(pkg-config --cflags --libs libuv))
fuzz_target fuzz_http tests/fuzz/fuzz_http.c server/http.c server/util.c src/util/buf.c src/util/error.c \
  "${llhttp_objs[@]}" -Iserver -I/usr/share/include/llhttp "${uv_flags[@]}" "${cjson_flags[@]}"
# chat.c encodes with the tokenizer, so both JSON targets link it.
tok_srcs=(src/tokenizer/load.c src/tokenizer/encode.c src/tokenizer/bpe.c src/tokenizer/decode.c
          src/tokenizer/utf8.c)
fuzz_target fuzz_request_json tests/fuzz/fuzz_request_json.c server/oai_request.c server/chat.c server/util.c src/util/buf.c \
  src/engine/sampler.c src/engine/sampler_vocab.c "${tok_srcs[@]}" src/util/error.c -Iserver \
  "${tok_flags[@]}" -lpthread -lm
fuzz_target fuzz_chat_template tests/fuzz/fuzz_chat_template.c server/chat.c server/util.c src/util/buf.c \
  "${tok_srcs[@]}" src/util/error.c -Iserver "${tok_flags[@]}" -lpthread
# --- end harden ---
