"""XY(Z) plot: a grid of preview images over one or two axes (α, β, a block-weight preset, one block swept
alone, any method parameter, the method, one model slot swapped among checkpoints, the prompt (search and
replace), the generation seed, or whole recipes), and a Z axis: one grid per Z value.

    x = Axis.parse("alpha", "0.2, 0.5, 0.8")      y = Axis.parse("preset", "GRAD_V, GRAD_A")
    result = run_xy(host, base_recipe, x, y, GenerationRequest(prompt="a cat", seed=1))
    result.grid_image, result.images, result.labels, result.merges_done, result.folder

Every cell's recipe is built and checked before any work. Cells that share a recipe (e.g. they differ
only in the generation seed) share one merge: the distinct recipes are merged in turn, each once (through
session.merge_to_memory, so a host's live re-merge cache rewrites only the tensors whose values changed),
and all of a recipe's cells are generated before the next merge. The grid (column labels on top, row
labels on the left) and every cell's image are written as PNGs, with their infotext in the "parameters"
text chunk, into <output folder>/xy/<timestamp>/. Errors are MergeError with a sentence for people.
"""
from __future__ import annotations

import copy
import json
import math
import random
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from . import session
from .core.errors import CancelledError, InputError, MergeError
from .core.generation import GenerationRequest
from .engine.recipe import Recipe
from .host import Host
from .methods import METHODS, get_method

KINDS = ("alpha", "beta", "preset", "method", "seed", "prompt", "recipe")   # plus param:<name>, block:<B>, model:<slot>
SLOT_NAMES = ("A", "B", "C")   # model:A / model:B / model:C (or model:4 ... for many-model methods, 1-based)
MAX_VALUES = 64                      # values per axis (a range may not expand past it)
GREEK = {"alpha": "α", "beta": "β", "lambda": "λ"}
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_RANGE = re.compile(rf"^\s*({_NUM})\s*-\s*({_NUM})\s*(?:\(\s*(\d+)\s*\))?\s*$")


