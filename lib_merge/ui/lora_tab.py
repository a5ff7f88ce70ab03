"""The "LoRA tools" section of the Merge tab: info, merge, resize, extract and bake (lib_merge/lora/).

Built inside the tab's Blocks (an accordion at its end) by `LoraTools(host)`. The widgets follow the tab's
conventions: field names (all starting `lora_`), handlers that take {name: value} and return
{name: gr.update(...)}, long work in a thread (jobs.background) with the section's own status line, and
errors as sentences (MergeError), never a stack trace.

LoRA names, output files and the jobs' locking are lora/actions.py's (shared with the HTTP API): names are
paths relative to the host's LoRA folder and can never reach outside it; outputs are plain file names in the
host's output folder, or (for LoRAs) its LoRA folder.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr

from ..core.errors import InputError, MergeError
from ..core.files import OUTPUT_DTYPES
from ..lora.merge import DEFAULT_DENSITY
from ..host import Host
from ..lora.actions import (
    FAMILY_LABEL,
    baked_name,
    check_live,
    extracted_name,
    job,
    lora_path,
    new_lora_path,
    parse_lora_lines,
    resized_name,
)
from ..lora.xy import ALL_MODES as MODES, SVD_MODES  # the factor modes, then svd_<mode>
from .jobs import ELEM, background, busy_html, failure_html, plain, status_html, unexpected_error
from .section import Section

log = logging.getLogger("merge_lab.ui")

MODE_HELP = ("concat: exact weighted sum (ranks add up) · add/ties/dare/magnitude_prune: on the up/down factors "
             "(equal ranks) · svd_*: on the full ΔW, then factorised to the rank (any ranks, LoHa/LoKr too)")
WHERE = ("LoRA folder", "output folder")
LBW_PRESETS = ("", "ALL", "NONE", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5")


def _int(v, what: str, minimum: int = 0) -> int:
    try:
        x = int(float(v))
    except (TypeError, ValueError):
        raise InputError(f"The {what} must be a whole number.") from None
    if x < minimum:
        raise InputError(f"The {what} must be at least {minimum} (got {x}).")
    return x


# -------------------------------------------------------------------------------------------- info text
def info_markdown(info: dict) -> str:
    """lora.info.summary as Markdown: format, architecture, parts with ranks, parameters, ss_* fields, tags."""
    arch = FAMILY_LABEL.get(info["architecture"], "unknown")
    lines = [f"**Format:** {info['format']} ({', '.join(info['algorithms'])})  ",
             f"**Architecture:** {arch} — {'; '.join(info['architecture_evidence']) or 'no evidence'}  ",
             f"**Modules:** {info['modules']}, **parameters:** {info['parameters']:,}", "",
             "| part | modules | ranks | alphas | kinds | 3x3 convs | parameters |", "|---|---|---|---|---|---|---|"]
    for part, p in info["parts"].items():
        kinds = ", ".join(f"{k} {n}" for k, n in p["kinds"].items())
        lines.append(f"| {part} | {p['modules']} | {', '.join(map(str, p['ranks']))} | "
                     f"{', '.join(map(str, p['alphas']))} | {kinds} | {p['conv3x3_modules']} | {p['parameters']:,} |")
    if info.get("modules_without_checkpoint_key"):
        lines += ["", f"Modules without a checkpoint key: {info['modules_without_checkpoint_key']}"]
    if info["metadata"]:
        lines += ["", "**Training fields:**", ""]
        for k, v in info["metadata"].items():
            v = str(v) if len(str(v)) <= 120 else str(v)[:117] + "..."
            lines.append(f"- {plain(k)}: {plain(v)}")
    if info["top_tags"]:
        lines += ["", "**Top tags:** " + ", ".join(f"{plain(t)} ({n})" for t, n in info["top_tags"])]
    for w in info["warnings"]:
        lines.append(f"\n⚠ {plain(w)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- section
class LoraTools(Section):
    """The section's widgets (self.c, by field name) and handlers; built inside the current gr.Blocks."""

    def __init__(self, host: Host, generation: dict | None = None, page: dict | None = None,
                 page_updates: Callable[..., dict] | None = None):
        """`generation`: the Merge tab's preview widgets by name (prompt, negative, gen_seed, steps, cfg, width,
        height, sampler), which the LoRA XY plot reads as its own fields. `page`: the tab's host-derived widgets
        (current merge line, restore button, model lists) and `page_updates` their updates, which the actions
        that change the loaded model or the files return."""
        super().__init__()
        self.host = host
        self._xy_stop = threading.Event()   # set by Interrupt: the LoRA plot stops before its next merge or image
        for name, component in (generation or {}).items():
            self._field(name, component)
        self._share_page(page, page_updates)
        self._build()
        self._wire()

    def _loras(self, refresh: bool = False) -> list[str]:
        try:
            return list(self.host.list_loras(refresh=refresh))
        except Exception:  # noqa: BLE001 - a host without LoRAs: an empty list, the handlers explain
            log.exception("Merge Lab: listing LoRAs failed")
            return []

    # ---- layout
    def _build(self) -> None:
        loras = self._loras()
        ckpts = self.host.list_checkpoints()
        self._show("lora_help", gr.Markdown(
            "Inspect, merge, resize, extract and bake LoRAs. LoRAs are the files of the LoRA folder; results "
            "are written as new files (never over an input)."))
        with gr.Row():
            self._field("lora_where", gr.Radio(list(WHERE), value=WHERE[0], label="Write new LoRAs to",
                                               elem_id=f"{ELEM}lora_where"))
            self._field("lora_dtype", gr.Dropdown(list(OUTPUT_DTYPES), value="float16", label="LoRA tools output dtype",
                                                  elem_id=f"{ELEM}lora_dtype"))
            self._field("lora_overwrite", gr.Checkbox(value=False, label="LoRA tools: overwrite an existing file",
                                                      elem_id=f"{ELEM}lora_overwrite"))
            self._show("lora_refresh", gr.Button("Refresh LoRA lists", size="sm", elem_id=f"{ELEM}lora_refresh"))
            self._show("lora_interrupt", gr.Button("Interrupt", size="sm", variant="stop",
                                                   elem_id=f"{ELEM}lora_interrupt"))
        self._show("lora_notice", gr.HTML("", elem_id=f"{ELEM}lora_notice"))

        with gr.Tab("Info"):
            self._field("lora_info_name", gr.Dropdown(choices=loras, value=None, label="LoRA to inspect",
                                                      elem_id=f"{ELEM}lora_info_name"))
            self._show("lora_info", gr.Markdown("", elem_id=f"{ELEM}lora_info"))

        with gr.Tab("Merge LoRAs"):
            with gr.Row():
                self._field("lora_merge_add", gr.Dropdown(choices=loras, value=None, label="Add a LoRA to the list",
                                                          elem_id=f"{ELEM}lora_merge_add", scale=1))
                self._field("lora_merge_list", gr.Textbox(
                    label="LoRAs to merge (name:weight per line)", lines=4, scale=3,
                    placeholder="style.safetensors:0.8\nsub/character.safetensors:1:0.5   (UNet weight, text-encoder weight)",
                    elem_id=f"{ELEM}lora_merge_list"))
            with gr.Row():
                self._field("lora_merge_mode", gr.Dropdown(list(MODES), value="concat", label="LoRA merge mode",
                                                           info=MODE_HELP, elem_id=f"{ELEM}lora_merge_mode"))
                self._field("lora_merge_density", gr.Slider(0, 1, value=DEFAULT_DENSITY, step=0.01, label="LoRA merge density",
                                                            info="share kept by ties/dare/magnitude_prune"))
                self._field("lora_merge_seed", gr.Number(value=0, precision=0, label="LoRA merge seed",
                                                         info="DARE's random drops"))
            with gr.Row():
                self._field("lora_merge_rank", gr.Number(value=32, precision=0, label="SVD rank",
                                                         info="svd_* modes"))
                self._field("lora_merge_conv_rank", gr.Number(value=0, precision=0, label="SVD conv rank",
                                                              info="3x3 convs; 0: the rank"))
                self._field("lora_merge_name", gr.Textbox(label="Merged LoRA file name",
                                                          placeholder=self.merge_name("concat"),
                                                          elem_id=f"{ELEM}lora_merge_name"))
            self._show("lora_merge_run", gr.Button("Merge LoRAs", variant="primary", elem_id=f"{ELEM}lora_merge_run"))
            self._show("lora_merge_status", gr.HTML("", elem_id=f"{ELEM}lora_merge_status"))

        with gr.Tab("Resize"):
            with gr.Row():
                self._field("lora_resize_name", gr.Dropdown(choices=loras, value=None, label="LoRA to resize",
                                                            elem_id=f"{ELEM}lora_resize_name"))
                self._field("lora_resize_rank", gr.Number(value=16, precision=0, label="New rank",
                                                          info="0: none (use the rule)"))
                self._field("lora_resize_rule", gr.Textbox(label="Dynamic rule", placeholder="sv_fro:0.9",
                                                           info="sv_ratio:X, sv_cumulative:X or sv_fro:X; "
                                                                "capped by the rank when both are given"))
                self._field("lora_resize_conv_rank", gr.Number(value=0, precision=0, label="Resize conv rank",
                                                               info="3x3 convs; 0: the rank"))
            self._field("lora_resize_out", gr.Textbox(label="Resized LoRA file name", placeholder="(name)_r16"))
            self._show("lora_resize_run", gr.Button("Resize", variant="primary", elem_id=f"{ELEM}lora_resize_run"))
            self._show("lora_resize_status", gr.HTML("", elem_id=f"{ELEM}lora_resize_status"))

        with gr.Tab("Extract"):
            with gr.Row():
                self._field("lora_extract_base", gr.Dropdown(choices=ckpts, value=None, label="Base checkpoint",
                                                             elem_id=f"{ELEM}lora_extract_base"))
                self._field("lora_extract_tuned", gr.Dropdown(choices=ckpts, value=None, label="Tuned checkpoint",
                                                              elem_id=f"{ELEM}lora_extract_tuned"))
            with gr.Row():
                self._field("lora_extract_rank", gr.Number(value=32, precision=0, label="Extract rank"))
                self._field("lora_extract_conv_rank", gr.Number(value=0, precision=0, label="Extract conv rank",
                                                                info="0: no resnet (3x3) modules, as kohya"))
                self._field("lora_extract_out", gr.Textbox(label="Extracted LoRA file name",
                                                           placeholder="(tuned)_extract_r32"))
            self._show("lora_extract_run", gr.Button("Extract", variant="primary",
                                                     elem_id=f"{ELEM}lora_extract_run"))
            self._show("lora_extract_status", gr.HTML("", elem_id=f"{ELEM}lora_extract_status"))

        with gr.Tab("Bake into a checkpoint"):
            self._checkpoint_and_loras("lora_bake", ckpts, loras, "Checkpoint to bake into", "Add a LoRA to bake",
                                       "LoRAs to bake (name:strength per line)")
            with gr.Row():
                self._field("lora_bake_preset", gr.Dropdown(list(LBW_PRESETS), value="", label="LBW preset"))
                self._field("lora_bake_lbw", gr.Textbox(
                    label="Block weights (LBW)", placeholder="empty: none; a preset, or 17/26 numbers (SDXL 12/20)",
                    info="one strength per block for every LoRA (BASE is the text encoder)",
                    elem_id=f"{ELEM}lora_bake_lbw"))
            self._field("lora_bake_out", gr.Textbox(label="Baked checkpoint file name",
                                                    placeholder="(checkpoint)_(lora)", elem_id=f"{ELEM}lora_bake_out"))
            with gr.Row():
                self._show("lora_bake_run", gr.Button("Bake", variant="primary", elem_id=f"{ELEM}lora_bake_run"))
                self._show("lora_bake_live", gr.Button(
                    "Bake into the loaded model (no file)", visible=self.host.has_live_model,
                    elem_id=f"{ELEM}lora_bake_live"))
            self._show("lora_bake_status", gr.HTML("", elem_id=f"{ELEM}lora_bake_status"))

        self._build_xy(loras, ckpts)

    def _checkpoint_and_loras(self, prefix: str, ckpts: list[str], loras: list[str], ckpt_label: str,
                              add_label: str, list_label: str) -> None:
        """<prefix>_ckpt (a checkpoint), <prefix>_add (a LoRA to append) and <prefix>_list (name:strength lines)."""
        with gr.Row():
            self._field(f"{prefix}_ckpt", gr.Dropdown(choices=ckpts, value=None, label=ckpt_label,
                                                      elem_id=f"{ELEM}{prefix}_ckpt"))
            self._field(f"{prefix}_add", gr.Dropdown(choices=loras, value=None, label=add_label,
                                                     elem_id=f"{ELEM}{prefix}_add"))
        self._field(f"{prefix}_list", gr.Textbox(
            label=list_label, lines=3, elem_id=f"{ELEM}{prefix}_list",
            placeholder="style.safetensors:0.8\ncharacter.safetensors:1:0.5   (UNet strength, text-encoder strength)"))

    def _build_xy(self, loras: list[str], ckpts: list[str]) -> None:
        from ..lora.xy import ALL_MODES, kind_choices
        from .form import NONE
        can = self.host.can_generate and "prompt" in self.c
        with gr.Tab("XY plot"):
            self._show("lora_xy_help", gr.Markdown(
                "Preview images over LoRA strengths, merge modes, densities or SVD ranks, with the prompt and "
                "preview settings of the Merge tab. Each cell's LoRA merge is computed once, in memory, and baked "
                "into the loaded model on top of the checkpoint (no file). LoRAs are numbered in list order: "
                "`strength:1` is the first, `strength:2:te` the second's text-encoder strength. The grid and the "
                "images go to the output folder's `xy/`; the plot leaves its last cell loaded: "
                f"{self.host.restore_label} (above) undoes it."
                if can else "The LoRA XY plot needs previews, and this host cannot generate them."))
            self._checkpoint_and_loras("lora_xy", ckpts, loras, "Checkpoint for the plot", "Add a LoRA to the plot",
                                       "LoRAs of the plot (name:strength per line; 1, 2, ... in this order)")
            with gr.Row():
                self._field("lora_xy_mode", gr.Dropdown(list(ALL_MODES), value="concat", label="Plot merge mode",
                                                        info=MODE_HELP, elem_id=f"{ELEM}lora_xy_mode"))
                self._field("lora_xy_density", gr.Slider(0, 1, value=DEFAULT_DENSITY, step=0.01, label="Plot density"))
                self._field("lora_xy_rank", gr.Number(value=0, precision=0, label="Plot SVD rank",
                                                      info="0: merge on the factors (svd_* modes: 32)"))
                self._field("lora_xy_merge_seed", gr.Number(value=0, precision=0, label="Plot merge seed",
                                                            info="DARE's random drops"))
            self._field("lora_xy_lbw", gr.Textbox(label="Plot block weights (LBW)", placeholder="empty: none; a preset "
                                                  "or 17/26 numbers (SDXL 12/20)", elem_id=f"{ELEM}lora_xy_lbw"))
            kinds = kind_choices(4)
            with gr.Row():
                self._field("lora_xy_x_kind", gr.Dropdown(kinds, value="strength:1", label="LoRA plot X axis",
                                                          allow_custom_value=True, elem_id=f"{ELEM}lora_xy_x_kind",
                                                          scale=1))
                self._field("lora_xy_x_values", gr.Textbox(value="0, 0.5, 1", label="LoRA plot X values",
                                                           elem_id=f"{ELEM}lora_xy_x_values", scale=3))
            with gr.Row():
                self._field("lora_xy_y_kind", gr.Dropdown([NONE] + kinds, value=NONE, label="LoRA plot Y axis",
                                                          allow_custom_value=True, elem_id=f"{ELEM}lora_xy_y_kind",
                                                          scale=1))
                self._field("lora_xy_y_values", gr.Textbox(value="", label="LoRA plot Y values",
                                                           placeholder="e.g. 0-1 (3), or concat, svd_ties, or ALL | INS | OUTALL (lbw)",
                                                           elem_id=f"{ELEM}lora_xy_y_values", scale=3))
            with gr.Row():
                self._field("lora_xy_save", gr.Checkbox(value=False, label="Save each cell's LoRA",
                                                        info="kohya files beside the images, to keep the one you like",
                                                        elem_id=f"{ELEM}lora_xy_save"))
                self._show("lora_xy_run", gr.Button("Run LoRA XY plot", variant="primary", visible=can,
                                                    elem_id=f"{ELEM}lora_xy_run"))
            self._show("lora_xy_status", gr.HTML("", elem_id=f"{ELEM}lora_xy_status"))
            self._show("lora_xy_gallery", gr.Gallery(label="LoRA XY plot (the grid, then each cell)", columns=4, object_fit="contain",
                                                     elem_id=f"{ELEM}lora_xy_gallery"))

    def _wire(self) -> None:
        c = self.c
        quick = dict(queue=False, show_progress="hidden")
        job = dict(show_progress="minimal")
        self._on(c["lora_refresh"].click, self.on_refresh, [], self.list_fields(), **quick)
        self._on(c["lora_info_name"].change, self.on_info, ["lora_info_name"], ["lora_info"], **quick)
        self._on(c["lora_merge_add"].change, self.on_merge_add, ["lora_merge_add", "lora_merge_list"],
                 ["lora_merge_list", "lora_merge_add"], **quick)
        self._on(c["lora_bake_add"].change, self.on_bake_add, ["lora_bake_add", "lora_bake_list"],
                 ["lora_bake_list", "lora_bake_add"], **quick)
        self._on(c["lora_bake_preset"].change, self.on_bake_preset, ["lora_bake_preset"], ["lora_bake_lbw"], **quick)
        self._on(c["lora_xy_add"].change, self.on_xy_add, ["lora_xy_add", "lora_xy_list"],
                 ["lora_xy_list", "lora_xy_add"], **quick)
        self._on(c["lora_interrupt"].click, self.on_interrupt, [], ["lora_notice"], **quick)
        self._on(c["lora_merge_mode"].change, self.on_merge_mode, ["lora_merge_mode"], ["lora_merge_name"], **quick)
        lists = self.list_fields()
        after = [*lists, *self.page_fields]   # a job's result: new files in the lists, the loaded model's line
        self._on(c["lora_merge_run"].click, self.on_merge, None, ["lora_merge_status", *after], **job)
        self._on(c["lora_resize_run"].click, self.on_resize, None, ["lora_resize_status", *after], **job)
        self._on(c["lora_extract_run"].click, self.on_extract, None, ["lora_extract_status", *after], **job)
        self._on(c["lora_bake_run"].click, self.on_bake, None, ["lora_bake_status", *after], **job)
        self._on(c["lora_bake_live"].click, self.on_bake_live, None, ["lora_bake_status", *after], **job)
        self._on(c["lora_xy_run"].click, self.on_xy, None, ["lora_xy_status", "lora_xy_gallery", *after], **job)

    @staticmethod
    def list_fields() -> list[str]:
        return ["lora_info_name", "lora_merge_add", "lora_resize_name", "lora_bake_add", "lora_xy_add",
                "lora_extract_base", "lora_extract_tuned", "lora_bake_ckpt", "lora_xy_ckpt"]

    # ---- quick handlers
    def on_refresh(self, v: dict | None = None) -> dict:
        loras = self._loras(refresh=True)
        ckpts = self.host.list_checkpoints(refresh=True)
        return {**{n: gr.update(choices=loras) for n in ("lora_info_name", "lora_merge_add", "lora_resize_name",
                                                          "lora_bake_add", "lora_xy_add")},
                **{n: gr.update(choices=ckpts) for n in ("lora_extract_base", "lora_extract_tuned", "lora_bake_ckpt",
                                                         "lora_xy_ckpt")}}

    def on_info(self, v: dict) -> dict:
        from ..lora.info import describe
        name = v.get("lora_info_name")
        if not name:
            return {"lora_info": gr.update(value="")}
        try:
            info = describe(lora_path(self.host, name), tags=20)
        except MergeError as e:
            return {"lora_info": gr.update(value=f"⚠ {e}")}
        except Exception as e:  # noqa: BLE001
            return {"lora_info": gr.update(value=f"⚠ {unexpected_error(e)}")}
        return {"lora_info": gr.update(value=info_markdown(info))}

    @staticmethod
    def _append(text: str, name: str | None) -> str:
        if not name:
            return text or ""
        text = (text or "").rstrip("\n")
        return (text + "\n" if text else "") + f"{name}:1"

    def _add(self, v: dict, prefix: str) -> dict:
        """<prefix>_add changed: append the chosen LoRA as 'name:1' to <prefix>_list and clear the choice."""
        name = v.get(f"{prefix}_add")
        if not name:
            return {}
        return {f"{prefix}_list": gr.update(value=self._append(v.get(f"{prefix}_list"), name)),
                f"{prefix}_add": gr.update(value=None)}

    def on_merge_add(self, v: dict) -> dict:
        return self._add(v, "lora_merge")

    def on_bake_add(self, v: dict) -> dict:
        return self._add(v, "lora_bake")

    def on_xy_add(self, v: dict) -> dict:
        return self._add(v, "lora_xy")

    def on_interrupt(self, v: dict | None = None) -> dict:
        self.host.interrupt()
        self._xy_stop.set()
        return {"lora_notice": status_html("busy", "Interrupting: the LoRA job stops before its next module (a "
                                                   "plot before its next merge or image); nothing is written.")}

    def on_bake_preset(self, v: dict) -> dict:
        name = v.get("lora_bake_preset")
        return {"lora_bake_lbw": gr.update(value=name)} if name else {}

    # ---- outputs
    def _new_lora(self, v: dict, name: str, inputs: list[Path]) -> Path:
        where = "output" if v.get("lora_where") == WHERE[1] else "lora"
        return new_lora_path(self.host, name, where, inputs, bool(v.get("lora_overwrite")))

    def _check_out(self, v: dict, path: Path, inputs: list[Path]) -> Path:
        from ..core.files import check_output_path
        return check_output_path(path, inputs, bool(v.get("lora_overwrite")))

    def _dtype(self, v: dict):
        from ..core.files import dtype_from_name
        return dtype_from_name(v.get("lora_dtype") or "float16")

    def _job(self, status: str, title: str, prepare: Callable[[], Callable[[], str]],
             step: list | None = None) -> Iterator[dict]:
        """Check the inputs (prepare, at once), then run the work it returns in a thread, streaming the status
        line; the work returns the success message (warnings after a newline each)."""
        try:
            work = prepare()
        except Exception as e:  # noqa: BLE001 - failure_html tells a user's error from a bug
            yield {status: failure_html(e)}
            return
        started = time.monotonic()

        def exclusive_work():
            # like the Merge tab's actions: the host's lock (the WebUI's queue), its progress and Interrupt
            with job(self.host, title):
                return work()

        for done, result in background(exclusive_work):
            if not done:
                fraction, detail = (step or [None, ""])[:2]
                yield {status: busy_html(title, time.monotonic() - started, fraction, detail)}
            elif isinstance(result, BaseException):
                yield {status: failure_html(result)}
            else:
                message, *warnings = result.split("\n")
                yield {status: status_html("ok", message, warnings), **self.on_refresh(),
                       **self.page_updates(wrote_files=True)}

    def _progress(self, step: list):
        def progress(i: int, n: int, name: str = "") -> None:
            step[0], step[1] = (i / n if n else None), name
            self.host.progress(step[0] or 0.0, name)
        return progress

    # ---- merge
    @staticmethod
    def merge_name(mode: str) -> str:
        """The merged LoRA's file name when none is typed (the name box's placeholder shows it)."""
        return f"lora_merge_{mode or 'concat'}"

    def on_merge_mode(self, v: dict) -> dict:
        return {"lora_merge_name": gr.update(placeholder=self.merge_name(v.get("lora_merge_mode")))}

    def on_merge(self, v: dict) -> Iterator[dict]:
        step: list = [None, ""]

        def prepare():
            from ..lora.actions import merge_loras
            items = parse_lora_lines(self.host, v.get("lora_merge_list") or "")
            mode = v.get("lora_merge_mode") or "concat"
            if mode not in MODES:
                raise InputError(f"Unknown LoRA merge mode '{mode}': use {', '.join(MODES)}.")
            density = float(v.get("lora_merge_density") if v.get("lora_merge_density") is not None else DEFAULT_DENSITY)
            seed = _int(v.get("lora_merge_seed") or 0, "seed")
            rank = conv = None
            if mode in SVD_MODES:
                rank = _int(v.get("lora_merge_rank"), "SVD rank", 1)
                conv = _int(v.get("lora_merge_conv_rank") or 0, "SVD conv rank") or None
            name = (v.get("lora_merge_name") or "").strip() or self.merge_name(mode)
            out = self._new_lora(v, name, [i.path for i in items])
            dtype, overwrite = self._dtype(v), bool(v.get("lora_overwrite"))
            return lambda: merge_loras(items, out, mode=mode, density=density, seed=seed, rank=rank, conv_rank=conv,
                                       dtype=dtype, overwrite=overwrite, progress=self._progress(step),
                                       cancel=self.host.interrupted)
        yield from self._job("lora_merge_status", "Merging LoRAs", prepare, step)

    # ---- resize
    def on_resize(self, v: dict) -> Iterator[dict]:
        step: list = [None, ""]

        def prepare():
            from ..lora.actions import check_resize, resize_lora
            name = v.get("lora_resize_name") or ""
            src = lora_path(self.host, name)
            rank = _int(v.get("lora_resize_rank") or 0, "new rank") or None
            rule = (v.get("lora_resize_rule") or "").strip() or None
            check_resize(rank, rule)
            conv = _int(v.get("lora_resize_conv_rank") or 0, "conv rank") or None
            out_name = (v.get("lora_resize_out") or "").strip() or resized_name(src, rank, rule)
            out = self._new_lora(v, out_name, [src])
            dtype, overwrite = self._dtype(v), bool(v.get("lora_overwrite"))
            return lambda: resize_lora(src, out, rank=rank, rule=rule, conv_rank=conv, dtype=dtype, overwrite=overwrite,
                                       progress=self._progress(step), cancel=self.host.interrupted)
        yield from self._job("lora_resize_status", "Resizing", prepare, step)

    # ---- extract
    def on_extract(self, v: dict) -> Iterator[dict]:
        step: list = [None, ""]

        def prepare():
            from ..lora.actions import check_extract, extract_lora
            base_name, tuned_name = v.get("lora_extract_base") or "", v.get("lora_extract_tuned") or ""
            if not base_name or not tuned_name:
                raise InputError("Choose the base and the tuned checkpoint.")
            base = self.host.resolve_checkpoint(base_name)
            tuned = self.host.resolve_checkpoint(tuned_name)
            check_extract(base, tuned)
            rank = _int(v.get("lora_extract_rank"), "extract rank", 1)
            conv = _int(v.get("lora_extract_conv_rank") or 0, "conv rank") or None
            out_name = (v.get("lora_extract_out") or "").strip() or extracted_name(tuned, rank)
            out = self._new_lora(v, out_name, [base, tuned])
            dtype, overwrite = self._dtype(v), bool(v.get("lora_overwrite"))
            return lambda: extract_lora(base, tuned, out, rank, conv_rank=conv, dtype=dtype, overwrite=overwrite,
                                        progress=self._progress(step), cancel=self.host.interrupted)
        yield from self._job("lora_extract_status", "Extracting", prepare, step)

    # ---- bake
    def _bake_inputs(self, v: dict, ckpt_field: str, list_field: str, lbw_field: str):
        """(the checkpoint's file, [LoraInput], block weights or None), all checked."""
        ckpt_name = v.get(ckpt_field) or ""
        if not ckpt_name:
            raise InputError("Choose the checkpoint.")
        from ..lora.actions import check_lbw
        ckpt = self.host.resolve_checkpoint(ckpt_name)
        items = parse_lora_lines(self.host, v.get(list_field) or "")
        return ckpt, items, check_lbw(v.get(lbw_field), ckpt)   # mistakes told before any work

    def on_bake(self, v: dict) -> Iterator[dict]:
        def prepare():
            from ..core.files import safe_output_path
            from ..lora.bake import bake
            ckpt, items, lbw = self._bake_inputs(v, "lora_bake_ckpt", "lora_bake_list", "lora_bake_lbw")
            out_name = (v.get("lora_bake_out") or "").strip() or baked_name(ckpt, items)
            out = self._check_out(v, safe_output_path(self.host.output_dir(), out_name),
                                  [ckpt] + [i.path for i in items])
            dtype, overwrite = self._dtype(v), bool(v.get("lora_overwrite"))

            def work() -> str:
                r = bake(ckpt, items, out, lbw=lbw, dtype=dtype,
                         overwrite=overwrite, progress=self._progress(step), cancel=self.host.interrupted)
                self.host.saved(r.path)
                return "\n".join([f"Wrote {r.path} ({len(r.touched)} keys changed by {len(items)} "
                                  f"LoRA{'s' if len(items) > 1 else ''})."] + r.warnings[:20])
            return work
        step: list = [None, ""]
        yield from self._job("lora_bake_status", "Baking", prepare, step)

    def on_bake_live(self, v: dict) -> Iterator[dict]:
        """Bake into the host's live model (no file): then Generate in the Merge tab shows the result."""
        def prepare():
            from ..lora.live import bake_into_host
            check_live(self.host)
            ckpt, items, lbw = self._bake_inputs(v, "lora_bake_ckpt", "lora_bake_list", "lora_bake_lbw")

            def work() -> str:
                r = bake_into_host(self.host, ckpt, items, lbw=lbw, progress=self._progress(step))
                return "\n".join([f"Baked into the loaded model as {self.host.loaded.name} ({len(r.touched)} keys "
                                  f"changed; no file written). Generate shows it; {self.host.restore_label} "
                                  f"undoes it."] + r.warnings[:20])
            return work
        step: list = [None, ""]
        yield from self._job("lora_bake_status", "Baking into the loaded model", prepare, step)

    # ---- XY plot
    def on_xy(self, v: dict) -> Iterator[dict]:
        """Build the plot (checkpoint, LoRAs, merge settings) and the axes, then run it in a thread, streaming
        its progress into the plot's status line."""
        from ..lora import xy as lxy
        from .form import preview_request, slot_value
        try:
            if not self.host.can_generate:
                raise MergeError("The LoRA XY plot needs previews, and this host cannot generate them.")
            ckpt, items, lbw = self._bake_inputs(v, "lora_xy_ckpt", "lora_xy_list", "lora_xy_lbw")
            rank = _int(v.get("lora_xy_rank") or 0, "SVD rank") or None
            plot = lxy.LoraPlot(ckpt, items,
                                mode=v.get("lora_xy_mode") or "concat",
                                density=float(v.get("lora_xy_density") if v.get("lora_xy_density") is not None else 1),
                                rank=rank, merge_seed=_int(v.get("lora_xy_merge_seed") or 0, "merge seed"), lbw=lbw)
            x = lxy.LoraAxis(v.get("lora_xy_x_kind") or "", v.get("lora_xy_x_values") or "")
            y_kind = slot_value(v.get("lora_xy_y_kind"))
            y = lxy.LoraAxis(y_kind, v.get("lora_xy_y_values") or "") if y_kind else None
            request = preview_request(v)
        except Exception as e:  # noqa: BLE001 - failure_html tells a user's error from a bug
            yield {"lora_xy_status": failure_html(e)}
            return
        step = [0.0, "Starting"]
        self._xy_stop.clear()

        def progress(fraction: float, text: str) -> None:
            step[0], step[1] = fraction, text

        def work():
            return lxy.run_lora_xy(self.host, plot, x, y, request, save_loras=bool(v.get("lora_xy_save")),
                                   progress=progress, cancel=self._xy_stop.is_set)
        started = time.monotonic()
        for done, result in background(work):
            if not done:
                detail = self.host.last_progress[1]   # the step of the image, or the module being merged
                yield {"lora_xy_status": busy_html(f"LoRA XY plot: {step[1]}", time.monotonic() - started, step[0],
                                                   detail if detail != step[1] else "")}
            elif isinstance(result, BaseException):
                yield {"lora_xy_status": failure_html(result), **self.page_updates(wrote_files=True)}
            else:
                gallery = [(result.grid_image, "grid")] + list(zip(result.images, result.labels))
                yield {"lora_xy_gallery": gr.update(value=gallery), **self.on_refresh(),
                       **self.page_updates(wrote_files=True),
                       "lora_xy_status": status_html("ok", result.message)}
