"""Quantize one model under many policies cheaply: the float passes and one calibration run are shared.

`vitc search` and `vitc ablate` evaluate dozens of policies on one model. A full `vitc build` per policy would redo
loading, the float passes and calibration every time; :class:`Simulator` does them once (calibrating *every*
quantizable tensor, per-tensor ranges and per-channel min/max both) and then, per policy, only resolves the plan,
runs the build's range search / migration / bias correction and inserts Q/DQ — the same functions `vitc build`
calls, so a simulated policy is the model `vitc build --policy` would write (up to calibration sharing).

Fidelity is measured in ONNX Runtime against the *source* model's outputs on held-out samples that calibration
never saw (by default the embedded ``EVAL_PHOTOS``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from vitc.compiler.driver.build import (BuildConfig, CalibConfig, calibration_runner, fc2_hadamard_block, gptq_nodes,
                                        gptq_weights, sequential_weights,
                                        held_out_feeds, input_specs, node_roles, plan_for, refine_ranges,
                                        run_calibration, silence_graphsurgeon, uses_pair_safe_weights)
from vitc.compiler.calib.calibration import CalibrationTable
from vitc.compiler.measure.fidelity import Fidelity
from vitc.compiler.driver.frontend import front_end
from vitc.compiler.driver.pipeline import Target, export, run_passes
from vitc.compiler.quant.policy import Plan, Policy, QuantSpec, Rule
from vitc.compiler.driver.stages import lowering_passes
from vitc.passes.insert_qdq import InsertQDQPass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimOptions:
    """The build steps after calibration that `vitc ablate` switches on and off (same meaning as in BuildConfig)."""

    search: bool = True  # per-site migration strength / clipping chosen by output error
    migrate: bool = True  # channel-scale migration (only with search: the fixed-strength path recalibrates)
    bias_correction: bool | None = None  # None: as the build decides (uses_bias_correction)
    weight_mse_clip: bool = False
    pair_safe_weights: bool | None = None  # None: on for ORT
    center: bool = False  # symmetric activations: per-channel input centring (as BuildConfig.center: off)
    sequential: bool = False  # refit the GPTQ linears one input at a time on the quantized model's inputs
    # score the search on ranges the reservoir did not set; None: as the build decides (uses_holdout_search)
    holdout_search: bool | None = None

    def describe(self) -> str:
        off = [k for k, v in (("search", self.search), ("migration", self.migrate and self.search),
                              ("bias correction", self.bias_correction is not False and self.search)) if not v]
        extra = ["weight MSE clip"] if self.weight_mse_clip else []
        if self.bias_correction and self.search:
            extra.append("bias correction")
        if self.pair_safe_weights is False:
            off.append("pair-safe weights")
        if self.center:
            extra.append("input centring")
        if self.sequential and self.search:
            extra.append("sequential refit")
        if self.holdout_search is not None and self.search:
            extra.append("held-out range search" if self.holdout_search else "in-sample range search")
        return ", ".join([f"no {k}" for k in off] + extra) or "vitc default"


@dataclass
class Simulated:
    model: onnx.ModelProto
    plan: Plan
    fidelity: Fidelity
    report: dict


def calibrate_everything_policy(target: Target, calib: CalibConfig) -> Policy:
    """One rule: every quantizable node, per-tensor, the target's symmetry. Used only to pick what to observe."""
    return Policy("calibrate-all", (Rule("default", QuantSpec(observer=calib.observer,
                                                               symmetric=target is Target.TRT)),))


