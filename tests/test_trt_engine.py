"""What the engine code asks of TensorRT, checked against a fake `tensorrt` module (TensorRT cannot be installed
here; a real build runs only on a GPU machine, and none was run): a strongly typed network, no precision flags,
each target's profiles and builder settings, the timing cache, the SageBinaryGemm function removed before
parsing, exactly one plugin layer per SageBinaryGemm node, the plugin loaded once, every setter's result checked,
the sidecar's contents, and `sage-export model --trt --target edge|l40` / `sage-export engine` end to end."""

import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sage_export.cli import main
from sage_export.onnx.function import DOMAIN, OP_TYPE, PLUGIN_ATTRIBUTES, add_function, sage_node
from sage_export.onnx.ort_check import random_packed
from sage_export.trt import engine, plugin as plugins
from sage_export.trt.targets import TARGETS, profile_plans

FAKE_PLAN = b"fake-plan"
FAKE_CACHE = b"fake-timing-cache"
FAST_MODEL = ["--preset", "paper", "--fixed-groups", "2", "--fixed-rho", "0.02", "--jobs", "1"]


class Recorder:
    def __init__(self):
        self.calls = []
        self.plugin_layers_per_node = 1  # 0: a parser that inlines the local function instead of calling the plugin
        self.parsed_functions = None

    def names(self, kind):
        return [c for c in self.calls if c[0] == kind]


