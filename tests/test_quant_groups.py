"""Graph-guided group count and magnitude bands, including the Q4_1 case of many exact duplicates."""

import numpy as np
import pytest
from sklearn.metrics import silhouette_score

from sage_export.quant.groups import (MagnitudeTable, assign_bands, band_centres, band_edges, choose_group_count,
                                      graph_sample_size, knn_graph, quantile_centres, silhouette_1d)

CANDIDATES = (2, 3, 4, 5, 6, 7, 8)


def three_bands(rng: np.random.Generator, n: int = 3000) -> np.ndarray:
    centres = np.array([0.01, 0.05, 0.1])
    return np.abs(rng.choice(centres, n) + rng.normal(0, 0.001, n))


def choose(mags: np.ndarray, seed: int = 0):
    return choose_group_count(mags, CANDIDATES, knn_k=10, kmeans_n_init=10, seed=seed)


def test_three_well_separated_bands_give_three_groups():
    choice = choose(three_bands(np.random.default_rng(0)))
    assert choice.n_groups == 3
    np.testing.assert_allclose(choice.centres, [0.01, 0.05, 0.1], atol=2e-4)
    assert max(choice.silhouette, key=choice.silhouette.get) == 3
    assert choice.silhouette[3] > 0.9


def test_heavy_duplicates_are_deterministic():
    """Q4_1-like: 5000 samples drawn from 40 distinct magnitudes (zero distances everywhere, ties in the kNN)."""
    rng = np.random.default_rng(1)
    levels = np.sort(np.abs(rng.normal(0, 0.02, 40)))
    mags = rng.choice(levels, 5000)
    first, second = choose(mags, seed=7), choose(mags, seed=7)
    assert first.n_distinct == 40 and first.n_samples == 5000
    assert 2 <= first.n_groups <= 8
    assert first.n_groups == second.n_groups and first.silhouette == second.silhouette
    np.testing.assert_array_equal(first.centres, second.centres)


def test_multiplicity_is_what_matters_not_the_sample_order():
    rng = np.random.default_rng(2)
    mags = rng.choice(np.array([0.01, 0.011, 0.05, 0.052, 0.1]), 2000)
    a, b = choose(mags), choose(rng.permutation(mags))
    assert a.n_groups == b.n_groups
    np.testing.assert_array_equal(a.centres, b.centres)


def test_all_equal_values_give_one_group():
    choice = choose(np.full(1000, 0.02))
    assert choice.n_groups == 1 and choice.silhouette == {}
    np.testing.assert_allclose(choice.centres, [0.02])


def test_fewer_distinct_values_than_candidates():
    mags = np.repeat([0.01, 0.03, 0.09], 50)
    choice = choose(mags)
    assert set(choice.silhouette) == {2, 3}  # K > 3 distinct values cannot be scored
    assert choice.n_groups == 3 and choice.silhouette[3] == pytest.approx(1.0)
    np.testing.assert_allclose(choice.centres, [0.01, 0.03, 0.09])


def test_two_samples_and_tiny_inputs():
    assert choose(np.array([0.01, 0.02])).n_groups == 1  # 2 clusters of 2 points: silhouette undefined
    assert choose(np.array([0.01])).n_groups == 1
    assert choose(np.array([0.01, 0.02, 0.02, 0.5])).n_groups >= 1


def test_knn_graph_is_symmetric_without_self_loops():
    a = knn_graph(np.linspace(0, 1, 50), 4)
    assert (a != a.T).nnz == 0
    assert a.diagonal().sum() == 0
    assert knn_graph(np.array([0.0, 1.0, 2.0]), 10).shape == (3, 3)  # k capped at n - 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_silhouette_1d_equals_sklearn_on_the_expanded_data(seed):
    rng = np.random.default_rng(seed)
    values = np.unique(np.round(np.abs(rng.normal(0, 1, 60)), 2))
    weights = rng.integers(1, 4, values.size)
    labels = rng.integers(0, 3, values.size)
    labels[:3] = [0, 1, 2]
    expanded_x, expanded_l = np.repeat(values, weights), np.repeat(labels, weights)
    expected = silhouette_score(expanded_x[:, None], expanded_l)
    assert silhouette_1d(values, labels, weights) == pytest.approx(expected, abs=1e-12)


def test_silhouette_1d_singleton_clusters_and_undefined_cases():
    x = np.array([0.0, 0.1, 0.2, 5.0])
    assert silhouette_1d(x, np.array([0, 0, 0, 1])) == pytest.approx(silhouette_score(x[:, None], [0, 0, 0, 1]))
    assert silhouette_1d(x, np.zeros(4, dtype=int)) is None
    assert silhouette_1d(x, np.arange(4)) is None


def test_graph_sample_size():
    assert graph_sample_size(884_736, 800_000, 5000, 0.0003) == 5000
    assert graph_sample_size(100_000_000, 90_000_000, 5000, 0.0003) == 30_000
    assert graph_sample_size(1000, 900, 5000, 0.0003) == 900


def test_band_sums_match_brute_force():
    rng = np.random.default_rng(3)
    mags = np.abs(rng.normal(0, 1, 500))
    mags[:50] = 0.5  # values exactly on an edge join the upper band
    edges = np.array([0.2, 0.5, 1.1])
    sums = MagnitudeTable(mags).band_sums(edges)
    band = assign_bands(mags, np.array([0.1, 0.3, 0.7, 1.5]))
    assert band_edges(np.array([0.1, 0.3, 0.7, 1.5])) == pytest.approx(edges)
    for g in range(4):
        sel = mags[band == g]
        assert sums.count[g] == sel.size
        assert sums.sum1[g] == pytest.approx(sel.sum())
        assert sums.sum2[g] == pytest.approx((sel ** 2).sum())
    assert np.all(band[:50] == 2)


def brute_lloyd(mags: np.ndarray, centres: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        nearest = np.abs(mags[:, None] - centres[None, :]).argmin(axis=1)
        centres = np.sort([mags[nearest == g].mean() if np.any(nearest == g) else centres[g]
                           for g in range(centres.size)])
    return centres


def test_band_centres_is_lloyd():
    rng = np.random.default_rng(4)
    mags = np.abs(rng.normal(0, 1, 2000))
    init = np.array([0.05, 0.2, 0.9, 2.0])
    np.testing.assert_allclose(band_centres(mags, 4, 6, init=init), brute_lloyd(mags, init, 6), rtol=1e-12)
    np.testing.assert_allclose(band_centres(mags, 4, 0, init=init), init)


def test_band_centres_default_init_and_assign_bands_is_nearest():
    rng = np.random.default_rng(5)
    mags = np.abs(rng.normal(0, 1, 1000))
    centres = band_centres(mags, 3, 5)
    assert np.all(np.diff(centres) > 0)
    nearest = np.abs(mags[:, None] - centres[None, :]).argmin(axis=1)
    np.testing.assert_array_equal(assign_bands(mags, centres), nearest)
    np.testing.assert_allclose(quantile_centres(np.arange(10.0), 2), [2.25, 6.75])
    with pytest.raises(ValueError, match="centres"):
        band_centres(mags, 3, 5, init=np.array([0.1, 0.2]))
