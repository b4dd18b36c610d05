// IPluginV3 implementation of SageBinaryGemm: one object carrying the core, build and runtime capabilities.
#pragma once

#include <vector>

#include <NvInferRuntime.h>

#include "sage_plugin_contract.h"

namespace sage {

class SageGemmPlugin final : public nvinfer1::IPluginV3,
                             public nvinfer1::IPluginV3OneCore,
                             public nvinfer1::IPluginV3OneBuild,
                             public nvinfer1::IPluginV3OneRuntime {
public:
    explicit SageGemmPlugin(SageGemmAttrs const& attrs);
    SageGemmPlugin(SageGemmPlugin const& other);
    SageGemmPlugin& operator=(SageGemmPlugin const&) = delete;
    ~SageGemmPlugin() override;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                               nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                            nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs,
                            nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    // configurePlugin/onShapeChange share this: shapes against the attributes, then remember nbInputs.
    int32_t accept_inputs(nvinfer1::Dims const* dims, int32_t nb_inputs) noexcept;

    // Makes (or re-makes, when the weights moved) the GEMV3 layout and points args at it; false on a CUDA error.
    bool use_prepared_layout(SageGemmArgs& args, cudaStream_t stream) noexcept;

    SageGemmAttrs mAttrs;
    int32_t mNbInputs = 0;  // 0 until configurePlugin/onShapeChange saw the inputs (9, or 10 with bias)
    // The GEMV3 layout of the weights, made on the first enqueue that sees them (the weights of an engine are
    // constants at fixed addresses) and again only when their addresses change, e.g. during tactic timing.
    // Owned by this plugin object; a clone starts without one.
    void* mPrepared = nullptr;
    int64_t mPreparedBytes = 0;
    // Where the weights were when it was made: sign_bits, group_codes, salient_rowptr, salient_cols, salient_q.
    // Same addresses, same weights: the plugin does not support refitting them in place. The first enqueue (which
    // allocates) must not be inside a CUDA graph capture; TensorRT's warm-up runs come before one.
    // row_scales (contract v2; NULL when empty, v3) is not among them: like the other scales, the kernel reads it
    // on every launch.
    void const* mPreparedFrom[5] = {};
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

}  // namespace sage
