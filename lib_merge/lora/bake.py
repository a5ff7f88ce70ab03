"""Baking LoRAs into a checkpoint: W' = W + Σ strength · ΔW, streamed one checkpoint key at a time.

For each key of the checkpoint (in file order) the tensor is read lazily; when LoRA modules target it, their
ΔW (lora.formats.delta, float32) times the strength is added in float32: the UNet strength for `lora_unet_`
modules, the text-encoder strength for `lora_te*` modules, times the block weight of the module's block when
block weights are given (lbw.py). SD2's and SDXL's second text encoder fuse q/k/v in `attn.in_proj_weight`:
the q/k/v modules add into their row thirds. The result is cast to the output dtype and written to an engine Sink: a
file (FileSink: streamed, atomic), a state dict (DictSink), or a live model's tensors (the host's TensorSink;
only the keys asked for, so an XY plot's next cell rewrites just what its LoRAs touch). Keys no LoRA touches are written as read (byte-identical when the
dtype is kept); non-float tensors (position_ids) are never cast. Only one checkpoint tensor and one ΔW are
in memory at a time (plus what the LoRA files hold: they are read one module at a time).

LoRA modules without a key in this architecture's checkpoints are skipped with a warning (logged and listed in
the recipe); a module whose ΔW shape does not fit its key is an error.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.arch import detect
from ..core.errors import ArchitectureMismatchError, CancelledError, InputError
from ..core.files import check_output_path, dtype_from_name, dtype_name, file_hashes, open_model
from ..core.heap import mapped_temporaries
from . import keys as K
from .formats import LoraFile
from .lbw import module_weight, parse_lbw
from .merge import RECIPE_KEY, LoraInput, as_input, common_family, open_inputs

log = logging.getLogger(__name__)


@dataclass
class _Term:
    lora: int
    name: str
    strength: float
    part: int | None = None      # 0/1/2: q/k/v third of a fused in_proj_weight


@dataclass
class BakeResult:
    path: Path | None
    state: dict[str, torch.Tensor] | None
    touched: list[str]
    warnings: list[str] = field(default_factory=list)
    recipe: dict = field(default_factory=dict)     # what went into the metadata (merge_lab_recipe)


def _plan(files: list[LoraFile], inputs: list[LoraInput], lbws: list, family: str, shapes: dict,
          warnings: list[str]) -> dict[str, list[_Term]]:
    plan: dict[str, list[_Term]] = {}
    for i, (lf, inp) in enumerate(zip(files, inputs)):
        weights = parse_lbw(lbws[i], family) if lbws[i] is not None else None
        missing = []
        for name, m in lf.modules.items():
            target = K.resolve(name, family)
            if target is None or target.key not in shapes:
                missing.append(name)
                continue
            strength = inp.weight(name) * module_weight(name, family, weights)
            if strength == 0:
                continue
            part = None
            if target.rows is not None:
                part = target.rows[0] // (target.rows[1] - target.rows[0])
            plan.setdefault(target.key, []).append(_Term(i, name, strength, part))
        if missing and len(missing) == len(lf.modules):
            raise ArchitectureMismatchError(
                f"No module of '{inp.path.name}' has a key in this {family.upper()} checkpoint (e.g. {missing[0]}): "
                f"the LoRA is for another architecture.")
        if missing:
            warnings.append(f"'{inp.path.name}': {len(missing)} module(s) have no key in this checkpoint and "
                            f"were skipped (e.g. {missing[0]}).")
    return plan


def _fit(dw: torch.Tensor, want: tuple[int, ...], name: str, key: str) -> torch.Tensor:
    if tuple(dw.shape) == want:
        return dw
    if dw.numel() == torch.Size(want).numel() and [d for d in dw.shape if d != 1] == [d for d in want if d != 1]:
        return dw.reshape(want)  # linear vs 1x1 conv (SD1 proj_in/out are convolutions, SD2/SDXL linear)
    raise InputError(f"LoRA module {name} has ΔW {list(dw.shape)} but checkpoint key {key} is {list(want)}: "
                     f"the LoRA was made for a different model.")


@mapped_temporaries()   # results kept between big temporaries must not fragment the heap (heap.py)
def bake(checkpoint, loras, out=None, *, lbw=None, dtype: str | torch.dtype | None = "float16",
         overwrite: bool = False, progress=None, cancel=None, keys=None) -> BakeResult:
    """Apply LoRAs into a checkpoint.

    `loras`: list of (path, strength_unet, strength_te), (path, strength), LoraInput or "FILE[:W[:W_TE]]"; a
    LoraFile held in memory (a merge not saved) may stand for a path.
    `out`: a .safetensors path (streamed, atomic), None for an in-memory state dict (BakeResult.state), or an
    engine Sink (e.g. the host's live model: the merge tab's TensorSink). `keys`: write only these checkpoint
    keys (into a Sink that already holds the checkpoint: an XY plot's next cell); None: every key.
    `lbw`: block weights for every LoRA (preset name, "1,0,..." text, list or {block: w}) or a list with one
    entry (or None) per LoRA. `dtype`: output dtype of float tensors ("float16", "bfloat16", "float32"), None
    to keep each tensor's own dtype. Metadata: `merge_lab_recipe` (JSON: base model name and sha256, each
    LoRA's name, sha256 (or its own recipe, for one in memory), strengths and block weights, the dtype,
    skipped modules).
    `progress(i, n, key)` is called per key; `cancel()` returning True stops with CancelledError (no file)."""
    from ..engine.sinks import DictSink, FileSink, Sink
    inputs = [as_input(x) for x in loras]
    if not inputs:
        raise InputError("Give at least one LoRA to bake.")
    lbws = list(lbw) if isinstance(lbw, list) and len(lbw) == len(inputs) and (
        not lbw or not isinstance(lbw[0], (int, float))) else [lbw] * len(inputs)
    out_dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    ckpt = Path(checkpoint)
    if isinstance(out, Sink):
        sink = out
    elif out is None:
        sink = DictSink()
    else:
        path = check_output_path(Path(out), [ckpt] + [i.path for i in inputs if i.file is None], overwrite)
        sink = FileSink(path, overwrite=overwrite)
    warnings: list[str] = []
    opened = False
    with open_model(ckpt) as mf, open_inputs(inputs) as files:
        shapes = {k: tuple(info.shape) for k, info in mf.tensors.items()}
        arch = detect(shapes, ckpt.name)
        names = [i.name for i in inputs]
        common_family(files, names, extra=(ckpt.name, arch.family))
        for lf, name in zip(files, names):
            if lf.family is None:
                warnings.append(f"'{name}' does not say which architecture it is for; applied as "
                                f"{arch.label} by its module names.")
        plan = _plan(files, inputs, lbws, arch.family, shapes, warnings)
        for w in warnings:
            log.warning(w)

        def out_dt(info_dtype: torch.dtype) -> torch.dtype:
            if out_dtype is None or not info_dtype.is_floating_point:
                return info_dtype
            return out_dtype

        entries = [(k, out_dt(info.dtype), tuple(info.shape)) for k, info in mf.tensors.items()]
        loras_json = []
        for i, inp in enumerate(inputs):
            item = {"name": inp.name, "strength_unet": inp.w_unet, "strength_te": inp.w_te,
                    "lbw": lbws[i] if not isinstance(lbws[i], dict) else dict(lbws[i])}
            if inp.file is None:
                item["sha256"] = file_hashes(inp.path)["sha256"]
            elif RECIPE_KEY in inp.file.metadata:
                item["recipe"] = json.loads(inp.file.metadata[RECIPE_KEY])
            loras_json.append(item)
        recipe = {
            "format": 1, "tool": "lora bake",
            "model": {"name": ckpt.name, "sha256": file_hashes(ckpt)["sha256"]},
            "loras": loras_json,
            "dtype": dtype_name(out_dtype) if out_dtype is not None else "keep",
            "architecture": arch.family, "keys_changed": len(plan), "warnings": warnings,
        }
        meta = {RECIPE_KEY: json.dumps(recipe)}
        wanted = entries if keys is None else [e for e in entries if e[0] in set(keys)]
        try:
            sink.open(entries, meta)
            opened = True
            for i, (key, odt, shape) in enumerate(wanted):
                if cancel is not None and cancel():
                    raise CancelledError("Bake interrupted: nothing was written.")
                if progress is not None:
                    progress(i, len(wanted), key)
                sink.write(key, _baked(mf, key, plan.get(key), files).to(sink.dtype_for(key, odt)))
            output = sink.close(meta)
        except BaseException:
            if opened:   # a file is removed; a live model is put back by its owner
                sink.abort()
            raise
    path = output if isinstance(output, Path) else None
    state = output if isinstance(sink, DictSink) else None
    return BakeResult(path, state, sorted(plan), warnings, recipe)


def _baked(mf, key: str, terms: list[_Term] | None, files: list[LoraFile]) -> torch.Tensor:
    """The checkpoint's tensor `key` with its LoRA terms added in float32 (as read when no LoRA touches it)."""
    t = mf.read(key)
    if not terms:
        return t
    w = t.to(torch.float32)   # a fresh float32 copy (or the float32 tensor itself: cloned below)
    if w.data_ptr() == t.data_ptr():
        w = w.clone()
    for term in terms:
        dw = files[term.lora].delta(term.name)
        if term.part is None:
            w += term.strength * _fit(dw, tuple(w.shape), term.name, key)
        else:
            d = w.shape[0] // 3
            rows = w[term.part * d:(term.part + 1) * d]
            rows += term.strength * _fit(dw, tuple(rows.shape), term.name, key)
    return w
