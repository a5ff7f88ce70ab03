"""Recipes: pure data describing a merge, to and from JSON, safetensors metadata and infotext.

A recipe names its inputs (with sha256 and short hash once known), the method and its parameters, block
weights, seed, dtypes and the components merged. It goes into every saved file's metadata, twice:
`sd_merge_recipe` / `sd_merge_models` in the WebUI's own shape (so the WebUI and other tools show it), and
the full recipe under `merge_lab_recipe`, which `merge --recipe` reads back to redo the merge bit for bit.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.arch import COMPONENTS, TEXT_ENCODER, UNET
from ..core.errors import InputError

RECIPE_FORMAT = "merge-lab-recipe"
RECIPE_VERSION = 1
METADATA_KEY = "merge_lab_recipe"


@dataclass
class ModelRef:
    name: str                       # file name as the user knows it
    path: str | None = None         # where it was found (not needed to redo: names are resolved)
    sha256: str | None = None
    short_hash: str | None = None   # the WebUI's 10-hex-digit hash

    @classmethod
    def from_json(cls, d: Any) -> "ModelRef":
        if isinstance(d, str):
            return cls(name=d)
        if not isinstance(d, dict) or "name" not in d:
            raise InputError("Recipe: each model must be a name or an object with a 'name'.")
        return cls(name=str(d["name"]), path=d.get("path"), sha256=d.get("sha256"), short_hash=d.get("short_hash"))


@dataclass
class Recipe:
    method: str
    models: list[ModelRef]
    params: dict[str, Any] = field(default_factory=dict)
    blocks: dict[str, list[float]] = field(default_factory=dict)   # blockwise param name -> one value per block
    base: ModelRef | None = None
    seed: int = 0
    compute_dtype: str = "float32"
    dtype: str = "float16"
    components: list[str] = field(default_factory=lambda: [UNET, TEXT_ENCODER])
    missing_keys: str = "keep_a"     # keep_a | error
    nonfinite: str = "warn"          # warn | error
    mask: ModelRef | None = None     # a mask file (True = may change; elsewhere A's values are kept)
    layer_weights: dict | None = None  # {"param": name, "values": {key: value}}: per-key values of one parameter
    elemental: str | None = None     # SuperMerger's elemental ratios, "BLOCKS:ELEMENTS:RATIO, ..." (core/elemental.py)
    adjust: list[float] | None = None  # SuperMerger's Adjust: IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3
    arch: str | None = None          # filled in when the inputs are opened

    def validate(self) -> None:
        from ..methods.spec import get_method
        spec = get_method(self.method)
        spec.check_models(len(self.models), self.base is not None)
        self.params = spec.resolve_params(self.params)
        weights = self.params.get("weights")
        if weights is not None and len(weights) != len(self.models):
            raise InputError(f"{len(weights)} weights given for {len(self.models)} models: give one weight per model.")
        for name, values in self.blocks.items():
            if not isinstance(values, (list, tuple)):
                raise InputError(f"Recipe: blocks['{name}'] must be a list of numbers, one per block, not {values!r}.")
            p = spec.param(name)
            if not p.blockwise:
                raise InputError(f"{self.method}: parameter '{name}' cannot be set per block.")
            for v in values:
                p.coerce(v, self.method)
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad:
            raise InputError(f"Unknown component(s) {bad}: use {', '.join(COMPONENTS)}.")
        if self.compute_dtype not in ("float32", "float64"):
            raise InputError(f"Compute precision must be float32 or float64, not '{self.compute_dtype}'.")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise InputError(f"Output dtype must be float16, bfloat16 or float32, not '{self.dtype}'.")
        if self.missing_keys not in ("keep_a", "error"):
            raise InputError(f"missing_keys must be keep_a or error, not '{self.missing_keys}'.")
        if self.nonfinite not in ("warn", "error"):
            raise InputError(f"nonfinite must be warn or error, not '{self.nonfinite}'.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InputError(f"The seed must be an integer, not '{self.seed}'.")
        if self.elemental is not None:
            from ..core.elemental import parse_elemental
            if not isinstance(self.elemental, str):
                raise InputError("Recipe: elemental must be text, BLOCKS:ELEMENTS:RATIO entries.")
            if not spec.blockwise_params:
                raise InputError(f"{self.method} has no per-block parameter that elemental ratios could set.")
            parse_elemental(self.elemental, "sd1")   # the syntax now; SDXL's names (a subset) when planned
            self.elemental = self.elemental.strip() or None
        if self.adjust is not None:
            from ..core.elemental import check_adjust
            self.adjust = check_adjust(self.adjust)
        if self.layer_weights is not None:
            lw = self.layer_weights
            if not isinstance(lw, dict) or not isinstance(lw.get("values"), dict):
                raise InputError("Recipe: layer_weights must be {\"param\": name, \"values\": {key: number}}.")
            if not spec.blockwise_params:
                raise InputError(f"{self.method} has no parameter that per-key weights could set.")
            lw.setdefault("param", spec.blockwise_params[0])
            p = spec.param(lw["param"])
            if not p.blockwise:
                raise InputError(f"{self.method}: parameter '{p.name}' cannot be set per key.")
            lw["values"] = {str(k): p.coerce(v, self.method) for k, v in lw["values"].items()}

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = {"format": RECIPE_FORMAT, "version": RECIPE_VERSION}
        d.update(asdict(self))
        for optional in ("base", "mask", "layer_weights", "elemental", "adjust"):
            if d[optional] is None:
                d.pop(optional)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def public_dict(self) -> dict:
        """The recipe as it may travel (file metadata, infotexts, hashes): without local file paths."""
        d = self.to_dict()
        for m in d["models"] + [d[k] for k in ("base", "mask") if d.get(k)]:
            m.pop("path", None)
        return d

    def public_json(self, indent: int | None = None) -> str:
        return json.dumps(self.public_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any) -> "Recipe":
        if not isinstance(d, dict):
            raise InputError("A recipe must be a JSON object.")
        fmt = d.get("format", RECIPE_FORMAT)
        if fmt != RECIPE_FORMAT:
            raise InputError(f"This is not a Merge Lab recipe (format '{fmt}').")
        version = d.get("version", RECIPE_VERSION)
        if not isinstance(version, int) or version > RECIPE_VERSION:
            raise InputError(f"Recipe version {version} is newer than this Merge Lab understands ({RECIPE_VERSION}); update Merge Lab.")
        if "method" not in d or "models" not in d:
            raise InputError("A recipe needs 'method' and 'models'.")
        if not isinstance(d["method"], str):
            raise InputError(f"Recipe: 'method' must be a method's name, not {d['method']!r}.")
        if not isinstance(d.get("components", []), list):
            raise InputError(f"Recipe: 'components' must be a list of component names, not {d['components']!r}.")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known - {"format", "version"}
        if unknown:
            raise InputError(f"Unknown recipe field(s): {', '.join(sorted(unknown))}.")
        models = d["models"]
        if not isinstance(models, list):
            raise InputError("Recipe: 'models' must be a list.")
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["models"] = [ModelRef.from_json(m) for m in models]
        for name in ("base", "mask"):
            if d.get(name) is not None:
                kwargs[name] = ModelRef.from_json(d[name])
        if not isinstance(kwargs.get("params", {}), dict) or not isinstance(kwargs.get("blocks", {}), dict):
            raise InputError("Recipe: 'params' and 'blocks' must be objects.")
        r = cls(**kwargs)
        r.validate()
        return r

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"The recipe is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}).") from None
        except (ValueError, RecursionError) as e:   # a number of over 4300 digits; nesting too deep for the parser
            raise InputError(f"The recipe is not valid JSON: {e}.") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------------------------- metadata
    def metadata(self, input_metadata: list[dict[str, str]] | None = None,
                 legacy_hashes: list[str | None] | None = None) -> dict[str, str]:
        """safetensors metadata: our recipe plus the WebUI's `sd_merge_recipe` / `sd_merge_models`.

        Nested recipes of merged inputs are carried over into `sd_merge_models`, as the WebUI does.
        Nothing time-dependent goes in, so redoing a recipe gives the same file bytes.
        """
        refs = self.models + ([self.base] if self.base else [])
        webui = {
            "type": "merge-lab",
            "primary_model_hash": refs[0].sha256 if refs else None,
            "secondary_model_hash": refs[1].sha256 if len(refs) > 1 else None,
            "tertiary_model_hash": refs[2].sha256 if len(refs) > 2 else None,
            "interp_method": self.method,
            "multiplier": self.params.get("alpha"),
            "save_as_half": self.dtype == "float16",
            "bake_in_vae": None,
            "discard_weights": "",
            "is_inpainting": False,
            "is_instruct_pix2pix": False,
        }
        models: dict[str, dict] = {}
        for i, ref in enumerate(refs):
            meta = (input_metadata or [{}] * len(refs))[i] if input_metadata and i < len(input_metadata) else {}
            nested = None
            if meta.get("sd_merge_recipe"):
                try:
                    nested = json.loads(meta["sd_merge_recipe"])
                except ValueError:
                    nested = None
            if meta.get("sd_merge_models"):
                try:
                    models.update(json.loads(meta["sd_merge_models"]))
                except ValueError:
                    pass
            if ref.sha256:
                legacy = legacy_hashes[i] if legacy_hashes and i < len(legacy_hashes) else None
                models[ref.sha256] = {"name": ref.name, "legacy_hash": legacy, "sd_merge_recipe": nested}
        public = self.public_dict()  # local paths stay private
        return {
            "sd_merge_recipe": json.dumps(webui),
            "sd_merge_models": json.dumps(models),
            METADATA_KEY: json.dumps(public),
            "format": "pt",
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "Recipe | None":
        raw = metadata.get(METADATA_KEY)
        return cls.from_json(raw) if raw else None


INFOTEXT_MARKER = "Merge Lab recipe:"   # before the recipe in an image's infotext


def recipe_from_text(text: str, what: str = "the text", todo: str = "") -> "Recipe":
    """The recipe in a text: recipe JSON, a file's metadata as JSON (or `info --json` output, which holds it
    under "metadata"), or an image infotext holding `Merge Lab recipe: {...}` (quoted or not)."""
    text = (text or "").strip()
    at = text.lower().find(INFOTEXT_MARKER.lower())
    rest = text[at + len(INFOTEXT_MARKER):].lstrip() if at >= 0 else text
    decoder = json.JSONDecoder()
    if rest.startswith('"'):  # the WebUI quotes infotext values that hold commas
        try:
            inner, _ = decoder.raw_decode(rest)
            if isinstance(inner, str):
                rest = inner
        except ValueError:
            pass
    last_error = None
    for i, ch in enumerate(rest):
        if ch != "{":
            continue
        try:
            obj, _ = decoder.raw_decode(rest, i)
        except (ValueError, RecursionError) as e:
            last_error = last_error or e
            continue
        if not isinstance(obj, dict):
            continue
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else obj
        if isinstance(meta.get(METADATA_KEY), str):
            return Recipe.from_json(meta[METADATA_KEY])
        if "method" in obj and "models" in obj:
            return Recipe.from_dict(obj)
    hint = f" ({last_error.msg})" if isinstance(last_error, json.JSONDecodeError) else ""
    raise InputError(f"No Merge Lab recipe found in {what}{hint}" + (f": {todo}." if todo else "."))


def recipe_from_file(path) -> "Recipe":
    """The recipe of `merge --recipe FILE`: a merged .safetensors (its metadata), or a text file holding a recipe
    JSON, `info --json` output or an infotext."""
    from pathlib import Path
    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        from ..core.files import SafetensorsFile
        with SafetensorsFile(p) as f:
            recipe = Recipe.from_metadata(f.metadata)
        if recipe is None:
            raise InputError(f"'{p.name}' holds no Merge Lab recipe in its metadata (it was not merged by Merge Lab).")
        return recipe
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"Cannot read the recipe '{p}': {e.strerror}.") from None
    except UnicodeDecodeError:
        raise InputError(f"'{p.name}' is not a text file: give a recipe JSON, `info --json` output, or a merged "
                         f".safetensors.") from None
    return recipe_from_text(text, f"'{p.name}'", "give a recipe JSON, `info --json` output, or a merged .safetensors")
