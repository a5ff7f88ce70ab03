"""AutoMBW payloads: every importer on its sample file, our format's round trip, infotext parsing, the errors'
messages, and seeds fixed from the run's seed."""
from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lib_merge.core.errors import InputError, OutputError
from lib_merge.core.generation import GenerationRequest
from lib_merge.optimize.optimizers import derived_seed
from lib_merge.optimize.payloads import (FORMATS, Payload, parse_infotext, payload_from_infotext, read_payloads,
                                         resolve_seeds, write_payloads)

DATA = Path(__file__).parent / "data" / "payloads"
CARGO = DATA / "bayesian" / "conf" / "payloads"


def _png(path: Path, infotext: str | None, size=(16, 16)) -> Path:
    info = PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    Image.new("RGB", size, (120, 30, 200)).save(path, format="PNG", pnginfo=info)
    return path


def _error(value, base_dir=None) -> str:
    with pytest.raises(InputError) as e:
        read_payloads(value, base_dir)
    return str(e.value)


# ------------------------------------------------------------------------------------------------- our format
def test_merge_lab_json_sample():
    a, b = read_payloads("merge_lab.json", DATA)
    assert a == Payload(prompt="a photo of a cat on a windowsill, soft light", negative="blurry, lowres", seed=1234,
                        steps=24, cfg=6.5, width=512, height=768, sampler="DPM++ 2M Karras", batch_size=2, weight=2.0,
                        name="cat")
    assert b == Payload(prompt="a lighthouse at dusk, oil painting", holdout=True, name="payload 2")


def test_merge_lab_yaml_sample_with_webui_names():
    a, b = read_payloads(DATA / "merge_lab.yaml")
    assert a == Payload(prompt="portrait of an old sailor,\ndetailed face", negative="cartoon", seed=42, steps=30,
                        cfg=5.0, width=576, height=832, sampler="Euler", name="portrait")
    assert isinstance(a.cfg, float) and isinstance(a.seed, int)
    assert b == Payload(prompt="a misty forest path", weight=0.5, name="forest")


def test_inline_list_and_request():
    [p] = read_payloads([{"prompt": "x", "negative_prompt": "y", "cfg_scale": 4, "sampler_name": "DDIM",
                          "seed": 5.0, "steps": 10, "width": 640, "height": 384, "batch_size": 3}])
    assert p.name == "payload 1" and p.seed == 5 and isinstance(p.seed, int)
    assert p.request() == GenerationRequest(prompt="x", negative_prompt="y", seed=5, steps=10, cfg_scale=4.0,
                                            width=640, height=384, sampler="DDIM", batch_size=3)


def test_formats_are_described():
    assert set(FORMATS) == {"merge-lab", "bayesian-merger", "auto-mbw-rt", "png-infotext"}
    assert all(isinstance(v, str) and v for v in FORMATS.values())


