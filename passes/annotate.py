"""Annotate: label every quantizable node with a role and a transformer block index, from graph structure.

Roles: patch_embed, qkv (or q/k/v), attn_qk, attn_av, proj, fc1, fc2, head, conv, linear. Exporter node names
are not used. The pass does not change the graph; its report counts the roles it found.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import onnx_graphsurgeon as gs

from vitc.passes.base import PassResult
from vitc.passes.graphutil import const_value

PASSTHROUGH = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Slice", "Split",
               "Gather", "Mul", "Div", "QuantizeLinear", "DequantizeLinear"}
QUANTIZABLE = {"MatMul", "Gemm", "Conv"}


@dataclass(frozen=True)
class Role:
    role: str
    block: int | None


def _source(t: gs.Tensor, depth: int = 8) -> gs.Node | None:
    """The first producer of ``t`` that is not a layout/scaling op."""
    for _ in range(depth):
        if len(t.inputs) != 1:
            return None
        p = t.inputs[0]
        if p.op in PASSTHROUGH and p.op not in ("Mul", "Div"):
            acts = [i for i in p.inputs if const_value(i) is None]
            if not acts:
                return None
            t = acts[0]
            continue
        if p.op in ("Mul", "Div"):
            acts = [i for i in p.inputs if const_value(i) is None]
            if len(acts) == 1:  # scaling by a constant (attention 1/sqrt(d))
                t = acts[0]
                continue
        return p
    return None


def _sinks(t: gs.Tensor, depth: int = 8) -> list[gs.Node]:
    """Consumers of ``t`` looking through a bias Add and layout ops."""
    out, frontier = [], list(t.outputs)
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n.op == "Add" and any(const_value(i) is not None for i in n.inputs):
                nxt.extend(n.outputs[0].outputs)
            elif n.op in ("Reshape", "Transpose", "Cast", "Split", "Gather", "Squeeze", "Unsqueeze", "Slice") or (
                    n.op in ("Mul", "Div") and any(_is_scalar(i) for i in n.inputs)):
                nxt.extend(c for o in n.outputs for c in o.outputs)
            else:
                out.append(n)
        frontier = nxt
        if not frontier:
            break
    return out


def _is_activation_fn(n: gs.Node) -> bool:
    """GELU (fused or decomposed: x/sqrt2 -> Erf, tanh form), ReLU."""
    if n.op in ("Gelu", "FastGelu", "Relu", "BiasGelu"):
        return True
    if n.op in ("Div", "Mul", "Pow"):
        return any(c.op in ("Erf", "Tanh", "Mul") and any(cc.op in ("Erf", "Tanh") for o in c.outputs for cc in o.outputs)
                   or c.op in ("Erf", "Tanh") for c in n.outputs[0].outputs)
    return False


def _is_scalar(t: gs.Tensor) -> bool:
    v = const_value(t)
    return v is not None and v.size == 1


def _from_graph_input(t: gs.Tensor, graph_inputs: set[str]) -> bool:
    for _ in range(4):
        if t.name in graph_inputs:
            return True
        if len(t.inputs) != 1 or t.inputs[0].op not in ("Cast", "Identity", "Reshape", "Transpose"):
            return False
        t = t.inputs[0].inputs[0]
    return False


def has_const_weight(node: gs.Node) -> bool:
    return len(node.inputs) >= 2 and const_value(node.inputs[1]) is not None


def annotate(graph: gs.Graph) -> dict[str, Role]:
    graph.toposort()
    roles: dict[str, Role] = {}
    attn_seen = 0
    graph_inputs = {t.name for t in graph.inputs}
    ln_after_last_block = False
    for node in graph.nodes:
        if node.op == "LayerNormalization" and attn_seen:
            ln_after_last_block = True
        if node.op not in QUANTIZABLE:
            continue
        name = node.name
        if node.op == "Conv":
            src = node.inputs[0]
            roles[name] = Role("patch_embed" if _from_graph_input(src, graph_inputs) else "conv",
                               None if attn_seen == 0 else attn_seen - 1)
            continue
        if not has_const_weight(node):
            a, b = (_source(i) for i in node.inputs[:2])
            if (a is not None and a.op == "Softmax") or (b is not None and b.op == "Softmax"):
                roles[name] = Role("attn_av", attn_seen - 1 if attn_seen else None)
            else:
                roles[name] = Role("attn_qk", attn_seen)
                attn_seen += 1
                ln_after_last_block = False
            continue
        src = _source(node.inputs[0])
        sinks = _sinks(node.outputs[0])
        block = attn_seen - 1 if attn_seen else None
        if src is not None and src.op in ("Gelu", "FastGelu", "Relu", "Erf", "Sigmoid", "Tanh"):
            role = "fc2"
        elif any(_is_activation_fn(s) for s in sinks):
            role = "fc1"
        elif src is not None and src.op == "MatMul" and not has_const_weight(src):
            role = "proj"
        elif src is not None and src.op == "LayerNormalization":
            # qkv projections feed reshape/transpose into the attention matmul of the *next* block index
            if any(s.op == "MatMul" and not has_const_weight(s) for s in sinks):
                role, block = "qkv", attn_seen
            elif ln_after_last_block and attn_seen:
                role = "head"
            else:
                role = "linear"
        else:
            role = "linear"
        roles[name] = Role(role, block)
    return roles


class AnnotatePass:
    name: ClassVar[str] = "annotate"

    def __init__(self):
        self.roles: dict[str, Role] = {}

    def run(self, graph: gs.Graph) -> PassResult:
        self.roles = annotate(graph)
        counts = Counter(r.role for r in self.roles.values())
        return PassResult(self.name, False, {f"role {k}": v for k, v in sorted(counts.items())})
