#!/usr/bin/python3
"""GGUF files kvd writes are llama.cpp's, and kvd runs them as llama.cpp does.

kvd-quantize writes kvd's tiny fixture (bit for bit the BF16 source of llama.cpp's reference
files) as Q8_0, Q4_0 and Q4_K_M GGUFs. Against llama.cpp's own numbers
(tests/fixtures/gguf/golden.json, copied from the reference files llama-quantize wrote):
- every tensor has llama.cpp's ggml type and shape, and dequantizes (numpy,
  tests/reference/ggml_ref.py, written from the format description, reading the file with
  this script's own GGUF walk) to llama.cpp's float32 sha256: the files hold llama.cpp's
  values, so what follows runs on llama.cpp's weights;
- the BF16 GGUF of the fixture (KVD_TINY_GGUF) requantized gives the same tensors;
- kvd-quantize --threads 1 and --threads 5 write the same bytes as the default (one
  thread per CPU): the threaded encoder only divides the rows;
- kvd-gen --quantize T on the safetensors fixture gives the same ids as the file;
- kvd-gen's greedy ids (f32 KV cache, 32 tokens) equal llama-server's for the four
  prompts, except at near-ties: teacher-forced on llama.cpp's ids (gguf_tool), kvd's
  logit of llama.cpp's pick must be within NEAR_TIE of kvd's best at every step, and the
  steps where the picks differ are printed with their margins.

usage: test_gguf_golden.py KVD_QUANTIZE KVD_GEN GGUF_TOOL   (KVD_TINY_MODEL: the fixture)
"""
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "reference"))
import ggml_ref  # noqa: E402

# Largest logit gap accepted where kvd's greedy pick differs from llama.cpp's: both
# quantize activations to 8 bits per block but sum in different orders.
NEAR_TIE = 0.02
TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 6: "Q5_0", 8: "Q8_0", 12: "Q4_K", 14: "Q6_K", 30: "BF16"}
BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q5_0": (32, 22),
         "Q8_0": (32, 34), "Q4_K": (256, 144), "Q6_K": (256, 210)}


