"""ORT only, after Q/DQ insertion: one ``com.microsoft.QAttention`` kernel per attention block.

Pattern: an int8 QKV projection (one fused ``qkv`` Gemm, or three ``q``/``k``/``v`` Gemms reading the same
quantized input) -> data movement (Reshape/Transpose/Split/Squeeze/Gather/Slice, scalar Mul/Div) -> QK^T MatMul
-> optional scalar Mul/Div -> Softmax(last axis) -> MatMul with V -> Transpose/Reshape back to tokens x channels,
with QK^T and attention x V in float (no Q/DQ inside the core).

Check: instead of matching each exporter's spelling of the head split (timm's ``[B,T,3,H,D]`` Reshape + Split,
HF's three Reshape/Transpose chains, ``k`` transposed before or after), the pass *runs* the data-movement chains
(onnx.reference) on index-coded inputs: every element of q, k and v must come from one GEMM column, for every token
in the same order, and the output chain must be the inverse head merge. A chain that permutes anything else
(a wrong perm, a Gather of one token, a Slice) does not fuse. The scalar factors on the q/k chains and after QK^T
become the kernel's ``scale`` attribute; one on v scales the v columns.

Rewrite: QAttention(x_uint8, W_qkv int8, bias float, x_scale, w_scale per column, -, x_zero_point, w_zero_point).
ORT's CPU kernel runs the int8 QKV GEMM per head straight into the head-major layout, then QK^T, softmax and
attention x V in float: the same arithmetic as the Q/DQ graph it replaces (the bias is added in float instead of
as int32, a difference below half an accumulator step) in one node instead of ~17 (measured on DeiT-S: 1.24 ms
against ~1.6 ms per block at batch 1, 2 threads).
A channel-scale migration Mul on the output (passes/migrate_scales.py, proj input) is folded into the v columns'
weight scales and bias (attention x V is linear in V per channel), which removes it exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from vitc.passes.attention import match_core
from vitc.passes.fusion import Fusion, FusionContext, NotFused
from vitc.passes.graphutil import const_value, producer

log = logging.getLogger(__name__)

MOVE_OPS = frozenset({"Reshape", "Transpose", "Split", "Squeeze", "Unsqueeze", "Gather", "Slice", "Identity",
                      "Flatten"})
REORDER_OPS = frozenset({"Transpose", "Reshape"})  # allowed between attention x V and the merged heads
_EXACT = 1 << 24  # index codes must stay exactly representable in float32


@dataclass
class _Gemm:
    node: gs.Node
    q_node: gs.Node  # the QuantizeLinear of the shared input
    weight: np.ndarray  # int8 [K, N]
    w_scale: np.ndarray  # [N]
    w_zp: np.ndarray  # [N] int8
    bias: np.ndarray  # float32 [N]


@dataclass
class _Attention:
    """A verified attention core: what the QAttention rewrite needs."""

    qk: gs.Node
    q_node: gs.Node  # the QuantizeLinear of the projections' shared input
    gemms: list[_Gemm]
    cols: dict[str, np.ndarray]  # q/k/v -> GEMM columns in head-major order
    mults: dict[str, float]  # q/k/v -> scalar factor on its chain
    score_scale: float
    dims: tuple[int, int, int, int]  # B, H, T, D
    merged: gs.Tensor  # the tokens x channels output of the head merge


class OrtAttentionFusion(Fusion[_Attention]):
    name: ClassVar[str] = "fuse_attention"
    counts: ClassVar[tuple[str, ...]] = ("QAttention fusions", "migration Mul folded into V")

    def anchors(self, graph: gs.Graph) -> list[gs.Node]:
        return [n for n in graph.nodes if n.op == "Softmax"]

    def match(self, sm: gs.Node, ctx: FusionContext) -> _Attention | NotFused:
        why = self._check(sm, ctx.outs, ctx.opset)
        return NotFused(why) if isinstance(why, str) else why

    # -- one attention core ---------------------------------------------------------------------------------------
    @staticmethod
    def _check(sm: gs.Node, outs: set[str], opset: int) -> _Attention | str:
        """The attention core around ``sm`` verified for QAttention, or why it cannot be fused."""
        found = match_core(sm, outs)
        if found is None:
            return "no QK^T MatMul of two computed tensors feeds the softmax"
        qk = found.qk
        core: list[gs.Node] = [sm, *found.scores, qk]
        score_scale = 1.0
        if found.scores:
            p = found.scores[0]
            if len(found.scores) > 1 or p.op not in ("Mul", "Div"):
                ops = ", ".join(sorted({n.op for n in found.scores}))
                return f"the scores pass through {ops} between QK^T and the softmax: a mask or position bias, " \
                       "which QAttention cannot add"
            s = _scalar_operand(p, _data_operand(p))
            if s is None:
                return "softmax input is scaled by a non-scalar"
            score_scale = s if p.op == "Mul" else 1.0 / s
        rank = len(sm.inputs[0].shape or [])
        axis = sm.attrs.get("axis", -1)
        if rank != 4 or axis not in (-1, 3) or (opset < 13 and axis != 3):
            return "softmax is not over the last axis of a 4-D score tensor"
        sm_out = sm.outputs[0]
        if sm_out.name in outs or len(sm_out.outputs) != 1 or sm_out.outputs[0].op != "MatMul" \
                or sm_out.outputs[0].inputs[0] is not sm_out:
            return "softmax output does not feed one attention x V MatMul"
        av = sm_out.outputs[0]
        core.append(av)
        if any(o.name in outs or len(o.outputs) != 1 for n in core if n is not av for o in n.outputs):
            return "QK^T or the scores have other consumers (or are graph outputs)"

        chains = {}
        for key, tensor in (("q", qk.inputs[0]), ("k", qk.inputs[1]), ("v", av.inputs[1])):
            walked = _walk_up(tensor)
            if isinstance(walked, str):
                return f"{key}: {walked}"
            chains[key] = (*walked, tensor.name)
        gemm_nodes = list({id(g): g for c in chains.values() for g in c[1]}.values())
        chain_nodes = list({id(n): n for c in chains.values() for n in c[0]}.values())
        inside = {id(n) for n in chain_nodes} | {id(qk), id(av)}
        for n in chain_nodes + gemm_nodes:
            for o in n.outputs:
                if o.name in outs or any(id(c) not in inside for c in o.outputs):
                    return f"{o.name} is also used outside the attention"
        gemms = []
        for g in gemm_nodes:
            got = _quantized_gemm(g)
            if isinstance(got, str):
                return f"{g.name}: {got}"
            gemms.append(got)
        q_node = gemms[0].q_node
        if any(g.q_node is not q_node for g in gemms):
            return "the q, k and v projections do not read one quantized input"
        x_zp = const_value(q_node.inputs[2]) if len(q_node.inputs) > 2 else None
        x_scale = const_value(q_node.inputs[1])
        if x_zp is None or x_zp.dtype != np.uint8 or x_zp.size != 1 or x_scale is None or x_scale.size != 1:
            return "the input is not per-tensor uint8 (QAttention's CPU kernel takes U8S8)"

        mapping = _column_map(chains, gemms, chain_nodes, opset)
        if isinstance(mapping, str):
            return mapping
        cols, mults, (B, H, T, D) = mapping

        tail = _walk_down(av.outputs[0], outs)
        if not tail:
            return "attention x V is not followed by the head merge"
        merged = tail[-1].outputs[0]
        code = np.arange(B * H * T * D, dtype=np.float32).reshape(B, H, T, D)
        try:
            got = _evaluate(tail, {av.outputs[0].name: code}, [merged.name], opset)[0]
        except Exception as exc:  # a chain the reference evaluator cannot run is not one we can verify
            return f"head merge not verifiable ({type(exc).__name__})"
        if got.size != code.size or not np.array_equal(got.reshape(-1), code.transpose(0, 2, 1, 3).reshape(-1)):
            return "the output chain is not the inverse head merge"
        if any(g.weight.shape[0] != gemms[0].weight.shape[0] for g in gemms):
            return "the projections disagree on the input width"
        return _Attention(qk, q_node, gemms, cols, mults, score_scale, (B, H, T, D), merged)

    def rewrite(self, graph: gs.Graph, m: _Attention, ctx: FusionContext) -> tuple[str, ...]:
        outs, names = ctx.outs, ctx.names
        qk, q_node, gemms, cols, mults = m.qk, m.q_node, m.gemms, m.cols, m.mults
        B, H, T, D = m.dims
        merged = m.merged
        x_zp = const_value(q_node.inputs[2])
        x_scale = const_value(q_node.inputs[1])
        keys: tuple[str, ...] = ("QAttention fusions",)
        # weights in QAttention's [K, 3 * H * D] layout: q heads, k heads, v heads, gathered from the projections'
        # columns side by side
        C = H * D
        K = gemms[0].weight.shape[0]
        idx = np.concatenate([cols[key] for key in "qkv"])
        w = np.concatenate([g.weight for g in gemms], axis=1)[:, idx]
        ws, wz, bias = (np.concatenate([getattr(g, f) for g in gemms])[idx] for f in ("w_scale", "w_zp", "bias"))
        v = slice(2 * C, 3 * C)
        ws[v] *= mults["v"]
        bias[v] *= mults["v"]
        scale = float(mults["q"] * mults["k"] * m.score_scale)

        # a per-channel Mul right after the merge (a migration factor for proj) scales the v columns instead
        out = merged
        nxt = merged.outputs[0] if len(merged.outputs) == 1 and merged.name not in outs else None
        if nxt is not None and nxt.op == "Mul":
            m = _channel_vector(nxt, merged, C)
            if m is not None:
                ws[v] *= m
                bias[v] *= m
                out = nxt.outputs[0]
                keys += ("migration Mul folded into V",)

        base = qk.name.rsplit("/", 1)[0] if "/" in qk.name else qk.name
        x = q_node.outputs[0]
        xs = list(x.shape or [])
        if xs != [B, T, K]:
            x3 = gs.Variable(names(f"{x.name}.3d"), dtype=np.uint8, shape=[B, T, K])
            graph.nodes.append(gs.Node("Reshape", names(f"{base}/qattention.reshape_in"),
                                       inputs=[x, gs.Constant(names(f"{base}/qattention.shape_in"),
                                                              np.array([B, T, K], np.int64))], outputs=[x3]))
            x = x3
        inputs = [x, gs.Constant(names(f"{base}/qattention.weight"), w),
                  gs.Constant(names(f"{base}/qattention.bias"), bias),
                  gs.Constant(names(f"{base}/qattention.input_scale"), np.asarray(x_scale, np.float32).reshape(())),
                  gs.Constant(names(f"{base}/qattention.weight_scale"), ws),
                  gs.Variable.empty(),
                  gs.Constant(names(f"{base}/qattention.input_zero_point"), np.asarray(x_zp, np.uint8).reshape(())),
                  gs.Constant(names(f"{base}/qattention.weight_zero_point"), wz)]
        out_shape = list(out.shape or [])
        for n in list(out.inputs):  # detach the old producer of the output tensor
            n.outputs.clear()
        if out_shape == [B, T, C]:
            y = out
        else:
            y = gs.Variable(names(f"{base}/qattention_output"), dtype=np.float32, shape=[B, T, C])
            graph.nodes.append(gs.Node("Reshape", names(f"{base}/qattention.reshape_out"),
                                       inputs=[y, gs.Constant(names(f"{base}/qattention.shape_out"),
                                                              np.array(out_shape, np.int64))], outputs=[out]))
        graph.nodes.append(gs.Node("QAttention", names(f"{base}/qattention"), domain="com.microsoft",
                                   attrs={"num_heads": int(H), "scale": scale}, inputs=inputs, outputs=[y]))
        return keys


# -- helpers -----------------------------------------------------------------------------------------------------------
def _data_operand(node: gs.Node) -> gs.Tensor | None:
    """For a binary Mul/Div with one constant operand: the other (for Div, the constant must be the divisor)."""
    a, b = node.inputs[0], node.inputs[1]
    if const_value(b) is not None and const_value(a) is None:
        return a
    if node.op == "Mul" and const_value(a) is not None and const_value(b) is None:
        return b
    return None


def _scalar_operand(node: gs.Node, data: gs.Tensor | None) -> float | None:
    if data is None:
        return None
    other = node.inputs[1] if node.inputs[0] is data else node.inputs[0]
    v = const_value(other)
    if v is None or v.size != 1 or not np.isfinite(v).all() or float(v.reshape(())) == 0.0:
        return None
    return float(v.reshape(()))


def _walk_up(t: gs.Tensor):
    """From a q/k/v input of the core up to the GEMM(s) producing it: (chain nodes, [gemm]) or why not."""
    nodes: list[gs.Node] = []
    while True:
        p = producer(t)
        if p is None:
            return "not produced by a projection"
        if p.op == "Gemm":
            return nodes, [p]
        if p.op in MOVE_OPS:
            if any(const_value(i) is None for i in p.inputs[1:] if i.name):
                return f"{p.op} {p.name} has a computed shape/index input"
            nodes.append(p)
            t = p.inputs[0]
            continue
        if p.op in ("Mul", "Div"):
            d = _data_operand(p)
            if _scalar_operand(p, d) is None:
                return f"{p.op} {p.name} is not a scalar scale"
            nodes.append(p)
            t = d
            continue
        return f"{p.op} {p.name} between the projection and the attention (quantized attention, or not a head split)"


def _walk_down(t: gs.Tensor, outs: set[str]) -> list[gs.Node]:
    nodes = []
    while t.name not in outs and len(t.outputs) == 1 and t.outputs[0].op in REORDER_OPS \
            and all(const_value(i) is not None for i in t.outputs[0].inputs[1:] if i.name):
        nodes.append(t.outputs[0])
        t = t.outputs[0].outputs[0]
    return nodes


def _quantized_gemm(g: gs.Node):
    """The int8 parts of a Q/DQ Gemm: input Q node (through its DQ and order-preserving reshapes), weight, scales,
    zero points and the float bias; or why it is not one."""
    a = g.attrs
    if a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
        return "not a plain Gemm (transA/alpha/beta)"
    t = g.inputs[0]
    dq = None
    while True:
        p = producer(t)
        if p is None:
            return "input is not quantized"
        if p.op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            t = p.inputs[0]
            continue
        if p.op == "DequantizeLinear" and dq is None:
            dq = p
            t = p.inputs[0]
            continue
        if p.op == "QuantizeLinear" and dq is not None:
            qn = p
            break
        return "input is not Q/DQ'd"
    for i in (1, 2):
        if i < len(dq.inputs) and i < len(qn.inputs):
            if not np.array_equal(const_value(dq.inputs[i]), const_value(qn.inputs[i])):
                return "input DQ and Q disagree on scale/zero point"
    wdq = producer(g.inputs[1])
    if wdq is None or wdq.op != "DequantizeLinear":
        return "weight is not int8 Q/DQ"
    wq = const_value(wdq.inputs[0])
    wsc = const_value(wdq.inputs[1])
    wzp = const_value(wdq.inputs[2]) if len(wdq.inputs) > 2 else None
    if wq is None or wsc is None or wq.dtype != np.int8 or wq.ndim != 2:
        return "weight is not a constant int8 matrix"
    axis = wdq.attrs.get("axis", 1) % 2
    if a.get("transB", 0):
        wq = wq.T
        axis = 1 - axis
    n = wq.shape[1]
    if wsc.size not in (1, n) or (wsc.size == n and n > 1 and axis != 1):
        return "weight scales are not per output column"
    ws = np.broadcast_to(np.asarray(wsc, np.float32).reshape(-1), (n,)).copy()
    wz = np.zeros(n, np.int8) if wzp is None else np.broadcast_to(np.asarray(wzp).reshape(-1), (n,)).astype(np.int8)
    if len(g.inputs) > 2 and g.inputs[2].name:
        b = g.inputs[2]
        bp = producer(b)
        if bp is not None and bp.op == "DequantizeLinear":
            bq, bs = const_value(bp.inputs[0]), const_value(bp.inputs[1])
            bz = const_value(bp.inputs[2]) if len(bp.inputs) > 2 else None
            if bq is None or bs is None:
                return "bias is not constant"
            bias = (bq.astype(np.float64) - (0 if bz is None else bz.astype(np.float64))) * bs.astype(np.float64)
        else:
            bias = const_value(b)
            if bias is None:
                return "bias is not constant"
        bias = np.broadcast_to(np.asarray(bias, np.float32).reshape(-1), (n,)).astype(np.float32)
    else:
        bias = np.zeros(n, np.float32)
    return _Gemm(g, qn, np.ascontiguousarray(wq), ws, wz, bias)


def _column_map(chains: dict, gemms: list[_Gemm], chain_nodes: list[gs.Node], opset: int):
    """Run the head-split chains on index codes: for q, k and v, which column of the projections side by side
    (GEMM 0's columns, then GEMM 1's, ...) feeds head h, lane d (flattened h * D + d), and the scalar factor on the
    chain. Returns (cols, mults, (B, H, T, D)) or why not."""
    shapes = [list(g.node.outputs[0].shape or []) for g in gemms]
    if any(len(s) != 2 or not all(isinstance(d, int) and d > 0 for d in s) for s in shapes):
        return "projection outputs have no static 2-D shape"
    sizes = [s[0] * s[1] for s in shapes]
    if sum(sizes) + 1 >= _EXACT:
        return "too large to verify exactly"
    bases = np.cumsum([0] + sizes)
    col_bases = np.cumsum([0] + [s[1] for s in shapes])
    ones = {g.node.outputs[0].name: np.ones(s, np.float32) for g, s in zip(gemms, shapes)}
    codes = {g.node.outputs[0].name: (np.arange(n, dtype=np.float64) + 1 + b).reshape(s).astype(np.float32)
             for g, s, n, b in zip(gemms, shapes, sizes, bases)}
    names = [chains[k][2] for k in "qkv"]
    try:
        m_out = _evaluate(chain_nodes, ones, names, opset)
        c_out = _evaluate(chain_nodes, codes, names, opset)
    except Exception as exc:
        return f"head split not verifiable ({type(exc).__name__})"
    cols, mults, dims = {}, {}, None
    for key, m, c in zip("qkv", m_out, c_out):
        if m.ndim != 4 or m.size == 0 or not np.allclose(m, m.reshape(-1)[0], rtol=1e-6, atol=0):
            return f"{key} is not a per-head layout with one scalar factor"
        f = float(m.reshape(-1)[0])
        idx = c.astype(np.float64) / f
        r = np.rint(idx)
        if np.abs(idx - r).max() > 0.25 or r.min() < 1:
            return f"{key} mixes values (not pure data movement)"
        if key == "k":
            r = r.transpose(0, 1, 3, 2)  # QK^T takes k transposed: [B, H, D, T]
        B, H, T, D = r.shape
        if dims is None:
            dims = (B, H, T, D)
        elif dims != (B, H, T, D):
            return "q, k and v head shapes differ"
        flat = r.astype(np.int64) - 1
        g_idx = np.searchsorted(bases, flat, side="right") - 1
        off = flat - bases[g_idx]
        ncol = np.array([s[1] for s in shapes])[g_idx]
        row, col = off // ncol, col_bases[g_idx] + off % ncol
        b_i = np.arange(B).reshape(B, 1, 1, 1)
        t_i = np.arange(T).reshape(1, 1, T, 1)
        if not np.array_equal(row, np.broadcast_to(b_i * T + t_i, row.shape)):
            return f"{key}: tokens are not in projection-row order"
        if not np.array_equal(col, np.broadcast_to(col[:1, :, :1, :], col.shape)):
            return f"{key}: a head lane reads different columns for different tokens"
        cols[key] = col[0, :, 0, :].reshape(-1)
        mults[key] = f
    B, H, T, D = dims
    if any(s[0] != B * T for s in shapes):
        return "projection rows are not batch x tokens"
    return cols, mults, dims


def _channel_vector(mul: gs.Node, x: gs.Tensor, channels: int) -> np.ndarray | None:
    """The per-channel factor of ``mul`` = x * m with m constant over everything but x's last axis."""
    other = mul.inputs[1] if mul.inputs[0] is x else mul.inputs[0] if mul.inputs[1] is x else None
    m = const_value(other)
    xs = list(x.shape or [])
    if m is None or not xs or xs[-1] != channels or m.size != channels or m.ndim > len(xs) \
            or (m.ndim and m.shape[-1] != channels) or not np.isfinite(m).all():
        return None
    out = list(mul.outputs[0].shape or [])
    if out and out != xs:
        return None
    return np.asarray(m, np.float32).reshape(-1)


