"""The int8 GEMM ceiling of a model: its linear layers alone, fp32 against int8, in ONNX Runtime on this machine.

    python -m vitc.tools.gemm_ceiling MODEL.onnx [--batch 1] [--threads 2] [--max-time 120] [--json out.json]

How much faster an int8 model can get than its fp32 source is bounded by how much faster ORT's int8 GEMM kernel
(``QGemm``, MLAS) is than its fp32 one *at the model's own shapes*. Measured on large square GEMMs that ratio is
about 1.95x on an AVX2 CPU; at a ViT's batch-1 shapes (197 or 257 token rows, 384..1536 columns) it is lower, and a
goal above it cannot be reached by any rewriting of the graph. This tool measures it:

- the model goes through vitc's float front end (load with the batch fixed, canonicalize, fusions), and every
  linear layer (``Gemm``/``MatMul`` with a constant 2-D weight; the patch-embedding Conv and the attention core's
  activation x activation MatMuls are left out) gives one (M, K, N); the chain keeps those with the most common M
  (the token stream; a classifier head on the class token alone, M = batch, is left out and reported);
- two chain models are built from those shapes in graph order, each linear reading the previous one's output
  (a ``Slice`` or zero ``Pad`` of the feature axis where N and the next K differ, the same in both):
  ``fp32``: ``Gemm(x, W, b)``; ``int8``: ``QuantizeLinear(x)`` -> ``DequantizeLinear`` -> ``Gemm`` with a
  per-channel int8 weight and an int32 bias, which ORT fuses into ``QuantizeLinear`` + ``QGemm`` (what a vitc int8
  model runs for each linear);
- both are timed side by side in alternating blocks (``vitc.compiler.measure.bench``), the ratio pair by pair per round.

Weights are random (their values do not change kernel speed; fp32 values are kept of unit scale so no denormals
appear). ``compare_peers`` runs the same two chains in its own timing run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger("vitc.gemm_ceiling")

FP32_LABEL = "linears alone, fp32 Gemm"
INT8_LABEL = "linears alone, int8 QGemm"


@dataclass(frozen=True)
class LinearShape:
    name: str  # the node in vitc's fused float graph
    m: int  # rows (tokens x batch)
    k: int
    n: int


def linear_shapes(path: Path, batch: int = 1) -> list[LinearShape]:
    """Every linear layer of ``path`` as (M, K, N), in graph order, after vitc's float front end (batch fixed)."""
    import onnx_graphsurgeon as gs

    from vitc.compiler.driver.loader import load_model
    from vitc.compiler.driver.pipeline import PipelineConfig, Target, float_pipeline, run_passes
    from vitc.passes.graphutil import const_value

    graph = gs.import_onnx(load_model(path, batch=batch).model)  # the loader fixes and infers every shape
    run_passes(graph, float_pipeline(PipelineConfig(Target.ORT, True)))
    out = []
    for node in graph.nodes:
        if node.op not in ("Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w, xs = const_value(node.inputs[1]), node.inputs[0].shape
        if w is None or w.ndim != 2 or not xs or any(not isinstance(d, int) for d in xs):
            continue
        k, n = w.shape[::-1] if node.op == "Gemm" and node.attrs.get("transB", 0) else w.shape
        out.append(LinearShape(node.name, int(np.prod(xs[:-1])), int(k), int(n)))
    if not out:
        raise ValueError(f"{path}: no linear layer with a constant 2-D weight and a static input shape")
    return out


def describe(shapes: list[LinearShape], left: list[LinearShape]) -> dict:
    """What a chain holds, for reports: how many linears, their distinct (M, K, N), the linears left out."""
    return {"linears": len(shapes), "shapes_mkn": [list(x) for x in sorted({(s.m, s.k, s.n) for s in shapes})],
            "left_out": [f"{s.name} ({s.m}x{s.k}x{s.n})" for s in left]}


def _adapt(nodes: list, inits: list, cur: str, have: int, want: int, tag: str) -> str:
    """Make the feature axis of ``cur`` (``have`` wide) ``want`` wide: Slice when too wide, zero Pad when too narrow."""
    if have == want:
        return cur
    out = f"{tag}.adapt"
    if have > want:
        inits += [numpy_helper.from_array(np.array([0], np.int64), f"{tag}.start"),
                  numpy_helper.from_array(np.array([want], np.int64), f"{tag}.end"),
                  numpy_helper.from_array(np.array([1], np.int64), f"{tag}.axis")]
        nodes.append(helper.make_node("Slice", [cur, f"{tag}.start", f"{tag}.end", f"{tag}.axis"], [out]))
    else:
        inits.append(numpy_helper.from_array(np.array([0, 0, 0, want - have], np.int64), f"{tag}.pads"))
        nodes.append(helper.make_node("Pad", [cur, f"{tag}.pads"], [out]))
    return out


def chain_models(shapes: list[LinearShape], seed: int = 0) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(fp32, int8) models running ``shapes`` as one chain (see the module docstring)."""
    rng = np.random.default_rng(seed)
    models = []
    for int8 in (False, True):
        nodes: list = []
        inits: list = []
        m0 = shapes[0].m
        # the input is [1, M, K] (a batch of one, as the timing harness expects), reshaped once to 2-D
        inits.append(numpy_helper.from_array(np.array([m0, shapes[0].k], np.int64), "x.shape2d"))
        nodes.append(helper.make_node("Reshape", ["x", "x.shape2d"], ["x2d"]))
        cur, width = "x2d", shapes[0].k
        for i, s in enumerate(shapes):
            t = f"l{i}"
            cur = _adapt(nodes, inits, cur, width, s.k, t)
            if s.m != m0:
                raise ValueError(f"linear {s.name} has {s.m} rows, the first one {m0}: one chain needs one M")
            if not int8:
                inits += [numpy_helper.from_array((rng.standard_normal((s.k, s.n)) / np.sqrt(s.k)).astype(np.float32),
                                                  f"{t}.w"),
                          numpy_helper.from_array(np.zeros(s.n, np.float32), f"{t}.b")]
                nodes.append(helper.make_node("Gemm", [cur, f"{t}.w", f"{t}.b"], [f"{t}.y"]))
            else:
                x_scale, w_scale = 4.0 / 127, (rng.uniform(0.5, 1.5, s.n) / (127 * np.sqrt(s.k))).astype(np.float32)
                inits += [numpy_helper.from_array(np.float32(x_scale), f"{t}.xs"),
                          numpy_helper.from_array(np.uint8(128), f"{t}.xz"),
                          numpy_helper.from_array(rng.integers(-127, 128, (s.k, s.n)).astype(np.int8), f"{t}.wq"),
                          numpy_helper.from_array(w_scale, f"{t}.ws"),
                          numpy_helper.from_array(np.zeros(s.n, np.int8), f"{t}.wz"),
                          numpy_helper.from_array(np.zeros(s.n, np.int32), f"{t}.bq"),
                          numpy_helper.from_array((x_scale * w_scale).astype(np.float32), f"{t}.bs"),
                          numpy_helper.from_array(np.zeros(s.n, np.int32), f"{t}.bz")]
                nodes += [helper.make_node("QuantizeLinear", [cur, f"{t}.xs", f"{t}.xz"], [f"{t}.xq"]),
                          helper.make_node("DequantizeLinear", [f"{t}.xq", f"{t}.xs", f"{t}.xz"], [f"{t}.xd"]),
                          helper.make_node("DequantizeLinear", [f"{t}.wq", f"{t}.ws", f"{t}.wz"], [f"{t}.wd"],
                                           axis=1),
                          helper.make_node("DequantizeLinear", [f"{t}.bq", f"{t}.bs", f"{t}.bz"], [f"{t}.bd"],
                                           axis=0),
                          helper.make_node("Gemm", [f"{t}.xd", f"{t}.wd", f"{t}.bd"], [f"{t}.y"])]
            cur, width = f"{t}.y", s.n
        graph = helper.make_graph(nodes, "int8" if int8 else "fp32",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m0, shapes[0].k])],
                                  [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [m0, width])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        models.append(model)
    return models[0], models[1]


def token_stream(shapes: list[LinearShape]) -> tuple[list[LinearShape], list[LinearShape]]:
    """(the linears with the most common M, the rest)."""
    ms = [s.m for s in shapes]
    m = max(set(ms), key=lambda v: (ms.count(v), v))
    return [s for s in shapes if s.m == m], [s for s in shapes if s.m != m]


def write_chains(path: Path, batch: int, outdir: Path) -> tuple[Path, Path, list[LinearShape], list[LinearShape]]:
    """The two chain models of ``path`` written into ``outdir``: (fp32 path, int8 path, the linears chained, the
    linears left out)."""
    shapes, left = token_stream(linear_shapes(path, batch))
    fp32, int8 = chain_models(shapes)
    paths = outdir / "linears_fp32.onnx", outdir / "linears_int8.onnx"
    for m, p in zip((fp32, int8), paths):
        onnx.save(m, p)
    return paths[0], paths[1], shapes, left


def measure(path: Path, batch: int, threads: int, max_seconds: float, workdir: Path) -> dict:
    from vitc.compiler.measure import bench as B

    fp, q, shapes, left = write_chains(path, batch, workdir)
    cands = [B.ort_candidate(fp, FP32_LABEL, 0), B.ort_candidate(q, INT8_LABEL, 1)]
    rep = B.run_suite(cands, B.SuiteConfig(batches=(1,), threads=(threads,),
                                           stop=B.StopRule(target_ci_pct=2.0, min_rounds=5, max_rounds=40,
                                                           max_seconds=max_seconds)))
    a, b = rep.measurements
    r, ci = B.pair_ratio(a, b)
    return {"model": str(path), "batch": batch, "threads": threads, **describe(shapes, left),
            "fp32_ms": round(a.median_ms, 3), "int8_ms": round(b.median_ms, 3),
            "ceiling": round(r, 3), "ceiling_ci95": [round(x, 3) for x in ci], "rounds": a.rounds,
            "stop": a.stop, "machine": rep.machine}


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from vitc.compiler.errors import VitcError

    ap = argparse.ArgumentParser(prog="python -m vitc.tools.gemm_ceiling", description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-time", type=float, default=120.0, help="seconds of timing at most (default 120)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="vitc: %(message)s")
    try:
        with tempfile.TemporaryDirectory(prefix="vitc-ceiling-") as tmp:
            res = measure(a.model, a.batch, a.threads, a.max_time, Path(tmp))
    except (VitcError, ValueError) as exc:
        print(f"vitc gemm_ceiling: error: {exc}", file=sys.stderr)
        return 2
    lo, hi = res["ceiling_ci95"]
    sys.stdout.write(f"{a.model.name}: {res['linears']} linears {res['shapes_mkn']}, {a.threads} threads: "
                     f"fp32 {res['fp32_ms']:.2f} ms, int8 {res['int8_ms']:.2f} ms -> int8 GEMM ceiling "
                     f"{res['ceiling']:.2f}x (95% CI {lo:.2f}-{hi:.2f}, {res['rounds']} rounds)\n")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
