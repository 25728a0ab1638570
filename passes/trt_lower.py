"""TensorRT only, after Q/DQ insertion: turn int32 bias DequantizeLinear nodes back into float32 biases.

:class:`~vitc.passes.insert_qdq.InsertQDQPass` stores Conv/Gemm biases as int32 with scale x_scale * w_scale
(ORT folds that into QLinearConv/QGemm). TensorRT's IDequantizeLayer only takes quantized types (INT8, FP8, INT4,
FP4): its ONNX parser rejects an int32 DequantizeLinear ("only activation types allowed as input to this layer",
onnx/onnx-tensorrt#850, microsoft/onnxruntime#14229) and fuses a float bias into the GEMM/convolution itself.
The float bias is int32 * scale, which differs from the original by at most half a step of x_scale * w_scale
(the resolution of the int8 GEMM's accumulator), so the graph's outputs do not move measurably.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from vitc.passes.base import PassResult
from vitc.passes.graphutil import const_value, finish


class TrtLoweringPass:
    name: ClassVar[str] = "trt_lower"

    def run(self, graph: gs.Graph) -> PassResult:
        counts = {"int32 bias DQ -> float bias": 0}
        for node in list(graph.nodes):
            if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3:
                continue
            b = node.inputs[2]
            dq = b.inputs[0] if len(b.inputs) == 1 else None
            if dq is None or dq.op != "DequantizeLinear":
                continue
            q = const_value(dq.inputs[0])
            scale = const_value(dq.inputs[1])
            zp = const_value(dq.inputs[2]) if len(dq.inputs) > 2 else None
            if q is None or scale is None or q.dtype != np.int32:
                continue
            zp = np.zeros_like(q) if zp is None else zp
            shape = [1] * q.ndim
            axis = dq.attrs.get("axis", 1)
            if np.ndim(scale) == 1 and q.ndim >= 1:
                shape[axis % q.ndim] = -1
            value = ((q.astype(np.float64) - zp.astype(np.float64).reshape(shape if np.ndim(zp) else []))
                     * np.asarray(scale, np.float64).reshape(shape if np.ndim(scale) else [])).astype(np.float32)
            node.inputs[2] = gs.Constant(f"{node.name}.bias", value)
            counts["int32 bias DQ -> float bias"] += 1
        modified = any(counts.values())
        if modified:
            finish(graph)
        return PassResult(self.name, modified, counts)
