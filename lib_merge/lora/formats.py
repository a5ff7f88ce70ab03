"""Reading LoRA files into one structure, ΔW of a module, architecture detection, and the kohya writer.

Read: kohya LoRA / LoCon (`<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`), PEFT / diffusers
(`<path>.lora_A.weight`, `.lora_B.weight`, names mapped to kohya module names), LyCORIS LoHa (`hada_w1_a`...)
and LoKr (`lokr_w1`...). Refused with an error that names what was found: DoRA, IA3, OFT/BOFT, GLoRA, Norm,
Full/diff, Tucker factors, old diffusers attention-processor LoRAs. Tensors are read lazily, one module at a time.

Alpha rules (kohya): a missing alpha is the rank (scale 1); a stored alpha of 0 is also taken as the rank,
with a warning (A1111 would give scale 0, kohya's trainer uses the rank). Ranks are per module.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..core.errors import CorruptFileError, InputError, OutputError, UnsupportedModelError
from . import keys as K

KINDS = ("lora", "locon", "loha", "lokr")


class UnsupportedLoraError(UnsupportedModelError):
    """A LoRA-like file whose algorithm Merge Lab does not turn into ΔW (DoRA, IA3, OFT, GLoRA...)."""


# suffix after `<module>.` -> role, per algorithm
_LORA = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_LOHA = {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "alpha": "alpha"}
_LOKR = {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a",
         "lokr_w2_b": "w2b", "alpha": "alpha"}
# suffixes we detect and refuse: suffix -> what it is
_REFUSED = {
    "dora_scale": "DoRA (weight-decomposed LoRA, `dora_scale`)",
    "lora_magnitude_vector": "DoRA (PEFT `lora_magnitude_vector`)",
    "lora_mid.weight": "LoCon with Tucker decomposition (`lora_mid`)",
    "hada_t1": "LoHa with Tucker decomposition (`hada_t1`)",
    "hada_t2": "LoHa with Tucker decomposition (`hada_t2`)",
    "lokr_t2": "LoKr with Tucker decomposition (`lokr_t2`)",
    "on_input": "IA3 (`on_input`)",
    "weight": "IA3 (`weight`)",
    "diff": "a full-weight diff (`diff`)",
    "diff_b": "a full-weight diff (`diff_b`)",
    "w_norm": "a Norm-layer network (`w_norm`)",
    "b_norm": "a Norm-layer network (`b_norm`)",
    "a1.weight": "GLoRA (`a1.weight`)", "a2.weight": "GLoRA (`a2.weight`)",
    "b1.weight": "GLoRA (`b1.weight`)", "b2.weight": "GLoRA (`b2.weight`)", "bm.weight": "GLoRA (`bm.weight`)",
    "oft_blocks": "OFT (`oft_blocks`)", "oft_diag": "OFT (`oft_diag`)", "oft_R": "BOFT (`oft_R`)",
    "rescale": "OFT (`rescale`)",
}
_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


@dataclass
class LoraModule:
    """One module of a LoRA: its algorithm, factor tensors (file keys or tensors), alpha and rank.

    `shape` is the shape of ΔW: (out, in) or (out, in, kh, kw); `kernel` is (kh, kw) for convolutions.
    `alpha` is the effective alpha (the rules above applied); `stored_alpha` what the file holds (None if absent).
    """
    name: str
    kind: str
    refs: dict[str, object]                     # role -> file key (str) or Tensor
    rank: int
    alpha: float
    shape: tuple[int, ...]
    kernel: tuple[int, int] | None = None
    stored_alpha: float | None = None
    reader: Callable[[str], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)  # role -> factor shape

    @property
    def part(self) -> str | None:
        return K.part_of(self.name)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 1.0

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    def tensor(self, role: str) -> torch.Tensor:
        ref = self.refs[role]
        if isinstance(ref, torch.Tensor):
            return ref
        if self.reader is None:
            raise InputError(f"{self.name}: its file is closed.")
        return self.reader(ref)

    def numel(self) -> int:
        """Parameters stored for this module (factors only, not alpha)."""
        total = 0
        for role, ref in self.refs.items():
            if role != "alpha":
                total += math.prod(self._shape_of(role))
        return total

    def _shape_of(self, role: str) -> tuple[int, ...]:
        ref = self.refs[role]
        if isinstance(ref, torch.Tensor):
            return tuple(ref.shape)
        return self.shapes[role]

    @classmethod
    def from_tensors(cls, name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None) -> "LoraModule":
        """A kohya LoRA/LoCon module from in-memory factors (alpha None or 0 -> rank)."""
        shapes = {"down": tuple(down.shape), "up": tuple(up.shape)}
        return _lora_module(name, {"down": down, "up": up}, shapes, None if alpha is None else float(alpha), [])


def _lora_module(name, refs, shapes, stored_alpha, warnings) -> LoraModule:
    if "down" not in refs or "up" not in refs:
        missing = "lora_up.weight" if "up" not in refs else "lora_down.weight"
        raise CorruptFileError(f"LoRA module '{name}' has no {missing}.")
    d, u = shapes["down"], shapes["up"]
    if len(d) not in (2, 4) or len(u) != len(d) or u[1] != d[0] or (len(u) == 4 and tuple(u[2:]) != (1, 1)):
        raise CorruptFileError(f"LoRA module '{name}': lora_down {list(d)} and lora_up {list(u)} do not fit together.")
    rank = d[0]
    kernel = tuple(d[2:]) if len(d) == 4 else None
    shape = (u[0], d[1]) + (kernel or ())
    kind = "locon" if kernel and kernel != (1, 1) else "lora"
    return LoraModule(name, kind, dict(refs), rank, _effective_alpha(name, stored_alpha, rank, warnings), shape,
                      kernel, stored_alpha, shapes=dict(shapes))


def _effective_alpha(name, stored, rank, warnings) -> float:
    if stored is None:
        return float(rank)
    if stored == 0:
        warnings.append(f"{name}: alpha is 0; taken as the rank {rank} (scale 1), as kohya does.")
        return float(rank)
    if not math.isfinite(stored):
        raise CorruptFileError(f"LoRA module '{name}' has a non-finite alpha ({stored}).")
    return float(stored)


# ------------------------------------------------------------------------------------------ delta

def compose(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up@down for linear, 1x1 and kxk conv: (out,r[,1,1]) x (r,in[,kh,kw]) -> (out,in[,kh,kw])."""
    if down.dim() == 2:
        return up @ down
    out, r = up.shape[0], up.shape[1]
    return (up.reshape(out, r) @ down.reshape(r, -1)).reshape(out, *down.shape[1:])


