"""runtimes/tensorrt.py without a GPU: availability messages, the sidecar and its mismatch refusals, the build flow
against a *fake* `tensorrt` module (it checks vitc's control flow and files, not TensorRT), the `vitc engine` CLI
(compiler/tensorrt/engine.py, which also hands the runtime the fp16 conversion).
The tests marked `gpu` build and run a real engine; they are skipped here (no GPU has ever run them)."""

import json
import subprocess
import sys
import types

import numpy as np
import onnx
import pytest

from vitc.compiler.tensorrt import engine as E
from vitc.compiler.errors import RuntimeUnavailableError, VitcError
from vitc.runtimes import tensorrt as T
from vitc.tools.tiny_models import TinyConfig, tiny_vit

GPU = T.DeviceInfo("NVIDIA L4", "8.9")


def sidecar(**kw) -> T.EngineSidecar:
    base = dict(tensorrt_version="10.3.0", gpu_name="NVIDIA L4", compute_capability="8.9",
                inputs={"input": [1, 3, 32, 32]}, outputs={"logits": [1, 10]}, flags={"fp16": True})
    base.update(kw)
    return T.EngineSidecar(**base)


# -- fakes ------------------------------------------------------------------------------------------------------------
def fake_pycuda(monkeypatch, count=1, init_error=None, name="NVIDIA L4", cc=(8, 9)):
    drv = types.ModuleType("pycuda.driver")

    def init():
        if init_error:
            raise RuntimeError(init_error)

    class Device:
        def __init__(self, i):
            self.i = i

        @staticmethod
        def count():
            return count

        def name(self):
            return name

        def compute_capability(self):
            return cc

    drv.init, drv.Device = init, Device
    pkg = types.ModuleType("pycuda")
    pkg.driver = drv
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)


class FakeTrt(types.ModuleType):
    """Just enough of the TensorRT 10 Python API for build_engine's control flow; records what it was asked."""

    def __init__(self, version="10.99.0", parse_ok=True, build_ok=True):
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls: dict = {"parse": [], "flags": [], "pool": [], "cache_in": [], "profiles": []}
        trt = self

        class ILogger:
            class Severity:
                INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

            def __init__(self):
                pass

        class _T:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self):
                self.ins, self.outs = [], []

            num_inputs = property(lambda s: len(s.ins))
            num_outputs = property(lambda s: len(s.outs))

            def get_input(self, i):
                return self.ins[i]

            def get_output(self, i):
                return self.outs[i]

        class OnnxParser:
            num_errors = property(lambda s: 0 if parse_ok else 1)

            def __init__(self, network, logger):
                self.network = network

            def _load(self, m):
                for vi, dst in ((m.graph.input, self.network.ins), (m.graph.output, self.network.outs)):
                    for v in vi:
                        dst.append(_T(v.name, tuple(d.dim_value if d.HasField("dim_value") else -1
                                                    for d in v.type.tensor_type.shape.dim)))
                return parse_ok

            def parse(self, data, path=None):
                m = onnx.load_from_string(data)
                trt.calls["parse"].append(("bytes", m))
                return self._load(m)

            def parse_from_file(self, path):
                m = onnx.load(path)
                trt.calls["parse"].append(("file", m))
                return self._load(m)

            def get_error(self, i):
                return "In node 3 (importDequantizeLinear): fake error"

        class Cache:
            def __init__(self, blob):
                self.blob = blob

            def serialize(self):
                return b"CACHE:" + bytes(self.blob)

        class Config:
            def set_memory_pool_limit(self, pool, size):
                trt.calls["pool"].append((pool, size))

            def create_timing_cache(self, blob):
                trt.calls["cache_in"].append(bytes(blob))
                return Cache(blob)

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, profile):
                trt.calls["profiles"].append(dict(profile.shapes))
                return 0

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's keyword names
                self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                trt.calls["flags"].append(flags)
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"ENGINE-BYTES" if build_ok else None

        self.ILogger, self.Builder, self.OnnxParser = ILogger, Builder, OnnxParser
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Engine builds with the fake TensorRT write their default timing cache under a test folder, never the user's
    ~/.cache/vitc."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture
