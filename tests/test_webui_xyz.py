"""Merge Lab's axes for the WebUI's X/Y/Z plot, against a stand-in of its xyz_grid module (the class and list it
exposes) on the standalone host with the runnable models; the real plot runs in tests/test_webui_integration.py."""
from __future__ import annotations

import json
import types

import pytest

from lib_merge import session
from lib_merge.core.weights import preset
from lib_merge.webui_xyz import axis_options, txt2img_indices


class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.confirm, self.cost, self.choices = label, type, apply, confirm, cost, choices


class AxisOptionImg2Img(AxisOption):
    is_img2img = True


def fake_xyz():
    return types.SimpleNamespace(AxisOption=AxisOption, axis_options=[AxisOption("Nothing", str, None),
                                                                       AxisOptionImg2Img("Image CFG Scale", float, None)])


def test_the_axes_re_merge_the_loaded_merge_and_combine(previewing_host):
    host = previewing_host
    xyz = fake_xyz()
    options = {o.label: o for o in axis_options(xyz, host)}
    assert list(options) == ["Merge Lab: α", "Merge Lab: block weights preset", "Merge Lab: model B"]
    with pytest.raises(RuntimeError, match="merge two models there"):
        options["Merge Lab: α"].apply(None, 0.3, [0.3])
    recipe = session.recipe_from_names(host, "weighted_sum", ["r1.safetensors", "r2.safetensors"], params={"alpha": 0.5})
    assert session.merge_to_memory(host, recipe).ok

    options["Merge Lab: α"].apply(None, 0.8, [0.8])
    loaded = json.loads(host.loaded.recipe_json)
    assert loaded["params"]["alpha"] == 0.8 and loaded["blocks"] == {}
    options["Merge Lab: block weights preset"].apply(None, "GRAD_V", ["GRAD_V"])
    loaded = json.loads(host.loaded.recipe_json)
    assert loaded["blocks"]["alpha"] == preset("GRAD_V", "sd1") and loaded["params"]["alpha"] == 0.8   # combined
    options["Merge Lab: model B"].apply(None, "r1.safetensors", ["r1.safetensors"])
    assert [m["name"] for m in json.loads(host.loaded.recipe_json)["models"]] == ["r1.safetensors", "r1.safetensors"]
    assert options["Merge Lab: model B"].choices() == host.list_checkpoints()
    from lib_merge.core.errors import InputError
    with pytest.raises(InputError, match="Unknown model 'nope.safetensors'"):
        options["Merge Lab: model B"].confirm(None, ["nope.safetensors"])

    xyz.axis_options.extend(options.values())
    assert txt2img_indices(xyz) == {"Merge Lab: α": 1, "Merge Lab: block weights preset": 2, "Merge Lab: model B": 3}


def test_the_index_route_says_where_there_is_no_plot(previewing_host):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_merge.api import register_routes
    app = FastAPI()
    register_routes(app, previewing_host)
    r = TestClient(app).get("/merge-lab/v1/xyz-axes")
    assert r.status_code == 400 and "There is no X/Y/Z plot here" in r.json()["message"]
