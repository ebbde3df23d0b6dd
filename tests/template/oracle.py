#!/usr/bin/python3
"""Chat templates rendered by kvd's engine vs Debian's python3-jinja2, byte for byte.

The oracle environment is set up exactly as Hugging Face's apply_chat_template sets it
(transformers/utils/chat_template_utils.py, _compile_jinja_template):
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loopcontrols),
tojson = json.dumps(x, ensure_ascii=False, indent, separators, sort_keys), and the
globals raise_exception and strftime_now; render(messages=..., tools=... or None,
add_generation_prompt=..., plus the special tokens and template kwargs).

A seeded generator makes the corpus (the same bytes every run); both renderers run at
test time, so no expected output is committed and jinja2 stays the only authority.
For each template every conversation must either render to identical bytes in both,
or fail in both (a template that raises, e.g. Qwen3 on null content). The test also
checks provenance: every byte kvd marks as template text must be template text, i.e.
a message's content never lands in a span kvd would scan for special tokens.

usage: oracle.py DRIVER [--count N] [--seed S] [--dump DIR]
"""
import argparse
import datetime
import json
import os
import random
import subprocess
import sys

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "templates")
MODEL_TEMPLATES = ["qwen2.5-instruct", "qwen3", "deepseek-r1-distill-qwen"]
EDGE_TEMPLATES = ["edge_constructs", "edge_whitespace", "edge_json", "edge_macros"]


def hf_environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


# ---------------------------------------------------------------- corpus

WORDS = ["hello", "weather", "Paris", "tool", "result", "the", "a", "function", "call", "why",
         "données", "über", "naïve", "日本語", "中文测试", "Привет", "مرحبا", "שלום", "😀", "🚀✨",
         "e\u0301", "\u200b", "tab\there", "line\nbreak", "  spaced  ", "quote\"s", "it's",
         "back\\slash", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>",
         "</think>", "{{ not a tag }}", "{% if %}", "<｜User｜>", "\r\n", "\x1f", "\x7f",
         "\u2028", "{\"json\": 1}", "[1, 2]", "None", "true"]


def text(rng, lo=0, hi=12):
    n = rng.randint(lo, hi)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def long_text(rng):
    return (text(rng, 5, 10) + " ") * rng.randint(200, 600)


def content(rng):
    r = rng.random()
    if r < 0.05:
        return ""
    if r < 0.08:
        return long_text(rng)
    return text(rng, 1, 14)


def json_value(rng, depth=0):
    r = rng.random()
    if depth > 2 or r < 0.3:
        return rng.choice([text(rng, 1, 3), rng.randint(-1000, 10 ** 12), rng.choice([True, False]), None,
                           rng.choice([0.5, -2.25, 3.14159, 1e-07, 1.5e+300, 123456.789])])
    if r < 0.6:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["city", "unit", "q", "n", "ключ", "日付", "a b", "x\"y"]) + str(i): json_value(rng, depth + 1)
            for i in range(rng.randint(0, 3))}


def tool(rng, i):
    props = {}
    for k in range(rng.randint(0, 4)):
        kind = rng.choice(["string", "integer", "number", "boolean", "array", "object"])
        p = {"type": kind, "description": text(rng, 0, 6)}
        if kind == "string" and rng.random() < 0.3:
            p["enum"] = [text(rng, 1, 1) for _ in range(rng.randint(1, 3))]
        if kind == "array":
            p["items"] = {"type": "string"}
        props["arg%d" % k] = p
    fn = {"name": "fn_%d_%s" % (i, rng.choice(["get", "set", "search", "日本"])),
          "description": text(rng, 0, 10),
          "parameters": {"type": "object", "properties": props, "required": sorted(props)[:1]}}
    if rng.random() < 0.2:
        del fn["description"]
    return {"type": "function", "function": fn}


def tool_call(rng, i, string_args):
    args = {"arg%d" % k: json_value(rng) for k in range(rng.randint(0, 3))}
    return {"id": "call_%d" % i, "type": "function",
            "function": {"name": "fn_%d" % i, "arguments": json.dumps(args, ensure_ascii=rng.random() < 0.5)
                         if string_args else args}}


