"""SAGE-PTQ for one weight matrix (SPEC §2): saliency split, graph-guided group count, dual-mode quantizer,
Brent search of the saliency ratio ρ. Weight-only; data-free unless column weights are given.

Column weights c_k (the activation energy h_k = E[x_k²] of input channel k, possibly times the layer's
sensitivity) make every error the model-facing one, Σ c_k (w − ŵ)²: the saliency score, the band fit, α_g, the
salient row scales and the ρ search all use it (SPEC §2.1). Without them every c_k is 1: the paper's reading.
A price per stored byte (`rho_price`) makes the ρ search minimise error + price·bytes instead of error alone.

Row multipliers (`row_multipliers`, the op's row_scales): the unsalient weight of row n is r_n·α_g·sign.
Everything up to build() is the plain problem (every r_n = 1, so options and the ρ search price what they did);
build() then alternates least-squares fits of r_n, of each weight's band given r_n, and of α_g, starting from the
plain solution. Each step can only lower the weighted error, and the result is kept only if it did (up to float16
rounding, checked), so a row multiplier never makes a matrix worse. One α_g set for the whole matrix cannot follow
rows whose sizes differ (on Qwen2.5-Coder-1.5B the worst rows' error was 2 to 4 times RTN's); r_n costs 16/K bits.

Speed comes from doing once what does not depend on ρ: the matrix is sorted by its saliency score once (a salient
set is then a prefix), and all |w| are sorted once with (weighted) prefix sums, so the unsalient bands' sums at
any ρ are "all entries minus the salient prefix". One evaluation of the search costs O(ρ·N·K), not a pass over
the matrix. `sage_options` measures many (G, ρ) options of one matrix on the same precomputation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..format.accounting import sage_paper_bits
from ..format.sage_layout import PackedLinear, dequantize as dequantize_packed, pack_sage, stored_bytes
from .budget import Option
from .config import SageConfig
from .common import check_col_weight, check_weight, to_float16
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
    # float16 [N]: per_row mode's unsalient scales, or groups mode's row multipliers (None: every r_n is 1)
    row_scales: np.ndarray | None = None
    method: str = field(default="sage", init=False)
    _packed: PackedLinear | None = field(default=None, init=False, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.signs.shape)

    @property
    def per_row(self) -> bool:
        return self.group_scales.shape[0] == 0  # per_row mode stores no group scales

    def packed(self) -> PackedLinear:
        """The SageBinaryGemm tensors. Per-row scales have no place in the op: that mode raises ValueError."""
        if self.per_row:
            raise ValueError("scale_mode 'per_row' is an ablation with per-row scales; the SageBinaryGemm op "
                             "has matrix-wide group scales, so it cannot be packed or exported")
        return self._pack(self.group_scales)

    def _pack(self, group_scales: np.ndarray) -> PackedLinear:
        if self._packed is None:
            self._packed = pack_sage(self.signs, self.group_index, group_scales, self.salient_mask,
                                     self.salient_q, self.salient_scale, self.salient_bits,
                                     None if self.per_row else self.row_scales)
        return self._packed

    def dequantize(self) -> np.ndarray:
        if not self.per_row:
            return dequantize_packed(self.packed())
        # Decode the unit-scale packing (±1 off the salient set), then apply each row's stored scale there.
        unit = self._pack(np.ones(1))
        w = dequantize_packed(unit)
        rows = np.repeat(np.arange(unit.out_features), np.diff(unit.salient_rowptr))
        salient = np.zeros(w.shape, dtype=bool)
        salient[rows, unit.columns] = True
        return np.where(salient, w, w * self.row_scales.astype(np.float32)[:, None])

    def stored_tensors(self) -> dict[str, np.ndarray]:
        if not self.per_row:
            return self.packed().tensors()
        unit = self._pack(np.ones(1))
        return {"sign_bits": unit.sign_bits, "row_scales": self.row_scales, "salient_rowptr": unit.salient_rowptr,
                "salient_cols": unit.salient_cols, "salient_q": unit.salient_q, "salient_scale": unit.salient_scale}

    def paper_bits(self) -> dict[str, float]:
        n, k = self.shape
        if self.per_row:  # N unsalient scales a row, no groups
            return sage_paper_bits(n, k, int(self.salient_mask.sum()), self.salient_bits, 0, n)
        p = self.packed()
        return sage_paper_bits(n, k, p.nnz, self.salient_bits, p.n_groups, p.row_scales.shape[0])

    def compact(self) -> SageResult | PackedSageResult:
        """The same layer without the [N, K] decision arrays (4 bytes per weight): what a run keeps of each
        matrix between quantizing it and exporting it. Per-row mode has no packed form and stays as it is."""
        if self.per_row:
            return self
        return PackedSageResult(self.packed(), self.stats)


@dataclass(eq=False)
class PackedSageResult:
    """A groups-mode SageResult reduced to the op's packed tensors and its stats (SageResult.compact). It
    decodes, stores and counts exactly as the SageResult it came from: the packed tensors are all of them."""

    packed_linear: PackedLinear
    stats: dict[str, Any]
    method: str = field(default="sage", init=False)
    per_row: bool = field(default=False, init=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed_linear.out_features, self.packed_linear.in_features)

    def packed(self) -> PackedLinear:
        return self.packed_linear

    def compact(self) -> PackedSageResult:
        return self

    def dequantize(self) -> np.ndarray:
        return dequantize_packed(self.packed_linear)

    def stored_tensors(self) -> dict[str, np.ndarray]:
        return self.packed_linear.tensors()

    def paper_bits(self) -> dict[str, float]:
        p = self.packed_linear
        return sage_paper_bits(p.out_features, p.in_features, p.nnz, p.salient_bits, p.n_groups,
                               p.row_scales.shape[0])


@dataclass(frozen=True)
class _Plan:
    """Every decision at one ρ, and its reconstruction error (float16 scales), without the [N, K] arrays."""

    rho: float
    count: int  # salient entries
    fit: SalientFit
    centres: np.ndarray | None  # band centres (groups mode)
    scales16: np.ndarray  # α_g (groups mode) or per-row unsalient scales (per_row mode)
    choice: GroupChoice | None
    error: float  # weighted by the column weights when there are any
    nbytes: int  # stored bytes of the packed layer (groups mode; per_row counts its own tensors)
    objective: float  # error + rho_price · nbytes: what the ρ search minimises


class _Matrix:
    """One matrix with everything that does not depend on ρ precomputed."""

    def __init__(self, w: np.ndarray, cfg: SageConfig, seed: int, col_weight: np.ndarray | None = None,
                 max_rho: float = 1.0):
        self.w, self.cfg, self.seed = w, cfg, seed
        self.n, self.k = w.shape
        self.col_weight = col_weight
        # Activation-aware, only the entries any ρ up to max_rho can make salient are sorted (the paper's data-free
        # path keeps its full sort, so its results stay what they were).
        reach = int(np.ceil(max_rho * w.size)) + 1  # with the quantile threshold, no ρ <= max_rho counts more
        top = None if col_weight is None or cfg.threshold != "quantile" else reach
        self.saliency = SaliencyOrder.from_matrix(w, col_weight, top)
        order = self.saliency.order if cfg.threshold != "quantile" else self.saliency.order[:reach]
        flat = w.ravel()
        # The matrix in saliency order: a salient set is a prefix of these arrays.
        self.rows_by_rank = order // self.k
        self.w_by_rank = flat[order]
        self.mags_by_rank = np.abs(self.w_by_rank)
        self.c_by_rank = None if col_weight is None else col_weight[order % self.k]
        c_flat = None if col_weight is None else np.broadcast_to(col_weight, w.shape).ravel()
        if cfg.scale_mode == "groups":
            self.all_mags = MagnitudeTable(_exact_float32(np.abs(flat)), c_flat)
        else:
            mags = np.abs(w)
            c = np.ones_like(mags) if col_weight is None else np.broadcast_to(col_weight, w.shape)
            self.row_sums = BandSums(np.full(self.n, self.k), c.sum(axis=1), (c * mags).sum(axis=1),
                                     (c * mags * mags).sum(axis=1))
        self.graph_time_s = 0.0
        self._salient: dict[int, tuple[SalientFit, np.ndarray | None]] = {}
        self._salient_tables: dict[int, MagnitudeTable] = {}

    def count(self, rho: float) -> int:
        return self.saliency.count(rho, self.cfg.threshold)

    def _sample(self, rho: float) -> tuple[np.ndarray, np.ndarray | None]:
        """A seeded sample of the unsalient |w| at ρ, with their column weights (None when data-free)."""
        pool = self.saliency.order[self.count(rho):]
        size = graph_sample_size(self.saliency.numel, pool.size, self.cfg.graph_samples,
                                 self.cfg.graph_min_fraction)
        rng = np.random.default_rng(self.seed)
        picks = pool if size >= pool.size else pool[rng.choice(pool.size, size, replace=False)]
        weights = None if self.col_weight is None else self.col_weight[picks % self.k]
        return np.abs(self.w.ravel()[picks]), weights

    def propose_groups(self, rho: float) -> GroupChoice:
        """The graph step (kNN graph, spectral clustering, silhouette) on the unsalient sample at ρ."""
        start = time.perf_counter()
        mags, _ = self._sample(rho)
        choice = choose_group_count(mags, self.cfg.group_candidates, self.cfg.knn_k, self.cfg.kmeans_n_init,
                                    self.seed)
        self.graph_time_s += time.perf_counter() - start
        return choice

    def group_start(self, rho: float, n_groups: int | None = None) -> tuple[GroupChoice | None, np.ndarray]:
        """(graph choice, starting band centres) at ρ. With a fixed G (n_groups, else cfg.fixed_groups) the graph
        is skipped and the centres start at (weighted) quantiles of the same sample."""
        n_groups = self.cfg.fixed_groups if n_groups is None else n_groups
        if n_groups is None:
            choice = self.propose_groups(rho)
            return choice, choice.centres
        mags, weights = self._sample(rho)
        return None, quantile_centres(mags, n_groups, weights)

    def nbytes(self, count: int, n_groups: int) -> int:
        return stored_bytes(self.n, self.k, n_groups, count, self.cfg.row_multipliers)

    def salient_part(self, count: int) -> tuple[SalientFit, np.ndarray | None]:
        """The salient fit of the `count` most salient entries and their weights; cached, since it does not
        depend on G and the budget measures every G at the same ρ grid."""
        if count not in self._salient:
            c_salient = None if self.c_by_rank is None else self.c_by_rank[:count]
            fit = fit_salient(self.w_by_rank[:count], self.rows_by_rank[:count], self.n, self.cfg.salient_bits,
                              self.cfg.scale_fit_iters, c_salient)
            self._salient[count] = (fit, c_salient)
        return self._salient[count]

    def forget_salient(self) -> None:
        """Drop the cached salient fits and tables: up to 32 bytes per salient entry each, so a search that
        keeps one per evaluated ρ would hold several times the matrix."""
        self._salient.clear()
        self._salient_tables.clear()

    def end_search(self) -> None:
        """Free what only the search reads (the sorted magnitude table and the per-rank arrays, about 40 bytes
        per weight) before build() allocates the result; build() needs the saliency order and W only."""
        self.forget_salient()
        self.all_mags = self.rows_by_rank = self.w_by_rank = self.mags_by_rank = self.c_by_rank = None

    def salient_table(self, count: int) -> MagnitudeTable:
        if count not in self._salient_tables:
            self._salient_tables[count] = MagnitudeTable(self.mags_by_rank[:count], self.salient_part(count)[1])
        return self._salient_tables[count]

    def plan(self, rho: float, start: tuple[GroupChoice | None, np.ndarray] | None) -> _Plan:
        count = self.count(rho)
        fit, c_salient = self.salient_part(count)
        if self.cfg.scale_mode == "per_row":
            removed = _row_sums(self.rows_by_rank[:count], self.mags_by_rank[:count], c_salient, self.n)
            sums = self.row_sums - removed
            scales16 = to_float16(sums.means())
            error = binary_error(sums, scales16) + fit.error
            # Signs, N row scales and the salient list: the layout of stored_tensors() in this mode.
            nbytes = self.nbytes(count, 1) - 2 + 2 * self.n
            return _Plan(rho, count, fit, None, scales16, None, error, nbytes,
                         error + self.cfg.rho_price * nbytes)

        choice, init = start
        salient_mags = self.salient_table(count)

        def unsalient_sums(edges: np.ndarray) -> BandSums:
            return self.all_mags.band_sums(edges) - salient_mags.band_sums(edges)

        centres = refine_centres(unsalient_sums, init, self.cfg.lloyd_steps, self.cfg.lloyd_tol)
        sums = unsalient_sums(band_edges(centres))
        # α_g = (weighted) mean |w| of the band, exactly what the bands hold (or the unit-gain scale)
        alpha16 = to_float16(sums.unit_gain_scales() if self.cfg.unit_gain else sums.means())
        error = binary_error(sums, alpha16) + fit.error
        nbytes = self.nbytes(count, centres.size)
        return _Plan(rho, count, fit, centres, alpha16, choice, error, nbytes, error + self.cfg.rho_price * nbytes)

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
        group_index = assign_bands(np.abs(self.w), plan.centres).astype(np.uint8)
        group_index[mask] = 0
        alpha16, row_scales = plan.scales16, None
        if self.cfg.row_multipliers:
            group_index, alpha16, row_scales = fit_row_multipliers(self.w, self.col_weight, mask, group_index, alpha16,
                                                                   self.cfg.row_fit_rounds)
        return SageResult(group_index=group_index, group_scales=alpha16, row_scales=row_scales, **common)


def _exact_float32(values: np.ndarray) -> np.ndarray:
    """The values as float32 when that loses nothing (weights loaded as float32/16 always are): sorting them is
    then faster and gives the same order."""
    single = values.astype(np.float32)
    return single if np.array_equal(single, values) else values


def fit_row_multipliers(w: np.ndarray, col_weight: np.ndarray | None, salient: np.ndarray, group_index: np.ndarray,
                        alpha16: np.ndarray, rounds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(group_index, α_g, r_n) after `rounds` of: r_n by least squares given bands and α; each unsalient weight's
    band as the nearest α to |w|/r_n; α_g by least squares given bands and r (all in float16 as stored). Starts
    from the plain solution (every r_n = 1) and returns it unchanged, with r = None, unless the weighted error of
    the unsalient weights fell: float16 rounding could otherwise make a step worse by a hair."""
    c = np.ones(w.shape[1]) if col_weight is None else np.asarray(col_weight, dtype=np.float64)
    mags = np.abs(w).astype(np.float64)
    unsalient = ~salient
    n_groups = alpha16.shape[0]
    best = (_row_fit_error(mags, c, unsalient, group_index, alpha16, None), group_index, alpha16, None)
    bands, alpha = group_index, alpha16
    for _ in range(rounds):
        scale = alpha.astype(np.float64)[bands] * unsalient
        den = (scale * scale) @ c
        rows16 = to_float16(np.where(den > 0, (mags * scale) @ c / np.where(den > 0, den, 1.0), 1.0))
        r = rows16.astype(np.float64)
        z = mags / np.where(r > 0, r, 1.0)[:, None]
        order = np.argsort(alpha, kind="stable")
        sorted_alpha = alpha.astype(np.float64)[order]
        bands = order[np.searchsorted((sorted_alpha[1:] + sorted_alpha[:-1]) / 2, z, side="right")]
        bands = np.where(unsalient, bands, 0).astype(np.uint8)
        # α_g = Σ c·r·|w| / Σ c·r² over the band: the least-squares value for fixed bands and r.
        cr = c[None, :] * r[:, None] * unsalient
        num = np.bincount(bands.ravel(), weights=(cr * mags).ravel(), minlength=n_groups)
        den_g = np.bincount(bands.ravel(), weights=(cr * r[:, None]).ravel(), minlength=n_groups)
        alpha = to_float16(np.where(den_g > 0, num / np.where(den_g > 0, den_g, 1.0), alpha.astype(np.float64)))
        error = _row_fit_error(mags, c, unsalient, bands, alpha, rows16)
        if error < best[0]:
            best = (error, bands, alpha, rows16)
    return best[1], best[2], best[3]


