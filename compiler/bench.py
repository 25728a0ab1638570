"""Latency measurement: models side by side, timed in alternating blocks within one run.

ORT's idle worker threads spin after a run and steal cores from another session, so models are never timed
run-by-run interleaved: each model runs a block of iterations, then a short pause, then the next model; the
blocks rotate until every model has ``rounds`` blocks. Ratios are computed per round (pairwise), then the median.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    batch: int = 1
    threads: int = 2
    warmup: int = 5
    block: int = 10  # iterations per block
    rounds: int = 5
    pause_s: float = 0.3


@dataclass
class ModelTiming:
    model: str
    median_ms: float
    p90_ms: float
    ms_per_image: float
    images_per_s: float
    speedup_vs_first: float | None

    def to_json(self) -> dict:
        return asdict(self)


def random_feeds(sess, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.sess.get_inputs():
        shape = [batch if (j == 0 and not isinstance(d, int)) else (d if isinstance(d, int) else 1)
                 for j, d in enumerate(i.shape)]
        if "float" in i.type:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float16 if "16" in i.type else np.float32)
        else:
            feeds[i.name] = rng.integers(0, 100, size=shape).astype(np.int64)
    return feeds


def bench(models: list[Path], cfg: BenchConfig) -> list[ModelTiming]:
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.ort import OrtRuntime, quiet

    quiet()
    rt = OrtRuntime()
    sessions = [rt.session(str(m), SessionOptions(threads=cfg.threads)) for m in models]
    feeds = [random_feeds(s, cfg.batch) for s in sessions]
    times: list[list[float]] = [[] for _ in models]
    round_medians: list[list[float]] = [[] for _ in models]
    for s, f in zip(sessions, feeds):
        for _ in range(cfg.warmup):
            s.run(f)
    for r in range(cfg.rounds):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            time.sleep(cfg.pause_s)
            s.run(f)  # re-warm caches after the pause
            block = []
            for _ in range(cfg.block):
                t0 = time.perf_counter()
                s.run(f)
                block.append(time.perf_counter() - t0)
            times[i] += block
            round_medians[i].append(float(np.median(block)))
    out = []
    for i, m in enumerate(models):
        med = float(np.median(times[i])) * 1e3
        ratio = None if i == 0 else float(np.median(np.array(round_medians[0]) / np.array(round_medians[i])))
        out.append(ModelTiming(str(m), round(med, 3), round(float(np.percentile(times[i], 90)) * 1e3, 3),
                               round(med / cfg.batch, 3), round(1e3 * cfg.batch / med, 2),
                               None if ratio is None else round(ratio, 3)))
    return out


def format_table(rows: list[ModelTiming]) -> str:
    head = f"{'model':50s} {'median ms':>10s} {'p90 ms':>8s} {'ms/img':>8s} {'img/s':>8s} {'x first':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = r.model if len(r.model) <= 50 else "..." + r.model[-47:]
        sp = "-" if r.speedup_vs_first is None else f"{r.speedup_vs_first:.2f}"
        lines.append(f"{name:50s} {r.median_ms:10.2f} {r.p90_ms:8.2f} {r.ms_per_image:8.2f} {r.images_per_s:8.1f} {sp:>8s}")
    return "\n".join(lines)
