"""What the page says about the host: the current-merge line and the restore button, derived from the host
each time they are shown (page load, after every action of every section), never from values captured when
the page was built."""
from __future__ import annotations

import gradio as gr

from ..host import Host


def current_text(host: Host) -> str:
    loaded = host.loaded
    if loaded is None:
        return "The original model is loaded." if host.has_original_model else "No merge in memory yet."
    if host.has_original_model:
        where = "loaded into the WebUI's model"
    elif host.has_live_model and not getattr(host, "preview_note", ""):
        where = "in memory: Generate draws with it, Save writes it to a file"
    else:
        where = "kept in memory (Save writes it to a file)"
    return f"Current merge: **{loaded.name}**, hash `{loaded.short_hash}`, {where}."


CURRENT_FIELDS = ["current", "restore"]


def current_updates(host: Host) -> dict:
    """The current-merge line, and the restore button only while there is something to restore."""
    return {"current": gr.update(value=current_text(host)),
            "restore": gr.update(value=host.restore_label, visible=host.loaded is not None)}
