"""test_tools.py - chat templates and tool calling end to end, against the tiny fixture.

The tiny fixture has random weights, so it never writes a tool call by itself. The
tests drive one the way a client can: an assistant prefill that holds the call
(continue_final_message), with the first token the model would write next made a stop
token (stop_token_ids, learnt from a greedy run with logprobs), so the turn ends at
once and the call comes from the turn as the prefill wrote it. Everything after that
is the real path: the template renders the tools and the prefill, the tool-call
parser reads the turn, the response is OpenAI-shaped, whole and streamed. Expected
prompts come from Qwen2.5's template as jinja2 renders it (tests/template/oracle.py
checks the engine against jinja2 on 320 conversations); here they are literal text.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvd_e2e import Daemon, check_error, run_tests  # noqa: E402

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
USER = {"role": "user", "content": "What is the weather in Paris?"}
GREEDY = {"temperature": 0, "repetition_penalty": 1.0}
SYSTEM_WITH_TOOLS = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) +
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n")

daemon = None
stop_id = None


def prefilled(prefill, **fields):
    body = dict(GREEDY, messages=[USER, {"role": "assistant", "content": prefill}], tools=TOOLS,
                continue_final_message=True, **fields)
    return body


def first_token_after(prefill):
    """The token the model writes first after the prefill (greedy)."""
    status, resp = daemon.post("/v1/chat/completions", prefilled(prefill, max_tokens=1, logprobs=True,
                                                                 return_tokens_as_token_ids=True))
    assert status == 200, resp
    token = resp["choices"][0]["logprobs"]["content"][0]["token"]
    assert token.startswith("token_id:"), token
    return int(token.split(":")[1])


def test_apply_template_renders_tools_and_history():
    status, resp = daemon.post("/apply-template", {"messages": [USER], "tools": TOOLS})
    assert status == 200, resp
    assert resp == {"prompt": SYSTEM_WITH_TOOLS + "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
                              "<|im_start|>assistant\n"}, resp
    # OpenAI's history shape: arguments as a JSON string, null content, tool_call_id
    history = [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "humid"}]}]
    status, resp = daemon.post("/apply-template", {"messages": history, "tools": TOOLS})
    assert status == 200, resp
    assert resp["prompt"].endswith(
        "<|im_start|>assistant\n" + CALL + "<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny, 21 C\n"
        "</tool_response>\n<tool_response>\nhumid\n</tool_response><|im_end|>\n<|im_start|>assistant\n"), resp
    # tool_choice none: no tools in the prompt; the plain chat is as it always was
    status, resp = daemon.post("/apply-template", {"messages": [USER], "tools": TOOLS, "tool_choice": "none"})
    assert status == 200 and "# Tools" not in resp["prompt"], resp
    assert resp["prompt"].startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                                     "assistant.<|im_end|>\n<|im_start|>user\n"), resp
    # /tokenize takes the same messages and tools
    status, tok = daemon.post("/tokenize", {"messages": [USER], "tools": TOOLS})
    assert status == 200 and tok["count"] > 150, tok


def test_tool_call_whole():
    global stop_id
    stop_id = first_token_after(CALL)
    status, resp = daemon.post("/v1/chat/completions", prefilled(CALL, max_tokens=8, stop_token_ids=[stop_id]))
    assert status == 200, resp
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    msg = choice["message"]
    assert msg["role"] == "assistant" and msg["content"] is None, msg
    assert len(msg["tool_calls"]) == 1, msg
    call = msg["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_"), call
    assert call["function"]["name"] == "get_weather", call
    assert isinstance(call["function"]["arguments"], str), call
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}, call


def test_parallel_calls():
    two = ("Checking both.\n" + CALL + "\n" +
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>')
    sid = first_token_after(two)
    status, resp = daemon.post("/v1/chat/completions", prefilled(two, max_tokens=8, stop_token_ids=[sid]))
    assert status == 200, resp
    msg = resp["choices"][0]["message"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in msg["tool_calls"]] == ["Paris", "Lyon"], msg
    assert len({c["id"] for c in msg["tool_calls"]}) == 2, msg
    assert msg["content"] is None, msg  # the prefill's text is the client's already: not echoed
    assert resp["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_call_streamed():
    status, head, events = daemon.stream("/v1/chat/completions",
                                         prefilled(CALL, max_tokens=8, stop_token_ids=[stop_id], stream=True))
    assert status == 200, events
    assert events[-1] == "[DONE]", events
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}, chunks[0]
    deltas = [c["choices"][0]["delta"] for c in chunks[1:]]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    # OpenAI's order: the call's id, type and name first, then its arguments
    assert calls[0] == [{"index": 0, "id": calls[0][0]["id"], "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}], calls
    args = "".join(c[0]["function"].get("arguments", "") for c in calls[1:])
    assert json.loads(args) == {"city": "Paris"}, calls
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls", chunks[-1]
    assert all(not d.get("content") for d in deltas), deltas


def test_unfinished_block_is_content():
    # The model does not close the block (max_tokens): it comes back as content, never lost.
    prefix = '<tool_call>\n{"name": "get_weather", "arguments": {"ci'
    status, resp = daemon.post("/v1/chat/completions", prefilled(prefix, max_tokens=4))
    assert status == 200, resp
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"], choice
    assert choice["message"]["content"].startswith(prefix), choice
    # streamed the same way
    status, head, events = daemon.stream("/v1/chat/completions", prefilled(prefix, max_tokens=4, stream=True))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1])
    assert text == choice["message"]["content"], (text, choice)


def test_without_tools_nothing_is_parsed():
    # No tools in the request: a <tool_call> the model writes is just text.
    body = prefilled(CALL, max_tokens=3)
    del body["tools"]
    status, resp = daemon.post("/v1/chat/completions", body)
    assert status == 200 and "tool_calls" not in resp["choices"][0]["message"], resp
    assert resp["choices"][0]["finish_reason"] == "length"


def test_tool_field_errors():
    cases = [
        ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
         "tools[0].function.parameters"),
        # (forced calls themselves: test_tool_choice.py)
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
         "tool_choice.function.name"),
        ({"tools": TOOLS, "tool_choice": "maybe"}, "tool_choice"),
        ({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}]},
         "messages[1].tool_calls[0].function.name"),
    ]
    for extra, param in cases:
        body = dict({"messages": [USER], "max_tokens": 2}, **extra)
        status, resp = daemon.post("/v1/chat/completions", body)
        assert status == 400, (extra, resp)
        check_error(resp, status_param=param)


def test_chat_template_override_and_errors():
    # --chat-template FILE replaces the model's template; a template kvd cannot run
    # stops the daemon at start, naming the line.
    path = os.path.join(os.environ.get("KVD_BUILD_ROOT", "/tmp"), "e2e_tools_template.jinja")
    with open(path, "w") as f:
        f.write("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with Daemon("--kv-cache-mb", "4", "--chat-template", path) as d:
        status, resp = d.post("/apply-template", {"messages": [USER]})
        assert status == 200, resp
        assert resp["prompt"] == "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"
        assert any("chat template: --chat-template " + path in line for line in d.lines), d.lines
    with open(path, "w") as f:
        f.write("ok\n{{ messages | shuffle }}")
    d = Daemon("--kv-cache-mb", "4", "--chat-template", path, wait_ready=False)
    with d:
        d.wait_for_line(r"line 2: unknown filter 'shuffle'", 60)
        assert d.wait_exit(60) != 0
    os.unlink(path)


def test_qwen3_template_with_openai_history():
    # Qwen3's template (--chat-template) with OpenAI's history shape: null content beside
    # tool_calls reaches it as "" (Qwen3's template fails on None), arguments as an object.
    path = os.path.join(os.environ.get("KVD_SOURCE_ROOT", "."), "tests", "template", "templates", "qwen3.jinja")
    history = [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    with Daemon("--kv-cache-mb", "4", "--chat-template", path) as d:
        status, resp = d.post("/apply-template", {"messages": history, "tools": TOOLS,
                                                  "chat_template_kwargs": {"enable_thinking": False}})
        assert status == 200, resp
        assert resp["prompt"].endswith(
            "<|im_start|>assistant\n" + CALL + "<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"), resp


def test_fallback_is_announced():
    assert any("chat template: the model has none; falling back to ChatML" in line for line in daemon.lines), \
        daemon.lines


if __name__ == "__main__":
    with Daemon("--kv-cache-mb", "8") as daemon:
        run_tests(globals())
