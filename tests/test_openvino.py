"""`vitc build --target openvino` on the tiny ViT: the OpenVINO lowering keeps the Q/DQ graph's values, OpenVINO's CPU
plugin runs every quantized linear in int8 with no standalone quantization layer, the IR is written beside the ONNX
artifact, and the bad-input paths (OpenVINO missing, a model it cannot read) are one line."""

import json
import sys
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import cli, ort_run, sqnr_db

from vitc.compiler.driver.build import BuildConfig, CalibConfig, build
from vitc.compiler.driver.pipeline import Target
from vitc.passes.ov_lower import OvLoweringPass
from vitc.tools.tiny_models import TinyConfig, tiny_vit

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'vitc[openvino]')")

FEED_SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def ov_build(tmp_path_factory):
    d = tmp_path_factory.mktemp("ovb")
    src = d / "vit.onnx"
    onnx.save(tiny_vit(TinyConfig(depth=2, dim=64, heads=2)), src)
    res = build(BuildConfig(model=src, outdir=d / "out", target=Target.OPENVINO, calib=CalibConfig(samples=8),
                            show_progress=False, dump_after=frozenset({"trt_lower"}), keep_temp=False))
    return src, res


def _feeds(src, n=4, seed=0):
    m = onnx.load(src)
    name = m.graph.input[0].name
    rng = np.random.default_rng(seed)
    return name, [rng.standard_normal(FEED_SHAPE).astype(np.float32) for _ in range(n)]


def test_lowering_keeps_the_qdq_graphs_values(ov_build):
    """The graph before ov_lower (dumped) and the artifact after it compute the same values in ORT's reference
    Q/DQ execution; the only differences are float summation order (a MatMul against a Gemm) flipping a rounding."""
    src, res = ov_build
    before = next((res.outdir / "dumps").glob("*trt_lower*.onnx"))
    name, xs = _feeds(src)
    for x in xs:
        a = ort_run(before, {name: x}, optimize=False)[0]
        b = ort_run(res.model_path, {name: x}, optimize=False)[0]
        assert sqnr_db(a, b) > 60, sqnr_db(a, b)


def test_lowered_graph_has_no_gemm_and_each_quantization_follows_its_producer(ov_build):
    _, res = ov_build
    m = onnx.load(res.model_path)
    ops = Counter(n.op_type for n in m.graph.node)
    # the head's Gemm takes the class token, already 2-D, and stays: OpenVINO runs it as one FullyConnected
    assert ops["Gemm"] == 1 and ops["MatMul"] >= 8 and ops["QuantizeLinear"] >= 6
    prod = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            assert prod[n.input[0]].op_type not in ("Reshape", "Transpose", "Flatten"), n.name
    counts = next(p for p in res.report["passes"] if p["pass"] == "ov_lower")["counts"]
    before = onnx.load(next((res.outdir / "dumps").glob("*trt_lower*.onnx")))
    assert counts["Gemm -> MatMul + Add on the N-D input"] == sum(n.op_type == "Gemm" for n in before.graph.node) - 1


def test_openvino_runs_every_quantized_linear_in_int8(ov_build):
    """What the CPU plugin executes: every FullyConnected in u8/i8, no FakeQuantize left on its own."""
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.openvino import InferencePrecision, OpenVinoRuntime, precision_summary

    _, res = ov_build
    ir = res.outdir / res.report["openvino"]["ir"][0]
    assert ir.is_file() and ir.with_suffix(".bin").is_file()
    layers = OpenVinoRuntime(InferencePrecision.F32).session(ir, SessionOptions(threads=1)).runtime_graph()
    fcs = [lay for lay in layers if lay["type"] == "FullyConnected"]
    assert len(fcs) >= 8 and all(lay["precision"] in ("u8", "i8") for lay in fcs), fcs
    # at most the head's: the class token's quantization after a Gather has nothing to fuse into; every one on the
    # token stream is a post-op of its producer (LayerNorm, GELU, attention)
    assert len([lay for lay in layers if lay["type"] == "FakeQuantize"]) <= 1
    # int8 QK^T: the query/key quantizations run inside their FullyConnected layers and each attention block is one
    # Subgraph on int8 inputs (softmax x V float inside it)
    att = [lay for lay in layers if lay["type"] == "Subgraph"]
    assert len(att) == 2 and all(lay["precision"] == "i8" for lay in att), att
    qk = [lay for lay in fcs if any(f.endswith((".QuantizeLinear",)) and ("_attn_qt_" in f or "_attn_kt_" in f)
                                    for f in lay["fused"])]
    assert len(qk) == 4, [lay["fused"] for lay in fcs]
    # fc2's input (GELU's output) is asymmetric uint8: a u8 FullyConnected with the zero-point folded in
    fc2 = [lay for lay in fcs if "_fc2_" in lay["name"]]
    assert len(fc2) == 2 and all(lay["precision"] == "u8" for lay in fc2), fc2
    s = precision_summary(layers)
    assert s == res.report["openvino"]["runtime_graph_f32"]
    assert s["heavy_float"] <= 1  # the patch embedding stays float by the target's default policy


