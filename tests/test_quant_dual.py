"""Dual-mode quantizer: closed-form group scales and the per-row salient scale fit."""

import numpy as np
import pytest

from sage_export.quant.common import to_float16
from sage_export.quant.dual import binary_error, fit_salient, group_scales, q_limit, quantize_to_scale
from sage_export.quant.groups import MagnitudeTable


def test_group_scale_is_mean_magnitude_of_its_band():
    mags = np.array([0.1, 0.3, 0.2, 1.0, 3.0])
    band = np.array([0, 0, 0, 1, 1])
    np.testing.assert_allclose(group_scales(mags, band, 3), [0.2, 2.0, 0.0])  # empty group 2 -> 0


def test_group_scale_minimises_the_band_error():
    rng = np.random.default_rng(0)
    mags = np.abs(rng.normal(0, 1, 200))
    alpha = group_scales(mags, np.zeros(200, dtype=int), 1)[0]
    err = lambda a: np.sum((mags - a) ** 2)
    assert err(alpha) <= min(err(alpha * 1.01), err(alpha * 0.99))


def test_binary_error_equals_direct_error_with_float16_scales():
    rng = np.random.default_rng(1)
    mags = np.abs(rng.normal(0, 0.02, 1000))
    edges = np.array([0.01, 0.03])
    sums = MagnitudeTable(mags).band_sums(edges)
    alpha16 = to_float16(sums.means())
    band = np.searchsorted(edges, mags, side="right")
    direct = np.sum((mags - alpha16.astype(np.float64)[band]) ** 2)
    assert binary_error(sums, alpha16) == pytest.approx(direct, rel=1e-10)


def test_to_float16_rounds_and_rejects_overflow():
    assert to_float16(np.array([0.1])).dtype == np.float16
    with pytest.raises(ValueError, match="float16"):
        to_float16(np.array([1e6]))


def test_quantize_to_scale_rounds_clips_and_handles_zero_scale():
    w = np.array([0.26, -0.74, 5.0, 0.3])
    s = np.array([0.5, 0.5, 0.5, 0.0])
    np.testing.assert_array_equal(quantize_to_scale(w, s, 7), [1, -1, 7, 0])
    assert q_limit(4) == 7 and q_limit(2) == 1 and q_limit(8) == 127


def max_abs_error(w, rows, n_rows, bits):
    limit = q_limit(bits)
    row_max = np.zeros(n_rows)
    np.maximum.at(row_max, rows, np.abs(w))
    s = to_float16(row_max / limit).astype(np.float64)[rows]
    return np.sum((w - s * quantize_to_scale(w, s, limit)) ** 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_least_squares_scale_beats_or_equals_max_abs(bits):
    rng = np.random.default_rng(bits)
    n_rows = 30
    rows = np.sort(rng.integers(0, n_rows - 5, 600))  # the last 5 rows have no salient entries
    w = rng.standard_t(3, 600) * 0.05
    fit = fit_salient(w, rows, n_rows, bits, iters=5)
    assert fit.error <= max_abs_error(w, rows, n_rows, bits) + 1e-15
    assert fit.error < max_abs_error(w, rows, n_rows, bits)  # strictly better on heavy-tailed data
    assert fit.scale16.dtype == np.float16 and np.all(fit.scale16[-5:] == 0)
    assert np.abs(fit.q.astype(int)).max() <= q_limit(bits)
    # The reported error is the error of the stored scale and integers.
    s = fit.scale16.astype(np.float64)[rows]
    assert fit.error == pytest.approx(np.sum((w - s * fit.q) ** 2), rel=1e-12)


def test_exactly_representable_values_have_zero_error():
    rows = np.array([0, 0, 0, 1, 1])
    w = np.array([0.5, -1.5, 3.5, 0.875, -0.125])  # 0.5·{1,-3,7} and 0.125·{7,-1}: float16-exact scales
    fit = fit_salient(w, rows, 2, bits=4, iters=3)
    assert fit.error == 0.0
    np.testing.assert_array_equal(fit.q, [1, -3, 7, 7, -1])
    np.testing.assert_array_equal(fit.scale16, np.array([0.5, 0.125], dtype=np.float16))


def test_no_salient_entries():
    fit = fit_salient(np.zeros(0), np.zeros(0, dtype=int), 4, bits=4, iters=5)
    assert fit.error == 0.0 and fit.q.size == 0 and np.all(fit.scale16 == 0)
