"""kvd_e2e.py - shared helpers for kvd's end-to-end tests (Python 3 stdlib only).

Starts the real daemon (KVD_BUILD_ROOT/server/kvd) on an ephemeral loopback port
(--port 0, the port read from the "bound to" line), waits for the "listening on" banner
line that says requests are served, and speaks real HTTP to it: http.client for
ordinary requests, raw sockets where the test is about the bytes (pipelining, chunked
bodies, malformed input). A tiny test runner
runs every test_* function of a module, each isolated, and closes with the line
"N passed, N failed" that CI reads; the exit status is non-zero on any failure.
Every daemon is stopped when its `with` block ends, whatever happened inside.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvd_lines import LineLog, die_with_parent  # noqa: E402

SOURCE_ROOT = os.environ.get("KVD_SOURCE_ROOT", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BUILD_ROOT = os.environ.get("KVD_BUILD_ROOT", os.path.join(SOURCE_ROOT, "build"))
KVD = os.path.join(BUILD_ROOT, "server", "kvd")
TOKENIZER_JSON = os.environ.get("KVD_TOKENIZER_JSON",
                                os.path.join(SOURCE_ROOT, "third_party", "qwen-tokenizer", "tokenizer.json"))

_generated_model = None


def tiny_model():
    """The tiny fixture from $KVD_TINY_MODEL, or one generated into a temporary
    directory with kvd-mkmodel (same preset and seed as scripts/fixtures.sh)."""
    global _generated_model
    path = os.environ.get("KVD_TINY_MODEL")
    if path and os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    if _generated_model:
        return _generated_model
    out = tempfile.mkdtemp(prefix="kvd-e2e-tiny-")
    subprocess.run([os.path.join(BUILD_ROOT, "tools", "kvd-mkmodel"), "--out", out, "--preset", "tiny",
                    "--seed", "1", "--tokenizer", TOKENIZER_JSON], check=True, stdout=subprocess.DEVNULL)
    _generated_model = out
    return out


class Daemon(LineLog):
    """One kvd process. Use as a context manager; extra arguments go to kvd."""

    def __init__(self, *args, model=None, wait_ready=True):
        self.args = [str(a) for a in args]
        self.model = model or tiny_model()
        self.wait_ready = wait_ready
        LineLog.__init__(self)
        self.port = None
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.kill()
        # A sanitizer build (meson -Db_sanitize=...) reports into the same stream.
        if exc_type is None:
            report = self.sanitizer_report()
            assert report is None, "sanitizer report from kvd:\n" + report
        return False

    def start(self):
        # One compute thread: the test machines are shared and small, and OpenMP
        # teams on busy cores spend their time waiting for each other.
        cmd = [KVD, "--model", self.model, "--port", "0", "--threads", "1"] + self.args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)
        self.follow_output()
        # "bound to" comes as soon as the port is bound (503 while loading); "listening
        # on" once the model is loaded and requests are served.
        line = self.wait_for_line(r"^kvd: bound to http://\S+:\d+", 30)
        self.port = int(re.search(r"http://\S+:(\d+)", line).group(1))
        if self.wait_ready:
            self.wait_for_line(r"^kvd: listening on http://\S+:%d " % self.port, 60)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout):
        """The exit status; by then output() holds every line the daemon printed (a
        test that reads the log right after the exit must not race the reader)."""
        status = self.proc.wait(timeout)
        self.wait_eof(30)
        return status

    # ---- HTTP ----

    def conn(self, timeout=60):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=60):
        """Returns (status, headers dict with lower-case names, body bytes)."""
        c = self.conn(timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            hdrs.update(headers or {})
            c.request(method, path, body=data, headers=hdrs)
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def post(self, path, obj, headers=None, timeout=60):
        status, hdrs, body = self.request("POST", path, obj, headers, timeout)
        return status, json.loads(body) if body else None

    def get(self, path, headers=None):
        status, hdrs, body = self.request("GET", path, None, headers)
        return status, body

    def stream(self, path, obj, headers=None, timeout=60):
        """POSTs with stream=true; returns (status, response headers, list of data
        payloads: parsed JSON objects, and the string "[DONE]")."""
        c = self.conn(timeout)
        try:
            hdrs = {"Content-Type": "application/json"}
            hdrs.update(headers or {})
            c.request("POST", path, body=json.dumps(obj).encode(), headers=hdrs)
            r = c.getresponse()
            head = {k.lower(): v for k, v in r.getheaders()}
            raw = r.read().decode("utf-8")
            if r.status != 200:
                return r.status, head, json.loads(raw)
            return r.status, head, parse_sse(raw)
        finally:
            c.close()

    def metrics(self):
        status, body = self.get("/metrics")
        assert status == 200, status
        return parse_metrics(body.decode())

    def raw(self):
        return RawClient(self.port)


def parse_sse(text):
    """Splits an SSE body into its data payloads; checks the framing strictly."""
    events = []
    assert text.endswith("\n\n"), repr(text[-40:])
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: "), repr(block)
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def parse_metrics(text):
    """Prometheus text -> {name or name{labels}: float}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
    return out


class RawClient:
    """A blocking TCP client speaking raw bytes, for framing tests."""

    def __init__(self, port, timeout=30):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    def read_until(self, marker):
        while marker not in self.buf:
            self._fill()
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def read_exact(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response(self):
        """One response: (status, headers dict lower-case, body bytes)."""
        head = self.read_until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = self.read_exact(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self.read_until(b"\r\n").strip(), 16)
                data = self.read_exact(size + 2)
                assert data.endswith(b"\r\n")
                body += data[:-2]
                if size == 0:
                    break
        else:
            body = b""
        return status, headers, body

    def at_eof(self):
        """True when the server closed the connection (after any pending bytes)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


def http_request(method, path, body=b"", headers=None):
    """Bytes of one HTTP/1.1 request with Content-Length."""
    if isinstance(body, str):
        body = body.encode()
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1"]
    for k, v in (headers or {}).items():
        lines.append("%s: %s" % (k, v))
    if body or method == "POST":
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def check_error(body, status_param=None, code=None):
    """Asserts OpenAI's error shape; returns the error object."""
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if status_param is not None:
        assert err["param"] == status_param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.05)


def run_tests(module_globals):
    """Runs every test_* function in definition order; prints the summary line."""
    # A runner's timeout sends SIGTERM: unwind so every `with Daemon` block stops its
    # daemon (and the summary line still reports what ran).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit("terminated"))
    tests = [(name, fn) for name, fn in module_globals.items() if name.startswith("test_") and callable(fn)]
    only = set(sys.argv[1:])
    passed = failed = 0
    for name, fn in tests:
        if only and name not in only:
            continue
        start = time.monotonic()
        try:
            fn()
        except Exception:
            failed += 1
            print("FAIL %s (%.1fs)" % (name, time.monotonic() - start), flush=True)
            traceback.print_exc()
        else:
            passed += 1
            print("ok   %s (%.1fs)" % (name, time.monotonic() - start), flush=True)
    print("%d passed, %d failed" % (passed, failed), flush=True)
    sys.exit(1 if failed or not passed else 0)
