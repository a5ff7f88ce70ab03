"""SuperMerger's elemental merge and Adjust: numbers against the formulas, by hand, on the tiny models with the
real key names; the CLI, the tab and a live re-merge that follows an elemental change."""
from __future__ import annotations

import json

import pytest
import torch

from lib_merge.core.elemental import adjust_ops, parse_elemental
from lib_merge.core.errors import InputError
from lib_merge.engine.merge import merge
from lib_merge.engine.recipe import ModelRef, Recipe
from lib_merge.engine.sinks import DictSink

U = "model.diffusion_model."
OUT05_ATTN2 = U + "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
OUT05_ATTN1 = U + "output_blocks.5.1.transformer_blocks.0.attn1.to_q.weight"
OUT05_NORM = U + "output_blocks.5.1.norm.weight"
IN04_ATTN1 = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
OUT06_ATTN2K = U + "output_blocks.6.1.transformer_blocks.0.attn2.to_k.weight"
OUT06_ATTN2V = U + "output_blocks.6.1.transformer_blocks.0.attn2.to_v.weight"


def run(tiny, family="sd1", **fields):
    a, b = tiny.state[f"{family}_a"], tiny.state[f"{family}_b"]
    r = Recipe("weighted_sum", [ModelRef("a", str(tiny.path[f"{family}_a"])), ModelRef("b", str(tiny.path[f"{family}_b"]))],
               params={"alpha": 0.5}, dtype="float32", **fields)
    result = merge(r, DictSink(), hashes=False)
    return result, a, b


def lerp(a, b, key, t):
    return a[key] + t * (b[key] - a[key])


def test_elemental_ratios_override_the_block_weights_by_hand(tiny):
    text = "OUT05:attn2:0.2, NOT OUT05:attn1:1\nOUT06:attn:0.3, OUT06:attn2.to_k:0.9"
    result, a, b = run(tiny, elemental=text)
    out = result.output
    for key, t in ((OUT05_ATTN2, 0.2),     # OUT05 attn2
                   (OUT05_ATTN1, 0.5),     # OUT05 attn1: NOT OUT05 leaves it alone; no rule -> α
                   (IN04_ATTN1, 1.0),      # every block but OUT05: attn1 -> 1 (= B)
                   (OUT05_NORM, 0.5),      # not an element named
                   (OUT06_ATTN2K, 0.9),    # the later, narrower entry wins
                   (OUT06_ATTN2V, 0.3)):
        torch.testing.assert_close(out[key], lerp(a, b, key, t), rtol=0, atol=1e-6, msg=key)


def test_a_live_re_merge_rewrites_only_the_keys_an_elemental_change_reaches(tiny):
    from lib_merge.engine.live import LiveCache
    from lib_merge.engine.sinks import TensorSink
    a = tiny.state["sd1_a"]
    live = {k: torch.zeros_like(v, dtype=torch.float32 if v.is_floating_point() else v.dtype) for k, v in a.items()}
    cache, sink = LiveCache(1 << 30), TensorSink(live)

    def recipe(text):
        return Recipe("weighted_sum", [ModelRef("a", str(tiny.path["sd1_a"])), ModelRef("b", str(tiny.path["sd1_b"]))],
                      params={"alpha": 0.5}, dtype="float32", elemental=text)
    merge(recipe(None), sink, live=cache, hashes=False)
    again = merge(recipe("OUT05:attn2:0.2"), sink, live=cache, hashes=False)
    attn2 = [k for k in a if k.startswith(U + "output_blocks.5.") and "attn2" in k]
    assert again.rewritten == len(attn2) > 0
    torch.testing.assert_close(live[OUT05_ATTN2], lerp(a, tiny.state["sd1_b"], OUT05_ATTN2, 0.2), rtol=0, atol=1e-6)


