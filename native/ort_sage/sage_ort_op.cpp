// `sage::SageBinaryGemm` (contract v3, docs/sage_binary_gemm.md) as an ONNX Runtime custom op on the CPU execution
// provider.
//
// Loaded with SessionOptions.register_custom_ops_library(path): ONNX Runtime calls RegisterCustomOps, which adds
// the `sage` domain with two kernels, one for float32 X and one for float16 X (the other inputs have one type
// each). A node that this library runs is not inlined into the model-local function of the same name, so the
// session never decodes a dense weight. Inputs are checked here (shapes against the attributes) and in
// sage_cpu_gemm (values); anything wrong comes back as an error status from Run, never a crash.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "ort_abi.h"
#include "sage_cpu.h"

namespace {

const OrtApi* g_api = nullptr;

constexpr size_t kInputs = 10;  // X, eight packed tensors (row_scales at 8 since contract v2), optional bias
constexpr size_t kSalientCols = 5, kSalientQ = 6, kRowScales = 8;
constexpr size_t kRequiredInputs = 9;
constexpr const char* kInputNames[kInputs] = {"X", "sign_bits", "group_codes", "group_scales", "salient_rowptr",
                                             "salient_cols", "salient_q", "salient_scale", "row_scales", "bias"};
constexpr ONNXTensorElementDataType kPackedTypes[kInputs] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,  // X: float32 or float16, one kernel each
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32,   ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

struct Kernel {
  int64_t k, n, groups, salient_bits;
  ONNXTensorElementDataType x_type;
};

struct Tensor {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  void* data = nullptr;
};

OrtStatus* error(const std::string& msg) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, ("SageBinaryGemm: " + msg).c_str());
}

std::string shape_text(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

OrtStatus* read_tensor(const OrtValue* value, Tensor& out) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* s = g_api->GetTensorTypeAndShape(value, &info)) return s;
  size_t rank = 0;
  OrtStatus* s = g_api->GetTensorElementType(info, &out.type);
  if (!s) s = g_api->GetDimensionsCount(info, &rank);
  if (!s) {
    out.dims.resize(rank);
    s = g_api->GetDimensions(info, out.dims.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (!s) s = g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &out.data);
  out.present = (s == nullptr);
  return s;
}

// The shapes and types the contract gives each packed input, for this node's attributes and nnz (the length of
// salient_q; salient_cols is [nnz, 2], two bytes a column since contract v3).
std::string check_inputs(const Kernel& kn, const Tensor (&t)[kInputs]) {
  const int64_t bytes = (kn.k + 7) / 8;
  int64_t planes = 0;
  while ((int64_t{1} << planes) < kn.groups) ++planes;
  for (size_t i = 0; i < kRequiredInputs; ++i)
    if (!t[i].present) return std::string("input ") + kInputNames[i] + " is missing";
  if (t[kSalientQ].dims.size() != 1)
    return "input salient_q has shape " + shape_text(t[kSalientQ].dims) + ", expected [nnz]";
  const int64_t nnz = t[kSalientQ].dims[0];
  const std::vector<int64_t> expected[kInputs] = {
      {}, {kn.n, bytes}, {planes, kn.n, bytes}, {kn.groups}, {kn.n + 1}, {nnz, 2}, {nnz}, {kn.n}, {kn.n}, {kn.n}};
  for (size_t i = 1; i < kInputs; ++i) {
    if (!t[i].present) continue;
    if (t[i].type != kPackedTypes[i])
      return std::string("input ") + kInputNames[i] + " has element type " + std::to_string(t[i].type) +
             ", expected " + std::to_string(kPackedTypes[i]);
    if (i == kRowScales && t[i].dims == std::vector<int64_t>{0}) continue;  // empty: every r_n is 1 (v3)
    if (t[i].dims != expected[i])
      return std::string("input ") + kInputNames[i] + " has shape " + shape_text(t[i].dims) + ", expected " +
             shape_text(expected[i]) + (i == kRowScales ? " or [0]" : "") + " for K=" + std::to_string(kn.k) +
             ", N=" + std::to_string(kn.n) + ", G=" + std::to_string(kn.groups);
  }
  const Tensor& x = t[0];
  if (x.type != kn.x_type) return "X has element type " + std::to_string(x.type);
  if (x.dims.empty() || x.dims.back() != kn.k)
    return "X has shape " + shape_text(x.dims) + ", expected [..., " + std::to_string(kn.k) + "]";
  return "";
}

