"""Bit accounting (SPEC §4): the paper's per-weight figures next to what the artifact really stores.

A layout change that lowers `true_bits` is a real saving; one that only lowers `sage_paper_bits` is not.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def stored_bytes(tensors: dict[str, np.ndarray]) -> int:
    """Bytes of the arrays exactly as stored (their dtype and packed shape)."""
    return int(sum(np.asarray(t).nbytes for t in tensors.values()))


def true_bits(tensors: dict[str, np.ndarray], n: int, k: int) -> float:
    """True storage per weight: 8 * (bytes of every stored array) / (N * K)."""
    return 8 * stored_bytes(tensors) / (n * k)


def sage_paper_bits(n: int, k: int, nnz: int, salient_bits: int, n_groups: int, row_scales: int) -> dict[str, float]:
    """Paper accounting: 1 bit per unsalient weight and b per salient weight; one float16 salient scale per row,
    the row_scales stored (N or none) and one scale per group. Signs' packing padding, CSR indices and group codes
    are not counted."""
    nk = n * k
    return {
        "weight_bits": ((nk - nnz) * 1 + nnz * salient_bits) / nk,
        "scale_bits": 16 * (n + row_scales + n_groups) / nk,
    }


def summarize(layers: dict[str, tuple[int, int, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """Model-level true storage over several layers {name: (N, K, stored tensors)}: total bytes over total
    weights (not a mean of per-layer figures), next to the float16 size of the same layers (2 bytes a weight)."""
    per_layer = {}
    for name, (n, k, tensors) in layers.items():
        nbytes = stored_bytes(tensors)
        per_layer[name] = {"n": n, "k": k, "bytes": nbytes, "true_bits": 8 * nbytes / (n * k)}
    n_weights = sum(entry["n"] * entry["k"] for entry in per_layer.values())
    total_bytes = sum(entry["bytes"] for entry in per_layer.values())
    return {
        "n_layers": len(per_layer),
        "n_weights": n_weights,
        "stored_bytes": total_bytes,
        "true_bits": 8 * total_bytes / n_weights if n_weights else 0.0,
        "fp16_bytes": 2 * n_weights,
        "layers": per_layer,
    }
