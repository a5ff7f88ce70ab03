"""An AutoMBW run's configuration: JSON or YAML, checked field by field before anything runs.

`check_config(raw)` fills in the defaults and refuses unknown or ill-typed fields with a sentence naming
the field (and the file). `resolve(config, host, base_dir)` then turns names into files, the starting
recipe into a Recipe, payload files into payloads (seeds of -1 fixed once) — the resolved config that the
run folder keeps, so a resumed run needs nothing but its folder. docs/AUTOMBW.md describes every field.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from .optimizers import NAMES as OPTIMIZERS

AGGREGATES = ("mean", "geometric", "harmonic", "median", "min")
FINISH = ("apply", "restore")

DEFAULTS: dict[str, Any] = {
    "name": "autombw",
    "models": [],
    "models_dir": None,
    "method": "weighted_sum",
    "base": None,
    "params": {},
    "recipe": None,
    "space": {"alpha": "all"},
    "optimizer": {"name": "bayes", "seed": 0},
    "warm_start": True,          # trial 0 is the starting recipe itself
    "budget": {"trials": 50, "seconds": None, "patience": None, "tolerance": 0.0},
    "payloads": [],
    "scorer": "imagereward",
    "aggregate": "mean",
    "holdout": {"every": 0, "top": 3},
    "finish": "apply",           # at the end: load the best recipe, or restore the original model
    "save_best": False,          # true, or a file name: save the best merge as a checkpoint at the end
    "device": None,              # merge device (None: the host's setting)
    "images": True,              # keep every trial's images as PNG in the run folder
}
BUDGET_FIELDS = ("trials", "seconds", "patience", "tolerance")
HOLDOUT_FIELDS = ("every", "top")


def read_config(path: str | Path) -> dict:
    """A config file (JSON, or YAML by suffix) -> its object; errors name the file and the line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"Config file not found: '{p}'.")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    except Exception as e:   # yaml.YAMLError carries the position in its text
        raise InputError(f"{p}: not valid YAML ({' '.join(str(e).split())}).") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: the config must be an object of fields (models, space, payloads...).")
    return data


def _number(value, where: str, *, integer: bool = False, low: float | None = None, allow_none: bool = False):
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer and float(value) != int(value):
        ok = False
    if not ok:
        raise InputError(f"{where} must be {'an integer' if integer else 'a number'}, not {value!r}.")
    if low is not None and value < low:
        raise InputError(f"{where} must be at least {low}, not {value}.")
    return int(value) if integer else float(value)


def _section(config: dict, name: str, fields: tuple[str, ...]) -> dict:
    value = config.get(name)
    if value is None:
        return copy.deepcopy(DEFAULTS[name])
    if not isinstance(value, dict):
        raise InputError(f"{name} must be an object with {', '.join(fields)}.")
    unknown = set(value) - set(fields)
    if unknown:
        raise InputError(f"{name}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(fields)}).")
    return {**DEFAULTS[name], **value}


