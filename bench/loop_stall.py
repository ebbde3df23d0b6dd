#!/usr/bin/env python3
"""loop_stall.py - does building large answers stall kvd's event loop?

Starts a daemon, opens one long stream and polls GET /health, then fires heavy
requests at once: /tokenize of a ~4 MB prompt and whole (non-streamed) chat answers
with n=16 x max_tokens x top_logprobs 20. While they run it records every /health
round trip and every gap between two SSE events of the stream, and prints p50 / p99 /
max of both. A loop that builds those answers itself stalls /health and the stream
for as long as the building takes; one that hands it to workers does not, and the
stream's gap is then the engine's step time (which grows with the batch).

  python3 bench/loop_stall.py --kvd build/server/kvd --model build/fixtures/tiny \\
      [--tokenize 4] [--logprobs 4] [--max-tokens 1500] [--window 90] \\
      [--daemon-args "--max-response-bytes 67108864"]

Python 3 stdlib only; loopback only; stops by itself after --window seconds.
"""

import argparse
import http.client
import json
import random
import re
import subprocess
import sys
import threading
import time


def loop_metrics(port):
    """(iterations, iterations over 50 ms, max CPU seconds) of the daemon's loop, or
    None when the daemon does not export them (older builds)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    finally:
        c.close()
    values = {}
    for line in text.splitlines():
        if line.startswith("kvd:event_loop_iteration_cpu"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    if not values:
        return None
    total = values["kvd:event_loop_iteration_cpu_seconds_count"]
    under = values['kvd:event_loop_iteration_cpu_seconds_bucket{le="0.05"}']
    return total, total - under, values["kvd:event_loop_iteration_cpu_max_seconds"]


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(name, values_ms):
    return "%-26s n=%-6d p50 %7.1f ms  p99 %7.1f ms  max %7.1f ms" % (
        name, len(values_ms), percentile(values_ms, 0.5), percentile(values_ms, 0.99),
        max(values_ms) if values_ms else float("nan"))


class Daemon:
    def __init__(self, kvd, model, extra, log_path=None):
        cmd = [kvd, "--model", model, "--port", "0", "--log-level", "warn"] + extra
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.port = None
        deadline = time.monotonic() + 120
        for line in self.proc.stdout:
            m = re.search(r"listening on http://\S+:(\d+) ", line)
            if m:
                self.port = int(m.group(1))
                break
            if time.monotonic() > deadline:
                break
        if not self.port:
            self.stop()
            sys.exit("kvd did not start")
        log = open(log_path, "w") if log_path else None

        def drain():
            for line in self.proc.stdout:
                if log:
                    log.write(line)
                    log.flush()

        threading.Thread(target=drain, daemon=True).start()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def words(n_bytes, rng):
    vocab = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "lamp", "seven", "blue",
             "quiet", "market", "window", "paper", "orbit", "garden"]
    out, size = [], 0
    while size < n_bytes:
        w = rng.choice(vocab)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvd", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenize", type=int, default=4, help="concurrent /tokenize requests of ~4 MB")
    ap.add_argument("--logprobs", type=int, default=4, help="concurrent n=16 logprobs chat requests")
    ap.add_argument("--max-tokens", type=int, default=1500)
    ap.add_argument("--window", type=float, default=90.0, help="seconds to measure at most")
    ap.add_argument("--threads", default="0")
    ap.add_argument("--daemon-args", default="", help="more kvd flags, e.g. \"--max-response-bytes 67108864\"")
    ap.add_argument("--daemon-log", help="file for the daemon's output (its log lines once it listens)")
    args = ap.parse_args()

    d = Daemon(args.kvd, args.model,
               ["--threads", args.threads, "--max-body-bytes", str(5 << 20)] + args.daemon_args.split(),
               args.daemon_log)
    rng = random.Random(7)
    stop = threading.Event()
    health_ms, gap_ms, gap_at = [], [], []
    measuring = threading.Event()

    def poll_health():
        while not stop.is_set():
            t0 = time.monotonic()
            c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
            try:
                c.request("GET", "/health")
                c.getresponse().read()
            except OSError:
                pass
            finally:
                c.close()
            if measuring.is_set():
                health_ms.append((time.monotonic() - t0) * 1000)
            time.sleep(0.02)

    first_token = threading.Event()

    def stream():
        body = {"prompt": "hello", "max_tokens": 4000, "stream": True, "temperature": 0, "ignore_eos": True}
        c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=600)
        c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        last = None
        while not stop.is_set():
            line = r.fp.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            now = time.monotonic()
            first_token.set()
            if last is not None and measuring.is_set():
                gap_ms.append((now - last) * 1000)
                gap_at.append(now)
            last = now
        c.close()

    results = []

    # Bodies are made before measuring: building 4 MB of text in Python holds the GIL
    # long enough to stall this client's own poller threads.
    bodies = {}
    for i in range(args.tokenize):
        bodies[("tokenize", i)] = ("/tokenize", json.dumps({"prompt": words(4 << 20, random.Random(i))}).encode())
    for i in range(args.logprobs):
        bodies[("logprobs", i)] = ("/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "count %d" % i}], "n": 16, "max_tokens": args.max_tokens,
             "logprobs": True, "top_logprobs": 20, "temperature": 0, "ignore_eos": True}).encode())

    def heavy(kind, i):
        c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=600)
        path, body = bodies[(kind, i)]
        t0 = time.monotonic()
        try:
            c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            size = 0
            while True:  # in pieces, so reading never holds the GIL for long
                piece = r.read(65536)
                if not piece:
                    break
                size += len(piece)
            results.append((kind, r.status, size, time.monotonic() - t0, t0 - start))
        except OSError as e:
            results.append((kind, str(e), 0, time.monotonic() - t0, t0 - start))
        finally:
            c.close()

    threads = [threading.Thread(target=poll_health, daemon=True), threading.Thread(target=stream, daemon=True)]
    for t in threads:
        t.start()
    first_token.wait(60)
    time.sleep(1.0)
    loop_before = loop_metrics(d.port)
    measuring.set()
    workers = [threading.Thread(target=heavy, args=("tokenize", i), daemon=True) for i in range(args.tokenize)]
    workers += [threading.Thread(target=heavy, args=("logprobs", i), daemon=True) for i in range(args.logprobs)]
    start = time.monotonic()
    for t in workers:
        t.start()
    for t in workers:
        t.join(max(0.1, args.window - (time.monotonic() - start)))
    elapsed = time.monotonic() - start
    measuring.clear()
    loop_after = loop_metrics(d.port)
    stop.set()
    d.stop()
    for kind, status, size, secs, began in sorted(results, key=lambda r: (r[0], r[4])):
        print("%-9s status %s  %10d bytes  %6.1f s (answered at %.1f s)" % (kind, status, size, secs, began + secs))
    worst = sorted(zip(gap_ms, gap_at), reverse=True)[:5]
    print("largest stream gaps: " + ", ".join("%.1f ms at %.1f s" % (g, at - start) for g, at in worst))
    print("heavy requests finished: %d of %d in %.1f s" % (len(results), len(workers), elapsed))
    print(summary("GET /health round trip", health_ms))
    print(summary("stream inter-event gap", gap_ms))
    if loop_before and loop_after:
        print("event loop (daemon's own CPU time per iteration): %d iterations, %d over 50 ms, max %.1f ms"
              % (loop_after[0] - loop_before[0], loop_after[1] - loop_before[1], loop_after[2] * 1000))


if __name__ == "__main__":
    main()
