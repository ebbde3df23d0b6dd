"""soaklib.py - what kvd's fault, load and leak tests share (Python 3 stdlib only).

Every script in tests/soak/ takes the build directory as its first argument and runs
the real daemon (BUILD/server/kvd) on an ephemeral loopback port against the tiny
fixture (BUILD/fixtures/tiny, or $KVD_TINY_MODEL). The daemon's combined output is
collected by a reader thread, so a chatty daemon never blocks on a full pipe and a
sanitizer report is always seen. Checks raise Failure with a one-line reason; run()
prints one line per check and exits 0 (all passed), 1 (a check failed) or 77 (the
daemon or fixture is not built, which meson counts as skipped). Waits are bounded:
nothing here can hang longer than its stated deadline.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
from kvd_lines import SANITIZER_MARKERS, LineLog, die_with_parent  # noqa: E402,F401 (re-exported to the soak tests)

SOURCE_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SKIP = 77
# The daemon's address lines: "kvd: bound to http://HOST:PORT, loading ..." and
# "kvd: listening on http://HOST:PORT ..." (IPv6 hosts in brackets).
BANNER = r"(?:bound to|listening on) http://(\[[^\]]*\]|[^:/\s]+):(\d+)"


class Failure(Exception):
    pass


class Skip(Exception):
    pass


def check(cond, message):
    if not cond:
        raise Failure(message)


def build_dir_from_argv():
    if len(sys.argv) < 2:
        print("usage: %s BUILD_DIR [options]" % os.path.basename(sys.argv[0]), file=sys.stderr)
        sys.exit(2)
    return os.path.abspath(sys.argv[1])


def kvd_path(build):
    return os.path.join(build, "server", "kvd")


def tiny_model(build):
    path = os.environ.get("KVD_TINY_MODEL") or os.path.join(build, "fixtures", "tiny")
    return path


def require_daemon(build):
    if not os.access(kvd_path(build), os.X_OK):
        raise Skip("%s is not built" % kvd_path(build))
    if not os.path.isfile(os.path.join(tiny_model(build), "model.safetensors")):
        raise Skip("no tiny fixture in %s (run scripts/fixtures.sh %s)" % (tiny_model(build), build))


def sanitized(build):
    """The sanitizers meson built this directory with ("" when none)."""
    try:
        with open(os.path.join(build, "meson-info", "intro-buildoptions.json")) as f:
            for opt in json.load(f):
                if opt.get("name") == "b_sanitize":
                    return "" if opt.get("value") in (None, "none") else str(opt.get("value"))
    except (OSError, ValueError):
        pass
    return ""


def sanitizer_env():
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1")
    env.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
    return env


class Daemon(LineLog):
    """One kvd process on 127.0.0.1:<ephemeral>. stop() sends SIGTERM and returns the
    exit status; kill() is the last resort of a failed test."""

    line_failure = Failure

    def __init__(self, build, *args, model=None, threads=1):
        self.build = build
        self.model = model or tiny_model(build)
        self.args = [str(a) for a in args]
        self.threads = threads
        LineLog.__init__(self)
        self.port = None
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.kill()
        return False

    def start(self, ready_timeout=120):
        cmd = [kvd_path(self.build), "--model", self.model, "--port", "0",
               "--threads", str(self.threads)] + self.args
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=sanitizer_env(), preexec_fn=die_with_parent)
        self.follow_output()
        try:
            return self._wait_ready(ready_timeout)
        except BaseException:
            self.kill()  # a daemon that never became ready must not outlive the test
            raise

    def _wait_ready(self, ready_timeout):
        # The first address line ("bound to" while loading, or "listening on") gives the
        # port; readiness is judged by /health itself, not by the wording of a banner.
        line = self.wait_for_line(BANNER, 60)
        self.port = int(re.search(BANNER, line).group(2))
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                status, _, _ = self.request("GET", "/health", timeout=10)
                if status == 200:
                    return self
            except OSError:
                pass
            if not self.alive():
                raise Failure("kvd exited (status %s) before it was ready:\n%s" % (self.proc.poll(), self.output_tail()))
            if time.monotonic() > deadline:
                raise Failure("kvd not ready (GET /health) within %d s:\n%s" % (ready_timeout, self.output_tail()))
            time.sleep(0.1)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=60):
        """SIGTERM, then the exit status (raises Failure if it does not exit in time)."""
        if not self.alive():
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Failure("kvd did not exit within %d s of SIGTERM:\n%s" % (timeout, self.output_tail()))
        with self._cond:  # let the reader take the last lines
            end = time.monotonic() + 5
            while not self._eof and time.monotonic() < end:
                self._cond.wait(0.1)
        return status

    def check_clean_exit(self, status):
        report = self.sanitizer_report()
        check(report is None, "sanitizer report from kvd:\n" + (report or "")[-6000:])
        check(status == 0, "kvd exited with status %s after SIGTERM:\n%s" % (status, self.output_tail()))

    def rss_kib(self):
        """VmRSS of the daemon in KiB, from /proc/PID/status."""
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise Failure("no VmRSS for pid %d" % self.pid)

    # ---- HTTP ----

    def request(self, method, path, body=None, headers=None, timeout=120):
        """(status, headers with lower-case names, body bytes); one connection each."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            hdrs.update(headers or {})
            c.request(method, path, body=data, headers=hdrs)
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def post(self, path, obj, timeout=120):
        status, _, body = self.request("POST", path, obj, timeout=timeout)
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            raise Failure("POST %s: status %d with a body that is not JSON: %r" % (path, status, body[:200]))

    def metrics(self):
        status, _, body = self.request("GET", "/metrics", timeout=30)
        check(status == 200, "GET /metrics answered %d" % status)
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def wait_idle(self, timeout=60):
        """Waits until no request runs or waits and no KV block is in use; returns the
        last metrics, or raises Failure naming what is still held."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            held = {k: m.get(k) for k in ("kvd:num_requests_running", "kvd:num_requests_waiting",
                                           "kvd:kv_blocks_used")}
            if all(v == 0 for v in held.values()):
                return m
            if time.monotonic() > deadline:
                raise Failure("still busy %d s after the load stopped: %s" % (timeout, held))
            time.sleep(0.25)


def connect(port, timeout=30):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return s


def abort_close(sock):
    """Closes with a reset, as a client that crashes or is killed does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


