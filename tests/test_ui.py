"""The Merge tab on gradio 3.41: construction from the method specs, and its handlers called directly
(as the browser would, with {field: value} dicts) over a StandaloneHost and the tiny checkpoints."""
from __future__ import annotations

import html
import json
import os
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from lib_merge import session  # noqa: E402
from lib_merge.core.arch import block_names  # noqa: E402
from lib_merge.core.errors import InputError  # noqa: E402
from lib_merge.core.files import SafetensorsFile  # noqa: E402
from lib_merge.core.generation import GenerationResult  # noqa: E402
from lib_merge.core.weights import format_blocks, preset  # noqa: E402
from lib_merge.engine.recipe import METADATA_KEY, Recipe  # noqa: E402
from lib_merge.host.standalone import StandaloneHost  # noqa: E402
from lib_merge.methods import METHODS, Choice  # noqa: E402
from lib_merge.ui import form as F  # noqa: E402
from lib_merge.ui.tab import build_tab, make_tab  # noqa: E402

MODELS = ("sd1_a", "sd1_b", "sd1_c", "sdxl_a", "sdxl_b")


@pytest.fixture
def host(tiny, tmp_path) -> StandaloneHost:
    models = tmp_path / "models"
    (models / "xl").mkdir(parents=True)
    for name in MODELS:
        target = models / ("xl" if name.startswith("sdxl") else "") / f"{name}.safetensors"
        os.symlink(tiny.path[name], target)
    return StandaloneHost(models, tmp_path / "outputs", generate=False)  # previews: tests/test_standalone_generation.py


@pytest.fixture
def tab(host):
    return make_tab(host)


def apply(values: dict, updates: dict) -> dict:
    """What the browser does with a handler's updates: new values replace the old ones."""
    for name, u in updates.items():
        if isinstance(u, dict) and "__type__" in u:
            if "value" in u:
                values[name] = u["value"]
        elif name in values:
            values[name] = u
    return values


def run(updates) -> dict:
    """A handler's updates; for a generator (streaming progress) every yield, later ones winning."""
    if isinstance(updates, dict):
        return updates
    out: dict = {}
    for u in updates:
        out.update(u)
    return out


def form(tab, **changes) -> dict:
    """The tab's initial values with some fields changed; model A changes go through on_models."""
    v = tab.values()
    v.update({k.replace("__", ":"): x for k, x in changes.items()})
    apply(v, tab.on_method(v))
    return v


def status(u: dict) -> str:
    """The status line's text."""
    return html.unescape(u["status"])


def choices(widget) -> list:
    """A widget's choice values (gradio 3.41 keeps (label, value) pairs)."""
    return [c[1] if isinstance(c, (tuple, list)) else c for c in widget.choices]


def outputs(host) -> list[Path]:
    folder = host.output_folder
    return sorted(folder.iterdir()) if folder.exists() else []


A, B, C = "sd1_a.safetensors", "sd1_b.safetensors", "sd1_c.safetensors"
XL_A, XL_B = "xl/sdxl_a.safetensors", "xl/sdxl_b.safetensors"


# --------------------------------------------------------------------------------- construction
def test_build_tab_returns_blocks_with_widgets_generated_from_the_specs(host):
    assert isinstance(build_tab(host), gr.Blocks)
    tab = make_tab(host)
    kinds = {float: (gr.Slider, gr.Number), int: (gr.Slider, gr.Number), bool: (gr.Checkbox,)}
    for spec in METHODS.values():
        assert f"group:{spec.name}" in tab.c
        for p in spec.params:
            widget = tab.c[F.param_field(spec.name, p.name)]
            if p.kind == "floats":
                assert isinstance(widget, gr.Textbox)
            elif isinstance(p.kind, Choice):
                assert isinstance(widget, (gr.Radio, gr.Dropdown)) and choices(widget) == list(p.kind.options)
            else:
                assert isinstance(widget, kinds[p.kind])
            if isinstance(widget, gr.Slider):
                assert (widget.minimum, widget.maximum) == tuple(p.range)
            if p.kind != "floats":
                assert widget.value == p.default
    # one slider per block name and bank; names follow arch.block_names
    for bank in range(F.BANKS):
        for b in block_names("sd1"):
            assert isinstance(tab.c[F.block_field(bank, b)], gr.Slider)
    assert set(block_names("sdxl")) <= set(F.ALL_BLOCKS) and len(F.ALL_BLOCKS) == 26
    assert choices(tab.c["model_a"]) == [A, B, C, XL_A, XL_B]


