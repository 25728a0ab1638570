"""Calibration stage: stream activations through the float model, observe them, produce a serializable table.

Memory does not grow with the number of samples: each tensor keeps a fixed-size histogram of |x| (its range grows
by merging bin pairs), its min/max and a per-channel |x| maximum over the last axis.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from vitc.compiler.errors import CalibrationDataError
# the table's types live below the compiler (passes/ consumes them); importable from here as before
from vitc.passes.quant_types import CalibrationTable, Observer, ObserverConfig, TensorRange

log = logging.getLogger(__name__)

NUM_BINS = 2048


class SecondMoments:
    """Sum of x^T x and of x over the tokens of one tensor (last axis: channels): the Hessian of a linear's output
    error that GPTQ rounding minimises. K x K float64 per tensor, kept only for inputs of GPTQ-rounded linears."""

    def __init__(self) -> None:
        self.gram: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.count = 0

    def update(self, v: np.ndarray) -> None:
        x = np.asarray(v, np.float32).reshape(-1, v.shape[-1])
        if self.gram is None:
            self.gram = np.zeros((x.shape[1], x.shape[1]), np.float64)
            self.total = np.zeros(x.shape[1], np.float64)
        self.gram += x.T @ x
        self.total += x.sum(axis=0, dtype=np.float64)
        self.count += x.shape[0]

    def hessian(self, factors: np.ndarray | None = None, shift: np.ndarray | None = None) -> np.ndarray:
        """sum x'^T x' for x' = x / factors - shift (the migrated input), from the moments of x."""
        assert self.gram is not None and self.total is not None
        h = self.gram
        m = self.total
        if factors is not None:
            inv = 1.0 / np.asarray(factors, np.float64)
            h = h * np.outer(inv, inv)
            m = m * inv
        if shift is not None:
            c = np.asarray(shift, np.float64)
            h = h - np.outer(m, c) - np.outer(c, m) + self.count * np.outer(c, c)
        return h


def collect_moments(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], tensors: Iterable[str],
                    feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, SecondMoments]:
    """Second moments of ``tensors`` over ``feeds`` (a calibration pass of its own)."""
    out = {t: SecondMoments() for t in dict.fromkeys(tensors)}
    for feed in feeds:
        values = run(feed)
        for name, m in out.items():
            m.update(values[name])
    return out


