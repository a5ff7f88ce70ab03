"""The "LoRA tools" section of the Merge tab (lib_merge/ui/lora_tab.py): built inside the tab over a StandaloneHost
with tiny checkpoints and tiny kohya LoRAs; its handlers called directly, as the browser would."""
from __future__ import annotations

import html
import os
from pathlib import Path

import pytest
import torch

gr = pytest.importorskip("gradio")

from test_lora_merge import SD1, hand_delta, make_modules  # noqa: E402  (tests/ is on sys.path under pytest)
from test_ui import run  # noqa: E402  (a handler's updates, streaming ones merged)

from lib_merge.core.files import open_model  # noqa: E402
from lib_merge.host.standalone import StandaloneHost  # noqa: E402
from lib_merge.lora import open_lora, save_kohya  # noqa: E402
from lib_merge.lora.actions import lora_path  # noqa: E402
from lib_merge.lora.merge import RECIPE_KEY  # noqa: E402
from lib_merge.ui.lora_tab import LoraTools  # noqa: E402
from lib_merge.ui.tab import make_tab  # noqa: E402

NAMES = [SD1["to_k"], SD1["proj_in"], SD1["conv"], SD1["te_q"]]


@pytest.fixture
def setup(tiny, tmp_path):
    models = tmp_path / "models"
    lora_dir = models / "Lora"
    (lora_dir / "sub").mkdir(parents=True)
    for name in ("sd1_a", "sd1_b"):
        os.symlink(tiny.path[name], models / f"{name}.safetensors")
    state = tiny.state["sd1_a"]
    mods = {"one": make_modules(state, "sd1", NAMES, rank=2, seed=1),
            "two": make_modules(state, "sd1", NAMES[:3], rank=3, seed=2)}
    save_kohya(mods["one"], lora_dir / "one.safetensors", {"ss_tag_frequency": '{"d": {"red hair": 5, "cat": 2}}',
                                                           "ss_network_dim": "2"},
               family="sd1", dtype=torch.float32)
    save_kohya(mods["two"], lora_dir / "sub" / "two.safetensors", family="sd1", dtype=torch.float32)
    host = StandaloneHost(models, tmp_path / "outputs", generate=False)
    tab = make_tab(host)
    return host, tab, mods




def form(tools: LoraTools, **changes) -> dict:
    v = tools.values()
    v.update(changes)
    return v


def text(u: dict, name: str) -> str:
    x = u[name]
    return html.unescape(x["value"] if isinstance(x, dict) else x)


def files(*folders: Path) -> list[Path]:
    return sorted(p for f in folders if f.exists() for p in f.rglob("*") if p.is_file())


def test_section_is_built_in_the_tab_with_the_lora_and_checkpoint_lists(setup):
    host, tab, _ = setup
    tools = tab.lora_tools
    lists = {n: [c[1] if isinstance(c, (tuple, list)) else c for c in tools.c[n].choices]
             for n in ("lora_info_name", "lora_merge_add", "lora_bake_ckpt")}
    assert lists["lora_info_name"] == lists["lora_merge_add"] == ["one.safetensors", "sub/two.safetensors"]
    assert lists["lora_bake_ckpt"] == ["sd1_a.safetensors", "sd1_b.safetensors"]
    from lib_merge.ui.form import GENERATION_FIELDS
    from lib_merge.ui.tab import PAGE_FIELDS
    assert all(n.startswith("lora_") or n in GENERATION_FIELDS or n in PAGE_FIELDS for n in tools.c)
    assert all(tools.c[n] is tab.c[n] for n in GENERATION_FIELDS)   # the plot reads the tab's preview widgets
    assert all(tools.c[n] is tab.c[n] for n in PAGE_FIELDS)         # its jobs update the tab's current merge line
    # labels the WebUI would save in ui-config.json do not clash with the tab's (nor with each other)
    labels = [tools.c[n].label for n in tools.fields if n not in GENERATION_FIELDS] + [
        tab.c[n].label for n in tab.fields
        if getattr(tab.c[n], "label", None) and not getattr(tab.c[n], "do_not_save_to_config", False)]
    assert len(labels) == len(set(labels)), sorted(lab for lab in labels if labels.count(lab) > 1)


