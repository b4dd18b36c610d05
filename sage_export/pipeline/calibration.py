"""Calibration for data-aware methods: where the calibration tokens come from (a text file, or text the model
samples itself), and the sequential driver that collects per-layer Hessians H = 2·X·Xᵀ/n block by block, each
block seeing the outputs of the already-quantized blocks before it (the usual sequential GPTQ driver)."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import weight_array
from ..models.architectures import Architecture


def calibration_ids(tokenizer, path: Path, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """n_samples random windows of seqlen tokens from a calibration text (never the evaluation text)."""
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text {path} has {ids.numel()} tokens, need more than {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def _cache_keyword(model) -> str:
    # transformers 5 renamed the decoder's cache argument; 4.x only knows the old name.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# Self-sampled calibration starts each row from one of these requests (row i from prompt i mod 16), half prose and
# half code, written for this project. From BOS alone a model writes whatever its pretraining mix favours:
# Qwen2.5-Coder-1.5B-Instruct mostly writes Chinese from <|endoftext|>, so its input energies and sensitivities
# described text unlike what users run. A request in the chat template (raw after BOS where the tokenizer has
# none) keeps the sample in the model's own distribution while steering it to English prose and code.
CALIB_PROMPTS: tuple[str, ...] = (
    "Write an encyclopedia article about the history of a European river port, with dates and names.",
    "Write a Python module that parses a CSV file of orders and prints totals per customer, with docstrings.",
    "Explain how vaccines train the immune system, for a curious high-school student.",
    "Implement a least-recently-used cache class in Python with get and put methods and unit tests.",
    "Write the plot summary of a nineteenth-century novel about two rival families.",
    "Write a C function that reverses a singly linked list, and explain each step in comments.",
    "Describe the career of a fictional football player who played for three clubs in the 1990s.",
    "Write a Python command-line tool with argparse that renames files by a regular expression.",
    "Write a news report about a storm that closed schools and roads in a coastal town.",
    "Write a JavaScript function that debounces another function, with a usage example.",
    "Explain the causes and the consequences of the Industrial Revolution in Britain.",
    "Write a Python class for a bank account that raises custom exceptions on overdraft, with tests.",
    "Write a biography of a fictional botanist who catalogued the plants of an island.",
    "Write SQL queries that create tables for a library, insert rows, and list overdue loans.",
    "Describe the geography, climate and economy of a mountain region in South America.",
    "Write a Python generator that yields prime numbers, and a benchmark comparing two methods.",
)


def prompt_rows(tokenizer, n_samples: int) -> list[list[int]]:
    """The token ids each sampled row starts from: CALIB_PROMPTS in the tokenizer's chat template (a user turn and
    the assistant's opening), or BOS + the raw request where it has no template."""
    rows = []
    for i in range(n_samples):
        prompt = CALIB_PROMPTS[i % len(CALIB_PROMPTS)]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = [_start_id(tokenizer)] + tokenizer.encode(prompt, add_special_tokens=False)
        rows.append([int(t) for t in ids])
    return rows


def _start_id(tokenizer) -> int:
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start_id is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sampling from")
    return int(start_id)


@torch.no_grad()
def sample_ids(model, tokenizer, n_samples: int, seqlen: int, seed: int, progress: bool = True,
               temperature: float = 1.0, prompted: bool = True) -> torch.Tensor:
    """[n_samples, seqlen] token ids the model writes itself by plain ancestral sampling (no top-k/top-p) with a
    seeded generator, all rows in one batch with the KV cache. Sampling from the model's own distribution makes
    the squared gradients of its loss an estimate of its Fisher information, and needs no text at all.

    prompted: each row is the seqlen tokens the model writes after one of CALIB_PROMPTS (the prompt itself is not
    kept: it is the same few dozen tokens in every row); special tokens are never sampled, so a row never ends
    its answer and drifts. Otherwise each row is BOS and the seqlen − 1 tokens that follow it.
    Same seed, same model, same machine -> same ids."""
    gen = torch.Generator().manual_seed(seed)
    if prompted:
        starts = prompt_rows(tokenizer, n_samples)
        banned = sorted(set(getattr(tokenizer, "all_special_ids", [])) | {_start_id(tokenizer)})
        steps = seqlen
    else:
        starts, banned, steps = [[_start_id(tokenizer)]] * n_samples, [], seqlen - 1
    width = max(len(r) for r in starts)
    # Left padding: every row's last prompt token sits in the last column, so one sampled column serves all rows.
    ids = torch.tensor([[r[0]] * (width - len(r)) + r for r in starts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in starts], dtype=torch.long)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    rows, cache_kw, cache = [] if prompted else [ids], _cache_keyword(model), None
    for _ in tqdm(range(steps), desc="calibration: sampling text", unit="tok", disable=not progress, leave=False):
        out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **({cache_kw: cache} if cache is not None else {}))
        cache = getattr(out, cache_kw)
        logits = out.logits[:, -1].double() / temperature
        logits[:, banned] = -torch.inf
        ids = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
        rows.append(ids)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        positions = positions[:, -1:] + 1
    return torch.cat(rows, dim=1)


def calibration_tokens(loaded, text: Path | None, n_samples: int, seqlen: int, seed: int,
                       progress: bool = True, temperature: float = 1.0,
                       prompted: bool = True) -> tuple[torch.Tensor, dict]:
    """Calibration ids and a description for reports: windows of a text file, or (text=None) sampled by the
    model itself (after CALIB_PROMPTS, or from BOS with prompted=False)."""
    start = time.perf_counter()
    if text is not None:
        ids = calibration_ids(loaded.tokenizer, text, n_samples, seqlen, seed)
        info = {"source": "text", "text": str(text)}
    else:
        with loaded.running_weights():  # streamed: every sampling step reads each block's weights in turn
            ids = sample_ids(loaded.model, loaded.tokenizer, n_samples, seqlen, seed, progress, temperature,
                             prompted)
        origin = "after built-in prompts" if prompted else "from BOS"
        info = {"source": "self-generated", "start": "prompts" if prompted else "bos",
                "sampling": f"ancestral, temperature {temperature:g}, {origin}"}
    info.update(samples=n_samples, seqlen=seqlen, tokens=int(ids.numel()), seed=seed,
                time_s=round(time.perf_counter() - start, 1))
    return ids, info


