"""GPTQ-style error compensation with the SAGE codebook (SPEC §2.1, last point).

A SageResult fixes a codebook: the G band scales α_g (times each row's multiplier r_n), the salient positions and
each row's salient scale. Which
value each weight takes from it is then a free choice, and choosing column by column while pushing each column's
error onto the columns not yet quantized (the OBS update of GPTQ, see gptq.py for the math) lowers the layer's
output error tr(ΔW H ΔWᵀ) well below nearest rounding of the original weights. Nothing stored changes size: the
same G, the same salient count, the same scales; only sign bits, group codes and salient integers are chosen
again.

Per column, on the compensated values x: an unsalient weight takes the nearest of ±r_n·α_g (sign of x, band of
|x|/r_n), a salient one clip(round(x / s_row)). Both are the nearest codebook values, which is what the OBS update
assumes.

The loop is gptq.gptq_compensate's, written on the transposed matrix (one contiguous row per column of W) and
with the codebook inlined: the same arithmetic, about twice as fast, which matters because it runs once per
column of every matrix of the model.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from .common import check_hessian, check_weight, error_stats, hessian_error
from .dual import q_limit
from .gptq import dead_columns, inverse_hessian_cholesky_direct
from .sage import SageResult


class _Codebook:
    """The fixed codebook of a SageResult, with the columns in processing order; records every choice."""

    def __init__(self, result: SageResult, order: np.ndarray):
        alpha = result.group_scales.astype(np.float64)
        self.band_order = np.argsort(alpha, kind="stable")  # group index of each value in ascending order
        self.values = alpha[self.band_order]
        self.edges = (self.values[1:] + self.values[:-1]) / 2  # nearest value = nearest band of |x|
        self.salient_t = np.ascontiguousarray(result.salient_mask[:, order].T)
        self.row_scale = result.salient_scale.astype(np.float64)
        n = result.shape[0]
        self.row_mult = np.ones(n) if result.row_scales is None else result.row_scales.astype(np.float64)
        self.safe_mult = np.where(self.row_mult != 0, np.abs(self.row_mult), 1.0)
        self.limit = q_limit(result.salient_bits)
        k, n = self.salient_t.shape
        self.positive_t = np.zeros((k, n), dtype=bool)
        self.group_t = np.zeros((k, n), dtype=np.uint8)
        self.q_t = np.zeros((k, n), dtype=np.int8)

    def quantize(self, j: int, x: np.ndarray) -> np.ndarray:
        """What processed column j (values x over the rows) decodes to; records its choices."""
        # Row n's values are r_n·α_g: the nearest is the nearest band of |x| / r_n.
        band = np.searchsorted(self.edges, np.abs(x) / self.safe_mult, side="right")
        magnitude = self.values[band] * self.row_mult
        positive = x >= 0
        value = np.where(positive, magnitude, -magnitude)
        self.positive_t[j] = positive
        self.group_t[j] = self.band_order[band]
        salient = self.salient_t[j]
        if salient.any():
            s = self.row_scale[salient]
            q = np.where(s > 0, np.clip(np.rint(x[salient] / np.where(s > 0, s, 1)), -self.limit, self.limit), 0)
            value[salient] = s * q
            self.q_t[j, salient] = q
        return value


def _compensate(w: np.ndarray, h: np.ndarray, codebook: _Codebook, order: np.ndarray, blocksize: int,
                percdamp: float, shrink: float) -> np.ndarray:
    """The decoded [N, K] matrix after column-by-column quantization with OBS updates (columns in `order`)."""
    w_t = np.ascontiguousarray(w[:, order].T)  # [K, N]: row j is processed column j
    u = inverse_hessian_cholesky_direct(h[np.ix_(order, order)], percdamp, shrink)
    decoded_t = np.empty_like(w_t)
    k = w_t.shape[0]
    for start in range(0, k, blocksize):
        stop = min(start + blocksize, k)
        block, u_block = w_t[start:stop].copy(), u[start:stop, start:stop]
        err = np.empty_like(block)
        for i in range(stop - start):
            decoded_t[start + i] = codebook.quantize(start + i, block[i])
            err[i] = (block[i] - decoded_t[start + i]) / u_block[i, i]
            block[i + 1 :] -= np.outer(u_block[i, i + 1 :], err[i])
        w_t[stop:] -= u[start:stop, stop:].T @ err
    decoded = np.empty(w.shape)
    decoded[:, order] = decoded_t.T
    return decoded


def compensate_sage(w: np.ndarray, hessian: np.ndarray, result: SageResult, blocksize: int = 128,
                    percdamp: float = 0.01, act_order: bool = True, shrink: float = 0.0) -> SageResult:
    """Re-choose the stored values of `result` (a groups-mode SageResult of W) column by column with GPTQ
    compensation under H = XᵀX (any positive multiple). act_order handles columns by decreasing H_jj first;
    shrink scales H's off-diagonal part by 1 − shrink (see gptq.inverse_hessian_cholesky_direct).
    Dead columns (H_jj = 0) are quantized as zeros, since their inputs never fire."""
    start = time.perf_counter()
    if result.per_row:
        raise ValueError("compensation needs the exportable groups mode (matrix-wide group scales)")
    w = check_weight(w)
    h = check_hessian(hessian, w.shape[1], copy=False)  # only read here: a 7B down_proj's H is 970 MB
    if w.shape != result.shape:
        raise ValueError(f"result has shape {result.shape}, the weight {w.shape}")
    live = np.where(dead_columns(h)[None, :], 0.0, w)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(w.shape[1])
    codebook = _Codebook(result, order)
    _compensate(live, h, codebook, order, blocksize, percdamp, shrink)
    signs, group_index, salient_q = (np.empty(result.shape, a.dtype) for a in
                                     (codebook.positive_t, codebook.group_t, codebook.q_t))
    signs[:, order], group_index[:, order], salient_q[:, order] = (codebook.positive_t.T, codebook.group_t.T,
                                                                   codebook.q_t.T)
    salient = result.salient_mask
    out = replace(result, signs=signs & ~salient, group_index=np.where(salient, 0, group_index).astype(np.uint8),
                  salient_q=salient_q, stats=dict(result.stats))
    w_hat = out.dequantize()
    planned = {f"planned_{k}": out.stats.pop(k) for k in ("weighted_error", "weighted_rel_error") if k in out.stats}
    out.stats.update(error_stats(w, w_hat), **planned, compensated=True, act_order=act_order,
                     compensate_shrink=shrink,
                     hessian_error=hessian_error(w, w_hat, h), compensate_time_s=time.perf_counter() - start)
    return out


def compensate_validated(w: np.ndarray, hessian: np.ndarray, validation_hessian: np.ndarray, result: SageResult,
                         shrinks: tuple[float, ...], act_order: bool = True) -> SageResult:
    """compensate_sage at each shrink of `shrinks` (1: `result` itself, uncompensated), keeping the result with
    the lowest output error under validation_hessian, XᵀX of tokens that `hessian` did not see. The feedback is a
    fit to the calibration tokens; held-out tokens say, matrix by matrix, how much of it generalises."""
    w = check_weight(w)
    h_val = check_hessian(validation_hessian, w.shape[1], copy=False)
    scored = []
    for shrink in shrinks:
        candidate = result if shrink == 1 else compensate_sage(w, hessian, result, act_order=act_order,
                                                                shrink=shrink)
        scored.append((hessian_error(w, candidate.dequantize(), h_val), shrink, candidate))
    errors = {f"{shrink:g}": error for error, shrink, _ in scored}
    error, shrink, best = min(scored, key=lambda t: t[0])  # ties: the earlier candidate
    best.stats.update(compensate_shrink=shrink, validation_errors=errors, compensated=shrink != 1)
    return best
