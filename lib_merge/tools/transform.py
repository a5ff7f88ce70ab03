"""Model-to-model tools: normalize (scale model A's norms toward model B's) and inject noise.

Both stream: the output has model A's keys in A's order; each key is read on its own (ModelFile.read),
transformed and written at once with SafetensorsWriter, so memory holds a few tensors, never a model.
The output never replaces an input, and a failure removes the temporary file. Formulas:
docs/MASKS_AND_WEIGHTS.md.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..core.arch import TEXT_ENCODER, UNET, component_of
from ..core.errors import InputError
from ..core.files import ModelFile, SafetensorsWriter, check_output_path, open_model
from ..core.masks import Mask
from ..core.randomness import generator_for
from ..core.weights import match_keys, mergeable_shapes

NORMALIZE_MODES = ("attn_only", "all", "none")
NOISE_KINDS = ("uniform", "gaussian")
EPS = 1e-12


@dataclass
class ToolResult:
    path: Path
    changed: list[str] = field(default_factory=list)  # keys whose values the tool changed
    notes: list[str] = field(default_factory=list)    # what was skipped and why, for the user


@contextmanager
def _opened(model: ModelFile | str | os.PathLike):
    """Use an open ModelFile as it is, or open (and later close) a path."""
    if isinstance(model, ModelFile):
        yield model
        return
    m = open_model(model)
    try:
        yield m
    finally:
        m.close()


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _stream(a: ModelFile, out, inputs: list[ModelFile], transform: Callable[[str, torch.Tensor], torch.Tensor | None],
            *, dtype: torch.dtype | None, overwrite: bool, metadata: dict[str, str]) -> Path:
    """Copy A key by key into `out`, replacing a key's values where transform(key, tensor) returns a tensor.
    `dtype` (None: keep A's) applies to float tensors only."""
    out = check_output_path(Path(out), [m.path for m in inputs], overwrite)
    entries = [(k, dtype if dtype is not None and i.is_float else i.dtype, i.shape) for k, i in a.tensors.items()]
    writer = SafetensorsWriter(out, entries, metadata)
    try:
        for key in a.tensors:
            t = a.read(key)
            new = transform(key, t)
            writer.write(key, (t if new is None else new).to(writer.dtype_of[key]))
        return writer.commit(metadata)
    except BaseException:
        writer.abort()
        raise


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64))


def _scale(a: ModelFile, b: ModelFile, key: str, magnify: bool, notes: list[str]) -> float | None:
    """s = ‖B‖ / (‖A‖ + 1e-12) (magnify: ‖A‖ / (‖B‖ + 1e-12)) for one key, or None (with a note)
    when B lacks the key, the shapes differ, or s is 0 or not finite."""
    info = b.tensors.get(key)
    if info is None or info.shape != a.tensors[key].shape:
        notes.append(f"'{key}' is missing from '{b.name}' or has another shape there: copied from A.")
        return None
    na, nb = _norm(a.read(key)), _norm(b.read(key))
    s = na / (nb + EPS) if magnify else nb / (na + EPS)
    if s == 0 or not math.isfinite(s):
        notes.append(f"'{key}': the norm ratio is {s}, which cannot be applied: copied from A.")
        return None
    return s


def _sibling(key: str, old: str, new: str) -> str:
    return key[: -len(old)] + new


def normalize_scales(a: ModelFile, b: ModelFile, mode: str = "attn_only", magnify: bool = False
                     ) -> tuple[dict[str, float], list[str]]:
    """{key: factor} that normalize applies to model A, and notes about skipped keys.

    attn_only: for each UNet attention (keys ending in '.to_q.weight' with a '.to_k.weight' beside it),
      s = s(Q): Q ← Q·s, K ← K/s (and their biases, if any, the same), so QᵀK — the attention logits —
      does not change.
    all: every float '.weight' tensor of the UNet and text encoders by its own s, and its '.bias' by the
      same s.
    none: nothing (a plain copy of A).
    """
    if mode not in NORMALIZE_MODES:
        raise InputError(f"Unknown normalize mode '{mode}'; use one of {', '.join(NORMALIZE_MODES)}.")
    scales: dict[str, float] = {}
    notes: list[str] = []
    for key, info in a.tensors.items():
        if not info.is_float:
            continue
        if mode == "attn_only" and component_of(key) == UNET and key.endswith(".to_q.weight"):
            k_key = _sibling(key, "to_q.weight", "to_k.weight")
            if k_key not in a.tensors:
                notes.append(f"'{key}' has no '{k_key}' beside it: copied from A.")
                continue
            s = _scale(a, b, key, magnify, notes)
            if s is None:
                continue
            for name, factor in ((key, s), (k_key, 1 / s)):
                scales[name] = factor
                bias = _sibling(name, "weight", "bias")
                if bias in a.tensors:
                    scales[bias] = factor
        elif mode == "all" and component_of(key) in (UNET, TEXT_ENCODER) and key.endswith(".weight"):
            s = _scale(a, b, key, magnify, notes)
            if s is None:
                continue
            scales[key] = s
            bias = _sibling(key, "weight", "bias")
            if bias in a.tensors and a.tensors[bias].is_float:
                scales[bias] = s
    return scales, notes


