"""Command-line options shared by the subcommands that load and calibrate a model (build, analyze, search, ablate),
and the argparse value types every command shares (positive/non-negative integers, positive numbers)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def add_input_options(p: argparse.ArgumentParser, *, shape_type: Callable, floats3_type: Callable,
                      std3_type: Callable, positive_type: Callable) -> None:
    """--batch, --input-shape, --mean, --std and --force, with the same meaning everywhere."""
    p.add_argument("--batch", type=positive_type, default=None,
                   help="fix a dynamic batch dim to this size (default: build at 1; the artifact keeps the dynamic batch)")
    p.add_argument("--input-shape", type=shape_type, action="append", default=[], metavar="NAME=D0,D1,...")
    p.add_argument("--mean", type=floats3_type, default=None, help="override normalization mean, e.g. 0.5,0.5,0.5")
    p.add_argument("--std", type=std3_type, default=None)
    p.add_argument("--force", action="store_true", help="replace an existing OUTDIR")


def _number(s: str, cast: Callable, ok: Callable[[float], bool], what: str):
    """``cast(s)`` when it parses and ``ok`` holds, else an argparse error naming ``what`` was expected."""
    try:
        v = cast(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    return v


def pos_int(s: str) -> int:
    return _number(s, int, lambda v: v >= 1, "a positive integer")


def nonneg_int(s: str) -> int:
    return _number(s, int, lambda v: v >= 0, "an integer >= 0")


def pos_float(s: str) -> float:
    return _number(s, float, lambda v: v > 0 and math.isfinite(v), "a positive number")