def _row_fit_error(mags: np.ndarray, c: np.ndarray, unsalient: np.ndarray, bands: np.ndarray, alpha16: np.ndarray,
                   rows16: np.ndarray | None) -> float:
    """Σ c (|w| − r_n·α_g)² over the unsalient weights, with the stored float16 values."""
    value = alpha16.astype(np.float64)[bands]
    if rows16 is not None:
        value = value * rows16.astype(np.float64)[:, None]
    return float((((mags - value) ** 2) * unsalient).dot(c).sum())


def _max_rho(cfg: SageConfig, *more: float) -> float:
    """The largest ρ a quantization with cfg (and the given extra points) can evaluate."""
    points = [cfg.rho_bounds[1], cfg.graph_rho, *more]
    if cfg.fixed_rho is not None:
        points.append(cfg.fixed_rho)
    return max(points)


def _row_sums(rows: np.ndarray, mags: np.ndarray, weights: np.ndarray | None, n: int) -> BandSums:
    c = np.ones_like(mags) if weights is None else weights
    return BandSums(np.bincount(rows, minlength=n), np.bincount(rows, weights=c, minlength=n),
                    np.bincount(rows, weights=c * mags, minlength=n), np.bincount(rows, weights=c * mags * mags,
                                                                                 minlength=n))


