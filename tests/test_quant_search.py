"""Bounded Brent search of ρ: finds interior minima, flags a search that ends on a bound."""

import pytest

from sage_export.quant.search import bound_hit, brent_search

BOUNDS = (0.001, 0.10)


def test_finds_the_minimum_of_a_unimodal_curve():
    res = brent_search(lambda r: (r - 0.03) ** 2, BOUNDS, xatol=1e-4, maxiter=50)
    assert res.x == pytest.approx(0.03, abs=1e-4)
    assert res.hit_bound is None
    assert res.n_evals == len(res.evals) >= 3
    assert res.value == min(v for _, v in res.evals)
    assert all(BOUNDS[0] <= x <= BOUNDS[1] for x, _ in res.evals)
    assert (res.x, res.value) in res.evals


def test_monotone_curves_hit_a_bound():
    falling = brent_search(lambda r: -r, BOUNDS, xatol=1e-4, maxiter=50)
    assert falling.hit_bound == "upper" and falling.x == pytest.approx(BOUNDS[1], abs=1e-4)
    rising = brent_search(lambda r: r, BOUNDS, xatol=1e-4, maxiter=50)
    assert rising.hit_bound == "lower" and rising.x == pytest.approx(BOUNDS[0], abs=1e-4)


def test_maxiter_limits_the_evaluations():
    res = brent_search(lambda r: (r - 0.0314159) ** 2, BOUNDS, xatol=1e-9, maxiter=5)
    assert res.n_evals <= 6


def test_bound_hit():
    assert bound_hit(0.0010, BOUNDS, 1e-4) == "lower"
    assert bound_hit(0.09995, BOUNDS, 1e-4) == "upper"
    assert bound_hit(0.05, BOUNDS, 1e-4) is None
