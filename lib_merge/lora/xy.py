"""XY plots of LoRA merges: preview images over the strengths of the LoRAs, the merge mode, the density, the
SVD rank, the block weights or the generation seed, on top of one checkpoint.

    plot = LoraPlot(checkpoint, [LoraInput(a), LoraInput(b)], mode="concat")
    x = LoraAxis("strength:1", "0, 0.5, 1")      y = LoraAxis("strength:2:te", "0-1 (3)")
    result = run_lora_xy(host, plot, x, y, GenerationRequest(prompt="a cat", seed=1))

Axis kinds: `strength:N` (LoRA N's UNet and text-encoder strength, N from 1), `strength:N:unet`,
`strength:N:te`, `mode` (concat, add, ties, dare_linear, dare_ties, magnitude_prune on the factors; svd_add,
svd_ties, ... through the full ΔW and an SVD), `density`, `rank` (the SVD merge's rank: a factor mode is run
as its svd_ form, concat as svd_add), `merge_seed` (DARE's draws), `lbw` (block weights of the bake: presets or
17/26 (SDXL 12/20) numbers, values separated by '|'; one merge is baked each way) and `seed` (the image's seed).

Each cell's LoRA merge is computed once, in memory (lora.merge.merge_modules or lora.svd.svd_merge_modules:
a LoraFile that is never written), and baked into the host's live model on top of the checkpoint
(lora.live.bake_into_host): the first merge writes the whole checkpoint, the next ones only the keys the
LoRAs touch. Cells that share a merge (a seed axis) share that work. The grid and the images are written
as by the merge XY plot (xy.run_grid); each image's infotext carries the cell's LoRA recipe.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.errors import CancelledError, InputError, MergeError
from ..core.generation import GenerationRequest
from ..host import Host
from ..xy import (
    MAX_VALUES,
    Cell,
    XYResult,
    _expand,
    _number,
    _sanitise,
    _split,
    _whole,
    check_can_plot,
    fmt_value,
    run_grid,
)
from . import keys as K
from .lbw import parse_lbw
from .merge import DEFAULT_DENSITY, MODES, LoraInput, check_options, common_family, merge_modules, open_inputs
from .svd import MODES as SVD_BASE_MODES

SVD_MODES = tuple(f"svd_{m}" for m in SVD_BASE_MODES)
ALL_MODES = MODES + SVD_MODES
FIXED_KINDS = ("mode", "density", "rank", "merge_seed", "lbw", "seed")
PARTS = {"": "", "unet": " UNet", "te": " TE"}


@dataclass
class LoraPlot:
    """What every cell shares: the checkpoint, the LoRAs with their default strengths, the merge settings
    (mode, density, rank for the SVD merge, DARE seed, TIES election) and block weights (LBW) for the bake."""
    checkpoint: Path
    loras: list[LoraInput]
    mode: str = "concat"
    density: float = DEFAULT_DENSITY
    rank: int | None = None
    conv_rank: int | None = None
    merge_seed: int = 0
    majority: str = "sum"
    lbw: Any = None

    def __post_init__(self):
        self.checkpoint = Path(self.checkpoint)
        if not self.loras:
            raise InputError("LoRA XY plot: list at least one LoRA.")
        check_mode(self.mode)


@dataclass(frozen=True)
class LoraMerge:
    """One cell's LoRA merge: the strengths ((unet, te) per LoRA), the merge settings and the block weights the
    merged LoRA is baked with. `key()` is what lets cells share a bake, `merge_key()` a merge (an LBW axis
    bakes one merge several ways)."""
    strengths: tuple[tuple[float, float], ...]
    mode: str
    density: float
    rank: int | None
    conv_rank: int | None
    merge_seed: int
    majority: str
    lbw: str | None = None

    @property
    def svd(self) -> bool:
        return self.mode.startswith("svd_") or self.rank is not None

    @property
    def base_mode(self) -> str:
        """The mode of merge.combine: svd_ties -> ties; for the SVD merge, concat is add (the exact sum)."""
        mode = self.mode.removeprefix("svd_")
        return "add" if self.svd and mode == "concat" else mode

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def merge_key(self) -> str:
        return replace(self, lbw=None).key()

    def describe(self, names: list[str]) -> dict:
        d = {"mode": self.mode, "density": self.density, "merge_seed": self.merge_seed, "majority": self.majority,
             "loras": [{"name": n, "strength_unet": u, "strength_te": t} for n, (u, t) in zip(names, self.strengths)]}
        if self.svd:
            d.update(rank=self.rank or DEFAULT_SVD_RANK, conv_rank=self.conv_rank)
        if self.lbw is not None:
            d["lbw"] = self.lbw
        return d


DEFAULT_SVD_RANK = 32


def check_mode(mode: str) -> str:
    if mode not in ALL_MODES:
        raise InputError(f"LoRA XY plot: unknown merge mode '{mode}'. Modes: {', '.join(ALL_MODES)}.")
    return mode


# ------------------------------------------------------------------------------------------------ axes
@dataclass
class LoraAxis:
    """One axis: kind (see the module's docstring) and values (a list, or text: "0, 0.5, 1", "0-1 (5)",
    "concat, svd_ties"). `names` (the LoRAs' names, set by run_lora_xy) make the strength labels readable."""
    kind: str
    values: Any
    names: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self):
        kind = (self.kind or "").strip().lower()
        self.lora, self.part = None, ""
        if kind.startswith("strength:"):
            bits = kind.split(":")
            try:
                self.lora = int(bits[1]) - 1
                if self.lora < 0 or len(bits) > 3:
                    raise ValueError
            except ValueError:
                raise InputError(f"LoRA XY plot: '{self.kind}' is not strength:N, strength:N:unet or "
                                 f"strength:N:te with N the LoRA's number from 1.") from None
            self.part = bits[2] if len(bits) == 3 else ""
            if self.part not in PARTS:
                raise InputError(f"LoRA XY plot: '{self.kind}': the part is unet or te, not '{self.part}'.")
        elif kind not in FIXED_KINDS:
            raise InputError(f"LoRA XY plot: unknown axis kind '{self.kind}'. Use strength:N (also strength:N:unet, "
                             f"strength:N:te), {', '.join(FIXED_KINDS)}.")
        self.kind = kind
        sep = r"[|\n]" if kind == "lbw" else r"[,;\n]"   # block weights hold commas: '|' between values
        values = _split(self.values, sep) if isinstance(self.values, str) else list(self.values or [])
        if kind == "mode":
            values = [check_mode(str(v).strip()) for v in values]
        elif kind == "lbw":   # checked against the checkpoint's architecture when the plot runs
            values = [str(v).strip() if not isinstance(v, (list, tuple)) else ",".join(map(str, v)) for v in values]
        else:
            expanded: list = []
            for v in values:
                expanded.extend(_expand(v) if isinstance(v, str) else [v])
            try:
                values = [float(_number(v)) for v in expanded]
                if kind in ("rank", "merge_seed", "seed"):
                    values = [_whole(v) for v in values]
            except (TypeError, ValueError):
                raise InputError(f"LoRA XY plot: the {self.title} values must be numbers"
                                 + (" (whole numbers)" if kind in ("rank", "merge_seed", "seed") else "")
                                 + f", not {fmt_value(expanded)}.") from None
            if kind == "rank" and any(v < 1 for v in values):
                raise InputError("LoRA XY plot: SVD ranks are at least 1.")
            if kind == "density" and any(not 0 <= v <= 1 for v in values):
                raise InputError("LoRA XY plot: densities are between 0 and 1.")
        if not values:
            raise InputError(f"LoRA XY plot: the {self.title} axis has no values.")
        if len(values) > MAX_VALUES:
            raise InputError(f"LoRA XY plot: the {self.title} axis has {len(values)} values; at most {MAX_VALUES}.")
        self.values = values

    @property
    def changes_recipe(self) -> bool:
        return self.kind != "seed"

    @property
    def title(self) -> str:
        if self.lora is None:
            return {"merge_seed": "merge seed", "lbw": "LBW"}.get(self.kind, self.kind)
        name = self.names[self.lora].rsplit(".", 1)[0] if self.lora < len(self.names) else f"LoRA {self.lora + 1}"
        return name + PARTS[self.part]

    def label(self, i: int) -> str:
        v = self.values[i]
        if self.kind == "mode":
            return v
        if self.kind == "seed":
            return f"seed {v}"
        return f"{self.title} = {fmt_value(v)}"

    def describe(self) -> dict:
        return {"kind": self.kind, "values": self.values}

    def apply(self, merge: LoraMerge, i: int) -> LoraMerge:
        v = self.values[i]
        if self.lora is not None:
            if self.lora >= len(merge.strengths):
                raise InputError(f"LoRA XY plot: the axis {self.kind} names LoRA {self.lora + 1}, but the plot has "
                                 f"{len(merge.strengths)} LoRA(s).")
            s = list(merge.strengths)
            u, t = s[self.lora]
            s[self.lora] = (v if self.part in ("", "unet") else u, v if self.part in ("", "te") else t)
            return replace(merge, strengths=tuple(s))
        if self.kind in ("mode", "density", "rank", "merge_seed", "lbw"):
            return replace(merge, **{self.kind: v})
        return merge


