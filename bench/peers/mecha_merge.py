"""Peer for the Merge Lab benchmark: the same merges done by sd-mecha 1.1.8.

Run with the separate venv that has sd-mecha (never lib_merge's venv):

    /work/mecha-venv/bin/python bench/peers/mecha_merge.py weighted_sum A B OUT [--alpha 0.5]
    /work/mecha-venv/bin/python bench/peers/mecha_merge.py add_difference A B C OUT [--alpha 1.0]

Many-model recipes, base first ("3 fine-tunes + base": BASE M1 M2 M3):

    mecha_merge.py ties         BASE M1 M2 M3 OUT [--k 0.2] [--vote-sgn true] [--alpha 1.0]
    mecha_merge.py ties_soup    BASE M1 M2 M3 OUT                    (ties with k = 1)
    mecha_merge.py tsd          BASE M1 M2 M3 OUT [--probability 0.1] [--seed S]
    mecha_merge.py tgmd         BASE M1 M2 M3 OUT [--probability 0.1] [--seed S]
    mecha_merge.py model_stock  BASE M1 M2 M3 OUT
    mecha_merge.py uniform_soup M1 M2 M3 M4 OUT                      (no base: every file is a model)
    mecha_merge.py geometric_median M1 M2 M3 M4 OUT

What it measures: sd-mecha's own streaming merge, end to end (process start,
recipe building, model-config inference, per-key merge in float32 with its
default thread count, float16 safetensors output). Time it from outside, e.g.
with /usr/bin/time -v.

Semantics (δi = Mi − BASE):
- weighted_sum = A*(1-alpha) + B*alpha; add_difference = A + alpha*(B-C).
- ties = BASE + alpha·ties_sum(δ1..δn, k, vote_sgn): per tensor top-k share of each |δi|
  kept, sign elected per element by sign(Σδ) (vote_sgn=True; False = by count of signs),
  mean of the agreeing deltas. Built by hand from subtract + ties_sum + linear
  add_difference: sd-mecha's own `add_difference_ties` wrapper crashes in 1.1.8 when the
  recipe is built (AttributeError: 'NoneType' object has no attribute 'identifier' in
  wrappers.add_difference, which compares the merge space of A with that of the not yet
  inferred ties_sum node); the top-level sd_mecha.add_difference is that same wrapper,
  so the low-level merge method linear.add_difference is used instead.
- ties_soup = ties with k = 1 (nothing trimmed), vote_sgn = True.
- tsd = add_ties_with_dare(BASE, M..., probability=p, rescale, k=1, vote_sgn=True,
  apply_stock=True): DARE drop of each δ with probability p, TIES-SOUP, divided by 1 − p.
  apply_stock=True because sd-mecha 1.1.8's ties_sum_extended inverts the flag
  (`t = 1.0 if apply_stock else get_model_stock_t(...)`): True gives plain TIES,
  False would multiply by Model Stock's t.
- tgmd = the same with apply_median=True: geometric median (Weiszfeld) of the
  DARE-dropped, sign-filtered deltas instead of their disjoint mean, divided by 1 − p.
- model_stock = n_model_stock(BASE, M...): BASE + t·mean(δi), t from the mean cosine of
  consecutive pairs (δ1,δ2), (δ2,δ3)... along the last dimension (rows of a linear
  weight, the kernel width of a conv weight); Merge Lab's default takes all pairs over
  the whole tensor.
- uniform_soup = n_average(M...); geometric_median = geometric_median(M...), per key.

Randomness (tsd, tgmd): with --seed unset sd-mecha makes a fresh torch.Generator per key
and never seeds it, so every key starts from torch's default seed (deterministic).

To add a recipe, add a function to RECIPES: its positional parameters are the input
models (a *models parameter takes any number), its keyword-only parameters become
--flags (type from the annotation, default from the signature), and it returns an
sd-mecha recipe node.
"""
import argparse
import inspect
import sys
from pathlib import Path

import sd_mecha
import torch
from sd_mecha.extensions.builtin.merge_methods import linear


def weighted_sum(a, b, *, alpha: float = 0.5):
    return sd_mecha.weighted_sum(a, b, alpha=alpha)


def add_difference(a, b, c, *, alpha: float = 1.0):
    return sd_mecha.add_difference(a, b, c, alpha=alpha)


def _deltas(base, models):
    return [sd_mecha.subtract(m, base) for m in models]


def ties(base, *models, k: float = 0.2, vote_sgn: bool = True, alpha: float = 1.0):
    tau = sd_mecha.ties_sum(*_deltas(base, models), k=k, vote_sgn=vote_sgn)
    return linear.add_difference(base, tau, alpha=alpha)


def ties_soup(base, *models, k: float = 1.0, vote_sgn: bool = True, alpha: float = 1.0):
    return ties(base, *models, k=k, vote_sgn=vote_sgn, alpha=alpha)


