"""Checkpoint files: lazy reading, streaming writing, metadata and hashes.

Reading never maps a whole file: a `.safetensors` header is parsed on open and each tensor (or a row
range of it) is read with a positioned read into a caller's buffer. Pages of a memory-mapped file count
as resident memory, positioned reads into reused buffers do not add up.

Writing (`SafetensorsWriter`) knows every shape and dtype in advance, reserves the file, lets any thread
write any tensor at its own offset, and puts the header in last, so hashes computed during the merge can
still go into the metadata. The file appears under its final name only when complete (temp + fsync +
rename); on any failure or cancellation the temporary file is removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptFileError, DiskFullError, InputError, OutputError, UnsafeFileError, UnsupportedModelError

# safetensors dtype codes <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        ST_DTYPES[_code] = getattr(torch, _name)
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}

MAX_HEADER_BYTES = 100 << 20  # a real header is a few hundred KB; more means a hostile or broken file
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def human_size(n: int) -> str:
    """A size for people, in the unit that suits it: 29.6 MiB, not 0.029 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


OUTPUT_DTYPES = ("float16", "bfloat16", "float32")   # what a merge, bake or LoRA tool writes: one spelling everywhere
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                 "fp64": "float64", "double": "float64", "bf16": "bfloat16"}   # old spellings, still accepted


def output_dtype(name: str) -> str:
    """An output dtype as its one spelling (float16, bfloat16, float32); the aliases fp16, half, bf16, fp32 and
    float are accepted; anything else is refused naming the choices."""
    key = DTYPE_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in OUTPUT_DTYPES:
        raise InputError(f"Unknown output dtype '{name}'. Use {', '.join(OUTPUT_DTYPES)} "
                         f"(fp16, bf16 and fp32 are accepted too).")
    return key


