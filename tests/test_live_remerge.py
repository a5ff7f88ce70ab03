"""Live re-merge: after a change of per-block values only the changed keys are written, and the live
tensors end up bit for bit equal to a full merge of the final recipe (float32)."""
import pytest
import torch

from lib_merge.core.arch import block_names, block_of
from lib_merge.core.weights import preset
from lib_merge.engine.live import LiveCache
from lib_merge.engine.merge import merge
from lib_merge.engine.recipe import ModelRef, Recipe
from lib_merge.engine.sinks import TensorSink


def refs(tiny, *names):
    return [ModelRef(n + ".safetensors", str(tiny.path[n])) for n in names]


def fresh_targets(tiny):
    return {k: torch.zeros_like(v, dtype=torch.float32) if v.is_floating_point() else v.clone()
            for k, v in tiny.state["sd1_a"].items()}


def full(recipe_kwargs, tiny):
    t = fresh_targets(tiny)
    merge(Recipe(**recipe_kwargs), TensorSink(t))
    return t


@pytest.mark.parametrize("method,names,base,param", [
    ("weighted_sum", ("sd1_a", "sd1_b"), None, "alpha"),
    ("add_difference", ("sd1_a", "sd1_b", "sd1_c"), None, "alpha"),
    ("ties", ("sd1_b", "sd1_c"), "sd1_a", "lambda"),
    ("dare_ties", ("sd1_b", "sd1_c"), "sd1_a", "lambda"),
])
@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["inputs-kept", "files-reread"])
def test_slider_sequence_equals_full_merge_bit_for_bit(tiny, method, names, base, param, budget):
    live = LiveCache(budget_bytes=budget)
    targets = fresh_targets(tiny)
    sink = TensorSink(targets)
    base_ref = ModelRef(base, str(tiny.path[base])) if base else None
    kwargs = dict(method=method, models=refs(tiny, *names), base=base_ref, dtype="float32", seed=3)
    grad_v_with_m00 = preset("GRAD_V", "sd1")
    grad_v_with_m00[block_names("sd1").index("M00")] = 0.9
    sequence = [
        {"params": {param: 0.3}},
        {"params": {param: 0.3}, "blocks": {param: preset("GRAD_V", "sd1")}},
        {"params": {param: 0.3}, "blocks": {param: grad_v_with_m00}},   # only M00 changes
        {"params": {param: 0.8}},
    ]
    written = []
    for step in sequence:
        r = merge(Recipe(**kwargs, **step), sink, live=live, threads=2)
        written.append(r.rewritten)
    n_merged = n_merged_keys(tiny)
    m00 = sum(1 for k in tiny.state["sd1_a"] if block_of(k, "sd1") == "M00")
    assert written[0] == len(tiny.state["sd1_a"]) and written[2] == m00 and written[3] == n_merged
    want = full({**kwargs, **sequence[-1]}, tiny)
    for k in targets:
        assert torch.equal(targets[k], want[k]), k


def n_merged_keys(tiny):
    return sum(1 for k, v in tiny.state["sd1_a"].items()
               if v.is_floating_point() and not k.startswith("first_stage_model.") and not k.endswith("position_ids"))


def test_other_changes_are_full_merges_and_budget_is_respected(tiny):
    targets = fresh_targets(tiny)
    sink = TensorSink(targets)
    live = LiveCache(budget_bytes=1 << 30)
    kw = dict(method="weighted_sum", models=refs(tiny, "sd1_a", "sd1_b"), dtype="float32")
    merge(Recipe(**kw, params={"alpha": 0.2}), sink, live=live)
    assert live.kept_bytes == 2 * sum(v.numel() * v.element_size() for k, v in tiny.state["sd1_a"].items()
                                      if k in live.keep)   # both inputs' merged keys, in their own dtype
    r = merge(Recipe(**kw, params={"alpha": 0.2}, seed=1), sink, live=live)   # the seed is structure
    assert r.rewritten == len(targets)
    r = merge(Recipe(**kw, params={"alpha": 0.2}, seed=1), sink, live=live)   # nothing changed at all
    assert r.rewritten == 0
    # over the budget nothing is kept, and a re-merge reads only the changed keys from the files
    small = LiveCache(budget_bytes=1000)
    merge(Recipe(**kw, params={"alpha": 0.2}), sink, live=small)
    r = merge(Recipe(**kw, params={"alpha": 0.4}), sink, live=small)
    assert r.rewritten == n_merged_keys(tiny) and "budget" in small.note and small.kept_bytes == 0
    want = full({**kw, "params": {"alpha": 0.4}}, tiny)
    assert all(torch.equal(targets[k], want[k]) for k in targets)
    # every method re-merges only what changed (a soup has no per-block value: nothing to rewrite)
    soup = LiveCache(budget_bytes=1 << 30)
    kw_soup = dict(method="uniform_soup", models=refs(tiny, "sd1_a", "sd1_b"), dtype="float32")
    merge(Recipe(**kw_soup), sink, live=soup)
    assert merge(Recipe(**kw_soup), sink, live=soup).rewritten == 0


def test_a_failed_remerge_forgets_the_kept_terms(tiny):
    from lib_merge.core.errors import CancelledError
    targets = fresh_targets(tiny)
    sink = TensorSink(targets)
    live = LiveCache(budget_bytes=1 << 30)
    kw = dict(method="weighted_sum", models=refs(tiny, "sd1_a", "sd1_b"), dtype="float32")
    merge(Recipe(**kw, params={"alpha": 0.2}), sink, live=live)
    assert live.params and live.kept_bytes
    with pytest.raises(CancelledError):
        merge(Recipe(**kw, params={"alpha": 0.7}), sink, live=live, cancel=lambda: True)
    assert not live.params and not live.kept_bytes, "half-written live tensors must not be patched from stale bookkeeping"
    r = merge(Recipe(**kw, params={"alpha": 0.2}), sink, live=live)
    assert r.rewritten == len(targets)
    want = full({**kw, "params": {"alpha": 0.2}}, tiny)
    assert all(torch.equal(targets[k], want[k]) for k in targets)
