#!/usr/bin/env python3
"""test_bad_model.py - a damaged checkpoint gives one clear error line and a non-zero exit.

    python3 tests/soak/test_bad_model.py BUILD_DIR

Copies the tiny fixture into a temporary directory once per case, damages it the way
real checkpoints get damaged (truncated downloads, wrong or corrupt safetensors
headers, tensors of the wrong shape or dtype, missing or broken config.json and
tokenizer.json) and starts `kvd --model DIR` on it. Each case must end within 120 s
with a non-zero status that is not a signal, no sanitizer report, and exactly one
line besides the address banner ("bound to"/"listening on"): "kvd: ..." naming the
damaged file (or the directory when it is the directory that is wrong).
"""

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile

import soaklib
from soaklib import Failure, check

build = soaklib.build_dir_from_argv()


def read_st(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path, header, data):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def edit_header(fn):
    def damage(d):
        path = os.path.join(d, "model.safetensors")
        header, data = read_st(path)
        fn(header)
        write_st(path, header, data)
    return damage


def patch_bytes(offset, new):
    def damage(d):
        path = os.path.join(d, "model.safetensors")
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(new)
    return damage


def truncate(name, size):
    def damage(d):
        path = os.path.join(d, name)
        if size < 0:
            keep = os.path.getsize(path) + size
        else:
            keep = size
        os.truncate(path, keep)
    return damage


def remove(name):
    return lambda d: os.remove(os.path.join(d, name))


def edit_json(name, fn):
    def damage(d):
        path = os.path.join(d, name)
        with open(path) as f:
            obj = json.load(f)
        fn(obj)
        with open(path, "w") as f:
            json.dump(obj, f)
    return damage


def write_text(name, text):
    def damage(d):
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return damage


def first_matrix(header):
    """Name of the first 2-D weight whose two dimensions differ."""
    for name in sorted(header):
        t = header[name]
        if name != "__metadata__" and len(t["shape"]) == 2 and t["shape"][0] != t["shape"][1] \
                and "embed" not in name:
            return name
    raise Failure("the fixture has no non-square matrix")


def transpose_shape(h):
    t = h[first_matrix(h)]
    t["shape"] = t["shape"][::-1]  # same bytes, wrong shape for the config


def drop_tensor(h):
    del h["model.norm.weight"]


def rename_tensor(h):
    h["model.norm.weight_"] = h.pop("model.norm.weight")


def bad_dtype(h):
    h[first_matrix(h)]["dtype"] = "Q4_K"


