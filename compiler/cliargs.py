"""Command-line options shared by the subcommands that load and calibrate a model (build, analyze, search, ablate)."""

from __future__ import annotations

import argparse
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
