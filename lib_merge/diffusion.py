"""Standalone image generation: a merged state dict in checkpoint key names -> diffusers modules -> images.

    state dict (model.diffusion_model.*, first_stage_model.*, cond_stage_model.* / conditioner.embedders.*)
      --derive_spec (configs from the tensors' shapes)--> ModelSpec
      --Generator.load (build modules once per spec, then copy weights in place)--> UNet, VAE, text encoder(s)
      --Generator.generate(GenerationRequest)--> PIL images + WebUI-style infotexts

Nothing is downloaded: every config is derived from the tensors' shapes (rules below and in
docs/GENERATION.md), tokenizers come from lib_merge.tokenizers. diffusers and transformers are imported
inside functions only, so importing this module costs nothing.

Live re-merges: `Generator.module_targets()` maps each checkpoint key to the live tensor it is loaded into
(a view where the layouts differ: the VAE's 1x1 convolutions are linear layers in diffusers, OpenCLIP's fused
`in_proj_weight` is the q/k/v projections, which are built as views of one fused tensor, `text_projection`
is a transposed linear weight). `engine.TensorSink(generator.module_targets())` therefore merges straight
into the modules; `Generator.prepare(shapes)` builds the modules from shapes alone for a first merge.

Configs derived from shapes (the weights do not say everything; the rules are those of the released models):
- UNet: block_out_channels from each level's first resnet, layers_per_block from where the first
  downsampler sits, attention per level from `input_blocks.N.1.proj_in`, transformer depth per level
  (SDXL 1/2/10) from the `transformer_blocks.K` present, cross_attention_dim from attn2.to_k,
  use_linear_projection from proj_in's rank, in/out channels (4, 9 for inpainting), time embedding width;
  SDXL: addition_embed_type "text_time", projection_class_embeddings_input_dim from label_emb and
  addition_time_embed_dim = (that - pooled width) / 6 (256 for SDXL).
  Attention heads: SD1 has 8 heads per block (8 if the channels divide by 8, else 1); SD2 and SDXL have heads
  of width 64 (channels // 64 when the channels divide by 64, else 1 head: tiny test models).
- VAE: block_out_channels, layers_per_block, latent channels from the tensors; scaling factor 0.18215
  (SD1, SD2) or 0.13025 (SDXL).
- Text encoders: vocabulary, width, layers, MLP width and positions from the tensors; heads of width 64
  (width // 64, else 1 head); activation quick_gelu for OpenAI CLIP (SD1, SDXL's first), gelu for OpenCLIP
  (SD2, SDXL's second). SD2 uses the penultimate of OpenCLIP-H's 24 layers (built with 23 layers,
  as diffusers does), then the final layer norm. SDXL takes the penultimate hidden state of both encoders
  (no final norm) and the pooled, projected output of the second.
"""
from __future__ import annotations

import inspect
import json
import math
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from .errors import CancelledError, InputError, MergeError, UnsupportedModelError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT_PREFIXES = {
    "sd1": [("text_encoder", "cond_stage_model.transformer.", "hf", "clip_l")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "open_clip", "open_clip")],
    "sdxl": [("text_encoder", "conditioner.embedders.0.transformer.", "hf", "clip_l"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "open_clip", "open_clip")],
}
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
DEFAULT_SIZE = {"sd1": 512, "sd2": 512, "sdxl": 1024}