def delta(module: LoraModule, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """ΔW of a module at multiplier 1, shaped `module.shape`, computed in float32 (float64 if asked)."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32

    def t(role):
        return module.tensor(role).to(device=device, dtype=cdt)

    if module.kind in ("lora", "locon"):
        dw = compose(t("up"), t("down"))
    elif module.kind == "loha":
        dw = (t("w1a") @ t("w1b")) * (t("w2a") @ t("w2b"))
        dw = dw.reshape(module.shape)
    elif module.kind == "lokr":
        w1 = t("w1") if "w1" in module.refs else t("w1a") @ t("w1b")
        if "w2" in module.refs:
            w2 = t("w2")
        else:
            w2 = t("w2a") @ t("w2b")
            if len(module.shape) == 4:
                w2 = w2.reshape(w2.shape[0], -1, *module.shape[2:])
        if w2.dim() == 4:
            w1 = w1.reshape(*w1.shape, 1, 1)
        dw = torch.kron(w1, w2).reshape(module.shape)
    else:
        raise UnsupportedLoraError(f"{module.name}: unknown kind {module.kind}")
    return (dw * module.scale).to(dtype)


# ------------------------------------------------------------------------------------ the LoraFile

@dataclass
class LoraFile:
    """A LoRA opened lazily: `modules` by kohya name, `format` ('kohya' | 'peft' | 'lycoris'), `algos` found,
    `family` ('sd1' | 'sd2' | 'sdxl' | None), `metadata`, and `warnings` for the user."""
    path: Path | None
    format: str
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    family: str | None
    family_evidence: list[str]
    warnings: list[str]
    _file: object = field(default=None, repr=False)

    def delta(self, name: str, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
        return delta(self.modules[name], dtype, device)

    @classmethod
    def from_modules(cls, modules: Mapping[str, "LoraModule | tuple"], family: str | None, name: str = "merged",
                     metadata: dict[str, str] | None = None) -> "LoraFile":
        """A LoRA held in memory (e.g. a merge that is applied, not saved): {name: LoraModule or
        (down, up, alpha)}, as save_kohya takes them."""
        mods = {n: m if isinstance(m, LoraModule) else LoraModule.from_tensors(n, *m) for n, m in modules.items()}
        return cls(Path(name), "kohya", mods, dict(metadata or {}), family, ["made in memory"], [])

    def target(self, name: str, family: str | None = None) -> K.Target | None:
        fam = family or self.family
        return K.resolve(name, fam) if fam else None

    @property
    def algos(self) -> list[str]:
        return sorted({m.kind for m in self.modules.values()})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _split_kohya(key: str) -> tuple[str, str]:
    name, _, suffix = key.partition(".")
    return name, suffix


def open_lora(path) -> LoraFile:
    """Open a LoRA file (.safetensors, or a .pt/.ckpt through the safe loader) without reading its tensors."""
    from ..core.files import open_model
    mf = open_model(path)
    try:
        shapes = {k: tuple(i.shape) for k, i in mf.tensors.items()}
        lf = read_lora(shapes, mf.read, dict(mf.metadata), Path(path))
    except BaseException:
        mf.close()
        raise
    lf._file = mf
    return lf


def _scalar(reader, key) -> float:
    return float(reader(key).to(torch.float64).reshape(-1)[0]) if key else None


def read_lora(shapes: Mapping[str, tuple], reader: Callable[[str], torch.Tensor], metadata: dict[str, str],
              path: Path | None = None) -> LoraFile:
    """Group the keys of a LoRA state into modules. `shapes`: key -> shape; `reader(key)` gives a tensor
    (only alphas are read here)."""
    where = f"'{path.name}'" if path else "this LoRA"
    warnings: list[str] = []
    if not shapes:
        raise InputError(f"{where} holds no tensors.")
    peft = any(".lora_A." in k or ".lora_B." in k or k.endswith((".lora_A.weight", ".lora_B.weight")) for k in shapes)
    old_diffusers = [k for k in shapes if re.search(r"\.to_(q|k|v|out)_lora\.", k) or ".processor." in k]
    if old_diffusers:
        raise UnsupportedLoraError(
            f"{where} is an old diffusers attention-processor LoRA (e.g. '{old_diffusers[0]}'); "
            f"convert it to kohya or PEFT format first.")
    groups: dict[str, dict[str, str]] = {}
    ignored: list[str] = []
    if peft:
        fmt = "peft"
        sdxl = any(k.startswith("text_encoder_2.") for k in shapes)
        for k in shapes:
            m = re.match(r"^(.*)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$", k)
            if m:
                path_, role = m[1], {"lora_A": "down", "lora_B": "up"}[m[2]]
            elif k.endswith(".alpha"):
                path_, role = k[:-6], "alpha"
            elif "lora_magnitude_vector" in k:
                raise UnsupportedLoraError(f"{where} is {_REFUSED['lora_magnitude_vector']} (key '{k}'); "
                                           f"DoRA is not a plain ΔW, so Merge Lab does not read it.")
            else:
                ignored.append(k)
                continue
            name = K.peft_to_kohya(path_, sdxl)
            if name is None:
                raise UnsupportedLoraError(f"{where} is a PEFT LoRA for a model that is not an SD1/SD2/SDXL "
                                           f"U-Net or CLIP text encoder (module '{path_}').")
            groups.setdefault(name, {})[role] = k
    else:
        fmt = "kohya"
        refused: dict[str, list[str]] = {}
        for k in shapes:
            name, suffix = _split_kohya(k)
            if not name.startswith(_PREFIXES):
                if k.startswith("bundle_emb."):
                    ignored.append(k)
                    continue
                raise InputError(f"{where} does not look like a LoRA: key '{k}' has none of the prefixes "
                                 f"{', '.join(_PREFIXES)} and no PEFT lora_A/lora_B names.")
            if suffix in _REFUSED:
                refused.setdefault(_REFUSED[suffix], []).append(k)
                continue
            if suffix not in _LORA and suffix not in _LOHA and suffix not in _LOKR:
                refused.setdefault(f"an unknown tensor kind (`{suffix}`)", []).append(k)
                continue
            groups.setdefault(name, {})[suffix] = k
        if refused:
            what = "; ".join(f"{w}, e.g. '{ks[0]}' ({len(ks)} keys)" for w, ks in refused.items())
            raise UnsupportedLoraError(
                f"{where} uses a network type Merge Lab does not read: {what}. Supported: kohya LoRA/LoCon, "
                f"PEFT/diffusers LoRA, LyCORIS LoHa and LoKr.")
    if ignored:
        warnings.append(f"{len(ignored)} keys that are not LoRA factors were ignored (e.g. '{ignored[0]}').")

    modules: dict[str, LoraModule] = {}
    for name, parts in sorted(groups.items()):
        alpha_key = parts.get("alpha")
        if alpha_key is not None and math.prod(shapes[alpha_key]) != 1:
            raise CorruptFileError(f"{where}: the alpha of '{name}' is not a single number.")
        stored = _scalar(reader, alpha_key) if alpha_key else None
        if fmt == "peft":
            refs = {r: k for r, k in parts.items() if r != "alpha"}
            mshapes = {r: shapes[k] for r, k in refs.items()}
            if "down" in refs and "up" in refs and len(mshapes["up"]) == 4 and len(mshapes["down"]) == 4 \
                    and mshapes["up"][2:] != (1, 1):
                raise UnsupportedLoraError(f"{where}: module '{name}' has a lora_B with a kernel; not supported.")
            m = _lora_module(name, refs, mshapes, stored, warnings)
        else:
            suffixes = set(parts) - {"alpha"}
            if suffixes <= set(_LORA):
                refs = {_LORA[s]: parts[s] for s in suffixes}
                m = _lora_module(name, refs, {r: shapes[k] for r, k in refs.items()}, stored, warnings)
            elif suffixes <= set(_LOHA):
                m = _loha_module(name, {_LOHA[s]: parts[s] for s in suffixes}, shapes, stored, warnings, where)
            elif suffixes <= set(_LOKR):
                m = _lokr_module(name, {_LOKR[s]: parts[s] for s in suffixes}, shapes, stored, warnings, where)
            else:
                raise CorruptFileError(f"{where}: module '{name}' mixes tensors of different algorithms: "
                                       f"{', '.join(sorted(suffixes))}.")
        m.reader = reader
        modules[name] = m
    if not modules:
        raise InputError(f"{where} holds no LoRA modules.")
    if fmt == "kohya" and any(m.kind in ("loha", "lokr") for m in modules.values()):
        fmt = "lycoris"

    family, evidence, fam_warn = detect_family(modules, metadata)
    warnings.extend(fam_warn)
    if family:
        # shapes of LoHa/LoKr conv modules come from the checkpoint; check every module has a home
        missing = []
        for name, m in modules.items():
            tgt = K.resolve(name, family)
            if tgt is None:
                missing.append(name)
                continue
            if math.prod(tgt.delta_shape) == math.prod(m.shape) and tuple(m.shape) != tgt.delta_shape:
                m.shape = tgt.delta_shape
                if len(m.shape) == 4:
                    m.kernel = tuple(m.shape[2:])
        if missing:
            warnings.append(f"{len(missing)} modules have no key in an {family} checkpoint and will be skipped "
                            f"when applied (e.g. '{missing[0]}').")
    return LoraFile(path, fmt, modules, metadata, family, evidence, warnings)


def _need(parts, roles, name, where, algo):
    missing = [r for r in roles if r not in parts]
    if missing:
        raise CorruptFileError(f"{where}: {algo} module '{name}' lacks {', '.join(missing)}.")


def _loha_module(name, refs, shapes, stored, warnings, where) -> LoraModule:
    _need(refs, ("w1a", "w1b", "w2a", "w2b"), name, where, "LoHa")
    s = {r: shapes[k] for r, k in refs.items()}
    if any(len(s[r]) != 2 for r in ("w1a", "w1b", "w2a", "w2b")) or s["w1a"][1] != s["w1b"][0] \
            or s["w2a"][1] != s["w2b"][0] or s["w1a"][0] != s["w2a"][0] or s["w1b"][1] != s["w2b"][1]:
        raise CorruptFileError(f"{where}: LoHa module '{name}' has factors that do not fit together.")
    rank = s["w1b"][0]
    return LoraModule(name, "loha", dict(refs), rank, _effective_alpha(name, stored, rank, warnings),
                      (s["w1a"][0], s["w1b"][1]), None, stored, shapes=s)


def _lokr_module(name, refs, shapes, stored, warnings, where) -> LoraModule:
    s = {r: shapes[k] for r, k in refs.items()}
    if "w1" not in refs:
        _need(refs, ("w1a", "w1b"), name, where, "LoKr")
    if "w2" not in refs:
        _need(refs, ("w2a", "w2b"), name, where, "LoKr")
    w1 = s["w1"] if "w1" in s else (s["w1a"][0], s["w1b"][1])
    if "w2" in s:
        w2 = s["w2"]
    else:
        w2 = (s["w2a"][0], s["w2b"][1])
    shape = (w1[0] * w2[0], w1[1] * w2[1]) + tuple(w2[2:])
    # LyCORIS: the scale alpha/r uses the rank of the decomposed factor; both factors full -> scale 1
    rank = s["w1b"][0] if "w1b" in s else s["w2b"][0] if "w2b" in s else 0
    alpha = _effective_alpha(name, stored, rank, warnings) if rank else 0.0
    return LoraModule(name, "lokr", dict(refs), rank, alpha, shape, tuple(shape[2:]) or None, stored, shapes=s)


# ------------------------------------------------------------------------------- architecture

_META_FAMILY = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"))
_SPEC_FAMILY = (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))
_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _family_from_metadata(metadata: dict[str, str]) -> tuple[str | None, str]:
    v = str(metadata.get("ss_base_model_version", "")).lower()
    for prefix, fam in _META_FAMILY:
        if v.startswith(prefix):
            return fam, f"ss_base_model_version={v}"
    a = str(metadata.get("modelspec.architecture", "")).lower()
    for prefix, fam in _SPEC_FAMILY:
        if a.startswith(prefix):
            return fam, f"modelspec.architecture={a}"
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return "sd2", "ss_v2=True"
    return None, ""


def detect_family(modules: Mapping[str, LoraModule], metadata: dict[str, str]) -> tuple[str | None, list[str], list[str]]:
    """(family or None, evidence, warnings) from the module names and shapes, then the metadata.

    Keys first: te1/te2 modules => SDXL; the cross-attention context width (attn2 to_k/to_v input: 768 SD1,
    1024 SD2, 2048 SDXL) and the text-encoder width (768 SD1, 1024 SD2); then which families' checkpoints
    hold every module name; then `ss_base_model_version` / `modelspec.architecture` / `ss_v2`."""
    evidence: list[str] = []
    warnings: list[str] = []
    by_keys: str | None = None
    parts = {m.part for m in modules.values()}
    if parts & {"te1", "te2"}:
        by_keys, evidence = "sdxl", ["lora_te1_/lora_te2_ modules (two text encoders)"]
    if by_keys is None:
        for name, m in modules.items():
            if re.search(r"attn2_to_[kv]$", name) and m.part == "unet" and m.shape[1] in _CONTEXT_FAMILY:
                by_keys = _CONTEXT_FAMILY[m.shape[1]]
                evidence = [f"cross-attention context width {m.shape[1]} ({name})"]
                break
    if by_keys is None:
        for name, m in modules.items():
            if m.part == "te" and re.search(r"self_attn_q_proj$", name) and m.shape[1] in (768, 1024):
                by_keys = "sd1" if m.shape[1] == 768 else "sd2"
                evidence = [f"text-encoder width {m.shape[1]} ({name})"]
                break
    if by_keys is None:
        homes = [f for f in ("sd1", "sd2", "sdxl") if not K.unresolved(modules, f)]
        if len(homes) == 1:
            by_keys, evidence = homes[0], [f"module names exist only in {homes[0]} checkpoints"]
        elif homes == ["sd1", "sd2"] and all(m.part == "unet" for m in modules.values()):
            pass  # same U-Net names; leave it to the metadata
    by_meta, meta_ev = _family_from_metadata(metadata)
    if by_keys and by_meta and by_keys != by_meta:
        warnings.append(f"The metadata says {by_meta} ({meta_ev}) but the tensors say {by_keys}; using {by_keys}.")
    if by_keys:
        return by_keys, evidence, warnings
    if by_meta:
        return by_meta, [meta_ev], warnings
    homes = [f for f in ("sd1", "sd2", "sdxl") if not K.unresolved(modules, f)]
    if len(homes) > 1:
        return None, [f"module names fit {', '.join(homes)}; no width or metadata decides"], warnings
    return None, ["no evidence"], warnings


# ------------------------------------------------------------------------------------ writing

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                  "sdxl": "stable-diffusion-xl-v1-base/lora"}
MODELSPEC_IMPL = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}
RESOLUTION = {"sd1": "512x512", "sd2": "512x512", "sdxl": "1024x1024"}


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) computed as kohya's sd-scripts do, and the tensor order.

    Rule: serialise the tensors with `safetensors.torch.save` and only the `ss_*` metadata; the model hash is
    the SHA-256 of the bytes after the header (the tensor data), the legacy hash the first 8 hex digits of the
    SHA-256 of the 64 KiB at offset 1 MiB of that serialisation (of fewer bytes, or none, for a small file).
    The returned order is the tensor order of that serialisation; writing the file in that order makes its
    tensor data byte-identical, so sshs_model_hash is also the SHA-256 of the written file's data section."""
    import safetensors.torch
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    raw = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, ss or None)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    model_hash = hashlib.sha256(raw[8 + n:]).hexdigest()
    legacy = hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}, order


