#!/usr/bin/python3
"""qwen2_ref.py - an independent numpy implementation of the Qwen2 forward pass and greedy decoding.

Written from the published architecture (Hugging Face Qwen2ForCausalLM), not from kvd's
C code, so it can serve as the oracle for the C forward pass:

    embedding -> N x [ RMSNorm -> q/k/v projections with biases -> rotate-half RoPE
    on q and k -> causal grouped-query attention (softmax(q k^T / sqrt(head_dim)) v)
    -> o_proj -> residual add -> RMSNorm -> SwiGLU MLP down(silu(gate(x)) * up(x))
    -> residual add ] -> final RMSNorm -> lm_head (the embedding when tied)

It reads safetensors itself (8-byte little-endian header length, JSON header, raw data;
BF16 widened to float32 as uint16 << 16, F16 through numpy's float16) and handles
sharded checkpoints through model.safetensors.index.json.

Precision: weights are widened exactly to float64 and EVERY computation (norms, matmuls,
RoPE angles, softmax) is done in float64; only the written logits are rounded to
float32. One rounding is part of the model's definition rather than of its arithmetic:
a projection whose weight is stored as BF16 multiplies its input rounded to bf16, as
bf16 checkpoints run in PyTorch, llama.cpp and kvd (round to nearest even, subnormals
to zero, from the float32 value). The result is therefore the exact-arithmetic answer
for the stored weights and rounded inputs to about 1e-12 relative, and a correct
float32 implementation should agree with it to about 1e-5 relative. Greedy ties
resolve to the lowest id (numpy.argmax).

Needs only /usr/bin/python3 and Debian's python3-numpy.

CLI:
    qwen2_ref.py --model DIR --prompt-ids 1,2,3 --decode-steps 16 --out FILE.bin

writes FILE.bin: (len(prompt) + decode_steps) rows x vocab_size float32, little-endian,
row-major. Row i < len(prompt) holds the logits at prompt position i; greedy id g_k is
argmax of row len(prompt) - 1 + k; row len(prompt) + k holds the logits after feeding
g_k (position len(prompt) + k). FILE.bin.json (the sidecar) holds prompt_ids,
greedy_ids (decode_steps of them), rows, vocab_size and this row order.
Full recompute every step: no KV cache, on purpose (one less thing to get wrong).
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

SUPPORTED_ARCHITECTURE = "Qwen2ForCausalLM"


def round_to_bf16(x):
    """x (float64) as float32, then rounded to bf16 (nearest even, subnormals to zero)."""
    u = np.uint64
    bits = np.atleast_1d(np.asarray(x, dtype=np.float32)).view(np.uint32).astype(u)
    subnormal = (bits & u(0x7F800000)) == 0
    bits = np.where(subnormal, bits & u(0x80000000), bits)
    nan = (bits & u(0x7FFFFFFF)) > u(0x7F800000)
    rounded = (bits + u(0x7FFF) + ((bits >> u(16)) & u(1))) & u(0xFFFF0000)
    rounded = np.where(nan, (bits | u(0x00400000)) & u(0xFFFF0000), rounded)
    out = rounded.astype(np.uint32).view(np.float32).astype(np.float64)
    return out.reshape(np.shape(x))


class Weight:
    """A stored tensor widened to float64, and whether it was stored as BF16."""

    def __init__(self, values, bf16):
        self.values = values
        self.bf16 = bf16


def linear(x, weight):
    """x @ W^T, the input rounded to bf16 first when W is stored in bf16."""
    return (round_to_bf16(x) if weight.bf16 else x) @ weight.values.T


def read_safetensors(path, wanted=None):
    """Returns {name: Weight} for the tensors of one safetensors file.

    wanted: optional set of names to read (others are skipped)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise ValueError(f"{path}: header length {header_len} exceeds the file")
    header = json.loads(data[8:8 + header_len].decode("utf-8"))
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or (wanted is not None and name not in wanted):
            continue
        begin, end = info["data_offsets"]
        raw = data[base + begin:base + end]
        dtype = info["dtype"]
        if dtype == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            values = bits.view(np.float32)
        elif dtype == "F16":
            values = np.frombuffer(raw, dtype="<f2")
        elif dtype == "F32":
            values = np.frombuffer(raw, dtype="<f4")
        else:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {dtype}")
        tensors[name] = Weight(values.astype(np.float64).reshape(info["shape"]), dtype == "BF16")
    return tensors


