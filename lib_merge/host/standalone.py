"""The Host interface without the WebUI: a models folder, an output folder, and a diffusers model.

With diffusers installed (the standalone requirements have it) a merge "into memory" goes straight into
a diffusers UNet / VAE / text encoder(s) built from the merge's shapes (lib_merge/preview/), which then
generates previews; re-merges after slider changes rewrite only the changed tensors (engine.live.LiveCache).
A model diffusers cannot run is merged into a plain state dict instead, with a note. Restore drops it.
Names are file paths relative to the models folder, as the WebUI shows its checkpoints; anything else
is refused, so a name can never reach outside the folder. Checkpoints saved in the output folder (merges,
bakes) are listed too, as `(output)/NAME`, so merges chain (A+B -> AB, then AB+C) without moving files.
"""
from __future__ import annotations

import contextlib
import importlib.util
import threading
from pathlib import Path
from typing import Any

from ..core.errors import InputError, MergeError
from ..core.generation import GenerationRequest, GenerationResult
from . import Host, LoadedMerge

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
LORA_DIR = "Lora"   # the WebUI's folder name for LoRAs (models/Lora)
OUTPUT_PREFIX = "(output)/"   # names of checkpoints listed from the output folder
UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def is_checkpoint_file(path: Path) -> bool:
    """Whether a file of the output folder is a checkpoint (a UNet inside), not a LoRA, mask or weight set:
    from the safetensors header alone; .ckpt files are taken as checkpoints."""
    if path.suffix.lower() != ".safetensors":
        return True
    from ..core.files import SafetensorsFile
    try:
        with SafetensorsFile(path) as f:
            return any(k.startswith(UNET_PREFIXES) for k in f.tensors)
    except Exception:  # noqa: BLE001 - an unreadable file is not offered; opening it would say why
        return False


class StandaloneHost(Host):
    name = "standalone"
    can_make_demo_models = True

    def __init__(self, models_dir: str | Path = "models", output_dir: str | Path = "outputs",
                 lora_dir: str | Path | None = None, settings: dict[str, Any] | None = None,
                 generate: bool | None = None):
        from ..engine.live import LiveCache
        super().__init__()
        # previews need diffusers (installed with the standalone requirements); generate=False turns them off
        self.can_generate = self.has_live_model = (
            importlib.util.find_spec("diffusers") is not None if generate is None else generate)
        self._generator = None
        self.preview_note = ""   # why the loaded merge cannot make previews, if it cannot
        self.models_dir = Path(models_dir).expanduser().resolve()
        self.lora_dir = Path(lora_dir).expanduser().resolve() if lora_dir else self.models_dir / LORA_DIR
        self.output_folder = Path(output_dir).expanduser().resolve()
        self.settings: dict[str, Any] = dict(settings or {})
        self._checkpoints: dict[str, Path] | None = None
        self._kinds: dict[tuple, bool] = {}   # (path, size, mtime) -> is a checkpoint, for the output folder
        self._lock = threading.Lock()
        self.live_cache = LiveCache(int(self.settings.get("merge_lab_cache_mb", 4096)) << 20)

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
            found = self._scan(self.models_dir, skip=self.lora_dir)
            out = self.output_folder
            if not out.is_relative_to(self.models_dir) and out.is_dir():
                for rel, p in self._scan(out, skip=self.lora_dir).items():
                    st = p.stat()
                    key = (p, st.st_size, st.st_mtime_ns)
                    if key not in self._kinds:
                        self._kinds[key] = is_checkpoint_file(p)
                    if self._kinds[key]:
                        found[OUTPUT_PREFIX + rel] = p
            self._checkpoints = found
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
        raise InputError(f"Unknown model '{name}': it is not in the models folder {self.models_dir} nor among "
                         f"the checkpoints saved in the output folder. Put the file there and press Refresh lists.")

    def list_loras(self, refresh: bool = False) -> list[str]:
        return list(self._scan(self.lora_dir, skip=None))

    def output_dir(self) -> Path:
        self.output_folder.mkdir(parents=True, exist_ok=True)
        return self.output_folder

    def search_dirs(self) -> list[Path]:
        return [self.models_dir]

    def create_demo_models(self) -> list[str]:
        """Two tiny SD1.5-shaped checkpoints in the models folder, so a newcomer can merge at once."""
        from ..preview.demo import make_demo_models
        paths = make_demo_models(self.models_dir)
        self.list_checkpoints(refresh=True)
        return [p.relative_to(self.models_dir).as_posix() for p in paths]

    # ---- the live (diffusers) model
    @property
    def generator(self):
        if self._generator is None:
            from ..preview.generator import Generator
            self._generator = Generator(tokenizer_dir=self.setting("generation_tokenizer_dir") or None)
        return self._generator

    @contextlib.contextmanager
    def live_target(self, family: str, merge_vae: bool, shapes: dict | None = None):
        reason = self._why_no_previews(shapes, family)
        if reason:
            self.preview_note = reason
            self.live_cache.clear()
            if self._generator is not None:
                self._generator.unload()
            with super().live_target(family, merge_vae, shapes) as sink:
                yield sink
            return
        self.preview_note = ""
        self.live_cache.budget_bytes = int(self.setting("merge_lab_cache_mb", 4096)) << 20
        sink = self.generator.sink()
        yield sink
        self.current_state = sink.targets

    def _why_no_previews(self, shapes: dict | None, family: str) -> str:
        if not self.can_generate:
            return "previews are off"
        if shapes is None:
            return "the model's layout is unknown"
        try:
            self.generator.prepare(shapes, family)   # builds the modules (kept for the merge: same shapes)
        except MergeError as e:
            return f"this model cannot generate previews here: {e}"
        except Exception as e:  # noqa: BLE001 - shapes diffusers cannot build (a shrunken test model)
            return f"this model cannot generate previews here ({type(e).__name__}: {e})"
        return ""

    def set_loaded(self, merged: LoadedMerge) -> None:
        super().set_loaded(merged)
        if not self.preview_note and self._generator is not None:
            self._generator.mark_loaded(merged.name, merged.short_hash)

    def list_samplers(self) -> list[str]:
        if not self.can_generate:
            return []
        from ..preview.samplers import SAMPLER_NAMES
        return list(SAMPLER_NAMES)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        if not self.can_generate:
            return super().generate(request)
        if self.loaded is None or self._generator is None or not self._generator.ready:
            raise MergeError(self.preview_note.capitalize() + "." if self.preview_note and self.loaded
                             else "Merge first: previews are made with the merge loaded in memory.")
        extra = {"Merge Lab recipe": self.loaded.recipe_json}
        return self._generator.generate(request, progress=self.progress, cancel=self.interrupted, extra=extra)

    def restore(self) -> None:
        if self._generator is not None:
            self._generator.unload()
        self.live_cache.clear()
        self.preview_note = ""
        super().restore()

    # ---- progress, exclusivity, settings
    def exclusive(self):
        return self._lock

    def setting(self, name: str, default: Any = None) -> Any:
        return self.settings.get(name, default)
