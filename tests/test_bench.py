"""`vitc bench`: structure of the results (batches, threads, skips, ratios, JSON, PNG), the stopping rule on a
fake clock, bad input, and a smoke run of tools/compare_peers.py. No test asserts a speed."""

import importlib.util
import json
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import cli

from vitc.compiler.measure import bench as B
from vitc.tools.tiny_models import TinyConfig, tiny_vit

QUICK = ["--rounds", "2", "--block", "2", "--pause", "0", "--warmup", "1"]




def errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "error" in ln]


@pytest.fixture
def models(tmp_path):
    dyn, fixed = tmp_path / "dyn.onnx", tmp_path / "fixed.onnx"
    onnx.save(tiny_vit(TinyConfig(depth=1)), dyn)
    onnx.save(tiny_vit(TinyConfig(depth=1, dynamic_batch=False)), fixed)
    return dyn, fixed


def test_batches_threads_skips_json_png(capsys, tmp_path, models):
    dyn, fixed = models
    js, png = tmp_path / "r.json", tmp_path / "chart.png"
    rc, out, err = cli(capsys, "bench", dyn, fixed, "--batch", "1,2", "--threads", "1,2", "--json", js, "--png", png,
                       *QUICK)
    assert rc == 0, err
    recs = json.loads(js.read_text())
    timed = [r for r in recs if not r.get("skipped")]
    skipped = [r for r in recs if r.get("skipped")]
    assert sorted((r["label"], r["batch"], r["threads"]) for r in timed) == sorted(
        [("dyn.onnx", b, t) for b in (1, 2) for t in (1, 2)] + [("fixed.onnx", 1, t) for t in (1, 2)])
    assert sorted((r["label"], r["batch"], r["threads"]) for r in skipped) == [("fixed.onnx", 2, 1), ("fixed.onnx", 2, 2)]
    assert "fixed batch dim of 1" in skipped[0]["reason"]
    for r in timed:
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and r["p99_ms"] >= r["p90_ms"]
        assert r["ms_per_image"] == pytest.approx(r["median_ms"] / r["batch"], rel=1e-3)
        assert r["images_per_s"] > 0 and r["rounds"] == 2 and r["runs"] == 4
        lo, hi = r["ci95_ms"]
        assert 0 < lo <= hi  # with 2 rounds the interval is wide and need not straddle the point estimate
        assert r["machine"]["cpus"] and "load_avg" in r["machine"] and r["config"]["batches"] == [1, 2]
        if r["label"] == "fixed.onnx":  # ratio against the baseline (the first model), pair by pair per round
            assert r["speedup_vs_baseline"] > 0 and r["baseline"] == "dyn.onnx"
            assert 0 < r["speedup_ci95"][0] <= r["speedup_ci95"][1]
        else:
            assert r["speedup_vs_baseline"] is None
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["model", "median", "ms"] and set(lines[1]) == {"-"}
    assert len([ln for ln in lines[2:] if not ln.startswith("note:")]) == 6
    assert [ln for ln in lines if ln.startswith("note:")] == \
        ["note: fixed.onnx skipped at batch 2: input 'input' has a fixed batch dim of 1"]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] > 300


