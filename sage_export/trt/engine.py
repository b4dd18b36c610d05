"""TensorRT engine for an exported model, with the SageBinaryGemm plugin, for a deployment target (targets.py).
Written against the documented TensorRT 10 Python API; TensorRT cannot be installed on this project's CI
machines, so this path runs only where it is present (require_tensorrt() fails early and clearly everywhere else,
and tests/test_trt_engine.py checks every call against a fake `tensorrt` module).

What the build guarantees before it spends time tuning:
- the model-local SageBinaryGemm function is removed from the graph the parser sees: TensorRT's ONNX parser
  prefers a registered plugin over a same-named local function only from 10.15 on (JetPack 6 ships 10.3), and an
  older parser would inline the function's BitShift/BitwiseAnd body instead of calling the plugin;
- the parsed network holds exactly one plugin layer per SageBinaryGemm node, or the build stops in one line;
- the plugin library is registered once per process (plugin.load_once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..format.atomic import atomic_write_bytes, atomic_write_text
from . import plugin as plugins
from .targets import HARDWARE_COMPAT, Target, input_shape, profile_shapes

ENGINE_NAME = "model.engine"
SIDECAR_NAME = "model.engine.json"
TIMING_CACHE_NAME = "timing.cache"
SAGE_DOMAIN, SAGE_OP = "sage", "SageBinaryGemm"


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise UserError(f"TensorRT Python bindings are not importable ({exc}); install TensorRT 10.x on a GPU "
                        "machine to build engines") from None
    return trt


def network_flags(trt) -> int:
    """A strongly typed network. The plugin's inputs 1, 2, 5 and 6 are plain INT8 bit-planes and integers (5: the
    16-bit salient columns, two bytes each since contract v3); in a weakly typed network TensorRT treats INT8 tensors
    as quantized and asks for scales (or finds no format) for them.
    Strongly typed, every tensor keeps the type the ONNX gives it: float16 activations and float parts from the
    export, INT8/INT32 packed tensors as stored. The precision then comes from the ONNX, so no FP16 builder flag."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


# ----------------------------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class ParserInput:
    model_bytes: bytes  # the ONNX without the SageBinaryGemm function (external data stays in its file)
    sage_nodes: int
    functions_removed: int
    inputs: dict[str, list]  # graph input -> dims (-1 where dynamic)


def parser_input(onnx_path: Path) -> ParserInput:
    """The graph as the parser should see it: the SageBinaryGemm function removed, so nothing but the plugin can
    implement the nodes. Loaded without external data, so this costs the graph's structure only."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    kept = [f for f in model.functions if not (f.domain == SAGE_DOMAIN and f.name == SAGE_OP)]
    removed = len(model.functions) - len(kept)
    del model.functions[:]
    model.functions.extend(kept)
    nodes = sum(1 for n in model.graph.node if n.domain == SAGE_DOMAIN and n.op_type == SAGE_OP)
    inputs = {i.name: [d.dim_value or -1 for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    return ParserInput(model.SerializeToString(), nodes, removed, inputs)


def plugin_layer_count(trt, network) -> int:
    kinds = {getattr(trt.LayerType, name) for name in ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN")
             if hasattr(trt.LayerType, name)}
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type in kinds)


def check_plugin_layers(trt, network, sage_nodes: int) -> int:
    found = plugin_layer_count(trt, network)
    if found != sage_nodes:
        raise UserError(f"the parsed network has {found} plugin layers for {sage_nodes} SageBinaryGemm nodes: "
                        f"TensorRT {trt.__version__}'s parser did not call the plugin for every node (is "
                        "libsage_trt_plugin.so the build for this TensorRT?)")
    return found


def parse(trt, network, logger, onnx_path: Path, graph: ParserInput):
    parser = trt.OnnxParser(network, logger)
    # From bytes, with the file's path so that the external data file is found beside it.
    if not parser.parse(graph.model_bytes, str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    return parser


# ----------------------------------------------------------------------------------------------- the builder


def network_inputs(network) -> dict[str, list]:
    return {network.get_input(i).name: list(network.get_input(i).shape) for i in range(network.num_inputs)}


def add_profiles(builder, config, shapes: dict[str, dict[str, list[list[int]]]]) -> None:
    for per_input in shapes.values():
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in per_input.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise RuntimeError("TensorRT refused an optimisation profile (see the TensorRT log above)")


def configure(trt, config, target: Target, hardware: str) -> None:
    """The target's builder settings, each set explicitly so the sidecar states what the engine was built with."""
    if target.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, target.workspace_bytes)
    config.builder_optimization_level = target.optimization_level
    level = getattr(trt.HardwareCompatibilityLevel, HARDWARE_COMPAT[hardware], None)
    if level is None:
        raise UserError(f"TensorRT {trt.__version__} has no hardware compatibility level {hardware!r}")
    config.hardware_compatibility_level = level


