"""AutoMBW's payloads: the txt2img requests a trial generates and scores, read from our format or another tool's.

Every reader ends in the same checks (Payload.from_dict's rules), and every error names the file, the format
it was read as, the payload and the field. Seeds of -1 are fixed once, from the run's seed (resolve_seeds):
a random seed per trial would make the objective noisy, and a resumed run must draw the same images.

Formats (detected from the content, not the file name):

merge-lab: a list of payloads, or {"payloads": [...]}, in JSON or YAML. Fields: prompt (required),
  negative, seed (-1: fixed by resolve_seeds), steps (1..150), cfg (0..30), width and height (multiples of 8,
  64..2048), sampler (a WebUI sampler name), batch_size (1..16), weight (> 0, the payload's weight in the
  aggregate score), holdout (true: a validation payload, left out of the optimised score), name. The WebUI
  API's names negative_prompt, cfg_scale and sampler_name are accepted for negative, cfg and sampler.

bayesian-merger (s1dlx/sd-webui-bayesian-merger): a payload YAML (conf/payloads/cargo/<file>.yaml), each top
  key a payload name holding WebUI txt2img fields; a folder of them; or conf/payloads/cargo.yaml itself, whose
  Hydra defaults list names the files to read from cargo/ and whose other keys fill the fields a payload
  leaves out (as bayesian-merger's prompter does).

    bayesian-merger          Merge Lab    note
    score_weight             weight
    prompt                   prompt       a prompt with __wildcards__ is refused (write it out in full)
    negative_prompt          negative     neg_prompt (before 2023-04) too
    cfg_scale, cfg           cfg          the template's `cfg` never reached the WebUI (which reads cfg_scale):
                                          it is taken as meant; cfg_scale wins where both are given
    sampler_name             sampler      sampler_index where sampler_name is missing
    seed, steps, width, height, batch_size   the same
    n_iter                   batch_size   n_iter x batch_size images (the same seeds as the WebUI's batches)
    enable_hr, restore_faces, tiling, styles, subseed_strength, seed_resize_from_h/w, eta, s_churn, s_tmin,
    s_tmax, s_noise, override_settings   ignored at the template's values, refused at any other
    subseed, denoising_strength, hr_*, firstphase_*   ignored (no effect without hires fix / variation seeds)

auto-mbw-rt (6DammK9/auto-MBW-rt, from Xerxemi/sdweb-auto-MBW V2): one payload per file, payloads/<name>.json
  (or .yaml, .toml) as its Payload Creator tab writes them: a flat object of WebUI txt2img fields, mapped as
  for bayesian-merger above (cfg_scale -> cfg, sampler_name -> sampler, n_iter folded into batch_size), plus
  wildcard_type (with a type other than "none", a prompt using dynamic-prompts syntax, __wildcards__ or
  {variants}, is refused) and reverse_scoring (ignored, as AutoMBW-rt itself does). The name is the file's.
  A folder of them is read file by file. .msgpack payloads are not read: save them as .json there.

png-infotext (as sd-webui-model-mixer takes its payloads): a folder of PNG images; each image's A1111
  infotext (its "parameters" text chunk) becomes a payload named after the file:

    infotext                   Merge Lab
    first lines                prompt
    "Negative prompt: ..."     negative (up to the parameters line)
    Steps, CFG scale, Seed     steps, cfg, seed
    Sampler + Schedule type    sampler ("DPM++ 2M" + "Karras" -> "DPM++ 2M Karras"; "Automatic" adds nothing)
    Size: WxH                  width, height
    anything else              ignored (a hires-fixed image gives its first pass, with a note)

  A PNG without infotext is refused, naming it, rather than skipped: a folder quietly scoring fewer
  payloads than it holds would optimise something else than the user chose.

Notes (fields ignored, files skipped) go to the `notes` list read_payloads is given, and to the log.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..core.errors import InputError, OutputError
from ..core.files import write_file_atomic
from ..core.generation import GenerationRequest
from .optimizers import derived_seed

log = logging.getLogger(__name__)

FORMATS: dict[str, str] = {
    "merge-lab": "Merge Lab's own payload list (JSON or YAML): prompt, negative, seed, steps, cfg, width, height, "
                 "sampler, batch_size, weight, holdout, name.",
    "bayesian-merger": "sd-webui-bayesian-merger payloads: a conf/payloads/cargo/<name>.yaml, a folder of them, "
                       "or conf/payloads/cargo.yaml with its defaults.",
    "auto-mbw-rt": "AutoMBW-rt payload files (payloads/<name>.json, .yaml or .toml from its Payload Creator), "
                   "one or a folder of them.",
    "png-infotext": "A folder of PNG images: each image's WebUI infotext (prompt, negative prompt, steps, sampler, "
                    "CFG scale, seed, size) becomes a payload.",
}

_TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".toml")


def _integer(v) -> bool:
    return isinstance(v, int) or (isinstance(v, float) and v.is_integer())


# field -> (type, test, what it must be): one rule per field, for every format
_RULES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "prompt": (str, lambda v: True, "text"),
    "negative": (str, lambda v: True, "text"),
    "seed": (int, lambda v: -1 <= v <= 2 ** 32 - 1, "an integer from -1 (a random seed) to 4294967295"),
    "steps": (int, lambda v: 1 <= v <= 150, "an integer from 1 to 150"),
    "cfg": (float, lambda v: 0 <= v <= 30, "a number from 0 to 30"),
    "width": (int, lambda v: 64 <= v <= 2048 and v % 8 == 0, "a multiple of 8 from 64 to 2048"),
    "height": (int, lambda v: 64 <= v <= 2048 and v % 8 == 0, "a multiple of 8 from 64 to 2048"),
    "sampler": (str, lambda v: v.strip() != "", "a sampler name such as 'Euler a'"),
    "batch_size": (int, lambda v: 1 <= v <= 16, "an integer from 1 to 16"),
    "weight": (float, lambda v: 0 < v < math.inf, "a number above 0"),
    "holdout": (bool, lambda v: True, "true or false"),
    "name": (str, lambda v: True, "text"),
}


@dataclass
class Payload:
    prompt: str
    negative: str = ""
    seed: int = -1
    steps: int = 20
    cfg: float = 7.0
    width: int = 512
    height: int = 512
    sampler: str = "Euler a"
    batch_size: int = 1
    weight: float = 1.0       # payload weight in the aggregate score
    holdout: bool = False     # validation payload: not used for the optimisation's score
    name: str = ""            # a label ("payload 3" if none given)

    def request(self) -> GenerationRequest:
        return GenerationRequest(prompt=self.prompt, negative_prompt=self.negative, seed=self.seed, steps=self.steps,
                                 cfg_scale=self.cfg, width=self.width, height=self.height, sampler=self.sampler,
                                 batch_size=self.batch_size)

    def to_dict(self) -> dict:
        """Our own field names, JSON-safe: what run folders and payload files keep."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "payload") -> "Payload":
        """Strict: a misspelt field silently left at its default would optimise for the wrong images."""
        return cls(**_fields(d, where, _OUR_KEYS))


