"""Sequential weight fitting: each linear's weights and bias refitted on the inputs it sees once everything upstream
of it is quantized.

Calibration measures every linear's input on the float model. After quantization a linear's input differs: the
linears upstream round their weights and activations, and its own input is rounded and clipped to its range. For
y = x W + b, with x the float input and x~ the input the quantized model gives it (after its own Q/DQ), the
weights that best reproduce the float output on the calibration tokens solve

    min over W', b' of  || x W + b - (x~ W' + b') ||^2 + lam ||[W'; b'] - [W; b]||^2

(ridge towards the float weights, ``lam`` = ``damp`` x the mean diagonal of x~^T x~). The solution needs three
moment matrices over the tokens: x~^T x~, x~^T x and x^T x (each with a ones column for the bias).
:class:`CrossMoments` accumulates them; :func:`fit_linear` solves for W', b'. The caller then rounds W' with GPTQ
on x~^T x~, which minimises the remaining output error on the same tokens.

The driver (``vitc.compiler.driver.build.sequential_weights``) walks the linears in graph order, one input tensor
at a time, so each linear's inputs come from a model whose earlier linears already carry their refitted weights
(refitting a whole block at once lets every linear in it correct the same upstream error, and overshoots).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIT_DAMP = 0.3  # ridge strength towards the float weights, x mean diag(x~^T x~)


class CrossMoments:
    """Moments of a linear's float input x and quantized-model input x~ over the same tokens, each with a ones
    column appended (the bias): x~^T x~, x~^T x and x^T x, float64."""

    def __init__(self) -> None:
        self.qq: np.ndarray | None = None
        self.qf: np.ndarray | None = None
        self.ff: np.ndarray | None = None
        self.count = 0

    def update(self, x_float: np.ndarray, x_quant: np.ndarray) -> None:
        f = _with_ones(x_float)
        q = _with_ones(x_quant)
        if f.shape != q.shape:
            raise ValueError(f"float input {x_float.shape} and quantized input {x_quant.shape} differ in shape")
        if self.qq is None:
            k = f.shape[1]
            self.qq, self.qf, self.ff = (np.zeros((k, k), np.float64) for _ in range(3))
        self.qq += q.T @ q
        self.qf += q.T @ f
        self.ff += f.T @ f
        self.count += f.shape[0]

    def hessian(self) -> np.ndarray:
        """x~^T x~ without the ones column: the Hessian GPTQ rounds the refitted weights against."""
        assert self.qq is not None
        return self.qq[:-1, :-1]


def _with_ones(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32).reshape(-1, x.shape[-1]).astype(np.float64)
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


@dataclass(frozen=True)
class LinearFit:
    weight: np.ndarray  # W'[K, N], the weight's dtype
    bias: np.ndarray  # b'[N]
    error_before: float  # || x W + b - (x~ W + b) ||^2 over the calibration tokens
    error_after: float  # || x W + b - (x~ W' + b') ||^2 (before the weights are rounded)


def fit_linear(w: np.ndarray, b: np.ndarray | None, m: CrossMoments, damp: float | None = None) -> LinearFit:
    """The ridge least-squares refit of y = x W + b on the quantized model's input (module docstring); ``damp``
    defaults to FIT_DAMP."""
    damp = FIT_DAMP if damp is None else damp
    assert m.qq is not None and m.qf is not None and m.ff is not None
    wa = _augmented(w, b)
    k = wa.shape[0]
    lam = damp * float(np.mean(np.diag(m.qq)[:-1]))
    target = m.qf @ wa  # x~^T (x W + b)
    new = np.linalg.solve(m.qq + lam * np.eye(k), target + lam * wa)
    return LinearFit(new[:-1].astype(w.dtype), new[-1].astype(np.float32), _error(m, wa, wa), _error(m, wa, new))


def output_error(m: CrossMoments, w: np.ndarray, b: np.ndarray | None, w_new: np.ndarray,
                 b_new: np.ndarray | None) -> float:
    """|| x W + b - (x~ W_new + b_new) ||^2 over the accumulated tokens (a missing bias is zero)."""
    return _error(m, _augmented(w, b), _augmented(w_new, b_new))


def _augmented(w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """[W; b] as one float64 [K+1, N] matrix, the bias row matching the moments' ones column."""
    bias = np.zeros(w.shape[1]) if b is None else np.asarray(b, np.float64).reshape(-1)
    return np.concatenate([np.asarray(w, np.float64), bias[None, :]], axis=0)


def _error(m: CrossMoments, wa: np.ndarray, va: np.ndarray) -> float:
    """|| xa wa - x~a va ||^2 from the moments."""
    return float(np.einsum("kn,kn->", wa, m.ff @ wa) - 2 * np.einsum("kn,kn->", va, m.qf @ wa)
                 + np.einsum("kn,kn->", va, m.qq @ va))


__all__ = ["FIT_DAMP", "CrossMoments", "LinearFit", "fit_linear", "output_error"]