_names = st.text(min_size=1, max_size=20)
_payload = st.builds(
    Payload, prompt=st.text(max_size=60), negative=st.text(max_size=40), seed=st.integers(-1, 2 ** 32 - 1),
    steps=st.integers(1, 150), cfg=st.floats(0, 30, allow_nan=False), width=st.integers(8, 256).map(lambda k: 8 * k),
    height=st.integers(8, 256).map(lambda k: 8 * k), sampler=st.text(min_size=1, max_size=20).filter(str.strip),
    batch_size=st.integers(1, 16), weight=st.floats(0, 1e6, exclude_min=True, allow_nan=False),
    holdout=st.booleans(), name=_names)


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(_payload, min_size=1, max_size=4, unique_by=lambda p: p.name), st.sampled_from([".json", ".yaml"]))
def test_our_format_round_trip(payloads, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"payloads{suffix}"
        write_payloads(payloads, path)
        assert read_payloads(path) == payloads
        assert os.listdir(tmp) == [path.name]                      # no temporary file left behind
        assert [Payload.from_dict(p.to_dict()) for p in payloads] == payloads
        json.dumps([p.to_dict() for p in payloads])               # JSON-safe


def test_write_replaces_and_refuses_other_suffixes(tmp_path):
    path = tmp_path / "p.yml"
    write_payloads([Payload(prompt="one", name="a")], path)
    write_payloads([Payload(prompt="two", name="b")], path)
    assert read_payloads(path) == [Payload(prompt="two", name="b")]
    with pytest.raises(OutputError, match=r"'p\.txt': payloads are written as \.json or \.yaml, not '\.txt'"):
        write_payloads([Payload(prompt="x")], tmp_path / "p.txt")


# ------------------------------------------------------------------------------------------- bayesian-merger
def test_bayesian_cargo_file_applies_its_defaults():
    notes = []
    girl, day, night = read_payloads(CARGO / "cargo.yaml", notes=notes)
    # the payload's own `cfg` beats the defaults' cfg_scale: what the author meant
    assert girl == Payload(prompt="1girl, smiling, school uniform, cherry blossoms",
                           negative="worst quality, low quality", seed=-1, steps=20, cfg=7.0, width=512, height=768,
                           sampler="Euler a", weight=1.5, name="girl")
    assert day == Payload(prompt="a busy city street at noon, photograph", negative="lowres, bad anatomy", seed=777,
                          steps=25, cfg=7.0, sampler="Euler", batch_size=2, weight=1.0, name="city_day")
    # cfg_scale wins over cfg in one payload (the WebUI read cfg_scale); n_iter 2 x batch_size 1 -> 2
    assert night == Payload(prompt="a busy city street at night, neon signs, photograph",
                            negative="lowres, bad anatomy", steps=25, cfg=8.0, sampler="Euler", batch_size=2,
                            weight=0.5, name="city_night")
    joined = "\n".join(notes)
    assert "girl.yaml: ignored denoising_strength, enable_hr, eta" in joined
    assert "city.yaml: ignored cfg, " in joined and "sampler_index" in joined
    assert "payload 'city_night': n_iter 2 x batch_size 1 read as batch_size 2" in joined


def test_bayesian_folder_and_old_names(tmp_path):
    folder = tmp_path / "cargo"
    shutil.copytree(CARGO / "cargo", folder)
    (folder / "payload.tmpl.yaml").write_text("payloadname:\n  prompt: template\n", encoding="utf-8")
    notes = []
    payloads = read_payloads(folder, notes=notes)
    assert [p.name for p in payloads] == ["city_day", "city_night", "girl", "beach"]   # files by name, keys in order
    beach = payloads[3]
    assert beach == Payload(prompt="a quiet beach, watercolor", negative="people", steps=18, cfg=6.0, width=640,
                            height=448, sampler="DDIM", name="beach")
    assert payloads[0] == Payload(prompt="a busy city street at noon, photograph", seed=777, batch_size=2,
                                  name="city_day")
    assert any("skipped payload.tmpl.yaml" in n for n in notes)


def test_bayesian_single_file():
    [beach] = read_payloads(str(CARGO / "cargo" / "old_style.yaml"))
    assert (beach.name, beach.negative, beach.cfg) == ("beach", "people", 6.0)


# ------------------------------------------------------------------------------------------------- AutoMBW-rt
def test_auto_mbw_rt_json():
    notes = []
    [p] = read_payloads("auto_mbw_rt/payloads/portrait.json", DATA, notes)
    assert p == Payload(prompt="masterpiece, best quality, 1girl, looking at viewer",
                        negative="worst quality, low quality", seed=1, steps=48, cfg=7.0, width=512, height=768,
                        sampler="DPM++ 2M Karras", batch_size=2, name="portrait")
    assert "portrait.json: ignored denoising_strength, enable_hr" in notes[0] and "reverse_scoring" in notes[0]


def test_auto_mbw_rt_folder_with_toml():
    landscape, portrait = read_payloads(DATA / "auto_mbw_rt" / "payloads")   # the empty "payloads" file is no payload
    assert landscape == Payload(prompt="mountain lake at sunrise, wide angle", seed=20240105, steps=28, cfg=6.5,
                                width=768, height=512, sampler="Euler a", batch_size=3, name="landscape")
    assert portrait.name == "portrait"


def _rt(tmp_path, **fields) -> Path:
    base = json.loads((DATA / "auto_mbw_rt" / "payloads" / "portrait.json").read_text(encoding="utf-8"))
    path = tmp_path / "rt.json"
    path.write_text(json.dumps({**base, **fields}), encoding="utf-8")
    return path


def test_auto_mbw_rt_refusals(tmp_path):
    msg = _error(_rt(tmp_path, enable_hr=True))
    assert msg == ("'rt.json' (read as an AutoMBW-rt payload): enable_hr is true, but Merge Lab's payloads cannot "
                   "carry hires fix: set it to false or leave it out.")
    msg = _error(_rt(tmp_path, prompt="a __animal__ in a field"))
    assert msg.startswith("'rt.json' (read as an AutoMBW-rt payload): prompt uses wildcards ('__animal__')")
    assert "negative_prompt uses wildcards ('{')" in _error(_rt(tmp_path, negative_prompt="{red|blue} car"))
    # with wildcards off the text is the prompt itself
    [p] = read_payloads(_rt(tmp_path, prompt="a __animal__", wildcard_type="none"))
    assert p.prompt == "a __animal__"
    assert "n_iter 4 x batch_size 8 = 32 images; a payload makes at most 16" in _error(_rt(tmp_path, n_iter=4,
                                                                                         batch_size=8))
    assert _error(_rt(tmp_path, n_iter=0)).endswith("n_iter must be an integer from 1, not 0.")
    assert "steps must be an integer from 1 to 150, not 2048." in _error(_rt(tmp_path, steps=2048))
    msg = _error(_rt(tmp_path, scheduler="Karras"))
    assert msg.startswith("'rt.json' (read as an AutoMBW-rt payload): unknown field 'scheduler'; Merge Lab reads "
                          "prompt, negative_prompt")
    path = tmp_path / "rt.msgpack"
    path.write_bytes(b"\x80")
    assert "msgpack payloads are not read" in _error(path)


def test_bayesian_refusals(tmp_path):
    path = tmp_path / "wild.yaml"
    path.write_text("wild:\n  prompt: a __hat__ on a cat\n", encoding="utf-8")
    assert _error(path).startswith("'wild.yaml' (read as bayesian-merger payloads), payload 'wild': prompt uses "
                                   "wildcards ('__hat__')")
    path.write_text("p:\n  prompt: x\n  styles: [anime]\n", encoding="utf-8")
    assert _error(path).endswith("styles is [\"anime\"], but Merge Lab's payloads cannot carry styles: set it to [] "
                                 "or leave it out.")
    path.write_text("p:\n  prompt: x\n  cfg: high\n", encoding="utf-8")
    assert _error(path) == ("'wild.yaml' (read as bayesian-merger payloads), payload 'p': cfg must be a number from "
                            "0 to 30, not 'high'.")
    cargo = tmp_path / "cargo.yaml"
    cargo.write_text("defaults:\n  - cargo:\n      - missing\n", encoding="utf-8")
    assert "lists the payload file 'missing', but" in _error(cargo)
    cargo.write_text("defaults:\n  - _self_\n", encoding="utf-8")
    assert "its defaults list names no payloads" in _error(cargo)


# ------------------------------------------------------------------------------------------------ PNG infotext
INFOTEXT = ("masterpiece, 1girl, (smile:1.2)\nstanding in the rain\n"
            "Negative prompt: lowres, bad hands\nextra digits\n"
            'Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 512x768, '
            'Model hash: 0123abcd, Model: "mix, v2", Hires upscale: 2, Hires upscaler: Latent, '
            'Lora hashes: "a: 1, b: 2", Version: v1.10.1')


def test_png_folder(tmp_path):
    _png(tmp_path / "b_rain.png", INFOTEXT)
    _png(tmp_path / "a_plain.png", "a red apple\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 12, Size: 640x448")
    (tmp_path / "readme.txt").write_text("not a payload", encoding="utf-8")
    notes = []
    apple, rain = read_payloads(tmp_path, notes=notes)
    assert apple == Payload(prompt="a red apple", seed=12, steps=20, cfg=7.0, width=640, height=448,
                            sampler="Euler a", name="a_plain")
    assert rain == Payload(prompt="masterpiece, 1girl, (smile:1.2)\nstanding in the rain",
                           negative="lowres, bad hands\nextra digits", seed=3141592653, steps=28, cfg=6.5, width=512,
                           height=768, sampler="DPM++ 2M Karras", name="b_rain")
    assert any("b_rain.png' (read as a PNG with WebUI infotext): made with hires fix" in n for n in notes)
    assert any("skipped readme.txt" in n for n in notes)
    assert parse_infotext(INFOTEXT)[2]["Lora hashes"] == "a: 1, b: 2"
    assert parse_infotext(INFOTEXT)[2]["Model"] == "mix, v2"


def test_png_refusals(tmp_path):
    _png(tmp_path / "good.png", "x\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512")
    _png(tmp_path / "plain.png", None)
    assert _error(tmp_path) == ("'plain.png' (read as a PNG with WebUI infotext): the image has no generation "
                                "parameters (no \"parameters\" text chunk, as the WebUI writes): use images saved "
                                "by the WebUI, or take this one out of the folder.")
    (tmp_path / "plain.png").write_bytes(b"not a png at all")
    assert _error(tmp_path).startswith("'plain.png' (read as a PNG with WebUI infotext): not a readable PNG image")
    (tmp_path / "plain.png").unlink()
    _png(tmp_path / "odd.png", "x\nSteps: many, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512")
    assert _error(tmp_path).endswith("'odd.png' (read as a PNG with WebUI infotext): Steps is 'many', not a number.")
    _png(tmp_path / "odd.png", "x\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 500x512")
    assert _error(tmp_path) == ("'odd.png' (read as a PNG with WebUI infotext): Size (width) must be a multiple of 8 "
                                "from 64 to 2048, not 500.")


_line = st.text(alphabet=string.ascii_letters + string.digits + " ,.:;()[]<>_-'!?|éü猫", min_size=1, max_size=30) \
    .map(str.strip).filter(lambda s: s and not s.startswith("Negative prompt:"))
_extra = st.text(alphabet=string.ascii_letters + " ,:\"\\\n-", min_size=1, max_size=20).map(str.strip).filter(bool)


def _quote(v) -> str:
    """A parameter value as the WebUI writes it: JSON-quoted if it holds a comma, colon, newline or quote."""
    v = str(v)
    return json.dumps(v, ensure_ascii=False) if any(c in v for c in ',:\n"') else v


@settings(max_examples=300, deadline=None, database=None)
@given(prompt=st.lists(_line, max_size=3), negative=st.lists(_line, max_size=3), steps=st.integers(1, 150),
       sampler=st.sampled_from(["Euler a", "Euler", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "UniPC"]),
       schedule=st.sampled_from([None, "Automatic", "Karras", "Exponential"]),
       cfg=st.floats(0, 30, allow_nan=False).map(lambda x: round(x, 2)), seed=st.integers(0, 2 ** 32 - 1),
       width=st.integers(8, 256), height=st.integers(8, 256),
       extra=st.dictionaries(st.sampled_from(["Model hash", "Model", "Lora hashes", "VAE", "Clip skip", "Version",
                                              "Template", "ADetailer model"]), _extra, max_size=4))
def test_infotext_round_trip(prompt, negative, steps, sampler, schedule, cfg, seed, width, height, extra):
    params = {"Steps": steps, "Sampler": sampler, "Schedule type": schedule, "CFG scale": cfg, "Seed": seed,
              "Size": f"{8 * width}x{8 * height}", **extra}
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    text = "\n".join(prompt) + (f"\nNegative prompt: {chr(10).join(negative)}" if negative else "") + "\n" + line
    p = payload_from_infotext(text, name="x")
    assert (p.prompt, p.negative) == ("\n".join(prompt), "\n".join(negative))
    assert (p.steps, p.cfg, p.seed, p.width, p.height) == (steps, float(cfg), seed, 8 * width, 8 * height)
    assert p.sampler == (sampler if schedule in (None, "Automatic") else f"{sampler} {schedule}")
    parsed = parse_infotext(text)[2]
    assert {k: parsed[k] for k in extra} == extra


def test_infotext_without_parameters_line_is_all_prompt():
    assert parse_infotext("just a prompt\nwith two lines") == ("just a prompt\nwith two lines", "", {})
    assert payload_from_infotext("a cat").prompt == "a cat"


# -------------------------------------------------------------------------------------------- errors, by kind
def test_unknown_field(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"name": "cat", "prompt": "b", "step": 20, "clip_skip": 2}]))
    assert _error(path) == (
        "'p.json' (read as Merge Lab payloads), payload 2 'cat': unknown fields 'step', 'clip_skip' "
        "(did you mean 'steps'?); the known fields are prompt, negative, seed, steps, cfg, width, height, sampler, "
        "batch_size, weight, holdout, name, negative_prompt, cfg_scale, sampler_name.")


