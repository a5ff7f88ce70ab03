"""Merges against hand-computed formulas, per block, per component; recipes redo merges bit for bit."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_merge.core.arch import block_names, block_of, component_of
from lib_merge.core.weights import preset
from lib_merge.engine.merge import merge
from lib_merge.engine.recipe import ModelRef, Recipe
from lib_merge.engine.sinks import DictSink, FileSink

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def refs(tiny, *names):
    return [ModelRef(n + ".safetensors", str(tiny.path[n])) for n in names]


def per_key_alpha(key, family, blocks, default):
    b = block_of(key, family)
    return default if b is None or blocks is None else blocks[block_names(family).index(b)]


def expected_f32(formula, tensors):
    return formula(*[t.to(torch.float32) for t in tensors])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_weighted_sum_per_block_matches_formula(tiny, family):
    blocks = [round(0.04 * i, 2) for i in range(len(block_names(family)))]
    r = Recipe("weighted_sum", refs(tiny, f"{family}_a", f"{family}_b"), params={"alpha": 0.7},
               blocks={"alpha": blocks}, dtype="float32")
    res = merge(r, DictSink())
    out = res.output
    A, B = tiny.state[f"{family}_a"], tiny.state[f"{family}_b"]
    assert set(out) == set(A)
    checked_blocks = set()
    for key, t in out.items():
        comp = component_of(key)
        if key.endswith("position_ids"):
            assert t.dtype == torch.int64 and torch.equal(t, A[key])
        elif comp == "vae":
            assert torch.equal(t, A[key]), "VAE is kept from A by default"
        else:
            al = per_key_alpha(key, family, blocks, 0.7)
            checked_blocks.add(block_of(key, family))
            want = A[key] * (1 - al) + B[key] * al
            torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-6)
    assert checked_blocks == set(block_names(family))


def test_add_difference_sum_twice_triple_sum(tiny):
    A, B, C = (tiny.state[n] for n in ("sd1_a", "sd1_b", "sd1_c"))
    cases = [
        ("add_difference", {"alpha": 0.8}, lambda a, b, c: a + 0.8 * (b - c)),
        ("sum_twice", {"alpha": 0.3, "beta": 0.6}, lambda a, b, c: (a * 0.7 + b * 0.3) * 0.4 + c * 0.6),
        ("triple_sum", {"alpha": 0.2, "beta": 0.5}, lambda a, b, c: a * 0.3 + b * 0.2 + c * 0.5),
    ]
    for method, params, f in cases:
        r = Recipe(method, refs(tiny, "sd1_a", "sd1_b", "sd1_c"), params=params, dtype="float32")
        out = merge(r, DictSink()).output
        for key in ("model.diffusion_model.input_blocks.4.1.proj_in.weight",
                    "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight",
                    "model.diffusion_model.out.2.bias"):
            torch.testing.assert_close(out[key], f(A[key], B[key], C[key]), rtol=1e-5, atol=1e-6)


def test_beta_blocks_and_alpha_blocks_are_separate(tiny):
    A, B, C = (tiny.state[n] for n in ("sd1_a", "sd1_b", "sd1_c"))
    ab = preset("IN_ONLY", "sd1")
    bb = preset("OUT_ONLY", "sd1")
    r = Recipe("triple_sum", refs(tiny, "sd1_a", "sd1_b", "sd1_c"), params={"alpha": 0.1, "beta": 0.1},
               blocks={"alpha": ab, "beta": bb}, dtype="float32")
    out = merge(r, DictSink()).output
    k_in = "model.diffusion_model.input_blocks.2.0.in_layers.2.weight"
    k_out = "model.diffusion_model.output_blocks.5.0.in_layers.2.weight"
    torch.testing.assert_close(out[k_in], B[k_in])       # α=1, β=0
    torch.testing.assert_close(out[k_out], C[k_out])     # α=0, β=1


def test_components_vae_and_unet_only(tiny):
    A, B = tiny.state["sd1_a"], tiny.state["sd1_b"]
    vae = "first_stage_model.decoder.conv_in.weight"
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    r = Recipe("weighted_sum", refs(tiny, "sd1_a", "sd1_b"), params={"alpha": 0.5}, dtype="float32",
               components=["unet", "vae"])
    out = merge(r, DictSink()).output
    torch.testing.assert_close(out[vae], (A[vae] + B[vae]) / 2)
    assert torch.equal(out[te], A[te])


def test_fp16_output_is_cast_at_the_sink_only(tiny):
    # inputs in float16, compute in float32, cast once: equals the float32 formula cast to float16
    r = Recipe("weighted_sum", refs(tiny, "sd1_a_fp16", "sd1_b"), params={"alpha": 0.25}, dtype="float16")
    out = merge(r, DictSink()).output
    A16, B = tiny.state["sd1_a_fp16"], tiny.state["sd1_b"]
    k = "model.diffusion_model.middle_block.1.proj_in.weight"
    want = torch.lerp(A16[k].float(), B[k].float(), 0.25).half()
    assert out[k].dtype == torch.float16 and torch.equal(out[k], want)


def test_float64_compute(tiny):
    r = Recipe("add_difference", refs(tiny, "sd1_a", "sd1_b", "sd1_c"), params={"alpha": 1 / 3},
               dtype="float32", compute_dtype="float64")
    out = merge(r, DictSink()).output
    A, B, C = (tiny.state[n] for n in ("sd1_a", "sd1_b", "sd1_c"))
    k = "model.diffusion_model.input_blocks.1.1.proj_out.weight"
    want = (A[k].double() + (B[k].double() - C[k].double()) * (1 / 3)).float()
    assert torch.equal(out[k], want)


def test_inpainting_shape_mismatch_merges_common_channels(tiny):
    # A = inpainting (9 input channels), B = normal: the first 4 channels merged, the extra 5 kept from A
    r = Recipe("weighted_sum", [ModelRef("i", str(tiny.path["sd1_inpaint"])), ModelRef("b", str(tiny.path["sd1_b"]))],
               params={"alpha": 0.5}, dtype="float32")
    res = merge(r, DictSink())
    k = "model.diffusion_model.input_blocks.0.0.weight"
    A, B = tiny.state["sd1_inpaint"][k], tiny.state["sd1_b"][k]
    out = res.output[k]
    assert out.shape == A.shape and A.shape[1] == 9
    torch.testing.assert_close(out[:, :4], (A[:, :4] + B) / 2)
    assert torch.equal(out[:, 4:], A[:, 4:])
    assert any("differ in shape" in w for w in res.warnings)
    assert res.arch.variant == "inpainting"


def test_missing_keys_keep_a_or_error(tiny, tmp_path):
    from lib_merge.core.errors import InputError
    from lib_merge.core.files import save_state_dict
    B = dict(tiny.state["sd1_b"])
    gone = "model.diffusion_model.output_blocks.3.0.skip_connection.weight"
    del B[gone]
    p = tmp_path / "b_missing.safetensors"
    save_state_dict(B, p)
    r = Recipe("weighted_sum", [refs(tiny, "sd1_a")[0], ModelRef("b", str(p))], params={"alpha": 0.5}, dtype="float32")
    res = merge(r, DictSink())
    assert torch.equal(res.output[gone], tiny.state["sd1_a"][gone])
    assert any("missing" in w for w in res.warnings)
    r.missing_keys = "error"
    with pytest.raises(InputError, match="missing"):
        merge(r, DictSink())


def test_saved_file_metadata_and_recipe_redo_bit_for_bit(tiny, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    cmd = [sys.executable, "-m", "lib_merge", "merge", "--method", "weighted_sum",
           "--model", str(tiny.path["sd1_a"]), "--model", str(tiny.path["sd1_b"]),
           "--alpha", "0.4", "--blocks", "GRAD_V", "--seed", "7", "-o", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    webui = json.loads(meta["sd_merge_recipe"])
    models = json.loads(meta["sd_merge_models"])
    ours = json.loads(meta["merge_lab_recipe"])
    from lib_merge.core.files import file_hashes
    ha, hb = file_hashes(tiny.path["sd1_a"]), file_hashes(tiny.path["sd1_b"])
    assert webui["primary_model_hash"] == ha["sha256"] and webui["secondary_model_hash"] == hb["sha256"]
    assert webui["interp_method"] == "weighted_sum" and webui["multiplier"] == 0.4
    assert models[ha["sha256"]]["name"] == "sd1_a.safetensors" and models[hb["sha256"]]["legacy_hash"] == hb["legacy_hash"]
    assert ours["blocks"]["alpha"] == preset("GRAD_V", "sd1") and ours["arch"] == "sd1" and ours["seed"] == 7
    assert ours["models"][0]["short_hash"] == ha["short_hash"] and "path" not in ours["models"][0]
    # redo from the recipe alone (names resolved in --models-dir): identical bytes
    recipe_file = tmp_path / "r.json"
    recipe_file.write_text(meta["merge_lab_recipe"])
    out2 = tmp_path / "m2.safetensors"
    p = subprocess.run([sys.executable, "-m", "lib_merge", "merge", "--recipe", str(recipe_file),
                        "--models-dir", str(tiny.folder), "-o", str(out2)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == out2.read_bytes()
    # the same from the merged file itself (its metadata) and from `info --json` output, as the docs say
    from lib_merge.cli import main
    info = subprocess.run([sys.executable, "-m", "lib_merge", "info", str(out), "--json", "--no-hash"], cwd=ROOT,
                          capture_output=True, text=True)
    (tmp_path / "info.json").write_text(info.stdout)
    for source, name in ((out, "from_file"), (tmp_path / "info.json", "from_info")):
        again = tmp_path / f"{name}.safetensors"
        assert main(["merge", "--recipe", str(source), "--models-dir", str(tiny.folder), "-o", str(again)]) == 0
        assert again.read_bytes() == out.read_bytes(), name
    # flags beside --recipe: the ones that define the merge are refused, the others override (and say so)
    assert main(["merge", "--recipe", str(out), "--alpha", "0.9", "--models-dir", str(tiny.folder),
                 "-o", str(tmp_path / "no.safetensors")]) == 2
    assert not (tmp_path / "no.safetensors").exists()
    assert "--recipe defines the merge, so --alpha cannot be given with it" in capsys.readouterr().err
    assert main(["merge", "--recipe", str(out), "--dtype", "float32", "--models-dir", str(tiny.folder),
                 "-o", str(tmp_path / "f32.safetensors")]) == 0
    assert "--dtype float32 overrides the recipe's float16" in capsys.readouterr().out
    with safe_open(str(tmp_path / "f32.safetensors"), "pt") as f:
        assert f.get_tensor(k_any := next(iter(f.keys()))).dtype in (torch.float32, torch.int64), k_any
        assert json.loads(f.metadata()["merge_lab_recipe"])["dtype"] == "float32"
    # and the plain safetensors library reads the values
    sd = load_file(str(out2))
    B = tiny.state["sd1_b"]
    k = "model.diffusion_model.output_blocks.11.0.in_layers.0.weight"   # OUT11: GRAD_V = 1 -> B
    assert torch.equal(sd[k], B[k].half())


def test_recipe_with_wrong_model_hash_is_refused(tiny, tmp_path):
    r = Recipe("weighted_sum", refs(tiny, "sd1_a", "sd1_b"), params={"alpha": 0.5})
    r.models[1].sha256 = "0" * 64
    recipe_file = tmp_path / "r.json"
    recipe_file.write_text(r.to_json())
    p = subprocess.run([sys.executable, "-m", "lib_merge", "merge", "--recipe", str(recipe_file), "-o",
                        str(tmp_path / "x.safetensors")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "not the file this recipe was made with" in p.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_info_json(tiny):
    p = subprocess.run([sys.executable, "-m", "lib_merge", "info", str(tiny.path["sdxl_a"]), "--json"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["architecture"] == "sdxl" and info["block_count"] == 20
    assert set(info["components"]) == {"unet", "text_encoder", "vae"}
    assert info["params"] == sum(t.numel() for t in tiny.state["sdxl_a"].values())
    assert len(info["sha256"]) == 64 and info["short_hash"] == info["sha256"][:10]


def test_progress_reports_reach_the_total(tiny):
    seen = []
    r = Recipe("weighted_sum", refs(tiny, "sd1_a", "sd1_b"), params={"alpha": 0.5})
    merge(r, DictSink(), progress=seen.append, threads=2)
    assert seen and seen[-1].done_bytes == seen[-1].total_bytes
    assert all(x.done_bytes <= y.done_bytes for x, y in zip(seen, seen[1:]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method,names,params", [
    ("weighted_sum", ("sd1_a", "sd1_b"), {"alpha": 0.3}),
    ("add_difference", ("sd1_a", "sd1_b", "sd1_c"), {"alpha": 0.7}),
])
def test_same_bytes_on_cpu_and_gpu(tiny, tmp_path, method, names, params):
    outs = []
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.safetensors"
        merge(Recipe(method, refs(tiny, *names), params=params), FileSink(out), device=device)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_tensor_sink_writes_into_live_tensors_at_their_precision(tiny):
    from lib_merge.engine.sinks import TensorSink
    A, B = tiny.state["sd1_a"], tiny.state["sd1_b"]
    live = {k: torch.zeros_like(v) for k, v in A.items()}
    vae = "first_stage_model.decoder.conv_in.weight"
    sink = TensorSink(live, keys=lambda k: not k.startswith("first_stage_model."))
    merge(Recipe("weighted_sum", refs(tiny, "sd1_a", "sd1_b"), params={"alpha": 0.3}, dtype="float16"), sink,
          chunk_elems=1000)
    k = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    # the recipe saves float16, but a float32 live model gets the float32 result (no rounding on the way)
    assert torch.equal(live[k], torch.lerp(A[k], B[k], 0.3))
    assert torch.count_nonzero(live[vae]) == 0, "keys the sink does not want stay untouched"
    assert vae in sink.skipped


def test_tensor_sink_abort_hook_runs_when_a_merge_fails(tiny):
    from lib_merge.core.errors import CancelledError
    from lib_merge.engine.sinks import TensorSink
    calls = []
    live = {k: torch.zeros_like(v) for k, v in tiny.state["sd1_a"].items()}
    with pytest.raises(CancelledError):
        merge(Recipe("weighted_sum", refs(tiny, "sd1_a", "sd1_b")), TensorSink(live, on_abort=lambda: calls.append(1)),
              cancel=lambda: True)
    assert calls == [1]
