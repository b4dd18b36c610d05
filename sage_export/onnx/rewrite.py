"""Put SageBinaryGemm nodes into an ONNX model written by another exporter (torch.onnx, Optimum, a user's own),
with onnx-graphsurgeon.

The project's own export (decoder.py) writes the decoder node by node; this module is for a graph someone else
wrote. It finds the MatMul and Gemm nodes whose constant weight is one of a packed checkpoint's quantized Linears,
replaces each by a `sage::SageBinaryGemm` node fed by the packed tensors (the same node and model-local function
as the project's export: function.py), and writes the result with every initializer in one external data file.

Matching. Exporters rename weights (torch.onnx's TorchScript exporter folds Linear's transpose into a new
initializer `onnx::MatMul_123` of shape [K, N]), so layers are matched by content: the cosine between the
checkpoint's decoded weight Ŵ [N, K] and each constant weight of the same shape (either orientation, through a
Transpose or Gemm's transB), on up to 4,096 fixed positions read straight from the file. A weight exported from
the decoded checkpoint gives 1; one exported from the float model before quantization gives the quantizer's
fidelity (0.75 to 0.999 measured for SAGE v2 at 3.2 bits on a random tiny LLaMA; sqrt(2/pi) = 0.8 for a
sign-only quantizer of Gaussian weights); unrelated weights give a cosine of about ±1/sqrt(4096) = ±0.016, so the
threshold sits 18 of those from chance and well under any quantizer's fidelity. A layer matches where the cosine
is at least MATCH_COS; no match, or more than one, is an error naming the layer. A name map ({layer: weight initializer or node name}) picks the weight instead, and the
cosine is still required.

Memory: the source model is loaded without its external data; weights are sampled through memory maps, and each
initializer is copied to the new data file one at a time, so the process holds the packed checkpoint, the graph's
structure and one tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..errors import UserError
from ..format.sage_layout import PackedLinear, dequantize
from .decoder import ExternalData
from .export import DATA_NAME, ONNX_NAME, sage_nodes
from .function import DOMAIN, FUNCTION_VERSION, MIN_OPSET, OP_TYPE, add_function, sage_attributes

MATCH_COS = 0.3
SAMPLE_SIZE = 4096
WEIGHT_DTYPES = (np.float32, np.float16)  # SageBinaryGemm's X types; X has the weight's type in MatMul/Gemm
# Inputs the ORT check knows how to feed (Optimum's decoder names; a torch.onnx export given these names).
FEEDABLE_INPUTS = ("input_ids", "attention_mask", "position_ids")
CACHE_PREFIX = "past_key_values."


# ----------------------------------------------------------------------------------------------- source model


def load_structure(onnx_path: Path) -> onnx.ModelProto:
    """The model without its external data (initializers keep their file references). One-line errors for what
    the rewrite cannot use, found before any work."""
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise UserError(f"cannot read {onnx_path} as an ONNX model: {exc}") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise UserError(f"{onnx_path} uses opset {opset}; SageBinaryGemm's function needs opset >= {MIN_OPSET} "
                        f"(re-export with opset_version={MIN_OPSET}, or optimum-cli's --opset {MIN_OPSET})")
    if any(n.op_type == OP_TYPE and n.domain == DOMAIN for n in model.graph.node):
        raise UserError(f"{onnx_path} already holds SageBinaryGemm nodes")
    _check_external_files(model, Path(onnx_path).parent)
    return model


def _all_initializers(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Initializers of the graph and of every subgraph (If/Loop bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from _all_initializers(sub)


def _external(proto: TensorProto) -> dict[str, str] | None:
    if proto.data_location != TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in proto.external_data}


def _nbytes(proto: TensorProto) -> int:
    return int(np.prod(proto.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(proto.data_type).itemsize


def _external_span(proto: TensorProto, base_dir: Path) -> tuple[Path, int, int]:
    info = _external(proto)
    offset = int(info.get("offset", 0))
    return base_dir / info["location"], offset, int(info.get("length", _nbytes(proto)))


def _check_external_files(model: onnx.ModelProto, base_dir: Path) -> None:
    for proto in _all_initializers(model.graph):
        if _external(proto) is None:
            continue
        path, offset, length = _external_span(proto, base_dir)
        if not path.is_file():
            raise UserError(f"initializer {proto.name!r} lives in {path}, which does not exist")
        if offset + length > path.stat().st_size:
            raise UserError(f"initializer {proto.name!r}: {path.name} is shorter than its offset + length")


def check_feedable(model: onnx.ModelProto) -> str:
    """The logits output's name; a graph input the ORT check cannot feed is an error (before any work)."""
    for value in model.graph.input:
        if value.name not in FEEDABLE_INPUTS and not value.name.startswith(CACHE_PREFIX):
            raise UserError(f"graph input {value.name!r} is not one the ORT check can feed (it feeds "
                            f"{', '.join(FEEDABLE_INPUTS)} and {CACHE_PREFIX}*)")
    if "input_ids" not in [v.name for v in model.graph.input]:
        raise UserError("the graph has no input_ids input")
    names = [o.name for o in model.graph.output]
    return "logits" if "logits" in names else names[0]