OrtStatus* compute_checked(void* kernel, OrtKernelContext* context);

OrtStatus* compute(void* kernel, OrtKernelContext* context) {
  try {  // no C++ exception may cross back into ONNX Runtime
    return compute_checked(kernel, context);
  } catch (const std::exception& e) {
    return error(std::string("internal error: ") + e.what());
  }
}

OrtStatus* compute_checked(void* kernel, OrtKernelContext* context) {
  const Kernel& kn = *static_cast<const Kernel*>(kernel);
  size_t count = 0;
  if (OrtStatus* s = g_api->KernelContext_GetInputCount(context, &count)) return s;
  Tensor t[kInputs];
  for (size_t i = 0; i < count && i < kInputs; ++i) {
    const OrtValue* value = nullptr;
    if (OrtStatus* s = g_api->KernelContext_GetInput(context, i, &value)) return s;
    if (value)  // an absent optional input (bias) is null
      if (OrtStatus* s = read_tensor(value, t[i])) return s;
  }
  const std::string bad = check_inputs(kn, t);
  if (!bad.empty()) return error(bad);
  const int64_t nnz = t[kSalientQ].dims[0];
  // salient_cols' bytes are read as uint16_t (little-endian, as every target): ONNX Runtime's buffers are aligned,
  // but a 2-byte-misaligned one (e.g. an int8 initializer mapped from an external file) is copied, not misread.
  std::vector<uint16_t> aligned_cols;
  const void* cols = t[kSalientCols].data;
  if (reinterpret_cast<uintptr_t>(cols) % alignof(uint16_t) != 0) {
    aligned_cols.resize(static_cast<size_t>(nnz));
    std::memcpy(aligned_cols.data(), cols, sizeof(uint16_t) * aligned_cols.size());
    cols = aligned_cols.data();
  }

  std::vector<int64_t> out_dims(t[0].dims.begin(), t[0].dims.end() - 1);
  int64_t m = 1;
  for (int64_t d : out_dims) m *= d;
  out_dims.push_back(kn.n);
  OrtValue* y = nullptr;
  if (OrtStatus* s = g_api->KernelContext_GetOutput(context, 0, out_dims.data(), out_dims.size(), &y)) return s;
  void* y_data = nullptr;
  if (OrtStatus* s = g_api->GetTensorMutableData(y, &y_data)) return s;

  SageCpuArgs args{};
  args.x = t[0].data;
  args.sign_bits = static_cast<const uint8_t*>(t[1].data);
  args.group_codes = static_cast<const uint8_t*>(t[2].data);
  args.group_scales = static_cast<const uint16_t*>(t[3].data);
  args.salient_rowptr = static_cast<const int32_t*>(t[4].data);
  args.salient_cols = static_cast<const uint16_t*>(cols);
  args.salient_q = static_cast<const int8_t*>(t[6].data);
  args.salient_scale = static_cast<const uint16_t*>(t[7].data);
  // [0]: null, every r_n is 1
  args.row_scales = t[kRowScales].dims[0] ? static_cast<const uint16_t*>(t[kRowScales].data) : nullptr;
  args.bias = t[9].present ? static_cast<const float*>(t[9].data) : nullptr;
  args.y = y_data;
  args.m = m;
  args.nnz = nnz;
  args.k = static_cast<int32_t>(kn.k);
  args.n = static_cast<int32_t>(kn.n);
  args.n_groups = static_cast<int32_t>(kn.groups);
  args.salient_bits = static_cast<int32_t>(kn.salient_bits);
  args.x_dtype = kn.x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? SAGE_CPU_FLOAT16 : SAGE_CPU_FLOAT32;
  char err[512];
  if (sage_cpu_gemm(&args, err, sizeof err) != 0) return error(err);
  return nullptr;
}

