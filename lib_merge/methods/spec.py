"""Merge methods: pure tensor functions, each registered once with a typed parameter spec.

A method is `fn(inputs, *, rng, **params) -> Tensor`: `inputs` are the tensors of one key (or one row
chunk of it) in the method's input order, already on the compute device in the compute dtype; params are
scalars resolved for that key by the engine (block weights included). No I/O, no globals.
The inputs are the engine's scratch copies: a method may overwrite them (and return one of them), which
spares an allocation per chunk on the hot path.

The spec (`Param`) is the one place a parameter is described: the UI's widgets, the CLI's flags
(`--param NAME=VALUE`, `--alpha`, `--beta`), the HTTP API's method list and recipe validation all read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..core.errors import InputError


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]

    def __init__(self, *options: str):
        object.__setattr__(self, "options", tuple(options))


@dataclass(frozen=True)
class Param:
    name: str
    kind: Any                      # float | int | bool | Choice
    default: Any
    range: tuple[float, float] | None = None
    help: str = ""
    blockwise: bool = False        # may be given per MBW block; the engine resolves it per key

    def coerce(self, value: Any, method: str) -> Any:
        """Check and convert a user value; errors name the method, the parameter and the allowed range."""
        where = f"{method}: parameter '{self.name}'"
        if self.kind == "floats":
            if value is None:
                return None
            if isinstance(value, str):
                value = [v for v in value.replace(";", ",").split(",") if v.strip()]
            try:
                values = [float(v) for v in value]
            except (TypeError, ValueError, OverflowError):
                raise InputError(f"{where} must be a list of numbers, not '{value}'.") from None
            if not all(math.isfinite(v) for v in values):
                raise InputError(f"{where} must be a list of finite numbers, not {values}.")
            return values
        if isinstance(self.kind, Choice):
            if value not in self.kind.options:
                raise InputError(f"{where} must be one of {', '.join(self.kind.options)}, not '{value}'.")
            return value
        try:
            if self.kind is bool:
                if isinstance(value, str):
                    if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError
                    value = value.lower() in ("1", "true", "yes", "on")
                return bool(value)
            if self.kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            else:
                value = float(value)
        except (TypeError, ValueError, OverflowError):   # OverflowError: an integer too large for a float
            raise InputError(f"{where} must be a {self.kind.__name__}, not '{value}'.") from None
        if value != value:  # NaN
            raise InputError(f"{where} is NaN.")
        if self.range is not None and not (self.range[0] <= value <= self.range[1]):
            raise InputError(f"{where} = {value} is outside its range [{self.range[0]}, {self.range[1]}].")
        return value

    def describe(self) -> dict:
        kind = ({"choice": list(self.kind.options)} if isinstance(self.kind, Choice)
                else self.kind if isinstance(self.kind, str) else self.kind.__name__)
        return {"name": self.name, "kind": kind, "default": self.default, "range": self.range,
                "help": self.help, "blockwise": self.blockwise}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    inputs: tuple[str, ...]          # roles of the input models, e.g. ("A", "B", "C"); ("models",) for many
    params: tuple[Param, ...]
    label: str = ""
    formula: str = ""
    help: str = ""
    many: bool = False               # takes 2..MAX_MODELS models instead of fixed roles
    base: str = "none"               # "none" | "optional" | "required": a base model θ0 (deltas δi = θi − θ0)
    prepare: Callable | None = None  # whole-tensor statistics, computed in streaming passes before the merge
    chunkable: bool = True           # the final pass may run in row chunks (needs prepare for global stats)
    finish: Callable | None = None   # with it, fn returns "terms" that do not depend on the per-block
                                     # parameters, and finish(terms, inplace, **params) makes the output

    def apply(self, models, *, base, stats, rng, params: dict):
        """The method's output for one chunk."""
        if self.finish is None:
            return self.fn(models, base=base, stats=stats, rng=rng, **params)
        return self.finish(self.fn(models, base=base, stats=stats, rng=rng, **params), inplace=True, **params)

    @property
    def n_models(self) -> int | None:
        return None if self.many else len(self.inputs)

    def check_models(self, n_models: int, has_base: bool) -> None:
        if self.many:
            if not 2 <= n_models <= MAX_MODELS:
                raise InputError(f"{self.name} takes 2 to {MAX_MODELS} models, got {n_models}.")
        elif n_models != len(self.inputs):
            raise InputError(f"{self.name} takes {len(self.inputs)} models ({', '.join(self.inputs)}), got {n_models}.")
        if self.base == "required" and not has_base:
            raise InputError(f"{self.name} needs a base model (the model the others were fine-tuned from, "
                             f"e.g. SD1.5 itself): give one as the base model.")
        if self.base == "none" and has_base:
            raise InputError(f"{self.name} does not use a base model: leave the base model empty.")

    @property
    def blockwise_params(self) -> list[str]:
        return [p.name for p in self.params if p.blockwise]

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise InputError(f"Method '{self.name}' has no parameter '{name}'. "
                         f"Its parameters: {', '.join(p.name for p in self.params) or 'none'}.")

    def resolve_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, every value checked; unknown names are errors."""
        for name in given:
            self.param(name)
        return {p.name: p.coerce(given.get(p.name, p.default), self.name) for p in self.params}

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label, "inputs": list(self.inputs), "many": self.many,
                "base": self.base, "formula": self.formula, "help": self.help,
                "params": [p.describe() for p in self.params]}


METHODS: dict[str, MethodSpec] = {}
MAX_MODELS = 100


def merge_method(name: str, *, inputs: tuple[str, ...] = ("models",), params: list[Param], label: str = "",
                 formula: str = "", help: str = "", many: bool = False, base: str = "none",
                 prepare: Callable | None = None, chunkable: bool = True, finish: Callable | None = None):
    def register(fn):
        if name in METHODS:
            raise RuntimeError(f"merge method '{name}' registered twice")
        METHODS[name] = MethodSpec(name, fn, tuple(inputs), tuple(params), label or name, formula,
                                   help or (fn.__doc__ or "").strip(), many, base, prepare, chunkable,
                                   finish)
        return fn
    return register


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise InputError(f"Unknown merge method '{name}'. Methods: {', '.join(sorted(METHODS))}.")
    return METHODS[name]
