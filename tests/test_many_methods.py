"""Many-model methods against small hand-written reference loops (per element, per tensor)."""
import itertools

import pytest
import torch

from lib_merge.core.errors import InputError
from lib_merge.core.files import save_state_dict
from lib_merge.core.randomness import ChunkRandom
from lib_merge.engine.merge import merge
from lib_merge.engine.recipe import ModelRef, Recipe
from lib_merge.engine.sinks import DictSink

KEYS = [  # a few real SD1 keys of different shapes (tiny sizes)
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.middle_block.0.in_layers.0.bias",
    "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc1.weight",
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
]


@pytest.fixture(scope="module")
def family(tiny, tmp_path_factory):
    """Base + 4 fine-tunes; model 3 is the mirror of model 0 around the base (exact sign ties), model 4 = base."""
    folder = tmp_path_factory.mktemp("many")
    base = tiny.state["sd1_a"]
    ms = [tiny.state["sd1_b"], tiny.state["sd1_c"]]
    mirror = {k: (2 * base[k] - ms[0][k] if v.is_floating_point() else v) for k, v in base.items()}
    ms.append(mirror)
    ms.append(dict(base))
    paths = []
    for i, sd in enumerate(ms):
        p = folder / f"m{i}.safetensors"
        save_state_dict(sd, p)
        paths.append(p)
    return {"base": (tiny.path["sd1_a"], base), "models": list(zip(paths, ms))}


def run(family, method, idx, params=None, seed=0, **kw):
    models = [family["models"][i] for i in idx]
    r = Recipe(method, [ModelRef(p.name, str(p)) for p, _ in models],
               base=ModelRef("base", str(family["base"][0])), params=params or {}, seed=seed, dtype="float32")
    out = merge(r, DictSink(), **kw).output
    return out, [sd for _, sd in models], family["base"][1]


# ---------------------------------------------------------------------------------- reference loops

def ref_disjoint(deltas, election):
    """Per element, by hand: elect a sign, average the agreeing non-zero deltas."""
    n = len(deltas)
    flat = [d.flatten().tolist() for d in deltas]
    out = []
    for j in range(len(flat[0])):
        vals = [flat[i][j] for i in range(n)]
        if election == "off":
            kept = [v for v in vals if v != 0]
            out.append(sum(kept) / max(len(kept), 1))
            continue
        s = sum(vals) if election == "sum" else sum((v > 0) - (v < 0) for v in vals)
        g = (s > 0) - (s < 0)
        agree = [v for v in vals if v != 0 and ((v > 0) - (v < 0)) == g]
        out.append(sum(agree) / max(len(agree), 1))
    return torch.tensor(out, dtype=torch.float64).view(deltas[0].shape)


def ref_trim(delta, density):
    flat = delta.flatten().abs().tolist()
    keep = round(density * len(flat))
    if keep <= 0:
        return torch.zeros_like(delta)
    thr = sorted(flat, reverse=True)[keep - 1]
    return torch.where(delta.abs() >= thr, delta, torch.zeros_like(delta))


def ref_weiszfeld(points, eps=1e-6, maxiter=100, ftol=1e-20):
    z = sum(points) / len(points)
    prev = None
    for _ in range(maxiter):
        d = [max(float((x - z).norm()), eps) for x in points]
        f = sum(d) / len(d)
        beta = [1 / di for di in d]
        z = sum(b * x for b, x in zip(beta, points)) / sum(beta)
        if prev is not None and abs(prev - f) <= ftol * f:
            break
        prev = f
    return z


def deltas_of(models, base, key):
    # the subtraction in float32, as the engine computes deltas; the rest of each reference in float64
    return [(m[key] - base[key]).double() for m in models]


# ---------------------------------------------------------------------------------------------- tests

def test_uniform_and_weighted_soup(tiny):
    names = ["sd1_a", "sd1_b", "sd1_c"]
    refs = [ModelRef(n, str(tiny.path[n])) for n in names]
    out = merge(Recipe("uniform_soup", refs, dtype="float32"), DictSink()).output
    w = [1.0, 2.0, 5.0]
    outw = merge(Recipe("weighted_soup", refs, params={"weights": w}, dtype="float32"), DictSink()).output
    for k in KEYS:
        ts = [tiny.state[n][k].double() for n in names]
        torch.testing.assert_close(out[k].double(), sum(ts) / 3, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outw[k].double(), sum(wi * t for wi, t in zip(w, ts)) / 8, rtol=1e-5, atol=1e-6)


