#!/usr/bin/env bash
# bench/shapes.sh - load time, memory, decode and 16-sequence rates of the Qwen2.5 0.5B,
# 1.5B and 7B shapes in bf16, Q8_0 and Q4_K_M, with the decode bandwidth bound beside each
# (the table of docs/benchmarks.md "GGUF and bigger shapes").
#
#   bench/shapes.sh [--build DIR] [--models DIR] [--shapes "0.5b 1.5b 7b"]
#                   [--types "bf16 q8_0 q4_k_m"] [--threads N] [--out FILE]
#
# Models are made when absent: kvd-mkmodel --preset qwen2.5-SHAPE --seed 1 (bf16
# safetensors, DIR/qwen2.5-SHAPE) and kvd-quantize (DIR/qwen2.5-SHAPE-TYPE.gguf, every
# CPU). Each model then runs alone in build/bench/bench_model --threads N --batch 16
# --experiment none (prompt 512 tokens and 64 decode steps; 128 and 16 for 7B). A model is
# skipped, with the reason in its row, when MemAvailable is under its file's size plus
# 2 GiB (7B bf16 needs about 17 GiB free). The raw bench_model output goes to
# FILE.log, the Markdown table to FILE (default bench/results/shapes.md) and stdout.
#
# Run time on an idle 2-core Zen 5 (estimated from the CPU-seconds measured under load,
# never timed end to end on a quiet machine): about 10 minutes with the files made (7B bf16
# and the 16-sequence runs of 7B are the longest); making every file first adds about 15
# minutes (kvd-mkmodel: the 7B bf16 safetensors is 15.2 GB; kvd-quantize on 2 threads:
# 1.5B q4_k_m 85 CPU-seconds, 7B q8_0 58, 7B q4_k_m about 450). Disk: about 40 GB for all
# nine models. 7B bf16 needs about 17 GiB of RAM free, or its row says it was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build models=models shapes="0.5b 1.5b 7b" types="bf16 q8_0 q4_k_m" threads=2
out=bench/results/shapes.md
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --shapes) shapes=$2; shift 2 ;;
    --types) types=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--build DIR] [--models DIR] [--shapes LIST] [--types LIST] [--threads N] [--out FILE]" >&2
       exit 2 ;;
  esac
done
tokenizer=third_party/qwen-tokenizer/tokenizer.json
for p in tools/kvd-mkmodel tools/kvd-quantize bench/bench_model; do
  [ -x "$build/$p" ] || { echo "$0: $build/$p is missing: build first (scripts/build.sh)" >&2; exit 1; }
done
[ -f "$tokenizer" ] || { echo "$0: $tokenizer is missing: run scripts/fetch-tokenizer.sh" >&2; exit 1; }
mkdir -p "$models" "$(dirname "$out")"
log=$out.log
: > "$log"

# The model path of SHAPE in TYPE, made when absent.
model_of() {
  local shape=$1 type=$2 dir=$models/qwen2.5-$1
  if [ ! -f "$dir/config.json" ]; then
    echo "+ kvd-mkmodel --preset qwen2.5-$shape" >&2
    "$build/tools/kvd-mkmodel" --out "$dir" --preset "qwen2.5-$shape" --seed 1 --tokenizer "$tokenizer" >&2
  fi
  if [ "$type" = bf16 ]; then
    echo "$dir"
    return
  fi
  local file=$models/qwen2.5-$shape-$type.gguf
  if [ ! -f "$file" ]; then
    echo "+ kvd-quantize $dir $file --type $type" >&2
    local t0=$SECONDS
    # under another name until complete: an interrupted run leaves no plausible file
    "$build/tools/kvd-quantize" "$dir" "$file.part" --type "$type" >&2
    mv "$file.part" "$file"
    echo "  ($((SECONDS - t0)) s)" >&2
  fi
  echo "$file"
}

