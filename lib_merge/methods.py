"""Merge methods: pure tensor functions, each registered once with a typed parameter spec.

A method is `fn(inputs, *, rng, **params) -> Tensor`: `inputs` are the tensors of one key (or one row
chunk of it) in the method's input order, already on the compute device in the compute dtype; params are
scalars resolved for that key by the engine (block weights included). No I/O, no globals.
The inputs are the engine's scratch copies: a method may overwrite them (and return one of them), which
spares an allocation per chunk on the hot path.

The spec (`Param`) is the one place a parameter is described: the UI's widgets, the CLI's flags
(`--param NAME=VALUE`, `--alpha`, `--beta`), the HTTP API's method list and recipe validation all read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import InputError


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]

    def __init__(self, *options: str):
        object.__setattr__(self, "options", tuple(options))


@dataclass(frozen=True)
class Param:
    name: str
    kind: Any                      # float | int | bool | Choice
    default: Any
    range: tuple[float, float] | None = None
    help: str = ""
    blockwise: bool = False        # may be given per MBW block; the engine resolves it per key

    def coerce(self, value: Any, method: str) -> Any:
        """Check and convert a user value; errors name the method, the parameter and the allowed range."""
        where = f"{method}: parameter '{self.name}'"
        if self.kind == "floats":
            if value is None:
                return None
            if isinstance(value, str):
                value = [v for v in value.replace(";", ",").split(",") if v.strip()]
            try:
                return [float(v) for v in value]
            except (TypeError, ValueError):
                raise InputError(f"{where} must be a list of numbers, not '{value}'.") from None
        if isinstance(self.kind, Choice):
            if value not in self.kind.options:
                raise InputError(f"{where} must be one of {', '.join(self.kind.options)}, not '{value}'.")
            return value
        try:
            if self.kind is bool:
                if isinstance(value, str):
                    if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError
                    value = value.lower() in ("1", "true", "yes", "on")
                return bool(value)
            if self.kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            else:
                value = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{where} must be a {self.kind.__name__}, not '{value}'.") from None
        if value != value:  # NaN
            raise InputError(f"{where} is NaN.")
        if self.range is not None and not (self.range[0] <= value <= self.range[1]):
            raise InputError(f"{where} = {value} is outside its range [{self.range[0]}, {self.range[1]}].")
        return value

    def describe(self) -> dict:
        kind = ({"choice": list(self.kind.options)} if isinstance(self.kind, Choice)
                else self.kind if isinstance(self.kind, str) else self.kind.__name__)
        return {"name": self.name, "kind": kind, "default": self.default, "range": self.range,
                "help": self.help, "blockwise": self.blockwise}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    inputs: tuple[str, ...]          # roles of the input models, e.g. ("A", "B", "C"); ("models",) for many
    params: tuple[Param, ...]
    label: str = ""
    formula: str = ""
    help: str = ""
    many: bool = False               # takes 2..MAX_MODELS models instead of fixed roles
    base: str = "none"               # "none" | "optional" | "required": a base model θ0 (deltas δi = θi − θ0)
    prepare: Callable | None = None  # whole-tensor statistics, computed in streaming passes before the merge
    chunkable: bool = True           # the final pass may run in row chunks (needs prepare for global stats)
    finish: Callable | None = None   # with it, fn returns "terms" that do not depend on the per-block
    n_terms: int = 0                 # parameters, and finish(terms, inplace, **params) makes the output

    def apply(self, models, *, base, stats, rng, params: dict, terms_out: list | None = None):
        """The method's output for one chunk. With `terms_out`, the terms are appended there too (the
        engine keeps them for live re-merges) and finish works on copies, never on them."""
        if self.finish is None:
            return self.fn(models, base=base, stats=stats, rng=rng, **params)
        terms = self.fn(models, base=base, stats=stats, rng=rng, **params)
        if terms_out is not None:
            terms_out.append(terms)
            return self.finish(terms, inplace=False, **params)
        return self.finish(terms, inplace=True, **params)

    @property
    def n_models(self) -> int | None:
        return None if self.many else len(self.inputs)

    def check_models(self, n_models: int, has_base: bool) -> None:
        if self.many:
            if not 2 <= n_models <= MAX_MODELS:
                raise InputError(f"{self.name} takes 2 to {MAX_MODELS} models, got {n_models}.")
        elif n_models != len(self.inputs):
            raise InputError(f"{self.name} takes {len(self.inputs)} models ({', '.join(self.inputs)}), got {n_models}.")
        if self.base == "required" and not has_base:
            raise InputError(f"{self.name} needs a base model (the model the others were fine-tuned from, "
                             f"e.g. SD1.5 itself): give --base.")
        if self.base == "none" and has_base:
            raise InputError(f"{self.name} does not use a base model: leave --base out.")

    @property
    def blockwise_params(self) -> list[str]:
        return [p.name for p in self.params if p.blockwise]

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise InputError(f"Method '{self.name}' has no parameter '{name}'. "
                         f"Its parameters: {', '.join(p.name for p in self.params) or 'none'}.")

    def resolve_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, every value checked; unknown names are errors."""
        for name in given:
            self.param(name)
        return {p.name: p.coerce(given.get(p.name, p.default), self.name) for p in self.params}

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label, "inputs": list(self.inputs), "many": self.many,
                "base": self.base, "formula": self.formula, "help": self.help,
                "params": [p.describe() for p in self.params]}


