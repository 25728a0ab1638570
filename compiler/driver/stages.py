"""The build declared as data: named stages over one :class:`BuildContext`, chosen per configuration by
:func:`build_stages`.

`vitc build` runs every stage in order (``compiler/driver/build.py``); the front end every command shares (load -> float
passes -> annotate -> plan, ``compiler/driver/frontend.py``) is the stages marked ``front_end``; `vitc build --dump-after`
accepts the names the stages can dump, over every configuration (:func:`dump_names`). A stage's time adds to its
``seconds`` entry of build.json.

The stages, in order (the build.json ``seconds`` entry in brackets):

- ``load`` [load], then each float pass [float passes], ``float check`` [float check];
- fp32: (ORT with fusions) ``sink_reshapes``;
- int8: ``annotate``, ``plan``, ``calibrate`` [calibration]; then ``range search + migration`` [same name], or with
  --no-search ``migrate_scales`` and ``recalibrate`` [migration + recalibration]; ``insert_qdq`` and the target's
  lowering passes [insert_qdq];
- ``export``, ``dynamic_batch``, ``save + check`` [save + check].
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from vitc.compiler.driver.build import (CPU_METADATA_KEY, FP32_NAME, INT8_NAME, BuildConfig, CalibConfig, Precision,
                                 calibration_feeds, detect_cpu, gptq_weights, new_moments, node_roles, ort_session,
                                 plan_for, refine_ranges, sequential_weights,
                                 fc2_hadamard_block, resolve_cpu, run_calibration, save_and_check, uses_holdout_search,
                                 uses_pair_safe_weights)
from vitc.compiler.calib.calibration import CalibrationTable
from vitc.compiler.errors import ModelLoadError, PassError, VitcError
from vitc.compiler.driver.loader import LoadedModel, load_model
from vitc.compiler.driver.pipeline import Dumps, Target, export, run_passes
from vitc.compiler.quant.policy import Plan, Policy, target_default_policy
from vitc.passes.annotate import AnnotatePass, Role
from vitc.passes.base import GraphPass, PassResult
from vitc.passes.canonicalize import CanonicalizePass
from vitc.passes.dynamic_batch import DynamicBatch
from vitc.passes.fc2_hadamard import Fc2Hadamard
from vitc.passes.fold_channel_scale import ChannelScaleFold
from vitc.passes.fuse_gelu import GeluFusion, GeluOp
from vitc.passes.fuse_layernorm import LayerNormFusion
from vitc.passes.fuse_matmul_add import MatMulAddFusion
from vitc.passes.insert_qdq import InsertQDQPass
from vitc.passes.migrate_scales import Migration, ScaleMigrationPass
from vitc.passes.ort_attention import OrtAttentionFusion
from vitc.passes.ov_lower import OvLoweringPass
from vitc.passes.rotate_residual import ResidualRotation
from vitc.passes.sink_reshapes import ReshapeSinking
from vitc.passes.trt_lower import TrtLoweringPass

log = logging.getLogger(__name__)


@dataclass
class BuildContext:
    """What the stages read and write. ``scratch`` is the build's temporary folder (None when only the front end
    runs); ``results`` are the pass reports in run order; ``seconds`` the build.json timings."""

    cfg: BuildConfig
    scratch: Path | None = None
    dumps: Dumps | None = None
    source: LoadedModel | None = None
    graph: gs.Graph | None = None
    results: list[PassResult] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    policy: Policy | None = None
    roles: dict[str, Role] = field(default_factory=dict)
    plan: Plan | None = None
    float_ops: list[dict] = field(default_factory=list)
    table: CalibrationTable | None = None
    calib_summary: dict = field(default_factory=dict)
    reservoir: dict[str, list[np.ndarray]] = field(default_factory=dict)  # a few samples' activations (the search)
    fit_ranges: dict = field(default_factory=dict)  # per-channel ranges of the samples the reservoir does not show
    migration: Migration | None = None  # what the fixed-strength migration (--no-search) applied
    moments: dict | None = None  # second moments of the GPTQ-rounded linears' inputs (calibration)
    rounded: dict | None = None  # node -> (int8 weight, scale) of the GPTQ-rounded linears
    model: onnx.ModelProto | None = None  # the artifact
    extra_outputs: list[str] = field(default_factory=list)  # files beside the artifact (OpenVINO IR)


@dataclass(frozen=True)
class Stage:
    """One named step of the build. ``seconds``: the build.json ``seconds`` entry its time adds to (None: not
    reported); ``dumps``: the ``--dump-after`` names it can write; ``front_end``: part of the shared front end."""

    name: str
    run: Callable[[BuildContext], None]
    seconds: str | None = None
    dumps: tuple[str, ...] = ()
    front_end: bool = False


def run_stages(stages: Iterable[Stage], ctx: BuildContext) -> BuildContext:
    """Run ``stages`` in order on ``ctx``, each one's time added to its ``seconds`` entry."""
    for st in stages:
        t0 = time.perf_counter()
        st.run(ctx)
        if st.seconds is not None:
            ctx.seconds[st.seconds] = ctx.seconds.get(st.seconds, 0.0) + time.perf_counter() - t0
    return ctx


