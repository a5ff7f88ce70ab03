"""Standalone generation: checkpoint-layout state dicts -> diffusers modules -> images, fully offline.

Tiny runnable checkpoints (keysets.make_runnable_state_dict) have every real key name and small consistent
shapes; merges go through lib_merge.engine.merge.merge like any other.
"""
from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lib_merge.core.arch import detect  # noqa: E402
from lib_merge.core.errors import CancelledError, InputError, MergeError  # noqa: E402
from lib_merge.core.files import save_state_dict  # noqa: E402
from lib_merge.core.generation import GenerationRequest  # noqa: E402
from lib_merge.core.keysets import checkpoint_keys
from lib_merge.engine.merge import merge  # noqa: E402
from lib_merge.engine.recipe import ModelRef, Recipe  # noqa: E402
from lib_merge.engine.sinks import DictSink, TensorSink
from lib_merge.preview import tokenizers as T  # noqa: E402
from lib_merge.preview.configs import UNET, VAE, derive_spec  # noqa: E402
from lib_merge.preview.convert import _build_modules, _check_targets, _targets, key_map  # noqa: E402
from lib_merge.preview.generator import Generator  # noqa: E402
from lib_merge.preview.tiny import make_runnable_state_dict, runnable_keys, tiny_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a photo of a cat", negative_prompt="blurry", seed=1, steps=3, cfg_scale=7.0,
                width=64, height=64, sampler="Euler a", batch_size=1)
    base.update(kw)
    return GenerationRequest(**base)


def pixels(img) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models: one thread is several times faster than two on a busy 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def tiny(family: str, seed: int = 0, variant: str = "") -> dict[str, torch.Tensor]:
    """make_runnable_state_dict, built once per run (callers must not modify it)."""
    return make_runnable_state_dict(family, seed, variant=variant)


SEEDS = {"sd1": 1, "sd2": 0, "sdxl": 3}


