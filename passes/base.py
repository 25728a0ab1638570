"""Pass infrastructure: a pass has one job, mutates a graphsurgeon graph in place and reports what it changed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar

import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

A = TypeVar("A")


@dataclass
class PassResult(Generic[A]):
    """What a pass did: ``counts`` maps a rule/what-changed to how often (e.g. ``{"LayerNorm fusions": 25}``).

    ``artifacts`` is what the pass computed for its caller, typed per pass (``AnnotatePass``: the roles,
    ``InsertQDQPass``: each node's scales and zero-points, ``ScaleMigrationPass``: the sites it migrated). It is not
    part of the report (``to_json``).
    """

    name: str
    modified: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    artifacts: A | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {"pass": self.name, "modified": self.modified, "counts": dict(self.counts),
                "notes": list(self.notes), "seconds": round(self.seconds, 4)}


class GraphPass(Protocol):
    """The pass contract. ``name`` is what ``--dump-after`` and build.json use."""

    name: ClassVar[str]

    def run(self, graph: gs.Graph) -> PassResult: ...