# --------------------------------------------------------------------------------------------- planning
def plan_lora_cells(plot: LoraPlot, x: LoraAxis, y: LoraAxis | None, request: GenerationRequest) -> list[Cell]:
    """Every cell's LoraMerge and request, row by row; the settings checked before any work."""
    if y is not None and (x.kind, x.lora, x.part) == (y.kind, y.lora, y.part):
        raise InputError(f"LoRA XY plot: the X and Y axes both set {x.title}: choose another kind for one of them.")
    for axis in (x, y):
        if axis is not None and axis.lora is not None and axis.lora >= len(plot.loras):
            raise InputError(f"LoRA XY plot: the axis {axis.kind} names LoRA {axis.lora + 1}, but the plot has "
                             f"{len(plot.loras)} LoRA(s).")
        if axis is not None and axis.kind == "seed":
            axis.values = [v if v >= 0 else random.randrange(4294967294) for v in axis.values]
    base_seed = int(request.seed) if int(request.seed) >= 0 else random.randrange(4294967294)
    lbw = plot.lbw if plot.lbw is None or isinstance(plot.lbw, str) else ",".join(map(str, plot.lbw))
    base = LoraMerge(tuple((i.w_unet, i.w_te) for i in plot.loras), plot.mode, float(plot.density), plot.rank,
                     plot.conv_rank, int(plot.merge_seed), plot.majority, lbw)
    cells = []
    for row in range(len(y.values) if y is not None else 1):
        for col in range(len(x.values)):
            merge, seed = base, base_seed
            for axis, i in ((x, col), (y, row)):
                if axis is None:
                    continue
                if axis.kind == "seed":
                    seed = axis.values[i]
                merge = axis.apply(merge, i)
            label = x.label(col) if y is None else f"{x.label(col)} | {y.label(row)}"
            try:
                _check_merge(merge)
            except MergeError as e:
                raise InputError(f"LoRA XY plot, cell {label}: {e}") from None
            cells.append(Cell(row, col, label, merge, replace(request, seed=seed, batch_size=1)))
    return cells


