"""Annotate: label transformer nodes with a role and a block index, from graph structure only.

Exporter node names are never read: the roles come from how tensors flow, so timm (legacy and dynamo exporters),
HF-transformers and BERT-like (post-norm) graphs get the same labels, fused (the default pipeline) or not
(``--no-fuse``: decomposed LayerNorm and GELU are recognised too).

Quantizable nodes (MatMul/Gemm/Conv, the rows of a plan):

- ``patch_embed``: a Conv reading the graph input; ``conv``: any other Conv; ``deconv``: a ConvTranspose (decoders).
- ``q``, ``k``, ``v``: separate projections (HF exports) feeding the query / key side of Q K^T or the value side of
  attention x V; ``qkv``: one fused projection feeding several of them (timm).
- ``attn_qk``: the activation x activation MatMul whose result goes to the softmax; ``attn_av``: softmax x V.
- ``proj``: the linear after attention x V; ``fc1``: the linear feeding the MLP activation; ``fc2``: the linear
  reading it; ``head``: a linear reading the final norm; ``linear``/``matmul``: anything else.

Float nodes (never quantized themselves; policies refer to them with ``input_from``):

- ``norm1``: the LayerNorm whose output is the input of block i's attention projections; ``norm2``: the one feeding
  block i's fc1. (Pre-norm ViT: the block's two norms. Post-norm BERT: the embedding norm is block 0's ``norm1``,
  the norm after block i's attention residual is block i's ``norm2``, the norm after its MLP residual is block
  i+1's ``norm1``.) ``final_norm``: a LayerNorm after the last attention that feeds no block (block None);
  ``norm``: any other LayerNorm.
- ``softmax``, ``gelu`` (the MLP activation: GELU in any form, or ReLU/QuickGELU/SiLU), ``residual_add`` (the Add
  of a skip connection and a ``proj``/``fc2`` output), ``hadamard`` (the float MatMul passes/fc2_hadamard.py puts
  before fc2; annotate looks through it, so fc2 keeps its role).

Blocks are numbered from 0 in attention order: a node's block is the attention it feeds (q/k/v, norm1) or the one
it follows (everything else). Nodes after the final norm (head, a convolutional decoder) and before the first
attention (patch embedding) have block None.

The pass does not change the graph (apart from sorting it); its report counts the roles it found.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import onnx_graphsurgeon as gs

from vitc.passes.attention import LAYOUT_OPS, computed_inputs, find_cores, is_const
from vitc.passes.base import PassResult
from vitc.passes.graphutil import HADAMARD_SUFFIX

QUANTIZABLE = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
ACTIVATION_FNS = {"Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Relu"}
GATES = {"Erf", "Tanh", "Sigmoid"}

# roles of quantizable nodes, and of the float nodes that are annotated for policy matching
QUANTIZABLE_ROLES = ("patch_embed", "conv", "deconv", "qkv", "q", "k", "v", "attn_qk", "attn_av", "proj", "fc1", "fc2",
                     "head", "linear", "matmul")
FLOAT_ROLES = ("norm1", "norm2", "final_norm", "norm", "softmax", "gelu", "residual_add")
# float parts of exact rewrites (passes/fc2_hadamard.py): labelled for explain, never named by a policy rule
REWRITE_ROLES = ("hadamard",)
ROLES = QUANTIZABLE_ROLES + FLOAT_ROLES + REWRITE_ROLES


@dataclass(frozen=True)
class Role:
    role: str
    block: int | None
    # roles of the nodes producing this node's activation inputs (looking through layout ops and constant
    # scaling); None for an input that comes from the graph input or an unlabelled node
    inputs: tuple[str | None, ...] = ()


# -- small structural helpers -----------------------------------------------------------------------------------------
def has_const_weight(node: gs.Node) -> bool:
    return len(node.inputs) >= 2 and is_const(node.inputs[1])


def _is_scaling(n: gs.Node) -> bool:
    """x * c, c * x, x / c (attention 1/sqrt(d), layer scale, migration factors, GELU's 0.5)."""
    if n.op == "Mul":
        return len(n.inputs) == 2 and sum(is_const(t) for t in n.inputs) == 1
    if n.op == "Div":
        return len(n.inputs) == 2 and not is_const(n.inputs[0]) and is_const(n.inputs[1])
    return False


def _is_bias_add(n: gs.Node) -> bool:
    return n.op == "Add" and len(n.inputs) == 2 and sum(is_const(t) for t in n.inputs) == 1


def _passes_through(n: gs.Node) -> bool:
    return n.op in LAYOUT_OPS or _is_scaling(n) or _is_bias_add(n) or n.name.endswith(HADAMARD_SUFFIX)


def _upstream(t: gs.Tensor, stop: set[str], depth: int = 24) -> gs.Node | None:
    """The node producing ``t``, looking through layout ops, constant scaling and bias Adds (but not through the
    nodes named in ``stop``). None if ``t`` comes from a graph input or an initializer."""
    for _ in range(depth):
        if len(t.inputs) != 1:
            return None
        p = t.inputs[0]
        if p.name in stop or not _passes_through(p):
            return p
        acts = computed_inputs(p)
        if not acts:
            return None
        t = acts[0]
    return None


def _downstream(t: gs.Tensor, stop: set[str], limit: int = 256) -> list[tuple[gs.Node, int]]:
    """The consumers of ``t`` (node, input index), looking through layout ops, constant scaling and bias Adds."""
    out: list[tuple[gs.Node, int]] = []
    seen: set[tuple[str, int]] = set()
    frontier = [t]
    while frontier and len(seen) < limit:
        cur = frontier.pop()
        for c in cur.outputs:
            for i, inp in enumerate(c.inputs):
                if inp is not cur or (c.name, i) in seen:
                    continue
                seen.add((c.name, i))
                data_in = i == 0 if c.op in LAYOUT_OPS else not is_const(inp)
                if c.name not in stop and _passes_through(c) and data_in:
                    frontier.extend(c.outputs)
                else:
                    out.append((c, i))
    return out


def _from_graph_input(t: gs.Tensor, graph_inputs: set[str]) -> bool:
    for _ in range(6):
        if t.name in graph_inputs:
            return True
        if len(t.inputs) != 1 or t.inputs[0].op not in ("Cast", "Identity", "Reshape", "Transpose", "Pad"):
            return False
        t = t.inputs[0].inputs[0]
    return False


def _layernorm_output(n: gs.Node) -> gs.Node | None:
    """For the core of a decomposed LayerNorm, ``(x - mean(x)) / sqrt(var + eps)`` (Div, or Mul by a Reciprocal),
    the node producing the normalized output after the optional gamma/beta; None if ``n`` is not such a core."""
    if n.op not in ("Div", "Mul") or len(n.inputs) != 2:
        return None
    d, s = n.inputs
    sub = d.inputs[0] if len(d.inputs) == 1 else None
    if sub is None or sub.op != "Sub" or len(sub.inputs) != 2:
        return None
    mean = sub.inputs[1].inputs[0] if len(sub.inputs[1].inputs) == 1 else None
    if mean is None or mean.op != "ReduceMean" or mean.inputs[0] is not sub.inputs[0]:
        return None
    root = s.inputs[0] if len(s.inputs) == 1 else None
    if root is None:
        return None
    if n.op == "Mul":
        if root.op != "Reciprocal" or not root.inputs[0].inputs:
            return None
        root = root.inputs[0].inputs[0]
    if root.op != "Sqrt":
        return None
    last = n
    for _ in range(2):  # gamma, beta
        outs = last.outputs[0].outputs
        if len(outs) != 1 or outs[0].op not in ("Mul", "Add") or not (_is_scaling(outs[0]) or _is_bias_add(outs[0])):
            break
        last = outs[0]
    return last


def _is_activation_fn(n: gs.Node) -> bool:
    """GELU fused (Gelu/FastGelu/...) or decomposed (x * (1 + erf(x/sqrt2)), tanh form, x * sigmoid(a x)), ReLU."""
    if n.op in ACTIVATION_FNS:
        return True
    if n.op != "Mul" or len(computed_inputs(n)) != 2:
        return False
    for a in computed_inputs(n):
        t = a
        for _ in range(3):
            if len(t.inputs) != 1:
                break
            p = t.inputs[0]
            if p.op in GATES:
                return True
            if not (_is_scaling(p) or _is_bias_add(p)):
                break
            t = computed_inputs(p)[0]
    return False


# -- the pass ---------------------------------------------------------------------------------------------------------
def annotate(graph: gs.Graph) -> dict[str, Role]:
    """Node name -> role for every node this pass recognises (quantizable nodes always get one)."""
    graph.toposort()
    nodes = list(graph.nodes)
    pos = {n.name: i for i, n in enumerate(nodes)}
    graph_inputs = {t.name for t in graph.inputs}
    labels: dict[str, tuple[str, int | None]] = {}

    # 1. LayerNorms (fused, or the output node of a decomposed one) and activation functions
    norms: list[gs.Node] = []
    for n in nodes:
        if n.op == "LayerNormalization":
            norms.append(n)
        else:
            out = _layernorm_output(n)
            if out is not None:
                norms.append(out)
    act_fns = [n for n in nodes if _is_activation_fn(n)]
    stop = {n.name for n in norms} | {n.name for n in act_fns}

    # 2. attention cores, numbered in graph order (block b is the b-th core)
    cores = find_cores(graph)
    for b, c in enumerate(cores):
        labels[c.qk.name] = ("attn_qk", b)
        labels[c.softmax.name] = ("softmax", b)
        for av in c.av:
            labels[av.name] = ("attn_av", b)
    block = {id(c): b for b, c in enumerate(cores)}
    qk_of = {c.qk.name: c for c in cores}
    av_of = {av.name: c for c in cores for av in c.av}
    qk_pos = [pos[c.qk.name] for c in cores]
    stop |= set(qk_of) | set(av_of)

    def pos_block(node: gs.Node) -> int | None:
        b = sum(1 for p in qk_pos if p <= pos[node.name]) - 1
        return b if b >= 0 else None

    # 3. linears (constant weight)
    linears = [n for n in nodes if n.op in ("MatMul", "Gemm") and has_const_weight(n)
               and not n.name.endswith(HADAMARD_SUFFIX)]
    stop |= {n.name for n in linears}
    act_names = {n.name for n in act_fns}
    for n in linears:
        down = _downstream(n.outputs[0], stop)
        slots: set[str] = set()
        blocks: list[int] = []
        for c, i in down:
            if c.name in qk_of:
                slots.add("q" if i == 0 else "k")
                blocks.append(block[id(qk_of[c.name])])
            elif c.name in av_of and _upstream(c.inputs[i], stop) is not av_of[c.name].softmax:
                slots.add("v")
                blocks.append(block[id(av_of[c.name])])
        src = _upstream(n.inputs[0], stop)
        if slots:
            labels[n.name] = ("qkv" if len(slots) > 1 else slots.pop(), min(blocks))
        elif src is not None and src.name in av_of:
            labels[n.name] = ("proj", block[id(av_of[src.name])])
        elif any(c.name in act_names for c, _ in down):
            labels[n.name] = ("fc1", pos_block(n))
    for f in act_fns:  # the MLP activation: reads an fc1
        ups = [_upstream(a, stop) for a in computed_inputs(f)]
        fc1 = next((u for u in ups if u is not None and labels.get(u.name, ("",))[0] == "fc1"), None)
        if fc1 is not None:
            labels[f.name] = ("gelu", labels[fc1.name][1])
    for n in linears:
        if n.name in labels:
            continue
        src = _upstream(n.inputs[0], stop)
        if src is not None and labels.get(src.name, ("",))[0] == "gelu":
            labels[n.name] = ("fc2", labels[src.name][1])

    # 4. norms: what they feed
    tail_start: int | None = None
    for ln in norms:
        fed = [labels.get(c.name, ("", None)) for c, _ in _downstream(ln.outputs[0], stop)]
        attn_in = [b for r, b in fed if r in ("q", "k", "v", "qkv")]
        mlp_in = [b for r, b in fed if r == "fc1"]
        if attn_in:
            labels[ln.name] = ("norm1", min(attn_in))
        elif mlp_in:
            labels[ln.name] = ("norm2", min(mlp_in))
        elif cores and pos[ln.name] > qk_pos[-1]:
            labels[ln.name] = ("final_norm", None)
            tail_start = pos[ln.name] if tail_start is None else min(tail_start, pos[ln.name])
        else:
            labels[ln.name] = ("norm", pos_block(ln))

    def block_of(node: gs.Node) -> int | None:
        if tail_start is not None and pos[node.name] > tail_start:
            return None
        return pos_block(node)

    # 5. the rest of the quantizable nodes
    for n in nodes:
        if n.op not in QUANTIZABLE or n.name in labels:
            continue
        if n.name.endswith(HADAMARD_SUFFIX):  # passes/fc2_hadamard.py's rotation: float by design
            labels[n.name] = ("hadamard", block_of(n))
        elif n.op == "Conv":
            if not has_const_weight(n):
                continue
            labels[n.name] = ("patch_embed", None) if _from_graph_input(n.inputs[0], graph_inputs) else \
                ("conv", block_of(n))
        elif n.op == "ConvTranspose":
            if has_const_weight(n):
                labels[n.name] = ("deconv", block_of(n))
        elif has_const_weight(n):
            src = _upstream(n.inputs[0], stop)
            if src is not None and labels.get(src.name, ("",))[0] == "final_norm":
                labels[n.name] = ("head", None)
            else:
                labels[n.name] = ("linear", block_of(n))
        else:
            labels[n.name] = ("matmul", block_of(n))

    # 6. residual Adds: a skip connection plus a proj/fc2 output
    for n in nodes:
        if n.op != "Add" or len(computed_inputs(n)) != 2 or n.inputs[0] is n.inputs[1]:
            continue
        for a in computed_inputs(n):
            src = _upstream(a, stop)
            if src is not None and labels.get(src.name, ("",))[0] in ("proj", "fc2"):
                labels[n.name] = ("residual_add", labels[src.name][1])
                break

    roles: dict[str, Role] = {}
    for n in nodes:
        if n.name not in labels:
            continue
        role, block = labels[n.name]
        inputs: tuple[str | None, ...] = ()
        if n.op in QUANTIZABLE:
            srcs = [_upstream(t, stop) for t in computed_inputs(n)[: 1 if has_const_weight(n) else 2]]
            inputs = tuple(None if s is None or s.name not in labels else labels[s.name][0] for s in srcs)
        roles[n.name] = Role(role, block, inputs)
    return roles


def block_count(roles: dict[str, Role]) -> int:
    """Number of transformer blocks (attention cores) the annotation found."""
    return 1 + max((r.block for r in roles.values() if r.role == "attn_qk" and r.block is not None), default=-1)


class AnnotatePass:
    name: ClassVar[str] = "annotate"

    def run(self, graph: gs.Graph) -> PassResult[dict[str, Role]]:
        """The roles (node name -> Role) are the result's ``artifacts``."""
        roles = annotate(graph)
        counts = Counter(r.role for r in roles.values())
        return PassResult(self.name, False, {f"role {k}": v for k, v in sorted(counts.items())}, artifacts=roles)
