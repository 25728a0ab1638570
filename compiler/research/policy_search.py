"""`vitc search`: the cheapest policy that meets a fidelity target.

1. Start from a policy (default: the target's build default, ``default``) and measure it end to end. Calibration
   is shared, and the range search picks each linear site's migration and clipping from every linear reading the
   site's input, float or not: a candidate differs from the start only in the operators it changes, so its measured
   fidelity moves only with them, and the written policy builds exactly the measured model.
2. Sensitivity: quantize each operator *alone* (everything else float) under the start policy and measure its output
   noise power against the source model on held-out samples (noise_i = 10^(-SQNR_i/10)). Quantization noises of
   different operators add up nearly independently, so sum_i noise_i predicts the full model's noise, and
   noise_i is what an upgrade of operator i removes.
3. Greedy: take the upgrade with the most noise removed per unit of cost, apply it, re-measure the whole model end to
   end, repeat until the target is met (or the upgrade budget runs out). An upgrade that lowers the measured
   fidelity (errors that cancelled) is rolled back.

Upgrades and their cost (the latency they give up, in units of the operator's share of the quantizable MACs):
  * per-channel weights: free (every int8 kernel takes them) — the start policy is upgraded to them first if needed;
  * per-channel activations: not runnable by ORT/TensorRT int8 kernels (simulated), so they cost what float costs
    unless ``per_channel_cost`` says otherwise (e.g. for a research question);
  * float: the operator's MAC share; zero for an operator whose int8 form buys no speed on the target (ORT has no
    int8 Conv with a float output, so a Conv is free to keep float there).
Output: the policy (TOML, first rules name the upgraded nodes) and the path taken, step by step.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field, replace

import numpy as np

from vitc.compiler.errors import VitcError
from vitc.compiler.driver.pipeline import Target
from vitc.compiler.quant.policy import Granularity, NodePlan, Plan, Policy, QuantSpec, Rule, glob_escape
from vitc.compiler.progress import progress
from vitc.compiler.research.simulate import SimOptions, Simulator

log = logging.getLogger(__name__)


class Upgrade:
    PER_CHANNEL = "per-channel"
    FLOAT = "float"


@dataclass(frozen=True)
class SearchConfig:
    target_sqnr_db: float | None = None
    target_agreement_pct: float | None = None  # classifiers: top-1 agreement with the source model on held-out data
    max_upgrades: int = 32
    per_channel_cost: float = 1.0  # cost of per-channel activations relative to float (1: both leave int8 kernels)
    options: SimOptions = SimOptions()

    def __post_init__(self):
        if (self.target_sqnr_db is None) == (self.target_agreement_pct is None):
            raise VitcError("give exactly one target", hint="--target-sqnr DB or --target-agreement PCT")
        if self.target_agreement_pct is not None and not 0 < self.target_agreement_pct <= 100:
            raise VitcError(f"target agreement {self.target_agreement_pct}% is not a percentage",
                            hint="give a number in (0, 100], e.g. --target-agreement 99")
        if self.target_sqnr_db is not None and (not math.isfinite(self.target_sqnr_db)
                                                or not 0 < self.target_sqnr_db < 200):
            raise VitcError(f"target SQNR {self.target_sqnr_db} dB is not a sensible target",
                            hint="give a number of dB between 0 and 200, e.g. --target-sqnr 30")
        if self.max_upgrades < 0 or self.per_channel_cost < 0:
            raise VitcError("--max-upgrades and --per-channel-cost must be >= 0")

    def met(self, f) -> bool:
        if self.target_sqnr_db is not None:
            return f.sqnr_db >= self.target_sqnr_db
        return f.top1_agreement_pct is not None and f.top1_agreement_pct >= self.target_agreement_pct

    def describe(self) -> str:
        return (f"{self.target_sqnr_db:.1f} dB" if self.target_sqnr_db is not None
                else f"{self.target_agreement_pct:.1f}% top-1 agreement")


@dataclass
class OpInfo:
    node: str
    role: str
    block: int | None
    op: str
    macs: float
    cost_float: float  # latency share given up by keeping it float
    noise: float = 0.0  # noise power (relative to the output power) with this op alone quantized
    noise_per_channel: float | None = None

    def to_json(self) -> dict:
        return {"node": self.node, "role": self.role, "block": self.block, "op": self.op, "macs": self.macs,
                "cost_float": round(self.cost_float, 5), "alone_sqnr_db": _db(self.noise),
                "alone_sqnr_db_per_channel": None if self.noise_per_channel is None else _db(self.noise_per_channel)}


@dataclass
class Step:
    index: int
    node: str | None
    role: str | None
    block: int | None
    upgrade: str | None
    cost: float
    total_cost: float
    sqnr_db: float
    worst_db: float
    cosine: float
    agreement_pct: float | None = None
    kept: bool = True  # False: the upgrade lowered the measured fidelity and was rolled back

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class SearchResult:
    policy: Policy
    met: bool
    steps: list[Step]
    ops: list[OpInfo]
    start: str
    target: str
    baselines: dict = field(default_factory=dict)  # name -> fidelity/upgrades of reference policies

    @property
    def upgrades(self) -> int:
        return sum(1 for s in self.steps[1:] if s.kept)

    def to_json(self) -> dict:
        return {"start": self.start, "target": self.target, "met": self.met,
                "upgrades": self.upgrades, "tried": len(self.steps) - 1, "path": [s.to_json() for s in self.steps],
                "sensitivity": sorted((o.to_json() for o in self.ops), key=lambda o: o["alone_sqnr_db"]),
                "baselines": self.baselines}


def _db(noise: float) -> float:
    return round(float(-10 * np.log10(max(noise, 1e-30))), 3)


def only(policy: Policy, node: str, spec: QuantSpec) -> Policy:
    """``node`` quantized with ``spec``, every other node float."""
    return Policy(f"only {node}", (Rule("only", spec, name_glob=glob_escape(node)),
                                   Rule("rest-float", QuantSpec(skip=True))))


def with_upgrades(start: Policy, upgrades: list[tuple[NodePlan, str]]) -> Policy:
    rules = []
    for i, (np_, kind) in enumerate(upgrades, 1):
        spec = QuantSpec(skip=True) if kind == Upgrade.FLOAT else replace(np_.spec, activation=Granularity.PER_CHANNEL)
        rules.append(Rule(f"search-{i}-{kind}", spec, name_glob=glob_escape(np_.node)))
    desc = f"found by vitc search from {start.name!r}: {len(upgrades)} upgrade(s) before the start policy's rules"
    return Policy(f"search-from-{start.name}", tuple(rules) + start.rules, description=desc)


def per_channel_weights(policy: Policy) -> Policy:
    """``policy`` with per-channel weights in every rule (unchanged if it has them already)."""
    if all(r.spec.skip or r.spec.weight is Granularity.PER_CHANNEL for r in policy.rules):
        return policy
    rules = tuple(r if r.spec.skip else replace(r, spec=replace(r.spec, weight=Granularity.PER_CHANNEL))
                  for r in policy.rules)
    return replace(policy, name=f"{policy.name}+per-channel-weights", rules=rules,
                   description=(policy.description + " (weights per-channel: free)").strip())


def op_macs(np_: NodePlan, sim: Simulator) -> float:
    """Multiply-accumulates of one quantized node on one batch (shapes from the calibration reservoir)."""
    xs = [sim.reservoir[a][0] for a in np_.activations if a in sim.reservoir and sim.reservoir[a]]
    if not xs:
        return 0.0
    if np_.weight is None:  # attention matmul: [.., M, K] x [.., K, N]
        if len(xs) < 2:
            return 0.0
        return float(np.prod(xs[0].shape)) * xs[1].shape[-1]
    w = sim.constant(np_.weight)
    if w is None:
        return 0.0
    if np_.op == "ConvTranspose":  # every input position meets the whole kernel
        return float(np.prod(xs[0].shape[:1] + xs[0].shape[2:])) * w.size
    if np_.op == "Conv":  # output positions x weight size; stride from the node
        strides = sim.node_attrs(np_.node).get("strides", [1] * (xs[0].ndim - 2))
        spatial = np.prod([max(1, s // st) for s, st in zip(xs[0].shape[2:], strides)])
        return float(xs[0].shape[0] * spatial * w.size)
    return float(np.prod(xs[0].shape[:-1])) * w.size


def float_cost_factor(np_: NodePlan, target: Target) -> float:
    # ORT has no int8 Conv (or ConvTranspose) with a float output: a Q/DQ'd one runs float anyway, so keeping it
    # float costs nothing
    return 0.0 if (target is Target.ORT and np_.op in ("Conv", "ConvTranspose")) else 1.0


def search(sim: Simulator, start: Policy, cfg: SearchConfig, show_progress: bool = True,
           baselines: dict[str, Policy] | None = None) -> SearchResult:
    opts = cfg.options
    if cfg.target_agreement_pct is not None and sim.measure(sim.source).top1_agreement_pct is None:
        raise VitcError("--target-agreement needs a classifier (first output [N, classes])",
                        hint="use --target-sqnr for this model")
    start = per_channel_weights(start)  # free: every int8 kernel takes per-channel weight scales
    plan0: Plan = sim.plan(start)
    nodes = plan0.quantized()
    if not nodes:
        raise VitcError(f"policy {start.name!r} quantizes no operator: nothing to search",
                        hint="start from a policy that quantizes something, e.g. --start all-per-tensor")
    macs = {n.node: op_macs(n, sim) for n in nodes}
    total_macs = sum(m * float_cost_factor(n, sim.target) for n, m in zip(nodes, macs.values())) or 1.0
    ops = [OpInfo(n.node, n.role, n.block, n.op, macs[n.node], macs[n.node] * float_cost_factor(n, sim.target)
                  / total_macs) for n in nodes]
    by_node = {n.node: n for n in nodes}
    want_pc = cfg.per_channel_cost < 1.0

    def measure(policy: Policy):
        return sim.run(policy, opts).fidelity

    f = measure(start)
    for info in progress(ops, len(ops), "sensitivity", show_progress):
        np_ = by_node[info.node]
        info.noise = _noise(sim, only(start, info.node, np_.spec), opts)
        if want_pc and np_.op != "Conv" and np_.spec.activation is Granularity.PER_TENSOR:
            info.noise_per_channel = _noise(sim, only(start, info.node, replace(
                np_.spec, activation=Granularity.PER_CHANNEL)), opts)

    steps = [Step(0, None, None, None, None, 0.0, 0.0, f.sqnr_db, f.worst_sample_sqnr_db, f.mean_cosine,
                  f.top1_agreement_pct)]
    log.info("search: start %r %.2f dB (target %s)", start.name, f.sqnr_db, cfg.describe())
    chosen: list[tuple[NodePlan, str]] = []  # the kept upgrades, in order
    total_cost = 0.0
    policy = start
    tried: set[tuple[str, str]] = set()
    attempts = 0
    while not cfg.met(f) and len(chosen) < cfg.max_upgrades and attempts < 2 * cfg.max_upgrades:
        best = None
        state = {p.node: k for p, k in chosen}  # node -> its current upgrade
        for o in ops:
            cur = state.get(o.node)
            if cur == Upgrade.FLOAT:
                continue
            now = o.noise_per_channel if cur == Upgrade.PER_CHANNEL else o.noise
            cands = [(Upgrade.FLOAT, now, o.cost_float - (o.cost_float * cfg.per_channel_cost
                                                         if cur == Upgrade.PER_CHANNEL else 0.0))]
            if cur is None and o.noise_per_channel is not None and o.noise_per_channel < o.noise:
                cands.append((Upgrade.PER_CHANNEL, o.noise - o.noise_per_channel, o.cost_float * cfg.per_channel_cost))
            for kind, gain, cost in cands:
                if gain <= 0 or (o.node, kind) in tried:
                    continue
                score = gain / max(cost, 1e-6)
                if best is None or score > best[0]:
                    best = (score, o, kind, cost)
        if best is None:
            break
        _, o, kind, cost = best
        attempts += 1
        tried.add((o.node, kind))
        new_chosen = [(p, k) for p, k in chosen if p.node != o.node] + [(by_node[o.node], kind)]
        new_policy = with_upgrades(start, new_chosen)
        fn = measure(new_policy)
        # quantization errors partly cancel, so an upgrade can lower the measured fidelity: roll it back
        kept = fn.sqnr_db >= f.sqnr_db if cfg.target_sqnr_db is not None else \
            (fn.top1_agreement_pct or 0.0, fn.sqnr_db) >= (f.top1_agreement_pct or 0.0, f.sqnr_db)
        if kept:
            chosen, policy, f = new_chosen, new_policy, fn
            total_cost += cost
        steps.append(Step(len(steps), o.node, o.role, o.block, kind, cost if kept else 0.0, total_cost, fn.sqnr_db,
                          fn.worst_sample_sqnr_db, fn.mean_cosine, fn.top1_agreement_pct, kept))
        log.info("search: try %d %s %s (%s, block %s) -> %.2f dB%s, cost %.3f", len(steps) - 1, kind, o.node,
                 o.role, o.block, fn.sqnr_db, "" if kept else " (worse: rolled back)", total_cost)
    base: dict = {}
    for name, pol in (baselines or {}).items():
        bp = sim.plan(pol)
        fb = measure(pol)
        ups = sum(1 for n in bp.quantized() if n.spec.activation is Granularity.PER_CHANNEL) + \
            sum(1 for n in bp.nodes if n.spec.skip and n.node in by_node)
        base[name] = {"sqnr_db": round(fb.sqnr_db, 3), "worst_db": round(fb.worst_sample_sqnr_db, 3),
                      "agreement_pct": fb.top1_agreement_pct, "met": cfg.met(fb),
                      "cosine": round(fb.mean_cosine, 6), "upgrades_vs_start": ups,
                      "simulated_nodes": len(bp.simulated())}
    return SearchResult(policy, cfg.met(f), steps, ops, start.name, cfg.describe(), base)


def _noise(sim: Simulator, policy: Policy, opts: SimOptions) -> float:
    fid = sim.run(policy, opts).fidelity
    return float(10 ** (-fid.sqnr_db / 10))


def format_path(res: SearchResult) -> str:
    agree = any(s.agreement_pct is not None for s in res.steps)
    lines = ["| step | upgrade | node | role | block | cost (MAC share) | SQNR dB | worst dB |"
             + (" top-1 agree % |" if agree else ""),
             "|---:|---|---|---|---:|---:|---:|---:|" + ("---:|" if agree else "")]
    for s in res.steps:
        up = s.upgrade if s.kept else f"({s.upgrade}: worse, rolled back)"
        lines.append(f"| {s.index} | {up or 'start: ' + res.start} | {s.node or ''} | {s.role or ''} | "
                     f"{'' if s.block is None else s.block} | {s.total_cost:.3f} | {s.sqnr_db:.2f} | {s.worst_db:.2f} |"
                     + (f" {s.agreement_pct:.1f} |" if agree and s.agreement_pct is not None else ""))
    verdict = "met" if res.met else "NOT met"
    lines.append("")
    lines.append(f"target {res.target} {verdict} with {res.upgrades} upgrade(s) ({len(res.steps) - 1} tried)")
    for name, b in res.baselines.items():
        lines.append(f"reference {name}: {b['sqnr_db']:.2f} dB ({'meets' if b['met'] else 'misses'} the target) with "
                     f"{b['upgrades_vs_start']} upgrade(s) over the start ({b['simulated_nodes']} simulated node(s))")
    return "\n".join(lines)


# -- `vitc search` -----------------------------------------------------------------------------------------------------
def add_arguments(p, shape_type, floats3_type, std3_type, positive_type) -> None:
    from vitc.compiler.research import simulate

    simulate.add_arguments(p, shape_type, floats3_type, std3_type, positive_type)
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--target-sqnr", type=float, default=None, metavar="DB",
                   help="output SQNR to reach against the source model on the held-out samples")
    t.add_argument("--target-agreement", type=float, default=None, metavar="PCT",
                   help="classifiers: top-1 agreement with the source model to reach (percent)")
    p.add_argument("--start", default="default", metavar="FILE|PRESET",
                   help="policy to start from (default: the target's build default; e.g. all-per-tensor)")
    p.add_argument("--max-upgrades", type=int, default=32)
    p.add_argument("--per-channel-cost", type=float, default=1.0,
                   help="cost of simulated per-channel activations relative to float (default 1: neither runs on "
                        "int8 kernels; below 1 the search also tries per-channel)")
    bc = p.add_mutually_exclusive_group()
    bc.add_argument("--bias-correction", dest="bias_correction", action="store_true", default=None,
                    help="measure every candidate with bias correction on (default: as `vitc build` decides)")
    bc.add_argument("--no-bias-correction", dest="bias_correction", action="store_false", default=None)
    p.add_argument("--no-reference", action="store_true",
                   help="skip measuring the preset all-per-channel for comparison")


def run_command(a) -> int:
    from vitc.compiler.driver.outdir import staged
    from vitc.compiler.quant.policy import PolicyDefaults, load_policy, policy_to_toml
    from vitc.compiler.research.simulate import simulator_from_args

    cfg = SearchConfig(target_sqnr_db=a.target_sqnr, target_agreement_pct=a.target_agreement,
                       max_upgrades=a.max_upgrades, per_channel_cost=a.per_channel_cost,
                       options=SimOptions(bias_correction=a.bias_correction))
    defaults = PolicyDefaults.for_target(a.target)
    start = load_policy(a.start, defaults)
    refs = {} if a.no_reference else {"all-per-channel": load_policy("all-per-channel", defaults)}
    with staged(a.outdir, a.force) as tmp:
        sim = simulator_from_args(a)
        res = search(sim, start, cfg, baselines=refs)
        (tmp / "policy.toml").write_text(policy_to_toml(res.policy))
        (tmp / "search.json").write_text(json.dumps(res.to_json(), indent=2))
        table = format_path(res)
        (tmp / "search.md").write_text(table + "\n")
    final = a.outdir.absolute()
    sys.stdout.write(table + "\n")
    log.info("wrote %s (policy.toml: `vitc build %s --policy %s`)", final, a.model, final / "policy.toml")
    return 0 if res.met else 1
