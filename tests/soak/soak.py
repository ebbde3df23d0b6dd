#!/usr/bin/env python3
"""soak.py - minutes of overload with faults: nothing lost, no crash, no growth.

    python3 tests/soak/soak.py BUILD_DIR [--seconds 60] [--rss-tolerance-mib 24]
                               [--kv-num-blocks 192] [--threads 1]

The daemon gets a KV pool far smaller than the load needs (192 blocks of 16 tokens by
default; 64 chat sessions of 4 turns need several times that), so the engine preempts
all along. Greedy answers of eight prompts (completions and chats, whole and streamed)
are taken solo first. Then, for --seconds, four clients run at once:
  - kvd-bench: 64 concurrent 4-turn chat sessions, streamed (--turns 4 --concurrency 64);
  - a disconnecter that opens streams and vanishes after 0-5 events (reset or close);
  - a fuzzer of bad requests: malformed HTTP, bad JSON, wrong types, out-of-range
    values, unknown routes and methods, oversized headers and bodies;
  - a checker that keeps asking the eight prompts and compares each answer with its
    solo result byte for byte.
Passes when: the daemon never dies and exits 0 on SIGTERM with no sanitizer report;
every checker answer equals its solo result; kvd-bench saw no error other than the
requests its --duration cut; every bad request got a 4xx (never a 5xx, a hang or a
dropped connection without an answer); the engine preempted; resident memory
(VmRSS, /proc/PID/status, sampled each second) after the warm-up (the first third,
at least 10 s) grows by no more than the tolerance (default 24 MiB: allocator arenas
settle well within it; a leak of one job per request would pass it within seconds; not
judged in a sanitizer build, whose quarantine grows by design); and once idle, GET
/metrics shows kvd:kv_blocks_used 0 with nothing running or waiting, and the eight
prompts still give their solo answers.
"""

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

import soaklib
from soaklib import Failure, check

ap = argparse.ArgumentParser()
ap.add_argument("build")
ap.add_argument("--seconds", type=float, default=60)
ap.add_argument("--rss-tolerance-mib", type=float, default=24)
ap.add_argument("--kv-num-blocks", type=int, default=192)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--concurrency", type=int, default=64)
opts = ap.parse_args()
build = os.path.abspath(opts.build)
BENCH = os.path.join(build, "bench", "kvd-bench")
state = {"stop": threading.Event(), "errors": []}

PROBES = [
    ("/v1/completions", {"prompt": "The history of the city begins with", "max_tokens": 40}),
    ("/v1/completions", {"prompt": "Once upon a time there was a small house near the water", "max_tokens": 32}),
    ("/v1/completions", {"prompt": [9707, 11, 1879, 0, 12, 100, 2000, 30000], "max_tokens": 24}),
    ("/v1/completions", {"prompt": "x " * 150, "max_tokens": 16}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 40}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Answer briefly."},
                                           {"role": "user", "content": "What is a block table?"},
                                           {"role": "assistant", "content": "A list of pages."},
                                           {"role": "user", "content": "And a prefix cache?"}], "max_tokens": 32}),
    ("/v1/completions", {"prompt": "Streaming probe one two three", "max_tokens": 30, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Stream me a story."}], "max_tokens": 30,
                              "stream": True}),
]


def kvd():
    return state["kvd"]


def fail_later(message):
    state["errors"].append(message)
    state["stop"].set()


def probe_text(path, req):
    """The answer text of a greedy probe (whole or streamed), or raises Failure."""
    body = dict(req, temperature=0, ignore_eos=True)
    status, _, raw = kvd().request("POST", path, body, timeout=300)
    if status != 200:
        raise Failure("%s answered %d: %r" % (path, status, raw[:300]))
    if not body.get("stream"):
        r = json.loads(raw)
        c = r["choices"][0]
        return c["text"] if "text" in c else c["message"]["content"]
    text = []
    for block in raw.decode().split("\n\n"):
        if not block.startswith("data: ") or block == "data: [DONE]":
            continue
        ev = json.loads(block[6:])
        check("error" not in ev, "error event in a stream: %s" % ev)
        for c in ev.get("choices", []):
            text.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
    check(raw.rstrip().endswith(b"data: [DONE]"), "stream without [DONE]: %r" % raw[-100:])
    return "".join(text)


def start():
    soaklib.require_daemon(build)
    if not os.access(BENCH, os.X_OK):
        raise soaklib.Skip("%s is not built" % BENCH)
    state["kvd"] = soaklib.Daemon(build, "--kv-num-blocks", opts.kv_num_blocks, "--max-num-seqs", 64,
                                  "--max-queue", 512, threads=opts.threads).start(ready_timeout=300)


def baseline():
    state["solo"] = [probe_text(p, r) for p, r in PROBES]
    kvd().wait_idle(60)


# ---- the load ----

