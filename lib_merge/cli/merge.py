"""The model commands: `merge`, `info`, `methods`, `presets`, and the apps: `demo`, `ui`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..core.errors import InputError
from .args import add_dtype


def _parse_param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise InputError(f"--param takes NAME=VALUE, not '{text}'.")
    return name.strip(), value.strip()


def _coerce_literal(value: str):
    try:
        return json.loads(value)
    except (ValueError, RecursionError):   # not JSON (or nested too deeply): the text itself
        return value


class TerminalProgress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.last = 0.0

    def __call__(self, p) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and p.done_bytes < p.total_bytes:
            return
        self.last = now
        width = 30
        filled = int(width * p.fraction)
        rate = p.done_bytes / p.elapsed / 2**20 if p.elapsed > 0 else 0
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {p.fraction * 100:5.1f}% "
                         f"{p.done_bytes / 2**30:.2f}/{p.total_bytes / 2**30:.2f} GiB {rate:7.1f} MiB/s")
        if p.done_bytes >= p.total_bytes:
            sys.stderr.write("\n")
        sys.stderr.flush()


def build_recipe(args):
    from ..core.arch import TEXT_ENCODER, UNET, VAE, detect
    from ..core.files import open_model
    from ..core.weights import parse_blocks
    from ..engine.recipe import ModelRef, Recipe
    from ..methods.spec import get_method

    if args.recipe:
        return _recipe_with_overrides(args)
    for name, default in RECIPE_OVERRIDES.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not args.method:
        raise InputError("Give --method (or --recipe FILE).")
    spec = get_method(args.method)
    if not args.model:
        raise InputError(f"{spec.name} needs models: give --model once per model ({', '.join(spec.inputs)}).")
    params: dict = {}
    for text in args.param or []:
        name, value = _parse_param(text)
        params[name] = _coerce_literal(value)
    if args.alpha is not None:
        params["alpha"] = args.alpha
    if args.beta is not None:
        params["beta"] = args.beta
    components = [UNET, TEXT_ENCODER] + ([VAE] if args.merge_vae else [])
    if args.unet_only:
        components = [UNET] + ([VAE] if args.merge_vae else [])
    base = ModelRef(name=Path(args.base).name, path=args.base) if args.base else None
    recipe = Recipe(method=spec.name, models=[ModelRef(name=Path(m).name, path=m) for m in args.model],
                    base=base, params=params, seed=args.seed, compute_dtype=args.compute_dtype, dtype=args.dtype,
                    components=components, missing_keys=args.missing_keys, nonfinite=args.nonfinite,
                    elemental=args.elemental, adjust=args.adjust)
    if args.blocks or args.blocks_beta:
        # the architecture decides how many block weights there are: read A's header
        with open_model(args.model[0]) as a:
            family = detect({k: i.shape for k, i in a.tensors.items()}, a.name).family
        resolved = spec.resolve_params(params)
        blockwise = spec.blockwise_params
        if args.blocks and not blockwise:
            raise InputError(f"{spec.name} has no parameter that can be set per block.")
        # --blocks sets the method's first per-block parameter (α, or λ for the many-model methods)
        for name, text in ((blockwise[0] if blockwise else None, args.blocks), ("beta", args.blocks_beta)):
            if text:
                spec.param(name)
                recipe.blocks[name] = parse_blocks(text, family, resolved[name])
    if args.mask:
        recipe.mask = ModelRef(name=Path(args.mask).name, path=args.mask)
    if args.weights:
        from ..core.weights import WeightSet
        ws = WeightSet.load(args.weights)
        recipe.layer_weights = {"param": args.weights_param or (spec.blockwise_params or [None])[0],
                                "values": dict(ws)}
    recipe.validate()
    return recipe


# flags that define the merge (refused beside --recipe: the recipe defines it), and those a recipe's value may be
# overridden by (stated in the output), with their defaults without a recipe
RECIPE_DEFINED = ("method", "model", "base", "alpha", "beta", "param", "blocks", "blocks_beta", "mask", "weights",
                  "weights_param", "merge_vae", "unet_only", "elemental", "adjust")
RECIPE_OVERRIDES = {"seed": 0, "compute_dtype": "float32", "dtype": "float16", "missing_keys": "keep_a",
                    "nonfinite": "warn"}


def _recipe_with_overrides(args):
    from ..engine.recipe import recipe_from_file
    given = [f"--{n.replace('_', '-')}" for n in RECIPE_DEFINED if getattr(args, n) not in (None, False, [])]
    if given:
        raise InputError(f"--recipe defines the merge, so {', '.join(given)} cannot be given with it: edit the "
                         f"recipe, or merge without --recipe.")
    recipe = recipe_from_file(args.recipe)
    for name in RECIPE_OVERRIDES:
        value = getattr(args, name)
        if value is not None and value != getattr(recipe, name):
            print(f"--{name.replace('_', '-')} {value} overrides the recipe's {getattr(recipe, name)}")
            setattr(recipe, name, value)
    recipe.validate()
    return recipe


def cmd_merge(args) -> int:
    from ..engine.merge import merge
    from ..engine.sinks import FileSink
    recipe = build_recipe(args)
    out = Path(args.output)
    sink = FileSink(out, overwrite=args.overwrite)
    result = merge(recipe, sink, search_dirs=args.models_dir or [], device=args.device, threads=args.threads,
                   progress=TerminalProgress(), verify_hashes=bool(args.recipe))
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"Merged {recipe.method} ({result.arch.label}) -> {out} in {result.seconds:.1f} s")
    return 0


def cmd_info(args) -> int:
    from ..tools.info import format_info, model_info
    info = model_info(args.file, hashes=not args.no_hash)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def cmd_methods(args) -> int:
    from ..methods import METHODS
    if args.json:
        print(json.dumps([m.describe() for m in METHODS.values()], indent=2))
        return 0
    for m in METHODS.values():
        models = "2 or more" if m.many else ", ".join(m.inputs)
        base = {"required": ", base required", "optional": ", base optional"}.get(m.base, "")
        print(f"{m.name:16s} {m.label}: {m.formula}   models: {models}{base}")
        for p in m.params:
            rng = f" [{p.range[0]}, {p.range[1]}]" if p.range else ""
            bw = " (per block)" if p.blockwise else ""
            kind = '|'.join(p.kind.options) if hasattr(p.kind, 'options') else getattr(p.kind, '__name__', p.kind)
            print(f"    --param {p.name}=<{kind}> default {p.default}{rng}{bw}: {p.help}")
    return 0


def cmd_presets(args) -> int:
    from ..core.weights import PRESETS, format_blocks, preset
    family = args.family
    for name, (desc, _) in PRESETS.items():
        print(f"{name:22s} {desc}\n    {format_blocks(preset(name, family), family)}")
    return 0


def cmd_demo(args) -> int:
    """Make two tiny demo models and merge them (no downloads)."""
    from ..core.weights import preset
    from ..engine.merge import merge
    from ..engine.recipe import ModelRef, Recipe
    from ..engine.sinks import FileSink
    from ..preview.demo import make_demo_models
    from ..tools.info import format_info, model_info

    a, b = make_demo_models(Path(args.dir))
    out = Path(args.dir) / "demo_merged.safetensors"
    recipe = Recipe("weighted_sum", [ModelRef(a.name, str(a)), ModelRef(b.name, str(b))], params={"alpha": 0.5},
                    blocks={"alpha": preset("GRAD_V", "sd1")})
    result = merge(recipe, FileSink(out, overwrite=True), progress=TerminalProgress())
    print(f"Demo: merged {a.name} and {b.name} with weighted_sum, block weights GRAD_V -> {out}"
          f" ({result.seconds:.2f} s)\n")
    print(format_info(model_info(str(out))))
    return 0


def cmd_ui(args) -> int:
    """The standalone Merge app in the browser (gradio is imported only now)."""
    from ..ui.app import run
    return run(args)


def add_merge_commands(sub) -> None:
    """merge, info, methods, presets."""
    m = sub.add_parser("merge", help="merge checkpoints into a .safetensors file")
    m.add_argument("--recipe", help="redo a merge: a merged .safetensors (its metadata), `info --json` output, or a "
                                    "recipe JSON (the tab's recipe box); --seed, --dtype, --compute-dtype, "
                                    "--missing-keys, --nonfinite override its values")
    m.add_argument("--method", help="merge method (see `methods`)")
    m.add_argument("--model", action="append", help="input model, in the method's order (A, B, C...); repeat for many")
    m.add_argument("--base", help="base model θ0 for the methods that use deltas (TIES, DARE, Model Stock...)")
    m.add_argument("--alpha", type=float, help="α (weight of B); per block with --blocks")
    m.add_argument("--beta", type=float, help="β (weight of C) where the method has one")
    m.add_argument("--param", action="append", metavar="NAME=VALUE", help="any method parameter by its spec name")
    m.add_argument("--blocks", help="α (λ for many-model methods) per block: 26 (SD1/SD2) or 20 (SDXL) numbers, "
                                    "NAME=value pairs with *, or a preset")
    m.add_argument("--blocks-beta", help="β per block, same forms as --blocks")
    m.add_argument("--mask", help="a mask file (`mask ...`): only its True elements may change, the rest keep A's values")
    m.add_argument("--weights", help="a per-key weight set (`weights ...`, JSON): sets --weights-param per key; "
                                     "keys it does not list are copied from A")
    m.add_argument("--weights-param", help="the parameter the weight set gives (default: the method's first "
                                           "per-block parameter: alpha, lambda or ratio)")
    m.add_argument("--elemental", metavar="BLOCKS:ELEMENTS:RATIO,...",
                   help="SuperMerger's elemental ratios: e.g. 'OUT04 OUT05:attn2:0.5, NOT OUT04:attn:1' sets α (the "
                        "first per-block parameter) of the keys whose names hold the elements, after the block weights")
    m.add_argument("--adjust", metavar="IN,OUT,OUT2,CONT,BRI,COL1,COL2,COL3",
                   help="SuperMerger's Adjust: up to 8 numbers for detail, contrast, brightness and colour (about ±5)")
    m.add_argument("--seed", type=int, help="seed of the random methods (DARE...; default 0)")
    m.add_argument("--compute-dtype", choices=["float32", "float64"], help="precision of the arithmetic (float32)")
    add_dtype(m, default=None, default_text="float16", what="merged tensors")
    m.add_argument("--merge-vae", action="store_true", help="merge the VAE too (default: keep A's)")
    m.add_argument("--unet-only", action="store_true", help="keep A's text encoder(s)")
    m.add_argument("--missing-keys", choices=["keep_a", "error"], help="a key of A missing in another model: "
                                                                       "keep A's value (keep_a, default) or stop")
    m.add_argument("--nonfinite", choices=["warn", "error"], help="what to do when NaN/Inf appear (warn)")
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    m.add_argument("--threads", type=int, help="worker threads (default: one per CPU core)")
    m.add_argument("--models-dir", action="append", help="folder(s) where a recipe's model names are looked up")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output file (never an input)")
    m.add_argument("-o", "--output", required=True, help="the merged .safetensors to write")
    m.set_defaults(func=cmd_merge)

    i = sub.add_parser("info", help="describe a checkpoint: architecture, components, hashes, metadata")
    i.add_argument("file", help="the checkpoint (.safetensors or .ckpt)")
    i.add_argument("--json", action="store_true", help="machine-readable output (merge --recipe reads it)")
    i.add_argument("--no-hash", action="store_true", help="skip the sha256 (fast on big files)")
    i.set_defaults(func=cmd_info)

    me = sub.add_parser("methods", help="list merge methods and their parameters")
    me.add_argument("--json", action="store_true", help="machine-readable output")
    me.set_defaults(func=cmd_methods)

    pr = sub.add_parser("presets", help="list block-weight presets")
    pr.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"], help="whose blocks the presets are shown for")
    pr.set_defaults(func=cmd_presets)


def add_app_commands(sub) -> None:
    """demo, ui."""
    d = sub.add_parser("demo", help="create two tiny demo checkpoints and merge them (no downloads)")
    d.add_argument("--dir", default="merge-lab-demo", help="folder for the demo files")
    d.set_defaults(func=cmd_demo)

    from ..ui.app import make_parser as ui_parser  # cheap: the app module imports gradio only when it runs
    u = sub.add_parser("ui", parents=[ui_parser(add_help=False)], help="the Merge app in your browser")
    u.set_defaults(func=cmd_ui)