# -- the passes ---------------------------------------------------------------------------------------------------------
def float_passes(target: Target, fuse: bool = True, rotate: bool = False, rotate_seed: int = 0,
                 hadamard: int = 0) -> list[GraphPass]:
    """canonicalize -> fusions (-> the residual-stream rotation with ``rotate``) (-> the Hadamard before fc2 with
    block size ``hadamard`` > 0). Fusions are off with ``fuse=False`` (the --no-fuse comparison); the rotations need
    them (they read fused LayerNorms and GELUs)."""
    passes: list[GraphPass] = [CanonicalizePass()]
    if fuse:
        gelu = GeluOp.ORT_CONTRIB if target is Target.ORT else GeluOp.ONNX20
        passes += [LayerNormFusion(), GeluFusion(gelu), MatMulAddFusion(), ChannelScaleFold()]
        if rotate:
            passes.append(ResidualRotation(rotate_seed))
        if hadamard:
            passes.append(Fc2Hadamard(hadamard, rotate_seed))
    return passes


def lowering_passes(target: Target, fuse_attention: bool = True) -> list[GraphPass]:
    """Lowering after Q/DQ insertion: TensorRT takes no int32 bias DQ (passes/trt_lower.py); on ORT each float
    attention core with an int8 QKV projection becomes one QAttention kernel (passes/ort_attention.py) and the
    token stream stays a 2-D matrix between the GEMMs (passes/sink_reshapes.py)."""
    if target is Target.TRT:
        return [TrtLoweringPass()]
    if target is Target.OPENVINO:  # float biases (as for TensorRT), then each linear back on its N-D input
        return [TrtLoweringPass(), OvLoweringPass()]
    return [OrtAttentionFusion(), ReshapeSinking()] if fuse_attention else [ReshapeSinking()]


# -- the declaration ----------------------------------------------------------------------------------------------------
def build_stages(cfg: BuildConfig) -> list[Stage]:
    """The stages `vitc build` runs for ``cfg``, in order."""
    stages = [Stage("load", _load, "load", front_end=True)]
    stages += [_pass_stage(p, "float passes", front_end=True)
               for p in float_passes(cfg.target, cfg.fuse, cfg.rotate, cfg.rotate_seed, fc2_hadamard_block(cfg))]
    stages.append(Stage("float check", _float_check, "float check"))
    if cfg.precision is Precision.FP32:
        if cfg.target is Target.ORT and cfg.fuse:  # the same 2-D token stream as the int8 lowering
            stages.append(_pass_stage(ReshapeSinking(), None))
    else:
        stages += [Stage(AnnotatePass.name, _annotate, front_end=True),
                   Stage("plan", _plan, front_end=True),
                   Stage("calibrate", _calibrate, "calibration")]
        if cfg.search:
            stages.append(Stage("range search + migration", _search, "range search + migration",
                                dumps=(ScaleMigrationPass.name,)))
            if cfg.sequential:
                stages.append(Stage("sequential refit", _sequential, "sequential refit"))
        elif cfg.migrate:
            stages += [Stage(ScaleMigrationPass.name, _migrate_fixed, "migration + recalibration",
                             dumps=(ScaleMigrationPass.name,)),
                       Stage("recalibrate", _recalibrate, "migration + recalibration")]
        stages.append(Stage(InsertQDQPass.name, _insert_qdq, "insert_qdq", dumps=(InsertQDQPass.name,)))
        stages += [_pass_stage(p, "insert_qdq") for p in lowering_passes(cfg.target, cfg.fuse and cfg.fuse_attention)]
    stages += [Stage("export", _export),
               Stage(DynamicBatch.name, _dynamic_batch, dumps=(DynamicBatch.name,)),
               Stage("save + check", _save, "save + check")]
    if cfg.target is Target.OPENVINO:
        stages.append(Stage("openvino IR", _openvino_ir, "openvino IR"))
    return stages