def normalize(model_a, model_b, out, *, mode: str = "attn_only", magnify: bool = False,
              dtype: torch.dtype | None = None, overwrite: bool = False) -> ToolResult:
    """Write model A with its parameter norms scaled toward model B's (see normalize_scales)."""
    with _opened(model_a) as a, _opened(model_b) as b:
        scales, notes = normalize_scales(a, b, mode, magnify)
        meta = {"merge_lab_tool": json.dumps({"tool": "normalize", "mode": mode, "magnify": magnify,
                                              "models": [a.name, b.name]})}
        path = _stream(a, out, [a, b], lambda k, t: _compute(t) * scales[k] if k in scales else None,
                       dtype=dtype, overwrite=overwrite, metadata=meta)
    return ToolResult(path, list(scales), notes)


def noise_for(key: str, shape, kind: str, mean: float, std: float, seed: int) -> torch.Tensor:
    """The noise of one key, float32, seeded from (seed, key).

    uniform: U[0,1) − 0.5 (mean and std unused).
    gaussian: N(mean, std) − mean, i.e. std·N(0,1): `mean` cancels out (kept for DareMerge parity).
    """
    g = generator_for(seed, key, "noise")
    if kind == "uniform":
        return torch.rand(shape, generator=g).sub_(0.5)
    return torch.randn(shape, generator=g).mul_(std)


def inject_noise(model, out, *, kind: str = "gaussian", ratio: float = 0.98, mean: float = 0.05, std: float = 0.01,
                 layers: str | None = None, mask: Mask | None = None, seed: int = 0,
                 dtype: torch.dtype | None = None, overwrite: bool = False) -> ToolResult:
    """T = A + noise on the keys matched by `layers` (or, without layers, the keys of `mask`), only where
    the mask is True when one is given; result = ratio·A + (1 − ratio)·T = A + (1 − ratio)·noise."""
    if kind not in NOISE_KINDS:
        raise InputError(f"Unknown noise kind '{kind}'; use uniform or gaussian.")
    if not 0.0 <= ratio <= 1.0:
        raise InputError(f"The ratio is the share of the original model, between 0 and 1, not {ratio}.")
    if not (std >= 0 and math.isfinite(std)):
        raise InputError(f"The standard deviation must be 0 or more, not {std}.")
    with _opened(model) as a:
        shapes = mergeable_shapes(a)
        if layers:
            keys = match_keys(layers, shapes, f"'{a.name}'")
        elif mask is not None:
            keys = [k for k in mask.keys() if k in shapes]
            if not keys:
                raise InputError(f"The mask covers no key of '{a.name}': it was made for another model.")
        else:
            raise InputError("Say where to add noise: give layer patterns (e.g. '*.to_v*') or a mask.")
        chosen = set(keys)

        def add_noise(key: str, t: torch.Tensor) -> torch.Tensor | None:
            if key not in chosen:
                return None
            noise = noise_for(key, t.shape, kind, mean, std, seed).mul_(1.0 - ratio)
            m = mask.get(key, tuple(t.shape)) if mask is not None else None
            if m is not None:
                noise.masked_fill_(~m, 0.0)
            return _compute(t) + noise

        meta = {"merge_lab_tool": json.dumps({"tool": "noise", "kind": kind, "ratio": ratio, "mean": mean,
                                              "std": std, "layers": layers or "", "seed": seed,
                                              "masked": mask is not None, "model": a.name})}
        path = _stream(a, out, [a], add_noise, dtype=dtype, overwrite=overwrite, metadata=meta)
    return ToolResult(path, keys, [])