def test_info_shows_format_architecture_ranks_and_tags(setup):
    host, tab, _ = setup
    tools = tab.lora_tools
    u = tools.on_info(form(tools, lora_info_name="one.safetensors"))
    md = text(u, "lora_info")
    assert "kohya" in md and "SD1.x" in md
    assert "| unet | 3 | 2 |" in md and "| te | 1 | 2 |" in md
    assert "red hair (5), cat (2)" in md and "ss\\_network\\_dim" in md   # escaped for Markdown: shown as written
    assert "⚠" in text(tools.on_info(form(tools, lora_info_name="../one.safetensors")), "lora_info")


def test_merge_concat_writes_the_weighted_sum(setup):
    host, tab, mods = setup
    tools = tab.lora_tools
    v = form(tools, lora_merge_list="one.safetensors:0.7\nsub/two.safetensors:-0.5", lora_merge_mode="concat",
             lora_merge_name="mix", lora_dtype="float32")
    u = run(tools.on_merge(v))
    assert "merge-lab-ok" in u["lora_merge_status"], text(u, "lora_merge_status")
    out = host.lora_dir / "mix.safetensors"
    assert out.is_file() and "mix.safetensors" in u["lora_info_name"]["choices"]
    with open_lora(out) as lf:
        assert set(lf.modules) == set(NAMES)
        for name in NAMES:
            want = 0.7 * hand_delta(mods["one"][name])
            if name in mods["two"]:
                want = want - 0.5 * hand_delta(mods["two"][name])
            torch.testing.assert_close(lf.delta(name), want.reshape(lf.delta(name).shape), rtol=1e-5, atol=1e-6)
        assert RECIPE_KEY in lf.metadata   # the recipe of the merge
    # the same name again is refused without the overwrite box
    again = run(tools.on_merge(v))
    assert "already exists" in text(again, "lora_merge_status")


def test_merge_add_button_appends_a_line(setup):
    host, tab, _ = setup
    tools = tab.lora_tools
    u = tools.on_merge_add(form(tools, lora_merge_add="sub/two.safetensors", lora_merge_list="one.safetensors:1"))
    assert u["lora_merge_list"]["value"] == "one.safetensors:1\nsub/two.safetensors:1"
    assert tools.on_merge_add(form(tools, lora_merge_add=None)) == {}


@pytest.mark.parametrize("changes, message", [
    (dict(lora_merge_list="../x.safetensors:1"), "not a LoRA name"),
    (dict(lora_merge_list="sub/../../x.safetensors:1"), "not a LoRA name"),
    (dict(lora_merge_list="/etc/passwd:1"), "not a LoRA name"),
    (dict(lora_merge_list="missing.safetensors:1"), "is not in the LoRA folder"),
    (dict(lora_merge_list=""), "at least one LoRA"),
    (dict(lora_merge_list="one.safetensors:1", lora_merge_name="../evil"), "not a plain file name"),
    (dict(lora_merge_list="one.safetensors:1", lora_merge_name="one"), "Refusing to write over an input"),
    (dict(lora_merge_list="one.safetensors:1\nsub/two.safetensors:1", lora_merge_mode="ties"), "equal ranks"),
])
def test_bad_merge_inputs_give_messages_and_write_nothing(setup, changes, message):
    host, tab, _ = setup
    tools = tab.lora_tools
    before = files(host.models_dir, host.output_folder)
    u = run(tools.on_merge(form(tools, **{"lora_merge_name": "out", **changes})))
    assert "merge-lab-error" in u["lora_merge_status"] and message in text(u, "lora_merge_status")
    assert files(host.models_dir, host.output_folder) == before


def test_lora_path_stays_inside_the_folder(setup):
    host = setup[0]
    assert lora_path(host, "sub/two.safetensors") == host.lora_dir / "sub" / "two.safetensors"
    from lib_merge.core.errors import InputError
    with pytest.raises(InputError, match="Choose a LoRA"):
        lora_path(host, "")
    for bad in ("../sd1_a.safetensors", "..\\sd1_a.safetensors", "/abs.safetensors", "C:x.safetensors"):
        with pytest.raises(InputError, match=r"is not a LoRA name: give a file in the LoRA folder"):
            lora_path(host, bad)


