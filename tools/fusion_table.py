"""The research's Table 1 as ms/img: quantized latency with and without graph fusion, for timm ViTs, in one run.

    python -m vitc.tools.fusion_table -o fusion_out [--models deit_tiny_patch16_224,deit_small_patch16_224,...]
                                      [--threads 2] [--max-time 120]

Per model: export from timm (random weights, needs vitc[export]), then `vitc build` int8 fused, int8 --no-fuse and
fp32 (fused), and time the source and the three builds side by side (alternating blocks, ratios pair by pair,
batch 1). Writes results.json and results.md into the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("vitc.fusion_table")

DEFAULT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "vit_base_patch16_224")


def run(models: list[str], outdir: Path, threads: int, max_time: float, calib_samples: int) -> dict:
    from vitc.compiler.measure.bench import StopRule, SuiteConfig, machine_info, ort_candidate, run_suite
    from vitc.compiler.driver.build import BuildConfig, CalibConfig, Precision, build
    from vitc.compiler.cli.export import ExportConfig, export_timm

    results: dict = {"machine": machine_info(), "threads": threads, "batch": 1, "models": {}}
    with tempfile.TemporaryDirectory(prefix="vitc-fusion-") as tmp:
        tmp = Path(tmp)
        for name in models:
            src = export_timm(ExportConfig(model_name=name, output=tmp / f"{name}.onnx"))
            variants = {"source fp32": src}
            for label, kw in (("vitc int8 fused", {}), ("vitc int8 --no-fuse", {"fuse": False}),
                              ("vitc fp32 fused", {"precision": Precision.FP32})):
                res = build(BuildConfig(model=src, outdir=tmp / name / label.replace(" ", "_"),
                                        calib=CalibConfig(samples=calib_samples), show_progress=False, **kw))
                variants[label] = res.model_path
            cands = [ort_candidate(p, lab, i) for i, (lab, p) in enumerate(variants.items())]
            rep = run_suite(cands, SuiteConfig(batches=(1,), threads=(threads,),
                                               stop=StopRule(target_ci_pct=3.0, max_seconds=max_time)))
            results["models"][name] = {m.label: {"ms_per_image": round(m.ms_per_image, 2),
                                                 "ci95_pct": round(m.ci95_pct, 1),
                                                 "speedup_vs_source": None if m.speedup_vs_baseline is None
                                                 else round(m.speedup_vs_baseline, 3)}
                                       for m in rep.measurements}
            log.info("%s: %s", name, results["models"][name])
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "results.json").write_text(json.dumps(results, indent=2))
    (outdir / "results.md").write_text(format_table(results))
    return results


def format_table(results: dict) -> str:
    cols = ["source fp32", "vitc fp32 fused", "vitc int8 --no-fuse", "vitc int8 fused"]
    lines = ["| model | " + " | ".join(f"{c} ms/img" for c in cols) + " | int8 fused vs unfused |",
             "|---" + "|---:" * (len(cols) + 1) + "|"]
    for name, r in results["models"].items():
        cells = []
        for c in cols:
            m = r.get(c)
            cells.append("n/a" if m is None else f"{m['ms_per_image']:.1f}"
                         + ("" if c == "source fp32" or m["speedup_vs_source"] is None else
                            f" ({m['speedup_vs_source']:.2f}x)"))
        f, u = r.get("vitc int8 fused"), r.get("vitc int8 --no-fuse")
        ratio = "n/a" if not f or not u or not f["speedup_vs_source"] or not u["speedup_vs_source"] else \
            f"{f['speedup_vs_source'] / u['speedup_vs_source']:.2f}x"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    m = results["machine"]
    lines.append("")
    lines.append(f"ORT CPU, batch 1, {results['threads']} threads, {m.get('cpu', platform.machine())}; ratios vs the "
                 "source fp32 model in parentheses, pair by pair per round")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--outdir", type=Path, required=True)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-time", type=float, default=120.0, help="timing limit per model after the minimum rounds")
    ap.add_argument("--calib-samples", type=int, default=32)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = run([m for m in a.models.split(",") if m], a.outdir, a.threads, a.max_time, a.calib_samples)
    sys.stdout.write(format_table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