METHODS: dict[str, MethodSpec] = {}
MAX_MODELS = 100


def merge_method(name: str, *, inputs: tuple[str, ...] = ("models",), params: list[Param], label: str = "",
                 formula: str = "", help: str = "", many: bool = False, base: str = "none",
                 prepare: Callable | None = None, chunkable: bool = True, finish: Callable | None = None,
                 n_terms: int = 0):
    def register(fn):
        if name in METHODS:
            raise RuntimeError(f"merge method '{name}' registered twice")
        METHODS[name] = MethodSpec(name, fn, tuple(inputs), tuple(params), label or name, formula,
                                   help or (fn.__doc__ or "").strip(), many, base, prepare, chunkable,
                                   finish, n_terms)
        return fn
    return register


# Methods whose per-block parameters only enter at the end are split in two: `fn` returns terms that do
# not depend on them, `finish` combines the terms with them. A live re-merge keeps the terms and re-runs
# only `finish` for the keys whose values changed; both paths run the same arithmetic, so the bits agree.

def _lerp(a, b, weight, inplace):
    return a.lerp_(b, weight) if inplace else torch.lerp(a, b, weight)


def _add_scaled(base, tau, scale, inplace):
    """base + scale·tau as one fused operation (the same kernel in place or not)."""
    return base.add_(tau, alpha=scale) if inplace else torch.add(base, tau, alpha=scale)


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise InputError(f"Unknown merge method '{name}'. Methods: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


ALPHA = Param("alpha", float, 0.5, (-1.0, 2.0), "weight of B (0 = all A, 1 = all B)", blockwise=True)
BETA = Param("beta", float, 0.5, (-1.0, 2.0), "weight of C", blockwise=True)


@merge_method("weighted_sum", inputs=("A", "B"), params=[ALPHA], label="Weighted sum",
              formula="A·(1−α) + B·α", n_terms=2,
              finish=lambda t, *, inplace, alpha: _lerp(t[0], t[1], alpha, inplace))
def weighted_sum(inputs, *, rng=None, base=None, stats=None, **_):
    """Linear interpolation between A and B (exact A at α=0 and exact B at α=1)."""
    a, b = inputs
    return a, b


def _add_difference_finish(t, *, inplace, alpha):
    a, d = t
    return (d.mul_(alpha) if inplace else d * alpha).add_(a)


@merge_method("add_difference", inputs=("A", "B", "C"),
              params=[Param("alpha", float, 1.0, (-1.0, 3.0), "strength of the difference B − C", blockwise=True)],
              label="Add difference", formula="A + α·(B − C)", n_terms=2, finish=_add_difference_finish)
def add_difference(inputs, *, rng=None, base=None, stats=None, **_):
    """Add what B learned over C (e.g. an inpainting or style difference) to A."""
    a, b, c = inputs
    return a, b.sub_(c)


@merge_method("sum_twice", inputs=("A", "B", "C"), params=[ALPHA, BETA], label="Sum twice",
              formula="(A·(1−α) + B·α)·(1−β) + C·β", n_terms=3,
              finish=lambda t, *, inplace, alpha, beta: _lerp(t[0], t[1], alpha, inplace).lerp_(t[2], beta))
def sum_twice(inputs, *, rng=None, base=None, stats=None, **_):
    """Weighted sum of A and B, then weighted sum of that with C."""
    a, b, c = inputs
    return a, b, c


def _triple_sum_finish(t, *, inplace, alpha, beta):
    a, b, c = t
    out = a.mul_(1 - alpha - beta) if inplace else a * (1 - alpha - beta)
    return out.add_(b.mul_(alpha) if inplace else b * alpha).add_(c.mul_(beta) if inplace else c * beta)


@merge_method("triple_sum", inputs=("A", "B", "C"),
              params=[Param("alpha", float, 1 / 3, (-1.0, 2.0), "weight of B", blockwise=True),
                      Param("beta", float, 1 / 3, (-1.0, 2.0), "weight of C", blockwise=True)],
              label="Triple sum", formula="A·(1−α−β) + B·α + C·β", n_terms=3, finish=_triple_sum_finish)
def triple_sum(inputs, *, rng=None, base=None, stats=None, **_):
    """Three-way weighted sum; A gets what α and β leave."""
    a, b, c = inputs
    return a, b, c


# ------------------------------------------------------------------------------------ many-model methods
# `models` is the stacked (n, *shape) tensor of one key (or row chunk) of every model; `base` is θ0's.
# Both are scratch buffers. Deltas are taken in place: δ = models − base.

LAMBDA = Param("lambda", float, 1.0, (-1.0, 3.0), "scale of the merged difference added to the base", blockwise=True)
WEIGHTS = Param("weights", "floats", None, None, "one weight per model, in order (default: all 1)")
ELECTION = Param("election", Choice("sum", "count", "off"), "sum",
                 help="sign election per element: sum = sign of Σδ (the TIES paper), count = sign of Σ sign δ "
                      "(majority vote), off = no election (mean over the models that kept the element)")
DENSITY = Param("density", float, 1.0, (0.0, 1.0), "share of each δ kept by magnitude (top-k per tensor; 1 = keep all)")
RESCALE = Param("rescale", bool, True, help="divide kept deltas by 1 − drop so their expected sum is unchanged")
EPS = Param("eps", float, 1e-6, (0.0, 1.0), "smallest distance used in Weiszfeld's weights (avoids division by 0)")
MAXITER = Param("maxiter", int, 100, (1, 10000), "most Weiszfeld iterations")
FTOL = Param("ftol", float, 1e-20, (0.0, 1.0), "stop when the objective changes by at most ftol (relative)")


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


@merge_method("uniform_soup", many=True, params=[], label="Uniform soup", formula="mean(θi)")
def uniform_soup(models, *, base=None, stats=None, rng=None):
    """The plain average of all models (a "model soup")."""
    return _weighted_sum(models, [1.0 / models.shape[0]] * models.shape[0])


@merge_method("weighted_soup", many=True, params=[WEIGHTS], label="Weighted soup", formula="Σ wi·θi / Σ wi")
def weighted_soup(models, *, weights, base=None, stats=None, rng=None):
    """Average with one weight per model."""
    w = _model_weights(weights, models.shape[0], models)
    total = sum(w)
    if total == 0:
        raise InputError("The model weights sum to 0: a weighted soup needs a non-zero total.")
    return _weighted_sum(models, [x / total for x in w])


@merge_method("task_arithmetic", many=True, base="required", params=[LAMBDA, WEIGHTS], label="Task arithmetic",
              formula="θ0 + λ·Σ wi·δi",
              finish=_lambda_finish, n_terms=2)
def task_arithmetic(models, *, base, weights, rng=None, stats=None, **_):
    """Add every model's difference from the base, weighted, scaled by λ."""
    deltas = models.sub_(base)
    return base, _weighted_sum(deltas, _model_weights(weights, models.shape[0], models))


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
    if thresholds is not None:
        for i, t in enumerate(thresholds):
            deltas[i].masked_fill_(deltas[i].abs() < t, 0)
    return deltas


@merge_method("ties", many=True, base="required", params=[DENSITY, ELECTION, LAMBDA], label="TIES",
              formula="θ0 + λ·disjoint_mean(trim_k(δi), elect)", prepare=_ties_thresholds,
              finish=_lambda_finish, n_terms=2)
def ties(models, *, base, density, election, stats=None, rng=None, **_):
    """TIES-merging: trim each δ to its largest `density` share, elect a sign per element, average the agreeing ones."""
    return base, disjoint_merge(_trim(models.sub_(base), stats), election)


@merge_method("ties_soup", many=True, base="required", params=[LAMBDA], label="TIES-SOUP",
              formula="θ0 + λ·disjoint_mean(δi, sum)",
              finish=_lambda_finish, n_terms=2)
def ties_soup(models, *, base, stats=None, rng=None, **_):
    """TIES without trimming (k = 1), sign elected by the sum of deltas."""
    return base, disjoint_merge(models.sub_(base), "sum")


@merge_method("dare_linear", many=True, base="required", params=[_drop("dare_linear", 0.9), RESCALE, LAMBDA, WEIGHTS],
              label="DARE (linear)", formula="θ0 + λ·Σ wi·(mi ⊙ δi)/(1 − p)",
              finish=_lambda_finish, n_terms=2)
def dare_linear(models, *, base, drop, rescale, weights, rng, stats=None, **_):
    """DARE: drop random elements of each δ with probability p, rescale, add them up."""
    _check_drop(drop, rescale)
    deltas = _dare_drop(models.sub_(base), drop, rng)
    return base, _weighted_sum(deltas, _model_weights(weights, models.shape[0], models))


@merge_method("dare_ties", many=True, base="required", params=[_drop("dare_ties", 0.9), RESCALE, ELECTION, LAMBDA],
              label="DARE-TIES", formula="θ0 + λ·disjoint_mean(mi ⊙ δi, elect)/(1 − p)",
              finish=_lambda_finish, n_terms=2)
def dare_ties(models, *, base, drop, rescale, election, rng, stats=None, **_):
    """DARE's random drop, then TIES' sign election and disjoint mean."""
    _check_drop(drop, rescale)
    return base, disjoint_merge(_dare_drop(models.sub_(base), drop, rng), election)


@merge_method("tsd", many=True, base="required", params=[_drop("tsd", 0.1), RESCALE, LAMBDA],
              label="TSD (TIES-SOUP + DARE)", formula="θ0 + λ·disjoint_mean(mi ⊙ δi, sum)/(1 − p)",
              finish=_lambda_finish, n_terms=2)
def tsd(models, *, base, drop, rescale, rng, stats=None, **_):
    """DARE drop (p ≈ 0.1) → TIES-SOUP → rescale: 6DammK9's TSD."""
    return dare_ties(models, base=base, drop=drop, rescale=rescale, election="sum", rng=rng)


# Geometric median by Weiszfeld's iteration on sufficient statistics. Every point is xi; the median z is
# kept as weights over the points (z = Σ wj xj, Σ wj = 1), so its distances need only the Gram matrix of
# yi = xi − x0: ‖xi − z‖² = G_ii − 2(Gw)_i + wᵀGw. One streaming pass builds G (float64), the iteration
# runs on n numbers, one more pass forms z. Exactly Weiszfeld's steps, without touching the tensors
# once per iteration.

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
              finish=_lambda_finish, n_terms=2)
