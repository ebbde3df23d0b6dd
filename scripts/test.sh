#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds, prepares fixtures, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
scripts/fixtures.sh build
meson test -C build --print-errorlogs --num-processes 2 "$@"
# Then the same suite under AddressSanitizer + UndefinedBehaviorSanitizer, and a short run
# of every fuzz target (KVD_CI_EXTRA=0 skips both for a quick local run).
scripts/ci-extra.sh
