"""The `sage-export` command as users run it: artifacts on success, one line and nothing written on failure."""

import importlib.util
import json
import subprocess
import sys

import pytest

from sage_export.cli import main
from sage_export.format.checkpoint import load_checkpoint

FAST = ["--fixed-groups", "2", "--graph-samples", "500"]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sage_export.cli", *map(str, args)], capture_output=True, text=True)


def assert_one_line_error(proc, pattern: str):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("sage-export: error:"), proc.stderr
    assert pattern in lines[0]


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    text = tmp_path_factory.mktemp("text") / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 60)
    assert main(["model", str(tiny_llama_dir), "--out", str(out), "--eval-text", str(text), "--ctx", "64",
                 "--seed", "3", *FAST]) == 0
    return out


def test_model_command_writes_every_artifact(tiny_run):
    ckpt = load_checkpoint(tiny_run / "checkpoint")  # verifies every sha256
    assert len(ckpt.layers) == 14 and all(r.method == "sage" for r in ckpt.layers.values())
    rep = json.loads((tiny_run / "report.json").read_text())
    assert rep["method"]["name"] == "sage" and len(rep["layers"]) == 14
    bits = rep["bits"]
    assert bits["true_bits"] == pytest.approx(8 * bits["packed_bytes"] / bits["n_weights"])
    # CSR column indices and group codes are stored but not in the paper count, so true bits are higher.
    assert bits["true_bits"] > bits["paper_weight_bits"] + bits["paper_scale_bits"]
    assert bits["packed_bytes"] < bits["fp16_bytes"]
    assert rep["perplexity"]["ppl"] > 1 and rep["perplexity"]["ctx"] == 64
    md = (tiny_run / "report.md").read_text()
    assert "true storage" in md and "![" in md
    for png in ("bits_per_layer.png", "groups_rho_per_layer.png", "error_per_layer.png"):
        data = (tiny_run / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_onnx_artifact_runs_in_onnxruntime(tiny_run):
    import onnxruntime as ort

    rep = json.loads((tiny_run / "report.json").read_text())
    sess = ort.InferenceSession(str(tiny_run / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "logits" in [o.name for o in sess.get_outputs()]
    assert rep["onnx"]["checks"]


def test_same_seed_gives_byte_identical_checkpoint(tiny_llama_dir, tiny_run, tmp_path):
    out = tmp_path / "again"
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out), "--seed", "3", *FAST]) == 0
    for name in ("packed.safetensors", "float.safetensors", "manifest.json"):
        assert (out / "checkpoint" / name).read_bytes() == (tiny_run / "checkpoint" / name).read_bytes(), name


def test_missing_model(tmp_path):
    proc = run_cli("model", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(proc, "model not found")
    assert leftovers(tmp_path) == []


def test_unsupported_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "gpt2"}')
    proc = run_cli("model", tmp_path / "m", "--out", tmp_path / "o")
    assert_one_line_error(proc, "unsupported architecture 'gpt2'")
    assert leftovers(tmp_path) == ["m"]


def test_existing_output_needs_force(tiny_llama_dir, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    proc = run_cli("model", tiny_llama_dir, "--out", tmp_path / "o")
    assert_one_line_error(proc, "--force")
    assert leftovers(tmp_path / "o") == ["keep.txt"]


def test_unwritable_output_location(tiny_llama_dir, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    proc = run_cli("model", tiny_llama_dir, "--out", tmp_path / "file" / "o")
    assert proc.returncode == 2 and "sage-export: error:" in proc.stderr
    assert leftovers(tmp_path) == ["file"]


def test_bad_quantizer_option(tiny_llama_dir, tmp_path):
    proc = run_cli("model", tiny_llama_dir, "--out", tmp_path / "o", "--rho-bounds", "0.5", "0.1")
    assert_one_line_error(proc, "invalid quantizer options")
    assert leftovers(tmp_path) == []


def test_calibration_text_must_differ_from_eval_text(tiny_llama_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("x\n" * 10)
    proc = run_cli("model", tiny_llama_dir, "--out", tmp_path / "o", "--method", "gptq", "--eval-text", text,
                   "--calib-text", text)
    assert_one_line_error(proc, "must not be the evaluation text")


def test_trt_without_tensorrt_fails_before_any_work(tiny_llama_dir, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here; this checks the message where it is not")
    proc = run_cli("model", tiny_llama_dir, "--out", tmp_path / "o", "--trt")
    assert_one_line_error(proc, "TensorRT")
    assert leftovers(tmp_path) == []


def test_interrupt_midway_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import sage_export.pipeline.quantize as q

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(q, "_quantize_data_free", interrupted)
    assert main(["model", str(tiny_llama_dir), "--out", str(tmp_path / "o")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_inspect_reads_a_run(tiny_run, capsys):
    assert main(["inspect", str(tiny_run)]) == 0
    assert "true storage" in capsys.readouterr().out


def _checkpoint_with_config(tiny_run, tmp_path, **changes):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run / "checkpoint", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


@pytest.mark.parametrize("changes", [{"num_hidden_layers": 3}, {"intermediate_size": 200}],
                         ids=["missing-block", "wrong-shape"])
def test_export_of_checkpoint_not_matching_its_config(tiny_run, tmp_path, changes):
    ckpt = _checkpoint_with_config(tiny_run, tmp_path, **changes)
    proc = run_cli("export", ckpt, "--out", tmp_path / "onnx")
    assert_one_line_error(proc, "does not match its config.json")
    assert leftovers(tmp_path) == ["ckpt"]
