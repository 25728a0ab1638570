"""Peak memory and wall time of `vitc build` on a large ViT for several calibration-set sizes, and a > 2 GB model.

    nice -n 19 python -m vitc.tools.measure_rss -o rss_out                      # ViT-L/16, 64 and 512 samples
    nice -n 19 python -m vitc.tools.measure_rss -o rss_out --model deit_small_patch16_224 --samples 64 512
    nice -n 19 python -m vitc.tools.measure_rss -o rss_out --samples --over-2gb   # only the > 2 GB check

The model is exported from timm with random weights (`vitc export`, needs vitc[export]). Every build runs in its own
process (`python -m vitc build ...`, embedded calibration photos, default settings otherwise); its peak RSS is that
process's ru_maxrss, read with wait4. A run whose predicted time (from the first, smallest run: its calibration
seconds per sample, plus the rest) exceeds --max-minutes is skipped and reported as such.

--over-2gb writes a synthetic model of 9 linear layers whose weights (2.4 GB) are external data, written layer by layer
(the script never holds them), and builds it fp32 and int8 with .npz calibration feeds: the load and save paths of
models over protobuf's 2 GiB limit. It needs several times the weight size in free memory and disk; it is not part of
the test suite.
Results go to OUTDIR/rss.json and are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class Run:
    what: str
    command: list[str]
    samples: int | None = None
    returncode: int | None = None
    peak_rss_gib: float | None = None
    wall_s: float | None = None
    stages_s: dict | None = None  # build.json "seconds"
    note: str = ""


def measured(cmd: list[str], log_path: Path) -> tuple[int, float, float]:
    """Run ``cmd``; (return code, peak RSS in GiB of that process, wall seconds). Output goes to ``log_path``."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return proc.returncode, usage.ru_maxrss / 2**20, wall  # ru_maxrss is in KiB on Linux