def quantize_sage(w: np.ndarray, cfg: SageConfig, seed: int = 0, col_weight: np.ndarray | None = None,
                  proposal: GroupChoice | None = None) -> SageResult:
    """Quantize W [N out, K in], with optional per-input-channel error weights col_weight [K] (activation-aware;
    None: data-free). Same W, cfg, seed and weights -> identical arrays. NaN/Inf in W -> ValueError.

    `proposal` is the graph step's answer when the caller already has it (it is only reported when G is fixed)."""
    start = time.perf_counter()
    cfg.validate()
    w = check_weight(w)
    matrix = _Matrix(w, cfg, seed, check_col_weight(col_weight, w.shape[1]), _max_rho(cfg))
    regraph = cfg.scale_mode == "groups" and cfg.regraph_in_search
    shared_start = None
    if cfg.scale_mode == "groups" and not regraph:
        shared_start = matrix.group_start(cfg.graph_rho)
    plans: dict[float, _Plan] = {}

    def plan_at(rho: float) -> _Plan:
        if rho not in plans:
            plans[rho] = matrix.plan(rho, matrix.group_start(rho) if regraph else shared_start)
            matrix.forget_salient()  # each ρ of the search is new; the plan keeps its own fit
        return plans[rho]

    if cfg.fixed_rho is not None:
        rho = float(cfg.fixed_rho)
        search = SearchResult(rho, plan_at(rho).objective, [(rho, plan_at(rho).objective)], None)
    else:
        also = () if cfg.rho_init is None else (float(cfg.rho_init),)
        search = brent_search(lambda r: plan_at(r).objective, cfg.rho_bounds, cfg.brent_xatol, cfg.brent_maxiter,
                              also=also)
    plan = plans[search.x]
    matrix.end_search()
    result = matrix.build(plan)
    result.stats = _stats(result, plan, search, matrix, cfg, proposal)
    result.stats["time_s"] = time.perf_counter() - start
    return result