class _StopForward(Exception):
    pass


# Calibration rows go through the model in batches of about this many tokens: one call on a [rows, T] batch is far
# faster than rows calls on CPU, and 2048 keeps GPTQ's 2048-token windows one per call as they always were.
BATCH_TOKENS = 2048


def validation_tokens(loaded, text: Path | None, n_samples: int, seqlen: int, seed: int,
                      prompted: bool = True, progress: bool = True, temperature: float = 1.0) -> torch.Tensor:
    """Rows that judge the compensation (SageRecipe.compensate_candidates): drawn like the calibration, with seed
    + 1, so that the calibration rows stay exactly those a run without them takes. From a text, windows are drawn
    at random, as calibration windows are, and can overlap them."""
    ids, _ = calibration_tokens(loaded, text, n_samples, seqlen, seed + 1, progress=progress, prompted=prompted,
                                temperature=temperature)
    return ids


def row_batches(calib: torch.Tensor, batch_tokens: int = BATCH_TOKENS) -> list[torch.Tensor]:
    """The rows of calib in consecutive batches of about batch_tokens tokens (at least one row each)."""
    rows = max(1, batch_tokens // calib.shape[1])
    return [calib[i : i + rows] for i in range(0, calib.shape[0], rows)]


@torch.no_grad()
def _block0_inputs(model, blocks, calib: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering block 0 for every batch of calibration rows, and the keyword arguments the blocks
    are called with for that batch (masks and rotary tables can depend on the batch)."""
    captured: list[torch.Tensor] = []
    kwargs_seen: list[dict] = []

    def grab(_module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        seen = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "cache")}
        kwargs_seen.append(dict(seen, use_cache=False))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in row_batches(calib):
            try:
                model(batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured, kwargs_seen


def _run_block(block, inputs: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    outs = []
    for x, kw in zip(inputs, kwargs):
        y = block(x, **kw)
        outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


def _hessian_hooks(block, names: tuple[str, ...], store: dict[str, torch.Tensor], counts: dict[str, int]):
    """Hooks summing 2·XᵀX over samples into store[name] (float64) and the rows into counts[name]. Linears fed by
    the same tensor one after the other (q/k/v, gate/up) share one product per sample and one accumulator: store
    holds the same tensor for them (a LLaMA-2-7B block's Hessians take 1.3 GB instead of 1.7, and nothing is
    copied per name). The product is float32, as in the GPTQ reference; the sum over samples, in place, is
    float64. Measured on SmolLM2 (32 x 2048 tokens, 2 CPU cores): GPTQ calibration took 446 s with float64
    products, 345 s now."""
    last = {"x": None, "owner": None}  # holding the input tensor keeps its identity valid

    def make(name):
        def hook(_module, args, _out):
            if last["x"] is args[0]:  # the input `owner` was just fed: share its sum
                store[name], counts[name] = store[last["owner"]], counts[last["owner"]]
                return
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            xtx = (2.0 * x.T @ x).double()
            last.update(x=args[0], owner=name)
            if name in store:
                store[name] += xtx
            else:
                store[name] = xtx
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    return [block.get_submodule(n).register_forward_hook(make(n)) for n in names]


def averaged_hessians(store: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, np.ndarray]:
    """{name: H = sum / rows} as NumPy views, each shared accumulator divided once, in place (no copy)."""
    done: dict[int, np.ndarray] = {}
    for name, total in store.items():
        if id(total) not in done:
            done[id(total)] = total.div_(counts[name]).numpy()
    return {name: done[id(total)] for name, total in store.items()}


@torch.no_grad()
def quantize_sequential(model, arch: Architecture, calib: torch.Tensor,
                        quantize_block: Callable[[list[tuple[str, np.ndarray, np.ndarray]]], Iterable[object]],
                        apply_layer: Callable[[torch.nn.Module, object], None], progress: bool = True) -> dict:
    """Walk the blocks in order: collect each Linear's Hessian on the current inputs, quantize the block's
    Linears with quantize_block([(qualified_name, W, H), ...]) (results in the same order; it may run them in
    parallel), write each result back with apply_layer, then propagate the inputs through the quantized block.
    Returns {qualified name: quantizer result}."""
    blocks = model.get_submodule(arch.blocks)
    inputs, kwargs = _block0_inputs(model, blocks, calib)
    results = {}
    bar = tqdm(total=len(blocks) * len(arch.linears), desc="quantize (calibrated)", unit="layer", disable=not progress)
    for i, block in enumerate(blocks):
        hessians, counts = {}, {}
        handles = _hessian_hooks(block, arch.linears, hessians, counts)
        try:
            _run_block(block, inputs, kwargs)
        finally:
            for h in handles:
                h.remove()
        averaged = averaged_hessians(hessians, counts)
        items = [(f"{arch.blocks}.{i}.{name}", weight_array(block.get_submodule(name)), averaged[name])
                 for name in arch.linears]
        del hessians, averaged
        for (qname, _, _), name, result in zip(items, arch.linears, quantize_block(items)):
            results[qname] = result
            apply_layer(block.get_submodule(name), result)
            bar.set_postfix_str(qname, refresh=False)
            bar.update()
        inputs = _run_block(block, inputs, kwargs)
    bar.close()
    return results
