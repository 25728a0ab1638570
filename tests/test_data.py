"""Calibration inputs: .npz/.npy validation, image folders, preprocessing metadata, and calibration_feeds."""

import json
import logging

import numpy as np
import onnx
import pytest
from PIL import Image

from vitc.compiler.calib import data as D
from vitc.compiler.driver.build import CalibConfig, calibration_feeds, input_specs
from vitc.compiler.errors import CalibrationDataError
from vitc.compiler.driver.loader import load_model
from vitc.tools.tiny_models import tiny_vit

VIT = D.InputSpec("input", (1, 3, 32, 32), np.dtype(np.float32))
BERT = D.InputSpec("input_ids", (2, 16), np.dtype(np.int64))


def write_images(folder, n, size=(48, 40), seed=0, fmt="png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.{fmt}")
    return folder


def x(n=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def ids(n=6, seed=0):
    return np.random.default_rng(seed).integers(0, 100, (n, 16)).astype(np.int64)


# -- .npz / .npy -----------------------------------------------------------------------------------------------------
def test_npz_feeds_are_batched_and_cast(tmp_path):
    p = tmp_path / "c.npz"
    a = x(5).astype(np.float64)
    np.savez(p, input=a)
    spec = D.InputSpec("input", (2, 3, 32, 32), np.dtype(np.float32))
    feeds = list(D.tensor_file_feeds(p, [spec], limit=None))
    assert len(feeds) == 2, "5 samples at batch 2: two full batches, the partial one dropped"
    assert all(f["input"].dtype == np.float32 and f["input"].shape == (2, 3, 32, 32) for f in feeds)
    np.testing.assert_allclose(feeds[1]["input"], a[2:4].astype(np.float32))


def test_npz_limit(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, input_ids=ids(10))
    feeds = list(D.tensor_file_feeds(p, [BERT], limit=4))
    assert [f["input_ids"].shape for f in feeds] == [(2, 16), (2, 16)]


def test_npz_missing_input_name(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, ids=ids())
    with pytest.raises(CalibrationDataError, match=r"c.npz: no array for model input 'input_ids' \(has \['ids'\]\)"):
        D.tensor_file_feeds(p, [BERT], None)


def test_npz_wrong_shape(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, input_ids=ids()[:, :8])
    with pytest.raises(CalibrationDataError, match=r"input 'input_ids' has sample shape \(8,\), model wants \(16,\)"):
        D.tensor_file_feeds(p, [BERT], None)


def test_npz_wrong_dtype(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, input_ids=ids().astype(np.float32))
    with pytest.raises(CalibrationDataError, match="input 'input_ids' has dtype float32, model wants int64"):
        D.tensor_file_feeds(p, [BERT], None)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npz_non_finite(tmp_path, bad):
    p = tmp_path / "c.npz"
    a = x(6)
    a[3, 1, 2, 2] = bad
    np.savez(p, input=a)
    with pytest.raises(CalibrationDataError, match=r"input 'input' contains NaN or Inf \(1 of 6 samples\)"):
        D.tensor_file_feeds(p, [VIT], None)


def test_npz_float64_overflowing_float32_is_non_finite(tmp_path):
    p = tmp_path / "c.npz"
    a = x(2).astype(np.float64)
    a[0, 0, 0, 0] = 1e300
    np.savez(p, input=a)
    with pytest.raises(CalibrationDataError, match="contains NaN or Inf"):
        D.tensor_file_feeds(p, [VIT], None)


def test_npz_empty_array(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, input=np.zeros((0, 3, 32, 32), np.float32))
    with pytest.raises(CalibrationDataError, match="c.npz: calibration data is empty"):
        D.tensor_file_feeds(p, [VIT], None)


def test_npz_fewer_samples_than_batch(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, input_ids=ids(1))
    with pytest.raises(CalibrationDataError, match="1 samples, fewer than the batch size 2"):
        D.tensor_file_feeds(p, [BERT], None)


@pytest.mark.parametrize("name", ["junk.npz", "junk.npy"])
def test_not_a_numpy_file(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"definitely not numpy" * 10)
    with pytest.raises(CalibrationDataError, match=f"{name}: not a NumPy .npz/.npy file"):
        D.tensor_file_feeds(p, [VIT], None)


def test_npz_object_array_refused(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CalibrationDataError, match="c.npz: cannot read calibration tensors"):
        D.tensor_file_feeds(p, [VIT], None)


def test_npy_single_input(tmp_path):
    p = tmp_path / "c.npy"
    np.save(p, x(3))
    feeds = list(D.tensor_file_feeds(p, [VIT], None))
    assert len(feeds) == 3 and feeds[0]["input"].shape == (1, 3, 32, 32)


def test_npy_single_sample_without_batch_axis(tmp_path):
    p = tmp_path / "c.npy"
    np.save(p, x(1)[0])
    feeds = list(D.tensor_file_feeds(p, [VIT], None))
    assert len(feeds) == 1 and feeds[0]["input"].shape == (1, 3, 32, 32)


def test_npy_refused_for_multi_input_model(tmp_path):
    p = tmp_path / "c.npy"
    np.save(p, x(2))
    other = D.InputSpec("mask", (1, 16), np.dtype(np.int64))
    with pytest.raises(CalibrationDataError, match="c.npy: .npy holds one array but the model has 2 inputs"):
        D.tensor_file_feeds(p, [VIT, other], None)


# -- image folders -------------------------------------------------------------------------------------------------
def test_folder_samples_preprocessed(tmp_path):
    folder = write_images(tmp_path / "imgs", 3)
    out = list(D.folder_samples(folder, D.Preprocess(32, 32), limit=None))
    assert len(out) == 3
    assert all(a.shape == (3, 32, 32) and a.dtype == np.float32 and np.isfinite(a).all() for a in out)


def test_folder_limit_and_recursion(tmp_path):
    write_images(tmp_path / "imgs" / "sub", 3, fmt="jpg")
    write_images(tmp_path / "imgs", 2, seed=1)
    assert len(list(D.folder_samples(tmp_path / "imgs", D.Preprocess(32, 32), limit=4))) == 4


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="empty: no image files in the calibration folder"):
        D.folder_samples(tmp_path / "empty", D.Preprocess(32, 32), None)  # raised eagerly, before iteration


