"""TensorRT engine for an exported model, with the SageBinaryGemm plugin. Written against the documented TensorRT
10 Python API; TensorRT cannot be installed on this project's CI machines, so this path runs only where it is
present (require_tensorrt() fails early and clearly everywhere else)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_NAME = "libsage_trt_plugin.so"


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise UserError(f"TensorRT Python bindings are not importable ({exc}); install TensorRT 10.x on a GPU "
                        "machine to build engines") from None
    return trt


def plugin_library() -> Path:
    """The plugin .so: $SAGE_TRT_PLUGIN, an existing build, or a fresh build with tools/build_plugins.sh."""
    env = os.environ.get("SAGE_TRT_PLUGIN")
    if env:
        if not Path(env).is_file():
            raise UserError(f"SAGE_TRT_PLUGIN points to a missing file: {env}")
        return Path(env)
    found = sorted(REPO_ROOT.glob(f"plugins/build*/**/{PLUGIN_NAME}"))
    if found:
        return found[0]
    subprocess.run(["bash", str(REPO_ROOT / "tools" / "build_plugins.sh")], check=True)
    found = sorted(REPO_ROOT.glob(f"plugins/build*/**/{PLUGIN_NAME}"))
    if not found:
        raise UserError(f"plugin build finished but {PLUGIN_NAME} was not produced (TensorRT headers missing?)")
    return found[0]


@dataclass(frozen=True)
class ShapeLimits:
    max_batch: int = 1
    max_seq: int = 2048  # prefill tokens in one call
    max_total: int = 2048  # past + new tokens


def _input_shape(name: str, dims: list, batch: int, seq: int, past: int) -> tuple[int, ...]:
    """Concrete shape of one model input for a given batch, new-token count and past length (Optimum names)."""
    if name in ("input_ids", "position_ids"):
        return (batch, seq)
    if name == "attention_mask":
        return (batch, past + seq)
    if name.startswith("past_key_values."):
        return (batch, int(dims[1]), past, int(dims[3]))
    raise UserError(f"unexpected engine input {name!r}")


def add_profiles(builder, config, inputs: dict[str, list], lim: ShapeLimits) -> None:
    """Two optimisation profiles: decode (one new token, any past) and prefill (many new tokens, no past)."""
    plans = {
        "decode": [(1, 1, 0), (1, 1, lim.max_total // 2), (lim.max_batch, 1, lim.max_total - 1)],
        "prefill": [(1, 1, 0), (1, lim.max_seq // 2, 0), (lim.max_batch, lim.max_seq, 0)],
    }
    for stages in plans.values():
        profile = builder.create_optimization_profile()
        for name, dims in inputs.items():
            profile.set_shape(name, *(_input_shape(name, dims, *s) for s in stages))
        config.add_optimization_profile(profile)


def network_flags(trt) -> int:
    """A strongly typed network. The plugin's inputs 1, 2 and 6 are plain INT8 bit-planes and integers; in a weakly
    typed network TensorRT treats INT8 tensors as quantized and asks for scales (or finds no format) for them.
    Strongly typed, every tensor keeps the type the ONNX gives it: float16 activations and float parts from the
    export, INT8/INT32 packed tensors as stored. The precision then comes from the ONNX, so no FP16 builder flag."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_engine(onnx_path: Path, engine_path: Path, plugin: Path, lim: ShapeLimits = ShapeLimits()) -> dict:
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    trt.get_plugin_registry().load_library(str(plugin))
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    inputs = {network.get_input(i).name: list(network.get_input(i).shape) for i in range(network.num_inputs)}
    config = builder.create_builder_config()
    add_profiles(builder, config, inputs, lim)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    return {"engine": str(engine_path), "bytes": engine_path.stat().st_size, "plugin": str(plugin),
            "tensorrt_version": trt.__version__, "profiles": ["decode", "prefill"], "network": "strongly typed"}


def run_engine_prefill(engine_path: Path, plugin: Path, input_ids: np.ndarray, inputs: dict[str, list]) -> np.ndarray:
    """Logits of one prefill call (profile 1, no past) through the engine; torch CUDA tensors hold the buffers."""
    import torch

    trt = require_tensorrt()
    trt.get_plugin_registry().load_library(str(plugin))
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
    ctx = engine.create_execution_context()
    stream = torch.cuda.current_stream()
    ctx.set_optimization_profile_async(1, stream.cuda_stream)
    batch, seq = input_ids.shape
    feeds = {}
    for name, dims in inputs.items():
        shape = _input_shape(name, dims, batch, seq, 0)
        if name == "input_ids":
            t = torch.as_tensor(input_ids, dtype=torch.int64)
        elif name == "attention_mask":
            t = torch.ones(shape, dtype=torch.int64)
        elif name == "position_ids":
            t = torch.arange(seq, dtype=torch.int64).expand(batch, seq).contiguous()
        else:
            t = torch.zeros(shape, dtype=torch.float32)
        feeds[name] = t.cuda()
        ctx.set_input_shape(name, shape)
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = torch.float16 if engine.get_tensor_dtype(name) == trt.DataType.HALF else torch.float32
            outputs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device="cuda")
    for name, t in {**feeds, **outputs}.items():
        ctx.set_tensor_address(name, t.data_ptr())
    if not ctx.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return outputs["logits"].float().cpu().numpy()


def build_engine_for_export(onnx_dir: Path, engine_dir: Path, rep: dict) -> dict:
    """Build the engine for the exported model and compare its prefill logits with ONNX Runtime's."""
    import onnx

    from ..onnx.ort_check import make_session

    onnx_path = onnx_dir / "model.onnx"
    plugin = plugin_library()
    info = build_engine(onnx_path, engine_dir / "model.engine", plugin)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = {i.name: [d.dim_value or -1 for d in i.type.tensor_type.shape.dim] for i in graph.input}
    ids = np.arange(1, 33, dtype=np.int64)[None, :]
    trt_logits = run_engine_prefill(engine_dir / "model.engine", plugin, ids, inputs)
    session = make_session(onnx_path, constant_folding=False)
    feeds = {n: (ids if n == "input_ids" else np.ones_like(ids) if n == "attention_mask"
                 else np.arange(ids.shape[1])[None] if n == "position_ids"
                 else np.zeros([1, d[1], 0, d[3]], np.float32)) for n, d in inputs.items()}
    ort_logits = session.run(["logits"], feeds)[0]
    err = np.abs(trt_logits - ort_logits)
    info["vs_ort"] = {"max_abs": float(err.max()), "mean_abs": float(err.mean()),
                      "rel": float(np.linalg.norm(trt_logits - ort_logits) / np.linalg.norm(ort_logits)),
                      "tokens": int(ids.shape[1])}
    return info
