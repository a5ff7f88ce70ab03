"""Geometric median (Weiszfeld's iteration on sufficient statistics) and TGMD."""
from __future__ import annotations

import torch

from .common import LAMBDA, RESCALE, _check_drop, _dare_drop, _drop, _gram_pass, _lambda_finish, _weighted_sum
from .spec import Param, merge_method

EPS = Param("eps", float, 1e-6, (0.0, 1.0), "smallest distance used in Weiszfeld's weights (avoids division by 0)")
MAXITER = Param("maxiter", int, 100, (1, 10000), "most Weiszfeld iterations")
FTOL = Param("ftol", float, 1e-20, (0.0, 1.0), "stop when the objective changes by at most ftol (relative)")


# Geometric median by Weiszfeld's iteration on sufficient statistics. Every point is xi; the median z is
# kept as weights over the points (z = Σ wj xj, Σ wj = 1), so its distances need only the Gram matrix of
# yi = xi − x0: ‖xi − z‖² = G_ii − 2(Gw)_i + wᵀGw. One streaming pass builds G (float64), the iteration
# runs on n numbers, one more pass forms z. Exactly Weiszfeld's steps, without touching the tensors
# once per iteration.

def weiszfeld_weights(gram: torch.Tensor, *, eps: float, maxiter: int, ftol: float) -> torch.Tensor:
    """Weights w (Σw = 1) of the geometric median z = Σ wi xi, from the Gram matrix of the points.

    Start at the mean; each step: di = max(‖xi − z‖, eps), wi ∝ 1/di; stop when the mean distance
    changes by at most ftol·(mean distance), or after maxiter steps.
    """
    n = gram.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    diag = gram.diagonal()
    previous = None
    for _ in range(maxiter):
        gw = gram @ w
        dist = (diag - 2 * gw + w @ gw).clamp_(min=0).sqrt_().clamp_(min=eps)
        objective = float(dist.mean())
        inv = 1.0 / dist
        w = inv / inv.sum()
        if previous is not None and abs(previous - objective) <= ftol * objective:
            break
        previous = objective
    return w


def _gm_prepare(stream, *, eps, maxiter, ftol, **_):
    feats = (lambda c: c.models) if stream.base_file is None else (lambda c: c.models.sub_(c.base))
    return weiszfeld_weights(_gram_pass(stream, feats), eps=eps, maxiter=maxiter, ftol=ftol).tolist()


@merge_method("geometric_median", many=True, base="optional", params=[EPS, MAXITER, FTOL],
              label="Geometric median", formula="argmin_z Σ ‖θi − z‖ (Weiszfeld, per tensor)", prepare=_gm_prepare)
def geometric_median(models, *, base=None, stats, rng=None, **_):
    """The point with the least total distance to all models, per tensor: robust to outlier models.

    With a base the median is taken over the deltas and added back to the base; the median moves with
    the points, so the result is the same up to rounding.
    """
    if base is None:
        return _weighted_sum(models, stats)
    return base.add_(_weighted_sum(models.sub_(base), stats))


def _tgmd_filtered(models, base, drop, rng) -> torch.Tensor:
    """DARE-dropped deltas with the elements that disagree with the summed sign set to 0."""
    deltas = _dare_drop(models.sub_(base), drop, rng)
    gamma = deltas.sum(0).sign_()
    keep = deltas * gamma > 0
    return deltas.mul_(keep)


def _tgmd_prepare(stream, *, drop, eps, maxiter, ftol, **_):
    gram = _gram_pass(stream, lambda c: _tgmd_filtered(c.models, c.base, drop, c.rng))
    return weiszfeld_weights(gram, eps=eps, maxiter=maxiter, ftol=ftol).tolist()


@merge_method("tgmd", many=True, base="required", params=[_drop("tgmd", 0.1), RESCALE, LAMBDA, EPS, MAXITER, FTOL],
              label="TGMD (TIES + geometric median + DARE)",
              formula="θ0 + λ·GM(mi ⊙ δi ⊙ [sign = γ])/(1 − p)", prepare=_tgmd_prepare,
              finish=_lambda_finish)
def tgmd(models, *, base, drop, rescale, stats, rng, **_):
    """As TSD, with the disjoint mean replaced by the geometric median of the sign-filtered deltas."""
    _check_drop(drop, rescale)
    return base, _weighted_sum(_tgmd_filtered(models, base, drop, rng), stats)
