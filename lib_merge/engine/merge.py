"""The whole merge: open the inputs, plan, execute into a sink, finish with the recipe in the metadata.

    Recipe --plan--> Tasks (one per output key) --execute (threads, device, compute dtype)--> Sink

A task reads its key from each input in row chunks with positioned reads into the worker's reused buffers,
runs the method on the compute device, casts to the output dtype and hands the chunk to the sink, which
writes it at its final place. Memory is a few chunks per worker, never a whole model.

Sinks: FileSink (streaming .safetensors, atomic) and DictSink (in memory). Both receive the full list of
(key, dtype, shape) before any data, so a file's layout is fixed up front.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.arch import Architecture
from ..core.errors import InputError, MergeError
from ..core.devices import check_device
from ..core.files import ModelFile, check_model_file, dtype_from_name, file_hashes, open_model
from .execute import Progress, execute
from .live import LiveCache
from .plan import plan_merge
from .recipe import ModelRef, Recipe
from .sinks import FileSink, Sink

# ------------------------------------------------------------------------------------ the whole merge

@dataclass
class MergeResult:
    recipe: Recipe
    arch: Architecture
    warnings: list[str]
    nonfinite_keys: list[str]
    seconds: float
    output: Any = None               # Path for a FileSink, the state dict for a DictSink
    metadata: dict[str, str] = field(default_factory=dict)
    rewritten: int = 0               # keys written (all of them, or those a live re-merge changed)


def _draft_metadata(recipe: Recipe, refs: list[ModelRef], inputs: list[ModelFile]) -> dict[str, str]:
    saved = [(r.sha256, r.short_hash) for r in refs]
    for i, r in enumerate(refs):  # distinct placeholders: sd_merge_models is keyed by sha256
        r.sha256, r.short_hash = r.sha256 or f"{i:064x}", r.short_hash or "0" * 10
    try:
        return recipe.metadata([m.metadata for m in inputs], ["0" * 8] * len(refs))
    finally:
        for r, (sha, short) in zip(refs, saved):
            r.sha256, r.short_hash = sha, short


def _load_mask(recipe: Recipe, search_dirs, verify_hashes: bool):
    """The recipe's mask file, loaded (its sha256 checked against the recipe when redoing one)."""
    if recipe.mask is None:
        return None
    from ..core.masks import Mask
    path = resolve_model_path(recipe.mask, search_dirs)
    h = file_hashes(path)
    if verify_hashes and recipe.mask.sha256 and recipe.mask.sha256 != h["sha256"]:
        raise InputError(f"The mask '{recipe.mask.name}' is not the file this recipe was made with.")
    recipe.mask.path, recipe.mask.sha256, recipe.mask.short_hash = str(path), h["sha256"], h["short_hash"]
    return Mask.load(path)


def resolve_model_path(ref: ModelRef, search_dirs: list[str | os.PathLike] = ()) -> Path:
    """A model reference -> an existing file: its path if it exists, else its name in the search folders."""
    if ref.path and not search_dirs:
        # an explicit path is taken as given: never silently fall back to another file of that name
        return check_model_file(ref.path)
    candidates = ([Path(ref.path)] if ref.path else []) + [Path(d) / ref.name for d in search_dirs]
    if not search_dirs:
        candidates.append(Path(ref.name))
    for c in candidates:
        if c.is_file():
            return c
    where = ", ".join(str(d) for d in search_dirs) or "the current folder"
    raise InputError(f"Model '{ref.name}' not found (looked in {where}).")


