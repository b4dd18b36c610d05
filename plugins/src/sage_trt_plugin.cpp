#include "sage_trt_plugin.h"

#include <algorithm>
#include <exception>
#include <iterator>

#include "sage_trt_log.h"

namespace sage {

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::ILogger;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;

SageGemmPlugin::SageGemmPlugin(SageGemmAttrs const& attrs) : mAttrs(attrs) {}

// The serialized-field table points into the object it belongs to, so a copy starts without one.
SageGemmPlugin::SageGemmPlugin(SageGemmPlugin const& other)
    : IPluginV3(other),
      IPluginV3OneCore(other),
      IPluginV3OneBuild(other),
      IPluginV3OneRuntime(other),
      mAttrs(other.mAttrs),
      mNbInputs(other.mNbInputs) {}

nvinfer1::IPluginCapability* SageGemmPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
    switch (type) {
        case PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* SageGemmPlugin::clone() noexcept {
    try {
        return new SageGemmPlugin(*this);
    } catch (std::exception const& e) {
        log_message(ILogger::Severity::kERROR, std::string("SageBinaryGemm clone failed: ") + e.what());
        return nullptr;
    }
}

char const* SageGemmPlugin::getPluginName() const noexcept { return kPluginName; }
char const* SageGemmPlugin::getPluginVersion() const noexcept { return kPluginVersion; }
char const* SageGemmPlugin::getPluginNamespace() const noexcept { return kPluginNamespace; }

int32_t SageGemmPlugin::accept_inputs(Dims const* dims, int32_t nb_inputs) noexcept {
    try {
        std::string const error = check_input_dims(dims, nb_inputs, mAttrs);
        if (!error.empty()) {
            log_message(ILogger::Severity::kERROR, "SageBinaryGemm: " + error);
            return -1;
        }
        mNbInputs = nb_inputs;
        return 0;
    } catch (std::exception const&) {
        return -1;
    }
}

int32_t SageGemmPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                        DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
    // Too few inputs (e.g. a contract-v1 node without row_scales) reach accept_inputs, which says so.
    if (nbInputs < 0 || nbInputs > kMaxInputs || nbOutputs != 1) return -1;
    Dims dims[kMaxInputs];
    for (int32_t i = 0; i < nbInputs; ++i) dims[i] = in[i].desc.dims;
    return accept_inputs(dims, nbInputs);
}

int32_t SageGemmPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                           int32_t nbInputs) const noexcept {
    if (nbOutputs != 1 || nbInputs < kRequiredInputs) return -1;
    outputTypes[0] = inputTypes[kX];
    return 0;
}

int32_t SageGemmPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                                        int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
                                        nvinfer1::IExprBuilder& exprBuilder) noexcept {
    if (nbInputs < kRequiredInputs || nbInputs > kMaxInputs || nbOutputs != 1 || inputs[kX].nbDims < 1) return -1;
    DimsExprs const& x = inputs[kX];
    int32_t const last = x.nbDims - 1;
    if (x.d[last]->isConstant() && x.d[last]->getConstantValue() != mAttrs.in_features) {
        log_message(ILogger::Severity::kERROR, "SageBinaryGemm: last dimension of X differs from in_features");
        return -1;
    }
    outputs[0] = x;  // Y keeps X's leading dimensions
    outputs[0].d[last] = exprBuilder.constant(mAttrs.out_features);
    return outputs[0].d[last] == nullptr ? -1 : 0;
}

bool SageGemmPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                               int32_t nbOutputs) noexcept {
    return supports_io(pos, inOut, nbInputs, nbOutputs);
}

int32_t SageGemmPlugin::getNbOutputs() const noexcept { return 1; }

int32_t SageGemmPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/,
                                      int32_t nbOutputs) noexcept {
    if (nbInputs < 0 || nbInputs > kMaxInputs || nbOutputs != 1) return -1;
    Dims dims[kMaxInputs];
    for (int32_t i = 0; i < nbInputs; ++i) dims[i] = in[i].dims;
    return accept_inputs(dims, nbInputs);
}

int32_t SageGemmPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
                                void const* const* inputs, void* const* outputs, void* /*workspace*/,
                                cudaStream_t stream) noexcept {
    if (mNbInputs == 0) {
        log_message(ILogger::Severity::kERROR, "SageBinaryGemm: enqueue before the input shapes were known");
        return -1;
    }
    SageGemmArgs args = launch_args(mAttrs, inputDesc, inputs, outputs[0], mNbInputs);
    if (!use_prepared_layout(args, stream)) return -1;
    int const status = sage_gemm_launch(&args, stream);
    if (status != 0) {
        try {
            log_message(ILogger::Severity::kERROR,
                        std::string("SageBinaryGemm launch failed: ") + sage_gemm_error_string(status));
        } catch (std::exception const&) {
        }
    }
    return status;
}

SageGemmPlugin::~SageGemmPlugin() {
    if (mPrepared != nullptr) cudaFree(mPrepared);
}

bool SageGemmPlugin::use_prepared_layout(SageGemmArgs& args, cudaStream_t stream) noexcept {
    // GEMV3 takes float16 X only, and not every layer: otherwise the launch picks another path.
    int64_t const need = args.x_dtype == SAGE_DTYPE_FLOAT16 ? sage_gemm_prepared_bytes(&args) : 0;
    if (need == 0) return true;
    // What sage_gemm_prepare reads (the scales, row_scales included, are read by the kernel on every launch).
    void const* from[5] = {args.sign_bits, args.group_codes, args.salient_rowptr, args.salient_cols, args.salient_q};
    bool const same = mPrepared != nullptr && mPreparedBytes >= need &&
                      std::equal(std::begin(from), std::end(from), std::begin(mPreparedFrom));
    if (!same) {
        if (mPreparedBytes < need) {
            if (mPrepared != nullptr) cudaFree(mPrepared);
            mPrepared = nullptr;
            mPreparedBytes = 0;
            if (cudaMalloc(&mPrepared, static_cast<size_t>(need)) != cudaSuccess) {
                mPrepared = nullptr;
                log_message(ILogger::Severity::kERROR, "SageBinaryGemm: cannot allocate its GEMV3 weight layout");
                return false;
            }
            mPreparedBytes = need;
        }
        args.prepared = mPrepared;
        args.prepared_bytes = mPreparedBytes;
        if (sage_gemm_prepare(&args, stream) != 0) {
            log_message(ILogger::Severity::kERROR, "SageBinaryGemm: preparing the GEMV3 weight layout failed");
            return false;
        }
        std::copy(std::begin(from), std::end(from), std::begin(mPreparedFrom));
    }
    args.prepared = mPrepared;
    args.prepared_bytes = mPreparedBytes;
    return true;
}

nvinfer1::IPluginV3* SageGemmPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept {
    return clone();  // no per-context resources
}

nvinfer1::PluginFieldCollection const* SageGemmPlugin::getFieldsToSerialize() noexcept {
    try {
        mFields = {PluginField("in_features", &mAttrs.in_features, PluginFieldType::kINT32, 1),
                   PluginField("out_features", &mAttrs.out_features, PluginFieldType::kINT32, 1),
                   PluginField("n_groups", &mAttrs.n_groups, PluginFieldType::kINT32, 1),
                   PluginField("salient_bits", &mAttrs.salient_bits, PluginFieldType::kINT32, 1)};
    } catch (std::exception const&) {
        return nullptr;
    }
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    return &mFieldCollection;
}

}  // namespace sage
