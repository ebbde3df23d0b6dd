#!/usr/bin/env bash
# Generates the test fixtures into BUILD_DIR/fixtures (seeded, so always the same bytes).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}
tok=third_party/qwen-tokenizer/tokenizer.json
if [ -x "$dir/tools/kvd-mkmodel" ] && [ ! -f "$dir/fixtures/tiny/model.safetensors" ]; then
  "$dir/tools/kvd-mkmodel" --out "$dir/fixtures/tiny" --preset tiny --seed 1 --tokenizer "$tok"
fi
