#!/usr/bin/env python3
"""test_lsan_lifecycle.py - the daemon's whole life is clean under ASan, UBSan and LSan.

    python3 tests/soak/test_lsan_lifecycle.py BUILD_DIR [--any-build]

Meant for a build configured with -Db_sanitize=address,undefined (scripts/ci-extra.sh
makes build-asan); in any other build directory it reports itself skipped (77) unless
--any-build is given, because without the sanitizers it would prove little. Starts the
daemon with ASAN_OPTIONS=detect_leaks=1 and UBSAN_OPTIONS=halt_on_error=1, and exercises
each kind of object the daemon allocates: whole and streamed completions and chats, n > 1,
logprobs, stop strings, tokenize/detokenize, /v1/models, /metrics, /v1/kv, a stream whose
client vanishes mid-way (cancelled in the engine), a request refused by the parser, a
malformed HTTP request, a 429 from a full queue, and a request still running when SIGTERM
arrives (drained). Then SIGTERM: exit status 0 and no sanitizer or leak report.
"""

import json
import socket
import sys
import threading
import time

import soaklib
from soaklib import check

build = soaklib.build_dir_from_argv()
state = {}


def kvd():
    return state["kvd"]


def start():
    soaklib.require_daemon(build)
    if "--any-build" not in sys.argv and "address" not in soaklib.sanitized(build):
        raise soaklib.Skip("%s is not an AddressSanitizer build (meson -Db_sanitize=address,undefined)" % build)
    state["kvd"] = soaklib.Daemon(build, "--max-queue", 2, "--max-num-seqs", 2, "--kv-num-blocks", 64).start(
        ready_timeout=300)


def requests():
    k = kvd()
    status, r = k.post("/v1/completions", {"prompt": "Hello there", "max_tokens": 6, "temperature": 0,
                                           "logprobs": 3, "stop": ["zzz"]})
    check(status == 200 and r["usage"]["completion_tokens"] >= 1, "completion: %d %s" % (status, r))
    status, r = k.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                                                "n": 2, "temperature": 0.8, "seed": 3, "logprobs": True,
                                                "top_logprobs": 2})
    check(status == 200 and len(r["choices"]) == 2, "chat: %d %s" % (status, r))
    for path, req in (("/v1/completions", {"prompt": [9707, 11, 1879], "max_tokens": 5, "stream": True,
                                           "stream_options": {"include_usage": True}}),
                      ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Stream"}],
                                                "max_tokens": 5, "stream": True})):
        status, _, raw = k.request("POST", path, req)
        check(status == 200 and raw.rstrip().endswith(b"data: [DONE]"), "%s stream: %d %r" % (path, status, raw[-80:]))
    status, r = k.post("/tokenize", {"prompt": "tokenize me"})
    check(status == 200, "tokenize: %d %s" % (status, r))
    ids = r.get("tokens")
    check(isinstance(ids, list) and ids, "tokenize gave %s" % r)
    status, r = k.post("/detokenize", {"tokens": ids})
    check(status == 200 and r.get("prompt") == "tokenize me", "detokenize: %d %s" % (status, r))
    for path in ("/v1/models", "/metrics", "/v1/kv", "/health"):
        status, _, _ = k.request("GET", path)
        check(status == 200, "GET %s: %d" % (path, status))
    status, r = k.post("/v1/completions", {"prompt": "x", "max_tokens": -1})
    check(status == 400, "bad max_tokens: %d" % status)
    status, _, _ = k.request("POST", "/v1/completions", b"{not json")
    check(status == 400, "bad JSON: %d" % status)
    s = soaklib.connect(k.port)
    s.sendall(b"GARBAGE\x01 / HTTP/1.1\r\n\r\n")
    status, _ = soaklib.read_response(s, 30)
    s.close()
    check(status == 400, "malformed HTTP: %s" % status)


def vanishing_stream():
    k = kvd()
    s = soaklib.connect(k.port)
    body = json.dumps({"prompt": "Go on", "max_tokens": 2000, "ignore_eos": True, "stream": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while got.count(b"data: ") < 3:
        chunk = s.recv(4096)
        check(chunk, "stream ended early: %r" % got[-200:])
        got += chunk
    soaklib.abort_close(s)
    k.wait_idle(120)


def queue_full():
    # Two slots and a queue of two: six long requests at once, some must get 429.
    k = kvd()
    statuses = []

    def one():
        status, _ = k.post("/v1/completions", {"prompt": "Long", "max_tokens": 300, "ignore_eos": True},
                           timeout=600)
        statuses.append(status)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(660)
    check(len(statuses) == 6 and set(statuses) <= {200, 429} and 429 in statuses,
          "queue-full statuses: %s" % statuses)
    k.wait_idle(120)


def sigterm_with_request_in_flight():
    k = kvd()
    result = {}

    def one():
        try:
            result["r"] = k.post("/v1/completions", {"prompt": "Drain me", "max_tokens": 200, "ignore_eos": True},
                                 timeout=600)
        except Exception as e:
            result["r"] = (None, repr(e))

    t = threading.Thread(target=one, daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while k.metrics()["kvd:num_requests_running"] < 1:
        check(time.monotonic() < deadline, "the request never started")
        time.sleep(0.05)
    status = k.stop(timeout=300)
    t.join(60)
    check(result.get("r", (None,))[0] == 200, "the request in flight at SIGTERM was not drained: %s" % (result,))
    k.check_clean_exit(status)
    print("    exit %d, no sanitizer or leak report in %d lines of output" % (status, len(k.lines)), flush=True)


try:
    soaklib.run([("start", start), ("requests of every kind", requests), ("client vanishes mid-stream", vanishing_stream),
                 ("queue full", queue_full), ("SIGTERM with a request in flight", sigterm_with_request_in_flight)])
finally:
    if "kvd" in state:
        state["kvd"].kill()
