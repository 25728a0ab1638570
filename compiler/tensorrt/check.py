"""`vitc check MODEL.onnx --target trt`: does a Q/DQ graph follow TensorRT's explicit-quantization rules?

Works on any ONNX model (vitc's or another tool's), on CPU, without TensorRT. Each violation names the node and
the rule. The rules (../shared/research/anchors.md, section 2; TensorRT's IQuantizeLayer/IDequantizeLayer
documentation and its Q/DQ placement guide):

- Q/DQ are symmetric int8: zero-point present, constant and all zero, typed int8 (ONNX's default for a missing
  zero-point is uint8); scales constant, finite and > 0; DequantizeLinear takes only quantized types (an int32
  bias DQ is rejected by TensorRT's ONNX parser); every activation Q feeds DQs only, with the same scale.
- Activations are per-tensor; per-channel scales only on constant weights, on the output-channel axis (Conv 0,
  ConvTranspose 1, Gemm 0 with transB=1 else 1, MatMul the last axis).
- A quantized weighted op (Conv/ConvTranspose/Gemm/MatMul) has Q/DQ on all its inputs; its output is not
  quantized unless the consumer is another quantized op (a Q/DQ pair that ends in GELU, LayerNorm, a bias Add...
  forces an int8 output and blocks the op + epilogue fusion).
- LayerNorm, Softmax and GELU stay float: no DQ feeds them.
- Attention (MatMul -> [scale/mask] -> Softmax -> MatMul): Q/DQ on both inputs of the first batched MatMul
  (QK^T), none between it and the Softmax, Q/DQ after the Softmax and on V (both inputs of the second), so
  TensorRT's fused int8 MHA applies. Its size limits (head size 16/32/64, sequence <= 512) are reported as notes.
  An attention with no Q/DQ at all is fine (a note: TensorRT fuses it as fp16 MHA); a half-quantized one (e.g.
  ORT's policy: int8 QK^T, float attention x V) fuses neither way and is an error.
- The skip input of a residual Add that follows a quantized linear (through shape ops and a LayerScale Mul) is
  quantized, so TensorRT fuses the Add into the GEMM. Left float it is a *warning* (a missed fusion, the graph is
  still valid): vitc's accuracy-first TensorRT policy keeps it float on purpose.

Exit codes of `vitc check`: 0 no errors (warnings allowed), 1 errors, 2 unreadable model.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, numpy_helper

from vitc.passes.attention import find_cores

log = logging.getLogger(__name__)


class TrtRule(enum.Enum):
    NO_QDQ = "no Q/DQ nodes"
    OPSET = "opset below 13"
    ZERO_POINT = "non-zero zero point"
    UINT8 = "uint8 activation"
    QTYPE = "type TensorRT cannot dequantize"
    SCALE = "invalid scale"
    UNPAIRED = "unpaired Q/DQ"
    PAIR_MISMATCH = "Q/DQ pair scale mismatch"
    PER_CHANNEL_ACT = "per-channel activation"
    WEIGHT_AXIS = "weight per-channel axis wrong"
    WEIGHTED_INPUT = "weighted op input not quantized"
    OUTPUT_QDQ = "dangling Q/DQ after weighted op output blocks fusion"
    FLOAT_OP = "float-only op input quantized"
    BMM1 = "attention BMM1 input not quantized"
    BMM1_SOFTMAX = "Q/DQ between attention BMM1 and Softmax blocks MHA fusion"
    BMM2 = "attention BMM2 input not quantized"
    RESIDUAL = "residual Add input not quantized"
    CONTRIB_OP = "ONNX Runtime contrib op"


# A graph that breaks these rules is still a valid TensorRT graph: it only misses a fusion it could have had
# (a float skip input: the Add runs as its own fp16 kernel). vitc leaves it float on purpose when quantizing it
# costs too much accuracy (trt_policy(quantize_residual=False)), so it is a warning, not a failure.
WARNING_RULES = frozenset({TrtRule.RESIDUAL})


@dataclass(frozen=True)
class Violation:
    node: str
    rule: TrtRule
    detail: str

    @property
    def is_warning(self) -> bool:
        return self.rule in WARNING_RULES

    def __str__(self) -> str:
        return f"{'warning: ' if self.is_warning else ''}{self.node}: {self.rule.value}: {self.detail}"

    def to_json(self) -> dict:
        return {"node": self.node, "rule": self.rule.value, "detail": self.detail,
                "severity": "warning" if self.is_warning else "error"}


@dataclass
class CheckReport:
    violations: list[Violation] = field(default_factory=list)  # errors and warnings
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # what was looked at

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if not v.is_warning]

    @property
    def warnings(self) -> list[Violation]:
        return [v for v in self.violations if v.is_warning]

    @property
    def ok(self) -> bool:
        """No errors (warnings are missed fusions, not broken rules)."""
        return not self.errors

    def by_rule(self) -> dict[str, int]:
        return dict(Counter(v.rule.value for v in self.violations))

    def to_json(self) -> dict:
        return {"ok": self.ok, "violations": [v.to_json() for v in self.violations], "notes": list(self.notes),
                "counts": dict(self.counts), "by_rule": self.by_rule()}


WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ = ("QuantizeLinear", "DequantizeLinear")
SHAPE_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
# ops TensorRT runs (or moves Q/DQ across) in int8: a DQ may feed them
INT8_DATA_OPS = SHAPE_OPS + ("Concat", "Slice", "Gather", "Split", "MaxPool", "AveragePool", "GlobalAveragePool",
                             "GlobalMaxPool", "Resize", "Pad", "Identity", "Expand", "Tile", "DepthToSpace",
                             "SpaceToDepth")
FLOAT_ONLY = {"LayerNormalization": "LayerNorm", "SkipLayerNormalization": "LayerNorm",
              "SimplifiedLayerNormalization": "LayerNorm", "GroupNormalization": "GroupNorm",
              "InstanceNormalization": "InstanceNorm", "Softmax": "Softmax", "LogSoftmax": "Softmax",
              "Gelu": "GELU", "FastGelu": "GELU", "BiasGelu": "GELU", "Erf": "GELU (Erf)", "Tanh": "Tanh",
              "ReduceMean": "LayerNorm (decomposed)", "Sqrt": "LayerNorm (decomposed)", "Pow": "Pow"}
ALLOWED_QTYPES = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN}
WEIGHT_ONLY_QTYPES = {TensorProto.INT4}
MHA_HEAD_SIZES = (16, 32, 64)
MHA_MAX_SEQ = 512


class _Graph:
    """Producer/consumer maps, constants and static shapes of a model's main graph."""

    def __init__(self, model: onnx.ModelProto):
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # best effort: shapes are only used for notes and axis sizes
            pass
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.names = {id(n): (n.name or f"<{n.op_type} #{i}>") for i, n in enumerate(self.nodes)}
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in g.output}
        self.consts: dict[str, np.ndarray] = {}
        self.const_types: dict[str, int] = {}
        for t in g.initializer:
            self.consts[t.name] = numpy_helper.to_array(t)
            self.const_types[t.name] = t.data_type
        for n in self.nodes:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
                        self.const_types[n.output[0]] = a.t.data_type
                    elif a.name in ("value_float", "value_floats"):
                        self.consts[n.output[0]] = np.asarray(a.f if a.name == "value_float" else list(a.floats),
                                                              np.float32)
                        self.const_types[n.output[0]] = TensorProto.FLOAT
        self.shapes: dict[str, list[int | None]] = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]

    def name(self, n: onnx.NodeProto) -> str:
        return self.names[id(n)]

    def prod(self, t: str) -> onnx.NodeProto | None:
        return self.producer.get(t)

    def is_const(self, t: str) -> bool:
        return t in self.consts

    def is_dq(self, t: str) -> bool:
        p = self.prod(t)
        return p is not None and p.op_type == "DequantizeLinear"

    def dq_of_activation(self, t: str) -> bool:
        """``t`` is a DQ output whose quantized input is computed (not a constant weight)."""
        p = self.prod(t)
        return p is not None and p.op_type == "DequantizeLinear" and not self.const_source(p.input[0])

    def const_source(self, t: str) -> bool:
        """``t`` is a constant, or a Q of a constant (weights quantized at build time)."""
        if self.is_const(t):
            return True
        p = self.prod(t)
        return p is not None and p.op_type == "QuantizeLinear" and self.is_const(p.input[0])

    def is_weight(self, t: str) -> bool:
        """``t`` is a constant or the DQ of a constant (through Q or not)."""
        if self.is_const(t):
            return True
        p = self.prod(t)
        return p is not None and p.op_type == "DequantizeLinear" and self.const_source(p.input[0])


