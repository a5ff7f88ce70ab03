"""Plan + streaming executor + sinks.

    Recipe --plan--> Tasks (one per output key) --execute (threads, device, compute dtype)--> Sink

A task reads its key from each input in row chunks with positioned reads into the worker's reused buffers,
runs the method on the compute device, casts to the output dtype and hands the chunk to the sink, which
writes it at its final place. Memory is a few chunks per worker, never a whole model.

Sinks: FileSink (streaming .safetensors, atomic) and DictSink (in memory). Both receive the full list of
(key, dtype, shape) before any data, so a file's layout is fixed up front.
"""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import arch as archmod
from .arch import Architecture, component_of
from .errors import CancelledError, InputError, MergeError, NonFiniteError
from .heap import steady_heap
from .methods import MethodSpec, get_method
from .models import ModelFile, SafetensorsWriter, check_output_path, dtype_from_name, file_hashes, open_model
from .randomness import ChunkRandom, rng_block_rows
from .recipe import ModelRef, Recipe
from .weights import value_for_key

DEFAULT_CHUNK_ELEMS = 1 << 21   # 2 M elements per chunk: 8 MB in float32, small enough to reuse heap memory
WORKER_BUDGET_BYTES = 192 << 20  # per worker, for the chunks of all inputs and a method's temporaries


