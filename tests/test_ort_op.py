"""The native SageBinaryGemm (native/ort_sage, loaded by sage_export.runtime.ort_op): against the NumPy reference
on every kernel path, inside ONNX Runtime sessions, on corrupt packings, on the real SmolLM2 model, and the
fallback to the function body when the library is absent. Contract v3: salient_cols is int8 [nnz, 2], each column
16 bits little-endian; random layers have row multipliers row_scales (input 8) that are not 1.0, zero and negative
ones included, or an empty row_scales [0] (every r_n is 1); the bias is input 9.

Tolerances: Ŵ is compared bitwise (X = identity gives Y = Ŵᵀ exactly, whatever the summation order). Products
with random X agree with the reference up to float32 summation order: |Y − Y_ref| ≤ 1e-5 · max|Y_ref| for float32
X, and one float16 step (1e-3 · max|Y_ref|) for float16 X, where both sides round their float32 sums to float16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sage_export.format.sage_layout import PackedLinear, decode, dequantize, pack_sage, salient_q_limit
from sage_export.onnx.reference import sage_binary_gemm_packed
from sage_export.runtime import ort_op

# Tests that need sessions import sage_export.onnx.ort_check where they run: it imports torch, which the
# kernel-path subprocesses (agreement_report imports this module) do without.

TOL = {"float32": 1e-5, "float16": 1e-3}
TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


@pytest.fixture(scope="module", autouse=True)
def library_built():
    # CI builds the library in tools/install.sh; a missing one is a failure here, not a skip.
    assert ort_op.available(), f"libsage_ort.so is not usable: {ort_op.describe()}; run bash tools/install.sh"


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)) if ref.size else 0.0


def random_row_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """r_n for a test layer: magnitudes 0.25..4 of either sign and, where there are rows enough, 0 and the
    smallest float16 subnormal (the largest magnitudes are in extreme_row_scales_case: here they would swamp the
    other rows in the errors relative to max|Y|)."""
    scales = rng.uniform(0.25, 4.0, n) * rng.choice([-1.0, 1.0], n)
    special = [0.0, 2.0**-24]
    if n > 2 * len(special):
        scales[rng.choice(n, len(special), replace=False)] = special
    return scales


def layer_case(rng: np.random.Generator, n: int, k: int, g: int, density: float, bits: int,
               row_scales: bool = True) -> PackedLinear:
    """A random layer whose sign bits at salient positions are random too: a valid but non-canonical packing,
    which every decoder must read the same way (those bits are never used). row_scales=False: an empty [0]."""
    limit = salient_q_limit(bits)
    mask = rng.random((n, k)) < density
    packed = pack_sage(signs=rng.random((n, k)) < 0.5, group_index=rng.integers(0, g, (n, k)),
                       group_scales=rng.uniform(0.005, 0.1, g), salient_mask=mask,
                       salient_q=rng.integers(-limit, limit + 1, (n, k)), salient_scale=rng.uniform(0.01, 0.2, n),
                       salient_bits=bits, row_scales=random_row_scales(rng, n) if row_scales else None)
    noise = np.packbits(mask & (rng.random((n, k)) < 0.5), axis=1, bitorder="little").view(np.int8)
    return PackedLinear.from_tensors({**packed.tensors(), "sign_bits": packed.sign_bits ^ noise}, **packed.attrs())


def random_cases(seed: int = 0):
    """(packed, description): G from 1 to 16, b from 2 to 8, nnz = 0 among them, K mostly not a multiple of 8,
    every fourth layer with an empty row_scales."""
    rng = np.random.default_rng(seed)
    shapes = [(1, 1), (3, 7), (17, 9), (33, 13), (8, 64), (40, 100), (65, 257), (16, 1000)]
    for i, g in enumerate(range(1, 17)):
        n, k = shapes[i % len(shapes)]
        bits = 2 + i % 7
        density = 0.0 if i % 5 == 0 else (0.02, 0.1, 0.3)[i % 3]
        packed = layer_case(rng, n, k, g, density, bits, row_scales=i % 4 != 3)
        yield packed, f"N={n} K={k} G={g} b={bits} nnz={packed.nnz} R={packed.row_scales.size}"


def extreme_row_scales_case(rng: np.random.Generator) -> PackedLinear:
    """70 rows (three blocks of the CPU op) whose r_n span float16: ±65504, ±1, 2^-24 (subnormal), 0, ... Rows 0-2
    hold only salient entries, which ignore r_n."""
    n, k = 70, 45
    packed = layer_case(rng, n, k, 6, 0.1, 4)
    row_scales = np.resize(np.array([65504.0, -65504.0, 1.0, -1.0, 2.0**-24, 0.0, 1024.0, -0.5, 3.0e-3], np.float16),
                           n)
    mask = np.zeros((n, k), bool)
    mask[:3] = True
    mask[3:] = rng.random((n - 3, k)) < 0.1
    return pack_sage(signs=rng.random((n, k)) < 0.5, group_index=rng.integers(0, 6, (n, k)),
                     group_scales=packed.group_scales, salient_mask=mask, salient_q=rng.integers(-7, 8, (n, k)),
                     salient_scale=rng.uniform(0.01, 0.2, n), salient_bits=4, row_scales=row_scales)


def bound_ratio(got: np.ndarray, x: np.ndarray, packed: PackedLinear) -> float:
    """max |Y − Y_ref| / (1e-5 · |X|·(|Ŵ| + |B|)ᵀ), elementwise, where B is r_n·(±α) at every position, salient
    ones included: the float32 rounding of each output measured against the terms a kernel may sum, so rows of
    any r_n are held to the same standard (≤ 1 passes). B is there because the fused decode-step kernel sums the
    binary value of every position, factors r_n out, and then takes the salient positions' binary values back out
    (sage_cpu.cpp): its rounding scales with r_n·α even where a row is mostly salient."""
    tensors = packed.tensors()
    w = dequantize(packed)
    binary = decode(packed.in_features, **{**tensors, "salient_rowptr": np.zeros_like(tensors["salient_rowptr"]),
                                           "salient_cols": np.zeros((0, 2), np.int8), "salient_q": np.zeros(0, np.int8)})
    ref = x.astype(np.float32) @ w.T
    scale = np.abs(x.astype(np.float64)) @ (np.abs(w.astype(np.float64)) + np.abs(binary.astype(np.float64))).T
    return float(np.max(np.abs(got.astype(np.float64) - ref) / (1e-5 * scale + 1e-30)))


def agreement_report() -> dict:
    """Run in a subprocess with SAGE_CPU_ISA set: the kernels that process chose, whether every decoded Ŵ was
    bitwise the reference's, the worst relative error of Y per X dtype over M = 1 (decode) to 37 (prefill), and
    the worst bound_ratio of a layer with extreme row multipliers (float32 X). An empty row_scales must give
    bitwise the Y of N ones (r_n = 1 multiplies exactly), on the fused decode-step path (M ≤ 4) and the other."""
    rng = np.random.default_rng(1)
    worst = {"float32": 0.0, "float16": 0.0}
    not_bitwise = []
    extreme = extreme_row_scales_case(rng)
    if not np.array_equal(ort_op.gemm_numpy(np.eye(45, dtype=np.float32), extreme.tensors(), extreme.attrs()).T,
                          dequantize(extreme)):
        not_bitwise.append("extreme row_scales")
    extreme_ratio = 0.0
    for m in (1, 3, 4, 5, 37):
        x = rng.standard_normal((m, 45)).astype(np.float32)
        got = ort_op.gemm_numpy(x, extreme.tensors(), extreme.attrs())
        extreme_ratio = max(extreme_ratio, bound_ratio(got, x, extreme))
    for packed, what in random_cases():
        k, n = packed.in_features, packed.out_features
        eye = ort_op.gemm_numpy(np.eye(k, dtype=np.float32), packed.tensors(), packed.attrs())
        if not np.array_equal(eye.T, dequantize(packed)):
            not_bitwise.append(what)
        if packed.row_scales.size == 0:
            ones = {**packed.tensors(), "row_scales": np.ones(n, np.float16)}
            for m in (1, 4, 37):
                x = rng.standard_normal((m, k)).astype(np.float32)
                if not np.array_equal(ort_op.gemm_numpy(x, packed.tensors(), packed.attrs()),
                                      ort_op.gemm_numpy(x, ones, packed.attrs())):
                    not_bitwise.append(f"{what}: empty row_scales against ones, M={m}")
        for dtype in ("float32", "float16"):
            for lead in ((1,), (3,), (37,), (2, 3)):
                x = rng.standard_normal((*lead, k)).astype(dtype)
                bias = rng.standard_normal(n).astype(np.float32) if len(lead) == 2 else None
                got = ort_op.gemm_numpy(x, packed.tensors(), packed.attrs(), bias)
                worst[dtype] = max(worst[dtype], rel_err(got, sage_binary_gemm_packed(x, packed, bias)))
    return {"isa": ort_op.library().sage_ort_library_info().decode(), "not_bitwise": not_bitwise, "worst": worst,
            "extreme_row_scales": extreme_ratio}


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_every_kernel_path_matches_the_reference(isa):
    code = (f"import json, sys; sys.path.insert(0, {str(TESTS_DIR)!r}); from test_ort_op import agreement_report; "
            "print(json.dumps(agreement_report()))")
    env = {**os.environ, "SAGE_CPU_ISA": isa}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if f"{isa} kernels" not in report["isa"]:
        pytest.skip(f"this CPU cannot run the {isa} kernels ({report['isa']})")
    assert report["not_bitwise"] == []
    assert report["worst"]["float32"] <= TOL["float32"]
    assert report["worst"]["float16"] <= TOL["float16"]
    assert report["extreme_row_scales"] <= 1.0


@pytest.mark.parametrize("x_dtype", [np.float32, np.float16])
def test_sessions_run_the_library_and_match_the_reference(x_dtype):
    from sage_export.onnx.ort_check import make_session, op_model

    rng = np.random.default_rng(2)
    cases = list(random_cases(3))[::3]
    assert {packed.row_scales.size == 0 for packed, _ in cases} == {True, False}  # [0] and [N] both run
    for packed, what in cases:
        assert packed.row_scales.size == 0 or not np.all(packed.row_scales == 1)
        for as_inputs in (False, True):
            bias = rng.standard_normal(packed.out_features).astype(np.float32) if as_inputs else None
            model = op_model(packed, x_dtype, bias, as_inputs, x_rank=3)
            assert list(model.graph.node[0].input)[8:] == ["row_scales"] + (["bias"] if as_inputs else [])
            session = make_session(model.SerializeToString())
            assert session.sage_runtime.startswith("custom op"), session.sage_runtime
            for batch, seq in ((1, 1), (2, 19)):
                x = rng.standard_normal((batch, seq, packed.in_features)).astype(x_dtype)
                got = session.run(["Y"], {"X": x, **(packed.tensors() if as_inputs else {})})[0]
                assert got.dtype == x_dtype and got.shape == (batch, seq, packed.out_features)
                ref = sage_binary_gemm_packed(x, packed, bias)
                assert rel_err(got, ref) <= TOL[np.dtype(x_dtype).name], what


def test_the_ort_check_op_figures_pass_with_the_library():
    from sage_export.onnx.ort_check import THRESHOLDS, check_op

    figures = check_op()
    assert figures["cases"] == 48
    assert figures["max_rel_err"]["float32"] <= THRESHOLDS["op_rel_err_float32"]
    assert figures["max_rel_err"]["float16"] <= THRESHOLDS["op_rel_err_float16"]


# ----------------------------------------------------------------------------------------------- corrupt packings


@pytest.fixture()
def layer():
    from sage_export.onnx.ort_check import random_packed

    return random_packed(np.random.default_rng(4), 12, 21, 5, 0.2)


def corrupted(layer, **changes) -> dict:
    tensors = {name: array.copy() for name, array in layer.tensors().items()}
    for name, edit in changes.items():
        tensors[name] = edit(tensors[name])
    return tensors


def _set(index, value):
    def edit(a):
        a[index] = value
        return a
    return edit


def _set_col(index, col):
    """Column `col` (unsigned 16-bit, little-endian bytes: contract v3) into entry `index` of salient_cols."""
    return _set(index, np.array([col & 0xFF, col >> 8], np.uint8).view(np.int8))


@pytest.mark.parametrize("change, reason", [
    ({"salient_cols": _set_col(2, 21)}, r"\(column 21, q .*\) lies outside \[0, K=21\)"),
    ({"salient_cols": _set_col(0, 65535)}, r"\(column 65535, q .*\) lies outside \[0, K=21\)"),
    ({"salient_cols": _set_col(1, 256 + 3)}, r"\(column 259, q .*\) lies outside"),  # the high byte counts
    ({"salient_q": _set(1, 8)}, r"\|q\| <= 7"),
    ({"salient_q": _set(1, -128)}, r"\|q\| <= 7"),
])
def test_corrupt_salient_entries_are_refused(layer, change, reason):
    from sage_export.onnx.ort_check import make_session, op_model

    x = np.ones((2, 21), np.float32)
    with pytest.raises(ValueError, match=reason):
        ort_op.gemm_numpy(x, corrupted(layer, **change), layer.attrs())
    session = make_session(op_model(layer, np.float32, packed_as_inputs=True, x_rank=2).SerializeToString())
    with pytest.raises(Exception, match="SageBinaryGemm: salient entry"):
        session.run(["Y"], {"X": x, **corrupted(layer, **change)})


@pytest.mark.parametrize("attrs, reason", [
    ({"n_groups": 17}, "n_groups must lie in 1..16"),
    ({"salient_bits": 9}, "salient_bits must lie in 2..8"),
    ({"in_features": 0}, "in_features and out_features"),
    ({"out_features": (1 << 30) + 1}, "in_features and out_features"),
    ({"in_features": 65537}, "in_features and out_features must lie in 1..65536"),  # 16-bit columns (v3)
])
def test_attributes_beyond_the_caps_are_refused(layer, attrs, reason):
    with pytest.raises(ValueError, match=reason):
        ort_op.gemm_numpy(np.ones((1, 21), np.float32), layer.tensors(), {**layer.attrs(), **attrs})


def test_a_node_beyond_the_group_cap_fails_at_session_creation(layer):
    from sage_export.onnx.ort_check import make_session, op_model

    model = op_model(layer, np.float32, x_rank=2)
    next(a for a in model.graph.node[0].attribute if a.name == "n_groups").i = 17
    with pytest.raises(Exception, match="n_groups must lie in 1..16"):
        make_session(model.SerializeToString(), custom_op=True)


@pytest.mark.parametrize("name, short, message", [
    ("sign_bits", lambda a: a[:, :-1], "input sign_bits has shape \\[12, 2\\], expected \\[12, 3\\]"),
    ("row_scales", lambda a: a[:-1], "input row_scales has shape \\[11\\], expected \\[12\\] or \\[0\\]"),
    ("salient_cols", lambda a: a[:, 0], "input salient_cols has shape \\[(\\d+)\\], expected \\[\\1, 2\\]"),
    ("bias", lambda a: a[:-1], "input bias has shape \\[11\\], expected \\[12\\]"),
])
def test_misshapen_packed_inputs_are_refused(layer, name, short, message):
    from sage_export.onnx.ort_check import make_session, op_model

    model = op_model(layer, np.float32, np.ones(12, np.float32), x_rank=2)
    for init in model.graph.initializer:  # one entry short (a byte a row for the bitmap), as a stored initializer
        if init.name == name:
            init.CopyFrom(ort_op_numpy_tensor(short(numpy_helper_to_array(init)), name))
    session = make_session(model.SerializeToString(), custom_op=True)
    with pytest.raises(Exception, match=message):
        session.run(["Y"], {"X": np.ones((1, 21), np.float32)})


def test_a_contract_v1_node_is_refused(layer):
    """Nine inputs with the float32 bias at 8, where v2 and v3 have the float16 row_scales: ONNX Runtime refuses the
    node's types when the session is made, so a v1 graph is never read as v3."""
    from sage_export.onnx.ort_check import make_session, op_model

    model = op_model(layer, np.float32, np.ones(12, np.float32), x_rank=2)
    node = model.graph.node[0]
    inputs = [name for name in node.input if name != "row_scales"]
    del node.input[:]
    node.input.extend(inputs)
    with pytest.raises(Exception, match="bias"):
        make_session(model.SerializeToString(), custom_op=True)