def dump_names() -> list[str]:
    """Every name `vitc build --dump-after` accepts: what the stages of any configuration can dump, in build order."""
    names: list[str] = []
    for target, precision, fuse, fuse_attention, search, migrate, rotate, hadamard in itertools.product(
            Target, Precision, (True, False), (True, False), (True, False), (True, False), (False, True), (0, 32)):
        cfg = BuildConfig(model=Path(), outdir=Path(), target=target, precision=precision, fuse=fuse,
                          fuse_attention=fuse_attention, search=search, migrate=migrate, rotate=rotate,
                          fc2_hadamard=hadamard)
        prev = -1
        for name in (n for st in build_stages(cfg) for n in st.dumps):
            if name not in names:
                names.insert(prev + 1, name)  # right after the name that precedes it in this configuration
            prev = names.index(name)
    return names


def artifact_name(cfg: BuildConfig) -> str:
    return FP32_NAME if cfg.precision is Precision.FP32 else INT8_NAME


def _pass_stage(p: GraphPass, seconds: str | None, front_end: bool = False) -> Stage:
    def run(ctx: BuildContext) -> None:
        ctx.results += run_passes(ctx.graph, [p], dumps=ctx.dumps)

    return Stage(p.name, run, seconds, dumps=(p.name,), front_end=front_end)


# -- the stages ---------------------------------------------------------------------------------------------------------
def _load(ctx: BuildContext) -> None:
    cfg = ctx.cfg
    ctx.source = src = load_model(cfg.model, batch=cfg.batch, input_shapes=cfg.input_shapes)
    ctx.graph = gs.import_onnx(src.model)
    ctx.report.update({"source": str(cfg.model), "target": cfg.target.value, "precision": cfg.precision.value,
                       "fuse": cfg.fuse, "batch": cfg.batch, "fixed_dims": src.fixed_dims, "opset": src.opset})


def _float_check(ctx: BuildContext) -> None:
    src = ctx.source
    ctx.report["float_check"] = _verify_float(src.model, export(ctx.graph, src.model), ctx.cfg.calib, src.path,
                                              ctx.scratch)


def _annotate(ctx: BuildContext) -> None:
    res = run_passes(ctx.graph, [AnnotatePass()], quiet=True)[0]  # its counts are in build.json
    ctx.results.append(res)
    ctx.roles = res.artifacts


def _plan(ctx: BuildContext) -> None:
    from vitc.compiler.quant.planner import float_ops

    cfg = ctx.cfg
    # the same default `vitc explain` shows (policy.target_default_policy: trt_policy / ORT default_policy)
    ctx.policy = cfg.policy or target_default_policy(cfg.target.value, cfg.calib.observer)
    ctx.plan = plan_for(ctx.graph, ctx.policy, ctx.roles, cfg.target)
    ctx.float_ops = ctx.report["float_ops"] = float_ops(ctx.graph, ctx.plan, ctx.roles)


def _calibrate(ctx: BuildContext) -> None:
    """Refuses a plan with nothing to quantize (unless --allow-float), then collects the ranges; with the search on,
    also keeps a few samples' activations (the reservoir)."""
    from vitc.compiler.quant.planner import is_rewrite_part, unrecognised_summary

    cfg, plan = ctx.cfg, ctx.plan
    if not plan.quantized():
        what = unrecognised_summary(ctx.float_ops)
        if not cfg.allow_float:
            raise VitcError(f"{cfg.model}: nothing to quantize under policy {plan.policy!r} ({what})",
                            hint="pass --allow-float to write the float-equivalent model anyway, or --precision fp32")
        log.warning("nothing to quantize (%s): the model stays float (--allow-float)", what)
    elif layers := [f for f in ctx.float_ops if not is_rewrite_part(f["node"])]:
        n_un = sum(not f["why"].startswith("policy rule") for f in layers)
        log.info("%d weighted op(s) stay float: %d by the policy, %d not recognised (build.json float_ops)",
                 len(layers), len(layers) - n_un, n_un)
    ctx.moments = new_moments(plan)
    ctx.table, ctx.calib_summary = run_calibration(export(ctx.graph, ctx.source.model), plan, cfg.calib,
                                                   cfg.show_progress, reservoir=ctx.reservoir,
                                                   keep=cfg.search_samples if cfg.search else 0, scratch=ctx.scratch,
                                                   moments=ctx.moments,
                                                   fit_ranges=ctx.fit_ranges if uses_holdout_search(cfg) else None)


