"""`vitc analyze`: where the quantization error comes from, operator by operator (vit-ptq-report, section 4.3).

For every quantizable operator of the fused graph (MatMul/Gemm/Conv with a role, the ones the policy keeps float
included, analysed with the policy's default settings), the operator alone is quantized, the rest of the model
stays float: its inputs are the float model's activations on a few held-out samples. Its output is compared with
the float output, per-tensor and per-channel activations, weights as the policy says:

- MSE, MAE, SQNR and the relative error mean((q - fp)^2 / (fp^2 + eps)), separately for the class token and the
  patch tokens (all tokens for models without a class token), and per output channel (the histograms);
- the per-channel min/max of each operator's input over all tokens, without the class token and the class token
  alone;
- attention maps (last block's class-token attention and attention rollout) of the float model and of a quantized
  model (the policy's plan with the calibrated ranges, Q/DQ inserted as `vitc build --no-search --no-migrate
  --no-bias-correction` would, or a built model given with ``--quantized``) on the first few inputs, and that
  model's output SQNR against float;
- with ``rotate``, the residual-stream-rotated graph (build --rotate) is analysed, and each linear's input channel
  spread and largest |x| are compared with the unrotated graph's on the same held-out samples (``rotation``).

The numerics are those of the build (``compiler/calib/range_search.py`` fake-quant helpers, ``passes/insert_qdq``'s weight
quantization): per-tensor activations with the calibrated range of the policy's observer (asymmetric uint8 on the
ORT target, symmetric int8 for TensorRT); per-channel activations symmetric int8 with each channel's calibrated
min/max (what the build's simulated per-channel activations do). Attention matmuls (two activations) and Conv
inputs (NCHW, no channel-last axis) are analysed per-tensor only.

Output: ``OUTDIR/report.html`` (one self-contained page, figures inline) and ``OUTDIR/analysis.json`` (every
number behind the figures), written into a temporary folder beside OUTDIR and renamed at the end like a build.
Memory: only ``samples`` held-out inputs are kept; activations are captured in chunks of operators whose total
size stays under ``capture_budget_mb``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from vitc.compiler.calib import data as D
from vitc.compiler.driver.build import (CalibConfig, held_out_feeds, input_specs, is_image_input, package_versions,
                                 preprocess_for, run_calibration, silence_graphsurgeon)
from vitc.compiler.calib.calibration import CalibrationTable, Observer, ObserverConfig, TensorRange
from vitc.compiler.errors import CalibrationDataError, ModelLoadError, OutputError, VitcError
from vitc.compiler.driver.pipeline import Target, export, run_passes
from vitc.compiler.quant.policy import Granularity, NodePlan, Plan, Policy, QuantSpec
from vitc.compiler.progress import progress
from vitc.passes.quant_math import dequantized_weight, fake_quant, fake_quant_asym, per_channel_absmax
from vitc.passes.annotate import Role
from vitc.passes.graphutil import const_value

log = logging.getLogger(__name__)

CONV_OPS = ("Conv", "ConvTranspose")  # NCHW input, channels on axis 1

REPORT_HTML = "report.html"
REPORT_JSON = "analysis.json"
ANALYSED_OPS = ("MatMul", "Gemm", "Conv")
MODES = ("per_tensor", "per_channel")


@dataclass(frozen=True)
class AnalyzeConfig:
    model: Path
    outdir: Path
    target: Target = Target.ORT
    batch: int = 1
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    calib: CalibConfig = CalibConfig()
    eval_source: Path | None = None  # None: crops of the embedded held-out photos (data.EVAL_PHOTOS)
    samples: int = 8  # held-out inputs the errors are measured on
    maps: int = 4  # of those, how many get attention maps
    policy: Policy | None = None
    quantized: Path | None = None  # a built int8 model to compare (default: the policy's plan, no search)
    top: int = 10  # rows of the ranked table
    histograms: int = 4  # operators with per-channel error histograms (the worst ones)
    eps: float = 1e-4  # of the relative error mean((q - fp)^2 / (fp^2 + eps))
    capture_budget_mb: float = 256.0  # activations held at once (all held-out samples of one chunk of operators)
    # analyse the residual-stream-rotated graph (build --rotate) and compare each linear's input channel ranges with
    # those of the unrotated graph on the same held-out samples
    rotate: bool = False
    force: bool = False
    show_progress: bool = True


@dataclass
class AnalyzeResult:
    outdir: Path
    report: dict


@dataclass
class TokenInfo:
    """Where the tokens are: ``count`` tokens per image, the first ``prefix`` of them constants concatenated to
    the patch tokens (class token first when ``cls``), the patch grid when it is known."""

    count: int | None = None
    cls: bool = False
    prefix: int = 0
    method: str = "no token axis found"
    grid: tuple[int, int] | None = None

    def to_json(self) -> dict:
        return {"tokens": self.count, "class_token": self.cls, "class_token_index": 0 if self.cls else None,
                "prefix_tokens": self.prefix, "decision": self.method,
                "patch_grid": list(self.grid) if self.grid else None,
                "groups": ["cls", "patch", "all"] if self.cls else ["all"]}


# -- plan, tokens, data ---------------------------------------------------------------------------------------------
def analysis_plan(plan: Plan, policy: Policy) -> Plan:
    """The plan with the operators the policy keeps float (attention x V, Conv on ORT...) given the policy's
    default settings, so that they are calibrated and analysed too. Their ``rule`` says so."""
    base = replace(policy.rules[-1].spec, skip=False)
    nodes = []
    for n in plan.nodes:
        if n.spec.skip and n.op in ANALYSED_OPS:
            spec = base
            if spec.activation is Granularity.PER_CHANNEL:  # per-channel: analysed as the second mode anyway
                spec = replace(spec, activation=Granularity.PER_TENSOR)
            n = replace(n, spec=spec, rule=f"{n.rule} (float in the build; analysed with the default rule)")
        nodes.append(n)
    return replace(plan, nodes=nodes)


def _shape(t: gs.Tensor) -> list[int] | None:
    s = t.shape
    if s is None or not all(isinstance(d, int) and d > 0 for d in s):
        return None
    return list(s)


def _constant_tokens(t: gs.Tensor) -> int | None:
    """How many tokens a constant [1, k, C] input of the token Concat holds (through Expand/Tile to the batch),
    None if it is not constant."""
    v = const_value(t)
    if v is None and len(t.inputs) == 1 and t.inputs[0].op in ("Expand", "Tile"):
        v = const_value(t.inputs[0].inputs[0])
    if v is None or v.ndim != 3:
        return None
    return int(v.shape[1])


def detect_tokens(graph: gs.Graph, roles: dict[str, Role]) -> TokenInfo:
    """Class token: structurally, a Concat on the token axis whose first inputs are constants (a [1, 1, C] class
    token, folded from its Expand/Tile by canonicalize) followed by the patch tokens; else by count, when
    T - 1 is a perfect square (token 0 is the class token); else none."""
    nodes = {n.name: n for n in graph.nodes}
    count = None
    qk = sorted((r.block, name) for name, r in roles.items() if r.role == "attn_qk" and r.block is not None)
    if qk:
        s = _shape(nodes[qk[0][1]].outputs[0])
        if s is not None and len(s) >= 2:
            count = s[-1]
    info = TokenInfo(count=count)
    for n in graph.nodes:
        if n.op != "Concat" or len(n.inputs) < 2:
            continue
        out = _shape(n.outputs[0])
        if out is None or len(out) != 3:
            continue
        axis = int(n.attrs.get("axis", 0)) % 3
        if axis != 1 or (count is not None and out[1] != count):
            continue
        consts = [_constant_tokens(t) for t in n.inputs]
        if consts[0] is None or all(c is not None for c in consts):
            continue
        k = 0
        prefix = 0
        while k < len(n.inputs) and consts[k] is not None:
            prefix += consts[k]
            k += 1
        if k == 0 or any(c is not None for c in consts[k:]) or prefix > 4:
            continue
        info = TokenInfo(count=out[1], cls=True, prefix=prefix,
                         method=f"structural: {n.op} {n.name!r} prepends {prefix} constant token(s) to the patch "
                                f"tokens on axis 1; token 0 is the class token")
        break
    else:
        if count is not None and count > 1 and math.isqrt(count - 1) ** 2 == count - 1:
            info = TokenInfo(count=count, cls=True, prefix=1,
                             method=f"token count {count} = {math.isqrt(count - 1)}^2 + 1: token 0 taken as the "
                                    "class token")
        elif count is not None:
            info = TokenInfo(count=count, method=f"no constant token prepended and {count} - 1 is not a square: "
                                                 "no class token, all tokens analysed together")
    if info.count is not None:
        patches = info.count - info.prefix
        conv = [n for n in graph.nodes if roles.get(n.name) is not None and roles[n.name].role == "patch_embed"]
        s = _shape(conv[0].outputs[0]) if conv else None
        if s is not None and len(s) == 4 and s[2] * s[3] == patches:
            info.grid = (s[2], s[3])
        elif patches > 0 and math.isqrt(patches) ** 2 == patches:
            info.grid = (math.isqrt(patches), math.isqrt(patches))
    return info


# -- capturing activations --------------------------------------------------------------------------------------------
class _Probe:
    """The float model with chosen intermediate tensors as extra outputs (graph inputs are read from the feed)."""

    def __init__(self, model: onnx.ModelProto, tensors: list[str]):
        from vitc.runtimes.base import SessionOptions
        from vitc.runtimes.ort import OrtRuntime

        inputs = {i.name for i in model.graph.input}
        self.from_feed = [t for t in tensors if t in inputs]
        self.names = [t for t in dict.fromkeys(tensors) if t not in inputs]
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        outs = [o for o in model.graph.output if o.name not in set(self.names)]
        del probe.graph.output[:]
        probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(t) for t in self.names] + outs)
        self.sess = OrtRuntime().session(probe.SerializeToString(), SessionOptions())

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vals = self.sess.run(feed, self.names) if self.names else []
        out = dict(zip(self.names, vals))
        for t in self.from_feed:
            out[t] = feed[t]
        return out


def _nbytes(t: gs.Tensor, fallback: int) -> int:
    s = _shape(t)
    return int(np.prod(s)) * 4 if s is not None else fallback


def _chunks(nodes: list[NodePlan], tensors: dict[str, gs.Tensor], budget: float) -> list[list[NodePlan]]:
    """Consecutive groups of nodes whose activation tensors (per sample) fit ``budget`` bytes together."""
    known = [_nbytes(t, 0) for t in tensors.values()]
    fallback = max(known) if known else 1 << 20
    out: list[list[NodePlan]] = []
    cur: list[NodePlan] = []
    seen: set[str] = set()
    size = 0
    for n in nodes:
        extra = sum(_nbytes(tensors[a], fallback) for a in n.activations if a not in seen)
        if cur and size + extra > budget:
            out.append(cur)
            cur, seen, size = [], set(), 0
            extra = sum(_nbytes(tensors[a], fallback) for a in n.activations)
        cur.append(n)
        seen.update(n.activations)
        size += extra
    if cur:
        out.append(cur)
    return out


# -- one operator ---------------------------------------------------------------------------------------------------
def quantize_activation(x: np.ndarray, rng: TensorRange, spec: QuantSpec, per_channel: bool) -> np.ndarray:
    """``x`` through Q/DQ as ``passes/insert_qdq`` would set it up for ``spec`` (per-channel: symmetric, one scale
    per channel of the last axis from its calibrated min/max)."""
    x = np.asarray(x, np.float32)
    if per_channel:
        return fake_quant(x, per_channel_absmax(rng.channel_absmax, rng.amax), spec.bits).astype(np.float32)
    if spec.symmetric:
        return fake_quant(x, rng.amax, spec.bits).astype(np.float32)
    lo, hi = max(rng.min, -rng.amax), min(rng.max, rng.amax)
    return fake_quant_asym(x, lo, hi, spec.bits).astype(np.float32)


def clipped_fraction(x: np.ndarray, rng: TensorRange, spec: QuantSpec, per_channel: bool) -> float:
    """Share of the values of ``x`` outside the quantization range (they saturate)."""
    if per_channel:
        return float(np.mean(np.abs(x) > per_channel_absmax(rng.channel_absmax, rng.amax)))
    if spec.symmetric:
        return float(np.mean(np.abs(x) > rng.amax))
    lo, hi = min(max(rng.min, -rng.amax), 0.0), max(min(rng.max, rng.amax), 0.0)
    return float(np.mean((x < lo) | (x > hi)))


def quantize_weight_like_build(w: np.ndarray, np_: NodePlan, pair_safe: bool) -> np.ndarray:
    """The weight after InsertQDQPass (int8 values times their scales), as float."""
    axis = np_.weight_axis if np_.spec.weight is Granularity.PER_CHANNEL else None
    return dequantized_weight(w, axis, np_.spec.bits, np_.spec.bits < 8, pair_safe and np_.op != "Conv")


def _conv(node: gs.Node, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """One Conv or ConvTranspose in ORT (the node's attributes, any padding/stride/group)."""
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.ort import OrtRuntime

    h = onnx.helper
    inputs = [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape)),
              h.make_tensor_value_info("w", onnx.TensorProto.FLOAT, list(w.shape))]
    names = ["x", "w"]
    inits = []
    if b is not None:
        inits.append(onnx.numpy_helper.from_array(b.astype(np.float32), "b"))
        names.append("b")
    attrs = {k: v for k, v in node.attrs.items()}
    g = h.make_graph([h.make_node(node.op, names, ["y"], **attrs)], "conv", inputs,
                     [h.make_empty_tensor_value_info("y")], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)])
    m.ir_version = 8
    sess = OrtRuntime().session(m.SerializeToString(), SessionOptions(graph_optimizations=False))
    return sess.run({"x": x.astype(np.float32), "w": w.astype(np.float32)})[0]


