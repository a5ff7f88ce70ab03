"""The HTTP API (/merge-lab/v1/) over a standalone host: JSON in, JSON out, errors as 400 with a message."""
import json
import shutil

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors import safe_open

from lib_merge.api import PREFIX, register_routes
from lib_merge.host.standalone import StandaloneHost
from lib_merge.methods import METHODS


@pytest.fixture
def api(tiny, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("sd1_a", "sd1_b", "sd1_c", "sdxl_a"):
        shutil.copy(tiny.path[name], models / f"{name}.safetensors")
    host = StandaloneHost(models, tmp_path / "out")
    app = FastAPI()
    register_routes(app, host)
    return TestClient(app), host, tmp_path / "out"


def test_methods_models_and_status(api):
    client, host, _ = api
    methods = client.get(PREFIX + "/methods").json()
    assert [m["name"] for m in methods] == list(METHODS)
    ties = next(m for m in methods if m["name"] == "ties")
    assert ties["base"] == "required" and {p["name"] for p in ties["params"]} == {"density", "election", "lambda"}
    assert client.get(PREFIX + "/models").json()["models"] == ["sd1_a.safetensors", "sd1_b.safetensors",
                                                               "sd1_c.safetensors", "sdxl_a.safetensors"]
    assert client.get(PREFIX + "/status").json()["loaded"] is None


def test_merge_to_memory_save_and_restore(api):
    client, host, out = api
    body = {"method": "weighted_sum", "models": ["sd1_a.safetensors", "sd1_b.safetensors"],
            "params": {"alpha": 0.3}, "blocks": {"alpha": [0.0] + [1.0] * 12 + [0.0] * 13}}
    r = client.post(PREFIX + "/merge", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["ok"] and answer["name"] == "weighted_sum(sd1_a, sd1_b)" and len(answer["short_hash"]) == 10
    status = client.get(PREFIX + "/status").json()
    assert status["loaded"]["short_hash"] == answer["short_hash"]
    assert json.loads(status["loaded"]["recipe"])["params"]["alpha"] == 0.3
    # save the same merge by its recipe
    r = client.post(PREFIX + "/save", json={"recipe": json.loads(answer["recipe"]), "name": "api_merge"})
    assert r.status_code == 200, r.text
    saved = out / "api_merge.safetensors"
    with safe_open(str(saved), "pt") as f:
        recipe = json.loads(f.metadata()["merge_lab_recipe"])
    assert recipe["blocks"]["alpha"] == body["blocks"]["alpha"]
    # the overwrite guard
    r = client.post(PREFIX + "/save", json={"recipe": json.loads(answer["recipe"]), "name": "api_merge"})
    assert r.status_code == 400 and "already exists" in r.json()["message"]
    assert client.post(PREFIX + "/restore").json()["ok"]
    assert client.get(PREFIX + "/status").json()["loaded"] is None


@pytest.mark.parametrize("body,words", [
    ({"method": "weighted_sum", "models": ["sd1_a.safetensors", "sdxl_a.safetensors"]}, "SD1.x"),
    ({"method": "weighted_sum", "models": ["sd1_a.safetensors", "missing.safetensors"]}, "Unknown model"),
    ({"method": "weighted_sum", "models": ["sd1_a.safetensors", "../sd1_b.safetensors"]}, "Unknown model"),
    ({"method": "no_such", "models": ["sd1_a.safetensors", "sd1_b.safetensors"]}, "Unknown merge method"),
    ({"method": "weighted_sum", "models": ["sd1_a.safetensors", "sd1_b.safetensors"], "params": {"alpha": 9}},
     "outside its range"),
    ({"method": "ties", "models": ["sd1_a.safetensors", "sd1_b.safetensors"]}, "needs a base model"),
    ({"models": "sd1_a"}, "list of checkpoint names"),
])
def test_bad_requests_change_nothing(api, body, words):
    client, host, out = api
    client.post(PREFIX + "/merge", json={"method": "weighted_sum", "models": ["sd1_a.safetensors", "sd1_b.safetensors"]})
    before = client.get(PREFIX + "/status").json()
    r = client.post(PREFIX + "/merge", json=body)
    assert r.status_code == 400 and words in r.json()["message"] and not r.json()["ok"]
    assert client.get(PREFIX + "/status").json() == before, "the loaded merge is unchanged"
    r = client.post(PREFIX + "/save", json={**body, "name": "x"})
    assert r.status_code == 400
    assert not out.exists() or list(out.iterdir()) == []


def test_save_name_must_stay_in_the_output_folder(api):
    client, host, out = api
    body = {"method": "weighted_sum", "models": ["sd1_a.safetensors", "sd1_b.safetensors"]}
    for name in ("../escape", "/abs/path", "a/b", ""):
        r = client.post(PREFIX + "/save", json={**body, "name": name})
        assert r.status_code == 400, name
    assert not (out.parent / "escape.safetensors").exists()


def test_generate_needs_a_merge_loaded(api):
    client, host, _ = api
    r = client.post(PREFIX + "/generate", json={"prompt": "a cat", "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 400 and "Merge first" in r.json()["message"]
    r = client.post(PREFIX + "/generate", json={"prompt": "a cat", "colour": "blue"})
    assert r.status_code == 400 and "Unknown generation field" in r.json()["message"]