def weight_view(proto: TensorProto, base_dir: Path) -> np.ndarray:
    """The tensor's values without reading the whole of it: a memory map of its external bytes, a view of its raw
    bytes, or (small typed-field tensors) a copy."""
    dtype = helper.tensor_dtype_to_np_dtype(proto.data_type)
    shape = tuple(proto.dims)
    if _external(proto) is not None:
        path, offset, _ = _external_span(proto, base_dir)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    if proto.HasField("raw_data"):
        return np.frombuffer(proto.raw_data, dtype=dtype).reshape(shape)
    return numpy_helper.to_array(proto)


# ----------------------------------------------------------------------------------------------- weight sites


@dataclass
class Site:
    """A constant 2-D weight used as B of MatMul or Gemm nodes. `dense_is_weight`: the stored tensor is Ŵ [N, K]
    (Gemm transB=1, or MatMul through Transpose); otherwise it is Ŵᵀ [K, N] (MatMul, Gemm transB=0)."""

    weight: gs.Constant
    dense_is_weight: bool
    nodes: list[gs.Node] = field(default_factory=list)
    problem: str | None = None  # why the rewrite cannot replace these nodes, said only if a layer matches them

    @property
    def shape(self) -> tuple[int, int]:  # (N, K)
        rows, cols = self.weight.shape
        return (rows, cols) if self.dense_is_weight else (cols, rows)

    @property
    def label(self) -> str:
        return f"{self.nodes[0].op} {self.nodes[0].name or '(unnamed)'} (weight {self.weight.name})"


def _constant_weight(tensor) -> tuple[gs.Constant, bool] | None:
    """(2-D constant, whether it reaches B through a 2-D Transpose) or None."""
    if isinstance(tensor, gs.Constant):
        return (tensor, False) if len(tensor.shape) == 2 else None
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is not None and producer.op == "Transpose" and isinstance(producer.inputs[0], gs.Constant):
        source = producer.inputs[0]
        if len(source.shape) == 2 and list(producer.attrs.get("perm", [1, 0])) == [1, 0]:
            return source, True
    return None


def _gemm_problem(node: gs.Node) -> str | None:
    if node.op != "Gemm":
        return None
    if node.attrs.get("transA", 0):
        return "Gemm with transA=1"
    if node.attrs.get("alpha", 1.0) != 1.0:
        return f"Gemm with alpha={node.attrs['alpha']:g} (the packed scales would have to change)"
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Variable) and node.attrs.get("beta", 1.0) != 1.0:
        return "Gemm with a computed C and beta != 1"
    return None


