"""GPTQ's error-compensation loop (Frantar, Ashkboos, Hoefler, Alistarh: "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", 2022), written from the paper's math so that several quantizers can share it.

Goal: choose Ŵ on a quantization grid to minimise the layer's output error tr((W − Ŵ) H (W − Ŵ)ᵀ) with
H = 2·X·Xᵀ from calibration activations X [K, samples]. Columns are quantized one at a time, left to right; after
column j is fixed, the error it leaves is pushed onto the columns not yet quantized, weighted by the inverse
Hessian (the Optimal Brain Surgeon update). With U the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U):

    err_j = (w_j − q_j) / U_jj          w_{j'} -= err_j · U_{j j'}   for every j' > j

U_jj² is the inverse-Hessian diagonal restricted to the columns not yet quantized, which is what the OBS formulas
need at step j; the Cholesky form gives all of them at once and is numerically stable. Updates within a block of
`blocksize` columns are applied column by column; the rest of the matrix receives the whole block's update at once
(one matrix product), which is the same arithmetic in a cache-friendlier order.

The quantizer is a callback with two levels, so that a method can make decisions per block (BiLLM chooses its
salient columns and break point per block of 128 columns) and still round column by column:

    quantize_columns(block_w, hinv_diag, cols) -> column_fn          once per block, at the block's start
        block_w    float64 [N, B], read-only: the block's weights after compensation by all earlier blocks and
                   before any of its own columns is quantized
        hinv_diag  float64 [B]: U_jj for the block's columns (the denominator of err_j above)
        cols       int64 [B]: original column index of each of the block's columns, in processing order
                   (arange(start, stop) unless act_order permuted them)
    column_fn(i, block_now) -> q                                   for i = 0, 1, ..., B−1 in order
        block_now  float64 [N, B], read-only, live: columns ≥ i hold the block's weights as compensated by every
                   column quantized so far (a group quantizer can look ahead at block_now[:, i:i+g]); columns < i
                   hold the values they had when they were quantized
        q          [N]: what column i decodes to, exactly as the caller will store it (scales already rounded)

The callbacks record their own codes and scales; this module only returns the decoded matrix.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.linalg

ColumnQuantizer = Callable[[int, np.ndarray], np.ndarray]
BlockQuantizer = Callable[[np.ndarray, np.ndarray, np.ndarray], ColumnQuantizer]


def dead_columns(h: np.ndarray) -> np.ndarray:
    """bool [K]: inputs that were always zero in calibration (H_jj = 0); any weight there is free."""
    return np.diag(h) == 0


def _damped(h: np.ndarray, percdamp: float) -> np.ndarray:
    """H + λI, λ = percdamp · mean(diag H), with dead columns given H_jj = 1 first.

    Damping keeps H invertible when calibration data do not span every direction (and is GPTQ's regulariser)."""
    h = h.copy()
    np.fill_diagonal(h, _damped_diagonal(h, percdamp))
    return h


def _damped_diagonal(h: np.ndarray, percdamp: float) -> np.ndarray:
    diagonal = np.diag(h).copy()
    diagonal[dead_columns(h)] = 1.0
    return diagonal + percdamp * np.mean(diagonal)


def inverse_hessian_cholesky(h: np.ndarray, percdamp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + λI)⁻¹ (see _damped): invert, then factor, as GPTQ's reference does."""
    h = _damped(h, percdamp)
    try:
        h_inv = scipy.linalg.cho_solve(scipy.linalg.cho_factor(h, lower=False), np.eye(h.shape[0]))
        h_inv = (h_inv + h_inv.T) / 2  # the solve leaves rounding-level asymmetry; Cholesky wants exact symmetry
        return scipy.linalg.cholesky(h_inv, lower=False)
    except np.linalg.LinAlgError as exc:
        raise ValueError("Hessian is not positive definite even after damping; raise percdamp") from exc


def inverse_hessian_cholesky_direct(h: np.ndarray, percdamp: float, shrink: float = 0.0) -> np.ndarray:
    """The same U without forming (H + λI)⁻¹: with J the order-reversing permutation and L the lower Cholesky
    factor of J·H·J, U = J·L⁻¹·J (since H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)). One factorisation and one triangular
    inverse instead of a factorisation, a full solve and a second factorisation: about 2.5× fewer flops, equal
    up to rounding. The GPTQ/BiLLM baselines keep the reference route so their recorded numbers reproduce.

    Memory: one K x K copy (J·H·J, in the column-major order LAPACK takes, damped in place) is factorised and
    inverted in place, then copied once into the result. Letting scipy copy at each step held up to five copies at
    once: 4.8 GB for LLaMA-2-7B's down_proj (K = 11008), in each worker. The values are the same to the bit.

    shrink ∈ [0, 1] first scales H's off-diagonal entries by 1 − shrink (the diagonal is kept): the
    cross-correlations are what a few tokens per column estimate worst, and at shrink = 1 no error is fed
    forward at all (nearest rounding)."""
    a = np.array(h[::-1, ::-1], order="F")  # J·H·J, always a copy (asfortranarray returns a 1 x 1 view)
    if shrink:
        a *= 1.0 - shrink  # the diagonal is overwritten next, from H itself
    np.fill_diagonal(a, _damped_diagonal(h, percdamp)[::-1])  # damped in H's order: the same mean, to the bit
    try:
        lower = scipy.linalg.cholesky(a, lower=True, overwrite_a=True)
    except np.linalg.LinAlgError as exc:
        raise ValueError("Hessian is not positive definite even after damping; raise percdamp") from exc
    del a
    inverse, info = scipy.linalg.lapack.dtrtri(lower, lower=1, overwrite_c=1)
    del lower
    if info != 0:
        raise ValueError("Hessian is singular even after damping; raise percdamp")
    return np.ascontiguousarray(inverse[::-1, ::-1])


def _check_inputs(w: np.ndarray, h: np.ndarray, blocksize: int, percdamp: float) -> None:
    if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"W must be [N, K] and H [K, K]; got W {w.shape}, H {h.shape}")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(h))):
        raise ValueError("W or H contains NaN or Inf")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if not percdamp > 0:
        raise ValueError(f"percdamp must be > 0, got {percdamp}")


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _quantize_block(w1: np.ndarray, u1: np.ndarray, column_fn: ColumnQuantizer) -> tuple[np.ndarray, np.ndarray]:
    """Quantize one block column by column in place of w1; returns (Q1, Err1) for the block."""
    view = _readonly(w1.view())  # callbacks see the live weights but cannot change them
    q1 = np.empty_like(w1)
    err1 = np.empty_like(w1)
    for i in range(w1.shape[1]):
        q = np.asarray(column_fn(i, view), dtype=np.float64)
        if q.shape != (w1.shape[0],):
            raise ValueError(f"column quantizer returned shape {q.shape}, expected ({w1.shape[0]},)")
        q1[:, i] = q
        err1[:, i] = (w1[:, i] - q) / u1[i, i]
        w1[:, i + 1 :] -= np.outer(err1[:, i], u1[i, i + 1 :])
    return q1, err1


