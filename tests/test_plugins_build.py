"""Builds plugins/ (all six default GPU architectures) and checks what can be checked without a GPU:

* both libraries exist, the TensorRT plugin exports getCreators/setLoggerFinder and needs no TensorRT library;
* the plugin's host test (creator, fields, serialization round trip, shapes, formats) passes;
* the ctypes binding matches the launch API;
* every kernel path, run by the CPU emulator of plugins/tests/cuda_emulator.h, matches the NumPy reference (and
  every case runs on the bandwidth-oriented GEMV2 path as well), with contract v2's row multipliers r_n random
  (never all 1), and again with zero, negative and widely spread ones, and without any (contract v3's empty
  row_scales, passed as NULL: the same output as N ones, bit for bit);
* contract v3's 16-bit columns: K = 65,536, the widest the contract allows, with columns past 2^15 on every kernel
  that takes it;
* a corrupt CSR (row pointers or columns out of range) reads nothing out of bounds (the emulator is built with
  AddressSanitizer where available) and gives the reference of the CSR as the kernels clamp it;
* X = identity gives Ŵᵀ bit for bit; arguments past the kernels' limits are refused before any launch.

Needs nvcc and cmake (skipped otherwise) and PyPI access for the TensorRT headers (tools/fetch_trt_headers.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from sage_export.format.sage_layout import PackedLinear, dequantize, pack_columns, salient_columns
from sage_export.onnx.reference import sage_binary_gemm_packed
from sage_export.runtime import kernels
from sage_export.runtime.synthetic import random_packed_linear, reference_error_ratio, scramble_salient_bits

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None,
                                reason="needs the CUDA compiler (nvcc) and cmake")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plugins_build")
    start = time.perf_counter()
    result = subprocess.run([str(REPO / "tools" / "build_plugins.sh"), str(out)], capture_output=True, text=True,
                            env={**os.environ, "JOBS": "2"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(f"\nplugins/ built for 75;80;86;87;89;90 in {time.perf_counter() - start:.0f} s")
    return out


def _nm(library: Path, flag: str) -> list[str]:
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) not installed")
    out = subprocess.run(["nm", "-D", flag, str(library)], capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


def test_both_libraries_are_built(build_dir: Path) -> None:
    assert (build_dir / "libsage_kernels.so").is_file()
    assert (build_dir / "libsage_trt_plugin.so").is_file(), "TensorRT headers missing? see tools/fetch_trt_headers.sh"


def test_plugin_exports_entry_points_and_needs_no_tensorrt(build_dir: Path) -> None:
    plugin = build_dir / "libsage_trt_plugin.so"
    defined = set(_nm(plugin, "--defined-only"))
    assert {"getCreators", "setLoggerFinder"} <= defined
    undefined = _nm(plugin, "--undefined-only")
    assert not [s for s in undefined if "nvinfer" in s.lower()], "plugin must not need libnvinfer symbols"
    needed = subprocess.run(["readelf", "-d", str(plugin)], capture_output=True, text=True).stdout
    assert "nvinfer" not in needed.lower()


def test_plugin_host_test_passes(build_dir: Path) -> None:
    result = subprocess.run([str(build_dir / "sage_plugin_host_test")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout


def test_ctypes_binding_matches_the_library(build_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, str(build_dir / "libsage_kernels.so"))
    try:
        assert kernels.reload(), kernels.unavailable_reason()
        assert kernels.ABI_VERSION == 5  # contract v3: uint16 salient_cols, row_scales may be NULL
        assert kernels.SageGemmArgs.row_scales.offset == kernels.SageGemmArgs.salient_scale.offset + 8
        assert kernels.auto_path(1) == kernels.PATH_GEMV  # without a prepared layout (GEMV3 needs one)
        assert kernels.auto_path(kernels.GEMV_MAX_M + 1) == kernels.PATH_TILED
        # Invalid arguments are rejected before any CUDA call, so this runs without a GPU.
        bad = kernels.SageGemmArgs(m=1, k=8, n=4, n_groups=0, salient_bits=4)
        with pytest.raises(kernels.KernelLibraryError, match="error 1"):
            kernels.launch(bad, 0)
        dummy = 16  # any non-null address: with m = 0 nothing is read or launched
        empty = kernels.SageGemmArgs(x=dummy, sign_bits=dummy, group_scales=dummy, salient_rowptr=dummy,
                                     salient_scale=dummy, row_scales=dummy, y=dummy, m=0, k=8, n=4, n_groups=1,
                                     salient_bits=4)
        kernels.launch(empty, 0)
        empty.k = kernels.MAX_K  # the contract's widest layer (v3: 16-bit columns)
        kernels.launch(empty, 0)
        no_row_scales = kernels.SageGemmArgs.from_buffer_copy(empty)
        no_row_scales.row_scales = None  # contract v3: an empty row_scales, every r_n = 1
        kernels.launch(no_row_scales, 0)
        empty.path = kernels.PATH_GEMV2
        kernels.launch(empty, 0)
        # Sizes of the GEMV3 layout, and the cases it cannot take (no GPU needed: nothing is launched).
        empty.path = kernels.PATH_AUTO
        assert kernels.choose_path(empty) == kernels.PATH_GEMV  # no prepared layout
        probe = kernels.SageGemmArgs.from_buffer_copy(empty)
        probe.k, probe.n, probe.n_groups, probe.group_codes = 4096, 4096, 4, dummy
        assert kernels.prepared_bytes(probe) == 4096 * 4096 * 3 // 8  # the bits, no padding at this shape
        for field, value in (("n_groups", 9), ("k", 65536), ("k", 4100)):
            wrong = kernels.SageGemmArgs.from_buffer_copy(probe)
            setattr(wrong, field, value)
            assert kernels.prepared_bytes(wrong) == 0, (field, value)
        with pytest.raises(kernels.KernelLibraryError, match="error 1"):
            kernels.prepare(probe, 0)  # no buffer to write into
        for field, value in (("k", kernels.MAX_K + 1), ("nnz", -1), ("nnz", 2**31), ("nnz", 1),
                             ("path", kernels.PATH_GEMV3 + 1), ("salient_scale", None)):
            wrong = kernels.SageGemmArgs.from_buffer_copy(empty)
            # nnz = 1 without salient_cols / salient_q arrays
            setattr(wrong, field, value)
            with pytest.raises(kernels.KernelLibraryError, match="error 1"):
                kernels.launch(wrong, 0)
    finally:
        monkeypatch.undo()
        kernels.reload()


def _write_problem(path: Path, x: np.ndarray, p, bias: np.ndarray | None, kernel_path: int, misalign: bool,
                   tensors: dict[str, np.ndarray] | None = None) -> None:
    """The emulator's input format (plugins/tests/kernel_emulator.cpp). `tensors` stands in for p's packed arrays,
    e.g. with a corrupt CSR that no PackedLinear would hold."""
    tensors = p.tensors() if tensors is None else tensors
    dtype_id = kernels.DTYPE_FLOAT16 if x.dtype == np.float16 else kernels.DTYPE_FLOAT32
    header = np.array([x.shape[0], p.in_features, p.out_features, p.n_groups, p.salient_bits, dtype_id,
                       -1 if bias is None else dtype_id, kernel_path, tensors["salient_cols"].shape[0],
                       int(misalign), tensors["row_scales"].shape[0]], dtype="<i8")
    arrays = [x, *tensors.values()] + ([] if bias is None else [bias])
    path.write_bytes(header.tobytes() + b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))


def _emulate(build_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(build_dir / "sage_kernel_emulator"), str(tmp_path / "problem.bin"),
                           str(tmp_path / "y.bin")], capture_output=True, text=True, timeout=120)


def _run_emulated(build_dir: Path, tmp_path: Path, x: np.ndarray, p: PackedLinear, bias: np.ndarray | None,
                  kernel_path: int, tensors: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Y from the emulator for a problem it must accept (`tensors` as in _write_problem)."""
    _write_problem(tmp_path / "problem.bin", x, p, bias, kernel_path, False, tensors)
    result = _emulate(build_dir, tmp_path)
    assert result.returncode == 0, result.stderr
    return np.fromfile(tmp_path / "y.bin", dtype=x.dtype).reshape(x.shape[0], p.out_features)


