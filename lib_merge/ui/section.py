"""What every section of the Merge tab shares: widgets registered by name, handlers that take and return
{name: value} dicts, wired to gradio events. One place for the conventions MergeTab and LoraTools follow."""
from __future__ import annotations

import inspect
import logging
from typing import Any

import gradio as gr

log = logging.getLogger(__name__)


class Section:
    """Widgets by name (self.c) and the names handlers read (self.fields)."""

    def __init__(self):
        self.c: dict[str, Any] = {}       # every component by name (fields and display)
        self.fields: list[str] = []       # names whose values handlers read

    def _field(self, name: str, component, ui_config: bool = True):
        """A widget whose value handlers read. ui_config=False keeps it out of the WebUI's ui-config.json,
        which keys saved defaults (value, and a slider's range) by label: the generated widgets repeat
        labels across methods and banks (α of weighted_sum and of add_difference differ in range and
        default), so one saved entry would overwrite the others."""
        self.c[name] = component
        self.fields.append(name)
        if not ui_config:
            component.do_not_save_to_config = True
        return component

    def _show(self, name: str, component):
        self.c[name] = component
        return component

    def _share_page(self, page: dict | None, page_updates) -> None:
        """Show the Merge tab's host-derived widgets (current merge line, restore button, model lists) in this
        section's outputs; `page_updates(wrote_files)` gives their updates after an action here."""
        for name, component in (page or {}).items():
            self._show(name, component)
        self.page_fields = list(page or {})
        self.page_updates = page_updates or (lambda wrote_files=False: {})

    def values(self) -> dict[str, Any]:
        """The fields' current (initial) values, by name: what a handler receives."""
        return {n: self.c[n].value for n in self.fields}

    def _on(self, event, fn, inputs: list[str] | None, outputs: list[str], **kw) -> None:
        """Wire a {name: value} -> {name: update} handler (or generator) to a gradio event."""
        in_comps = {self.c[n] for n in (self.fields if inputs is None else inputs)}
        outs = [self.c[n] for n in outputs]
        allowed = set(outputs)
        names = {id(c): n for n, c in self.c.items()}   # every component exists by wiring time

        def named(data) -> dict:
            return {names[id(c)]: v for c, v in (data or {}).items()}

        def by_component(updates: dict) -> dict:
            stray = set(updates) - allowed
            if stray:
                log.error("Merge Lab: %s returned updates for undeclared outputs %s", fn.__name__, sorted(stray))
            mapped = {self.c[n]: u for n, u in updates.items() if n in allowed}
            return mapped or {outs[0]: gr.update()}   # gradio reads an empty dict as one value: say "no change"

        if inspect.isgeneratorfunction(fn):
            def handler(data=None):
                for updates in fn(named(data)):
                    yield by_component(updates)
        else:
            def handler(data=None):
                return by_component(fn(named(data)))
        handler.__name__ = fn.__name__
        event(handler, inputs=in_comps or None, outputs=outs, **kw)