def _vitc(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitc", "--log-level", "warning", *args]


def _last_lines(path: Path, n: int = 3) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(lines[-n:])


def export_model(name: str, outdir: Path) -> tuple[Path, Run]:
    path = outdir / f"{name}.onnx"
    run = Run(f"export {name}", _vitc("export", name, "-o", str(path), "--force"))
    if path.is_file():
        run.note = "exported earlier, reused"
        return path, run
    run.returncode, run.peak_rss_gib, run.wall_s = measured(run.command, outdir / f"export_{name}.log")
    if run.returncode != 0:
        raise SystemExit(f"export failed: {_last_lines(outdir / f'export_{name}.log')}")
    return path, run


def build_runs(model: Path, samples: list[int], outdir: Path, max_minutes: float) -> list[Run]:
    runs: list[Run] = []
    first: Run | None = None
    for n in sorted(samples):
        out = outdir / f"build_{model.stem}_{n}"
        run = Run(f"build {model.stem}, {n} samples",
                  _vitc("build", str(model), "-o", str(out), "--calib-samples", str(n), "--force"), samples=n)
        if first is not None and first.stages_s and first.samples and first.wall_s:
            calib = first.stages_s.get("calibration", 0.0)
            predicted = first.wall_s - calib + calib / first.samples * n
            if predicted > max_minutes * 60:
                run.note = f"skipped: predicted {predicted / 60:.0f} min > --max-minutes {max_minutes:g}"
                runs.append(run)
                print(f"{run.what}: {run.note}", flush=True)
                continue
        run.returncode, run.peak_rss_gib, run.wall_s = measured(run.command, outdir / f"{out.name}.log")
        if run.returncode == 0:
            run.stages_s = json.loads((out / "build.json").read_text())["seconds"]
        else:
            run.note = _last_lines(outdir / f"{out.name}.log")
        print(f"{run.what}: rc {run.returncode}, peak RSS {run.peak_rss_gib:.2f} GiB, {run.wall_s:.0f} s", flush=True)
        runs.append(run)
        first = first or (run if run.returncode == 0 else None)
    return runs


# -- a model over protobuf's 2 GiB limit -------------------------------------------------------------------------------
def write_big_model(folder: Path, dim: int, layers: int, tokens: int = 4) -> tuple[Path, Path]:
    """x[1, tokens, dim] -> ``layers`` x (MatMul(W[dim, dim]) + bias): weights in one external-data file, written layer
    by layer (the script never holds more than one), each under protobuf's limit as in real large models."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "big.onnx.data"
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    with open(data, "wb") as f:
        for i in range(layers):
            offset = f.tell()
            f.write((rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim)).astype("<f4").tobytes())
            w = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim],
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(dim * dim * 4))):
                entry = w.external_data.add()
                entry.key, entry.value = key, value
            inits += [w, numpy_helper.from_array(np.full(dim, 0.01, np.float32), f"b{i}")]
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"mm{i}"),
                      helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"y{i}"], name=f"bias{i}")]
            x = f"y{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, dim])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, tokens, dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "big.onnx"
    onnx.save(model, path)
    feeds = folder / "feeds.npz"
    np.savez(feeds, x=rng.standard_normal((4, tokens, dim)).astype(np.float32))
    return path, feeds


def over_2gb_runs(outdir: Path, dim: int, layers: int) -> list[Run]:
    model, feeds = write_big_model(outdir / "big", dim, layers)
    size = (model.parent / "big.onnx.data").stat().st_size
    runs = []
    for precision in ("fp32", "int8"):
        out = outdir / f"build_big_{precision}"
        run = Run(f"build > 2 GB ({layers} x {dim}x{dim} weights, {size / 1e9:.1f} GB), {precision}",
                  _vitc("build", str(model), "-o", str(out), "--precision", precision, "--calib", str(feeds),
                        "--calib-samples", "4", "--force"))
        run.returncode, run.peak_rss_gib, run.wall_s = measured(run.command, outdir / f"{out.name}.log")
        if run.returncode == 0:
            files = sorted(p.name for p in out.iterdir())
            run.note = "wrote " + ", ".join(files)
            run.stages_s = json.loads((out / "build.json").read_text())["seconds"]
        else:
            run.note = _last_lines(outdir / f"{out.name}.log", 1)
        print(f"{run.what}: rc {run.returncode}, peak RSS {run.peak_rss_gib:.2f} GiB, {run.wall_s:.0f} s; {run.note}",
              flush=True)
        runs.append(run)
    return runs


def table(runs: list[Run]) -> str:
    rows = ["| run | exit | peak RSS GiB | wall s | calibration s | note |", "|---|---|---|---|---|---|"]
    for r in runs:
        rss = f"{r.peak_rss_gib:.2f}" if r.peak_rss_gib is not None else "-"
        wall = f"{r.wall_s:.0f}" if r.wall_s is not None else "-"
        calib = f"{r.stages_s['calibration']:.0f}" if r.stages_s and "calibration" in r.stages_s else "-"
        rc = "-" if r.returncode is None else str(r.returncode)
        rows.append(f"| {r.what} | {rc} | {rss} | {wall} | {calib} | {r.note} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitc.tools.measure_rss", description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--outdir", type=Path, required=True, help="work folder (models, builds, logs, rss.json)")
    p.add_argument("--model", default="vit_large_patch16_224", help="timm model name (random weights)")
    p.add_argument("--samples", type=int, nargs="*", default=[64, 512], help="calibration-set sizes to compare")
    p.add_argument("--max-minutes", type=float, default=25.0, help="skip builds predicted to take longer")
    p.add_argument("--over-2gb", action="store_true", help="also build a synthetic model with 2.4 GB of weights")
    p.add_argument("--big-dim", type=int, default=8192, help="the > 2 GB model's layers are DIM x DIM float32")
    p.add_argument("--big-layers", type=int, default=9, help="and it has this many of them")
    a = p.parse_args(argv)
    a.outdir.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    if a.samples:
        model, exported = export_model(a.model, a.outdir)
        runs.append(exported)
        runs += build_runs(model, a.samples, a.outdir, a.max_minutes)
    if a.over_2gb:
        runs += over_2gb_runs(a.outdir, a.big_dim, a.big_layers)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
               "python": platform.python_version()}
    (a.outdir / "rss.json").write_text(json.dumps({"machine": machine, "runs": [asdict(r) for r in runs]}, indent=2))
    print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
