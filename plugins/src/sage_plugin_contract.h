// The SageBinaryGemm op contract (v3) as the TensorRT plugin sees it: attributes, the 9 (+ optional bias) inputs,
// and the translation of TensorRT tensors into SageGemmArgs. Pure host code, unit-tested without a GPU.
#pragma once

#include <cstdint>
#include <string>

#include <NvInferRuntime.h>

#include "sage_gemm_api.h"

namespace sage {

constexpr char const* kPluginName = "SageBinaryGemm";
constexpr char const* kPluginVersion = "3";  // contract v3 (16-bit columns, optional row_scales); `sage` opset 3
constexpr char const* kPluginNamespace = "sage";

// Input order of the contract (docs/sage_binary_gemm.md).
enum Input : int32_t {
    kX = 0,
    kSignBits,
    kGroupCodes,
    kGroupScales,
    kSalientRowptr,
    kSalientCols,  // v3: int8 [nnz, 2], each column a little-endian uint16
    kSalientQ,
    kSalientScale,
    kRowScales,  // v2: float16 [N], r_n of each row's unsalient weights; v3: or [0], every r_n = 1
    kBias,       // optional, float32 [N] (input 8 in v1)
};
constexpr int32_t kRequiredInputs = 9;
constexpr int32_t kMaxInputs = 10;

struct SageGemmAttrs {
    int32_t in_features = 0;
    int32_t out_features = 0;
    int32_t n_groups = 0;
    int32_t salient_bits = 0;
};

// Fills `out` from in_features, out_features, n_groups, salient_bits (INT32, or INT64 as ONNX stores integer
// attributes) and checks plugin_namespace / plugin_version when present. Returns "" or what is wrong.
std::string parse_attrs(nvinfer1::PluginFieldCollection const* fc, SageGemmAttrs& out);

// Range checks of the attributes against what the kernels support. Returns "" or what is wrong.
std::string validate_attrs(SageGemmAttrs const& attrs);

// Checks the number of inputs and every known (non -1) dimension against the attributes. Returns "" or the error.
std::string check_input_dims(nvinfer1::Dims const* dims, int32_t nb_inputs, SageGemmAttrs const& attrs);

// supportsFormatCombination: linear layout; X float/half; INT8 packed tensors (salient_cols included, v3); INT32
// salient_rowptr; FP16 scales (group_scales, salient_scale, row_scales); bias float32; output of X's type.
bool supports_io(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* in_out, int32_t nb_inputs,
                 int32_t nb_outputs);

// Rows of X once its leading dimensions are flattened.
int64_t leading_rows(nvinfer1::Dims const& x_dims);

// SageGemmArgs for one enqueue. The bias is used when nb_inputs == kMaxInputs; an empty row_scales becomes NULL.
SageGemmArgs launch_args(SageGemmAttrs const& attrs, nvinfer1::PluginTensorDesc const* input_desc,
                         void const* const* inputs, void* output, int32_t nb_inputs);

}  // namespace sage
