"""The real key names and shapes of SD1.x, SD2.x and SDXL checkpoints, and small models built from them.

The tables (keysets/*.tsv.gz: component, key, shape, dtype, optional) list every key of a full
checkpoint. Tests build tiny checkpoints with exactly these keys and shrunken shapes (and
preview/tiny.py runnable ones); benchmarks build full-size ones.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

_DIR = Path(__file__).with_name("keysets")
FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class KeySpec:
    component: str      # clip_l, clip_g, clip_h, vae, diffuser, ema, scheduler
    key: str
    shape: tuple[int, ...]
    dtype: str
    optional: bool


@lru_cache(maxsize=None)
def keyset(family: str) -> tuple[KeySpec, ...]:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family}")
    rows = []
    with gzip.open(_DIR / f"{family}.tsv.gz", "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            comp, key, shape, dtype, opt = line.rstrip("\n").split("\t")
            dims = tuple(int(d) for d in shape.split(",")) if shape else ()
            rows.append(KeySpec(comp, key, dims, dtype, opt == "1"))
    return tuple(rows)


def checkpoint_keys(family: str, *, with_optional: bool = False) -> list[KeySpec]:
    """Keys of a typical single-file checkpoint: text encoder(s), VAE, UNet, position_ids."""
    out = []
    for k in keyset(family):
        if k.component in ("ema", "scheduler"):
            continue
        if k.optional and not (with_optional or k.key.endswith("position_ids")):
            continue
        out.append(k)
    return out


def shrink(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    """Shrink big dimensions by `factor` (channels 320 -> 10 for 32) and keep small ones (kernels, 4/9 channels)."""
    return tuple(d if d <= 16 else max(2, d // factor) for d in shape)


def make_state_dict(family: str, *, seed: int = 0, factor: int = 32, like: dict | None = None,
                    noise: float = 0.0, dtype: torch.dtype = torch.float32, variant: str = "") -> dict[str, torch.Tensor]:
    """A tiny checkpoint with the real key names. `like` + `noise` makes a "fine-tune" of another one."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for k in checkpoint_keys(family):
        shape = shrink(k.shape, factor) if factor > 1 else k.shape
        if variant == "inpainting" and k.key == "model.diffusion_model.input_blocks.0.0.weight":
            shape = (shape[0], 9) + shape[2:]
        if k.key.endswith("position_ids"):
            sd[k.key] = torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
            continue
        if like is not None and k.key in like and tuple(like[k.key].shape) == shape:
            t = like[k.key].to(torch.float32) + noise * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * 0.1
        sd[k.key] = t.to(dtype)
    return sd
