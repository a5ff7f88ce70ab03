"""LoRA merge (concat/add/ties/dare/magnitude_prune on factors), bake into checkpoints, LoRA block weights, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_merge.core.errors import ArchitectureMismatchError, InputError, MergeError
from lib_merge.core.files import open_model
from lib_merge.core.randomness import generator_for
from lib_merge.lora import keys as K, open_lora, save_kohya
from lib_merge.lora.bake import bake
from lib_merge.lora.lbw import LAYOUTS, PRESETS, module_block, parse_lbw
from lib_merge.lora.merge import LoraInput, RankMismatchError, merge, merge_modules, parse_lora_arg

ROOT = Path(__file__).resolve().parents[1]

SD1 = {
    "to_k": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",      # IN01
    "proj_in": "lora_unet_down_blocks_0_attentions_0_proj_in",                            # IN01, conv 1x1
    "conv": "lora_unet_down_blocks_0_resnets_0_conv1",                                    # IN01, conv 3x3
    "ff": "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_ff_net_2",           # IN08
    "mid": "lora_unet_mid_block_attentions_0_proj_out",                                   # M00
    "out_q": "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q",        # OUT11
    "te_q": "lora_te_text_model_encoder_layers_0_self_attn_q_proj",                       # BASE
}
XL = {
    "to_k": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",                 # IN04
    "out_q": "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q",               # OUT00
    "mid": "lora_unet_middle_block_1_proj_in",                                            # M00
    "te1_q": "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "te2_q": "lora_te2_text_model_encoder_layers_3_self_attn_q_proj",                     # fused rows 0:d
    "te2_v": "lora_te2_text_model_encoder_layers_3_self_attn_v_proj",                     # fused rows 2d:3d
}


def delta_shape(state, family, name):
    t = K.module_map(family)[name]
    shape = tuple(state[t.key].shape)
    if t.rows is not None:
        shape = (shape[0] // 3,) + shape[1:]
    return shape


def make_modules(state, family, names, rank=2, seed=0, alpha=None):
    """Kohya modules shaped for the tiny checkpoint: name -> (down, up, alpha)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i, name in enumerate(names):
        shape = delta_shape(state, family, name)
        r = rank if isinstance(rank, int) else rank[i]
        if len(shape) == 2:
            down, up = torch.randn(r, shape[1], generator=g), torch.randn(shape[0], r, generator=g)
        else:
            down = torch.randn(r, shape[1], *shape[2:], generator=g)
            up = torch.randn(shape[0], r, 1, 1, generator=g)
        mods[name] = (down * 0.3, up * 0.3, alpha if alpha is not None else r / 2)
    return mods


def write_lora(tmp_path, fname, mods, family):
    return save_kohya(mods, tmp_path / fname, family=family, dtype=torch.float32)


def hand_delta(mod):
    down, up, alpha = mod
    r = down.shape[0]
    if down.dim() == 2:
        return up @ down * (alpha / r)
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(up.shape[0], *down.shape[1:]) * (alpha / r)


@pytest.fixture()
def sd1_pair(tiny, tmp_path):
    st = tiny.state["sd1_a"]
    a = make_modules(st, "sd1", list(SD1.values()), rank=2, seed=1)
    b = make_modules(st, "sd1", [SD1["to_k"], SD1["conv"], SD1["te_q"], SD1["ff"]], rank=3, seed=2, alpha=1.0)
    return a, b, write_lora(tmp_path, "a.safetensors", a, "sd1"), write_lora(tmp_path, "b.safetensors", b, "sd1")


# ------------------------------------------------------------------------------------------ merge

def test_parse_lora_arg():
    assert parse_lora_arg("x.safetensors") == LoraInput(Path("x.safetensors"), 1.0, 1.0)
    assert parse_lora_arg("x.safetensors:0.5") == LoraInput(Path("x.safetensors"), 0.5, 0.5)
    assert parse_lora_arg("x.safetensors:0.5:-1") == LoraInput(Path("x.safetensors"), 0.5, -1.0)
    assert parse_lora_arg("C:/l/x.safetensors:2").path == Path("C:/l/x.safetensors")


