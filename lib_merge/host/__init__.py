"""What the UI may ask of its host: the WebUI (host/webui.py) or the standalone app (host/standalone.py).

The UI and the HTTP API talk only to a Host and to the library; only host/webui.py imports the WebUI.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.generation import GenerationRequest, GenerationResult

log = logging.getLogger("merge_lab")


@dataclass
class LoadedMerge:
    """What is loaded in the host's live model now: the merge's honest name, hash and recipe."""
    name: str
    short_hash: str
    recipe_json: str


class Host:
    """The host interface. Methods that a host cannot do raise MergeError with a message for people."""

    name = "host"
    can_generate = False          # whether generate() works here (the WebUI: yes)
    has_live_model = False        # whether live_target() writes into a model that generates images
    can_make_demo_models = False  # whether create_demo_models() works (the standalone app)
    has_original_model = False    # whether restore() puts back a checkpoint the host loaded itself (the WebUI)
    lora_dir: Path | None = None  # the folder list_loras() lists (relative names)
    font_file: str | None = None  # a TrueType font for XY plot labels (the WebUI's Roboto)

    def __init__(self):
        self._interrupt = threading.Event()
        self.loaded: LoadedMerge | None = None
        self.current_state: dict | None = None   # the last in-memory merge where there is no live model
        self.last_progress: tuple[float, str] = (0.0, "")  # (fraction, text) of the running job, for the tab
        self.live_cache = None   # an engine.live.LiveCache where the host has a live model worth re-merging fast

    # ---- models and folders
    def list_checkpoints(self, refresh: bool = False) -> list[str]:
        raise NotImplementedError

    def resolve_checkpoint(self, name: str) -> Path:
        raise NotImplementedError

    def list_loras(self, refresh: bool = False) -> list[str]:
        return []

    def list_vaes(self, refresh: bool = False) -> list[str]:
        return []

    def output_dir(self) -> Path:
        raise NotImplementedError

    def remove_stale_partials(self) -> list[Path]:
        """At start: delete the temporary files that saves killed mid-write left in the folders we write to."""
        from ..core.files import remove_stale_partials
        removed = []
        for folder in (self.output_dir(), self.lora_dir):
            if folder is not None:
                removed += remove_stale_partials(folder)
        for p in removed:
            log.info("Merge Lab: removed %s, left over by a save that did not finish.", p)
        return removed

    def create_demo_models(self) -> list[str]:
        """Make two tiny demo checkpoints where this host lists models (standalone only)."""
        from ..core.errors import MergeError
        raise MergeError("Demo models are made by the standalone app only.")

    def saved(self, path: Path) -> None:
        """A merge was saved to `path` (the WebUI refreshes its checkpoint list)."""

    def search_dirs(self) -> list[Path]:
        """Folders where a recipe's model names are looked up."""
        return []

    # ---- the live model
    @contextlib.contextmanager
    def live_target(self, family: str, merge_vae: bool, shapes: dict | None = None):
        """A sink for merging straight into the live model (the WebUI: its parameters, no second copy).

        Here (no live model) the merge goes into memory and is kept as the current merge. `family` and
        `shapes` (model A's {key: shape}) describe the merge (a host may refuse a live model of another
        architecture, or build one for it); the VAE is written only when the merge merges it.
        """
        from ..engine.sinks import DictSink
        sink = DictSink()
        yield sink
        self.current_state = sink.state

    def set_loaded(self, merged: LoadedMerge) -> None:
        """Record what the live model now holds (the WebUI also labels its infotext with it)."""
        self.loaded = merged

    @property
    def restore_label(self) -> str:
        """What restore() does, in the page's words (its button)."""
        return "Restore original model" if self.has_original_model else "Forget the merge"

    def restore(self) -> None:
        """Put the original weights back (where there are none: forget the merge in memory)."""
        self.loaded = None
        self.current_state = None

    def list_samplers(self) -> list[str]:
        """Sampler names generate() understands (empty where the host does not generate)."""
        return []

    def generate(self, request: GenerationRequest) -> GenerationResult:
        from ..core.errors import MergeError
        raise MergeError(f"This host ({self.name}) cannot generate previews.")

    # ---- progress, interrupt, exclusivity
    def begin_job(self, title: str) -> None:
        self._interrupt.clear()
        self.last_progress = (0.0, title)

    def progress(self, fraction: float, text: str = "") -> None:
        self.last_progress = (fraction, text)

    def end_job(self) -> None:
        pass

    def job_progress(self) -> tuple[float, str]:
        """(fraction, text) of the running job for the page: a merge's tensor, a generation's step."""
        return self.last_progress

    def interrupt(self) -> None:
        self._interrupt.set()

    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def exclusive(self):
        """A context manager held around merges and generations so they never overlap (WebUI: queue_lock)."""
        return contextlib.nullcontext()

    def xyz_module(self):
        """The host's X/Y/Z plot script module (the WebUI's xyz_grid), None where there is none."""
        return None

    def inside_generation(self):
        """Around work done from inside the host's own running generation (the WebUI's X/Y/Z plot): the lock is
        held already and the job is the host's, so exclusive() and the job's begin/end must not be taken again."""
        return contextlib.nullcontext()

    def setting(self, name: str, default: Any = None) -> Any:
        """A user setting (WebUI: its Settings page; standalone: built-in defaults)."""
        return default
