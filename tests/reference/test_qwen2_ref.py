#!/usr/bin/python3
"""test_qwen2_ref.py - checks the numpy reference against properties the architecture implies.

An oracle is only as good as its own tests. Without torch at hand, these check what
any correct Qwen2 must satisfy: causality (a prefix's logits do not change when tokens
are appended), RoPE as a rotation whose attention scores depend only on the relative
position, attention over a single token returning its value vector exactly, identical
results from a sharded checkpoint, a float32 checkpoint close to its bf16 rounding,
and the CLI's file layout and greedy ids.

Usage: test_qwen2_ref.py PATH/TO/kvd-mkmodel   (generates its fixtures in a temp dir)
"""

import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import qwen2_ref  # noqa: E402

MKMODEL = None
TMP = None
IDS = [785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13, 151645, 198]


def make(name, *extra):
    out = os.path.join(TMP.name, name)
    if not os.path.exists(out):
        tokenizer = os.path.join(TMP.name, "tokenizer.json")
        with open(tokenizer, "w") as f:
            f.write("{}\n")
        subprocess.run([MKMODEL, "--out", out, "--preset", "tiny", "--seed", "1",
                        "--tokenizer", tokenizer, *extra], check=True)
    return out


class ReferenceTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = qwen2_ref.Qwen2Reference(make("bf16"))

    def test_causal_prefixes(self):
        full = self.model.forward(IDS)
        for k in (1, 2, 5, len(IDS)):
            prefix = self.model.forward(IDS[:k])
            np.testing.assert_allclose(prefix, full[:k], rtol=0, atol=1e-12)
        last = self.model.forward(IDS, last_only=True)
        np.testing.assert_allclose(last[0], full[-1], rtol=0, atol=1e-12)

    def test_rope_is_a_relative_rotation(self):
        rng = np.random.default_rng(7)
        d = self.model.head_dim
        q = rng.standard_normal((1, 1, d))
        k = rng.standard_normal((1, 1, d))
        at = lambda x, p: self.model.rope(x, np.array([p]))[0, 0]  # noqa: E731
        np.testing.assert_allclose(at(q, 0), q[0, 0], atol=1e-15)
        self.assertAlmostEqual(np.linalg.norm(at(q, 1234)), np.linalg.norm(q), places=12)
        # <R(m) q, R(n) k> depends only on m - n
        self.assertAlmostEqual(at(q, 10) @ at(k, 7), at(q, 503) @ at(k, 500), places=10)
        self.assertNotAlmostEqual(at(q, 10) @ at(k, 7), at(q, 10) @ at(k, 9), places=3)
        # rotate-half pairs dimension j with j + d/2: a vector in dims (0, d/2) stays there
        e = np.zeros((1, 1, d))
        e[0, 0, 0] = 1.0
        r = at(e, 3)
        self.assertAlmostEqual(r[0], np.cos(3.0), places=12)  # inv_freq[0] = 1
        self.assertAlmostEqual(r[d // 2], np.sin(3.0), places=12)
        self.assertAlmostEqual(float(np.abs(np.delete(r, [0, d // 2])).max()), 0.0)

    def test_single_token_attention_returns_value(self):
        layer = self.model.layers[0]
        h = self.model.rms_norm(self.model.embed[[IDS[0]]], layer["input_layernorm.weight"])
        v = qwen2_ref.linear(h, layer["self_attn.v_proj.weight"]) + layer["self_attn.v_proj.bias"]
        group = self.model.num_heads // self.model.num_kv_heads
        v_per_query_head = np.repeat(v.reshape(self.model.num_kv_heads, -1), group, axis=0)
        want = qwen2_ref.linear(v_per_query_head.reshape(1, -1), layer["self_attn.o_proj.weight"])
        np.testing.assert_allclose(self.model.attention(h, layer), want, rtol=1e-12, atol=1e-14)

    def test_bf16_rounding_of_projection_inputs(self):
        r = qwen2_ref.round_to_bf16
        one = 1.0
        # nearest, ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7
        self.assertEqual(r(one + 2.0**-8), one)
        self.assertEqual(r(one + 3 * 2.0**-8), one + 2 * 2.0**-7)
        self.assertEqual(r(one + 2.0**-8 + 2.0**-20), one + 2.0**-7)
        self.assertEqual(r(-3.0), -3.0)
        # subnormals flush to a zero of their sign; the smallest normal stays
        self.assertEqual(r(2.0**-130), 0.0)
        self.assertTrue(np.signbit(r(-(2.0**-130))))
        self.assertEqual(r(2.0**-126), 2.0**-126)
        self.assertTrue(np.isnan(r(np.nan)))
        self.assertEqual(r(np.inf), np.inf)
        # only a bf16 weight rounds its input
        x = np.array([[one + 2.0**-8]])
        w = np.array([[1.0]])
        self.assertEqual(qwen2_ref.linear(x, qwen2_ref.Weight(w, True))[0, 0], one)
        self.assertEqual(qwen2_ref.linear(x, qwen2_ref.Weight(w, False))[0, 0], one + 2.0**-8)

    def test_sharded_checkpoint_gives_identical_logits(self):
        sharded = qwen2_ref.Qwen2Reference(make("sharded", "--shards", "3"))
        np.testing.assert_array_equal(sharded.forward(IDS), self.model.forward(IDS))

    def test_float32_checkpoint_close_to_bf16(self):
        f32 = qwen2_ref.Qwen2Reference(make("f32", "--dtype", "f32"))
        a, b = f32.forward(IDS), self.model.forward(IDS)
        self.assertFalse(np.array_equal(a, b))  # really a different file
        # bf16 rounding (relative 2^-9) of every weight moves logits a little, not a lot
        self.assertLess(np.abs(a - b).max(), 0.1 * np.abs(b).max())

    def test_cli_layout(self):
        out = os.path.join(TMP.name, "cli.bin")
        ids = IDS[:5]
        subprocess.run([sys.executable, os.path.join(HERE, "qwen2_ref.py"), "--model",
                        make("bf16"), "--prompt-ids", ",".join(map(str, ids)),
                        "--decode-steps", "4", "--out", out], check=True,
                       stderr=subprocess.DEVNULL)
        with open(out + ".json") as f:
            meta = json.load(f)
        logits = np.fromfile(out, dtype="<f4").reshape(meta["rows"], meta["vocab_size"])
        self.assertEqual(meta["rows"], len(ids) + 4)
        self.assertEqual(meta["prompt_ids"], ids)
        greedy = [int(np.argmax(logits[len(ids) - 1 + k])) for k in range(4)]
        self.assertEqual(meta["greedy_ids"], greedy)
        full = self.model.forward(ids + greedy)
        np.testing.assert_allclose(logits, full.astype(np.float32), rtol=1e-6, atol=1e-7)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: test_qwen2_ref.py PATH/TO/kvd-mkmodel")
    MKMODEL = sys.argv.pop(1)
    TMP = tempfile.TemporaryDirectory(prefix="kvd-ref-test-")
    try:
        result = unittest.main(exit=False, verbosity=2).result
    finally:
        TMP.cleanup()
    sys.exit(0 if result.wasSuccessful() else 1)
