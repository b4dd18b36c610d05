// Messages go to the logger TensorRT hands over through setLoggerFinder, or to stderr before it has.
#pragma once

#include <string>

#include <NvInferRuntime.h>

namespace sage {

void set_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept;
void log_message(nvinfer1::ILogger::Severity severity, std::string const& text) noexcept;

}  // namespace sage
