"""What the page shows about the host is true at every moment: after a reload (the page-load event), after
every action of every section (the current-merge line, the restore button, the lists), and no handler
returns updates for outputs it did not declare (gradio drops them; we log them). Handlers are called the way
gradio calls them: the wired functions, with inputs keyed by component."""
from __future__ import annotations

import inspect
import json
import logging
import os

import pytest

gr = pytest.importorskip("gradio")

from lib_merge.host.standalone import StandaloneHost  # noqa: E402
from lib_merge.ui.tab import make_tab  # noqa: E402
from tests.test_ui import form, run  # noqa: E402

STRAY = "undeclared outputs"


def wired(tab, fn_name: str, section=None, **values):
    """Call the gradio function wired for handler `fn_name` (of `section`, default the tab) with the section's
    current values changed by `values` (field names, '__' for ':'); returns every update it yields, by name."""
    section = section or tab
    names = {id(c): n for n, c in section.c.items()}
    ours = set(names)
    blocks = tab.blocks
    for dep, fn in zip(blocks.dependencies, blocks.fns):
        outs = [blocks.blocks[i] for i in dep["outputs"]]
        if fn.name != fn_name or not outs or id(outs[0]) not in ours:
            continue
        wanted = {k.replace("__", ":"): x for k, x in values.items()}
        inputs = [blocks.blocks[i] for i in dep["inputs"]]
        data = {c: wanted.get(names.get(id(c)), c.value) for c in inputs}
        result = fn.fn(data) if inputs else fn.fn()
        outputs = list(result) if inspect.isgenerator(result) else [result]
        return [{names.get(id(c), c): u for c, u in out.items()} for out in outputs]
    raise AssertionError(f"{fn_name} is not wired")


def page_load(tab) -> dict:
    """The page-load event's updates (what a reload shows)."""
    blocks = tab.blocks
    names = {id(c): n for n, c in tab.c.items()}
    loads = [fn for dep, fn in zip(blocks.dependencies, blocks.fns) if dep["trigger"] == "load"]
    assert [fn.name for fn in loads] == ["on_page_load"]
    return {names[id(c)]: u for c, u in loads[0].fn().items()}


def last(updates: list[dict]) -> dict:
    out: dict = {}
    for u in updates:
        out.update(u)
    return out


def choice_values(update) -> list:
    return [c[1] if isinstance(c, (tuple, list)) else c for c in update["choices"]]


@pytest.fixture
def no_stray(caplog):
    caplog.set_level(logging.ERROR)
    yield
    assert STRAY not in caplog.text, caplog.text


def test_a_reload_after_demo_models_and_a_merge_shows_them(tmp_path, no_stray):
    host = StandaloneHost(tmp_path / "models", tmp_path / "out", generate=False)
    tab = make_tab(host)
    assert tab.c["demo_row"].visible and tab.c["model_a"].choices == []
    made = last(wired(tab, "on_demo"))
    assert "Created" in made["status"] and made["demo_row"]["visible"] is False

    # a reload: lists from the folder now, no demo offer, nothing merged yet, no restore button
    shown = page_load(tab)
    assert choice_values(shown["model_a"]) == host.list_checkpoints() and len(host.list_checkpoints()) == 2
    assert shown["demo_row"]["visible"] is False
    assert shown["current"]["value"] == "No merge in memory yet." and shown["restore"]["visible"] is False
    assert choice_values(shown["lora_bake_ckpt"]) == host.list_checkpoints()

    # a merge done elsewhere (the API, another tab): the reloaded page says so and offers the way back
    a, b = host.list_checkpoints()
    v = form(tab, model_a=a, model_b=b)
    assert run(tab.on_merge(v))["status"].count("merge-lab-ok") == 1
    shown = page_load(tab)
    assert shown["current"]["value"].startswith(f"Current merge: **{host.loaded.name}**")
    assert "WebUI" not in shown["current"]["value"]
    assert shown["restore"]["value"] == "Forget the merge" and shown["restore"]["visible"] is True
    dropped = last(wired(tab, "on_restore"))
    assert "dropped from memory" in dropped["status"] and dropped["restore"]["visible"] is False

    # Refresh lists refreshes the LoRA section's lists too
    import torch
    from safetensors.torch import save_file
    host.lora_dir.mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.zeros(1)}, str(host.lora_dir / "new.safetensors"))
    refreshed = last(wired(tab, "on_refresh"))
    assert choice_values(refreshed["lora_info_name"]) == ["new.safetensors"]
    assert choice_values(refreshed["lora_bake_ckpt"]) == host.list_checkpoints()