# ---------------------------------------------------------------------------------------------- values
def fmt_value(v: Any) -> str:
    """A value as a label shows it: 0.30000000000000004 -> 0.3, 1.0 -> 1, True -> on."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        s = f"{v:.4f}".rstrip("0").rstrip(".")
        return s if s not in ("-0", "") else "0"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x) for x in v)
    return str(v)


def _split(text: str, sep: str = r"[,;\n]") -> list[str]:
    return [t.strip() for t in re.split(sep, text) if t.strip()]


def _expand(item: str) -> list[Any]:
    """'0-1 (5)' -> [0, 0.25, 0.5, 0.75, 1]; '1-4' -> [1, 2, 3, 4]; anything else -> [item]."""
    m = _RANGE.match(item)
    if not m:
        return [item]
    lo, hi, count = float(m.group(1)), float(m.group(2)), m.group(3)
    if count is None:
        if not (lo.is_integer() and hi.is_integer()):
            raise InputError(f"XY plot: the range '{item}' needs a count for numbers that are not whole, "
                             f"e.g. '{m.group(1)}-{m.group(2)} (5)'.")
        step = 1 if hi >= lo else -1
        n = int(abs(hi - lo)) + 1
        if n > MAX_VALUES:
            raise InputError(f"XY plot: the range '{item}' has {n} values; an axis takes at most {MAX_VALUES}.")
        return [int(lo) + step * i for i in range(n)]
    n = int(count)
    if not 1 <= n <= MAX_VALUES:
        raise InputError(f"XY plot: the range '{item}' asks for {n} values; give 1 to {MAX_VALUES}.")
    if n == 1:
        return [lo]
    return [round(lo + (hi - lo) * i / (n - 1), 10) for i in range(n)]


def _method_name(text: str) -> str:
    t = text.strip()
    if t in METHODS:
        return t
    by_label = [s.name for s in METHODS.values() if s.label.lower() == t.lower() or s.name.lower() == t.lower()]
    if len(by_label) == 1:
        return by_label[0]
    raise InputError(f"XY plot: unknown merge method '{text}'. Methods: {', '.join(sorted(METHODS))}.")


def _recipes_from_text(text: str) -> list[Recipe]:
    """A JSON list of recipes, or recipe objects one after another (separated by blank space or commas)."""
    text = text.strip()
    items: list = []
    decoder = json.JSONDecoder()
    pos = 0
    while pos < len(text):
        while pos < len(text) and (text[pos].isspace() or text[pos] == ","):
            pos += 1
        if pos >= len(text):
            break
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InputError(f"XY plot: the recipes are not valid JSON: {e.msg} (at character {e.pos + 1}). "
                             f"Give a JSON list of recipes, or recipes one after another.") from None
        except (ValueError, RecursionError) as e:   # a number of over 4300 digits; nesting too deep
            raise InputError(f"XY plot: the recipes are not valid JSON ({e}). Give a JSON list of recipes, or "
                             f"recipes one after another.") from None
        items.extend(obj if isinstance(obj, list) else [obj])
    return [_recipe(x) for x in items]


def _recipe(x: Any) -> Recipe:
    if isinstance(x, Recipe):
        return copy.deepcopy(x)
    if isinstance(x, str):
        return Recipe.from_json(x)
    return Recipe.from_dict(x)


# ------------------------------------------------------------------------------------------------ axes
@dataclass
class Axis:
    """One axis of the plot. kind: alpha | beta | preset | param:<name> | method | seed | recipe.

    values: a list, or the text form ("0.2, 0.5, 0.8"; ranges "0-1 (5)" and "1-4"; "GRAD_V, GRAD_A";
    for recipe, a JSON list of recipes; for a list-valued parameter such as weights, values separated by
    '|'). Values are checked against each cell's method when the plot is run.
    """
    kind: str
    values: Any

    def __post_init__(self):
        kind = (self.kind or "").strip()
        low = kind.lower()
        if low in KINDS:
            kind = low
        elif low.startswith("param:") and kind[6:].strip():
            name = kind[6:].strip()
            kind = name if name in ("alpha", "beta") else f"param:{name}"
        elif low.startswith("block:") and kind[6:].strip():
            from .core.arch import block_names
            name = kind[6:].strip().upper()
            if name not in block_names("sd1"):
                raise InputError(f"XY plot: '{kind[6:].strip()}' is not a block (BASE, IN00..IN11, M00, OUT00..OUT11).")
            kind = f"block:{name}"
        elif low.startswith("model:") and kind[6:].strip():
            slot = kind[6:].strip().upper()
            if slot not in SLOT_NAMES and not (slot.isdigit() and int(slot) >= 1):
                raise InputError(f"XY plot: model axis '{kind}': use model:A, model:B, model:C or model:N (1-based).")
            kind = f"model:{slot}"
        else:
            raise InputError(f"XY plot: unknown axis kind '{self.kind}'. Use one of alpha, beta, preset, "
                             f"block:<name> (one block alone, e.g. block:IN04), param:<name> (any method parameter, "
                             f"e.g. param:density), method, model:<A|B|C> (swap that model), prompt (search and "
                             f"replace: the first value is the text searched), seed, recipe.")
        self.kind = kind
        values = self.values
        if kind == "recipe":
            values = _recipes_from_text(values) if isinstance(values, str) else [_recipe(v) for v in values or []]
        else:
            if isinstance(values, str):
                sep = r"[|\n]" if self._list_valued() else r"[,;\n]"
                values = _split(values, sep)
            out: list = []
            numeric = kind not in ("method", "preset", "prompt") and not kind.startswith("model:") \
                and not self._list_valued()
            for v in values or []:
                out.extend(_expand(v) if isinstance(v, str) and numeric else [v])
            values = [_number(v) if numeric else v for v in out]
            if kind == "preset":
                from .core.weights import PRESETS
                values = [str(v).strip().upper() for v in values]
                bad = [v for v in values if v not in PRESETS]
                if bad:
                    raise InputError(f"XY plot: unknown block-weight preset(s) {', '.join(bad)}. "
                                     f"Presets: {', '.join(PRESETS)}.")
            elif kind == "method":
                values = [_method_name(str(v)) for v in values]
            elif kind == "seed":
                try:
                    values = [_whole(v) for v in values]
                except (TypeError, ValueError):
                    raise InputError(f"XY plot: seeds must be whole numbers, not {fmt_value(values)}.") from None
        if not values:
            raise InputError(f"XY plot: the {self.title} axis has no values.")
        if len(values) > MAX_VALUES:
            raise InputError(f"XY plot: the {self.title} axis has {len(values)} values; at most {MAX_VALUES}.")
        self.values = list(values)

    @classmethod
    def parse(cls, kind: str, text: str) -> "Axis":
        return cls(kind, text)

    def _list_valued(self) -> bool:
        name = self.param_name
        return name is not None and any(p.name == name and p.kind == "floats"
                                        for s in METHODS.values() for p in s.params)

    @property
    def param_name(self) -> str | None:
        """The method parameter this axis sets (alpha, beta, or param:<name>), else None."""
        if self.kind in ("alpha", "beta"):
            return self.kind
        return self.kind[6:] if self.kind.startswith("param:") else None

    @property
    def changes_recipe(self) -> bool:
        return self.kind not in ("seed", "prompt")

    @property
    def title(self) -> str:
        name = self.param_name
        if name:
            return GREEK.get(name, name)
        if self.kind.startswith(("block:", "model:")):
            return self.kind[6:]
        return self.kind

    def label(self, i: int) -> str:
        v = self.values[i]
        if self.kind in ("preset",):
            return v
        if self.kind == "prompt":
            return str(v)
        if self.kind.startswith("model:"):
            return f"{self.title} = {Path(str(v)).stem}"
        if self.kind == "method":
            return METHODS[v].label
        if self.kind == "seed":
            return f"seed {v}"
        if self.kind == "recipe":
            return f"#{i + 1} {_recipe_summary(v)}"
        return f"{self.title} = {fmt_value(v)}"

    def describe(self) -> dict:
        values = [v.public_dict() for v in self.values] if self.kind == "recipe" else self.values
        return {"kind": self.kind, "values": values}


def _number(v: Any) -> Any:
    """'0.50' -> 0.5, '3' -> 3; anything else as it is (choices, on/off)."""
    if isinstance(v, str) and re.fullmatch(_NUM, v.strip()):
        f = float(v)
        return int(f) if re.fullmatch(r"[+-]?\d+", v.strip()) and math.isfinite(f) else f
    return v


def _whole(v: Any) -> int:
    f = float(v)
    if not f.is_integer():
        raise ValueError
    return int(f)


def _recipe_summary(r: Recipe) -> str:
    params = ", ".join(f"{GREEK.get(k, k)}={fmt_value(v)}" for k, v in r.params.items()
                       if v is not None and not isinstance(v, list))
    extra = " MBW" if r.blocks else ""
    return f"{session.merged_name(r)}" + (f" {params}" if params else "") + extra


# -------------------------------------------------------------------------------------- applying values
_ORDER = {"recipe": 0, "method": 1, "model": 1, "preset": 3, "block": 3.5, "seed": 4, "prompt": 4}
# whole recipes, the method and models, parameters, presets, then one block over them


def apply_value(recipe: Recipe, axis: Axis, i: int, family: str, strength: bool = False) -> Recipe:
    """A copy of `recipe` with the axis's i-th value applied (the seed axis leaves it as it is).

    strength (preset axes only): the other axis sets the scalar of the parameter the preset fills, so the
    blocks are the preset times that scalar (GRAD_V at α = 0.5 is GRAD_V halved), else the preset would
    hide the scalar axis altogether."""
    v = axis.values[i]
    if axis.kind in ("seed", "prompt"):   # the request's, not the recipe's (plan_cells)
        return recipe
    if axis.kind == "recipe":
        return copy.deepcopy(v)
    r = copy.deepcopy(recipe)
    spec = get_method(r.method)
    if axis.kind == "method":
        new = get_method(v)
        r.method = new.name
        names = {p.name for p in new.params}
        r.params = {k: x for k, x in r.params.items() if k in names}
        r.blocks = {k: x for k, x in r.blocks.items() if k in new.blockwise_params}
        if r.layer_weights is not None and r.layer_weights.get("param") not in new.blockwise_params:
            r.layer_weights = None
        return r
    if axis.kind == "preset":
        if not spec.blockwise_params:
            raise InputError(f"XY plot: {spec.label} has no per-block parameter for a block-weight preset.")
        p = spec.param(spec.blockwise_params[0])
        _check_not_per_key(r, p.name)
        from .core.weights import preset
        values = preset(v, family)
        if strength:
            scale = float(r.params.get(p.name, p.default))
            values = [round(x * scale, 10) for x in values]
        r.blocks[p.name] = [p.coerce(x, spec.name) for x in values]
        return r
    if axis.kind.startswith("model:"):
        from .engine.recipe import ModelRef
        slot = axis.kind[6:]
        index = SLOT_NAMES.index(slot) if slot in SLOT_NAMES else int(slot) - 1
        if index >= len(r.models):
            raise InputError(f"XY plot: the recipe has {len(r.models)} models, so there is no model {slot} to swap.")
        r.models[index] = ModelRef(name=str(v))   # the host resolves the name (resolve_recipe)
        return r
    if axis.kind.startswith("block:"):
        from .core.arch import block_names
        if not spec.blockwise_params:
            raise InputError(f"XY plot: {spec.label} has no per-block parameter for a block axis.")
        p = spec.param(spec.blockwise_params[0])
        _check_not_per_key(r, p.name)
        names = block_names(family)
        block = axis.kind[6:]
        if block not in names:
            raise InputError(f"XY plot: {block} is not a block of this {family} model.")
        values = list(r.blocks.get(p.name) or [r.params.get(p.name, p.default)] * len(names))
        values[names.index(block)] = p.coerce(v, spec.name)
        r.blocks[p.name] = values
        return r
    name = axis.param_name
    p = spec.param(name)   # a method without it: "Method 'x' has no parameter 'y'. Its parameters: ..."
    r.params[name] = p.coerce(v, spec.name)
    if p.blockwise:
        _check_not_per_key(r, name)
        r.blocks.pop(name, None)   # the plotted value holds for every block
    return r


def _check_not_per_key(r: Recipe, name: str) -> None:
    if r.layer_weights is not None and r.layer_weights.get("param") == name:
        raise InputError(f"XY plot: the recipe's per-key weights set {GREEK.get(name, name)} for every key, so "
                         f"the plot could not change it: clear 'Per-key weights' first.")


# --------------------------------------------------------------------------------------------- the run
@dataclass
class Cell:
    row: int
    col: int
    label: str
    recipe: Any                           # what the cell's model is: a Recipe, or a LoRA plot's merge
    request: GenerationRequest


@dataclass
class XYResult:
    grid_image: Any                       # PIL image
    images: list                          # one per cell, row by row (row = Y value, column = X value)
    labels: list[str]                     # one per cell: "α = 0.5 | GRAD_V"
    recipes: list                         # one per cell (Recipe, or the LoRA plot's merge settings)
    merges_done: int                      # merges into memory (once per distinct recipe)
    x_labels: list[str] = field(default_factory=list)
    y_labels: list[str] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    folder: Path | None = None            # where the grid and the images were written
    paths: list[Path] = field(default_factory=list)        # the cells' PNGs
    grid_path: Path | None = None
    saved_models: list[Path] = field(default_factory=list)
    margins: tuple[int, int] = (0, 0)     # (left, top) label margins of the grid
    cell_size: tuple[int, int] = (0, 0)
    seconds: float = 0.0
    message: str = ""
    grids: list = field(default_factory=list)              # (grid image, Z label) per Z value; one without Z


def plan_cells(host: Host, base_recipe: Recipe, x: Axis, y: Axis | None,
               request: GenerationRequest) -> list[Cell]:
    """Every cell's recipe and request, row by row, all checked before any work."""
    if y is not None and _same_target(x, y):
        raise InputError(f"XY plot: the X and Y axes both set {x.title}: choose another kind for one of them.")
    family = _family_for(host, base_recipe, (x, y))
    base_seed = int(request.seed)
    if base_seed < 0:   # one random seed for the whole grid, so the cells compare like with like
        base_seed = random.randrange(4294967294)
    for axis in (x, y):   # a seed of -1 on the seed axis: a random seed, fixed now so the label says it
        if axis is not None and axis.kind == "seed":
            axis.values = [v if v >= 0 else random.randrange(4294967294) for v in axis.values]
    axes = sorted([(x, "x")] + ([(y, "y")] if y is not None else []),
                  key=lambda a: _ORDER.get(a[0].kind.split(":")[0], 2))
    for axis in (x, y):
        _check_prompt_axis(axis, request.prompt)
    cells = []
    for row in range(len(y.values) if y is not None else 1):
        for col in range(len(x.values)):
            recipe = copy.deepcopy(base_recipe)
            cell_request = replace(request, seed=base_seed, batch_size=1)
            try:
                for axis, which in axes:
                    i = col if which == "x" else row
                    cell_request = _request_with(cell_request, axis, i)
                    strength = axis.kind == "preset" and any(
                        a.param_name is not None and a.param_name == _first_blockwise(recipe) for a, _ in axes)
                    recipe = apply_value(recipe, axis, i, family, strength)
                recipe = session.resolve_recipe(host, recipe)
            except MergeError as e:
                msg = str(e).removeprefix("XY plot: ")
                raise InputError(f"XY plot, cell {_cell_label(x, y, row, col)}: {msg}") from None
            cells.append(Cell(row, col, _cell_label(x, y, row, col), recipe, cell_request))
    return cells


