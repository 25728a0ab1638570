"""Residual-stream rotation: spread the stream's outlier channels over all channels, exactly, in float.

Trained ViTs carry a few residual-stream channels with ranges 5-10x the others, and every LayerNorm output that
feeds q/k/v and fc1 inherits them: a per-tensor int8 grid sized for those channels leaves the rest a few levels.
This pass multiplies the stream by an orthogonal matrix ``Q`` and folds ``Q`` into every linear that writes the
stream and every linear that reads a LayerNorm of it (as QuaRot / SpinQuant do for LLMs), so the function is unchanged
and the outliers are spread out before any quantizer sees them.

A LayerNorm is not rotation invariant (it subtracts the mean), so two things make the rewrite exact:

- every writer is *centred*: its output is multiplied by ``C = I - 11^T/d``, so the stream has zero mean per token.
  LayerNorm subtracts that mean anyway, so its outputs do not change;
- ``Q`` keeps the all-ones direction (``Q 1 = 1``): a zero-mean stream stays zero-mean, and on it
  ``LayerNorm(x Q) = LayerNorm(x) Q`` for a LayerNorm without affine parameters.

Writers (the patch embedding and the constants added to it, each block's attention projection and fc2) get
``W <- W C Q``. Each LayerNorm's scale and bias move into its readers (``W <- Q^T diag(gamma) W``,
``b <- b + beta W``); the LayerNorm keeps its op with scale 1 and bias 0. A LayerNorm output that reaches anything
other than such a linear (the encoder's output, say) gets one MatMul by ``Q^T diag(gamma)`` plus ``beta`` back.

What the pass does not follow, it leaves unrotated and says why in its notes: a stream tensor that feeds something
other than a LayerNorm or a residual Add (or is a graph output), a writer it cannot reach through layout ops, an
embedding it does not recognise, LayerNorms of different widths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from vitc.passes.base import PassResult
from vitc.passes.graphutil import const_value, finish, last_dim, replace_input

LAYOUT = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
# the MatMul that takes a rotated LayerNorm output back to the original basis for a non-linear consumer (the graph
# output, say): part of the rotation, not a model layer, so the planner keeps it float
UNROTATE_SUFFIX = ".unrotate"


def ones_fixing_rotation(d: int, seed: int) -> np.ndarray:
    """A random orthogonal ``d x d`` matrix (float64) with ``Q 1 = 1``: a Haar-random rotation of the subspace
    orthogonal to the all-ones vector."""
    rng = np.random.default_rng(seed)
    u1 = np.full((d, 1), 1.0 / np.sqrt(d))
    basis, _ = np.linalg.qr(np.concatenate([u1, rng.standard_normal((d, d - 1))], axis=1))
    basis[:, 0] = u1[:, 0]  # QR may flip its sign
    r, rr = np.linalg.qr(rng.standard_normal((d - 1, d - 1)))
    r = r * np.sign(np.diag(rr))  # Haar measure
    inner = np.eye(d)
    inner[1:, 1:] = r
    return basis @ inner @ basis.T


class Refused(Exception):
    """The stream cannot be rotated exactly; the message says where and why."""


@dataclass
class _Stream:
    lns: list[gs.Node] = field(default_factory=list)
    adds: list[gs.Node] = field(default_factory=list)
    writers: list[gs.Node] = field(default_factory=list)  # Gemm/MatMul/Conv whose output is added into the stream
    constants: list[gs.Constant] = field(default_factory=list)  # added into the stream (position embedding, tokens)
    origin: gs.Tensor | None = None


class ResidualRotation:
    name: ClassVar[str] = "rotate_residual"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def run(self, graph: gs.Graph) -> PassResult:
        counts = {"streams rotated": 0, "writers rotated": 0, "LayerNorm readers folded": 0, "un-rotations added": 0}
        try:
            s, d = self._find(graph)
        except Refused as why:
            return PassResult(self.name, False, counts, [f"not rotated: {why}"])
        q = ones_fixing_rotation(d, self.seed)
        cq = (np.eye(d) - np.full((d, d), 1.0 / d)) @ q  # centre, then rotate
        for w in s.writers:
            self._rotate_writer(w, cq)
        for c in s.constants:
            c.values = (np.asarray(c.values, np.float64) @ cq).astype(c.values.dtype)
        for ln in s.lns:
            folded, added = self._fold_readers(graph, ln, q)
            counts["LayerNorm readers folded"] += folded
            counts["un-rotations added"] += added
        counts["streams rotated"] = 1
        counts["writers rotated"] = len(s.writers) + len(s.constants)
        finish(graph)
        return PassResult(self.name, True, counts, [f"width {d}, seed {self.seed}"], artifacts={"seed": self.seed})

    # -- finding the stream ----------------------------------------------------------------------------------------
    def _find(self, graph: gs.Graph) -> tuple[_Stream, int]:
        lns = [n for n in graph.nodes if n.op == "LayerNormalization"]
        if not lns:
            raise Refused("no LayerNormalization")
        widths = set()
        for ln in lns:
            if n_axis(ln) != -1 or const_value(ln.inputs[1]) is None or \
                    (len(ln.inputs) > 2 and const_value(ln.inputs[2]) is None):
                raise Refused(f"LayerNorm {ln.name} is not over the last axis with constant scale and bias")
            widths.add(const_value(ln.inputs[1]).size)
        if len(widths) != 1:
            raise Refused(f"LayerNorms of different widths {sorted(widths)} (a hierarchical model)")
        d = widths.pop()
        s = _Stream(lns=lns)
        outs = {t.name for t in graph.outputs}
        seen: set[str] = set()
        todo = [ln.inputs[0] for ln in lns]
        while todo:
            t = todo.pop()
            if t.name in seen:
                continue
            seen.add(t.name)
            if t.name in outs:
                raise Refused(f"stream tensor {t.name} is a graph output")
            for c in t.outputs:
                if c.op == "LayerNormalization" and c in lns:
                    continue
                if c.op == "Add" and _is_residual(c):
                    if c not in s.adds:
                        s.adds.append(c)
                        todo.append(c.outputs[0])
                    continue
                raise Refused(f"stream tensor {t.name} feeds {c.op} {c.name}")
            p = t.inputs[0] if t.inputs else None
            if p is not None and p.op == "Add" and _is_residual(p):
                if p not in s.adds:
                    s.adds.append(p)
                stream_in, branch = _split(p, seen, lns)
                todo.append(stream_in)
                s.writers.append(self._writer(branch, d))
            elif s.origin is None or s.origin is t:
                s.origin = t
            else:
                raise Refused(f"two stream origins: {s.origin.name} and {t.name}")
        if s.origin is None:
            raise Refused("no stream origin")
        self._embedding(s.origin, d, s)
        for w in s.writers:  # every check before any rewrite: a refusal never leaves a half-rotated graph
            _check_bias(w, d)
        for ln in lns:
            for c in ln.outputs[0].outputs:
                for g in _readers(c, ln.outputs[0], d) or ():
                    _check_bias(g, const_value(g.inputs[1]).shape[-1])
        return s, d

    def _writer(self, t: gs.Tensor, d: int) -> gs.Node:
        """The linear whose output reaches the stream Add as ``t``, through layout ops that keep the last axis (a
        convolution's channels reach the last axis through its flatten/transpose)."""
        start = t
        for _ in range(6):
            p = t.inputs[0] if t.inputs else None
            if p is None or len(t.outputs) != 1:
                break
            if p.op in ("Gemm", "MatMul") and _const_weight(p) and last_dim(t) == d:
                if p.op == "Gemm" and (p.attrs.get("transA", 0) or float(p.attrs.get("alpha", 1.0)) != 1.0
                                       or float(p.attrs.get("beta", 1.0)) != 1.0):
                    break
                return p
            if p.op == "Conv" and _const_weight(p) and const_value(p.inputs[1]).shape[0] == d \
                    and p.attrs.get("group", 1) == 1 and last_dim(start) == d:
                return p
            if p.op in LAYOUT:
                t = p.inputs[0]
                continue
            break
        raise Refused(f"the branch {t.name} added into the stream does not come from a linear layer")

    def _embedding(self, t: gs.Tensor, d: int, s: _Stream) -> None:
        """Every term of the stream's first tensor: constants (position embedding, class/register tokens) and the
        patch-embedding linear or convolution."""
        p = t.inputs[0] if t.inputs else None
        if isinstance(t, gs.Constant):
            if t.values.ndim == 0 or t.values.shape[-1] != d or len(t.outputs) != 1:
                raise Refused(f"constant {t.name} added into the stream is not a width-{d} tensor of its own")
            if t not in s.constants:
                s.constants.append(t)
            return
        if p is None:
            raise Refused(f"the stream starts at graph input {t.name}")
        if p.op == "Add":
            for i in p.inputs:
                self._embedding(i, d, s)
            return
        if p.op == "Concat" and p.attrs.get("axis", 0) != -1 and p.attrs.get("axis", 0) != len(t.shape or []) - 1:
            for i in p.inputs:
                self._embedding(i, d, s)
            return
        if p.op in ("Expand", "Tile") and isinstance(p.inputs[0], gs.Constant):
            self._embedding(p.inputs[0], d, s)
            return
        s.writers.append(self._writer(t, d))

    # -- rewriting -------------------------------------------------------------------------------------------------
    @staticmethod
    def _rotate_writer(w: gs.Node, cq: np.ndarray) -> None:
        wt = const_value(w.inputs[1]).astype(np.float64)
        if w.op == "Conv":  # [d, ...]: the output channel is axis 0
            new = np.tensordot(cq.T, wt, axes=([1], [0]))
        elif w.op == "Gemm" and w.attrs.get("transB", 0):  # [d, k]
            new = cq.T @ wt
        else:  # [k, d]
            new = wt @ cq
        w.inputs[1] = gs.Constant(f"{w.name}.weight.rotated", new.astype(np.float32))
        if len(w.inputs) > 2 and const_value(w.inputs[2]) is not None:
            b = const_value(w.inputs[2]).astype(np.float64)
            w.inputs[2] = gs.Constant(f"{w.name}.bias.rotated", (b.reshape(-1) @ cq).reshape(b.shape).astype(np.float32))

    @staticmethod
    def _fold_readers(graph: gs.Graph, ln: gs.Node, q: np.ndarray) -> tuple[int, int]:
        gamma = const_value(ln.inputs[1]).astype(np.float64).reshape(-1)
        beta = const_value(ln.inputs[2]).astype(np.float64).reshape(-1) if len(ln.inputs) > 2 else np.zeros_like(gamma)
        m = q.T * gamma[None, :]  # Q^T diag(gamma)
        d = gamma.size
        out = ln.outputs[0]
        readers, others = [], []
        for c in list(out.outputs):
            gs_ = _readers(c, out, d)
            if gs_ is None:
                others.append(c)
            else:
                readers += gs_
        for g in readers:
            w = const_value(g.inputs[1]).astype(np.float64)
            bias = beta @ w
            g.inputs[1] = gs.Constant(f"{g.name}.weight.rotated", (m @ w).astype(np.float32))
            if len(g.inputs) > 2 and const_value(g.inputs[2]) is not None:
                b0 = const_value(g.inputs[2]).astype(np.float64)
                g.inputs[2] = gs.Constant(f"{g.name}.bias.rotated", (b0.reshape(-1) + bias).reshape(b0.shape)
                                          .astype(np.float32))
            elif g.op == "Gemm":
                while len(g.inputs) < 2:
                    g.inputs.append(gs.Variable.empty())
                g.inputs.append(gs.Constant(f"{g.name}.bias.rotated", bias.astype(np.float32)))
            else:  # a MatMul reader without a bias: its output gets one
                y = g.outputs[0]
                mm = gs.Variable(f"{g.name}.rotated_out", dtype=y.dtype)
                g.outputs.clear()
                g.outputs.append(mm)
                graph.nodes.append(gs.Node("Add", f"{g.name}.ln_bias", inputs=[mm, gs.Constant(
                    f"{g.name}.ln_bias.value", bias.astype(np.float32))], outputs=[y]))
        added = 0
        if others or out in graph.outputs:
            back = gs.Variable(f"{ln.name}.unrotated", dtype=out.dtype)
            mid = gs.Variable(f"{ln.name}.unrotated_mm", dtype=out.dtype)
            graph.nodes.append(gs.Node("MatMul", f"{ln.name}{UNROTATE_SUFFIX}", inputs=[out, gs.Constant(
                f"{ln.name}.unrotate.matrix", m.astype(np.float32))], outputs=[mid]))
            graph.nodes.append(gs.Node("Add", f"{ln.name}.unrotate_bias", inputs=[mid, gs.Constant(
                f"{ln.name}.unrotate.bias", beta.astype(np.float32))], outputs=[back]))
            for c in others:
                replace_input(c, out, back)
            if out in graph.outputs:
                graph.outputs = [back if t is out else t for t in graph.outputs]
                back.name, out.name = out.name, f"{ln.name}.rotated"
            added = 1
        ln.inputs[1] = gs.Constant(f"{ln.name}.scale.unit", np.ones(d, np.float32))
        if len(ln.inputs) > 2:
            ln.inputs[2] = gs.Constant(f"{ln.name}.bias.zero", np.zeros(d, np.float32))
        return len(readers), added


def _check_bias(g: gs.Node, n: int) -> None:
    """A linear's bias must be absent or a constant vector of its output width (an empty optional input counts as
    absent only for a MatMul, which has none)."""
    if len(g.inputs) < 3:
        return
    b = g.inputs[2]
    v = const_value(b) if b.name else None
    if v is None or v.size != n or v.ndim > 2:
        raise Refused(f"{g.op} {g.name} has a bias that is not a constant vector of width {n}")


def n_axis(ln: gs.Node) -> int:
    a = ln.attrs.get("axis", -1)
    r = len(ln.inputs[0].shape) if ln.inputs[0].shape is not None else None
    return -1 if a == -1 or (r is not None and a == r - 1) else a


def _const_weight(n: gs.Node) -> bool:
    return len(n.inputs) > 1 and const_value(n.inputs[1]) is not None and const_value(n.inputs[0]) is None


def _is_residual(n: gs.Node) -> bool:
    return n.op == "Add" and len(n.inputs) == 2 and all(const_value(i) is None for i in n.inputs)


def _split(add: gs.Node, stream: set[str], lns: list[gs.Node]) -> tuple[gs.Tensor, gs.Tensor]:
    """(stream input, branch input) of a residual Add: the stream input also feeds a LayerNorm or another residual
    Add, the branch only this Add."""
    a, b = add.inputs

    def is_stream(t: gs.Tensor) -> bool:
        return t.name in stream or any((c in lns) or (c is not add and _is_residual(c)) for c in t.outputs)

    if is_stream(a) and not is_stream(b):
        return a, b
    if is_stream(b) and not is_stream(a):
        return b, a
    raise Refused(f"cannot tell the stream from the branch at {add.name}")


def _plain_linear(u: gs.Node, t: gs.Tensor) -> bool:
    return (u.op in ("Gemm", "MatMul") and _const_weight(u) and u.inputs[0] is t
            and not (u.op == "Gemm" and (u.attrs.get("transA", 0) or u.attrs.get("transB", 0)
                                         or float(u.attrs.get("alpha", 1.0)) != 1.0
                                         or float(u.attrs.get("beta", 1.0)) != 1.0)))


def _readers(c: gs.Node, out: gs.Tensor, d: int) -> list[gs.Node] | None:
    """The linears reading the LayerNorm output ``out`` through consumer ``c`` as their A input (``c`` itself, or
    the users of a Reshape ``c`` that keeps the last axis), or None when ``c`` is something else."""
    if c.op == "Reshape" and last_dim(c.outputs[0]) == d and c.outputs[0].outputs:
        users = list(c.outputs[0].outputs)
        return users if all(_plain_linear(u, c.outputs[0]) for u in users) else None
    return [c] if _plain_linear(c, out) else None
