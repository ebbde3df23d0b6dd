"""test_hardening.py - the daemon against clients and pages that misbehave (issue 13,
section 2: defects 1, 2, 3, 6, 7, 8 and HEAD), each against the real daemon.

- Clients that pipeline requests and never read lose their connection slots after the
  send timeout (before: 16 of them held every slot of --max-connections 16 forever).
- A SIGTERM drain delivers every accepted answer in full to slow readers (a big
  /tokenize body, a stream up to [DONE]) and exits 0; when the drain timeout cuts one,
  the log names it with its bytes and the exit status is 3.
- The request-smuggling example from the audit is refused with one 400 and a close.
- Host and Origin checks, CORS preflight, 415 for the body types a page can send
  without a preflight; the README's curl commands still work; no path in /v1/models.
- The API key is checked on the headers (no 100 Continue, no body read); request
  bodies buffered across connections have a cap (503).
- A client that half-closes after its request gets the answer (/v1/completions,
  /tokenize, /v1/kv), and HEAD answers on every GET route like GET without the body.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvd_e2e import Daemon, check_error, http_request, run_tests, wait_until  # noqa: E402

GREEDY = {"temperature": 0}


def connect(d, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect(("127.0.0.1", d.port))
    return s


def read_all(s):
    out = b""
    while True:
        try:
            chunk = s.recv(1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def split_response(raw):
    """(status, headers dict, body) of the first final Content-Length response in raw."""
    while raw.startswith(b"HTTP/1.1 100 "):  # an interim response (the half-close probe)
        raw = raw.partition(b"\r\n\r\n")[2]
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, rest


def test_pipelining_non_readers_lose_their_slots():
    with Daemon("--kv-cache-mb", "2", "--max-connections", "16", "--send-timeout-ms", "1000",
                "--socket-send-buffer-bytes", "16384") as d:
        hogs = []
        for _ in range(16):
            s = connect(d, rcvbuf=4096)
            s.sendall(http_request("GET", "/chat.js") * 400)  # 5 MB of answers, never read
            hogs.append(s)
        # Every slot is taken for a moment; once the send timeout passes, each hog is
        # cut and a fresh client is served (before: 503 for as long as the hogs lived).
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _ = d.get("/health")
            except (ConnectionError, OSError):
                status = None
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200, status
        wait_until(lambda: len(re.findall(r"response cut \(client not reading or gone\): GET /chat.js", d.output()))
                   >= 16, 20, "16 cut lines")
        for s in hogs:
            s.close()
        wait_until(lambda: d.metrics()["kvd:http_connections"] <= 2, 10, "the hogs closed")


def _tokenize_body(words):
    return json.dumps({"prompt": " ".join("w%d" % i for i in range(words))}).encode()


def test_sigterm_drain_delivers_whole_answers():
    with Daemon("--kv-cache-mb", "4", "--socket-send-buffer-bytes", "8192") as d:
        # A /tokenize answer of several MB to a client that reads nothing until the
        # drain has begun.
        body = _tokenize_body(40000)
        big = connect(d, rcvbuf=4096)
        big.sendall(http_request("POST", "/tokenize", body, {"Content-Type": "application/json"}))
        # A stream whose events pile up unread.
        stream = connect(d, rcvbuf=4096)
        req = json.dumps(dict(GREEDY, prompt="Drain me", max_tokens=200, ignore_eos=True, stream=True)).encode()
        stream.sendall(http_request("POST", "/v1/completions", req, {"Content-Type": "application/json"}))
        d.wait_for_line(r"POST /tokenize 200", 60)
        d.wait_for_line(r"POST /v1/completions 200", 60)
        d.signal(signal.SIGTERM)
        d.wait_for_line("draining", 10)
        time.sleep(0.5)  # main closed both sockets here, with most of both answers unsent
        raw = read_all(big)
        status, headers, answer = split_response(raw)
        assert status == 200 and len(answer) == int(headers["content-length"]), (status, len(answer), headers)
        assert len(answer) > 200000, len(answer)
        assert len(json.loads(answer)["tokens"]) > 40000
        raw = read_all(stream)
        assert raw.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), raw[-200:]
        assert d.wait_exit(30) == 0
        assert "response cut" not in d.output(), d.output()
    # Cut by the drain timeout: the log says which answer and how much of it went out,
    # and the exit status says the drain was not clean.
    with Daemon("--kv-cache-mb", "4", "--socket-send-buffer-bytes", "8192", "--drain-timeout-s", "1") as d:
        big = connect(d, rcvbuf=4096)
        big.sendall(http_request("POST", "/tokenize", _tokenize_body(40000), {"Content-Type": "application/json"}))
        d.wait_for_line(r"POST /tokenize 200", 60)
        d.signal(signal.SIGTERM)
        assert d.wait_exit(30) == 3
        line = d.wait_for_line(r"response cut by shutdown: POST /tokenize status 200, \d+ of \d+ bytes written", 10)
        sent, meant = map(int, re.search(r"(\d+) of (\d+) bytes", line).groups())
        assert sent < meant, line
        big.close()


def test_request_smuggling_refused():
    with Daemon("--kv-cache-mb", "2") as d:
        attacks = [
            # Any two bytes in place of the CRLF after chunk data (the audit's example).
            b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n10\r\n{\"prompt\":\"abc\"}ZZ0\r\n\r\n"
            b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 16\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: b\r\n c\r\n\r\n",
            b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length : 16\r\n\r\n{\"prompt\":\"abc\"}",
            b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"fffffff\r\n",
        ]
        for attack in attacks:
            s = connect(d)
            s.sendall(attack)
            raw = read_all(s)
            s.close()
            assert raw.count(b"HTTP/1.1 ") == 1, raw
            status, _, body = split_response(raw)
            assert status in (400, 413), raw
            assert isinstance(check_error(json.loads(body))["code"], str)
        assert "GET /v1/models" not in d.output()
        assert d.get("/health")[0] == 200


def test_browser_pages_cannot_drive_the_daemon():
    with Daemon("--kv-cache-mb", "2", "--allowed-origins", "https://app.example") as d:
        own = "http://127.0.0.1:%d" % d.port
        completion = json.dumps(dict(GREEDY, prompt="x", max_tokens=1))
        # DNS rebinding: the page's own host name in Host.
        status, _, body = d.request("GET", "/v1/models", headers={"Host": "rebind.example:%d" % d.port})
        assert status == 403 and check_error(json.loads(body), None, "host_not_allowed")
        for host in ("localhost:%d" % d.port, "127.0.0.1", "[::1]:%d" % d.port):
            assert d.request("GET", "/health", headers={"Host": host})[0] == 200, host
        # Another site's page: refused before the handler, whatever the type.
        for ctype in ("text/plain", "application/json", "application/x-www-form-urlencoded"):
            status, _, body = d.request("POST", "/v1/completions", completion.encode(),
                                        {"Origin": "https://evil.example", "Content-Type": ctype})
            assert status == 403 and check_error(json.loads(body), None, "origin_not_allowed"), (ctype, body)
        # Simple requests (no preflight) of any origin never reach a JSON route.
        status, _, body = d.request("POST", "/v1/completions", completion.encode(), {"Content-Type": "text/plain"})
        assert status == 415 and check_error(json.loads(body), None, "unsupported_media_type")
        status, _, _ = d.request("POST", "/v1/completions", completion.encode(),
                                 {"Origin": own, "Content-Type": "application/x-www-form-urlencoded"})
        assert status == 415
        # The daemon's own chat page (same origin, JSON) works, without CORS headers.
        status, head, _ = d.request("POST", "/v1/completions", completion.encode(),
                                    {"Origin": own, "Content-Type": "application/json"})
        assert status == 200 and "access-control-allow-origin" not in head
        # A listed origin: preflight, then the request, with CORS headers.
        status, head, _ = d.request("OPTIONS", "/v1/chat/completions", None,
                                    {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                     "Access-Control-Request-Headers": "authorization, content-type"})
        assert status == 204, head
        assert head["access-control-allow-origin"] == "https://app.example"
        assert "POST" in head["access-control-allow-methods"]
        assert head["access-control-allow-headers"] == "authorization, content-type"
        assert int(head["access-control-max-age"]) > 0
        status, head, _ = d.request("POST", "/v1/completions", completion.encode(),
                                    {"Origin": "https://app.example", "Content-Type": "application/json"})
        assert status == 200 and head["access-control-allow-origin"] == "https://app.example"
        assert "Origin" in head["vary"]
        # The README's commands: curl -d sends form-urlencoded and no Origin.
        if shutil.which("curl"):
            out = subprocess.run(["curl", "-s", "localhost:%d/v1/chat/completions" % d.port, "-d",
                                  '{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}'],
                                 capture_output=True, timeout=60, check=True).stdout
            assert json.loads(out)["object"] == "chat.completion", out
            out = subprocess.run(["curl", "-sN", "localhost:%d/v1/completions" % d.port, "-d",
                                  '{"prompt": "Once upon a time", "max_tokens": 4, "stream": true}'],
                                 capture_output=True, timeout=60, check=True).stdout
            assert out.endswith(b"data: [DONE]\n\n"), out
        # No filesystem path in API answers.
        status, body = d.get("/v1/models")
        assert status == 200 and d.model.encode() not in body and b"/" not in body, body


def test_api_key_before_body_and_buffered_cap():
    with Daemon("--kv-cache-mb", "2", "--api-key", "sk-1", "--max-body-bytes", "4194304",
                "--max-buffered-body-bytes", "8388608", "--body-timeout-ms", "60000") as d:
        s = connect(d)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 4000000\r\nExpect: 100-continue\r\n\r\n")
        raw = read_all(s)
        s.close()
        assert raw.startswith(b"HTTP/1.1 401 "), raw[:100]  # no 100 Continue first
        status, head, body = split_response(raw)
        assert head["www-authenticate"] == "Bearer" and head["connection"] == "close"
        check_error(json.loads(body), None, "invalid_api_key")
        # Two stalled 4 MB bodies (with the key) fill the 8 MiB of buffered bodies;
        # a third is refused at once instead of adding 4 MB more.
        head = (b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 4000000\r\n\r\n")
        stalled = []
        for _ in range(2):
            s = connect(d)
            s.sendall(head + b"{\"prompt\": \"" + b"a" * 1000)
            stalled.append(s)
        time.sleep(0.3)
        s = connect(d)
        s.sendall(head)
        status, head_, body = split_response(read_all(s))
        s.close()
        assert status == 503 and head_["retry-after"] == "1", (status, body)
        check_error(json.loads(body), None, "server_busy")
        for s in stalled:
            s.close()
        # Released with their connections.
        wait_until(lambda: d.post("/tokenize", {"prompt": "x"}, headers={"Authorization": "Bearer sk-1"})[0] == 200,
                   10, "a request after the stalled bodies left")


def test_half_close_gets_the_answer():
    with Daemon("--kv-cache-mb", "2") as d:
        requests = [
            ("POST", "/v1/completions", json.dumps(dict(GREEDY, prompt="Hi", max_tokens=4)).encode()),
            ("POST", "/tokenize", b'{"prompt": "Hello"}'),
            ("GET", "/v1/kv", b""),
        ]
        for method, path, body in requests:
            s = connect(d)
            hdrs = {"Content-Type": "application/json"} if body else {}
            s.sendall(http_request(method, path, body, hdrs))
            s.shutdown(socket.SHUT_WR)
            raw = read_all(s)
            s.close()
            status, head, answer = split_response(raw)
            # Connection: close when the end of input was read before the answer went out.
            assert status == 200, (path, raw[:200])
            assert len(answer) == int(head["content-length"]) and json.loads(answer), path
        assert " 499 " not in d.output(), d.output()


def test_head_on_get_routes():
    with Daemon("--kv-cache-mb", "2") as d:
        for path in ("/health", "/v1/models", "/metrics", "/", "/chat.js", "/v1/kv"):
            s = connect(d)
            s.sendall(http_request("HEAD", path) + http_request("GET", "/health"))
            raw = b""
            while raw.count(b"\r\n\r\n") < 2 or not raw.endswith(b'{"status":"ok"}'):
                chunk = s.recv(65536)
                assert chunk, raw
                raw += chunk
            s.close()
            head, _, rest = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), (path, head)
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
            assert length > 0 and rest.startswith(b"HTTP/1.1 200 "), (path, rest[:80])  # no body after HEAD
            if path not in ("/metrics", "/v1/models", "/v1/kv"):  # these change between two calls
                status, get_head, body = d.request("GET", path)
                assert status == 200 and len(body) == length, (path, len(body), length)


def thread_nice_values(pid):
    """{thread id: nice value} of a process's threads, from /proc (field 19 of stat)."""
    nice = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        nice[int(tid)] = int(fields[16])
    return nice


def test_request_work_runs_below_the_engine():
    """Bodies are parsed and answers built on libuv's workers 10 nice steps below the
    daemon (at most 19, also when the daemon itself runs under nice), so a burst of
    such work cannot take the cores from the engine's threads (and the running streams'
    token gaps); the threads that existed before the first request (loop, engine) stay
    at the daemon's own priority."""
    with Daemon() as d:
        before = thread_nice_values(d.proc.pid)
        base = before[d.proc.pid]  # whatever nice value the test runner gave the daemon
        assert set(before.values()) == {base}, before
        status, body = d.post("/tokenize", {"prompt": "Hello " * 2000})
        assert status == 200 and len(body["tokens"]) >= 2000, status
        after = thread_nice_values(d.proc.pid)
        assert all(after[tid] == base for tid in before if tid in after), (before, after)
        workers = [tid for tid in after if tid not in before]
        assert workers and min(base + 10, 19) in [after[tid] for tid in workers], (before, after)


if __name__ == "__main__":
    run_tests(globals())
