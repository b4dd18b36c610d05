"""What engine.py asks of TensorRT, checked against a fake `tensorrt` module (TensorRT cannot be installed here; the
real build runs only on a GPU machine): a strongly typed network, no precision flags, both profiles."""

import sys
import types
from pathlib import Path

import pytest

from sage_export.trt import engine


class _Recorder:
    def __init__(self):
        self.calls = []


def fake_tensorrt(rec: _Recorder) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.14-fake"
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)  # TensorRT 10's value
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self):
            self.inputs = [Tensor("input_ids", [-1, -1]), Tensor("attention_mask", [-1, -1]),
                           Tensor("position_ids", [-1, -1]), Tensor("past_key_values.0.key", [-1, 2, -1, 16])]
            self.num_inputs = len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            rec.calls.append(("set_shape", name, lo, opt, hi))

    class Config:
        def set_flag(self, flag):
            rec.calls.append(("set_flag", flag))

        def add_optimization_profile(self, profile):
            rec.calls.append(("add_profile",))

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
            return b"fake-plan"

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse_from_file(self, path):
            rec.calls.append(("parse", path))
            return True

    registry = types.SimpleNamespace(load_library=lambda path: rec.calls.append(("load_library", path)))
    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.get_plugin_registry = lambda: registry
    return trt


def test_engine_is_built_strongly_typed_without_precision_flags(tmp_path, monkeypatch):
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(rec))
    info = engine.build_engine(tmp_path / "model.onnx", tmp_path / "engine" / "model.engine", Path("/lib/plugin.so"))
    assert ("create_network", 1 << 1) in rec.calls
    assert not [c for c in rec.calls if c[0] == "set_flag"]  # precision comes from the ONNX types
    assert rec.calls[0] == ("load_library", "/lib/plugin.so")  # the plugin is registered before parsing
    assert [c[0] for c in rec.calls].count("add_profile") == 2
    assert (tmp_path / "engine" / "model.engine").read_bytes() == b"fake-plan"
    assert info["network"] == "strongly typed"


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