def dtype_from_name(name: str) -> torch.dtype:
    """'float16' / 'fp16' / 'F16' -> torch.float16 (user-facing names and safetensors codes)."""
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if name in ST_DTYPES:
        return ST_DTYPES[name]
    dt = getattr(torch, key, None)
    if not isinstance(dt, torch.dtype):
        raise InputError(f"Unknown dtype '{name}'. Use float16, bfloat16, float32 or float64.")
    return dt


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0   # absolute byte offset in the file (safetensors only)
    nbytes: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `fd` at `offset`, looping over short reads; a short file is a corrupt file."""
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CorruptFileError("The file ended before the tensor data did: it is truncated.")
        done += n


class ModelFile:
    """A checkpoint opened lazily. Subclasses: SafetensorsFile, PickleCheckpoint."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, key):
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def read(self, key: str, rows: tuple[int, int] | None = None, buffer: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def name(self) -> str:
        return self.path.name


class SafetensorsFile(ModelFile):
    """A .safetensors file: header parsed and checked on open, tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.size = os.fstat(self._fd).st_size
            self.tensors, self.metadata, self.data_start = self._parse_header()
        except BaseException:
            fd, self._fd = self._fd, None
            os.close(fd)
            raise

    def _parse_header(self):
        where = f"'{self.path.name}'"
        if self.size < 8:
            raise CorruptFileError(f"{where} is too short to be a safetensors file ({self.size} bytes).")
        head = os.pread(self._fd, 8, 0)
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER_BYTES:
            raise CorruptFileError(f"{where} is not a valid safetensors file: its header claims {hlen} bytes.")
        if 8 + hlen > self.size:
            raise CorruptFileError(f"{where} is truncated: the header needs {hlen} bytes, the file has {self.size - 8}.")
        raw = os.pread(self._fd, hlen, 8)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptFileError(f"{where} is not a valid safetensors file: its header is not JSON.") from None
        except (ValueError, RecursionError):   # a number of over 4300 digits; nesting too deep for the parser
            raise CorruptFileError(f"{where} is not a valid safetensors file: its header is JSON no reader "
                                   f"accepts (nested too deeply or a number too long).") from None
        if not isinstance(header, dict):
            raise CorruptFileError(f"{where} is not a valid safetensors file: its header is not a JSON object.")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise CorruptFileError(f"{where}: its __metadata__ is not a JSON object.")
        metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        data_start = 8 + hlen
        data_len = self.size - data_start
        tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            try:
                code = entry["dtype"]
                shape = tuple(int(d) for d in entry["shape"])
                start, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CorruptFileError(f"{where}: the header entry of '{key}' is malformed.") from None
            if code not in ST_DTYPES:
                raise UnsupportedModelError(f"{where}: tensor '{key}' has dtype {code}, which Merge Lab cannot read.")
            dtype = ST_DTYPES[code]
            if any(d < 0 for d in shape):
                raise CorruptFileError(f"{where}: tensor '{key}' has a negative dimension.")
            nbytes = _numel(shape) * dtype.itemsize
            if start < 0 or end - start != nbytes:
                raise CorruptFileError(f"{where}: tensor '{key}' claims {end - start} bytes but its shape needs {nbytes}.")
            if end > data_len:
                raise CorruptFileError(
                    f"{where} is truncated or corrupt: tensor '{key}' ends at byte {end} of the data, "
                    f"but the file holds only {data_len} bytes of data.")
            tensors[key] = TensorInfo(key, dtype, shape, data_start + start, nbytes)
        return tensors, metadata, data_start

    def read(self, key, rows=None, buffer=None):
        """Read tensor `key` (or rows [r0, r1) of its first dimension) into `buffer` if given.

        `buffer` is a 1-D uint8 tensor of at least the needed size; the result is a view into it, valid
        until the buffer is reused. Without a buffer a fresh tensor is returned.
        """
        info = self.tensors[key]
        shape, offset, nbytes = list(info.shape), info.offset, info.nbytes
        if rows is not None and shape:
            r0, r1 = rows
            if not 0 <= r0 <= r1 <= shape[0]:
                raise ValueError(f"rows {rows} outside {key} with {shape[0]} rows")
            row_bytes = nbytes // shape[0] if shape[0] else 0
            offset += r0 * row_bytes
            nbytes = (r1 - r0) * row_bytes
            shape[0] = r1 - r0
        if buffer is None:
            raw = torch.empty(nbytes, dtype=torch.uint8)
        else:
            raw = buffer[:nbytes]
        if nbytes:
            pread_into(self._fd, memoryview(raw.numpy()), offset)
        return raw.view(info.dtype).view(shape) if info.dtype.itemsize else raw

    def close(self):
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def torch_load_weights(path: str | os.PathLike, **kwargs):
    """torch.load(path, weights_only=True): torch's own restricted unpickler (tensors and plain containers).

    A host may have replaced torch.load with a check of its own: the A1111 WebUI's modules.safe rejects files
    written by recent torch (their '.format_version' entry) and then returns None. It keeps the original as
    modules.safe.unsafe_torch_load; called with weights_only=True that is at least as strict, so we call it.
    """
    import sys
    import warnings
    load = getattr(sys.modules.get("modules.safe"), "unsafe_torch_load", None) or torch.load
    with warnings.catch_warnings():   # torch warns about protocols before refusing: our refusal says it all
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return load(path, map_location="cpu", weights_only=True, **kwargs)


class PickleCheckpoint(ModelFile):
    """A .ckpt/.pt/.bin checkpoint, loaded only with torch.load(weights_only=True).

    Pickles cannot be read lazily; torch's mmap mode keeps the tensors on disk where the file format
    allows it (zip format), so the memory cost is paid only for what is touched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        where = f"'{self.path.name}'"
        try:
            try:
                obj = torch_load_weights(self.path, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch_load_weights(self.path)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, zipfile errors...
            text = str(e)
            if "Weights only load failed" in text or "Unsupported global" in text or "GLOBAL" in text:
                raise UnsafeFileError(
                    f"{where} is a pickle that needs to run code to load, so Merge Lab refuses it "
                    f"(pickles can carry malware). If you trust it, convert it to .safetensors with a "
                    f"trusted tool first.") from None
            raise CorruptFileError(f"{where} could not be read as a PyTorch checkpoint: {text.splitlines()[0] if text else type(e).__name__}") from None
        while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CorruptFileError(f"{where} holds a {type(obj).__name__}, not a state dict of tensors.")
        self._sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        self.tensors = {k: TensorInfo(k, v.dtype, tuple(v.shape), 0, v.numel() * v.element_size())
                        for k, v in self._sd.items()}
        self.metadata = {}

    def read(self, key, rows=None, buffer=None):
        t = self._sd[key]
        if rows is not None and t.dim():
            t = t[rows[0]:rows[1]]
        if buffer is not None:
            flat = buffer[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            flat.copy_(t)
            return flat
        return t.clone()

    def close(self):
        self._sd = {}


def checkpoint_layout(path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The architecture family and {key: shape} of a checkpoint, from its header (no tensor is read)."""
    from .arch import detect
    with open_model(path) as mf:
        shapes = {k: tuple(i.shape) for k, i in mf.tensors.items()}
        return detect(shapes, mf.name).family, shapes


def check_model_file(path: str | os.PathLike) -> Path:
    """The path of an existing model file, or an error that says what it is instead (missing, a folder)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"Model file not found: '{p}'.")
    if p.is_dir():
        raise InputError(f"'{p}' is a folder, not a model file (diffusers folders are not supported; "
                         f"use a single-file .safetensors checkpoint).")
    return p


def open_model(path: str | os.PathLike) -> ModelFile:
    """Open a checkpoint lazily, with errors that say what is wrong."""
    p = check_model_file(path)
    suffix = p.suffix.lower()
    with open(p, "rb") as f:
        magic = f.read(8)
    if suffix == ".safetensors":
        return SafetensorsFile(p)
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return PickleCheckpoint(p)
    # unknown suffix: decide by content
    if magic[:2] == b"PK":
        return PickleCheckpoint(p)
    if len(magic) == 8 and struct.unpack("<Q", magic)[0] < MAX_HEADER_BYTES:
        try:
            return SafetensorsFile(p)
        except CorruptFileError:
            pass
    raise InputError(f"'{p.name}' is not a model file Merge Lab can read: use .safetensors (or .ckpt/.pt).")


# --------------------------------------------------------------------------------------------- hashes

_hash_lock = threading.Lock()


def _hash_cache_path() -> Path:
    root = os.environ.get("MERGE_LAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "merge_lab")
    return Path(root) / "hashes.json"


def _load_hash_cache() -> dict:
    try:
        return json.loads(_hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def file_hashes(path: str | os.PathLike, use_cache: bool = True) -> dict[str, str]:
    """sha256 of the whole file, the WebUI's short hash (first 10 hex digits) and its legacy hash.

    Cached by (real path, size, mtime) in ~/.cache/merge_lab/hashes.json (or $MERGE_LAB_CACHE).
    """
    p = Path(path).resolve()
    st = p.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    if use_cache:
        with _hash_lock:
            hit = _load_hash_cache().get(str(p))
        if hit and hit.get("stamp") == stamp:
            return {k: hit[k] for k in ("sha256", "short_hash", "legacy_hash")}
    h = hashlib.sha256()
    with open(p, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
        # the WebUI's old "model hash": sha256 of 64 KiB at offset 1 MiB, 8 hex digits
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    sha = h.hexdigest()
    result = {"sha256": sha, "short_hash": sha[:10], "legacy_hash": legacy}
    if use_cache:
        with _hash_lock:
            cache = _load_hash_cache()
            cache[str(p)] = {"stamp": stamp, **result}
            cp = _hash_cache_path()
            try:
                cp.parent.mkdir(parents=True, exist_ok=True)
                tmp = cp.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(cache, indent=0))
                os.replace(tmp, cp)
            except OSError:
                pass  # a read-only cache folder only costs speed
    return result


# ---------------------------------------------------------------------------------------------- writing

MAX_NAME_BYTES = 200   # leaves room for the ".partial-..." temporary name under the file system's 255


def safe_output_path(folder: str | os.PathLike, name: str, suffix: str = ".safetensors") -> Path:
    """A file name given through the UI or the API -> a path inside `folder`, or an OutputError.

    Only a plain file name is accepted: no folder separators, no '..', no absolute path, no control
    characters. The suffix is added when missing.
    """
    name = (name or "").strip()
    if not name:
        raise OutputError("Give the output a file name.")
    bad = ("/" in name or "\\" in name or name in (".", "..") or name.startswith("..")
           or any(ord(c) < 32 for c in name) or os.path.isabs(name) or ":" in name)
    if bad:
        raise OutputError(f"'{name}' is not a plain file name: use letters, digits, spaces, '-', '_' and '.', "
                          f"without folders or '..'.")
    if not name.lower().endswith(suffix):
        name += suffix
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:   # the file system's limit is 255 bytes, with the temp suffix
        raise OutputError(f"The file name is too long ({len(name.encode('utf-8'))} bytes; at most {MAX_NAME_BYTES}): "
                          f"choose a shorter one.")
    folder = Path(folder).resolve()
    path = (folder / name).resolve()
    if path.parent != folder:
        raise OutputError(f"'{name}' would be written outside the output folder.")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_output_path(path: Path, inputs: list[Path], overwrite: bool, suffix: str = ".safetensors") -> Path:
    """An output path the user gave: the right kind of file, never an input, no silent overwrite."""
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise OutputError(f"The output must be a {suffix} file, not '{path.name}'.")
    if len(path.name.encode("utf-8")) > MAX_NAME_BYTES:
        raise OutputError(f"The output file name is too long ({len(path.name.encode('utf-8'))} bytes; at most "
                          f"{MAX_NAME_BYTES}): choose a shorter one.")
    for src in inputs:
        if path.exists() and _same_file(path, Path(src)) or path.resolve() == Path(src).resolve():
            raise OutputError(f"Refusing to write over an input model: '{path}'. Choose another output name.")
    if path.exists() and not overwrite:
        raise OutputError(f"'{path}' already exists. Choose another name or allow overwriting.")
    if not path.parent.is_dir():
        raise OutputError(f"The output folder '{path.parent}' does not exist.")
    return path


def header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str],
                 pad_to: int = 0) -> tuple[bytes, list[int]]:
    """Build a safetensors header for tensors in this order. Returns (8-byte length + JSON, offsets)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets, pos = [], 0
    for key, dtype, shape in entries:
        nbytes = _numel(shape) * dtype.itemsize
        header[key] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    size = max(len(raw), pad_to)
    size += (-size) % 8  # keep the data 8-byte aligned
    raw += b" " * (size - len(raw))
    return struct.pack("<Q", len(raw)) + raw, offsets


class SafetensorsWriter:
    """Write a .safetensors file whose tensor list is known in advance, from any thread, in any order.

    Usage: w = SafetensorsWriter(path, entries, metadata_reserve=...); w.write(key, tensor, row0);
    w.commit(metadata) (or w.abort()). Space is reserved up front, so a full disk fails before the work.
    """

    HEADER_SLACK = 64 << 10  # room for metadata known only at the end (hashes, warnings)

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = entries
        draft, offsets = header_bytes(entries, metadata or {})
        self.header_size = len(draft) + self.HEADER_SLACK
        self.header_size += (-self.header_size) % 8
        self.data_start = self.header_size
        self.offset_of = {e[0]: self.data_start + off for e, off in zip(entries, offsets)}
        self.dtype_of = {e[0]: e[1] for e in entries}
        self.shape_of = {e[0]: e[2] for e in entries}
        data_bytes = sum(_numel(s) * d.itemsize for _, d, s in entries)
        self.total_size = self.data_start + data_bytes
        folder = self.path.parent
        free = _free_bytes(folder)
        if free is not None and free < self.total_size + (16 << 20):
            raise DiskFullError(
                f"Not enough free space in '{folder}': the output needs {human_size(self.total_size)}, "
                f"{human_size(free)} is free.")
        self.tmp_path = folder / f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.partial"
        try:
            self._fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise OutputError(f"Cannot create a file in '{folder}': {e.strerror}.") from None
        try:
            if hasattr(os, "posix_fallocate") and self.total_size:
                os.posix_fallocate(self._fd, 0, self.total_size)
            else:
                os.ftruncate(self._fd, self.total_size)
        except OSError as e:
            if e.errno in (95, 22):  # EOPNOTSUPP / EINVAL: the filesystem cannot preallocate; a sparse file will do
                os.ftruncate(self._fd, self.total_size)
            else:
                self.abort()
                if e.errno in (28, 122):  # ENOSPC, EDQUOT
                    raise DiskFullError(f"Not enough free space in '{folder}' for {human_size(self.total_size)}.") from None
                raise OutputError(f"Cannot reserve space for '{self.path.name}': {e.strerror}.") from None

    def write(self, key: str, tensor: torch.Tensor, row0: int = 0) -> None:
        """Write `tensor` (already in the output dtype, on the CPU) as rows starting at `row0` of `key`."""
        t = tensor.contiguous()
        if t.dtype != self.dtype_of[key]:
            raise ValueError(f"{key}: writing {t.dtype}, header says {self.dtype_of[key]}")
        offset = self.offset_of[key]
        shape = self.shape_of[key]
        if row0:
            offset += row0 * (_numel(shape[1:]) * t.dtype.itemsize)
        raw = t.view(-1).view(torch.uint8).numpy() if t.numel() else None
        if raw is None:
            return
        view = memoryview(raw)
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as e:
            if e.errno in (28, 122):
                raise DiskFullError(f"The disk filled up while writing '{self.path.name}'.") from None
            raise OutputError(f"Writing '{self.path.name}' failed: {e.strerror}.") from None

    def commit(self, metadata: dict[str, str] | None = None) -> Path:
        head, _ = header_bytes(self.entries, metadata or {}, pad_to=self.header_size - 8)
        if len(head) != self.header_size:
            self.abort()
            raise OutputError("The metadata is too large to fit the reserved header space.")
        try:
            os.pwrite(self._fd, head, 0)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self.tmp_path, self.path)
            _fsync_dir(self.path.parent)
        except OSError as e:
            self.abort()
            if e.errno in (28, 122):
                raise DiskFullError(f"The disk filled up while finishing '{self.path.name}'.") from None
            raise OutputError(f"Finishing '{self.path.name}' failed: {e.strerror}.") from None
        return self.path

    def abort(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        try:
            os.unlink(self.tmp_path)
        except OSError:
            pass


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write a small file through a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"The output folder '{path.parent}' does not exist.")
    tmp = path.parent / f".{path.name}.{os.getpid()}.partial"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputError(f"Cannot write '{path}': {e.strerror}.") from None
    return path


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a whole in-memory state dict atomically (used for small files: demo models, test fixtures)."""
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    w = SafetensorsWriter(path, entries, metadata)
    try:
        for k, v in state.items():
            w.write(k, v.detach().cpu())
        return w.commit(metadata)
    except BaseException:
        w.abort()
        raise


# A temporary file's name: ".{final name}.{pid}[.{thread}].partial" (SafetensorsWriter, write_file_atomic).
_PARTIAL_NAME = re.compile(r"^\.(?P<final>.+?)\.(?P<pid>\d+)(?:\.\d+)?\.partial$")
STALE_PARTIAL_AGE_S = 24 * 3600   # a file nobody wrote to for a day is left over even if its pid was reused


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):   # OverflowError: a number no pid can be
        return False
    except OSError:   # EPERM: someone else's process, alive
        return True
    return True


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed save left in `folder` (not its subfolders); returns what went.

    A save writes a dotfile ending in `.partial` and renames it only when complete, so a kill -9 or a power cut
    leaves one behind. It is stale when the process that wrote it is gone (or it has not changed for a day: the
    pid may have been reused); a save still running in this or another live process is left alone.
    """
    folder = Path(folder)
    removed = []
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".partial")]
    except OSError:
        return removed
    now = time.time()
    for p in candidates:
        m = _PARTIAL_NAME.match(p.name)
        try:
            st = p.lstat()
        except OSError:
            continue
        if not m or not stat.S_ISREG(st.st_mode):
            continue
        pid = int(m["pid"])
        if _pid_alive(pid) and now - st.st_mtime < STALE_PARTIAL_AGE_S:
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed
