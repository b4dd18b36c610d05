"""tools/gpu_check.sh --dry-run: the plumbing of the one GPU check, on a machine without a GPU. Every step runs under
its own time limit and writes into $OUT as soon as it has a result, so a kill midway still leaves what was measured.
(The static cost step, tools/kernel_cost.py, has its own test; it is left out here to keep CI short.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"
STEPS = "env,kernels,decode"


def _env(out: Path) -> dict[str, str]:
    return {**os.environ, "OUT": str(out), "SAGE_GPU_CHECK_ONLY": STEPS}


def test_dry_run_writes_every_result_into_out(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=_env(tmp_path), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "gpu_check.log").read_text()
    for step in STEPS.split(","):
        assert f"=== [{step}]" in log and f"=== [{step}] exit 0" in log, log
    report = json.loads((tmp_path / "kernels_cpu_reference.json").read_text())
    assert report["mode"] == "cpu-reference" and report["results"]
    decode = json.loads((tmp_path / "decode_cpu_smoke.json").read_text())
    assert decode["rows"] and all(r["tokens_per_s"] > 0 for r in decode["rows"])
    assert not list(REPO.glob("benchmarks/decode_cpu_smoke*")), "results must go to $OUT, not benchmarks/"


def test_a_kill_midway_keeps_what_was_measured(tmp_path: Path) -> None:
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = tmp_path / "kernels_cpu_reference.json"
    try:
        deadline = time.monotonic() + 300
        while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert first.exists(), "the kernel step wrote nothing"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run, as a device call's time limit would
        proc.wait(timeout=30)
    assert json.loads(first.read_text())["mode"] == "cpu-reference"  # complete: written to a temporary, then renamed
    log = (tmp_path / "gpu_check.log").read_text()
    assert "=== [env] exit 0" in log and "=== [kernels]" in log
    assert "finished" not in log  # it really was cut short
