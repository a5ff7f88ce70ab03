"""Property-based tests (hypothesis) of the parsers that take user text: block weights, `--param NAME=VALUE`,
LoRA `FILE:W` arguments, XY axis values, recipes (JSON), LoRA block weights, elemental ratios, Adjust and
payload files.

Two kinds of property: valid input round-trips (format -> parse gives the values back, a recipe's JSON gives an
equal recipe), and arbitrary input either parses to a well-formed value or is refused with the project's
InputError and a sentence: never another exception (a traceback is a bug, see core/errors.py).
"""
from __future__ import annotations

import json
import math
import re
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from lib_merge.cli import make_parser
from lib_merge.cli.merge import build_recipe
from lib_merge.core.arch import COMPONENTS, block_names
from lib_merge.core.elemental import ADJUST_NAMES, check_adjust, parse_elemental
from lib_merge.core.errors import InputError
from lib_merge.core.weights import PRESETS, format_blocks, parse_blocks, preset
from lib_merge.engine.recipe import ModelRef, Recipe, recipe_from_text
from lib_merge.lora.lbw import LAYOUTS, parse_lbw
from lib_merge.lora.merge import LoraInput, parse_lora_arg
from lib_merge.methods import METHODS, get_method
from lib_merge.methods.spec import Choice
from lib_merge.optimize.payloads import read_payloads
from lib_merge.xy import MAX_VALUES, Axis

FAMILIES = {"sd1": 26, "sd2": 26, "sdxl": 20}
SEPS = [",", ", ", " ", ";", "\n", "\t", ",,", " ; "]
NUMBER_WORDS = ["0", "1", "-1", "0.5", ".5", "-.25", "1.", "+2", "1e3", "1E-3", "1e400", "-1e400", "1e-400",
                "nan", "inf", "-inf", "Infinity", "NaN", "0x10", "1_000", "99999999999999999999999", "--1", "1e",
                "e5", "١", "½", "0.5.5"]
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
ROUND = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(allow_nan=False, allow_infinity=False)
moderate = st.floats(-1e6, 1e6, allow_nan=False)


def refused_or(fn, *args, exc: type = InputError, **kwargs):
    """(value, None) when fn accepts the input, (None, message) when it refuses it with `exc`; any other
    exception propagates and fails the test. A refusal must carry a sentence."""
    try:
        return fn(*args, **kwargs), None
    except exc as e:
        msg = str(e)
        assert msg.strip() and len(msg) > 10, f"{type(e).__name__} with no real message: {msg!r}"
        return None, msg


def joined(pieces, seps=SEPS):
    """Text made of `pieces` with separators drawn from `seps` between them."""
    return st.lists(st.tuples(pieces, st.sampled_from(seps)), max_size=30).map(
        lambda xs: "".join(p + s for p, s in xs))


def texts(words):
    """Arbitrary unicode, or text made of the words a parser knows (plus noise) with its separators."""
    pieces = st.sampled_from(words) | st.text(max_size=4)
    return st.one_of(st.text(max_size=80), joined(pieces), joined(pieces, SEPS + ["=", ":", "-", "(", ")", "|"]))


# ================================================================================================ block weights
def _fmt_round(v: float) -> float:
    """What the 4-decimal text form keeps of a value."""
    return float(f"{v:.4f}")


@ROUND
@given(family=st.sampled_from(sorted(FAMILIES)), data=st.data())
def test_blocks_format_then_parse_round_trips(family, data):
    """format_blocks -> parse_blocks gives back every finite value (to the 4 decimals the text form keeps, exactly
    for values that have at most 4), for SD1/SD2 (26 blocks) and SDXL (20); the text form is canonical
    (formatting the parsed values gives the same text)."""
    n = FAMILIES[family]
    values = data.draw(st.lists(finite, min_size=n, max_size=n))
    text = format_blocks(values, family)
    parsed = parse_blocks(text, family, 0.5)
    assert len(parsed) == n == len(block_names(family))
    assert parsed == [_fmt_round(v) for v in values]
    assert all(math.isclose(p, v, rel_tol=1e-12, abs_tol=5.0001e-5) for p, v in zip(parsed, values))
    assert format_blocks(parsed, family) == text
    exact = data.draw(st.lists(st.integers(-10 ** 8, 10 ** 8).map(lambda k: k / 10 ** 4), min_size=n, max_size=n))
    assert parse_blocks(format_blocks(exact, family), family, 0.5) == exact
    # any separators the text box allows, and the list form
    sep = data.draw(st.sampled_from(SEPS))
    assert parse_blocks(sep.join(repr(v) for v in values), family, 0.5) == values
    assert parse_blocks(values, family, 0.5) == values


