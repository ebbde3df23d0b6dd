"""test_tool_choice.py - tool_choice "required" and a named function, end to end.

The tiny fixture has random weights: left alone it never writes a call. With
tool_choice "required" (or a named function) the daemon primes the assistant turn with
"<tool_call>\\n" and the grammar engine forces the rest to {"name": ..., "arguments":
...} against the offered tools' parameter schemas, so at temperature 1 every answer
must still be an OpenAI tool_calls answer. The oracle is independent of the C code:
Debian's python3-jsonschema validates every call's arguments against its tool's schema.
"""

import json
import os
import sys

import jsonschema

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvd_e2e import Daemon, check_error, run_tests  # noqa: E402

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                       "properties": {"city": {"type": "string", "maxLength": 12},
                                      "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "book_table", "description": "Reserve a table",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["people", "when"],
                       "properties": {"people": {"type": "integer"},
                                      "when": {"type": "object", "additionalProperties": False,
                                               "required": ["day"],
                                               "properties": {"day": {"enum": ["mon", "tue", "sun"]},
                                                              "late": {"type": "boolean"}}},
                                      "notes": {"type": "array", "maxItems": 2,
                                                "items": {"type": "string", "maxLength": 6}}}}}},
    {"type": "function", "function": {"name": "ping", "description": "No arguments"}},
]
# A function without parameters takes no arguments: {} (as OpenAI).
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "additionalProperties": False})
           for t in TOOLS}
MESSAGES = [{"role": "user", "content": "Help me plan the evening."}]
SAMPLED = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_tokens": 400}

daemon = None


def check_call(call, names):
    assert call["type"] == "function", call
    assert call["id"], call
    name = call["function"]["name"]
    assert name in names, (name, names)
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, SCHEMAS[name])
    return name


def whole(seed, tool_choice):
    status, resp = daemon.post("/v1/chat/completions", dict(SAMPLED, messages=MESSAGES, tools=TOOLS,
                                                            tool_choice=tool_choice, seed=seed))
    assert status == 200, resp
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    calls = choice["message"]["tool_calls"]
    assert len(calls) == 1, calls  # a forced answer is one call
    assert not choice["message"]["content"], choice
    return calls[0]


def test_required_calls_an_offered_function():
    names = set()
    for seed in range(10):
        names.add(check_call(whole(seed, "required"), set(SCHEMAS)))
    assert len(names) >= 2, names  # the model chooses among the tools, it is not steered to one


def test_named_function_is_called():
    for name in SCHEMAS:
        for seed in range(4):
            choice = {"type": "function", "function": {"name": name}}
            assert check_call(whole(100 + seed, choice), {name}) == name


def test_streamed_required_call():
    for seed in range(4):
        body = dict(SAMPLED, messages=MESSAGES, tools=TOOLS, tool_choice="required", seed=seed, stream=True)
        status, _, events = daemon.stream("/v1/chat/completions", body)
        assert status == 200, events
        assert events[-1] == "[DONE]", events
        calls, finish = {}, None
        for ev in events[:-1]:
            delta = ev["choices"][0]["delta"] if ev["choices"] else {}
            assert not delta.get("content"), ev
            for tc in delta.get("tool_calls", []):
                call = calls.setdefault(tc["index"], {"id": None, "type": None,
                                                      "function": {"name": None, "arguments": ""}})
                if "id" in tc:
                    call["id"], call["type"] = tc["id"], tc["type"]
                    call["function"]["name"] = tc["function"]["name"]
                call["function"]["arguments"] += tc["function"].get("arguments", "")
            if ev["choices"] and ev["choices"][0].get("finish_reason"):
                finish = ev["choices"][0]["finish_reason"]
        assert finish == "tool_calls", events
        assert list(calls) == [0], calls
        check_call(calls[0], set(SCHEMAS))
        # the same seed whole gives the same call
        same = whole(seed, "required")
        assert same["function"] == calls[0]["function"], (same, calls[0])


def test_prompt_is_primed_with_the_tag():
    status, resp = daemon.post("/apply-template", {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required"})
    assert status == 200, resp
    assert resp["prompt"].endswith("<|im_start|>assistant\n<tool_call>\n"), resp
    # <tool_call> is the model's own tag token, not its letters
    status, resp = daemon.post("/tokenize", {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required"})
    assert status == 200, resp
    assert resp["tokens"][-2:] == [151657, 198], resp["tokens"][-4:]


def test_forced_call_errors():
    cases = [({"tool_choice": "required"}, "tool_choice", "needs \"tools\""),
             ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
              "tool_choice.function.name", "names no function"),
             ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
              "tool_choice", "only one of")]
    for extra, param, words in cases:
        status, resp = daemon.post("/v1/chat/completions", dict(SAMPLED, messages=MESSAGES, **extra))
        assert status == 400, resp
        check_error(resp, param)
        assert words in resp["error"]["message"], resp


if __name__ == "__main__":
    with Daemon("--kv-cache-mb", "16") as daemon:
        run_tests(globals())
