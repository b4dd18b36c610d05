"""Graph-guided group count and magnitude bands (SPEC §2.2).

The unsalient weights are binarised as α_g·sign(w), with one α per group; groups are bands of |w|. How many bands
(G) is read off a sample of |w| values: a symmetric kNN graph (distance-weighted, see knn_graph), spectral
clustering for each candidate K, and the K whose clustering has the best silhouette. The bands are then refined
on the whole unsalient set by 1-D Lloyd steps.

Quantized source weights (SPEC §6: a Q4_1 GGUF) make exact duplicate magnitudes common. The graph is therefore
built on the distinct values, each carrying its multiplicity as a k-means sample weight and a silhouette weight.
That is exactly clustering the full sample (equal values always share a cluster), but it never asks the kNN search
to rank a crowd of zero distances, and fewer distinct values than K simply rules that K out.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import sparse
from scipy.linalg import eigh
from scipy.sparse.csgraph import laplacian
from scipy.sparse.linalg import eigsh
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import kneighbors_graph
from threadpoolctl import threadpool_limits

# Up to this many graph nodes the eigenproblem is solved densely: exact, and ARPACK needs more nodes than vectors.
_DENSE_EIGEN_NODES = 300


@dataclass(frozen=True)
class GroupChoice:
    n_groups: int
    centres: np.ndarray  # float64 [G], ascending: mean |w| of each cluster of the chosen clustering
    silhouette: dict[int, float]  # candidate K -> silhouette score; K that could not be scored are absent
    n_samples: int
    n_distinct: int


def graph_sample_size(numel: int, population: int, samples: int, min_fraction: float) -> int:
    """max(samples, ceil(min_fraction·numel)), capped at the number of values there are to draw from."""
    return min(population, max(samples, math.ceil(min_fraction * numel)))


def choose_group_count(mags: np.ndarray, candidates: tuple[int, ...], knn_k: int, kmeans_n_init: int,
                       seed: int) -> GroupChoice:
    """Spectral clustering of a 1-D sample of |w| for each candidate K; keep the K with the best silhouette
    (the smallest such K on a tie). Fewer than two distinct values -> G = 1."""
    mags = np.asarray(mags, dtype=np.float64).ravel()
    values, counts = np.unique(mags, return_counts=True)
    # A K is scorable only with at most one cluster per distinct value and fewer clusters than samples.
    ks = sorted(k for k in set(candidates) if k <= values.size and k < mags.size)
    if not ks:
        centre = np.array([mags.mean() if mags.size else 0.0])
        return GroupChoice(1, centre, {}, int(mags.size), int(values.size))

    kmeans_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    # One thread: results must not depend on the core count, and OpenMP spinning on a busy 2-core machine
    # costs far more than it gains on a few thousand points.
    with threadpool_limits(1), warnings.catch_warnings():
        # Duplicate embedding rows can leave k-means with fewer distinct clusters than asked; handled below.
        warnings.simplefilter("ignore", ConvergenceWarning)
        embedding = spectral_embedding(knn_graph(values, knn_k), max(ks), seed)  # values: sorted, distinct
        labellings = {k: KMeans(k, n_init=kmeans_n_init, random_state=kmeans_seed)
                      .fit(embedding[:, :k], sample_weight=counts).labels_ for k in ks}

    scores = {k: silhouette_1d(values, labels, counts) for k, labels in labellings.items()}
    scores = {k: s for k, s in scores.items() if s is not None}
    if not scores:
        return GroupChoice(1, np.array([mags.mean()]), {}, int(mags.size), int(values.size))
    best = max(scores, key=lambda k: (scores[k], -k))
    centres = cluster_means(values, labellings[best], counts)
    return GroupChoice(int(centres.size), centres, scores, int(mags.size), int(values.size))


def knn_graph(values: np.ndarray, k: int) -> sparse.csr_matrix:
    """Symmetric kNN graph of sorted distinct 1-D values, with self-tuning Gaussian weights
    exp(−d²/(σ_i·σ_j)), σ_i = distance from i to its k-th neighbour, plus an edge between every two consecutive
    values.

    Why not plain 0/1 kNN connectivity: in 1-D a run of ≥ k points whose outer gaps exceed their own spread
    forms its own connected component, and among thousands of samples such random gaps occur a few times even
    inside one dense band. Each extra component adds a zero eigenvalue, the first K eigenvectors become an
    arbitrary mix of component indicators, and G ends up decided by noise. The consecutive-value edges keep the
    graph connected wherever the values are, and the distance weights let a real gap (far wider than the local
    spacing σ) still cut it: its weight underflows to 0, while a random gap a few spacings wide keeps a weight
    of order one."""
    k = min(k, values.size - 1)
    distances = kneighbors_graph(values[:, None], n_neighbors=k, mode="distance", include_self=False)
    sigma = distances.max(axis=1).toarray().ravel()
    chain = sparse.diags(np.diff(values), offsets=1, shape=distances.shape, format="csr")
    distances = distances.maximum(chain)
    distances = distances.maximum(distances.T).tocoo()
    rows, cols, d = distances.row, distances.col, distances.data
    weights = np.exp(-(d * d) / (sigma[rows] * sigma[cols]))
    return sparse.csr_matrix((weights, (rows, cols)), shape=distances.shape)


def spectral_embedding(adjacency, n_components: int, seed: int) -> np.ndarray:
    """[n, n_components] rows: the n_components smallest eigenvectors of the normalised Laplacian mapped back
    by D^(-1/2) (random-walk eigenvectors), with a fixed sign per column so reruns agree. Computed once and
    shared by every K: clustering into K uses the first K columns."""
    lap, sqrt_degree = laplacian(adjacency, normed=True, return_diag=True)
    n = lap.shape[0]
    n_components = min(n_components, n)
    if n <= _DENSE_EIGEN_NODES:
        _, vectors = eigh(lap.toarray(), subset_by_index=[0, n_components - 1])
    else:
        v0 = np.random.default_rng(seed).uniform(-1, 1, n)  # ARPACK's start vector, seeded for reproducibility
        # Shift-invert just below 0 finds the smallest eigenvalues fast (0 itself is always an eigenvalue).
        eigenvalues, vectors = eigsh(lap, k=n_components, sigma=-1e-5, which="LM", v0=v0)
        vectors = vectors[:, np.argsort(eigenvalues, kind="stable")]
    embedding = vectors / sqrt_degree[:, None]
    peak = np.abs(embedding).argmax(axis=0)
    return embedding * np.sign(embedding[peak, np.arange(n_components)])


def silhouette_1d(values: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """Exact mean silhouette of 1-D points, value i repeated weights[i] times (equal to scikit-learn's
    silhouette_score on the expanded data, in O(n·C·log n) instead of O(n²)). None when it is undefined
    (fewer than 2 clusters, or as many clusters as points).

    Scored on the magnitudes themselves, not on the spectral embedding: the bands are bands of |w| and α_g is a
    mean |w|, so separation in |w| is what the quantizer gains from; embedding coordinates of a graph with
    several components are arbitrary within each component and say little about that."""
    values = np.asarray(values, dtype=np.float64)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    clusters, own = np.unique(labels, return_inverse=True)
    total = weights.sum()
    if clusters.size < 2 or clusters.size > total - 1:
        return None
    dist_sums = np.empty((values.size, clusters.size))
    sizes = np.empty(clusters.size)
    for j in range(clusters.size):
        dist_sums[:, j], sizes[j] = _distance_sums_to(values, values[own == j], weights[own == j])
    rows = np.arange(values.size)
    own_size = sizes[own]
    # Copies of the same value are at distance 0, so only the point itself leaves its own cluster's count.
    a = dist_sums[rows, own] / np.maximum(own_size - 1, 1)
    mean_to_other = dist_sums / sizes
    mean_to_other[rows, own] = np.inf
    b = mean_to_other.min(axis=1)
    denom = np.maximum(a, b)
    scored = (own_size > 1) & (denom > 0)
    s = np.where(scored, (b - a) / np.where(scored, denom, 1), 0.0)
    return float((weights * s).sum() / total)


def _distance_sums_to(points: np.ndarray, members: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    """For each point, Σ weight·|point − member| over a cluster, via prefix sums over the sorted members."""
    order = np.argsort(members)
    members, weights = members[order], weights[order]
    count = np.concatenate([[0.0], np.cumsum(weights)])
    total = np.concatenate([[0.0], np.cumsum(weights * members)])
    pos = np.searchsorted(members, points, side="right")
    below_n, below_s = count[pos], total[pos]
    sums = points * below_n - below_s + (total[-1] - below_s) - points * (count[-1] - below_n)
    return sums, float(count[-1])


def cluster_means(values: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean value of each non-empty cluster, ascending."""
    _, own = np.unique(labels, return_inverse=True)
    sums = np.bincount(own, weights * values)
    return np.sort(sums / np.bincount(own, weights))