@ROUND
@given(family=st.sampled_from(sorted(FAMILIES)), default=moderate, data=st.data())
def test_blocks_name_value_pairs(family, default, data):
    """NAME=value pairs set the named blocks (any case, `*` patterns) and leave the others at the default."""
    names = block_names(family)
    chosen = data.draw(st.dictionaries(st.sampled_from(names), moderate, min_size=1, max_size=len(names)))
    text = ", ".join(f"{(n.lower() if data.draw(st.booleans()) else n)}={v!r}" for n, v in chosen.items())
    parsed = parse_blocks(text, family, default)
    assert parsed == [chosen.get(n, float(default)) for n in names]
    v = data.draw(moderate)
    assert parse_blocks(f"IN*={v!r}", family, default) == [v if n.startswith("IN") else float(default) for n in names]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_blocks_presets_by_name(family):
    """Every preset parses by its name (any case, with spaces around) to its own values, the right count of finite
    numbers; a preset followed by pairs is that preset with the pairs applied; an unknown name is refused."""
    names = block_names(family)
    for name in PRESETS:
        values = preset(name, family)
        assert len(values) == len(names) and all(math.isfinite(v) for v in values)
        assert parse_blocks(f"  {name.lower()} ", family, 0.5) == values
        assert parse_blocks(f"{name}, BASE=0.25, M00=-1", family, 0.5) == \
            [0.25 if n == "BASE" else -1.0 if n == "M00" else v for n, v in zip(names, values)]
    with pytest.raises(InputError, match="Unknown block-weight preset 'GRAD_Q'"):
        parse_blocks("GRAD_Q", family, 0.5)


@FUZZ
@given(family=st.sampled_from(sorted(FAMILIES)), default=moderate,
       text=st.one_of(texts(NUMBER_WORDS + ["IN00", "in*", "OUT11", "M00", "BASE", "XX99", "*", "=", "IN0[",
                                            "GRAD_V", "flat_50", "ALL_B", "IN*=", "=1"] + list(PRESETS)),
                      st.integers(18, 28).flatmap(lambda n: st.lists(st.sampled_from(NUMBER_WORDS[:12]), min_size=n,
                                                                     max_size=n)).map(",".join)))
@example(family="sd1", default=0.5, text=",".join(["1e400"] * 26))
@example(family="sdxl", default=0.5, text="IN01=nan")
@example(family="sd1", default=0.5, text="GRAD_V, IN*=-1e999")
def test_blocks_arbitrary_text(family, default, text):
    """Any text is either nothing (None for empty input), exactly one finite float per block, or an InputError
    with a sentence."""
    values, msg = refused_or(parse_blocks, text, family, default)
    if msg is not None:
        assert text.strip(), "empty text must give None, not an error"
    elif values is None:
        assert not text.strip(), "only empty text gives None"
    else:
        assert len(values) == FAMILIES[family]
        assert all(isinstance(v, float) and math.isfinite(v) for v in values), values


@FUZZ
@given(family=st.sampled_from(sorted(FAMILIES)),
       values=st.lists(st.one_of(finite, st.floats(), st.integers(), st.text(max_size=4), st.none(),
                                 st.just(10 ** 400), st.lists(st.integers(), max_size=2)), max_size=28))
def test_blocks_list_form(family, values):
    """The list form (what the UI and API pass) takes exactly one finite number per block; anything else is an
    InputError, never a ValueError or TypeError."""
    parsed, _ = refused_or(parse_blocks, values, family, 0.5)
    if parsed is not None:
        assert len(parsed) == FAMILIES[family] and all(math.isfinite(v) for v in parsed)


# ================================================================================================ --param
def _cli_recipe(method: str, param_text: str):
    """`merge --method M --model ... --param=TEXT`: the recipe the CLI builds (no file is opened)."""
    spec = get_method(method)
    argv = ["merge", "--method", method, f"--param={param_text}", "-o", "out.safetensors"]
    for i in range(len(spec.inputs) if not spec.many else 3):
        argv += ["--model", f"m{i}.safetensors"]
    if spec.base != "none":
        argv += ["--base", "base.safetensors"]
    return build_recipe(_PARSER.parse_args(argv))


