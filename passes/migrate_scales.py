"""Channel-scale migration (SmoothQuant-style) so per-tensor activation quantization gets per-channel accuracy.

For a quantized linear y = x W (Gemm, W[K, N] constant) whose input channels have calibrated |x| maxima a_k and
weight rows |W[k, :]| maxima w_k, choose s_k = a_k^alpha / w_k^(1 - alpha) and compute y = (x / s) (s * W).
The division lands where it is exact and free when it can:
- x produced by LayerNormalization whose every consumer is such a Gemm: gamma /= s, beta /= s (a LayerNorm
  reparameterization, exact in float). Layout ops that keep the channel axis last and never mix channels (Reshape,
  Transpose, Slice, Concat, zero Pad: Swin's cyclic shift and window partition) may sit in between, as long as
  nothing else reads their outputs;
- otherwise one ``Mul(x, 1/s)`` before the consumers (GELU output -> fc2); reported in the pass counts.
All Gemms reading x share one s (computed from the max over their weight rows). Sites where the fold is not exact
or the statistics are unusable (non-constant or shared weights, a transposed B, zero/NaN channel maxima) are
skipped with a note naming the node.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from vitc.passes.base import PassResult
from vitc.passes.graphutil import const_value, finish

log = logging.getLogger(__name__)


def smoothing_factors(act_absmax: np.ndarray, w_rowmax: np.ndarray, alpha: float) -> np.ndarray:
    a = np.maximum(act_absmax.astype(np.float64), 1e-5)
    w = np.maximum(w_rowmax.astype(np.float64), 1e-5)
    s = a ** alpha / w ** (1.0 - alpha)
    s = s / np.exp(np.mean(np.log(s)))  # geometric mean 1: keeps magnitudes near the original
    # Never amplify a channel (s < 1): a channel that was quiet on the calibration set but spikes on another input
    # would then overflow the per-tensor range. Only the loud channels are divided down.
    return np.clip(s, 1.0, 1e4).astype(np.float32)


@dataclass(frozen=True)
class Migration:
    """What :class:`ScaleMigrationPass` did (its result's ``artifacts``)."""

    applied: dict[str, np.ndarray] = field(default_factory=dict)  # migrated Gemm-input tensor -> s
    renamed: dict[str, str] = field(default_factory=dict)  # new Gemm-input tensor -> original (a Mul was inserted)


class ScaleMigrationPass:
    name: ClassVar[str] = "migrate_scales"

    def __init__(self, factors: Mapping[str, np.ndarray], nodes: set[str] | None = None,
                 fold_layernorm: bool = True, insert_mul: bool = True,
                 shifts: Mapping[str, np.ndarray] | None = None):
        self.factors = factors  # Gemm input tensor -> s (one factor per input channel)
        # Gemm input tensor -> c: quantize x / s - c instead of x / s (c folded into beta or one Add, and back into
        # the Gemm bias as c @ (s * W)); only sites that also have factors (s may be all ones)
        self.shifts = dict(shifts or {})
        self.nodes = nodes  # restrict to these Gemm nodes (None: every eligible Gemm)
        self.fold_layernorm = fold_layernorm
        self.insert_mul = insert_mul

    @classmethod
    def from_alpha(cls, channel_absmax: Mapping[str, np.ndarray], graph: gs.Graph, alpha: float,
                   nodes: set[str] | None = None, caps: Mapping[str, float] | None = None) -> "ScaleMigrationPass":
        """Factors from one fixed strength for every site (the search in vitc.compiler.calib.range_search picks per site);
        ``caps`` (Gemm node -> max strength, the policy's ``max_alpha``) lowers it where a site's Gemm has one."""
        factors = {}
        for name, x in graph.tensors().items():
            gemms = [u for u in x.outputs if u.op == "Gemm" and u.inputs[0] is x and (nodes is None or u.name in nodes)]
            if name not in channel_absmax or not gemms:
                continue
            ws = [const_value(g.inputs[1]) for g in gemms]
            if any(w is None or w.ndim != 2 for w in ws):
                continue
            w_rowmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
            a = np.asarray(channel_absmax[name], np.float32)
            site_alpha = min([alpha] + [caps[g.name] for g in gemms if caps and g.name in caps])
            if a.shape == w_rowmax.shape:
                factors[name] = smoothing_factors(a, w_rowmax, site_alpha)
        return cls(factors, nodes)

    def run(self, graph: gs.Graph) -> PassResult[Migration]:
        """The sites migrated and the tensors renamed are the result's ``artifacts`` (a :class:`Migration`)."""
        done = Migration()
        counts = {"LayerNorm folds": 0, "Mul inserted": 0, "Add inserted": 0, "Gemms rescaled": 0, "centred": 0,
                  "sites skipped": 0}
        notes: list[str] = []
        outs = {t.name for t in graph.outputs}
        for name, x in list(graph.tensors().items()):
            if name not in self.factors or isinstance(x, gs.Constant) or name in outs:
                continue
            users = list(x.outputs)
            gemms = [u for u in users if u.op == "Gemm" and u.inputs[0] is x]
            if self.nodes is not None:
                gemms = [g for g in gemms if g.name in self.nodes]
            if not gemms:
                continue
            why = self._unfit(x, gemms)
            if why:
                counts["sites skipped"] += 1
                notes.append(f"{gemms[0].name}: {why}; left as is")
                continue
            ws = [const_value(g.inputs[1]) for g in gemms]
            s = np.asarray(self.factors[name], np.float32)
            if s.shape != (ws[0].shape[0],) or not np.isfinite(s).all() or (s <= 0).any():
                counts["sites skipped"] += 1
                notes.append(f"{gemms[0].name}: unusable scale factors for {name} (zero, NaN or wrong size); left as is")
                continue
            c = self.shifts.get(name)
            if c is not None:
                c = np.asarray(c, np.float32)
                if c.shape != s.shape or not np.isfinite(c).all():
                    counts["sites skipped"] += 1
                    notes.append(f"{gemms[0].name}: unusable centre for {name} (NaN or wrong size); left as is")
                    continue
            if c is not None and any(g.attrs.get("beta", 1.0) != 1.0 or g.attrs.get("alpha", 1.0) != 1.0
                                     or (len(g.inputs) > 2 and const_value(g.inputs[2]) is None) for g in gemms):
                counts["sites skipped"] += 1
                notes.append(f"{gemms[0].name}: bias is not a plain constant, cannot fold the centre; left as is")
                continue
            only_gemms = len(users) == len(gemms)
            # the LayerNorm whose output reaches x only through channel-keeping layout ops (a 3-D -> 2-D reshape,
            # Swin's cyclic shift and window partition), with nothing else reading it on the way
            src = _layernorm_through_layout(x, gemms, outs) if only_gemms else None
            ln_ok = (self.fold_layernorm and src is not None and len(src.inputs) >= 3
                     and all(const_value(t) is not None for t in src.inputs[1:3]))
            if ln_ok:
                # new private constants: a gamma/beta shared with other LayerNorms (exporters deduplicate equal
                # initializers, e.g. every LayerNorm of a freshly initialised timm model) is left untouched for them
                gamma, beta = const_value(src.inputs[1]), const_value(src.inputs[2])
                src.inputs[1] = gs.Constant(f"{src.name}.gamma.migrated", (gamma / s).astype(gamma.dtype))
                new_beta = beta / s if c is None else beta / s - c
                src.inputs[2] = gs.Constant(f"{src.name}.beta.migrated", new_beta.astype(beta.dtype))
                counts["LayerNorm folds"] += 1
            elif self.insert_mul:
                cur = x
                if not np.all(s == 1.0):
                    xs = gs.Variable(f"{name}.migrated", dtype=x.dtype, shape=x.shape)
                    graph.nodes.append(gs.Node("Mul", name=f"{name}.migrate_mul",
                                               inputs=[x, gs.Constant(f"{name}.inv_s", (1.0 / s).astype(np.float32))],
                                               outputs=[xs]))
                    cur = xs
                    counts["Mul inserted"] += 1
                if c is not None:
                    xc = gs.Variable(f"{name}.centred", dtype=x.dtype, shape=x.shape)
                    graph.nodes.append(gs.Node("Add", name=f"{name}.centre_add",
                                               inputs=[cur, gs.Constant(f"{name}.minus_c", (-c).astype(np.float32))],
                                               outputs=[xc]))
                    cur = xc
                    counts["Add inserted"] += 1
                if cur is x:
                    continue
                for g in gemms:
                    g.inputs[0] = cur
                done.renamed[cur.name] = name
            else:
                counts["sites skipped"] += 1
                continue
            for g, w in zip(gemms, ws):
                wm = (w * s[:, None]).astype(w.dtype)
                g.inputs[1] = gs.Constant(f"{g.name}.weight.migrated", wm)
                counts["Gemms rescaled"] += 1
                if c is not None:
                    fold = (c.astype(np.float64) @ wm.astype(np.float64))
                    b = const_value(g.inputs[2]) if len(g.inputs) > 2 else None
                    nb = fold if b is None else b.reshape(-1).astype(np.float64) + fold
                    bias = gs.Constant(f"{g.name}.bias.centred", nb.astype(wm.dtype))
                    if len(g.inputs) > 2:
                        g.inputs[2] = bias
                    else:
                        g.inputs.append(bias)
            if c is not None:
                counts["centred"] += 1
            done.applied[name] = s
        finish(graph)
        return PassResult(self.name, bool(done.applied), counts, notes, artifacts=done)

    @staticmethod
    def _unfit(x: gs.Tensor, gemms: list[gs.Node]) -> str | None:
        for g in gemms:
            if g.attrs.get("transA", 0) or g.attrs.get("transB", 0):
                return "transposed Gemm operand"
            w = const_value(g.inputs[1])
            if w is None or w.ndim != 2:
                return "weight is not a constant matrix"
            if len(g.inputs[1].outputs) > 1:
                return "weight is shared with another node"
            if x.shape is None or x.shape[-1] != w.shape[0]:
                return "input channels do not match the weight rows"
        return None


def _axis(v: int, rank: int) -> int:
    return v + rank if v < 0 else v


def _keeps_channels(n: gs.Node) -> bool:
    """``n`` moves or slices data without touching the last (channel) axis: each output element (.., c) is an input
    element (.., c) or a zero of padding, so scaling channel c before ``n`` equals scaling it after."""
    x = n.inputs[0] if n.inputs else None
    rank = len(x.shape) if x is not None and x.shape is not None else None
    if n.op == "Identity":
        return True
    if n.op == "Reshape":
        y = n.outputs[0]
        return (x.shape is not None and y.shape is not None and len(x.shape) > 0 and len(y.shape) > 0
                and isinstance(x.shape[-1], int) and x.shape[-1] == y.shape[-1])
    if rank is None:
        return False
    if n.op == "Transpose":
        perm = n.attrs.get("perm")
        return perm is not None and _axis(int(perm[-1]), rank) == rank - 1
    if n.op == "Concat":
        return _axis(int(n.attrs.get("axis", 0)), rank) != rank - 1
    if n.op == "Slice":
        axes = const_value(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3].name else None
        if axes is None:
            return False
        return all(_axis(int(a), rank) != rank - 1 for a in axes.reshape(-1))
    if n.op == "Pad":
        pads = const_value(n.inputs[1]) if len(n.inputs) > 1 else None
        value = const_value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
        axes = n.inputs[3] if len(n.inputs) > 3 and n.inputs[3].name else None
        return (n.attrs.get("mode", "constant") == "constant" and pads is not None and axes is None
                and pads.size == 2 * rank and pads[rank - 1] == 0 and pads[2 * rank - 1] == 0
                and (value is None or float(np.asarray(value).reshape(-1)[0]) == 0.0))
    return False


def _layernorm_through_layout(x: gs.Tensor, gemms: list[gs.Node], outs: set[str]) -> gs.Node | None:
    """The LayerNormalization that produces ``x`` through channel-keeping ops only (or directly), when every tensor
    on the way is read by those ops or by ``gemms`` alone; None otherwise."""
    chain: dict[int, gs.Node] = {}
    ln = None
    frontier = [x]
    while frontier:
        t = frontier.pop()
        if len(t.inputs) != 1:
            return None
        p = t.inputs[0]
        if p.op == "LayerNormalization":
            if ln is not None and p is not ln:
                return None
            ln = p
            continue
        if id(p) in chain:
            continue
        if not _keeps_channels(p) or len(chain) >= 32:
            return None
        chain[id(p)] = p
        frontier.extend(p.inputs[: len(p.inputs) if p.op == "Concat" else 1])
    if ln is None:
        return None
    allowed = set(chain) | {id(g) for g in gemms}
    for t in [ln.outputs[0], *(o for n in chain.values() for o in n.outputs)]:
        if t.name in outs or any(id(c) not in allowed for c in t.outputs):
            return None
    return ln
