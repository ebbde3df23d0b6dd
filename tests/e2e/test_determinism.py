"""test_determinism.py - what a response carries with its tokens (logprobs, top_logprobs,
their order and their printed digits) does not depend on what runs beside it.

The same requests (chat and completions, whole and streamed, greedy and seeded, n=2,
top_logprobs 5) are answered twice by the real daemon on the tiny fixture:
  - alone: one at a time, by a daemon with one compute thread and a roomy KV pool;
  - beside others: by a daemon with two compute threads, a KV pool so small that
    sequences are preempted and recomputed, 32-token steps (prefills in chunks), while
    requests of other lengths that share their prompts' prefixes run, and a second
    time when their own prompts are cached (prefix hits).
Whole answers must then be byte-identical except for "id", "created" and
usage.prompt_tokens_details.cached_tokens (which reports the prefix hit itself: 0 alone,
16 or more beside others, a number of another width; this is the +-1 byte that whole
answers' sizes showed under bench/loop_stall.py). Streamed answers must carry, per choice,
the same text, finish reason and logprobs entries with the same number bytes (parsed
with parse_float=str), equal to the whole answer's entries.
"""

import json
import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvd_e2e import Daemon, run_tests  # noqa: E402

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RIVER = "Tell me about the river, the stone and the lamp by the quiet market"
FOX = "The quick brown fox jumps over the lazy dog near the garden window. "

