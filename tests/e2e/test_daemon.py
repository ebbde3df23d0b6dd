"""test_daemon.py - the daemon's own defects end to end (issue 13): the memory one
request may cost, the loop never stalled by building a large answer, /version and
/v1/models/{id}, the model name check, host names to listen on, SIGTERM while the
model loads, a second quick SIGTERM, a model path that is a symlink loop.

Every test starts the real daemon on the tiny fixture. Waits are for events, bounded
by generous timeouts; nothing asserts a duration except where the duration is the
defect (a stalled loop), and there the bound is seconds where the fix gives
milliseconds.
"""

import json
import os
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


if __name__ == "__main__":
    run_tests(globals())