AUTO, GEMV, TILED, GEMV2 = kernels.PATH_AUTO, kernels.PATH_GEMV, kernels.PATH_TILED, kernels.PATH_GEMV2
GEMV3 = kernels.PATH_GEMV3


def _also_on_gemv2(cases: dict[str, tuple]) -> dict[str, tuple]:
    """The emulated cases, plus each of them again with its `path` field (index 6) set to GEMV2."""
    return cases | {f"gemv2-{name}": (*case[:6], GEMV2, *case[7:]) for name, case in cases.items()}


# (m, k, n, groups, dtype, bias, path, misalign, salient fraction, scrambled salient bits)
EMULATED_CASES = {
    "gemv-m1-k20-g3": (1, 20, 6, 3, np.float32, False, AUTO, False, 0.05, False),
    "gemv-m2-two-tiles-vector-loads": (2, 1152, 40, 4, np.float16, True, AUTO, False, 0.05, False),
    "gemv-m3-noncanonical": (3, 300, 40, 3, np.float16, True, AUTO, False, 0.05, True),
    "gemv-m8-g8": (8, 2048, 33, 8, np.float32, False, AUTO, False, 0.03, False),
    "gemv-m16-two-passes-misaligned-g16": (16, 1152, 40, 16, np.float16, False, AUTO, True, 0.03, False),
    "gemv-m5-nnz0": (5, 1152, 40, 2, np.float32, True, AUTO, False, 0.0, False),
    "gemv-m7-g1": (7, 77, 65, 1, np.float32, False, AUTO, False, 0.05, False),
    "gemv-forced-m20-three-passes": (20, 77, 65, 4, np.float32, True, GEMV, False, 0.05, False),
    "wmma-m70-k300": (70, 300, 70, 3, np.float16, True, AUTO, False, 0.05, False),
    "wmma-m33-vector-x-nnz0": (33, 128, 64, 4, np.float16, False, AUTO, False, 0.0, False),
    "wmma-forced-m20-misaligned-g1": (20, 77, 65, 1, np.float16, False, TILED, True, 0.05, False),
    "wmma-m17-g8": (17, 1000, 100, 8, np.float16, True, AUTO, False, 0.03, False),
    "simt-m70-noncanonical": (70, 296, 70, 3, np.float32, True, AUTO, False, 0.05, True),
    "simt-forced-m3-g5": (3, 1152, 40, 5, np.float32, False, TILED, False, 0.03, False),
}
EMULATED_CASES = _also_on_gemv2(EMULATED_CASES) | {
    # LLaMA-2-7B down_proj width: three K tiles, the last one partly past the row end
    "gemv2-m1-k11008-n64": (1, 11008, 64, 4, np.float16, True, GEMV2, False, 0.03, False),
    "gemv2-m2-k4099-g16-noncanonical": (2, 4099, 33, 16, np.float32, True, GEMV2, False, 0.05, True),
}
# GEMV3 (float16 X, G <= 8, K a multiple of 8): every G from 1 to 8, the K of SmolLM2 (576: the last 128-column
# piece ends inside), Qwen2-0.5B (896, 4864) and LLaMA-2-7B (4096, 11008), K not a multiple of 16 or 64, batches
# 1..16 and two passes, nnz = 0, non-canonical bits under the salient entries, odd N (a partial 16-row tile).
EMULATED_CASES |= {
    f"gemv3-m{m}-k{k}-n{n}-g{g}" + ("-noncanonical" if scrambled else "") + ("-nnz0" if fraction == 0 else ""):
        (m, k, n, g, np.float16, bias, GEMV3, False, fraction, scrambled)
    for m, k, n, g, bias, fraction, scrambled in [
        (1, 576, 40, 1, True, 0.05, False), (3, 576, 33, 2, False, 0.05, True), (1, 896, 17, 3, True, 0.03, False),
        (8, 4864, 16, 4, False, 0.03, False), (1, 4096, 64, 5, True, 0.03, True), (2, 11008, 24, 6, True, 0.01, False),
        (16, 520, 40, 7, True, 0.05, False), (9, 1000, 31, 8, False, 0.05, True), (5, 1152, 40, 2, True, 0.0, False),
        (20, 264, 20, 4, True, 0.05, False)]
}
# Every salient width b from 2 to 8 on GEMV3 (the stored q only spans a wider range).
SALIENT_BITS_CASES = [(b, 1 + b % 4, 8 * (40 + 11 * b)) for b in range(2, 9)]  # (b, batch, K)


