"""LoRAs baked into the host's live model, in memory: no file, no second copy of the model.

`bake_into_host(host, checkpoint, loras)` streams the checkpoint through lora.bake into the sink of
host.live_target (the WebUI's loaded model, or the standalone app's diffusers modules): every key, or only
`keys` when the live model already holds this checkpoint there (an XY plot's next cell: only the keys its
LoRAs touch are rewritten, from the checkpoint's own values, so nothing accumulates from cell to cell).
The live model is then labelled with an honest name, a hash of the recipe and the recipe itself, which
the images' infotexts carry. The caller holds the host's lock (host.exclusive()).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..core.files import checkpoint_layout
from ..host import Host, LoadedMerge
from .bake import BakeResult, bake


def bake_into_host(host: Host, checkpoint: Path, loras: list, *, lbw=None, keys=None, name: str | None = None,
                   progress=None, cancel=None) -> BakeResult:
    """Bake `loras` (as lora.bake takes them) into the host's live model on top of `checkpoint`.

    The live model must be of the checkpoint's architecture where the host cannot build one (the WebUI).
    A failure half way hands the live model back to the host's own recovery (TensorSink.on_abort)."""
    checkpoint = Path(checkpoint)
    family, shapes = checkpoint_layout(checkpoint)
    with host.live_target(family, False, shapes) as sink:
        result = bake(checkpoint, loras, sink, lbw=lbw, dtype=None, keys=keys, progress=progress,
                      cancel=cancel if cancel is not None else host.interrupted)
    if host.live_cache is not None:
        host.live_cache.clear()   # the live tensors no longer hold the last merge's terms
    recipe_json = json.dumps(result.recipe, sort_keys=True)
    label = name or "+".join([checkpoint.stem] + [str(r["name"]).rsplit(".", 1)[0] for r in result.recipe["loras"]])
    host.set_loaded(LoadedMerge(label, hashlib.sha256(recipe_json.encode()).hexdigest()[:10], recipe_json))
    return result