# our fields, and the WebUI API's names for three of them
_OUR_KEYS = {f.name: f.name for f in dataclasses.fields(Payload)}
_OUR_KEYS.update(negative_prompt="negative", cfg_scale="cfg", sampler_name="sampler")


def _value(field: str, key: str, raw, where: str):
    """One field's value, checked and normalised; `key` is the field as the source spells it."""
    kind, test, what = _RULES[field]
    v = raw
    if kind is str or kind is bool:
        ok = isinstance(v, kind)
    elif isinstance(v, bool) or not isinstance(v, (int, float)):
        ok = False
    elif kind is int:
        ok = _integer(v)
        v = int(v) if ok else v
    else:
        try:
            v = float(v)
        except OverflowError:
            v = math.inf
        ok = math.isfinite(v)
    if not ok or not test(v):
        raise InputError(f"{where}: {key} must be {what}, not {raw!r}.")
    return v


def _fields(d, where: str, keys: dict[str, str]) -> dict:
    """Our fields from a dict spelt with `keys` (source name -> our field): unknown and doubled fields refused."""
    if not isinstance(d, dict):
        raise InputError(f"{where}: a payload must be an object of fields (prompt, steps, ...), "
                         f"not {type(d).__name__}.")
    unknown = [str(k) for k in d if k not in keys]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(keys), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(k) for k in unknown)}{hint}; the known fields are {', '.join(keys)}.")
    out, spelt = {}, {}
    for k, v in d.items():
        f = keys[k]
        if f in out:
            raise InputError(f"{where}: '{spelt[f]}' and '{k}' are the same field; give one of them.")
        out[f], spelt[f] = _value(f, k, v, where), k
    if "prompt" not in out:
        raise InputError(f"{where}: the prompt is missing.")
    return out


