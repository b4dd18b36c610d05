#!/usr/bin/env python3
"""What a new user gets from `sage-export model --out DIR` with no other flags: wall time, peak memory, true bits,
the greedy continuations and the ONNX Runtime verdict, written to benchmarks/default_run.{json,md}.

    python tools/bench_default.py                      # runs the command under /usr/bin/time -v (about 7 min)
    python tools/bench_default.py --from-run DIR --time-log FILE   # a run already made that way

Perplexity is not part of the default command (it needs an evaluation text); the quality table measures the same
configuration on WikiText-2 (`sage-v2(bits=3.2)`, self-generated calibration).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from bench_quality import machine_name  # noqa: E402

# The console script's code, run from this checkout whatever else is installed.
# The order the command runs its steps in (the JSON keeps them sorted by name).
STEP_ORDER = ["load", "calibration_text", "guard_fp_rtn", "quantize", "guard_result", "write_checkpoint", "samples",
              "perplexity", "onnx_export", "ort_check", "tensorrt"]
COMMAND = [sys.executable, "-m", "sage_export.cli", "model", "--out"]


def parse_time_log(text: str) -> dict:
    """Wall time (s) and peak RSS (MB) from GNU time -v output."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return {"wall_s": round(seconds, 1), "peak_rss_mb": round(rss_kb / 1024, 1)}


def run_default(out: Path) -> str:
    proc = subprocess.run(["/usr/bin/time", "-v", *COMMAND, str(out), "--force"], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0:
        sys.exit(f"the default run failed:\n{proc.stderr[-3000:]}")
    return proc.stderr


def summarize(run_dir: Path, timing: dict) -> dict:
    rep = json.loads((run_dir / "report.json").read_text())
    checks = rep["onnx"]["checks"]
    return {
        "command": "sage-export model --out DIR",
        "machine": machine_name(),
        "date": dt.date.today().isoformat(),
        **timing,
        "steps_s": rep["timings"],
        "steps_peak_mb": rep.get("peak_rss_mb", {}),
        "quantize_steps_s": rep["budget"]["timings"],
        "true_bits": rep["bits"]["true_bits"],
        "budget_bits": rep["budget"]["budget_bits"],
        "packed_mb": rep["bits"]["packed_bytes"] / 1e6,
        "fp16_mb": rep["bits"]["fp16_bytes"] / 1e6,
        "calibration": rep["calibration"],
        "samples": rep["samples"],
        "ort_failures": checks["failures"],
        "ort_session": checks["session"],
    }


def render(doc: dict) -> str:
    peaks = doc.get("steps_peak_mb", {})
    order = sorted(doc["steps_s"], key=lambda k: STEP_ORDER.index(k) if k in STEP_ORDER else len(STEP_ORDER))
    steps = " · ".join(f"{k} {doc['steps_s'][k]:.0f} s" + (f" ({peaks[k]:,.0f} MB)" if k in peaks else "")
                       for k in order)
    inner = " · ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in doc["quantize_steps_s"].items())
    out = ["# The default run: `sage-export model --out DIR`", "",
           f"{doc['machine']}, {doc['date']}. Embedded SmolLM2-135M-Instruct, SAGE v2 at a budget of "
           f"{doc['budget_bits']:g} true bits, calibrated on {doc['calibration']['tokens']:,} tokens the model "
           f"sampled itself.", "",
           "| | |", "|---|---|",
           f"| wall time | **{doc['wall_s'] / 60:.1f} min** ({doc['wall_s']:.0f} s) |",
           f"| peak resident memory (main process) | {doc['peak_rss_mb']:,.0f} MB |",
           *([f"| peak memory of process + workers (sampled) | {max(peaks.values()):,.0f} MB |"] if peaks else []),
           f"| true bits per weight | {doc['true_bits']:.3f} |",
           f"| packed layers | {doc['packed_mb']:.1f} MB (float16: {doc['fp16_mb']:.1f} MB) |",
           f"| ONNX Runtime check | {'passed' if not doc['ort_failures'] else 'FAILED'} ({doc['ort_session']}) |",
           "", f"Steps (seconds, peak memory of process + workers): {steps}. Inside quantize: {inner}.", "",
           "Greedy continuations of the quantized model:", ""]
    out += [f"- *{s['prompt']}* → `{s['continuation'].replace(chr(10), ' ⏎ ')}`" for s in doc["samples"]]
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-run", type=Path, help="output directory of a run made under /usr/bin/time -v")
    p.add_argument("--time-log", type=Path, help="that run's /usr/bin/time -v output")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "default_run.json")
    args = p.parse_args()
    if args.from_run:
        if not args.time_log:
            p.error("--from-run needs --time-log")
        doc = summarize(args.from_run, parse_time_log(args.time_log.read_text()))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            log = run_default(Path(tmp) / "run")
            doc = summarize(Path(tmp) / "run", parse_time_log(log))
    args.out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    args.out.with_suffix(".md").write_text(render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
