"""test_requests.py - request semantics end to end (issue 13, defects 9, 10, 12, 13, 14).

The real daemon on the tiny fixture. Each test fails on the daemon before these fixes:
NUL characters cut prompts silently; 63 or 64 stop_token_ids were refused in chat;
min_tokens, include_stop_str_in_output, logit_bias, echo, add_generation_prompt,
seed -1 and continuous_usage_stats were ignored (or refused), foreign fields ignored;
choice 1 of seed 42 was choice 0 of seed 43; a model whose lm_head is wider than its
tokenizer sampled ids that have no text. Token ids are read exactly through
return_tokens_as_token_ids; runner-up ids through greedy top_logprobs.
"""

import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvd_e2e import BUILD_ROOT, TOKENIZER_JSON, Daemon, check_error, run_tests  # noqa: E402

GREEDY = {"temperature": 0, "repetition_penalty": 1.0, "ignore_eos": True}
PROMPT = "Hello, my name is"
TOKENIZER_IDS = 151669  # Qwen2's tokenizer; the fixture's lm_head has 151936 rows

daemon = None


def post_ok(path, body):
    status, resp = daemon.post(path, body)
    assert status == 200, (status, resp)
    return resp


def completion(**fields):
    return post_ok("/v1/completions", dict(GREEDY, prompt=PROMPT, **fields))


def ids_of(choice):
    return [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]


def runner_ups(choice):
    """The raw row's second-best id at each step (greedy, logprobs >= 2)."""
    return [int(sorted(top.items(), key=lambda kv: -kv[1])[1][0].split(":")[1])
            for top in choice["logprobs"]["top_logprobs"]]


def refused(path, body, param, words):
    status, resp = daemon.post(path, body)
    assert status == 400, (status, resp)
    err = check_error(resp, param)
    assert words in err["message"], err
    return err


# ---- defect 9: NUL characters ----

def test_nul_refused_never_cut():
    # Before: "a\u0000b" reached the tokenizer as "a" (a 200 for another prompt).
    refused("/v1/completions", dict(GREEDY, prompt="Hello\u0000 world", max_tokens=2), "prompt", "NUL")
    refused("/v1/chat/completions", dict(GREEDY, max_tokens=2, messages=[
        {"role": "user", "content": "x\u0000y"}]), "messages", "NUL")
    refused("/v1/completions", dict(GREEDY, prompt=PROMPT, max_tokens=2, stop=["ok", "a\u0000"]), "stop", "NUL")
    refused("/tokenize", {"prompt": "a\u0000b"}, "prompt", "NUL")
    daemon.wait_for_line(r"refused POST /v1/completions: prompt: a string holds a NUL", 10)


# ---- defect 10: 64 stop_token_ids in chat ----

def test_chat_takes_64_stop_token_ids():
    # Without ignore_eos the chat adds its two turn-ending ids, which used to count
    # against the client's 64.
    messages = [{"role": "user", "content": "x"}]
    chat = dict(GREEDY, messages=messages, max_tokens=2, ignore_eos=False)
    for count in (63, 64):
        resp = post_ok("/v1/chat/completions", dict(chat, stop_token_ids=list(range(100, 100 + count))))
        assert resp["choices"][0]["finish_reason"] in ("length", "stop"), resp
    refused("/v1/chat/completions", dict(chat, stop_token_ids=list(range(100, 165))), "stop_token_ids", "at most 64")


# ---- defect 12: every field honored or refused by name ----

def test_logit_bias_honored():
    ref = completion(max_tokens=6, logprobs=2, return_tokens_as_token_ids=True)["choices"][0]
    first = ids_of(ref)[0]
    down = completion(max_tokens=6, logprobs=0, return_tokens_as_token_ids=True,
                      logit_bias={str(first): -100})["choices"][0]
    assert ids_of(down)[0] == runner_ups(ref)[0], (ids_of(down), runner_ups(ref))
    up = completion(max_tokens=5, logprobs=0, return_tokens_as_token_ids=True,
                    logit_bias={"12345": 100})["choices"][0]
    assert ids_of(up) == [12345] * 5, ids_of(up)
    refused("/v1/completions", dict(GREEDY, prompt=PROMPT, logit_bias={"5": 101}), "logit_bias", "[-100, 100]")
    refused("/v1/completions", dict(GREEDY, prompt=PROMPT, logit_bias={str(TOKENIZER_IDS): 1}), "logit_bias",
            "not a token id")


