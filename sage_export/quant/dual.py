"""Dual-mode quantizer (SPEC §2.3).

Mode 2, unsalient weights: ŵ = α_g·sign(w), α_g = mean |w| over group g (the least-squares optimum for a fixed
sign pattern). Mode 1, salient weights: symmetric b-bit integers q with one scale s per output row, fitted by
alternating q = clip(round(w/s)) and the least-squares s = Σwq/Σq².

Activation-aware (SPEC §2.1): every error term may carry a weight c ≥ 0 (the input channel's activation energy
h_k); the least-squares scales become Σc|w|/Σc and Σcwq/Σcq². Without weights every c is 1.

Every error here is measured with the scales rounded to float16 first: it is the error of what is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import to_float16

from .groups import BandSums


def group_scales(mags: np.ndarray, band_index: np.ndarray, n_groups: int) -> np.ndarray:
    """α_g = mean |w| over group g (float64, before rounding); an empty group gets 0 (stored, never read)."""
    count = np.bincount(band_index, minlength=n_groups)
    total = np.bincount(band_index, weights=mags, minlength=n_groups)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def binary_error(sums: BandSums, alpha16: np.ndarray) -> float:
    """Σ over groups of Σc(|w| − α_g)² = S2 − 2αS1 + α²Σc, with α as stored (float16)."""
    alpha = alpha16.astype(np.float64)
    return float(np.sum(sums.sum2 - 2 * alpha * sums.sum1 + sums.weight * alpha * alpha))


@dataclass(frozen=True)
class SalientFit:
    q: np.ndarray  # int8 [nnz]: the integer of each salient entry
    scale16: np.ndarray  # float16 [N]: per-row scale; 0 for rows without salient entries (never read)
    error: float  # Σc(w − s16·q)² over the salient entries


def q_limit(bits: int) -> int:
    """Largest |q| of a symmetric signed b-bit integer."""
    return (1 << (bits - 1)) - 1


def quantize_to_scale(w: np.ndarray, scale: np.ndarray, limit: int) -> np.ndarray:
    """clip(round(w/s), ±limit), the best integer for a given s > 0; 0 where s = 0."""
    safe = np.where(scale > 0, scale, 1.0)
    return np.where(scale > 0, np.clip(np.rint(w / safe), -limit, limit), 0.0)


def fit_salient(w: np.ndarray, rows: np.ndarray, n_rows: int, bits: int, iters: int,
                weights: np.ndarray | None = None) -> SalientFit:
    """Per-row scales for the salient entries w (flat, with their row indices and optional error weights),
    starting from the max-abs scale. Each row keeps the best float16 scale seen over the iterations, so the fit
    is never worse than the max-abs scale, even where float16 rounding would break the alternation's monotone
    descent."""
    w = np.asarray(w, dtype=np.float64)
    c = np.ones_like(w) if weights is None else np.asarray(weights, dtype=np.float64)
    limit = q_limit(bits)
    row_max = np.zeros(n_rows)
    np.maximum.at(row_max, rows, np.abs(w))
    scale = row_max / limit
    best16 = to_float16(scale)
    best_err = _row_errors(w, c, rows, n_rows, best16, limit)
    for _ in range(iters):
        q = quantize_to_scale(w, scale[rows], limit)
        num = np.bincount(rows, weights=c * w * q, minlength=n_rows)
        den = np.bincount(rows, weights=c * q * q, minlength=n_rows)
        scale = np.where(den > 0, num / np.where(den > 0, den, 1), scale)
        scale16 = to_float16(scale)
        err = _row_errors(w, c, rows, n_rows, scale16, limit)
        better = err < best_err
        best16[better], best_err[better] = scale16[better], err[better]
    q = quantize_to_scale(w, best16.astype(np.float64)[rows], limit)
    return SalientFit(q.astype(np.int8), best16, float(best_err.sum()))


def _row_errors(w: np.ndarray, c: np.ndarray, rows: np.ndarray, n_rows: int, scale16: np.ndarray,
                limit: int) -> np.ndarray:
    s = scale16.astype(np.float64)[rows]
    residual = w - s * quantize_to_scale(w, s, limit)
    return np.bincount(rows, weights=c * residual * residual, minlength=n_rows)
