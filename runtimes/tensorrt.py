"""TensorRT runtime: build an engine from vitc's Q/DQ graph, its JSON sidecar, load it, run it.

**No part of this module has run on a GPU.** It is written against the TensorRT 10/11 Python API (strongly typed
networks, ``build_serialized_network``, the tensor-address API ``set_tensor_address`` / ``execute_async_v3``) and
pycuda, and what can be checked without a GPU is tested on CPU (sidecar validation and mismatch messages, the
errors when TensorRT or a GPU is missing, the CLI). ``tensorrt`` and ``pycuda`` are imported inside functions
only, so importing this module never needs them.

Engine build (:func:`build_engine`): the network is strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_
TYPED``; TensorRT 11 makes every network strongly typed), so precisions come from the graph, not from builder
flags: int8 where the Q/DQ say so, and the float regions in the graph's float type. TensorRT refuses the FP16
precision flag on a strongly typed network, so ``fp16=True`` hands the parser a copy of the graph whose float
regions are fp16 (the caller supplies the conversion, :func:`vitc.passes.trt_fp16.to_fp16`); ``fp16=False``
builds exactly what ``trtexec --onnx=model.int8.onnx --stronglyTyped`` builds. A timing cache file is loaded
before and saved after the build.

This module only builds, loads and runs engines: it imports nothing of vitc.compiler or vitc.passes
(tests/test_layering.py). `vitc engine OUTDIR` and the engine step of `vitc build --target trt` are
compiler/tensorrt/engine.py.

The sidecar ``model.engine.json`` records the TensorRT version, GPU name and compute capability, input/output
shapes and build flags: TensorRT engines only load in the TensorRT version and on the GPU model that built them,
and :func:`load_engine` refuses a mismatch with a message saying which and how to rebuild.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from vitc.errors import RuntimeUnavailableError, VitcError

log = logging.getLogger(__name__)

ENGINE_NAME = "model.engine"
SIDECAR_FORMAT = 1
DEFAULT_WORKSPACE_MB = 4096
INSTALL_HINT = "on a machine with an NVIDIA GPU: pip install 'vitc[tensorrt]' (tensorrt>=10 and pycuda)"


class EngineBuildError(VitcError):
    """TensorRT is present but could not parse the graph or build the engine."""

    exit_code = 3


class EngineMismatchError(RuntimeUnavailableError):
    """The engine was built for another TensorRT version or another GPU."""


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(f"{engine_path}.json")


# -- what is there: tensorrt, pycuda, a GPU -------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "8.6"
    index: int = 0


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str  # why not (or what is there)
    tensorrt_version: str | None = None
    device: DeviceInfo | None = None


def import_tensorrt():
    """The ``tensorrt`` module, or RuntimeUnavailableError saying why not."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeUnavailableError(f"tensorrt is not importable ({exc})", hint=INSTALL_HINT) from None
    except Exception as exc:  # e.g. OSError: libnvinfer.so missing behind an installed wheel
        raise RuntimeUnavailableError(f"tensorrt is installed but does not load ({type(exc).__name__}: {exc})",
                                      hint="check the TensorRT libraries match the wheel") from None
    return trt


def _pycuda_driver():
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise RuntimeUnavailableError(f"pycuda is not importable ({exc})", hint=INSTALL_HINT) from None
    except Exception as exc:  # libcuda.so missing: pycuda fails at import
        raise RuntimeUnavailableError(f"no CUDA driver (pycuda: {type(exc).__name__}: {exc})",
                                      hint="this machine has no usable NVIDIA driver") from None
    return cuda


def current_device(index: int = 0) -> DeviceInfo:
    """The CUDA device vitc would use, or RuntimeUnavailableError (no pycuda, no driver, no device)."""
    cuda = _pycuda_driver()
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda.driver.Error / RuntimeError: no driver or no device
        raise RuntimeUnavailableError(f"no CUDA device (CUDA driver: {' '.join(str(exc).split())})",
                                      hint="run on a machine with an NVIDIA GPU and driver") from None
    if count <= index:
        raise RuntimeUnavailableError("no CUDA device" if count == 0 else f"no CUDA device {index} ({count} found)",
                                      hint="run on a machine with an NVIDIA GPU and driver")
    d = cuda.Device(index)
    major, minor = d.compute_capability()
    return DeviceInfo(name=str(d.name()), compute_capability=f"{major}.{minor}", index=index)


