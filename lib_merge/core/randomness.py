"""Randomness that does not depend on how a merge is run.

Every draw comes from a CPU torch.Generator seeded from (recipe seed, key[, salt]), so results are the
same on any device, with any thread count and in any key order. Within a key, draws are made per block
of whole rows (ChunkRandom), so they do not depend on the chunk size either.
"""
from __future__ import annotations

import hashlib

import torch


def key_seed(seed: int, key: str, salt: str = "") -> int:
    """A 63-bit seed from (seed, key); `salt` separates the streams of different tools (noise, masks)."""
    text = f"{seed}:{key}" if not salt else f"{seed}:{salt}:{key}"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int, key: str, salt: str = "") -> torch.Generator:
    """A CPU generator seeded from (seed, key[, salt]), for draws over a whole tensor."""
    g = torch.Generator(device="cpu")
    g.manual_seed(key_seed(seed, key, salt))
    return g


RNG_BLOCK_ELEMS = 1 << 16   # random draws are made per block of rows of about this many elements


def _mix(*values: int) -> int:
    """splitmix64-style mixing of a few integers into one 63-bit seed."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & ((1 << 63) - 1)


def rng_block_rows(shape: tuple[int, ...]) -> int:
    """Rows per random block of a tensor: chunks are whole numbers of these blocks."""
    if len(shape) == 0:
        return 1
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    return max(1, RNG_BLOCK_ELEMS // max(per_row, 1))


class ChunkRandom:
    """Random numbers for one chunk of one key that do not depend on how the key was chunked.

    Each block of `rng_block_rows` rows draws from its own CPU generator seeded from (seed, key, stream,
    block), so a chunk made of blocks 3..5 gets the same numbers whether it is read alone or inside a
    whole-tensor pass, on any device. `stream` separates independent draws (one per model, say).
    """

    def __init__(self, seed: int, key: str, shape: tuple[int, ...], rows: tuple[int, int] | None):
        self.base = key_seed(seed, key)
        self.shape = tuple(shape)
        self.block_rows = rng_block_rows(self.shape)
        self.rows = rows if rows is not None else ((0, self.shape[0]) if self.shape else (0, 1))

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        if not self.shape:
            return ()
        return (self.rows[1] - self.rows[0],) + self.shape[1:]

    def uniform(self, stream: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """U[0, 1) float32 of the chunk's shape, on the CPU."""
        shape = self.chunk_shape
        per_row = 1
        for d in shape[1:]:
            per_row *= d
        numel = per_row * (shape[0] if shape else 1)
        flat = out.view(-1)[:numel] if out is not None else torch.empty(numel, dtype=torch.float32)
        r0, r1 = self.rows
        g = torch.Generator(device="cpu")
        first, last = r0 // self.block_rows, (r1 - 1) // self.block_rows
        for b in range(first, last + 1):
            b0, b1 = b * self.block_rows, (b + 1) * self.block_rows
            lo, hi = max(b0, r0), min(b1, r1)
            g.manual_seed(_mix(self.base, stream, b))
            block = torch.rand((min(b1, self.shape[0] if self.shape else 1) - b0) * per_row, generator=g)
            flat[(lo - r0) * per_row:(hi - r0) * per_row] = block[(lo - b0) * per_row:(hi - b0) * per_row]
        return flat.view(shape)

    def keep_mask(self, stream: int, drop: float, device: torch.device) -> torch.Tensor:
        """Bernoulli keep mask with P(keep) = 1 − drop, on the device."""
        return (self.uniform(stream) >= drop).to(device)
