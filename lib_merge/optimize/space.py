"""The search space: which per-block values and scalar parameters a run searches, and the candidate recipe
of a trial's parameters.

A trial's parameters are named `PARAM.BLOCK` (`alpha.IN04`), `PARAM.GROUP` for blocks tied into one value
(`alpha.IN_LOW`), and `PARAM` for a scalar method parameter (`density`). Whatever is not searched keeps the
starting recipe's value, so a candidate differs from the start only where the optimiser moved it.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Any

from ..core.arch import block_names
from ..core.errors import InputError
from ..engine.recipe import Recipe
from ..methods.spec import get_method
from .optimizers import Dimension

SPACE_FIELDS = ("groups", "bounds", "params")


@dataclass
class Searched:
    """One dimension and where its value goes: the blocks of a per-block parameter, or a scalar parameter."""
    dim: Dimension
    param: str
    blocks: tuple[str, ...] = ()   # empty for a scalar parameter


class SearchSpace:
    def __init__(self, spec: Any, start: Recipe, family: str):
        if not isinstance(spec, dict) or not spec:
            raise InputError("space: give what to search, e.g. {\"alpha\": \"all\"} or {\"alpha\": [\"IN04\", \"M00\"]}.")
        self.start, self.family = start, family
        self.method = get_method(start.method)
        self.names = block_names(family)
        groups = self._groups(spec.get("groups") or {})
        bounds = spec.get("bounds") or {}
        if not isinstance(bounds, dict):
            raise InputError("space.bounds must map a block, group or dimension name to [low, high].")
        self.searched: list[Searched] = []
        for param, blocks in spec.items():
            if param in SPACE_FIELDS:
                continue
            p = self._blockwise(param)
            for label, members in self._block_dims(param, blocks, groups):
                self._add(Searched(self._dimension(f"{param}.{label}", label, bounds, p.range), param, members))
        scalars = spec.get("params") or {}
        if not isinstance(scalars, dict):
            raise InputError("space.params must map a method parameter to [low, high], e.g. {\"density\": [0.1, 0.9]}.")
        for param, rng in scalars.items():
            p = self.method.param(param)
            if p.kind not in (float, int):
                raise InputError(f"space.params: {start.method}'s parameter '{param}' is not a number and cannot be searched.")
            self._add(Searched(self._dimension(param, param, {param: rng}, p.range), param))
        if not self.searched:
            raise InputError("space: nothing to search (every list is empty).")
        unknown = set(bounds) - {s.dim.name for s in self.searched} - {b for s in self.searched for b in s.blocks} \
            - set(groups)
        if unknown:
            raise InputError(f"space.bounds: {', '.join(sorted(unknown))} is not searched "
                             f"(searched: {', '.join(self.dimension_names)}).")

    # ------------------------------------------------------------------ building
    def _groups(self, groups: Any) -> dict[str, tuple[str, ...]]:
        if not isinstance(groups, dict):
            raise InputError("space.groups must map a group name to a list of blocks, e.g. {\"IN_LOW\": [\"IN00\", \"IN01\"]}.")
        out, owner = {}, {}
        for name, blocks in groups.items():
            if name.upper() in self.names:
                raise InputError(f"space.groups: '{name}' is a block's name; give the group another name.")
            members = self._expand(blocks, f"space.groups.{name}")
            for b in members:
                if b in owner:
                    raise InputError(f"space.groups: block {b} is in both '{owner[b]}' and '{name}'.")
                owner[b] = name
            out[name] = members
        return out

    def _expand(self, blocks: Any, where: str) -> tuple[str, ...]:
        """Block names (with `*` wildcards) or "all" -> the blocks, in block order; unknown names refused."""
        if blocks == "all":
            return tuple(self.names)
        if isinstance(blocks, str):
            blocks = [b for b in blocks.replace(";", ",").split(",") if b.strip()]
        if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
            raise InputError(f"{where} must be \"all\" or a list of block names ({self.names[1]}, M00...).")
        hits: set[str] = set()
        for b in blocks:
            matched = [n for n in self.names if fnmatch.fnmatchcase(n, b.strip().upper())]
            if not matched:
                raise InputError(f"{where}: '{b}' is not a block of this {self.family} model. "
                                 f"Blocks: {', '.join(self.names)}.")
            hits.update(matched)
        return tuple(n for n in self.names if n in hits)

    def _blockwise(self, param: str):
        if param not in self.method.blockwise_params:
            raise InputError(f"space: '{param}' is not a per-block parameter of {self.method.name} "
                             f"(per-block: {', '.join(self.method.blockwise_params) or 'none'}; scalar parameters "
                             f"go in space.params).")
        return self.method.param(param)

    def _block_dims(self, param: str, blocks: Any, groups: dict) -> list[tuple[str, tuple[str, ...]]]:
        """(label, blocks) per dimension: a group named in the list (or holding a listed block) is one dimension."""
        items = blocks if isinstance(blocks, list) else None
        named_groups = [g for g in (items or []) if isinstance(g, str) and g in groups]
        rest = [b for b in (items or []) if b not in named_groups] if items is not None else blocks
        chosen = self._expand(rest, f"space.{param}") if rest or items is None else ()
        dims, used = [], set()
        for g in named_groups:
            dims.append((g, groups[g]))
            used.update(groups[g])
        for b in chosen:
            if b in used:
                continue
            group = next((g for g, members in groups.items() if b in members), None)
            if group is not None:
                dims.append((group, groups[group]))
                used.update(groups[group])
            else:
                dims.append((b, (b,)))
                used.add(b)
        return dims

    def _dimension(self, name: str, label: str, bounds: dict, allowed) -> Dimension:
        raw = bounds.get(name, bounds.get(label, [0.0, 1.0]))
        if (not isinstance(raw, (list, tuple)) or len(raw) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)):
            raise InputError(f"space: the bounds of {name} must be [low, high] numbers, not {raw!r}.")
        low, high = float(raw[0]), float(raw[1])
        if not low < high:
            raise InputError(f"space: the bounds of {name} are [{low}, {high}]: low must be below high.")
        if allowed is not None and (low < allowed[0] or high > allowed[1]):
            raise InputError(f"space: the bounds of {name} [{low}, {high}] leave the parameter's range "
                             f"[{allowed[0]}, {allowed[1]}].")
        return Dimension(name, low, high)

    def _add(self, s: Searched) -> None:
        if s.dim.name in self.dimension_names:
            raise InputError(f"space: {s.dim.name} is searched twice.")
        self.searched.append(s)

    # ------------------------------------------------------------------ using
    @property
    def dims(self) -> list[Dimension]:
        return [s.dim for s in self.searched]

    @property
    def dimension_names(self) -> list[str]:
        return [s.dim.name for s in self.searched]

    def start_point(self) -> dict[str, float]:
        """The starting recipe's values of the searched dimensions (clipped into their bounds)."""
        point = {}
        for s in self.searched:
            if s.blocks:
                values = self._block_values(self.start, s.param)
                v = sum(values[self.names.index(b)] for b in s.blocks) / len(s.blocks)
            else:
                v = float(self.start.params[s.param])
            point[s.dim.name] = min(s.dim.high, max(s.dim.low, v))
        return point

    def _block_values(self, recipe: Recipe, param: str) -> list[float]:
        if param in recipe.blocks:
            return [float(v) for v in recipe.blocks[param]]
        return [float(recipe.params[param])] * len(self.names)

    def recipe_for(self, params: dict[str, float]) -> Recipe:
        """The starting recipe with the searched values put in."""
        missing = [n for n in self.dimension_names if n not in params]
        if missing:
            raise InputError(f"Trial parameters lack {', '.join(missing)}.")
        recipe = copy.deepcopy(self.start)
        for s in self.searched:
            value = float(params[s.dim.name])
            if s.blocks:
                values = recipe.blocks.get(s.param) or self._block_values(recipe, s.param)
                for b in s.blocks:
                    values[self.names.index(b)] = value
                recipe.blocks[s.param] = values
            else:
                kind = self.method.param(s.param).kind
                recipe.params[s.param] = int(round(value)) if kind is int else value
        recipe.validate()
        return recipe

    def block_values(self, params: dict[str, float]) -> dict[str, list[float]]:
        """{param: one value per block} of a trial, for the blocks plot."""
        recipe = self.recipe_for(params)
        return {p: self._block_values(recipe, p) for p in dict.fromkeys(s.param for s in self.searched if s.blocks)}

    def describe(self) -> list[dict]:
        return [{"name": s.dim.name, "low": s.dim.low, "high": s.dim.high, "param": s.param,
                 "blocks": list(s.blocks)} for s in self.searched]
