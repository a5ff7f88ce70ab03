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

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import InputError


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
        except (TypeError, ValueError):
            raise InputError(f"{where} must be a {self.kind.__name__}, not '{value}'.") from None
        if value != value:  # NaN
            raise InputError(f"{where} is NaN.")
        if self.range is not None and not (self.range[0] <= value <= self.range[1]):
            raise InputError(f"{where} = {value} is outside its range [{self.range[0]}, {self.range[1]}].")
        return value

    def describe(self) -> dict:
        kind = {"choice": list(self.kind.options)} if isinstance(self.kind, Choice) else self.kind.__name__
        return {"name": self.name, "kind": kind, "default": self.default, "range": self.range,
                "help": self.help, "blockwise": self.blockwise}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    inputs: tuple[str, ...]          # roles of the input models, e.g. ("A", "B", "C")
    params: tuple[Param, ...]
    label: str = ""
    formula: str = ""
    help: str = ""
    elementwise: bool = True         # output element i depends only on input elements i: safe to chunk
    extra: dict = field(default_factory=dict)

    @property
    def n_models(self) -> int:
        return len(self.inputs)

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
        return {"name": self.name, "label": self.label, "inputs": list(self.inputs), "formula": self.formula,
                "help": self.help, "params": [p.describe() for p in self.params]}


METHODS: dict[str, MethodSpec] = {}


def merge_method(name: str, *, inputs: tuple[str, ...], params: list[Param], label: str = "", formula: str = "",
                 help: str = "", elementwise: bool = True):
    def register(fn):
        if name in METHODS:
            raise RuntimeError(f"merge method '{name}' registered twice")
        METHODS[name] = MethodSpec(name, fn, tuple(inputs), tuple(params), label or name, formula,
                                   help or (fn.__doc__ or "").strip(), elementwise)
        return fn
    return register


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise InputError(f"Unknown merge method '{name}'. Methods: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


ALPHA = Param("alpha", float, 0.5, (-1.0, 2.0), "weight of B (0 = all A, 1 = all B)", blockwise=True)
BETA = Param("beta", float, 0.5, (-1.0, 2.0), "weight of C", blockwise=True)


@merge_method("weighted_sum", inputs=("A", "B"), params=[ALPHA], label="Weighted sum",
              formula="A·(1−α) + B·α")
def weighted_sum(inputs, *, alpha, rng=None):
    """Linear interpolation between A and B (exact A at α=0 and exact B at α=1)."""
    a, b = inputs
    return a.lerp_(b, alpha)


@merge_method("add_difference", inputs=("A", "B", "C"),
              params=[Param("alpha", float, 1.0, (-1.0, 3.0), "strength of the difference B − C", blockwise=True)],
              label="Add difference", formula="A + α·(B − C)")
def add_difference(inputs, *, alpha, rng=None):
    """Add what B learned over C (e.g. an inpainting or style difference) to A."""
    a, b, c = inputs
    return b.sub_(c).mul_(alpha).add_(a)


@merge_method("sum_twice", inputs=("A", "B", "C"), params=[ALPHA, BETA], label="Sum twice",
              formula="(A·(1−α) + B·α)·(1−β) + C·β")
def sum_twice(inputs, *, alpha, beta, rng=None):
    """Weighted sum of A and B, then weighted sum of that with C."""
    a, b, c = inputs
    return a.lerp_(b, alpha).lerp_(c, beta)


@merge_method("triple_sum", inputs=("A", "B", "C"),
              params=[Param("alpha", float, 1 / 3, (-1.0, 2.0), "weight of B", blockwise=True),
                      Param("beta", float, 1 / 3, (-1.0, 2.0), "weight of C", blockwise=True)],
              label="Triple sum", formula="A·(1−α−β) + B·α + C·β")
def triple_sum(inputs, *, alpha, beta, rng=None):
    """Three-way weighted sum; A gets what α and β leave."""
    a, b, c = inputs
    return a.mul_(1 - alpha - beta).add_(b.mul_(alpha)).add_(c.mul_(beta))
