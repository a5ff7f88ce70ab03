"""Parameter masks: builders, seeding, bit packing, files, set operations and pattern edits."""
import math

import pytest
import torch

from lib_merge.core import masks
from lib_merge.core.errors import InputError, OutputError
from lib_merge.core.files import open_model, save_state_dict
from lib_merge.core.masks import Mask

U = "model.diffusion_model."
IN1 = U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"      # (10, 24) in the tiny SD1
IN10 = U + "input_blocks.10.0.in_layers.2.weight"                          # (40, 40, 3, 3)


def _share(mask: Mask) -> float:
    return sum(mask.true_count(k) for k in mask.keys()) / sum(mask.numel(k) for k in mask.keys())


def _bound(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)  # five standard errors of a Bernoulli share


def test_random_mask_share_matches_probability(tiny):
    m = masks.simple(tiny.state["sd1_a"], "random", probability=0.3, seed=1)
    n = sum(m.numel(k) for k in m.keys())
    assert abs(_share(m) - 0.3) < _bound(0.3, n)
    big = m.tensor(IN10)  # one key alone: 14,400 elements
    assert abs(big.float().mean().item() - 0.3) < _bound(0.3, big.numel())


def test_gaussian_mask_share_is_one_minus_phi():
    shapes = {U + "input_blocks.0.0.weight": (200, 500)}
    m = masks.simple(shapes, "gaussian", mean=0.5, std=1.0, threshold=0.0, seed=3)
    p = 0.5 * (1 + math.erf(0.5 / math.sqrt(2)))  # P(N(0.5, 1) > 0) = Φ(0.5) ≈ 0.6915
    assert abs(_share(m) - p) < _bound(p, 100_000)


def test_constant_masks_and_covered_keys(tiny):
    sd = tiny.state["sd1_a"]
    t, f = masks.simple(sd, "true"), masks.simple(sd, "false")
    assert _share(t) == 1.0 and _share(f) == 0.0
    keys = set(t.keys())
    assert not any(k.startswith("first_stage_model.") for k in keys)      # the VAE is not masked
    assert not any(k.endswith("position_ids") for k in keys)
    assert IN1 in keys and "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys


def test_same_seed_same_mask_in_any_key_order(tiny):
    sd = tiny.state["sd1_a"]
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    reversed_shapes = dict(reversed(list(shapes.items())))
    a = masks.simple(shapes, "random", probability=0.5, seed=7)
    b = masks.simple(reversed_shapes, "random", probability=0.5, seed=7)
    c = masks.simple(shapes, "random", probability=0.5, seed=8)
    assert set(a.keys()) == set(b.keys())
    assert all(torch.equal(a.tensor(k), b.tensor(k)) for k in a.keys())
    assert not torch.equal(a.tensor(IN10), c.tensor(IN10))
    qa, qb = masks.quad(shapes, seed=7), masks.quad(reversed_shapes, seed=7)
    assert all(torch.equal(x.tensor(IN10), y.tensor(IN10)) for x, y in zip(qa, qb))


def test_quad_masks_are_disjoint_and_cover_everything(tiny):
    quads = masks.quad(tiny.state["sd1_a"], seed=2)
    assert len(quads) == 4
    for key in quads[0].keys():
        stacked = torch.stack([q.tensor(key).to(torch.int8) for q in quads])
        assert torch.all(stacked.sum(0) == 1), key  # every element in exactly one mask
    n = sum(quads[0].numel(k) for k in quads[0].keys())
    for q in quads:
        assert abs(_share(q) - 0.25) < _bound(0.25, n)


def _tiny_pair():
    a, b = Mask(), Mask()
    a.put("both", torch.tensor([True, True, False, False]))
    b.put("both", torch.tensor([True, False, True, False]))
    a.put("a_only", torch.tensor([True, False, True]))
    b.put("b_only", torch.tensor([False, True]))
    return a, b


@pytest.mark.parametrize("op,both,keys", [
    ("union", [True, True, True, False], ["both", "a_only"]),
    ("intersection", [True, False, False, False], ["both"]),
    ("difference", [False, True, False, False], ["both", "a_only"]),
    ("xor", [False, True, True, False], ["both", "a_only", "b_only"]),
])
def test_set_operation_truth_tables(op, both, keys):
    a, b = _tiny_pair()
    out = masks.combine(a, b, op)
    assert out.keys() == keys
    assert out.tensor("both").tolist() == both
    if "a_only" in keys:
        assert out.tensor("a_only").tolist() == [True, False, True]  # copied from A
    if "b_only" in keys:
        assert out.tensor("b_only").tolist() == [False, True]        # copied from B (xor only)
    assert out.true_count("both") == sum(both)
    assert getattr(masks, op)(a, b).keys() == keys