@pytest.mark.parametrize("field, value, expected", [
    ("steps", "20", "steps must be an integer from 1 to 150, not '20'."),
    ("steps", 0, "steps must be an integer from 1 to 150, not 0."),
    ("steps", 151, "steps must be an integer from 1 to 150, not 151."),
    ("steps", 20.5, "steps must be an integer from 1 to 150, not 20.5."),
    ("steps", True, "steps must be an integer from 1 to 150, not True."),
    ("width", 500, "width must be a multiple of 8 from 64 to 2048, not 500."),
    ("height", 4096, "height must be a multiple of 8 from 64 to 2048, not 4096."),
    ("batch_size", 17, "batch_size must be an integer from 1 to 16, not 17."),
    ("weight", 0, "weight must be a number above 0, not 0."),
    ("weight", 10 ** 400, "weight must be a number above 0, not " + str(10 ** 400) + "."),
    ("cfg_scale", 31, "cfg_scale must be a number from 0 to 30, not 31."),
    ("cfg", float("nan"), "cfg must be a number from 0 to 30, not nan."),
    ("seed", -2, "seed must be an integer from -1 (a random seed) to 4294967295, not -2."),
    ("holdout", "yes", "holdout must be true or false, not 'yes'."),
    ("sampler", " ", "sampler must be a sampler name such as 'Euler a', not ' '."),
    ("negative", None, "negative must be text, not None."),
])
def test_bad_values(field, value, expected):
    assert _error([{"prompt": "p"}, {"prompt": "q", field: value}]) == f"payload 2: {expected}"


