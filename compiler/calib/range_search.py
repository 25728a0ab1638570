"""Output-error-aware choice of migration strength and clipping range, per quantized operator.

For each site we simulate the int8 operator in NumPy on a small reservoir of calibration activations and keep the
candidate with the smallest error of the operator's *output* against float:
- linear sites (Gemm with constant weight): migration strength alpha (SmoothQuant factor s = a^alpha / w^(1-alpha),
  or no migration) x clipping ratio r of the activation range; weights quantized per output channel;
The clipping candidates include the full range (minmax), so the search never does worse on the reservoir than
minmax; it replaces a fixed percentile where dropping outliers would hurt (trained ViTs carry signal in them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vitc.passes.migrate_scales import smoothing_factors
from vitc.passes.quant_math import dequantized_weight, fake_quant, fake_quant_asym

ALPHAS: tuple[float | None, ...] = (None, 0.3, 0.5, 0.65, 0.8)  # None: no migration
RATIOS: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def capped_alphas(cap: float | None) -> tuple[float | None, ...]:
    """The migration strengths the search tries at a site whose policy caps them (``max_alpha``); no migration is
    always a candidate."""
    return ALPHAS if cap is None else tuple(a for a in ALPHAS if a is None or a <= cap + 1e-9)


def fake_quant_weight(w: np.ndarray, bits: int = 8, per_channel: bool = True, mse_clip: bool = False,
                      pair_safe: bool = False) -> np.ndarray:
    """W[K, N] quantized and dequantized exactly as InsertQDQPass stores it (one scale per output column N)."""
    return dequantized_weight(w, 1 if per_channel else None, bits, mse_clip or bits < 8, pair_safe)


@dataclass(frozen=True)
class LinearChoice:
    alpha: float | None
    ratio: float
    error: float  # relative output error sum||y - yq||^2 / sum||y||^2 at the choice
    baseline_error: float  # same, with no migration and minmax range
    # symmetric targets: per-channel centre c subtracted from the (migrated) input before quantization, folded back
    # exactly as bias += c @ W' (a one-sided GELU output otherwise wastes half of a zero-point-free int8 grid)
    center: np.ndarray | None = None
    held_out: bool = False  # scored with ``fit_ranges``: the errors are the held-out ones

    def to_json(self) -> dict:
        out = {"alpha": self.alpha, "clip_ratio": self.ratio, "rel_error": self.error,
               "rel_error_minmax_no_migration": self.baseline_error, "centered": self.center is not None}
        if self.held_out:
            out["scored_on_held_out_ranges"] = True
        return out


def search_linear(xs: Sequence[np.ndarray], weights: Sequence[np.ndarray], channel_min: np.ndarray,
                  channel_max: np.ndarray, *, bits: int = 8, symmetric: bool = True, per_channel_weight: bool = True,
                  alphas: Sequence[float | None] = ALPHAS, ratios: Sequence[float] = (1.0,),
                  weight_mse_clip: bool = False, pair_safe: bool = False, center: bool = False,
                  fit_ranges: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None,
                  ) -> tuple[LinearChoice, np.ndarray | None]:
    """Pick (alpha, r) for a group of Gemms sharing the input X (rows: tokens). Returns the choice and s.

    With ``center`` (symmetric quantization only), each alpha is also tried with the input centred per channel,
    x' = x / s - c with c = (min + max) / 2 of the migrated channel ranges; the choice carries c.

    The activation range is the full calibration range (per-channel min/max over *all* samples, divided by s),
    times r; the reservoir only scores the candidates. Ratios below 1 fit the reservoir but clip unseen inputs,
    so the default grid is (1.0,).

    ``fit_ranges`` (one per reservoir sample ``xs[k]``: the per-channel min/max of the calibration inputs that show
    nothing of sample k) scores the candidates as they meet unseen inputs, leaving each sample out in turn: sample k
    is quantized with the factors, centre and range built from its own fold, so a strong migration or a centre that
    fits the reservoir's own extremes and clips elsewhere loses. The winner's factors and centre are then computed
    from the full ranges. Fit ranges that do not give every sample a fold covering every channel with finite values
    are ignored (the choice is then in-sample, ``held_out`` False).
    """
    f32 = np.float32
    channel_min, channel_max = np.asarray(channel_min, f32), np.asarray(channel_max, f32)
    held = fit_ranges is not None and len(fit_ranges) == len(xs) and all(
        r is not None and all(np.shape(a) == channel_min.shape and np.isfinite(a).all() for a in r)
        for r in fit_ranges)
    flat = [a.reshape(-1, a.shape[-1]).astype(f32) for a in xs]
    # what each candidate is scored on: every sample with its own fold's ranges, or all samples with the full ranges
    parts = [(x, (np.asarray(r[0], f32), np.asarray(r[1], f32))) for x, r in zip(flat, fit_ranges)] if held else \
        [(np.concatenate(flat), (channel_min, channel_max))]
    ys = [[x @ w for w in weights] for x, _ in parts]
    ref = sum(float((y ** 2).sum()) for yk in ys for y in yk) or 1.0
    w_rowmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    best: tuple | None = None
    baseline = None
    for alpha in alphas:
        prepared = []  # per part: migrated input and ranges, migrated and quantized weights
        for x, (lo_c, hi_c) in parts:
            s = None if alpha is None else smoothing_factors(np.maximum(np.abs(lo_c), np.abs(hi_c)), w_rowmax, alpha)
            inv = 1.0 if s is None else 1.0 / s
            wm = [w if s is None else w * s[:, None] for w in weights]
            wq = [fake_quant_weight(w, bits, per_channel_weight, weight_mse_clip, pair_safe) for w in wm]
            prepared.append((x * inv, lo_c * inv, hi_c * inv, wm, wq))
        for centred in ((False, True) if center and symmetric else (False,)):
            for r in ratios:
                err = 0.0
                for (xm, cmin, cmax, wm, wq), yk in zip(prepared, ys):
                    c = ((cmin + cmax) / 2).astype(f32) if centred else None
                    lo, hi = (float(np.min(cmin)), float(np.max(cmax))) if c is None else \
                        (float(np.min(cmin - c)), float(np.max(cmax - c)))
                    fold = [0.0 if c is None else c @ w for w in wm]  # exact float bias fold
                    xc = xm if c is None else xm - c
                    xq = fake_quant(xc, max(-lo, hi) * r, bits) if symmetric else \
                        fake_quant_asym(xc, lo * r, hi * r, bits)
                    err += sum(float(((y - xq @ q - f) ** 2).sum()) for y, q, f in zip(yk, wq, fold))
                err /= ref
                if alpha is None and r == 1.0 and not centred:
                    baseline = err
                if best is None or err < best[0]:
                    best = (err, alpha, r, centred)
    assert best is not None
    err, alpha, r, centred = best
    s = None if alpha is None else smoothing_factors(np.maximum(np.abs(channel_min), np.abs(channel_max)), w_rowmax,
                                                     alpha)
    c = None
    if centred:
        inv = 1.0 if s is None else 1.0 / s
        c = ((channel_min * inv + channel_max * inv) / 2).astype(f32)
    return LinearChoice(alpha, r, err, baseline if baseline is not None else err, c, held_out=held), s
