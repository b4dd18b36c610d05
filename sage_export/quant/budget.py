"""Spending a bit budget across the matrices of a model (SPEC §2.1): pick, for every matrix, one of its measured
options so that the model's true bits meet a target at the lowest total error.

Each matrix offers options, say (G, ρ), measured as (error, stored bytes). At a price λ per stored byte each
matrix takes the option minimising error + λ·bytes; the higher the price, the fewer bytes are bought. Total bytes
never rise with λ, so a bisection on λ finds the lowest price whose choices fit the budget. This is the
Lagrangian relaxation of the multiple-choice knapsack: whatever bytes its choices use, no other set of choices
uses as few at a lower total error. The price is kept: the per-matrix ρ search prices the bytes it adds with it.

Errors must be in one unit across matrices for this to mean anything (the pipeline weights every matrix's error
by its layer's measured sensitivity, so errors are estimates of the loss they cause).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Option:
    """One way to quantize one matrix, as measured: its settings, error and exact stored bytes."""

    n_groups: int
    rho: float
    nnz: int
    error: float
    nbytes: int


class BudgetError(ValueError):
    """The target cannot be met by any choice of the options offered."""


def cheapest(options: Sequence[Option], price: float) -> Option:
    """The option with the lowest error + price·bytes (fewer bytes, then fewer groups, on a tie)."""
    return min(options, key=lambda o: (o.error + price * o.nbytes, o.nbytes, o.n_groups, o.rho))


@dataclass(frozen=True)
class Allocation:
    price: float  # λ: error units per stored byte at which these choices were made
    choices: tuple[Option, ...]  # one per matrix, in the order of the tables
    n_weights: int

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.choices)

    @property
    def true_bits(self) -> float:
        return 8 * self.nbytes / self.n_weights

    @property
    def error(self) -> float:
        return sum(o.error for o in self.choices)


def allocate(tables: Sequence[Sequence[Option]], n_weights: int, target_bits: float,
             iterations: int = 200) -> Allocation:
    """Choices that use at most target_bits true bits per weight, at the lowest price that fits. When the
    unconstrained best (price 0) already fits, that is the answer. BudgetError when even the cheapest options
    of every matrix exceed the target."""
    if not tables or any(not t for t in tables):
        raise ValueError("every matrix needs at least one option")
    if not (n_weights > 0 and math.isfinite(target_bits) and target_bits > 0):
        raise ValueError(f"need n_weights > 0 and a positive target, got {n_weights}, {target_bits}")
    target_bytes = target_bits * n_weights / 8

    def at(price: float) -> Allocation:
        return Allocation(price, tuple(cheapest(t, price) for t in tables), n_weights)

    floor = sum(min(o.nbytes for o in t) for t in tables)
    if floor > target_bytes:
        raise BudgetError(f"a budget of {target_bits:g} bits per weight is below the smallest choice these "
                          f"options allow ({8 * floor / n_weights:.3f})")
    best = at(0.0)
    if best.nbytes <= target_bytes:
        return best
    # A starting price of the right order: the total error per byte of the budget; then widen until it fits.
    hi = max(best.error, 1e-300) / target_bytes
    while at(hi).nbytes > target_bytes:
        hi *= 4
    lo = 0.0
    for _ in range(iterations):
        mid = hi / 2 if lo == 0.0 else math.sqrt(lo * hi)
        if at(mid).nbytes > target_bytes:
            lo = mid
        else:
            hi = mid
        if lo > 0 and hi / lo < 1 + 1e-12:
            break
    return fill(at(hi), tables, target_bytes)


def fill(allocation: Allocation, tables: Sequence[Sequence[Option]], target_bytes: float) -> Allocation:
    """Spend what the price left unspent. The Lagrangian only reaches the lower convex hull of each table, so with
    few matrices its choices can stop well short of the budget; here, while some upgrade fits in the remaining
    bytes, the one removing the most error per added byte is taken."""
    choices = list(allocation.choices)
    slack = target_bytes - sum(o.nbytes for o in choices)
    while True:
        best, best_gain = None, 0.0
        for i, (table, current) in enumerate(zip(tables, choices)):
            for o in table:
                extra = o.nbytes - current.nbytes
                if 0 < extra <= slack and o.error < current.error:
                    gain = (current.error - o.error) / extra
                    if gain > best_gain:
                        best, best_gain = (i, o), gain
        if best is None:
            return Allocation(allocation.price, tuple(choices), allocation.n_weights)
        i, o = best
        slack -= o.nbytes - choices[i].nbytes
        choices[i] = o


def floored(tables: Sequence[Sequence[Option]], sizes: Sequence[int], min_bits: float) -> list[list[Option]]:
    """Each table without its options below min_bits true bits (weights of the matrix: sizes[i]). A table with no
    option that high keeps its largest one, so every matrix still has a choice."""
    out = []
    for table, size in zip(tables, sizes):
        kept = [o for o in table if 8 * o.nbytes >= min_bits * size]
        out.append(kept or [max(table, key=lambda o: (o.nbytes, -o.error))])
    return out


def neighbours(grid: Sequence[float], value: float) -> tuple[float, float]:
    """The grid points either side of a grid value (the value itself at either end): the bracket within which
    a finer search may move a choice made on the grid."""
    points = sorted(grid)
    i = points.index(value)
    return points[max(i - 1, 0)], points[min(i + 1, len(points) - 1)]
