"""Small transformer ONNX models built with onnx.helper, in the spellings real exporters use.

Used by the tests as fixtures (no torch needed): a ViT (patch Conv, CLS token, position embedding, pre-norm
blocks with decomposed LayerNorm and erf-GELU, split q/k/v like HF-transformers exports) and a BERT-like encoder
(token inputs embedded by Gather, post-norm blocks, tanh-GELU). Weights are random but a few channels are scaled
up, mimicking the outlier channels of trained transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class TinyConfig:
    depth: int = 2
    dim: int = 32
    heads: int = 2
    mlp_ratio: int = 4
    img: int = 32
    patch: int = 8
    classes: int = 10
    gelu: str = "erf"  # erf | erf_mul | tanh
    ln_square: str = "pow"  # pow | mul
    outliers: bool = True
    opset: int = 14
    seed: int = 0
    dynamic_batch: bool = True
    layer_scale: bool = False  # CaiT/DINOv2 LayerScale: each branch output times a learned per-channel gamma
    decoder: bool = False  # a second output: the patch tokens as a map, upsampled by a ConvTranspose (dense heads)


class GraphBuilder:
    """Builds an ONNX graph node by node: seeded random weights as initializers, unique tensor names."""

    def __init__(self, seed: int):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def name(self, p: str) -> str:
        self.n += 1
        return f"{p}_{self.n}"

    def const(self, value, prefix="c") -> str:
        n = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), n))
        return n

    def op(self, op: str, inputs: list[str], prefix: str | None = None, domain: str | None = None, **attrs) -> str:
        out = self.name(prefix or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"/{out}/{op}", domain=domain, **attrs))
        return out

    def w(self, *shape, scale=None) -> np.ndarray:
        scale = scale if scale is not None else 1.0 / math.sqrt(shape[0])
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    # -- building blocks in exporter spellings --------------------------------------------------------------------
    def layernorm(self, x: str, dim: int, square: str, prefix: str, outlier: bool = False) -> str:
        m = self.op("ReduceMean", [x], f"{prefix}_mean", axes=[-1])
        d = self.op("Sub", [x, m], f"{prefix}_sub")
        sq = self.op("Pow", [d, self.const(np.float32(2.0))], f"{prefix}_pow") if square == "pow" else \
            self.op("Mul", [d, d], f"{prefix}_sq")
        v = self.op("ReduceMean", [sq], f"{prefix}_var", axes=[-1])
        ve = self.op("Add", [v, self.const(np.float32(1e-6))], f"{prefix}_addeps")
        s = self.op("Sqrt", [ve], f"{prefix}_sqrt")
        n = self.op("Div", [d, s], f"{prefix}_div")
        gamma = (1.0 + 0.1 * self.rng.standard_normal(dim)).astype(np.float32)
        beta = (0.1 * self.rng.standard_normal(dim)).astype(np.float32)
        if outlier:  # a few LayerNorm output channels much larger than the rest (trained-ViT behaviour)
            idx = self.rng.choice(dim, size=max(1, dim // 16), replace=False)
            gamma[idx] *= 12.0
            beta[idx] += 3.0
        g = self.op("Mul", [n, self.const(gamma)], f"{prefix}_gamma")
        return self.op("Add", [g, self.const(beta)], f"{prefix}_beta")

    def linear(self, x: str, k: int, n: int, prefix: str, bias_first: bool = False) -> str:
        y = self.op("MatMul", [x, self.const(self.w(k, n))], f"{prefix}_mm")
        b = self.const((0.02 * self.rng.standard_normal(n)).astype(np.float32))
        return self.op("Add", [b, y] if bias_first else [y, b], f"{prefix}_bias")

    def gelu(self, x: str, form: str, prefix: str) -> str:
        if form in ("erf", "erf_mul"):
            s = self.op("Div", [x, self.const(np.float32(math.sqrt(2)))], f"{prefix}_div") if form == "erf" else \
                self.op("Mul", [x, self.const(np.float32(1 / math.sqrt(2)))], f"{prefix}_scale")
            e = self.op("Erf", [s], f"{prefix}_erf")
            a = self.op("Add", [e, self.const(np.float32(1.0))], f"{prefix}_add1")
            if form == "erf":
                m = self.op("Mul", [x, a], f"{prefix}_mulx")
                return self.op("Mul", [m, self.const(np.float32(0.5))], f"{prefix}_half")
            h = self.op("Mul", [x, self.const(np.float32(0.5))], f"{prefix}_half")
            return self.op("Mul", [h, a], f"{prefix}_mul")
        # tanh form
        c = self.op("Pow", [x, self.const(np.float32(3.0))], f"{prefix}_cube")
        c2 = self.op("Mul", [c, self.const(np.float32(0.044715))], f"{prefix}_c")
        s = self.op("Add", [x, c2], f"{prefix}_inner")
        t = self.op("Mul", [s, self.const(np.float32(math.sqrt(2 / math.pi)))], f"{prefix}_k")
        th = self.op("Tanh", [t], f"{prefix}_tanh")
        a = self.op("Add", [th, self.const(np.float32(1.0))], f"{prefix}_add1")
        m = self.op("Mul", [x, a], f"{prefix}_mulx")
        return self.op("Mul", [m, self.const(np.float32(0.5))], f"{prefix}_half")

    def attention(self, x: str, tokens: int, dim: int, heads: int, prefix: str) -> str:
        hd = dim // heads
        shape = self.const(np.array([0, tokens, heads, hd], np.int64))
        q = self.linear(x, dim, dim, f"{prefix}_q")
        k = self.linear(x, dim, dim, f"{prefix}_k")
        v = self.linear(x, dim, dim, f"{prefix}_v")
        qh = self.op("Transpose", [self.op("Reshape", [q, shape], f"{prefix}_qr")], f"{prefix}_qt", perm=[0, 2, 1, 3])
        kh = self.op("Transpose", [self.op("Reshape", [k, shape], f"{prefix}_kr")], f"{prefix}_kt", perm=[0, 2, 3, 1])
        vh = self.op("Transpose", [self.op("Reshape", [v, shape], f"{prefix}_vr")], f"{prefix}_vt", perm=[0, 2, 1, 3])
        s = self.op("MatMul", [qh, kh], f"{prefix}_qk")
        s = self.op("Div", [s, self.const(np.float32(math.sqrt(hd)))], f"{prefix}_scale")
        p = self.op("Softmax", [s], f"{prefix}_softmax", axis=-1)
        o = self.op("MatMul", [p, vh], f"{prefix}_av")
        o = self.op("Transpose", [o], f"{prefix}_ot", perm=[0, 2, 1, 3])
        o = self.op("Reshape", [o, self.const(np.array([0, tokens, dim], np.int64))], f"{prefix}_or")
        return self.linear(o, dim, dim, f"{prefix}_proj")


def tiny_vit(cfg: TinyConfig = TinyConfig()) -> onnx.ModelProto:
    b = GraphBuilder(cfg.seed)
    batch = "batch" if cfg.dynamic_batch else 1
    npatch = (cfg.img // cfg.patch) ** 2
    tokens = npatch + 1
    x = b.op("Conv", ["input", b.const(b.w(cfg.dim, 3, cfg.patch, cfg.patch, scale=0.1)),
                      b.const(np.zeros(cfg.dim, np.float32))], "patch_embed",
             kernel_shape=[cfg.patch, cfg.patch], strides=[cfg.patch, cfg.patch])
    x = b.op("Reshape", [x, b.const(np.array([0, cfg.dim, npatch], np.int64))], "flatten")
    x = b.op("Transpose", [x], "to_tokens", perm=[0, 2, 1])
    # class token expanded to the batch through the Shape chain exporters emit
    shp = b.op("Shape", ["input"], "shape")
    bsz = b.op("Gather", [shp, b.const(np.array(0, np.int64))], "bsz", axis=0)
    bsz = b.op("Unsqueeze", [bsz, b.const(np.array([0], np.int64))], "bsz_u")
    tgt = b.op("Concat", [bsz, b.const(np.array([1, cfg.dim], np.int64))], "cls_shape", axis=0)
    cls = b.op("Expand", [b.const(b.w(1, 1, cfg.dim, scale=0.5)), tgt], "cls")
    x = b.op("Concat", [cls, x], "tokens", axis=1)
    x = b.op("Add", [x, b.const(b.w(1, tokens, cfg.dim, scale=0.1))], "pos")
    for i in range(cfg.depth):
        h = b.layernorm(x, cfg.dim, cfg.ln_square, f"b{i}_norm1", outlier=cfg.outliers)
        a = b.attention(h, tokens, cfg.dim, cfg.heads, f"b{i}_attn")
        if cfg.layer_scale:
            a = b.op("Mul", [a, b.const(np.abs(b.w(cfg.dim, scale=0.3)) + 0.05)], f"b{i}_ls1")
        x = b.op("Add", [x, a], f"b{i}_res1")
        h = b.layernorm(x, cfg.dim, cfg.ln_square, f"b{i}_norm2", outlier=cfg.outliers)
        h = b.gelu(b.linear(h, cfg.dim, cfg.dim * cfg.mlp_ratio, f"b{i}_fc1"), cfg.gelu, f"b{i}_gelu")
        m = b.linear(h, cfg.dim * cfg.mlp_ratio, cfg.dim, f"b{i}_fc2")
        if cfg.layer_scale:  # constant first, as some exporters write it
            m = b.op("Mul", [b.const(np.abs(b.w(1, 1, cfg.dim, scale=0.3)) + 0.05), m], f"b{i}_ls2")
        x = b.op("Add", [x, m], f"b{i}_res2")
    x = b.layernorm(x, cfg.dim, cfg.ln_square, "final_norm")
    c = b.op("Gather", [x, b.const(np.array(0, np.int64))], "cls_out", axis=1)
    logits = b.linear(c, cfg.dim, cfg.classes, "head")
    outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [batch, cfg.classes])]
    if cfg.decoder:
        g = cfg.img // cfg.patch
        p = b.op("Slice", [x, b.const(np.array([1], np.int64)), b.const(np.array([tokens], np.int64)),
                           b.const(np.array([1], np.int64))], "patch_tokens")
        p = b.op("Transpose", [p], "to_channels", perm=[0, 2, 1])
        p = b.op("Reshape", [p, b.const(np.array([0, cfg.dim, g, g], np.int64))], "to_map")
        up = b.op("ConvTranspose", [p, b.const(b.w(cfg.dim, 8, 2, 2, scale=0.2)), b.const(b.w(8, scale=0.1))],
                  "upsample", kernel_shape=[2, 2], strides=[2, 2])
        up = b.op("Relu", [up], "upsample_relu")
        dense = b.op("Conv", [up, b.const(b.w(2, 8, 1, 1, scale=0.3)), b.const(np.zeros(2, np.float32))], "dense",
                     kernel_shape=[1, 1])
        outputs.append(helper.make_tensor_value_info(dense, TensorProto.FLOAT, [batch, 2, 2 * g, 2 * g]))
    graph = helper.make_graph(
        b.nodes, "tiny_vit",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, cfg.img, cfg.img])],
        outputs, b.inits)
    graph.output[0].name = logits
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", cfg.opset)], producer_name="vitc-tiny")
    m.ir_version = 8
    _rename_output(m, logits, "logits")
    return m


def tiny_bert(depth: int = 2, dim: int = 32, heads: int = 2, seq: int = 16, vocab: int = 100,
              seed: int = 0, opset: int = 14) -> onnx.ModelProto:
    """Post-norm BERT-like encoder: input_ids [B, seq] int64 -> last hidden state [B, seq, dim]."""
    b = GraphBuilder(seed)
    x = b.op("Gather", [b.const(b.w(vocab, dim, scale=1.0)), "input_ids"], "embed", axis=0)
    x = b.op("Add", [x, b.const(b.w(1, seq, dim, scale=0.1))], "pos")
    x = b.layernorm(x, dim, "pow", "emb_norm")
    for i in range(depth):
        x = b.layernorm(b.op("Add", [x, b.attention(x, seq, dim, heads, f"l{i}_attn")], f"l{i}_res1"),
                        dim, "pow", f"l{i}_norm1", outlier=True)
        h = b.gelu(b.linear(x, dim, dim * 4, f"l{i}_fc1", bias_first=True), "tanh", f"l{i}_gelu")
        x = b.layernorm(b.op("Add", [x, b.linear(h, dim * 4, dim, f"l{i}_fc2")], f"l{i}_res2"),
                        dim, "mul", f"l{i}_norm2", outlier=True)
    graph = helper.make_graph(
        b.nodes, "tiny_bert", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", seq, dim])], b.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="vitc-tiny")
    m.ir_version = 8
    _rename_output(m, x, "last_hidden_state")
    return m


def _rename_output(m: onnx.ModelProto, old: str, new: str) -> None:
    for n in m.graph.node:
        for i, o in enumerate(n.output):
            if o == old:
                n.output[i] = new
        for i, t in enumerate(n.input):
            if t == old:
                n.input[i] = new
    for o in m.graph.output:
        if o.name == old:
            o.name = new