def test_labels_saved_in_the_webuis_ui_config_are_unique(tab):
    # the WebUI keys saved defaults by label: repeated labels (one per method or bank) must opt out
    labels = [tab.c[n].label for n in tab.fields
              if getattr(tab.c[n], "label", None) and not getattr(tab.c[n], "do_not_save_to_config", False)]
    assert len(labels) == len(set(labels)), sorted(lab for lab in labels if labels.count(lab) > 1)
    assert getattr(tab.c[F.param_field("add_difference", "alpha")], "do_not_save_to_config", False)


def test_every_wired_event_runs_through_gradio_with_the_initial_values(tab):
    """What gradio calls: dict inputs by component, dict outputs limited to the declared components, never
    an empty dict (gradio would read it as one value)."""
    import inspect
    blocks = tab.blocks
    assert len(blocks.fns) > 100
    for dep, fn in zip(blocks.dependencies, blocks.fns):
        inputs = [blocks.blocks[i] for i in dep["inputs"]]
        declared = {blocks.blocks[i] for i in dep["outputs"]}
        result = fn.fn({c: c.value for c in inputs}) if inputs else fn.fn()
        for out in (list(result) if inspect.isgenerator(result) else [result]):
            assert isinstance(out, dict) and out and set(out) <= declared, fn.name


def test_generation_widgets_only_where_the_host_can_generate(host, tiny, tmp_path):
    tab = make_tab(host)
    assert tab.c["gen_group"].visible is False and tab.c["gen_note"].visible is True

    class Painter(StandaloneHost):
        can_generate = True

        def generate(self, request):
            from PIL import Image
            return GenerationResult([Image.new("RGB", (8, 8))], [request.prompt])

    painter = Painter(host.models_dir, tmp_path / "out2")
    tab = make_tab(painter)
    assert tab.c["gen_group"].visible is True and tab.c["gen_note"].visible is False
    v = form(tab, model_a=A, model_b=B, prompt="a cat")
    u = run(tab.on_merge_generate(v))
    assert len(u.get("gallery", {}).get("value", [])) == 1 and "Generated 1 image" in u["status"], u["status"]
    assert painter.loaded is not None


# ----------------------------------------------------------------------------- method and models
def test_method_switch_shows_that_methods_widgets(tab):
    v = tab.values()
    u = tab.on_method({**v, "method": F.method_choice(METHODS["ties"])})
    assert u["group:ties"]["visible"] is True
    assert all(u[f"group:{m}"]["visible"] is False for m in METHODS if m != "ties")
    assert u["models_more"]["visible"] is True and u["model_c"]["visible"] is True
    assert u["base"]["visible"] is True and "required" in u["base"]["label"]
    assert u["bw_bank:0"]["visible"] is True and u["bw_bank:1"]["visible"] is False
    assert "λ" in u["bw_head:0"]["value"]
    # block sliders run 0..1 while the values fit (1.0 at the end), λ's whole range [-1, 3] once one does not
    assert (u[F.block_field(0, "IN05")]["minimum"], u[F.block_field(0, "IN05")]["maximum"]) == (0.0, 1.0)
    wide = tab.on_text({**v, "method": F.method_choice(METHODS["ties"]), F.bank_text_field(0): "IN*=2.5"}, 0)
    assert (wide[F.block_field(0, "IN05")]["minimum"], wide[F.block_field(0, "IN05")]["maximum"]) == (-1.0, 3.0)
    assert wide[F.block_field(0, "IN05")]["value"] == 2.5

    u = tab.on_method({**v, "method": F.method_choice(METHODS["sum_twice"])})
    assert u["bw_bank:1"]["visible"] is True and "β" in u["bw_head:1"]["value"]
    assert [line.get_label() for line in u["plot"].axes[0].get_lines()[:2]] == ["α (alpha)", "β (beta)"]
    assert u["models_more"]["visible"] is False and u["base"]["visible"] is False

    u = tab.on_method({**v, "method": F.method_choice(METHODS["dare_merge"])})
    assert "Ratio" in u["bw_head:0"]["value"] and u[F.block_field(0, "M00")]["maximum"] == 1.0
    assert u["model_c"]["visible"] is False

    u = tab.on_method({**v, "method": F.method_choice(METHODS["uniform_soup"])})
    assert u["mbw_note"]["visible"] is True and u["bw_bank:0"]["visible"] is False