def _common(values):
    vals = set(values)
    if not vals:
        return None
    if len(vals) == 1:
        v = vals.pop()
        return v
    return "Dynamic"


def _fmt_num(v) -> str:
    if v == "Dynamic" or v is None:
        return str(v)
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def save_kohya(modules: Mapping[str, "LoraModule | tuple"], path, metadata: Mapping[str, str] | None = None, *,
               family: str | None = None, dtype: torch.dtype | None = None, title: str | None = None,
               overwrite: bool = False) -> Path:
    """Write kohya-format LoRA/LoCon safetensors (what the WebUI's built-in Lora extension loads).

    `modules`: kohya name -> LoraModule (kind lora/locon) or (down, up, alpha). Tensors: `<name>.lora_down.weight`,
    `<name>.lora_up.weight`, `<name>.alpha` (0-d float32). Metadata: the caller's, plus ss_network_module,
    ss_network_dim / ss_network_alpha (linear and 1x1 modules; "Dynamic" when they differ), ss_network_args
    (conv_dim / conv_alpha of 3x3 modules), ss_base_model_version, ss_v2, modelspec.*, sshs_model_hash and
    sshs_legacy_hash (see kohya_hashes). The file is written atomically and never over an existing one
    unless `overwrite`."""
    from ..core.files import save_state_dict
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise OutputError(f"A LoRA is written as .safetensors, not '{path.name}'.")
    if path.exists() and not overwrite:
        raise OutputError(f"'{path}' already exists. Choose another name or allow overwriting.")
    if not path.parent.is_dir():
        raise OutputError(f"The output folder '{path.parent}' does not exist.")
    if family is not None and family not in BASE_MODEL_VERSION:
        raise InputError(f"Unknown architecture '{family}': use sd1, sd2 or sdxl.")
    tensors: dict[str, torch.Tensor] = {}
    lin_dims, lin_alphas, conv_dims, conv_alphas = [], [], [], []
    for name, m in modules.items():
        if not isinstance(m, LoraModule):
            down, up, alpha = m
            m = LoraModule.from_tensors(name, down, up, alpha)
        if m.kind not in ("lora", "locon"):
            raise UnsupportedLoraError(f"'{name}' is {m.kind}: only LoRA/LoCon modules are written in kohya format "
                                       f"(convert it to a LoRA first).")
        if K.part_of(name) is None:
            raise InputError(f"'{name}' is not a kohya module name (lora_unet_..., lora_te_..., lora_te1_/te2_...).")
        down, up = m.tensor("down"), m.tensor("up")
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        tensors[f"{name}.lora_down.weight"] = down.detach().cpu().contiguous()
        tensors[f"{name}.lora_up.weight"] = up.detach().cpu().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
        if m.kind == "locon":
            conv_dims.append(m.rank), conv_alphas.append(m.alpha)
        else:
            lin_dims.append(m.rank), lin_alphas.append(m.alpha)
    if not tensors:
        raise InputError("No modules to write.")
    if family is None:
        mods = {n: (m if isinstance(m, LoraModule) else LoraModule.from_tensors(n, *m)) for n, m in modules.items()}
        family, _, _ = detect_family(mods, dict(metadata or {}))
    meta: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}
    dim, alpha = _common(lin_dims or conv_dims), _common(lin_alphas or conv_alphas)
    meta.update({"ss_network_module": "networks.lora", "ss_network_dim": _fmt_num(dim),
                 "ss_network_alpha": _fmt_num(alpha)})
    if conv_dims:
        meta["ss_network_args"] = json.dumps({"conv_dim": _fmt_num(_common(conv_dims)),
                                              "conv_alpha": _fmt_num(_common(conv_alphas))})
    else:
        meta.pop("ss_network_args", None)
    if family:
        # the caller's values stay when they name the same family (e.g. sd_v2_768_v, stable-diffusion-v2-768-v/lora)
        if _family_from_metadata({"ss_base_model_version": meta.get("ss_base_model_version", "")})[0] != family:
            meta["ss_base_model_version"] = BASE_MODEL_VERSION[family]
        if _family_from_metadata({"modelspec.architecture": meta.get("modelspec.architecture", "")})[0] != family:
            meta["modelspec.architecture"] = MODELSPEC_ARCH[family]
        meta["ss_v2"] = str(family == "sd2")
        meta.setdefault("modelspec.implementation", MODELSPEC_IMPL[family])
        meta.setdefault("modelspec.resolution", RESOLUTION[family])
    meta["modelspec.sai_model_spec"] = "1.0.0"
    meta["modelspec.title"] = title or meta.get("modelspec.title") or path.stem
    meta.setdefault("modelspec.date", time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()))
    for k in ("sshs_model_hash", "sshs_legacy_hash"):
        meta.pop(k, None)
    hashes, order = kohya_hashes(tensors, meta)
    meta.update(hashes)
    return save_state_dict({k: tensors[k] for k in order}, path, meta)

