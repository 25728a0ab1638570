"""`vitc ablate`: the research's ablation table for any model, plus what each of vitc's own steps contributes.

Two tables, every row quantized from one shared calibration (:class:`vitc.compiler.research.simulate.Simulator`) and measured
on the same held-out samples against the source model:

* granularity (the research's Table 3): which operator types get per-channel activations and weights
  (none, LayerNorm outputs, LayerNorm + each of fc1/fc2/qkv/proj, all), every other operator per-tensor and no
  vitc range search (calibrated ranges as the research used them);
* steps (vitc's deployable path): the build's default, then the same with one step switched off or on
  (bias correction, channel-scale migration, the migration into fc2, the per-operator range search,
  saturation-safe weights, MSE weight clipping, the residual-stream rotation, GPTQ weight rounding, the
  sequential refit, attention x V in int8).

Columns: output SQNR (all samples and worst sample), cosine, top-1/top-5 when a labelled ImageFolder is given,
how many nodes are simulation-only (per-channel activations: no int8 kernel runs them), and the latency of each
ORT model timed side by side with the source fp32 model in one run (alternating blocks).
Output folder, written atomically like a build: ablation.md, ablation.json and, with the vitc[plots] extra,
ablation.png.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vitc.compiler import plots
from vitc.compiler.quant.policy import (Granularity, Policy, PolicyDefaults, QuantSpec, Rule, SoftmaxQuantizer,
                                        WeightRounding, load_policy, target_default_policy, with_rounding)
from vitc.compiler.research.simulate import SimOptions, Simulator

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

PT, PC = Granularity.PER_TENSOR, Granularity.PER_CHANNEL


@dataclass(frozen=True)
class Row:
    table: str  # "granularity" | "steps"
    name: str
    policy: Policy
    options: SimOptions = SimOptions()
    rotate: bool = False  # quantized from the residual-stream-rotated graph (build --rotate)
    fc2_hadamard: int | None = None  # the Hadamard before fc2's block size (0: none; None: the target's default)


def granularity_rows(observer, symmetric: bool) -> list[Row]:
    """The research's rows: LayerNorm outputs per-channel, plus one linear type per-channel, and the extremes."""
    def spec(act: Granularity, w: Granularity) -> QuantSpec:
        return QuantSpec(activation=act, weight=w, observer=observer, symmetric=symmetric)

    ln = Rule("layernorm-outputs-per-channel", spec(PC, PT), input_from=frozenset({"layernorm"}))
    default = Rule("default", spec(PT, PT))
    raw = SimOptions(search=False, migrate=False, bias_correction=False)
    rows = [Row("granularity", "none (all per-tensor)", Policy("all-per-tensor", (default,)), raw),
            Row("granularity", "LayerNorm", Policy("ln", (ln, default)), raw)]
    for role in ("fc1", "fc2", "qkv", "proj"):
        r = Rule(f"{role}-per-channel", spec(PC, PC), roles=frozenset({role}))
        rows.append(Row("granularity", f"LayerNorm + {role}", Policy(f"ln-{role}", (r, ln, default)), raw))
    att = Rule("attention-per-tensor", spec(PT, PC), roles=frozenset({"attn_qk", "attn_av", "patch_embed", "conv"}))
    rows.append(Row("granularity", "all (every linear)", Policy("all-per-channel", (att, Rule("default", spec(PC, PC)))),
                    raw))
    return rows