def test_structure_errors(tmp_path):
    assert _error([{"prompt": "a", "negative": "x", "negative_prompt": "y"}]) == (
        "payload 1: 'negative' and 'negative_prompt' are the same field; give one of them.")
    assert _error([{"steps": 20}]) == "payload 1: the prompt is missing."
    assert _error(["a cat"]) == "payload 1: a payload must be an object of fields (prompt, steps, ...), not str."
    assert _error([{"prompt": "a", "name": "x"}, {"prompt": "b", "name": "x"}]) == (
        "Payloads 1 and 2 are both named 'x': give them different names (names label the images and the log).")
    assert _error({"prompt": "a"}).startswith("payloads must be a list of payloads or the path")
    assert _error("").startswith("payloads must be a list of payloads or the path")


def test_empty_results(tmp_path):
    assert _error([]) == "The payload list holds no payloads."
    path = tmp_path / "p.yaml"
    path.write_text("payloads: []\n", encoding="utf-8")
    assert _error(path) == f"'{path}' holds no payloads."
    path.write_text("", encoding="utf-8")
    assert _error(path) == "'p.yaml' is empty."
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("x", encoding="utf-8")
    assert _error(tmp_path / "sub") == (f"The folder '{tmp_path / 'sub'}' holds no payload files "
                                        f"(.json, .yaml, .yml, .toml or .png).")


