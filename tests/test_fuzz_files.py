"""Hostile LoRA, mask and weight-set files, read through the functions the commands use: `lora info`
(lora.info.describe, which opens the file with lora.formats.open_lora as every LoRA merge and bake does), the
mask loader (core.masks.Mask.load: `merge --mask`, `mask op|edit`, `report mask`) and the weight-set loader
(core.weights.WeightSet.load: `merge --weights`, `weights edit|combine`, `report weights`).

Each file starts as a small valid one (real kohya key names and shapes; a mask and a weight set of real SD1 keys)
and is then truncated at many offsets, has bytes flipped, a header length larger than the file, a header that is
not JSON, dtypes and shapes that lie, NaN/Inf where numbers must be finite, and huge declared shapes. Every read
must either succeed with a well-formed result (a harmless change) or raise the project's InputError/MergeError with
a sentence: never another exception, never gigabytes of memory, and never a change to the file itself.
"""
from __future__ import annotations

import json
import math
import resource
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib_merge.core.errors import CorruptFileError, InputError, MergeError, UnsupportedModelError
from lib_merge.core.files import save_state_dict
from lib_merge.core.masks import Mask, simple
from lib_merge.core.weights import WEIGHTS_FORMAT, WeightSet, from_blocks
from lib_merge.lora.formats import open_lora
from lib_merge.lora.info import describe

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MEMORY_LIMIT = 512 << 20          # no read may raise the process's peak memory by more than this

