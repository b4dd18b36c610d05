"""Saliency filter: the salient set is the ρ fraction of entries farthest from the mean."""

import numpy as np
import pytest

from sage_export.quant.saliency import SaliencyOrder, gaussian_threshold, realised_fraction


def matrix(seed: int = 0, n: int = 37, k: int = 53) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k)) * 0.02 + 0.003


@pytest.mark.parametrize("rho", [0.0, 0.001, 0.013, 0.05, 0.0999, 0.5])
def test_quantile_realised_fraction_within_one_entry(rho):
    s = SaliencyOrder.from_matrix(matrix())
    count = s.count(rho)
    assert abs(realised_fraction(count, s.numel) - rho) <= 1 / s.numel
    assert s.mask(count).sum() == count


def test_salient_set_is_the_largest_deviations():
    w = matrix(1)
    s = SaliencyOrder.from_matrix(w)
    mask = s.mask(s.count(0.07))
    dev = np.abs(w - w.mean())
    assert dev[mask].min() >= dev[~mask].max()
    assert s.mean == pytest.approx(w.mean()) and s.std == pytest.approx(w.std())


def test_deviations_are_sorted_and_match_the_order():
    w = matrix(2)
    s = SaliencyOrder.from_matrix(w)
    assert np.all(np.diff(s.deviations) <= 0)
    np.testing.assert_array_equal(s.deviations, np.abs(w.ravel() - w.mean())[s.order])


def test_gaussian_threshold_counts_entries_beyond_tau():
    w = matrix(3, 200, 300)
    s = SaliencyOrder.from_matrix(w)
    for rho in (0.01, 0.05, 0.1):
        tau = gaussian_threshold(rho, w.std())
        assert s.count(rho, "gaussian") == np.count_nonzero(np.abs(w - w.mean()) > tau)
        # On Gaussian data the realised fraction is close to ρ (not exact, unlike the quantile rule).
        assert realised_fraction(s.count(rho, "gaussian"), s.numel) == pytest.approx(rho, rel=0.15)


def test_gaussian_threshold_known_value():
    assert gaussian_threshold(0.05, 2.0) == pytest.approx(1.959964 * 2.0, rel=1e-6)
    assert gaussian_threshold(0.0, 1.0) == float("inf")


def test_ties_give_a_fixed_mask():
    w = np.repeat(np.array([[0.1, -0.1, 0.0, 0.2]]), 8, axis=0)
    masks = [SaliencyOrder.from_matrix(w).mask(5) for _ in range(3)]
    assert masks[0].sum() == 5
    assert all(np.array_equal(masks[0], m) for m in masks)


def test_bad_arguments():
    s = SaliencyOrder.from_matrix(matrix())
    with pytest.raises(ValueError, match="threshold"):
        s.count(0.1, "median")
    with pytest.raises(ValueError, match="rho"):
        s.count(1.5)
