"""Parameter masks: which elements of each tensor a merge may change.

True means "may change", False means "keep model A's value". A key that is not in a mask is
unrestricted (the engine treats `get` returning None as all True).

A mask is stored one bit per element (numpy.packbits of the flattened tensor, big bit order, the padding
bits of the last byte always zero), so a mask of a whole SDXL checkpoint (UNet and text encoders, 3.4 G
elements) takes about 400 MiB instead of 3.4 GB of bools. The packed arrays are never changed in place: edits and set operations build new ones.

Every random draw comes from a CPU torch.Generator seeded from sha256(f"{seed}:{key}") (as the engine
seeds its methods), so a mask depends on the seed and the key only, never on the order of the keys.
Formulas, edge cases and the file format: docs/MASKS_AND_WEIGHTS.md.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .errors import InputError, OutputError
from .files import open_model, save_state_dict
from .randomness import generator_for
from .weights import match_keys, mergeable_shapes

MASK_FORMAT = "merge-lab-mask"
SIMPLE_MODES = ("random", "gaussian", "true", "false")
SET_OPS = ("union", "intersection", "difference", "xor")
QUANTILE_LIMIT = 2 ** 24  # older torch refuses quantile above this; chunking keeps results version-independent

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _numel(shape) -> int:
    return math.prod(shape)


def _pack(mask: torch.Tensor) -> np.ndarray:
    return np.packbits(mask.reshape(-1).cpu().numpy())


class Mask:
    """Per-key boolean masks, bit-packed. `family` is the architecture they were made for (or None)."""

    def __init__(self, family: str | None = None):
        self.family = family
        self.notes: list[str] = []  # what a builder skipped, for the user; not saved
        self._bits: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._true: dict[str, int] = {}

    # ------------------------------------------------------------------------------ contents
    def put(self, key: str, mask: torch.Tensor) -> None:
        """Store the mask of one key (a bool tensor of the key's full shape)."""
        if mask.dtype != torch.bool:
            raise TypeError(f"mask of {key} must be bool, not {mask.dtype}")
        self._put_packed(key, tuple(mask.shape), _pack(mask))

    def _put_packed(self, key: str, shape: tuple[int, ...], packed: np.ndarray) -> None:
        self._bits[key] = packed
        self._shapes[key] = tuple(shape)
        self._true[key] = int(_POPCOUNT[packed].sum(dtype=np.int64))

    def keys(self) -> list[str]:
        return list(self._bits)

    def __contains__(self, key) -> bool:
        return key in self._bits

    def __len__(self) -> int:
        return len(self._bits)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def numel(self, key: str) -> int:
        return _numel(self._shapes[key])

    def true_count(self, key: str) -> int:
        return self._true[key]

    def copy(self) -> "Mask":
        out = Mask(self.family)
        out._bits, out._shapes, out._true = dict(self._bits), dict(self._shapes), dict(self._true)
        return out

    def get(self, key: str, shape, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The mask of `key` (full `shape`), or of rows [r0, r1) of its first dimension; None when the key
        is not in the mask (unrestricted). Only the bytes of the asked rows are unpacked."""
        bits = self._bits.get(key)
        if bits is None:
            return None
        shape = tuple(shape)
        if shape != self._shapes[key]:
            raise InputError(f"The mask of '{key}' was made for shape {list(self._shapes[key])}, but the model's "
                             f"tensor has shape {list(shape)}: the mask belongs to another architecture. "
                             f"Make the mask from one of the models being merged.")
        n = _numel(shape)
        if rows is None:
            start, end, out_shape = 0, n, shape
        else:
            r0, r1 = rows
            if not shape or not 0 <= r0 <= r1 <= shape[0]:
                raise ValueError(f"rows {rows} outside {key} of shape {shape}")
            per_row = n // shape[0] if shape[0] else 0
            start, end, out_shape = r0 * per_row, r1 * per_row, (r1 - r0,) + shape[1:]
        b0 = start // 8
        flat = np.unpackbits(bits[b0:(end + 7) // 8])[start - 8 * b0:end - 8 * b0]
        return torch.from_numpy(flat.view(np.bool_)).reshape(out_shape)

    def tensor(self, key: str) -> torch.Tensor:
        """The whole mask of one key as a bool tensor (for tests and reports; the engine uses get)."""
        return self.get(key, self._shapes[key])

    # ------------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write a .safetensors file: one uint8 tensor of packed bits per key, the shapes in the metadata.
        Written through a temporary file and renamed, so a failure leaves nothing behind."""
        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            raise OutputError(f"A mask is saved as .safetensors, not '{path.name}'.")
        metadata = {"format": MASK_FORMAT, "version": "1", "bitorder": "big", "arch": self.family or "",
                    "shapes": json.dumps({k: list(s) for k, s in self._shapes.items()}, separators=(",", ":"))}
        return save_state_dict({k: torch.from_numpy(v) for k, v in self._bits.items()}, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Mask":
        path = Path(path)
        with open_model(path) as f:
            meta = f.metadata
            if meta.get("format") != MASK_FORMAT:
                raise InputError(f"'{path.name}' is not a Merge Lab mask (its metadata has no format "
                                 f"'{MASK_FORMAT}'). Make masks with `mask simple|magnitude|quad|op|edit`.")
            if meta.get("version") != "1":
                raise InputError(f"'{path.name}' is a mask of version {meta.get('version')!r}; this Merge Lab "
                                 f"reads version 1. Update Merge Lab.")
            try:
                shapes = {k: tuple(int(d) for d in s) for k, s in json.loads(meta["shapes"]).items()}
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError):
                raise InputError(f"'{path.name}': the mask's shape table is missing or damaged.") from None
            negative = next((k for k, s in shapes.items() if any(d < 0 for d in s)), None)
            if negative is not None:
                raise InputError(f"'{path.name}': the mask's shape table gives '{negative}' a negative dimension "
                                 f"{list(shapes[negative])}; the file is damaged.")
            mask = cls(meta.get("arch") or None)
            for key, info in f.tensors.items():
                shape = shapes.get(key)
                n_bytes = (_numel(shape) + 7) // 8 if shape is not None else -1
                if info.dtype != torch.uint8 or info.shape != (n_bytes,):
                    raise InputError(f"'{path.name}': the mask of '{key}' does not match its recorded shape; "
                                     f"the file is damaged.")
                packed = f.read(key).numpy()  # a fresh array: ours to keep
                if packed.size and _numel(shape) % 8:
                    packed[-1] &= (0xFF << (8 - _numel(shape) % 8)) & 0xFF  # padding bits stay zero
                mask._put_packed(key, shape, packed)
            lost = [k for k in shapes if k not in f.tensors]
            if lost:
                raise InputError(f"'{path.name}': the mask lists '{lost[0]}' but holds no data for it; "
                                 f"the file is damaged.")
        return mask


# =================================================================================== builders

def _check_draw(mode: str, probability: float, std: float) -> None:
    if mode not in SIMPLE_MODES:
        raise InputError(f"Unknown mask mode '{mode}'; use one of {', '.join(SIMPLE_MODES)}.")
    if not 0.0 <= probability <= 1.0:
        raise InputError(f"The probability must be between 0 and 1, not {probability}.")
    if not (std >= 0 and math.isfinite(std)):
        raise InputError(f"The standard deviation must be 0 or more, not {std}.")


def _draw(mode: str, key: str, shape, seed: int, probability: float, mean: float, std: float,
          threshold: float) -> torch.Tensor:
    if mode == "true":
        return torch.ones(shape, dtype=torch.bool)
    if mode == "false":
        return torch.zeros(shape, dtype=torch.bool)
    g = generator_for(seed, key)
    if mode == "random":
        return torch.rand(shape, generator=g) < probability
    x = torch.randn(shape, generator=g)
    return x.mul_(std).add_(mean) > threshold


def simple(shapes, mode: str = "random", *, probability: float = 0.5, mean: float = 0.0, std: float = 1.0,
           threshold: float = 0.0, seed: int = 0, family: str | None = None) -> Mask:
    """A mask for every float UNet / text-encoder key of `shapes` (a ModelFile, state dict or {key: shape}).

    random:   True where U[0,1) < probability, so P(True) = probability.
    gaussian: True where mean + std·N(0,1) > threshold, so P(True) = 1 − Φ((threshold − mean) / std).
    true / false: every element True / False.
    """
    _check_draw(mode, probability, std)
    mask = Mask(family)
    for key, shape in mergeable_shapes(shapes).items():
        mask.put(key, _draw(mode, key, shape, seed, probability, mean, std, threshold))
    return mask


def quad(shapes, seed: int = 0, family: str | None = None) -> list[Mask]:
    """Four disjoint masks covering every element: each element goes to mask i for a uniform draw i in 0..3."""
    masks = [Mask(family) for _ in range(4)]
    for key, shape in mergeable_shapes(shapes).items():
        draw = torch.randint(0, 4, shape, generator=generator_for(seed, key, "quad"), dtype=torch.uint8)
        for i, m in enumerate(masks):
            m.put(key, draw == i)
    return masks


def magnitude_threshold(delta: torch.Tensor, t: float, threshold_type: str = "median",
                        limit: int = QUANTILE_LIMIT) -> float:
    """The t-quantile τ of a flat tensor; above `limit` elements, combined from equal chunks.

    Chunks: k = ceil(n / limit), chunk i = [i·n//k, (i+1)·n//k). With q the sorted chunk quantiles,
    'median' takes q[(k−1)//2] (the lower middle), 'quantile' takes q[min(int(t·k), k−1)].
    """
    n = delta.numel()
    if n <= limit:
        return float(torch.quantile(delta, t))
    k = -(-n // limit)
    bounds = [i * n // k for i in range(k + 1)]
    qs = sorted(float(torch.quantile(delta[bounds[i]:bounds[i + 1]], t)) for i in range(k))
    return qs[(k - 1) // 2] if threshold_type == "median" else qs[min(int(t * k), k - 1)]


def magnitude_select(delta: torch.Tensor, select: str, t: float, threshold_type: str = "median",
                     limit: int = QUANTILE_LIMIT) -> torch.Tensor:
    """below: delta < τ; above: delta ≥ τ. t = 0 gives below nothing, above everything; t = 1 gives
    below everything, above nothing (the share of small elements is t, of large ones 1 − t)."""
    if t >= 1.0:
        return torch.full(delta.shape, select == "below", dtype=torch.bool)
    if t <= 0.0:
        return torch.full(delta.shape, select == "above", dtype=torch.bool)
    if delta.numel() == 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    tau = magnitude_threshold(delta.reshape(-1), t, threshold_type, limit)
    return delta < tau if select == "below" else delta >= tau


def magnitude(model, base, *, select: str = "below", threshold: float = 0.5, threshold_type: str = "median",
              layers: str | None = None, family: str | None = None) -> Mask:
    """From δ = |model − base| per key: select 'below' keeps the elements under the `threshold` quantile
    of δ, 'above' those at or over it. `model`, `base`: open ModelFiles, read one key at a time.
    `layers`: optional patterns limiting the keys. Keys missing from `base` or of another shape are left
    out (unrestricted) and listed in `mask.notes`."""
    if select not in ("above", "below"):
        raise InputError(f"select must be 'above' or 'below', not '{select}'.")
    if threshold_type not in ("median", "quantile"):
        raise InputError(f"threshold_type must be 'median' or 'quantile', not '{threshold_type}'.")
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"The threshold is a quantile between 0 and 1, not {threshold}.")
    shapes = mergeable_shapes(model)
    keys = match_keys(layers, shapes, "the model") if layers else list(shapes)
    mask = Mask(family)
    for key in keys:
        info = base.tensors.get(key)
        if info is None or tuple(info.shape) != shapes[key]:
            mask.notes.append(f"'{key}' is missing from the base model or has another shape there: left unrestricted.")
            continue
        delta = model.read(key).to(torch.float32).sub_(base.read(key).to(torch.float32)).abs_()
        mask.put(key, magnitude_select(delta, select, threshold, threshold_type))
    return mask


# ============================================================================ set operations

def _check_common(a: Mask, b: Mask) -> None:
    for key in a.keys():
        if key in b and a.shape(key) != b.shape(key):
            raise InputError(f"The masks disagree on the shape of '{key}' ({list(a.shape(key))} vs "
                             f"{list(b.shape(key))}): they were made for different architectures.")


def combine(a: Mask, b: Mask, op: str) -> Mask:
    """Element-wise set operation on two masks.

    union:        keys of a; a OR b, a copied where b lacks the key (b-only keys dropped).
    intersection: keys in both; a AND b.
    difference:   keys of a; a AND NOT b, a copied where b lacks the key.
    xor:          keys of either; a XOR b, the present one copied where only one has the key.
    """
    ops = {"union": np.bitwise_or, "intersection": np.bitwise_and,
           "difference": lambda x, y: np.bitwise_and(x, np.invert(y)), "xor": np.bitwise_xor}
    if op not in ops:
        raise InputError(f"Unknown mask operation '{op}'; use one of {', '.join(SET_OPS)}.")
    _check_common(a, b)
    out = Mask(a.family or b.family)
    keys: Iterable[str] = a.keys() + [k for k in b.keys() if k not in a] if op == "xor" else a.keys()
    for key in keys:
        if key in a and key in b:
            out._put_packed(key, a.shape(key), ops[op](a._bits[key], b._bits[key]))
        elif op != "intersection":
            src = a if key in a else b
            out._put_packed(key, src.shape(key), src._bits[key])
    return out


def union(a: Mask, b: Mask) -> Mask:
    return combine(a, b, "union")


def intersection(a: Mask, b: Mask) -> Mask:
    return combine(a, b, "intersection")


def difference(a: Mask, b: Mask) -> Mask:
    return combine(a, b, "difference")


def xor(a: Mask, b: Mask) -> Mask:
    return combine(a, b, "xor")


def edit(mask: Mask, patterns: str, op: str = "true", *, probability: float = 0.5, mean: float = 0.0,
         std: float = 1.0, threshold: float = 0.0, seed: int = 0) -> Mask:
    """A copy of `mask` where every key matched by the patterns is replaced by a new draw, exactly as
    `simple` would make it with the same op and parameters. Only keys already in the mask are matched."""
    _check_draw(op, probability, std)
    out = mask.copy()
    for key in match_keys(patterns, mask.keys(), "the mask"):
        out.put(key, _draw(op, key, mask.shape(key), seed, probability, mean, std, threshold))
    return out
