"""The build declared as stages (compiler/driver/stages.py) and the front end every command shares (compiler/driver/frontend.py):
every name `--dump-after` accepts writes a dump, and build, explain and analyze see the same plan."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import onnx
import pytest
from conftest import cli

from vitc.compiler.driver.build import BuildConfig, Precision
from vitc.compiler.cli.main import format_plan
from vitc.compiler.driver.frontend import front_end
from vitc.compiler.driver.pipeline import Target
from vitc.compiler.driver.stages import build_stages, dump_names
from vitc.passes.annotate import annotate

FAST = ["--calib-samples", "4"]
# the configurations whose builds below write dumps: together they name every --dump-after name
CONFIGS = [("ort", ()), ("trt", ()), ("ort", ("--no-search",)), ("trt", ("--no-search",)), ("openvino", ()),
           ("ort", ("--rotate",))]
BUILDABLE = [c if c[0] != "openvino" or importlib.util.find_spec("openvino") else
             pytest.param(*c, marks=pytest.mark.skip(reason="openvino is not installed")) for c in CONFIGS]


def _declared_dumps(model: Path, target: str, extra: tuple[str, ...]) -> list[str]:
    cfg = BuildConfig(model=model, outdir=model, target=Target(target), search="--no-search" not in extra,
                      rotate="--rotate" in extra)
    return [n for st in build_stages(cfg) for n in st.dumps]


def test_the_configurations_below_cover_every_dump_name():
    covered = {n for target, extra in CONFIGS for n in _declared_dumps(Path("m.onnx"), target, extra)}
    assert covered == set(dump_names())
    assert dump_names()[:5] == ["canonicalize", "fuse_layernorm", "fuse_gelu", "fuse_matmul_add",
                                "fold_channel_scale"]
    assert {"migrate_scales", "insert_qdq", "trt_lower", "ov_lower", "fuse_attention", "sink_reshapes",
            "dynamic_batch"} <= set(dump_names())


def test_build_help_lists_the_declared_names(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(capsys, "build", "--help")
    assert exc.value.code == 0
    assert f"PASS: {', '.join(dump_names())})" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("target,extra", BUILDABLE)
def test_dump_after_every_name_writes_it(capsys, tmp_path, vit_path, target, extra):
    """Each name given on its own (not 'all'): a dump per stage that declares it, numbered in build order."""
    out = tmp_path / "out"
    asked = [x for n in dump_names() for x in ("--dump-after", n)]
    rc, _, err = cli(capsys, "build", vit_path, "-o", out, "--target", target, *extra, *FAST, *asked)
    assert rc == 0, err
    declared = _declared_dumps(vit_path, target, extra)
    assert sorted(os.listdir(out / "dumps")) == [f"after_{i:02d}_{n}.onnx" for i, n in enumerate(declared, 1)]
    assert "migrate_scales" in declared and "dynamic_batch" in declared
    for name in os.listdir(out / "dumps"):
        onnx.checker.check_model(str(out / "dumps" / name))
    last = onnx.load(out / "dumps" / f"after_{len(declared):02d}_dynamic_batch.onnx")
    assert last.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_dump_after_migrate_scales_on_the_search_path(capsys, tmp_path, vit_path):
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "build", vit_path, "-o", out, "--dump-after", "migrate_scales", *FAST)
    assert rc == 0, err
    assert os.listdir(out / "dumps") == ["after_07_migrate_scales.onnx"]  # after the fc2 Hadamard (ORT default)
    dumped = onnx.load(out / "dumps" / "after_07_migrate_scales.onnx")
    ops = [n.op_type for n in dumped.graph.node]
    assert "QuantizeLinear" not in ops and "Mul" in ops  # migrated (a Mul before fc2), not yet quantized


def test_seconds_keys_follow_the_stages(capsys, tmp_path, vit_path):
    for extra, middle in (((), ["range search + migration"]), (("--no-search",), ["migration + recalibration"]),
                          (("--no-search", "--no-migrate"), [])):
        out = tmp_path / f"out{len(extra)}"
        rc, _, err = cli(capsys, "build", vit_path, "-o", out, *extra, *FAST)
        assert rc == 0, err
        seconds = json.loads((out / "build.json").read_text())["seconds"]
        assert list(seconds) == ["load", "float passes", "float check", "calibration", *middle, "insert_qdq",
                                 "save + check", "total"]
        assert ("recalibrating: the fixed-strength migration" in err) == (extra == ("--no-search",))


def test_front_end_is_the_builds_first_stages(vit_path):
    for precision in Precision:
        cfg = BuildConfig(model=vit_path, outdir=vit_path, precision=precision)
        names = [st.name for st in build_stages(cfg) if st.front_end]
        if precision is Precision.INT8:
            assert names == ["load", "canonicalize", "fuse_layernorm", "fuse_gelu", "fuse_matmul_add",
                             "fold_channel_scale", "fc2_hadamard", "annotate", "plan"]
    fe = front_end(vit_path)
    assert [r.name for r in fe.results] == ["canonicalize", "fuse_layernorm", "fuse_gelu", "fuse_matmul_add",
                                            "fold_channel_scale", "fc2_hadamard", "annotate"]
    assert fe.roles == annotate(fe.graph) and fe.results[-1].artifacts == fe.roles
    assert fe.plan.quantized() and fe.float_passes == fe.results[:-1]


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_build_explain_and_analyze_share_the_plan(capsys, tmp_path, vit_path, target):
    fe = front_end(vit_path, Target(target))
    rc, table, err = cli(capsys, "explain", vit_path, "--target", target)
    assert rc == 0, err
    assert table == format_plan(fe.plan, fe.roles, fe.graph) + "\n"

    out = tmp_path / "built"
    rc, _, err = cli(capsys, "build", vit_path, "-o", out, "--target", target, "--no-search", "--no-migrate", *FAST)
    assert rc == 0, err
    built = json.loads((out / "build.json").read_text())
    for entry in built["policy"]["nodes"]:
        del entry["qparams"]
    assert built["policy"] == fe.plan.to_json()
    assert built["float_ops"] == fe.float_ops

    rc, _, err = cli(capsys, "analyze", vit_path, "-o", tmp_path / "an", "--target", target, "--samples", "1",
                     "--maps", "1", *FAST)
    assert rc == 0, err
    analysed = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert analysed["policy"]["plan"] == fe.plan.to_json()
