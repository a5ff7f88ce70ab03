"""Standalone image generation: a merged state dict in checkpoint key names -> diffusers modules -> images.

    state dict (model.diffusion_model.*, first_stage_model.*, cond_stage_model.* / conditioner.embedders.*)
      --derive_spec (configs from the tensors' shapes)--> ModelSpec
      --Generator.load (build modules once per spec, then copy weights in place)--> UNet, VAE, text encoder(s)
      --Generator.generate(GenerationRequest)--> PIL images + WebUI-style infotexts

Nothing is downloaded: every config is derived from the tensors' shapes (rules in configs.py and
docs/GENERATION.md), tokenizers come from tokenizers.py. diffusers and transformers are imported
inside functions only, so importing this module costs nothing.

Live re-merges: `Generator.module_targets()` maps each checkpoint key to the live tensor it is loaded into
(a view where the layouts differ: the VAE's 1x1 convolutions are linear layers in diffusers, OpenCLIP's fused
`in_proj_weight` is the q/k/v projections, which are built as views of one fused tensor, `text_projection`
is a transposed linear weight). `engine.sinks.TensorSink(generator.module_targets())` therefore merges straight
into the modules; `Generator.prepare(shapes)` builds the modules from shapes alone for a first merge.
"""
from __future__ import annotations

import inspect
import json
import random
import threading
import time
from typing import Any, Callable, Iterable, Mapping

import torch

from ..core.errors import CancelledError, InputError, MergeError, UnsupportedModelError
from .configs import VAE, ModelSpec, TextSpec, derive_spec
from .convert import _build_modules, _check_targets, _sdxl_gap, _targets, key_map
from .samplers import make_scheduler

CHUNK_TOKENS = 75   # prompts longer than this are encoded in chunks of 75 tokens, as the WebUI does


# ------------------------------------------------------------------------------------- the generator

def _fmt(v: float) -> str:
    return f"{v:g}"


def infotext(request, seed: int, *, width: int, height: int, model_name: str | None = None,
             model_hash: str | None = None, clip_skip: int = 1, batch_pos: int | None = None,
             extra: Mapping[str, Any] | None = None) -> str:
    """The WebUI's infotext: prompt, 'Negative prompt: …', then 'Steps: …, Sampler: …, …'."""
    params: dict[str, Any] = {"Steps": request.steps, "Sampler": request.sampler, "CFG scale": _fmt(request.cfg_scale),
                              "Seed": seed, "Size": f"{width}x{height}"}
    if model_hash:
        params["Model hash"] = model_hash
    if model_name:
        params["Model"] = model_name
    if clip_skip > 1:
        params["Clip skip"] = clip_skip
    if request.batch_size > 1 and batch_pos is not None:
        params["Batch size"] = request.batch_size
        params["Batch pos"] = batch_pos
    params.update(extra or {})

    def quote(v):   # as the WebUI's infotext quoting
        s = str(v)
        return json.dumps(s, ensure_ascii=False) if ("," in s or "\n" in s or ":" in s) else s
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)



