// Prefill path (large M): 64x64 output tiles. Each K step stages an activation tile and decodes the matching
// weight tile (binary part only, exact in float16 because ±α_g is a float16 value) into shared memory, applies the
// salient entries of that K step (their s·q·x summed in float32 apart, their binary weights zeroed in the shared
// tile), then multiplies the tiles (WMMA tensor cores for float16 activations, SIMT float32 FMA for float32
// activations). The epilogue multiplies the product, the binary part alone, by the row's r_n (contract v2) and
// adds the salient sums and the bias. float32 accumulation throughout.
#pragma once

#include <mma.h>

#include <type_traits>

#include "sage_gemm_internal.cuh"

namespace sage {
namespace tiled {

constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kOutLd = kBN + 4;  // float32 result tile row stride

constexpr int kWmmaThreads = 128;       // 4 warps, each a 32x32 block of the tile
constexpr int kWmmaBK = 64;
constexpr int kWmmaLd = kWmmaBK + 8;    // half elements; keeps WMMA's ldm a multiple of 8 and skews banks

constexpr int kSimtThreads = 256;       // 16x16 threads, each a 4x4 block of the tile
constexpr int kSimtBK = 32;
constexpr int kSimtLd = kSimtBK + 1;    // float elements; odd stride makes column reads conflict-free

template <typename TS> __device__ __forceinline__ TS store_as(float v);
template <> __device__ __forceinline__ float store_as<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store_as<__half>(float v) { return __float2half_rn(v); }

// Activations [m_base, +kBM) x [k0, +BK) into xs (row stride LD); zero outside M x K.
template <typename T, typename TS, int BK, int LD, int THREADS>
__device__ __forceinline__ void stage_x_tile(TS* xs, const Problem& p, int64_t m_base, int k0) {
    const T* x = static_cast<const T*>(p.x);
    for (int i = threadIdx.x; i < kBM * BK; i += THREADS) {
        const int r = i / BK;
        const int c = i % BK;
        const int64_t m = m_base + r;
        const int col = k0 + c;
        xs[r * LD + c] = store_as<TS>(m < p.m && col < p.k ? to_float(x[m * p.k + col]) : 0.0f);
    }
}

// Same for float16 activations when K % 8 == 0 and X is 16-byte aligned: 8 values per 128-bit load.
template <int BK, int LD, int THREADS>
__device__ __forceinline__ void stage_x_tile_vec(__half* xs, const Problem& p, int64_t m_base, int k0) {
    static_assert(BK % 8 == 0 && (LD * sizeof(__half)) % 16 == 0, "tile rows must hold whole 16-byte vectors");
    const __half* x = static_cast<const __half*>(p.x);
    constexpr int kVecPerRow = BK / 8;
    for (int v = threadIdx.x; v < kBM * kVecPerRow; v += THREADS) {
        const int r = v / kVecPerRow;
        const int c = (v % kVecPerRow) * 8;
        const int64_t m = m_base + r;
        const int col = k0 + c;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (m < p.m && col < p.k) val = __ldg(reinterpret_cast<const uint4*>(x + m * p.k + col));
        *reinterpret_cast<uint4*>(xs + r * LD + c) = val;
    }
}

// Binary weights [n_base, +kBN) x [k0, +BK) into ws (row stride LD): each thread decodes whole bytes of the sign
// row and of every code plane. Rows past N and bytes past the packed row are 0.
template <typename TS, int BK, int LD, int THREADS>
__device__ __forceinline__ void decode_w_tile(TS* ws, const Problem& p, const float* lut, int n_base, int k0) {
    constexpr int kCols = kBN * BK / THREADS;
    constexpr int kThreadsPerRow = BK / kCols;
    static_assert(kCols % 8 == 0, "a thread decodes whole bytes");
    const int r = threadIdx.x / kThreadsPerRow;
    const int c0 = (threadIdx.x % kThreadsPerRow) * kCols;
    const int row = n_base + r;
    const int64_t plane_stride = static_cast<int64_t>(p.n) * p.kb;
#pragma unroll
    for (int b = 0; b < kCols / 8; ++b) {
        const int byte = ((k0 + c0) >> 3) + b;
        TS* out = ws + r * LD + c0 + 8 * b;
        if (row >= p.n || byte >= p.kb) {
#pragma unroll
            for (int j = 0; j < 8; ++j) out[j] = store_as<TS>(0.0f);
            continue;
        }
        const int64_t at = static_cast<int64_t>(row) * p.kb + byte;
        const int sign = p.sign[at];
        int idx[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) idx[j] = (sign >> j) & 1;
        for (int pl = 0; pl < p.planes; ++pl) {
            const int code = p.codes[pl * plane_stride + at];
#pragma unroll
            for (int j = 0; j < 8; ++j) idx[j] |= ((code >> j) & 1) << (pl + 1);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) out[j] = store_as<TS>(lut[idx[j]]);
    }
}

// One thread owns one weight row of the tile and MR activation rows: it walks that row's CSR entries falling in
// [k0, k0+bk) (columns ascend, so a cursor suffices) and accumulates s·q·x from the shared activation tile. The
// row's `owner` (one of the threads sharing the weight row) also zeroes the binary weight the bits put there,
// whatever they encode (non-canonical packings included), before the tiles are multiplied: the product is then
// the binary part alone, which r_n multiplies in the epilogue. A column outside [0, K) is passed over for good,
// wherever it sits in the row, so it cannot hold back the entries after it; checking it first also keeps col - k0
// from overflowing.
template <typename TS, int MR, int LDX>
__device__ __forceinline__ void add_salient_tile(float (&corr)[MR], int& cursor, int end, float scale,
                                                 const Problem& p, const TS* xs_rows, TS* ws_row, bool owner,
                                                 int k0, int bk) {
    for (; cursor < end; ++cursor) {
        const int col = p.cols[cursor];
        if (!column_in_range(p, col)) continue;
        const int kk = col - k0;
        if (kk >= bk) break;
        if (kk < 0) continue;  // only reachable when columns do not ascend (contract violation)
        if (owner) ws_row[kk] = store_as<TS>(0.0f);
        const float c = scale * static_cast<float>(p.q[cursor]);
#pragma unroll
        for (int i = 0; i < MR; ++i) corr[i] = fmaf(c, to_float(xs_rows[i * LDX + kk]), corr[i]);
    }
}

// Salient state of the weight row a thread owns (rows past N have no entries).
struct SalientCursor {
    int cursor = 0;
    int end = 0;
    float scale = 0.0f;
};

__device__ __forceinline__ SalientCursor salient_cursor(const Problem& p, int row) {
    SalientCursor s;
    if (row < p.n) {
        const SalientRange range = salient_range(p, row);
        s.cursor = range.begin;
        s.end = range.end;
        s.scale = __half2float(p.salient_scale[row]);
    }
    return s;
}

// r_n · out (float32 tile of the binary part) + salient sums + bias -> Y, one weight row and MR activation rows
// per thread.
template <typename T, int MR>
__device__ __forceinline__ void write_tile(const float* out, const float (&corr)[MR], const Problem& p,
                                           int64_t m_base, int m_first, int n_base, int n_local) {
    const int row = n_base + n_local;
    if (row >= p.n) return;
    const float r = row_scale(p, row);
    const float b = bias_at(p, row);
    T* y = static_cast<T*>(p.y);
#pragma unroll
    for (int i = 0; i < MR; ++i) {
        const int64_t m = m_base + m_first + i;
        if (m < p.m) y[m * p.n + row] = from_float<T>(fmaf(r, out[(m_first + i) * kOutLd + n_local], corr[i]) + b);
    }
}

__global__ void __launch_bounds__(kWmmaThreads) tiled_wmma_kernel(Problem p, bool vec_x) {
    using namespace nvcuda;
    constexpr int kMR = kBM * kBN / kWmmaThreads;  // activation rows per thread in the salient/epilogue layout
    union __align__(32) Smem {
        struct {
            __half xs[kBM * kWmmaLd];
            __half ws[kBN * kWmmaLd];
        } in;
        float out[kBM * kOutLd];
    };
    __shared__ Smem sm;
    __shared__ float lut[kLutSize];

    const int warp = threadIdx.x / 32;
    const int wm = warp / 2;
    const int wn = warp % 2;
    const int64_t m_base = static_cast<int64_t>(blockIdx.y) * kBM;
    const int n_base = blockIdx.x * kBN;
    const int n_local = threadIdx.x % kBN;
    const int m_first = (threadIdx.x / kBN) * kMR;
    fill_lut(lut, p);
    SalientCursor sal = salient_cursor(p, n_base + n_local);
    float corr[kMR];
#pragma unroll
    for (int i = 0; i < kMR; ++i) corr[i] = 0.0f;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }
    __syncthreads();  // lut

