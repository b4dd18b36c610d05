"""RTN and GPTQ (uniform, per-group) and the shared GPTQ compensation loop: known answers and invariants."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sage_export.format.accounting import stored_bytes, true_bits
from sage_export.quant.api import QuantizedWeight
from sage_export.quant.gptq import gptq_compensate, inverse_hessian_cholesky
from sage_export.quant.rtn import GroupwiseGrid, decode_uniform, quantize_gptq, quantize_rtn
from sage_export.quant.common import hessian_error


def correlated_hessian(k: int, seed: int, samples: int = 400) -> np.ndarray:
    """H = 2·XᵀX/n for activations with strongly correlated features (where GPTQ's compensation pays off)."""
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + 0.5 * rng.normal(size=(k, k)) / np.sqrt(k)
    x = rng.normal(size=(samples, k // 4)) @ rng.normal(size=(k // 4, k)) + 0.3 * rng.normal(size=(samples, k))
    x = x @ mix
    return 2 * x.T @ x / samples


def test_rtn_4bit_exactly_representable_round_trips():
    # Each row-group holds scale·(c − 5) for codes c covering 0..15, scale = 0.125: the min-max grid is exactly
    # scale 0.125, zero-point 5, so every weight is on it. K = 100 with groups of 64: the second group has 36 columns.
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(3, 100))
    codes[:, [0, 64]], codes[:, [1, 65]] = 0, 15
    w = (0.125 * (codes - 5)).astype(np.float32)
    r = quantize_rtn(w, bits=4, group_size=64)
    np.testing.assert_array_equal(r.dequantize(), w)
    assert r.scales.tolist() == [[0.125, 0.125]] * 3
    assert r.stats["recon_error"] == 0.0


def test_rtn_true_bits_hand_computed():
    w = np.random.default_rng(1).normal(size=(4, 100))
    r = quantize_rtn(w, bits=4, group_size=64)
    # K = 100, group 64 -> 2 groups (64 + 36). codes: 4·100 values × 4 bits = 1600 bits = 200 B;
    # scales float16 [4, 2] = 16 B; zero-points 4·2 values × 4 bits = 32 bits = 4 B. 220 B = 1760 bits / 400.
    assert stored_bytes(r.stored_tensors()) == 220
    assert true_bits(r.stored_tensors(), 4, 100) == 4.4
    assert r.paper_bits() == {"weight_bits": 4.0, "scale_bits": 20 / 64}

    r3 = quantize_rtn(w[:2, :10], bits=3, group_size=64)
    # 20 codes × 3 bits = 60 bits -> 8 B; scales [2, 1] float16 = 4 B; 2 zero-points × 3 bits = 6 bits -> 1 B.
    # 13 B = 104 bits over 20 weights = 5.2 bits per weight.
    assert true_bits(r3.stored_tensors(), 2, 10) == 5.2
    assert r3.paper_bits() == {"weight_bits": 3.0, "scale_bits": 19 / 64}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,k", [(64, 100), (128, 70), (64, 128)])
def test_rtn_codes_in_range_and_error_bounded(bits, group_size, k):
    w = np.random.default_rng(bits * k).normal(size=(5, k))
    r = quantize_rtn(w, bits, group_size)
    decoded = r.dequantize()
    assert decoded.shape == (5, k) and decoded.dtype == np.float32
    # Round-to-nearest: no weight is further than half a step from its decode (ranges contain every weight).
    step = r.scales.astype(np.float64)[:, np.arange(k) // group_size]
    assert np.all(np.abs(w - decoded) <= step / 2 * (1 + 1e-3))
    np.testing.assert_array_equal(decode_uniform(r.stored_tensors(), 5, k, bits, group_size), decoded)


def test_all_zero_row_decodes_to_zero():
    w = np.zeros((2, 70))
    w[1] = np.linspace(-1, 1, 70)
    r = quantize_rtn(w, 3, 64)
    np.testing.assert_array_equal(r.dequantize()[0], 0.0)


@pytest.mark.parametrize("bits,group_size", [(2, 64), (4, 128)])
def test_gptq_with_identity_or_diagonal_hessian_is_rtn(bits, group_size):
    # A diagonal H has no off-diagonal coupling: compensation moves nothing, so GPTQ makes RTN's choices.
    w = np.random.default_rng(3).normal(size=(6, 200))
    rtn = quantize_rtn(w, bits, group_size)
    for h in (np.eye(200), np.diag(np.random.default_rng(4).uniform(0.5, 2.0, 200))):
        gptq = quantize_gptq(w, h, bits, group_size)
        for name, t in rtn.stored_tensors().items():
            assert gptq.stored_tensors()[name].tobytes() == t.tobytes(), name


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_hessian_error_not_above_rtn_on_correlated_data(bits):
    k = 192
    h = correlated_hessian(k, seed=bits)
    w = np.random.default_rng(10 + bits).normal(size=(24, k))
    rtn = quantize_rtn(w, bits, 64)
    gptq = quantize_gptq(w, h, bits, 64)
    rtn_err = hessian_error(w, rtn.dequantize().astype(np.float64), h)
    assert gptq.stats["hessian_error"] == pytest.approx(hessian_error(w, gptq.dequantize().astype(np.float64), h))
    assert gptq.stats["hessian_error"] < rtn_err


def test_gptq_loop_output_is_exactly_what_is_stored():
    w = np.random.default_rng(5).normal(size=(8, 100))
    h = correlated_hessian(100, seed=5)
    grid = GroupwiseGrid(8, 100, bits=3, group_size=64)
    decoded = gptq_compensate(w, h, grid, blocksize=128)
    stored = quantize_gptq(w, h, 3, 64)
    np.testing.assert_array_equal(decoded.astype(np.float32), stored.dequantize())
    np.testing.assert_array_equal(grid.codes.shape, (8, 100))


def test_gptq_protocol_stats_and_determinism():
    w = np.random.default_rng(6).normal(size=(5, 70)).astype(np.float32)
    h = correlated_hessian(70, seed=6)
    a, b = quantize_gptq(w, h, 2, 64), quantize_gptq(w, h, 2, 64)
    assert isinstance(a, QuantizedWeight) and a.method == "gptq" and quantize_rtn(w, 2, 64).method == "rtn"
    json.dumps(a.stats)
    assert a.stats["bits"] == 2 and a.stats["group_size"] == 64
    for name, t in a.stored_tensors().items():
        assert t.tobytes() == b.stored_tensors()[name].tobytes()


def test_bad_arguments_rejected():
    w = np.random.default_rng(7).normal(size=(3, 64))
    h = np.eye(64)
    with pytest.raises(ValueError):
        quantize_rtn(w, 5, 64)
    with pytest.raises(ValueError, match="multiple"):
        quantize_gptq(w, h, 4, 64, blocksize=96)
    with pytest.raises(ValueError):
        quantize_gptq(w, np.eye(63), 4, 64)
    bad_w = w.copy()
    bad_w[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_rtn(bad_w, 4, 64)
    bad_h = h.copy()
    bad_h[3, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_gptq(w, bad_h, 4, 64)


# --- the compensation loop itself, with hand-written callbacks -------------------------------------------------


def keep_weights(block_w, hinv_diag, cols):
    """A 'quantizer' that changes nothing: no error, so no compensation."""
    return lambda i, block_now: block_now[:, i].copy()


def test_lossless_callback_returns_weights_and_zeroes_dead_columns():
    w = np.random.default_rng(8).normal(size=(4, 40))
    h = correlated_hessian(40, seed=8)
    h[7, :], h[:, 7] = 0.0, 0.0
    out = gptq_compensate(w, h, keep_weights, blocksize=16)
    expected = w.copy()
    expected[:, 7] = 0.0
    np.testing.assert_allclose(out, expected, atol=1e-12)


def test_callback_contract_blocks_cols_diag_and_read_only():
    k, seen = 40, []
    h = correlated_hessian(k, seed=9)
    u = inverse_hessian_cholesky(h, 0.01)

    def spy(block_w, hinv_diag, cols):
        seen.append((block_w.shape[1], cols.tolist(), hinv_diag))
        with pytest.raises(ValueError):
            block_w[0, 0] = 1.0  # read-only

        def column(i, block_now):
            with pytest.raises(ValueError):
                block_now[0, i] = 1.0
            return np.round(block_now[:, i])

        return column

    gptq_compensate(np.random.default_rng(9).normal(size=(3, k)), h, spy, blocksize=16)
    assert [s[0] for s in seen] == [16, 16, 8]
    assert sum((s[1] for s in seen), []) == list(range(k))
    np.testing.assert_allclose(np.concatenate([s[2] for s in seen]), np.diag(u))


def test_compensation_matches_one_column_obs_update():
    # Two columns, one block, quantizer = round to integers. After column 0 is rounded (0.4 -> 0), the OBS update
    # for two columns moves column 1 by (w0 − q0)·H01/H11, with H damped by 1 % of its mean diagonal (H11 = 2.02):
    # 0.35 + 0.4 · 1/2.02 = 0.548..., which now rounds to 1 instead of 0.
    h = np.array([[2.0, 1.0], [1.0, 2.0]])
    w = np.array([[0.4, 0.35]])
    moved = 0.35 + 0.4 * 1.0 / 2.02
    out = gptq_compensate(w, h, lambda bw, d, c: (lambda i, now: np.round(now[:, i])))
    np.testing.assert_array_equal(out, [[0.0, 1.0]])
    seen = []
    gptq_compensate(w, h, lambda bw, d, c: (lambda i, now: seen.append(now[0, i]) or np.round(now[:, i])))
    np.testing.assert_allclose(seen, [0.4, moved], rtol=1e-12)


def test_act_order_processes_by_decreasing_hessian_diagonal():
    k, order = 24, []
    h = correlated_hessian(k, seed=11)

    def spy(block_w, hinv_diag, cols):
        order.extend(cols.tolist())
        return lambda i, now: np.round(now[:, i] * 4) / 4

    w = np.random.default_rng(11).normal(size=(6, k))
    out = gptq_compensate(w, h, spy, blocksize=8, act_order=True)
    assert order == np.argsort(-np.diag(h), kind="stable").tolist()
    assert hessian_error(w, out, h) < hessian_error(w, np.round(w * 4) / 4, h)


@pytest.mark.parametrize("k", [1, 7, 64, 301])
def test_direct_inverse_factor_is_the_reference_route_and_the_scipy_copying_one_to_the_bit(k):
    """inverse_hessian_cholesky_direct factorises one column-major copy in place (memory); its values must be
    those of letting scipy copy at every step (the code before), bit for bit, and equal the reference up to
    rounding. Dead columns included."""
    import scipy.linalg

    from sage_export.quant.gptq import _damped, inverse_hessian_cholesky_direct

    h = correlated_hessian(k, seed=k) if k > 4 else np.diag(np.arange(1.0, k + 1))
    if k > 4:
        h[3, :] = h[:, 3] = 0.0
    lower = scipy.linalg.cholesky(_damped(h, 0.01)[::-1, ::-1], lower=True)
    before = np.ascontiguousarray(scipy.linalg.lapack.dtrtri(lower, lower=1)[0][::-1, ::-1])
    h_copy = h.copy()
    u = inverse_hessian_cholesky_direct(h, 0.01)
    assert np.array_equal(u, before) and u.flags.c_contiguous
    assert np.array_equal(h, h_copy)  # the input is left alone
    np.testing.assert_allclose(u, inverse_hessian_cholesky(h, 0.01), rtol=1e-6, atol=1e-9 * np.abs(u).max())
