"""pack_sage -> dequantize gives exactly the intended Ŵ; packing is canonical; from_tensors validates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_export.format.sage_layout import (TENSOR_NAMES, PackedLinear, dequantize, pack_columns, pack_sage,
                                           salient_columns)


def random_decisions(rng: np.random.Generator, n: int, k: int, n_groups: int, salient_bits: int,
                     salient_fraction: float) -> dict:
    limit = (1 << (salient_bits - 1)) - 1
    mask = rng.random((n, k)) < salient_fraction
    mask[0] = False  # a row with no salient entry
    return dict(signs=rng.random((n, k)) < 0.5, group_index=rng.integers(0, n_groups, (n, k)),
                group_scales=rng.uniform(0.01, 0.2, n_groups), salient_mask=mask,
                salient_q=rng.integers(-limit, limit + 1, (n, k)), salient_scale=rng.uniform(0.01, 0.1, n),
                salient_bits=salient_bits)


def intended_weight(d: dict) -> np.ndarray:
    """Ŵ written straight from the contract's formula, with scales rounded to float16 as stored."""
    alpha = d["group_scales"].astype(np.float16).astype(np.float32)
    row_scale = d["salient_scale"].astype(np.float16).astype(np.float32)
    binary = alpha[d["group_index"]] * np.where(d["signs"], 1.0, -1.0)
    salient = row_scale[:, None] * d["salient_q"]
    return np.where(d["salient_mask"], salient, binary).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 30), n_groups=st.sampled_from([1, 2, 3, 4, 8]),
       salient_bits=st.integers(2, 8), fraction=st.sampled_from([0.0, 0.1, 0.5]), seed=st.integers(0, 2**31))
def test_dequantize_equals_intended_weight(n, k, n_groups, salient_bits, fraction, seed):
    d = random_decisions(np.random.default_rng(seed), n, k, n_groups, salient_bits, fraction)
    packed = pack_sage(**d)
    assert packed.nnz == int(d["salient_mask"].sum())
    w = dequantize(packed)
    assert w.dtype == np.float32 and w.shape == (n, k)
    np.testing.assert_array_equal(w, intended_weight(d))


def test_nnz_zero_layout():
    d = random_decisions(np.random.default_rng(1), 3, 10, 2, 4, 0.0)
    packed = pack_sage(**d)
    assert packed.nnz == 0
    np.testing.assert_array_equal(packed.salient_rowptr, [0, 0, 0, 0])
    assert packed.salient_cols.shape == (0, 2) and packed.salient_q.shape == (0,)
    np.testing.assert_array_equal(dequantize(packed), intended_weight(d))


def test_tensor_dtypes_shapes_and_order():
    d = random_decisions(np.random.default_rng(2), 4, 13, 3, 4, 0.2)
    packed = pack_sage(**d)
    tensors = packed.tensors()
    assert tuple(tensors) == TENSOR_NAMES
    nnz = packed.nnz
    assert {name: (t.dtype.name, t.shape) for name, t in tensors.items()} == {
        "sign_bits": ("int8", (4, 2)), "group_codes": ("int8", (2, 4, 2)), "group_scales": ("float16", (3,)),
        "salient_rowptr": ("int32", (5,)), "salient_cols": ("int8", (nnz, 2)), "salient_q": ("int8", (nnz,)),
        "row_scales": ("float16", (0,)),
        "salient_scale": ("float16", (4,))}
    assert packed.attrs() == {"in_features": 13, "out_features": 4, "n_groups": 3, "salient_bits": 4}


def test_hand_worked_row():
    # One row, K = 4, G = 2, b = 4. Column 2 is salient with q = -3 and row scale 0.5 -> -1.5.
    # Others: col 0 group 1 sign + -> +0.25; col 1 group 0 sign - -> -0.125; col 3 group 1 sign - -> -0.25.
    packed = pack_sage(signs=np.array([[1, 0, 1, 0]], bool), group_index=np.array([[1, 0, 1, 1]]),
                       group_scales=np.array([0.125, 0.25]), salient_mask=np.array([[0, 0, 1, 0]], bool),
                       salient_q=np.array([[0, 0, -3, 0]]), salient_scale=np.array([0.5]), salient_bits=4)
    # Sign bits: columns 0 (+) set, column 2 cleared because it is salient -> 0b0001 = 1.
    # Group plane 0: column 0 and 3 in group 1, column 2 forced to 0 -> 0b1001 = 9.
    np.testing.assert_array_equal(packed.sign_bits, [[1]])
    np.testing.assert_array_equal(packed.group_codes, [[[9]]])
    np.testing.assert_array_equal(packed.salient_cols, [[2, 0]])  # 16-bit column, little-endian bytes
    np.testing.assert_array_equal(packed.columns, [2])
    np.testing.assert_array_equal(packed.salient_q, [-3])
    np.testing.assert_array_equal(dequantize(packed), [[0.25, -0.125, -1.5, -0.25]])


def test_canonical_packing_ignores_sign_and_group_at_salient_positions():
    rng = np.random.default_rng(3)
    d = random_decisions(rng, 5, 21, 4, 4, 0.3)
    other = dict(d, signs=np.where(d["salient_mask"], ~d["signs"], d["signs"]),
                 group_index=np.where(d["salient_mask"], 3 - d["group_index"], d["group_index"]))
    a, b = pack_sage(**d), pack_sage(**other)
    for name in TENSOR_NAMES:
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name


