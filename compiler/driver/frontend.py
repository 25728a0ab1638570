"""The front end every command shares: load -> float passes -> annotate -> plan.

It is the ``front_end`` stages of the build's declaration (``compiler/stages.build_stages``), so `vitc build`,
`vitc explain`, `vitc analyze` and the simulator behind `vitc search` / `vitc ablate` see the same graph, roles and
plan for the same model, target and policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from vitc.compiler.driver.build import BuildConfig, CalibConfig
from vitc.compiler.calib.calibration import ObserverConfig
from vitc.compiler.driver.loader import LoadedModel
from vitc.compiler.driver.pipeline import Target, export
from vitc.compiler.quant.policy import Plan, Policy
from vitc.compiler.driver.stages import BuildContext, build_stages, run_stages
from vitc.passes.annotate import Role
from vitc.passes.base import PassResult


@dataclass
class FrontEnd:
    """The loaded source, the graph after the float passes, its roles and the policy's plan on it. ``results``:
    the reports of the float passes and annotate, in run order. ``float_ops``: the weighted ops the plan leaves
    float and why (planner.float_ops)."""

    source: LoadedModel
    graph: gs.Graph
    results: list[PassResult]
    roles: dict[str, Role]
    policy: Policy
    plan: Plan
    float_ops: list[dict]

    @property
    def float_passes(self) -> list[PassResult]:
        return [r for r in self.results if r.name != "annotate"]

    def float_model(self) -> onnx.ModelProto:
        """The graph as a model, with the source's metadata (the preprocessing `vitc export` records)."""
        return export(self.graph, self.source.model)


def front_end(model: Path, target: Target = Target.ORT, *, fuse: bool = True, batch: int = 1,
              input_shapes: dict[str, list[int]] | None = None, policy: Policy | None = None,
              observer: ObserverConfig = ObserverConfig(), rotate: bool = False, rotate_seed: int = 0,
              fc2_hadamard: int | None = None) -> FrontEnd:
    """Load ``model`` (a dynamic batch fixed to ``batch``, ``input_shapes`` fixing other dims), run the float passes
    for ``target`` (fusions only with ``fuse``), annotate, and resolve ``policy`` (None: the target's default with
    ``observer``, what `vitc build` uses) into a plan. ``rotate``: the residual-stream rotation (build --rotate);
    ``fc2_hadamard``: the Hadamard before fc2's block size (0: none, None: the target's default)."""
    cfg = BuildConfig(model=Path(model), outdir=Path(model), target=target, fuse=fuse, batch=batch,
                      input_shapes=dict(input_shapes or {}), calib=CalibConfig(observer=observer), policy=policy,
                      rotate=rotate, rotate_seed=rotate_seed, fc2_hadamard=fc2_hadamard)
    ctx = run_stages([st for st in build_stages(cfg) if st.front_end], BuildContext(cfg))
    return FrontEnd(ctx.source, ctx.graph, ctx.results, ctx.roles, ctx.policy, ctx.plan, ctx.float_ops)
