"""Online Hadamard before fc2: spread the MLP activation's output over its channels before it is quantized.

fc2 reads GELU's output, which no earlier weight can reach (GELU is not linear), so neither migration nor the
residual-stream rotation can reshape it. It is one-sided and heavy-tailed per token: a per-tensor symmetric int8
grid spends half its levels on values GELU never produces and most of the rest on a few large activations. This pass
multiplies fc2's input by an orthogonal ``R`` in the graph and folds ``R^T`` into fc2's weight (``x W =
(x R)(R^T W)``), as QuaRot does before an LLM's down projection:

- ``R`` is block-diagonal, one ``B x B`` block ``S H`` repeated over the width, ``H`` the normalised Walsh-Hadamard
  matrix and ``S`` a seeded random sign diagonal (it keeps the activation's positive mean from piling up in one
  output channel of each block). In the graph: ``Reshape [.., K] -> [.., K/B, B]``, a float ``MatMul`` by the
  ``B x B`` block, ``Reshape`` back: ``B`` multiply-adds per activation (``B/N`` of fc2's own work).
- The MatMul is named ``<fc2>.hadamard``: annotate looks through it (fc2 keeps its role) and the planner keeps it
  float (quantizing its input would bring back what the rotation removes).

Exact in float (``R`` is orthogonal; the fold is computed in float64). fc2 is found by role (annotate). An fc2 whose
width is not a multiple of ``B`` gets the largest power-of-two block that divides it (at least ``MIN_BLOCK``, noted);
one without such a block, or whose input shape is unknown, or whose weight is not a constant stays as it is, with the
reason in the notes.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from vitc.passes.annotate import annotate
from vitc.passes.base import PassResult
from vitc.passes.graphutil import HADAMARD_SUFFIX, const_value, finish

MIN_BLOCK = 8  # below this the rotation spreads too little to be worth a MatMul


def hadamard_block(block: int, seed: int) -> np.ndarray:
    """``S H`` (float64, orthogonal): the normalised ``block x block`` Walsh-Hadamard matrix with its rows' signs
    flipped by a seeded random diagonal ``S``."""
    if block < 2 or block & (block - 1):
        raise ValueError(f"Hadamard block size must be a power of two >= 2, got {block}")
    h = np.array([[1.0]])
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=block)
    return signs[:, None] * h / np.sqrt(block)


class Fc2Hadamard:
    name: ClassVar[str] = "fc2_hadamard"

    def __init__(self, block: int = 32, seed: int = 0):
        if block < MIN_BLOCK:
            raise ValueError(f"Hadamard block size must be >= {MIN_BLOCK}, got {block}")
        hadamard_block(block, seed)  # a bad block size fails here, before any graph is touched
        self.block = block
        self.seed = seed

    def run(self, graph: gs.Graph) -> PassResult:
        counts = {"fc2 inputs rotated": 0, "with a smaller block": 0, "fc2 left as is": 0}
        notes: list[str] = []
        roles = annotate(graph)
        by_name = {n.name: n for n in graph.nodes}
        for name, role in roles.items():
            if role.role != "fc2":
                continue
            why, block = self._rotate(graph, by_name[name])
            if why:
                counts["fc2 left as is"] += 1
                notes.append(f"{name}: not rotated ({why})")
                continue
            counts["fc2 inputs rotated"] += 1
            if block != self.block:
                counts["with a smaller block"] += 1
                notes.append(f"{name}: block {block} (its input width is not a multiple of {self.block})")
        if counts["fc2 inputs rotated"]:
            finish(graph)
            notes.insert(0, f"block {self.block}, seed {self.seed}")
        return PassResult(self.name, counts["fc2 inputs rotated"] > 0, counts, notes,
                          artifacts={"block": self.block, "seed": self.seed})

    def _rotate(self, graph: gs.Graph, fc2: gs.Node) -> tuple[str | None, int]:
        """Insert the rotation in front of ``fc2`` and fold it into the weight: (None, block size used), or (the
        reason it cannot, 0)."""
        if fc2.op == "Gemm" and (fc2.attrs.get("transA", 0) or float(fc2.attrs.get("alpha", 1.0)) != 1.0):
            return "Gemm with transA or alpha", 0
        w = const_value(fc2.inputs[1])
        if w is None or w.ndim != 2:
            return "no constant 2-D weight", 0
        if not np.any(w):
            return "all-zero weight", 0
        x = fc2.inputs[0]
        if x.inputs and x.inputs[0].name.endswith(".hadamard_merge"):
            return "already rotated", 0
        trans_b = fc2.op == "Gemm" and bool(fc2.attrs.get("transB", 0))
        k = w.shape[1] if trans_b else w.shape[0]
        block = self.block
        while k % block and block > MIN_BLOCK:
            block //= 2
        if k % block:
            return f"input width {k} has no power-of-two block >= {MIN_BLOCK} dividing it", 0
        if x.shape is None or not x.shape or x.shape[-1] != k:
            return "input shape unknown", 0
        rot = hadamard_block(block, self.seed)
        r = len(x.shape)
        groups = k // block
        wk = np.asarray(w, np.float64)
        wk = wk.T if trans_b else wk  # [K, N]
        # R^T W, block by block: R's blocks are S H, so each group of K rows gets (S H)^T W_g
        folded = np.einsum("ij,gin->gjn", rot, wk.reshape(groups, block, -1)).reshape(k, -1)
        folded = (folded.T if trans_b else folded).astype(w.dtype)
        fc2.inputs[1] = gs.Constant(f"{fc2.name}.hadamard_folded_weight", folded)
        split = gs.Constant(f"{fc2.name}.hadamard_split", np.array([0] * (r - 1) + [groups, block], np.int64))
        merge = gs.Constant(f"{fc2.name}.hadamard_merge", np.array([0] * (r - 1) + [k], np.int64))
        h = gs.Constant(f"{fc2.name}.hadamard_block", rot.astype(x.dtype if x.dtype is not None else w.dtype))
        lead = list(x.shape[:-1])
        xs = gs.Variable(f"{fc2.name}.hadamard_in", x.dtype, lead + [groups, block])
        xr = gs.Variable(f"{fc2.name}.hadamard_out", x.dtype, lead + [groups, block])
        xm = gs.Variable(f"{fc2.name}.hadamard_merged", x.dtype, list(x.shape))
        graph.nodes += [gs.Node("Reshape", f"{fc2.name}.hadamard_split", inputs=[x, split], outputs=[xs]),
                        gs.Node("MatMul", f"{fc2.name}{HADAMARD_SUFFIX}", inputs=[xs, h], outputs=[xr]),
                        gs.Node("Reshape", f"{fc2.name}.hadamard_merge", inputs=[xr, merge], outputs=[xm])]
        fc2.inputs[0] = xm
        return None, block
