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
from .common import check_weight, error_stats, to_float16


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
    row_scales = to_float16(np.mean(np.abs(w), axis=1))
    partial = XnorResult(tuple(w.shape), pack_bits(w >= 0), row_scales, {})
    stats = {"time_s": time.perf_counter() - start, **error_stats(w, partial.dequantize())}
    return replace(partial, stats=stats)
