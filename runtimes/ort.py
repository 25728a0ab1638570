"""ONNX Runtime (CPU) runtime. The only place that imports onnxruntime besides the TensorRT-free tests."""

from __future__ import annotations

import logging
from collections.abc import Callable
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


def _optimizing_options(ort, threads: int):
    """Session options with every ORT graph optimization, sequential execution, ``threads`` intra-op threads."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


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
        so = _optimizing_options(ort, threads)
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


# Kernels that multiply by a weight, as ORT names them after its graph optimizations: op -> (int8?, index of the
# weight input, index of the activation input).
_LINEAR_KERNELS = {
    "QGemm": (True, 3, 0), "QLinearMatMul": (True, 3, 0), "MatMulInteger": (True, 1, 0),
    "MatMulIntegerToFloat": (True, 1, 0), "DynamicQuantizeMatMul": (True, 1, 0), "QAttention": (True, 1, 0),
    "QLinearConv": (True, 3, 0), "ConvInteger": (True, 1, 0),
    "MatMul": (False, 1, 0), "FusedMatMul": (False, 1, 0), "Gemm": (False, 1, 0), "Attention": (False, 1, 0),
    "Conv": (False, 1, 0), "FusedConv": (False, 1, 0), "FusedGemm": (False, 1, 0), "NhwcFusedConv": (False, 1, 0),
}


def _macs(op: str, attrs: dict, shapes_in: list[list[int]], shapes_out: list[list[int]], w: list[int]) -> int:
    out = shapes_out[0] if shapes_out else []
    numel = int(np.prod(out)) if out else 0
    if op in ("Conv", "FusedConv", "NhwcFusedConv", "QLinearConv", "ConvInteger"):
        return numel * int(np.prod(w[1:]))  # per output: Cin/group x kernel
    if op in ("QAttention", "Attention"):
        x = shapes_in[0]
        return int(np.prod(x)) * int(w[-1])  # the fused q, k, v projection (the attention core is not a linear)
    k = shapes_in[0][-1] if shapes_in and shapes_in[0] else 0
    if op in ("Gemm", "FusedGemm") and attrs.get("transA"):
        k = shapes_in[0][0]
    return numel * int(k)


def kernel_census(model: str | bytes, feeds: dict[str, np.ndarray], threads: int = 0,
                  exclude: Callable[[str], bool] | None = None) -> dict:
    """What ORT's CPU provider runs for the weighted layers of ``model`` after its graph optimizations, with the
    real shapes of one inference (its profiler): every MatMul/Gemm/Conv-like kernel whose weight is a constant, its
    op, whether it is an int8 kernel, and its multiply-accumulates. Returns ``{"int8_macs", "float_macs",
    "int8_share", "float_nodes": [(name, op, macs)], "ops": {op: count}, "excluded_macs"}``; the attention core
    (two activations multiplied) is not counted, nor the nodes whose name ``exclude`` accepts (float parts of exact
    rewrites, not model layers: their multiply-accumulates are ``excluded_macs``)."""
    import json
    import shutil
    import tempfile

    import onnx

    ort = _ort()
    tmp = tempfile.mkdtemp(prefix="vitc-census-")
    try:
        so = _optimizing_options(ort, threads)
        so.optimized_model_filepath = f"{tmp}/optimized.onnx"
        so.enable_profiling = True
        so.profile_file_prefix = f"{tmp}/ort"
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
        opt = onnx.load(f"{tmp}/optimized.onnx", load_external_data=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    consts = {t.name for t in opt.graph.initializer}
    consts |= {o for n in opt.graph.node if n.op_type == "Constant" for o in n.output}
    # a weight ORT left as DequantizeLinear(constant) still multiplies in float: count it as a float weight
    consts |= {n.output[0] for n in opt.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts}
    nodes = {n.name: n for n in opt.graph.node}
    producer = {o: n for n in opt.graph.node for o in n.output}
    dims = {t.name: list(t.dims) for t in opt.graph.initializer}
    res = {"int8_macs": 0, "float_macs": 0, "float_nodes": [], "ops": {}, "excluded_macs": 0}
    seen = set()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        op = args.get("op_name", "")
        name = e["name"][: -len("_kernel_time")]
        if op not in _LINEAR_KERNELS or name in seen or name not in nodes:
            continue
        seen.add(name)
        int8, wi, _ = _LINEAR_KERNELS[op]
        node = nodes[name]
        if wi >= len(node.input) or node.input[wi] not in consts:
            continue  # both operands are activations: the attention core, not a linear layer
        shapes_in = [next(iter(d.values())) for d in args.get("input_type_shape", [])]
        shapes_out = [next(iter(d.values())) for d in args.get("output_type_shape", [])]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = dims.get(node.input[wi]) or (shapes_in[wi] if wi < len(shapes_in) else [])
        if not w:
            dq = producer.get(node.input[wi])
            w = dims.get(dq.input[0], []) if dq is not None else []
        macs = _macs(op, attrs, shapes_in, shapes_out, w)
        if exclude is not None and exclude(name):
            res["excluded_macs"] += macs
            continue
        res["int8_macs" if int8 else "float_macs"] += macs
        res["ops"][op] = res["ops"].get(op, 0) + 1
        if not int8:
            res["float_nodes"].append((name, op, macs))
    total = res["int8_macs"] + res["float_macs"]
    res["int8_share"] = res["int8_macs"] / total if total else 0.0
    res["float_nodes"].sort(key=lambda t: -t[2])
    return res