def step_rows(target: str, observer) -> list[Row]:
    from vitc.compiler.driver.build import (FC2_HADAMARD_DEFAULT, BuildConfig, fc2_hadamard_block, uses_bias_correction,
                                            uses_holdout_search)
    from vitc.compiler.driver.pipeline import Target

    base = target_default_policy(target, observer)
    default_cfg = BuildConfig(model=Path("."), outdir=Path("."), target=Target(target))
    bc_on = uses_bias_correction(default_cfg)
    rows = [Row("steps", "vitc default", base),
            Row("steps", "- bias correction", base, SimOptions(bias_correction=False)) if bc_on else
            Row("steps", "+ bias correction", base, SimOptions(bias_correction=True)),
            Row("steps", "- channel-scale migration", base, SimOptions(migrate=False)),
            Row("steps", "- range search (calibrated ranges, no migration/bias corr.)", base,
                SimOptions(search=False, migrate=False, bias_correction=False))]
    if target == "ort":
        rows.append(Row("steps", "- saturation-safe weights", base, SimOptions(pair_safe_weights=False)))
    else:  # symmetric activations
        rows.append(Row("steps", "+ input centring", base, SimOptions(center=True)))
    rows.append(Row("steps", "+ MSE weight clipping", base, SimOptions(weight_mse_clip=True)))
    rows.append(Row("steps", "+ residual-stream rotation", base, rotate=True))
    if fc2_hadamard_block(default_cfg):
        rows.append(Row("steps", "- Hadamard before fc2", base, fc2_hadamard=0))
    else:
        block = FC2_HADAMARD_DEFAULT[Target.ORT]
        rows.append(Row("steps", f"+ Hadamard before fc2 (block {block})", base, fc2_hadamard=block))
    if uses_holdout_search(default_cfg):
        rows.append(Row("steps", "- held-out range search (scored in-sample)", base, SimOptions(holdout_search=False)))
        if target == "ort":  # what the default would be without the held-out scoring
            caps = load_policy("migration-caps", PolicyDefaults.for_target(target, observer))
            rows.append(Row("steps", "- held-out range search, + migration caps (fc2 0.65, proj 0.3)", caps,
                            SimOptions(holdout_search=False)))
    else:
        rows.append(Row("steps", "+ held-out range search", base, SimOptions(holdout_search=True)))
    fc2_rule = next((r for r in base.rules if r.roles == frozenset({"fc2"})), None)
    if target != "trt":  # the ORT and OpenVINO defaults: what the migration into fc2 buys over none
        fc2_spec = (fc2_rule or base.rules[-1]).spec
        no_fc2 = Rule("fc2-no-migration", replace(fc2_spec, migrate=False, max_alpha=None), roles=frozenset({"fc2"}))
        rules = tuple(r for r in base.rules if r is not fc2_rule)
        rows.append(Row("steps", "- migration into fc2 (GELU output)",
                        Policy(base.name + "-fc2-migration", rules[:-1] + (no_fc2, rules[-1]))))
        if fc2_rule is not None and not fc2_rule.spec.symmetric and base.rules[-1].spec.symmetric:  # OpenVINO: uint8
            sym = Rule("fc2-int8", replace(fc2_rule.spec, symmetric=True), roles=fc2_rule.roles)
            rows.append(Row("steps", "- uint8 fc2 input (symmetric int8 there too)",
                            Policy(base.name + "-fc2-int8", tuple(sym if r is fc2_rule else r for r in base.rules))))
    float_av_only = next((r for r in base.rules if r.spec.skip and r.roles == frozenset({"attn_av"})), None)
    if float_av_only is not None:  # OpenVINO: QK^T int8, attention x V float; what the int8 QK^T costs
        both = Rule("attention-float", float_av_only.spec, roles=frozenset({"attn_qk", "attn_av"}))
        rows.append(Row("steps", "- int8 QK^T (both attention matmuls float)",
                        Policy(base.name + "-qk-float", tuple(both if r is float_av_only else r for r in base.rules))))
    if any(r.spec.rounding is WeightRounding.GPTQ for r in base.rules if not r.spec.skip):
        rows.append(Row("steps", "- GPTQ weight rounding (nearest)", with_rounding(base, WeightRounding.NEAREST)))
        rows.append(Row("steps", "+ sequential refit", base, SimOptions(sequential=True)))
    else:
        rows.append(Row("steps", "+ GPTQ weight rounding", with_rounding(base, WeightRounding.GPTQ)))
    float_av = next((r for r in base.rules if r.spec.skip and r.roles and "attn_av" in r.roles), None)
    if float_av is not None:  # the default keeps attention x V float: show what int8 there costs
        rules = tuple(r for r in base.rules if r is not float_av)
        rules = tuple(Rule(r.name, r.spec, roles=r.roles - {"attn_av"}) if r.roles and "attn_av" in r.roles else r
                      for r in rules)
        rows.append(Row("steps", "+ attention x V int8", Policy(base.name + "+av-int8", rules)))
        default_spec = rules[-1].spec
        for sq in (SoftmaxQuantizer.LOG2, SoftmaxQuantizer.LOG_SQRT2):  # research question: log quantizers there
            log_rule = Rule(f"attention-{sq.value}", replace(default_spec, softmax=sq), roles=frozenset({"attn_av"}))
            rows.append(Row("steps", f"+ attention x V int8, {sq.value} softmax (simulated)",
                            Policy(f"{base.name}+av-{sq.value}", (log_rule,) + rules)))
    return rows


