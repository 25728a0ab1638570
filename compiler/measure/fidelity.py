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
    top1_agreement_pct: float | None = None  # classifiers ([N, classes] first output): argmax equal to the reference

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


# -- per-image metrics for `vitc eval` (vitc.compiler.measure.imagefolder) ------------------------------------------------------
def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def topk(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest logits per row, best first (ties: lower index first)."""
    k = min(k, logits.shape[-1])
    return np.argsort(-np.asarray(logits, np.float64), axis=-1, kind="stable")[:, :k]


def pair_metrics(ref: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample fidelity of ``test`` against ``ref`` (both [N, ...]): sum ref^2, sum err^2, cosine, and for
    [N, classes] logits also KL(softmax(ref) || softmax(test)) in nats."""
    a = np.asarray(ref, np.float64).reshape(len(ref), -1)
    b = np.asarray(test, np.float64).reshape(len(test), -1)
    out = {"ref2": (a ** 2).sum(1), "err2": ((a - b) ** 2).sum(1),
           "cos": (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)}
    if np.ndim(ref) == 2:
        la, lb = log_softmax(ref), log_softmax(test)
        out["kl"] = np.maximum((np.exp(la) * (la - lb)).sum(1), 0.0)
    return out


@dataclass
class EvalTotals:
    """Running sums over per-image records (so a resumed run adds up the same as one pass)."""

    images: int = 0
    labeled: int = 0
    top1: int = 0
    top5: int = 0
    ref_top1: int = 0
    ref_top5: int = 0
    compared: int = 0  # images with a reference output
    agree: int = 0
    ref2: float = 0.0
    err2: float = 0.0
    worst_sqnr_db: float = float("inf")
    cos_sum: float = 0.0
    kl_sum: float = 0.0
    kl_n: int = 0

    def add(self, rec: dict) -> None:
        self.images += 1
        label = rec.get("label", -1)
        top = rec.get("top")
        if label is not None and label >= 0 and top is not None:
            self.labeled += 1
            self.top1 += int(top[0] == label)
            self.top5 += int(label in top[:5])
            if rec.get("ref_top") is not None:
                self.ref_top1 += int(rec["ref_top"][0] == label)
                self.ref_top5 += int(label in rec["ref_top"][:5])
        if "ref2" in rec:
            self.compared += 1
            self.ref2 += rec["ref2"]
            self.err2 += rec["err2"]
            self.worst_sqnr_db = min(self.worst_sqnr_db, _db(rec["ref2"], rec["err2"]))
            self.cos_sum += rec["cos"]
            if top is not None and rec.get("ref_top") is not None:
                self.agree += int(top[0] == rec["ref_top"][0])
            if rec.get("kl") is not None:
                self.kl_sum += rec["kl"]
                self.kl_n += 1

    def summary(self) -> dict:
        def pct(a, n):
            return None if not n else round(100.0 * a / n, 3)

        s: dict = {"images": self.images, "labeled": self.labeled,
                   "top1_pct": pct(self.top1, self.labeled), "top5_pct": pct(self.top5, self.labeled)}
        if self.compared:
            s.update({"reference_images": self.compared,
                      "reference_top1_pct": pct(self.ref_top1, self.labeled),
                      "reference_top5_pct": pct(self.ref_top5, self.labeled),
                      "top1_agreement_pct": pct(self.agree, self.compared) if self.kl_n else None,
                      "mean_cosine": round(self.cos_sum / self.compared, 6),
                      "sqnr_db": round(_db(self.ref2, self.err2), 3),
                      "worst_image_sqnr_db": round(self.worst_sqnr_db, 3),
                      "mean_kl_nats": None if not self.kl_n else round(self.kl_sum / self.kl_n, 6)})
        return s


def _db(ref2: float, err2: float) -> float:
    return float(10 * np.log10(max(ref2, 1e-30) / max(err2, 1e-30)))
