"""Planning: a recipe and its opened inputs -> one task per output key (merge or copy), with warnings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..core import arch as archmod
from ..core.arch import Architecture, component_of
from ..core.elemental import adjust_ops, matching_rule, parse_elemental
from ..core.errors import InputError
from ..core.files import ModelFile, dtype_from_name
from ..core.weights import value_for_key
from ..methods.spec import MethodSpec, get_method
from .recipe import Recipe

DROPPED_PREFIXES = ("model_ema.",)  # EMA copies of A would mislabel a merge; the WebUI does not use them


@dataclass
class Task:
    key: str
    action: str                      # "merge" | "copy"
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    params: dict[str, Any] = field(default_factory=dict)
    region: tuple[int, ...] | None = None   # merge only this leading region (shape mismatch); rest from A
    nbytes: int = 0
    adjust: tuple[str, object] | None = None  # ("scale", f) or ("shift", per-channel values): SuperMerger's Adjust


@dataclass
class Plan:
    arch: Architecture
    method: MethodSpec
    tasks: list[Task]
    warnings: list[str]
    n_models: int = 2                # inputs[:n_models] are the models, inputs[n_models] the base if any

    @property
    def entries(self):
        return [(t.key, t.out_dtype, t.shape) for t in self.tasks]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)


def plan_merge(recipe: Recipe, inputs: list[ModelFile]) -> Plan:
    """One task per output key. The output has A's keys (minus EMA); what is merged follows the recipe.

    `inputs` are the recipe's models in order, then its base model if it has one. A is the first model.
    """
    spec = get_method(recipe.method)
    shapes = [{k: info.shape for k, info in m.tensors.items()} for m in inputs]
    archs = [(m.name, archmod.detect(s, m.name)) for m, s in zip(inputs, shapes)]
    arch = archmod.check_same_family(archs)
    family = arch.family
    count = archmod.FAMILY_BLOCK_COUNT[family]
    for name, values in recipe.blocks.items():
        if values is not None and len(values) != count:
            raise InputError(f"{arch.label} takes {count} block weights for '{name}', the recipe has {len(values)}.")
    out_dtype = dtype_from_name(recipe.dtype)
    rules = parse_elemental(recipe.elemental, family) if recipe.elemental else []
    elemental_param = spec.param(spec.blockwise_params[0]) if rules else None
    used_rules: set[str] = set()
    adjust = adjust_ops(recipe.adjust, family)
    a = inputs[0]
    others = inputs[1:]
    tasks: list[Task] = []
    warnings: list[str] = []
    missing: list[str] = []
    mismatched: list[str] = []
    unweighted: list[str] = []
    for key, info in sorted(a.tensors.items(), key=lambda kv: kv[1].offset):
        if key.startswith(DROPPED_PREFIXES):
            continue
        comp = component_of(key)
        merge = (comp in recipe.components and info.is_float and not key.endswith("position_ids"))
        dtype = out_dtype if info.is_float and not key.endswith("position_ids") else info.dtype
        task = Task(key, "copy", info.shape, dtype, nbytes=info.numel * dtype.itemsize, adjust=adjust.get(key))
        tasks.append(task)
        if not merge:
            continue
        absent = [m.name for m in others if key not in m.tensors]
        if absent:
            if recipe.missing_keys == "error":
                raise InputError(f"Key '{key}' of '{a.name}' is missing from {', '.join(absent)} "
                                 f"(set missing keys to keep_a to copy it from A).")
            missing.append(key)
            continue
        other_shapes = [m.tensors[key].shape for m in others]
        if any(s != info.shape for s in other_shapes):
            if any(len(s) != len(info.shape) for s in other_shapes):
                mismatched.append(key)
                continue
            task.region = tuple(min(d) for d in zip(info.shape, *other_shapes))
            mismatched.append(key)
        task.params = {name: value_for_key(key, family, recipe.blocks.get(name), value)
                       for name, value in recipe.params.items()}
        if recipe.layer_weights is not None:
            values = recipe.layer_weights["values"]
            if key not in values:  # a per-key weight set names the keys to merge; the others stay A's
                unweighted.append(key)
                continue
            task.params[recipe.layer_weights["param"]] = values[key]
        if rules:   # elemental ratios come last: they override the block weights for the keys they match
            rule = matching_rule(key, family, rules)
            if rule is not None:
                task.params[elemental_param.name] = elemental_param.coerce(rule.ratio, "elemental")
                used_rules.add(rule.text)
        task.action = "merge"
    unused = [r.text for r in rules if r.text not in used_rules]
    if unused:
        warnings.append(f"Elemental entries that matched no merged key (check the block and element names): "
                        f"{'; '.join(unused)}.")
    if missing:
        warnings.append(f"{len(missing)} key(s) of A are missing from other models and were copied from A "
                        f"(e.g. {missing[0]}).")
    if unweighted:
        warnings.append(f"{len(unweighted)} key(s) have no value in the per-key weight set and were copied from A "
                        f"(e.g. {unweighted[0]}).")
    if mismatched:
        warnings.append(f"{len(mismatched)} key(s) differ in shape between the models; the common part was merged "
                        f"and the rest kept from A (e.g. {mismatched[0]}).")
    extra = set().union(*(m.tensors.keys() for m in others)) - set(a.tensors) if others else set()
    extra = {k for k in extra if not k.startswith(DROPPED_PREFIXES)}
    if extra:
        warnings.append(f"{len(extra)} key(s) present only in other models were left out (the output follows A's keys).")
    return Plan(arch, spec, tasks, warnings, n_models=len(recipe.models))