class _Op:
    """Float and quantized evaluation of one planned node on captured inputs."""

    def __init__(self, node: gs.Node, np_: NodePlan, pair_safe: bool):
        self.node = node
        self.np = np_
        self.w = const_value(node.inputs[1]) if np_.weight is not None else None
        self.b = const_value(node.inputs[2]) if node.op in ("Gemm", *CONV_OPS) and len(node.inputs) > 2 else None
        self.wq = None if self.w is None else quantize_weight_like_build(
            self.w.astype(np.float32), np_, pair_safe and not node.attrs.get("transB", 0))
        # per-channel activations: a weighted matmul whose activation's last axis is its reduction axis
        self.per_channel_ok = node.op in ("Gemm", "MatMul") and self.w is not None
        self.clipped: dict[str, dict[str, float]] = {}  # mode -> input -> share of held-out values saturated

    def __call__(self, xs: list[np.ndarray], weight: np.ndarray | None) -> np.ndarray:
        n = self.node
        if n.op in CONV_OPS:
            return _conv(n, xs[0], weight, self.b)
        if n.op == "Gemm":
            a = xs[0].T if n.attrs.get("transA", 0) else xs[0]
            w = weight.T if n.attrs.get("transB", 0) else weight
            y = float(n.attrs.get("alpha", 1.0)) * (a @ w)
            if self.b is not None:
                y = y + float(n.attrs.get("beta", 1.0)) * self.b
            return y.astype(np.float32)
        if weight is not None:  # MatMul with a constant weight
            return (xs[0] @ weight).astype(np.float32)
        return np.matmul(xs[0], xs[1]).astype(np.float32)

    def run(self, acts: dict[str, np.ndarray], table: CalibrationTable) -> dict[str, np.ndarray | None]:
        names = [t.name for t in self.node.inputs[: 2 if self.w is None else 1]]
        xs = [acts[t] for t in names]
        out: dict[str, np.ndarray | None] = {"fp": self(xs, self.w)}
        rngs = [table.ranges.get(t) for t in names]
        quantized = {t for t in self.np.activations}
        if any(r is not None and r.amax <= 0 for r in rngs):
            out["per_tensor"] = out["per_channel"] = None  # constant-zero input: left float by the build
            return out
        spec = self.np.spec
        qx = [quantize_activation(x, r, spec, False) if t in quantized and r is not None else x
              for t, x, r in zip(names, xs, rngs)]
        out["per_tensor"] = self(qx, self.wq)
        self.clipped = {"per_tensor": {t: clipped_fraction(x, r, spec, False)
                                       for t, x, r in zip(names, xs, rngs) if t in quantized and r is not None}}
        out["per_channel"] = None
        if self.per_channel_ok and rngs[0] is not None and rngs[0].channel_absmax is not None \
                and len(rngs[0].channel_absmax) == xs[0].shape[-1]:
            out["per_channel"] = self([quantize_activation(xs[0], rngs[0], spec, True)], self.wq)
            self.clipped["per_channel"] = {names[0]: clipped_fraction(xs[0], rngs[0], spec, True)}
        return out


