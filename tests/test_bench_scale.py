"""tools/bench_scale.py on its tiny shape: the synthetic checkpoint has the declared parameters, the real command
runs on it, and the JSON/markdown carry every stage's time and memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import bench_scale  # noqa: E402


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_synthetic_checkpoint_matches_declared_shape(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    shape = dict(bench_scale.TINY, model_type=model_type)
    bench_scale.write_model(tmp_path / "m", shape, shard_bytes=20_000)  # several shards and an index
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    total, linear = bench_scale.parameter_counts(shape)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("proj")) == linear


def test_tiny_run_records_every_stage(tmp_path):
    out = tmp_path / "scale"
    assert bench_scale.main(["--shapes", "tiny", "--out", str(out)]) == 0
    row = json.loads(out.with_suffix(".json").read_text())["rows"][0]
    assert row["exit_status"] == 0, row.get("error")
    stages = set(bench_scale.STAGES) - {"calibration_text"}  # the paper preset is data-free
    assert stages <= set(row["stages_s"]) and stages <= set(row["stages_peak_mb"])
    assert "calibration_text" not in row["stages_s"] and "--stream yes" in row["command"]
    assert all(v > 50 for v in row["stages_peak_mb"].values())  # a Python process with torch is never below this
    assert row["ort_failures"] == [] and row["wall_s"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| tiny |" in md and "ORT check passed" in md
