"""Scorers: images -> one number each, and how a trial's images make the trial's score.

A scorer has `score(images, payloads, params) -> [float per image]` and `close()`:
- `imagereward`: ImageReward (optimize/imagereward.py), loaded once and kept on its device;
- `python:MODULE:FUNCTION` / `python:PATH.py:FUNCTION`: the user's function, called as
  FUNCTION(images=[PIL...], payloads=[dict per image], params={name: value}); MODULE is looked up beside
  the config file first, then on sys.path;
- `manual`: the user rates each image in the tab (or through the API), the run waits for it.
A list of scorers with weights is an ensemble: each scorer's scores are standardised over the run (the
mean and spread of everything it has scored so far, this trial included) before they are weighted, so a
scorer with a wide range cannot drown the others. One scorer alone keeps its own scale.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from ..core.errors import InputError, MergeError

KINDS = ("imagereward", "python", "manual")
IMAGEREWARD_OPTIONS = ("model", "med_config", "tokenizer", "device", "sigmoid", "pad")


class ScorerError(MergeError):
    """A scorer failed on a trial's images (the trial is logged as failed; the run goes on)."""


def check_scorer_spec(spec: Any) -> list[dict]:
    """The scorer field -> a list of {"name", "weight", ...options}, every field checked."""
    items = spec if isinstance(spec, list) else [spec]
    if not items:
        raise InputError("scorer: give a scorer (imagereward, python:MODULE:FUNCTION or manual).")
    out = []
    for i, item in enumerate(items):
        where = f"scorer[{i}]" if isinstance(spec, list) else "scorer"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InputError(f"{where} must be a name (imagereward, python:MODULE:FUNCTION, manual) or an object with a 'name'.")
        item = dict(item)
        name = item["name"]
        if name.startswith("python:"):
            target = name[len("python:"):]
            if ":" not in target or not target.rsplit(":", 1)[1].isidentifier():
                raise InputError(f"{where}: '{name}' must be python:MODULE:FUNCTION or python:PATH.py:FUNCTION.")
            item["kind"], known = "python", ("name", "weight")
        elif name in ("imagereward", "manual"):
            item["kind"] = name
            known = ("name", "weight") + (IMAGEREWARD_OPTIONS if name == "imagereward" else ())
        else:
            raise InputError(f"{where}: unknown scorer '{name}' (use imagereward, python:MODULE:FUNCTION or manual).")
        unknown = set(item) - set(known) - {"kind"}
        if unknown:
            raise InputError(f"{where} ({name}): unknown option(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(known)}).")
        w = item.get("weight", 1.0)
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0:
            raise InputError(f"{where} ({name}): weight must be a positive number, not {w!r}.")
        item["weight"] = float(w)
        for flag in ("sigmoid", "pad"):
            if flag in item and not isinstance(item[flag], bool):
                raise InputError(f"{where} ({name}): {flag} must be true or false.")
        out.append(item)
    if sum(1 for s in out if s["kind"] == "manual") > 1:
        raise InputError("scorer: 'manual' can appear once.")
    return out


def scorer_keys(specs: list[dict]) -> list[str]:
    """Distinct names for the log's per-scorer scores."""
    keys: list[str] = []
    for s in specs:
        key, n = s["name"], 2
        while key in keys:
            key, n = f"{s['name']}#{n}", n + 1
        keys.append(key)
    return keys


# ------------------------------------------------------------------------------------ the scorers
class PythonScorer:
    def __init__(self, target: str, base_dir: Path | None):
        self.name = f"python:{target}"
        module_part, func = target.rsplit(":", 1)
        self.fn = _load_function(module_part, func, base_dir)

    def score(self, images, payloads, params) -> list[float]:
        out = self.fn(images=images, payloads=payloads, params=params)
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            raise ScorerError(f"{self.name} returned {type(out).__name__}, not one number per image.") from None
        if len(values) != len(images):
            raise ScorerError(f"{self.name} returned {len(values)} scores for {len(images)} images.")
        return values

    def close(self) -> None:
        pass