def find_sites(graph: gs.Graph, base_dir: Path) -> list[Site]:
    sites: dict[tuple[str, bool], Site] = {}
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        found = _constant_weight(node.inputs[1])
        if found is None:
            continue
        weight, through_transpose = found
        dense_is_weight = through_transpose != bool(node.op == "Gemm" and node.attrs.get("transB", 0))
        site = sites.setdefault((weight.name, dense_is_weight), Site(weight, dense_is_weight))
        site.nodes.append(node)
        site.problem = site.problem or _gemm_problem(node) or _dtype_problem(weight, base_dir)
    return list(sites.values())


def _dtype_problem(weight: gs.Constant, base_dir: Path) -> str | None:
    dtype = weight_view(_proto(weight), base_dir).dtype
    if dtype not in WEIGHT_DTYPES:
        return f"weight of type {dtype} (SageBinaryGemm takes float16 or float32 activations)"
    return None


def _proto(constant: gs.Constant) -> TensorProto:
    if isinstance(constant._values, LazyValues):
        return constant._values.tensor
    return numpy_helper.from_array(np.asarray(constant.values), constant.name)


# ----------------------------------------------------------------------------------------------- matching


def sample_positions(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (row, column) positions of Ŵ [N, K], the same for every weight of that shape."""
    total = n * k
    flat = (np.arange(total) if total <= SAMPLE_SIZE
            else np.sort(np.random.default_rng([n, k]).choice(total, SAMPLE_SIZE, replace=False)))
    return flat // k, flat % k


def site_fingerprint(site: Site, base_dir: Path) -> np.ndarray:
    rows, cols = sample_positions(*site.shape)
    stored = weight_view(_proto(site.weight), base_dir)
    values = stored[rows, cols] if site.dense_is_weight else stored[cols, rows]
    return np.asarray(values, dtype=np.float64)


def layer_fingerprint(packed: PackedLinear) -> np.ndarray:
    rows, cols = sample_positions(*packed.shape)
    return dequantize(packed)[rows, cols].astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else 0.0


@dataclass(frozen=True)
class Match:
    layer: str
    site: Site
    cosine: float
    how: str  # "content" or "name map"

    def to_dict(self) -> dict:
        return {"layer": self.layer, "nodes": [n.name for n in self.site.nodes], "op": self.site.nodes[0].op,
                "weight": self.site.weight.name, "cosine": round(self.cosine, 6), "matched_by": self.how}


def _named_site(layer: str, name: str, sites: list[Site]) -> Site:
    named = [s for s in sites if name == s.weight.name or name in [n.name for n in s.nodes]]
    if len(named) != 1:
        raise UserError(f"name map: {layer} -> {name!r}: {'no' if not named else len(named)} MatMul/Gemm "
                        "weights or nodes of that name")
    return named[0]


def match_layer(layer: str, packed: PackedLinear, sites: list[Site], prints: dict[int, np.ndarray],
                mapped: str | None) -> Match:
    """The one site holding `layer`; one-line errors for none, several, or an unsupported site."""
    n, k = packed.shape
    if mapped is not None:
        site = _named_site(layer, mapped, sites)
        if site.shape != packed.shape:
            raise UserError(f"name map: {layer} [N={n}, K={k}] -> {site.label} of shape [N, K] = {list(site.shape)}")
        candidates = [site]
    else:
        candidates = [s for s in sites if s.shape == packed.shape]
    if not candidates:
        raise UserError(f"layer {layer} [N={n}, K={k}]: no MatMul/Gemm in the ONNX has a constant weight of that "
                        "shape")
    mine = layer_fingerprint(packed)
    scored = sorted(((cosine(mine, prints[id(s)]), s) for s in candidates), key=lambda x: -x[0])
    hits = [(c, s) for c, s in scored if c >= MATCH_COS]
    if not hits:
        best, site = scored[0]
        raise UserError(f"layer {layer} [N={n}, K={k}]: no weight in the ONNX matches it (best: {site.label}, "
                        f"cosine {best:.3f} < {MATCH_COS}); was the ONNX exported from this checkpoint's model?")
    if len(hits) > 1:
        listed = ", ".join(f"{s.weight.name} (cosine {c:.3f})" for c, s in hits[:3])
        raise UserError(f"layer {layer}: {len(hits)} weights in the ONNX match it: {listed}; choose one with "
                        "--name-map")
    score, site = hits[0]
    if site.problem:
        raise UserError(f"layer {layer} matches {site.label}, which cannot be replaced: {site.problem}")
    return Match(layer, site, score, "name map" if mapped is not None else "content")


def match_layers(sites: list[Site], packed: Mapping[str, PackedLinear], base_dir: Path,
                 name_map: Mapping[str, str] | None = None) -> list[Match]:
    name_map = dict(name_map or {})
    unknown = [name for name in name_map if name not in packed]
    if unknown:
        raise UserError(f"name map: {unknown[0]!r} is not a quantized layer of the checkpoint")
    shapes = {p.shape for p in packed.values()}
    prints = {id(s): site_fingerprint(s, base_dir) for s in sites if s.shape in shapes}
    matches = [match_layer(name, packed[name], sites, prints, name_map.get(name)) for name in sorted(packed)]
    claimed: dict[str, str] = {}
    for m in matches:
        key = f"{m.site.weight.name}/{m.site.dense_is_weight}"
        if key in claimed:
            raise UserError(f"layers {claimed[key]} and {m.layer} both match the weight {m.site.weight.name}; "
                            "choose with --name-map")
        claimed[key] = m.layer
    return matches


def read_name_map(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        mapping = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"name map not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"name map {path} is not JSON: {exc}") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in mapping.items()):
        raise UserError(f"name map {path} must be a JSON object of layer name -> ONNX weight or node name")
    return mapping


# ----------------------------------------------------------------------------------------------- rewriting


class _Writer:
    """Writes tensors into the new external data file (ExternalData: aligned, small ones inline) and keeps the
    names it wrote, so relocation skips them."""

    def __init__(self, data: ExternalData):
        self.data = data
        self.written: set[str] = set()

    def constant(self, name: str, array: np.ndarray) -> gs.Constant:
        self.written.add(name)
        # LazyValues around the written proto: graphsurgeon exports that proto as it is (no second copy).
        return gs.Constant(name, LazyValues(self.data.tensor(name, array)))

    def relocate(self, proto: TensorProto, source_dir: Path) -> None:
        """Move one source initializer's bytes into the new data file (or inline when small)."""
        if proto.name in self.written:
            return
        if _external(proto) is not None:
            path, offset, length = _external_span(proto, source_dir)
            raw = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(length,))
        elif proto.HasField("raw_data"):
            raw = np.frombuffer(proto.raw_data, dtype=np.uint8)
        else:
            raw = numpy_helper.to_array(proto).view(np.uint8).reshape(-1)
        moved = self.data.tensor(proto.name, raw)  # a uint8 tensor: only its location fields are taken
        del proto.external_data[:]
        if moved.data_location == TensorProto.EXTERNAL:
            proto.external_data.extend(moved.external_data)
            proto.data_location = TensorProto.EXTERNAL
            proto.ClearField("raw_data")
        else:
            proto.data_location = TensorProto.DEFAULT
            proto.raw_data = bytes(raw)
        for typed in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            proto.ClearField(typed)


