"""test_daemon.py - the daemon's own defects end to end (issue 13): the memory one
request may cost, the loop never stalled by building a large answer, /version and
/v1/models/{id}, the model name check, host names to listen on, SIGTERM while the
model loads, a second quick SIGTERM, a model path that is a symlink loop.

Every test starts the real daemon on the tiny fixture. Waits are for events, bounded
by generous timeouts; nothing asserts a duration except where the duration is the
defect (a stalled loop), and there the bound is seconds where the fix gives
milliseconds.
"""

import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvd_e2e import KVD, Daemon, check_error, run_tests, tiny_model, wait_until  # noqa: E402

GREEDY = {"temperature": 0, "repetition_penalty": 1.0, "ignore_eos": True}


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


# ---- defect 4: the memory one request can cost ----

def test_huge_whole_response_refused_before_any_work():
    # n=16 x max_tokens 4000 x 21 logprob entries: a >100 MB body on main.
    with Daemon() as d:
        before = rss_mib(d.proc.pid)
        body = {"messages": [{"role": "user", "content": "hi"}], "n": 16, "max_tokens": 4000,
                "logprobs": True, "top_logprobs": 20}
        body.update(GREEDY)
        status, resp = d.post("/v1/chat/completions", body, timeout=30)
        assert status == 400, (status, resp)
        err = check_error(resp, "top_logprobs", "response_too_large")
        assert "max_response_bytes 33554432" in err["message"], err
        assert '"stream": true' in err["message"], err
        # The same request streamed is not refused (its memory is the write queue's).
        status, head, events = d.stream("/v1/chat/completions",
                                        dict(body, n=1, max_tokens=3, stream=True), timeout=60)
        assert status == 200 and events[-1] == "[DONE]", (status, events[-3:])
        assert rss_mib(d.proc.pid) < before + 64, (before, rss_mib(d.proc.pid))


def test_logprobs_that_print_larger_than_the_bound_are_refused():
    # Logprobs are held raw while generating (counted at 32 bytes an entry: 100 x 32 <
    # 4096) and printed on the worker that builds the body, where these come to more
    # than 4096 bytes: the answer is the same 400 as when the bound is passed mid-way.
    with Daemon("--max-response-bytes", "4096") as d:
        body = {"prompt": "hello", "max_tokens": 100, "logprobs": 0, "ignore_eos": True}
        body.update(GREEDY)
        status, resp = d.post("/v1/completions", body, timeout=120)
        assert status == 400, (status, resp)
        err = check_error(resp, None, None)
        assert "outgrew max_response_bytes 4096" in err["message"], err
        status, resp = d.post("/v1/completions", dict(body, max_tokens=4), timeout=60)
        assert status == 200 and len(resp["choices"][0]["logprobs"]["token_logprobs"]) == 4, (status, resp)


def test_response_that_outgrows_the_bound_is_stopped():
    # Passes the estimate (1 byte per token: 2 x 1000 < 4096) but every token prints
    # several bytes, so the answer outgrows 4096 bytes while generating.
    with Daemon("--max-response-bytes", "4096") as d:
        body = {"prompt": "hello", "n": 2, "max_tokens": 1000}
        body.update(GREEDY)
        status, resp = d.post("/v1/completions", body, timeout=120)
        assert status == 400, (status, resp)
        err = check_error(resp, None, None)
        assert "outgrew max_response_bytes 4096" in err["message"], err
        # The engine let go of the request: its blocks are free, the next one runs.
        status, resp = d.post("/v1/completions", dict(body, n=1, max_tokens=4), timeout=60)
        assert status == 200 and resp["usage"]["completion_tokens"] == 4, (status, resp)
        wait_until(lambda: d.metrics().get("kvd:num_requests_running", 0) == 0, 30, "no running request")


# ---- defect 5: no answer that grows with the input is built on the loop thread ----

def _loop_metrics(d):
    m = d.metrics()
    return (m["kvd:event_loop_iteration_cpu_seconds_count"],
            m['kvd:event_loop_iteration_cpu_seconds_bucket{le="0.25"}'],
            m["kvd:event_loop_iteration_cpu_max_seconds"])


