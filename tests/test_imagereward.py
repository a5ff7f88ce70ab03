"""The ImageReward scorer on a random, offline ImageReward (tests/imagereward_fixture.py): the package's own
score, determinism, sigmoid, padding instead of cropping, strict checkpoint checks, missing folder pieces and
the 35-token warning. One model load for the whole file; images are small (the transform makes them 224 px)."""
from __future__ import annotations

import copy
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lib_merge.core.errors import InputError, UnsafeFileError
from lib_merge.optimize.imagereward import ImageRewardScorer, check_state_dict, make_tokenizer, pad_to_square
from tests.imagereward_fixture import imagereward_folder  # noqa: F401  (a pytest fixture)

LONG = ("a very detailed oil painting of an old stone castle on a green hill at sunset, with red dragons "
        "flying around its towers, knights in shining armour, dramatic clouds and volumetric light")
SHORT = "a castle on a hill"


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def scorer(imagereward_folder):  # noqa: F811
    s = ImageRewardScorer(model=str(imagereward_folder))
    yield s
    s.close()


def _variant(scorer, **attrs):
    """The same loaded model with other options (no second load): its own warning state and prompt cache."""
    s = copy.copy(scorer)
    s._warned, s._prompts = set(), {}
    for k, v in attrs.items():
        setattr(s, k, v)
    return s


@pytest.fixture(scope="module")
def wide():
    return _image(96, 48, seed=1)


@pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")   # the full package imports clip
def test_score_equals_the_packages_own_score(scorer, imagereward_folder, wide, monkeypatch):  # noqa: F811
    import ImageReward as RM
    # the package's tokenizer is a hub download: give its model the same local vocabulary
    blip_pretrain = sys.modules["ImageReward.models.BLIP.blip_pretrain"]
    monkeypatch.setattr(blip_pretrain, "init_tokenizer",
                        lambda: make_tokenizer(imagereward_folder / "bert-base-uncased" / "vocab.txt"))
    package = RM.load(str(imagereward_folder / "ImageReward.pt"), device="cpu",
                      med_config=str(imagereward_folder / "med_config.json"))
    # a wide image (the package's centre crop) and a prompt past 35 tokens (the package's truncation)
    expected = package.score(LONG, wide)
    del package
    assert scorer.score([wide], [{"prompt": LONG}], {}) == [pytest.approx(expected, abs=1e-5)]


def test_same_image_and_prompt_score_identically(scorer):
    img = _image(64, 64, seed=2)
    first = scorer.score([img], [{"prompt": SHORT}], {})
    again = scorer.score([img.copy()], [{"prompt": SHORT}], {})
    assert first == again and isinstance(first[0], float) and math.isfinite(first[0])


def test_sigmoid_maps_the_raw_reward(scorer):
    img = _image(64, 64, seed=2)
    raw = scorer.score([img], [{"prompt": SHORT}], {})[0]
    squashed = _variant(scorer, sigmoid=True).score([img], [{"prompt": SHORT}], {})[0]
    assert squashed == pytest.approx(1.0 / (1.0 + math.exp(-raw)), abs=1e-12)
    assert 0.0 < squashed < 1.0


def test_pad_keeps_the_sides_that_the_crop_cuts_away(scorer, wide):
    other = np.asarray(wide).copy()
    other[:, :12] = 255 - other[:, :12]          # only the left edge differs (the crop keeps x 24..72)
    other = Image.fromarray(other)
    p = [{"prompt": SHORT}] * 2
    cropped = scorer.score([wide, other], p, {})
    assert cropped[0] == cropped[1]              # the crop never sees the difference
    padded = _variant(scorer, pad=True).score([wide, other], p, {})
    assert padded[0] != padded[1]                # padding keeps it
    assert padded[0] != cropped[0]


def test_pad_to_square_centres_the_image_on_the_fill_colour():
    img = _image(8, 4, seed=3)
    sq = pad_to_square(img, (10, 20, 30))
    assert sq.size == (8, 8)
    a = np.asarray(sq)
    assert (a[:2] == (10, 20, 30)).all() and (a[6:] == (10, 20, 30)).all()
    assert (a[2:6] == np.asarray(img)).all()
    assert pad_to_square(_image(5, 5, seed=3)).size == (5, 5)


