"""BiLLM (Huang, Liu, Qin, Li, Zhang, Liu, Magno, Qi: "BiLLM: Pushing the Limit of Post-Training Quantization for
LLMs", ICML 2024), written from the paper's description. docs/baselines.md lists where this reading had to choose.

Per block of `blocksize` input columns (the GPTQ block), on the block's weights after compensation by earlier blocks:

1. Structural salient columns. Column saliency s_j = Σ_i w_ij² / d_j², with d_j the diagonal of the upper Cholesky
   factor of H⁻¹ (d_j² is the OBS inverse-Hessian diagonal GPTQ uses at that column; the paper writes [H⁻¹]_jj).
   The c most salient columns are salient; c is searched in 1..MAX_SALIENT_COLUMNS to minimise the block's
   binarization error ‖W_b − Ŵ_b‖_F² (jointly with the break point of step 3, so the search sees the quantizer
   that is really used).
2. Salient weights: residual binarization per row, ŵ = α1·sign(w) + α2·sign(w − α1·sign(w)), α = mean |·|.
3. Non-salient weights: a break point p splits them into a concentrated band |w| ≤ p and a sparse band |w| > p;
   each band is binarized with its own per-row α (mean |w| of the band in that row). p is searched over a grid
   of quantiles of the block's |w|.
4. The block's columns are then quantized one by one with GPTQ compensation (gptq.py): the salient columns, p and
   the α's stay fixed for the block; each column's signs and band bits are chosen on its compensated weights.

Stored tensors (every bit needed to decode):
    sign_bits           int8 [N, ceil(K/8)]    sign of every weight (first binarization)
    residual_bits       int8 [N, ceil(S/8)]    sign of the residual, salient columns only (S of them, in order)
    split_bits          int8 [N, ceil((K−S)/8)] band of each non-salient weight (1 = sparse), non-salient columns only
    salient_columns     int8 [ceil(K/8)]       1 bit per column: salient or not
    alpha_salient1/2, alpha_concentrated, alpha_sparse   float16 [N, ceil(K / blocksize)]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..format.bits import pack_bits, unpack_bits
from .gptq import ColumnQuantizer, gptq_compensate
from .common import check_hessian, check_weight, error_stats, hessian_error, to_float16
from .xnor import signs_from_bits

SALIENT_METRICS = ("hessian", "magnitude")
# Upper end of the salient-column count search per block (the authors' released setting).
MAX_SALIENT_COLUMNS = 50
# Break-point candidates: these quantiles of the block's |w| (the authors' released search range).
BREAKPOINT_QUANTILES = np.linspace(0.10, 0.90, 81)
ALPHA_NAMES = ("alpha_salient1", "alpha_salient2", "alpha_concentrated", "alpha_sparse")


def column_saliency(block_w: np.ndarray, hinv_diag: np.ndarray, metric: str) -> np.ndarray:
    """Saliency of each column of a block [N, B]: Σ_i w² / d² ("hessian") or Σ_i |w| ("magnitude")."""
    if metric == "hessian":
        return np.sum(block_w**2, axis=0) / hinv_diag**2
    return np.sum(np.abs(block_w), axis=0)


def _residual_binarization_error(a: np.ndarray) -> float:
    """‖w − ŵ‖² of residual binarization per row, from a = |w| [N, c] (the error depends on |w| only)."""
    r = np.abs(a - a.mean(axis=1, keepdims=True))
    return float(np.sum((r - r.mean(axis=1, keepdims=True)) ** 2))


def _band_error(s1: np.ndarray, s2: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Σ over rows (last axis) of the binarization error of a band with Σ|w| = s1, Σw² = s2, n members: s2 − s1²/n."""
    return np.sum(np.where(n > 0, s2 - s1**2 / np.maximum(n, 1), 0.0), axis=-1)


def _tail_sums(v: np.ndarray, c_max: int) -> np.ndarray:
    """[c_max, N] from v [B, N]: entry (c−1, i) is Σ_{j ≥ c} v[j, i], for c = 1..c_max."""
    return v.sum(axis=0) - np.cumsum(v[:c_max], axis=0)


