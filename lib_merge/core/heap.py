"""How glibc's malloc should treat big temporary blocks during long jobs (no effect elsewhere).

glibc serves blocks above its mmap threshold with fresh mappings and everything else from the heap, and
raises the threshold (up to 32 MB) whenever a mapped block is freed. Two jobs want opposite policies:

* `steady_heap()` — merges: every chunk allocates temporaries of the same size; mapping them fresh costs a
  page fault per page per chunk (measured: TIES' final pass 1.6x slower), so blocks below 256 MB come from
  the heap and stay there.
* `mapped_temporaries()` — LoRA extract, resize, SVD merge, bake: the temporaries (two weights, ΔW, SVD work)
  change size from module to module, and the small results that are kept (rank-r factors) land between
  them in the heap, which then cannot shrink or reuse its holes: the heap grew by 0.6 GB over SD1.5's 264
  modules and to a 10.7 GB peak on SDXL. Blocks from 1 MB up are mapped fresh and returned on free (SD1.5
  extract: 0.89 GB peak instead of 1.88 GB, no slower).

Afterwards the thresholds go back to glibc's usual steady state (32 MB / 64 MB) and the heap is trimmed.
Nested uses keep the outermost policy.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_lock = threading.Lock()
_depth = 0


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def _policy(mmap_threshold: int, trim_threshold: int):
    global _depth
    libc = _libc()
    with _lock:
        outermost = _depth == 0 and libc is not None
        _depth += 1
        if outermost:
            libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if outermost:
                libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
                libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
                libc.malloc_trim(0)


def steady_heap():
    """Merges: blocks below 256 MB stay in the heap while the merge runs."""
    return _policy(256 << 20, 512 << 20)


def mapped_temporaries():
    """LoRA operations: blocks from 1 MB up are mapped fresh and given back on free."""
    return _policy(1 << 20, 64 << 20)