def _search(ctx: BuildContext) -> None:
    ctx.graph, ctx.plan, ctx.table, search_report, mig_res, ctx.rounded = refine_ranges(
        ctx.graph, ctx.plan, ctx.table, ctx.reservoir, ctx.policy, ctx.cfg, dumps=ctx.dumps, moments=ctx.moments,
        fit_ranges=ctx.fit_ranges)
    ctx.results.append(mig_res)
    if "weight_rounding" in search_report:
        ctx.report["weight_rounding"] = search_report.pop("weight_rounding")
    ctx.report["search"] = search_report
    ctx.reservoir, ctx.fit_ranges = {}, {}  # not needed past the search
    ctx.moments = None


def _sequential(ctx: BuildContext) -> None:
    if not ctx.rounded:
        log.warning("--sequential: no linear is GPTQ-rounded under policy %r; nothing to refit", ctx.plan.policy)
        return
    ctx.rounded, ctx.report["sequential"] = sequential_weights(ctx.graph, ctx.plan, ctx.table, ctx.rounded,
                                                               ctx.source.model, ctx.cfg, ctx.scratch)


def _migrate_fixed(ctx: BuildContext) -> None:
    cfg, plan = ctx.cfg, ctx.plan
    quantized = {n.node for n in plan.quantized() if n.spec.migrate}
    caps = {n.node: n.spec.max_alpha for n in plan.quantized() if n.spec.max_alpha is not None}
    cam = {k: np.asarray(v.channel_absmax) for k, v in ctx.table.ranges.items() if v.channel_absmax}
    mig = ScaleMigrationPass.from_alpha(cam, ctx.graph, cfg.migrate_alpha, nodes=quantized, caps=caps)
    res = run_passes(ctx.graph, [mig], dumps=ctx.dumps)[0]
    ctx.results.append(res)
    ctx.migration = res.artifacts


def _recalibrate(ctx: BuildContext) -> None:
    """The fixed-strength migration divides activations by per-channel factors: the ranges calibrated before it no
    longer hold for the migrated tensors, so they are collected again on the migrated graph."""
    if ctx.migration is None or not ctx.migration.applied:
        return
    cfg = ctx.cfg
    log.info("recalibrating: the fixed-strength migration (--no-search, --alpha %g) rescaled %d activation(s), "
             "whose calibrated ranges no longer hold", cfg.migrate_alpha, len(ctx.migration.applied))
    ctx.plan = plan_for(ctx.graph, ctx.policy, node_roles(ctx.graph), cfg.target)
    ctx.moments = new_moments(ctx.plan)
    ctx.table, ctx.calib_summary = run_calibration(export(ctx.graph, ctx.source.model), ctx.plan, cfg.calib,
                                                   cfg.show_progress, label="recalibrating", scratch=ctx.scratch,
                                                   moments=ctx.moments)


def _insert_qdq(ctx: BuildContext) -> None:
    cfg, plan = ctx.cfg, ctx.plan
    dyn = frozenset(n.node for n in plan.quantized() if n.role in cfg.dynamic_roles and n.op == "Gemm")
    if ctx.rounded is None and ctx.moments:
        ctx.rounded, ctx.report["weight_rounding"] = gptq_weights(ctx.graph, plan, ctx.moments, cfg)
    qdq = InsertQDQPass(plan, ctx.table, dynamic_nodes=dyn, weight_mse_clip=cfg.weight_mse_clip,
                        pair_safe_weights=uses_pair_safe_weights(cfg), rounded=ctx.rounded or {})
    res = run_passes(ctx.graph, [qdq], dumps=ctx.dumps)[0]
    ctx.results.append(res)
    ctx.report["policy"] = plan.to_json()
    for entry in ctx.report["policy"]["nodes"]:
        entry["qparams"] = res.artifacts.get(entry["node"])
    ctx.report["calibration"] = ctx.calib_summary
    ctx.report["calibration_table"] = ctx.table.to_json()["ranges"]
    if cfg.target is Target.ORT:
        ctx.report["cpu"] = {"requested": cfg.cpu.value, "built_for": resolve_cpu(cfg.cpu).value,
                             "detected": detect_cpu().value, "saturation_guard": uses_pair_safe_weights(cfg)}


