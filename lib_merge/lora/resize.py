"""Resize a LoRA: per module, full ΔW -> SVD -> keep a rank (fixed or by a rule) -> kohya factors.

The new alpha is the new rank and up = U·S carries the old scale α/r, so the module's ΔW (its strength) is
kept: only what lies beyond the kept singular values is lost, and the retained Frobenius fraction
sqrt(Σ_kept S² / Σ S²) = ‖ΔW_k‖_F / ‖ΔW‖_F is reported per module (kohya's "Frobenius retained"). LoHa/LoKr modules are resized the same way (into plain LoRA).

Dynamic rules (`rank` or `max_rank`, when given, cap the result; so does min(out, in·kh·kw)):
* `sv_ratio:X`      keep the singular values S_i ≥ S_0 / X;
* `sv_cumulative:X` the smallest k with Σ_{i<k} S_i / Σ S ≥ X;
* `sv_fro:X`        the smallest k with sqrt(Σ_{i<k} S_i² / Σ S²) ≥ X (X = the Frobenius fraction kept).
A module whose largest singular value is ≤ 1e-6 keeps rank 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.heap import mapped_temporaries
from .merge import step
from .svd import SvdError, max_rank as _max_rank, svd_top

RULES = ("sv_ratio", "sv_cumulative", "sv_fro")


@dataclass
class ResizeResult:
    path: Path
    family: str | None
    ranks: dict[str, tuple[int, int]] = field(default_factory=dict)     # module -> (old rank, new rank)
    retained: dict[str, float] = field(default_factory=dict)            # module -> retained Frobenius fraction
    warnings: list[str] = field(default_factory=list)


def parse_dynamic(text: str) -> tuple[str, float]:
    """'sv_fro:0.9' -> ('sv_fro', 0.9), with the value checked."""
    rule, sep, value = str(text).partition(":")
    rule = rule.strip()
    if not sep or rule not in RULES:
        raise SvdError(f"A dynamic rank is RULE:VALUE with RULE one of {', '.join(RULES)} (got '{text}').")
    try:
        x = float(value)
    except ValueError:
        raise SvdError(f"'{value}' in '{text}' is not a number.") from None
    if rule == "sv_ratio" and not x >= 1:
        raise SvdError(f"sv_ratio is the ratio of the largest kept singular value to the smallest: at least 1 "
                       f"(got {x}).")
    if rule != "sv_ratio" and not 0 < x <= 1:
        raise SvdError(f"{rule} is a fraction in (0, 1] (got {x}).")
    return rule, x


def rank_by_rule(S: torch.Tensor, rule: str, x: float) -> int:
    """The rank kept from singular values `S` (descending) by a dynamic rule (see the module docstring)."""
    S = S.double()
    if S.numel() == 0 or float(S[0]) <= 1e-6:
        return 1
    if rule == "sv_ratio":
        k = int((S >= S[0] / x).sum())
    elif rule == "sv_cumulative":
        c = torch.cumsum(S, 0) / S.sum()
        k = int(torch.searchsorted(c, torch.tensor(x, dtype=c.dtype) - 1e-12)) + 1
    elif rule == "sv_fro":
        c = torch.sqrt(torch.cumsum(S * S, 0) / (S * S).sum())
        k = int(torch.searchsorted(c, torch.tensor(x, dtype=c.dtype) - 1e-12)) + 1
    else:
        raise SvdError(f"Unknown rule '{rule}': use {', '.join(RULES)}.")
    return max(1, min(k, S.numel()))


@mapped_temporaries()   # results kept between big temporaries must not fragment the heap (heap.py)
def resize(lora_path, out, rank: int | None = None, dynamic: str | None = None, max_rank: int | None = None, *,
           conv_rank: int | None = None, dtype: torch.dtype = torch.float16, overwrite: bool = False,
           progress=None, cancel=None) -> ResizeResult:
    """Write `lora_path` resized to `rank` (3x3 convs: `conv_rank`, default `rank`) or by the `dynamic` rule
    ('sv_ratio:X' | 'sv_cumulative:X' | 'sv_fro:X', capped by `max_rank` / `rank`). Uses the full SVD (every
    singular value is needed for the rules and the retained fraction)."""
    from .formats import open_lora, save_kohya
    if rank is None and dynamic is None:
        raise SvdError("Give a rank or a dynamic rule (e.g. sv_fro:0.9) to resize to.")
    for v, what in ((rank, "rank"), (max_rank, "max rank"), (conv_rank, "conv rank")):
        if v is not None and v < 1:
            raise SvdError(f"The {what} must be at least 1 (got {v}).")
    rule = parse_dynamic(dynamic) if dynamic else None
    from ..core.files import check_output_path
    out = check_output_path(Path(out), [Path(lora_path)], overwrite)   # before any work
    result = None
    with open_lora(lora_path) as lf:
        result = ResizeResult(Path(out), lf.family, warnings=list(lf.warnings))
        own = max((m.rank for m in lf.modules.values()), default=0)
        if rule is None and rank is not None and own and rank > own:
            # a higher rank than the LoRA has adds only zero singular values: a bigger file, the same LoRA
            raise SvdError(f"'{Path(lora_path).name}' has rank {own} (its largest module); resizing to rank {rank} "
                           f"would only pad it with zeros. Choose a rank from 1 to {own}.")
        modules = {}
        names = list(lf.modules)
        for i, name in enumerate(names):
            step(progress, cancel, i, len(names), name, "The resize")
            m = lf.modules[name]
            dw = lf.delta(name)
            conv3 = dw.dim() == 4 and tuple(dw.shape[2:]) != (1, 1)
            mat = dw.reshape(dw.shape[0], -1)
            U, S, Vh = svd_top(mat, min(mat.shape), method="full")
            cap = _max_rank(dw.shape)
            fixed = (conv_rank or rank) if conv3 else rank
            if rule:
                k = rank_by_rule(S, *rule)
                for c in (max_rank, fixed):
                    if c is not None:
                        k = min(k, c)
            else:
                k = fixed
            k = max(1, min(k, cap))
            total = float(S.double().pow(2).sum())
            result.retained[name] = math.sqrt(float(S[:k].double().pow(2).sum()) / total) if total > 0 else 1.0
            result.ranks[name] = (m.rank, k)
            up = (U[:, :k] * S[:k])
            down = Vh[:k]
            if dw.dim() == 4:
                up = up.reshape(dw.shape[0], k, 1, 1)
                down = down.reshape(k, *dw.shape[1:])
            modules[name] = (down.contiguous().to(dtype), up.contiguous().to(dtype), float(k))
        step(progress, cancel, len(names), len(names), "", "The resize")
        meta = {k: v for k, v in lf.metadata.items() if k.startswith(("ss_", "modelspec."))}
        for k in ("ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_network_module",
                  "modelspec.title", "modelspec.date"):
            meta.pop(k, None)
        old = sorted({m.rank for m in lf.modules.values()})
        how = f"dynamic {dynamic}" + (f" (max rank {max_rank})" if max_rank else "") if rule else f"rank {rank}"
        comment = f"resized from rank {'/'.join(map(str, old))} by {how}"
        prev = meta.get("ss_training_comment")
        meta["ss_training_comment"] = comment + (f"; {prev}" if prev else "")
        family = lf.family
    result.path = save_kohya(modules, out, meta, family=family, overwrite=overwrite)
    return result


def mean_retained(result) -> float:
    """Mean retained Frobenius fraction over the modules (for summaries)."""
    vals = list(result.retained.values())
    return sum(vals) / len(vals) if vals else math.nan
