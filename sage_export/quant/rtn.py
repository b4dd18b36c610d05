"""Uniform asymmetric weight-only quantization with one scale and zero-point per group of `group_size` consecutive
input columns of each row: round-to-nearest (RTN) and GPTQ.

Grid of a group (the min-max quantizer of the GPTQ paper's experiments): with maxq = 2^bits − 1 and the range
widened to contain 0, scale = (max − min) / maxq and zero = round(−min / scale); a weight is stored as the code
c = clip(round(w / scale) + zero, 0, maxq) and decodes to scale · (c − zero). Widening to 0 keeps the zero-point
inside [0, maxq], so it is stored as a b-bit integer like the codes (as common GPTQ deployments do). Scales are
rounded to float16 before the codes are computed, so the codes are chosen on the grid that is actually stored.

K need not be a multiple of group_size: the last group is shorter. Stored tensors:
    codes   uint8 bitstream of the N·K b-bit codes, row-major (pack_uint)
    scales  float16 [N, ceil(K / group_size)]
    zeros   uint8 bitstream of the N·ceil(K / group_size) b-bit zero-points, row-major (pack_uint)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..format.bits import pack_uint, unpack_uint
from .gptq import ColumnQuantizer, gptq_compensate
from .common import FP16_SMALLEST, check_hessian, check_weight, error_stats, hessian_error, to_float16

SUPPORTED_BITS = (2, 3, 4)


def n_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def group_grid(w_group: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(float16 scale [N], int64 zero-point [N]) of each row of a group [N, m]."""
    maxq = 2**bits - 1
    lo = np.minimum(w_group.min(axis=1), 0.0)
    hi = np.maximum(w_group.max(axis=1), 0.0)
    flat = (lo == 0) & (hi == 0)  # an all-zero row: any grid works, pick one with a usable scale
    lo, hi = np.where(flat, -1.0, lo), np.where(flat, 1.0, hi)
    scale = to_float16(np.maximum((hi - lo) / maxq, FP16_SMALLEST))
    zero = np.clip(np.round(-lo / scale.astype(np.float64)), 0, maxq).astype(np.int64)
    return scale, zero