@dataclass(frozen=True)
class BandSums:
    """Per band: how many values, their total weight c, Σc|w| and Σc|w|². Unweighted, c = 1 and weight = count.

    The weights are how much each value's error counts (the input channel's activation energy h_k in the
    activation-aware quantizer); the least-squares scale of a band is then Σc|w| / Σc, and its error
    Σc(|w| − α)² = S2 − 2αS1 + α²·weight."""

    count: np.ndarray
    weight: np.ndarray
    sum1: np.ndarray
    sum2: np.ndarray

    def __sub__(self, other: BandSums) -> BandSums:
        return BandSums(self.count - other.count, self.weight - other.weight, self.sum1 - other.sum1,
                        self.sum2 - other.sum2)

    def means(self) -> np.ndarray:
        """Weighted mean |w| of each band; 0 for an empty band (its scale is stored but never read)."""
        # A band whose values all weigh (almost) nothing has no least-squares scale; its plain centre is as good.
        filled = (self.count > 0) & (self.weight > 0)
        return np.where(filled, self.sum1 / np.where(filled, self.weight, 1), 0.0)

    def unit_gain_scales(self) -> np.ndarray:
        """Σc|w|² / Σc|w| per band: the scale at which the band's stored values, regressed on its weights, have
        gain 1 (no shrinkage of the output); 0 for an empty band."""
        filled = (self.count > 0) & (self.sum1 > 0)
        return np.where(filled, self.sum2 / np.where(filled, self.sum1, 1), 0.0)


