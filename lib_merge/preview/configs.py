"""Diffusers configs derived from a checkpoint's tensor shapes (no config file, nothing downloaded).

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

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..core.errors import MergeError, UnsupportedModelError

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
    tokenizer: str            # "clip_l" | "open_clip" (preview/tokenizers.py kinds)
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
    from ..core.arch import detect
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
