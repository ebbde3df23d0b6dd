#!/usr/bin/env bash
# Generates the test fixtures into BUILD_DIR/fixtures (seeded, so always the same bytes).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}
tok=third_party/qwen-tokenizer/tokenizer.json
if [ -x "$dir/tools/kvd-mkmodel" ] && [ ! -f "$dir/fixtures/tiny/model.safetensors" ]; then
  "$dir/tools/kvd-mkmodel" --out "$dir/fixtures/tiny" --preset tiny --seed 1 --tokenizer "$tok"
fi
# The tiny fixture as a BF16 GGUF written independently of kvd (owner: gguf): what the GGUF
# loader and tokenizer tests read.
if [ -f "$dir/fixtures/tiny/model.safetensors" ] && [ ! -f "$dir/fixtures/tiny-bf16.gguf" ]; then
  /usr/bin/python3 tests/reference/gguf_from_hf.py --model "$dir/fixtures/tiny" \
    --out "$dir/fixtures/tiny-bf16.gguf" --type bf16
fi
# Reference logits of the tiny fixture for test_forward (owner: fwd): the numpy float64
# reference run on each prompt of tests/reference/golden_tiny.json, 16 greedy steps.
if [ -f "$dir/fixtures/tiny/model.safetensors" ] && [ ! -f "$dir/fixtures/ref/prompt3.bin.json" ]; then
  mkdir -p "$dir/fixtures/ref"
  i=0
  for ids in $(/usr/bin/python3 -c 'import json, sys
for p in json.load(open(sys.argv[1]))["prompts"]: print(",".join(map(str, p["prompt_ids"])))' \
      tests/reference/golden_tiny.json); do
    /usr/bin/python3 tests/reference/qwen2_ref.py --model "$dir/fixtures/tiny" --prompt-ids "$ids" \
      --decode-steps 16 --out "$dir/fixtures/ref/prompt$i.bin"
    i=$((i + 1))
  done
fi