# -- error statistics -------------------------------------------------------------------------------------------------
def token_view(y: np.ndarray, n: int, tokens: int | None) -> np.ndarray | None:
    """``y`` as [..., T, C] (tokens on the second-to-last axis), or None when it has no token axis."""
    if tokens is None:
        return None
    if y.ndim == 2 and y.shape[0] == n * tokens:
        return y.reshape(n, tokens, y.shape[1])
    if y.ndim >= 3 and y.shape[-2] == tokens:
        return y
    return None


def _group_views(y: np.ndarray, n: int, tok: TokenInfo) -> dict[str, np.ndarray]:
    """Views (no copies) of ``y`` per token group, channels last: ``all`` always; ``cls`` and ``patch`` when there
    is a class token and ``y`` has a token axis."""
    out = {"all": y}
    v = token_view(y, n, tok.count)
    if v is not None and tok.cls:
        out["cls"] = v[..., 0, :]
        out["patch"] = v[..., tok.prefix:, :]
    return out


def error_stats(fp: np.ndarray, q: np.ndarray, n: int, tok: TokenInfo, eps: float) -> tuple[dict, dict]:
    """Per token group: MSE, MAE, relative error mean((q - fp)^2 / (fp^2 + eps)), SQNR of ``q`` against ``fp``
    (channels last), and the relative error of each channel (mean over the group's rows)."""
    e = q - fp
    terms = {"e2": e * e, "ae": np.abs(e), "f2": fp * fp}
    terms["rel"] = terms["e2"] / (terms["f2"] + np.float32(eps))
    del e
    views = {k: _group_views(v, n, tok) for k, v in terms.items()}
    stats: dict[str, dict] = {}
    per_channel: dict[str, np.ndarray] = {}
    for g in views["e2"]:
        sums = {}
        for k in terms:
            a = views[k][g]
            sums[k] = a.sum(axis=tuple(range(a.ndim - 1)), dtype=np.float64)  # per channel
        rows = int(np.prod(views["e2"][g].shape[:-1]))
        count = rows * fp.shape[-1]
        sig, noise = float(sums["f2"].sum()), float(sums["e2"].sum())
        stats[g] = {"mse": noise / count, "mae": float(sums["ae"].sum()) / count,
                    "rel": float(sums["rel"].sum()) / count,
                    "sqnr_db": float(10 * np.log10(max(sig, 1e-30) / max(noise, 1e-30))), "signal_ms": sig / count}
        per_channel[g] = sums["rel"] / rows
    return stats, per_channel