# ------------------------------------------------------------------ WebUI API fields (bayesian-merger, AutoMBW-rt)
_WEBUI_KEYS = {"prompt": "prompt", "negative_prompt": "negative", "neg_prompt": "negative", "seed": "seed",
               "steps": "steps", "cfg_scale": "cfg", "cfg": "cfg", "width": "width", "height": "height",
               "sampler_name": "sampler", "sampler_index": "sampler", "batch_size": "batch_size",
               "score_weight": "weight"}
# fields our requests cannot carry: ignored at the values that leave them unused, refused at any other
_INERT: dict[str, tuple[tuple, str]] = {
    "enable_hr": ((False,), "hires fix"), "restore_faces": ((False,), "face restoration"),
    "tiling": ((False,), "tiling"), "styles": (([], None), "styles"),
    "subseed_strength": ((0,), "variation seeds"), "seed_resize_from_h": ((-1, 0), "seed resizing"),
    "seed_resize_from_w": ((-1, 0), "seed resizing"), "override_settings": (({}, None), "setting overrides"),
    "eta": ((0, None), "sampler options"), "s_churn": ((0,), "sampler options"),
    "s_tmin": ((0,), "sampler options"), "s_tmax": ((0, None), "sampler options"),
    "s_noise": ((1,), "sampler options"),
}
# fields that do nothing once the above are off, or only steer the other tool
_IRRELEVANT = {"subseed", "denoising_strength", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
               "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "wildcard_type", "reverse_scoring",
               "do_not_save_samples", "do_not_save_grid", "save_images", "send_images",
               "override_settings_restore_afterwards"}
_BM_WILDCARD = re.compile(r"__.+?__")                  # bayesian-merger: text between "__" pairs is replaced
_DYNAMIC_PROMPT = re.compile(r"__.+?__|[{}]")          # dynamic prompts: wildcards and {variants}