def availability() -> Availability:
    """Can this machine build and run TensorRT engines? Never raises."""
    try:
        trt = import_tensorrt()
    except RuntimeUnavailableError as exc:
        return Availability(False, exc.message)
    version = str(trt.__version__)
    try:
        dev = current_device()
    except RuntimeUnavailableError as exc:
        return Availability(False, exc.message, version)
    return Availability(True, f"TensorRT {version} on {dev.name} (compute capability {dev.compute_capability})",
                        version, dev)


# -- the sidecar ------------------------------------------------------------------------------------------------------
@dataclass
class EngineSidecar:
    """What an engine was built with and for (written next to it as ``<engine>.json``)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    flags: dict = field(default_factory=dict)  # strongly_typed, fp16, workspace_mb, timing_cache
    onnx: str = ""
    onnx_sha256: str = ""
    vitc_version: str = ""
    built_at: str = ""
    format: int = SIDECAR_FORMAT

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str = "sidecar") -> "EngineSidecar":
        if not isinstance(data, dict):
            raise VitcError(f"{where}: not a JSON object", hint="rebuild the engine with `vitc engine OUTDIR`")
        names = {f.name for f in fields(cls)}
        required = ("tensorrt_version", "gpu_name", "compute_capability", "inputs", "outputs")
        missing = [k for k in required if k not in data]
        if missing:
            raise VitcError(f"{where}: missing {', '.join(missing)}",
                            hint="rebuild the engine with `vitc engine OUTDIR`")
        if data.get("format", SIDECAR_FORMAT) != SIDECAR_FORMAT:
            raise VitcError(f"{where}: sidecar format {data.get('format')} is not {SIDECAR_FORMAT}",
                            hint="rebuild the engine with this vitc: `vitc engine OUTDIR`")
        for k in ("tensorrt_version", "gpu_name", "compute_capability"):
            if not isinstance(data[k], str) or not data[k]:
                raise VitcError(f"{where}: {k} is not a non-empty string",
                                hint="rebuild the engine with `vitc engine OUTDIR`")
        for k in ("inputs", "outputs"):
            v = data[k]
            if not isinstance(v, dict) or not all(isinstance(s, list) and all(isinstance(d, int) for d in s)
                                                 for s in v.values()):
                raise VitcError(f"{where}: {k} is not a map of tensor name -> shape",
                                hint="rebuild the engine with `vitc engine OUTDIR`")
        return cls(**{k: v for k, v in data.items() if k in names})


def read_sidecar(engine_path: str | os.PathLike) -> EngineSidecar:
    p = sidecar_path(engine_path)
    if not p.is_file():
        raise VitcError(f"{p}: no sidecar next to the engine (vitc records the TensorRT version and GPU there)",
                        hint="rebuild the engine with `vitc engine OUTDIR`")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VitcError(f"{p}: unreadable sidecar ({type(exc).__name__})",
                        hint="rebuild the engine with `vitc engine OUTDIR`") from None
    return EngineSidecar.from_json(data, str(p))


def write_sidecar(engine_path: str | os.PathLike, sidecar: EngineSidecar) -> Path:
    p = sidecar_path(engine_path)
    p.write_text(json.dumps(sidecar.to_json(), indent=2) + "\n", encoding="utf-8")
    return p


def check_compatible(sidecar: EngineSidecar, tensorrt_version: str, device: DeviceInfo,
                     engine: str = ENGINE_NAME) -> None:
    """Raise EngineMismatchError unless the engine was built by this TensorRT version for this GPU model."""
    problems = []
    if sidecar.tensorrt_version != tensorrt_version:
        problems.append(f"it was built with TensorRT {sidecar.tensorrt_version} and this machine has TensorRT "
                        f"{tensorrt_version} (an engine only loads in the TensorRT version that built it)")
    if sidecar.gpu_name != device.name or sidecar.compute_capability != device.compute_capability:
        problems.append(f"it was built for {sidecar.gpu_name} (compute capability {sidecar.compute_capability}) and "
                        f"this GPU is {device.name} (compute capability {device.compute_capability}) (engines are "
                        "tuned for and tied to one GPU model)")
    if problems:
        raise EngineMismatchError(f"refusing to load {engine}: " + "; ".join(problems),
                                  hint="rebuild it on this machine: vitc engine OUTDIR --force")


# -- build ------------------------------------------------------------------------------------------------------------
def default_timing_cache(tensorrt_version: str, device: DeviceInfo) -> Path:
    """One timing cache per TensorRT version and GPU model, shared by every build on this machine."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{device.name}-sm{device.compute_capability}").strip("-")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitc"
    return base / f"trt-{tensorrt_version}-{slug}.timing-cache"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _trt_logger(trt):
    """A TensorRT logger that forwards to vitc's logging (warnings and errors only)."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):  # noqa: D401 - TensorRT's callback
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine built from a dynamic-batch graph accepts (one TensorRT optimization profile):
    any batch in [min, max], kernels tuned for ``opt``."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise VitcError(f"batch profile min {self.min} / opt {self.opt} / max {self.max} is not valid",
                            hint="need 1 <= --min-batch <= --opt-batch <= --max-batch")

    def shapes(self, shape: list[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of an input whose dim 0 is the batch."""
        rest = tuple(int(d) for d in shape[1:])
        return (self.min, *rest), (self.opt, *rest), (self.max, *rest)


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, fp16: bool = True,
                 workspace_mb: int = DEFAULT_WORKSPACE_MB, timing_cache: str | os.PathLike | None = None,
                 to_fp16: Callable | None = None, batch: BatchProfile = BatchProfile()) -> EngineSidecar:
    """Build a strongly typed TensorRT engine from the Q/DQ graph ``onnx_path``; write it and its sidecar.

    ``fp16``: TensorRT parses ``to_fp16(onnx.load(onnx_path))``, the graph with fp16 float regions; the caller
    passes the conversion (:func:`vitc.passes.trt_fp16.to_fp16`, which is what
    :func:`vitc.compiler.tensorrt.engine.build_engine` does), as a runtime imports no passes. ``timing_cache``: a file
    loaded before and saved after the build (None: one per TensorRT version and GPU under ~/.cache/vitc). Raises
    RuntimeUnavailableError without TensorRT/GPU, EngineBuildError if TensorRT cannot parse or build. UNTESTED on
    a GPU (see the module docstring).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if workspace_mb < 1:
        raise VitcError(f"workspace of {workspace_mb} MiB is not valid", hint="give --workspace-mb 1 or more")
    if not onnx_path.is_file():
        raise VitcError(f"{onnx_path}: no such model", hint="build it first: vitc build MODEL --target trt -o OUTDIR")
    if fp16 and to_fp16 is None:
        raise ValueError("build_engine(fp16=True) needs to_fp16, the graph conversion (vitc.passes.trt_fp16.to_fp16; "
                         "vitc.compiler.tensorrt.engine.build_engine passes it)")
    trt = import_tensorrt()
    dev = current_device()
    version = str(trt.__version__)
    cache_path = Path(timing_cache) if timing_cache is not None else default_timing_cache(version, dev)

    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if fp16:
        import onnx

        parsed = parser.parse(to_fp16(onnx.load(str(onnx_path))).SerializeToString(), str(onnx_path))
    else:
        parsed = parser.parse_from_file(str(onnx_path))
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no error reported"
        raise EngineBuildError(f"{onnx_path}: TensorRT {version} cannot parse the graph: {errors}",
                               hint=f"run `vitc check {onnx_path} --target trt` to list rule violations")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    blob = b""
    if cache_path.is_file():
        try:
            blob = cache_path.read_bytes()
        except OSError as exc:
            log.warning("timing cache %s unreadable (%s): starting a new one", cache_path, exc.strerror)
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this TensorRT/GPU: starting a new one", cache_path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    def shapes(n, get):
        return {get(i).name: [int(d) for d in get(i).shape] for i in range(n)}

    inputs = shapes(network.num_inputs, network.get_input)
    outputs = shapes(network.num_outputs, network.get_output)
    dynamic = {n: shp for n, shp in inputs.items() if any(d < 0 for d in shp)}
    for n, shp in dynamic.items():
        if any(d < 0 for d in shp[1:]):
            raise EngineBuildError(f"{onnx_path}: input {n!r} {shp} has a dynamic dim other than the batch",
                                   hint="rebuild the graph with that dim fixed: vitc build --input-shape NAME=...")
    if dynamic:  # one optimization profile over the batch
        profile = builder.create_optimization_profile()
        for n, shp in dynamic.items():
            profile.set_shape(n, *batch.shapes(shp))
        config.add_optimization_profile(profile)
    log.info("building TensorRT %s engine for %s (compute capability %s), strongly typed, float regions %s, "
             "workspace %d MiB", version, dev.name, dev.compute_capability, "fp16" if fp16 else "fp32", workspace_mb)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT {version} built no engine (see the TensorRT errors above)",
                               hint="if they mention memory, raise --workspace-mb")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(engine_path, bytes(memoryview(serialized)))
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    except OSError as exc:
        log.warning("could not save the timing cache %s (%s)", cache_path, exc.strerror)
    from vitc import __version__

    sidecar = EngineSidecar(
        tensorrt_version=version, gpu_name=dev.name, compute_capability=dev.compute_capability,
        inputs=inputs, outputs=outputs,
        flags={"strongly_typed": True, "fp16": bool(fp16), "workspace_mb": int(workspace_mb),
               "timing_cache": str(cache_path),
               **({"batch_profile": {"min": batch.min, "opt": batch.opt, "max": batch.max}} if dynamic else {})},
        onnx=onnx_path.name, onnx_sha256=_sha256(onnx_path), vitc_version=__version__,
        built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    write_sidecar(engine_path, sidecar)
    return sidecar


# -- load and run -----------------------------------------------------------------------------------------------------
@dataclass
class LoadedEngine:
    engine: object  # tensorrt.ICudaEngine
    sidecar: EngineSidecar
    runtime: object  # the tensorrt.Runtime and logger stay referenced as long as the engine
    logger: object


def load_engine(engine_path: str | os.PathLike) -> LoadedEngine:
    """Deserialize ``engine_path``. Refuses an engine whose sidecar names another TensorRT version or GPU."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise VitcError(f"{engine_path}: no such engine", hint="build it: vitc engine OUTDIR")
    sidecar = read_sidecar(engine_path)  # before importing anything: a bad sidecar fails the same everywhere
    trt = import_tensorrt()
    dev = current_device()
    check_compatible(sidecar, str(trt.__version__), dev, engine=str(engine_path))
    logger = _trt_logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise EngineBuildError(f"{engine_path}: TensorRT could not deserialize the engine",
                               hint="rebuild it: vitc engine OUTDIR --force")
    return LoadedEngine(engine, sidecar, runtime, logger)