def test_a_contract_v2_node_is_refused(layer):
    """v2 stored salient_cols as int32 [nnz]; v3 as int8 [nnz, 2]. A v2 node's types are refused when the session is
    made, so its columns are never read as bytes."""
    from sage_export.format.sage_layout import salient_columns
    from sage_export.onnx.ort_check import make_session, op_model

    model = op_model(layer, np.float32, x_rank=2)
    for init in model.graph.initializer:
        if init.name == "salient_cols":
            init.CopyFrom(ort_op_numpy_tensor(salient_columns(layer.salient_cols).astype(np.int32), init.name))
    with pytest.raises(Exception, match="salient_cols"):
        make_session(model.SerializeToString(), custom_op=True)


def numpy_helper_to_array(tensor):
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def test_row_scales_must_have_n_or_no_entries(layer):
    with pytest.raises(ValueError, match="row_scales \\[N\\] or \\[0\\]"):
        ort_op.gemm_numpy(np.ones((1, 21), np.float32), corrupted(layer, row_scales=lambda a: a[:-1]), layer.attrs())
    with pytest.raises(ValueError, match="salient_cols int8 \\[nnz, 2\\]"):
        ort_op.gemm_numpy(np.ones((1, 21), np.float32), corrupted(layer, salient_cols=lambda a: a[:, 0]), layer.attrs())