def test_elemental_not_elements_and_errors(tiny):
    out = run(tiny, elemental="OUT05:NOT attn proj:0.2")[0].output
    a, b = tiny.state["sd1_a"], tiny.state["sd1_b"]
    torch.testing.assert_close(out[OUT05_NORM], lerp(a, b, OUT05_NORM, 0.2), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[OUT05_ATTN2], lerp(a, b, OUT05_ATTN2, 0.5), rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="'IN99' is not a block|IN99 is not a block"):
        parse_elemental("IN99:attn:0.5", "sd1")
    with pytest.raises(InputError, match=r"is not BLOCKS:ELEMENTS:RATIO"):
        parse_elemental("OUT05 attn 0.5", "sd1")
    with pytest.raises(InputError, match=r"the ratio 'x' is not a number"):
        parse_elemental("OUT05:attn:x", "sd1")
    with pytest.raises(InputError, match="IN09 is not a block of this model"):
        run(tiny, family="sdxl", elemental="IN09:attn:0.5")   # SDXL has IN00..IN08
    warned = run(tiny, elemental="OUT05:nothing_like_this:0.5")[0].warnings
    assert any("matched no merged key" in w and "OUT05:nothing_like_this:0.5" in w for w in warned)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_adjust_changes_the_six_keys_as_supermerger_does(tiny, family):
    values = [1, 2, 3, 4, 5, 6, 7, 8]
    result, a, b = run(tiny, family=family, adjust=values)
    out, plain = result.output, run(tiny, family=family)[0].output
    for key, f in (("input_blocks.0.0.weight", 1 - 0.01), ("input_blocks.0.0.bias", 1 + 0.02),
                   ("out.0.weight", 1 - 0.02), ("out.0.bias", 1 + 0.04), ("out.2.weight", 1 - 0.03)):
        torch.testing.assert_close(out[U + key], plain[U + key] * f, rtol=1e-6, atol=1e-7, msg=key)
    # out.2.bias + [0.02·CONT, colour]: colour = 0.02 · Σ (BRI, COL1, COL2, COL3)ᵢ · rowᵢ, by hand
    if family == "sdxl":   # rows (0,0,1), (1,0,0), (-1,-1,0), (-1,1,0)
        colour = [0.02 * (6 - 7 - 8), 0.02 * (-7 + 8), 0.02 * 5]
    else:                  # rows (-1,1/3,2/3), (1,1,0), (0,-1,-1), (1,0,1)
        colour = [0.02 * (-5 + 6 + 8), 0.02 * (5 / 3 + 6 - 7), 0.02 * (10 / 3 - 7 + 8)]
    want = plain[U + "out.2.bias"] + torch.tensor([0.08] + colour)
    torch.testing.assert_close(out[U + "out.2.bias"], want, rtol=1e-6, atol=1e-6)
    untouched = U + "output_blocks.0.0.in_layers.2.weight"
    assert torch.equal(out[untouched], plain[untouched])
    assert adjust_ops([0] * 8, family) == {} and len(adjust_ops(values, family)) == 6


def test_adjust_is_refused_with_a_sentence():
    for bad in ([1] * 9, ["x"], [float("nan")]):
        with pytest.raises(InputError, match="Adjust takes up to 8"):
            Recipe("weighted_sum", [ModelRef("a"), ModelRef("b")], adjust=bad).validate()


def test_cli_and_recipe_round_trip(tiny, tmp_path, capsys):
    from safetensors import safe_open

    from lib_merge.cli import main
    out = tmp_path / "t.safetensors"
    assert main(["merge", "--method", "weighted_sum", "--model", str(tiny.path["sd1_a"]), "--model",
                 str(tiny.path["sd1_b"]), "--alpha", "0.5", "--elemental", "OUT05:attn2:0.2", "--adjust", "2,0,0,1",
                 "--dtype", "float32", "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["merge_lab_recipe"])
        got = f.get_tensor(OUT05_ATTN2)
    assert recipe["elemental"] == "OUT05:attn2:0.2" and recipe["adjust"] == [2, 0, 0, 1, 0, 0, 0, 0]
    a, b = tiny.state["sd1_a"], tiny.state["sd1_b"]
    torch.testing.assert_close(got, lerp(a, b, OUT05_ATTN2, 0.2), rtol=0, atol=1e-6)
    again = tmp_path / "again.safetensors"
    assert main(["merge", "--recipe", str(out), "--models-dir", str(tiny.folder), "-o", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_the_tab_sends_elemental_and_adjust_and_loads_them_back(tiny, tmp_path):
    pytest.importorskip("gradio")
    import os

    from lib_merge.host.standalone import StandaloneHost
    from lib_merge.ui.tab import make_tab
    from tests.test_ui import apply, form, run as run_updates
    models = tmp_path / "models"
    models.mkdir()
    for name in ("sd1_a", "sd1_b"):
        os.symlink(tiny.path[name], models / f"{name}.safetensors")
    host = StandaloneHost(models, tmp_path / "out", generate=False)
    tab = make_tab(host)
    v = form(tab, model_a="sd1_a.safetensors", model_b="sd1_b.safetensors", elemental="OUT05:attn2:0.2",
             adjust="1, 0, 0, 0, 0, 0, 0, 0")
    u = run_updates(tab.on_merge(v))
    assert "merge-lab-ok" in u["status"]
    loaded = json.loads(host.loaded.recipe_json)
    assert loaded["elemental"] == "OUT05:attn2:0.2" and loaded["adjust"][0] == 1
    back = apply(tab.values(), tab.on_load_recipe({**tab.values(), "recipe": host.loaded.recipe_json}))
    assert back["elemental"] == "OUT05:attn2:0.2" and back["adjust"].startswith("1, 0")
