"""`vitc export` (timm -> ONNX) with both exporters, and the fusions/build on what they emit. Needs vitc[export]."""

import pickle
from collections import Counter

import onnx
import pytest

torch = pytest.importorskip("torch", reason="needs torch (pip install 'vitc[export]')")
timm = pytest.importorskip("timm", reason="needs timm (pip install 'vitc[export]')")

from vitc.compiler.driver.build import BuildConfig, CalibConfig, build  # noqa: E402
from vitc.compiler.cli.main import main  # noqa: E402
from vitc.compiler.calib.data import PREPROCESS_KEY  # noqa: E402
from vitc.compiler.cli.export import ExportConfig, export_timm, load_checkpoint  # noqa: E402
from vitc.compiler.errors import ModelLoadError  # noqa: E402

MODEL = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def legacy_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "deit_t.onnx"
    return export_timm(ExportConfig(MODEL, out))


def _counts(report):
    return {k: v for p in report["passes"] for k, v in p["counts"].items()}


def test_legacy_export_records_preprocessing_and_builds(legacy_export, tmp_path):
    m = onnx.load(legacy_export)
    meta = {p.key: p.value for p in m.metadata_props}
    assert PREPROCESS_KEY in meta and "0.485" in meta[PREPROCESS_KEY]
    res = build(BuildConfig(model=legacy_export, outdir=tmp_path / "b", calib=CalibConfig(samples=4),
                            show_progress=False))
    c = _counts(res.report)
    # torch's opset-17 exporter already emits LayerNormalization; GELU arrives as the erf form and is fused
    assert c["GELU(erf) fusions"] == 12
    assert c["MatMul+Add -> Gemm fusions"] == 12 * 4  # qkv, proj, fc1, fc2 per block (the head is already a Gemm)
    roles = Counter(n["role"] for n in res.report["policy"]["nodes"])
    assert roles["qkv"] == 12 and roles["fc1"] == 12 and roles["fc2"] == 12 and roles["proj"] == 12
    assert roles["attn_qk"] == 12 and roles["attn_av"] == 12 and roles["head"] == 1


@pytest.mark.slow
def test_dynamo_export_fuses_and_builds(tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    out = export_timm(ExportConfig(MODEL, tmp_path / "deit_t_dynamo.onnx", dynamo=True))
    res = build(BuildConfig(model=out, outdir=tmp_path / "b", calib=CalibConfig(samples=4), show_progress=False))
    c = _counts(res.report)
    assert c["MatMul+Add -> Gemm fusions"] >= 12 * 4
    roles = Counter(n["role"] for n in res.report["policy"]["nodes"])
    assert roles["fc2"] == 12 and roles["attn_qk"] == 12


def test_checkpoint_loads_weights_only(tmp_path):
    model = timm.create_model(MODEL, pretrained=False)
    ck = tmp_path / "w.pth"
    torch.save(model.state_dict(), ck)
    out = tmp_path / "m.onnx"
    assert main(["export", MODEL, "-o", str(out), "--checkpoint", str(ck)]) == 0
    assert out.is_file()


class _Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickled code ran')",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    ck = tmp_path / "evil.pth"
    with open(ck, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(ModelLoadError, match="weights-only"):
        load_checkpoint(ck)


def test_export_refuses_existing_output(tmp_path, legacy_export):
    out = tmp_path / "x.onnx"
    out.write_bytes(b"keep me")
    assert main(["export", MODEL, "-o", str(out)]) == 2
    assert out.read_bytes() == b"keep me"
