"""The decoder graph, written node by node: LLaMA-family blocks with a KV cache, every quantized Linear a
`sage::SageBinaryGemm` node fed by its packed initializers, the float parts in float16 (float32 on request).

Why not trace the PyTorch model: tracing needs a dense float32 model of the whole network in memory, took 94 s
for SmolLM2-135M on 2 cores, and would then have its dense MatMuls rewritten anyway. The graph of a LLaMA-family
decoder is short to state directly, and every tensor is written to the external data file as soon as it exists,
so memory holds one tensor at a time, not the model.

Semantics follow transformers' eager implementation of LLaMA, Mistral and Qwen2 (what the ONNX Runtime check
compares against): RMSNorm in float32, rotary embeddings from the model's own inverse frequencies and scaling,
grouped-query attention with KV heads repeated, an additive mask of the causal and padding constraints (and the
sliding window where the config has one), SiLU-gated MLP, residual adds, final norm, lm_head.

Inputs and outputs are Optimum's: input_ids [batch, sequence], attention_mask [batch, total_sequence],
position_ids [batch, sequence], past_key_values.{i}.key/value [batch, kv_heads, past_sequence, head_dim] ->
logits [batch, sequence, vocab], present.{i}.key/value [batch, kv_heads, total_sequence, head_dim].
Query positions in the causal mask are past_sequence + 0..sequence-1, as transformers' cache positions are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..format.sage_layout import PackedLinear
from ..models.architectures import Architecture
from .function import MIN_OPSET, add_function, sage_node

FLOAT_TYPES = {"float16": (np.float16, TensorProto.FLOAT16), "float32": (np.float32, TensorProto.FLOAT)}
INLINE_BYTES = 1024  # smaller initializers stay inside model.onnx
ALIGN = 64  # external tensors start at multiples of this (lets runtimes map them without copying)


@dataclass(frozen=True)
class DecoderSpec:
    """The shapes and constants of a decoder, read from its transformers config."""

    n_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    inv_freq: np.ndarray  # float32 [head_dim / 2]
    rope_scaling: float  # cos and sin are multiplied by this (1 for the default rotary embedding)
    windows: tuple[int | None, ...]  # sliding window of each layer, None for full attention
    tied: bool

    @classmethod
    def from_config(cls, config) -> DecoderSpec:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        inv_freq, scaling = rotary_tables(config)
        return cls(config.num_hidden_layers, config.hidden_size, heads, config.num_key_value_heads, head_dim,
                   config.vocab_size, float(config.rms_norm_eps), inv_freq, scaling, attention_windows(config),
                   bool(getattr(config, "tie_word_embeddings", False)))


def rotary_tables(config) -> tuple[np.ndarray, float]:
    """(inv_freq, attention scaling) exactly as the model's own rotary module computes them. Rotary types whose
    frequencies change with the sequence length cannot be a constant of the graph: ValueError."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    rotary = type(skeleton.model.rotary_emb)(config=config)
    kind = getattr(rotary, "rope_type", "default")
    if kind in ("dynamic", "longrope"):
        raise ValueError(f"rotary embedding type {kind!r} depends on the sequence length; the ONNX export supports "
                         "static types (default, linear, llama3, yarn)")
    return rotary.inv_freq.detach().float().numpy().copy(), float(rotary.attention_scaling)


def attention_windows(config) -> tuple[int | None, ...]:
    """Per layer: the sliding window, or None for full causal attention (transformers' rules for these models)."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        return (window,) * config.num_hidden_layers
    kinds = getattr(config, "layer_types", None)
    if kinds and window:
        return tuple(window if kind == "sliding_attention" else None for kind in kinds)
    return (None,) * config.num_hidden_layers


class ExternalData:
    """Appends tensors to one external data file and returns their TensorProtos (no raw data kept in memory)."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            return onnx.numpy_helper.from_array(array, name)
        pad = -self.offset % ALIGN
        self.handle.write(b"\0" * pad)
        self.offset += pad
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)),
                           ("length", str(array.nbytes))):
            proto.external_data.add(key=key, value=value)
        self.handle.write(array.tobytes())
        self.offset += array.nbytes
        return proto

    def close(self) -> None:
        self.handle.close()