def check_config(raw: Any, where: str = "config") -> dict:
    """Defaults filled in, every field checked (not yet the files, models or blocks: see resolve)."""
    try:
        return _check(raw)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def _check(raw: Any) -> dict:
    if not isinstance(raw, dict):
        raise InputError("the config must be an object of fields (models, space, payloads...).")
    unknown = set(raw) - set(DEFAULTS) - {"resolved"}
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(DEFAULTS)}).")
    config = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(raw)}
    if not isinstance(config["name"], str) or not config["name"].strip():
        raise InputError("name must be a non-empty text (it names the run folder).")
    if config["recipe"] is None:
        models = config["models"]
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models) or len(models) < 2:
            raise InputError("models must list at least two checkpoints (paths or names), or give a 'recipe'.")
        if not isinstance(config["method"], str):
            raise InputError("method must be a method name (python -m lib_merge methods lists them).")
    elif not isinstance(config["recipe"], (dict, str)):
        raise InputError("recipe must be a recipe object or the path of a recipe JSON file.")
    if not isinstance(config["params"], dict):
        raise InputError("params must map method parameters to values, e.g. {\"alpha\": 0.5}.")
    if not isinstance(config["space"], dict):
        raise InputError("space must be an object, e.g. {\"alpha\": \"all\"}.")

    opt = config["optimizer"] if isinstance(config["optimizer"], dict) else {"name": config["optimizer"]}
    opt = {**DEFAULTS["optimizer"], **opt}
    if opt["name"] not in OPTIMIZERS:
        raise InputError(f"optimizer.name is '{opt['name']}': use one of {', '.join(OPTIMIZERS)}.")
    opt["seed"] = _number(opt["seed"], "optimizer.seed", integer=True, low=0)
    config["optimizer"] = opt

    budget = _section(config, "budget", BUDGET_FIELDS)
    budget["trials"] = _number(budget["trials"], "budget.trials", integer=True, low=1)
    budget["seconds"] = _number(budget["seconds"], "budget.seconds", low=1, allow_none=True)
    budget["patience"] = _number(budget["patience"], "budget.patience", integer=True, low=1, allow_none=True)
    budget["tolerance"] = _number(budget["tolerance"], "budget.tolerance", low=0)
    config["budget"] = budget

    holdout = _section(config, "holdout", HOLDOUT_FIELDS)
    holdout["every"] = _number(holdout["every"], "holdout.every", integer=True, low=0)
    holdout["top"] = _number(holdout["top"], "holdout.top", integer=True, low=1)
    config["holdout"] = holdout

    if config["aggregate"] not in AGGREGATES:
        raise InputError(f"aggregate is '{config['aggregate']}': use one of {', '.join(AGGREGATES)}.")
    if config["finish"] not in FINISH:
        raise InputError(f"finish is '{config['finish']}': use apply (load the best merge) or restore (the original model).")
    if not isinstance(config["save_best"], (bool, str)):
        raise InputError("save_best must be true, false or a file name.")
    if not isinstance(config["warm_start"], bool) or not isinstance(config["images"], bool):
        raise InputError("warm_start and images must be true or false.")
    if not isinstance(config["payloads"], (list, str)) or not config["payloads"]:
        raise InputError("payloads must be a non-empty list of payloads or the path of a payload file or folder.")
    from .scorers import check_scorer_spec
    config["scorer"] = check_scorer_spec(config["scorer"])
    return config


def resolve(config: dict, host, base_dir: Path | None) -> dict:
    """Names -> files, the starting recipe, payloads read and their seeds fixed: what the run folder keeps.

    Returns a new config with a "resolved" section: {"recipe": the starting recipe, "family", "payloads",
    "notes"}. A config that already has one (a resumed run) is returned as it is.
    """
    if "resolved" in config:
        return config
    from .. import session
    from ..core.files import checkpoint_layout, file_hashes
    from ..engine.merge import resolve_model_path
    from ..engine.recipe import ModelRef, Recipe
    from .payloads import read_payloads, resolve_seeds
    config = copy.deepcopy(config)
    base_dir = Path(base_dir) if base_dir else Path.cwd()

    def ref(name: str) -> ModelRef:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if path.is_file():
            return ModelRef(name=path.name, path=str(path.resolve()))
        return ModelRef(name=name, path=str(host.resolve_checkpoint(name)))

    if config["recipe"] is not None:
        raw = config["recipe"]
        if isinstance(raw, str):
            p = Path(raw) if Path(raw).is_absolute() else base_dir / raw
            if not p.is_file():
                raise InputError(f"recipe: file not found: '{p}'.")
            recipe = Recipe.from_json(p.read_text(encoding="utf-8"))
        else:
            recipe = Recipe.from_dict(raw)
        for r in recipe.models + ([recipe.base] if recipe.base else []):
            if not (r.path and Path(r.path).is_file()):
                found = ref(r.name)
                r.path = found.path
        recipe = session.resolve_recipe(host, recipe)
    else:
        recipe = Recipe(method=config["method"], models=[ref(m) for m in config["models"]],
                        base=ref(config["base"]) if config["base"] else None, params=dict(config["params"]))
        recipe.validate()
    # hashes once, here: every candidate then carries them, so a trial's recipe hash is the "Model hash"
    # its images show, in this process and on any worker alike
    for r in recipe.models + ([recipe.base] if recipe.base else []):
        h = file_hashes(resolve_model_path(r, host.search_dirs()))
        r.sha256, r.short_hash = h["sha256"], h["short_hash"]
    family, _ = checkpoint_layout(resolve_model_path(recipe.models[0], host.search_dirs()))
    recipe.arch = family
    notes: list[str] = []   # fields ignored by the importers, seeds fixed: logged with the run
    payloads = read_payloads(config["payloads"], base_dir, notes)
    payloads, seed_notes = resolve_seeds(payloads, config["optimizer"]["seed"])
    notes += seed_notes
    if not [p for p in payloads if not p.holdout]:
        raise InputError("payloads: every payload is a holdout payload; at least one must score the trials.")
    config["resolved"] = {"recipe": recipe.to_dict(), "family": family,
                          "payloads": [p.to_dict() for p in payloads], "notes": notes,
                          "base_dir": str(base_dir)}
    return config
