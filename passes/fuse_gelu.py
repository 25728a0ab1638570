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
from dataclasses import dataclass
from typing import ClassVar

import onnx_graphsurgeon as gs

from vitc.passes.fusion import Fusion, FusionContext, NotFused
from vitc.passes.graphutil import const_value, is_scalar_const, other_input, single_consumer

SQRT2 = math.sqrt(2.0)
TANH_C = math.sqrt(2.0 / math.pi)


class GeluOp(enum.Enum):
    ORT_CONTRIB = "com.microsoft"  # Gelu / FastGelu contrib ops (ORT CPU and CUDA)
    ONNX20 = "onnx"  # Gelu-20 with approximate="none"|"tanh" (needs opset >= 20)


@dataclass
class _Gelu:
    x: gs.Tensor
    last: gs.Node  # the node whose output the fused GELU takes over
    kind: str  # "erf" | "tanh"
    anchor: gs.Node


class GeluFusion(Fusion[_Gelu]):
    name: ClassVar[str] = "fuse_gelu"
    counts: ClassVar[tuple[str, ...]] = ("GELU(erf) fusions", "GELU(tanh) fusions")

    def __init__(self, op: GeluOp = GeluOp.ORT_CONTRIB):
        self.op = op

    def skip(self, graph: gs.Graph) -> str | None:
        if self.op is GeluOp.ONNX20 and graph.opset < 20:
            return f"opset {graph.opset} < 20: Gelu-20 unavailable, left decomposed"
        return None

    def anchors(self, graph: gs.Graph) -> list[gs.Node]:
        return [n for n in graph.nodes if n.op in ("Erf", "Tanh")]

    def match(self, node: gs.Node, ctx: FusionContext) -> _Gelu | NotFused | None:
        if node.op == "Erf":
            return self._match_erf(node, ctx.outs)
        return self._match_tanh(node, ctx.outs)

    def rewrite(self, graph: gs.Graph, m: _Gelu, ctx: FusionContext) -> str:
        name = ctx.names((m.last.name or m.anchor.name or "gelu") + ".fused_gelu")
        if self.op is GeluOp.ORT_CONTRIB:
            new = gs.Node("Gelu" if m.kind == "erf" else "FastGelu", name=name, domain="com.microsoft",
                          inputs=[m.x])
        else:
            new = gs.Node("Gelu", name=name, attrs={"approximate": "none" if m.kind == "erf" else "tanh"},
                          inputs=[m.x])
        y = list(m.last.outputs)
        m.last.outputs.clear()
        new.outputs = y
        graph.nodes.append(new)
        return f"GELU({m.kind}) fusions"

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

    def _match_erf(self, erf: gs.Node, outs: set[str]) -> _Gelu | NotFused | None:
        """Starts at Erf(x / sqrt2); everything after that must be the GELU or it is a near-miss."""
        scaled = erf.inputs[0]
        pre = scaled.inputs[0] if len(scaled.inputs) == 1 else None
        if pre is None:
            return None
        if pre.op == "Div" and is_scalar_const(pre.inputs[1], SQRT2):
            x = pre.inputs[0]
        elif pre.op == "Mul":
            x = next((t for t in pre.inputs if not is_scalar_const(t, 1 / SQRT2) and const_value(t) is None), None)
            if x is None or not is_scalar_const(other_input(pre, x), 1 / SQRT2):
                return None
        else:
            return None
        if len(scaled.outputs) != 1 or scaled.name in outs:
            return NotFused("x / sqrt(2) has other consumers")
        add1 = single_consumer(erf.outputs[0], outs)
        if add1 is None or add1.op != "Add" or not is_scalar_const(other_input(add1, erf.outputs[0]), 1.0):
            return NotFused("Erf(x / sqrt(2)) is not followed by + 1 alone")
        last = self._outer(x, add1.outputs[0], outs)
        return NotFused("1 + Erf(x / sqrt(2)) is not multiplied by 0.5 * x") if last is None else \
            _Gelu(x, last, "erf", erf)

    def _match_tanh(self, tanh: gs.Node, outs: set[str]) -> _Gelu | NotFused | None:
        """Starts at Tanh(sqrt(2/pi) * s); everything after that must be the GELU or it is a near-miss."""
        inner = tanh.inputs[0]
        mc = inner.inputs[0] if len(inner.inputs) == 1 else None
        if mc is None or mc.op != "Mul":
            return None
        s = next((t for t in mc.inputs if const_value(t) is None), None)
        if s is None or not is_scalar_const(other_input(mc, s), TANH_C, rtol=1e-3):
            return None
        if single_consumer(inner, outs) is None:
            return NotFused("sqrt(2/pi) * (...) has other consumers")
        add = s.inputs[0] if len(s.inputs) == 1 else None
        if add is None or add.op != "Add" or single_consumer(s, outs) is None:
            return NotFused("the Tanh argument is not sqrt(2/pi) * (x + 0.044715 x^3) alone")
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
                return NotFused("the Tanh is not followed by + 1 alone")
            last = self._outer(x, add1.outputs[0], outs)
            return NotFused("1 + Tanh(...) is not multiplied by 0.5 * x") if last is None else \
                _Gelu(x, last, "tanh", tanh)
        return NotFused("no x + 0.044715 x^3 (single-use cube of the same x) inside the Tanh")
