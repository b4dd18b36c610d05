#!/usr/bin/env python3
"""Peak memory of quantizing one matrix, in bytes per weight: what each quantization worker needs on top of the
weight itself. A model's quantize step holds (workers) x (this) x (its largest matrix), so at 7B and beyond
this figure, not the model, decides whether a run fits.

    python tools/bench_matrix_memory.py                 # this checkout -> benchmarks/matrix_memory.{json,md}
    python tools/bench_matrix_memory.py --code DIR --label before   # another checkout's sage_export, same file

Each case runs in a fresh process (VmHWM minus the resident size just before the call), on a random matrix of a
real layer shape with one BLAS thread, as a worker runs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from bench_quality import machine_name  # noqa: E402
from bench_scale import code_version  # noqa: E402

OUT = REPO / "benchmarks" / "matrix_memory"
SHAPES = {"llama-1.1b mlp (2048x5632)": (2048, 5632), "llama2-7b mlp (4096x11008)": (4096, 11008)}
CASES = {
    "paper": "quantize_sage, --preset paper (SPEC §2: Brent over ρ in [0.001, 0.1], graph G)",
    "v2-options": "sage_options, v2: G in {1,2,4,8,16} x 20 ρ, activation-weighted",
    "v2-search": "quantize_sage, v2: G = 4, Brent over ρ in [0.001, 0.02] with a bit price, activation-weighted",
    "v2-finish": "v2-search then compensate_sage under H = XᵀX of 256 random correlated rows (a worker's whole "
                 "job per matrix in the default run; H, K x K float64, is in memory before the call, as a "
                 "worker receives it)",
}

CHILD = r"""
import sys, time, numpy as np
from dataclasses import replace
from threadpoolctl import threadpool_limits
threadpool_limits(1)
from sage_export.pipeline.methods import Method
from sage_export.quant.config import RHO_GRID, V2_MATRIX
from sage_export.quant.sage import quantize_sage, sage_options
from sage_export.quant.compensate import compensate_sage

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

case, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
w = (rng.standard_normal((n, k)) * rng.gamma(2.0, 0.5, (1, k)) * 0.02).astype(np.float32)
h = rng.gamma(1.0, 1.0, k)
if case == "v2-finish":
    x = rng.standard_normal((256, k // 8)) @ rng.standard_normal((k // 8, k)) + rng.standard_normal((256, k))
    hessian = 2 * x.T @ x / 256
    del x
base, start = status("VmRSS"), time.perf_counter()
if case == "paper":
    quantize_sage(w, Method("sage", {"preset": "paper"}).sage_config(), 0)
elif case == "v2-options":
    sage_options(w, V2_MATRIX, (1, 2, 4, 8, 16), RHO_GRID, 0, h, propose=True)
else:
    cfg = replace(V2_MATRIX, fixed_groups=4, rho_bounds=(0.001, 0.02), rho_price=1e-6, brent_xatol=0.019 / 32)
    result = quantize_sage(w, cfg, 0, h)
    if case == "v2-finish":
        compensate_sage(w, hessian, result)
print((status("VmHWM") - base) / w.size, time.perf_counter() - start)
"""


def run_case(code: Path, case: str, n: int, k: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code))
    out = subprocess.run([sys.executable, "-c", CHILD, case, str(n), str(k)], env=env, cwd=code, capture_output=True,
                         text=True, check=True)
    per_weight, seconds = map(float, out.stdout.split())
    return {"bytes_per_weight": round(per_weight, 1), "seconds": round(seconds, 1),
            "peak_mb": round(per_weight * n * k / 2**20)}


def render(data: dict, out: Path) -> None:
    md = ["# Peak memory of quantizing one matrix", "",
          "Peak resident memory above the process's size before the call, per weight of the "
          "matrix (the float32 weight itself is 4 bytes), one BLAS thread as in a worker. Commands: "
          "`python tools/bench_matrix_memory.py [--code DIR --label L]`. Seconds are wall time, for orientation "
          "only. " + data.get("note", ""), "",
          "| code | shape | case | bytes/weight | peak | seconds | date | machine |",
          "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        md.append(f"| {r['label']} ({r['code']}) | {r['shape']} | {r['case']} | **{r['bytes_per_weight']}** | "
                  f"{r['peak_mb']:,} MB | {r['seconds']} | {r['date']} | {r.get('machine', data['machine'])} |")
    md += ["", "Cases: " + "; ".join(f"`{c}`: {d}" for c, d in CASES.items()) + "."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", type=Path, default=REPO, help="checkout whose sage_export is measured")
    p.add_argument("--label", default="this")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--note", help="a line for the table's header, e.g. what else ran on the machine")
    args = p.parse_args(argv)
    path = args.out.with_suffix(".json")
    data = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    data["machine"] = machine_name()
    if args.note:
        data["note"] = args.note
    version = code_version(args.code)
    for shape in args.shapes:
        for case in args.cases:
            row = {"label": args.label, "code": version, "shape": shape, "case": case, "machine": data["machine"],
                   "date": dt.date.today().isoformat(), **run_case(args.code, case, *SHAPES[shape])}
            print(json.dumps(row), flush=True)
            data["rows"] = [r for r in data["rows"] if (r["label"], r["shape"], r["case"]) != (args.label, shape,
                                                                                                case)] + [row]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1) + "\n")
            render(data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
