#!/bin/sh
# ab_matmul_step.sh [OLD_REV] [OUT]: builds bench/ab_matmul_step.c with src/model/matmul_impl.c
# as of git revision OLD_REV (default main) as old_* and the working tree's as new_*, both
# VDPBF16PS builds (-O3 as meson builds them), linked against build/'s libraries (run
# scripts/build.sh first). Then e.g.: nice -n 19 OUT 16 30; TWO=1 OUT 16 40;
# KCOLD=1 KDOWN=1 KCOLS=448 OUT 16 30.
set -eu
cd "$(dirname "$0")/.."
rev=${1:-main}
out=${2:-build/bench/ab_matmul_step}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git show "$rev:src/model/matmul_impl.c" > "$tmp/matmul_old.c"
flags="-O3 -std=c17 -ffp-contract=off -DKVD_VEC_AVX512 -mavx512f -mavx512bw -mavx512vl -mfma
  -mf16c -DKVD_VEC_DPBF16 -mavx512bf16 -Iinclude -Isrc/model"
# shellcheck disable=SC2086
gcc $flags -Dkvd_matmul_cols_words_avx512bf16=old_words -Dkvd_matmul_cols_avx512bf16=old_cols \
    -Dkvd_bf16_round_cols_avx512bf16=old_round -c "$tmp/matmul_old.c" -o "$tmp/old.o"
# shellcheck disable=SC2086
gcc $flags -Dkvd_matmul_cols_words_avx512bf16=new_words -Dkvd_matmul_cols_avx512bf16=new_cols \
    -Dkvd_bf16_round_cols_avx512bf16=new_round -c src/model/matmul_impl.c -o "$tmp/new.o"
# shellcheck disable=SC2086
gcc $flags bench/ab_matmul_step.c "$tmp/old.o" "$tmp/new.o" -o "$out" \
    build/src/model/libkvd_model.a build/src/quant/libkvd_quant.a build/src/gguf/libkvd_gguf.a \
    build/src/util/libkvd_util.a -lm -lpthread
echo "built $out (old: $rev)"