def _check_merge(m: LoraMerge) -> None:
    check_mode(m.mode)
    check_options(m.base_mode, m.density, m.majority)
    if m.svd and m.base_mode != "add" and m.density <= 0:
        raise InputError("the SVD merge's ties/dare/magnitude_prune need a density above 0.")


# ----------------------------------------------------------------------------------------------- merging
def merged_lora(files, plot: LoraPlot, m: LoraMerge, names: list[str], family: str | None, *, progress=None,
                cancel=None):
    """The cell's merged LoRA, in memory (a LoraFile), or None when every strength is 0 (the bare checkpoint)."""
    from .formats import LoraFile
    from .merge import RECIPE_KEY
    from .svd import svd_merge_modules
    inputs = [LoraInput(i.path, u, t, file=lf) for i, lf, (u, t) in zip(plot.loras, files, m.strengths)]
    if all(u == 0 and t == 0 for u, t in m.strengths):
        return None
    if m.svd:
        modules, _, _ = svd_merge_modules(files, inputs, mode=m.base_mode, density=m.density,
                                          rank=m.rank or DEFAULT_SVD_RANK, conv_rank=m.conv_rank, seed=m.merge_seed,
                                          majority=m.majority, progress=progress, cancel=cancel)
    else:
        modules = merge_modules(files, inputs, m.base_mode, density=m.density, seed=m.merge_seed,
                                majority=m.majority, progress=progress, cancel=cancel)
    recipe = {"format": 1, "tool": "lora xy", **m.describe(names)}
    return LoraFile.from_modules(modules, family, name="lora_xy_cell", metadata={RECIPE_KEY: json.dumps(recipe)})