def tsd(base, *models, probability: float = 0.1, rescale: bool = True, k: float = 1.0, vote_sgn: bool = True,
        apply_stock: bool = True, seed: int = None, alpha: float = 1.0):
    # apply_stock=True is plain TIES in sd-mecha 1.1.8 (the flag is inverted, see the module docstring)
    return sd_mecha.add_ties_with_dare(base, *models, probability=probability, rescale=rescale, alpha=alpha,
                                       seed=seed, k=k, vote_sgn=vote_sgn, apply_stock=apply_stock,
                                       apply_median=False)


def tgmd(base, *models, probability: float = 0.1, rescale: bool = True, k: float = 1.0, vote_sgn: bool = True,
         seed: int = None, alpha: float = 1.0, eps: float = 1e-6, maxiter: int = 100, ftol: float = 1e-20):
    return sd_mecha.add_ties_with_dare(base, *models, probability=probability, rescale=rescale, alpha=alpha,
                                       seed=seed, k=k, vote_sgn=vote_sgn, apply_stock=True, apply_median=True,
                                       eps=eps, maxiter=maxiter, ftol=ftol)


def model_stock(base, *models, cos_eps: float = 1e-6):
    return sd_mecha.n_model_stock(base, *models, cos_eps=cos_eps)


def uniform_soup(*models):
    return sd_mecha.n_average(*models)


def geometric_median(*models, eps: float = 1e-6, maxiter: int = 100, ftol: float = 1e-20):
    return sd_mecha.geometric_median(*models, eps=eps, maxiter=maxiter, ftol=ftol)


RECIPES = {
    "weighted_sum": weighted_sum,
    "add_difference": add_difference,
    "ties": ties,
    "ties_soup": ties_soup,
    "tsd": tsd,
    "tgmd": tgmd,
    "model_stock": model_stock,
    "uniform_soup": uniform_soup,
    "geometric_median": geometric_median,
}


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


NOTES = {  # extra --help text for some options
    "apply_stock": "sd-mecha 1.1.8 inverts it: true = plain TIES (what Merge Lab's tsd does), "
                   "false = TIES scaled by Model Stock's t",
    "vote_sgn": "true = sign elected by the sum of the deltas (Merge Lab's election=sum), false = by sign count",
    "k": "share of each delta kept by magnitude (1 = keep all)",
    "probability": "DARE drop probability p",
    "seed": "None = a fresh unseeded generator per key (torch's default seed)",
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text}")


def _inputs(builder):
    return [q for q in inspect.signature(builder).parameters.values() if q.kind != q.KEYWORD_ONLY]


def _options(builder):
    return [q for q in inspect.signature(builder).parameters.values() if q.kind == q.KEYWORD_ONLY]


def make_parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="recipe", required=True)
    for name, builder in RECIPES.items():
        p = sub.add_parser(name, help=(builder.__doc__ or "").strip() or None)
        inputs = _inputs(builder)
        if any(q.kind == q.VAR_POSITIONAL for q in inputs):
            fixed = [q.name for q in inputs if q.kind != q.VAR_POSITIONAL]
            p.add_argument("models", nargs="+", type=Path,
                           help=f"input models ({', '.join(fixed + ['M1', 'M2', '...'])})")
        else:
            for q in inputs:
                p.add_argument(q.name, type=Path)
        p.add_argument("out", type=Path)
        for q in _options(builder):
            kind = q.annotation if q.annotation is not inspect.Parameter.empty else float
            p.add_argument(f"--{q.name.replace('_', '-')}", dest=q.name, default=q.default,
                           type=_bool if kind is bool else kind,
                           help=f"{NOTES[q.name] + '; ' if q.name in NOTES else ''}default {q.default}")
        p.add_argument("--config", default=None, help="sd-mecha model config (default: inferred, e.g. sd1-ldm)")
        p.add_argument("--threads", type=int, default=None, help="sd-mecha threads (default: its own choice)")
        p.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="output dtype (default float16)")
    return ap


def main(argv=None):
    args = make_parser().parse_args(argv)
    builder = RECIPES[args.recipe]
    inputs = _inputs(builder)
    if hasattr(args, "models"):
        paths = args.models
        n_fixed = sum(q.kind != q.VAR_POSITIONAL for q in inputs)
        if len(paths) < n_fixed + 2:
            raise SystemExit(f"{args.recipe}: give at least {n_fixed + 2} models, got {len(paths)}")
    else:
        paths = [getattr(args, q.name) for q in inputs]
    # absolute paths: sd-mecha resolves relative paths against its registered model dirs
    models = [sd_mecha.model(p.resolve(), config=args.config) for p in paths]
    recipe = builder(*models, **{q.name: getattr(args, q.name) for q in _options(builder)})
    sd_mecha.merge(
        recipe,
        output=args.out.resolve(),
        merge_device="cpu",
        merge_dtype=torch.float32,
        output_device="cpu",
        output_dtype=DTYPES[args.dtype],
        threads=args.threads,
    )  # threads: sd-mecha's default (None), min(max(#files, 2), cpu_count, 4)


if __name__ == "__main__":
    sys.exit(main())
