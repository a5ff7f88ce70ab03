"""Kohya LoRA module names <-> checkpoint keys, built from the real checkpoint key lists (keysets).

A kohya module name is a prefix (`lora_unet`, `lora_te`, `lora_te1`, `lora_te2`) and the module's path with
every `.` turned into `_`. Two U-Net namings are in use and both are mapped:

* LDM (checkpoint) naming: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` (SDXL files);
* diffusers naming: `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` (most SD1/SD2 files).

Text encoders use Hugging Face CLIP naming (`text_model_encoder_layers_N_self_attn_q_proj`, `mlp_fc1`...).
For OpenCLIP encoders (SD2's, SDXL's second) the checkpoint fuses q/k/v into `attn.in_proj_weight`; the
q/k/v modules map to its row slices [0,d), [d,2d), [2d,3d).

Nothing is guessed from underscores: every name is derived from a key of core.keysets.checkpoint_keys(family)
(the A1111 approach of a map built from the model's own module names).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

UNET = "lora_unet_"
PARTS = ("unet", "te", "te1", "te2")
PREFIX_OF_PART = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}


@dataclass(frozen=True)
class Target:
    """Where a LoRA module's ΔW goes in a checkpoint: `key` (a weight), rows [r0, r1) of it or all, its full shape."""
    key: str
    shape: tuple[int, ...]          # shape of the checkpoint tensor `key`
    rows: tuple[int, int] | None = None

    @property
    def delta_shape(self) -> tuple[int, ...]:
        if self.rows is None:
            return self.shape
        return (self.rows[1] - self.rows[0],) + self.shape[1:]


def part_of(name: str) -> str | None:
    """'unet' | 'te' | 'te1' | 'te2' for a kohya module name, None for anything else."""
    for part in ("te1", "te2", "te", "unet"):
        if name.startswith(PREFIX_OF_PART[part]):
            return part
    return None


# ------------------------------------------------------------------------------------------ U-Net

_RESNET_RENAMES = (("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                   ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))


def _resnet(rest: str) -> str:
    for old, new in _RESNET_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def ldm_to_diffusers_unet(path: str) -> str | None:
    """`input_blocks.1.1.proj_in.weight` -> `down_blocks.0.attentions.0.proj_in.weight` (None when it has no
    diffusers name). Valid for SD1/SD2 (4 levels, 2 layers) and SDXL (3 levels, 2 layers): input block
    n = 1 + 3i + j, downsampler of level i at input block 3 + 3i, output block n = 3i + j."""
    m = re.match(r"^input_blocks\.(\d+)\.(\d+)\.(.*)$", path)
    if m:
        n, sub, rest = int(m[1]), int(m[2]), m[3]
        if n == 0:
            return "conv_in." + rest
        if rest.startswith("op."):
            return f"down_blocks.{(n - 3) // 3}.downsamplers.0.conv." + rest[3:]
        i, j = (n - 1) // 3, (n - 1) % 3
        if sub == 0:
            return f"down_blocks.{i}.resnets.{j}." + _resnet(rest)
        return f"down_blocks.{i}.attentions.{j}." + rest
    m = re.match(r"^middle_block\.(\d+)\.(.*)$", path)
    if m:
        sub, rest = int(m[1]), m[2]
        if sub == 1:
            return "mid_block.attentions.0." + rest
        return f"mid_block.resnets.{sub // 2}." + _resnet(rest)
    m = re.match(r"^output_blocks\.(\d+)\.(\d+)\.(.*)$", path)
    if m:
        n, sub, rest = int(m[1]), int(m[2]), m[3]
        i, j = n // 3, n % 3
        if sub == 0:
            return f"up_blocks.{i}.resnets.{j}." + _resnet(rest)
        if rest.startswith("conv."):  # the upsampler: output_blocks.{3i+2}.{1|2}.conv
            return f"up_blocks.{i}.upsamplers.0.conv." + rest[5:]
        return f"up_blocks.{i}.attentions.{j}." + rest
    m = re.match(r"^time_embed\.(\d+)\.(.*)$", path)
    if m:
        return f"time_embedding.linear_{int(m[1]) // 2 + 1}." + m[2]
    m = re.match(r"^label_emb\.0\.(\d+)\.(.*)$", path)
    if m:
        return f"add_embedding.linear_{int(m[1]) // 2 + 1}." + m[2]
    if path.startswith("out.2."):
        return "conv_out." + path[6:]
    return None


# ------------------------------------------------------------------------------------ text encoders

_TE_PREFIXES = {
    "sd1": {"cond_stage_model.transformer.": "lora_te_"},
    "sd2": {"cond_stage_model.model.": "lora_te_"},
    "sdxl": {"conditioner.embedders.0.transformer.": "lora_te1_", "conditioner.embedders.1.model.": "lora_te2_"},
}
_OPENCLIP_RENAMES = (("attn.out_proj.", "self_attn.out_proj."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))


def _te_names(path: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, int] | None]]:
    """Module paths (HF CLIP naming, dots) of a text-encoder weight path (after the encoder prefix)."""
    if path.startswith("text_model.encoder.layers."):
        return [(path[:-len(".weight")], None)] if path.endswith(".weight") else []
    m = re.match(r"^transformer\.resblocks\.(\d+)\.(.*)$", path)
    if not m:
        return []
    layer, rest = m[1], m[2]
    base = f"text_model.encoder.layers.{layer}."
    if rest == "attn.in_proj_weight":
        d = shape[0] // 3
        return [(base + f"self_attn.{p}_proj", (k * d, (k + 1) * d)) for k, p in enumerate("qkv")]
    if not rest.endswith(".weight"):
        return []
    rest = rest[:-len("weight")]  # keep the dot: "mlp.c_fc."
    for old, new in _OPENCLIP_RENAMES:
        if rest == old:
            return [(base + new[:-1], None)]
    return []


