#!/usr/bin/env bash
# Builds plugins/: libsage_kernels.so, libsage_trt_plugin.so (when TensorRT headers are available), the plugin's
# host test and the kernel CPU emulator; writes sage_plugin_build.json (variant, CUDA version, architectures) beside
# them, which `sage-export engine/model --trt --target ...` reads to check that the plugin suits the target.
#
# Usage: tools/build_plugins.sh [--variant default|edge] [BUILD_DIR]
#   default  the nvcc on PATH (CUDA 13 here), CUDA_ARCHS below; BUILD_DIR defaults to plugins/build
#   edge     Jetson Orin under JetPack 6: CUDA 12 (JetPack 6 cannot run a CUDA 13 runtime), sm_87 only, no
#            emulator; BUILD_DIR defaults to plugins/build-edge. Needs nvcc 12.x: $CUDACXX, else nvcc on PATH, else
#            /usr/local/cuda-12*/bin/nvcc. Without one it prints the command to run on a CUDA 12 machine and
#            exits 2, building nothing.
# Env:   CUDA_ARCHS  CMake CUDA architectures (default "75;80;86;87;89;90"; edge: 87)
#        JOBS        parallel compile jobs (default 2)
#        TRT_INCLUDE_DIR  TensorRT headers to use instead of fetching them into tools/.trt_headers
#        EXTRA_CMAKE  more CMake arguments, e.g. -DSAGE_BUILD_EMULATOR=OFF (tools/gpu_check.sh)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VARIANT=default
if [[ "${1:-}" == "--variant" ]]; then
    VARIANT="${2:?--variant needs default or edge}"
    shift 2
fi
JOBS="${JOBS:-2}"

nvcc_version() {  # "12.6" from `nvcc --version`, empty when it cannot run
    "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -1
}

find_cuda12_nvcc() {
    local candidate
    for candidate in "${CUDACXX:-}" "$(command -v nvcc || true)" /usr/local/cuda-12*/bin/nvcc; do
        if [[ -n "$candidate" && -x "$candidate" && "$(nvcc_version "$candidate")" == 12.* ]]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

case "$VARIANT" in
    default)
        BUILD_DIR="${1:-$ROOT/plugins/build}"
        ARCHS="${CUDA_ARCHS:-75;80;86;87;89;90}"
        ;;
    edge)
        BUILD_DIR="${1:-$ROOT/plugins/build-edge}"
        ARCHS="${CUDA_ARCHS:-87}"
        if ! NVCC="$(find_cuda12_nvcc)"; then
            found="$(command -v nvcc || true)"
            seen="no nvcc"
            if [[ -n "$found" ]]; then seen="nvcc $(nvcc_version "$found") at $found"; fi
            {
                echo "tools/build_plugins.sh --variant edge needs the CUDA 12 compiler (nvcc 12.x) and found" \
                     "$seen; nothing was built."
                echo "JetPack 6 runs CUDA 12 (6.0: 12.2, 6.1/6.2: 12.6) and TensorRT 10.3 (6.1/6.2; 6.0 has 8.6,"
                echo "which has no IPluginV3)."
                echo "On the Jetson Orin (JetPack 6.1 or later, with cmake >= 3.18 and g++), from the repository root:"
                echo "  CUDACXX=/usr/local/cuda/bin/nvcc TRT_INCLUDE_DIR=/usr/include/aarch64-linux-gnu \\"
                echo "      tools/build_plugins.sh --variant edge plugins/build-edge"
                echo "An x86 host with CUDA 12.x can check that the kernels compile for sm_87 (its library is x86 and"
                echo "does not load on the Jetson; cross-compiling for aarch64 is not set up):"
                echo "  CUDACXX=/usr/local/cuda-12.6/bin/nvcc \\"
                echo "      tools/build_plugins.sh --variant edge /tmp/sage-edge-check"
            } >&2
            exit 2
        fi
        # The emulator tests the kernels on the CPU of the CI machine; the Jetson needs the libraries only.
        EXTRA_CMAKE="-DCMAKE_CUDA_COMPILER=$NVCC -DSAGE_BUILD_EMULATOR=OFF ${EXTRA_CMAKE:-}"
        ;;
    *)
        echo "tools/build_plugins.sh: unknown --variant $VARIANT (default or edge)" >&2
        exit 2
        ;;
esac

if [[ -z "${TRT_INCLUDE_DIR:-}" ]]; then
    # Offline machines (the GPU hosts) cannot fetch; the kernels still build and the plugin is skipped.
    "$ROOT/tools/fetch_trt_headers.sh" || echo "warning: TensorRT headers unavailable; building the kernels only" >&2
    TRT_INCLUDE_DIR="$ROOT/tools/.trt_headers"
fi

cmake -S "$ROOT/plugins" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" \
    "-DTRT_INCLUDE_DIR=$TRT_INCLUDE_DIR" ${EXTRA_CMAKE:-}
cmake --build "$BUILD_DIR" -j "$JOBS"

# The compiler CMake actually used (it may differ from the nvcc on PATH when the build directory existed).
NVCC="$(sed -n 's/^CMAKE_CUDA_COMPILER:[A-Z]*=//p' "$BUILD_DIR/CMakeCache.txt" | head -1)"
CUDA_VERSION="$(nvcc_version "$NVCC")"
TRT_HEADERS="$(cat "$TRT_INCLUDE_DIR/.source" 2>/dev/null || echo "$TRT_INCLUDE_DIR")"
printf '{"variant": "%s", "cuda_version": "%s", "cuda_archs": "%s", "nvcc": "%s", "trt_headers": "%s"}\n' \
    "$VARIANT" "$CUDA_VERSION" "$ARCHS" "$NVCC" "$TRT_HEADERS" > "$BUILD_DIR/sage_plugin_build.json"
echo "built in $BUILD_DIR (CUDA $CUDA_VERSION, sm $ARCHS):"
ls -1 "$BUILD_DIR" | grep -E '\.so$|^sage_' || true
