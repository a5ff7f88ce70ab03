"""Where a merge goes: FileSink (streaming .safetensors, atomic), DictSink (in memory), TensorSink (into a
live model's tensors). Every sink gets the full list of (key, dtype, shape) before any data."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.errors import InputError
from ..core.files import SafetensorsWriter, check_output_path


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
