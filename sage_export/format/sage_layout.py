"""The packed SAGE weight: the eight tensors of the SageBinaryGemm op (contract v3, docs/sage_binary_gemm.md).

`pack_sage` turns a quantizer's decisions (sign, group, salient set, salient integers, scales) into the packed
tensors; `dequantize` is the one decoder every other implementation (ONNX function, CUDA kernel, TensorRT plugin)
must agree with bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bits import BYTE_BITS, n_bytes, n_planes, pack_bits, pack_planes, unpack_planes

# Contract input order (inputs 1..8 of the op; X is 0 and bias 9).
TENSOR_NAMES = ("sign_bits", "group_codes", "group_scales", "salient_rowptr", "salient_cols", "salient_q",
                "salient_scale", "row_scales")
ATTR_NAMES = ("in_features", "out_features", "n_groups", "salient_bits")
MIN_SALIENT_BITS, MAX_SALIENT_BITS = 2, 8
MAX_IN_FEATURES = 1 << 16  # a salient column is stored in 16 bits (v3)


def salient_q_limit(salient_bits: int) -> int:
    """Largest |q| of a symmetric signed b-bit integer: 2**(b-1) - 1 (so -2**(b-1) is never used)."""
    return (1 << (salient_bits - 1)) - 1


@dataclass(frozen=True, eq=False)
class PackedLinear:
    """One packed weight matrix W [N = out_features, K = in_features]. Construction validates everything the
    op's semantics depend on, so a PackedLinear that exists is one every runtime can decode."""

    in_features: int
    out_features: int
    n_groups: int
    salient_bits: int
    sign_bits: np.ndarray  # int8 [N, ceil(K/8)]
    group_codes: np.ndarray  # int8 [P, N, ceil(K/8)]
    group_scales: np.ndarray  # float16 [G]
    salient_rowptr: np.ndarray  # int32 [N+1]
    salient_cols: np.ndarray  # int8 [nnz, 2]: each column as a little-endian uint16 (v3)
    salient_q: np.ndarray  # int8 [nnz]
    salient_scale: np.ndarray  # float16 [N]
    row_scales: np.ndarray  # float16 [N], or [0] when every row's multiplier is 1 (v3)

    def __post_init__(self) -> None:
        _check_attrs(self.in_features, self.out_features, self.n_groups, self.salient_bits)
        row_scaled = np.asarray(self.row_scales).shape != (0,)
        expected = _expected_specs(self.in_features, self.out_features, self.n_groups, self._declared_nnz(),
                                   row_scaled)
        for name in TENSOR_NAMES:
            _check_tensor(name, getattr(self, name), *expected[name])
        _check_csr(self.salient_rowptr, salient_columns(self.salient_cols), self.in_features)
        _check_values(self)

    def _declared_nnz(self) -> int:
        rowptr = np.asarray(self.salient_rowptr)
        if rowptr.ndim != 1 or rowptr.shape[0] != self.out_features + 1:
            raise ValueError(f"salient_rowptr: expected shape ({self.out_features + 1},), got {rowptr.shape}")
        return int(rowptr[-1])

    @property
    def nnz(self) -> int:
        return int(self.salient_cols.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def columns(self) -> np.ndarray:
        """int64 [nnz]: the salient entries' columns, decoded from their 16-bit storage."""
        return salient_columns(self.salient_cols)

    @property
    def has_row_scales(self) -> bool:
        """Whether row multipliers are stored (an empty row_scales means every r_n is 1)."""
        return self.row_scales.shape[0] > 0

    def tensors(self) -> dict[str, np.ndarray]:
        """The eight packed op inputs, by name, in contract order."""
        return {name: getattr(self, name) for name in TENSOR_NAMES}

    def attrs(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in ATTR_NAMES}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], *, in_features: int, out_features: int, n_groups: int,
                     salient_bits: int) -> PackedLinear:
        """Rebuild from stored tensors (e.g. a checkpoint); a missing, misshapen or mistyped tensor -> ValueError."""
        missing = [name for name in TENSOR_NAMES if name not in tensors]
        if missing:
            raise ValueError(f"packed tensors missing: {', '.join(missing)}")
        extra = sorted(set(tensors) - set(TENSOR_NAMES))
        if extra:
            raise ValueError(f"unexpected packed tensors: {', '.join(extra)}")
        return cls(int(in_features), int(out_features), int(n_groups), int(salient_bits),
                   **{name: np.asarray(tensors[name]) for name in TENSOR_NAMES})


def _check_attrs(k: int, n: int, g: int, b: int) -> None:
    if k < 1 or n < 1:
        raise ValueError(f"in_features and out_features must be >= 1, got K={k}, N={n}")
    if k > MAX_IN_FEATURES:
        raise ValueError(f"in_features must be at most {MAX_IN_FEATURES} (salient columns are 16-bit), got {k}")
    if g < 1:
        raise ValueError(f"n_groups must be >= 1, got {g}")
    if not MIN_SALIENT_BITS <= b <= MAX_SALIENT_BITS:
        raise ValueError(f"salient_bits must be in {MIN_SALIENT_BITS}..{MAX_SALIENT_BITS}, got {b}")