def fake_tensorrt(rec: Recorder) -> types.ModuleType:
    """The parts of TensorRT 10's Python API that engine.py uses. The parser reads the ONNX it is given, so the
    network's inputs and plugin layers follow the real graph."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.14-fake"
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)  # TensorRT 10's value
    trt.LayerType = types.SimpleNamespace(PLUGIN_V3="PLUGIN_V3", PLUGIN_V2="PLUGIN_V2", MATRIX_MULTIPLY="MATMUL")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.HardwareCompatibilityLevel = types.SimpleNamespace(NONE="NONE", AMPERE_PLUS="AMPERE_PLUS",
                                                           SAME_COMPUTE_CAPABILITY="SAME_COMPUTE_CAPABILITY")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Network:
        def __init__(self):
            self.inputs, self.layers = [], []

        num_inputs = property(lambda self: len(self.inputs))
        num_layers = property(lambda self: len(self.layers))

        def get_input(self, i):
            return self.inputs[i]

        def get_layer(self, i):
            return self.layers[i]

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            rec.calls.append(("set_shape", name, list(lo), list(opt), list(hi)))

    class TimingCache:
        def serialize(self):
            return FAKE_CACHE

    class Config:
        def __setattr__(self, name, value):
            rec.calls.append(("config", name, value))
            object.__setattr__(self, name, value)

        def set_flag(self, flag):
            rec.calls.append(("set_flag", flag))

        def set_memory_pool_limit(self, pool, size):
            rec.calls.append(("memory_pool", pool, size))

        def add_optimization_profile(self, profile):
            rec.calls.append(("add_profile",))
            return len(rec.names("add_profile")) - 1

        def create_timing_cache(self, blob):
            rec.calls.append(("create_timing_cache", bytes(blob)))
            return TimingCache()

        def set_timing_cache(self, cache, ignore_mismatch):
            rec.calls.append(("set_timing_cache", ignore_mismatch))
            return True

        def get_timing_cache(self):
            return TimingCache()

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            rec.calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.calls.append(("build",))
            return FAKE_PLAN

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse(self, model_bytes, path):
            rec.calls.append(("parse", path))
            model = onnx.load_from_string(model_bytes)
            rec.parsed_functions = [(f.domain, f.name) for f in model.functions]
            for value in model.graph.input:
                dims = [d.dim_value or -1 for d in value.type.tensor_type.shape.dim]
                self.network.inputs.append(types.SimpleNamespace(name=value.name, shape=dims))
            for node in model.graph.node:
                sage = node.op_type == OP_TYPE and node.domain == DOMAIN
                kind = "PLUGIN_V3" if sage and rec.plugin_layers_per_node else "MATMUL"
                self.network.layers.append(types.SimpleNamespace(name=node.name, type=kind))
            return True

    def load_library(path):
        rec.calls.append(("load_library", path))
        return object()

    registry = types.SimpleNamespace(load_library=load_library,
                                     get_creator=lambda name, version, namespace: (name, version, namespace))
    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.get_plugin_registry = lambda: registry
    return trt


@pytest.fixture
def rec(monkeypatch):
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(recorder))
    monkeypatch.setattr(plugins, "_loaded", {})  # each test starts in a process that loaded nothing
    return recorder


def fake_plugin(directory: Path, cuda: str, archs: str) -> Path:
    """A stand-in library file with the build record tools/build_plugins.sh writes beside a real one."""
    directory.mkdir(parents=True, exist_ok=True)
    lib = directory / plugins.PLUGIN_NAME
    lib.write_bytes(b"not a real library: " + cuda.encode())
    (directory / plugins.BUILD_INFO).write_text(json.dumps({"variant": "edge" if cuda.startswith("12") else "default",
                                                            "cuda_version": cuda, "cuda_archs": archs}))
    return lib


EDGE_PLUGIN = ("12.6", "87")
DEFAULT_PLUGIN = ("13.0", "75;80;86;87;89;90")


def decoder_onnx(path: Path) -> Path:
    """A small graph with the exported decoder's inputs (a KV cache of 2 heads of 16) and two SageBinaryGemm nodes,
    saved with the model-local function as the exporter writes it."""
    rng = np.random.default_rng(0)
    first, second = random_packed(rng, 24, 16, 2), random_packed(rng, 8, 24, 4)
    inits = [numpy_helper.from_array(rng.standard_normal((50, 16)).astype(np.float32), "embed")]
    for prefix, layer in (("l0", first), ("l1", second)):
        inits += [numpy_helper.from_array(a, f"{prefix}.{n}") for n, a in layer.tensors().items()]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h"], axis=0),
             sage_node(["h", *(f"l0.{n}" for n in first.tensors())], "h1", "l0/SageBinaryGemm", first.attrs()),
             sage_node(["h1", *(f"l1.{n}" for n in second.tensors())], "logits", "l1/SageBinaryGemm", second.attrs()),
             helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_sequence"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "sequence"]),
              helper.make_tensor_value_info("past_key_values.0.key", f32, ["batch", 2, "past_sequence", 16])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "sequence", 8]),
               helper.make_tensor_value_info("present.0.key", f32, ["batch", 2, "past_sequence", 16])]
    model = helper.make_model(helper.make_graph(nodes, "decoder", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    add_function(model)
    onnx.save_model(model, path)
    return path


def request(tmp_path: Path, target: str, hardware: str = "none", plugin_build=DEFAULT_PLUGIN, **kw):
    lib = fake_plugin(tmp_path / f"plugin-{plugin_build[0]}", *plugin_build)
    return engine.EngineRequest(decoder_onnx(tmp_path / "model.onnx"), tmp_path / "engine", lib, TARGETS[target],
                                hardware, **kw)


# ----------------------------------------------------------------------------------------------- build settings


def test_engine_is_built_strongly_typed_without_precision_flags(rec, tmp_path):
    req = request(tmp_path, "native")
    info = engine.build_engine(req)
    assert ("create_network", 1 << 1) in rec.calls
    assert not rec.names("set_flag")  # precision comes from the ONNX types
    assert rec.calls[0] == ("load_library", str(req.plugin.resolve()))  # registered before parsing
    assert (tmp_path / "engine" / "model.engine").read_bytes() == FAKE_PLAN
    assert info["network"] == "strongly typed"


def expected_shapes(target: str) -> dict:
    """input -> (min, opt, max) per profile, written out by hand from the target's definition."""
    if target == "edge":
        return {"decode": {"input_ids": ([1, 1], [1, 1], [1, 1]),
                           "attention_mask": ([1, 1], [1, 1025], [1, 2048]),
                           "past_key_values.0.key": ([1, 2, 0, 16], [1, 2, 1024, 16], [1, 2, 2047, 16])},
                "prefill": {"input_ids": ([1, 1], [1, 512], [1, 2048]),
                            "past_key_values.0.key": ([1, 2, 0, 16], [1, 2, 0, 16], [1, 2, 0, 16])}}
    return {"decode": {"input_ids": ([1, 1], [8, 1], [16, 1]),
                       "attention_mask": ([1, 1], [8, 2049], [16, 4096]),
                       "past_key_values.0.key": ([1, 2, 0, 16], [8, 2, 2048, 16], [16, 2, 4095, 16])},
            "prefill": {"input_ids": ([1, 1], [1, 1024], [16, 4096]),
                        "position_ids": ([1, 1], [1, 1024], [16, 4096])}}