def _bias_input(node: gs.Node, layer: str, n: int, writer: _Writer, base_dir: Path):
    """Gemm's C as SageBinaryGemm's float32 bias [N] (beta folded in), or the C tensor to add after the node."""
    if node.op != "Gemm" or len(node.inputs) < 3 or node.inputs[2].name == "":
        return None, None
    c = node.inputs[2]
    if isinstance(c, gs.Variable):
        return None, c
    values = np.asarray(weight_view(_proto(c), base_dir), dtype=np.float32) * np.float32(node.attrs.get("beta", 1.0))
    if values.size not in (1, n) or (values.size == n and values.shape[-1] != n):
        raise UserError(f"{node.name}: Gemm's C of shape {list(values.shape)} is not a bias of {n} outputs")
    bias = np.ascontiguousarray(np.broadcast_to(values.reshape(-1) if values.size == n else values.reshape(()),
                                                (n,)))
    return writer.constant(f"{layer}.bias", bias), None


def replace_site(graph: gs.Graph, match: Match, packed: PackedLinear, writer: _Writer, base_dir: Path) -> None:
    """Every node of the site becomes a SageBinaryGemm node producing the same output tensor; the old node is
    disconnected (cleanup removes it, its weight and any Transpose feeding it)."""
    packed_inputs = [writer.constant(f"{match.layer}.{name}", array) for name, array in packed.tensors().items()]
    for i, node in enumerate(match.site.nodes):
        suffix = "" if len(match.site.nodes) == 1 else f"_{i}"
        bias, added = _bias_input(node, match.layer, packed.out_features, writer, base_dir)
        output = node.outputs[0]
        if added is not None:  # a computed C: the sum stays an Add after the node
            product = gs.Variable(f"{match.layer}/SageBinaryGemm{suffix}/out", dtype=output.dtype)
            graph.nodes.append(gs.Node("Add", f"{match.layer}/bias{suffix}", inputs=[product, added],
                                       outputs=[output]))
            output = product
        inputs = [node.inputs[0], *packed_inputs] + ([bias] if bias is not None else [])
        node.outputs.clear()
        graph.nodes.append(gs.Node(OP_TYPE, f"{match.layer}/SageBinaryGemm{suffix}",
                                   attrs=sage_attributes(packed.attrs()), inputs=inputs, outputs=[output],
                                   domain=DOMAIN))