# real kohya module names (SD1), small ranks: a linear, a 3x3 conv (LoCon) and a text-encoder module
TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"     # (320, 768)
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"                                   # (320, 320, 3, 3)
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"                      # (768, 768)
UNET = "model.diffusion_model."
MASK_SHAPES = {f"{UNET}input_blocks.1.1.proj_in.weight": (3, 5),      # 15 elements: padding bits in the last byte
               f"{UNET}out.2.bias": (4,),
               f"{UNET}middle_block.1.norm.weight": (16,),
               "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (7, 3)}


def _rnd(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def lora_state() -> dict[str, torch.Tensor]:
    sd = {}
    for i, (name, down, up, alpha) in enumerate([(TO_K, (2, 768), (320, 2), 4.0), (CONV, (2, 320, 3, 3), (320, 2, 1, 1), 1.0),
                                                 (TE_Q, (2, 768), (768, 2), None)]):
        sd[f"{name}.lora_down.weight"] = _rnd(*down, seed=2 * i)
        sd[f"{name}.lora_up.weight"] = _rnd(*up, seed=2 * i + 1)
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


# ------------------------------------------------------------------------------------------- safetensors bytes
def split(raw: bytes) -> tuple[dict, bytes]:
    """(header JSON object, data bytes) of a safetensors file."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def build(header, data: bytes, *, raw_header: bytes | None = None, length: int | None = None) -> bytes:
    """A safetensors file from a header (an object, or raw bytes) and data; `length` overrides the length field."""
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def relabel(raw: bytes, key: str, **entry) -> bytes:
    """The file with the header entry of `key` changed (dtype, shape, data_offsets), its data untouched."""
    header, data = split(raw)
    header[key] = {**header[key], **entry}
    return build(header, data)


def with_metadata(raw: bytes, **changes) -> bytes:
    """The file with metadata fields changed (None removes one; a non-dict replaces the whole __metadata__)."""
    header, data = split(raw)
    if "__whole__" in changes:
        header["__metadata__"] = changes["__whole__"]
    else:
        meta = dict(header.get("__metadata__", {}))
        for k, v in changes.items():
            if v is None:
                meta.pop(k, None)
            else:
                meta[k] = v
        header["__metadata__"] = meta
    return build(header, data)


# ----------------------------------------------------------------------------------------------------- reading
def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def read_hostile(reader, path: Path, data: bytes):
    """Write `data` to `path`, read it with `reader`: (result, None) or (None, the MergeError). Any other exception
    propagates. The file's bytes and mtime must be unchanged and the peak memory must not jump."""
    path.write_bytes(data)
    mtime = path.stat().st_mtime_ns
    peak = _peak_rss()
    try:
        result, err = reader(path), None
    except MergeError as e:
        result, err = None, e
        msg = str(e)
        assert len(msg) > 15 and msg[0].isupper() or msg.startswith("'"), f"not a sentence: {msg!r}"
    assert path.read_bytes() == data, "the reader changed its input file"
    assert path.stat().st_mtime_ns == mtime
    assert _peak_rss() - peak < MEMORY_LIMIT, "the read allocated hundreds of MiB for a tiny file"
    return result, err


def read_lora(path: Path) -> dict:
    """`lora info`, then every module's ΔW (what a merge or bake reads): the whole file through open_lora."""
    info = describe(path)
    assert info["format"] in ("kohya", "peft", "lycoris") and info["modules"] >= 1
    assert isinstance(json.dumps(info), str)
    with open_lora(path) as lf:
        for name, m in lf.modules.items():
            assert math.isfinite(m.alpha) and m.rank >= 0
            assert tuple(lf.delta(name).shape) == tuple(m.shape)
    return info


def read_mask(path: Path) -> Mask:
    """Mask.load, then every key used as the merge engine and the reports use it."""
    mask = Mask.load(path)
    for key in mask.keys():
        shape = mask.shape(key)
        assert all(d >= 0 for d in shape), (key, shape)
        t = mask.tensor(key)
        assert t.dtype == torch.bool and tuple(t.shape) == shape
        assert mask.true_count(key) == int(t.sum()) <= mask.numel(key)
        assert torch.equal(mask.get(key, shape), t)
    return mask


def read_weights(path: Path) -> WeightSet:
    ws = WeightSet.load(path)
    assert all(isinstance(k, str) and type(v) is float and math.isfinite(v) for k, v in ws.items())
    assert ws.arch is None or isinstance(ws.arch, str)
    return ws


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    """The valid files' bytes: a kohya LoRA, a mask and a weight set (each checked to read back first)."""
    folder = tmp_path_factory.mktemp("fuzz_originals")
    lora = save_state_dict(lora_state(), folder / "style.safetensors",
                           {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
                            "ss_tag_frequency": json.dumps({"10_x": {"cat": 3, " dog ": 2}})})
    mask = simple(MASK_SHAPES, "random", probability=0.4, seed=3, family="sd1").save(folder / "mask.safetensors")
    weights = from_blocks(MASK_SHAPES, "sd1", "GRAD_V").save(folder / "weights.json")
    return {"lora": lora.read_bytes(), "mask": mask.read_bytes(), "weights": weights.read_bytes()}


READERS = {"lora": (read_lora, "style.safetensors"), "mask": (read_mask, "mask.safetensors"),
           "weights": (read_weights, "weights.json")}


def hostile(kind: str, tmp_path: Path, data: bytes):
    reader, name = READERS[kind]
    return read_hostile(reader, tmp_path / name, data)


def test_originals_read_back(originals, tmp_path):
    """The starting files are valid: the LoRA is SD1 with its 3 modules, the mask and weights hold their keys."""
    info, _ = hostile("lora", tmp_path, originals["lora"])
    assert info["architecture"] == "sd1" and info["modules"] == 3 and info["top_tags"] == [["cat", 3], ["dog", 2]]
    mask, _ = hostile("mask", tmp_path, originals["mask"])
    assert set(mask.keys()) == set(MASK_SHAPES) and mask.family == "sd1"
    ws, _ = hostile("weights", tmp_path, originals["weights"])
    assert set(ws) == set(MASK_SHAPES) and ws.arch == "sd1"


# -------------------------------------------------------------------------------------------- truncation, flips
def _offsets(size: int, header_end: int) -> list[int]:
    """Every offset of the length field and the first part of the header, then ~80 spread over the rest."""
    head = list(range(0, min(size, 40)))
    near = list(range(max(0, header_end - 24), min(size, header_end + 24)))
    spread = list(range(0, size, max(1, size // 80)))
    return sorted(set(head + near + spread + [size - 1]))


@pytest.mark.parametrize("kind", ["lora", "mask", "weights"])
def test_truncated_anywhere(kind, originals, tmp_path):
    """A file cut at any offset (inside the length field, the header or the data) is refused with an InputError;
    weight sets are checked at every single offset."""
    raw = originals[kind]
    if kind == "weights":
        offsets = range(len(raw))
    else:
        offsets = _offsets(len(raw), 8 + struct.unpack("<Q", raw[:8])[0])
    for n in offsets:
        _, err = hostile(kind, tmp_path, raw[:n])
        assert isinstance(err, InputError), f"{kind} cut at {n} of {len(raw)} bytes was read: {err!r}"


@pytest.mark.parametrize("kind", ["lora", "mask", "weights"])
@FUZZ
@given(data=st.data())
def test_flipped_bytes(kind, originals, tmp_path, data):
    """Bytes flipped anywhere (most of the draws in the header, where they matter) give a well-formed result or a
    MergeError with a sentence."""
    raw = bytearray(originals[kind])
    end = len(raw) if kind == "weights" else 8 + struct.unpack("<Q", bytes(raw[:8]))[0]
    places = st.integers(0, end - 1) | st.integers(0, len(raw) - 1)
    for at, mask in data.draw(st.lists(st.tuples(places, st.integers(1, 255)), min_size=1, max_size=4)):
        raw[at] ^= mask
    hostile(kind, tmp_path, bytes(raw))


# --------------------------------------------------------------------------------------------- header lies
HEADER_LIES = {
    "length_past_eof": lambda h, d, n: build(h, d, length=n + 1),
    "length_2_64": lambda h, d, n: build(h, d, length=2 ** 64 - 1),
    "length_2_40": lambda h, d, n: build(h, d, length=2 ** 40),
    "length_zero": lambda h, d, n: build(h, d, length=0),
    "length_short": lambda h, d, n: build(h, d, length=len(json.dumps(h)) - 1),
    "length_long": lambda h, d, n: build(h, d, length=len(json.dumps(h)) + 16),
    "not_json": lambda h, d, n: build(None, d, raw_header=b"this is not json at all " * 4),
    "not_utf8": lambda h, d, n: build(None, d, raw_header=b'{"\xff\xfe": 1}'),
    "json_array": lambda h, d, n: build([1, 2], d),
    "json_string": lambda h, d, n: build("header", d),
    "json_null": lambda h, d, n: build(None, d, raw_header=b"null"),
    "nan_literal": lambda h, d, n: build(None, d, raw_header=b'{"x": NaN}'),
    "metadata_list": lambda h, d, n: build({**h, "__metadata__": ["a"]}, d),
    "metadata_numbers": lambda h, d, n: build({**h, "__metadata__": {**h.get("__metadata__", {}), "n": 1.5,
                                                                     "x": None, "y": [1]}}, d),
    "entry_is_list": lambda h, d, n: build({**h, next(k for k in h if k != "__metadata__"): [1, 2]}, d),
    "entry_is_string": lambda h, d, n: build({**h, next(k for k in h if k != "__metadata__"): "F32"}, d),
    "extra_key_no_data": lambda h, d, n: build({**h, "lora_unet_x.alpha": {"dtype": "F32", "shape": [],
                                                                           "data_offsets": [len(d), len(d) + 4]}}, d),
    "no_tensors": lambda h, d, n: build({"__metadata__": h.get("__metadata__", {})}, b""),
    "empty_object": lambda h, d, n: build({}, b""),
    "trailing_spaces": lambda h, d, n: build(None, d, raw_header=json.dumps(h).encode() + b" " * 64),
    "data_appended": lambda h, d, n: build(h, d + b"\0" * 64),
}
HARMLESS = {"metadata_numbers", "trailing_spaces", "data_appended", "extra_key_no_data"}


@pytest.mark.parametrize("kind", ["lora", "mask"])
@pytest.mark.parametrize("lie", sorted(HEADER_LIES))
def test_header_lies(kind, lie, originals, tmp_path):
    """Length fields past the end (or 2**64), headers that are not JSON or not an object, malformed entries: an
    InputError; trailing padding, appended data and non-string metadata are harmless (a LoRA or mask still reads,
    except that a mask's metadata must still say what it is)."""
    header, data = split(originals[kind])
    raw = HEADER_LIES[lie](header, data, len(originals[kind]))
    result, err = hostile(kind, tmp_path, raw)
    if lie == "extra_key_no_data":
        assert isinstance(err, CorruptFileError) and "lora_unet_x.alpha" in str(err)
    elif lie in HARMLESS:
        assert err is None, f"{lie}: {err}"
    else:
        assert isinstance(err, InputError), f"{lie} was read: {result!r}"


@pytest.mark.parametrize("kind", ["lora", "mask"])
@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                  b'{"x": ' + b"9" * 5000 + b"}"], ids=["nested", "nested_metadata", "5000_digits"])
def test_header_json_too_deep_or_too_long(kind, body, originals, tmp_path):
    """A header of 100 000 nested brackets, or with a 5000-digit number (well inside the header size limit, valid
    JSON syntax that Python's parser refuses), is a CorruptFileError."""
    _, err = hostile(kind, tmp_path, build(None, b"", raw_header=body))
    assert isinstance(err, CorruptFileError)


# ------------------------------------------------------------------------------------------ dtype, shape lies
def _entry_lies(key: str, entry: dict, data_len: int) -> dict[str, tuple[dict, bool]]:
    """name -> (changed fields of the entry, harmless?)."""
    start, end = entry["data_offsets"]
    n = end - start
    return {
        "dtype_f64": ({"dtype": "F64"}, False),
        "dtype_f16": ({"dtype": "F16"}, False),
        "dtype_unknown": ({"dtype": "Q7"}, False),
        "dtype_number": ({"dtype": 5}, False),
        "dtype_missing": ({"dtype": None}, False),
        "shape_negative": ({"shape": [-1] + entry["shape"][1:]}, False),
        "shape_negative_pair": ({"shape": [-1, -(n // entry_itemsize(entry))]}, False),
        "shape_text": ({"shape": "abc"}, False),
        "shape_nested": ({"shape": [[1, 2]]}, False),
        "shape_huge": ({"shape": [2 ** 62, 2 ** 62]}, False),
        "shape_huge_consistent": ({"shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 2 ** 82]}, False),
        "shape_2_63": ({"shape": [2 ** 63]}, False),
        "offsets_negative": ({"data_offsets": [-n, 0]}, False),
        "offsets_reversed": ({"data_offsets": [end, start]}, False),
        "offsets_past_end": ({"data_offsets": [data_len, data_len + n]}, False),
        "offsets_text": ({"data_offsets": ["a", "b"]}, False),
        "offsets_one": ({"data_offsets": [0]}, False),
        "offsets_overlap": ({"data_offsets": [0, n]}, True),    # two tensors on the same bytes: allowed
    }


def entry_itemsize(entry: dict) -> int:
    return {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "U8": 1, "I64": 8, "I32": 4}[entry["dtype"]]


def _entry_cases(kind: str):
    return [(kind, key, lie) for key in {"lora": [f"{TO_K}.lora_down.weight", f"{TO_K}.alpha"],
                                         "mask": [f"{UNET}input_blocks.1.1.proj_in.weight"]}[kind]
            for lie in _entry_lies(key, {"data_offsets": [0, 8], "shape": [2], "dtype": "F32"}, 0)]


@pytest.mark.parametrize("kind, key, lie", _entry_cases("lora") + _entry_cases("mask"))
def test_dtype_and_shape_lies(kind, key, lie, originals, tmp_path):
    """A tensor whose dtype, shape or offsets lie (bytes that do not fit, negative or huge dimensions, offsets past
    the data) is an InputError without any large allocation; tensors sharing bytes are harmless."""
    header, data = split(originals[kind])
    changes, harmless = _entry_lies(key, header[key], len(data))[lie]
    if lie == "offsets_overlap":   # the bytes of another tensor of the same dtype and shape
        other = next(k for k in header if k not in ("__metadata__", key) and header[k]["dtype"] == header[key]["dtype"]
                     and header[k]["shape"] == header[key]["shape"])
        changes = {"data_offsets": header[other]["data_offsets"]}
    entry = {**header[key], **changes}
    header[key] = {k: v for k, v in entry.items() if v is not None}
    result, err = hostile(kind, tmp_path, build(header, data))
    if harmless:
        assert err is None, err
    else:
        assert isinstance(err, InputError), f"{lie} on {key} was read: {result!r}"
    if lie == "dtype_unknown":
        assert isinstance(err, UnsupportedModelError) and "Q7" in str(err)


@pytest.mark.parametrize("dtype, rows, ok", [("I32", 1, True),      # the same bytes read as integers: harmless
                                             ("U8", 4, False),      # as bytes, 4x the rows: the rank no longer fits
                                             ("BF16", 2, False)])
def test_lora_factor_reinterpreted(dtype, rows, ok, originals, tmp_path):
    """A factor relabelled with another dtype of the same byte count reads (the numbers are garbage, not the
    file); one relabelled so that the factors no longer fit together is a CorruptFileError that names the module.
    (A ΔW that fits no checkpoint key is refused later, when it is baked or merged into one.)"""
    header, data = split(originals["lora"])
    key = f"{TO_K}.lora_down.weight"
    entry = dict(header[key], dtype=dtype)
    entry["shape"] = [entry["shape"][0] * rows] + entry["shape"][1:]
    header[key] = entry
    _, err = hostile("lora", tmp_path, build(header, data))
    if ok:
        assert err is None, err
    else:
        assert isinstance(err, CorruptFileError) and TO_K in str(err)


@pytest.mark.parametrize("value, shape, refused", [
    (float("nan"), [], True), (float("inf"), [], True), (float("-inf"), [1], True),
    (0.0, [], False), (-2.0, [1, 1], False), (None, [2], True), (None, [0], True)])
def test_lora_alpha_values(value, shape, refused, originals, tmp_path):
    """A NaN or infinite alpha is a CorruptFileError naming the module;
    an alpha of 0 reads (as the rank, with a warning); an alpha that is not one number is refused."""
    header, data = split(originals["lora"])
    key = f"{TO_K}.alpha"
    start = header[key]["data_offsets"][0]
    if value is not None:
        data = data[:start] + struct.pack("<f", value) + data[start + 4:]
        header[key] = dict(header[key], shape=shape)
    else:   # a 2-element or empty alpha: the bytes of the down factor
        n = math.prod(shape) * 4
        header[key] = dict(header[key], shape=shape, data_offsets=[0, n])
    result, err = hostile("lora", tmp_path, build(header, data))
    if refused:
        assert isinstance(err, CorruptFileError) and TO_K in str(err)
    else:
        assert err is None, err
        if value == 0.0:
            assert any("alpha is 0" in w for w in result["warnings"])


def test_lora_zero_sized_and_huge_declared_shapes(originals, tmp_path):
    """A rank-0 module declaring huge dimensions with zero elements reads as an empty ΔW (no allocation); the same
    module declared with huge non-zero shapes is refused before anything is read."""
    header, data = split(originals["lora"])
    end = len(data)
    header[f"{TE_Q}.lora_down.weight"] = {"dtype": "F32", "shape": [0, 768], "data_offsets": [end, end]}
    header[f"{TE_Q}.lora_up.weight"] = {"dtype": "F32", "shape": [768, 0], "data_offsets": [end, end]}
    info, err = hostile("lora", tmp_path, build(header, data))
    assert err is None and info["modules"] == 3
    header[f"{TE_Q}.lora_down.weight"] = {"dtype": "F32", "shape": [2 ** 31, 2 ** 31, 0, 0], "data_offsets": [end, end]}
    _, err = hostile("lora", tmp_path, build(header, data))
    assert isinstance(err, CorruptFileError)
    header[f"{TE_Q}.lora_down.weight"] = {"dtype": "F32", "shape": [2 ** 20, 2 ** 20],
                                          "data_offsets": [0, 4 * 2 ** 40]}
    _, err = hostile("lora", tmp_path, build(header, data))
    assert isinstance(err, CorruptFileError) and "truncated" in str(err)


@pytest.mark.parametrize("tags, expect", [
    ("not json", []), ("[" * 100_000, []), ('{"a": {"t": Infinity}}', []), ('{"a": {"t": NaN, "u": 2}}', [["u", 2]]),
    ('{"a": {"t": ' + "9" * 5000 + "}}", []), ('{"a": {"t": 1e400}}', []), ('{"a": [1, 2]}', []),
    ('{"a": {"t": "3", "u": [1]}}', [["t", 3]])])
def test_lora_tag_metadata(tags, expect, originals, tmp_path):
    """Garbage in the training tags (`ss_tag_frequency`: not JSON, nested too deep, infinite or NaN counts, huge
    numbers) never breaks `lora info`: the bad counts are skipped."""
    info, err = hostile("lora", tmp_path, with_metadata(originals["lora"], ss_tag_frequency=tags))
    assert err is None, err
    assert info["top_tags"] == expect


# ------------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("change, words", [
    ({"format": None}, "not a Merge Lab mask"), ({"format": "merge-lab-weights"}, "not a Merge Lab mask"),
    ({"version": "2"}, "version '2'"), ({"version": None}, "version None"),
    ({"shapes": None}, "shape table"), ({"shapes": "not json"}, "shape table"), ({"shapes": "[1, 2]"}, "shape table"),
    ({"shapes": "[" * 100_000}, "shape table"), ({"shapes": "9" * 5000}, "shape table"),
    ({"shapes": json.dumps({k: "ab" for k in MASK_SHAPES})}, "shape table"),
    ({"shapes": json.dumps({k: [None] for k in MASK_SHAPES})}, "shape table"),
    ({"shapes": json.dumps({k: [float("nan")] for k in MASK_SHAPES})}, "shape table"),
    ({"shapes": json.dumps({k: [float("inf")] for k in MASK_SHAPES})}, "shape table"),
    ({"shapes": json.dumps({k: [-1, -s[0] * (s[1] if len(s) > 1 else 1)] for k, s in MASK_SHAPES.items()})},
     "negative"),
    ({"shapes": json.dumps({k: [2 ** 62] for k in MASK_SHAPES})}, "does not match its recorded shape"),
    ({"shapes": json.dumps({k: [2 ** 64, 0] for k in MASK_SHAPES})}, "does not match its recorded shape"),
    ({"shapes": json.dumps({**{k: list(s) for k, s in MASK_SHAPES.items()}, "extra.weight": [3]})},
     "holds no data for it"),
    ({"shapes": json.dumps({k: list(s) for k, s in list(MASK_SHAPES.items())[1:]})}, "does not match"),
    ({"__whole__": ["not", "an", "object"]}, "__metadata__"),
])
def test_mask_metadata_lies(change, words, originals, tmp_path):
    """A mask whose metadata is missing, of another format or version, or whose shape table is not JSON, nested too
    deep, not whole non-negative numbers, or disagrees with the data, is an InputError saying so."""
    _, err = hostile("mask", tmp_path, with_metadata(originals["mask"], **change))
    assert isinstance(err, InputError), "the mask was read"
    assert words in str(err), str(err)


def test_mask_harmless_changes(originals, tmp_path):
    """Set padding bits in the last byte are cleared on load (true counts stay exact); dimensions written as
    numbers in text, or an empty arch, still read."""
    header, data = split(originals["mask"])
    key = f"{UNET}input_blocks.1.1.proj_in.weight"     # 15 elements in 2 bytes: one padding bit
    end = header[key]["data_offsets"][1]
    data = data[:end - 1] + bytes([data[end - 1] | 0x01]) + data[end:]
    mask, err = hostile("mask", tmp_path, build(header, data))
    assert err is None and mask.true_count(key) == int(mask.tensor(key).sum())
    shapes = json.dumps({k: [str(d) for d in s] for k, s in MASK_SHAPES.items()})
    mask, err = hostile("mask", tmp_path, with_metadata(originals["mask"], shapes=shapes, arch=""))
    assert err is None and mask.family is None and mask.shape(key) == (3, 5)


@pytest.mark.parametrize("dtype", ["I8", "BOOL", "F16"])
def test_mask_data_dtype_lies(dtype, originals, tmp_path):
    """Mask data of another dtype (even one of the same byte count) is refused: the file is damaged."""
    header, data = split(originals["mask"])
    key = f"{UNET}middle_block.1.norm.weight"          # 16 elements: 2 bytes
    header[key] = dict(header[key], dtype=dtype, shape=[1] if dtype == "F16" else header[key]["shape"])
    _, err = hostile("mask", tmp_path, build(header, data))
    assert isinstance(err, InputError) and "damaged" in str(err)


# ---------------------------------------------------------------------------------------------------- weights
def _weights_json(**fields) -> bytes:
    doc = {"format": WEIGHTS_FORMAT, "version": 1, "arch": "sd1", "weights": {f"{UNET}out.2.bias": 0.5}}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


@pytest.mark.parametrize("raw, words", [
    (b"", "not readable JSON"), (b"\xff\xfe\x00", "not readable JSON"), (b"[" * 100_000, "nested too deeply"),
    (b"null", "not a Merge Lab weight set"), (b"[1, 2]", "not a Merge Lab weight set"),
    (_weights_json(format=...), "not a Merge Lab weight set"), (_weights_json(format="merge-lab-mask"), "not a Merge"),
    (_weights_json(version=2), "version 2"), (_weights_json(version="1"), "version '1'"),
    (_weights_json(version=...), "version None"),
    (_weights_json(weights=[0.5]), "must be an object"), (_weights_json(weights=...), "must be an object"),
    (_weights_json(weights={"k": float("nan")}), "not a finite number"),
    (_weights_json(weights={"k": float("inf")}), "not a finite number"),
    (_weights_json(weights={"k": float("-inf")}), "not a finite number"),
    (b'{"format": "merge-lab-weights", "version": 1, "weights": {"k": 1e400}}', "not a finite number"),
    (b'{"format": "merge-lab-weights", "version": 1, "weights": {"k": 1' + b"0" * 400 + b"}}", "not a finite number"),
    (b'{"format": "merge-lab-weights", "version": 1, "weights": {"k": ' + b"9" * 5000 + b"}}", "not readable JSON"),
    (_weights_json(weights={"k": "0.5"}), "not a finite number"), (_weights_json(weights={"k": True}), "not a finite"),
    (_weights_json(weights={"k": None}), "not a finite number"), (_weights_json(weights={"k": [1]}), "not a finite"),
])
def test_weights_refusals(raw, words, tmp_path):
    """A weight set that is not JSON (empty, not UTF-8, nested too deep, a number of 5000 digits), of another format
    or version, or holds values that are not finite numbers (NaN, ±Infinity, 1e400, an integer too large for a
    float, text, true, null, a list) is an InputError saying so."""
    _, err = hostile("weights", tmp_path, raw)
    assert isinstance(err, InputError), "the weight set was read"
    assert words in str(err), str(err)


def test_weights_harmless_changes(tmp_path):
    """Integers, an arch that is not text, extra fields and a trailing newline read: the values become floats."""
    ws, err = hostile("weights", tmp_path, _weights_json(weights={"a": 2, "b": -0.0, "c": 10 ** 300}, arch=7,
                                                         note="made by hand") + b"\n")
    assert err is None and ws == {"a": 2.0, "b": 0.0, "c": 1e300} and ws.arch is None


def test_missing_and_folder_paths(tmp_path):
    """A missing file or a folder given as a LoRA, mask or weight set is an InputError naming it."""
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "folder.json").mkdir()
    for reader, name in [(describe, "nope.safetensors"), (Mask.load, "nope.safetensors"), (WeightSet.load, "nope.json"),
                         (describe, "folder.safetensors"), (Mask.load, "folder.safetensors"),
                         (WeightSet.load, "folder.json")]:
        with pytest.raises(InputError) as e:
            reader(tmp_path / name)
        assert name.split(".")[0] in str(e.value)


def test_checkpoint_is_not_a_lora_or_mask(tiny, tmp_path):
    """A real (tiny) checkpoint given as a LoRA or as a mask is refused with a sentence, and left as it was."""
    raw = Path(tiny.path["sd1_a"]).read_bytes()
    _, err = hostile("lora", tmp_path, raw)
    assert isinstance(err, InputError) and "does not look like a LoRA" in str(err)
    _, err = hostile("mask", tmp_path, raw)
    assert isinstance(err, InputError) and "not a Merge Lab mask" in str(err)