def encode(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """int64 codes of w [N] or [N, m] on the rows' grids (scale, zero [N])."""
    if w.ndim == 2:
        scale, zero = scale[:, None], zero[:, None]
    return np.clip(np.round(w / scale.astype(np.float64)) + zero, 0, 2**bits - 1).astype(np.int64)


def decode_codes(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """float32 scale · (code − zero); codes [N] or [N, m] with scale, zero broadcastable to them."""
    return scale.astype(np.float32) * (codes - zero).astype(np.float32)


def decode_uniform(tensors: dict[str, np.ndarray], n: int, k: int, bits: int, group_size: int) -> np.ndarray:
    """float32 [N, K] from the stored codes, float16 scales and zero-points."""
    g = n_groups(k, group_size)
    codes = unpack_uint(tensors["codes"], bits, n * k).reshape(n, k)
    zeros = unpack_uint(tensors["zeros"], bits, n * g).reshape(n, g)
    group_of_col = np.arange(k) // group_size
    return decode_codes(codes, tensors["scales"][:, group_of_col], zeros[:, group_of_col])


@dataclass(frozen=True)
class UniformResult:
    method: str  # "rtn" or "gptq"
    shape: tuple[int, int]
    bits: int
    group_size: int
    codes: np.ndarray  # uint8 bitstream
    scales: np.ndarray  # float16 [N, G]
    zeros: np.ndarray  # uint8 bitstream
    stats: dict[str, Any]

    def stored_tensors(self) -> dict[str, np.ndarray]:
        return {"codes": self.codes, "scales": self.scales, "zeros": self.zeros}

    def dequantize(self) -> np.ndarray:
        return decode_uniform(self.stored_tensors(), *self.shape, self.bits, self.group_size)

    def paper_bits(self) -> dict[str, float]:
        # b bits a weight; a 16-bit scale and a b-bit zero-point shared by group_size weights.
        return {"weight_bits": float(self.bits), "scale_bits": (16 + self.bits) / self.group_size}


def _check_grid(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")


def _build(method: str, w: np.ndarray, bits: int, group_size: int, codes: np.ndarray, scales: np.ndarray,
           zeros: np.ndarray, start: float, h: np.ndarray | None = None, **extra: Any) -> UniformResult:
    result = UniformResult(method, tuple(w.shape), bits, group_size, pack_uint(codes, bits), scales,
                           pack_uint(zeros, bits), {})
    w_hat = result.dequantize()
    stats = {"time_s": time.perf_counter() - start, "bits": bits, "group_size": group_size,
             **error_stats(w, w_hat), **extra}
    if h is not None:
        stats["hessian_error"] = hessian_error(w, w_hat, h)
    return replace(result, stats=stats)


def quantize_rtn(w: np.ndarray, bits: int, group_size: int) -> UniformResult:
    """Round every group to nearest on its own min-max grid."""
    start = time.perf_counter()
    _check_grid(bits, group_size)
    w = check_weight(w)
    n, k = w.shape
    codes = np.empty((n, k), dtype=np.int64)
    scales = np.empty((n, n_groups(k, group_size)), dtype=np.float16)
    zeros = np.empty(scales.shape, dtype=np.int64)
    for g, col in enumerate(range(0, k, group_size)):
        block = w[:, col : col + group_size]
        scales[:, g], zeros[:, g] = group_grid(block, bits)
        codes[:, col : col + group_size] = encode(block, scales[:, g], zeros[:, g], bits)
    return _build("rtn", w, bits, group_size, codes, scales, zeros, start)


class GroupwiseGrid:
    """GPTQ's group quantizer as a gptq_compensate callback: a group's grid is fixed from the compensated weights
    when the loop reaches the group's first column, then each column is rounded on it. Records codes and grids."""

    def __init__(self, n: int, k: int, bits: int, group_size: int):
        self.bits, self.group_size, self.k = bits, group_size, k
        self.codes = np.zeros((n, k), dtype=np.int64)
        self.scales = np.zeros((n, n_groups(k, group_size)), dtype=np.float16)
        self.zeros = np.zeros(self.scales.shape, dtype=np.int64)

    def __call__(self, block_w: np.ndarray, hinv_diag: np.ndarray, cols: np.ndarray) -> ColumnQuantizer:
        def quantize_column(i: int, block_now: np.ndarray) -> np.ndarray:
            col, g = int(cols[i]), int(cols[i]) // self.group_size
            if col % self.group_size == 0:
                # Blocks are aligned to groups (checked by quantize_gptq), so the whole group lies in this block.
                self.scales[:, g], self.zeros[:, g] = group_grid(block_now[:, i : i + self.group_size], self.bits)
            codes = encode(block_now[:, i], self.scales[:, g], self.zeros[:, g], self.bits)
            self.codes[:, col] = codes
            return decode_codes(codes, self.scales[:, g], self.zeros[:, g])

        return quantize_column


def quantize_gptq(w: np.ndarray, h: np.ndarray, bits: int, group_size: int, blocksize: int = 128,
                  percdamp: float = 0.01) -> UniformResult:
    """GPTQ with per-group grids (columns in natural order). blocksize must be a multiple of group_size."""
    start = time.perf_counter()
    _check_grid(bits, group_size)
    if blocksize % group_size:
        raise ValueError(f"blocksize ({blocksize}) must be a multiple of group_size ({group_size})")
    w = check_weight(w)
    h = check_hessian(h, w.shape[1])
    grid = GroupwiseGrid(*w.shape, bits, group_size)
    gptq_compensate(w, h, grid, blocksize=blocksize, percdamp=percdamp)
    return _build("gptq", w, bits, group_size, grid.codes, grid.scales, grid.zeros, start, h,
                  blocksize=blocksize, percdamp=percdamp)
