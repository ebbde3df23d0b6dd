#!/usr/bin/env python3
"""test_pool_exhaustion.py - more KV demand than exists: everything completes or gets 429.

    python3 tests/soak/test_pool_exhaustion.py BUILD_DIR

The daemon gets a 40-block pool (640 tokens), 8 sequence slots and a waiting queue of
12. Greedy results of six prompts are taken solo first. Then 32 clients at once send
those prompts (about 150 tokens each with the answer, so 8 running sequences would
need twice the pool): each request must end within its deadline either 200 with the
exact solo text (preemption and recomputation change nothing) or 429 (queue full);
the engine must have preempted. Alongside: a prompt longer than the whole pool is
refused (400) at once, a request whose max_tokens exceeds what the pool can hold is
capped and finishes "length", and n=4 choices sharing one prompt complete. Afterwards
no KV block is in use and SIGTERM exits 0.
"""

import threading
import time

import soaklib
from soaklib import check

build = soaklib.build_dir_from_argv()
NUM_BLOCKS = 40
BLOCK_SIZE = 16
MAX_TOKENS = 96
CLIENTS = 32
DEADLINE_S = 300
WORDS = ("time people year way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government number "
         "night point home water room mother area money story fact month lot right study book eye job word "
         "business issue side kind head house service friend father power hour game line end member law car "
         "city community name president team minute idea kid body information back parent face others level "
         "office door health person art war history party result change morning reason research girl guy").split()
PROMPTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(36 + 4 * i)) for i in range(6)]
state = {}


def kvd():
    return state["kvd"]


def body(prompt, **extra):
    b = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    b.update(extra)
    return b


def start():
    soaklib.require_daemon(build)
    state["kvd"] = soaklib.Daemon(build, "--kv-num-blocks", NUM_BLOCKS, "--block-size", BLOCK_SIZE,
                                  "--max-num-seqs", 8, "--max-queue", 12).start()


def solo_baseline():
    state["solo"] = []
    for p in PROMPTS:
        status, r = kvd().post("/v1/completions", body(p))
        check(status == 200, "solo request answered %d: %s" % (status, r))
        check(r["usage"]["completion_tokens"] == MAX_TOKENS, "solo usage %s" % r["usage"])
        state["solo"].append(r["choices"][0]["text"])
    kvd().wait_idle(30)


def overload():
    before = kvd().metrics()
    results = [None] * CLIENTS

    def client(i):
        t0 = time.monotonic()
        try:
            status, r = kvd().post("/v1/completions", body(PROMPTS[i % len(PROMPTS)]), timeout=DEADLINE_S)
            results[i] = (status, r, time.monotonic() - t0)
        except Exception as e:  # a timeout is a hang: reported below
            results[i] = ("exception", repr(e), time.monotonic() - t0)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S + 30)
    check(all(r is not None for r in results), "some clients got no answer within %d s" % DEADLINE_S)
    ok = busy = 0
    for i, (status, r, secs) in enumerate(results):
        if status == 200:
            text = r["choices"][0]["text"]
            check(r["usage"]["completion_tokens"] == MAX_TOKENS, "client %d: usage %s" % (i, r["usage"]))
            check(text == state["solo"][i % len(PROMPTS)],
                  "client %d: greedy text under pressure differs from the solo run:\n  solo %r\n  load %r"
                  % (i, state["solo"][i % len(PROMPTS)], text))
            ok += 1
        elif status == 429:
            check(r and r.get("error", {}).get("message"), "client %d: 429 without an error message" % i)
            busy += 1
        else:
            raise soaklib.Failure("client %d: %s after %.1f s: %s" % (i, status, secs, str(r)[:300]))
    m = kvd().wait_idle(60)
    preempted = m["kvd:num_preemptions_total"] - before["kvd:num_preemptions_total"]
    check(ok > 0, "no request completed (%d got 429)" % busy)
    check(preempted > 0, "the pool never ran out: no preemption (the test's premise failed)")
    slowest = max(secs for _, _, secs in results)
    print("    %d completed with the solo text, %d got 429, %d preemptions, slowest %.1f s"
          % (ok, busy, preempted, slowest), flush=True)


def longer_than_pool():
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(NUM_BLOCKS * BLOCK_SIZE + 50))
    t0 = time.monotonic()
    status, r = kvd().post("/v1/completions", body(prompt), timeout=60)
    check(status == 400, "a prompt longer than the pool answered %d (want 400): %s" % (status, r))
    check(time.monotonic() - t0 < 30, "refusing it took %.1f s" % (time.monotonic() - t0))


def max_tokens_over_pool():
    status, r = kvd().post("/v1/completions", body(PROMPTS[0], max_tokens=4000), timeout=DEADLINE_S)
    check(status == 200, "max_tokens over the pool answered %d: %s" % (status, r))
    usage = r["usage"]
    check(r["choices"][0]["finish_reason"] == "length", "finish_reason %s" % r["choices"][0]["finish_reason"])
    check(usage["prompt_tokens"] + usage["completion_tokens"] <= NUM_BLOCKS * BLOCK_SIZE,
          "more tokens than the pool holds: %s" % usage)
    kvd().wait_idle(30)


def shared_prompt_choices():
    status, r = kvd().post("/v1/completions", body(PROMPTS[1], n=4, max_tokens=64), timeout=DEADLINE_S)
    check(status == 200, "n=4 answered %d: %s" % (status, r))
    check(len(r["choices"]) == 4 and all(c["finish_reason"] == "length" for c in r["choices"]),
          "n=4 choices: %s" % [c.get("finish_reason") for c in r.get("choices", [])])
    # Greedy: every choice is the solo text's first 64 tokens' worth; at least all equal.
    texts = set(c["text"] for c in r["choices"])
    check(len(texts) == 1, "greedy choices differ: %s" % texts)
    check(state["solo"][1].startswith(texts.pop()), "greedy n=4 text is not a prefix of the solo text")
    kvd().wait_idle(30)


def stop():
    status = kvd().stop()
    kvd().check_clean_exit(status)


try:
    soaklib.run([("start", start), ("solo baseline", solo_baseline), ("32 clients on 40 blocks", overload),
                 ("prompt longer than the pool", longer_than_pool), ("max_tokens over the pool", max_tokens_over_pool),
                 ("n=4 on a shared prompt", shared_prompt_choices), ("SIGTERM", stop)])
finally:
    if "kvd" in state:
        state["kvd"].kill()