def tgmd(models, *, base, drop, rescale, stats, rng, **_):
    """As TSD, with the disjoint mean replaced by the geometric median of the sign-filtered deltas."""
    _check_drop(drop, rescale)
    return base, _weighted_sum(_tgmd_filtered(models, base, drop, rng), stats)


def model_stock_t(gram: torch.Tensor) -> float:
    """Model Stock's interpolation ratio t = n·c / (1 + (n−1)·c), c = mean cosine over all pairs of deltas.

    A delta of norm 0 has cosine 0 with every other; t = 0 when the denominator is not positive.
    """
    n = gram.shape[0]
    norms = gram.diagonal().clamp(min=0).sqrt()
    outer = norms[:, None] * norms[None, :]
    cos = torch.where(outer > 0, gram / outer.clamp(min=1e-300), torch.zeros_like(gram))
    c = float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
    denom = 1 + (n - 1) * c
    return n * c / denom if denom > 1e-12 else 0.0


def _stock_prepare(stream, *, per_row, **_):
    if per_row and len(stream.shape) >= 2:
        return None  # rows are whole in every chunk: computed there
    return model_stock_t(_gram_pass(stream, lambda c: c.models.sub_(c.base), center=False))


@merge_method("model_stock", many=True, base="required",
              params=[Param("per_row", bool, False, help="one ratio per output row instead of per tensor")],
              label="Model Stock", formula="θ0 + t·mean(δi), t = n·c/(1 + (n−1)·c)", prepare=_stock_prepare)