def test_set_operations_refuse_mismatched_shapes_and_unknown_ops():
    a, b = Mask(), Mask()
    a.put("k", torch.ones(2, 3, dtype=torch.bool))
    b.put("k", torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(InputError, match="shape of 'k'"):
        masks.union(a, b)
    with pytest.raises(InputError, match="Unknown mask operation"):
        masks.combine(a, a, "nand")


SHAPES = {"a": (3, 5), "b": (7,), "c": (2, 3, 3), "d": (), "e": (9, 2), "f": (0, 4), "g": (13, 1, 1)}


def test_bit_packing_round_trip_through_a_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    m = Mask(family="sd1")
    full = {k: torch.rand(s, generator=g) < 0.5 for k, s in SHAPES.items()}
    for k, t in full.items():
        m.put(k, t)
    path = m.save(tmp_path / "m.safetensors")
    with open_model(path) as f:  # one packed uint8 tensor per key, ceil(n/8) bytes
        assert {k: f.tensors[k].shape for k in SHAPES} == {k: ((math.prod(s) + 7) // 8,) for k, s in SHAPES.items()}
        assert all(f.tensors[k].dtype == torch.uint8 for k in SHAPES)
    back = Mask.load(path)
    assert back.family == "sd1" and back.keys() == list(SHAPES)
    for k, t in full.items():
        assert back.shape(k) == SHAPES[k]
        assert torch.equal(back.get(k, SHAPES[k]), t)
        assert back.true_count(k) == int(t.sum())
    # row slices unpack only their bytes and come back shaped
    for k, (r0, r1) in {"a": (1, 3), "e": (3, 8), "g": (5, 13), "c": (1, 2), "b": (2, 7)}.items():
        assert torch.equal(back.get(k, SHAPES[k], rows=(r0, r1)), full[k][r0:r1])
    assert back.get("missing", (2,)) is None


def test_get_refuses_another_shape_and_load_refuses_other_files(tmp_path, tiny):
    m = Mask()
    m.put("k", torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="another architecture"):
        m.get("k", (4, 5))
    with pytest.raises(InputError, match="not a Merge Lab mask"):
        Mask.load(tiny.path["sd1_a"])
    with pytest.raises(InputError, match="not found"):
        Mask.load(tmp_path / "nope.safetensors")
    with pytest.raises(OutputError, match=".safetensors"):
        m.save(tmp_path / "m.bin")
    # a file claiming to be a mask but whose data does not fit the shapes
    save_state_dict({"k": torch.zeros(3, dtype=torch.uint8)}, tmp_path / "bad.safetensors",
                    {"format": "merge-lab-mask", "version": "1", "shapes": '{"k": [4, 4]}'})
    with pytest.raises(InputError, match="damaged"):
        Mask.load(tmp_path / "bad.safetensors")


def _delta_models(tmp_path, shape=(40, 50), seed=0):
    g = torch.Generator().manual_seed(seed)
    key = U + "input_blocks.4.1.proj_in.weight"
    a = {key: torch.randn(shape, generator=g), U + "out.0.bias": torch.randn(10, generator=g)}
    b = {key: a[key] + torch.randn(shape, generator=g), U + "out.0.bias": torch.randn(10, generator=g)}
    save_state_dict(a, tmp_path / "base.safetensors")
    save_state_dict(b, tmp_path / "model.safetensors")
    return key, (b[key] - a[key]).abs()


@pytest.mark.parametrize("t", [0.1, 0.5, 0.77])
def test_magnitude_selects_exactly_below_and_above_the_quantile(tmp_path, t):
    key, delta = _delta_models(tmp_path)
    tau = torch.quantile(delta.reshape(-1), t)
    with open_model(tmp_path / "model.safetensors") as m, open_model(tmp_path / "base.safetensors") as base:
        below = masks.magnitude(m, base, select="below", threshold=t)
        above = masks.magnitude(m, base, select="above", threshold=t, threshold_type="quantile")
    assert torch.equal(below.tensor(key), delta < tau)
    assert torch.equal(above.tensor(key), delta >= tau)
    assert below.true_count(key) + above.true_count(key) == delta.numel()
    assert abs(below.true_count(key) / delta.numel() - t) < 0.001


def test_magnitude_edge_quantiles_layers_and_missing_base_keys(tmp_path):
    key, _ = _delta_models(tmp_path)
    save_state_dict({key: torch.zeros(40, 50)}, tmp_path / "base_one_key.safetensors")
    with open_model(tmp_path / "model.safetensors") as m, open_model(tmp_path / "base.safetensors") as base:
        assert _share(masks.magnitude(m, base, select="below", threshold=0.0)) == 0.0
        assert _share(masks.magnitude(m, base, select="above", threshold=0.0)) == 1.0
        assert _share(masks.magnitude(m, base, select="below", threshold=1.0)) == 1.0
        assert _share(masks.magnitude(m, base, select="above", threshold=1.0)) == 0.0
        assert masks.magnitude(m, base, threshold=0.5, layers="input_blocks.4").keys() == [key]
        with pytest.raises(InputError, match="between 0 and 1"):
            masks.magnitude(m, base, threshold=1.5)
    with open_model(tmp_path / "model.safetensors") as m, open_model(tmp_path / "base_one_key.safetensors") as base:
        mk = masks.magnitude(m, base, threshold=0.5)
        assert mk.keys() == [key] and "out.0.bias" in mk.notes[0]


def test_magnitude_chunked_quantile_on_a_tensor_over_2_pow_24():
    # two equal chunks of 2^23 + 2^21 elements: the first uniform in [0, 1), the second in [1, 2),
    # so the chunk quantiles are about t and 1 + t and the two threshold types pick different ones
    n = 2 ** 24 + 2 ** 22
    g = torch.Generator().manual_seed(0)
    delta = torch.rand(n, generator=g)
    delta[n // 2:] += 1.0
    t = 0.7
    q0 = torch.quantile(delta[:n // 2], t).item()
    q1 = torch.quantile(delta[n // 2:], t).item()
    assert masks.magnitude_threshold(delta, t, "median") == q0          # lower middle of [q0, q1]
    assert masks.magnitude_threshold(delta, t, "quantile") == q1        # sorted[int(0.7 * 2)] = sorted[1]
    assert masks.magnitude_threshold(delta, 0.3, "quantile") == torch.quantile(delta[:n // 2], 0.3).item()
    above = masks.magnitude_select(delta, "above", t, "median")
    assert torch.equal(above, delta >= q0)


def test_edit_with_and_without_wildcards_and_the_trailing_dot(tiny):
    base = masks.simple(tiny.state["sd1_a"], "false")
    m = masks.edit(base, "input_blocks.1", "true")
    for k in m.keys():
        in_block_1 = k.startswith(U + "input_blocks.1.")
        assert (m.true_count(k) == m.numel(k)) if in_block_1 else m.true_count(k) == 0, k
    assert m.true_count(IN10) == 0  # input_blocks.10 is not input_blocks.1
    w = masks.edit(base, "*.attn2.to_k*,\n  model.diffusion_model.out", "true")
    changed = [k for k in w.keys() if w.true_count(k)]
    assert changed and all(k.endswith("attn2.to_k.weight") or k.startswith(U + "out.") for k in changed)
    assert base.true_count(IN1) == 0  # the original is untouched
    with pytest.raises(InputError, match="'input_blocks.99'"):
        masks.edit(base, "input_blocks.1, input_blocks.99", "true")


def test_edit_random_draws_what_simple_draws(tiny):
    sd = tiny.state["sd1_a"]
    edited = masks.edit(masks.simple(sd, "false"), "input_blocks.10", "random", probability=0.4, seed=5)
    fresh = masks.simple(sd, "random", probability=0.4, seed=5)
    assert torch.equal(edited.tensor(IN10), fresh.tensor(IN10))


def test_bad_builder_parameters():
    shapes = {IN1: (2, 2)}
    with pytest.raises(InputError, match="probability"):
        masks.simple(shapes, "random", probability=1.5)
    with pytest.raises(InputError, match="Unknown mask mode"):
        masks.simple(shapes, "noise")
    with pytest.raises(InputError, match="standard deviation"):
        masks.simple(shapes, "gaussian", std=-1)
