"""`python -m lib_merge lora ...`: LoRA subcommands (for now `lora info FILE [--json]`).

`add_lora_commands(subparsers)` adds `lora` to the main CLI's argparse subparsers; user errors are
MergeError subclasses (the main CLI prints "error: ..." and exits 2).
"""
from __future__ import annotations

import json


def cmd_lora_info(args) -> int:
    from .info import describe, format_text
    info = describe(args.file, tags=args.tags)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        print(format_text(info))
    return 0


def add_lora_commands(subparsers) -> None:
    lo = subparsers.add_parser("lora", help="LoRA files: info (more to come)")
    sub = lo.add_subparsers(dest="lora_command", required=True)
    i = sub.add_parser("info", help="describe a LoRA: format, architecture, modules, ranks, alphas, tags")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--tags", type=int, default=20, help="how many top tags to list (default 20)")
    i.set_defaults(func=cmd_lora_info)


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main
    return cli_main(["lora", *(argv or [])])


if __name__ == "__main__":  # pragma: no cover
    import sys
    raise SystemExit(main(sys.argv[1:]))
