"""Where the time goes: per-operator-type time split of ONNX models in ORT CPU (its profiler), side by side.

    python -m vitc.tools.profile_ort MODEL.onnx [MODEL2.onnx ...] [--threads 2] [--runs 30] [--json out.json]

Op types are ORT's kernels after its graph optimizations (QGemm, MatMulIntegerToFloat, DynamicQuantizeLinear, ...),
so the table shows what actually ran. Inputs are random with each model's fixed shapes (dynamic dims -> 1).
Prints a markdown table: ms per run and share of the total per op type, one column pair per model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("vitc.profile")


def profile(paths: list[Path], threads: int, runs: int) -> dict:
    from vitc.compiler.measure.bench import onnx_inputs, random_feeds
    from vitc.runtimes.ort import profile_op_types

    out = {}
    for p in paths:
        feeds = random_feeds(onnx_inputs(p), batch=1)
        out[str(p)] = profile_op_types(str(p), feeds, threads=threads, runs=runs)
    return out


def format_table(prof: dict, labels: list[str]) -> str:
    ops = []
    for per in prof.values():
        for op in per:
            if op not in ops:
                ops.append(op)
    totals = [sum(v["ms"] for v in per.values()) for per in prof.values()]
    head = "| op type | " + " | ".join(f"{lab} ms | %" for lab in labels) + " |"
    lines = [head, "|---" + "|---:|---:" * len(labels) + "|"]
    for op in ops:
        cells = []
        for per, tot in zip(prof.values(), totals):
            v = per.get(op)
            cells.append("" if v is None else f"{v['ms']:.2f} | {100 * v['ms'] / tot:.1f}")
            if v is None:
                cells[-1] = " | "
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| **total (kernels)** | " + " | ".join(f"{t:.2f} | 100" for t in totals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--label", action="append", default=None, help="column label per model (default: file names)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    labels = a.label or [p.parent.name + "/" + p.name for p in a.models]
    if len(labels) != len(a.models):
        ap.error("give one --label per model")
    prof = profile(a.models, a.threads, a.runs)
    if a.json:
        a.json.write_text(json.dumps(prof, indent=2))
    sys.stdout.write(format_table(prof, labels) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
