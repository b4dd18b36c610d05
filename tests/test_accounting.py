"""Accounting on hand-computed examples (SPEC §4)."""

from __future__ import annotations

import numpy as np
import pytest

from sage_export.format.accounting import sage_paper_bits, summarize, true_bits
from sage_export.format.sage_layout import pack_sage, stored_bytes

N, K, G, B, NNZ = 4, 16, 3, 4, 5


def hand_example():
    """N=4, K=16, G=3, b=4 with exactly 5 salient entries."""
    mask = np.zeros((N, K), dtype=bool)
    mask[0, [1, 7]] = True
    mask[2, [0, 5, 15]] = True
    return pack_sage(signs=np.ones((N, K), bool), group_index=np.arange(N * K).reshape(N, K) % G,
                     group_scales=np.array([0.1, 0.2, 0.3]), salient_mask=mask, salient_q=np.ones((N, K), int),
                     salient_scale=np.full(N, 0.05), salient_bits=B)


def test_paper_bits_hand_computed():
    # NK = 64. weight bits = ((64 - 5)·1 + 5·4) / 64 = (59 + 20) / 64 = 79/64 = 1.234375.
    # scale bits = 16·(N + R + G) / NK: with a row multiplier per row (R = N) 16·11 / 64 = 2.75; without
    # (R = 0, what pack_sage stores when every r_n is 1) 16·7 / 64 = 1.75.
    assert sage_paper_bits(N, K, NNZ, B, G, N) == {"weight_bits": 79 / 64, "scale_bits": 176 / 64}
    assert sage_paper_bits(N, K, NNZ, B, G, 0)["scale_bits"] == 112 / 64


def test_true_bits_hand_computed():
    packed = hand_example()
    assert packed.nnz == NNZ
    # sign_bits int8 [4, 2] = 8 B; group_codes int8 [P=ceil(log2 3)=2, 4, 2] = 16 B; group_scales f16 [3] = 6 B;
    # salient_rowptr i32 [5] = 20 B; salient_cols i8 [5, 2] = 10 B; salient_q i8 [5] = 5 B; salient_scale f16 [4] =
    # 8 B; row_scales f16 [0] (every r_n is 1) = 0 B. Total 8 + 16 + 6 + 20 + 10 + 5 + 8 = 73 B -> 8·73 / 64 = 9.125.
    assert true_bits(packed.tensors(), N, K) == pytest.approx(9.125, abs=0)
    assert stored_bytes(N, K, G, NNZ) == 73 and stored_bytes(N, K, G, NNZ, row_scaled=True) == 81


def test_summarize_totals_bytes_over_weights():
    packed = hand_example()
    other = {"codes": np.zeros(10, dtype=np.uint8)}  # 2 x 8 weights in 10 bytes -> 5 bits per weight
    summary = summarize({"a": (N, K, packed.tensors()), "b": (2, 8, other)})
    # Totals: 73 + 10 = 83 B over 64 + 16 = 80 weights -> 8·83/80 = 8.3 bits (not the mean of 9.125 and 5).
    assert summary["n_layers"] == 2
    assert summary["n_weights"] == 80
    assert summary["stored_bytes"] == 83
    assert summary["true_bits"] == pytest.approx(8.3)
    assert summary["fp16_bytes"] == 160
    assert summary["layers"]["a"] == {"n": 4, "k": 16, "bytes": 73, "true_bits": 9.125}
    assert summary["layers"]["b"]["true_bits"] == 5.0


def test_summarize_empty():
    assert summarize({})["true_bits"] == 0.0