def touched_keys(files, family: str, shapes: dict) -> list[str]:
    """The checkpoint keys any of these LoRAs' modules change (a merge of them changes no others)."""
    keys = set()
    for lf in files:
        for name in lf.modules:
            target = K.resolve(name, family)
            if target is not None and target.key in shapes:
                keys.add(target.key)
    return sorted(keys)


def run_lora_xy(host: Host, plot: LoraPlot, x: LoraAxis, y: LoraAxis | None, request: GenerationRequest, *,
                save_loras: bool = False, progress: Callable[[float, str], None] | None = None,
                cancel: Callable[[], bool] | None = None) -> XYResult:
    """Merge each distinct cell's LoRAs once (in memory), bake them into the live model, generate its cells,
    and compose and save the labelled grid. `save_loras`: also write each cell's merged LoRA (kohya format,
    float16, its recipe in the metadata) beside the images, to keep the one you like."""
    from ..core.files import checkpoint_layout
    from .live import bake_into_host
    started = time.monotonic()
    check_can_plot(host, x, y)
    names = [i.name for i in plot.loras]
    for axis in (x, y):
        if axis is not None:
            axis.names = names
    cells = plan_lora_cells(plot, x, y, request)
    family, shapes = checkpoint_layout(plot.checkpoint)
    with open_inputs(plot.loras) as files:
        common_family(files, names, extra=(plot.checkpoint.name, family))
        touched = touched_keys(files, family, shapes)
        if not touched:
            raise InputError(f"LoRA XY plot: no module of these LoRAs has a key in '{plot.checkpoint.name}'.")
        for lbw in {c.recipe.lbw for c in cells} - {None}:
            try:
                parse_lbw(lbw, family)
            except MergeError as e:
                raise InputError(f"LoRA XY plot, block weights '{lbw}': {e}") from None
        state = {"loaded": False}
        saved: list[Path] = []
        merges: dict[str, Any] = {}   # merge_key -> merged LoRA: an LBW axis bakes one merge several ways

        def load(m: LoraMerge, label: str, folder: Path, report: Callable[[str], None], check_cancel) -> None:
            def step(i, n, name=""):
                report(f"Merging {label}: {name}" if name else f"Merging {label}")
            with host.exclusive():
                host.begin_job(f"LoRA XY plot: {label}")
                try:
                    fresh = m.merge_key() not in merges
                    if fresh:
                        try:
                            merges[m.merge_key()] = merged_lora(files, plot, m, names, family, progress=step,
                                                                cancel=cancel)
                        except CancelledError:
                            raise
                        except MergeError as e:
                            raise type(e)(f"LoRA XY plot, merge for {label}: {e}") from None
                    lora = merges[m.merge_key()]
                    check_cancel()
                    if save_loras and fresh and lora is not None:
                        from .formats import save_kohya
                        path = folder / f"lora_{_sanitise(label)}.safetensors"
                        report(f"Saving {path.name}")
                        saved.append(save_kohya(lora.modules, path, lora.metadata, family=family,
                                                dtype=torch.float16))
                    report(f"Applying {label}")
                    loras = [lora if lora is not None else _empty(family)]
                    keys = touched if state["loaded"] else None
                    state["loaded"] = False   # until this write is complete
                    bake_into_host(host, plot.checkpoint, loras, lbw=m.lbw, keys=keys,
                                   name=f"{plot.checkpoint.stem} + LoRAs ({label})", cancel=cancel)
                    state["loaded"] = True
                finally:
                    host.end_job()

        result = run_grid(host, cells, x, y, key=lambda m: m.key(), load=load, progress=progress, cancel=cancel,
                          started=started)
    result.saved_models = saved
    if saved:
        result.message = result.message.removesuffix(".") + f"; {len(saved)} LoRA(s) saved beside the images."
    return result


def _empty(family: str | None):
    from .formats import LoraFile
    return LoraFile.from_modules({}, family, name="no LoRA")


def kind_choices(n_loras: int = 2) -> list[str]:
    """The axis kinds a UI offers for n LoRAs."""
    out = []
    for i in range(1, max(1, n_loras) + 1):
        out += [f"strength:{i}", f"strength:{i}:unet", f"strength:{i}:te"]
    return out + list(FIXED_KINDS)


__all__ = ["LoraPlot", "LoraAxis", "LoraMerge", "run_lora_xy", "plan_lora_cells", "merged_lora", "kind_choices",
           "ALL_MODES", "SVD_MODES"]
