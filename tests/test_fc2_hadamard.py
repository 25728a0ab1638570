"""The Hadamard before fc2 (passes/fc2_hadamard.py): exact in float, fc2 keeps its role and its int8 input, the
Hadamard MatMul stays float, widths it cannot split are left as they are with a note, and the TensorRT default
has it."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import cli, fused, ort_run, photo_sqnr_db

from vitc.compiler.driver.pipeline import Target, export, run_passes
from vitc.compiler.quant.planner import is_rewrite_part
from vitc.passes.annotate import annotate
from vitc.passes.fc2_hadamard import Fc2Hadamard, hadamard_block
from vitc.passes.graphutil import HADAMARD_SUFFIX
from vitc.runtimes.ort import kernel_census
from vitc.tools.tiny_models import TinyConfig, tiny_vit


@pytest.mark.parametrize("b", [2, 16, 64])
def test_block_is_orthogonal_signed_and_seeded(b):
    r = hadamard_block(b, seed=4)
    assert np.allclose(r @ r.T, np.eye(b), atol=1e-12)
    assert np.allclose(np.abs(r), 1 / np.sqrt(b))
    assert np.array_equal(r, hadamard_block(b, seed=4))
    assert b < 16 or not np.array_equal(r, hadamard_block(b, seed=5))


@pytest.mark.parametrize("b", [0, 1, 12, -4])
def test_block_must_be_a_power_of_two(b):
    with pytest.raises(ValueError, match="power of two"):
        hadamard_block(b, 0)
    with pytest.raises(ValueError, match="Hadamard block size"):
        Fc2Hadamard(4 if b == 0 else b)


@pytest.mark.parametrize("cfg,block", [(TinyConfig(depth=2, dim=32), 16), (TinyConfig(depth=3, dim=64, gelu="tanh"), 64),
                                       (TinyConfig(depth=2, dim=32, mlp_ratio=3), 32)])
def test_hadamard_keeps_the_float_outputs_and_the_roles(cfg, block, tmp_path):
    src = tiny_vit(cfg)
    g = fused(tmp_path, src)
    before = export(g.copy(), src)
    roles_before = {k: v.role for k, v in annotate(g).items()}
    res = run_passes(g, [Fc2Hadamard(block, seed=2)], quiet=True)[0]
    assert res.counts["fc2 inputs rotated"] == cfg.depth and res.counts["fc2 left as is"] == 0, res.notes
    after = export(g, src)
    name = src.graph.input[0].name
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
        a, b = ort_run(before, {name: x}, optimize=False)[0], ort_run(after, {name: x}, optimize=False)[0]
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max()), np.abs(a - b).max()
    roles_after = annotate(g)
    had = [n for n in g.nodes if n.name.endswith(HADAMARD_SUFFIX)]
    assert len(had) == cfg.depth and all(roles_after[n.name].role == "hadamard" for n in had)
    assert {k: v.role for k, v in roles_after.items() if k in roles_before} == roles_before  # fc2 is still fc2
    n_nodes = len(g.nodes)
    again = Fc2Hadamard(block, seed=2).run(g)  # a second run finds every fc2 rotated and leaves the graph alone
    assert not again.modified and len(g.nodes) == n_nodes and again.counts["fc2 left as is"] == cfg.depth
    assert all("already rotated" in n for n in again.notes)


def test_width_not_a_multiple_of_the_block_takes_a_smaller_block(tmp_path):
    src = tiny_vit(TinyConfig(depth=2, dim=32, mlp_ratio=3))  # fc2 input width 96 = 3 x 32
    g = fused(tmp_path, src)
    before = export(g.copy(), src)
    res = Fc2Hadamard(64).run(g)
    assert res.counts["fc2 inputs rotated"] == 2 and res.counts["with a smaller block"] == 2
    assert sum("block 32 (its input width is not a multiple of 64)" in n for n in res.notes) == 2
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    name = src.graph.input[0].name
    a, b = ort_run(before, {name: x}, optimize=False)[0], ort_run(export(g, src), {name: x}, optimize=False)[0]
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())


def test_width_without_a_block_stays_as_is(tmp_path):
    g = fused(tmp_path, tiny_vit(TinyConfig(depth=2, dim=36, heads=2, mlp_ratio=1)))  # fc2 input width 36 = 4 x 9
    consts = {id(t): t.values.copy() for t in g.tensors().values() if isinstance(t, gs.Constant)}
    n_nodes = len(g.nodes)
    res = Fc2Hadamard(64).run(g)
    assert not res.modified and res.counts["fc2 left as is"] == 2 and len(g.nodes) == n_nodes
    assert all("no power-of-two block >= 8 dividing it" in note for note in res.notes)
    assert all(np.array_equal(t.values, consts[id(t)]) for t in g.tensors().values()
               if isinstance(t, gs.Constant) and id(t) in consts)


def test_build_keeps_the_hadamard_float_and_fc2_int8(tmp_path, capsys, vit_path):
    rc, _, err = cli(capsys, "build", vit_path, "-o", tmp_path / "o", "--fc2-hadamard", "16", "--calib-samples", "8")
    assert rc == 0, err
    rep = json.loads((tmp_path / "o" / "build.json").read_text())
    had = next(p for p in rep["passes"] if p["pass"] == "fc2_hadamard")
    assert had["counts"]["fc2 inputs rotated"] == 2 and "block 16, seed 0" in had["notes"]
    assert rep["float_check"]["max_abs_diff_relative"] < 1e-4
    fl = [f for f in rep["float_ops"] if f["node"].endswith(HADAMARD_SUFFIX)]
    assert len(fl) == 2 and all("Hadamard" in f["why"] for f in fl)
    nodes = {n["node"]: n for n in rep["policy"]["nodes"]}
    assert not any(k.endswith(HADAMARD_SUFFIX) for k in nodes)
    fc2 = [n for n in nodes.values() if n["role"] == "fc2"]
    assert len(fc2) == 2 and all(n["quant"].startswith("int8") and n["activations"][0].startswith(n["node"] + ".hadamard")
                                 for n in fc2)
    m = onnx.load(tmp_path / "o" / "model.int8.onnx")
    prod = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:  # the Hadamard reads GELU's float output, not a dequantized tensor
        if n.name.endswith(HADAMARD_SUFFIX):
            assert prod[n.input[0]].op_type != "DequantizeLinear"
    assert photo_sqnr_db(onnx.load(vit_path), m) > 20
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)  # the Reshapes keep any batch
    assert ort_run(m, {m.graph.input[0].name: x})[0].shape[0] == 3
    # ORT runs every model linear in int8; the census counts the Hadamards apart
    census = kernel_census(str(tmp_path / "o" / "model.int8.onnx"), {m.graph.input[0].name: x[:1]},
                           exclude=is_rewrite_part)
    plain = kernel_census(str(tmp_path / "o" / "model.int8.onnx"), {m.graph.input[0].name: x[:1]})
    assert census["excluded_macs"] > 0 and census["float_macs"] == plain["float_macs"] - census["excluded_macs"]
    assert not any(n.endswith(HADAMARD_SUFFIX) for n, _, _ in census["float_nodes"])


def test_target_defaults(tmp_path, capsys, vit_path):
    from vitc.compiler.driver.frontend import front_end

    for target, rotated in ((Target.TRT, 2), (Target.ORT, 2), (Target.OPENVINO, None)):
        fe = front_end(vit_path, target)
        res = next((r for r in fe.float_passes if r.name == "fc2_hadamard"), None)
        assert (res.counts["fc2 inputs rotated"] if res else None) == rotated
    assert not any(r.name == "fc2_hadamard" for r in front_end(vit_path, Target.ORT, fc2_hadamard=0).float_passes)
    for bad in ("12", "4"):
        with pytest.raises(SystemExit) as e:
            cli(capsys, "build", vit_path, "-o", tmp_path / "o", "--fc2-hadamard", bad)
        assert e.value.code == 2 and "power of two >= 8" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_gemm_with_transposed_weight_and_matmul_on_3d_input(op, tmp_path):
    """fc1 -> ReLU -> fc2 as Gemms with transB=1 (weights stored [N, K], as some exporters write them) on a 2-D input,
    or as MatMuls without bias on a 3-D input (the split Reshape copies two leading dims)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    w1, w2 = rng.standard_normal((64, 16)).astype(np.float32), rng.standard_normal((8, 64)).astype(np.float32)
    b1, b2 = rng.standard_normal(64).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    if op == "MatMul":
        w1, w2 = w1.T.copy(), w2.T.copy()
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    lin = ((lambda i, w, b, o, n: helper.make_node("Gemm", [i, w, b], [o], n, transB=1)) if op == "Gemm" else
           (lambda i, w, b, o, n: helper.make_node("MatMul", [i, w], [o], n)))
    shape_in, shape_out = ([5, 16], [5, 8]) if op == "Gemm" else ([2, 5, 16], [2, 5, 8])
    g = helper.make_graph([lin("x", "w1", "b1", "h", "fc1"), helper.make_node("Relu", ["h"], ["a"], "act"),
                           lin("a", "w2", "b2", "y", "fc2")], "mlp",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)],
                          inits if op == "Gemm" else inits[0:1] + inits[2:3])
    m = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    graph = gs.import_onnx(m)
    assert annotate(graph)["fc2"].role == "fc2"
    res = Fc2Hadamard(16, seed=1).run(graph)
    assert res.counts["fc2 inputs rotated"] == 1, res.notes
    after = gs.export_onnx(graph)
    x = rng.standard_normal(shape_in).astype(np.float32)
    a, b = ort_run(m, {"x": x}, optimize=False)[0], ort_run(after, {"x": x}, optimize=False)[0]
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())
    assert not np.allclose(onnx.numpy_helper.to_array(next(i for i in after.graph.initializer if "folded" in i.name)), w2)
