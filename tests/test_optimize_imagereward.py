"""AutoMBW end to end in the standalone host with the ImageReward scorer's real code path: demo models,
diffusers generation, a randomly initialised ImageReward built offline (tests/imagereward_fixture.py)."""
from __future__ import annotations

import json
import math

from lib_merge.optimize.jobs import execute
from lib_merge.optimize.runlog import RunLog
from lib_merge.optimize.runner import start_run
from tests.imagereward_fixture import imagereward_folder  # noqa: F401


def test_a_run_scored_by_imagereward(previewing_host, tmp_path, imagereward_folder):  # noqa: F811
    payload = {"prompt": "a cat on a windowsill", "steps": 1, "width": 64, "height": 64, "seed": 4}
    cfg = {"name": "ir", "models": ["r1.safetensors", "r2.safetensors"], "space": {"alpha": ["M00"]},
           "optimizer": {"name": "random", "seed": 0}, "budget": {"trials": 2},
           "payloads": [payload, {**payload, "prompt": "a dog"}],
           "scorer": {"name": "imagereward", "model": str(imagereward_folder), "sigmoid": True}}
    log = start_run(cfg, previewing_host, root=tmp_path / "runs", base_dir=tmp_path)
    result = execute(log, host=previewing_host, echo=lambda line: None)
    assert result["state"] == "done"
    rows = RunLog.open(log.folder).trials()
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    for r in rows:
        raw = r["raw"]["imagereward"]
        assert len(raw) == 2 and all(0 < s < 1 and math.isfinite(s) for s in raw), "sigmoid scores in (0, 1)"
        assert r["score"] == sum(raw) / 2
    # the same image and prompt score identically: rescore trial 0's saved image
    from PIL import Image

    from lib_merge.optimize.imagereward import ImageRewardScorer
    scorer = ImageRewardScorer(model=str(imagereward_folder), sigmoid=True)
    image = Image.open(log.folder / rows[0]["images"][0])
    again = scorer.score([image, image], [payload, payload], {})
    assert again[0] == again[1] == rows[0]["raw"]["imagereward"][0]
    scorer.close()
    assert json.loads((log.folder / "best.json").read_text())["trial"] in (0, 1)
