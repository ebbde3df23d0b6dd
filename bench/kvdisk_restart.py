#!/usr/bin/python3
"""kvdisk_restart.py - one phase of the KV disk tier's restart benchmark (issue 17).

Driven by bench/kvdisk_restart.sh. Sessions are token-id prompts on /v1/completions, so a
session's history is exactly P tokens whatever the tokenizer does with text:

  first: turn 1 of N sessions: P seeded token ids each (ids of ordinary tokens), greedy,
         A1 tokens of answer. Writes TTFT, cached_tokens and the answer of each to OUT.
  next:  turn 2 of the same sessions: turn 1's ids, the ids of turn 1's answer (taken
         from STATE, the file `first` wrote, via POST /tokenize) and 16 new seeded ids,
         greedy, A2 tokens with logprobs, so two runs' answers compare token for token
         and bit for bit (the logprobs are printed with every bit they carry).
  compare: A.json B.json [C.json D.json]: exits 1 unless each pair's answers are equal.
  report: cold.json restart.json: prints the TTFT figures and their ratio.

One request at a time (TTFT is the daemon's own prefill or load, not queueing).
"""
import argparse
import http.client
import json
import random
import statistics
import sys
import time
from urllib.parse import urlparse

FIRST_ID, LAST_ID = 1000, 150000  # ordinary BPE tokens of Qwen2's vocabulary
NEW_TOKENS = 16


def session_ids(seed, session, n, stream):
    rng = random.Random("%d/%d/%s" % (seed, session, stream))
    return [rng.randrange(FIRST_ID, LAST_ID) for _ in range(n)]


def post_json(url, path, body):
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    if r.status != 200:
        raise RuntimeError("%s: HTTP %d: %s" % (path, r.status, data[:300]))
    return json.loads(data)


def stream_completion(url, prompt_ids, max_tokens, logprobs):
    """Returns (ttft_s, text, logprobs list or None, usage)."""
    body = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if logprobs:
        body["logprobs"] = 1
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
    t0 = time.monotonic()
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Accept": "text/event-stream"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError("HTTP %d: %s" % (r.status, r.read()[:300]))
    ttft, text, probs, usage = None, [], [], None
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError("error event: %s" % event["error"])
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or []:
            if choice.get("text") and ttft is None:
                ttft = time.monotonic() - t0
            text.append(choice.get("text") or "")
            if choice.get("logprobs"):
                probs.append(choice["logprobs"])
    conn.close()
    if ttft is None or usage is None:
        raise RuntimeError("no text or no usage in the answer")
    return ttft, "".join(text), (probs if logprobs else None), usage


def run_phase(args):
    records = []
    state = None
    if args.phase == "next":
        with open(args.state) as f:
            state = {r["session"]: r for r in json.load(f)["sessions"]}
    for s in range(args.sessions):
        ids = session_ids(args.seed, s, args.prompt_tokens, "user1")
        if args.phase == "first":
            prompt, max_tokens = ids, args.first_tokens
        else:
            answer = state[s]["text"]
            answer_ids = post_json(args.url, "/tokenize", {"prompt": answer})["tokens"]
            prompt = ids + answer_ids + session_ids(args.seed, s, NEW_TOKENS, "user2")
            max_tokens = args.next_tokens
        ttft, text, probs, usage = stream_completion(args.url, prompt, max_tokens,
                                                     args.phase == "next")
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", -1)
        records.append({"session": s, "ttft_s": ttft, "prompt_tokens": usage["prompt_tokens"],
                        "cached_tokens": cached, "text": text, "logprobs": probs})
        print("%s session %d: ttft %.3f s, prompt %d, cached %d" % (
            args.phase, s, ttft, usage["prompt_tokens"], cached), file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump({"phase": args.phase, "sessions": records}, f, indent=1)


def load(path):
    with open(path) as f:
        return json.load(f)["sessions"]


def compare(paths):
    bad = 0
    for a_path, b_path in zip(paths[0::2], paths[1::2]):
        a, b = load(a_path), load(b_path)
        diff = [x["session"] for x, y in zip(a, b)
                if (x["text"], x["logprobs"]) != (y["text"], y["logprobs"])]
        if len(a) != len(b) or diff:
            bad += 1
            print("%s vs %s: %d sessions, answers differ in sessions %s" % (
                a_path, b_path, len(a), diff[:10]))
        else:
            print("%s vs %s: all %d answers equal (text and logprobs)" % (a_path, b_path, len(a)))
    return 1 if bad else 0


def summary(records):
    t = sorted(r["ttft_s"] for r in records)
    p99 = t[min(len(t) - 1, int(round(0.99 * (len(t) - 1))))]
    prompt = statistics.mean(r["prompt_tokens"] for r in records)
    cached = statistics.mean(r["cached_tokens"] for r in records)
    return statistics.median(t), p99, prompt, cached


def report(cold_path, restart_path):
    rows = []
    for label, path in (("cold daemon", cold_path), ("after restart", restart_path)):
        rows.append(summary(load(path)))
        p50, p99, prompt, cached = rows[-1]
        print("%-14s TTFT p50 %8.3f s  p99 %8.3f s  prompt tokens %.0f  cached %.0f" % (
            label, p50, p99, prompt, cached))
    print("TTFT p50 ratio cold / restart: %.1fx" % (rows[0][0] / rows[1][0]))
    if rows[0][3] > 0.05 * rows[0][2]:
        print("warning: the cold daemon found %.0f of %.0f prompt tokens cached: its pool kept "
              "the sessions, so this is not a cold prefill (use more sessions)" % (
                  rows[0][3], rows[0][2]))
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=("first", "next", "compare", "report"))
    ap.add_argument("files", nargs="*")
    ap.add_argument("--url", default="http://127.0.0.1:18931")
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--first-tokens", type=int, default=16)
    ap.add_argument("--next-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--state", help="next: the file `first` wrote")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.phase == "compare":
        return compare(args.files)
    if args.phase == "report":
        return report(*args.files)
    run_phase(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
