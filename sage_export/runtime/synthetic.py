"""Random packed layers for kernel tests and benchmarks (no quantizer involved).

The weights follow the contract's structure, not a trained model's statistics: uniform random signs and group
indices, an unstructured salient set of the requested density, salient integers uniform in the symmetric b-bit
range. That is all the kernels' speed and correctness depend on.
"""

from __future__ import annotations

import numpy as np

from ..format.bits import n_planes
from ..format.sage_layout import PackedLinear, dequantize, pack_sage, salient_columns, salient_q_limit


def random_packed_linear(out_features: int, in_features: int, n_groups: int, *, salient_fraction: float = 0.03,
                         salient_bits: int = 4, row_scales: bool = True, seed: int = 0) -> PackedLinear:
    """A canonically packed random layer; each weight is salient with probability `salient_fraction`.
    row_scales=False stores none (contract v3's empty row_scales, every r_n = 1), as the default recipe does."""
    rng = np.random.default_rng(seed)
    shape = (out_features, in_features)
    limit = salient_q_limit(salient_bits)
    # Scales of the size a 7B model's weights have (|w| ~ 1e-2); group scales ascend like magnitude bands.
    group_scales = np.sort(rng.uniform(0.002, 0.05, n_groups))
    return pack_sage(
        signs=rng.random(shape, dtype=np.float32) < 0.5,
        group_index=rng.integers(0, n_groups, shape, dtype=np.int8),
        group_scales=group_scales,
        salient_mask=rng.random(shape, dtype=np.float32) < salient_fraction,
        salient_q=rng.integers(-limit, limit + 1, shape, dtype=np.int8),
        salient_scale=rng.uniform(0.01, 0.03, out_features),
        salient_bits=salient_bits,
        # Row multipliers around 1 (what the quantizer's rank-1 fit gives), never all equal, so a runtime that
        # ignores them fails its reference test. Drawn last, so the other tensors do not depend on the choice.
        row_scales=rng.uniform(0.5, 2.0, out_features) if row_scales else None,
    )


def scramble_salient_bits(p: PackedLinear, seed: int = 0) -> PackedLinear:
    """The same layer packed non-canonically: random sign bits and valid group codes at the salient positions,
    which decoders must ignore (docs/sage_binary_gemm.md, "Canonical packing")."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(p.out_features), np.diff(p.salient_rowptr))
    cols = salient_columns(p.salient_cols)
    byte, bit = cols // 8, (cols % 8).astype(np.uint8)

    def set_bits(bitmap: np.ndarray, values: np.ndarray) -> np.ndarray:
        out = bitmap.view(np.uint8).copy()
        np.bitwise_or.at(out, (rows, byte), (values.astype(np.uint8) << bit))
        return out.view(np.int8)

    codes = rng.integers(0, p.n_groups, rows.shape[0])
    planes = np.stack([set_bits(p.group_codes[i], (codes >> i) & 1) for i in range(n_planes(p.n_groups))]) \
        if p.group_codes.shape[0] else p.group_codes
    tensors = p.tensors() | {"sign_bits": set_bits(p.sign_bits, rng.integers(0, 2, rows.shape[0])),
                             "group_codes": planes.reshape(p.group_codes.shape).astype(np.int8)}
    return PackedLinear.from_tensors(tensors, **p.attrs())


def reference_error_ratio(y: np.ndarray, x: np.ndarray, p: PackedLinear, bias: np.ndarray | None = None) -> float:
    """Worst |y - reference| / tolerance over all outputs (<= 1 passes) for an implementation of the op.

    The contract fixes float32 accumulation but not the summation order, so the tolerance is the rigorous float32
    bound (K+2)·2⁻²⁴·Σ|x·Ŵ| (+|bias|; the 2 covers a row multiplier factored out of the sum), plus half a unit in
    the last place of float16 when the output is float16.
    A wrong bit, group, scale or salient entry changes an output by about |α·x|, far above it."""
    x32 = x.reshape(-1, p.in_features).astype(np.float32)
    w = dequantize(p)
    exact = x32.astype(np.float64) @ w.T.astype(np.float64)
    magnitude = np.abs(x32).astype(np.float64) @ np.abs(w).T.astype(np.float64)
    if bias is not None:
        exact += bias.astype(np.float32)
        magnitude += np.abs(bias.astype(np.float32))
    tolerance = (p.in_features + 2) * 2.0**-24 * magnitude + 1e-30
    if y.dtype == np.float16:
        tolerance += 2.0**-11 * np.abs(exact) + 2.0**-25  # rounding to float16 (normal, and subnormal near 0)
    err = np.abs(y.reshape(exact.shape).astype(np.float64) - exact)
    return float(np.max(err / tolerance)) if err.size else 0.0