@dataclass(frozen=True)
class RewritePlan:
    source: Path
    model: onnx.ModelProto
    graph: gs.Graph
    matches: list[Match]


def plan_rewrite(onnx_path: Path, packed: Mapping[str, PackedLinear], name_map: Mapping[str, str] | None = None,
                 model: onnx.ModelProto | None = None) -> RewritePlan:
    """Load the structure (unless `model` is load_structure's result already) and match every packed layer to its
    weight: every one-line refusal happens here, before anything is written."""
    onnx_path = Path(onnx_path)
    model = load_structure(onnx_path) if model is None else model
    graph = gs.import_onnx(model)
    sites = find_sites(graph, onnx_path.parent)
    return RewritePlan(onnx_path, model, graph, match_layers(sites, packed, onnx_path.parent, name_map))


@dataclass(frozen=True)
class RewriteResult:
    onnx_path: Path
    data_path: Path
    n_sage_nodes: int
    n_nodes: int
    matches: list[dict]

    def to_dict(self) -> dict:
        return {"onnx": self.onnx_path.name, "data": self.data_path.name, "n_nodes": self.n_nodes,
                "n_sage_nodes": self.n_sage_nodes, "matches": self.matches}


def write_rewrite(plan: RewritePlan, packed: Mapping[str, PackedLinear], out_dir: Path) -> RewriteResult:
    """Replace the matched nodes and write model.onnx + model.onnx.data into out_dir (an existing directory; the
    caller owns atomicity)."""
    out_dir = Path(out_dir)
    onnx_path, data_path = out_dir / ONNX_NAME, out_dir / DATA_NAME
    data = ExternalData(data_path)
    try:
        writer = _Writer(data)
        for match in plan.matches:
            replace_site(plan.graph, match, packed[match.layer], writer, plan.source.parent)
        plan.graph.cleanup().toposort()
        model = gs.export_onnx(plan.graph)
        for proto in _all_initializers(model.graph):
            writer.relocate(proto, plan.source.parent)
    finally:
        data.close()
    _carry_model_fields(plan.model, model)
    add_function(model)
    onnx.save_model(model, onnx_path)
    onnx.checker.check_model(str(onnx_path))
    return RewriteResult(onnx_path, data_path, len(sage_nodes(model)), len(model.graph.node),
                         [m.to_dict() for m in plan.matches])


