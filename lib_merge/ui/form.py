"""What the Merge tab's widgets mean, without gradio: field names, form values <-> recipe, architectures,
pasted recipes and infotext, the block-weight plot.

The tab (tab.py) keeps every widget under a field name from here and hands its handlers plain
{name: value} dicts, so everything below is testable without a browser and without gradio.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import session
from ..core.arch import COMPONENTS, TEXT_ENCODER, UNET, VAE, Architecture, block_names, check_same_family
from ..core.errors import InputError, MergeError
from ..core.files import human_size
from ..core.generation import GenerationRequest
from ..core.weights import format_blocks, parse_blocks
from ..engine.recipe import ModelRef, Recipe, recipe_from_text
from .jobs import plain
from ..methods import MAX_MODELS, METHODS, MethodSpec, Param, get_method

# ------------------------------------------------------------------------------------------ field names
SLOTS = ("model_a", "model_b", "model_c")   # the fixed slots; many-model methods add "models_more"
NONE = "(none)"                             # the empty choice of the optional slots (C, base)
BANKS = 2                                    # block-weight banks: the method's 1st and 2nd per-block parameter
ALL_BLOCKS = block_names("sd1")              # one slider per name; SDXL's 20 names are a subset of these 26
COMPONENT_LABELS = {UNET: "UNet", TEXT_ENCODER: "Text encoder", VAE: "VAE"}
PARAM_LABELS = {"alpha": "α (alpha)", "beta": "β (beta)", "lambda": "λ (lambda)"}
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


def param_field(method: str, param: str) -> str:
    return f"p:{method}:{param}"


def block_field(bank: int, block: str) -> str:
    return f"bw:{bank}:{block}"


def bank_text_field(bank: int) -> str:
    return f"bw_text:{bank}"


def param_label(p: Param) -> str:
    return PARAM_LABELS.get(p.name, p.name.replace("_", " ").capitalize())


# ---------------------------------------------------------------------------------------------- methods
def method_choice(spec: MethodSpec) -> str:
    """The text the method dropdown shows (and returns): the method's label, made unique if needed."""
    same = sum(1 for s in METHODS.values() if s.label == spec.label)
    return spec.label if same == 1 else f"{spec.label} [{spec.name}]"


_BY_CHOICE = {method_choice(s): s for s in METHODS.values()}


def method_choices() -> list[str]:
    return list(_BY_CHOICE)


def method_spec(choice: str | None) -> MethodSpec:
    """The method behind a dropdown value (its label, or its registry name as recipes carry)."""
    if choice in _BY_CHOICE:
        return _BY_CHOICE[choice]
    return get_method(choice or "")


def method_description(spec: MethodSpec) -> str:
    if spec.many:
        models = f"2 to {MAX_MODELS} models (A, B, C and More models)"
    else:
        models = ", ".join(spec.inputs)
    base = {"required": "; base model required", "optional": "; base model optional"}.get(spec.base, "")
    return f"**{spec.formula}** — {spec.help}  \nModels: {models}{base}."


def blockwise(spec: MethodSpec) -> list[Param]:
    """The parameters the block-weight banks set, in bank order (α then β; λ; ratio)."""
    return [spec.param(n) for n in spec.blockwise_params[:BANKS]]


def families_blocks(family: str) -> list[str]:
    return block_names(family if family in FAMILY_LABELS else "sd1")


# -------------------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class ModelInfo:
    name: str
    arch: Architecture | None
    error: str | None
    size: int

    def line(self, slot: str) -> str:
        if self.error:
            return f"**{slot}** {plain(self.name)}: ⚠ {plain(self.error)}"
        return f"**{slot}** {plain(self.name)}: {self.arch.label}, {human_size(self.size)}"


class ArchCache:
    """Architectures read from file headers only, cached by (path, size, mtime)."""

    def __init__(self):
        self._cache: dict[tuple[str, int, int], tuple[Architecture | None, str | None]] = {}
        self._lock = threading.Lock()

    def arch(self, path: Path) -> Architecture:
        arch, error = self._lookup(Path(path))
        if error:
            raise InputError(error)
        return arch

    def _lookup(self, path: Path) -> tuple[Architecture | None, str | None]:
        from ..core.arch import detect
        from ..core.files import open_model
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        try:
            with open_model(path) as f:
                result = (detect({k: i.shape for k, i in f.tensors.items()}, path.name), None)
        except MergeError as e:
            result = (None, str(e))
        with self._lock:
            self._cache[key] = result
        return result

    def info(self, host, name: str) -> ModelInfo:
        try:
            path = host.resolve_checkpoint(name)
            arch, error = self._lookup(path)
            size = path.stat().st_size
        except (MergeError, OSError) as e:
            return ModelInfo(name, None, str(e), 0)
        return ModelInfo(name, arch, error, size)

    def check(self, host, names: list[str]) -> str:
        """Resolve every name and check the architectures agree, reading headers only; the family."""
        archs = [(n, self.arch(host.resolve_checkpoint(n))) for n in names]
        return check_same_family(archs).family