def _load_function(module_part: str, func: str, base_dir: Path | None) -> Callable:
    where = f"python:{module_part}:{func}"
    if module_part.endswith(".py"):
        path = Path(module_part).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise InputError(f"scorer {where}: file not found: '{path}'.")
        spec = importlib.util.spec_from_file_location(f"merge_lab_scorer_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise InputError(f"scorer {where}: importing '{path}' failed: {type(e).__name__}: {e}") from None
    else:
        added = base_dir is not None and str(base_dir) not in sys.path
        if added:
            sys.path.insert(0, str(base_dir))
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise InputError(f"scorer {where}: no module '{module_part}' beside the config or on sys.path ({e}).") from None
        finally:
            if added:
                sys.path.remove(str(base_dir))
    fn = getattr(module, func, None)
    if not callable(fn):
        raise InputError(f"scorer {where}: the module has no function '{func}'.")
    return fn


class ManualScorer:
    """The user rates each image (a number, e.g. 0-10) in the tab or through the API; the run waits."""
    name = "manual"

    def __init__(self, cancel: Callable[[], bool] = lambda: False):
        self.cancel = cancel
        self._ratings: list[float] | None = None
        self._ready = threading.Event()
        self.waiting: dict | None = None   # {"prompts": [...], "images": [...]} while a rating is awaited

    def score(self, images, payloads, params) -> list[float]:
        self._ratings = None
        self._ready.clear()
        self.waiting = {"images": list(images), "prompts": [p.get("prompt", "") for p in payloads]}
        try:
            while not self._ready.wait(0.2):
                if self.cancel():
                    raise ScorerError("Interrupted while waiting for ratings.")
            return list(self._ratings)
        finally:
            self.waiting = None

    def rate(self, ratings: list) -> None:
        if self.waiting is None:
            raise InputError("No images are waiting for a rating.")
        n = len(self.waiting["images"])
        try:
            values = [float(r) for r in ratings]
        except (TypeError, ValueError):
            raise InputError("Ratings must be numbers.") from None
        if len(values) != n or not all(math.isfinite(v) for v in values):
            raise InputError(f"Give {n} finite ratings, one per image.")
        self._ratings = values
        self._ready.set()

    def close(self) -> None:
        pass


def build_scorers(specs: list[dict], base_dir: Path | None, *, device: str = "cpu",
                  warn: Callable[[str], None] | None = None, cancel: Callable[[], bool] = lambda: False,
                  settings: Callable[[str, Any], Any] | None = None) -> list:
    """The scorer objects, loaded once for the run (ImageReward's model folder: the config, else the setting)."""
    scorers = []
    try:
        for s in specs:
            if s["kind"] == "python":
                scorers.append(PythonScorer(s["name"][len("python:"):], base_dir))
            elif s["kind"] == "manual":
                scorers.append(ManualScorer(cancel))
            else:
                from .imagereward import ImageRewardScorer
                model = s.get("model") or (settings and settings("merge_lab_imagereward_dir", None)) or None
                if model and base_dir is not None and not Path(model).expanduser().is_absolute():
                    model = str(base_dir / model)
                scorers.append(ImageRewardScorer(
                    model=model, med_config=s.get("med_config"), tokenizer=s.get("tokenizer"),
                    device=s.get("device") or device, sigmoid=s.get("sigmoid", False), pad=s.get("pad", False),
                    warn=warn))
    except BaseException:
        for sc in scorers:
            sc.close()
        raise
    return scorers


# ------------------------------------------------------------------------------------ combining
class Standardiser:
    """Running mean and spread per scorer over the run, rebuilt from the log on resume."""

    def __init__(self, keys: list[str]):
        self.stats = {k: [0, 0.0, 0.0] for k in keys}   # n, sum, sum of squares

    def add(self, raw: dict[str, list[float]]) -> None:
        for k, values in raw.items():
            s = self.stats[k]
            s[0] += len(values)
            s[1] += sum(values)
            s[2] += sum(v * v for v in values)

    def z(self, key: str, value: float) -> float:
        n, total, squares = self.stats[key]
        if n < 2:
            return 0.0
        mean = total / n
        var = max(0.0, squares / n - mean * mean)
        return (value - mean) / math.sqrt(var) if var > 1e-24 else 0.0


def per_image_scores(raw: dict[str, list[float]], weights: dict[str, float], standardiser: Standardiser) -> list[float]:
    """Each image's combined score: the scorer's own value for one scorer, a weighted sum of z-scores for many."""
    keys = list(raw)
    if len(keys) == 1:
        return list(raw[keys[0]])
    total = sum(weights[k] for k in keys)
    n = len(raw[keys[0]])
    return [sum(weights[k] * standardiser.z(k, raw[k][i]) for k in keys) / total for i in range(n)]


def aggregate(values: list[float], weights: list[float], how: str) -> float:
    """The trial's score from its images' scores, weighted by their payloads' weights."""
    if not values:
        raise ScorerError("No image was scored.")
    if any(not math.isfinite(v) for v in values):
        raise ScorerError("A score is not a finite number.")
    total = sum(weights)
    if how == "mean":
        return sum(w * v for w, v in zip(weights, values)) / total
    if how == "min":
        return min(values)
    if how == "median":   # weighted median: the first value at which half the weight is reached
        pairs = sorted(zip(values, weights))
        acc = 0.0
        for v, w in pairs:
            acc += w
            if acc >= total / 2:
                return v
        return pairs[-1][0]
    if any(v <= 0 for v in values):
        raise ScorerError(f"The {how} mean needs scores above 0 (got {min(values):.4g}): "
                          f"use the scorer's sigmoid option or the plain mean.")
    if how == "geometric":
        return math.exp(sum(w * math.log(v) for w, v in zip(weights, values)) / total)
    if how == "harmonic":
        return total / sum(w / v for w, v in zip(weights, values))
    raise InputError(f"Unknown aggregate '{how}'.")
