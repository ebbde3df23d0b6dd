#!/usr/bin/env python3
"""test_slow_clients.py - slow and stuck clients hold no engine resources and block no one.

    python3 tests/soak/test_slow_clients.py BUILD_DIR

One daemon with short transport limits (header timeout 1.5 s, idle timeout 3 s, a
256 KiB write queue, 32 connections). Cases:
  - slowloris: 20 connections trickle a header byte every 100 ms; a normal request
    completes meanwhile, they hold no KV block and no engine slot, and each is
    answered 408 and closed once the header timeout passes (counted from its first
    byte, so trickling does not extend it);
  - the connection limit: with 32 slow connections open, the next client is answered
    503 at once instead of waiting, and once the slow ones time out a normal request
    is served again;
  - a stalled body (headers complete, body never finished): 408 after the idle timeout;
  - an idle keep-alive connection is closed after the idle timeout;
  - a reader that never reads its stream (a small receive buffer, 16 long choices
    with 20 logprobs per token, so the stream produces megabytes): another client is served
    meanwhile, and the daemon cuts the stuck connection at the write-queue cap and
    gives back its engine slot and KV blocks while the socket is still open.
Every wait is bounded (the timeout plus a few seconds of slack).
"""

import json
import select
import socket
import threading
import time

import soaklib
from soaklib import Failure, check

build = soaklib.build_dir_from_argv()
HEADER_TIMEOUT_S = 1.5
IDLE_TIMEOUT_S = 3.0
SLACK_S = 6.0
MAX_CONNECTIONS = 32
MAX_TOKENS = 3800
state = {}


def daemon():
    return state["kvd"]


def start():
    soaklib.require_daemon(build)
    state["kvd"] = soaklib.Daemon(build, "--header-timeout-ms", int(HEADER_TIMEOUT_S * 1000),
                                  "--idle-timeout-ms", int(IDLE_TIMEOUT_S * 1000),
                                  "--max-write-queue-bytes", 262144,
                                  "--max-connections", MAX_CONNECTIONS).start()


def normal_request():
    status, body = daemon().post("/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 8,
                                                     "temperature": 0, "ignore_eos": True}, timeout=60)
    check(status == 200, "normal request answered %d: %s" % (status, body))
    check(body["usage"]["completion_tokens"] == 8, "normal request: %s" % body)


class Trickler:
    """Slow clients that send a request head one byte at a time and never finish it."""

    HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"

    def __init__(self, count):
        self.socks = []
        for _ in range(count):
            s = soaklib.connect(daemon().port)
            s.sendall(self.HEAD)
            self.socks.append(s)
        self.opened = time.monotonic()
        self.results = {}  # socket index -> (status or None, seconds until closed)
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        offset = 0
        filler = b"X-Slow-Header: " + b"a" * 4000
        while not self.stop and len(self.results) < len(self.socks):
            live = [i for i in range(len(self.socks)) if i not in self.results]
            readable, _, _ = select.select([self.socks[i] for i in live], [], [], 0.1)
            for s in readable:
                i = self.socks.index(s)
                status, _ = soaklib.read_response(s, 5)
                self.results[i] = (status, time.monotonic() - self.opened)
                s.close()
            byte = filler[offset % len(filler):offset % len(filler) + 1]
            offset += 1
            for i in live:
                if i in self.results:
                    continue
                try:
                    self.socks[i].send(byte)
                except OSError:
                    pass  # closed under us: the read above will tell

    def wait(self, timeout):
        self.thread.join(timeout)
        self.stop = True
        return self.results

    def close(self):
        self.stop = True
        self.thread.join(5)
        for s in self.socks:
            s.close()


def check_slowloris():
    t = Trickler(20)
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        normal_request()
        served_in = time.monotonic() - t0
        m = daemon().metrics()
        still_open = 20 - len(t.results)
        check(m["kvd:kv_blocks_used"] == 0 and m["kvd:num_requests_running"] == 0
              and m["kvd:num_requests_waiting"] == 0,
              "slow clients hold engine resources: %s" % {k: v for k, v in m.items() if "num_requests" in k
                                                         or "blocks_used" in k})
        results = t.wait(HEADER_TIMEOUT_S + SLACK_S)
        check(len(results) == 20, "%d of 20 slow clients still open %.1f s after the header timeout" %
              (20 - len(results), SLACK_S))
        statuses = sorted(set(s for s, _ in results.values()))
        latest = max(sec for _, sec in results.values())
        check(statuses == [408], "slow clients answered %s (want 408)" % statuses)
        check(latest <= HEADER_TIMEOUT_S + SLACK_S, "a slow client was closed only after %.1f s" % latest)
        print("    normal request served in %.2f s with %d slow clients open; all 20 got 408 within %.2f s"
              % (served_in, still_open, latest), flush=True)
    finally:
        t.close()


