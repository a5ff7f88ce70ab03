"""Write N small synthetic SD1.5-keyed checkpoints: bench/make_checkpoints.py with shapes divided by --scale.

Usage: python bench/make_synthetic.py --out DIR --count 4 --scale 16

Same keys, key order, dtypes and statistics as bench/make_checkpoints.py (model 0 = base,
N(0, 1) * 0.02; model i > 0 = base + 0.002 * N(0, 1)); only the shapes shrink: every
dimension larger than 16 is divided by --scale (at least 2), small ones (conv kernels,
4 latent channels, ...) are kept, as lib_merge.core.keysets.shrink does. Files are
DIR/sd15_0.safetensors, DIR/sd15_1.safetensors, ... Approximate size per file:
scale 1 = 2.1 GB, 2 = 533 MB, 4 = 133 MB, 8 = 33 MB, 16 = 8.3 MB, 32 = 2.1 MB.

The key names are real, so both Merge Lab and sd-mecha (config sd1-ldm) recognise the
files as SD1.5 checkpoints; the shapes are not the real ones, which neither checks.
Use it for correctness checks and for the --scaling mode of bench/bench_many.py.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_checkpoints  # noqa: E402  (bench/make_checkpoints.py: key table, header, seeded tensors)


def shrink(shape, scale):
    return tuple(d if d <= 16 else max(2, d // scale) for d in shape)


def small_keys(scale):
    return [(key, shrink(shape, scale) if scale > 1 else shape, dtype)
            for key, shape, dtype in make_checkpoints.load_keys()]


def file_size(scale):
    header, data = make_checkpoints.build_header(small_keys(scale))
    return len(header) + data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--count", type=int, default=4, help="number of files: sd15_0 (base) .. sd15_{count-1}")
    ap.add_argument("--scale", type=int, default=16, help="divide every dimension > 16 by this (1 = full size)")
    args = ap.parse_args(argv)
    if args.scale < 1:
        ap.error("--scale must be >= 1")
    keys = small_keys(args.scale)
    args.out.mkdir(parents=True, exist_ok=True)
    for model in range(args.count):
        make_checkpoints.write_checkpoint(args.out / f"sd15_{model}.safetensors", model, keys)


if __name__ == "__main__":
    sys.exit(main())
