# bench/wait_kvd.sh - sourced by the bench scripts that start kvd in the background.
# kvd_wait_listening LOG PID: returns once LOG has kvd's "listening on" line (the
# daemon's whole load included, up to 15 minutes for the biggest shapes); when the
# daemon dies first, or never gets there, prints LOG and exits 1.
kvd_wait_listening() {
  local _
  for _ in $(seq 1 1800); do
    grep -q "kvd: listening on" "$1" && return 0
    kill -0 "$2" 2>/dev/null || { cat "$1" >&2; exit 1; }
    sleep 0.5
  done
  cat "$1" >&2
  echo "kvd did not start listening within 15 minutes" >&2
  exit 1
}
