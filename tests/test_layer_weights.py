"""Layer patterns and layer weights (weight sets): builders, edits, operations and files."""
import json

import pytest

from lib_merge.core import weights as W
from lib_merge.core.arch import block_names
from lib_merge.core.errors import InputError, OutputError
from lib_merge.core.keysets import checkpoint_keys
from lib_merge.core.weights import WeightSet, match_keys

U = "model.diffusion_model."
TE1 = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
VAE = "first_stage_model.decoder.conv_in.weight"
PROJ_IN_10 = U + "input_blocks.10.1.proj_in.weight"  # the brief's example key (SD1 has no attention at IN10)


def shapes_of(family):
    d = {k.key: k.shape for k in checkpoint_keys(family)}
    if family != "sdxl":
        d[PROJ_IN_10] = (1280, 1280, 1, 1)
    return d


# --------------------------------------------------------------------------------- patterns

def test_patterns_trailing_dot_wildcards_and_prefix_forms():
    keys = [U + "input_blocks.1.0.weight", U + "input_blocks.10.0.weight", U + "input_blocks.1.1.attn2.to_v.weight",
            U + "out.0.bias", TE1]
    assert match_keys("input_blocks.1", keys) == [keys[0], keys[2]]                 # not input_blocks.10
    assert match_keys("diffusion_model.input_blocks.10", keys) == [keys[1]]          # comfy-style name
    assert match_keys(U + "input_blocks.10.0.weight", keys) == [keys[1]]             # a whole key
    assert match_keys("input_blocks.1*", keys) == keys[:3]                           # * crosses digits and dots
    assert match_keys("*.to_v*", keys) == [keys[2]]
    assert match_keys("*attn2", keys) == [keys[2]]                                   # up to a '.'
    assert match_keys("out, cond_stage_model\n", keys) == [keys[3], keys[4]]
    assert match_keys(" input _blocks.10 ", keys) == [keys[1]]                      # whitespace dropped
    assert match_keys("input_blocks.1.0", keys) == [keys[0]]
    with pytest.raises(InputError, match="'in'"):
        match_keys("in", keys)                                                       # no partial words
    with pytest.raises(InputError, match="'nope', 'x.y'"):
        match_keys("out,nope,x.y", keys)
    with pytest.raises(InputError, match="at least one"):
        match_keys(" , \n", keys)


# --------------------------------------------------------------------------------- builders

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_from_blocks_gives_each_key_its_block_value(family):
    names = block_names(family)
    values = [i / 100 for i in range(len(names))]
    ws = W.from_blocks(shapes_of(family), family, values)
    assert ws.arch == family
    assert ws[U + "input_blocks.4.1.proj_in.weight"] == names.index("IN04") / 100
    assert ws[U + "middle_block.1.proj_out.weight"] == names.index("M00") / 100
    assert ws[U + "out.2.weight"] == (len(names) - 1) / 100                           # the last OUT block
    assert ws[U + "time_embed.0.weight"] == names.index("IN00") / 100
    te = TE1 if family == "sd1" else "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
    assert ws[te] == 0.0                                                              # BASE
    assert VAE not in ws and not any(k.endswith("position_ids") for k in ws)
    if family == "sd1":
        assert ws[PROJ_IN_10] == names.index("IN10") / 100
        assert ws[U + "output_blocks.1.0.skip_connection.weight"] == names.index("OUT01") / 100
        text = W.from_blocks(shapes_of(family), family, "IN10=0.7", default=0.2)
        assert text[PROJ_IN_10] == 0.7 and text[U + "input_blocks.1.1.proj_in.weight"] == 0.2


def test_from_blocks_refuses_the_wrong_count():
    with pytest.raises(InputError, match="26"):
        W.from_blocks(shapes_of("sd1"), "sd1", [0.5] * 20)


