"""Simulation-only quantizers (accuracy models, no int8 kernel runs them): the log2 / log-sqrt2 quantizer of softmax
probabilities, as float ops. Per-channel activation scales, the other simulated setting, are ordinary Q/DQ with
an axis (``insert_qdq``)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from vitc.passes.quant_types import NodePlan, SoftmaxQuantizer


def log_fake_quant(graph: gs.Graph, p: gs.Tensor, np_: NodePlan, counts: dict) -> gs.Variable:
    """Simulated log2 / log-sqrt2 quantization of probabilities p in [0, 1] as float ops:
    q = clip(round(-k log2 p), 0, 2^bits - 1), p_hat = 2^(-q / k) with k = 1 (log2) or 2 (log-sqrt2); p = 0 maps
    to the last level (2^-(2^bits-1)/k, ~0)."""
    k = 2.0 if np_.spec.softmax is SoftmaxQuantizer.LOG_SQRT2 else 1.0
    base = f"{p.name}.{np_.spec.softmax.value}"

    def v(suffix):
        return gs.Variable(f"{base}.{suffix}", dtype=np.float32, shape=p.shape)

    steps = [("Log", [], "log"), ("Mul", [np.array(-k / np.log(2.0), np.float32)], "scaled"),
             ("Round", [], "round"),
             ("Clip", [np.array(0.0, np.float32), np.array(2 ** np_.spec.bits - 1, np.float32)], "level"),
             ("Mul", [np.array(-np.log(2.0) / k, np.float32)], "exponent"), ("Exp", [], "dq")]
    cur = p
    for op, consts, suffix in steps:
        out = v(suffix)
        ins = [cur] + [gs.Constant(f"{base}.{suffix}.c{i}", c) for i, c in enumerate(consts)]
        graph.nodes.append(gs.Node(op, name=f"{base}.{suffix}.{op}", inputs=ins, outputs=[out]))
        cur = out
    counts["log-quantized softmax"] = counts.get("log-quantized softmax", 0) + 1
    return cur
