"""The WebUI host: the ONLY module that imports AUTOMATIC1111's `modules.*` (lazily, inside functions).

Facts of A1111 1.10.x it relies on:
- `shared.sd_model` is the live model. Its text-encoder parameter names differ from checkpoint names
  while the WebUI's hijack is applied; after `sd_hijack.model_hijack.undo_hijack(model)` they are the
  checkpoint names, so a merge is written straight into `model.state_dict(keep_vars=True)`'s tensors,
  then the hijack is applied again. No file is written, no second copy of the model is made.
- `processing.process_images` reloads weights only when `sd_model.sd_model_checkpoint` differs from the
  selected checkpoint's file: we never change that field, so a merged model is not silently reloaded.
- The infotext's "Model" and "Model hash" come from `sd_model.sd_checkpoint_info.name_for_extra` and
  `sd_model.sd_model_hash`: while a merge is loaded they are the merge's name and recipe hash.
- `call_queue.queue_lock` serialises generations; merges hold it too. Progress and Interrupt go through
  `shared.state`, so the WebUI's own progress bar and Interrupt button work.
"""
from __future__ import annotations

import contextlib
import threading
import copy
import os
from pathlib import Path

import torch

from ..core.errors import InputError, MergeError
from ..core.generation import GenerationRequest, GenerationResult
from . import Host, LoadedMerge

RECIPE_INFOTEXT_KEY = "Merge Lab recipe"

SETTINGS = [  # (key, default, label, choices or None)
    ("merge_lab_output_dir", "", "Folder for saved merges (empty: the WebUI's checkpoint folder)", None),
    ("merge_lab_dtype", "float16", "Default output dtype", ["float16", "bfloat16", "float32"]),
    ("merge_lab_compute_dtype", "float32", "Default compute precision", ["float32", "float64"]),
    ("merge_lab_device", "cpu", "Merge on (cpu reads inputs lazily; cuda computes on the GPU)", ["cpu", "cuda"]),
    ("merge_lab_threads", 0, "Merge worker threads (0: one per CPU core)", None),
    ("merge_lab_cache_mb", 4096, "Memory budget for live re-merges, MB", None),
]


def _family_of_model(model) -> str:
    if getattr(model, "is_sdxl", False):
        return "sdxl"
    if getattr(model, "is_sd2", False):
        return "sd2"
    return "sd1"