class Simulator:
    """Load, fuse and calibrate once; quantize and measure any number of policies."""

    def __init__(self, model: Path, *, target: Target = Target.ORT, calib: CalibConfig = CalibConfig(),
                 fuse: bool = True, batch: int = 1, input_shapes: dict | None = None, eval_source: Path | None = None,
                 eval_samples: int = 8, search_samples: int = 4, show_progress: bool = True, threads: int = 0,
                 eval_seed: int = 11, rotate: bool = False, fc2_hadamard: int | None = None):
        from vitc.runtimes.base import SessionOptions
        from vitc.runtimes.ort import OrtRuntime, quiet

        quiet()
        silence_graphsurgeon()
        self._args = dict(target=target, calib=calib, fuse=fuse, batch=batch, input_shapes=input_shapes,
                          eval_source=eval_source, eval_samples=eval_samples, search_samples=search_samples,
                          show_progress=show_progress, threads=threads, eval_seed=eval_seed)
        self.rotate = rotate
        # the Hadamard before fc2: its block size (0: none), resolved against the target's default
        self.fc2_hadamard = fc2_hadamard_block(BuildConfig(model=Path(model), outdir=Path(model), target=target,
                                                           fuse=fuse, fc2_hadamard=fc2_hadamard))
        self._variants: dict[tuple[bool, int], Simulator] = {(rotate, self.fc2_hadamard): self}
        self.path = Path(model)
        self.target = target
        self.calib = calib
        self.threads = threads
        self.search_samples = search_samples
        fe = front_end(self.path, target, fuse=fuse, batch=batch, input_shapes=input_shapes,
                       policy=calibrate_everything_policy(target, calib), rotate=rotate,
                       fc2_hadamard=self.fc2_hadamard)
        self.source = fe.source.model
        self.float_passes = fe.float_passes
        self.float_model = fe.float_model()
        self._float_graph = fe.graph  # read-only from here on (constants and attributes for cost models)
        self.roles = fe.roles
        self.reservoir: dict[str, list[np.ndarray]] = {}
        self.fit_ranges: dict = {}  # per-channel ranges of the calibration inputs the reservoir does not show
        self._moments: dict = {}  # second moments of linear inputs, collected when a GPTQ policy first needs them
        self.table, self.calib_summary = run_calibration(self.float_model, fe.plan, calib, show_progress,
                                                         reservoir=self.reservoir, keep=search_samples,
                                                         fit_ranges=self.fit_ranges)
        batch = input_specs(self.source)[0].shape[0] if eval_source is None else 1  # whole batches of crops
        self.feeds, _ = held_out_feeds(self.source, eval_source, max(eval_samples, batch), calib, eval_seed)
        self._rt = OrtRuntime()
        self._opts = SessionOptions(threads=threads)
        ref = self._rt.session(self.source.SerializeToString(), self._opts)
        self.reference = [ref.run(f) for f in self.feeds]
        self.output_names = ref.output_names

    def variant(self, rotate: bool | None = None, fc2_hadamard: int | None = None) -> "Simulator":
        """The same model, data and settings with another front end: the residual-stream rotation on or off, the
        Hadamard before fc2 with another block size (0: none); None keeps this simulator's. Each front end has its
        own calibration (a rewritten graph's tensors are other tensors); variants are built once and shared."""
        key = (self.rotate if rotate is None else rotate, self.fc2_hadamard if fc2_hadamard is None else fc2_hadamard)
        if key not in self._variants:
            sim = Simulator(self.path, rotate=key[0], fc2_hadamard=key[1], **self._args)
            sim._variants = self._variants
            self._variants[key] = sim
        return self._variants[key]

    def rotated(self) -> "Simulator":
        """The same model, data and settings with the residual-stream rotation in the front end."""
        return self.variant(rotate=True)

    def constant(self, tensor: str) -> np.ndarray | None:
        """The value of a constant of the float model (None: not a constant)."""
        from vitc.passes.graphutil import const_value

        t = self._float_graph.tensors().get(tensor)
        return None if t is None else const_value(t)

    def node_attrs(self, node: str) -> dict:
        return next((dict(n.attrs) for n in self._float_graph.nodes if n.name == node), {})

    def plan(self, policy: Policy) -> Plan:
        graph = gs.import_onnx(self.float_model)
        return plan_for(graph, policy, node_roles(graph), self.target)

    def quantize(self, policy: Policy, opts: SimOptions = SimOptions()) -> tuple[onnx.ModelProto, Plan, dict]:
        """The int8 model `vitc build --policy` would write with these options (calibration shared)."""
        graph = gs.import_onnx(self.float_model)
        plan = plan_for(graph, policy, node_roles(graph), self.target)
        cfg = BuildConfig(model=self.path, outdir=self.path, target=self.target, calib=self.calib, policy=policy,
                          migrate=opts.migrate, search=opts.search, search_samples=self.search_samples,
                          bias_correction=opts.bias_correction if opts.search else False,
                          weight_mse_clip=opts.weight_mse_clip, pair_safe_weights=opts.pair_safe_weights,
                          center=opts.center, sequential=opts.sequential and opts.search,
                          holdout_search=None if opts.holdout_search is None else opts.holdout_search and opts.search,
                          show_progress=False)
        table = self._table_for(plan)
        moments = self.moments(plan) if gptq_nodes(plan) else None
        report: dict = {}
        pipe_log = logging.getLogger("vitc.compiler.driver.pipeline")
        level = pipe_log.level
        pipe_log.setLevel(max(level, logging.WARNING))  # one report line per policy would drown the search's own log
        try:
            rounded: dict = {}
            if opts.search:
                graph, plan, table, report, _, rounded = refine_ranges(graph, plan, table, self.reservoir, policy,
                                                                       cfg, moments=moments,
                                                                       fit_ranges=self.fit_ranges)
                if opts.sequential and rounded:
                    rounded, report["sequential"] = sequential_weights(graph, plan, table, rounded, self.source, cfg)
            elif moments:
                rounded, report["weight_rounding"] = gptq_weights(graph, plan, moments, cfg)
            qdq = InsertQDQPass(plan, table, weight_mse_clip=opts.weight_mse_clip,
                                pair_safe_weights=uses_pair_safe_weights(cfg), rounded=rounded)
            run_passes(graph, [qdq, *lowering_passes(self.target)])
        finally:
            pipe_log.setLevel(level)
        return export(graph, self.source), plan, report

    def moments(self, plan: Plan) -> dict:
        """Second moments of the inputs of the plan's GPTQ-rounded linears, from an extra pass over the calibration
        data for the inputs no earlier policy needed (kept for the next policies)."""
        want = {np_.activations[0] for np_ in gptq_nodes(plan)}
        missing = sorted(want - self._moments.keys())
        if missing:
            from vitc.compiler.calib.calibration import collect_moments

            log.info("collecting second moments of %d linear input(s) for GPTQ rounding", len(missing))
            run, feeds = calibration_runner(self.float_model, missing, self.calib)
            self._moments.update(collect_moments(run, missing, feeds))
        return {t: self._moments[t] for t in want}

    def _table_for(self, plan: Plan) -> CalibrationTable:
        want = set(plan.activation_tensors())
        return CalibrationTable(self.table.model_digest, self.table.observer, self.table.samples,
                                {k: v for k, v in self.table.ranges.items() if k in want})

    def measure(self, model: onnx.ModelProto | bytes) -> Fidelity:
        """Output SQNR / cosine of ``model`` against the source model on the held-out feeds."""
        blob = model if isinstance(model, bytes) else model.SerializeToString()
        sess = self._rt.session(blob, self._opts)
        num = den = 0.0
        worst = np.inf
        cos = []
        agree = total = 0
        for feed, ref in zip(self.feeds, self.reference):
            out = sess.run(feed)
            if ref[0].ndim == 2 and ref[0].shape[1] > 1:
                agree += int((ref[0].argmax(axis=1) == out[0].argmax(axis=1)).sum())
                total += ref[0].shape[0]
            a = np.concatenate([o.ravel() for o in ref]).astype(np.float64)
            b = np.concatenate([o.ravel() for o in out]).astype(np.float64)
            e = float(((a - b) ** 2).sum())
            s = float((a ** 2).sum())
            num += s
            den += e
            worst = min(worst, 10 * np.log10(max(s, 1e-30) / max(e, 1e-30)))
            cos.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
        return Fidelity(len(self.feeds), float(10 * np.log10(max(num, 1e-30) / max(den, 1e-30))), float(worst),
                        float(np.mean(cos)), 100.0 * agree / total if total else None)

    def run(self, policy: Policy, opts: SimOptions = SimOptions()) -> Simulated:
        model, plan, report = self.quantize(policy, opts)
        return Simulated(model, plan, self.measure(model), report)