def _family_for(host: Host, recipe: Recipe, axes) -> str:
    """The model family, read only when an axis needs the block layout (presets, single blocks)."""
    if any(a is not None and (a.kind == "preset" or a.kind.startswith("block:")) for a in axes):
        return recipe.arch or session.header_of(host, recipe)[0]
    return "sd1"


def _check_prompt_axis(axis: Axis | None, prompt: str) -> None:
    if axis is not None and axis.kind == "prompt" and str(axis.values[0]) not in prompt:
        raise InputError(f"XY plot: the prompt does not contain '{axis.values[0]}' (the first value of a prompt "
                         f"axis is the text it searches; each value replaces it).")


def _request_with(request: GenerationRequest, axis: Axis, i: int) -> GenerationRequest:
    """The request with a seed or prompt axis's i-th value applied (other axes change the recipe instead)."""
    if axis.kind == "seed":
        return replace(request, seed=axis.values[i])
    if axis.kind == "prompt":
        return replace(request, prompt=request.prompt.replace(str(axis.values[0]), str(axis.values[i])))
    return request


def _first_blockwise(recipe: Recipe) -> str | None:
    names = get_method(recipe.method).blockwise_params
    return names[0] if names else None


def _same_target(x: Axis, y: Axis) -> bool:
    return x.kind == y.kind   # param:alpha is stored as alpha, so it is caught too


