"""The streaming executor: a plan's tasks on a thread pool, each key read in row chunks with positioned reads
into the worker's reused buffers, merged on the compute device, cast once and handed to the sink."""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.errors import CancelledError, NonFiniteError
from ..core.files import ModelFile
from ..core.heap import steady_heap
from ..core.randomness import ChunkRandom, rng_block_rows
from .plan import Plan, Task
from .sinks import Sink

DEFAULT_CHUNK_ELEMS = 1 << 21   # 2 M elements per chunk: 8 MB in float32, small enough to reuse heap memory
WORKER_BUDGET_BYTES = 192 << 20  # per worker, for the chunks of all inputs and a method's temporaries


def chunk_elems_for(n_inputs: int) -> int:
    """Elements per chunk so that a worker's buffers stay within WORKER_BUDGET_BYTES for n inputs.

    About 12 bytes per element and input: the raw read, the float32 stack, and the method's temporaries.
    """
    return max(1 << 16, min(DEFAULT_CHUNK_ELEMS, WORKER_BUDGET_BYTES // (12 * max(n_inputs, 1))))

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
            metadata_draft: dict | None = None, open_entries: list | None = None) -> list[str]:
    """Run every task into the sink. Returns the keys that came out non-finite (policy 'warn').

    `mask` (a masks.Mask) restricts what may change: where it is False the output keeps A's values.
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
            for rows in _chunks(task.shape, None if task.adjust else chunk_elems):
                t = read(a, task.key, rows, ws)
                if task.adjust:
                    t = _adjusted(task, t.to(device, compute_dtype))
                emit(task, ws.cast(t, sink.dtype_for(task.key, task.out_dtype)), rows[0] if rows else 0)
        else:
            stream = KeyStream(task.key, task.shape, models, base, ws, device, compute_dtype,
                               chunk_elems if spec.chunkable and not task.adjust else None, seed, task.region)
            stats = spec.prepare(stream, **task.params) if spec.prepare is not None else None
            if task.region is not None:
                full = a.read(task.key).to(device, compute_dtype)
            for chunk in stream.chunks():
                out = spec.apply(chunk.models, base=chunk.base, stats=stats, rng=chunk.rng, params=task.params)
                if task.region is not None:
                    full[tuple(slice(0, d) for d in task.region)] = out
                    out = full
                if mask is not None:
                    out = _apply_mask(mask, task, out, chunk.rows, a, read, ws, device, compute_dtype)
                if task.adjust:
                    out = _adjusted(task, out)
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


def _adjusted(task: Task, t: torch.Tensor) -> torch.Tensor:
    """SuperMerger's Adjust on one whole tensor (core/elemental.py): a factor, or a value per channel."""
    kind, value = task.adjust
    if kind == "scale":
        return t * float(value)
    shift = torch.tensor(value, dtype=t.dtype, device=t.device)
    return t + shift[: t.shape[0]] if t.dim() == 1 else t + shift.reshape(-1, *([1] * (t.dim() - 1)))[: t.shape[0]]


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
