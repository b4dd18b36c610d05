#!/usr/bin/env python3
"""Benchmark of the SageBinaryGemm CUDA kernels on LLaMA-2-7B layer shapes.

GPU mode (default; needs CUDA and libsage_kernels.so, see tools/gpu_check.sh):
  1. correctness of every kernel path (GEMV, GEMV2, tiled) x float16/float32 against the NumPy reference; a failure
     is recorded and makes the exit status 1;
  2. device-to-device copy bandwidth (bytes read + written), the yardstick for "fraction of bandwidth";
  3. for each shape x group count x batch: the kernels (auto path; GEMV2 beside it wherever auto runs the GEMV
     kernel, so both decode kernels are timed side by side; GEMV and tiled both above 8 rows) and torch's float16
     matmul (cuBLAS) on a dense weight of the same shape. Launches are replayed from a CUDA graph and cycle
     through enough copies of the weights to exceed twice the L2 cache, so every launch reads them from DRAM.
  Writes OUT/kernels.json and OUT/kernels.md.

CPU reference mode (--cpu-reference, e.g. with --quick for tiny shapes): times the CPU fallback of SageLinear
(torch decode + float32 matmul) and the NumPy reference, checks they agree, and writes
OUT/kernels_cpu_reference.{json,md}, labelled as CPU reference timings, never as GPU results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sage_export.format.accounting import sage_paper_bits, stored_bytes, true_bits  # noqa: E402
from sage_export.onnx.reference import sage_binary_gemm_packed  # noqa: E402
from sage_export.runtime import kernels  # noqa: E402
from sage_export.runtime.sage_linear import SageLinear  # noqa: E402
from sage_export.runtime.synthetic import random_packed_linear, reference_error_ratio  # noqa: E402

# name: (N, K) of the layers of three real models; the decode path is judged on LLaMA-2-7B's.
MODEL_SHAPES = {
    "llama2-7b q/k/v/o": (4096, 4096), "llama2-7b gate/up": (11008, 4096), "llama2-7b down": (4096, 11008),
    "qwen2-0.5b q/o": (896, 896), "qwen2-0.5b gate/up": (4864, 896), "qwen2-0.5b down": (896, 4864),
    "smollm2 q/o": (576, 576), "smollm2 gate/up": (1536, 576), "smollm2 down": (576, 1536)}
QUICK_SHAPES = {"tiny-a": (64, 96), "tiny-b": (96, 64)}
# (m, k, n, groups): odd K, several K tiles, both sides of the GEMV/tiled switch.
CORRECTNESS_PROBLEMS = [(1, 1003, 200, 3), (5, 1003, 200, 4), (16, 4096, 96, 2), (70, 1024, 130, 1),
                        (130, 520, 64, 8)]
GPU_LABEL = "GPU kernel timings"
CPU_LABEL = "CPU reference timings (torch/NumPy fallback; NOT GPU kernel results)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks", help="output folder")
    ap.add_argument("--batches", default="1,4,16", help="activation rows, comma-separated")
    ap.add_argument("--groups", default="1,2,4", help="group counts G, comma-separated")
    ap.add_argument("--salient-fraction", type=float, default=0.03, help="fraction of salient weights (rho)")
    ap.add_argument("--salient-bits", type=int, default=4)
    ap.add_argument("--iters", type=int, default=50, help="launches per timed graph replay")
    ap.add_argument("--repeats", type=int, default=7, help="timed replays; the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-reference", action="store_true", help="time the CPU reference path instead")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few iterations (smoke test)")
    ap.add_argument("--shapes", default="", help="comma-separated substrings of the shape names to keep")
    ap.add_argument("--correctness-only", action="store_true",
                    help="only the correctness pass of every path (small shapes; tools/gpu_check.sh runs it under "
                         "compute-sanitizer)")
    ap.add_argument("--profile-one", action="store_true",
                    help="launch the batch-1 decode kernel at the LLaMA-2-7B gate/up shape a few times and exit "
                         "(for ncu)")
    args = ap.parse_args(argv)
    args.batches = [int(v) for v in args.batches.split(",")]
    args.groups = [int(v) for v in args.groups.split(",")]
    if args.quick:
        args.iters, args.repeats = min(args.iters, 5), min(args.repeats, 3)
    return args


def layer_accounting(p) -> dict:
    n, k = p.out_features, p.in_features
    paper = sage_paper_bits(n, k, p.nnz, p.salient_bits, p.n_groups, p.row_scales.shape[0])
    return {"nnz": p.nnz, "packed_bytes": stored_bytes(p.tensors()), "true_bits": true_bits(p.tensors(), n, k),
            "paper_weight_bits": paper["weight_bits"], "paper_scale_bits": paper["scale_bits"]}


# ----------------------------------------------------------------------------------------------- GPU mode


def gpu_machine() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_cache_mib": round(l2_bytes() / 2**20, 1), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "kernel_library": str(kernels.find_library()), "host": platform.node()}


def l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))


def time_us(step: Callable[[int], None], iters: int, repeats: int) -> tuple[float, str]:
    """Median over `repeats` of the mean time per call of step(0..iters-1), replayed from a CUDA graph (so the
    figure is GPU time, not Python or launch overhead); falls back to plain stream launches if capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):  # warm-up outside capture: library handles, lazy kernel loading
            step(i)
    torch.cuda.synchronize()
    method = "cuda-graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(iters):
                step(i)
        run = graph.replay
    except RuntimeError:
        torch.cuda.synchronize()
        method = "stream-loop"

        def run() -> None:
            for i in range(iters):
                step(i)
    run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / iters)
    return statistics.median(samples), method


