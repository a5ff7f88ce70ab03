"""Write N full-size random SD1.5 or SDXL checkpoints (float16 safetensors) for benchmarks.

Usage: python bench/make_checkpoints.py --out DIR --count 3 [--arch sd1|sdxl]

Files are DIR/sd15_0.safetensors, DIR/sd15_1.safetensors, ... (~2.1 GB each) for
--arch sd1 (the default), DIR/sdxl_0.safetensors, ... (~6.9 GB each) for --arch sdxl.
Keys and shapes come from lib_merge/core/keysets/{sd1,sdxl}.tsv.gz (read as plain data;
this script does not import lib_merge): the non-optional keys of the text encoder(s)
(clip_l; SDXL also clip_g), vae and diffuser, plus the int64 CLIP position_ids
(values 0..76) — the same key list as lib_merge.core.keysets.checkpoint_keys. No EMA or
scheduler keys, none of SDXL's optional ones (clip_l's unused last layer, clip_g's
last block / text_projection, the v-pred markers).

Model 0 is the "base": every float tensor is N(0, 1) * 0.02. Model i > 0 is a
"fine-tune" of it: base + 0.002 * N(0, 1) with its own seed, so models differ by
small deltas as real fine-tunes do. Each tensor's randomness is seeded from
(model, key index), so any file can be written alone, tensor by tensor, with at
most one tensor in memory: the safetensors header is written by hand, then the
raw little-endian bytes in header order. Files already present with the expected
size are skipped.

Needs only torch and numpy (safetensors only for --verify).
"""
import argparse
import gzip
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import torch

KEYSETS = Path(__file__).resolve().parent.parent / "lib_merge" / "core" / "keysets"
ARCHS = {"sd1": ("sd1.tsv.gz", "sd15"), "sdxl": ("sdxl.tsv.gz", "sdxl")}   # arch -> (key table, file prefix)
COMPONENTS = ("clip_l", "clip_g", "vae", "diffuser")
BASE_STD, FINETUNE_STD = 0.02, 0.002


def is_position_ids(key):
    return key.endswith("text_model.embeddings.position_ids")


def load_keys(arch="sd1"):
    """Return [(key, shape tuple, safetensors dtype)] in key-table order."""
    keys = []
    with gzip.open(KEYSETS / ARCHS[arch][0], "rt") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            component, key, shape, dtype, optional = line.rstrip("\n").split("\t")
            if component not in COMPONENTS:
                continue
            if optional == "1" and not is_position_ids(key):
                continue
            dims = tuple(int(d) for d in shape.split(",")) if shape else ()
            keys.append((key, dims, "I64" if dtype == "int64" else "F16"))
    return keys


def build_header(keys):
    """Header bytes (length prefix + space-padded JSON) and total data size."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype in keys:
        nbytes = int(np.prod(shape, dtype=np.int64)) * (8 if dtype == "I64" else 2)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offset


def randn(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def make_tensor(model, index, shape, dtype):
    if dtype == "I64":  # position_ids: arange(77) with the table's shape
        return torch.arange(int(np.prod(shape)), dtype=torch.int64).reshape(shape)
    t = randn(shape, seed=index) * BASE_STD  # the base's tensor for this key
    if model > 0:
        t += FINETUNE_STD * randn(shape, seed=1_000_003 * model + index)
    return t.to(torch.float16)


def write_checkpoint(path, model, keys):
    header, data_size = build_header(keys)
    expected = len(header) + data_size
    if path.exists() and path.stat().st_size == expected:
        print(f"{path}: exists with the right size, skipped")
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for index, (key, shape, dtype) in enumerate(keys):
            t = make_tensor(model, index, shape, dtype)
            arr = t.contiguous().numpy()
            f.write((arr.byteswap() if sys.byteorder == "big" else arr).data)
    assert tmp.stat().st_size == expected, (tmp, tmp.stat().st_size, expected)
    os.replace(tmp, path)
    print(f"{path}: written, {expected / 1e9:.2f} GB, {len(keys)} tensors")


def verify(path, keys):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        got = set(f.keys())
        assert got == {k for k, _, _ in keys}, "key set differs from the table"
        for key, shape, dtype in keys:
            sl = f.get_slice(key)
            assert tuple(sl.get_shape()) == shape and sl.get_dtype() == dtype, key
        pos = f.get_tensor(next(k for k, _, _ in keys if is_position_ids(k)))
        assert torch.equal(pos, torch.arange(77).reshape(1, 77)), "bad position_ids"
    print(f"{path}: verified {len(keys)} keys, shapes and dtypes")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="sd1",
                    help="sd1: sd15_N.safetensors (~2.1 GB); sdxl: sdxl_N.safetensors (~6.9 GB)")
    ap.add_argument("--verify", action="store_true", help="open each file with safetensors and check it")
    args = ap.parse_args(argv)
    keys = load_keys(args.arch)
    args.out.mkdir(parents=True, exist_ok=True)
    for model in range(args.count):
        path = args.out / f"{ARCHS[args.arch][1]}_{model}.safetensors"
        write_checkpoint(path, model, keys)
        if args.verify:
            verify(path, keys)


if __name__ == "__main__":
    sys.exit(main())
