"""Label-free fidelity of a built model against its float reference (output SQNR, cosine)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class Fidelity:
    samples: int
    sqnr_db: float  # 10 log10(sum ref^2 / sum (ref - q)^2) over all outputs and samples
    worst_sample_sqnr_db: float
    mean_cosine: float

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    err = ref - np.asarray(test, np.float64)
    return float(10 * np.log10(max((ref ** 2).sum(), 1e-30) / max((err ** 2).sum(), 1e-30)))


def fidelity(reference: str | Path | bytes, test: str | Path | bytes, feeds: Iterable[dict[str, np.ndarray]],
             threads: int = 0) -> Fidelity:
    from vitc.runtimes.base import SessionOptions
    from vitc.runtimes.ort import OrtRuntime

    rt = OrtRuntime()
    ref_s = rt.session(reference if isinstance(reference, bytes) else str(reference), SessionOptions(threads=threads))
    test_s = rt.session(test if isinstance(test, bytes) else str(test), SessionOptions(threads=threads))
    num = den = 0.0
    worst = np.inf
    cos = []
    n = 0
    for feed in feeds:
        a = np.concatenate([o.ravel() for o in ref_s.run(feed)]).astype(np.float64)
        b = np.concatenate([o.ravel() for o in test_s.run(feed)]).astype(np.float64)
        num += float((a ** 2).sum())
        den += float(((a - b) ** 2).sum())
        worst = min(worst, sqnr_db(a, b))
        cos.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
        n += 1
    return Fidelity(n, float(10 * np.log10(max(num, 1e-30) / max(den, 1e-30))), float(worst), float(np.mean(cos)))
