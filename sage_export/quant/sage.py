"""SAGE-PTQ for one weight matrix (SPEC §2): saliency split, graph-guided group count, dual-mode quantizer,
Brent search of the saliency ratio ρ. Data-free and weight-only.

Speed comes from doing once what does not depend on ρ: the matrix is sorted by |W − μ| once (a salient set is
then a prefix), and all |w| are sorted once with prefix sums, so the unsalient bands' sums at any ρ are "all
entries minus the salient prefix". One evaluation of the search costs O(ρ·N·K), not a pass over the matrix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..format.accounting import sage_paper_bits
from ..format.sage_layout import PackedLinear, dequantize as dequantize_packed, pack_sage
from .config import SageConfig
from .common import check_weight, to_float16
from .dual import SalientFit, binary_error, fit_salient
from .groups import (BandSums, GroupChoice, MagnitudeTable, assign_bands, band_edges, choose_group_count,
                     graph_sample_size, quantile_centres, refine_centres)
from .saliency import SaliencyOrder, realised_fraction
from .search import SearchResult, brent_search


@dataclass(eq=False)
class SageResult:
    """One quantized matrix: the quantizer's decisions, which pack_sage turns into the op's tensors."""

    signs: np.ndarray  # bool [N, K]: True -> +α (read only off the salient set)
    group_index: np.ndarray  # uint8 [N, K]: band of each unsalient weight, 0 on the salient set
    group_scales: np.ndarray  # float16 [G]: α_g (empty in per_row mode)
    salient_mask: np.ndarray  # bool [N, K]
    salient_q: np.ndarray  # int8 [N, K]: salient integers, 0 off the salient set
    salient_scale: np.ndarray  # float16 [N]: per-row salient scale, 0 for rows without salient entries
    salient_bits: int
    stats: dict[str, Any]
    row_scales: np.ndarray | None = None  # float16 [N]: per_row mode's unsalient scales, else None
    method: str = field(default="sage", init=False)
    _packed: PackedLinear | None = field(default=None, init=False, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.signs.shape)

    @property
    def per_row(self) -> bool:
        return self.row_scales is not None

    def packed(self) -> PackedLinear:
        """The SageBinaryGemm tensors. Per-row scales have no place in the op: that mode raises ValueError."""
        if self.per_row:
            raise ValueError("scale_mode 'per_row' is an ablation with per-row scales; the SageBinaryGemm op "
                             "has matrix-wide group scales, so it cannot be packed or exported")
        return self._pack(self.group_scales)

    def _pack(self, group_scales: np.ndarray) -> PackedLinear:
        if self._packed is None:
            self._packed = pack_sage(self.signs, self.group_index, group_scales, self.salient_mask,
                                     self.salient_q, self.salient_scale, self.salient_bits)
        return self._packed

    def dequantize(self) -> np.ndarray:
        if not self.per_row:
            return dequantize_packed(self.packed())
        # Decode the unit-scale packing (±1 off the salient set), then apply each row's stored scale there.
        unit = self._pack(np.ones(1))
        w = dequantize_packed(unit)
        rows = np.repeat(np.arange(unit.out_features), np.diff(unit.salient_rowptr))
        salient = np.zeros(w.shape, dtype=bool)
        salient[rows, unit.salient_cols] = True
        return np.where(salient, w, w * self.row_scales.astype(np.float32)[:, None])

    def stored_tensors(self) -> dict[str, np.ndarray]:
        if not self.per_row:
            return self.packed().tensors()
        unit = self._pack(np.ones(1))
        return {"sign_bits": unit.sign_bits, "row_scales": self.row_scales, "salient_rowptr": unit.salient_rowptr,
                "salient_cols": unit.salient_cols, "salient_q": unit.salient_q, "salient_scale": unit.salient_scale}

    def paper_bits(self) -> dict[str, float]:
        n, k = self.shape
        n_scales = n if self.per_row else self.group_scales.shape[0]  # per_row: N row scales in place of G
        return sage_paper_bits(n, k, int(self.salient_mask.sum()), self.salient_bits, n_scales)


@dataclass(frozen=True)
class _Plan:
    """Every decision at one ρ, and its reconstruction error (float16 scales), without the [N, K] arrays."""

    rho: float
    count: int  # salient entries
    fit: SalientFit
    centres: np.ndarray | None  # band centres (groups mode)
    scales16: np.ndarray  # α_g (groups mode) or per-row unsalient scales (per_row mode)
    choice: GroupChoice | None
    error: float


class _Matrix:
    """One matrix with everything that does not depend on ρ precomputed."""

    def __init__(self, w: np.ndarray, cfg: SageConfig, seed: int):
        self.w, self.cfg, self.seed = w, cfg, seed
        self.n, self.k = w.shape
        self.saliency = SaliencyOrder.from_matrix(w)
        order = self.saliency.order
        flat = w.ravel()
        # The matrix in saliency order: a salient set is a prefix of these arrays.
        self.rows_by_rank = order // self.k
        self.w_by_rank = flat[order]
        self.mags_by_rank = np.abs(self.w_by_rank)
        if cfg.scale_mode == "groups":
            self.all_mags = MagnitudeTable(np.abs(flat))
        else:
            mags = np.abs(w)
            self.row_sums = BandSums(np.full(self.n, self.k), mags.sum(axis=1), (mags * mags).sum(axis=1))
        self.graph_time_s = 0.0

    def count(self, rho: float) -> int:
        return self.saliency.count(rho, self.cfg.threshold)

    def group_start(self, rho: float) -> tuple[GroupChoice | None, np.ndarray]:
        """Graph step on a seeded sample of the unsalient |w| at ρ: (choice, starting band centres). With
        fixed_groups the graph is skipped and the centres start at quantiles of the same sample."""
        start = time.perf_counter()
        pool = self.saliency.order[self.count(rho):]
        size = graph_sample_size(self.saliency.numel, pool.size, self.cfg.graph_samples,
                                 self.cfg.graph_min_fraction)
        rng = np.random.default_rng(self.seed)
        picks = pool if size >= pool.size else pool[rng.choice(pool.size, size, replace=False)]
        mags = np.abs(self.w.ravel()[picks])
        if self.cfg.fixed_groups is not None:
            choice, centres = None, quantile_centres(mags, self.cfg.fixed_groups)
        else:
            choice = choose_group_count(mags, self.cfg.group_candidates, self.cfg.knn_k, self.cfg.kmeans_n_init,
                                        self.seed)
            centres = choice.centres
        self.graph_time_s += time.perf_counter() - start
        return choice, centres

    def plan(self, rho: float, start: tuple[GroupChoice | None, np.ndarray] | None) -> _Plan:
        count = self.count(rho)
        fit = fit_salient(self.w_by_rank[:count], self.rows_by_rank[:count], self.n, self.cfg.salient_bits,
                          self.cfg.scale_fit_iters)
        if self.cfg.scale_mode == "per_row":
            removed = _row_sums(self.rows_by_rank[:count], self.mags_by_rank[:count], self.n)
            sums = self.row_sums - removed
            scales16 = to_float16(sums.means())
            return _Plan(rho, count, fit, None, scales16, None, binary_error(sums, scales16) + fit.error)

        choice, init = start
        salient_mags = MagnitudeTable(self.mags_by_rank[:count])

        def unsalient_sums(edges: np.ndarray) -> BandSums:
            return self.all_mags.band_sums(edges) - salient_mags.band_sums(edges)

        centres = refine_centres(unsalient_sums, init, self.cfg.lloyd_steps)
        sums = unsalient_sums(band_edges(centres))
        alpha16 = to_float16(sums.means())  # α_g = mean |w| of the band, exactly what the bands hold
        return _Plan(rho, count, fit, centres, alpha16, choice, binary_error(sums, alpha16) + fit.error)

    def build(self, plan: _Plan) -> SageResult:
        mask = self.saliency.mask(plan.count)
        salient_q = np.zeros(self.w.size, dtype=np.int8)
        salient_q[self.saliency.order[:plan.count]] = plan.fit.q
        salient_q = salient_q.reshape(self.w.shape)
        common = dict(signs=self.w >= 0, salient_mask=mask, salient_q=salient_q, salient_scale=plan.fit.scale16,
                      salient_bits=self.cfg.salient_bits, stats={})
        if plan.centres is None:
            return SageResult(group_index=np.zeros(self.w.shape, dtype=np.uint8),
                              group_scales=np.zeros(0, dtype=np.float16), row_scales=plan.scales16, **common)
        bands = assign_bands(np.abs(self.w), plan.centres)
        group_index = np.where(mask, 0, bands).astype(np.uint8)
        return SageResult(group_index=group_index, group_scales=plan.scales16, **common)


def _row_sums(rows: np.ndarray, mags: np.ndarray, n: int) -> BandSums:
    return BandSums(np.bincount(rows, minlength=n), np.bincount(rows, weights=mags, minlength=n),
                    np.bincount(rows, weights=mags * mags, minlength=n))


def quantize_sage(w: np.ndarray, cfg: SageConfig, seed: int = 0) -> SageResult:
    """Quantize W [N out, K in]. Same W, cfg and seed -> identical arrays. NaN/Inf in W -> ValueError."""
    start = time.perf_counter()
    cfg.validate()
    matrix = _Matrix(check_weight(w), cfg, seed)
    regraph = cfg.scale_mode == "groups" and cfg.regraph_in_search
    shared_start = None
    if cfg.scale_mode == "groups" and not regraph:
        shared_start = matrix.group_start(cfg.graph_rho)
    plans: dict[float, _Plan] = {}

    def plan_at(rho: float) -> _Plan:
        if rho not in plans:
            plans[rho] = matrix.plan(rho, matrix.group_start(rho) if regraph else shared_start)
        return plans[rho]

    if cfg.fixed_rho is not None:
        rho = float(cfg.fixed_rho)
        search = SearchResult(rho, plan_at(rho).error, [(rho, plan_at(rho).error)], None)
    else:
        search = brent_search(lambda r: plan_at(r).error, cfg.rho_bounds, cfg.brent_xatol, cfg.brent_maxiter)
    plan = plans[search.x]
    result = matrix.build(plan)
    result.stats = _stats(result, plan, search, matrix, cfg)
    result.stats["time_s"] = time.perf_counter() - start
    return result


def _stats(result: SageResult, plan: _Plan, search: SearchResult, matrix: _Matrix, cfg: SageConfig) -> dict:
    residual = matrix.w - result.dequantize()
    recon = float(np.sum(residual * residual))
    norm = float(np.sum(matrix.w * matrix.w))
    silhouette = plan.choice.silhouette if plan.choice is not None else {}
    return {
        "variant": "data-free",
        "scale_mode": cfg.scale_mode,
        "exportable": cfg.exportable,
        "threshold": cfg.threshold,
        "rho": plan.rho,
        "realised_rho": realised_fraction(plan.count, matrix.saliency.numel),
        "nnz": plan.count,
        "n_groups": 0 if result.per_row else int(result.group_scales.shape[0]),  # 0: per-row scales, no groups
        "silhouette": {str(k): float(v) for k, v in sorted(silhouette.items())},
        "brent_evals": [[r, e] for r, e in search.evals],
        "n_evals": search.n_evals,
        "hit_bound": search.hit_bound,
        "recon_error": recon,
        "rel_error": recon / norm if norm > 0 else 0.0,
        "salient_bits": cfg.salient_bits,
        "graph_time_s": matrix.graph_time_s,
    }
