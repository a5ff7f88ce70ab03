"""Every HTTP route answers malformed and hostile input with a 4xx and a sentence: never a 500, never a
traceback (bad JSON, wrong types, huge numbers, names with '..', absolute paths, NUL bytes, over-long names)."""
from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_merge.api import register_routes
from lib_merge.host.standalone import StandaloneHost

HOSTILE = [None, 1, "x", [], {}, "../../etc/passwd", "/etc/passwd", "a\x00b", "x" * 5000, 1e308, -1, True, {"a": 1}]
FIELDS = ["method", "models", "params", "blocks", "base", "name", "checkpoint", "loras", "x", "y", "generation", "run",
          "ratings", "prompt", "steps", "width", "height", "seed", "dtype", "rank", "mode", "density", "lbw", "recipe",
          "elemental", "adjust", "live", "where", "overwrite"]
MODELS = ["r1.safetensors", "r2.safetensors"]


@pytest.fixture(scope="module")
def client(runnable_models, tmp_path_factory):
    host = StandaloneHost(runnable_models, tmp_path_factory.mktemp("hostile_out"), generate=False)
    app = FastAPI()
    register_routes(app, host)
    return TestClient(app, raise_server_exceptions=False), app


def bodies():
    yield from ([], 5, "text", {})
    for f in FIELDS:
        for v in HOSTILE:
            yield {f: v}
    for v in HOSTILE:
        yield {"method": "weighted_sum", "models": [MODELS[0], v]}
        yield {"method": "weighted_sum", "models": MODELS, "params": {"alpha": v}}
        yield {"method": "weighted_sum", "models": MODELS, "blocks": {"alpha": v}}
        yield {"method": "weighted_sum", "models": MODELS, "name": v}


def test_no_route_answers_hostile_input_with_a_500(client):
    c, app = client
    routes = sorted((r.path, sorted(r.methods)[0]) for r in app.routes if r.path.startswith("/merge-lab"))
    assert len(routes) >= 20
    seen_4xx = 0
    for path, method in routes:
        r = c.post(path, content=b"{not json", headers={"content-type": "application/json"}) if method == "POST" \
            else c.get(path, params={"run": "a\x00b"})
        assert r.status_code < 500, (path, r.text[:300])
        for body in bodies():
            if method == "GET":
                r = c.get(path, params={k: str(v) for k, v in body.items()} if isinstance(body, dict) else None)
            else:
                r = c.post(path, json=body)
            assert r.status_code < 500, (path, body, r.text[:300])
            assert "Traceback" not in r.text, (path, body)
            if 400 <= r.status_code < 500 and r.headers.get("content-type", "").startswith("application/json"):
                answer = r.json()
                said = answer.get("message") or answer.get("detail")
                assert said, (path, body, answer)
                seen_4xx += 1
    assert seen_4xx > 500


def test_over_long_file_names_are_a_sentence_everywhere(tiny, tmp_path, capsys):
    from lib_merge.cli import main
    from lib_merge.core.errors import OutputError
    from lib_merge.core.files import safe_output_path
    with pytest.raises(OutputError, match=r"The file name is too long \(312 bytes; at most 200\)"):
        safe_output_path(tmp_path, "x" * 300)
    assert main(["merge", "--method", "weighted_sum", "--model", str(tiny.path["sd1_a"]), "--model",
                 str(tiny.path["sd1_b"]), "-o", str(tmp_path / ("y" * 300 + ".safetensors"))]) == 2
    assert "The output file name is too long (312 bytes; at most 200)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_interrupt_route_stops_a_running_merge(runnable_models, tmp_path):
    import threading

    class Slow(StandaloneHost):
        """Holds the merge at its first tensor until Interrupt arrives (or 10 s pass)."""
        started = threading.Event()

        def progress(self, fraction, text=""):
            super().progress(fraction, text)
            if not self.started.is_set():
                self.started.set()
                self._interrupt.wait(10)

    host = Slow(runnable_models, tmp_path / "out", generate=False)
    app = FastAPI()
    register_routes(app, host)
    c = TestClient(app)
    answer = {}
    worker = threading.Thread(target=lambda: answer.update(
        c.post("/merge-lab/v1/merge", json={"method": "weighted_sum", "models": MODELS}).json()))
    worker.start()
    assert host.started.wait(30)
    r = c.post("/merge-lab/v1/interrupt")
    assert r.status_code == 200 and r.json() == {"ok": True, "message": "Interrupt requested."}
    worker.join(30)
    assert answer["ok"] is False and "interrupted" in answer["message"].lower(), answer
    assert c.get("/merge-lab/v1/status").json()["loaded"] is None
