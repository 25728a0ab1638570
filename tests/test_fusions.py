"""Fusion passes: match counts, numerically equal outputs, near-misses left alone, idempotence."""

import math
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import ort_run
from onnx import TensorProto, helper, numpy_helper

from vitc.compiler.driver.loader import load_model
from vitc.compiler.driver.pipeline import export
from vitc.passes.canonicalize import CanonicalizePass
from vitc.passes.fold_channel_scale import ChannelScaleFold
from vitc.passes.fuse_gelu import GeluFusion, GeluOp
from vitc.passes.fuse_layernorm import LayerNormFusion
from vitc.passes.fuse_matmul_add import MatMulAddFusion
from vitc.tools.tiny_models import TinyConfig, tiny_bert, tiny_vit


def _graph(model, tmp_path, batch=1):
    p = tmp_path / "m.onnx"
    onnx.save(model, p)
    return gs.import_onnx(load_model(p, batch=batch).model)


def ops(graph):
    return Counter(n.op for n in graph.nodes)


@pytest.mark.parametrize("cfg", [TinyConfig(), TinyConfig(gelu="erf_mul", ln_square="mul"),
                                 TinyConfig(gelu="tanh", depth=3)])
def test_vit_fusions_keep_outputs(cfg, tmp_path, image_batch):
    model = tiny_vit(cfg)
    ref = ort_run(model, {"input": image_batch}, optimize=False)[0]
    g = _graph(model, tmp_path)
    reports = [p.run(g) for p in (CanonicalizePass(), LayerNormFusion(), GeluFusion(), MatMulAddFusion())]
    counts = {k: v for r in reports for k, v in r.counts.items()}
    n_ln = 2 * cfg.depth + 1
    assert counts["LayerNorm fusions"] == n_ln
    assert counts["GELU(tanh) fusions" if cfg.gelu == "tanh" else "GELU(erf) fusions"] == cfg.depth
    assert counts["MatMul+Add -> Gemm fusions"] == 6 * cfg.depth + 1  # q,k,v,proj,fc1,fc2 + head
    o = ops(g)
    assert o["LayerNormalization"] == n_ln and o["ReduceMean"] == 0 and o["Erf"] == 0 and o["Tanh"] == 0
    assert o["Shape"] == 0 and o["Expand"] == 0, "canonicalize folds the class-token shape chain"
    out = ort_run(export(g), {"input": image_batch}, optimize=False)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_bert_fusions_keep_outputs(tmp_path):
    model = tiny_bert()
    ids = np.random.default_rng(0).integers(0, 100, (1, 16)).astype(np.int64)
    ref = ort_run(model, {"input_ids": ids}, optimize=False)[0]
    g = _graph(model, tmp_path)
    r = [p.run(g) for p in (CanonicalizePass(), LayerNormFusion(), GeluFusion(), MatMulAddFusion())]
    assert r[1].counts["LayerNorm fusions"] == 5
    assert r[2].counts["GELU(tanh) fusions"] == 2
    assert r[3].counts["MatMul+Add -> Gemm fusions"] == 12  # bias-first Add spelling included
    out = ort_run(export(g), {"input_ids": ids}, optimize=False)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_fusions_are_idempotent(vit_path):
    g = gs.import_onnx(load_model(vit_path).model)
    passes = (CanonicalizePass(), LayerNormFusion(), GeluFusion(), MatMulAddFusion())
    for p in passes:
        p.run(g)
    again = [p.run(g) for p in passes[1:]]
    assert not any(r.modified for r in again)


def test_gelu_onnx20_needs_opset20(vit_path):
    g = gs.import_onnx(load_model(vit_path).model)
    r = GeluFusion(GeluOp.ONNX20).run(g)
    assert not r.modified and "opset" in r.notes[0]


# -- near-misses ---------------------------------------------------------------------------------------------------
def _model(nodes, inits, x_shape=(1, 4, 8), out="y"):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v, np.float32) if not isinstance(v, np.ndarray) else v, k)
                           for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m


def _ln_nodes(axis_second=-1, exponent=2.0):
    return [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["v"], axes=[axis_second]),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["n"]),
        helper.make_node("Mul", ["gamma", "n"], ["g"]),  # constant first: any order must fuse
        helper.make_node("Add", ["g", "beta"], ["y"]),
    ], {"two": np.float32(exponent), "eps": np.float32(1e-5), "gamma": np.linspace(0.5, 2, 8).astype(np.float32),
        "beta": np.linspace(-1, 1, 8).astype(np.float32)}


def _fuse_ln(model, tmp_path):
    g = _graph(model, tmp_path)
    return LayerNormFusion().run(g), g


def test_layernorm_exact_pattern_fuses(tmp_path):
    nodes, inits = _ln_nodes()
    m = _model(nodes, inits)
    x = np.random.default_rng(1).standard_normal((1, 4, 8)).astype(np.float32) * 3 + 1
    r, g = _fuse_ln(m, tmp_path)
    assert r.counts["LayerNorm fusions"] == 1
    np.testing.assert_allclose(ort_run(export(g), {"x": x})[0], ort_run(m, {"x": x}, optimize=False)[0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw, why", [({"axis_second": -2}, "variance is not a ReduceMean over the last axis"),
                                     ({"exponent": 3.0}, "not squared")])