def test_text_model_with_a_two_row_token_type_table_runs(capsys, tmp_path):
    """Integer inputs (token ids, masks, token types) are fed as 1: valid for a BERT-style token-type table of two
    rows, which a random id would overrun."""
    from onnx import TensorProto, helper as h, numpy_helper

    table = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(2, 8), "token_type_table")
    g = h.make_graph([h.make_node("Gather", ["token_type_table", "token_type_ids"], ["emb"])], "tt",
                     [h.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", 4])],
                     [h.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", 4, 8])], [table])
    src = tmp_path / "tt.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), src)
    rc, out, err = cli(capsys, "bench", src, *QUICK)
    assert rc == 0, err
    feeds = B.random_feeds(B.onnx_inputs(src), 2)
    assert feeds["token_type_ids"].shape == (2, 4) and (feeds["token_type_ids"] == 1).all()


def test_baseline_by_name_and_labels(capsys, tmp_path, models):
    dyn, fixed = models
    js = tmp_path / "r.json"
    rc, out, err = cli(capsys, "bench", dyn, fixed, "--labels", "float,fixed-1", "--baseline", "fixed.onnx",
                       "--json", js, *QUICK)
    assert rc == 0, err
    rows = {r["label"]: r for r in json.loads(js.read_text())}
    assert rows["fixed-1"]["speedup_vs_baseline"] is None and rows["float"]["speedup_vs_baseline"] > 0
    assert rows["float"]["baseline"] == "fixed-1"
    assert rows["float"]["speedup_vs_first"] is None and rows["fixed-1"]["speedup_vs_first"] > 0
    assert out.splitlines()[0].rstrip().endswith("x fixed-1")


@pytest.mark.parametrize("case", ["no_model_accepts", "baseline_index", "baseline_name", "dynamic_hw", "labels",
                                  "not_onnx", "json_folder", "engine_only"])
def test_bad_input_one_line_exit(capsys, tmp_path, models, case):
    dyn, fixed = models
    args, expect, code = ["bench", dyn, fixed, *QUICK], "", 2
    if case == "no_model_accepts":
        args = ["bench", fixed, *QUICK, "--batch", "1,4"]
        expect = "no model accepts batch size 4 (fixed.onnx: input 'input' has a fixed batch dim of 1)"
    elif case == "baseline_index":
        args += ["--baseline", "5"]
        expect = "--baseline 5: there are 2 models"
    elif case == "baseline_name":
        args += ["--baseline", "nope"]
        expect = "names none of the models"
    elif case == "dynamic_hw":
        m = tiny_vit()
        m.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "width"
        p = tmp_path / "dynw.onnx"
        onnx.save(m, p)
        args = ["bench", p, *QUICK]
        expect = "dim 3 (width) is dynamic and is not the batch dim"
    elif case == "labels":
        args += ["--labels", "a"]
        expect = "--labels gives 1 names for 2 models"
    elif case == "not_onnx":
        bad = tmp_path / "bad.onnx"
        bad.write_text("nope")
        args = ["bench", dyn, bad, *QUICK]
        expect = f"{bad}: not a readable ONNX model"
    elif case == "json_folder":
        args += ["--json", tmp_path / "missing" / "r.json"]
        expect = "does not exist"
    elif case == "engine_only":
        eng = tmp_path / "model.engine"
        eng.write_bytes(b"\0")
        args, code = ["bench", eng, *QUICK], 4  # RuntimeUnavailableError
        expect = "TensorRT not available"
    rc, out, err = cli(capsys, *args)
    assert rc == code and out == "" and "Traceback" not in err
    errs = errors(err)
    assert len(errs) == 1 and errs[0].startswith("vitc: error: ") and expect in errs[0], err


def test_png_without_matplotlib_is_one_line_before_timing(capsys, tmp_path, models, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(B, "run_suite", lambda *a, **k: pytest.fail("timed without a way to draw --png"))
    png, js = tmp_path / "chart.png", tmp_path / "r.json"
    rc, out, err = cli(capsys, "bench", *models, "--png", png, "--json", js, *QUICK)
    errs = errors(err)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert errs == ["vitc: error: --png needs matplotlib, which is not installed; pip install 'vitc[plots]'"], err
    assert not png.exists() and not js.exists()


def synthetic_report() -> B.BenchReport:
    def m(label: str, batch: int, ms: float, ratio: float | None) -> B.Measurement:
        return B.Measurement(label, label + ".onnx", "ort", batch, 2, 5, 10, 50, ms * batch, ms * batch, ms * batch,
                             ms, ms, ms, 1000 / ms, (ms * batch * 1.02, ms * batch * 1.05), 2.0, "fp32", ratio,
                             None if ratio is None else (ratio * 0.9, ratio * 1.1), ratio, "ci")

    return B.BenchReport([m("fp32", b, 10.0, None) for b in (1, 4)] + [m("int8", b, 4.0, 2.5) for b in (1, 4)],
                         machine={"cpu": "test cpu", "cpus": 2, "load_avg": [0.5], "onnxruntime": "1.0"})


def test_png_chart_is_drawn_and_reproducible(tmp_path):
    """Two panels (batch 1, batch 4); whiskers that do not straddle the bar are drawn; the same report, the same
    bytes."""
    a, b = B.write_png(synthetic_report(), tmp_path / "a.png"), B.write_png(synthetic_report(), tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()
    with Image.open(a) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] > 300


def test_engine_file_skipped_with_note_when_no_tensorrt(capsys, tmp_path, models):
    dyn, _ = models
    eng = tmp_path / "model.engine"
    eng.write_bytes(b"\0")
    js = tmp_path / "r.json"
    rc, out, err = cli(capsys, "bench", dyn, eng, "--json", js, *QUICK)
    assert rc == 0, err
    assert "model.engine: TensorRT not available" in err
    assert [r["label"] for r in json.loads(js.read_text())] == ["dyn.onnx"]


def test_tensorrt_flag_without_tensorrt_is_a_note(capsys, tmp_path, models, monkeypatch):
    monkeypatch.setattr(B, "tensorrt_runtime", lambda: (None, "no GPU here"))
    rc, out, err = cli(capsys, "bench", *models, "--tensorrt", *QUICK)
    assert rc == 0, err
    assert "--tensorrt: TensorRT not available (no GPU here); ONNX Runtime only" in err
    assert "[trt]" not in out and len(out.strip().splitlines()) == 4


# -- the timing loop on a fake clock: exact ratios, stopping rule -------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        return self.t

    def sleep(self, s):
        self.t += s


class FakeRunner:
    def __init__(self, clock, cost, jitter=0.0, seed=0):
        self.clock, self.cost, self.jitter = clock, cost, jitter
        self.rng = np.random.default_rng(seed)

    def run(self, feeds):
        self.clock.t += self.cost * (1 + self.jitter * self.rng.standard_normal())


def fake_candidates(clock, costs, jitter=0.0):
    inp = (B.InputInfo("x", (None, 4), "float32"),)
    return [B.Candidate(f"m{i}", f"m{i}", B.Engine.ORT, inp, (lambda t, c=c, i=i: FakeRunner(clock, c, jitter, i)), i)
            for i, c in enumerate(costs)]


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(B.time, "perf_counter", c.perf_counter)
    monkeypatch.setattr(B.time, "sleep", c.sleep)
    return c


def test_ratios_pairwise_and_ci_stop(clock):
    cands = fake_candidates(clock, [0.004, 0.002, 0.008])
    rep = B.run_suite(cands, B.SuiteConfig(batches=(1, 4), threads=(2,), stop=B.StopRule(2.0, 3, 20, 100.0),
                                           baseline=0))
    assert len(rep.measurements) == 6
    by = {(m.label, m.batch): m for m in rep.measurements}
    assert by[("m1", 1)].speedup_vs_baseline == pytest.approx(2.0) and by[("m2", 4)].speedup_vs_baseline == pytest.approx(0.5)
    assert by[("m0", 4)].ms_per_image == pytest.approx(1.0) and by[("m0", 4)].images_per_s == pytest.approx(1000.0)
    assert all(m.rounds == 3 and m.stop.startswith("95% CI") for m in rep.measurements)  # zero spread: min rounds
    assert by[("m1", 1)].block == 500  # 1 s / 2 ms, capped at the automatic block's maximum
    r, ci = B.pair_ratio(by[("m2", 1)], by[("m1", 1)])  # any pair, from the per-round medians
    assert r == pytest.approx(4.0) and ci == pytest.approx((4.0, 4.0)) and len(by[("m2", 1)].round_ms) == 3
    with pytest.raises(ValueError, match="same rounds"):
        B.pair_ratio(by[("m2", 1)], B.Measurement(**{**B.asdict(by[("m1", 1)]), "round_ms": (1.0,)}))


def test_round_statistic_and_linear_bound(clock):
    """Derived quantities from one run, round by round: a known Amdahl bound from known costs (source 10 ms, vitc
    fp32 8 ms of which the linears take 6 ms in fp32 and 3 ms in int8, vitc int8 5 ms: t* = 8 - 6 + 3 = 5 ms)."""
    from vitc.tools import compare_peers as P

    cands = fake_candidates(clock, [0.010, 0.008, 0.005, 0.006, 0.003])
    rep = B.run_suite(cands, B.SuiteConfig(stop=B.StopRule.fixed(3), block=2))
    labels = [P.SOURCE, P.VITC_FP32, P.VITC_INT8, P.G.FP32_LABEL, P.G.INT8_LABEL]
    by = dict(zip(labels, rep.measurements))
    r, ci = B.round_statistic(lambda a, b, c: a - b + c, *rep.measurements[1:4])
    assert r == pytest.approx(8 - 5 + 6) and ci == pytest.approx((9.0, 9.0))
    bound = P.linear_bound(by)
    assert bound[P.BOUND_VS_SOURCE]["ratio"] == pytest.approx(2.0)
    assert bound[P.BOUND_VS_FP32]["ratio"] == pytest.approx(1.6)
    assert bound[P.VITC_VS_BOUND]["ratio"] == pytest.approx(1.0)
    assert P.linear_bound({k: v for k, v in by.items() if k != P.G.INT8_LABEL}) == {}  # a row missing: no bound
    slow_chain = dict(by, **{P.G.FP32_LABEL: by[P.SOURCE]})  # the chain longer than the whole build: no estimate
    assert P.linear_bound(slow_chain) == {}
    with pytest.raises(ValueError, match="same rounds"):
        B.round_statistic(lambda a, b: a / b, by[P.SOURCE],
                          B.Measurement(**{**B.asdict(by[P.VITC_FP32]), "round_ms": (1.0,)}))


def test_stop_rules(clock):
    cands = fake_candidates(clock, [0.01, 0.02], jitter=0.3)
    rep = B.run_suite(cands, B.SuiteConfig(block=5, stop=B.StopRule(0.001, 2, 4, 1e9)))
    assert {m.rounds for m in rep.measurements} == {4} and rep.measurements[0].stop == "max rounds (4)"
    rep = B.run_suite(cands, B.SuiteConfig(block=5, stop=B.StopRule(0.001, 3, 1000, 0.5)))
    assert {m.rounds for m in rep.measurements} == {3} and rep.measurements[0].stop.startswith("time limit")
    m = rep.measurements[1]
    assert m.ci95_ms[0] < m.median_ms < m.ci95_ms[1] and m.ci95_pct > 0
    assert m.speedup_ci95[0] < m.speedup_vs_baseline < m.speedup_ci95[1]


def test_labels_and_baseline_resolution():
    paths = ["a/model.int8.onnx", "b/model.int8.onnx", "src.onnx"]
    assert B.short_labels([B.Path(p) for p in paths]) == ["a/model.int8.onnx", "b/model.int8.onnx", "src.onnx"]
    assert B.resolve_baseline(None, paths, paths) == 0
    assert B.resolve_baseline("2", paths, paths) == 2
    assert B.resolve_baseline("src", paths, paths) == 2
    with pytest.raises(B.VitcError, match="matches 2 models"):
        B.resolve_baseline("model.int8.onnx", ["x", "y", "z"], paths)


def test_original_api(models):
    dyn, fixed = models
    rows = B.bench([dyn, fixed], B.BenchConfig(batch=1, threads=1, warmup=1, block=2, rounds=2, pause_s=0))
    assert [r.model for r in rows] == [str(dyn), str(fixed)]
    assert rows[0].speedup_vs_first is None and rows[1].speedup_vs_first > 0
    assert B.format_table(rows).splitlines()[0].split()[:3] == ["model", "median", "ms"]


def _compare_peers(tmp_path, model: str) -> dict:
    from vitc.tools import compare_peers as P

    cfg = P.CompareConfig(outdir=tmp_path / "peers", models=(model,), eval_samples=2, calib_samples=2,
                          grid=P.StaticGrid.QUICK, stop=B.StopRule.fixed(1), screen_rounds=1, warmup=1,
                          block_seconds=0.01, pause_s=0.0, busy_window_s=0.05)
    res = P.run(cfg)
    assert (tmp_path / "peers" / "results.json").is_file()
    md = (tmp_path / "peers" / "results.md").read_text()
    m = res["models"][0]
    v = m["variants"]
    want = [P.SOURCE, P.VITC_FP32, P.VITC_INT8, P.ORT_STATIC, P.ORT_DYNAMIC]
    if importlib.util.find_spec("openvino"):  # OpenVINO rows: the source, NNCF int8 where nncf installs, vitc
        want += [P.OV_FP32] + ([P.NNCF_INT8] if importlib.util.find_spec("nncf") else []) + [P.VITC_OV]
    if m["model"].startswith("timm"):
        want += [P.TORCH_FP32, P.TORCH_INT8]
    want += [P.G.FP32_LABEL, P.G.INT8_LABEL]  # the model's linears alone: the int8 GEMM ceiling
    assert list(v) == want
    assert v[P.SOURCE]["speedup_vs_source"] == 1.0 and all(v[k]["speedup_vs_source"] > 0 for k in want)
    assert v[P.G.INT8_LABEL]["linears"] >= 4 and "sqnr_db" not in v[P.G.INT8_LABEL]
    pairs = m["pairs"]
    assert "vitc int8 vs vitc fp32" in pairs and "int8 GEMM ceiling (linears alone, int8 vs fp32)" in pairs
    assert ("vitc int8 vs torch dynamic int8" in pairs) == m["model"].startswith("timm")
    if P.VITC_OV in v:
        assert v[P.OV_FP32]["sqnr_db"] > 60 and np.isfinite(v[P.VITC_OV]["sqnr_db"])
        assert "vitc openvino vs vitc int8 (ORT)" in pairs
    for p in pairs.values():  # one round: the CI collapses onto the ratio
        assert p["ratio"] > 0 and p["ci95"][0] <= p["ratio"] <= p["ci95"][1]
    assert "int8 GEMM ceiling" in md
    assert set(m["bound"]) == {P.BOUND_VS_SOURCE, P.BOUND_VS_FP32, P.VITC_VS_BOUND} and "Amdahl bound" in md
    assert v[P.VITC_FP32]["sqnr_db"] > 60 and np.isfinite(v[P.VITC_INT8]["sqnr_db"])
    assert v[P.ORT_STATIC]["config"] in [s["config"] for s in m["ort_static_grid"]]
    assert len(m["ort_static_grid"]) == 2
    assert m["model"] in md and (tmp_path / "peers" / f"{m['model'].replace(' ', '_')}.png").is_file()
    return v


def test_compare_peers_smoke(tmp_path):
    """tools/compare_peers.py end to end on the tiny ViT (an ONNX file: no torch rows), minimal rounds."""
    _compare_peers(tmp_path, "tiny-vit")


def test_compare_peers_torch_rows(tmp_path):
    """The timm path: export from the torch module, torch eager fp32 and dynamic int8 rows (timm's test_vit)."""
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from vitc.tools import compare_peers as P

    v = _compare_peers(tmp_path, "test_vit")
    assert v[P.TORCH_FP32]["sqnr_db"] > 60  # torch computes the same function as the exported ONNX
    assert np.isfinite(v[P.TORCH_INT8]["sqnr_db"])
