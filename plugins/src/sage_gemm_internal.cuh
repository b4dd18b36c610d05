// Pieces shared by the GEMV (decode) and tiled (prefill) kernels: the validated problem, dtype conversion, the
// ±α lookup table and the decoding of one packed weight.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>

#include "sage_gemm_api.h"

namespace sage {

constexpr int kMaxPlanes = 4;                      // ceil(log2(SAGE_MAX_GROUPS))
constexpr int kLutSize = 2 * SAGE_MAX_GROUPS;      // index = (group << 1) | sign_bit
static_assert((1 << kMaxPlanes) == SAGE_MAX_GROUPS, "planes and groups disagree");

// What the kernels read: SageGemmArgs after validation, with the derived sizes.
struct Problem {
    const void* x;
    const uint8_t* sign;
    const uint8_t* codes;
    const __half* scales;
    const int32_t* rowptr;
    const uint16_t* cols;  // v3: 16-bit columns, so every one is >= 0 (only < K needs checking)
    const int8_t* q;
    const __half* salient_scale;
    const __half* row_scales;  // r_n: every kernel applies it once per output row to the row's binary sum (v2);
                               // NULL: every r_n is 1 (v3)
    const void* bias;
    void* y;
    int64_t m;
    int k;          // 1..SAGE_MAX_K, n 1..SAGE_MAX_FEATURES: int index math cannot overflow (sage_gemm_api.h)
    int n;
    int nnz;        // length of cols and q: every CSR read is clamped to it
    int kb;         // bytes per packed row: ceil(K/8)
    int groups;
    int planes;     // ceil(log2(groups))
    bool bias_half;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float bias_at(const Problem& p, int row) {
    if (p.bias == nullptr) return 0.0f;
    return p.bias_half ? __half2float(static_cast<const __half*>(p.bias)[row])
                       : static_cast<const float*>(p.bias)[row];
}

// lut[(g << 1) | s] = s ? +α_g : -α_g. Codes >= G violate the contract; they decode to 0 rather than read garbage.
__device__ __forceinline__ void fill_lut(float* lut, const Problem& p) {
    for (int i = threadIdx.x; i < kLutSize; i += blockDim.x) {
        const int g = i >> 1;
        const float alpha = g < p.groups ? __half2float(p.scales[g]) : 0.0f;
        lut[i] = (i & 1) ? alpha : -alpha;
    }
}

// The entries of one CSR row, [begin, end) within [0, nnz) whatever rowptr holds: a corrupt rowptr (or the
// uninitialised inputs TensorRT times tactics with) then yields a wrong or empty row, never an illegal address.
struct SalientRange {
    int begin;
    int end;
};

__device__ __forceinline__ int clamp_index(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

__device__ __forceinline__ SalientRange salient_range(const Problem& p, int row) {
    const int begin = clamp_index(p.rowptr[row], 0, p.nnz);
    return {begin, clamp_index(p.rowptr[row + 1], begin, p.nnz)};
}

// A column >= K would index x and the bit planes out of bounds (16-bit columns are never negative; the unsigned
// compare would reject those too).
__device__ __forceinline__ bool column_in_range(const Problem& p, int col) {
    return static_cast<unsigned>(col) < static_cast<unsigned>(p.k);
}

// LUT index of the binary weight at (row, col), read straight from global memory (used for salient entries, whose
// column the caller has checked).
__device__ __forceinline__ int binary_index(const Problem& p, int row, int col) {
    const int64_t byte = static_cast<int64_t>(row) * p.kb + (col >> 3);
    const int bit = col & 7;
    int idx = (p.sign[byte] >> bit) & 1;
    const int64_t plane_stride = static_cast<int64_t>(p.n) * p.kb;
    for (int pl = 0; pl < p.planes; ++pl) idx |= ((p.codes[pl * plane_stride + byte] >> bit) & 1) << (pl + 1);
    return idx;
}

// Contract v2/v3: Ŵ[n, k] = r_n·(±α_g) off the salient set, salient_scale[n]·q on it. The kernels factor r_n out of
// the row's sum, so no per-weight work is added:
//     Y[n] = r_n·(Σ_k x_k·w_bin(n, k) − Σ_salient x_k·w_bin(n, k)) + Σ_salient x_k·salient_scale[n]·q
// where w_bin = ±α_g is what the bits encode (at salient positions too: canonical or not). GEMV, GEMV2 and the
// tiled kernels keep the two salient sums apart (the binary part goes into the sum r_n multiplies), so one
// nonzero activation per row still gives Ŵ exactly; GEMV3 folds r_n into a per-row constant instead (below).
// An empty row_scales (v3) arrives as NULL: r_n = 1. The branch is uniform and taken once per output row.
__device__ __forceinline__ float row_scale(const Problem& p, int row) {
    return p.row_scales != nullptr ? __half2float(p.row_scales[row]) : 1.0f;
}

// Salient weight minus the binary weight the bits encode there (times r_n, a float16 product, exact in float32):
// adding corr·x to a sum that r_n multiplies after the fact replaces one by the other, so the kernels stay correct
// even for a non-canonical packing.
__device__ __forceinline__ float salient_correction(float salient_scale, int8_t q, float scaled_binary_weight) {
    return salient_scale * static_cast<float>(q) - scaled_binary_weight;
}

#ifdef __CUDACC__
// Enqueues a kernel on a stream: the `launch` argument of the gemv, gemv2 and tiled dispatchers on a GPU.
struct StreamLauncher {
    cudaStream_t stream;

    template <typename... Params, typename... Args>
    cudaError_t operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) const {
        kernel<<<grid, block, 0, stream>>>(args...);
        return cudaGetLastError();
    }
};
#endif

template <typename T> cudaError_t launch_gemv(const Problem& p, cudaStream_t stream);
template <typename T> cudaError_t launch_gemv2(const Problem& p, cudaStream_t stream);
template <typename T> cudaError_t launch_tiled(const Problem& p, cudaStream_t stream);
cudaError_t launch_gemv3(const Problem& p, const uint32_t* prepared, cudaStream_t stream);
cudaError_t prepare_gemv3(const Problem& p, uint32_t* prepared, cudaStream_t stream);
int64_t gemv3_prepared_bytes(const Problem& p);  // 0 when GEMV3 cannot take the problem
bool gemv3_launchable(const Problem& p, bool half_x);  // the layout fits, X is float16 and 16-byte aligned
bool gemv3_device_ok();                           // compute capability 8.0 or later (mma.sync m16n8k16)

}  // namespace sage