def _from_webui(d, where: str, ignored: set[str], wildcards: re.Pattern | None, notes: list[str]) -> Payload:
    """A payload from a WebUI txt2img request as another tool wrote it (field names as the WebUI's API)."""
    if not isinstance(d, dict):
        raise InputError(f"{where}: a payload must be an object of fields (prompt, steps, ...), "
                         f"not {type(d).__name__}.")
    d = dict(d)
    # where two names are given the WebUI used the one it knows; alone, the other is taken as meant
    for used, other in (("cfg_scale", "cfg"), ("negative_prompt", "neg_prompt"), ("sampler_name", "sampler_index")):
        if used in d and other in d:
            d.pop(other)
            ignored.add(other)
    n_iter = d.pop("n_iter", 1)
    if isinstance(n_iter, bool) or not _integer(n_iter) or n_iter < 1:
        raise InputError(f"{where}: n_iter must be an integer from 1, not {n_iter!r}.")
    if wildcards is not None:
        for key in ("prompt", "negative_prompt", "neg_prompt"):
            if isinstance(d.get(key), str) and wildcards.search(d[key]):
                raise InputError(f"{where}: {key} uses wildcards ('{wildcards.search(d[key]).group()}'), which "
                                 f"Merge Lab does not expand: write the prompt out in full, one payload per variant.")
    keep, unknown = {}, []
    for k, v in d.items():
        if k in _WEBUI_KEYS:
            keep[k] = v
        elif k in _IRRELEVANT:
            ignored.add(k)
        elif k in _INERT:
            allowed, what = _INERT[k]
            if not any(v == a and type(v) is not str for a in allowed):
                raise InputError(f"{where}: {k} is {json.dumps(v, default=str)}, but Merge Lab's payloads cannot carry {what}: "
                                 f"set it to {json.dumps(allowed[0])} or leave it out.")
            ignored.add(k)
        else:
            unknown.append(k)
    if unknown:
        known = list(_WEBUI_KEYS) + ["n_iter"]
        raise InputError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(str(k)) for k in unknown)}; Merge Lab reads {', '.join(known)} and ignores "
                         f"{', '.join(sorted(set(_INERT) | _IRRELEVANT))}.")
    if n_iter != 1:   # n_iter batches of batch_size: the WebUI gives them seeds seed, seed+1, ... as one batch
        batch = _value("batch_size", "batch_size", keep.get("batch_size", 1), where)
        n, total = int(n_iter), int(n_iter) * batch
        if total > 16:
            raise InputError(f"{where}: n_iter {n} x batch_size {batch} = {total} images; a payload makes at most 16: "
                             f"split it into several payloads.")
        keep["batch_size"] = total
        notes.append(f"{where}: n_iter {n} x batch_size {batch} read as batch_size {total} "
                     f"(the same seeds as the WebUI's batches).")
    return Payload(**_fields(keep, where, _WEBUI_KEYS))


def _note_ignored(notes: list[str], source: str, ignored: set[str]) -> None:
    if ignored:
        notes.append(f"{source}: ignored {', '.join(sorted(ignored))} (they do not change the image as given).")


def _bayesian(data: dict, path: Path, notes: list[str], defaults: dict | None = None, via: str = "") -> list[Payload]:
    """bayesian-merger: each top key a payload name; `defaults` (cargo.yaml's) fill the fields a payload omits."""
    out, ignored = [], set()
    for name, fields in data.items():
        where = f"'{path.name}' (read as bayesian-merger payloads{via}), payload '{name}'"
        if defaults and isinstance(fields, dict):
            have = {_WEBUI_KEYS.get(k, k) for k in fields}
            fields = {**{k: v for k, v in defaults.items() if _WEBUI_KEYS.get(k, k) not in have}, **fields}
        p = _from_webui(fields, where, ignored, _BM_WILDCARD, notes)
        out.append(dataclasses.replace(p, name=str(name)))
    _note_ignored(notes, path.name, ignored)
    return out


def _cargo(data: dict, path: Path, notes: list[str]) -> list[Payload]:
    """bayesian-merger's cargo.yaml: `defaults: [{cargo: [names]}]` picks cargo/<name>.yaml; the rest are defaults."""
    names = []
    for item in data["defaults"]:
        if isinstance(item, dict) and "cargo" in item:
            names += item["cargo"] if isinstance(item["cargo"], list) else [item["cargo"]]
    if not names:
        raise InputError(f"'{path.name}' (read as a bayesian-merger cargo file): its defaults list names no "
                         f"payloads (expected defaults: [{{cargo: [payload1, ...]}}]).")
    defaults = {k: v for k, v in data.items() if k != "defaults"}
    out = []
    for name in names:
        file = path.parent / "cargo" / f"{name}.yaml"
        if not file.is_file():
            raise InputError(f"'{path.name}' (read as a bayesian-merger cargo file) lists the payload file '{name}', "
                             f"but '{file}' does not exist.")
        fields = _load(file)
        if not isinstance(fields, dict) or not all(isinstance(v, dict) for v in fields.values()):
            raise InputError(f"'{file.name}' (read as bayesian-merger payloads): expected payload names holding "
                             f"their fields (name: {{prompt: ..., steps: ...}}).")
        out += _bayesian(fields, file, notes, defaults, f" with the defaults of {path.name}")
    return out


