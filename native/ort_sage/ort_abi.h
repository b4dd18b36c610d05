// The part of ONNX Runtime's C ABI that the SageBinaryGemm custom op uses, transcribed from the official
// header onnxruntime_c_api.h (Copyright (c) Microsoft Corporation, MIT licence: LICENSE-onnxruntime.txt beside
// this file). Names, types and order are the header's; members this library never calls are kept as unnamed
// pointer slots so every named member sits at the offset the header gives it (checked by the static_asserts).
//
// Why not the whole header: no package on the registries this project may use (PyPI, npm, Debian bookworm)
// ships it (checked: onnxruntime, onnxruntime-extensions, onnx-extended, onnxruntime-genai-core,
// sherpa-onnx-core, onnxruntime-node, onnxruntime-react-native). The ABI is append-only: OrtApi slots 0..101
// are "version 1, do not modify" in the header, and the OrtCustomOp members up to KernelComputeV2 were fixed by
// API version 16, so this subset stays valid for every ONNX Runtime from 1.16 on.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

typedef enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 = 3,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16 = 4,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16 = 5,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 = 7,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING = 8,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL = 9,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
} ONNXTensorElementDataType;

typedef enum OrtErrorCode {
  ORT_OK = 0,
  ORT_FAIL = 1,
  ORT_INVALID_ARGUMENT = 2,
} OrtErrorCode;

typedef enum OrtMemType { OrtMemTypeDefault = 0 } OrtMemType;

typedef enum OrtCustomOpInputOutputCharacteristic {
  INPUT_OUTPUT_REQUIRED = 0,
  INPUT_OUTPUT_OPTIONAL = 1,
  INPUT_OUTPUT_VARIADIC = 2,
} OrtCustomOpInputOutputCharacteristic;

struct OrtStatus;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtShapeInferContext;
struct OrtApi;

typedef OrtStatus* OrtStatusPtr;

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

struct OrtApi {
  OrtStatus* (*CreateStatus)(OrtErrorCode code, const char* msg);                                   // 0
  OrtErrorCode (*GetErrorCode)(const OrtStatus* status);                                            // 1
  const char* (*GetErrorMessage)(const OrtStatus* status);                                          // 2
  void* slots_3_25[23];
  OrtStatusPtr (*CreateCustomOpDomain)(const char* domain, OrtCustomOpDomain** out);                // 26
  OrtStatusPtr (*CustomOpDomain_Add)(OrtCustomOpDomain* domain, const struct OrtCustomOp* op);      // 27
  OrtStatusPtr (*AddCustomOpDomain)(OrtSessionOptions* options, OrtCustomOpDomain* domain);         // 28
  void* slots_29_50[22];
  OrtStatusPtr (*GetTensorMutableData)(OrtValue* value, void** out);                                // 51
  void* slots_52_59[8];
  OrtStatusPtr (*GetTensorElementType)(const OrtTensorTypeAndShapeInfo* info,
                                       ONNXTensorElementDataType* out);                            // 60
  OrtStatusPtr (*GetDimensionsCount)(const OrtTensorTypeAndShapeInfo* info, size_t* out);           // 61
  OrtStatusPtr (*GetDimensions)(const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t n);    // 62
  void* slots_63_64[2];
  OrtStatusPtr (*GetTensorTypeAndShape)(const OrtValue* value, OrtTensorTypeAndShapeInfo** out);    // 65
  void* slots_66_85[20];
  OrtStatusPtr (*KernelInfoGetAttribute_int64)(const OrtKernelInfo* info, const char* name,
                                               int64_t* out);                                      // 86
  void* slot_87;
  OrtStatusPtr (*KernelContext_GetInputCount)(const OrtKernelContext* context, size_t* out);        // 88
  OrtStatusPtr (*KernelContext_GetOutputCount)(const OrtKernelContext* context, size_t* out);       // 89
  OrtStatusPtr (*KernelContext_GetInput)(const OrtKernelContext* context, size_t index,
                                         const OrtValue** out);                                    // 90
  OrtStatusPtr (*KernelContext_GetOutput)(OrtKernelContext* context, size_t index, const int64_t* dims,
                                          size_t dim_count, OrtValue** out);                       // 91
  void* slot_92;
  void (*ReleaseStatus)(OrtStatus* status);                                                         // 93
  void* slots_94_98[5];
  void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo* info);                           // 99
  void* slot_100;
  void (*ReleaseCustomOpDomain)(OrtCustomOpDomain* domain);                                         // 101
};

struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* op_kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* op_kernel);
  // API version 8
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  // API versions 11 to 14
  OrtMemType (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  // API version 16: kernels that return a status instead of throwing across the C boundary
  OrtStatusPtr (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                 void** kernel);
  OrtStatusPtr (*KernelComputeV2)(void* op_kernel, OrtKernelContext* context);
};

}  // extern "C"

// The custom op declares this version: ONNX Runtime reads the members above and none after them.
constexpr uint32_t kSageOrtApiVersion = 16;

static_assert(offsetof(OrtApi, CreateCustomOpDomain) == 26 * sizeof(void*), "OrtApi slot 26");
static_assert(offsetof(OrtApi, GetTensorMutableData) == 51 * sizeof(void*), "OrtApi slot 51");
static_assert(offsetof(OrtApi, GetTensorElementType) == 60 * sizeof(void*), "OrtApi slot 60");
static_assert(offsetof(OrtApi, GetTensorTypeAndShape) == 65 * sizeof(void*), "OrtApi slot 65");
static_assert(offsetof(OrtApi, KernelInfoGetAttribute_int64) == 86 * sizeof(void*), "OrtApi slot 86");
static_assert(offsetof(OrtApi, KernelContext_GetInputCount) == 88 * sizeof(void*), "OrtApi slot 88");
static_assert(offsetof(OrtApi, ReleaseStatus) == 93 * sizeof(void*), "OrtApi slot 93");
static_assert(offsetof(OrtApi, ReleaseTensorTypeAndShapeInfo) == 99 * sizeof(void*), "OrtApi slot 99");
static_assert(offsetof(OrtApi, ReleaseCustomOpDomain) == 101 * sizeof(void*), "OrtApi slot 101");
static_assert(offsetof(OrtCustomOp, KernelComputeV2) == 18 * sizeof(void*), "OrtCustomOp layout");
