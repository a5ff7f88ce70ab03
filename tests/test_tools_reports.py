"""normalize, inject_noise, text/PNG reports and the tool subcommands of the CLI, end to end in-process."""
import argparse
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from lib_merge.cli.tools import add_tool_commands
from lib_merge.core import masks
from lib_merge.core.errors import InputError, MergeError, OutputError
from lib_merge.core.files import open_model
from lib_merge.core.masks import Mask
from lib_merge.core.weights import WeightSet
from lib_merge.tools import report, transform as tools

U = "model.diffusion_model."
ATTN = [U + "input_blocks.1.1.transformer_blocks.0.attn1", U + "input_blocks.1.1.transformer_blocks.0.attn2",
        U + "middle_block.1.transformer_blocks.0.attn2", U + "output_blocks.11.1.transformer_blocks.0.attn1"]
TO_V = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight"


def _read_all(path):
    with open_model(path) as m:
        return {k: m.read(k) for k in m.tensors}


# ----------------------------------------------------------------------------------- normalize

def test_normalize_attn_only_keeps_attention_logits_and_matches_q_norm(tiny, tmp_path):
    a, b = tiny.state["sd1_a"], tiny.state["sd1_b"]
    result = tools.normalize(tiny.path["sd1_a"], tiny.path["sd1_b"], tmp_path / "n.safetensors")
    out = _read_all(result.path)
    assert list(out) == list(a)                                       # A's keys in A's order
    for p in ATTN:
        q, k = p + ".to_q.weight", p + ".to_k.weight"
        # the logits are (x Wqᵀ)(c Wkᵀ)ᵀ = x (Wqᵀ Wk) cᵀ, so Wqᵀ Wk is what must not change
        assert torch.allclose(out[q].T @ out[k], a[q].T @ a[k], rtol=1e-5, atol=1e-6)
        assert out[q].norm().item() == pytest.approx(b[q].norm().item(), rel=1e-6)
        s = b[q].norm().item() / a[q].norm().item()
        assert out[k].norm().item() == pytest.approx(a[k].norm().item() / s, rel=1e-6)
        assert not torch.equal(out[q], a[q])
    n_attn = sum(k.endswith(".to_q.weight") for k in a)
    assert len(result.changed) == 2 * n_attn and not result.notes
    untouched = [k for k in a if k not in result.changed]
    assert all(torch.equal(out[k], a[k]) for k in untouched)          # V, to_out, everything else: A's bits


