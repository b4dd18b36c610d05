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
    out = tmp_path / "scale_tiny"
    assert bench_scale.main(["--shapes", "tiny", "--out", str(out)]) == 0
    row = json.loads(out.with_suffix(".json").read_text())["rows"][0]
    assert row["exit_status"] == 0, row.get("error")
    stages = set(bench_scale.STAGES) - {"calibration_text", "guard_fp_rtn", "guard_result"}  # paper: data-free
    assert stages <= set(row["stages_s"]) and stages <= set(row["stages_peak_mb"])
    assert "calibration_text" not in row["stages_s"] and "--stream yes" in row["command"]
    assert all(v > 50 for v in row["stages_peak_mb"].values())  # a Python process with torch is never below this
    assert row["ort_failures"] == [] and row["wall_s"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| tiny |" in md and "ORT check passed" in md
    assert "](scale_tiny.png)" in md and (tmp_path / "scale_tiny.png").is_file()  # the plot written, not scale.png


def test_extrapolation_only_between_rows_of_one_code_version():
    """The per-layer slope of two rows measured at different commits would be the change's, not a layer's; stages
    only one of them has (a stage added between the commits) are left out of the slopes."""
    def row(layers, code, stages):
        return {"exit_status": 0, "wall_s": 100.0 * layers, "peak_rss_mb_tree": 1000.0 + layers,
                "quantized_params": 1000 * layers, "code": code,
                "stages_peak_mb": {s: 500.0 + 10 * layers for s in stages}}
    a, b, _ = bench_scale.EXTRAPOLATE
    old = ("load", "quantize")
    assert bench_scale.extrapolation({a: row(2, "new", old + ("guard_fp_rtn",)), b: row(4, "old", old)}) is None
    ext = bench_scale.extrapolation({a: row(2, "abc", old + ("guard_fp_rtn",)), b: row(4, "abc", old)})
    assert set(ext["stage_per_layer_mb"]) == set(old) and ext["per_layer_s"] == 100.0
