"""Load and validate an ONNX model: format, opset, external data confinement, fixed input shapes."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from vitc.compiler.errors import ModelLoadError
from vitc.passes.graphutil import PROTOBUF_LIMIT, infer_shapes

log = logging.getLogger(__name__)

MIN_OPSET = 13
MAX_OPSET = 23
MAX_PROTO_BYTES = PROTOBUF_LIMIT  # no .onnx file can be larger; bigger models keep their weights external
_SUB_BYTE_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
                   if hasattr(onnx.TensorProto, n)}  # packed two or four to a byte: not checked


@dataclass
class LoadedModel:
    """A validated model with every graph input shape fixed."""

    model: onnx.ModelProto
    path: Path
    opset: int
    fixed_dims: dict[str, list[str]] = field(default_factory=dict)  # input -> ["dim 0: 'batch_size' -> 1", ...]
    batch_symbols: dict[str, str] = field(default_factory=dict)  # input -> name of its dynamic batch dim (dim 0)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.model.graph.input if i.name not in _initializer_names(self.model)]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]


@dataclass(frozen=True)
class GraphInput:
    """A graph input as the model declares it."""

    name: str
    dims: tuple[int | None, ...] | None  # None: no shape at all; a None dim: dynamic (dim_params names it)
    dim_params: tuple[str, ...]
    dtype: np.dtype | None  # None: an element type numpy has no dtype for
    elem_type: str  # the ONNX element type's name ("undefined" when unset)


def graph_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    """The model's graph inputs that are not initializers, with their declared shapes and types."""
    inits = _initializer_names(model)
    out = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = params = None
        if tt.HasField("shape"):
            dims = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                         for d in tt.shape.dim)
            params = tuple(d.dim_param for d in tt.shape.dim)
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            dtype = None
        name = onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else "undefined"
        out.append(GraphInput(i.name, dims, params or (), dtype, name))
    return out


