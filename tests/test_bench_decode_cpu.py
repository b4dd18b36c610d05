"""The GPU decode benchmark is ready to run: a CPU smoke run on a tiny model writes well-formed results."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_decode_smoke_on_cpu(tmp_path):
    out = tmp_path / "decode.json"
    subprocess.run([sys.executable, str(REPO / "tools" / "bench_decode.py"), "--device", "cpu", "--model", "tiny",
                    "--tokens", "2", "--prompt-len", "4", "--out", str(out)], check=True, capture_output=True)
    doc = json.loads(out.read_text())
    assert "smoke run" in doc["device"]
    variants = [r["variant"] for r in doc["rows"]]
    assert variants == ["fp32", "sage G=4"]  # G = 4: the 3.2-bit point the GPU rows use
    dense, sage = doc["rows"]
    assert sage["bytes_per_token"] < dense["bytes_per_token"]  # packed layers read fewer bytes
    assert all(r["tokens_per_s"] > 0 for r in doc["rows"])
    assert "| tiny | sage G=4 |" in out.with_suffix(".md").read_text()
