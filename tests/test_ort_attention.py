"""passes/ort_attention.py: int8 QKV projection + float attention core -> one com.microsoft.QAttention (ORT target).

Numerics: the fused graph and the same build with --no-fuse-attention must give the same attention output (tight:
the only differences are float rounding; compared on the tensor the fusion writes, before any later Q rounds it),
for both exporter spellings (timm's fused qkv + Split, HF's three projections). Structure: one QAttention per
block, ORT's optimized graph has no QK^T MatMul left. Near-misses (a head merge that mixes heads, a softmax over
another axis, attention probabilities that are also a graph output, a quantized QK^T) must not fuse.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h

from conftest import cli, ort_run, sqnr_db
from vitc.tools.tiny_models import GraphBuilder

T, C, H = 9, 16, 2
D = C // H


def attention_model(style="timm", out_perm=(0, 2, 1, 3), softmax_axis=-1, probs_output=False, seed=0, batch=1,
                    score_bias=False):
    """x [batch, T, C] -> LayerNorm -> self-attention -> proj -> residual Add. "hf": three q/k/v projections (the
    tiny_vit fixture's spelling, ``GraphBuilder.attention``); "timm": one fused qkv, Reshape + Split, q and k scaled by
    sqrt(1/sqrt(D)) each, with knobs for the near-misses."""
    b = GraphBuilder(seed)
    gamma = (1 + 0.2 * b.rng.standard_normal(C)).astype(np.float32)
    y = b.op("LayerNormalization", ["x", b.const(gamma), b.const(np.zeros(C, np.float32))], "norm1", axis=-1)
    probs = None
    if style == "hf":
        assert (out_perm, softmax_axis, probs_output) == ((0, 2, 1, 3), -1, False), "near-misses: timm spelling"
        o = b.attention(y, T, C, H, "attn")
    else:
        qkv = b.linear(y, C, 3 * C, "attn_qkv")
        r = b.op("Reshape", [qkv, b.const(np.array([batch, T, 3, H, D], np.int64))], "attn_reshape")
        p = b.op("Transpose", [r], "attn_transpose", perm=[2, 0, 3, 1, 4])
        parts = [b.name("attn_split") for _ in range(3)]
        b.nodes.append(h.make_node("Split", [p, b.const(np.array([1, 1, 1], np.int64))], parts, name="/attn/Split",
                                   axis=0))
        q, k, v = (b.op("Squeeze", [t, b.const(np.array([0], np.int64))], "attn_squeeze") for t in parts)
        kt = b.op("Transpose", [k], "attn_transpose_k", perm=[0, 1, 3, 2])
        s = np.float32(math.sqrt(1 / math.sqrt(D)))
        qk = b.op("MatMul", [b.op("Mul", [q, b.const(s)], "attn_mul_q"), b.op("Mul", [kt, b.const(s)], "attn_mul_k")],
                  "attn_qk")
        if score_bias:  # a relative position bias (Swin, BEiT): a constant added to the scores
            qk = b.op("Add", [qk, b.const(b.rng.standard_normal((1, H, T, T)).astype(np.float32))], "attn_bias")
        probs = b.op("Softmax", [qk], "attn_softmax", axis=softmax_axis)
        o = b.op("MatMul", [probs, v], "attn_av")
        o = b.op("Transpose", [o], "attn_transpose_o", perm=list(out_perm))
        o = b.op("Reshape", [o, b.const(np.array([batch, T, C], np.int64))], "attn_merge")
        o = b.linear(o, C, C, "attn_proj")
    out = b.op("Add", ["x", o], "residual")
    outputs = [h.make_tensor_value_info(out, TensorProto.FLOAT, [batch, T, C])]
    if probs_output:
        outputs.append(h.make_tensor_value_info(probs, TensorProto.FLOAT, [batch, H, T, T]))
    graph = h.make_graph(b.nodes, "attention", [h.make_tensor_value_info("x", TensorProto.FLOAT, [batch, T, C])],
                         outputs, b.inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def _build(capsys, tmp_path, model, name, *extra):
    src = tmp_path / f"{name}.onnx"
    onnx.save(model, src)
    calib = tmp_path / "calib.npz"
    if not calib.exists():
        np.savez(calib, x=np.random.default_rng(1).standard_normal((8, 1, T, C)).astype(np.float32).reshape(8, T, C))
    out = tmp_path / f"{name}_out"
    rc, _, err = cli(capsys, "--log-level", "warning", "build", src, "-o", out, "--calib", calib,
                     "--calib-samples", "8", *extra)
    assert rc == 0, err
    return onnx.load(out / "model.int8.onnx"), json.loads((out / "build.json").read_text())


def _counts(report):
    return {k: v for p in report["passes"] for k, v in p["counts"].items()}


def _with_output(model, name):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(h.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return m


def _fused_output(model):
    """The tensor the QAttention (plus its reshape) writes: what the proj's QuantizeLinear reads."""
    qa = next(n for n in model.graph.node if n.op_type == "QAttention")
    t = qa.output[0]
    nxt = [n for n in model.graph.node if t in n.input]
    return nxt[0].output[0] if nxt and nxt[0].op_type == "Reshape" else t


@pytest.mark.parametrize("style,batch", [("timm", 1), ("hf", 1), ("timm", 3)])
def test_fusion_keeps_the_attention_output(capsys, tmp_path, style, batch):
    # the range search scored in-sample migrates the proj input here: the fold under test
    fused, rep = _build(capsys, tmp_path, attention_model(style, batch=batch), "f", "--no-holdout-search")
    plain, _ = _build(capsys, tmp_path, attention_model(style, batch=batch), "p", "--no-holdout-search",
                      "--no-fuse-attention")
    counts = _counts(rep)
    assert counts["QAttention fusions"] == 1
    # the proj input's migration factor lands in the v columns (exact), so no Mul is left before its Q
    assert counts.get("migration Mul folded into V", 0) == counts.get("Mul inserted", 0) == 1
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["QAttention"] == 1 and ops["Softmax"] == 0 and ops["MatMul"] == 0 and ops["Mul"] == 0, ops
    qa = next(n for n in fused.graph.node if n.op_type == "QAttention")
    attrs = {a.name: h.get_attribute_value(a) for a in qa.attribute}
    assert attrs["num_heads"] == H and attrs["scale"] == pytest.approx(1 / math.sqrt(D), rel=1e-6)
    name = _fused_output(fused)
    x = np.random.default_rng(7).standard_normal((batch, T, C)).astype(np.float32)
    a = ort_run(_with_output(fused, name), {"x": x})
    b = ort_run(_with_output(plain, name), {"x": x})
    assert np.abs(a[1] - b[1]).max() <= 1e-4 * np.abs(b[1]).max()  # same arithmetic up to float rounding
    assert sqnr_db(b[0], a[0]) > 40  # end to end (the proj's Q may round a value the other way)
    src = ort_run(attention_model(style, batch=batch), {"x": x})[0]
    assert sqnr_db(src, a[0]) > 20 and abs(sqnr_db(src, a[0]) - sqnr_db(src, b[0])) < 0.5


def test_ort_runs_one_kernel_per_block(capsys, tmp_path):
    import onnxruntime as ort

    fused, _ = _build(capsys, tmp_path, attention_model("timm"), "f")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(fused.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    assert ops["QAttention"] == 1 and ops["QGemm"] == 1, ops  # proj
    assert ops["MatMul"] + ops["FusedMatMul"] + ops["MatMulIntegerToFloat"] + ops["Transpose"] + ops["Split"] == 0, ops


@pytest.mark.parametrize("case,kw,why", [
    ("heads-mixed", {"out_perm": (0, 1, 2, 3)}, "not the inverse head merge"),
    ("softmax-axis", {"softmax_axis": 2}, "not over the last axis"),
    ("probs-output", {"probs_output": True}, "does not feed one attention x V MatMul"),
    ("position-bias", {"score_bias": True}, "the scores pass through Add"),
])
def test_near_misses_do_not_fuse(capsys, tmp_path, case, kw, why):
    model = attention_model("timm", **kw)
    fused, rep = _build(capsys, tmp_path, model, "f")
    assert _counts(rep).get("QAttention fusions", 0) == 0
    notes = [n for p in rep["passes"] if p["pass"] == "fuse_attention" for n in p["notes"]]
    assert len(notes) == 1 and "not fused" in notes[0] and why in notes[0], notes
    assert not any(n.op_type == "QAttention" for n in fused.graph.node)
    x = np.random.default_rng(7).standard_normal((1, T, C)).astype(np.float32)
    assert sqnr_db(ort_run(model, {"x": x})[0], ort_run(fused, {"x": x})[0]) > 20


def test_quantized_qk_is_left_alone(capsys, tmp_path):
    pol = tmp_path / "qk-int8.toml"
    pol.write_text('name = "qk-int8"\n[[rule]]\nname = "av-float"\nroles = ["attn_av"]\nskip = true\n'
                   '[[rule]]\nname = "default"\n')
    fused, rep = _build(capsys, tmp_path, attention_model("hf"), "f", "--policy", pol)
    notes = [n for p in rep["passes"] if p["pass"] == "fuse_attention" for n in p["notes"]]
    assert _counts(rep).get("QAttention fusions", 0) == 0
    assert len(notes) == 1 and "DequantizeLinear" in notes[0] and "quantized attention" in notes[0], notes
    assert Counter(n.op_type for n in fused.graph.node)["MatMul"] == 2


def test_trt_target_keeps_the_onnx_attention(capsys, tmp_path):
    _, rep = _build(capsys, tmp_path, attention_model("timm"), "t", "--target", "trt")
    assert "fuse_attention" not in [p["pass"] for p in rep["passes"]]
