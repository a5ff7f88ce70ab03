"""CLI subcommands for masks, weight sets, normalize, noise and reports.

`add_tool_commands(subparsers)` adds `mask`, `weights`, `normalize`, `noise` and `report` to the main
CLI's argparse subparsers; each sets `func(args) -> exit code` and raises MergeError subclasses for user
errors (the main CLI prints "error: ..." and exits 2). Outputs are never written over an input, nor over an existing file without --overwrite.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import InputError
from ..core.files import check_output_path
from .args import add_dtype



# ------------------------------------------------------------------------------------ helpers

def _check_out(path: str, suffix: str, inputs: list, overwrite: bool) -> Path:
    return check_output_path(Path(path), [Path(i) for i in inputs], overwrite, suffix)


def _notes(notes: list[str], limit: int = 10) -> None:
    for n in notes[:limit]:
        print(f"note: {n}", file=sys.stderr)
    if len(notes) > limit:
        print(f"note: ... and {len(notes) - limit} more like these.", file=sys.stderr)


def _family(model) -> str:
    from ..core.arch import detect
    return detect({k: i.shape for k, i in model.tensors.items()}, model.name).family


def _dtype(name: str | None):
    from ..core.files import dtype_from_name
    return dtype_from_name(name) if name else None


def _mask_summary(mask) -> str:
    true = sum(mask.true_count(k) for k in mask.keys())
    total = sum(mask.numel(k) for k in mask.keys())
    share = f"{100.0 * true / total:.2f}%" if total else "-"
    return f"{len(mask)} keys, {share} of {total:,} elements true"


def _save_mask(mask, output: str, inputs: list, overwrite: bool) -> None:
    out = _check_out(output, ".safetensors", inputs, overwrite)
    mask.save(out)
    print(f"Wrote mask {out}: {_mask_summary(mask)}")


def _save_weights(ws, output: str, inputs: list, overwrite: bool) -> None:
    out = _check_out(output, ".json", inputs, overwrite)
    ws.save(out)
    print(f"Wrote weight set {out}: {len(ws)} keys")


def _draw_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probability", type=float, default=0.5, help="random: share of True (default 0.5)")
    p.add_argument("--mean", type=float, default=0.0, help="gaussian: mean of the draw (default 0)")
    p.add_argument("--std", type=float, default=1.0, help="gaussian: standard deviation (default 1)")
    p.add_argument("--threshold", type=float, default=0.0, help="gaussian: True where the draw > threshold (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0: same seed, same mask)")


def _out_args(p: argparse.ArgumentParser, suffix: str, many: bool = False) -> None:
    if many:
        p.add_argument("-o", "--output", action="append", required=True, help=f"output {suffix} file(s)")
    else:
        p.add_argument("-o", "--output", required=True, help=f"output {suffix} file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")


# ------------------------------------------------------------------------------------ mask

def cmd_mask_simple(args) -> int:
    from ..core.files import open_model
    from ..core.masks import simple
    with open_model(args.model) as m:
        mask = simple(m, args.mode, probability=args.probability, mean=args.mean, std=args.std,
                      threshold=args.threshold, seed=args.seed, family=_family(m))
    _save_mask(mask, args.output, [args.model], args.overwrite)
    return 0


def cmd_mask_magnitude(args) -> int:
    from ..core.files import open_model
    from ..core.masks import magnitude
    with open_model(args.model) as m, open_model(args.base) as base:
        mask = magnitude(m, base, select=args.select, threshold=args.threshold,
                         threshold_type=args.threshold_type, layers=args.layers, family=_family(m))
    _notes(mask.notes)
    _save_mask(mask, args.output, [args.model, args.base], args.overwrite)
    return 0


def quad_outputs(outputs: list[str]) -> list[str]:
    """One name OUT.safetensors -> OUT_0 .. OUT_3.safetensors; four names are used as given."""
    if len(outputs) == 4:
        return outputs
    if len(outputs) != 1:
        raise InputError(f"quad writes 4 masks: give one -o (OUT_0..OUT_3 are made from it) or four, not {len(outputs)}.")
    p = Path(outputs[0])
    return [str(p.with_name(f"{p.stem}_{i}{p.suffix}")) for i in range(4)]


def cmd_mask_quad(args) -> int:
    from ..core.files import open_model
    from ..core.masks import quad
    outs = quad_outputs(args.output)
    checked = [_check_out(o, ".safetensors", [args.model], args.overwrite) for o in outs]
    with open_model(args.model) as m:
        masks = quad(m, seed=args.seed, family=_family(m))
    for mask, out in zip(masks, checked):
        mask.save(out)
        print(f"Wrote mask {out}: {_mask_summary(mask)}")
    return 0


def cmd_mask_op(args) -> int:
    from ..core.masks import Mask, combine
    mask = combine(Mask.load(args.mask_a), Mask.load(args.mask_b), args.op)
    _save_mask(mask, args.output, [args.mask_a, args.mask_b], args.overwrite)
    return 0


def cmd_mask_edit(args) -> int:
    from ..core.masks import Mask, edit
    mask = edit(Mask.load(args.mask), args.layers, args.op, probability=args.probability, mean=args.mean,
                std=args.std, threshold=args.threshold, seed=args.seed)
    _save_mask(mask, args.output, [args.mask], args.overwrite)
    return 0


def _add_mask(sub) -> None:
    from ..core.masks import SET_OPS, SIMPLE_MODES
    p = sub.add_parser("mask", help="make parameter masks (which elements a merge may change)")
    ms = p.add_subparsers(dest="mask_command", required=True)

    s = ms.add_parser("simple", help="random, gaussian or constant mask for every key of a model")
    s.add_argument("--model", required=True, help="model whose keys and shapes the mask covers")
    s.add_argument("--mode", choices=SIMPLE_MODES, default="random",
                   help="random: True with --probability; gaussian: True where N(mean, std) > --threshold; true/false: all")
    _draw_args(s)
    _out_args(s, ".safetensors")
    s.set_defaults(func=cmd_mask_simple)

    g = ms.add_parser("magnitude", help="mask from |model − base| against a quantile")
    g.add_argument("--model", required=True, help="the fine-tuned model whose distance from --base is measured")
    g.add_argument("--base", required=True, help="the base the model was trained from (e.g. SD1.5)")
    g.add_argument("--select", choices=("above", "below"), default="below",
                   help="below: elements under the quantile may change; above: those at or over it")
    g.add_argument("--threshold", type=float, default=0.5, help="quantile between 0 and 1 (default 0.5)")
    g.add_argument("--threshold-type", choices=("median", "quantile"), default="median",
                   help="how chunk quantiles combine on tensors over 2^24 elements")
    g.add_argument("--layers", help="only keys matching these patterns (comma separated, * wildcard)")
    _out_args(g, ".safetensors")
    g.set_defaults(func=cmd_mask_magnitude)

    q = ms.add_parser("quad", help="4 disjoint masks that together cover every element")
    q.add_argument("--model", required=True, help="model whose keys and shapes the masks cover")
    q.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0: same seed, same masks)")
    _out_args(q, ".safetensors", many=True)
    q.set_defaults(func=cmd_mask_quad)

    o = ms.add_parser("op", help="union, intersection, difference or xor of two masks")
    o.add_argument("op", choices=SET_OPS, help="the set operation")
    o.add_argument("mask_a", help="the first mask file")
    o.add_argument("mask_b", help="the second mask file (same keys and shapes)")
    _out_args(o, ".safetensors")
    o.set_defaults(func=cmd_mask_op)

    e = ms.add_parser("edit", help="redraw the masks of the keys matching patterns")
    e.add_argument("mask", help="the mask file to edit (a new file is written)")
    e.add_argument("--layers", required=True, help="key patterns, comma separated, * wildcard")
    e.add_argument("--op", choices=SIMPLE_MODES, default="true", help="what the matching keys become (default true)")
    _draw_args(e)
    _out_args(e, ".safetensors")
    e.set_defaults(func=cmd_mask_edit)


# ------------------------------------------------------------------------------------ weights

# flag of each part; UNet groups are named after their key prefixes (--output is the output file)
PART_FLAGS = {"time": "--time", "label": "--label", "input": "--input-blocks", "middle": "--middle-block",
              "output": "--output-blocks", "out": "--out-block",
              "norm": "--norm", "attn": "--attn", "ff": "--ff",
              "exterior": "--exterior", "interior": "--interior", "core": "--core"}


def _parts(args, names: tuple[str, ...]) -> dict[str, float]:
    values = {n: getattr(args, f"part_{n}") for n in names if getattr(args, f"part_{n}") is not None}
    if not values and args.te is None:
        raise InputError(f"Give at least one value: {', '.join(PART_FLAGS[n] for n in names)} or --te.")
    return values


def cmd_weights_build(args) -> int:
    from ..core import weights as W
    from ..core.files import open_model
    with open_model(args.model) as m:
        family = _family(m)
        if args.weights_command == "blocks":
            ws = W.from_blocks(m, family, args.blocks, args.default)
        elif args.weights_command == "groups":
            ws = W.from_groups(m, family, _parts(args, W.GROUPS), args.te)
        elif args.weights_command == "attention":
            ws = W.from_attention(m, family, _parts(args, W.ATTENTION_PARTS), args.te)
        else:
            ws = W.from_shell(m, family, _parts(args, W.SHELL_PARTS), args.te)
    _save_weights(ws, args.output, [args.model], args.overwrite)
    return 0


def cmd_weights_edit(args) -> int:
    from ..core.weights import WeightSet, edit
    ws = edit(WeightSet.load(args.weights), args.layers, args.op, args.value)
    _save_weights(ws, args.output, [args.weights], args.overwrite)
    return 0


def cmd_weights_op(args) -> int:
    from ..core.weights import WeightSet, combine
    ws = combine(WeightSet.load(args.weights_a), WeightSet.load(args.weights_b), args.op, args.join)
    _save_weights(ws, args.output, [args.weights_a, args.weights_b], args.overwrite)
    return 0


def _add_weights(sub) -> None:
    from ..core.weights import ATTENTION_PARTS, GROUPS, SHELL_PARTS, WEIGHT_COMBINE_OPS, WEIGHT_EDIT_OPS
    p = sub.add_parser("weights", help="make per-key weight sets (layer gradients) for α and other block parameters")
    ws = p.add_subparsers(dest="weights_command", required=True)

    b = ws.add_parser("blocks", help="one value per MBW block (26 SD1/SD2, 20 SDXL)")
    b.add_argument("--model", required=True, help="model whose keys (and architecture) the set covers")
    b.add_argument("--blocks", required=True, help="numbers in block order, NAME=value pairs or a preset")
    b.add_argument("--default", type=float, default=0.0, help="value of blocks that NAME=value pairs leave out")
    _out_args(b, ".json")
    b.set_defaults(func=cmd_weights_build)

    for name, parts, help_ in (("groups", GROUPS, "one value per UNet group (time, label, input, middle, output, out)"),
                               ("attention", ATTENTION_PARTS, "one value per attention part (norm, attn, ff)"),
                               ("shell", SHELL_PARTS, "onion layers of the UNet (exterior, interior, core)")):
        c = ws.add_parser(name, help=help_)
        c.add_argument("--model", required=True, help="model whose keys (and architecture) the set covers")
        for part in parts:
            c.add_argument(PART_FLAGS[part], dest=f"part_{part}", type=float, metavar="V",
                           help=f"value of the {part} keys (left out when not given)")
        # --base is a model on every other command: here the text encoder's value is --te (--base: the old name)
        c.add_argument("--te", "--base", dest="te", type=float, metavar="V",
                       help="value of the text-encoder keys (left out when not given; --base is its old name)")
        _out_args(c, ".json")
        c.set_defaults(func=cmd_weights_build)

    e = ws.add_parser("edit", help="change the values of the keys matching patterns")
    e.add_argument("weights", help="the weight set (.json) to edit (a new file is written)")
    e.add_argument("--layers", required=True, help="key patterns, comma separated, * wildcard")
    e.add_argument("--op", choices=WEIGHT_EDIT_OPS, default="set", help="how --value changes the matching keys (set)")
    e.add_argument("--value", type=float, required=True, help="the number the operation uses")
    _out_args(e, ".json")
    e.set_defaults(func=cmd_weights_edit)

    o = ws.add_parser("op", help="combine two weight sets key by key")
    o.add_argument("weights_a", help="the first weight set (.json)")
    o.add_argument("weights_b", help="the second weight set (.json)")
    o.add_argument("--op", choices=WEIGHT_COMBINE_OPS, default="mean", help="how the two values of a key combine (mean)")
    o.add_argument("--join", choices=("inner", "outer"), default="inner",
                   help="inner: keys in both; outer: all keys, a lone value copied")
    _out_args(o, ".json")
    o.set_defaults(func=cmd_weights_op)


# ------------------------------------------------------------------------------------ normalize / noise

def cmd_normalize(args) -> int:
    from ..tools.transform import normalize
    if not args.model or len(args.model) != 2:
        raise InputError("normalize takes two models: --model A --model B (A is scaled toward B).")
    a, b = args.model
    _check_out(args.output, ".safetensors", [a, b], args.overwrite)
    result = normalize(a, b, args.output, mode=args.mode, magnify=args.magnify, dtype=_dtype(args.dtype),
                       overwrite=args.overwrite)
    _notes(result.notes)
    print(f"Wrote {result.path}: {len(result.changed)} tensors scaled ({args.mode})")
    return 0


def cmd_noise(args) -> int:
    from ..core.masks import Mask
    from ..tools.transform import inject_noise
    _check_out(args.output, ".safetensors", [args.model], args.overwrite)
    mask = Mask.load(args.mask) if args.mask else None
    result = inject_noise(args.model, args.output, kind=args.kind, ratio=args.ratio, mean=args.mean, std=args.std,
                          layers=args.layers, mask=mask, seed=args.seed, dtype=_dtype(args.dtype),
                          overwrite=args.overwrite)
    print(f"Wrote {result.path}: noise added to {len(result.changed)} tensors")
    return 0


def _add_normalize_and_noise(sub) -> None:
    from ..tools.transform import NOISE_KINDS, NORMALIZE_MODES
    n = sub.add_parser("normalize", help="scale model A's parameter norms toward model B's")
    n.add_argument("--model", action="append", help="--model A --model B")
    n.add_argument("--mode", choices=NORMALIZE_MODES, default="attn_only", help="which tensors are scaled (attn_only)")
    n.add_argument("--magnify", action="store_true", help="use ‖A‖/‖B‖ instead of ‖B‖/‖A‖")
    add_dtype(n, default=None, default_text="model A's")
    _out_args(n, ".safetensors")
    n.set_defaults(func=cmd_normalize)

    z = sub.add_parser("noise", help="add seeded noise to chosen layers of a model")
    z.add_argument("--model", required=True, help="the model to add noise to (a new file is written)")
    z.add_argument("--kind", choices=NOISE_KINDS, default="gaussian", help="the noise's distribution (gaussian)")
    z.add_argument("--ratio", type=float, default=0.98, help="share of the original: result = A + (1 − ratio)·noise")
    z.add_argument("--mean", type=float, default=0.05, help="gaussian: N(mean, std) − mean (mean cancels)")
    z.add_argument("--std", type=float, default=0.01, help="gaussian: standard deviation")
    z.add_argument("--layers", help="key patterns, comma separated, * wildcard (e.g. '*.to_v*')")
    z.add_argument("--mask", help="a mask file: noise only where it is True")
    z.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0: same seed, same file)")
    add_dtype(z, default=None, default_text="the model's")
    _out_args(z, ".safetensors")
    z.set_defaults(func=cmd_noise)


# ------------------------------------------------------------------------------------ reports

def _png(args, inputs: list) -> Path | None:
    return _check_out(args.png, ".png", inputs, args.overwrite) if args.png else None


def cmd_report_mask(args) -> int:
    from ..core.files import open_model
    from ..core.masks import Mask
    from ..tools.report import mask_report, mask_report_png
    png = _png(args, [args.file])
    mask = Mask.load(args.file)
    family = args.family
    if args.model:
        with open_model(args.model) as m:
            family = _family(m)
    print(mask_report(mask, family, details=args.details))
    if png:
        mask_report_png(mask, png, family)
        print(f"Wrote {png}")
    return 0


def cmd_report_weights(args) -> int:
    from ..core.weights import WeightSet
    from ..tools.report import weights_report, weights_report_png
    png = _png(args, [args.file])
    ws = WeightSet.load(args.file)
    print(weights_report(ws, args.family, details=not args.summary))
    if png:
        weights_report_png(ws, png, args.family)
        print(f"Wrote {png}")
    return 0


def cmd_report_layer(args) -> int:
    from ..tools.report import layer_report
    png = _png(args, [args.model])
    print(layer_report(args.model, args.key, png, args.scaling))
    if png:
        print(f"Wrote {png}")
    return 0


def _add_report(sub) -> None:
    from ..tools.report import LAYER_SCALINGS
    p = sub.add_parser("report", help="describe a mask, a weight set or one model layer (text, optional PNG)")
    rs = p.add_subparsers(dest="report_command", required=True)

    m = rs.add_parser("mask", help="share of True per block (and per key)")
    m.add_argument("file", help="the mask file")
    m.add_argument("--model", help="a model of the mask's architecture (default: the mask's own record)")
    m.add_argument("--family", choices=("sd1", "sd2", "sdxl"), help="the architecture, when the file does not record it")
    m.add_argument("--details", action="store_true", help="also one line per key")
    m.set_defaults(func=cmd_report_mask)

    w = rs.add_parser("weights", help="values per block and per key")
    w.add_argument("file", help="the weight set (.json)")
    w.add_argument("--family", choices=("sd1", "sd2", "sdxl"), help="the architecture, when the file does not record it")
    w.add_argument("--summary", action="store_true", help="per block only, no line per key")
    w.set_defaults(func=cmd_report_weights)

    lr = rs.add_parser("layer", help="statistics and a heat map of one tensor")
    lr.add_argument("model", help="the checkpoint")
    lr.add_argument("--key", required=True, help="the tensor's key (see `info`)")
    lr.add_argument("--scaling", choices=LAYER_SCALINGS, default="none", help="how the heat map scales the values (none)")
    lr.set_defaults(func=cmd_report_layer)

    for r in (m, w, lr):
        r.add_argument("--png", help="also draw a .png")
        r.add_argument("--overwrite", action="store_true", help="replace an existing .png")


# ------------------------------------------------------------------------------------ entry points

def add_tool_commands(subparsers) -> None:
    """Add mask, weights, normalize, noise and report to an argparse subparsers object."""
    _add_mask(subparsers)
    _add_weights(subparsers)
    _add_normalize_and_noise(subparsers)
    _add_report(subparsers)
