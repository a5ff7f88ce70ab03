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
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

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
    def __init__(self, folder: Path, log: Path):
        import httpx
        self.folder, self.log_path = folder, log
        self.port = _free_port()
        self.link = folder / "extensions" / "merge-lab-under-test"
        python = os.environ.get("WEBUI_PYTHON") or str(folder / "venv" / "bin" / "python")
        args = shlex.split(os.environ.get("WEBUI_ARGS", DEFAULT_ARGS))
        self.cmd = [python, "launch.py", *args, "--port", str(self.port)]
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=600)
        self.proc = None

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

    def txt2img(self) -> dict:
        r = self.http.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "width": 64, "height": 64,
                                                     "seed": 1, "sampler_name": "Euler"})
        assert r.status_code == 200, r.text[-2000:]
        body = r.json()
        assert body["images"], "no image came back"
        return json.loads(body["info"])


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    ui = WebUI(Path(WEBUI_DIR), tmp_path_factory.mktemp("webui") / "webui.log")
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