def test_file_errors(tmp_path):
    assert _error("nope.json", tmp_path) == f"Payload file or folder not found: '{tmp_path / 'nope.json'}'."
    path = tmp_path / "bad.yaml"
    path.write_text("payloads:\n  - prompt: a\n    steps: [1\n", encoding="utf-8")
    msg = _error(path)
    assert msg.startswith("'bad.yaml' is not readable as YAML (line 4, column 1: ")
    path = tmp_path / "bad.json"
    path.write_text('[{"prompt": "a",}]', encoding="utf-8")
    assert _error(path) == "'bad.json' is not valid JSON (line 1, column 17: Expecting property name enclosed in " \
                           "double quotes)."
    path = tmp_path / "bad.toml"
    path.write_text("prompt = \n", encoding="utf-8")
    assert _error(path).startswith("'bad.toml' is not valid TOML (")
    path = tmp_path / "p.txt"
    path.write_text("a cat", encoding="utf-8")
    assert _error(path).startswith("'p.txt' is not a payload file Merge Lab reads: use .json, .yaml")
    path = tmp_path / "p.json"
    path.write_text("42", encoding="utf-8")
    assert _error(path).startswith("'p.json' is not a payload file Merge Lab recognises: expected a list of payloads")
    path.write_text('{"payloads": [], "seed": 3}', encoding="utf-8")
    assert _error(path) == ("'p.json' (read as Merge Lab payloads): unknown top-level field 'seed'; it holds only "
                            "\"payloads\".")
    path.write_bytes(b"\xff\xfe[]")
    assert _error(path) == "'p.json' is not a text file (UTF-8)."


# ------------------------------------------------------------------------------------------------------ seeds
def test_resolve_seeds():
    payloads = [Payload(prompt="a", name="payload 1"), Payload(prompt="b", seed=99, name="dog"),
                Payload(prompt="c", name="cat")]
    out, messages = resolve_seeds(payloads, 7)
    assert [p.seed for p in out] == [2921907103, 99, 1057435289]
    assert out[0].seed == derived_seed(7, "payload", 0) and out[2].seed == derived_seed(7, "payload", 2)
    assert messages == ["payload 1: seed -1 resolved to 2921907103", "payload 3 'cat': seed -1 resolved to 1057435289"]
    assert [p.seed for p in payloads] == [-1, 99, -1]                 # new payloads; the old ones untouched
    assert resolve_seeds(payloads, 7) == (out, messages)              # a resumed run draws the same seeds
    assert resolve_seeds(out, 7) == (out, [])                         # fixed seeds stay
    other, _ = resolve_seeds(payloads, 8)
    assert other[0].seed != out[0].seed and other[1].seed == 99
    assert all(0 <= p.seed < 2 ** 32 for p in out)