@pytest.mark.parametrize("case", EMULATED_CASES)
def test_emulated_kernels_match_reference(build_dir: Path, tmp_path: Path, case: str) -> None:
    m, k, n, groups, dtype, with_bias, kernel_path, misalign, fraction, scrambled = EMULATED_CASES[case]
    seed = sum(map(ord, case))
    p = random_packed_linear(n, k, groups, salient_fraction=fraction, seed=seed)
    assert np.unique(p.row_scales).size > 1  # a kernel that ignores r_n (contract v2) must fail here
    if scrambled:
        p = scramble_salient_bits(p, seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype) if with_bias else None
    _write_problem(tmp_path / "problem.bin", x, p, bias, kernel_path, misalign)

    result = _emulate(build_dir, tmp_path)
    assert result.returncode == 0, result.stderr
    y = np.fromfile(tmp_path / "y.bin", dtype=dtype).reshape(m, n)
    assert reference_error_ratio(y, x, p, bias) <= 1.0
    if dtype == np.float32:  # and close to the reference implementation itself
        np.testing.assert_allclose(y, sage_binary_gemm_packed(x, p, bias), rtol=1e-4, atol=1e-4)


def _with_row_scales(p: PackedLinear, seed: int) -> PackedLinear:
    """p with row multipliers the contract allows but the quantizer rarely makes: zero, negative, and spread over
    2^-4..2^4 (each exact in float16)."""
    rng = np.random.default_rng(seed)
    r = rng.choice([-1.0, 1.0], p.out_features) * 2.0 ** rng.integers(-4, 5, p.out_features) \
        * rng.choice([1.0, 1.5, 1.75], p.out_features)
    r[::5] = 0.0
    return PackedLinear.from_tensors(p.tensors() | {"row_scales": r.astype(np.float16)}, **p.attrs())


