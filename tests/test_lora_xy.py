"""LoRA XY plots (lib_merge/lora/xy.py) and LoRAs baked into the live model (lora/live.py), on a standalone host
that generates with tiny runnable SD1 models, plus the LoRA tools' progress and Interrupt."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from test_lora_merge import SD1, XL, make_modules, write_lora  # noqa: E402  (tests/ is on sys.path)

from lib_merge.core.errors import ArchitectureMismatchError, CancelledError, InputError, MergeError
from lib_merge.core.files import open_model
from lib_merge.core.generation import GenerationRequest
from lib_merge.lora import xy as lxy
from lib_merge.lora.bake import bake
from lib_merge.lora.live import bake_into_host
from lib_merge.lora.merge import LoraInput, RankMismatchError

REQ = GenerationRequest(prompt="a cat", seed=7, steps=2, width=64, height=64)


@pytest.fixture
def setup(previewing_host, runnable_models, tmp_path):
    """The host, its checkpoint r1, and two LoRAs for it: A (rank 2, seven modules), B (rank 3, three)."""
    ckpt = runnable_models / "r1.safetensors"
    with open_model(ckpt) as mf:
        state = {k: mf.read(k) for k in mf.keys()}
    a = write_lora(tmp_path, "a.safetensors", make_modules(state, "sd1", list(SD1.values()), rank=2, seed=1), "sd1")
    b = write_lora(tmp_path, "b.safetensors",
                   make_modules(state, "sd1", [SD1["to_k"], SD1["conv"], SD1["te_q"]], rank=3, seed=2), "sd1")
    return previewing_host, ckpt, state, a, b


@pytest.fixture
def merges(monkeypatch):
    """The LoRA merges the plot computes (a cell whose strengths are all 0 needs none)."""
    calls = []
    real = lxy.merged_lora

    def counting(files, plot, m, *a, **kw):
        out = real(files, plot, m, *a, **kw)
        if out is not None:
            calls.append(m)
        return out
    monkeypatch.setattr(lxy, "merged_lora", counting)
    return calls


def live_state(host) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in host.generator.module_targets().items()}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_strength_grid_merges_each_cell_once_and_leaves_exactly_the_last_cell(setup, merges):
    host, ckpt, state, a, b = setup
    plot = lxy.LoraPlot(ckpt, [LoraInput(a), LoraInput(b)], mode="concat")
    x, y = lxy.LoraAxis("strength:1", "0, 1"), lxy.LoraAxis("strength:2", "0-0.5 (2)")
    r = lxy.run_lora_xy(host, plot, x, y, REQ)
    assert len(merges) == 3 and r.merges_done == 4          # the all-zero cell needs no merge: the bare checkpoint
    assert [m.strengths for m in merges] == [((1.0, 1.0), (0.0, 0.0)), ((0.0, 0.0), (0.5, 0.5)),
                                             ((1.0, 1.0), (0.5, 0.5))]
    assert r.x_labels == ["a = 0", "a = 1"] and r.y_labels == ["b = 0", "b = 0.5"]
    assert len(r.images) == 4 and r.grid_path.is_file() and all(p.is_file() for p in r.paths)
    # the live model holds the checkpoint plus the LAST cell's LoRAs, nothing left from earlier cells
    want = bake(ckpt, [(a, 1.0), (b, 0.5)], None, dtype=None).state
    live = live_state(host)
    touched = set(bake(ckpt, [(a, 1.0), (b, 0.5)], None, dtype=None).touched)
    assert touched and len(touched) == 7
    for k, t in live.items():
        if k in touched:
            torch.testing.assert_close(t, want[k].to(t.dtype), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(t, state[k].to(t.dtype)), k
    # cell (a=0, b=0) is the bare checkpoint: the same pixels as a preview of r1 itself
    host.generator.load(state, "sd1", name="r1")
    bare = host.generator.generate(REQ).images[0]
    assert np.array_equal(pixels(r.images[0]), pixels(bare))
    assert not np.array_equal(pixels(r.images[0]), pixels(r.images[3]))
    # every image's infotext names its cell and carries the cell's LoRA recipe
    info = r.infotexts[3]
    assert "Model: r1 + LoRAs (a = 1 | b = 0.5)" in info
    recipe = json.loads(json.loads(re.search(r'Merge Lab recipe: (".*")', info).group(1)))
    cell = recipe["loras"][0]["recipe"]
    assert cell["tool"] == "lora xy" and cell["mode"] == "concat"
    assert [(x["name"], x["strength_unet"], x["strength_te"]) for x in cell["loras"]] == [
        ("a.safetensors", 1.0, 1.0), ("b.safetensors", 0.5, 0.5)]


def test_unet_and_te_strengths_are_separate_axes(setup, merges):
    host, ckpt, state, a, b = setup
    plot = lxy.LoraPlot(ckpt, [LoraInput(a, 0.7, 0.7)])
    r = lxy.run_lora_xy(host, plot, lxy.LoraAxis("strength:1:unet", [0.0, 1.0]),
                        lxy.LoraAxis("strength:1:te", [0.25]), REQ)
    assert [m.strengths for m in merges] == [((0.0, 0.25),), ((1.0, 0.25),)]
    assert r.x_labels == ["a UNet = 0", "a UNet = 1"] and r.y_labels == ["a TE = 0.25"]
    live = live_state(host)
    want = bake(ckpt, [(a, 1.0, 0.25)], None, dtype=None).state
    te_key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    unet_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    for k in (te_key, unet_key):
        torch.testing.assert_close(live[k], want[k].to(live[k].dtype), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(live[te_key], state[te_key].to(live[te_key].dtype))


def test_seed_axis_shares_one_merge_and_mode_axis_runs_the_svd_merge(setup, merges):
    host, ckpt, state, a, b = setup
    plot = lxy.LoraPlot(ckpt, [LoraInput(a), LoraInput(b)], rank=2)
    r = lxy.run_lora_xy(host, plot, lxy.LoraAxis("seed", "1, 2"), lxy.LoraAxis("mode", "concat, svd_ties"), REQ,
                        save_loras=True)
    assert r.merges_done == 2 and len(merges) == 2 and len(r.images) == 4
    # each cell's merged LoRA was written once, beside the images, with its recipe
    from lib_merge.lora import open_lora
    assert [p.name for p in r.saved_models] == ["lora_concat.safetensors", "lora_svd_ties.safetensors"]
    assert all(p.parent == r.folder for p in r.saved_models) and "2 LoRA(s) saved" in r.message
    with open_lora(r.saved_models[0]) as lf:
        assert lf.family == "sd1" and json.loads(lf.metadata["merge_lab_recipe"])["mode"] == "concat"
        assert {m.rank for m in lf.modules.values()} == {2}        # the plot's rank=2: concat runs as svd_add
    assert [m.mode for m in merges] == ["concat", "svd_ties"] and all(m.svd for m in merges)
    assert not np.array_equal(pixels(r.images[0]), pixels(r.images[1]))     # seeds 1 and 2
    assert "Seed: 1," in r.infotexts[0] and "Seed: 2," in r.infotexts[1]


def test_lbw_axis_bakes_one_merge_several_ways(setup, merges):
    host, ckpt, state, a, b = setup
    plot = lxy.LoraPlot(ckpt, [LoraInput(a), LoraInput(b)])
    x = lxy.LoraAxis("lbw", "ALL | NONE | 1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0")
    y = lxy.LoraAxis("strength:1", "0, 1")
    r = lxy.run_lora_xy(host, plot, x, y, REQ)
    assert len(merges) == 2 and r.merges_done == 6      # two merges (a = 0, a = 1), each baked three ways
    assert r.x_labels == ["LBW = ALL", "LBW = NONE", "LBW = 1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"]
    live = live_state(host)
    # NONE zeroes every block: the bare checkpoint, whatever the strengths
    host.generator.load(state, "sd1", name="r1")
    bare = pixels(host.generator.generate(REQ).images[0])
    assert np.array_equal(pixels(r.images[1]), bare) and np.array_equal(pixels(r.images[4]), bare)
    assert not np.array_equal(pixels(r.images[3]), bare)
    # the last cell (a = 1, BASE only): exactly the checkpoint with the merge's text-encoder part
    want = bake(ckpt, [(a, 1.0), (b, 1.0)], None, dtype=None, lbw="1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0").state
    te_key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    unet_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    torch.testing.assert_close(live[te_key], want[te_key].to(live[te_key].dtype), rtol=1e-5, atol=1e-6)
    assert torch.equal(live[unet_key], state[unet_key].to(live[unet_key].dtype))
    with pytest.raises(InputError, match="block weights '1,2,3'"):
        lxy.run_lora_xy(host, plot, lxy.LoraAxis("lbw", "1,2,3"), None, REQ)


def test_merged_lora_in_memory_follows_rank_density_and_mode(setup):
    host, ckpt, state, a, b = setup
    plot = lxy.LoraPlot(ckpt, [LoraInput(a), LoraInput(b)])
    from lib_merge.lora.merge import open_inputs
    names = ["a.safetensors", "b.safetensors"]
    with open_inputs(plot.loras) as files:
        base = lxy.LoraMerge(((1.0, 1.0), (1.0, 1.0)), "concat", 1.0, None, None, 0, "total")
        concat = lxy.merged_lora(files, plot, base, names, "sd1")
        assert {m.rank for m in concat.modules.values()} == {2, 5}           # ranks add up where both have it
        to_k = SD1["to_k"]
        torch.testing.assert_close(concat.delta(to_k), files[0].delta(to_k) + files[1].delta(to_k))
        svd = lxy.merged_lora(files, plot, lxy.LoraAxis("rank", [1]).apply(base, 0), names, "sd1")
        assert {m.rank for m in svd.modules.values()} == {1}
        with pytest.raises(RankMismatchError, match="equal ranks"):
            lxy.merged_lora(files, plot, lxy.LoraAxis("mode", ["ties"]).apply(base, 0), names, "sd1")
        zero = lxy.merged_lora(files, plot, lxy.LoraAxis("strength:1", [0]).apply(
            lxy.LoraAxis("strength:2", [0]).apply(base, 0), 0), names, "sd1")
        assert zero is None


def test_bad_axes_and_settings_say_what_is_wrong(setup):
    host, ckpt, state, a, b = setup
    plot = lxy.LoraPlot(ckpt, [LoraInput(a), LoraInput(b)])
    for kind, values, words in [("strength", "1", "strength:N"), ("strength:1:clip", "1", "unet or te"),
                                ("colour", "1", "unknown axis kind"), ("density", "1.5", "between 0 and 1"),
                                ("rank", "0", "at least 1"), ("rank", "2.5", "whole numbers"),
                                ("mode", "blend", "unknown merge mode"), ("strength:1", "", "no values")]:
        with pytest.raises(InputError, match=words):
            lxy.LoraAxis(kind, values)
    with pytest.raises(InputError, match="names LoRA 3"):
        lxy.run_lora_xy(host, plot, lxy.LoraAxis("strength:3", "1"), None, REQ)
    with pytest.raises(InputError, match="both set"):
        lxy.run_lora_xy(host, plot, lxy.LoraAxis("density", "1"), lxy.LoraAxis("density", "0.5"), REQ)
    with pytest.raises(InputError, match="DARE needs a density above 0"):
        lxy.run_lora_xy(host, plot, lxy.LoraAxis("mode", "dare_linear"), lxy.LoraAxis("density", "0"), REQ)
    with pytest.raises(MergeError, match="merge for mode = ties|equal ranks"):
        lxy.run_lora_xy(host, plot, lxy.LoraAxis("mode", "ties"), None, REQ)


def test_lora_of_another_architecture_is_refused_before_any_work(setup, tiny, tmp_path, merges):
    host, ckpt, state, a, b = setup
    xl = write_lora(tmp_path, "xl.safetensors", make_modules(tiny.state["sdxl_a"], "sdxl", [XL["to_k"]], seed=3), "sdxl")
    plot = lxy.LoraPlot(ckpt, [LoraInput(a), LoraInput(xl)])
    with pytest.raises(ArchitectureMismatchError, match="SDXL"):
        lxy.run_lora_xy(host, plot, lxy.LoraAxis("strength:1", "0, 1"), None, REQ)
    assert merges == [] and host.loaded is None


def test_cancel_stops_between_cells(setup):
    host, ckpt, state, a, b = setup
    plot = lxy.LoraPlot(ckpt, [LoraInput(a), LoraInput(b)])
    seen = []

    def progress(fraction, text):
        seen.append(text)
    with pytest.raises(CancelledError, match="after 1 of 3 cells"):
        lxy.run_lora_xy(host, plot, lxy.LoraAxis("strength:1", "0, 0.5, 1"), None, REQ, progress=progress,
                        cancel=lambda: any(t.startswith("Generating") for t in seen[:-1]))


def test_bake_into_host_writes_only_the_keys_asked_and_labels_the_model(setup):
    host, ckpt, state, a, b = setup
    r = bake_into_host(host, ckpt, [(a, 1.0)])
    assert host.loaded.name == "r1+a" and json.loads(host.loaded.recipe_json)["tool"] == "lora bake"
    live = live_state(host)
    for k in r.touched:
        assert not torch.equal(live[k], state[k].to(live[k].dtype))
    # a partial write over the same checkpoint rewrites just those keys from the checkpoint's own values
    with torch.no_grad():
        untouched = next(k for k in host.generator.module_targets() if k not in r.touched)
        host.generator.module_targets()[untouched].add_(1.0)
    bake_into_host(host, ckpt, [(b, 0.0)], keys=r.touched)
    live = live_state(host)
    for k in r.touched:
        assert torch.equal(live[k], state[k].to(live[k].dtype)), k
    assert torch.equal(live[untouched], state[untouched].to(live[untouched].dtype) + 1.0)   # not written


# ------------------------------------------------------------------------------ progress and Interrupt
def test_lora_operations_report_progress_and_stop_on_interrupt_leaving_no_file(setup, tmp_path):
    from lib_merge.lora.extract import extract
    from lib_merge.lora.merge import merge
    from lib_merge.lora.resize import resize
    from lib_merge.lora.svd import merge_svd
    host, ckpt, state, a, b = setup
    r2 = ckpt.with_name("r2.safetensors")
    jobs = {"merge": lambda out, **kw: merge([(a, 1.0), (b, 1.0)], out, **kw),
            "merge_svd": lambda out, **kw: merge_svd([(a, 1.0), (b, 1.0)], out, rank=2, **kw),
            "resize": lambda out, **kw: resize(a, out, rank=1, **kw),
            "extract": lambda out, **kw: extract(ckpt, r2, out, 2, **kw)}
    for name, job in jobs.items():
        steps = []
        job(tmp_path / f"{name}_ok.safetensors", progress=lambda i, n, key="": steps.append((i, n)))
        n = steps[0][1]
        assert n > 1 and steps[0][0] == 0 and steps[-1] == (n, n), name
        out = tmp_path / f"{name}_stopped.safetensors"
        calls = []

        def cancel():
            calls.append(1)
            return len(calls) > 2     # Interrupt pressed during the third module
        with pytest.raises(CancelledError, match="interrupted: nothing was written"):
            job(out, cancel=cancel)
        assert not out.exists() and not list(tmp_path.glob(f".{name}_stopped*")), name


# ---------------------------------------------------------------------------------------------- the tab
@pytest.fixture
def tab_setup(setup, tmp_path):
    """The Merge tab over the previewing host, with A and B in its LoRA folder."""
    pytest.importorskip("gradio")
    from lib_merge.ui.tab import make_tab
    host, ckpt, state, a, b = setup
    host.lora_dir = tmp_path / "Lora"
    host.lora_dir.mkdir()
    for p in (a, b):
        p.rename(host.lora_dir / p.name)
    return host, make_tab(host), state


def test_tab_runs_the_lora_plot_with_the_preview_settings(tab_setup):
    from test_lora_ui import form, text
    from test_ui import run
    host, tab, state = tab_setup
    tools = tab.lora_tools
    u = run(tools.on_xy_add(form(tools, lora_xy_add="a.safetensors", lora_xy_list="")))
    assert u["lora_xy_list"]["value"] == "a.safetensors:1"
    v = form(tools, lora_xy_ckpt="r1.safetensors", lora_xy_list="a.safetensors:1\nb.safetensors:0.5",
             lora_xy_x_kind="strength:2", lora_xy_x_values="0, 1", lora_xy_y_kind="mode",
             lora_xy_y_values="concat, svd_add", lora_xy_rank=0, prompt="a cat", gen_seed=3, steps=2, width=64,
             height=64)
    u = run(tools.on_xy(v))
    assert "merge-lab-ok" in u["lora_xy_status"], text(u, "lora_xy_status")
    assert "4 image(s) from 4 merge(s)" in text(u, "lora_xy_status")
    gallery = u["lora_xy_gallery"]["value"]
    assert [label for _, label in gallery] == ["grid", "b = 0 | concat", "b = 1 | concat", "b = 0 | svd_add",
                                               "b = 1 | svd_add"]
    assert gallery[1][0].size == (64, 64)
    # mistakes are told in the status line, before any work
    for changes, words in [(dict(lora_xy_ckpt=""), "Choose the checkpoint"),
                           (dict(lora_xy_x_kind="strength:5"), "names LoRA 5"),
                           (dict(lora_xy_list="../x.safetensors:1"), "not a LoRA name"),
                           (dict(lora_xy_lbw="1,2,3"), "3 block weights do not fit an SD1 LoRA")]:
        u = run(tools.on_xy({**v, **changes}))
        assert "merge-lab-error" in u["lora_xy_status"] and words in text(u, "lora_xy_status")


def test_tab_bakes_into_the_loaded_model_and_interrupt_is_heard(tab_setup):
    from test_lora_ui import form, text
    from test_ui import run
    host, tab, state = tab_setup
    tools = tab.lora_tools
    v = form(tools, lora_bake_ckpt="r1.safetensors", lora_bake_list="a.safetensors:0.5")
    u = run(tools.on_bake_live(v))
    assert "merge-lab-ok" in u["lora_bake_status"], text(u, "lora_bake_status")
    assert host.loaded.name == "r1+a" and "no file written" in text(u, "lora_bake_status")
    assert not list((host.output_dir()).glob("*.safetensors"))
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    live = host.generator.module_targets()[key]
    torch.testing.assert_close(live, bake(host.resolve_checkpoint("r1.safetensors"),
                                          [(host.lora_dir / "a.safetensors", 0.5)], None, dtype=None).state[key])
    u = tools.on_interrupt({})
    assert "Interrupting" in text(u, "lora_notice") and host.interrupted() and tools._xy_stop.is_set()


# ------------------------------------------------------------------------------------------------- API
@pytest.fixture
def client(tab_setup):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_merge.api import register_routes
    host, tab, state = tab_setup
    app = FastAPI()
    register_routes(app, host)
    return TestClient(app), host, state


def test_api_lists_describes_merges_and_bakes_loras(client):
    from lib_merge.api import PREFIX
    from lib_merge.lora import open_lora
    http, host, state = client
    assert http.get(PREFIX + "/lora/list").json()["loras"] == ["a.safetensors", "b.safetensors"]
    info = http.get(PREFIX + "/lora/info", params={"name": "b.safetensors"}).json()
    assert info["architecture"] == "sd1" and info["modules"] == 3
    r = http.get(PREFIX + "/lora/info", params={"name": "../r1.safetensors"})
    assert r.status_code == 400 and "not a LoRA name" in r.json()["message"]

    r = http.post(PREFIX + "/lora/merge", json={"loras": ["a.safetensors:1", {"name": "b.safetensors", "weight": 0.5}],
                                               "name": "ab", "mode": "concat"})
    assert r.status_code == 200, r.text
    with open_lora(host.lora_dir / "ab.safetensors") as lf:
        to_k = SD1["to_k"]
        with open_lora(host.lora_dir / "a.safetensors") as a, open_lora(host.lora_dir / "b.safetensors") as b:
            torch.testing.assert_close(lf.delta(to_k), a.delta(to_k) + 0.5 * b.delta(to_k), rtol=1e-3, atol=1e-4)
    r = http.post(PREFIX + "/lora/merge", json={"loras": ["a.safetensors", "b.safetensors"], "name": "svd",
                                               "rank": 1, "where": "output", "dtype": "float32"})
    assert r.status_code == 200 and "at rank 1" in r.json()["message"]
    with open_lora(host.output_dir() / "svd.safetensors") as lf:
        assert {m.rank for m in lf.modules.values()} == {1}
    for body, words in [({"loras": ["a.safetensors", "b.safetensors"], "mode": "ties"}, "equal ranks"),
                        ({"loras": ["a.safetensors"], "name": "ab"}, "already exists"),
                        ({"loras": ["nope.safetensors"]}, "not in the LoRA folder"),
                        ({"loras": "a.safetensors"}, "as a list")]:
        r = http.post(PREFIX + "/lora/merge", json=body)
        assert r.status_code == 400 and words in r.json()["message"], (body, r.json())

    r = http.post(PREFIX + "/lora/bake", json={"checkpoint": "r1.safetensors", "loras": ["a.safetensors:0.5"],
                                              "name": "r1_a", "dtype": "float32"})
    assert r.status_code == 200, r.text
    baked = open_model(host.output_dir() / "r1_a.safetensors")
    want = bake(host.resolve_checkpoint("r1.safetensors"), [(host.lora_dir / "a.safetensors", 0.5)], None,
                dtype="float32").state
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(baked.read(key), want[key])
    baked.close()
    r = http.post(PREFIX + "/lora/bake", json={"checkpoint": "r1.safetensors", "loras": ["a.safetensors"], "live": True})
    assert r.status_code == 200 and r.json()["name"] == "r1+a" and host.loaded.name == "r1+a"
    r = http.post(PREFIX + "/lora/bake", json={"checkpoint": "r1.safetensors", "loras": ["a.safetensors"],
                                              "lbw": "1,0"})
    assert r.status_code == 400 and "block weights" in r.json()["message"]


def test_api_runs_a_lora_plot(client):
    import base64
    import io

    from PIL import Image

    from lib_merge.api import PREFIX
    http, host, state = client
    body = {"checkpoint": "r1.safetensors", "loras": ["a.safetensors", "b.safetensors"],
            "x": {"kind": "strength:1", "values": "0, 1"}, "y": None, "images": True,
            "generation": {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 5}}
    r = http.post(PREFIX + "/lora/xy", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["x_labels"] == ["a = 0", "a = 1"] and out["merges"] == 2 and len(out["images"]) == 2
    grid = Image.open(io.BytesIO(base64.b64decode(out["grid"])))
    assert grid.width >= 128 and "Seed: 5" in out["infotexts"][0]
    r = http.post(PREFIX + "/lora/xy", json={**body, "x": {"kind": "strength:9", "values": "1"}})
    assert r.status_code == 400 and "names LoRA 9" in r.json()["message"]


def test_api_resizes_and_extracts(client):
    from lib_merge.api import PREFIX
    from lib_merge.lora import open_lora
    http, host, state = client
    r = http.post(PREFIX + "/lora/resize", json={"lora": "b.safetensors", "rank": 1})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "b_r1.safetensors" and "ranks 1" in r.json()["message"]
    with open_lora(host.lora_dir / "b_r1.safetensors") as lf:
        assert {m.rank for m in lf.modules.values()} == {1}
    r = http.post(PREFIX + "/lora/resize", json={"lora": "b.safetensors"})
    assert r.status_code == 400 and "new rank or a dynamic rule" in r.json()["message"]
    r = http.post(PREFIX + "/lora/resize", json={"lora": "b.safetensors", "dynamic": "sv_nope:2"})
    assert r.status_code == 400
    r = http.post(PREFIX + "/lora/extract", json={"base": "r1.safetensors", "tuned": "r2.safetensors", "rank": 2,
                                                 "where": "output", "dtype": "float32"})
    assert r.status_code == 200, r.text
    out = host.output_dir() / "r2_extract_r2.safetensors"
    with open_lora(out) as lf:
        assert lf.family == "sd1" and {m.rank for m in lf.modules.values()} == {2}
    for body, words in [({"base": "r1.safetensors", "tuned": "r1.safetensors", "rank": 2}, "same file"),
                        ({"base": "r1.safetensors", "tuned": "r2.safetensors"}, "Give 'rank'"),
                        ({"base": "r1.safetensors", "tuned": "r2.safetensors", "rank": 2, "where": "output",
                          "name": "r2_extract_r2"}, "already exists")]:
        r = http.post(PREFIX + "/lora/extract", json=body)
        assert r.status_code == 400 and words in r.json()["message"], (body, r.json())


def test_sdxl_lora_plot_bakes_fused_qkv_rows_into_the_preview_model(tmp_path):
    """SDXL: the second text encoder's q/k/v modules land in their row thirds of the fused in_proj_weight of
    the live (diffusers) model, exactly as a bake to a state dict puts them; the plot runs on it."""
    from lib_merge.core.files import save_state_dict
    from lib_merge.host.standalone import StandaloneHost
    from lib_merge.preview.tiny import make_runnable_state_dict
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = make_runnable_state_dict("sdxl", seed=1)
        ckpt = save_state_dict(state, tmp_path / "xl.safetensors")
        lora = write_lora(tmp_path, "xl_lora.safetensors", make_modules(state, "sdxl", list(XL.values()), seed=3), "sdxl")
        host = StandaloneHost(tmp_path, tmp_path / "out")
        r = lxy.run_lora_xy(host, lxy.LoraPlot(ckpt, [LoraInput(lora)]), lxy.LoraAxis("strength:1", "0, 1"), None, REQ)
        assert len(r.images) == 2 and not np.array_equal(pixels(r.images[0]), pixels(r.images[1]))
        live = live_state(host)
        want = bake(ckpt, [(lora, 1.0)], None, dtype=None)
        fused = "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
        assert fused in want.touched and len(want.touched) == 5
        for k in want.touched:
            torch.testing.assert_close(live[k], want.state[k].to(live[k].dtype), rtol=1e-6, atol=1e-7)
        d = live[fused].shape[0] // 3
        assert torch.equal(live[fused][d:2 * d], state[fused][d:2 * d].to(live[fused].dtype))   # k rows: no module
    finally:
        torch.set_num_threads(old)