def check_connection_limit():
    t = Trickler(MAX_CONNECTIONS)
    try:
        # Until the daemon has accepted all 32 a probe may still get in; give it 5 s.
        deadline = time.monotonic() + 5
        while True:
            s = soaklib.connect(daemon().port)
            t0 = time.monotonic()
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, body = soaklib.read_response(s, 10)
            s.close()
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        check(status == 503, "client over the connection limit got %s (want 503): %r" % (status, body[:200]))
        check(time.monotonic() - t0 < 5, "the 503 took %.1f s" % (time.monotonic() - t0))
        results = t.wait(HEADER_TIMEOUT_S + SLACK_S)
        check(len(results) == MAX_CONNECTIONS, "%d slow clients still open after the header timeout"
              % (MAX_CONNECTIONS - len(results)))
        normal_request()
    finally:
        t.close()


def check_stalled_body():
    s = soaklib.connect(daemon().port)
    try:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        status, body = soaklib.read_response(s, IDLE_TIMEOUT_S + SLACK_S)
        waited = time.monotonic() - t0
        check(status == 408, "stalled body answered %s (want 408): %r" % (status, body[:200]))
        check(IDLE_TIMEOUT_S - 0.5 <= waited <= IDLE_TIMEOUT_S + SLACK_S, "408 after %.1f s" % waited)
    finally:
        s.close()


def check_idle_keepalive():
    s = soaklib.connect(daemon().port)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _ = soaklib.read_response(s, 10)
        check(status == 200, "/health answered %s" % status)
        t0 = time.monotonic()
        s.settimeout(IDLE_TIMEOUT_S + SLACK_S)
        try:
            data = s.recv(100)
        except socket.timeout:
            raise Failure("idle keep-alive connection still open after %.1f s" % (IDLE_TIMEOUT_S + SLACK_S))
        except ConnectionResetError:
            data = b""
        check(data == b"", "idle connection received %r" % data[:100])
        waited = time.monotonic() - t0
        check(waited >= IDLE_TIMEOUT_S - 0.5, "idle connection closed after only %.1f s" % waited)
    finally:
        s.close()


def check_never_reading_stream():
    before = daemon().metrics()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", daemon().port))
    try:
        # 16 choices with 20 logprobs per token: about 12 KiB of events per engine step,
        # so the kernel's socket buffers (about 3 MiB on loopback) fill within seconds.
        body = json.dumps({"prompt": "Tell me everything.", "max_tokens": MAX_TOKENS, "n": 16,
                           "ignore_eos": True, "temperature": 0, "logprobs": 20, "stream": True}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        # The stream is running: another client is served meanwhile.
        deadline = time.monotonic() + 30
        while daemon().metrics()["kvd:num_requests_running"] < 1:
            check(time.monotonic() < deadline, "the stuck client's request never started")
            time.sleep(0.1)
        normal_request()
        # The daemon cuts the stuck connection at its write-queue cap and frees the
        # sequence, while our socket stays open and unread.
        t0 = time.monotonic()
        deadline = t0 + 120
        while True:
            m = daemon().metrics()
            if m["kvd:num_requests_running"] == 0 and m["kvd:kv_blocks_used"] == 0:
                break
            check(time.monotonic() < deadline, "stuck stream still holds the engine after 120 s: running %d, "
                  "blocks %d" % (m["kvd:num_requests_running"], m["kvd:kv_blocks_used"]))
            time.sleep(0.25)
        key = 'kvd:request_success_total{finished_reason="abort"}'
        generated = m["kvd:generation_tokens_total"] - before["kvd:generation_tokens_total"]
        check(m[key] >= before[key] + 1, "the stuck stream was not counted as aborted: %s -> %s" %
              (before[key], m[key]))
        check(generated < 16 * MAX_TOKENS, "the stuck stream ran to its end (%d tokens) instead of being cut"
              % generated)
        print("    stuck stream cut after %d generated tokens; engine free %.1f s after the other request"
              % (generated - 8, time.monotonic() - t0), flush=True)
    finally:
        soaklib.abort_close(s)
    daemon().wait_idle(30)


def stop():
    status = daemon().stop()
    daemon().check_clean_exit(status)


try:
    soaklib.run([("start", start), ("slowloris", check_slowloris), ("connection limit", check_connection_limit),
                 ("stalled body", check_stalled_body), ("idle keep-alive", check_idle_keepalive),
                 ("never-reading stream", check_never_reading_stream), ("SIGTERM", stop)])
finally:
    if "kvd" in state:
        state["kvd"].kill()
