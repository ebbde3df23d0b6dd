"""attacks.py - the audit's attacks on the HTTP layer, measured (docs/hardening.md).

    /usr/bin/python3 tests/soak/attacks.py BUILD_DIR [--old] [--only NAME ...]

Starts the daemon from BUILD_DIR with the tiny fixture for each attack and prints, per
attack, the daemon's resident set before, at its peak (sampled every 50 ms) and after,
and what the clients saw. --old runs against a build without this branch's knobs
(today's main): the flags it does not know are left out, so the same attacks show
what the limits changed. Not a test: it asserts nothing and takes about two minutes.
"""

import json
import os
import re
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
import kvd_e2e  # noqa: E402

OLD = "--old" in sys.argv
KEY = "sk-attack"


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


class Sampler:
    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            try:
                self.peak = max(self.peak, rss_kb(self.pid))
            except (OSError, AttributeError):
                return
            time.sleep(0.05)

    def done(self):
        self.stop = True
        self.thread.join()
        return self.peak


def new_flags(*flags):
    return [] if OLD else list(flags)


def connect(port, rcvbuf=None):
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    return s


def health_status(d):
    try:
        return d.get("/health")[0]
    except OSError:
        return None


def report(name, before, peak, after, **facts):
    print("%-24s RSS before %6.1f MB  peak %6.1f MB  after %6.1f MB  %s" % (
        name, before / 1024, peak / 1024, after / 1024, "  ".join("%s=%s" % kv for kv in facts.items())), flush=True)


def tokenize_body(words):
    return json.dumps({"prompt": " ".join("w%d" % i for i in range(words))}).encode()


def attack_pipeline(route, body, timeout_s):
    """16 clients pipeline requests and never read, on --max-connections 16."""
    args = ["--kv-cache-mb", "8", "--max-connections", "16"] + new_flags("--send-timeout-ms", str(timeout_s * 1000))
    with kvd_e2e.Daemon(*args) as d:
        pid = d.proc.pid
        before = rss_kb(pid)
        sampler = Sampler(pid)
        hdrs = {"Content-Type": "application/json"} if body else {}
        one = kvd_e2e.http_request("POST" if body else "GET", route, body or b"", hdrs)
        start = time.monotonic()
        hogs = []
        for _ in range(16):
            s = connect(d.port, 4096)
            s.setblocking(False)
            hogs.append(s)
        # Each hog pipelines as long as the daemon takes its requests (it stops reading
        # while an answer is queued, so the hog's own send buffer fills), never reading.
        pending = {s: 0 for s in hogs}
        stop_at = time.monotonic() + 3
        while time.monotonic() < stop_at:
            for s in hogs:
                try:
                    pending[s] += s.send(one[pending[s] % len(one):] if pending[s] % len(one) else one)
                except (BlockingIOError, ConnectionError):
                    pass
            time.sleep(0.01)
        time.sleep(1)
        refused_early = health_status(d) != 200
        # How long until a new client is served again (the hogs' slots freed)?
        served_after = None
        while time.monotonic() - start < timeout_s + 30:
            if health_status(d) == 200:
                served_after = time.monotonic() - start
                break
            time.sleep(0.25)
        # And until every hog is gone (the metrics request itself is the one left)?
        all_gone_after = None
        while time.monotonic() - start < timeout_s + 60:
            try:
                if d.metrics()["kvd:http_connections"] <= 1:
                    all_gone_after = time.monotonic() - start
                    break
            except (AssertionError, OSError):
                pass  # a slot still taken
            time.sleep(0.25)
        peak = sampler.done()
        cuts = len(re.findall(r"response cut \(client not reading", d.output()))
        answers = len(re.findall(r" %s 200 " % route, d.output()))
        for s in hogs:
            s.close()
        time.sleep(1)
        after = rss_kb(pid)
        never = "never (%d s)"
        report("pipeline " + route, before, peak, after, blocked_at_1s=refused_early,
               new_client_served_after_s="%.1f" % served_after if served_after else never % (timeout_s + 30),
               all_hogs_cut_after_s="%.1f" % all_gone_after if all_gone_after else never % (timeout_s + 60),
               answers_queued=answers, cut_lines=cuts)