def search_block(a_sorted: np.ndarray, break_points: np.ndarray) -> tuple[int, float]:
    """(salient column count c, break point p) minimising the block's binarization error.

    a_sorted = |W_b| [N, B] with columns sorted by decreasing saliency, so the salient set for c is the first c
    columns. Ties go to the smallest c, then the smallest p."""
    c_max = min(MAX_SALIENT_COLUMNS, a_sorted.shape[1])
    salient = np.array([_residual_binarization_error(a_sorted[:, :c]) for c in range(1, c_max + 1)])
    a_t = np.ascontiguousarray(a_sorted.T)  # [B, N]: the sums below run over columns, contiguous this way
    s1_all, s2_all = _tail_sums(a_t, c_max), _tail_sums(a_t**2, c_max)
    n_all = a_t.shape[0] - np.arange(1, c_max + 1)[:, None]
    errors = np.empty((c_max, len(break_points)))
    for pi, p in enumerate(break_points):
        band = a_t <= p
        n_c = _tail_sums(band.astype(np.float64), c_max)
        s1_c, s2_c = _tail_sums(a_t * band, c_max), _tail_sums(a_t**2 * band, c_max)
        errors[:, pi] = salient + _band_error(s1_c, s2_c, n_c) + _band_error(s1_all - s1_c, s2_all - s2_c, n_all - n_c)
    ci, pi = np.unravel_index(np.argmin(errors), errors.shape)
    return int(ci) + 1, float(break_points[pi])


