"""Insert QuantizeLinear/DequantizeLinear given a plan and a calibration table. Pure: no data, no I/O.

Per quantized node:
- each activation input gets one shared QuantizeLinear per tensor and a dedicated DequantizeLinear per consumer
  (what TensorRT's fusions and ORT's node-unit selectors both expect);
- the constant weight is stored as an int8 initializer with per-channel (output axis) or per-tensor scales,
  followed by a DequantizeLinear;
- a Conv/Gemm bias is stored as int32 with scale x_scale * w_scale so ORT can fold it into QLinearConv.
Symmetric quantization uses zero-point 0 and int8; asymmetric activations use uint8. The arithmetic is
``quant_math``; Gemms with per-inference input ranges go to ``qdq_dynamic``, the simulated log-domain softmax
quantizer to ``qdq_simulated``.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from vitc.errors import PassError
from vitc.passes.base import PassResult
from vitc.passes.graphutil import const_value, finish
from vitc.passes.qdq_dynamic import lower_dynamic_gemm
from vitc.passes.qdq_simulated import log_fake_quant
from vitc.passes.quant_math import activation_qparams, per_channel_absmax, quantize_weight
from vitc.passes.quant_types import CalibrationTable, Granularity, NodePlan, Plan, SoftmaxQuantizer

log = logging.getLogger(__name__)


class InsertQDQPass:
    name: ClassVar[str] = "insert_qdq"

    def __init__(self, plan: Plan, table: CalibrationTable, dynamic_nodes: frozenset[str] = frozenset(),
                 weight_mse_clip: bool = False, pair_safe_weights: bool = False,
                 rounded: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        self.plan = plan
        # node -> (int8 weight, scale) rounded before this pass (GPTQ); stored as given
        self.rounded = rounded or {}
        self.table = table
        self.weight_mse_clip = weight_mse_clip
        self.pair_safe_weights = pair_safe_weights
        # Gemms whose input range is computed per inference (ORT DynamicQuantizeLinear; ORT fuses the chain into
        # one DynamicQuantizeMatMul kernel). Robust to inputs unlike the calibration set; TensorRT cannot run it.
        self.dynamic_nodes = dynamic_nodes

    def run(self, graph: gs.Graph) -> PassResult[dict[str, dict]]:
        """The result's ``artifacts``: node -> the scales/zero-points its inputs and weight got (for build.json)."""
        params: dict[str, dict] = {}
        nodes = {n.name: n for n in graph.nodes}
        tensors = graph.tensors()
        qcache: dict[tuple, gs.Variable] = {}
        counts = {"QuantizeLinear": 0, "DequantizeLinear": 0, "weights quantized": 0, "biases quantized": 0,
                  "nodes quantized": 0, "skipped (float)": 0}
        notes: list[str] = []
        for np_ in self.plan.nodes:
            if np_.spec.skip:
                counts["skipped (float)"] += 1
                continue
            node = nodes.get(np_.node)
            if node is None:
                raise PassError(self.name, "planned node not in graph", node=np_.node,
                                hint="the plan must be resolved on the graph being quantized")
            if np_.node in self.dynamic_nodes and node.op == "Gemm" and np_.weight is not None:
                if lower_dynamic_gemm(graph, node, np_, counts, params, self.weight_mse_clip, self.pair_safe_weights,
                                      self.rounded.get(node.name)):
                    continue
                notes.append(f"{node.name}: a transposed/scaled Gemm or a computed bias cannot take a per-inference "
                             "input range; quantized with its calibrated range instead")
            x_scales = []
            log_probs = (np_.role == "attn_av" and node.op == "MatMul" and np_.spec.softmax is not
                         SoftmaxQuantizer.UNIFORM and np_.activations and node.inputs[0].name == np_.activations[0])
            for name in np_.activations:
                idxs = [i for i, t in enumerate(node.inputs) if t.name == name]
                if log_probs and name == np_.activations[0]:
                    node.inputs[0] = log_fake_quant(graph, node.inputs[0], np_, counts)
                    params.setdefault(node.name, {}).setdefault("activations", {})[name] = {
                        "quantizer": np_.spec.softmax.value, "bits": np_.spec.bits, "simulated": True}
                    continue
                rng = self.table.ranges.get(name)
                if rng is None:
                    raise PassError(self.name, f"no calibration range for tensor {name!r}", node=node.name,
                                    hint="calibrate the same fused graph that is quantized")
                if rng.amax <= 0:
                    notes.append(f"{node.name}: input {name} is constant zero in calibration, left float")
                    x_scales = None
                    break
                q_out, scale = self._quantize_activation(graph, tensors[name], np_, rng, qcache, counts)
                sc_v, zp_v = np.asarray(scale[0].values), np.asarray(scale[1].values)
                params.setdefault(node.name, {}).setdefault("activations", {})[name] = (
                    {"scale": float(sc_v), "zero_point": int(zp_v), "dtype": str(zp_v.dtype), "range": rng.observer}
                    if sc_v.ndim == 0 else
                    {"scale_min": float(sc_v.min()), "scale_max": float(sc_v.max()), "axis": scale[2].get("axis"),
                     "dtype": str(zp_v.dtype), "simulated": True})
                for i in idxs:
                    node.inputs[i] = self._dequantize(graph, q_out, scale, counts, node.name, i)
                x_scales.append(scale)
            if x_scales is None:
                continue
            if np_.weight is not None:
                self._quantize_weight(graph, node, np_, x_scales, counts, params)
            counts["nodes quantized"] += 1
        finish(graph)
        return PassResult(self.name, counts["nodes quantized"] > 0, counts, notes, artifacts=params)

    # -- pieces ---------------------------------------------------------------------------------------------------
    def _quantize_activation(self, graph, t, np_: NodePlan, rng, qcache, counts):
        spec = np_.spec
        per_channel = spec.activation is Granularity.PER_CHANNEL and rng.channel_absmax is not None
        key = (t.name, spec.bits, spec.symmetric, per_channel, spec.observer)
        if key in qcache:
            return qcache[key]
        if per_channel:  # simulated: per-axis scales on the last axis (no int8 kernel runs this)
            ch = per_channel_absmax(rng.channel_absmax, rng.amax)
            scale = (np.maximum(ch, 1e-12) / (2 ** (spec.bits - 1) - 1)).astype(np.float32)
            zp = np.zeros(scale.shape, np.int8)
            axis = len(t.shape) - 1 if t.shape is not None else -1
        else:
            s, z, dt = activation_qparams(rng.amax, spec.bits, spec.symmetric, rng.min, rng.max)
            scale = np.array(s, np.float32)
            zp = np.array(z, dt)
            axis = None
        # a second quantizer of the same tensor (another spec for another consumer) gets its own names: graphsurgeon
        # would otherwise merge the two by name
        n_same = sum(1 for k in qcache if k[0] == t.name)
        base = t.name if n_same == 0 else f"{t.name}.q{n_same}"
        sc = gs.Constant(f"{base}.scale", scale)
        zc = gs.Constant(f"{base}.zero_point", zp)
        q = gs.Variable(f"{base}.q", dtype=zp.dtype, shape=t.shape)
        attrs = {} if axis is None else {"axis": int(axis)}
        graph.nodes.append(gs.Node("QuantizeLinear", name=f"{base}.QuantizeLinear", inputs=[t, sc, zc], outputs=[q],
                                   attrs=attrs))
        counts["QuantizeLinear"] += 1
        qcache[key] = (q, (sc, zc, attrs))
        return qcache[key]

    @staticmethod
    def _dequantize(graph, q, qparams, counts, consumer: str, idx: int):
        sc, zc, attrs = qparams
        out = gs.Variable(f"{q.name}.dq.{consumer}.{idx}", dtype=np.float32, shape=q.shape)
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{q.name}.DequantizeLinear.{consumer}.{idx}",
                                   inputs=[q, sc, zc], outputs=[out], attrs=dict(attrs)))
        counts["DequantizeLinear"] += 1
        return out

    def _quantize_weight(self, graph, node, np_: NodePlan, x_scales, counts, params: dict[str, dict]):
        w = const_value(node.inputs[1])
        axis = np_.weight_axis if np_.spec.weight is Granularity.PER_CHANNEL else None
        if node.name in self.rounded:
            q, scale = self.rounded[node.name]
        else:
            q, scale = quantize_weight(w, axis, np_.spec.bits, self.weight_mse_clip or np_.spec.bits < 8,
                                       self.pair_safe_weights and node.op not in ("Conv", "ConvTranspose"))
        base = f"{node.name}.weight"
        wq = gs.Constant(f"{base}.int8", q)
        zp = np.zeros(scale.shape, np.int8)
        wdq = gs.Variable(f"{base}.dq", dtype=np.float32, shape=list(w.shape))
        attrs = {} if axis is None else {"axis": int(axis)}
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{base}.DequantizeLinear",
                                   inputs=[wq, gs.Constant(f"{base}.scale", scale), gs.Constant(f"{base}.zero_point", zp)],
                                   outputs=[wdq], attrs=attrs))
        node.inputs[1] = wdq
        counts["DequantizeLinear"] += 1
        counts["weights quantized"] += 1
        params.setdefault(node.name, {})["weight"] = {
            "scale_min": float(scale.min()), "scale_max": float(scale.max()), "axis": axis, "dtype": "int8",
            "channels": int(scale.size)}
        # Conv / Gemm bias: int32 with scale x_scale * w_scale (what ORT's QLinearConv / TensorRT fold)
        if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and len(x_scales) == 1:
            b = const_value(node.inputs[2])
            xs = x_scales[0][0].values
            if b is not None and xs is not None and np.ndim(xs) == 0 and b.ndim == 1:
                bscale = (float(xs) * np.broadcast_to(scale, b.shape)).astype(np.float32)
                # +-(2^31 - 128): the largest magnitudes float32 holds below 2^31, so the cast cannot wrap the sign
                bq = np.clip(np.rint(b / np.where(bscale > 0, bscale, 1.0)), -2147483520, 2147483520).astype(np.int32)
                bdq = gs.Variable(f"{node.name}.bias.dq", dtype=np.float32, shape=list(b.shape))
                graph.nodes.append(gs.Node("DequantizeLinear", name=f"{node.name}.bias.DequantizeLinear",
                                           inputs=[gs.Constant(f"{node.name}.bias.int32", bq),
                                                   gs.Constant(f"{node.name}.bias.scale", bscale),
                                                   gs.Constant(f"{node.name}.bias.zero_point", np.zeros(b.shape, np.int32))],
                                           outputs=[bdq], attrs={"axis": 0}))
                node.inputs[2] = bdq
                counts["biases quantized"] += 1
                counts["DequantizeLinear"] += 1
