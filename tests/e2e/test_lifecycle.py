"""test_lifecycle.py - kvd's start and stop: configuration errors (exit 2), --help,
load failures (exit 1), SIGTERM/SIGINT drains that let in-flight streams finish
(exit 0), the drain grace period, /health answering 503 while draining, and KV
snapshots (taken on a worker thread) whose clients leave or that a drain overtakes.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvd_e2e import (KVD, SOURCE_ROOT, Daemon, check_error, http_request, parse_sse, run_tests,  # noqa: E402
                     tiny_model, wait_until)


def run_kvd(*args, timeout=30):
    return subprocess.run([KVD] + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_flags_with_defaults():
    out = run_kvd("--help")
    assert out.returncode == 0, out
    for flag in ["--model DIR", "--config FILE", "--host ADDR", "--port N", "--block-size N", "--kv-cache-mb MIB",
                 "--kv-dtype f16|bf16|f32", "--max-num-seqs N", "--max-batched-tokens N", "--max-queue N",
                 "--api-key KEY", "--threads N", "--no-prefix-cache", "--log-level debug|info|warn|error",
                 "--max-body-bytes", "--header-timeout-ms", "--idle-timeout-ms", "--body-timeout-ms",
                 "--max-connections", "--drain-timeout-s"]:
        assert flag in out.stdout, flag
    assert "[default 8000]" in out.stdout and '[default "127.0.0.1"]' in out.stdout


def test_default_config_file_lists_every_knob():
    path = os.path.join(SOURCE_ROOT, "configs", "default.json")
    cfg = json.load(open(path))
    help_text = run_kvd("--help").stdout
    flags = set(re.findall(r"^  --([a-z0-9-]+)", help_text, re.M)) - {"config", "help", "no-prefix-cache", "print-knobs"}
    keys = {f.replace("-", "_") for f in flags}
    # kv_cache_bytes and kv_cache_mb are one knob in two units: the file uses MiB.
    assert set(cfg) == keys - {"kv_cache_bytes"}, set(cfg) ^ (keys - {"kv_cache_bytes"})
    assert cfg["host"] == "127.0.0.1" and cfg["port"] == 8000
    # The file is accepted as is; flags win over it wherever they stand (model, port).
    with Daemon("--config", path, "--kv-cache-mb", "2") as d:
        assert d.get("/health")[0] == 200
        assert "KV pool: 512 blocks" in d.output()


def test_invalid_configuration_exits_2():
    model = tiny_model()
    with tempfile.TemporaryDirectory() as tmp:
        bad_key = os.path.join(tmp, "bad_key.json")
        json.dump({"port": 0, "max_num_seq": 4}, open(bad_key, "w"))
        bad_type = os.path.join(tmp, "bad_type.json")
        json.dump({"kv_cache_mb": "lots"}, open(bad_type, "w"))
        not_json = os.path.join(tmp, "not.json")
        open(not_json, "w").write("{port: 1}")
        cases = [
            (["--config", bad_key], 'unknown key "max_num_seq"'),
            (["--config", bad_type], 'key "kv_cache_mb": must be an integer'),
            (["--config", not_json], "not valid JSON"),
            (["--config", os.path.join(tmp, "missing.json")], "missing.json"),
            (["--port", "99999"], "--port: must be an integer in 0..65535"),
            (["--kv-dtype", "fp4"], '--kv-dtype: "fp4" is not one of f16, bf16, f32, int8, fp8'),
            (["--log-level", "loud"], "--log-level"),
            (["--block-size", "12"], "block_size: 12 is not a power of two"),
            (["--frobnicate"], "unknown flag --frobnicate"),
            (["--host", "no-such-host.invalid"], 'host: cannot resolve "no-such-host.invalid"'),
        ]
        for args, message in cases:
            out = run_kvd("--model", model, *args)
            assert out.returncode == 2, (args, out.returncode, out.stderr)
            assert message in out.stderr, (args, out.stderr)
        out = run_kvd("--port", "0")
        assert out.returncode == 2 and "model: not set" in out.stderr, out.stderr
        out = run_kvd("--model", os.path.join(tmp, "nope"))
        assert out.returncode == 2 and "is not a directory" in out.stderr, out.stderr


def test_unloadable_model_exits_1():
    with tempfile.TemporaryDirectory() as tmp:
        out = run_kvd("--model", tmp, "--port", "0")
        assert out.returncode == 1, (out.returncode, out.stderr)
        assert "cannot load model" in out.stderr, out.stderr


def test_health_503_while_loading():
    # tokenizer.json as a named pipe holds the loader in open() until the test opens
    # the other end, so the loading state lasts exactly as long as the test wants.
    model = tiny_model()
    with tempfile.TemporaryDirectory() as tmp:
        for name in os.listdir(model):
            if name != "tokenizer.json":
                os.symlink(os.path.join(model, name), os.path.join(tmp, name))
        fifo = os.path.join(tmp, "tokenizer.json")
        os.mkfifo(fifo)
        with Daemon("--kv-cache-mb", "2", model=tmp, wait_ready=False) as d:
            status, head, body = d.request("GET", "/health")
            assert status == 503 and head["retry-after"] == "1", (status, head)
            check_error(json.loads(body), None, "loading")
            status, head, body = d.request("POST", "/v1/completions", {"prompt": "x"})
            assert status == 503 and check_error(json.loads(body), None, "loading")
            assert d.get("/metrics")[0] == 200
            # Release the loader with a file that is not a regular one: loading fails.
            os.close(os.open(fifo, os.O_WRONLY))
            assert d.wait_exit(30) == 1
            assert "cannot load model" in d.output() and "tokenizer.json" in d.output(), d.output()


def test_port_in_use_exits_1():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        out = run_kvd("--model", tiny_model(), "--port", holder.getsockname()[1])
        assert out.returncode == 1 and "address already in use" in out.stderr, (out.returncode, out.stderr)
    finally:
        holder.close()


def test_sigterm_drains_in_flight_stream():
    with Daemon("--kv-cache-mb", "4") as d:
        c = d.conn()
        body = {"prompt": "Drain me", "max_tokens": 300, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200
        first = r.readline()
        assert first.startswith(b"data: "), first
        d.signal(signal.SIGTERM)
        d.wait_for_line("draining", 10)
        # New requests are refused while the stream goes on; probes see 503.
        status, head, raw = d.request("GET", "/health")
        assert status == 503 and head["connection"] == "close", (status, head)
        check_error(json.loads(raw), None, "draining")
        status, resp = d.post("/v1/completions", {"prompt": "late", "max_tokens": 1})
        assert status == 503, resp
        assert d.get("/metrics")[0] == 200
        rest = r.read().decode()
        events = parse_sse(first.decode() + rest)
        assert events[-1] == "[DONE]"
        assert events[-2]["usage"]["completion_tokens"] == 300, events[-2]
        assert events[-3]["choices"][0]["finish_reason"] == "length"
        c.close()
        assert d.wait_exit(30) == 0
        d.wait_for_line("^kvd: stopped$", 10)
        assert "received SIGTERM" in d.output()


def _start_long_stream(d, prompt):
    """Opens a streamed completion that runs for thousands of tokens (the engine keeps
    stepping) and waits for its first line; returns the connection."""
    c = d.conn()
    body = {"prompt": prompt, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    r.fp.readline()
    return c


def test_drain_timeout_cuts_off_and_exits_3():
    # The stream it cut is named in the log, and the exit status says the drain was not clean.
    with Daemon("--kv-cache-mb", "4", "--drain-timeout-s", "1") as d:
        c = _start_long_stream(d, "Too long to finish")
        d.signal(signal.SIGTERM)
        assert d.wait_exit(30) == 3
        out = d.output()
        assert "drain timeout after 1 s: cancelling 1 request(s)" in out, out
        assert re.search(r"response cut by shutdown: POST /v1/completions status 200, \d+ of unknown", out), out
        assert "kvd: stopped" in out
        c.close()


def _kv_log_statuses(d):
    return re.findall(r"^kvd: request - GET /v1/kv (\d+) ", d.output(), re.M)


def test_kv_snapshot_clients_leave_and_drain():
    # GET /v1/kv is a job on a libuv worker, and the snapshot waits for the engine's
    # running step. Clients that send it and leave at once usually go before it is
    # answered (the job must then be freed, not answered); a drain must wait for the
    # snapshot in flight and still exit 0. A job leaked by either path would hold the
    # drain until its timeout.
    with Daemon("--kv-cache-mb", "4", "--drain-timeout-s", "20") as d:
        c = _start_long_stream(d, "Keep the engine stepping")
        # Looked at first: the stream runs for seconds, not for as long as the leavers
        # below take on a busy machine.
        status, raw = d.get("/v1/kv")
        assert status == 200
        kv = json.loads(raw)
        assert len(kv["sequences"]) == 1, kv["sequences"]  # the stream, still generating
        leavers = 20
        for _ in range(leavers):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
            s.sendall(http_request("GET", "/v1/kv"))
            s.shutdown(socket.SHUT_WR)
            s.close()
        # Each is logged exactly once: answered (200) or abandoned (499); with the first
        # snapshot above, leavers + 1 lines.
        wait_until(lambda: len(_kv_log_statuses(d)) >= leavers + 1, 30, "a log line per /v1/kv request")
        assert set(_kv_log_statuses(d)) <= {"200", "499"}, _kv_log_statuses(d)
        c.close()  # cancels it, so that the drain below waits for snapshots only
        wait_until(lambda: d.metrics()["kvd:num_requests_running"] == 0, 30, "the cancelled stream to end")
        # Snapshots pipelined on one connection, SIGTERM once the first is answered.
        # Whichever is in flight then is answered whole (Connection: close), or, when
        # none is, the drain ends at once; a request read after the drain began is
        # refused with 503. Either way the connection ends and kvd exits 0.
        pipelined = d.raw()
        pipelined.send(http_request("GET", "/v1/kv") * 5)
        answers = []
        while True:
            try:
                status, head, doc = pipelined.read_response()
            except EOFError:
                break
            answers.append((status, head["connection"]))
            if status == 200:
                assert json.loads(doc)["num_blocks"] == kv["num_blocks"], doc[:200]
            else:
                assert status == 503 and check_error(json.loads(doc), None, "draining"), (status, doc)
            if len(answers) == 1:
                d.signal(signal.SIGTERM)
        pipelined.close()
        assert answers[0] == (200, "keep-alive"), answers
        assert all(answer == (200, "keep-alive") for answer in answers[:-1]) and len(answers) <= 5, answers
        assert d.wait_exit(30) == 0
        out = d.output()
        assert "drain timeout" not in out, out
        assert len(_kv_log_statuses(d)) == leavers + 1 + len(answers), (_kv_log_statuses(d), answers)
        assert "kvd: stopped" in out


def test_sigint_when_idle_and_second_signal():
    with Daemon("--kv-cache-mb", "2") as d:
        d.signal(signal.SIGINT)
        assert d.wait_exit(20) == 0
        assert "received SIGINT" in d.output()
    with Daemon("--kv-cache-mb", "2", "--drain-timeout-s", "60") as d:
        c = _start_long_stream(d, "x")
        d.signal(signal.SIGTERM)
        d.wait_for_line("draining", 10)
        d.signal(signal.SIGTERM)  # a second signal stops at once, cutting the stream: status 3
        assert d.wait_exit(20) == 3
        assert "second signal" in d.output()
        c.close()


def test_serves_a_gguf_file():
    """--model FILE.gguf (the tiny fixture written as a BF16 GGUF by
    tests/reference/gguf_from_hf.py) answers as the safetensors checkpoint does, and the
    quantize knob converts weights at load."""
    gguf = os.environ.get("KVD_TINY_GGUF")
    if not gguf or not os.path.isfile(gguf):
        print("test_serves_a_gguf_file: KVD_TINY_GGUF not built (scripts/fixtures.sh): skipped")
        return
    # A GGUF has no generation_config.json: neutral defaults, so the request sets the
    # repetition penalty the safetensors directory would otherwise default to.
    req = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0,
           "repetition_penalty": 1.0}
    answers = []
    for model, extra in [(tiny_model(), []), (gguf, []), (tiny_model(), ["--quantize", "q8_0"])]:
        with Daemon(*extra, model=model) as d:
            status, body = d.post("/v1/completions", req)
            assert status == 200, body
            answers.append(body["choices"][0]["text"])
    assert answers[0] == answers[1]
    assert answers[2]  # a q8_0 model answers (its text may differ from bf16's)


if __name__ == "__main__":
    run_tests(globals())

