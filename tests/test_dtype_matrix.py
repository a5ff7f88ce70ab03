"""Every method × compute precision (float32, float64: the AstolfoMix article's end-to-end FP64 merges) × output
dtype on tiny models: each runs, writes every float key in the asked dtype, and the float64 merge agrees with the
float32 one (the same seeds, so the random methods draw the same elements)."""
from __future__ import annotations

import pytest
import torch

from lib_merge.engine.merge import merge
from lib_merge.engine.recipe import ModelRef, Recipe
from lib_merge.engine.sinks import DictSink
from lib_merge.methods import METHODS

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def recipe(tiny, name, compute, out):
    """A of the tiny SD1 models (B, C for many-model methods, over A as their base where they take one)."""
    spec = METHODS[name]
    names = ["sd1_b", "sd1_c"] if spec.many else ["sd1_a", "sd1_b", "sd1_c"][:len(spec.inputs)]
    base = ModelRef("base", str(tiny.path["sd1_a"])) if spec.base != "none" else None
    return Recipe(name, [ModelRef(n, str(tiny.path[n])) for n in names], base=base, compute_dtype=compute,
                  dtype=out, seed=3)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_in_float64_and_every_output_dtype(tiny, name):
    results = {}
    for compute in ("float32", "float64"):
        for out in DTYPES:
            merged = merge(recipe(tiny, name, compute, out), DictSink(), hashes=False, threads=1).output
            floats = {k: v for k, v in merged.items() if v.is_floating_point()}
            assert floats and all(v.dtype == DTYPES[out] for v in floats.values()), (compute, out)
            assert all(bool(torch.isfinite(v.float()).all()) for v in floats.values()), (compute, out)
            results[compute, out] = floats
    a, b = results["float32", "float32"], results["float64", "float32"]
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 2e-3, f"{name}: float64 and float32 merges differ by {worst}"