class Generator:
    """Text-to-image with diffusers modules rebuilt from a checkpoint-layout state dict.

    Generator(tokenizer_dir=None, device="cpu", dtype=torch.float32, *, clip_skip=1, prediction_type=None,
              hf_cache=True)
      .load(state, family=None, *, name=None, model_hash=None, vae=None) -> list of warnings
      .sink(name=None, model_hash=None) -> an engine Sink merging straight into the modules
      .prepare(shapes, family=None) -> module_targets() (build from shapes only), then .mark_loaded(name, hash)
      .module_targets() -> {checkpoint key: live tensor}
      .generate(GenerationRequest, progress=None, cancel=None, extra=None) -> GenerationResult

    Modules are rebuilt only when the spec (shapes) changes; otherwise weights are copied in place.
    The VAE always runs in float32 (SDXL's VAE overflows in float16, the WebUI's --no-half-vae).
    """

    def __init__(self, tokenizer_dir: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, *, clip_skip: int = 1, prediction_type: str | None = None,
                 hf_cache: bool = True):
        self.tokenizer_dir = tokenizer_dir
        self.device = torch.device(device)
        self.dtype = dtype
        self.clip_skip = max(1, int(clip_skip))
        if prediction_type not in (None, "epsilon", "v_prediction"):
            raise InputError("prediction_type is None (from the model: `v_pred` key or not), 'epsilon' (SD1, "
                             "SD2-base, SDXL) or 'v_prediction' (SD2 768-v models, which their weights do not reveal).")
        self.prediction_type = prediction_type
        self.hf_cache = hf_cache
        self.spec: ModelSpec | None = None
        self.modules: dict[str, torch.nn.Module] = {}
        self.tokenizers: dict[str, Any] = {}
        self.tokenizer_sources: dict[str, str] = {}
        self.model_name: str | None = None
        self.model_hash: str | None = None
        self.ready = False
        self._targets: dict[str, torch.Tensor] = {}
        self._signature: str | None = None
        self._gaps: list[str] = []
        self._lock = threading.RLock()
        self.last_timings: dict[str, float] = {}

    # ---- building and loading
    def _ensure(self, shapes: Mapping[str, tuple], family: str | None) -> tuple[bool, list[str]]:
        spec = derive_spec(shapes, family)
        sig = spec.signature()
        rebuilt = sig != self._signature
        if rebuilt:
            self._load_tokenizers(spec)   # fail early, before any big allocation
            self.modules, self._targets, self.ready, self._signature = {}, {}, False, None
            modules = _build_modules(spec, self.device, self.dtype)
            kmap = key_map(shapes.keys(), spec)
            targets = _targets(modules, kmap, shapes)
            gaps = _check_targets(modules, kmap, targets, shapes, _sdxl_gap(spec))
            self.modules, self._targets, self._signature = modules, targets, sig
            self._gaps = gaps
        self.spec = spec   # same shapes, but maybe another prediction type (a `v_pred` key)
        return rebuilt, list(self._gaps)

    def _load_tokenizers(self, spec: ModelSpec) -> None:
        from .tokenizers import load_tokenizer
        toks, srcs = {}, {}
        for t in spec.texts:
            tok, src = load_tokenizer(t.tokenizer, self.tokenizer_dir, hf_cache=self.hf_cache,
                                      subfolder_hint="tokenizer_2" if t.name == "text_encoder_2" else "tokenizer")
            if tok.vocab_size != t.config["vocab_size"] and len(tok) != t.config["vocab_size"]:
                raise MergeError(f"The tokenizer ({src}) has {len(tok)} tokens, the text encoder {t.config['vocab_size']}.")
            toks[t.name], srcs[t.name] = tok, src
        self.tokenizers, self.tokenizer_sources = toks, srcs

    def prepare(self, shapes: Mapping[str, Iterable[int]], family: str | None = None) -> dict[str, torch.Tensor]:
        """Build (or keep) modules for these shapes and return module_targets(); the caller writes every key
        (engine.merge.merge into a TensorSink of them), then calls mark_loaded(). Weights nobody writes keep their
        values (zeros after a rebuild); the generator refuses to generate until mark_loaded()."""
        with self._lock:
            shapes = {k: tuple(v) for k, v in shapes.items()}
            self._ensure(shapes, family)
            self.ready = False
            return dict(self._targets)

    def mark_loaded(self, name: str | None = None, model_hash: str | None = None) -> None:
        """The modules hold a complete model now; `name` / `model_hash` label the infotext."""
        self.model_name, self.model_hash, self.ready = name, model_hash, True

    def sink(self, name: str | None = None, model_hash: str | None = None):
        """An engine Sink that merges straight into this generator's modules (no state dict in between).

        On open it builds the modules for the merge's shapes (or keeps them when the shapes are unchanged)
        and then works as engine.sinks.TensorSink over module_targets(); on close the model is ready to generate.
        A failed or interrupted merge leaves the generator not ready (generate() refuses until the next
        load). Keys generation does not use are skipped (`.skipped`)."""
        from ..engine.sinks import TensorSink
        gen = self

        class GeneratorSink(TensorSink):
            def __init__(self):
                # tied to these modules: a live re-merge may write into them only while they are the same
                super().__init__({}, on_abort=lambda: setattr(gen, "ready", False), owner=(id(gen), id(gen.modules)))

            def open(self, entries, metadata_draft=None):
                self.targets = gen.prepare({k: shape for k, _, shape in entries})
                super().open(entries, metadata_draft)

            def close(self, metadata):
                out = super().close(metadata)
                gen.mark_loaded(name, model_hash)
                return out

        return GeneratorSink()

    def load(self, state: Mapping[str, torch.Tensor], family: str | None = None, *, name: str | None = None,
             model_hash: str | None = None, vae: Mapping[str, torch.Tensor] | None = None) -> list[str]:
        """Load a checkpoint-layout state dict (a merge's DictSink state, a loaded file). Returns warnings.

        `vae`: a separate VAE's state dict (keys 'encoder.…' / 'decoder.…', or with 'first_stage_model.')
        replaces the checkpoint's. `name` / `model_hash` label the infotext ("Model: …, Model hash: …").
        """
        t0 = time.monotonic()
        with self._lock:
            state = dict(state)
            if vae is not None:
                state = {k: v for k, v in state.items() if not k.startswith(VAE)}
                for k, v in vae.items():
                    if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
                        state[VAE + k] = v
                    elif k.startswith(VAE):
                        state[k] = v
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            rebuilt, gaps = self._ensure(shapes, family)
            self.ready = False
            with torch.no_grad():
                for key, t in self._targets.items():
                    t.copy_(state[key])
            self.mark_loaded(name, model_hash)
            self.last_timings = {"load_s": time.monotonic() - t0, "rebuilt": float(rebuilt)}
            warnings = []
            if gaps:
                warnings.append(f"{len(gaps)} unused tensor(s) the checkpoint lacks were left at zero "
                                f"(e.g. {gaps[0]}).")
            return warnings

    def module_targets(self) -> dict[str, torch.Tensor]:
        """{checkpoint key: the live tensor it is loaded into}, shaped as in the checkpoint.

        Writing into these tensors changes the model at once (engine.sinks.TensorSink). Keys generation does not
        use (position_ids, logit_scale, SD2's unused last text layer) are absent."""
        with self._lock:
            return dict(self._targets)

    def unload(self) -> None:
        with self._lock:
            self.modules, self._targets, self._signature, self.spec, self.ready = {}, {}, None, None, False

    # ---- diffusers pipeline (for people who want diffusers' own loop)
    def pipeline(self, sampler: str = "Euler a"):
        """A StableDiffusionPipeline / StableDiffusionXLPipeline sharing these modules (no safety checker).
        Inpainting models are not offered here. Note: clip_skip is not applied by it."""
        self._check_ready()
        if self.spec.variant:
            raise UnsupportedModelError("pipeline() makes text-to-image pipelines; this is an inpainting model.")
        m, sch = self.modules, self._scheduler(sampler)
        if self.spec.family == "sdxl":
            from diffusers import StableDiffusionXLPipeline
            return StableDiffusionXLPipeline(vae=m["vae"], text_encoder=m["text_encoder"],
                                             text_encoder_2=m["text_encoder_2"], tokenizer=self.tokenizers["text_encoder"],
                                             tokenizer_2=self.tokenizers["text_encoder_2"], unet=m["unet"],
                                             scheduler=sch, force_zeros_for_empty_prompt=True, add_watermarker=False)
        from diffusers import StableDiffusionPipeline
        return StableDiffusionPipeline(vae=m["vae"], text_encoder=m["text_encoder"], tokenizer=self.tokenizers["text_encoder"],
                                       unet=m["unet"], scheduler=sch, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def _scheduler(self, sampler: str):
        return make_scheduler(sampler, self.prediction_type or self.spec.prediction_type, self.spec.zero_snr)

    # ---- prompts
    def _check_ready(self):
        if not self.modules or not self.ready:
            raise MergeError("No model is loaded for generation: merge into memory (or load a model) first.")

    def _chunks(self, tok, text: str) -> list[list[int]]:
        ids = tok(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        pieces = [ids[i:i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)] or [[]]
        return [[bos] + p + [eos] + [pad] * (CHUNK_TOKENS - len(p)) for p in pieces]

    def _encode_one(self, t: TextSpec, chunks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        model = self.modules[t.name]
        ids = torch.tensor(chunks, dtype=torch.long, device=self.device)
        out = model(ids, output_hidden_states=True)
        if self.spec.family == "sdxl":
            hidden = out.hidden_states[-2]                      # penultimate layer, no final norm
            pooled = out.text_embeds[:1] if t.with_projection else None   # first chunk's, as the WebUI
        elif self.spec.family == "sd1" and self.clip_skip > 1:
            hidden = model.text_model.final_layer_norm(out.hidden_states[-self.clip_skip])
            pooled = None
        else:
            hidden, pooled = out.last_hidden_state, None
        return hidden.reshape(1, -1, hidden.shape[-1]), pooled  # chunks side by side: (1, 77*n, width)

    def _encode(self, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
        per_enc_pos, per_enc_neg, pooled = [], [], [None, None]
        for t in self.spec.texts:
            tok = self.tokenizers[t.name]
            pc, nc = self._chunks(tok, prompt), self._chunks(tok, negative)
            empty = self._chunks(tok, "")[0]
            n = max(len(pc), len(nc))
            pc, nc = pc + [empty] * (n - len(pc)), nc + [empty] * (n - len(nc))
            hp, pp = self._encode_one(t, pc)
            hn, pn = self._encode_one(t, nc)
            per_enc_pos.append(hp)
            per_enc_neg.append(hn)
            if pp is not None:
                pooled = [pp, pn]
        pos, neg = torch.cat(per_enc_pos, -1), torch.cat(per_enc_neg, -1)
        if self.spec.family == "sdxl" and negative == "":
            # an empty negative prompt is zeros for SDXL (the WebUI and diffusers both do this)
            neg = torch.zeros_like(neg)
            pooled[1] = torch.zeros_like(pooled[1])
        return pos, neg, pooled[0], pooled[1]

    # ---- sampling
    def generate(self, request, progress: Callable[[float, str], None] | None = None,
                 cancel: Callable[[], bool] | None = None, extra: Mapping[str, Any] | None = None):
        """Text-to-image for a host.GenerationRequest -> host.GenerationResult (PIL images, infotexts).

        Image i of the batch uses a CPU torch.Generator seeded with seed + i (seed -1: a random seed), so an
        image depends only on its seed, the model and the settings. `progress(fraction, text)` is called per
        step; `cancel()` returning True stops with CancelledError. `extra` adds infotext parameters."""
        from ..core.generation import GenerationResult
        with self._lock, torch.no_grad():
            self._check_ready()
            t0 = time.monotonic()
            w, h, steps, n = int(request.width), int(request.height), int(request.steps), int(request.batch_size)
            if w % 8 or h % 8 or w < 8 or h < 8:
                raise InputError(f"Width and height must be multiples of 8 (got {w}x{h}).")
            if steps < 1 or n < 1:
                raise InputError("Steps and batch size must be at least 1.")
            seed = int(request.seed)
            if seed < 0:
                seed = random.randrange(4294967294)
            sched = self._scheduler(request.sampler)
            unet, spec = self.modules["unet"], self.spec
            cfg = float(request.cfg_scale)
            use_cfg = cfg != 1.0

            pos, neg, pooled_pos, pooled_neg = self._encode(request.prompt, request.negative_prompt)
            ctx = torch.cat([neg, pos]) if use_cfg else pos
            ctx = ctx.to(self.dtype).repeat_interleave(n, 0)
            added = None
            if spec.unet.get("addition_embed_type") == "text_time":
                time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)
                pooled = torch.cat([pooled_neg, pooled_pos]) if use_cfg else pooled_pos
                added = {"text_embeds": pooled.to(self.dtype).repeat_interleave(n, 0),
                         "time_ids": time_ids.repeat(ctx.shape[0], 1)}
            t_enc = time.monotonic()

            from diffusers.utils.torch_utils import randn_tensor
            gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(n)]
            latent_ch = spec.vae["latent_channels"]
            shape = (n, latent_ch, h // 8, w // 8)
            sched.set_timesteps(steps, device=self.device)
            latents = randn_tensor(shape, generator=gens, device=self.device, dtype=torch.float32)
            latents = latents * sched.init_noise_sigma
            extra_cond = self._inpaint_conditioning(n, h, w) if spec.unet["in_channels"] > latent_ch else None
            step_kwargs = {}
            step_params = inspect.signature(sched.step).parameters
            if "generator" in step_params:
                step_kwargs["generator"] = gens
            if "eta" in step_params:
                step_kwargs["eta"] = 0.0
            timesteps = sched.timesteps
            for i, t in enumerate(timesteps):
                if cancel is not None and cancel():
                    raise CancelledError("Generation interrupted.")
                x = torch.cat([latents] * 2) if use_cfg else latents
                x = sched.scale_model_input(x, t)
                if extra_cond is not None:
                    x = torch.cat([x, torch.cat([extra_cond] * (2 if use_cfg else 1))], 1)
                eps = unet(x.to(self.dtype), t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample.float()
                if use_cfg:
                    e_neg, e_pos = eps.chunk(2)
                    eps = e_neg + cfg * (e_pos - e_neg)
                latents = sched.step(eps, t, latents, **step_kwargs).prev_sample
                if progress is not None:
                    progress((i + 1) / len(timesteps), f"Step {i + 1}/{len(timesteps)}")
            t_unet = time.monotonic()
            images = self._decode(latents)
            t_vae = time.monotonic()
            infos = [infotext(request, seed + i, width=w, height=h, model_name=self.model_name,
                              model_hash=self.model_hash, clip_skip=self.clip_skip if spec.family == "sd1" else 1,
                              batch_pos=i, extra=extra) for i in range(n)]
            self.last_timings = {"encode_s": t_enc - t0, "denoise_s": t_unet - t_enc, "decode_s": t_vae - t_unet,
                                 "total_s": t_vae - t0}
            return GenerationResult(images=images, infotexts=infos)

    def _inpaint_conditioning(self, n: int, h: int, w: int) -> torch.Tensor:
        """Text-to-image with an inpainting UNet, as the WebUI does: the whole image masked (mask 1) and the
        masked image's latents those of a mid-grey image (the VAE's mean, no sampling)."""
        vae = self.modules["vae"]
        grey = torch.zeros(1, vae.config.in_channels, h, w, device=self.device)   # 0.5 grey in [-1, 1]
        lat = vae.encode(grey).latent_dist.mode() * vae.config.scaling_factor
        mask = torch.ones(1, 1, h // 8, w // 8, device=self.device)
        extra = self.spec.unet["in_channels"] - self.spec.vae["latent_channels"]
        cond = torch.cat([mask, lat], 1)
        if cond.shape[1] != extra:
            raise UnsupportedModelError(f"The UNet takes {extra} extra input channels; only inpainting models "
                                        f"(1 mask + {lat.shape[1]} image channels) are supported.")
        return cond.repeat(n, 1, 1, 1)

    def _decode(self, latents: torch.Tensor) -> list:
        from PIL import Image
        vae = self.modules["vae"]
        images = []
        for i in range(latents.shape[0]):   # one at a time: the decoder is the memory peak
            x = vae.decode(latents[i:i + 1].float() / vae.config.scaling_factor).sample
            x = (x / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
            images.append(Image.fromarray((x * 255).round().astype("uint8")))
        return images
