"""tools/screen_v2.py measure on the tiny model: --stats-from keeps the saved calibration and seeds, re-measures the
options under the new recipe, and refuses calibration options it would otherwise ignore."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCREEN = REPO / "tools" / "screen_v2.py"


def _measure(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCREEN), "measure", *args], capture_output=True, text=True,
                          timeout=600)


def test_stats_from_refuses_calibration_options(tmp_path):
    proc = _measure("--model", "unused", "--out", str(tmp_path / "x.pt"), "--stats-from", str(tmp_path / "y.pt"),
                    "--seed", "3", "--calib-samples", "8")
    assert proc.returncode == 2
    assert "--stats-from reuses the saved calibration" in proc.stderr
    assert "--calib-samples, --seed" in proc.stderr
    assert not (tmp_path / "x.pt").exists()


@pytest.fixture(scope="module")
def first(tiny_llama_dir, tmp_path_factory) -> Path:
    """A default measurement (which samples its validation rows: the default chooses the activation power)."""
    out = tmp_path_factory.mktemp("screen") / "first.pt"
    proc = _measure("--model", str(tiny_llama_dir), "--out", str(out), "--calib-samples", "4",
                    "--calib-seqlen", "16", "--seed", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_stats_from_keeps_calibration_and_remeasures_options(tiny_llama_dir, first, tmp_path):
    second = tmp_path / "a1.pt"
    proc = _measure("--model", str(tiny_llama_dir), "--out", str(second), "--stats-from", str(first),
                    "--recipe", "activation_power=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (torch.load(p, weights_only=False) for p in (first, second))
    assert b["seed"] == a["seed"] == 5 and b["seeds"] == a["seeds"] and b["calib_info"] == a["calib_info"]
    assert (a["recipe"]["activation_power"], b["recipe"]["activation_power"]) == (0.5, 1.0)
    name = a["measurements"].names[0]
    assert not (a["measurements"].weights[name] == b["measurements"].weights[name]).all()
    assert [o.error for o in a["measurements"].tables[0]] != [o.error for o in b["measurements"].tables[0]]


def test_power_candidates_are_chosen_at_measure_and_again_from_saved_statistics(tiny_llama_dir, first, tmp_path):
    second = tmp_path / "pc.pt"
    proc = _measure("--model", str(tiny_llama_dir), "--out", str(second), "--stats-from", str(first),
                    "--recipe", "activation_power_candidates=[1,0.25]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (torch.load(p, weights_only=False) for p in (first, second))
    assert a["validation"].shape == (2, 16) and torch.equal(a["validation"], b["validation"])
    choice = b["measurements"].power_choice
    assert a["measurements"].power_choice["chosen"] in (0.5, 0.25)  # the default recipe chooses too
    assert choice["chosen"] in (1, 0.25)
    assert [c["activation_power"] for c in choice["candidates"]] == [1, 0.25]
