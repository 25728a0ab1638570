"""Pattern / check / rewrite: the driver every fusion pass runs through.

A fusion names the nodes a pattern can start from (``anchors``), then for each anchor ``match`` either

- returns ``None``: the anchor does not start the pattern at all (an Erf outside a GELU), nothing to say;
- returns :class:`NotFused`: the anchor starts the pattern but a check failed (a near-miss), with the reason;
  the graph is left untouched and the reason becomes a note of the pass's report ("node: not fused (why)");
- returns a match object, which ``rewrite`` turns into the fused node(s) and names the count it adds to.

Anchors are visited in graph order and each match is rewritten before the next anchor is matched, so a fusion
sees the graph as its earlier rewrites left it. ``run`` cleans up and re-sorts the graph once if anything fused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import onnx_graphsurgeon as gs

from vitc.passes.base import PassResult
from vitc.passes.graphutil import UniqueNames, finish, graph_output_names

log = logging.getLogger(__name__)

M = TypeVar("M")


@dataclass(frozen=True)
class NotFused:
    """A near-miss: the pattern started at this anchor, but ``why`` stops the fusion."""

    why: str


@dataclass
class FusionContext:
    """What matching and rewriting share within one run: the graph's output names (a graph output is never folded
    away), the unique-name allocator for new nodes and tensors, and the graph's ONNX opset."""

    outs: set[str]
    names: UniqueNames
    opset: int


class Fusion(Generic[M]):
    name: ClassVar[str]
    counts: ClassVar[tuple[str, ...]]  # the report's count keys, in order (each starts at 0)

    def anchors(self, graph: gs.Graph) -> Iterable[gs.Node]:
        raise NotImplementedError

    def match(self, anchor: gs.Node, ctx: FusionContext) -> M | NotFused | None:
        raise NotImplementedError

    def rewrite(self, graph: gs.Graph, m: M, ctx: FusionContext) -> str | tuple[str, ...]:
        """Rewrite one match; return the count key(s) it adds to."""
        raise NotImplementedError

    def skip(self, graph: gs.Graph) -> str | None:
        """Why this fusion cannot run on ``graph`` at all (e.g. the opset lacks the fused op), else None."""
        return None

    def finalize(self, graph: gs.Graph, counts: dict[str, int]) -> None:
        """After the last rewrite, before the graph is cleaned up (only when something fused)."""

    def run(self, graph: gs.Graph) -> PassResult:
        counts = dict.fromkeys(self.counts, 0)
        why = self.skip(graph)
        if why is not None:
            return PassResult(self.name, False, counts, notes=[why])
        ctx = FusionContext(graph_output_names(graph), UniqueNames(graph), graph.opset)
        notes: list[str] = []
        for anchor in list(self.anchors(graph)):
            m = self.match(anchor, ctx)
            if m is None:
                continue
            if isinstance(m, NotFused):
                where = anchor.name or f"<unnamed {anchor.op}>"
                notes.append(f"{where}: not fused ({m.why})")
                log.debug("%s: %s not fused: %s", self.name, where, m.why)
                continue
            keys = self.rewrite(graph, m, ctx)
            for key in (keys,) if isinstance(keys, str) else keys:
                counts[key] = counts.get(key, 0) + 1
        modified = any(counts.values())
        if modified:
            self.finalize(graph, counts)
            finish(graph)
        return PassResult(self.name, modified, counts, notes)
