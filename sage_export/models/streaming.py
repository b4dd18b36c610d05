"""Read a model's weights one tensor at a time, so that a data-free quantizer never needs the whole model in memory.

A streamed model is built with its quantizable Linear weights on the meta device (shapes only, no storage);
everything else (embeddings, norms, lm_head, biases, rotary buffers) is loaded as usual. Each meta weight is read
from the source file, as float32, only when a quantizer asks for it (LoadedModel.weight), and freed after.

Calibrated methods run the unquantized model, so they need weights in the model, not in a file: `resident`
reads a block's weights for as long as that block runs and puts the meta tensors back after, and
`resident_while_running` does it through hooks for code that runs the whole model (sampling calibration text).

Readers: Hugging Face safetensors (one file or an index of shards; float16, bfloat16 or float32, converted one
tensor at a time) and GGUF (dequantized one tensor at a time, exactly as gguf_model.tensors does).
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch


class SafetensorsReader:
    """Tensors of a Hugging Face directory's safetensors file(s), by parameter name."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    files.update((name, path) for name in f.keys())
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {folder}")
        self._files = files
        self._open = safe_open

    def names(self) -> set[str]:
        return set(self._files)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype. The file is opened (mapped) for this one read and closed after: pages
        read through a mapping count in this process's resident set for as long as it stays mapped."""
        with self._open(str(self._files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def read(self, name: str) -> np.ndarray:
        return self.tensor(name).float().numpy()


class GGUFReader:
    """Tensors of a GGUF file by transformers parameter name, dequantized to float32 (and un-permuted where
    llama.cpp permuted them), one at a time."""

    def __init__(self, gguf, config: dict):
        from .gguf_model import hf_name

        self._gguf = gguf  # a parsed gguf_file.GGUFFile
        self._config = config
        self._by_hf = {hf_name(name): name for name in self._gguf.tensors}

    def names(self) -> set[str]:
        return set(self._by_hf)

    def read(self, name: str) -> np.ndarray:
        from .gguf_model import read_tensor

        return read_tensor(self._gguf, self._config, self._by_hf[name])

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.read(name))


def empty_model(config):
    """The model of `config` in float32 with every parameter on the meta device (shapes only); buffers are
    computed as usual (rotary tables). fill_parameters then loads what is not streamed."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a (possibly meta) parameter by `value`, without gradients."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)


@torch.no_grad()
def fill_parameters(model: torch.nn.Module, reader, skip: set[str], tied: bool) -> None:
    """Copy every parameter not in `skip` from the reader (tied lm_head: shared with the embedding afterwards)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    wanted = [n for n in params if n not in skip and not (tied and n == "lm_head.weight")]
    available = reader.names()
    missing = [n for n in wanted if n not in available]
    if missing:
        raise KeyError(f"no tensor for {missing[0]} ({len(missing)} parameters missing)")
    for name in wanted:
        value = reader.tensor(name)
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(f"tensor {name} {tuple(value.shape)} does not fit the model ({tuple(params[name].shape)})")
        set_parameter(model, name, value.to(torch.float32))
    if tied:
        model.tie_weights()


def meta_names(model: torch.nn.Module, prefix: str, linears: tuple[str, ...]) -> list[str]:
    """Weight names of the Linears under `prefix` that are still on the meta device (already quantized layers,
    SageLinear or dense, are not)."""
    names = []
    for linear in linears:
        weight = getattr(model.get_submodule(f"{prefix}.{linear}"), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_meta:
            names.append(f"{prefix}.{linear}.weight")
    return names


@contextmanager
def resident(model: torch.nn.Module, reader, names: list[str]):
    """The named meta weights read (float32) into the model inside the block, back on the meta device after (also
    when the block raises)."""
    shapes = {name: model.get_parameter(name).shape for name in names}
    try:
        for name in names:
            set_parameter(model, name, torch.from_numpy(reader.read(name)))
        yield
    finally:
        for name, shape in shapes.items():
            set_parameter(model, name, torch.empty(shape, device="meta"))


@contextmanager
def resident_while_running(blocks: torch.nn.ModuleList, block_weights: Callable[[int], ContextManager]):
    """Inside the block, block_weights(i) is entered when decoder block i is called and left when it returns
    (LoadedModel.block_weights: its streamed weights read, then freed): a whole-model forward pass holds one
    block's weights at a time (and reads them all each pass)."""
    stacks: dict[int, ExitStack] = {}

    def enter(index):
        def hook(_module, _args):
            stacks[index] = ExitStack()
            stacks[index].enter_context(block_weights(index))
        return hook

    def leave(index):
        def hook(_module, _args, _out):
            stacks.pop(index).close()
        return hook

    handles = []
    try:
        for i, block in enumerate(blocks):
            handles += [block.register_forward_pre_hook(enter(i)), block.register_forward_hook(leave(i))]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in stacks.values():  # a block that raised: its weights go back too
            stack.close()