def slot_value(value: Any) -> str | None:
    value = (value or "").strip() if isinstance(value, str) else value
    return None if not value or value == NONE else value


def chosen_models(spec: MethodSpec, v: dict) -> tuple[list[str], str | None]:
    """The model names the method uses from the slots, in order, and the base; readable errors."""
    slots = [slot_value(v.get(s)) for s in SLOTS]
    if spec.many:
        models = [m for m in slots if m] + [m for m in (v.get("models_more") or []) if slot_value(m)]
        if len(models) < 2:
            raise InputError(f"{spec.label} merges 2 to {MAX_MODELS} models: choose at least models A and B "
                             f"(more in C and 'More models').")
    else:
        models = slots[:len(spec.inputs)]
        for role, m in zip(spec.inputs, models):
            if not m:
                raise InputError(f"Choose model {role}: {spec.label} takes {', '.join(spec.inputs)}.")
    base = slot_value(v.get("base")) if spec.base != "none" else None
    if spec.base == "required" and not base:
        raise InputError(f"{spec.label} needs a base model (the model the others were fine-tuned from, "
                         f"e.g. SD1.5 itself): choose it in 'Base model'.")
    return models, base


# ----------------------------------------------------------------------------------- form -> recipe
def read_params(spec: MethodSpec, v: dict) -> dict[str, Any]:
    params = {}
    for p in spec.params:
        value = v.get(param_field(spec.name, p.name), p.default)
        if p.kind == "floats":
            value = value.strip() if isinstance(value, str) else value
            value = value or None
        elif p.kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        params[p.name] = value
    return params


def bank_values(v: dict, bank: int, family: str) -> list[float]:
    return [float(v[block_field(bank, b)]) for b in families_blocks(family)]


def bank_text_values(spec: MethodSpec, v: dict, bank: int, family: str) -> list[float] | None:
    """The values the bank's text says (None when it is empty); unlisted blocks take the scalar value.

    A merge reads the text when it differs from the sliders: a text typed just before Merge was pressed
    may not have reached the sliders yet."""
    p = blockwise(spec)[bank]
    scalar = v.get(param_field(spec.name, p.name), p.default)
    try:
        return parse_blocks(v.get(bank_text_field(bank)) or "", family, float(scalar))
    except (InputError, TypeError, ValueError) as e:
        raise InputError(f"Block weights of {param_label(p)}: {e}") from None


def read_blocks(spec: MethodSpec, v: dict, family: str) -> dict[str, list[float]]:
    if not v.get("mbw"):
        return {}
    blocks = {}
    for bank, p in enumerate(blockwise(spec)):
        sliders = bank_values(v, bank, family)
        if (v.get(bank_text_field(bank)) or "").strip() == format_blocks(sliders, family):
            blocks[p.name] = sliders            # in step: the sliders keep full precision (presets)
        else:
            values = bank_text_values(spec, v, bank, family)
            blocks[p.name] = values if values is not None else sliders
    return blocks


def resolve_aux_file(host, text: str, what: str) -> Path:
    """A mask or weight-set file given by path, or by name in the output folder or the models folder."""
    text = (text or "").strip()
    p = Path(text).expanduser()
    if p.is_file():
        return p.resolve()
    for folder in [host.output_dir(), *host.search_dirs()]:
        if (Path(folder) / text).is_file():
            return (Path(folder) / text).resolve()
    raise InputError(f"{what} file not found: '{text}' (looked in the output folder and the models folder).")


