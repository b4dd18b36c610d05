"""The GPU decode benchmark is ready to run: a CPU smoke run on a tiny model writes well-formed results, and its
synthetic layers have the layout default runs write."""

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import bench_decode  # noqa: E402


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


def test_synthetic_layers_store_row_multipliers_only_when_asked():
    """The default recipe stores no row_scales and the kernels then read none: the benchmark's layers must match,
    or it would time bytes (and loads) that default runs never have."""
    gen = torch.Generator().manual_seed(0)
    plain = bench_decode.random_packed_cuda(64, 256, 4, 0.01, gen, row_multipliers=False, dev="cpu")
    with_r = bench_decode.random_packed_cuda(64, 256, 4, 0.01, gen, row_multipliers=True, dev="cpu")
    x, y = torch.zeros(1, 256, dtype=torch.float16), torch.zeros(1, 64, dtype=torch.float16)
    assert bench_decode.sage_launch_args(plain, x, y).row_scales in (None, 0)  # NULL: every r_n = 1
    assert bench_decode.sage_launch_args(with_r, x, y).row_scales == with_r["row_scales"].data_ptr()
    assert bench_decode.layer_bytes(with_r) - bench_decode.layer_bytes(plain) == 2 * 64  # one float16 per row
    assert plain["salient_cols"].shape == (64 * round(0.01 * 256), 2)  # contract v3: two bytes per column
