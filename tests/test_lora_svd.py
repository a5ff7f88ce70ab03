"""Extract, resize and SVD merge of LoRAs (lib_merge/lora/svd.py, extract.py, resize.py, cli_svd.py)."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from lib_merge.cli.lora_svd import add_svd_commands
from lib_merge.core.errors import ArchitectureMismatchError, MergeError, OutputError
from lib_merge.core.files import save_state_dict
from lib_merge.core.keysets import make_state_dict
from lib_merge.core.randomness import generator_for
from lib_merge.lora import open_lora
from lib_merge.lora.extract import extract
from lib_merge.lora.merge import combine
from lib_merge.lora.resize import parse_dynamic, rank_by_rule, resize
from lib_merge.lora.svd import SvdError, compose, factorize, merge_svd


def g(seed):
    return torch.Generator().manual_seed(seed)


def lowrank(out, inn, r, seed, scale=0.1):
    return (torch.randn(out, r, generator=g(seed)) @ torch.randn(r, inn, generator=g(seed + 1))) * scale


# ------------------------------------------------------------------------------------------ factorize

@pytest.mark.parametrize("method", ["full", "lowrank"])
def test_factorize_meets_eckart_young(method):
    A = lowrank(300, 280, 12, 0, 1.0) + 0.01 * torch.randn(300, 280, generator=g(5))
    S = torch.linalg.svdvals(A.double())
    r = 10
    bound = float(S[r:].pow(2).sum().sqrt())
    up, down, _ = factorize(A, r, clamp_quantile=None, method=method, seed=3)
    assert up.shape == (300, r) and down.shape == (r, 280)
    err = float((A - up @ down).double().norm())
    tol = 1e-4 if method == "full" else 0.02
    assert bound * (1 - 1e-5) <= err <= bound * (1 + tol)
    # deterministic for a seed
    up2, down2, _ = factorize(A, r, clamp_quantile=None, method=method, seed=3)
    assert torch.equal(up, up2) and torch.equal(down, down2)


def test_rank_is_capped_and_full_rank_is_exact():
    A = torch.randn(6, 9, generator=g(1))
    up, down, _ = factorize(A, 100, clamp_quantile=None)
    assert up.shape == (6, 6) and down.shape == (6, 9)
    torch.testing.assert_close(up @ down, A, atol=1e-5, rtol=1e-5)
    C = torch.randn(4, 3, 3, 3, generator=g(2))      # conv: min(out, in·k·k) = 4
    up, down, _ = factorize(C, 50, clamp_quantile=None)
    assert up.shape == (4, 4, 1, 1) and down.shape == (4, 3, 3, 3)
    with pytest.raises(SvdError):
        factorize(A, 0)


def test_conv3x3_factors_compose_as_down_then_up_conv():
    dw = torch.randn(8, 5, 3, 3, generator=g(3), dtype=torch.float64)
    up, down, _ = factorize(dw, 45, clamp_quantile=None)           # full rank: exact
    x = torch.randn(2, 5, 7, 7, generator=g(4), dtype=torch.float64)
    y_full = F.conv2d(x, dw, padding=1)
    y_lora = F.conv2d(F.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(y_lora, y_full)
    # the conv2d formulation of ΔW agrees with compose()
    torch.testing.assert_close(F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3), compose(up, down))


def test_clamp_bounds_the_factors():
    A = lowrank(64, 64, 8, 7, 1.0)
    up, down, _ = factorize(A, 8, clamp_quantile=0.9)
    hi = torch.cat([up.reshape(-1), down.reshape(-1)]).abs().max()
    up0, down0, _ = factorize(A, 8, clamp_quantile=None)
    assert hi < torch.cat([up0.reshape(-1), down0.reshape(-1)]).abs().max()


# ---------------------------------------------------------------------------------------- extract

U = "model.diffusion_model."
SD1_Q = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
SD1_PROJ = U + "input_blocks.1.1.proj_in.weight"            # 1x1 conv in SD1
SD1_RES = U + "input_blocks.1.0.in_layers.2.weight"         # 3x3 conv
SD1_TE = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


def _bump(sd, key, seed, r=2):
    t = sd[key]
    flat = lowrank(t.shape[0], math.prod(t.shape[1:]), r, seed)
    sd[key] = t + flat.reshape(t.shape)
    return flat.reshape(t.shape)


@pytest.fixture(scope="module")
def sd1_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("extract")
    base = make_state_dict("sd1", seed=0)
    tuned = {k: v.clone() for k, v in base.items()}
    deltas = {k: _bump(tuned, k, i * 10) for i, k in enumerate([SD1_Q, SD1_PROJ, SD1_RES, SD1_TE])}
    save_state_dict(base, d / "base.safetensors")
    save_state_dict(tuned, d / "tuned.safetensors")
    return d, deltas


def test_extract_recovers_the_delta(sd1_pair):
    d, deltas = sd1_pair
    r = extract(d / "base.safetensors", d / "tuned.safetensors", d / "x.safetensors", 4, conv_rank=4,
                dtype=torch.float32, clamp_quantile=None)
    assert r.family == "sd1" and r.te_included and r.modules == 4
    with open_lora(r.path) as lf:
        assert lf.family == "sd1"
        assert lf.metadata["ss_network_dim"] == "4" and "conv_dim" in lf.metadata["ss_network_args"]
        found = {lf.target(n).key: n for n in lf.modules}
        assert set(found) == set(deltas)
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in lf.modules
        for key, dw in deltas.items():
            torch.testing.assert_close(lf.delta(found[key]), dw, atol=1e-5, rtol=1e-4)
    assert all(v > 0.9999 for v in r.retained.values())


def test_extract_low_rank_error_and_te_threshold(sd1_pair):
    d, deltas = sd1_pair
    r = extract(d / "base.safetensors", d / "tuned.safetensors", d / "y.safetensors", 1,
                dtype=torch.float32, clamp_quantile=None, te_threshold=10.0)
    assert not r.te_included and any("text encoder is left out" in m for m in r.messages)
    with open_lora(r.path) as lf:
        assert {lf.target(n).key for n in lf.modules} == {SD1_Q, SD1_PROJ}     # no conv rank: no resnets
        name = next(n for n in lf.modules if lf.target(n).key == SD1_Q)
        dw = deltas[SD1_Q]
        S = torch.linalg.svdvals(dw.double())
        err = float((lf.delta(name).double() - dw.double()).norm())
        assert err == pytest.approx(float(S[1:].pow(2).sum().sqrt()), rel=1e-3)
    with pytest.raises(MergeError):
        extract(d / "base.safetensors", d / "base.safetensors", d / "z.safetensors", 4)


def test_extract_sdxl_fused_qkv_rows(tmp_path):
    base = make_state_dict("sdxl", seed=1)
    tuned = {k: v.clone() for k, v in base.items()}
    key = "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
    n3, inn = tuned[key].shape
    dv = lowrank(n3 // 3, inn, 2, 40)
    tuned[key][2 * n3 // 3:] += dv
    save_state_dict(base, tmp_path / "b.safetensors")
    save_state_dict(tuned, tmp_path / "t.safetensors")
    r = extract(tmp_path / "b.safetensors", tmp_path / "t.safetensors", tmp_path / "x.safetensors", 2,
                dtype=torch.float32, clamp_quantile=None)
    with open_lora(r.path) as lf:
        assert list(lf.modules) == ["lora_te2_text_model_encoder_layers_3_self_attn_v_proj"]
        torch.testing.assert_close(lf.delta("lora_te2_text_model_encoder_layers_3_self_attn_v_proj"), dv,
                                   atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------- resize

TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _lora(path, seed, names=(TO_K, CONV, TE_Q), rank=4, alpha=2.0, meta=None):
    shapes = {TO_K: ((rank, 24), (10, rank)), CONV: ((rank, 10, 3, 3), (10, rank, 1, 1)),
              TE_Q: ((rank, 24), (24, rank))}
    sd = {}
    for i, n in enumerate(names):
        ds, us = shapes[n]
        sd[f"{n}.lora_down.weight"] = torch.randn(*ds, generator=g(seed + i))
        sd[f"{n}.lora_up.weight"] = torch.randn(*us, generator=g(seed + 100 + i))
        sd[f"{n}.alpha"] = torch.tensor(alpha)
    save_state_dict(sd, path, meta or {"ss_base_model_version": "sd_v1"})
    return path


def _deltas(path):
    with open_lora(path) as lf:
        return {n: lf.delta(n, torch.float64) for n in lf.modules}


def test_resize_keeps_strength_and_reports_retained(tmp_path):
    src = _lora(tmp_path / "a.safetensors", 0)
    before = _deltas(src)
    full = resize(src, tmp_path / "full.safetensors", rank=4, dtype=torch.float32)
    after = _deltas(full.path)
    for n in before:
        torch.testing.assert_close(after[n], before[n], atol=1e-4, rtol=1e-4)
        assert full.retained[n] == pytest.approx(1.0, abs=1e-6)
    small = resize(src, tmp_path / "r2.safetensors", rank=2, dtype=torch.float32)
    with open_lora(small.path) as lf:
        m = lf.modules[TO_K]
        assert m.rank == 2 and m.alpha == 2.0
        S = torch.linalg.svdvals(before[TO_K])
        assert small.retained[TO_K] == pytest.approx(float((S[:2].pow(2).sum() / S.pow(2).sum()).sqrt()), rel=1e-4)
        err = float((lf.delta(TO_K, torch.float64) - before[TO_K]).norm())
        assert err == pytest.approx(float(S[2:].pow(2).sum().sqrt()), rel=1e-3)
        assert small.ranks[TO_K] == (4, 2)
    # a rank above the LoRA's own only pads zeros: refused with a sentence, nothing written
    with pytest.raises(SvdError, match=r"'a.safetensors' has rank 4 \(its largest module\); resizing to rank 8 "
                                       r"would only pad it with zeros. Choose a rank from 1 to 4."):
        resize(src, tmp_path / "r8.safetensors", rank=8)
    assert not (tmp_path / "r8.safetensors").exists()


def test_dynamic_rules():
    S = torch.tensor([10.0, 5.0, 1.0, 0.1])
    assert rank_by_rule(S, "sv_ratio", 2.0) == 2          # S >= 5
    assert rank_by_rule(S, "sv_ratio", 100.0) == 4
    assert rank_by_rule(S, "sv_cumulative", 0.9) == 2     # 15/16.1 = 0.93
    fro = torch.sqrt(torch.cumsum(S * S, 0) / (S * S).sum())
    assert rank_by_rule(S, "sv_fro", float(fro[1])) == 2
    assert rank_by_rule(S, "sv_fro", float(fro[1]) + 1e-4) == 3
    assert rank_by_rule(torch.zeros(3), "sv_fro", 0.9) == 1
    assert parse_dynamic("sv_fro:0.9") == ("sv_fro", 0.9)
    for bad in ("sv_fro", "fro:0.9", "sv_fro:2", "sv_ratio:0.5", "sv_fro:x"):
        with pytest.raises(SvdError):
            parse_dynamic(bad)


def test_resize_dynamic_with_cap(tmp_path):
    src = _lora(tmp_path / "a.safetensors", 1)
    r = resize(src, tmp_path / "d.safetensors", dynamic="sv_fro:0.999999", max_rank=3, dtype=torch.float32)
    assert all(new <= 3 for _, new in r.ranks.values())
    r = resize(src, tmp_path / "e.safetensors", dynamic="sv_fro:0.5", dtype=torch.float32)
    assert all(v >= 0.5 for v in r.retained.values())
    with pytest.raises(SvdError):
        resize(src, tmp_path / "f.safetensors")


# -------------------------------------------------------------------------------------- SVD merge

def test_merge_add_full_rank_is_the_weighted_sum(tmp_path):
    a = _lora(tmp_path / "a.safetensors", 10)
    b = _lora(tmp_path / "b.safetensors", 20, names=(TO_K, CONV), rank=3, alpha=1.0)   # no TE module
    da, db = _deltas(a), _deltas(b)
    r = merge_svd([(a, 0.7), (b, -0.4)], tmp_path / "m.safetensors", rank=64, clamp_quantile=None,
                  dtype=torch.float32)
    assert r.family == "sd1" and r.modules == 3
    dm = _deltas(r.path)
    for n in da:
        want = 0.7 * da[n] + (-0.4 * db[n] if n in db else 0)
        torch.testing.assert_close(dm[n], want, atol=1e-4, rtol=1e-4)
    with open_lora(r.path) as lf:
        assert lf.modules[TO_K].alpha == lf.modules[TO_K].rank == 10     # capped at min(10, 24), alpha = rank
    # separate text-encoder weights
    r = merge_svd([(a, 1.0, 0.0), (b, 1.0, 0.0)], tmp_path / "n.safetensors", rank=64, clamp_quantile=None,
                  dtype=torch.float32)
    assert TE_Q not in _deltas(r.path)
    assert any("zero" in w for w in r.warnings)


def test_merge_low_rank_and_conv_rank(tmp_path):
    a = _lora(tmp_path / "a.safetensors", 30)
    b = _lora(tmp_path / "b.safetensors", 40)
    r = merge_svd([(a, 1.0), (b, 1.0)], tmp_path / "m.safetensors", rank=2, conv_rank=5, dtype=torch.float32)
    with open_lora(r.path) as lf:
        assert lf.modules[TO_K].rank == 2 and lf.modules[CONV].rank == 5
        assert lf.modules[CONV].kind == "locon"
    assert 0 < r.retained[TO_K] < 1


def test_merge_refuses_different_architectures(tmp_path):
    a = _lora(tmp_path / "sd1.safetensors", 0)
    b = _lora(tmp_path / "xl.safetensors", 0, meta={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(ArchitectureMismatchError) as e:
        merge_svd([(a, 1.0), (b, 1.0)], tmp_path / "m.safetensors", rank=4)
    assert "sd1.safetensors" in str(e.value) and "xl.safetensors" in str(e.value)
    assert "an SDXL LoRA" in str(e.value) and "SD1.x" in str(e.value)


def test_combine_modes_on_full_deltas():
    """The SVD merge combines full deltas with merge.combine (PEFT's definitions; the sign is elected on the
    pruned, unweighted deltas)."""
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
    t2 = torch.tensor([-1.0, 1.0, 1.0, -4.0])
    torch.testing.assert_close(combine([t1, t2], [1.0, 2.0], "add"), t1 + 2 * t2)
    # ties at density 1: sign of the sum (0 -> +), mean of the agreeing weighted entries
    got = combine([t1, t2], [1.0, 1.0], "ties")
    torch.testing.assert_close(got, torch.tensor([1.0, -2.0, 2.0, -4.0]))
    # the election is on the unweighted deltas: weight 3 on t2 does not flip position 1 (sum -1 -> -)
    got = combine([t1, t2], [1.0, 3.0], "ties")
    torch.testing.assert_close(got, torch.tensor([1.0, -2.0, 3.0, -12.0]))
    # magnitude prune keeps the top half of each
    t3 = torch.tensor([-1.5, 1.0, 1.0, -4.0])
    torch.testing.assert_close(combine([t1, t3], [1.0, 1.0], "magnitude_prune", density=0.5),
                               torch.tensor([-1.5, -2.0, 3.0, -4.0]))
    big = torch.randn(4000, generator=g(1))
    d1 = combine([big], [1.0], "dare_linear", density=0.25, gen=generator_for(5, "k", "lora_merge_svd"))
    d2 = combine([big], [1.0], "dare_linear", density=0.25, gen=generator_for(5, "k", "lora_merge_svd"))
    assert torch.equal(d1, d2)
    kept = d1 != 0
    assert 0.2 < kept.float().mean() < 0.3
    torch.testing.assert_close(d1[kept], big[kept] * 4)
    with pytest.raises(MergeError, match="Unknown merge mode 'nope'"):
        combine([t1], [1.0], "nope")


def test_svd_merge_dare_is_reproducible_and_seeded(tmp_path):
    a, b = _lora(tmp_path / "a.safetensors", 0), _lora(tmp_path / "b.safetensors", 1)
    outs = [merge_svd([(a, 1.0), (b, 1.0)], tmp_path / f"m{i}.safetensors", mode="dare_ties", density=0.5,
                      rank=8, seed=seed, clamp_quantile=None, dtype=torch.float32).path
            for i, seed in enumerate((3, 3, 4))]
    with open_lora(outs[0]) as x, open_lora(outs[1]) as y, open_lora(outs[2]) as z:
        name = sorted(x.modules)[0]
        assert torch.equal(x.delta(name), y.delta(name))
        assert not torch.equal(x.delta(name), z.delta(name))
    with pytest.raises(SvdError, match="density"):
        merge_svd([(a, 1.0)], tmp_path / "d.safetensors", mode="ties", density=0.0, rank=2)


# ------------------------------------------------------------------------------------------- CLI

def _cli(argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    lo = sub.add_parser("lora")
    add_svd_commands(lo.add_subparsers(dest="lora_command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_commands(tmp_path, sd1_pair, capsys):
    d, _ = sd1_pair
    out = tmp_path / "x.safetensors"
    assert _cli(["lora", "extract", "--base", str(d / "base.safetensors"), "--tuned", str(d / "tuned.safetensors"),
                 "--rank", "2", "--conv-rank", "2", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert _cli(["lora", "resize", str(out), "--dynamic", "sv_fro:0.9", "--max-rank", "1",
                 "-o", str(tmp_path / "r.safetensors")]) == 0
    assert _cli(["lora", "merge-svd", "--mode", "ties", "--density", "0.5", "--lora", f"{out}:0.5",
                 "--lora", str(tmp_path / "r.safetensors"), "--rank", "2", "-o", str(tmp_path / "m.safetensors")]) == 0
    with open_lora(tmp_path / "m.safetensors") as lf:
        assert lf.family == "sd1" and all(m.rank <= 2 for m in lf.modules.values())
    with pytest.raises(MergeError):
        _cli(["lora", "resize", str(out), "-o", str(tmp_path / "q.safetensors")])


def test_outputs_are_checked_before_any_work(tmp_path, sd1_pair):
    d, _ = sd1_pair
    a = _lora(tmp_path / "a.safetensors", 0)
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    for call in (lambda o: resize(a, o, rank=2), lambda o: merge_svd([(a, 1.0)], o, rank=2),
                 lambda o: extract(d / "base.safetensors", d / "tuned.safetensors", o, 2)):
        for out in (tmp_path / "taken.safetensors", a, tmp_path / "x.ckpt"):
            with pytest.raises(OutputError):
                call(out)
    with pytest.raises(OutputError):
        extract(d / "base.safetensors", d / "tuned.safetensors", d / "base.safetensors", 2)


def test_main_cli_wires_the_commands_and_exits_2_on_user_errors(tmp_path, capsys):
    from lib_merge.cli import main
    a = _lora(tmp_path / "a.safetensors", 0)
    assert main(["lora", "resize", str(a), "--rank", "2", "--dtype", "fp32", "-o", str(tmp_path / "r.safetensors")]) == 0
    assert main(["lora", "merge-svd", "--lora", f"{a}:1", "--rank", "0", "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "at least 1" in capsys.readouterr().err