def test_layernorm_near_miss_not_fused(kw, why, tmp_path):
    nodes, inits = _ln_nodes(**kw)
    r, g = _fuse_ln(_model(nodes, inits), tmp_path)
    assert r.counts["LayerNorm fusions"] == 0 and not r.modified
    assert len(r.notes) == 1 and "not fused" in r.notes[0] and why in r.notes[0], r.notes


def test_layernorm_with_nonconstant_gamma_keeps_mul(tmp_path):
    nodes, inits = _ln_nodes()
    nodes[7] = helper.make_node("Mul", ["n", "x"], ["g"])  # gamma is data, not a constant: only the core fuses
    m = _model(nodes, inits)
    x = np.random.default_rng(2).standard_normal((1, 4, 8)).astype(np.float32)
    r, g = _fuse_ln(m, tmp_path)
    assert r.counts["LayerNorm fusions"] == 1
    assert ops(g)["Mul"] == 1 and ops(g)["Add"] == 1
    np.testing.assert_allclose(ort_run(export(g), {"x": x})[0], ort_run(m, {"x": x}, optimize=False)[0],
                               rtol=1e-4, atol=1e-5)


def _gelu_nodes(div=math.sqrt(2), one=1.0, half=0.5):
    return [
        helper.make_node("Div", ["x", "c_div"], ["s"]),
        helper.make_node("Erf", ["s"], ["e"]),
        helper.make_node("Add", ["c_one", "e"], ["a"]),
        helper.make_node("Mul", ["a", "x"], ["m"]),
        helper.make_node("Mul", ["c_half", "m"], ["y"]),
    ], {"c_div": np.float32(div), "c_one": np.float32(one), "c_half": np.float32(half)}


def test_gelu_any_constant_order_fuses(tmp_path):
    nodes, inits = _gelu_nodes()
    m = _model(nodes, inits)
    x = np.linspace(-4, 4, 32, dtype=np.float32).reshape(1, 4, 8)
    g = _graph(m, tmp_path)
    r = GeluFusion().run(g)
    assert r.counts["GELU(erf) fusions"] == 1 and [n.op for n in g.nodes] == ["Gelu"]
    np.testing.assert_allclose(ort_run(export(g), {"x": x})[0], ort_run(m, {"x": x}, optimize=False)[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, note", [({"div": 2.0}, None), ({"one": 2.0}, "+ 1"), ({"half": 0.6}, "0.5 * x")])
def test_gelu_near_miss_not_fused(kw, note, tmp_path):
    """An Erf of anything but x / sqrt(2) is not a GELU candidate (no note); past that, a near-miss says why."""
    nodes, inits = _gelu_nodes(**kw)
    g = _graph(_model(nodes, inits), tmp_path)
    r = GeluFusion().run(g)
    assert not r.modified
    assert ops(g)["Erf"] == 1
    if note is None:
        assert r.notes == []
    else:
        assert len(r.notes) == 1 and note in r.notes[0], r.notes


def test_gelu_intermediate_used_elsewhere_not_fused(tmp_path):
    nodes, inits = _gelu_nodes()
    nodes.append(helper.make_node("Add", ["y", "e"], ["y2"]))  # the Erf output is also used: fusing would drop it
    g = _graph(_model(nodes, inits, out="y2"), tmp_path)
    assert not GeluFusion().run(g).modified


def test_matmul_add_nonconstant_bias_not_fused(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "x2"], ["y"]),
             helper.make_node("MatMul", ["x", "w"], ["x2"])]
    m = _model(nodes, {"w": np.eye(8, dtype=np.float32)})
    g = _graph(m, tmp_path)
    r = MatMulAddFusion().run(g)
    assert not r.modified
    # both MatMuls feed the Add: each is a near-miss
    assert len(r.notes) == 2 and all("not a constant float bias" in n for n in r.notes), r.notes