def test_openvino_ir_stays_close_to_the_source(ov_build):
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.openvino import InferencePrecision, OpenVinoRuntime

    from vitc.compiler.calib.data import EVAL_PHOTOS, Preprocess, embedded_samples

    src, res = ov_build
    name = onnx.load(src).graph.input[0].name
    xs = [x[None] for x in embedded_samples(Preprocess(32, 32), 6, 5, EVAL_PHOTOS)]
    s = OpenVinoRuntime(InferencePrecision.F32).session(res.outdir / res.report["openvino"]["ir"][0],
                                                       SessionOptions(threads=1))
    ref = np.concatenate([ort_run(src, {name: x})[0] for x in xs])
    got = np.concatenate([s.run({name: x})[0] for x in xs])
    onnx_int8 = np.concatenate([ort_run(res.model_path, {name: x})[0] for x in xs])
    assert sqnr_db(ref, got) > 20, sqnr_db(ref, got)  # 22.2 dB measured
    # OpenVINO computes what ORT computes from the ONNX artifact, up to rounding flips where the plugin quantizes the
    # query/key inside their FullyConnected layers (47.8 dB here; a misread graph lands under 25)
    assert sqnr_db(onnx_int8, got) > 40
    rep = json.loads((res.outdir / "build.json").read_text())
    assert rep["outputs"] == ["model.int8.onnx", "model.int8.xml", "model.int8.bin"]
    assert rep["openvino"]["version"] == ov.__version__
    assert rep["openvino"]["agreement_with_onnx_db"] > 40  # OpenVINO against ORT's reference Q/DQ execution


def test_near_miss_reshape_with_another_consumer_stays():
    """x -> Reshape -> {Q, Relu}: the Q cannot move to x, so the Gemm and its Reshapes stay, with a note."""
    x = gs.Variable("x", np.float32, [1, 4, 8])
    flat = gs.Variable("flat", np.float32, [4, 8])
    q = gs.Variable("q", np.int8, [4, 8])
    dq = gs.Variable("dq", np.float32, [4, 8])
    y2 = gs.Variable("y2", np.float32, [4, 6])
    y = gs.Variable("y", np.float32, [1, 4, 6])
    r = gs.Variable("r", np.float32, [4, 8])
    sc, zp = gs.Constant("s", np.array(0.1, np.float32)), gs.Constant("z", np.array(0, np.int8))
    w = gs.Constant("w", np.ones((8, 6), np.float32))
    nodes = [gs.Node("Reshape", "in", inputs=[x, gs.Constant("s2", np.array([-1, 8]))], outputs=[flat]),
             gs.Node("QuantizeLinear", "q", inputs=[flat, sc, zp], outputs=[q]),
             gs.Node("DequantizeLinear", "dq", inputs=[q, sc, zp], outputs=[dq]),
             gs.Node("Gemm", "g", inputs=[dq, w], outputs=[y2]),
             gs.Node("Reshape", "out", inputs=[y2, gs.Constant("s3", np.array([1, 4, 6]))], outputs=[y]),
             gs.Node("Relu", "relu", inputs=[flat], outputs=[r])]
    g = gs.Graph(nodes=nodes, inputs=[x], outputs=[y, r], opset=17)
    res = OvLoweringPass().run(g)
    assert [n.op for n in g.nodes].count("Gemm") == 1
    assert any("not a per-tensor QuantizeLinear" in note for note in res.notes), res.notes


