"""Adaptive saliency threshold (SPEC §2.4): bounded Brent search of ρ, recording every evaluation.

If the error keeps falling towards one end of the interval, the best ρ lies outside it; the search then ends
next to that bound and says so (`hit_bound`), rather than pretending it found an interior optimum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from scipy.optimize import minimize_scalar


@dataclass(frozen=True)
class SearchResult:
    x: float
    value: float
    evals: list[tuple[float, float]]  # every (x, f(x)) in evaluation order
    hit_bound: str | None  # "lower" / "upper" when x ended within xatol of that bound, else None

    @property
    def n_evals(self) -> int:
        return len(self.evals)


def brent_search(f: Callable[[float], float], bounds: tuple[float, float], xatol: float,
                 maxiter: int, also: tuple[float, ...] = ()) -> SearchResult:
    """Minimise f over [lo, hi] with scipy's bounded Brent method; the result is the best point evaluated.
    Points in `also` are evaluated first and compete too (a known good point the search must not lose)."""
    lo, hi = bounds
    evals: list[tuple[float, float]] = []

    def recorded(x: float) -> float:
        value = float(f(float(x)))
        evals.append((float(x), value))
        return value

    for x in also:
        recorded(x)
    minimize_scalar(recorded, bounds=(lo, hi), method="bounded", options={"xatol": xatol, "maxiter": maxiter})
    x, value = min(evals, key=lambda e: e[1])
    return SearchResult(x, value, evals, bound_hit(x, bounds, xatol))


def bound_hit(x: float, bounds: tuple[float, float], xatol: float) -> str | None:
    lo, hi = bounds
    if x - lo <= xatol:
        return "lower"
    if hi - x <= xatol:
        return "upper"
    return None