    for (int k0 = 0; k0 < p.k; k0 += kWmmaBK) {
        if (vec_x) {
            stage_x_tile_vec<kWmmaBK, kWmmaLd, kWmmaThreads>(sm.in.xs, p, m_base, k0);
        } else {
            stage_x_tile<__half, __half, kWmmaBK, kWmmaLd, kWmmaThreads>(sm.in.xs, p, m_base, k0);
        }
        decode_w_tile<__half, kWmmaBK, kWmmaLd, kWmmaThreads>(sm.in.ws, p, lut, n_base, k0);
        __syncthreads();
        add_salient_tile<__half, kMR, kWmmaLd>(corr, sal.cursor, sal.end, sal.scale, p,
                                               sm.in.xs + m_first * kWmmaLd, sm.in.ws + n_local * kWmmaLd,
                                               m_first == 0, k0, kWmmaBK);
        __syncthreads();  // the salient positions of ws are zero
#pragma unroll
        for (int kk = 0; kk < kWmmaBK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                wmma::load_matrix_sync(a[i], sm.in.xs + (wm * 32 + i * 16) * kWmmaLd + kk, kWmmaLd);
                // B = Ŵᵀ: element (k, n) lives at ws[n][k], i.e. column-major with leading dimension kWmmaLd.
                wmma::load_matrix_sync(b[i], sm.in.ws + (wn * 32 + i * 16) * kWmmaLd + kk, kWmmaLd);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            wmma::store_matrix_sync(sm.out + (wm * 32 + i * 16) * kOutLd + wn * 32 + j * 16, acc[i][j], kOutLd,
                                    wmma::mem_row_major);
        }
    }
    __syncthreads();
    write_tile<__half, kMR>(sm.out, corr, p, m_base, m_first, n_base, n_local);
}

__global__ void __launch_bounds__(kSimtThreads) tiled_simt_kernel(Problem p) {
    constexpr int kMR = kBM * kBN / kSimtThreads;
    union Smem {
        struct {
            float xs[kBM * kSimtLd];
            float ws[kBN * kSimtLd];
        } in;
        float out[kBM * kOutLd];
    };
    __shared__ Smem sm;
    __shared__ float lut[kLutSize];

    const int tx = threadIdx.x % 16;  // output columns tx + 16j
    const int ty = threadIdx.x / 16;  // output rows ty + 16i
    const int64_t m_base = static_cast<int64_t>(blockIdx.y) * kBM;
    const int n_base = blockIdx.x * kBN;
    const int n_local = threadIdx.x % kBN;
    const int m_first = (threadIdx.x / kBN) * kMR;
    fill_lut(lut, p);
    SalientCursor sal = salient_cursor(p, n_base + n_local);
    float corr[kMR];
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < kMR; ++i) corr[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    }
    __syncthreads();  // lut