_PARSER = make_parser()
_PARAMS = [(m.name, p) for m in METHODS.values() for p in m.params]


def _check_param_value(p, value, n_models: int = 3) -> None:
    if isinstance(p.kind, Choice):
        assert value in p.kind.options
    elif p.kind == "floats":
        assert value is None or (isinstance(value, list) and len(value) == n_models
                                 and all(isinstance(v, float) and math.isfinite(v) for v in value))
    else:
        assert type(value) is p.kind, (p, value)
        if p.kind is not bool:
            assert value == value and p.range[0] <= value <= p.range[1]


@FUZZ
@given(where=st.sampled_from(_PARAMS),
       value=st.one_of(texts(NUMBER_WORDS + ["true", "false", "on", "No", "sum", "count", "off", "[1, 2]", "{}",
                                             "null", "\"0.5\"", "[[[", "[1, \"a\"]"]),
                       st.builds(repr, finite), st.builds(str, st.integers()),
                       st.just("1" + "0" * 400), st.just("[" * 5000), st.just("1" * 5000)))
@example(where=("weighted_sum", get_method("weighted_sum").param("alpha")), value="1" + "0" * 400)
@example(where=("weighted_soup", get_method("weighted_soup").param("weights")), value="[1, NaN, 2]")
@example(where=("dare_merge", get_method("dare_merge").param("iterations")), value="1e400")
def test_param_arbitrary_value(where, value):
    """`--param NAME=VALUE` with any VALUE: the recipe holds a value of the parameter's type within its range
    (a choice among its options; for a list, finite numbers, one per model), or the CLI refuses it with an
    InputError; never another exception."""
    method, p = where
    recipe, _ = refused_or(_cli_recipe, method, f"{p.name}={value}")
    if recipe is not None:
        _check_param_value(p, recipe.params[p.name])


@ROUND
@given(where=st.sampled_from([(m, p) for m, p in _PARAMS if p.kind in (float, int)]), data=st.data())
def test_param_valid_numbers_round_trip(where, data):
    """A number within a parameter's range, written as Python writes it, is the recipe's value exactly."""
    method, p = where
    lo, hi = p.range
    x = data.draw(st.integers(int(lo), int(hi)) if p.kind is int else st.floats(lo, hi))
    recipe = _cli_recipe(method, f"{p.name}={x!r}")
    assert recipe.params[p.name] == x and type(recipe.params[p.name]) is p.kind
    recipe = _cli_recipe(method, f" {p.name} = {x} ")
    assert recipe.params[p.name] == x


@pytest.mark.parametrize("text", ["alpha", "=0.5", " =1", "nope=1", "alpha=", "alpha=abc", "alpha=5", "alpha=nan",
                                  "alpha=[0.5]", "alpha=1e400",
                                  "alpha=" + "1" * 400])
def test_param_refusals_say_why(text):
    """Bad NAME=VALUE texts are InputErrors with a sentence that names the parameter or the form."""
    _, msg = refused_or(_cli_recipe, "weighted_sum", text)
    assert msg is not None, f"{text!r} was accepted"
    assert "alpha" in msg or "NAME=VALUE" in msg or "nope" in msg


def test_param_bool_and_choice_words():
    """Booleans take the usual words (any case), choices their option names, lists comma-separated numbers."""
    for word, want in [("true", True), ("ON", True), ("yes", True), ("1", True), ("false", False), ("Off", False),
                       ("no", False), ("0", False)]:
        assert _cli_recipe("dare_merge", f"rescale={word}").params["rescale"] is want
    for option in ("sum", "count", "off"):
        assert _cli_recipe("dare_merge", f"ties={option}").params["ties"] == option
    assert _cli_recipe("weighted_soup", "weights=1, 2.5, -1").params["weights"] == [1.0, 2.5, -1.0]
    assert _cli_recipe("weighted_soup", "weights=[1, 2, 3]").params["weights"] == [1.0, 2.0, 3.0]


# =============================================================================================== LoRA FILE:W
_name_chars = string.ascii_letters + string.digits + " _-.:/\\()[]éü猫"
lora_names = st.text(alphabet=_name_chars, min_size=1, max_size=30).filter(
    lambda s: s.strip(" /") and not reads_as_number(s.split(":")[-1]) and not s.endswith("/")
    and "//" not in s and "/./" not in s and not s.startswith("./") and not s.endswith("/."))


