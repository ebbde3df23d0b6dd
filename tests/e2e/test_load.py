"""test_load.py - kvd under concurrency: 64 simultaneous streams each equal to its solo
result with a KV pool small enough to force preemption, disconnects that free their
blocks, and a client that never reads its stream.

Solo results are taken first, one request at a time, from the same daemon; then all
64 streams run at once. Sampled requests carry seeds, so "equal" is exact for them as
well as for greedy ones: a sequence's tokens must not depend on what ran beside it,
nor on being preempted and recomputed.
"""

import json
import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvd_e2e import Daemon, parse_sse, run_tests, wait_until  # noqa: E402

NUM_PROMPTS = 16
COPIES = 4  # 64 streams
MAX_TOKENS = 40


def request_body(i):
    prompt = [(1000 + 7919 * (i * 31 + k)) % 150000 for k in range(12 + i)]
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    if i % 2:
        body.update(temperature=0.8, top_p=0.95, top_k=50, seed=1000 + i)
    else:
        body.update(temperature=0, repetition_penalty=1.0)
    return body


def stream_text(d, body, results, key, barrier):
    barrier.wait()
    try:
        status, head, events = d.stream("/v1/completions", dict(body, stream=True,
                                                                stream_options={"include_usage": True}), timeout=120)
        assert status == 200, (status, events)
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["text"] for e in events[:-2])
        finish = [e["choices"][0]["finish_reason"] for e in events[:-2] if e["choices"][0]["finish_reason"]]
        results[key] = (text, finish, events[-2]["usage"]["completion_tokens"])
    except Exception as exc:  # reported by the main thread
        results[key] = exc


def test_64_concurrent_streams_equal_solo_with_preemption():
    # 48 blocks of 16 tokens: each stream needs 3-4 blocks, 64 of them far more.
    with Daemon("--kv-num-blocks", "48", "--max-num-seqs", "64", "--max-batched-tokens", "256") as d:
        solo = []
        t0 = time.monotonic()
        for i in range(NUM_PROMPTS):
            status, resp = d.post("/v1/completions", request_body(i))
            assert status == 200, resp
            assert resp["usage"]["completion_tokens"] == MAX_TOKENS
            solo.append(resp["choices"][0]["text"])
        t1 = time.monotonic()
        before = d.metrics()
        results = {}
        barrier = threading.Barrier(NUM_PROMPTS * COPIES)
        threads = []
        for copy in range(COPIES):
            for i in range(NUM_PROMPTS):
                t = threading.Thread(target=stream_text, args=(d, request_body(i), results, (i, copy), barrier))
                t.start()
                threads.append(t)
        for t in threads:
            t.join(180)
        t2 = time.monotonic()
        print("     solo %.1fs, concurrent %.1fs, preemptions %d" % (t1 - t0, t2 - t1, d.metrics()["kvd:num_preemptions_total"]))
        assert len(results) == NUM_PROMPTS * COPIES
        for (i, copy), result in sorted(results.items()):
            assert not isinstance(result, Exception), (i, copy, result)
            text, finish, completion_tokens = result
            assert finish == ["length"], (i, copy, finish)
            assert completion_tokens == MAX_TOKENS
            assert text == solo[i], "prompt %d copy %d differs from its solo run:\n%r\n%r" % (i, copy, text, solo[i])
        after = d.metrics()
        assert after["kvd:num_preemptions_total"] > before["kvd:num_preemptions_total"], \
            "the pool was meant to be too small for 64 streams: no preemption happened"
        assert after['kvd:request_success_total{finished_reason="length"}'] - \
            before['kvd:request_success_total{finished_reason="length"}'] == 64
        wait_until(lambda: d.metrics()["kvd:kv_blocks_used"] == 0, 10, "all blocks released")


def abrupt_close(sock):
    # SO_LINGER 0: close sends a reset, like a client killed mid-stream.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_disconnect_frees_blocks():
    with Daemon("--kv-cache-mb", "4") as d:
        aborts_before = d.metrics()['kvd:request_success_total{finished_reason="abort"}']
        socks = []
        body = json.dumps({"prompt": "Tell me a very long story", "max_tokens": 3000, "ignore_eos": True,
                           "stream": True}).encode()
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=30)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            got = b""
            while b"data: " not in got:  # headers and a first chunk: the stream is live
                got += s.recv(4096)
            socks.append(s)
        m = d.metrics()
        assert m["kvd:num_requests_running"] == 4 and m["kvd:kv_blocks_used"] > 0, m
        for i, s in enumerate(socks):
            if i % 2:
                abrupt_close(s)
            else:
                s.close()
        wait_until(lambda: d.metrics()["kvd:kv_blocks_used"] == 0, 10, "kv_blocks_used back to 0")
        m = d.metrics()
        assert m["kvd:num_requests_running"] == 0, m
        assert m['kvd:request_success_total{finished_reason="abort"}'] - aborts_before == 4, m
        # A whole (non-streamed) request is cancelled too when its client leaves.
        s = socket.create_connection(("127.0.0.1", d.port), timeout=30)
        whole = json.dumps({"prompt": "Another long one", "max_tokens": 3000, "ignore_eos": True}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(whole) + whole)
        wait_until(lambda: d.metrics()["kvd:num_requests_running"] == 1, 10, "the request running")
        s.close()
        wait_until(lambda: d.metrics()["kvd:kv_blocks_used"] == 0 and d.metrics()["kvd:num_requests_running"] == 0,
                   10, "the abandoned request cancelled")
        assert "POST /v1/completions 499" in d.output()
        assert d.get("/health")[0] == 200


def test_client_that_never_reads_is_cut_off():
    # 16 choices of 3000 tokens make about 12 MB of events for a client that reads
    # nothing. With a 16 KiB socket send buffer the kernel holds little of it, the
    # daemon's own queue for the connection reaches its 64 KiB cap, and the client is
    # cut off and its request cancelled.
    with Daemon("--kv-cache-mb", "16", "--max-write-queue-bytes", "65536",
                "--socket-send-buffer-bytes", "16384") as d:
        aborts_before = d.metrics()['kvd:request_success_total{finished_reason="abort"}']
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(30)
        s.connect(("127.0.0.1", d.port))
        body = json.dumps({"prompt": "Flood", "max_tokens": 3000, "ignore_eos": True, "stream": True,
                           "n": 16}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        wait_until(lambda: d.metrics()['kvd:request_success_total{finished_reason="abort"}'] - aborts_before == 16,
                   90, "the unread stream's 16 choices to be cancelled")
        m = d.metrics()
        assert m["kvd:num_requests_running"] == 0 and m["kvd:generation_tokens_total"] < 16 * 3000, m
        wait_until(lambda: d.metrics()["kvd:kv_blocks_used"] == 0, 10, "blocks released")
        assert "POST /v1/completions 499" in d.output()
        s.close()


if __name__ == "__main__":
    run_tests(globals())
