#!/usr/bin/env bash
# Builds plugins/: libsage_kernels.so, libsage_trt_plugin.so (when TensorRT headers are available), the plugin's
# host test and the kernel CPU emulator.
#
# Usage: tools/build_plugins.sh [BUILD_DIR]      (default: plugins/build)
# Env:   CUDA_ARCHS  CMake CUDA architectures (default "75;80;86;87;89;90")
#        JOBS        parallel compile jobs (default 2)
#        TRT_INCLUDE_DIR  TensorRT headers to use instead of fetching them into tools/.trt_headers
#        EXTRA_CMAKE  more CMake arguments, e.g. -DSAGE_BUILD_EMULATOR=OFF (tools/gpu_check.sh)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD_DIR="${1:-$ROOT/plugins/build}"
ARCHS="${CUDA_ARCHS:-75;80;86;87;89;90}"
JOBS="${JOBS:-2}"

if [[ -z "${TRT_INCLUDE_DIR:-}" ]]; then
    # Offline machines (the GPU hosts) cannot fetch; the kernels still build and the plugin is skipped.
    "$ROOT/tools/fetch_trt_headers.sh" || echo "warning: TensorRT headers unavailable; building the kernels only" >&2
    TRT_INCLUDE_DIR="$ROOT/tools/.trt_headers"
fi

cmake -S "$ROOT/plugins" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" \
    "-DTRT_INCLUDE_DIR=$TRT_INCLUDE_DIR" ${EXTRA_CMAKE:-}
cmake --build "$BUILD_DIR" -j "$JOBS"
echo "built in $BUILD_DIR:"
ls -1 "$BUILD_DIR" | grep -E '\.so$|^sage_' || true
