"""Block weights (MBW): presets, the text form, and resolving a block list to a value per key.

A block list holds one value per block of the architecture, in the order of `arch.block_names(family)`:
26 for SD1/SD2 (BASE, IN00..IN11, M00, OUT00..OUT11), 20 for SDXL (BASE, IN00..IN08, M00, OUT00..OUT08).

Text form (what the UI's text box and the CLI's --blocks take):
- 26 (or 20) numbers separated by commas or spaces, in block order;
- `NAME=value` pairs, NAME a block or a pattern with `*` (`IN*=0.3, M00=1`); unlisted blocks keep the
  default (the method's scalar value, e.g. --alpha);
- a preset name, optionally followed by pairs that override it (`GRAD_V, BASE=0`).
"""
from __future__ import annotations

import fnmatch
import math
import re
from typing import Callable

from .arch import block_names, block_of
from .errors import InputError


def _unet_positions(family: str) -> list[float]:
    """Position of each UNet block along the U, from IN00 (0.0) to the last OUT block (1.0)."""
    n = len(block_names(family)) - 1
    return [i / (n - 1) for i in range(n)]


def _preset(fn: Callable[[str, str, float, int, int], float]):
    """Build a preset from fn(kind, block, position, index_in_kind, count_in_kind) for BASE and UNet blocks."""
    def make(family: str) -> list[float]:
        names = block_names(family)
        n_in = (len(names) - 2) // 2
        values = [fn("BASE", "BASE", 0.0, 0, 1)]
        pos = _unet_positions(family)
        for i, name in enumerate(names[1:]):
            kind = "IN" if name.startswith("IN") else "M" if name == "M00" else "OUT"
            idx = int(name[-2:]) if kind != "M" else 0
            values.append(fn(kind, name, pos[i], idx, n_in if kind != "M" else 1))
        return [round(v, 10) for v in values]
    return make


def _smooth(t: float) -> float:
    return t * t * (3 - 2 * t)


# name -> (description, builder(family) -> values). BASE is 0 (text encoder of A) unless stated.
PRESETS: dict[str, tuple[str, Callable[[str], list[float]]]] = {
    "ALL_A": ("every block from A (all 0)", _preset(lambda k, b, t, i, n: 0.0)),
    "ALL_B": ("every block from B (all 1)", _preset(lambda k, b, t, i, n: 1.0)),
    "FLAT_25": ("all blocks 0.25", _preset(lambda k, b, t, i, n: 0.25)),
    "FLAT_50": ("all blocks 0.5", _preset(lambda k, b, t, i, n: 0.5)),
    "FLAT_75": ("all blocks 0.75", _preset(lambda k, b, t, i, n: 0.75)),
    "GRAD_V": ("V shape: 1 at both ends of the UNet falling to 0 at the middle block",
               _preset(lambda k, b, t, i, n: 0.0 if k in ("BASE", "M") else (1 - i / n if k == "IN" else (i + 1) / n))),
    "GRAD_A": ("A shape: 0 at both ends of the UNet rising to 1 at the middle block",
               _preset(lambda k, b, t, i, n: 0.0 if k == "BASE" else 1.0 if k == "M" else (i / n if k == "IN" else 1 - (i + 1) / n))),
    "IN_ONLY": ("input blocks from B, the rest from A", _preset(lambda k, b, t, i, n: 1.0 if k == "IN" else 0.0)),
    "MID_ONLY": ("middle block from B, the rest from A", _preset(lambda k, b, t, i, n: 1.0 if k == "M" else 0.0)),
    "OUT_ONLY": ("output blocks from B, the rest from A", _preset(lambda k, b, t, i, n: 1.0 if k == "OUT" else 0.0)),
    "UNET_ONLY": ("whole UNet from B, text encoder from A", _preset(lambda k, b, t, i, n: 0.0 if k == "BASE" else 1.0)),
    "TE_ONLY": ("text encoder from B, UNet from A", _preset(lambda k, b, t, i, n: 1.0 if k == "BASE" else 0.0)),
    "SMOOTHSTEP": ("smoothstep ramp from 0 at IN00 to 1 at the last OUT block",
                   _preset(lambda k, b, t, i, n: 0.0 if k == "BASE" else _smooth(t))),
    "REVERSE_SMOOTHSTEP": ("smoothstep ramp from 1 at IN00 to 0 at the last OUT block",
                           _preset(lambda k, b, t, i, n: 0.0 if k == "BASE" else 1 - _smooth(t))),
    "SMOOTHSTEP_2": ("smoothstep up to 1 at the middle block and back down",
                     _preset(lambda k, b, t, i, n: 0.0 if k == "BASE" else _smooth(1 - abs(2 * t - 1)))),
    "REVERSE_SMOOTHSTEP_2": ("smoothstep down to 0 at the middle block and back up",
                             _preset(lambda k, b, t, i, n: 0.0 if k == "BASE" else 1 - _smooth(1 - abs(2 * t - 1)))),
    "COSINE": ("half cosine from 1 at IN00 to 0 at the last OUT block",
               _preset(lambda k, b, t, i, n: 0.0 if k == "BASE" else (1 + math.cos(math.pi * t)) / 2)),
}


