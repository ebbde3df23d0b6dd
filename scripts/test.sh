#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds, prepares fixtures, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
scripts/fixtures.sh build
meson test -C build --print-errorlogs --num-processes 2 "$@"
