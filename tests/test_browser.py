"""The standalone app in a real browser: headless Chromium (Debian's) driven by Playwright for Python.

Starts `python -m lib_merge ui` on a free port over a models folder holding two tiny SD1 checkpoints,
chooses them, sets α, presses Merge, names the file, presses Save, and checks the file and its recipe.
Skipped only when /usr/bin/chromium is missing and tools/browser.sh cannot install it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"]
SCREENSHOT_DIR = os.environ.get("MERGE_LAB_SCREENSHOTS")  # set it to keep the screenshots


def _chromium() -> str:
    if not Path(CHROMIUM).exists():
        subprocess.run(["bash", str(ROOT / "tools" / "browser.sh")], check=False)
    if not Path(CHROMIUM).exists():
        pytest.skip("no /usr/bin/chromium and tools/browser.sh could not install it (needs root and apt-get)")
    pytest.importorskip("playwright.sync_api")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(models: Path, tmp_path: Path):
    """The standalone app over a models folder on a free port; yields (url, output folder)."""
    out = tmp_path / "outputs"
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT),
           "MERGE_LAB_CACHE": str(tmp_path / "cache"), "NO_PROXY": "127.0.0.1,localhost"}
    log = open(tmp_path / "app.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "lib_merge", "ui", "--port", str(port), "--models-dir",
                             str(models), "--output-dir", str(out)], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the app did not start:\n{log.read()[-3000:]}")
            time.sleep(0.3)
        # the HTTP API is served beside the page
        with urllib.request.urlopen(url + "merge-lab/v1/methods", timeout=10) as r:
            assert any(m["name"] == "ties" for m in json.loads(r.read()))
        yield url, out
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _models_folder(tmp_path: Path, sources: dict[str, Path]) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    for name, source in sources.items():
        shutil.copy(source, models / f"{name}.safetensors")
    return models


@pytest.fixture
def app(tiny, tmp_path):
    """The standalone app serving a models folder with two tiny SD1 models; yields (url, output folder)."""
    with _serve(_models_folder(tmp_path, {n: tiny.path[n] for n in ("sd1_a", "sd1_b")}), tmp_path) as served:
        yield served


@pytest.fixture
def runnable_app(runnable_models, tmp_path):
    """The standalone app over the two runnable demo models r1, r2 (diffusers generates with them)."""
    sources = {n: runnable_models / f"{n}.safetensors" for n in ("r1", "r2")}
    with _serve(_models_folder(tmp_path, sources), tmp_path) as served:
        yield served


def _choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a gradio 3 dropdown."""
    page.click(f"#{elem_id} input")
    page.click(f"#{elem_id} ul.options li:has-text('{option}')")


def _el(page, elem_id: str):
    """An element by elem_id (gradio 3 repeats a Markdown's id on its inner div: take the outer one)."""
    return page.locator(f"#{elem_id}").first


def test_merge_and_save_in_the_browser(app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, out = app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(20000)
            page.goto(url)
            page.wait_for_selector("#merge_lab_merge")

            _choose(page, "merge_lab_model_a", "sd1_a.safetensors")
            _choose(page, "merge_lab_model_b", "sd1_b.safetensors")
            expect(_el(page, "merge_lab_models_info")).to_contain_text("SD1.x")

            alpha = page.locator("#merge_lab_p_weighted_sum_alpha input[type=number]")
            alpha.fill("0.3")
            alpha.press("Enter")
            expect(page.locator("#merge_lab_p_weighted_sum_alpha input[type=range]")).to_have_value("0.3")

            page.click("#merge_lab_merge")
            expect(_el(page, "merge_lab_status")).to_contain_text("into memory", timeout=30000)
            recipe_box = page.locator("#merge_lab_recipe textarea")
            expect(recipe_box).to_have_value(re.compile(r'"alpha": 0\.3\b'))
            expect(_el(page, "merge_lab_current")).to_contain_text("weighted_sum(sd1_a, sd1_b)")

            page.fill("#merge_lab_save_name textarea", "browser merge")
            page.click("#merge_lab_save")
            expect(_el(page, "merge_lab_status")).to_contain_text("Saved browser merge.safetensors",
                                                                     timeout=30000)
            if SCREENSHOT_DIR:
                Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(SCREENSHOT_DIR) / "merge_tab.png"), full_page=True)
            shown = json.loads(recipe_box.input_value())

            # a mistake is a message in the page, and nothing is written
            page.fill("#merge_lab_save_name textarea", "../escape")
            page.click("#merge_lab_save")
            expect(_el(page, "merge_lab_status")).to_contain_text("not a plain file name", timeout=30000)

            # a reload shows what the app has now: the merge in memory, the way back, the saved file offered
            page.reload()
            page.wait_for_selector("#merge_lab_merge")
            expect(_el(page, "merge_lab_current")).to_contain_text("weighted_sum(sd1_a, sd1_b)")
            expect(page.locator("#merge_lab_restore")).to_be_visible()
            page.click("#merge_lab_model_a input")
            expect(page.locator("#merge_lab_model_a ul.options")).to_contain_text("(output)/browser merge.safetensors")
        finally:
            browser.close()
    assert "undeclared outputs" not in (tmp_path / "app.log").read_text()

    from lib_merge.core.files import SafetensorsFile
    from lib_merge.engine.recipe import METADATA_KEY
    path = out / "browser merge.safetensors"
    assert sorted(p.name for p in out.iterdir()) == [path.name]
    with SafetensorsFile(path) as f:
        saved = json.loads(f.metadata[METADATA_KEY])
    assert saved["method"] == shown["method"] == "weighted_sum"
    assert saved["params"] == shown["params"] == {"alpha": 0.3}
    assert [m["name"] for m in saved["models"]] == ["sd1_a.safetensors", "sd1_b.safetensors"]
    assert [m["sha256"] for m in saved["models"]] == [m["sha256"] for m in shown["models"]]


