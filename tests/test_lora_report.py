"""LoRA report: text (ranks per part, tags), ΔW norm per block, spectra, PNG, CLI, lazy matplotlib."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from lib_merge.core.arch import block_of
from lib_merge.lora import keys as K, open_lora, save_kohya
from lib_merge.lora.report import block_norms, describe, report, report_png, report_text

ROOT = Path(__file__).resolve().parents[1]

SD1 = {
    "to_k": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",      # IN01
    "proj_in": "lora_unet_down_blocks_0_attentions_0_proj_in",                            # IN01, conv 1x1
    "ff": "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_ff_net_2",           # IN08
    "mid": "lora_unet_mid_block_attentions_0_proj_out",                                   # M00
    "out_q": "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q",        # OUT11
    "te_q": "lora_te_text_model_encoder_layers_0_self_attn_q_proj",                       # BASE
    "te_v": "lora_te_text_model_encoder_layers_5_self_attn_v_proj",                       # BASE
}
TAGS = {"ds1": {"1girl": 10, "smile": 3, "red hair": 5}, "ds2": {"smile": 4, " 1girl ": 2, "hat": 1}}


def _mods(state, rank_unet=4, rank_te=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name in SD1.values():
        shape = tuple(state[K.module_map("sd1")[name].key].shape)
        r = rank_te if K.part_of(name) == "te" else rank_unet
        if len(shape) == 2:
            down, up = torch.randn(r, shape[1], generator=g), torch.randn(shape[0], r, generator=g)
        else:
            down, up = torch.randn(r, shape[1], *shape[2:], generator=g), torch.randn(shape[0], r, 1, 1, generator=g)
        mods[name] = (down * 0.3, up * 0.3, r / 2)
    return mods


def _hand_delta(mod):
    down, up, alpha = mod
    r = down.shape[0]
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)) * (alpha / r)


def _lora(tiny, tmp_path):
    mods = _mods(tiny.state["sd1_a"])
    meta = {"ss_tag_frequency": json.dumps(TAGS), "ss_network_dim": "4", "ss_output_name": "tiny_style"}
    path = save_kohya(mods, tmp_path / "tiny.safetensors", meta, family="sd1", dtype=torch.float32)
    return mods, path


def test_text_has_ranks_and_tags(tiny, tmp_path):
    _, path = _lora(tiny, tmp_path)
    info = describe(path, tags=3)
    assert info["rank_signature"] == {"unet": [4], "te": [2]}
    assert info["top_tags"] == [["1girl", 12], ["smile", 7], ["red hair", 5]]
    text = report_text(info)
    assert "Rank signature: unet [4]; te [2]" in text
    assert "1girl (12), smile (7), red hair (5)" in text
    assert "ss_output_name: tiny_style" in text
    assert "IN01" in text and "M00" in text and "OUT11" in text and "BASE" in text


def test_block_norms_match_hand_computed_frobenius(tiny, tmp_path):
    mods, path = _lora(tiny, tmp_path)
    expect: dict[str, float] = {}
    for name, mod in mods.items():
        b = block_of(K.module_map("sd1")[name].key, "sd1")
        expect[b] = expect.get(b, 0.0) + float(_hand_delta(mod).double().pow(2).sum())
    with open_lora(path) as lf:
        got = block_norms(lf)
    assert [b for b, _ in got] == ["BASE", "IN01", "IN08", "M00", "OUT11"]
    for b, v in got:
        assert math.isclose(v, math.sqrt(expect[b]), rel_tol=1e-5), b


def test_spectra_are_normalised_and_have_the_rank(tiny, tmp_path):
    mods, path = _lora(tiny, tmp_path)
    with open_lora(path) as lf:
        info = report(lf, spectra=2)
    assert len(info["spectra"]) == 2
    for name, s in info["spectra"].items():
        ref = torch.linalg.svdvals(_hand_delta(mods[name]).double())
        assert math.isclose(s[0], 1.0)
        r = mods[name][0].shape[0]
        assert all(math.isclose(a, float(b / ref[0]), rel_tol=1e-4) for a, b in zip(s[:r], ref[:r]))
        assert all(x < 1e-5 for x in s[r:])     # ΔW has rank r


def test_png_opens(tiny, tmp_path):
    _, path = _lora(tiny, tmp_path)
    png = report_png(describe(path), tmp_path / "r.png")
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 300


def test_cli_report(tiny, tmp_path):
    _, path = _lora(tiny, tmp_path)
    png = tmp_path / "cli.png"
    p = subprocess.run([sys.executable, "-m", "lib_merge", "lora", "report", str(path), "--png", str(png)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "Rank signature: unet [4]; te [2]" in p.stdout and png.exists()


def test_importing_lora_report_does_not_import_matplotlib():
    code = "import sys, lib_merge.lora.report, lib_merge.cli.lora; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