def chunk_elems_for(n_inputs: int) -> int:
    """Elements per chunk so that a worker's buffers stay within WORKER_BUDGET_BYTES for n inputs.

    About 12 bytes per element and input: the raw read, the float32 stack, and the method's temporaries.
    """
    return max(1 << 16, min(DEFAULT_CHUNK_ELEMS, WORKER_BUDGET_BYTES // (12 * max(n_inputs, 1))))

DROPPED_PREFIXES = ("model_ema.",)  # EMA copies of A would mislabel a merge; the WebUI does not use them


@dataclass
class Task:
    key: str
    action: str                      # "merge" | "copy"
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    params: dict[str, Any] = field(default_factory=dict)
    region: tuple[int, ...] | None = None   # merge only this leading region (shape mismatch); rest from A
    nbytes: int = 0


@dataclass
class Plan:
    arch: Architecture
    method: MethodSpec
    tasks: list[Task]
    warnings: list[str]
    n_models: int = 2                # inputs[:n_models] are the models, inputs[n_models] the base if any

    @property
    def entries(self):
        return [(t.key, t.out_dtype, t.shape) for t in self.tasks]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)


def plan_merge(recipe: Recipe, inputs: list[ModelFile]) -> Plan:
    """One task per output key. The output has A's keys (minus EMA); what is merged follows the recipe.

    `inputs` are the recipe's models in order, then its base model if it has one. A is the first model.
    """
    spec = get_method(recipe.method)
    shapes = [{k: info.shape for k, info in m.tensors.items()} for m in inputs]
    archs = [(m.name, archmod.detect(s, m.name)) for m, s in zip(inputs, shapes)]
    arch = archmod.check_same_family(archs)
    family = arch.family
    count = archmod.FAMILY_BLOCK_COUNT[family]
    for name, values in recipe.blocks.items():
        if values is not None and len(values) != count:
            raise InputError(f"{arch.label} takes {count} block weights for '{name}', the recipe has {len(values)}.")
    out_dtype = dtype_from_name(recipe.dtype)
    a = inputs[0]
    others = inputs[1:]
    tasks: list[Task] = []
    warnings: list[str] = []
    missing: list[str] = []
    mismatched: list[str] = []
    unweighted: list[str] = []
    for key, info in sorted(a.tensors.items(), key=lambda kv: kv[1].offset):
        if key.startswith(DROPPED_PREFIXES):
            continue
        comp = component_of(key)
        merge = (comp in recipe.components and info.is_float and not key.endswith("position_ids"))
        dtype = out_dtype if info.is_float and not key.endswith("position_ids") else info.dtype
        task = Task(key, "copy", info.shape, dtype, nbytes=info.numel * dtype.itemsize)
        tasks.append(task)
        if not merge:
            continue
        absent = [m.name for m in others if key not in m.tensors]
        if absent:
            if recipe.missing_keys == "error":
                raise InputError(f"Key '{key}' of '{a.name}' is missing from {', '.join(absent)} "
                                 f"(set missing keys to keep_a to copy it from A).")
            missing.append(key)
            continue
        other_shapes = [m.tensors[key].shape for m in others]
        if any(s != info.shape for s in other_shapes):
            if any(len(s) != len(info.shape) for s in other_shapes):
                mismatched.append(key)
                continue
            task.region = tuple(min(d) for d in zip(info.shape, *other_shapes))
            mismatched.append(key)
        task.params = {name: value_for_key(key, family, recipe.blocks.get(name), value)
                       for name, value in recipe.params.items()}
        if recipe.layer_weights is not None:
            values = recipe.layer_weights["values"]
            if key not in values:  # a per-key weight set names the keys to merge; the others stay A's
                unweighted.append(key)
                continue
            task.params[recipe.layer_weights["param"]] = values[key]
        task.action = "merge"
    if missing:
        warnings.append(f"{len(missing)} key(s) of A are missing from other models and were copied from A "
                        f"(e.g. {missing[0]}).")
    if unweighted:
        warnings.append(f"{len(unweighted)} key(s) have no value in the per-key weight set and were copied from A "
                        f"(e.g. {unweighted[0]}).")
    if mismatched:
        warnings.append(f"{len(mismatched)} key(s) differ in shape between the models; the common part was merged "
                        f"and the rest kept from A (e.g. {mismatched[0]}).")
    extra = set().union(*(m.tensors.keys() for m in others)) - set(a.tensors) if others else set()
    extra = {k for k in extra if not k.startswith(DROPPED_PREFIXES)}
    if extra:
        warnings.append(f"{len(extra)} key(s) present only in other models were left out (the output follows A's keys).")
    return Plan(arch, spec, tasks, warnings, n_models=len(recipe.models))


# -------------------------------------------------------------------------------------------- sinks

class Sink:
    """Where a merge goes. `open` gets every (key, dtype, shape) and a draft of the metadata before any
    data; `write` gets row chunks from any thread; `close` finishes with the metadata; `abort` undoes."""

    def open(self, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata_draft: dict | None = None) -> None: ...
    def write(self, key: str, tensor: torch.Tensor, row0: int = 0) -> None: ...
    def close(self, metadata: dict[str, str]) -> Any: ...
    def abort(self) -> None: ...

    def dtype_for(self, key: str, planned: torch.dtype) -> torch.dtype:
        """The dtype the sink wants for `key` (files and state dicts: the recipe's output dtype)."""
        return planned


class FileSink(Sink):
    """Streaming .safetensors output: space reserved first, chunks written in place, atomic rename."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        self.inputs: list[Path] = []
        self.writer: SafetensorsWriter | None = None

    def open(self, entries, metadata_draft=None):
        check_output_path(self.path, self.inputs, self.overwrite)
        self.writer = SafetensorsWriter(self.path, entries, metadata_draft)

    def write(self, key, tensor, row0=0):
        self.writer.write(key, tensor, row0)

    def close(self, metadata):
        return self.writer.commit(metadata)

    def abort(self):
        if self.writer is not None:
            self.writer.abort()


class DictSink(Sink):
    """In-memory output: a state dict allocated once, filled chunk by chunk."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.state: dict[str, torch.Tensor] = {}
        self.metadata: dict[str, str] = {}

    def open(self, entries, metadata_draft=None):
        self.state = {k: torch.empty(shape, dtype=dtype, device=self.device) for k, dtype, shape in entries}

    def write(self, key, tensor, row0=0):
        dst = self.state[key]
        if dst.dim() == 0:
            dst.copy_(tensor.reshape(()))
        else:
            dst[row0:row0 + tensor.shape[0]].copy_(tensor)

    def close(self, metadata):
        self.metadata = metadata
        return self.state

    def abort(self):
        self.state = {}


class TensorSink(Sink):
    """Into existing tensors (a live model's parameters), chunk by chunk: no second copy of the model.

    `targets` maps checkpoint key names to tensors (any device and dtype: copy_ converts); keys without a
    target are skipped (`skipped` lists them). `on_abort` is called if the merge fails half way, so the
    owner can put the model back in a known state.
    """

    def __init__(self, targets: dict[str, torch.Tensor], on_abort: Callable[[], None] | None = None,
                 keys: Callable[[str], bool] | None = None, owner: Any = None):
        self.targets = targets
        self.owner = owner if owner is not None else id(targets)  # what a LiveCache is tied to
        self.on_abort = on_abort
        self.wanted = keys or (lambda key: True)
        self.skipped: list[str] = []
        self.written: set[str] = set()    # keys written into (a host resets what it cached about them)
        self.metadata: dict[str, str] = {}

    def open(self, entries, metadata_draft=None):
        for key, dtype, shape in entries:
            t = self.targets.get(key)
            if t is None or not self.wanted(key):
                self.skipped.append(key)
            elif tuple(t.shape) != tuple(shape):
                raise InputError(f"The loaded model's '{key}' has shape {list(t.shape)}, the merge's {list(shape)}: "
                                 f"load a model of the merge's architecture first.")

    def dtype_for(self, key, planned):
        # a live model keeps its own precision: no rounding through the recipe's file dtype on the way
        t = self.targets.get(key)
        return t.dtype if t is not None and t.dtype.is_floating_point and planned.is_floating_point else planned

    def write(self, key, tensor, row0=0):
        t = self.targets.get(key)
        if t is None or not self.wanted(key):
            return
        with torch.no_grad():
            if t.dim() == 0:
                t.copy_(tensor.reshape(()))
            else:
                t[row0:row0 + tensor.shape[0]].copy_(tensor)
        self.written.add(key)

    def close(self, metadata):
        self.metadata = metadata
        return self.targets

    def abort(self):
        if self.on_abort is not None:
            self.on_abort()


# ----------------------------------------------------------------------------------------- executor

class _Workspace:
    """Per-worker buffers reused from chunk to chunk: raw reads, compute copies and the output cast.

    Fresh multi-megabyte tensors per chunk cost more in page faults than the arithmetic itself (measured:
    4x slower add_difference), so the hot path allocates nothing once the buffers have grown.
    """

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def _get(self, name, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        slot = (name, dtype, device)
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1 << 14), dtype=dtype, device=device)
            self.buffers[slot] = buf
        return buf[:numel]

    def raw(self, slot: int, nbytes: int) -> torch.Tensor:
        return self._get(("raw", slot), nbytes, torch.uint8, torch.device("cpu"))

    def stack(self, name: str, n: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reused (n, *shape) buffer: one row per input model, filled by the reader."""
        numel = n
        for d in shape:
            numel *= d
        return self._get(("stack", name), numel, dtype, device).view((n,) + tuple(shape))

    def floats(self, name: str, numel: int) -> torch.Tensor:
        return self._get(("floats", name), numel, torch.float32, torch.device("cpu"))

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`t` in the output dtype on the CPU (a reused buffer unless `t` already is)."""
        if t.dtype == dtype and t.device.type == "cpu":
            return t
        buf = self._get("out", t.numel(), dtype, torch.device("cpu")).view(t.shape)
        buf.copy_(t)
        return buf


@dataclass
class Progress:
    done_bytes: int
    total_bytes: int
    key: str
    elapsed: float

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0


@dataclass
class Chunk:
    rows: tuple[int, int] | None     # rows of the key's first dimension; None = the whole tensor
    models: torch.Tensor             # (n_models, *chunk shape) in the compute dtype, scratch: may be overwritten
    base: torch.Tensor | None
    rng: ChunkRandom


class KeyStream:
    """One key of every input, in row chunks, for a method's statistics passes and the final pass.

    Chunks hold whole random blocks (see ChunkRandom) so random methods give the same bits whatever the
    chunk size. Each pass re-reads the inputs into the worker's reused buffers.
    """

    def __init__(self, key: str, shape: tuple[int, ...], models: list[ModelFile], base: ModelFile | None,
                 ws: _Workspace, device: torch.device, dtype: torch.dtype, chunk_elems: int | None,
                 seed: int, region: tuple[int, ...] | None = None):
        self.key, self.models, self.base_file, self.ws = key, models, base, ws
        self.device, self.dtype, self.seed, self.region = device, dtype, seed, region
        self.shape = tuple(region) if region is not None else tuple(shape)
        self.n = len(models)
        if region is not None or not self.shape or chunk_elems is None:
            self.chunk_rows = None
        else:
            per_row = 1
            for d in self.shape[1:]:
                per_row *= d
            block = rng_block_rows(self.shape)
            rows = max(block, (chunk_elems // max(per_row, 1)) // block * block)
            self.chunk_rows = None if rows >= self.shape[0] else rows

    def row_ranges(self):
        if self.chunk_rows is None:
            yield None
            return
        for r0 in range(0, self.shape[0], self.chunk_rows):
            yield (r0, min(self.shape[0], r0 + self.chunk_rows))

    def _read_into(self, dst: torch.Tensor, slot: int, model: ModelFile, rows) -> None:
        if self.region is not None:
            src = model.read(self.key)[tuple(slice(0, d) for d in self.region)]
        else:
            info = model.tensors[self.key]
            nbytes = info.nbytes
            if rows is not None:
                nbytes = (info.nbytes // info.shape[0]) * (rows[1] - rows[0])
            src = model.read(self.key, rows, self.ws.raw(slot, nbytes))
        dst.copy_(src)

    def chunks(self):
        for rows in self.row_ranges():
            shape = self.shape if rows is None else (rows[1] - rows[0],) + self.shape[1:]
            stack = self.ws.stack("models", self.n, shape, self.dtype, self.device)
            for i, m in enumerate(self.models):
                self._read_into(stack[i], i, m, rows)
            base = None
            if self.base_file is not None:
                base = self.ws.stack("base", 1, shape, self.dtype, self.device)[0]
                self._read_into(base, self.n, self.base_file, rows)
            yield Chunk(rows, stack, base, ChunkRandom(self.seed, self.key, self.shape, rows))

    def whole(self, i: int) -> torch.Tensor:
        """Input i (models..., then the base at index n) as a fresh whole tensor in the compute dtype."""
        model = self.models[i] if i < self.n else self.base_file
        t = model.read(self.key)
        if self.region is not None:
            t = t[tuple(slice(0, d) for d in self.region)]
        return t.to(self.device, self.dtype, copy=True)


def execute(plan: Plan, inputs: list[ModelFile], sink: Sink, *, seed: int = 0,
            compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
            threads: int | None = None, chunk_elems: int | None = None,
            progress: Callable[[Progress], None] | None = None,
            cancel: Callable[[], bool] | None = None, nonfinite: str = "warn", mask=None,
            metadata_draft: dict | None = None, capture: dict | None = None,
            live_terms: dict | None = None, open_entries: list | None = None) -> list[str]:
    """Run every task into the sink. Returns the keys that came out non-finite (policy 'warn').

    `mask` (a masks.Mask) restricts what may change: where it is False the output keeps A's values.
    `capture` (a dict) receives each merged key's terms (methods with a finish step) for live re-merges;
    `live_terms` are such terms from an earlier merge: those keys are only finished again.
    `open_entries`: what the sink is opened with when the plan is a part of the merge (a live re-merge
    writes some keys, but the sink still learns the whole model's layout).
    """
    device = torch.device(device)
    if threads is None:
        threads = max(1, min(os.cpu_count() or 1, 8)) if device.type == "cpu" else 2
    spec = plan.method
    models, base = inputs[:plan.n_models], (inputs[plan.n_models] if len(inputs) > plan.n_models else None)
    a = models[0]
    if chunk_elems is None:
        chunk_elems = chunk_elems_for(len(inputs))
    total = plan.total_bytes
    done = [0]
    lock = threading.Lock()
    stop = threading.Event()
    bad_keys: list[str] = []
    local = threading.local()
    started = time.monotonic()

    def workspace() -> _Workspace:
        ws = getattr(local, "ws", None)
        if ws is None:
            ws = local.ws = _Workspace()
        return ws

    def read(model: ModelFile, key: str, rows, ws: _Workspace) -> torch.Tensor:
        info = model.tensors[key]
        nbytes = info.nbytes
        if rows is not None and info.shape:
            nbytes = (info.nbytes // info.shape[0]) * (rows[1] - rows[0]) if info.shape[0] else 0
        return model.read(key, rows, ws.raw(0, nbytes))

    def emit(task: Task, out: torch.Tensor, row0: int) -> None:
        # one cheap reduction instead of isfinite().all() (10x slower): NaN/Inf propagate into the sum
        if out.dtype.is_floating_point and out.numel() and not _all_finite(out):
            with lock:
                if task.key not in bad_keys:
                    bad_keys.append(task.key)
            if nonfinite == "error":
                raise NonFiniteError(f"The merge produced NaN/Inf in '{task.key}'. Check the parameters "
                                     f"(or the inputs); set the non-finite policy to 'warn' to save anyway.")
        sink.write(task.key, out, row0)

    def run_task(task: Task) -> None:
        if stop.is_set():
            return
        if cancel is not None and cancel():
            stop.set()
            raise CancelledError("Merge interrupted: nothing was written.")
        ws = workspace()
        if task.action == "copy":
            for rows in _chunks(task.shape, chunk_elems):
                t = read(a, task.key, rows, ws)
                emit(task, ws.cast(t, sink.dtype_for(task.key, task.out_dtype)), rows[0] if rows else 0)
        elif live_terms is not None and task.key in live_terms:
            # a live re-merge: the terms are kept; only the per-block parameters changed
            out = spec.finish(live_terms[task.key], inplace=False, **task.params)
            emit(task, ws.cast(out, sink.dtype_for(task.key, task.out_dtype)), 0)
        else:
            stream = KeyStream(task.key, task.shape, models, base, ws, device, compute_dtype,
                               chunk_elems if spec.chunkable else None, seed, task.region)
            stats = spec.prepare(stream, **task.params) if spec.prepare is not None else None
            keep = capture is not None and task.region is None and spec.finish is not None
            if task.region is not None:
                full = a.read(task.key).to(device, compute_dtype)
            for chunk in stream.chunks():
                terms = [] if keep else None
                out = spec.apply(chunk.models, base=chunk.base, stats=stats, rng=chunk.rng, params=task.params,
                                 terms_out=terms)
                if keep:
                    _store_terms(capture, task, chunk.rows, terms[0], lock)
                if task.region is not None:
                    full[tuple(slice(0, d) for d in task.region)] = out
                    out = full
                if mask is not None:
                    out = _apply_mask(mask, task, out, chunk.rows, a, read, ws, device, compute_dtype)
                emit(task, ws.cast(out, sink.dtype_for(task.key, task.out_dtype)), chunk.rows[0] if chunk.rows else 0)
        with lock:
            done[0] += task.nbytes
            if progress is not None:
                progress(Progress(done[0], total, task.key, time.monotonic() - started))

    old_threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)  # parallelism comes from the workers; no oversubscription
    try:
        sink.open(open_entries or plan.entries, metadata_draft)
        try:
            with steady_heap():
                if threads <= 1:
                    for task in plan.tasks:
                        run_task(task)
                else:
                    with ThreadPoolExecutor(threads, thread_name_prefix="merge") as pool:
                        futures = [pool.submit(run_task, t) for t in plan.tasks]
                        try:
                            for f in futures:
                                f.result()
                        except BaseException:
                            stop.set()
                            for f in futures:
                                f.cancel()
                            raise
        except BaseException:
            sink.abort()
            raise
    finally:
        if torch.get_num_threads() != old_threads:
            torch.set_num_threads(old_threads)
    return bad_keys


def _store_terms(capture: dict, task: Task, rows, terms: tuple, lock) -> None:
    """Copy one chunk's terms into whole-key tensors kept for live re-merges."""
    with lock:
        kept = capture.get(task.key)
        if kept is None:
            kept = capture[task.key] = tuple(torch.empty(task.shape, dtype=t.dtype, device=t.device) for t in terms)
    for dst, t in zip(kept, terms):
        if rows is None:
            dst.copy_(t.reshape(dst.shape))
        else:
            dst[rows[0]:rows[1]].copy_(t)


def _apply_mask(mask, task: Task, out: torch.Tensor, rows, a: ModelFile, read, ws, device, dtype) -> torch.Tensor:
    """Where the mask is False, put A's values back (the method overwrote its copy of A: read it again)."""
    m = mask.get(task.key, task.shape, rows)
    if m is None:
        return out
    original = read(a, task.key, rows, ws).to(device, dtype)
    return torch.where(m.to(device), out, original)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _all_finite(t: torch.Tensor) -> bool:
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(t).all())  # the sum itself may overflow: check exactly


def _chunks(shape: tuple[int, ...], chunk_elems: int | None):
    """Row ranges [r0, r1) covering the first dimension with about chunk_elems elements each."""
    if not shape or chunk_elems is None:
        yield None
        return
    rows = shape[0]
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    step = max(1, chunk_elems // max(per_row, 1))
    if step >= rows:
        yield None
        return
    for r0 in range(0, rows, step):
        yield (r0, min(rows, r0 + step))


# ------------------------------------------------------------------------------------ live re-merges

class LiveCache:
    """What a live model needs to be re-merged fast after a change of per-block parameters.

    After a full merge into a TensorSink it holds, per merged key, the method's terms (the parts that do
    not depend on α, β, λ or ratio) on the compute device, and the parameter values last written. When the
    next recipe differs only in those values (sliders, block weights, per-key weights), only the keys
    whose values changed are finished again and written into the live tensors. Anything else (another
    model, method, seed, mask, dtype...) is a full merge. Terms need memory: when they would not fit in
    `budget_bytes`, nothing is kept and every merge is a full one (`note` says so).
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.clear()

    def clear(self) -> None:
        self.signature: str | None = None
        self.owner = None                  # the live model the terms were written into
        self.terms: dict[str, tuple] = {}
        self.params: dict[str, dict] = {}
        self.note = ""

    @staticmethod
    def signature_of(recipe: Recipe, device, compute_dtype) -> str:
        """Everything about a recipe except the values a re-merge may change."""
        spec = get_method(recipe.method)
        d = recipe.to_dict()
        d["params"] = {k: v for k, v in d["params"].items() if k not in spec.blockwise_params}
        for k in ("blocks", "layer_weights", "arch"):
            d.pop(k, None)
        for m in d["models"] + ([d["base"]] if d.get("base") else []):
            m.pop("sha256", None), m.pop("short_hash", None)
        d["_device"], d["_compute"] = str(device), str(compute_dtype)
        return json.dumps(d, sort_keys=True)

    def reusable(self, signature: str, owner) -> bool:
        return bool(self.terms) and signature == self.signature and owner == self.owner

    def bytes_needed(self, plan: Plan, compute_dtype: torch.dtype) -> int:
        n = plan.method.n_terms
        return sum(_numel(t.shape) * n * compute_dtype.itemsize
                   for t in plan.tasks if t.action == "merge" and t.region is None)


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


def _live_plan(live: LiveCache | None, recipe: Recipe, sink: Sink, plan: Plan, mask, device, compute_dtype):
    """(plan to run, dict to capture terms into or None, kept terms or None, recipe signature).

    With a LiveCache that holds this recipe's terms for this live model, only the merged keys whose
    per-block values changed are run; otherwise the whole plan, keeping the terms when they fit.
    """
    if live is None or not isinstance(sink, TensorSink):
        return plan, None, None, None
    signature = LiveCache.signature_of(recipe, device, compute_dtype)
    if live.reusable(signature, sink.owner):
        changed = [t for t in plan.tasks if t.action == "merge" and live.params.get(t.key) != t.params]
        return Plan(plan.arch, plan.method, changed, plan.warnings, plan.n_models), None, live.terms, signature
    live.clear()
    need = live.bytes_needed(plan, compute_dtype)
    if plan.method.finish is None or mask is not None:
        live.note = "this method (or a mask) needs a full merge on every change"
    elif need > live.budget_bytes:
        live.note = (f"re-merges are full merges: keeping this merge's terms needs {need / 2**30:.1f} GiB, "
                     f"more than the {live.budget_bytes / 2**30:.1f} GiB budget (Settings)")
    else:
        return plan, {}, None, signature
    return plan, None, None, signature


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
    from .masks import Mask
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
        if Path(ref.path).is_file():
            return Path(ref.path)
        raise InputError(f"Model file not found: '{ref.path}'.")
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
        run_plan, capture, live_terms, signature = _live_plan(live, recipe, sink, plan, mask, device, compute_dtype)
        try:
            bad = execute(run_plan, inputs, sink, seed=recipe.seed, compute_dtype=compute_dtype,
                          device=device, threads=threads, chunk_elems=chunk_elems, progress=progress, cancel=cancel,
                          nonfinite=recipe.nonfinite, mask=mask, metadata_draft=draft, capture=capture,
                          live_terms=live_terms, open_entries=plan.entries)
        except BaseException:
            if live is not None:
                live.clear()   # the live tensors are half written: the kept values no longer describe them
            raise
        if capture is not None:
            live.terms, live.signature, live.owner = capture, signature, sink.owner
        if live is not None and live.terms:
            live.params.update({t.key: t.params for t in run_plan.tasks if t.action == "merge"})
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