def test_normalize_magnify_all_and_none(tiny, tmp_path):
    a, b = tiny.state["sd1_a"], tiny.state["sd1_b"]
    q = ATTN[1] + ".to_q.weight"
    mag = _read_all(tools.normalize(tiny.path["sd1_a"], tiny.path["sd1_b"], tmp_path / "m.safetensors",
                                    magnify=True).path)
    assert mag[q].norm().item() == pytest.approx(a[q].norm().item() ** 2 / b[q].norm().item(), rel=1e-5)

    res = tools.normalize(tiny.path["sd1_a"], tiny.path["sd1_b"], tmp_path / "all.safetensors", mode="all")
    out = _read_all(res.path)
    w, bias = U + "input_blocks.4.0.in_layers.2.weight", U + "input_blocks.4.0.in_layers.2.bias"
    s = b[w].norm().item() / a[w].norm().item()
    assert out[w].norm().item() == pytest.approx(b[w].norm().item(), rel=1e-6)
    assert torch.allclose(out[bias], a[bias] * s, rtol=1e-6)          # the bias follows its weight's s
    vae = "first_stage_model.decoder.conv_in.weight"
    assert torch.equal(out[vae], a[vae])                              # the VAE is copied
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert out[te].norm().item() == pytest.approx(b[te].norm().item(), rel=1e-6)

    same = _read_all(tools.normalize(tiny.path["sd1_a"], tiny.path["sd1_b"], tmp_path / "none.safetensors",
                                     mode="none", dtype=torch.float16).path)
    assert same[q].dtype == torch.float16 and torch.equal(same[q], a[q].half())
    assert same["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_normalize_sdxl_attention_and_refusals(tiny, tmp_path):
    a = tiny.state["sdxl_a"]
    out = _read_all(tools.normalize(tiny.path["sdxl_a"], tiny.path["sdxl_b"], tmp_path / "x.safetensors").path)
    p = U + "input_blocks.4.1.transformer_blocks.0.attn2"
    assert torch.allclose(out[p + ".to_q.weight"].T @ out[p + ".to_k.weight"],
                          a[p + ".to_q.weight"].T @ a[p + ".to_k.weight"], rtol=1e-5, atol=1e-6)
    with pytest.raises(OutputError, match="over an input"):
        tools.normalize(tiny.path["sd1_a"], tiny.path["sd1_b"], tiny.path["sd1_b"], overwrite=True)
    with pytest.raises(InputError, match="Unknown normalize mode"):
        tools.normalize(tiny.path["sd1_a"], tiny.path["sd1_b"], tmp_path / "y.safetensors", mode="q_norm")


# ----------------------------------------------------------------------------------- noise

def test_inject_noise_gaussian_statistics_and_reproducibility(tiny, tmp_path):
    a = tiny.state["sd1_a"]
    res = tools.inject_noise(tiny.path["sd1_a"], tmp_path / "g.safetensors", kind="gaussian", ratio=0.9,
                             mean=0.05, std=0.5, layers="*.to_v*", seed=1)
    out = _read_all(res.path)
    assert res.changed and all(k.endswith("to_v.weight") for k in res.changed)
    d = torch.cat([(out[k] - a[k]).reshape(-1) for k in res.changed])
    n = d.numel()
    # result − A = (1 − ratio)·(N(mean, std) − mean): mean 0, std 0.1·0.5 = 0.05
    assert abs(d.mean().item()) < 5 * 0.05 / math.sqrt(n)
    assert d.std().item() == pytest.approx(0.05, rel=5 / math.sqrt(2 * n))
    assert all(torch.equal(out[k], a[k]) for k in a if k not in res.changed)
    again = _read_all(tools.inject_noise(tiny.path["sd1_a"], tmp_path / "g2.safetensors", kind="gaussian",
                                         ratio=0.9, std=0.5, layers="*.to_v*", seed=1).path)
    other = _read_all(tools.inject_noise(tiny.path["sd1_a"], tmp_path / "g3.safetensors", kind="gaussian",
                                         ratio=0.9, std=0.5, layers="*.to_v*", seed=2).path)
    assert all(torch.equal(out[k], again[k]) for k in res.changed)   # same seed: same bits (mean cancels)
    assert not torch.equal(out[TO_V], other[TO_V])


def test_inject_noise_uniform_with_a_mask(tiny, tmp_path):
    a = tiny.state["sd1_a"]
    mask = masks.simple(a, "random", probability=0.5, seed=4)
    res = tools.inject_noise(tiny.path["sd1_a"], tmp_path / "u.safetensors", kind="uniform", ratio=0.8,
                             layers="input_blocks", mask=mask, seed=3)
    out = _read_all(res.path)
    moved, kept = [], []
    for k in res.changed:
        m, d = mask.tensor(k), (out[k] - a[k]).reshape(-1)
        moved.append(d[m.reshape(-1)])
        kept.append(d[~m.reshape(-1)])
    moved, kept = torch.cat(moved), torch.cat(kept)
    assert torch.all(kept == 0)                                       # False elements keep A's values
    # (1 − ratio)·(U[0,1) − 0.5): within ±0.1, std 0.2/√12
    assert moved.abs().max().item() <= 0.1 + 1e-6
    assert moved.std().item() == pytest.approx(0.2 / math.sqrt(12), rel=0.05)
    with pytest.raises(InputError, match="layer patterns"):
        tools.inject_noise(tiny.path["sd1_a"], tmp_path / "x.safetensors")


def test_inject_noise_failure_leaves_no_file(tiny, tmp_path):
    wrong = Mask()
    wrong.put(TO_V, torch.ones(3, 3, dtype=torch.bool))               # the tiny to_v is (10, 10)
    with pytest.raises(InputError, match="another architecture"):
        tools.inject_noise(tiny.path["sd1_a"], tmp_path / "f.safetensors", layers="*.to_v*", mask=wrong)
    assert list(tmp_path.iterdir()) == []                              # no output, no .partial


# ----------------------------------------------------------------------------------- reports

def _known_mask():
    m = Mask(family="sd1")
    m.put(U + "input_blocks.1.1.proj_in.weight", torch.ones(10, 10, dtype=torch.bool))     # IN01: 100/100
    t = torch.zeros(40, dtype=torch.bool)
    t[:10] = True
    m.put(U + "input_blocks.10.0.in_layers.0.weight", t)                                    # IN10: 10/40
    m.put("cond_stage_model.transformer.text_model.final_layer_norm.weight", torch.zeros(24, dtype=torch.bool))
    return m


def test_mask_report_text_and_png(tmp_path):
    text = report.mask_report(_known_mask(), details=True)
    lines = {ln.split()[0]: ln for ln in text.splitlines()[2:] if ln.strip()}
    assert "100.00%" in lines["IN01"] and "100 / 100" in lines["IN01"]
    assert "25.00%" in lines["IN10"] and "10 / 40" in lines["IN10"]
    assert "0.00%" in lines["BASE"]
    assert text.splitlines()[0] == "mask: 3 keys, 110 of 164 elements true (67.07%)"
    assert f"{U}input_blocks.10.0.in_layers.0.weight: 10 / 40 (25.00%)" in text
    png = report.mask_report_png(_known_mask(), tmp_path / "m.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100
    with pytest.raises(OutputError, match=".png"):
        report.mask_report_png(_known_mask(), tmp_path / "m.jpg")


def test_weights_report_text_and_png(tmp_path):
    ws = WeightSet({U + "input_blocks.1.0.in_layers.2.weight": 0.25, U + "input_blocks.1.1.proj_in.weight": 0.75,
                    U + "middle_block.0.in_layers.2.weight": 1.0}, arch="sd1")
    text = report.weights_report(ws)
    lines = {ln.split()[0]: ln.split() for ln in text.splitlines()[2:] if ln.strip() and ":" not in ln}
    assert lines["IN01"] == ["IN01", "2", "0.5", "0.25", "0.75"]
    assert lines["M00"] == ["M00", "1", "1", "1", "1"]
    assert f"{U}input_blocks.1.1.proj_in.weight: 0.75" in text
    with Image.open(report.weights_report_png(ws, tmp_path / "w.png")) as im:
        assert im.format == "PNG"


def test_layer_report_heat_map(tiny, tmp_path):
    key = U + "input_blocks.1.1.proj_in.weight"
    t = tiny.state["sd1_a"][key]
    for scaling in ("none", "abs", "log"):
        text = report.layer_report(tiny.path["sd1_a"], key, tmp_path / f"{scaling}.png", scaling)
        with Image.open(tmp_path / f"{scaling}.png") as im:
            assert im.format == "PNG"
    assert f"shape {list(t.shape)}" in text and f"max {t.max().item():.6g}" in text
    img, full = report.layer_image(torch.arange(10.0), "none")      # 1-D: wrapped into 3 x 4, 2 cells blank
    assert full == (3, 4) and torch.isnan(img[2, 2:]).all() and img[2, 1].item() == 9.0
    img, full = report.layer_image(torch.ones(3000, 5), "log", max_side=1000)
    assert full == (3000, 5) and tuple(img.shape) == (1000, 5) and torch.allclose(img, torch.zeros(1000, 5), atol=1e-6)
    with pytest.raises(InputError, match="has no tensor 'out.2.weight'"):
        report.layer_report(tiny.path["sd1_a"], "out.2.weight")


def test_importing_report_does_not_import_matplotlib():
    code = "import sys, lib_merge.tools.report, lib_merge.cli.tools; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert done.stdout.strip() == "False"


# ----------------------------------------------------------------------------------- CLI

def _cli(*argv):
    p = argparse.ArgumentParser()
    add_tool_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args([str(a) for a in argv])
    return args.func(args)


def test_cli_masks_end_to_end(tiny, tmp_path, capsys):
    model = tiny.path["sd1_a"]
    assert _cli("mask", "simple", "--model", model, "--probability", "0.3", "--seed", "1", "-o", tmp_path / "r.safetensors") == 0
    r = Mask.load(tmp_path / "r.safetensors")
    assert r.family == "sd1" and torch.equal(r.tensor(TO_V), masks.simple(tiny.state["sd1_a"], probability=0.3, seed=1).tensor(TO_V))
    assert _cli("mask", "quad", "--model", model, "-o", tmp_path / "q.safetensors") == 0
    quads = [Mask.load(tmp_path / f"q_{i}.safetensors") for i in range(4)]
    assert _cli("mask", "op", "union", tmp_path / "q_0.safetensors", tmp_path / "q_1.safetensors",
                "-o", tmp_path / "u.safetensors") == 0
    u = Mask.load(tmp_path / "u.safetensors")
    assert torch.equal(u.tensor(TO_V), quads[0].tensor(TO_V) | quads[1].tensor(TO_V))
    assert _cli("mask", "magnitude", "--model", tiny.path["sd1_b"], "--base", model, "--select", "above",
                "--threshold", "0.9", "-o", tmp_path / "mg.safetensors") == 0
    mg = Mask.load(tmp_path / "mg.safetensors")
    d = (tiny.state["sd1_b"][TO_V] - tiny.state["sd1_a"][TO_V]).abs()
    assert torch.equal(mg.tensor(TO_V), d >= torch.quantile(d.reshape(-1), 0.9))
    assert _cli("mask", "edit", tmp_path / "mg.safetensors", "--layers", "input_blocks.1", "--op", "true",
                "-o", tmp_path / "e.safetensors") == 0
    assert Mask.load(tmp_path / "e.safetensors").tensor(TO_V).all()
    assert "Wrote mask" in capsys.readouterr().out
    with pytest.raises(InputError, match="'nowhere'"):
        _cli("mask", "edit", tmp_path / "mg.safetensors", "--layers", "nowhere", "-o", tmp_path / "x.safetensors")
    with pytest.raises(OutputError, match="already exists"):
        _cli("mask", "simple", "--model", model, "-o", tmp_path / "r.safetensors")
    with pytest.raises(InputError, match="give one -o"):
        _cli("mask", "quad", "--model", model, "-o", tmp_path / "1.safetensors", "-o", tmp_path / "2.safetensors")


def test_cli_weights_end_to_end(tiny, tmp_path):
    model = tiny.path["sd1_a"]
    assert _cli("weights", "blocks", "--model", model, "--blocks", "IN10=0.7", "-o", tmp_path / "b.json") == 0
    assert WeightSet.load(tmp_path / "b.json")[U + "input_blocks.10.0.in_layers.2.weight"] == 0.7
    assert _cli("weights", "shell", "--model", model, "--core", "0.9", "--exterior", "0.1", "-o", tmp_path / "s.json") == 0
    assert _cli("weights", "groups", "--model", model, "--input-blocks", "0.5", "--out-block", "0.2",
                "--te", "0", "-o", tmp_path / "g.json") == 0
    g = WeightSet.load(tmp_path / "g.json")
    assert g[U + "input_blocks.1.1.proj_in.weight"] == 0.5 and g[U + "out.2.weight"] == 0.2
    assert g["cond_stage_model.transformer.text_model.final_layer_norm.weight"] == 0.0
    # --base, the old name of --te, still works and means the same
    assert _cli("weights", "groups", "--model", model, "--input-blocks", "0.5", "--out-block", "0.2",
                "--base", "0", "-o", tmp_path / "g_old.json") == 0
    assert WeightSet.load(tmp_path / "g_old.json") == g
    assert _cli("weights", "attention", "--model", model, "--attn", "1", "-o", tmp_path / "a.json") == 0
    assert _cli("weights", "op", tmp_path / "s.json", tmp_path / "g.json", "--op", "add", "-o", tmp_path / "sg.json") == 0
    sg = WeightSet.load(tmp_path / "sg.json")
    assert sg[U + "input_blocks.10.0.in_layers.2.weight"] == pytest.approx(1.4)         # core 0.9 + input 0.5
    assert _cli("weights", "edit", tmp_path / "sg.json", "--layers", "input_blocks.10", "--op", "multiply",
                "--value", "0.5", "-o", tmp_path / "e.json") == 0
    assert WeightSet.load(tmp_path / "e.json")[U + "input_blocks.10.0.in_layers.2.weight"] == pytest.approx(0.7)
    with pytest.raises(InputError, match="at least one value"):
        _cli("weights", "shell", "--model", model, "-o", tmp_path / "none.json")
    with pytest.raises(OutputError, match=".json"):
        _cli("weights", "shell", "--model", model, "--core", "1", "-o", tmp_path / "w.safetensors")


def test_cli_normalize_noise_and_reports(tiny, tmp_path, capsys):
    a = tiny.path["sd1_a"]
    assert _cli("normalize", "--model", a, "--model", tiny.path["sd1_b"], "--mode", "attn_only",
                "-o", tmp_path / "n.safetensors") == 0
    q = ATTN[0] + ".to_q.weight"
    assert _read_all(tmp_path / "n.safetensors")[q].norm().item() == pytest.approx(
        tiny.state["sd1_b"][q].norm().item(), rel=1e-6)
    assert _cli("noise", "--model", a, "--kind", "gaussian", "--ratio", "0.98", "--mean", "0.05", "--std", "0.01",
                "--layers", "*.to_v*", "--seed", "1", "--dtype", "float16", "-o", tmp_path / "z.safetensors") == 0
    assert _read_all(tmp_path / "z.safetensors")[TO_V].dtype == torch.float16
    with pytest.raises(MergeError, match="over an input"):
        _cli("noise", "--model", a, "--layers", "*.to_v*", "-o", a, "--overwrite")
    with pytest.raises(InputError, match="two models"):
        _cli("normalize", "--model", a, "-o", tmp_path / "n2.safetensors")
    capsys.readouterr()

    _known_mask().save(tmp_path / "k.safetensors")
    assert _cli("report", "mask", tmp_path / "k.safetensors", "--model", a, "--png", tmp_path / "k.png") == 0
    out = capsys.readouterr().out
    assert "25.00%" in out and "67.07%" in out
    with Image.open(tmp_path / "k.png") as im:
        assert im.format == "PNG"
    with pytest.raises(InputError, match="not found"):
        _cli("report", "weights", tmp_path / "missing.json")
    WeightSet({U + "out.2.weight": 0.5}, "sd1").save(tmp_path / "w.json")
    assert _cli("report", "weights", tmp_path / "w.json", "--png", tmp_path / "w.png") == 0
    assert "OUT11" in capsys.readouterr().out and (tmp_path / "w.png").exists()
    assert _cli("report", "layer", a, "--key", TO_V, "--scaling", "abs", "--png", tmp_path / "l.png") == 0
    assert "shape [10, 10]" in capsys.readouterr().out
    with pytest.raises(OutputError, match="already exists"):
        _cli("report", "layer", a, "--key", TO_V, "--png", tmp_path / "l.png")
    with pytest.raises(InputError, match="not found"):
        _cli("report", "layer", tmp_path / "gone.safetensors", "--key", TO_V, "--png", tmp_path / "l.png", "--overwrite")