@dataclass(frozen=True)
class AblateConfig:
    tables: tuple[str, ...] = ("granularity", "steps")
    latency: bool = True
    threads: int = 2
    batch: int = 1
    labels: Path | None = None  # ImageFolder with class subfolders: top-1/top-5 per row
    label_limit: int | None = 200
    max_seconds: float = 60.0  # latency: time limit per group after the minimum rounds


@dataclass
class AblationResult:
    rows: list[dict] = field(default_factory=list)
    latency: dict | None = None
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"meta": self.meta, "rows": self.rows, "latency": self.latency}


def ablate(sim: Simulator, cfg: AblateConfig, workdir: Path, show_progress: bool = True) -> AblationResult:
    from vitc.compiler.driver.build import save_model
    from vitc.compiler.progress import progress

    ob = sim.calib.observer
    rows: list[Row] = []
    if "granularity" in cfg.tables:
        rows += granularity_rows(ob, symmetric=sim.target.value == "trt")
    if "steps" in cfg.tables:
        rows += step_rows(sim.target.value, ob)
    out = AblationResult(meta={"model": str(sim.path), "target": sim.target.value, "held_out_samples": len(sim.feeds),
                               "calibration": sim.calib_summary})
    paths: list[Path] = []
    for i, row in enumerate(progress(rows, len(rows), "ablation", show_progress)):
        s = sim.variant(rotate=row.rotate or None, fc2_hadamard=row.fc2_hadamard)
        model, plan, _ = s.quantize(row.policy, row.options)
        fid = s.measure(model)
        path = workdir / f"row{i:02d}.onnx"
        save_model(model, path)
        paths.append(path)
        rec = {"table": row.table, "row": row.name, "policy": row.policy.name, "options": row.options.describe(),
               "sqnr_db": round(fid.sqnr_db, 3), "worst_db": round(fid.worst_sample_sqnr_db, 3),
               "cosine": round(fid.mean_cosine, 6), "quantized_nodes": len(plan.quantized()),
               "per_channel_activation_nodes": sum(1 for n in plan.quantized() if n.spec.activation is PC),
               "simulated_nodes": len(plan.simulated())}
        if cfg.labels is not None:
            rec.update(_top_k(path, cfg))
        out.rows.append(rec)
        log.info("ablate: %-55s %6.2f dB", row.name, fid.sqnr_db)
    if cfg.labels is not None:
        ref = workdir / "source.onnx"
        save_model(sim.source, ref)
        out.meta["source_fp32"] = _top_k(ref, cfg)
    if cfg.latency:
        out.latency = _latency(sim, rows, paths, workdir, cfg)
        for rec, m in zip(out.rows, out.latency["rows"]):
            rec["ms_per_image"] = m["ms_per_image"]
            rec["speedup_vs_source_fp32"] = m["speedup"]
    return out