# -- command-line plumbing shared by `vitc search` and `vitc ablate` ---------------------------------------------------
def add_arguments(p, shape_type, floats3_type, std3_type, positive_type) -> None:
    from vitc.compiler.cliargs import add_input_options

    from vitc.compiler.calib.calibration import Observer

    p.add_argument("model", type=Path)
    p.add_argument("-o", "--outdir", type=Path, required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--target", choices=[t.value for t in Target], default=Target.ORT.value)
    p.add_argument("--calib", type=Path, default=None,
                   help="image folder, .npz or .npy for calibration; default: embedded photos")
    p.add_argument("--calib-samples", type=positive_type, default=32)
    p.add_argument("--seed", type=int, default=0, help="calibration crops of the embedded photos are drawn with this "
                                                       "seed (as in `vitc build`)")
    p.add_argument("--eval", type=Path, default=None,
                   help="held-out image folder / .npz for fidelity; default: embedded photos calibration never sees")
    p.add_argument("--eval-samples", type=positive_type, default=8)
    p.add_argument("--eval-seed", type=int, default=11,
                   help="crops of the embedded held-out photos are drawn with this seed (pick a policy on one seed, "
                        "report it on another)")
    p.add_argument("--observer", choices=[o.value for o in Observer], default=Observer.PERCENTILE.value)
    p.add_argument("--percentile", type=float, default=99.99)
    add_input_options(p, shape_type=shape_type, floats3_type=floats3_type, std3_type=std3_type,
                      positive_type=positive_type)
    p.add_argument("--threads", type=int, default=0, help="ORT threads for the measurements (0: ORT's default)")


def simulator_from_args(a) -> Simulator:
    from vitc.compiler.calib.calibration import Observer, ObserverConfig
    from vitc.compiler.errors import VitcError

    if not 0 < a.percentile <= 100:
        raise VitcError(f"--percentile {a.percentile} is out of range", hint="give a number in (0, 100]")
    calib = CalibConfig(source=a.calib, samples=a.calib_samples, seed=a.seed, observer=ObserverConfig(Observer(a.observer),
                                                                                          a.percentile),
                        mean=a.mean, std=a.std)
    return Simulator(a.model, target=Target(a.target), calib=calib, batch=a.batch or 1, input_shapes=dict(a.input_shape),
                     eval_source=a.eval, eval_samples=a.eval_samples, threads=a.threads, eval_seed=a.eval_seed)
