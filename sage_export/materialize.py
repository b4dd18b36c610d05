"""Put quantized weights into a torch model, so PyTorch computes exactly what the packed artifact decodes to.

Two forms: dense (the decoded float32 weight overwrites the Linear's: fast, 4 bytes per weight) and packed (a
runtime.SageLinear that decodes its weight on every call: bounded memory, used for streamed models)."""

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


def packable(result) -> bool:
    """True when a quantizer result is a SAGE layer the op can store (SageLinear, checkpoint, ONNX)."""
    return result.method == "sage" and hasattr(result, "packed") and result.stats.get("exportable", True)


@torch.no_grad()
def install_packed(model: torch.nn.Module, name: str, result) -> None:
    """Put one result into the model in bounded memory: a SageLinear when packable, else its dense weight (in
    place of a streamed model's meta weight too)."""
    from .models.streaming import set_parameter
    from .runtime.sage_linear import replace_linears

    if packable(result):
        replace_linears(model, {name: result.packed()})
        return
    set_parameter(model, f"{name}.weight", torch.from_numpy(dense_weight(result)))
