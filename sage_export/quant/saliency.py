"""Saliency filter (SPEC §2.1): the entries of W farthest from its mean are kept at higher precision.

The search over ρ evaluates many salient sets of one matrix. Every one of them is a prefix of the same ordering
(entries by descending |W − μ|), so the matrix is sorted once and a salient set is then just a count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from .config import THRESHOLDS


@dataclass(frozen=True, eq=False)
class SaliencyOrder:
    """Entries of one matrix ordered by descending |W − μ|; ties keep a fixed (sort-determined) order."""

    shape: tuple[int, int]
    mean: float
    std: float
    order: np.ndarray  # int64 [N*K]: flat indices, most salient first
    deviations: np.ndarray  # float64 [N*K]: |W − μ| in that order (non-increasing)

    @classmethod
    def from_matrix(cls, w: np.ndarray) -> SaliencyOrder:
        flat = np.asarray(w, dtype=np.float64).ravel()
        mean, std = float(flat.mean()), float(flat.std())
        dev = np.abs(flat - mean)
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
            return int(round(rho * self.numel))
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
