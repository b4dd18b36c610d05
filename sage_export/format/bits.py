"""Bit packing for the packed weight layout (docs/sage_binary_gemm.md).

Two layouts live here:

* row bitmaps (`pack_bits`, `pack_planes`): one bit per column, bit j (least significant first) of byte c is
  column 8c+j, padding bits beyond K are 0. Stored as int8 because the TensorRT ONNX parser widens UINT8
  initializers to INT32; the bytes are the same, only the numpy dtype differs.
* a dense bitstream (`pack_uint`): nbits-wide unsigned values one after the other, least significant bit first.
  Baseline quantizers use it to store b-bit codes without wasting the rest of a byte.

Unpacking is a table lookup: each of the 256 byte values maps to its 8 bits once, so unpacking a matrix is one
fancy-indexing pass instead of eight shift-and-mask passes.
"""

from __future__ import annotations

import numpy as np

# _BYTE_TO_BITS[v, j] is bit j (LSB first) of byte value v.
_BYTE_TO_BITS = ((np.arange(256, dtype=np.uint8)[:, None] >> np.arange(8, dtype=np.uint8)) & 1).astype(bool)
# The same table as 0/1 bytes, for decoders that combine several bit-planes into one code.
BYTE_BITS = _BYTE_TO_BITS.view(np.uint8)


def n_bytes(k: int) -> int:
    """Bytes needed for k bits: ceil(k / 8)."""
    return (k + 7) // 8


def n_planes(n_groups: int) -> int:
    """Bit-planes needed to store a group index below n_groups: ceil(log2 G), 0 when G = 1."""
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    return (n_groups - 1).bit_length()


def _as_uint8(packed: np.ndarray) -> np.ndarray:
    packed = np.asarray(packed)
    if packed.dtype not in (np.int8, np.uint8):
        raise ValueError(f"packed bits must be int8 or uint8, got {packed.dtype}")
    return packed.view(np.uint8)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """bool [..., K] -> int8 [..., ceil(K/8)]; bit j of byte c is column 8c+j, padding bits are 0."""
    bits = np.asarray(bits, dtype=bool)
    return np.packbits(bits, axis=-1, bitorder="little").view(np.int8)


def unpack_bits(packed: np.ndarray, k: int) -> np.ndarray:
    """int8 [..., ceil(k/8)] -> bool [..., k]; the inverse of pack_bits (padding bits are dropped)."""
    raw = _as_uint8(packed)
    if raw.ndim == 0 or raw.shape[-1] != n_bytes(k):
        raise ValueError(f"packed bits for k={k} need {n_bytes(k)} bytes per row, got shape {raw.shape}")
    bits = _BYTE_TO_BITS[raw]  # [..., C, 8]
    return bits.reshape(*raw.shape[:-1], raw.shape[-1] * 8)[..., :k]


def pack_planes(codes: np.ndarray, n_planes: int) -> np.ndarray:
    """int [N, K] codes in [0, 2**n_planes) -> int8 [P, N, ceil(K/8)]; plane p holds bit p of every code."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << n_planes)):
        raise ValueError(f"codes must lie in [0, {1 << n_planes}) for {n_planes} planes, "
                         f"got range [{codes.min()}, {codes.max()}]")
    n, k = codes.shape
    codes = codes.astype(np.int64)
    planes = np.empty((n_planes, n, n_bytes(k)), dtype=np.int8)
    for p in range(n_planes):
        planes[p] = pack_bits((codes >> p) & 1)
    return planes


def unpack_planes(planes: np.ndarray, k: int) -> np.ndarray:
    """int8 [P, N, ceil(k/8)] -> int64 [N, k]; the inverse of pack_planes (P = 0 gives all zeros)."""
    planes = np.asarray(planes)
    if planes.ndim != 3:
        raise ValueError(f"planes must be 3-D [P, N, C], got shape {planes.shape}")
    codes = np.zeros((planes.shape[1], k), dtype=np.int64)
    for p in range(planes.shape[0]):
        codes |= unpack_bits(planes[p], k).astype(np.int64) << p
    return codes


def pack_uint(values: np.ndarray, nbits: int) -> np.ndarray:
    """Unsigned ints in [0, 2**nbits) -> uint8 1-D bitstream; value i takes bits [i*nbits, (i+1)*nbits), LSB
    first, so the stream is ceil(len * nbits / 8) bytes. Values are taken in C order (flattened)."""
    if not 1 <= nbits <= 8:
        raise ValueError(f"nbits must be in 1..8, got {nbits}")
    values = np.asarray(values).ravel()
    if values.size and (values.min() < 0 or values.max() >= (1 << nbits)):
        raise ValueError(f"values must lie in [0, {1 << nbits}) for nbits={nbits}, "
                         f"got range [{values.min()}, {values.max()}]")
    shifts = np.arange(nbits, dtype=np.int64)
    bits = (values.astype(np.int64)[:, None] >> shifts) & 1  # [count, nbits], LSB first
    return np.packbits(bits.astype(bool).ravel(), bitorder="little")


def unpack_uint(stream: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """uint8 1-D bitstream -> int64 [count]; the inverse of pack_uint."""
    if not 1 <= nbits <= 8:
        raise ValueError(f"nbits must be in 1..8, got {nbits}")
    raw = _as_uint8(stream)
    needed = n_bytes(count * nbits)
    if raw.ndim != 1 or raw.shape[0] != needed:
        raise ValueError(f"stream of {count} {nbits}-bit values needs {needed} bytes, got shape {raw.shape}")
    bits = _BYTE_TO_BITS[raw].ravel()[: count * nbits].reshape(count, nbits)
    weights = np.int64(1) << np.arange(nbits, dtype=np.int64)
    return bits.astype(np.int64) @ weights