def _auto_mbw_rt(data: dict, path: Path, notes: list[str]) -> list[Payload]:
    """AutoMBW-rt: one flat payload per file, named after it; dynamic prompts unless wildcard_type is none."""
    ignored: set[str] = set()
    wildcards = None if data.get("wildcard_type") in (None, "none") else _DYNAMIC_PROMPT
    p = _from_webui(data, f"'{path.name}' (read as an AutoMBW-rt payload)", ignored, wildcards, notes)
    _note_ignored(notes, path.name, ignored)
    return [dataclasses.replace(p, name=path.stem)]


def _ours(items, path: Path) -> list[Payload]:
    out = []
    for i, d in enumerate(items):
        label = f" '{d['name']}'" if isinstance(d, dict) and isinstance(d.get("name"), str) and d["name"] else ""
        out.append(Payload.from_dict(d, f"'{path.name}' (read as Merge Lab payloads), payload {i + 1}{label}"))
    return out


# ------------------------------------------------------------------------------------------------- PNG infotext
# one "Key: value" of the infotext's parameters line: a JSON-quoted value (it held a comma, colon or newline)
# or anything up to the next comma
_PARAM = re.compile(r'\s*(\w[\w /-]+):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) of a WebUI infotext, read as the WebUI reads it: the last line holds
    the parameters if it has three "Key: value" pairs or more; "Negative prompt:" starts the negative prompt."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines, last = lines + [last], ""
    prompt, negative = [], []
    target = prompt
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            target, line = negative, line[len("Negative prompt:"):].strip()
        target.append(line)
    params = {}
    for key, value in _PARAM.findall(last):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        params[key] = value
    return "\n".join(prompt), "\n".join(negative), params


_INFOTEXT_KEYS = {"prompt": "prompt", "Negative prompt": "negative", "Steps": "steps", "CFG scale": "cfg",
                  "Seed": "seed", "Sampler": "sampler", "Size (width)": "width", "Size (height)": "height",
                  "name": "name"}


def payload_from_infotext(text: str, where: str = "infotext", name: str = "",
                          notes: list[str] | None = None) -> Payload:
    """A payload from a WebUI infotext: prompt, negative prompt, steps, sampler (with its schedule type), CFG scale,
    seed and size; the other parameters are not requests' business."""
    prompt, negative, params = parse_infotext(text)
    d: dict[str, Any] = {"prompt": prompt, "Negative prompt": negative, "name": name}
    for key in ("Steps", "CFG scale", "Seed"):
        if key in params:
            try:
                d[key] = int(params[key])
            except ValueError:
                try:
                    d[key] = float(params[key])
                except ValueError:
                    raise InputError(f"{where}: {key} is {params[key]!r}, not a number.") from None
    if "Sampler" in params:
        schedule = params.get("Schedule type", "Automatic").strip()
        d["Sampler"] = params["Sampler"] + ("" if schedule in ("", "Automatic") else f" {schedule}")
    if "Size" in params:
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", params["Size"])
        if not m:
            raise InputError(f"{where}: Size is {params['Size']!r}, not WIDTHxHEIGHT.")
        d["Size (width)"], d["Size (height)"] = int(m.group(1)), int(m.group(2))
    if notes is not None and any(k.startswith("Hires") for k in params):
        notes.append(f"{where}: made with hires fix; the payload is its first pass "
                     f"({params.get('Size', '512x512')}) without it.")
    return Payload(**_fields(d, where, _INFOTEXT_KEYS))


def _png(path: Path, notes: list[str]) -> list[Payload]:
    from PIL import Image
    where = f"'{path.name}' (read as a PNG with WebUI infotext)"
    try:
        with Image.open(path) as im:
            text = im.info.get("parameters") or getattr(im, "text", {}).get("parameters")
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{where}: not a readable PNG image ({e}).") from None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: the image has no generation parameters (no \"parameters\" text chunk, as the "
                         f"WebUI writes): use images saved by the WebUI, or take this one out of the folder.")
    return [payload_from_infotext(text, where, path.stem, notes)]


