"""Exact round trips of every bit layout, plus hand-worked bytes that pin the bit order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_export.format.bits import (n_bytes, n_planes, pack_bits, pack_planes, pack_uint, unpack_bits,
                                     unpack_planes, unpack_uint)

shapes = st.tuples(st.integers(1, 5), st.integers(1, 40))  # K up to 40: multiples of 8 and not
seeds = st.integers(0, 2**32 - 1)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, lead=st.integers(1, 3), seed=seeds)
def test_pack_bits_round_trip(shape, lead, seed):
    rng = np.random.default_rng(seed)
    bits = rng.random((lead, *shape)) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == np.int8
    assert packed.shape == (lead, shape[0], n_bytes(shape[1]))
    np.testing.assert_array_equal(unpack_bits(packed, shape[1]), bits)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, n_groups=st.sampled_from([1, 2, 3, 4, 8]), seed=seeds)
def test_pack_planes_round_trip(shape, n_groups, seed):
    codes = np.random.default_rng(seed).integers(0, n_groups, size=shape)
    planes = pack_planes(codes, n_planes(n_groups))
    assert planes.dtype == np.int8
    assert planes.shape == (n_planes(n_groups), shape[0], n_bytes(shape[1]))
    decoded = unpack_planes(planes, shape[1])
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, codes)


@settings(max_examples=60, deadline=None)
@given(count=st.integers(0, 70), nbits=st.integers(1, 8), seed=seeds)
def test_pack_uint_round_trip(count, nbits, seed):
    values = np.random.default_rng(seed).integers(0, 1 << nbits, size=count)
    stream = pack_uint(values, nbits)
    assert stream.dtype == np.uint8 and stream.shape == (n_bytes(count * nbits),)
    np.testing.assert_array_equal(unpack_uint(stream, nbits, count), values)


def test_hand_worked_byte():
    # Columns 0..9 = 1 0 1 1 0 0 0 1 | 1 0. Byte 0 has bits 0, 2, 3, 7 set: 1 + 4 + 8 + 128 = 141 = 0x8D,
    # which as int8 is 141 - 256 = -115. Byte 1 holds column 8 in bit 0 and zero padding: 1.
    bits = np.array([1, 0, 1, 1, 0, 0, 0, 1, 1, 0], dtype=bool)
    packed = pack_bits(bits)
    np.testing.assert_array_equal(packed, np.array([-115, 1], dtype=np.int8))
    np.testing.assert_array_equal(packed.view(np.uint8), [0x8D, 0x01])


def test_hand_worked_planes():
    # Codes 0 1 2 3 2 over G = 4 (two planes). Plane 0 (bit 0): 0 1 0 1 0 -> bits 1, 3 -> 2 + 8 = 10.
    # Plane 1 (bit 1): 0 0 1 1 1 -> bits 2, 3, 4 -> 4 + 8 + 16 = 28.
    planes = pack_planes(np.array([[0, 1, 2, 3, 2]]), 2)
    np.testing.assert_array_equal(planes, np.array([[[10]], [[28]]], dtype=np.int8))


def test_hand_worked_uint_stream():
    # Three 3-bit values 5 (101), 3 (011), 6 (110), LSB first: bits 1 0 1 | 1 1 0 | 0 1 1 -> byte 0 holds bits
    # 0..7 = 1 0 1 1 1 0 0 1 -> 1 + 4 + 8 + 16 + 128 = 157; byte 1 holds bit 8 = 1 -> 1.
    stream = pack_uint(np.array([5, 3, 6]), 3)
    np.testing.assert_array_equal(stream, np.array([157, 1], dtype=np.uint8))


def test_n_planes():
    assert [n_planes(g) for g in (1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 2, 3, 3, 4]
    with pytest.raises(ValueError):
        n_planes(0)


def test_zero_planes_decode_to_group_zero():
    planes = pack_planes(np.zeros((3, 11), dtype=np.int64), 0)
    assert planes.shape == (0, 3, 2)
    np.testing.assert_array_equal(unpack_planes(planes, 11), np.zeros((3, 11)))


def test_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="codes"):
        pack_planes(np.array([[0, 4]]), 2)
    with pytest.raises(ValueError, match="values"):
        pack_uint(np.array([8]), 3)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(np.zeros((2, 3), dtype=np.int8), 8)
    with pytest.raises(ValueError, match="int8 or uint8"):
        unpack_bits(np.zeros((2, 1), dtype=np.int32), 8)
