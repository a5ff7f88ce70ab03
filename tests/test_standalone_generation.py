"""Previews without the WebUI: merges go into diffusers modules, re-merges rewrite only what changed."""
import re

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_merge import session
from lib_merge.api import PREFIX, register_routes
from lib_merge.core.generation import GenerationRequest
from lib_merge.host.standalone import StandaloneHost


@pytest.fixture
def host(previewing_host):
    return previewing_host


def image(host, seed=1):
    g = session.generate(host, GenerationRequest(prompt="a cat", steps=3, width=64, height=64, seed=seed))
    assert g.ok, g.message
    return np.array(g.images[0]), g.infotexts[0]


def test_merge_generate_remerge_restore(host):
    assert host.can_generate and host.has_live_model
    r = session.recipe_from_names(host, "weighted_sum", ["r1.safetensors", "r2.safetensors"], params={"alpha": 0.3})
    s = session.merge_to_memory(host, r)
    assert s.ok and "1131 tensors rewritten" in s.message
    first, info = image(host)
    again, _ = image(host)
    assert first.shape == (64, 64, 3) and np.array_equal(first, again), "same seed, same image"
    assert f"Model hash: {s.short_hash}" in info and "Merge Lab recipe:" in info and '"path"' not in info
    # one block changes: only its tensors are rewritten, and the image changes
    blocks = [0.3] * 26
    blocks[5] = 1.0   # IN04
    r2 = session.recipe_from_names(host, "weighted_sum", ["r1.safetensors", "r2.safetensors"],
                                   params={"alpha": 0.3}, blocks={"alpha": blocks})
    s2 = session.merge_to_memory(host, r2)
    rewritten = int(re.search(r"\((\d+) tensors rewritten\)", s2.message).group(1))
    assert s2.ok and 0 < rewritten < 100
    second, _ = image(host)
    assert not np.array_equal(first, second), "a different merge gives a different image"
    # the re-merged modules equal a fresh full merge of the same recipe
    fresh = StandaloneHost(host.models_dir, host.output_folder)
    assert session.merge_to_memory(fresh, r2).ok
    assert np.array_equal(image(fresh)[0], second)
    assert session.restore(host).ok
    g = session.generate(host, GenerationRequest(prompt="a cat", steps=2, width=64, height=64))
    assert not g.ok and "Merge first" in g.message


def test_models_diffusers_cannot_run_merge_without_previews(tiny, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("sd1_a", "sd1_b"):
        (models / f"{name}.safetensors").symlink_to(tiny.path[name])
    host = StandaloneHost(models, tmp_path / "out")
    r = session.recipe_from_names(host, "weighted_sum", ["sd1_a.safetensors", "sd1_b.safetensors"])
    assert session.merge_to_memory(host, r).ok and host.current_state
    g = session.generate(host, GenerationRequest(prompt="x", steps=2, width=64, height=64))
    assert not g.ok and "cannot generate previews" in g.message


def test_api_merges_and_generates_standalone(host):
    app = FastAPI()
    register_routes(app, host)
    client = TestClient(app)
    r = client.post(PREFIX + "/merge", json={"method": "weighted_sum", "models": ["r1.safetensors", "r2.safetensors"]})
    assert r.status_code == 200, r.text
    r = client.post(PREFIX + "/generate", json={"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 1 and "Seed: 3" in body["infotexts"][0]


def test_live_remerge_memory_setting_from_the_flag_and_the_tab(runnable_models, tmp_path):
    """`ui --cache-mb 0`: nothing is kept and a re-merge reads only the changed tensors (with a note);
    the tab's field raises the budget and the next merge keeps the inputs in memory."""
    from lib_merge.ui.app import make_parser
    from lib_merge.ui.tab import make_tab
    args = make_parser().parse_args(["--cache-mb", "0"])
    host = StandaloneHost(runnable_models, tmp_path / "out", settings={"merge_lab_cache_mb": args.cache_mb})
    r = session.recipe_from_names(host, "weighted_sum", ["r1.safetensors", "r2.safetensors"], params={"alpha": 0.3})
    s = session.merge_to_memory(host, r)
    assert s.ok and any("budget" in w for w in s.warnings) and host.live_cache.kept_bytes == 0
    r.params["alpha"] = 0.6
    s = session.merge_to_memory(host, r)
    rewritten = int(re.search(r"\((\d+) tensors rewritten\)", s.message).group(1))
    assert 0 < rewritten < 1131   # the merged keys only (the VAE and position ids stay)
    tab = make_tab(host)
    v = {**tab.values(), "model_a": "r1.safetensors", "model_b": "r2.safetensors", "cache_mb": 1024, "seed": 5}
    u = list(tab.on_merge(v))[-1]
    assert "merge-lab-ok" in u["status"] and host.setting("merge_lab_cache_mb") == 1024
    assert host.live_cache.kept_bytes > 0 and not host.live_cache.note, (host.live_cache.note, u["status"])
