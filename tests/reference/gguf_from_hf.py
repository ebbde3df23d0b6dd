#!/usr/bin/python3
"""Writes a Hugging Face Qwen2 checkpoint as a GGUF file, independently of kvd's C code.

Written from the GGUF format description and what llama.cpp's convert_hf_to_gguf.py does for
Qwen2 (keys, tensor names, token types: every added token CONTROL, vocabulary padded to the
embedding's rows with [PADn] UNUSED tokens, merges as "left right"), so kvd's GGUF loader and
tokenizer can be tested on llama.cpp-shaped files without llama.cpp. Checked once against
llama.cpp's own tiny-q8_0.gguf (commit c392e509): the tokenizer.ggml.* keys are byte for byte
the same.

usage: gguf_from_hf.py --model DIR --out FILE [--type f32|f16|bf16] [--tokenizer-only]
Needs Debian's python3-numpy (/usr/bin/python3).
"""
import argparse
import json
import os
import struct

import numpy as np

GGML = {"f32": 0, "f16": 1, "bf16": 30}
FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32}  # llama_ftype
ALIGN = 32


def gguf_string(s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


class Writer:
    def __init__(self):
        self.kv = []
        self.tensors = []  # (name, ggml type, ne, bytes)

    def add(self, key, vtype, payload):
        self.kv.append(gguf_string(key) + struct.pack("<I", vtype) + payload)

    def string(self, key, value):
        self.add(key, 8, gguf_string(value))

    def u32(self, key, value):
        self.add(key, 4, struct.pack("<I", value))

    def f32(self, key, value):
        self.add(key, 6, struct.pack("<f", value))

    def boolean(self, key, value):
        self.add(key, 7, struct.pack("<B", 1 if value else 0))

    def strings(self, key, values):
        self.add(key, 9, struct.pack("<IQ", 8, len(values)) + b"".join(gguf_string(v) for v in values))

    def i32s(self, key, values):
        self.add(key, 9, struct.pack("<IQ", 5, len(values)) + np.asarray(values, "<i4").tobytes())

    def tensor(self, name, ggml_type, ne, data):
        self.tensors.append((name, ggml_type, ne, data))

    def write(self, path):
        infos, offset = [], 0
        for name, ggml_type, ne, data in self.tensors:
            infos.append(gguf_string(name) + struct.pack("<I", len(ne)) +
                         b"".join(struct.pack("<Q", n) for n in ne) + struct.pack("<IQ", ggml_type, offset))
            offset += (len(data) + ALIGN - 1) // ALIGN * ALIGN
        head = b"GGUF" + struct.pack("<IQQ", 3, len(self.tensors), len(self.kv)) + b"".join(self.kv) + b"".join(infos)
        head += b"\0" * (-len(head) % ALIGN)
        with open(path, "wb") as f:
            f.write(head)
            for _, _, _, data in self.tensors:
                f.write(data)
                f.write(b"\0" * (-len(data) % ALIGN))


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        blob = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        raw = blob[b:e]
        dt = info["dtype"]
        if dt == "BF16":
            bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif dt == "F16":
            arr = np.frombuffer(raw, "<f2").astype(np.float32)
        elif dt == "F32":
            arr = np.frombuffer(raw, "<f4").copy()
        else:
            raise SystemExit(f"{path}: tensor {name} has dtype {dt}")
        out[name] = (arr.reshape(info["shape"]), dt, raw)
    return out


def encode_tensor(arr, dt, raw, kind):
    """Bytes of a tensor in the GGUF type kind; a BF16 source stays bit for bit BF16."""
    if kind == "f32":
        return arr.astype("<f4").tobytes()
    if kind == "f16":
        return arr.astype("<f2").tobytes()
    if dt == "BF16":
        return raw
    bits = arr.astype("<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
    return rounded.astype("<u2").tobytes()


def byte_level_decoder():
    bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def add_tokenizer(w, model_dir, vocab_size):
    tj = json.load(open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8"))
    tc_path = os.path.join(model_dir, "tokenizer_config.json")
    tc = json.load(open(tc_path, encoding="utf-8")) if os.path.exists(tc_path) else {}
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {a["id"]: a["content"] for a in tj["added_tokens"]}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i])
            types.append(3)  # CONTROL, as llama.cpp writes Qwen2's added tokens
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(1)  # NORMAL
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    ids = {t: i for i, t in enumerate(tokens)}
    w.string("tokenizer.ggml.model", "gpt2")
    w.string("tokenizer.ggml.pre", "qwen2")
    w.strings("tokenizer.ggml.tokens", tokens)
    w.i32s("tokenizer.ggml.token_type", types)
    w.strings("tokenizer.ggml.merges", merges)
    eos = ids.get(tc.get("eos_token")) if isinstance(tc.get("eos_token"), str) else cfg.get("eos_token_id")
    if eos is not None:
        w.u32("tokenizer.ggml.eos_token_id", eos)
    if isinstance(tc.get("pad_token"), str) and tc["pad_token"] in ids:
        w.u32("tokenizer.ggml.padding_token_id", ids[tc["pad_token"]])
    if cfg.get("bos_token_id") is not None:
        w.u32("tokenizer.ggml.bos_token_id", cfg["bos_token_id"])
    w.boolean("tokenizer.ggml.add_bos_token", bool(tc.get("add_bos_token", False)))
    if isinstance(tc.get("chat_template"), str):
        w.string("tokenizer.chat_template", tc["chat_template"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--type", default="bf16", choices=sorted(GGML))
    ap.add_argument("--tokenizer-only", action="store_true")
    a = ap.parse_args()
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    w = Writer()
    w.string("general.architecture", "qwen2")
    w.string("general.type", "model")
    w.string("general.name", "kvd fixture")
    w.u32("qwen2.block_count", cfg["num_hidden_layers"])
    w.u32("qwen2.context_length", cfg["max_position_embeddings"])
    w.u32("qwen2.embedding_length", cfg["hidden_size"])
    w.u32("qwen2.feed_forward_length", cfg["intermediate_size"])
    w.u32("qwen2.attention.head_count", cfg["num_attention_heads"])
    w.u32("qwen2.attention.head_count_kv", cfg["num_key_value_heads"])
    w.f32("qwen2.rope.freq_base", cfg["rope_theta"])
    w.f32("qwen2.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.u32("general.file_type", FILE_TYPE[a.type])
    add_tokenizer(w, a.model, cfg["vocab_size"])
    w.u32("general.quantization_version", 2)
    if not a.tokenizer_only:
        st = read_safetensors(os.path.join(a.model, "model.safetensors"))
        names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
        per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                     "post_attention_layernorm": "ffn_norm"}
        for layer in range(cfg["num_hidden_layers"]):
            for hf, gg in per_layer.items():
                for suffix in ("weight", "bias"):
                    names[f"model.layers.{layer}.{hf}.{suffix}"] = f"blk.{layer}.{gg}.{suffix}"
        for hf_name in sorted(st):
            if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                continue
            arr, dt, raw = st[hf_name]
            kind = a.type if arr.ndim == 2 else "f32"  # llama.cpp keeps 1-D tensors in F32
            w.tensor(names[hf_name], GGML[kind], list(reversed(arr.shape)), encode_tensor(arr, dt, raw, kind))
    w.write(a.out)


if __name__ == "__main__":
    main()