def gptq_compensate(w: np.ndarray, h: np.ndarray, quantize_columns: BlockQuantizer, blocksize: int = 128,
                    percdamp: float = 0.01, act_order: bool = False) -> np.ndarray:
    """Quantize W [N, K] column by column with GPTQ error compensation; returns the decoded float64 [N, K].

    H [K, K] is 2·X·Xᵀ (any positive multiple gives the same result). Dead columns (H_jj = 0) are set to zero
    before quantization, as their inputs never fire. act_order processes columns by decreasing H_jj, the
    heuristic of the GPTQ authors' implementation; the result is returned in the original column order."""
    w = np.array(w, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    _check_inputs(w, h, blocksize, percdamp)
    w[:, dead_columns(h)] = 0.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(w.shape[1])
    w = w[:, order]
    u = inverse_hessian_cholesky(h[np.ix_(order, order)], percdamp)

    q = np.empty_like(w)
    k = w.shape[1]
    for start in range(0, k, blocksize):
        stop = min(start + blocksize, k)
        w1 = w[:, start:stop].copy()
        u1 = u[start:stop, start:stop]
        column_fn = quantize_columns(_readonly(w1.copy()), np.diag(u1).copy(), order[start:stop].copy())
        q[:, start:stop], err1 = _quantize_block(w1, u1, column_fn)
        w[:, stop:] -= err1 @ u[start:stop, stop:]

    result = np.empty_like(q)
    result[:, order] = q
    return result