def test_min_tokens_honored():
    ref = completion(max_tokens=12, logprobs=2, return_tokens_as_token_ids=True)["choices"][0]
    ids = ids_of(ref)
    k = next(t for t in range(2, 12) if ids[t] not in ids[:t])
    stop_id = ids[k]
    cut = completion(max_tokens=12, logprobs=0, return_tokens_as_token_ids=True,
                     stop_token_ids=[stop_id])["choices"][0]
    assert ids_of(cut) == ids[:k + 1] and cut["finish_reason"] == "stop", (ids_of(cut), ids, k)
    held = completion(max_tokens=12, logprobs=0, return_tokens_as_token_ids=True, stop_token_ids=[stop_id],
                      min_tokens=k + 2)["choices"][0]
    got = ids_of(held)
    assert len(got) >= k + 2 and got[:k] == ids[:k], (got, ids, k)
    assert got[k] == runner_ups(ref)[k], (got, runner_ups(ref), k)  # the stop id was masked there
    assert stop_id not in got[:k + 2]
    refused("/v1/completions", dict(GREEDY, prompt=PROMPT, max_tokens=4, min_tokens=5), "min_tokens",
            "must not exceed max_tokens")


def test_include_stop_str_in_output_honored():
    text = completion(max_tokens=16)["choices"][0]["text"]
    stop = text[4:7]
    assert len(stop) == 3, text
    end = text.index(stop) + len(stop)
    resp = completion(max_tokens=16, stop=stop, include_stop_str_in_output=True)["choices"][0]
    assert resp["text"] == text[:end] and resp["finish_reason"] == "stop", (resp, text, stop)
    resp = completion(max_tokens=16, stop=stop)["choices"][0]
    assert resp["text"] == text[:text.index(stop)], (resp, text, stop)


def test_echo_honored_and_refused_with_logprobs():
    plain = completion(max_tokens=5, n=2)
    echoed = completion(max_tokens=5, n=2, echo=True)
    for a, b in zip(plain["choices"], echoed["choices"]):
        assert b["text"] == PROMPT + a["text"], (a, b)
    status, head, events = daemon.stream("/v1/completions", dict(GREEDY, prompt=PROMPT, max_tokens=5, echo=True,
                                                                 stream=True))
    assert status == 200 and events[-1] == "[DONE]"
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert events[0]["choices"][0]["text"] == PROMPT and streamed == PROMPT + plain["choices"][0]["text"]
    # Token-id prompts echo their decoded text.
    ids = post_ok("/tokenize", {"prompt": PROMPT})["tokens"]
    resp = post_ok("/v1/completions", dict(GREEDY, prompt=ids, max_tokens=5, echo=True))
    assert resp["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"], resp
    refused("/v1/completions", dict(GREEDY, prompt=PROMPT, echo=True, logprobs=1), "echo", "logprobs")
    refused("/v1/chat/completions", dict(GREEDY, messages=[{"role": "user", "content": "x"}], echo=True), "echo",
            "/v1/completions only")


def test_suffix_and_prompt_logprobs_refused():
    refused("/v1/completions", dict(GREEDY, prompt=PROMPT, suffix="tail"), "suffix",
            "suffix is not currently supported")
    refused("/v1/completions", dict(GREEDY, prompt=PROMPT, prompt_logprobs=1), "prompt_logprobs", "not supported")
    refused("/v1/chat/completions", dict(GREEDY, messages=[{"role": "user", "content": "x"}], prompt_logprobs=0),
            "prompt_logprobs", "not supported")


def test_add_generation_prompt_on_tokenize():
    messages = [{"role": "user", "content": "Hi"}]
    with_prompt = post_ok("/tokenize", {"messages": messages})["tokens"]
    without = post_ok("/tokenize", {"messages": messages, "add_generation_prompt": False})["tokens"]
    # <|im_start|> "assistant" "\n" (151644, 77091, 198) close the one, not the other.
    assert with_prompt[-3:] == [151644, 77091, 198], with_prompt
    assert with_prompt[:-3] == without and without[-2:] == [151645, 198], (with_prompt, without)
    refused("/tokenize", {"prompt": "x", "add_generation_prompt": True}, "add_generation_prompt", "messages")


def test_seed_minus_one_is_random():
    body = dict(prompt=PROMPT, max_tokens=12, temperature=1.5, top_k=0, top_p=1.0, ignore_eos=True, seed=-1)
    texts = {post_ok("/v1/completions", body)["choices"][0]["text"] for _ in range(3)}
    assert len(texts) > 1, texts  # before: -1 was the fixed seed 2^64 - 1
    fixed = dict(body, seed=-2)
    assert post_ok("/v1/completions", fixed)["choices"][0]["text"] == \
        post_ok("/v1/completions", fixed)["choices"][0]["text"]


