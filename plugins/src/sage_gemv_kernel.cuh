// Decode path (small M): one output row per team of 8 lanes, packed weights streamed with 128-bit loads.
//
// A K tile is 1024 columns: each lane of a team loads 16 bytes of the sign row and of every code plane (128
// columns), the block stages the matching activations as float32 in shared memory, and every weight is decoded
// through the ±α lookup table and multiplied into up to 8 activation rows at once. Salient entries are applied
// afterwards from the CSR arrays; the team then reduces its partial sums with warp shuffles and multiplies the
// binary sum by the row's r_n (contract v2) once per output.
#pragma once

#include "sage_gemm_internal.cuh"

namespace sage {
namespace gemv {

constexpr int kWarps = 8;
constexpr int kTeam = 8;                                 // lanes sharing one output row
constexpr int kRowsPerBlock = kWarps * (32 / kTeam);     // 32
constexpr int kChunkBytes = 16;                          // one 128-bit load: 128 columns
constexpr int kTileBytes = kTeam * kChunkBytes;          // bytes of one packed row per K tile
constexpr int kTileCols = kTileBytes * 8;                // 1024
constexpr int kChunkCols = kChunkBytes * 8;              // 128
constexpr int kChunkStride = kChunkCols + 4;             // 4 pad floats: the team's LDS.128 hit distinct banks
constexpr int kXsStride = kTeam * kChunkStride;          // floats per activation row of a staged tile

struct Chunk {
    uint4 sign;
    uint4 code[kMaxPlanes];
};

__device__ __forceinline__ uint32_t word_of(const uint4& v, int w) {
    return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

// 16 bytes of one packed row starting at `offset`; bytes past the row end read as 0. `vec` is true when every row
// start is 16-byte aligned (ceil(K/8) % 16 == 0 and aligned base pointers), so one 128-bit load is safe.
__device__ __forceinline__ uint4 load16(const uint8_t* row, int offset, int kb, bool vec) {
    if (vec) {
        return offset < kb ? __ldg(reinterpret_cast<const uint4*>(row + offset)) : make_uint4(0, 0, 0, 0);
    }
    uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < kChunkBytes; ++i) {
        if (offset + i < kb) w[i / 4] |= static_cast<uint32_t>(__ldg(row + offset + i)) << (8 * (i % 4));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ Chunk load_chunk(const Problem& p, int row, int tile, int team_lane, bool vec) {
    Chunk c{};
    if (row >= p.n) return c;
    const int offset = tile * kTileBytes + team_lane * kChunkBytes;
    const int64_t row_start = static_cast<int64_t>(row) * p.kb;
    c.sign = load16(p.sign + row_start, offset, p.kb, vec);
    const int64_t plane_stride = static_cast<int64_t>(p.n) * p.kb;
#pragma unroll
    for (int pl = 0; pl < kMaxPlanes; ++pl) {
        if (pl < p.planes) c.code[pl] = load16(p.codes + pl * plane_stride + row_start, offset, p.kb, vec);
    }
    return c;
}

// Activations [m0, m0+MT) x [col0, col0+1024) as float32; rows past M and columns past K are 0, which also
// neutralises padding bits and chunks past the row end.
template <typename T, int MT>
__device__ __forceinline__ void stage_x(float* xs, const Problem& p, int64_t m0, int col0) {
    const T* x = static_cast<const T*>(p.x);
    for (int i = threadIdx.x; i < MT * kTileCols; i += blockDim.x) {
        const int m = i / kTileCols;
        const int c = i % kTileCols;
        const int64_t row = m0 + m;
        const int col = col0 + c;
        const float v = (row < p.m && col < p.k) ? to_float(x[row * p.k + col]) : 0.0f;
        xs[m * kXsStride + (c / kChunkCols) * kChunkStride + c % kChunkCols] = v;
    }
}

// One lane's 128 columns of the current tile, 8 columns (one byte of every plane) at a time.
template <int MT>
__device__ __forceinline__ void accumulate_chunk(float (&acc)[MT], const Chunk& c, const float* xs,
                                                 const float* lut, int team_lane, int planes) {
#pragma unroll
    for (int b = 0; b < kChunkBytes; ++b) {
        const int shift = 8 * (b % 4);
        const uint32_t sign = word_of(c.sign, b / 4) >> shift;
        int idx[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) idx[j] = (sign >> j) & 1;
#pragma unroll
        for (int pl = 0; pl < kMaxPlanes; ++pl) {
            if (pl < planes) {
                const uint32_t code = word_of(c.code[pl], b / 4) >> shift;
#pragma unroll
                for (int j = 0; j < 8; ++j) idx[j] |= ((code >> j) & 1) << (pl + 1);
            }
        }
        const float* xb = xs + team_lane * kChunkStride + b * 8;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const float w0 = lut[idx[4 * half + 0]];
            const float w1 = lut[idx[4 * half + 1]];
            const float w2 = lut[idx[4 * half + 2]];
            const float w3 = lut[idx[4 * half + 3]];
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                const float4 xv = *reinterpret_cast<const float4*>(xb + m * kXsStride + 4 * half);
                acc[m] = fmaf(w0, xv.x, acc[m]);
                acc[m] = fmaf(w1, xv.y, acc[m]);
                acc[m] = fmaf(w2, xv.z, acc[m]);
                acc[m] = fmaf(w3, xv.w, acc[m]);
            }
        }
    }
}

// The team's lanes split the row's salient entries; activations come from global memory (L1/L2 resident). The
// binary weight under each entry is taken back from acc (the sum r_n multiplies), its salient value goes to sal.
// e is 64-bit because e + kTeam passes INT32_MAX when nnz is close to it.
template <typename T, int MT>
__device__ __forceinline__ void add_salient(float (&acc)[MT], float (&sal)[MT], const Problem& p, int row,
                                            int64_t m0, int team_lane, const float* lut) {
    const T* x = static_cast<const T*>(p.x);
    const float scale = __half2float(p.salient_scale[row]);
    const SalientRange range = salient_range(p, row);
    for (int64_t e = static_cast<int64_t>(range.begin) + team_lane; e < range.end; e += kTeam) {
        const int col = p.cols[e];
        if (!column_in_range(p, col)) continue;
        const float binary = lut[binary_index(p, row, col)];
        const float salient = scale * static_cast<float>(p.q[e]);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m0 + m < p.m) {
                const float xv = to_float(x[(m0 + m) * p.k + col]);
                acc[m] = fmaf(-binary, xv, acc[m]);
                sal[m] = fmaf(salient, xv, sal[m]);
            }
        }
    }
}