// ------------------------------------------------------------------------------------------- OrtCustomOp

struct SageOp : OrtCustomOp {
  ONNXTensorElementDataType x_type;
};

const SageOp* as_sage(const OrtCustomOp* op) { return static_cast<const SageOp*>(op); }

OrtStatusPtr create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  int64_t attrs[4];
  const char* names[4] = {"in_features", "out_features", "n_groups", "salient_bits"};
  for (int i = 0; i < 4; ++i)
    if (OrtStatus* s = api->KernelInfoGetAttribute_int64(info, names[i], &attrs[i])) return s;
  char err[256];
  if (sage_cpu_check_attrs(attrs[0], attrs[1], attrs[2], attrs[3], err, sizeof err) != 0) return error(err);
  *out = new Kernel{attrs[0], attrs[1], attrs[2], attrs[3], as_sage(op)->x_type};
  return nullptr;
}

ONNXTensorElementDataType input_type(const OrtCustomOp* op, size_t i) {
  return i == 0 ? as_sage(op)->x_type : kPackedTypes[i];
}

SageOp make_op(ONNXTensorElementDataType x_type) {
  SageOp op{};
  op.version = kSageOrtApiVersion;
  op.GetName = [](const OrtCustomOp*) { return "SageBinaryGemm"; };
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return "CPUExecutionProvider"; };
  op.GetInputType = input_type;
  op.GetInputTypeCount = [](const OrtCustomOp*) { return kInputs; };
  op.GetOutputType = [](const OrtCustomOp* o, size_t) { return as_sage(o)->x_type; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) { return size_t{1}; };
  op.KernelDestroy = [](void* k) { delete static_cast<Kernel*>(k); };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
    return i == kInputs - 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.x_type = x_type;
  return op;
}

const SageOp g_float_op = make_op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
const SageOp g_half_op = make_op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* api_base) {
  g_api = api_base->GetApi(kSageOrtApiVersion);
  if (!g_api) {  // an ONNX Runtime older than 1.16: report through the version-1 table, which every one has
    const OrtApi* v1 = api_base->GetApi(1);
    return v1 ? v1->CreateStatus(ORT_FAIL, "the sage custom op library needs ONNX Runtime 1.16 or later") : nullptr;
  }
  OrtCustomOpDomain* domain = nullptr;
  // The ops declare API version 16, which has no GetStartVersion/GetEndVersion: they match every opset version
  // of the `sage` domain, version 3 (contract v3) included; the input types are what refuse an older node (v2's
  // salient_cols is int32, v1's input 8 the float32 bias) when the session is made.
  // The domain must outlive every session made with these options; it is a few bytes, so it is never released.
  if (OrtStatus* s = g_api->CreateCustomOpDomain("sage", &domain)) return s;
  if (OrtStatus* s = g_api->CustomOpDomain_Add(domain, &g_float_op)) return s;
  if (OrtStatus* s = g_api->CustomOpDomain_Add(domain, &g_half_op)) return s;
  return g_api->AddCustomOpDomain(options, domain);
}

// For callers that want to know what they loaded (sage_export.runtime.ort_op reads them through ctypes).
extern "C" __attribute__((visibility("default"))) const char* sage_ort_library_info() {
  static char text[96];
  std::snprintf(text, sizeof text, "sage custom op, ABI %d, %s kernels, %d threads", sage_cpu_abi_version(),
                sage_cpu_isa(), sage_cpu_threads());
  return text;
}
