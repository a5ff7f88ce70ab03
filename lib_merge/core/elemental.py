"""SuperMerger's two final touches on a merge, in its syntax: elemental ratios and Adjust.

Elemental: `BLOCKS:ELEMENTS:RATIO` entries, separated by commas or new lines. BLOCKS are block names (BASE,
IN00..OUT11; SDXL IN00..IN08, M00, OUT00..OUT08) separated by spaces, empty for every block; ELEMENTS are parts of
key names (a substring match: `attn` catches attn1 and attn2, `attn2.to_k` only that), separated by spaces, empty
for the whole block. Either list may start with NOT to mean everything else. A later entry wins over an earlier one.
The ratio replaces, for the keys it matches, the value the block weights gave the method's first per-block
parameter (α, λ, ratio...): elemental merging comes last.

Adjust: eight numbers, SuperMerger's IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3 (default all 0). They change six
small tensors at the U-Net's input and output after the merge (factors as SuperMerger applies them):
  input_blocks.0.0.weight × (1 − 0.01·IN)      input_blocks.0.0.bias × (1 + 0.02·IN)
  out.0.weight × (1 − 0.01·OUT)                 out.0.bias × (1 + 0.02·OUT)
  out.2.weight × (1 − 0.01·OUT2)
  out.2.bias + [0.02·CONT, c1, c2, c3], c = 0.02·(BRI·r0 + COL1·r1 + COL2·r2 + COL3·r3) over the rows
      SD1/SD2: r0 = (−1, 1/3, 2/3), r1 = (1, 1, 0), r2 = (0, −1, −1), r3 = (1, 0, 1)
      SDXL:    r0 = (0, 0, 1),      r1 = (1, 0, 0), r2 = (−1, −1, 0), r3 = (−1, 1, 0)
(the four channels of out.2.bias are the latent's: contrast on the first, colour on the others). Positive IN/OUT
values add detail (and noise); about ±5 is the useful range.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .arch import UNET_PREFIX, block_names, block_of
from .errors import InputError

ADJUST_NAMES = ("IN", "OUT", "OUT2", "CONT", "BRI", "COL1", "COL2", "COL3")
_COLOURS = {"sd": ((-1, 1 / 3, 2 / 3), (1, 1, 0), (0, -1, -1), (1, 0, 1)),
            "sdxl": ((0, 0, 1), (1, 0, 0), (-1, -1, 0), (-1, 1, 0))}


@dataclass(frozen=True)
class Rule:
    blocks: frozenset[str]      # empty: every block
    not_blocks: bool
    elements: tuple[str, ...]   # empty: every key of the blocks
    not_elements: bool
    ratio: float
    text: str

    def matches(self, key: str, block: str | None) -> bool:
        if block is None:
            return False
        if self.blocks and ((block in self.blocks) == self.not_blocks):
            return False
        if not self.elements:
            return True
        rest = key[len(UNET_PREFIX):] if key.startswith(UNET_PREFIX) else key
        return any(e in rest for e in self.elements) != self.not_elements


def _words(text: str) -> tuple[bool, list[str]]:
    words = text.split()
    negate = bool(words) and words[0].upper() == "NOT"
    return negate, words[1:] if negate else words


def parse_elemental(text: str, family: str) -> list[Rule]:
    """The rules of an elemental text, with a sentence for what is wrong in it."""
    names = set(block_names(family))
    rules = []
    for entry in [e.strip() for e in re.split(r"[,\n]", text or "") if e.strip()]:
        parts = entry.split(":")
        if len(parts) != 3:
            raise InputError(f"Elemental entry '{entry}' is not BLOCKS:ELEMENTS:RATIO (e.g. OUT04 OUT05:attn2:0.5).")
        try:
            ratio = float(parts[2])
        except ValueError:
            raise InputError(f"Elemental entry '{entry}': the ratio '{parts[2].strip()}' is not a number.") from None
        if not math.isfinite(ratio):
            raise InputError(f"Elemental entry '{entry}': the ratio must be a finite number.")
        not_blocks, blocks = _words(parts[0])
        blocks = [b.upper() for b in blocks]
        unknown = [b for b in blocks if b not in names]
        if unknown:
            raise InputError(f"Elemental entry '{entry}': {', '.join(unknown)} is not a block of this model "
                             f"({', '.join(block_names(family))}).")
        not_elements, elements = _words(parts[1])
        rules.append(Rule(frozenset(blocks), not_blocks, tuple(elements), not_elements, ratio, entry))
    return rules


def matching_rule(key: str, family: str, rules: list[Rule]) -> Rule | None:
    """The rule that sets `key` (the last one matching it: a later entry wins), or None."""
    block = block_of(key, family)
    return next((rule for rule in reversed(rules) if rule.matches(key, block)), None)


def check_adjust(values) -> list[float] | None:
    """Eight finite numbers (fewer are padded with 0, SuperMerger's way), or None when all are 0."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [v for v in re.split(r"[,\s]+", values.strip()) if v]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError, OverflowError):   # OverflowError: an integer too large for a float
        raise InputError(f"Adjust takes up to 8 numbers ({', '.join(ADJUST_NAMES)}), not {values!r}.") from None
    if len(out) > len(ADJUST_NAMES) or not all(math.isfinite(v) for v in out):
        raise InputError(f"Adjust takes up to 8 finite numbers ({', '.join(ADJUST_NAMES)}); got {len(out)}.")
    out += [0.0] * (len(ADJUST_NAMES) - len(out))
    return out if any(out) else None


def adjust_ops(values: list[float] | None, family: str) -> dict[str, tuple[str, object]]:
    """{key: ("scale", factor) | ("shift", [4 numbers])} for the six keys Adjust changes."""
    if not values:
        return {}
    v = check_adjust(values)
    if v is None:
        return {}
    rows = _COLOURS["sdxl" if family == "sdxl" else "sd"]
    colour = [0.02 * sum(v[4 + i] * rows[i][c] for i in range(4)) for c in range(3)]
    u = UNET_PREFIX
    return {f"{u}input_blocks.0.0.weight": ("scale", 1 - 0.01 * v[0]),
            f"{u}input_blocks.0.0.bias": ("scale", 1 + 0.02 * v[0]),
            f"{u}out.0.weight": ("scale", 1 - 0.01 * v[1]),
            f"{u}out.0.bias": ("scale", 1 + 0.02 * v[1]),
            f"{u}out.2.weight": ("scale", 1 - 0.01 * v[2]),
            f"{u}out.2.bias": ("shift", [0.02 * v[3]] + colour)}