def reads_as_number(text: str) -> bool:
    """True when `text` reads as a weight (so it cannot end a name)."""
    return bool(re.match(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$", text.strip()))


@ROUND
@given(name=lora_names, w=finite, w_te=finite, form=st.sampled_from(["name", "w", "w_te"]))
@example(name="C:\\loras\\style v2.safetensors", w=0.8, w_te=-0.25, form="w_te")
@example(name="my: lora", w=1e-300, w_te=1e300, form="w")
def test_lora_arg_round_trip(name, w, w_te, form):
    """`FILE`, `FILE:W` and `FILE:W_UNET:W_TE` with any name (colons, spaces, backslashes, non-ASCII) whose last part
    is not a number and any finite weights: the path and the weights come back exactly."""
    text = {"name": name, "w": f"{name}:{w!r}", "w_te": f"{name}:{w!r}:{w_te!r}"}[form]
    if form == "name":
        item, msg = refused_or(parse_lora_arg, text)
        if item is None:   # a bare name with a colon whose tail is neither a weight nor a path part
            assert ":" in name and "is not a weight" in msg
            return
        assert item == LoraInput(Path(name), 1.0, 1.0)
        return
    item = parse_lora_arg(text)
    assert item.path == Path(name)
    assert (item.w_unet, item.w_te) == ((w, w) if form == "w" else (w, w_te))


@FUZZ
@given(text=st.one_of(texts(NUMBER_WORDS + ["a.safetensors", "C", "C:\\x", "dir/", ":", "::", "style", "x.pt"]),
                      st.text(alphabet=":0123456789.e-+ abc/\\", max_size=30)))
@example(text="style.safetensors:1e400")
@example(text="style.safetensors:0.5:-1e999")
@example(text="a\0b:c")
def test_lora_arg_arbitrary_text(text):
    """Any text is a LoraInput with a path and finite weights, or an InputError with a sentence."""
    item, _ = refused_or(parse_lora_arg, text)
    if item is not None:
        assert str(item.path) and math.isfinite(item.w_unet) and math.isfinite(item.w_te)


@ROUND
@given(name=st.text(alphabet=string.ascii_letters + "_-", min_size=1, max_size=12),
       tail=st.text(alphabet=string.ascii_letters + " _-!?", min_size=1, max_size=8).filter(
           lambda t: t.strip() and not reads_as_number(t)))
def test_lora_arg_garbage_weight_is_refused(name, tail):
    """A weight that is not a number (`style.safetensors:strong`) is an InputError that names it."""
    assume(len(name) > 1)   # `C:...` is a drive letter
    _, msg = refused_or(parse_lora_arg, f"{name}.safetensors:{tail}")
    assert msg is not None and f"'{tail.strip()}' is not a weight" in msg


def test_lora_arg_fixed_cases():
    """The documented forms and refusals."""
    assert parse_lora_arg("a.safetensors:0.5") == LoraInput(Path("a.safetensors"), 0.5, 0.5)
    assert parse_lora_arg("a.safetensors:0.5:-1") == LoraInput(Path("a.safetensors"), 0.5, -1.0)
    assert parse_lora_arg("dir/b c.safetensors") == LoraInput(Path("dir/b c.safetensors"))
    assert parse_lora_arg("C:\\x\\y.safetensors:2") == LoraInput(Path("C:\\x\\y.safetensors"), 2.0, 2.0)
    assert parse_lora_arg("a:1:2:3") == LoraInput(Path("a:1"), 2.0, 3.0)   # only two trailing numbers are weights
    assert parse_lora_arg("::") == LoraInput(Path("::"))                     # a (strange) file name, no weight
    for bad in (":0.5", ":1:2", "a.safetensors:strong", "a.safetensors:1e400", "a.safetensors:0.5:nan"):
        with pytest.raises(InputError):
            parse_lora_arg(bad)


# ============================================================================================== XY axes
@ROUND
@given(lo=st.floats(-1e6, 1e6), hi=st.floats(-1e6, 1e6), n=st.integers(1, MAX_VALUES),
       space=st.sampled_from(["", " "]), kind=st.sampled_from(["alpha", "beta", "param:density", "block:IN04"]))
def test_xy_float_range(lo, hi, n, space, kind):
    """'LO-HI (N)' gives N values, the endpoints included (to the 10 decimals the range keeps), monotone from LO
    to HI."""
    axis = Axis(kind, f"{lo!r}{space}-{space}{hi!r}{space}({n})")
    values = axis.values
    assert len(values) == n
    assert math.isclose(values[0], lo, rel_tol=1e-12, abs_tol=5e-11)
    if n > 1:
        assert math.isclose(values[-1], hi, rel_tol=1e-12, abs_tol=1e-9)
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(s >= 0 for s in steps) if hi >= lo else all(s <= 0 for s in steps)


@ROUND
@given(lo=st.integers(-10 ** 6, 10 ** 6), span=st.integers(-MAX_VALUES - 5, MAX_VALUES + 5))
def test_xy_integer_range(lo, span):
    """'A-B' of whole numbers gives every integer from A to B (either direction), both included, or is refused
    when that is more than an axis takes."""
    hi = lo + span
    values, msg = refused_or(lambda: Axis("seed", f"{lo}-{hi}").values)
    if abs(span) + 1 > MAX_VALUES:
        assert msg is not None and str(MAX_VALUES) in msg
        return
    step = 1 if hi >= lo else -1
    assert values == list(range(lo, hi + step, step))
    assert all(type(v) is int for v in values)


@ROUND
@given(values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=MAX_VALUES), sep=st.sampled_from([",", ";", "\n",
                                                                                                    ", ", " ; "]))
def test_xy_number_list_round_trip(values, sep):
    """A list of numbers as written ('0.2, 0.5, 0.8') comes back exactly, in order."""
    assert Axis("alpha", sep.join(repr(v) for v in values)).values == values


@ROUND
@given(names=st.lists(st.sampled_from(list(PRESETS)), min_size=1, max_size=6),
       case=st.sampled_from([str.lower, str.upper, str.title]))
def test_xy_presets_by_name(names, case):
    """Preset axes take the preset names in any case; an unknown one is refused with the list of presets."""
    assert Axis("preset", ", ".join(case(n) for n in names)).values == names
    _, msg = refused_or(Axis, "preset", ", ".join(names + ["NOT_A_PRESET"]))
    assert "NOT_A_PRESET" in msg and "GRAD_V" in msg


_AXIS_KINDS = ["alpha", "beta", "preset", "method", "seed", "prompt", "recipe", "param:density", "param:weights",
               "param:election", "block:IN04", "model:B", "model:7"]


@FUZZ
@given(kind=st.sampled_from(_AXIS_KINDS),
       text=texts(NUMBER_WORDS + ["0-1 (5)", "1-4", "0-1 (0)", "0-1 (65)", "0-1e20", "1e400-1 (3)", "0.5-1",
                                  "-1--4", "GRAD_V", "weighted_sum", "Add Difference", "{", "}", "[", "]", "{}",
                                  '{"method": "weighted_sum", "models": ["a", "b"]}', "(", ")", "|"]))
@example(kind="alpha", text="1e308--1e308 (5)")
@example(kind="seed", text="1e400")
@example(kind="alpha", text="1" + "0" * 400)
@example(kind="seed", text="1" + "0" * 400)
@example(kind="recipe", text='{"method": "weighted_sum", "models": ["a", "b"], "seed": ' + "9" * 5000 + "}")
@example(kind="recipe", text="[" * 5000)
def test_xy_arbitrary_values(kind, text):
    """Any value text for any axis kind is a non-empty list of at most MAX_VALUES values (recipes for a recipe
    axis, whole numbers for seeds, known names for presets and methods), or an InputError with a sentence."""
    axis, _ = refused_or(Axis, kind, text)
    if axis is None:
        return
    assert 1 <= len(axis.values) <= MAX_VALUES
    if kind == "recipe":
        assert all(isinstance(v, Recipe) for v in axis.values)
    elif kind == "seed":
        assert all(type(v) is int for v in axis.values)
    elif kind == "preset":
        assert set(axis.values) <= set(PRESETS)
    elif kind == "method":
        assert set(axis.values) <= set(METHODS)
    for i in range(len(axis.values)):
        assert isinstance(axis.label(i), str)


@FUZZ
@given(kind=texts(_AXIS_KINDS + ["param:", "block:", "model:", "block:XX", "model:0", "model:Z", "PARAM:alpha"]))
def test_xy_arbitrary_kind(kind):
    """Any axis kind text is a known kind or an InputError with a sentence."""
    axis, _ = refused_or(Axis, kind, "1")
    if axis is not None:
        assert axis.kind in _AXIS_KINDS[:7] or axis.kind.startswith(("param:", "block:", "model:"))


# =============================================================================================== recipes
_ref_names = st.text(min_size=1, max_size=20)
_hexes = st.text(alphabet="0123456789abcdef", min_size=10, max_size=64)


def _refs(with_path: bool = True):
    return st.builds(ModelRef, name=_ref_names, path=st.none() | _ref_names if with_path else st.none(),
                     sha256=st.none() | _hexes, short_hash=st.none() | _hexes.map(lambda h: h[:10]))


def _param_value(p, n_models: int):
    if isinstance(p.kind, Choice):
        return st.sampled_from(p.kind.options)
    if p.kind == "floats":
        return st.lists(moderate, min_size=n_models, max_size=n_models)
    if p.kind is bool:
        return st.booleans()
    if p.kind is int:
        return st.integers(int(p.range[0]), int(p.range[1]))
    return st.floats(*p.range)


@st.composite
def valid_recipes(draw):
    spec = draw(st.sampled_from(sorted(METHODS.values(), key=lambda s: s.name)))
    n = draw(st.integers(2, 5)) if spec.many else len(spec.inputs)
    family = draw(st.sampled_from(sorted(FAMILIES)))
    params = {p.name: draw(_param_value(p, n)) for p in spec.params if draw(st.booleans())}
    blocks = {}
    for name in spec.blockwise_params:
        if draw(st.booleans()):
            p = spec.param(name)
            blocks[name] = draw(st.lists(st.floats(*p.range), min_size=FAMILIES[family], max_size=FAMILIES[family]))
    layer_weights = None
    if spec.blockwise_params and draw(st.booleans()):
        p = spec.param(draw(st.sampled_from(spec.blockwise_params)))
        layer_weights = {"param": p.name,
                         "values": draw(st.dictionaries(st.text(min_size=1, max_size=30), st.floats(*p.range),
                                                        max_size=5))}
    elemental = None
    if spec.blockwise_params and draw(st.booleans()):
        entries = draw(st.lists(st.tuples(st.lists(st.sampled_from(block_names("sdxl")), max_size=3),
                                          st.lists(st.sampled_from(["attn", "attn2.to_k", "ff", "norm"]), max_size=2),
                                          moderate, st.booleans(), st.booleans()), min_size=1, max_size=3))
        elemental = ", ".join(f"{'NOT ' if nb and b else ''}{' '.join(b)}:{'NOT ' if ne and e else ''}{' '.join(e)}:"
                              f"{r!r}" for b, e, r, nb, ne in entries)
    recipe = Recipe(
        method=spec.name, models=draw(st.lists(_refs(), min_size=n, max_size=n)),
        params=params, blocks=blocks,
        base=draw(_refs()) if spec.base == "required" or (spec.base == "optional" and draw(st.booleans())) else None,
        seed=draw(st.integers(0, 2 ** 64)), compute_dtype=draw(st.sampled_from(["float32", "float64"])),
        dtype=draw(st.sampled_from(["float16", "bfloat16", "float32"])),
        components=draw(st.lists(st.sampled_from(COMPONENTS), unique=True, max_size=3)),
        missing_keys=draw(st.sampled_from(["keep_a", "error"])), nonfinite=draw(st.sampled_from(["warn", "error"])),
        mask=draw(st.none() | _refs()), layer_weights=layer_weights, elemental=elemental,
        adjust=draw(st.none() | st.lists(st.floats(-10, 10), max_size=8)),
        arch=draw(st.none() | st.just(family)))
    recipe.validate()
    return recipe


def _without_paths(r: Recipe) -> Recipe:
    d = r.to_dict()
    for ref in d["models"] + [d[k] for k in ("base", "mask") if d.get(k)]:
        ref["path"] = None
    return Recipe.from_dict(d)


@ROUND
@given(recipe=valid_recipes(), indent=st.sampled_from([None, 2]))
def test_recipe_json_round_trip(recipe, indent):
    """A valid recipe's JSON gives an equal recipe; its public JSON gives the same recipe without local paths (and
    holds no path at all); recipe_from_text finds it in an infotext, quoted or not."""
    assert Recipe.from_json(recipe.to_json(indent)) == recipe
    public = recipe.public_json(indent)
    assert Recipe.from_json(public) == _without_paths(recipe)
    assert '"path"' not in public
    assert recipe_from_text(f"a cat\nSteps: 20, Merge Lab recipe: {public}") == _without_paths(recipe)
    assert recipe_from_text(f"Steps: 20, Merge Lab recipe: {json.dumps(public)}, Seed: 1") == _without_paths(recipe)
    again = Recipe.from_dict(json.loads(recipe.to_json()))
    assert again.to_json() == recipe.to_json()


_json_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
                         st.sampled_from([10 ** 400, -(10 ** 400), 2 ** 63, "", "weighted_sum", "unet", "float32",
                                          "keep_a", "warn", "a.safetensors"]))
