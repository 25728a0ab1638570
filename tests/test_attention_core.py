"""passes/attention.py: the one attention-core matcher (annotate, fuse_attention and the TensorRT check use it).

Spellings that must be found: a plain core, a scaled one, Swin's (a constant position bias, a Reshape to
[B, nW, H, T, T], a computed mask added, a Reshape back), a Where mask, dropout and Q/DQ around the probabilities.
Not a core: a Softmax over a projection output (one operand constant), a Softmax fed by something other than
scores.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto
from onnx import helper as h

from vitc.passes.attention import find_cores, match_core

B, NW, H, T, D = 1, 4, 2, 5, 3


def _graph(score_nodes, extra_inputs=(), inits=(), probs_nodes=(), prob="p"):
    nodes = [h.make_node("MatMul", ["q", "kt"], ["qk"], name="qk"), *score_nodes,
             h.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1), *probs_nodes,
             h.make_node("MatMul", [prob, "v"], ["o"], name="av")]
    shape = [B * NW, H, T, D]
    ins = [h.make_tensor_value_info("q", TensorProto.FLOAT, shape),
           h.make_tensor_value_info("kt", TensorProto.FLOAT, [B * NW, H, D, T]),
           h.make_tensor_value_info("v", TensorProto.FLOAT, shape), *extra_inputs]
    g = h.make_graph(nodes, "t", ins, [h.make_tensor_value_info("o", TensorProto.FLOAT, shape)], list(inits))
    return gs.import_onnx(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))


def _const(name, a):
    from onnx import numpy_helper
    return numpy_helper.from_array(np.asarray(a), name)


def test_plain_scaled_core():
    g = _graph([h.make_node("Mul", ["qk", "c"], ["s"], name="scale")], inits=[_const("c", np.float32(0.5))])
    core = match_core(next(n for n in g.nodes if n.op == "Softmax"))
    assert core is not None and core.qk.name == "qk" and [n.name for n in core.av] == ["av"]
    assert [n.name for n in core.scores] == ["scale"] and core.probs == []


def test_swin_bias_and_shift_mask():
    """scores + bias[1,H,T,T] -> [B, nW, H, T, T] + mask[1, nW, 1, T, T] (a graph input here) -> [B*nW, H, T, T]."""
    nodes = [h.make_node("Add", ["qk", "bias"], ["b1"], name="relpos"),
             h.make_node("Reshape", ["b1", "s5"], ["b5"], name="to5d"),
             h.make_node("Add", ["mask", "b5"], ["m5"], name="mask_add"),  # computed operand first
             h.make_node("Reshape", ["m5", "s4"], ["s"], name="to4d")]
    g = _graph(nodes, extra_inputs=[h.make_tensor_value_info("mask", TensorProto.FLOAT, [1, NW, 1, T, T])],
               inits=[_const("bias", np.zeros((1, H, T, T), np.float32)),
                      _const("s5", np.array([B, NW, H, T, T], np.int64)),
                      _const("s4", np.array([B * NW, H, T, T], np.int64))])
    core = match_core(next(n for n in g.nodes if n.op == "Softmax"))
    assert core is not None and core.qk.name == "qk"
    assert [n.name for n in core.scores] == ["to4d", "mask_add", "to5d", "relpos"]


def test_where_mask_and_prob_ops():
    nodes = [h.make_node("Where", ["keep", "qk", "neg"], ["s"], name="where")]
    probs = [h.make_node("Dropout", ["p"], ["pd"], name="drop"), h.make_node("Cast", ["pd"], ["pc"], name="cast", to=1)]
    g = _graph(nodes, extra_inputs=[h.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, T, T])],
               inits=[_const("neg", np.float32(-1e4))], probs_nodes=probs, prob="pc")
    core = match_core(next(n for n in g.nodes if n.op == "Softmax"))
    assert core is not None and [n.name for n in core.probs] == ["drop", "cast"] and core.av[0].name == "av"


def test_nan_guard_on_the_probabilities_is_passed():
    """PyTorch's SDPA export with a mask (HF BERT): Where(IsNaN(p), 0, p) between the softmax and attention x V."""
    probs = [h.make_node("IsNaN", ["p"], ["nan"], name="isnan"),
             h.make_node("Where", ["nan", "zero", "p"], ["pg"], name="guard")]
    g = _graph([h.make_node("Identity", ["qk"], ["s"])], inits=[_const("zero", np.float32(0.0))], probs_nodes=probs,
               prob="pg")
    core = match_core(next(n for n in g.nodes if n.op == "Softmax"))
    assert core is not None and [n.name for n in core.probs] == ["guard"] and core.av[0].name == "av"


def test_where_mixing_two_computed_tensors_into_the_probabilities_is_not_passed():
    """Where(c, p, other) with another computed tensor is not a guard: attention x V is not found through it."""
    probs = [h.make_node("Where", ["keep", "p", "other"], ["pg"], name="mix")]
    g = _graph([h.make_node("Identity", ["qk"], ["s"])],
               extra_inputs=[h.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, T, T]),
                             h.make_tensor_value_info("other", TensorProto.FLOAT, [B * NW, H, T, T])],
               probs_nodes=probs, prob="pg")
    core = match_core(next(n for n in g.nodes if n.op == "Softmax"))
    assert core is not None and core.av == []


@pytest.mark.parametrize("case", ["weight", "no-matmul"])
def test_not_a_core(case):
    if case == "weight":  # a classifier softmax: MatMul with a constant weight
        nodes = [h.make_node("MatMul", ["x", "w"], ["s"], name="fc"), h.make_node("Softmax", ["s"], ["y"], axis=-1)]
        inits = [_const("w", np.ones((4, 3), np.float32))]
    else:
        nodes = [h.make_node("Relu", ["x"], ["s"], name="relu"), h.make_node("Softmax", ["s"], ["y"], axis=-1)]
        inits = []
    g = h.make_graph(nodes, "t", [h.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    graph = gs.import_onnx(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))
    assert find_cores(graph) == []
