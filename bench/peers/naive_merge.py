"""Naive peer for the Merge Lab benchmark: load everything, merge, save.

    python bench/peers/naive_merge.py weighted_sum A B OUT [--alpha 0.5]
    python bench/peers/naive_merge.py add_difference A B C OUT [--alpha 1.0]

What it measures: the simplest possible merge script, the baseline most merge
tools started from. Every input is loaded whole into RAM with
safetensors.torch.load_file, each key is merged in float32 and cast to float16,
and the whole result is kept in RAM until safetensors.torch.save_file writes it.
Peak memory therefore grows with the number of inputs (about 2.1 GB per
float16 SD1.5 model, plus the output). Needs only torch + safetensors.

Semantics: weighted_sum = A*(1-alpha) + B*alpha; add_difference = A + alpha*(B-C).
Keys are those of A; a key missing from another input, or any non-float tensor
(e.g. int64 position_ids), is copied from A unchanged.
"""
import argparse
import sys

import torch
from safetensors.torch import load_file, save_file

RECIPES = {  # name -> (input names, default alpha, float32 merge of the inputs' tensors)
    "weighted_sum": (("a", "b"), 0.5, lambda t, alpha: t[0] * (1 - alpha) + t[1] * alpha),
    "add_difference": (("a", "b", "c"), 1.0, lambda t, alpha: t[0] + alpha * (t[1] - t[2])),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="recipe", required=True)
    for name, (inputs, default_alpha, _) in RECIPES.items():
        p = sub.add_parser(name)
        for i in inputs:
            p.add_argument(i)
        p.add_argument("out")
        p.add_argument("--alpha", type=float, default=default_alpha)
    args = ap.parse_args(argv)

    inputs, _, fn = RECIPES[args.recipe]
    models = [load_file(getattr(args, i)) for i in inputs]
    out = {}
    for key, first in models[0].items():
        if not first.is_floating_point() or any(key not in m for m in models[1:]):
            out[key] = first
            continue
        out[key] = fn([m[key].to(torch.float32) for m in models], args.alpha).to(torch.float16)
    save_file(out, args.out, metadata={"format": "pt"})


if __name__ == "__main__":
    sys.exit(main())
