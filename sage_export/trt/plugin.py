"""The SageBinaryGemm plugin library for a target: finding (or building) the right build, checking that it suits
the target, and registering it with TensorRT exactly once per process.

tools/build_plugins.sh writes `sage_plugin_build.json` beside the libraries: the variant, the CUDA version of the
nvcc that compiled them, and the GPU architectures. JetPack 6 runs CUDA 12, and a plugin built by CUDA 13 (the
default here) links a CUDA 13 runtime that a JetPack 6 driver cannot run, so the edge target refuses a plugin
whose build record does not say CUDA 12 and sm_87.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from ..errors import UserError
from ..onnx.function import OP_TYPE, PLUGIN_ATTRIBUTES
from .targets import Target

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_NAME = "libsage_trt_plugin.so"
BUILD_INFO = "sage_plugin_build.json"
# name, version, namespace: what the exported nodes carry (it read "1" through contract v2, which no plugin matched)
CREATOR = (OP_TYPE, PLUGIN_ATTRIBUTES["plugin_version"], PLUGIN_ATTRIBUTES["plugin_namespace"])
BUILD_DIRS = {"edge": "plugins/build-edge", "default": "plugins/build"}

_loaded: dict[str, object] = {}  # resolved library path -> TensorRT's handle, for this process


def build_info(plugin: Path) -> dict | None:
    path = Path(plugin).parent / BUILD_INFO
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def unsuitable(target: Target, info: dict | None) -> str | None:
    """Why a plugin build cannot serve the target, or None."""
    if target.plugin_cuda_major is not None:
        if info is None:
            return (f"the plugin has no {BUILD_INFO} saying which CUDA built it; --target {target.name} needs a "
                    f"CUDA {target.plugin_cuda_major} build")
        major = str(info.get("cuda_version", "")).split(".")[0]
        if major != str(target.plugin_cuda_major):
            return (f"the plugin was built with CUDA {info.get('cuda_version', '?')}; --target {target.name} needs "
                    f"CUDA {target.plugin_cuda_major}")
    if target.sm and info is not None and target.sm not in str(info.get("cuda_archs", "")).split(";"):
        return f"the plugin was built for sm_{info.get('cuda_archs')}, not sm_{target.sm}"
    return None


def _build_command(target: Target) -> list[str]:
    return ["bash", str(REPO_ROOT / "tools" / "build_plugins.sh"), "--variant", target.plugin_variant,
            str(REPO_ROOT / BUILD_DIRS[target.plugin_variant])]


def _build(target: Target) -> Path:
    done = subprocess.run(_build_command(target), capture_output=True, text=True)
    if done.returncode != 0:
        lines = [l for l in (done.stderr or done.stdout).splitlines() if l.strip()]
        reason = lines[0] if lines else f"exit status {done.returncode}"
        raise UserError(f"building the {target.plugin_variant} plugin failed: {reason} "
                        f"(run {' '.join(_build_command(target)[1:])} to see everything)")
    found = REPO_ROOT / BUILD_DIRS[target.plugin_variant] / PLUGIN_NAME
    if not found.is_file():
        raise UserError(f"plugin build finished but {found} was not produced (TensorRT headers missing?)")
    return found


def plugin_for_target(target: Target) -> Path:
    """$SAGE_TRT_PLUGIN, else an existing build that suits the target, else a fresh build of its variant. A plugin
    that does not suit the target is refused in one line."""
    env = os.environ.get("SAGE_TRT_PLUGIN")
    if env:
        plugin = Path(env)
        if not plugin.is_file():
            raise UserError(f"SAGE_TRT_PLUGIN points to a missing file: {env}")
    else:
        built = [p for p in sorted(REPO_ROOT.glob(f"plugins/build*/**/{PLUGIN_NAME}"))
                 if unsuitable(target, build_info(p)) is None]
        plugin = built[0] if built else _build(target)
    reason = unsuitable(target, build_info(plugin))
    if reason:
        raise UserError(f"{plugin}: {reason} (tools/build_plugins.sh --variant {target.plugin_variant} makes one)")
    return plugin


def describe(plugin: Path) -> dict:
    """The plugin build for an engine's sidecar: path, checksum, and the build record."""
    return {"path": str(plugin), "sha256": hashlib.sha256(Path(plugin).read_bytes()).hexdigest(),
            "build": build_info(plugin)}


def load_once(trt, plugin: Path) -> object:
    """Register the library with TensorRT's plugin registry the first time only: loading it again registers its
    creator twice (TensorRT then warns, or refuses the second registration)."""
    key = str(Path(plugin).resolve())
    if key in _loaded:
        return _loaded[key]
    if _loaded:  # a second library would register a second creator of the same name, version and namespace
        raise RuntimeError(f"{plugin}: another SageBinaryGemm plugin library ({next(iter(_loaded))}) is already "
                           "loaded in this process")
    registry = trt.get_plugin_registry()
    handle = registry.load_library(key)
    if handle is None:
        raise RuntimeError(f"TensorRT could not load the plugin library {plugin}")
    if registry.get_creator(*CREATOR) is None:
        raise RuntimeError(f"{plugin} loaded, but TensorRT has no creator for {CREATOR[2]}::{CREATOR[0]} "
                           f"version {CREATOR[1]}")
    _loaded[key] = handle
    return handle
