#!/usr/bin/env python3
"""test_kvd_bench_tool.py - kvd-bench end to end against the scripted fake server.

Checks what kvd-bench measures and sends, with answers known in advance: exact token
totals (from usage, and by counting chunks without it), --ignore-eos, prompt lengths,
closed and open loop (the server records how many requests it saw at once), multi-turn
histories (the server rejects any history that is not what it streamed), every error kind,
--duration cutting a run, reproducible workloads, API keys, and the exit codes. No timed
assertions: only bounds the fake server's own sleeps guarantee (TTFT >= its 20 ms
first-token delay; a 2 s drain grace), and orderings (median <= p90 <= p99 <= max).

Usage: test_kvd_bench_tool.py KVD_BENCH FAKE_SERVER_SCRIPT
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest
import urllib.request

BENCH = None
FAKE = None


class FakeServer:
    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, FAKE, *args], stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        prefix = "fake: listening on "
        if not line.startswith(prefix):
            self.proc.kill()
            raise RuntimeError("fake server did not start: %r" % line)
        self.url = line[len(prefix):].strip()

    def stats(self, reset=True):
        with urllib.request.urlopen(self.url + "/stats" + ("?reset=1" if reset else ""),
                                    timeout=10) as r:
            return json.load(r)

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


M64 = (1 << 64) - 1


def mix64(z):
    z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) & M64
    z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & M64
    return z ^ (z >> 31)


def think_time(seed, session, turn, mean_s):
    """kvd-bench's pause before a turn, from its definition (docs/kvd-bench.md):
    splitmix64 seeded by (seed ^ turn * 0xd1b54a32d192ed03, 0x7b1c0000000000 + session),
    one uniform draw u of 53 bits, -mean * ln(1 - u)."""
    stream = 0x7b1c0000000000 + session
    state = mix64((seed ^ ((turn * 0xd1b54a32d192ed03) & M64)) ^
                  mix64((stream + 0x9e3779b97f4a7c15) & M64))
    state = (state + 0x9e3779b97f4a7c15) & M64
    u = (mix64(state) >> 11) * 2.0 ** -53
    return -math.log(1.0 - u) * mean_s


def run_bench(url, *args, expect_rc=0):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        cmd = [BENCH, "--url", url, "--json", path, "--no-progress", *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if p.returncode != expect_rc:
            raise AssertionError("%s exited %d, expected %d\nstdout:\n%s\nstderr:\n%s" % (
                " ".join(cmd), p.returncode, expect_rc, p.stdout, p.stderr))
        with open(path) as f:
            return json.load(f), p.stdout


class Base(unittest.TestCase):
    server_args = ()

    @classmethod
    def setUpClass(cls):
        cls.server = FakeServer(*cls.server_args)

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def setUp(self):
        self.server.stats(reset=True)

    def assert_ordered(self, out, metric):
        keys = ["min", "median", "p90", "p99", "max"]
        values = [out["%s_%s_ms" % (k, metric)] for k in keys]
        self.assertEqual(values, sorted(values), "%s percentiles out of order" % metric)
        self.assertGreaterEqual(out["mean_%s_ms" % metric], values[0])
        self.assertLessEqual(out["mean_%s_ms" % metric], values[-1])

    def assert_clean(self, out, n):
        self.assertEqual(out["completed"], n)
        self.assertEqual(out["failed"], 0)
        self.assertEqual(out["incomplete"], 0)
        self.assertEqual(out["errors"]["connect"] + out["errors"]["http"] +
                         out["errors"]["timeout"] + out["errors"]["stream"], 0)
        for metric in ("ttft", "tpot", "itl", "e2el"):
            self.assert_ordered(out, metric)
        self.assertEqual(len(out["ttfts"]), n)
        for ttft, e2el in zip(out["ttfts"], out["e2els"]):
            self.assertLessEqual(ttft, e2el)
        self.assertGreater(out["duration"], 0)
        self.assertAlmostEqual(out["request_throughput"], n / out["duration"], places=6)
        self.assertAlmostEqual(out["output_throughput"],
                               out["total_output_tokens"] / out["duration"], places=6)
        self.assertAlmostEqual(out["total_token_throughput"],
                               (out["total_input_tokens"] + out["total_output_tokens"]) /
                               out["duration"], places=6)


class ClosedLoop(Base):
    def test_completions_exact_counts(self):
        out, text = run_bench(self.server.url, "--concurrency", "4", "--requests", "12",
                              "--prompt-tokens", "16", "--max-tokens", "8", "--ignore-eos",
                              "--seed", "1")
        self.assert_clean(out, 12)
        self.assertEqual(out["model_id"], "fake-model")  # asked GET /v1/models
        self.assertEqual(out["mode"], "closed")
        self.assertEqual(out["endpoint"], "/v1/completions")
        self.assertEqual(out["total_input_tokens"], 12 * 16)
        self.assertEqual(out["total_output_tokens"], 12 * 8)
        self.assertEqual(out["usage_reported"], 12)
        self.assertEqual(out["output_lens"], [8] * 12)
        self.assertEqual([len(g) for g in out["itls"]], [7] * 12)
        # The fake server waits 20 ms before the first token and 2 ms between tokens.
        self.assertGreaterEqual(out["min_ttft_ms"], 20.0)
        for i, ttft in enumerate(out["ttfts"]):
            self.assertGreaterEqual(ttft, 0.020)
            self.assertLessEqual(ttft, out["e2els"][i])
        stats = self.server.stats()
        self.assertEqual(stats["posts"], 12)
        self.assertLessEqual(stats["max_inflight"], 4)
        self.assertIn("Successful requests:", text)
        self.assertIn("Mean TTFT (ms):", text)

    def test_without_ignore_eos_the_server_decides(self):
        out, _ = run_bench(self.server.url, "--concurrency", "2", "--requests", "6",
                           "--prompt-tokens", "4", "--max-tokens", "8")
        self.assert_clean(out, 6)
        self.assertEqual(out["total_output_tokens"], 6 * 5)  # fake stops after 5 (EOS)
        self.assertFalse(out["ignore_eos"])

    def test_length_ranges(self):
        out, _ = run_bench(self.server.url, "--concurrency", "3", "--requests", "20",
                           "--prompt-tokens", "10:20", "--max-tokens", "2:6", "--ignore-eos",
                           "--model", "fake-model")
        self.assert_clean(out, 20)
        for n in out["input_lens"]:
            self.assertTrue(10 <= n <= 20, n)
        for n in out["output_lens"]:
            self.assertTrue(2 <= n <= 6, n)
        self.assertGreater(len(set(out["input_lens"])), 1)
        self.assertEqual(out["total_input_tokens"], sum(out["input_lens"]))
        self.assertEqual(out["total_input_tokens"], out["total_prompt_words"])

    def test_same_seed_same_prompts(self):
        args = ("--concurrency", "3", "--requests", "6", "--prompt-tokens", "5:30",
                "--max-tokens", "2")
        run_bench(self.server.url, *args, "--seed", "7")
        first = self.server.stats()["prompt_digest"]
        run_bench(self.server.url, *args, "--seed", "7", "--concurrency", "1")
        again = self.server.stats()["prompt_digest"]
        run_bench(self.server.url, *args, "--seed", "8")
        other = self.server.stats()["prompt_digest"]
        self.assertEqual(first, again)
        self.assertNotEqual(first, other)

    def test_goodput(self):
        out, _ = run_bench(self.server.url, "--requests", "4", "--max-tokens", "4",
                           "--ignore-eos", "--slo-ttft-ms", "100000", "--slo-tpot-ms", "100000")
        self.assertEqual(out["good_requests"], 4)
        self.assertAlmostEqual(out["request_goodput"], out["request_throughput"], places=9)
        # The server waits 20 ms before the first token, so no TTFT is under 19 ms.
        out, _ = run_bench(self.server.url, "--requests", "4", "--max-tokens", "4",
                           "--ignore-eos", "--slo-ttft-ms", "19", "--slo-tpot-ms", "100000")
        self.assertEqual(out["good_requests"], 0)
        self.assertEqual(out["request_goodput"], 0)
        out, _ = run_bench(self.server.url, "--requests", "2", "--max-tokens", "2")
        self.assertIsNone(out["request_goodput"])

    def test_url_with_v1_suffix(self):
        out, _ = run_bench(self.server.url + "/v1/", "--requests", "2", "--max-tokens", "2")
        self.assert_clean(out, 2)


class OpenLoop(Base):
    def test_poisson_arrivals(self):
        out, _ = run_bench(self.server.url, "--rate", "40", "--requests", "10",
                           "--max-tokens", "3", "--ignore-eos", "--prompt-tokens", "8")
        self.assert_clean(out, 10)
        self.assertEqual(out["mode"], "open")
        self.assertEqual(out["request_rate"], 40)
        self.assertIsNone(out["max_concurrency"])
        self.assertEqual(out["total_output_tokens"], 30)
        self.assertEqual(out["total_input_tokens"], 80)

    def test_concurrency_cap(self):
        out, _ = run_bench(self.server.url, "--rate", "1000", "--concurrency", "2",
                           "--requests", "10", "--max-tokens", "4", "--ignore-eos")
        self.assert_clean(out, 10)
        self.assertEqual(out["max_concurrency"], 2)
        self.assertLessEqual(self.server.stats()["max_inflight"], 2)


class MultiTurn(Base):
    def test_sessions_resend_history(self):
        out, text = run_bench(self.server.url, "--turns", "3", "--requests", "9",
                              "--concurrency", "2", "--prompt-tokens", "5", "--max-tokens",
                              "4", "--ignore-eos")
        self.assert_clean(out, 9)
        self.assertEqual(out["endpoint"], "/v1/chat/completions")
        stats = self.server.stats()
        self.assertEqual(stats["turns"], {"1": 3, "2": 3, "3": 3})
        self.assertEqual(stats["histories_checked"], 3 * (0 + 1 + 2))
        # Words in user and assistant messages: 5, 5+4+5, 5+4+5+4+5 per session.
        self.assertEqual(out["total_input_tokens"], 3 * (5 + 14 + 23))
        self.assertEqual(out["total_output_tokens"], 9 * 4)
        self.assertEqual([t["turn"] for t in out["ttft_by_turn"]], [1, 2, 3])
        self.assertEqual([t["completed"] for t in out["ttft_by_turn"]], [3, 3, 3])
        self.assertEqual(sorted(out["turn_of_request"]), [1, 1, 1, 2, 2, 2, 3, 3, 3])
        by_session = {}
        for session, turn, n in zip(out["session_of_request"], out["turn_of_request"],
                                    out["input_lens"]):
            by_session.setdefault(session, {})[turn] = n
        self.assertEqual(by_session, {s: {1: 5, 2: 14, 3: 23} for s in (0, 1, 2)})
        for t in out["ttft_by_turn"]:
            self.assertGreaterEqual(t["min_ttft_ms"], 20.0)
            self.assertLessEqual(t["median_ttft_ms"], t["p99_ttft_ms"])
        self.assertIn("Turn 3 (3 requests):", text)

    def test_session_header_names_each_session(self):
        out, _ = run_bench(self.server.url, "--turns", "3", "--requests", "9",
                           "--concurrency", "3", "--prompt-tokens", "3", "--max-tokens", "2",
                           "--ignore-eos", "--seed", "5", "--session-header")
        self.assert_clean(out, 9)
        self.assertTrue(out["session_header"])
        ids = self.server.stats()["session_ids"]
        # Every turn of session s carries the same id; no two sessions share one.
        self.assertEqual(sorted(ids), sorted(["kvd-bench-5-%d" % s for s in range(3)] * 3))

    def test_no_session_header_by_default(self):
        out, _ = run_bench(self.server.url, "--turns", "2", "--requests", "2",
                           "--prompt-tokens", "3", "--max-tokens", "2")
        self.assert_clean(out, 2)
        self.assertEqual(self.server.stats()["session_ids"], [None, None])

    def test_last_session_is_shorter(self):
        out, _ = run_bench(self.server.url, "--turns", "3", "--requests", "7",
                           "--concurrency", "3", "--max-tokens", "2", "--prompt-tokens", "3")
        self.assert_clean(out, 7)
        self.assertEqual(self.server.stats()["turns"], {"1": 3, "2": 2, "3": 2})

    def test_sessions_rotate(self):
        # 4 sessions, 1 client: every session takes its turn before any takes the next.
        out, text = run_bench(self.server.url, "--turns", "3", "--sessions", "4",
                              "--prompt-tokens", "3", "--max-tokens", "2", "--ignore-eos",
                              "--seed", "9", "--session-header")
        self.assert_clean(out, 12)
        self.assertEqual(out["sessions"], 4)
        stats = self.server.stats()
        self.assertEqual(stats["turn_order"], [1] * 4 + [2] * 4 + [3] * 4)
        self.assertEqual(stats["session_ids"], ["kvd-bench-9-%d" % s for s in range(4)] * 3)
        self.assertEqual(stats["request_ids"],
                         ["kvd-bench-9-%d-%d" % (s, t) for t in (1, 2, 3) for s in range(4)])
        self.assertEqual(stats["histories_checked"], 4 * (0 + 1 + 2))
        # The fake server reports the history before the last user message as cached:
        # 0, 3+2, 3+2+3+2 of 3, 8, 13 prompt words.
        self.assertEqual([t["prompt_tokens"] for t in out["ttft_by_turn"]], [12, 32, 52])
        self.assertEqual([t["cached_tokens"] for t in out["ttft_by_turn"]], [0, 20, 40])
        self.assertEqual([t["with_cached_tokens"] for t in out["ttft_by_turn"]], [4, 4, 4])
        self.assertEqual(sorted(out["cached_tokens_of_request"]), [0] * 4 + [5] * 4 + [10] * 4)
        self.assertIn("clients cycling over 4 sessions", text)
        self.assertRegex(text, r"Turn 2 \(4 with usage\):\s+8\.0\s+0\.625")
        # Between two turns of a session the 3 others each took one (>= 20 ms first-token
        # delay apiece on the fake server).
        self.assertEqual(out["median_turn_gap_ms"] >= 3 * 20.0, True)

    def test_sessions_rotate_with_clients(self):
        out, _ = run_bench(self.server.url, "--turns", "2", "--sessions", "5",
                           "--concurrency", "3", "--prompt-tokens", "4", "--max-tokens", "3",
                           "--ignore-eos")
        self.assert_clean(out, 10)
        stats = self.server.stats()
        self.assertEqual(stats["turns"], {"1": 5, "2": 5})
        # (the exact order is checked with one client above: with three, the server may
        # see a later send arrive first)
        self.assertLessEqual(stats["max_inflight"], 3)
        self.assertEqual(stats["histories_checked"], 5)

    def test_think_time_pauses_between_turns(self):
        # 2 sessions x 2 turns, 1 client, 0.3 s mean pause before each turn: the pauses
        # are fixed by the seed, lengthen the run by their sum, and stay out of TTFT
        # (only the fake server's 20 ms first-token delay is in it).
        out, text = run_bench(self.server.url, "--turns", "2", "--sessions", "2",
                              "--prompt-tokens", "3", "--max-tokens", "2", "--ignore-eos",
                              "--seed", "4", "--think-time", "0.3")
        self.assert_clean(out, 4)
        self.assertEqual(out["think_time_s"], 0.3)
        self.assertIn("Think time:", text)
        self.assertEqual(self.server.stats()["turn_order"], [1, 1, 2, 2])
        pauses = sum(think_time(4, s, t, 0.3) for s in range(2) for t in (1, 2))
        self.assertGreater(pauses, 0.0)
        self.assertGreaterEqual(out["duration"], pauses - 0.01)

    def test_think_time_flag_checks(self):
        for args in (("--think-time", "1"), ("--think-time", "1", "--turns", "2", "--rate", "5"),
                     ("--think-time", "-1", "--turns", "2")):
            proc = subprocess.run([BENCH, "--url", self.server.url, *args],
                                  capture_output=True, text=True, timeout=30)
            self.assertEqual(proc.returncode, 2, args)
            self.assertIn("--think-time", proc.stderr)

    def test_sessions_flag_checks(self):
        for args in (("--sessions", "3"), ("--sessions", "3", "--turns", "2", "--rate", "5"),
                     ("--sessions", "3", "--turns", "2", "--requests", "5")):
            proc = subprocess.run([BENCH, "--url", self.server.url, *args],
                                  capture_output=True, text=True, timeout=30)
            self.assertEqual(proc.returncode, 2, args)
            self.assertIn("--sessions" if "--requests" not in args else "--requests",
                          proc.stderr)

    def test_open_loop_sessions(self):
        out, _ = run_bench(self.server.url, "--turns", "2", "--requests", "6", "--rate", "50",
                           "--max-tokens", "3", "--ignore-eos", "--prompt-tokens", "4")
        self.assert_clean(out, 6)
        self.assertEqual(self.server.stats()["turns"], {"1": 3, "2": 3})
        self.assertEqual(out["total_input_tokens"], 3 * (4 + 4 + 3 + 4))


class Faults(Base):
    server_args = ("--fault", "http500:2", "--fault", "badjson:4", "--fault", "cut:6",
                   "--fault", "errorevent:8", "--fault", "timeout:9", "--fault", "nodone:10")

    def test_error_kinds(self):
        out, _ = run_bench(self.server.url, "--requests", "12", "--concurrency", "1",
                           "--timeout", "3", "--max-tokens", "4", "--ignore-eos",
                           expect_rc=1)
        self.assertEqual(out["completed"], 6)
        self.assertEqual(out["failed"], 6)
        errors = out["errors"]
        self.assertEqual(errors["http"], 1)
        self.assertEqual(errors["http_status"], {"500": 1})
        self.assertEqual(errors["stream"], 4)  # bad JSON, cut, error event, no [DONE]
        self.assertEqual(errors["timeout"], 1)
        self.assertEqual(errors["connect"], 0)
        joined = "\n".join(errors["messages"])
        self.assertIn("injected error event", joined)
        self.assertIn("not a JSON object", joined)
        self.assertIn("[DONE]", joined)
        self.assertIn("HTTP 500", joined)
        self.assertEqual(out["total_output_tokens"], 6 * 4)

    def test_failed_turn_abandons_its_session(self):
        # Requests 2, 4, 6, 8, 9 and 10 fail; with one client and 2-turn sessions:
        # s1 = 1 ok, 2 fail | s2 = 3 ok, 4 fail | s3 = 5 ok, 6 fail | s4 = 7 ok, 8 fail
        # s5 = 9 fail (turn 2 abandoned) | s6 = 10 fail (turn 2 abandoned)
        out, _ = run_bench(self.server.url, "--turns", "2", "--requests", "12",
                           "--timeout", "3", "--max-tokens", "2", expect_rc=1)
        self.assertEqual(out["completed"], 4)
        self.assertEqual(out["failed"], 6)
        self.assertEqual(out["abandoned"], 2)


class Linger(Base):
    server_args = ("--fault", "linger:1")

    def test_done_ends_the_request(self):
        # Request 1's server holds the connection 5 s after [DONE]: kvd-bench waits its
        # 2 s grace for the message end, then counts the request as complete, timed to
        # [DONE].
        out, _ = run_bench(self.server.url, "--requests", "2", "--max-tokens", "3",
                           "--timeout", "30")
        self.assert_clean(out, 2)
        self.assertGreaterEqual(out["duration"], 2.0)
        self.assertLess(out["max_e2el_ms"], out["duration"] * 1000 - 1500)


class Loading(unittest.TestCase):
    def test_waits_while_the_server_loads(self):
        server = FakeServer("--loading-s", "1.5")
        try:
            out, _ = run_bench(server.url, "--requests", "2", "--max-tokens", "2")
            self.assertEqual(out["completed"], 2)
            self.assertEqual(out["model_id"], "fake-model")
        finally:
            server.close()


class NoUsage(Base):
    server_args = ("--no-usage", "--http10")

    def test_counts_chunks_without_usage(self):
        out, _ = run_bench(self.server.url, "--requests", "5", "--concurrency", "2",
                           "--prompt-tokens", "9", "--max-tokens", "6", "--ignore-eos")
        self.assert_clean(out, 5)
        self.assertEqual(out["usage_reported"], 0)
        self.assertEqual(out["total_output_tokens"], 30)
        self.assertEqual(out["total_input_tokens"], 45)  # estimated from words sent


class ApiKey(Base):
    server_args = ("--api-key", "sk-test")

    def test_key_is_sent(self):
        out, _ = run_bench(self.server.url, "--requests", "2", "--max-tokens", "2",
                           "--api-key", "sk-test")
        self.assert_clean(out, 2)
        out, _ = run_bench(self.server.url, "--requests", "2", "--max-tokens", "2",
                           "--model", "fake-model", expect_rc=1)
        self.assertEqual(out["errors"]["http_status"], {"401": 2})


class Limits(Base):
    server_args = ("--token-delay-ms", "100", "--first-delay-ms", "0")

    def test_duration_cuts_the_run(self):
        out, _ = run_bench(self.server.url, "--requests", "1000", "--concurrency", "2",
                           "--max-tokens", "100", "--ignore-eos", "--duration", "1")
        self.assertEqual(out["completed"], 0)
        self.assertEqual(out["failed"], 0)
        self.assertEqual(out["incomplete"], 2)
        self.assertLess(out["duration"], 5.0)

    def test_duration_cuts_rotating_sessions(self):
        # Sessions waiting in the rotation are dropped, not left hanging.
        out, _ = run_bench(self.server.url, "--turns", "3", "--sessions", "6",
                           "--concurrency", "2", "--max-tokens", "100", "--ignore-eos",
                           "--duration", "1")
        self.assertEqual(out["completed"], 0)
        self.assertEqual(out["incomplete"], 2)
        self.assertLess(out["duration"], 5.0)


class Command(unittest.TestCase):
    def test_connect_errors(self):
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nobody listens there now
        out, _ = run_bench("http://127.0.0.1:%d" % port, "--model", "m", "--requests", "3",
                           expect_rc=1)
        self.assertEqual(out["errors"]["connect"], 3)
        self.assertEqual(out["completed"], 0)
        p = subprocess.run([BENCH, "--url", "http://127.0.0.1:%d" % port, "--requests", "1"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 2)
        self.assertIn("/v1/models", p.stderr)

    def test_help_and_bad_flags(self):
        p = subprocess.run([BENCH, "--help"], capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0)
        for flag in ("--url", "--concurrency", "--rate", "--requests", "--turns", "--sessions",
                     "--prompt-tokens", "--max-tokens", "--ignore-eos", "--seed",
                     "--duration", "--json", "--model", "--api-key", "--timeout",
                     "--slo-ttft-ms", "--slo-tpot-ms"):
            self.assertIn(flag, p.stdout)
        p = subprocess.run([BENCH, "--max-tokens", "9:3"], capture_output=True, text=True,
                           timeout=60)
        self.assertEqual(p.returncode, 2)
        self.assertIn("--max-tokens", p.stderr)


if __name__ == "__main__":
    BENCH, FAKE = sys.argv[1], sys.argv[2]
    unittest.main(argv=[sys.argv[0], "-v"])