def test_large_answers_do_not_stall_the_loop():
    # On main, one n=16 x 300-token logprobs answer (8 MB) built on the loop froze a
    # running stream for 2.7 s, three 4 MB /tokenize answers for 3.2 s. Here (2 MB
    # prompts and a 4 MB answer, small enough for a sanitizer build) the daemon's loop
    # never spends a quarter second of CPU on one iteration, and the stream never
    # stops for long (the client-side bound is loose: a loaded machine's, not ours).
    with Daemon("--max-body-bytes", str(3 << 20)) as d:
        words = ("alpha beta gamma delta river stone cloud lamp " * 50000)[: 2 << 20]
        heavy = [("/tokenize", {"prompt": words}), ("/tokenize", {"prompt": words[::-1]}),
                 ("/v1/chat/completions", dict({"messages": [{"role": "user", "content": "x"}], "n": 16,
                                                "max_tokens": 150, "logprobs": True, "top_logprobs": 20},
                                               **GREEDY))]
        bodies = [(path, json.dumps(body).encode()) for path, body in heavy]
        gaps, measuring, done = [], threading.Event(), threading.Event()
        started = threading.Event()

        def stream():
            c = d.conn(300)
            body = dict({"prompt": "hello", "max_tokens": 4000, "stream": True}, **GREEDY)
            c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
            r = c.getresponse()
            last = None
            while not done.is_set():
                line = r.fp.readline()
                if not line:
                    break
                if line.startswith(b"data: "):
                    now = time.monotonic()
                    started.set()
                    if last is not None and measuring.is_set():
                        gaps.append(now - last)
                    last = now
            c.close()

        statuses = []

        def send(path, body):
            c = d.conn(900)
            c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            while r.read(65536):
                pass
            statuses.append(r.status)
            c.close()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert started.wait(60), "the stream never started"
        before = _loop_metrics(d)
        measuring.set()
        senders = [threading.Thread(target=send, args=b, daemon=True) for b in bodies]
        for t in senders:
            t.start()
        for t in senders:
            t.join(900)
        measuring.clear()
        after = _loop_metrics(d)
        done.set()
        assert statuses == [200, 200, 200], statuses
        # The daemon's own measure first: CPU time of the loop thread per iteration,
        # which a busy machine does not inflate.
        slow = (after[0] - before[0]) - (after[1] - before[1])
        assert slow == 0 and after[2] < 0.25, (before, after)
        # What a client sees also depends on the machine (seconds under a sanitizer
        # at load 20): only a gross stall is refused here.
        assert gaps, "no stream events while the answers were built"
        assert max(gaps) < 10, "stream stalled %.2f s" % max(gaps)


# ---- defect 11: /version, /v1/models/{id}, the model name, host names ----

def _project_version():
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "meson.build")) as f:
        return re.search(r"version\s*:\s*'([^']+)'", f.read()).group(1)


def test_version_and_model_routes():
    with Daemon("--served-model-name", "tiny-a, alias-b") as d:
        status, body = d.get("/version")
        assert status == 200 and json.loads(body) == {"version": _project_version()}, (status, body)
        status, body = d.get("/v1/models")
        listed = json.loads(body)["data"]
        assert [m["id"] for m in listed] == ["tiny-a"], listed
        assert "/" not in json.dumps(listed), listed  # no filesystem path
        for name in ("tiny-a", "alias-b"):
            status, body = d.get("/v1/models/" + name)
            model = json.loads(body)
            assert status == 200 and model["id"] == name and model["object"] == "model", (status, body)
        status, body = d.get("/v1/models/gpt-4o")
        check_error(json.loads(body), "model", "model_not_found")
        assert status == 404, status
        chat = dict({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, **GREEDY)
        for name in ("tiny-a", "alias-b", None):
            body = dict(chat, model=name) if name else chat
            status, resp = d.post("/v1/chat/completions", body)
            assert status == 200 and resp["model"] == "tiny-a", (name, status, resp)
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                           ("/tokenize", {"prompt": "x"})):
            status, resp = d.post(path, dict(body, model="gpt-4o"))
            err = check_error(resp, "model", "model_not_found")
            assert status == 404 and "gpt-4o" in err["message"] and "tiny-a" in err["message"], (path, resp)
            assert err["type"] == "not_found_error", err