# (m, k, n, groups, dtype, path, salient fraction): every kernel and dtype; fraction 1 makes every weight salient,
# so that r_n must have no effect at all.
ROW_SCALE_CASES = {
    "gemv-f32": (3, 300, 40, 3, np.float32, GEMV, 0.05),
    "gemv-f16-vector-loads": (2, 1152, 40, 4, np.float16, GEMV, 0.05),
    "gemv2-f32": (3, 300, 40, 3, np.float32, GEMV2, 0.05),
    "gemv2-f16-vector-loads": (2, 1152, 40, 4, np.float16, GEMV2, 0.05),
    "simt-f32": (70, 300, 70, 3, np.float32, TILED, 0.05),
    "wmma-f16": (40, 296, 70, 4, np.float16, TILED, 0.05),
    "gemv3-f16": (3, 1152, 40, 4, np.float16, GEMV3, 0.05),
    "gemv3-f16-m12": (12, 520, 33, 8, np.float16, GEMV3, 0.03),
    "gemv-all-salient": (2, 136, 24, 2, np.float32, GEMV, 1.0),
    "gemv2-all-salient": (2, 136, 24, 2, np.float32, GEMV2, 1.0),
    "simt-all-salient": (2, 136, 24, 2, np.float32, TILED, 1.0),
    "gemv3-all-salient": (2, 136, 24, 2, np.float16, GEMV3, 1.0),
}


