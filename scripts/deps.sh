#!/usr/bin/env bash
# Installs the Debian 12 packages kvd builds and tests with (only those missing),
# then fetches the pinned Qwen2 tokenizer. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential pkg-config meson ninja-build
  libopenblas-dev libcjson-dev libpcre2-dev libutf8proc-dev libxxhash-dev
  libuv1-dev node-llhttp libcmocka-dev
  clang libclang-rt-14-dev
  python3-numpy nodejs npm curl ca-certificates
  python3-jinja2  # tests/template: the oracle for the chat template engine (as Hugging Face renders)
  python3-jsonschema  # tests validate structured output (and the grammar corpus's labels) with it
  prometheus  # promtool: tests/e2e checks /metrics with `promtool check metrics`
  chromium  # tests/browser drives it with Playwright
  gnuplot-nox  # bench/plot_kv_speedup.gp draws docs/kv_speedup.png
  haproxy  # configs/haproxy.cfg: the load balancer of scripts/cluster.sh and tests/e2e/test_cluster.py
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# npm may come from outside Debian (e.g. a newer Node.js); do not fight it.
if command -v npm >/dev/null 2>&1; then
  missing=("${missing[@]/npm}"); missing=("${missing[@]/nodejs}")
fi
want=()
for p in "${missing[@]}"; do [ -n "$p" ] && want+=("$p"); done
if [ ${#want[@]} -gt 0 ]; then
  echo "kvd: installing ${want[*]}" >&2
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${want[@]}" >/dev/null
fi

scripts/fetch-tokenizer.sh
