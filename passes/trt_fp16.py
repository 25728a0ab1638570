"""TensorRT only: a copy of a Q/DQ graph whose float regions are fp16, for a strongly typed engine.

A strongly typed TensorRT network takes every precision from the graph and refuses the FP16 builder flag, so
"float regions in fp16" has to be written into the ONNX (what NVIDIA's ModelOpt AutoCast does): every float32
constant becomes fp16 (Q/DQ scales too: a DequantizeLinear's output type is its scale's type, which needs opset
19, so older graphs go through ``onnx.version_converter`` first), graph inputs are cast to fp16 on entry and
outputs back to fp32, so the interface does not change. LayerNormalization stays fp32 by default (cast in and
out): a ViT's residual stream carries outlier channels in the hundreds, whose squares overflow fp16 (65504).

The int8 parts are untouched. The result runs in ONNX Runtime (CPU), which is how it is tested here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vitc.errors import PassError

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
MAX_SCALE_ERROR = 0.01  # relative rounding error of a Q/DQ scale in fp16 (subnormal below 6.1e-5)
MIN_OPSET = 19  # QuantizeLinear/DequantizeLinear with fp16 scales
# inputs that must stay float32 whatever the data type (ONNX type constraints): op -> input indices
FLOAT32_ONLY_INPUTS = {"Resize": (2,), "Upsample": (1,)}


@dataclass(frozen=True)
class Fp16Options:
    keep_fp32_ops: tuple[str, ...] = ("LayerNormalization",)


def _opset(model: onnx.ModelProto) -> int:
    return next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)


def _to_fp16_array(a: np.ndarray, name: str) -> np.ndarray:
    finite = a[np.isfinite(a)]
    if finite.size and float(np.abs(finite).max()) > FP16_MAX:
        raise PassError("trt_fp16", f"constant {name!r} holds {float(np.abs(finite).max()):.4g}, beyond fp16's range",
                        hint="build the engine with --no-fp16")
    return a.astype(np.float16)


def to_fp16(model: onnx.ModelProto, options: Fp16Options = Fp16Options()) -> onnx.ModelProto:
    """The fp16 version of ``model`` (not modified). Raises PassError if a constant does not fit fp16."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if _opset(m) < MIN_OPSET:
        try:
            m = onnx.version_converter.convert_version(m, MIN_OPSET)
        except Exception as exc:
            raise PassError("trt_fp16", f"cannot convert the graph to opset {MIN_OPSET} for fp16 Q/DQ scales "
                                        f"({type(exc).__name__}: {exc})",
                            hint="build the engine with --no-fp16") from None
    g = m.graph
    keep_nodes = [n for n in g.node if n.op_type in options.keep_fp32_ops]
    keep_ids = {id(n) for n in keep_nodes}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # constants that stay float32: used only by fp32 nodes or by inputs ONNX types as float32
    stay32 = set()
    for n in g.node:
        for k in FLOAT32_ONLY_INPUTS.get(n.op_type, ()):
            if len(n.input) > k and n.input[k]:
                stay32.add(n.input[k])
    consts = {t.name for t in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant" and n.output}
    for t, cs in consumers.items():
        if t in consts and cs and all(id(c) in keep_ids for c in cs):
            stay32.add(t)
    scale_names = {n.input[1] for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                   and len(n.input) > 1}
    converted = 0
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT and t.name not in stay32:
            a = numpy_helper.to_array(t)
            h = _to_fp16_array(a, t.name)
            if t.name in scale_names and a.size:
                err = float(np.max(np.abs(h.astype(np.float64) - a) / np.maximum(np.abs(a), 1e-45)))
                if err > MAX_SCALE_ERROR:
                    raise PassError("trt_fp16", f"Q/DQ scale {t.name!r} (min {float(a.min()):.3g}) loses {err:.1%} "
                                                "in fp16", hint="build the engine with --no-fp16")
            t.CopyFrom(numpy_helper.from_array(h, t.name))
            converted += 1
    for n in g.node:
        if n.op_type in ("Constant", "ConstantOfShape") and not (n.output and n.output[0] in stay32):
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(_to_fp16_array(numpy_helper.to_array(a.t), n.name),
                                                         a.t.name))
                elif a.name in ("value_float", "value_floats"):
                    raise PassError("trt_fp16", f"Constant {n.name!r} uses {a.name}", node=n.name,
                                    hint="build the engine with --no-fp16")
        elif n.op_type == "Cast" and n.op_type not in options.keep_fp32_ops:
            for a in n.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
    new_nodes: list[onnx.NodeProto] = []
    # graph inputs: cast to fp16 on entry
    rename: dict[str, str] = {}
    for inp in g.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT and inp.name not in {t.name for t in g.initializer}:
            rename[inp.name] = f"{inp.name}.fp16"
            new_nodes.append(helper.make_node("Cast", [inp.name], [rename[inp.name]], name=f"{inp.name}.to_fp16",
                                              to=TensorProto.FLOAT16))
    outputs = {o.name for o in g.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
    out_rename = {o: f"{o}.fp16" for o in outputs}
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
            elif i in out_rename:
                n.input[k] = out_rename[i]
        for k, o in enumerate(n.output):
            if o in out_rename:
                n.output[k] = out_rename[o]
        if id(n) in keep_ids:
            for k, i in enumerate(n.input):
                if i and i not in stay32:
                    cast_out = f"{i}.fp32.{n.name or n.op_type}.{k}"
                    new_nodes.append(helper.make_node("Cast", [i], [cast_out], name=f"{cast_out}.Cast",
                                                      to=TensorProto.FLOAT))
                    n.input[k] = cast_out
            post = []
            for k, o in enumerate(n.output):
                if o:
                    n.output[k] = f"{o}.fp32"
                    post.append(helper.make_node("Cast", [n.output[k]], [o], name=f"{o}.to_fp16",
                                                 to=TensorProto.FLOAT16))
            new_nodes.append(n)
            new_nodes.extend(post)
            continue
        new_nodes.append(n)
    for o in g.output:
        if o.name in out_rename:
            new_nodes.append(helper.make_node("Cast", [out_rename[o.name]], [o.name], name=f"{o.name}.to_fp32",
                                              to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        onnx.checker.check_model(m)
    except Exception as exc:
        raise PassError("trt_fp16", f"the fp16 graph is not valid ONNX ({type(exc).__name__}: "
                                    f"{' '.join(str(exc).split())[:300]})",
                        hint="build the engine with --no-fp16") from None
    log.debug("fp16: %d initializers converted, %d ops kept fp32", converted, len(keep_nodes))
    return m

