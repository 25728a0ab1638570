"""Canonicalize: fold every constant subgraph (shape chains, position-embedding Resize), drop Identity and dead nodes.

Runs after the input shapes are fixed, so Shape/Gather/Unsqueeze/Concat chains feeding Reshape targets, the
Expand of the class token and the position-embedding interpolation that HF-transformers exports recompute on every
inference all become initializers. Later patterns then see a clean graph.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from vitc.passes.base import PassResult
from vitc.passes.graphutil import UniqueNames, const_value, finish, graph_output_names, infer_shapes, static_shape

log = logging.getLogger(__name__)


def refresh_shapes(graph: gs.Graph) -> None:
    """Re-run ONNX shape inference and write the shapes back onto the graph's tensors (in place)."""
    model = gs.export_onnx(graph, do_type_check=False)
    # ONNX cannot infer through contrib ops (com.microsoft.Gelu, QAttention): keep their outputs' known shapes
    custom = {o.name for n in graph.nodes if n.domain not in ("", "ai.onnx") for o in n.outputs}
    kept = [vi for vi in model.graph.value_info if vi.name in custom]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    for imp in model.opset_import:  # graphsurgeon exports the imported opset; passes may have raised graph.opset
        if imp.domain in ("", "ai.onnx"):
            imp.version = max(imp.version, graph.opset)
    try:
        model = infer_shapes(model)
    except Exception as exc:  # inference is an aid here, never a reason to fail
        log.debug("shape inference failed during canonicalize: %s", exc)
        return
    infos = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output)}
    for name, t in graph.tensors().items():
        vi = infos.get(name)
        if vi is None or isinstance(t, gs.Constant) or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            t.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        if tt.elem_type:
            t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)


def _bypass(node: gs.Node, src: gs.Tensor, dst: gs.Tensor) -> None:
    """Consumers of ``dst`` read ``src`` instead; ``node`` is detached both ways."""
    for c in list(dst.outputs):
        for i, t in enumerate(c.inputs):
            if t is dst:
                c.inputs[i] = src
    node.outputs.clear()
    node.inputs.clear()


BROADCASTING_BINARY = ("Add", "Sub", "Mul", "Div")


def _absorbed_by_broadcast(node: gs.Node) -> bool:
    """An Expand whose every consumer is a broadcasting binary op (Add, Sub, Mul, Div) whose other operand already has
    each expanded dim (F.normalize's ``x / norm.expand_as(x)`` in SwinV2's cosine attention): the consumer broadcasts
    the unexpanded input to the same output, so the Expand is a no-op there."""
    if len(node.inputs) != 2:
        return False
    target = const_value(node.inputs[1])
    d, out = node.inputs[0].shape, node.outputs[0].shape
    consumers = node.outputs[0].outputs
    if target is None or d is None or out is None or not consumers or len(out) < len(d):
        return False
    if static_shape(d) is not None:  # the recorded output shape must be the Expand's own result, not a stale one
        try:
            if list(np.broadcast_shapes(tuple(d), tuple(int(v) for v in target))) != list(out):
                return False
        except ValueError:
            return False
    y = node.outputs[0]
    for c in consumers:
        if (c.op not in BROADCASTING_BINARY or c.domain not in (None, "", "ai.onnx") or len(c.inputs) != 2
                or c.inputs[0] is c.inputs[1]):
            return False
        other = c.inputs[1] if c.inputs[0] is y else c.inputs[0]
        xs = other.shape
        if xs is None or len(xs) < len(out):
            return False
        for k in range(1, len(out) + 1):
            o_k, d_k = out[-k], (d[-k] if k <= len(d) else 1)
            if o_k == d_k:
                continue  # not expanded along this axis
            if not (isinstance(o_k, int) and d_k == 1 and xs[-k] == o_k):
                return False
    return True


