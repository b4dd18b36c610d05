// SageBinaryGemm on the CPU (contract v3, docs/sage_binary_gemm.md), straight from the packed tensors.
//
// Used by the ONNX Runtime custom op (sage_ort_op.cpp) and, through ctypes, by SageLinear on CPU tensors
// (sage_export/runtime/ort_op.py mirrors SageCpuArgs).
#pragma once

#include <cstdint>

#define SAGE_CPU_ABI_VERSION 3  // 2: row_scales (contract v2); 3: 16-bit salient_cols, row_scales may be null (v3)
#define SAGE_CPU_MAX_GROUPS 16          // one 16-entry scale table; the CUDA kernels' cap too
#define SAGE_CPU_MAX_FEATURES (1 << 30)  // largest N, as the CUDA kernels
#define SAGE_CPU_MAX_IN_FEATURES 65536   // largest K: contract v3 stores a salient column in 16 bits

#define SAGE_CPU_FLOAT32 0
#define SAGE_CPU_FLOAT16 1

#define SAGE_CPU_API __attribute__((visibility("default")))

extern "C" {

struct SageCpuArgs {
  const void* x;                 // [m, k] float32 or float16 (x_dtype), rows contiguous
  const uint8_t* sign_bits;      // [n, ceil(k/8)]
  const uint8_t* group_codes;    // [planes, n, ceil(k/8)], planes = ceil(log2 n_groups)
  const uint16_t* group_scales;  // [n_groups] float16 bits
  const int32_t* salient_rowptr; // [n + 1], clamped to [0, nnz] when read
  const uint16_t* salient_cols;  // [nnz], each must lie in [0, k): contract v3's int8 [nnz, 2] little-endian
                                 // bytes read as uint16 (so 2-byte aligned, on a little-endian machine)
  const int8_t* salient_q;       // [nnz], |q| <= 2^(b-1) - 1
  const uint16_t* salient_scale; // [n] float16 bits
  const uint16_t* row_scales;    // [n] float16 bits: r_n, the multiplier of row n's unsalient weights; null
                                 // for contract v3's empty [0]: every r_n is 1 and no row is multiplied
  const float* bias;             // [n] float32 or null
  void* y;                       // [m, n] in x_dtype
  int64_t m;
  int64_t nnz;
  int32_t k;
  int32_t n;
  int32_t n_groups;
  int32_t salient_bits;
  int32_t x_dtype;
  int32_t reserved;
};

// Computes y. Returns 0, or 1 with a one-line reason in err (null-terminated, at most err_len bytes) when the
// arguments or the packing are invalid; y is then unspecified. Never reads outside the arrays described above.
SAGE_CPU_API int sage_cpu_gemm(const SageCpuArgs* args, char* err, int64_t err_len);

// Checks the attributes alone (K, N, G, b); same return convention.
SAGE_CPU_API int sage_cpu_check_attrs(int64_t k, int64_t n, int64_t n_groups, int64_t salient_bits, char* err, int64_t err_len);

// "avx512", "avx2" or "portable": the kernels this process uses (SAGE_CPU_ISA=portable|avx2 forces a lower one).
SAGE_CPU_API const char* sage_cpu_isa();
SAGE_CPU_API int sage_cpu_threads();
SAGE_CPU_API int sage_cpu_abi_version();
}