def test_padding_bits_are_zero():
    d = random_decisions(np.random.default_rng(4), 3, 11, 4, 4, 0.1)
    d["signs"][:] = True
    d["group_index"][:] = 3
    packed = pack_sage(**d)
    # K = 11: byte 1 uses bits 0..2 only; bits 3..7 must be 0.
    assert np.all(packed.sign_bits.view(np.uint8)[:, 1] >> 3 == 0)
    assert np.all(packed.group_codes.view(np.uint8)[:, :, 1] >> 3 == 0)


def test_pack_sage_validates_inputs():
    d = random_decisions(np.random.default_rng(5), 3, 8, 2, 4, 0.3)
    with pytest.raises(ValueError, match="n_groups"):
        pack_sage(**dict(d, group_scales=np.array([])))
    with pytest.raises(ValueError, match="group_index"):
        pack_sage(**dict(d, group_index=np.full((3, 8), 2)))
    d["salient_mask"][1, 1] = True
    with pytest.raises(ValueError, match="salient_q"):
        pack_sage(**dict(d, salient_q=np.full((3, 8), -8)))  # -8 is outside the symmetric 4-bit range
    with pytest.raises(ValueError, match="salient_bits"):
        pack_sage(**dict(d, salient_bits=1))
    with pytest.raises(ValueError, match="finite"):
        pack_sage(**dict(d, salient_scale=np.array([1e6, 1.0, 1.0])))


def test_from_tensors_round_trip():
    packed = pack_sage(**random_decisions(np.random.default_rng(6), 4, 19, 3, 3, 0.2))
    again = PackedLinear.from_tensors(packed.tensors(), **packed.attrs())
    np.testing.assert_array_equal(dequantize(again), dequantize(packed))


@pytest.mark.parametrize("name,bad,message", [
    ("salient_q", lambda t: t.astype(np.int16), "salient_q: expected int8"),
    ("sign_bits", lambda t: t.view(np.uint8), "sign_bits: expected int8"),
    ("group_scales", lambda t: t.astype(np.float32), "group_scales: expected float16"),
    ("sign_bits", lambda t: t[:, :1], r"sign_bits: expected int8 \(4, 3\), got int8 \(4, 1\)"),
    ("group_codes", lambda t: t[:1], "group_codes: expected int8 \\(2, 4, 3\\)"),
    ("salient_scale", lambda t: t[:3], "salient_scale: expected float16 \\(4,\\)"),
    ("salient_cols", lambda t: t[:-1], "salient_cols: expected int8"),
    ("salient_cols", lambda t: t.astype(np.int16), "salient_cols: expected int8"),
])
def test_from_tensors_rejects_wrong_dtype_or_shape(name, bad, message):
    packed = pack_sage(**random_decisions(np.random.default_rng(7), 4, 19, 3, 4, 0.3))
    tensors = packed.tensors()
    tensors[name] = bad(tensors[name])
    with pytest.raises(ValueError, match=message):
        PackedLinear.from_tensors(tensors, **packed.attrs())


def test_from_tensors_rejects_bad_values():
    packed = pack_sage(**random_decisions(np.random.default_rng(8), 4, 16, 3, 4, 0.3))
    assert np.diff(packed.salient_rowptr).max() >= 2
    tensors = packed.tensors()
    with pytest.raises(ValueError, match="missing: salient_q"):
        PackedLinear.from_tensors({k: v for k, v in tensors.items() if k != "salient_q"}, **packed.attrs())
    row = int(np.argmax(np.diff(packed.salient_rowptr) >= 2))  # a row with at least two salient entries
    start = packed.salient_rowptr[row]
    swapped = packed.salient_cols.copy()
    swapped[[start, start + 1]] = swapped[[start + 1, start]]
    with pytest.raises(ValueError, match="ascending"):
        PackedLinear.from_tensors(dict(tensors, salient_cols=swapped), **packed.attrs())
    with pytest.raises(ValueError, match="group index"):
        codes = np.full_like(packed.group_codes, -1)  # every code = 3 >= G = 3
        PackedLinear.from_tensors(dict(tensors, group_codes=codes), **packed.attrs())
    with pytest.raises(ValueError, match="salient_q"):
        PackedLinear.from_tensors(dict(tensors, salient_q=np.full_like(packed.salient_q, 8)), **packed.attrs())


def test_contract_v3_columns_and_row_scales():
    """Columns past one byte keep both bytes; all-ones multipliers are stored empty and decode as ones; the
    same layer with [N] ones decodes identically (decoders must not depend on canonical form)."""
    d = random_decisions(np.random.default_rng(11), 3, 70_000 // 100, 3, 4, 0.2)
    packed = pack_sage(**d)
    np.testing.assert_array_equal(packed.columns, np.nonzero(d["salient_mask"])[1])
    assert packed.columns.max() > 255 and not packed.has_row_scales
    ones = PackedLinear.from_tensors(dict(packed.tensors(), row_scales=np.ones(3, np.float16)), **packed.attrs())
    assert ones.has_row_scales
    np.testing.assert_array_equal(dequantize(ones), dequantize(packed))
    assert pack_sage(**d, row_scales=np.ones(3)).row_scales.shape == (0,)
    assert pack_sage(**d, row_scales=np.array([1.0, 2.0, 1.0])).row_scales.shape == (3,)
    np.testing.assert_array_equal(salient_columns(pack_columns([0, 255, 256, 65535])), [0, 255, 256, 65535])


def test_in_features_beyond_16_bits_is_refused():
    with pytest.raises(ValueError, match="at most 65536"):
        pack_sage(**random_decisions(np.random.default_rng(12), 1, 65_537, 2, 4, 0.0))