class _Graph:
    """Nodes and initializers of the graph under construction, with unique value names."""

    def __init__(self, data: ExternalData, float_dtype: str):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.data = data
        self.float_np, self.float_onnx = FLOAT_TYPES[float_dtype]
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.tensor(name, np.asarray(array)))
        return name

    def float_param(self, name: str, array: np.ndarray) -> str:
        """A float parameter stored in the chosen float dtype, cast to float32 where it is used."""
        stored = self.const(name, np.asarray(array).astype(self.float_np))
        if self.float_np == np.float32:
            return stored
        return self.op("Cast", [stored], f"{name}/float32", to=TensorProto.FLOAT)


def _rms_norm(g: _Graph, x: str, weight: str, eps: str) -> str:
    var = g.op("ReduceMean", [g.op("Mul", [x, x]), "axis_last"], "variance", keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, eps])])])
    return g.op("Mul", [weight, g.op("Mul", [x, inv])], "rms_norm")


def _linear(g: _Graph, x: str, layer: str, packed: PackedLinear, bias: np.ndarray | None) -> str:
    inputs = [x] + [g.const(f"{layer}.{name}", array) for name, array in packed.tensors().items()]
    out = g.name(f"{layer}/out")
    g.nodes.append(sage_node(inputs, out, f"{layer}/SageBinaryGemm", packed.attrs()))
    if bias is None:
        return out
    return g.op("Add", [out, g.const(f"{layer}.bias", np.asarray(bias, dtype=np.float32))], f"{layer}/bias")


def _heads(g: _Graph, x: str, n_heads: int, head_dim: int) -> str:
    """[B, S, n·D] -> [B, n, S, D]."""
    shape = g.const(g.name("heads_shape"), np.array([0, 0, n_heads, head_dim], dtype=np.int64))
    return g.op("Transpose", [g.op("Reshape", [x, shape])], "heads", perm=[0, 2, 1, 3])


def _rotate(g: _Graph, x: str, cos: str, sin: str, half: str) -> str:
    """x·cos + rotate_half(x)·sin, rotate_half(x) = [−x2, x1] on the last axis."""
    first, second = g.name("rot_x1"), g.name("rot_x2")
    g.nodes.append(helper.make_node("Split", [x, half], [first, second], name=g.name("split"), axis=-1))
    rotated = g.op("Concat", [g.op("Neg", [second]), first], "rotate_half", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])], "rope")


def _repeat_kv(g: _Graph, x: str, spec: DecoderSpec) -> str:
    """[B, kv, T, D] -> [B, kv·rep, T, D], each KV head repeated rep times in a row (transformers' repeat_kv)."""
    rep = spec.heads // spec.kv_heads
    if rep == 1:
        return x
    shape = g.op("Shape", [x])
    batch, tail = g.op("Slice", [shape, "i0", "i1"]), g.op("Slice", [shape, "i2", "i4"])
    kv = g.const(g.name("kv_heads"), np.array([spec.kv_heads, rep], dtype=np.int64))
    expanded = g.op("Expand", [g.op("Unsqueeze", [x, "i2"]), g.op("Concat", [batch, kv, tail], axis=0)])
    heads = g.const(g.name("all_heads"), np.array([spec.heads], dtype=np.int64))
    return g.op("Reshape", [expanded, g.op("Concat", [batch, heads, tail], axis=0)], "repeat_kv")