def test_a_saved_merge_is_offered_at_once_and_chains(tiny, tmp_path, no_stray):
    """A+B saved by the standalone app to its output folder, then (output)/AB + C, without moving a file."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("sd1_a", "sd1_b", "sd1_c"):
        os.symlink(tiny.path[name], models / f"{name}.safetensors")
    host = StandaloneHost(models, tmp_path / "out", generate=False)
    tab = make_tab(host)
    saved = last(wired(tab, "on_save", model_a="sd1_a.safetensors", model_b="sd1_b.safetensors", save_name="AB"))
    assert "merge-lab-ok" in saved["status"]
    assert "(output)/AB.safetensors" in choice_values(saved["model_a"])
    chained = last(wired(tab, "on_merge", model_a="(output)/AB.safetensors", model_b="sd1_c.safetensors"))
    assert "merge-lab-ok" in chained["status"], chained["status"]
    recipe = json.loads(host.loaded.recipe_json)
    assert [m["name"] for m in recipe["models"]] == ["(output)/AB.safetensors", "sd1_c.safetensors"]


def test_only_actions_that_write_a_model_rescan_the_model_folders(tiny, tmp_path, no_stray):
    """A merge into memory or a restore updates the current-merge line without listing the folders (in the
    WebUI a rescan of every checkpoint, after every slider's re-merge); a save lists them, with its file."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("sd1_a", "sd1_b"):
        os.symlink(tiny.path[name], models / f"{name}.safetensors")
    host = StandaloneHost(models, tmp_path / "out", generate=False)
    tab = make_tab(host)
    scans = []
    listing = host.list_checkpoints

    def counted(refresh=False):   # resolving a name reads the cached list; only refresh=True rescans
        if refresh:
            scans.append(refresh)
        return listing(refresh=refresh)
    host.list_checkpoints = counted
    merged = last(wired(tab, "on_merge", model_a="sd1_a.safetensors", model_b="sd1_b.safetensors"))
    assert "merge-lab-ok" in merged["status"] and "model_a" not in merged and scans == []
    assert merged["current"]["value"].startswith(f"Current merge: **{host.loaded.name}**")
    assert "model_a" not in last(wired(tab, "on_restore")) and scans == []
    saved = last(wired(tab, "on_save", model_a="sd1_a.safetensors", model_b="sd1_b.safetensors", save_name="AB"))
    assert "(output)/AB.safetensors" in choice_values(saved["model_a"]) and scans == [True]


def test_live_bake_and_lora_plot_update_the_current_merge_line(previewing_host, runnable_models, tmp_path, no_stray):
    """The LoRA section's actions that load something into the model update the tab's line and restore button
    (they used to leave 'No merge' showing while the bake was loaded)."""
    from lib_merge.lora.extract import extract
    loras = tmp_path / "loras"
    loras.mkdir()
    extract(runnable_models / "r1.safetensors", runnable_models / "r2.safetensors", loras / "d.safetensors", rank=2)
    host = StandaloneHost(runnable_models, tmp_path / "out", lora_dir=loras)
    tab = make_tab(host)
    tools = tab.lora_tools
    baked = last(wired(tab, "on_bake_live", tools, lora_bake_ckpt="r1.safetensors", lora_bake_list="d.safetensors:1"))
    assert "merge-lab-ok" in baked["lora_bake_status"], baked["lora_bake_status"]
    assert baked["current"]["value"].startswith(f"Current merge: **{host.loaded.name}**")
    assert baked["restore"]["visible"] is True and "Forget the merge undoes it" in baked["lora_bake_status"]
    assert last(wired(tab, "on_restore"))["current"]["value"] == "No merge in memory yet."

    plot = last(wired(tab, "on_xy", tools, lora_xy_ckpt="r1.safetensors", lora_xy_list="d.safetensors",
                      lora_xy_x_kind="strength:1", lora_xy_x_values="0, 1", prompt="a cat", steps=1, width=64,
                      height=64, gen_seed=1))
    assert "merge-lab-ok" in plot["lora_xy_status"], plot["lora_xy_status"]
    assert plot["current"]["value"] == tab.page_updates()["current"]["value"] != "No merge in memory yet."


def test_generate_shows_its_steps_and_interrupt_says_what_it_stops(previewing_host, no_stray):
    tab = make_tab(previewing_host)
    a, b = previewing_host.list_checkpoints()[:2]
    assert "merge-lab-ok" in run(tab.on_merge(form(tab, model_a=a, model_b=b)))["status"]
    v = form(tab, prompt="a cat", steps=40, width=64, height=64, gen_seed=1)
    shown, stopped = [], None
    for u in tab.on_generate(v):
        shown.append(u["status"])
        if "Step" in u["status"] and stopped is None:
            stopped = tab.on_interrupt({})["status"]
    assert any("<progress" in s and "Step " in s for s in shown), shown[-3:]
    assert "Interrupting: the image stops at its next step" in stopped
    assert "interrupted" in shown[-1].lower() and "gallery" not in u
    assert "Interrupting: the running job stops at its next step." in tab.on_interrupt({})["status"]  # none now


def test_the_xy_plot_offers_only_the_chosen_methods_parameters(tmp_path):
    tab = make_tab(StandaloneHost(tmp_path / "models", tmp_path / "out", generate=False))
    v = form(tab)
    u = tab.on_method({**v, "method": "ties", "xy_x_kind": "alpha", "xy_y_kind": "param:density"})
    x, y = u["xy_x_kind"], u["xy_y_kind"]
    blocks = [f"block:{b}" for b in ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"]
              + [f"OUT{i:02d}" for i in range(12)]]
    assert choice_values(x) == ["preset", "method", "model:A", "model:B", "model:C", "prompt", "seed", "recipe",
                                "param:density", "param:election", "param:lambda"] + blocks
    assert x["value"] == "preset" and y["value"] == "param:density"   # alpha is not TIES's: it falls back
    u = tab.on_method({**v, "method": "weighted_sum"})
    assert choice_values(u["xy_x_kind"]) == ["alpha", "preset", "method", "model:A", "model:B", "prompt", "seed",
                                             "recipe"] + blocks


def test_small_things_said_right(tmp_path):
    """The LoRA merge's default name follows its mode; sizes in the unit that suits them."""
    from lib_merge.core.files import human_size
    tab = make_tab(StandaloneHost(tmp_path / "models", tmp_path / "out", generate=False))
    assert tab.lora_tools.on_merge_mode({"lora_merge_mode": "ties"})["lora_merge_name"]["placeholder"] == "lora_merge_ties"
    assert tab.lora_tools.c["lora_merge_name"].placeholder == "lora_merge_concat"
    assert [human_size(n) for n in (31_000_000, 5 * 2**30, 2048, 10)] == ["29.56 MiB", "5.00 GiB", "2.00 KiB", "10 bytes"]


def test_metadata_and_names_are_shown_as_text_never_as_html():
    """A LoRA's metadata, tags and a model's name are data: escaped for the page's Markdown (no element, link or
    image can come from a file)."""
    from lib_merge.ui.form import ModelInfo
    from lib_merge.ui.jobs import plain
    from lib_merge.ui.lora_tab import info_markdown
    evil = '<img src=x onerror="alert(1)">'
    info = {"architecture": "sd1", "format": "kohya", "algorithms": ["lora"], "architecture_evidence": [],
            "modules": 1, "parameters": 8, "parts": {}, "metadata": {"ss_output_name": evil, "<b>k</b>": "[link](http://x)"},
            "top_tags": [(evil, 3)], "warnings": ["<script>x</script>"]}
    text = info_markdown(info)
    assert "<img" not in text and "<script>" not in text and "<b>" not in text and "](http" not in text
    assert "&lt;img src=x onerror=&quot;alert\\(1\\)&quot;&gt;" in text
    assert "<" not in ModelInfo(evil + ".safetensors", None, "broken", 0).line("A")
    assert plain("a_b*c") == "a\\_b\\*c"