def read_checkpoint(model_dir, wanted):
    """Reads the wanted tensors from model.safetensors or from the shards of an index."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({weight_map[name] for name in wanted if name in weight_map})
    else:
        files = ["model.safetensors"]
    tensors = {}
    for file_name in files:
        tensors.update(read_safetensors(os.path.join(model_dir, file_name), wanted))
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise ValueError(f"{model_dir}: missing tensors {missing[:3]}")
    return tensors


class Qwen2Reference:
    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        if cfg.get("architectures") != [SUPPORTED_ARCHITECTURE]:
            raise ValueError(f"{model_dir}: architectures {cfg.get('architectures')}")
        self.vocab_size = cfg["vocab_size"]
        self.hidden = cfg["hidden_size"]
        self.num_layers = cfg["num_hidden_layers"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg["num_key_value_heads"]
        self.head_dim = self.hidden // self.num_heads
        self.eps = float(cfg["rms_norm_eps"])
        self.theta = float(cfg["rope_theta"])
        self.tied = bool(cfg.get("tie_word_embeddings", False))

        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.tied:
            names.append("lm_head.weight")
        per_layer = [
            "self_attn.q_proj.weight", "self_attn.q_proj.bias",
            "self_attn.k_proj.weight", "self_attn.k_proj.bias",
            "self_attn.v_proj.weight", "self_attn.v_proj.bias",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
            "input_layernorm.weight", "post_attention_layernorm.weight",
        ]
        for i in range(self.num_layers):
            names += [f"model.layers.{i}.{suffix}" for suffix in per_layer]
        w = read_checkpoint(model_dir, set(names))
        self.embed = w["model.embed_tokens.weight"].values    # (vocab, hidden)
        self.final_norm = w["model.norm.weight"].values       # (hidden)
        self.lm_head = w["model.embed_tokens.weight" if self.tied else "lm_head.weight"]
        # projections stay Weights (linear() needs their dtype); vectors become arrays
        self.layers = [
            {suffix: w[f"model.layers.{i}.{suffix}"] if suffix.endswith("proj.weight")
             else w[f"model.layers.{i}.{suffix}"].values for suffix in per_layer}
            for i in range(self.num_layers)
        ]
        half = self.head_dim // 2
        # inv_freq[j] = theta^(-2j/head_dim), pairs (j, j + half) rotate together.
        self.inv_freq = self.theta ** (-(np.arange(half, dtype=np.float64) * 2.0) / self.head_dim)

    def rms_norm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def rope(self, x, positions):
        """x: (T, heads, head_dim); rotate-half RoPE at the given positions."""
        angles = positions[:, None].astype(np.float64) * self.inv_freq[None, :]  # (T, half)
        cos = np.concatenate([np.cos(angles), np.cos(angles)], axis=-1)[:, None, :]
        sin = np.concatenate([np.sin(angles), np.sin(angles)], axis=-1)[:, None, :]
        half = self.head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attention(self, h, layer):
        T = h.shape[0]
        q = linear(h, layer["self_attn.q_proj.weight"]) + layer["self_attn.q_proj.bias"]
        k = linear(h, layer["self_attn.k_proj.weight"]) + layer["self_attn.k_proj.bias"]
        v = linear(h, layer["self_attn.v_proj.weight"]) + layer["self_attn.v_proj.bias"]
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        positions = np.arange(T)
        q = self.rope(q, positions)
        k = self.rope(k, positions)
        group = self.num_heads // self.num_kv_heads
        future = np.triu(np.ones((T, T), dtype=bool), k=1)
        out = np.empty((T, self.num_heads, self.head_dim))
        for head in range(self.num_heads):
            kv = head // group  # query heads share KV heads in consecutive groups
            scores = q[:, head, :] @ k[:, kv, :].T / np.sqrt(self.head_dim)  # (T, T)
            scores[future] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            out[:, head, :] = probs @ v[:, kv, :]
        return linear(out.reshape(T, self.num_heads * self.head_dim), layer["self_attn.o_proj.weight"])

    def mlp(self, h, layer):
        gate = linear(h, layer["mlp.gate_proj.weight"])
        up = linear(h, layer["mlp.up_proj.weight"])
        silu = gate / (1.0 + np.exp(-gate))
        return linear(silu * up, layer["mlp.down_proj.weight"])

    def forward(self, ids, last_only=False):
        """Logits (float64) for every position of ids, or only the last one."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        x = self.embed[ids]  # (T, hidden)
        for layer in self.layers:
            x = x + self.attention(self.rms_norm(x, layer["input_layernorm.weight"]), layer)
            x = x + self.mlp(self.rms_norm(x, layer["post_attention_layernorm.weight"]), layer)
        if last_only:
            x = x[-1:]
        return linear(self.rms_norm(x, self.final_norm), self.lm_head)

    def greedy(self, prompt_ids, decode_steps):
        """Returns (rows of logits (len(prompt) + steps, vocab) float64, greedy ids)."""
        rows = [self.forward(prompt_ids)]
        ids = list(prompt_ids)
        greedy_ids = []
        for _ in range(decode_steps):
            next_id = int(np.argmax(rows[-1][-1]))
            greedy_ids.append(next_id)
            ids.append(next_id)
            rows.append(self.forward(ids, last_only=True))
        return np.concatenate(rows, axis=0), greedy_ids


ROW_ORDER = ("rows 0..P-1: logits at prompt positions; greedy_ids[k] = argmax(row P-1+k); "
             "row P+k: logits after feeding greedy_ids[k]")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--out", required=True, help="raw float32 logits file (+ .json sidecar)")
    args = parser.parse_args(argv)
    try:
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    except ValueError:
        parser.error("--prompt-ids must be comma-separated integers")
    if not prompt or args.decode_steps < 0:
        parser.error("need at least one prompt id and decode-steps >= 0")
    model = Qwen2Reference(args.model)
    logits, greedy_ids = model.greedy(prompt, args.decode_steps)
    logits.astype("<f4").tofile(args.out)
    with open(args.out + ".json", "w") as f:
        json.dump({
            "model": os.path.abspath(args.model),
            "prompt_ids": prompt,
            "greedy_ids": greedy_ids,
            "rows": int(logits.shape[0]),
            "vocab_size": model.vocab_size,
            "dtype": "float32 little-endian, row-major (rows x vocab_size)",
            "row_order": ROW_ORDER,
            "compute": "float64",
        }, f, indent=1)
        f.write("\n")
    print(f"qwen2_ref: {len(prompt)} prompt ids, greedy {greedy_ids}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