def outdir(tmp_path):
    """A `vitc build --target trt`-shaped folder (the tiny ViT's Q/DQ graph and a build.json)."""
    from vitc.compiler.driver.build import BuildConfig, CalibConfig, build
    from vitc.compiler.driver.pipeline import Target

    src = tmp_path / "vit.onnx"
    onnx.save(tiny_vit(TinyConfig(depth=1, dim=32, heads=2)), src)
    return build(BuildConfig(model=src, outdir=tmp_path / "out", target=Target.TRT, calib=CalibConfig(samples=2),
                             show_progress=False, search=False)).outdir


# -- import and availability ------------------------------------------------------------------------------------------
def test_importing_the_runtime_needs_neither_tensorrt_nor_pycuda():
    code = ("import sys, vitc.runtimes.tensorrt, vitc.compiler.tensorrt.engine, vitc.compiler.cli.main; "
            "assert 'tensorrt' not in sys.modules and 'pycuda' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_availability_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    a = T.availability()
    assert not a.ok and a.reason.startswith("tensorrt is not importable")
    with pytest.raises(RuntimeUnavailableError) as e:
        T.import_tensorrt()
    assert e.value.exit_code == 4 and "vitc[tensorrt]" in str(e.value)

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt())
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    a = T.availability()
    assert not a.ok and a.reason.startswith("pycuda is not importable") and a.tensorrt_version == "10.99.0"

    fake_pycuda(monkeypatch, count=0)
    assert T.availability().reason == "no CUDA device"
    fake_pycuda(monkeypatch, init_error="cuInit failed: no CUDA-capable device is detected")
    assert T.availability().reason == "no CUDA device (CUDA driver: cuInit failed: no CUDA-capable device is detected)"
    fake_pycuda(monkeypatch)
    a = T.availability()
    assert a.ok and a.device == GPU and "NVIDIA L4" in a.reason


# -- the sidecar -------------------------------------------------------------------------------------------------------
def test_sidecar_round_trip_and_validation(tmp_path):
    eng = tmp_path / "model.engine"
    T.write_sidecar(eng, sidecar())
    assert T.sidecar_path(eng).name == "model.engine.json"
    assert T.read_sidecar(eng) == sidecar()
    bad = {"missing": {"gpu_name": "x"}, "format": {**sidecar().to_json(), "format": 99},
           "shapes": {**sidecar().to_json(), "inputs": {"input": "1x3"}}, "empty": {**sidecar().to_json(),
                                                                                      "tensorrt_version": ""}}
    for what, data in bad.items():
        T.sidecar_path(eng).write_text(json.dumps(data))
        with pytest.raises(VitcError, match="vitc engine OUTDIR"):
            T.read_sidecar(eng)
    T.sidecar_path(eng).write_text("{not json")
    with pytest.raises(VitcError, match="unreadable sidecar"):
        T.read_sidecar(eng)
    T.sidecar_path(eng).unlink()
    with pytest.raises(VitcError, match="no sidecar"):
        T.read_sidecar(eng)


def test_mismatch_messages():
    T.check_compatible(sidecar(), "10.3.0", GPU)  # same version, same GPU: fine
    with pytest.raises(T.EngineMismatchError) as e:
        T.check_compatible(sidecar(), "10.7.0", GPU)
    msg = str(e.value)
    assert "built with TensorRT 10.3.0" in msg and "has TensorRT 10.7.0" in msg and "vitc engine" in msg
    assert "GPU" not in msg.split(";")[0] and e.value.exit_code == 4
    with pytest.raises(T.EngineMismatchError) as e:
        T.check_compatible(sidecar(), "10.3.0", T.DeviceInfo("NVIDIA A100-SXM4-80GB", "8.0"))
    assert "built for NVIDIA L4 (compute capability 8.9)" in str(e.value)
    assert "this GPU is NVIDIA A100-SXM4-80GB (compute capability 8.0)" in str(e.value)
    with pytest.raises(T.EngineMismatchError) as e:
        T.check_compatible(sidecar(), "10.7.0", T.DeviceInfo("Tesla T4", "7.5"))
    assert "TensorRT 10.3.0" in str(e.value) and "Tesla T4" in str(e.value)


