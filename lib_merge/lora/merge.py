"""Merging N LoRAs into one, on their up/down factors (no SVD: see svd.py for that).

Each LoRA comes with a UNet weight and a text-encoder weight (`FILE:W` or `FILE:W_unet:W_te`). For a module
of LoRA i, c_i = w_i · α_i/r_i (the weight of its part times its own scale), so that c_i · up_i @ down_i is
the ΔW it contributes at weight w_i.

Modes (per module; the result is written with alpha = rank, i.e. scale 1, unless said otherwise):

* `concat` — EXACT. down = cat_i(sign(c_i)·√|c_i|·down_i, dim 0), up = cat_i(√|c_i|·up_i, dim 1); the rank is
  Σ r_i and alpha = rank, so ΔW(result) = Σ_i up_i·c_i·down_i = Σ_i w_i ΔW_i, for any ranks and any signs.
  (√|c| on both factors keeps them at similar magnitudes, which is kinder to float16 than putting c on one.)
* `add` — PEFT's `linear` convention: down = Σ_i sign(c_i)√|c_i|·down_i, up = Σ_i √|c_i|·up_i, rank r
  (equal ranks needed). The product is Σ_i w_i ΔW_i PLUS the cross terms √|c_i c_j|·sign(c_j)·up_i@down_j
  (i ≠ j): it is exact only for a single LoRA (or factors with up_i@down_j = 0). It is what PEFT's
  add_weighted_adapter(combination_type="linear") and kohya's merge_lora.py (up to their strength
  conventions) produce; we keep it for parity with those tools. Use `concat` for the exact sum.
* `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` — PEFT's published functions applied to each factor
  separately (the stacked downs, then the stacked ups), with weights sign(c_i)√|c_i| for the downs and
  √|c_i| for the ups, as PEFT's add_weighted_adapter does:
    magnitude_prune: Σ_i w_i·prune_magnitude(T_i, density)       (keep the top int(density·numel) |values|)
    dare_linear:     Σ_i w_i·prune_random(T_i, density)/density   (keep ~ Bernoulli(density))
    ties:            prune_magnitude → majority sign of the UNweighted pruned stack (`total`: sign of the sum,
                     `frequency`: sign of the vote; 0 counts as +) → weight → mean over agreeing LoRAs
    dare_ties:       prune_random+rescale → the same election → weight → mean over agreeing LoRAs
  Random draws come from a CPU generator seeded from (seed, module name, factor) (randomness.generator_for),
  one torch.rand over the factor's shape per LoRA in order: the same seed gives the same file on any machine.

Factor modes need the same rank in every LoRA that has the module; otherwise a RankMismatchError that points
to `concat` or the SVD merge. Modules present in only some LoRAs are merged over the LoRAs that have them
(the others contribute zero; in ties a zero has no sign and does not vote). LoHa/LoKr modules have no
up/down factors: use the SVD merge for them. LoRAs of different architectures are refused.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import ArchitectureMismatchError, CancelledError, InputError
from ..core.randomness import generator_for
from ..methods.common import election_name
from .formats import LoraFile, LoraModule, open_lora, save_kohya

MODES = ("add", "concat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
FACTOR_MODES = ("add", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# the share of each factor the pruning modes (ties, dare_*, magnitude_prune) keep unless told: PEFT's
# add_weighted_adapter examples use 0.2, as the TIES paper's top-20 %; concat and add ignore it
DEFAULT_DENSITY = 0.2
MAJORITY = ("sum", "count")   # the TIES sign election, as for checkpoints (total, frequency: accepted aliases)
RECIPE_KEY = "merge_lab_recipe"


class RankMismatchError(InputError):
    """A factor-space merge mode was asked for modules of different ranks."""


@dataclass
class LoraInput:
    """A LoRA with its UNet and text-encoder weights (strengths): a file, or a LoraFile already in memory
    (`file`, e.g. a merge made for an XY plot cell; `path` then only names it)."""
    path: Path
    w_unet: float = 1.0
    w_te: float = 1.0
    file: LoraFile | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def weight(self, module_name: str) -> float:
        return self.w_unet if module_name.startswith("lora_unet_") else self.w_te


@contextlib.contextmanager
def open_inputs(inputs: list[LoraInput]):
    """The inputs' LoraFiles (opened lazily from their paths, or the in-memory ones), closed afterwards."""
    files: list[LoraFile] = []
    opened: list[LoraFile] = []
    try:
        for i in inputs:
            if i.file is not None:
                files.append(i.file)
            else:
                lf = open_lora(i.path)
                opened.append(lf)
                files.append(lf)
        yield files
    finally:
        for lf in opened:
            lf.close()


