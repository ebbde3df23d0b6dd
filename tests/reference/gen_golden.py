#!/usr/bin/python3
"""gen_golden.py - writes (or checks) golden_tiny.json: reference logits of the tiny fixture.

Runs qwen2_ref.py's model on the tiny fixture (kvd-mkmodel --preset tiny --seed 1, bf16)
for four fixed prompts (ids of the real Qwen2 vocabulary; the text each spells is kept
next to it) and records, per prompt: the prompt ids, 16 greedy ids, and for every row
(see qwen2_ref.ROW_ORDER) the top-8 (id, logit) pairs and the logits at 16 fixed ids.
Logits are stored to 8 significant digits; that keeps the file small enough to commit
while leaving far more precision than the 1e-4 relative the C forward test needs.

It also refuses a fixture whose greedy outputs are degenerate (one token repeated, or
two prompts continuing identically): such a model could not catch context bugs.

Usage:
    gen_golden.py --model DIR              write tests/reference/golden_tiny.json
    gen_golden.py --mkmodel PATH [--tokenizer FILE]
                                           generate the fixture in a temp dir first
    gen_golden.py --check ...              recompute and compare with the committed
                                           file instead (ids exact, logits 1e-6 rel.)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qwen2_ref  # noqa: E402

DECODE_STEPS = 16
TOP_K = 8
CHECK_TOLERANCE = 1e-6

# Token ids looked up in the Qwen2 byte-level vocabulary ("Ġ" = a leading space).
PROMPTS = [
    {"text": "Hello, my name is",
     "ids": [9707, 11, 847, 829, 374]},
    {"text": "The quick brown fox jumps over the lazy dog. It was a sunny day.",
     "ids": [785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13, 1084, 572, 264,
             39698, 1899, 13]},
    {"text": "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n"
             "What is the capital of France?<|im_end|>\\n<|im_start|>assistant\\n",
     "ids": [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872,
             198, 3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198]},
    {"text": "In the beginning of the winter, the small village near the mountains prepared "
             "for the long nights. Children gathered wood, and their parents stored food in "
             "cold rooms while the old people told stories of past storms.",
     "ids": [641, 279, 7167, 315, 279, 12406, 11, 279, 2613, 14126, 3143, 279, 23501, 10030,
             369, 279, 1293, 21461, 13, 15044, 20190, 7579, 11, 323, 862, 6562, 9768, 3607,
             304, 9255, 12026, 1393, 279, 2310, 1251, 3229, 7343, 315, 3267, 43483, 13]},
]

# Spread over the vocabulary: common tokens, the specials, and rows past the
# tokenizer's last id (151664) that exist only in the embedding.
FIXED_IDS = [0, 11, 13, 198, 279, 1000, 9707, 50000, 77777, 100000, 123456, 151643, 151644,
             151645, 151700, 151935]

FIXTURE = {"tool": "kvd-mkmodel", "preset": "tiny", "seed": 1, "dtype": "bf16"}


def significant(x):
    return float(f"{x:.8g}")


def compute(model_dir):
    model = qwen2_ref.Qwen2Reference(model_dir)
    prompts = []
    for prompt in PROMPTS:
        logits, greedy_ids = model.greedy(prompt["ids"], DECODE_STEPS)
        rows = []
        for row in logits:
            # stable sort of -logits: ties keep the lower id first
            top = np.argsort(-row, kind="stable")[:TOP_K]
            rows.append({
                "top8": [[int(i), significant(row[i])] for i in top],
                "fixed": [significant(row[i]) for i in FIXED_IDS],
            })
        prompts.append({"text": prompt["text"], "prompt_ids": prompt["ids"],
                        "greedy_ids": greedy_ids, "rows": rows})
    return {
        "about": "Reference logits of the tiny fixture from tests/reference/qwen2_ref.py "
                 "(float64 compute); regenerate with tests/reference/gen_golden.py.",
        "fixture": FIXTURE,
        "compute": "float64",
        "decode_steps": DECODE_STEPS,
        "row_order": qwen2_ref.ROW_ORDER,
        "fixed_ids": FIXED_IDS,
        "prompts": prompts,
    }


def check_varied(golden):
    """Greedy outputs must depend on the context, else the fixture is useless as a test."""
    problems = []
    seqs = [tuple(p["greedy_ids"]) for p in golden["prompts"]]
    for i, seq in enumerate(seqs):
        if len(set(seq)) < 4:
            problems.append(f"prompt {i}: greedy ids barely vary: {list(seq)}")
    if len(set(seqs)) != len(seqs):
        problems.append("two prompts produce the same greedy continuation")
    return problems


def compare(got, want):
    problems = []
    if got["fixed_ids"] != want["fixed_ids"] or len(got["prompts"]) != len(want["prompts"]):
        return ["fixed ids or prompt count differ"]
    for i, (g, w) in enumerate(zip(got["prompts"], want["prompts"])):
        if g["prompt_ids"] != w["prompt_ids"] or g["greedy_ids"] != w["greedy_ids"]:
            problems.append(f"prompt {i}: ids differ: {g['greedy_ids']} vs {w['greedy_ids']}")
            continue
        for r, (gr, wr) in enumerate(zip(g["rows"], w["rows"])):
            if [p[0] for p in gr["top8"]] != [p[0] for p in wr["top8"]]:
                problems.append(f"prompt {i} row {r}: top-8 ids differ")
            values_g = [p[1] for p in gr["top8"]] + gr["fixed"]
            values_w = [p[1] for p in wr["top8"]] + wr["fixed"]
            for a, b in zip(values_g, values_w):
                if abs(a - b) > CHECK_TOLERANCE * max(1.0, abs(b)):
                    problems.append(f"prompt {i} row {r}: logit {a} vs {b}")
                    break
    return problems


def to_json_lines(golden):
    """JSON with one logits row per line: small, and readable in a diff."""
    compact = dict(separators=(",", ":"))
    head = {k: v for k, v in golden.items() if k != "prompts"}
    out = json.dumps(head, indent=1)[:-2] + ',\n "prompts": [\n'
    for i, p in enumerate(golden["prompts"]):
        meta = {k: v for k, v in p.items() if k != "rows"}
        out += "  " + json.dumps(meta, **compact)[:-1] + ',"rows":[\n'
        out += ",\n".join("   " + json.dumps(row, **compact) for row in p["rows"])
        out += "]}" + ("," if i + 1 < len(golden["prompts"]) else "") + "\n"
    return out + " ]\n}\n"


def make_fixture(mkmodel, tokenizer, out_dir):
    if not tokenizer:
        # kvd-mkmodel only copies the tokenizer; the reference never reads it.
        tokenizer = os.path.join(out_dir, "stand-in-tokenizer.json")
        with open(tokenizer, "w") as f:
            f.write("{}\n")
    model_dir = os.path.join(out_dir, "tiny")
    subprocess.run([mkmodel, "--out", model_dir, "--preset", FIXTURE["preset"],
                    "--seed", str(FIXTURE["seed"]), "--dtype", FIXTURE["dtype"],
                    "--tokenizer", tokenizer], check=True)
    return model_dir


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="tiny fixture directory (kvd-mkmodel --preset tiny --seed 1)")
    parser.add_argument("--mkmodel", help="kvd-mkmodel binary: generate the fixture in a temp dir")
    parser.add_argument("--tokenizer", help="tokenizer.json for kvd-mkmodel (optional)")
    parser.add_argument("--golden", default=os.path.join(here, "golden_tiny.json"))
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.model and not args.mkmodel:
        parser.error("give --model DIR or --mkmodel PATH")

    with tempfile.TemporaryDirectory(prefix="kvd-golden-") as tmp:
        model_dir = args.model or make_fixture(args.mkmodel, args.tokenizer, tmp)
        golden = compute(model_dir)

    problems = check_varied(golden)
    if args.check:
        with open(args.golden) as f:
            problems += compare(golden, json.load(f))
    if problems:
        for p in problems[:20]:
            print(f"gen_golden: {p}", file=sys.stderr)
        return 1
    if args.check:
        print(f"gen_golden: {args.golden} matches ({len(golden['prompts'])} prompts)")
        return 0
    with open(args.golden, "w") as f:
        f.write(to_json_lines(golden))
    for p in golden["prompts"]:
        print(f"gen_golden: {len(p['prompt_ids'])} ids -> {p['greedy_ids']}")
    print(f"gen_golden: wrote {args.golden}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