class CanonicalizePass:
    name: ClassVar[str] = "canonicalize"
    max_rounds = 64  # each round folds one more link of a chain (Swin: pads from shapes, per block)

    def run(self, graph: gs.Graph) -> PassResult:
        before = Counter(n.op for n in graph.nodes)
        named = self._name_nodes(graph)
        identities = self._drop_identities(graph)
        finish(graph)
        # graphsurgeon evaluates the constant partitions with ONNX Runtime; fold_shapes turns Shape of a tensor whose
        # shape is known (we fixed the inputs) into a constant, which is what unlocks the reshape-target chains.
        shapes_folded = 0
        for _ in range(self.max_rounds):
            n_before = len(graph.nodes)
            refresh_shapes(graph)
            shapes_folded += self._fold_static_shapes(graph)
            # graphsurgeon's own shape folding ignores Shape-15's start/end attributes (it folds the full shape),
            # so Shape nodes are folded above, honouring them, and graphsurgeon only evaluates constant partitions.
            graph.fold_constants(fold_shapes=False, recurse_subgraphs=False, partitioning=None, error_ok=True,
                                 size_threshold=None)
            finish(graph)
            if len(graph.nodes) == n_before:
                break
        refresh_shapes(graph)
        noops = self._drop_noops(graph)
        if noops:
            finish(graph)
        after = Counter(n.op for n in graph.nodes)
        removed = {f"removed {op}": before[op] - after.get(op, 0) for op in sorted(before) if before[op] > after.get(op, 0)}
        counts = {"nodes before": sum(before.values()), "nodes after": sum(after.values()), "nodes named": named,
                  "Identity removed": identities, "Shape folded": shapes_folded, "no-op nodes removed": noops,
                  **removed}
        return PassResult(self.name, named > 0 or sum(before.values()) != sum(after.values()), counts)

    @staticmethod
    def _name_nodes(graph: gs.Graph) -> int:
        """Name unnamed nodes, rename repeated names: plans, roles, reports and ONNX Runtime go by node name."""
        names = UniqueNames(graph)
        seen: set[str] = set()
        n = 0
        for node in graph.nodes:
            if node.name and node.name not in seen:
                seen.add(node.name)
                continue
            node.name = names(node.op)
            n += 1
        return n

    @staticmethod
    def _fold_static_shapes(graph: gs.Graph) -> int:
        """Replace Shape(x) by a constant when x's shape is fully static (honours start/end of Shape-15)."""
        n = 0
        for node in list(graph.nodes):
            if node.op != "Shape" or not node.inputs or not node.outputs:
                continue
            shape = node.inputs[0].shape
            if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
                continue
            rank = len(shape)
            start = int(node.attrs.get("start", 0))
            end = node.attrs.get("end")
            start = max(0, min(rank, start + rank if start < 0 else start))
            end = rank if end is None else int(end)
            end = max(0, min(rank, end + rank if end < 0 else end))
            out = node.outputs[0]
            value = gs.Constant(f"{out.name}.folded", np.array(shape[start:end], dtype=np.int64))
            for c in list(out.outputs):
                for i, t in enumerate(c.inputs):
                    if t is out:
                        c.inputs[i] = value
            if out.name in {t.name for t in graph.outputs}:
                continue
            node.outputs.clear()
            n += 1
        return n

    @staticmethod
    def _is_noop(node: gs.Node) -> bool:
        """A node whose output equals its data input once shapes are fixed: zero Pad, full Slice, identity
        Transpose, Reshape/Expand to the input's own static shape, one-input Concat; or whose consumers compute the
        same without it (an Expand that their broadcasting already does)."""
        if not node.inputs or len(node.outputs) != 1:
            return False
        x = node.inputs[0]
        shape = x.shape
        static = static_shape(shape) is not None
        if node.op == "Pad":
            pads = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            axes = node.inputs[3] if len(node.inputs) > 3 else None
            return pads is not None and not pads.any() and (axes is None or not axes.name)
        if node.op == "Slice" and static and len(node.inputs) >= 3:
            vals = [const_value(t) if t.name else None for t in node.inputs[1:]]
            if any(v is None for v in vals[:2]) or any(v is None for v, t in zip(vals[2:], node.inputs[3:]) if t.name):
                return False
            starts, ends = vals[0], vals[1]
            rank = len(shape)
            axes = vals[2] if len(vals) > 2 and vals[2] is not None else np.arange(len(starts))
            steps = vals[3] if len(vals) > 3 and vals[3] is not None else np.ones(len(starts), np.int64)
            for s_, e, a, st in zip(starts, ends, axes, steps):
                dim = shape[int(a) % rank]
                if int(st) != 1 or int(s_) not in (0, -dim) and not (int(s_) < -dim) or int(e) < dim:
                    return False
            return True
        if node.op == "Transpose":
            perm = node.attrs.get("perm")
            return perm is not None and list(perm) == list(range(len(perm)))
        if node.op in ("Reshape", "Expand") and static and len(node.inputs) == 2:
            target = const_value(node.inputs[1])
            out = node.outputs[0].shape
            if (target is not None and out is not None and list(out) == list(shape)
                    and (node.op == "Reshape" or list(target) == list(shape))):
                return True
        if node.op == "Concat":
            return len(node.inputs) == 1
        if node.op == "Expand":
            return _absorbed_by_broadcast(node)
        return False

    @classmethod
    def _drop_noops(cls, graph: gs.Graph) -> int:
        outs = graph_output_names(graph)
        n = 0
        for node in list(graph.nodes):
            if not cls._is_noop(node) or node.outputs[0].name in outs:
                continue
            src, dst = node.inputs[0], node.outputs[0]
            if src.dtype is not None and dst.dtype is not None and src.dtype != dst.dtype:
                continue
            _bypass(node, src, dst)
            n += 1
        return n

    @staticmethod
    def _drop_identities(graph: gs.Graph) -> int:
        outs = graph_output_names(graph)
        n = 0
        for node in list(graph.nodes):
            if node.op != "Identity" or len(node.inputs) != 1 or len(node.outputs) != 1:
                continue
            src, dst = node.inputs[0], node.outputs[0]
            if dst.name in outs:
                if src.name in outs or isinstance(src, gs.Constant) or not src.inputs:
                    continue  # an Identity that exposes a constant/input as an output must stay
                # move the output name onto the producer: its output tensor becomes the graph output tensor
                prod = src.inputs[0]
                idx = prod.outputs.index(src)
                for c in list(src.outputs):
                    if c is node:
                        continue
                    c.inputs[c.inputs.index(src)] = dst
                prod.outputs[idx] = dst
                node.outputs.clear()
                node.inputs.clear()
            else:
                _bypass(node, src, dst)
            n += 1
        return n