def model_stock(models, *, base, per_row, stats, rng=None):
    """Move from the base toward the models' average by t, from how aligned their deltas are."""
    n = models.shape[0]
    deltas = models.sub_(base)
    if stats is None:  # per row: the Gram matrix of each row of the deltas
        d = deltas.reshape(n, deltas.shape[1], -1)
        gram = torch.einsum("irk,jrk->rij", d, d).double()
        norms = gram.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
        outer = norms[:, :, None] * norms[:, None, :]
        cos = torch.where(outer > 0, gram / outer.clamp(min=1e-300), torch.zeros_like(gram))
        c = (cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))
        denom = 1 + (n - 1) * c
        t = torch.where(denom > 1e-12, n * c / denom.clamp(min=1e-12), torch.zeros_like(c))
        t = t.to(deltas.dtype).view((-1,) + (1,) * (deltas.dim() - 2))
        return base.add_(deltas.mean(0).mul_(t))
    return base.add_(deltas.mean(0), alpha=stats)


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
              finish=lambda t, *, inplace, ratio, **_: _lerp(t[0], t[1], ratio, inplace), n_terms=2)
def dare_merge(models, *, ratio, drop, ties, rescale, iterations, stats, rng, base=None):
    """ComfyUI-DareMerge's two-model DARE merge, so its workflows carry over (see docs/METHODS.md)."""
    _check_drop(drop, rescale)
    a, b = models
    m = a.clone()
    for it in range(iterations):
        major = stats[it] if stats is not None else None
        m = _dare_merge_step(m, b, rng.keep_mask(it, drop, m.device), major, drop, rescale)
    return m, a
