"""Independent numpy oracle for ggml's block formats and kvd's quantized products.

Written from the format descriptions (ggml-common.h: block layouts; ggml-quants.c: what a
block means), not from kvd's C code. dequantize() gives each block's float32 values with
ggml's operation order; quantize_act() the activation blocks (Q8_0 / Q8_K) and
product() the quantized product's value in float64 (the C kernels' integer sums are
exact, so only their float accumulation differs, by a few ulps).
"""
import numpy as np

BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q5_0": (32, 22), "Q4_K": (256, 144),
         "Q5_K": (256, 176), "Q6_K": (256, 210), "Q8_K": (256, 292)}
K_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_K")


def _f16(raw):
    return raw.copy().view(np.float16).astype(np.float32)


def _k4_scales(s):
    """Q4_K/Q5_K 12-byte scale table -> (scales, mins), each (blocks, 8) uint8."""
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def codes_and_scales(ttype, raw):
    """Integer values and scales of raw blocks: (q, parts) where q (blocks, n) int32 are
    the signed integers the block's values are multiples of (Q4_K/Q5_K: the unsigned
    codes) and parts a dict of the block's scales as float32 / int arrays."""
    per, size = BLOCK[ttype]
    b = np.frombuffer(raw, np.uint8).reshape(-1, size)
    if ttype == "Q8_0":
        return b[:, 2:].view(np.int8).astype(np.int32), {"d": _f16(b[:, 0:2]).ravel()}
    if ttype in ("Q4_0", "Q5_0"):
        qs = b[:, -16:]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32)
        if ttype == "Q5_0":
            qh = b[:, 2:6].copy().view(np.uint32).ravel()
            bits = (qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1
            q |= (bits << 4).astype(np.int32)
            return q - 16, {"d": _f16(b[:, 0:2]).ravel()}
        return q - 8, {"d": _f16(b[:, 0:2]).ravel()}
    if ttype in ("Q4_K", "Q5_K"):
        sc, mn = _k4_scales(b[:, 4:16])
        qs = b[:, 48:] if ttype == "Q5_K" else b[:, 16:]
        # 4 chunks of 32 bytes: low nibbles are values 64j..64j+31, high 64j+32..64j+63
        qs = qs.reshape(-1, 4, 32)
        q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 256).astype(np.int32)
        if ttype == "Q5_K":
            qh = b[:, 16:48]
            bit = np.arange(8)  # value 32*s + l takes bit s of qh[l]
            hb = (qh[:, None, :] >> bit[None, :, None]) & 1
            q |= (hb.reshape(-1, 256) << 4).astype(np.int32)
        return q, {"d": _f16(b[:, 0:2]).ravel(), "dmin": _f16(b[:, 2:4]).ravel(),
                   "sc": sc.astype(np.int32), "mn": mn.astype(np.int32)}
    if ttype == "Q6_K":
        ql = b[:, 0:128].reshape(-1, 2, 64)
        qh = b[:, 128:192].reshape(-1, 2, 32)
        lo = np.concatenate([ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF,
                             ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
        hi = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
        q = (lo | (hi << 4)).reshape(-1, 256).astype(np.int32) - 32
        return q, {"d": _f16(b[:, 208:210]).ravel(), "sc": b[:, 192:208].view(np.int8).astype(np.int32)}
    if ttype == "Q8_K":
        return (b[:, 4:260].view(np.int8).astype(np.int32),
                {"d": b[:, 0:4].copy().view(np.float32).ravel()})
    raise ValueError(ttype)


def dequantize(ttype, raw):
    """float32 values of raw blocks, flat, with ggml's float operations and order."""
    q, p = codes_and_scales(ttype, raw)
    f32 = np.float32
    if ttype in ("Q8_0", "Q4_0", "Q5_0"):
        return (q.astype(f32) * p["d"][:, None]).ravel()
    if ttype == "Q8_K":
        return (p["d"][:, None] * q.astype(f32)).ravel()
    if ttype in ("Q4_K", "Q5_K"):
        d1 = p["d"][:, None] * p["sc"].astype(f32)   # (blocks, 8)
        m1 = p["dmin"][:, None] * p["mn"].astype(f32)
        v = d1[:, :, None] * q.reshape(-1, 8, 32).astype(f32) - m1[:, :, None]
        return v.astype(f32).ravel()
    if ttype == "Q6_K":
        ds = p["d"][:, None] * p["sc"].astype(f32)   # (blocks, 16)
        return (ds[:, :, None] * q.reshape(-1, 16, 16).astype(f32)).ravel()
    raise ValueError(ttype)


def _nearest_even(x):
    return np.rint(x).astype(np.int32)


def quantize_act(ttype, x):
    """Activation blocks for a product with ttype weights: (codes int32 (k,), scales
    float32 per block, block length)."""
    x = np.asarray(x, np.float32)
    if ttype in K_TYPES:
        blocks = x.reshape(-1, 256)
        idx = np.argmax(np.abs(blocks), axis=1)  # first of the largest magnitudes
        mx = blocks[np.arange(len(blocks)), idx]
        q = np.zeros(blocks.shape, np.int32)
        d = np.zeros(len(blocks), np.float32)
        nz = mx != 0
        iscale = (np.float32(-127.0) / mx[nz]).astype(np.float32)
        q[nz] = np.minimum(127, _nearest_even((iscale[:, None] * blocks[nz]).astype(np.float32)))
        d[nz] = (np.float32(1.0) / iscale).astype(np.float32)
        return q.ravel(), d, 256
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    idv = np.where(d != 0, np.float32(1.0) / np.where(d != 0, d, 1), 0).astype(np.float32)
    v = (blocks * idv[:, None]).astype(np.float32)
    t = np.trunc(v)  # roundf: halves away from zero
    q = (t + np.sign(v) * (np.abs(v - t) >= np.float32(0.5))).astype(np.int32)
    return q.ravel(), d.astype(np.float16).astype(np.float32), 32


def product(ttype, raw, rows, cols, x):
    """out[m][rows] = x[m][cols] W^T with activations quantized per block, as kvd's
    contract defines it, in float64 (integer sums exact, then per-block scales)."""
    q, p = codes_and_scales(ttype, raw)
    per = BLOCK[ttype][0]
    nb = cols // per
    out = np.zeros((x.shape[0], rows))
    for i, xr in enumerate(np.asarray(x, np.float32)):
        xq, xd, ab = quantize_act(ttype, xr)
        xq = xq.reshape(nb, per).astype(np.int64)
        xd = xd.astype(np.float64).reshape(nb)
        wq = q.reshape(rows, nb, per).astype(np.int64)
        d = p["d"].astype(np.float32).reshape(rows, nb)
        scale = (d * xd.astype(np.float32)[None, :]).astype(np.float64)
        if ttype in ("Q8_0", "Q4_0", "Q5_0", "Q8_K"):
            s = (wq * xq[None]).sum(axis=2)
            out[i] = (scale * s).sum(axis=1)
        elif ttype == "Q6_K":
            dots = (wq.reshape(rows, nb, 16, 16) * xq.reshape(nb, 16, 16)[None]).sum(axis=3)
            s = (dots * p["sc"].reshape(rows, nb, 16)).sum(axis=2)
            out[i] = (scale * s).sum(axis=1)
        else:
            dots = (wq.reshape(rows, nb, 8, 32) * xq.reshape(nb, 8, 32)[None]).sum(axis=3)
            s = (dots * p["sc"].reshape(rows, nb, 8)).sum(axis=2)
            xs = xq.reshape(nb, 8, 32).sum(axis=2)
            mn = (p["mn"].reshape(rows, nb, 8) * xs[None]).sum(axis=2)
            dmin = p["dmin"].astype(np.float32).reshape(rows, nb)
            mscale = (dmin * xd.astype(np.float32)[None, :]).astype(np.float64)
            out[i] = (scale * s - mscale * mn).sum(axis=1)
    return out
