"""Digests of `vitc build` artifacts: the check that a refactor of the compiler changes no output byte.

    python -m vitc.tools.build_digests -o DIR MODEL... [--compare REF_DIR/digests.json]

Builds every MODEL three ways (``--target ort``, ``--target trt``, ``--precision fp32``; all with
``--calib-samples 8``; ``--variants`` adds others, e.g. ``ort-no-search``), each in its own ``vitc`` process, into ``DIR/<model stem>/<variant>/``, and writes
``DIR/digests.json``: per model and variant the sha256 of each model file the build wrote (``*.onnx``,
``*.onnx.data``) and the sha256 of its build.json with the run-dependent parts taken out (every ``seconds`` entry,
the package versions, and the output folder in paths). The table goes to stdout.

With ``--compare`` the digests are checked against an earlier run's digests.json: a line per artifact, and exit 1
if any digest differs or is missing (a differing build.json also lists the keys that differ, when the earlier
run's folder is still there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("vitc.build_digests")

VARIANTS: dict[str, tuple[str, ...]] = {
    "ort": ("--target", "ort"),
    "trt": ("--target", "trt"),
    "fp32": ("--precision", "fp32"),
    # not built unless named in --variants: the other paths through the build's stages
    "ort-no-search": ("--target", "ort", "--no-search"),
    "trt-no-search": ("--target", "trt", "--no-search"),
    "ort-no-migrate": ("--target", "ort", "--no-search", "--no-migrate"),
    "ort-no-fuse": ("--target", "ort", "--no-fuse"),
    "trt-fp32": ("--target", "trt", "--precision", "fp32"),
    "ort-batch2": ("--target", "ort", "--batch", "2"),
    "openvino": ("--target", "openvino"),
}
DEFAULT_VARIANTS = ("ort", "trt", "fp32")
COMMON = ("--calib-samples", "8")
VOLATILE_KEYS = ("seconds", "versions")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def normalized_report(report: object, outdir: str) -> object:
    """build.json without what differs between two runs of the same build: timings, versions, the output folder."""
    if isinstance(report, dict):
        return {k: normalized_report(v, outdir) for k, v in report.items() if k not in VOLATILE_KEYS}
    if isinstance(report, list):
        return [normalized_report(v, outdir) for v in report]
    if isinstance(report, str):
        return report.replace(outdir, "OUTDIR")
    return report


def report_digest(path: Path, outdir: Path) -> str:
    norm = normalized_report(json.loads(path.read_text()), str(outdir))
    return hashlib.sha256(json.dumps(norm, sort_keys=True).encode()).hexdigest()


def build_one(model: Path, outdir: Path, variant: str) -> dict[str, str]:
    """Build ``model`` as ``variant`` into ``outdir``: {file name: sha256} of its model files and build.json."""
    cmd = [sys.executable, "-m", "vitc", "--log-level", "warning", "build", str(model), "-o", str(outdir),
           "--force", *VARIANTS[variant], *COMMON]
    log.info("%s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} {variant}: vitc build exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    out = {p.name: sha256(p) for p in sorted(outdir.iterdir()) if p.name.endswith((".onnx", ".onnx.data"))}
    out["build.json (normalized)"] = report_digest(outdir / "build.json", outdir)
    return out


def report_differences(a: object, b: object, where: str = "") -> list[str]:
    """Keys (as paths) whose values differ between two normalized reports."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            out += report_differences(a.get(k), b.get(k), f"{where}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in report_differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where or "/"]


def compare(ref_path: Path, digests: dict, outdir: Path) -> int:
    ref = json.loads(ref_path.read_text())
    bad = 0
    sys.stdout.write(f"{'model':<28} {'variant':<14} {'file':<26} {'reference':<16} {'now':<16} match\n")
    for model, variants in digests["models"].items():
        for variant, files in variants.items():
            want = ref["models"].get(model, {}).get(variant, {})
            for name in sorted(set(files) | set(want)):
                a, b = want.get(name, "-"), files.get(name, "-")
                ok = a == b
                bad += not ok
                sys.stdout.write(f"{model:<28} {variant:<14} {name:<26} {a[:16]:<16} {b[:16]:<16} "
                                 f"{'yes' if ok else 'NO'}\n")
                if name.startswith("build.json") and not ok:
                    old = ref_path.parent / model / variant / "build.json"
                    if old.is_file():
                        diff = report_differences(
                            normalized_report(json.loads(old.read_text()), str(old.parent)),
                            normalized_report(json.loads((outdir / model / variant / "build.json").read_text()),
                                              str(outdir / model / variant)))
                        sys.stdout.write(f"    build.json differs at: {', '.join(diff[:20])}\n")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitc.tools.build_digests", description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("-o", "--outdir", type=Path, required=True)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: {', '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--compare", type=Path, default=None, help="an earlier run's digests.json to check against")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="build_digests: %(message)s")
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})")
    a.outdir.mkdir(parents=True, exist_ok=True)
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    digests: dict = {"commit": git.stdout.strip() or None, "options": list(COMMON), "models": {}}
    for model in a.models:
        for variant in variants:
            files = build_one(model, a.outdir / model.stem / variant, variant)
            digests["models"].setdefault(model.stem, {})[variant] = files
            for name, d in files.items():
                sys.stdout.write(f"{model.stem:<28} {variant:<14} {name:<26} {d}\n")
            sys.stdout.flush()
    (a.outdir / "digests.json").write_text(json.dumps(digests, indent=2))
    if a.compare is not None:
        return compare(a.compare, digests, a.outdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