def _evaluate(nodes: list[gs.Node], feeds: dict[str, np.ndarray], outputs: list[str], opset: int) -> list[np.ndarray]:
    """Run ``nodes`` (standard ops, constant side inputs) with onnx.reference on ``feeds``."""
    from onnx import helper as h
    from onnx.reference import ReferenceEvaluator

    inits, onodes, seen = [], [], set()
    for n in nodes:
        ins = []
        for i in n.inputs:
            if not i.name:
                ins.append("")
                continue
            v = const_value(i)
            if v is not None and i.name not in feeds:
                if i.name not in seen:
                    seen.add(i.name)
                    inits.append(onnx.numpy_helper.from_array(np.asarray(v), i.name))
            ins.append(i.name)
        attrs = {k: (v.values if isinstance(v, gs.Constant) else v) for k, v in n.attrs.items()}
        onodes.append(h.make_node(n.op, ins, [o.name for o in n.outputs], **attrs))
    order, done, pending = [], set(feeds) | {i.name for i in inits}, list(onodes)
    while pending:  # topological order (the chains were collected walking upwards)
        ready = [n for n in pending if all(not i or i in done for i in n.input)]
        if not ready:
            raise ValueError("chain is not closed")
        for n in ready:
            order.append(n)
            done.update(n.output)
            pending.remove(n)
    inputs = [h.make_tensor_value_info(k, onnx.TensorProto.FLOAT, list(v.shape)) for k, v in feeds.items()]
    outs = [h.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs]
    g = h.make_graph(order, "chain", inputs, outs, inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", max(opset, 13))])
    return list(ReferenceEvaluator(model).run(None, feeds))
