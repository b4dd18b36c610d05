"""Export a quantized LLaMA-family decoder with KV cache to ONNX, every quantized Linear a SageBinaryGemm node.

The graph is written node by node (decoder.py), not traced: no dense float32 model of the network is ever built,
and each packed layer or float tensor goes to the external data file as soon as it is written. Embeddings,
lm_head and norms are stored in float16 by default (float32 on request) and cast to float32 where used.

Inputs and outputs follow Optimum's names: input_ids, attention_mask [batch, past + seq], position_ids,
past_key_values.{i}.key/.value [batch, kv_heads, past, head_dim] -> logits, present.{i}.key/.value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from ..format.accounting import summarize
from ..format.sage_layout import TENSOR_NAMES, PackedLinear
from ..models import Architecture, quantizable_linears
from .decoder import DecoderSpec, ExternalData, TensorSource, build_decoder
from .function import OP_TYPE

ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"


def validate_packed_against_model(model, arch: Architecture, packed: Mapping[str, PackedLinear]) -> None:
    """Raise ValueError (one line) unless `packed` holds exactly the model's quantizable layers with their shapes.
    Cheap: run it before any export work."""
    linears = quantizable_linears(model, arch)
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in linears.items()}
    validate_packed(shapes, arch, packed)


def validate_packed(shapes: Mapping[str, tuple[int, int]], arch: Architecture,
                    packed: Mapping[str, PackedLinear]) -> None:
    """The same check against {layer name: (N, K)} of the model's quantizable layers."""
    unknown = [name for name in packed if name not in shapes]
    if unknown:
        raise ValueError(f"packed layer {unknown[0]!r} is not a quantizable layer of this {arch.name} model "
                         f"({len(unknown)} such layers)")
    missing = [name for name in shapes if name not in packed]
    if missing:
        raise ValueError(f"packed layers do not cover the model: {missing[0]!r} missing ({len(missing)} missing)")
    for name, layer in packed.items():
        expected = shapes[name]
        if layer.shape != expected:
            raise ValueError(f"{name}: packed shape [N={layer.shape[0]}, K={layer.shape[1]}] does not match the "
                             f"model's weight [N={expected[0]}, K={expected[1]}]")


def sage_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == OP_TYPE]


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    data_path: Path
    onnx_bytes: int
    data_bytes: int
    n_nodes: int
    n_sage_nodes: int
    sage_bytes: int  # bytes of the SageBinaryGemm initializers (inputs 1-8 of every node)
    sage_true_bits: float  # 8 * sage_bytes / sum(N*K), from the ONNX initializers themselves
    opset: int
    float_dtype: str = "float16"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(onnx_path=str(self.onnx_path), data_path=str(self.data_path))
        return d


def _tensor_bytes(proto: onnx.TensorProto) -> int:
    return int(np.prod(proto.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(proto.data_type).itemsize


def sage_storage(model: onnx.ModelProto) -> dict:
    """True storage (SPEC §4) of the packed initializers of all SageBinaryGemm nodes, read from the graph itself
    (dims and dtypes of the initializers; their data need not be loaded)."""
    initializers = {t.name: t for t in model.graph.initializer}
    layers = {}
    for node in sage_nodes(model):
        attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        packed_inputs = node.input[1:1 + len(TENSOR_NAMES)]  # X is input 0, the optional bias comes after
        nbytes = sum(_tensor_bytes(initializers[name]) for name in packed_inputs)
        layers[node.name] = (attrs["out_features"], attrs["in_features"], {"packed": np.empty(nbytes, dtype=np.uint8)})
    return summarize(layers)


def export_decoder_onnx(config, arch: Architecture, packed: Mapping[str, PackedLinear], tensors: TensorSource,
                        out_dir: Path, float_dtype: str = "float16",
                        progress: Callable[[int], None] | None = None) -> ExportResult:
    """Write model.onnx + model.onnx.data into out_dir (an existing directory; the caller owns atomicity). Memory
    holds one tensor at a time besides `packed` and whatever `tensors` keeps."""
    out_dir = Path(out_dir)
    onnx_path, data_path = out_dir / ONNX_NAME, out_dir / DATA_NAME
    spec = DecoderSpec.from_config(config)
    data = ExternalData(data_path)
    try:
        model = build_decoder(spec, arch, packed, tensors, data, float_dtype, progress)
    finally:
        data.close()
    onnx.save_model(model, onnx_path)
    onnx.checker.check_model(str(onnx_path), full_check=True)
    storage = sage_storage(model)
    return ExportResult(onnx_path, data_path, onnx_path.stat().st_size, data_path.stat().st_size,
                        len(model.graph.node), len(sage_nodes(model)), storage["stored_bytes"],
                        storage["true_bits"], model.opset_import[0].version, float_dtype)


def export_quantized_onnx(model, arch: Architecture, packed: Mapping[str, PackedLinear], out_dir: Path,
                          float_dtype: str = "float16") -> ExportResult:
    """Export a torch model's decoder with every layer of `packed` as SageBinaryGemm (its float parameters come
    from the model). A packed/model mismatch -> ValueError, before any export work."""
    validate_packed_against_model(model, arch, packed)
    state = model.state_dict()

    def tensors(name: str) -> np.ndarray | None:
        return state[name].detach().float().numpy() if name in state else None

    return export_decoder_onnx(model.config, arch, packed, tensors, out_dir, float_dtype)