def test_matmul_add_3d_becomes_gemm_with_reshapes(tmp_path):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["b", "mm"], ["y"])]
    m = _model(nodes, {"w": rng.standard_normal((8, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)})
    x = rng.standard_normal((1, 4, 8)).astype(np.float32)
    g = _graph(m, tmp_path)
    assert MatMulAddFusion().run(g).counts["MatMul+Add -> Gemm fusions"] == 1
    assert ops(g) == Counter({"Reshape": 2, "Gemm": 1})
    out = ort_run(export(g), {"x": x})[0]
    assert out.shape == (1, 4, 5)
    np.testing.assert_allclose(out, ort_run(m, {"x": x}, optimize=False)[0], rtol=1e-5, atol=1e-6)


def test_canonicalize_honours_shape_start_end(tmp_path):
    """Shape-15 with start/end (dynamo exports) must fold to the slice, not the full shape."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
             helper.make_node("Concat", ["s", "one", "one"], ["tgt"], axis=0),
             helper.make_node("Expand", ["cls", "tgt"], ["e"]),
             helper.make_node("Concat", ["e", "x"], ["y"], axis=1)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array([1], np.int64), "one"),
                           numpy_helper.from_array(np.ones((1, 1, 8), np.float32), "cls")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    graph = _graph(m, tmp_path, batch=2)
    r = CanonicalizePass().run(graph)
    assert r.counts["Shape folded"] == 1 and ops(graph)["Expand"] == 0
    x = np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32)
    np.testing.assert_array_equal(ort_run(export(graph), {"x": x})[0], ort_run(m, {"x": x}, optimize=False)[0])


# -- fold_channel_scale: LayerScale-style per-channel Mul after a linear ---------------------------------------------
def test_layer_scale_folds_into_linears(tmp_path, image_batch):
    """tiny ViT with LayerScale (a Mul after every proj and fc2, gamma as [N] and as constant-first [1, 1, N]):
    after the fusions every Mul is folded into its Gemm and the outputs are unchanged."""
    model = tiny_vit(TinyConfig(layer_scale=True, depth=3))
    ref = ort_run(model, {"input": image_batch}, optimize=False)[0]
    g = _graph(model, tmp_path)
    for p in (CanonicalizePass(), LayerNormFusion(), GeluFusion(), MatMulAddFusion()):
        p.run(g)
    assert ops(g)["Mul"] == 6
    r = ChannelScaleFold().run(g)
    assert r.counts["channel-scale folds"] == 6 and ops(g)["Mul"] == 0
    out = ort_run(export(g), {"input": image_batch}, optimize=False)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert not ChannelScaleFold().run(g).modified  # idempotent


def _scale_model(gamma, extra_nodes=(), mm_out="mm", reshape_to=None, x_shape=(1, 4, 8)):
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm0"]), helper.make_node("Add", ["mm0", "b"], ["mm"])]
    src = mm_out
    inits = {"w": rng.standard_normal((8, 6)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32)}
    if reshape_to is not None:
        nodes.append(helper.make_node("Reshape", [mm_out, "shape"], ["r"]))
        inits["shape"] = np.array(reshape_to, np.int64)
        src = "r"
    if isinstance(gamma, str):
        nodes.append(helper.make_node("Mul", [src, gamma], ["y"]))
    else:
        nodes.append(helper.make_node("Mul", [src, "g"], ["y"]))
        inits["g"] = np.asarray(gamma, np.float32)
    return _model(nodes + list(extra_nodes), inits, x_shape=x_shape)


def test_channel_scale_fold_exact_on_3d_gemm(tmp_path):
    m = _scale_model(np.linspace(0.1, 2, 6))
    x = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)
    g = _graph(m, tmp_path)
    MatMulAddFusion().run(g)
    assert ChannelScaleFold().run(g).counts["channel-scale folds"] == 1
    assert ops(g) == Counter({"Reshape": 2, "Gemm": 1})
    np.testing.assert_allclose(ort_run(export(g), {"x": x})[0], ort_run(m, {"x": x}, optimize=False)[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["per_token", "not_constant", "linear_used_twice", "broadcasts_up",
                                  "reshape_changes_last_axis", "scalar"])
def test_channel_scale_fold_near_misses(case, tmp_path):
    """Left alone: a scale along another axis, a computed scale, a linear output read elsewhere, a Mul that
    broadcasts to a bigger tensor, a Reshape that moves the channel axis. (A scalar is folded by nobody here: it
    is not a per-channel vector of length N.)"""
    kw = {"per_token": dict(gamma=np.linspace(0.5, 1.5, 4).reshape(4, 1)),
          "not_constant": dict(gamma="x6", extra_nodes=[helper.make_node("Slice", ["x", "s0", "s6", "ax"], ["x6"])]),
          "linear_used_twice": dict(gamma=np.linspace(0.1, 2, 6),
                                    extra_nodes=[helper.make_node("Relu", ["mm"], ["z"])]),
          "broadcasts_up": dict(gamma=np.ones((2, 1, 6))),
          "reshape_changes_last_axis": dict(gamma=np.linspace(0.1, 2, 3), reshape_to=[8, 3], x_shape=(4, 8)),
          "scalar": dict(gamma=np.float32(2.0))}[case]
    m = _scale_model(**kw)
    if case == "not_constant":
        for k, v in (("s0", [0]), ("s6", [6]), ("ax", [2])):
            m.graph.initializer.append(numpy_helper.from_array(np.array(v, np.int64), k))
    if case == "linear_used_twice":
        m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    g = _graph(m, tmp_path)
    MatMulAddFusion().run(g)
    if case == "reshape_changes_last_axis":  # Gemm [4, 6] -> Reshape [8, 3] -> Mul: one Reshape to look through
        assert [n.op for n in g.nodes] == ["Gemm", "Reshape", "Mul"]
    assert not ChannelScaleFold().run(g).modified
    assert ops(g)["Mul"] == 1
