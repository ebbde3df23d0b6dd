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
cat >&2 <<'HINT'
kvd: starting; once it says "listening", try:
  curl -s localhost:8000/v1/chat/completions -d '{"messages":[{"role":"user","content":"Hello!"}],"max_tokens":32}'
  or open http://127.0.0.1:8000/ (chat) and http://127.0.0.1:8000/kv (live KV cache view)
HINT
exec build/server/kvd --model "$model" --config configs/default.json "$@"
