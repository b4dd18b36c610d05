"""Memory an unfolded ONNX Runtime session keeps, against the number of SageBinaryGemm layers it runs.

    python tools/bench_ort_session.py            # writes benchmarks/ort_session_memory.{json,md}

A chain of L random packed layers of LLaMA-2-7B's MLP shapes (4096 -> 11008 -> 4096 ..., G = 6, 2 % salient) is
saved as ONNX with external data and run without constant folding (as the model command's check runs it), four
calls of 1, 8, 1 and 3 rows, in a fresh process per configuration. Reported: resident memory (VmRSS) after the
calls minus before the session, and seconds per layer call. Configurations: ORT's defaults; memory patterns off;
the CPU arena off; both off (what make_session uses for unfolded sessions).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "ort_session_memory"
MODES = {"defaults": {}, "no memory pattern": {"enable_mem_pattern": False},
         "no arena": {"enable_cpu_mem_arena": False},
         "neither (make_session)": {"enable_mem_pattern": False, "enable_cpu_mem_arena": False}}
LAYERS = (1, 2, 4)
HIDDEN, INTERMEDIATE = 4096, 11008
CALL_ROWS = (1, 8, 1, 3)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def build_chain(path: Path, n_layers: int) -> None:
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from sage_export.onnx.function import MIN_OPSET, add_function, sage_node
    from sage_export.onnx.ort_check import random_packed

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "X"
    for i in range(n_layers):
        n, k = (INTERMEDIATE, HIDDEN) if i % 2 == 0 else (HIDDEN, INTERMEDIATE)
        packed = random_packed(rng, n, k, 6, 0.02, 3)
        names = [x]
        for name, array in packed.tensors().items():
            inits.append(numpy_helper.from_array(array, f"{name}_{i}"))
            names.append(f"{name}_{i}")
        nodes.append(sage_node(names, f"Y{i}", f"sage_{i}", packed.attrs()))
        x = f"Y{i}"
    out = INTERMEDIATE if n_layers % 2 else HIDDEN
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", 1, ["m", HIDDEN])],
                              [helper.make_tensor_value_info(x, 1, ["m", out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET)])
    add_function(model)
    onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data")


def measure(path: Path, settings: dict) -> dict:
    """In this process (run it in a fresh one): the session's kept memory and time per layer call."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in settings.items():
        setattr(options, key, value)
    base = _rss_mb()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["ConstantFolding"])
    start = time.perf_counter()
    for rows in CALL_ROWS:
        session.run(None, {"X": np.ones((rows, HIDDEN), np.float32)})
    return {"kept_mb": round(_rss_mb() - base, 1), "calls_s": round(time.perf_counter() - start, 2)}


def run_one(path: Path, n_layers: int, mode: str) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO / 'tools')!r}); import bench_ort_session as b; "
            f"print(json.dumps(b.measure(__import__('pathlib').Path({str(path)!r}), {MODES[mode]!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    row = {"layers": n_layers, "mode": mode}
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        return dict(row, error=lines[-1][-200:] if lines else f"exit {done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return dict(row, **result, s_per_layer_call=round(result["calls_s"] / (n_layers * len(CALL_ROWS)), 3))


def render(data: dict) -> str:
    lines = [f"# Unfolded ONNX Runtime session: memory kept against layers", "",
             f"{data['machine']}, {data['date']}, onnxruntime {data['onnxruntime']}. Command: `{data['command']}`.",
             "", "A chain of L random packed 4096 x 11008 / 11008 x 4096 layers (G = 6, 2 % salient), no constant "
             f"folding, calls of {', '.join(map(str, CALL_ROWS))} rows; memory is VmRSS after the calls minus "
             "before the session (the packed initializers are about 29 MB a layer).", "",
             "| configuration | " + " | ".join(f"L = {n}: kept MB · s per layer call" for n in LAYERS) + " |",
             "|---|" + "---|" * len(LAYERS)]
    for mode in MODES:
        cells = []
        for n in LAYERS:
            row = next(r for r in data["rows"] if r["mode"] == mode and r["layers"] == n)
            cells.append(f"failed: {row['error']}" if "error" in row else
                         f"{row['kept_mb']:,.0f} · {row['s_per_layer_call']:.2f}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    sys.path.insert(0, str(REPO / "tools"))
    from bench_scale import machine_name

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sage-ort-mem-") as tmp:
        for n in LAYERS:
            path = Path(tmp) / f"chain{n}.onnx"
            build_chain(path, n)
            for mode in MODES:
                rows.append(run_one(path, n, mode))
                print(json.dumps(rows[-1]), flush=True)
    data = {"machine": machine_name(), "date": dt.date.today().isoformat(), "onnxruntime": ort.__version__,
            "command": "python tools/bench_ort_session.py", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