def _initializer_names(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelLoadError("model declares no default-domain opset", hint="re-export it with opset >= 13")


def _check_external_data(model: onnx.ModelProto, base_dir: Path, path: Path) -> None:
    """Refuse external-data locations that leave the model's folder (absolute, '..', symlinks out)."""
    root = base_dir.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        target = (base_dir / loc).resolve()
        if os.path.isabs(loc) or ".." in Path(loc).parts or not target.is_relative_to(root):
            raise ModelLoadError(
                f"{path}: initializer {tensor.name!r} points to external data {loc!r} outside the model folder",
                hint="refusing it; keep external data files next to the model",
            )
        if not target.is_file():
            raise ModelLoadError(f"{path}: external data file {loc!r} for {tensor.name!r} is missing",
                                 hint="copy it next to the model")
        if (base_dir / loc).is_symlink():  # onnx refuses to read through links, even ones that stay inside
            raise ModelLoadError(f"{path}: external data file {loc!r} for {tensor.name!r} is a symbolic link",
                                 hint="replace the link with the file itself")


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Every initializer and Constant value must hold as many values as its shape declares (a damaged or hand-edited
    file otherwise fails much later, inside ONNX Runtime, with a trace)."""
    for t in external_data_helper._get_all_tensors(model):
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        except (KeyError, TypeError, ValueError):
            continue
        if dtype.kind in "OSU" or t.data_type in _SUB_BYTE_TYPES:
            continue
        want = math.prod(t.dims)
        raw = len(t.raw_data) if t.HasField("raw_data") else None
        if raw is not None:
            have = raw // dtype.itemsize if raw % dtype.itemsize == 0 else -1
        else:
            per_value = 2 if dtype.kind == "c" else 1
            have = len(getattr(t, onnx.helper.tensor_dtype_to_field(t.data_type))) // per_value
        if have != want:
            held = f"{raw} bytes" if raw is not None else f"{have} values"
            raise ModelLoadError(f"{path}: tensor {t.name!r} declares shape {list(t.dims)} ({want} values) "
                                 f"but holds {held}", hint="the file is damaged; re-export the model")


def load_model(path: str | os.PathLike, *, batch: int = 1, input_shapes: dict[str, list[int]] | None = None) -> LoadedModel:
    """Read ``path``, check it, fix dynamic input dims (batch -> ``batch``) and run shape inference."""
    path = Path(path)
    if batch < 1:
        raise ModelLoadError(f"batch size {batch} is not valid", hint="give --batch 1 or more")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, not a model file", hint="give the path of an .onnx model")
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file", hint="give the path of an .onnx model")
    size = path.stat().st_size
    if size > MAX_PROTO_BYTES:  # refuse before reading gigabytes that protobuf cannot parse
        raise ModelLoadError(f"{path}: {size} bytes, over the 2 GiB protobuf limit for one .onnx file",
                             hint="save the weights as external data (onnx.save(..., save_as_external_data=True))")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, truncated files, random bytes
        raise ModelLoadError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]})",
            hint="check the file is a complete .onnx export",
        ) from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes)", hint="check the file is a complete .onnx export")
    try:
        opset = default_opset(model)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc.message}", hint=exc.hint) from None
    if opset < MIN_OPSET:
        raise ModelLoadError(
            f"{path}: opset {opset} is not supported (need >= {MIN_OPSET})",
            hint="re-export the model with a newer opset (torch.onnx.export(..., opset_version=17))",
        )
    if opset > MAX_OPSET:
        raise ModelLoadError(f"{path}: opset {opset} is newer than vitc supports (<= {MAX_OPSET})",
                             hint=f"re-export the model with opset {MAX_OPSET} or lower")
    _check_external_data(model, path.parent, path)
    if any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model)):
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # offsets past the end of the file, unreadable files, onnx's own checks
            raise ModelLoadError(f"{path}: cannot read its external data ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:200]})",
                                 hint="re-save the model with its external data next to it") from None
    _check_tensor_sizes(model, path)

    symbols: dict[str, str] = {}
    fixed = _fix_input_shapes(model, batch, input_shapes or {}, path, symbols)
    try:
        model = infer_shapes(model)  # also past protobuf's 2 GiB limit (external-data models)
    except Exception as exc:
        raise ModelLoadError(f"{path}: ONNX shape inference failed: {str(exc)[:200]}") from None
    return LoadedModel(model=model, path=path, opset=opset, fixed_dims=fixed, batch_symbols=symbols)


def _fix_input_shapes(model: onnx.ModelProto, batch: int, overrides: dict[str, list[int]], path: Path,
                      batch_symbols: dict[str, str]) -> dict[str, list[str]]:
    """Fix every dynamic input dim; ``batch_symbols`` receives input -> name of each dynamic dim 0 fixed to
    ``batch`` (not the ones ``overrides`` fix)."""
    inits = _initializer_names(model)
    fixed: dict[str, list[str]] = {}
    symbols: dict[str, int] = {}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for name, want in overrides.items():
        if name not in names:
            raise ModelLoadError(f"{path}: --input-shape names {name!r}, which is not a model input",
                                 hint=f"the model inputs are {names}")
        if any(v < 1 for v in want):
            raise ModelLoadError(f"{path}: --input-shape {name}={','.join(map(str, want))} has a dim < 1",
                                 hint="every dim must be a positive integer")
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        if not tt.HasField("shape"):
            raise ModelLoadError(f"{path}: input {inp.name!r} has no shape", hint="pass --input-shape NAME=1,3,224,224")
        dims = tt.shape.dim
        if inp.name in overrides:
            want = overrides[inp.name]
            if len(want) != len(dims):
                raise ModelLoadError(f"{path}: --input-shape for {inp.name!r} has rank {len(want)}, model has {len(dims)}")
            for i, (d, v) in enumerate(zip(dims, want)):
                if d.HasField("dim_value") and d.dim_value != v:
                    raise ModelLoadError(f"{path}: input {inp.name!r} dim {i} is fixed to {d.dim_value}, not {v}")
                if not d.HasField("dim_value"):
                    fixed.setdefault(inp.name, []).append(f"dim {i}: {d.dim_param or '?'!r} -> {v}")
                    if d.dim_param:
                        symbols[d.dim_param] = v
                d.Clear()
                d.dim_value = v
            continue
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if i != 0:
                example = ",".join(str(batch) if j == 0 else
                                   str(x.dim_value) if x.HasField("dim_value") and x.dim_value > 0 else
                                   f"<{x.dim_param or f'dim{j}'}>" for j, x in enumerate(dims))
                raise ModelLoadError(
                    f"{path}: input {inp.name!r} dim {i} ({d.dim_param or '?'}) is dynamic and is not the batch dim",
                    hint=f"fix its size with --input-shape {inp.name}={example}",
                )
            name = d.dim_param
            fixed.setdefault(inp.name, []).append(f"dim 0: {name or '?'!r} -> {batch}")
            batch_symbols[inp.name] = name or "batch"
            if name:
                symbols[name] = batch
            d.Clear()
            d.dim_value = batch
    # Propagate the fixed symbols into declared outputs, drop stale value_info so inference recomputes it.
    for out in model.graph.output:
        tt = out.type.tensor_type
        if tt.HasField("shape"):
            for d in tt.shape.dim:
                if d.HasField("dim_param") and d.dim_param in symbols:
                    v = symbols[d.dim_param]
                    d.Clear()
                    d.dim_value = v
    del model.graph.value_info[:]
    return fixed
