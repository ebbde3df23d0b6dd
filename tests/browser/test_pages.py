"""test_pages.py - the web pages and GET /v1/kv over real HTTP, without a browser.

One daemon (tiny fixture, a 256-block pool, an API key) serves every test. The pages
must come back byte for byte as they are in server/web/, with their Content-Type and
a Content-Security-Policy, without the API key, and reference nothing outside the
daemon. /v1/kv must keep the shape docs/api.md documents: idle, while a two-choice
request runs (the block tables and the per-block states describe the same snapshot,
so they must agree exactly), and after it finished (nothing in use, full blocks kept
cached). Python stdlib only; the daemon helpers are tests/e2e/kvd_e2e.py's.
"""

import json
import os
import re
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
from kvd_e2e import SOURCE_ROOT, Daemon, check_error, run_tests, wait_until  # noqa: E402

KEY = "kvd-pages-test-key"
AUTH = {"Authorization": "Bearer " + KEY}
NUM_BLOCKS = 256
BLOCK_SIZE = 16
BLOCK_BYTES = 4096  # tiny: 2 layers x (K, V) x 2 kv heads x 16 slots x 16 dims x 2 bytes
WEB = os.path.join(SOURCE_ROOT, "server", "web")
PAGES = [
    ("/", "index.html", "text/html; charset=utf-8"),
    ("/kv", "kv.html", "text/html; charset=utf-8"),
    ("/kvd.css", "kvd.css", "text/css; charset=utf-8"),
    ("/chat.js", "chat.js", "text/javascript; charset=utf-8"),
    ("/kv.js", "kv.js", "text/javascript; charset=utf-8"),
]
STATS_KEYS = {"blocks_total", "blocks_free", "blocks_cached", "blocks_used", "blocks_shared", "usage",
              "tokens_stored", "bytes_wasted", "block_bytes", "pool_bytes", "prefix_queries",
              "prefix_query_tokens", "prefix_hits", "prefix_hit_tokens", "evictions", "cow_copies",
              "num_running", "num_waiting", "num_preemptions", "dtype"}
SEQ_KEYS = {"request_id", "choice", "num_tokens", "num_computed", "blocks"}

daemon = None


def kv():
    status, body = daemon.get("/v1/kv", headers=AUTH)
    assert status == 200, (status, body)
    return json.loads(body)