class WebUIHost(Host):
    name = "webui"
    can_generate = True
    has_live_model = True
    has_original_model = True

    def __init__(self):
        from ..engine.live import LiveCache
        super().__init__()
        self._original: tuple | None = None   # (sd_checkpoint_info, sd_model_hash) before our first merge
        self._vae_written = False
        self._label = None                    # the CheckpointInfo copy that names the loaded merge
        self._inside = threading.local()      # .on while merging from inside the WebUI's own job (X/Y/Z plot)
        self.live_cache = LiveCache(budget_bytes=int(self.setting("merge_lab_cache_mb", 4096)) << 20)

    # ---------------------------------------------------------------------------------- models, folders
    def list_checkpoints(self, refresh: bool = False) -> list[str]:
        from modules import sd_models
        if refresh:
            sd_models.list_models()
        return sorted(sd_models.checkpoints_list.keys(), key=str.lower)

    def resolve_checkpoint(self, name: str) -> Path:
        from modules import sd_models
        info = sd_models.get_closet_checkpoint_match(name) if name else None
        if info is None or not os.path.isfile(info.filename):
            raise InputError(f"Checkpoint '{name}' is not in the WebUI's list: press refresh, or check the name.")
        return Path(info.filename)

    @property
    def font_file(self) -> str | None:
        """The WebUI's own label font (Roboto), as its grids use."""
        from modules import paths_internal
        return getattr(paths_internal, "roboto_ttf_file", None)

    @property
    def lora_dir(self) -> Path:
        """The WebUI's LoRA folder (--lora-dir, else models/Lora)."""
        from modules import paths, shared
        return Path(getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"))

    def list_loras(self, refresh: bool = False) -> list[str]:
        folder = self.lora_dir
        if not folder.is_dir():
            return []
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))

    def list_vaes(self, refresh: bool = False) -> list[str]:
        from modules import sd_vae
        if refresh:
            sd_vae.refresh_vae_list()
        return sorted(sd_vae.vae_dict.keys())

    def output_dir(self) -> Path:
        from modules import sd_models
        folder = Path(self.setting("merge_lab_output_dir", "") or sd_models.model_path)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def search_dirs(self) -> list[Path]:
        from modules import sd_models, shared
        dirs = [Path(sd_models.model_path)]
        if getattr(shared.cmd_opts, "ckpt_dir", None):
            dirs.append(Path(shared.cmd_opts.ckpt_dir))
        return dirs

    def saved(self, path: Path) -> None:
        from modules import sd_models
        sd_models.list_models()

    def setting(self, name, default=None):
        from modules import shared
        value = shared.opts.data.get(name, default)
        return default if value in (None, "") and default is not None else value

    # ----------------------------------------------------------------------------------- the live model
    def _model(self):
        from modules import shared
        model = shared.sd_model
        if model is None:
            raise MergeError("No model is loaded in the WebUI: load a checkpoint first.")
        return model

    @contextlib.contextmanager
    def live_target(self, family: str, merge_vae: bool, shapes: dict | None = None):
        from modules import sd_hijack

        from ..core.arch import VAE, component_of
        from ..engine.sinks import TensorSink
        model = self._model()
        live = _family_of_model(model)
        if live != family:
            labels = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
            raise InputError(f"The WebUI has an {labels[live]} model loaded and the merge is {labels[family]}: "
                             f"select an {labels[family]} checkpoint (model A, say) at the top of the page first.")
        if self._original is None:
            self._original = (model.sd_checkpoint_info, model.sd_model_hash)
        if self.loaded is None or model.sd_checkpoint_info is not self._label:
            self.live_cache.clear()   # the WebUI loaded other weights since: no partial re-merge on top
        self.live_cache.budget_bytes = int(self.setting("merge_lab_cache_mb", 4096)) << 20
        sd_hijack.model_hijack.undo_hijack(model)
        try:
            targets = model.state_dict(keep_vars=True)
            # the WebUI's VAE choice (Settings / sd_vae) stays unless the merge merges the VAE
            wanted = (lambda key: True) if merge_vae else (lambda key: component_of(key) != VAE)
            sink = TensorSink(targets, on_abort=lambda: self._failed(model, merge_vae), keys=wanted, owner=id(model))
            try:
                yield sink
                self._vae_written = self._vae_written or merge_vae
            finally:
                _forget_lora_backups(model, sink.written)
        finally:
            sd_hijack.model_hijack.hijack(model)

    def _failed(self, model, with_vae: bool) -> None:
        """A merge stopped half way: put the original checkpoint back and forget the cached terms."""
        self._write_original(model, with_vae)
        self.live_cache.clear()
        if self._original is not None:
            model.sd_checkpoint_info, model.sd_model_hash = self._original
        self._original, self.loaded = None, None

    def _write_original(self, model, with_vae: bool) -> None:
        """Stream the checkpoint the WebUI loaded back into the model (after a failed or undone merge)."""
        from ..core.arch import VAE, component_of
        from ..core.files import open_model
        info = self._original[0] if self._original else model.sd_checkpoint_info
        targets = model.state_dict(keep_vars=True)
        written = []
        with open_model(info.filename) as f, torch.no_grad():
            for key in f.keys():
                t = targets.get(key)
                if t is None or (component_of(key) == VAE and not with_vae):
                    continue
                if tuple(t.shape) == f.tensors[key].shape:
                    t.copy_(f.read(key))
                    written.append(key)
        _forget_lora_backups(model, written)

    def set_loaded(self, merged: LoadedMerge) -> None:
        """Label the live model with the merge, so every infotext names it honestly."""
        model = self._model()
        info = copy.copy(self._original[0] if self._original else model.sd_checkpoint_info)
        info.name_for_extra = merged.name
        info.shorthash = merged.short_hash
        model.sd_checkpoint_info = self._label = info
        model.sd_model_hash = merged.short_hash
        self.loaded = merged

    def restore(self) -> None:
        from modules import sd_hijack, sd_vae
        if self._original is None:
            self.loaded = None
            return
        model = self._model()
        sd_hijack.model_hijack.undo_hijack(model)
        try:
            self._write_original(model, self._vae_written)
        finally:
            sd_hijack.model_hijack.hijack(model)
        model.sd_checkpoint_info, model.sd_model_hash = self._original
        self._original, self.loaded = None, None
        self.live_cache.clear()
        if self._vae_written:
            sd_vae.reload_vae_weights()  # put the user's VAE choice back on top of the checkpoint's own
            self._vae_written = False

    # ------------------------------------------------------------------------------------- generation
    def list_samplers(self) -> list[str]:
        from modules import sd_samplers
        return [s.name for s in sd_samplers.all_samplers]

    def generate(self, request: GenerationRequest) -> GenerationResult:
        from modules import processing, shared
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=request.prompt, negative_prompt=request.negative_prompt,
            seed=request.seed, steps=request.steps, cfg_scale=request.cfg_scale, width=request.width,
            height=request.height, sampler_name=request.sampler, batch_size=request.batch_size, n_iter=1,
            do_not_save_samples=True, do_not_save_grid=True)
        add_recipe_to_infotext(p, self.loaded)
        self._generating = True   # the WebUI's sampler counts the steps in shared.state (job_progress)
        try:
            with contextlib.closing(p):
                processed = processing.process_images(p)
        finally:
            self._generating = False
        return GenerationResult(list(processed.images), list(processed.infotexts))

    # ------------------------------------------------------------------------- progress and exclusivity
    def xyz_module(self):
        from modules import scripts
        for data in scripts.scripts_data:
            if data.script_class.__module__ == "xyz_grid.py":
                return getattr(data, "module", None)
        return None

    @contextlib.contextmanager
    def inside_generation(self):
        self._inside.on = True
        try:
            yield
        finally:
            self._inside.on = False

    def _in_generation(self) -> bool:
        return getattr(self._inside, "on", False)

    def begin_job(self, title: str) -> None:
        from modules import shared
        super().begin_job(title)
        if self._in_generation():   # the X/Y/Z plot's job: leave its progress and state alone
            return
        shared.state.begin(job="merge_lab")
        shared.state.job_count = 1
        shared.state.sampling_steps = 1000
        shared.state.textinfo = title

    def progress(self, fraction: float, text: str = "") -> None:
        from modules import shared
        super().progress(fraction, text)
        if self._in_generation():
            return
        shared.state.sampling_step = int(fraction * 1000)
        if text:
            shared.state.textinfo = text

    def end_job(self) -> None:
        from modules import shared
        if not self._in_generation():
            shared.state.end()

    def job_progress(self) -> tuple[float, str]:
        from modules import shared
        steps = getattr(shared.state, "sampling_steps", 0) or 0
        if getattr(self, "_generating", False) and steps:
            step = min(int(getattr(shared.state, "sampling_step", 0) or 0), steps)
            return step / steps, f"Step {step}/{steps}"
        return super().job_progress()

    def interrupt(self) -> None:
        from modules import shared
        super().interrupt()
        shared.state.interrupt()

    def interrupted(self) -> bool:
        from modules import shared
        return super().interrupted() or bool(shared.state.interrupted)

    def exclusive(self):
        from modules import call_queue
        return contextlib.nullcontext() if self._in_generation() else call_queue.queue_lock