def test_sixteen_bit_columns_up_to_k_65536():
    """The largest K of contract v3: salient columns up to 65535, whose high byte is read (a column of 256 + c
    is not c), through ctypes and an ONNX Runtime session, with an empty row_scales."""
    from sage_export.onnx.ort_check import make_session, op_model

    rng = np.random.default_rng(13)
    n, k = 3, 65536
    mask = np.zeros((n, k), bool)
    mask[0, [0, 255, 256, 257, 40000, 65535]] = True
    mask[2, [1, 65534]] = True
    packed = pack_sage(signs=rng.random((n, k)) < 0.5, group_index=rng.integers(0, 2, (n, k)),
                       group_scales=[0.01, 0.02], salient_mask=mask, salient_q=rng.integers(1, 8, (n, k)),
                       salient_scale=[0.5, 0.5, 0.25], salient_bits=4)
    assert packed.row_scales.shape == (0,) and packed.salient_cols.shape == (8, 2)
    eye_cols = np.array([0, 1, 255, 256, 257, 40000, 65534, 65535])
    x = np.zeros((len(eye_cols), k), np.float32)
    x[np.arange(len(eye_cols)), eye_cols] = 1  # Y = Ŵ[:, eye_cols]ᵀ exactly
    ref = dequantize(packed)[:, eye_cols].T
    assert np.array_equal(ort_op.gemm_numpy(x, packed.tensors(), packed.attrs()), ref)
    session = make_session(op_model(packed, np.float32, x_rank=2).SerializeToString(), custom_op=True)
    assert np.array_equal(session.run(["Y"], {"X": x})[0], ref)