def test_task_arithmetic(family):
    out, models, base = run(family, "task_arithmetic", [0, 1], {"lambda": 0.7, "weights": [1.0, 0.5]})
    for k in KEYS:
        d = deltas_of(models, base, k)
        torch.testing.assert_close(out[k].double(), base[k].double() + 0.7 * (d[0] + 0.5 * d[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("election", ["sum", "count", "off"])
@pytest.mark.parametrize("density", [1.0, 0.3, 1e-9])
def test_ties_matches_reference(family, election, density):
    idx = [0, 1, 2]  # model 2 mirrors model 0: exact sign ties where model 1 is 0... and many 2-vs-1 votes
    out, models, base = run(family, "ties", idx, {"density": density, "election": election, "lambda": 0.9})
    for k in KEYS:
        trimmed = [ref_trim(d, density) for d in deltas_of(models, base, k)]
        want = base[k].double() + 0.9 * ref_disjoint(trimmed, election)
        torch.testing.assert_close(out[k].double(), want, rtol=1e-5, atol=1e-6)


def test_ties_sign_tie_and_all_zero_deltas(family, tiny, tmp_path):
    # values on a 2^-10 grid so that base ± d is exact in float32: m0 and its mirror tie everywhere
    grid = lambda t: (t * 1024).round() / 1024 if t.is_floating_point() else t
    base = {k: grid(v) for k, v in tiny.state["sd1_a"].items()}
    d = {k: grid(v) - base[k] if v.is_floating_point() else None for k, v in tiny.state["sd1_b"].items()}
    files = {}
    for name, sd in {"base": base,
                     "m0": {k: (v + d[k] if d[k] is not None else v) for k, v in base.items()},
                     "mirror": {k: (v - d[k] if d[k] is not None else v) for k, v in base.items()}}.items():
        files[name] = tmp_path / f"{name}.safetensors"
        save_state_dict(sd, files[name])
    for election in ("sum", "count"):
        r = Recipe("ties", [ModelRef("m0", str(files["m0"])), ModelRef("mirror", str(files["mirror"]))],
                   base=ModelRef("base", str(files["base"])), params={"election": election, "density": 1.0}, dtype="float32")
        out = merge(r, DictSink()).output
        for k in KEYS:
            assert torch.equal(out[k], base[k]), "a tied election leaves the base"
    # a model equal to the base has all-zero deltas: it never votes; TIES of (m1, base) = m1
    out, models, base = run(family, "ties", [1, 3], {"election": "count", "density": 1.0})
    for k in KEYS:
        torch.testing.assert_close(out[k], models[0][k], rtol=1e-6, atol=1e-7)


def test_ties_soup_is_ties_k1_sum(family):
    a, _, _ = run(family, "ties_soup", [0, 1, 2], {"lambda": 0.8})
    b, _, _ = run(family, "ties", [0, 1, 2], {"density": 1.0, "election": "sum", "lambda": 0.8})
    for k in KEYS:
        assert torch.equal(a[k], b[k])


def keep_masks(seed, key, shape, n, p):
    rng = ChunkRandom(seed, key, tuple(shape), None)
    return [(rng.uniform(i) >= p).double() for i in range(n)]


@pytest.mark.parametrize("p,rescale", [(0.0, True), (0.4, True), (0.4, False)])
def test_dare_linear_and_ties_match_reference(family, p, rescale):
    out, models, base = run(family, "dare_linear", [0, 1], {"drop": p, "rescale": rescale, "lambda": 1.0}, seed=5)
    outt, _, _ = run(family, "dare_ties", [0, 1, 2], {"drop": p, "rescale": rescale, "election": "count"}, seed=5)
    models3 = [family["models"][i][1] for i in [0, 1, 2]]
    scale = 1 / (1 - p) if rescale else 1.0
    for k in KEYS:
        masks = keep_masks(5, k, base[k].shape, 3, p)
        d = deltas_of(models, base, k)
        want = base[k].double() + scale * sum(m * x for m, x in zip(masks, d))
        torch.testing.assert_close(out[k].double(), want, rtol=1e-5, atol=1e-6)
        dropped = [m * x for m, x in zip(masks, deltas_of(models3, base, k))]
        torch.testing.assert_close(outt[k].double(), base[k].double() + scale * ref_disjoint(dropped, "count"),
                                   rtol=1e-5, atol=1e-6)
    if p == 0.0:  # no drop: DARE linear is task arithmetic
        ta, _, _ = run(family, "task_arithmetic", [0, 1])
        for k in KEYS:
            torch.testing.assert_close(out[k], ta[k])


def test_dare_drop_rate_and_errors(family):
    k = "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc1.weight"
    masks = keep_masks(1, k, (2000,), 1, 0.3)
    assert abs(float(masks[0].mean()) - 0.7) < 0.05
    with pytest.raises(InputError, match="drop = 1 with rescale"):
        run(family, "dare_linear", [0, 1], {"drop": 1.0, "rescale": True})


def test_tsd_is_dare_ties_sum(family):
    a, _, _ = run(family, "tsd", [0, 1, 2], {"drop": 0.2}, seed=3)
    b, _, _ = run(family, "dare_ties", [0, 1, 2], {"drop": 0.2, "election": "sum"}, seed=3)
    for k in KEYS:
        assert torch.equal(a[k], b[k])


def test_random_methods_do_not_depend_on_chunking_or_threads(family):
    a, _, _ = run(family, "tgmd", [0, 1, 2], {"drop": 0.3}, seed=9, threads=1)
    b, _, _ = run(family, "tgmd", [0, 1, 2], {"drop": 0.3}, seed=9, threads=2, chunk_elems=1000)
    c, _, _ = run(family, "tgmd", [0, 1, 2], {"drop": 0.3}, seed=10)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in KEYS)


@pytest.mark.parametrize("with_base", [False, True])
def test_geometric_median_matches_weiszfeld(family, with_base):
    idx = [0, 1, 2, 3]
    models = [family["models"][i] for i in idx]
    base = family["base"]
    r = Recipe("geometric_median", [ModelRef(p.name, str(p)) for p, _ in models],
               base=ModelRef("base", str(base[0])) if with_base else None, dtype="float32")
    out = merge(r, DictSink(), chunk_elems=1000).output
    for k in KEYS:
        want = ref_weiszfeld([sd[k].double() for _, sd in models])
        torch.testing.assert_close(out[k].double(), want, rtol=1e-4, atol=1e-5)


def test_tgmd_matches_reference(family):
    out, models, base = run(family, "tgmd", [0, 1, 2], {"drop": 0.25, "lambda": 0.5}, seed=4)
    for k in KEYS:
        masks = keep_masks(4, k, base[k].shape, 3, 0.25)
        dropped = [m * d for m, d in zip(masks, deltas_of(models, base, k))]
        s = torch.sign(sum(dropped))
        filtered = [d * ((torch.sign(d) == s) & (d != 0)) for d in dropped]
        want = base[k].double() + 0.5 * ref_weiszfeld(filtered) / 0.75
        torch.testing.assert_close(out[k].double(), want, rtol=1e-4, atol=1e-5)


def ref_stock(deltas):
    n = len(deltas)
    cos = []
    for i, j in itertools.combinations(range(n), 2):
        a, b = deltas[i].flatten(), deltas[j].flatten()
        na, nb = float(a.norm()), float(b.norm())
        cos.append(float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0)
    c = sum(cos) / len(cos)
    return n * c / (1 + (n - 1) * c)


@pytest.mark.parametrize("per_row", [False, True])
def test_model_stock(family, per_row):
    out, models, base = run(family, "model_stock", [0, 1, 3], {"per_row": per_row}, chunk_elems=1000)
    for k in KEYS:
        d = deltas_of(models, base, k)
        mean = sum(d) / len(d)
        if per_row and d[0].dim() >= 2:
            rows = [base[k][r].double() + ref_stock([x[r] for x in d]) * mean[r] for r in range(d[0].shape[0])]
            want = torch.stack(rows)
        else:
            want = base[k].double() + ref_stock(d) * mean
        torch.testing.assert_close(out[k].double(), want, rtol=1e-4, atol=1e-6)


def ref_dare_merge(a, b, masks, drop, ties, rescale, ratio):
    m = a.clone()
    for it, keep in enumerate(masks):
        delta = b - m
        if rescale:
            delta = delta / (1 - drop)
        if ties != "off":
            w = float(delta.sum()) if ties == "sum" else float(torch.sign(delta).sum())
            maj = 1.0 if w >= 0 else -1.0
            keep = keep.bool() & (torch.sign(delta) == maj)
        m = torch.where(keep.bool(), m + delta, m)
    return ratio * a + (1 - ratio) * m


@pytest.mark.parametrize("ties,iterations,rescale", [("sum", 1, False), ("count", 2, True), ("off", 3, False)])
def test_dare_merge_two_models(tiny, ties, iterations, rescale):
    refs = [ModelRef(n, str(tiny.path[n])) for n in ("sd1_a", "sd1_b")]
    r = Recipe("dare_merge", refs, params={"ratio": 0.25, "drop": 0.5, "ties": ties, "rescale": rescale,
                                           "iterations": iterations}, seed=2, dtype="float32")
    out = merge(r, DictSink(), chunk_elems=1000).output
    for k in KEYS:
        a, b = tiny.state["sd1_a"][k].double(), tiny.state["sd1_b"][k].double()
        masks = keep_masks(2, k, a.shape, iterations, 0.5)
        want = ref_dare_merge(a, b, masks, 0.5, ties, rescale, 0.25)
        torch.testing.assert_close(out[k].double(), want, rtol=1e-5, atol=1e-6)


def test_base_rules_and_lambda_blocks(family, tiny):
    p = [m[0] for m in family["models"]]
    with pytest.raises(InputError, match="needs a base model"):
        merge(Recipe("ties", [ModelRef(x.name, str(x)) for x in p[:2]]), DictSink())
    with pytest.raises(InputError, match="does not use a base"):
        merge(Recipe("uniform_soup", [ModelRef(x.name, str(x)) for x in p[:2]], base=ModelRef("b", str(p[2]))), DictSink())
    with pytest.raises(InputError, match="2 to 100 models"):
        merge(Recipe("uniform_soup", [ModelRef(p[0].name, str(p[0]))]), DictSink())
    with pytest.raises(InputError, match="3 weights given for 2 models"):
        merge(Recipe("weighted_soup", [ModelRef(x.name, str(x)) for x in p[:2]], params={"weights": [1, 2, 3]}), DictSink())
    # λ per block: IN_ONLY -> input blocks get the full TIES delta, output blocks stay at the base
    from lib_merge.core.weights import preset
    r = Recipe("ties_soup", [ModelRef(x.name, str(x)) for x in p[:2]], base=ModelRef("b", str(family["base"][0])),
               blocks={"lambda": preset("IN_ONLY", "sd1")}, dtype="float32")
    out = merge(r, DictSink()).output
    base = family["base"][1]
    assert torch.equal(out["model.diffusion_model.output_blocks.8.0.skip_connection.weight"],
                       base["model.diffusion_model.output_blocks.8.0.skip_connection.weight"])
    assert not torch.equal(out[KEYS[0]], base[KEYS[0]])


def test_one_hundred_models(tmp_path):
    """The many-model path at its limit: 100 small checkpoints (a few real SD1 keys each) and a base."""
    keys = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": (16,),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (24, 24, 1, 1),
            "model.diffusion_model.out.2.weight": (4, 24, 3, 3)}
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in keys.items()}
    save_state_dict(base, tmp_path / "base.safetensors")
    models = []
    for i in range(100):
        sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_state_dict(sd, tmp_path / f"m{i:03d}.safetensors")
        models.append(sd)
    refs = [ModelRef(f"m{i:03d}.safetensors", str(tmp_path / f"m{i:03d}.safetensors")) for i in range(100)]
    soup = merge(Recipe("uniform_soup", refs, dtype="float32"), DictSink(), threads=2).output
    ties = merge(Recipe("ties", refs, base=ModelRef("base", str(tmp_path / "base.safetensors")),
                        params={"density": 0.5}, dtype="float32"), DictSink(), threads=2).output
    for k in keys:
        torch.testing.assert_close(soup[k].double(), sum(m[k].double() for m in models) / 100, rtol=1e-5, atol=1e-6)
        trimmed = [ref_trim((m[k] - base[k]).double(), 0.5) for m in models]
        torch.testing.assert_close(ties[k].double(), base[k].double() + ref_disjoint(trimmed, "sum"),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="2 to 100 models"):
        merge(Recipe("uniform_soup", refs + refs[:1]), DictSink())