    for (int k0 = 0; k0 < p.k; k0 += kSimtBK) {
        stage_x_tile<float, float, kSimtBK, kSimtLd, kSimtThreads>(sm.in.xs, p, m_base, k0);
        decode_w_tile<float, kSimtBK, kSimtLd, kSimtThreads>(sm.in.ws, p, lut, n_base, k0);
        __syncthreads();
        add_salient_tile<float, kMR, kSimtLd>(corr, sal.cursor, sal.end, sal.scale, p,
                                              sm.in.xs + m_first * kSimtLd, sm.in.ws + n_local * kSimtLd,
                                              m_first == 0, k0, kSimtBK);
        __syncthreads();  // the salient positions of ws are zero
#pragma unroll 8
        for (int kk = 0; kk < kSimtBK; ++kk) {
            float a[4];
            float b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = sm.in.xs[(ty + 16 * i) * kSimtLd + kk];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = sm.in.ws[(tx + 16 * j) * kSimtLd + kk];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) sm.out[(ty + 16 * i) * kOutLd + tx + 16 * j] = acc[i][j];
    }
    __syncthreads();
    write_tile<float, kMR>(sm.out, corr, p, m_base, m_first, n_base, n_local);
}

inline dim3 tile_grid(const Problem& p) {
    return dim3((p.n + kBN - 1) / kBN, static_cast<unsigned>((p.m + kBM - 1) / kBM));
}

// See dispatch_gemv: the kernel instance and launch shape for the prefill path.
template <typename T, typename Launcher>
cudaError_t dispatch(const Problem& p, const Launcher& launch) {
    if ((p.m + kBM - 1) / kBM > 65535) return cudaErrorInvalidConfiguration;
    if constexpr (std::is_same<T, __half>::value) {
        const bool vec_x = p.k % 8 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
        return launch(tiled_wmma_kernel, tile_grid(p), dim3(kWmmaThreads), p, vec_x);
    } else {
        return launch(tiled_simt_kernel, tile_grid(p), dim3(kSimtThreads), p);
    }
}

}  // namespace tiled
}  // namespace sage