def _masks(g: _Graph, spec: DecoderSpec) -> dict[int | None, str]:
    """Additive float masks [B, 1, S, T] for each distinct window: 0 where a query may see a key, the float32
    minimum elsewhere (transformers' value; fully masked rows then give a uniform softmax, not NaN)."""
    total = g.op("Shape", ["attention_mask"], "total_len", start=1, end=2)
    seq = g.op("Shape", ["input_ids"], "seq_len", start=1, end=2)
    past = g.op("Sub", [total, seq], "past_len")
    scalar = lambda v: g.op("Squeeze", [v, "i0"])  # noqa: E731
    key_pos = g.op("Range", ["zero_i64", scalar(total), "one_i64"], "key_pos")
    query_pos = g.op("Range", [scalar(past), scalar(total), "one_i64"], "query_pos")
    query_col = g.op("Unsqueeze", [query_pos, "i1"])  # [S, 1]
    causal = g.op("LessOrEqual", [key_pos, query_col], "causal")  # [S, T]
    padding = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), "i1_2"])  # [B, 1, 1, T]
    masks = {}
    for window in sorted(set(spec.windows), key=lambda w: -1 if w is None else w):
        allowed = causal
        if window is not None:
            recent = g.op("Greater", [key_pos, g.op("Sub", [query_col, g.const(g.name("window"), np.array(
                window, dtype=np.int64))])], "in_window")
            allowed = g.op("And", [causal, recent])
        allowed = g.op("And", [padding, allowed], "allowed")  # [B, 1, S, T]
        masks[window] = g.op("Where", [allowed, "zero_f", "min_f"], "attention_bias")
    return masks


def _constants(g: _Graph, spec: DecoderSpec) -> None:
    for name, value in {"i0": [0], "i1": [1], "i2": [2], "i4": [4], "i1_2": [1, 2], "axis_last": [-1]}.items():
        g.const(name, np.array(value, dtype=np.int64))
    g.const("zero_i64", np.array(0, dtype=np.int64))
    g.const("one_i64", np.array(1, dtype=np.int64))
    g.const("zero_f", np.array(0.0, dtype=np.float32))
    g.const("min_f", np.array(np.finfo(np.float32).min, dtype=np.float32))
    g.const("eps", np.array(spec.eps, dtype=np.float32))
    g.const("half_split", np.array([spec.head_dim // 2, spec.head_dim // 2], dtype=np.int64))
    g.const("attn_scale", np.array(spec.head_dim ** -0.5, dtype=np.float32))


def _rotary(g: _Graph, spec: DecoderSpec) -> tuple[str, str]:
    """cos, sin [B, 1, S, D] from position_ids, as the model's rotary module computes them."""
    positions = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=TensorProto.FLOAT), "axis_last"])
    freqs = g.op("Mul", [positions, g.const("rope.inv_freq", spec.inv_freq.astype(np.float32))], "freqs")
    angles = g.op("Concat", [freqs, freqs], "angles", axis=-1)
    scale = g.const("rope.scaling", np.array(spec.rope_scaling, dtype=np.float32))
    cos = g.op("Unsqueeze", [g.op("Mul", [g.op("Cos", [angles]), scale]), "i1"], "cos")
    sin = g.op("Unsqueeze", [g.op("Mul", [g.op("Sin", [angles]), scale]), "i1"], "sin")
    return cos, sin


TensorSource = Callable[[str], "np.ndarray | None"]  # float tensor by state-dict name, None when absent


