"""ImageReward as an AutoMBW scorer: one float per (image, prompt), from the package `image-reward` 1.5.

Where the model comes from:
- `model` = a folder (the "ImageReward model folder" of the settings or the run's config) holding
  `ImageReward.pt` (or `ImageReward.safetensors`), `med_config.json` and the BERT tokenizer's vocabulary
  (`bert-base-uncased/vocab.txt`, or `vocab.txt` directly) - all from huggingface.co/THUDM/ImageReward and
  huggingface.co/bert-base-uncased. Nothing is downloaded. `model` may also be the checkpoint file itself;
  the other two pieces are then looked for beside it. `med_config` and `tokenizer` override either piece.
- `model=None`: the package's online default - ImageReward.pt and med_config.json from the hub into
  `download_root` (~/.cache/ImageReward, the package's own place; files already there are used as they are)
  and the tokenizer from the hub (bert-base-uncased) unless a vocabulary lies in that folder too.

What we do differently from `ImageReward.load`, and why:
- The checkpoint is read with torch.load(weights_only=True) (or safetensors) and its keys and shapes are
  checked against the model before anything is built: the package loads with strict=False, so a wrong file
  would load silently and score noise. The model is laid out on the "meta" device and takes the
  checkpoint's tensors as they are (no random initialisation of 447 M parameters that would be overwritten).
- The package is not imported as `ImageReward`: its __init__ imports its ReFL trainer (diffusers, datasets,
  accelerate, wandb when installed) and the CLIP/BLIP/aesthetic scorers. We load only the files the reward
  model needs (ImageReward.py and models/BLIP/*) under a private package name, so nothing else is run and
  the real `ImageReward` stays untouched for any other extension. The package's two global side effects at
  import (all Python warnings silenced, transformers' log level set to errors) are undone.

Scoring is the package's own computation (its transform, its 35-token prompt, its BLIP encoders, MLP and
standardisation), one image at a time, so a score depends only on its image and prompt. Options:
- `sigmoid`: 1 / (1 + e^-r) of the raw reward r (what peers report; it flattens the top end).
- `pad`: a non-square image is padded to a square (centred) before the 224 px resize, instead of the
  package's centre crop that cuts away the sides of a wide image (or top and bottom of a tall one). The bars
  are the colour the package's normalisation maps to zero (its mean, a neutral grey), so they feed the
  network nothing and are the same for every candidate.
- A prompt longer than 35 BLIP tokens is cut by ImageReward; `warn` is told once per distinct prompt.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from ..core.errors import CorruptFileError, InputError, UnsafeFileError
from ..core.files import torch_load_weights

HUB_REPO = "THUDM/ImageReward"
CHECKPOINT_NAMES = ("ImageReward.pt", "ImageReward.safetensors")
MED_CONFIG_NAME = "med_config.json"
TOKENIZER_FOLDER = "bert-base-uncased"
VOCAB_NAME = "vocab.txt"
MAX_TOKENS = 35            # the package tokenises with truncation at 35 (start and end tokens included)
IMAGE_SIZE = 224
DEFAULT_DOWNLOAD_ROOT = "~/.cache/ImageReward"
# buffers the model rebuilds itself if a checkpoint lacks them (they are not learned)
REBUILT_BUFFERS = ("blip.text_encoder.embeddings.position_ids",)

log = logging.getLogger("merge_lab.imagereward")
_PRIVATE = "_merge_lab_ImageReward"
_import_lock = threading.Lock()
_build_lock = threading.Lock()
_modules: tuple | None = None


# ------------------------------------------------------------------------------------ the package
def package_modules():
    """(ImageReward.ImageReward, ImageReward.models.BLIP.blip_pretrain) of the installed package, loaded
    under a private name without running ImageReward/__init__.py or ImageReward/models/__init__.py."""
    global _modules
    with _import_lock:
        if _modules is not None:
            return _modules
        spec = importlib.util.find_spec("ImageReward")
        if spec is None or not spec.submodule_search_locations:
            raise InputError("The ImageReward scorer needs the package image-reward: pip install image-reward==1.5")
        root = Path(list(spec.submodule_search_locations)[0])
        for name, folder in ((_PRIVATE, root), (f"{_PRIVATE}.models", root / "models")):
            if name not in sys.modules:
                # a package object with its search path but without running its __init__.py
                s = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                           submodule_search_locations=[str(folder)])
                sys.modules[name] = importlib.util.module_from_spec(s)
        import transformers
        verbosity = transformers.logging.get_verbosity()
        try:
            with warnings.catch_warnings():   # models/BLIP/blip.py silences every warning of the process
                reward = importlib.import_module(f"{_PRIVATE}.ImageReward")
                blip_pretrain = importlib.import_module(f"{_PRIVATE}.models.BLIP.blip_pretrain")
        except ImportError as e:
            raise InputError(f"The ImageReward package (image-reward 1.5) could not be imported: {e}") from e
        finally:
            transformers.logging.set_verbosity(verbosity)
        _modules = (reward, blip_pretrain)
        return _modules


def make_tokenizer(vocab: str | os.PathLike):
    """The package's tokenizer (bert-base-uncased plus its [DEC] and [ENC] tokens) from a local vocab.txt."""
    from transformers import BertTokenizer
    tok = BertTokenizer(vocab_file=str(vocab), do_lower_case=True, model_max_length=512)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.additional_special_tokens_ids[0]
    return tok


