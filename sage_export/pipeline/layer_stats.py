"""Calibration statistics for activation-aware quantization, collected once from the unquantized model.

- Input energy h_k = E[x_k²] of every quantized Linear's input channel k (the diagonal of XᵀX/n, as llama.cpp's
  importance matrix): how much an error in column k of the weight costs inside that layer.
- Sensitivity s = E[(∂ℓ/∂y_n)²] averaged over the Linear's outputs n, with ℓ the token-summed next-token loss of
  the calibration ids (a diagonal Fisher estimate). It says how much the model's loss feels that layer's output
  error, which differs between layers by orders of magnitude (block 0's o_proj against block 29's on SmolLM2).

Together, s · Σ_k h_k ‖ΔW[:, k]‖² estimates (twice) the loss increase a weight error causes, in the same unit for
every layer: what a model-wide bit budget has to compare. Measured on SmolLM2-135M at 3.2 true bits (first 8
windows of WikiText-2 test): allocating by h-weighted error alone gave perplexity 640, by relative error 53, and
with the sensitivity 38.

Block by block, so only one block runs at a time (and, for a streamed model, only one block's weights are read
in at a time): the inputs of every block are kept (one [tokens, hidden] tensor per block), the forward pass
collects h, then the backward pass walks from the last block to the first, recomputing each block with a graph
and pushing the loss gradient through it. The kept inputs also give each
block's XᵀX on demand (block_hessians), for GPTQ-style compensation: measured on SmolLM2 at 3.2 bits, Hessians
from the unquantized model's inputs did as well as GPTQ's usual re-run through the quantized blocks (perplexity
30.1 against 30.6 on 8 windows) and cost one block pass instead of two.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.architectures import Architecture
from .calibration import _block0_inputs, _hessian_hooks, _run_block, averaged_hessians


@dataclass
class LayerStats:
    input_energy: dict[str, np.ndarray]  # qualified Linear name -> h [K], float64
    sensitivity: dict[str, float] | None  # qualified Linear name -> mean squared loss gradient of its output
    tokens: int
    time_s: float
    block_inputs: list[list[torch.Tensor]] | None = None  # per block, per batch: the block's input (kept on demand)
    block_kwargs: list[dict] | None = None  # per batch: the keyword arguments blocks are called with
    # The same for validation rows, run through the unquantized blocks but left out of every statistic: their XᵀX
    # judges the compensation on tokens it did not fit (SageRecipe.compensate_candidates).
    validation_inputs: list[list[torch.Tensor]] | None = None
    validation_kwargs: list[dict] | None = None

    def column_weights(self, name: str, activation: bool = True, sensitivity: bool = True,
                       power: float = 1.0, activation_power: float = 1.0) -> np.ndarray | None:
        """The error weight of each input column of one layer: s^power·m·(h/m)^activation_power, m the mean of h
        (either factor can be left out); None when both are, i.e. data-free. The mean is kept so that the
        layer's total stays in the units of s·h whatever the exponent."""
        if not (activation or sensitivity):
            return None
        k = self.input_energy[name].shape[0]
        weights = _flattened(self.input_energy[name], activation_power) if activation else np.ones(k)
        if sensitivity:
            if self.sensitivity is None:
                raise ValueError("these statistics were collected without sensitivities")
            weights = weights * self.sensitivity[name] ** power
        return weights


def _flattened(h: np.ndarray, exponent: float) -> np.ndarray:
    if exponent == 1.0:
        return h  # exactly h: m·(h/m) can differ from it in the last bit, and a = 1 must reproduce earlier runs
    mean = h.mean()
    return mean * (h / mean) ** exponent if mean > 0 else h


def _in_memory(_index: int) -> ContextManager:
    return nullcontext()  # the model holds every weight already


class _Accumulator:
    """Σ of a per-channel square over tokens, in float64, and how many tokens (rows) went in."""

    def __init__(self):
        self.total: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        flat = value.detach().reshape(-1, value.shape[-1]).float()
        self.total[name] = self.total.get(name, 0) + (flat * flat).sum(dim=0).double()
        self.rows[name] = self.rows.get(name, 0) + flat.shape[0]

    def means(self) -> dict[str, np.ndarray]:
        return {name: (total / self.rows[name]).numpy() for name, total in self.total.items()}


