"""Quantize every declared Linear of a loaded model with one method, and put the decoded weights back into it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..materialize import dense_weight, install_packed
from ..models import LoadedModel, quantizable_linears
from .calibration import quantize_sequential
from .methods import Method, quantize_weight
from .workers import MatrixPool


@dataclass
class QuantizedModel:
    method: Method
    layers: dict[str, object]  # qualified Linear name -> QuantizedWeight, in block/execution order
    seed: int
    time_s: float
    calibration: dict | None = None  # what calibrated it (source, samples, seqlen), None for data-free methods
    budget: dict | None = None  # the v2 preset's budget summary (target, price, achieved bits, timings)


def layer_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed per matrix, so subsamples differ between layers but not between runs."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def layer_seeds(loaded: LoadedModel, seed: int) -> dict[str, int]:
    """{matrix name: its seed}, by the matrix's position in the model."""
    return {name: layer_seed(seed, i) for i, name in enumerate(quantizable_linears(loaded.model, loaded.architecture))}


def _postfix(result) -> str:
    s = result.stats
    if "n_groups" in s:
        return f"G={s['n_groups']} rho={s.get('realised_rho', 0):.4f}"
    return f"rel_err={s.get('rel_error', float('nan')):.3f}"


def _quantize_item(item: tuple) -> object:
    """Worker: (method, W, H or None, seed) -> quantizer result."""
    method, w, hessian, seed = item
    result = quantize_weight(method, w, hessian, seed)
    # SAGE's decision arrays are 4 bytes per weight; what is kept until export is only what gets stored.
    return result.compact() if hasattr(result, "compact") else result


def _quantize_data_free(loaded: LoadedModel, method: Method, seed: int, pool: MatrixPool, progress: bool) -> dict:
    """One matrix at a time from the model (or, streamed, from its file), each result put back packed as it
    arrives: memory holds the packed layers and the few matrices in flight, never the dense model."""
    names = list(quantizable_linears(loaded.model, loaded.architecture))
    seeds = layer_seeds(loaded, seed)
    items = ((method, loaded.weight(name), None, seeds[name]) for name in names)
    results = {}
    bar = tqdm(zip(names, pool.map(_quantize_item, items)), total=len(names),
               desc=f"quantize ({method.label})", unit="layer", disable=not progress)
    for name, result in bar:
        results[name] = result
        install_packed(loaded.model, name, result)
        bar.set_postfix_str(_postfix(result), refresh=False)
    return results


@torch.no_grad()
def _apply_one(linear: torch.nn.Linear, result) -> None:
    linear.weight.copy_(torch.from_numpy(dense_weight(result)).to(linear.weight.dtype))


def quantize_model(loaded: LoadedModel, method: Method, seed: int = 0, calib: torch.Tensor | None = None,
                   calib_info: dict | None = None, progress: bool = True, jobs: int | None = None,
                   validation: torch.Tensor | None = None) -> QuantizedModel:
    """Quantize in place: afterwards loaded.model carries the decoded quantized weights. `jobs` worker processes
    share the per-matrix work (default: every core); results do not depend on it. validation: calibration rows
    held out of the statistics, for SageRecipe.compensate_candidates."""
    start = time.perf_counter()
    if method.needs_calibration and calib is None:
        raise ValueError(f"method {method.label} needs calibration tokens")
    seeds = layer_seeds(loaded, seed)
    budget = None
    if loaded.streamed and not method.streams:
        loaded.materialize()  # these end with every weight dense in the model anyway
    with MatrixPool(jobs) as pool:
        if method.preset == "v2":
            from .sage_v2 import quantize_v2

            results, budget = quantize_v2(loaded, method.sage_recipe(), method.sage_config(), seeds, calib, pool,
                                          progress, validation)
        elif method.needs_calibration:
            def quantize_block(items):
                return pool.map(_quantize_item, [(method, w, h, seeds[name]) for name, w, h in items])

            results = quantize_sequential(loaded.model, loaded.architecture, calib, quantize_block, _apply_one,
                                          progress)
        else:
            results = _quantize_data_free(loaded, method, seed, pool, progress)
    return QuantizedModel(method, results, seed, time.perf_counter() - start,
                          calib_info if method.needs_calibration else None, budget)