@pytest.mark.parametrize("case", ROW_SCALE_CASES)
def test_emulated_kernels_apply_any_row_scale(build_dir: Path, tmp_path: Path, case: str) -> None:
    m, k, n, groups, dtype, kernel_path, fraction = ROW_SCALE_CASES[case]
    seed = sum(map(ord, case))
    p = _with_row_scales(scramble_salient_bits(random_packed_linear(n, k, groups, salient_fraction=fraction,
                                                                    seed=seed), seed), seed)
    assert (p.row_scales == 0).any() and (p.row_scales < 0).any()
    x = np.random.default_rng(seed).standard_normal((m, k)).astype(dtype)
    bias = np.random.default_rng(seed + 1).standard_normal(n).astype(dtype)
    y = _run_emulated(build_dir, tmp_path, x, p, bias, kernel_path)
    assert reference_error_ratio(y, x, p, bias) <= 1.0
    if dtype == np.float32:
        np.testing.assert_allclose(y, sage_binary_gemm_packed(x, p, bias), rtol=1e-4, atol=1e-4)
    if fraction == 1.0:  # no unsalient weight: the same result whatever r_n
        ones = PackedLinear.from_tensors(p.tensors() | {"row_scales": np.ones(n, np.float16)}, **p.attrs())
        np.testing.assert_array_equal(dequantize(ones), dequantize(p))


# (m, k, n, groups, dtype, path): every kernel and dtype, with contract v3's empty row_scales
NO_ROW_SCALE_CASES = {
    "gemv-f32": (3, 300, 40, 3, np.float32, GEMV),
    "gemv-f16-vector-loads": (2, 1152, 40, 4, np.float16, GEMV),
    "gemv2-f32": (3, 300, 40, 3, np.float32, GEMV2),
    "gemv2-f16-vector-loads": (2, 1152, 40, 4, np.float16, GEMV2),
    "simt-f32": (70, 300, 70, 3, np.float32, TILED),
    "wmma-f16": (40, 296, 70, 4, np.float16, TILED),
    "gemv3-f16": (3, 1152, 40, 4, np.float16, GEMV3),
    "gemv3-f16-m12": (12, 520, 33, 8, np.float16, GEMV3),
}


@pytest.mark.parametrize("case", NO_ROW_SCALE_CASES)
def test_emulated_kernels_without_row_scales(build_dir: Path, tmp_path: Path, case: str) -> None:
    # The empty row_scales reaches the kernels as NULL, which must mean r_n = 1 and nothing else: the output is the
    # reference's, and bit for bit the one N explicit ones give (a kernel reading through NULL fails under ASan).
    m, k, n, groups, dtype, kernel_path = NO_ROW_SCALE_CASES[case]
    seed = sum(map(ord, case))
    p = scramble_salient_bits(random_packed_linear(n, k, groups, salient_fraction=0.05, row_scales=False,
                                                   seed=seed), seed)
    assert p.row_scales.shape == (0,)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    y = _run_emulated(build_dir, tmp_path, x, p, bias, kernel_path)
    assert reference_error_ratio(y, x, p, bias) <= 1.0
    ones = p.tensors() | {"row_scales": np.ones(n, np.float16)}
    assert np.array_equal(y, _run_emulated(build_dir, tmp_path, x, p, bias, kernel_path, ones))