def channel_ranges(x: np.ndarray, n: int, tok: TokenInfo) -> dict:
    """Per-channel min/max of an operator input (last axis = channels) over all tokens, without the class token
    and the class token alone (over the held-out samples)."""
    groups = {"all": x.reshape(-1, x.shape[-1])}
    v = token_view(x, n, tok.count)
    if v is not None and tok.cls:
        groups["no_cls"] = v[..., tok.prefix:, :].reshape(-1, x.shape[-1])
        groups["cls"] = v[..., 0, :].reshape(-1, x.shape[-1])
    out = {}
    for k, g in groups.items():
        lo, hi = g.min(axis=0), g.max(axis=0)
        out[k] = {"min": lo, "max": hi, "max_channel_range": float((hi - lo).max()),
                  "max_abs": float(max(-lo.min(), hi.max())),
                  "median_channel_range": float(np.median(hi - lo))}
    return out


# -- attention maps ---------------------------------------------------------------------------------------------------
def _softmax_tensors(graph: gs.Graph, roles: dict[str, Role]) -> list[str]:
    sm = sorted((r.block, n.name, n.outputs[0].name) for n in graph.nodes
                for r in [roles.get(n.name)] if r is not None and r.role == "softmax" and r.block is not None)
    return [t for _, _, t in sm]


def attention_grids(probs: list[np.ndarray], tok: TokenInfo) -> tuple[np.ndarray, np.ndarray]:
    """(last block's class-token attention, attention rollout from the class token), each [grid_h, grid_w],
    for one sample. ``probs``: one [1, heads, T, T] array per block."""
    assert tok.grid is not None
    last = probs[-1][0].mean(axis=0)  # [T, T]
    t = last.shape[0]
    roll = np.eye(t)
    for p in probs:
        a = 0.5 * p[0].mean(axis=0).astype(np.float64) + 0.5 * np.eye(t)
        a /= a.sum(axis=-1, keepdims=True)
        roll = a @ roll
    gh, gw = tok.grid
    return (last[0, tok.prefix:].reshape(gh, gw).astype(np.float64), roll[0, tok.prefix:].reshape(gh, gw))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps (cosine is near 1 for any two positive maps with a common offset)."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def quantized_model(graph_model: onnx.ModelProto, plan: Plan, table: CalibrationTable,
                    target: Target) -> onnx.ModelProto:
    """The policy's plan with the calibrated ranges, Q/DQ inserted (no migration search, no bias correction).
    Attention stays unfused (same arithmetic as ORT's QAttention) so its Softmax outputs can be read."""
    from vitc.compiler.driver.stages import lowering_passes
    from vitc.passes.insert_qdq import InsertQDQPass

    g = gs.import_onnx(graph_model)
    qdq = InsertQDQPass(plan, table, pair_safe_weights=target is Target.ORT)
    run_passes(g, [qdq, *lowering_passes(target, fuse_attention=False)])
    return export(g)


