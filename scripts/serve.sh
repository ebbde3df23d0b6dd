#!/usr/bin/env bash
# Installs what is missing, builds, prepares the default model and starts the daemon
# on 127.0.0.1:8000 (extra arguments go to kvd, e.g. --port 9000 or --model DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
model=models/default
if [ ! -f "$model/model.safetensors" ]; then
  build/tools/kvd-mkmodel --out "$model" --preset tiny --seed 1 \
    --tokenizer third_party/qwen-tokenizer/tokenizer.json
fi
exec build/server/kvd --model "$model" --config configs/default.json "$@"
