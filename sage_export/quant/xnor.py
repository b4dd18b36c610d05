"""XNOR-style binarization: one sign bit per weight and one scale per output row, Ŵ[n, :] = s_n · sign(W[n, :]).

s_n = mean |W[n, :]| is the least-squares scale for fixed signs (the closed form of XNOR-Net, Rastegari et al. 2016).
It is the simplest baseline, so the few checks every baseline shares live here too: input validation, rounding
scales to their stored float16 and the error statistics each result reports.

Sign convention (as in the packed layout): bit 1 means +1 and bit 0 means -1; a weight of exactly 0 gets +1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..format.bits import pack_bits, unpack_bits

# Smallest positive float16 (a subnormal). Scales that divide are clamped to it so that float16 rounding never
# turns them into 0.
FP16_SMALLEST = float(np.float16(2.0**-24))


def check_weight(w: np.ndarray) -> np.ndarray:
    """The weight as float64 [N, K]; ValueError for a non-2-D, empty or non-finite input."""
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"weight must be a non-empty 2-D [N, K] matrix, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight contains NaN or Inf")
    return w.astype(np.float64)


def check_hessian(h: np.ndarray, k: int) -> np.ndarray:
    """The Hessian as float64 [K, K]; ValueError for a wrong shape or non-finite entries."""
    h = np.asarray(h)
    if h.shape != (k, k):
        raise ValueError(f"Hessian must be [{k}, {k}] for a weight with K={k}, got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("Hessian contains NaN or Inf")
    return h.astype(np.float64)


def to_fp16(scales: np.ndarray) -> np.ndarray:
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


def signs_from_bits(bits: np.ndarray) -> np.ndarray:
    """bool -> float32 ±1 (True is +1)."""
    return np.where(bits, np.float32(1), np.float32(-1))


def decode_xnor(tensors: dict[str, np.ndarray], k: int) -> np.ndarray:
    """float32 [N, K] from the stored sign bits and float16 row scales."""
    signs = signs_from_bits(unpack_bits(tensors["sign_bits"], k))
    return signs * tensors["row_scales"].astype(np.float32)[:, None]


@dataclass(frozen=True)
class XnorResult:
    shape: tuple[int, int]
    sign_bits: np.ndarray  # int8 [N, ceil(K/8)]
    row_scales: np.ndarray  # float16 [N]
    stats: dict[str, Any]
    method: str = "xnor"

    def stored_tensors(self) -> dict[str, np.ndarray]:
        return {"sign_bits": self.sign_bits, "row_scales": self.row_scales}

    def dequantize(self) -> np.ndarray:
        return decode_xnor(self.stored_tensors(), self.shape[1])

    def paper_bits(self) -> dict[str, float]:
        # One bit per weight plus one 16-bit scale per row of K weights.
        return {"weight_bits": 1.0, "scale_bits": 16.0 / self.shape[1]}


def quantize_xnor(w: np.ndarray) -> XnorResult:
    start = time.perf_counter()
    w = check_weight(w)
    row_scales = to_fp16(np.mean(np.abs(w), axis=1))
    partial = XnorResult(tuple(w.shape), pack_bits(w >= 0), row_scales, {})
    stats = {"time_s": time.perf_counter() - start, **error_stats(w, partial.dequantize())}
    return replace(partial, stats=stats)