@pytest.mark.parametrize("target, workspace", [("edge", 256 << 20), ("l40", 4096 << 20)])
def test_each_target_has_its_profiles_and_builder_settings(rec, tmp_path, target, workspace):
    info = engine.build_engine(request(tmp_path, target, plugin_build=EDGE_PLUGIN if target == "edge"
                                       else DEFAULT_PLUGIN))
    shapes = rec.names("set_shape")
    assert len(rec.names("add_profile")) == 2 and len(shapes) == 2 * 4  # decode and prefill, 4 inputs each
    decode, prefill = shapes[:4], shapes[4:]
    for profile, calls in (("decode", decode), ("prefill", prefill)):
        for name, bounds in expected_shapes(target)[profile].items():
            assert next(tuple(c[2:]) for c in calls if c[1] == name) == bounds, (profile, name)
    assert ("memory_pool", "WORKSPACE", workspace) in rec.calls
    assert ("config", "builder_optimization_level", 3) in rec.calls
    assert ("config", "hardware_compatibility_level", "NONE") in rec.calls
    assert rec.names("create_timing_cache") == [("create_timing_cache", b"")]
    assert rec.names("set_timing_cache") == [("set_timing_cache", False)]
    assert info["profile_order"] == ["decode", "prefill"]
    assert info["profiles"]["prefill"]["input_ids"][2] == [TARGETS[target].max_batch, TARGETS[target].max_context]


def test_a_graph_without_kv_cache_gets_one_prefill_profile():
    assert list(profile_plans(TARGETS["l40"], has_cache=False)) == ["prefill"]
    assert profile_plans(TARGETS["edge"], has_cache=True)["decode"][2] == (1, 1, 2047)


def test_native_target_keeps_tensorrts_default_workspace(rec, tmp_path):
    engine.build_engine(request(tmp_path, "native"))
    assert not rec.names("memory_pool")


def test_hardware_compatibility_level_is_set_and_checked_per_target(rec, tmp_path):
    engine.build_engine(request(tmp_path, "l40", "ampere-plus"))
    assert ("config", "hardware_compatibility_level", "AMPERE_PLUS") in rec.calls
    with pytest.raises(engine.UserError, match="not available for --target edge"):
        TARGETS["edge"].hardware_level("ampere-plus")
    assert TARGETS["edge"].hardware_level(None) == "none"


def test_timing_cache_is_written_beside_the_engine_and_can_seed_the_next_build(rec, tmp_path):
    req = request(tmp_path, "l40")
    engine.build_engine(req)
    cache = tmp_path / "engine" / "timing.cache"
    assert cache.read_bytes() == FAKE_CACHE
    info = engine.build_engine(dataclasses.replace(req, engine_dir=tmp_path / "second", timing_cache_seed=cache))
    assert rec.names("create_timing_cache")[-1] == ("create_timing_cache", FAKE_CACHE)
    assert info["timing_cache"] == {"file": "timing.cache", "bytes": len(FAKE_CACHE), "seeded_from": str(cache)}


# ----------------------------------------------------------------------------------------------- plugin checks


def test_the_parser_sees_no_local_function(rec, tmp_path):
    req = request(tmp_path, "l40")
    assert (DOMAIN, OP_TYPE) in [(f.domain, f.name) for f in onnx.load(str(req.onnx_path)).functions]
    info = engine.build_engine(req)
    assert rec.parsed_functions == []
    assert rec.names("parse") == [("parse", str(req.onnx_path))]  # the path locates external data
    assert info["local_functions_removed"] == 1 and info["sage_nodes"] == info["plugin_layers"] == 2


def test_missing_plugin_layers_are_refused_before_building(rec, tmp_path):
    rec.plugin_layers_per_node = 0
    with pytest.raises(engine.UserError, match="0 plugin layers for 2 SageBinaryGemm nodes"):
        engine.build_engine(request(tmp_path, "l40"))
    assert not rec.names("build")
    assert not (tmp_path / "engine").exists()


def test_plugin_is_loaded_once_per_process(rec, tmp_path):
    req = request(tmp_path, "l40")
    engine.build_engine(req)
    engine.build_engine(dataclasses.replace(req, engine_dir=tmp_path / "again"))  # the same library again
    plugins.load_once(sys.modules["tensorrt"], req.plugin)  # what running the engine does
    assert len(rec.names("load_library")) == 1
    other = fake_plugin(tmp_path / "other", *DEFAULT_PLUGIN)
    with pytest.raises(RuntimeError, match="another SageBinaryGemm plugin library .* is already loaded"):
        plugins.load_once(sys.modules["tensorrt"], other)
    assert len(rec.names("load_library")) == 1


def test_a_plugin_that_does_not_register_its_creator_is_refused(rec, tmp_path):
    sys.modules["tensorrt"].get_plugin_registry().get_creator = lambda *a: None
    with pytest.raises(RuntimeError, match="no creator for sage::SageBinaryGemm"):
        engine.build_engine(request(tmp_path, "l40"))


