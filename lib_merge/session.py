"""What the Merge tab and the HTTP API do, in one place: build a recipe from names, merge into the live
model, save to the output folder, restore, report status.

Both front ends call these functions with a Host; errors are MergeError with messages for people, and a
failed action leaves the loaded model and the output folder as they were.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .core.errors import MergeError
from .core.files import human_size
from .engine.recipe import ModelRef, Recipe
from .host import Host, LoadedMerge


@dataclass
class MergeSummary:
    """The outcome of an action, for the tab's status line and the API's JSON."""
    ok: bool
    message: str
    recipe_json: str = ""
    name: str = ""
    short_hash: str = ""
    path: str = ""
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    rewritten: int | None = None   # tensors a live re-merge wrote (None: a full merge or no live cache)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "message": self.message, "recipe": self.recipe_json, "name": self.name,
                "short_hash": self.short_hash, "path": self.path, "seconds": round(self.seconds, 3),
                "warnings": self.warnings}


def recipe_from_names(host: Host, method: str, models: list[str], *, base: str | None = None,
                      params: dict | None = None, blocks: dict | None = None, **options) -> Recipe:
    """A recipe from checkpoint names as the host lists them (resolved to files by the host)."""
    names = [m for m in models if m]
    refs = [ModelRef(name=n, path=str(host.resolve_checkpoint(n))) for n in names]
    base_ref = ModelRef(name=base, path=str(host.resolve_checkpoint(base))) if base else None
    recipe = Recipe(method=method, models=refs, base=base_ref, params=dict(params or {}),
                    blocks={k: v for k, v in (blocks or {}).items() if v is not None}, **options)
    recipe.validate()
    return recipe


def resolve_recipe(host: Host, recipe: Recipe) -> Recipe:
    """Fill in the files of a pasted recipe's model names from the host's lists."""
    for ref in recipe.models + ([recipe.base] if recipe.base else []):
        if not ref.path or not Path(ref.path).is_file():
            ref.path = str(host.resolve_checkpoint(ref.name))
    recipe.validate()
    return recipe


def merged_name(recipe: Recipe) -> str:
    """A readable name for a merge, e.g. 'ties(a, b, c)'."""
    stems = [Path(m.name).stem for m in recipe.models]
    return f"{recipe.method}({', '.join(stems)})"


def _run(host: Host, title: str, work: Callable[[Callable], Any]) -> Any:
    """Run `work(progress)` holding the host's lock, with its progress and interrupt wired in."""
    with host.exclusive():
        host.begin_job(title)
        try:
            def progress(p):
                host.progress(p.fraction, f"{title}: {p.key}")
            return work(progress)
        finally:
            host.end_job()


def merge_to_memory(host: Host, recipe: Recipe, *, device: str | None = None) -> MergeSummary:
    """Merge straight into the host's live model (no file written); the recipe labels what is loaded.

    Where the host keeps a LiveCache, a recipe that differs from the loaded one only in per-block values
    rewrites just the keys whose values changed.
    """
    from .core.arch import VAE
    from .engine.merge import merge
    started = time.monotonic()
    try:
        family, shapes = header_of(host, recipe)

        def work(progress):
            with host.live_target(family, VAE in recipe.components, shapes) as sink:
                return merge(recipe, sink, search_dirs=host.search_dirs(), progress=progress,
                             cancel=host.interrupted, device=device or host.setting("merge_lab_device", "cpu"),
                             threads=host.setting("merge_lab_threads", None) or None, live=host.live_cache)

        result = _run(host, "Merging", work)
        merged = LoadedMerge(merged_name(recipe), recipe_hash(recipe), recipe.public_json())
        host.set_loaded(merged)
    except MergeError as e:
        return MergeSummary(False, str(e))
    seconds = time.monotonic() - started
    how = "" if host.live_cache is None or not host.live_cache.params else f" ({result.rewritten} tensors rewritten)"
    notes = [host.live_cache.note] if host.live_cache is not None and host.live_cache.note else []
    return MergeSummary(True, f"Merged {merged.name} into memory in {seconds:.1f} s{how}.",
                        recipe.public_json(indent=2), merged.name, merged.short_hash, seconds=seconds,
                        warnings=result.warnings + notes, rewritten=result.rewritten if how else None)


def header_of(host: Host, recipe: Recipe) -> tuple[str, dict]:
    """The architecture family and the {key: shape} of the recipe's model A, from its header."""
    from .core.files import checkpoint_layout
    from .engine.merge import resolve_model_path
    return checkpoint_layout(resolve_model_path(recipe.models[0], host.search_dirs()))


def save(host: Host, recipe: Recipe, name: str, *, overwrite: bool = False, device: str | None = None) -> MergeSummary:
    """Merge straight to `name` in the host's output folder (streaming; the recipe goes into the metadata)."""
    from .core.files import safe_output_path
    from .engine.merge import merge
    from .engine.sinks import FileSink
    started = time.monotonic()
    try:
        path = safe_output_path(host.output_dir(), name)
        result = _run(host, "Saving", lambda progress: merge(
            recipe, FileSink(path, overwrite=overwrite), search_dirs=host.search_dirs(), progress=progress,
            cancel=host.interrupted, device=device or host.setting("merge_lab_device", "cpu"),
            threads=host.setting("merge_lab_threads", None) or None))
        host.saved(path)
    except MergeError as e:
        return MergeSummary(False, str(e))
    return MergeSummary(True, f"Saved {path.name} ({human_size(path.stat().st_size)}) in "
                              f"{time.monotonic() - started:.1f} s.", recipe.public_json(indent=2), path.stem,
                        path=str(path), seconds=time.monotonic() - started, warnings=result.warnings)


@dataclass
class GenerationSummary:
    ok: bool
    message: str
    images: list = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)


def generate(host: Host, request) -> GenerationSummary:
    """txt2img with whatever the host has loaded (the merge, if one is), holding the host's lock."""
    started = time.monotonic()
    try:
        result = _run(host, "Generating", lambda progress: host.generate(request))
    except MergeError as e:
        return GenerationSummary(False, str(e))
    return GenerationSummary(True, f"Generated {len(result.images)} image(s) in {time.monotonic() - started:.1f} s.",
                             list(result.images), list(result.infotexts))


def restore(host: Host) -> MergeSummary:
    try:
        with host.exclusive():
            host.restore()
    except MergeError as e:
        return MergeSummary(False, str(e))
    return MergeSummary(True, "Original model restored." if host.has_original_model
                        else "The merge was dropped from memory.")


def status(host: Host) -> dict:
    loaded = host.loaded
    return {"host": host.name, "can_generate": host.can_generate, "has_live_model": host.has_live_model,
            "loaded": None if loaded is None else {"name": loaded.name, "short_hash": loaded.short_hash,
                                                   "recipe": loaded.recipe_json}}


def recipe_hash(recipe: Recipe) -> str:
    """A 10-hex-digit hash of the recipe: the honest 'model hash' of a merge that has no file."""
    import hashlib
    return hashlib.sha256(recipe.public_json().encode()).hexdigest()[:10]