def _block(g: _Graph, spec: DecoderSpec, arch: Architecture, i: int, h: str, tensors: TensorSource,
           packed: Mapping[str, PackedLinear], rotary: tuple[str, str], mask: str) -> str:
    prefix = f"{arch.blocks}.{i}"

    def linear(x: str, name: str) -> str:
        layer = f"{prefix}.{name}"
        return _linear(g, x, layer, packed[layer], tensors(f"{layer}.bias"))

    cos, sin = rotary
    x = _rms_norm(g, h, g.float_param(f"{prefix}.input_layernorm.weight", tensors(
        f"{prefix}.input_layernorm.weight")), "eps")
    q = _rotate(g, _heads(g, linear(x, "self_attn.q_proj"), spec.heads, spec.head_dim), cos, sin, "half_split")
    k = _rotate(g, _heads(g, linear(x, "self_attn.k_proj"), spec.kv_heads, spec.head_dim), cos, sin, "half_split")
    v = _heads(g, linear(x, "self_attn.v_proj"), spec.kv_heads, spec.head_dim)
    for name, new, past in (("key", k, f"past_key_values.{i}.key"), ("value", v, f"past_key_values.{i}.value")):
        g.nodes.append(helper.make_node("Concat", [past, new], [f"present.{i}.{name}"], name=f"present.{i}.{name}",
                                        axis=2))
    keys, values = _repeat_kv(g, f"present.{i}.key", spec), _repeat_kv(g, f"present.{i}.value", spec)
    scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [keys], perm=[0, 1, 3, 2])]), "attn_scale"])
    probs = g.op("Softmax", [g.op("Add", [scores, mask])], "attn_probs", axis=-1)
    context = g.op("Transpose", [g.op("MatMul", [probs, values])], perm=[0, 2, 1, 3])
    merged = g.op("Reshape", [context, g.const(g.name("merge_shape"), np.array(
        [0, 0, spec.heads * spec.head_dim], dtype=np.int64))])
    h = g.op("Add", [h, linear(merged, "self_attn.o_proj")], "residual")
    x = _rms_norm(g, h, g.float_param(f"{prefix}.post_attention_layernorm.weight", tensors(
        f"{prefix}.post_attention_layernorm.weight")), "eps")
    gate = linear(x, "mlp.gate_proj")
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), linear(x, "mlp.up_proj")], "swiglu")
    return g.op("Add", [h, linear(act, "mlp.down_proj")], "residual")


def _io(spec: DecoderSpec) -> tuple[list, list]:
    kv = [spec.kv_heads, "past_sequence", spec.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", spec.vocab])]
    for i in range(spec.n_layers):
        for t in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{t}", TensorProto.FLOAT,
                                                        ["batch", *kv]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{t}", TensorProto.FLOAT,
                                                         ["batch", kv[0], "total_sequence", kv[2]]))
    return inputs, outputs


def build_decoder(spec: DecoderSpec, arch: Architecture, packed: Mapping[str, PackedLinear], tensors: TensorSource,
                  data: ExternalData, float_dtype: str = "float16",
                  progress: Callable[[int], None] | None = None) -> onnx.ModelProto:
    """The decoder ModelProto, its initializers already written to `data`. `tensors(name)` gives the float
    parameters by state-dict name (embeddings, norms, lm_head, Linear biases; None where a model has none)."""
    g = _Graph(data, float_dtype)
    _constants(g, spec)
    embed = g.const("model.embed_tokens.weight", tensors("model.embed_tokens.weight").astype(g.float_np))
    h = g.op("Gather", [embed, "input_ids"], "embedding", axis=0)
    if g.float_np != np.float32:
        h = g.op("Cast", [h], "embedding/float32", to=TensorProto.FLOAT)
    rotary, masks = _rotary(g, spec), _masks(g, spec)
    for i in range(spec.n_layers):
        h = _block(g, spec, arch, i, h, tensors, packed, rotary, masks[spec.windows[i]])
        if progress:
            progress(i)
    h = _rms_norm(g, h, g.float_param(arch.final_norm + ".weight", tensors(arch.final_norm + ".weight")), "eps")
    if spec.tied:
        head = embed if g.float_np == np.float32 else g.op("Cast", [embed], "lm_head/float32", to=TensorProto.FLOAT)
    else:
        head = g.float_param(f"{arch.lm_head}.weight", tensors(f"{arch.lm_head}.weight"))
    rows = g.op("Reshape", [h, g.const("rows_shape", np.array([-1, spec.hidden], dtype=np.int64))])
    logits_2d = g.op("Gemm", [rows, head], "lm_head", transB=1)
    out_shape = g.op("Concat", [g.op("Shape", ["input_ids"]), g.const("vocab", np.array([spec.vocab], np.int64))],
                     axis=0)
    g.nodes.append(helper.make_node("Reshape", [logits_2d, out_shape], ["logits"], name="logits"))
    inputs, outputs = _io(spec)
    graph = helper.make_graph(g.nodes, "sage_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET)], producer_name="sage-export")
    model.ir_version = 9
    add_function(model)
    return model
