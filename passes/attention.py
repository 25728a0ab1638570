"""The attention core, found one way for every pass and check that needs it.

An attention core is

    QK^T MatMul -> score ops -> Softmax -> probability ops -> attention x V MatMul

where QK^T and attention x V multiply two computed tensors (no constant operand), the score ops are what exporters
put between QK^T and the Softmax (scaling by a constant, additive masks and position biases, constant or computed,
``Where`` masks, layout ops, Q/DQ pairs) and the probability ops what they put after it (layout ops, dropout,
casts, Q/DQ, a ``Where`` that replaces some probabilities by a constant, as PyTorch's SDPA export does for NaN
rows). The Softmax is the anchor: ``match_core`` walks up from its input to the first MatMul of two computed
tensors, trying both sides of a binary op whose operands are both computed (a mask added to the scores), and down
from its output to the MatMuls that read the probabilities as their first operand.

Users add their own checks on top: ``annotate`` labels every core it finds, ``fuse_attention`` (ORT's fused
QAttention kernel) takes only cores whose score ops are at most one scalar scale, and the TensorRT check reads
the Q/DQ placement around both MatMuls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

# data-movement ops: the data is the first input, the others are shapes, axes or indices
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Slice",
                        "Split", "Gather", "Dropout", "QuantizeLinear", "DequantizeLinear"})
# binary ops that may combine the scores with a constant (scale, bias) or with another computed tensor (a mask)
SCORE_BINARY_OPS = frozenset({"Mul", "Div", "Add", "Sub"})
MAX_SCORE_OPS = 24


@dataclass
class AttentionCore:
    softmax: gs.Node
    qk: gs.Node
    scores: list[gs.Node] = field(default_factory=list)  # between QK^T and the Softmax, from the Softmax upward
    av: list[gs.Node] = field(default_factory=list)  # the MatMuls reading the probabilities as operand 0
    probs: list[gs.Node] = field(default_factory=list)  # between the Softmax and attention x V


def is_const(t: gs.Tensor) -> bool:
    """Constant without loading its values (weights can be large)."""
    return isinstance(t, gs.Constant) or (len(t.inputs) == 1 and t.inputs[0].op == "Constant")


def computed_inputs(n: gs.Node) -> list[gs.Tensor]:
    """Non-constant, non-empty inputs."""
    return [t for t in n.inputs if t.name and not is_const(t)]


def is_activation_matmul(n: gs.Node) -> bool:
    """A MatMul of two computed tensors (no weight)."""
    return n.op == "MatMul" and len(computed_inputs(n)) == 2


def _score_data_inputs(n: gs.Node) -> list[gs.Tensor] | None:
    """The inputs a walk from the Softmax up may follow through ``n``, or None if ``n`` is not a score op."""
    if n.op in LAYOUT_OPS:
        data = n.inputs[0] if n.inputs else None
        return [data] if data is not None and not is_const(data) else []
    if n.op in SCORE_BINARY_OPS and len(n.inputs) == 2:
        if n.op == "Div" and is_const(n.inputs[0]):
            return None  # c / scores is not a scaling of the scores
        return computed_inputs(n)
    if n.op == "Where" and len(n.inputs) == 3:  # Where(mask, scores, fill) or Where(mask, fill, scores)
        return [t for t in n.inputs[1:] if not is_const(t)]
    return None


def _find_qk(t: gs.Tensor, path: list[gs.Node], budget: list[int]) -> gs.Node | None:
    """Depth-first from ``t`` up through score ops to a MatMul of two computed tensors; ``path`` collects the score
    ops on the way (from the Softmax upward) and is left holding the successful path."""
    while budget[0] > 0:
        budget[0] -= 1
        if len(t.inputs) != 1:
            return None
        p = t.inputs[0]
        if is_activation_matmul(p):
            return p
        data = _score_data_inputs(p)
        if not data:
            return None
        path.append(p)
        if len(data) == 1:
            t = data[0]
            continue
        mark = len(path)
        for d in data:
            hit = _find_qk(d, path, budget)
            if hit is not None:
                return hit
            del path[mark:]
        return None
    return None


def _find_av(t: gs.Tensor, outs: set[str]) -> tuple[list[gs.Node], list[gs.Node]]:
    """The activation MatMuls reading ``t`` (through layout ops and constant scaling) as operand 0, and the nodes
    passed on the way."""
    av: list[gs.Node] = []
    passed: list[gs.Node] = []
    frontier = [t]
    seen: set[int] = set()
    while frontier and len(seen) < MAX_SCORE_OPS:
        cur = frontier.pop()
        for c in cur.outputs:
            if id(c) in seen:
                continue
            seen.add(id(c))
            if is_activation_matmul(c):
                if c.inputs[0] is cur:
                    av.append(c)
            elif _passes_probs(c, cur):
                passed.append(c)
                frontier.extend(o for o in c.outputs if o.name not in outs)
    return av, passed


def _passes_probs(c: gs.Node, t: gs.Tensor) -> bool:
    """``c`` moves, scales or guards the probabilities ``t`` (a layout op on its data input, a scaling by a constant,
    a Where choosing between ``t`` and a constant)."""
    if c.op in LAYOUT_OPS:
        return c.inputs[0] is t
    if c.op == "Where" and len(c.inputs) == 3:  # a guard such as Where(IsNaN(p), 0, p): p or a constant fill
        data = c.inputs[1:]
        return any(d is t for d in data) and all(d is t or is_const(d) for d in data)
    ci = computed_inputs(c)
    return len(ci) == 1 and ci[0] is t and (c.op == "Mul" or (c.op == "Div" and c.inputs[0] is t))


def match_core(softmax: gs.Node, outs: set[str] | None = None) -> AttentionCore | None:
    """The attention core around ``softmax``, or None if no QK^T MatMul feeds it."""
    if softmax.op != "Softmax" or not softmax.inputs:
        return None
    path: list[gs.Node] = []
    qk = _find_qk(softmax.inputs[0], path, [MAX_SCORE_OPS])
    if qk is None:
        return None
    av, probs = _find_av(softmax.outputs[0], outs or set())
    return AttentionCore(softmax, qk, path, av, probs)


def find_cores(graph: gs.Graph) -> list[AttentionCore]:
    """Every attention core of ``graph``, in the order of its QK^T MatMuls in the node list."""
    pos = {id(n): i for i, n in enumerate(graph.nodes)}
    cores = [c for n in graph.nodes if n.op == "Softmax" and (c := match_core(n)) is not None]
    return sorted(cores, key=lambda c: pos[id(c.qk)])