def _export(ctx: BuildContext) -> None:
    ctx.model = export(ctx.graph, ctx.source.model)


def _dynamic_batch(ctx: BuildContext) -> None:
    ctx.model, ctx.report["dynamic_batch"] = _restore_batch(ctx)


def _save(ctx: BuildContext) -> None:
    from vitc import __version__

    ctx.model.producer_name = "vitc"
    ctx.model.producer_version = __version__
    if "cpu" in ctx.report and not ctx.report["cpu"]["saturation_guard"]:  # `vitc bench` warns without VNNI
        del_keys = [i for i, p in enumerate(ctx.model.metadata_props) if p.key == CPU_METADATA_KEY]
        for i in reversed(del_keys):
            del ctx.model.metadata_props[i]
        entry = ctx.model.metadata_props.add()
        built = ctx.report["cpu"]["built_for"]
        entry.key, entry.value = CPU_METADATA_KEY, built if built != "avx2" else "no-guard"
    save_and_check(ctx.model, ctx.scratch / artifact_name(ctx.cfg), ctx.source)


OV_AGREEMENT_DB = 20.0  # OpenVINO against ORT's reference Q/DQ execution of the same artifact, on one input


def _ov_agreement_db(onnx_path: Path, ov_sess, feed: dict[str, np.ndarray]) -> float:
    """SQNR between OpenVINO's output and ONNX Runtime's unoptimized (reference Q/DQ) output of the artifact for
    ``feed`` (the first calibration input)."""
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.ort import OrtRuntime

    ref = OrtRuntime().session(str(onnx_path), SessionOptions(threads=1, graph_optimizations=False))
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in ref.run(feed)])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in ov_sess.run(feed)])
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("-inf")  # a NaN/Inf in either output: no agreement
    err = float(((a - b) ** 2).sum())
    return round(float(10 * np.log10(max(float((a ** 2).sum()), 1e-30) / max(err, 1e-30))), 1)


def _openvino_ir(ctx: BuildContext) -> None:
    """The OpenVINO IR of the artifact (OpenVINO's own conversion, weights as stored) and what OpenVINO's CPU plugin
    makes of it: the runtime graph's heavy layers by precision (build.json ``openvino``)."""
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.openvino import InferencePrecision, OpenVinoRuntime, precision_summary, save_ir, version

    onnx_path = ctx.scratch / artifact_name(ctx.cfg)
    xml = save_ir(onnx_path, onnx_path.with_suffix(".xml"))  # model.int8.xml (model.fp32.xml for --precision fp32)
    sess = OpenVinoRuntime(InferencePrecision.F32).session(xml, SessionOptions(threads=1))
    summary = precision_summary(sess.runtime_graph())
    feeds, _ = calibration_feeds(ctx.source.model, ctx.cfg.calib)  # lazy: only the first input is read
    agreement = _ov_agreement_db(onnx_path, sess, next(iter(feeds)))
    ctx.report["openvino"] = {"version": version(), "ir": [xml.name, xml.with_suffix(".bin").name],
                              "runtime_graph_f32": summary,
                              "agreement_with_onnx_db": agreement if np.isfinite(agreement) else None}
    if not agreement >= OV_AGREEMENT_DB:  # NaN-safe
        log.warning("OpenVINO computes the IR differently from the ONNX artifact's Q/DQ semantics (%.1f dB between "
                    "OpenVINO and ONNX Runtime's reference execution on one input, expected > %g): check the IR's "
                    "accuracy on your data (vitc eval %s --reference SOURCE)", agreement, OV_AGREEMENT_DB, xml.name)
    ctx.extra_outputs += [xml.name, xml.with_suffix(".bin").name]
    log.info("OpenVINO IR: %s (%d of %d linear/conv layers run in int8 on this CPU)", xml.name,
             summary["heavy_int8"], summary["heavy_int8"] + summary["heavy_float"])


