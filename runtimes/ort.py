"""ONNX Runtime (CPU) runtime. The only place that imports onnxruntime besides the TensorRT-free tests."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from vitc.runtimes.base import SessionOptions

log = logging.getLogger(__name__)


def _ort():
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # ORT's own optimizer warnings are noise for users of vitc
    return ort


def quiet() -> None:
    """Silence ORT's C++ logger (graphsurgeon's constant folding runs ORT too)."""
    _ort()


def version() -> str:
    return _ort().__version__


@dataclass
class OrtSession:
    sess: object

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.sess.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.sess.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        return self.sess.run(outputs, feeds)


class OrtRuntime:
    name = "ort"

    def available(self) -> tuple[bool, str]:
        try:
            return True, f"onnxruntime {version()}"
        except ImportError as exc:  # pragma: no cover - core dependency
            return False, str(exc)

    def session(self, model: str | bytes, options: SessionOptions = SessionOptions()) -> OrtSession:
        ort = _ort()
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if options.threads:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if options.graph_optimizations
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if options.optimized_model_path:
            so.optimized_model_filepath = options.optimized_model_path
        return OrtSession(ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]))


def profile_op_types(model: str | bytes, feeds: dict[str, np.ndarray], threads: int = 0, runs: int = 20,
                     warmup: int = 5) -> dict[str, dict]:
    """Time per operator type with ORT's profiler: op type (after ORT's graph optimizations, e.g. QGemm,
    MatMulIntegerToFloat, LayerNormalization) -> {"ms": mean ms per run, "nodes": kernels of that type}.

    The profiler's JSON goes to a private temporary folder that is removed afterwards."""
    import json
    import shutil
    import tempfile

    ort = _ort()
    tmp = tempfile.mkdtemp(prefix="vitc-profile-")
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        for _ in range(warmup):
            sess.run(None, feeds)
        so.enable_profiling = True
        so.profile_file_prefix = f"{tmp}/ort"
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, feeds)
        path = sess.end_profiling()
        with open(path) as f:
            events = json.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total: dict[str, float] = {}
    nodes: dict[str, set] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        total[op] = total.get(op, 0.0) + e.get("dur", 0) / 1000.0
        nodes.setdefault(op, set()).add(e["name"])
    return {op: {"ms": ms / runs, "nodes": len(nodes[op])} for op, ms in sorted(total.items(), key=lambda kv: -kv[1])}
