"""`vitc check --target trt`: one small graph per rule that breaks it, vitc's own builds, other tools' output."""

import json

import numpy as np
import onnx
import pytest
from conftest import cli
from onnx import TensorProto, helper, numpy_helper

from vitc.compiler.tensorrt.check import TrtRule, check_model

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


class G:
    """A tiny graph builder: initializers by value, nodes by op, tensors named t0, t1, ..."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0
        self.inputs = [helper.make_tensor_value_info("x", F, [1, 4, 8])]

    def const(self, v, dtype=None) -> str:
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(v, dtype=dtype), name))
        return name

    def op(self, op, inputs, name=None, **attrs) -> str:
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name or f"{op.lower()}{self.n}", **attrs))
        return out

    def qdq(self, t, scale=0.05, zp=0, zp_dtype=np.int8, dq_scale=None, name="x") -> str:
        s, z = self.const(np.float32(scale)), self.const(zp, zp_dtype)
        q = self.op("QuantizeLinear", [t, s, z], name=f"{name}.Q")
        s2 = s if dq_scale is None else self.const(np.float32(dq_scale))
        return self.op("DequantizeLinear", [q, s2, z], name=f"{name}.DQ")

    def weight(self, shape, axis=None, dtype=np.int8) -> str:
        w = RNG.integers(-127, 128, size=shape).astype(dtype)
        n_scale = shape[axis] if axis is not None else None
        s = self.const(np.full(n_scale, 0.01, np.float32) if n_scale else np.float32(0.01))
        z = self.const(np.zeros(n_scale, dtype) if n_scale else np.zeros((), dtype))
        attrs = {} if axis is None else {"axis": axis}
        return self.op("DequantizeLinear", [self.const(w), s, z], name="w.DQ", **attrs)

    def model(self, out: str, opset: int = 17) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "g", self.inputs, [helper.make_tensor_value_info(out, F, None)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        return m


def linear(zp=0, zp_dtype=np.int8, axis=1, scale=0.05, dq_scale=None) -> onnx.ModelProto:
    """x -> Q/DQ -> MatMul(int8 per-channel weight) -> y: the good case, with knobs to break it."""
    g = G()
    x = g.qdq("x", scale=scale, zp=zp, zp_dtype=zp_dtype, dq_scale=dq_scale)
    y = g.op("MatMul", [x, g.weight([8, 6], axis=axis)], name="mm")
    return g.model(y)


def rules(m: onnx.ModelProto) -> set[TrtRule]:
    return {v.rule for v in check_model(m).violations}


def test_good_linear_passes():
    rep = check_model(linear())
    assert rep.ok and rep.violations == [], [str(v) for v in rep.violations]
    from conftest import ort_run

    ort_run(linear(), {"x": np.ones((1, 4, 8), np.float32)})  # the fixture graph itself is valid and runs


@pytest.mark.parametrize("kind,rule", [
    ("nonzero zp", TrtRule.ZERO_POINT), ("uint8", TrtRule.UINT8), ("no zp", TrtRule.UINT8),
    ("scale 0", TrtRule.SCALE), ("scale mismatch", TrtRule.PAIR_MISMATCH), ("axis", TrtRule.WEIGHT_AXIS),
    ("int16", TrtRule.QTYPE)])
def test_qdq_parameter_rules(kind, rule):
    if kind == "nonzero zp":
        m = linear(zp=3)
    elif kind == "uint8":
        m = linear(zp=128, zp_dtype=np.uint8)
    elif kind == "no zp":
        m = linear()
        q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear")
        del q.input[2:]
    elif kind == "scale 0":
        m = linear(scale=0.0)
    elif kind == "scale mismatch":
        m = linear(dq_scale=0.07)
    elif kind == "axis":
        m = linear(axis=0)  # weight [K=8, N=6]: the output channels are axis 1
    else:
        m = linear(zp_dtype=np.int16)
    rep = check_model(m)
    assert rule in {v.rule for v in rep.violations}, [str(v) for v in rep.violations]
    assert not rep.ok
    hit = next(v for v in rep.violations if v.rule is rule)
    assert hit.node and rule.value in str(hit)


def test_int32_bias_dequantize():
    g = G()
    x = g.qdq("x")
    x2 = g.op("Reshape", [x, g.const(np.array([4, 8], np.int64))])
    b = g.op("DequantizeLinear", [g.const(np.arange(6, dtype=np.int32)), g.const(np.full(6, 1e-3, np.float32)),
                                   g.const(np.zeros(6, np.int32))], name="bias.DQ", axis=0)
    y = g.op("Gemm", [x2, g.weight([8, 6], axis=1), b], name="gemm")
    rep = check_model(g.model(y))
    assert [v.node for v in rep.violations if v.rule is TrtRule.QTYPE] == ["bias.DQ"]


def test_per_channel_activation():
    g = G()
    s, z = g.const(np.full(8, 0.05, np.float32)), g.const(np.zeros(8, np.int8))
    q = g.op("QuantizeLinear", [g.inputs[0].name, s, z], name="x.Q", axis=2)
    x = g.op("DequantizeLinear", [q, s, z], name="x.DQ", axis=2)
    y = g.op("MatMul", [x, g.weight([8, 6], axis=1)], name="mm")
    assert [v.node for v in check_model(g.model(y)).violations] == ["x.Q"]
    assert rules(g.model(y)) == {TrtRule.PER_CHANNEL_ACT}


def test_q_without_dq():
    g = G()
    s, z = g.const(np.float32(0.05)), g.const(np.int8(0))
    q = g.op("QuantizeLinear", ["x", s, z], name="x.Q")
    y = g.op("Cast", [q], to=F)
    assert TrtRule.UNPAIRED in rules(g.model(y))


def test_weighted_op_with_a_float_input():
    g = G()
    x = g.qdq("x")
    y = g.op("MatMul", [x, g.const(RNG.standard_normal((8, 6)).astype(np.float32))], name="mm")
    rep = check_model(g.model(y))
    assert [(v.node, v.rule) for v in rep.violations] == [("mm", TrtRule.WEIGHTED_INPUT)]


def test_dangling_qdq_after_matmul_output():
    g = G()
    y = g.op("MatMul", [g.qdq("x"), g.weight([8, 6], axis=1)], name="mm")
    y = g.qdq(y, name="mm_out")
    y = g.op("Erf", [y])  # a float op: the Q/DQ forces the MatMul to write int8 for nothing
    rep = check_model(g.model(y))
    assert TrtRule.OUTPUT_QDQ in {v.rule for v in rep.violations}
    assert next(v for v in rep.violations if v.rule is TrtRule.OUTPUT_QDQ).node == "mm_out.Q"


def test_output_qdq_into_another_quantized_matmul_is_fine():
    g = G()
    y = g.op("MatMul", [g.qdq("x"), g.weight([8, 6], axis=1)], name="mm")
    y = g.op("Reshape", [y, g.const(np.array([1, 4, 6], np.int64))])
    y = g.op("MatMul", [g.qdq(y, name="mid"), g.weight([6, 5], axis=1)], name="mm2")
    assert check_model(g.model(y)).ok


def test_layernorm_input_quantized():
    g = G()
    y = g.op("LayerNormalization", [g.qdq("x"), g.const(np.ones(8, np.float32)), g.const(np.zeros(8, np.float32))],
             name="ln", axis=-1)
    rep = check_model(g.model(y))
    assert [(v.node, v.rule) for v in rep.violations] == [("ln", TrtRule.FLOAT_OP)]
    assert "LayerNorm" in rep.violations[0].detail


def test_contrib_op_is_reported():
    g = G()
    y = g.op("Gelu", [g.op("MatMul", [g.qdq("x"), g.weight([8, 6], axis=1)], name="mm")], name="gelu")
    g.nodes[-1].domain = "com.microsoft"
    rep = check_model(g.model(y))
    assert [(v.node, v.rule) for v in rep.violations] == [("gelu", TrtRule.CONTRIB_OP)]
    assert "com.microsoft.Gelu" in rep.violations[0].detail


def attention(q_bmm1=(True, True), between=False, q_bmm2=(True, True)) -> onnx.ModelProto:
    """q, k, v [1, 2, 4, 8] -> MatMul(q, k^T) -> Div -> Softmax -> MatMul(p, v)."""
    g = G()
    g.inputs = [helper.make_tensor_value_info(n, F, [1, 2, 4, 8]) for n in ("q", "k", "v")]
    kt = g.op("Transpose", ["k"], perm=[0, 1, 3, 2])
    a = g.qdq("q", name="q") if q_bmm1[0] else "q"
    b = g.qdq(kt, name="k") if q_bmm1[1] else kt
    s = g.op("MatMul", [a, b], name="bmm1")
    if between:
        s = g.qdq(s, name="scores")
    s = g.op("Div", [s, g.const(np.float32(np.sqrt(8)))])
    p = g.op("Softmax", [s], name="softmax", axis=-1)
    p = g.qdq(p, scale=1 / 127, name="p") if q_bmm2[0] else p
    v = g.qdq("v", name="v") if q_bmm2[1] else "v"
    return g.model(g.op("MatMul", [p, v], name="bmm2"))


def test_attention_int8_passes_and_fully_float_is_a_note():
    rep = check_model(attention())
    assert rep.ok and rep.violations == [] and rep.counts["attention blocks"] == 1
    float_attn = attention((False, False), False, (False, False))
    assert {v.rule for v in check_model(float_attn).violations} == {TrtRule.NO_QDQ}  # no Q/DQ at all
    # with one quantized linear after it, it is a Q/DQ graph whose attention is float: fine (fp16 MHA)
    rep = check_model(_with_linear(float_attn))
    assert rep.ok, [str(v) for v in rep.violations]
    assert any("attention is float" in n for n in rep.notes)


def _with_linear(m: onnx.ModelProto) -> onnx.ModelProto:
    g = G()
    g.inputs = list(m.graph.input)
    g.nodes, g.inits = list(m.graph.node), list(m.graph.initializer)
    g.n = 1000
    y = g.op("MatMul", [g.qdq(m.graph.output[0].name, name="o"), g.weight([8, 3], axis=1)], name="head")
    return g.model(y)


@pytest.mark.parametrize("case,rule,node", [
    ({"q_bmm1": (True, False)}, TrtRule.BMM1, "bmm1"),
    ({"between": True}, TrtRule.BMM1_SOFTMAX, "scores.Q"),
    ({"q_bmm2": (False, True)}, TrtRule.BMM2, "bmm2"),
    ({"q_bmm2": (True, False)}, TrtRule.BMM2, "bmm2"),
])
def test_attention_rules(case, rule, node):
    rep = check_model(attention(**case))
    hits = [v for v in rep.violations if v.rule is rule]
    assert hits and hits[0].node == node, [str(v) for v in rep.violations]
    assert not rep.ok


def test_half_quantized_attention_like_the_ort_policy_is_an_error():
    rep = check_model(attention(q_bmm2=(False, False)))
    assert {v.rule for v in rep.violations} == {TrtRule.BMM2} and len(rep.violations) == 2


def residual(skip_quantized: bool) -> onnx.ModelProto:
    g = G()
    y = g.op("MatMul", [g.qdq("x"), g.weight([8, 8], axis=1)], name="proj")
    y = g.op("Mul", [y, g.const(np.full(8, 0.1, np.float32))], name="layer_scale")  # LayerScale: fused by TRT
    skip = g.qdq("x", name="skip") if skip_quantized else "x"
    return g.model(g.op("Add", [skip, y], name="residual"))


def test_residual_add_skip_input():
    assert check_model(residual(True)).violations == []
    rep = check_model(residual(False))
    assert [(v.node, v.rule) for v in rep.violations] == [("residual", TrtRule.RESIDUAL)]
    assert rep.ok and rep.warnings, "a float skip input is a missed fusion (warning), not a broken rule"


def test_float_graph_and_old_opset():
    g = G()
    m = g.model(g.op("Relu", ["x"]), opset=12)
    assert rules(m) == {TrtRule.NO_QDQ, TrtRule.OPSET}


# -- whole models ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """vitc builds of the tiny ViT for both targets (small, few calibration samples: this is about structure)."""
    from vitc.compiler.driver.build import BuildConfig, CalibConfig, build
    from vitc.compiler.driver.pipeline import Target
    from vitc.tools.tiny_models import TinyConfig, tiny_vit

    d = tmp_path_factory.mktemp("trtcheck")
    src = d / "vit.onnx"
    onnx.save(tiny_vit(TinyConfig(depth=2, dim=64, heads=2)), src)
    out = {"src": src}
    from vitc.compiler.quant.policy import PolicyDefaults, load_policy

    for t in (Target.TRT, Target.ORT):
        out[t.value] = build(BuildConfig(model=src, outdir=d / t.value, target=t, calib=CalibConfig(samples=4),
                                         show_progress=False)).model_path
    out["trt-mha"] = build(BuildConfig(model=src, outdir=d / "mha", target=Target.TRT, calib=CalibConfig(samples=4),
                                       show_progress=False, policy=load_policy("trt-int8-mha", PolicyDefaults.for_target("trt")))).model_path
    return out


def test_vitc_trt_int8_mha_build_passes_check(builds, capsys, tmp_path):
    rc, out, err = cli(capsys, "check", builds["trt-mha"], "--target", "trt", "--json", tmp_path / "r.json")
    assert rc == 0, out + err
    assert out == "" and "follows TensorRT's explicit-quantization rules" in err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["ok"] and r["violations"] == [] and r["counts"]["attention blocks"] == 2


def test_vitc_trt_default_build_passes_check_with_residual_warnings(builds, capsys, tmp_path):
    rc, out, err = cli(capsys, "check", builds["trt"], "--target", "trt", "--json", tmp_path / "r.json")
    assert rc == 0, out + err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["ok"] and {v["rule"] for v in r["violations"]} == {TrtRule.RESIDUAL.value}


def test_vitc_ort_build_fails_check(builds, capsys):
    rc, out, err = cli(capsys, "check", builds["ort"], "--target", "trt")
    assert rc == 1
    lines = out.splitlines()
    # the ORT build runs attention as com.microsoft.QAttention and GELU as com.microsoft.Gelu
    for rule in (TrtRule.UINT8, TrtRule.ZERO_POINT, TrtRule.QTYPE, TrtRule.CONTRIB_OP):
        assert any(f": {rule.value}: " in ln for ln in lines), rule
    assert "violation(s)" in err and "vitc: error" not in err


@pytest.mark.parametrize("activation_type", ["default", "QUInt8"])
def test_ort_quantize_static_fails_check(builds, tmp_path, activation_type):
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.it, None)

    from vitc.compiler.driver.loader import load_model

    src = tmp_path / "fixed.onnx"
    onnx.save(load_model(builds["src"]).model, src)
    dst = tmp_path / "qs.onnx"
    kw = {} if activation_type == "default" else {"activation_type": QuantType.QUInt8}
    quantize_static(str(src), str(dst), Reader(), **kw)
    rep = check_model(onnx.load(dst))
    found = {v.rule for v in rep.errors}
    assert TrtRule.ZERO_POINT in found  # asymmetric activations: non-zero zero points
    assert TrtRule.QTYPE in found  # int32 bias DequantizeLinear
    if activation_type == "QUInt8":
        assert TrtRule.UINT8 in found


def test_unreadable_model_exits_2(capsys, tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"not a model")
    rc, out, err = cli(capsys, "check", p)
    assert rc == 2 and out == "" and err.startswith("vitc: error:") and "bad.onnx" in err
