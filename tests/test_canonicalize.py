"""passes/canonicalize.py: shape chains fold however deep, no-op nodes go, outputs stay equal."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnx import helper as h

from conftest import ort_run
from vitc.compiler.driver.pipeline import export
from vitc.passes.canonicalize import CanonicalizePass


def _chain_model(depth: int) -> onnx.ModelProto:
    """depth x (Pad by (4 - W % 4) % 4 computed from Shape -> Relu): each Pad's size depends on the previous
    one's output shape, the Swin window-padding spelling; every pad is zero here, so each Pad is a no-op."""
    nodes, inits = [], []
    x = "x"
    for i in range(depth):
        nodes += [
            h.make_node("Shape", [x], [f"s{i}"], start=-1),
            h.make_node("Mod", [f"s{i}", "four"], [f"m{i}"]),
            h.make_node("Sub", ["four", f"m{i}"], [f"d{i}"]),
            h.make_node("Mod", [f"d{i}", "four"], [f"p{i}"]),
            h.make_node("Concat", ["zeros3", f"p{i}"], [f"pe{i}"], axis=0),
            h.make_node("Concat", ["zeros2", f"pe{i}"], [f"pads{i}"], axis=0),
            h.make_node("Pad", [x, f"pads{i}"], [f"pad{i}"]),
            h.make_node("Relu", [f"pad{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    nodes += [h.make_node("Slice", [x, "st", "en"], ["sl"]), h.make_node("Transpose", ["sl"], ["tr"], perm=[0, 1]),
              h.make_node("Relu", ["tr"], ["y"])]
    inits += [onnx.numpy_helper.from_array(np.array([4], np.int64), "four"),
              onnx.numpy_helper.from_array(np.zeros(1, np.int64), "zeros3"),
              onnx.numpy_helper.from_array(np.zeros(2, np.int64), "zeros2"),
              onnx.numpy_helper.from_array(np.array([0, 0], np.int64), "st"),
              onnx.numpy_helper.from_array(np.array([9, 1 << 30], np.int64), "en")]
    g = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def test_deep_shape_chains_fold_and_noops_go():
    model = _chain_model(depth=10)  # deeper than a fixed handful of folding rounds
    g = gs.import_onnx(model)
    res = CanonicalizePass().run(g)
    ops = Counter(n.op for n in g.nodes)
    assert ops == Counter({"Relu": 11}), ops  # every Shape chain folded, every zero Pad, the Slice, the Transpose
    assert res.counts["no-op nodes removed"] == 12
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(ort_run(export(g), {"x": x})[0], ort_run(model, {"x": x})[0])


def test_a_nonzero_pad_and_a_partial_slice_stay():
    model = _chain_model(depth=1)
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.array([3], np.int64), "four"))  # pad by 1
    model.graph.initializer[4].CopyFrom(onnx.numpy_helper.from_array(np.array([2, 1 << 30], np.int64), "en"))
    g = gs.import_onnx(model)
    CanonicalizePass().run(g)
    ops = Counter(n.op for n in g.nodes)
    assert ops["Pad"] == 1 and ops["Slice"] == 1, ops
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(ort_run(export(g), {"x": x})[0], ort_run(model, {"x": x})[0])


def _normalize_model(other_shape: list[int], consumer: str = "Div") -> onnx.ModelProto:
    """SwinV2's F.normalize spelling: y = x / Expand(clip(norm(x)), shape of x), then ``consumer`` with an operand of
    ``other_shape`` in place of x."""
    nodes = [
        h.make_node("ReduceL2", ["x"], ["n"], axes=[-1], keepdims=1),
        h.make_node("Clip", ["n", "eps"], ["c"]),
        h.make_node("Expand", ["c", "target"], ["e"]),
        h.make_node(consumer, ["z", "e"], ["y"]),
    ]
    inits = [onnx.numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
             onnx.numpy_helper.from_array(np.array([2, 3, 8], np.int64), "target")]
    g = h.make_graph(nodes, "normalize", [h.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8]),
                                          h.make_tensor_value_info("z", TensorProto.FLOAT, other_shape)],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def test_an_expand_the_consumer_broadcasts_anyway_goes_and_outputs_stay_equal():
    model = _normalize_model([2, 3, 8])
    g = gs.import_onnx(model)
    CanonicalizePass().run(g)
    assert "Expand" not in {n.op for n in g.nodes}
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32),
            "z": rng.standard_normal((2, 3, 8)).astype(np.float32)}
    np.testing.assert_array_equal(ort_run(export(g), feed)[0], ort_run(model, feed)[0])


def test_an_expand_that_sets_the_output_shape_stays():
    """z of shape [3, 1]: without the Expand, z / c would broadcast to [2, 3, 1], not [2, 3, 8]."""
    model = _normalize_model([3, 1])
    g = gs.import_onnx(model)
    CanonicalizePass().run(g)
    assert "Expand" in {n.op for n in g.nodes}
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32), "z": rng.standard_normal((3, 1)).astype(np.float32)}
    out = ort_run(export(g), feed)[0]
    assert out.shape == (2, 3, 8)
    np.testing.assert_array_equal(out, ort_run(model, feed)[0])


def test_an_expand_feeding_a_non_broadcasting_op_stays():
    model = _normalize_model([2, 3, 8], consumer="Concat")
    model.graph.node[-1].attribute.extend([h.make_attribute("axis", 0)])
    g = gs.import_onnx(model)
    CanonicalizePass().run(g)
    assert "Expand" in {n.op for n in g.nodes}


def test_an_expand_stays_when_one_of_its_consumers_needs_it_or_it_is_a_graph_output():
    model = _normalize_model([2, 3, 8])
    # a second consumer whose other operand is [1, 1, 1]: without the Expand its output would be [2, 3, 1]
    model.graph.node.append(h.make_node("Mul", ["e", "w"], ["y2"]))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((1, 1, 1), np.float32), "w"))
    model.graph.output.append(h.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    g = gs.import_onnx(model)
    CanonicalizePass().run(g)
    assert "Expand" in {n.op for n in g.nodes}
    exposed = _normalize_model([2, 3, 8])
    exposed.graph.output.append(h.make_tensor_value_info("e", TensorProto.FLOAT, None))
    g = gs.import_onnx(exposed)
    CanonicalizePass().run(g)
    assert "Expand" in {n.op for n in g.nodes}
