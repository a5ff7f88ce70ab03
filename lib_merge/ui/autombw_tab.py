"""The "AutoMBW" section of the Merge tab: search a merge's block weights unattended (lib_merge/optimize/).

The starting recipe is the tab's current settings (models, method, parameters, MBW sliders: the warm
start); the section adds what to search, the payloads, the scorer and the budget, and writes the same
config `python -m lib_merge optimize run` reads (shown in the section, saved in the run folder). The run
goes on in the background (optimize.jobs.Runs, shared with the HTTP API): the page may be reloaded or
closed, and "Watch" picks the running run up again. Stop ends it within the current trial; Resume
continues any unfinished run folder. Field names all start with `am_`.
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Callable

import gradio as gr

from ..core.errors import InputError, MergeError
from ..host import Host
from .form import ArchCache, recipe_from_form
from .jobs import ELEM, failure_html, status_html
from .section import Section

log = logging.getLogger("merge_lab.ui")

PAYLOAD_COLUMNS = ("prompt", "negative", "seed", "steps", "cfg", "width", "height", "sampler", "batch_size",
                   "weight", "holdout")
PAYLOAD_TYPES = ("str", "str", "number", "number", "number", "number", "number", "str", "number", "number", "bool")
DEFAULT_PAYLOAD = ["a photo of a cat sitting on a windowsill, detailed", "lowres, blurry", 1234, 20, 7, 512, 512,
                   "Euler a", 1, 1, False]
SCORERS = ("imagereward", "manual", "python:MODULE:FUNCTION")
WATCH_SECONDS = 1.0


# ------------------------------------------------------------------------------------ text -> config
def _bounds_pairs(text: str) -> dict[str, list[float]]:
    """'IN04=0.2:0.8, alpha.M00=0:0.5' -> {"IN04": [0.2, 0.8], "alpha.M00": [0, 0.5]}."""
    out = {}
    for item in [t for t in re.split(r"[,;\n]+", text or "") if t.strip()]:
        name, sep, rng = item.partition("=")
        low, colon, high = rng.partition(":")
        try:
            if not sep or not colon:
                raise ValueError
            out[name.strip()] = [float(low), float(high)]
        except ValueError:
            raise InputError(f"Bounds: '{item.strip()}' must be NAME=LOW:HIGH, e.g. IN04=0.2:0.8.") from None
    return out


def _groups(text: str) -> dict[str, list[str]]:
    """'LOW=IN00 IN01 IN02; TOP=OUT09 OUT1*' -> {"LOW": ["IN00", "IN01", "IN02"], "TOP": ["OUT09", "OUT1*"]}."""
    out = {}
    for item in [t for t in re.split(r"[;\n]+", text or "") if t.strip()]:
        name, sep, blocks = item.partition("=")
        members = [b for b in re.split(r"[,\s]+", blocks) if b]
        if not sep or not name.strip() or not members:
            raise InputError(f"Groups: '{item.strip()}' must be NAME=BLOCK BLOCK..., e.g. LOW=IN00 IN01 IN02.")
        out[name.strip()] = members
    return out


def _blocks(text: str):
    text = (text or "").strip()
    return "all" if text.lower() in ("", "all") else [b for b in re.split(r"[,\s]+", text) if b]


def payloads_from_rows(rows) -> list[dict]:
    """The payload table -> payload dicts (empty rows dropped; checked later with the config)."""
    if isinstance(rows, dict):   # the component's own value form: {"headers": [...], "data": [[...]]}
        rows = rows.get("data")
    if hasattr(rows, "values") and hasattr(rows, "columns"):   # a pandas DataFrame (gradio's default type)
        rows = rows.values.tolist()
    out = []
    for n, row in enumerate(rows or [], start=1):
        row = list(row) + [None] * (len(PAYLOAD_COLUMNS) - len(row))
        if not str(row[0] or "").strip():
            continue
        d = {}
        for name, kind, value in zip(PAYLOAD_COLUMNS, PAYLOAD_TYPES, row):
            if value is None or value == "":
                continue
            if kind == "number":
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise InputError(f"Payload table, row {n}: {name} must be a number, not '{value}'.") from None
                value = int(value) if value.is_integer() and name not in ("cfg", "weight") else value
            elif kind == "bool":
                value = value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")
            d[name] = value
        out.append(d)
    return out


def rows_from_payloads(payloads) -> list[list]:
    return [[getattr(p, name) for name in PAYLOAD_COLUMNS] for p in payloads]


def config_from_form(host: Host, v: dict, archs: ArchCache) -> dict:
    """The run config the section describes (the starting recipe from the tab's settings), checked."""
    from ..optimize.config import check_config
    recipe = recipe_from_form(host, v, archs)
    param = (v.get("am_param") or "").strip() or "alpha"
    space: dict = {param: _blocks(v.get("am_blocks"))}
    if (v.get("am_groups") or "").strip():
        space["groups"] = _groups(v["am_groups"])
    if (v.get("am_bounds") or "").strip():
        space["bounds"] = _bounds_pairs(v["am_bounds"])
    if (v.get("am_scalars") or "").strip():
        space["params"] = _bounds_pairs(v["am_scalars"])
    scorer_name = (v.get("am_scorer") or "imagereward").strip()
    scorer: dict = {"name": scorer_name}
    if scorer_name == "imagereward":
        if (v.get("am_ir_dir") or "").strip():
            scorer["model"] = v["am_ir_dir"].strip()
        scorer["sigmoid"] = bool(v.get("am_sigmoid"))
        scorer["pad"] = bool(v.get("am_pad"))
    optimizer = {"name": v.get("am_optimizer") or "bayes", "seed": int(v.get("am_seed") or 0)}
    if optimizer["name"] == "bayes":
        optimizer["init_points"] = int(v.get("am_init") or 5)
        optimizer["acquisition"] = v.get("am_acquisition") or "ucb"
    seconds = float(v.get("am_minutes") or 0) * 60
    patience = int(v.get("am_patience") or 0)
    save_name = (v.get("am_save_name") or "").strip()
    config = {
        "name": (v.get("am_name") or "").strip() or "autombw",
        "recipe": json.loads(recipe.to_json()), "space": space, "optimizer": optimizer,
        "budget": {"trials": int(v.get("am_trials") or 50), "seconds": seconds or None,
                   "patience": patience or None, "tolerance": float(v.get("am_tolerance") or 0)},
        "payloads": payloads_from_rows(v.get("am_payloads")), "scorer": scorer,
        "aggregate": v.get("am_aggregate") or "mean",
        "holdout": {"every": int(v.get("am_holdout_every") or 0), "top": 3},
        "finish": "apply" if v.get("am_finish", "apply").startswith("apply") else "restore",
        "save_best": save_name or False,
    }
    return check_config(config, "AutoMBW")


# ------------------------------------------------------------------------------------ section
class AutoMBW(Section):
    """The section's widgets (self.c) and handlers; `form` are the Merge tab's widgets (the starting recipe)."""

    def __init__(self, host: Host, form: dict, archs: ArchCache, page: dict | None = None,
                 page_updates: Callable[..., dict] | None = None):
        """`form`: the Merge tab's fields (the starting recipe); `page` and `page_updates`: the tab's
        host-derived widgets (current merge, restore, model lists), updated when a run or a button changes them."""
        super().__init__()
        self.host, self.archs = host, archs
        for name, component in form.items():
            self._field(name, component)
        self._share_page(page, page_updates)
        self._drawn: tuple | None = None
        self._build()
        self._wire()

    @property
    def runs(self):
        from ..optimize.jobs import runs_for
        return runs_for(self.host)

    def _run_choices(self) -> list[str]:
        try:
            return [r["run"] for r in self.runs.list() if r["resumable"]]
        except Exception:  # noqa: BLE001 - an unreadable output folder: no runs to offer
            log.exception("Merge Lab: listing AutoMBW runs failed")
            return []

    # ---- layout
    def _build(self) -> None:
        F = self._field
        gr.Markdown("Searches the block weights of the merge set above (its sliders are the starting point) by "
                    "generating the payloads and scoring the images, trial after trial. The run goes on if you "
                    "leave the page; **Watch** shows it again. Same config as `python -m lib_merge optimize run`.")
        with gr.Row():
            F("am_name", gr.Textbox(value="autombw", label="Run name", elem_id=f"{ELEM}am_name"))
            F("am_param", gr.Textbox(value="alpha", label="Parameter searched per block", elem_id=f"{ELEM}am_param"))
            F("am_blocks", gr.Textbox(value="all", label="Blocks (all, or names with *: IN04 M00 OUT*)",
                                      elem_id=f"{ELEM}am_blocks"))
        with gr.Row():
            F("am_groups", gr.Textbox(label="Groups (one value each): NAME=BLOCKS; ...", placeholder="LOW=IN00 IN01 IN02"))
            F("am_bounds", gr.Textbox(label="Bounds (default 0:1): NAME=LOW:HIGH, ...", placeholder="IN04=0.2:0.8"))
            F("am_scalars", gr.Textbox(label="Scalar parameters to search: NAME=LOW:HIGH", placeholder="density=0.1:0.9"))
        F("am_payloads", gr.Dataframe(headers=list(PAYLOAD_COLUMNS), datatype=list(PAYLOAD_TYPES),
                                      value=[DEFAULT_PAYLOAD], row_count=(1, "dynamic"),
                                      col_count=(len(PAYLOAD_COLUMNS), "fixed"), type="array",
                                      label="Payloads (seed -1 is fixed once for the run; holdout rows only validate)",
                                      elem_id=f"{ELEM}am_payloads"))
        with gr.Row():
            self._show("am_payload_file", gr.File(label="Load payloads (ours, bayesian-merger YAML, AutoMBW-rt JSON, "
                                                        "PNGs with infotext)", file_count="multiple",
                                                  elem_id=f"{ELEM}am_payload_file"))
            with gr.Column():
                F("am_payload_name", gr.Textbox(value="payloads.yaml", label="Save payloads as (output folder)"))
                self._show("am_payload_save", gr.Button("Save payloads", size="sm"))
        with gr.Row():
            F("am_scorer", gr.Dropdown(list(SCORERS), value="imagereward", allow_custom_value=True, label="Scorer",
                                       elem_id=f"{ELEM}am_scorer"))
            F("am_ir_dir", gr.Textbox(value=self.host.setting("merge_lab_imagereward_dir", "") or "",
                                      label="ImageReward folder (empty: the setting, else the online download)"))
            F("am_sigmoid", gr.Checkbox(value=False, label="Sigmoid"))
            F("am_pad", gr.Checkbox(value=False, label="Pad non-square images (no crop)"))
            F("am_aggregate", gr.Dropdown(["mean", "geometric", "harmonic", "median", "min"], value="mean",
                                          label="Aggregate"))
        with gr.Row():
            F("am_optimizer", gr.Dropdown(["bayes", "random", "cma"], value="bayes", label="Optimiser"))
            F("am_acquisition", gr.Dropdown(["ucb", "ei", "pi"], value="ucb", label="Acquisition (bayes)"))
            F("am_init", gr.Number(value=5, precision=0, label="Random initial points"))
            F("am_seed", gr.Number(value=0, precision=0, label="Seed"))
        with gr.Row():
            F("am_trials", gr.Number(value=50, precision=0, label="Trials", elem_id=f"{ELEM}am_trials"))
            F("am_minutes", gr.Number(value=0, label="Time limit (minutes, 0: none)"))
            F("am_patience", gr.Number(value=0, precision=0, label="Patience (trials, 0: none)"))
            F("am_tolerance", gr.Number(value=0, label="Tolerance"))
            F("am_holdout_every", gr.Number(value=0, precision=0, label="Holdout every N trials (0: at the end)"))
        with gr.Row():
            undo = "restore original" if self.host.has_original_model else "forget the merge"
            F("am_finish", gr.Radio(["apply best", undo], value="apply best", label="At the end"))
            F("am_save_name", gr.Textbox(label="Save the best as (empty: don't)", placeholder="best_merge",
                                           elem_id=f"{ELEM}am_save_name"))
        with gr.Row():
            self._show("am_start", gr.Button("Start", variant="primary", elem_id=f"{ELEM}am_start"))
            self._show("am_stop", gr.Button("Stop", variant="stop", elem_id=f"{ELEM}am_stop"))
            self._show("am_watch", gr.Button("Watch", elem_id=f"{ELEM}am_watch"))
        with gr.Row():
            F("am_run", gr.Dropdown(self._run_choices(), label="Unfinished runs", allow_custom_value=True,
                                    elem_id=f"{ELEM}am_run"))
            self._show("am_runs_refresh", gr.Button("Refresh runs", size="sm"))
            self._show("am_resume", gr.Button("Resume", elem_id=f"{ELEM}am_resume"))
        self._show("am_status", gr.HTML(status_html("info", "Set the merge above, then press Start."),
                                        elem_id=f"{ELEM}am_status"))
        with gr.Row():
            self._show("am_convergence", gr.Image(label="Convergence", type="filepath", interactive=False,
                                                  elem_id=f"{ELEM}am_convergence"))
            self._show("am_blocks_plot", gr.Image(label="Weights: best, current, spread of the top trials",
                                                  type="filepath", interactive=False))
        self._show("am_gallery", gr.Gallery(label="Latest trial's images", columns=4, object_fit="contain",
                                            elem_id=f"{ELEM}am_gallery"))
        with gr.Row():
            F("am_ratings", gr.Textbox(label="Manual scorer: your ratings, one number per image (e.g. 0-10)",
                                       elem_id=f"{ELEM}am_ratings"))
            self._show("am_rate", gr.Button("Send ratings", size="sm", elem_id=f"{ELEM}am_rate"))
        with gr.Row():
            self._show("am_apply", gr.Button("Apply best", elem_id=f"{ELEM}am_apply"))
            self._show("am_save", gr.Button("Save best", elem_id=f"{ELEM}am_save"))
            self._show("am_restore", gr.Button(self.host.restore_label, elem_id=f"{ELEM}am_restore"))
        self._show("am_config", gr.Code(language="json", label="The run's config (optimize run reads it)",
                                        interactive=False, elem_id=f"{ELEM}am_config"))

    def _wire(self) -> None:
        c = self.c
        quick = dict(queue=False, show_progress="hidden")
        watch_out = ["am_status", "am_convergence", "am_blocks_plot", "am_gallery", "am_run", *self.page_fields]
        self._on(c["am_start"].click, self.on_start, None, ["am_config", *watch_out], show_progress="hidden")
        self._on(c["am_watch"].click, self.on_watch, [], watch_out, show_progress="hidden")
        self._on(c["am_resume"].click, self.on_resume, ["am_run"], watch_out, show_progress="hidden")
        self._on(c["am_stop"].click, self.on_stop, [], ["am_status"], **quick)
        self._on(c["am_runs_refresh"].click, self.on_refresh_runs, [], ["am_run"], **quick)
        self._on(c["am_rate"].click, self.on_rate, ["am_ratings"], ["am_status", "am_ratings"], **quick)
        after = ["am_status", *self.page_fields]
        self._on(c["am_apply"].click, self.on_apply, ["am_run"], after, show_progress="minimal")
        self._on(c["am_save"].click, self.on_save_best, ["am_run", "am_save_name"], after, show_progress="minimal")
        self._on(c["am_restore"].click, self.on_restore, [], after, show_progress="minimal")
        self._on(c["am_payload_file"].upload, self.on_load_payloads, ["am_payload_file"], ["am_payloads", "am_status"],
                 **quick)
        self._on(c["am_payload_save"].click, self.on_save_payloads, ["am_payloads", "am_payload_name"],
                 ["am_status"], **quick)

    # ---- handlers
    def on_start(self, v: dict):
        try:
            config = config_from_form(self.host, v, self.archs)
            name = self.runs.start(config)
        except MergeError as e:
            yield {"am_status": failure_html(e)}
            return
        except Exception as e:  # noqa: BLE001 - a bug: said so, in the tab
            yield {"am_status": failure_html(e)}
            return
        yield {"am_config": json.dumps(config, indent=2), "am_status": status_html("busy", f"Started {name}…")}
        yield from self.on_watch({})

    def on_resume(self, v: dict):
        try:
            name = self.runs.resume((v.get("am_run") or "").strip())
        except MergeError as e:
            yield {"am_status": failure_html(e)}
            return
        yield {"am_status": status_html("busy", f"Resuming {name}…")}
        yield from self.on_watch({})

    def on_watch(self, v: dict | None = None):
        """Stream the running run's status, plots and latest images until it ends (a page reload may re-watch)."""
        seen = None
        while True:
            updates = self.watch_once(seen)
            seen = updates.pop("_seen", seen)
            yield updates
            if not self.runs.busy:
                final = self.watch_once(None)
                final.pop("_seen", None)
                # a run may end by saving its best merge (save_best): the model lists follow
                yield {**final, "am_run": gr.update(choices=self._run_choices()),
                       **self.page_updates(wrote_files=True)}
                return
            time.sleep(WATCH_SECONDS)

    def watch_once(self, seen) -> dict:
        runs = self.runs
        run = runs.run
        if run is None:
            message = runs.error or ("Starting…" if runs.busy else "No run is going on.")
            kind = "error" if runs.error else ("busy" if runs.busy else "info")
            return {"am_status": status_html(kind, message, detail=" · ".join(runs.lines[-2:]))}
        s = runs.status()
        best = s.get("best")
        head = f"{s['trials']} of {s['total']} trials done"
        if best:
            head += f" · best {best['score']:.4f} (trial {best['trial']})"
        if s.get("eta_seconds") is not None and runs.busy:
            head += f" · about {_duration(s['eta_seconds'])} left"
        if s.get("waiting_for_ratings"):
            head += f" · waiting for your ratings of {s['waiting_for_ratings']} image(s)"
        kind = "busy" if runs.busy else ("error" if s.get("error") or s["state"] == "failed" else "ok")
        if not runs.busy:
            head = f"Run {s['state']}" + (f" ({s['reason']})" if s.get("reason") else "") + ": " + head
        detail = s.get("error") or " · ".join(s.get("lines", [])[-2:])
        updates = {"am_status": status_html(kind, head, detail=detail or "")}
        key = (run.log.folder.name, s["trials"], len(run.holdouts))
        if key != seen:
            try:
                from ..optimize.report import draw_report
                convergence, blocks = draw_report(run)
                updates["am_convergence"] = str(convergence)
                updates["am_blocks_plot"] = str(blocks)
            except Exception:  # noqa: BLE001 - a plot must never break the watch
                log.exception("Merge Lab: drawing the AutoMBW report failed")
            latest = s.get("latest") or {}
            images = [str(run.log.folder / p) for p in latest.get("images", [])]
            scores = latest.get("scores") or []
            updates["am_gallery"] = [(p, f"trial {latest.get('trial')}: {scores[i]:.4f}" if i < len(scores) else
                                      f"trial {latest.get('trial')}: {latest.get('error') or ''}")
                                     for i, p in enumerate(images)]
            updates["_seen"] = key
        return updates

    def on_stop(self, v: dict) -> dict:
        return {"am_status": status_html("info", self.runs.stop())}

    def on_refresh_runs(self, v: dict) -> dict:
        return {"am_run": gr.update(choices=self._run_choices())}

    def on_rate(self, v: dict) -> dict:
        try:
            ratings = [float(x) for x in re.split(r"[,\s;]+", v.get("am_ratings") or "") if x]
            message = self.runs.rate(ratings)
        except ValueError:
            return {"am_status": status_html("error", "Ratings must be numbers, e.g. 7, 5.5, 9.")}
        except MergeError as e:
            return {"am_status": failure_html(e)}
        return {"am_status": status_html("ok", message), "am_ratings": ""}

    def _best_recipe(self, name: str):
        from ..optimize.runlog import RunLog
        from ..optimize.runner import Run
        run = self.runs.run
        if name and (run is None or run.log.folder.name != name):
            run = Run(RunLog.open(self.runs.folder(name)))
        if run is None:
            raise InputError("Choose a run (Unfinished runs) or start one first.")
        recipe = run.best_recipe()
        if recipe is None:
            raise InputError(f"{run.log.folder.name} has no successful trial yet.")
        return run, recipe

    def _after_run(self, fn, wrote_files: bool = False):
        if self.runs.busy:
            return {"am_status": status_html("error", "A run is going on: stop it first.")}
        try:   # gradio runs handlers in a worker thread: the page stays responsive while this merges
            result = fn()
        except Exception as e:  # noqa: BLE001 - a MergeError's message, or a bug said so, in the section
            return {"am_status": failure_html(e)}
        return {"am_status": status_html("ok" if result.ok else "error", result.message),
                **self.page_updates(wrote_files)}

    def on_apply(self, v: dict) -> dict:
        from .. import session
        try:
            _, recipe = self._best_recipe((v.get("am_run") or "").strip())
        except MergeError as e:
            return {"am_status": failure_html(e)}
        return self._after_run(lambda: session.merge_to_memory(self.host, recipe))

    def on_save_best(self, v: dict) -> dict:
        from .. import session
        try:
            run, recipe = self._best_recipe((v.get("am_run") or "").strip())
        except MergeError as e:
            return {"am_status": failure_html(e)}
        name = (v.get("am_save_name") or "").strip() or f"{run.config['name']}-best"
        return self._after_run(lambda: session.save(self.host, recipe, name), wrote_files=True)

    def on_restore(self, v: dict) -> dict:
        from .. import session
        return self._after_run(lambda: session.restore(self.host))

    def on_load_payloads(self, v: dict) -> dict:
        """Uploaded payload files (or PNGs) -> the table; each file's format is detected."""
        from ..optimize.payloads import read_payloads
        files = v.get("am_payload_file") or []
        if not files:
            return {"am_status": status_html("info", "No payload file chosen.")}
        try:
            payloads, notes = [], []
            for f in files if isinstance(files, list) else [files]:
                payloads += read_payloads(getattr(f, "name", f), notes=notes)   # gradio 3: a temp file; 4: a path
        except MergeError as e:
            return {"am_status": failure_html(e)}
        return {"am_payloads": rows_from_payloads(payloads),
                "am_status": status_html("ok", f"Loaded {len(payloads)} payload(s).", warnings=notes)}

    def on_save_payloads(self, v: dict) -> dict:
        from ..core.files import safe_output_path
        from ..optimize.payloads import Payload, write_payloads
        try:
            name = (v.get("am_payload_name") or "payloads.yaml").strip()
            suffix = Path(name).suffix.lower() if Path(name).suffix.lower() in (".json", ".yaml", ".yml") else ".yaml"
            folder = Path(self.host.output_dir()) / "autombw"
            folder.mkdir(parents=True, exist_ok=True)
            path = safe_output_path(folder, name, suffix)
            rows = payloads_from_rows(v.get("am_payloads"))
            payloads = [Payload.from_dict(d, f"payload {i + 1}") for i, d in enumerate(rows)]
            if not payloads:
                raise InputError("The payload table is empty.")
            write_payloads(payloads, path)
        except MergeError as e:
            return {"am_status": failure_html(e)}
        return {"am_status": status_html("ok", f"Saved {len(payloads)} payload(s) to {path}.")}


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"
