"""The data the quantization passes consume: a calibration table (tensor -> range) and a plan (node -> how it is
quantized), with the enums and specs they are made of.

They live here, below the compiler, so that passes/ never imports vitc.compiler (tests/test_layering.py). The
compiler produces them (compiler/calib/calibration.py calibrates, compiler/quant/policy.py and compiler/quant/planner.py plan) and
re-exports every name from those modules, so ``from vitc.compiler.quant.policy import Plan`` keeps working.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field


# -- calibration ---------------------------------------------------------------------------------------------------
class Observer(enum.Enum):
    PERCENTILE = "percentile"
    MINMAX = "minmax"
    ENTROPY = "entropy"
    MSE = "mse"


@dataclass(frozen=True)
class ObserverConfig:
    kind: Observer = Observer.PERCENTILE
    percentile: float = 99.99  # the research's choice; only used by PERCENTILE

    def describe(self) -> str:
        return f"percentile({self.percentile})" if self.kind is Observer.PERCENTILE else self.kind.value


@dataclass
class TensorRange:
    """Calibrated range of one tensor."""

    amax: float
    min: float
    max: float
    observer: str
    channel_absmax: list[float] | None = None
    channel_min: list[float] | None = None
    channel_max: list[float] | None = None


@dataclass
class CalibrationTable:
    """The calibration stage's product: tensor name -> range. JSON-serializable, keyed by the model's digest."""

    model_digest: str
    observer: str
    samples: int
    ranges: dict[str, TensorRange] = field(default_factory=dict)

    def to_json(self, with_channels: bool = False) -> dict:
        out = asdict(self)
        if not with_channels:
            for r in out["ranges"].values():
                for k in ("channel_absmax", "channel_min", "channel_max"):
                    r.pop(k, None)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "CalibrationTable":
        ranges = {k: TensorRange(**v) for k, v in data["ranges"].items()}
        return cls(data["model_digest"], data["observer"], data["samples"], ranges)

    def dumps(self) -> str:
        return json.dumps(self.to_json(with_channels=True), sort_keys=True)


# -- the plan -------------------------------------------------------------------------------------------------------
class Granularity(enum.Enum):
    PER_TENSOR = "per-tensor"
    PER_CHANNEL = "per-channel"


class WeightRounding(enum.Enum):
    """How a linear's weights are rounded onto their int8 grid: each to its nearest level, or GPTQ (the rounding
    error of each input row spread over the rows not yet rounded, against calibration inputs; Gemm weights only)."""

    NEAREST = "nearest"
    GPTQ = "gptq"


class SoftmaxQuantizer(enum.Enum):
    """How attention x V's probability input is quantized. Only ``uniform`` runs on engines; the log quantizers
    (levels 2^-q, or 2^-q/2 for log-sqrt2) put their resolution near 0, where softmax probabilities (~1/T) live,
    and are simulated as float ops."""

    UNIFORM = "uniform"
    LOG2 = "log2"
    LOG_SQRT2 = "log-sqrt2"


@dataclass(frozen=True)
class QuantSpec:
    """How one operator is quantized. ``skip`` keeps it in float."""

    skip: bool = False
    activation: Granularity = Granularity.PER_TENSOR
    weight: Granularity = Granularity.PER_CHANNEL
    observer: ObserverConfig = ObserverConfig()
    bits: int = 8
    symmetric: bool = True
    softmax: SoftmaxQuantizer = SoftmaxQuantizer.UNIFORM  # attention x V only (its probability input)
    migrate: bool = True  # channel-scale migration into this linear's weights may be applied (build --migrate)
    # the strongest migration (SmoothQuant alpha) the range search may pick for this linear; None: any in its grid
    max_alpha: float | None = None
    rounding: WeightRounding = WeightRounding.NEAREST  # weight rounding (GPTQ: Gemm weights, calibrated Hessian)

    def describe(self) -> str:
        if self.skip:
            return "float"
        return (f"int{self.bits} {'sym' if self.symmetric else 'asym'} act={self.activation.value} "
                f"weight={self.weight.value} observer={self.observer.describe()}"
                + ("" if self.softmax is SoftmaxQuantizer.UNIFORM else f" softmax={self.softmax.value}")
                + ("" if self.migrate else " migrate=off")
                + ("" if self.max_alpha is None or not self.migrate else f" max_alpha={self.max_alpha:g}")
                + ("" if self.rounding is WeightRounding.NEAREST else f" rounding={self.rounding.value}"))


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
    simulated: bool = False  # settings no int8 kernel runs (see ``simulation`` for which)
    simulation: tuple[str, ...] = ()  # e.g. ("per-channel activations", "int4"): why it is simulated

    def to_json(self) -> dict:
        return {"node": self.node, "op": self.op, "role": self.role, "block": self.block, "rule": self.rule,
                "quant": self.spec.describe(), "activations": self.activations, "weight": self.weight,
                "weight_axis": self.weight_axis, "simulated": self.simulated, "simulation": list(self.simulation)}


def simulation_reasons(spec: QuantSpec) -> tuple[str, ...]:
    """Why a spec cannot run on an int8 engine kernel (TensorRT or ORT): per-channel activation scales (every
    int8 GEMM kernel takes one activation scale) and bit widths other than 8. Such nodes still run, as Q/DQ
    around a float op: an accuracy simulation, not a deployable speed-up."""
    if spec.skip:
        return ()
    out = []
    if spec.activation is Granularity.PER_CHANNEL:
        out.append("per-channel activations")
    if spec.bits != 8:
        out.append(f"int{spec.bits}")
    if spec.softmax is not SoftmaxQuantizer.UNIFORM:
        out.append(f"{spec.softmax.value} softmax")
    return tuple(out)


@dataclass
class Plan:
    policy: str
    nodes: list[NodePlan]
    warnings: list[str] = field(default_factory=list)  # e.g. a rule that matched nothing

    def quantized(self) -> list[NodePlan]:
        return [n for n in self.nodes if not n.spec.skip]

    def simulated(self) -> list[NodePlan]:
        return [n for n in self.quantized() if n.simulated]

    def activation_tensors(self) -> list[str]:
        return list(dict.fromkeys(t for n in self.quantized() for t in n.activations))

    def observer_overrides(self) -> dict[str, ObserverConfig]:
        """Activation tensor -> the observer of the rule that quantizes it (the first consumer's, if several)."""
        out: dict[str, ObserverConfig] = {}
        for n in self.quantized():
            for t in n.activations:
                out.setdefault(t, n.spec.observer)
        return out

    def to_json(self) -> dict:
        return {"policy": self.policy, "nodes": [n.to_json() for n in self.nodes],
                "simulated": [n.node for n in self.simulated()], "warnings": list(self.warnings)}


__all__ = ["Observer", "ObserverConfig", "TensorRange", "CalibrationTable", "Granularity", "SoftmaxQuantizer", "WeightRounding",
           "QuantSpec", "NodePlan", "simulation_reasons", "Plan"]