def preset(name: str, family: str) -> list[float]:
    key = name.strip().upper()
    if key not in PRESETS:
        raise InputError(f"Unknown block-weight preset '{name}'. Presets: {', '.join(PRESETS)}.")
    return PRESETS[key][1](family)


_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def parse_blocks(text: str | list | None, family: str, default: float) -> list[float] | None:
    """Parse the text form (or a list of numbers) into one value per block; None for empty input."""
    names = block_names(family)
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        values = [float(v) for v in text]
        if len(values) != len(names):
            raise InputError(f"{_family_label(family)} takes {len(names)} block weights, got {len(values)}.")
        return values
    text = text.strip()
    if not text:
        return None
    tokens = [t for t in re.split(r"[,\s;]+", text) if t]
    if all(_NUM.match(t) for t in tokens):
        if len(tokens) != len(names):
            raise InputError(
                f"{_family_label(family)} takes {len(names)} block weights ({names[0]}, {names[1]}..{names[-1]}), "
                f"got {len(tokens)} numbers.")
        return [float(t) for t in tokens]
    values = [float(default)] * len(names)
    for i, tok in enumerate(tokens):
        if "=" not in tok:
            if i == 0:
                values = preset(tok, family)
                continue
            raise InputError(f"Block weights: '{tok}' is neither a number nor NAME=value (only the first item may be a preset).")
        name, _, val = tok.partition("=")
        if not _NUM.match(val.strip()):
            raise InputError(f"Block weights: '{val}' in '{tok}' is not a number.")
        pattern = name.strip().upper()
        hits = [j for j, b in enumerate(names) if fnmatch.fnmatchcase(b, pattern)]
        if not hits:
            raise InputError(f"Block weights: '{name}' matches no {_family_label(family)} block. "
                             f"Blocks: {', '.join(names)}.")
        for j in hits:
            values[j] = float(val)
    return values


def format_blocks(values: list[float], family: str) -> str:
    """The canonical text form: numbers in block order (what the sliders write into the text box)."""
    return ",".join(_fmt(v) for v in values)


def _fmt(v: float) -> str:
    s = f"{v:.4f}".rstrip("0").rstrip(".")
    return s if s not in ("-0", "") else "0"


def _family_label(family: str) -> str:
    return {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}.get(family, family)


def value_for_key(key: str, family: str, blocks: list[float] | None, default: float) -> float:
    """Per-key value of a block-weighted parameter: the key's block value, or `default` outside blocks."""
    if blocks is None:
        return default
    block = block_of(key, family)
    if block is None:
        return default
    return blocks[block_names(family).index(block)]
