"""The LoRA tools as a host offers them: LoRA names -> files, new output files, and the jobs, run under the
host's lock with its progress and Interrupt. The Merge tab's LoRA section (ui/lora_tab.py) and the HTTP API
(api.py) both use these, so a name is checked, and a job runs, the same way from either.

LoRA names are those of host.list_loras(): paths relative to the host's LoRA folder. `lora_path` joins the
folder and the name, refusing '..', absolute paths and anything that would land outside the folder, so a
typed name can never reach another file. Outputs are plain file names (models.safe_output_path) in the
host's LoRA folder or output folder, checked (models.check_output_path) before any work.
"""
from __future__ import annotations

import contextlib
from pathlib import Path, PurePosixPath
from typing import Any

from ..core.errors import InputError
from ..host import Host
from .merge import DEFAULT_DENSITY, LoraInput, parse_lora_arg

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")
WHERE = ("lora", "output")    # where new LoRAs go: the LoRA folder or the output folder


# --------------------------------------------------------------------------------------- names, paths
def lora_folder(host: Host) -> Path:
    """The host's LoRA folder (Host.lora_dir)."""
    folder = host.lora_dir
    if not folder:
        raise InputError("This host does not say where its LoRA folder is, so LoRAs cannot be chosen here.")
    return Path(folder).expanduser().resolve()


def lora_path(host: Host, name: str) -> Path:
    """A LoRA name (relative to the LoRA folder, as host.list_loras() gives it) -> its file, refusing any
    name that would leave the folder."""
    name = (name or "").strip()
    if not name:
        raise InputError("Choose a LoRA.")
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or ":" in name or any(ord(c) < 32 for c in name):
        raise InputError(f"'{name}' is not a LoRA name: give a file in the LoRA folder (no '..', no absolute "
                         f"path).")
    folder = lora_folder(host)
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder):
        raise InputError(f"'{name}' points outside the LoRA folder {folder}.")
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise InputError(f"'{name}' is not a LoRA file ({', '.join(LORA_SUFFIXES)}).")
    if not path.is_file():
        raise InputError(f"'{name}' is not in the LoRA folder {folder}: put the file there and press Refresh.")
    return path


def parse_lora_lines(host: Host, text: str) -> list[LoraInput]:
    """'name:weight' (or 'name', 'name:w_unet:w_te') per line -> LoraInputs of the LoRA folder's files."""
    return lora_entries(host, [line for line in (text or "").splitlines()
                               if line.strip() and not line.strip().startswith("#")])


def lora_entries(host: Host, entries: Any) -> list[LoraInput]:
    """LoRAs of the LoRA folder from a list of "name:weight" texts or {"name", "weight", "weight_te"} objects
    (the API's form); the weights default to 1, the text-encoder weight to the weight."""
    if not isinstance(entries, list):
        raise InputError("Give the LoRAs as a list of \"name:weight\" texts or {\"name\": ..., \"weight\": ...}.")
    out = []
    for entry in entries:
        if isinstance(entry, dict):
            try:
                w = float(entry.get("weight", 1.0))
                w_te = float(entry["weight_te"]) if entry.get("weight_te") is not None else w
            except (TypeError, ValueError):
                raise InputError(f"The weights of {entry!r} must be numbers.") from None
            name = entry.get("name")
            if not isinstance(name, str):
                raise InputError(f"{entry!r}: give 'name', a LoRA of the LoRA folder.")
        elif isinstance(entry, str):
            line = entry.strip()
            try:
                item = parse_lora_arg(line)
            except InputError as e:
                raise InputError(f"Line '{line}': {e}") from None
            name, w, w_te = str(item.path).strip(), item.w_unet, item.w_te
        else:
            raise InputError(f"{entry!r} is not a LoRA: give \"name:weight\" or {{\"name\": ..., \"weight\": ...}}.")
        out.append(LoraInput(lora_path(host, name), w, w_te))
    if not out:
        raise InputError("List at least one LoRA, one per line as name:weight (e.g. style.safetensors:0.8).")
    return out


def new_lora_path(host: Host, name: str, where: str, inputs: list[Path], overwrite: bool) -> Path:
    """A new LoRA's path: the plain file name `name` in the LoRA folder (where="lora") or the output folder
    (where="output"), checked against the inputs and existing files before any work."""
    from ..core.files import check_output_path, safe_output_path
    if where not in WHERE:
        raise InputError(f"Write new LoRAs to 'lora' (the LoRA folder) or 'output' (the output folder), not {where!r}.")
    folder = Path(host.output_dir()) if where == "output" else lora_folder(host)
    folder.mkdir(parents=True, exist_ok=True)
    return check_output_path(safe_output_path(folder, name), inputs, overwrite)


def resized_name(src: Path, rank: int | None, rule: str | None) -> str:
    """The default file name of a resized LoRA: style_r16, or style_resized for a dynamic rule."""
    return f"{src.stem}_r{rank}" if rank and not rule else f"{src.stem}_resized"


def extracted_name(tuned: Path, rank: int) -> str:
    return f"{tuned.stem}_extract_r{rank}"