class _LayoutOnMeta(TorchFunctionMode):
    """Tensors created by factory functions go to the meta device (no memory, no initialisation), except
    linspace, whose values the ViT reads while it is built. A torch function mode is per thread."""

    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.arange, torch.rand, torch.randn,
                 torch.randint}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def build_model(med_config: str | os.PathLike, tokenizer=None, *, meta: bool = False):
    """The package's ImageReward module: random weights (as the package builds it), or laid out on the meta
    device (meta=True) to take a checkpoint's tensors. tokenizer=None: the package's own (a hub download)."""
    reward, blip_pretrain = package_modules()
    with _build_lock:
        original = blip_pretrain.init_tokenizer
        if tokenizer is not None:
            blip_pretrain.init_tokenizer = lambda: tokenizer
        try:
            if meta:
                with _LayoutOnMeta():
                    return reward.ImageReward(med_config=str(med_config), device="cpu")
            return reward.ImageReward(med_config=str(med_config), device="cpu")
        finally:
            blip_pretrain.init_tokenizer = original


# ------------------------------------------------------------------------------------ files
def _first(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _vocab_candidates(folder: Path) -> list[Path]:
    return [folder / TOKENIZER_FOLDER / VOCAB_NAME, folder / VOCAB_NAME]


def _explicit_vocab(tokenizer: str) -> Path:
    p = Path(tokenizer).expanduser()
    if p.is_dir():
        found = _first([p / VOCAB_NAME, p / TOKENIZER_FOLDER / VOCAB_NAME])
        if found is None:
            raise InputError(f"ImageReward tokenizer: no {VOCAB_NAME} in '{p}' (looked for '{p / VOCAB_NAME}' and "
                             f"'{p / TOKENIZER_FOLDER / VOCAB_NAME}'). It is bert-base-uncased's vocabulary, from "
                             f"huggingface.co/bert-base-uncased.")
        return found
    if not p.is_file():
        raise InputError(f"ImageReward tokenizer not found: '{p}' (give bert-base-uncased's folder or its {VOCAB_NAME}).")
    return p


def resolve_files(model: str | None, med_config: str | None, tokenizer: str | None,
                  download_root: str | None) -> tuple[Path, Path, Path | None]:
    """(checkpoint, med_config.json, vocab.txt or None for the hub tokenizer); InputError naming every missing
    piece and where it was looked for."""
    if model is None:
        return _download(download_root, med_config, tokenizer)
    p = Path(model).expanduser()
    if not p.exists():
        raise InputError(f"ImageReward model not found: '{p}'. Give the folder holding ImageReward.pt, "
                         f"{MED_CONFIG_NAME} and {TOKENIZER_FOLDER}/{VOCAB_NAME} (or leave it empty to download).")
    folder = p if p.is_dir() else p.parent
    missing = []
    if p.is_dir():
        checkpoint = _first([folder / n for n in CHECKPOINT_NAMES])
        if checkpoint is None:
            missing.append(f"the checkpoint {CHECKPOINT_NAMES[0]} (looked for "
                           + " and ".join(f"'{folder / n}'" for n in CHECKPOINT_NAMES) + ")")
    else:
        checkpoint = p
    if med_config is not None:
        config = Path(med_config).expanduser()
        if not config.is_file():
            missing.append(f"{MED_CONFIG_NAME} (looked for '{config}')")
    else:
        config = folder / MED_CONFIG_NAME
        if not config.is_file():
            missing.append(f"{MED_CONFIG_NAME} (looked for '{config}')")
    vocab = None
    if tokenizer is not None:
        vocab = _explicit_vocab(tokenizer)
    else:
        vocab = _first(_vocab_candidates(folder))
        if vocab is None:
            missing.append(f"the tokenizer's {VOCAB_NAME} (looked for "
                           + " and ".join(f"'{c}'" for c in _vocab_candidates(folder)) + ")")
    if missing:
        raise InputError(f"The ImageReward model folder '{folder}' is incomplete: missing " + "; ".join(missing)
                         + f". It needs ImageReward.pt and {MED_CONFIG_NAME} from huggingface.co/{HUB_REPO} and "
                         f"{TOKENIZER_FOLDER}/{VOCAB_NAME} from huggingface.co/{TOKENIZER_FOLDER}.")
    return checkpoint, config, vocab


def _download(download_root, med_config, tokenizer) -> tuple[Path, Path, Path | None]:
    root = Path(download_root or DEFAULT_DOWNLOAD_ROOT).expanduser()
    wanted = [CHECKPOINT_NAMES[0]] + ([] if med_config is not None else [MED_CONFIG_NAME])
    for name in wanted:
        if (root / name).is_file():
            continue
        try:
            from huggingface_hub import hf_hub_download
            root.mkdir(parents=True, exist_ok=True)
            hf_hub_download(repo_id=HUB_REPO, filename=name, local_dir=str(root))
        except Exception as e:
            raise InputError(f"ImageReward: {name} could not be downloaded from huggingface.co/{HUB_REPO} into "
                             f"'{root}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline, put "
                             f"ImageReward.pt, {MED_CONFIG_NAME} and {TOKENIZER_FOLDER}/{VOCAB_NAME} in a folder and "
                             f"set it as the ImageReward model folder.") from None
    config = Path(med_config).expanduser() if med_config is not None else root / MED_CONFIG_NAME
    if not config.is_file():
        raise InputError(f"ImageReward: {MED_CONFIG_NAME} not found (looked for '{config}').")
    vocab = _explicit_vocab(tokenizer) if tokenizer is not None else _first(_vocab_candidates(root))
    return root / CHECKPOINT_NAMES[0], config, vocab


def _check_med_config(path: Path) -> None:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"ImageReward: '{path}' is not a usable {MED_CONFIG_NAME} ({type(e).__name__}: {e}).") from None
    if not isinstance(config, dict) or "hidden_size" not in config or "vocab_size" not in config:
        raise InputError(f"ImageReward: '{path}' is not ImageReward's {MED_CONFIG_NAME} (a BERT configuration "
                         f"with hidden_size and vocab_size; it comes from huggingface.co/{HUB_REPO}).")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: safetensors, or a pickle through torch.load(weights_only=True) only."""
    where = f"'{path}'"
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path), device="cpu")
        else:
            obj = torch_load_weights(path)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, zipfile and safetensors errors...
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text:
            raise UnsafeFileError(f"{where} is a pickle that needs to run code to load, so it is refused (pickles "
                                  f"can carry malware); ImageReward.pt from huggingface.co/{HUB_REPO} loads safely.") from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise CorruptFileError(f"{where} could not be read as an ImageReward checkpoint: {first}") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"{where} holds a {type(obj).__name__}, not an ImageReward state dict.")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str,
                     med_config: Path | None = None) -> None:
    """Every key of the model present with its shape, and nothing else (the package would not notice)."""
    missing = [k for k in expected if k not in sd and k not in REBUILT_BUFFERS]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(expected)} keys are missing (" + ", ".join(missing[:4])
                     + (", ..." if len(missing) > 4 else "") + ")")
    if unexpected:
        parts.append(f"{len(unexpected)} of its keys are not ImageReward's (" + ", ".join(unexpected[:3])
                     + (", ..." if len(unexpected) > 3 else "") + ")")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} tensors have other shapes (e.g. {k}: {tuple(sd[k].shape)} in the file, "
                     f"{tuple(expected[k])} in the model)")
    hint = f" or the {MED_CONFIG_NAME} beside it ('{med_config}') does not match it" if wrong and med_config else ""
    raise InputError(f"{where} is not an ImageReward checkpoint{hint}: " + "; ".join(parts)
                     + f". Use ImageReward.pt (and {MED_CONFIG_NAME}) from huggingface.co/{HUB_REPO}.")


# ------------------------------------------------------------------------------------ preprocessing
def pad_to_square(image, fill: tuple[int, int, int] = (0, 0, 0)):
    """The image (as RGB) centred on a square of colour `fill`; a square image is returned as it is."""
    from PIL import Image
    image = image.convert("RGB")
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(fill))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def normalisation_colour(transform) -> tuple[int, int, int]:
    """The 8-bit colour that the transform's Normalize maps to zero (its mean)."""
    from torchvision.transforms import Normalize
    for t in getattr(transform, "transforms", ()):
        if isinstance(t, Normalize):
            return tuple(int(round(255 * float(m))) for m in t.mean)
    raise InputError("ImageReward's transform has no normalisation step (an unknown image-reward version?).")