def _attr(n: onnx.NodeProto, name: str, default=None):
    for a in n.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def check_model(model: onnx.ModelProto) -> CheckReport:
    """Every violation of TensorRT's explicit-quantization rules in ``model`` (a loaded ONNX ModelProto)."""
    rep = CheckReport()
    g = _Graph(model)
    v = rep.violations

    def add(node: onnx.NodeProto | str, rule: TrtRule, detail: str) -> None:
        v.append(Violation(node if isinstance(node, str) else g.name(node), rule, detail))

    qs = [n for n in g.nodes if n.op_type == "QuantizeLinear"]
    dqs = [n for n in g.nodes if n.op_type == "DequantizeLinear"]
    rep.counts = {"QuantizeLinear": len(qs), "DequantizeLinear": len(dqs)}
    opset = _opset(model)
    if opset < 13:
        add("<model>", TrtRule.OPSET, f"opset {opset}: per-channel Q/DQ needs opset 13 or newer")
    if not qs and not dqs:
        add("<model>", TrtRule.NO_QDQ, "the graph has no QuantizeLinear/DequantizeLinear: nothing runs in int8 "
                                       "(build it with vitc build --target trt)")
        return rep
    for n in qs + dqs:
        src = g.prod(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if src is None or src.op_type != "QuantizeLinear":  # a DQ after a Q: its Q is checked (and the pair)
            _check_qdq_params(g, n, add)
    for n in qs:
        _check_q(g, n, add)
    for n in dqs:
        _check_dq(g, n, add)
    for n in g.nodes:
        if n.op_type in WEIGHTED:
            _check_weighted(g, n, add)
        if n.domain not in ("", "ai.onnx"):  # e.g. an ORT build's com.microsoft.QAttention / Gelu
            add(n, TrtRule.CONTRIB_OP, f"{n.domain}.{n.op_type} is not an ONNX op TensorRT's parser knows "
                                       "(build with --target trt)")
    _check_attention(g, add, rep)
    _check_residuals(g, add)
    rep.counts["weighted ops"] = sum(n.op_type in WEIGHTED for n in g.nodes)
    return rep


# -- the rules ----------------------------------------------------------------------------------------------------
def _check_qdq_params(g: _Graph, n: onnx.NodeProto, add) -> None:
    scale = n.input[1] if len(n.input) > 1 else ""
    zp = n.input[2] if len(n.input) > 2 else ""
    if not g.is_const(scale):
        add(n, TrtRule.SCALE, f"scale {scale!r} is not a constant")
    else:
        s = g.consts[scale].astype(np.float64)
        if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
            worst = np.nanmin(s) if s.size and not np.all(np.isnan(s)) else "nan/empty"
            add(n, TrtRule.SCALE, f"scale {scale!r} has values <= 0 or non-finite (min {worst}): TensorRT needs "
                                  "finite scales > 0")
    if not zp:
        if n.op_type == "QuantizeLinear":
            out_dtype = _attr(n, "output_dtype", 0)
            if out_dtype in (0, TensorProto.UINT8):
                add(n, TrtRule.UINT8, "no zero point: ONNX's QuantizeLinear then outputs uint8; give an int8 zero "
                                      "point of 0")
        return
    if not g.is_const(zp):
        add(n, TrtRule.ZERO_POINT, f"zero point {zp!r} is not a constant")
        return
    z = g.consts[zp]
    ztype = g.const_types.get(zp)
    if n.op_type == "DequantizeLinear" and g.is_const(n.input[0]):
        pass  # a constant's type is checked from the constant itself (_check_dq)
    elif ztype == TensorProto.UINT8:
        add(n, TrtRule.UINT8, f"zero point {zp!r} is uint8 (asymmetric uint8 quantization); TensorRT quantizes to "
                              "int8 only")
    elif ztype not in ALLOWED_QTYPES and not (ztype in WEIGHT_ONLY_QTYPES and g.const_source(n.input[0])):
        add(n, TrtRule.QTYPE, f"zero point {zp!r} is {TensorProto.DataType.Name(ztype) if ztype else '?'}: "
                              "TensorRT quantizes to int8 (or fp8), not this type")
    if np.any(z.astype(np.float64) != 0):
        nz = z[z != 0]
        add(n, TrtRule.ZERO_POINT, f"zero point {zp!r} = {nz.ravel()[:4].tolist()}: TensorRT quantization is "
                                   "symmetric, zero points must all be 0")


def _check_q(g: _Graph, n: onnx.NodeProto, add) -> None:
    x, y = n.input[0], n.output[0]
    activation = not g.is_const(x)
    scale = n.input[1] if len(n.input) > 1 else ""
    if activation and g.is_const(scale) and g.consts[scale].size > 1:
        add(n, TrtRule.PER_CHANNEL_ACT, f"activation {x!r} has {g.consts[scale].size} scales (axis "
                                        f"{_attr(n, 'axis', 1)}): TensorRT quantizes activations per tensor")
    if y in g.graph_outputs:
        add(n, TrtRule.UNPAIRED, f"quantized tensor {y!r} is a graph output; end the graph in float")
    for c in g.consumers.get(y, []):
        if c.op_type != "DequantizeLinear":
            add(n, TrtRule.UNPAIRED, f"Q output {y!r} feeds {c.op_type} {g.name(c)}, not a DequantizeLinear")
            continue
        for k, what in ((1, "scale"), (2, "zero point")):
            a = n.input[k] if len(n.input) > k else ""
            b = c.input[k] if len(c.input) > k else ""
            if a == b or not (g.is_const(a) and g.is_const(b)):
                continue
            va, vb = g.consts[a], g.consts[b]
            if va.shape != vb.shape or not np.array_equal(va, vb):
                add(c, TrtRule.PAIR_MISMATCH, f"{what} {b!r} differs from its QuantizeLinear's {a!r}")


def _check_dq(g: _Graph, n: onnx.NodeProto, add) -> None:
    x = n.input[0]
    if g.is_const(x):
        t = g.const_types.get(x)
        if t not in ALLOWED_QTYPES and t not in WEIGHT_ONLY_QTYPES and t != TensorProto.UINT8:
            add(n, TrtRule.QTYPE, f"dequantizes {TensorProto.DataType.Name(t) if t else '?'} constant {x!r}"
                                  + (" (an int32 bias?): TensorRT only dequantizes int8/fp8/int4 and fuses a float "
                                     "bias itself" if t == TensorProto.INT32 else ": TensorRT cannot"))
        elif t == TensorProto.UINT8 and len(n.input) < 3:
            add(n, TrtRule.UINT8, f"dequantizes uint8 constant {x!r}: TensorRT takes int8")
    else:
        p = g.prod(x)
        if p is None or p.op_type != "QuantizeLinear":
            add(n, TrtRule.UNPAIRED, f"input {x!r} is neither a QuantizeLinear output nor a constant")
    if g.const_source(x):
        return
    for c in g.consumers.get(n.output[0], []):
        if c.op_type in FLOAT_ONLY:
            add(c, TrtRule.FLOAT_OP, f"{FLOAT_ONLY[c.op_type]} input {n.output[0]!r} comes from a DequantizeLinear: "
                                     f"{FLOAT_ONLY[c.op_type]} stays float (fp16/fp32) in TensorRT")


def _expected_weight_axis(node: onnx.NodeProto, rank: int) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return rank - 1
    return None


def _weight_shape(g: _Graph, t: str) -> tuple | None:
    p = g.prod(t)
    if p is None or p.op_type != "DequantizeLinear":
        return None
    src = p.input[0]
    if g.is_const(src):
        return g.consts[src].shape
    q = g.prod(src)
    if q is not None and q.op_type == "QuantizeLinear" and g.is_const(q.input[0]):
        return g.consts[q.input[0]].shape
    return None


def _check_weighted(g: _Graph, n: onnx.NodeProto, add) -> None:
    ins = [i for i in n.input[:2] if i]
    if len(ins) < 2:
        return
    quantized = [g.is_dq(i) for i in ins]
    if any(quantized) and not all(quantized):
        for i, (t, q) in enumerate(zip(ins, quantized)):
            if not q:
                kind = "weight" if g.is_const(t) else "input"
                add(n, TrtRule.WEIGHTED_INPUT, f"{kind} {i} ({t!r}) is float while input {1 - i} is quantized: "
                                               "TensorRT needs Q/DQ on all inputs of a quantized "
                                               f"{n.op_type} (else it runs in float)")
    # per-channel weight axis
    w = ins[1] if n.op_type != "Gemm" or not _attr(n, "transA", 0) else None
    if w is not None and g.is_weight(w) and g.is_dq(w):
        dq = g.prod(w)
        shape = _weight_shape(g, w)
        scale = dq.input[1] if len(dq.input) > 1 else ""
        if shape is not None and g.is_const(scale) and g.consts[scale].size > 1:
            rank = len(shape)
            axis = _attr(dq, "axis", 1)
            axis = axis + rank if axis < 0 else axis
            want = _expected_weight_axis(n, rank)
            if want is not None and axis != want:
                add(dq, TrtRule.WEIGHT_AXIS, f"weight of {n.op_type} {g.name(n)} with shape {list(shape)} has "
                                             f"per-channel scales on axis {axis}; TensorRT needs the output-channel "
                                             f"axis {want}")
            elif want is not None and shape[want] != g.consts[scale].size:
                add(dq, TrtRule.WEIGHT_AXIS, f"{g.consts[scale].size} scales for axis {want} of size {shape[want]}")
    # a quantized weighted op's output is not re-quantized unless its consumer is another quantized op
    if all(quantized):
        _check_output_qdq(g, n, add)


def _downstream_qs(g: _Graph, t: str, depth: int = 4) -> list[onnx.NodeProto]:
    """QuantizeLinear nodes reached from ``t`` through shape-only ops."""
    out, frontier = [], [t]
    for _ in range(depth + 1):
        nxt = []
        for tt in frontier:
            for c in g.consumers.get(tt, []):
                if c.op_type == "QuantizeLinear":
                    out.append(c)
                elif c.op_type in SHAPE_OPS:
                    nxt.extend(c.output)
        frontier = nxt
    return out


def _quantized_consumer(g: _Graph, c: onnx.NodeProto) -> bool:
    if c.op_type in WEIGHTED or c.op_type in INT8_DATA_OPS:
        return True
    if c.op_type == "Add":  # a residual Add whose other input comes from a (fusable) weighted op
        return any(_weighted_producer(g, i) is not None for i in c.input if i)
    return False


def _check_output_qdq(g: _Graph, n: onnx.NodeProto, add) -> None:
    for q in _downstream_qs(g, n.output[0]):
        for dq in g.consumers.get(q.output[0], []):
            if dq.op_type != "DequantizeLinear":
                continue
            for c in g.consumers.get(dq.output[0], []):
                if not _quantized_consumer(g, c):
                    add(q, TrtRule.OUTPUT_QDQ, f"quantizes the output of {n.op_type} {g.name(n)} for "
                                               f"{c.op_type} {g.name(c)}, which runs in float: {n.op_type} "
                                               f"must write int8 and cannot fuse {c.op_type}; drop this Q/DQ")


def _weighted_producer(g: _Graph, t: str, depth: int = 4) -> onnx.NodeProto | None:
    """A quantized Conv/Gemm/MatMul-with-constant-weight producing ``t``, through shape ops and a scaling by a
    constant (LayerScale), which TensorRT fuses into the GEMM epilogue with the Add."""
    p = None
    for _ in range(depth + 1):
        p = g.prod(t)
        if p is None or p.op_type in WEIGHTED:
            break
        acts = [i for i in p.input if i and not g.is_const(i)]
        if len(acts) != 1 or not (p.op_type in SHAPE_OPS or p.op_type == "Mul"
                                  or (p.op_type == "Div" and p.input[0] == acts[0])):
            return None
        t = acts[0]
    if p is None or p.op_type not in WEIGHTED:
        return None
    ins = [i for i in p.input[:2] if i]
    if len(ins) < 2 or not g.is_weight(ins[1]) or not all(g.is_dq(i) for i in ins):
        return None
    return p


def _check_residuals(g: _Graph, add) -> None:
    for n in g.nodes:
        if n.op_type != "Add" or len(n.input) != 2 or any(g.is_const(i) for i in n.input):
            continue
        if any(g.is_weight(i) for i in n.input):
            continue
        src = [_weighted_producer(g, i) for i in n.input]
        if src[0] is None and src[1] is None:
            continue
        if src[0] is not None and src[1] is not None:  # GEMM on both sides: one of them must be quantized
            if not (g.is_dq(n.input[0]) or g.is_dq(n.input[1])):
                add(n, TrtRule.RESIDUAL, f"both inputs come from {g.name(src[0])} and {g.name(src[1])}, neither is "
                                         "quantized: TensorRT cannot fuse the Add into either")
            continue
        skip = n.input[0] if src[0] is None else n.input[1]
        lin = src[1] if src[0] is None else src[0]
        if not g.is_dq(skip):
            add(n, TrtRule.RESIDUAL, f"skip input {skip!r} is float: quantize it so TensorRT fuses this Add into "
                                     f"{lin.op_type} {g.name(lin)}")


def _check_attention(g: _Graph, add, rep: CheckReport) -> None:
    n_attn = 0
    gs_graph = gs.import_onnx(g.model)
    proto = {id(gn): pn for gn, pn in zip(gs_graph.nodes, g.nodes)}
    for core in find_cores(gs_graph):
        sm, bmm1 = proto[id(core.softmax)], proto[id(core.qk)]
        chain = [proto[id(n)] for n in core.scores]
        if any(g.is_weight(i) for i in bmm1.input):
            continue
        bmm2 = proto[id(core.av[0])] if core.av else None
        n_attn += 1
        inputs = list(bmm1.input[:2]) + (list(bmm2.input[:2]) if bmm2 is not None else [])
        if not any(g.dq_of_activation(t) for t in inputs) and not any(p.op_type in QDQ for p in chain):
            # fully float attention: TensorRT's fused fp16 MHA applies (the int8 one does not)
            rep.notes.append(f"{g.name(bmm1)}: attention is float (no Q/DQ on either batched MatMul): TensorRT can "
                             "fuse it as fp16 MHA, not int8")
            continue
        for i, t in enumerate(bmm1.input[:2]):
            if not g.dq_of_activation(t):
                add(bmm1, TrtRule.BMM1, f"input {i} ({t!r}) of QK^T is float: TensorRT's int8 MHA needs Q/DQ on both "
                                        "inputs of the first batched MatMul")
        in_chain = {id(p) for p in chain}
        for p in chain:
            src = g.prod(p.input[0]) if p.op_type == "DequantizeLinear" else None
            if p.op_type in QDQ and not (src is not None and id(src) in in_chain):  # one report per Q/DQ pair
                add(p, TrtRule.BMM1_SOFTMAX, f"{p.op_type} between {g.name(bmm1)} and Softmax {g.name(sm)}: the "
                                             "scores stay float until the Softmax in a fused MHA")
        if bmm2 is None:
            rep.notes.append(f"{g.name(sm)}: Softmax after {g.name(bmm1)} feeds no second MatMul; not checked as "
                             "attention")
            continue
        for i, t in enumerate(bmm2.input[:2]):
            if not g.dq_of_activation(t):
                what = "the softmax probabilities" if i == 0 else "V"
                add(bmm2, TrtRule.BMM2, f"input {i} ({t!r}, {what}) of attention x V is float: TensorRT's int8 MHA "
                                        "needs Q/DQ after the Softmax and on V")
        shape = g.shapes.get(bmm1.input[0])
        out = g.shapes.get(bmm1.output[0])
        head = shape[-1] if shape else None
        seq = max((d for d in (out or [])[-2:] if d), default=None)
        if head is not None and seq is not None and (head not in MHA_HEAD_SIZES or seq > MHA_MAX_SEQ):
            rep.notes.append(f"{g.name(bmm1)}: head size {head}, sequence {seq}: TensorRT's fused int8 MHA needs "
                             f"head size in {MHA_HEAD_SIZES} and sequence <= {MHA_MAX_SEQ}; this attention runs "
                             "unfused (still int8 BMMs)")
    rep.counts["attention blocks"] = n_attn


def check_file(path: str | Path) -> CheckReport:
    """Load ``path`` (ModelLoadError if it is not a readable ONNX model) and check it."""
    from vitc.compiler.driver.loader import load_model

    lm = load_model(path)
    return check_model(lm.model)