@pytest.mark.parametrize("target, build, message", [
    ("edge", DEFAULT_PLUGIN, "built with CUDA 13.0; --target edge needs CUDA 12"),
    ("edge", None, "no sage_plugin_build.json"),
    ("l40", EDGE_PLUGIN, "built for sm_87, not sm_89"),
])
def test_a_plugin_build_that_does_not_suit_the_target_is_refused(tmp_path, monkeypatch, target, build, message):
    lib = fake_plugin(tmp_path, *(build or EDGE_PLUGIN))
    if build is None:
        (tmp_path / plugins.BUILD_INFO).unlink()
    monkeypatch.setenv("SAGE_TRT_PLUGIN", str(lib))
    with pytest.raises(engine.UserError, match=message):
        plugins.plugin_for_target(TARGETS[target])


def test_edge_without_a_cuda12_plugin_asks_build_plugins_for_it(tmp_path, monkeypatch):
    """No suitable build on disk: the edge variant is built, and without nvcc 12 the script's first line is the
    one-line error (the script states what it needs and builds nothing)."""
    monkeypatch.delenv("SAGE_TRT_PLUGIN", raising=False)
    monkeypatch.setattr(plugins, "REPO_ROOT", tmp_path)  # no plugins/build* here
    script = tmp_path / "tools" / "build_plugins.sh"
    script.parent.mkdir()
    script.write_text("echo \"needs the CUDA 12 compiler (nvcc 12.x); nothing was built. args: $*\" >&2; exit 2\n")
    with pytest.raises(engine.UserError, match=r"needs the CUDA 12 compiler .* args: --variant edge .*build-edge"):
        plugins.plugin_for_target(TARGETS["edge"])


# ----------------------------------------------------------------------------------------------- running


class FakeContext:
    def __init__(self, refuse: str | None):
        self.refuse, self.calls = refuse, []

    def set_input_shape(self, name, shape):
        self.calls.append(("shape", name, tuple(shape)))
        return name != self.refuse

    def set_tensor_address(self, name, address):
        self.calls.append(("address", name, address))
        return name != self.refuse


def test_every_input_shape_and_address_result_is_checked():
    ids, logits = torch.zeros((1, 4), dtype=torch.int64), torch.zeros((1, 4, 8))
    ctx = FakeContext(refuse=None)
    engine.set_input_shapes(ctx, {"input_ids": (1, 4), "attention_mask": (1, 4)})
    engine.set_addresses(ctx, {"input_ids": ids, "logits": logits})
    assert [c[:2] for c in ctx.calls] == [("shape", "input_ids"), ("shape", "attention_mask"),
                                          ("address", "input_ids"), ("address", "logits")]
    assert ctx.calls[-1][2] == logits.data_ptr()
    with pytest.raises(RuntimeError, match=r"refused input shape attention_mask = \[1, 4\]"):
        engine.set_input_shapes(FakeContext("attention_mask"), {"input_ids": (1, 4), "attention_mask": (1, 4)})
    with pytest.raises(RuntimeError, match="refused the address of logits"):
        engine.set_addresses(FakeContext("logits"), {"input_ids": ids, "logits": logits})


# ----------------------------------------------------------------------------------------------- sidecar and CLI


def test_sidecar_names_target_profiles_and_plugin_build(rec, tmp_path):
    req = request(tmp_path, "edge", plugin_build=EDGE_PLUGIN)
    engine.build_engine(req)
    side = json.loads((tmp_path / "engine" / "model.engine.json").read_text())
    assert side["target"] == {"name": "edge", "device": "Jetson Orin (JetPack 6, CUDA 12)", "sm": "87",
                              "max_batch": 1, "max_context": 2048}
    assert side["profile_order"] == ["decode", "prefill"]
    assert side["profiles"]["decode"]["past_key_values.0.key"] == [[1, 2, 0, 16], [1, 2, 1024, 16], [1, 2, 2047, 16]]
    assert side["plugin"]["build"]["cuda_version"] == "12.6" and side["plugin"]["build"]["cuda_archs"] == "87"
    assert len(side["plugin"]["sha256"]) == 64 and side["plugin"]["path"] == str(req.plugin)
    assert side["optimization_level"] == 3 and side["hardware_compatibility"] == "none"
    assert side["workspace_bytes"] == 256 << 20 and side["tensorrt_version"] == "10.14-fake"
    assert side["bytes"] == len(FAKE_PLAN) and side["engine"] == "model.engine"


