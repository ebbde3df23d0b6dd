"""test_grammar_corpus.py - kvd's grammar engine over its own small schema corpus.

tests/grammar/schemas.json lists schemas with instances that must pass and instances
that must fail. Debian's python3-jsonschema (with format checking) confirms every
label first, so the corpus is right independently of kvd; then kvd-maskbench runs the
MaskBench protocol over it (json.dumps text, token by token, mask before each token)
and must accept every valid instance and refuse every invalid one, in both member
orders the compiler offers (schema order is what the corpus instances use).

usage: test_grammar_corpus.py KVD_MASKBENCH   (tokenizer from $KVD_TOKENIZER_JSON)
"""

import json
import os
import subprocess
import sys
import tempfile

import jsonschema

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    tool = sys.argv[1]
    tokenizer = os.environ["KVD_TOKENIZER_JSON"]
    corpus = json.load(open(os.path.join(HERE, "grammar", "schemas.json")))
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for entry in corpus:
            cls = jsonschema.validators.validator_for(entry["schema"])
            v = cls(entry["schema"], format_checker=jsonschema.FormatChecker())
            for x in entry["valid"]:
                assert v.is_valid(x), ("label: should be valid", entry["name"], x)
            for x in entry["invalid"]:
                assert not v.is_valid(x), ("label: should be invalid", entry["name"], x)
            tests = [{"valid": True, "data": x} for x in entry["valid"]]
            tests += [{"valid": False, "data": x} for x in entry["invalid"]]
            path = os.path.join(tmp, entry["name"] + ".json")
            with open(path, "w") as f:
                json.dump({"schema": entry["schema"], "tests": tests}, f, ensure_ascii=False)
            files.append(path)
        for order in ([], ["--ordered"]):
            out = os.path.join(tmp, "result.json")
            run = subprocess.run([tool, "--tokenizer", tokenizer, "--json", out, "-v"] + order + files,
                                 capture_output=True, text=True, timeout=300)
            print(run.stdout)
            assert run.returncode == 0, run.stderr
            res = json.load(open(out))
            assert res["schemas"] == len(corpus), res
            assert res["compile_error"] == 0, run.stdout
            assert res["validation_error"] == 0, run.stdout
            assert res["invalidation_error"] == 0, run.stdout
            assert res["passing"] == len(corpus), res
            assert res["mask_accept_disagreements"] == 0, res
            for key in ("p50", "p90", "p99", "max", "mean"):
                assert key in res["tbm_us"] and key in res["ttfm_us"], res
    print("grammar corpus: %d schemas pass" % len(corpus))


if __name__ == "__main__":
    main()
