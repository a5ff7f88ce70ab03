"""TIES (trim, elect, disjoint merge), TIES-SOUP, DARE (random drop and rescale) in their linear and TIES
forms, TSD, and ComfyUI-DareMerge's two-model DARE merge."""
from __future__ import annotations

import torch

from .common import (DENSITY, ELECTION, LAMBDA, RESCALE, WEIGHTS, _check_drop, _dare_drop, _drop, _lambda_finish,
                     _lerp, _model_weights, _weighted_sum, disjoint_merge)
from .spec import Choice, Param, merge_method


def _ties_thresholds(stream, *, density, **_):
    """Per model, the m-th largest |δ| of the whole tensor (m = round(density·numel)), exactly.

    Two streaming passes over row chunks, all models at once: the bit patterns of non-negative float32
    values sort like the values, so a histogram of the high 16 bits finds the bin holding the m-th
    largest, and a histogram of the low 16 bits inside that bin finds the value itself. Memory is one
    chunk per input; a full sort or kthvalue of every model's tensor was 5x slower and held it whole.
    """
    if density >= 1.0:
        return None
    numel = 1
    for d in stream.shape:
        numel *= d
    keep = round(density * numel)
    if keep <= 0:
        return [float("inf")] * stream.n

    def magnitude_bits(chunk):
        deltas = chunk.models.sub_(chunk.base).abs_()
        if deltas.dtype != torch.float32:   # float64 compute: the magnitudes at float32 resolution (_trim agrees)
            deltas = deltas.to(torch.float32)
        return deltas.view(torch.int32).reshape(stream.n, -1)

    high = torch.zeros(stream.n, 1 << 16, dtype=torch.int64)
    for chunk in stream.chunks():
        bits = magnitude_bits(chunk)
        for i in range(stream.n):
            high[i] += torch.bincount((bits[i] >> 16).cpu(), minlength=1 << 16)
    bins, above = [], []
    for i in range(stream.n):
        b, n_above = _bin_of_rank(high[i], keep)
        bins.append(b)
        above.append(n_above)
    low = torch.zeros(stream.n, 1 << 16, dtype=torch.int64)
    for chunk in stream.chunks():
        bits = magnitude_bits(chunk)
        for i in range(stream.n):
            row = bits[i]
            low[i] += torch.bincount((row[(row >> 16) == bins[i]] & 0xFFFF).cpu(), minlength=1 << 16)
    thresholds = []
    for i in range(stream.n):
        lo, _ = _bin_of_rank(low[i], keep - above[i])
        thresholds.append(float(torch.tensor([(bins[i] << 16) | lo], dtype=torch.int32).view(torch.float32)))
    return thresholds


