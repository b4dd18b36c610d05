// AVX2 + FMA kernels (compiled with -mavx2 -mfma; called only when the CPU has both).
// Decode: one byte of a row bitmap is 8 columns = one 8-lane vector. Each plane byte becomes a lane mask, the
// masks sum to the group index, two 8-entry permutes look the scale up, and the sign bit flips the float's sign.
// r_n (contract v3) is multiplied into the row's two table vectors, once a row (not at all without row_scales).
#include <immintrin.h>

#include "kernels.h"

namespace sage_cpu {
namespace {

inline __m256i lane_mask(uint8_t byte) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(byte), bits), bits);
}

template <int P>
void decode_rows_p(const DecodeView& v, int64_t n0, int rows, const float* row_scale, float* w, int64_t ldw) {
  const int64_t plane_stride = v.n * v.bytes;
  const __m256 table_low = _mm256_loadu_ps(v.table);
  const __m256 table_high = _mm256_loadu_ps(v.table + 8);
  const __m256i sign_bit = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (int r = 0; r < rows; ++r) {
    const int64_t row = n0 + r;
    // r_n · α_g, exact in float32; without row_scales the table is α itself
    const __m256 low = row_scale ? _mm256_mul_ps(table_low, _mm256_set1_ps(row_scale[r])) : table_low;
    const __m256 high = row_scale ? _mm256_mul_ps(table_high, _mm256_set1_ps(row_scale[r])) : table_high;
    const uint8_t* sign = v.sign_bits + row * v.bytes;
    const uint8_t* codes = v.group_codes + row * v.bytes;
    float* out = w + r * ldw;
    for (int64_t c = 0; c < v.bytes; ++c) {
      __m256i idx = _mm256_setzero_si256();
      for (int p = 0; p < P; ++p)
        idx = _mm256_or_si256(idx, _mm256_and_si256(lane_mask(codes[p * plane_stride + c]), _mm256_set1_epi32(1 << p)));
      __m256 value = _mm256_permutevar8x32_ps(low, idx);
      if (P == 4) {  // groups 8..15: bit 3 of the index, moved to the lane's sign bit, picks the second table
        const __m256 upper = _mm256_permutevar8x32_ps(high, idx);
        value = _mm256_blendv_ps(value, upper, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
      }
      const __m256i negate = _mm256_andnot_si256(lane_mask(sign[c]), sign_bit);  // sign bit 0 -> -α
      _mm256_storeu_ps(out + 8 * c, _mm256_xor_ps(value, _mm256_castsi256_ps(negate)));
    }
  }
}

void decode_rows(const DecodeView& v, int64_t n0, int rows, const float* row_scale, float* w, int64_t ldw) {
  switch (v.planes) {
    case 0: return decode_rows_p<0>(v, n0, rows, row_scale, w, ldw);
    case 1: return decode_rows_p<1>(v, n0, rows, row_scale, w, ldw);
    case 2: return decode_rows_p<2>(v, n0, rows, row_scale, w, ldw);
    case 3: return decode_rows_p<3>(v, n0, rows, row_scale, w, ldw);
    default: return decode_rows_p<4>(v, n0, rows, row_scale, w, ldw);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

constexpr int kNr = 4;

// MR rows of X against the kNr rows of Ŵ: MR * kNr accumulators stay in registers.
template <int MR>
void micro(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t kv, float* y, int64_t ldy, int valid) {
  __m256 acc[MR][kNr];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNr; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < kv; c += 8) {
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + c);
    for (int j = 0; j < kNr; ++j) {
      const __m256 wv = _mm256_loadu_ps(w + j * ldw + c);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < valid; ++j) y[i * ldy + j] = hsum(acc[i][j]);
}

void gemm(const float* x, int64_t m, int64_t ldx, const float* w, int64_t ldw, int64_t kv, float* y, int64_t ldy,
          int valid) {
  int64_t i = 0;
  for (; i + 2 <= m; i += 2) micro<2>(x + i * ldx, ldx, w, ldw, kv, y + i * ldy, ldy, valid);
  if (i < m) micro<1>(x + i * ldx, ldx, w, ldw, kv, y + i * ldy, ldy, valid);
}

}  // namespace

IsaKernels avx2_kernels() { return {"avx2", kNr, decode_rows, gemm, nullptr}; }

}  // namespace sage_cpu