template <typename T, int MT>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(Problem p, bool vec) {
    static_assert(MT <= kTeam, "each team lane writes one activation row");
    __shared__ __align__(16) float xs[MT * kXsStride];
    __shared__ float lut[kLutSize];

    const int team_lane = threadIdx.x % kTeam;
    const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kTeam;
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
    fill_lut(lut, p);

    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;

    // The next tile's weights are in flight while this tile's activations are staged and consumed.
    const int n_tiles = (p.kb + kTileBytes - 1) / kTileBytes;
    Chunk next = load_chunk(p, row, 0, team_lane, vec);
    for (int tile = 0; tile < n_tiles; ++tile) {
        const Chunk cur = next;
        if (tile + 1 < n_tiles) next = load_chunk(p, row, tile + 1, team_lane, vec);
        __syncthreads();
        stage_x<T, MT>(xs, p, m0, tile * kTileCols);
        __syncthreads();
        accumulate_chunk<MT>(acc, cur, xs, lut, team_lane, p.planes);
    }
    float sal[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) sal[m] = 0.0f;
    if (row < p.n) add_salient<T, MT>(acc, sal, p, row, m0, team_lane, lut);

#pragma unroll
    for (int offset = kTeam / 2; offset > 0; offset /= 2) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], offset);
            sal[m] += __shfl_xor_sync(0xffffffffu, sal[m], offset);
        }
    }
    if (row >= p.n) return;
    const float r = row_scale(p, row);  // contract v2: one multiply per output, none per weight
    const float b = bias_at(p, row);
    T* y = static_cast<T*>(p.y);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        if (m == team_lane && m0 + m < p.m) y[(m0 + m) * p.n + row] = from_float<T>(fmaf(r, acc[m], sal[m]) + b);
    }
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Activation rows per pass: the smallest of 1, 2, 4, 8 that covers M (8 for larger M, one pass per grid row).
inline int rows_per_pass(int64_t m) { return m >= 5 ? 8 : m >= 3 ? 4 : static_cast<int>(m); }

// Picks the kernel instance and launch shape; launch(kernel, grid, block, args...) enqueues it (StreamLauncher on
// a GPU, the CPU emulator in plugins/tests).
template <typename T, typename Launcher>
cudaError_t dispatch(const Problem& p, const Launcher& launch) {
    const int mt = rows_per_pass(p.m);
    const int64_t passes = (p.m + mt - 1) / mt;
    if (passes > 65535) return cudaErrorInvalidConfiguration;
    const bool vec = p.kb % kChunkBytes == 0 && aligned16(p.sign) && (p.planes == 0 || aligned16(p.codes));
    const dim3 grid((p.n + kRowsPerBlock - 1) / kRowsPerBlock, static_cast<unsigned>(passes));
    const dim3 block(kWarps * 32);
    switch (mt) {
        case 1: return launch(gemv_kernel<T, 1>, grid, block, p, vec);
        case 2: return launch(gemv_kernel<T, 2>, grid, block, p, vec);
        case 4: return launch(gemv_kernel<T, 4>, grid, block, p, vec);
        default: return launch(gemv_kernel<T, 8>, grid, block, p, vec);
    }
}

}  // namespace gemv
}  // namespace sage