def conversation(rng, template):
    """One request's variables. Shapes follow what each template accepts; some cases
    are expected to make both renderers fail (the template raises or hits None)."""
    deepseek = template == "deepseek-r1-distill-qwen"
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": content(rng)})
    turns = rng.randint(1, 10)
    call_id = 0
    for t in range(turns):
        msgs.append({"role": "user", "content": content(rng)})
        if t == turns - 1 and rng.random() < 0.5:
            break
        r = rng.random()
        if r < 0.3:
            calls = [tool_call(rng, call_id + k, deepseek or rng.random() < 0.4) for k in range(rng.randint(1, 3))]
            call_id += len(calls)
            c = rng.random()
            msg = {"role": "assistant", "tool_calls": calls,
                   "content": None if (deepseek or c < (0.01 if template == "qwen3" else 0.15)) else ("" if c < 0.6 else content(rng))}
            msgs.append(msg)
            for call in calls:
                msgs.append({"role": "tool", "tool_call_id": call["id"], "content": content(rng)})
            if rng.random() < 0.7:
                msgs.append({"role": "assistant", "content": content(rng)})
        else:
            c = content(rng)
            if rng.random() < 0.3:
                c = "<think>\n" + text(rng, 1, 8) + "\n</think>\n\n" + c
            msg = {"role": "assistant", "content": c}
            if template == "qwen3" and rng.random() < 0.2:
                msg["reasoning_content"] = rng.choice([None, "", text(rng, 1, 8)])
            msgs.append(msg)
        if rng.random() < 0.05:
            msgs.append({"role": "system", "content": content(rng)})
    if rng.random() < 0.05:
        msgs = [m for m in msgs if m["role"] != "user"] or msgs  # odd shapes the templates must survive
    tools = None
    if rng.random() < 0.45:
        tools = [tool(rng, i) for i in range(rng.randint(1, 5))]
    v = {"messages": msgs, "tools": tools, "add_generation_prompt": rng.random() < 0.7}
    if template == "qwen3" and rng.random() < 0.4:
        v["enable_thinking"] = rng.choice([True, False])
    if rng.random() < 0.1:
        v.pop("add_generation_prompt")
    return v


TRUSTED = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "unk_token": None}


def corpus(template, count, seed):
    rng = random.Random("%s/%d" % (template, seed))
    return [conversation(rng, template) for _ in range(count)]


# ---------------------------------------------------------------- comparison

SPECIALS = [("<|im_start|>", "<|im_Xtart|>"), ("<|im_end|>", "<|im_Xnd|>"), ("<|endoftext|>", "<|Xndoftext|>"),
            ("<｜User｜>", "<｜Xser｜>")]


def defuse(v):
    if isinstance(v, str):
        for token, harmless in SPECIALS:
            v = v.replace(token, harmless)
        return v
    if isinstance(v, list):
        return [defuse(x) for x in v]
    if isinstance(v, dict):
        return {k: defuse(x) for k, x in v.items()}
    return v


def specials_at(text, mask):
    """Offsets of special tokens lying wholly in template text (mask None: everywhere)."""
    found = set()
    for token, _ in SPECIALS:
        t = token.encode()
        k = text.find(t)
        while k >= 0:
            if mask is None or not any(mask[k:k + len(t)]):
                found.add((k, token))
            k = text.find(t, k + 1)
    return found


def run(driver, template, cases, env):
    path = os.path.join(TEMPLATES, template + ".jinja")
    source = open(path, encoding="utf-8").read()
    compiled = env.from_string(source)
    lines = "".join(json.dumps({"template": path, "vars": v, "trusted": TRUSTED}) + "\n" for v in cases)
    proc = subprocess.run([driver], input=lines.encode(), capture_output=True, check=True)
    outputs = [json.loads(l) for l in proc.stdout.decode().split("\n") if l]
    assert len(outputs) == len(cases), "driver returned %d lines for %d cases" % (len(outputs), len(cases))
    failures, both_failed = [], 0
    for i, (v, got) in enumerate(zip(cases, outputs)):
        try:
            want = compiled.render(**TRUSTED, **v)
        except Exception as e:  # the template raised or hit a type error: kvd must fail too
            want = e
        if isinstance(want, Exception):
            if got["ok"]:
                failures.append((i, "jinja2 failed (%s: %s) but kvd rendered" % (type(want).__name__, want)))
            else:
                both_failed += 1
            continue
        if not got["ok"]:
            failures.append((i, "kvd failed: %s" % got["error"]))
            continue
        if got["text"] != want:
            a, b = got["text"], want
            k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
            failures.append((i, "differs at %d: kvd %r, jinja2 %r" % (k, a[max(0, k - 30):k + 40], b[max(0, k - 30):k + 40])))
            continue
        # provenance: kvd's template-text bytes must hold exactly the special tokens the
        # template itself wrote. jinja2 renders again with every typed special token
        # defused by a same-length change, so the remaining tokens are the template's.
        defused = compiled.render(**TRUSTED, **defuse(v))
        text = got["text"].encode()
        mask = bytearray(len(text))
        for off, n in got["data_spans"]:
            mask[off:off + n] = b"\x01" * n
        if specials_at(text, mask) != specials_at(defused.encode(), None):
            failures.append((i, "special tokens in kvd's template text differ from the template's own"))
    return failures, both_failed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("driver")
    ap.add_argument("--count", type=int, default=320)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only")
    args = ap.parse_args()
    env = hf_environment()
    total_failures = 0
    for template in MODEL_TEMPLATES + EDGE_TEMPLATES:
        if args.only and template != args.only:
            continue
        cases = corpus(template, args.count, args.seed)
        failures, both_failed = run(args.driver, template, cases, env)
        print("%-26s %d conversations: %d identical, %d rejected by both, %d mismatches"
              % (template, len(cases), len(cases) - both_failed - len(failures), both_failed, len(failures)))
        for i, why in failures[:5]:
            print("  case %d: %s" % (i, why))
        if len(cases) - both_failed < len(cases) * 0.6:
            print("  too few conversations rendered: the corpus no longer exercises the template")
            total_failures += 1
        total_failures += len(failures)
    sys.exit(1 if total_failures else 0)


if __name__ == "__main__":
    main()
