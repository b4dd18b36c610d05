"""NumPy reference of the SageBinaryGemm op (contract v3, docs/sage_binary_gemm.md).

This is the ground truth the ONNX function body, the CUDA kernels and the TensorRT plugin are tested against:
decode Ŵ once with format.sage_layout.dequantize, then Y = X·Ŵᵀ (+ bias) in float32, cast to X's dtype.
"""

from __future__ import annotations

import numpy as np

from ..format.sage_layout import PackedLinear, dequantize

SUPPORTED_X_DTYPES = (np.float16, np.float32)


def sage_binary_gemm(x: np.ndarray, sign_bits: np.ndarray, group_codes: np.ndarray, group_scales: np.ndarray,
                     salient_rowptr: np.ndarray, salient_cols: np.ndarray, salient_q: np.ndarray,
                     salient_scale: np.ndarray, row_scales: np.ndarray, bias: np.ndarray | None = None, *,
                     in_features: int,
                     out_features: int, n_groups: int, salient_bits: int) -> np.ndarray:
    """The op with its inputs and attributes spelled out as in the contract. Inputs are validated first."""
    packed = PackedLinear.from_tensors(
        {"sign_bits": sign_bits, "group_codes": group_codes, "group_scales": group_scales,
         "salient_rowptr": salient_rowptr, "salient_cols": salient_cols, "salient_q": salient_q,
         "salient_scale": salient_scale, "row_scales": row_scales},
        in_features=in_features, out_features=out_features, n_groups=n_groups, salient_bits=salient_bits)
    return sage_binary_gemm_packed(x, packed, bias)


def sage_binary_gemm_packed(x: np.ndarray, p: PackedLinear, bias: np.ndarray | None = None) -> np.ndarray:
    """X [..., K] float16/float32 -> Y [..., N] in X's dtype, accumulated in float32."""
    x = np.asarray(x)
    if x.dtype not in SUPPORTED_X_DTYPES:
        raise ValueError(f"X: expected float16 or float32, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != p.in_features:
        raise ValueError(f"X: expected last dimension {p.in_features}, got shape {x.shape}")
    w = dequantize(p)  # built once per call
    y = x.reshape(-1, p.in_features).astype(np.float32) @ w.T
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (p.out_features,):
            raise ValueError(f"bias: expected shape ({p.out_features},), got {bias.shape}")
        y += bias.astype(np.float32)
    return y.reshape(*x.shape[:-1], p.out_features).astype(x.dtype)
