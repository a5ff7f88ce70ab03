"""Shared fixtures: tiny SD1, SD2 and SDXL checkpoints with the real key names, built once per run."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from lib_merge.core.files import save_state_dict  # noqa: E402
from lib_merge.core.keysets import make_state_dict  # noqa: E402


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path_factory, monkeypatch):
    # keep the tests' hash cache away from the user's ~/.cache
    monkeypatch.setenv("MERGE_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


class TinyModels:
    """Paths and in-memory state dicts of the tiny checkpoints (float32 unless the name says fp16)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.path: dict[str, Path] = {}

    def add(self, name: str, sd: dict[str, torch.Tensor], metadata=None) -> Path:
        p = self.folder / f"{name}.safetensors"
        save_state_dict(sd, p, metadata)
        self.state[name] = sd
        self.path[name] = p
        return p


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModels:
    folder = tmp_path_factory.mktemp("tiny_models")
    t = TinyModels(folder)
    for family in ("sd1", "sd2", "sdxl"):
        base = make_state_dict(family, seed=10)
        t.add(f"{family}_a", base)
        t.add(f"{family}_b", make_state_dict(family, seed=11, like=base, noise=0.05))
        t.add(f"{family}_c", make_state_dict(family, seed=12, like=base, noise=0.05))
    t.add("sd1_a_fp16", {k: (v.half() if v.is_floating_point() else v) for k, v in t.state["sd1_a"].items()})
    t.add("sd1_inpaint", make_state_dict("sd1", seed=13, like=t.state["sd1_a"], noise=0.05, variant="inpainting"))
    return t


@pytest.fixture(scope="session")
def runnable_models(tmp_path_factory) -> Path:
    """A folder with two tiny SD1 checkpoints diffusers can run (r1, r2): previews in tests."""
    from lib_merge.preview.tiny import make_runnable_state_dict
    folder = tmp_path_factory.mktemp("runnable")
    for i in (1, 2):
        save_state_dict(make_runnable_state_dict("sd1", seed=i), folder / f"r{i}.safetensors")
    return folder


@pytest.fixture
def previewing_host(runnable_models, tmp_path):
    """A StandaloneHost over the runnable models, on one torch thread (tiny models: threads cost more)."""
    from lib_merge.host.standalone import StandaloneHost
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield StandaloneHost(runnable_models, tmp_path / "out")
    torch.set_num_threads(old)
