"""BiLLM baseline: the block search against brute force, decoding structure, honest storage, error vs XNOR."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sage_export.format.accounting import stored_bytes, true_bits
from sage_export.format.bits import unpack_bits
from sage_export.quant.api import QuantizedWeight
from sage_export.quant.billm import ALPHA_NAMES, BlockBinarizer, decode_billm, quantize_billm, search_block
from sage_export.quant.gptq import gptq_compensate
from sage_export.quant.common import hessian_error
from sage_export.quant.xnor import quantize_xnor

OUTLIER_COLS = [3, 40, 77, 101]


def gaussian_with_outlier_columns(n: int = 48, k: int = 140, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).normal(scale=0.02, size=(n, k))
    w[:, [c for c in OUTLIER_COLS if c < k]] *= 10
    return w.astype(np.float32)


def correlated_hessian(k: int, seed: int, samples: int = 300) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, k // 4)) @ rng.normal(size=(k // 4, k)) + 0.3 * rng.normal(size=(samples, k))
    return 2 * x.T @ x / samples


def brute_force_block_error(a_sorted: np.ndarray, c: int, p: float) -> float:
    """The block's binarization error written out directly: residual binarization of the first c columns,
    two-band binarization (|w| <= p, |w| > p) of the rest, every α the row mean |w| of its part."""
    w = a_sorted  # the error depends on |w| only, so magnitudes stand in for the weights
    sal = w[:, :c]
    a1 = sal.mean(axis=1, keepdims=True)
    r = sal - a1
    a2 = np.abs(r).mean(axis=1, keepdims=True)
    err = np.sum((r - a2 * np.where(r >= 0, 1, -1)) ** 2)
    for band in (w[:, c:] <= p, w[:, c:] > p):
        part = np.where(band, w[:, c:], 0.0)
        alpha = part.sum(axis=1, keepdims=True) / np.maximum(band.sum(axis=1, keepdims=True), 1)
        err += np.sum(np.where(band, part - alpha, 0.0) ** 2)
    return float(err)


def test_block_search_matches_brute_force():
    rng = np.random.default_rng(1)
    a = np.abs(rng.standard_t(df=4, size=(12, 20)))
    a = a[:, np.argsort(-np.sum(a**2, axis=0))]
    grid = np.quantile(a, np.linspace(0.1, 0.9, 9))
    c, p = search_block(a, grid)
    errors = {(cc, pp): brute_force_block_error(a, cc, pp) for cc in range(1, 21) for pp in grid}
    best = min(errors, key=errors.get)
    assert (c, p) == best
    # The chosen split beats plain one-scale binarization of the whole block by a wide margin.
    plain = np.sum((a - a.mean(axis=1, keepdims=True)) ** 2)
    assert errors[best] < 0.5 * plain


def test_true_bits_count_every_bit_and_exceed_paper_bits():
    n, k, bs = 48, 140, 64  # K not a multiple of 8 or of the block size: blocks of 64, 64, 12
    w = gaussian_with_outlier_columns(n, k)
    r = quantize_billm(w, np.eye(k), blocksize=bs)
    s = sum(r.stats["salient_columns_per_block"])
    t = r.stored_tensors()
    assert t["residual_bits"].shape == (n, (s + 7) // 8) and t["split_bits"].shape == (n, (k - s + 7) // 8)
    # sign bits + residual bits (salient columns) + band bits (other columns) + column mask + 4 float16 α per row
    # per block.
    expected = n * ((k + 7) // 8) + n * ((s + 7) // 8) + n * ((k - s + 7) // 8) + (k + 7) // 8 + 4 * 2 * n * 3
    assert stored_bytes(t) == expected
    paper = r.paper_bits()
    assert paper == {"weight_bits": 1 + s / k, "scale_bits": 0.0}
    assert true_bits(t, n, k) > paper["weight_bits"] + paper["scale_bits"]
    assert true_bits(t, n, k) >= 2.0  # every weight carries two stored bits


def test_outlier_columns_are_salient_and_error_beats_xnor():
    k = 140
    w = gaussian_with_outlier_columns(k=k)
    r = quantize_billm(w, np.eye(k))
    salient = unpack_bits(r.stored_tensors()["salient_columns"], k)
    assert salient[OUTLIER_COLS].all()
    assert r.stats["recon_error"] < 0.5 * quantize_xnor(w).stats["recon_error"]


def test_calibrated_error_beats_xnor_in_the_hessian_norm():
    k = 140
    w = gaussian_with_outlier_columns(k=k, seed=2)
    h = correlated_hessian(k, seed=2)
    r = quantize_billm(w, h)
    xnor_err = hessian_error(w.astype(np.float64), quantize_xnor(w).dequantize().astype(np.float64), h)
    assert r.stats["hessian_error"] < xnor_err


def test_decoded_values_have_billm_structure_without_compensation():
    # With H = I nothing is compensated: each block-row decodes to ±α_c, ±α_s (non-salient) or ±α1 ± α2 (salient).
    k, bs = 100, 50
    w = gaussian_with_outlier_columns(k=k, seed=3)
    r = quantize_billm(w, np.eye(k), blocksize=bs)
    t, dec = r.stored_tensors(), r.dequantize()
    salient = unpack_bits(t["salient_columns"], k)
    a = {name: t[name].astype(np.float32) for name in ALPHA_NAMES}
    for row in (0, 7):
        for b in range(2):
            cols = np.arange(b * bs, (b + 1) * bs)
            a1, a2 = a["alpha_salient1"][row, b], a["alpha_salient2"][row, b]
            ac, asp = a["alpha_concentrated"][row, b], a["alpha_sparse"][row, b]
            sal_vals = {s1 * a1 + s2 * a2 for s1 in (-1, 1) for s2 in (-1, 1)}
            assert set(dec[row, cols[salient[cols]]].tolist()) <= {float(v) for v in sal_vals}
            assert set(np.abs(dec[row, cols[~salient[cols]]]).tolist()) <= {float(ac), float(asp)}
            assert np.all(np.sign(dec[row, cols]) == np.where(w[row, cols] >= 0, 1, -1))


def test_loop_output_is_exactly_what_is_stored():
    k = 90
    w = gaussian_with_outlier_columns(k=k, seed=4).astype(np.float64)
    h = correlated_hessian(k, seed=4)
    binarizer = BlockBinarizer(*w.shape, 32, "hessian")
    decoded = gptq_compensate(w, h, binarizer, blocksize=32)
    np.testing.assert_array_equal(decoded.astype(np.float32), decode_billm(binarizer.stored_tensors(), *w.shape, 32))


@pytest.mark.parametrize("metric", ["hessian", "magnitude"])
def test_protocol_determinism_and_stats(metric):
    k = 70
    w = gaussian_with_outlier_columns(k=k, seed=5)
    h = correlated_hessian(k, seed=5)
    a, b = quantize_billm(w, h, blocksize=32, salient_metric=metric), quantize_billm(w, h, blocksize=32,
                                                                                    salient_metric=metric)
    assert isinstance(a, QuantizedWeight) and a.method == "billm" and a.shape == w.shape
    assert a.dequantize().dtype == np.float32
    for name, t in a.stored_tensors().items():
        assert t.tobytes() == b.stored_tensors()[name].tobytes(), name
    json.dumps(a.stats)
    assert len(a.stats["salient_columns_per_block"]) == len(a.stats["break_points"]) == 3
    assert a.stats["salient_fraction"] == sum(a.stats["salient_columns_per_block"]) / k


def test_bad_inputs_rejected():
    w = gaussian_with_outlier_columns(k=40, seed=6)
    with pytest.raises(ValueError, match="salient_metric"):
        quantize_billm(w, np.eye(40), salient_metric="random")
    with pytest.raises(ValueError):
        quantize_billm(w, np.eye(39))
    bad = w.copy()
    bad[2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_billm(bad, np.eye(40))