def check_kv_shape(doc):
    """Checks everything that must hold for any snapshot; returns the per-state counts."""
    assert set(doc) == {"block_size", "num_blocks", "states", "sequences", "stats"}, sorted(doc)
    assert doc["block_size"] == BLOCK_SIZE and doc["num_blocks"] == NUM_BLOCKS, doc
    states = doc["states"]
    assert len(states) == NUM_BLOCKS and set(states) <= set("0123"), states
    st = doc["stats"]
    assert set(st) == STATS_KEYS, sorted(st)
    assert st["dtype"] == "f16", st["dtype"]  # the default page type
    counts = [states.count(c) for c in "0123"]
    assert (st["blocks_free"], st["blocks_cached"], st["blocks_used"], st["blocks_shared"]) == \
        (counts[0], counts[1], counts[2] + counts[3], counts[3]), (st, counts)
    assert st["blocks_total"] == NUM_BLOCKS, st
    assert abs(st["usage"] - st["blocks_used"] / NUM_BLOCKS) < 1e-9, st
    assert st["block_bytes"] == BLOCK_BYTES and st["pool_bytes"] == NUM_BLOCKS * BLOCK_BYTES, st
    assert isinstance(doc["sequences"], list)
    held = {}
    for seq in doc["sequences"]:
        assert set(seq) == SEQ_KEYS, seq
        blocks = seq["blocks"]
        assert len(blocks) == -(-seq["num_tokens"] // BLOCK_SIZE), seq
        assert 0 <= seq["num_computed"] <= seq["num_tokens"], seq
        assert len(set(blocks)) == len(blocks), seq
        for b in blocks:
            assert 0 <= b < NUM_BLOCKS, seq
            held[b] = held.get(b, 0) + 1
    # Tables and states come from one snapshot: a block is in use exactly when some
    # table holds it, and shared exactly when several do (only these tables run).
    assert {b for b in held} == {i for i, c in enumerate(states) if c in "23"}, (held, states)
    assert {b for b, n in held.items() if n > 1} == {i for i, c in enumerate(states) if c == "3"}, (held, states)
    return counts


def test_pages_are_the_source_files():
    for url, name, ctype in PAGES:
        status, headers, body = daemon.request("GET", url)  # no API key: the pages are public
        assert status == 200, (url, status, body[:200])
        assert headers["content-type"] == ctype, (url, headers)
        with open(os.path.join(WEB, name), "rb") as f:
            assert body == f.read(), url
        assert headers["cache-control"] == "no-cache", headers
        assert headers["x-content-type-options"] == "nosniff", headers
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp, csp


def test_pages_reference_only_the_daemon():
    served = {url for url, _, _ in PAGES}
    for url, name, _ in PAGES:
        text = open(os.path.join(WEB, name), encoding="utf-8").read()
        assert not re.search(r"(?:src|href)\s*=\s*[\"'](?:https?:)?//", text), name
        assert not re.search(r"url\(\s*[\"']?(?:https?:)?//|@import", text), name
        assert "fetch('http" not in text and 'fetch("http' not in text, name
        if name.endswith(".html"):
            for ref in re.findall(r"(?:src|href)=\"(/[^\"]*)\"", text):
                assert ref in served, (name, ref)


def test_unknown_paths_and_methods():
    status, body = daemon.get("/nope.js")
    assert status == 404, status
    check_error(json.loads(body), code="not_found")
    # The pages are GET-only resources like every other route: a wrong method is 405.
    status, head, body = daemon.request("POST", "/kv", b"{}")
    assert status == 405 and head["allow"] == "GET", (status, head)
    check_error(json.loads(body))


def test_kv_needs_the_key():
    status, body = daemon.get("/v1/kv")
    assert status == 401, status
    check_error(json.loads(body), code="invalid_api_key")


def test_kv_idle():
    doc = kv()
    check_kv_shape(doc)
    assert doc["states"] == "0" * NUM_BLOCKS, doc["states"]
    assert doc["sequences"] == [], doc["sequences"]
    st = doc["stats"]
    assert st["num_running"] == 0 and st["num_waiting"] == 0 and st["blocks_free"] == NUM_BLOCKS, st


def test_kv_while_running_and_after():
    prompt = "The block pool hands out fixed-size pages of the KV cache; " * 4
    result = {}

    def run():
        result["stream"] = daemon.stream("/v1/chat/completions", {
            "messages": [{"role": "user", "content": prompt}], "stream": True, "n": 2, "max_tokens": 600,
            "temperature": 0.9, "seed": 3, "ignore_eos": True}, headers=AUTH, timeout=120)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        doc = wait_until(lambda: (lambda d: d if len(d["sequences"]) == 2 else None)(kv()), 60,
                         "two running sequences in /v1/kv")
        counts = check_kv_shape(doc)
        seqs = doc["sequences"]
        assert {s["choice"] for s in seqs} == {0, 1}, seqs
        assert seqs[0]["request_id"] == seqs[1]["request_id"] > 0, seqs
        # The two choices share their prompt's full blocks.
        assert counts[3] >= 1 and seqs[0]["blocks"][0] == seqs[1]["blocks"][0], (counts, seqs)
        assert doc["stats"]["num_running"] == 2, doc["stats"]
    finally:
        worker.join(120)
    assert not worker.is_alive()
    status, _, events = result["stream"]
    assert status == 200 and events[-1] == "[DONE]", (status, events[-2:])
    doc = kv()
    counts = check_kv_shape(doc)
    assert doc["sequences"] == [] and counts[2] == counts[3] == 0, (doc["sequences"], counts)
    st = doc["stats"]
    assert st["num_running"] == 0 and st["blocks_cached"] > 0, st
    assert st["blocks_cached"] + st["blocks_free"] == NUM_BLOCKS, st


def test_kv_counts_prefix_hits():
    before = kv()["stats"]
    messages = [{"role": "user", "content": "Prefix caching reuses whole blocks of a repeated prompt. " * 3}]
    for _ in range(2):
        status, resp = daemon.post("/v1/chat/completions", {"messages": messages, "max_tokens": 4}, headers=AUTH)
        assert status == 200, resp
    cached = resp["usage"]["prompt_tokens_details"]["cached_tokens"]
    after = kv()["stats"]
    assert cached > 0 and cached % BLOCK_SIZE == 0, resp["usage"]
    assert after["prefix_hits"] >= before["prefix_hits"] + 1, (before, after)
    assert after["prefix_hit_tokens"] >= before["prefix_hit_tokens"] + cached, (before, after)
    assert after["prefix_queries"] >= before["prefix_queries"] + 2, (before, after)


if __name__ == "__main__":
    with Daemon("--kv-num-blocks", str(NUM_BLOCKS), "--api-key", KEY) as d:
        daemon = d
        run_tests(globals())
