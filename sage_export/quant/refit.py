"""Re-fit a SAGE codebook's scales to the codes compensation chose (a least-squares step after GPTQ).

Compensation (compensate.py) keeps the codebook that was fitted to the original weights, α_g and each row's
salient scale s_n, and re-chooses every code against it. Once the codes are fixed, the decoded matrix is linear in
those scales,

    Ŵ[n, k] = ±r_n·α_g(n,k)  (unsalient),    Ŵ[n, k] = s_n·q[n, k]  (salient),

so the output error tr((W − Ŵ) H (W − Ŵ)ᵀ) is a quadratic in them with a closed-form minimum: G unknowns shared by
the whole matrix, and one per row. The two are solved in turn (each exactly, given the other). Nothing stored
changes size or layout: only the float16 values of α and s move, so the op contract is untouched.

α has G unknowns and every row holds K equations for them, so α is fitted on at most ALPHA_ROWS evenly spaced rows
(no randomness), at G·rows·K² multiply-adds instead of G·N·K².
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from .common import check_hessian, check_weight, hessian_error, to_float16
from .compensate import compensate_sage
from .sage import SageResult

ALPHA_ROWS = 512  # rows that fit α (see the module docstring)
ALTERNATIONS = 3  # α given s, then s given α, this many times; each step only lowers the error


def _unsalient_signs(result: SageResult) -> np.ndarray:
    """±r_n on unsalient entries, 0 on salient ones: Ŵ's unsalient part is this times α of each entry's band."""
    mult = np.ones(result.shape[0]) if result.row_scales is None else result.row_scales.astype(np.float64)
    signed = np.where(result.signs, 1.0, -1.0) * mult[:, None]
    return np.where(result.salient_mask, 0.0, signed)


def _alpha_system(c: np.ndarray, group_index: np.ndarray, h: np.ndarray, n_groups: int):
    """P_g = B_g H on the rows given (B_g: c where the band is g), stacked [G, rows, K], and the G×G matrix
    A_gh = ⟨B_g H, B_h⟩ of the quadratic in α."""
    b = np.stack([np.where(group_index == g, c, 0.0) for g in range(n_groups)])
    p = (b.reshape(-1, b.shape[-1]) @ h).reshape(b.shape)
    return p, np.einsum("gnk,hnk->gh", p, b)


def _solve_alpha(a: np.ndarray, p: np.ndarray, target: np.ndarray, old: np.ndarray) -> np.ndarray:
    """argmin_α of ‖target − Σ α_g B_g‖²_H, given P_g = B_g H; bands with no weight (A_gg = 0) keep their α."""
    rhs = np.einsum("gnk,nk->g", p, target)
    used = np.diag(a) > 0
    alpha = old.astype(np.float64).copy()
    if used.any():
        sub = a[np.ix_(used, used)]
        ridge = 1e-12 * np.trace(sub) * np.eye(used.sum())  # A is PSD; a band pair can be collinear
        alpha[used] = np.linalg.solve(sub + ridge, rhs[used])
    return alpha


def _solve_salient_scales(residual: np.ndarray, q: np.ndarray, qh: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Per row, argmin_s of ‖residual_n − s·q_n‖²_H (residual: W minus the unsalient part); rows with no salient
    entry, or whose q_n carries no H-weight, keep their scale."""
    num = np.sum(residual * qh, axis=1)
    den = np.sum(q * qh, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), old.astype(np.float64))


def refit_scales(w: np.ndarray, hessian: np.ndarray, result: SageResult,
                 alternations: int = ALTERNATIONS) -> SageResult:
    """`result` with α and the salient scales re-fitted to its codes under H = XᵀX; `result` itself where the
    re-fit does not lower tr(ΔW H ΔWᵀ) over all rows (α fitted on a row subset, and float16 rounding, can miss)."""
    start = time.perf_counter()
    if result.per_row:
        raise ValueError("refit_scales needs the groups mode (matrix-wide group scales)")
    w = check_weight(w)
    h = check_hessian(hessian, w.shape[1], copy=False)
    n_rows = w.shape[0]
    c = _unsalient_signs(result)
    q = result.salient_q.astype(np.float64)
    rows = np.unique(np.linspace(0, n_rows - 1, min(n_rows, ALPHA_ROWS)).round().astype(int))
    p, a = _alpha_system(c[rows], result.group_index[rows], h, len(result.group_scales))
    has_salient = result.salient_mask.any(axis=1)
    qh = np.zeros_like(q)
    qh[has_salient] = q[has_salient] @ h
    alpha = result.group_scales.astype(np.float64)
    scale = result.salient_scale.astype(np.float64)
    for _ in range(alternations):
        alpha = _solve_alpha(a, p, (w - scale[:, None] * q)[rows], alpha)
        unsalient = c * alpha[result.group_index]
        scale = _solve_salient_scales(w - unsalient, q, qh, scale)
    # A negative salient scale would flip every q of its row; keeping s ≥ 0 keeps the stored convention.
    scale = np.where(scale > 0, scale, 0.0)
    refit = replace(result, group_scales=to_float16(alpha), salient_scale=to_float16(scale),
                    stats=dict(result.stats))
    before = hessian_error(w, result.dequantize(), h)
    after = hessian_error(w, refit.dequantize(), h)
    if not after < before:
        return result
    refit.stats.update(refit_gain=after / before, refit_time_s=time.perf_counter() - start, hessian_error=after)
    return refit


def refit_compensated(w: np.ndarray, hessian: np.ndarray, result: SageResult, rounds: int,
                      act_order: bool = True) -> SageResult:
    """A compensated `result` re-fitted `rounds` times, compensated again (at the shrink it was compensated with)
    with each re-fitted codebook but the last, so that codes and scales each answer the other's latest choice.
    Compensation is greedy, so a round can end worse than the one before: the lowest output error is kept."""
    w = check_weight(w)
    first = result.stats["hessian_error"]
    best = current = result
    for i in range(rounds):
        if i:
            current = compensate_sage(w, hessian, current, act_order=act_order,
                                      shrink=current.stats.get("compensate_shrink", 0.0))
        current = refit_scales(w, hessian, current)
        if current.stats["hessian_error"] < best.stats["hessian_error"]:
            best = current
    best = replace(best, stats=dict(best.stats))
    best.stats.update(refit_rounds=rounds, refit_gain=best.stats["hessian_error"] / first)
    return best