def step(progress, cancel, i: int, n: int, name: str, what: str) -> None:
    """Report step i of n (`progress(i, n, name)`) and stop with CancelledError when `cancel()` says so:
    the LoRA operations call it before each module, so an Interrupt leaves no file behind."""
    if cancel is not None and cancel():
        raise CancelledError(f"{what} was interrupted: nothing was written.")
    if progress is not None:
        progress(i, n, name)


def recipe_metadata(inputs: list[LoraInput], family: str | None, tool: str = "lora merge", **fields) -> dict:
    """The metadata of a merged LoRA: our recipe as JSON under `merge_lab_recipe` (the tool, its settings, each
    input's name, sha256 (or, for one in memory, its own recipe) and weights) and `modelspec.merged_from`."""
    from ..core.files import dtype_name, file_hashes
    loras = []
    for i in inputs:
        item = {"name": i.name, "weight_unet": i.w_unet, "weight_te": i.w_te}
        if i.file is None:
            item["sha256"] = file_hashes(i.path)["sha256"]
        elif RECIPE_KEY in i.file.metadata:
            item["recipe"] = json.loads(i.file.metadata[RECIPE_KEY])
        loras.append(item)
    settings = {k: (dtype_name(v) if isinstance(v, torch.dtype) else v) for k, v in fields.items()}
    if "majority" in settings:   # recorded under the name checkpoints use, in its one spelling
        settings["election"] = election_name(settings.pop("majority"))
    recipe = {"format": 1, "tool": tool, **settings, "family": family, "loras": loras}
    return {RECIPE_KEY: json.dumps(recipe), "modelspec.merged_from": ", ".join(i.name for i in inputs)}


_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def parse_lora_arg(text: str) -> LoraInput:
    """`FILE`, `FILE:W` (both parts) or `FILE:W_unet:W_te`. Only trailing numbers are weights, so a path
    with a colon (C:\\...) stays a path."""
    parts = str(text).split(":")
    nums: list[float] = []
    while len(parts) > 1 and len(nums) < 2 and _NUM.match(parts[-1].strip()):
        nums.insert(0, float(parts.pop()))
    path = ":".join(parts)
    if not path:
        raise InputError(f"'{text}': no file name before the weights.")
    tail = parts[-1].strip() if len(parts) > 1 else ""
    looks_like_path = "/" in tail or "\\" in tail or tail.lower().endswith((".safetensors", ".pt", ".ckpt", ".bin"))
    if tail and not nums and not looks_like_path and not Path(path).exists() and not re.match(r"^[A-Za-z]$", parts[0]):
        # FILE:abc: a weight that is not a number (a Windows drive letter, C:\..., is a path, not a weight)
        raise InputError(f"'{text}': '{tail}' is not a weight. Write FILE, FILE:W or FILE:W_UNET:W_TE with "
                         f"numbers (e.g. style.safetensors:0.8).")
    if not all(math.isfinite(w) for w in nums):
        raise InputError(f"'{text}': the weights must be finite numbers.")
    if not nums:
        return LoraInput(Path(path))
    if len(nums) == 1:
        return LoraInput(Path(path), nums[0], nums[0])
    return LoraInput(Path(path), nums[0], nums[1])


def as_input(x) -> LoraInput:
    """A LoraInput from a LoraInput, "FILE[:W[:W_TE]]", or (path or LoraFile, w) / (path or LoraFile, w_unet, w_te)."""
    if isinstance(x, LoraInput):
        return x
    if isinstance(x, LoraFile):
        x = (x, 1.0)
    if isinstance(x, (tuple, list)):
        if len(x) not in (2, 3):
            raise InputError(f"A LoRA is (path, weight) or (path, weight_unet, weight_te), not {x!r}.")
        src = x[0]
        w_unet = float(x[1])
        w_te = float(x[2]) if len(x) == 3 and x[2] is not None else w_unet
        if isinstance(src, LoraFile):
            return LoraInput(Path(src.path or "merged in memory"), w_unet, w_te, file=src)
        return LoraInput(Path(src), w_unet, w_te)
    return parse_lora_arg(str(x))


