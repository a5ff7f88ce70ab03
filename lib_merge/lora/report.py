"""A LoRA report: text (rank signature per part, parameters, main ss_* fields, top tags — from lora.info) and
a PNG with two plots: the Frobenius norm of ΔW per MBW block (bar chart) and the normalised singular-value
spectra of ΔW for the largest modules (log scale).

ΔW of a module is what it adds to its checkpoint weight: up@down·α/r (LoCon/LoHa/LoKr: their own rules,
through LoraFile.delta). A module goes to the block of its checkpoint key (lora.keys.module_map, then
arch.block_of); modules without a key, or of a LoRA whose architecture is unknown, go to their part
("unet", "te", ...). A block's norm is sqrt(Σ ‖ΔW‖²_F) over its modules.

matplotlib is imported only when a picture is drawn (its Figure object API, no pyplot).

    python -m lib_merge lora report FILE [--png OUT.png] [--spectra 4] [--tags 20]
"""
from __future__ import annotations

import math

import torch

from . import keys as K
from .formats import LoraFile, open_lora
from .info import format_text, summary


def module_block(lf: LoraFile, name: str) -> str:
    """The MBW block of a module (BASE, IN00.., M00, OUT..), or its part when it has no checkpoint key."""
    from ..core.arch import block_of
    if lf.family:
        tgt = K.resolve(name, lf.family)
        if tgt is not None:
            b = block_of(tgt.key, lf.family)
            if b is not None:
                return b
    return K.part_of(name) or "other"


def block_norms(lf: LoraFile) -> list[tuple[str, float]]:
    """[(block, Frobenius norm of the block's ΔW)] in block order (blocks without modules left out), then
    any groups outside the blocks."""
    from ..core.arch import block_names
    sq: dict[str, float] = {}
    for name in lf.modules:
        b = module_block(lf, name)
        sq[b] = sq.get(b, 0.0) + float(lf.delta(name).double().pow(2).sum())
    order = block_names(lf.family) if lf.family else []
    names = [b for b in order if b in sq] + sorted(set(sq) - set(order))
    return [(b, math.sqrt(sq[b])) for b in names]


def largest_modules(lf: LoraFile, n: int) -> list[str]:
    """The `n` modules with the most ΔW elements (ties by name)."""
    return sorted(lf.modules, key=lambda m: (-math.prod(lf.modules[m].shape), m))[:n]


def spectrum(lf: LoraFile, name: str) -> torch.Tensor:
    """Singular values of a module's ΔW (convolutions flattened to (out, in·kh·kw)), largest first, float64."""
    dw = lf.delta(name).double()
    return torch.linalg.svdvals(dw.reshape(dw.shape[0], -1))


def report(lf: LoraFile, *, tags: int = 20, spectra: int = 4) -> dict:
    """lora.info's summary plus `block_norms` [[block, norm]] and `spectra` {module: [σ/σ₀ ...]} for the
    `spectra` largest modules (the first 2·rank+8 values at most)."""
    info = summary(lf, tags)
    info["block_norms"] = [[b, v] for b, v in block_norms(lf)]
    sp = {}
    for name in largest_modules(lf, spectra):
        s = spectrum(lf, name)
        keep = min(len(s), 2 * lf.modules[name].rank + 8)
        s0 = float(s[0]) if len(s) and float(s[0]) > 0 else 1.0
        sp[name] = [float(x) / s0 for x in s[:keep]]
    info["spectra"] = sp
    return info


def describe(path, *, tags: int = 20, spectra: int = 4) -> dict:
    with open_lora(path) as lf:
        return report(lf, tags=tags, spectra=spectra)


def report_text(info: dict) -> str:
    lines = [format_text(info)]
    sig = "; ".join(f"{p} {r}" for p, r in info["rank_signature"].items())
    lines.append(f"Rank signature: {sig}")
    if info.get("block_norms"):
        lines.append("‖ΔW‖ per block (Frobenius):")
        top = max(v for _, v in info["block_norms"]) or 1.0
        for b, v in info["block_norms"]:
            lines.append(f"  {b:6s} {v:12.6g}  " + "#" * int(round(30 * v / top)))
    for name, s in info.get("spectra", {}).items():
        head = ", ".join(f"{x:.3g}" for x in s[:6])
        lines.append(f"σ/σ₀ of {name}: {head}{', ...' if len(s) > 6 else ''}")
    return "\n".join(lines)


def report_png(info: dict, png):
    """Draw the block-norm bar chart and the spectra into a PNG (atomic write); returns its Path."""
    from ..tools.report import figure, save_figure
    fig = figure(11, 7.5)
    ax1, ax2 = fig.subplots(2, 1)
    blocks = info.get("block_norms") or []
    ax1.bar(range(len(blocks)), [v for _, v in blocks], color="#4c72b0")
    ax1.set_xticks(range(len(blocks)), [b for b, _ in blocks], rotation=90, fontsize=8)
    ax1.set_ylabel("‖ΔW‖_F")
    name = (info.get("file") or "LoRA").replace("\\", "/").rsplit("/", 1)[-1]
    ax1.set_title(f"{name}: norm of ΔW per block")
    for mod, s in (info.get("spectra") or {}).items():
        vals = [max(x, 1e-12) for x in s]
        ax2.semilogy(range(1, len(vals) + 1), vals, marker=".", label=mod.replace("lora_", "", 1))  # no leading "_": matplotlib hides those
    ax2.set_xlabel("index")
    ax2.set_ylabel("σ / σ₀")
    ax2.set_title("singular values of ΔW, largest modules")
    if info.get("spectra"):
        ax2.legend(fontsize=7)
    return save_figure(fig, png)