class MagnitudeTable:
    """Sorted magnitudes with (weighted) prefix sums: the count, weight, Σc|w| and Σc|w|² of every band cost a
    binary search per band edge, whatever the number of values."""

    def __init__(self, mags: np.ndarray, weights: np.ndarray | None = None):
        mags = np.asarray(mags).ravel()  # float32 sorts faster; the sums below are float64 either way
        if weights is None:
            self.sorted = np.sort(mags).astype(np.float64)
            c = np.ones_like(self.sorted)
        else:
            order = np.argsort(mags, kind="stable")
            self.sorted = mags[order].astype(np.float64)
            c = np.asarray(weights, dtype=np.float64).ravel()[order]
        # One [3, n+1] table of prefix sums (weight, Σc|w|, Σc|w|²): a band query is then one gather and one diff.
        self._prefix = np.zeros((3, self.sorted.size + 1))
        np.cumsum(c, out=self._prefix[0, 1:])
        np.cumsum(c * self.sorted, out=self._prefix[1, 1:])
        np.cumsum(c * self.sorted * self.sorted, out=self._prefix[2, 1:])

    def band_sums(self, edges: np.ndarray) -> BandSums:
        """Band j holds edges[j-1] <= |w| < edges[j] (the same rule as assign_bands)."""
        pos = np.empty(len(edges) + 2, dtype=np.int64)
        pos[0], pos[-1] = 0, self.sorted.size
        pos[1:-1] = np.searchsorted(self.sorted, edges, side="left")
        sums = np.diff(self._prefix[:, pos], axis=1)
        return BandSums(np.diff(pos), sums[0], sums[1], sums[2])


def band_edges(centres: np.ndarray) -> np.ndarray:
    """Midpoints between ascending centres: the nearest-centre boundaries in 1-D."""
    return (centres[1:] + centres[:-1]) / 2


def assign_bands(mags: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (centres ascending); a value exactly midway joins the upper band."""
    return np.searchsorted(band_edges(np.asarray(centres, dtype=np.float64)), mags, side="right")


def refine_centres(band_sums: Callable[[np.ndarray], BandSums], centres: np.ndarray, steps: int,
                   tol: float = 0.0) -> np.ndarray:
    """1-D Lloyd: assign every value to its nearest centre, move each centre to its band's (weighted) mean; an
    empty or weightless band keeps its centre. `band_sums(edges)` supplies the per-band sums, so the values need
    not be materialised. Stops early once a step moves no centre by more than tol × the largest centre (with
    tol = 0: once a step changes nothing, since every later step would repeat it)."""
    centres = np.sort(np.asarray(centres, dtype=np.float64))
    for _ in range(steps):
        sums = band_sums(band_edges(centres))
        moved = np.sort(np.where((sums.count > 0) & (sums.weight > 0), sums.means(), centres))
        settled = np.max(np.abs(moved - centres), initial=0.0) <= tol * np.max(np.abs(moved), initial=0.0)
        centres = moved
        if settled:
            break
    return centres


def quantile_centres(mags: np.ndarray, n_groups: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Starting centres without a graph: the medians of G equal-count slices of the values (equal-weight slices
    when weights are given)."""
    mags = np.asarray(mags, dtype=np.float64).ravel()
    if mags.size == 0:
        return np.zeros(n_groups)
    targets = (np.arange(n_groups) + 0.5) / n_groups
    if weights is None:
        return np.quantile(mags, targets)
    order = np.argsort(mags, kind="stable")
    cdf = np.cumsum(np.asarray(weights, dtype=np.float64).ravel()[order])
    if cdf[-1] <= 0:
        return np.quantile(mags, targets)
    picks = np.minimum(np.searchsorted(cdf, targets * cdf[-1], side="left"), mags.size - 1)
    return mags[order][picks]


def band_centres(mags: np.ndarray, n_groups: int, lloyd_steps: int, init: np.ndarray | None = None) -> np.ndarray:
    """Band centres of the values after `lloyd_steps` Lloyd refinements, from `init` (default: quantiles)."""
    if init is not None and len(init) != n_groups:
        raise ValueError(f"init has {len(init)} centres, expected {n_groups}")
    start = quantile_centres(mags, n_groups) if init is None else init
    return refine_centres(MagnitudeTable(mags).band_sums, start, lloyd_steps)
