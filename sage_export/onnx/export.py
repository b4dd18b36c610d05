"""Export a LLaMA-family decoder with KV cache to ONNX, then run every quantized Linear as SageBinaryGemm.

Exporter: `torch.onnx.export(dynamo=True, optimize=False)`. The dynamo exporter traces symbolically, so the
batch / sequence / past lengths stay dynamic without baking in the Python branches taken for the sample input
(the TorchScript exporter is deprecated in torch 2.9+), and it names initializers after the parameters, which is
how rewrite.py finds each layer. `optimize=False` because the onnxscript optimizer folds Transpose(W) into new,
anonymous initializers, which would lose those names; ONNX Runtime optimizes the graph itself at load time.

Inputs and outputs follow Optimum's names: input_ids, attention_mask [batch, past + seq], position_ids,
past_key_values.{i}.key/.value [batch, kv_heads, past, head_dim] -> logits, present.{i}.key/.value.
Embeddings, lm_head and norms stay float32.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import onnx
import torch
from onnx import numpy_helper

from ..format.accounting import summarize
from ..format.sage_layout import PackedLinear
from ..models import Architecture
from .function import MIN_OPSET
from .rewrite import replace_quantized_matmuls, sage_nodes, validate_packed_against_model

ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
WRAPPED = "model"  # attribute of the wrapper holding the HF model: initializer names start with "model."


class KVCacheDecoder(torch.nn.Module):
    """The HF causal LM with the cache as flat tensors: (ids, mask, positions, k0, v0, k1, v1, ...) ->
    (logits, present k0, v0, ...). ONNX has no cache object, so one is rebuilt from the tensors each call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    kv = [(i, t) for i in range(n_layers) for t in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{i}.{t}" for i, t in kv)]
    outputs = ["logits", *(f"present.{i}.{t}" for i, t in kv)]
    return inputs, outputs


def cache_shape(config) -> tuple[int, int]:
    """(kv_heads, head_dim) of one layer's cache."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


def sample_inputs(config, batch: int = 2, seq: int = 5, past: int = 3) -> tuple[torch.Tensor, ...]:
    """Tracing inputs. Distinct, non-trivial sizes (no 0 or 1) so that no axis is specialised to a constant."""
    kv_heads, head_dim = cache_shape(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq)
    cache = [torch.zeros(batch, kv_heads, past, head_dim) for _ in range(2 * config.num_hidden_layers)]
    return (ids, mask, positions, *cache)


def _dynamic_shapes(n_layers: int):
    from torch.export import Dim

    batch, seq, past, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    cache = tuple({0: batch, 2: past} for _ in range(2 * n_layers))
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, cache)


@torch.no_grad()
def export_decoder(model: torch.nn.Module, opset: int = MIN_OPSET) -> onnx.ModelProto:
    """The float decoder with KV cache as an in-memory ModelProto (weights included)."""
    model.eval()
    n_layers = model.config.num_hidden_layers
    inputs, outputs = io_names(n_layers)
    with warnings.catch_warnings():
        # Noise from torch itself: one warning per axis name it maps back, and its own use of a deprecated API.
        warnings.filterwarnings("ignore", message="# The axis name")
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        program = torch.onnx.export(
            KVCacheDecoder(model).eval(), sample_inputs(model.config), dynamo=True, optimize=False,
            opset_version=opset, input_names=inputs, output_names=outputs, dynamic_shapes=_dynamic_shapes(n_layers),
            verbose=False)
    return program.model_proto


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    data_path: Path
    onnx_bytes: int
    data_bytes: int
    n_nodes: int
    n_sage_nodes: int
    sage_bytes: int  # bytes of the SageBinaryGemm initializers (inputs 1-7 of every node)
    sage_true_bits: float  # 8 * sage_bytes / sum(N*K), from the ONNX initializers themselves
    opset: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(onnx_path=str(self.onnx_path), data_path=str(self.data_path))
        return d


def sage_storage(model: onnx.ModelProto) -> dict:
    """True storage (SPEC §4) of the packed initializers of all SageBinaryGemm nodes, read from the graph itself:
    format.accounting.summarize over {node: (N, K, inputs 1-7)}."""
    initializers = {t.name: t for t in model.graph.initializer}
    layers = {}
    for node in sage_nodes(model):
        attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        tensors = {name: numpy_helper.to_array(initializers[name]) for name in node.input[1:8]}
        layers[node.name] = (attrs["out_features"], attrs["in_features"], tensors)
    return summarize(layers)


def save_with_external_data(model: onnx.ModelProto, out_dir: Path) -> tuple[Path, Path]:
    """model.onnx (graph) + model.onnx.data (every initializer of 1 KiB or more), then the full checker."""
    onnx_path, data_path = out_dir / ONNX_NAME, out_dir / DATA_NAME
    data_path.unlink(missing_ok=True)  # onnx appends external data to an existing file
    onnx.save_model(model, onnx_path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_NAME, size_threshold=1024)
    onnx.checker.check_model(str(onnx_path), full_check=True)
    return onnx_path, data_path


def export_quantized_onnx(model: torch.nn.Module, arch: Architecture, packed: Mapping[str, PackedLinear],
                          out_dir: Path) -> ExportResult:
    """Export `model` with every layer of `packed` as SageBinaryGemm into out_dir (an existing directory; the
    caller owns atomicity, e.g. by passing a temporary one). A packed/model mismatch -> ValueError, before any
    export work."""
    validate_packed_against_model(model, arch, packed)
    out_dir = Path(out_dir)
    dense = export_decoder(model)
    rewritten = replace_quantized_matmuls(dense, packed, weight_prefix=f"{WRAPPED}.")
    del dense
    storage = sage_storage(rewritten)
    onnx_path, data_path = save_with_external_data(rewritten, out_dir)
    opset = next(o.version for o in rewritten.opset_import if o.domain in ("", "ai.onnx"))
    return ExportResult(onnx_path, data_path, onnx_path.stat().st_size,
                        data_path.stat().st_size if data_path.exists() else 0, len(rewritten.graph.node),
                        len(sage_nodes(rewritten)), storage["stored_bytes"], storage["true_bits"], opset)