# ------------------------------------------------------------------------------------------------ files, folders
def _load(path: Path):
    """A JSON, YAML or TOML file's data; errors say where the file stops making sense."""
    import yaml
    try:
        text = path.read_bytes().decode("utf-8-sig")   # (bytes: no newline translation inside the values)
    except UnicodeDecodeError:
        raise InputError(f"'{path.name}' is not a text file (UTF-8).") from None
    except OSError as e:
        raise InputError(f"Cannot read '{path}': {e.strerror}.") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return json.loads(text)
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:   # Python < 3.11
                raise InputError(f"'{path.name}': reading TOML needs Python 3.11; save the payload as .json.") from None
            return tomllib.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise InputError(f"'{path.name}' is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise InputError(f"'{path.name}' is not readable as YAML ({at}{getattr(e, 'problem', None) or e}).") from None
    except ValueError as e:   # tomllib.TOMLDecodeError; YAML's impossible dates; JSON numbers of over 4300 digits
        kind = {".toml": "TOML", ".json": "JSON"}.get(suffix, "YAML")
        raise InputError(f"'{path.name}' is not valid {kind} ({e}).") from None
    except RecursionError:
        raise InputError(f"'{path.name}' is nested too deeply to be a payload file.") from None


def _from_data(data, path: Path, notes: list[str]) -> list[Payload]:
    """Which format a file holds, from its shape."""
    if isinstance(data, list):
        return _ours(data, path)
    if isinstance(data, dict):
        if isinstance(data.get("payloads"), list):
            extra = [str(k) for k in data if k != "payloads"]
            if extra:
                raise InputError(f"'{path.name}' (read as Merge Lab payloads): unknown top-level field "
                                 f"{', '.join(repr(k) for k in extra)}; it holds only \"payloads\".")
            return _ours(data["payloads"], path)
        if isinstance(data.get("defaults"), list):
            return _cargo(data, path, notes)
        if "prompt" in data and not isinstance(data["prompt"], dict):
            return _auto_mbw_rt(data, path, notes)
        if data and all(isinstance(v, dict) for v in data.values()):
            return _bayesian(data, path, notes)
    if data is None:
        raise InputError(f"'{path.name}' is empty.")
    raise InputError(f"'{path.name}' is not a payload file Merge Lab recognises: expected a list of payloads "
                     f"(Merge Lab), payload names holding their fields (bayesian-merger), or one payload's "
                     f"WebUI fields with a prompt (AutoMBW-rt).")


def _read_file(path: Path, notes: list[str]) -> list[Payload]:
    suffix = path.suffix.lower()
    if suffix == ".png":
        return _png(path, notes)
    if suffix in _TEXT_SUFFIXES:
        return _from_data(_load(path), path, notes)
    if suffix == ".msgpack":
        raise InputError(f"'{path.name}': msgpack payloads are not read; save the payload as .json in AutoMBW-rt.")
    raise InputError(f"'{path.name}' is not a payload file Merge Lab reads: use .json, .yaml, .toml, or a folder "
                     f"of .png images.")


def _read_folder(folder: Path, notes: list[str]) -> list[Payload]:
    """Every payload file of a folder, by name; templates and other files skipped with a note."""
    out, skipped = [], []
    for p in sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name):
        suffix = p.suffix.lower()
        if p.name.lower().endswith((".tmpl.yaml", ".tmpl.yml")):
            skipped.append(p.name)       # bayesian-merger's template payload
        elif suffix == ".png" or suffix in _TEXT_SUFFIXES:
            out += _read_file(p, notes)
        elif suffix:
            skipped.append(p.name)
    if skipped:
        notes.append(f"{folder.name}: skipped {', '.join(skipped)} (not payload files).")
    if not out:
        raise InputError(f"The folder '{folder}' holds no payload files (.json, .yaml, .yml, .toml or .png).")
    return out


