"""The SageBinaryGemm ONNX function, run by ONNX Runtime, against the NumPy reference of the contract."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sage_export.format.sage_layout import dequantize, pack_sage
from sage_export.onnx.function import (DOMAIN, MIN_OPSET, OP_TYPE, PLUGIN_ATTRIBUTES, add_function,
                                       sage_binary_gemm_function)
from sage_export.onnx.ort_check import check_op, op_model, random_packed, run_op
from sage_export.onnx.reference import sage_binary_gemm_packed

# (N, K, G, salient density): K % 8 != 0 in most, G up to 8, nnz = 0, a single output row.
SHAPES = [(24, 13, 1, 0.05), (16, 64, 2, 0.0), (33, 100, 3, 0.1), (8, 70, 4, 0.02), (5, 9, 8, 0.3),
          (1, 17, 2, 0.2), (7, 8, 1, 0.0)]


def assert_matches_reference(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    scale = max(float(np.abs(ref.astype(np.float32)).max()), 1e-6)
    if ref.dtype == np.float32:  # only the summation order differs
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * scale)
    else:  # a float32 sum a few ulps apart may round to the neighbouring float16
        np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=1e-3, atol=1e-3 * scale)


@pytest.mark.parametrize("n,k,g,density", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("packed_as_inputs", [False, True], ids=["initializers", "inputs"])
def test_op_matches_reference(n, k, g, density, dtype, with_bias, packed_as_inputs):
    rng = np.random.default_rng(n * 1000 + k)
    packed = random_packed(rng, n, k, g, density, empty_rows=min(2, n - 1))
    x = rng.standard_normal((2, 3, k)).astype(dtype)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    got = run_op(packed, x, bias, packed_as_inputs)
    assert_matches_reference(got, sage_binary_gemm_packed(x, packed, bias))


@pytest.mark.parametrize("n,k,g,density", SHAPES)
@pytest.mark.parametrize("packed_as_inputs", [False, True], ids=["initializers", "inputs"])
def test_identity_input_decodes_weight_exactly(n, k, g, density, packed_as_inputs):
    """X = I gives Y = Ŵᵀ with one non-zero term per sum, so ORT's decode must equal dequantize() bitwise."""
    packed = random_packed(np.random.default_rng(k), n, k, g, density)
    got = run_op(packed, np.eye(k, dtype=np.float32)[None], packed_as_inputs=packed_as_inputs)[0]
    np.testing.assert_array_equal(got, dequantize(packed).T)


@pytest.mark.parametrize("x_shape", [(19,), (3, 19), (2, 1, 4, 19)])
def test_any_leading_dims(x_shape):
    packed = random_packed(np.random.default_rng(5), 6, 19, 3, 0.1)
    x = np.random.default_rng(6).standard_normal(x_shape).astype(np.float32)
    assert_matches_reference(run_op(packed, x), sage_binary_gemm_packed(x, packed))


def test_known_small_layer():
    """A hand-checkable layer: K = 10, one salient entry in row 1 only."""
    signs = np.array([[1, 0, 1, 1, 0, 0, 0, 1, 1, 0], [0] * 10], dtype=bool)
    groups = np.array([[0, 1, 2, 1, 0, 0, 1, 2, 0, 1], [2] * 10])
    salient = np.zeros((2, 10), dtype=bool)
    salient[1, 3] = True
    q = np.zeros((2, 10), dtype=int)
    q[1, 3] = -5
    packed = pack_sage(signs, groups, [0.5, 1.0, 2.0], salient, q, [0.0, 0.25], salient_bits=4)
    x = np.ones((1, 10), dtype=np.float32)
    # row 0: +0.5 -1 +2 +1 -0.5 -0.5 -1 +2 +0.5 -1 = 2.0; row 1: nine times -2, plus 0.25 * -5 = -19.25
    np.testing.assert_array_equal(run_op(packed, x), np.array([[2.0, -19.25]], dtype=np.float32))


def test_node_and_function_carry_the_contract():
    model = op_model(random_packed(np.random.default_rng(0), 4, 12, 3))
    node = model.graph.node[0]
    assert (node.domain, node.op_type) == (DOMAIN, OP_TYPE)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["in_features"] == 12 and attrs["out_features"] == 4 and attrs["n_groups"] == 3
    assert attrs["salient_bits"] == 4
    assert {k: attrs[k].decode() for k in PLUGIN_ATTRIBUTES} == PLUGIN_ATTRIBUTES
    function = model.functions[0]
    assert (function.domain, function.name) == (DOMAIN, OP_TYPE)
    assert {op.domain: op.version for op in function.opset_import} == {"": MIN_OPSET}
    assert any(op.domain == DOMAIN and op.version == 3 for op in model.opset_import)
    assert len(function.input) == 10 and list(function.output) == ["Y"]


def test_function_opset_follows_the_model_and_refuses_old_opsets():
    assert sage_binary_gemm_function(21).opset_import[0].version == 21
    with pytest.raises(ValueError, match="opset >= 18"):
        sage_binary_gemm_function(17)
    model = op_model(random_packed(np.random.default_rng(1), 3, 9, 2))
    before = len(model.functions), len(model.opset_import)
    add_function(model)
    assert (len(model.functions), len(model.opset_import)) == before  # idempotent


def test_check_op_summary():
    summary = check_op(cases=((6, 11, 1, 0.0), (5, 19, 3, 0.2)), seed=3)
    assert summary["cases"] == 2 * 2 * 2 * 2
    assert summary["max_rel_err"]["float32"] < 1e-5
    assert summary["max_rel_err"]["float16"] < 2e-3
    assert summary["planes"] == [0, 2]


@pytest.mark.parametrize("constant_folding", [True, False])
def test_ort_inlines_the_function_and_folds_the_decode_only_when_allowed(tmp_path, constant_folding):
    """ORT has no kernel for the op: it must inline the body. With constant folding the decode of initializers
    becomes a dense weight (no BitShift left); without it the decode stays in the graph."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    model = op_model(random_packed(np.random.default_rng(2), 6, 20, 4, 0.1))
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=[] if constant_folding else ["ConstantFolding"])
    ops = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert OP_TYPE not in ops
    assert ("BitShift" in ops) is (not constant_folding)


@pytest.mark.parametrize("row_multipliers", [False, True])
@pytest.mark.parametrize("packed_as_inputs", [False, True], ids=["initializers", "inputs"])
def test_contract_v3_wide_columns_and_empty_row_scales(row_multipliers, packed_as_inputs):
    """Columns past 255 need both bytes of their 16-bit storage; an empty row_scales decodes as all ones."""
    packed = random_packed(np.random.default_rng(3), 9, 700, 4, 0.05, row_multipliers=row_multipliers)
    assert packed.columns.max() > 255 and packed.has_row_scales == row_multipliers
    got = run_op(packed, np.eye(700, dtype=np.float32)[None], packed_as_inputs=packed_as_inputs)[0]
    np.testing.assert_array_equal(got, dequantize(packed).T)
