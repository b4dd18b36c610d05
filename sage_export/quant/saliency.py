"""Saliency filter (SPEC §2.1): the entries of W farthest from its mean are kept at higher precision.

Activation-aware (SPEC §2.1 beyond the literal reading), the score is |W − μ|·√h_k: an entry matters as much as
the error it would cause, and an error in input channel k costs h_k = E[x_k²] times its square.

The search over ρ evaluates many salient sets of one matrix. Every one of them is a prefix of the same ordering
(entries by descending score), so the matrix is sorted once and a salient set is then just a count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from .config import THRESHOLDS


@dataclass(frozen=True, eq=False)
class SaliencyOrder:
    """Entries of one matrix ordered by descending |W − μ| (times √h_k when column weights are given); ties keep
    a fixed (sort-determined) order."""

    shape: tuple[int, int]
    mean: float
    std: float
    order: np.ndarray  # int64 [N*K]: flat indices, most salient first
    deviations: np.ndarray  # float64: the scores of the sorted entries in order (all N*K, or the top+1 with `top`)

    sorted_count: int | None = None  # only this many leading entries are in order (None: all)

    @classmethod
    def from_matrix(cls, w: np.ndarray, col_weight: np.ndarray | None = None, top: int | None = None) -> SaliencyOrder:
        """With `top`, only the `top` most salient entries are sorted (the rest follow in a fixed, unsorted
        order): enough for every ρ up to top/numel, at a fraction of the cost of a full sort."""
        w = np.asarray(w, dtype=np.float64)
        flat = w.ravel()
        mean = float(flat.mean())
        centred = w - mean
        if col_weight is not None:
            centred = centred * np.sqrt(np.asarray(col_weight, dtype=np.float64))[None, :]
        centred = centred.ravel()
        # σ of the score's signed values, so the Gaussian threshold reads the weighted deviations the same way.
        std = float(flat.std()) if col_weight is None else float(centred.std())
        dev = np.abs(centred)
        if top is not None and top < dev.size:
            head = np.argpartition(-dev, top)[: top + 1]  # the top+1 largest, unordered
            head = head[np.argsort(dev[head])[::-1]]
            unsorted = np.ones(dev.size, dtype=bool)  # the rest, in index order (setdiff1d's order, less memory)
            unsorted[head] = False
            order = np.concatenate([head, np.flatnonzero(unsorted)])
            return cls(tuple(w.shape), mean, std, order, dev[head], top)
        order = np.argsort(dev)[::-1].copy()  # one O(n log n) sort serves every ρ of the search
        return cls(tuple(w.shape), mean, std, order, dev[order])

    @property
    def numel(self) -> int:
        return int(self.order.shape[0])

    def count(self, rho: float, threshold: str = "quantile") -> int:
        """Number of salient entries at ratio ρ: round(ρ·numel) for "quantile" (so the realised fraction is
        within 1/(2·numel) of ρ), the entries with |W − μ| > Φ⁻¹(1 − ρ/2)·σ for "gaussian"."""
        if threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {threshold!r}")
        if not 0 <= rho <= 1:
            raise ValueError(f"rho must be in [0, 1], got {rho}")
        if threshold == "quantile":
            count = int(round(rho * self.numel))
            if self.sorted_count is not None and count > self.sorted_count:
                raise ValueError(f"rho {rho} needs {count} salient entries; only {self.sorted_count} are sorted")
            return count
        if self.sorted_count is not None:
            raise ValueError("the gaussian threshold needs the fully sorted order")
        tau = gaussian_threshold(rho, self.std)
        # deviations fall, so the entries above tau are a prefix; search the negated (rising) array.
        return int(np.searchsorted(-self.deviations, -tau, side="left"))

    def mask(self, count: int) -> np.ndarray:
        """bool [N, K]: True on the `count` most salient entries."""
        flat = np.zeros(self.numel, dtype=bool)
        flat[self.order[:count]] = True
        return flat.reshape(self.shape)


def gaussian_threshold(rho: float, std: float) -> float:
    """τ with P(|X − μ| > τ) = ρ for X ~ N(μ, σ²)."""
    if rho <= 0:
        return float("inf")
    return float(norm.ppf(1 - rho / 2) * std)


def realised_fraction(count: int, numel: int) -> float:
    return count / numel if numel else 0.0
