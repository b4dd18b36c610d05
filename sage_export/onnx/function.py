"""The model-local ONNX function `sage::SageBinaryGemm` (contract v3, docs/sage_binary_gemm.md).

It decodes Ŵ [N, K] from the packed inputs with standard ops only, then computes Y = X·Ŵᵀ (+ bias) in float32 and
casts Y to X's type. ONNX Runtime inlines the function; where every packed input is an initializer its constant
folding then turns the decode into a dense float weight (fast, but the session holds float32 weights).

Decoding, step by step:
  bits:    int8 [..., C] --Cast UINT8, BitShift RIGHT by 0..7, BitwiseAnd 1--> [..., C, 8] --> [..., 8C] --> [..., K]
  signs:   bit 1 -> +1, 0 -> -1
  groups:  g = Σ_p plane_p << p, a ReduceSum over the P planes (an empty sum, all zeros, when G = 1)
  Ŵ:       Gather(group_scales, g) · sign · r_n (exact in float32), then ScatterND writes
           salient_scale[row] · q at the salient positions
  r_n:     the first N of row_scales followed by N ones: row_scales itself, or all ones where it is empty
  columns: the [nnz, 2] bytes as uint8, dotted with [1, 256] (a little-endian uint16 each)
  rows of the CSR entries: mark every row start with ScatterElements(add) (several rows may start at the same
  entry when some rows are empty), then a CumSum turns the marks into row indices.

Attributes: in_features (K) and out_features (N) are read through attribute references (they fix the slice that
drops the padding bits and the output shape); n_groups and salient_bits are implied by the tensors (number of
planes, range of q) and the body does not need them; the plugin strings are for TensorRT only.

Bias: the body passes it to Gemm's optional C input, which is how an absent bias needs no branch (a function body
cannot Cast an input that may be missing: ORT rejects the inlined node). Gemm adds C in float32, so this function
takes a float32 bias only, for either X type. The exporter never feeds one: a Linear's bias stays a separate Add.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import FunctionProto, NodeProto, TensorProto, helper, numpy_helper

DOMAIN = "sage"
OP_TYPE = "SageBinaryGemm"
FUNCTION_VERSION = 3  # the `sage` domain opset: contract v3
MIN_OPSET = 18  # BitwiseAnd first appears in opset 18

INPUTS = ["X", "sign_bits", "group_codes", "group_scales", "salient_rowptr", "salient_cols", "salient_q",
          "salient_scale", "row_scales", "bias"]
INT_ATTRIBUTES = ["in_features", "out_features", "n_groups", "salient_bits"]
PLUGIN_ATTRIBUTES = {"plugin_namespace": "sage", "plugin_version": "3"}


def _const(name: str, array: np.ndarray) -> NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def _int_attr_as_1d(name: str, attribute: str) -> list[NodeProto]:
    """A 1-D int64 tensor [value of the function attribute], via an attribute reference."""
    scalar = helper.make_node("Constant", [], [f"{name}_scalar"])
    scalar.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name=attribute))
    return [scalar, helper.make_node("Reshape", [f"{name}_scalar", "one_1d"], [name])]


def _constants() -> list[NodeProto]:
    return [
        _const("shifts", np.arange(8, dtype=np.uint8)),
        _const("one_u8", np.array(1, dtype=np.uint8)),
        _const("one_1d", np.array([1], dtype=np.int64)),
        _const("zero_1d", np.array([0], dtype=np.int64)),
        _const("minus_one_1d", np.array([-1], dtype=np.int64)),
        _const("axis0", np.array([0], dtype=np.int64)),
        _const("plane_axes", np.array([1, 2], dtype=np.int64)),
        _const("last_axis", np.array([-1], dtype=np.int64)),
        _const("eight", np.array([8], dtype=np.int64)),
        _const("zero_i64", np.array(0, dtype=np.int64)),
        _const("byte_weights", np.array([1, 256], dtype=np.int64)),
        _const("one_i64", np.array(1, dtype=np.int64)),
        _const("plus_one_f", np.array(1.0, dtype=np.float32)),
        _const("minus_one_f", np.array(-1.0, dtype=np.float32)),
    ]


def _unpack(prefix: str, packed: str, lead_shape: str) -> list[NodeProto]:
    """int8 [..., C] -> uint8 {0,1} [..., K]: bit j of byte c becomes column 8c+j, padding columns dropped.
    `lead_shape` is the shape of the leading dims; the flat width 8C is spelled out so a zero-sized
    leading dim (G = 1: no planes) reshapes without a -1 to infer."""
    p = prefix
    return [
        helper.make_node("Cast", [packed], [f"{p}_u8"], to=TensorProto.UINT8),
        helper.make_node("Unsqueeze", [f"{p}_u8", "last_axis"], [f"{p}_col"]),
        helper.make_node("BitShift", [f"{p}_col", "shifts"], [f"{p}_shifted"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [f"{p}_shifted", "one_u8"], [f"{p}_bits8"]),
        helper.make_node("Concat", [lead_shape, "width8"], [f"{p}_flat_shape"], axis=0),
        helper.make_node("Reshape", [f"{p}_bits8", f"{p}_flat_shape"], [f"{p}_flat"]),
        helper.make_node("Slice", [f"{p}_flat", "zero_1d", "K", "last_axis"], [f"{p}_unpacked"]),
    ]


def _signs() -> list[NodeProto]:
    return [
        helper.make_node("Shape", ["sign_bits"], ["sign_lead"], end=1),
        *_unpack("sign", "sign_bits", "sign_lead"),
        helper.make_node("Cast", ["sign_unpacked"], ["sign_bool"], to=TensorProto.BOOL),
        helper.make_node("Where", ["sign_bool", "plus_one_f", "minus_one_f"], ["sign_pm1"]),
    ]


def _group_values() -> list[NodeProto]:
    """alpha[n, k] = group_scales[g(n, k)] in float32."""
    return [
        helper.make_node("Shape", ["group_codes"], ["codes_lead"], end=2),
        *_unpack("codes", "group_codes", "codes_lead"),
        # Weight of plane p is 1 << p, shaped [P, 1, 1] to broadcast over [P, N, K].
        helper.make_node("Shape", ["group_codes"], ["n_planes_1d"], start=0, end=1),
        helper.make_node("Squeeze", ["n_planes_1d", "axis0"], ["n_planes"]),
        helper.make_node("Range", ["zero_i64", "n_planes", "one_i64"], ["plane_ids"]),
        helper.make_node("Cast", ["plane_ids"], ["plane_ids_u8"], to=TensorProto.UINT8),
        helper.make_node("Unsqueeze", ["plane_ids_u8", "plane_axes"], ["plane_shift"]),
        helper.make_node("BitShift", ["codes_unpacked", "plane_shift"], ["codes_weighted"], direction="LEFT"),
        # int32, not int64: when ORT folds the decode, every [N, K] intermediate is held until folding ends.
        helper.make_node("Cast", ["codes_weighted"], ["codes_i32"], to=TensorProto.INT32),
        helper.make_node("ReduceSum", ["codes_i32", "axis0"], ["group_index_raw"], keepdims=0),
        # Codes at salient positions are never read (their value is overwritten below) and need not be < G in a
        # non-canonical packing, so clamp before the Gather rather than index out of range.
        helper.make_node("Shape", ["group_scales"], ["n_groups_1d"]),
        helper.make_node("Sub", ["n_groups_1d", "one_1d"], ["last_group_i64"]),
        helper.make_node("Cast", ["last_group_i64"], ["last_group"], to=TensorProto.INT32),
        helper.make_node("Min", ["group_index_raw", "last_group"], ["group_index"]),
        helper.make_node("Cast", ["group_scales"], ["group_scales_f"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["group_scales_f", "group_index"], ["alpha"], axis=0),
    ]


def _salient_rows() -> list[NodeProto]:
    """Row index of every CSR entry, int64 [nnz]: row = number of row ends (rowptr[1:N]) at or before the entry."""
    return [
        helper.make_node("Cast", ["salient_rowptr"], ["rowptr"], to=TensorProto.INT64),
        helper.make_node("Shape", ["salient_cols"], ["nnz_1d"], start=0, end=1),
        helper.make_node("Add", ["nnz_1d", "one_1d"], ["nnz_plus_one"]),
        helper.make_node("ConstantOfShape", ["nnz_plus_one"], ["marks_zero"],
                         value=numpy_helper.from_array(np.array([0], dtype=np.int64))),
        helper.make_node("Slice", ["rowptr", "one_1d", "minus_one_1d", "axis0"], ["row_starts"]),
        helper.make_node("Shape", ["row_starts"], ["n_starts"]),
        helper.make_node("Expand", ["one_i64", "n_starts"], ["ones_starts"]),
        helper.make_node("ScatterElements", ["marks_zero", "row_starts", "ones_starts"], ["marks"], axis=0,
                         reduction="add"),
        helper.make_node("CumSum", ["marks", "zero_i64"], ["rows_plus"]),
        helper.make_node("Slice", ["rows_plus", "zero_1d", "nnz_1d", "axis0"], ["salient_row"]),
    ]


def _dense_weight() -> list[NodeProto]:
    """Ŵ float32 [N, K]: the binarised value everywhere, then the salient values written over their positions."""
    return [
        helper.make_node("Mul", ["alpha", "sign_pm1"], ["w_unit"]),
        helper.make_node("Cast", ["row_scales"], ["row_scales_f"], to=TensorProto.FLOAT),
        helper.make_node("ConstantOfShape", ["N"], ["ones_n"],
                         value=numpy_helper.from_array(np.array([1.0], dtype=np.float32))),
        helper.make_node("Concat", ["row_scales_f", "ones_n"], ["row_mult_padded"], axis=0),
        helper.make_node("Slice", ["row_mult_padded", "zero_1d", "N", "axis0"], ["row_mult_f"]),
        helper.make_node("Unsqueeze", ["row_mult_f", "last_axis"], ["row_mult_col"]),
        helper.make_node("Mul", ["w_unit", "row_mult_col"], ["w_binary"]),
        helper.make_node("Cast", ["salient_cols"], ["cols_u8"], to=TensorProto.UINT8),
        helper.make_node("Cast", ["cols_u8"], ["cols_bytes"], to=TensorProto.INT64),
        helper.make_node("Mul", ["cols_bytes", "byte_weights"], ["cols_parts"]),
        helper.make_node("ReduceSum", ["cols_parts", "last_axis"], ["cols_i64"], keepdims=0),
        helper.make_node("Unsqueeze", ["salient_row", "last_axis"], ["row_col1"]),
        helper.make_node("Unsqueeze", ["cols_i64", "last_axis"], ["col_col1"]),
        helper.make_node("Concat", ["row_col1", "col_col1"], ["salient_index"], axis=1),
        helper.make_node("Cast", ["salient_scale"], ["row_scale_f"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["row_scale_f", "salient_row"], ["entry_scale"], axis=0),
        helper.make_node("Cast", ["salient_q"], ["q_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["entry_scale", "q_f"], ["salient_values"]),
        helper.make_node("ScatterND", ["w_binary", "salient_index", "salient_values"], ["w_hat"]),
    ]


def _gemm() -> list[NodeProto]:
    """Y [..., N] = X [..., K] · Ŵᵀ (+ bias) in float32, returned in X's type."""
    return [
        helper.make_node("Cast", ["X"], ["x_f"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["minus_one_1d", "K"], ["x_2d_shape"], axis=0),
        helper.make_node("Reshape", ["x_f", "x_2d_shape"], ["x_2d"]),
        helper.make_node("Gemm", ["x_2d", "w_hat", "bias"], ["y_2d"], transB=1),
        helper.make_node("Shape", ["X"], ["x_lead"], end=-1),
        helper.make_node("Concat", ["x_lead", "N"], ["y_shape"], axis=0),
        helper.make_node("Reshape", ["y_2d", "y_shape"], ["y_f"]),
        helper.make_node("CastLike", ["y_f", "X"], ["Y"]),
    ]


def sage_binary_gemm_function(opset: int = MIN_OPSET) -> FunctionProto:
    """The FunctionProto; `opset` must equal the model's default-domain opset (the checker requires it).
    Nodes are listed in execution order: each helper's inputs are produced by the helpers before it."""
    if opset < MIN_OPSET:
        raise ValueError(f"SageBinaryGemm's function body needs opset >= {MIN_OPSET}, got {opset}")
    nodes = [
        *_constants(),
        *_int_attr_as_1d("K", "in_features"),
        *_int_attr_as_1d("N", "out_features"),
        helper.make_node("Shape", ["sign_bits"], ["n_bytes"], start=-1),
        helper.make_node("Mul", ["n_bytes", "eight"], ["width8"]),
        *_signs(),
        *_group_values(),
        *_salient_rows(),
        *_dense_weight(),
        *_gemm(),
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, INPUTS, ["Y"], nodes, [helper.make_opsetid("", opset)],
        attributes=INT_ATTRIBUTES + list(PLUGIN_ATTRIBUTES),
    )


def sage_attributes(attrs: dict[str, int]) -> dict[str, int | str]:
    """The attributes of one SageBinaryGemm node: the contract's four ints plus the plugin strings."""
    missing = [a for a in INT_ATTRIBUTES if a not in attrs]
    if missing:
        raise ValueError(f"SageBinaryGemm: missing attributes {missing}")
    return {**{a: int(attrs[a]) for a in INT_ATTRIBUTES}, **PLUGIN_ATTRIBUTES}


def sage_node(inputs: list[str], output: str, name: str, attrs: dict[str, int]) -> NodeProto:
    return helper.make_node(OP_TYPE, inputs, [output], name=name, domain=DOMAIN, **sage_attributes(attrs))


def add_function(model: onnx.ModelProto) -> None:
    """Attach the function and the `sage` opset import to a model (idempotent)."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if not any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions):
        model.functions.append(sage_binary_gemm_function(opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, FUNCTION_VERSION))