def _cell_label(x: Axis, y: Axis | None, row: int, col: int) -> str:
    return x.label(col) if y is None else f"{x.label(col)} | {y.label(row)}"


def run_xy(host: Host, base_recipe: Recipe, x: Axis, y: Axis | None, request: GenerationRequest, *,
           z: Axis | None = None, save_models: bool = False, progress: Callable[[float, str], None] | None = None,
           cancel: Callable[[], bool] | None = None, device: str | None = None) -> XYResult:
    """Merge each distinct recipe once, generate its cells, compose and save the labelled grid (one per Z value)."""
    if z is not None:
        return _run_xyz(host, base_recipe, x, y, z, request, save_models=save_models, progress=progress,
                        cancel=cancel, device=device)
    started = time.monotonic()
    check_can_plot(host, x, y)
    cells = plan_cells(host, base_recipe, x, y, request)
    saved: list[Path] = []

    def load(recipe: Recipe, label: str, folder: Path, report: Callable[[str], None], check_cancel) -> None:
        s = session.merge_to_memory(host, recipe, device=device)
        if not s.ok:
            raise MergeError(f"XY plot, merge for {label}: {s.message}")
        if save_models:
            check_cancel()
            name = _sanitise(f"xy_{folder.name}_{label}")
            report(f"Saving {name}")
            s = session.save(host, recipe, name, device=device)
            if not s.ok:
                raise MergeError(f"XY plot, saving the model of {label}: {s.message}")
            saved.append(Path(s.path))

    result = run_grid(host, cells, x, y, key=lambda r: r.public_json(), load=load, progress=progress,
                      cancel=cancel, started=started)
    result.grids = [(result.grid_image, "")]
    result.saved_models = saved
    if saved:
        result.message = result.message.removesuffix(".") + f"; {len(saved)} model(s) saved."
    return result


