"""The `vitc` command line: build, explain, bench, export."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vitc.compiler.calibration import Observer, ObserverConfig
from vitc.compiler.errors import VitcError

log = logging.getLogger("vitc")


def _floats3(s: str) -> tuple[float, float, float]:
    try:
        v = tuple(float(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {s!r}") from None
    if len(v) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {s!r}")
    return v  # type: ignore[return-value]


def _shape(s: str) -> tuple[str, list[int]]:
    try:
        name, dims = s.split("=", 1)
        return name, [int(d) for d in dims.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=d0,d1,..., got {s!r}") from None


def get_parser() -> argparse.ArgumentParser:
    from vitc.compiler.build import Precision
    from vitc.compiler.pipeline import Target

    p = argparse.ArgumentParser(prog="vitc", description="Compile a vision-transformer ONNX model to int8 engines.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="canonicalize, fuse, calibrate and quantize a model")
    b.add_argument("model", type=Path)
    b.add_argument("-o", "--outdir", type=Path, required=True, help="output folder (must not exist unless --force)")
    b.add_argument("--target", choices=[t.value for t in Target], default=Target.ORT.value)
    b.add_argument("--precision", choices=[x.value for x in Precision], default=Precision.INT8.value)
    b.add_argument("--no-fuse", action="store_true", help="skip the LayerNorm/GELU/MatMul+bias fusions")
    b.add_argument("--calib", type=Path, default=None,
                   help="image folder, .npz (one array per input) or .npy; default: embedded photos")
    b.add_argument("--calib-samples", type=int, default=32)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--observer", choices=[o.value for o in Observer], default=Observer.PERCENTILE.value)
    b.add_argument("--percentile", type=float, default=99.99)
    b.add_argument("--no-migrate", action="store_true", help="skip channel-scale migration before quantization")
    b.add_argument("--alpha", type=float, default=0.5, help="migration strength (0: none, 1: all into weights)")
    b.add_argument("--batch", type=int, default=1, help="fix a dynamic batch dim to this size")
    b.add_argument("--input-shape", type=_shape, action="append", default=[], metavar="NAME=D0,D1,...")
    b.add_argument("--mean", type=_floats3, default=None, help="override normalization mean, e.g. 0.5,0.5,0.5")
    b.add_argument("--std", type=_floats3, default=None)
    b.add_argument("--force", action="store_true", help="replace an existing OUTDIR")
    b.add_argument("--dump-after", action="append", default=[], metavar="PASS",
                   help="also write the graph after PASS into OUTDIR/dumps (repeatable; 'all')")

    e = sub.add_parser("explain", help="print the per-layer quantization plan")
    e.add_argument("model", type=Path)
    e.add_argument("--target", choices=[t.value for t in Target], default=Target.ORT.value)
    e.add_argument("--batch", type=int, default=1)

    be = sub.add_parser("bench", help="time models side by side (ms per image, ratios against the first)")
    be.add_argument("models", type=Path, nargs="+")
    be.add_argument("--batch", type=int, default=1)
    be.add_argument("--threads", type=int, default=2)
    be.add_argument("--rounds", type=int, default=5)
    be.add_argument("--block", type=int, default=10)
    be.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")

    x = sub.add_parser("export", help="export a timm model to ONNX (needs vitc[export])")
    x.add_argument("model_name")
    x.add_argument("-o", "--output", type=Path, required=True)
    x.add_argument("--checkpoint", type=Path, default=None, help=".safetensors or weights-only torch file")
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter")
    x.add_argument("--force", action="store_true")
    return p


def _cmd_build(a) -> int:
    from vitc.compiler.build import BuildConfig, CalibConfig, Precision, build
    from vitc.compiler.pipeline import Target

    ob = ObserverConfig(Observer(a.observer), a.percentile)
    if a.calib_samples < 1:
        raise VitcError("--calib-samples must be >= 1")
    cfg = BuildConfig(
        model=a.model, outdir=a.outdir, target=Target(a.target), precision=Precision(a.precision),
        fuse=not a.no_fuse, batch=a.batch, input_shapes=dict(a.input_shape),
        calib=CalibConfig(source=a.calib, samples=a.calib_samples, seed=a.seed, observer=ob, mean=a.mean, std=a.std),
        migrate=not a.no_migrate, migrate_alpha=a.alpha, force=a.force, dump_after=frozenset(a.dump_after))
    res = build(cfg)
    counts = {k: v for r in res.report["passes"] for k, v in r["counts"].items()
              if v and any(w in k for w in ("fusions", "nodes quantized", "folds", "Mul inserted"))}
    log.info("wrote %s (%s)", res.model_path, ", ".join(f"{k}: {v}" for k, v in counts.items()))
    if a.target == "trt":
        log.warning("TensorRT engine not built: the TensorRT target is not implemented yet; "
                    "model.int8.onnx is the Q/DQ graph")
    return 0


def _cmd_explain(a) -> int:
    import onnx_graphsurgeon as gs

    from vitc.compiler.loader import load_model
    from vitc.compiler.pipeline import PipelineConfig, Target, float_pipeline, run_passes
    from vitc.compiler.planner import resolve_plan
    from vitc.compiler.policy import default_policy
    from vitc.passes.annotate import AnnotatePass
    from vitc.runtimes.ort import quiet

    quiet()
    lm = load_model(a.model, batch=a.batch)
    g = gs.import_onnx(lm.model)
    run_passes(g, float_pipeline(PipelineConfig(Target(a.target))))
    ann = AnnotatePass()
    ann.run(g)
    plan = resolve_plan(g, default_policy(), ann.roles)
    out = sys.stdout
    out.write(f"{'node':70s} {'op':7s} {'role':12s} {'block':>5s}  {'quantization':60s} rule\n")
    for n in plan.nodes:
        out.write(f"{n.node[-70:]:70s} {n.op:7s} {n.role:12s} {'' if n.block is None else n.block:>5}  "
                  f"{n.spec.describe():60s} {n.rule}\n")
    return 0


def _cmd_bench(a) -> int:
    from vitc.compiler.bench import BenchConfig, bench, format_table

    for m in a.models:
        if not m.is_file():
            raise VitcError(f"{m}: no such model file")
    rows = bench(list(a.models), BenchConfig(batch=a.batch, threads=a.threads, rounds=a.rounds, block=a.block))
    sys.stdout.write(format_table(rows) + "\n")
    if a.json:
        a.json.write_text(json.dumps([r.to_json() for r in rows], indent=2))
    return 0


def _cmd_export(a) -> int:
    from vitc.compiler.export import ExportConfig, export_timm

    out = export_timm(ExportConfig(a.model_name, a.output, a.checkpoint, a.opset, a.dynamo, force=a.force))
    log.info("wrote %s", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), format="vitc: %(message)s", stream=sys.stderr)
    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
    _silence_graphsurgeon()
    handlers = {"build": _cmd_build, "explain": _cmd_explain, "bench": _cmd_bench, "export": _cmd_export}
    try:
        return handlers[a.cmd](a)
    except VitcError as exc:
        log.error("error: %s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


def _silence_graphsurgeon() -> None:
    """graphsurgeon's own logger prints warnings (e.g. about large folded constants) straight to stdout."""
    try:
        import onnx_graphsurgeon as gs

        gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    except Exception:  # pragma: no cover
        pass


if __name__ == "__main__":
    raise SystemExit(main())
