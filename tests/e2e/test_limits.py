"""test_limits.py - kvd's limits and refusals end to end: body and header sizes,
timeouts (headers, a trickled body), connection cap, API key, queue full (429),
malformed HTTP and garbage.

Each group runs its own daemon with the flags or config file that make the limit
small enough to hit. Waits are for events (a response, a closed socket), bounded by
generous socket timeouts; nothing asserts a duration.
"""

import json
import os
import random
import select
import socket
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvd_e2e import Daemon, check_error, http_request, run_tests, wait_until  # noqa: E402

GREEDY = {"temperature": 0, "repetition_penalty": 1.0, "ignore_eos": True}


def test_body_and_header_limits_from_config_file():
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"max_body_bytes": 2048, "max_header_bytes": 1024, "header_timeout_ms": 300,
                   "kv_cache_mb": 2}, f)
        path = f.name
    try:
        with Daemon("--config", path) as d:
            # 413 from Content-Length alone, before any body byte is sent.
            raw = d.raw()
            raw.send(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2049\r\n"
                     b"Expect: 100-continue\r\n\r\n")
            status, head, body = raw.read_response()
            assert status == 413 and head["connection"] == "close", (status, head)
            check_error(json.loads(body))
            assert raw.at_eof()
            raw.close()
            # 413 as a chunked body grows past the limit.
            raw = d.raw()
            raw.send(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            raw.send(b"400\r\n" + b"a" * 1024 + b"\r\n")
            raw.send(b"400\r\n" + b"b" * 1024 + b"\r\n")
            raw.send(b"1\r\nc\r\n")
            status, head, body = raw.read_response()
            assert status == 413, status
            assert raw.at_eof()
            raw.close()
            # A body just under the limit is fine.
            prompt = "x" * 1900
            status, resp = d.post("/tokenize", {"prompt": prompt})
            assert status == 200, resp
            # 431 for headers over the limit.
            raw = d.raw()
            raw.send(b"GET /health HTTP/1.1\r\nX-Long: " + b"h" * 1100 + b"\r\n\r\n")
            status, head, body = raw.read_response()
            assert status == 431, status
            raw.close()
            # Header timeout (300 ms configured): a request line with no end of headers.
            raw = d.raw()
            raw.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            status, head, body = raw.read_response()
            assert status == 408, status
            assert raw.at_eof()
            raw.close()
            # A silent connection is closed the same way.
            raw = d.raw()
            status, head, body = raw.read_response()
            assert status == 408
            raw.close()
            assert d.get("/health")[0] == 200
    finally:
        os.unlink(path)


def test_trickled_body_408():
    # A byte every 50 ms keeps re-arming the idle timer (60 s by default), so only the
    # body deadline, counted from the end of the headers, can end this request: the
    # whole body would take 15 s at that pace.
    with Daemon("--kv-cache-mb", "2", "--body-timeout-ms", "400") as d:
        body = json.dumps({"prompt": "x" * 300}).encode()
        head = (b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        raw = d.raw()
        raw.send(head)
        sent = 0
        while sent < len(body) and not select.select([raw.sock], [], [], 0.05)[0]:
            raw.send(body[sent:sent + 1])
            sent += 1
        assert sent < len(body), "the whole body was accepted at one byte per 50 ms"
        status, headers, resp = raw.read_response()
        assert status == 408 and headers["connection"] == "close", (status, headers)
        err = check_error(json.loads(resp))
        assert err["message"] == "request body not complete within 400 ms after its headers", err
        assert err["code"] == "request_timeout", err
        assert raw.at_eof()
        raw.close()
        # The same body sent promptly, in one write or two, is well within the deadline.
        for parts in ([head + body], [head, body]):
            raw = d.raw()
            for part in parts:
                raw.send(part)
            status, headers, resp = raw.read_response()
            assert status == 200, (status, resp)
            assert json.loads(resp)["count"] > 0, resp
            raw.close()
        assert d.get("/health")[0] == 200


def test_malformed_http_and_garbage():
    with Daemon("--kv-cache-mb", "2") as d:
        raw = d.raw()
        raw.send(b"GET / HTTP/9.9\r\n\r\n")
        status, head, body = raw.read_response()
        assert status == 400 and head["connection"] == "close"
        assert "malformed HTTP request" in json.loads(body)["error"]["message"]
        assert raw.at_eof()
        raw.close()
        raw = d.raw()
        raw.send(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
        status, head, body = raw.read_response()
        assert status == 400
        raw.close()
        # Random bytes and random JSON never take the daemon down.
        rng = random.Random(7)
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
            try:
                if i % 2:
                    s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600))))
                else:
                    junk = rng.choice([b'{"prompt": [1e999]}', b'{"prompt": {"a": []}}', b'[]', b'null',
                                       b'{"messages": [{"role": "user", "content": [null]}]}',
                                       b'{"prompt": "x", "stop": [' + b'"a",' * 50 + b'"b"]}',
                                       b'{"prompt": "\\ud800"}', b'{"prompt": "x", "max_tokens": -1}'])
                    path = rng.choice([b"/v1/completions", b"/v1/chat/completions", b"/tokenize", b"/detokenize"])
                    s.sendall(b"POST " + path + b" HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(junk) + junk)
                    first = s.recv(64)
                    assert first.startswith(b"HTTP/1.1 "), first
                    assert first[9:12] in (b"400", b"200"), first
            except (ConnectionResetError, BrokenPipeError):
                pass
            finally:
                s.close()
        assert d.get("/health")[0] == 200
        assert d.proc.poll() is None


def test_api_key():
    with Daemon("--kv-cache-mb", "2", "--api-key", "sk-test-123") as d:
        status, body = d.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert status == 401
        assert check_error(body, None, "invalid_api_key")
        status, body = d.post("/v1/completions", {"prompt": "x", "max_tokens": 1},
                              headers={"Authorization": "Bearer sk-test-124"})
        assert status == 401
        status, head, body = d.request("GET", "/v1/models", headers={"Authorization": "Basic c2stdGVzdC0xMjM="})
        assert status == 401 and head["www-authenticate"] == "Bearer"
        status, body = d.post("/v1/completions", dict(GREEDY, prompt="x", max_tokens=1),
                              headers={"Authorization": "Bearer sk-test-123"})
        assert status == 200, body
        status, body = d.post("/tokenize", {"prompt": "x"})
        assert status == 401
        # Probes stay open: health checks and scrapes carry no secrets.
        assert d.get("/health")[0] == 200
        assert d.get("/metrics")[0] == 200


def test_queue_full_429():
    with Daemon("--kv-cache-mb", "2", "--max-num-seqs", "1", "--max-queue", "1") as d:
        long_req = dict(GREEDY, prompt="Long one", max_tokens=3000, stream=True)
        # The first request runs (its first chunk proves it), the second waits; a third
        # finds the waiting queue full.
        c1 = d.conn()
        c1.request("POST", "/v1/completions", body=json.dumps(long_req), headers={"Content-Type": "application/json"})
        r1 = c1.getresponse()
        assert r1.status == 200
        r1.fp.readline()
        results = {}

        def second():
            results["second"] = d.post("/v1/completions", dict(GREEDY, prompt="waits", max_tokens=2))

        t = threading.Thread(target=second)
        t.start()
        wait_until(lambda: d.metrics()["kvd:num_requests_waiting"] >= 1, 30, "a waiting request")
        status, head, body = d.request("POST", "/v1/completions", dict(GREEDY, prompt="third", max_tokens=2))
        assert status == 429, (status, body)
        assert head["retry-after"] == "1", head
        check_error(json.loads(body), None, "queue_full")
        c1.close()  # the disconnect cancels the long request; the waiting one then runs
        t.join(60)
        assert results["second"][0] == 200, results
        assert results["second"][1]["usage"]["completion_tokens"] == 2


def test_max_connections():
    with Daemon("--kv-cache-mb", "2", "--max-connections", "2") as d:
        a, b = d.raw(), d.raw()
        a.send(http_request("GET", "/health"))
        assert a.read_response()[0] == 200
        b.send(http_request("GET", "/health"))
        assert b.read_response()[0] == 200
        c = d.raw()
        status, head, body = c.read_response()
        assert status == 503 and "too many open connections" in json.loads(body)["error"]["message"]
        assert c.at_eof()
        c.close()
        a.close()
        # A freed slot is usable again.
        wait_until(lambda: _health_on_new_connection(d) == 200, 30, "a free connection slot")
        b.close()


def _health_on_new_connection(d):
    raw = d.raw()
    try:
        raw.send(http_request("GET", "/health"))
        return raw.read_response()[0]
    except (EOFError, ConnectionResetError):
        return None
    finally:
        raw.close()


if __name__ == "__main__":
    run_tests(globals())
