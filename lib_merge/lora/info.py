"""What a LoRA file holds: format, architecture, modules per part, ranks, alphas, parameters, training fields, tags."""
from __future__ import annotations

import json
from collections import Counter

from . import keys as K
from .formats import LoraFile, open_lora

MAIN_SS_FIELDS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                  "ss_base_model_version", "ss_sd_model_name", "ss_output_name", "ss_training_comment",
                  "ss_resolution", "ss_clip_skip", "ss_num_train_images", "ss_epoch", "ss_steps",
                  "ss_learning_rate", "ss_training_started_at", "modelspec.architecture", "modelspec.title")


def top_tags(metadata: dict[str, str], limit: int = 20) -> list[tuple[str, int]]:
    """Tags of `ss_tag_frequency` ({dataset: {tag: count}}, a JSON string) summed over datasets, most frequent
    first (ties by name). Tags are stripped; a malformed field gives []."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return []
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except (ValueError, RecursionError):   # not JSON, or nested too deeply for the parser
        return []
    total: Counter = Counter()
    if isinstance(data, dict):
        for tags in data.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    try:
                        total[str(tag).strip()] += int(n)
                    except (TypeError, ValueError, OverflowError):   # OverflowError: an infinite count
                        continue
    total.pop("", None)
    return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


def _num(v: float):
    return int(v) if float(v).is_integer() else round(float(v), 6)


def summary(lf: LoraFile, tags: int = 20) -> dict:
    """A JSON-ready description of an open LoRA."""
    parts: dict[str, dict] = {}
    params = 0
    for name, m in lf.modules.items():
        part = m.part or "other"
        p = parts.setdefault(part, {"modules": 0, "ranks": set(), "alphas": set(), "kinds": Counter(),
                                    "parameters": 0, "conv3x3": 0})
        n = m.numel()
        p["modules"] += 1
        p["ranks"].add(m.rank)
        p["alphas"].add(_num(m.alpha))
        p["kinds"][m.kind] += 1
        p["parameters"] += n
        p["conv3x3"] += int(bool(m.kernel) and m.kernel != (1, 1))
        params += n
    order = [p for p in K.PARTS if p in parts] + sorted(set(parts) - set(K.PARTS))
    parts_out = {p: {"modules": parts[p]["modules"], "ranks": sorted(parts[p]["ranks"]),
                     "alphas": sorted(parts[p]["alphas"]), "kinds": dict(parts[p]["kinds"]),
                     "conv3x3_modules": parts[p]["conv3x3"], "parameters": parts[p]["parameters"]}
                 for p in order}
    unresolved = K.unresolved(lf.modules, lf.family) if lf.family else None
    return {
        "file": str(lf.path) if lf.path else None,
        "format": lf.format,
        "algorithms": lf.algos,
        "architecture": lf.family,
        "architecture_evidence": lf.family_evidence,
        "modules": len(lf.modules),
        "parts": parts_out,
        "rank_signature": {p: v["ranks"] for p, v in parts_out.items()},
        "parameters": params,
        "modules_without_checkpoint_key": len(unresolved) if unresolved is not None else None,
        "metadata": {k: lf.metadata[k] for k in MAIN_SS_FIELDS if k in lf.metadata},
        "top_tags": [[t, n] for t, n in top_tags(lf.metadata, tags)],
        "warnings": list(lf.warnings),
    }


def describe(path, tags: int = 20) -> dict:
    with open_lora(path) as lf:
        return summary(lf, tags)


def format_text(info: dict) -> str:
    arch = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}.get(info["architecture"], "unknown")
    lines = [f"File:         {info['file']}",
             f"Format:       {info['format']} ({', '.join(info['algorithms'])})",
             f"Architecture: {arch} — {'; '.join(info['architecture_evidence'])}",
             f"Modules:      {info['modules']}, {info['parameters']:,} parameters"]
    for part, p in info["parts"].items():
        kinds = ", ".join(f"{k} {n}" for k, n in p["kinds"].items())
        lines.append(f"  {part:5s} {p['modules']:5d} modules  ranks {p['ranks']}  alphas {p['alphas']}  "
                     f"({kinds}; {p['parameters']:,} parameters)")
    if info["modules_without_checkpoint_key"]:
        lines.append(f"Modules without a checkpoint key: {info['modules_without_checkpoint_key']}")
    if info["metadata"]:
        lines.append("Metadata:")
        for k, v in info["metadata"].items():
            v = v if len(v) <= 100 else v[:97] + "..."
            lines.append(f"  {k}: {v}")
    if info["top_tags"]:
        lines.append("Top tags:     " + ", ".join(f"{t} ({n})" for t, n in info["top_tags"]))
    for w in info["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
