"""Command line: `python -m lib_merge COMMAND ...`, one module per command group:
merge.py (merge, info, methods, presets, demo, ui), tools.py (mask, weights, normalize, noise, report),
lora.py and lora_svd.py (lora ...), optimize.py (optimize run/resume/report/list: AutoMBW).

Exit status: 0 on success, 2 on a user error (the message goes to stderr and no output file is left),
1 on an unexpected failure (a bug: please report it with the traceback).
"""
from __future__ import annotations

import argparse
import sys

from ..core.errors import MergeError


def make_parser() -> argparse.ArgumentParser:
    from .lora import add_lora_commands
    from .merge import add_app_commands, add_merge_commands
    from .optimize import add_optimize_commands
    from .tools import add_tool_commands

    p = argparse.ArgumentParser(
        prog="merge-lab", description="Merge Lab: merge Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL) and LoRAs; "
        "search block weights (AutoMBW). `merge-lab` and `python -m lib_merge` are the same command; "
        "`merge-lab COMMAND --help` describes each command, with examples.")
    sub = p.add_subparsers(dest="command", required=True)
    add_merge_commands(sub)   # merge, info, methods, presets
    add_tool_commands(sub)    # mask, weights, normalize, noise, report
    add_lora_commands(sub)    # lora ...
    add_optimize_commands(sub)  # optimize ...
    add_app_commands(sub)     # demo, ui
    from .help import finish
    finish(p)                 # descriptions, defaults and examples on every command's --help
    return p


def console() -> None:
    """The `merge-lab` command (pyproject.toml's console script): the same as `python -m lib_merge`."""
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`... | head`): stop quietly, as Unix tools do; the rest of the output goes nowhere
        import os
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
