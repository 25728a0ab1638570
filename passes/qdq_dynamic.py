"""ORT only, part of Q/DQ insertion: a Gemm whose input range is computed per inference (``--dynamic ROLE``).

The Gemm becomes the spelling ORT's ``quantize_dynamic`` emits, which ORT's optimizer fuses into one
``DynamicQuantizeMatMul`` kernel. TensorRT and OpenVINO cannot run it (the CLI refuses ``--dynamic`` there).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from vitc.passes.graphutil import const_value
from vitc.passes.quant_math import quantize_weight
from vitc.passes.quant_types import Granularity, NodePlan


def lower_dynamic_gemm(graph: gs.Graph, node: gs.Node, np_: NodePlan, counts: dict, params: dict[str, dict],
                       weight_mse_clip: bool = False, pair_safe_weights: bool = False,
                       rounded: tuple[np.ndarray, np.ndarray] | None = None) -> bool:
    """Gemm(x, W, b) -> DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq) -> Cast -> Mul(xs * ws) -> Add(b).

    The spelling ORT's quantize_dynamic emits, which ORT's optimizer fuses into DynamicQuantizeMatMul. False (and
    the graph untouched) for a transposed or scaled Gemm or a computed bias. ``rounded`` (int8 weight, scale): the
    weight as already rounded (GPTQ), stored as given.
    """
    if node.attrs.get("transA", 0) or node.attrs.get("transB", 0) or node.attrs.get("alpha", 1.0) != 1.0 \
            or node.attrs.get("beta", 1.0) != 1.0:
        return False
    if len(node.inputs) > 2 and node.inputs[2].name and const_value(node.inputs[2]) is None:
        return False  # a computed bias: this spelling only adds a constant one
    x = node.inputs[0]
    w = const_value(node.inputs[1])
    b = const_value(node.inputs[2]) if len(node.inputs) > 2 else None
    base = node.name
    axis = np_.weight_axis if np_.spec.weight is Granularity.PER_CHANNEL else None
    q, wscale = rounded if rounded is not None else quantize_weight(w, axis, np_.spec.bits,
                                                                    weight_mse_clip or np_.spec.bits < 8,
                                                                    pair_safe_weights)
    xq = gs.Variable(f"{base}.xq", dtype=np.uint8, shape=x.shape)
    xs = gs.Variable(f"{base}.x_scale", dtype=np.float32, shape=[])
    xzp = gs.Variable(f"{base}.x_zero_point", dtype=np.uint8, shape=[])
    graph.nodes.append(gs.Node("DynamicQuantizeLinear", name=f"{base}.DynamicQuantizeLinear", inputs=[x],
                               outputs=[xq, xs, xzp]))
    acc = gs.Variable(f"{base}.acc", dtype=np.int32)
    graph.nodes.append(gs.Node("MatMulInteger", name=f"{base}.MatMulInteger", inputs=[
        xq, gs.Constant(f"{base}.weight.int8", q), xzp, gs.Constant(f"{base}.weight.zero_point", np.array(0, np.int8))],
        outputs=[acc]))
    accf = gs.Variable(f"{base}.acc_f", dtype=np.float32)
    graph.nodes.append(gs.Node("Cast", name=f"{base}.Cast", inputs=[acc], outputs=[accf], attrs={"to": 1}))
    sc = gs.Variable(f"{base}.scales", dtype=np.float32)
    graph.nodes.append(gs.Node("Mul", name=f"{base}.scales_mul", inputs=[xs, gs.Constant(f"{base}.weight.scale", wscale)],
                               outputs=[sc]))
    out = list(node.outputs)
    node.outputs.clear()
    node.inputs.clear()
    if b is not None:
        y = gs.Variable(f"{base}.scaled", dtype=np.float32)
        graph.nodes.append(gs.Node("Mul", name=f"{base}.output_mul", inputs=[accf, sc], outputs=[y]))
        graph.nodes.append(gs.Node("Add", name=f"{base}.bias_add", inputs=[y, gs.Constant(f"{base}.bias", b)],
                                   outputs=out))
    else:
        graph.nodes.append(gs.Node("Mul", name=f"{base}.output_mul", inputs=[accf, sc], outputs=out))
    counts["dynamic Gemms"] = counts.get("dynamic Gemms", 0) + 1
    counts["weights quantized"] += 1
    counts["nodes quantized"] += 1
    params[node.name] = {"activations": {x.name: {"range": "dynamic (per inference)", "dtype": "uint8"}},
                         "weight": {"scale_min": float(wscale.min()), "scale_max": float(wscale.max()),
                                    "axis": axis, "dtype": "int8", "channels": int(wscale.size)}}
    return True