def test_svd_merge_writes_the_requested_rank_to_the_output_folder(setup):
    host, tab, _ = setup
    tools = tab.lora_tools
    v = form(tools, lora_merge_list="one.safetensors:1\nsub/two.safetensors:1", lora_merge_mode="svd_add",
             lora_merge_rank=1, lora_merge_name="svd", lora_where="output folder")
    u = run(tools.on_merge(v))
    assert "merge-lab-ok" in u["lora_merge_status"], text(u, "lora_merge_status")
    with open_lora(host.output_folder / "svd.safetensors") as lf:
        assert {m.rank for m in lf.modules.values()} == {1}


def test_resize_and_extract(setup):
    host, tab, _ = setup
    tools = tab.lora_tools
    u = run(tools.on_resize(form(tools, lora_resize_name="sub/two.safetensors", lora_resize_rank=1)))
    assert "merge-lab-ok" in u["lora_resize_status"], text(u, "lora_resize_status")
    with open_lora(host.lora_dir / "two_r1.safetensors") as lf:
        assert {m.rank for m in lf.modules.values()} == {1}
    bad = run(tools.on_resize(form(tools, lora_resize_name="one.safetensors", lora_resize_rule="sv_fro:2")))
    assert "merge-lab-error" in bad["lora_resize_status"] and "fraction" in text(bad, "lora_resize_status")

    u = run(tools.on_extract(form(tools, lora_extract_base="sd1_a.safetensors",
                                  lora_extract_tuned="sd1_b.safetensors", lora_extract_rank=2)))
    assert "merge-lab-ok" in u["lora_extract_status"], text(u, "lora_extract_status")
    with open_lora(host.lora_dir / "sd1_b_extract_r2.safetensors") as lf:
        assert lf.family == "sd1" and {m.rank for m in lf.modules.values()} <= {1, 2}
    same = run(tools.on_extract(form(tools, lora_extract_base="sd1_a.safetensors",
                                     lora_extract_tuned="sd1_a.safetensors")))
    assert "same file" in text(same, "lora_extract_status")


