// Plain C++ kernels: any CPU, and the reference the SIMD kernels are tested against (SAGE_CPU_ISA=portable).
#include "kernels.h"

namespace sage_cpu {
namespace {

void decode_rows(const DecodeView& v, int64_t n0, int rows, const float* row_scale, float* w, int64_t ldw) {
  const int64_t plane_stride = v.n * v.bytes;
  for (int r = 0; r < rows; ++r) {
    const int64_t row = n0 + r;
    float scaled[16];  // r_n · α_g: exact in float32 (two float16 mantissas), so Ŵ is the reference's
    if (row_scale)
      for (int g = 0; g < 16; ++g) scaled[g] = row_scale[r] * v.table[g];
    const float* table = row_scale ? scaled : v.table;  // no r_n: α_g as they are
    const uint8_t* sign = v.sign_bits + row * v.bytes;
    const uint8_t* codes = v.group_codes + row * v.bytes;
    float* out = w + r * ldw;
    for (int64_t c = 0; c < v.bytes; ++c) {
      for (int j = 0; j < 8; ++j) {
        int g = 0;
        for (int p = 0; p < v.planes; ++p) g |= ((codes[p * plane_stride + c] >> j) & 1) << p;
        const float alpha = table[g];
        out[8 * c + j] = ((sign[c] >> j) & 1) ? alpha : -alpha;
      }
    }
  }
}

void gemm(const float* x, int64_t m, int64_t ldx, const float* w, int64_t ldw, int64_t kv, float* y, int64_t ldy,
          int valid) {
  for (int64_t i = 0; i < m; ++i) {
    for (int j = 0; j < valid; ++j) {
      // Eight partial sums, so the compiler may vectorise without reassociating a single sum.
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const float* xr = x + i * ldx;
      const float* wr = w + j * ldw;
      for (int64_t c = 0; c < kv; c += 8)
        for (int l = 0; l < 8; ++l) part[l] += xr[c + l] * wr[c + l];
      y[i * ldy + j] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    }
  }
}

}  // namespace

IsaKernels portable_kernels() { return {"portable", 4, decode_rows, gemm, nullptr}; }

}  // namespace sage_cpu
