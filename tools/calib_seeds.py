"""Held-out fidelity of `vitc build` across calibration draws, for one or more sets of build flags, in one run.

    python -m vitc.tools.calib_seeds MODEL -o OUTDIR [--seeds 0,1,2,3] [--eval-samples 72] [--eval FILE.npz]
                                     [--variant LABEL="BUILD FLAGS"]...

Each variant (default: one, `vitc build` without flags) is built once per calibration seed (`--seed S`; with the
embedded photos every seed draws other crops) and run beside the source in ONNX Runtime on the same held-out inputs:
the crops `vitc ablate --eval-samples N` draws (evaluation photos calibration never sees, seed 11) or `--eval`.
Reports the pooled output SQNR and the worst input's per seed, the mean and the spread; writes results.json and
results.md into OUTDIR. Fidelity only: time builds with `vitc bench` or `compare_peers`.

    python -m vitc.tools.calib_seeds enc.onnx -o seeds --variant default= \\
        --variant capped="--no-holdout-search --policy migration-caps"
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger("vitc.calib_seeds")

EVAL_SEED = 11  # the crops `vitc ablate` and `vitc search` measure on


def parse_variant(text: str) -> tuple[str, list[str]]:
    label, sep, flags = text.partition("=")
    if not sep or not label.strip():
        raise argparse.ArgumentTypeError(f"--variant {text!r}: write LABEL=\"BUILD FLAGS\" (flags may be empty)")
    for tok in shlex.split(flags):
        if tok.split("=")[0] in ("-o", "--outdir", "--seed"):
            raise argparse.ArgumentTypeError(f"--variant {label}: {tok.split('=')[0]} is set by calib_seeds")
    return label.strip(), shlex.split(flags)


def held_out_inputs(model: Path, eval_source: Path | None, samples: int) -> list[dict[str, np.ndarray]]:
    """The held-out inputs at batch 1 (a symbolic batch dim is fixed to 1 to draw them)."""
    import onnx

    from vitc.compiler.driver.build import CalibConfig, held_out_feeds

    m = onnx.load(model, load_external_data=False)
    for gi in m.graph.input:
        dims = gi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    feeds, _ = held_out_feeds(m, eval_source, samples, CalibConfig(), EVAL_SEED)
    return feeds


def run(model: Path, outdir: Path, seeds: list[int], variants: list[tuple[str, list[str]]], eval_samples: int,
        eval_source: Path | None, threads: int) -> dict:
    from vitc.compiler.cli.main import main as vitc_main
    from vitc.compiler.measure.bench import machine_info
    from vitc.compiler.measure.fidelity import fidelity

    feeds = held_out_inputs(model, eval_source, eval_samples)
    results: dict = {"machine": machine_info(), "model": str(model), "eval": str(eval_source or "embedded crops"),
                     "eval_samples": len(feeds), "eval_seed": EVAL_SEED, "seeds": seeds, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="vitc-seeds-") as tmp:
        for label, flags in variants:
            rows = []
            for seed in seeds:
                out = Path(tmp) / f"{len(results['variants'])}_{seed}"
                argv = ["build", str(model), "-o", str(out), "--seed", str(seed), *flags]
                if vitc_main(argv) != 0:
                    raise SystemExit(f"calib_seeds: `vitc {shlex.join(argv)}` failed")
                art = next(out.glob("model.int8.onnx"), None) or next(out.glob("*.onnx"))
                f = fidelity(model, art, feeds, threads=threads)
                rows.append({"seed": seed, "sqnr_db": round(f.sqnr_db, 2),
                             "worst_sqnr_db": round(f.worst_sample_sqnr_db, 2)})
                log.info("%s, seed %d: %.2f dB (worst input %.1f)", label, seed, f.sqnr_db, f.worst_sample_sqnr_db)
            db = [r["sqnr_db"] for r in rows]
            results["variants"][label] = {"flags": shlex.join(flags), "per_seed": rows,
                                          "mean_db": round(float(np.mean(db)), 2),
                                          "min_db": min(db), "max_db": max(db)}
    return results


def to_markdown(res: dict) -> str:
    m = res["machine"]
    simd = ", ".join(m.get("simd", [])) or "?"
    lines = [f"**{Path(res['model']).name}**: pooled output SQNR on {res['eval_samples']} held-out inputs "
             f"({res['eval']}), per calibration seed. Machine: {m.get('cpu', '?')} ({simd}).", "",
             "| variant | flags | " + " | ".join(f"seed {s}" for s in res["seeds"]) + " | mean | spread |",
             "|---|---|" + "---:|" * (len(res["seeds"]) + 2)]
    for label, v in res["variants"].items():
        lines.append(f"| {label} | `{v['flags'] or '(none)'}` | "
                     + " | ".join(f"{r['sqnr_db']:.2f}" for r in v["per_seed"])
                     + f" | {v['mean_db']:.2f} | {v['max_db'] - v['min_db']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitc.tools.calib_seeds", description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--outdir", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2,3", help="comma-separated calibration seeds (default 0,1,2,3)")
    p.add_argument("--variant", action="append", type=parse_variant, default=[], metavar='LABEL="FLAGS"',
                   help="build flags to compare (repeatable; default: one variant, no flags)")
    p.add_argument("--eval-samples", type=int, default=72)
    p.add_argument("--eval", type=Path, default=None, help="held-out inputs as .npz/.npy or an image folder")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if not log.handlers:  # the builds configure the "vitc" logger; this one reports on its own, once
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("calib_seeds: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {a.seeds!r}: give comma-separated integers")
    if not seeds:
        p.error("--seeds: give at least one seed")
    if not a.model.is_file():
        p.error(f"{a.model}: no such model file")
    if a.eval_samples < 1:
        p.error("--eval-samples: give 1 or more")
    res = run(a.model, a.outdir, seeds, a.variant or [("default", [])], a.eval_samples, a.eval, a.threads)
    a.outdir.mkdir(parents=True, exist_ok=True)
    (a.outdir / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    md = to_markdown(res)
    (a.outdir / "results.md").write_text(md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
