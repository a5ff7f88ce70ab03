"""The "Merge" tab: gradio Blocks whose widgets come from the method specs; handlers call lib_merge.session.

gradio 3 cannot create components at run time, so every method's parameter widgets are created once
(generated from its `Param` spec) in a column per method, and switching methods only shows one column.
The block-weight (MBW) sliders are created once per bank under the 26 SD1/SD2 block names; SDXL's 20
names are a subset, so switching architecture hides IN09-IN11 and OUT09-OUT11.

Every widget has a field name (form.py). Handlers take {name: value} and return {name: update}, which
`_on` maps to gradio's dict inputs/outputs; tests call the handlers directly. Errors (MergeError) become
a readable status line; unexpected exceptions too (with the traceback in the log), never a stack trace
in the page. Long work runs in a thread while the handler streams its progress (gradio's queue).

Written for gradio 3.41.2 (the WebUI's), without `.style()` and with gr.update(...) returns, so a
gradio 4 port changes little.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from .. import session
from ..core.errors import InputError, MergeError
from ..core.generation import GenerationRequest
from ..core.weights import PRESETS, format_blocks, preset
from ..host import Host
from ..methods import METHODS, Choice, MethodSpec, Param
from . import form as F
from .jobs import ELEM, background, busy_html, error_html, failure_html, status_html, unexpected_error
from .section import Section
from .state import CURRENT_FIELDS, current_text, current_updates

log = logging.getLogger("merge_lab.ui")

PRESET_CHOICES = list(PRESETS)
INTERRUPTS = {   # what Interrupt stops, by the tab's running job
    "merge": "the merge stops before its next tensor; nothing is written or loaded.",
    "generate": "the image stops at its next step; no image is shown.",
    "xy": "the XY plot stops before its next merge or image.",
    "": "the running job stops at its next step.",
}
PAGE_FIELDS = CURRENT_FIELDS + [*F.SLOTS, "models_more", "base"]   # what actions elsewhere may change


def _combine(*updates: dict) -> dict:
    """Merge {name: update} dicts; two gr.update dicts for one name are merged (later keys win)."""
    out: dict = {}
    for u in updates:
        for k, x in u.items():
            if isinstance(out.get(k), dict) and isinstance(x, dict) and "__type__" in x:
                out[k] = {**out[k], **x}
            else:
                out[k] = x
    return out


# -------------------------------------------------------------------------------------------- widgets
def param_widget(spec: MethodSpec, p: Param):
    """The widget of one method parameter, generated from its spec."""
    kw = dict(label=F.param_label(p), info=p.help or None, elem_id=f"{ELEM}p_{spec.name}_{p.name}")
    if p.kind == "floats":
        return gr.Textbox(value=", ".join(map(str, p.default or [])), placeholder="e.g. 1, 0.5, 2 (empty: all 1)",
                          lines=1, **kw)
    if isinstance(p.kind, Choice):
        if len(p.kind.options) <= 4:
            return gr.Radio(choices=list(p.kind.options), value=p.default, **kw)
        return gr.Dropdown(choices=list(p.kind.options), value=p.default, **kw)
    if p.kind is bool:
        return gr.Checkbox(value=bool(p.default), **kw)
    lo, hi = p.range if p.range else (None, None)
    if p.kind is int:
        if p.range and hi - lo <= 100:
            return gr.Slider(minimum=lo, maximum=hi, step=1, value=p.default, **kw)
        return gr.Number(value=p.default, precision=0, **kw)
    # floats: a slider over the range, a number box for tiny tolerances (eps, ftol) or open ranges
    if p.range and (p.default == 0 or abs(p.default) >= 1e-3):
        return gr.Slider(minimum=lo, maximum=hi, step=0.001 if hi - lo <= 1 else 0.01, value=p.default, **kw)
    return gr.Number(value=p.default, **kw)


def slider_range(p: Param | None, values=()) -> tuple[float, float]:
    """A block slider's range: 0 to 1 (so 1.0 sits at the end, as on SuperMerger's MBW sliders) while every value
    fits, the parameter's whole range once one does not (a text, preset or recipe beyond 1)."""
    lo, hi = p.range if p is not None and p.range else (-1.0, 2.0)
    if lo <= 0 and hi >= 1 and all(0 <= float(x) <= 1 for x in values):
        return 0.0, 1.0
    return lo, hi