@pytest.fixture(scope="module")
def runnable(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runnable")
    states, paths = {}, {}
    for name, family, seed in (("sd1_a", "sd1", 1), ("sd1_b", "sd1", 2), ("sdxl_a", "sdxl", 3)):
        states[name] = tiny(family, seed)
        paths[name] = save_state_dict(states[name], folder / f"{name}.safetensors")
    return states, paths


@pytest.fixture(scope="module")
def gen():
    return Generator()


@pytest.fixture(scope="module")
def xl_gen():
    return Generator()


def merged(paths, alpha: float, sink=None, **kw):
    r = Recipe("weighted_sum", [ModelRef("sd1_a.safetensors", str(paths["sd1_a"])),
                                ModelRef("sd1_b.safetensors", str(paths["sd1_b"]))],
               params={"alpha": alpha}, dtype="float32", **kw)
    return merge(r, sink or DictSink(), hashes=False)


# ------------------------------------------------------------------------------------- tiny runnable models

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_runnable_checkpoints_have_the_real_key_names(family):
    sd = tiny(family, SEEDS[family])
    assert list(sd) == runnable_keys(family)
    assert {k.key for k in checkpoint_keys(family)} <= set(sd) <= {k.key for k in checkpoint_keys(family, with_optional=True)}
    assert detect({k: tuple(v.shape) for k, v in sd.items()}).family == family
    # the configs derived from the shapes are those the tiny model was built from
    assert derive_spec({k: v.shape for k, v in sd.items()}).signature() == tiny_spec(family).signature()
    # GroupNorm-friendly: every UNet/VAE norm has channels divisible by 32
    for k, v in sd.items():
        if k.startswith(("model.diffusion_model.", "first_stage_model.")) and k.endswith("norm.weight"):
            assert v.shape[0] % 32 == 0, k
    if family == "sd1":
        again = make_runnable_state_dict(family, seed=SEEDS[family])
        assert all(torch.equal(sd[k], again[k]) for k in sd), "same seed, same weights"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_configs_are_those_of_the_released_models(family):
    """Shapes of real checkpoints (the key tables) -> configs; modules built on the meta device (no memory)."""
    shapes = {k: tuple(s) for k, s in ((k.key, k.shape) for k in checkpoint_keys(family, with_optional=True))
              if k not in ("v_pred", "ztsnr") and not k.startswith("edm_vpred.")}
    spec = derive_spec(shapes)
    u, v = spec.unet, spec.vae
    want_unet = {
        "sd1": dict(block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768,
                    use_linear_projection=False, transformer_layers_per_block=[1, 1, 1, 1]),
        "sd2": dict(block_out_channels=[320, 640, 1280, 1280], attention_head_dim=[5, 10, 20, 20],
                    cross_attention_dim=1024, use_linear_projection=True),
        "sdxl": dict(block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                     use_linear_projection=True, transformer_layers_per_block=[1, 2, 10],
                     addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]),
    }[family]
    assert {k: u[k] for k in want_unet} == want_unet
    assert u["layers_per_block"] == 2 and u["in_channels"] == 4
    assert v["block_out_channels"] == [128, 256, 512, 512] and v["latent_channels"] == 4
    assert v["scaling_factor"] == (0.13025 if family == "sdxl" else 0.18215)
    texts = [(t.config["hidden_size"], t.config["num_hidden_layers"], t.config["num_attention_heads"],
              t.config["hidden_act"], t.with_projection) for t in spec.texts]
    assert texts == {"sd1": [(768, 12, 12, "quick_gelu", False)],
                     "sd2": [(1024, 23, 16, "gelu", False)],
                     "sdxl": [(768, 12, 12, "quick_gelu", False), (1280, 32, 20, "gelu", True)]}[family]
    modules = _build_modules(spec, torch.device("meta"), torch.float16)
    kmap = key_map(shapes, spec)
    targets = _targets(modules, kmap, shapes)
    assert _check_targets(modules, kmap, targets, shapes, lambda m, p: False) == []
    millions = {n: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for n, m in modules.items()}
    assert millions["unet"] == {"sd1": 859.5, "sd2": 865.9, "sdxl": 2567.5}[family]
    assert millions["vae"] == 83.7


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_key_mapping_agrees_with_diffusers_own_converters(family, runnable):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    sd = tiny(family, SEEDS[family])
    spec = derive_spec({k: v.shape for k, v in sd.items()})
    kmap = key_map(sd, spec)
    # UNet: diffusers' converter only moves dict entries, so key names as values give its key mapping
    theirs = convert_ldm_unet_checkpoint({k: k for k in sd if k.startswith(UNET)}, spec.unet)
    ours = {t.params[0]: k for k, t in kmap.items() if t.module == "unet"}
    assert ours == theirs
    # VAE: compare values (the converter reshapes the attention's 1x1 convolutions)
    theirs = convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if k.startswith(VAE)}, spec.vae)
    ours = {t.params[0]: k for k, t in kmap.items() if t.module == "vae"}
    assert set(ours) == set(theirs)
    for name, key in ours.items():
        assert torch.equal(theirs[name].reshape(sd[key].shape), sd[key]), name


def _openclip_reference(sd, prefix, ids, n_layers, heads):
    """OpenCLIP's text transformer (as the LDM/SGM code runs it), straight from the checkpoint tensors."""
    import torch.nn.functional as F
    w = sd[prefix + "token_embedding.weight"]
    x = w[ids] + sd[prefix + "positional_embedding"]
    width, n = w.shape[1], ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(n_layers):
        p = f"{prefix}transformer.resblocks.{i}."
        mha = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        mha.in_proj_weight.data, mha.in_proj_bias.data = sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]
        mha.out_proj.weight.data, mha.out_proj.bias.data = sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        x = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                         sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x


