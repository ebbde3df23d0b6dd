#!/usr/bin/python3
"""Copies chosen tensors' raw ggml blocks, unchanged, out of llama.cpp's reference GGUFs
(/work/shared/reference/gguf, see its README) into tests/fixtures/quant/, with llama.cpp's
checksum of their dequantized values (golden.json). Run once by hand; the tests read only
the copies, so the suite does not need /work/shared.

    /usr/bin/python3 tests/reference/extract_gguf_fixtures.py /work/shared/reference/gguf
"""
import json
import os
import struct
import sys

GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 6: "Q5_0", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K",
              14: "Q6_K", 15: "Q8_K", 30: "BF16"}
BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18),
         "Q5_0": (32, 22), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
         "Q8_K": (256, 292)}

# Every quantized tensor of the four files but the vocabulary-sized embeddings (10-32 MB
# each): together they hold every block type the files use (Q8_0, Q4_0, Q5_0, Q4_K, Q6_K).
FILES = ["tiny-q8_0.gguf", "tiny-q4_0.gguf", "tiny-q4_k_m.gguf", "w256-q4_k_m.gguf"]


def read_string(f):
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8")


def skip_value(f, vtype):
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    if vtype == 8:
        return read_string(f)
    if vtype == 9:
        (itype, n) = struct.unpack("<IQ", f.read(12))
        return [skip_value(f, itype) for _ in range(n)]
    data = f.read(sizes[vtype])
    fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}[vtype]
    return struct.unpack(fmt, data)[0]


def tensors(path):
    """{name: (type, dims (ggml order: columns first), absolute offset, bytes)}"""
    with open(path, "rb") as f:
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        assert magic == b"GGUF", path
        alignment = 32
        for _ in range(n_kv):
            key = read_string(f)
            (vtype,) = struct.unpack("<I", f.read(4))
            value = skip_value(f, vtype)
            if key == "general.alignment":
                alignment = value
        infos = {}
        for _ in range(n_tensors):
            name = read_string(f)
            (n_dims,) = struct.unpack("<I", f.read(4))
            dims = struct.unpack("<%dQ" % n_dims, f.read(8 * n_dims))
            ttype, offset = struct.unpack("<IQ", f.read(12))
            infos[name] = (GGML_TYPES[ttype], dims, offset)
        data_start = (f.tell() + alignment - 1) // alignment * alignment
    out = {}
    for name, (ttype, dims, offset) in infos.items():
        n = 1
        for d in dims:
            n *= d
        per, size = BLOCK[ttype]
        out[name] = (ttype, dims, data_start + offset, n // per * size)
    return out


def main():
    src = sys.argv[1]
    here = os.path.dirname(os.path.abspath(__file__))
    dest = os.path.join(here, "..", "fixtures", "quant")
    os.makedirs(dest, exist_ok=True)
    golden = json.load(open(os.path.join(src, "golden.json")))
    index = []
    cache = {}
    chosen = []
    for file in FILES:
        cache[file] = tensors(os.path.join(src, file))
        chosen += [(file, name) for name, info in sorted(cache[file].items())
                   if info[0] not in ("F32", "F16", "BF16") and name != "token_embd.weight"]
    for file, name in chosen:
        ttype, dims, offset, nbytes = cache[file][name]
        with open(os.path.join(src, file), "rb") as f:
            f.seek(offset)
            raw = f.read(nbytes)
        out_name = file.replace(".gguf", "") + "." + name.replace(".weight", "") + ".bin"
        with open(os.path.join(dest, out_name), "wb") as f:
            f.write(raw)
        g = golden["files"][file]["tensors"][name]
        assert g["type"] == ttype, (file, name, g["type"], ttype)
        index.append({"file": out_name, "source": file, "tensor": name, "type": ttype,
                      "shape": g["shape"], "dequant_f32_sha256": g["dequant_f32_sha256"],
                      "first16": g["first16"]})
    # The tiny files' source is kvd's own tiny fixture: checksums of every quantized
    # tensor (embeddings too) for the quantizer test, which rebuilds them from it.
    requantize = []
    for file in FILES:
        if not file.startswith("tiny-"):
            continue
        for name, g in sorted(golden["files"][file]["tensors"].items()):
            if g["type"] not in ("F32", "F16", "BF16"):
                requantize.append({"source": file, "tensor": name, "type": g["type"],
                                   "shape": g["shape"],
                                   "dequant_f32_sha256": g["dequant_f32_sha256"]})
    with open(os.path.join(dest, "index.json"), "w") as f:
        json.dump({"made_by": golden["made_by"], "tensors": index, "requantize": requantize},
                  f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