def test_architecture_of_model_a_switches_26_and_20_sliders(tab):
    v = form(tab)
    v["model_a"] = XL_A
    u = tab.on_models(v)
    assert u["family"] == "sdxl" and "SDXL" in u["models_info"]["value"]
    for b in F.ALL_BLOCKS:
        assert u[F.block_field(0, b)]["visible"] is (b in block_names("sdxl"))
    assert len(u[F.bank_text_field(0)]["value"].split(",")) == 20
    apply(v, u)
    v["model_a"] = A
    u = tab.on_models(v)
    assert u["family"] == "sd1" and all(u[F.block_field(1, b)]["visible"] for b in F.ALL_BLOCKS)
    assert len(u[F.bank_text_field(1)]["value"].split(",")) == 26


def test_mismatched_architectures_are_shown_and_refused_without_writing(tab, host):
    v = form(tab, model_a=A, model_b=XL_B, save_name="never")
    info = tab.on_models(v)["models_info"]["value"]
    assert "different architectures" in info and "SD1.x" in info and "SDXL" in info
    for handler in (tab.on_merge, tab.on_save):
        u = run(handler(v))
        assert "merge-lab-error" in u["status"] and "SD1.x" in u["status"] and "SDXL" in u["status"]
    assert outputs(host) == [] and host.current_state is None and host.loaded is None


# ------------------------------------------------------------------------------------ block weights
def test_sliders_write_the_text_and_the_text_sets_the_sliders(tab):
    v = form(tab, model_a=A, model_b=B)
    v[F.block_field(0, "IN03")] = 0.2
    u = tab.on_slider(v, 0)
    values = u[F.bank_text_field(0)]["value"].split(",")
    assert len(values) == 26 and float(values[block_names("sd1").index("IN03")]) == 0.2

    v[F.bank_text_field(0)] = "IN*=0.3, M00=1"
    u = tab.on_text(v, 0)
    apply(v, u)
    assert all(v[F.block_field(0, f"IN{i:02d}")] == 0.3 for i in range(12))
    assert v[F.block_field(0, "M00")] == 1.0 and v[F.block_field(0, "OUT05")] == 0.5  # unlisted: α = 0.5
    assert u["plot"] is not None

    for bad in ("IN*=oops", "1,2,3", "NOPE=1", "IN*=9"):   # 9 is outside α's range
        v[F.bank_text_field(0)] = bad
        u = tab.on_text(v, 0)
        assert u["bw_msg:0"]["value"].startswith("⚠") and not any(k.startswith("bw:") for k in u)


def test_a_merge_reads_the_block_text_even_before_it_reached_the_sliders(tab):
    v = form(tab, model_a=A, model_b=B, mbw=True, **{"bw_text__0": "IN*=0.25, OUT*=0.75, BASE=0"})
    recipe = Recipe.from_json(run(tab.on_merge(v))["recipe"]["value"])
    names = block_names("sd1")
    assert recipe.blocks["alpha"][names.index("IN04")] == 0.25 and recipe.blocks["alpha"][names.index("M00")] == 0.5
    u = run(tab.on_merge({**v, "bw_text:0": "IN*=oops"}))
    assert "Block weights of α (alpha)" in status(u) and "merge-lab-error" in u["status"]
    # without block weights the text is not read at all
    assert "merge-lab-ok" in run(tab.on_merge({**v, "mbw": False, "bw_text:0": "IN*=oops"}))["status"]


