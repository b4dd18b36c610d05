"""XNOR baseline: known answers for scales, decoding and storage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sage_export.format.accounting import stored_bytes
from sage_export.quant.api import QuantizedWeight
from sage_export.quant.xnor import decode_xnor, quantize_xnor


def test_hand_example():
    w = np.array([[1.0, -3.0], [0.5, 0.5], [0.0, -2.0]], dtype=np.float32)
    r = quantize_xnor(w)
    # Row scales mean|w|: 2, 0.5, 1 (all exact in float16). A weight of 0 gets sign +1.
    assert r.row_scales.tolist() == [2.0, 0.5, 1.0]
    np.testing.assert_array_equal(r.dequantize(), [[2, -2], [0.5, 0.5], [1, -1]])
    # Errors: (1-2)² + (-3+2)² = 2; 0; (0-1)² + (-2+1)² = 2 -> 4 over ‖W‖² = 1 + 9 + 0.25 + 0.25 + 0 + 4 = 14.5.
    assert r.stats["recon_error"] == 4.0
    assert r.stats["rel_error"] == pytest.approx(4.0 / 14.5)


def test_scale_is_row_mean_abs_rounded_to_float16():
    w = np.random.default_rng(0).normal(size=(7, 29)).astype(np.float32)
    r = quantize_xnor(w)
    assert r.row_scales.dtype == np.float16
    np.testing.assert_array_equal(r.row_scales, np.mean(np.abs(w.astype(np.float64)), axis=1).astype(np.float16))
    expected = np.where(w >= 0, 1, -1) * r.row_scales.astype(np.float32)[:, None]
    np.testing.assert_array_equal(r.dequantize(), expected)


@pytest.mark.parametrize("n,k", [(5, 13), (3, 8), (2, 1), (4, 100)])
def test_stored_bytes_are_sign_bytes_plus_two_per_row(n, k):
    r = quantize_xnor(np.random.default_rng(k).normal(size=(n, k)))
    tensors = r.stored_tensors()
    assert tensors["sign_bits"].dtype == np.int8 and tensors["sign_bits"].shape == (n, (k + 7) // 8)
    assert stored_bytes(tensors) == n * ((k + 7) // 8) + 2 * n
    np.testing.assert_array_equal(decode_xnor(tensors, k), r.dequantize())


def test_protocol_paper_bits_and_json_stats():
    w = np.random.default_rng(1).normal(size=(4, 24))
    r = quantize_xnor(w)
    assert isinstance(r, QuantizedWeight)
    assert r.method == "xnor" and r.shape == (4, 24)
    assert r.dequantize().dtype == np.float32
    assert r.paper_bits() == {"weight_bits": 1.0, "scale_bits": 16 / 24}
    json.dumps(r.stats)


def test_deterministic():
    w = np.random.default_rng(2).normal(size=(6, 21))
    a, b = quantize_xnor(w), quantize_xnor(w)
    for name, t in a.stored_tensors().items():
        assert t.tobytes() == b.stored_tensors()[name].tobytes()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_non_finite(bad):
    w = np.ones((3, 4))
    w[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_xnor(w)


def test_rejects_wrong_rank_and_float16_overflow():
    with pytest.raises(ValueError):
        quantize_xnor(np.ones(5))
    with pytest.raises(ValueError, match="float16"):
        quantize_xnor(np.full((2, 3), 1e6))
