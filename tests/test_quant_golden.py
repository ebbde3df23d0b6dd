#!/usr/bin/python3
"""kvd's ggml block formats against llama.cpp and the numpy oracle (tests/reference/ggml_ref.py).

- Every tensor of tests/fixtures/quant (raw blocks llama.cpp wrote, every type its files
  use) dequantizes, in C and in numpy, to values whose sha256 is llama.cpp's.
- Packed (kvd_matrix_pack) and read back by rows (kvd_matrix_row), the values are the same.
- The quantized product (scalar and the best ISA, which quant_tool checks bit for bit)
  agrees with the numpy oracle's exact-integer semantics.
- kvd_quantize_row rebuilds llama.cpp's tiny Q8_0 / Q4_0 / Q4_K_M files from kvd's own
  tiny fixture (their BF16 source): every tensor's dequantized sha256 is llama.cpp's.

usage: test_quant_golden.py QUANT_TOOL   (KVD_TINY_MODEL: the tiny fixture directory)
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

FIXTURES = os.path.join(HERE, "fixtures", "quant")


def sha(values):
    return hashlib.sha256(np.ascontiguousarray(values, "<f4").tobytes()).hexdigest()


def run(tool, *args):
    subprocess.run([tool, *map(str, args)], check=True)


def read_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        data = np.memmap(path, np.uint8, "r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = np.asarray(data[base + begin:base + end])
        assert info["dtype"] in ("BF16", "F32"), info["dtype"]
        if info["dtype"] == "BF16":
            out[name] = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            out[name] = raw.view(np.float32)
    return out


def hf_name(gguf_name):
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, layer, part, _ = gguf_name.split(".")
    module = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}[part]
    return "model.layers.%s.%s.weight" % (layer, module)


def main():
    tool = sys.argv[1]
    index = json.load(open(os.path.join(FIXTURES, "index.json")))
    failures = []
    tmp = tempfile.mkdtemp(prefix="kvd-quant-")
    out_path = os.path.join(tmp, "out.f32")
    rng = np.random.default_rng(7)
    types_seen = set()
    for t in index["tensors"]:
        path = os.path.join(FIXTURES, t["file"])
        rows, cols = t["shape"]
        raw = open(path, "rb").read()
        types_seen.add(t["type"])
        # numpy oracle
        ref = ggml_ref.dequantize(t["type"], raw)
        if sha(ref) != t["dequant_f32_sha256"]:
            failures.append("numpy dequant %s" % t["file"])
        if not np.array_equal(ref[:16], np.array(t["first16"], np.float32)):
            failures.append("numpy first16 %s" % t["file"])
        # kvd
        run(tool, "dequant", t["type"], path, out_path)
        got = np.fromfile(out_path, np.float32)
        if sha(got) != t["dequant_f32_sha256"]:
            failures.append("kvd dequant %s (%s)" % (t["file"], t["type"]))
        run(tool, "rows", t["type"], rows, cols, path, out_path)
        if not np.array_equal(np.fromfile(out_path, np.float32).view(np.uint32), ref.view(np.uint32)):
            failures.append("packed rows %s" % t["file"])
        for m in (1, 7):
            x = rng.standard_normal((m, cols)).astype(np.float32)
            x[:, :5] *= 30  # an outlier or two per block group, as activations have
            x_path = os.path.join(tmp, "x.f32")
            x.tofile(x_path)
            run(tool, "matmul", t["type"], rows, cols, path, x_path, m, out_path)
            got = np.fromfile(out_path, np.float32).reshape(m, rows).astype(np.float64)
            want = ggml_ref.product(t["type"], raw, rows, cols, x)
            # integer sums are exact: only the float accumulation of the per-block terms
            # (cols/32 or cols/256 of them) rounds differently
            bound = 1e-5 * np.abs(want).max() + 1e-6
            err = np.abs(got - want).max()
            if err > bound:
                failures.append("product %s m=%d: error %.3g > %.3g" % (t["file"], m, err, bound))
    print("dequantized %d tensors of types %s" % (len(index["tensors"]), sorted(types_seen)))

    tiny = os.environ.get("KVD_TINY_MODEL")
    weights = read_safetensors(os.path.join(tiny, "model.safetensors"))
    requantized = 0
    for t in index["requantize"]:
        src = weights[hf_name(t["tensor"])]
        src_path = os.path.join(tmp, "src.f32")
        src.astype("<f4").tofile(src_path)
        q_path = os.path.join(tmp, "q.bin")
        run(tool, "quantize", t["type"], src_path, q_path)
        values = ggml_ref.dequantize(t["type"], open(q_path, "rb").read())
        if sha(values) != t["dequant_f32_sha256"]:
            failures.append("quantize %s %s (%s)" % (t["source"], t["tensor"], t["type"]))
        requantized += 1
    print("requantized %d tensors of llama.cpp's tiny files from their source" % requantized)
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