def test_presets_fill_the_bank_for_the_architecture(tab):
    v = form(tab, model_a=A, model_b=B, **{"bw_preset__0": "GRAD_V"})
    u = tab.on_preset(v, 0)
    apply(v, u)
    assert F.bank_values(v, 0, "sd1") == preset("GRAD_V", "sd1")
    assert u[F.bank_text_field(0)]["value"] == format_blocks(preset("GRAD_V", "sd1"), "sd1")
    assert "GRAD_V" in u["bw_msg:0"]["value"]

    apply(v, tab.on_models({**v, "model_a": XL_A, "model_b": XL_B}))
    v.update(model_a=XL_A, model_b=XL_B, **{"bw_preset:0": "SMOOTHSTEP"})
    apply(v, tab.on_preset(v, 0))
    assert F.bank_values(v, 0, "sdxl") == preset("SMOOTHSTEP", "sdxl")
    assert tab.on_preset({**v, "bw_preset:0": None}, 0) == {}


def test_plot_is_a_matplotlib_figure(tab):
    import matplotlib.figure
    v = form(tab, method=F.method_choice(METHODS["sum_twice"]))
    fig = tab.on_plot(v)["plot"]
    assert isinstance(fig, matplotlib.figure.Figure)
    assert [line.get_label() for line in fig.axes[0].get_lines()[:2]] == ["α (alpha)", "β (beta)"]


# ------------------------------------------------------------------------------------ merge and save
def test_merge_to_memory_shows_the_recipe(tab, host):
    v = form(tab, model_a=A, model_b=B, **{"p__weighted_sum__alpha": 0.3})
    u = run(tab.on_merge(v))
    assert "merge-lab-ok" in u["status"], u["status"]
    recipe = Recipe.from_json(u["recipe"]["value"])
    assert recipe.method == "weighted_sum" and recipe.params["alpha"] == 0.3
    assert [m.name for m in recipe.models] == [A, B] and recipe.blocks == {}
    assert host.current_state and host.loaded.name == "weighted_sum(sd1_a, sd1_b)"
    assert host.loaded.short_hash in u["current"]["value"]
    assert outputs(host) == []  # into memory only

    u = tab.on_restore(v)
    assert host.current_state is None and host.loaded is None and "No merge" in u["current"]["value"]


def test_save_writes_a_file_whose_metadata_holds_the_recipe(tab, host):
    v = form(tab, model_a=A, model_b=B, mbw=True, save_name="my merge", dtype="float32")
    apply(v, tab.on_preset({**v, "bw_preset:0": "GRAD_V"}, 0))
    u = run(tab.on_save(v))
    assert "merge-lab-ok" in u["status"], u["status"]
    path = host.output_folder / "my merge.safetensors"
    assert outputs(host) == [path]
    with SafetensorsFile(path) as f:
        saved = Recipe.from_json(f.metadata[METADATA_KEY])
    shown = Recipe.from_json(u["recipe"]["value"])
    assert saved.blocks == shown.blocks == {"alpha": preset("GRAD_V", "sd1")}
    assert (saved.method, saved.params, saved.dtype) == (shown.method, shown.params, "float32")
    assert [m.sha256 for m in saved.models] == [m.sha256 for m in shown.models]

    # the overwrite guard: a second save needs the checkbox
    u = run(tab.on_save(v))
    assert "merge-lab-error" in u["status"] and "already exists" in u["status"]
    u = run(tab.on_save({**v, "overwrite": True}))
    assert "merge-lab-ok" in u["status"]


def test_a_merge_saved_into_the_models_folder_can_be_chosen_at_once(tiny, tmp_path):
    host = StandaloneHost(tmp_path / "models", tmp_path / "models" / "merged")
    host.models_dir.mkdir()
    for name in ("sd1_a", "sd1_b"):
        os.symlink(tiny.path[name], host.models_dir / f"{name}.safetensors")
    tab = make_tab(host)
    u = run(tab.on_save(form(tab, model_a=A, model_b=B, save_name="mix")))
    assert "merged/mix.safetensors" in u["model_a"]["choices"] and "merged/mix.safetensors" in u["base"]["choices"]


