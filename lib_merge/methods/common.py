"""What several method families share: parameters, the finish steps that take the per-block values, and tensor steps
(weighted sums, TIES' disjoint merge, DARE's drop, Gram matrices of the deltas)."""
from __future__ import annotations

import torch

from ..core.errors import InputError
from .spec import Choice, Param

# Methods whose per-block parameters only enter at the end are written in two steps: `fn` returns terms that
# do not depend on them, `finish` combines the terms with them (MethodSpec.apply runs both on each chunk).

def _lerp(a, b, weight, inplace):
    return a.lerp_(b, weight) if inplace else torch.lerp(a, b, weight)


def _add_scaled(base, tau, scale, inplace):
    """base + scale·tau as one fused operation (the same kernel in place or not)."""
    return base.add_(tau, alpha=scale) if inplace else torch.add(base, tau, alpha=scale)



# ------------------------------------------------------------------------------------ many-model methods
# `models` is the stacked (n, *shape) tensor of one key (or row chunk) of every model; `base` is θ0's.
# Both are scratch buffers. Deltas are taken in place: δ = models − base.

LAMBDA = Param("lambda", float, 1.0, (-1.0, 3.0), "scale of the merged difference added to the base", blockwise=True)
WEIGHTS = Param("weights", "floats", None, None, "one weight per model, in order (default: all 1)")
ELECTION = Param("election", Choice("sum", "count", "off"), "sum",
                 help="sign election per element: sum = sign of Σδ (the TIES paper), count = sign of Σ sign δ "
                      "(majority vote), off = no election (mean over the models that kept the element)")
ELECTION_ALIASES = {"total": "sum", "frequency": "count"}   # the LoRA tools' old (PEFT) names for the same two


def election_name(text: str, allow_off: bool = False) -> str:
    """A TIES sign election as its one spelling: sum or count (total and frequency accepted), off where allowed."""
    key = str(text).strip().lower()
    key = ELECTION_ALIASES.get(key, key)
    allowed = ("sum", "count", "off") if allow_off else ("sum", "count")
    if key not in allowed:
        raise InputError(f"Unknown sign election '{text}'. Use {' or '.join(allowed)} "
                         f"(total and frequency are the old names of sum and count).")
    return key


# the TIES paper (Yadav et al. 2023) keeps the top 20 % of each task vector by magnitude (k = 20), as do PEFT's
# and mergekit's TIES examples: that, not "keep all", is what makes TIES resolve interference
DENSITY = Param("density", float, 0.2, (0.0, 1.0),
                "share of each δ kept by magnitude (top-k per tensor; the TIES paper's 0.2; 1 = keep all)")
RESCALE = Param("rescale", bool, True, help="divide kept deltas by 1 − drop so their expected sum is unchanged")


def _lambda_finish(t, *, inplace, **p):
    """θ0 + scale·τ, scale = λ, divided by 1 − drop where DARE's rescale is on."""
    scale = p["lambda"] / (1.0 - p["drop"]) if p.get("rescale") and "drop" in p else p["lambda"]
    return _add_scaled(t[0], t[1], scale, inplace)


def _drop(name: str, default: float) -> Param:
    return Param("drop", float, default, (0.0, 1.0), "probability of dropping each element of each δ (DARE p)")


def _model_weights(weights, n: int, like: torch.Tensor) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise InputError(f"{len(weights)} weights given for {n} models: give one weight per model.")
    return list(weights)


def _weighted_sum(stack: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Σ wi·stack[i], accumulated in place into stack[0] in a fixed order (deterministic)."""
    out = stack[0].mul_(weights[0])
    for i in range(1, stack.shape[0]):
        out.add_(stack[i], alpha=weights[i])
    return out


def disjoint_merge(deltas: torch.Tensor, election: str) -> torch.Tensor:
    """TIES' merge step: per element, the mean of the deltas whose sign agrees with the elected sign.

    sum: γ = sign(Σ δi); count: γ = sign(Σ sign δi); off: mean of the non-zero δi. Zeros never count;
    where the election ties (γ = 0) the result is 0. Divides by max(count, 1). Works in place:
    δi·γ clamped at 0 is |δi| where δi agrees with γ and 0 elsewhere, so one product does the filtering.
    """
    if election == "off":
        count = torch.count_nonzero(deltas, dim=0)
        return deltas.sum(0).div_(count.clamp_(min=1))
    gamma = deltas.sum(0).sign_() if election == "sum" else torch.sign(deltas).sum(0).sign_()
    agreeing = deltas.mul_(gamma).clamp_(min=0)
    count = torch.count_nonzero(agreeing, dim=0)
    return agreeing.sum(0).mul_(gamma).div_(count.clamp_(min=1))


def _dare_drop(deltas: torch.Tensor, drop: float, rng) -> torch.Tensor:
    """Zero each element of each δi with probability `drop` (one random stream per model)."""
    if drop > 0:
        for i in range(deltas.shape[0]):
            deltas[i].mul_(rng.keep_mask(i, drop, deltas.device))
    return deltas


def _check_drop(drop: float, rescale: bool) -> None:
    if rescale and drop >= 1.0:
        raise InputError("drop = 1 with rescale divides by zero: lower drop below 1 or turn rescale off.")



def _gram_pass(stream, features, center: bool = True) -> torch.Tensor:
    """Σ over chunks of Y·Yᵀ, Y = the features of every model (minus model 0's when centring).

    Products are taken over blocks of 64 K elements in the compute dtype and summed in float64, which
    keeps the sums accurate without a float64 copy of every chunk.
    """
    g = torch.zeros(stream.n, stream.n, dtype=torch.float64)
    block = 1 << 16
    for chunk in stream.chunks():
        y = features(chunk).reshape(stream.n, -1)
        if center:
            y[1:].sub_(y[0])
            y[0].zero_()
        for start in range(0, y.shape[1], block):
            part = y[:, start:start + block]
            g += (part @ part.T).double().cpu()
    return g
