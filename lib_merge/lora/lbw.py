"""LoRA block weights (LBW): one strength per block of the model, in the layouts LBW users know.

Layouts (slot names), as in hako-mikan's sd-webui-lora-block-weight:

* SD1/SD2, 17 values: BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11 (attention LoRAs);
* SD1/SD2, 26 values: BASE, IN00..IN11, M00, OUT00..OUT11 (LoCon);
* SDXL, 12 values: BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05;
* SDXL, 20 values: BASE, IN00..IN08, M00, OUT00..OUT08.

A short layout is spread over the full one (26 / 20 slots) and the slots it does not list get **0**, as
the LBW extension does (kohya's svd_merge_lora.py uses 1 instead; we follow the extension, which is what
people write these strings for). BASE is the text encoder(s).

Presets (17-value, SD1/SD2, the extension's defaults): NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL,
ALL0.5. For SDXL we define ALL, NONE, ALL0.5, INALL (BASE and every IN block) and OUTALL (BASE and every OUT
block); the other names are SD1/SD2 layouts and are refused for SDXL.

The LBW extension's special values are accepted in a list: `R` (random in [0, 1), 3 decimals), `U` (random in
[-0.5, 1.5), 3 decimals) and `X`, `X+v`, `X-v` (X is 1, the extension's value when the prompt gives none). Our
random values are drawn from a fixed seed (0, or `seed=`), so the same text gives the same weights every time
(the extension draws new ones per image). Its per-element form (`lbwe`, BLOCKS:ELEMENTS:RATIO on LoRA modules) is
not supported here: it is refused with a sentence (the checkpoint merge's elemental ratios do the same on a
baked checkpoint).

A module's block: kohya name -> checkpoint key (keys.module_map) -> arch.block_of.
"""
from __future__ import annotations

import random
import re

from ..core.arch import block_names, block_of
from ..core.errors import InputError
from . import keys as K

LAYOUTS: dict[str, dict[int, list[str]]] = {
    "sd1": {
        17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)],
        26: block_names("sd1"),
    },
    "sdxl": {
        12: ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)],
        20: block_names("sdxl"),
    },
}
LAYOUTS["sd2"] = LAYOUTS["sd1"]


def _v(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


PRESETS: dict[str, dict[str, list[float]]] = {
    "sd1": {
        "NONE": [0.0] * 17,
        "ALL": [1.0] * 17,
        "INS": _v("1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
        "IND": _v("1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
        "INALL": _v("1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
        "MIDD": _v("1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
        "OUTD": _v("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
        "OUTS": _v("1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
        "OUTALL": _v("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
        "ALL0.5": [0.5] * 17,
    },
    "sdxl": {
        "NONE": [0.0] * 20,
        "ALL": [1.0] * 20,
        "INALL": [1.0] * 10 + [0.0] * 10,
        "OUTALL": [1.0] + [0.0] * 10 + [1.0] * 9,
        "ALL0.5": [0.5] * 20,
    },
}
PRESETS["sd2"] = PRESETS["sd1"]


def expand(values: list[float], family: str) -> dict[str, float]:
    """Values in one of the family's layouts -> {block: weight} over all its blocks (unlisted = 0)."""
    layouts = LAYOUTS.get(family)
    if layouts is None:
        raise InputError(f"No block-weight layouts for '{family}'.")
    names = layouts.get(len(values))
    if names is None:
        counts = " or ".join(str(n) for n in layouts)
        raise InputError(f"{len(values)} block weights do not fit an {family.upper()} LoRA: give {counts} values "
                         f"({'; '.join(f'{n}: ' + ', '.join(layouts[n][:3]) + '...' for n in layouts)}), "
                         f"or a preset: {', '.join(PRESETS[family])}.")
    full = {b: 0.0 for b in block_names(family)}
    full.update(zip(names, values))
    return full


_X = re.compile(r"^X(?:([+-])(\d+(?:\.\d*)?|\.\d+))?$")


def _value(item: str, draw: random.Random, x: float) -> float:
    """One value of an LBW list: a number, R, U, X, X+v or X-v."""
    word = item.strip().upper()
    if word == "R":
        return round(draw.random(), 3)
    if word == "U":
        return round(draw.uniform(-0.5, 1.5), 3)
    m = _X.match(word)
    if m:
        return x + (float(m.group(2)) * (1 if m.group(1) == "+" else -1) if m.group(1) else 0.0)
    return float(item)


def parse_lbw(spec, family: str, seed: int = 0, x: float = 1.0) -> dict[str, float]:
    """A preset name, "1,0,0.5,R,X-0.2..." text, a list of numbers or a {block: weight} dict -> {block: weight}."""
    if isinstance(spec, dict):
        full = {b: 0.0 for b in block_names(family)}
        bad = [b for b in spec if b not in full]
        if bad:
            raise InputError(f"Unknown block(s) {', '.join(bad)} for {family.upper()}: use {', '.join(full)}.")
        full.update({b: float(w) for b, w in spec.items()})
        return full
    if isinstance(spec, (list, tuple)):
        return expand([float(x) for x in spec], family)
    text = str(spec).strip()
    preset = PRESETS[family].get(text.upper()) if family in PRESETS else None
    if preset is not None:
        return expand(list(preset), family)
    if text.lower().startswith("lbwe") or (":" in text and not text.lower().startswith("lbw=")):
        raise InputError(f"'{text}': per-element LoRA block weights (the LBW extension's lbwe, BLOCKS:ELEMENTS:RATIO) "
                         f"are not supported; give one value per block, or bake the LoRA and use the checkpoint "
                         f"merge's elemental ratios.")
    text = text[4:] if text.lower().startswith("lbw=") else text
    draw = random.Random(seed)
    try:
        values = [_value(item, draw, x) for item in text.replace(" ", "").split(",") if item != ""]
    except ValueError:
        raise InputError(f"'{text}' is neither a block-weight preset ({', '.join(PRESETS.get(family, {}))}) "
                         f"nor a list of values like 1,0,0.5,R,U,X-0.2 (numbers, or the LBW extension's R, U "
                         f"and X[+-v]).") from None
    return expand(values, family)


def module_block(name: str, family: str) -> str | None:
    """The block (BASE, IN04, M00, OUT11...) of a kohya module name, None when it has no checkpoint key."""
    target = K.resolve(name, family)
    return None if target is None else block_of(target.key, family)


def module_weight(name: str, family: str, weights: dict[str, float] | None) -> float:
    """The block weight of a module (1 without block weights)."""
    if weights is None:
        return 1.0
    block = module_block(name, family)
    return 1.0 if block is None else weights.get(block, 0.0)
