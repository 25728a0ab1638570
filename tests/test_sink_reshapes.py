"""passes/sink_reshapes.py: Reshapes move down past row-wise ops and cancel; outputs stay bit-identical."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from conftest import ort_run
from vitc.compiler.driver.pipeline import PipelineConfig, export, float_pipeline, run_passes
from vitc.passes.sink_reshapes import ReshapeSinking
from vitc.tools.tiny_models import GraphBuilder

T, C = 5, 8


def mlp_blocks(depth=2, ln_axis=-1):
    """x [1, T, C] -> depth x (LayerNorm -> fc1 -> GELU -> fc2 -> residual Add) -> LayerNorm -> y [1, T, C]."""
    b = GraphBuilder(0)
    x = "x"
    for i in range(depth):
        gamma = (1 + 0.1 * b.rng.standard_normal(C)).astype(np.float32)
        y = b.op("LayerNormalization", [x, b.const(gamma), b.const(np.zeros(C, np.float32))], f"ln{i}", axis=ln_axis)
        y = b.gelu(b.linear(y, C, 4 * C, f"fc1_{i}"), "erf", f"gelu{i}")  # exporters' GELU spelling
        y = b.op("Mul", [b.linear(y, 4 * C, C, f"fc2_{i}"), b.const(np.full((1, 1, C), 0.5, np.float32))], f"scale{i}")
        x = b.op("Add", [x, y], f"res{i}")
    y = b.op("LayerNormalization", [x, b.const(np.ones(C, np.float32)), b.const(np.zeros(C, np.float32))], "final_ln",
             axis=-1)
    g = h.make_graph(b.nodes, "mlp", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, C])],
                     [h.make_tensor_value_info(y, TensorProto.FLOAT, [1, T, C])], b.inits)
    return onnx.shape_inference.infer_shapes(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))


def _fused(model):
    g = gs.import_onnx(model)
    run_passes(g, float_pipeline(PipelineConfig()))
    assert sum(n.op == "Gelu" for n in g.nodes) >= 1
    return g


def _reshapes(m):
    return Counter(n.op_type for n in m.graph.node)["Reshape"]


def test_stream_stays_2d_and_outputs_are_bit_identical():
    g = _fused(mlp_blocks())
    before = export(g.copy())
    assert _reshapes(before) == 2 * 4  # MatMul+bias -> Reshape, Gemm, Reshape for fc1 and fc2 of two blocks
    res = ReshapeSinking().run(g)
    after = export(g)
    onnx.checker.check_model(after)
    # what is left: where the stream enters it is flattened twice (the residual, and the first LayerNorm's output
    # for fc1) and where it leaves it is un-flattened once
    assert res.modified and _reshapes(after) == 3 and res.counts["Reshapes removed"] == 5, res.counts
    x = np.random.default_rng(3).standard_normal((1, T, C)).astype(np.float32)
    a, b = ort_run(before, {"x": x}, optimize=False)[0], ort_run(after, {"x": x}, optimize=False)[0]
    assert a.shape == b.shape == (1, T, C) and np.array_equal(a, b)
    # ORT's own fusions differ a little between the layouts (Add + LayerNorm -> SkipLayerNormalization on 3-D)
    np.testing.assert_allclose(ort_run(after, {"x": x})[0], a, rtol=0, atol=1e-5)
    # the per-channel [1, 1, C] constant was flattened so it broadcasts over the 2-D stream
    assert all(len(n.inputs[1].shape) == 1 for n in g.nodes if n.op == "Mul")


def test_layernorm_over_another_axis_blocks_the_move():
    g = _fused(mlp_blocks(depth=1, ln_axis=1))  # normalizes over tokens: not row-wise in [T, C]
    before = export(g.copy())
    res = ReshapeSinking().run(g)
    after = export(g)
    x = np.random.default_rng(3).standard_normal((1, T, C)).astype(np.float32)
    np.testing.assert_array_equal(ort_run(before, {"x": x}, optimize=False)[0],
                                  ort_run(after, {"x": x}, optimize=False)[0])
    ln = [n for n in after.graph.node if n.op_type == "LayerNormalization" and n.name.startswith("/ln0_")][0]
    assert h.get_attribute_value(ln.attribute[0]) == 1 and len(ln.input) == 3
    assert _reshapes(after) <= _reshapes(before) and res.counts["Reshapes removed"] == _reshapes(before) - _reshapes(after)


def test_no_gain_leaves_the_graph_unchanged():
    x = h.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])
    shape = nh.from_array(np.array([1, 2, 6], np.int64), "s")
    nodes = [h.make_node("Reshape", ["x", "s"], ["r"], name="r"), h.make_node("Relu", ["r"], ["y"], name="relu")]
    m = h.make_model(h.make_graph(nodes, "g", [x], [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6])],
                                  [shape]), opset_imports=[h.make_opsetid("", 17)])
    g = gs.import_onnx(m)
    res = ReshapeSinking().run(g)
    assert not res.modified and res.notes and [n.op for n in g.nodes] == ["Reshape", "Relu"]


def test_merged_reshape_with_a_copied_dim_keeps_its_meaning():
    """Reshape(.., [0, T, 2, C/2]) copies dim 0 from its input: merged onto the 2-D Gemm output it must not read
    the Gemm's first dim (T) as the batch."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((C, C)).astype(np.float32), "w"),
             nh.from_array(rng.standard_normal(C).astype(np.float32), "b"),
             nh.from_array(np.array([0, T, 2, C // 2], np.int64), "heads")]
    nodes = [h.make_node("MatMul", ["x", "w"], ["mm"], name="mm"), h.make_node("Add", ["mm", "b"], ["y"], name="add"),
             h.make_node("Reshape", ["y", "heads"], ["z"], name="split_heads")]
    m = onnx.shape_inference.infer_shapes(h.make_model(h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, C])],
        [h.make_tensor_value_info("z", TensorProto.FLOAT, [1, T, 2, C // 2])], inits),
        opset_imports=[h.make_opsetid("", 17)]))
    g = gs.import_onnx(m)
    run_passes(g, float_pipeline(PipelineConfig()))
    before = export(g.copy())
    assert ReshapeSinking().run(g).modified
    after = export(g)
    x = rng.standard_normal((1, T, C)).astype(np.float32)
    np.testing.assert_array_equal(ort_run(before, {"x": x}, optimize=False)[0], ort_run(after, {"x": x}, optimize=False)[0])


def test_identity_reshape_removed_before_its_producer_is_visited():
    """A Reshape that became the identity is detached both ways: the producer Reshape visited next must not see it
    among its consumers (an exporter order that is not topological, as Swin's window reshapes give)."""
    x0 = gs.Variable("x0", np.float32, [6, 4])
    t = gs.Variable("t", np.float32, [2, 3, 4])
    u = gs.Variable("u", np.float32, [2, 3, 4])
    y = gs.Variable("y", np.float32, [2, 3, 4])
    shape = gs.Constant("s", np.array([2, 3, 4], np.int64))
    nodes = [gs.Node("Reshape", "r_id", inputs=[t, shape], outputs=[u]),
             gs.Node("Reshape", "r1", inputs=[x0, gs.Constant("s1", np.array([2, 3, 4], np.int64))], outputs=[t]),
             gs.Node("Relu", "relu", inputs=[u], outputs=[y])]
    g = gs.Graph(nodes=nodes, inputs=[x0], outputs=[y], opset=17)
    ref = export(g.copy())
    res = ReshapeSinking().run(g)
    assert res.counts["Reshapes removed"] == 1
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    g.toposort()
    np.testing.assert_array_equal(ort_run(export(g), {"x0": x})[0], ort_run(ref, {"x0": x})[0])