def _expected_specs(k: int, n: int, g: int, nnz: int, row_scaled: bool) -> dict[str, tuple[type, tuple[int, ...]]]:
    c = n_bytes(k)
    return {
        "sign_bits": (np.int8, (n, c)),
        "group_codes": (np.int8, (n_planes(g), n, c)),
        "group_scales": (np.float16, (g,)),
        "salient_rowptr": (np.int32, (n + 1,)),
        "salient_cols": (np.int8, (nnz, 2)),
        "salient_q": (np.int8, (nnz,)),
        "salient_scale": (np.float16, (n,)),
        "row_scales": (np.float16, (n if row_scaled else 0,)),
    }


def salient_columns(packed: np.ndarray) -> np.ndarray:
    """int64 [nnz] from the stored int8 [nnz, 2] (little-endian uint16 per column)."""
    return np.ascontiguousarray(packed).view(np.uint8).astype(np.int64) @ np.array([1, 256], dtype=np.int64)


def pack_columns(cols: np.ndarray) -> np.ndarray:
    """The stored int8 [nnz, 2] of columns in [0, 65536)."""
    return np.asarray(cols, dtype="<u2").reshape(-1, 1).view(np.uint8).view(np.int8).reshape(-1, 2)


def stored_bytes(out_features: int, in_features: int, n_groups: int, nnz: int, row_scaled: bool = False) -> int:
    """Bytes of the eight packed tensors of a layer, from its shape, G, salient count and whether row multipliers
    are stored: what sum(nbytes) of pack_sage's output will be. The bit budget prices options with it before
    packing any."""
    specs = _expected_specs(in_features, out_features, n_groups, nnz, row_scaled)
    return int(sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for dtype, shape in specs.values()))


def _check_tensor(name: str, array: np.ndarray, dtype: type, shape: tuple[int, ...]) -> None:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(array).__name__}")
    got = (array.dtype, array.shape)
    if got != (np.dtype(dtype), shape):
        raise ValueError(f"{name}: expected {np.dtype(dtype)} {shape}, got {array.dtype} {array.shape}")


def _check_csr(rowptr: np.ndarray, cols: np.ndarray, k: int) -> None:
    if rowptr[0] != 0 or np.any(np.diff(rowptr) < 0):
        raise ValueError("salient_rowptr: must start at 0 and never decrease")
    if cols.size and (cols.min() < 0 or cols.max() >= k):
        raise ValueError(f"salient_cols: columns must lie in [0, {k}), got [{cols.min()}, {cols.max()}]")
    # Within a row columns rise strictly; a row boundary is the only place they may fall or repeat.
    rising = np.diff(cols.astype(np.int64)) > 0
    row_starts = rowptr[1:-1]
    boundary = np.zeros(rising.shape, dtype=bool)
    inner = row_starts[(row_starts > 0) & (row_starts < cols.size)]
    boundary[inner - 1] = True
    if not np.all(rising | boundary):
        raise ValueError("salient_cols: columns must be strictly ascending within each row (no duplicates)")


def _check_values(p: PackedLinear) -> None:
    limit = salient_q_limit(p.salient_bits)
    if p.nnz and np.abs(p.salient_q.astype(np.int16)).max() > limit:
        raise ValueError(f"salient_q: values must lie in [-{limit}, {limit}] for salient_bits={p.salient_bits}")
    if p.group_codes.shape[0] and unpack_planes(p.group_codes, p.in_features).max() >= p.n_groups:
        raise ValueError(f"group_codes: a group index is >= n_groups={p.n_groups}")
    for name in ("group_scales", "salient_scale", "row_scales"):  # an empty row_scales passes
        if not np.all(np.isfinite(getattr(p, name))):
            raise ValueError(f"{name}: scales must be finite float16")