def _run_xyz(host: Host, base_recipe: Recipe, x: Axis, y: Axis | None, z: Axis, request: GenerationRequest,
             **kw) -> XYResult:
    """One XY grid per Z value (the Z value applied to the recipe or the request first), all planned and checked
    before any work; the result holds every grid and every cell, Z after Z."""
    started = time.monotonic()
    check_can_plot(host, x, y)
    if any(a is not None and a.kind == z.kind for a in (x, y)):
        raise InputError(f"XY plot: the Z axis sets {z.title}, as another axis does: choose another kind for one.")
    family = _family_for(host, base_recipe, (z,))
    _check_prompt_axis(z, request.prompt)
    planes = []
    for i in range(len(z.values)):
        try:
            recipe = apply_value(base_recipe, z, i, family)
        except MergeError as e:
            raise InputError(f"XY plot, {z.label(i)}: {str(e).removeprefix('XY plot: ')}") from None
        req = _request_with(request, z, i)
        plan_cells(host, recipe, x, y, req)   # every Z value's cells checked before the first merge
        planes.append((recipe, req))
    progress = kw.pop("progress", None)
    results = []
    for i, (recipe, req) in enumerate(planes):
        def part(fraction: float, text: str, i=i) -> None:
            if progress is not None:
                progress((i + fraction) / len(planes), f"{z.label(i)}: {text}")
        results.append(run_xy(host, recipe, x, y, req, progress=part, **kw))
    first = results[0]
    merged = replace(first, images=[im for r in results for im in r.images],
                     labels=[f"{lab} | {z.label(i)}" for i, r in enumerate(results) for lab in r.labels],
                     recipes=[rc for r in results for rc in r.recipes], merges_done=sum(r.merges_done for r in results),
                     infotexts=[t for r in results for t in r.infotexts], paths=[p for r in results for p in r.paths],
                     saved_models=[p for r in results for p in r.saved_models],
                     grids=[(r.grid_image, z.label(i)) for i, r in enumerate(results)],
                     seconds=time.monotonic() - started)
    merged.message = (f"XY plot: {len(results)} grids ({z.title}), {len(merged.images)} image(s) from "
                      f"{merged.merges_done} merge(s) in {merged.seconds:.1f} s, saved in "
                      f"{', '.join(str(r.folder) for r in results)}.")
    return merged


