#!/usr/bin/env python3
"""test_kvd_bench.py - kvd-bench against the real kvd daemon serving the tiny fixture model.

Starts build/server/kvd on an ephemeral port (--port 0; the banner "kvd: listening on
http://127.0.0.1:PORT" says which), then runs kvd-bench in closed loop, open loop and
3-turn chat sessions, and checks the JSON figures agree with each other and with the
workload: every request completed, no errors, output tokens == requests * max_tokens
(--ignore-eos), the server's prompt token counts cover the words sent, percentiles in
order, and in chat sessions each turn's prompt is the previous one plus its answer and a
new message. Exits 77 (meson's "skipped") when the daemon or the fixture is not built.

Usage: test_kvd_bench.py KVD_BENCH [KVD]   (env: KVD_TINY_MODEL, KVD_BUILD_ROOT)
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading

SKIP = 77


class Daemon:
    def __init__(self, kvd, model):
        self.proc = subprocess.Popen([kvd, "--model", model, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines = []
        self.url = None
        ready = threading.Event()

        def drain():
            # Keep reading so the daemon never blocks on a full pipe.
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"kvd: listening on (http://\S+)", line)
                if m and not self.url:
                    self.url = m.group(1).rstrip("/")
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(120)
        if not self.url:
            self.stop()
            raise AssertionError("kvd did not print its banner; output:\n" + "".join(self.lines))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bench(bench_exe, url, *args):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        cmd = [bench_exe, "--url", url, "--json", path, "--no-progress", "--timeout", "120",
               "--duration", "300", *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
        print("$ " + " ".join(cmd))
        print(p.stdout + p.stderr)
        if p.returncode != 0:
            raise AssertionError("kvd-bench exited %d" % p.returncode)
        with open(path) as f:
            return json.load(f)


def check(cond, what, *values):
    if not cond:
        raise AssertionError("%s: %s" % (what, ", ".join(repr(v) for v in values)))


def check_consistent(out, requests, max_tokens, words):
    check(out["completed"] == requests, "completed == requests", out["completed"], requests)
    check(out["failed"] == 0 and out["incomplete"] == 0, "no failures", out["errors"])
    for kind in ("connect", "http", "timeout", "stream"):
        check(out["errors"][kind] == 0, "no %s errors" % kind, out["errors"])
    check(out["usage_reported"] == requests, "usage on every request", out["usage_reported"])
    check(out["total_output_tokens"] == requests * max_tokens,
          "output tokens == requests * max_tokens", out["total_output_tokens"],
          requests * max_tokens)
    check(out["output_lens"] == [max_tokens] * requests, "each answer is max_tokens long",
          out["output_lens"])
    check(out["total_input_tokens"] == sum(out["input_lens"]), "input total",
          out["total_input_tokens"], sum(out["input_lens"]))
    for n in out["input_lens"]:
        check(n >= words, "prompt tokens cover the words sent", n, words)
    for metric in ("ttft", "tpot", "itl", "e2el"):
        values = [out["%s_%s_ms" % (k, metric)] for k in ("min", "median", "p90", "p99", "max")]
        check(values == sorted(values), "%s percentiles ordered" % metric, values)
        check(values[0] >= 0, "%s non-negative" % metric, values)
    check(out["min_ttft_ms"] > 0, "TTFT positive", out["min_ttft_ms"])
    for ttft, e2el in zip(out["ttfts"], out["e2els"]):
        check(ttft <= e2el, "TTFT <= E2EL", ttft, e2el)
    check(all(len(g) <= max_tokens - 1 for g in out["itls"]), "ITL gaps per request",
          [len(g) for g in out["itls"]])
    check(abs(out["output_throughput"] - out["total_output_tokens"] / out["duration"]) < 1e-6,
          "output throughput", out["output_throughput"])


def main():
    bench_exe = sys.argv[1]
    build_root = os.environ.get("KVD_BUILD_ROOT", "build")
    kvd = sys.argv[2] if len(sys.argv) > 2 else os.path.join(build_root, "server", "kvd")
    model = os.environ.get("KVD_TINY_MODEL", os.path.join(build_root, "fixtures", "tiny"))
    if not os.access(kvd, os.X_OK):
        print("SKIP: the kvd daemon is not built (%s)" % kvd)
        return SKIP
    if not os.path.isfile(os.path.join(model, "model.safetensors")):
        print("SKIP: the tiny fixture is missing (%s); run scripts/fixtures.sh" % model)
        return SKIP

    daemon = Daemon(kvd, model)
    try:
        words, max_tokens = 8, 8
        out = bench(bench_exe, daemon.url, "--concurrency", "2", "--requests", "6",
                    "--prompt-tokens", str(words), "--max-tokens", str(max_tokens),
                    "--ignore-eos", "--seed", "1")
        check_consistent(out, 6, max_tokens, words)
        check(out["mode"] == "closed", "closed loop", out["mode"])
        check(out["model_id"] != "", "model from /v1/models", out["model_id"])

        out = bench(bench_exe, daemon.url, "--rate", "4", "--requests", "5",
                    "--prompt-tokens", "6", "--max-tokens", "4", "--ignore-eos", "--seed", "2")
        check_consistent(out, 5, 4, 6)
        check(out["mode"] == "open", "open loop", out["mode"])

        out = bench(bench_exe, daemon.url, "--turns", "3", "--requests", "6",
                    "--concurrency", "2", "--prompt-tokens", "5", "--max-tokens", "4",
                    "--ignore-eos", "--seed", "3")
        check_consistent(out, 6, 4, 5)
        check([t["completed"] for t in out["ttft_by_turn"]] == [2, 2, 2], "2 sessions x 3 turns",
              out["ttft_by_turn"])
        by_session = {}
        for session, turn, n in zip(out["session_of_request"], out["turn_of_request"],
                                    out["input_lens"]):
            by_session.setdefault(session, {})[turn] = n
        for session, turns in by_session.items():
            check(sorted(turns) == [1, 2, 3], "turns of session %d" % session, turns)
            for t in (2, 3):
                # The previous prompt, its 4-token answer and 5 new words, at least.
                check(turns[t] >= turns[t - 1] + 4 + 5, "history resent in turn %d" % t, turns)
    finally:
        daemon.stop()
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
