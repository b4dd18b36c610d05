"""Put quantized weights into a torch model, so PyTorch computes exactly what the packed artifact decodes to."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from .format.sage_layout import PackedLinear, dequantize


def dense_weight(layer) -> np.ndarray:
    """float32 [N, K] decoded from a PackedLinear or any QuantizedWeight."""
    return dequantize(layer) if isinstance(layer, PackedLinear) else layer.dequantize()


@torch.no_grad()
def apply_dequantized(model: torch.nn.Module, layers: Mapping[str, object]) -> None:
    """Overwrite each named nn.Linear's weight with its decoded quantized weight (same dtype as the model)."""
    for name, layer in layers.items():
        linear = model.get_submodule(name)
        weight = torch.from_numpy(dense_weight(layer))
        if tuple(weight.shape) != tuple(linear.weight.shape):
            raise ValueError(f"{name}: quantized shape {tuple(weight.shape)} != model shape {tuple(linear.weight.shape)}")
        linear.weight.copy_(weight.to(linear.weight.dtype))
