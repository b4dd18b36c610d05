"""ctypes binding of libsage_kernels.so, the CUDA kernels of SageBinaryGemm (plugins/src/sage_gemm_api.h).

The library is looked up in $SAGE_KERNELS_LIB, then in the repository's plugins/build*/ folders (newest first);
tools/build_plugins.sh builds it. Loading needs no GPU; launching does. This module is framework-free: callers
(sage_linear.SageLinear, tools/bench_kernels.py) fill a SageGemmArgs with device pointers and a stream handle.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

ENV_VAR = "SAGE_KERNELS_LIB"
LIBRARY_NAME = "libsage_kernels.so"
ABI_VERSION = 5  # SAGE_GEMM_ABI_VERSION (5: op contract v3, uint16 salient_cols and an optional row_scales)
MAX_GROUPS = 16  # SAGE_MAX_GROUPS
GEMV_MAX_M = 16  # SAGE_GEMV_MAX_M
MAX_FEATURES = 1 << 30  # SAGE_MAX_FEATURES: largest N the launch accepts
MAX_K = 1 << 16  # SAGE_MAX_K: largest K (contract v3: salient columns are 16-bit)

DTYPE_FLOAT32 = 0
DTYPE_FLOAT16 = 1
PATH_AUTO = 0
PATH_GEMV = 1
PATH_TILED = 2
PATH_GEMV2 = 3  # decode kernel without a lookup table
PATH_GEMV3 = 4  # decode kernel built for bandwidth: reads the prepared layout (prepare()), tensor cores, float16 X
PATH_NAMES = {PATH_AUTO: "auto", PATH_GEMV: "gemv", PATH_TILED: "tiled", PATH_GEMV2: "gemv2", PATH_GEMV3: "gemv3"}

_REPO_ROOT = Path(__file__).resolve().parents[2]


class SageGemmArgs(ctypes.Structure):
    """Mirror of the C struct; field order and types must match sage_gemm_api.h (checked at load time)."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("sign_bits", ctypes.c_void_p),
        ("group_codes", ctypes.c_void_p),
        ("group_scales", ctypes.c_void_p),
        ("salient_rowptr", ctypes.c_void_p),
        ("salient_cols", ctypes.c_void_p),  # uint16 [nnz]: the bytes of the contract's int8 [nnz, 2] (v3)
        ("salient_q", ctypes.c_void_p),
        ("salient_scale", ctypes.c_void_p),
        ("row_scales", ctypes.c_void_p),  # float16 [N] (contract v2), or NULL: every r_n = 1 (v3's empty [0])
        ("bias", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("prepared", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("nnz", ctypes.c_int64),
        ("prepared_bytes", ctypes.c_int64),
        ("k", ctypes.c_int32),
        ("n", ctypes.c_int32),
        ("n_groups", ctypes.c_int32),
        ("salient_bits", ctypes.c_int32),
        ("x_dtype", ctypes.c_int32),
        ("bias_dtype", ctypes.c_int32),
        ("path", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


class KernelLibraryError(RuntimeError):
    """The library is missing, does not match this binding, or a launch failed."""


def find_library() -> Path | None:
    """$SAGE_KERNELS_LIB if set (even when it does not exist, so a typo is not silently replaced), else the newest
    plugins/build*/libsage_kernels.so of this repository, else None."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    found = [p for p in _REPO_ROOT.glob(f"plugins/build*/{LIBRARY_NAME}") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    path = find_library()
    if path is None:
        return None, f"{LIBRARY_NAME} not found (set {ENV_VAR} or run tools/build_plugins.sh)"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        return None, f"cannot load {path}: {err}"
    lib.sage_gemm_launch.argtypes = [ctypes.POINTER(SageGemmArgs), ctypes.c_void_p]
    lib.sage_gemm_launch.restype = ctypes.c_int
    lib.sage_gemm_error_string.argtypes = [ctypes.c_int]
    lib.sage_gemm_error_string.restype = ctypes.c_char_p
    lib.sage_gemm_auto_path.argtypes = [ctypes.c_int64]
    lib.sage_gemm_auto_path.restype = ctypes.c_int
    lib.sage_gemm_choose_path.argtypes = [ctypes.POINTER(SageGemmArgs)]
    lib.sage_gemm_choose_path.restype = ctypes.c_int
    lib.sage_gemm_prepared_bytes.argtypes = [ctypes.POINTER(SageGemmArgs)]
    lib.sage_gemm_prepared_bytes.restype = ctypes.c_int64
    lib.sage_gemm_prepare.argtypes = [ctypes.POINTER(SageGemmArgs), ctypes.c_void_p]
    lib.sage_gemm_prepare.restype = ctypes.c_int
    lib.sage_gemm_abi_version.restype = ctypes.c_int
    lib.sage_gemm_args_size.restype = ctypes.c_size_t
    if lib.sage_gemm_abi_version() != ABI_VERSION or lib.sage_gemm_args_size() != ctypes.sizeof(SageGemmArgs):
        return None, (f"{path} has launch ABI {lib.sage_gemm_abi_version()} with a {lib.sage_gemm_args_size()}-byte "
                      f"argument struct; this binding expects ABI {ABI_VERSION}, {ctypes.sizeof(SageGemmArgs)} bytes")
    return lib, ""


def load() -> ctypes.CDLL:
    """The loaded library; KernelLibraryError says why when it cannot be used."""
    lib, reason = _load()
    if lib is None:
        raise KernelLibraryError(reason)
    return lib


def available() -> bool:
    """True when the library was found, loads and matches this binding (a GPU is a separate question)."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1]


def reload() -> bool:
    """Forget the cached lookup (e.g. after setting $SAGE_KERNELS_LIB) and try again."""
    _load.cache_clear()
    return available()


def auto_path(m: int) -> int:
    """The path (PATH_GEMV or PATH_TILED) that PATH_AUTO takes for m activation rows."""
    return int(load().sage_gemm_auto_path(m))


def choose_path(args: SageGemmArgs) -> int:
    """The path a launch with these arguments takes (PATH_AUTO resolved); -1 for invalid arguments."""
    return int(load().sage_gemm_choose_path(ctypes.byref(args)))


def prepared_bytes(args: SageGemmArgs) -> int:
    """Bytes of the GEMV3 layout of the weights in `args`, 0 when GEMV3 cannot take them."""
    return int(load().sage_gemm_prepared_bytes(ctypes.byref(args)))


def prepare(args: SageGemmArgs, stream: int) -> None:
    """Write the GEMV3 layout of the weights into args.prepared (args.prepared_bytes long) on `stream`."""
    _check(load().sage_gemm_prepare(ctypes.byref(args), ctypes.c_void_p(stream)), "sage_gemm_prepare")


def _check(code: int, what: str) -> None:
    if code != 0:
        message = load().sage_gemm_error_string(code).decode(errors="replace")
        raise KernelLibraryError(f"{what} failed with CUDA error {code}: {message}")


def launch(args: SageGemmArgs, stream: int) -> None:
    """Validate and enqueue one product on the CUDA stream handle `stream` (0: the legacy default stream)."""
    _check(load().sage_gemm_launch(ctypes.byref(args), ctypes.c_void_p(stream)), "sage_gemm_launch")