@dataclass
class _Binding:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    host: np.ndarray
    device: object  # pycuda DeviceAllocation
    dynamic: bool = False  # dim 0 is the batch of the engine's optimization profile


class TrtRunner:
    """Runs a vitc engine: pinned host + device buffers per I/O tensor, one CUDA stream, TensorRT 10's
    tensor-address API. Implements the runtime Session protocol (``input_names``, ``output_names``, ``run``).
    UNTESTED on a GPU."""

    def __init__(self, engine_path: str | os.PathLike):
        trt = import_tensorrt()
        cuda = _pycuda_driver()
        current_device()  # a clear error before pycuda.autoinit raises its own
        import pycuda.autoinit  # noqa: F401 - creates the CUDA context (released at exit)

        self._cuda = cuda
        self._loaded = load_engine(engine_path)
        self.engine, self.sidecar = self._loaded.engine, self._loaded.sidecar
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.inputs: list[_Binding] = []
        self.outputs: list[_Binding] = []
        prof = self.sidecar.flags.get("batch_profile")
        self.max_batch = int(prof["max"]) if prof else None
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
            dynamic = any(d < 0 for d in shape)
            if dynamic:  # the batch: buffers for the profile's largest batch
                if self.max_batch is None or any(d < 0 for d in shape[1:]):
                    raise VitcError(f"{engine_path}: tensor {name!r} has a dynamic shape {list(shape)} and the "
                                    "sidecar names no batch profile", hint="rebuild it with `vitc engine OUTDIR`")
                shape = (self.max_batch, *shape[1:])
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            host = cuda.pagelocked_empty(shape, dtype)
            dev = cuda.mem_alloc(max(host.nbytes, 1))
            self.context.set_tensor_address(name, int(dev))
            b = _Binding(name, shape, dtype, host, dev, dynamic)
            (self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(b)

    @property
    def input_names(self) -> list[str]:
        return [b.name for b in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [b.name for b in self.outputs]

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(stream_handle=self.stream.handle):
            raise VitcError("TensorRT execute_async_v3 failed", hint="rerun with --log-level debug for TensorRT's log")

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        cuda = self._cuda
        for b in self.inputs:
            if b.name not in feeds:
                raise VitcError(f"missing input {b.name!r}", hint=f"the engine takes {self.input_names}")
            x = np.asarray(feeds[b.name])
            if b.dynamic and x.ndim == len(b.shape) and tuple(x.shape[1:]) == b.shape[1:]:
                if not 1 <= x.shape[0] <= self.max_batch:
                    raise VitcError(f"input {b.name!r} has batch {x.shape[0]}, the engine takes 1..{self.max_batch}")
                if not self.context.set_input_shape(b.name, tuple(x.shape)):
                    raise VitcError(f"TensorRT refused input {b.name!r} with shape {list(x.shape)}",
                                    hint=f"the engine's profile takes batch 1..{self.max_batch}")
            elif tuple(x.shape) != b.shape:
                raise VitcError(f"input {b.name!r} has shape {list(x.shape)}, the engine takes {list(b.shape)}")
            host = b.host.reshape(-1)[:x.size].reshape(x.shape)
            np.copyto(host, x.astype(b.dtype, copy=False))
            cuda.memcpy_htod_async(b.device, host, self.stream)
        self._enqueue()
        views = []
        for b in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(b.name))
            view = b.host.reshape(-1)[:int(np.prod(shape))].reshape(shape)
            cuda.memcpy_dtoh_async(view, b.device, self.stream)
            views.append(view)
        self.stream.synchronize()
        return [v.copy() for v in views]

    def time_ms(self, feeds: dict[str, np.ndarray], warmup: int = 10, iters: int = 100) -> list[float]:
        """GPU time of each of ``iters`` executions (CUDA events around the enqueue; inputs copied once)."""
        cuda = self._cuda
        self.run(feeds)
        for _ in range(warmup):
            self._enqueue()
        self.stream.synchronize()
        start, end = cuda.Event(), cuda.Event()
        out = []
        for _ in range(iters):
            start.record(self.stream)
            self._enqueue()
            end.record(self.stream)
            end.synchronize()
            out.append(float(start.time_till(end)))
        return out

    def close(self) -> None:
        for b in self.inputs + self.outputs:
            b.device.free()
        self.inputs, self.outputs = [], []


class TensorRtRuntime:
    """The runtime protocol (runtimes/base.py) for TensorRT engines: ``session`` takes an engine path."""

    name = "trt"

    def available(self) -> tuple[bool, str]:
        a = availability()
        return a.ok, a.reason

    def session(self, model: str | bytes, options=None) -> TrtRunner:
        if isinstance(model, bytes):
            raise VitcError("the TensorRT runtime loads engine files, not ONNX bytes", hint="give an engine path")
        return TrtRunner(model)
