"""What vitc does not quantize stays float, is listed with the reason, and a model with nothing to quantize is
refused unless --allow-float."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from conftest import cli

from vitc.passes.graphutil import HADAMARD_SUFFIX


def _cnn(path):
    w = nh.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    g = h.make_graph([h.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                      h.make_node("Relu", ["c"], ["y"])], "cnn",
                     [h.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 32, 32])], [w])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), path)
    return path


def test_nothing_to_quantize_is_one_line_exit_2_and_no_outdir(tmp_path, capsys):
    model = _cnn(tmp_path / "cnn.onnx")
    rc, out, err = cli(capsys, "build", model, "-o", tmp_path / "out", "--calib-samples", "2")
    assert rc == 2 and not (tmp_path / "out").exists()
    line = [ln for ln in err.splitlines() if ln.startswith("vitc: error")]
    assert len(line) == 1 and "nothing to quantize" in line[0] and "--allow-float" in line[0], err
    assert "conv-float-on-ort" in line[0]  # names what kept it float


def test_allow_float_writes_the_float_model(tmp_path, capsys):
    model = _cnn(tmp_path / "cnn.onnx")
    rc, out, err = cli(capsys, "build", model, "-o", tmp_path / "out", "--calib-samples", "2", "--allow-float")
    assert rc == 0, err
    rep = json.loads((tmp_path / "out" / "build.json").read_text())
    assert [(f["node"], f["op"], f["why"]) for f in rep["float_ops"]] == [("conv", "Conv",
                                                                           "policy rule 'conv-float-on-ort'")]


def test_build_json_lists_float_weighted_ops_with_reasons(tmp_path, vit_path, capsys):
    rc, out, err = cli(capsys, "build", vit_path, "-o", tmp_path / "out", "--calib-samples", "2")
    assert rc == 0, err
    rep = json.loads((tmp_path / "out" / "build.json").read_text())
    whys = {f["node"]: f["why"] for f in rep["float_ops"] if not f["node"].endswith(HADAMARD_SUFFIX)}
    assert whys and all(w.startswith("policy rule") for w in whys.values()), whys  # tiny_vit: all recognised
    kept_float = {n["node"] for n in rep["policy"]["nodes"] if n["rule"] in {w[13:-1] for w in whys.values()}}
    assert set(whys) <= kept_float


def test_all_zero_weight_stays_float_with_its_reason(tmp_path, vit_path, capsys):
    """A linear whose weight is all zeros (a zero-initialised branch) has nothing to quantize: it stays float, and
    build.json says why; the rest of the model is quantized as before."""
    m = onnx.load(vit_path)
    fc2 = next(n for n in m.graph.node if n.op_type == "MatMul" and "fc2" in n.name)
    w = next(t for t in m.graph.initializer if t.name == fc2.input[1])
    w.CopyFrom(nh.from_array(np.zeros_like(nh.to_array(w)), w.name))
    src = tmp_path / "zero.onnx"
    onnx.save(m, src)
    rc, _, err = cli(capsys, "build", src, "-o", tmp_path / "out", "--calib-samples", "2")
    assert rc == 0, err
    rep = json.loads((tmp_path / "out" / "build.json").read_text())
    zero = [f for f in rep["float_ops"] if f["why"].startswith("all-zero weight")]
    assert len(zero) == 1 and "fc2" in zero[0]["node"], rep["float_ops"]
    assert len(rep["policy"]["nodes"]) > 4
