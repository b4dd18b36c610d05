// Host-side test of libsage_trt_plugin.so and of the argument checks of libsage_kernels.so. Loads both with
// dlopen the way TensorRT does and never calls a CUDA function that needs a device. The translation of TensorRT
// tensors into launch arguments (sage_plugin_contract.cpp, hidden in the library) is compiled in and tested directly.
//
// Usage: sage_plugin_host_test [path/to/libsage_trt_plugin.so [path/to/libsage_kernels.so]]
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#include <NvInferRuntime.h>

#include "sage_gemm_api.h"
#include "sage_plugin_contract.h"

namespace {

using namespace nvinfer1;

int gFailures = 0;
int gChecks = 0;

#define CHECK(cond)                                                              \
    do {                                                                         \
        ++gChecks;                                                               \
        if (!(cond)) {                                                           \
            ++gFailures;                                                         \
            std::fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                        \
    } while (0)

// Stand-ins for TensorRT's expression objects: IDimensionExpr/IExprBuilder forward to an implementation pointer
// (apiv::V*), which a test can provide.
class DimValue final : public apiv::VDimensionExpr {
public:
    explicit DimValue(int64_t value) : mValue(value) {}
    bool isConstant() const override { return mValue >= 0; }
    int64_t getConstantValue() const override { return mValue >= 0 ? mValue : INT64_MIN; }
    bool isSizeTensor() const override { return false; }

private:
    int64_t mValue;  // < 0: a runtime dimension
};

class FakeDim final : public IDimensionExpr {
public:
    explicit FakeDim(int64_t value) : mValue(value) { mImpl = &mValue; }

private:
    DimValue mValue;
};

class BuilderImpl final : public apiv::VExprBuilder {
public:
    IDimensionExpr const* constant(int64_t value) override { return &mDims.emplace_back(value); }
    IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override {
        return nullptr;
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
        return nullptr;
    }

private:
    std::deque<FakeDim> mDims;
};

class FakeBuilder final : public IExprBuilder {
public:
    FakeBuilder() { mImpl = &mBuilder; }

private:
    BuilderImpl mBuilder;
};

constexpr int32_t kK = 20;  // ceil(20/8) = 3 bytes per packed row
constexpr int32_t kN = 6;
constexpr int32_t kG = 3;   // 2 code planes
constexpr int32_t kB = 4;

struct Fields {
    std::vector<int32_t> values;
    std::vector<PluginField> fields;
    PluginFieldCollection fc{};

    void add(char const* name, int32_t value) {
        values.reserve(16);  // pointers into `values` must stay valid
        values.push_back(value);
        fields.emplace_back(name, &values.back(), PluginFieldType::kINT32, 1);
    }
    PluginFieldCollection const* collection() {
        fc.nbFields = static_cast<int32_t>(fields.size());
        fc.fields = fields.data();
        return &fc;
    }
};

Fields valid_fields(int32_t groups = kG) {
    Fields f;
    f.add("in_features", kK);
    f.add("out_features", kN);
    f.add("n_groups", groups);
    f.add("salient_bits", kB);
    return f;
}

Dims dims_of(std::initializer_list<int64_t> values) {
    Dims d{};
    d.nbDims = static_cast<int32_t>(values.size());
    int32_t i = 0;
    for (int64_t v : values) d.d[i++] = v;
    return d;
}

// X [2, 5, K] float16 and the packed tensors of contract v3 for (K, N, G) = (20, 6, 3) with nnz = 4 (salient_cols
// int8 [nnz, 2], row_scales at 8), optional bias (at 9).
std::vector<DynamicPluginTensorDesc> io_descs(bool bias, DataType x_type = DataType::kHALF) {
    std::vector<std::pair<Dims, DataType>> spec = {
        {dims_of({2, 5, kK}), x_type},         {dims_of({kN, 3}), DataType::kINT8},
        {dims_of({2, kN, 3}), DataType::kINT8}, {dims_of({kG}), DataType::kHALF},
        {dims_of({kN + 1}), DataType::kINT32}, {dims_of({4, 2}), DataType::kINT8},
        {dims_of({4}), DataType::kINT8},       {dims_of({kN}), DataType::kHALF},
        {dims_of({kN}), DataType::kHALF}};  // row_scales
    if (bias) spec.push_back({dims_of({kN}), DataType::kFLOAT});  // the contract: bias is float32
    spec.push_back({dims_of({2, 5, kN}), x_type});  // output
    std::vector<DynamicPluginTensorDesc> descs(spec.size());
    for (size_t i = 0; i < spec.size(); ++i) {
        descs[i].desc.dims = spec[i].first;
        descs[i].desc.type = spec[i].second;
        descs[i].desc.format = TensorFormat::kLINEAR;
        descs[i].desc.scale = -1.0f;
        descs[i].min = descs[i].max = descs[i].opt = spec[i].first;
    }
    return descs;
}

bool all_supported(IPluginV3OneBuild* build, std::vector<DynamicPluginTensorDesc> const& io, int32_t nb_inputs) {
    for (int32_t pos = 0; pos < static_cast<int32_t>(io.size()); ++pos) {
        if (!build->supportsFormatCombination(pos, io.data(), nb_inputs, 1)) return false;
    }
    return true;
}

IPluginCreatorV3One* load_creator(void* lib) {
    using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
    auto get_creators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    CHECK(get_creators != nullptr);
    CHECK(dlsym(lib, "setLoggerFinder") != nullptr);
    if (get_creators == nullptr) return nullptr;
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = get_creators(count);
    CHECK(count == 1);
    if (count != 1) return nullptr;
    // TensorRT identifies the creator's interface by name before casting; do the same.
    CHECK(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
    return static_cast<IPluginCreatorV3One*>(creators[0]);
}

void test_creator_identity(IPluginCreatorV3One* creator) {
    CHECK(std::strcmp(creator->getPluginName(), "SageBinaryGemm") == 0);
    CHECK(std::strcmp(creator->getPluginVersion(), "3") == 0);
    CHECK(std::strcmp(creator->getPluginNamespace(), "sage") == 0);
    PluginFieldCollection const* names = creator->getFieldNames();
    char const* expected[] = {"in_features", "out_features", "n_groups", "salient_bits", "plugin_namespace",
                              "plugin_version"};
    CHECK(names != nullptr && names->nbFields == 6);
    for (int32_t i = 0; names != nullptr && i < names->nbFields && i < 6; ++i) {
        CHECK(std::strcmp(names->fields[i].name, expected[i]) == 0);
        CHECK(names->fields[i].type == (i < 4 ? PluginFieldType::kINT32 : PluginFieldType::kCHAR));
    }
}

int32_t serialized_value(PluginFieldCollection const* fc, char const* name) {
    for (int32_t i = 0; i < fc->nbFields; ++i) {
        if (std::strcmp(fc->fields[i].name, name) == 0 && fc->fields[i].type == PluginFieldType::kINT32) {
            return *static_cast<int32_t const*>(fc->fields[i].data);
        }
    }
    return -1;
}

void test_round_trip(IPluginCreatorV3One* creator) {
    Fields f = valid_fields();
    IPluginV3* plugin = creator->createPlugin("layer0", f.collection(), TensorRTPhase::kBUILD);
    CHECK(plugin != nullptr);
    if (plugin == nullptr) return;
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    CHECK(std::strcmp(core->getPluginName(), "SageBinaryGemm") == 0);
    CHECK(std::strcmp(core->getPluginNamespace(), "sage") == 0);
    CHECK(std::strcmp(core->getPluginVersion(), "3") == 0);
    CHECK(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD) != nullptr);

    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* saved = runtime->getFieldsToSerialize();
    CHECK(saved != nullptr && saved->nbFields == 4);
    CHECK(serialized_value(saved, "in_features") == kK);
    CHECK(serialized_value(saved, "out_features") == kN);
    CHECK(serialized_value(saved, "n_groups") == kG);
    CHECK(serialized_value(saved, "salient_bits") == kB);

    IPluginV3* restored = creator->createPlugin("layer0", saved, TensorRTPhase::kRUNTIME);
    CHECK(restored != nullptr);
    if (restored != nullptr) {
        auto* r = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        PluginFieldCollection const* again = r->getFieldsToSerialize();
        CHECK(serialized_value(again, "in_features") == kK && serialized_value(again, "n_groups") == kG);
        delete restored;
    }

    IPluginV3* copy = runtime->attachToContext(nullptr);
    CHECK(copy != nullptr && copy != plugin);
    delete plugin;  // the copy must not depend on the original
    if (copy != nullptr) {
        auto* r = static_cast<IPluginV3OneRuntime*>(copy->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        CHECK(serialized_value(r->getFieldsToSerialize(), "salient_bits") == kB);
        delete copy;
    }
}

bool creates(IPluginCreatorV3One* creator, Fields& f) {
    IPluginV3* plugin = creator->createPlugin("bad", f.collection(), TensorRTPhase::kBUILD);
    delete plugin;
    return plugin != nullptr;
}

void test_field_validation(IPluginCreatorV3One* creator) {
    Fields zero_groups = valid_fields(0);
    CHECK(!creates(creator, zero_groups));
    Fields too_many_groups = valid_fields(SAGE_MAX_GROUPS + 1);
    CHECK(!creates(creator, too_many_groups));
    Fields max_groups = valid_fields(SAGE_MAX_GROUPS);
    CHECK(creates(creator, max_groups));

    Fields missing;
    missing.add("in_features", kK);
    missing.add("out_features", kN);
    missing.add("n_groups", kG);
    CHECK(!creates(creator, missing));

    Fields bad_bits = valid_fields();
    bad_bits.values[3] = 9;
    CHECK(!creates(creator, bad_bits));
    bad_bits.values[3] = 1;  // the contract's salient integers have 2..8 bits
    CHECK(!creates(creator, bad_bits));
    Fields bad_k = valid_fields();
    bad_k.values[0] = 0;
    CHECK(!creates(creator, bad_k));
    bad_k.values[0] = SAGE_MAX_K + 1;  // past the contract's 16-bit columns (v3)
    CHECK(!creates(creator, bad_k));
    bad_k.values[0] = SAGE_MAX_K;
    CHECK(creates(creator, bad_k));
    Fields bad_n = valid_fields();
    bad_n.values[1] = SAGE_MAX_FEATURES + 1;
    CHECK(!creates(creator, bad_n));
    Fields unknown = valid_fields();
    unknown.add("group_size", 128);
    CHECK(!creates(creator, unknown));

    // ONNX integer attributes are 64-bit; the plugin_* strings come along with the node.
    int64_t const wide[] = {kK, kN, kG, kB};
    char const* names[] = {"in_features", "out_features", "n_groups", "salient_bits"};
    std::vector<PluginField> fields;
    for (int i = 0; i < 4; ++i) fields.emplace_back(names[i], &wide[i], PluginFieldType::kINT64, 1);
    fields.emplace_back("plugin_namespace", "sage", PluginFieldType::kCHAR, 4);
    fields.emplace_back("plugin_version", "3", PluginFieldType::kCHAR, 2);  // length counting the NUL
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    IPluginV3* plugin = creator->createPlugin("wide", &fc, TensorRTPhase::kBUILD);
    CHECK(plugin != nullptr);
    delete plugin;
    fields.back() = PluginField("plugin_version", "1", PluginFieldType::kCHAR, 1);  // contract v1: no row_scales
    plugin = creator->createPlugin("v1", &fc, TensorRTPhase::kBUILD);
    CHECK(plugin == nullptr);
    delete plugin;
    fields.back() = PluginField("plugin_version", "2", PluginFieldType::kCHAR, 1);  // contract v2: int32 columns
    plugin = creator->createPlugin("v2", &fc, TensorRTPhase::kBUILD);
    CHECK(plugin == nullptr);
    delete plugin;
    fields.back() = PluginField("plugin_version", "4", PluginFieldType::kCHAR, 1);
    plugin = creator->createPlugin("v4", &fc, TensorRTPhase::kBUILD);
    CHECK(plugin == nullptr);
    delete plugin;
    CHECK(creator->createPlugin("none", nullptr, TensorRTPhase::kBUILD) == nullptr);
}

void test_build_interface(IPluginCreatorV3One* creator) {
    Fields f = valid_fields();
    IPluginV3* plugin = creator->createPlugin("layer", f.collection(), TensorRTPhase::kBUILD);
    if (plugin == nullptr) return;
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    CHECK(build->getNbOutputs() == 1);

    DataType in_types[10] = {DataType::kHALF};
    DataType out_type = DataType::kFLOAT;
    CHECK(build->getOutputDataTypes(&out_type, 1, in_types, 9) == 0 && out_type == DataType::kHALF);

    FakeBuilder exprs;
    FakeDim batch(-1), seq(7), k(kK), wrong_k(kK + 1);
    DimsExprs inputs[10]{};
    inputs[0].nbDims = 3;
    inputs[0].d[0] = &batch;
    inputs[0].d[1] = &seq;
    inputs[0].d[2] = &k;
    DimsExprs out{};
    CHECK(build->getOutputShapes(inputs, 9, nullptr, 0, &out, 1, exprs) == 0);
    CHECK(out.nbDims == 3 && out.d[0] == &batch && out.d[1] == &seq);
    CHECK(out.d[2] != nullptr && out.d[2]->isConstant() && out.d[2]->getConstantValue() == kN);
    CHECK(build->getOutputShapes(inputs, 8, nullptr, 0, &out, 1, exprs) != 0);  // contract v1's inputs
    inputs[0].d[2] = &wrong_k;
    CHECK(build->getOutputShapes(inputs, 9, nullptr, 0, &out, 1, exprs) != 0);

    {  // a contract-v1 node (8 inputs, no row_scales) is refused, not misread
        std::vector<DynamicPluginTensorDesc> io = io_descs(false);
        io.erase(io.begin() + 8);  // drop row_scales: 8 inputs and the output
        CHECK(build->configurePlugin(io.data(), 8, io.data() + 8, 1) != 0);
    }

    for (bool bias : {false, true}) {
        int32_t const nb = bias ? 10 : 9;
        for (DataType x_type : {DataType::kHALF, DataType::kFLOAT}) {
            std::vector<DynamicPluginTensorDesc> io = io_descs(bias, x_type);
            CHECK(all_supported(build, io, nb));
            CHECK(build->configurePlugin(io.data(), nb, io.data() + nb, 1) == 0);
        }
        std::vector<DynamicPluginTensorDesc> io = io_descs(bias);
        io[nb].desc.type = DataType::kFLOAT;  // output must follow X
        CHECK(!build->supportsFormatCombination(nb, io.data(), nb, 1));
        io = io_descs(bias);
        io[1].desc.type = DataType::kUINT8;  // packed tensors are INT8 in the contract
        CHECK(!build->supportsFormatCombination(1, io.data(), nb, 1));
        io = io_descs(bias);
        io[0].desc.format = TensorFormat::kCHW32;
        CHECK(!build->supportsFormatCombination(0, io.data(), nb, 1));
        io = io_descs(bias);
        io[3].desc.type = DataType::kFLOAT;  // group_scales are float16
        CHECK(!build->supportsFormatCombination(3, io.data(), nb, 1));
        io = io_descs(bias);
        io[1].desc.dims = dims_of({kN, 4});  // sign_bits must be [N, ceil(K/8)]
        CHECK(build->configurePlugin(io.data(), nb, io.data() + nb, 1) != 0);
        io = io_descs(bias);
        io[2].desc.dims = dims_of({1, kN, 3});  // G = 3 needs 2 code planes
        CHECK(build->configurePlugin(io.data(), nb, io.data() + nb, 1) != 0);
        io = io_descs(bias);
        io[6].desc.dims = dims_of({5});  // salient_q and salient_cols differ
        CHECK(build->configurePlugin(io.data(), nb, io.data() + nb, 1) != 0);
        io = io_descs(bias);
        io[8].desc.type = DataType::kFLOAT;  // row_scales are float16
        CHECK(!build->supportsFormatCombination(8, io.data(), nb, 1));
        io = io_descs(bias);
        io[8].desc.dims = dims_of({kN + 1});  // row_scales must be [N]
        CHECK(build->configurePlugin(io.data(), nb, io.data() + nb, 1) != 0);
        io = io_descs(bias);
        io[8].desc.dims = dims_of({1, kN});
        CHECK(build->configurePlugin(io.data(), nb, io.data() + nb, 1) != 0);
        io = io_descs(bias);
        io[8].desc.dims = dims_of({0});  // v3: empty row_scales, every r_n = 1
        CHECK(build->configurePlugin(io.data(), nb, io.data() + nb, 1) == 0);
        CHECK(all_supported(build, io, nb));
        io = io_descs(bias);
        io[5].desc.type = DataType::kINT32;  // v3: salient_cols is int8 [nnz, 2]
        CHECK(!build->supportsFormatCombination(5, io.data(), nb, 1));
        io = io_descs(bias);
        io[5].desc.dims = dims_of({4});  // contract v2's int32 [nnz]
        CHECK(build->configurePlugin(io.data(), nb, io.data() + nb, 1) != 0);
        io = io_descs(bias);
        io[5].desc.dims = dims_of({4, 4});
        CHECK(build->configurePlugin(io.data(), nb, io.data() + nb, 1) != 0);
        io = io_descs(bias);
        io[5].desc.dims = dims_of({0, 2});  // nnz = 0
        io[6].desc.dims = dims_of({0});
        CHECK(build->configurePlugin(io.data(), nb, io.data() + nb, 1) == 0);
    }
    std::vector<DynamicPluginTensorDesc> io = io_descs(true, DataType::kHALF);
    io[9].desc.type = DataType::kHALF;  // bias is float32 even for float16 X
    CHECK(!build->supportsFormatCombination(9, io.data(), 10, 1));
    io = io_descs(true);
    CHECK(build->supportsFormatCombination(9, io.data(), 10, 1));
    io[9].desc.dims = dims_of({kN + 1});
    CHECK(build->configurePlugin(io.data(), 10, io.data() + 10, 1) != 0);
    delete plugin;
}

void test_enqueue_needs_shapes(IPluginCreatorV3One* creator) {
    Fields f = valid_fields();
    IPluginV3* plugin = creator->createPlugin("layer", f.collection(), TensorRTPhase::kRUNTIME);
    if (plugin == nullptr) return;
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    // Without onShapeChange the plugin cannot know whether a bias was given: it must refuse, not guess.
    CHECK(runtime->enqueue(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr) != 0);
    std::vector<DynamicPluginTensorDesc> io = io_descs(false);
    std::vector<PluginTensorDesc> descs;
    for (auto const& d : io) descs.push_back(d.desc);
    CHECK(runtime->onShapeChange(descs.data(), 8, descs.data() + 8, 1) != 0);  // contract v1: no row_scales
    CHECK(runtime->onShapeChange(descs.data(), 9, descs.data() + 9, 1) == 0);
    descs[7].dims = dims_of({kN - 1});
    CHECK(runtime->onShapeChange(descs.data(), 9, descs.data() + 9, 1) != 0);
    descs[7].dims = dims_of({kN});
    descs[8].dims = dims_of({kN - 1});  // row_scales
    CHECK(runtime->onShapeChange(descs.data(), 9, descs.data() + 9, 1) != 0);
    descs[8].dims = dims_of({0});  // v3: no row multipliers
    CHECK(runtime->onShapeChange(descs.data(), 9, descs.data() + 9, 1) == 0);
    delete plugin;
}

// enqueue reaches the launch with the contract's inputs: with an empty batch (X [0, 5, K]) and float32 X (no GEMV3
// layout to make) nothing touches a device, and the launch's pointer checks tell what arrived.
void test_enqueue_reaches_the_launch(IPluginCreatorV3One* creator) {
    Fields f = valid_fields();
    IPluginV3* plugin = creator->createPlugin("layer", f.collection(), TensorRTPhase::kRUNTIME);
    if (plugin == nullptr) return;
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    for (bool bias : {false, true}) {
        int32_t const nb = bias ? 10 : 9;
        std::vector<DynamicPluginTensorDesc> io = io_descs(bias, DataType::kFLOAT);
        io[0].desc.dims = dims_of({0, 5, kK});
        io[nb].desc.dims = dims_of({0, 5, kN});
        std::vector<PluginTensorDesc> descs;
        for (auto const& d : io) descs.push_back(d.desc);
        CHECK(runtime->onShapeChange(descs.data(), nb, descs.data() + nb, 1) == 0);
        static char dummy[64];
        void const* inputs[10];
        for (void const*& in : inputs) in = dummy;
        void* outputs[1] = {dummy};
        CHECK(runtime->enqueue(descs.data(), descs.data() + nb, inputs, outputs, nullptr, nullptr) == 0);
        inputs[7] = nullptr;  // salient_scale missing: the launch refuses
        CHECK(runtime->enqueue(descs.data(), descs.data() + nb, inputs, outputs, nullptr, nullptr) ==
              cudaErrorInvalidValue);
        inputs[7] = dummy;
        descs[8].dims = dims_of({0});  // v3: an empty row_scales, whose pointer TensorRT may give as NULL
        inputs[8] = nullptr;
        CHECK(runtime->onShapeChange(descs.data(), nb, descs.data() + nb, 1) == 0);
        CHECK(runtime->enqueue(descs.data(), descs.data() + nb, inputs, outputs, nullptr, nullptr) == 0);
        if (bias) {
            inputs[9] = nullptr;  // the bias is optional: a NULL one is no error
            CHECK(runtime->enqueue(descs.data(), descs.data() + nb, inputs, outputs, nullptr, nullptr) == 0);
        }
    }
    delete plugin;
}

// launch_args puts every input in its field: salient_cols' [nnz, 2] bytes as uint16 columns with nnz its first
// dimension, input 8 as row_scales, and an empty row_scales as NULL (v3: every r_n = 1), whatever its pointer.
void test_launch_args() {
    sage::SageGemmAttrs const attrs{kK, kN, kG, kB};
    static char buffers[11][16];
    void const* inputs[10];
    for (int i = 0; i < 10; ++i) inputs[i] = buffers[i];
    for (bool bias : {false, true}) {
        int32_t const nb = bias ? 10 : 9;
        std::vector<PluginTensorDesc> descs;
        for (auto const& d : io_descs(bias)) descs.push_back(d.desc);
        SageGemmArgs a = sage::launch_args(attrs, descs.data(), inputs, buffers[10], nb);
        CHECK(a.x == inputs[0] && a.sign_bits == inputs[1] && a.group_codes == inputs[2]);
        CHECK(a.group_scales == inputs[3] && a.salient_rowptr == inputs[4] && a.salient_cols == inputs[5]);
        CHECK(a.salient_q == inputs[6] && a.salient_scale == inputs[7] && a.row_scales == inputs[8]);
        CHECK(a.bias == (bias ? inputs[9] : nullptr) && a.y == buffers[10]);
        CHECK(a.m == 10 && a.nnz == 4 && a.k == kK && a.n == kN && a.n_groups == kG && a.salient_bits == kB);
        CHECK(a.x_dtype == SAGE_DTYPE_FLOAT16 && a.bias_dtype == SAGE_DTYPE_FLOAT32 && a.path == SAGE_PATH_AUTO);
        descs[8].dims = dims_of({0});
        a = sage::launch_args(attrs, descs.data(), inputs, buffers[10], nb);
        CHECK(a.row_scales == nullptr && a.salient_scale == inputs[7]);
        descs[5].dims = dims_of({0, 2});
        descs[6].dims = dims_of({0});
        CHECK(sage::launch_args(attrs, descs.data(), inputs, buffers[10], nb).nnz == 0);
    }
}

// nnz bounds the kernels' CSR reads, so it must be representable and come with the arrays it counts.
void test_salient_count_checks(int (*launch)(SageGemmArgs const*, cudaStream_t), SageGemmArgs const& a) {
    SageGemmArgs bad = a;
    bad.nnz = -1;
    CHECK(launch(&bad, nullptr) == cudaErrorInvalidValue);
    bad.nnz = int64_t{INT32_MAX} + 1;
    CHECK(launch(&bad, nullptr) == cudaErrorInvalidValue);
    bad.nnz = INT32_MAX;
    CHECK(launch(&bad, nullptr) == cudaSuccess);
    bad.salient_cols = nullptr;
    CHECK(launch(&bad, nullptr) == cudaErrorInvalidValue);
    bad.nnz = 0;  // empty CSR arrays may be NULL
    bad.salient_q = nullptr;
    CHECK(launch(&bad, nullptr) == cudaSuccess);
    bad.nnz = 1;
    bad.salient_cols = a.salient_cols;
    CHECK(launch(&bad, nullptr) == cudaErrorInvalidValue);
}

void test_kernel_launch_checks(void* lib) {
    auto launch = reinterpret_cast<int (*)(SageGemmArgs const*, cudaStream_t)>(dlsym(lib, "sage_gemm_launch"));
    auto abi = reinterpret_cast<int (*)()>(dlsym(lib, "sage_gemm_abi_version"));
    auto args_size = reinterpret_cast<size_t (*)()>(dlsym(lib, "sage_gemm_args_size"));
    auto auto_path = reinterpret_cast<int (*)(int64_t)>(dlsym(lib, "sage_gemm_auto_path"));
    CHECK(launch && abi && args_size && auto_path);
    if (!(launch && abi && args_size && auto_path)) return;
    CHECK(abi() == SAGE_GEMM_ABI_VERSION);
    CHECK(args_size() == sizeof(SageGemmArgs));
    CHECK(auto_path(1) == SAGE_PATH_GEMV && auto_path(SAGE_GEMV_MAX_M) == SAGE_PATH_GEMV);
    CHECK(auto_path(SAGE_GEMV_MAX_M + 1) == SAGE_PATH_TILED);

    // Dummy non-null pointers: with m = 0 or invalid arguments nothing is dereferenced or launched.
    static char dummy[64];
    SageGemmArgs a;
    std::memset(&a, 0, sizeof(a));
    a.x = a.y = dummy;
    a.sign_bits = a.group_codes = a.salient_q = reinterpret_cast<int8_t*>(dummy);
    a.group_scales = a.salient_scale = a.row_scales = reinterpret_cast<uint16_t*>(dummy);
    a.salient_rowptr = reinterpret_cast<int32_t*>(dummy);
    a.salient_cols = reinterpret_cast<uint16_t*>(dummy);
    a.m = 0;
    a.k = kK;
    a.n = kN;
    a.n_groups = kG;
    a.salient_bits = kB;
    CHECK(launch(&a, nullptr) == cudaSuccess);  // empty batch: nothing to do
    CHECK(launch(nullptr, nullptr) == cudaErrorInvalidValue);
    SageGemmArgs bad = a;
    bad.n_groups = 0;
    CHECK(launch(&bad, nullptr) == cudaErrorInvalidValue);
    bad = a;
    bad.group_codes = nullptr;  // G = 3 has code planes
    CHECK(launch(&bad, nullptr) == cudaErrorInvalidValue);
    bad.n_groups = 1;  // ...G = 1 has none
    CHECK(launch(&bad, nullptr) == cudaSuccess);
    bad = a;
    bad.row_scales = nullptr;  // contract v3: no row multipliers, every r_n = 1
    CHECK(launch(&bad, nullptr) == cudaSuccess);
    bad.salient_scale = nullptr;
    CHECK(launch(&bad, nullptr) == cudaErrorInvalidValue);
    bad = a;
    bad.x_dtype = 7;
    CHECK(launch(&bad, nullptr) == cudaErrorInvalidValue);
    bad = a;
    bad.path = SAGE_PATH_GEMV2;
    CHECK(launch(&bad, nullptr) == cudaSuccess);
    bad.path = SAGE_PATH_GEMV3;  // an empty batch, so nothing is read even without a prepared layout
    CHECK(launch(&bad, nullptr) == cudaSuccess);
    bad.path = SAGE_PATH_GEMV3 + 1;
    CHECK(launch(&bad, nullptr) == cudaErrorInvalidValue);
    bad = a;
    bad.prepared_bytes = 64;  // a size without a buffer
    CHECK(launch(&bad, nullptr) == cudaErrorInvalidValue);
    bad = a;
    bad.k = 0;
    CHECK(launch(&bad, nullptr) == cudaErrorInvalidValue);
    bad.k = SAGE_MAX_K;
    CHECK(launch(&bad, nullptr) == cudaSuccess);
    bad.k = SAGE_MAX_K + 1;  // the contract's limit (v3: 16-bit columns)
    CHECK(launch(&bad, nullptr) == cudaErrorInvalidValue);
    bad = a;
    bad.n = SAGE_MAX_FEATURES + 1;
    CHECK(launch(&bad, nullptr) == cudaErrorInvalidValue);
    test_salient_count_checks(launch, a);
}

void* open_or_report(char const* path) {
    void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) std::fprintf(stderr, "cannot load %s: %s\n", path, dlerror());
    return lib;
}

}  // namespace

int main(int argc, char** argv) {
    char const* plugin_path = argc > 1 ? argv[1] : SAGE_PLUGIN_LIB;
    char const* kernels_path = argc > 2 ? argv[2] : SAGE_KERNELS_LIB;
    void* plugin_lib = open_or_report(plugin_path);
    void* kernels_lib = open_or_report(kernels_path);
    if (plugin_lib == nullptr || kernels_lib == nullptr) return 2;

    if (IPluginCreatorV3One* creator = load_creator(plugin_lib)) {
        test_creator_identity(creator);
        test_round_trip(creator);
        test_field_validation(creator);
        test_build_interface(creator);
        test_enqueue_needs_shapes(creator);
        test_enqueue_reaches_the_launch(creator);
    }
    test_launch_args();
    test_kernel_launch_checks(kernels_lib);
    std::printf("%d checks, %d failed\n", gChecks, gFailures);
    return gFailures == 0 ? 0 : 1;
}