# Bytes of a model's weight files.
model_bytes() {
  if [ -d "$1" ]; then du -cbL "$1"/*.safetensors | tail -1 | cut -f1; else stat -L -c %s "$1"; fi
}

mem_available() { echo $(( $(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) * 1024 )); }

gb() { awk -v b="$1" 'BEGIN {printf "%.2f", b / 1e9}'; }

rows=()
for shape in $shapes; do
  for type in $types; do
    model=$(model_of "$shape" "$type")
    need=$(( $(model_bytes "$model") + (2 << 30) ))
    avail=$(mem_available)
    if [ "$avail" -lt "$need" ]; then
      rows+=("| $shape | $type | skipped: needs $(gb "$need") GB free, $(gb "$avail") GB available | | | | | | | | |")
      continue
    fi
    prompt=512 decode=64
    [ "$shape" = 7b ] && prompt=128 decode=16
    cmd=("$build/bench/bench_model" --model "$model" --threads "$threads" --prompt-tokens "$prompt"
         --decode-tokens "$decode" --batch 16 --experiment none)
    echo "+ ${cmd[*]}" >&2
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    text=$("${cmd[@]}" 2>&1) || { echo "$text" >&2; rows+=("| $shape | $type | bench_model failed (see $log) | | | | | | | | |"); continue; }
    { echo "# $(date -u '+%F %T') UTC, load $load: ${cmd[*]}"; echo "$text"; } >> "$log"
    echo "$text" >&2
    rows+=("$(printf '%s\n' "$text" | awk -v shape="$shape" -v type="$type" -v load="$load" '
      /^model / { match($0, /loaded in [0-9.]+ s/); ld = substr($0, RSTART + 10, RLENGTH - 12)
                  match($0, /[0-9.]+ GB of weights/); w = substr($0, RSTART, RLENGTH - 14)
                  match($0, /peak RSS [0-9.]+ GB/); pk = substr($0, RSTART + 9, RLENGTH - 12)
                  match($0, /RSS after loading [0-9.]+ GB/); rss = substr($0, RSTART + 18, RLENGTH - 21)
                  match($0, /[0-9.]+ GB read per/); step = substr($0, RSTART, RLENGTH - 12) }
      /^memory bandwidth/ { match($0, /[0-9.]+ GB\/s/); bw = substr($0, RSTART, RLENGTH - 5)
                            match($0, /bound [0-9.]+/); bound = substr($0, RSTART + 6, RLENGTH - 6) }
      /^prefill:/ { match($0, /= [0-9.]+ tokens/); pf = substr($0, RSTART + 2, RLENGTH - 9)
                    match($0, /used [0-9.]+ cores/); pfc = substr($0, RSTART + 5, RLENGTH - 11) }
      /^decode:/ { match($0, /= [0-9.]+ tokens/); dec = substr($0, RSTART + 2, RLENGTH - 9)
                   match($0, /used [0-9.]+ cores/); dc = substr($0, RSTART + 5, RLENGTH - 11) }
      /^batched decode:/ { match($0, /= [0-9.]+ tokens/); b16 = substr($0, RSTART + 2, RLENGTH - 9)
                           match($0, /used [0-9.]+ cores/); bc = substr($0, RSTART + 5, RLENGTH - 11) }
      END { printf "| %s | %s | %s | %s | %s / %s | %s | %s (%s cores) | %s (%s cores) | %s (%s cores) | %s GB/s, %.1f tok/s; at 80.7 GB/s %.1f | %s |",
                   shape, type, ld, w, rss, pk, step, pf, pfc, dec, dc, b16, bc, bw, bound, 80.7 / step, load }')")
  done
done

{
  echo "bench/shapes.sh, $(date -u '+%F %T') UTC, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) CPUs, --threads $threads"
  echo
  echo "| shape | weights | load s | weights GB | RSS after load / peak GB | GB read per decode step | prefill tok/s | decode 1 seq tok/s | 16 seqs tok/s | bound: probe, at 80.7 GB/s | load avg (1, 5, 15 min) |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  printf '%s\n' "${rows[@]}"
} | tee "$out"