# -- checks -------------------------------------------------------------------------------------------------------------
def _verify_float(source: onnx.ModelProto, rewritten: onnx.ModelProto, cc: CalibConfig, path: Path,
                  scratch: Path | None) -> dict:
    """The float passes must not change the outputs: compare both models on the first calibration input."""
    from vitc.runtimes.base import SessionOptions

    feeds, _ = calibration_feeds(source, cc)  # lazy: only the first batch is read
    feed = next(iter(feeds))
    try:
        ref_session = ort_session(source, SessionOptions(graph_optimizations=False), scratch)
    except Exception as exc:  # ONNX Runtime refuses the source itself: an invalid graph, an operator it lacks
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load the model ({' '.join(str(exc).split())[-200:]})",
                             hint="check it with onnx.checker.check_model(model, full_check=True)") from None
    ref = ref_session.run(feed)
    out = ort_session(rewritten, SessionOptions(graph_optimizations=False), scratch).run(feed)
    worst = 0.0
    for r, o in zip(ref, out):
        if r.shape != o.shape:
            raise PassError("float passes", f"output shape changed {r.shape} -> {o.shape}",
                            hint="report this model; rerun with --no-fuse to bypass the fusions")
        scale = max(1.0, float(np.abs(r).max()))
        worst = max(worst, float(np.abs(r.astype(np.float64) - o).max()) / scale)
    if not worst <= 1e-3:
        raise PassError("float passes", f"outputs changed by {worst:.2e} (relative to the output range)",
                        hint="rerun with --dump-after all to find the pass; --no-fuse bypasses the fusions")
    return {"max_abs_diff_relative": worst}


def _restore_batch(ctx: BuildContext) -> tuple[onnx.ModelProto, dict]:
    """The artifact with the source's symbolic batch dim back (passes/dynamic_batch.py), checked: samples run one by
    one and stacked must give the same per-sample outputs. Where the pass cannot follow the batch or the check fails,
    the batch-``cfg.batch`` model is kept and the reason recorded."""
    from vitc.runtimes.base import SessionOptions

    cfg, src, model = ctx.cfg, ctx.source, ctx.model
    if not src.batch_symbols:
        return model, {"kept": False, "reason": "the source has no dynamic batch dimension"}
    if not cfg.dynamic_batch or cfg.batch != 1:
        return model, {"kept": False, "reason": f"fixed to batch {cfg.batch} as asked (--batch)"}
    g = ctx.graph.copy()
    res = run_passes(g, [DynamicBatch(src.batch_symbols)], dumps=ctx.dumps)[0]
    if not res.modified:
        log.warning("the artifact keeps batch 1: %s", "; ".join(res.notes))
        ctx.results.append(res)
        return model, {"kept": False, "reason": "; ".join(res.notes)}
    dyn = export(g, src.model)
    dyn.producer_name = model.producer_name
    stack = 3
    try:
        feeds, _ = calibration_feeds(src.model, replace(cfg.calib, samples=stack))
        samples = list(feeds)[:stack]
        sess = ort_session(dyn, SessionOptions(threads=1), ctx.scratch)
        one = [sess.run(f) for f in samples]
        stacked = {k: np.concatenate([f[k] for f in samples]) for k in samples[0]}
        many = sess.run(stacked)
        # the source at the same batch says what shapes any batch must give (a batch-1 slice stays one row)
        source_many = ort_session(onnx.load(str(src.path)), SessionOptions(threads=1, graph_optimizations=False),
                                  ctx.scratch).run(stacked)
        worst = 0.0
        for j, out in enumerate(many):
            ref = np.concatenate([o[j] for o in one])
            if ref.shape != out.shape or out.shape != source_many[j].shape:
                raise ValueError(f"output {j} has shape {out.shape} at batch {stack}, the source gives "
                                 f"{source_many[j].shape}")
            scale = max(1e-6, float(np.abs(ref).max()))
            worst = max(worst, float(np.abs(ref.astype(np.float64) - out).max()) / scale)
        if not worst <= 1e-3:
            raise ValueError(f"per-sample outputs at batch {stack} differ from batch 1 by {worst:.2e}")
    except Exception as exc:
        reason = f"the any-batch graph failed its check ({' '.join(str(exc).split())[:200]})"
        log.warning("the artifact keeps batch 1: %s", reason)
        res.notes.append(reason)
        res.modified = False
        ctx.results.append(res)
        return model, {"kept": False, "reason": reason}
    ctx.results.append(res)
    return dyn, {"kept": True, "symbols": dict(src.batch_symbols), "checked_batch": stack,
                 "max_abs_diff_relative": worst}