def baked_name(checkpoint: Path, items: list[LoraInput]) -> str:
    """The default file name of a baked checkpoint: the checkpoint's and the LoRAs' stems."""
    return "_".join([checkpoint.stem] + [i.path.stem for i in items])[:150]


def check_live(host: Host) -> None:
    if not host.has_live_model:
        raise InputError("This host has no loaded model to bake into: bake to a file instead.")


# ------------------------------------------------------------------------------------------------ jobs
@contextlib.contextmanager
def job(host: Host, title: str):
    """Hold the host's lock (the WebUI's queue) around a job, with its progress and Interrupt reset."""
    with host.exclusive():
        host.begin_job(title)
        try:
            yield
        finally:
            host.end_job()


def merge_loras(items: list[LoraInput], out: Path, *, mode: str = "concat", density: float = DEFAULT_DENSITY, seed: int = 0,
                majority: str = "sum", rank: int | None = None, conv_rank: int | None = None, dtype="float16",
                overwrite: bool = False, progress=None, cancel=None) -> str:
    """Merge LoRAs to `out`: on the factors (lora.merge), or through the SVD (lora.svd) when `rank` is given or
    the mode is svd_<mode>. Returns the message for people."""
    from .merge import merge
    from .svd import merge_svd
    if mode.startswith("svd_") or rank is not None:
        rank = rank or 32
        r = merge_svd(items, out, mode=mode.removeprefix("svd_"), density=density, rank=rank, conv_rank=conv_rank,
                      seed=seed, majority=majority, dtype=dtype, overwrite=overwrite, progress=progress, cancel=cancel)
        kept = sum(r.retained.values()) / len(r.retained) if r.retained else float("nan")
        return "\n".join([f"Wrote {r.path} ({r.modules} modules at rank {rank}, {kept:.1%} of ΔW kept on "
                          f"average)."] + r.warnings[:20])
    path = merge(items, out, mode=mode, density=density, seed=seed, majority=majority, dtype=dtype,
                 overwrite=overwrite, progress=progress, cancel=cancel)
    return f"Wrote {path} ({mode} of {len(items)} LoRA{'s' if len(items) > 1 else ''})."


def check_lbw(lbw, checkpoint: Path):
    """Block weights checked against the checkpoint's architecture before any work (None: none)."""
    if lbw in (None, "") or (isinstance(lbw, str) and not lbw.strip()):
        return None
    from ..core.files import checkpoint_layout
    from .lbw import parse_lbw
    parse_lbw(lbw.strip() if isinstance(lbw, str) else lbw, checkpoint_layout(checkpoint)[0])
    return lbw.strip() if isinstance(lbw, str) else lbw


FAMILY_LABEL = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


def check_resize(rank: int | None, rule: str | None) -> None:
    """A new rank or a dynamic rule (checked) must be given."""
    from .resize import parse_dynamic
    if rule:
        parse_dynamic(rule)
    if rank is None and rule is None:
        raise InputError("Give a new rank or a dynamic rule (e.g. sv_fro:0.9).")


def resize_lora(src: Path, out: Path, *, rank: int | None = None, rule: str | None = None,
                conv_rank: int | None = None, dtype="float16", overwrite: bool = False, progress=None,
                cancel=None) -> str:
    """Resize to `rank`, or by the dynamic `rule` capped by `rank`. Returns the message for people."""
    from ..core.files import dtype_from_name
    from .resize import mean_retained, resize
    check_resize(rank, rule)
    r = resize(src, out, rank=rank if not rule else None, dynamic=rule, max_rank=rank if rule else None,
               conv_rank=conv_rank, dtype=dtype_from_name(dtype) if isinstance(dtype, str) else dtype,
               overwrite=overwrite, progress=progress, cancel=cancel)
    new = sorted({k for _, k in r.ranks.values()})
    return "\n".join([f"Wrote {r.path}: ranks {', '.join(map(str, new))}, {mean_retained(r):.1%} of ΔW kept on "
                      f"average."] + r.warnings[:20])


def check_extract(base: Path, tuned: Path) -> None:
    if base == tuned:
        raise InputError("The base and the tuned checkpoint are the same file: the LoRA would be empty.")


def extract_lora(base: Path, tuned: Path, out: Path, rank: int, *, conv_rank: int | None = None, dtype="float16",
                 overwrite: bool = False, progress=None, cancel=None) -> str:
    """A LoRA of tuned − base at `rank`. Returns the message for people."""
    from ..core.files import dtype_from_name
    from .extract import extract
    check_extract(base, tuned)
    r = extract(base, tuned, out, rank, conv_rank, dtype=dtype_from_name(dtype) if isinstance(dtype, str) else dtype,
                overwrite=overwrite, progress=progress, cancel=cancel)
    kept = sum(r.retained.values()) / len(r.retained) if r.retained else float("nan")
    return "\n".join([f"Wrote {r.path} ({FAMILY_LABEL.get(r.family, r.family)}, {r.modules} modules at rank {rank}, "
                      f"{kept:.1%} of ΔW kept on average)."] + r.messages[:20])