def _as_pil(image):
    from PIL import Image
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                im.load()
                return im.copy()
        except OSError as e:
            raise InputError(f"ImageReward: '{image}' could not be read as an image ({e}).") from None
    try:
        import numpy as np
        if isinstance(image, np.ndarray):
            return Image.fromarray(image)
    except ImportError:  # pragma: no cover - numpy comes with torch
        pass
    raise InputError(f"ImageReward scores PIL images (or image files), not {type(image).__name__}.")


def _shorten(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


# ------------------------------------------------------------------------------------ the scorer
class ImageRewardScorer:
    """ImageReward loaded once (on `device`, eval mode, no gradients); `score` gives one float per image."""

    name = "imagereward"

    def __init__(self, *, model: str | None = None, med_config: str | None = None, tokenizer: str | None = None,
                 device: str = "cpu", sigmoid: bool = False, pad: bool = False,
                 warn: Callable[[str], None] | None = None, download_root: str | None = None):
        self.sigmoid = bool(sigmoid)
        self.pad = bool(pad)
        self.warn = warn
        self._warned: set[str] = set()
        self._prompts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._model = None
        try:
            self.device = torch.device(device or "cpu")
        except (RuntimeError, TypeError) as e:
            raise InputError(f"ImageReward: '{device}' is not a device ({e}).") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"ImageReward: device '{device}' asked for, but CUDA is not available here.")
        t0 = time.perf_counter()
        self.checkpoint, self.med_config, self.vocab = resolve_files(model, med_config, tokenizer, download_root)
        _check_med_config(self.med_config)
        tok = make_tokenizer(self.vocab) if self.vocab is not None else None
        try:
            net = build_model(self.med_config, tok, meta=True)
        except Exception as e:
            if tok is None:  # the package's own tokenizer is a hub download
                raise InputError(f"ImageReward: the bert-base-uncased tokenizer could not be loaded from the hub "
                                 f"({type(e).__name__}). Offline, put its {VOCAB_NAME} in "
                                 f"{TOKENIZER_FOLDER}/ of the ImageReward model folder.") from None
            raise
        self.tokenizer = net.blip.tokenizer
        vocab_size = net.blip.text_encoder.config.vocab_size
        if len(self.tokenizer) > vocab_size:
            raise InputError(f"ImageReward: '{self.med_config}' gives a vocabulary of {vocab_size} tokens but the "
                             f"tokenizer has {len(self.tokenizer)}: they do not belong together.")
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        sd = read_checkpoint(self.checkpoint)
        check_state_dict(sd, expected, f"'{self.checkpoint}'", self.med_config)
        net.load_state_dict(sd, strict=False, assign=True)
        del sd
        for key in REBUILT_BUFFERS:
            owner, _, leaf = key.rpartition(".")
            module = net.get_submodule(owner)
            if getattr(module, leaf).is_meta:
                n = net.blip.text_encoder.config.max_position_embeddings
                setattr(module, leaf, torch.arange(n).expand((1, -1)))
        left = [k for k, v in net.state_dict().items() if v.is_meta]
        if left:  # pragma: no cover - a package version with tensors we do not know about
            raise InputError(f"ImageReward: these tensors were not filled from '{self.checkpoint}': {left[:4]}")
        net.to(device=self.device, dtype=torch.float32)
        net.device = self.device
        net.eval()
        net.requires_grad_(False)
        self._model = net
        self._transform = net.preprocess
        self.pad_colour = normalisation_colour(net.preprocess)
        self.load_seconds = time.perf_counter() - t0

    # -- scoring
    def score(self, images: list, payloads: list[dict], params: dict) -> list[float]:
        if self._model is None:
            raise InputError("The ImageReward scorer was closed.")
        if len(images) != len(payloads):
            raise InputError(f"ImageReward: {len(images)} images but {len(payloads)} payloads.")
        out = []
        with self._lock, torch.inference_mode():
            for image, payload in zip(images, payloads):
                prompt = str((payload or {}).get("prompt") or "")
                ids, mask = self._prompt(prompt)
                pixels = self._pixels(_as_pil(image))
                r = self._reward(ids, mask, pixels)
                out.append(1.0 / (1.0 + math.exp(-r)) if self.sigmoid else r)
        return out

    def _prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._prompts.get(prompt)
        if cached is not None:
            return cached
        n = len(self.tokenizer(prompt)["input_ids"])   # with the start and end tokens, as the package counts
        if n > MAX_TOKENS and prompt not in self._warned:
            self._warned.add(prompt)
            (self.warn or log.warning)(
                f"ImageReward reads only the first {MAX_TOKENS} tokens of a prompt: \"{_shorten(prompt)}\" "
                f"is {n} tokens long (start and end tokens included), so only its first "
                f"{MAX_TOKENS - 2} word pieces count toward the score.")
        t = self.tokenizer(prompt, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        pair = (t.input_ids.to(self.device), t.attention_mask.to(self.device))
        if len(self._prompts) < 1024:
            self._prompts[prompt] = pair
        return pair

    def _pixels(self, image) -> torch.Tensor:
        if self.pad:
            image = pad_to_square(image, self.pad_colour)
        return self._transform(image).unsqueeze(0).to(self.device)

    def _reward(self, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor) -> float:
        net = self._model
        image_embeds = net.blip.visual_encoder(pixels)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = net.blip.text_encoder(ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                       encoder_attention_mask=image_mask, return_dict=True).last_hidden_state
        reward = net.mlp(hidden[:, 0, :].float())
        return float(((reward - net.mean) / net.std).item())

    def close(self) -> None:
        with self._lock:
            cuda = self.device.type == "cuda"
            self._model = None
            self._transform = None
            self._prompts = {}
        if cuda:
            torch.cuda.empty_cache()