def _carry_model_fields(source: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """What graphsurgeon's export does not carry over: the IR version, metadata, and the opset of every domain the
    source imported (graphsurgeon infers them from the nodes left)."""
    model.ir_version = source.ir_version
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    have = {o.domain for o in model.opset_import}
    model.opset_import.extend(o for o in source.opset_import if o.domain not in have)
    for o in model.opset_import:
        if o.domain == DOMAIN:
            o.version = FUNCTION_VERSION


# ----------------------------------------------------------------------------------------------- ORT check


def _feeds(session, ids: np.ndarray, past: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """What this session's inputs need for ids [1, seq] after `past` (None: empty cache), no padding."""
    batch, seq = ids.shape
    past_len = next(iter(past.values())).shape[2] if past else 0
    feeds = {}
    for value in session.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = ids.astype(np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((batch, past_len + seq), np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.arange(past_len, past_len + seq, dtype=np.int64)[None].repeat(batch, 0)
        elif past is not None:
            feeds[value.name] = past[value.name]
        else:
            feeds[value.name] = np.zeros((batch, value.shape[1], 0, value.shape[3]), np.float32)
    return feeds


def greedy_ort(session, logits_name: str, prompt: list[int], n_new: int) -> list[int]:
    """Greedy tokens: through the KV cache when the graph has one (Optimum's present.* outputs), otherwise by
    running the whole sequence again for each token."""
    names = [o.name for o in session.get_outputs()]
    cached = any(n.startswith("present.") for n in names)
    ids, past, tokens = np.asarray(prompt, dtype=np.int64)[None], None, []
    for _ in range(n_new):
        outputs = dict(zip(names, session.run(names, _feeds(session, ids, past))))
        tokens.append(int(outputs[logits_name][0, -1].argmax()))
        if cached:
            past = {n.replace("present.", CACHE_PREFIX, 1): v for n, v in outputs.items() if n.startswith("present.")}
            ids = np.array([[tokens[-1]]], dtype=np.int64)
        else:
            ids = np.concatenate([ids, [[tokens[-1]]]], axis=1)
    return tokens


def prefill_logits(session, logits_name: str, ids: np.ndarray) -> np.ndarray:
    return session.run([logits_name], _feeds(session, np.asarray(ids, dtype=np.int64), None))[0]


def check_rewritten(result: RewriteResult, logits_name: str, torch_model, tokenizer, n_new: int = 8) -> dict:
    """The project's ORT check (ort_check.py's figures and thresholds) on the rewritten graph, against the
    checkpoint's PyTorch model: the op against the NumPy reference, prompt logits, greedy tokens."""
    from .ort_check import (PROMPT, THRESHOLDS, check_failures, check_op, error_figures, greedy_generate_torch,
                            make_session, torch_logits)

    prompt = tokenizer(PROMPT, add_special_tokens=False).input_ids
    ids = np.asarray(prompt, dtype=np.int64)[None]
    ref = torch_logits(torch_model, ids)
    torch_tokens = greedy_generate_torch(torch_model, prompt, n_new)
    session = make_session(result.onnx_path, constant_folding=False)
    got = prefill_logits(session, logits_name, ids)
    if got.shape[1] == 1 and ref.shape[1] > 1:  # a graph that returns the last position only
        ref = ref[:, -1:]
    ort_tokens = greedy_ort(session, logits_name, prompt, n_new)
    checks = {
        "op": check_op(),
        "logits": {**error_figures(got, ref), "tokens": int(ids.size),
                   "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())},
        "greedy": {"n_new": n_new, "prompt": PROMPT, "identical": ort_tokens == torch_tokens,
                   "first_mismatch": next((i for i, (a, b) in enumerate(zip(ort_tokens, torch_tokens)) if a != b),
                                          None),
                   "text_ort": tokenizer.decode(ort_tokens)},
        # make_session says what ran SageBinaryGemm (the native custom op where built, else the function body).
        "session": f"ONNX Runtime CPU, SageBinaryGemm by the {getattr(session, 'sage_runtime', 'function body')}, "
                   f"output {logits_name!r}",
        "thresholds": THRESHOLDS,
    }
    checks["failures"] = check_failures(checks)
    return checks