@contextmanager
def _frozen(model):
    """No parameter gradients: only activations' gradients are needed, and parameters' would cost memory."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _input_hooks(block, prefix: str, names: tuple[str, ...], acc: _Accumulator):
    def make(name):
        return lambda _module, args, _out: acc.add(name, args[0])

    return [block.get_submodule(n).register_forward_hook(make(f"{prefix}.{n}")) for n in names]


def _output_grad_hooks(block, prefix: str, names: tuple[str, ...], acc: _Accumulator):
    def make(name):
        def hook(_module, _args, out):
            if out.requires_grad:
                out.register_hook(lambda grad: acc.add(name, grad))

        return hook

    return [block.get_submodule(n).register_forward_hook(make(f"{prefix}.{n}")) for n in names]


def _remove(handles) -> None:
    for h in handles:
        h.remove()


def _head_gradients(model, arch: Architecture, hidden: list[torch.Tensor], calib: torch.Tensor) -> list[torch.Tensor]:
    """∂ℓ/∂(last block's output) for each batch, ℓ = Σ over tokens of the next-token loss. One row at a time:
    the logits of a whole batch ([rows, T, vocab] in float32) would be the largest tensor of the run."""
    norm, head = model.get_submodule(arch.final_norm), model.get_submodule(arch.lm_head)
    grads, first = [], 0
    for x in hidden:
        rows = []
        for r in range(x.shape[0]):
            xr = x[r : r + 1].detach().requires_grad_(True)
            logits = head(norm(xr))[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, calib[first + r, 1:], reduction="sum")
            rows.append(torch.autograd.grad(loss, xr)[0])
        grads.append(torch.cat(rows))
        first += x.shape[0]
    return grads


def _block_output(block, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    y = block(x, **kwargs)
    return y[0] if isinstance(y, tuple) else y


def collect_layer_stats(model, arch: Architecture, calib: torch.Tensor, sensitivity: bool = True,
                        keep_inputs: bool = False, progress: bool = True,
                        block_weights: Callable[[int], ContextManager] = _in_memory,
                        validation: torch.Tensor | None = None) -> LayerStats:
    """h for every quantized Linear, and (sensitivity=True) its sensitivity, from calibration ids [samples, T].
    keep_inputs keeps every block's inputs in the result, for block_hessians. block_weights(i) is entered around
    every pass through block i (LoadedModel.block_weights: a streamed model reads the block's weights then).
    validation ids [rows, T], when given, run through the same blocks outside the hooks, and their block inputs
    are kept (validation_inputs) for block_hessians(..., validation=True)."""
    start = time.perf_counter()
    blocks = model.get_submodule(arch.blocks)
    energy, grad_energy = _Accumulator(), _Accumulator()
    steps = len(blocks) * (2 if sensitivity else 1)
    bar = tqdm(total=steps, desc="calibration: statistics", unit="block", disable=not progress, leave=False)
    with _frozen(model):
        with torch.no_grad():
            hidden, kwargs = _block0_inputs(model, blocks, calib)
            saved = [hidden]
            held, held_kwargs = _block0_inputs(model, blocks, validation) if validation is not None else ([], [])
            held_saved = [held]
            for i, block in enumerate(blocks):
                with block_weights(i):
                    handles = _input_hooks(block, f"{arch.blocks}.{i}", arch.linears, energy)
                    try:
                        saved.append(_run_block(block, saved[-1], kwargs))
                    finally:
                        _remove(handles)
                    if validation is not None and i + 1 < len(blocks):  # after the hooks: not part of h
                        held_saved.append(_run_block(block, held_saved[-1], held_kwargs))
                bar.update()
        sens = None
        if sensitivity:
            with torch.enable_grad():
                grads = _head_gradients(model, arch, saved[-1], calib)
                for i in reversed(range(len(blocks))):
                    if not keep_inputs or i + 1 == len(blocks):
                        saved[i + 1] = None  # not needed any more
                    handles = _output_grad_hooks(blocks[i], f"{arch.blocks}.{i}", arch.linears, grad_energy)
                    try:
                        with block_weights(i):
                            grads = [_pull_back(blocks[i], x, g, kw) for x, g, kw in zip(saved[i], grads, kwargs)]
                    finally:
                        _remove(handles)
                    bar.update()
            sens = {name: float(v.mean()) for name, v in grad_energy.means().items()}
    bar.close()
    tokens = int(calib.numel())
    kept = saved[: len(blocks)] if keep_inputs else None
    held_kept = held_saved if validation is not None else None
    return LayerStats(energy.means(), sens, tokens, time.perf_counter() - start, kept,
                      kwargs if keep_inputs else None, held_kept, held_kwargs if validation is not None else None)


@torch.no_grad()
def block_hessians(model, arch: Architecture, stats: LayerStats, index: int,
                   block_weights: Callable[[int], ContextManager] = _in_memory,
                   inputs: list[torch.Tensor] | None = None, validation: bool = False,
                   linears: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """H = 2·XᵀX/n of the quantized Linears of block `index` (those of `linears`, names inside the block; default
    all), from its kept (unquantized-model) inputs, or from `inputs` (the block's inputs after the already-quantized
    blocks before it: see block_outputs), or (validation=True) from the kept inputs of the validation rows."""
    linears = arch.linears if linears is None else linears
    if not linears:
        return {}
    kept, kwargs = ((stats.validation_inputs, stats.validation_kwargs) if validation
                    else (stats.block_inputs, stats.block_kwargs))
    if kept is None:
        raise ValueError("these statistics were collected without "
                         + ("validation rows" if validation else "keep_inputs"))
    block = model.get_submodule(arch.blocks)[index]
    hessians, counts = {}, {}
    handles = _hessian_hooks(block, linears, hessians, counts)
    try:
        with block_weights(index):
            _run_block(block, kept[index] if inputs is None else inputs, kwargs)
    finally:
        _remove(handles)
    averaged = averaged_hessians(hessians, counts)
    return {f"{arch.blocks}.{index}.{n}": h for n, h in averaged.items()}


@torch.no_grad()
def block_outputs(model, arch: Architecture, stats: LayerStats, index: int, inputs: list[torch.Tensor],
                  block_weights: Callable[[int], ContextManager] = _in_memory) -> list[torch.Tensor]:
    """Block `index` run, as the model holds it now, on these inputs (batches as kept): the next block's inputs."""
    block = model.get_submodule(arch.blocks)[index]
    with block_weights(index):
        return _run_block(block, inputs, stats.block_kwargs)


def _pull_back(block, x: torch.Tensor, grad_out: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """∂ℓ/∂x for one block input x, given ∂ℓ/∂(block output); the Linear outputs' gradients pass its hooks."""
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(_block_output(block, x, kwargs), x, grad_outputs=grad_out)[0]
