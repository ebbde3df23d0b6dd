#!/usr/bin/env python3
"""test_security.py - the exposure a default daemon has, checked against the real thing.

    python3 tests/soak/test_security.py BUILD_DIR

  - bind: without --host the only listening socket of the process is 127.0.0.1
    (read from /proc/net/tcp{,6} through the daemon's own socket inodes);
  - API key (given in a config file, the way that keeps it out of `ps`): /v1/* and
    /tokenize, /detokenize refuse a missing, wrong, truncated or extended key with
    401 and accept the right one; /health and /metrics stay open; the key never
    appears in the daemon's output;
  - limits: header bytes (431), body bytes (413), n, max_tokens, prompt length, stop
    strings (count and bytes) and stop_token_ids (count) are refused with 4xx and the
    field named; connection count is covered by test_slow_clients.py;
  - no path from a request to the filesystem: traversal-looking URLs are 404 and
    never return file contents, a file path as "model" is an unknown model (404), and no
    source file of server/ except config.c (the --config file, read once at start)
    calls a file-opening function.
The constant-time comparison itself is reviewed, not timed (docs/hardening.md).
"""

import json
import os
import re
import tempfile

import soaklib
from soaklib import check

build = soaklib.build_dir_from_argv()
KEY = "sk-kvd-test-0123456789abcdef"
state = {}


def kvd():
    return state["kvd"]


def start():
    soaklib.require_daemon(build)
    fd, path = tempfile.mkstemp(prefix="kvd-security-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"api_key": KEY, "max_body_bytes": 65536, "max_header_bytes": 8192}, f)
    os.chmod(path, 0o600)
    state["config"] = path
    state["kvd"] = soaklib.Daemon(build, "--config", path).start()


def listening_addresses(pid):
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            m = re.match(r"socket:\[(\d+)\]", os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                found.append(cols[1])
    return found


def check_bind():
    found = listening_addresses(kvd().pid)
    want = "0100007F:%04X" % kvd().port
    check(found == [want], "listening sockets %s (want only 127.0.0.1:%d = %s)" % (found, kvd().port, want))


def auth(value):
    return {"Authorization": value} if value is not None else {}


def check_api_key():
    k = kvd()
    body = {"prompt": "hi", "max_tokens": 2}
    for value in (None, "", "Bearer", "Bearer ", "Bearer " + KEY[:-1], "Bearer " + KEY + "x",
                  "Bearer " + KEY.upper(), "Basic " + KEY, KEY, "Bearer " + "x" * len(KEY)):
        for method, path, payload in (("POST", "/v1/completions", body), ("GET", "/v1/models", None),
                                      ("POST", "/tokenize", {"prompt": "x"}), ("GET", "/v1/kv", None)):
            status, _, raw = k.request(method, path, payload, headers=auth(value))
            check(status == 401, "%s %s with Authorization %r answered %d: %r" % (method, path, value, status, raw[:200]))
    for value in ("Bearer " + KEY, "bearer " + KEY, "Bearer  " + KEY):
        status, _, raw = k.request("POST", "/v1/completions", body, headers=auth(value))
        check(status == 200, "right key %r answered %d: %r" % (value, status, raw[:200]))
    for path in ("/health", "/metrics"):
        status, _, _ = k.request("GET", path)
        check(status == 200, "%s without a key answered %d" % (path, status))
    check(KEY not in k.output(), "the API key appears in the daemon's output")


def check_limits():
    k = kvd()
    h = auth("Bearer " + KEY)

    def refused(body, field, path="/v1/completions"):
        status, _, raw = k.request("POST", path, body, headers=h)
        check(400 <= status < 500, "%s: answered %d (want 4xx)" % (field, status))
        err = json.loads(raw)["error"]
        check(field in (err.get("param") or "") + err.get("message", ""),
              "%s: error does not name it: %s" % (field, err))

    refused({"prompt": "x", "n": 17}, "n")
    refused({"prompt": "x", "max_tokens": 10 ** 7}, "max_tokens")
    refused({"prompt": [1] * 5000}, "prompt")
    refused({"prompt": "x", "stop": ["s%d" % i for i in range(17)]}, "stop")
    refused({"prompt": "x", "stop": "y" * 257}, "stop")
    refused({"prompt": "x", "stop_token_ids": list(range(65))}, "stop_token_ids")
    refused({"messages": [{"role": "user", "content": "x"}], "n": 100}, "n", "/v1/chat/completions")
    s = soaklib.connect(k.port)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    status, _ = soaklib.read_response(s, 30)
    s.close()
    check(status == 431, "9000-byte header (limit 8192) answered %s" % status)
    status, _, _ = k.request("POST", "/v1/completions", b'{"prompt": "' + b"a" * 70000 + b'"}', headers=h)
    check(status == 413, "70000-byte body (limit 65536) answered %d" % status)


def check_no_filesystem():
    k = kvd()
    h = auth("Bearer " + KEY)
    for path in ("/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd", "/v1/../../etc/passwd",
                 "/web/..%2f..%2fconfig.json", "/" + state["config"], "/fixtures/tiny/config.json"):
        s = soaklib.connect(k.port)
        s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, raw = soaklib.read_response(s, 30)
        s.close()
        check(status in (400, 404), "GET %s answered %s" % (path, status))
        check(b"root:" not in raw and KEY.encode() not in raw and b"num_hidden_layers" not in raw,
              "GET %s returned file contents: %r" % (path, raw[:300]))
    status, _, raw = k.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "model": "/etc/passwd"},
                               headers=h)
    # A model the daemon does not serve is 404 model_not_found (the message quotes the
    # name the client sent, nothing read from disk).
    check(status == 404 and b"root:" not in raw and b"model_not_found" in raw,
          "a file path as model: %d %r" % (status, raw[:300]))
    server_dir = os.path.join(soaklib.SOURCE_ROOT, "server")
    opener = re.compile(r"\b(fopen|freopen|open|openat|opendir|creat|mkstemp|realpath|stat|lstat|unlink|rename)\s*\(")
    offenders = []
    for name in sorted(os.listdir(server_dir)):
        # config.c reads the config file, chat_load.c the chat template: at start-up only
        if not name.endswith(".c") or name in ("config.c", "chat_load.c"):
            continue
        with open(os.path.join(server_dir, name), encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if opener.search(line.split("//")[0]) and not line.lstrip().startswith(("*", "/*")):
                    offenders.append("server/%s:%d: %s" % (name, lineno, line.strip()))
    check(not offenders, "file access in request-serving code:\n" + "\n".join(offenders))


def stop():
    status = kvd().stop()
    os.unlink(state["config"])
    kvd().check_clean_exit(status)


try:
    soaklib.run([("start", start), ("binds loopback by default", check_bind), ("API key", check_api_key),
                 ("limits", check_limits), ("no path to the filesystem", check_no_filesystem), ("SIGTERM", stop)])
finally:
    if "kvd" in state:
        state["kvd"].kill()