def test_from_groups():
    vals = {"time": 0.1, "label": 0.2, "input": 0.3, "middle": 0.4, "output": 0.5, "out": 0.6}
    ws = W.from_groups(shapes_of("sdxl"), "sdxl", vals)
    assert ws[U + "time_embed.2.bias"] == 0.1
    assert ws[U + "label_emb.0.0.weight"] == 0.2
    assert ws[U + "input_blocks.8.0.emb_layers.1.weight"] == 0.3
    assert ws[U + "middle_block.2.out_layers.3.weight"] == 0.4
    assert ws[U + "output_blocks.0.0.skip_connection.weight"] == 0.5
    assert ws[U + "out.0.weight"] == 0.6
    assert not any(k.startswith("conditioner.") for k in ws)                        # no base: TE left out
    part = W.from_groups(shapes_of("sd1"), "sd1", {"middle": 1.0, "out": None}, base=0.25)
    assert set(part.values()) == {1.0, 0.25}
    assert part[TE1] == 0.25 and U + "out.0.weight" not in part and VAE not in part
    with pytest.raises(InputError, match="'inputs'"):
        W.from_groups(shapes_of("sd1"), "sd1", {"inputs": 1.0})


def test_from_attention():
    ws = W.from_attention(shapes_of("sd1"), "sd1", {"norm": 0.1, "attn": 0.2, "ff": 0.3})
    blk = U + "input_blocks.1.1.transformer_blocks.0."
    assert ws[blk + "attn1.to_q.weight"] == 0.2
    assert ws[blk + "attn2.to_out.0.bias"] == 0.2
    assert ws[blk + "norm1.weight"] == 0.1
    assert ws[U + "input_blocks.1.1.norm.weight"] == 0.1                             # the transformer's GroupNorm
    assert ws[blk + "ff.net.0.proj.weight"] == 0.3
    assert U + "input_blocks.1.1.proj_in.weight" not in ws
    assert U + "input_blocks.1.0.in_layers.0.weight" not in ws                       # resnet: neither part
    only_attn = W.from_attention(shapes_of("sd1"), "sd1", {"attn": 1.0})
    assert set(only_attn.values()) == {1.0} and blk + "norm1.weight" not in only_attn


def test_from_shell_sd1_uses_block_numbers_with_the_trailing_dot():
    ws = W.from_shell(shapes_of("sd1"), "sd1", {"exterior": 1.0, "interior": 2.0, "core": 3.0})
    def at(rest):
        return ws[U + rest]
    assert at("input_blocks.10.1.proj_in.weight") == 3.0                              # IN10: core, not exterior
    assert at("input_blocks.11.0.in_layers.2.weight") == 3.0
    assert at("input_blocks.3.0.op.weight") == 1.0
    assert at("input_blocks.4.0.in_layers.2.weight") == 2.0
    assert at("input_blocks.8.0.in_layers.2.weight") == 2.0
    assert at("input_blocks.9.0.op.weight") == 3.0
    assert at("middle_block.0.in_layers.2.weight") == 3.0
    assert at("output_blocks.3.0.in_layers.2.weight") == 3.0
    assert at("output_blocks.4.0.in_layers.2.weight") == 2.0
    assert at("output_blocks.8.0.in_layers.2.weight") == 2.0
    assert at("output_blocks.9.0.in_layers.2.weight") == 1.0
    assert at("output_blocks.11.0.in_layers.2.weight") == 1.0
    assert at("output_blocks.1.0.in_layers.2.weight") == 3.0                          # OUT01 core, not exterior
    assert at("time_embed.0.weight") == 1.0 and at("out.2.weight") == 1.0
    assert TE1 not in ws


def test_from_shell_sdxl():
    ws = W.from_shell(shapes_of("sdxl"), "sdxl", {"exterior": 1.0, "interior": 2.0, "core": 3.0}, base=0.0)
    expect = {"input_blocks.2.0.in_layers.2.weight": 1.0, "input_blocks.3.0.op.weight": 2.0,
              "input_blocks.5.0.in_layers.2.weight": 2.0, "input_blocks.6.0.op.weight": 3.0,
              "input_blocks.8.0.in_layers.2.weight": 3.0, "middle_block.1.proj_in.weight": 3.0,
              "output_blocks.2.0.in_layers.2.weight": 3.0, "output_blocks.3.0.in_layers.2.weight": 2.0,
              "output_blocks.5.0.in_layers.2.weight": 2.0, "output_blocks.6.0.in_layers.2.weight": 1.0,
              "label_emb.0.0.weight": 1.0, "out.0.weight": 1.0}
    assert {k: ws[U + k] for k in expect} == expect
    assert ws["conditioner.embedders.1.model.token_embedding.weight"] == 0.0


