"""Architectures: detection from keys, components, blocks and key -> block.

Facts used by the whole ecosystem (SuperMerger, Model Mixer, autoMBW):
SD1.x/SD2.x have 26 block weights BASE, IN00..IN11, M00, OUT00..OUT11; SDXL has 20: BASE, IN00..IN08, M00,
OUT00..OUT08. Inside `model.diffusion_model.`: `input_blocks.N.` -> IN N, `middle_block.` -> M00,
`output_blocks.N.` -> OUT N, `time_embed.` (and SDXL `label_emb.`) -> IN00, `out.` -> the last OUT block.
Text encoders -> BASE. The VAE is its own component.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .errors import ArchitectureMismatchError, UnsupportedModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Component names: what a user ticks in the UI ("UNet / text encoder / VAE").
UNET, TEXT_ENCODER, VAE, OTHER = "unet", "text_encoder", "vae", "other"
COMPONENTS = (UNET, TEXT_ENCODER, VAE)


@dataclass(frozen=True)
class Architecture:
    family: str                 # "sd1" | "sd2" | "sdxl"
    variant: str = ""           # "" | "inpainting" | "instruct-pix2pix"
    text_encoders: tuple[str, ...] = ()  # prefixes of the text encoders
    n_in: int = 12              # number of input blocks (12 for SD1/SD2, 9 for SDXL)

    @property
    def label(self) -> str:
        names = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
        return names[self.family] + (f" {self.variant}" if self.variant else "")

    @property
    def blocks(self) -> list[str]:
        return block_names(self.family)

    def compatible_with(self, other: "Architecture") -> bool:
        # inpainting / pix2pix variants merge with their base family (extra input channels kept from A)
        return self.family == other.family


def block_names(family: str) -> list[str]:
    n = 9 if family == "sdxl" else 12
    return (["BASE"] + [f"IN{i:02d}" for i in range(n)] + ["M00"] + [f"OUT{i:02d}" for i in range(n)])


FAMILY_BLOCK_COUNT = {"sd1": 26, "sd2": 26, "sdxl": 20}

_IN_RE = re.compile(r"^input_blocks\.(\d+)\.")
_OUT_RE = re.compile(r"^output_blocks\.(\d+)\.")


def component_of(key: str) -> str:
    if key.startswith(UNET_PREFIX):
        return UNET
    if key.startswith(("cond_stage_model.", "conditioner.")):
        return TEXT_ENCODER
    if key.startswith(VAE_PREFIX):
        return VAE
    return OTHER


def block_of(key: str, family: str) -> str | None:
    """The MBW block of a checkpoint key, or None for keys outside UNet and text encoders (VAE, others).

    Block numbers are matched with their trailing dot, so `input_blocks.1.` never catches
    `input_blocks.10.`.
    """
    comp = component_of(key)
    if comp == TEXT_ENCODER:
        return "BASE"
    if comp != UNET:
        return None
    rest = key[len(UNET_PREFIX):]
    last = 8 if family == "sdxl" else 11
    if rest.startswith(("time_embed.", "label_emb.")):
        return "IN00"
    if rest.startswith("middle_block."):
        return "M00"
    if rest.startswith("out."):
        return f"OUT{last:02d}"
    m = _IN_RE.match(rest)
    if m:
        return f"IN{int(m.group(1)):02d}"
    m = _OUT_RE.match(rest)
    if m:
        return f"OUT{int(m.group(1)):02d}"
    return None


# --------------------------------------------------------------------------------------- detection

_UNSUPPORTED_MARKERS = [
    ("model.diffusion_model.joint_blocks.", "Stable Diffusion 3"),
    ("joint_blocks.", "Stable Diffusion 3"),
    ("double_blocks.", "Flux"),
    ("model.diffusion_model.double_blocks.", "Flux"),
    ("single_transformer_blocks.", "Flux (diffusers layout)"),
    ("transformer_blocks.0.ff_context.", "Stable Diffusion 3 (diffusers layout)"),
    ("down_blocks.", "a diffusers-layout UNet"),
    ("lora_unet_", "a LoRA (use the LoRA tools, not the checkpoint merger)"),
    ("lora_te_", "a LoRA (use the LoRA tools, not the checkpoint merger)"),
    ("base_model.model.", "a PEFT LoRA (use the LoRA tools, not the checkpoint merger)"),
    ("encoder.down.", "a standalone VAE"),
    ("decoder.up.", "a standalone VAE"),
    ("down_blocks.0.", "a diffusers-layout model"),
    ("model.diffusion_model.input_blocks.0.0.", None),  # SD-style UNet: handled below
]


def detect(shapes: Mapping[str, tuple[int, ...]], name: str = "model") -> Architecture:
    """Architecture of a checkpoint from its keys (and a few shapes). Raises UnsupportedModelError."""
    keys = shapes.keys()
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        family, tes = "sdxl", ("conditioner.embedders.0.", "conditioner.embedders.1.")
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        family, tes = "sd2", ("cond_stage_model.model.",)
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
        family, tes = "sd1", ("cond_stage_model.transformer.",)
    elif any(k.startswith(UNET_PREFIX + "input_blocks.") for k in keys):
        # UNet-only file (no text encoder): tell SD1/SD2/SDXL apart from the UNet itself
        family, tes = _family_from_unet(shapes), ()
    else:
        raise UnsupportedModelError(f"'{name}' is {_guess_other(keys)}, which Merge Lab does not merge. "
                                    f"Supported: SD1.x, SD2.x and SDXL checkpoints.")
    n_in = 9 if family == "sdxl" else 12
    variant = ""
    first = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if first is not None and len(first) == 4:
        if first[1] == 9:
            variant = "inpainting"
        elif first[1] == 8:
            variant = "instruct-pix2pix"
    return Architecture(family, variant, tes, n_in)


def _family_from_unet(shapes) -> str:
    if any(k.startswith(UNET_PREFIX + "label_emb.") for k in shapes) and not any(
            k.startswith(UNET_PREFIX + "input_blocks.9.") for k in shapes):
        return "sdxl"
    k = shapes.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if k is not None and len(k) == 2 and k[1] == 1024:
        return "sd2"
    return "sd1"


def _guess_other(keys: Iterable[str]) -> str:
    keys = list(keys)
    for marker, what in _UNSUPPORTED_MARKERS:
        if what and any(k.startswith(marker) or ("." + marker) in k for k in keys[:5000]):
            return what
    if not keys:
        return "empty (it holds no tensors)"
    return "not a Stable Diffusion checkpoint we recognise"


def check_same_family(archs: list[tuple[str, Architecture]]) -> Architecture:
    """All models must share one family; the message names every architecture involved."""
    first_name, first = archs[0]
    for name, arch in archs[1:]:
        if not first.compatible_with(arch):
            raise ArchitectureMismatchError(
                f"Cannot merge '{first_name}' ({first.label}) with '{name}' ({arch.label}): "
                f"models of different architectures do not share their weights. Pick models of one family.")
    return first


@dataclass
class ComponentSummary:
    tensors: int = 0
    params: int = 0
    keys: list[str] = field(default_factory=list)


def summarize_components(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, ComponentSummary]:
    out: dict[str, ComponentSummary] = {}
    for key, shape in shapes.items():
        comp = component_of(key)
        s = out.setdefault(comp, ComponentSummary())
        s.tensors += 1
        n = 1
        for d in shape:
            n *= d
        s.params += n
    return out
