"""load_model: bad files, opsets, external-data confinement, dynamic dims and --input-shape."""

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from vitc.compiler.errors import ModelLoadError
from vitc.compiler.driver.loader import MAX_OPSET, load_model
from vitc.tools.tiny_models import TinyConfig, tiny_vit


def _dims(model, i=0):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in model.graph.input[i].type.tensor_type.shape.dim]


def _dynamic_hw_vit() -> onnx.ModelProto:
    m = tiny_vit()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for i, name in ((2, "height"), (3, "width")):
        dims[i].Clear()
        dims[i].dim_param = name
    return m


def save_external(folder: Path, name: str = "m.onnx", location: str = "m.data") -> Path:
    """tiny_vit with every initializer in one external file next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    onnx.save(tiny_vit(), p, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
    return p


def set_location(src: Path, dst: Path, location: str) -> Path:
    """Copy the model proto at ``src`` to ``dst`` with every external-data location rewritten."""
    m = onnx.load(src, load_external_data=False)
    n = 0
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
                n += 1
    assert n > 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, dst)
    return dst


# -- files that are not ONNX models ---------------------------------------------------------------------------------
def test_random_bytes(tmp_path):
    p = tmp_path / "random.onnx"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="random.onnx: not a readable ONNX model"):
        load_model(p)


def test_text_file(tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("this is a text file, not a model\n" * 20)
    with pytest.raises(ModelLoadError, match=r"notes.onnx: not (a readable|an) ONNX model"):
        load_model(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.onnx: not an ONNX model .no graph nodes"):
        load_model(p)


def test_truncated(tmp_path, vit_path):
    data = vit_path.read_bytes()
    p = tmp_path / "half.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="half.onnx: not a readable ONNX model") as ei:
        load_model(p)
    assert "complete .onnx export" in str(ei.value)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.onnx: no such file"):
        load_model(tmp_path / "nope.onnx")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ModelLoadError, match="is a folder, not a model file"):
        load_model(tmp_path)


# -- opsets ---------------------------------------------------------------------------------------------------------
def test_opset_12_refused(tmp_path):
    p = tmp_path / "old.onnx"
    onnx.save(tiny_vit(TinyConfig(opset=12)), p)
    with pytest.raises(ModelLoadError, match=r"old.onnx: opset 12 is not supported \(need >= 13\)") as ei:
        load_model(p)
    assert "re-export" in str(ei.value)


def test_opset_13_accepted(tmp_path):
    p = tmp_path / "m13.onnx"
    onnx.save(tiny_vit(TinyConfig(opset=13)), p)
    assert load_model(p).opset == 13


def test_opset_too_new(tmp_path):
    m = tiny_vit()
    m.opset_import[0].version = MAX_OPSET + 1
    p = tmp_path / "new.onnx"
    onnx.save(m, p)
    with pytest.raises(ModelLoadError, match=f"new.onnx: opset {MAX_OPSET + 1} is newer"):
        load_model(p)


def test_no_default_opset_names_the_file(tmp_path):
    m = tiny_vit()
    m.opset_import[0].domain = "com.example"
    p = tmp_path / "nodomain.onnx"
    onnx.save(m, p)
    with pytest.raises(ModelLoadError, match="nodomain.onnx: model declares no default-domain opset"):
        load_model(p)


# -- external data ---------------------------------------------------------------------------------------------------
def test_external_data_next_to_model_loads(tmp_path, image_batch):
    p = save_external(tmp_path / "model")
    assert (tmp_path / "model" / "m.data").stat().st_size > 10_000
    assert len(p.read_bytes()) < 20_000, "weights really are external"
    lm = load_model(p)
    assert lm.opset == 14
    inits = {t.name: t for t in lm.model.graph.initializer}
    assert inits and all(t.data_location == onnx.TensorProto.DEFAULT and t.raw_data for t in inits.values())
    from conftest import ort_run
    ref = ort_run(tiny_vit(), {"input": image_batch})[0]
    np.testing.assert_allclose(ort_run(lm.model, {"input": image_batch})[0], ref, rtol=1e-5, atol=1e-6)


def test_external_data_absolute_path_refused(tmp_path):
    src = save_external(tmp_path / "a")
    p = set_location(src, tmp_path / "b" / "abs.onnx", str((tmp_path / "a" / "m.data").absolute()))
    with pytest.raises(ModelLoadError, match="abs.onnx: initializer .* points to external data .* outside the model folder"):
        load_model(p)


def test_external_data_dotdot_refused(tmp_path):
    src = save_external(tmp_path / "a")
    p = set_location(src, tmp_path / "b" / "up.onnx", "../a/m.data")
    with pytest.raises(ModelLoadError, match=r"up.onnx: .*'\.\./a/m\.data' outside the model folder"):
        load_model(p)


def test_external_data_symlink_escape_refused(tmp_path):
    src = save_external(tmp_path / "a")
    link = tmp_path / "b" / "w.data"
    link.parent.mkdir()
    try:
        os.symlink(tmp_path / "a" / "m.data", link)
    except (OSError, NotImplementedError) as exc:  # pragma: no cover - e.g. Windows without privileges
        pytest.skip(f"cannot create symlinks here: {exc}")
    p = set_location(src, tmp_path / "b" / "sym.onnx", "w.data")
    with pytest.raises(ModelLoadError, match=r"sym.onnx: .*'w\.data' outside the model folder"):
        load_model(p)


def test_external_data_symlink_inside_folder_refused_clearly(tmp_path):
    # onnx itself refuses to read external data through any symlink; vitc says so in one line, naming the file
    src = save_external(tmp_path / "a")
    os.rename(tmp_path / "a" / "m.data", tmp_path / "a" / "real.data")
    os.symlink("real.data", tmp_path / "a" / "m.data")
    with pytest.raises(ModelLoadError, match=r"m.onnx: external data file 'm\.data' .* is a symbolic link"):
        load_model(src)


def test_external_data_truncated_file(tmp_path):
    src = save_external(tmp_path / "a")
    data = tmp_path / "a" / "m.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="m.onnx: cannot read its external data"):
        load_model(src)


def test_external_data_missing_file(tmp_path):
    src = save_external(tmp_path / "a")
    p = set_location(src, tmp_path / "a" / "gone.onnx", "gone.data")
    with pytest.raises(ModelLoadError, match="gone.onnx: external data file 'gone.data' .* is missing"):
        load_model(p)


# -- shapes ----------------------------------------------------------------------------------------------------------
def test_dynamic_batch_fixed_and_reported(vit_path):
    lm = load_model(vit_path, batch=3)
    assert _dims(lm.model) == [3, 3, 32, 32]
    assert lm.fixed_dims == {"input": ["dim 0: 'batch' -> 3"]}
    assert [d.dim_value for d in lm.model.graph.output[0].type.tensor_type.shape.dim] == [3, 10]
    assert lm.input_names == ["input"] and lm.output_names == ["logits"]


def test_dynamic_non_batch_dim_error_suggests_input_shape(tmp_path):
    p = tmp_path / "dyn.onnx"
    onnx.save(_dynamic_hw_vit(), p)
    with pytest.raises(ModelLoadError) as ei:
        load_model(p)
    msg = str(ei.value)
    assert "dyn.onnx: input 'input' dim 2 (height) is dynamic and is not the batch dim" in msg
    assert "--input-shape input=1,3,<height>,<width>" in msg


def test_input_shape_fixes_dynamic_dims(tmp_path):
    p = tmp_path / "dyn.onnx"
    onnx.save(_dynamic_hw_vit(), p)
    lm = load_model(p, input_shapes={"input": [2, 3, 32, 32]})
    assert _dims(lm.model) == [2, 3, 32, 32]
    assert lm.fixed_dims["input"] == ["dim 0: 'batch' -> 2", "dim 2: 'height' -> 32", "dim 3: 'width' -> 32"]


@pytest.mark.parametrize("shapes, match", [
    ({"pixels": [1, 3, 32, 32]}, r"--input-shape names 'pixels', which is not a model input; the model inputs are \['input'\]"),
    ({"input": [1, 3, 32]}, "--input-shape for 'input' has rank 3, model has 4"),
    ({"input": [1, 3, 0, 32]}, "has a dim < 1"),
    ({"input": [1, 4, 32, 32]}, "input 'input' dim 1 is fixed to 3, not 4"),
])
def test_bad_input_shape(tmp_path, shapes, match):
    p = tmp_path / "dyn.onnx"
    onnx.save(_dynamic_hw_vit(), p)
    with pytest.raises(ModelLoadError, match=match):
        load_model(p, input_shapes=shapes)


def test_batch_below_one_refused(vit_path):
    with pytest.raises(ModelLoadError, match="batch size 0 is not valid"):
        load_model(vit_path, batch=0)