SCORER = "def s(images, payloads, params):\n    return [-(params['alpha.M00'] - 0.25) ** 2] * len(images)\n"
PAYLOADS = "- prompt: a cat\n  seed: 7\n  steps: 2\n  width: 64\n  height: 64\n  sampler: Euler a\n"


def test_autombw_section_in_the_browser(runnable_app, tmp_path):
    """Load payloads from a file, set the space, budget and a plug-in scorer, Start, watch the run to its end
    (status, plots, the latest image), reload the page and Watch again, then Save best."""
    from playwright.sync_api import expect, sync_playwright

    url, out = runnable_app
    (tmp_path / "sc.py").write_text(SCORER)
    (tmp_path / "payloads.yaml").write_text(PAYLOADS)
    scorer = f"python:{tmp_path / 'sc.py'}:s"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(20000)
            page.goto(url)
            page.wait_for_selector("#merge_lab_merge")
            _choose(page, "merge_lab_model_a", "r1.safetensors")
            _choose(page, "merge_lab_model_b", "r2.safetensors")
            page.click("#merge_lab_autombw .label-wrap")
            status = _el(page, "merge_lab_am_status")

            page.set_input_files("#merge_lab_am_payload_file input[type=file]", str(tmp_path / "payloads.yaml"))
            expect(status).to_contain_text("Loaded 1 payload(s).")
            expect(page.locator("#merge_lab_am_payloads")).to_contain_text("a cat")

            page.fill("#merge_lab_am_blocks textarea", "M00 IN04")
            page.fill("#merge_lab_am_trials input", "3")
            page.press("#merge_lab_am_trials input", "Tab")
            page.fill("#merge_lab_am_scorer input", scorer)
            page.press("#merge_lab_am_scorer input", "Enter")
            page.click("#merge_lab_am_start")
            expect(status).to_contain_text("3 of 3 trials done", timeout=180000)
            expect(status).to_contain_text("Run done")
            expect(page.locator("#merge_lab_am_config")).to_contain_text('"name": "autombw"')  # (CodeMirror draws only the top lines)
            expect(page.locator("#merge_lab_am_gallery img").first).to_be_visible()
            expect(page.locator("#merge_lab_am_convergence img")).to_be_visible()

            # a reloaded page shows the run again on Watch
            page.reload()
            page.wait_for_selector("#merge_lab_merge")
            page.click("#merge_lab_autombw .label-wrap")
            page.click("#merge_lab_am_watch")
            expect(_el(page, "merge_lab_am_status")).to_contain_text("3 of 3 trials done")
            if SCREENSHOT_DIR:
                Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(SCREENSHOT_DIR) / "autombw.png"), full_page=True)

            page.fill("#merge_lab_am_save_name textarea", "browser_best")
            page.click("#merge_lab_am_save")
            expect(_el(page, "merge_lab_am_status")).to_contain_text("Saved browser_best.safetensors",
                                                                        timeout=60000)
        finally:
            browser.close()

    (log_file,) = out.rglob("trials.jsonl")
    run = log_file.parent
    trials = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [t["trial"] for t in trials] == [0, 1, 2]
    assert all(set(t["params"]) == {"alpha.M00", "alpha.IN04"} for t in trials)
    for t in trials:   # the plug-in scorer's formula, by hand
        assert t["score"] == pytest.approx(-(t["params"]["alpha.M00"] - 0.25) ** 2)
    config = json.loads((run / "config.json").read_text())
    assert [(sc["name"], sc["kind"]) for sc in config["scorer"]] == [(scorer, "python")]
    assert config["payloads"][0]["prompt"] == "a cat" and config["payloads"][0]["width"] == 64
    best = json.loads((run / "best.json").read_text())
    assert best["score"] == max(t["score"] for t in trials)
    from lib_merge.core.files import SafetensorsFile
    from lib_merge.engine.recipe import METADATA_KEY
    with SafetensorsFile(out / "browser_best.safetensors") as f:
        saved = json.loads(f.metadata[METADATA_KEY])
    assert saved["method"] == "weighted_sum"
    from lib_merge.core.arch import block_names
    assert saved["blocks"]["alpha"][block_names("sd1").index("M00")] == pytest.approx(best["params"]["alpha.M00"])