def checker():
    n = mismatches = 0
    rng = random.Random(1)
    while not state["stop"].is_set():
        i = rng.randrange(len(PROBES))
        try:
            got = probe_text(*PROBES[i])
        except Exception as e:
            fail_later("checker: probe %d: %s" % (i, e))
            break
        n += 1
        if got != state["solo"][i]:
            mismatches += 1
            fail_later("checker: probe %d differs under load:\n  solo %r\n  load %r" % (i, state["solo"][i], got))
    state["checked"] = n


def disconnecter():
    rng = random.Random(2)
    n = 0
    body = json.dumps({"messages": [{"role": "user", "content": "Talk for a long time."}], "max_tokens": 300,
                       "ignore_eos": True, "stream": True}).encode()
    while not state["stop"].is_set():
        try:
            s = soaklib.connect(kvd().port, timeout=60)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            want = rng.randrange(6)  # 0: gone before the first event
            got = b""
            while got.count(b"data: ") < want:
                chunk = s.recv(65536)
                if not chunk:
                    fail_later("disconnecter: stream ended after %d events: %r" % (got.count(b"data: "), got[-200:]))
                    return
                got += chunk
            if rng.random() < 0.5:
                soaklib.abort_close(s)
            else:
                s.close()
            n += 1
        except OSError as e:
            fail_later("disconnecter: %r" % e)
            return
        time.sleep(rng.random() * 0.2)
    state["disconnected"] = n