def test_save_without_a_name_makes_one(tab, host):
    v = form(tab, model_a=A, model_b=B)
    u = run(tab.on_save(v))
    assert u["save_name"]["value"] == "sd1_a_sd1_b_weighted_sum"
    assert (host.output_folder / "sd1_a_sd1_b_weighted_sum.safetensors").is_file()


@pytest.mark.parametrize("changes, message", [
    ({"model_b": "nope.safetensors"}, "Unknown model 'nope.safetensors'"),
    ({"model_b": "../sd1_b.safetensors"}, "Unknown model '../sd1_b.safetensors'"),
    ({"model_b": None}, "Choose model B"),
    ({"save_name": "../evil"}, "not a plain file name"),
    ({"save_name": "/tmp/evil"}, "not a plain file name"),
    ({"p:weighted_sum:alpha": 5.0}, "outside its range"),
    ({"seed": 1.5}, "seed must be a whole number"),
    ({"components": []}, "Tick at least one component"),
    ({"mask": "missing_mask.safetensors"}, "Mask file not found"),
])
def test_bad_inputs_give_messages_and_write_nothing(tab, host, changes, message):
    v = form(tab, model_a=A, model_b=B, save_name="out")
    v.update(changes)
    for handler in (tab.on_save, tab.on_merge) if "save_name" not in changes else (tab.on_save,):
        u = run(handler(v))
        assert "merge-lab-error" in u["status"] and message in status(u), status(u)
        assert "Traceback" not in u["status"]
    assert [p for p in outputs(host) if p.suffix == ".safetensors"] == []
    assert not (host.models_dir.parent / "evil.safetensors").exists() and host.current_state is None


def test_out_of_range_method_parameter_in_a_number_box(tab, host):
    v = form(tab, model_a=A, model_b=B, model_c=C, method=F.method_choice(METHODS["ties"]), base=C,
             **{"p__ties__lambda": 7.0})
    u = run(tab.on_merge(v))
    assert "lambda" in u["status"] and "outside its range" in u["status"]


def test_many_model_method_with_base_and_more_models(tab, host):
    v = form(tab, method=F.method_choice(METHODS["ties"]), model_a=A, model_b=B, model_c=F.NONE)
    u = run(tab.on_merge(v))
    assert "needs a base model" in u["status"]
    v.update(base=C, models_more=[C], mbw=True, **{"p:ties:density": 0.5})
    apply(v, tab.on_text({**v, F.bank_text_field(0): "OUT*=0.5"}, 0))
    u = run(tab.on_merge(v))
    assert "merge-lab-ok" in u["status"], u["status"]
    recipe = Recipe.from_json(u["recipe"]["value"])
    assert [m.name for m in recipe.models] == [A, B, C] and recipe.base.name == C
    assert recipe.params["density"] == 0.5 and recipe.blocks["lambda"][block_names("sd1").index("OUT03")] == 0.5
    info = tab.on_models(v)["models_info"]["value"]
    assert "**#3**" in info and "**#4**" not in info and "**Base**" in info   # C empty: the next model is #3


def test_unexpected_errors_become_a_message(tab, host, monkeypatch):
    def broken(host, recipe, device=None):
        raise RuntimeError("boom")
    monkeypatch.setattr(session, "merge_to_memory", broken)
    u = run(tab.on_merge(form(tab, model_a=A, model_b=B)))
    assert "merge-lab-error" in u["status"] and "Unexpected error: RuntimeError: boom" in u["status"]


def test_interrupt_stops_a_merge_and_loads_nothing(tab, host, monkeypatch):
    calls = []

    def progress(fraction, text=""):
        calls.append(fraction)
        tab.on_interrupt({})   # the user presses Interrupt while the merge runs

    monkeypatch.setattr(host, "progress", progress)
    u = run(tab.on_merge(form(tab, model_a=A, model_b=B)))
    assert calls and "merge-lab-error" in u["status"] and host.loaded is None
    monkeypatch.undo()
    u = run(tab.on_merge(form(tab, model_a=A, model_b=B)))   # the next merge starts afresh
    assert "merge-lab-ok" in u["status"]


