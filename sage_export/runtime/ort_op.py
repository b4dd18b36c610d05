"""libsage_ort.so: the native SageBinaryGemm for ONNX Runtime's CPU provider and for SageLinear on CPU tensors.

The library (native/ort_sage/, built by tools/install.sh into native/ort_sage/build/) computes the op straight
from the packed bits (docs/ort_op.md). It is looked up in $SAGE_ORT_LIB, then in the repository's build folder.
Where it is missing, or SAGE_ORT_OP=0 is set, sessions run the model-local function body instead (every weight
decoded with standard ops on every call), and this module says so once per process.

`register(options)` adds the `sage` domain to an onnxruntime.SessionOptions; `cpu_gemm` runs the kernel on NumPy
or torch CPU buffers through ctypes.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

ENV_LIB = "SAGE_ORT_LIB"
ENV_SWITCH = "SAGE_ORT_OP"  # "0": never use the library (benchmarks of the function body, fallback tests)
LIBRARY_NAME = "libsage_ort.so"
ABI_VERSION = 3  # SAGE_CPU_ABI_VERSION (3: contract v3, 16-bit salient_cols, row_scales may be empty)
MAX_GROUPS = 16  # SAGE_CPU_MAX_GROUPS
DTYPE_FLOAT32 = 0
DTYPE_FLOAT16 = 1

FUNCTION_BODY = "function body"

_REPO_ROOT = Path(__file__).resolve().parents[2]
_fallback_said = False


class SageCpuArgs(ctypes.Structure):
    """Mirror of SageCpuArgs in native/ort_sage/sage_cpu.h (same field order and types)."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("sign_bits", ctypes.c_void_p),
        ("group_codes", ctypes.c_void_p),
        ("group_scales", ctypes.c_void_p),
        ("salient_rowptr", ctypes.c_void_p),
        ("salient_cols", ctypes.c_void_p),  # uint16 [nnz]: the int8 [nnz, 2] bytes (little-endian columns)
        ("salient_q", ctypes.c_void_p),
        ("salient_scale", ctypes.c_void_p),
        ("row_scales", ctypes.c_void_p),  # float16 [N], or NULL for an empty [0]: every r_n is 1
        ("bias", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("nnz", ctypes.c_int64),
        ("k", ctypes.c_int32),
        ("n", ctypes.c_int32),
        ("n_groups", ctypes.c_int32),
        ("salient_bits", ctypes.c_int32),
        ("x_dtype", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


def library_path() -> Path | None:
    """The built library, or None. $SAGE_ORT_LIB wins when set (even if it names a missing file: then None)."""
    env = os.environ.get(ENV_LIB)
    if env:
        return Path(env) if Path(env).is_file() else None
    candidate = _REPO_ROOT / "native" / "ort_sage" / "build" / LIBRARY_NAME
    return candidate if candidate.is_file() else None


@functools.lru_cache(maxsize=None)
def _load(path: str) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    lib.sage_cpu_abi_version.restype = ctypes.c_int
    if lib.sage_cpu_abi_version() != ABI_VERSION:
        return None
    lib.sage_cpu_gemm.argtypes = [ctypes.POINTER(SageCpuArgs), ctypes.c_char_p, ctypes.c_int64]
    lib.sage_cpu_gemm.restype = ctypes.c_int
    lib.sage_ort_library_info.restype = ctypes.c_char_p
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library, or None when it is switched off, missing, not loadable or of another ABI."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    path = library_path()
    return _load(str(path)) if path is not None else None


def available() -> bool:
    return library() is not None


def describe() -> str:
    """What runs SageBinaryGemm in this process: the library (with its kernels and threads) or the function body."""
    lib = library()
    return f"custom op ({lib.sage_ort_library_info().decode()})" if lib is not None else FUNCTION_BODY


def _why_not() -> str:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0 is set"
    path = library_path()
    if path is None:
        where = os.environ.get(ENV_LIB) or str(_REPO_ROOT / "native" / "ort_sage" / "build" / LIBRARY_NAME)
        return f"{where} is not built (bash tools/install.sh builds it)"
    return f"{path} does not load or is not ABI {ABI_VERSION}"


def say_fallback_once() -> None:
    """One line on stderr, the first time a session has to run the function body."""
    global _fallback_said
    if not _fallback_said:
        _fallback_said = True
        print(f"sage-export: the SageBinaryGemm library is not used ({_why_not()}); ONNX Runtime runs the op's "
              f"function body, which decodes every weight on every call (slow)", file=sys.stderr)


def register(options) -> bool:
    """Add the `sage` custom-op domain to an onnxruntime.SessionOptions. False (and the one-time message) when
    the library cannot be used."""
    if library() is None:
        say_fallback_once()
        return False
    options.register_custom_ops_library(str(library_path()))
    return True


def cpu_gemm(args: SageCpuArgs) -> None:
    """Run the kernel on filled-in arguments (CPU pointers); ValueError with the library's reason when the
    arguments or the packing are invalid. ctypes releases the GIL for the call."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the SageBinaryGemm library is not available: {_why_not()}")
    err = ctypes.create_string_buffer(512)
    if lib.sage_cpu_gemm(ctypes.byref(args), err, len(err)) != 0:
        raise ValueError(f"SageBinaryGemm: {err.value.decode()}")


def check_attrs(attrs: dict[str, int]) -> None:
    """The library's own checks of K, N, G and b (its caps), as ValueError."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the SageBinaryGemm library is not available: {_why_not()}")
    err = ctypes.create_string_buffer(256)
    lib.sage_cpu_check_attrs.restype = ctypes.c_int
    if lib.sage_cpu_check_attrs(*(ctypes.c_int64(int(attrs[a])) for a in
                                  ("in_features", "out_features", "n_groups", "salient_bits")), err, len(err)):
        raise ValueError(f"SageBinaryGemm: {err.value.decode()}")


_X_DTYPES = {"float32": DTYPE_FLOAT32, "float16": DTYPE_FLOAT16}


def make_args(x_ptr: int, y_ptr: int, m: int, x_dtype: str, tensor_ptrs: dict[str, int], nnz: int,
              attrs: dict[str, int], bias_ptr: int = 0) -> SageCpuArgs:
    """SageCpuArgs from raw CPU addresses: X [m, K] and Y [m, N] of dtype x_dtype ("float32"/"float16"), the eight
    packed tensors by contract name (the float16 scales, row_scales included, as their bits; salient_cols' int8
    [nnz, 2] bytes, 2-byte aligned, which the library reads as uint16), an optional float32 bias. An address of 0
    is NULL: an empty salient list, or an empty row_scales (every r_n is 1)."""
    return SageCpuArgs(
        x=x_ptr, y=y_ptr, bias=bias_ptr or None, m=m, nnz=nnz, x_dtype=_X_DTYPES[x_dtype],
        k=attrs["in_features"], n=attrs["out_features"], n_groups=attrs["n_groups"],
        salient_bits=attrs["salient_bits"], reserved=0,
        **{name: tensor_ptrs[name] or None for name in ("sign_bits", "group_codes", "group_scales", "salient_rowptr",
                                                         "salient_cols", "salient_q", "salient_scale",
                                                         "row_scales")})


def gemm_numpy(x, tensors: dict, attrs: dict[str, int], bias=None):
    """Y [..., N] = SageBinaryGemm(X [..., K]) with NumPy arrays, by the library. The packed tensors are taken as
    they are (no PackedLinear validation), so a corrupt packing reaches the library's own checks (ValueError).
    Only the dtypes and the row count are checked here: the library trusts the shapes it is given."""
    import numpy as np

    check_attrs(attrs)
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float16) or x.shape[-1] != attrs["in_features"]:
        raise ValueError(f"X: expected float32/float16 [..., {attrs['in_features']}], got {x.dtype} {x.shape}")
    expected = {"sign_bits": np.int8, "group_codes": np.int8, "group_scales": np.float16, "salient_rowptr": np.int32,
                "salient_cols": np.int8, "salient_q": np.int8, "salient_scale": np.float16,
                "row_scales": np.float16}
    arrays = {name: np.ascontiguousarray(tensors[name], dtype=dtype) for name, dtype in expected.items()}
    n, nnz = attrs["out_features"], arrays["salient_q"].size
    if arrays["salient_rowptr"].shape != (n + 1,) or arrays["salient_cols"].shape != (nnz, 2):
        raise ValueError(f"salient_rowptr must be [N + 1] and salient_cols int8 [nnz, 2], got "
                         f"{arrays['salient_rowptr'].shape} and {arrays['salient_cols'].shape} for nnz={nnz}")
    # The library reads the column bytes as uint16 (little-endian, contract v3): copied where not 2-byte aligned.
    arrays["salient_cols"] = np.require(arrays["salient_cols"].view("<u2"), requirements=["C", "A"])
    if arrays["salient_scale"].shape != (n,) or arrays["row_scales"].shape not in ((n,), (0,)):
        raise ValueError(f"salient_scale must be [N] and row_scales [N] or [0], got "
                         f"{arrays['salient_scale'].shape} and {arrays['row_scales'].shape} for N={n}")
    bias_arr = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    m = int(np.prod(x.shape[:-1]))
    y = np.empty((*x.shape[:-1], attrs["out_features"]), dtype=x.dtype)
    args = make_args(x.ctypes.data, y.ctypes.data, m, x.dtype.name,
                     {name: a.ctypes.data if a.size else 0 for name, a in arrays.items()},
                     nnz, attrs, 0 if bias_arr is None else bias_arr.ctypes.data)
    cpu_gemm(args)
    return y
