"""Argument types the command groups share, so one thing has one spelling on every command (with the old
spellings accepted as aliases): output dtypes and TIES sign elections."""
from __future__ import annotations

import argparse

from ..core.errors import MergeError


def _checked(convert, metavar: str):
    def parse(text: str):
        try:
            return convert(text)
        except MergeError as e:   # argparse prints it after the usage line and exits 2
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = metavar
    return parse


def add_dtype(p, default: str | None = "float16", extra: tuple[str, ...] = (), what: str = "float tensors",
              default_text: str | None = None) -> None:
    """--dtype float16|bfloat16|float32 (fp16, bf16, fp32 accepted) plus `extra` words such as keep."""
    from ..core.files import OUTPUT_DTYPES, output_dtype

    def convert(text: str) -> str:
        return text if text in extra else output_dtype(text)
    choices = "|".join(OUTPUT_DTYPES + extra)
    p.add_argument("--dtype", type=_checked(convert, "dtype"), default=default, metavar=choices,
                   help=f"dtype of the written {what} (default {default_text or default}; fp16, bf16, fp32 are "
                        f"accepted too)")


def add_election(p) -> None:
    """--election sum|count, TIES's sign election per element (--majority total|frequency: the old names)."""
    from ..methods.common import election_name

    p.add_argument("--election", "--majority", dest="election", type=_checked(election_name, "election"),
                   default="sum", metavar="sum|count",
                   help="TIES sign election: sum = sign of the summed deltas (the TIES paper; default), count = "
                        "majority of signs (--majority total|frequency: the same two, by their old names)")