def _ln_final(sd, prefix, x):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), sd[prefix + "ln_final.weight"], sd[prefix + "ln_final.bias"])


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_openclip_text_towers_convert_exactly(family, xl_gen):
    """Fused in_proj -> q/k/v, transposed text_projection, penultimate layers: against a plain reference."""
    sd = tiny(family, SEEDS[family])
    g = xl_gen if family == "sdxl" else Generator()
    g.load(sd)
    t = g.spec.texts[-1]
    prefix, heads = t.prefix, t.config["num_attention_heads"]
    chunks = g._chunks(g.tokenizers[t.name], "a photo of a cat")
    ids = torch.tensor(chunks)
    assert ids[0, 7:].eq(0).all(), "OpenCLIP pads with '!' (id 0)"
    hidden, pooled = g._encode_one(t, chunks)
    with torch.no_grad():
        if family == "sd2":   # ln_final(output of resblock 22): the penultimate of 24 layers
            want = _ln_final(sd, prefix, _openclip_reference(sd, prefix, ids, 23, heads))
            torch.testing.assert_close(hidden, want, rtol=1e-4, atol=1e-4)
        else:                 # hidden state after 31 of 32 layers; pooled = ln_final(all 32)[eot] @ text_projection
            torch.testing.assert_close(hidden, _openclip_reference(sd, prefix, ids, 31, heads), rtol=1e-4, atol=1e-4)
            full = _ln_final(sd, prefix, _openclip_reference(sd, prefix, ids, 32, heads))
            want_pooled = full[0, ids[0].argmax()] @ sd[prefix + "text_projection"]
            torch.testing.assert_close(pooled[0], want_pooled, rtol=1e-4, atol=1e-4)
    # the fused target IS the live q/k/v: writing it changes the model
    key = prefix + "transformer.resblocks.0.attn.in_proj_weight"
    target = g.module_targets()[key]
    q = g.modules[t.name].text_model.encoder.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        target[0, 0] = 123.0
    assert q[0, 0].item() == 123.0
    g.load(sd)
    assert q[0, 0].item() == sd[key][0, 0].item()


# ------------------------------------------------------------------------------------- merge -> images

def test_sd1_merge_generates_deterministic_images(runnable, gen):
    states, paths = runnable
    res = merged(paths, 0.5)
    warnings = gen.load(res.output, name="merge_a_b", model_hash="0123456789")
    assert warnings == [] and gen.spec.family == "sd1"
    progress = []
    out = gen.generate(req(batch_size=2), progress=lambda f, text: progress.append(f))
    assert len(out.images) == 2 and out.images[0].size == (64, 64)
    assert progress[-1] == 1.0 and len(progress) == 3
    a = pixels(out.images[0])
    assert a.std() > 1, "not a flat image"
    b = pixels(out.images[1])
    assert not np.array_equal(a, b), "seed and seed+1 differ"
    again = gen.generate(req(batch_size=2)).images
    assert np.array_equal(a, pixels(again[0])) and np.array_equal(b, pixels(again[1])), "same seed, same pixels"
    # image i of a batch is the image of seed + i (up to float rounding of batched convolutions)
    assert np.abs(b - pixels(gen.generate(req(seed=2)).images[0])).max() <= 1
    assert out.infotexts[0] == ("a photo of a cat\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 7, "
                                "Seed: 1, Size: 64x64, Model hash: 0123456789, Model: merge_a_b, Batch size: 2, "
                                "Batch pos: 0")
    assert "Seed: 2," in out.infotexts[1]
    # another merge: the modules are reused (weights copied in place), and the image changes
    gen.load(merged(paths, 0.0).output)
    assert gen.last_timings["rebuilt"] == 0.0
    img0 = pixels(gen.generate(req()).images[0])
    gen.load(merged(paths, 1.0).output)
    img1 = pixels(gen.generate(req()).images[0])
    assert not np.array_equal(img0, img1)
    assert not np.array_equal(img0, a)
    # alpha 0 is model A exactly
    gen.load(states["sd1_a"])
    assert np.array_equal(pixels(gen.generate(req()).images[0]), img0)