def test_load_engine_refuses_another_version_before_deserializing(tmp_path, monkeypatch):
    eng = tmp_path / "model.engine"
    eng.write_bytes(b"ENGINE")
    T.write_sidecar(eng, sidecar(tensorrt_version="10.3.0"))
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt(version="10.7.0"))  # has no Runtime: must not get there
    fake_pycuda(monkeypatch)
    with pytest.raises(T.EngineMismatchError, match="refusing to load .*model.engine: it was built with TensorRT 10.3"):
        T.load_engine(eng)
    T.write_sidecar(eng, sidecar(tensorrt_version="10.7.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0"))
    with pytest.raises(T.EngineMismatchError, match="built for NVIDIA H100 80GB HBM3"):
        T.load_engine(eng)
    with pytest.raises(VitcError, match="no such engine"):
        T.load_engine(tmp_path / "nope.engine")


# -- build flow against the fake TensorRT ------------------------------------------------------------------------------
def test_build_engine_flow(outdir, tmp_path, monkeypatch):
    trt = FakeTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    fake_pycuda(monkeypatch)
    cache = tmp_path / "tc" / "timing.cache"
    eng = outdir / "model.engine"
    sc = E.build_engine(outdir / "model.int8.onnx", eng, fp16=True, workspace_mb=512, timing_cache=cache)
    assert eng.read_bytes() == b"ENGINE-BYTES" and cache.read_bytes() == b"CACHE:"
    assert trt.calls["flags"] == [1 << 5], "strongly typed network"
    assert trt.calls["pool"] == [(0, 512 << 20)] and trt.calls["cache_in"] == [b""]
    kind, parsed = trt.calls["parse"][0]
    assert kind == "bytes" and next(i.version for i in parsed.opset_import if i.domain == "") >= 19
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in parsed.graph.initializer), "fp16 float regions"
    on_disk = T.read_sidecar(eng)
    assert on_disk == sc and sc.tensorrt_version == "10.99.0" and sc.gpu_name == "NVIDIA L4"
    # the graph keeps the source's dynamic batch: one optimization profile over it, recorded in the sidecar
    assert sc.inputs == {"input": [-1, 3, 32, 32]} and sc.outputs == {"logits": [-1, 10]}
    assert trt.calls["profiles"] == [{"input": ((1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))}]
    assert sc.flags == {"strongly_typed": True, "fp16": True, "workspace_mb": 512, "timing_cache": str(cache),
                        "batch_profile": {"min": 1, "opt": 8, "max": 32}}
    assert len(sc.onnx_sha256) == 64 and sc.onnx == "model.int8.onnx"
    # second build: the cache is read back; --no-fp16 parses the file as it is (= trtexec --stronglyTyped)
    T.build_engine(outdir / "model.int8.onnx", eng, fp16=False, timing_cache=cache)
    assert trt.calls["cache_in"][1] == b"CACHE:" and trt.calls["parse"][1][0] == "file"
    assert all(t.data_type != onnx.TensorProto.FLOAT16 for t in trt.calls["parse"][1][1].graph.initializer)