def attack_stalled_bodies(with_key):
    """100 clients each declare a 4 MiB body, send all but one byte and stall."""
    args = ["--kv-cache-mb", "8", "--body-timeout-ms", "20000", "--idle-timeout-ms", "20000"]
    if with_key:
        args += ["--api-key", KEY]
    with kvd_e2e.Daemon(*args) as d:
        pid = d.proc.pid
        before = rss_kb(pid)
        sampler = Sampler(pid)
        size = 4 << 20
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % size)
        payload = b"x" * (size - 1)
        socks, refused = [], 0
        for _ in range(100):
            s = connect(d.port)
            s.sendall(head)
            s.setblocking(False)
            sent = 0
            t0 = time.monotonic()
            while sent < len(payload) and time.monotonic() - t0 < 2:
                try:
                    sent += s.send(payload[sent:sent + (1 << 20)])
                except BlockingIOError:
                    time.sleep(0.005)
                except (BrokenPipeError, ConnectionResetError):
                    break
            socks.append(s)
        time.sleep(1)
        for s in socks:
            try:
                first = s.recv(16)
                refused += first.startswith(b"HTTP/1.1 4") or first.startswith(b"HTTP/1.1 5")
            except (BlockingIOError, ConnectionResetError):
                pass
        peak = sampler.done()
        served = health_status(d)
        for s in socks:
            s.close()
        time.sleep(1.5)
        after = rss_kb(pid)
        report("stalled bodies%s" % (" (no key)" if with_key else ""), before, peak, after,
               refused_at_once=refused, health_meanwhile=served)


def attack_drain():
    """An 8 MB answer to a client that reads slowly; SIGTERM once it is queued."""
    with kvd_e2e.Daemon("--kv-cache-mb", "8", "--socket-send-buffer-bytes", "65536") as d:
        s = connect(d.port, 65536)
        body = tokenize_body(450000)
        s.sendall(kvd_e2e.http_request("POST", "/tokenize", body, {"Content-Type": "application/json"}))
        d.wait_for_line(r"POST /tokenize 200", 120)
        d.signal(signal.SIGTERM)
        time.sleep(0.5)
        raw = b""
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            raw += chunk
        head, _, rest = raw.partition(b"\r\n\r\n")
        meant = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        code = d.wait_exit(60)
        print("%-24s body received %d of %d bytes, exit status %d, log: %s" % (
            "SIGTERM drain", len(rest), meant, code,
            "; ".join(l for l in d.output().splitlines() if "cut" in l) or "no cut"), flush=True)


ATTACKS = {
    "pipeline_chatjs": lambda: attack_pipeline("/chat.js", None, 5),
    "pipeline_tokenize": lambda: attack_pipeline("/tokenize", tokenize_body(30000), 5),
    "stalled_bodies": lambda: attack_stalled_bodies(False),
    "stalled_bodies_key": lambda: attack_stalled_bodies(True),
    "drain": attack_drain,
}


def main():
    args = [a for a in sys.argv[1:] if a != "--old"]
    if not args:
        sys.exit(__doc__)
    os.environ["KVD_BUILD_ROOT"] = os.path.abspath(args[0])
    kvd_e2e.BUILD_ROOT = os.environ["KVD_BUILD_ROOT"]
    kvd_e2e.KVD = os.path.join(kvd_e2e.BUILD_ROOT, "server", "kvd")
    only = args[args.index("--only") + 1:] if "--only" in args else list(ATTACKS)
    print("kvd attacks: %s build %s, %s, load %s" % ("old" if OLD else "new", args[0], time.strftime("%Y-%m-%d %H:%M UTC",
          time.gmtime()), open("/proc/loadavg").read().split()[0]), flush=True)
    for name in only:
        ATTACKS[name]()


if __name__ == "__main__":
    main()
