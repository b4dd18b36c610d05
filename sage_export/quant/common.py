"""Input checks, float16 rounding of stored scales and error figures shared by every quantizer in this package."""

from __future__ import annotations

import numpy as np

# Smallest positive float16 (a subnormal). Scales that divide are clamped to it so that float16 rounding never
# turns them into 0.
FP16_SMALLEST = float(np.float16(2.0**-24))


def check_weight(w: np.ndarray) -> np.ndarray:
    """The weight as float64 [N, K]; ValueError for a non-2-D, empty or non-finite input."""
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"weight must be a non-empty 2-D [N, K] matrix, got shape {w.shape}")
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise ValueError(f"weight must be numeric, got dtype {w.dtype}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight contains NaN or Inf")
    return w.astype(np.float64)


def check_hessian(h: np.ndarray, k: int, copy: bool = True) -> np.ndarray:
    """The Hessian as float64 [K, K] (copy=False: h itself when it is float64 already, for callers that only read
    it); ValueError for a wrong shape or non-finite entries."""
    h = np.asarray(h)
    if h.shape != (k, k):
        raise ValueError(f"Hessian must be [{k}, {k}] for a weight with K={k}, got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("Hessian contains NaN or Inf")
    return h.astype(np.float64, copy=copy)


# Added to every column weight, relative to their mean: an input channel that never fired during calibration
# still has a (tiny) say, so its weights land on their nearest band instead of anywhere, and no band of real
# weights can end up weightless.
COL_WEIGHT_FLOOR = 1e-6


def check_col_weight(c: np.ndarray | None, k: int) -> np.ndarray | None:
    """Per-input-channel error weights as float64 [K] with the floor added; None stays None (data-free).
    ValueError for a wrong shape, a non-finite or negative entry, or all zeros."""
    if c is None:
        return None
    c = np.asarray(c, dtype=np.float64)
    if c.shape != (k,):
        raise ValueError(f"column weights must be [{k}] for a weight with K={k}, got shape {c.shape}")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError("column weights must be finite and >= 0")
    if not c.sum() > 0:
        raise ValueError("column weights are all zero")
    return c + COL_WEIGHT_FLOOR * c.mean()


def to_float16(scales: np.ndarray) -> np.ndarray:
    """Scales rounded to their stored float16; ValueError when one overflows float16 (|s| > 65504)."""
    with np.errstate(over="ignore"):
        stored = np.asarray(scales, dtype=np.float64).astype(np.float16)
    if not np.all(np.isfinite(stored)):
        raise ValueError("a scale overflows float16 (|s| > 65504); the weight is out of range for this format")
    return stored


def error_stats(w: np.ndarray, w_hat: np.ndarray) -> dict[str, float]:
    """recon_error = ‖W − Ŵ‖_F², rel_error = recon_error / ‖W‖_F² (0 for an all-zero W reproduced exactly)."""
    err = float(np.sum((w - w_hat) ** 2))
    norm = float(np.sum(w**2))
    return {"recon_error": err, "rel_error": err / norm if norm > 0 else (0.0 if err == 0 else float("inf"))}


def hessian_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """The output error GPTQ minimises: tr((W − Ŵ) H (W − Ŵ)ᵀ)."""
    e = w - w_hat
    return float(np.sum((e @ h) * e))