def _label(i: int, name: str) -> str:
    default = f"payload {i + 1}"
    return default if not name or name == default else f"{default} '{name}'"


def read_payloads(value, base_dir: Path | None = None, notes: list[str] | None = None) -> list[Payload]:
    """`value`: a list of dicts (our format), or a path (relative to base_dir) to: a JSON or YAML file holding
    our list (or {"payloads": [...]}); an AutoMBW-rt JSON payload file; a bayesian-merger payload YAML (one
    file, or a folder of them such as conf/payloads/cargo/); a folder of PNG images whose infotexts (A1111
    "parameters" text chunk) become payloads. The format is detected from the content, and errors say which
    format was assumed. Empty result -> InputError. Payloads without a name are named "payload N"; names must
    be unique (they label the images and the log). What was ignored or skipped is appended to `notes`."""
    notes = [] if notes is None else notes
    start = len(notes)
    if isinstance(value, (list, tuple)):
        payloads = [Payload.from_dict(d, _label(i, d.get("name", "") if isinstance(d, dict) else ""))
                    for i, d in enumerate(value)]
        source = "The payload list"
    elif isinstance(value, (str, os.PathLike)) and str(value).strip():
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.exists():
            raise InputError(f"Payload file or folder not found: '{path}'.")
        payloads = _read_folder(path, notes) if path.is_dir() else _read_file(path, notes)
        source = f"'{path}'"
    else:
        raise InputError(f"payloads must be a list of payloads or the path of a payload file or folder, "
                         f"not {value!r}.")
    if not payloads:
        raise InputError(f"{source} holds no payloads.")
    named, seen = [], {}
    for i, p in enumerate(payloads):
        p = p if p.name else dataclasses.replace(p, name=f"payload {i + 1}")
        if p.name in seen:
            raise InputError(f"Payloads {seen[p.name] + 1} and {i + 1} are both named '{p.name}': give them different "
                             f"names (names label the images and the log).")
        seen[p.name] = i
        named.append(p)
    for note in notes[start:]:
        log.info("payloads: %s", note)
    return named


def resolve_seeds(payloads: list[Payload], run_seed: int) -> tuple[list[Payload], list[str]]:
    """Seeds of -1 become fixed seeds derived from (run_seed, payload index) with derived_seed (so a noisy
    objective never happens and a resumed run uses the same seeds); returns new payloads and one message per
    resolved seed ("payload 2 'cat': seed -1 resolved to 123456")."""
    out, messages = [], []
    for i, p in enumerate(payloads):
        if p.seed == -1:
            p = dataclasses.replace(p, seed=derived_seed(run_seed, "payload", i))
            messages.append(f"{_label(i, p.name)}: seed -1 resolved to {p.seed}")
        out.append(p)
    return out, messages


def write_payloads(payloads: list[Payload], path: Path) -> None:
    """Our format (a list of payloads), JSON or YAML by the suffix, written atomically (temp file + os.replace)."""
    path = Path(path)
    data = [p.to_dict() for p in payloads]
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    elif suffix in (".yaml", ".yml"):
        import yaml
        # PyYAML writes these line breaks raw and reads them back folded: escaped only in all-ASCII output
        raw_ok = not any(c in v for p in data for v in p.values() if isinstance(v, str) for c in "\x85\u2028\u2029")
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=raw_ok)
    else:
        raise OutputError(f"'{path.name}': payloads are written as .json or .yaml, not '{suffix or 'no suffix'}'.")
    write_file_atomic(path, text.encode("utf-8"))