# SD's training noise schedule, shared by every sampler
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# WebUI sampler name -> (diffusers scheduler class, its options). "linspace" spacing is the k-diffusion
# schedule the WebUI's samplers use (timesteps spread evenly over 999..0); DDIM / PLMS use the original
# "leading" spacing with steps_offset 1, as the LDM code does.
_K = dict(timestep_spacing="linspace", steps_offset=1)   # (steps_offset: no effect with linspace; silences a diffusers warning)
_LDM = dict(timestep_spacing="leading", steps_offset=1)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", _K),
    "Euler": ("EulerDiscreteScheduler", _K),
    "Heun": ("HeunDiscreteScheduler", _K),
    "LMS": ("LMSDiscreteScheduler", _K),
    "LMS Karras": ("LMSDiscreteScheduler", dict(_K, use_karras_sigmas=True)),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", dict(_K, algorithm_type="dpmsolver++", solver_order=2)),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler",
                        dict(_K, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", dict(_K, algorithm_type="sde-dpmsolver++", solver_order=2)),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler",
                            dict(_K, algorithm_type="sde-dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "UniPC": ("UniPCMultistepScheduler", _K),
    "DDIM": ("DDIMScheduler", dict(_LDM, clip_sample=False, set_alpha_to_one=False)),
    "PLMS": ("PNDMScheduler", dict(_LDM, skip_prk_steps=True, set_alpha_to_one=False)),
}
SAMPLER_NAMES = list(SAMPLERS)
CHUNK_TOKENS = 75   # prompts longer than this are encoded in chunks of 75 tokens, as the WebUI does


def _heads(channels: int, family: str) -> int:
    if family == "sd1":
        return 8 if channels % 8 == 0 else 1
    return channels // 64 if channels % 64 == 0 else 1


def _text_heads(width: int) -> int:
    return width // 64 if width % 64 == 0 else 1


# ------------------------------------------------------------------------------------- specs from shapes

@dataclass
class TextSpec:
    name: str                 # "text_encoder" | "text_encoder_2" (the diffusers component names)
    prefix: str               # checkpoint prefix
    layout: str               # "hf" (OpenAI CLIP in transformers names) | "open_clip" (fused in_proj)
    tokenizer: str            # "clip_l" | "open_clip" (lib_merge.tokenizers kinds)
    config: dict              # transformers.CLIPTextConfig kwargs
    with_projection: bool     # CLIPTextModelWithProjection (SDXL's pooled prompt embedding)
    layers_in_checkpoint: int  # transformer layers the checkpoint has (the model may use fewer / one more)


@dataclass
class ModelSpec:
    family: str
    variant: str              # "" | "inpainting" | "instruct-pix2pix"
    unet: dict                # diffusers.UNet2DConditionModel kwargs
    vae: dict                 # diffusers.AutoencoderKL kwargs
    texts: list[TextSpec] = field(default_factory=list)
    prediction_type: str = "epsilon"   # "v_prediction" when the checkpoint has a `v_pred` key (SDXL v-pred models)
    zero_snr: bool = False             # a `ztsnr` key: zero terminal SNR noise schedule

    def signature(self) -> str:
        """Equal signatures = the same module shapes (weights can be loaded in place)."""
        return json.dumps({"family": self.family, "unet": self.unet, "vae": self.vae,
                           "texts": [(t.name, t.layout, t.config, t.with_projection) for t in self.texts]},
                          sort_keys=True, default=list)


_OLD_CLIP = ("embeddings.", "encoder.", "final_layer_norm.")


def canonical_key(key: str) -> str:
    """Old SD1 files name the text encoder without 'text_model.' (cond_stage_model.transformer.encoder.…); the
    WebUI renames them on load, so do we."""
    for prefix in ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."):
        if key.startswith(prefix) and key[len(prefix):].startswith(_OLD_CLIP):
            return prefix + "text_model." + key[len(prefix):]
    return key


def _indices(shapes: Iterable[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes for m in [rx.match(k)] if m})


def _need(shapes: Mapping[str, tuple], key: str, what: str) -> tuple[int, ...]:
    s = shapes.get(key)
    if s is None:
        raise MergeError(f"The model has no '{key}', so {what} cannot be built for generation. "
                         f"Load a complete checkpoint (UNet, VAE and text encoders), or merge from one.")
    return tuple(s)


def _unet_spec(shapes: Mapping[str, tuple], family: str, variant: str) -> dict:
    if not any(k.startswith(UNET) for k in shapes):
        raise MergeError("The model has no UNet (no 'model.diffusion_model.*' keys): generation needs a full "
                         "checkpoint. Merge the UNet too, or load a complete checkpoint.")
    P = UNET
    conv_in = _need(shapes, P + "input_blocks.0.0.weight", "the UNet")
    n_in = len(_indices(shapes, r"^model\.diffusion_model\.input_blocks\.(\d+)\."))
    downs = [i for i in range(n_in) if P + f"input_blocks.{i}.0.op.weight" in shapes]
    per = (downs[0] if downs else n_in) - 1          # resnets per level = layers_per_block
    levels = len(downs) + 1
    if per < 1 or n_in != 1 + levels * per + len(downs):
        raise UnsupportedModelError(f"The UNet's input blocks ({n_in}, downsamplers at {downs}) are not laid out as "
                                    f"in SD1/SD2/SDXL; it cannot be rebuilt for generation.")

    def depth(block: str) -> int:
        return len(_indices(shapes, rf"^{re.escape(P + block)}\.1\.transformer_blocks\.(\d+)\."))

    block_out, down_types, down_depth = [], [], []
    for lv in range(levels):
        first = 1 + lv * (per + 1)
        block_out.append(_need(shapes, P + f"input_blocks.{first}.0.out_layers.3.weight", "the UNet")[0])
        ds = [depth(f"input_blocks.{first + j}") for j in range(per)]
        if len(set(ds)) != 1:
            raise UnsupportedModelError(f"The UNet's level {lv} has attention in some of its blocks only ({ds}).")
        down_types.append("CrossAttnDownBlock2D" if ds[0] else "DownBlock2D")
        down_depth.append(ds[0] or 1)
    up_types, up_depth = [], []
    for ub in range(levels):
        ds = [depth(f"output_blocks.{ub * (per + 1) + j}") for j in range(per + 1)]
        if len(set(ds)) != 1:
            raise UnsupportedModelError(f"The UNet's output level {ub} has attention in some of its blocks only ({ds}).")
        up_types.append("CrossAttnUpBlock2D" if ds[0] else "UpBlock2D")
        up_depth.append(ds[0] or 1)
    mid_depth = len(_indices(shapes, rf"^{re.escape(P)}middle_block\.1\.transformer_blocks\.(\d+)\."))
    if mid_depth and mid_depth != down_depth[-1]:
        raise UnsupportedModelError(f"The UNet's middle block has {mid_depth} transformer blocks and its last level "
                                    f"{down_depth[-1]}: diffusers cannot build that.")
    attn2 = [k for k in shapes if k.startswith(P) and k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in shapes if k.startswith(P) and k.endswith(".proj_in.weight")]
    if not attn2 or not proj_in:
        raise UnsupportedModelError("The UNet has no cross-attention layers: it is not a text-to-image SD UNet.")
    cfg: dict[str, Any] = {
        "sample_size": DEFAULT_SIZE[family] // 8,
        "in_channels": conv_in[1],
        "out_channels": _need(shapes, P + "out.2.weight", "the UNet")[0],
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": block_out,
        "layers_per_block": per,
        "cross_attention_dim": tuple(shapes[attn2[0]])[1],
        "transformer_layers_per_block": down_depth,
        "use_linear_projection": len(shapes[proj_in[0]]) == 2,
        "attention_head_dim": 8 if family == "sd1" and all(c % 8 == 0 for c in block_out)
        else [_heads(c, family) for c in block_out],
        "upcast_attention": family == "sd2",
    }
    if up_depth != list(reversed(down_depth)):
        cfg["reverse_transformer_layers_per_block"] = [[d] * (per + 1) for d in up_depth]
    t_dim = _need(shapes, P + "time_embed.0.weight", "the UNet")[0]
    if t_dim != block_out[0] * 4:
        cfg["time_embedding_dim"] = t_dim
    if P + "label_emb.0.0.weight" in shapes:
        if family != "sdxl":
            raise UnsupportedModelError("This UNet has a class embedding (label_emb) outside SDXL "
                                        "(an upscaler or unCLIP model?): standalone generation does not support it.")
        adm_in = tuple(shapes[P + "label_emb.0.0.weight"])[1]
        proj = _need(shapes, "conditioner.embedders.1.model.text_projection",
                     "SDXL's pooled prompt embedding (the second text encoder's projection)")[1]
        if (adm_in - proj) % 6 or (adm_in - proj) // 6 % 2:
            raise UnsupportedModelError(f"SDXL's label_emb takes {adm_in} inputs, which is not 6 time ids "
                                        f"plus the {proj}-wide pooled prompt embedding.")
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=(adm_in - proj) // 6,
                   projection_class_embeddings_input_dim=adm_in)
    return cfg


