"""--cpu: the saturation guard follows the deployment CPU's int8 class; recorded in build.json and the model, and
`vitc bench` warns when a model built for VNNI is timed on a CPU without it."""

from __future__ import annotations

import json

import onnx
import pytest

from vitc.compiler.measure import bench as B
from vitc.compiler.driver import build as BLD
from vitc.compiler.driver.build import BuildConfig, CalibConfig, CpuKind, build, detect_cpu, uses_pair_safe_weights
from vitc.compiler.driver.pipeline import Target


@pytest.mark.parametrize("flags,kind", [({"avx2"}, CpuKind.AVX2), ({"avx2", "avx512_vnni"}, CpuKind.VNNI),
                                        ({"avx_vnni"}, CpuKind.VNNI), ({"amx_int8", "avx512_vnni"}, CpuKind.AMX),
                                        (set(), CpuKind.AVX2)])
def test_detect(flags, kind):
    assert detect_cpu(flags) is kind


def test_guard_only_without_vnni_on_ort(tmp_path):
    cfg = BuildConfig(model=tmp_path / "m.onnx", outdir=tmp_path / "o")
    from dataclasses import replace

    assert uses_pair_safe_weights(replace(cfg, cpu=CpuKind.AVX2))
    assert not uses_pair_safe_weights(replace(cfg, cpu=CpuKind.VNNI))
    assert not uses_pair_safe_weights(replace(cfg, cpu=CpuKind.AMX))
    assert not uses_pair_safe_weights(replace(cfg, cpu=CpuKind.AVX2, target=Target.TRT))
    assert not uses_pair_safe_weights(replace(cfg, cpu=CpuKind.AVX2, pair_safe_weights=False))


def test_recorded_and_bench_warns(tmp_path, vit_path, monkeypatch):
    res = {}
    for kind in (CpuKind.AVX2, CpuKind.VNNI):
        res[kind] = build(BuildConfig(model=vit_path, outdir=tmp_path / kind.value, cpu=kind,
                                      calib=CalibConfig(samples=2), show_progress=False))
        rep = json.loads((res[kind].outdir / "build.json").read_text())["cpu"]
        assert rep["built_for"] == kind.value and rep["saturation_guard"] is (kind is CpuKind.AVX2)
        meta = {p.key: p.value for p in onnx.load(res[kind].model_path).metadata_props}
        assert meta.get(BLD.CPU_METADATA_KEY) == (None if kind is CpuKind.AVX2 else kind.value)  # only unguarded
    # the guard changes the weights
    assert res[CpuKind.AVX2].model_path.read_bytes() != res[CpuKind.VNNI].model_path.read_bytes()
    monkeypatch.setattr(BLD, "cpu_flags", lambda: {"avx2"})
    warned = B.warn_cpu_mismatch([res[CpuKind.AVX2].model_path, res[CpuKind.VNNI].model_path])
    assert len(warned) == 1 and "VNNI" in warned[0] and "--cpu avx2" in warned[0]
    monkeypatch.setattr(BLD, "cpu_flags", lambda: {"avx2", "avx512_vnni"})
    assert B.warn_cpu_mismatch([res[CpuKind.VNNI].model_path]) == []
    # an AVX2 build with the guard turned off warns too
    off = build(BuildConfig(model=vit_path, outdir=tmp_path / "off", cpu=CpuKind.AVX2, pair_safe_weights=False,
                            calib=CalibConfig(samples=2), show_progress=False))
    monkeypatch.setattr(BLD, "cpu_flags", lambda: {"avx2"})
    assert len(B.warn_cpu_mismatch([off.model_path])) == 1
