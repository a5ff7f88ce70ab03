"""Merge Lab inside a real AUTOMATIC1111 WebUI 1.10.x (skipped unless WEBUI_DIR points at one).

The test links this repository into WEBUI_DIR/extensions, starts the WebUI on 127.0.0.1 with its API,
checks the Merge tab and our routes, merges two checkpoints into memory, generates a 64x64 two-step image
and reads its infotext, restores the original model, and stops the WebUI. See docs/WEBUI_TEST.md.

Environment: WEBUI_DIR (required); WEBUI_PYTHON (default WEBUI_DIR/venv/bin/python); WEBUI_ARGS (extra
launch.py arguments); WEBUI_MODELS ("a.safetensors,b.safetensors": two SD checkpoints of one family the
WebUI lists; default: the first two it lists). The WebUI's own environment variables (HF_HOME, offline
flags) are passed through.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.imagereward_fixture import imagereward_folder  # noqa: F401  (a pytest fixture)

ROOT = Path(__file__).resolve().parents[1]
WEBUI_DIR = os.environ.get("WEBUI_DIR")
pytestmark = pytest.mark.skipif(not WEBUI_DIR, reason="set WEBUI_DIR to an A1111 1.10.x checkout with its venv")

DEFAULT_ARGS = ("--skip-torch-cuda-test --skip-install --skip-version-check --use-cpu all --no-half "
                "--precision full --no-download-sd-model --api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebUI:
    def __init__(self, folder: Path, log: Path, extra_args: tuple[str, ...] = ()):
        import httpx
        self.folder, self.log_path = folder, log
        self.port = _free_port()
        self.link = folder / "extensions" / "merge-lab-under-test"
        python = os.environ.get("WEBUI_PYTHON") or str(folder / "venv" / "bin" / "python")
        args = shlex.split(os.environ.get("WEBUI_ARGS", DEFAULT_ARGS))
        self.cmd = [python, "launch.py", *args, *extra_args, "--port", str(self.port)]
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=600)
        self.proc = None
        self.python = python

    def start(self, timeout: float = 420) -> None:
        if not self.link.exists():
            self.link.symlink_to(ROOT, target_is_directory=True)
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=self.folder, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        # no request before "Startup time:": the WebUI dies if a request arrives while it adds its API
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if self.proc.poll() is not None:
                pytest.fail(f"the WebUI exited:\n{text[-4000:]}")
            if "Startup time:" in text:
                return
            time.sleep(1)
        pytest.fail(f"the WebUI did not start in {timeout} s:\n{self.log_path.read_text(errors='replace')[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.link.is_symlink():
            self.link.unlink()

    def txt2img(self, with_image: bool = False):
        r = self.http.post("/sdapi/v1/txt2img", json=GENERATION)
        assert r.status_code == 200, r.text[-2000:]
        body = r.json()
        assert body["images"], "no image came back"
        info = json.loads(body["info"])
        return (info, body["images"][0]) if with_image else info


def pixels(b64: str) -> bytes:
    """An API image's pixels (the WebUI's PNGs carry the infotext, which differs between models)."""
    import base64
    import io

    from PIL import Image
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes()


GENERATION = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler"}
LORA_MODULES = ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
                "lora_unet_mid_block_attentions_0_proj_out",
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj")


def _make_sd1_lora(path: Path) -> Path:
    """A rank-4 kohya LoRA with three SD1 modules at their real shapes (from the key table, not a file)."""
    import torch

    from lib_merge.core.keysets import checkpoint_keys
    from lib_merge.lora import keys as K, save_kohya
    shapes = {k.key: tuple(k.shape) for k in checkpoint_keys("sd1")}
    g = torch.Generator().manual_seed(0)
    modules = {}
    for name in LORA_MODULES:
        shape = shapes[K.module_map("sd1")[name].key]
        out, inn = shape[0], shape[1]
        down = torch.randn(4, inn, *shape[2:], generator=g) * 0.5
        up = torch.randn(out, 4, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.5
        modules[name] = (down, up, 4.0)
    return save_kohya(modules, path, family="sd1")


def _freeze(python: str) -> dict[str, str]:
    p = subprocess.run([python, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    return {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
            for line in p.stdout.splitlines() if "==" in line}


def test_install_py_keeps_the_webui_venv_consistent():
    """install.py run as the WebUI runs it (its venv's python, the WebUI on PYTHONPATH): whatever it adds,
    no package the WebUI had moves (timm alone may, for ImageReward), `pip check` stays clean, and the
    ImageReward files our scorer loads are there. Installs from the package index when something is missing."""
    folder = Path(WEBUI_DIR)
    python = os.environ.get("WEBUI_PYTHON") or str(folder / "venv" / "bin" / "python")
    before = _freeze(python)
    env = dict(os.environ, PYTHONPATH=f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run([python, str(ROOT / "install.py")], cwd=folder, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "could not install" not in p.stdout, p.stdout
    after = _freeze(python)
    moved = {n: (v, after.get(n)) for n, v in before.items() if after.get(n) != v and n != "timm"}
    assert not moved, f"install.py changed the WebUI's packages: {moved}"
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for dist in ("image-reward", "bayesian-optimization", "cma", "pyyaml", "matplotlib"):
        assert dist in after, f"{dist} is not installed in the WebUI's venv"


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("loras")
    _make_sd1_lora(lora_dir / "merge_lab_test.safetensors")
    ui = WebUI(Path(WEBUI_DIR), tmp_path_factory.mktemp("webui") / "webui.log", ("--lora-dir", str(lora_dir)))
    try:
        ui.start()
        yield ui
    finally:
        ui.stop()


def test_tab_routes_merge_generate_restore(webui):
    http = webui.http
    config = http.get("/config").json()
    labels = [c.get("props", {}).get("label") for c in config["components"]]
    elem_ids = [c.get("props", {}).get("elem_id") for c in config["components"]]
    assert any(e and "merge_lab_tab" in e for e in elem_ids) and "Merge" in labels, "the Merge tab is registered"
    # the tab refreshes what it shows about the WebUI on every page load (its Blocks' load event, rendered in)
    current = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "merge_lab_current")
    assert any(d.get("trigger") == "load" and current in d["outputs"] for d in config["dependencies"])

    methods = http.get("/merge-lab/v1/methods").json()
    assert {"weighted_sum", "ties", "geometric_median"} <= {m["name"] for m in methods}
    listed = http.get("/merge-lab/v1/models").json()["models"]
    wanted = os.environ.get("WEBUI_MODELS")
    a, b = wanted.split(",") if wanted else listed[:2]
    a_title = next(t for t in listed if t.startswith(a))
    b_title = next(t for t in listed if t.startswith(b))

    before = webui.txt2img()
    original_model = before["sd_model_name"]

    # bad input: a clear 400, the loaded model unchanged
    r = http.post("/merge-lab/v1/merge", json={"method": "weighted_sum", "models": [a_title, "../../etc/passwd"]})
    assert r.status_code == 400 and "not in the WebUI's list" in r.json()["message"]
    r = http.post("/merge-lab/v1/merge", json={"method": "no_such_method", "models": [a_title, b_title]})
    assert r.status_code == 400 and "Unknown merge method" in r.json()["message"]
    assert http.get("/merge-lab/v1/status").json()["loaded"] is None

    r = http.post("/merge-lab/v1/merge", json={"method": "weighted_sum", "models": [a_title, b_title],
                                               "params": {"alpha": 0.5}})
    assert r.status_code == 200, r.text
    merged = r.json()
    assert merged["ok"], merged["message"]

    info = webui.txt2img()
    assert info["sd_model_name"] == merged["name"], "the infotext names the merge, not model A"
    assert info["sd_model_hash"] == merged["short_hash"]
    text = info["infotexts"][0]
    assert f"Model hash: {merged['short_hash']}" in text and "Merge Lab recipe:" in text
    assert json.loads(merged["recipe"])["method"] == "weighted_sum"

    # our own generate route (the tab's Generate button): the WebUI's pipeline, the recipe in the infotext
    r = http.post("/merge-lab/v1/generate", json={"prompt": "a cat", "steps": 2, "width": 64, "height": 64,
                                                  "seed": 1, "sampler_name": "Euler"})
    assert r.status_code == 200, r.text[-2000:]
    generated = r.json()
    assert len(generated["images"]) == 1 and generated["images"][0]
    text = generated["infotexts"][0]   # the WebUI quotes values that hold commas
    assert "Merge Lab recipe:" in text and f'Model: "{merged["name"]}"' in text

    # a slider change re-merges only the changed tensors into the WebUI's model (with room for the terms)
    assert http.post("/sdapi/v1/options", json={"merge_lab_cache_mb": 12000}).status_code == 200
    body = {"method": "weighted_sum", "models": [a_title, b_title], "params": {"alpha": 0.5}}
    assert http.post("/merge-lab/v1/merge", json=body).json()["ok"]          # keeps the terms this time
    body["blocks"] = {"alpha": [0.5] * 5 + [0.9] + [0.5] * 20}                  # IN04 only
    remerged = http.post("/merge-lab/v1/merge", json=body).json()
    assert remerged["ok"] and "tensors rewritten" in remerged["message"], remerged
    rewritten = int(remerged["message"].split(" tensors rewritten")[0].rsplit("(", 1)[1])
    assert 0 < rewritten < 100
    assert webui.txt2img()["sd_model_hash"] == remerged["short_hash"]

    r = http.post("/merge-lab/v1/restore")
    assert r.status_code == 200 and r.json()["ok"]
    after = webui.txt2img()
    assert after["sd_model_name"] == original_model
    assert "Merge Lab recipe" not in after["infotexts"][0]


def test_lora_bake_into_the_model_and_lora_xy_plot(webui):
    """LoRA tools in the WebUI: bake a LoRA into the loaded model (no file), then a LoRA XY plot whose
    strength-0 cell is the bare checkpoint (the same pixels as our own preview of it), then restore."""
    http = webui.http
    assert http.get("/merge-lab/v1/lora/list").json()["loras"] == ["merge_lab_test.safetensors"]
    info = http.get("/merge-lab/v1/lora/info", params={"name": "merge_lab_test.safetensors"}).json()
    assert info["architecture"] == "sd1" and info["modules"] == 3
    before, before_image = webui.txt2img(with_image=True)
    listed = http.get("/merge-lab/v1/models").json()["models"]
    loaded = next(t for t in listed if t.startswith(before["sd_model_name"]))

    # the WebUI's own Lora extension applies the LoRA from the prompt and keeps a backup of the weights it found
    r = http.post("/sdapi/v1/txt2img", json={**GENERATION, "prompt": "a cat <lora:merge_lab_test:1>"})
    assert r.status_code == 200, r.text[-2000:]
    with_prompt_lora = pixels(r.json()["images"][0])
    assert with_prompt_lora != pixels(before_image), "the LoRA changes the image"

    r = http.post("/merge-lab/v1/lora/bake", json={"checkpoint": loaded, "loras": ["merge_lab_test.safetensors:1"],
                                                   "live": True})
    assert r.status_code == 200, r.text
    baked = r.json()
    assert baked["keys_changed"] == 3
    # a prompt without <lora:...>: the extension must not copy its stale backup over the baked weights
    info, image = webui.txt2img(with_image=True)
    assert info["sd_model_name"] == baked["name"] and info["sd_model_hash"] == baked["short_hash"]
    assert "Merge Lab recipe:" in info["infotexts"][0] and pixels(image) != pixels(before_image)

    body = {"checkpoint": loaded, "loras": ["merge_lab_test.safetensors"], "images": True,
            "x": {"kind": "strength:1", "values": "0, 1"}, "y": None,
            "generation": {k: v for k, v in GENERATION.items()}}
    r = http.post("/merge-lab/v1/lora/xy", json=body)
    assert r.status_code == 200, r.text[-2000:]
    plot = r.json()
    assert plot["x_labels"] == ["merge_lab_test = 0", "merge_lab_test = 1"] and len(plot["images"]) == 2
    assert pixels(plot["images"][0]) != pixels(plot["images"][1])
    assert "merge_lab_test = 1" in plot["infotexts"][1]

    assert http.post("/merge-lab/v1/restore").json()["ok"]
    r = http.post("/merge-lab/v1/generate", json=body["generation"])
    assert r.status_code == 200, r.text[-2000:]
    assert pixels(r.json()["images"][0]) == pixels(plot["images"][0]) == pixels(before_image), \
        "strength 0 is the bare checkpoint"
    after = webui.txt2img()
    assert after["sd_model_name"] == before["sd_model_name"] and "Merge Lab recipe" not in after["infotexts"][0]


def test_autombw_run_through_the_api_in_the_webui(webui, imagereward_folder):  # noqa: F811
    """A short AutoMBW run in the real WebUI over our API: two searched blocks, three trials, each a re-merge
    into the WebUI's model, a 64x64 two-step image from its pipeline and a score from ImageReward's own code
    (a randomly initialised model, built offline); then the run folder, the best merge loaded, and restore."""
    http = webui.http
    listed = http.get("/merge-lab/v1/models").json()["models"]
    wanted = os.environ.get("WEBUI_MODELS")
    names = wanted.split(",") if wanted else listed[:2]
    models = [next(t for t in listed if t.startswith(n)) for n in names]
    original = webui.txt2img()["sd_model_name"]
    config = {"name": "webui-test", "models": models, "space": {"alpha": ["M00", "IN04"]},
              "optimizer": {"name": "bayes", "seed": 0, "init_points": 2}, "budget": {"trials": 3},
              "payloads": [{k: v for k, v in GENERATION.items()}],
              "scorer": {"name": "imagereward", "model": str(imagereward_folder), "sigmoid": True}}
    bad = http.post("/merge-lab/v1/optimize/start", json={**config, "space": {"alpha": ["IN99"]}})
    assert bad.status_code == 400 and "IN99" in bad.json()["message"]
    log_from = len(webui.log_path.read_text(errors="replace"))
    r = http.post("/merge-lab/v1/optimize/start", json=config)
    assert r.status_code == 200 and r.json()["ok"], r.text
    run = r.json()["run"]
    deadline = time.monotonic() + 900
    while True:
        status = http.get("/merge-lab/v1/optimize/status", params={"run": run}).json()
        if status["state"] in ("done", "stopped", "failed") or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert status["state"] == "done" and status["trials"] == 3 and status["failed"] == 0, status

    folder = Path(status["folder"])
    assert folder.parent == Path(WEBUI_DIR) / "models" / "Stable-diffusion" / "autombw" and folder.name == run
    try:
        rows = [json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines()]
        assert [r["trial"] for r in rows] == [0, 1, 2] and all(r["status"] == "ok" for r in rows), rows
        for row in rows:
            assert set(row["params"]) == {"alpha.M00", "alpha.IN04"}
            assert all(0 <= v <= 1 for v in row["params"].values())
            raw = row["raw"]["imagereward"]
            assert len(raw) == 1 and math.isfinite(raw[0]) and 0 < raw[0] < 1 and row["score"] == raw[0]
            assert all((folder / image).is_file() for image in row["images"])
        best = json.loads((folder / "best.json").read_text())
        top = max(rows, key=lambda r: r["score"])
        assert best["trial"] == top["trial"] and best["score"] == top["score"] and best["params"] == top["params"]
        assert (folder / "convergence.png").is_file() and (folder / "blocks.png").is_file()

        # the run ends with the best merge in the WebUI's model (finish: apply), the next image names it
        loaded = http.get("/merge-lab/v1/status").json()["loaded"]
        assert loaded is not None and json.loads(loaded["recipe"])["blocks"] == best["recipe"]["blocks"]
        assert webui.txt2img()["sd_model_hash"] == loaded["short_hash"]
        assert http.post("/merge-lab/v1/restore").json()["ok"]
        assert webui.txt2img()["sd_model_name"] == original
        assert "Traceback" not in webui.log_path.read_text(errors="replace")[log_from:]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_merge_lab_axes_in_the_webuis_xyz_plot(webui):
    """The WebUI's own X/Y/Z plot with the "Merge Lab: α" axis: each cell re-merges the loaded merge inside the
    plot's job (no deadlock on the queue lock), the images differ and their infotexts carry each cell's recipe."""
    http = webui.http
    listed = http.get("/merge-lab/v1/models").json()["models"]
    wanted = os.environ.get("WEBUI_MODELS")
    a, b = [next(t for t in listed if t.startswith(n)) for n in (wanted.split(",") if wanted else listed[:2])]
    assert http.post("/merge-lab/v1/merge", json={"method": "weighted_sum", "models": [a, b],
                                                  "params": {"alpha": 0.5}}).json()["ok"]
    axes = http.get("/merge-lab/v1/xyz-axes").json()["axes"]
    assert set(axes) == {"Merge Lab: α", "Merge Lab: block weights preset", "Merge Lab: model B"}
    script_args = [axes["Merge Lab: α"], "0.2, 0.8", [], 0, "", [], 0, "", [],
                   True, True, False, False, False, False, False, 0, False]
    r = http.post("/sdapi/v1/txt2img", json={**GENERATION, "script_name": "x/y/z plot", "script_args": script_args})
    assert r.status_code == 200, r.text[-2000:]
    body = r.json()
    info = json.loads(body["info"])
    cells = [t for t in info["infotexts"] if "Merge Lab recipe:" in t]
    from lib_merge.engine.recipe import recipe_from_text
    alphas = [recipe_from_text(text).params["alpha"] for text in cells]
    assert 0.2 in alphas and 0.8 in alphas, info["infotexts"]
    images = [pixels(im) for im in body["images"]]
    assert len(set(images)) >= 2, "the cells differ"
    loaded = http.get("/merge-lab/v1/status").json()["loaded"]
    assert json.loads(loaded["recipe"])["params"]["alpha"] == 0.8     # the last cell's merge stays loaded
    assert http.post("/merge-lab/v1/restore").json()["ok"]


def test_the_webuis_api_auth_guards_our_routes(tmp_path):
    """With --api-auth, our routes answer 401 without the login and 200 with it, as the WebUI's own do."""
    ui = WebUI(Path(WEBUI_DIR), tmp_path / "webui_auth.log", ("--api-auth", "merge:secret"))
    try:
        ui.start()
        for path in ("/merge-lab/v1/methods", "/merge-lab/v1/status", "/sdapi/v1/sd-models"):
            assert ui.http.get(path).status_code == 401, path
            assert ui.http.get(path, auth=("merge", "wrong")).status_code == 401, path
            assert ui.http.get(path, auth=("merge", "secret")).status_code == 200, path
        r = ui.http.post("/merge-lab/v1/merge", json={"method": "weighted_sum", "models": []})
        assert r.status_code == 401
    finally:
        ui.stop()
