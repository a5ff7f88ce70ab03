"""Tiny runnable checkpoints: every real key name of a family with small consistent shapes, so diffusers
can build and run them (the demo models, the standalone app's tests)."""
from __future__ import annotations

import math
import re

import torch

from .configs import DEFAULT_SIZE, TEXT_PREFIXES, VAE_SCALING, ModelSpec, TextSpec, _heads, _text_heads
from .convert import _targets, key_map

# ------------------------------------------------------------------------------------- tiny runnable models

def runnable_keys(family: str) -> list[str]:
    """The keys of a complete checkpoint: core.keysets.checkpoint_keys(family, with_optional=True) without the
    optional UNet-side markers of special variants (SDXL's `v_pred`, `ztsnr`, `edm_vpred.*`)."""
    from ..core.keysets import checkpoint_keys
    return [k.key for k in checkpoint_keys(family, with_optional=True)
            if not (k.optional and k.component == "diffuser")]


def tiny_spec(family: str, variant: str = "") -> ModelSpec:
    """The configs of make_runnable_state_dict: real block structure (so the real key names), small
    widths (UNet 32/64/128(/128), VAE 32/64/128/128, text encoders 32 or 64 wide)."""
    if family not in TEXT_PREFIXES:
        raise ValueError(f"unknown family {family}")
    vae = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [32, 64, 128, 128],
           "layers_per_block": 2, "latent_channels": 4, "sample_size": DEFAULT_SIZE[family],
           "scaling_factor": VAE_SCALING[family]}

    def text(name, prefix, layout, tok, width, layers, in_ckpt, with_proj=False):
        return TextSpec(name, prefix, layout, tok,
                        dict(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                             num_attention_heads=_text_heads(width), max_position_embeddings=77,
                             hidden_act="quick_gelu" if layout == "hf" else "gelu", projection_dim=width,
                             layer_norm_eps=1e-5), with_proj, in_ckpt)
    in_ch = 9 if variant == "inpainting" else 4
    if family == "sdxl":
        blocks = [32, 64, 128]
        unet = {"sample_size": 128, "in_channels": in_ch, "out_channels": 4,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": blocks, "layers_per_block": 2, "cross_attention_dim": 32 + 64,
                "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
                "attention_head_dim": [_heads(c, family) for c in blocks], "upcast_attention": False,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 6 * 8 + 64}
        texts = [text("text_encoder", TEXT_PREFIXES[family][0][1], "hf", "clip_l", 32, 12, 12),
                 text("text_encoder_2", TEXT_PREFIXES[family][1][1], "open_clip", "open_clip", 64, 32, 32, True)]
    else:
        blocks = [32, 64, 128, 128]
        unet = {"sample_size": 64, "in_channels": in_ch, "out_channels": 4,
                "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                "block_out_channels": blocks, "layers_per_block": 2, "cross_attention_dim": 32,
                "transformer_layers_per_block": [1, 1, 1, 1], "use_linear_projection": family == "sd2",
                "attention_head_dim": 8 if family == "sd1" else [_heads(c, family) for c in blocks],
                "upcast_attention": family == "sd2"}
        if family == "sd1":
            texts = [text("text_encoder", TEXT_PREFIXES[family][0][1], "hf", "clip_l", 32, 12, 12)]
        else:
            texts = [text("text_encoder", TEXT_PREFIXES[family][0][1], "open_clip", "open_clip", 32, 23, 24)]
    return ModelSpec(family, variant, unet, vae, texts)


def make_runnable_state_dict(family: str, seed: int = 0, *, variant: str = "") -> dict[str, torch.Tensor]:
    """A tiny checkpoint with every real key name of `family` (core.keysets.checkpoint_keys(family,
    with_optional=True)) and consistent small shapes, so that it builds into diffusers modules and generates.

    Weights: the modules' own default initialisation under torch.manual_seed(seed) (the global RNG is saved and
    restored); keys generation does not use (position_ids, logit_scale, SD2's last text layer and projection)
    get arange / small random values from the same seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = tiny_spec(family, variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = {"unet": UNet2DConditionModel(**spec.unet), "vae": AutoencoderKL(**spec.vae)}
        for t in spec.texts:
            cls = CLIPTextModelWithProjection if t.with_projection else CLIPTextModel
            modules[t.name] = cls(CLIPTextConfig(**t.config))
    for m in modules.values():
        m.requires_grad_(False)
    keys = runnable_keys(family)
    kmap = key_map(keys, spec)
    targets = _targets(modules, kmap, {})
    g = torch.Generator().manual_seed(seed + 7919)
    sd: dict[str, torch.Tensor] = {}
    for key in keys:
        if key in targets:
            sd[key] = targets[key].detach().clone().contiguous()
    for key in keys:
        if key in sd:
            continue
        if key.endswith("position_ids"):
            sd[key] = torch.arange(77, dtype=torch.int64).reshape(1, 77)
        elif key.endswith("logit_scale"):
            sd[key] = torch.tensor(math.log(100.0))
        elif key.endswith("text_projection"):
            width = next(t.config["hidden_size"] for t in spec.texts if key.startswith(t.prefix))
            sd[key] = torch.randn(width, width, generator=g) * width ** -0.5
        else:   # an unused last text layer: shaped as layer 0
            twin = re.sub(r"resblocks\.\d+\.", "resblocks.0.", key)
            twin = re.sub(r"layers\.\d+\.", "layers.0.", twin)
            ref = sd.get(twin)
            if ref is None:
                raise AssertionError(f"tiny model: no rule for {key}")
            sd[key] = torch.randn(ref.shape, generator=g) * 0.02 + (1.0 if key.endswith(("ln_1.weight", "ln_2.weight")) else 0.0)
    return {k: sd[k] for k in keys}
