"""Resolve a policy into a plan on an annotated graph (before the graph is touched)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from vitc.compiler.policy import Granularity, NodePlan, Plan, Policy
from vitc.passes.annotate import Role, has_const_weight
from vitc.passes.graphutil import const_value


def resolve_plan(graph: gs.Graph, policy: Policy, roles: dict[str, Role]) -> Plan:
    nodes: list[NodePlan] = []
    tensors = graph.tensors()
    for node in graph.nodes:
        r = roles.get(node.name)
        if r is None:
            continue
        rule = policy.lookup(node.name, r.role, r.block)
        spec = rule.spec
        acts: list[str] = []
        weight = axis = None
        if node.op == "MatMul":
            if has_const_weight(node):
                acts, weight = [node.inputs[0].name], node.inputs[1].name
                axis = len(const_value(node.inputs[1]).shape) - 1  # [.., K, N]: one scale per output column
            else:
                acts = [node.inputs[0].name, node.inputs[1].name]
        elif node.op == "Gemm":
            if not has_const_weight(node) or node.attrs.get("transA", 0):
                continue
            acts, weight = [node.inputs[0].name], node.inputs[1].name
            axis = 0 if node.attrs.get("transB", 0) else 1
        elif node.op == "Conv":
            if not has_const_weight(node):
                continue
            acts, weight, axis = [node.inputs[0].name], node.inputs[1].name, 0
        else:
            continue
        acts = [a for a in acts if const_value(tensors[a]) is None]
        simulated = not spec.skip and spec.activation is Granularity.PER_CHANNEL
        nodes.append(NodePlan(node=node.name, op=node.op, role=r.role, block=r.block, spec=spec, rule=rule.name,
                              activations=acts, weight=weight, weight_axis=axis, simulated=simulated))
    return Plan(policy=policy.name, nodes=nodes)
