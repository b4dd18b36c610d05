"""Quantize every declared Linear of a loaded model with one method, and put the decoded weights back into it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..materialize import apply_dequantized, dense_weight
from ..models import LoadedModel, quantizable_linears
from .calibration import quantize_sequential
from .methods import Method, quantize_weight


@dataclass
class QuantizedModel:
    method: Method
    layers: dict[str, object]  # qualified Linear name -> QuantizedWeight, in block/execution order
    seed: int
    time_s: float
    calibration: dict | None = None  # what calibrated it (text, samples, seqlen), None for data-free methods


def layer_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed per matrix, so subsamples differ between layers but not between runs."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _postfix(result) -> str:
    s = result.stats
    if "n_groups" in s:
        return f"G={s['n_groups']} rho={s.get('realised_rho', 0):.4f}"
    return f"rel_err={s.get('rel_error', float('nan')):.3f}"


def _quantize_data_free(loaded: LoadedModel, method: Method, seed: int, progress: bool) -> dict:
    linears = quantizable_linears(loaded.model, loaded.architecture)
    results = {}
    bar = tqdm(linears.items(), desc=f"quantize ({method.label})", unit="layer", disable=not progress)
    for i, (name, linear) in enumerate(bar):
        w = linear.weight.detach().float().numpy()
        results[name] = quantize_weight(method, w, None, layer_seed(seed, i))
        bar.set_postfix_str(_postfix(results[name]), refresh=False)
    apply_dequantized(loaded.model, results)
    return results


@torch.no_grad()
def _apply_one(linear: torch.nn.Linear, result) -> None:
    linear.weight.copy_(torch.from_numpy(dense_weight(result)).to(linear.weight.dtype))


def quantize_model(loaded: LoadedModel, method: Method, seed: int = 0, calib: torch.Tensor | None = None,
                   calib_info: dict | None = None, progress: bool = True) -> QuantizedModel:
    """Quantize in place: afterwards loaded.model carries the decoded quantized weights."""
    start = time.perf_counter()
    if method.needs_calibration:
        if calib is None:
            raise ValueError(f"method {method.label} needs calibration text")
        names = list(quantizable_linears(loaded.model, loaded.architecture))
        index = {n: i for i, n in enumerate(names)}
        results = quantize_sequential(
            loaded.model, loaded.architecture, calib,
            lambda name, w, h: quantize_weight(method, w, h, layer_seed(seed, index[name])),
            _apply_one, progress,
        )
    else:
        results = _quantize_data_free(loaded, method, seed, progress)
    return QuantizedModel(method, results, seed, time.perf_counter() - start,
                          calib_info if method.needs_calibration else None)
