"""tools/bench_kernels.py on a CPU machine: --cpu-reference --quick runs the reference path on tiny shapes and
writes results that are labelled as CPU reference timings, never as GPU kernel results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sage_export.format.bits import n_planes

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "tools" / "bench_kernels.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)


def test_cpu_reference_quick_writes_labelled_results(tmp_path: Path) -> None:
    result = _run("--cpu-reference", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels_cpu_reference.json", "kernels_cpu_reference.md"]

    report = json.loads((tmp_path / "kernels_cpu_reference.json").read_text())
    assert report["mode"] == "cpu-reference" and "NOT GPU" in report["label"]
    assert "--cpu-reference" in report["command"] and report["date"]
    assert len(report["results"]) == 2 * 3 * 3  # quick shapes x G in {1,2,4} x batches {1,4,16}
    for row in report["results"]:
        assert row["error_to_tolerance_vs_numpy"] <= 1.0
        assert "time_us" not in row and "achieved_gb_s" not in row  # no GPU-looking figures
        n, k, g = row["n"], row["k"], row["n_groups"]
        # signs and code planes, group scales, CSR row pointers, 16-bit columns and int8 values, salient and row
        # scales (the synthetic layers store row multipliers)
        true_bytes = n * ((k + 7) // 8) * (1 + n_planes(g)) + 2 * g + 4 * (n + 1) + 3 * row["nnz"] + 4 * n
        assert row["packed_bytes"] == true_bytes
        assert row["true_bits"] == pytest.approx(8 * true_bytes / (n * k))

    md = (tmp_path / "kernels_cpu_reference.md").read_text()
    assert md.startswith("# SageBinaryGemm kernels: CPU reference timings")
    assert "NOT GPU kernel results" in md.splitlines()[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_gpu_mode_refuses_without_cuda(tmp_path: Path) -> None:
    result = _run("--quick", "--out", str(tmp_path))
    assert result.returncode != 0
    assert "--cpu-reference" in result.stderr
    assert not list(tmp_path.iterdir())
