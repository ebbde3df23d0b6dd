#!/usr/bin/env bash
# Starts N kvd replicas on loopback ports and HAProxy in front of them (configs/haproxy.cfg),
# so a deployment with session affinity can be tried in one command:
#   scripts/cluster.sh 3            # replicas on 8001..8003, the balancer on 127.0.0.1:8000
#   KVD_LB_BIND=127.0.0.1:9000 KVD_CLUSTER_BASE_PORT=9001 scripts/cluster.sh 2 --threads 1
# Extra arguments go to every replica. Ctrl-C (or SIGTERM) drains the replicas and stops
# everything. Logs: $KVD_CLUSTER_DIR (default build/cluster)/kvdN.log and haproxy.log.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-3}
shift || true
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "usage: scripts/cluster.sh N [kvd flags...]" >&2; exit 2; }
base_port=${KVD_CLUSTER_BASE_PORT:-8001}
bind=${KVD_LB_BIND:-127.0.0.1:8000}
run_dir=${KVD_CLUSTER_DIR:-build/cluster}
model=${KVD_MODEL:-models/default}

if [ "${KVD_CLUSTER_NO_SETUP:-0}" != 1 ]; then
  scripts/deps.sh
  scripts/build.sh
fi
command -v haproxy >/dev/null || { echo "kvd: haproxy is not installed (scripts/deps.sh installs it)" >&2; exit 1; }
if [ ! -e "$model/model.safetensors" ] && [ ! -f "$model" ]; then
  build/tools/kvd-mkmodel --out "$model" --preset tiny --seed 1 \
    --tokenizer third_party/qwen-tokenizer/tokenizer.json
fi
mkdir -p "$run_dir"

# The balancer's config is configs/haproxy.cfg with its `server` lines replaced by N.
cfg="$run_dir/haproxy.cfg"
{
  grep -v '^    server kvd[0-9]' configs/haproxy.cfg
  for i in $(seq 1 "$n"); do
    echo "    server kvd$i 127.0.0.1:$((base_port + i - 1))"
  done
} > "$cfg"

pids=()
stop() {
  trap - INT TERM EXIT
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

for i in $(seq 1 "$n"); do
  port=$((base_port + i - 1))
  build/server/kvd --model "$model" --config configs/default.json --port "$port" \
    --served-model-name "${KVD_SERVED_MODEL_NAME:-default}" "$@" > "$run_dir/kvd$i.log" 2>&1 &
  pids+=($!)
done
KVD_LB_BIND=$bind haproxy -W -db -f "$cfg" > "$run_dir/haproxy.log" 2>&1 &
pids+=($!)

echo "kvd: $n replicas on 127.0.0.1:$base_port..$((base_port + n - 1)), HAProxy on $bind" >&2
echo "kvd: try  curl -s $bind/v1/chat/completions -H 'X-Session-ID: s1' -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hello!\"}],\"max_tokens\":16}'" >&2
# Stay in the foreground until a replica or the balancer exits (or Ctrl-C).
wait -n "${pids[@]}" || true
echo "kvd: a process of the cluster exited; stopping the rest (logs in $run_dir)" >&2