def test_host_names():
    with Daemon("--host", "localhost", wait_ready=True) as d:
        c = http.client.HTTPConnection("localhost", d.port, timeout=30)
        c.request("GET", "/health")
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
        c.close()
        assert re.search(r"listening on http://localhost:%d " % d.port, d.output()), d.output_tail()
    proc = subprocess.run([KVD, "--model", tiny_model(), "--port", "0", "--host", "no-such-host.invalid"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stdout)
    assert 'cannot resolve "no-such-host.invalid"' in proc.stdout, proc.stdout


# ---- the knob table drives flags, files, --help and the docs ----

def test_knob_table_drives_config_file_and_docs():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    listing = subprocess.run([KVD, "--print-knobs", "json"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    defaults = json.loads(listing.stdout)
    with open(os.path.join(root, "configs", "default.json")) as f:
        shipped = json.load(f)
    # The shipped file names a model directory; every other value is the default.
    assert shipped.pop("model") and defaults.pop("model") == "", shipped
    assert shipped == defaults, "configs/default.json differs from kvd --print-knobs json: %r" % (
        set(shipped.items()) ^ set(defaults.items()))
    table = subprocess.run([KVD, "--print-knobs", "md"], capture_output=True, text=True, timeout=60).stdout
    with open(os.path.join(root, "docs", "operations.md")) as f:
        docs = f.read()
    assert table in docs, "docs/operations.md's knob table differs from kvd --print-knobs md"
    help_text = subprocess.run([KVD, "--help"], capture_output=True, text=True, timeout=60).stdout
    for key in defaults:
        assert "--" + key.replace("_", "-") in help_text, key


# ---- defect 15: signals while loading, a second quick SIGTERM, a symlink loop ----

def test_sigterm_while_the_loader_is_blocked():
    # tokenizer.json is a FIFO nobody writes: the loader blocks in open() for ever.
    # On main the daemon answered 503 and ignored SIGTERM until killed.
    tiny = tiny_model()
    with tempfile.TemporaryDirectory() as tmp:
        for name in os.listdir(tiny):
            if name != "tokenizer.json":
                os.symlink(os.path.join(tiny, name), os.path.join(tmp, name))
        os.mkfifo(os.path.join(tmp, "tokenizer.json"))
        with Daemon(model=tmp, wait_ready=False) as d:
            status, body = d.get("/health")
            assert status == 503 and json.loads(body)["error"]["code"] == "loading", (status, body)
            d.signal(signal.SIGTERM)
            assert d.wait_exit(30) == 0, d.output_tail()
            d.wait_for_line("stopping without waiting for the model loader", 10)


def test_second_quick_sigterm_still_exits_cleanly():
    # Two SIGTERMs back to back (a supervisor and a process-group kill, say): the
    # second lands while the first one's shutdown runs. On main that second signal
    # found the default action restored and killed the daemon (exit -15 / 143).
    for attempt in range(4):
        with Daemon() as d:
            d.proc.send_signal(signal.SIGTERM)
            time.sleep(0.001 * attempt)
            d.proc.send_signal(signal.SIGTERM)
            d.proc.send_signal(signal.SIGTERM)
            assert d.wait_exit(30) == 0, (attempt, d.proc.returncode, d.output_tail())
    # With a stream in flight a second signal the daemon sees means "stop now"
    # (documented, exit 3: it cut the stream); signals sent back to back may also
    # merge into one in the kernel, and then the stream drains (exit 0, or 3 if the
    # drain timeout cut it on a slow machine). Either way the daemon exits by itself,
    # never killed by a signal.
    with Daemon("--drain-timeout-s", "60") as d:
        c = d.conn(60)
        c.request("POST", "/v1/completions", body=json.dumps(dict(
            {"prompt": "x", "max_tokens": 4000, "stream": True}, **GREEDY)),
            headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200 and r.read(6) == b"data: "
        for _ in range(3):
            d.proc.send_signal(signal.SIGTERM)
        status = d.wait_exit(120)
        assert status in (0, 3), (status, d.output_tail())
        c.close()


def test_only_the_loop_thread_takes_shutdown_signals():
    # The kernel gives a process-directed SIGTERM to any thread not blocking it; one
    # taken by a worker while libuv swaps handlers at exit met the default action
    # (exit -15 in CI). Every thread but the loop's must block SIGINT and SIGTERM,
    # the engine's, the forward team's and libuv's pool threads included.
    shutdown_bits = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    with Daemon() as d:
        status, _ = d.post("/v1/completions", dict({"prompt": "x", "max_tokens": 2}, **GREEDY))
        assert status == 200
        masks = {}
        for tid in os.listdir("/proc/%d/task" % d.proc.pid):
            try:  # a thread that ends meanwhile (the loader's) takes its status with it
                with open("/proc/%d/task/%s/status" % (d.proc.pid, tid)) as f:
                    status = f.read()
            except FileNotFoundError:
                continue
            masks[int(tid)] = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", status, re.M).group(1), 16)
        assert len(masks) >= 3, masks  # loop, engine, and at least one more worker
        assert masks.pop(d.proc.pid) & shutdown_bits == 0
        assert all(m & shutdown_bits == shutdown_bits for m in masks.values()), masks


def test_symlink_loop_model_path():
    with tempfile.TemporaryDirectory() as tmp:
        loop = os.path.join(tmp, "model")
        os.symlink(loop, loop)
        proc = subprocess.run([KVD, "--model", loop, "--port", "0"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (proc.returncode, proc.stderr)
        assert "is a symbolic link loop" in proc.stderr, proc.stderr


if __name__ == "__main__":
    run_tests(globals())