def _image(x: np.ndarray, pre: D.Preprocess) -> np.ndarray:
    """A normalized CHW input back to HWC uint8."""
    img = x.transpose(1, 2, 0) * np.asarray(pre.std, np.float32) + np.asarray(pre.mean, np.float32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


# -- the command ------------------------------------------------------------------------------------------------------
def analyze(cfg: AnalyzeConfig) -> AnalyzeResult:
    from vitc.compiler.driver.frontend import front_end
    from vitc.compiler.driver.outdir import prepare, publish
    from vitc.compiler.research.report_html import render_report
    from vitc.runtimes.ort import quiet

    quiet()
    silence_graphsurgeon()
    t_all = time.perf_counter()
    stages: dict[str, float] = {}
    if cfg.samples < 1:
        raise CalibrationDataError(f"{cfg.samples} held-out samples requested", hint="give --samples 1 or more")
    tmp = prepare(cfg.outdir, cfg.force)
    try:
        t = time.perf_counter()
        fe = front_end(cfg.model, cfg.target, batch=cfg.batch, input_shapes=cfg.input_shapes, policy=cfg.policy,
                       observer=cfg.calib.observer, rotate=cfg.rotate)
        float_model = fe.float_model()  # with the preprocessing `vitc export` recorded
        fixed_dims, graph, results, roles, policy, plan = (fe.source.fixed_dims, fe.graph, fe.results, fe.roles,
                                                           fe.policy, fe.plan)
        del fe  # the graph holds the weights; the loaded source is one copy more
        aplan = analysis_plan(plan, policy)
        tok = detect_tokens(graph, roles)
        stages["load + float passes"] = time.perf_counter() - t

        t = time.perf_counter()
        # before calibration, so bad --eval data fails early
        feeds, held = held_out_feeds(float_model, cfg.eval_source, cfg.samples, cfg.calib, cfg.calib.seed)
        if cfg.eval_source is not None and cfg.calib.source is not None \
                and cfg.eval_source.resolve() == cfg.calib.source.resolve():
            log.warning("--eval and --calib are the same data: the samples are not held out")
        table, calib_summary = run_calibration(float_model, aplan, cfg.calib, cfg.show_progress)
        stages["calibration"] = time.perf_counter() - t

        t = time.perf_counter()
        operators, ranges, per_channel_err = _analyse_operators(graph, aplan, plan, table, feeds, tok, float_model, cfg)
        stages["operators"] = time.perf_counter() - t

        t = time.perf_counter()
        specs = input_specs(float_model)
        pre = preprocess_for(float_model, specs[0], cfg.calib) if specs and is_image_input(specs[0]) else None
        attention, images = _attention(graph, roles, plan, table, feeds, tok, float_model, pre, cfg)
        stages["quantized model + attention maps"] = time.perf_counter() - t

        report = _report(cfg, fixed_dims, policy, plan, aplan, tok, held, calib_summary, table, operators, ranges,
                         per_channel_err, attention, results)
        if cfg.rotate:
            t = time.perf_counter()
            report["rotation"] = rotation_view(cfg, results, operators, ranges, feeds, tok)
            stages["ranges before rotation"] = time.perf_counter() - t
        stages["total"] = time.perf_counter() - t_all
        report["seconds"] = {k: round(v, 3) for k, v in stages.items()}
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=1, default=_json_default, allow_nan=False))
        (tmp / REPORT_HTML).write_text(render_report(report, images), encoding="utf-8")
        final = publish(tmp, cfg.outdir)
        return AnalyzeResult(final, report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _analyse_operators(graph: gs.Graph, aplan: Plan, plan: Plan, table: CalibrationTable,
                       feeds: list[dict[str, np.ndarray]], tok: TokenInfo, float_model: onnx.ModelProto,
                       cfg: AnalyzeConfig) -> tuple[list[dict], dict[str, dict], dict[str, dict]]:
    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    in_build = {n.node: n for n in plan.nodes}
    todo = [n for n in aplan.nodes if n.op in ANALYSED_OPS and not n.spec.skip and n.activations]
    nsamples = sum(next(iter(f.values())).shape[0] for f in feeds)
    budget = cfg.capture_budget_mb * 2 ** 20 / max(1, nsamples)
    chunks = _chunks(todo, tensors, budget)
    operators: list[dict] = []
    ranges: dict[str, dict] = {}
    per_channel_err: dict[str, dict] = {}
    consumers: dict[str, list[str]] = {}
    bar = progress(iter(range(len(todo))), len(todo), "analyzing", cfg.show_progress)
    next(bar, None)  # the bar counts finished operators: one step after each
    pair_safe = cfg.target is Target.ORT
    for chunk in chunks:
        names = list(dict.fromkeys(t.name for np_ in chunk for t in nodes[np_.node].inputs
                                   if t.name and const_value(t) is None))
        probe = _Probe(float_model, names)
        parts: dict[str, list[np.ndarray]] = {t: [] for t in names}
        for f in feeds:
            for k, v in probe.run(f).items():
                parts[k].append(v)
        del probe
        acts = {k: np.concatenate(v, axis=0) for k, v in parts.items()}
        del parts
        for np_ in chunk:
            node = nodes[np_.node]
            op = _Op(node, np_, pair_safe)
            outs = op.run(acts, table)
            fp = outs["fp"]
            groups = tok
            if node.op in CONV_OPS:  # channels on axis 1: move them last; no token axis
                outs = {k: None if v is None else np.moveaxis(v, 1, -1) for k, v in outs.items()}
                fp = outs["fp"]
                groups = TokenInfo()
            errors: dict[str, dict | None] = {}
            pce: dict[str, dict] = {}
            for mode in MODES:
                q = outs.get(mode)
                if q is None:
                    errors[mode] = None
                    continue
                errors[mode], pce[mode] = error_stats(fp, q, nsamples, groups, cfg.eps)
            per_channel_err[np_.node] = pce
            x_name = np_.activations[0]
            has_ranges = op.w is not None and node.op not in CONV_OPS
            if has_ranges:
                consumers.setdefault(x_name, []).append(np_.node)
                if x_name not in ranges:
                    r = channel_ranges(acts[x_name], nsamples, tok)
                    cal = table.ranges.get(x_name)
                    if cal is not None and cal.channel_min is not None:
                        r["calibration"] = {"min": np.asarray(cal.channel_min), "max": np.asarray(cal.channel_max)}
                    ranges[x_name] = r
            built = in_build.get(np_.node)
            sp = np_.spec
            operators.append({
                "node": np_.node, "op": np_.op, "role": np_.role, "block": np_.block,
                "quantized_in_build": built is not None and not built.spec.skip,
                "build_rule": built.rule if built is not None else None,
                "build_activation": None if built is None or built.spec.skip else built.spec.activation.value,
                "activations": list(np_.activations),
                "weight": np_.weight, "weight_granularity": sp.weight.value if np_.weight else None,
                "bits": sp.bits, "symmetric": sp.symmetric, "observer": sp.observer.describe(),
                "per_tensor_range": {t: _range_json(table.ranges.get(t)) for t in np_.activations},
                "per_channel_note": None if errors["per_channel"] is not None else (
                    "attention matmul: two activations, analysed per-tensor only" if op.w is None else
                    "Conv input is NCHW: per-tensor only" if node.op in CONV_OPS else
                    "no per-channel calibration range"),
                "input_ranges": x_name if has_ranges else None,
                "output_shape": list(outs["fp"].shape),
                "clipped_input_fraction": op.clipped,
                "errors": errors,
            })
            next(bar, None)
        del acts
    for t, cs in consumers.items():
        ranges[t]["consumers"] = cs
    return operators, ranges, per_channel_err


def rotation_view(cfg: AnalyzeConfig, results, operators: list[dict], ranges: dict[str, dict],
                  feeds: list[dict[str, np.ndarray]], tok: TokenInfo) -> dict:
    """Each analysed linear's input channel ranges in the rotated graph (``ranges``) against the same linear's input
    in the unrotated graph, on the same held-out ``feeds``: largest and median channel range (max - min) and their
    ratio (how far the loudest channel stands out), and the largest |x|. Linears are matched by node name; the
    rotation pass's own report (rotated, or why not) comes along."""
    from vitc.compiler.driver.frontend import front_end

    rot = next((r for r in results if r.name == "rotate_residual"), None)
    out: dict = {"pass": None if rot is None else rot.to_json(), "operators": []}
    if rot is None or not rot.counts.get("streams rotated"):
        return out
    before = front_end(cfg.model, cfg.target, batch=cfg.batch, input_shapes=cfg.input_shapes, policy=cfg.policy,
                       observer=cfg.calib.observer)
    nodes = {n.name: n for n in before.graph.nodes}
    pairs = [(o, nodes[o["node"]].inputs[0].name) for o in operators
             if o["input_ranges"] and o["node"] in nodes and nodes[o["node"]].op in ("MatMul", "Gemm")]
    probe = _Probe(before.float_model(), [t for _, t in pairs])
    acts = [probe.run(f) for f in feeds]
    del probe, before

    def summary(r: dict) -> dict:
        a = r["all"]
        return {"max_channel_range": a["max_channel_range"], "median_channel_range": a["median_channel_range"],
                "spread": a["max_channel_range"] / max(a["median_channel_range"], 1e-12), "max_abs": a["max_abs"]}

    for o, name in pairs:
        x = np.concatenate([a[name] for a in acts])
        b, r = summary(channel_ranges(x, len(feeds), tok)), summary(ranges[o["input_ranges"]])
        out["operators"].append({"node": o["node"], "role": o["role"], "block": o["block"], "before": b,
                                 "after": r})
    return out


def _range_json(r: TensorRange | None) -> dict | None:
    if r is None:
        return None
    return {"amax": r.amax, "min": r.min, "max": r.max, "observer": r.observer}


def _attention(graph: gs.Graph, roles: dict[str, Role], plan: Plan, table: CalibrationTable,
               feeds: list[dict[str, np.ndarray]], tok: TokenInfo, float_model: onnx.ModelProto,
               pre: D.Preprocess | None, cfg: AnalyzeConfig) -> tuple[dict, list[dict]]:
    """Attention maps (float and quantized) on the first ``cfg.maps`` held-out inputs, and the quantized model's
    output SQNR against float on all held-out inputs."""
    from vitc.compiler.measure.fidelity import sqnr_db
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.ort import OrtRuntime

    out: dict = {"quantized_model": "the policy's plan with the calibrated ranges of the chosen observer, Q/DQ "
                 "inserted as by `vitc build --no-search --no-migrate --no-bias-correction` (ORT kernels)"}
    sm = _softmax_tensors(graph, roles)
    skip = None
    if cfg.quantized is not None:
        qmodel = _load_quantized(cfg, float_model)
        out["quantized_model"] = f"{cfg.quantized} (--quantized)"
        made = {o for n in qmodel.graph.node for o in n.output}
        if any(t not in made for t in sm):
            skip = (f"the attention Softmax outputs of the float graph are not tensors of {cfg.quantized} (an ORT "
                    "build runs attention as one QAttention kernel; build with --no-fuse-attention for maps)")
    else:
        qmodel = quantized_model(float_model, plan, table, cfg.target)
    if pre is None:
        skip = "the model input is not an NCHW image"
    elif not tok.cls:
        skip = "the model has no class token"
    elif tok.grid is None:
        skip = "the patch tokens do not form a known grid"
    elif not sm:
        skip = "no Softmax found in the attention blocks"
    elif cfg.maps < 1:
        skip = "--maps 0"
    names = [o.name for o in float_model.graph.output]
    extra = sm if skip is None else []
    rt = OrtRuntime()

    def session(m: onnx.ModelProto):
        p = onnx.ModelProto()
        p.CopyFrom(m)
        have = {o.name for o in p.graph.output}
        p.graph.output.extend([onnx.helper.make_empty_tensor_value_info(t) for t in extra if t not in have])
        return rt.session(p.SerializeToString(), SessionOptions())

    fsess, qsess = session(float_model), session(qmodel)
    want = names + [t for t in extra if t not in names]
    num = den = 0.0
    worst = math.inf
    samples: list[dict] = []
    images: list[dict] = []
    index = 0
    for f in progress(iter(feeds), len(feeds), "quantized model", cfg.show_progress):
        fo = dict(zip(want, fsess.run(f, want)))
        qo = dict(zip(want, qsess.run(f, want)))
        a = np.concatenate([fo[k].ravel() for k in names]).astype(np.float64)
        b = np.concatenate([qo[k].ravel() for k in names]).astype(np.float64)
        num += float((a ** 2).sum())
        den += float(((a - b) ** 2).sum())
        worst = min(worst, sqnr_db(a, b))
        bs = next(iter(f.values())).shape[0]
        for i in range(bs):
            if skip is None and index < cfg.maps:
                shape_ok = all(fo[t].ndim == 4 and fo[t].shape[-1] == tok.count for t in sm)
                if not shape_ok:
                    skip = f"the Softmax outputs are not [batch, heads, {tok.count}, {tok.count}]"
                else:
                    fl, fr = attention_grids([fo[t][i:i + 1] for t in sm], tok)
                    ql, qr = attention_grids([qo[t][i:i + 1] for t in sm], tok)
                    samples.append({"index": index, "float_last": fl, "quant_last": ql, "float_rollout": fr,
                                    "quant_rollout": qr, "correlation_last": _correlation(fl, ql),
                                    "correlation_rollout": _correlation(fr, qr)})
                    x = next(iter(f.values()))[i]
                    images.append({"index": index, "image": _image(x, pre), "float_last": fl, "quant_last": ql,
                                   "float_rollout": fr, "quant_rollout": qr})
            index += 1
    out["output_sqnr_db"] = float(10 * np.log10(max(num, 1e-30) / max(den, 1e-30)))
    out["worst_sample_sqnr_db"] = float(worst)
    out["samples_compared"] = index
    if skip is not None:
        out["maps_skipped"] = skip
        samples, images = [], []
    else:
        out["softmax_tensors"] = sm
        out["method"] = ("last block: the class token's attention row averaged over heads, on the patch grid; "
                         "rollout: product over blocks of (0.5 * mean over heads + 0.5 * I), rows renormalized, "
                         "class token row")
        out["maps"] = samples
    return out, images


def _load_quantized(cfg: AnalyzeConfig, float_model: onnx.ModelProto) -> onnx.ModelProto:
    from vitc.compiler.driver.loader import load_model

    q = load_model(cfg.quantized, batch=cfg.batch, input_shapes=cfg.input_shapes).model
    inits = {t.name for t in q.graph.initializer}
    qi = [i.name for i in q.graph.input if i.name not in inits]
    fi = [i.name for i in float_model.graph.input if i.name not in {t.name for t in float_model.graph.initializer}]
    qo, fo = [o.name for o in q.graph.output], [o.name for o in float_model.graph.output]
    if qi != fi or qo != fo:
        raise ModelLoadError(f"{cfg.quantized}: inputs/outputs {qi} -> {qo} differ from the model's {fi} -> {fo}",
                             hint="give --quantized the int8 model `vitc build` made from this model")
    return q


def _worst(operators: list[dict]) -> list[dict]:
    """Operators ordered by per-tensor output SQNR over all tokens, lowest (worst) first."""
    rated = [o for o in operators if o["errors"]["per_tensor"] is not None]
    return sorted(rated, key=lambda o: o["errors"]["per_tensor"]["all"]["sqnr_db"])


def _report(cfg, fixed_dims, policy, plan, aplan, tok, held, calib_summary, table, operators, ranges, per_channel_err,
            attention, results) -> dict:
    worst = _worst(operators)
    ranking = []
    for i, o in enumerate(worst[: cfg.top]):
        pt, pc = o["errors"]["per_tensor"], o["errors"]["per_channel"]
        r = ranges.get(o["input_ranges"]) if o["input_ranges"] else None
        ranking.append({
            "rank": i + 1, "node": o["node"], "op": o["op"], "role": o["role"], "block": o["block"],
            "quantized_in_build": o["quantized_in_build"],
            "sqnr_db_per_tensor": pt["all"]["sqnr_db"],
            "sqnr_db_per_channel": None if pc is None else pc["all"]["sqnr_db"],
            "rel_per_tensor": {g: v["rel"] for g, v in pt.items()},
            "rel_per_channel": None if pc is None else {g: v["rel"] for g, v in pc.items()},
            "input_max_channel_range": None if r is None else {g: r[g]["max_channel_range"]
                                                               for g in ("all", "no_cls", "cls") if g in r}})
    hist = []
    # the worst operators with both granularities first (the comparison the histograms are for), then the rest
    chosen = [o for o in worst if o["errors"]["per_channel"] is not None][: cfg.histograms]
    chosen += [o for o in worst if o not in chosen][: cfg.histograms - len(chosen)]
    for o in chosen:
        pce = per_channel_err.get(o["node"], {})
        entry = {"node": o["node"], "role": o["role"], "block": o["block"], "channels": o["output_shape"][-1],
                 "series": {}}
        vals = [v for m in pce.values() for v in m.values()]
        lo = min((float(np.log10(max(v.min(), 1e-30))) for v in vals), default=-8.0)
        hi = max((float(np.log10(max(v.max(), 1e-30))) for v in vals), default=0.0)
        lo, hi = math.floor(max(lo, hi - 12)), math.ceil(hi + 1e-9)
        edges = np.linspace(lo, max(hi, lo + 1), 41)
        entry["log10_bin_edges"] = edges
        for mode, groups in pce.items():
            for g, v in groups.items():
                counts, _ = np.histogram(np.log10(np.maximum(v, 10.0 ** lo)), bins=edges)
                entry["series"][f"{mode}/{g}"] = {"channel_rel_error": v, "counts": counts}
        hist.append(entry)
    by_block = {}
    for o in operators:
        if o["block"] is None:
            continue
        role = by_block.setdefault(o["role"], {})
        for mode in MODES:
            e = o["errors"][mode]
            if e is None:
                continue
            for g, v in e.items():
                role.setdefault(f"{mode}/{g}", {}).setdefault(str(o["block"]), []).append(
                    {"node": o["node"], "mse": v["mse"], "mae": v["mae"], "rel": v["rel"], "sqnr_db": v["sqnr_db"]})
    return {
        "model": str(cfg.model), "target": cfg.target.value, "batch": cfg.batch, "fixed_dims": fixed_dims,
        "policy": {"name": policy.name, "source": policy.source, "plan": plan.to_json(),
                   "analysed_float_nodes": [n.node for n in aplan.nodes
                                            if n.node in {p.node for p in plan.nodes if p.spec.skip}
                                            and n.op in ANALYSED_OPS]},
        "method": {
            "operator": "each operator quantized alone, the rest float: its inputs are the float model's "
                        "activations on the held-out samples",
            "per_tensor": "activations: one range per tensor, the policy's observer on the calibration samples "
                          "(asymmetric uint8 on ORT, symmetric int8 on TensorRT, or as the policy sets)",
            "per_channel": "activations: symmetric int8, one scale per channel (last axis) from its calibrated "
                           "min/max, as vitc build's simulated per-channel activations; only for linears",
            "weights": "as the policy sets (int8 symmetric, per output channel by default), exactly as "
                       "insert_qdq stores them (saturation-safe on ORT); biases float",
            "relative_error": f"mean((q - fp)^2 / (fp^2 + eps)), eps = {cfg.eps}",
            "sqnr_db": "10 log10(sum fp^2 / sum (q - fp)^2)",
            "groups": "cls: the class token's rows; patch: the other tokens after the constant prefix tokens; "
                      "all: every output row (operators without a token axis: all only)",
            "channel_ranges": "per-channel min/max of each linear's input over the held-out samples (all tokens, "
                              "without the class token, class token only); the calibration min/max too",
            "ranking": "operators ordered by per-tensor output SQNR over all tokens, worst first",
            "histograms": "the worst operators (per-tensor output SQNR) among those analysed both per-tensor and "
                          "per-channel",
            "clipped_input_fraction": "share of the held-out input values outside the calibrated range (they "
                                      "saturate); per-channel ranges are each channel's calibration min/max",
            "eps": cfg.eps,
        },
        "tokens": tok.to_json(),
        "held_out": held,
        "calibration": calib_summary,
        "operators": operators,
        "ranking": ranking,
        "by_block": by_block,
        "input_ranges": ranges,
        "histograms": hist,
        "attention": attention,
        "passes": [r.to_json() for r in results],
        "versions": package_versions(),
    }


def _json_default(o):
    if isinstance(o, np.ndarray):
        if o.dtype.kind in "iub":
            return o.tolist()
        return [_round(float(v)) for v in o.ravel()] if o.ndim == 1 else [_json_default(r) for r in o]
    if isinstance(o, (np.floating,)):
        return _round(float(o))
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def _round(v: float) -> float | None:
    if not math.isfinite(v):
        return None
    return float(f"{v:.6g}")


# -- command line -----------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser, shape_type, floats3_type, std3_type) -> None:
    from vitc.compiler.cliargs import add_input_options

    from vitc.compiler.cliargs import pos_int

    p.add_argument("model", type=Path)
    p.add_argument("-o", "--outdir", type=Path, required=True,
                   help="output folder for report.html and analysis.json (must not exist unless --force)")
    p.add_argument("--calib", type=Path, default=None,
                   help="calibration data: image folder, .npz (one array per input) or .npy; default: embedded photos")
    p.add_argument("--calib-samples", type=pos_int, default=32)
    p.add_argument("--eval", type=Path, default=None,
                   help="held-out data the errors are measured on (same formats as --calib); default: crops of the "
                        "embedded photos calibration never sees")
    p.add_argument("--samples", type=pos_int, default=8, help="held-out samples (memory grows with it)")
    p.add_argument("--maps", type=int, default=4, help="held-out inputs drawn with attention maps (0: none)")
    p.add_argument("--quantized", type=Path, default=None, metavar="MODEL.int8.onnx",
                   help="a built int8 model of this model for the attention maps and the whole-model SQNR "
                        "(default: the policy's plan with the calibrated ranges, no migration search)")
    p.add_argument("--top", type=pos_int, default=10, help="rows of the ranked table of the worst operators")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", choices=[t.value for t in Target], default=Target.ORT.value)
    p.add_argument("--policy", default=None, metavar="FILE|PRESET",
                   help="per-layer quantization policy (as for build); default: the target's default")
    p.add_argument("--simulate", action="store_true", help="allow simulation-only policy settings (bits 4/6)")
    p.add_argument("--observer", choices=[o.value for o in Observer], default=Observer.PERCENTILE.value)
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--rotate", action="store_true",
                   help="analyse the residual-stream-rotated graph (as build --rotate) and show each linear's input "
                        "channel ranges before and after the rotation")
    p.add_argument("--eps", type=float, default=AnalyzeConfig.eps,
                   help="eps of the relative error mean((q - fp)^2 / (fp^2 + eps))")
    add_input_options(p, shape_type=shape_type, floats3_type=floats3_type, std3_type=std3_type,
                      positive_type=pos_int)


