"""TensorRT only: quantize the residual (skip) input of Adds that follow a quantized linear (a plan extension).

TensorRT fuses an elementwise Add that follows a Conv/GEMM into the GEMM's epilogue when the Add's other input is
quantized (its Q/DQ placement guide: "quantize the residual input of skip-Adds"); left in float, the Add runs as
its own kernel reading a float/fp16 tensor. In a transformer block that is ``x + proj(attn)`` and ``x + fc2(h)``:
the linear's output goes straight into the Add (through at most a Reshape), and ``x``, the skip input, is what
gets Q/DQ. The Add's output stays float (it feeds LayerNorm and the next skip connection).

This module does not insert anything itself, so it is not a pass: :func:`extend_plan` (called by
compiler/quant/planner.py) adds one plan entry per residual Add (role ``residual``, op ``Add``, the skip tensor as its
only activation) *before calibration*, so the skip tensor is calibrated with everything else and
:class:`~vitc.passes.insert_qdq.InsertQDQPass` gives it its Q/DQ like any other planned activation. The policy
decides (``trt_policy(quantize_residual=False)`` keeps the skip in float).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import onnx_graphsurgeon as gs

from vitc.compiler.quant.policy import NodePlan, Plan, Policy
from vitc.passes.graphutil import const_value

RESIDUAL_ROLE = "residual"
WEIGHTED_OPS = ("Gemm", "MatMul", "Conv")
# ops a GEMM output may pass through on its way into the Add: shuffles, and a Mul/Div by a constant (DINOv2/CaiT
# LayerScale, a per-channel gamma), which TensorRT fuses into the GEMM epilogue with the Add
SHAPE_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
SCALE_OPS = ("Mul", "Div")


@dataclass(frozen=True)
class ResidualSite:
    add: str  # the Add node
    skip: str  # the tensor that gets Q/DQ (the Add input that does not come from the linear)
    linear: str  # the quantized linear whose output is the Add's other input
    block: int | None


def weighted_source(t: gs.Tensor, weighted: set[str], depth: int = 4) -> gs.Node | None:
    """The planned weighted node (Gemm/MatMul/Conv with a constant weight) that produces ``t``, looking through
    shape-only ops and a scaling by a constant (``Div`` only as ``x / c``); None if ``t`` comes from anything
    else."""
    for _ in range(depth + 1):
        if len(t.inputs) != 1:
            return None
        p = t.inputs[0]
        if p.op in WEIGHTED_OPS:
            return p if p.name in weighted else None
        acts = [i for i in p.inputs if const_value(i) is None]
        if len(acts) != 1:
            return None
        if p.op in SCALE_OPS and (p.op == "Mul" or p.inputs[0] is acts[0]):
            t = acts[0]
            continue
        if p.op not in SHAPE_OPS:
            return None
        t = acts[0]
    return None


def residual_sites(graph: gs.Graph, plan: Plan) -> list[ResidualSite]:
    """Adds of two non-constant tensors where one comes from a quantized weighted node (through shape ops)."""
    weighted = {n.node: n for n in plan.quantized() if n.op in WEIGHTED_OPS and n.weight is not None}
    names = set(weighted)
    sites = []
    for node in graph.nodes:
        if node.op != "Add" or len(node.inputs) != 2 or len(node.outputs) != 1:
            continue
        if any(const_value(t) is not None for t in node.inputs) or node.inputs[0] is node.inputs[1]:
            continue
        src = [weighted_source(t, names) for t in node.inputs]
        if src[0] is None and src[1] is None:
            continue
        # the skip input is the one that does not come from a linear; with linears on both sides, input 0
        # gets Q/DQ and input 1's GEMM takes the Add in its epilogue
        skip = 0 if src[0] is None or src[1] is not None else 1
        lin = src[1 - skip]
        sites.append(ResidualSite(node.name, node.inputs[skip].name, lin.name, weighted[lin.name].block))
    return sites


def extend_plan(graph: gs.Graph, plan: Plan, policy: Policy) -> Plan:
    """``plan`` plus one entry per residual Add, with the spec the policy gives role ``residual``."""
    nodes = list(plan.nodes)
    planned = {n.node for n in nodes}
    for s in residual_sites(graph, plan):
        if s.add in planned:
            continue
        rule = policy.lookup(s.add, RESIDUAL_ROLE, s.block)
        nodes.append(NodePlan(node=s.add, op="Add", role=RESIDUAL_ROLE, block=s.block, spec=rule.spec,
                              rule=rule.name, activations=[s.skip]))
    return replace(plan, nodes=nodes)