def read_response(sock, timeout):
    """Reads one whole HTTP response (Content-Length or until close) from a raw socket;
    returns (status, bytes) or (None, bytes) when the peer closed before a status line."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data:
        if time.monotonic() > deadline:
            raise Failure("no response head within %.0f s (got %r)" % (timeout, data[:200]))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            break
        data += chunk
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", data)
    if not m:
        return None, data
    head, _, rest = data.partition(b"\r\n\r\n")
    cl = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if cl:
        want = int(cl.group(1))
        while len(rest) < want and time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            if not chunk:
                break
            rest += chunk
    return int(m.group(1)), head + b"\r\n\r\n" + rest


def run(checks):
    """Runs (name, function) pairs in order, stopping at the first failure; exits."""
    passed = 0
    try:
        for name, fn in checks:
            t0 = time.monotonic()
            fn()
            passed += 1
            print("PASS %s (%.1f s)" % (name, time.monotonic() - t0), flush=True)
    except Skip as e:
        print("SKIP: %s" % e, flush=True)
        sys.exit(SKIP)
    except Failure as e:
        print("FAIL %s: %s" % (name, e), flush=True)
        sys.exit(1)
    except Exception:
        print("FAIL %s: unexpected exception" % name, flush=True)
        traceback.print_exc()
        sys.exit(1)
    print("%d passed, 0 failed" % passed, flush=True)
    sys.exit(0)