TARGETS = {
    "chat greedy": (CHAT, {"messages": [{"role": "user", "content": RIVER}], "n": 2, "max_tokens": 48,
                           "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 5}),
    "chat seeded": (CHAT, {"messages": [{"role": "user", "content": RIVER + " at night"}], "n": 2,
                           "max_tokens": 40, "temperature": 0.9, "top_p": 0.95, "seed": 11, "ignore_eos": True,
                           "logprobs": True, "top_logprobs": 3}),
    "completions greedy": (COMPLETIONS, {"prompt": FOX * 2, "n": 2, "max_tokens": 48, "temperature": 0,
                                         "ignore_eos": True, "logprobs": 5}),
    "completions seeded": (COMPLETIONS, {"prompt": FOX * 3, "n": 2, "max_tokens": 40, "temperature": 0.8,
                                         "top_k": 40, "seed": 5, "ignore_eos": True, "logprobs": 4}),
}


def neighbour(i):
    """Requests of other lengths whose prompts share the targets' prefixes."""
    n = 1 + i % 3
    if i % 2:
        return COMPLETIONS, {"prompt": FOX * (1 + i % 4) + "and again " * (3 * i), "n": n, "max_tokens": 6 + 17 * i,
                             "temperature": 0.7, "seed": 100 + i, "ignore_eos": True, "logprobs": 1 + i % 5,
                             "stream": i % 3 == 0}
    return CHAT, {"messages": [{"role": "user", "content": RIVER + " and the hill" * i}], "n": n,
                  "max_tokens": 6 + 17 * i, "temperature": 0, "ignore_eos": True, "logprobs": True,
                  "top_logprobs": i % 6, "stream": i % 4 == 0}


def post(d, path, body):
    c = d.conn(300)
    try:
        c.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
    finally:
        c.close()
    assert r.status == 200, (r.status, data[:400])
    return data


def normalised(body):
    """The whole answer with only the three fields that may differ blanked."""
    body, n_id = re.subn(rb'^\{"id":"[a-z]+-[0-9a-f]+",', b'{"id":"",', body)
    body, n_created = re.subn(rb'"created":[0-9]+,', b'"created":0,', body, count=1)
    body, n_cached = re.subn(rb'"prompt_tokens_details":\{"cached_tokens":[0-9]+\}\}\}$',
                             b'"prompt_tokens_details":{"cached_tokens":0}}}', body)
    assert (n_id, n_created, n_cached) == (1, 1, 1), body[:200] + b" ... " + body[-200:]
    return body


def first_difference(a, b):
    at = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    return "at byte %d of %d/%d:\n  alone:  %r\n  beside: %r" % (at, len(a), len(b), a[max(0, at - 120):at + 80],
                                                              b[max(0, at - 120):at + 80])


def per_choice(chunks_or_whole, chat, streamed):
    """{index: (text, finish_reason, logprobs)} with numbers kept as their printed text;
    a stream's pieces are joined, so how tokens were grouped into events does not matter."""
    out = {}
    if not streamed:
        for ch in chunks_or_whole["choices"]:
            text = ch["message"]["content"] if chat else ch["text"]
            lp = ch["logprobs"]["content"] if chat else ch["logprobs"]
            out[ch["index"]] = (text, ch["finish_reason"], lp)
        return out
    for chunk in chunks_or_whole:
        for ch in chunk["choices"]:
            text, finish, lp = out.get(ch["index"], ("", None, [] if chat else
                                                     {"text_offset": [], "token_logprobs": [], "tokens": [],
                                                      "top_logprobs": []}))
            text += (ch["delta"].get("content") or "") if chat else ch["text"]
            finish = ch["finish_reason"] or finish
            if ch.get("logprobs"):
                if chat:
                    lp = lp + ch["logprobs"]["content"]
                else:
                    lp = {k: lp[k] + ch["logprobs"][k] for k in lp}
            out[ch["index"]] = (text, finish, lp)
    return out


def stream_payloads(body):
    text = body.decode("utf-8")
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text[:-2].split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks)
    return [json.loads(b[len("data: "):], parse_float=str) for b in blocks]


def answers(d, names, streamed, background=None):
    """Each target's raw answer; with background, all targets at once beside neighbours."""
    out, failures = {}, []
    def run(name):
        path, body = TARGETS[name]
        out[name] = post(d, path, dict(body, stream=streamed))
    def run_neighbour(i):
        try:
            post(d, *neighbour(i))
        except Exception as exc:  # reported by the main thread
            failures.append((i, exc))
    if background is None:
        for name in names:
            run(name)
        return out
    threads = [threading.Thread(target=run_neighbour, args=(i,)) for i in range(background)]
    for t in threads[: background // 2]:
        t.start()
    time.sleep(0.05)
    targets = [threading.Thread(target=run, args=(name,)) for name in names]
    for t in targets:
        t.start()
    for t in threads[background // 2:]:
        t.start()
    for t in threads + targets:
        t.join(300)
    assert not failures, failures
    assert len(out) == len(names), sorted(out)
    return out


def compare(alone, beside, streamed, cached_seen):
    for name in TARGETS:
        chat = TARGETS[name][0] == CHAT
        a, b = alone[name], beside[name]
        if streamed:
            pa = per_choice(stream_payloads(a), chat, True)
            pb = per_choice(stream_payloads(b), chat, True)
            assert sorted(pa) == [0, 1], sorted(pa)
            for i in pa:
                assert pa[i] == pb[i], "%s (stream) choice %d differs:\n  alone:  %s\n  beside: %s" % (
                    name, i, json.dumps(pa[i])[:600], json.dumps(pb[i])[:600])
        else:
            assert normalised(a) == normalised(b), name + " differs " + first_difference(normalised(a), normalised(b))
            cached_seen.append(json.loads(b)["usage"]["prompt_tokens_details"]["cached_tokens"])


def check_neighbours_change_nothing(*daemon_args):
    names = list(TARGETS)
    with Daemon("--threads", "1", *daemon_args) as d:
        alone_whole = answers(d, names, False)
        alone_stream = answers(d, names, True)
    for name in names:
        # A stream carries the whole answer's logprobs, number for number.
        chat = TARGETS[name][0] == CHAT
        whole = per_choice(json.loads(alone_whole[name], parse_float=str), chat, False)
        stream = per_choice(stream_payloads(alone_stream[name]), chat, True)
        assert whole == stream, "%s: stream and whole answer differ:\n  %s\n  %s" % (
            name, json.dumps(whole)[:600], json.dumps(stream)[:600])
        assert all(len(lp if chat else lp["tokens"]) == TARGETS[name][1]["max_tokens"]
                   for _, _, lp in whole.values())
    # 40 blocks of 16 tokens hold about 5 of the 26 sequences that run at once.
    with Daemon("--threads", "2", "--kv-num-blocks", "40", "--max-batched-tokens", "32", *daemon_args) as d:
        cached = []
        for round_ in range(2):  # the second round finds the targets' own prompts cached
            compare(alone_whole, answers(d, names, False, background=10), False, cached)
            compare(alone_stream, answers(d, names, True, background=10), True, cached)
        m = d.metrics()
        assert m["kvd:num_preemptions_total"] > 0, "the pool was meant to force preemptions"
        assert max(cached) >= 16, cached
        print("     preemptions %d, cached_tokens of the targets beside others %s"
              % (m["kvd:num_preemptions_total"], sorted(set(cached))))


def test_logprobs_bytes_do_not_depend_on_neighbours():
    check_neighbours_change_nothing()


def test_logprobs_bytes_do_not_depend_on_neighbours_q8_0():
    # Integer products: decode's few-row kernels and prefill's many-row ones must agree.
    check_neighbours_change_nothing("--quantize", "q8_0")


if __name__ == "__main__":
    run_tests(globals())
