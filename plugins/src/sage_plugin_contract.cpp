#include "sage_plugin_contract.h"

#include <algorithm>
#include <cstring>

namespace sage {
namespace {

using nvinfer1::DataType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

bool read_int(PluginField const& f, int32_t& value) {
    if (f.data == nullptr || f.length != 1) return false;
    if (f.type == PluginFieldType::kINT32) {
        value = *static_cast<int32_t const*>(f.data);
        return true;
    }
    if (f.type == PluginFieldType::kINT64) {
        int64_t const wide = *static_cast<int64_t const*>(f.data);
        if (wide < INT32_MIN || wide > INT32_MAX) return false;
        value = static_cast<int32_t>(wide);
        return true;
    }
    return false;
}

// kCHAR fields may or may not count a trailing NUL in their length.
std::string read_string(PluginField const& f) {
    if (f.data == nullptr || f.length <= 0) return {};
    char const* chars = static_cast<char const*>(f.data);
    return std::string(chars, strnlen(chars, static_cast<size_t>(f.length)));
}

bool dim_is(int64_t actual, int64_t expected) { return actual < 0 || actual == expected; }

std::string shape_error(char const* input, nvinfer1::Dims const& d, std::string const& expected) {
    std::string got = "[";
    for (int32_t i = 0; i < d.nbDims; ++i) got += (i ? ", " : "") + std::to_string(d.d[i]);
    return std::string("input ") + input + " has shape " + got + "], expected " + expected;
}

}  // namespace

std::string parse_attrs(nvinfer1::PluginFieldCollection const* fc, SageGemmAttrs& out) {
    if (fc == nullptr) return "no plugin fields given";
    struct IntField {
        char const* name;
        int32_t* target;
        bool seen;
    };
    IntField ints[] = {{"in_features", &out.in_features, false},
                       {"out_features", &out.out_features, false},
                       {"n_groups", &out.n_groups, false},
                       {"salient_bits", &out.salient_bits, false}};
    for (int32_t i = 0; i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        if (f.name == nullptr) return "plugin field without a name";
        std::string const name = f.name;
        if (name == "plugin_namespace" || name == "plugin_version") {
            std::string const value = read_string(f);
            char const* expected = name == "plugin_namespace" ? kPluginNamespace : kPluginVersion;
            if (value != expected) return name + " is '" + value + "', this plugin is '" + expected + "'";
            continue;
        }
        bool known = false;
        for (IntField& slot : ints) {
            if (name != slot.name) continue;
            if (!read_int(f, *slot.target)) return name + " must be one INT32 (or INT64) value";
            slot.seen = known = true;
        }
        if (!known) return "unknown plugin field '" + name + "'";
    }
    for (IntField const& slot : ints) {
        if (!slot.seen) return std::string("missing plugin field '") + slot.name + "'";
    }
    return validate_attrs(out);
}

std::string validate_attrs(SageGemmAttrs const& a) {
    // The launch's limits (K: the contract's 16-bit columns), checked here so that the engine build fails, not
    // every enqueue.
    if (a.in_features < 1 || a.in_features > SAGE_MAX_K) {
        return "in_features must be in 1.." + std::to_string(SAGE_MAX_K);
    }
    if (a.out_features < 1 || a.out_features > SAGE_MAX_FEATURES) {
        return "out_features must be in 1.." + std::to_string(SAGE_MAX_FEATURES);
    }
    if (a.n_groups < 1 || a.n_groups > SAGE_MAX_GROUPS) {
        return "n_groups must be in 1.." + std::to_string(SAGE_MAX_GROUPS) + ", got " + std::to_string(a.n_groups);
    }
    if (a.salient_bits < 2 || a.salient_bits > 8) {
        return "salient_bits must be in 2..8, got " + std::to_string(a.salient_bits);
    }
    return {};
}

std::string check_input_dims(nvinfer1::Dims const* dims, int32_t nb_inputs, SageGemmAttrs const& a) {
    if (nb_inputs != kRequiredInputs && nb_inputs != kMaxInputs) {
        return "expected 9 or 10 inputs (contract v3: row_scales is input 8, the optional bias 9), got " +
               std::to_string(nb_inputs);
    }
    int64_t const k = a.in_features;
    int64_t const n = a.out_features;
    int64_t const kb = (k + 7) / 8;
    int64_t const p = sage_gemm_planes(a.n_groups);
    nvinfer1::Dims const& x = dims[kX];
    if (x.nbDims < 1 || !dim_is(x.d[x.nbDims - 1], k)) return shape_error("X", x, "[..., in_features]");
    struct Expected {
        Input input;
        char const* name;
        int32_t rank;
        int64_t d0, d1, d2;  // -1: any
    };
    Expected const expected[] = {{kSignBits, "sign_bits", 2, n, kb, 0},
                                 {kGroupCodes, "group_codes", 3, p, n, kb},
                                 {kGroupScales, "group_scales", 1, a.n_groups, 0, 0},
                                 {kSalientRowptr, "salient_rowptr", 1, n + 1, 0, 0},
                                 {kSalientCols, "salient_cols", 2, -1, 2, 0},
                                 {kSalientQ, "salient_q", 1, -1, 0, 0},
                                 {kSalientScale, "salient_scale", 1, n, 0, 0},
                                 {kRowScales, "row_scales", 1, n, 0, 0},
                                 {kBias, "bias", 1, n, 0, 0}};
    for (Expected const& e : expected) {
        if (e.input >= nb_inputs) continue;
        nvinfer1::Dims const& d = dims[e.input];
        int64_t const want[3] = {e.d0, e.d1, e.d2};
        // row_scales may also be empty (v3: every r_n = 1).
        bool const may_be_empty = e.input == kRowScales;
        bool ok = d.nbDims == e.rank;
        for (int32_t i = 0; ok && i < e.rank; ++i) {
            ok = want[i] < 0 || dim_is(d.d[i], want[i]) || (may_be_empty && d.d[i] == 0);
        }
        if (!ok) {
            std::string text = "rank " + std::to_string(e.rank) + " [";
            for (int32_t i = 0; i < e.rank; ++i) {
                text += (i ? ", " : "") + (want[i] < 0 ? std::string("nnz") : std::to_string(want[i]));
            }
            return shape_error(e.name, d, text + (may_be_empty ? "] or [0]" : "]"));
        }
    }
    int64_t const nnz_cols = dims[kSalientCols].d[0];
    int64_t const nnz_q = dims[kSalientQ].d[0];
    if (nnz_cols >= 0 && nnz_q >= 0 && nnz_cols != nnz_q) return "salient_cols and salient_q differ in length";
    return {};
}

bool supports_io(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* in_out, int32_t nb_inputs,
                 int32_t nb_outputs) {
    if (pos < 0 || pos >= nb_inputs + nb_outputs || nb_outputs != 1) return false;
    nvinfer1::PluginTensorDesc const& d = in_out[pos].desc;
    if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
    if (pos == nb_inputs) return d.type == in_out[kX].desc.type;
    switch (pos) {
        case kX: return d.type == DataType::kFLOAT || d.type == DataType::kHALF;
        case kBias: return d.type == DataType::kFLOAT;  // float32 whatever X's type (contract v2)
        case kSignBits:
        case kGroupCodes:
        case kSalientCols:  // v3: two bytes per column (TensorRT has no 16-bit integer type)
        case kSalientQ: return d.type == DataType::kINT8;
        case kSalientRowptr: return d.type == DataType::kINT32;
        case kGroupScales:
        case kSalientScale:
        case kRowScales: return d.type == DataType::kHALF;
        default: return false;
    }
}

int64_t leading_rows(nvinfer1::Dims const& x_dims) {
    int64_t rows = 1;
    for (int32_t i = 0; i + 1 < x_dims.nbDims; ++i) rows *= x_dims.d[i];
    return rows;
}

SageGemmArgs launch_args(SageGemmAttrs const& attrs, nvinfer1::PluginTensorDesc const* input_desc,
                         void const* const* inputs, void* output, int32_t nb_inputs) {
    auto dtype_of = [](DataType t) { return t == DataType::kHALF ? SAGE_DTYPE_FLOAT16 : SAGE_DTYPE_FLOAT32; };
    SageGemmArgs a;
    std::memset(&a, 0, sizeof(a));
    a.x = inputs[kX];
    a.sign_bits = static_cast<int8_t const*>(inputs[kSignBits]);
    a.group_codes = static_cast<int8_t const*>(inputs[kGroupCodes]);
    a.group_scales = static_cast<uint16_t const*>(inputs[kGroupScales]);
    a.salient_rowptr = static_cast<int32_t const*>(inputs[kSalientRowptr]);
    // [nnz, 2] little-endian bytes read as uint16 (every target is little-endian; TensorRT buffers are aligned).
    a.salient_cols = static_cast<uint16_t const*>(inputs[kSalientCols]);
    a.salient_q = static_cast<int8_t const*>(inputs[kSalientQ]);
    a.salient_scale = static_cast<uint16_t const*>(inputs[kSalientScale]);
    // An empty row_scales (v3) means every r_n = 1: NULL tells the kernels so (the pointer of an empty tensor is
    // not meant to be read).
    bool const row_scaled = input_desc[kRowScales].dims.d[0] != 0;
    a.row_scales = row_scaled ? static_cast<uint16_t const*>(inputs[kRowScales]) : nullptr;
    bool const has_bias = nb_inputs == kMaxInputs;
    a.bias = has_bias ? inputs[kBias] : nullptr;
    a.y = output;
    a.m = leading_rows(input_desc[kX].dims);
    // The kernels clamp every CSR index to nnz; the shorter of the two arrays keeps both reads in bounds should
    // their lengths ever disagree (configurePlugin rejects that, but enqueue must not depend on it).
    a.nnz = std::min(input_desc[kSalientCols].dims.d[0], input_desc[kSalientQ].dims.d[0]);
    a.k = attrs.in_features;
    a.n = attrs.out_features;
    a.n_groups = attrs.n_groups;
    a.salient_bits = attrs.salient_bits;
    a.x_dtype = dtype_of(input_desc[kX].type);
    a.bias_dtype = has_bias ? dtype_of(input_desc[kBias].type) : SAGE_DTYPE_FLOAT32;
    a.path = SAGE_PATH_AUTO;
    return a;
}

}  // namespace sage