def _top_k(path: Path, cfg: AblateConfig) -> dict:
    from vitc.compiler.measure.imagefolder import EvalConfig, evaluate_folder

    r = evaluate_folder(EvalConfig(model=path, data=cfg.labels, limit=cfg.label_limit, threads=cfg.threads,
                                   show_progress=False))
    return {"top1_pct": r.summary.get("top1_pct"), "top5_pct": r.summary.get("top5_pct"),
            "labeled_images": r.summary.get("labeled")}


def _latency(sim: Simulator, rows: list[Row], paths: list[Path], workdir: Path, cfg: AblateConfig) -> dict:
    from vitc.compiler.measure.bench import SuiteConfig, StopRule, ort_candidate, run_suite
    from vitc.compiler.driver.build import save_model

    src = workdir / "source.onnx"
    if not src.exists():
        save_model(sim.source, src)
    labels = ["source fp32"] + [f"{r.table}: {r.name}" for r in rows]
    cands = [ort_candidate(p, lab, i) for i, (p, lab) in enumerate(zip([src, *paths], labels))]
    rep = run_suite(cands, SuiteConfig(batches=(cfg.batch,), threads=(cfg.threads,),
                                       stop=StopRule(target_ci_pct=3.0, min_rounds=4, max_rounds=20,
                                                     max_seconds=cfg.max_seconds)))
    by = {m.label: m for m in rep.measurements}
    base = by.get("source fp32")
    return {"machine": rep.machine, "batch": cfg.batch, "threads": cfg.threads,
            "source_fp32_ms_per_image": None if base is None else round(base.ms_per_image, 3),
            "rows": [{"label": lab, "ms_per_image": round(by[lab].ms_per_image, 3) if lab in by else None,
                      "speedup": None if lab not in by or by[lab].speedup_vs_baseline is None
                      else round(by[lab].speedup_vs_baseline, 3)} for lab in labels[1:]]}