def read_options(host, spec: MethodSpec, v: dict) -> dict[str, Any]:
    seed = v.get("seed", 0)
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"The seed must be a whole number, not '{seed}'.")
    labels = {label: comp for comp, label in COMPONENT_LABELS.items()}
    components = [labels.get(c, c) for c in (v.get("components") or [])]
    if not any(c in (UNET, TEXT_ENCODER, VAE) for c in components):
        raise InputError("Tick at least one component to merge (UNet, text encoder or VAE).")
    options: dict[str, Any] = {
        "seed": seed, "compute_dtype": v.get("compute_dtype") or "float32", "dtype": v.get("dtype") or "float16",
        "components": [c for c in COMPONENTS if c in components],
        "missing_keys": v.get("missing_keys") or "keep_a", "nonfinite": v.get("nonfinite") or "warn"}
    if (v.get("mask") or "").strip():
        path = resolve_aux_file(host, v["mask"], "Mask")
        options["mask"] = ModelRef(name=path.name, path=str(path))
    if (v.get("weights") or "").strip():
        from ..core.weights import WeightSet
        if not spec.blockwise_params:
            raise InputError(f"{spec.label} has no per-block parameter that per-key weights could set: "
                             f"clear 'Per-key weights'.")
        ws = WeightSet.load(resolve_aux_file(host, v["weights"], "Weight set"))
        options["layer_weights"] = {"param": spec.blockwise_params[0], "values": dict(ws)}
    if (v.get("elemental") or "").strip():
        if not spec.blockwise_params:
            raise InputError(f"{spec.label} has no per-block parameter that elemental ratios could set: "
                             f"clear 'Elemental merge'.")
        options["elemental"] = v["elemental"]
    if (v.get("adjust") or "").strip():
        options["adjust"] = v["adjust"]
    return options


def recipe_from_form(host, v: dict, archs: ArchCache) -> Recipe:
    """The recipe the widgets describe. Names, architectures and values are checked before any work."""
    spec = method_spec(v.get("method"))
    models, base = chosen_models(spec, v)
    family = archs.check(host, models + ([base] if base else []))
    return session.recipe_from_names(host, spec.name, models, base=base, params=read_params(spec, v),
                                     blocks=read_blocks(spec, v, family), **read_options(host, spec, v))


def default_save_name(v: dict) -> str:
    """A file name for Save when the box is empty: the models' stems and the method."""
    spec = method_spec(v.get("method"))
    try:
        models, _ = chosen_models(spec, v)
    except InputError:
        models = []
    stems = [Path(m).stem for m in models[:3]] + (["etc"] if len(models) > 3 else [])
    return "_".join(stems + [spec.name]) if stems else f"merged_{spec.name}"


def shown_recipe(recipe_json: str) -> str:
    """The recipe as the recipe box shows it: without local file paths (names are resolved again when
    it is loaded; the saved file's metadata leaves them out too)."""
    d = json.loads(recipe_json)
    for ref in d.get("models", []) + [d[k] for k in ("base", "mask") if isinstance(d.get(k), dict)]:
        if isinstance(ref, dict):
            ref.pop("path", None)
    return json.dumps(d, indent=2)


# ----------------------------------------------------------------------------------- recipe -> form
def _fmt_floats(values) -> str:
    return ", ".join(format_blocks([x], "sd1") for x in values) if values else ""


def form_from_recipe(recipe: Recipe, family: str, weights_file: str = "") -> dict[str, Any]:
    """Widget values that describe `recipe` (the inverse of recipe_from_form)."""
    spec = get_method(recipe.method)
    names = [m.name for m in recipe.models]
    v: dict[str, Any] = {"method": method_choice(spec), "family": family}
    if spec.many:
        v.update(model_a=names[0], model_b=names[1], model_c=names[2] if len(names) > 2 else NONE,
                 models_more=names[3:])
    else:
        v.update(dict(zip(SLOTS, names)))
        if len(names) < 3:
            v["model_c"] = NONE
        v["models_more"] = []
    v["base"] = recipe.base.name if recipe.base else NONE
    params = spec.resolve_params(recipe.params)
    for p in spec.params:
        value = params[p.name]
        v[param_field(spec.name, p.name)] = _fmt_floats(value) if p.kind == "floats" else value
    blocks = families_blocks(family)
    v["mbw"] = bool(recipe.blocks)
    for bank, p in enumerate(blockwise(spec)):
        values = recipe.blocks.get(p.name) or [params[p.name]] * len(blocks)
        v.update({block_field(bank, b): x for b, x in zip(blocks, values)})
        v[bank_text_field(bank)] = format_blocks(values, family)
    v.update(seed=recipe.seed, compute_dtype=recipe.compute_dtype, dtype=recipe.dtype,
             components=[COMPONENT_LABELS[c] for c in recipe.components if c in COMPONENT_LABELS],
             missing_keys=recipe.missing_keys, nonfinite=recipe.nonfinite,
             mask=(recipe.mask.path or recipe.mask.name) if recipe.mask else "", weights=weights_file,
             elemental=recipe.elemental or "", adjust=", ".join(format_blocks([x], "sd1") for x in recipe.adjust or []))
    return v