def attach_timing_cache(config, seed: Path | None) -> None:
    """Start from `seed` (an earlier build's cache) when given, else from an empty cache."""
    blob = Path(seed).read_bytes() if seed is not None else b""
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, False):
        raise RuntimeError(f"TensorRT did not accept the timing cache{f' {seed}' if seed else ''}")


@dataclass(frozen=True)
class EngineRequest:
    onnx_path: Path
    engine_dir: Path
    plugin: Path
    target: Target
    hardware: str  # key of HARDWARE_COMPAT
    timing_cache_seed: Path | None = None


def build_engine(req: EngineRequest) -> dict:
    """Build engine_dir/model.engine, with timing.cache and the model.engine.json sidecar beside it; returns the
    sidecar's content."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    plugins.load_once(trt, req.plugin)
    graph = parser_input(req.onnx_path)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = parse(trt, network, logger, req.onnx_path, graph)
    n_plugin = check_plugin_layers(trt, network, graph.sage_nodes)
    config = builder.create_builder_config()
    configure(trt, config, req.target, req.hardware)
    attach_timing_cache(config, req.timing_cache_seed)
    shapes = profile_shapes(req.target, network_inputs(network))
    add_profiles(builder, config, shapes)
    serialized = builder.build_serialized_network(network, config)
    del parser  # the parser owns the weights until the build is done
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    req.engine_dir.mkdir(parents=True, exist_ok=True)
    engine_path = req.engine_dir / ENGINE_NAME
    atomic_write_bytes(engine_path, bytes(serialized))
    cache_bytes = bytes(config.get_timing_cache().serialize())
    atomic_write_bytes(req.engine_dir / TIMING_CACHE_NAME, cache_bytes)
    info = sidecar(trt, req, graph, n_plugin, shapes, engine_path.stat().st_size, len(cache_bytes))
    write_sidecar(req.engine_dir, info)
    return info


def sidecar(trt, req: EngineRequest, graph: ParserInput, n_plugin: int, shapes: dict, engine_bytes: int,
            cache_bytes: int) -> dict:
    return {
        "engine": ENGINE_NAME, "bytes": engine_bytes, "onnx": str(req.onnx_path),
        "target": req.target.describe(), "profiles": shapes,
        "profile_order": list(shapes),  # the index of a profile in the engine is its place here
        "optimization_level": req.target.optimization_level, "hardware_compatibility": req.hardware,
        "workspace_bytes": req.target.workspace_bytes,
        "timing_cache": {"file": TIMING_CACHE_NAME, "bytes": cache_bytes,
                         "seeded_from": str(req.timing_cache_seed) if req.timing_cache_seed else None},
        "plugin": plugins.describe(req.plugin),
        "tensorrt_version": trt.__version__, "network": "strongly typed",
        "sage_nodes": graph.sage_nodes, "plugin_layers": n_plugin,
        "local_functions_removed": graph.functions_removed,
        "load_before_deserializing": plugins.PLUGIN_NAME,
    }


def write_sidecar(engine_dir: Path, info: dict) -> None:
    atomic_write_text(engine_dir / SIDECAR_NAME, json.dumps(info, indent=1, sort_keys=True, default=str) + "\n")


# ----------------------------------------------------------------------------------------------- running


def _set(ok, what: str) -> None:
    """TensorRT's setters return False (and log) instead of raising: a silent False would run on stale shapes or
    addresses."""
    if not ok:
        raise RuntimeError(f"TensorRT refused {what} (see the TensorRT log above)")


def set_input_shapes(ctx, shapes: dict[str, tuple]) -> None:
    for name, shape in shapes.items():
        _set(ctx.set_input_shape(name, shape), f"input shape {name} = {list(shape)}")


def set_addresses(ctx, tensors: dict) -> None:
    """Every input and output buffer (torch tensors) bound to the execution context."""
    for name, tensor in tensors.items():
        _set(ctx.set_tensor_address(name, tensor.data_ptr()), f"the address of {name}")


def _prefill_feeds(torch, inputs: dict[str, list], input_ids: np.ndarray) -> dict[str, tuple]:
    batch, seq = input_ids.shape
    feeds = {}
    for name, dims in inputs.items():
        shape = input_shape(name, dims, batch, seq, 0)
        if name == "input_ids":
            t = torch.as_tensor(input_ids, dtype=torch.int64)
        elif name == "attention_mask":
            t = torch.ones(shape, dtype=torch.int64)
        elif name == "position_ids":
            t = torch.arange(seq, dtype=torch.int64).expand(batch, seq).contiguous()
        else:
            t = torch.zeros(shape, dtype=torch.float32)
        feeds[name] = (shape, t.cuda())
    return feeds


def run_engine_prefill(engine_path: Path, plugin: Path, input_ids: np.ndarray, inputs: dict[str, list],
                       profile: int) -> np.ndarray:
    """Logits of one prefill call (no past) through the engine; torch CUDA tensors hold the buffers."""
    import torch

    trt = require_tensorrt()
    plugins.load_once(trt, plugin)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {engine_path}")
    ctx = engine.create_execution_context()
    stream = torch.cuda.current_stream()
    _set(ctx.set_optimization_profile_async(profile, stream.cuda_stream), f"optimisation profile {profile}")
    feeds = _prefill_feeds(torch, inputs, input_ids)
    set_input_shapes(ctx, {name: shape for name, (shape, _) in feeds.items()})
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = torch.float16 if engine.get_tensor_dtype(name) == trt.DataType.HALF else torch.float32
            outputs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device="cuda")
    set_addresses(ctx, {**{name: t for name, (_, t) in feeds.items()}, **outputs})
    _set(ctx.execute_async_v3(stream.cuda_stream), "execution")
    stream.synchronize()
    return outputs["logits"].float().cpu().numpy()


def compare_with_ort(req: EngineRequest, info: dict) -> dict:
    """Prefill logits of the engine against ONNX Runtime on 32 tokens, where torch sees a CUDA device."""
    import torch

    from ..onnx.ort_check import make_session

    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device; the engine was built but not run"}
    graph = parser_input(req.onnx_path)
    ids = np.arange(1, 33, dtype=np.int64)[None, :]
    profile = info["profile_order"].index("prefill")
    trt_logits = run_engine_prefill(req.engine_dir / ENGINE_NAME, req.plugin, ids, graph.inputs, profile)
    session = make_session(req.onnx_path, constant_folding=False)
    feeds = {n: (ids if n == "input_ids" else np.ones_like(ids) if n == "attention_mask"
                 else np.arange(ids.shape[1])[None] if n == "position_ids"
                 else np.zeros([1, d[1], 0, d[3]], np.float32)) for n, d in graph.inputs.items()}
    ort_logits = session.run(["logits"], feeds)[0]
    err = np.abs(trt_logits - ort_logits)
    return {"max_abs": float(err.max()), "mean_abs": float(err.mean()),
            "rel": float(np.linalg.norm(trt_logits - ort_logits) / np.linalg.norm(ort_logits)),
            "tokens": int(ids.shape[1])}


def build_and_compare(req: EngineRequest) -> dict:
    """Build the engine, compare its prefill logits with ONNX Runtime's where it can run, and record the
    comparison in the sidecar too."""
    info = build_engine(req)
    info["vs_ort"] = compare_with_ort(req, info)
    write_sidecar(req.engine_dir, info)
    return info