def test_folder_with_only_undecodable_files(tmp_path, caplog):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "b.png").write_bytes(b"")
    gen = D.folder_samples(folder, D.Preprocess(32, 32), None)
    with caplog.at_level(logging.WARNING, logger="vitc"):
        with pytest.raises(CalibrationDataError, match="bad: none of the 2 image files could be decoded"):
            list(gen)
    assert sorted(r.getMessage().split(":")[0] for r in caplog.records if r.levelno == logging.WARNING) == \
        [f"skipping {folder / 'a.jpg'}", f"skipping {folder / 'b.png'}"]


def test_one_undecodable_file_is_skipped_with_one_warning(tmp_path, caplog):
    folder = write_images(tmp_path / "imgs", 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # PNG signature, garbage after it
    (folder / "README.txt").write_text("notes")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    with caplog.at_level(logging.WARNING, logger="vitc"):
        first = list(D.folder_samples(folder, D.Preprocess(32, 32), None))
        second = list(D.folder_samples(folder, D.Preprocess(32, 32), None))  # recalibration reads it again
    assert len(first) == len(second) == 2
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 2, msgs  # once each, not once per pass; hidden files silently ignored
    assert any("broken.png: not a decodable image" in m for m in msgs)
    assert any("README.txt: not an image file type" in m for m in msgs)


def test_truncated_image_is_skipped(tmp_path):
    folder = write_images(tmp_path / "imgs", 2, size=(64, 64), fmt="jpg")
    data = (folder / "img0.jpg").read_bytes()
    (folder / "img0.jpg").write_bytes(data[: len(data) // 3])
    assert len(list(D.folder_samples(folder, D.Preprocess(32, 32), None))) == 1


# -- preprocessing metadata ------------------------------------------------------------------------------------------
def _with_meta(value: str) -> onnx.ModelProto:
    m = tiny_vit()
    onnx.helper.set_model_props(m, {D.PREPROCESS_KEY: value})
    return m


def test_preprocess_metadata_read():
    pre = D.Preprocess.from_model(_with_meta(json.dumps({"mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 0.9,
                                                         "interpolation": "bilinear"})), (1, 3, 48, 40))
    assert (pre.height, pre.width, pre.mean, pre.std, pre.crop_pct, pre.interpolation) == \
        (48, 40, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.9, "bilinear")


@pytest.mark.parametrize("value", ["{not json", json.dumps({"mean": [0.5, 0.5]}), json.dumps({"std": [0, 1, 1]}),
                                   json.dumps(["a", "list"]), json.dumps({"crop_pct": 3})])
def test_malformed_preprocess_metadata_falls_back(value, caplog):
    with caplog.at_level(logging.WARNING, logger="vitc"):
        pre = D.Preprocess.from_model(_with_meta(value), (1, 3, 32, 32))
    assert pre == D.Preprocess(32, 32)
    assert any("ignoring malformed vitc.preprocess metadata" in r.getMessage() for r in caplog.records)


# -- calibration_feeds (build.py) -------------------------------------------------------------------------------------
@pytest.fixture
def vit_model(vit_path):
    return load_model(vit_path).model


@pytest.fixture
def bert_model(bert_path):
    return load_model(bert_path, batch=2).model


def test_input_specs(vit_model, bert_model):
    assert input_specs(vit_model) == [VIT]
    assert input_specs(bert_model) == [BERT]


def test_input_specs_refuses_unfixed_dims():
    with pytest.raises(CalibrationDataError, match=r"model input 'input' has no fixed shape \[0, 3, 32, 32\]"):
        input_specs(tiny_vit())  # not through load_model: the batch dim is still symbolic


def test_embedded_default_feeds(vit_model):
    feeds, summary = calibration_feeds(vit_model, CalibConfig(samples=3))
    feeds = list(feeds)
    assert len(feeds) == 3 and feeds[0]["input"].shape == (1, 3, 32, 32) and feeds[0]["input"].dtype == np.float32
    assert summary["source"] == "embedded" and summary["preprocess"]["height"] == 32
    again = [f["input"] for f in calibration_feeds(vit_model, CalibConfig(samples=3))[0]]
    np.testing.assert_array_equal(again[2], feeds[2]["input"])  # deterministic for a seed


def test_mean_std_override(vit_model):
    _, summary = calibration_feeds(vit_model, CalibConfig(samples=1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    assert summary["preprocess"]["mean"] == (0.5, 0.5, 0.5) and summary["preprocess"]["std"] == (0.5, 0.5, 0.5)


def test_embedded_refused_for_token_model(bert_model):
    with pytest.raises(CalibrationDataError, match=r"embedded default photo set cannot calibrate this model.*input_ids") as ei:
        calibration_feeds(bert_model, CalibConfig(samples=4))
    assert "--calib FILE.npz" in str(ei.value)


def test_image_folder_refused_for_token_model(bert_model, tmp_path):
    folder = write_images(tmp_path / "imgs", 2)
    with pytest.raises(CalibrationDataError, match="imgs: an image folder cannot calibrate this model"):
        calibration_feeds(bert_model, CalibConfig(source=folder, samples=4))


def test_samples_fewer_than_batch(tmp_path):
    p = tmp_path / "v.onnx"
    onnx.save(tiny_vit(), p)
    model = load_model(p, batch=4).model
    with pytest.raises(CalibrationDataError, match="2 calibration samples are fewer than one batch of 4"):
        calibration_feeds(model, CalibConfig(samples=2))


def test_folder_with_fewer_images_than_batch(tmp_path):
    p = tmp_path / "v.onnx"
    onnx.save(tiny_vit(), p)
    model = load_model(p, batch=4).model
    folder = write_images(tmp_path / "imgs", 3)
    feeds, _ = calibration_feeds(model, CalibConfig(source=folder, samples=8))
    with pytest.raises(CalibrationDataError, match="imgs: 3 decodable images, fewer than the batch size 4"):
        list(feeds)


@pytest.mark.parametrize("name", ["calib.NPZ", "calib.Npz"])
def test_tensor_suffix_case_insensitive(bert_model, tmp_path, name):
    p = tmp_path / name
    with open(p, "wb") as f:
        np.savez(f, input_ids=ids(4))
    feeds, summary = calibration_feeds(bert_model, CalibConfig(source=p, samples=4))
    assert summary["kind"] == "tensors" and len(list(feeds)) == 2


def test_unsupported_calibration_file(vit_model, tmp_path):
    p = tmp_path / "cat.jpg"
    write_images(tmp_path / "x", 1, fmt="jpg")
    (tmp_path / "x" / "img0.jpg").rename(p)
    with pytest.raises(CalibrationDataError, match="cat.jpg: unsupported calibration file; use a folder of images"):
        calibration_feeds(vit_model, CalibConfig(source=p))


def test_missing_calibration_source(vit_model, tmp_path):
    with pytest.raises(CalibrationDataError, match="nothere: calibration data not found"):
        calibration_feeds(vit_model, CalibConfig(source=tmp_path / "nothere"))