def sage_options(w: np.ndarray, cfg: SageConfig, groups: tuple[int, ...], rhos: tuple[float, ...], seed: int = 0,
                 col_weight: np.ndarray | None = None, propose: bool = False, rows: int | None = None
                 ) -> tuple[list[Option], GroupChoice | None]:
    """Measure every (G, ρ) of the grid on one precomputation of W: weighted error and exact stored bytes of each
    (what a bit budget chooses from). For each G the band centres start at (weighted) quantiles at the lowest ρ
    and each next ρ starts from the previous ρ's centres. With propose=True the graph step (SPEC §2.2) also runs
    on the same precomputation and its GroupChoice is returned; else None.

    rows: measure on this many rows drawn at random (seeded), the errors scaled by N / rows. A budget only has to
    rank options, and the error of a matrix is a sum over its rows, so a quarter of them estimate it well at a
    quarter of the cost; the bytes are always the exact bytes of the whole matrix."""
    cfg.validate()
    if cfg.scale_mode != "groups":
        raise ValueError("options are measured for the exportable groups mode only")
    w = check_weight(w)
    n, k = w.shape
    col_weight = check_col_weight(col_weight, k)
    measured = w
    if rows is not None and rows < n:
        picks = np.sort(np.random.default_rng([seed, rows]).choice(n, rows, replace=False))
        measured = w[picks]
    scale = n / measured.shape[0]
    matrix = _Matrix(measured, cfg, seed, col_weight, _max_rho(cfg, *rhos))
    # ρ outer, G inner: every G at one ρ shares that ρ's salient fit, which is then dropped (holding all of them
    # would cost more memory than the matrix). Each G's band centres start from its own previous ρ.
    starts = {g: matrix.group_start(cfg.graph_rho, n_groups=g) for g in groups}
    measured_at: dict[tuple[int, float], Option] = {}
    for rho in sorted(rhos):
        for g in groups:
            plan = matrix.plan(rho, starts[g])
            nnz = int(round(rho * w.size)) if scale != 1 else plan.count
            measured_at[g, rho] = Option(g, float(rho), nnz, plan.error * scale,
                                         stored_bytes(n, k, g, nnz, cfg.row_multipliers))
            starts[g] = (None, plan.centres)
        matrix.forget_salient()
    options = [measured_at[g, rho] for g in groups for rho in sorted(rhos)]
    return options, (matrix.propose_groups(cfg.graph_rho) if propose else None)


