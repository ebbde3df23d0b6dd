#!/usr/bin/env bash
# Configures (once) and builds kvd into build/ (or $KVD_BUILD_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${KVD_BUILD_DIR:-build}
[ -f "$dir/build.ninja" ] || meson setup "$dir" "$@" >/dev/null
ninja -C "$dir" >/dev/null
