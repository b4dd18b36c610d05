#!/usr/bin/env bash
# Installs the project from its own files, then runs the whole test suite (CPU; GPU tests skip themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
python3 -m pytest -q -p no:cacheprovider "$@"
