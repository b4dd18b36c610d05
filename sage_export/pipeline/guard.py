"""The guard every v2 run carries: on calibration tokens held out of the calibration itself, the perplexity of the
unquantized model, of the result, and of plain round-to-nearest at the uniform setting with the most true bits at
or below what the result stores. A user sees in the report, and in one warning line, when SAGE did worse than the
simplest baseline on their own model: a method tuned on one model is not trusted on another.

FP and RTN are scored before quantization (the unquantized weights are still there, or still in the file when
streamed); the RTN weights replace each block's Linears only while that block runs, so memory grows by one block.
Since the achieved bits are at least the budget − BITS_TOLERANCE (the budget's contract), choosing the RTN setting
from that floor keeps it at or below the result's bits without waiting for them.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

from ..models import LoadedModel, quantizable_linears
from .calibration import row_batches
from ..quant.rtn import SUPPORTED_BITS, n_groups, quantize_rtn

GROUP_SIZES = (32, 64, 128, 256)
BITS_TOLERANCE = 0.02  # the achieved true bits of a v2 run lie in [budget − this, budget]


def held_out_rows(n_samples: int) -> int:
    """Calibration rows set aside for the guard: an eighth of the calibration, at least 2."""
    return max(2, n_samples // 8)


def rtn_true_bits(shapes: list[tuple[int, int]], bits: int, group_size: int) -> float:
    """True bits of RTN at one setting over these matrices, from its stored layout (quant/rtn.py): the codes and
    the zero-points as b-bit bitstreams, a float16 scale per group."""
    total = 0
    for n, k in shapes:
        g = n_groups(k, group_size)
        total += math.ceil(n * k * bits / 8) + 2 * n * g + math.ceil(n * g * bits / 8)
    return 8 * total / sum(n * k for n, k in shapes)


def uniform_setting(shapes: list[tuple[int, int]], max_bits: float) -> dict | None:
    """The RTN setting with the most true bits at or below max_bits (None when even the smallest is above)."""
    options = [{"bits": b, "group_size": gs, "true_bits": rtn_true_bits(shapes, b, gs)}
               for b in SUPPORTED_BITS for gs in GROUP_SIZES]
    fitting = [o for o in options if o["true_bits"] <= max_bits]
    return max(fitting, key=lambda o: o["true_bits"]) if fitting else None


@torch.no_grad()
def mean_nll(model, ids: torch.Tensor, batch_tokens: int = 1024) -> float:
    """Mean next-token loss over every predicted token of the rows of ids, several rows per forward call: the RTN
    hooks decode every Linear once per call (one row per call made the guard 61 s of a 354 s default run), and
    1,024 tokens keep the logits of a 152k-word vocabulary near 0.6 GB."""
    total = 0.0
    for rows in row_batches(ids, batch_tokens):
        logits = model(rows, use_cache=False).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                                   reduction="sum").item()
    return total / (ids.shape[0] * (ids.shape[1] - 1))


@contextmanager
def decoded_while_running(loaded: LoadedModel, decode):
    """Inside, each decoder block runs with its Linears' weights replaced by decode(name, weight) (name: the
    Linear's full name, weight: float32 [N, K] as the block holds it when called, streamed: just read in; None
    leaves that Linear as it is); the weights are put back when the block returns."""
    blocks_name = loaded.architecture.blocks
    blocks = loaded.model.get_submodule(blocks_name)
    saved: dict[int, list] = {}

    def swap_in(index):
        def hook(block, _args):
            saved[index] = []
            for name in loaded.architecture.linears:
                weight = block.get_submodule(name).weight
                decoded = decode(f"{blocks_name}.{index}.{name}", weight.detach().float().numpy())
                if decoded is None:
                    continue
                saved[index].append((weight, weight.data))
                weight.data = torch.from_numpy(decoded).to(weight.dtype)
        return hook

    def swap_out(index):
        def hook(_block, _args, _out):
            for weight, data in saved.pop(index):
                weight.data = data
        return hook

    handles = []
    try:
        for i, block in enumerate(blocks):
            # prepend: these run after a streamed block's weights are read and before they are dropped.
            handles += [block.register_forward_pre_hook(swap_in(i)),
                        block.register_forward_hook(swap_out(i), prepend=True)]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for pairs in saved.values():
            for weight, data in pairs:
                weight.data = data


def rtn_while_running(loaded: LoadedModel, bits: int, group_size: int):
    """Each decoder block runs with its Linears' weights replaced by their RTN decoding (decoded_while_running)."""
    return decoded_while_running(loaded, lambda _name, w: quantize_rtn(w, bits, group_size).dequantize())


def score_before(loaded: LoadedModel, held: torch.Tensor, budget_bits: float) -> dict:
    """FP and RTN perplexity on the held-out rows, before the model is quantized."""
    start = time.perf_counter()
    shapes = [tuple(linear.weight.shape) for linear in quantizable_linears(loaded.model, loaded.architecture).values()]
    with loaded.running_weights():  # streamed: the unquantized weights are read from the file block by block
        guard = {"held_out": {"rows": int(held.shape[0]),
                              "tokens_scored": int(held.shape[0] * (held.shape[1] - 1))},
                 "fp_ppl": math.exp(mean_nll(loaded.model, held))}
        setting = uniform_setting(shapes, budget_bits - BITS_TOLERANCE)
        if setting is not None:
            with rtn_while_running(loaded, setting["bits"], setting["group_size"]):
                setting["ppl"] = math.exp(mean_nll(loaded.model, held))
    guard["rtn"] = setting
    guard["time_s"] = round(time.perf_counter() - start, 1)
    return guard


def score_after(model, held: torch.Tensor, guard: dict, true_bits: float) -> dict:
    """The quantized model's perplexity on the same rows (it holds all its layers, packed or decoded), and the
    verdict against RTN."""
    start = time.perf_counter()
    guard = dict(guard, sage_ppl=math.exp(mean_nll(model, held)), sage_true_bits=true_bits)
    rtn = guard["rtn"]
    guard["beats_rtn"] = None if rtn is None else bool(guard["sage_ppl"] < rtn["ppl"])
    guard["time_s"] = round(guard["time_s"] + time.perf_counter() - start, 1)
    return guard


def warning_line(guard: dict) -> str | None:
    """One line when SAGE did worse than RTN on the held-out tokens, else None."""
    rtn = guard.get("rtn")
    if rtn is None or guard.get("beats_rtn") is not False:
        return None
    return (f"warning: on {guard['held_out']['tokens_scored']} held-out calibration tokens SAGE v2 "
            f"({guard['sage_true_bits']:.3f} true bits) scores perplexity {guard['sage_ppl']:.2f}, worse than "
            f"RTN w{rtn['bits']}g{rtn['group_size']} ({rtn['true_bits']:.3f} true bits) at {rtn['ppl']:.2f} "
            f"(FP {guard['fp_ppl']:.2f}); consider --method rtn or a higher --bits")
