"""Fuse decomposed GELU into one node the target runs.

Erf form (constants in any order):  0.5 * x * (1 + Erf(x / sqrt2))   with x/sqrt2 spelled Div(x, 1.4142) or
Mul(x, 0.7071), and the outer products spelled ((x * e) * 0.5), ((e * 0.5) * x) or ((x * 0.5) * e).
Tanh form: 0.5 * x * (1 + Tanh(0.79788 * (x + 0.044715 * x^3))) with x^3 = Pow(x, 3) or x*x*x.

The emitted op depends on the target (``GeluOp``): ORT's CPU provider runs ``com.microsoft.Gelu`` /
``com.microsoft.FastGelu`` as single vectorised kernels; the ONNX opset-20 ``Gelu`` is the standard op
TensorRT parses. Near-misses (wrong constants, a reused intermediate, a different input) are left alone.
"""

from __future__ import annotations

import enum
import math
from typing import ClassVar

import onnx_graphsurgeon as gs

from vitc.passes.base import PassResult
from vitc.passes.graphutil import (UniqueNames, const_value, finish, graph_output_names, is_scalar_const, other_input,
                                   single_consumer)

SQRT2 = math.sqrt(2.0)
TANH_C = math.sqrt(2.0 / math.pi)


class GeluOp(enum.Enum):
    ORT_CONTRIB = "com.microsoft"  # Gelu / FastGelu contrib ops (ORT CPU and CUDA)
    ONNX20 = "onnx"  # Gelu-20 with approximate="none"|"tanh" (needs opset >= 20)


class GeluFusion:
    name: ClassVar[str] = "fuse_gelu"

    def __init__(self, op: GeluOp = GeluOp.ORT_CONTRIB):
        self.op = op

    def run(self, graph: gs.Graph) -> PassResult:
        outs = graph_output_names(graph)
        names = UniqueNames(graph)
        counts = {"GELU(erf) fusions": 0, "GELU(tanh) fusions": 0}
        if self.op is GeluOp.ONNX20 and graph.opset < 20:
            return PassResult(self.name, False, counts, notes=[f"opset {graph.opset} < 20: Gelu-20 unavailable, left decomposed"])
        for node in list(graph.nodes):
            if node.op == "Erf":
                m = self._match_erf(node, outs)
                kind = "erf"
            elif node.op == "Tanh":
                m = self._match_tanh(node, outs)
                kind = "tanh"
            else:
                continue
            if m is None:
                continue
            x, last = m
            name = names((last.name or node.name or "gelu") + ".fused_gelu")
            if self.op is GeluOp.ORT_CONTRIB:
                new = gs.Node("Gelu" if kind == "erf" else "FastGelu", name=name, domain="com.microsoft", inputs=[x])
            else:
                new = gs.Node("Gelu", name=name, attrs={"approximate": "none" if kind == "erf" else "tanh"}, inputs=[x])
            y = list(last.outputs)
            last.outputs.clear()
            new.outputs = y
            graph.nodes.append(new)
            counts[f"GELU({kind}) fusions"] += 1
        modified = any(counts.values())
        if modified:
            finish(graph)
        return PassResult(self.name, modified, counts)

    # -- the two forms -------------------------------------------------------------------------------------------
    @staticmethod
    def _outer(x: gs.Tensor, e: gs.Tensor, outs: set[str]):
        """Given e = 1 + f(x), find the node computing 0.5 * x * e; return it (the last node) or None."""
        m1 = single_consumer(e, outs)
        if m1 is None or m1.op != "Mul":
            return None
        other = other_input(m1, e)
        if other is None:
            return None
        if other is x:  # (x * e) * 0.5
            m2 = single_consumer(m1.outputs[0], outs)
            if m2 is not None and m2.op == "Mul" and is_scalar_const(other_input(m2, m1.outputs[0]), 0.5):
                return m2
            return None
        if is_scalar_const(other, 0.5):  # (e * 0.5) * x
            m2 = single_consumer(m1.outputs[0], outs)
            if m2 is not None and m2.op == "Mul" and other_input(m2, m1.outputs[0]) is x:
                return m2
            return None
        half = other.inputs[0] if len(other.inputs) == 1 else None  # (x * 0.5) * e
        if (half is not None and half.op == "Mul" and other.name not in outs and len(other.outputs) == 1
                and other_input(half, x) is not None and is_scalar_const(other_input(half, x), 0.5)):
            return m1
        return None

    def _match_erf(self, erf: gs.Node, outs: set[str]):
        scaled = erf.inputs[0]
        pre = scaled.inputs[0] if len(scaled.inputs) == 1 else None
        if pre is None or len(scaled.outputs) != 1 or scaled.name in outs:
            return None
        if pre.op == "Div" and is_scalar_const(pre.inputs[1], SQRT2):
            x = pre.inputs[0]
        elif pre.op == "Mul":
            x = next((t for t in pre.inputs if not is_scalar_const(t, 1 / SQRT2) and const_value(t) is None), None)
            if x is None or not is_scalar_const(other_input(pre, x), 1 / SQRT2):
                return None
        else:
            return None
        add1 = single_consumer(erf.outputs[0], outs)
        if add1 is None or add1.op != "Add" or not is_scalar_const(other_input(add1, erf.outputs[0]), 1.0):
            return None
        last = self._outer(x, add1.outputs[0], outs)
        return None if last is None else (x, last)

    def _match_tanh(self, tanh: gs.Node, outs: set[str]):
        inner = tanh.inputs[0]
        mc = inner.inputs[0] if len(inner.inputs) == 1 else None
        if mc is None or mc.op != "Mul" or single_consumer(inner, outs) is None:
            return None
        s = next((t for t in mc.inputs if const_value(t) is None), None)
        if s is None or not is_scalar_const(other_input(mc, s), TANH_C, rtol=1e-3):
            return None
        add = s.inputs[0] if len(s.inputs) == 1 else None
        if add is None or add.op != "Add" or single_consumer(s, outs) is None:
            return None
        for x, cube_t in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            cm = cube_t.inputs[0] if len(cube_t.inputs) == 1 else None
            if cm is None or cm.op != "Mul" or single_consumer(cube_t, outs) is None:
                continue
            p = next((t for t in cm.inputs if const_value(t) is None), None)
            if p is None or not is_scalar_const(other_input(cm, p), 0.044715, rtol=1e-3):
                continue
            pw = p.inputs[0] if len(p.inputs) == 1 else None
            if pw is None or single_consumer(p, outs) is None:  # x^3 and 0.044715 x^3 used elsewhere: not a GELU
                continue
            cube = (pw.op == "Pow" and pw.inputs[0] is x and is_scalar_const(pw.inputs[1], 3.0)) or (
                pw.op == "Mul" and x in pw.inputs and any(
                    (t.inputs and t.inputs[0].op == "Mul" and list(t.inputs[0].inputs) == [x, x]
                     and single_consumer(t, outs) is not None) for t in pw.inputs))
            if not cube:
                continue
            add1 = single_consumer(tanh.outputs[0], outs)
            if add1 is None or add1.op != "Add" or not is_scalar_const(other_input(add1, tanh.outputs[0]), 1.0):
                return None
            last = self._outer(x, add1.outputs[0], outs)
            return None if last is None else (x, last)
        return None