# ------------------------------------------------------------------------------------------ the map

@lru_cache(maxsize=None)
def module_map(family: str) -> dict[str, Target]:
    """Every kohya module name a LoRA of `family` can hold -> its checkpoint Target.

    U-Net: every 2-D/4-D weight of `model.diffusion_model.` under both its LDM and diffusers names;
    text encoders: every Linear of the encoder layers (attention q/k/v/out, MLP fc1/fc2)."""
    from ..core.keysets import checkpoint_keys
    out: dict[str, Target] = {}
    for spec in checkpoint_keys(family, with_optional=True):
        key, shape = spec.key, tuple(spec.shape)
        if key.startswith("model.diffusion_model."):
            if len(shape) not in (2, 4) or not key.endswith(".weight"):
                continue
            path = key[len("model.diffusion_model."):]
            target = Target(key, shape)
            out[UNET + path[:-len(".weight")].replace(".", "_")] = target
            diff = ldm_to_diffusers_unet(path)
            if diff is not None:
                out.setdefault(UNET + diff[:-len(".weight")].replace(".", "_"), target)
            continue
        for prefix, lora_prefix in _TE_PREFIXES[family].items():
            if key.startswith(prefix) and len(shape) == 2:
                for mod, rows in _te_names(key[len(prefix):], shape):
                    out[lora_prefix + mod.replace(".", "_")] = Target(key, shape, rows)
    return out


def resolve(name: str, family: str) -> Target | None:
    """The checkpoint Target of kohya module `name` in `family`, or None."""
    return module_map(family).get(name)


def unresolved(names, family: str) -> list[str]:
    """The names of `names` that have no checkpoint key in `family`."""
    m = module_map(family)
    return [n for n in names if n not in m]


# ------------------------------------------------------------------------------ PEFT / diffusers names

_PEFT_PREFIXES = (
    ("base_model.model.text_model.", "lora_te_", "text_model."),
    ("text_encoder_2.", "lora_te2_", ""),
    ("text_encoder.", "lora_te_", ""),
    ("base_model.model.", "lora_unet_", ""),
    ("unet.", "lora_unet_", ""),
    ("transformer.", None, ""),  # a DiT (Flux/SD3) LoRA: not an SD U-Net
)


def peft_to_kohya(path: str, sdxl: bool = False) -> str | None:
    """A PEFT/diffusers module path (`unet.down_blocks.0.attentions.0.proj_in`,
    `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`, `base_model.model.down_blocks...`) -> the kohya
    module name, or None when it is not an SD U-Net / CLIP module. `sdxl` makes `text_encoder.` te1."""
    for prefix, lora_prefix, keep in _PEFT_PREFIXES:
        if path.startswith(prefix):
            if lora_prefix is None:
                return None
            if lora_prefix == "lora_te_" and sdxl:
                lora_prefix = "lora_te1_"
            rest = keep + path[len(prefix):]
            return lora_prefix + rest.replace(".", "_")
    if path.startswith(("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.")):
        return UNET + path.replace(".", "_")
    if path.startswith("text_model."):
        return "lora_te_" + path.replace(".", "_")
    return None
