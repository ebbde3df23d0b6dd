#!/usr/bin/env python3
"""test_kvd_gen.py - kvd-gen end to end on the tiny fixture (Python stdlib only).

Usage: test_kvd_gen.py PATH/TO/kvd-gen PATH/TO/kvd-mkmodel
       (KVD_TINY_MODEL, KVD_SOURCE_ROOT and KVD_TOKENIZER_JSON from meson)

Checks, against the committed numpy golden file: the prompt's ids, the 16 greedy ids
with the KV cache (f16 and f32, block sizes 1 and 16) and without any cache, the JSON
fields, the text, --tokenize, EOS stopping, sampling reproducibility by seed, and that bad
arguments give one line on stderr and exit status 1. And the padding-row regression: on
the tiny preset with seed 7 the greedy argmax of a chat prompt's 17th step is id 151780,
an lm_head row past the tokenizer's 151669 ids (kvd-gen used to exit on it); the numpy
reference (/usr/bin/python3) shows that, and kvd-gen must take the best printable id.
"""

import json
import os
import subprocess
import sys
import tempfile


def run(gen, *args, check=True):
    proc = subprocess.run([gen, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"kvd-gen {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


CHAT_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
TOKENIZER_IDS = 151669


def padding_rows_regression(gen, mkmodel):
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "seed7")
        subprocess.run([mkmodel, "--out", model, "--preset", "tiny", "--seed", "7",
                        "--tokenizer", os.environ["KVD_TOKENIZER_JSON"]], check=True,
                       stdout=subprocess.DEVNULL, timeout=120)
        res = json.loads(run(gen, "--model", model, "--prompt", CHAT_PROMPT, "--max-tokens", "24",
                             "--ignore-eos", "--json").stdout)
        ids, prompt_ids = res["ids"], res["prompt_ids"]
        assert len(ids) == 24 and all(0 <= i < TOKENIZER_IDS for i in ids), ids
        # The oracle: 17 greedy steps of the numpy reference over the whole row.
        ref = os.path.join(tmp, "ref.bin")
        subprocess.run(["/usr/bin/python3", os.path.join(os.environ["KVD_SOURCE_ROOT"], "tests/reference/qwen2_ref.py"),
                        "--model", model, "--prompt-ids", ",".join(map(str, prompt_ids)),
                        "--decode-steps", "17", "--out", ref], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=300)
        with open(ref + ".json") as f:
            side = json.load(f)
        assert side["greedy_ids"][16] == 151780, side["greedy_ids"]  # the row that crashed kvd-gen
        assert ids[:16] == side["greedy_ids"][:16], (ids, side["greedy_ids"])
        import array
        vocab = side["vocab_size"]
        row = array.array("f")
        with open(ref, "rb") as f:
            f.seek((len(prompt_ids) - 1 + 16) * vocab * 4)
            row.frombytes(f.read(vocab * 4))
        if sys.byteorder != "little":
            row.byteswap()
        printable = sorted(range(TOKENIZER_IDS), key=lambda i: -row[i])
        best, second = printable[0], printable[1]
        assert row[best] - row[second] > 1e-3, "near tie: the fixture no longer makes a clean case"
        assert ids[16] == best, (ids[16], best)
        # Plain (streaming) mode prints the same run without stopping.
        plain = run(gen, "--model", model, "--prompt", CHAT_PROMPT, "--max-tokens", "24", "--ignore-eos")
        assert "24 generated" in plain.stderr, plain.stderr


def main():
    gen = sys.argv[1]
    model = os.environ["KVD_TINY_MODEL"]
    with open(os.path.join(os.environ["KVD_SOURCE_ROOT"], "tests/reference/golden_tiny.json")) as f:
        golden = json.load(f)["prompts"][0]
    prompt = golden["text"]
    assert prompt == "Hello, my name is"

    out = json.loads(run(gen, "--model", model, "--prompt", prompt, "--tokenize").stdout)
    assert out == golden["prompt_ids"], out

    base = None
    for extra in (["--kv-dtype", "f32"], ["--kv-dtype", "f16", "--block-size", "1"],
                  ["--no-kv-cache"], ["--threads", "2", "--block-size", "64"]):
        res = json.loads(run(gen, "--model", model, "--prompt", prompt, "--max-tokens", "16",
                             "--ignore-eos", "--json", *extra).stdout)
        assert res["prompt_ids"] == golden["prompt_ids"], res["prompt_ids"]
        assert res["ids"] == golden["greedy_ids"], (extra, res["ids"], golden["greedy_ids"])
        assert res["generated_tokens"] == 16 and res["finish_reason"] == "length"
        for key in ("text", "prefill_ms", "decode_ms", "kv_bytes", "tokens_per_s"):
            assert key in res, key
        if "--no-kv-cache" in extra:
            assert res["kv_bytes"] == 0 and res["kv_cache"] is False
        else:
            # 5 prompt + 15 fed-back tokens hold K/V: 2 x 2 layers x 2 kv heads x 16 dims
            elem = 4 if "f32" in extra else 2
            assert res["kv_bytes"] == 20 * 2 * 2 * 2 * 16 * elem, res["kv_bytes"]
        if base is None:
            base = res["text"]
        assert res["text"] == base

    # Plain mode streams the same text.
    plain = run(gen, "--model", model, "--prompt", prompt, "--max-tokens", "16", "--ignore-eos")
    assert plain.stdout == base + "\n", (plain.stdout, base)
    assert "generated" in plain.stderr

    # Sampling: the same seed gives the same ids, another seed (almost surely) others.
    def sample(seed):
        return json.loads(run(gen, "--model", model, "--prompt", prompt, "--max-tokens", "12",
                              "--ignore-eos", "--json", "--temperature", "1.5", "--top-k", "50",
                              "--seed", str(seed)).stdout)["ids"]
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)

    # EOS: a copy of the fixture whose config.json names the third greedy id as EOS stops
    # right after generating it (and --ignore-eos does not).
    with tempfile.TemporaryDirectory() as tmp:
        for name in os.listdir(model):
            if name != "config.json":
                os.symlink(os.path.join(model, name), os.path.join(tmp, name))
        with open(os.path.join(model, "config.json")) as f:
            cfg = json.load(f)
        cfg["eos_token_id"] = golden["greedy_ids"][2]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f)
        res = json.loads(run(gen, "--model", tmp, "--prompt", prompt, "--max-tokens", "16",
                             "--json").stdout)
        assert res["ids"] == golden["greedy_ids"][:3], res["ids"]
        assert res["finish_reason"] == "stop"
        res = json.loads(run(gen, "--model", tmp, "--prompt", prompt, "--max-tokens", "16",
                             "--json", "--ignore-eos").stdout)
        assert res["ids"] == golden["greedy_ids"] and res["finish_reason"] == "length"

    for bad in (["--model", "/nonexistent-dir", "--prompt", "x"],
                ["--model", model, "--prompt", "x", "--block-size", "3"],
                ["--model", model, "--prompt", "x", "--kv-dtype", "int8"],
                ["--model", model],
                ["--model", model, "--prompt", "x", "--max-tokens", "5000"],
                ["--model", model, "--prompt", "x", "--bogus"]):
        proc = run(gen, *bad, check=False)
        assert proc.returncode == 1, (bad, proc.returncode)
        lines = proc.stderr.strip().split("\n")
        assert len(lines) == 1 and lines[0].startswith("kvd-gen: "), (bad, proc.stderr)
    padding_rows_regression(gen, sys.argv[2])
    print("kvd-gen: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