def test_build_without_openvino_is_one_line_exit_2_and_no_outdir(tmp_path, capsys, monkeypatch, vit_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    out = tmp_path / "o"
    code, _, err = cli(capsys, "build", str(vit_path), "-o", str(out), "--target", "openvino", "--calib-samples", "4")
    assert code == 2 and not out.exists()
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and "OpenVINO is not installed" in lines[0] and "pip install" in lines[0], err


def test_model_openvino_cannot_read_names_the_op(tmp_path):
    from vitc.errors import ModelLoadError
    from vitc.runtimes.openvino import read_model

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    node = onnx.helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")
    m = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y]),
                               opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.example", 1)])
    p = tmp_path / "bad.onnx"
    onnx.save(m, p)
    with pytest.raises(ModelLoadError) as ei:
        read_model(p)
    msg = str(ei.value)
    assert "\n" not in msg and "NoSuchOp" in msg, msg


def test_bench_times_onnx_in_openvino_beside_ort(tmp_path, capsys, vit_path):
    code, out, _ = cli(capsys, "bench", str(vit_path), "--openvino", "--rounds", "2", "--block", "3", "--warmup", "1",
                    "--pause", "0")
    assert code == 0, out
    assert "openvino" in out and "ort" in out


def test_convtranspose_runs_int8_on_openvino_and_stays_float_elsewhere(tmp_path):
    """A decoder's ConvTranspose (role deconv): per-output-channel int8 weights on axis 1 and an int8
    Deconvolution in OpenVINO's runtime graph, close to the source; the ORT and TensorRT defaults keep it float by a
    named rule (ORT has no int8 ConvTranspose; TensorRT's Q/DQ deconvolution is not emitted without a GPU to check)."""
    from vitc.compiler.calib.data import EVAL_PHOTOS, Preprocess, embedded_samples
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.openvino import InferencePrecision, OpenVinoRuntime

    src = tmp_path / "dec.onnx"
    onnx.save(tiny_vit(TinyConfig(depth=2, dim=64, heads=2, decoder=True)), src)
    rules = {}
    for target in (Target.OPENVINO, Target.ORT, Target.TRT):
        res = build(BuildConfig(model=src, outdir=tmp_path / target.value, target=target,
                                calib=CalibConfig(samples=8), show_progress=False))
        node = next(n for n in res.report["policy"]["nodes"] if n["role"] == "deconv")
        rules[target] = node["rule"]
        if target is not Target.OPENVINO:
            continue
        m = onnx.load(res.model_path)
        ct = next(n for n in m.graph.node if n.op_type == "ConvTranspose")
        dq = next(n for n in m.graph.node if n.output[0] == ct.input[1])
        assert dq.op_type == "DequantizeLinear" and next(a.i for a in dq.attribute if a.name == "axis") == 1
        sess = OpenVinoRuntime(InferencePrecision.F32).session(res.outdir / res.report["openvino"]["ir"][0],
                                                              SessionOptions(threads=1))
        deconv = [lay for lay in sess.runtime_graph() if lay["type"] == "Deconvolution"]
        assert len(deconv) == 1 and deconv[0]["precision"] in ("u8", "i8"), deconv
        xs = [x[None] for x in embedded_samples(Preprocess(32, 32), 4, 5, EVAL_PHOTOS)]
        ref = np.concatenate([ort_run(src, {"input": x})[1] for x in xs])
        got = np.concatenate([sess.run({"input": x})[1] for x in xs])
        assert sqnr_db(ref, got) > 17, sqnr_db(ref, got)  # 19.1 dB; int8 QK^T costs 3-5 dB on this random model
    assert rules == {Target.OPENVINO: "default", Target.ORT: "conv-float-on-ort", Target.TRT: "deconv-float"}