def test_live_merge_straight_into_the_modules(runnable):
    """engine.merge into Generator.sink() (built from the merge's shapes) == load(merged state dict);
    a re-merge into a TensorSink of module_targets() changes the live model in place."""
    states, paths = runnable
    g = Generator()
    sink = g.sink(name="live", model_hash="abcdef0123")
    merged(paths, 0.3, sink=sink)
    assert sink.skipped == ["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    live = g.generate(req(sampler="DPM++ 2M"))
    assert "Model hash: abcdef0123, Model: live" in live.infotexts[0]
    g2 = Generator()
    g2.load(merged(paths, 0.3).output)
    assert np.array_equal(pixels(live.images[0]), pixels(g2.generate(req(sampler="DPM++ 2M")).images[0]))
    modules_before = g.modules["unet"]
    targets = g.module_targets()
    assert not any(k.endswith("position_ids") for k in targets)
    merged(paths, 0.9, sink=TensorSink(targets))
    assert g.modules["unet"] is modules_before
    assert not np.array_equal(pixels(live.images[0]), pixels(g.generate(req(sampler="DPM++ 2M")).images[0]))
    # an interrupted merge leaves the generator refusing to generate, not half-merged
    r = Recipe("weighted_sum", [ModelRef("a", str(paths["sd1_a"])), ModelRef("b", str(paths["sd1_b"]))],
               params={"alpha": 0.5}, dtype="float32")
    with pytest.raises(CancelledError):
        merge(r, g.sink(), hashes=False, cancel=lambda: True)
    with pytest.raises(MergeError, match="No model is loaded"):
        g.generate(req())


@pytest.mark.parametrize("sampler", ["Euler a", "DDIM"])
def test_same_images_as_the_diffusers_pipeline(runnable, gen, sampler):
    gen.load(runnable[0]["sd1_b"])
    ours = gen.generate(req(sampler=sampler, seed=5, batch_size=2)).images
    pipe = gen.pipeline(sampler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.0, width=64,
                  height=64, num_images_per_prompt=2, generator=[torch.Generator().manual_seed(5 + i) for i in range(2)],
                  ).images
    for a, b in zip(ours, theirs):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1   # float rounding only


def test_sdxl_converts_and_generates(runnable, xl_gen):
    states, _ = runnable
    sd = states["sdxl_a"]
    g = xl_gen
    assert g.load(sd) == []
    assert g.spec.family == "sdxl" and g.spec.unet["addition_embed_type"] == "text_time"
    r = req(negative_prompt="", steps=2)
    out = g.generate(r)
    img = pixels(out.images[0])
    assert out.images[0].size == (64, 64) and img.std() > 1
    assert np.array_equal(img, pixels(g.generate(r).images[0]))
    pipe = g.pipeline("Euler a")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=7.0, width=64, height=64,
                  generator=[torch.Generator().manual_seed(1)]).images[0]
    assert np.abs(pixels(theirs) - img).max() <= 1
    # SDXL files may lack CLIP-L's last layer and final norm: SDXL never uses them, the image is the same
    pruned = {k: v for k, v in sd.items()
              if not k.startswith(("conditioner.embedders.0.transformer.text_model.encoder.layers.11.",
                                   "conditioner.embedders.0.transformer.text_model.final_layer_norm."))}
    g2 = Generator()
    assert len(g2.load(pruned)) == 1
    assert np.array_equal(img, pixels(g2.generate(r).images[0]))
    # ... but not the second encoder's projection
    with pytest.raises(MergeError, match="text_projection.*pooled prompt embedding"):
        Generator().load({k: v for k, v in sd.items() if not k.endswith("embedders.1.model.text_projection")})


def test_old_sd1_text_encoder_key_names(runnable, gen):
    """cond_stage_model.transformer.encoder.… (no 'text_model.'), as in some old SD1 files: same model."""
    sd = runnable[0]["sd1_a"]
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v for k, v in sd.items()}
    gen.load(sd)
    want = pixels(gen.generate(req(steps=2)).images[0])
    g = Generator()
    g.load(old)
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in g.module_targets()
    assert np.array_equal(pixels(g.generate(req(steps=2)).images[0]), want)


def test_inpainting_model_generates():
    g = Generator()
    g.load(tiny("sd1", 5, "inpainting"))
    assert g.spec.variant == "inpainting" and g.spec.unet["in_channels"] == 9
    assert pixels(g.generate(req(steps=2)).images[0]).std() > 1


