"""Hardening: untrusted and damaged inputs, interrupted and failing builds, the external-data save path.

Bad input fails with one ``vitc: error:`` line, exit code 2 (3 for a failing pass), and leaves no OUTDIR and no
temporary folder; an interrupted build (Ctrl-C) leaves nothing either; ``--keep-temp`` keeps the temporary folder of
a failed build for debugging. The property tests of the passes are in test_fuzz_passes.py.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli, fused_and_annotated, ort_run
from test_cli import FAST, build_fails, leftovers

import vitc
from vitc.compiler.driver import build as build_mod
from vitc.compiler.driver.build import BuildConfig, CalibConfig, build
from vitc.compiler.errors import ModelLoadError
from vitc.compiler.driver.loader import MAX_PROTO_BYTES, load_model
from vitc.passes.fuse_gelu import GeluFusion
from vitc.passes.fuse_layernorm import LayerNormFusion
from vitc.tools.tiny_models import tiny_vit


# -- damaged and oversized model files ---------------------------------------------------------------------------------
def test_file_over_protobuf_limit_refused_without_reading_it(capsys, tmp_path, monkeypatch):
    p = tmp_path / "huge.onnx"
    with open(p, "wb") as f:  # sparse: no disk space, no memory
        f.truncate(MAX_PROTO_BYTES + 1)

    def never(*args, **kwargs):
        raise AssertionError("the oversized file was read")

    monkeypatch.setattr(onnx, "load", never)
    build_fails(capsys, p, tmp_path / "out", needles=("huge.onnx", f"{MAX_PROTO_BYTES + 1} bytes",
                                                      "over the 2 GiB protobuf limit", "external data"))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_deeply_nested_protobuf_refused(capsys, tmp_path):
    # ModelProto.graph(7) -> GraphProto.node(1) -> NodeProto.attribute(5) -> AttributeProto.g(6) -> ..., 300 deep:
    # a few kB that would exhaust a recursive parser; protobuf's depth limit stops it and vitc says so
    graph = b""
    for _ in range(300):
        graph = _field(1, _field(5, _field(6, graph)))
    p = tmp_path / "nested.onnx"
    p.write_bytes(_field(7, graph))
    build_fails(capsys, p, tmp_path / "out", needles=("nested.onnx", "not a readable ONNX model"))


@pytest.mark.parametrize("dims", [[31, 3, 8, 8], [100000, 100000]])
def test_initializer_shape_and_data_disagree(dims, capsys, tmp_path):
    # a damaged or hand-edited file: ONNX Runtime would refuse it deep inside the build, with a trace
    m = tiny_vit()
    t = next(t for t in m.graph.initializer if len(t.dims) == 4)
    del t.dims[:]
    t.dims.extend(dims)
    p = tmp_path / "damaged.onnx"
    onnx.save(m, p)
    build_fails(capsys, p, tmp_path / "out", needles=("damaged.onnx", f"tensor {t.name!r} declares shape {dims}",
                                                      "but holds 24576 bytes"))


def test_constant_node_value_with_too_few_values(tmp_path):
    m = tiny_vit()
    value = onnx.helper.make_tensor("v", onnx.TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    value.dims[0] = 5
    m.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["unused_c"], value=value))
    p = tmp_path / "const.onnx"
    onnx.save(m, p)
    with pytest.raises(ModelLoadError, match=r"const.onnx: tensor 'v' declares shape \[5\] \(5 values\) but holds 4 "
                                             r"values; the file is damaged"):
        load_model(p)


def test_unnamed_nodes_are_named_before_planning(tmp_path):
    """Hand-built graphs often leave node names empty; roles, plans and build.json are keyed by node name."""
    def planned(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
        g, roles = fused_and_annotated(tmp_path, model)
        return sorted(r.role for r in roles.values()), [n.name for n in g.nodes]

    unnamed = tiny_vit()
    for node in unnamed.graph.node:
        node.name = ""
    roles, names = planned(unnamed)
    assert roles == planned(tiny_vit())[0]
    assert len(set(names)) == len(names) and "" not in names


def test_repeated_node_names_refused(capsys, tmp_path):
    m = tiny_vit()
    for node in m.graph.node:
        node.name = "n"
    p = tmp_path / "dup.onnx"
    onnx.save(m, p)
    build_fails(capsys, p, tmp_path / "out", needles=("dup.onnx: ONNX Runtime cannot load the model",
                                                      "two nodes with same node name (n)"))


def test_external_data_length_beyond_the_file(capsys, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(tiny_vit(), folder / "src.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.data", size_threshold=0)
    m = onnx.load(folder / "src.onnx", load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "length":
            e.value = str(10**12)
    onnx.save(m, folder / "long.onnx")
    build_fails(capsys, folder / "long.onnx", tmp_path / "out", needles=("long.onnx", "cannot read its external data",
                                                                          "exceeds available data"))


# -- checkpoints for `vitc export` -------------------------------------------------------------------------------------
def test_safetensors_checkpoint_loads(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    from vitc.compiler.cli.export import load_checkpoint

    p = tmp_path / "w.safetensors"
    st.save_file({"head.weight": torch.ones(2, 3), "head.bias": torch.zeros(2)}, str(p))
    state = load_checkpoint(p)
    assert sorted(state) == ["head.bias", "head.weight"] and state["head.weight"].shape == (2, 3)


@pytest.mark.parametrize("kind", ["garbage.safetensors", "tensor.pth"])
def test_unusable_checkpoint_refused(kind, capsys, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    pytest.importorskip("safetensors")
    p = tmp_path / kind
    if kind.endswith(".safetensors"):
        p.write_bytes(b"\xff" * 64)
        needle = "not a readable .safetensors file"
    else:
        torch.save(torch.zeros(3), p)  # weights-only loadable, but no state dict
        needle = "holds a Tensor, not a state dict of tensors"
    out = tmp_path / "m.onnx"
    rc, stdout, err = cli(capsys, "export", "deit_tiny_patch16_224", "-o", out, "--checkpoint", p)
    assert rc == 2 and stdout == "" and "Traceback" not in err
    assert err.strip().splitlines() == [ln for ln in err.strip().splitlines() if ln.startswith("vitc: error:")]
    assert kind in err and needle in err and not out.exists()


# -- no code execution on input paths ----------------------------------------------------------------------------------
_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"import {n}" for n in names if n.split(".")[0] in _UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        kw = {k.arg: k.value for k in node.keywords}
        if isinstance(f, ast.Name) and f.id in ("eval", "exec", "__import__"):
            found.append(f"{f.id}()")
        elif isinstance(f, ast.Attribute):
            owner = f.value.id if isinstance(f.value, ast.Name) else ""
            if f.attr in ("read_pickle", "unsafe_load") or (owner == "yaml" and f.attr == "load"):
                found.append(f"{owner}.{f.attr}()")
            elif owner == "torch" and f.attr == "load" and not (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                found.append("torch.load() without weights_only=True")
            elif owner in ("np", "numpy") and f.attr == "load" and not (
                    isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                found.append("np.load() without allow_pickle=False")
    return found


def test_no_eval_or_pickle_in_the_package():
    root = Path(vitc.__file__).parent
    # the package's own modules (the repository root is the package: a .venv or build folder beside them is not)
    sources = list(root.glob("*.py")) + [p for sub in ("compiler", "passes", "runtimes", "tools")
                                         for p in (root / sub).rglob("*.py")]
    assert len(sources) > 20
    bad = {str(p.relative_to(root)): calls for p in sources if (calls := _unsafe_calls(ast.parse(p.read_text())))}
    assert bad == {}


def test_unsafe_call_scan_finds_what_it_looks_for():
    code = ("import pickle\nx = eval('1')\nimport torch\ntorch.load('a')\nimport numpy as np\nnp.load('b')\n"
            "torch.load('c', weights_only=True)\nnp.load('d', allow_pickle=False)\nmodel.eval()\n")
    assert _unsafe_calls(ast.parse(code)) == ["import pickle", "eval()", "torch.load() without weights_only=True",
                                              "np.load() without allow_pickle=False"]


# -- interrupted and failing builds ------------------------------------------------------------------------------------
def _raise(exc: BaseException):
    def run(*args, **kwargs):
        raise exc
    return run


@pytest.mark.parametrize("where", ["pass", "calibration", "save"])
def test_ctrl_c_leaves_no_outdir_and_no_temp_folder(where, capsys, tmp_path, vit_path, monkeypatch):
    if where == "pass":
        monkeypatch.setattr(LayerNormFusion, "run", _raise(KeyboardInterrupt()))
    elif where == "calibration":
        monkeypatch.setattr(build_mod, "calibrate", _raise(KeyboardInterrupt()))
    else:
        monkeypatch.setattr(build_mod, "save_model", _raise(KeyboardInterrupt()))
    out = tmp_path / "new" / "out"
    rc, stdout, err = cli(capsys, "--log-level", "warning", "build", vit_path, "-o", out, *FAST)
    assert rc == 130 and stdout == "" and err.strip() == "vitc: interrupted"
    assert not (tmp_path / "new").exists(), "OUTDIR, its temporary folder and the parents it made are gone"


def test_ctrl_c_during_export_leaves_no_temp_file(capsys, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    monkeypatch.setattr(torch.onnx, "export", _raise(KeyboardInterrupt()))
    rc, _, err = cli(capsys, "export", "deit_tiny_patch16_224", "-o", tmp_path / "exp" / "m.onnx")
    assert rc == 130 and "interrupted" in err
    assert os.listdir(tmp_path / "exp") == []


def test_crash_mid_build_leaves_nothing(tmp_path, vit_path, monkeypatch):
    monkeypatch.setattr(build_mod, "calibrate", _raise(MemoryError()))
    with pytest.raises(MemoryError):
        build(BuildConfig(model=vit_path, outdir=tmp_path / "out", calib=CalibConfig(samples=4), show_progress=False))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failing_pass_names_itself_and_the_node(capsys, tmp_path, vit_path, monkeypatch):
    monkeypatch.setattr(GeluFusion, "_match_erf", _raise(ValueError("unexpected input")))
    line, _ = build_fails(capsys, vit_path, tmp_path / "out", code=3,
                          needles=("ValueError: unexpected input", "--dump-after"))
    assert re.match(r"vitc: error: pass fuse_gelu, node '/b0_gelu_erf_\d+/Erf': ValueError", line), line


def test_keep_temp_keeps_the_failed_build_folder(capsys, tmp_path, vit_path, monkeypatch):
    monkeypatch.setattr(GeluFusion, "run", _raise(ValueError("unexpected input")))
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "--log-level", "warning", "build", vit_path, "-o", out, "--keep-temp",
                     "--dump-after", "all", *FAST)
    assert rc == 3 and not out.exists()
    kept = leftovers(tmp_path)
    assert len(kept) == 1 and f"temporary folder is kept: {tmp_path / kept[0]}" in err
    assert err.strip().splitlines()[-1].startswith("vitc: error: pass fuse_gelu:")
    dumps = sorted(os.listdir(tmp_path / kept[0] / "dumps"))
    assert dumps == ["after_01_canonicalize.onnx", "after_02_fuse_layernorm.onnx"]  # up to the failing pass
    onnx.checker.check_model(str(tmp_path / kept[0] / "dumps" / dumps[-1]))


def test_keep_temp_changes_nothing_on_success(capsys, tmp_path, vit_path):
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "build", vit_path, "-o", out, "--keep-temp", *FAST)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["build.json", "model.int8.onnx"] and leftovers(tmp_path) == []
    assert "kept" not in err


def test_dump_after_one_pass(capsys, tmp_path, vit_path, image_batch):
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "build", vit_path, "-o", out, "--dump-after", "fuse_gelu", *FAST)
    assert rc == 0, err
    assert os.listdir(out / "dumps") == ["after_03_fuse_gelu.onnx"]
    dumped = onnx.load(out / "dumps" / "after_03_fuse_gelu.onnx")
    ops = {n.op_type for n in dumped.graph.node}
    assert "Gelu" in ops and "Erf" not in ops and "LayerNormalization" in ops and "Gemm" not in ops
    np.testing.assert_allclose(ort_run(dumped, {"input": image_batch})[0],
                               ort_run(vit_path, {"input": image_batch})[0], rtol=1e-4, atol=1e-5)


def test_dump_after_unknown_pass(capsys, tmp_path, vit_path):
    build_fails(capsys, vit_path, tmp_path / "out", "--dump-after", "fuse_gleu",
                needles=("--dump-after: unknown pass 'fuse_gleu'", "choose from all, canonicalize, fuse_layernorm"))


# -- models saved with external data (> 2 GB) --------------------------------------------------------------------------
def test_external_data_save_path(capsys, tmp_path, vit_path, image_batch, monkeypatch):
    """The path a > 2 GB model takes, on a tiny one: weights in model.int8.onnx.data, loads and runs in ORT, and
    vitc's own loader (external-data confinement) accepts the result."""
    ref_out = tmp_path / "inline"
    assert cli(capsys, "build", vit_path, "-o", ref_out, *FAST)[0] == 0
    monkeypatch.setattr(build_mod, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "external"
    rc, _, err = cli(capsys, "build", vit_path, "-o", out, *FAST)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["build.json", "model.int8.onnx", "model.int8.onnx.data"]
    model_bytes = (out / "model.int8.onnx").stat().st_size
    assert (out / "model.int8.onnx.data").stat().st_size > model_bytes, "the weights are in the .data file"
    np.testing.assert_array_equal(ort_run(out / "model.int8.onnx", {"input": image_batch})[0],
                                  ort_run(ref_out / "model.int8.onnx", {"input": image_batch})[0])
    lm = load_model(out / "model.int8.onnx")
    assert lm.input_names == ["input"] and lm.output_names == ["logits"]


def test_model_over_the_protobuf_limit_path(capsys, tmp_path, image_batch, monkeypatch):
    """What a model over 2 GiB goes through (shape inference without the weights' data, ONNX Runtime sessions from
    files with external data, piecewise digest, external-data output), on tiny_vit with the limits set to 0 bytes
    (shape constants, under 1 kB, keep their data as in a real model)
    tools/measure_rss.py --over-2gb runs the real thing (a 2.4 GB weight)."""
    from vitc.passes import graphutil

    src = tmp_path / "src"
    src.mkdir()
    onnx.save(tiny_vit(), src / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    assert cli(capsys, "build", src / "m.onnx", "-o", tmp_path / "small", *FAST)[0] == 0
    monkeypatch.setattr(graphutil, "PROTOBUF_LIMIT", 0)
    monkeypatch.setattr(build_mod, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(graphutil, "LARGE_TENSOR_BYTES", 1024)
    inferred = []
    real_infer = onnx.shape_inference.infer_shapes

    def spy(model, *args, **kwargs):
        inferred.append(max(len(t.raw_data) for t in model.graph.initializer))
        return real_infer(model, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    out = tmp_path / "big"
    rc, _, err = cli(capsys, "build", src / "m.onnx", "-o", out, *FAST)
    assert rc == 0, err
    assert inferred and max(inferred) <= 1024, "shape inference never saw the weights' data"
    assert sorted(os.listdir(out)) == ["build.json", "model.int8.onnx", "model.int8.onnx.data"]
    assert leftovers(tmp_path) == [] and not any(p.name.startswith("session-") for p in out.iterdir())
    np.testing.assert_array_equal(ort_run(out / "model.int8.onnx", {"input": image_batch})[0],
                                  ort_run(tmp_path / "small" / "model.int8.onnx", {"input": image_batch})[0])
