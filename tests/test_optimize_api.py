"""AutoMBW over the HTTP API of the standalone app: start, status, stop, resume, runs, ratings; and a run
driven from outside (`--webui URL` style, RemoteEvaluator) against that API."""
from __future__ import annotations

import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_merge.api import PREFIX, register_routes

SCORER = """
import time
def slow(images, payloads, params):
    time.sleep(0.3)
    return [-(params["alpha.M00"] - 0.7) ** 2] * len(images)
"""


@pytest.fixture
def api(previewing_host, tmp_path):
    (tmp_path / "sc.py").write_text(SCORER)
    app = FastAPI()
    register_routes(app, previewing_host)
    return TestClient(app), tmp_path


def config(tmp_path, trials=4, scorer=None):
    return {"name": "api", "models": ["r1.safetensors", "r2.safetensors"], "space": {"alpha": ["M00", "IN04"]},
            "optimizer": {"name": "random", "seed": 1}, "budget": {"trials": trials},
            "payloads": [{"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 2}],
            "scorer": scorer or f"python:{tmp_path / 'sc.py'}:slow"}


def wait(client, run, until=("done", "stopped", "failed"), timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = client.get(f"{PREFIX}/optimize/status", params={"run": run}).json()
        if s["state"] in until:
            return s
        time.sleep(0.1)
    raise AssertionError(f"run {run} did not reach {until}: {s}")


def test_start_status_stop_resume_and_runs(api):
    client, tmp_path = api
    r = client.post(f"{PREFIX}/optimize/start", json=config(tmp_path, trials=6))
    assert r.status_code == 200 and r.json()["ok"], r.json()
    run = r.json()["run"]
    again = client.post(f"{PREFIX}/optimize/start", json=config(tmp_path))
    assert again.status_code == 400 and "A run is going on" in again.json()["message"]
    # wait for two trials, then stop
    deadline = time.monotonic() + 120
    while client.get(f"{PREFIX}/optimize/status").json().get("trials", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    status = client.get(f"{PREFIX}/optimize/status").json()
    assert status["state"] == "running" and status["total"] == 6 and status["eta_seconds"] is not None
    assert client.post(f"{PREFIX}/optimize/stop").json()["ok"]
    stopped = wait(client, run)
    assert stopped["state"] == "stopped" and 2 <= stopped["trials"] < 6
    runs = client.get(f"{PREFIX}/optimize/runs").json()["runs"]
    assert runs[0]["run"] == run and runs[0]["resumable"] and runs[0]["state"] == "stopped"
    bad = client.post(f"{PREFIX}/optimize/resume", json={"run": "../etc"})
    assert bad.status_code == 400 and "No AutoMBW run '../etc'" in bad.json()["message"]
    assert client.post(f"{PREFIX}/optimize/resume", json={"run": run}).json() == {"ok": True, "run": run}
    done = wait(client, run)
    assert done["state"] == "done" and done["trials"] == 6
    # the API's best is the log's best
    from lib_merge.optimize.runlog import RunLog
    folder = tmp_path / "out" / "autombw" / run
    rows = RunLog.open(folder).trials()
    assert [r["trial"] for r in rows] == list(range(6))
    assert done["best"]["score"] == max(r["score"] for r in rows)
    status = client.get(f"{PREFIX}/optimize/status", params={"run": run}).json()
    assert status["state"] == "done"


def test_config_errors_answer_400_with_the_message(api):
    client, tmp_path = api
    bad = {**config(tmp_path), "budget": {"trials": -1}}
    r = client.post(f"{PREFIX}/optimize/start", json=bad)
    assert r.status_code == 400 and "budget.trials must be at least 1" in r.json()["message"]
    r = client.post(f"{PREFIX}/optimize/start", json={**config(tmp_path), "models": ["r1.safetensors", "nope.safetensors"]})
    assert r.status_code == 400 and "nope.safetensors" in r.json()["message"]
    r = client.post(f"{PREFIX}/optimize/rate", json={"ratings": [1]})
    assert r.status_code == 400 and "no manual scorer" in r.json()["message"]


def test_manual_scorer_waits_for_ratings(api):
    client, tmp_path = api
    run = client.post(f"{PREFIX}/optimize/start", json=config(tmp_path, trials=2, scorer="manual")).json()["run"]
    for rating in (3.0, 8.0):
        deadline = time.monotonic() + 60
        while client.get(f"{PREFIX}/optimize/status").json().get("waiting_for_ratings", 0) != 1:
            assert time.monotonic() < deadline, "the run never asked for a rating"
            time.sleep(0.05)
        wrong = client.post(f"{PREFIX}/optimize/rate", json={"ratings": [1, 2]})
        assert wrong.status_code == 400 and "Give 1 finite ratings" in wrong.json()["message"]
        assert client.post(f"{PREFIX}/optimize/rate", json={"ratings": [rating]}).json()["ok"]
    done = wait(client, run)
    assert done["best"]["trial"] == 1 and done["best"]["score"] == 8.0


def test_remote_evaluator_drives_the_app_over_its_api(api, tmp_path, previewing_host):
    """What `optimize run --webui URL` does: merge and generate in the app, score here."""
    client, _ = api
    from lib_merge.optimize.payloads import Payload
    from lib_merge.optimize.scorers import PythonScorer
    from lib_merge.optimize.trial import RemoteEvaluator
    from lib_merge.session import recipe_from_names

    class Local(RemoteEvaluator):
        def _post(self, path, body):   # the TestClient instead of a socket; the same routes and answers
            r = client.post(f"{PREFIX}{path}", json=body)
            data = r.json()
            if r.status_code != 200:
                from lib_merge.core.errors import MergeError
                raise MergeError(data["message"])
            return data

    scorer = PythonScorer(f"{tmp_path / 'sc.py'}:slow", None)
    ev = Local("http://app", [scorer], ["s"])
    recipe = recipe_from_names(previewing_host, "weighted_sum", ["r1.safetensors", "r2.safetensors"],
                               params={"alpha": 0.7})
    payload = Payload(prompt="a cat", steps=1, width=64, height=64, seed=2)
    out = ev.evaluate(recipe, [payload], {"alpha.M00": 0.7, "alpha.IN04": 0.7})
    assert out.error is None and out.raw["s"] == [0.0] and out.images[0].size == (64, 64)
    assert previewing_host.loaded is not None and "weighted_sum" in previewing_host.loaded.name
    assert "Merge Lab recipe:" in out.infotexts[0]
    bad = recipe_from_names(previewing_host, "weighted_sum", ["r1.safetensors", "r2.safetensors"])
    bad.models[1].name = "missing.safetensors"
    bad.models[1].path = None
    failed = ev.evaluate(bad, [payload], {})
    assert failed.error.startswith("merge: ") and "missing.safetensors" in failed.error