def run_command(a: argparse.Namespace) -> int:
    from vitc.compiler.quant.policy import DEFAULT_PRESET, PolicyDefaults, load_policy

    if not 0 < a.percentile <= 100:
        raise VitcError(f"--percentile {a.percentile} is out of range", hint="give a value in (0, 100], e.g. 99.99")
    if not a.eps > 0 or not math.isfinite(a.eps):
        raise VitcError(f"--eps {a.eps} is not valid", hint="give a small positive number, e.g. 1e-4")
    if a.maps < 0:
        raise VitcError(f"--maps {a.maps} is negative", hint="give 0 or more")
    ob = ObserverConfig(Observer(a.observer), a.percentile)
    policy = None
    if a.policy is not None and not (a.policy == DEFAULT_PRESET and not Path(a.policy).is_file()):
        policy = load_policy(a.policy, PolicyDefaults.for_target(a.target, ob, simulate=a.simulate))
    for p in (a.model, a.quantized):
        if p is not None and not p.exists():
            raise ModelLoadError(f"{p}: no such file", hint="give the path of an .onnx model")
    for what, p in (("calibration data", a.calib), ("held-out data", a.eval)):
        if p is not None and not p.exists():
            raise CalibrationDataError(f"{p}: {what} not found", hint="give a folder of images or a .npz/.npy file")
    outdir = Path(os.path.abspath(a.outdir))
    if a.force and outdir.is_dir() and not outdir.is_symlink():
        real = outdir.resolve()
        for what, p in (("model", a.model), ("calibration data", a.calib), ("held-out data", a.eval),
                        ("quantized model", a.quantized)):
            if p is not None and (p.resolve() == real or real in p.resolve().parents):
                raise OutputError(f"{outdir}: --force would delete the {what} {p} inside it",
                                  hint="write to another -o")
    created = [p for p in outdir.parents if not p.exists()]
    cfg = AnalyzeConfig(
        model=a.model, outdir=outdir, target=Target(a.target), batch=a.batch or 1, input_shapes=dict(a.input_shape),
        calib=CalibConfig(source=a.calib, samples=a.calib_samples, seed=a.seed, observer=ob, mean=a.mean, std=a.std),
        eval_source=a.eval, samples=a.samples, maps=a.maps, policy=policy, quantized=a.quantized, top=a.top,
        eps=a.eps, rotate=a.rotate, force=a.force)
    try:
        res = analyze(cfg)
    except BaseException:
        for p in created:
            try:
                p.rmdir()
            except OSError:
                break
        raise
    r = res.report
    worst = ", ".join(f"{w['role']} b{w['block']} ({w['sqnr_db_per_tensor']:.1f} dB)" if w["block"] is not None
                      else f"{w['role']} ({w['sqnr_db_per_tensor']:.1f} dB)" for w in r["ranking"][:3])
    log.info("wrote %s and %s (%d operators; worst per-tensor: %s)", res.outdir / REPORT_HTML,
             res.outdir / REPORT_JSON, len(r["operators"]), worst or "-")
    rot = r.get("rotation")
    if rot is not None and rot["operators"]:
        med = {k: float(np.median([o[k]["spread"] for o in rot["operators"]])) for k in ("before", "after")}
        log.info("rotation: median input channel spread (largest / median channel range) %.1f -> %.1f over %d "
                 "linears", med["before"], med["after"], len(rot["operators"]))
    elif rot is not None:
        log.warning("rotation: the residual stream was not rotated (%s)",
                    "; ".join((rot.get("pass") or {}).get("notes", [])) or "no rotation pass")
    return 0


__all__ = ["AnalyzeConfig", "AnalyzeResult", "TokenInfo", "analyze", "analysis_plan", "detect_tokens",
           "error_stats", "channel_ranges", "attention_grids", "add_arguments", "run_command"]