def test_build_engine_errors(outdir, monkeypatch):
    fake_pycuda(monkeypatch)
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt(parse_ok=False))
    with pytest.raises(T.EngineBuildError, match="cannot parse the graph: In node 3 .*fake error") as e:
        T.build_engine(outdir / "model.int8.onnx", outdir / "model.engine", fp16=False)
    assert e.value.exit_code == 3 and "vitc check" in str(e.value)
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt(build_ok=False))
    with pytest.raises(T.EngineBuildError, match="built no engine"):
        T.build_engine(outdir / "model.int8.onnx", outdir / "model.engine", fp16=False)
    assert not (outdir / "model.engine").exists()
    with pytest.raises(VitcError, match="workspace"):
        T.build_engine(outdir / "model.int8.onnx", outdir / "model.engine", workspace_mb=0)
    with pytest.raises(ValueError, match="needs to_fp16"):  # the runtime imports no passes: the caller converts
        T.build_engine(outdir / "model.int8.onnx", outdir / "model.engine", fp16=True)


def test_engine_cli_with_fake_tensorrt(outdir, tmp_path, monkeypatch, capsys):
    from vitc.compiler.cli.main import main

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt())
    fake_pycuda(monkeypatch)
    rc = main(["engine", str(outdir), "--timing-cache", str(tmp_path / "c"), "--workspace-mb", "256"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert "wrote" in err and "NVIDIA L4" in err
    report = json.loads((outdir / "build.json").read_text())
    assert report["engine"]["built"] is True and report["engine"]["flags"]["workspace_mb"] == 256
    assert report["engine"]["flags"]["batch_profile"] == {"min": 1, "opt": 8, "max": 32}
    rc = main(["engine", str(outdir), "--force", "--min-batch", "2", "--opt-batch", "4", "--max-batch", "16"])
    assert rc == 0 and json.loads((outdir / "build.json").read_text())["engine"]["flags"]["batch_profile"] == \
        {"min": 2, "opt": 4, "max": 16}
    capsys.readouterr()
    assert main(["engine", str(outdir), "--force", "--min-batch", "8", "--max-batch", "4"]) == 2
    assert "min-batch" in capsys.readouterr().err
    assert main(["engine", str(outdir)]) == 2  # exists: --force needed
    capsys.readouterr()


def test_default_timing_cache_is_per_version_and_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    p = T.default_timing_cache("10.3.0", T.DeviceInfo("NVIDIA GeForce RTX 4090", "8.9"))
    assert p == tmp_path / "vitc" / "trt-10.3.0-NVIDIA-GeForce-RTX-4090-sm8.9.timing-cache"


# -- on a GPU host only ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("fp16", [False, True])
def test_gpu_engine_matches_onnxruntime(outdir, fp16):
    from conftest import ort_run, sqnr_db

    eng = outdir / "model.engine"
    sc = E.build_engine(outdir / "model.int8.onnx", eng, fp16=fp16, batch=T.BatchProfile(1, 4, 8))
    assert sc.inputs == {"input": [-1, 3, 32, 32]}
    runner = T.TrtRunner(eng)
    try:
        for b in (1, 4, 8):  # any batch of the profile
            x = np.random.default_rng(b).standard_normal((b, 3, 32, 32)).astype(np.float32)
            got = runner.run({"input": x})[0]
            ref = ort_run(outdir / "model.int8.onnx", {"input": x})[0]
            assert got.shape == ref.shape and sqnr_db(ref, got) > 20.0
        with pytest.raises(VitcError, match="batch 9"):
            runner.run({"input": np.zeros((9, 3, 32, 32), np.float32)})
        times = runner.time_ms({"input": x}, warmup=2, iters=5)
        assert len(times) == 5 and min(times) > 0
    finally:
        runner.close()


@pytest.mark.gpu
def test_gpu_refuses_an_engine_from_another_version(outdir):
    eng = outdir / "model.engine"
    T.build_engine(outdir / "model.int8.onnx", eng, fp16=False)
    sc = T.read_sidecar(eng)
    sc.tensorrt_version = "0.0.1"
    T.write_sidecar(eng, sc)
    with pytest.raises(T.EngineMismatchError):
        T.load_engine(eng)
