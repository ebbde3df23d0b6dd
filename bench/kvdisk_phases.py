#!/usr/bin/python3
"""kvdisk_phases.py - where each turn's time to first token went, from kvd's request log.

Reads the per-request lines of a daemon log (docs/operations.md, "Logs") written under
kvd-bench --session-header, whose X-Request-ID kvd-bench-SEED-SESSION-TURN names the turn,
and prints per turn the medians of: the server's TTFT (request's last byte to first
token), its parts on the engine's clock (queue: submit to admission, load: admission to
the disk pages being in RAM, prefill: from there to the first token), the steps the
prompt ran in, the tokens of those steps (its own and what shared them), and the
uncached prompt tokens it had to prefill itself. Stdlib only.

Usage: kvdisk_phases.py LOG [LOG...]
"""
import re
import statistics
import sys

LINE = re.compile(r"request \S+ POST /v1/chat/completions 200 prompt_tokens=(\d+) cached_tokens=(\d+) "
                  r"completion_tokens=\d+ ttft=([\d.]+)ms queue=([\d.]+)ms load=([\d.]+)ms "
                  r"prefill=([\d.]+)ms prefill_steps=(\d+) step_tokens=(\d+) total=[\d.]+ms "
                  r"request_id=kvd-bench-\d+-\d+-(\d+)")
FIELDS = ("ttft", "queue", "load", "prefill", "steps", "step_tokens", "new_tokens")


def summarize(path):
    by_turn = {}
    with open(path, errors="replace") as f:
        for line in f:
            m = LINE.search(line)
            if not m:
                continue
            prompt, cached, ttft, queue, load, prefill, steps, step_tokens, turn = m.groups()
            row = by_turn.setdefault(int(turn), {k: [] for k in FIELDS})
            row["ttft"].append(float(ttft))
            row["queue"].append(float(queue))
            row["load"].append(float(load))
            row["prefill"].append(float(prefill))
            row["steps"].append(int(steps))
            row["step_tokens"].append(int(step_tokens))
            row["new_tokens"].append(int(prompt) - int(cached))
    print("== %s: medians per turn (ms, tokens); server TTFT also p99" % path)
    print("%4s %5s %9s %9s %8s %8s %9s %6s %11s %10s" % ("turn", "n", "ttft", "ttft p99", "queue", "load",
                                                      "prefill", "steps", "step tokens", "new tokens"))
    for turn in sorted(by_turn):
        row = by_turn[turn]
        ttfts = sorted(row["ttft"])
        p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]
        med = {k: statistics.median(v) for k, v in row.items()}
        print("%4d %5d %9.1f %9.1f %8.1f %8.1f %9.1f %6.1f %11.0f %10.0f" % (
            turn, len(ttfts), med["ttft"], p99, med["queue"], med["load"], med["prefill"], med["steps"],
            med["step_tokens"], med["new_tokens"]))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    for path in sys.argv[1:]:
        summarize(path)


if __name__ == "__main__":
    main()
