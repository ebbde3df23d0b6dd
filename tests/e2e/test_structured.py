"""test_structured.py - structured output end to end (issue 16).

The real daemon on the tiny random model at temperature 1: 200 requests over the 22
schemas of tests/grammar/schemas.json (enums, nested objects, arrays with bounds,
patterns, formats, recursion), 16 at a time, through response_format, guided_json and
llama-server's json_schema. Every output that finished ("stop") parses and validates
against its schema with Debian's python3-jsonschema (an independent validator, formats
checked); one that ran into max_tokens must still be a prefix kvd's grammar allowed,
which the daemon's own e2e cannot check, so those only count. Then regex, choice and
GBNF, streaming with n > 1 and logprobs, stop strings, and the 400 naming an
unsupported keyword.
"""

import concurrent.futures
import json
import os
import re
import sys

import jsonschema

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvd_e2e import Daemon, check_error, run_tests  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = json.load(open(os.path.join(HERE, "..", "grammar", "schemas.json")))
daemon = None


def validator(schema):
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=jsonschema.FormatChecker())


def constrained_body(i, entry):
    body = {"temperature": 1.0, "seed": 1000 + i, "max_tokens": 400}
    way = i % 3
    if way == 0:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": entry["name"], "schema": entry["schema"], "strict": True}}
    elif way == 1:
        body["guided_json"] = entry["schema"]
    else:
        body["json_schema"] = entry["schema"]
    if i % 2:
        body["messages"] = [{"role": "user", "content": "Answer in JSON: %s" % entry["name"]}]
        return "/v1/chat/completions", body
    body["prompt"] = "JSON for %s:" % entry["name"]
    return "/v1/completions", body


def text_of(path, choice):
    return choice["message"]["content"] if path.endswith("chat/completions") else choice["text"]


def test_200_requests_validate():
    jobs = [(i, CORPUS[i % len(CORPUS)]) for i in range(200)]
    finished = by_length = 0

    def one(job):
        i, entry = job
        path, body = constrained_body(i, entry)
        status, resp = daemon.post(path, body, timeout=300)
        assert status == 200, (entry["name"], status, resp)
        return entry, path, resp["choices"][0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for entry, path, choice in pool.map(one, jobs):
            text = text_of(path, choice)
            if choice["finish_reason"] == "length":
                by_length += 1
                continue
            assert choice["finish_reason"] == "stop", choice
            value = json.loads(text)
            errors = list(validator(entry["schema"]).iter_errors(value))
            assert not errors, (entry["name"], text, errors[0].message)
            finished += 1
    print("  %d finished and validated, %d ran into max_tokens" % (finished, by_length))
    assert finished >= 150, (finished, by_length)


def test_regex_choice_grammar():
    status, resp = daemon.post("/v1/completions", {"prompt": "x", "temperature": 1.0, "seed": 3, "max_tokens": 50,
                                                    "n": 4, "guided_regex": "[0-9]{3}-[a-z]{2,4}"})
    assert status == 200, resp
    for c in resp["choices"]:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", c["text"]), c
        assert c["finish_reason"] == "stop" or len(c["text"]) >= 6, c
    status, resp = daemon.post("/v1/completions", {"prompt": "x", "temperature": 1.0, "max_tokens": 10, "n": 8,
                                                    "guided_choice": ["yes", "no", "maybe"]})
    assert status == 200, resp
    assert all(c["text"] in ("yes", "no", "maybe") and c["finish_reason"] == "stop" for c in resp["choices"]), resp
    gbnf = 'root ::= "[" item ("," item){0,2} "]"\nitem ::= [a-c]{1,3}\n'
    for field in ("grammar", "guided_grammar"):
        status, resp = daemon.post("/v1/completions", {"prompt": "x", "temperature": 1.0, "max_tokens": 40,
                                                        field: gbnf})
        assert status == 200, resp
        c = resp["choices"][0]
        assert re.fullmatch(r"\[[a-c]{1,3}(,[a-c]{1,3}){0,2}\]", c["text"]), c
        assert c["finish_reason"] == "stop", c


def test_stream_n_logprobs_stop():
    schema = CORPUS[2]["schema"]  # flat_object
    body = {"prompt": "x", "temperature": 1.0, "seed": 77, "max_tokens": 300, "n": 2, "logprobs": 2,
            "guided_json": schema, "stream": True}
    status, head, events = daemon.stream("/v1/completions", body, timeout=300)
    assert status == 200, events
    assert events[-1] == "[DONE]"
    texts, finish, logprob_tokens = ["", ""], [None, None], [0, 0]
    for ev in events[:-1]:
        for c in ev["choices"]:
            texts[c["index"]] += c["text"]
            if c.get("logprobs"):
                logprob_tokens[c["index"]] += len(c["logprobs"]["tokens"])
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
    whole = daemon.post("/v1/completions", dict(body, stream=False), timeout=300)[1]
    for k in range(2):
        assert whole["choices"][k]["text"] == texts[k], (whole, texts)  # same seed, same tokens
        assert logprob_tokens[k] > 0
        if finish[k] == "stop":
            assert not list(validator(schema).iter_errors(json.loads(texts[k]))), texts[k]
    # A stop string cuts the output wherever it appears, grammar or not.
    status, resp = daemon.post("/v1/completions", dict(body, stream=False, n=1, stop=["\"age\""]), timeout=300)
    assert status == 200, resp
    assert "\"age\"" not in resp["choices"][0]["text"], resp


def test_unsupported_is_400():
    status, resp = daemon.post("/v1/completions", {"prompt": "x", "max_tokens": 5,
                                                    "guided_json": {"type": "string", "format": "hostname"}})
    assert status == 400, resp
    err = check_error(resp, "guided_json")
    assert "hostname" in err["message"], err
    status, resp = daemon.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5,
                                                         "response_format": {"type": "json_schema", "json_schema": {
                                                             "name": "n", "schema": {"not": {"enum": [1]}}}}})
    assert status == 400, resp
    err = check_error(resp, "response_format.json_schema.schema")
    assert "'not'" in err["message"], err
    status, resp = daemon.post("/v1/completions", {"prompt": "x", "max_tokens": 5, "guided_regex": "a",
                                                    "guided_choice": ["a"]})
    assert status == 400, resp
    check_error(resp, "guided_choice")
    status, resp = daemon.post("/v1/completions", {"prompt": "x", "max_tokens": 5, "grammar": "root ::= undefined"})
    assert status == 400, resp
    assert "undefined" in check_error(resp, "grammar")["message"], resp


def main():
    global daemon
    with Daemon() as d:
        daemon = d
        run_tests(globals())


if __name__ == "__main__":
    main()