def check_can_plot(host: Host, x, y) -> None:
    if not host.can_generate:
        raise MergeError(f"The XY plot makes preview images, and this host ({host.name}) cannot generate "
                         f"them: previews need the WebUI, or diffusers for the standalone app.")
    if x is None or not hasattr(x, "values") or (y is not None and not hasattr(y, "values")):
        raise InputError("XY plot: the axes must be Axis objects (Axis(kind, values)).")


def run_grid(host: Host, cells: list[Cell], x, y, *, key: Callable[[Any], str], load, progress=None, cancel=None,
             started: float | None = None) -> XYResult:
    """The plot's loop, whatever a cell's model is (a merge recipe, a LoRA merge): cells whose models share
    `key(cell.recipe)` share one `load(recipe, label, folder, report, check_cancel)` (which puts that model
    in the host's live model), and all of its cells are generated before the next load. The cells' images
    and the grid are written as PNGs with their infotexts into <output folder>/xy/<timestamp>/."""
    started = time.monotonic() if started is None else started
    total = len(cells)
    groups: dict[str, list[Cell]] = {}
    for cell in cells:   # first appearance order: a seed-only axis keeps one load for its cells
        groups.setdefault(key(cell.recipe), []).append(cell)

    folder = _new_folder(Path(host.output_dir()) / "xy")
    images: dict[int, Any] = {}
    infotexts: dict[int, str] = {}
    paths: dict[int, Path] = {}
    loads = done = 0

    def report(text: str) -> None:
        if progress is not None:
            progress(done / total, text)

    def stopped() -> CancelledError:
        return CancelledError(f"XY plot interrupted after {done} of {total} cells; the images made so far "
                              f"are in {folder}.")

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise stopped()

    for group in groups.values():
        label = _recipe_label(x, y, group[0])
        check_cancel()
        report(f"Merging {label} ({loads + 1} of {len(groups)} merges)")
        try:
            load(group[0].recipe, label, folder, report, check_cancel)
        except CancelledError:
            raise stopped() from None
        loads += 1
        for cell in group:
            check_cancel()
            report(f"Generating {cell.label} (cell {done + 1} of {total})")
            g = session.generate(host, cell.request)
            if not g.ok or not g.images:
                raise MergeError(f"XY plot, cell {cell.label}: {g.message or 'no image came back'}")
            index = cell.row * len(x.values) + cell.col
            images[index], infotexts[index] = g.images[0], (g.infotexts[0] if g.infotexts else "")
            paths[index] = folder / f"{index:03d}-{_sanitise(cell.label)}.png"
            save_png(images[index], paths[index], infotexts[index])
            done += 1

    order = range(total)
    x_labels = [x.label(i) for i in range(len(x.values))]
    y_labels = [y.label(i) for i in range(len(y.values))] if y is not None else []
    report("Composing the grid")
    grid, margins, cell_size = compose_grid([images[i] for i in order], x_labels, y_labels, host.font_file)
    grid_path = folder / "grid.png"
    save_png(grid, grid_path, infotexts.get(0, ""),
             {"merge_lab_xy": json.dumps({"x": x.describe(), "y": y.describe() if y else None,
                                          "x_labels": x_labels, "y_labels": y_labels})})
    seconds = time.monotonic() - started
    done = total
    report("Done")
    message = f"XY plot: {total} image(s) from {loads} merge(s) in {seconds:.1f} s, saved in {folder}."
    return XYResult(grid, [images[i] for i in order], [c.label for c in cells], [c.recipe for c in cells],
                    loads, x_labels, y_labels, [infotexts[i] for i in order], folder,
                    [paths[i] for i in order], grid_path, [], margins, cell_size, seconds, message)


