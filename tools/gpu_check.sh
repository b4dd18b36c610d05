#!/usr/bin/env bash
# On a GPU machine, in one call: build plugins/ for this GPU, run every correctness check, then all kernel
# benchmarks. Writes benchmarks/kernels.json, benchmarks/kernels.md and the full log benchmarks/gpu_check.log.
# The benchmark times both decode kernels (path "auto" = GEMV and "gemv2") side by side at batches 1, 4 and 16:
# their GB/s and fraction of copy bandwidth decide whether SAGE_PATH_AUTO should switch to GEMV2.
#
# Usage: tools/gpu_check.sh [CUDA_ARCHS]   (default 90: H100/H200)
# GPU hosts are offline: to build and test the TensorRT plugin library too, bring tools/.trt_headers along
# (tools/fetch_trt_headers.sh on a connected machine). No TensorRT runtime is needed or used.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BUILD="$ROOT/plugins/build-gpu"
mkdir -p benchmarks
exec > >(tee benchmarks/gpu_check.log) 2>&1

export CUDA_ARCHS="${1:-90}" JOBS="${JOBS:-16}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export SAGE_KERNELS_LIB="$BUILD/libsage_kernels.so"
status=0

step() {
    echo "=== $*"
    "$@" || { echo "=== FAILED (exit $?): $*"; status=1; }
}

step nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step nvcc --version
step tools/build_plugins.sh "$BUILD"
[[ -f "$SAGE_KERNELS_LIB" ]] || { echo "=== no kernel library, stopping"; exit 1; }
if [[ -x "$BUILD/sage_plugin_host_test" ]]; then
    step "$BUILD/sage_plugin_host_test"
else
    echo "=== TensorRT headers absent: plugin library and its host test not built"
fi
step python3 -m pytest -q -m gpu tests/test_gpu_kernels.py
step python3 -m pytest -q tests/test_runtime_sage_linear.py
step python3 tools/bench_kernels.py --out benchmarks
echo "=== gpu_check finished with status $status"
exit "$status"
