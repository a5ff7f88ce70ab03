"""Low-rank factorisation of a full ΔW, and the SVD merge of several LoRAs.

`factorize(delta, rank)` turns a full delta (linear (out, in), conv 1x1 (out, in, 1, 1), conv kxk
(out, in, kh, kw) flattened to (out, in·kh·kw)) into kohya factors `up = U·S`, `down = Vh` with alpha = rank
(scale 1), so `up @ down` is the best rank-r approximation (Eckart–Young) before the optional clamp.

`svd_merge_modules` / `merge_svd(loras, ...)` materialise every LoRA's ΔW = up@down·α/r, combine them per
module with merge.combine ("add", "ties", "dare_linear", "dare_ties", "magnitude_prune": PEFT's definitions),
and factorise the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import InputError
from ..core.heap import mapped_temporaries
from ..core.randomness import generator_for, key_seed
from .merge import DEFAULT_DENSITY

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
    """up@down back to ΔW's shape (linear, 1x1 or kxk conv): the one composition, in formats.py."""
    from .formats import compose as _compose
    return _compose(up, down)


def retained_fraction(dw: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """√(1 − ‖ΔW − up@down‖²/‖ΔW‖²): the share of ΔW's Frobenius norm a factorisation keeps (1 for ΔW = 0)."""
    total = float(dw.norm()) ** 2      # float32 norms: a ratio to 4 digits needs no float64 copies of ΔW
    if total == 0.0:
        return 1.0
    return math.sqrt(max(0.0, 1.0 - float((dw - compose(up, down)).norm()) ** 2 / total))


# ------------------------------------------------------------------------------------------ merge_svd

@dataclass
class MergeSvdResult:
    path: Path | None
    family: str | None
    modules: int
    retained: dict[str, float]      # module -> retained Frobenius fraction of the combined ΔW
    warnings: list[str]


@mapped_temporaries()   # results kept between big temporaries must not fragment the heap (heap.py)
def svd_merge_modules(files, inputs, *, mode: str = "add", density: float = DEFAULT_DENSITY, rank: int = 32,
                      conv_rank: int | None = None, clamp_quantile: float | None = 0.99, seed: int = 0,
                      majority: str = "sum", method: str = "auto", dtype: torch.dtype = torch.float32,
                      progress=None, cancel=None):
    """The SVD merge of opened LoRAs, in memory: ({name: (down, up, alpha)} in `dtype`, {name: retained}, warnings).

    Per module: every LoRA's ΔW (zero where a LoRA lacks the module), combined with merge.combine (PEFT's
    definitions, on full deltas; `concat` is `add` here, the exact weighted sum), then factorised to `rank`
    (3x3 convs: `conv_rank`, default `rank`), alpha = rank. DARE draws come from one CPU generator per
    (seed, module), LoRA after LoRA."""
    from .merge import check_options, combine, step
    mode = "add" if mode == "concat" else mode
    if mode not in MODES:
        raise SvdError(f"Unknown merge mode '{mode}': use {', '.join(MODES)}.")
    check_options(mode, density, majority)
    if mode != "add" and density <= 0:
        raise SvdError(f"density must be in (0, 1] (got {density}).")
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise SvdError("The rank and conv rank must be at least 1.")
    warnings = [w for lf in files for w in lf.warnings]
    names = sorted(set().union(*(lf.modules for lf in files)))
    out_modules, retained = {}, {}
    for i, name in enumerate(names):
        step(progress, cancel, i, len(names), name, "The SVD merge")
        shapes = {tuple(lf.modules[name].shape) for lf in files if name in lf.modules}
        if len(shapes) > 1:
            raise SvdError(f"Module '{name}' has different shapes in the LoRAs ({sorted(shapes)}): they are "
                           f"not for the same model.")
        shape = shapes.pop()
        deltas = [lf.delta(name) if name in lf.modules else torch.zeros(shape) for lf in files]
        weights = [x.weight(name) for x in inputs]
        gen = generator_for(seed, name, "lora_merge_svd") if mode.startswith("dare") else None
        dw = combine(deltas, weights, mode, density=density, majority=majority, gen=gen)
        del deltas
        if not bool(dw.any()):
            warnings.append(f"{name}: the merged ΔW is zero; the module is left out.")
            continue
        conv3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        r = (conv_rank or rank) if conv3 else rank
        up, down, _ = factorize(dw, r, clamp_quantile=clamp_quantile, method=method,
                                seed=key_seed(seed, name, "svd") & 0x7FFFFFFF)
        retained[name] = retained_fraction(dw, up, down)
        out_modules[name] = (down.to(dtype), up.to(dtype), float(down.shape[0]))   # kept: in the output dtype
    step(progress, cancel, len(names), len(names), "", "The SVD merge")
    if not out_modules:
        raise SvdError("The merged LoRA would be empty (every module's ΔW is zero).")
    return out_modules, retained, warnings


def merge_svd(loras, out_path, *, mode: str = "add", density: float = DEFAULT_DENSITY, rank: int = 32,
              conv_rank: int | None = None, clamp_quantile: float | None = 0.99, seed: int = 0,
              majority: str = "sum", method: str = "auto", dtype: torch.dtype | str = torch.float16,
              overwrite: bool = False, progress=None, cancel=None) -> MergeSvdResult:
    """Merge LoRAs through their full deltas and write one kohya LoRA of `rank` (svd_merge_modules).

    `loras`: LoraInput, (path, w) / (path, w_unet, w_te) or "FILE[:W[:W_TE]]". LoRAs of different
    architectures are refused. The recipe goes into the metadata (`merge_lab_recipe`) as for `merge`."""
    from ..core.files import check_output_path, dtype_from_name
    from .formats import save_kohya
    from .merge import as_input, common_family, open_inputs, recipe_metadata
    inputs = [as_input(x) for x in loras]
    if not inputs:
        raise SvdError("Give at least one LoRA to merge.")
    out_path = check_output_path(Path(out_path), [i.path for i in inputs if i.file is None], overwrite)
    tdt = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    with open_inputs(inputs) as files:
        family = common_family(files, [i.name for i in inputs])
        modules, retained, warnings = svd_merge_modules(
            files, inputs, mode=mode, density=density, rank=rank, conv_rank=conv_rank,
            clamp_quantile=clamp_quantile, seed=seed, majority=majority, method=method,
            dtype=tdt or torch.float32, progress=progress, cancel=cancel)
        meta = recipe_metadata(inputs, family, mode=mode, density=density, seed=seed, majority=majority,
                               rank=rank, conv_rank=conv_rank, clamp_quantile=clamp_quantile, dtype=tdt)
        path = save_kohya(modules, out_path, meta, family=family, dtype=tdt, overwrite=overwrite)
    return MergeSvdResult(path, family, len(modules), retained, warnings)