def bad_requests():
    """(description, raw request bytes) of requests kvd must refuse with a 4xx."""
    def post(path, body, extra=b""):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
                % (path.encode(), extra, len(body), body))
    c, chat = "/v1/completions", "/v1/chat/completions"
    return [
        ("bad JSON", post(c, b"{\"prompt\": \"x\",")),
        ("empty body", post(c, b"")),
        ("JSON array", post(c, b"[1,2,3]")),
        ("prompt missing", post(c, {"max_tokens": 3})),
        ("prompt a number", post(c, {"prompt": 5})),
        ("ids outside the vocabulary", post(c, {"prompt": [999999999]})),
        ("max_tokens negative", post(c, {"prompt": "x", "max_tokens": -5})),
        ("max_tokens 1e300", post(c, {"prompt": "x", "max_tokens": 1e300})),
        ("n 1000", post(c, {"prompt": "x", "n": 1000})),
        ("temperature NaN-ish", post(c, b"{\"prompt\":\"x\",\"temperature\":1e999}")),
        ("100 stop strings", post(c, {"prompt": "x", "stop": ["s%d" % i for i in range(100)]})),
        ("stop string 10 KiB", post(c, {"prompt": "x", "stop": "y" * 10240})),
        ("logit_bias", post(c, {"prompt": "x", "logit_bias": {"1": 5}})),
        ("messages missing", post(chat, {"max_tokens": 3})),
        ("messages empty", post(chat, {"messages": []})),
        ("role unknown", post(chat, {"messages": [{"role": "root", "content": "x"}]})),
        ("image part", post(chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
        ("prompt over the context", post(c, {"prompt": [1] * 5000})),
        ("unknown route", b"GET /v1/secrets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        ("path traversal", b"GET /../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        ("wrong method", b"DELETE /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        ("header over 32 KiB", b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"),
        ("body over 4 MiB", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000\r\n\r\n{"),
        ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256))),
        ("bad chunk size", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("bad Expect", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 200-ok\r\nContent-Length: 2\r\n\r\n{}"),
        ("NUL in header", b"GET /health HTTP/1.1\r\nHost: x\0y\r\n\r\n"),
    ]


def malformer():
    rng = random.Random(3)
    cases = bad_requests()
    counts = {}
    while not state["stop"].is_set():
        name, raw = cases[rng.randrange(len(cases))]
        try:
            s = soaklib.connect(kvd().port, timeout=60)
            try:
                s.sendall(raw)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before reading it all: the answer is still there to read
            status, resp = soaklib.read_response(s, 60)
            s.close()
        except (OSError, Failure) as e:
            fail_later("bad request %r: %r" % (name, e))
            return
        if status is None or not 400 <= status < 500:
            fail_later("bad request %r answered %s: %r" % (name, status, resp[:300]))
            return
        counts[status] = counts.get(status, 0) + 1
        time.sleep(0.01)  # a steady trickle, not a flood: the flood is kvd-bench's job
    state["malformed"] = counts


def rss_sampler():
    samples = []
    t0 = time.monotonic()
    while not state["stop"].is_set():
        if not kvd().alive():
            fail_later("kvd died during the load (status %s):\n%s" % (kvd().proc.poll(), kvd().output_tail()))
            break
        samples.append((time.monotonic() - t0, kvd().rss_kib()))
        state["stop"].wait(1.0)
    state["rss"] = samples


def load():
    before = kvd().metrics()
    fd, bench_json = tempfile.mkstemp(prefix="kvd-soak-bench-", suffix=".json")
    os.close(fd)
    bench_cmd = [BENCH, "--url", "http://127.0.0.1:%d" % kvd().port, "--concurrency", str(opts.concurrency),
                 "--turns", "4", "--requests", "0", "--duration", str(int(opts.seconds)),
                 "--prompt-tokens", "24:64", "--max-tokens", "16:48", "--ignore-eos", "--seed", "7",
                 "--timeout", "300", "--json", bench_json, "--no-progress"]
    bench = subprocess.Popen(bench_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             preexec_fn=soaklib.die_with_parent)
    threads = [threading.Thread(target=f, daemon=True) for f in (checker, disconnecter, malformer, rss_sampler)]
    for t in threads:
        t.start()
    try:
        out, _ = bench.communicate(timeout=opts.seconds + 360)
    except subprocess.TimeoutExpired:
        bench.kill()
        raise Failure("kvd-bench still running %d s after its --duration" % 360)
    finally:
        state["stop"].set()
        for t in threads:
            t.join(400)
    check(not state["errors"], "\n".join(state["errors"][:5]))
    try:
        with open(bench_json) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise Failure("kvd-bench wrote no JSON report (%s; exit %d):\n%s" % (e, bench.returncode, out.decode()[-3000:]))
    finally:
        os.unlink(bench_json)
    errors = report.get("errors", {})
    real_errors = {k: v for k, v in errors.items() if k not in ("messages", "http_status") and v}
    check(not real_errors and report.get("failed", 0) == 0,
          "kvd-bench saw errors: %s (failed %s)" % (errors, report.get("failed")))
    check(report.get("completed", 0) > 0, "kvd-bench completed nothing: %s" % out.decode()[-2000:])
    m = kvd().wait_idle(120)
    preempted = m["kvd:num_preemptions_total"] - before["kvd:num_preemptions_total"]
    check(preempted > 0, "no preemption: the pool was not small enough to test it")
    state["report"] = report
    state["preempted"] = preempted
    state["metrics"] = m


def memory_flat():
    samples = state["rss"]
    enforce = not soaklib.sanitized(build)
    warm = max(10.0, opts.seconds / 3)
    after = [(t, kib) for t, kib in samples if t >= warm]
    check(len(after) >= 6, "too few RSS samples after the warm-up (%d)" % len(after))
    third = len(after) // 3
    first = max(k for _, k in after[:third])
    last = max(k for _, k in after[-third:])
    growth_mib = (last - first) / 1024.0
    state["rss_summary"] = (samples[0][1] / 1024.0, first / 1024.0, last / 1024.0, growth_mib)
    if not enforce:
        # ASan's quarantine and shadow memory grow by design; LeakSanitizer judges leaks there.
        print("    VmRSS not judged in a sanitizer build (growth %+.1f MiB)" % growth_mib, flush=True)
        return
    check(growth_mib <= opts.rss_tolerance_mib,
          "VmRSS grew %.1f MiB after the warm-up (%.1f -> %.1f MiB; tolerance %.1f MiB)"
          % (growth_mib, first / 1024.0, last / 1024.0, opts.rss_tolerance_mib))


def after_load():
    m = kvd().wait_idle(60)
    check(m["kvd:kv_blocks_used"] == 0, "kv_blocks_used %d when idle" % m["kvd:kv_blocks_used"])
    for i, (p, r) in enumerate(PROBES):
        got = probe_text(p, r)
        check(got == state["solo"][i], "probe %d after the load differs:\n  solo %r\n  now  %r" % (i, state["solo"][i], got))


def stop():
    status = kvd().stop(timeout=120)
    kvd().check_clean_exit(status)
    r = state["report"]
    rss0, first, last, growth = state["rss_summary"]
    print("    %.0f s: kvd-bench %d requests completed (%d cut by --duration), %d output tokens, %.1f tok/s;"
          % (opts.seconds, r.get("completed", 0), r.get("incomplete", 0), r.get("total_output_tokens", 0),
             r.get("output_throughput", 0)))
    print("    %d preemptions; %d checker answers equal to solo; %d mid-stream disconnects; bad requests by status %s;"
          % (state["preempted"], state.get("checked", 0), state.get("disconnected", 0),
             json.dumps(state.get("malformed", {}), sort_keys=True)))
    print("    VmRSS %.1f MiB at start, %.1f -> %.1f MiB after warm-up (growth %+.1f MiB, tolerance %.1f); exit %d"
          % (rss0, first, last, growth, opts.rss_tolerance_mib, status), flush=True)


sys.argv = [sys.argv[0], build]
try:
    soaklib.run([("start", start), ("solo baseline", baseline), ("load with faults", load),
                 ("memory flat", memory_flat), ("idle and still correct", after_load), ("SIGTERM", stop)])
finally:
    state["stop"].set()
    if "kvd" in state:
        state["kvd"].kill()
