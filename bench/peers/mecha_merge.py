"""Peer for the Merge Lab benchmark: the same merges done by sd-mecha 1.1.8.

Run with the separate venv that has sd-mecha (never lib_merge's venv):

    /work/mecha-venv/bin/python bench/peers/mecha_merge.py weighted_sum A B OUT [--alpha 0.5]
    /work/mecha-venv/bin/python bench/peers/mecha_merge.py add_difference A B C OUT [--alpha 1.0]

What it measures: sd-mecha's own streaming merge, end to end (process start,
recipe building, model-config inference, per-key merge in float32 with its
default thread count, float16 safetensors output). Time it from outside, e.g.
with /usr/bin/time -v.

Semantics: weighted_sum = A*(1-alpha) + B*alpha; add_difference = A + alpha*(B-C).
To add a recipe, add a function to RECIPES taking (models, alpha) and returning an
sd-mecha recipe node; the number of positional inputs is taken from its signature
(a *models builder takes any number of them).
"""
import argparse
import inspect
import sys
from pathlib import Path

import sd_mecha
import torch


def weighted_sum(a, b, *, alpha):
    return sd_mecha.weighted_sum(a, b, alpha=alpha)


def add_difference(a, b, c, *, alpha):
    return sd_mecha.add_difference(a, b, c, alpha=alpha)


RECIPES = {  # name -> (builder, default alpha)
    "weighted_sum": (weighted_sum, 0.5),
    "add_difference": (add_difference, 1.0),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="recipe", required=True)
    for name, (builder, default_alpha) in RECIPES.items():
        p = sub.add_parser(name)
        params = [q for q in inspect.signature(builder).parameters.values() if q.kind != q.KEYWORD_ONLY]
        if any(q.kind == q.VAR_POSITIONAL for q in params):
            p.add_argument("models", nargs="+", type=Path)
        else:
            for q in params:
                p.add_argument(q.name, type=Path)
        p.add_argument("out", type=Path)
        p.add_argument("--alpha", type=float, default=default_alpha)
        p.add_argument("--config", default=None, help="sd-mecha model config (default: inferred, e.g. sd1-ldm)")
    args = ap.parse_args(argv)

    builder, _ = RECIPES[args.recipe]
    paths = getattr(args, "models", None) or [
        getattr(args, q.name) for q in inspect.signature(builder).parameters.values() if q.kind != q.KEYWORD_ONLY
    ]
    # absolute paths: sd-mecha resolves relative paths against its registered model dirs
    models = [sd_mecha.model(p.resolve(), config=args.config) for p in paths]
    recipe = builder(*models, alpha=args.alpha)
    sd_mecha.merge(
        recipe,
        output=args.out.resolve(),
        merge_device="cpu",
        merge_dtype=torch.float32,
        output_device="cpu",
        output_dtype=torch.float16,
    )  # threads: sd-mecha's default, min(max(#files, 2), cpu_count, 4)


if __name__ == "__main__":
    sys.exit(main())
