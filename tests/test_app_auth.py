"""The standalone app's logins: --auth USER:PASS (or --auth-file) guards the HTTP API (401 without, 200 with) and
the page (gradio's login); serving beyond this computer without a login is refused with a sentence."""
from __future__ import annotations

import pytest

pytest.importorskip("gradio")

from fastapi.testclient import TestClient  # noqa: E402

from lib_merge.cli import main  # noqa: E402
from lib_merge.host.standalone import StandaloneHost  # noqa: E402
from lib_merge.ui.app import make_server  # noqa: E402


def test_logins_guard_the_api_and_the_page(runnable_models, tmp_path):
    host = StandaloneHost(runnable_models, tmp_path / "out", generate=False)
    c = TestClient(make_server(host, logins=[("merge", "secret")]))
    r = c.get("/merge-lab/v1/methods")
    assert r.status_code == 401 and "requires a user and password" in r.json()["detail"]
    assert c.get("/merge-lab/v1/methods", auth=("merge", "wrong")).status_code == 401
    assert c.get("/merge-lab/v1/methods", auth=("merge", "secret")).status_code == 200
    assert c.get("/config").status_code == 401                         # the page wants gradio's login
    assert c.post("/login", data={"username": "merge", "password": "secret"}).status_code == 200
    assert c.get("/config").status_code == 200                         # logged in (its cookie)
    open_server = TestClient(make_server(host))                        # no logins: as before
    assert open_server.get("/merge-lab/v1/methods").status_code == 200


def test_exposure_without_a_login_is_refused(tmp_path, capsys):
    assert main(["ui", "--host", "0.0.0.0", "--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Serving on 0.0.0.0 lets anyone on your network use the app" in err and "--insecure" in err
    bad = tmp_path / "auth.txt"
    bad.write_text("no-colon\n")
    assert main(["ui", "--auth-file", str(bad), "--models-dir", str(tmp_path)]) == 2
    assert "A login is USER:PASS" in capsys.readouterr().err
