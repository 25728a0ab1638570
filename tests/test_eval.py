"""`vitc eval`: top-1/top-5 on a generated ImageFolder, class maps, label-free fidelity, chunked/resumed output,
and bad input (one error line, exit 2)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import cli

from vitc.compiler.calib.data import Preprocess
from vitc.compiler.measure.fidelity import EvalTotals, pair_metrics, topk
from vitc.tools.tiny_models import TinyConfig, tiny_vit

N_CLASSES = 10




def errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "error" in ln]


def make_folder(root, classes=N_CLASSES, per_class=2, seed=0, names=None):
    rng = np.random.default_rng(seed)
    names = names or [f"c{k:02d}" for k in range(classes)]
    for name in names:
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(30, 60, size=2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data")


@pytest.fixture
def vit(tmp_path):
    p = tmp_path / "vit.onnx"
    onnx.save(tiny_vit(), p)
    return p


def expected_preds(model_path, folder_root):
    """Top-5 per image, computed directly (same preprocessing), in ImageFolder order."""
    m = onnx.load(str(model_path))
    pre = Preprocess.from_model(m, [1, 3, 32, 32])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    out = []
    for k, c in enumerate(sorted(p.name for p in folder_root.iterdir() if p.is_dir())):
        for f in sorted((folder_root / c).iterdir()):
            with Image.open(f) as im:
                x = pre.to_array(im)[None]
            y = sess.run(None, {"input": x})[0]
            out.append((c, k, topk(y, 5)[0].tolist()))
    return out


def test_top1_top5_match_direct_computation(capsys, tmp_path, vit, folder):
    js = tmp_path / "eval.json"
    rc, out, err = cli(capsys, "eval", vit, "--data", folder, "--batch", 3, "--json", js)
    assert rc == 0, err
    exp = expected_preds(vit, folder)
    top1 = 100 * np.mean([t[0] == k for _, k, t in exp])
    top5 = 100 * np.mean([k in t for _, k, t in exp])
    r = json.loads(js.read_text())
    assert r["images"] == r["labeled"] == 2 * N_CLASSES and r["classes"] == N_CLASSES
    assert r["top1_pct"] == pytest.approx(top1, abs=1e-6) and r["top5_pct"] == pytest.approx(top5, abs=1e-6)
    assert "sqnr_db" not in r and r["reference"] is None
    assert "top-1" in out and "top-5" in out and "reference" not in out
    assert r["preprocess"]["height"] == 32


def test_class_map_json_and_text(capsys, tmp_path, vit):
    names = [f"n{k:08d}" for k in range(4)]  # four synset folders out of the model's ten outputs
    data = make_folder(tmp_path / "syn", names=names)
    order = [7, 2, 9, 0]
    exp = expected_preds(vit, data)
    want = 100 * np.mean([t[0] == order[k] for _, k, t in exp])
    for cmap, text in ((tmp_path / "map.json", json.dumps(dict(zip(names, order)))),
                       (tmp_path / "keras.json", json.dumps({str(i): [n, "x"] for n, i in zip(names, order)})),
                       (tmp_path / "synsets.txt", "\n".join(next((n for n, i in zip(names, order) if i == j), f"n9{j:07d}")
                                                            + " some name" for j in range(N_CLASSES)))):
        cmap.write_text(text)
        js = tmp_path / f"{cmap.stem}.out.json"
        rc, out, err = cli(capsys, "eval", vit, "--data", data, "--class-map", cmap, "--json", js)
        assert rc == 0, err
        assert json.loads(js.read_text())["top1_pct"] == pytest.approx(want, abs=1e-6), cmap.name


def test_reference_identical_model(capsys, tmp_path, vit, folder):
    js = tmp_path / "e.json"
    rc, out, err = cli(capsys, "eval", vit, "--data", folder, "--reference", vit, "--json", js)
    assert rc == 0, err
    r = json.loads(js.read_text())
    assert r["top1_agreement_pct"] == 100.0 and r["mean_cosine"] == pytest.approx(1.0)
    assert r["sqnr_db"] >= 200 and r["mean_kl_nats"] == pytest.approx(0.0, abs=1e-9)
    assert r["reference_top1_pct"] == r["top1_pct"]
    for word in ("top-1 agreement", "logit cosine", "output SQNR", "KL"):
        assert word in out


def test_reference_fixed_batch_model_on_flat_folder(capsys, tmp_path, vit, folder):
    """Label-free: a flat folder of images, a fixed-batch (1) model against the dynamic-batch reference."""
    fixed = tmp_path / "fixed.onnx"
    onnx.save(tiny_vit(TinyConfig(dynamic_batch=False, seed=1)), fixed)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted(folder.rglob("*.png"))[:5]):
        p.rename(flat / f"{i}.png")
    js = tmp_path / "e.json"
    rc, out, err = cli(capsys, "eval", fixed, "--data", flat, "--reference", vit, "--json", js)
    assert rc == 0, err
    r = json.loads(js.read_text())
    assert r["images"] == 5 and r["labeled"] == 0 and r["top1_pct"] is None
    assert np.isfinite(r["sqnr_db"]) and r["sqnr_db"] < 100 and 0 <= r["top1_agreement_pct"] <= 100
    assert r["mean_kl_nats"] > 0 and r["worst_image_sqnr_db"] <= r["sqnr_db"] + 1e-9
    assert "top-1            " not in out  # no accuracy lines without labels


def test_predictions_chunked_and_resumed(capsys, tmp_path, vit, folder):
    full = tmp_path / "full.json"
    assert cli(capsys, "eval", vit, "--data", folder, "--reference", vit, "--json", full)[0] == 0
    pred = tmp_path / "pred.jsonl"
    rc, _, err = cli(capsys, "eval", vit, "--data", folder, "--reference", vit, "--predictions", pred,
                     "--limit", 7, "--batch", 2)
    assert rc == 0, err
    lines = pred.read_text().splitlines()
    assert len(lines) == 7 and {"path", "label", "top", "ref_top", "err2", "kl"} <= set(json.loads(lines[0]))
    with open(pred, "a") as f:
        f.write('{"path": "c09/img1.png", "lab')  # a line cut short by a killed run
    rc, _, err = cli(capsys, "eval", vit, "--data", folder, "--reference", vit, "--predictions", pred, "--resume",
                     "--json", tmp_path / "resumed.json")
    assert rc == 0, err
    assert "1 unreadable line" in err
    a, b = json.loads(full.read_text()), json.loads((tmp_path / "resumed.json").read_text())
    for k in ("images", "top1_pct", "top5_pct", "top1_agreement_pct"):
        assert a[k] == b[k], k
    assert a["sqnr_db"] == pytest.approx(b["sqnr_db"]) and a["mean_kl_nats"] == pytest.approx(b["mean_kl_nats"], abs=1e-9)
    # the file now exists: without --resume it is refused
    rc, out, err = cli(capsys, "eval", vit, "--data", folder, "--predictions", pred)
    assert rc == 2 and out == "" and "--resume" in errors(err)[0]


def test_undecodable_files_are_skipped(capsys, tmp_path, vit, folder):
    (folder / "c03" / "broken.jpg").write_bytes(b"not an image")
    js = tmp_path / "e.json"
    rc, out, err = cli(capsys, "eval", vit, "--data", folder, "--json", js)
    assert rc == 0, err
    r = json.loads(js.read_text())
    assert r["images"] == 2 * N_CLASSES and r["skipped_files"] == 1 and "broken.jpg" in err


@pytest.mark.parametrize("case", ["flat_no_reference", "empty", "missing", "class_count", "class_map_missing",
                                  "class_map_range", "dynamic_hw", "fixed_batch", "resume_alone", "not_image_model",
                                  "empty_class_folders"])
def test_bad_input_one_line_exit_2(capsys, tmp_path, vit, folder, case):
    args = ["eval", vit, "--data", folder]
    expect = ""
    if case == "flat_no_reference":
        flat = tmp_path / "flat"
        flat.mkdir()
        Image.new("RGB", (40, 40)).save(flat / "a.png")
        args[3], expect = flat, "no class folders"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[3], expect = tmp_path / "empty", "no class folders"
    elif case == "missing":
        args[3], expect = tmp_path / "nope", "no such folder"
    elif case == "class_count":
        args[3], expect = make_folder(tmp_path / "seven", classes=7), "7 class folders but"
    elif case == "class_map_missing":
        (tmp_path / "m.json").write_text(json.dumps({"c00": 0, "c01": 1}))
        args += ["--class-map", tmp_path / "m.json"]
        expect = "not in the class map"
    elif case == "class_map_range":
        (tmp_path / "m.json").write_text(json.dumps({f"c{k:02d}": k + 5 for k in range(N_CLASSES)}))
        args += ["--class-map", tmp_path / "m.json"]
        expect = "has 10 outputs"
    elif case == "dynamic_hw":
        m = tiny_vit()
        m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
        p = tmp_path / "dyn.onnx"
        onnx.save(m, p)
        args[1], expect = p, "dim 2 (height) is dynamic"
    elif case == "fixed_batch":
        p = tmp_path / "fixed.onnx"
        onnx.save(tiny_vit(TinyConfig(dynamic_batch=False)), p)
        args = ["eval", p, "--data", folder, "--batch", 4]
        expect = "--batch 4 is refused"
    elif case == "resume_alone":
        args += ["--resume"]
        expect = "--resume needs --predictions"
    elif case == "not_image_model":
        from vitc.tools.tiny_models import tiny_bert

        p = tmp_path / "bert.onnx"
        onnx.save(tiny_bert(), p)
        args[1], expect = p, "needs one NCHW float image input"
    elif case == "empty_class_folders":
        for k in range(3):
            (tmp_path / "hollow" / f"k{k}").mkdir(parents=True)
        args[3], expect = tmp_path / "hollow", "no image files in them"
    rc, out, err = cli(capsys, *args)
    assert rc == 2, err
    assert out == "" and "Traceback" not in err
    errs = errors(err)
    assert len(errs) == 1 and errs[0].startswith("vitc: error: ") and expect in errs[0], err


def test_metrics_units():
    ref = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    pm = pair_metrics(ref, ref)
    assert np.allclose(pm["err2"], 0) and np.allclose(pm["cos"], 1) and np.allclose(pm["kl"], 0)
    pm = pair_metrics(ref, ref * 0.5)
    assert np.allclose(pm["cos"], 1) and (pm["kl"] > 0).all()
    assert topk(np.array([[0.1, 0.9, 0.5]]), 5).tolist() == [[1, 2, 0]]
    t = EvalTotals()
    t.add({"path": "a", "label": 1, "top": [1, 0], "ref_top": [0, 1], "ref2": 4.0, "err2": 0.04, "cos": 0.9, "kl": 0.1})
    t.add({"path": "b", "label": 0, "top": [1, 0], "ref_top": [1, 0], "ref2": 4.0, "err2": 0.04, "cos": 1.0, "kl": 0.3})
    s = t.summary()
    assert s["top1_pct"] == 50.0 and s["top5_pct"] == 100.0 and s["top1_agreement_pct"] == 50.0
    assert s["sqnr_db"] == pytest.approx(20.0) and s["mean_kl_nats"] == pytest.approx(0.2)
