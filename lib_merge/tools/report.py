"""Text and PNG reports: masks (share of True per block and per key), weight sets (values per block and
per key) and heat maps of one model tensor.

matplotlib is imported only inside the functions that draw, and only its object API (Figure, rendered
by the Agg backend) is used: no pyplot, so nothing global changes in a host that has its own backend.
PNG files are written through a temporary file and renamed.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from ..core.arch import block_names, block_of, component_of, detect
from ..core.errors import InputError, MergeError, OutputError
from ..core.files import write_file_atomic
from ..core.masks import Mask
from ..core.weights import WeightSet

LAYER_SCALINGS = ("none", "abs", "log")


# ----------------------------------------------------------------------------------- grouping

def _family(keys, family: str | None) -> str | None:
    """The given family, else the one detected from the key names, else None (group by component)."""
    if family:
        return family
    try:
        return detect({k: () for k in keys}).family
    except MergeError:
        return None


def _groups(keys, family: str | None) -> dict[str, list[str]]:
    """Keys by MBW block (in block order), then by component for keys outside the blocks."""
    order = block_names(family) if family else []
    groups: dict[str, list[str]] = {name: [] for name in order}
    for key in keys:
        name = (block_of(key, family) if family else None) or component_of(key)
        groups.setdefault(name, []).append(key)
    return {name: ks for name, ks in groups.items() if ks}


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f}%" if whole else "-"


def _png_path(png) -> Path:
    path = Path(png)
    if path.suffix.lower() != ".png":
        raise OutputError(f"The picture is written as .png, not '{path.name}'.")
    return path


def save_figure(fig, png) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return write_file_atomic(_png_path(png), buf.getvalue())


def figure(width: float, height: float):
    from matplotlib.figure import Figure  # lazy: importing lib_merge.tools.report must stay cheap
    return Figure(figsize=(width, height), layout="constrained")


# ----------------------------------------------------------------------------------- masks

def mask_block_stats(mask: Mask, family: str | None = None) -> list[tuple[str, int, int]]:
    """[(block, true elements, all elements)] in block order."""
    family = _family(mask.keys(), family or mask.family)
    return [(name, sum(mask.true_count(k) for k in keys), sum(mask.numel(k) for k in keys))
            for name, keys in _groups(mask.keys(), family).items()]


def mask_report(mask: Mask, family: str | None = None, details: bool = False) -> str:
    """Share of True per block (and per key with details=True), as aligned text."""
    stats = mask_block_stats(mask, family)
    true = sum(s[1] for s in stats)
    total = sum(s[2] for s in stats)
    lines = [f"mask: {len(mask)} keys, {true:,} of {total:,} elements true ({_pct(true, total)})",
             f"{'block':12s} {'true':>14s} / {'total':<14s} {'share':>8s}"]
    lines += [f"{name:12s} {t:>14,} / {n:<14,} {_pct(t, n):>8s}" for name, t, n in stats]
    if details:
        lines.append("")
        lines += [f"{k}: {mask.true_count(k):,} / {mask.numel(k):,} ({_pct(mask.true_count(k), mask.numel(k))})"
                  for k in mask.keys()]
    return "\n".join(lines)


def mask_report_png(mask: Mask, png, family: str | None = None) -> Path:
    """A bar chart of the share of True per block."""
    stats = mask_block_stats(mask, family)
    fig = figure(max(6.0, 0.35 * len(stats)), 4.0)
    ax = fig.add_subplot()
    ax.bar([s[0] for s in stats], [100.0 * s[1] / s[2] if s[2] else 0.0 for s in stats], color="tab:blue")
    ax.set_ylim(0, 100)
    ax.set_ylabel("elements that may change (%)")
    ax.set_title(f"mask: {len(mask)} keys")
    ax.tick_params(axis="x", labelrotation=90)
    return save_figure(fig, png)


# ----------------------------------------------------------------------------------- weight sets

def weights_block_stats(ws: WeightSet, family: str | None = None) -> list[tuple[str, int, float, float, float]]:
    """[(block, keys, mean, min, max)] in block order."""
    family = _family(ws.keys(), family or ws.arch)
    out = []
    for name, keys in _groups(ws.keys(), family).items():
        vals = [ws[k] for k in keys]
        out.append((name, len(vals), sum(vals) / len(vals), min(vals), max(vals)))
    return out


def _num(v: float) -> str:
    return f"{v:.4g}"


def weights_report(ws: WeightSet, family: str | None = None, details: bool = True) -> str:
    """Values per block (keys, mean, min, max) and, with details, `key: value` lines."""
    stats = weights_block_stats(ws, family)
    lines = [f"weight set{f' ({ws.arch})' if ws.arch else ''}: {len(ws)} keys",
             f"{'block':12s} {'keys':>6s} {'mean':>10s} {'min':>10s} {'max':>10s}"]
    lines += [f"{name:12s} {n:>6d} {_num(mean):>10s} {_num(lo):>10s} {_num(hi):>10s}"
              for name, n, mean, lo, hi in stats]
    if details:
        lines.append("")
        lines += [f"{k}: {_num(v)}" for k, v in ws.items()]
    return "\n".join(lines)


def weights_report_png(ws: WeightSet, png, family: str | None = None) -> Path:
    """Every key's value, keys grouped by block along the x axis, block names under their span."""
    if not ws:
        raise InputError("The weight set is empty: there is nothing to plot.")
    family = _family(ws.keys(), family or ws.arch)
    groups = _groups(ws.keys(), family)
    fig = figure(max(8.0, 0.35 * len(groups)), 4.0)
    ax = fig.add_subplot()
    x0, ticks = 0, []
    for name, keys in groups.items():
        ax.plot(range(x0, x0 + len(keys)), [ws[k] for k in keys], ".", markersize=3)
        ticks.append((x0 + (len(keys) - 1) / 2, name))
        x0 += len(keys)
        ax.axvline(x0 - 0.5, color="0.85", linewidth=0.5)
    ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], rotation=90)
    ax.set_ylabel("value")
    ax.set_title(f"weight set{f' ({ws.arch})' if ws.arch else ''}: {len(ws)} keys")
    return save_figure(fig, png)