def test_long_prompt_warns_once_short_prompt_never(scorer):
    got = []
    s = _variant(scorer, warn=got.append)
    img = _image(32, 32, seed=4)
    s.score([img, img], [{"prompt": LONG}, {"prompt": SHORT}], {})
    s.score([img], [{"prompt": LONG}], {})
    assert len(got) == 1
    assert "35" in got[0] and "a very detailed oil painting" in got[0]
    n = len(scorer.tokenizer(LONG)["input_ids"])
    assert n > 35 and f"{n} tokens" in got[0]


def test_closed_scorer_refuses_to_score(scorer):
    s = _variant(scorer)
    s.close()
    with pytest.raises(InputError, match="closed"):
        s.score([_image(8, 8, seed=0)], [{"prompt": SHORT}], {})


# ------------------------------------------------------------------------------------ bad inputs
@pytest.fixture
def pieces(imagereward_folder, tmp_path):  # noqa: F811
    """A folder with med_config.json and the tokenizer but no checkpoint yet."""
    shutil.copyfile(imagereward_folder / "med_config.json", tmp_path / "med_config.json")
    shutil.copytree(imagereward_folder / "bert-base-uncased", tmp_path / "bert-base-uncased")
    return tmp_path


def test_a_safetensors_with_other_keys_is_refused_naming_missing_keys(pieces):
    from safetensors.torch import save_file
    save_file({"foo.weight": torch.zeros(2, 2), "bar": torch.ones(3)}, pieces / "ImageReward.safetensors")
    with pytest.raises(InputError) as e:
        ImageRewardScorer(model=str(pieces))
    text = str(e.value)
    assert "ImageReward.safetensors" in text and "not an ImageReward checkpoint" in text
    assert "missing" in text and "blip.visual_encoder" in text
    assert "foo.weight" in text


def test_a_pt_with_other_keys_is_refused_with_explicit_config_and_tokenizer(pieces, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere") / "ImageReward.pt"
    torch.save({"model.diffusion_model.x": torch.zeros(1), "mlp.layers.0.weight": torch.zeros(1024, 768)}, other)
    with pytest.raises(InputError) as e:
        ImageRewardScorer(model=str(other), med_config=str(pieces / "med_config.json"),
                          tokenizer=str(pieces / "bert-base-uncased"))
    text = str(e.value)
    assert str(other) in text and "missing" in text and "blip.visual_encoder" in text
    assert "model.diffusion_model.x" in text


def test_a_pickle_that_runs_code_is_refused(pieces):
    torch.save({"blip": Image.new("RGB", (1, 1))}, pieces / "ImageReward.pt")
    with pytest.raises(UnsafeFileError):
        ImageRewardScorer(model=str(pieces))


def test_check_state_dict_names_missing_unexpected_and_misshapen_keys():
    expected = {"a.weight": (2, 3), "b.bias": (4,), "c.weight": (1,)}
    check_state_dict({"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(4), "c.weight": torch.zeros(1)},
                     expected, "'f'")
    with pytest.raises(InputError) as e:
        check_state_dict({"a.weight": torch.zeros(3, 2), "b.bias": torch.zeros(4), "zzz": torch.zeros(1)},
                         expected, "'f'")
    text = str(e.value)
    assert "c.weight" in text and "zzz" in text and "a.weight: (3, 2) in the file, (2, 3) in the model" in text


def test_missing_folder_pieces_are_named_with_where_they_were_looked_for(tmp_path, pieces):
    with pytest.raises(InputError, match="not found") as e:
        ImageRewardScorer(model=str(tmp_path / "nowhere"))
    assert "nowhere" in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError) as e:
        ImageRewardScorer(model=str(empty))
    text = str(e.value)
    for piece in ("ImageReward.pt", "med_config.json", "vocab.txt", str(empty / "bert-base-uncased" / "vocab.txt")):
        assert piece in text

    with pytest.raises(InputError) as e:           # config and tokenizer there, no checkpoint
        ImageRewardScorer(model=str(pieces))
    text = str(e.value)
    assert "ImageReward.pt" in text and str(pieces / "ImageReward.pt") in text
    assert "med_config.json (" not in text and "vocab.txt (" not in text

    with pytest.raises(InputError, match="tokenizer") as e:   # an explicit tokenizer folder without vocab.txt
        ImageRewardScorer(model=str(pieces), tokenizer=str(empty))
    assert str(empty / "vocab.txt") in str(e.value)


def test_a_broken_med_config_is_refused(pieces):
    (pieces / "med_config.json").write_text("{not json", encoding="utf-8")
    (pieces / "ImageReward.pt").write_bytes(b"")
    with pytest.raises(InputError, match="med_config.json"):
        ImageRewardScorer(model=str(pieces))
