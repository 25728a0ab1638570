"""The compiler's side of TensorRT engines: `vitc engine OUTDIR` and the engine step of `vitc build --target trt`.

runtimes/tensorrt.py builds, loads and runs engines and imports nothing of the compiler or the passes
(tests/test_layering.py). This module wires in what an engine build from a vitc OUTDIR needs from them: the fp16
copy of the graph (passes/trt_fp16.py), the TensorRT rule check (compiler/tensorrt/check.py), OUTDIR's files
(model.int8.onnx, build.json) and the messages the CLI prints.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vitc.errors import OutputError, RuntimeUnavailableError, VitcError
from vitc.runtimes import tensorrt as trt_runtime
from vitc.runtimes.tensorrt import (DEFAULT_WORKSPACE_MB, ENGINE_NAME, INSTALL_HINT, Availability, BatchProfile,
                                    EngineSidecar, availability, sidecar_path)

log = logging.getLogger(__name__)

ONNX_NAME = "model.int8.onnx"
REPORT_NAME = "build.json"


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, fp16: bool = True,
                 workspace_mb: int = DEFAULT_WORKSPACE_MB, timing_cache: str | os.PathLike | None = None,
                 batch: BatchProfile = BatchProfile()) -> EngineSidecar:
    """:func:`vitc.runtimes.tensorrt.build_engine`, handing TensorRT the fp16 copy of the graph
    (:func:`vitc.passes.trt_fp16.to_fp16`) when ``fp16``; ``fp16=False`` builds the graph as it is."""
    from vitc.passes.trt_fp16 import to_fp16

    return trt_runtime.build_engine(onnx_path, engine_path, fp16=fp16, workspace_mb=workspace_mb,
                                    timing_cache=timing_cache, to_fp16=to_fp16 if fp16 else None, batch=batch)


def build_commands(outdir: str | os.PathLike) -> tuple[str, str]:
    """The two ways to build the engine on a GPU host: (vitc command, trtexec command with fp32 float regions)."""
    import shlex

    d = str(outdir)
    q = shlex.quote
    return (f"vitc engine {q(d)}",
            f"trtexec --onnx={q(os.path.join(d, 'model.int8.onnx'))} --stronglyTyped "
            f"--saveEngine={q(os.path.join(d, ENGINE_NAME))}{_trtexec_shapes(Path(d) / ONNX_NAME)}")


def _trtexec_shapes(onnx_path: Path, batch: BatchProfile = BatchProfile()) -> str:
    """trtexec's --minShapes/--optShapes/--maxShapes for the inputs with a dynamic batch ('' when there are none),
    the same profile `vitc engine` builds by default."""
    try:
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception:  # no graph to read: the plain command
        return ""
    inits = {t.name for t in graph.initializer}
    dyn = {}
    for i in graph.input:
        dims = i.type.tensor_type.shape.dim
        if i.name in inits or not dims or dims[0].HasField("dim_value"):
            continue
        if any(not d.HasField("dim_value") for d in dims[1:]):
            return ""
        dyn[i.name] = [d.dim_value for d in dims]
    if not dyn:
        return ""
    flags = []
    for flag, shapes in (("min", 0), ("opt", 1), ("max", 2)):
        spec = ",".join(f"{n}:{'x'.join(map(str, batch.shapes(s)[shapes]))}" for n, s in dyn.items())
        flags.append(f" --{flag}Shapes={spec}")
    return "".join(flags)


# -- the CLI's engine steps (`vitc build --target trt`, `vitc engine OUTDIR`) -----------------------------------------
@dataclass(frozen=True)
class EngineConfig:
    fp16: bool = True  # float regions in fp16 (the graph handed to TensorRT is converted; see passes/trt_fp16.py)
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    timing_cache: Path | None = None  # None: one per TensorRT version and GPU under ~/.cache/vitc
    force: bool = False  # replace an existing model.engine
    batch: BatchProfile = BatchProfile()  # the batch sizes a dynamic-batch graph's engine accepts


def require_available(what: str) -> Availability:
    """Availability, or RuntimeUnavailableError (exit 4) naming ``what`` needed it and why it is missing."""
    a = availability()
    if not a.ok:
        raise RuntimeUnavailableError(f"{what}: cannot build a TensorRT engine here: {a.reason}", hint=INSTALL_HINT)
    return a


def not_built_message(outdir: str, reason: str) -> str:
    """The one line `vitc build --target trt` logs when it cannot build the engine."""
    vitc_cmd, trtexec_cmd = build_commands(outdir)
    return (f"TensorRT engine not built: {reason}; model.int8.onnx is the TensorRT-ready graph. On a GPU host run "
            f"`{vitc_cmd}` (float regions fp16), or without vitc `{trtexec_cmd}` (float regions fp32, the same as "
            f"`{vitc_cmd} --no-fp16`)")


def record_engine(outdir: Path, entry: dict) -> None:
    """Add what happened to the engine to OUTDIR/build.json (best effort: the build itself is complete)."""
    p = outdir / REPORT_NAME
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
        report["engine"] = entry
        p.write_text(json.dumps(report, indent=2), encoding="utf-8")
    except (OSError, ValueError) as exc:
        log.debug("could not record the engine step in %s: %s", p, exc)


def engine_in_outdir(outdir: str | os.PathLike, cfg: EngineConfig = EngineConfig()) -> EngineSidecar:
    """`vitc engine OUTDIR`: build OUTDIR/model.engine (+ sidecar) from OUTDIR/model.int8.onnx."""
    d = Path(outdir)
    onnx_path = d / ONNX_NAME
    if not d.is_dir():
        raise VitcError(f"{d}: no such folder", hint="give the OUTDIR of `vitc build MODEL --target trt -o OUTDIR`")
    if not onnx_path.is_file():
        raise VitcError(f"{d}: has no {ONNX_NAME}", hint="build it first: vitc build MODEL --target trt -o OUTDIR")
    engine = d / ENGINE_NAME
    if engine.exists() and not cfg.force:
        raise OutputError(f"{engine}: already exists", hint="pass --force to rebuild it")
    from vitc.compiler.tensorrt.check import check_file

    rep = check_file(onnx_path)
    if not rep.ok:
        log.warning("%s breaks %d TensorRT rule(s) (`vitc check %s --target trt` lists them); TensorRT may refuse "
                    "it or run parts unfused", onnx_path, len(rep.violations), onnx_path)
    require_available(f"vitc engine {d}")
    sidecar = build_engine(onnx_path, engine, fp16=cfg.fp16, workspace_mb=cfg.workspace_mb,
                           timing_cache=cfg.timing_cache, batch=cfg.batch)
    record_engine(d, {"built": True, "engine": ENGINE_NAME, "sidecar": sidecar_path(engine).name,
                      **sidecar.to_json()})
    return sidecar