def _vae_spec(shapes: Mapping[str, tuple], family: str) -> dict:
    if not any(k.startswith(VAE) for k in shapes):
        raise MergeError("The model has no VAE (no 'first_stage_model.*' keys). Load a checkpoint with a VAE, or "
                         "give one: Generator.load(state, vae=<state dict of a VAE file>).")
    P = VAE
    levels = _indices(shapes, r"^first_stage_model\.encoder\.down\.(\d+)\.")
    if not levels:
        raise MergeError("The VAE (first_stage_model.*) has no encoder blocks: it is incomplete.")
    per = len(_indices(shapes, r"^first_stage_model\.encoder\.down\.0\.block\.(\d+)\."))
    return {
        "in_channels": _need(shapes, P + "encoder.conv_in.weight", "the VAE")[1],
        "out_channels": _need(shapes, P + "decoder.conv_out.weight", "the VAE")[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [_need(shapes, P + f"encoder.down.{i}.block.0.conv2.weight", "the VAE")[0]
                               for i in levels],
        "layers_per_block": per,
        "latent_channels": _need(shapes, P + "decoder.conv_in.weight", "the VAE")[1],
        "sample_size": DEFAULT_SIZE[family],
        "scaling_factor": VAE_SCALING[family],
    }


def _text_spec(shapes: Mapping[str, tuple], family: str, name: str, prefix: str, layout: str, tok: str) -> TextSpec:
    if not any(k.startswith(prefix) for k in shapes):
        raise MergeError(f"The model has no text encoder '{prefix}*': generation needs it. Merge the text "
                         f"encoder too (or load a complete checkpoint).")
    what = f"the text encoder ({prefix}*)"
    if layout == "hf":
        P = prefix + "text_model."
        vocab, width = _need(shapes, P + "embeddings.token_embedding.weight", what)
        positions = _need(shapes, P + "embeddings.position_embedding.weight", what)[0]
        n = len(_indices(shapes, rf"^{re.escape(P)}encoder\.layers\.(\d+)\."))
        mlp = _need(shapes, P + "encoder.layers.0.mlp.fc1.weight", what)[0]
        layers = n
        if P + "final_layer_norm.weight" not in shapes:
            if family != "sdxl":
                _need(shapes, P + "final_layer_norm.weight", what)
            layers = n + 1   # SDXL files may drop CLIP-L's unused last layer; it is rebuilt (zeros, never used)
        act, with_proj, proj = "quick_gelu", False, width
    else:
        P = prefix
        vocab, width = _need(shapes, P + "token_embedding.weight", what)
        positions = _need(shapes, P + "positional_embedding", what)[0]
        n = len(_indices(shapes, rf"^{re.escape(P)}transformer\.resblocks\.(\d+)\."))
        mlp = _need(shapes, P + "transformer.resblocks.0.mlp.c_fc.weight", what)[0]
        act = "gelu"
        if family == "sd2":
            _need(shapes, P + "ln_final.weight", what)
            layers, with_proj, proj = min(n, 23), False, width   # penultimate of OpenCLIP-H's 24 layers
        else:
            lacking = [P + k for k in ("ln_final.weight", "ln_final.bias", "text_projection") if P + k not in shapes]
            if lacking:
                raise MergeError(f"This SDXL model lacks {', '.join(lacking)}: SDXL's pooled prompt embedding "
                                 f"needs the whole second text encoder (OpenCLIP ViT-bigG: its last layer, ln_final "
                                 f"and text_projection). Load (or merge from, as model A) a checkpoint that has "
                                 f"them, such as the SDXL base model.")
            proj = shapes[P + "text_projection"][1]
            layers, with_proj = n, True
    config = dict(vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                  num_attention_heads=_text_heads(width), max_position_embeddings=positions, hidden_act=act,
                  projection_dim=proj, layer_norm_eps=1e-5)
    return TextSpec(name, prefix, layout, tok, config, with_proj, n)


def derive_spec(shapes: Mapping[str, Iterable[int]], family: str | None = None) -> ModelSpec:
    """The diffusers configs of a checkpoint, from its key names and shapes only (no weights, no network)."""
    from .arch import detect
    shapes = {canonical_key(k): tuple(v) for k, v in shapes.items()}
    arch = detect(shapes)
    family = family or arch.family
    if family not in TEXT_PREFIXES:
        raise UnsupportedModelError(f"Unknown model family '{family}'.")
    if arch.variant == "instruct-pix2pix":
        raise UnsupportedModelError("Instruct-pix2pix models need an input image: standalone generation does "
                                    "text-to-image only.")
    if any(k.startswith("edm_vpred.") for k in shapes):
        raise UnsupportedModelError("This is an EDM v-prediction model (edm_vpred.* keys, e.g. CosXL): standalone "
                                    "generation does not support its noise schedule.")
    texts = [_text_spec(shapes, family, n, p, lay, tok) for n, p, lay, tok in TEXT_PREFIXES[family]]
    return ModelSpec(family, arch.variant, _unet_spec(shapes, family, arch.variant), _vae_spec(shapes, family), texts,
                     prediction_type="v_prediction" if "v_pred" in shapes else "epsilon", zero_snr="ztsnr" in shapes)


# ------------------------------------------------------------------------------------- key mapping

@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor lives in the diffusers modules."""
    module: str               # "unet" | "vae" | "text_encoder" | "text_encoder_2"
    params: tuple[str, ...]   # diffusers parameter name(s); three for a fused q/k/v projection
    how: str = "same"         # "same" | "conv1x1" (ckpt 4-D / 3-D, diffusers 2-D) | "T" (transposed) | "fused"


_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
           ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
_UNET_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _resnet(rest: str) -> str:
    for a, b in _RESNET:
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def _unet_name(key: str, per: int) -> str | None:
    """'input_blocks.4.1.proj_in.weight' -> 'down_blocks.1.attentions.0.proj_in.weight' (no prefix)."""
    head, _, leaf = key.rpartition(".")
    if head in _UNET_FIXED:
        return f"{_UNET_FIXED[head]}.{leaf}"
    m = re.match(r"^input_blocks\.(\d+)\.(\d+)\.(.+)$", key)
    if m:
        i, part, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if i == 0:
            return None
        b, j = (i - 1) // (per + 1), (i - 1) % (per + 1)
        if j == per:   # the level's downsampler
            return f"down_blocks.{b}.downsamplers.0.conv.{rest[3:]}" if rest.startswith("op.") else None
        if part == 0:
            return f"down_blocks.{b}.resnets.{j}.{_resnet(rest)}"
        return f"down_blocks.{b}.attentions.{j}.{rest}" if part == 1 else None
    m = re.match(r"^middle_block\.(\d+)\.(.+)$", key)
    if m:
        part, rest = int(m.group(1)), m.group(2)
        return {0: f"mid_block.resnets.0.{_resnet(rest)}", 1: f"mid_block.attentions.0.{rest}",
                2: f"mid_block.resnets.1.{_resnet(rest)}"}.get(part)
    m = re.match(r"^output_blocks\.(\d+)\.(\d+)\.(.+)$", key)
    if m:
        i, part, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        b, j = i // (per + 1), i % (per + 1)
        if part == 0:
            return f"up_blocks.{b}.resnets.{j}.{_resnet(rest)}"
        if rest.startswith("conv."):   # the level's upsampler (.1.conv without attention, .2.conv with)
            return f"up_blocks.{b}.upsamplers.0.{rest}"
        return f"up_blocks.{b}.attentions.{j}.{rest}" if part == 1 else None
    return None


_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_FIXED = {"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"}


def _vae_name(key: str, levels: int) -> tuple[str, str] | None:
    head, _, leaf = key.rpartition(".")
    if head in _VAE_FIXED:
        return f"{_VAE_FIXED[head]}.{leaf}", "same"
    if head in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                "quant_conv", "post_quant_conv"):
        return key, "same"
    m = re.match(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)$", key)
    if m:
        part, _, lv, what, j, rest = m.groups()
        lv = int(lv)
        blocks = "down_blocks" if part == "encoder" else "up_blocks"
        b = lv if part == "encoder" else levels - 1 - lv
        if what.startswith("block"):
            return f"{part}.{blocks}.{b}.resnets.{j}.{rest.replace('nin_shortcut', 'conv_shortcut')}", "same"
        return f"{part}.{blocks}.{b}.{'downsamplers' if part == 'encoder' else 'upsamplers'}.0.{rest}", "same"
    m = re.match(r"^(encoder|decoder)\.mid\.(block_(\d)|attn_1)\.(.+)$", key)
    if m:
        part, what, n, rest = m.groups()
        if n:
            return f"{part}.mid_block.resnets.{int(n) - 1}.{rest}", "same"
        name, _, leaf = rest.rpartition(".")
        if name in _VAE_ATTN:
            return f"{part}.mid_block.attentions.0.{_VAE_ATTN[name]}.{leaf}", ("conv1x1" if leaf == "weight" and name != "norm" else "same")
    return None


_OC_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _text_name(key: str, t: TextSpec) -> Target | None:
    rest = canonical_key(key)[len(t.prefix):]
    layers = t.config["num_hidden_layers"]
    if t.layout == "hf":
        m = re.match(r"^text_model\.encoder\.layers\.(\d+)\.", rest)
        if (m and int(m.group(1)) >= layers) or rest.endswith("position_ids") or not rest.startswith("text_model."):
            return None
        return Target(t.name, (rest,))
    fixed = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight",
             "ln_final.bias": "text_model.final_layer_norm.bias"}
    if rest in fixed:
        return Target(t.name, (fixed[rest],))
    if rest == "text_projection":
        return Target(t.name, ("text_projection.weight",), "T") if t.with_projection else None
    m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)$", rest)
    if not m or int(m.group(1)) >= layers:
        return None
    base, rest = f"text_model.encoder.layers.{m.group(1)}.", m.group(2)
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        leaf = rest.rpartition("_")[2]
        return Target(t.name, tuple(f"{base}self_attn.{p}_proj.{leaf}" for p in "qkv"), "fused")
    name, _, leaf = rest.rpartition(".")
    if name in _OC_LAYER and leaf in ("weight", "bias"):
        return Target(t.name, (f"{base}{_OC_LAYER[name]}.{leaf}",))
    return None


def key_map(keys: Iterable[str], spec: ModelSpec) -> dict[str, Target]:
    """Checkpoint key -> Target, for every key that generation uses (others: position_ids, logit_scale,
    SD2's unused last text layer and projection, EMA... are left out)."""
    out: dict[str, Target] = {}
    per, levels = spec.unet["layers_per_block"], len(spec.vae["block_out_channels"])
    for key in keys:
        if key.startswith(UNET):
            name = _unet_name(key[len(UNET):], per)
            if name is not None:
                out[key] = Target("unet", (name,))
        elif key.startswith(VAE):
            r = _vae_name(key[len(VAE):], levels)
            if r is not None:
                out[key] = Target("vae", (r[0],), r[1])
        else:
            for t in spec.texts:
                if key.startswith(t.prefix):
                    tgt = _text_name(key, t)
                    if tgt is not None:
                        out[key] = tgt
                    break
    return out


# ------------------------------------------------------------------------------------- building modules

def _build_modules(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Modules of `spec` with zero-filled weights in `dtype` (the VAE in float32) on `device`."""
    import contextlib

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    try:
        from accelerate import init_empty_weights
        empty = init_empty_weights(include_buffers=False)   # no random init: the weights are loaded anyway
    except ImportError:
        empty = contextlib.nullcontext()
    with empty:
        modules: dict[str, torch.nn.Module] = {"unet": UNet2DConditionModel(**spec.unet),
                                               "vae": AutoencoderKL(**spec.vae)}
        for t in spec.texts:
            cls = CLIPTextModelWithProjection if t.with_projection else CLIPTextModel
            modules[t.name] = cls(CLIPTextConfig(**t.config))
    for name, m in modules.items():
        dt = torch.float32 if name == "vae" else dtype
        for sub in m.modules():
            for pname, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[pname] = torch.nn.Parameter(
                        torch.zeros(p.shape, dtype=dt if p.is_floating_point() else p.dtype, device=device),
                        requires_grad=False)
            for bname, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[bname] = b.to(device)
        m.eval()
        m.requires_grad_(False)
    return modules


def _param_owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _targets(modules: dict[str, torch.nn.Module], kmap: dict[str, Target],
             shapes: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    """Checkpoint key -> a tensor that IS the live parameter (or a view of it), shaped as in the checkpoint.

    OpenCLIP's fused in_proj: the q/k/v parameters are replaced by views of one fused tensor (once)."""
    out: dict[str, torch.Tensor] = {}
    for key, tgt in kmap.items():
        m = modules[tgt.module]
        if tgt.how == "fused":
            owners = [_param_owner(m, p) for p in tgt.params]
            params = [getattr(o, leaf) for o, leaf in owners]
            base = getattr(owners[0][0], "_merge_lab_fused_" + owners[0][1], None)
            if base is None or any(p.data_ptr() != base[i * p.shape[0]].data_ptr() for i, p in enumerate(params)):
                base = torch.cat([p.detach() for p in params], 0)
                n = params[0].shape[0]
                for i, (o, leaf) in enumerate(owners):
                    o._parameters[leaf] = torch.nn.Parameter(base[i * n:(i + 1) * n], requires_grad=False)
                setattr(owners[0][0], "_merge_lab_fused_" + owners[0][1], base)
            out[key] = base
            continue
        owner, leaf = _param_owner(m, tgt.params[0])
        p = owner._parameters[leaf].detach()
        if tgt.how == "T":
            p = p.t()
        elif tgt.how == "conv1x1":
            want = tuple(shapes.get(key, p.shape + (1, 1)))
            p = p.view(want)
        out[key] = p
    return out


def _check_targets(modules, kmap: dict[str, Target], targets: dict[str, torch.Tensor],
                   shapes: Mapping[str, tuple], allowed_gaps: Callable[[str, str], bool]) -> list[str]:
    """Every parameter must be reached by some checkpoint key; shapes must agree. Returns the gaps allowed."""
    bad = [f"{k}: checkpoint {list(shapes[k])}, model {list(t.shape)}"
           for k, t in targets.items() if k in shapes and tuple(shapes[k]) != tuple(t.shape)]
    if bad:
        raise MergeError("Tensor shapes do not fit the model built from them (a damaged or unusual checkpoint): "
                         + "; ".join(bad[:5]))
    covered = {(t.module, p) for t in kmap.values() for p in t.params}
    gaps, missing = [], []
    for mname, m in modules.items():
        for pname, _ in m.named_parameters():
            if (mname, pname) not in covered:
                (gaps if allowed_gaps(mname, pname) else missing).append(f"{mname}.{pname}")
    if missing:
        raise MergeError(f"The checkpoint lacks {len(missing)} tensor(s) generation needs, e.g. "
                         f"{', '.join(missing[:5])}. Load a complete checkpoint (or merge from one).")
    return gaps


def _sdxl_gap(spec: ModelSpec) -> Callable[[str, str], bool]:
    """SDXL files may drop CLIP-L's last layer and final norm (SDXL never uses them)."""
    t = spec.texts[0]
    last = t.config["num_hidden_layers"] - 1
    if spec.family != "sdxl" or t.layers_in_checkpoint > last:
        return lambda m, p: False
    return lambda m, p: m == "text_encoder" and (p.startswith(f"text_model.encoder.layers.{last}.")
                                                 or p.startswith("text_model.final_layer_norm."))


# ------------------------------------------------------------------------------------- the generator

def _fmt(v: float) -> str:
    return f"{v:g}"


def infotext(request, seed: int, *, width: int, height: int, model_name: str | None = None,
             model_hash: str | None = None, clip_skip: int = 1, batch_pos: int | None = None,
             extra: Mapping[str, Any] | None = None) -> str:
    """The WebUI's infotext: prompt, 'Negative prompt: …', then 'Steps: …, Sampler: …, …'."""
    params: dict[str, Any] = {"Steps": request.steps, "Sampler": request.sampler, "CFG scale": _fmt(request.cfg_scale),
                              "Seed": seed, "Size": f"{width}x{height}"}
    if model_hash:
        params["Model hash"] = model_hash
    if model_name:
        params["Model"] = model_name
    if clip_skip > 1:
        params["Clip skip"] = clip_skip
    if request.batch_size > 1 and batch_pos is not None:
        params["Batch size"] = request.batch_size
        params["Batch pos"] = batch_pos
    params.update(extra or {})

    def quote(v):   # as the WebUI's infotext quoting
        s = str(v)
        return json.dumps(s, ensure_ascii=False) if ("," in s or "\n" in s or ":" in s) else s
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def make_scheduler(sampler: str, prediction_type: str = "epsilon", zero_snr: bool = False):
    """The diffusers scheduler of a WebUI sampler name, on SD's noise schedule (scaled_linear 0.00085..0.012,
    1000 steps). Zero-terminal-SNR models get rescaled betas and "trailing" timesteps."""
    if sampler not in SAMPLERS:
        raise InputError(f"Unknown sampler '{sampler}'. Standalone generation offers: {', '.join(SAMPLER_NAMES)}.")
    import diffusers
    cls_name, opts = SAMPLERS[sampler]
    cls = getattr(diffusers, cls_name)
    opts = dict(opts)
    if zero_snr:
        if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
            raise InputError(f"The sampler '{sampler}' does not support zero-terminal-SNR models here: use Euler, "
                             f"Euler a, DPM++ 2M or DDIM.")
        opts.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        opts.pop("steps_offset", None)
    return cls(**NOISE_SCHEDULE, prediction_type=prediction_type, **opts)


class Generator:
    """Text-to-image with diffusers modules rebuilt from a checkpoint-layout state dict.

    Generator(tokenizer_dir=None, device="cpu", dtype=torch.float32, *, clip_skip=1, prediction_type=None,
              hf_cache=True)
      .load(state, family=None, *, name=None, model_hash=None, vae=None) -> list of warnings
      .sink(name=None, model_hash=None) -> an engine Sink merging straight into the modules
      .prepare(shapes, family=None) -> module_targets() (build from shapes only), then .mark_loaded(name, hash)
      .module_targets() -> {checkpoint key: live tensor}
      .generate(GenerationRequest, progress=None, cancel=None, extra=None) -> GenerationResult

    Modules are rebuilt only when the spec (shapes) changes; otherwise weights are copied in place.
    The VAE always runs in float32 (SDXL's VAE overflows in float16, the WebUI's --no-half-vae).
    """

    def __init__(self, tokenizer_dir: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, *, clip_skip: int = 1, prediction_type: str | None = None,
                 hf_cache: bool = True):
        self.tokenizer_dir = tokenizer_dir
        self.device = torch.device(device)
        self.dtype = dtype
        self.clip_skip = max(1, int(clip_skip))
        if prediction_type not in (None, "epsilon", "v_prediction"):
            raise InputError("prediction_type is None (from the model: `v_pred` key or not), 'epsilon' (SD1, "
                             "SD2-base, SDXL) or 'v_prediction' (SD2 768-v models, which their weights do not reveal).")
        self.prediction_type = prediction_type
        self.hf_cache = hf_cache
        self.spec: ModelSpec | None = None
        self.modules: dict[str, torch.nn.Module] = {}
        self.tokenizers: dict[str, Any] = {}
        self.tokenizer_sources: dict[str, str] = {}
        self.model_name: str | None = None
        self.model_hash: str | None = None
        self.ready = False
        self._targets: dict[str, torch.Tensor] = {}
        self._signature: str | None = None
        self._gaps: list[str] = []
        self._lock = threading.RLock()
        self.last_timings: dict[str, float] = {}

    # ---- building and loading
    def _ensure(self, shapes: Mapping[str, tuple], family: str | None) -> tuple[bool, list[str]]:
        spec = derive_spec(shapes, family)
        sig = spec.signature()
        rebuilt = sig != self._signature
        if rebuilt:
            self._load_tokenizers(spec)   # fail early, before any big allocation
            self.modules, self._targets, self.ready, self._signature = {}, {}, False, None
            modules = _build_modules(spec, self.device, self.dtype)
            kmap = key_map(shapes.keys(), spec)
            targets = _targets(modules, kmap, shapes)
            gaps = _check_targets(modules, kmap, targets, shapes, _sdxl_gap(spec))
            self.modules, self._targets, self._signature = modules, targets, sig
            self._gaps = gaps
        self.spec = spec   # same shapes, but maybe another prediction type (a `v_pred` key)
        return rebuilt, list(self._gaps)

    def _load_tokenizers(self, spec: ModelSpec) -> None:
        from .tokenizers import load_tokenizer
        toks, srcs = {}, {}
        for t in spec.texts:
            tok, src = load_tokenizer(t.tokenizer, self.tokenizer_dir, hf_cache=self.hf_cache,
                                      subfolder_hint="tokenizer_2" if t.name == "text_encoder_2" else "tokenizer")
            if tok.vocab_size != t.config["vocab_size"] and len(tok) != t.config["vocab_size"]:
                raise MergeError(f"The tokenizer ({src}) has {len(tok)} tokens, the text encoder {t.config['vocab_size']}.")
            toks[t.name], srcs[t.name] = tok, src
        self.tokenizers, self.tokenizer_sources = toks, srcs

    def prepare(self, shapes: Mapping[str, Iterable[int]], family: str | None = None) -> dict[str, torch.Tensor]:
        """Build (or keep) modules for these shapes and return module_targets(); the caller writes every key
        (engine.merge into a TensorSink of them), then calls mark_loaded(). Weights nobody writes keep their
        values (zeros after a rebuild); the generator refuses to generate until mark_loaded()."""
        with self._lock:
            shapes = {k: tuple(v) for k, v in shapes.items()}
            self._ensure(shapes, family)
            self.ready = False
            return dict(self._targets)

    def mark_loaded(self, name: str | None = None, model_hash: str | None = None) -> None:
        """The modules hold a complete model now; `name` / `model_hash` label the infotext."""
        self.model_name, self.model_hash, self.ready = name, model_hash, True

    def sink(self, name: str | None = None, model_hash: str | None = None):
        """An engine Sink that merges straight into this generator's modules (no state dict in between).

        On open it builds the modules for the merge's shapes (or keeps them when the shapes are unchanged)
        and then works as engine.TensorSink over module_targets(); on close the model is ready to generate.
        A failed or interrupted merge leaves the generator not ready (generate() refuses until the next
        load). Keys generation does not use are skipped (`.skipped`)."""
        from .engine import TensorSink
        gen = self

        class GeneratorSink(TensorSink):
            def __init__(self):
                # tied to these modules: a live re-merge may write into them only while they are the same
                super().__init__({}, on_abort=lambda: setattr(gen, "ready", False), owner=(id(gen), id(gen.modules)))

            def open(self, entries, metadata_draft=None):
                self.targets = gen.prepare({k: shape for k, _, shape in entries})
                super().open(entries, metadata_draft)

            def close(self, metadata):
                out = super().close(metadata)
                gen.mark_loaded(name, model_hash)
                return out

        return GeneratorSink()

    def load(self, state: Mapping[str, torch.Tensor], family: str | None = None, *, name: str | None = None,
             model_hash: str | None = None, vae: Mapping[str, torch.Tensor] | None = None) -> list[str]:
        """Load a checkpoint-layout state dict (a merge's DictSink state, a loaded file). Returns warnings.

        `vae`: a separate VAE's state dict (keys 'encoder.…' / 'decoder.…', or with 'first_stage_model.')
        replaces the checkpoint's. `name` / `model_hash` label the infotext ("Model: …, Model hash: …").
        """
        t0 = time.monotonic()
        with self._lock:
            state = dict(state)
            if vae is not None:
                state = {k: v for k, v in state.items() if not k.startswith(VAE)}
                for k, v in vae.items():
                    if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
                        state[VAE + k] = v
                    elif k.startswith(VAE):
                        state[k] = v
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            rebuilt, gaps = self._ensure(shapes, family)
            self.ready = False
            with torch.no_grad():
                for key, t in self._targets.items():
                    t.copy_(state[key])
            self.mark_loaded(name, model_hash)
            self.last_timings = {"load_s": time.monotonic() - t0, "rebuilt": float(rebuilt)}
            warnings = []
            if gaps:
                warnings.append(f"{len(gaps)} unused tensor(s) the checkpoint lacks were left at zero "
                                f"(e.g. {gaps[0]}).")
            return warnings

    def module_targets(self) -> dict[str, torch.Tensor]:
        """{checkpoint key: the live tensor it is loaded into}, shaped as in the checkpoint.

        Writing into these tensors changes the model at once (engine.TensorSink). Keys generation does not
        use (position_ids, logit_scale, SD2's unused last text layer) are absent."""
        with self._lock:
            return dict(self._targets)

    def unload(self) -> None:
        with self._lock:
            self.modules, self._targets, self._signature, self.spec, self.ready = {}, {}, None, None, False

    # ---- diffusers pipeline (for people who want diffusers' own loop)
    def pipeline(self, sampler: str = "Euler a"):
        """A StableDiffusionPipeline / StableDiffusionXLPipeline sharing these modules (no safety checker).
        Inpainting models are not offered here. Note: clip_skip is not applied by it."""
        self._check_ready()
        if self.spec.variant:
            raise UnsupportedModelError("pipeline() makes text-to-image pipelines; this is an inpainting model.")
        m, sch = self.modules, self._scheduler(sampler)
        if self.spec.family == "sdxl":
            from diffusers import StableDiffusionXLPipeline
            return StableDiffusionXLPipeline(vae=m["vae"], text_encoder=m["text_encoder"],
                                             text_encoder_2=m["text_encoder_2"], tokenizer=self.tokenizers["text_encoder"],
                                             tokenizer_2=self.tokenizers["text_encoder_2"], unet=m["unet"],
                                             scheduler=sch, force_zeros_for_empty_prompt=True, add_watermarker=False)
        from diffusers import StableDiffusionPipeline
        return StableDiffusionPipeline(vae=m["vae"], text_encoder=m["text_encoder"], tokenizer=self.tokenizers["text_encoder"],
                                       unet=m["unet"], scheduler=sch, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def _scheduler(self, sampler: str):
        return make_scheduler(sampler, self.prediction_type or self.spec.prediction_type, self.spec.zero_snr)

    # ---- prompts
    def _check_ready(self):
        if not self.modules or not self.ready:
            raise MergeError("No model is loaded for generation: merge into memory (or load a model) first.")

    def _chunks(self, tok, text: str) -> list[list[int]]:
        ids = tok(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        pieces = [ids[i:i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)] or [[]]
        return [[bos] + p + [eos] + [pad] * (CHUNK_TOKENS - len(p)) for p in pieces]

    def _encode_one(self, t: TextSpec, chunks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        model = self.modules[t.name]
        ids = torch.tensor(chunks, dtype=torch.long, device=self.device)
        out = model(ids, output_hidden_states=True)
        if self.spec.family == "sdxl":
            hidden = out.hidden_states[-2]                      # penultimate layer, no final norm
            pooled = out.text_embeds[:1] if t.with_projection else None   # first chunk's, as the WebUI
        elif self.spec.family == "sd1" and self.clip_skip > 1:
            hidden = model.text_model.final_layer_norm(out.hidden_states[-self.clip_skip])
            pooled = None
        else:
            hidden, pooled = out.last_hidden_state, None
        return hidden.reshape(1, -1, hidden.shape[-1]), pooled  # chunks side by side: (1, 77*n, width)

    def _encode(self, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
        per_enc_pos, per_enc_neg, pooled = [], [], [None, None]
        for t in self.spec.texts:
            tok = self.tokenizers[t.name]
            pc, nc = self._chunks(tok, prompt), self._chunks(tok, negative)
            empty = self._chunks(tok, "")[0]
            n = max(len(pc), len(nc))
            pc, nc = pc + [empty] * (n - len(pc)), nc + [empty] * (n - len(nc))
            hp, pp = self._encode_one(t, pc)
            hn, pn = self._encode_one(t, nc)
            per_enc_pos.append(hp)
            per_enc_neg.append(hn)
            if pp is not None:
                pooled = [pp, pn]
        pos, neg = torch.cat(per_enc_pos, -1), torch.cat(per_enc_neg, -1)
        if self.spec.family == "sdxl" and negative == "":
            # an empty negative prompt is zeros for SDXL (the WebUI and diffusers both do this)
            neg = torch.zeros_like(neg)
            pooled[1] = torch.zeros_like(pooled[1])
        return pos, neg, pooled[0], pooled[1]

    # ---- sampling
    def generate(self, request, progress: Callable[[float, str], None] | None = None,
                 cancel: Callable[[], bool] | None = None, extra: Mapping[str, Any] | None = None):
        """Text-to-image for a host.GenerationRequest -> host.GenerationResult (PIL images, infotexts).

        Image i of the batch uses a CPU torch.Generator seeded with seed + i (seed -1: a random seed), so an
        image depends only on its seed, the model and the settings. `progress(fraction, text)` is called per
        step; `cancel()` returning True stops with CancelledError. `extra` adds infotext parameters."""
        from .host import GenerationResult
        with self._lock, torch.no_grad():
            self._check_ready()
            t0 = time.monotonic()
            w, h, steps, n = int(request.width), int(request.height), int(request.steps), int(request.batch_size)
            if w % 8 or h % 8 or w < 8 or h < 8:
                raise InputError(f"Width and height must be multiples of 8 (got {w}x{h}).")
            if steps < 1 or n < 1:
                raise InputError("Steps and batch size must be at least 1.")
            seed = int(request.seed)
            if seed < 0:
                seed = random.randrange(4294967294)
            sched = self._scheduler(request.sampler)
            unet, spec = self.modules["unet"], self.spec
            cfg = float(request.cfg_scale)
            use_cfg = cfg != 1.0

            pos, neg, pooled_pos, pooled_neg = self._encode(request.prompt, request.negative_prompt)
            ctx = torch.cat([neg, pos]) if use_cfg else pos
            ctx = ctx.to(self.dtype).repeat_interleave(n, 0)
            added = None
            if spec.unet.get("addition_embed_type") == "text_time":
                time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)
                pooled = torch.cat([pooled_neg, pooled_pos]) if use_cfg else pooled_pos
                added = {"text_embeds": pooled.to(self.dtype).repeat_interleave(n, 0),
                         "time_ids": time_ids.repeat(ctx.shape[0], 1)}
            t_enc = time.monotonic()

            from diffusers.utils.torch_utils import randn_tensor
            gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(n)]
            latent_ch = spec.vae["latent_channels"]
            shape = (n, latent_ch, h // 8, w // 8)
            sched.set_timesteps(steps, device=self.device)
            latents = randn_tensor(shape, generator=gens, device=self.device, dtype=torch.float32)
            latents = latents * sched.init_noise_sigma
            extra_cond = self._inpaint_conditioning(n, h, w) if spec.unet["in_channels"] > latent_ch else None
            step_kwargs = {}
            step_params = inspect.signature(sched.step).parameters
            if "generator" in step_params:
                step_kwargs["generator"] = gens
            if "eta" in step_params:
                step_kwargs["eta"] = 0.0
            timesteps = sched.timesteps
            for i, t in enumerate(timesteps):
                if cancel is not None and cancel():
                    raise CancelledError("Generation interrupted.")
                x = torch.cat([latents] * 2) if use_cfg else latents
                x = sched.scale_model_input(x, t)
                if extra_cond is not None:
                    x = torch.cat([x, torch.cat([extra_cond] * (2 if use_cfg else 1))], 1)
                eps = unet(x.to(self.dtype), t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample.float()
                if use_cfg:
                    e_neg, e_pos = eps.chunk(2)
                    eps = e_neg + cfg * (e_pos - e_neg)
                latents = sched.step(eps, t, latents, **step_kwargs).prev_sample
                if progress is not None:
                    progress((i + 1) / len(timesteps), f"Step {i + 1}/{len(timesteps)}")
            t_unet = time.monotonic()
            images = self._decode(latents)
            t_vae = time.monotonic()
            infos = [infotext(request, seed + i, width=w, height=h, model_name=self.model_name,
                              model_hash=self.model_hash, clip_skip=self.clip_skip if spec.family == "sd1" else 1,
                              batch_pos=i, extra=extra) for i in range(n)]
            self.last_timings = {"encode_s": t_enc - t0, "denoise_s": t_unet - t_enc, "decode_s": t_vae - t_unet,
                                 "total_s": t_vae - t0}
            return GenerationResult(images=images, infotexts=infos)

    def _inpaint_conditioning(self, n: int, h: int, w: int) -> torch.Tensor:
        """Text-to-image with an inpainting UNet, as the WebUI does: the whole image masked (mask 1) and the
        masked image's latents those of a mid-grey image (the VAE's mean, no sampling)."""
        vae = self.modules["vae"]
        grey = torch.zeros(1, vae.config.in_channels, h, w, device=self.device)   # 0.5 grey in [-1, 1]
        lat = vae.encode(grey).latent_dist.mode() * vae.config.scaling_factor
        mask = torch.ones(1, 1, h // 8, w // 8, device=self.device)
        extra = self.spec.unet["in_channels"] - self.spec.vae["latent_channels"]
        cond = torch.cat([mask, lat], 1)
        if cond.shape[1] != extra:
            raise UnsupportedModelError(f"The UNet takes {extra} extra input channels; only inpainting models "
                                        f"(1 mask + {lat.shape[1]} image channels) are supported.")
        return cond.repeat(n, 1, 1, 1)

    def _decode(self, latents: torch.Tensor) -> list:
        from PIL import Image
        vae = self.modules["vae"]
        images = []
        for i in range(latents.shape[0]):   # one at a time: the decoder is the memory peak
            x = vae.decode(latents[i:i + 1].float() / vae.config.scaling_factor).sample
            x = (x / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
            images.append(Image.fromarray((x * 255).round().astype("uint8")))
        return images


# ------------------------------------------------------------------------------------- tiny runnable models

def runnable_keys(family: str) -> list[str]:
    """The keys of a complete checkpoint: keysets.checkpoint_keys(family, with_optional=True) without the
    optional UNet-side markers of special variants (SDXL's `v_pred`, `ztsnr`, `edm_vpred.*`)."""
    from .keysets import checkpoint_keys
    return [k.key for k in checkpoint_keys(family, with_optional=True)
            if not (k.optional and k.component == "diffuser")]


def tiny_spec(family: str, variant: str = "") -> ModelSpec:
    """The configs of keysets.make_runnable_state_dict: real block structure (so the real key names), small
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


def tiny_runnable_state_dict(family: str, seed: int = 0, variant: str = "") -> dict[str, torch.Tensor]:
    """A tiny checkpoint with every real key name of `family` (keysets.checkpoint_keys(family,
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