def test_continuous_usage_stats():
    status, head, events = daemon.stream("/v1/completions", dict(
        GREEDY, prompt=PROMPT, max_tokens=4, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert status == 200 and events[-1] == "[DONE]", events
    chunks = [e for e in events[:-1] if e["choices"]]
    assert len(chunks) >= 4
    completions = [c["usage"]["completion_tokens"] for c in chunks]
    assert completions[:4] == [1, 2, 3, 4], completions
    for c in chunks:
        u = c["usage"]
        assert u["prompt_tokens"] == 5 and u["total_tokens"] == 5 + u["completion_tokens"], u
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 4
    refused("/v1/completions", dict(GREEDY, prompt=PROMPT, stream=True,
                                    stream_options={"continuous_usage_stats": True}),
            "stream_options.continuous_usage_stats", "include_usage")


def test_foreign_fields_refused_and_logged():
    for name, value in (("n_predict", 8), ("mirostat", 2),
                        ("guided_decoding_backend", "xgrammar"), ("typical_p", 0.5), ("use_beam_search", True)):
        refused("/v1/chat/completions", dict(GREEDY, messages=[{"role": "user", "content": "x"}], **{name: value}),
                name, "not supported by kvd")
        daemon.wait_for_line(r"refused /v1/chat/completions: %s: this field is not supported" % name, 10)
    refused("/v1/completions", dict(GREEDY, prompt=PROMPT, max_token=3), "max_token", "not supported by kvd")


# ---- defect 13: per-choice streams ----

def test_choices_of_neighbouring_seeds_differ():
    sampled = dict(prompt=PROMPT, max_tokens=10, temperature=1.0, top_k=0, top_p=1.0, ignore_eos=True,
                   logprobs=0, return_tokens_as_token_ids=True)
    two = post_ok("/v1/completions", dict(sampled, seed=42, n=2))["choices"]
    next_seed = post_ok("/v1/completions", dict(sampled, seed=43))["choices"][0]
    alone = post_ok("/v1/completions", dict(sampled, seed=42))["choices"][0]
    assert ids_of(two[0]) == ids_of(alone)  # choice 0 is the seed itself
    assert ids_of(two[1]) != ids_of(next_seed), (ids_of(two[1]), ids_of(next_seed))
    assert ids_of(two[1]) != ids_of(two[0])
    again = post_ok("/v1/completions", dict(sampled, seed=42, n=2))["choices"]
    assert [ids_of(c) for c in again] == [ids_of(c) for c in two]


# ---- defect 14: lm_head rows past the tokenizer ----

def test_padding_rows_never_sampled():
    # The tiny preset with seed 7: greedy step 17 of this chat is row 151780 (numpy
    # reference, see test_kvd_gen.py); streamed, with logprobs, it must not appear.
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "seed7")
        subprocess.run([os.path.join(BUILD_ROOT, "tools", "kvd-mkmodel"), "--out", model, "--preset", "tiny",
                        "--seed", "7", "--tokenizer", TOKENIZER_JSON], check=True, stdout=subprocess.DEVNULL)
        with Daemon(model=model) as d:
            body = dict(GREEDY, messages=[{"role": "user", "content": "hi"}], max_tokens=24, stream=True,
                        logprobs=True, top_logprobs=5, return_tokens_as_token_ids=True)
            status, head, events = d.stream("/v1/chat/completions", body)
            assert status == 200 and events[-1] == "[DONE]", events
            seen = []
            for e in events[:-1]:
                lp = e["choices"][0].get("logprobs") if e["choices"] else None
                for entry in (lp or {}).get("content") or []:
                    seen.append(int(entry["token"].split(":")[1]))
                    seen += [int(t["token"].split(":")[1]) for t in entry["top_logprobs"]]
            assert len(seen) == 24 * 6, len(seen)
            assert max(seen) < TOKENIZER_IDS, [i for i in seen if i >= TOKENIZER_IDS]
            # Whole (non-streamed) too: the same ids.
            whole = d.post("/v1/chat/completions", dict(body, stream=False))[1]["choices"][0]
            ids = [int(e["token"].split(":")[1]) for e in whole["logprobs"]["content"]]
            assert ids == seen[::6], (ids, seen[::6])


def main():
    global daemon
    with Daemon() as d:
        daemon = d
        run_tests(globals())


if __name__ == "__main__":
    main()