def common_family(files: list[LoraFile], names: list[str], extra: tuple[str, str] | None = None) -> str | None:
    """The one architecture of these LoRAs (None when none says); refuses a mix, naming both.
    `extra` = (name, family) of a checkpoint that must agree too."""
    seen: list[tuple[str, str]] = [extra] if extra else []
    for lf, name in zip(files, names):
        if lf.family is None:
            continue
        for other_name, other_fam in seen:
            if other_fam != lf.family:
                raise ArchitectureMismatchError(
                    f"'{name}' is {_a(_label(lf.family))} LoRA but '{other_name}' is {_label(other_fam)}: "
                    f"LoRAs of different architectures cannot be merged or applied together.")
        seen.append((name, lf.family))
    return seen[0][1] if seen else None


def _a(label: str) -> str:
    """The article before a family label, as it is read aloud: an SD1.x, an SDXL."""
    return f"an {label}" if label[:1] in "AEFHILMNORSX" else f"a {label}"


def _label(family: str) -> str:
    return {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}.get(family, family)


# ------------------------------------------------------------------------------ PEFT's functions

def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·numel) largest |values| (PEFT `prune(method="magnitude")`)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = True
    return t * mask.reshape(t.shape)


def prune_random(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """Keep each value with probability `density` and divide by it (PEFT `prune(method="random", rescale=True)`);
    the draw is torch.rand(shape, generator=gen) < density."""
    if density >= 1:
        return t
    keep = torch.rand(t.shape, generator=gen, dtype=torch.float32) < density
    return t * keep / density


def majority_sign_mask(stack: torch.Tensor, method: str = "sum") -> torch.Tensor:
    sign = stack.sign()
    votes = stack.sum(dim=0) if election_name(method) == "sum" else sign.sum(dim=0)
    majority = torch.where(votes >= 0, 1.0, -1.0)
    return sign == majority


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (weighted * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ wᵢ·tᵢ accumulated in place: one output, no stacked copy (full SDXL deltas are 50 MB each)."""
    out = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=w)
    return out


def _weighted(stack: torch.Tensor, weights: list[float]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=stack.dtype).reshape(-1, *([1] * (stack.dim() - 1)))
    return stack * w


def combine(tensors: list[torch.Tensor], weights: list[float], mode: str, *, density: float = 1.0,
            majority: str = "sum", gen: torch.Generator | None = None) -> torch.Tensor:
    """One factor (or any task tensors) of N LoRAs combined by a PEFT mode."""
    if mode == "add":
        return _weighted_sum(tensors, weights)
    if mode == "magnitude_prune":
        return _weighted_sum([prune_magnitude(t, density) for t in tensors], weights)
    if mode == "dare_linear":
        return _weighted_sum([prune_random(t, density, gen) for t in tensors], weights)
    if mode in ("ties", "dare_ties"):
        if mode == "ties":
            stack = torch.stack([prune_magnitude(t, density) for t in tensors])
        else:
            stack = torch.stack([prune_random(t, density, gen) for t in tensors])
        mask = majority_sign_mask(stack, majority)
        return disjoint_merge(_weighted(stack, weights), mask)
    raise InputError(f"Unknown merge mode '{mode}'. Choose one of: {', '.join(MODES)}.")


# ------------------------------------------------------------------------------------ the merge

def check_options(mode: str, density: float, majority: str) -> None:
    """A merge mode, density and TIES election checked, with a sentence for people when wrong."""
    if mode not in MODES:
        raise InputError(f"Unknown merge mode '{mode}'. Choose one of: {', '.join(MODES)}.")
    election_name(majority)   # sum or count (total, frequency accepted), else a sentence
    if not (0.0 <= density <= 1.0) or not math.isfinite(density):
        raise InputError(f"The density must be between 0 and 1, not {density}.")
    if mode.startswith("dare") and density <= 0:
        raise InputError("DARE needs a density above 0 (it divides the kept values by the density).")


def merge_modules(files: list[LoraFile], inputs: list[LoraInput], mode: str = "concat", *,
                  density: float = DEFAULT_DENSITY,
                  seed: int = 0, majority: str = "sum", progress=None,
                  cancel=None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The merged modules, name -> (down, up, alpha), float32, from opened LoRAs and their weights.
    `progress(i, n, name)` is called per module; `cancel()` returning True stops with CancelledError."""
    check_options(mode, density, majority)
    names = [i.name for i in inputs]
    owners: dict[str, list[int]] = {}
    for i, lf in enumerate(files):
        for name in lf.modules:
            owners.setdefault(name, []).append(i)
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for k, name in enumerate(sorted(owners)):
        step(progress, cancel, k, len(owners), name, "The LoRA merge")
        idx = owners[name]
        mods: list[LoraModule] = [files[i].modules[name] for i in idx]
        for i, m in zip(idx, mods):
            if m.kind not in ("lora", "locon"):
                raise InputError(f"'{names[i]}': module {name} is {m.kind}, which has no up/down factors; "
                                 f"use the SVD merge (`lora merge-svd`) for LoHa/LoKr.")
        shapes = {m.shape for m in mods}
        if len(shapes) > 1:
            raise InputError(f"Module {name} has different ΔW shapes in "
                             + ", ".join(f"'{names[i]}' {list(m.shape)}" for i, m in zip(idx, mods))
                             + ": these LoRAs do not fit the same model.")
        cs = [inputs[i].weight(name) * m.scale for i, m in zip(idx, mods)]
        w_down = [math.copysign(math.sqrt(abs(c)), c) for c in cs]
        w_up = [math.sqrt(abs(c)) for c in cs]
        downs = [m.tensor("down").to(torch.float32) for m in mods]
        ups = [m.tensor("up").to(torch.float32) for m in mods]
        if mode == "concat":
            down = torch.cat([d * w for d, w in zip(downs, w_down)], dim=0)
            up = torch.cat([u * w for u, w in zip(ups, w_up)], dim=1)
            out[name] = (down, up, float(down.shape[0]))
            continue
        ranks = {m.rank for m in mods}
        if len(ranks) > 1:
            detail = ", ".join(f"'{names[i]}' rank {m.rank}" for i, m in zip(idx, mods))
            raise RankMismatchError(
                f"Mode '{mode}' merges the up/down factors, which needs equal ranks, but module {name} has "
                f"{detail}. Use the concat mode (exact, ranks add up) or the SVD merge (any ranks).")
        gen_d = generator_for(seed, name + ".lora_down", "lora_merge") if mode.startswith("dare") else None
        gen_u = generator_for(seed, name + ".lora_up", "lora_merge") if mode.startswith("dare") else None
        down = combine(downs, w_down, mode, density=density, majority=majority, gen=gen_d)
        up = combine(ups, w_up, mode, density=density, majority=majority, gen=gen_u)
        out[name] = (down, up, float(down.shape[0]))
    step(progress, cancel, len(owners), len(owners), "", "The LoRA merge")
    return out


def merge(loras, out, *, mode: str = "concat", density: float = DEFAULT_DENSITY, seed: int = 0, majority: str = "sum",
          dtype: str | torch.dtype | None = "float16", overwrite: bool = False, progress=None, cancel=None) -> Path:
    """Merge LoRA files into a kohya LoRA at `out` (on the factors: merge_modules; svd.merge_svd for the SVD merge).

    `loras`: LoraInput, (path, w) / (path, w_unet, w_te) or "FILE[:W[:W_TE]]" strings. Metadata: recipe_metadata
    (mode, density, seed, majority, dtype, each input's name, sha256 and weights; `modelspec.merged_from`)."""
    from ..core.files import check_output_path, dtype_from_name
    inputs = [as_input(x) for x in loras]
    if not inputs:
        raise InputError("Give at least one LoRA to merge.")
    check_options(mode, density, majority)
    out = check_output_path(Path(out), [i.path for i in inputs if i.file is None], overwrite)
    tdt = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    with open_inputs(inputs) as files:
        family = common_family(files, [i.name for i in inputs])
        modules = merge_modules(files, inputs, mode, density=density, seed=seed, majority=majority,
                                progress=progress, cancel=cancel)
        meta = recipe_metadata(inputs, family, mode=mode, density=density, seed=seed, majority=majority, dtype=tdt)
        return save_kohya(modules, out, meta, family=family, dtype=tdt, overwrite=overwrite)
