"""Two tiny demo checkpoints (real SD1.5 key names, small shapes) so a newcomer can merge, and preview
the merge, at once."""
from __future__ import annotations

from pathlib import Path

from ..core.files import save_state_dict
from .tiny import make_runnable_state_dict

DEMO_NAMES = ("demo_sd15_a.safetensors", "demo_sd15_b.safetensors")


def make_demo_models(folder: Path, family: str = "sd1") -> list[Path]:
    """Create (once) two small random checkpoints in `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / n for n in DEMO_NAMES]
    if not all(p.exists() for p in paths):
        # small but runnable: diffusers can build and run them, so the standalone app can make previews
        a = make_runnable_state_dict(family, seed=1)
        b = make_runnable_state_dict(family, seed=2)
        for p, sd in zip(paths, (a, b)):
            if not p.exists():
                save_state_dict(sd, p, {"merge_lab_demo": "tiny random model for trying Merge Lab"})
    return paths
