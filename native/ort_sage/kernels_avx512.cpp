// AVX-512 kernels (compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma; called only when the CPU
// has them). Decode: two bytes of a row bitmap are 16 columns = one 16-lane vector, and a bitmap's two bytes are
// directly a lane mask: each plane adds 1 << p to the index where its bit is set, one permute of the 16-entry
// scale table gives α, and a masked XOR flips the sign where the sign bit is 0. r_n (contract v3) is multiplied
// into the table once a row by decode_rows, and factored out of each row's sum by the fused GEMV (neither where
// row_scales is empty: r_n = 1).
#include <immintrin.h>

#include <cstring>

#include "kernels.h"

namespace sage_cpu {
namespace {

// 16 columns of one row bitmap starting at byte c; the last chunk of an odd-width row has one byte only.
inline __mmask16 chunk_mask(const uint8_t* bitmap, int64_t c, int64_t bytes) {
  if (c + 1 < bytes) {
    uint16_t word;
    std::memcpy(&word, bitmap + c, 2);
    return static_cast<__mmask16>(word);
  }
  return static_cast<__mmask16>(bitmap[c]);
}

template <int P>
void decode_rows_p(const DecodeView& v, int64_t n0, int rows, const float* row_scale, float* w, int64_t ldw) {
  const int64_t plane_stride = v.n * v.bytes;
  const __m512 alpha = _mm512_loadu_ps(v.table);
  const __m512i sign_bit = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int r = 0; r < rows; ++r) {
    const int64_t row = n0 + r;
    // r_n · α_g, exact in float32
    const __m512 table = row_scale ? _mm512_mul_ps(alpha, _mm512_set1_ps(row_scale[r])) : alpha;
    const uint8_t* sign = v.sign_bits + row * v.bytes;
    const uint8_t* codes = v.group_codes + row * v.bytes;
    float* out = w + r * ldw;
    for (int64_t c = 0; c < v.bytes; c += 2) {
      __m512i idx = _mm512_setzero_si512();
      for (int p = 0; p < P; ++p)
        idx = _mm512_mask_or_epi32(idx, chunk_mask(codes + p * plane_stride, c, v.bytes), idx,
                                   _mm512_set1_epi32(1 << p));
      const __m512i value = _mm512_castps_si512(_mm512_permutexvar_ps(idx, table));
      const __mmask16 negative = static_cast<__mmask16>(~chunk_mask(sign, c, v.bytes));
      _mm512_storeu_ps(out + 8 * c, _mm512_castsi512_ps(_mm512_mask_xor_epi32(value, negative, value, sign_bit)));
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

constexpr int kNr = 8;

inline float hsum(__m512 v) {  // not _mm512_reduce_add_ps: GCC 12's header warns about its own code there
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// MR rows of X against the kNr rows of Ŵ: MR * kNr accumulators stay in the 32 vector registers.
template <int MR>
void micro(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t kv, float* y, int64_t ldy, int valid) {
  __m512 acc[MR][kNr];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNr; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < kv; c += 16) {
    __m512 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x + i * ldx + c);
    for (int j = 0; j < kNr; ++j) {
      const __m512 wv = _mm512_loadu_ps(w + j * ldw + c);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
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

// ------------------------------------------------------------------------------------------- fused GEMV
// For decode steps (m <= 4): 64 columns at a time. Each weight's sign and group form a 5-bit code built in a
// byte lane (sign -> 16, plane p -> 1 << p, all 64 lanes per instruction); one two-table permute then maps 16
// codes to ±α (entries 0-15 hold -α_g, 16-31 +α_g) and the products go straight into the accumulators. The
// row's r_n multiplies its finished sums (one multiply per output, not per weight).

// Up to 8 bytes of a row bitmap from byte c as a 64-lane mask; bytes past the row's end read as zeros.
inline __mmask64 mask64(const uint8_t* bitmap, int64_t c, int64_t bytes) {
  uint64_t word = 0;
  if (c + 8 <= bytes)
    std::memcpy(&word, bitmap + c, 8);  // a constant size: one load, not a call
  else
    for (int64_t i = c; i < bytes; ++i) word |= static_cast<uint64_t>(bitmap[i]) << (8 * (i - c));
  return static_cast<__mmask64>(word);
}

template <int P, int MR>
void gemv_rows(const DecodeView& v, int64_t n0, int rows, const float* row_scale, const float* x, int64_t ldx,
               int64_t kv, float* y, int64_t ldy) {
  const int64_t plane_stride = v.n * v.bytes;
  const __m512 positive = _mm512_loadu_ps(v.table);
  const __m512 negative = _mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(positive), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
  for (int r = 0; r < rows; ++r) {
    const int64_t row = n0 + r;
    const uint8_t* sign = v.sign_bits + row * v.bytes;
    const uint8_t* codes = v.group_codes + row * v.bytes;
    __m512 acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < v.bytes; c += 8) {
      __m512i code = _mm512_maskz_mov_epi8(mask64(sign, c, v.bytes), _mm512_set1_epi8(16));
      for (int p = 0; p < P; ++p)
        code = _mm512_mask_add_epi8(code, mask64(codes + p * plane_stride, c, v.bytes), code,
                                    _mm512_set1_epi8(static_cast<char>(1 << p)));
      const int64_t col = 8 * c;
      const auto quarter = [&](__m128i lane_codes, int q) {
        const __m512 w = _mm512_permutex2var_ps(negative, _mm512_cvtepu8_epi32(lane_codes), positive);
        for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + col + 16 * q), w, acc[i]);
      };
      // Quarters past kv (the padded row) are skipped: only the row's last chunk has any.
      const int64_t left = kv - col;
      quarter(_mm512_castsi512_si128(code), 0);
      if (left > 16) quarter(_mm512_extracti32x4_epi32(code, 1), 1);
      if (left > 32) quarter(_mm512_extracti32x4_epi32(code, 2), 2);
      if (left > 48) quarter(_mm512_extracti32x4_epi32(code, 3), 3);
    }
    for (int i = 0; i < MR; ++i) y[i * ldy + r] = row_scale ? row_scale[r] * hsum(acc[i]) : hsum(acc[i]);
  }
}

template <int P>
void gemv_p(const DecodeView& v, int64_t n0, int rows, const float* row_scale, const float* x, int64_t m,
            int64_t ldx, int64_t kv, float* y, int64_t ldy) {
  switch (m) {
    case 1: return gemv_rows<P, 1>(v, n0, rows, row_scale, x, ldx, kv, y, ldy);
    case 2: return gemv_rows<P, 2>(v, n0, rows, row_scale, x, ldx, kv, y, ldy);
    case 3: return gemv_rows<P, 3>(v, n0, rows, row_scale, x, ldx, kv, y, ldy);
    default: return gemv_rows<P, 4>(v, n0, rows, row_scale, x, ldx, kv, y, ldy);
  }
}

void gemv_binary(const DecodeView& v, int64_t n0, int rows, const float* row_scale, const float* x, int64_t m,
                 int64_t ldx, int64_t kv, float* y, int64_t ldy) {
  switch (v.planes) {
    case 0: return gemv_p<0>(v, n0, rows, row_scale, x, m, ldx, kv, y, ldy);
    case 1: return gemv_p<1>(v, n0, rows, row_scale, x, m, ldx, kv, y, ldy);
    case 2: return gemv_p<2>(v, n0, rows, row_scale, x, m, ldx, kv, y, ldy);
    case 3: return gemv_p<3>(v, n0, rows, row_scale, x, m, ldx, kv, y, ldy);
    default: return gemv_p<4>(v, n0, rows, row_scale, x, m, ldx, kv, y, ldy);
  }
}

}  // namespace

IsaKernels avx512_kernels() { return {"avx512", kNr, decode_rows, gemm, gemv_binary}; }

}  // namespace sage_cpu
