"""What every section of the tab shares about running work: the status line (progress, warnings, errors
in people's words) and long work in a thread while the handler streams its progress."""
from __future__ import annotations

import html
import logging
import threading
from typing import Any, Callable, Iterator

from ..core.errors import MergeError

log = logging.getLogger("merge_lab.ui")

ELEM = "merge_lab_"           # prefix of every elem_id (the browser test and javascript/ find widgets by it)
POLL_SECONDS = 0.25           # how often a running job's status line is refreshed


def status_html(kind: str, message: str, warnings: list[str] | tuple = (), fraction: float | None = None,
                detail: str = "") -> str:
    """The status line: kind is ok | error | busy | info; a progress bar, warnings and a detail line."""
    color = {"error": "var(--error-text-color, #c00)", "ok": "var(--color-green-600, #15803d)"}.get(kind, "inherit")
    body = html.escape(message)
    if fraction is not None:
        body += f' <progress max="1" value="{max(0.0, min(1.0, fraction)):.3f}" style="width: 10em"></progress>'
    if detail:
        body += (f'<div style="font-weight: 400; font-size: smaller; overflow-wrap: anywhere">'
                 f'{html.escape(detail)}</div>')
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    extra = f'<ul class="merge-lab-warnings">{items}</ul>' if items else ""
    return (f'<div class="merge-lab-status merge-lab-{kind}" style="color: {color}; font-weight: 600">'
            f'{body}{extra}</div>')


def busy_html(title: str, seconds: float, fraction: float | None = None, detail: str = "") -> str:
    """The status line of a running job: title, share done, time, and what it works on (a tensor name)."""
    done = f" {fraction * 100:.0f}%" if fraction is not None else ""
    return status_html("busy", f"{title}…{done} ({seconds:.0f} s)", fraction=fraction,
                       detail=detail.split(": ", 1)[-1])  # session reports "Merging: <key>"


_MARKDOWN_SPECIAL = "\\`*_{}[]()#+-.!|~"


def plain(text) -> str:
    """Text from a file (metadata, tags, names) made safe to put into Markdown: shown as written, never as HTML,
    links, images or formatting (a LoRA's metadata is data, whoever wrote it)."""
    escaped = html.escape(str(text), quote=True)
    return "".join("\\" + ch if ch in _MARKDOWN_SPECIAL else ch for ch in escaped).replace("\n", " ")


def error_html(e: BaseException) -> str:
    return status_html("error", str(e))


def failure_html(e: BaseException) -> str:
    """The status line for a failed action: a MergeError's message for people, anything else as a bug."""
    return error_html(e) if isinstance(e, MergeError) else status_html("error", unexpected_error(e))


def unexpected_error(e: BaseException) -> str:
    log.exception("Merge Lab: unexpected error")
    return (f"Unexpected error: {type(e).__name__}: {e}. This is a bug in Merge Lab; the console has the "
            f"details. Nothing was changed.")


def background(fn: Callable[[], Any]) -> Iterator[tuple[bool, Any]]:
    """Run fn in a thread; yield (False, None) while it runs, then (True, result); a MergeError or any
    other exception comes back as (True, exception)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which shows it
            box["result"] = e

    t = threading.Thread(target=target, name="merge-lab-job", daemon=True)
    t.start()
    while True:
        t.join(POLL_SECONDS)
        if not t.is_alive():
            break
        yield False, None
    yield True, box.get("result")
