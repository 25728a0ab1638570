"""Property tests of the passes on Swin-style window attention layouts (hypothesis).

An example is one Swin block's data movement, as the torch exporters spell it, on a [B, H, W, C] map: a window
padding whose size is computed from the input's Shape ((ws - H % ws) % ws, a chain canonicalize must fold to the
end), an optional cyclic shift spelled as Slice + Concat on both spatial axes (torch.roll), the window partition
(Reshape [B, H/ws, ws, W/ws, ws, C] -> Transpose -> Reshape [B*nW, ws*ws, C]), a linear on the windows (MatMul +
bias), the window reverse, the inverse shift, the crop back to H x W, a residual Add and a LayerNorm. Sizes, window,
shift and channel counts are drawn.

For every example: the float pipeline, then the ORT layout pass ``sink_reshapes``, then ``dynamic_batch`` must keep
the fp32 outputs; the result must take batch 3 with per-sample outputs equal to batch 1; no pass may raise.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

import pytest
from conftest import ort_run
from vitc.compiler.driver.pipeline import PipelineConfig, export, float_pipeline, run_passes
from vitc.passes.dynamic_batch import DynamicBatch
from vitc.passes.sink_reshapes import ReshapeSinking

FUZZ = settings(max_examples=int(os.environ.get("VITC_FUZZ_EXAMPLES", "40")), deadline=None, database=None,
                derandomize=not os.environ.get("VITC_FUZZ_RANDOM"), print_blob=False,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def hypothesis_home(tmp_path_factory):
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


def _window_block(hh: int, ww: int, ws: int, shift: int, c: int, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, v):
        inits.append(nh.from_array(np.asarray(v), name))
        return name

    def node(op, ins, out, **attrs):
        nodes.append(h.make_node(op, ins, [out], name=out, **attrs))
        return out

    x = "x"
    # padding to a multiple of the window, its size computed at run time from the shape (as exported)
    ws_c = const("ws", np.array([ws], np.int64))
    hw = node("Shape", [x], "hw", start=1, end=3)
    rem = node("Mod", [hw, ws_c], "rem")
    pad = node("Mod", [node("Sub", [ws_c, rem], "sub"), ws_c], "pad")  # [pad_h, pad_w]
    ends = node("Concat", [const("z1", np.zeros(1, np.int64)), pad, const("z1b", np.zeros(1, np.int64))], "ends",
                axis=0)
    pads = node("Concat", [const("z4", np.zeros(4, np.int64)), ends], "pads", axis=0)
    y = node("Pad", [x, pads], "padded")
    ph, pw = -(-hh // ws) * ws, -(-ww // ws) * ws
    if shift:  # torch.roll(y, (-shift, -shift), (1, 2)) as Slice + Concat per axis
        for ax, n in ((1, ph), (2, pw)):
            a = node("Slice", [y, const(f"s{ax}a", [shift]), const(f"e{ax}a", [n]), const(f"x{ax}a", [ax])],
                     f"roll{ax}a")
            b = node("Slice", [y, const(f"s{ax}b", [0]), const(f"e{ax}b", [shift]), const(f"x{ax}b", [ax])],
                     f"roll{ax}b")
            y = node("Concat", [a, b], f"roll{ax}", axis=ax)
    nh_, nw_ = ph // ws, pw // ws
    y = node("Reshape", [y, const("p1", np.array([1, nh_, ws, nw_, ws, c], np.int64))], "part1")
    y = node("Transpose", [y], "part2", perm=[0, 1, 3, 2, 4, 5])
    y = node("Reshape", [y, const("p3", np.array([nh_ * nw_, ws * ws, c], np.int64))], "windows")
    w = const("w", (rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32))
    y = node("Add", [node("MatMul", [y, w], "mm"), const("bias", rng.standard_normal(c).astype(np.float32))], "lin")
    y = node("Reshape", [y, const("r1", np.array([1, nh_, nw_, ws, ws, c], np.int64))], "rev1")
    y = node("Transpose", [y], "rev2", perm=[0, 1, 3, 2, 4, 5])
    y = node("Reshape", [y, const("r3", np.array([1, ph, pw, c], np.int64))], "rev3")
    if shift:
        for ax, n in ((1, ph), (2, pw)):
            a = node("Slice", [y, const(f"s{ax}c", [n - shift]), const(f"e{ax}c", [n]), const(f"x{ax}c", [ax])],
                     f"unroll{ax}a")
            b = node("Slice", [y, const(f"s{ax}d", [0]), const(f"e{ax}d", [n - shift]), const(f"x{ax}d", [ax])],
                     f"unroll{ax}b")
            y = node("Concat", [a, b], f"unroll{ax}", axis=ax)
    y = node("Slice", [y, const("cs", [0, 0]), const("ce", [hh, ww]), const("ca", [1, 2])], "crop")
    y = node("Add", ["x", y], "res")
    node("LayerNormalization", [y, const("g", np.ones(c, np.float32)), const("bt", np.zeros(c, np.float32))], "y")
    g = h.make_graph(nodes, "window_block", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hh, ww, c])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hh, ww, c])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@st.composite
def windows(draw):
    ws = draw(st.sampled_from([2, 3, 4]))
    hh = draw(st.integers(ws, 3 * ws + 2))
    ww = draw(st.integers(ws, 3 * ws + 2))
    shift = draw(st.integers(0, ws - 1)) if min(hh, ww) > ws else 0
    return hh, ww, ws, shift, draw(st.sampled_from([4, 8])), draw(st.integers(0, 1000))


@FUZZ
@given(case=windows())
def test_window_layouts_keep_outputs_and_take_any_batch(case):
    hh, ww, ws, shift, c, seed = case
    source = _window_block(*case)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(source)
    for t in list(fixed.graph.input) + list(fixed.graph.output):
        t.type.tensor_type.shape.dim[0].dim_value = 1  # what the loader does: batch fixed to 1
    fixed = onnx.shape_inference.infer_shapes(fixed)
    g = gs.import_onnx(fixed)
    run_passes(g, [*float_pipeline(PipelineConfig()), ReshapeSinking(), DynamicBatch({"x": "batch"})])
    model = export(g)
    onnx.checker.check_model(model)
    x = np.random.default_rng(seed).standard_normal((3, hh, ww, c)).astype(np.float32)
    # the source spells its reshapes for batch 1 (as a batch-1 export does): its reference runs sample by sample
    ref = np.concatenate([ort_run(source, {"x": x[i:i + 1]}, optimize=False)[0] for i in range(len(x))])
    got = ort_run(model, {"x": x[:1]})[0]
    np.testing.assert_allclose(got, ref[:1], rtol=1e-4, atol=1e-4)
    assert not any(n.op in ("Shape", "Mod", "Sub") for n in g.nodes)  # the padding chain folded away
    assert sum(n.op == "Pad" for n in g.nodes) == int(bool(hh % ws or ww % ws))  # a zero Pad is gone
    many = ort_run(model, {"x": x})[0]  # any batch: per-sample equal to the source
    np.testing.assert_allclose(many, ref, rtol=1e-4, atol=1e-4)
