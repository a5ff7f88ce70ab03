"""Block weights (MBW): presets, the text form, and resolving a block list to a value per key.

A block list holds one value per block of the architecture, in the order of `arch.block_names(family)`:
26 for SD1/SD2 (BASE, IN00..IN11, M00, OUT00..OUT11), 20 for SDXL (BASE, IN00..IN08, M00, OUT00..OUT08).

Text form (what the UI's text box and the CLI's --blocks take):
- 26 (or 20) numbers separated by commas or spaces, in block order;
- `NAME=value` pairs, NAME a block or a pattern with `*` (`IN*=0.3, M00=1`); unlisted blocks keep the
  default (the method's scalar value, e.g. --alpha);
- a preset name, optionally followed by pairs that override it (`GRAD_V, BASE=0`).

Also here: the layer-pattern language shared by masks, weight sets and noise (`match_keys`), and layer
weights (`WeightSet`, "layer gradients"): one value per key, built from blocks, UNet groups, attention
parts or onion shells, edited by pattern and combined. See docs/MASKS_AND_WEIGHTS.md.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .arch import TEXT_ENCODER, UNET, UNET_PREFIX, block_names, block_of, component_of
from .errors import InputError, OutputError
from .files import write_file_atomic


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
        values = []
        for v in text:
            try:
                values.append(float(v))
            except (TypeError, ValueError, OverflowError):
                raise InputError(f"Block weights must be numbers; {v!r} is not one.") from None
        if len(values) != len(names):
            raise InputError(f"{_family_label(family)} takes {len(names)} block weights, got {len(values)}.")
        return _finite_blocks(values, names)
    text = text.strip()
    if not text:
        return None
    tokens = [t for t in re.split(r"[,\s;]+", text) if t]
    if all(_NUM.match(t) for t in tokens):
        if len(tokens) != len(names):
            raise InputError(
                f"{_family_label(family)} takes {len(names)} block weights ({names[0]}, {names[1]}..{names[-1]}), "
                f"got {len(tokens)} numbers.")
        return _finite_blocks([float(t) for t in tokens], names)
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
    return _finite_blocks(values, names)


def _finite_blocks(values: list[float], names: list[str]) -> list[float]:
    bad = [n for n, v in zip(names, values) if not math.isfinite(v)]
    if bad:
        raise InputError(f"Block weights must be finite numbers; {bad[0]} is {values[names.index(bad[0])]}.")
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


# =============================================================================== layer patterns
# One pattern language for masks, weight sets and noise: comma/newline separated, `*` is a wildcard
# (any run of characters, dots included), everything else is literal. A pattern matches a key when it
# matches from the key's start up to the end or up to a '.', so `input_blocks.1` catches
# `input_blocks.1.0.weight` but not `input_blocks.10.0.weight`. Keys are tried whole and without their
# `model.` / `model.diffusion_model.` prefix, so UNet patterns can be written the short way.


def parse_patterns(text: str | Iterable[str] | None) -> list[str]:
    """Split the pattern text on commas and newlines; whitespace inside a pattern is dropped."""
    items = re.split(r"[,\n]+", text or "") if isinstance(text, str) or text is None else list(text)
    patterns = ["".join(p.split()) for p in items]
    patterns = [p for p in patterns if p]
    if not patterns:
        raise InputError("Give at least one layer pattern, e.g. 'input_blocks.1' or '*.to_v*'.")
    return patterns


def _pattern_regex(pattern: str) -> re.Pattern:
    body = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.compile(body + r"(\.|$)")


def _key_forms(key: str) -> tuple[str, ...]:
    forms = [key]
    if key.startswith("model."):
        forms.append(key[len("model."):])
    if key.startswith(UNET_PREFIX):
        forms.append(key[len(UNET_PREFIX):])
    return tuple(forms)


def match_keys(patterns: str | Iterable[str], keys: Iterable[str], what: str = "the model") -> list[str]:
    """The keys (in their own order) matched by any of the patterns.

    A pattern that matches no key is an InputError naming it: a typo must not silently do nothing.
    """
    pats = parse_patterns(patterns)
    regexes = [_pattern_regex(p) for p in pats]
    hit = [False] * len(pats)
    out = []
    for key in keys:
        forms = _key_forms(key)
        matched = False
        for i, rx in enumerate(regexes):
            if any(rx.match(f) for f in forms):
                hit[i] = matched = True
        if matched:
            out.append(key)
    missing = [p for p, h in zip(pats, hit) if not h]
    if missing:
        raise InputError(
            f"Layer pattern{'s' if len(missing) > 1 else ''} {', '.join(repr(p) for p in missing)} "
            f"match{'' if len(missing) > 1 else 'es'} no key of {what}. Patterns match a key from its start "
            f"up to a '.', with or without 'model.diffusion_model.'; use * as a wildcard (e.g. '*.attn2.*').")
    return out


# =============================================================================== shared helpers

def mergeable_shapes(source) -> dict[str, tuple[int, ...]]:
    """{key: shape} of what masks and weight sets cover: float tensors of the UNet and text encoders.

    `source` is a ModelFile, a state dict of tensors, or a {key: shape} dict (whose dtypes are unknown,
    so only the component and `position_ids` rules apply).
    """
    if hasattr(source, "tensors"):
        items = [(k, tuple(i.shape), i.is_float) for k, i in source.tensors.items()]
    else:
        items = [(k, tuple(v.shape), v.is_floating_point()) if isinstance(v, torch.Tensor) else (k, tuple(v), True)
                 for k, v in source.items()]
    return {k: s for k, s, is_float in items
            if is_float and component_of(k) in (UNET, TEXT_ENCODER) and not k.endswith("position_ids")}


# =============================================================================== layer weights
# A weight set ("layer gradient") gives one float per checkpoint key: the per-key value of a
# block-weighted parameter (α, λ...). It means what that parameter means (for α: the weight of model B).
# The set also names what is merged: the engine copies keys that are not in it from model A.

WEIGHTS_FORMAT = "merge-lab-weights"
GROUPS = ("time", "label", "input", "middle", "output", "out")
# the same groups as the CLI's flags and the key prefixes spell them (--input-blocks, middle_block...): one group,
# whichever spelling a user brings
GROUP_ALIASES = {f"{prefix}{sep}{suffix}": group for group, prefix, suffix in (
    ("time", "time", "embed"), ("label", "label", "emb"), ("input", "input", "blocks"), ("middle", "middle", "block"),
    ("output", "output", "blocks"), ("out", "out", "block")) for sep in ("_", "-")}
ATTENTION_PARTS = ("norm", "attn", "ff")
SHELL_PARTS = ("exterior", "interior", "core")
WEIGHT_EDIT_OPS = ("set", "add", "subtract", "multiply", "divide")
WEIGHT_COMBINE_OPS = ("mean", "min", "max", "add", "subtract", "multiply", "divide")


def _finite_number(v) -> bool:
    """A JSON number that is finite as a float (an integer too large for a float is not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


class WeightSet(dict):
    """{key: float} plus the architecture family it was built for (None when unknown)."""

    def __init__(self, values: Mapping[str, float] | Iterable = (), arch: str | None = None):
        super().__init__(values)
        self.arch = arch

    def copy(self) -> "WeightSet":
        return WeightSet(self, self.arch)

    def to_json(self) -> str:
        return json.dumps({"format": WEIGHTS_FORMAT, "version": 1, "arch": self.arch,
                           "weights": {k: float(v) for k, v in self.items()}}, indent=1)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.suffix.lower() != ".json":
            raise OutputError(f"A weight set is saved as .json, not '{path.name}'.")
        bad = [k for k, v in self.items() if not math.isfinite(v)]
        if bad:
            raise InputError(f"The weight set has non-finite values (e.g. '{bad[0]}'); fix them before saving.")
        return write_file_atomic(path, self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WeightSet":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"Weight set file not found: '{path}'.") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise InputError(f"'{path.name}' is not a weight set: it is not readable JSON ({e}).") from None
        except RecursionError:
            raise InputError(f"'{path.name}' is not a weight set: its JSON is nested too deeply.") from None
        if not isinstance(data, dict) or data.get("format") != WEIGHTS_FORMAT:
            raise InputError(f"'{path.name}' is not a Merge Lab weight set (no \"format\": \"{WEIGHTS_FORMAT}\"). "
                             f"Make one with `weights blocks|groups|attention|shell`.")
        if data.get("version") != 1:
            raise InputError(f"'{path.name}' is a weight set of version {data.get('version')!r}; "
                             f"this Merge Lab reads version 1. Update Merge Lab.")
        weights = data.get("weights")
        if not isinstance(weights, dict):
            raise InputError(f"'{path.name}': \"weights\" must be an object of key: number.")
        for k, v in weights.items():
            if not _finite_number(v):
                raise InputError(f"'{path.name}': the weight of '{k}' is {v!r}, not a finite number.")
        arch = data.get("arch")
        return cls({k: float(v) for k, v in weights.items()}, arch if isinstance(arch, str) else None)


def _unet_or_base(shapes, base: float | None):
    """(key, UNet-relative name or None for a text-encoder key) for the keys a builder considers."""
    for key in mergeable_shapes(shapes):
        if key.startswith(UNET_PREFIX):
            yield key, key[len(UNET_PREFIX):]
        elif base is not None:  # text encoders: only when the caller gives them a value
            yield key, None


def _check_parts(values: Mapping[str, float | None], names: tuple[str, ...], what: str) -> None:
    unknown = [n for n in values if n not in names]
    if unknown:
        raise InputError(f"Unknown {what} part {', '.join(map(repr, unknown))}; the parts are {', '.join(names)}.")


def _build(shapes, family: str, base: float | None, part_of: Callable[[str], str | None],
           values: Mapping[str, float | None]) -> WeightSet:
    ws = WeightSet(arch=family)
    for key, rest in _unet_or_base(shapes, base):
        if rest is None:
            ws[key] = float(base)
            continue
        part = part_of(rest)
        if part is not None and values.get(part) is not None:
            ws[key] = float(values[part])
    return ws


def from_blocks(shapes, family: str, blocks: str | list[float], default: float = 0.0) -> WeightSet:
    """One value per MBW block (26 SD1/SD2, 20 SDXL; text form or list): each key gets its block's value.

    Text-encoder keys get BASE; the VAE and other keys are left out.
    """
    values = parse_blocks(blocks, family, default)
    if values is None:
        raise InputError("Give the block weights (26 numbers for SD1/SD2, 20 for SDXL, NAME=value pairs or a preset).")
    names = block_names(family)
    ws = WeightSet(arch=family)
    for key in mergeable_shapes(shapes):
        block = block_of(key, family)
        if block is not None:
            ws[key] = values[names.index(block)]
    return ws


def _group_of(rest: str) -> str | None:
    for prefix, group in (("time_embed.", "time"), ("label_emb.", "label"), ("input_blocks.", "input"),
                          ("middle_block.", "middle"), ("output_blocks.", "output"), ("out.", "out")):
        if rest.startswith(prefix):
            return group
    return None


def from_groups(shapes, family: str, values: Mapping[str, float | None], base: float | None = None) -> WeightSet:
    """One value per UNet group: time (time_embed.), label (label_emb., SDXL), input (input_blocks.),
    middle (middle_block.), output (output_blocks.), out (out.). A group not given (or None) is left out;
    text-encoder keys get `base` when it is given, else are left out."""
    values = {GROUP_ALIASES.get(str(k).lower(), str(k).lower()): v for k, v in values.items()}
    _check_parts(values, GROUPS, "group")
    return _build(shapes, family, base, _group_of, values)


def _attention_part_of(rest: str) -> str | None:
    # DareMerge's order: a name holding both 'norm' and 'attn' counts as norm
    if "norm" in rest:
        return "norm"
    if "attn" in rest:
        return "attn"
    if "ff.net" in rest:
        return "ff"
    return None


def from_attention(shapes, family: str, values: Mapping[str, float | None], base: float | None = None) -> WeightSet:
    """UNet keys by substring of the name after `model.diffusion_model.`, tested in this order:
    'norm' -> norm, else 'attn' -> attn, else 'ff.net' -> ff. Other UNet keys and parts not given are
    left out; text-encoder keys get `base` when it is given."""
    _check_parts(values, ATTENTION_PARTS, "attention")
    return _build(shapes, family, base, _attention_part_of, values)


# (last input block of exterior, of interior; first output block of interior, of exterior)
_SHELL_SPLITS = {"sd1": (3, 8, 4, 9), "sd2": (3, 8, 4, 9), "sdxl": (2, 5, 3, 6)}


def shell_part(block: str, family: str) -> str:
    """exterior / interior / core of an MBW block name (IN.., M00, OUT..), the onion of DareMerge."""
    in_ext, in_int, out_int, out_ext = _SHELL_SPLITS[family]
    if block == "M00":
        return "core"
    n = int(block[-2:])
    if block.startswith("IN"):
        return "exterior" if n <= in_ext else "interior" if n <= in_int else "core"
    return "core" if n < out_int else "interior" if n < out_ext else "exterior"


def from_shell(shapes, family: str, values: Mapping[str, float | None], base: float | None = None) -> WeightSet:
    """Onion layers of the UNet by block (time_embed/label_emb count as IN00, out. as the last OUT block).
    SD1/SD2: exterior IN00-03 + OUT09-11, interior IN04-08 + OUT04-08, core IN09-11 + M00 + OUT00-03.
    SDXL: exterior IN00-02 + OUT06-08, interior IN03-05 + OUT03-05, core IN06-08 + M00 + OUT00-02."""
    _check_parts(values, SHELL_PARTS, "shell")
    if family not in _SHELL_SPLITS:
        raise InputError(f"Unknown architecture family '{family}' (sd1, sd2 or sdxl).")

    def part_of(rest: str) -> str | None:
        block = block_of(UNET_PREFIX + rest, family)
        return shell_part(block, family) if block else None

    return _build(shapes, family, base, part_of, values)


def _apply(op: str, x: float, y: float, where: str) -> float:
    if op == "set":
        return y
    if op == "add":
        return x + y
    if op == "subtract":
        return x - y
    if op == "multiply":
        return x * y
    if op == "divide":
        if y == 0:
            raise InputError(f"Division by zero at '{where}'. Divide by a non-zero value.")
        return x / y
    if op == "mean":
        return (x + y) / 2
    if op == "min":
        return min(x, y)
    if op == "max":
        return max(x, y)
    raise InputError(f"Unknown operation '{op}'.")


def edit(ws: WeightSet, patterns: str, op: str, value: float) -> WeightSet:
    """A copy of `ws` where every key matched by the patterns becomes `old op value`
    (set / add / subtract / multiply / divide). Only keys already in the set are matched."""
    if op not in WEIGHT_EDIT_OPS:
        raise InputError(f"Unknown weight edit '{op}'; use one of {', '.join(WEIGHT_EDIT_OPS)}.")
    out = ws.copy()
    for key in match_keys(patterns, ws.keys(), "the weight set"):
        out[key] = _apply(op, ws[key], float(value), key)
    return out


def combine(a: WeightSet, b: WeightSet, op: str, join: str = "inner") -> WeightSet:
    """Key by key `a op b`. join 'inner': only keys in both; 'outer': every key, a lone value copied.
    Key order: a's keys, then b's keys that a lacks. Division by zero is an error naming the key."""
    if op not in WEIGHT_COMBINE_OPS:
        raise InputError(f"Unknown weight operation '{op}'; use one of {', '.join(WEIGHT_COMBINE_OPS)}.")
    if join not in ("inner", "outer"):
        raise InputError(f"Unknown join '{join}'; use inner or outer.")
    if a.arch and b.arch and a.arch != b.arch:
        raise InputError(f"Cannot combine a {a.arch} weight set with a {b.arch} one: their keys differ.")
    out = WeightSet(arch=a.arch or b.arch)
    for key in list(a) + [k for k in b if k not in a]:
        if key in a and key in b:
            out[key] = _apply(op, a[key], b[key], key)
        elif join == "outer":
            out[key] = a[key] if key in a else b[key]
    return out
