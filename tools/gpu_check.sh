#!/usr/bin/env bash
# The one GPU check, for the lent machine as it is: no network, the image's python3/torch/nvcc/cmake, and the
# TensorRT headers carried along in tools/.trt_headers. Every step runs under its own `timeout`, and every result
# is written into $RESULTS the moment it exists ($OUT on the lent machine, where only $OUT comes back; else
# benchmarks/), so a kill at any point still returns everything measured so far.
#
# Steps: build (sm_90, kernels + plugin, no emulator) -> plugin host test -> compute-sanitizer memcheck of every
# kernel path on small shapes -> correctness against the reference (pytest -m gpu) -> kernel timings (SmolLM2,
# Qwen2-0.5B and LLaMA-2-7B shapes, batches 1/4/16) -> decode tokens/s (LLaMA-2-7B shapes, CUDA graphs) -> one ncu
# DRAM-throughput reading of the main decode kernel. Budget: about 6 minutes in all.
#
# Usage: tools/gpu_check.sh [--dry-run]
#   --dry-run  the same plumbing on a machine without a GPU (CI): each step runs its CPU stand-in, results land in
#              $RESULTS as they come. SAGE_GPU_CHECK_ONLY="build,kernels" runs a subset of steps.
# The device command (docs/plugin.md): carry tools/.trt_headers, timeout_s 420:
#   bash tools/gpu_check.sh
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
RESULTS="${OUT:-$ROOT/benchmarks}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: > "$LOG"
BUILD="$ROOT/plugins/build-gpu"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export SAGE_KERNELS_LIB="$BUILD/libsage_kernels.so"
PY="${PYTHON:-python3}"
status=0

log() { echo "$*" | tee -a "$LOG"; }

wanted() { [[ -z "${SAGE_GPU_CHECK_ONLY:-}" || ",$SAGE_GPU_CHECK_ONLY," == *",$1,"* ]]; }

# step NAME SECONDS CMD...: runs CMD under its own time limit, appends its output to the log as it comes.
step() {
    local name="$1" secs="$2"
    shift 2
    wanted "$name" || return 0
    log "=== [$name] $(date -u +%H:%M:%S) limit ${secs}s: $*"
    local t0=$SECONDS rc
    timeout --kill-after=5 "$secs" "$@" >> "$LOG" 2>&1
    rc=$?
    log "=== [$name] exit $rc after $((SECONDS - t0))s$([[ $rc == 124 || $rc == 137 ]] && echo ' (TIMED OUT)')"
    [[ $rc == 0 ]] || status=1
    return $rc
}

if [[ $DRY == 1 ]]; then
    log "gpu_check dry run (no GPU): the CPU stand-in of each step, results in $RESULTS"
    step env 30 "$PY" -c "import platform, torch; print(platform.node(), torch.__version__)"
    step kernels 300 "$PY" tools/bench_kernels.py --cpu-reference --quick --out "$RESULTS"
    step decode 300 "$PY" tools/bench_decode.py --device cpu --model tiny --tokens 4 --prompt-len 8 \
        --out "$RESULTS/decode_cpu_smoke.json"
    step static_cost 300 "$PY" tools/kernel_cost.py --out "$RESULTS" --archs 90
    log "=== gpu_check dry run finished with status $status"
    exit "$status"
fi

step env 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
    nvcc --version | tail -2; python3 -c "import torch; print(\"torch\", torch.__version__, torch.version.cuda)"'
step build 240 env CUDA_ARCHS=90 JOBS=16 TRT_INCLUDE_DIR="$ROOT/tools/.trt_headers" EXTRA_CMAKE="-DSAGE_BUILD_EMULATOR=OFF" \
    tools/build_plugins.sh "$BUILD"
if [[ ! -f "$SAGE_KERNELS_LIB" ]] && wanted build; then
    log "=== no kernel library: stopping"
    exit 1
fi
[[ -x "$BUILD/sage_plugin_host_test" ]] && step host_test 60 "$BUILD/sage_plugin_host_test"
if command -v compute-sanitizer > /dev/null; then
    step sanitizer 120 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 9 \
        --log-file "$RESULTS/sanitizer.log" "$PY" tools/bench_kernels.py --correctness-only --out /tmp/sanitized
fi
step correctness 150 "$PY" -m pytest -q --maxfail=5 -p no:cacheprovider -m gpu tests/test_gpu_kernels.py
step kernels 240 "$PY" tools/bench_kernels.py --groups 2,4,8 --iters 20 --repeats 5 --out "$RESULTS"
step kernels_low_salient 90 "$PY" tools/bench_kernels.py --shapes llama2-7b --groups 4 --batches 1,4 \
    --salient-fraction 0.005 --iters 20 --repeats 5 --out "$RESULTS/low_salient"
step decode 200 "$PY" tools/bench_decode.py --model llama7b --tokens 64 --out "$RESULTS/decode.json"
if command -v ncu > /dev/null; then
    step ncu 120 ncu --clock-control none --kernel-name regex:gemv3_kernel --launch-count 1 --launch-skip 4 \
        --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,gpu__time_duration.sum \
        --log-file "$RESULTS/ncu.txt" "$PY" tools/bench_kernels.py --profile-one
fi
log "=== gpu_check finished with status $status"
exit "$status"
