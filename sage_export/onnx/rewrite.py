"""Turn the dense MatMul of every quantized Linear in an exported graph into a `sage::SageBinaryGemm` node.

The exporter keeps parameter names as initializer names, so each layer's weight is found by name. torch lowers
a Linear to Transpose(W) -> MatMul (or Gemm with transB=1); that pattern is replaced by one SageBinaryGemm node fed
by the packed initializers "<layer>.sign_bits", ... (contract order); the dense weight then has no consumer and
graph cleanup drops it. A bias Add after the MatMul is left in place (it stays float32 in the graph).
"""

from __future__ import annotations

from typing import Mapping

import onnx
import onnx_graphsurgeon as gs

from ..format.sage_layout import PackedLinear
from ..models import Architecture, quantizable_linears
from .function import DOMAIN, OP_TYPE, add_function, sage_attributes


def validate_packed_against_model(model, arch: Architecture, packed: Mapping[str, PackedLinear]) -> None:
    """Raise ValueError (one line) unless `packed` holds exactly the model's quantizable layers with their shapes.
    Cheap: run it before any export work."""
    linears = quantizable_linears(model, arch)
    unknown = [name for name in packed if name not in linears]
    if unknown:
        raise ValueError(f"packed layer {unknown[0]!r} is not a quantizable layer of this {arch.name} model "
                         f"({len(unknown)} such layers)")
    missing = [name for name in linears if name not in packed]
    if missing:
        raise ValueError(f"packed layers do not cover the model: {missing[0]!r} missing ({len(missing)} missing)")
    for name, layer in packed.items():
        expected = tuple(linears[name].weight.shape)
        if layer.shape != expected:
            raise ValueError(f"{name}: packed shape [N={layer.shape[0]}, K={layer.shape[1]}] does not match the "
                             f"model's weight [N={expected[0]}, K={expected[1]}]")


def _only_consumer(tensor: gs.Tensor, layer: str) -> gs.Node:
    if len(tensor.outputs) != 1:
        raise ValueError(f"{layer}: expected one consumer of {tensor.name}, found {len(tensor.outputs)}")
    return tensor.outputs[0]


def _matmul_input(weight: gs.Constant, layer: str) -> tuple[gs.Node, gs.Tensor]:
    """(node computing X·Wᵀ, X) for the weight initializer W [N, K]."""
    node = _only_consumer(weight, layer)
    if node.op == "Gemm" and node.attrs.get("transB", 0) == 1 and node.attrs.get("transA", 0) == 0 \
            and len(node.inputs) == 2 and node.inputs[1] is weight:
        return node, node.inputs[0]
    if node.op == "Transpose" and list(node.attrs.get("perm", [1, 0])) == [1, 0]:
        matmul = _only_consumer(node.outputs[0], layer)
        if matmul.op == "MatMul" and matmul.inputs[1] is node.outputs[0]:
            return matmul, matmul.inputs[0]
    raise ValueError(f"{layer}: {weight.name} does not feed a MatMul via Transpose (found {node.op}); "
                     "the exporter produced a pattern this rewrite does not know")


def _replace_layer(graph: gs.Graph, weight: gs.Constant, layer: str, packed: PackedLinear) -> None:
    matmul, x = _matmul_input(weight, layer)
    packed_inputs = [gs.Constant(f"{layer}.{name}", array) for name, array in packed.tensors().items()]
    sage = gs.Node(op=OP_TYPE, name=f"{layer}/{OP_TYPE}", domain=DOMAIN, attrs=sage_attributes(packed.attrs()),
                   inputs=[x, *packed_inputs], outputs=list(matmul.outputs))
    matmul.outputs.clear()  # the MatMul, its Transpose and W are now dead: graph cleanup removes them
    graph.nodes.append(sage)


def replace_quantized_matmuls(model: onnx.ModelProto, packed: Mapping[str, PackedLinear],
                              weight_prefix: str = "") -> onnx.ModelProto:
    """A new ModelProto in which each layer of `packed` runs as SageBinaryGemm. The weight of layer L is the
    initializer named f"{weight_prefix}{L}.weight"; a missing weight or an unknown pattern -> ValueError."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    for layer, layer_packed in packed.items():
        weight = tensors.get(f"{weight_prefix}{layer}.weight")
        if not isinstance(weight, gs.Constant):
            raise ValueError(f"{layer}: no initializer {weight_prefix}{layer}.weight in the exported graph")
        if tuple(weight.shape) != layer_packed.shape:
            raise ValueError(f"{layer}: graph weight shape {tuple(weight.shape)} != packed {layer_packed.shape}")
        _replace_layer(graph, weight, layer, layer_packed)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    add_function(out)
    return out


def sage_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == OP_TYPE]