def test_non_finite_row_scales_give_the_dense_decode():
    """PackedLinear refuses non-finite scales, but the library reads raw buffers: a row whose r_n is ±inf or NaN must
    come out as X·Ŵᵀ of the contract's decode, never leak into other rows, on decode steps too. The ±inf rows have
    every sign bit set (salient positions too) and X > 0, so the reference gives ±inf there, where a kernel that
    factors r_n out and then takes the salient positions' r_n·α back out would give inf − inf = NaN: the fused
    kernel must leave such a row's block to the decoding path."""
    rng = np.random.default_rng(11)
    layer = layer_case(rng, 70, 45, 6, 0.1, 4)
    tensors = {name: array.copy() for name, array in layer.tensors().items()}
    bad_rows = [5, 40, 66]  # one in each 32-row block
    assert np.all(np.diff(tensors["salient_rowptr"])[bad_rows] > 0)
    tensors["row_scales"][bad_rows] = np.array([np.nan, np.inf, -np.inf], np.float16)
    tensors["sign_bits"][bad_rows] = np.array([-1] * 5 + [0x1F], np.int8)  # K = 45: 5 bits in the last byte
    w = decode(45, **tensors)
    good = np.setdiff1d(np.arange(70), bad_rows)
    for m in (1, 3, 8):
        x = np.abs(rng.standard_normal((m, 45))).astype(np.float32) + 0.01
        got = ort_op.gemm_numpy(x, tensors, layer.attrs())
        with np.errstate(invalid="ignore"):
            ref = x @ w.T
        assert np.isnan(ref[:, 5]).all() and np.isposinf(ref[:, 40]).all() and np.isneginf(ref[:, 66]).all()
        assert np.array_equal(got[:, bad_rows], ref[:, bad_rows], equal_nan=True)
        assert rel_err(got[:, good], ref[:, good]) <= TOL["float32"]


