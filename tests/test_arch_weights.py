"""Architecture detection, key -> block mapping, presets and the block-weight text form."""
import pytest

from lib_merge.core.arch import block_names, block_of, component_of, detect
from lib_merge.core.errors import InputError, UnsupportedModelError
from lib_merge.core.keysets import checkpoint_keys
from lib_merge.core.weights import PRESETS, format_blocks, parse_blocks, preset, value_for_key

U = "model.diffusion_model."


def shapes_of(family, variant=""):
    d = {k.key: k.shape for k in checkpoint_keys(family)}
    if variant == "inpainting":
        w = d[U + "input_blocks.0.0.weight"]
        d[U + "input_blocks.0.0.weight"] = (w[0], 9, w[2], w[3])
    return d


@pytest.mark.parametrize("family,n", [("sd1", 26), ("sd2", 26), ("sdxl", 20)])
def test_detect_families_and_block_counts(family, n):
    arch = detect(shapes_of(family))
    assert arch.family == family and arch.variant == ""
    assert len(arch.blocks) == n
    assert arch.blocks[0] == "BASE" and arch.blocks[-1] == ("OUT08" if family == "sdxl" else "OUT11")


def test_detect_inpainting_variant():
    arch = detect(shapes_of("sd1", "inpainting"))
    assert (arch.family, arch.variant) == ("sd1", "inpainting")
    assert arch.label == "SD1.x inpainting"


@pytest.mark.parametrize("keys,word", [
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "Stable Diffusion 3"),
    (["double_blocks.0.img_attn.qkv.weight"], "Flux"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
    ([], "empty"),
    (["some.random.weight"], "not a Stable Diffusion checkpoint"),
])
def test_unsupported_families_are_named(keys, word):
    with pytest.raises(UnsupportedModelError, match=word):
        detect({k: (4, 4) for k in keys}, "x.safetensors")


def test_every_real_unet_key_has_a_block_and_mapping_is_exact():
    for family in ("sd1", "sd2", "sdxl"):
        for k in checkpoint_keys(family):
            comp = component_of(k.key)
            b = block_of(k.key, family)
            if comp == "unet":
                assert b in block_names(family), k.key
            elif comp == "text_encoder":
                assert b == "BASE"
            else:
                assert b is None  # VAE
    # trailing-dot matching: block 1 must not catch block 10/11
    assert block_of(U + "input_blocks.1.0.in_layers.0.weight", "sd1") == "IN01"
    assert block_of(U + "input_blocks.10.0.in_layers.0.weight", "sd1") == "IN10"
    assert block_of(U + "output_blocks.11.1.proj_out.weight", "sd1") == "OUT11"
    assert block_of(U + "time_embed.0.weight", "sd1") == "IN00"
    assert block_of(U + "label_emb.0.0.weight", "sdxl") == "IN00"
    assert block_of(U + "middle_block.1.norm.weight", "sdxl") == "M00"
    assert block_of(U + "out.2.weight", "sd1") == "OUT11"
    assert block_of(U + "out.0.bias", "sdxl") == "OUT08"
    assert block_of("conditioner.embedders.1.model.ln_final.weight", "sdxl") == "BASE"
    assert block_of("first_stage_model.decoder.conv_in.weight", "sd1") is None


def test_presets_have_the_right_length_and_shape():
    for family, n in (("sd1", 26), ("sdxl", 20)):
        for name in PRESETS:
            v = preset(name, family)
            assert len(v) == n, name
    v = preset("GRAD_V", "sd1")
    assert v[0] == 0 and v[1] == 1.0 and v[12] == pytest.approx(1 / 12) and v[13] == 0
    assert v[14] == pytest.approx(1 / 12) and v[25] == 1.0
    a = preset("GRAD_A", "sd1")
    assert a[13] == 1.0 and a[1] == 0.0 and a[25] == 0.0
    s = preset("SMOOTHSTEP", "sdxl")
    assert s[1] == 0.0 and s[-1] == 1.0 and all(x <= y for x, y in zip(s[1:], s[2:]))
    io = preset("IN_ONLY", "sd1")
    assert io[1:13] == [1.0] * 12 and io[13:] == [0.0] * 13 and io[0] == 0.0


def test_text_form_numbers_pairs_wildcards_and_presets():
    nums = ",".join(str(i / 100) for i in range(26))
    assert parse_blocks(nums, "sd1", 0.5) == [i / 100 for i in range(26)]
    v = parse_blocks("IN*=0.3, M00=1", "sd1", 0.5)
    assert v[0] == 0.5 and v[1:13] == [0.3] * 12 and v[13] == 1.0 and v[14:] == [0.5] * 12
    v = parse_blocks("GRAD_V, BASE=0.2", "sdxl", 0.5)
    assert v[0] == 0.2 and v[1:] == preset("GRAD_V", "sdxl")[1:]
    v = parse_blocks("OUT0?=0.9", "sd1", 0)
    assert v[14:24] == [0.9] * 10 and v[24:] == [0, 0]
    assert parse_blocks("", "sd1", 0.5) is None
    # the canonical form parses back to itself
    assert parse_blocks(format_blocks(preset("COSINE", "sd1"), "sd1"), "sd1", 0) == pytest.approx(preset("COSINE", "sd1"), abs=1e-4)


@pytest.mark.parametrize("text,word", [
    ("1,2,3", "26 block weights"),
    ("IN12=1", "matches no"),
    ("FOO", "Unknown block-weight preset"),
    ("IN00=x", "not a number"),
    ("IN00=1, GRAD_V", "neither a number"),
])
def test_text_form_errors(text, word):
    with pytest.raises(InputError, match=word):
        parse_blocks(text, "sd1", 0.5)


def test_sdxl_takes_20_values():
    with pytest.raises(InputError, match="SDXL takes 20"):
        parse_blocks(",".join(["0.5"] * 26), "sdxl", 0.5)


def test_value_for_key():
    blocks = [i / 100 for i in range(26)]
    assert value_for_key(U + "input_blocks.4.1.proj_in.weight", "sd1", blocks, 9) == 0.05
    assert value_for_key("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1", blocks, 9) == 0.0
    assert value_for_key("first_stage_model.encoder.conv_in.weight", "sd1", blocks, 9) == 9
    assert value_for_key(U + "out.0.weight", "sd1", None, 9) == 9


def test_detect_instruct_pix2pix_and_unet_only_files():
    d = shapes_of("sd1")
    w = d[U + "input_blocks.0.0.weight"]
    d[U + "input_blocks.0.0.weight"] = (w[0], 8, w[2], w[3])
    assert detect(d).variant == "instruct-pix2pix"
    unet_only = {k: v for k, v in shapes_of("sdxl").items() if k.startswith(U)}
    assert detect(unet_only).family == "sdxl"
    unet_only = {k: v for k, v in shapes_of("sd2").items() if k.startswith(U)}
    assert detect(unet_only).family == "sd2"
