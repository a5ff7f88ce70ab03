"""Extract a LoRA from two checkpoints: ΔW = tuned − base, factorised module by module.

Streaming: each module's two weights are read with ModelFile.read (rows only, for SDXL's / SD2's fused q/k/v),
factorised and dropped; the whole models are never held. Modules (kohya's targets): U-Net attention blocks
(proj_in/out, attn1/attn2 q/k/v/out, ff), with `conv_rank` also the resnets (conv1/conv2 3x3, time_emb_proj,
conv_shortcut) and the down/upsampler convs; the text encoder(s)' attention and MLP linears. The text encoder
is skipped when its largest |Δ| is at most `te_threshold` (kohya's min_diff, 0.01).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import InputError
from ..core.heap import mapped_temporaries
from . import keys as K
from .merge import step
from .svd import SvdError, factorize, key_seed, retained_fraction

UNET_PREFIX = "model.diffusion_model."
_ATTN = re.compile(r"\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))\.weight$")
_RESNET = re.compile(r"\.\d+\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv)\.weight$")


@dataclass
class ExtractResult:
    path: Path | None
    family: str
    modules: int
    te_included: bool
    te_max_delta: float
    retained: dict[str, float] = field(default_factory=dict)   # module -> retained Frobenius fraction
    messages: list[str] = field(default_factory=list)


def _unet_kind(path: str) -> str | None:
    """'attn' | 'resnet' | None for a U-Net weight path (after model.diffusion_model.)."""
    p = "." + path
    if not p.startswith((".input_blocks.", ".middle_block.", ".output_blocks.")):
        return None
    if _ATTN.search(p):
        return "attn"
    if _RESNET.search(p):
        return "resnet"
    return None


def plan_modules(family: str, keys, conv: bool) -> list[tuple[str, K.Target]]:
    """(kohya name, Target) of every module to extract whose checkpoint key is in `keys`: U-Net names in
    diffusers style for SD1/SD2 and LDM style for SDXL (what kohya's files use)."""
    keys = set(keys)
    out = []
    for name, tgt in K.module_map(family).items():
        if tgt.key not in keys:
            continue
        part = K.part_of(name)
        if part == "unet":
            path = tgt.key[len(UNET_PREFIX):]
            kind = _unet_kind(path)
            if kind is None or (kind == "resnet" and not conv):
                continue
            ldm = K.UNET + path[:-len(".weight")].replace(".", "_")
            diff = K.ldm_to_diffusers_unet(path)
            preferred = ldm if family == "sdxl" or diff is None else K.UNET + diff[:-len(".weight")].replace(".", "_")
            if name != preferred:
                continue
        out.append((name, tgt))
    return out


def _rows(tgt: K.Target, shape) -> tuple[int, int] | None:
    """The Target's row slice scaled to the file's actual first dimension (tiny test models shrink it)."""
    if tgt.rows is None:
        return None
    size = tgt.rows[1] - tgt.rows[0]
    idx = tgt.rows[0] // size
    d = shape[0] // (tgt.shape[0] // size)
    return idx * d, (idx + 1) * d


@mapped_temporaries()   # results kept between big temporaries must not fragment the heap (heap.py)
def extract(base_path, tuned_path, out_path, rank: int, conv_rank: int | None = None, *,
            te_threshold: float = 0.01, dtype: torch.dtype = torch.float16, clamp_quantile: float | None = 0.99,
            method: str = "auto", seed: int = 0, overwrite: bool = False, progress=None,
            cancel=None) -> ExtractResult:
    """LoRA of `tuned − base` at `rank` (3x3 convs at `conv_rank`; without it the resnets are not extracted,
    as kohya), alpha = rank, written with save_kohya. Returns what was done, with per-module retained
    Frobenius fractions and messages (e.g. the text encoder skipped)."""
    from ..core.arch import check_same_family, detect
    from ..core.files import open_model
    from .formats import save_kohya
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise SvdError("The rank and conv rank must be at least 1.")
    from ..core.files import check_output_path
    out_path = check_output_path(Path(out_path), [Path(base_path), Path(tuned_path)], overwrite)   # before any work
    with open_model(base_path) as base, open_model(tuned_path) as tuned:
        shapes_b = {k: i.shape for k, i in base.tensors.items()}
        shapes_t = {k: i.shape for k, i in tuned.tensors.items()}
        arch = check_same_family([(Path(base_path).name, detect(shapes_b, Path(base_path).name)),
                                  (Path(tuned_path).name, detect(shapes_t, Path(tuned_path).name))])
        family = arch.family
        plan = [(n, t) for n, t in plan_modules(family, shapes_b.keys(), conv_rank is not None) if t.key in shapes_t]
        messages: list[str] = []

        def read_delta(tgt):
            if tuple(shapes_b[tgt.key]) != tuple(shapes_t[tgt.key]):
                raise InputError(f"'{tgt.key}' has shape {list(shapes_b[tgt.key])} in the base and "
                                 f"{list(shapes_t[tgt.key])} in the tuned model: they are not base and fine-tune.")
            rows = _rows(tgt, shapes_b[tgt.key])
            return tuned.read(tgt.key, rows).to(torch.float32) - base.read(tgt.key, rows).to(torch.float32)

        # first pass over the text encoder(s): is it trained at all?
        te_plan = [(n, t) for n, t in plan if K.part_of(n) != "unet"]
        te_max = 0.0
        for _, tgt in te_plan:
            te_max = max(te_max, float(read_delta(tgt).abs().max()))
            if te_max > te_threshold:
                break
        te_included = bool(te_plan) and te_max > te_threshold
        if te_plan and not te_included:
            messages.append(f"The text encoder is left out: its largest change is {te_max:.3g}, at most the "
                            f"threshold {te_threshold:g} (the two models share it).")
            plan = [(n, t) for n, t in plan if K.part_of(n) == "unet"]
        modules, retained = {}, {}
        zero = 0
        for i, (name, tgt) in enumerate(plan):
            step(progress, cancel, i, len(plan), name, "The extraction")
            dw = read_delta(tgt)
            if not bool(dw.any()):
                zero += 1
                continue
            conv3 = dw.dim() == 4 and tuple(dw.shape[2:]) != (1, 1)
            r = conv_rank if conv3 else rank
            up, down, _ = factorize(dw, r, clamp_quantile=clamp_quantile, method=method,
                                    seed=key_seed(seed, name, "svd") & 0x7FFFFFFF)
            retained[name] = retained_fraction(dw, up, down)
            modules[name] = (down.to(dtype), up.to(dtype), float(down.shape[0]))
        step(progress, cancel, len(plan), len(plan), "", "The extraction")
        if zero:
            messages.append(f"{zero} modules are identical in both models and were left out.")
        if not modules:
            raise InputError(f"'{Path(tuned_path).name}' does not differ from '{Path(base_path).name}' in any "
                             f"module a LoRA holds: nothing to extract.")
        meta = {"ss_training_comment": f"extracted from {Path(tuned_path).name} - {Path(base_path).name} "
                                       f"(rank {rank}" + (f", conv rank {conv_rank})" if conv_rank else ")")}
        path = save_kohya(modules, out_path, meta, family=family, overwrite=overwrite)
    return ExtractResult(path, family, len(modules), te_included, te_max, retained, messages)