def union_channel_range(old: tuple[np.ndarray, np.ndarray] | None,
                        new: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (min, max) ``new`` merged into ``old``; a channel count that changed starts over."""
    if old is None or old[0].shape != new[0].shape:
        return new
    return np.minimum(old[0], new[0]), np.maximum(old[1], new[1])


def merge_channel_range(old: tuple[np.ndarray, np.ndarray] | None, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (last axis) (min, max) of ``x`` merged into ``old`` (``union_channel_range``)."""
    flat = x.reshape(-1, x.shape[-1])
    return union_channel_range(old, (flat.min(axis=0), flat.max(axis=0)))


class TensorObserver:
    """Streaming statistics of one tensor."""

    def __init__(self, channel_axis: int = -1):
        self.hist = np.zeros(NUM_BINS, dtype=np.int64)
        self.hmax = 0.0  # upper edge of the histogram range [0, hmax]
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.channel_axis = channel_axis
        self.channel_absmax: np.ndarray | None = None
        self.channel_min: np.ndarray | None = None
        self.channel_max: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.size == 0:
            return
        if not np.isfinite(x).all():
            raise CalibrationDataError("non-finite activation (NaN/Inf) during calibration",
                                       hint="check the calibration inputs and the model")
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        self.count += x.size
        a = np.abs(x)
        amax = float(a.max())
        if x.ndim >= 1:
            self.channel_min, self.channel_max = merge_channel_range(
                None if self.channel_min is None else (self.channel_min, self.channel_max), x)
            self.channel_absmax = np.maximum(np.abs(self.channel_min), np.abs(self.channel_max))
        if self.hmax == 0.0:
            self.hmax = amax if amax > 0 else 1e-8
        while amax > self.hmax:  # grow the range: merge neighbouring bins, double the width
            self.hist = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.concatenate([self.hist, np.zeros(NUM_BINS // 2, dtype=np.int64)])
            self.hmax *= 2.0
        h, _ = np.histogram(a, bins=NUM_BINS, range=(0.0, self.hmax))
        self.hist += h

    # -- thresholds -------------------------------------------------------------------------------------------
    def amax(self, cfg: ObserverConfig, bits: int = 8) -> float:
        """The clipping threshold T: values are quantized over [-T, T]."""
        absmax = max(abs(self.min), abs(self.max))
        if self.count == 0 or absmax == 0.0:
            return 0.0
        if cfg.kind is Observer.MINMAX:
            return absmax
        edges = np.linspace(0.0, self.hmax, NUM_BINS + 1)
        if cfg.kind is Observer.PERCENTILE:
            cdf = np.cumsum(self.hist) / self.hist.sum()
            i = int(np.searchsorted(cdf, cfg.percentile / 100.0))
            return float(min(edges[min(i + 1, NUM_BINS)], absmax))
        if cfg.kind is Observer.ENTROPY:
            return float(min(_kl_threshold(self.hist, edges, bits), absmax))
        if cfg.kind is Observer.MSE:
            return float(min(_mse_threshold(self.hist, edges, bits), absmax))
        raise ValueError(cfg.kind)


def _kl_threshold(hist: np.ndarray, edges: np.ndarray, bits: int) -> float:
    """TensorRT-style entropy calibration on the |x| histogram."""
    nq = 2 ** (bits - 1)
    hist = hist.astype(np.float64)
    nz = np.nonzero(hist)[0]
    last = int(nz[-1]) + 1 if len(nz) else NUM_BINS
    if last <= nq:
        return float(edges[last])
    best, best_i = math.inf, last
    for i in range(nq, last + 1, max(1, (last - nq) // 256)):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        # quantize p into nq bins, expand back over its non-zero support
        chunks = np.array_split(hist[:i], nq)
        q = np.concatenate([np.where(c > 0, c.sum() / max(1, np.count_nonzero(c)), 0.0) for c in chunks])
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p, q = p / ps, q / qs
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i])


def _mse_threshold(hist: np.ndarray, edges: np.ndarray, bits: int) -> float:
    """Threshold minimising expected squared error (clipping + uniform rounding) over the |x| histogram."""
    centers = 0.5 * (edges[:-1] + edges[1:])
    qmax = 2 ** (bits - 1) - 1
    nz = np.nonzero(hist)[0]
    last = int(nz[-1]) + 1 if len(nz) else NUM_BINS
    best, best_t = math.inf, float(edges[last])
    for i in np.unique(np.linspace(max(1, last // 20), last, 200).astype(int)):
        t = float(edges[i])
        step = t / qmax
        clip = np.clip(centers - t, 0, None)
        err = float(np.sum(hist * (clip ** 2))) + float(hist[:i].sum()) * step * step / 12.0
        if err < best:
            best, best_t = err, t
    return best_t


def calibrate(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], tensors: Iterable[str],
              feeds: Iterable[dict[str, np.ndarray]], cfg: ObserverConfig, *, model_digest: str,
              progress: Callable[[Iterator], Iterator] | None = None,
              observer_overrides: dict[str, ObserverConfig] | None = None,
              reservoir: dict[str, list[np.ndarray]] | None = None, keep: int = 0,
              moments: dict[str, SecondMoments] | None = None,
              fit_ranges: dict[str, list[tuple[np.ndarray, np.ndarray] | None]] | None = None,
              fit_folds: Callable[[int], Sequence[int]] | None = None) -> CalibrationTable:
    """Run ``run(feed) -> {tensor: value}`` over ``feeds`` and observe ``tensors``.

    With ``reservoir`` and ``keep`` > 0, the first ``keep`` values of every tensor are also kept there (for the
    output-error search); memory stays bounded by ``keep``. Tensors named in ``moments`` also get their second
    moments accumulated there (GPTQ rounding). With ``fit_ranges`` and ``fit_folds``, every tensor gets one
    per-channel (min, max) per reservoir sample k there, over the samples ``i`` with k in ``fit_folds(i)`` (those
    that show nothing of sample k; None while a fold is empty): the range search scores each reservoir sample with
    ranges it did not set.
    """
    names = list(dict.fromkeys(tensors))
    observers = {n: TensorObserver() for n in names}
    n = 0
    it = iter(feeds)
    if progress is not None:
        it = progress(it)
    for feed in it:
        values = run(feed)
        in_folds = fit_folds(n) if fit_ranges is not None and fit_folds is not None and keep > 0 else None
        for name in names:
            observers[name].update(values[name])
            if reservoir is not None and n < keep:
                reservoir.setdefault(name, []).append(np.array(values[name], copy=True))
            if in_folds is not None:
                v = np.asarray(values[name], dtype=np.float32)
                folds = fit_ranges.setdefault(name, [None] * keep)
                if in_folds and v.ndim >= 1 and v.size:
                    one = merge_channel_range(None, v)  # this sample's range, merged into each fold it joins
                    for k in in_folds:
                        folds[k] = union_channel_range(folds[k], one)
        for name, m in (moments or {}).items():
            m.update(values[name])
        n += 1
    if n == 0:
        raise CalibrationDataError("calibration data is empty", hint="give at least one sample")
    overrides = observer_overrides or {}
    ranges = {}
    for name, ob in observers.items():
        c = overrides.get(name, cfg)
        ranges[name] = TensorRange(amax=ob.amax(c), min=ob.min, max=ob.max, observer=c.describe(),
                                   channel_absmax=None if ob.channel_absmax is None else ob.channel_absmax.tolist(),
                                   channel_min=None if ob.channel_min is None else ob.channel_min.tolist(),
                                   channel_max=None if ob.channel_max is None else ob.channel_max.tolist())
    return CalibrationTable(model_digest=model_digest, observer=cfg.describe(), samples=n, ranges=ranges)