def test_device_choice_reaches_the_session(tab, host, monkeypatch):
    seen = []

    def spy(h, recipe, device=None):
        seen.append(device)
        return session.MergeSummary(True, "ok")
    monkeypatch.setattr(session, "merge_to_memory", spy)
    run(tab.on_merge(form(tab, model_a=A, model_b=B, device="cpu")))
    assert seen == ["cpu"]


# ------------------------------------------------------------------------------------------ recipes
def test_load_recipe_fills_the_widgets_to_redo_the_merge(tab, host):
    v = form(tab, method=F.method_choice(METHODS["sum_twice"]), model_a=A, model_b=B, model_c=C, mbw=True,
             seed=7, compute_dtype="float64", **{"p__sum_twice__beta": 0.25})
    apply(v, tab.on_preset({**v, "bw_preset:1": "COSINE"}, 1))
    merged = run(tab.on_merge(v))
    text = merged["recipe"]["value"]

    fresh = make_tab(host)
    w = fresh.values()
    w["recipe"] = text
    u = fresh.on_load_recipe(w)
    assert "merge-lab-ok" in u["status"], u["status"]
    apply(w, u)
    assert u["group:sum_twice"]["visible"] is True and u["bw_bank:1"]["visible"] is True
    assert w["method"] == F.method_choice(METHODS["sum_twice"]) and w["model_c"] == C
    again = F.recipe_from_form(host, w, fresh.archs)
    original = Recipe.from_json(text)
    assert again.params == original.params and again.blocks == original.blocks
    assert (again.seed, again.compute_dtype) == (7, "float64")


def test_load_from_infotext_quoted_as_the_webui_writes_it(tab, host):
    merged = run(tab.on_merge(form(tab, model_a=A, model_b=B, **{"p__weighted_sum__alpha": 0.75})))
    compact = json.dumps(json.loads(merged["recipe"]["value"]))
    infotext = (f"a cat\nNegative prompt: blur\nSteps: 20, Sampler: Euler a, Seed: 1, Model: merged, "
                f"Merge Lab recipe: {json.dumps(compact)}, Version: v1.10.1")
    w = tab.values()
    w["infotext"] = infotext
    u = tab.on_load_infotext(w)
    assert "merge-lab-ok" in u["status"], u["status"]
    assert u["p:weighted_sum:alpha"]["value"] == 0.75 and u["model_b"]["value"] == B
    # unquoted, and the file's metadata form
    assert F.parse_recipe_text(f"Merge Lab recipe: {compact}").params["alpha"] == 0.75
    assert F.parse_recipe_text(json.dumps({METADATA_KEY: compact})).params["alpha"] == 0.75


@pytest.mark.parametrize("text, message", [
    ("", "Paste a recipe"),
    ("Steps: 20, Sampler: Euler a", "No Merge Lab recipe"),
    ('{"method": "nope", "models": ["a", "b"]}', "Unknown merge method"),
    ('{"method": "weighted_sum", "models": ["a", "b"], "params": {"alpha": 9}}', "outside its range"),
])
def test_bad_recipes_give_messages(tab, text, message):
    u = tab.on_load_recipe({**tab.values(), "recipe": text})
    assert "merge-lab-error" in u["status"] and message in u["status"], u["status"]


def test_recipe_with_unknown_models_loads_with_a_warning(tab):
    text = json.dumps({"method": "weighted_sum", "models": ["elsewhere.safetensors", A]})
    u = tab.on_load_recipe({**tab.values(), "recipe": text})
    assert "Not in the models folder: elsewhere.safetensors" in u["status"]
    assert u["model_a"]["value"] == "elsewhere.safetensors"


