"""The runtime interface: compile an ONNX model into a session, run it, time it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SessionOptions:
    threads: int = 0  # 0: the runtime's default
    optimized_model_path: str | None = None  # ORT: write the optimized graph here (for inspection)
    graph_optimizations: bool = True


class Session(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Runtime(Protocol):
    name: str

    def available(self) -> tuple[bool, str]: ...

    def session(self, model: str | bytes, options: SessionOptions) -> Session: ...