def _stats(result: SageResult, plan: _Plan, search: SearchResult, matrix: _Matrix, cfg: SageConfig,
           proposal: GroupChoice | None) -> dict:
    residual = matrix.w - result.dequantize()
    recon = float(np.sum(residual * residual))
    norm = float(np.sum(matrix.w * matrix.w))
    choice = plan.choice or proposal
    silhouette = choice.silhouette if choice is not None else {}
    weighted = matrix.col_weight is not None
    extra = {}
    if weighted:
        norm_c = float(np.sum(matrix.col_weight[None, :] * matrix.w * matrix.w))
        # With row multipliers the plan priced every r_n = 1; build() refitted them, so measure what was built.
        error = plan.error if not cfg.row_multipliers else float(np.sum(matrix.col_weight * residual * residual))
        extra = {"weighted_error": error, "weighted_rel_error": error / norm_c if norm_c > 0 else 0.0}
    if choice is not None:
        extra["graph_groups"] = int(choice.n_groups)  # what the graph proposes, next to n_groups (what was used)
    return {
        "variant": "activation-aware" if weighted else "data-free",
        "scale_mode": cfg.scale_mode,
        "exportable": cfg.exportable,
        "threshold": cfg.threshold,
        "rho": plan.rho,
        "realised_rho": realised_fraction(plan.count, matrix.saliency.numel),
        "nnz": plan.count,
        "n_groups": 0 if result.per_row else int(result.group_scales.shape[0]),  # 0: per-row scales, no groups
        "silhouette": {str(k): float(v) for k, v in sorted(silhouette.items())},
        "brent_evals": [[r, e] for r, e in search.evals],  # (ρ, error + rho_price·bytes) per evaluation
        "n_evals": search.n_evals,
        "hit_bound": search.hit_bound,
        "recon_error": recon,
        "rel_error": recon / norm if norm > 0 else 0.0,
        "salient_bits": cfg.salient_bits,
        "rho_price": cfg.rho_price,
        # as packed, not as planned: fitted row multipliers that all come out 1.0 are not stored
        "stored_bytes": int(sum(t.nbytes for t in result.stored_tensors().values())),
        "graph_time_s": matrix.graph_time_s,
        **extra,
    }