def ort_op_numpy_tensor(array, name):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def test_a_garbled_rowptr_is_clamped_not_followed(layer):
    """As in the CUDA kernels: row pointers are clamped to [0, nnz], so a bad list loses entries, never reads
    outside its arrays. All pointers past the end: no row owns an entry, and Y is that of the same bitmaps with an
    empty salient list."""
    x = np.random.default_rng(5).standard_normal((3, 21)).astype(np.float32)
    got = ort_op.gemm_numpy(x, corrupted(layer, salient_rowptr=lambda a: np.full_like(a, 2**31 - 1)), layer.attrs())
    no_salient = PackedLinear.from_tensors(
        {**layer.tensors(), "salient_rowptr": np.zeros(13, np.int32), "salient_cols": np.zeros((0, 2), np.int8),
         "salient_q": np.zeros(0, np.int8)}, **layer.attrs())
    assert rel_err(got, sage_binary_gemm_packed(x, no_salient)) <= TOL["float32"]


# ----------------------------------------------------------------------------------------------- fallback


def test_without_the_library_sessions_run_the_function_body(tmp_path):
    """No library: the session still runs (function body), gives the reference's numbers, and says so once."""
    from sage_export.onnx.ort_check import op_model, random_packed

    packed = random_packed(np.random.default_rng(6), 9, 30, 4, 0.1)
    (tmp_path / "model.onnx").write_bytes(op_model(packed, np.float32, x_rank=2).SerializeToString())
    np.save(tmp_path / "x.npy", np.random.default_rng(7).standard_normal((4, 30)).astype(np.float32))
    code = ("import numpy as np, sys; from sage_export.onnx.ort_check import make_session; "
            f"d = {str(tmp_path)!r}; x = np.load(d + '/x.npy'); "
            "ys = [make_session(d + '/model.onnx') for _ in range(2)]; "
            "print(ys[0].sage_runtime); np.save(d + '/y.npy', ys[1].run(['Y'], {'X': x})[0])")
    env = {**os.environ, "SAGE_ORT_LIB": str(tmp_path / "missing" / "libsage_ort.so")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("function body")
    assert done.stderr.count("the SageBinaryGemm library is not used") == 1
    assert "missing/libsage_ort.so is not built" in done.stderr
    y = np.load(tmp_path / "y.npy")
    assert rel_err(y, sage_binary_gemm_packed(np.load(tmp_path / "x.npy"), packed)) <= TOL["float32"]


def test_switched_off_library_is_reported(monkeypatch):
    from sage_export.onnx.ort_check import make_session, op_model, random_packed

    monkeypatch.setenv(ort_op.ENV_SWITCH, "0")
    assert not ort_op.available()
    assert ort_op.describe() == ort_op.FUNCTION_BODY
    with pytest.raises(RuntimeError, match="required but not available"):
        make_session(op_model(random_packed(np.random.default_rng(8), 4, 8, 2)).SerializeToString(), custom_op=True)


def test_bench_ort_dense_copy_keeps_row_scales_and_bias(tmp_path):
    """tools/bench_ort.py's fp32 variant: each node becomes MatMul on the decoded Ŵ (row_scales included, read from
    input 8, [N] or empty) and an Add of the bias at input 9; it must give the op's numbers."""
    import onnx
    import onnxruntime as ort

    from sage_export.onnx.ort_check import op_model

    sys.path.insert(0, str(REPO / "tools"))
    import bench_ort

    rng = np.random.default_rng(12)
    for bias, row_scales in ((None, True), (rng.standard_normal(20).astype(np.float32), False)):
        packed = layer_case(rng, 20, 33, 3, 0.1, 4, row_scales)
        onnx.save(op_model(packed, np.float32, bias, x_rank=2), str(tmp_path / "op.onnx"))
        dense = bench_ort.dense_copy(tmp_path / "op.onnx", tmp_path / "dense")
        assert "SageBinaryGemm" not in {node.op_type for node in onnx.load(str(dense)).graph.node}
        session = ort.InferenceSession(str(dense), providers=["CPUExecutionProvider"])
        x = rng.standard_normal((5, 33)).astype(np.float32)
        got = session.run(["Y"], {"X": x})[0]
        assert rel_err(got, sage_binary_gemm_packed(x, packed, bias)) <= TOL["float32"]


# ----------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_logits_custom_op_against_function_body(smollm2_dir, tmp_path_factory):
    """All 210 quantized layers of SmolLM2-135M: the library's session against the function body's, one prefill
    of 64 tokens. Both compute float32 sums of the same Ŵ, so only the summation order differs."""
    from sage_export.models import load_model
    from sage_export.onnx.export import export_quantized_onnx
    from sage_export.onnx.ort_check import decoder_feeds, make_session

    sys.path.insert(0, str(TESTS_DIR))
    from test_onnx_export import pack_model

    loaded = load_model(smollm2_dir)
    packed = pack_model(loaded.model, loaded.architecture)
    result = export_quantized_onnx(loaded.model, loaded.architecture, packed, tmp_path_factory.mktemp("ort_op"))
    del loaded
    ids = np.random.default_rng(9).integers(0, 49152, (1, 64))
    logits = {}
    for use_library in (True, False):
        session = make_session(result.onnx_path, constant_folding=False, custom_op=use_library)
        assert session.sage_runtime.startswith("custom op" if use_library else "function body")
        logits[use_library] = session.run(["logits"], decoder_feeds(session, ids))[0]
        del session
    native, body = logits[True].astype(np.float64), logits[False].astype(np.float64)
    assert np.linalg.norm(native - body) / np.linalg.norm(body) <= 1e-5
    assert (native.argmax(-1) == body.argmax(-1)).mean() >= 63 / 64


# ----------------------------------------------------------------------------------------------- SageLinear


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_sage_linear_on_cpu_uses_the_library(dtype):
    """SageLinear's CPU forward runs the same kernel (no dense Ŵ), and agrees with its torch decode; with a
    gradient to compute it keeps the torch path, whose backward works."""
    import torch

    from sage_export.runtime.sage_linear import SageLinear

    rng = np.random.default_rng(10)
    packed = layer_case(rng, 70, 45, 6, 0.1, 4)
    bias = torch.from_numpy(rng.standard_normal(70).astype(np.float32))
    layer = SageLinear(packed, bias).to(getattr(torch, dtype))
    tol = {"float32": TOL["float32"], "float16": TOL["float16"], "bfloat16": 1e-2}[dtype]
    for shape in ((1, 45), (2, 3, 45), (40, 45)):
        x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(getattr(torch, dtype))
        with torch.no_grad():
            native, reference = layer.forward_cpu(x), layer.forward_reference(x)
            assert torch.equal(layer(x), native)
        assert native.dtype == x.dtype and native.shape == (*shape[:-1], 70)
        assert rel_err(native.float().numpy(), reference.float().numpy()) <= tol
    x = torch.randn(3, 45, dtype=getattr(torch, dtype), requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# ----------------------------------------------------------------------------------------------- commands


def test_eval_and_generate_of_an_export_report_the_library(tiny_llama_dir, tmp_path, capsys):
    """`sage-export eval` of an exported model runs ONNX Runtime with the library (same perplexity as the
    function body), and `generate` prints its timings and the path that ran."""
    sys.path.insert(0, str(TESTS_DIR))
    from test_onnx_export import export_tiny

    from sage_export.cli import main
    from sage_export.eval.perplexity import read_eval_text, tokenize_text
    from sage_export.onnx.ort_check import make_session, perplexity_ort

    loaded, _, result = export_tiny(tiny_llama_dir, tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)  # an `export` directory with its tokenizer beside model.onnx
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    assert main(["eval", str(tmp_path), "--eval-text", str(text), "--ctx", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "by the custom op" in report["runtime"]
    body = make_session(result.onnx_path, constant_folding=False, custom_op=False)
    reference = perplexity_ort(body, tokenize_text(loaded.tokenizer, read_eval_text(text)), 64)
    assert report["ppl"] == pytest.approx(reference.ppl, rel=1e-4)

    assert main(["generate", str(tmp_path), "--prompt", "The quick brown", "--max-new-tokens", "6"]) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("[session start") and "tokens/s" in summary and "by the custom op" in summary