def _recipe_label(x: Axis, y: Axis | None, cell: Cell) -> str:
    """The part of a cell's label that names its recipe (the seed axis left out)."""
    parts = [a.label(i) for a, i in ((x, cell.col), (y, cell.row)) if a is not None and a.changes_recipe]
    return " | ".join(parts) or "the recipe"


def _sanitise(text: str, limit: int = 80) -> str:
    """A plain file name from a label: letters, digits, '.', '-' and '_' only."""
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "_", _ascii_greek(text))).strip("._-")
    return (name[:limit].rstrip("._-") or "cell")


def _new_folder(parent: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        folder = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir(parents=True, exist_ok=False)
            return folder
        except FileExistsError:
            continue
    raise MergeError(f"XY plot: could not make a new folder under {parent}.")


def save_png(image, path: Path, infotext: str = "", extra: dict[str, str] | None = None) -> Path:
    """A PNG with the infotext in its "parameters" text chunk (as the WebUI writes it), written atomically."""
    import os

    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    for k, v in (extra or {}).items():
        info.add_text(k, v)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


# -------------------------------------------------------------------------------------------- the grid
def _ascii_greek(text: str) -> str:
    """PIL's default font has no Greek letters: α = 0.5 is drawn as alpha = 0.5."""
    for letter, name in (("α", "alpha"), ("β", "beta"), ("λ", "lambda")):
        text = text.replace(letter, name)
    return text


def _font(cell_w: int, font_file: str | None = None):
    """A font sized to the cells: the host's (the WebUI's Roboto), else DejaVu Sans where the system has it,
    else Pillow's scalable default (Pillow 10.1+), else its small bitmap font (the WebUI's Pillow 9.5)."""
    from PIL import ImageFont
    size = max(12, min(40, cell_w // 16))
    for name in ([font_file] if font_file else []) + ["DejaVuSans.ttf"]:
        try:
            return ImageFont.truetype(name, size)
        except (OSError, ImportError):
            continue
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):   # an older Pillow, or one without FreeType
        return ImageFont.load_default()


def _line_height(font) -> int:
    """Ascent + descent; Pillow 9's bitmap font has no getmetrics, so its box of 'Ag' stands in."""
    if hasattr(font, "getmetrics"):
        asc, desc = font.getmetrics()
        return asc + desc
    box = font.getbbox("Ag")
    return box[3] - min(box[1], 0)


def _text_w(font, text: str) -> int:
    box = font.getbbox(text)
    return box[2] - box[0]


def _wrap(font, text: str, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word longer than the width is cut by characters."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            candidate = f"{line} {word}" if line else word
            if _text_w(font, candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while _text_w(font, line) > width and len(line) > 1:
                cut = len(line) - 1
                while cut > 1 and _text_w(font, line[:cut]) > width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def compose_grid(images: list, x_labels: list[str], y_labels: list[str], font_file: str | None = None):
    """The labelled grid: len(x_labels) columns, len(y_labels) rows (1 without Y), column labels on top,
    row labels on the left. Returns (image, (left, top) margins, (cell width, cell height))."""
    from PIL import Image, ImageDraw
    cols, rows = len(x_labels), max(1, len(y_labels))
    x_labels, y_labels = [_ascii_greek(t) for t in x_labels], [_ascii_greek(t) for t in y_labels]
    if len(images) != cols * rows:
        raise MergeError(f"XY plot: {len(images)} images for a {cols}x{rows} grid.")
    cw = max(im.width for im in images)
    ch = max(im.height for im in images)
    font = _font(cw, font_file)
    line_h = _line_height(font) + 2
    pad = max(4, line_h // 3)
    col_lines = [_wrap(font, t, cw - 2 * pad) for t in x_labels]
    top = max(len(ls) for ls in col_lines) * line_h + 2 * pad
    left = 0
    row_lines: list[list[str]] = []
    if y_labels:
        room = max(cw, 160)
        row_lines = [_wrap(font, t, room - 2 * pad) for t in y_labels]
        left = max(_text_w(font, line) for ls in row_lines for line in ls) + 2 * pad
    grid = Image.new("RGB", (left + cols * cw, top + rows * ch), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(col_lines):
        y0 = top - pad - len(lines) * line_h
        for k, line in enumerate(lines):
            x0 = left + c * cw + (cw - _text_w(font, line)) // 2
            draw.text((x0, y0 + k * line_h), line, fill="black", font=font)
    for r, lines in enumerate(row_lines):
        y0 = top + r * ch + (ch - len(lines) * line_h) // 2
        for k, line in enumerate(lines):
            draw.text((left - pad - _text_w(font, line), y0 + k * line_h), line, fill="black", font=font)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (left + c * cw + (cw - im.width) // 2, top + r * ch + (ch - im.height) // 2))
    return grid, (left, top), (cw, ch)


def kind_choices(spec=None) -> list[str]:
    """The axis kinds a UI offers for method `spec` (None: any method): alpha and beta where it has them, preset
    and block:<name> where it has per-block parameters, the method, its model slots, prompt, seed and recipe, then
    param:<name> for its other parameters."""
    from .core.arch import block_names
    specs = [spec] if spec is not None else list(METHODS.values())
    names = {p.name for s in specs for p in s.params}
    blockwise = any(s.blockwise_params for s in specs)
    fixed = [k for k in ("alpha", "beta") if k in names] + (["preset"] if blockwise else [])
    slots = SLOT_NAMES if spec is None or spec.many else SLOT_NAMES[:len(spec.inputs)]
    blocks = [f"block:{b}" for b in block_names("sd1")] if blockwise else []
    return (fixed + ["method"] + [f"model:{s}" for s in slots] + ["prompt", "seed", "recipe"]
            + [f"param:{n}" for n in sorted(names - {"alpha", "beta"})] + blocks)


__all__ = ["Axis", "XYResult", "Cell", "run_xy", "run_grid", "check_can_plot", "plan_cells", "apply_value", "compose_grid", "save_png",
           "fmt_value", "kind_choices", "KINDS"]