def read_gguf_tensors(path):
    """{name: (type name, [rows, cols] as Hugging Face writes them, raw bytes)}."""
    data = open(path, "rb").read()
    pos = 24
    assert data[:4] == b"GGUF"
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def string(p):
        n = struct.unpack_from("<Q", data, p)[0]
        return data[p + 8:p + 8 + n].decode(), p + 8 + n

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip(p, t):
        return string(p)[1] if t == 8 else p + sizes[t]

    alignment = 32
    for _ in range(n_kv):
        key, pos = string(pos)
        t = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", data, pos)[0]
        if t == 9:
            et, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(n):
                pos = skip(pos, et)
        else:
            pos = skip(pos, t)
    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        nd = struct.unpack_from("<I", data, pos)[0]
        ne = struct.unpack_from("<%dQ" % nd, data, pos + 4)
        t, off = struct.unpack_from("<IQ", data, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        infos.append((name, TYPES[t], list(reversed(ne)), off))
    start = (pos + alignment - 1) // alignment * alignment
    out = {}
    for name, t, shape, off in infos:
        per, size = BLOCK[t]
        nbytes = int(np.prod(shape)) // per * size
        out[name] = (t, shape, data[start + off:start + off + nbytes])
    return out


def dequant_sha256(t, raw):
    if t == "F32":
        vals = np.frombuffer(raw, "<f4")
    elif t == "F16":
        vals = np.frombuffer(raw, "<f2").astype("<f4")
    elif t == "BF16":
        vals = (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4")
    else:
        vals = np.asarray(ggml_ref.dequantize(t, raw), dtype="<f4")
    return hashlib.sha256(vals.astype("<f4").tobytes()).hexdigest()


def main():
    quantize, gen, tool = sys.argv[1:4]
    golden = json.load(open(os.path.join(HERE, "fixtures", "gguf", "golden.json"), encoding="utf-8"))
    tiny = os.environ["KVD_TINY_MODEL"]
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for fname, want in golden["files"].items():
            kind = fname[len("tiny-"):-len(".gguf")]
            path = os.path.join(tmp, fname)
            subprocess.run([quantize, tiny, path, "--type", kind], check=True,
                           stderr=subprocess.DEVNULL)
            have = read_gguf_tensors(path)
            if sorted(have) != sorted(want["tensors"]):
                failures.append(f"{fname}: tensor names differ")
                continue
            for name, w in want["tensors"].items():
                t, shape, raw = have[name]
                if t != w["type"] or shape != w["shape"]:
                    failures.append(f"{fname} {name}: {t} {shape}, llama.cpp {w['type']} {w['shape']}")
                elif dequant_sha256(t, raw) != w["dequant_f32_sha256"]:
                    failures.append(f"{fname} {name}: dequantized values differ from llama.cpp's")
            print(f"{fname}: {len(want['tensors'])} tensors, types and sha256 checked")
            whole = open(path, "rb").read()
            for threads in ("1", "5"):
                other = os.path.join(tmp, f"threads{threads}-" + fname)
                subprocess.run([quantize, tiny, other, "--type", kind, "--threads", threads],
                               check=True, stderr=subprocess.DEVNULL)
                if open(other, "rb").read() != whole:
                    failures.append(f"{fname}: --threads {threads} wrote different bytes")
            # GGUF in: the BF16 GGUF of the same fixture requantized gives the same tensors
            gguf_in = os.environ.get("KVD_TINY_GGUF")
            if gguf_in and os.path.isfile(gguf_in):
                again = os.path.join(tmp, "from-gguf-" + fname)
                subprocess.run([quantize, gguf_in, again, "--type", kind], check=True,
                               stderr=subprocess.DEVNULL)
                if read_gguf_tensors(again) != have:
                    failures.append(f"{fname}: requantized from the BF16 GGUF, tensors differ")

            for prompt in golden["prompts"]:
                ref_ids = want["greedy_ids"][prompt]
                out = subprocess.run([gen, "--model", path, "--prompt", prompt, "--max-tokens",
                                      str(len(ref_ids)), "--kv-dtype", "f32", "--ignore-eos",
                                      "--json"], check=True, capture_output=True)
                # the text may end inside a character: only the ids matter here
                result = json.loads(out.stdout.decode("utf-8", "replace"))
                ids, prompt_ids = result["ids"], result["prompt_ids"]
                seq = prompt_ids + ref_ids
                lines = subprocess.run([tool, "logits", path, str(len(prompt_ids)),
                                        ",".join(map(str, seq))], check=True,
                                       capture_output=True, text=True).stdout.split()
                rows = [lines[i:i + 3] for i in range(0, len(lines), 3)]
                worst, ties = 0.0, []
                for step, ref in enumerate(ref_ids):
                    best, best_logit, ref_logit = int(rows[step][0]), float(rows[step][1]), float(rows[step][2])
                    if best != ref:
                        gap = best_logit - ref_logit
                        worst = max(worst, gap)
                        ties.append(f"step {step}: llama.cpp {ref}, kvd {best}, gap {gap:.5f}")
                same = ids == ref_ids
                first = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), None)
                print(f"  {kind} {prompt!r}: greedy ids {'equal' if same else f'differ from step {first}'}; "
                      f"teacher-forced picks that differ: {len(ties)}, largest gap {worst:.5f}")
                for t in ties:
                    print("    " + t)
                if worst > NEAR_TIE:
                    failures.append(f"{fname} {prompt!r}: llama.cpp's pick is {worst:.4f} below kvd's best")
                if not same and not ties:
                    failures.append(f"{fname} {prompt!r}: greedy ids differ without a near-tie")
                # --quantize at load: the safetensors fixture converted while loading runs
                # exactly as the file kvd-quantize wrote
                out = subprocess.run([gen, "--model", tiny, "--quantize", kind, "--prompt", prompt,
                                      "--max-tokens", str(len(ref_ids)), "--kv-dtype", "f32",
                                      "--ignore-eos", "--json"], check=True, capture_output=True)
                if json.loads(out.stdout.decode("utf-8", "replace"))["ids"] != ids:
                    failures.append(f"{kind} {prompt!r}: --quantize at load differs from the file")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
