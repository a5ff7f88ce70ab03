"""`python -m lib_merge lora ...`: LoRA subcommands: `info`, `merge`, `bake`, `report` (and `extract`, `resize`,
`merge-svd` from lora_svd.py).

`add_lora_commands(subparsers)` adds `lora` to the main CLI's argparse subparsers; user errors are
MergeError subclasses (the main CLI prints "error: ..." and exits 2).
"""
from __future__ import annotations

import json


def cmd_lora_info(args) -> int:
    from ..lora.info import describe, format_text
    info = describe(args.file, tags=args.tags)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        print(format_text(info))
    return 0


def cmd_lora_merge(args) -> int:
    if args.rank is not None:   # the SVD merge: full deltas, combined, factorised to the rank
        from .lora_svd import cmd_merge_svd
        return cmd_merge_svd(args)
    if args.conv_rank is not None:
        from ..core.errors import InputError
        raise InputError("--conv-rank needs --rank (it is the SVD merge's rank of 3x3 convs).")
    from ..lora.merge import merge, parse_lora_arg
    path = merge([parse_lora_arg(x) for x in args.lora], args.output, mode=args.mode, density=args.density,
                 seed=args.seed, majority=args.election, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def cmd_lora_bake(args) -> int:
    from ..lora.bake import bake
    from ..lora.merge import parse_lora_arg
    res = bake(args.model, [parse_lora_arg(x) for x in args.lora], args.output, lbw=args.lbw,
               dtype=None if args.dtype == "keep" else args.dtype, overwrite=args.overwrite)
    for w in res.warnings:
        print(f"warning: {w}")
    print(f"wrote {res.path} ({len(res.touched)} keys changed)")
    return 0


_LORA_ARG = ("FILE[:WEIGHT] or FILE:W_UNET:W_TE; repeat for each LoRA (weight 1 when left out)")


def cmd_lora_report(args) -> int:
    from ..lora.report import describe, report_png, report_text
    info = describe(args.file, tags=args.tags, spectra=args.spectra)
    print(report_text(info))
    if args.png:
        print(f"wrote {report_png(info, args.png)}")
    return 0


def add_report_command(lora_subparsers) -> None:
    p = lora_subparsers.add_parser("report", help="LoRA report: ranks, tags, ΔW norm per block, spectra (PNG)")
    p.add_argument("file", help="the LoRA file")
    p.add_argument("--png", default=None, help="also draw the plots into this .png")
    p.add_argument("--tags", type=int, default=20, help="how many top tags to list (default 20)")
    p.add_argument("--spectra", type=int, default=4, help="how many of the largest modules' spectra (default 4)")
    p.set_defaults(func=cmd_lora_report)


def add_lora_commands(subparsers) -> None:
    lo = subparsers.add_parser("lora", help="LoRA files: info, merge, bake, extract, resize, merge-svd")
    sub = lo.add_subparsers(dest="lora_command", required=True)
    i = sub.add_parser("info", help="describe a LoRA: format, architecture, modules, ranks, alphas, tags")
    i.add_argument("file", help="the LoRA file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--tags", type=int, default=20, help="how many top tags to list (default 20)")
    i.set_defaults(func=cmd_lora_info)

    from ..lora.merge import DEFAULT_DENSITY, MODES
    from .args import add_dtype, add_election
    m = sub.add_parser("merge", help="merge LoRAs into one on their up/down factors (concat is exact)")
    m.add_argument("--mode", choices=MODES, default="concat",
                   help="concat (exact, ranks add up; default), add (PEFT linear: sums factors, cross terms), "
                        "ties, dare_linear, dare_ties, magnitude_prune (PEFT, on the factors; equal ranks)")
    m.add_argument("--lora", action="append", required=True, metavar="FILE[:W]", help=_LORA_ARG)
    m.add_argument("--density", type=float, default=DEFAULT_DENSITY,
                   help=f"share of each factor kept by ties, dare_* and magnitude_prune (default {DEFAULT_DENSITY}, "
                        f"PEFT's and the TIES paper's; 1 keeps all)")
    m.add_argument("--seed", type=int, default=0, help="seed of the DARE draws")
    add_election(m)
    add_dtype(m, what="factors")
    m.add_argument("--rank", type=int, default=None,
                   help="merge through the full ΔW and an SVD to this rank (any input ranks, LoHa/LoKr too); "
                        "the same as `lora merge-svd`")
    m.add_argument("--conv-rank", type=int, default=None, help="with --rank: rank of 3x3 convs (default: --rank)")
    m.add_argument("--clamp-quantile", type=float, default=0.99,
                   help="with --rank: clamp the factors to this quantile of their magnitudes, as kohya (0.99)")
    m.add_argument("--no-clamp", action="store_true", help="with --rank: keep the exact truncated SVD")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    m.add_argument("-o", "--output", required=True, help="output .safetensors")
    m.set_defaults(func=cmd_lora_merge)

    b = sub.add_parser("bake", help="apply LoRAs into a checkpoint (W + strength·ΔW), streamed")
    b.add_argument("--model", required=True, help="the checkpoint")
    b.add_argument("--lora", action="append", required=True, metavar="FILE[:W]", help=_LORA_ARG)
    b.add_argument("--lbw", default=None, help='block weights for every LoRA: "1,0,..." (17/26 values for '
                                               'SD1/SD2, 12/20 for SDXL; unlisted blocks 0) or a preset (ALL, INS, ...)')
    add_dtype(b, extra=("keep",), what="float tensors (keep: as in the checkpoint)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    b.add_argument("-o", "--output", required=True, help="output .safetensors")
    b.set_defaults(func=cmd_lora_bake)

    from .lora_svd import add_svd_commands
    add_svd_commands(sub)  # extract, resize, merge-svd (lora_svd.py)
    add_report_command(sub)