@pytest.mark.parametrize("target, build", [("edge", EDGE_PLUGIN), ("l40", DEFAULT_PLUGIN)])
def test_model_trt_target_builds_its_configuration(rec, tiny_llama_dir, tmp_path, monkeypatch, target, build):
    monkeypatch.setenv("SAGE_TRT_PLUGIN", str(fake_plugin(tmp_path / "plugin", *build)))
    out = tmp_path / "run"
    assert main(["model", str(tiny_llama_dir), "--out", str(out), "--trt", "--target", target, *FAST_MODEL]) == 0
    assert (out / "engine" / "model.engine").read_bytes() == FAKE_PLAN
    assert (out / "engine" / "timing.cache").read_bytes() == FAKE_CACHE
    side = json.loads((out / "engine" / "model.engine.json").read_text())
    assert side["target"]["name"] == target and side["sage_nodes"] == side["plugin_layers"] == 14
    assert side["vs_ort"] == {"skipped": "torch sees no CUDA device; the engine was built but not run"}
    past = side["profiles"]["decode"]["past_key_values.0.key"]
    assert past[2] == [TARGETS[target].max_batch, 2, TARGETS[target].max_context - 1, 16]
    report = json.loads((out / "report.json").read_text())
    assert report["trt"]["target"]["name"] == target


def test_engine_command_builds_from_an_onnx(rec, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAGE_TRT_PLUGIN", str(fake_plugin(tmp_path / "plugin", *DEFAULT_PLUGIN)))
    (tmp_path / "export").mkdir()
    onnx_path = decoder_onnx(tmp_path / "export" / "model.onnx")
    out = tmp_path / "engine"
    assert main(["engine", str(tmp_path / "export"), "--target", "l40", "--hardware-compat",
                 "same-compute-capability", "--out", str(out)]) == 0
    assert "engine for l40" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["model.engine", "model.engine.json", "timing.cache"]
    assert rec.names("parse")[0][1] == str(onnx_path.absolute())
    side = json.loads((out / "model.engine.json").read_text())
    assert side["hardware_compatibility"] == "same-compute-capability"
    assert side["vs_ort"] == {"skipped": "torch sees no CUDA device; the engine was built but not run"}


def one_line_error(capsys) -> str:
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("sage-export: error:"), lines
    return lines[0]


@pytest.mark.parametrize("argv", [["engine", "ONNX", "--target", "edge"], ["engine", "ONNX", "--target", "l40"],
                                  ["model", "MODEL", "--trt", "--target", "edge"],
                                  ["model", "MODEL", "--trt", "--target", "l40"]])
def test_without_tensorrt_each_command_fails_in_one_line_before_any_work(argv, tiny_llama_dir, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    argv = [str(tiny_llama_dir) if a == "MODEL" else str(tmp_path / "absent.onnx") if a == "ONNX" else a
            for a in argv]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "TensorRT Python bindings are not importable" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_edge_with_a_cuda13_plugin_fails_before_any_work(rec, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAGE_TRT_PLUGIN", str(fake_plugin(tmp_path / "plugin", *DEFAULT_PLUGIN)))
    assert main(["model", str(tiny_llama_dir), "--out", str(tmp_path / "out"), "--trt", "--target", "edge"]) == 2
    assert "--target edge needs CUDA 12" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_target_without_trt_is_refused(tiny_llama_dir, tmp_path, capsys):
    assert main(["model", str(tiny_llama_dir), "--out", str(tmp_path / "out"), "--target", "l40"]) == 2
    assert "--target and --hardware-compat need --trt" in one_line_error(capsys)


def test_documented_trtexec_lines_are_strongly_typed():
    repo = Path(__file__).resolve().parents[1]
    for doc in (repo / "README.md", repo / "docs" / "plugin.md"):
        lines = [l for l in doc.read_text().splitlines() if l.lstrip().startswith("trtexec ")]
        assert lines, doc
        for line in lines:
            assert "--stronglyTyped" in line and "--fp16" not in line, (doc, line)


def test_without_tensorrt_the_message_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(engine.UserError, match="TensorRT"):
        engine.require_tensorrt()


def test_loader_asks_for_the_creator_the_plugin_registers():
    """The creator looked up after loading the library is the one the C++ plugin registers and the exported nodes
    name (it asked for version "1" through contract v2, which no build registered)."""
    source = (Path(__file__).resolve().parents[1] / "plugins/src/sage_plugin_contract.h").read_text()
    assert f'kPluginVersion = "{plugins.CREATOR[1]}"' in source
    assert plugins.CREATOR == ("SageBinaryGemm", PLUGIN_ATTRIBUTES["plugin_version"], "sage")