def pack_sage(signs: np.ndarray, group_index: np.ndarray, group_scales: np.ndarray, salient_mask: np.ndarray,
              salient_q: np.ndarray, salient_scale: np.ndarray, salient_bits: int,
              row_scales: np.ndarray | None = None) -> PackedLinear:
    """Pack one quantized matrix canonically: at salient positions the sign bit and group code are 0 (they are
    never read), padding bits are 0, salient entries are listed row by row with ascending columns. Scales are
    rounded to float16 here, so dequantize() of the result is what a runtime computes.

    signs: bool [N, K] (True -> +alpha); group_index: int [N, K] (read only at unsalient positions);
    group_scales: float [G]; salient_mask: bool [N, K]; salient_q: int [N, K] (read only at salient positions);
    salient_scale: float [N]; row_scales: float [N], the multiplier of each row's unsalient weights (None: all
    1.0, the v1 meaning). Multipliers that are all 1.0 in float16 are stored as an empty row_scales (v3)."""
    signs = np.asarray(signs, dtype=bool)
    if signs.ndim != 2:
        raise ValueError(f"signs: expected a 2-D [N, K] array, got shape {signs.shape}")
    n, k = signs.shape
    salient_mask = _matrix("salient_mask", salient_mask, (n, k)).astype(bool)
    group_index = _matrix("group_index", group_index, (n, k)).astype(np.int64)
    salient_q = _matrix("salient_q", salient_q, (n, k)).astype(np.int64)
    scales16 = _to_float16("group_scales", group_scales, None)
    salient_scale16 = _to_float16("salient_scale", salient_scale, (n,))
    row_scales16 = _to_float16("row_scales", np.ones(n) if row_scales is None else row_scales, (n,))
    if np.all(row_scales16 == 1):  # canonical: no multipliers stored where every one is 1
        row_scales16 = row_scales16[:0]
    g = scales16.shape[0]
    _check_attrs(k, n, g, salient_bits)

    unsalient_groups = group_index[~salient_mask]
    if unsalient_groups.size and (unsalient_groups.min() < 0 or unsalient_groups.max() >= g):
        raise ValueError(f"group_index: unsalient entries must lie in [0, {g}), "
                         f"got [{unsalient_groups.min()}, {unsalient_groups.max()}]")
    limit = salient_q_limit(salient_bits)
    q_values = salient_q[salient_mask]  # row-major, i.e. CSR order
    if q_values.size and np.abs(q_values).max() > limit:
        raise ValueError(f"salient_q: salient entries must lie in [-{limit}, {limit}] for salient_bits="
                         f"{salient_bits}, got [{q_values.min()}, {q_values.max()}]")

    rows, cols = np.nonzero(salient_mask)  # row-major order: columns ascend within each row
    rowptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=rowptr[1:])
    return PackedLinear(
        in_features=k, out_features=n, n_groups=g, salient_bits=int(salient_bits),
        sign_bits=pack_bits(signs & ~salient_mask),
        group_codes=pack_planes(np.where(salient_mask, 0, group_index), n_planes(g)),
        group_scales=scales16,
        salient_rowptr=rowptr.astype(np.int32),
        salient_cols=pack_columns(cols),
        salient_q=q_values.astype(np.int8),
        salient_scale=salient_scale16,
        row_scales=row_scales16,
    )


def _matrix(name: str, array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {array.shape}")
    return array


def _to_float16(name: str, values: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or (shape is not None and values.shape != shape):
        raise ValueError(f"{name}: expected shape {shape or '(G,)'}, got {values.shape}")
    with np.errstate(over="ignore"):  # overflow is reported below, in one clear line
        rounded = values.astype(np.float16)
    if not np.all(np.isfinite(rounded)):
        raise ValueError(f"{name}: values must be finite in float16 (|x| <= 65504)")
    return rounded


def dequantize(p: PackedLinear) -> np.ndarray:
    """float32 [N, K]: Ŵ exactly as the op defines it. Every product is exact in float32 (a float16 scale times
    ±1, another float16 or an integer of at most 8 bits), so all runtimes can agree bit for bit."""
    return decode(p.in_features, **p.tensors())


def decode(in_features: int, sign_bits, group_codes, group_scales, salient_rowptr, salient_cols, salient_q,
           salient_scale, row_scales) -> np.ndarray:
    """dequantize() on the eight tensors of a layer already validated (a SageLinear's buffers): no checks.

    Each weight's sign bit and group bits form one small code (sign + 2·group) and a table of the 2G values ±s_g
    is indexed by it: one pass over N·K bytes instead of separate sign, group and product passes (2x faster; the
    torch model of a streamed run decodes every layer on every call)."""
    n = sign_bits.shape[0]
    codes = BYTE_BITS[sign_bits.view(np.uint8)]  # [N, C, 8] uint8
    for plane in range(group_codes.shape[0]):
        codes |= BYTE_BITS[group_codes[plane].view(np.uint8)] << np.uint8(plane + 1)
    scales = group_scales.astype(np.float32)
    table = np.stack([-scales, scales], axis=1).ravel()  # code 2g -> -s_g, 2g+1 -> +s_g
    w = table[codes.reshape(n, -1)[:, :in_features]]
    if row_scales.shape[0]:  # empty: every r_n is 1
        w *= row_scales.astype(np.float32)[:, None]  # exact: two float16 mantissas fit float32's
    rows = np.repeat(np.arange(n), np.diff(salient_rowptr))
    w[rows, salient_columns(salient_cols)] = salient_scale.astype(np.float32)[rows] * salient_q.astype(np.float32)
    return w