def copy_bandwidth_gb_s(repeats: int) -> float:
    """Device-to-device copy of 4 GiB, counting bytes read and written."""
    src = torch.empty(2**30, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t_us, _ = time_us(lambda i: dst.copy_(src), iters=10, repeats=repeats)
    return 2 * 2**30 * 4 / (t_us * 1e-6) / 1e9


def read_bandwidth_gb_s(repeats: int) -> float:
    """A sum over 4 GiB of float16: what a kernel that only reads can reach (decode kernels mostly read)."""
    src = torch.empty(2**31, dtype=torch.float16, device="cuda").uniform_()
    t_us, _ = time_us(lambda i: src.sum(), iters=10, repeats=repeats)
    return 2**31 * 2 / (t_us * 1e-6) / 1e9


def correctness_pass(seed: int) -> list[dict]:
    results = []
    for path in (kernels.PATH_GEMV, kernels.PATH_GEMV2, kernels.PATH_TILED, kernels.PATH_GEMV3):
        for dtype in (torch.float16, torch.float32):
            for m, k, n, groups in CORRECTNESS_PROBLEMS:
                if path == kernels.PATH_GEMV3 and (dtype != torch.float16 or k % 8):
                    continue  # GEMV3 takes float16 X with K a multiple of 8 (AUTO falls back otherwise)
                p = random_packed_linear(n, k, groups, salient_fraction=0.05, seed=seed + m)
                bias = torch.randn(n).to(dtype)
                x = torch.randn(m, k).to(dtype)
                y = SageLinear(p, bias).cuda().forward_cuda(x.cuda(), path=path).cpu()
                ratio = reference_error_ratio(y.numpy(), x.numpy(), p, bias.numpy())
                results.append({"path": kernels.PATH_NAMES[path], "dtype": str(dtype).removeprefix("torch."),
                                "m": m, "k": k, "n": n, "n_groups": groups, "error_to_tolerance": ratio,
                                "passed": bool(ratio <= 1.0)})
    return results


def copies_for(bytes_per_copy: int) -> int:
    """Weight copies to cycle through so that their total exceeds twice the L2 cache."""
    return max(1, min(256, math.ceil(2 * l2_bytes() / bytes_per_copy)))


def bench_shape(name: str, n: int, k: int, groups: int, args: argparse.Namespace, copy_bw: float) -> list[dict]:
    p = random_packed_linear(n, k, groups, salient_fraction=args.salient_fraction, salient_bits=args.salient_bits,
                             seed=args.seed)
    info = layer_accounting(p)
    sage_layers = [SageLinear(p).cuda() for _ in range(copies_for(info["packed_bytes"]))]
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies_for(2 * n * k))]
    rows = []
    for m in args.batches:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        y = torch.empty(m, n, device="cuda", dtype=torch.float16)
        y_dense = torch.empty_like(y)
        cublas_us, _ = time_us(lambda i: torch.mm(x, dense[i % len(dense)].t(), out=y_dense), args.iters,
                               args.repeats)
        # AUTO (GEMV3 up to 16 rows: SageLinear prepares its layout on the first launch) and the older kernels
        # beside it on the same weights.
        paths = [kernels.PATH_AUTO] + ([kernels.PATH_GEMV, kernels.PATH_GEMV2] if m <= kernels.GEMV_MAX_M else [])
        paths += [kernels.PATH_TILED] if m > 8 else []
        for path in paths:
            launches = [layer.launch_args(x, y, None, path) for layer in sage_layers]

            def step(i: int, launches=launches) -> None:
                kernels.launch(launches[i % len(launches)], torch.cuda.current_stream().cuda_stream)

            sage_us, method = time_us(step, args.iters, args.repeats)
            moved = info["packed_bytes"] + 2 * m * (k + n)  # packed weight + float16 activations in and out
            gb_s = moved / (sage_us * 1e-6) / 1e9
            rows.append({"layer": name, "n": n, "k": k, "n_groups": groups, "batch": m, "dtype": "float16",
                         "path": kernels.PATH_NAMES[path],
                         "kernel": kernels.PATH_NAMES[kernels.choose_path(launches[0])],
                         "time_us": sage_us, "bytes_moved": moved, "achieved_gb_s": gb_s,
                         "fraction_of_copy_bandwidth": gb_s / copy_bw, "cublas_fp16_us": cublas_us,
                         "speedup_vs_cublas_fp16": cublas_us / sage_us, "timing": method,
                         "weight_copies_cycled": len(sage_layers), **info})
    return rows