@pytest.mark.parametrize(("kernel_path", "dtype"), [(GEMV, np.float32), (GEMV2, np.float16), (TILED, np.float32),
                                                    (TILED, np.float16)])
def test_emulated_kernels_take_the_widest_k(build_dir: Path, tmp_path: Path, kernel_path: int, dtype: type) -> None:
    # K = 65,536, the contract's limit (v3): columns up to 65,535, half of them with the top bit of their 16 set,
    # which a signed read would turn negative (and skip). GEMV3 stops at 65,535 (its own column sentinel).
    p = _staircase_layer(4, kernels.MAX_K, 2, seed=kernel_path)
    assert p.columns.max() >= 0xFF00
    x = np.random.default_rng(kernel_path).standard_normal((2, kernels.MAX_K)).astype(dtype)
    y = _run_emulated(build_dir, tmp_path, x, p, None, kernel_path)
    assert reference_error_ratio(y, x, p) <= 1.0


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _staircase_layer(n: int, k: int, groups: int, seed: int) -> PackedLinear:
    """A valid layer whose salient columns ascend across the whole CSR (row r's lie in the r-th band of columns),
    so that any slice of entries a corrupt rowptr hands a row still ascends, as the tiled kernel's cursor needs.
    The bits under the salient entries are random (non-canonical), so the kernels must subtract what they encode."""
    rng = np.random.default_rng(seed)
    binary = random_packed_linear(n, k, groups, salient_fraction=0.0, seed=seed)
    band = np.arange(k) * n // k
    mask = (band[None, :] == np.arange(n)[:, None]) & (rng.random((n, k)) < 0.6)
    rows, cols = np.nonzero(mask)
    rowptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int32)
    csr = {"salient_rowptr": rowptr, "salient_cols": pack_columns(cols),
           "salient_q": rng.integers(-7, 8, cols.shape[0]).astype(np.int8)}
    return PackedLinear.from_tensors(binary.tensors() | csr, **binary.attrs())


