"""OpenVINO (CPU plugin) runtime: compile an ONNX model or an OpenVINO IR (``.xml`` + ``.bin``), run it, report what
the plugin actually executes (the compiled model's runtime graph: each layer's type and precision), save the IR.

OpenVINO is optional (``pip install 'vitc[openvino]'``); it is imported on first use, and a missing install is one
:class:`~vitc.errors.VitcError` line (exit 2) with the install command.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitc.errors import ModelLoadError, VitcError
from vitc.runtimes.base import SessionOptions

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with: pip install 'vitc[openvino]' (or: pip install openvino)"

# the runtime graph's layer types that carry a model's linear / convolution MACs
HEAVY_LAYERS = ("FullyConnected", "MatMul", "Convolution", "GroupConvolution", "Deconvolution")
INT8_PRECISIONS = ("u8", "i8")


class InferencePrecision(enum.Enum):
    """The precision OpenVINO's CPU plugin runs the float parts in. ``AUTO`` is the plugin's own choice, which is
    bf16 on CPUs with AMX or AVX-512 BF16 and f32 elsewhere."""

    AUTO = "auto"
    F32 = "f32"
    BF16 = "bf16"


def _ov():
    try:
        import openvino as ov
    except ImportError as exc:
        raise VitcError(f"OpenVINO is not installed ({exc})", hint=INSTALL_HINT) from None
    return ov


def require() -> None:
    """Raise the one-line :class:`VitcError` (with the install command) when OpenVINO is missing."""
    _ov()


def version() -> str:
    return _ov().__version__


def available() -> tuple[bool, str]:
    try:
        return True, f"openvino {version()}"
    except VitcError as exc:
        return False, str(exc)


def read_model(model: str | Path):
    """An ``ov.Model`` from an ONNX file or an IR ``.xml``; a model OpenVINO rejects is one
    :class:`ModelLoadError` line naming what it rejected."""
    ov = _ov()
    if not Path(model).is_file():
        raise ModelLoadError(f"{model}: no such model file")
    try:
        return ov.Core().read_model(str(model))
    except Exception as exc:  # OpenVINO raises RuntimeError / OVException with a multi-line message
        raise ModelLoadError(f"{model}: OpenVINO cannot read the model: {_first_line(exc)}",
                             hint="check that the model is valid ONNX (vitc check) and its ops are in "
                                  "OpenVINO's ONNX frontend") from None


def _first_line(exc: BaseException) -> str:
    """One line from OpenVINO's multi-line message: its summary of failed operations when it has one, else the
    node it was validating and why, else its first line that is not a source location."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if "Summary:" in lines:
        return "; ".join(ln.lstrip("- ") for ln in lines[lines.index("Summary:") + 1:])[:400]
    node = next((k for k, ln in enumerate(lines) if ln.startswith("While validating")), None)
    if node is not None:
        return " ".join(lines[node:node + 2])[:400]
    useful = [ln for ln in lines if not ln.startswith("Exception from") and not ln.startswith("Check ")]
    return (useful or lines or [type(exc).__name__])[0][:400]


def compile_config(options: SessionOptions, precision: InferencePrecision = InferencePrecision.AUTO) -> dict:
    """The CPU plugin's properties for ``options``: latency hint, one stream, ``threads`` inference threads."""
    cfg: dict = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if options.threads:
        cfg["INFERENCE_NUM_THREADS"] = str(options.threads)
    if precision is not InferencePrecision.AUTO:
        cfg["INFERENCE_PRECISION_HINT"] = precision.value
    return cfg


@dataclass
class OvSession:
    compiled: object
    request: object
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        res = self.request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        ports = self.compiled.outputs if outputs is None else [self.compiled.output(n) for n in outputs]
        return [np.asarray(res[p]).copy() for p in ports]

    def runtime_graph(self) -> list[dict]:
        return runtime_layers(self.compiled)


def _port_name(port) -> str:
    try:
        return port.get_any_name()
    except RuntimeError:  # an unnamed port
        return port.get_node().get_friendly_name()


class OpenVinoRuntime:
    name = "openvino"

    def __init__(self, precision: InferencePrecision = InferencePrecision.AUTO):
        self.precision = precision

    def available(self) -> tuple[bool, str]:
        return available()

    def session(self, model: str | Path, options: SessionOptions = SessionOptions()) -> OvSession:
        ov = _ov()
        m = read_model(model)
        core = ov.Core()
        try:
            compiled = core.compile_model(m, "CPU", compile_config(options, self.precision))
        except Exception as exc:
            raise ModelLoadError(f"{model}: OpenVINO's CPU plugin cannot compile the model: "
                                 f"{_first_line(exc)}", hint="the layer named is one OpenVINO rejects") from None
        return OvSession(compiled, compiled.create_infer_request(),
                         [p.get_node().get_friendly_name() for p in compiled.inputs],
                         [_port_name(p) for p in compiled.outputs])


def runtime_layers(compiled) -> list[dict]:
    """The compiled model's runtime graph: one entry per executed layer (name, type, precision, fused ops)."""
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()

        def get(key: str, rt=rt) -> str:
            v = rt[key] if key in rt else ""
            return v.astype(str) if hasattr(v, "astype") else str(v)

        out.append({"name": op.get_friendly_name(), "type": get("layerType"), "precision": get("runtimePrecision"),
                    "fused": [s for s in get("originalLayersNames").split(",") if s]})
    return out


def precision_summary(layers: list[dict]) -> dict:
    """What the plugin runs in int8: the heavy layers (FullyConnected, MatMul, convolutions) by type and precision,
    and their counts in int8 and in float."""
    heavy = [lay for lay in layers if lay["type"] in HEAVY_LAYERS]
    by = Counter(f"{lay['type']}:{lay['precision']}" for lay in heavy)
    int8 = sum(1 for lay in heavy if lay["precision"] in INT8_PRECISIONS)
    return {"heavy_int8": int8, "heavy_float": len(heavy) - int8, "heavy_by_precision": dict(sorted(by.items())),
            "layers": len(layers), "by_type": dict(sorted(Counter(lay["type"] for lay in layers).items()))}


def save_ir(model: str | Path, xml_path: Path) -> Path:
    """Convert ``model`` to OpenVINO IR (``xml_path`` and the ``.bin`` beside it), weights kept as stored (no fp16
    compression: int8 weights stay int8, float ones stay f32)."""
    ov = _ov()
    m = read_model(model)
    ov.save_model(m, str(xml_path), compress_to_fp16=False)
    return xml_path


def input_specs(model: str | Path) -> list[tuple[str, tuple[int | None, ...], str]]:
    """(name, dims with None for a dynamic dim, numpy dtype name) of each input of an ONNX or IR model."""
    out = []
    for p in read_model(model).inputs:
        dims = tuple(None if d.is_dynamic else d.get_length() for d in p.get_partial_shape())
        out.append((p.get_node().get_friendly_name(), dims, np.dtype(p.get_element_type().to_dtype()).name))
    return out
