"""Live re-merges: what a merge into a live model keeps so that a change of per-block values re-merges only
the keys whose values changed."""
from __future__ import annotations

import json

import torch

from ..methods.spec import get_method
from .execute import _numel
from .plan import Plan
from .recipe import Recipe
from .sinks import Sink, TensorSink


class LiveCache:
    """What a live model needs to be re-merged fast after a change of per-block parameters.

    After a full merge into a TensorSink it holds, per merged key, the method's terms (the parts that do
    not depend on α, β, λ or ratio) on the compute device, and the parameter values last written. When the
    next recipe differs only in those values (sliders, block weights, per-key weights), only the keys
    whose values changed are finished again and written into the live tensors. Anything else (another
    model, method, seed, mask, dtype...) is a full merge. Terms need memory: when they would not fit in
    `budget_bytes`, nothing is kept and every merge is a full one (`note` says so).
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.clear()

    def clear(self) -> None:
        self.signature: str | None = None
        self.owner = None                  # the live model the terms were written into
        self.terms: dict[str, tuple] = {}
        self.params: dict[str, dict] = {}
        self.note = ""

    @staticmethod
    def signature_of(recipe: Recipe, device, compute_dtype) -> str:
        """Everything about a recipe except the values a re-merge may change."""
        spec = get_method(recipe.method)
        d = recipe.to_dict()
        d["params"] = {k: v for k, v in d["params"].items() if k not in spec.blockwise_params}
        for k in ("blocks", "layer_weights", "arch"):
            d.pop(k, None)
        for m in d["models"] + ([d["base"]] if d.get("base") else []):
            m.pop("sha256", None), m.pop("short_hash", None)
        d["_device"], d["_compute"] = str(device), str(compute_dtype)
        return json.dumps(d, sort_keys=True)

    def reusable(self, signature: str, owner) -> bool:
        return bool(self.terms) and signature == self.signature and owner == self.owner

    def bytes_needed(self, plan: Plan, compute_dtype: torch.dtype) -> int:
        n = plan.method.n_terms
        return sum(_numel(t.shape) * n * compute_dtype.itemsize
                   for t in plan.tasks if t.action == "merge" and t.region is None)


def _live_plan(live: LiveCache | None, recipe: Recipe, sink: Sink, plan: Plan, mask, device, compute_dtype):
    """(plan to run, dict to capture terms into or None, kept terms or None, recipe signature).

    With a LiveCache that holds this recipe's terms for this live model, only the merged keys whose
    per-block values changed are run; otherwise the whole plan, keeping the terms when they fit.
    """
    if live is None or not isinstance(sink, TensorSink):
        return plan, None, None, None
    signature = LiveCache.signature_of(recipe, device, compute_dtype)
    if live.reusable(signature, sink.owner):
        changed = [t for t in plan.tasks if t.action == "merge" and live.params.get(t.key) != t.params]
        return Plan(plan.arch, plan.method, changed, plan.warnings, plan.n_models), None, live.terms, signature
    live.clear()
    need = live.bytes_needed(plan, compute_dtype)
    if plan.method.finish is None or mask is not None:
        live.note = "this method (or a mask) needs a full merge on every change"
    elif need > live.budget_bytes:
        live.note = (f"re-merges are full merges: keeping this merge's terms needs {need / 2**30:.1f} GiB, "
                     f"more than the {live.budget_bytes / 2**30:.1f} GiB budget (Settings)")
    else:
        return plan, {}, None, signature
    return plan, None, None, signature
