"""Live re-merges: after a merge into a live model, a change of per-block values re-merges only the keys whose
values changed, straight into the live tensors.

What makes that exact: the changed keys run through the same executor as a full merge, from the same input
bytes, so the live tensors end up bit for bit what a full merge of the new recipe gives (any method, masks
and random methods included). Where the inputs come from:
- kept in memory: the merged keys of every input, in the file's own dtype (lossless, and half the memory of
  float32 copies for float16 files), when they fit in the budget; a re-merge then reads nothing;
- otherwise read again from the files, only the changed keys (the page cache usually still has them).
"""
from __future__ import annotations

import json
import threading

import torch

from ..core.files import ModelFile
from ..methods import get_method
from .plan import Plan
from .recipe import Recipe
from .sinks import Sink, TensorSink


class KeptModel(ModelFile):
    """An input model whose merged keys are served from memory (read whole from the file the first time)."""

    def __init__(self, file: ModelFile, store: dict[str, torch.Tensor], keep: set[str], lock: threading.Lock):
        self.file, self.store, self.keep, self.lock = file, store, keep, lock
        self.path, self.tensors, self.metadata = file.path, file.tensors, file.metadata

    def read(self, key, rows=None, buffer=None):
        if key not in self.keep:
            return self.file.read(key, rows, buffer)
        t = self.store.get(key)
        if t is None:
            t = self.file.read(key)   # a fresh whole tensor in the file's dtype
            with self.lock:
                self.store[key] = t
        if rows is not None and t.dim():
            t = t[rows[0]:rows[1]]
        return t   # callers copy from it and never write into it

    def close(self):
        self.file.close()


class LiveCache:
    """What a live model needs to be re-merged fast after a change of per-block parameters (sliders, XY plots,
    AutoMBW trials): the recipe's signature, the live model it was written into, the parameter values each
    merged key was last written with, and (within `budget_bytes`) the merged keys of every input."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        self.signature: str | None = None
        self.owner = None                      # the live model the values were written into
        self.params: dict[str, dict] = {}      # merged key -> the parameter values it holds now
        self.stores: list[dict[str, torch.Tensor]] = []   # per input: key -> its tensor, in the file's dtype
        self.keep: set[str] = set()            # the keys kept in memory (empty: re-merges read the files)
        self.note = ""

    @property
    def kept_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.stores for t in s.values())

    @staticmethod
    def signature_of(recipe: Recipe, device, compute_dtype) -> str:
        """Everything about a recipe except the values a re-merge may change."""
        spec = get_method(recipe.method)
        d = recipe.to_dict()
        d["params"] = {k: v for k, v in d["params"].items() if k not in spec.blockwise_params}
        for k in ("blocks", "layer_weights", "elemental", "arch"):   # per-key values: a re-merge follows them
            d.pop(k, None)
        for m in d["models"] + ([d["base"]] if d.get("base") else []):
            m.pop("sha256", None), m.pop("short_hash", None)
        d["_device"], d["_compute"] = str(device), str(compute_dtype)
        return json.dumps(d, sort_keys=True)

    def reusable(self, signature: str, owner) -> bool:
        return bool(self.params) and signature == self.signature and owner == self.owner

    @staticmethod
    def bytes_needed(plan: Plan, inputs: list[ModelFile]) -> int:
        """Memory for every input's merged keys, in the inputs' own dtypes."""
        return sum(m.tensors[t.key].nbytes for t in plan.tasks if t.action == "merge" for m in inputs)

    def plan_for(self, recipe: Recipe, sink: Sink, plan: Plan, inputs: list[ModelFile], device, compute_dtype):
        """(the plan to run, the inputs to run it on, the recipe's signature or None).

        The same recipe structure on the same live model: only the merged keys whose values changed.
        Otherwise the whole plan, keeping the inputs' merged keys in memory when they fit the budget.
        """
        if not isinstance(sink, TensorSink):
            return plan, inputs, None
        signature = self.signature_of(recipe, device, compute_dtype)
        if self.reusable(signature, sink.owner):
            changed = [t for t in plan.tasks if t.action == "merge" and self.params.get(t.key) != t.params]
            return Plan(plan.arch, plan.method, changed, plan.warnings, plan.n_models), self._wrap(inputs), signature
        self.clear()
        need = self.bytes_needed(plan, inputs)
        if need <= self.budget_bytes:
            self.keep = {t.key for t in plan.tasks if t.action == "merge"}
            self.stores = [{} for _ in inputs]
        else:
            self.note = (f"re-merges read the changed tensors from the files: keeping the inputs in memory needs "
                         f"{need / 2**20:,.0f} MB, more than the {self.budget_bytes / 2**20:,.0f} MB budget "
                         f"(the live re-merge memory setting)")
        return plan, self._wrap(inputs), signature

    def _wrap(self, inputs: list[ModelFile]) -> list[ModelFile]:
        if not self.keep:
            return inputs
        return [KeptModel(m, s, self.keep, self.lock) for m, s in zip(inputs, self.stores)]

    def written(self, signature: str, owner, plan: Plan) -> None:
        """A merge (whole or partial) finished into `owner`: remember what its merged keys hold."""
        self.signature, self.owner = signature, owner
        self.params.update({t.key: t.params for t in plan.tasks if t.action == "merge"})