def test_concat_is_exact_with_different_ranks(sd1_pair, tmp_path):
    a, b, pa, pb = sd1_pair
    out = merge([(pa, 0.7, -0.4), LoraInput(pb, -1.3, 0.6)], tmp_path / "m.safetensors", mode="concat",
                dtype="float32")
    with open_lora(out) as lf:
        assert set(lf.modules) == set(a) | set(b)
        for name, m in lf.modules.items():
            te = name.startswith("lora_te")
            want = torch.zeros(m.shape)
            if name in a:
                want += (-0.4 if te else 0.7) * hand_delta(a[name])
            if name in b:
                want += (0.6 if te else -1.3) * hand_delta(b[name])
            torch.testing.assert_close(lf.delta(name), want, rtol=1e-4, atol=1e-5)
            assert m.rank == (2 if name in a else 0) + (3 if name in b else 0)
        recipe = json.loads(lf.metadata["merge_lab_recipe"])
        assert recipe["mode"] == "concat" and [x["name"] for x in recipe["loras"]] == ["a.safetensors", "b.safetensors"]
        assert len(recipe["loras"][0]["sha256"]) == 64 and recipe["loras"][1]["weight_unet"] == -1.3
        assert lf.metadata["modelspec.merged_from"] == "a.safetensors, b.safetensors"
        assert lf.family == "sd1"