json_values = st.recursive(_json_leaves, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=16)
_FIELDS = [f for f in Recipe.__dataclass_fields__ if f not in ("method", "models")]
recipe_like = st.fixed_dictionaries(
    {"method": st.sampled_from(sorted(METHODS)) | json_values,
     "models": st.lists(st.sampled_from(["a", "b", "c"]) | json_values, max_size=4) | json_values},
    optional={**{f: json_values for f in _FIELDS + ["format", "version"]},
              "params": st.dictionaries(st.sampled_from(["alpha", "beta", "lambda", "weights", "density", "drop",
                                                         "rescale", "election", "iterations", "x"]),
                                        json_values, max_size=3),
              "blocks": st.dictionaries(st.sampled_from(["alpha", "beta", "lambda", "x"]),
                                        st.lists(json_values, max_size=27) | json_values, max_size=2),
              "layer_weights": st.fixed_dictionaries({}, optional={"param": json_values,
                                                                   "values": st.dictionaries(st.text(max_size=5),
                                                                                             json_values)}),
              "adjust": st.lists(json_values, max_size=9) | json_values,
              "elemental": texts(["IN04", "OUT05", "NOT", "attn", ":", "0.5", "1e400", "XX"]) | json_values})


def _paths(obj, at=()):
    """Every place in a JSON value: tuples of keys and indices."""
    yield at
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, at + (k,))