def _bin_of_rank(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the rank-th largest element of a histogram, and how many elements lie above it."""
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, rank))
    b = hist.numel() - 1 - j
    return b, int(from_top[j] - hist[b])


def _trim(deltas: torch.Tensor, thresholds) -> torch.Tensor:
    """Zero every |δ| below its model's threshold; in float64 the comparison is at float32 resolution, as the
    thresholds were found (so ties at that resolution are all kept, never one dropped)."""
    if thresholds is not None:
        for i, t in enumerate(thresholds):
            magnitude = deltas[i].abs()
            if magnitude.dtype != torch.float32:
                magnitude = magnitude.to(torch.float32)
            deltas[i].masked_fill_(magnitude < t, 0)
    return deltas


@merge_method("ties", many=True, base="required", params=[DENSITY, ELECTION, LAMBDA], label="TIES",
              formula="θ0 + λ·disjoint_mean(trim_k(δi), elect)", prepare=_ties_thresholds,
              finish=_lambda_finish)
def ties(models, *, base, density, election, stats=None, rng=None, **_):
    """TIES-merging: trim each δ to its largest `density` share, elect a sign per element, average the agreeing ones."""
    return base, disjoint_merge(_trim(models.sub_(base), stats), election)


@merge_method("ties_soup", many=True, base="required", params=[LAMBDA], label="TIES-SOUP",
              formula="θ0 + λ·disjoint_mean(δi, sum)",
              finish=_lambda_finish)
def ties_soup(models, *, base, stats=None, rng=None, **_):
    """TIES without trimming (k = 1), sign elected by the sum of deltas."""
    return base, disjoint_merge(models.sub_(base), "sum")


@merge_method("dare_linear", many=True, base="required", params=[_drop("dare_linear", 0.9), RESCALE, LAMBDA, WEIGHTS],
              label="DARE (linear)", formula="θ0 + λ·Σ wi·(mi ⊙ δi)/(1 − p)",
              finish=_lambda_finish)
def dare_linear(models, *, base, drop, rescale, weights, rng, stats=None, **_):
    """DARE: drop random elements of each δ with probability p, rescale, add them up."""
    _check_drop(drop, rescale)
    deltas = _dare_drop(models.sub_(base), drop, rng)
    return base, _weighted_sum(deltas, _model_weights(weights, models.shape[0], models))


@merge_method("dare_ties", many=True, base="required", params=[_drop("dare_ties", 0.9), RESCALE, ELECTION, LAMBDA],
              label="DARE-TIES", formula="θ0 + λ·disjoint_mean(mi ⊙ δi, elect)/(1 − p)",
              finish=_lambda_finish)
def dare_ties(models, *, base, drop, rescale, election, rng, stats=None, **_):
    """DARE's random drop, then TIES' sign election and disjoint mean."""
    _check_drop(drop, rescale)
    return base, disjoint_merge(_dare_drop(models.sub_(base), drop, rng), election)


@merge_method("tsd", many=True, base="required", params=[_drop("tsd", 0.1), RESCALE, LAMBDA],
              label="TSD (TIES-SOUP + DARE)", formula="θ0 + λ·disjoint_mean(mi ⊙ δi, sum)/(1 − p)",
              finish=_lambda_finish)
def tsd(models, *, base, drop, rescale, rng, stats=None, **_):
    """DARE drop (p ≈ 0.1) → TIES-SOUP → rescale: 6DammK9's TSD."""
    return dare_ties(models, base=base, drop=drop, rescale=rescale, election="sum", rng=rng)



# ------------------------------------------------------------------------- ComfyUI-DareMerge's DARE merge

def _dare_merge_step(m, b, keep, major, drop, rescale):
    """One DareMerge iteration: move the kept elements of M to B (those agreeing with the major sign)."""
    delta = b - m
    if rescale:
        delta.div_(1.0 - drop)
    if major is not None:
        keep = keep & (torch.sign(delta) == major)
    return torch.where(keep, m + delta, m)


def _dare_merge_majors(stream, *, drop, ties, rescale, iterations, **_):
    """The per-tensor majority sign of each iteration (whole-tensor sums), in one pass per iteration."""
    if ties == "off":
        return None
    majors: list[float] = []
    for it in range(iterations):
        total = 0.0
        for chunk in stream.chunks():
            a, b = chunk.models
            m = a
            for j in range(it):
                m = _dare_merge_step(m, b, chunk.rng.keep_mask(j, drop, m.device), majors[j], drop, rescale)
            delta = b - m
            total += float(delta.sum() if ties == "sum" else torch.sign(delta).sum())
        majors.append(1.0 if total >= 0 else -1.0)
    return majors


@merge_method("dare_merge", inputs=("A", "B"), prepare=_dare_merge_majors,
              params=[Param("ratio", float, 0.5, (0.0, 1.0), "share of A (ComfyUI-DareMerge convention: "
                            "1 = keep A, 0 = take the DARE result)", blockwise=True),
                      Param("drop", float, 0.9, (0.0, 1.0), "probability of dropping each element of B − A"),
                      Param("ties", Choice("sum", "count", "off"), "sum",
                            help="per-tensor majority sign of B − A by the sum of values or by count; off = none"),
                      Param("rescale", bool, False, help="divide kept deltas by 1 − drop (DareMerge: off)"),
                      Param("iterations", int, 1, (1, 16), "repeat the drop against the merged result")],
              label="DARE merge (A, B; ComfyUI-DareMerge)", formula="ratio·A + (1 − ratio)·DARE(A → B)",
              finish=lambda t, *, inplace, ratio, **_: _lerp(t[0], t[1], ratio, inplace))
def dare_merge(models, *, ratio, drop, ties, rescale, iterations, stats, rng, base=None):
    """ComfyUI-DareMerge's two-model DARE merge, so its workflows carry over (see docs/METHODS.md)."""
    _check_drop(drop, rescale)
    a, b = models
    m = a.clone()
    for it in range(iterations):
        major = stats[it] if stats is not None else None
        m = _dare_merge_step(m, b, rng.keep_mask(it, drop, m.device), major, drop, rescale)
    return m, a