# ------------------------------------------------------------------------------------- tokenizers, errors

def test_tokenizers_from_each_source(tmp_path, monkeypatch):
    T.clear_cache()
    tok, src = T.load_tokenizer("clip_l", hf_cache=False)
    assert src.startswith("bpe:")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    # a folder with vocab.json + merges.txt (what a diffusers model's tokenizer/ folder holds)
    T.write_vocab_from_bpe(T.bundled_bpe_files()[0], tmp_path / "tokenizer")
    tok2, src2 = T.load_tokenizer("open_clip", tmp_path)
    assert src2.startswith("folder:") and tok2.pad_token == "!" and tok2.pad_token_id == 0
    assert tok2("a photo of a cat").input_ids == tok("a photo of a cat").input_ids
    # a folder that was given but does not exist, or holds no tokenizer: said so, nothing else is tried
    with pytest.raises(MergeError, match="does not exist"):
        T.load_tokenizer("clip_l", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="neither vocab.json"):
        Generator(tokenizer_dir=str(tmp_path / "empty")).load(tiny("sd1", 1))
    # no source at all: the message says how to add one
    monkeypatch.setattr(T, "bundled_bpe_files", lambda: [])
    T.clear_cache()
    with pytest.raises(MergeError, match="No CLIP tokenizer.*clip-anytorch"):
        Generator(hf_cache=False).load(tiny("sd1", 1))
    T.clear_cache()


def test_clear_errors(runnable, gen):
    states, _ = runnable
    with pytest.raises(MergeError, match="No model is loaded"):
        Generator().generate(req())
    gen.load(states["sd1_a"])
    with pytest.raises(InputError, match="Unknown sampler 'Foo'.*Euler a"):
        gen.generate(req(sampler="Foo"))
    with pytest.raises(InputError, match="multiples of 8"):
        gen.generate(req(width=60))
    with pytest.raises(CancelledError):
        gen.generate(req(), cancel=lambda: True)
    no_vae = {k: v for k, v in states["sd1_a"].items() if not k.startswith("first_stage_model.")}
    with pytest.raises(MergeError, match="no VAE"):
        Generator().load(no_vae)
    # a separate VAE file's state (keys without the prefix) fills the gap
    vae = {k[len("first_stage_model."):]: v for k, v in states["sd1_b"].items() if k.startswith("first_stage_model.")}
    g = Generator()
    g.load(no_vae, vae=vae)
    assert torch.equal(g.module_targets()["first_stage_model.decoder.conv_out.weight"],
                       states["sd1_b"]["first_stage_model.decoder.conv_out.weight"])
    with pytest.raises(MergeError, match="no text encoder"):
        Generator().load({k: v for k, v in states["sd1_a"].items() if not k.startswith("cond_stage_model.")})


def test_seed_minus_one_is_random_and_reported(runnable, gen):
    gen.load(runnable[0]["sd1_a"])
    info = gen.generate(req(seed=-1, steps=1)).infotexts[0]
    seed = int(info.split("Seed: ")[1].split(",")[0])
    assert 0 <= seed < 2 ** 32


def test_importing_the_generator_imports_no_diffusers():
    code = ("import sys; import lib_merge.preview.generator, lib_merge.preview.tokenizers, lib_merge.core.keysets; "
            "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cuda_float16_generation(family):
    """On a GPU in float16 (the VAE stays float32); the initial noise still comes from CPU generators."""
    g = Generator(device="cuda", dtype=torch.float16)
    g.load(tiny(family, SEEDS[family]))
    assert g.modules["unet"].dtype == torch.float16 and g.modules["vae"].dtype == torch.float32
    r = req(negative_prompt="" if family == "sdxl" else "blurry", batch_size=2)
    a = g.generate(r).images
    assert pixels(a[0]).std() > 1
    b = g.generate(r).images
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a, b))
    # the same merge on the CPU in float32 gives nearly the same picture
    c = Generator()
    c.load(tiny(family, SEEDS[family]))
    assert np.abs(pixels(c.generate(r).images[0]) - pixels(a[0])).mean() < 8
