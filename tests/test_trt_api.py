"""runtimes/tensorrt.py's use of the TensorRT Python API, checked against the real `tensorrt` package where its wheel
installs (no GPU needed: only names, enums and methods are looked up). Skips elsewhere, with the reason."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[1] / "runtimes" / "tensorrt.py"

# the objects runtimes/tensorrt.py calls methods on -> their TensorRT class
RECEIVERS = {"builder": "IBuilder", "config": "IBuilderConfig", "network": "INetworkDefinition",
             "parser": "OnnxParser", "profile": "IOptimizationProfile", "engine": "ICudaEngine",
             "context": "IExecutionContext", "runtime": "Runtime"}


def used_api() -> tuple[set[str], dict[str, set[str]]]:
    """Module attributes (``trt.X.Y``) and methods per receiver class that runtimes/tensorrt.py uses."""
    src = RUNTIME.read_text()
    attrs = {m for m in re.findall(r"\btrt\.([A-Za-z_][\w.]*)", src) if not m.startswith("__")}
    methods: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base = node.func.value
            name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
            if name in RECEIVERS:
                methods.setdefault(RECEIVERS[name], set()).add(node.func.attr)
    return attrs, methods


def test_the_scan_finds_what_the_engine_flow_needs():
    attrs, methods = used_api()
    assert {"Builder", "OnnxParser", "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "MemoryPoolType.WORKSPACE"} <= attrs
    assert {"create_optimization_profile", "build_serialized_network"} <= methods["IBuilder"]
    assert {"set_shape"} <= methods["IOptimizationProfile"] and {"add_optimization_profile"} <= methods["IBuilderConfig"]
    assert {"set_input_shape", "execute_async_v3", "set_tensor_address"} <= methods["IExecutionContext"]


def test_names_exist_in_the_real_tensorrt():
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or the stub wheel's missing libraries
        pytest.skip(f"the tensorrt wheel is not installed here ({type(exc).__name__}); PyPI's `tensorrt` fetches its "
                    "libraries from NVIDIA's index at install time")
    attrs, methods = used_api()
    missing = []
    for dotted in sorted(attrs):
        obj = trt
        for part in dotted.split("."):
            if not hasattr(obj, part):
                missing.append(f"trt.{dotted}")
                break
            obj = getattr(obj, part)
    for cls, names in methods.items():
        for m in sorted(names):
            if not hasattr(getattr(trt, cls), m):
                missing.append(f"trt.{cls}.{m}")
    assert not missing, f"TensorRT {trt.__version__} lacks {missing}"
