"""Low-rank factorisation of a full ΔW, and the SVD merge of several LoRAs.

`factorize(delta, rank)` turns a full delta (linear (out, in), conv 1x1 (out, in, 1, 1), conv kxk
(out, in, kh, kw) flattened to (out, in·kh·kw)) into kohya factors `up = U·S`, `down = Vh` with alpha = rank
(scale 1), so `up @ down` is the best rank-r approximation (Eckart–Young) before the optional clamp.

`merge_svd(loras, ...)` materialises every LoRA's ΔW = up@down·α/r, combines them per module ("add", "ties",
"dare_linear", "dare_ties", "magnitude_prune", PEFT's definitions), and factorises the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ArchitectureMismatchError, InputError
from ..randomness import generator_for, key_seed

METHODS = ("auto", "full", "lowrank")
MODES = ("add", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# The randomized SVD is used only where it matches the exact one: a range finder of 2·rank columns and
# 6 power iterations keeps the rank-r error within 0.1 % of the optimum even on flat spectra (noise-like
# deltas of random fine-tunes: measured 1.0006 on 1280×1280, r = 64, 56 ms against 280 ms for LAPACK),
# where rank + 8 columns and 2 iterations were 1–13 % worse (docs/BENCHMARKS.md, LoRA section).
OVERSAMPLE_FACTOR = 2   # range-finder columns = 2 · rank
NITER = 6               # power iterations


class SvdError(InputError):
    """A bad rank, density, mode or method for extract / resize / SVD merge."""


def as_matrix(delta: torch.Tensor) -> torch.Tensor:
    """ΔW as the matrix that is factorised: linear as is, convolutions flattened to (out, in·kh·kw)."""
    if delta.dim() == 2:
        return delta
    if delta.dim() == 4:
        return delta.reshape(delta.shape[0], -1)
    raise SvdError(f"Cannot factorise a tensor of shape {list(delta.shape)}: expected 2-D or 4-D.")


def max_rank(shape) -> int:
    """The largest useful rank of a ΔW of `shape`: min(out, in·kh·kw)."""
    return min(shape[0], math.prod(shape[1:]))


def _quantile_abs(x: torch.Tensor, q: float) -> torch.Tensor:
    """q-quantile of |x| (kthvalue: torch.quantile refuses more than 2^24 elements)."""
    a = x.abs().reshape(-1)
    k = max(1, min(a.numel(), int(math.ceil(q * a.numel()))))
    return a.kthvalue(k).values


def choose_method(m: int, n: int, rank: int) -> str:
    """'lowrank' when the randomized SVD is clearly cheaper (its 2·rank columns at most half of min(m, n),
    and the matrix not tiny), else 'full'. Measured numbers are in docs/LORA.md."""
    k = min(m, n)
    if k >= 256 and rank * OVERSAMPLE_FACTOR * 2 <= k:
        return "lowrank"
    return "full"


def svd_top(mat: torch.Tensor, rank: int, *, method: str = "auto", seed: int = 0):
    """(U, S, Vh) of `mat` with at least `rank` singular triples, float32/64. 'full' returns all of them."""
    if method not in METHODS:
        raise SvdError(f"Unknown SVD method '{method}': use {', '.join(METHODS)}.")
    m, n = mat.shape
    if method == "auto":
        method = choose_method(m, n, rank)
    q = min(rank * OVERSAMPLE_FACTOR, m, n)
    if method == "lowrank" and q < min(m, n):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(mat, q=q, niter=NITER)
        return U, S, V.mT
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    return U, S, Vh


def factorize(delta: torch.Tensor, rank: int, *, clamp_quantile: float | None = 0.99, method: str = "auto",
              seed: int = 0):
    """(up, down, S): kohya factors of rank r = min(rank, out, in·kh·kw) with alpha = r, and the singular values
    computed (all of them with method 'full', the top rank+oversampling with 'lowrank').

    up is (out, r) or (out, r, 1, 1); down is (r, in) or (r, in, kh, kw). Computed in float32 (float64 when
    `delta` is float64). `clamp_quantile` (kohya's 0.99) clamps both factors to the q-quantile of their absolute
    values; None keeps the exact truncated SVD. `method`: 'full' (LAPACK), 'lowrank' (torch.svd_lowrank, seeded),
    'auto' (see choose_method). Deterministic for a given seed."""
    if rank < 1:
        raise SvdError(f"The rank must be at least 1 (got {rank}).")
    cdt = torch.float64 if delta.dtype == torch.float64 else torch.float32
    mat = as_matrix(delta.to(cdt))
    r = min(rank, max_rank(delta.shape))
    U, S, Vh = svd_top(mat, r, method=method, seed=seed)
    up = U[:, :r] * S[:r]
    down = Vh[:r]
    if clamp_quantile is not None:
        if not 0 < clamp_quantile <= 1:
            raise SvdError(f"clamp_quantile must be in (0, 1] (got {clamp_quantile}).")
        hi = _quantile_abs(torch.cat([up.reshape(-1), down.reshape(-1)]), clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if delta.dim() == 4:
        up = up.reshape(delta.shape[0], r, 1, 1)
        down = down.reshape(r, *delta.shape[1:])
    return up.contiguous(), down.contiguous(), S


def compose(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up@down back to ΔW's shape (linear, 1x1 or kxk conv)."""
    if down.dim() == 2:
        return up @ down
    r = down.shape[0]
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(up.shape[0], *down.shape[1:])


# --------------------------------------------------------------------------------- combining deltas

def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    k = int(density * t.numel())
    if k <= 0:
        return torch.zeros_like(t)
    flat = t.reshape(-1)
    idx = flat.abs().topk(k).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(t.shape)


def _prune_random(t: torch.Tensor, density: float, g: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t
    keep = torch.rand(t.shape, generator=g, dtype=torch.float32) < density
    return torch.where(keep, t / density, torch.zeros_like(t))


def _disjoint(weighted: torch.Tensor) -> torch.Tensor:
    """Sign election by the weighted sum (ties -> +), then the mean over the entries that agree."""
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
    agree = torch.sign(weighted) == sign
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine(deltas: list[torch.Tensor], weights: list[float], mode: str = "add", *, density: float = 1.0,
            seed: int = 0, key: str = "") -> torch.Tensor:
    """Merge full deltas of one module. PEFT's definitions: add = Σ wᵢΔᵢ; magnitude_prune = Σ wᵢ·top-k(Δᵢ);
    ties = top-k by magnitude, sign elected per element by the weighted sum, mean of the weighted entries that
    agree; dare_linear = Σ wᵢ·drop(Δᵢ)/density; dare_ties = random drop and rescale, then the TIES election
    and disjoint mean. Random drops use a CPU generator seeded from (seed, key, LoRA index)."""
    if mode not in MODES:
        raise SvdError(f"Unknown merge mode '{mode}': use {', '.join(MODES)}.")
    if not 0 < density <= 1:
        raise SvdError(f"density must be in (0, 1] (got {density}).")
    if mode == "add":
        return sum(w * d for w, d in zip(weights, deltas))
    if mode in ("magnitude_prune", "ties"):
        pruned = [_prune_magnitude(d, density) for d in deltas]
    else:
        pruned = [_prune_random(d, density, generator_for(seed, key, f"dare{i}")) for i, d in enumerate(deltas)]
    if mode in ("magnitude_prune", "dare_linear"):
        return sum(w * d for w, d in zip(weights, pruned))
    return _disjoint(torch.stack([w * d for w, d in zip(weights, pruned)]))


# ------------------------------------------------------------------------------------------ merge_svd

@dataclass
class LoraInput:
    """One LoRA of an SVD merge: its file and weights for the U-Net and the text encoder(s)."""
    path: str | Path
    unet: float = 1.0
    te: float | None = None     # None: same as unet

    @property
    def te_weight(self) -> float:
        return self.unet if self.te is None else self.te


def _as_input(x) -> LoraInput:
    if isinstance(x, LoraInput):
        return x
    if isinstance(x, (str, Path)):
        return LoraInput(x)
    x = tuple(x)
    if len(x) == 2:
        return LoraInput(x[0], float(x[1]))
    if len(x) == 3:
        return LoraInput(x[0], float(x[1]), None if x[2] is None else float(x[2]))
    raise SvdError(f"A LoRA to merge is a path, (path, weight) or (path, unet_weight, te_weight); got {x!r}.")


@dataclass
class MergeSvdResult:
    path: Path
    family: str | None
    modules: int
    retained: dict[str, float]      # module -> retained Frobenius fraction of the combined ΔW
    warnings: list[str]


def merge_svd(loras, out_path, *, mode: str = "add", density: float = 1.0, rank: int = 32,
              conv_rank: int | None = None, clamp_quantile: float | None = 0.99, seed: int = 0,
              method: str = "auto", dtype: torch.dtype = torch.float16, overwrite: bool = False,
              progress=None) -> MergeSvdResult:
    """Merge LoRAs through their full deltas and write one kohya LoRA of `rank` (3x3 convs: `conv_rank`,
    default `rank`), alpha = rank. A module present in only some LoRAs counts as zero in the others.
    LoRAs of different architectures are refused."""
    from .formats import open_lora, save_kohya
    from . import keys as K
    inputs = [_as_input(x) for x in loras]
    if not inputs:
        raise SvdError("Give at least one LoRA to merge.")
    if mode not in MODES:
        raise SvdError(f"Unknown merge mode '{mode}': use {', '.join(MODES)}.")
    if not 0 < density <= 1:
        raise SvdError(f"density must be in (0, 1] (got {density}).")
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise SvdError("The rank and conv rank must be at least 1.")
    from ..models import check_output_path
    out_path = check_output_path(Path(out_path), [Path(x.path) for x in inputs], overwrite)   # before any work
    files = []
    try:
        for x in inputs:
            files.append(open_lora(x.path))
        family, first = None, None
        for x, lf in zip(inputs, files):
            if lf.family is None:
                continue
            if family is None:
                family, first = lf.family, x
            elif lf.family != family:
                raise ArchitectureMismatchError(
                    f"Cannot merge '{Path(first.path).name}' ({family}) with '{Path(x.path).name}' ({lf.family}): "
                    f"LoRAs of different architectures do not share modules. Pick LoRAs of one family.")
        warnings = [w for lf in files for w in lf.warnings]
        names = sorted(set().union(*(lf.modules for lf in files)))
        out_modules, retained = {}, {}
        for i, name in enumerate(names):
            shapes = {tuple(lf.modules[name].shape) for lf in files if name in lf.modules}
            if len(shapes) > 1:
                raise SvdError(f"Module '{name}' has different shapes in the LoRAs ({sorted(shapes)}): they are "
                               f"not for the same model.")
            shape = shapes.pop()
            is_te = K.part_of(name) in ("te", "te1", "te2")
            deltas, weights = [], []
            for x, lf in zip(inputs, files):
                deltas.append(lf.delta(name) if name in lf.modules else torch.zeros(shape))
                weights.append(x.te_weight if is_te else x.unet)
            dw = combine(deltas, weights, mode, density=density, seed=seed, key=name)
            del deltas
            total = float(dw.double().pow(2).sum())
            if total == 0.0:
                warnings.append(f"{name}: the merged ΔW is zero; the module is left out.")
                continue
            conv3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
            r = (conv_rank or rank) if conv3 else rank
            up, down, _ = factorize(dw, r, clamp_quantile=clamp_quantile, method=method,
                                    seed=key_seed(seed, name, "svd") & 0x7FFFFFFF)
            approx = compose(up, down)
            retained[name] = math.sqrt(max(0.0, 1.0 - float((dw - approx).double().pow(2).sum()) / total))
            out_modules[name] = (down.to(dtype), up.to(dtype), float(down.shape[0]))
            if progress:
                progress(i + 1, len(names), name)
        if not out_modules:
            raise SvdError("The merged LoRA would be empty (every module's ΔW is zero).")
        meta = {"ss_training_comment": f"SVD merge ({mode}, density {density}) of "
                                       + ", ".join(f"{Path(x.path).name}:{x.unet}" for x in inputs)}
        path = save_kohya(out_modules, out_path, meta, family=family, overwrite=overwrite)
        return MergeSvdResult(path, family, len(out_modules), retained, warnings)
    finally:
        for lf in files:
            lf.close()