def add_recipe_to_infotext(p, loaded: LoadedMerge | None) -> None:
    """Put the loaded merge's recipe into a generation's infotext, so pasting it back redoes the merge."""
    if loaded is not None:
        p.extra_generation_params[RECIPE_INFOTEXT_KEY] = loaded.recipe_json


def register_settings() -> None:
    """The "Merge Lab" section of the WebUI's Settings page."""
    import gradio as gr
    from modules import shared
    section = ("merge_lab", "Merge Lab")
    for key, default, label, choices in SETTINGS:
        if choices:
            info = shared.OptionInfo(default, label, gr.Dropdown, {"choices": choices}, section=section)
        else:
            info = shared.OptionInfo(default, label, section=section)
        shared.opts.add_option(key, info)


def api_dependencies() -> list:
    """The WebUI's API auth (--api-auth user:password,...) for our routes, when it is set."""
    from modules import shared
    if not getattr(shared.cmd_opts, "api_auth", None):
        return []
    from .auth import basic_auth
    logins = [tuple(item.split(":", 1)) for item in shared.cmd_opts.api_auth.split(",") if ":" in item]
    return [basic_auth(logins)]


def _forget_lora_backups(model, keys) -> None:
    """The WebUI's built-in Lora extension keeps, on each layer it has patched, a backup of the weights it found
    and the names of the LoRAs it applied; with a prompt's <lora:...> gone it copies that backup back. Weights
    we wrote are the new originals: reset those layers' caches (as its own network_reset_cached_weight does
    when the WebUI loads weights), or the next generation would put the pre-merge weights back."""
    layers = {key.rsplit(".", 1)[0] for key in keys}
    for name in layers:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            continue
        if hasattr(layer, "network_current_names"):
            layer.network_current_names = ()
            layer.network_weights_backup = None
            layer.network_bias_backup = None
