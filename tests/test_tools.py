"""Benchmark scripts' table formatting (the scripts themselves are timed runs, not tests)."""

from vitc.tools.fusion_table import format_table


def test_fusion_table_ratio_fused_vs_unfused():
    res = {"threads": 2, "machine": {"cpu": "x"}, "models": {"deit_tiny_patch16_224": {
        "source fp32": {"ms_per_image": 20.0, "ci95_pct": 1.0, "speedup_vs_source": None},
        "vitc fp32 fused": {"ms_per_image": 18.0, "ci95_pct": 1.0, "speedup_vs_source": 1.11},
        "vitc int8 --no-fuse": {"ms_per_image": 25.0, "ci95_pct": 1.0, "speedup_vs_source": 0.8},
        "vitc int8 fused": {"ms_per_image": 12.5, "ci95_pct": 1.0, "speedup_vs_source": 1.6}}}}
    md = format_table(res)
    assert "| deit_tiny_patch16_224 | 20.0 | 18.0 (1.11x) | 25.0 (0.80x) | 12.5 (1.60x) | 2.00x |" in md


# -- tools/gemm_ceiling: the linears of a model as an fp32 and an int8 chain ------------------------------------------
def test_gemm_ceiling_chains(vit_path, tmp_path):
    """The chains hold the model's linears in graph order (same M, K, N), ORT runs the int8 one as QGemm kernels
    (not float Gemms between Q/DQ), and both compute finite outputs of the same shape."""
    import collections

    import numpy as np
    import onnx
    import onnxruntime as ort

    from vitc.tools import gemm_ceiling as G

    shapes = G.linear_shapes(vit_path)
    chain, left = G.token_stream(shapes)
    src = onnx.load(vit_path)
    n_linear = sum(n.op_type in ("MatMul", "Gemm") and n.input[1] in {i.name for i in src.graph.initializer}
                   for n in src.graph.node)
    assert len(shapes) == n_linear and len(chain) >= 4 and len({s.m for s in chain}) == 1
    assert all(s.m != chain[0].m for s in left)
    fp, q = G.chain_models(chain)
    x = np.random.default_rng(0).standard_normal((1, chain[0].m, chain[0].k)).astype(np.float32)
    outs = []
    for m in (fp, q):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{m.graph.name}.opt.onnx")
        outs.append(ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
                    .run(None, {"x": x})[0])
        ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
        if m is q:
            assert ops["QGemm"] == len(chain) and ops["Gemm"] == 0 and ops["DequantizeLinear"] == 0
        else:
            assert ops["Gemm"] + ops["FusedGemm"] == len(chain)
    assert outs[0].shape == outs[1].shape == (chain[0].m, chain[-1].n)
    assert all(np.isfinite(o).all() for o in outs)
    # graph order: a linear whose N differs from the next K is adapted by a Slice or Pad, never skipped
    gemms = [n for n in fp.graph.node if n.op_type == "Gemm"]
    assert [tuple(i.dims) for i in fp.graph.initializer if i.name.endswith(".w")] == [(s.k, s.n) for s in chain]
    assert len(gemms) == len(chain)


def test_gemm_ceiling_cli_bad_model(tmp_path, capsys):
    from vitc.tools import gemm_ceiling as G

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert G.main([str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.onnx" in err[0]


# -- tools/calib_seeds: held-out fidelity per calibration seed and build variant ------------------------------------
def test_calib_seeds_builds_each_variant_per_seed_and_measures_each_build(vit_path, tmp_path):
    """Two variants x two seeds: four builds, each measured against the source on the same held-out crops; a
    variant's flags reach its builds (in-sample scoring gives other numbers), and a seed changes the calibration."""
    import json

    import pytest

    from vitc.tools import calib_seeds as S

    out = tmp_path / "seeds"
    rc = S.main([str(vit_path), "-o", str(out), "--seeds", "0,1", "--eval-samples", "4", "--threads", "1",
                 "--variant", "default=--calib-samples 8",
                 "--variant", "in-sample=--calib-samples 8 --no-holdout-search --policy migration-caps"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["variants"]) == ["default", "in-sample"] and res["eval_samples"] == 4
    rows = {k: [r["sqnr_db"] for r in v["per_seed"]] for k, v in res["variants"].items()}
    assert all(len(v) == 2 and all(10 < db < 60 for db in v) for v in rows.values()), rows
    assert rows["default"] != rows["in-sample"] and rows["default"][0] != rows["default"][1], rows
    md = (out / "results.md").read_text()
    assert "| in-sample | `--calib-samples 8 --no-holdout-search --policy migration-caps` |" in md
    for bad in ("nolabel", "x=--seed 3", "x=--seed=3", "=--policy default"):
        with pytest.raises(SystemExit):
            S.main([str(vit_path), "-o", str(tmp_path / "bad"), "--variant", bad])
    assert not (tmp_path / "bad").exists()