# --------------------------------------------------------------------------------- edits and operations

def _ws():
    return WeightSet({U + "input_blocks.1.0.weight": 0.5, U + "input_blocks.10.0.weight": 0.5,
                      U + "out.0.weight": 2.0}, arch="sd1")


@pytest.mark.parametrize("op,value,expected", [
    ("set", 0.2, 0.2), ("add", 0.2, 0.7), ("subtract", 0.2, 0.3), ("multiply", 3.0, 1.5), ("divide", 4.0, 0.125),
])
def test_edit_ops(op, value, expected):
    ws = _ws()
    out = W.edit(ws, "input_blocks.1", op, value)
    assert out[U + "input_blocks.1.0.weight"] == pytest.approx(expected)
    assert out[U + "input_blocks.10.0.weight"] == 0.5 and out[U + "out.0.weight"] == 2.0
    assert ws[U + "input_blocks.1.0.weight"] == 0.5 and out.arch == "sd1"          # a copy


def test_edit_errors():
    with pytest.raises(InputError, match="Division by zero"):
        W.edit(_ws(), "out", "divide", 0.0)
    with pytest.raises(InputError, match="'middle_block'"):
        W.edit(_ws(), "middle_block", "set", 1.0)
    with pytest.raises(InputError, match="Unknown weight edit"):
        W.edit(_ws(), "out", "power", 2.0)


@pytest.mark.parametrize("op,expected", [
    ("mean", 1.5), ("min", 1.0), ("max", 2.0), ("add", 3.0), ("subtract", -1.0), ("multiply", 2.0), ("divide", 0.5),
])
def test_combine_ops_and_joins(op, expected):
    a = WeightSet({"k": 1.0, "a_only": 4.0}, "sd1")
    b = WeightSet({"k": 2.0, "b_only": 8.0}, "sd1")
    inner = W.combine(a, b, op)
    assert dict(inner) == {"k": pytest.approx(expected)}
    outer = W.combine(a, b, op, join="outer")
    assert list(outer) == ["k", "a_only", "b_only"]
    assert outer["a_only"] == 4.0 and outer["b_only"] == 8.0 and outer.arch == "sd1"


def test_combine_errors():
    with pytest.raises(InputError, match="Division by zero at 'k'"):
        W.combine(WeightSet({"k": 1.0}), WeightSet({"k": 0.0}), "divide")
    with pytest.raises(InputError, match="sd1 weight set with a sdxl"):
        W.combine(WeightSet({}, "sd1"), WeightSet({}, "sdxl"), "add")
    with pytest.raises(InputError, match="join"):
        W.combine(WeightSet(), WeightSet(), "add", join="left")


# --------------------------------------------------------------------------------- files

def test_weight_set_file_round_trip_and_errors(tmp_path):
    ws = W.from_shell(shapes_of("sd1"), "sd1", {"core": 0.75})
    path = ws.save(tmp_path / "w.json")
    data = json.loads(path.read_text())
    assert data["format"] == "merge-lab-weights" and data["version"] == 1 and data["arch"] == "sd1"
    back = WeightSet.load(path)
    assert back == ws and back.arch == "sd1" and list(back) == list(ws)
    assert back.get(PROJ_IN_10, 0.0) == 0.75 and back.get(TE1, 0.3) == 0.3
    with pytest.raises(OutputError, match=".json"):
        ws.save(tmp_path / "w.txt")
    bad = {"broken.json": "{not json", "other.json": '{"format": "something"}',
           "version.json": '{"format": "merge-lab-weights", "version": 2, "weights": {}}',
           "value.json": '{"format": "merge-lab-weights", "version": 1, "weights": {"k": "high"}}'}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError):
            WeightSet.load(tmp_path / name)
    with pytest.raises(InputError, match="not found"):
        WeightSet.load(tmp_path / "missing.json")
    assert not list(tmp_path.glob("*.partial"))