def _band_means(a: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Per-row mean of a over members; NaN for a row with no member."""
    count = members.sum(axis=1)
    total = np.sum(np.where(members, a, 0.0), axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass(frozen=True)
class BlockPlan:
    """What BiLLM decides once per block: which columns are salient, the break point and the per-row scales
    (float16, held as float32 for decoding arithmetic)."""

    salient: np.ndarray  # bool [B]
    break_point: float
    alphas: dict[str, np.ndarray]  # ALPHA_NAMES -> float16 [N]

    def quantize_column(self, i: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sign bit, second bit, decoded float32) for column i of the block with current weights w [N]. The second
        bit is the residual sign for a salient column and the band (1 = sparse) otherwise."""
        sign = w >= 0
        s = signs_from_bits(sign)
        a = {name: v.astype(np.float32) for name, v in self.alphas.items()}
        if self.salient[i]:
            first = a["alpha_salient1"] * s
            second = (w - first) >= 0
            return sign, second, first + a["alpha_salient2"] * signs_from_bits(second)
        second = np.abs(w) > self.break_point
        return sign, second, np.where(second, a["alpha_sparse"], a["alpha_concentrated"]) * s


def plan_block(block_w: np.ndarray, hinv_diag: np.ndarray, metric: str) -> BlockPlan:
    """Steps 1–3 of the module docstring on one block [N, B]."""
    a = np.abs(block_w)
    order = np.argsort(-column_saliency(block_w, hinv_diag, metric), kind="stable")
    c, p = search_block(a[:, order], np.quantile(a, BREAKPOINT_QUANTILES))
    salient = np.zeros(a.shape[1], dtype=bool)
    salient[order[:c]] = True

    a_sal, a_rest = a[:, salient], a[:, ~salient]
    alpha1 = to_float16(a_sal.mean(axis=1))
    alpha2 = to_float16(np.abs(a_sal - alpha1.astype(np.float64)[:, None]).mean(axis=1))
    concentrated = _band_means(a_rest, a_rest <= p)
    sparse = _band_means(a_rest, a_rest > p)
    # A band empty in a row borrows the other band's scale, so that a weight compensation later moves across p
    # still decodes to a sensible magnitude instead of 0 (both empty: no non-salient columns, any value works).
    concentrated, sparse = (np.where(np.isnan(concentrated), sparse, concentrated),
                            np.where(np.isnan(sparse), concentrated, sparse))
    alphas = dict(zip(ALPHA_NAMES, (alpha1, alpha2, to_float16(np.nan_to_num(concentrated)),
                                    to_float16(np.nan_to_num(sparse)))))
    return BlockPlan(salient, p, alphas)


class BlockBinarizer:
    """BiLLM as a gptq_compensate callback: plans each block at its start, then binarizes column by column,
    recording every bit and scale it stores."""

    def __init__(self, n: int, k: int, blocksize: int, metric: str):
        self.blocksize, self.metric = blocksize, metric
        n_blocks = -(-k // blocksize)
        self.signs = np.zeros((n, k), dtype=bool)
        self.second = np.zeros((n, k), dtype=bool)
        self.salient = np.zeros(k, dtype=bool)
        self.alphas = {name: np.zeros((n, n_blocks), dtype=np.float16) for name in ALPHA_NAMES}
        self.break_points: list[float] = []

    def __call__(self, block_w: np.ndarray, hinv_diag: np.ndarray, cols: np.ndarray) -> ColumnQuantizer:
        plan = plan_block(block_w, hinv_diag, self.metric)
        b = int(cols[0]) // self.blocksize
        self.salient[cols] = plan.salient
        self.break_points.append(plan.break_point)
        for name, values in plan.alphas.items():
            self.alphas[name][:, b] = values

        def quantize_column(i: int, block_now: np.ndarray) -> np.ndarray:
            sign, second, q = plan.quantize_column(i, block_now[:, i])
            self.signs[:, cols[i]], self.second[:, cols[i]] = sign, second
            return q

        return quantize_column

    def stored_tensors(self) -> dict[str, np.ndarray]:
        return {
            "sign_bits": pack_bits(self.signs),
            "residual_bits": pack_bits(self.second[:, self.salient]),
            "split_bits": pack_bits(self.second[:, ~self.salient]),
            "salient_columns": pack_bits(self.salient),
            **self.alphas,
        }


def decode_billm(tensors: dict[str, np.ndarray], n: int, k: int, blocksize: int) -> np.ndarray:
    """float32 [N, K] from BiLLM's stored tensors."""
    salient = unpack_bits(tensors["salient_columns"], k)
    sal_cols, rest_cols = np.flatnonzero(salient), np.flatnonzero(~salient)
    signs = signs_from_bits(unpack_bits(tensors["sign_bits"], k))
    block_of = np.arange(k) // blocksize
    alpha = {name: tensors[name].astype(np.float32) for name in ALPHA_NAMES}
    out = np.empty((n, k), dtype=np.float32)

    residual = signs_from_bits(unpack_bits(tensors["residual_bits"], len(sal_cols)))
    blocks = block_of[sal_cols]
    out[:, sal_cols] = (alpha["alpha_salient1"][:, blocks] * signs[:, sal_cols]
                        + alpha["alpha_salient2"][:, blocks] * residual)

    sparse = unpack_bits(tensors["split_bits"], len(rest_cols))
    blocks = block_of[rest_cols]
    scale = np.where(sparse, alpha["alpha_sparse"][:, blocks], alpha["alpha_concentrated"][:, blocks])
    out[:, rest_cols] = scale * signs[:, rest_cols]
    return out


@dataclass(frozen=True)
class BillmResult:
    shape: tuple[int, int]
    blocksize: int
    tensors: dict[str, np.ndarray] = field(repr=False)
    stats: dict[str, Any] = field(default_factory=dict)
    method: str = "billm"

    def stored_tensors(self) -> dict[str, np.ndarray]:
        return dict(self.tensors)

    def dequantize(self) -> np.ndarray:
        return decode_billm(self.tensors, *self.shape, self.blocksize)

    def salient_fraction(self) -> float:
        return float(unpack_bits(self.tensors["salient_columns"], self.shape[1]).mean())

    def paper_bits(self) -> dict[str, float]:
        # BiLLM's parameter bit-width: 2 bits for a salient weight, 1 for the rest; its headline figure counts
        # no scales (and no band bits), so scale_bits is 0 here. The true cost is stored_tensors().
        return {"weight_bits": 1.0 + self.salient_fraction(), "scale_bits": 0.0}


def quantize_billm(w: np.ndarray, h: np.ndarray, blocksize: int = 128, percdamp: float = 0.01,
                   salient_metric: str = "hessian") -> BillmResult:
    start = time.perf_counter()
    if salient_metric not in SALIENT_METRICS:
        raise ValueError(f"salient_metric must be one of {SALIENT_METRICS}, got {salient_metric!r}")
    w = check_weight(w)
    h = check_hessian(h, w.shape[1])
    binarizer = BlockBinarizer(*w.shape, blocksize, salient_metric)
    gptq_compensate(w, h, binarizer, blocksize=blocksize, percdamp=percdamp)
    result = BillmResult(tuple(w.shape), blocksize, binarizer.stored_tensors())
    w_hat = result.dequantize()
    per_block = np.add.reduceat(binarizer.salient.astype(int), np.arange(0, w.shape[1], blocksize))
    stats = {
        "time_s": time.perf_counter() - start,
        **error_stats(w, w_hat),
        "hessian_error": hessian_error(w, w_hat, h),
        "blocksize": blocksize,
        "percdamp": percdamp,
        "salient_metric": salient_metric,
        "salient_fraction": result.salient_fraction(),
        "salient_columns_per_block": [int(c) for c in per_block],
        "break_points": [float(p) for p in binarizer.break_points],
        # The paper's separate storage figure: 1 band-marker bit per weight + 1 column-marker bit per block column.
        "paper_storing_bits": 1.0 + 1.0 / blocksize,
    }
    return BillmResult(result.shape, blocksize, result.tensors, stats)