def merge(recipe: Recipe, sink: Sink, *, search_dirs: list[str | os.PathLike] = (), device: str = "cpu",
          threads: int | None = None, chunk_elems: int | None = None,
          progress: Callable[[Progress], None] | None = None, cancel: Callable[[], bool] | None = None,
          verify_hashes: bool = False, hashes: bool = True, live: LiveCache | None = None) -> MergeResult:
    """Open the inputs, plan, merge into `sink`, and finish it with the recipe in the metadata.

    Input hashes are computed (or taken from the cache) in a background thread while the merge runs.
    With verify_hashes, inputs whose sha256 differs from the recipe's are refused before any work.
    With `live` (and a TensorSink), a recipe that differs from the last one only in per-block values
    re-merges just the keys whose values changed (MergeResult.rewritten counts them).
    """
    started = time.monotonic()
    recipe.validate()
    device = str(check_device(device))   # before any file is opened or written
    refs = recipe.models + ([recipe.base] if recipe.base is not None else [])
    paths = [resolve_model_path(r, search_dirs) for r in refs]
    if isinstance(sink, FileSink):
        sink.inputs = paths
    inputs: list[ModelFile] = []
    try:
        for p in paths:
            inputs.append(open_model(p))
        plan = plan_merge(recipe, inputs)
        recipe.arch = plan.arch.family
        for ref, p in zip(refs, paths):
            ref.path = str(p)
        mask = _load_mask(recipe, search_dirs, verify_hashes)
        hash_results: list[dict | None] = [None] * len(paths)
        hash_errors: list[BaseException] = []

        def compute_hashes():
            try:
                for i, p in enumerate(paths):
                    hash_results[i] = file_hashes(p)
            except BaseException as e:  # reported after the merge
                hash_errors.append(e)

        hasher = None
        if verify_hashes and any(r.sha256 for r in refs):
            compute_hashes()
            for ref, h in zip(refs, hash_results):
                if ref.sha256 and h and h["sha256"] != ref.sha256:
                    raise InputError(f"'{ref.name}' is not the file this recipe was made with: its sha256 is "
                                     f"{h['short_hash']}, the recipe says {ref.sha256[:10]}.")
        elif hashes:
            hasher = threading.Thread(target=compute_hashes, name="merge-hash", daemon=True)
            hasher.start()
        # the header's room is sized from a draft of the metadata, with placeholder hashes of the final length
        draft = _draft_metadata(recipe, refs, inputs)
        compute_dtype = dtype_from_name(recipe.compute_dtype)
        run_plan, run_inputs, signature = plan, inputs, None
        if live is not None:
            run_plan, run_inputs, signature = live.plan_for(recipe, sink, plan, inputs, device, compute_dtype)
        try:
            bad = execute(run_plan, run_inputs, sink, seed=recipe.seed, compute_dtype=compute_dtype,
                          device=device, threads=threads, chunk_elems=chunk_elems, progress=progress, cancel=cancel,
                          nonfinite=recipe.nonfinite, mask=mask, metadata_draft=draft, open_entries=plan.entries)
        except BaseException:
            if live is not None:
                live.clear()   # the live tensors are half written: the kept values no longer describe them
            raise
        if signature is not None:
            live.written(signature, sink.owner, run_plan)
        if hasher is not None:
            hasher.join()
        warnings = list(plan.warnings)
        if hash_errors:
            warnings.append(f"Could not hash the inputs ({hash_errors[0]}); the recipe has no sha256 for them.")
        if bad:
            warnings.append(f"NaN/Inf values in {len(bad)} key(s): {', '.join(bad[:10])}"
                            f"{' ...' if len(bad) > 10 else ''}.")
        for ref, h in zip(refs, hash_results):
            if h:
                ref.sha256, ref.short_hash = h["sha256"], h["short_hash"]
        metadata = recipe.metadata([m.metadata for m in inputs],
                                   [h["legacy_hash"] if h else None for h in hash_results])
        try:
            output = sink.close(metadata)
        except BaseException:
            sink.abort()
            raise
        return MergeResult(recipe, plan.arch, warnings, bad, time.monotonic() - started, output, metadata,
                           rewritten=len(run_plan.tasks))
    except MergeError:
        raise
    except MemoryError:
        raise MergeError("Out of memory during the merge: lower the thread count or close other programs.") from None
    finally:
        for m in inputs:
            m.close()
