"""Checkpoint keys <-> diffusers modules: which live tensor each checkpoint key is loaded into (a view where
the layouts differ), modules built from a spec with zero-filled weights, and the checks that every
parameter is reached with the right shape."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from ..core.errors import MergeError
from .configs import UNET, VAE, ModelSpec, TextSpec, canonical_key

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
