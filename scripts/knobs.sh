#!/usr/bin/env bash
# Rewrites configs/default.json and the knob table in docs/operations.md from the one
# knob table in server/config.c, as the built daemon prints them (kvd --print-knobs).
# Run after adding or changing a knob; tests/e2e/test_daemon.py checks both copies.
#   scripts/knobs.sh [BUILD_DIR]      (default build/)
set -euo pipefail
cd "$(dirname "$0")/.."
kvd=${1:-build}/server/kvd
"$kvd" --print-knobs json | sed 's|"model": ""|"model": "models/default"|' > configs/default.json
/usr/bin/python3 - "$kvd" <<'PY'
import subprocess, sys
path = "docs/operations.md"
text = open(path).read()
table = subprocess.run([sys.argv[1], "--print-knobs", "md"], capture_output=True, text=True, check=True).stdout
start = text.index("| key / flag | default | meaning |")
end = text.index("<!-- end of generated table -->", start)
open(path, "w").write(text[:start] + table + text[end:])
PY
echo "kvd: configs/default.json and docs/operations.md regenerated from $kvd --print-knobs" >&2