def _devices() -> list[str]:
    import torch
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ------------------------------------------------------------------------------------------- the tab
class MergeTab(Section):
    """The tab's widgets (self.c, by field name) and its handlers."""

    def __init__(self, host: Host):
        super().__init__()
        self.host = host
        self.archs = F.ArchCache()
        self._running = ""   # the tab's last started job (merge, generate, xy): what Interrupt says it stops
        self.first = METHODS["weighted_sum"] if "weighted_sum" in METHODS else next(iter(METHODS.values()))
        self.blocks = self._build()

    # ---- layout
    def _build(self) -> gr.Blocks:
        with gr.Blocks(analytics_enabled=False) as blocks:
            self._field("family", gr.State("sd1"))
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    self._build_models()
                    self._build_params()
                    self._build_mbw()
                    self._build_advanced()
                with gr.Column(scale=2):
                    self._build_actions()
                    self._build_recipe()
            # the sections update the page's host-derived widgets (current merge, model lists) after their actions
            page = {n: self.c[n] for n in PAGE_FIELDS}
            with gr.Accordion("LoRA tools", open=False, elem_id=f"{ELEM}lora_tools"):
                from .lora_tab import LoraTools  # its own widgets, handlers and status lines (lora_tab.py)
                generation = {n: self.c[n] for n in F.GENERATION_FIELDS}   # its XY plot uses the preview settings
                self.lora_tools = LoraTools(self.host, generation, page, self.page_updates)
            with gr.Accordion("AutoMBW: search the block weights", open=False, elem_id=f"{ELEM}autombw"):
                from .autombw_tab import AutoMBW  # its own widgets and handlers (autombw_tab.py)
                form = {n: self.c[n] for n in self.fields}   # the starting recipe: the tab's settings
                self.autombw = AutoMBW(self.host, form, self.archs, page, self.page_updates)
            for name in self.lora_tools.list_fields():   # Refresh lists and a page load refresh these too
                self._show(name, self.lora_tools.c[name])
            self._show("am_run", self.autombw.c["am_run"])
            self._wire()
            # on every page load (a reload too): what is true now, not what was true when the page was built
            self._on(blocks.load, self.on_page_load, [], self.page_load_fields(), queue=False)
        return blocks

    def _build_models(self) -> None:
        ckpts = self.host.list_checkpoints()
        spec = self.first
        with gr.Row():
            self._field("method", gr.Dropdown(choices=F.method_choices(), value=F.method_choice(spec),
                                              label="Method", elem_id=f"{ELEM}method", scale=3))
            self._show("refresh", gr.Button("Refresh lists", elem_id=f"{ELEM}refresh", size="sm", scale=1))
        self._show("method_help", gr.Markdown(F.method_description(spec), elem_id=f"{ELEM}method_help"))
        with gr.Row():
            for slot, label in zip(F.SLOTS, ("Model A", "Model B", "Model C")):
                optional = slot == "model_c"
                self._field(slot, gr.Dropdown(
                    choices=([F.NONE] if optional else []) + ckpts, value=F.NONE if optional else None,
                    label=label, allow_custom_value=True, elem_id=f"{ELEM}{slot}",
                    visible=not optional or len(spec.inputs) == 3 or spec.many))
        with gr.Row():
            self._field("models_more", gr.Dropdown(
                choices=ckpts, value=[], multiselect=True, label="More models", visible=spec.many,
                info="many-model methods take up to 100 models: A, B, C and these, in order",
                elem_id=f"{ELEM}models_more"))
            self._field("base", gr.Dropdown(
                choices=[F.NONE] + ckpts, value=F.NONE, label="Base model", allow_custom_value=True,
                visible=spec.base != "none", elem_id=f"{ELEM}base",
                info="the model the others were fine-tuned from (deltas δi = θi − θ0)"))
        self._show("models_info", gr.Markdown("", elem_id=f"{ELEM}models_info"))
        offer = self._demo_offer()
        with gr.Row(visible=bool(offer)) as row:
            self._show("demo_text", gr.Markdown(offer))
            self._show("demo_button", gr.Button("Create two demo models", elem_id=f"{ELEM}demo"))
        self._show("demo_row", row)

    def _demo_offer(self) -> str:
        if not self.host.can_make_demo_models or self.host.list_checkpoints():
            return ""
        folder = getattr(self.host, "models_dir", "the models folder")
        return (f"No checkpoints in `{folder}` yet. Put your `.safetensors` models there and press "
                f"Refresh, or create two tiny demo models (about 60 MB each, random weights) to try Merge Lab now.")

    def _build_params(self) -> None:
        with gr.Group():
            for spec in METHODS.values():
                with gr.Column(visible=spec is self.first) as col:
                    if not spec.params:
                        gr.Markdown(f"{spec.label} has no parameters.")
                    for p in spec.params:
                        self._field(F.param_field(spec.name, p.name), param_widget(spec, p), ui_config=False)
                self._show(f"group:{spec.name}", col)

    def _build_mbw(self) -> None:
        spec = self.first
        params = F.blockwise(spec)
        with gr.Accordion("Block weights (MBW)", open=False, elem_id=f"{ELEM}mbw_accordion"):
            self._field("mbw", gr.Checkbox(value=False, label="Use block weights", elem_id=f"{ELEM}mbw",
                                           info="per-block values replace the scalar value of the UNet blocks "
                                                "and the text encoder (BASE)"))
            self._show("mbw_note", gr.Markdown("", visible=not params))
            self._show("plot", gr.Plot(value=self._figure(None, spec, "sd1"),
                                       show_label=False, elem_id=f"{ELEM}plot"))
            for bank in range(F.BANKS):
                p = params[bank] if bank < len(params) else None
                with gr.Column(visible=p is not None) as col:
                    self._show(f"bw_head:{bank}", gr.Markdown(self._bank_title(p)))
                    with gr.Row():
                        self._field(f"bw_preset:{bank}", gr.Dropdown(
                            choices=PRESET_CHOICES, value=None, label="Preset", scale=1,
                            elem_id=f"{ELEM}bw{bank}_preset"), ui_config=False)
                        self._field(F.bank_text_field(bank), gr.Textbox(
                            value=self._bank_text(p, "sd1"), scale=3,
                            label="As text (Enter applies it to the sliders)",
                            placeholder="26 numbers (SDXL: 20), NAME=value pairs with * (IN*=0.3, M00=1), "
                                        "or a preset name then pairs (GRAD_V, BASE=0)",
                            elem_id=f"{ELEM}bw{bank}_text"), ui_config=False)
                    self._show(f"bw_msg:{bank}", gr.Markdown(""))
                    self._build_sliders(bank, p)
                self._show(f"bw_bank:{bank}", col)

    def _build_sliders(self, bank: int, p: Param | None) -> None:
        value = p.default if p else 0.5
        lo, hi = slider_range(p, [value])
        ins = [b for b in F.ALL_BLOCKS if b.startswith("IN")]
        outs = [b for b in F.ALL_BLOCKS if b.startswith("OUT")]
        with gr.Row():
            for column in (ins, outs, ["BASE", "M00"]):
                with gr.Column(min_width=160):
                    for b in column:
                        self._field(F.block_field(bank, b), gr.Slider(
                            minimum=lo, maximum=hi, step=0.01, value=value, label=b,
                            elem_id=f"{ELEM}bw{bank}_{b}"), ui_config=False)

    def _build_advanced(self) -> None:
        masks, weights = F.aux_files(self.host)
        with gr.Accordion("Advanced", open=False, elem_id=f"{ELEM}advanced"):
            with gr.Row():
                self._field("seed", gr.Number(value=0, precision=0, label="Seed",
                                              info="for the random methods (DARE...): same seed, same bits"))
                self._field("compute_dtype", gr.Radio(["float32", "float64"], value="float32",
                                                      label="Compute precision"))
                self._field("device", gr.Radio(_devices(), value="cpu", label="Device"))
                # the WebUI has this on its Settings page; the standalone app here (and `ui --cache-mb`)
                self._field("cache_mb", gr.Number(
                    value=self.host.setting("merge_lab_cache_mb", 4096), precision=0,
                    label="Live re-merge memory (MB)", visible=self.host.name == "standalone",
                    info="inputs kept in memory so a slider change re-merges without reading the files"))
            with gr.Row():
                self._field("components", gr.CheckboxGroup(
                    list(F.COMPONENT_LABELS.values()), value=["UNet", "Text encoder"], label="Merge",
                    info="unticked parts are copied from model A (the VAE is kept by default)"))
                self._field("missing_keys", gr.Radio(["keep_a", "error"], value="keep_a", label="Missing keys",
                                                     info="a key of A missing in another model"))
                self._field("nonfinite", gr.Radio(["warn", "error"], value="warn", label="NaN/Inf in the result"))
            with gr.Row():
                self._field("mask", gr.Dropdown(
                    choices=[""] + masks, value="", allow_custom_value=True, label="Mask file",
                    info="only its True elements may change; a name in the output folder or a path",
                    elem_id=f"{ELEM}mask"))
                self._field("weights", gr.Dropdown(
                    choices=[""] + weights, value="", allow_custom_value=True, label="Per-key weights",
                    info="a weight set (.json) giving the first per-block parameter per key",
                    elem_id=f"{ELEM}weights"))
            with gr.Row():
                self._field("elemental", gr.Textbox(
                    label="Elemental merge", lines=2, elem_id=f"{ELEM}elemental",
                    placeholder="OUT04 OUT05:attn2:0.5, NOT OUT04:attn:1, OUT05:NOT attn proj:0.2",
                    info="SuperMerger's BLOCKS:ELEMENTS:RATIO: the ratio of the keys whose names hold an element "
                         "(NOT: all others); it overrides the block weights of α (λ, ratio); later entries win"))
                self._field("adjust", gr.Textbox(
                    label="Adjust (IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3)", elem_id=f"{ELEM}adjust",
                    placeholder="0, 0, 0, 0, 0, 0, 0, 0",
                    info="SuperMerger's final touch on detail, contrast, brightness and colour (about ±5)"))
            with gr.Accordion("Make a mask", open=False):
                with gr.Row():
                    self._field("mask_mode", gr.Radio(["random", "gaussian", "true", "false"], value="random",
                                                      label="Mode"))
                    self._field("mask_probability", gr.Slider(0, 1, value=0.5, step=0.01,
                                                              label="Probability (random)"))
                    self._field("mask_seed", gr.Number(value=0, precision=0, label="Mask seed"))
                with gr.Row():
                    self._field("mask_name", gr.Textbox(label="Mask file name", placeholder="mask_random_50"))
                    self._show("mask_make", gr.Button("Make the mask from model A's shapes"))
            with gr.Accordion("Make per-key weights", open=False):
                with gr.Row():
                    self._field("weights_source", gr.Radio(["block sliders", "groups"], value="block sliders",
                                                           label="From"))
                    self._field("weights_groups", gr.Textbox(
                        label="Groups", placeholder="input=0.3, middle=1, output=0.7, te=0",
                        info="time, label, input, middle, output, out (or the CLI's input_blocks, middle_block, "
                             "output_blocks, out_block); te = text encoder"))
                with gr.Row():
                    self._field("weights_name", gr.Textbox(label="Weight set file name", placeholder="my_weights"))
                    self._show("weights_make", gr.Button("Make the weight set"))

    def _build_actions(self) -> None:
        can_generate = self.host.can_generate
        self._show("status", gr.HTML(status_html("info", "Choose models and a method, then press Merge."),
                                     elem_id=f"{ELEM}status"))
        with gr.Row():
            self._show("merge", gr.Button("Merge", variant="primary", elem_id=f"{ELEM}merge"))
            self._show("interrupt", gr.Button("Interrupt", variant="stop", elem_id=f"{ELEM}interrupt"))
            self._show("restore", gr.Button(self.host.restore_label, visible=self.host.loaded is not None,
                                            elem_id=f"{ELEM}restore"))
        self._show("current", gr.Markdown(current_text(self.host), elem_id=f"{ELEM}current"))
        with gr.Column(visible=can_generate) as gen:
            self._field("prompt", gr.Textbox(label="Prompt", lines=2))
            self._field("negative", gr.Textbox(label="Negative prompt", lines=1))
            with gr.Row():
                self._field("gen_seed", gr.Number(value=-1, precision=0, label="Preview seed"))
                self._field("steps", gr.Slider(1, 150, value=20, step=1, label="Steps"))
                self._field("cfg", gr.Slider(1, 30, value=7, step=0.5, label="CFG scale"))
            with gr.Row():
                self._field("width", gr.Slider(64, 2048, value=512, step=8, label="Width"))
                self._field("height", gr.Slider(64, 2048, value=512, step=8, label="Height"))
                samplers = self.host.list_samplers() or ["Euler a"]
                self._field("sampler", gr.Dropdown(choices=samplers, label="Sampler",
                                                   value="Euler a" if "Euler a" in samplers else samplers[0]))
            with gr.Row():
                self._show("generate", gr.Button("Generate", elem_id=f"{ELEM}generate"))
                self._show("merge_generate", gr.Button("Merge & Generate", variant="primary",
                                                       elem_id=f"{ELEM}merge_generate"))
            self._show("gallery", gr.Gallery(label="Previews", columns=4, object_fit="contain", elem_id=f"{ELEM}gallery"))
        self._show("gen_group", gen)
        self._build_xy()
        self._show("gen_note", gr.Markdown(
            "This app cannot make previews here (they need diffusers): Merge keeps the result in memory and "
            "Save writes it to a file you can load anywhere.", visible=not can_generate))
        with gr.Group():
            with gr.Row():
                self._field("save_name", gr.Textbox(label="File name", placeholder="(from the models and method)",
                                                    elem_id=f"{ELEM}save_name", scale=3))
                self._field("dtype", gr.Dropdown(["float16", "bfloat16", "float32"], value="float16",
                                                 label="Output dtype", scale=1))
            with gr.Row():
                self._field("overwrite", gr.Checkbox(value=False, label="Overwrite an existing file",
                                                     elem_id=f"{ELEM}overwrite"))
                self._show("save", gr.Button("Save", variant="primary", elem_id=f"{ELEM}save"))

    def _build_xy(self) -> None:
        """XY plot: preview images over one or two axes (lib_merge/xy.py), each distinct merge done once."""
        from .. import xy
        kinds = xy.kind_choices(self.first)
        self._xy_stop = threading.Event()   # set by Interrupt: the plot stops before its next merge or image
        can = self.host.can_generate
        with gr.Accordion("XY plot", open=False, elem_id=f"{ELEM}xy"):
            self._show("xy_help", gr.Markdown(
                "A grid of previews with the settings above (models, method, block weights, prompt, seed...). "
                "Values: `0.2, 0.5, 0.8`, ranges `0-1 (5)` or `1-4`, presets `GRAD_V, GRAD_A`, methods by "
                "name, checkpoint names for `model:B` (model B swapped), a JSON list of recipes; `block:IN04` "
                "sweeps one block alone; `prompt` is search and replace (the first value is the text searched). "
                "*seed* and *prompt* axes do not re-merge; each distinct merge is done once. A Z axis makes one "
                "grid per value. The grids and the images go to the output folder's `xy/`."
                if can else "The XY plot needs previews, and this host cannot generate them."))
            with gr.Row():
                self._field("xy_x_kind", gr.Dropdown(kinds, value="alpha", label="X axis", allow_custom_value=True,
                                                     elem_id=f"{ELEM}xy_x_kind", scale=1))
                self._field("xy_x_values", gr.Textbox(value="0.2, 0.5, 0.8", label="X values", lines=1,
                                                      elem_id=f"{ELEM}xy_x_values", scale=3))
            self._optional_axis_row("y", "Y axis", kinds, "e.g. GRAD_V, GRAD_A (with Y axis: preset)")
            self._optional_axis_row("z", "Z axis (one grid per value)", kinds,
                                    "e.g. model:B over other.safetensors, third.safetensors")
            with gr.Row():
                self._field("xy_save_models", gr.Checkbox(
                    value=False, label="Save each cell's model", elem_id=f"{ELEM}xy_save_models",
                    info="each distinct merge, to the output folder"))
                self._show("xy_run", gr.Button("Run XY plot", variant="primary", visible=can,
                                               elem_id=f"{ELEM}xy_run"))
            self._show("xy_status", gr.HTML("", elem_id=f"{ELEM}xy_status"))
            self._show("xy_gallery", gr.Gallery(label="XY plot (the grid, then each cell)", columns=4, object_fit="contain",
                                                elem_id=f"{ELEM}xy_gallery"))

    def _optional_axis_row(self, axis: str, label: str, kinds: list[str], placeholder: str) -> None:
        """The Y or Z axis: a kind (None by default) and its values."""
        with gr.Row():
            self._field(f"xy_{axis}_kind", gr.Dropdown([F.NONE] + kinds, value=F.NONE, label=label,
                                                       allow_custom_value=True, elem_id=f"{ELEM}xy_{axis}_kind", scale=1))
            self._field(f"xy_{axis}_values", gr.Textbox(value="", label=f"{axis.upper()} values", lines=1,
                                                        placeholder=placeholder, elem_id=f"{ELEM}xy_{axis}_values",
                                                        scale=3))

    def _build_recipe(self) -> None:
        self._field("recipe", gr.Textbox(label="Recipe (JSON) of the last merge — edit or paste one, then Load",
                                         lines=10, max_lines=30, show_copy_button=True, elem_id=f"{ELEM}recipe"))
        self._show("load_recipe", gr.Button("Load recipe", elem_id=f"{ELEM}load_recipe"))
        self._field("infotext", gr.Textbox(label="Image infotext", lines=2,
                                           placeholder="paste an infotext holding 'Merge Lab recipe: {...}'",
                                           elem_id=f"{ELEM}infotext"))
        self._show("load_infotext", gr.Button("Load from infotext", elem_id=f"{ELEM}load_infotext"))

    # ---- wiring
    def _wire(self) -> None:
        c = self.c
        slots = list(F.SLOTS) + ["models_more", "base"]
        sliders = [F.block_field(bank, b) for bank in range(F.BANKS) for b in F.ALL_BLOCKS]
        banks = [n for bank in range(F.BANKS) for n in (F.bank_text_field(bank), f"bw_msg:{bank}", f"bw_preset:{bank}")]
        layout = (["method_help", "models_info", "mbw_note", "plot", "family", "model_c", "models_more", "base",
                   "xy_x_kind", "xy_y_kind", "xy_z_kind"]
                  + [f"group:{m}" for m in METHODS] + [f"bw_bank:{b}" for b in range(F.BANKS)]
                  + [f"bw_head:{b}" for b in range(F.BANKS)] + sliders + banks)
        everything = list(self.c)
        quick = dict(queue=False, show_progress="hidden")

        self._on(c["method"].change, self.on_method, None, layout, **quick)
        for slot in slots:
            self._on(c[slot].change, self.on_models, None, layout, **quick)
        refreshed = self.refreshed_fields()
        self._on(c["refresh"].click, self.on_refresh, None, refreshed, **quick)
        self._on(c["demo_button"].click, self.on_demo, None, refreshed + ["status"], **quick)
        for bank in range(F.BANKS):
            bank_out = [F.block_field(bank, b) for b in F.ALL_BLOCKS] + [
                F.bank_text_field(bank), f"bw_msg:{bank}", f"bw_preset:{bank}", "plot"]
            for b in F.ALL_BLOCKS:
                slider = c[F.block_field(bank, b)]
                self._on(slider.input, self._slider_handler(bank), None, bank_out, **quick)
                self._on(slider.release, self.on_plot, None, ["plot"], **quick)
            for event in (c[F.bank_text_field(bank)].submit, c[F.bank_text_field(bank)].blur):
                self._on(event, self._text_handler(bank), None, bank_out, **quick)
            self._on(c[f"bw_preset:{bank}"].change, self._preset_handler(bank), None, bank_out, **quick)
        self._on(c["mbw"].change, self.on_plot, None, ["plot"], **quick)

        job = dict(show_progress="minimal")   # the status line shows the job's own progress
        merged = ["status", "recipe", *PAGE_FIELDS]
        self._on(c["merge"].click, self.on_merge, None, merged, **job)
        self._on(c["save"].click, self.on_save, None, merged + ["save_name"], **job)
        self._on(c["generate"].click, self.on_generate, None, ["status", "gallery"], **job)
        self._on(c["merge_generate"].click, self.on_merge_generate, None, merged + ["gallery"], **job)
        self._on(c["xy_run"].click, self.on_xy, None, ["xy_status", "xy_gallery", *PAGE_FIELDS], **job)
        self._on(c["restore"].click, self.on_restore, [], ["status", *PAGE_FIELDS])
        self._on(c["interrupt"].click, self.on_interrupt, [], ["status"], **quick)
        self._on(c["load_recipe"].click, self.on_load_recipe, None, everything, **quick)
        self._on(c["load_infotext"].click, self.on_load_infotext, None, everything, **quick)
        self._on(c["mask_make"].click, self.on_make_mask, None, ["status", "mask"], **job)
        self._on(c["weights_make"].click, self.on_make_weights, None, ["status", "weights"], **job)

    def _slider_handler(self, bank: int):
        def on_slider(v):
            return self.on_slider(v, bank)
        return on_slider

    def _text_handler(self, bank: int):
        def on_text(v):
            return self.on_text(v, bank)
        return on_text

    def _preset_handler(self, bank: int):
        def on_preset(v):
            return self.on_preset(v, bank)
        return on_preset

    # ---- what the page shows about the host
    def page_updates(self, wrote_files: bool = False) -> dict:
        """The current-merge line and the restore button, from the host now; the model lists too after an
        action that wrote a model file (only then: listing rescans the folders, in the WebUI every checkpoint)."""
        u = current_updates(self.host)
        return {**u, **self._model_choices()} if wrote_files else u

    def refreshed_fields(self) -> list[str]:
        """What Refresh lists refreshes: every list of files in the tab and its sections."""
        return ([*F.SLOTS, "models_more", "base", "mask", "weights", "demo_row", "demo_text"]
                + self.lora_tools.list_fields() + ["am_run"])

    def page_load_fields(self) -> list[str]:
        return CURRENT_FIELDS + self.refreshed_fields()

    def on_page_load(self, v: dict | None = None) -> dict:
        """A (re)loaded page: every host-derived widget of the tab and its sections, as the host has it now."""
        return {**self.on_refresh(v or {}), **current_updates(self.host)}

    # ---- texts
    @staticmethod
    def _bank_title(p: Param | None) -> str:
        if p is None:
            return ""
        lo, hi = p.range or ("", "")
        return f"**{F.param_label(p)} per block** — {p.help} (range {lo} to {hi})"

    @staticmethod
    def _bank_text(p: Param | None, family: str) -> str:
        n = len(F.families_blocks(family))
        return format_blocks([p.default if p else 0.5] * n, family)

    def _figure(self, v: dict | None, spec: MethodSpec, family: str):
        params = F.blockwise(spec)
        if v is None:
            curves = [(F.param_label(p), [p.default] * len(F.families_blocks(family))) for p in params]
        else:
            curves = [(F.param_label(p), F.bank_values(v, bank, family)) for bank, p in enumerate(params)]
        return F.block_figure(family, curves)

    # ---- handlers: method, models, lists
    def on_method(self, v: dict) -> dict:
        """Show the chosen method's slots and parameters; retitle and re-range the block banks."""
        spec = F.method_spec(v.get("method"))
        u = {"method_help": gr.update(value=F.method_description(spec)),
             "model_c": gr.update(visible=spec.many or len(spec.inputs) == 3,
                                  label="Model C (optional)" if spec.many else "Model C"),
             "models_more": gr.update(visible=spec.many),
             "base": gr.update(visible=spec.base != "none", label=f"Base model ({spec.base})")}
        u.update({f"group:{m}": gr.update(visible=m == spec.name) for m in METHODS})
        u.update(self._xy_kinds(v, spec))
        params = F.blockwise(spec)
        family = v.get("family") or "sd1"
        u["mbw_note"] = gr.update(visible=not params, value=f"{spec.label} has no per-block parameter.")
        v = dict(v)
        for bank in range(F.BANKS):
            p = params[bank] if bank < len(params) else None
            u[f"bw_bank:{bank}"] = gr.update(visible=p is not None)
            u[f"bw_head:{bank}"] = gr.update(value=self._bank_title(p))
            if p is None or not p.range:
                continue
            lo, hi = p.range
            shown = slider_range(p, [min(hi, max(lo, float(v[F.block_field(bank, b)]))) for b in F.ALL_BLOCKS])
            clamped = False
            for b in F.ALL_BLOCKS:
                name = F.block_field(bank, b)
                x = float(v[name])
                upd = {"minimum": shown[0], "maximum": shown[1]}
                if not lo <= x <= hi:
                    v[name], clamped = min(hi, max(lo, x)), True
                    upd["value"] = v[name]
                u[name] = gr.update(**upd)
            if clamped:
                u[F.bank_text_field(bank)] = gr.update(value=format_blocks(F.bank_values(v, bank, family), family))
        u["plot"] = self._figure(v, spec, family)
        return _combine(u, self.on_models(v))

    @staticmethod
    def _xy_kinds(v: dict, spec: MethodSpec) -> dict:
        """The XY axes offer only this method's parameters; an axis on a parameter it lacks falls back."""
        from .. import xy
        kinds = xy.kind_choices(spec)
        x = v.get("xy_x_kind")
        u = {"xy_x_kind": gr.update(choices=kinds, value=x if x in kinds else kinds[0])}
        for name in ("xy_y_kind", "xy_z_kind"):
            chosen = v.get(name)
            u[name] = gr.update(choices=[F.NONE] + kinds, value=chosen if chosen in kinds else F.NONE)
        return u

    def on_models(self, v: dict) -> dict:
        """Each chosen model's architecture (headers only), a mismatch warning, and A's block layout."""
        spec = F.method_spec(v.get("method"))
        slots = [F.slot_value(v.get(s)) for s in F.SLOTS]
        if spec.many:
            filled = [(r, m) for r, m in zip(("A", "B", "C"), slots) if m]
            more = [F.slot_value(m) for m in v.get("models_more") or [] if F.slot_value(m)]
            # numbered in merge order: with C empty the first of "More models" is the third model, #3
            pairs = filled + [(f"#{i}", m) for i, m in enumerate(more, start=len(filled) + 1)]
        else:
            pairs = list(zip(spec.inputs, slots))
        if spec.base != "none":
            pairs.append(("Base", F.slot_value(v.get("base"))))
        pairs = [(r, m) for r, m in pairs if m]
        infos = [(r, self.archs.info(self.host, m)) for r, m in pairs]
        lines = [info.line(role) for role, info in infos]
        families: dict[str, list[str]] = {}
        for role, info in infos:
            if info.arch:
                families.setdefault(info.arch.label.split()[0], []).append(role)
        if len(families) > 1:
            lines.append("⚠ **These models are of different architectures** ("
                         + "; ".join(f"{fam}: {', '.join(rs)}" for fam, rs in families.items())
                         + ") and cannot be merged together.")
        u: dict = {"models_info": gr.update(value="  \n".join(lines))}
        a = next((info for role, info in infos if role == "A"), None)
        family = a.arch.family if a and a.arch else v.get("family") or "sd1"
        if family != v.get("family"):
            u.update(self._family_updates(v, family))
        return u

    def _family_updates(self, v: dict, family: str) -> dict:
        """Show the blocks of `family` (26 or 20 sliders), with the texts and plot to match."""
        names = set(F.families_blocks(family))
        u: dict = {"family": family}
        for bank in range(F.BANKS):
            for b in F.ALL_BLOCKS:
                u[F.block_field(bank, b)] = gr.update(visible=b in names)
            u[F.bank_text_field(bank)] = gr.update(value=format_blocks(F.bank_values(v, bank, family), family))
        u["plot"] = self._figure(v, F.method_spec(v.get("method")), family)
        return u

    def _model_choices(self) -> dict:
        ckpts = self.host.list_checkpoints(refresh=True)
        return {"model_a": gr.update(choices=ckpts), "model_b": gr.update(choices=ckpts),
                "model_c": gr.update(choices=[F.NONE] + ckpts), "models_more": gr.update(choices=ckpts),
                "base": gr.update(choices=[F.NONE] + ckpts)}

    def on_refresh(self, v: dict) -> dict:
        masks, weights = F.aux_files(self.host)
        offer = self._demo_offer()
        return {**self._model_choices(), "mask": gr.update(choices=[""] + masks),
                "weights": gr.update(choices=[""] + weights), "demo_row": gr.update(visible=bool(offer)),
                "demo_text": gr.update(value=offer), **self.lora_tools.on_refresh(),
                **self.autombw.on_refresh_runs({})}

    def on_demo(self, v: dict) -> dict:
        try:
            names = self.host.create_demo_models()
        except (MergeError, OSError) as e:
            return {"status": error_html(e)}
        u = self.on_refresh(v)
        u["model_a"] = gr.update(choices=u["model_a"]["choices"], value=names[0])
        u["model_b"] = gr.update(choices=u["model_b"]["choices"], value=names[1])
        u["status"] = status_html("ok", f"Created {', '.join(names)} as models A and B. Press Merge.")
        return u

    # ---- handlers: block weights
    def _family(self, v: dict) -> str:
        return v.get("family") or "sd1"

    def _bank_param(self, v: dict, bank: int) -> Param | None:
        params = F.blockwise(F.method_spec(v.get("method")))
        return params[bank] if bank < len(params) else None

    def _set_bank(self, v: dict, bank: int, values: list[float], message: str = "") -> dict:
        family = self._family(v)
        v = dict(v)
        u: dict = {}
        lo, hi = slider_range(self._bank_param(v, bank), values)
        for b, x in zip(F.families_blocks(family), values):
            v[F.block_field(bank, b)] = x
            u[F.block_field(bank, b)] = gr.update(value=x, minimum=lo, maximum=hi)
        u[F.bank_text_field(bank)] = gr.update(value=format_blocks(values, family))
        u[f"bw_msg:{bank}"] = gr.update(value=message)
        u["plot"] = self.on_plot(v)["plot"]
        return u

    def on_slider(self, v: dict, bank: int) -> dict:
        family = self._family(v)
        return {F.bank_text_field(bank): gr.update(value=format_blocks(F.bank_values(v, bank, family), family)),
                f"bw_msg:{bank}": gr.update(value=""), f"bw_preset:{bank}": gr.update(value=None)}

    def on_text(self, v: dict, bank: int) -> dict:
        p = self._bank_param(v, bank)
        if p is None:
            return {}
        family = self._family(v)
        try:
            values = F.bank_text_values(F.method_spec(v.get("method")), v, bank, family)
            if values is None:
                raise InputError("The text is empty: type block weights, or pick a preset.")
            for b, x in zip(F.families_blocks(family), values):
                p.coerce(x, f"block {b}")
        except (InputError, ValueError) as e:
            return {f"bw_msg:{bank}": gr.update(value=f"⚠ {e} The sliders were left as they were.")}
        return {**self._set_bank(v, bank, values), f"bw_preset:{bank}": gr.update(value=None)}

    def on_preset(self, v: dict, bank: int) -> dict:
        name = v.get(f"bw_preset:{bank}")
        p = self._bank_param(v, bank)
        if not name or p is None:
            return {}
        values = preset(name, self._family(v))
        return self._set_bank(v, bank, values, f"{name}: {PRESETS[name][0]}.")

    def on_plot(self, v: dict) -> dict:
        spec = F.method_spec(v.get("method"))
        return {"plot": self._figure(v, spec, self._family(v))}

    # ---- handlers: merge, save, generate
    def _run(self, v: dict, title: str, action: Callable[[Host, Any], session.MergeSummary],
             wrote_files: bool = False) -> Iterator[dict]:
        """Build the recipe from the widgets (checked before any work), then run `action` in a thread and
        stream its progress into the status line."""
        try:
            recipe = F.recipe_from_form(self.host, v, self.archs)
        except Exception as e:  # noqa: BLE001 - failure_html tells a user's error from a bug
            yield {"status": failure_html(e)}
            return
        device = v.get("device") or "cpu"
        if v.get("cache_mb") is not None and self.host.name == "standalone":
            self.host.settings["merge_lab_cache_mb"] = max(0, int(v["cache_mb"]))
        started = time.monotonic()
        self._running = "merge"
        for done, result in background(lambda: action(self.host, recipe, device=device)):
            if not done:
                fraction, text = self.host.job_progress()
                yield {"status": busy_html(title, time.monotonic() - started, fraction, text)}
                continue
            if isinstance(result, MergeError):
                result = session.MergeSummary(False, str(result))
            elif isinstance(result, BaseException):
                result = session.MergeSummary(False, unexpected_error(result))
            self._running = ""
            yield self._summary_updates(result, wrote_files)

    def _summary_updates(self, s: session.MergeSummary, wrote_files: bool = False) -> dict:
        u = {"status": status_html("ok" if s.ok else "error", s.message, s.warnings), **self.page_updates(wrote_files)}
        if s.ok and s.recipe_json:
            u["recipe"] = gr.update(value=F.shown_recipe(s.recipe_json))
        return u

    def on_merge(self, v: dict) -> Iterator[dict]:
        yield from self._run(v, "Merging", session.merge_to_memory)

    def on_save(self, v: dict) -> Iterator[dict]:
        name = (v.get("save_name") or "").strip() or F.default_save_name(v)
        overwrite = bool(v.get("overwrite"))
        yield {"save_name": gr.update(value=name)}
        for u in self._run(v, f"Saving {name}", lambda host, recipe, device: session.save(
                host, recipe, name, overwrite=overwrite, device=device), wrote_files=True):
            yield u

    def on_generate(self, v: dict) -> Iterator[dict]:
        def request() -> GenerationRequest:
            return GenerationRequest(prompt=v.get("prompt") or "", negative_prompt=v.get("negative") or "",
                                     seed=int(v.get("gen_seed") or -1), steps=int(v.get("steps") or 20),
                                     cfg_scale=float(v.get("cfg") or 7), width=int(v.get("width") or 512),
                                     height=int(v.get("height") or 512), sampler=v.get("sampler") or "Euler a")
        started = time.monotonic()
        self._running = "generate"
        for done, result in background(lambda: session.generate(self.host, request())):
            if not done:
                fraction, text = self.host.job_progress()   # the image's step, as the XY plot shows it
                stepping = text.startswith("Step")
                yield {"status": busy_html("Generating", time.monotonic() - started, fraction if stepping else None,
                                           text if stepping else "")}
                continue
            self._running = ""
            if isinstance(result, BaseException):
                yield {"status": failure_html(result)}
            elif not result.ok:
                yield {"status": status_html("error", result.message)}
            else:
                yield {"gallery": gr.update(value=list(result.images)), "status": status_html("ok", result.message)}

    def on_merge_generate(self, v: dict) -> Iterator[dict]:
        ok = False
        for u in self.on_merge(v):
            ok = "merge-lab-ok" in u.get("status", "")
            yield u
        if ok:
            yield from self.on_generate(v)

    def on_restore(self, v: dict) -> dict:
        s = session.restore(self.host)
        return {"status": status_html("ok" if s.ok else "error", s.message), **self.page_updates()}

    def on_interrupt(self, v: dict) -> dict:
        self.host.interrupt()
        self._xy_stop.set()
        return {"status": status_html("busy", "Interrupting: " + INTERRUPTS.get(self._running, INTERRUPTS[""]))}

    # ---- handlers: XY plot
    def on_xy(self, v: dict) -> Iterator[dict]:
        """Build the base recipe (as Merge does) and the axes, then run the plot in a thread, streaming
        its progress into the XY status line."""
        from .. import xy
        try:
            if not self.host.can_generate:
                raise MergeError("The XY plot needs previews, and this host cannot generate them.")
            recipe = F.recipe_from_form(self.host, v, self.archs)
            x = xy.Axis(v.get("xy_x_kind") or "", v.get("xy_x_values") or "")
            y, z = (self._optional_axis(v, axis) for axis in "yz")
            if z is not None and y is None:
                raise InputError("XY plot: a Z axis needs a Y axis (or use the Y axis instead).")
            request = F.preview_request(v)
        except Exception as e:  # noqa: BLE001 - failure_html tells a user's error from a bug
            yield {"xy_status": failure_html(e)}
            return
        device = v.get("device") or "cpu"
        save_models = bool(v.get("xy_save_models"))
        step = [0.0, "Starting"]
        self._xy_stop.clear()

        def progress(fraction: float, text: str) -> None:
            step[0], step[1] = fraction, text

        def work():
            return xy.run_xy(self.host, recipe, x, y, request, z=z, save_models=save_models, progress=progress,
                             cancel=self._xy_stop.is_set, device=device)
        started = time.monotonic()
        self._running = "xy"
        for done, result in background(work):
            if not done:
                detail = self.host.job_progress()[1]
                yield {"xy_status": busy_html(f"XY plot: {step[1]}", time.monotonic() - started, step[0],
                                              detail if detail != step[1] else "")}
                continue
            self._running = ""
            if isinstance(result, BaseException):
                yield {"xy_status": failure_html(result), **self.page_updates(save_models)}
            else:
                grids = [(g, f"grid {label}".strip()) for g, label in result.grids]
                gallery = grids + list(zip(result.images, result.labels))
                yield {"xy_gallery": gr.update(value=gallery), **self.page_updates(save_models),
                       "xy_status": status_html("ok", result.message,
                                                [f"Saved {p.name}" for p in result.saved_models])}

    @staticmethod
    def _optional_axis(v: dict, axis: str):
        """The Y or Z axis of the form, None when its kind is None."""
        from .. import xy
        kind = F.slot_value(v.get(f"xy_{axis}_kind"))
        return xy.Axis(kind, v.get(f"xy_{axis}_values") or "") if kind else None

    # ---- handlers: recipes
    def on_load_recipe(self, v: dict) -> dict:
        return self._load(v, v.get("recipe") or "")

    def on_load_infotext(self, v: dict) -> dict:
        return self._load(v, v.get("infotext") or "")

    def _load(self, v: dict, text: str) -> dict:
        """Fill the widgets from a pasted recipe (JSON, file metadata or infotext)."""
        try:
            recipe = F.parse_recipe_text(text)
            family = F.recipe_family(recipe, self.archs, self.host)
            weights_file = F.save_recipe_weights(self.host, recipe)
            values = F.form_from_recipe(recipe, family, weights_file)
        except Exception as e:  # noqa: BLE001 - failure_html tells a user's error from a bug
            return {"status": failure_html(e)}
        merged = {**v, **values}
        u = {k: (x if k == "family" else gr.update(value=x)) for k, x in values.items()}
        layout = _combine(self.on_method(merged), self._family_updates(merged, family))
        missing = []
        for ref in recipe.models + ([recipe.base] if recipe.base else []):
            try:
                self.host.resolve_checkpoint(ref.name)
            except MergeError:
                missing.append(ref.name)
        message = f"Loaded a {recipe.method} recipe of {len(recipe.models)} models. Press Merge to redo it."
        warnings = ([f"Not in the models folder: {', '.join(missing)}. Add the files and press Refresh."]
                    if missing else [])
        if weights_file:
            warnings.append(f"Its per-key weights were written to {weights_file}.")
        return _combine(layout, u, {"status": status_html("error" if missing else "ok", message, warnings)})

    # ---- handlers: masks and weight sets
    def _model_a(self, v: dict):
        from ..core.files import open_model
        name = F.slot_value(v.get("model_a"))
        if not name:
            raise InputError("Choose model A first: masks and weight sets take its tensor shapes.")
        path = self.host.resolve_checkpoint(name)
        return open_model(path), self.archs.arch(path).family

    def _new_output(self, name: str, suffix: str) -> Path:
        from ..core.errors import OutputError
        from ..core.files import safe_output_path
        path = safe_output_path(self.host.output_dir(), name, suffix=suffix)
        if path.exists():
            raise OutputError(f"'{path.name}' already exists in the output folder: choose another name.")
        return path

    def on_make_mask(self, v: dict) -> Iterator[dict]:
        from ..core import masks

        def work():
            mode = v.get("mask_mode") or "random"
            probability = float(v.get("mask_probability") or 0)
            seed = int(v.get("mask_seed") or 0)
            name = (v.get("mask_name") or "").strip() or f"mask_{mode}_{round(probability * 100)}_{seed}"
            path = self._new_output(name, ".safetensors")
            model, family = self._model_a(v)
            with model:
                mask = masks.simple(model, mode, probability=probability, seed=seed, family=family)
            mask.save(path)
            return path
        yield from self._make("Making the mask", work, "mask")

    def on_make_weights(self, v: dict) -> Iterator[dict]:
        from ..core import weights

        def work():
            name = (v.get("weights_name") or "").strip() or "weights"
            path = self._new_output(name, ".json")
            model, family = self._model_a(v)
            with model:
                if v.get("weights_source") == "groups":
                    values = _pairs(v.get("weights_groups") or "")
                    te = values.pop("te", values.pop("base", None))   # base: the old name of te
                    ws = weights.from_groups(model, family, values, base=te)
                else:
                    ws = weights.from_blocks(model, family, F.bank_values(v, 0, family))
            if not ws:
                raise InputError("The weight set would be empty: give at least one group a value.")
            ws.save(path)
            return path
        yield from self._make("Making the weight set", work, "weights")

    def _make(self, title: str, work: Callable[[], Path], field: str) -> Iterator[dict]:
        for done, result in background(work):
            if not done:
                yield {"status": status_html("busy", f"{title}…")}
            elif isinstance(result, BaseException):
                yield {"status": failure_html(result)}
            else:
                masks, weight_sets = F.aux_files(self.host)
                choices = masks if field == "mask" else weight_sets
                yield {field: gr.update(choices=[""] + choices, value=result.name),
                       "status": status_html("ok", f"Wrote {result} and chose it in the Advanced options.")}


def _pairs(text: str) -> dict[str, float]:
    """'input=0.3, middle=1' -> {'input': 0.3, 'middle': 1.0}, with readable errors."""
    out = {}
    for item in [t for t in text.replace(";", ",").split(",") if t.strip()]:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip().lower()] = float(value)
        except ValueError:
            raise InputError(f"'{item.strip()}' is not NAME=number (e.g. input=0.3).") from None
    if not out:
        raise InputError("Give group values, e.g. input=0.3, middle=1, output=0.7.")
    return out


def make_tab(host: Host) -> MergeTab:
    return MergeTab(host)


def build_tab(host: Host) -> gr.Blocks:
    """The Merge tab's Blocks, for the WebUI's on_ui_tabs ((blocks, "Merge", "merge_lab_tab")) or the
    standalone app (rendered inside its own Blocks)."""
    return make_tab(host).blocks
