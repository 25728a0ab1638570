"""Resolve a policy into a plan on an annotated graph (before the graph is touched)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from vitc.compiler.calib.calibration import Observer, ObserverConfig
from vitc.compiler.errors import PolicyError
from vitc.compiler.quant.policy import Granularity, NodePlan, Plan, Policy, QuantSpec, simulation_reasons
from vitc.passes.annotate import Role, block_count, has_const_weight
from vitc.passes.graphutil import HADAMARD_SUFFIX, const_value
from vitc.passes.rotate_residual import UNROTATE_SUFFIX

log = logging.getLogger(__name__)


def check_blocks(policy: Policy, roles: dict[str, Role]) -> None:
    """Every block range of the policy must lie inside the model (a typo'd range would silently match nothing)."""
    n = block_count(roles)
    for r in policy.rules:
        if r.blocks is None:
            continue
        lo, hi = r.blocks
        if n == 0 or hi >= n:
            have = "no transformer blocks" if n == 0 else f"{n} blocks (0-{n - 1})"
            raise PolicyError(f"{r.where(policy.source)}: rule {r.name!r} names blocks {lo}-{hi}, outside the model: "
                              f"it has {have}", hint="blocks are 0-based; `vitc explain MODEL` lists them")


def resolve_plan(graph: gs.Graph, policy: Policy, roles: dict[str, Role]) -> Plan:
    """One :class:`NodePlan` per quantizable node (MatMul/Gemm/Conv with a role), with the first rule that matches.

    Raises :class:`PolicyError` for a block range outside the model. Rules that match no node and per-channel
    activations that cannot apply (Conv inputs are NCHW: there is no token-channel last axis) are reported in
    ``plan.warnings``.
    """
    check_blocks(policy, roles)
    nodes: list[NodePlan] = []
    tensors = graph.tensors()
    conv_fallback: Counter[str] = Counter()
    for node in graph.nodes:
        r = roles.get(node.name)
        if r is None:
            continue
        acts: list[str] = []
        weight = axis = None
        if node.op == "MatMul":
            if const_value(node.inputs[0]) is not None and not has_const_weight(node):
                continue  # a constant first operand (a learned query, folded): stays float, float_ops says why
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
        elif node.op in ("Conv", "ConvTranspose"):
            if not has_const_weight(node):
                continue
            # one scale per output channel: Conv weights are [C_out, C_in/g, ...], ConvTranspose [C_in, C_out/g, ...]
            acts, weight, axis = [node.inputs[0].name], node.inputs[1].name, 0 if node.op == "Conv" else 1
        else:
            continue
        if _all_zero(node.inputs[1]):
            continue  # nothing to quantize, and a degenerate weight range breaks OpenVINO's int8 kernels
        if is_rewrite_part(node.name):
            continue  # the residual rotation's way back to the original basis, the Hadamard before fc2: float parts
        rule = policy.lookup(node.name, r.role, r.block, r.inputs)
        spec = rule.spec
        if node.op in ("Conv", "ConvTranspose") and not spec.skip and spec.activation is Granularity.PER_CHANNEL:
            spec = replace(spec, activation=Granularity.PER_TENSOR)
            conv_fallback[rule.name] += 1
        spec = _effective(spec)
        acts = [a for a in acts if const_value(tensors[a]) is None]
        why = simulation_reasons(spec)
        nodes.append(NodePlan(node=node.name, op=node.op, role=r.role, block=r.block, spec=spec, rule=rule.name,
                              activations=acts, weight=weight, weight_axis=axis, simulated=bool(why),
                              simulation=why))
    warnings = [f"rule {name!r}: per-channel activations on {k} Conv input(s) quantized per-tensor instead (an NCHW "
                "input has no token-channel last axis)" for name, k in conv_fallback.items()]
    return Plan(policy=policy.name, nodes=nodes, warnings=_unused(policy, nodes) + warnings)


def _effective(spec: QuantSpec) -> QuantSpec:
    """Per-channel activations are quantized by insert_qdq symmetric, one scale per channel from the calibrated
    channel min/max (the observer applies to per-tensor ranges): say so in the plan."""
    if not spec.skip and spec.activation is Granularity.PER_CHANNEL:
        return replace(spec, symmetric=True, observer=ObserverConfig(Observer.MINMAX))
    return spec


def _unused(policy: Policy, nodes: list[NodePlan]) -> list[str]:
    """Rules of a policy file that match nothing (presets are written for any model: not reported)."""
    if policy.source is None or policy.source.startswith("preset "):
        return []
    used = {n.rule for n in nodes}
    return [f"{r.where(policy.source)}: rule {r.name!r} matches no node of this model"
            for r in policy.rules if r.name not in used and not r.is_default]


def make_plan(graph: gs.Graph, policy: Policy, roles: dict[str, Role], target: str = "ort") -> Plan:
    """The plan a build for ``target`` quantizes: :func:`resolve_plan`, plus for TensorRT one entry per residual Add
    (compiler/quant/trt_residual.py)."""
    plan = resolve_plan(graph, policy, roles)
    if target == "trt":
        from vitc.compiler.quant.trt_residual import extend_plan

        extended = extend_plan(graph, plan, policy)
        extended.warnings = _unused(policy, extended.nodes) + [w for w in plan.warnings if "matches no node" not in w]
        plan = extended
        for n in plan.nodes:
            n.spec = _effective(n.spec)
            why = simulation_reasons(n.spec)
            if why and not n.simulated:
                n.simulated, n.simulation = True, why
    return plan


WEIGHTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum")


def _all_zero(t) -> bool:
    v = const_value(t)
    return v is not None and v.size > 0 and not np.any(v)


def float_ops(graph: gs.Graph, plan: Plan, roles: dict[str, Role]) -> list[dict]:
    """Every MatMul/Gemm/Conv-like node the plan leaves float, and why: a policy rule keeps it float, or nothing
    recognised it (no role, no constant weight, an op vitc does not quantize). In graph order."""
    planned = {n.node: n for n in plan.nodes}
    out = []
    for node in graph.nodes:
        if node.op not in WEIGHTED_OPS:
            continue
        n = planned.get(node.name)
        if n is not None:
            if n.spec.skip:
                out.append({"node": node.name, "op": node.op, "role": n.role, "why": f"policy rule {n.rule!r}"})
            continue
        r = roles.get(node.name)
        if node.op == "Einsum":
            why = f"{node.op} is not quantized by vitc"
        elif r is None:
            why = "not recognised by annotate (no role)"
        elif node.op == "Gemm" and node.attrs.get("transA", 0):
            why = "Gemm with transA"
        elif node.op == "MatMul" and const_value(node.inputs[0]) is not None:
            why = "constant first operand (e.g. a learned query): float"
        elif node.name.endswith(UNROTATE_SUFFIX):
            why = "the residual-stream rotation's un-rotation (kept float)"
        elif node.name.endswith(HADAMARD_SUFFIX):
            why = "the online Hadamard before fc2 (kept float)"
        elif len(node.inputs) > 1 and _all_zero(node.inputs[1]):
            why = "all-zero weight (e.g. a zero-initialised branch): computes its bias in float"
        else:
            why = "no constant weight"
        out.append({"node": node.name, "op": node.op, "role": r.role if r else None, "why": why})
    return out


def is_rewrite_part(node_name: str) -> bool:
    """A float MatMul an exact rewrite added (the residual rotation's un-rotation, the Hadamard before fc2): not a
    model layer, float by design."""
    return node_name.endswith((UNROTATE_SUFFIX, HADAMARD_SUFFIX))


def unrecognised_summary(floats: list[dict]) -> str:
    """One line on the float weighted ops: how many the policy keeps float, how many nothing recognised (the first
    ones named). The float parts of exact rewrites are neither."""
    floats = [f for f in floats if not is_rewrite_part(f["node"])]
    if not floats:
        return "no MatMul, Gemm or Conv node in the model"
    un = [f for f in floats if not f["why"].startswith("policy rule")]
    rules = sorted({f["why"].removeprefix("policy rule ") for f in floats if f not in un})
    parts = []
    if len(floats) > len(un):
        parts.append(f"{len(floats) - len(un)} weighted op(s) kept float by {', '.join(rules)}")
    if un:
        names = ", ".join(f"{f['node']} ({f['op']}: {f['why']})" for f in un[:3])
        parts.append(f"{len(un)} not recognised, e.g. {names}")
    return "; ".join(parts)
