"""`lora extract`, `lora resize`, `lora merge-svd`: the SVD commands, added by `add_svd_commands(lora_sub)`.

User errors are MergeError subclasses (the main CLI prints "error: ..." and exits 2).
"""
from __future__ import annotations

from ..lora.merge import DEFAULT_DENSITY
from ..lora.svd import MODES, SvdError
from .args import add_dtype, add_election


def _summary(retained: dict[str, float]) -> str:
    if not retained:
        return ""
    vals = sorted(retained.values())
    worst = min(retained, key=retained.get)
    return (f"retained Frobenius fraction: mean {sum(vals) / len(vals):.4f}, min {vals[0]:.4f} ({worst})")


def cmd_extract(args) -> int:
    from ..lora.extract import extract
    from ..core.files import dtype_from_name
    r = extract(args.base, args.tuned, args.output, args.rank, args.conv_rank, te_threshold=args.te_threshold,
                dtype=dtype_from_name(args.dtype), clamp_quantile=None if args.no_clamp else args.clamp_quantile,
                seed=args.seed, overwrite=args.overwrite)
    for m in r.messages:
        print(m)
    print(f"wrote {r.path}: {r.family}, {r.modules} modules, text encoder "
          f"{'included' if r.te_included else 'left out'}; {_summary(r.retained)}")
    return 0


def cmd_resize(args) -> int:
    from ..core.files import dtype_from_name
    from ..lora.resize import resize
    if args.rank is None and args.dynamic is None:
        raise SvdError("Give --rank R or --dynamic RULE:VALUE (e.g. sv_fro:0.9).")
    r = resize(args.file, args.output, rank=args.rank, dynamic=args.dynamic, max_rank=args.max_rank,
               conv_rank=args.conv_rank, dtype=dtype_from_name(args.dtype), overwrite=args.overwrite)
    for w in r.warnings:
        print(f"warning: {w}")
    if args.verbose:
        for name, (old, new) in r.ranks.items():
            print(f"{name}: rank {old} -> {new}, retained {r.retained[name]:.4f}")
    new = sorted({n for _, n in r.ranks.values()})
    print(f"wrote {r.path}: {len(r.ranks)} modules, new ranks {new[0]}..{new[-1]}; {_summary(r.retained)}")
    return 0


def cmd_merge_svd(args) -> int:
    """`lora merge-svd`, and `lora merge --rank R` (the same SVD merge; concat there means add)."""
    from ..lora.merge import parse_lora_arg
    from ..lora.svd import merge_svd
    loras = [parse_lora_arg(t) for t in args.lora]
    r = merge_svd(loras, args.output, mode=args.mode, density=args.density, rank=args.rank,
                  conv_rank=args.conv_rank, clamp_quantile=None if args.no_clamp else args.clamp_quantile,
                  seed=args.seed, majority=getattr(args, "election", "sum"), dtype=args.dtype,
                  overwrite=args.overwrite)
    for w in r.warnings:
        print(f"warning: {w}")
    print(f"wrote {r.path}: {r.family or 'unknown architecture'}, {r.modules} modules; {_summary(r.retained)}")
    return 0


def _common(p, clamp=True):
    p.add_argument("-o", "--output", required=True, help="output .safetensors")
    add_dtype(p, what="factors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    if clamp:
        p.add_argument("--clamp-quantile", type=float, default=0.99,
                       help="clamp the factors to this quantile of their magnitudes, as kohya (0.99)")
        p.add_argument("--no-clamp", action="store_true", help="keep the exact truncated SVD")
        p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD and DARE drops")


def add_svd_commands(lora_sub) -> None:
    """Add `extract`, `resize` and `merge-svd` to the `lora` subparsers."""
    e = lora_sub.add_parser("extract", help="extract a LoRA from a fine-tune and its base checkpoint")
    e.add_argument("--base", required=True, help="the base checkpoint")
    e.add_argument("--tuned", required=True, help="the fine-tuned checkpoint")
    e.add_argument("--rank", type=int, required=True, help="rank of linear and 1x1 modules")
    e.add_argument("--conv-rank", type=int, default=None,
                   help="also extract the resnet 3x3 convs at this rank (LoCon); without it they are left out")
    e.add_argument("--te-threshold", type=float, default=0.01,
                   help="leave the text encoder out when its largest change is at most this (0.01)")
    _common(e)
    e.set_defaults(func=cmd_extract)

    r = lora_sub.add_parser("resize", help="change a LoRA's rank (fixed or dynamic), keeping its strength")
    r.add_argument("file", help="the LoRA to resize (a new file is written)")
    r.add_argument("--rank", type=int, default=None, help="new rank (a cap with --dynamic)")
    r.add_argument("--dynamic", default=None, help="sv_ratio:X | sv_cumulative:X | sv_fro:X")
    r.add_argument("--max-rank", type=int, default=None, help="cap of a dynamic rank")
    r.add_argument("--conv-rank", type=int, default=None, help="rank of 3x3 conv modules (default: --rank)")
    r.add_argument("-v", "--verbose", action="store_true", help="print every module's ranks and retained fraction")
    _common(r, clamp=False)
    r.set_defaults(func=cmd_resize)

    m = lora_sub.add_parser("merge-svd", help="merge LoRAs through their full ΔW and an SVD to one LoRA")
    m.add_argument("--lora", action="append", required=True, metavar="FILE[:W[:W_TE]]",
                   help="a LoRA and its weight (U-Net, then text encoder); repeat for each LoRA")
    m.add_argument("--mode", choices=MODES, default="add", help="how the deltas are combined (add)")
    m.add_argument("--density", type=float, default=DEFAULT_DENSITY,
                   help=f"share kept by ties / dare / magnitude_prune (default {DEFAULT_DENSITY}; 1 keeps all)")
    add_election(m)
    m.add_argument("--rank", type=int, required=True, help="rank of the merged LoRA")
    m.add_argument("--conv-rank", type=int, default=None, help="rank of 3x3 conv modules (default: --rank)")
    _common(m)
    m.set_defaults(func=cmd_merge_svd)
