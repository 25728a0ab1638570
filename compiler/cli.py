"""The `vitc` command line: build, explain, bench, export."""

from __future__ import annotations

import argparse
import json
import logging
import os
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
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=d0,d1,... with integer dims, got {s!r}") from None
    if not name or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"expected NAME=d0,d1,... with positive dims, got {s!r}")
    return name, shape


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _std3(s: str) -> tuple[float, float, float]:
    v = _floats3(s)
    if min(v) <= 0:
        raise argparse.ArgumentTypeError(f"std values must be > 0, got {s!r}")
    return v


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
    b.add_argument("--calib-samples", type=_positive, default=32)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--observer", choices=[o.value for o in Observer], default=Observer.PERCENTILE.value)
    b.add_argument("--percentile", type=float, default=99.99)
    b.add_argument("--no-migrate", action="store_true", help="skip channel-scale migration before quantization")
    b.add_argument("--alpha", type=float, default=0.5,
                   help="fixed migration strength with --no-search (0: none, 1: all into the weights)")
    b.add_argument("--no-search", action="store_true",
                   help="use the observer's ranges as they are instead of searching migration/clipping per operator")
    b.add_argument("--batch", type=_positive, default=1, help="fix a dynamic batch dim to this size")
    b.add_argument("--input-shape", type=_shape, action="append", default=[], metavar="NAME=D0,D1,...")
    b.add_argument("--mean", type=_floats3, default=None, help="override normalization mean, e.g. 0.5,0.5,0.5")
    b.add_argument("--std", type=_std3, default=None)
    b.add_argument("--force", action="store_true", help="replace an existing OUTDIR")
    b.add_argument("--dump-after", action="append", default=[], metavar="PASS",
                   help="also write the graph after PASS into OUTDIR/dumps (repeatable; 'all')")

    e = sub.add_parser("explain", help="print the per-layer quantization plan")
    e.add_argument("model", type=Path)
    e.add_argument("--target", choices=[t.value for t in Target], default=Target.ORT.value)
    e.add_argument("--batch", type=_positive, default=1)

    be = sub.add_parser("bench", help="time models side by side (ms per image, ratios against the first)")
    be.add_argument("models", type=Path, nargs="+")
    be.add_argument("--batch", type=_positive, default=1)
    be.add_argument("--threads", type=_positive, default=2)
    be.add_argument("--rounds", type=_positive, default=5)
    be.add_argument("--block", type=_positive, default=10)
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
    from vitc.compiler.errors import CalibrationDataError, ModelLoadError, OutputError
    from vitc.compiler.pipeline import Target

    ob = ObserverConfig(Observer(a.observer), a.percentile)
    if not 0 < a.percentile <= 100:
        raise VitcError(f"--percentile {a.percentile} is out of range", hint="give a value in (0, 100], e.g. 99.99")
    if not 0 <= a.alpha <= 1:
        raise VitcError(f"--alpha {a.alpha} is out of range", hint="give a value in [0, 1]")
    # Cheap checks first, so a typo fails before minutes of graph work.
    if not a.model.exists():
        raise ModelLoadError(f"{a.model}: no such file", hint="give the path of an .onnx model")
    if a.calib is not None and not a.calib.exists():
        raise CalibrationDataError(f"{a.calib}: calibration data not found",
                                   hint="give a folder of images or a .npz/.npy file")
    outdir = Path(os.path.abspath(a.outdir))  # normalized: no '..' left for the final rename
    if a.force and outdir.is_dir() and not outdir.is_symlink():
        real = outdir.resolve()
        for what, p in (("model", a.model), ("calibration data", a.calib)):
            if p is not None and (p.resolve() == real or real in p.resolve().parents):
                raise OutputError(f"{outdir}: --force would delete the {what} {p} inside it",
                                  hint="write to another -o")
    created = [p for p in outdir.parents if not p.exists()]  # parents build() will create, deepest first
    cfg = BuildConfig(
        model=a.model, outdir=outdir, target=Target(a.target), precision=Precision(a.precision),
        fuse=not a.no_fuse, batch=a.batch, input_shapes=dict(a.input_shape),
        calib=CalibConfig(source=a.calib, samples=a.calib_samples, seed=a.seed, observer=ob, mean=a.mean, std=a.std),
        migrate=not a.no_migrate, migrate_alpha=a.alpha, search=not a.no_search, force=a.force, dump_after=frozenset(a.dump_after))
    try:
        res = build(cfg)
    except BaseException:
        for p in created:  # leave no empty parent folders behind a failed build
            try:
                p.rmdir()
            except OSError:
                break
        raise
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
    import onnx

    from vitc.compiler.bench import BenchConfig, bench, format_table

    for m in a.models:
        if not m.is_file():
            raise VitcError(f"{m}: no such model file", hint="give the paths of .onnx models")
        try:
            onnx.load(str(m), load_external_data=False)
        except Exception as exc:
            raise VitcError(f"{m}: not a readable ONNX model ({type(exc).__name__})",
                            hint="check the file is a complete .onnx export") from None
    if a.json is not None and not a.json.absolute().parent.is_dir():
        raise VitcError(f"{a.json}: folder {a.json.absolute().parent} does not exist", hint="choose another --json")
    try:
        rows = bench(list(a.models), BenchConfig(batch=a.batch, threads=a.threads, rounds=a.rounds, block=a.block))
    except VitcError:
        raise
    except Exception as exc:
        if type(exc).__module__.startswith("onnxruntime"):  # a model ORT cannot load or run
            raise VitcError(f"onnxruntime cannot run the models: {exc}",
                            hint="check each model loads in onnxruntime") from None
        raise
    sys.stdout.write(format_table(rows) + "\n")
    if a.json:
        try:
            a.json.write_text(json.dumps([r.to_json() for r in rows], indent=2))
        except OSError as exc:
            raise VitcError(f"{a.json}: cannot write ({exc.strerror})", hint="choose another --json") from None
    return 0


def _cmd_export(a) -> int:
    from vitc.compiler.export import ExportConfig, export_timm

    out = export_timm(ExportConfig(a.model_name, a.output, a.checkpoint, a.opset, a.dynamo, force=a.force))
    log.info("wrote %s", out)
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (so in-process callers that swap it,
    like pytest's capsys, get the output), not the stream that existed when the handler was made."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(level: str) -> None:
    logger = logging.getLogger("vitc")
    for h in list(logger.handlers):
        if isinstance(h, _StderrHandler):  # a previous main() in this process
            logger.removeHandler(h)
    h = _StderrHandler()
    h.setFormatter(logging.Formatter("vitc: %(message)s"))
    logger.addHandler(h)
    logger.setLevel(getattr(logging, level.upper()))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    a = parser.parse_args(argv)
    _setup_logging(a.log_level)
    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
    _silence_graphsurgeon()
    handlers = {"build": _cmd_build, "explain": _cmd_explain, "bench": _cmd_bench, "export": _cmd_export}
    try:
        return handlers[a.cmd](a)
    except VitcError as exc:
        log.error("error: %s", _one_line(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except BrokenPipeError:  # e.g. `vitc explain model.onnx | head`
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (in-process capture)
            pass
        return 141


def _silence_graphsurgeon() -> None:
    """graphsurgeon's own logger prints warnings (e.g. about large folded constants) straight to stdout."""
    try:
        import onnx_graphsurgeon as gs

        gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    except Exception:  # pragma: no cover
        pass


if __name__ == "__main__":
    raise SystemExit(main())