def short_shape(h):
    t = h["model.norm.weight"]
    t["shape"] = [t["shape"][0] // 2]  # inconsistent with its data_offsets


def overlapping(h):
    names = [n for n in h if n != "__metadata__"]
    h[names[1]]["data_offsets"] = list(h[names[0]]["data_offsets"])


def offsets_past_end(h):
    t = h["model.norm.weight"]
    t["data_offsets"] = [t["data_offsets"][0], t["data_offsets"][1] + (1 << 40)]


CASES = [
    # name, damage, file the message must name
    ("weights truncated to half", truncate("model.safetensors", -9_000_000), "model.safetensors"),
    ("weights cut inside the data", truncate("model.safetensors", -1), "model.safetensors"),
    ("weights shorter than the length prefix", truncate("model.safetensors", 5), "model.safetensors"),
    ("weights empty", truncate("model.safetensors", 0), "model.safetensors"),
    ("weights missing", remove("model.safetensors"), "safetensors"),
    ("header length 2^60", patch_bytes(0, struct.pack("<Q", 1 << 60)), "model.safetensors"),
    ("header length past the file", patch_bytes(0, struct.pack("<Q", 50_000_000)), "model.safetensors"),
    ("header not JSON", patch_bytes(8, b"\x00\xff{not json"), "model.safetensors"),
    ("tensor shape transposed", edit_header(transpose_shape), "model.safetensors"),
    ("tensor shape inconsistent with its bytes", edit_header(short_shape), "model.safetensors"),
    ("tensor data_offsets past the end", edit_header(offsets_past_end), "model.safetensors"),
    ("tensor data overlapping another", edit_header(overlapping), "model.safetensors"),
    ("tensor dtype unknown", edit_header(bad_dtype), "model.safetensors"),
    ("tensor missing", edit_header(drop_tensor), "model.norm.weight"),
    ("tensor renamed", edit_header(rename_tensor), "model.norm.weight"),
    ("config.json missing", remove("config.json"), "config.json"),
    ("config.json truncated", truncate("config.json", 100), "config.json"),
    ("config.json hidden_size wrong", edit_json("config.json", lambda c: c.update(hidden_size=128)),
     "safetensors"),
    ("config.json heads do not divide hidden", edit_json("config.json", lambda c: c.update(num_attention_heads=3)),
     "config.json"),
    ("config.json vocab_size wrong", edit_json("config.json", lambda c: c.update(vocab_size=160000)),
     "safetensors"),
    ("config.json not an object", write_text("config.json", "[1, 2, 3]"), "config.json"),
    ("tokenizer.json missing", remove("tokenizer.json"), "tokenizer.json"),
    ("tokenizer.json truncated", truncate("tokenizer.json", 4096), "tokenizer.json"),
    ("tokenizer.json empty object", write_text("tokenizer.json", "{}"), "tokenizer.json"),
]


def run_case(name, damage, must_name):
    tmp = tempfile.mkdtemp(prefix="kvd-bad-model-")
    try:
        d = os.path.join(tmp, "model")
        shutil.copytree(soaklib.tiny_model(build), d)
        damage(d)
        cmd = [soaklib.kvd_path(build), "--model", d, "--port", "0", "--threads", "1", "--log-level", "error"]
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=soaklib.sanitizer_env(), timeout=120, preexec_fn=soaklib.die_with_parent)
        except subprocess.TimeoutExpired:
            raise Failure("%s: kvd still running after 120 s" % name)
        out = p.stdout.decode("utf-8", "replace")
        for marker in soaklib.SANITIZER_MARKERS:
            check(marker not in out, "%s: sanitizer report:\n%s" % (name, out[-4000:]))
        check(p.returncode > 0, "%s: exit status %d (want > 0; < 0 is a signal):\n%s" % (name, p.returncode, out))
        lines = [l for l in out.splitlines() if l.strip() and not re.search(soaklib.BANNER, l)]
        check(len(lines) == 1, "%s: want one error line, got %d:\n%s" % (name, len(lines), out))
        line = lines[0]
        check(line.startswith("kvd: "), "%s: error line does not start with 'kvd: ': %r" % (name, line))
        check(must_name in line, "%s: error line does not name %s: %r" % (name, must_name, line))
        check(len(line) <= 400, "%s: error line of %d characters" % (name, len(line)))
        return p.returncode, line
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_all():
    soaklib.require_daemon(build)
    failures = []
    for name, damage, must_name in CASES:
        try:
            status, line = run_case(name, damage, must_name)
            print("  ok  %-42s exit %d  %s" % (name, status, line[:150]), flush=True)
        except Failure as e:
            print("  BAD %s" % e, flush=True)
            failures.append(name)
    check(not failures, "%d of %d damaged models not refused cleanly: %s" %
          (len(failures), len(CASES), ", ".join(failures)))


def check_not_a_model():
    soaklib.require_daemon(build)
    tmp = tempfile.mkdtemp(prefix="kvd-bad-model-")
    try:
        for target, why in ((os.path.join(tmp, "absent"), "absent"), (tmp, "empty directory")):
            p = subprocess.run([soaklib.kvd_path(build), "--model", target, "--port", "0", "--log-level", "error"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=soaklib.sanitizer_env(), timeout=120, preexec_fn=soaklib.die_with_parent)
            out = p.stdout.decode("utf-8", "replace")
            lines = [l for l in out.splitlines() if l.strip() and not re.search(soaklib.BANNER, l)]
            check(p.returncode > 0 and len(lines) == 1 and lines[0].startswith("kvd: ") and target in lines[0],
                  "--model %s (%s): status %d, output:\n%s" % (target, why, p.returncode, out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


soaklib.run([("damaged checkpoints", check_all), ("not a checkpoint", check_not_a_model)])
