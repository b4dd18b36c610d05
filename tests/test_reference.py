"""The NumPy reference of SageBinaryGemm against a plain float64 product with the dequantized weight."""

from __future__ import annotations

import numpy as np
import pytest

from sage_export.format.sage_layout import dequantize, pack_sage
from sage_export.onnx import reference
from sage_export.onnx.reference import sage_binary_gemm, sage_binary_gemm_packed


def make_packed(seed: int = 0, n: int = 6, k: int = 21, n_groups: int = 3):
    rng = np.random.default_rng(seed)
    return pack_sage(signs=rng.random((n, k)) < 0.5, group_index=rng.integers(0, n_groups, (n, k)),
                     group_scales=rng.uniform(0.01, 0.2, n_groups), salient_mask=rng.random((n, k)) < 0.15,
                     salient_q=rng.integers(-7, 8, (n, k)), salient_scale=rng.uniform(0.01, 0.1, n), salient_bits=4)


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-5), (np.float16, 2e-3)])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_dense_product(dtype, rtol, lead, with_bias):
    p = make_packed()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((*lead, p.in_features)).astype(dtype)
    bias = rng.standard_normal(p.out_features).astype(np.float32) if with_bias else None
    expected = x.astype(np.float64) @ dequantize(p).astype(np.float64).T
    if with_bias:
        expected += bias
    y = sage_binary_gemm_packed(x, p, bias)
    assert y.dtype == dtype and y.shape == (*lead, p.out_features)
    np.testing.assert_allclose(y.astype(np.float64), expected, rtol=rtol, atol=rtol)


def test_exploded_signature_equals_packed_form():
    p = make_packed(2)
    x = np.random.default_rng(3).standard_normal((4, p.in_features)).astype(np.float32)
    np.testing.assert_array_equal(sage_binary_gemm(x, **p.tensors(), **p.attrs()), sage_binary_gemm_packed(x, p))


def test_builds_weight_once_per_call(monkeypatch):
    calls = []
    real = reference.dequantize
    monkeypatch.setattr(reference, "dequantize", lambda p: calls.append(1) or real(p))
    p = make_packed()
    sage_binary_gemm_packed(np.ones((2, 3, p.in_features), np.float32), p, np.zeros(p.out_features))
    assert len(calls) == 1


def test_rejects_bad_inputs():
    p = make_packed()
    with pytest.raises(ValueError, match="last dimension"):
        sage_binary_gemm_packed(np.ones((2, p.in_features + 1), np.float32), p)
    with pytest.raises(ValueError, match="float16 or float32"):
        sage_binary_gemm_packed(np.ones((2, p.in_features), np.float64), p)
    with pytest.raises(ValueError, match="bias"):
        sage_binary_gemm_packed(np.ones((2, p.in_features), np.float32), p, np.zeros(p.out_features + 1))
    with pytest.raises(ValueError, match="sign_bits"):
        sage_binary_gemm(np.ones((2, p.in_features), np.float32), **dict(p.tensors(), sign_bits=p.sign_bits[:1]),
                         **p.attrs())