def recipe_family(recipe: Recipe, archs: ArchCache, host) -> str:
    if recipe.arch in FAMILY_LABELS:
        return recipe.arch
    for values in recipe.blocks.values():
        return "sdxl" if len(values) == len(block_names("sdxl")) else "sd1"
    try:
        return archs.arch(host.resolve_checkpoint(recipe.models[0].name)).family
    except MergeError:
        return "sd1"


def save_recipe_weights(host, recipe: Recipe) -> str:
    """A pasted recipe's per-key weights, written to the output folder so the weights field can name them."""
    if not recipe.layer_weights:
        return ""
    from ..core.weights import WeightSet
    ws = WeightSet(recipe.layer_weights["values"], recipe.arch)
    digest = hashlib.sha256(ws.to_json().encode()).hexdigest()[:10]
    return str(ws.save(host.output_dir() / f"recipe_weights_{digest}.json"))


def parse_recipe_text(text: str) -> Recipe:
    """A recipe from pasted text: its JSON, a file's metadata or `info --json`, or an infotext holding
    `Merge Lab recipe: {...}` (quoted or not). Lenient about what surrounds it."""
    if not (text or "").strip():
        raise InputError("Paste a recipe (JSON) or an image's infotext first.")
    return recipe_from_text(text, "the pasted text",
                            "paste the recipe JSON, or an infotext with 'Merge Lab recipe: {...}'")


# ------------------------------------------------------------------------------------------- the plot
def block_figure(family: str, curves: list[tuple[str, list[float]]]):
    """A matplotlib figure of the block weights (one line per bank) for gr.Plot."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = families_blocks(family)
    fig = Figure(figsize=(8, 2.8), dpi=100)
    ax = fig.add_subplot()
    x = list(range(len(names)))
    lows, highs = [0.0], [1.0]
    for label, values in curves:
        ax.plot(x, values, marker="o", markersize=3, linewidth=1.5, label=label)
        lows.append(min(values))
        highs.append(max(values))
    ax.axvline(names.index("M00"), color="0.6", linestyle=":", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylim(min(lows) - 0.05, max(highs) + 0.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"Block weights ({FAMILY_LABELS.get(family, family)})", fontsize=9)
    if curves:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig



# -------------------------------------------------------------------------------- masks and weight sets
def aux_files(host) -> tuple[list[str], list[str]]:
    """Names of the mask files (.safetensors holding a Merge Lab mask) and weight sets (.json) in the
    output folder, where the tab's builders save them. Only headers are read."""
    from ..core.files import SafetensorsFile
    from ..core.masks import MASK_FORMAT
    folder = Path(host.output_dir())
    masks, weights = [], []
    for p in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() == ".json":
            weights.append(p.name)
        elif p.suffix.lower() == ".safetensors":
            try:
                f = SafetensorsFile(p)
            except MergeError:
                continue
            try:
                if f.metadata.get("format") == MASK_FORMAT:
                    masks.append(p.name)
            finally:
                f.close()
    return masks, weights


GENERATION_FIELDS = ("prompt", "negative", "gen_seed", "steps", "cfg", "width", "height", "sampler")


def preview_request(v: dict) -> GenerationRequest:
    """The preview settings of the form, for the XY plot (a seed of -1 becomes one seed for the whole grid)."""
    try:
        return GenerationRequest(prompt=v.get("prompt") or "", negative_prompt=v.get("negative") or "",
                                 seed=int(v.get("gen_seed") if v.get("gen_seed") is not None else -1),
                                 steps=int(v.get("steps") or 20), cfg_scale=float(v.get("cfg") or 7),
                                 width=int(v.get("width") or 512), height=int(v.get("height") or 512),
                                 sampler=v.get("sampler") or "Euler a")
    except (TypeError, ValueError):
        raise InputError("The preview settings (seed, steps, CFG, size) must be numbers.") from None