def format_markdown(res: AblationResult) -> str:
    has_top = any("top1_pct" in r for r in res.rows)
    has_lat = res.latency is not None
    head = ["row", "SQNR dB", "worst dB", "cosine"] + (["top-1 %", "top-5 %"] if has_top else []) + \
        ["simulated nodes"] + (["ms/img", "vs source fp32"] if has_lat else [])
    out = []
    for table, title in (("granularity", "Which operators are per-channel (calibrated ranges, no vitc steps)"),
                         ("steps", "vitc's steps, one switched off or on at a time")):
        rows = [r for r in res.rows if r["table"] == table]
        if not rows:
            continue
        out += [f"### {title}", "", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for r in rows:
            cells = [r["row"], f"{r['sqnr_db']:.2f}", f"{r['worst_db']:.2f}", f"{r['cosine']:.5f}"]
            if has_top:
                cells += [_fmt(r.get("top1_pct")), _fmt(r.get("top5_pct"))]
            cells.append(str(r["simulated_nodes"]))
            if has_lat:
                cells += [_fmt(r.get("ms_per_image")), _fmt(r.get("speedup_vs_source_fp32"), "x")]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    m = res.meta
    out.append(f"{m.get('held_out_samples')} held-out samples; target {m.get('target')}; source model {m.get('model')}")
    if has_lat:
        lat = res.latency
        out.append(f"latency: ORT CPU, batch {lat['batch']}, {lat['threads']} thread(s), source fp32 "
                   f"{_fmt(lat['source_fp32_ms_per_image'])} ms/img, timed side by side in alternating blocks")
    if "source_fp32" in m:
        out.append(f"source fp32 top-1 {_fmt(m['source_fp32'].get('top1_pct'))} %, top-5 "
                   f"{_fmt(m['source_fp32'].get('top5_pct'))} %")
    return "\n".join(out) + "\n"


def _fmt(v, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:.2f}{unit}"


def write_png(res: AblationResult, path: Path) -> None:
    """Horizontal bars of output SQNR per row (matplotlib), one panel per table, speed ratio beside each bar."""
    plots.require("ablation.png")
    tables = {t: [r for r in res.rows if r["table"] == t] for t in dict.fromkeys(r["table"] for r in res.rows)}
    colors = {"granularity": "#4c72b0", "steps": "#55a868"}

    def draw(fig: Figure) -> None:
        axes = fig.subplots(len(tables), 1, sharex=True, squeeze=False,
                            height_ratios=[len(rows) + 1 for rows in tables.values()])[:, 0]
        for ax, (table, rows) in zip(axes, tables.items()):
            notes = [f"{r['sqnr_db']:.1f} dB" + (f"  {r['speedup_vs_source_fp32']:.2f}x"
                                                  if r.get("speedup_vs_source_fp32") else "") for r in rows]
            plots.hbars(ax, [r["row"][:60] for r in rows], [r["sqnr_db"] for r in rows],
                        [colors.get(table, "#8c8c8c")] * len(rows), notes)
            ax.set_title(table)
        axes[-1].set_xlabel("output SQNR vs source fp32 (dB, higher is better)")
        fig.suptitle(f"output SQNR vs source fp32 (dB, higher is better) - {Path(res.meta['model']).name}",
                     x=0.01, ha="left", fontsize=9)

    height = 40 + sum(50 + 26 * len(rows) for rows in tables.values())
    path.write_bytes(plots.render(draw, 1000, height, "png", dpi=144))


def write_outputs(res: AblationResult, tmp: Path) -> list[str]:
    """ablation.json, ablation.md and, with matplotlib, ablation.png into ``tmp``; the names written."""
    (tmp / "ablation.json").write_text(json.dumps(res.to_json(), indent=2, default=str))
    (tmp / "ablation.md").write_text(format_markdown(res))
    if not plots.available():
        log.warning("ablation.png not drawn: %s", plots.MISSING_NOTE)
        return ["ablation.md", "ablation.json"]
    write_png(res, tmp / "ablation.png")
    return ["ablation.md", "ablation.json", "ablation.png"]


# -- `vitc ablate` -----------------------------------------------------------------------------------------------------
def add_arguments(p, shape_type, floats3_type, std3_type, positive_type) -> None:
    from vitc.compiler.research import simulate

    simulate.add_arguments(p, shape_type, floats3_type, std3_type, positive_type)
    p.add_argument("--table", choices=["granularity", "steps"], action="append", default=None,
                   help="which table (repeatable; default both)")
    p.add_argument("--labels", type=Path, default=None,
                   help="ImageFolder (class subfolders, sorted = class index) for top-1/top-5 per row")
    p.add_argument("--label-limit", type=positive_type, default=200, help="images of --labels to evaluate")
    p.add_argument("--no-latency", action="store_true", help="skip timing the rows")
    p.add_argument("--bench-threads", type=positive_type, default=2, help="ORT threads when timing (default 2)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="timing: limit after the minimum rounds")


def run_command(a) -> int:
    from vitc.compiler.driver.outdir import staged
    from vitc.compiler.research.simulate import simulator_from_args

    if a.labels is not None and not a.labels.is_dir():
        from vitc.compiler.errors import CalibrationDataError

        raise CalibrationDataError(f"{a.labels}: not a folder", hint="give an ImageFolder: one subfolder per class")
    cfg = AblateConfig(tables=tuple(a.table or ("granularity", "steps")), latency=not a.no_latency,
                       threads=a.bench_threads, labels=a.labels, label_limit=a.label_limit, max_seconds=a.max_seconds)
    with staged(a.outdir, a.force) as tmp:
        sim = simulator_from_args(a)
        with tempfile.TemporaryDirectory(prefix="vitc-ablate-") as work:  # rows' models, for timing
            res = ablate(sim, cfg, Path(work))
        written = write_outputs(res, tmp)
    sys.stdout.write(format_markdown(res))
    log.info("wrote %s (%s)", a.outdir.absolute(), ", ".join(written))
    return 0