@st.composite
def mutated_recipes(draw):
    """A valid recipe's JSON with one to three places replaced by random JSON or removed: deep into the checks."""
    d = json.loads(draw(valid_recipes()).to_json())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from([a for a in _paths(d) if a]))
        parent = d
        for k in at[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[at[-1]]
        else:
            parent[at[-1]] = draw(json_values)
    return d


def _check_recipe_input(obj) -> None:
    recipe, _ = refused_or(Recipe.from_dict, obj)
    text = json.dumps(obj)
    again, _ = refused_or(Recipe.from_json, text)
    assert (recipe is None) == (again is None)
    if recipe is not None:
        # whatever is accepted writes JSON that reads back to the same JSON
        assert Recipe.from_json(recipe.to_json()).to_json() == recipe.to_json()


@FUZZ
@given(obj=json_values | recipe_like | mutated_recipes())
@example(obj={"method": ["weighted_sum"], "models": ["a", "b"]})
@example(obj={"method": "weighted_sum", "models": ["a", "b"], "components": 3})
@example(obj={"method": "weighted_sum", "models": ["a", "b"], "params": {"alpha": 10 ** 400}})
@example(obj={"method": "weighted_sum", "models": ["a", "b"], "adjust": [10 ** 400]})
@example(obj={"method": "weighted_sum", "models": ["a", "b"], "blocks": {"alpha": [10 ** 400] * 26}})
@example(obj={"method": "weighted_soup", "models": ["a", "b"], "params": {"weights": [1, float("nan")]}})
def test_recipe_random_json_objects(obj):
    """Random JSON (random values in a recipe's fields, valid recipes with a few places replaced or removed) is a
    Recipe or an InputError with a sentence: never a
    KeyError, TypeError, AttributeError or OverflowError; from_dict and from_json agree."""
    _check_recipe_input(obj)


@FUZZ
@given(text=texts(['{', '}', '[', ']', '"method"', '"models"', ':', '"weighted_sum"', '["a", "b"]', "Merge Lab recipe:",
                   '"merge_lab_recipe"', '"metadata"', "NaN", "1e400", '"', "\\"]))
@example(text="[" * 5000)
@example(text='{"method": "weighted_sum", "models": ["a", "b"], "seed": ' + "9" * 5000 + "}")
@example(text="Merge Lab recipe: {" + '"a": ' * 3000)
def test_recipe_arbitrary_text(text):
    """Any text given as a recipe (JSON, or text holding one: an infotext, `info --json` output) is a Recipe or
    an InputError with a sentence."""
    refused_or(Recipe.from_json, text)
    refused_or(recipe_from_text, text)


# ================================================================================= LoRA block weights, elemental, adjust
@FUZZ
@given(family=st.sampled_from(sorted(FAMILIES)),
       text=st.one_of(texts(NUMBER_WORDS + ["R", "U", "X", "X+0.5", "X-1", "ALL", "none", "INS", "lbw=", "lbwe",
                                            ":", "OUTALL"]),
                      st.sampled_from([12, 17, 20, 26]).flatmap(
                          lambda n: st.lists(st.sampled_from(NUMBER_WORDS[:10] + ["R", "U", "X-0.2"]), min_size=n,
                                             max_size=n)).map(",".join)))
def test_lbw_arbitrary_text(family, text):
    """LoRA block weights (`--lbw`): any text is one number per block of the family, or an InputError."""
    weights, _ = refused_or(parse_lbw, text, family)
    if weights is not None:
        assert list(weights) == block_names(family)
        assert all(isinstance(v, float) for v in weights.values())


@ROUND
@given(family=st.sampled_from(sorted(FAMILIES)), data=st.data())
def test_lbw_layouts_round_trip(family, data):
    """Numbers in any of the family's layouts land on the layout's blocks; the other blocks get 0."""
    n = data.draw(st.sampled_from(sorted(LAYOUTS[family])))
    values = data.draw(st.lists(moderate, min_size=n, max_size=n))
    weights = parse_lbw(",".join(repr(v) for v in values), family)
    assert weights == {b: dict(zip(LAYOUTS[family][n], values)).get(b, 0.0) for b in block_names(family)}


@FUZZ
@given(text=texts(["IN04", "OUT05", "M00", "BASE", "NOT", "attn", "attn2.to_k", ":", "::", "0.5", "1e400", "nan",
                   "XX", "in04"]), family=st.sampled_from(sorted(FAMILIES)))
def test_elemental_arbitrary_text(text, family):
    """Elemental ratios: any text gives rules with finite ratios and known blocks, or an InputError."""
    rules, _ = refused_or(parse_elemental, text, family)
    if rules is not None:
        assert all(math.isfinite(r.ratio) and r.blocks <= set(block_names(family)) for r in rules)


@FUZZ
@given(values=st.one_of(st.none(), texts(NUMBER_WORDS), st.lists(_json_leaves, max_size=10), json_values))
@example(values=[10 ** 400])
def test_adjust_arbitrary_values(values):
    """Adjust: any value is None (nothing to do) or eight finite numbers, or an InputError."""
    out, _ = refused_or(check_adjust, values)
    if out is not None:
        assert len(out) == len(ADJUST_NAMES) and all(math.isfinite(v) for v in out) and any(out)


# ================================================================================================= payloads
@FUZZ
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=200).map(str.encode),
                      st.sampled_from([b"[" * 5000, b"- " * 3000 + b"x", b"{\"payloads\": [{\"prompt\": \"a\", "
                                       b"\"seed\": " + b"9" * 5000 + b"}]}", b"a = " + b"[" * 3000,
                                       b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"prompt: [[[[[[", b"\xef\xbb\xbf[]",
                                       b"!!python/object/apply:os.system ['true']", b"[{\"prompt\": \"a\", "
                                       b"\"steps\": 1e400}]"])),
       suffix=st.sampled_from([".json", ".yaml", ".yml", ".toml", ".png"]))
def test_payload_file_arbitrary_bytes(data, suffix):
    """Arbitrary bytes in a payload file (any suffix Merge Lab reads) are payloads or an InputError with a
    sentence: never a traceback from the JSON, YAML, TOML or PNG readers; the file is not changed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"payloads{suffix}"
        path.write_bytes(data)
        payloads, _ = refused_or(read_payloads, path)
        assert path.read_bytes() == data
    if payloads is not None:
        assert payloads and all(p.prompt is not None for p in payloads)