def _corrupt_csr(p: PackedLinear, kind: str, seed: int) -> dict[str, np.ndarray]:
    """p's tensors with row pointers negative, past nnz and out of order ("rowptr"), columns >= K ("cols"; 16-bit
    since contract v3, so never negative, but 0x8000 and up would be as int16), or both."""
    rng = np.random.default_rng(seed)
    rowptr, cols = p.salient_rowptr.copy(), p.columns
    if kind in ("rowptr", "both"):
        at = rng.choice(p.out_features + 1, size=8, replace=False)
        rowptr[at[:5]] = [-3, INT32_MIN, p.nnz + 5, INT32_MAX, p.nnz]
        rowptr[at[5]], rowptr[at[6]] = rowptr[at[6]], rowptr[at[5]]  # rows running backwards
        rowptr[at[7]] = rowptr[at[7]] // 2
    if kind in ("cols", "both"):
        at = rng.choice(p.nnz, size=p.nnz // 8, replace=False)
        cols[at] = rng.choice([p.in_features, 0x7FFF, 0x8000, 0xFFFF], size=at.shape[0])
    return p.tensors() | {"salient_rowptr": rowptr, "salient_cols": pack_columns(cols)}


def _sanitized(p: PackedLinear, tensors: dict[str, np.ndarray]) -> PackedLinear:
    """The layer the kernels compute from a corrupt CSR: row r owns the entries [clamp(rowptr[r], 0, nnz),
    clamp(rowptr[r+1], that, nnz)), of which those with a column outside [0, K) are skipped."""
    rowptr, q = tensors["salient_rowptr"], tensors["salient_q"]
    cols = salient_columns(tensors["salient_cols"])
    begin = np.clip(rowptr[:-1].astype(np.int64), 0, cols.shape[0])
    end = np.clip(rowptr[1:].astype(np.int64), begin, cols.shape[0])
    rows = [np.arange(b, e)[cols[b:e] < p.in_features] for b, e in zip(begin, end)]
    kept = np.concatenate(rows)
    csr = {"salient_rowptr": np.concatenate([[0], np.cumsum([r.size for r in rows])]).astype(np.int32),
           "salient_cols": tensors["salient_cols"][kept], "salient_q": q[kept]}
    return PackedLinear.from_tensors(tensors | csr, **p.attrs())


# (m, k, n, groups, dtype, path): each kernel and dtype, vector and byte loads
CORRUPT_SHAPES = {
    "gemv-f32": (3, 300, 70, 3, np.float32, GEMV),
    "gemv-f16-vector-loads": (2, 1152, 40, 4, np.float16, GEMV),
    "simt-f32": (70, 300, 70, 3, np.float32, TILED),
    "wmma-f16": (40, 296, 70, 4, np.float16, TILED),
    "gemv2-f32": (3, 300, 70, 3, np.float32, GEMV2),
    "gemv2-f16-vector-loads": (2, 1152, 40, 4, np.float16, GEMV2),
    "gemv2-f32-three-tiles": (2, 9000, 40, 2, np.float32, GEMV2),  # the CSR cursor crosses K tiles
    "gemv3-f16": (3, 1152, 40, 4, np.float16, GEMV3),
    "gemv3-f16-tail-piece": (2, 296, 70, 8, np.float16, GEMV3),
}


@pytest.mark.parametrize(("bits", "m", "k"), SALIENT_BITS_CASES)
def test_emulated_gemv3_every_salient_width(build_dir: Path, tmp_path: Path, bits: int, m: int, k: int) -> None:
    p = random_packed_linear(24, k, 4, salient_fraction=0.05, salient_bits=bits, seed=bits)
    assert np.abs(p.salient_q).max() == 2 ** (bits - 1) - 1  # the full range of b bits is exercised
    x = np.random.default_rng(bits).standard_normal((m, k)).astype(np.float16)
    assert reference_error_ratio(_run_emulated(build_dir, tmp_path, x, p, None, GEMV3), x, p) <= 1.0


@pytest.mark.parametrize(("why", "k", "groups", "dtype", "misalign"), [
    ("float32 X", 64, 2, np.float32, False), ("G = 9", 64, 9, np.float16, False),
    ("G = 16", 64, 16, np.float16, False), ("K % 8 != 0", 60, 2, np.float16, False),
    ("X not 16-byte aligned", 64, 2, np.float16, True)])
def test_emulated_gemv3_refuses_what_it_cannot_run(build_dir: Path, tmp_path: Path, why: str, k: int, groups: int,
                                                   dtype: type, misalign: bool) -> None:
    # Asked for by name, GEMV3 refuses (AUTO falls back to GEMV/tiled instead): nothing is written.
    p = random_packed_linear(16, k, groups, salient_fraction=0.05, seed=1)
    _write_problem(tmp_path / "problem.bin", np.ones((1, k), dtype=dtype), p, None, GEMV3, misalign)
    result = _emulate(build_dir, tmp_path)
    assert result.returncode != 0, why
    assert not (tmp_path / "y.bin").exists()


@pytest.mark.parametrize("kind", ["rowptr", "cols", "both"])
@pytest.mark.parametrize("shape", CORRUPT_SHAPES)
def test_emulated_kernels_clamp_a_corrupt_csr(build_dir: Path, tmp_path: Path, shape: str, kind: str) -> None:
    m, k, n, groups, dtype, kernel_path = CORRUPT_SHAPES[shape]
    seed = sum(map(ord, shape + kind))
    p = _staircase_layer(n, k, groups, seed)
    tensors = _corrupt_csr(p, kind, seed)
    x = np.random.default_rng(seed).standard_normal((m, k)).astype(dtype)
    y = _run_emulated(build_dir, tmp_path, x, p, None, kernel_path, tensors)
    clamped = _sanitized(p, tensors)
    assert reference_error_ratio(y, x, clamped) <= 1.0
    if dtype == np.float32:
        np.testing.assert_allclose(y, sage_binary_gemm_packed(x, clamped), rtol=1e-4, atol=1e-4)


# (k, n, groups, path, scrambled salient bits)
IDENTITY_CASES = {
    "gemv-k77": (77, 40, 3, GEMV, False),
    "gemv-k136-g16-noncanonical": (136, 33, 16, GEMV, True),
    "simt-k77-noncanonical": (77, 65, 4, TILED, True),
    "simt-k136-g1": (136, 40, 1, TILED, False),
    "gemv2-k77": (77, 40, 3, GEMV2, False),
    "gemv2-k136-g16-noncanonical": (136, 33, 16, GEMV2, True),
    "gemv2-k136-g1": (136, 40, 1, GEMV2, False),
    "gemv2-k77-g2-noncanonical": (77, 40, 2, GEMV2, True),
    # zero, negative and spread row multipliers (contract v2): r_n·(±α_g) is exact in float32 as well
    "gemv-k136-g4-row-scales": (136, 40, 4, GEMV, True),
    "gemv2-k136-g4-row-scales": (136, 40, 4, GEMV2, True),
    "simt-k136-g4-row-scales": (136, 40, 4, TILED, True),
}


@pytest.mark.parametrize("case", IDENTITY_CASES)
def test_emulated_kernels_give_the_weight_for_an_identity_input(build_dir: Path, tmp_path: Path, case: str) -> None:
    # One nonzero activation per row makes every sum exact, salient corrections included (float16 scales and 4-bit
    # integers leave float32 plenty of bits): Y = I·Ŵᵀ must be Ŵᵀ to the last bit. GEMV2's group sums are ±1 or
    # 0 there, so α_g·S_g is exact too. These kernels sum the binary weight under a salient entry back out of the
    # sum r_n multiplies (it cancels to 0 exactly) and add s·q apart, so r_n·(±α_g) and s·q both come out exact.
    k, n, groups, kernel_path, scrambled = IDENTITY_CASES[case]
    seed = sum(map(ord, case))
    p = random_packed_linear(n, k, groups, salient_fraction=0.1, seed=seed)
    if scrambled:
        p = scramble_salient_bits(p, seed)
    if case.endswith("row-scales"):
        p = _with_row_scales(p, seed)
    y = _run_emulated(build_dir, tmp_path, np.eye(k, dtype=np.float32), p, None, kernel_path)
    # + 0: the sign of a zero is not compared (r_n = 0 decodes to -0.0 under a negative binary weight; the kernels
    # add the bias, +0 here, last).
    expected = np.ascontiguousarray(dequantize(p).T) + np.float32(0)
    assert np.array_equal((y + np.float32(0)).view(np.uint32), expected.view(np.uint32))


# K = 2**31 - 8 passed an old check (ceil(K/8) fits an int) yet overflowed the kernels' tile arithmetic; since
# contract v3 no K above 65,536 is valid.
@pytest.mark.parametrize("k, nnz", [(kernels.MAX_K + 1, 0), (kernels.MAX_FEATURES + 1, 0), (2**31 - 8, 0), (64, -1),
                                    (64, 2**31)])
def test_emulated_launch_refuses_arguments_past_the_limits(build_dir: Path, tmp_path: Path, k: int, nnz: int) -> None:
    # Only the header: the emulator gives such a problem empty arrays, which a launch must not get to read.
    header = np.array([4, k, 8, 2, 4, kernels.DTYPE_FLOAT32, -1, kernels.PATH_AUTO, nnz, 0, 0], dtype="<i8")
    (tmp_path / "problem.bin").write_bytes(header.tobytes())
    result = _emulate(build_dir, tmp_path)
    assert result.returncode == 1, result.stderr  # cudaErrorInvalidValue
    assert "sage_gemm_launch: invalid argument" in result.stderr
    assert not (tmp_path / "y.bin").exists()