def selected_shapes(args: argparse.Namespace) -> dict:
    shapes = QUICK_SHAPES if args.quick else MODEL_SHAPES
    keep = [s for s in args.shapes.split(",") if s]
    return {name: nk for name, nk in shapes.items() if not keep or any(s in name for s in keep)}


def profile_one(args: argparse.Namespace) -> None:
    """A few launches of the batch-1 decode path for a profiler to catch (ncu --launch-skip/--launch-count)."""
    p = random_packed_linear(11008, 4096, 4, salient_fraction=args.salient_fraction, seed=args.seed)
    layer = SageLinear(p).cuda()
    layer.prepared_layout(torch.device("cuda"))  # made before the profiled launches
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    for _ in range(8):
        layer.forward_cuda(x)
    torch.cuda.synchronize()


def run_gpu(args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    """Fills the report step by step and saves it after each step, so a kill keeps what was measured."""
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --cpu-reference for the CPU reference path")
    if not kernels.available():
        raise SystemExit(f"kernel library unavailable: {kernels.unavailable_reason()}")
    torch.manual_seed(args.seed)
    report = {"mode": "gpu", "label": GPU_LABEL, "machine": gpu_machine(), "results": []}
    report["correctness"] = correctness_pass(args.seed)
    save(report)
    if args.correctness_only:
        return report
    report["copy_bandwidth_gb_s"] = copy_bandwidth_gb_s(args.repeats)
    torch.cuda.empty_cache()
    report["read_bandwidth_gb_s"] = read_bandwidth_gb_s(args.repeats)
    torch.cuda.empty_cache()
    save(report)
    for name, (n, k) in selected_shapes(args).items():
        for g in args.groups:
            report["results"] += bench_shape(name, n, k, g, args, report["copy_bandwidth_gb_s"])
            save(report)
    return report


# ------------------------------------------------------------------------------------------ CPU reference mode


def cpu_time_us(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def run_cpu_reference(args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    rows = []
    report = {"mode": "cpu-reference", "label": CPU_LABEL,
              "machine": {"cpu": platform.processor() or platform.machine(), "host": platform.node(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "results": rows}
    for name, (n, k) in selected_shapes(args).items():
        for groups in args.groups:
            p = random_packed_linear(n, k, groups, salient_fraction=args.salient_fraction,
                                     salient_bits=args.salient_bits, seed=args.seed)
            layer = SageLinear(p)
            dense = layer.dense_weight()
            for m in args.batches:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(args.seed))
                with torch.no_grad():
                    y = layer.forward_reference(x)
                rows.append({
                    "layer": name, "n": n, "k": k, "n_groups": groups, "batch": m, "dtype": "float32",
                    "path": "cpu-reference",
                    "error_to_tolerance_vs_numpy": reference_error_ratio(y.numpy(), x.numpy(), p),
                    "torch_fallback_us": cpu_time_us(lambda: layer.forward_reference(x), args.repeats),
                    "numpy_reference_us": cpu_time_us(lambda: sage_binary_gemm_packed(x.numpy(), p), args.repeats),
                    "dense_fp32_matmul_us": cpu_time_us(lambda: x @ dense.T, args.repeats),
                    **layer_accounting(p)})
                save(report)
    return report


# ------------------------------------------------------------------------------------------------ output


def markdown(report: dict) -> str:
    gpu = report["mode"] == "gpu"
    lines = [f"# SageBinaryGemm kernels: {report['label']}", "",
             f"- date: {report['date']}", f"- command: `{report['command']}`",
             "- machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()),
             f"- settings: {json.dumps(report['settings'])}"]
    if gpu:
        failed = [c for c in report.get("correctness", []) if not c["passed"]]
        lines += [f"- correctness vs NumPy reference: {len(report.get('correctness', [])) - len(failed)}/"
                  f"{len(report.get('correctness', []))} passed" + (f"; FAILED: {failed}" if failed else ""),
                  f"- device-to-device copy bandwidth (read + write): {report.get('copy_bandwidth_gb_s', 0):.0f} GB/s; "
                  f"read-only (float16 sum): {report.get('read_bandwidth_gb_s', 0):.0f} GB/s",
                  "- time: median of graph replays, weights cycled through > 2x L2 (read from DRAM); GB/s counts "
                  "packed weight bytes + float16 activations in and out", "",
                  "| layer | N x K | G | batch | path (kernel) | time us | GB/s | of copy BW | cuBLAS fp16 us | "
                  "speedup | true bits | paper w+s bits |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["results"]:
            lines.append(f"| {r['layer']} | {r['n']}x{r['k']} | {r['n_groups']} | {r['batch']} | {r['path']} "
                         f"({r['kernel']}) | {r['time_us']:.1f} | {r['achieved_gb_s']:.0f} | "
                         f"{r['fraction_of_copy_bandwidth']:.0%} | {r['cublas_fp16_us']:.1f} | "
                         f"{r['speedup_vs_cublas_fp16']:.2f}x | {r['true_bits']:.3f} | "
                         f"{r['paper_weight_bits']:.3f}+{r['paper_scale_bits']:.4f} |")
    else:
        lines += ["", "These are CPU timings of the reference fallback, for smoke-testing the benchmark; they say "
                  "nothing about the CUDA kernels.", "",
                  "| layer | N x K | G | batch | torch fallback us | NumPy reference us | dense fp32 us | "
                  "agreement (error/tol) | true bits |", "|---|---|---|---|---|---|---|---|---|"]
        for r in report["results"]:
            lines.append(f"| {r['layer']} | {r['n']}x{r['k']} | {r['n_groups']} | {r['batch']} | "
                         f"{r['torch_fallback_us']:.0f} | {r['numpy_reference_us']:.0f} | "
                         f"{r['dense_fp32_matmul_us']:.0f} | {r['error_to_tolerance_vs_numpy']:.2g} | "
                         f"{r['true_bits']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile_one:
        profile_one(args)
        return 0
    header = {"kind": "sage-kernel-benchmark",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
              "settings": {"batches": args.batches, "groups": args.groups, "salient_fraction": args.salient_fraction,
                           "salient_bits": args.salient_bits, "iters": args.iters, "repeats": args.repeats,
                           "seed": args.seed, "quick": args.quick}}
    args.out.mkdir(parents=True, exist_ok=True)

    def save(partial: dict) -> None:
        doc = {**header, **partial}
        stem = "kernels" if doc["mode"] == "gpu" else "kernels_cpu_reference"
        for path, text in ((args.out / f"{stem}.json", json.dumps(doc, indent=2) + "\n"),
                           (args.out / f"{stem}.md", markdown(doc))):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)  # a kill between two saves leaves the previous complete file

    report = {**header, **(run_cpu_reference(args, save) if args.cpu_reference else run_gpu(args, save))}
    save(report)
    print(markdown(report))
    failed = [c for c in report.get("correctness", []) if not c["passed"]]
    bad_cpu = [r for r in report["results"] if r.get("error_to_tolerance_vs_numpy", 0.0) > 1.0]
    return 1 if failed or bad_cpu else 0


if __name__ == "__main__":
    sys.exit(main())