# --------------------------------------------------------------------------- masks and weight sets
def test_mask_and_weight_builders_feed_the_merge(tab, host):
    v = form(tab, model_a=A, model_b=B, mask_name="half", mask_probability=0.5)
    u = run(tab.on_make_mask(v))
    assert "merge-lab-ok" in u["status"], u["status"]
    assert u["mask"]["value"] == "half.safetensors"
    assert "half.safetensors" in u["mask"]["choices"]
    assert "already exists" in run(tab.on_make_mask(v))["status"]
    apply(v, u)

    v.update(weights_source="groups", weights_groups="input=0.2, output=0.8, base=0", weights_name="io")
    u = run(tab.on_make_weights(v))
    assert "merge-lab-ok" in u["status"], u["status"]
    assert u["weights"]["value"] == "io.json"
    apply(v, u)
    bad = run(tab.on_make_weights({**v, "weights_groups": "input", "weights_name": "x"}))
    assert "not NAME=number" in bad["status"]

    u = run(tab.on_merge(v))
    assert "merge-lab-ok" in u["status"], u["status"]
    recipe = Recipe.from_json(u["recipe"]["value"])
    assert recipe.mask.name == "half.safetensors" and recipe.layer_weights["param"] == "alpha"
    assert set(recipe.layer_weights["values"].values()) == {0.0, 0.2, 0.8}

    # builders need model A
    assert "Choose model A" in run(tab.on_make_mask({**v, "model_a": None, "mask_name": "y"}))["status"]


# ------------------------------------------------------------------------------- the standalone host
def test_standalone_host_lists_resolves_and_refuses(host, tmp_path):
    (host.models_dir / "Lora").mkdir()
    (host.models_dir / "Lora" / "style.safetensors").write_bytes(b"x")
    (host.models_dir / ".partial.safetensors").write_bytes(b"x")
    assert host.list_checkpoints(refresh=True) == [A, B, C, XL_A, XL_B]
    assert host.list_loras() == ["style.safetensors"]
    assert host.resolve_checkpoint(XL_A) == host.models_dir / "xl" / "sdxl_a.safetensors"
    assert host.resolve_checkpoint("sdxl_a.safetensors") == host.models_dir / "xl" / "sdxl_a.safetensors"
    for bad in ("nope.safetensors", "../outputs/x.safetensors", "/etc/passwd", "", "Lora/style.safetensors"):
        with pytest.raises(InputError):
            host.resolve_checkpoint(bad)
    assert host.search_dirs() == [host.models_dir]
    assert not host.output_folder.exists()
    assert host.output_dir().is_dir()           # created on demand
    assert host.has_live_model is False and host.can_generate is False


def test_empty_models_folder_offers_demo_models(tmp_path):
    host = StandaloneHost(tmp_path / "empty", tmp_path / "out")
    tab = make_tab(host)
    assert tab.c["demo_row"].visible is True and "No checkpoints" in tab.c["demo_text"].value
    u = tab.on_demo(tab.values())
    assert u["model_a"]["value"] == "demo_sd15_a.safetensors" and u["model_b"]["value"] == "demo_sd15_b.safetensors"
    assert u["demo_row"]["visible"] is False
    v = apply(tab.values(), u)
    assert "merge-lab-ok" in run(tab.on_merge(v))["status"]
    assert make_tab(host).c["demo_row"].visible is False


def test_refresh_picks_up_new_files(tab, host, tiny):
    os.symlink(tiny.path["sd2_a"], host.models_dir / "new.safetensors")
    u = tab.on_refresh(tab.values())
    assert "new.safetensors" in u["model_a"]["choices"] and u["base"]["choices"][0] == F.NONE


# ------------------------------------------------------------------------------------ the app entry
def test_cli_ui_subcommand_and_app_build(host):
    from lib_merge.cli import make_parser
    from lib_merge.ui.app import build_app, queue
    args = make_parser().parse_args(["ui", "--port", "7999", "--models-dir", "m", "--output-dir", "o"])
    assert (args.port, args.models_dir, args.output_dir, args.host) == (7999, "m", "o", "127.0.0.1")
    app = queue(build_app(host), 2)
    assert isinstance(app, gr.Blocks)
    assert any(getattr(b, "elem_id", None) == "merge_lab_merge" for b in app.blocks.values())


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_device_merges_the_same_bits(tab, host):
    assert "cuda" in choices(tab.c["device"])
    saved = {}
    for device in ("cpu", "cuda"):
        v = form(tab, model_a=A, model_b=B, device=device, save_name=device, dtype="float32")
        assert "merge-lab-ok" in run(tab.on_save(v))["status"]
        saved[device] = (host.output_folder / f"{device}.safetensors").read_bytes()
    assert saved["cpu"] == saved["cuda"]