# ----------------------------------------------------------------------------------- one layer

def layer_image(t: torch.Tensor, scaling: str = "none", max_side: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """A tensor as a 2-D float32 image and the (rows, columns) it stands for: ≥2-D tensors as
    (dim 0, the rest); 1-D ones wrapped into a near square (the last row padded with NaN, drawn blank).
    scaling: none = the values, abs = |x|, log = log10(|x| + 1e-12). Images larger than max_side are
    averaged down (NaN-aware), so the image may be smaller than (rows, columns)."""
    if scaling not in LAYER_SCALINGS:
        raise InputError(f"Unknown scaling '{scaling}'; use one of {', '.join(LAYER_SCALINGS)}.")
    x = t.detach().to(torch.float32)
    if x.dim() >= 2:
        img = x.reshape(x.shape[0], -1)
    else:
        flat = x.reshape(-1)
        w = max(1, math.ceil(math.sqrt(flat.numel())))
        rows = max(1, math.ceil(flat.numel() / w))
        img = torch.full((rows * w,), float("nan"))
        img[:flat.numel()] = flat
        img = img.reshape(rows, w)
    full = (img.shape[0], img.shape[1])
    if scaling == "abs":
        img = img.abs()
    elif scaling == "log":
        img = torch.log10(img.abs() + 1e-12)
    if img.shape[0] > max_side or img.shape[1] > max_side:
        size = (min(img.shape[0], max_side), min(img.shape[1], max_side))
        valid = ~torch.isnan(img)
        pool = torch.nn.functional.adaptive_avg_pool2d
        total = pool(torch.where(valid, img, 0.0)[None, None], size)[0, 0]
        count = pool(valid.to(torch.float32)[None, None], size)[0, 0]
        img = total / count  # 0/0 -> NaN where a cell saw only padding
    return img, full


def layer_report(model, key: str, png=None, scaling: str = "none") -> str:
    """Statistics of one tensor as text; with `png`, also a heat map with a colour bar.
    `model` is an open ModelFile or a path."""
    from ..core.files import ModelFile, open_model
    m = model if isinstance(model, ModelFile) else open_model(model)
    try:
        if key not in m.tensors:
            near = [k for k in m.tensors if key in k][:5]
            hint = f" Keys containing it: {', '.join(near)}." if near else ""
            raise InputError(f"'{m.name}' has no tensor '{key}'.{hint}")
        t = m.read(key)
        name = m.name
    finally:
        if m is not model:
            m.close()
    info = f"{key} in {name}: shape {list(t.shape)}, {str(t.dtype).removeprefix('torch.')}"
    if t.is_floating_point() and t.numel():
        x = t.to(torch.float32)
        info += (f"\nmin {x.min().item():.6g}  max {x.max().item():.6g}  mean {x.mean().item():.6g}  "
                 f"std {x.std().item() if x.numel() > 1 else 0.0:.6g}  norm {x.norm().item():.6g}")
    if png is not None:
        if not t.is_floating_point() or not t.numel():
            raise InputError(f"'{key}' is not a float tensor with values: there is nothing to draw.")
        img, (rows, cols) = layer_image(t, scaling)
        fig = figure(7.0, 6.0)
        ax = fig.add_subplot()
        # extent in the tensor's own row/column numbers, also when the image was averaged down
        shown = ax.matshow(img.numpy(), aspect="auto", cmap="viridis", extent=(-0.5, cols - 0.5, rows - 0.5, -0.5))
        fig.colorbar(shown, ax=ax, label={"none": "value", "abs": "|value|", "log": "log10 |value|"}[scaling])
        pooled = f", averaged to {list(img.shape)}" if tuple(img.shape) != (rows, cols) else ""
        ax.set_title(f"{key}\n{list(t.shape)} drawn as [{rows}, {cols}]{pooled}", fontsize=8)
        save_figure(fig, png)
    return info
