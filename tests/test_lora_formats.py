"""LoRA foundation: reading kohya/PEFT/LoHa/LoKr files, ΔW, key mapping, refusals, architecture, writer, info CLI."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lib_merge.core.errors import MergeError
from lib_merge.core.files import save_state_dict
from lib_merge.lora import UnsupportedLoraError, keys as K, open_lora, save_kohya
from lib_merge.lora.formats import LoraModule, kohya_hashes
from lib_merge.lora.info import summary, top_tags

ROOT = Path(__file__).resolve().parents[1]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed)) * 0.1


def add(sd, name, down, up, alpha=None):
    sd[f"{name}.lora_down.weight"] = down
    sd[f"{name}.lora_up.weight"] = up
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))


# real kohya module names, real shapes, small ranks
SD1_PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"            # conv 1x1 (320,320,1,1)
SD1_TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # (320,768)
SD1_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"                    # conv 3x3 (320,320,3,3)
SD1_TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"       # (768,768)
XL_TO_K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # (640,2048)
XL_CONV = "lora_unet_input_blocks_1_0_in_layers_2"                      # (320,320,3,3)
XL_TE1_Q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"      # (768,768)
XL_TE2_V = "lora_te2_text_model_encoder_layers_3_self_attn_v_proj"      # rows 2560:3840 of in_proj (3840,1280)


def sd1_lora() -> dict:
    sd: dict = {}
    add(sd, SD1_PROJ_IN, rnd(2, 320, 1, 1, seed=1), rnd(320, 2, 1, 1, seed=2), 1.0)
    add(sd, SD1_TO_K, rnd(4, 768, seed=3), rnd(320, 4, seed=4), 8.0)
    add(sd, SD1_CONV, rnd(3, 320, 3, 3, seed=5), rnd(320, 3, 1, 1, seed=6), 1.5)
    add(sd, SD1_TE_Q, rnd(4, 768, seed=7), rnd(768, 4, seed=8), 2.0)
    return sd


def sdxl_lora() -> dict:
    sd: dict = {}
    add(sd, XL_TO_K, rnd(2, 2048, seed=11), rnd(640, 2, seed=12), 1.0)
    add(sd, XL_CONV, rnd(2, 320, 3, 3, seed=13), rnd(320, 2, 1, 1, seed=14), 2.0)
    add(sd, XL_TE1_Q, rnd(4, 768, seed=15), rnd(768, 4, seed=16), 4.0)
    add(sd, XL_TE2_V, rnd(2, 1280, seed=17), rnd(1280, 2, seed=18), 1.0)
    return sd


def write(tmp_path, name, sd, metadata=None) -> Path:
    return save_state_dict(sd, tmp_path / name, metadata)


def hand_delta(sd, name):
    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
    r = down.shape[0]
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else r
    if down.dim() == 2:
        return up @ down * (alpha / r)
    if down.shape[2:] == (1, 1):
        return (up.squeeze(-1).squeeze(-1) @ down.squeeze(-1).squeeze(-1))[..., None, None] * (alpha / r)
    # the conv2d formulation of a 3x3 LoCon: ΔW = conv2d(down^T, up)^T
    return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * (alpha / r)


# ------------------------------------------------------------------------------------------ kohya

@pytest.mark.parametrize("family,make", [("sd1", sd1_lora), ("sdxl", sdxl_lora)])
def test_kohya_read_deltas_and_targets(tmp_path, family, make):
    sd = make()
    p = write(tmp_path, f"{family}.safetensors", sd)
    with open_lora(p) as lf:
        assert lf.format == "kohya"
        assert lf.family == family
        assert set(lf.modules) == {k.split(".")[0] for k in sd}
        for name, m in lf.modules.items():
            want = hand_delta(sd, name)
            got = lf.delta(name)
            assert got.shape == want.shape == m.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
            tgt = lf.target(name)
            assert tgt is not None, name
            assert tgt.delta_shape == tuple(got.shape), name
        kinds = {n: m.kind for n, m in lf.modules.items()}
        conv = SD1_CONV if family == "sd1" else XL_CONV
        assert kinds[conv] == "locon" and lf.modules[conv].kernel == (3, 3)
    if family == "sdxl":
        assert lf.target(XL_TE2_V).key == "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
        assert lf.target(XL_TE2_V).rows == (2560, 3840)
        assert lf.target(XL_TE1_Q).key == \
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    else:
        assert lf.target(SD1_PROJ_IN).key == "model.diffusion_model.input_blocks.1.1.proj_in.weight"
        assert lf.target(SD1_CONV).key == "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


def test_locon_3x3_delta_acts_like_down_then_up_conv(tmp_path):
    sd = sd1_lora()
    p = write(tmp_path, "c.safetensors", sd)
    with open_lora(p) as lf:
        m = lf.modules[SD1_CONV]
        dw = lf.delta(SD1_CONV, torch.float64)
    down = sd[f"{SD1_CONV}.lora_down.weight"].double()
    up = sd[f"{SD1_CONV}.lora_up.weight"].double()
    x = torch.randn(1, 320, 6, 6, generator=_g(3), dtype=torch.float64)
    y_delta = F.conv2d(x, dw, padding=1)
    y_lora = F.conv2d(F.conv2d(x, down, padding=1), up) * m.scale
    torch.testing.assert_close(y_delta, y_lora)


def test_alpha_missing_and_zero(tmp_path):
    sd: dict = {}
    add(sd, SD1_TO_K, rnd(4, 768, seed=1), rnd(320, 4, seed=2))            # no alpha
    add(sd, SD1_TE_Q, rnd(2, 768, seed=3), rnd(768, 2, seed=4), 0.0)       # alpha 0
    p = write(tmp_path, "a.safetensors", sd)
    with open_lora(p) as lf:
        a, b = lf.modules[SD1_TO_K], lf.modules[SD1_TE_Q]
        assert a.stored_alpha is None and a.alpha == 4 and a.scale == 1.0
        assert b.stored_alpha == 0 and b.alpha == 2 and b.scale == 1.0
        assert any("alpha is 0" in w and SD1_TE_Q in w for w in lf.warnings)
        torch.testing.assert_close(lf.delta(SD1_TO_K), sd[f"{SD1_TO_K}.lora_up.weight"] @ sd[f"{SD1_TO_K}.lora_down.weight"])


def test_per_module_ranks(tmp_path):
    p = write(tmp_path, "r.safetensors", sd1_lora())
    with open_lora(p) as lf:
        assert {n: m.rank for n, m in lf.modules.items()} == {SD1_PROJ_IN: 2, SD1_TO_K: 4, SD1_CONV: 3, SD1_TE_Q: 4}


# ------------------------------------------------------------------------------------------- PEFT

def test_peft_names_and_deltas(tmp_path):
    sd = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": rnd(4, 768, seed=1),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": rnd(320, 4, seed=2),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight": rnd(2, 320, seed=3),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight": rnd(320, 2, seed=4),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": rnd(2, 768, seed=5),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": rnd(768, 2, seed=6),
    }
    p = write(tmp_path, "peft.safetensors", sd)
    with open_lora(p) as lf:
        assert lf.format == "peft" and lf.family == "sd1"
        assert set(lf.modules) == {SD1_TO_K, SD1_TE_Q,
                                   "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"}
        for name in lf.modules:
            assert lf.target(name) is not None
        pre = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        torch.testing.assert_close(lf.delta(SD1_TO_K), sd[f"{pre}.lora_B.weight"] @ sd[f"{pre}.lora_A.weight"])
    # PEFT's base_model.model. naming (a saved UNet adapter) and SDXL's text_encoder_2
    assert K.peft_to_kohya("base_model.model.up_blocks.1.attentions.0.proj_out") == \
        "lora_unet_up_blocks_1_attentions_0_proj_out"
    assert K.peft_to_kohya("text_encoder_2.text_model.encoder.layers.3.self_attn.v_proj", sdxl=True) == XL_TE2_V
    assert K.peft_to_kohya("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", sdxl=True) == XL_TE1_Q


# ------------------------------------------------------------------------------------- LyCORIS

def test_loha_linear_and_conv(tmp_path):
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = {f"{q}.hada_w1_a": rnd(320, 2, seed=1), f"{q}.hada_w1_b": rnd(2, 320, seed=2),
          f"{q}.hada_w2_a": rnd(320, 2, seed=3), f"{q}.hada_w2_b": rnd(2, 320, seed=4), f"{q}.alpha": torch.tensor(1.0),
          f"{SD1_CONV}.hada_w1_a": rnd(320, 2, seed=5), f"{SD1_CONV}.hada_w1_b": rnd(2, 320 * 9, seed=6),
          f"{SD1_CONV}.hada_w2_a": rnd(320, 2, seed=7), f"{SD1_CONV}.hada_w2_b": rnd(2, 320 * 9, seed=8)}
    add(sd, SD1_TO_K, rnd(2, 768, seed=9), rnd(320, 2, seed=10), 2.0)   # a LoRA module beside them (and the SD1 width)
    p = write(tmp_path, "loha.safetensors", sd)
    with open_lora(p) as lf:
        assert lf.format == "lycoris" and lf.family == "sd1"
        assert lf.modules[q].kind == "loha" and lf.modules[q].rank == 2
        want = (sd[f"{q}.hada_w1_a"] @ sd[f"{q}.hada_w1_b"]) * (sd[f"{q}.hada_w2_a"] @ sd[f"{q}.hada_w2_b"]) * 0.5
        torch.testing.assert_close(lf.delta(q), want)
        c = lf.modules[SD1_CONV]
        assert c.shape == (320, 320, 3, 3) and c.scale == 1.0      # alpha missing -> rank
        want = ((sd[f"{SD1_CONV}.hada_w1_a"] @ sd[f"{SD1_CONV}.hada_w1_b"])
                * (sd[f"{SD1_CONV}.hada_w2_a"] @ sd[f"{SD1_CONV}.hada_w2_b"])).reshape(320, 320, 3, 3)
        torch.testing.assert_close(lf.delta(SD1_CONV), want)


def test_lokr_variants(tmp_path):
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    v = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"
    sd = {f"{q}.lokr_w1": rnd(4, 4, seed=1), f"{q}.lokr_w2_a": rnd(80, 2, seed=2), f"{q}.lokr_w2_b": rnd(2, 80, seed=3),
          f"{q}.alpha": torch.tensor(1.0),
          f"{v}.lokr_w1": rnd(8, 4, seed=4), f"{v}.lokr_w2": rnd(40, 80, seed=5), f"{v}.alpha": torch.tensor(7.0),
          f"{SD1_CONV}.lokr_w1": rnd(4, 4, seed=6), f"{SD1_CONV}.lokr_w2": rnd(80, 80, 3, 3, seed=7)}
    add(sd, SD1_TO_K, rnd(2, 768, seed=9), rnd(320, 2, seed=10))
    p = write(tmp_path, "lokr.safetensors", sd)
    with open_lora(p) as lf:
        m = lf.modules[q]
        assert m.kind == "lokr" and m.rank == 2 and m.scale == 0.5
        w2 = sd[f"{q}.lokr_w2_a"] @ sd[f"{q}.lokr_w2_b"]
        torch.testing.assert_close(lf.delta(q), torch.kron(sd[f"{q}.lokr_w1"], w2) * 0.5)
        # both factors full: LyCORIS ignores alpha (scale 1)
        assert lf.modules[v].scale == 1.0
        torch.testing.assert_close(lf.delta(v), torch.kron(sd[f"{v}.lokr_w1"], sd[f"{v}.lokr_w2"]))
        c = lf.delta(SD1_CONV)
        assert c.shape == (320, 320, 3, 3)
        w1 = sd[f"{SD1_CONV}.lokr_w1"]
        w2 = sd[f"{SD1_CONV}.lokr_w2"]
        # block (i, j) of the Kronecker product is w1[i, j] * w2
        torch.testing.assert_close(c[80:160, 240:320], w1[1, 3] * w2)


# ---------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("extra,words", [
    ({f"{SD1_TO_K}.dora_scale": torch.ones(320, 1)}, ["DoRA", "dora_scale"]),
    ({f"{SD1_TO_K}.lora_mid.weight": torch.ones(4, 4, 1, 1)}, ["Tucker", "lora_mid"]),
    ({"lora_unet_x_to_q.weight": torch.ones(320), "lora_unet_x_to_q.on_input": torch.tensor(True)}, ["IA3"]),
    ({"lora_unet_x_to_q.oft_blocks": torch.ones(4, 80, 80)}, ["OFT", "oft_blocks"]),
    ({"lora_unet_x_to_q.a1.weight": torch.ones(2, 320)}, ["GLoRA"]),
    ({"lora_unet_x_to_q.w_norm": torch.ones(320)}, ["Norm"]),
    ({"lora_unet_x_to_q.diff": torch.ones(320, 320)}, ["diff"]),
])
def test_refused_kinds_name_what_was_found(tmp_path, extra, words):
    sd = sd1_lora()
    sd.update(extra)
    p = write(tmp_path, "bad.safetensors", sd)
    with pytest.raises(UnsupportedLoraError) as e:
        open_lora(p)
    for w in words:
        assert w in str(e.value)


def test_refused_peft_dora_and_non_lora(tmp_path):
    sd = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": rnd(2, 320),
          "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": rnd(320, 2),
          "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": torch.ones(320)}
    with pytest.raises(UnsupportedLoraError, match="DoRA"):
        open_lora(write(tmp_path, "dora.safetensors", sd))
    with pytest.raises(MergeError, match="does not look like a LoRA"):
        open_lora(write(tmp_path, "ckpt.safetensors", {"model.diffusion_model.out.2.weight": torch.ones(4, 4)}))


# ------------------------------------------------------------------------------------ architecture

def test_architecture_from_metadata_and_conflicts(tmp_path):
    unet_only = {}
    add(unet_only, SD1_PROJ_IN, rnd(2, 320, 1, 1), rnd(320, 2, 1, 1), 1.0)  # names fit SD1 and SD2
    p = write(tmp_path, "u.safetensors", unet_only)
    with open_lora(p) as lf:
        assert lf.family is None
    for meta, fam in [({"ss_base_model_version": "sd_v2_768_v"}, "sd2"), ({"ss_base_model_version": "sd_v1"}, "sd1"),
                      ({"modelspec.architecture": "stable-diffusion-v2-512/lora"}, "sd2"), ({"ss_v2": "True"}, "sd2")]:
        p = write(tmp_path, "m.safetensors", unet_only, meta)
        with open_lora(p) as lf:
            assert lf.family == fam, meta
    # tensors win over metadata, with a warning
    p = write(tmp_path, "x.safetensors", sdxl_lora(), {"ss_base_model_version": "sd_v1"})
    with open_lora(p) as lf:
        assert lf.family == "sdxl" and any("metadata says sd1" in w for w in lf.warnings)
    # SD2: a 1024-wide text encoder; q/k/v go to row slices of the fused in_proj_weight
    sd2 = {}
    add(sd2, "lora_te_text_model_encoder_layers_22_self_attn_k_proj", rnd(2, 1024), rnd(1024, 2), 1.0)
    add(sd2, "lora_te_text_model_encoder_layers_22_mlp_fc2", rnd(2, 4096), rnd(1024, 2), 1.0)
    with open_lora(write(tmp_path, "sd2.safetensors", sd2)) as lf:
        assert lf.family == "sd2"
        t = lf.target("lora_te_text_model_encoder_layers_22_self_attn_k_proj")
        assert t.key == "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" and t.rows == (1024, 2048)
        assert lf.target("lora_te_text_model_encoder_layers_22_mlp_fc2").key == \
            "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.weight"


# --------------------------------------------------------------------------- key map vs real names

def _sd1_kohya_names() -> list[str]:
    """The 264 modules of a standard kohya SD1 LoRA (diffusers naming), enumerated from the diffusers UNet layout."""
    inner = ["proj_in", "proj_out"] + [f"transformer_blocks_0_{a}_{p}" for a in ("attn1", "attn2")
                                        for p in ("to_q", "to_k", "to_v", "to_out_0")] + \
        ["transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2"]
    blocks = [f"down_blocks_{i}_attentions_{j}" for i in range(3) for j in range(2)] + ["mid_block_attentions_0"] + \
        [f"up_blocks_{i}_attentions_{j}" for i in (1, 2, 3) for j in range(3)]
    te = [f"lora_te_text_model_encoder_layers_{n}_{m}" for n in range(12)
          for m in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")]
    return [f"lora_unet_{b}_{x}" for b in blocks for x in inner] + te


def _sdxl_kohya_names() -> list[str]:
    """The 722 + 72 + 192 modules of a standard kohya SDXL LoRA (LDM naming)."""
    def inner(depth):
        return ["proj_in", "proj_out"] + [f"transformer_blocks_{d}_{a}_{p}" for d in range(depth) for a in ("attn1", "attn2")
                                          for p in ("to_q", "to_k", "to_v", "to_out_0")] + \
            [f"transformer_blocks_{d}_{f}" for d in range(depth) for f in ("ff_net_0_proj", "ff_net_2")]
    attn = {"input_blocks_4_1": 2, "input_blocks_5_1": 2, "input_blocks_7_1": 10, "input_blocks_8_1": 10,
            "middle_block_1": 10, **{f"output_blocks_{n}_1": 10 for n in (0, 1, 2)},
            **{f"output_blocks_{n}_1": 2 for n in (3, 4, 5)}}
    unet = [f"lora_unet_{b}_{x}" for b, d in attn.items() for x in inner(d)]
    mods = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
    te1 = [f"lora_te1_text_model_encoder_layers_{n}_{m}" for n in range(12) for m in mods]
    te2 = [f"lora_te2_text_model_encoder_layers_{n}_{m}" for n in range(32) for m in mods]
    return unet + te1 + te2


def test_every_module_of_real_loras_finds_its_checkpoint_key():
    from lib_merge.core.keysets import checkpoint_keys
    names = _sd1_kohya_names()
    assert len(names) == 264
    assert K.unresolved(names, "sd1") == []
    assert K.unresolved(names, "sd2") == []     # SD2 has the same U-Net names; its TE has 23/24 layers
    xl = _sdxl_kohya_names()
    assert len(xl) == 722 + 72 + 192
    assert K.unresolved(xl, "sdxl") == []
    for fam in ("sd1", "sd2", "sdxl"):
        keys = {k.key: k.shape for k in checkpoint_keys(fam, with_optional=True)}
        for name, t in K.module_map(fam).items():
            assert keys[t.key] == t.shape, name
    # LDM and diffusers names of a module agree; resnets, samplers and LoCon targets too
    m = K.module_map("sd1")
    pairs = {"lora_unet_input_blocks_1_1_proj_in": "lora_unet_down_blocks_0_attentions_0_proj_in",
             "lora_unet_input_blocks_3_0_op": "lora_unet_down_blocks_0_downsamplers_0_conv",
             "lora_unet_output_blocks_2_1_conv": "lora_unet_up_blocks_0_upsamplers_0_conv",
             "lora_unet_output_blocks_5_2_conv": "lora_unet_up_blocks_1_upsamplers_0_conv",
             "lora_unet_middle_block_2_out_layers_3": "lora_unet_mid_block_resnets_1_conv2",
             "lora_unet_input_blocks_11_0_emb_layers_1": "lora_unet_down_blocks_3_resnets_1_time_emb_proj",
             "lora_unet_output_blocks_3_0_skip_connection": "lora_unet_up_blocks_1_resnets_0_conv_shortcut",
             "lora_unet_output_blocks_11_1_transformer_blocks_0_ff_net_2":
                 "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2"}
    for ldm, diff in pairs.items():
        assert m[ldm] == m[diff], (ldm, diff)
    x = K.module_map("sdxl")
    assert x["lora_unet_output_blocks_2_2_conv"] == x["lora_unet_up_blocks_0_upsamplers_0_conv"]
    assert x["lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k"] == \
        x["lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k"]
    assert x["lora_te2_text_model_encoder_layers_31_mlp_fc1"].key == \
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight"


# ------------------------------------------------------------------------------------------- writer

def test_save_kohya_round_trip_metadata_and_hashes(tmp_path):
    sd = sd1_lora()
    src = write(tmp_path, "src.safetensors", sd, {"ss_tag_frequency": json.dumps({"a": {"cat": 3}})})
    out = tmp_path / "out.safetensors"
    with open_lora(src) as lf:
        before = {n: lf.delta(n) for n in lf.modules}
        save_kohya(lf.modules, out, {"ss_output_name": "x"}, family=lf.family, title="My LoRA")
    with open_lora(out) as lf2:
        assert lf2.family == "sd1" and lf2.format == "kohya"
        for n, d in before.items():
            torch.testing.assert_close(lf2.delta(n), d)
        meta = lf2.metadata
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"   # ranks 2 and 4
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "1.5"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "x"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.title"] == "My LoRA"
    # sshs_model_hash: SHA-256 of the tensor data, which is byte-identical to kohya's re-serialisation
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    import safetensors.torch
    tensors = safetensors.torch.load(raw)
    ss = {k: v for k, v in meta.items() if k.startswith("ss_")}
    ref = safetensors.torch.save(tensors, ss)
    m = int.from_bytes(ref[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(ref[8 + m:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ref[0x100000:0x110000]).hexdigest()[:8]
    assert kohya_hashes(tensors, meta)[0]["sshs_model_hash"] == meta["sshs_model_hash"]
    # the WebUI reads alpha with .item(): a 0-d tensor
    assert tensors[f"{SD1_TO_K}.alpha"].dim() == 0 and float(tensors[f"{SD1_TO_K}.alpha"]) == 8.0
    with pytest.raises(MergeError, match="already exists"):
        save_kohya({SD1_TO_K: (rnd(2, 768), rnd(320, 2), 1.0)}, out)


def test_save_kohya_sdxl_from_tensors_uniform_rank(tmp_path):
    mods = {XL_TO_K: (rnd(4, 2048, seed=1), rnd(640, 4, seed=2), 2.0),
            XL_TE2_V: LoraModule.from_tensors(XL_TE2_V, rnd(4, 1280, seed=3), rnd(1280, 4, seed=4), 2.0)}
    out = save_kohya(mods, tmp_path / "xl.safetensors", dtype=torch.float16)
    with open_lora(out) as lf:
        assert lf.family == "sdxl"
        m = lf.metadata
        assert m["ss_network_dim"] == "4" and m["ss_network_alpha"] == "2" and "ss_network_args" not in m
        assert m["ss_base_model_version"] == "sdxl_base_v1-0"
        assert m["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert lf.modules[XL_TO_K].scale == 0.5
    # SD2: the caller's v-prediction markers are kept when they name the same family
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    out2 = save_kohya({te: (rnd(2, 1024), rnd(1024, 2), None)}, tmp_path / "sd2.safetensors",
                      {"ss_base_model_version": "sd_v2_768_v", "modelspec.architecture": "stable-diffusion-v1/lora"})
    with open_lora(out2) as lf:
        assert lf.family == "sd2" and lf.modules[te].alpha == 2
        assert lf.metadata["ss_base_model_version"] == "sd_v2_768_v" and lf.metadata["ss_v2"] == "True"
        assert lf.metadata["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    loha = {"lora_unet_x": LoraModule("lora_unet_x", "loha", {}, 2, 2.0, (4, 4))}
    with pytest.raises(UnsupportedLoraError, match="loha"):
        save_kohya(loha, tmp_path / "loha.safetensors")


# --------------------------------------------------------------------------------------------- info

def test_top_tags_summed_over_datasets():
    meta = {"ss_tag_frequency": json.dumps({"1_a": {"cat": 3, " dog": 1, "tree": 2},
                                            "2_b": {"dog": 4, "cat": 1}})}
    assert top_tags(meta) == [("dog", 5), ("cat", 4), ("tree", 2)]
    assert top_tags(meta, 1) == [("dog", 5)]
    assert top_tags({"ss_tag_frequency": "not json"}) == []


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lib_merge", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)


def test_lora_info_cli_json_and_text(tmp_path):
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_base_model_version": "sdxl_base_v1-0",
            "ss_tag_frequency": json.dumps({"d1": {"girl": 5, "hat": 2}, "d2": {"hat": 4}}),
            "ss_output_name": "tiny"}
    p = write(tmp_path, "xl.safetensors", sdxl_lora(), meta)
    r = _cli("lora", "info", str(p), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "kohya" and info["architecture"] == "sdxl"
    assert {p: v["modules"] for p, v in info["parts"].items()} == {"unet": 2, "te1": 1, "te2": 1}
    assert info["rank_signature"] == {"unet": [2], "te1": [4], "te2": [2]}
    assert info["parts"]["unet"]["alphas"] == [1, 2]
    assert info["parts"]["unet"]["conv3x3_modules"] == 1
    sd = sdxl_lora()
    assert info["parameters"] == sum(v.numel() for k, v in sd.items() if not k.endswith(".alpha"))
    assert info["top_tags"] == [["hat", 6], ["girl", 5]]
    assert info["metadata"]["ss_output_name"] == "tiny"
    assert info["modules_without_checkpoint_key"] == 0
    with open_lora(p) as lf:
        assert summary(lf)["parts"] == info["parts"]
    r = _cli("lora", "info", str(p))
    assert r.returncode == 0 and "SDXL" in r.stdout and "hat (6)" in r.stdout
    bad = sd1_lora()
    bad[f"{SD1_TO_K}.dora_scale"] = torch.ones(320, 1)
    r = _cli("lora", "info", str(write(tmp_path, "dora.safetensors", bad)))
    assert r.returncode == 2 and "DoRA" in r.stderr


# ------------------------------------------------------------------------------------------ extras

def test_reading_is_lazy_only_alphas_are_read():
    from lib_merge.lora.formats import read_lora
    sd = sd1_lora()
    seen = []

    def reader(key):
        seen.append(key)
        return sd[key]

    lf = read_lora({k: tuple(v.shape) for k, v in sd.items()}, reader, {})
    assert seen and all(k.endswith(".alpha") for k in seen)
    seen.clear()
    lf.delta(SD1_TO_K)
    assert sorted(seen) == [f"{SD1_TO_K}.lora_down.weight", f"{SD1_TO_K}.lora_up.weight"]


def test_peft_adapter_names_alpha_keys_and_sdxl_diffusers_naming(tmp_path):
    pre = "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"   # SDXL, diffusers naming
    sd = {f"{pre}.lora_A.default.weight": rnd(4, 2048, seed=1), f"{pre}.lora_B.default.weight": rnd(640, 4, seed=2),
          f"{pre}.alpha": torch.tensor(2.0)}
    with open_lora(write(tmp_path, "p.safetensors", sd)) as lf:
        name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"
        assert lf.family == "sdxl" and list(lf.modules) == [name]
        assert lf.modules[name].scale == 0.5
        assert lf.target(name).key == "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"


def test_modules_without_a_checkpoint_key_are_reported(tmp_path):
    sd = sdxl_lora()
    add(sd, "lora_unet_input_blocks_11_0_in_layers_2", rnd(2, 320, 3, 3), rnd(320, 2, 1, 1), 1.0)  # SD1-only block
    with open_lora(write(tmp_path, "w.safetensors", sd)) as lf:
        assert lf.family == "sdxl"
        assert any("no key in an sdxl checkpoint" in w for w in lf.warnings)
        assert summary(lf)["modules_without_checkpoint_key"] == 1
