"""`info`: what a checkpoint file is, from its header alone (plus its hash)."""
from __future__ import annotations

import json
from pathlib import Path

from ..core.arch import component_of, detect, summarize_components
from ..core.files import dtype_name, file_hashes, human_size, open_model
from ..engine.recipe import METADATA_KEY


def model_info(path: str, hashes: bool = True) -> dict:
    p = Path(path)
    with open_model(p) as m:
        shapes = {k: i.shape for k, i in m.tensors.items()}
        arch = detect(shapes, m.name)
        comps = summarize_components(shapes)
        dtypes: dict[str, int] = {}
        for i in m.tensors.values():
            if component_of(i.key) != "other":
                dtypes[dtype_name(i.dtype)] = dtypes.get(dtype_name(i.dtype), 0) + i.numel
        metadata = dict(m.metadata)
    info = {
        "file": str(p),
        "size_bytes": p.stat().st_size,
        "architecture": arch.family,
        "architecture_label": arch.label,
        "variant": arch.variant or None,
        "block_count": len(arch.blocks),
        "components": {c: {"tensors": s.tensors, "params": s.params} for c, s in comps.items()},
        "params": sum(s.params for s in comps.values()),
        "dtype": max(dtypes, key=dtypes.get) if dtypes else None,
        "dtypes": dtypes,
        "metadata": metadata,
    }
    if hashes:
        info.update(file_hashes(p))
    return info


def format_info(info: dict) -> str:
    lines = [f"File:          {info['file']}",
             f"Size:          {human_size(info['size_bytes'])}",
             f"Architecture:  {info['architecture_label']} ({info['block_count']} block weights)",
             f"Parameters:    {info['params']:,} ({info['dtype']})"]
    for comp, s in info["components"].items():
        lines.append(f"  {comp:13s} {s['tensors']:5d} tensors  {s['params']:>14,} params")
    if "sha256" in info:
        lines.append(f"sha256:        {info['sha256']}")
        lines.append(f"Short hash:    {info['short_hash']}  (legacy {info['legacy_hash']})")
    meta = info["metadata"]
    if meta:
        lines.append("Metadata:")
        for k, v in meta.items():
            if k == METADATA_KEY or k in ("sd_merge_recipe", "sd_merge_models"):
                try:
                    v = json.dumps(json.loads(v), indent=2).replace("\n", "\n    ")
                except ValueError:
                    pass
            elif len(v) > 200:
                v = v[:200] + "..."
            lines.append(f"  {k}: {v}")
    return "\n".join(lines)
