"""Per-layer quantization policy (ordered rules, first match wins) and its resolution into a plan.

The plan is computed before the graph is touched: node -> role, block, spec and the rule that matched.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass, field

from vitc.compiler.calibration import Observer, ObserverConfig


class Granularity(enum.Enum):
    PER_TENSOR = "per-tensor"
    PER_CHANNEL = "per-channel"


@dataclass(frozen=True)
class QuantSpec:
    """How one operator is quantized. ``skip`` keeps it in float."""

    skip: bool = False
    activation: Granularity = Granularity.PER_TENSOR
    weight: Granularity = Granularity.PER_CHANNEL
    observer: ObserverConfig = ObserverConfig()
    bits: int = 8
    symmetric: bool = True

    def describe(self) -> str:
        if self.skip:
            return "float"
        return (f"int{self.bits} {'sym' if self.symmetric else 'asym'} act={self.activation.value} "
                f"weight={self.weight.value} observer={self.observer.describe()}")


@dataclass(frozen=True)
class Rule:
    """Matches on role, block range and/or node-name glob (all given must match)."""

    name: str
    spec: QuantSpec
    roles: frozenset[str] | None = None
    blocks: tuple[int, int] | None = None  # inclusive range
    name_glob: str | None = None

    def matches(self, node_name: str, role: str, block: int | None) -> bool:
        if self.roles is not None and role not in self.roles:
            return False
        if self.blocks is not None and (block is None or not self.blocks[0] <= block <= self.blocks[1]):
            return False
        if self.name_glob is not None and not fnmatch.fnmatchcase(node_name, self.name_glob):
            return False
        return True


@dataclass(frozen=True)
class Policy:
    name: str
    rules: tuple[Rule, ...]

    def lookup(self, node_name: str, role: str, block: int | None) -> Rule:
        for r in self.rules:
            if r.matches(node_name, role, block):
                return r
        raise LookupError(f"policy {self.name!r} has no rule for node {node_name!r} (role {role}); "
                          "end the policy with a default rule")


def default_policy(observer: ObserverConfig | None = None, symmetric: bool = True,
                   quantize_conv: bool = True) -> Policy:
    """8-bit, per-channel symmetric int8 weights, per-tensor activations on every GEMM/Conv input;
    LayerNorm/Softmax/GELU in float.

    Activations are symmetric int8 (zero-point 0, what TensorRT requires) or, with ``symmetric=False``, asymmetric
    uint8 (ORT's fastest x86 kernels are U8S8 anyway, and post-GELU / post-softmax ranges are one-sided, so
    the zero-point buys a bit of resolution).

    Convolutions after the transformer (decoders, heads on spatial maps) are quantized too; the attention matmuls
    get Q/DQ on both inputs.
    """
    ob = observer or ObserverConfig()
    conv_rule = () if quantize_conv else (
        # ONNX Runtime has no int8 Conv with a float output (QLinearConv needs a quantized output), so a Q/DQ'd
        # Conv still runs in float there: quantizing it would cost accuracy and buy no speed.
        Rule("conv-float-on-ort", QuantSpec(skip=True), roles=frozenset({"patch_embed", "conv"})),)
    return Policy("default", conv_rule + (
        # softmax probabilities (~1/T each) lose most of their information on a linear 8-bit grid; the
        # attention x V matmul is ~5% of a ViT's GEMM work, so it stays float by default
        Rule("attention-probabilities-float", QuantSpec(skip=True), roles=frozenset({"attn_av"})),
        Rule("default", QuantSpec(observer=ob, symmetric=symmetric)),
    ))


# -- the plan -------------------------------------------------------------------------------------------------------
QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv")


@dataclass
class NodePlan:
    node: str
    op: str
    role: str
    block: int | None
    spec: QuantSpec
    rule: str
    activations: list[str] = field(default_factory=list)  # tensor names quantized as activations
    weight: str | None = None  # constant weight tensor name (quantized per spec.weight)
    weight_axis: int | None = None
    simulated: bool = False  # per-channel activations: no int8 kernel runs them

    def to_json(self) -> dict:
        return {"node": self.node, "op": self.op, "role": self.role, "block": self.block, "rule": self.rule,
                "quant": self.spec.describe(), "activations": self.activations, "weight": self.weight,
                "weight_axis": self.weight_axis, "simulated": self.simulated}


@dataclass
class Plan:
    policy: str
    nodes: list[NodePlan]

    def quantized(self) -> list[NodePlan]:
        return [n for n in self.nodes if not n.spec.skip]

    def activation_tensors(self) -> list[str]:
        return list(dict.fromkeys(t for n in self.quantized() for t in n.activations))

    def to_json(self) -> dict:
        return {"policy": self.policy, "nodes": [n.to_json() for n in self.nodes]}


__all__ = ["Granularity", "QuantSpec", "Rule", "Policy", "default_policy", "NodePlan", "Plan", "Observer",
           "ObserverConfig", "QUANTIZABLE_OPS"]