@pytest.mark.parametrize("mode", ["add", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_factor_modes_refuse_different_ranks(sd1_pair, tmp_path, mode):
    _, _, pa, pb = sd1_pair
    with pytest.raises(RankMismatchError) as e:
        merge([pa, pb], tmp_path / "m.safetensors", mode=mode, density=0.5)
    msg = str(e.value)
    assert "concat" in msg and "SVD" in msg and "rank 2" in msg and "rank 3" in msg
    assert not (tmp_path / "m.safetensors").exists()


# small reference loops of PEFT's definitions, element by element

def ref_prune_mag(t, density):
    flat = t.reshape(-1).tolist()
    k = int(density * len(flat))
    order = sorted(range(len(flat)), key=lambda j: -abs(flat[j]))[:k]
    keep = set(order)
    return torch.tensor([v if j in keep else 0.0 for j, v in enumerate(flat)]).reshape(t.shape)


def ref_merge(tensors, weights, mode, density, draws):
    pruned = []
    for i, t in enumerate(tensors):
        if mode in ("ties", "magnitude_prune"):
            pruned.append(ref_prune_mag(t, density).reshape(-1).tolist())
        elif mode in ("dare_linear", "dare_ties"):
            keep = draws[i].reshape(-1).tolist()
            pruned.append([v / density if keep[j] < density else 0.0 for j, v in enumerate(t.reshape(-1).tolist())])
        else:
            pruned.append(t.reshape(-1).tolist())
    n = len(pruned[0])
    out = []
    for j in range(n):
        vals = [p[j] for p in pruned]
        if mode in ("ties", "dare_ties"):
            maj = 1.0 if sum(vals) >= 0 else -1.0
            agree = [(w * v) for v, w in zip(vals, weights) if v != 0 and (v > 0) == (maj > 0)]
            out.append(sum(agree) / max(1, len(agree)))
        else:
            out.append(sum(w * v for v, w in zip(vals, weights)))
    return torch.tensor(out).reshape(tensors[0].shape)


@pytest.mark.parametrize("mode", ["add", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_factor_modes_match_reference_loops(tiny, tmp_path, mode):
    st = tiny.state["sd1_a"]
    names = [SD1["to_k"], SD1["te_q"]]
    mods = [make_modules(st, "sd1", names, rank=2, seed=s, alpha=a) for s, a in ((5, 1.0), (6, 2.0), (7, 0.5))]
    paths = [write_lora(tmp_path, f"l{i}.safetensors", m, "sd1") for i, m in enumerate(mods)]
    inputs = [LoraInput(paths[0], 1.0, 0.5), LoraInput(paths[1], -0.8, 1.0), LoraInput(paths[2], 0.6, -0.3)]
    files = [open_lora(p) for p in paths]
    try:
        got = merge_modules(files, inputs, mode, density=0.5, seed=42)
        again = merge_modules(files, inputs, mode, density=0.5, seed=42)
        other = merge_modules(files, inputs, mode, density=0.5, seed=43)
    finally:
        for f in files:
            f.close()
    for name in names:
        te = name.startswith("lora_te")
        cs = [(inp.w_te if te else inp.w_unet) * m[name][2] / 2 for inp, m in zip(inputs, mods)]
        for role, idx in (("down", 0), ("up", 1)):
            ws = [(abs(c) ** 0.5) * (1 if c >= 0 or role == "up" else -1) for c in cs]
            draws = None
            if mode.startswith("dare"):
                g = generator_for(42, f"{name}.lora_{role}", "lora_merge")
                draws = [torch.rand(m[name][idx].shape, generator=g) for m in mods]
            want = ref_merge([m[name][idx] for m in mods], ws, mode, 0.5, draws)
            torch.testing.assert_close(got[name][idx], want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(again[name][idx], got[name][idx], rtol=0, atol=0)
            if mode.startswith("dare"):
                assert not torch.equal(other[name][idx], got[name][idx])
        assert got[name][2] == 2.0  # alpha = rank: scale 1


def test_add_of_one_lora_is_exact_and_keeps_lone_modules(sd1_pair, tmp_path):
    a, _, pa, _ = sd1_pair
    out = merge([(pa, -0.5, 2.0)], tmp_path / "one.safetensors", mode="add", dtype="float32")
    with open_lora(out) as lf:
        for name in a:
            w = 2.0 if name.startswith("lora_te") else -0.5
            torch.testing.assert_close(lf.delta(name), w * hand_delta(a[name]), rtol=1e-4, atol=1e-5)


def test_merge_refuses_mixed_architectures(tiny, tmp_path, sd1_pair):
    _, _, pa, _ = sd1_pair
    xl = write_lora(tmp_path, "xl.safetensors", make_modules(tiny.state["sdxl_a"], "sdxl", [XL["to_k"]]), "sdxl")
    with pytest.raises(ArchitectureMismatchError) as e:
        merge([pa, xl], tmp_path / "m.safetensors")
    assert "a.safetensors" in str(e.value) and "xl.safetensors" in str(e.value)
    with pytest.raises(InputError):
        merge([pa], tmp_path / "m.safetensors", mode="ties", density=1.5)


# ------------------------------------------------------------------------------------------ LBW

def test_lbw_layouts_presets_and_parsing():
    assert len(LAYOUTS["sd1"][17]) == 17 and len(LAYOUTS["sd1"][26]) == 26
    assert len(LAYOUTS["sdxl"][12]) == 12 and len(LAYOUTS["sdxl"][20]) == 20
    assert LAYOUTS["sd1"][17][:8] == ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"]
    assert LAYOUTS["sdxl"][12] == ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT0{i}" for i in range(6)]
    for fam in ("sd1", "sdxl"):
        for name, vals in PRESETS[fam].items():
            assert len(vals) in LAYOUTS[fam], name
    w = parse_lbw("1,0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,0.5", "sd1")
    assert w["IN01"] == 0 and w["IN02"] == 1 and w["OUT11"] == 0.5
    assert w["IN00"] == 0 and w["IN03"] == 0 and w["OUT00"] == 0   # unlisted slots are 0
    assert parse_lbw("outall", "sd1")["OUT05"] == 1 and parse_lbw("OUTALL", "sd1")["IN04"] == 0
    assert parse_lbw("INALL", "sdxl")["IN08"] == 1 and parse_lbw("INALL", "sdxl")["M00"] == 0
    with pytest.raises(InputError, match="17 or 26"):
        parse_lbw("1,0,1", "sd1")
    with pytest.raises(InputError):
        parse_lbw("MIDD", "sdxl")
    assert module_block(SD1["to_k"], "sd1") == "IN01" and module_block(SD1["out_q"], "sd1") == "OUT11"
    assert module_block(SD1["mid"], "sd1") == "M00" and module_block(SD1["te_q"], "sd1") == "BASE"
    assert module_block(XL["to_k"], "sdxl") == "IN04" and module_block(XL["te2_v"], "sdxl") == "BASE"


# ------------------------------------------------------------------------------------------ bake

def expected_bake(base, family, loras, lbw_w=None):
    """base + Σ strength·ΔW by hand (fused q/k/v rows too)."""
    from lib_merge.lora.lbw import module_weight
    want = {k: v.clone().float() for k, v in base.items() if v.is_floating_point()}
    for mods, su, ste in loras:
        for name, mod in mods.items():
            t = K.module_map(family)[name]
            s = (ste if name.startswith("lora_te") else su) * module_weight(name, family, lbw_w)
            dw = hand_delta(mod)
            if t.rows is not None:
                d = want[t.key].shape[0] // 3
                part = t.rows[0] // (t.rows[1] - t.rows[0])
                want[t.key][part * d:(part + 1) * d] += s * dw
            else:
                want[t.key] += s * dw.reshape(want[t.key].shape)
    return want


def test_bake_sd1_file_and_memory(tiny, tmp_path, sd1_pair):
    a, b, pa, pb = sd1_pair
    base = tiny.state["sd1_a"]
    res = bake(tiny.path["sd1_a"], [(pa, 0.8, 0.5), (pb, -0.3, 1.0)], tmp_path / "baked.safetensors", dtype="float32")
    want = expected_bake(base, "sd1", [(a, 0.8, 0.5), (b, -0.3, 1.0)])
    touched = {K.module_map("sd1")[n].key for n in list(a) + list(b)}
    assert set(res.touched) == touched
    with open_model(res.path) as mf, open_model(tiny.path["sd1_a"]) as src:
        assert list(mf.keys()) == list(src.keys())
        for k in mf.keys():
            got = mf.read(k)
            if k in touched:
                torch.testing.assert_close(got, want[k], rtol=1e-5, atol=1e-5)
                assert not torch.equal(got, base[k])
            else:
                assert got.dtype == base[k].dtype and got.numpy().tobytes() == base[k].numpy().tobytes()
        recipe = json.loads(mf.metadata["merge_lab_recipe"])
    assert recipe["model"]["name"] == "sd1_a.safetensors" and len(recipe["model"]["sha256"]) == 64
    assert recipe["loras"][1]["strength_unet"] == -0.3 and len(recipe["loras"][0]["sha256"]) == 64
    mem = bake(tiny.path["sd1_a"], [(pa, 0.8, 0.5), (pb, -0.3, 1.0)], None, dtype="float32")
    for k in touched:
        torch.testing.assert_close(mem.state[k], want[k], rtol=1e-5, atol=1e-5)


def test_bake_fp16_keeps_untouched_bytes(tiny, tmp_path, sd1_pair):
    a, _, pa, _ = sd1_pair
    res = bake(tiny.path["sd1_a_fp16"], [pa], None, dtype="float16")
    base = tiny.state["sd1_a_fp16"]
    touched = set(res.touched)
    for k, v in res.state.items():
        if k not in touched:
            assert v.dtype == base[k].dtype and torch.equal(v, base[k])
        else:
            assert v.dtype == torch.float16
    assert res.state["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_bake_sdxl_fused_qkv_rows_and_lbw(tiny, tmp_path):
    base = tiny.state["sdxl_a"]
    mods = make_modules(base, "sdxl", list(XL.values()), rank=2, seed=3)
    p = write_lora(tmp_path, "xl.safetensors", mods, "sdxl")
    res = bake(tiny.path["sdxl_a"], [(p, 0.9, 0.7)], None, dtype="float32")
    want = expected_bake(base, "sdxl", [(mods, 0.9, 0.7)])
    key = K.module_map("sdxl")[XL["te2_q"]].key
    assert key.endswith("attn.in_proj_weight")
    d = base[key].shape[0] // 3
    for k in res.touched:
        torch.testing.assert_close(res.state[k], want[k], rtol=1e-5, atol=1e-5)
    assert torch.equal(res.state[key][d:2 * d], base[key][d:2 * d])   # k rows: no module
    assert not torch.equal(res.state[key][:d], base[key][:d])
    assert not torch.equal(res.state[key][2 * d:], base[key][2 * d:])
    # LBW (12 values): IN04 and BASE off, everything else listed at 1; unlisted slots (IN00...) are 0
    lbw = "0,0,1,1,1,1,1,1,1,1,1,1"
    res2 = bake(tiny.path["sdxl_a"], [(p, 0.9, 0.7)], None, lbw=lbw, dtype="float32")
    w = parse_lbw(lbw, "sdxl")
    want2 = expected_bake(base, "sdxl", [(mods, 0.9, 0.7)], w)
    for name in (XL["to_k"], XL["te1_q"], XL["te2_q"]):
        k = K.module_map("sdxl")[name].key
        assert torch.equal(res2.state[k], base[k]), name
    for name in (XL["out_q"], XL["mid"]):
        k = K.module_map("sdxl")[name].key
        torch.testing.assert_close(res2.state[k], want2[k], rtol=1e-5, atol=1e-5)
        assert not torch.equal(res2.state[k], base[k])


def test_bake_lbw_preset_sd1(tiny, sd1_pair):
    a, _, pa, _ = sd1_pair
    base = tiny.state["sd1_a"]
    res = bake(tiny.path["sd1_a"], [pa], None, lbw="OUTALL", dtype="float32")
    for short in ("to_k", "proj_in", "conv", "ff", "mid"):
        k = K.module_map("sd1")[SD1[short]].key
        assert torch.equal(res.state[k], base[k]), short
    for short in ("out_q", "te_q"):
        k = K.module_map("sd1")[SD1[short]].key
        assert not torch.equal(res.state[k], base[k]), short


def test_bake_refuses_architecture_mismatch(tiny, tmp_path, sd1_pair):
    xl = write_lora(tmp_path, "xl.safetensors", make_modules(tiny.state["sdxl_a"], "sdxl", [XL["to_k"]]), "sdxl")
    with pytest.raises(ArchitectureMismatchError) as e:
        bake(tiny.path["sd1_a"], [xl], tmp_path / "x.safetensors")
    assert "xl.safetensors" in str(e.value) and "sd1_a.safetensors" in str(e.value)
    assert not (tmp_path / "x.safetensors").exists()
    _, _, pa, _ = sd1_pair
    with pytest.raises(MergeError):
        bake(tiny.path["sd1_a"], [pa], tiny.path["sd1_a"], overwrite=True)  # never over an input


# ------------------------------------------------------------------------------------------ CLI

def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lib_merge", "lora", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def test_cli_merge_and_bake(tiny, tmp_path, sd1_pair):
    a, b, pa, pb = sd1_pair
    out = tmp_path / "cli_merged.safetensors"
    r = run_cli("merge", "--mode", "concat", "--lora", f"{pa}:0.5", "--lora", f"{pb}:1:0.25", "--dtype", "float32",
                "-o", out)
    assert r.returncode == 0, r.stderr
    with open_lora(out) as lf:
        torch.testing.assert_close(lf.delta(SD1["te_q"]), 0.5 * hand_delta(a[SD1["te_q"]]) + 0.25 * hand_delta(b[SD1["te_q"]]),
                                   rtol=1e-4, atol=1e-5)
    r = run_cli("merge", "--mode", "ties", "--density", "0.5", "--lora", pa, "--lora", pb, "-o", tmp_path / "t.safetensors")
    assert r.returncode == 2 and "concat" in r.stderr and not (tmp_path / "t.safetensors").exists()
    # with --rank the same command is the SVD merge: any ranks, the exact weighted sum at full rank
    full = tmp_path / "svd.safetensors"
    r = run_cli("merge", "--mode", "concat", "--lora", f"{pa}:0.5", "--lora", f"{pb}:1:0.25", "--rank", "64",
                "--no-clamp", "--dtype", "float32", "-o", full)
    assert r.returncode == 0, r.stderr
    assert "retained Frobenius fraction: mean 1.0000" in r.stdout
    with open_lora(full) as lf:
        torch.testing.assert_close(lf.delta(SD1["te_q"]), 0.5 * hand_delta(a[SD1["te_q"]]) + 0.25 * hand_delta(b[SD1["te_q"]]),
                                   rtol=1e-4, atol=1e-5)
        recipe = json.loads(lf.metadata["merge_lab_recipe"])
        assert recipe["mode"] == "concat" and recipe["rank"] == 64 and [x["weight_te"] for x in recipe["loras"]] == [0.5, 0.25]
    r = run_cli("merge", "--lora", pa, "--conv-rank", "4", "-o", tmp_path / "c.safetensors")
    assert r.returncode == 2 and "--conv-rank needs --rank" in r.stderr
    baked = tmp_path / "cli_baked.safetensors"
    r = run_cli("bake", "--model", tiny.path["sd1_a"], "--lora", f"{out}:1", "--lbw", "ALL", "--dtype", "float32",
                "-o", baked)
    assert r.returncode == 0, r.stderr
    want = expected_bake(tiny.state["sd1_a"], "sd1", [(a, 0.5, 0.5), (b, 1.0, 0.25)])
    with open_model(baked) as mf:
        for name in list(a) + list(b):
            k = K.module_map("sd1")[name].key
            torch.testing.assert_close(mf.read(k), want[k], rtol=1e-4, atol=1e-4)
    r = run_cli("bake", "--model", tiny.path["sd1_a"], "--lora", pa, "--lbw", "1,0", "-o", tmp_path / "bad.safetensors")
    assert r.returncode == 2 and "17 or 26" in r.stderr
    r = run_cli("info", out)
    assert r.returncode == 0


def test_bake_loha_module_and_dtype_keep(tiny, tmp_path):
    from lib_merge.core.files import save_state_dict
    base = tiny.state["sd1_a"]
    name = SD1["to_k"]
    out_, in_ = delta_shape(base, "sd1", name)
    g = torch.Generator().manual_seed(9)
    sd = {f"{name}.hada_w1_a": torch.randn(out_, 2, generator=g), f"{name}.hada_w1_b": torch.randn(2, in_, generator=g),
          f"{name}.hada_w2_a": torch.randn(out_, 2, generator=g), f"{name}.hada_w2_b": torch.randn(2, in_, generator=g),
          f"{name}.alpha": torch.tensor(1.0)}
    p = save_state_dict(sd, tmp_path / "loha.safetensors", {"ss_base_model_version": "sd_v1"})
    res = bake(tiny.path["sd1_a"], [(p, 0.5, 1.0)], None, dtype=None)
    dw = (sd[f"{name}.hada_w1_a"] @ sd[f"{name}.hada_w1_b"]) * (sd[f"{name}.hada_w2_a"] @ sd[f"{name}.hada_w2_b"]) * 0.5
    key = K.module_map("sd1")[name].key
    torch.testing.assert_close(res.state[key], base[key] + 0.5 * dw, rtol=1e-5, atol=1e-5)
    assert all(v.dtype == base[k].dtype for k, v in res.state.items())


def test_bake_sd2_fused_qkv(tiny, tmp_path):
    base = tiny.state["sd2_a"]
    k_name = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
    names = [k_name, "lora_unet_down_blocks_1_attentions_0_proj_in"]
    mods = make_modules(base, "sd2", names, rank=2, seed=4)
    p = write_lora(tmp_path, "sd2.safetensors", mods, "sd2")
    res = bake(tiny.path["sd2_a"], [(p, 1.0, -0.6)], None, dtype="float32")
    want = expected_bake(base, "sd2", [(mods, 1.0, -0.6)])
    key = K.module_map("sd2")[k_name].key
    d = base[key].shape[0] // 3
    assert torch.equal(res.state[key][:d], base[key][:d]) and torch.equal(res.state[key][2 * d:], base[key][2 * d:])
    for k in res.touched:
        torch.testing.assert_close(res.state[k], want[k], rtol=1e-5, atol=1e-5)