def test_bake_writes_a_checkpoint_with_the_lora_added(setup, tiny):
    host, tab, mods = setup
    tools = tab.lora_tools
    v = form(tools, lora_bake_ckpt="sd1_a.safetensors", lora_bake_list="one.safetensors:0.5",
             lora_bake_out="baked", lora_dtype="float32")
    u = run(tools.on_bake(v))
    assert "merge-lab-ok" in u["lora_bake_status"], text(u, "lora_bake_status")
    out = host.output_folder / "baked.safetensors"
    from lib_merge.lora import keys as K
    key = K.module_map("sd1")[SD1["to_k"]].key
    with open_model(out) as mf:
        got = mf.read(key)
        assert RECIPE_KEY in mf.metadata
    want = tiny.state["sd1_a"][key] + 0.5 * hand_delta(mods["one"][SD1["to_k"]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a baked checkpoint is offered at once (from the output folder); LoRAs written there are not
    assert "(output)/baked.safetensors" in host.list_checkpoints()
    assert not [n for n in host.list_checkpoints() if n.startswith("(output)/") and "lora" in n.lower()]

    # LBW: a preset fills the text; a text that does not fit is told before any work
    assert tools.on_bake_preset(form(tools, lora_bake_preset="INS"))["lora_bake_lbw"]["value"] == "INS"
    before = files(host.output_folder)
    bad = run(tools.on_bake(form(tools, lora_bake_ckpt="sd1_a.safetensors", lora_bake_list="one.safetensors:1",
                                 lora_bake_lbw="1,0,1", lora_bake_out="lbw")))
    assert "merge-lab-error" in bad["lora_bake_status"] and "block weights" in text(bad, "lora_bake_status")
    assert files(host.output_folder) == before
    ok = run(tools.on_bake(form(tools, lora_bake_ckpt="sd1_a.safetensors", lora_bake_list="one.safetensors:1",
                                lora_bake_lbw="NONE", lora_bake_out="none", lora_dtype="float32")))
    assert "merge-lab-ok" in ok["lora_bake_status"], text(ok, "lora_bake_status")
    with open_model(host.output_folder / "none.safetensors") as mf:
        torch.testing.assert_close(mf.read(key), tiny.state["sd1_a"][key])   # every block at 0: unchanged


def test_every_lora_event_runs_through_gradio_with_the_initial_values(setup):
    import inspect
    host, tab, _ = setup
    tools = tab.lora_tools
    blocks = tab.blocks
    ours = set(map(id, tools.c.values()))
    ran = 0
    for dep, fn in zip(blocks.dependencies, blocks.fns):
        outs = [blocks.blocks[i] for i in dep["outputs"]]
        if not outs or id(outs[0]) not in ours:
            continue
        inputs = [blocks.blocks[i] for i in dep["inputs"]]
        result = fn.fn({c: c.value for c in inputs}) if inputs else fn.fn()
        for out in (list(result) if inspect.isgenerator(result) else [result]):
            assert isinstance(out, dict) and out and set(out) <= set(outs), fn.name
        ran += 1
    assert ran >= 9


def test_lora_tools_in_the_browser(setup, tmp_path):
    """The section in the running app (headless Chromium): Info shows the architecture, Merge LoRAs writes a
    file, a name with '..' is told in the status line."""
    import subprocess
    import sys
    import time
    import urllib.request

    from test_browser import CHROMIUM_ARGS, ROOT, _choose, _chromium, _free_port
    chromium = _chromium()
    from playwright.sync_api import sync_playwright
    host = setup[0]
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT),
           "MERGE_LAB_CACHE": str(tmp_path / "cache"), "NO_PROXY": "127.0.0.1,localhost"}
    log = open(tmp_path / "app.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "lib_merge", "ui", "--port", str(port), "--models-dir",
                             str(host.models_dir), "--output-dir", str(host.output_folder)], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"the app did not start:\n{log.read()[-3000:]}")
                time.sleep(0.3)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(url)
            page.click("#merge_lab_lora_tools >> text=LoRA tools")
            _choose(page, "merge_lab_lora_info_name", "one.safetensors")
            page.wait_for_function("document.querySelector('#merge_lab_lora_info').innerText.includes('SD1.x')",
                                   timeout=20000)
            page.click("button:has-text('Merge LoRAs')")
            page.fill("#merge_lab_lora_merge_list textarea", "one.safetensors:0.5\nsub/two.safetensors:1")
            page.fill("#merge_lab_lora_merge_name textarea", "from_browser")
            page.click("#merge_lab_lora_merge_run")
            status = "document.querySelector('#merge_lab_lora_merge_status').innerText"
            page.wait_for_function(f"{status}.includes('Wrote')", timeout=30000)
            page.fill("#merge_lab_lora_merge_list textarea", "../sd1_a.safetensors:1")
            page.click("#merge_lab_lora_merge_run")
            page.wait_for_function(f"{status}.includes('not a LoRA name')", timeout=30000)
            browser.close()
        assert (host.lora_dir / "from_browser.safetensors").is_file()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_interrupt_stops_a_bake_and_writes_nothing(setup, monkeypatch):
    host, tab, mods = setup
    tools = tab.lora_tools
    seen = []

    def progress(fraction, text=""):
        seen.append(fraction)
        tab.on_interrupt({})   # the user presses the tab's Interrupt while the bake runs

    monkeypatch.setattr(host, "progress", progress)
    u = run(tools.on_bake(form(tools, lora_bake_ckpt="sd1_a.safetensors", lora_bake_list="one.safetensors:1",
                               lora_bake_out="stopped")))
    assert seen and "merge-lab-error" in u["lora_bake_status"] and "interrupted" in text(u, "lora_bake_status")
    assert not (host.output_folder / "stopped.safetensors").exists()
