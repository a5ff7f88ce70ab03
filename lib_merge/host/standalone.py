"""The Host interface without the WebUI: a models folder, an output folder, the merge kept in memory.

There is no live model here (nothing generates images), so a merge "into memory" is kept as the
current merge (Host.live_target fills `current_state`; `loaded` describes it); Restore drops it.
Names are file paths relative to the models folder, as the WebUI shows its checkpoints; anything else
is refused, so a name can never reach outside the folder.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import Host

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
LORA_DIR = "Lora"   # the WebUI's folder name for LoRAs (models/Lora)


class StandaloneHost(Host):
    name = "standalone"
    can_generate = False
    has_live_model = False
    can_make_demo_models = True

    def __init__(self, models_dir: str | Path = "models", output_dir: str | Path = "outputs",
                 lora_dir: str | Path | None = None, settings: dict[str, Any] | None = None):
        super().__init__()
        self.models_dir = Path(models_dir).expanduser().resolve()
        self.lora_dir = Path(lora_dir).expanduser().resolve() if lora_dir else self.models_dir / LORA_DIR
        self.output_folder = Path(output_dir).expanduser().resolve()
        self.settings: dict[str, Any] = dict(settings or {})
        self._checkpoints: dict[str, Path] | None = None
        self._lock = threading.Lock()

    # ---- models and folders
    def _scan(self, folder: Path, skip: Path | None = None) -> dict[str, Path]:
        if not folder.is_dir():
            return {}
        found = {}
        for p in folder.rglob("*"):
            if (p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file() and not p.name.startswith(".")
                    and not (skip is not None and p.is_relative_to(skip))):
                found[p.relative_to(folder).as_posix()] = p
        return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))

    def list_checkpoints(self, refresh: bool = False) -> list[str]:
        if self._checkpoints is None or refresh:
            self._checkpoints = self._scan(self.models_dir, skip=self.lora_dir)
        return list(self._checkpoints)

    def resolve_checkpoint(self, name: str) -> Path:
        name = (name or "").strip()
        if not name:
            raise InputError("Choose a model.")
        for refresh in (False, True):
            self.list_checkpoints(refresh)
            found = self._checkpoints
            if name in found:
                return found[name]
            # a recipe from another machine names the file only: accept it when exactly one file has that name
            same = [p for n, p in found.items() if Path(n).name == name]
            if len(same) == 1:
                return same[0]
        raise InputError(f"Unknown model '{name}': it is not in the models folder {self.models_dir}. "
                         f"Put the file there and press the refresh button.")

    def list_loras(self, refresh: bool = False) -> list[str]:
        return list(self._scan(self.lora_dir, skip=None))

    def output_dir(self) -> Path:
        self.output_folder.mkdir(parents=True, exist_ok=True)
        return self.output_folder

    def search_dirs(self) -> list[Path]:
        return [self.models_dir]

    def create_demo_models(self) -> list[str]:
        """Two tiny SD1.5-shaped checkpoints in the models folder, so a newcomer can merge at once."""
        from ..demo import make_demo_models
        paths = make_demo_models(self.models_dir)
        self.list_checkpoints(refresh=True)
        return [p.relative_to(self.models_dir).as_posix() for p in paths]

    # ---- progress, exclusivity, settings
    def exclusive(self):
        return self._lock

    def setting(self, name: str, default: Any = None) -> Any:
        return self.settings.get(name, default)
