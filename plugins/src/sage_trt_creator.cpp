// Plugin creator and the two entry points TensorRT looks up in a plugin library (trtexec --dynamicPlugins,
// IPluginRegistry::loadLibrary): getCreators and setLoggerFinder.
#include <cstdio>
#include <exception>
#include <mutex>
#include <vector>

#include "sage_trt_log.h"
#include "sage_trt_plugin.h"

namespace sage {
namespace {

using nvinfer1::ILogger;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder = nullptr;

class SageGemmCreator final : public nvinfer1::IPluginCreatorV3One {
public:
    SageGemmCreator() {
        mFieldNames = {PluginField("in_features", nullptr, PluginFieldType::kINT32, 1),
                       PluginField("out_features", nullptr, PluginFieldType::kINT32, 1),
                       PluginField("n_groups", nullptr, PluginFieldType::kINT32, 1),
                       PluginField("salient_bits", nullptr, PluginFieldType::kINT32, 1),
                       PluginField("plugin_namespace", nullptr, PluginFieldType::kCHAR, 0),
                       PluginField("plugin_version", nullptr, PluginFieldType::kCHAR, 0)};
        mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
        mFieldCollection.fields = mFieldNames.data();
    }

    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase /*phase*/) noexcept override {
        try {
            SageGemmAttrs attrs;
            std::string const error = parse_attrs(fc, attrs);
            if (!error.empty()) {
                log_message(ILogger::Severity::kERROR,
                            std::string("SageBinaryGemm '") + (name ? name : "") + "': " + error);
                return nullptr;
            }
            return new SageGemmPlugin(attrs);
        } catch (std::exception const& e) {
            log_message(ILogger::Severity::kERROR, std::string("SageBinaryGemm createPlugin failed: ") + e.what());
            return nullptr;
        }
    }

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
    char const* getPluginName() const noexcept override { return kPluginName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

private:
    std::vector<PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

}  // namespace

void set_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept {
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    gLoggerFinder = finder;
}

void log_message(ILogger::Severity severity, std::string const& text) noexcept {
    ILogger* logger = nullptr;
    {
        std::lock_guard<std::mutex> lock(gLoggerMutex);
        if (gLoggerFinder != nullptr) logger = gLoggerFinder->findLogger();
    }
    if (logger != nullptr) {
        logger->log(severity, text.c_str());
    } else if (severity <= ILogger::Severity::kWARNING) {
        std::fprintf(stderr, "[sage_trt_plugin] %s\n", text.c_str());
    }
}

}  // namespace sage

extern "C" {

__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
    sage::set_logger_finder(finder);
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static sage::SageGemmCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

}  // extern "C"
