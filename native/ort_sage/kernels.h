// The two inner loops of the CPU op, one set per instruction set (portable, AVX2, AVX-512), chosen at run time.
//
// decode_rows writes the binary part of Ŵ (r_n·(±α) of each weight's group, contract v3) for a block of rows
// into a float buffer; the caller then writes the salient values over it (sage_cpu.cpp), so every path decodes
// the same exact Ŵ. r_n is folded into the row's 16-entry scale table (16 products a row, each exact in
// float32), never applied per weight. A null row_scale means every r_n is 1 (an empty row_scales): the table is
// α itself, no product at all. gemm multiplies float32 rows of X by a block of `nr` decoded rows. Both
// work on rows padded to kv columns (a multiple of 16): the caller zeroes the padding of X and of Ŵ, so the
// padding adds exact zeros.
#pragma once

#include <cstdint>

namespace sage_cpu {

struct DecodeView {
  const uint8_t* sign_bits;    // [n, bytes]
  const uint8_t* group_codes;  // [planes, n, bytes]
  int64_t n;
  int64_t bytes;               // ceil(k / 8)
  int planes;                  // 0..4
  const float* table;          // 16 scales: α_g for g < G, then α_{G-1} (a code >= G reads the last group)
};

struct IsaKernels {
  const char* name;
  int nr;  // rows of Ŵ per gemm call
  // Rows n0 .. n0+rows-1 into w (row stride ldw >= kv); writes at most round_up(8 * bytes, 16) floats a row.
  // row_scale[r] is r_n (float32) of row n0 + r: row r holds row_scale[r] · (±α); row_scale null: ±α.
  void (*decode_rows)(const DecodeView& view, int64_t n0, int rows, const float* row_scale, float* w,
                      int64_t ldw);
  // y[i * ldy + j] = Σ_c x[i * ldx + c] · w[j * ldw + c] over c < kv, for i < m and j < valid (<= nr);
  // w holds nr rows (those past `valid` are zeros).
  void (*gemm)(const float* x, int64_t m, int64_t ldx, const float* w, int64_t ldw, int64_t kv, float* y,
               int64_t ldy, int valid);
  // Optional (null where a kernel set has none), for m <= kFusedMaxM: decode and multiply in one pass, never
  // storing Ŵ. y[i * ldy + r] = row_scale[r] · Σ_c x[i * ldx + c] · binary(n0 + r, c) for r < rows, where binary
  // is the ±α part of every weight, salient positions included (the caller corrects those, sage_cpu.cpp), and
  // r_n is factored out of the row's sum: one multiply per output (none where row_scale is null).
  void (*gemv_binary)(const DecodeView& view, int64_t n0, int rows, const float* row_scale, const float* x,
                      int64_t m, int64_t ldx, int64_t kv, float* y, int64_t ldy);
};

constexpr int kFusedMaxM = 4;

IsaKernels portable_kernels();
#if defined(SAGE_CPU_X86)
IsaKernels avx2_kernels();
IsaKernels avx512_kernels();
#endif

}  // namespace sage_cpu
