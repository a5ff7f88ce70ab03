"""Masks and per-key weight sets going through the engine (any method)."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from lib_merge.core.masks import simple
from lib_merge.core.weights import WeightSet
from lib_merge.engine.merge import merge
from lib_merge.engine.recipe import ModelRef, Recipe
from lib_merge.engine.sinks import DictSink

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
K = "model.diffusion_model.input_blocks.4.1.proj_in.weight"


def refs(tiny, *names):
    return [ModelRef(n + ".safetensors", str(tiny.path[n])) for n in names]


@pytest.mark.parametrize("method,names,base", [("weighted_sum", ("sd1_a", "sd1_b"), None),
                                               ("ties", ("sd1_b", "sd1_c"), "sd1_a")])
def test_mask_keeps_a_where_false(tiny, tmp_path, method, names, base):
    mask = simple(tiny.state["sd1_a"], "random", probability=0.4, seed=3)
    mask_path = mask.save(tmp_path / "m.safetensors")
    base_ref = ModelRef(base, str(tiny.path[base])) if base else None
    plain = merge(Recipe(method, refs(tiny, *names), base=base_ref, dtype="float32"), DictSink()).output
    masked = merge(Recipe(method, refs(tiny, *names), base=base_ref, dtype="float32",
                          mask=ModelRef("m.safetensors", str(mask_path))), DictSink(), chunk_elems=1000).output
    a = tiny.state[names[0]]
    for key in (K, "cond_stage_model.transformer.text_model.encoder.layers.5.self_attn.v_proj.weight"):
        m = mask.tensor(key)
        assert 0.2 < float(m.float().mean()) < 0.6
        assert torch.equal(masked[key][~m], a[key][~m])
        assert torch.equal(masked[key][m], plain[key][m])


def test_weight_set_sets_alpha_per_key_and_copies_unlisted_keys(tiny):
    other = "model.diffusion_model.output_blocks.2.1.conv.weight"
    ws = {K: 0.25}
    r = Recipe("weighted_sum", refs(tiny, "sd1_a", "sd1_b"), dtype="float32",
               layer_weights={"param": "alpha", "values": ws})
    res = merge(r, DictSink())
    A, B = tiny.state["sd1_a"], tiny.state["sd1_b"]
    torch.testing.assert_close(res.output[K], A[K] * 0.75 + B[K] * 0.25)
    assert torch.equal(res.output[other], A[other])
    assert any("weight set" in w for w in res.warnings)


def test_cli_mask_and_weights_recorded_in_recipe_and_redone(tiny, tmp_path):
    mask = simple(tiny.state["sdxl_a"], "random", probability=0.5, seed=1)
    mask_path = mask.save(tmp_path / "mask.safetensors")
    # a weight set over every key of an SDXL model: a large recipe (over the header's spare room)
    ws = WeightSet({k: 0.5 for k, v in tiny.state["sdxl_a"].items() if v.is_floating_point()}, "sdxl")
    ws_path = ws.save(tmp_path / "w.json")
    out = tmp_path / "o.safetensors"
    cmd = [sys.executable, "-m", "lib_merge", "merge", "--method", "weighted_sum", "--model", str(tiny.path["sdxl_a"]),
           "--model", str(tiny.path["sdxl_b"]), "--mask", str(mask_path), "--weights", str(ws_path), "-o", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["merge_lab_recipe"])
    assert recipe["mask"]["name"] == "mask.safetensors" and len(recipe["mask"]["sha256"]) == 64
    assert len(recipe["layer_weights"]["values"]) == len(ws) and len(meta["merge_lab_recipe"]) > 64 << 10
    (tmp_path / "r.json").write_text(meta["merge_lab_recipe"])
    out2 = tmp_path / "o2.safetensors"
    p = subprocess.run([sys.executable, "-m", "lib_merge", "merge", "--recipe", str(tmp_path / "r.json"),
                        "--models-dir", str(tiny.folder), "--models-dir", str(tmp_path), "-o", str(out2)],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == out2.read_bytes()
