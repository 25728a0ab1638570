"""passes/dynamic_batch.py: an artifact built at batch 1 takes any batch when the source did, per sample equal."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto
from onnx import helper as h

from conftest import ort_run
from vitc.compiler.driver.build import BuildConfig, CalibConfig, Precision, build
from vitc.compiler.driver.pipeline import Target, export
from vitc.passes.dynamic_batch import DynamicBatch


def _per_sample_diff(path, batches=(1, 4, 8)) -> dict[int, float]:
    """Max abs diff of each batch's outputs against the same samples run one by one."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((max(batches), 3, 32, 32)).astype(np.float32)
    single = np.concatenate([ort_run(path, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    return {b: float(np.abs(ort_run(path, {"input": x[:b]})[0] - single[:b]).max()) for b in batches}


@pytest.mark.parametrize("target,precision", [(Target.ORT, Precision.INT8), (Target.TRT, Precision.INT8),
                                              (Target.ORT, Precision.FP32)])
def test_tiny_vit_artifact_takes_any_batch(tmp_path, vit_path, target, precision):
    res = build(BuildConfig(model=vit_path, outdir=tmp_path / "out", target=target, precision=precision,
                            calib=CalibConfig(samples=4), show_progress=False))
    m = onnx.load(res.model_path)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert m.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    diffs = _per_sample_diff(res.model_path)
    assert max(diffs.values()) <= 1e-5, diffs
    rep = json.loads((res.outdir / "build.json").read_text())["dynamic_batch"]
    assert rep["kept"] and rep["checked_batch"] == 3, rep
    # the class token Concat gets its batch from the input at run time, not a baked 1
    assert any(p["pass"] == "dynamic_batch" and p["counts"].get("constants expanded", 0) > 0 for p in
               json.loads((res.outdir / "build.json").read_text())["passes"])


def test_batch_flag_fixes_the_batch(tmp_path, vit_path):
    res = build(BuildConfig(model=vit_path, outdir=tmp_path / "out", batch=2, dynamic_batch=False,
                            calib=CalibConfig(samples=4), show_progress=False))
    m = onnx.load(res.model_path)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert res.report["dynamic_batch"]["kept"] is False and "--batch" in res.report["dynamic_batch"]["reason"]


def _graph(reduce_all: bool) -> gs.Graph:
    """x [B, 4, 6] -> Reshape [B*4, 6] -> Relu -> Reshape [B, 4, 6] -> Concat(cls [1, 1, 6], axis 1) -> y; with
    ``reduce_all`` the end is a ReduceMean over every axis, the batch included (cannot take any batch)."""
    nodes = [h.make_node("Reshape", ["x", "s2"], ["a"]), h.make_node("Relu", ["a"], ["b"]),
             h.make_node("Reshape", ["b", "s3"], ["c"]), h.make_node("Concat", ["cls", "c"], ["y"], axis=1)]
    if reduce_all:
        nodes[-1] = h.make_node("ReduceMean", ["c"], ["y"], keepdims=1)
    inits = [onnx.numpy_helper.from_array(np.array([4, 6], np.int64), "s2"),
             onnx.numpy_helper.from_array(np.array([1, 4, 6], np.int64), "s3"),
             onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(1, 1, 6), "cls")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return gs.import_onnx(onnx.shape_inference.infer_shapes(h.make_model(g, opset_imports=[h.make_opsetid("", 17)])))


def test_reshape_targets_and_concat_partner_follow_the_batch():
    g = _graph(reduce_all=False)
    res = DynamicBatch({"x": "N"}).run(g)
    assert res.modified and res.counts["Reshape targets"] == 2 and res.counts["constants expanded"] == 1
    m = export(g)
    x = np.random.default_rng(0).standard_normal((5, 4, 6)).astype(np.float32)
    y = ort_run(m, {"x": x}, optimize=False)[0]
    ref = np.concatenate([np.broadcast_to(np.arange(6, dtype=np.float32), (5, 1, 6)), np.maximum(x, 0)], axis=1)
    np.testing.assert_array_equal(y, ref)


def test_a_graph_that_mixes_samples_stays_fixed_and_says_where():
    g = _graph(reduce_all=True)
    before = export(g.copy())
    res = DynamicBatch({"x": "N"}).run(g)
    assert not res.modified and "ReduceMean" in res.notes[0] and "batch" in res.notes[0]
    assert export(g).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert len(export(g).graph.node) == len(before.graph.node)


def test_a_constant_query_broadcasts_over_the_batch():
    """SigLIP's attention pool: a learned query (constant once folded) times batch-carrying keys."""
    q = np.random.default_rng(1).standard_normal((1, 2, 1, 4)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["q", "k"], ["s"]), h.make_node("Reshape", ["s", "shape"], ["y"])], "pool",
                     [h.make_tensor_value_info("k", TensorProto.FLOAT, [1, 2, 4, 5])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                     [onnx.numpy_helper.from_array(q, "q"), onnx.numpy_helper.from_array(np.array([1, 10]), "shape")])
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(h.make_model(g, opset_imports=[h.make_opsetid("", 17)])))
    assert DynamicBatch({"k": "N"}).run(graph).modified
    k = np.random.default_rng(2).standard_normal((3, 2, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(ort_run(export(graph), {"k": k})[0], (q @ k).reshape(3, 10), rtol=1e-5, atol=1e-6)


def test_expand_as_with_a_folded_target_follows_the_batch():
    """F.normalize as exported: x / Expand(norm, Shape(x)), the target folded at batch 1 (SwinV2's cosine attention)."""
    g = h.make_graph([h.make_node("Reshape", ["x", "flat"], ["t"]),  # [B*4, 6]: the batch merged into axis 0
                      h.make_node("ReduceL2", ["t"], ["n"], axes=[-1], keepdims=1),
                      h.make_node("Expand", ["n", "shape"], ["e"]), h.make_node("Div", ["t", "e"], ["d"]),
                      h.make_node("Reshape", ["d", "back"], ["y"])], "norm",
                     [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                     [onnx.numpy_helper.from_array(np.array([4, 6], np.int64), "flat"),
                      onnx.numpy_helper.from_array(np.array([4, 6], np.int64), "shape"),
                      onnx.numpy_helper.from_array(np.array([1, 4, 6], np.int64), "back")])
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(h.make_model(g, opset_imports=[h.make_opsetid("", 17)])))
    res = DynamicBatch({"x": "N"}).run(graph)
    assert res.modified and res.counts["Expand targets"] == 1
    x = np.random.default_rng(3).standard_normal((5, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(ort_run(export(graph), {"x": x})[0], x / np.linalg.norm(x, axis=-1, keepdims=True),
                               rtol=1e-5)


def test_a_batch_1_slice_of_the_batch_keeps_the_artifact_fixed(tmp_path):
    """x[0:1] on the batch axis is a no-op at batch 1 but not at batch 3: the check against the source catches it."""
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    g = h.make_graph([h.make_node("Slice", ["x", "s", "e", "ax"], ["first"]),
                      h.make_node("MatMul", ["first", "w"], ["y"])], "first_row",
                     [h.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                     [onnx.numpy_helper.from_array(np.array([0]), "s"), onnx.numpy_helper.from_array(np.array([1]), "e"),
                      onnx.numpy_helper.from_array(np.array([0]), "ax"), onnx.numpy_helper.from_array(w, "w")])
    src = tmp_path / "m.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), src)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32))
    res = build(BuildConfig(model=src, outdir=tmp_path / "out", calib=CalibConfig(source=tmp_path / "c.npz", samples=8),
                            show_progress=False))
    assert res.report["dynamic_batch"]["kept"] is False and "the source gives" in res.report["dynamic_batch"]["reason"]
    assert onnx.load(res.model_path).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
