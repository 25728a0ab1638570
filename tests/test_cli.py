"""The `vitc` command line: bad input gives one error line, exit 2 and no partial output; good input builds.

Everything runs in-process through ``vitc.compiler.cli.main.main`` (one subprocess test covers the console script).
Every test runs with an empty current directory and checks it is still empty afterwards.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import cli, cli_in_empty_cwd

from vitc.compiler.cli.main import main
from vitc.tools.tiny_models import TinyConfig, tiny_vit

FAST = ["--calib-samples", "4"]




def leftovers(parent: Path) -> list[str]:
    """Temporary build folders (.NAME.vitc-tmp-*) left in ``parent``."""
    if not parent.exists():
        return []
    return sorted(p.name for p in parent.iterdir() if ".vitc-tmp-" in p.name)


def assert_refused(rc, err, outdir: Path, *needles: str, code: int = 2) -> str:
    """Exit ``code``, exactly one error line on stderr naming ``needles``, no OUTDIR and no temp folder."""
    assert rc == code, err
    errors = [ln for ln in err.splitlines() if ln.startswith("vitc: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    assert not outdir.exists()
    assert leftovers(outdir.parent) == []
    return errors[0]


def build_fails(capsys, model, outdir, *extra, needles=(), code=2):
    rc, out, err = cli(capsys, "--log-level", "warning", "build", model, "-o", outdir, *FAST, *extra)
    assert out == ""
    line = assert_refused(rc, err, outdir, *needles, code=code)
    assert err.strip().splitlines()[-1] == line
    return line, err


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def ort_session(path: Path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# -- bad model files ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["random", "text", "truncated", "empty", "missing", "folder"])
def test_bad_model_file(kind, capsys, tmp_path, vit_path):
    p = tmp_path / f"{kind}.onnx"
    if kind == "random":
        p.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "text":
        p.write_text("name,score\nvit,0.9\n" * 50)
    elif kind == "truncated":
        data = vit_path.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "folder":
        p.mkdir()
    expect = {"random": "not a readable ONNX model", "text": "not a readable ONNX model",
              "truncated": "not a readable ONNX model", "empty": "not an ONNX model",
              "missing": "no such file", "folder": "is a folder"}[kind]
    build_fails(capsys, p, tmp_path / "out", needles=(f"{kind}.onnx", expect))


def test_missing_model_in_new_parent_creates_nothing(capsys, tmp_path):
    build_fails(capsys, tmp_path / "nope.onnx", tmp_path / "new" / "deep" / "out", needles=("nope.onnx",))
    assert not (tmp_path / "new").exists()


def test_late_failure_in_new_parent_creates_nothing(capsys, tmp_path, vit_path):
    # fails in calibration, after build() made the parent folders: they are removed again
    folder = tmp_path / "imgs"
    folder.mkdir()
    build_fails(capsys, vit_path, tmp_path / "new" / "deep" / "out", "--calib", folder,
                needles=("imgs", "no image files"))
    assert not (tmp_path / "new").exists()


def test_opset_12(capsys, tmp_path):
    p = tmp_path / "old.onnx"
    onnx.save(tiny_vit(TinyConfig(opset=12)), p)
    build_fails(capsys, p, tmp_path / "out", needles=("old.onnx", "opset 12 is not supported", "re-export"))


# -- external data -----------------------------------------------------------------------------------------------------
def _external(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "m.onnx"
    onnx.save(tiny_vit(), p, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    return p


def _relocated(src: Path, dst: Path, location: str) -> Path:
    m = onnx.load(src, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, dst)
    return dst


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_external_data_outside_model_folder(how, capsys, tmp_path):
    src = _external(tmp_path / "a")
    b = tmp_path / "b"
    b.mkdir()
    if how == "absolute":
        loc = str(tmp_path / "a" / "m.data")
    elif how == "dotdot":
        loc = "../a/m.data"
    else:
        loc = "w.data"
        os.symlink(tmp_path / "a" / "m.data", b / "w.data")
    p = _relocated(src, b / f"{how}.onnx", loc)
    build_fails(capsys, p, tmp_path / "out", needles=(f"{how}.onnx", repr(loc), "outside the model folder"))


def test_external_data_next_to_model_builds(capsys, tmp_path):
    p = _external(tmp_path / "a")
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "build", p, "-o", out, *FAST)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["build.json", "model.int8.onnx"]
    assert ort_session(out / "model.int8.onnx").get_inputs()[0].name == "input"


# -- calibration images ------------------------------------------------------------------------------------------------
def test_empty_image_folder(capsys, tmp_path, vit_path):
    (tmp_path / "imgs").mkdir()
    build_fails(capsys, vit_path, tmp_path / "out", "--calib", tmp_path / "imgs",
                needles=("imgs", "no image files in the calibration folder"))


def test_image_folder_with_one_undecodable_file(capsys, caplog, tmp_path, vit_path):
    folder = write_images(tmp_path / "imgs", 4)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "build", vit_path, "-o", out, "--calib", folder, *FAST)
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if "broken.jpg" in ln]
    assert len(warnings) == 1 and "not a decodable image" in warnings[0], err  # once, not once per calibration pass
    assert any(r.levelname == "WARNING" and "broken.jpg" in r.getMessage() for r in caplog.records)
    report = json.loads((out / "build.json").read_text())
    assert report["calibration"]["kind"] == "image folder"
    assert report["calibration"]["samples"] == 4


def test_image_folder_with_only_undecodable_files(capsys, tmp_path, vit_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"garbage")
    (folder / "b.jpg").write_bytes(b"")
    _, err = build_fails(capsys, vit_path, tmp_path / "out", "--calib", folder,
                         needles=("imgs", "none of the 2 image files could be decoded"))
    assert err.count("skipping") == 2


def test_calib_path_missing(capsys, tmp_path, vit_path):
    build_fails(capsys, vit_path, tmp_path / "out", "--calib", tmp_path / "nothere",
                needles=("nothere", "calibration data not found"))


def test_token_model_needs_calib_file(capsys, tmp_path, bert_path):
    build_fails(capsys, bert_path, tmp_path / "out", needles=("input_ids", "--calib FILE.npz"))


# -- calibration tensors -----------------------------------------------------------------------------------------------
def _ids(n=8):
    return np.random.default_rng(0).integers(0, 100, (n, 16)).astype(np.int64)


def _pixels(n=4):
    return np.random.default_rng(0).standard_normal((n, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("case, arrays, needles", [
    ("missing_name", {"ids": _ids()}, ("no array for model input 'input_ids'",)),
    ("wrong_shape", {"input_ids": _ids()[:, :12]}, ("'input_ids' has sample shape (12,), model wants (16,)",)),
    ("wrong_dtype", {"input_ids": _ids().astype(np.float32)}, ("dtype float32, model wants int64",)),
    ("empty_array", {"input_ids": np.zeros((0, 16), np.int64)}, ("calibration data is empty",)),
])
def test_bad_npz_for_token_model(case, arrays, needles, capsys, tmp_path, bert_path):
    p = tmp_path / f"{case}.npz"
    np.savez(p, **arrays)
    build_fails(capsys, bert_path, tmp_path / "out", "--calib", p, needles=(f"{case}.npz", *needles))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_npz(bad, capsys, tmp_path, vit_path):
    a = _pixels()
    a[2, 0, 5, 5] = bad
    p = tmp_path / "px.npz"
    np.savez(p, input=a)
    build_fails(capsys, vit_path, tmp_path / "out", "--calib", p, needles=("px.npz", "contains NaN or Inf"))


def test_garbage_npz(capsys, tmp_path, vit_path):
    p = tmp_path / "junk.npz"
    p.write_text("not numpy")
    build_fails(capsys, vit_path, tmp_path / "out", "--calib", p, needles=("junk.npz", "not a NumPy .npz/.npy file"))


def test_npy_for_single_input_model(capsys, tmp_path, vit_path):
    p = tmp_path / "px.npy"
    np.save(p, _pixels(4))
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "build", vit_path, "-o", out, "--calib", p, *FAST)
    assert rc == 0, err
    cal = json.loads((out / "build.json").read_text())["calibration"]
    assert cal["kind"] == "tensors" and cal["source"] == str(p) and cal["samples"] == 4


def test_bert_with_npz(capsys, tmp_path, bert_path):
    p = tmp_path / "feeds.npz"
    np.savez(p, input_ids=_ids(8))
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "build", bert_path, "-o", out, "--calib", p, "--calib-samples", "8")
    assert rc == 0, err
    sess = ort_session(out / "model.int8.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state"]
    y = sess.run(None, {"input_ids": _ids(1)})[0]
    assert y.shape == (1, 16, 32) and np.isfinite(y).all()
    report = json.loads((out / "build.json").read_text())
    assert report["calibration"]["samples"] == 8
    assert sum(r["counts"].get("LayerNorm fusions", 0) for r in report["passes"]) == 5
    # the post-norm BERT attention (no mask) runs as QAttention too
    assert sum(r["counts"].get("QAttention fusions", 0) for r in report["passes"]) == 2


# -- output folder -----------------------------------------------------------------------------------------------------
def test_outdir_under_a_regular_file(capsys, tmp_path, vit_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    out = f / "out"
    rc, _, err = cli(capsys, "--log-level", "warning", "build", vit_path, "-o", out, *FAST)
    assert rc == 2
    line = [ln for ln in err.splitlines() if ln.startswith("vitc: error:")]
    assert len(line) == 1 and "file.txt is not a folder" in line[0] and str(out) in line[0]
    assert f.read_text() == "x" and leftovers(tmp_path) == []


def test_outdir_parent_not_writable(capsys, tmp_path, vit_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        try:
            (ro / "probe").touch()
        except PermissionError:
            pass
        else:
            (ro / "probe").unlink()
            pytest.skip("chmod 0o500 does not stop writes here (running as root); "
                        "test_outdir_under_a_regular_file covers an unwritable OUTDIR")
        build_fails(capsys, vit_path, ro / "out", needles=(str(ro / "out"), "cannot write in", "writable -o"))
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


def test_outdir_permission_denied_simulated(capsys, tmp_path, vit_path, monkeypatch):
    # the same path as the chmod test, for runs as root: the temp folder beside OUTDIR cannot be made
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    build_fails(capsys, vit_path, tmp_path / "ro" / "out",
                needles=(str(tmp_path / "ro" / "out"), f"cannot write in {tmp_path / 'ro'} (Permission denied)"))
    assert not (tmp_path / "ro").exists(), "the parent it made is removed again"


def test_existing_outdir_refused_without_force(capsys, tmp_path, vit_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = cli(capsys, "--log-level", "warning", "build", vit_path, "-o", out, *FAST)
    assert rc == 2
    assert err.strip() == f"vitc: error: {out}: already exists; choose another -o or pass --force to replace it"
    assert os.listdir(out) == ["keep.txt"] and leftovers(tmp_path) == []


def test_existing_outdir_replaced_with_force(capsys, tmp_path, vit_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    rc, _, err = cli(capsys, "build", vit_path, "-o", out, "--force", *FAST)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["build.json", "model.int8.onnx"]
    assert leftovers(tmp_path) == []


def test_failed_force_build_keeps_old_outdir(capsys, tmp_path, vit_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    rc, _, err = cli(capsys, "--log-level", "warning", "build", vit_path, "-o", out, "--force",
                     "--calib", tmp_path / "missing.npz", *FAST)
    assert rc == 2 and "missing.npz" in err
    assert os.listdir(out) == ["stale.txt"] and leftovers(tmp_path) == []


def test_force_refuses_to_delete_the_model(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p = out / "m.onnx"
    onnx.save(tiny_vit(), p)
    rc, _, err = cli(capsys, "--log-level", "warning", "build", p, "-o", out, "--force", *FAST)
    assert rc == 2 and "--force would delete the model" in err
    assert os.listdir(out) == ["m.onnx"]


def test_force_refuses_current_folder(capsys, tmp_path_factory, empty_cwd):
    model = tmp_path_factory.mktemp("elsewhere") / "m.onnx"  # not inside the folders -o names
    onnx.save(tiny_vit(), model)
    for o in (".", ".."):
        rc, _, err = cli(capsys, "--log-level", "warning", "build", model, "-o", o, "--force", *FAST)
        assert rc == 2 and err.count("vitc: error:") == 1
        assert "is the current folder or one of its parents" in err, err
    assert empty_cwd.is_dir() and model.is_file()


# -- shapes ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def dynamic_hw(tmp_path) -> Path:
    m = tiny_vit()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for i, name in ((2, "height"), (3, "width")):
        dims[i].Clear()
        dims[i].dim_param = name
    p = tmp_path / "dyn.onnx"
    onnx.save(m, p)
    return p


def test_dynamic_non_batch_dim(capsys, tmp_path, dynamic_hw):
    build_fails(capsys, dynamic_hw, tmp_path / "out",
                needles=("dyn.onnx", "dim 2 (height) is dynamic", "--input-shape input=1,3,<height>,<width>"))


def test_input_shape_fixes_dynamic_dims(capsys, tmp_path, dynamic_hw):
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "build", dynamic_hw, "-o", out, "--input-shape", "input=1,3,32,32", *FAST)
    assert rc == 0, err
    sess = ort_session(out / "model.int8.onnx")
    assert sess.get_inputs()[0].shape == [1, 3, 32, 32]
    report = json.loads((out / "build.json").read_text())
    assert report["fixed_dims"]["input"] == ["dim 0: 'batch' -> 1", "dim 2: 'height' -> 32", "dim 3: 'width' -> 32"]


def test_input_shape_unknown_name(capsys, tmp_path, dynamic_hw):
    build_fails(capsys, dynamic_hw, tmp_path / "out", "--input-shape", "pixels=1,3,32,32",
                needles=("'pixels', which is not a model input", "['input']"))


@pytest.mark.parametrize("args", [["--input-shape", "input=1,3,0,32"], ["--input-shape", "input=1,3,h,32"],
                                  ["--batch", "0"], ["--calib-samples", "0"], ["--std", "0.5,0,0.5"],
                                  ["--mean", "0.5,0.5"]])
def test_bad_option_values_are_usage_errors(args, capsys, tmp_path, vit_path):
    with pytest.raises(SystemExit) as ei:
        main(["build", str(vit_path), "-o", str(tmp_path / "out"), *args])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "vitc build: error: argument" in err and args[0] in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needle", [(["--percentile", "0"], "--percentile 0.0 is out of range"),
                                          (["--alpha", "1.5"], "--alpha 1.5 is out of range")])
def test_out_of_range_values(args, needle, capsys, tmp_path, vit_path):
    build_fails(capsys, vit_path, tmp_path / "out", *args, needles=(needle,))


def test_calib_samples_fewer_than_batch(capsys, tmp_path, vit_path):
    build_fails(capsys, vit_path, tmp_path / "out", "--batch", "8",
                needles=("4 calibration samples are fewer than one batch of 8", "--calib-samples"))


# -- successful builds --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_build(tmp_path_factory):
    """One default int8 build of tiny_vit, run from an empty current directory; several tests read it."""
    root = tmp_path_factory.mktemp("vit_build")
    r = cli_in_empty_cwd(root, "build", "{model}", "-o", root / "out", "--calib-samples", "8")
    r["dir"] = root / "out"
    return r


def test_build_writes_exactly_model_and_report(vit_build):
    assert vit_build["rc"] == 0, vit_build["err"]
    assert vit_build["out"] == "", "build writes nothing to stdout"
    assert sorted(os.listdir(vit_build["dir"])) == ["build.json", "model.int8.onnx"]
    assert vit_build["cwd"] == []
    assert leftovers(vit_build["root"]) == []
    assert f"wrote {vit_build['dir'] / 'model.int8.onnx'}" in vit_build["err"]
    umask = os.umask(0)
    os.umask(umask)
    assert vit_build["dir"].stat().st_mode & 0o777 == 0o777 & ~umask, "an ordinary folder, not mkdtemp's private one"


def test_built_model_runs_in_plain_onnxruntime(vit_build):
    sess = ort_session(vit_build["dir"] / "model.int8.onnx")
    ref = ort_session(vit_build["model"])
    assert [i.name for i in sess.get_inputs()] == [i.name for i in ref.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == [o.name for o in ref.get_outputs()] == ["logits"]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    y = sess.run(None, {"input": x})[0]
    assert y.shape == (1, 10) and np.isfinite(y).all()
    ops = {n.op_type for n in onnx.load(vit_build["dir"] / "model.int8.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_build_report(vit_build):
    r = json.loads((vit_build["dir"] / "build.json").read_text())
    assert r["outputs"] == ["model.int8.onnx"] and r["precision"] == "int8" and r["target"] == "ort"
    assert r["opset"] == 14 and r["fixed_dims"] == {"input": ["dim 0: 'batch' -> 1"]}
    passes = {p["pass"]: p for p in r["passes"]}
    assert passes["fuse_layernorm"]["counts"]["LayerNorm fusions"] == 5
    assert "insert_qdq" in passes
    assert r["policy"], "the plan is recorded"
    cal = r["calibration"]
    assert cal["source"] == "embedded" and cal["samples"] == 8 and cal["preprocess"]["height"] == 32
    assert cal["tensors"] > 0 and r["calibration_table"]
    assert r["versions"]["onnx"] == onnx.__version__ and r["versions"]["onnxruntime"] == ort.__version__
    assert r["seconds"]["total"] > 0 and {"load", "calibration", "save + check"} <= set(r["seconds"])


def test_fp32_precision(capsys, tmp_path, vit_path):
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "build", vit_path, "-o", out, "--precision", "fp32")
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["build.json", "model.fp32.onnx"]
    r = json.loads((out / "build.json").read_text())
    assert r["precision"] == "fp32" and r["outputs"] == ["model.fp32.onnx"] and "calibration" not in r
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(ort_session(out / "model.fp32.onnx").run(None, {"input": x})[0],
                               ort_session(vit_path).run(None, {"input": x})[0], rtol=1e-4, atol=1e-5)


def test_no_fuse(capsys, tmp_path, vit_path):
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "build", vit_path, "-o", out, "--no-fuse", *FAST)
    assert rc == 0, err
    r = json.loads((out / "build.json").read_text())
    assert r["fuse"] is False
    fusions = {k: v for p in r["passes"] for k, v in p["counts"].items() if "fusion" in k}
    assert sum(fusions.values()) == 0
    assert not any(p["pass"].startswith("fuse_") for p in r["passes"])
    ops = {n.op_type for n in onnx.load(out / "model.int8.onnx").graph.node}
    assert "LayerNormalization" not in ops and "ReduceMean" in ops


def test_explain(capsys, vit_path):
    rc, out, err = cli(capsys, "--log-level", "warning", "explain", vit_path)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["node", "op", "role", "block", "act", "weight", "observer", "bits", "sym", "rule",
                                "note"]
    assert lines[-1].startswith("# policy default: 13 quantized, 5 kept float, 0 simulated")
    rows = [ln.split() for ln in lines[1:-1]]
    # tiny_vit: patch Conv, per block q/k/v/proj/fc1/fc2 Gemms + 2 attention MatMuls, head Gemm; plus the float ops
    quantizable = [r for r in rows if r[1] in ("Conv", "Gemm", "MatMul") and r[2] != "hadamard"]
    assert len(quantizable) == 1 + 2 * 8 + 1
    roles = [r[2] for r in quantizable]
    for role, n in (("patch_embed", 1), ("q", 2), ("k", 2), ("v", 2), ("attn_qk", 2), ("attn_av", 2), ("proj", 2),
                    ("fc1", 2), ("fc2", 2), ("head", 1)):
        assert roles.count(role) == n, (role, roles)
    floats = [r[2] for r in rows if r not in quantizable]
    assert sorted(floats) == sorted(["norm1"] * 2 + ["norm2"] * 2 + ["final_norm"] + ["softmax"] * 2 + ["gelu"] * 2
                                    + ["residual_add"] * 4 + ["hadamard"] * 2)
    assert err == ""


def test_explain_bad_model(capsys, tmp_path):
    p = tmp_path / "x.onnx"
    p.write_bytes(b"\x00\x01garbage")
    rc, out, err = cli(capsys, "explain", p)
    assert rc == 2 and out == "" and err.count("vitc: error:") == 1 and "x.onnx" in err


def test_bench(capsys, tmp_path, vit_path):
    b = tmp_path / "b.onnx"
    onnx.save(tiny_vit(TinyConfig(depth=1)), b)
    js = tmp_path / "bench.json"
    rc, out, err = cli(capsys, "bench", vit_path, b, "--rounds", "2", "--block", "2", "--json", js)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["model", "median", "ms"] and set(lines[1]) == {"-"}
    assert len(lines) == 4
    assert lines[2].split()[0].endswith("tiny_vit.onnx") and lines[3].split()[0].endswith("b.onnx")
    assert lines[2].split()[-1] == "-" and float(lines[3].split()[-1]) > 0  # ratio against the first model
    rows = json.loads(js.read_text())
    assert [r["model"] for r in rows] == [str(vit_path), str(b)]
    assert rows[0]["speedup_vs_first"] is None and rows[1]["speedup_vs_first"] > 0
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] for r in rows)


def test_bench_bad_model(capsys, tmp_path, vit_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("nope")
    rc, out, err = cli(capsys, "bench", vit_path, bad, "--rounds", "1", "--block", "1")
    assert rc == 2 and out == "" and "Traceback" not in err
    assert [ln for ln in err.splitlines() if "error" in ln] == \
        [f"vitc: error: {bad}: not a readable ONNX model (DecodeError); check the file is a complete .onnx export"]


def test_bench_zero_rounds_is_usage_error(capsys, vit_path):
    with pytest.raises(SystemExit) as ei:
        main(["bench", str(vit_path), "--rounds", "0"])
    assert ei.value.code == 2 and "--rounds" in capsys.readouterr().err


def test_console_script(tmp_path, vit_path):
    exe = Path(sys.executable).with_name("vitc")
    if not exe.is_file():
        found = shutil.which("vitc")
        if found is None:
            pytest.skip(f"the vitc console script is neither next to {sys.executable} nor on PATH")
        exe = Path(found)
    cwd = tmp_path / "cwd"
    out = tmp_path / "out"
    p = subprocess.run([str(exe), "build", str(vit_path), "-o", str(out), "--calib-samples", "4"],
                       cwd=cwd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(out)) == ["build.json", "model.int8.onnx"]
    assert "vitc: wrote" in p.stderr and p.stdout == ""
    p = subprocess.run([str(exe), "build", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o2")],
                       cwd=cwd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == \
        [f"vitc: error: {tmp_path / 'nope.onnx'}: no such file; give the path of an .onnx model"]


def test_dynamic_unknown_role_is_refused(capsys, tmp_path, vit_path):
    from vitc.compiler.cli.main import main

    assert main(["build", str(vit_path), "-o", str(tmp_path / "out"), "--dynamic", "bogus"]) == 2
    assert "unknown role 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
