"""Running passes: per-pass reports, timing, error naming and --dump-after. What runs in which order is declared
in ``compiler/driver/stages.py``."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from vitc.compiler.errors import PassError, VitcError
from vitc.passes.base import GraphPass, PassResult

log = logging.getLogger(__name__)


class Target(enum.Enum):
    ORT = "ort"
    TRT = "trt"
    OPENVINO = "openvino"


@dataclass(frozen=True)
class PipelineConfig:
    target: Target = Target.ORT
    fuse: bool = True


def float_pipeline(cfg: PipelineConfig) -> list[GraphPass]:
    """The float passes of the build's declaration (``compiler/driver/stages.py``): canonicalize -> fusions; the fusions
    are off with ``fuse=False`` (the --no-fuse comparison)."""
    from vitc.compiler.driver.stages import float_passes

    return float_passes(cfg.target, cfg.fuse)


@dataclass
class Dumps:
    """``--dump-after``: the pass names whose graphs are written (``all``: every pass), the folder, and how many
    passes ran so far (the NN of ``after_NN_NAME.onnx`` counts the dumpable passes of the whole build)."""

    names: frozenset[str]
    folder: Path
    passes_run: int = 0

    def after(self, name: str, graph: gs.Graph) -> None:
        """Count a pass that ran; write the graph if ``name`` was asked for."""
        self.passes_run += 1
        if name in self.names or "all" in self.names:
            self.folder.mkdir(parents=True, exist_ok=True)
            onnx.save(export(graph), str(self.folder / f"after_{self.passes_run:02d}_{name}.onnx"))


def export(graph: gs.Graph, metadata_from: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The graph as a model; ``metadata_from``'s metadata_props (e.g. the preprocessing `vitc export` records)
    are carried over, since graphsurgeon does not keep them."""
    model = gs.export_onnx(graph, do_type_check=False)
    if metadata_from is not None:
        del model.metadata_props[:]
        model.metadata_props.extend(metadata_from.metadata_props)
    # graphsurgeon keeps the imported opset entries; make them agree with graph.opset (passes may raise it)
    # and declare every domain a node uses.
    imports = {imp.domain: imp.version for imp in model.opset_import}
    imports[""] = max(graph.opset, imports.get("", 0))
    imports.pop("ai.onnx", None)
    for n in model.graph.node:
        if n.domain and n.domain not in imports:
            imports[n.domain] = 1
    del model.opset_import[:]
    for dom, ver in sorted(imports.items()):
        model.opset_import.append(onnx.helper.make_opsetid(dom, ver))
    return model


def _node_at_failure(exc: BaseException) -> str | None:
    """The node a pass was on when it raised: the first node among the locals of its innermost frame in vitc.passes
    (the node being matched or rewritten: passes take it as their first argument or loop variable)."""
    node = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals.get("__name__", "").startswith("vitc.passes."):
            node = next((v.name for v in frame.f_locals.values() if isinstance(v, gs.Node)), node)
        tb = tb.tb_next
    return node


def run_passes(graph: gs.Graph, passes: Sequence[GraphPass], *, dumps: Dumps | None = None, quiet: bool = False,
               on_result: Callable[[PassResult], None] | None = None) -> list[PassResult]:
    """Run ``passes`` in order on ``graph``: each result timed and logged (at debug level with ``quiet``), a failure
    raised as a PassError naming the pass and node, the graph written after each pass ``dumps`` asks for."""
    results = []
    for p in passes:
        t0 = time.perf_counter()
        try:
            res = p.run(graph)
        except VitcError:
            raise
        except Exception as exc:
            raise PassError(p.name, f"{type(exc).__name__}: {exc}", node=_node_at_failure(exc),
                            hint="rerun with --log-level debug and --dump-after to inspect the graph") from exc
        res.seconds = time.perf_counter() - t0
        log.log(logging.DEBUG if quiet else logging.INFO, "pass %-16s %s", p.name,
                ", ".join(f"{k}: {v}" for k, v in res.counts.items() if v))
        results.append(res)
        if on_result:
            on_result(res)
        if dumps is not None:
            dumps.after(p.name, graph)
    return results
