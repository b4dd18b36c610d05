// Decode path built for memory bandwidth (SAGE_PATH_GEMV2): no lookup table in shared memory, salient entries
// consumed inside the K loop, small blocks so that many rows' loads are in flight per SM.
//
// Σ_k x_k·(±α_g(k)) is formed from registers only: for G <= 2 as group sums Σ_g α_g·S_g, S_g = Σ ±x_k over the
// columns of group g (α_g applied once per 128 columns), for larger G by choosing ±α_g per weight with a select
// tree over α (see kGroupSums). Either way the result differs from the reference only by the order of the
// float32 additions. One warp owns two output rows and walks K in tiles of 4096 columns, one 128-bit load per
// lane, row and bit plane, with the next tile's loads issued before the current tile is consumed. The row's r_n
// (contract v2) multiplies the reduced binary sum once per output; the salient values are summed apart.
#pragma once

#include "sage_gemv_kernel.cuh"

namespace sage {
namespace gemv2 {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 2;                          // the rows share each activation load of a lane
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;     // 8: 512 blocks for N = 4096
constexpr int kChunkBytes = gemv::kChunkBytes;           // one 128-bit load per row and plane: 128 columns
constexpr int kChunkCols = kChunkBytes * 8;
constexpr int kWordsPerChunk = kChunkBytes / 4;
constexpr int kTileBytes = 32 * kChunkBytes;             // a warp's step along a packed row
constexpr int kTileCols = kTileBytes * 8;                // 4096
constexpr int kMaxRowsPerPass = 8;                       // activation rows per pass, as in gemv::rows_per_pass

// Per-lane float32 accumulators of one warp row for every activation row of the pass. They live in shared
// memory, each lane touching only its own column, so that the activation row can be a runtime loop: a register
// array would need one kernel instance per row count (the unrolled instances took minutes to compile).
struct Accumulators {
    float v[kMaxRowsPerPass][32];
};

template <int P>
struct RowBits {
    uint4 sign;
    uint4 code[P > 0 ? P : 1];
};

template <int P>
struct Tile {
    RowBits<P> row[kRowsPerWarp];
};

// The CSR entries of one row not yet applied: [next, end), already clamped to [0, nnz).
struct Cursor {
    int next;
    int end;
};

template <int P>
__device__ __forceinline__ Tile<P> load_tile(const Problem& p, int row0, int tile, int lane, bool vec) {
    Tile<P> t{};
    const int offset = tile * kTileBytes + lane * kChunkBytes;
    const int64_t plane_stride = static_cast<int64_t>(p.n) * p.kb;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
        if (row0 + r >= p.n) continue;
        const int64_t row_start = static_cast<int64_t>(row0 + r) * p.kb;
        t.row[r].sign = gemv::load16(p.sign + row_start, offset, p.kb, vec);
#pragma unroll
        for (int pl = 0; pl < P; ++pl) {
            t.row[r].code[pl] = gemv::load16(p.codes + pl * plane_stride + row_start, offset, p.kb, vec);
        }
    }
    return t;
}

// 32 activations of row `row` (< M) from column col0 on, as float32; columns past K read as 0, which also
// neutralises padding bits. `vec`: x and every row start are 16-byte aligned, so K is a multiple of the
// 16-byte piece and no piece straddles K.
__device__ __forceinline__ void load_x_piece(float* out, const float* x, int64_t at, int col, int k, bool vec) {
    if (vec) {
        const float4 v = col < k ? __ldg(reinterpret_cast<const float4*>(x + at)) : make_float4(0, 0, 0, 0);
        out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
        return;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = col + i < k ? __ldg(x + at + i) : 0.0f;
}

__device__ __forceinline__ void load_x_piece(float* out, const __half* x, int64_t at, int col, int k, bool vec) {
    if (vec) {
        uint4 raw = col < k ? __ldg(reinterpret_cast<const uint4*>(x + at)) : make_uint4(0, 0, 0, 0);
        const __half* h = reinterpret_cast<const __half*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = __half2float(h[i]);
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = col + i < k ? __half2float(x[at + i]) : 0.0f;
}

template <typename T>
__device__ __forceinline__ void load_x_word(float (&out)[32], const Problem& p, int64_t row, int col0, bool vec) {
    constexpr int kPiece = 16 / sizeof(T);
    const T* x = static_cast<const T*>(p.x);
#pragma unroll
    for (int i = 0; i < 32; i += kPiece) load_x_piece(out + i, x, row * p.k + col0 + i, col0 + i, p.k, vec);
}

// Two ways to get Σ_j ±α_g(j)·x_j without a lookup table in memory, both exact up to the order of float32 sums.
// Group sums (S_g += ±x_j, α_g applied once per chunk) cost a select and G predicated adds per weight; a select
// tree over the α_g held in registers costs G − 1 selects, the sign and one FMA. ptxas turns every group's bit test
// into its own instruction, so group sums win only for G <= 2: the sm_90 SASS of the column loop has 3.3 (G = 1),
// 6.3 (G = 2) and 12.4 (G = 4) instructions per weight with group sums, 3.3, 6.7 and 8.2 with the select tree.
template <int P>
constexpr bool kGroupSums = P <= 1;
template <int P>
constexpr int kSums = kGroupSums<P> ? (1 << P) : 1;

// s[g] += ±x_j over the word's columns j of group g.
template <int P>
__device__ __forceinline__ void group_sums(float (&s)[1 << P], const float (&x)[32], const RowBits<P>& b, int w) {
    const uint32_t sign = gemv::word_of(b.sign, w);
    const uint32_t code = P == 1 ? gemv::word_of(b.code[0], w) : 0u;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        const float v = (sign >> j) & 1 ? x[j] : -x[j];
        if (P == 0 || !((code >> j) & 1)) {
            s[0] += v;
        } else {
            s[P == 0 ? 0 : 1] += v;
        }
    }
}

// s[0] += ±α_g(j)·x_j, ±α_g(j) chosen plane by plane from the G values in registers.
template <int P>
__device__ __forceinline__ void select_tree(float& s, const float (&x)[32], const RowBits<P>& b, int w,
                                           const float (&alpha)[1 << P]) {
    const uint32_t sign = gemv::word_of(b.sign, w);
    uint32_t code[P > 0 ? P : 1];
#pragma unroll
    for (int pl = 0; pl < P; ++pl) code[pl] = gemv::word_of(b.code[pl], w);
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        float t[1 << P];
#pragma unroll
        for (int g = 0; g < (1 << P); ++g) t[g] = alpha[g];
#pragma unroll
        for (int pl = P - 1; pl >= 0; --pl) {
            const bool bit = (code[pl] >> j) & 1;
#pragma unroll
            for (int g = 0; g < (1 << pl); ++g) t[g] = bit ? t[g + (1 << pl)] : t[g];
        }
        s = fmaf((sign >> j) & 1 ? t[0] : -t[0], x[j], s);
    }
}

template <int P>
__device__ __forceinline__ void route_word(float (&s)[kSums<P>], const float (&x)[32], const RowBits<P>& b, int w,
                                          const float (&alpha)[1 << P]) {
    if constexpr (kGroupSums<P>) {
        group_sums<P>(s, x, b, w);
    } else {
        select_tree<P>(s[0], x, b, w, alpha);
    }
}

template <int P>
__device__ __forceinline__ float fold(float acc, const float (&s)[kSums<P>], const float (&alpha)[1 << P]) {
    if constexpr (kGroupSums<P>) {
#pragma unroll
        for (int g = 0; g < (1 << P); ++g) acc = fmaf(alpha[g], s[g], acc);
        return acc;
    } else {
        return acc + s[0];
    }
}

// The lane's 128 columns of the current tile for every activation row and both warp rows. Each activation word
// is loaded once and used for both rows; the partial sums reach the accumulators once per chunk.
template <typename T, int P>
__device__ __forceinline__ void accumulate_tile(Accumulators (&acc)[kRowsPerWarp], const Tile<P>& t,
                                                const Problem& p, int64_t m0, int mt, int col0, int lane,
                                                const float (&alpha)[1 << P], bool xvec) {
#pragma unroll 1
    for (int m = 0; m < mt; ++m) {
        float s[kRowsPerWarp][kSums<P>];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
            for (int g = 0; g < kSums<P>; ++g) s[r][g] = 0.0f;
        }
#pragma unroll 1  // unrolled, the instances took minutes to compile per architecture
        for (int w = 0; w < kWordsPerChunk; ++w) {
            float x[32];
            load_x_word<T>(x, p, m0 + m, col0 + 32 * w, xvec);
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) route_word<P>(s[r], x, t.row[r], w, alpha);
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[r].v[m][lane] = fold<P>(acc[r].v[m][lane], s[r], alpha);
    }
}

// Number of set bits below the first clear one: the entries a batch may consume, in CSR order.
__device__ __forceinline__ int leading_ones(uint32_t ballot) { return ballot == ~0u ? 32 : __ffs(~ballot) - 1; }

__device__ __forceinline__ uint32_t word_from_lane(const uint4& v, int src, int w) {
    const uint32_t a = __shfl_sync(0xffffffffu, v.x, src);
    const uint32_t b = __shfl_sync(0xffffffffu, v.y, src);
    const uint32_t c = __shfl_sync(0xffffffffu, v.z, src);
    const uint32_t d = __shfl_sync(0xffffffffu, v.w, src);
    return w == 0 ? a : w == 1 ? b : w == 2 ? c : d;
}

// (group << 1) | sign of the binary weight at column `col` of this warp row, taken from the lane that loaded
// it. Every lane must call this (shuffles); `in_tile` false means col lies outside the tile's registers.
template <int P>
__device__ __forceinline__ int tile_bits(const RowBits<P>& b, int col, int tile_col0, int lane, bool in_tile) {
    const int rel = in_tile ? col - tile_col0 : 0;
    const int src = in_tile ? rel / kChunkCols : lane;
    const int w = (rel % kChunkCols) / 32;
    const int bit = col & 31;
    int idx = (word_from_lane(b.sign, src, w) >> bit) & 1;
#pragma unroll
    for (int pl = 0; pl < P; ++pl) idx |= ((word_from_lane(b.code[pl], src, w) >> bit) & 1) << (pl + 1);
    return idx;
}

__device__ __forceinline__ float binary_weight(const Problem& p, int idx) {
    const int g = idx >> 1;
    const float alpha = g < p.groups ? __half2float(p.scales[g]) : 0.0f;
    return (idx & 1) ? alpha : -alpha;
}

// Applies the row's salient entries whose column lies below the tile's end, 32 per step: one coalesced load of
// columns and integers, the binary weights from the tile's registers. Columns ascend within a row (contract), so
// the entries of this tile are a prefix of what is left; a descending column only delays entries, which the
// last tile then takes, all of them. Columns outside [0, K) are skipped, as in every kernel. The binary weight
// under an entry is taken back from acc (the sum r_n multiplies), its salient value s·q goes to sal.
template <typename T, int P>
__device__ __forceinline__ void add_salient(Accumulators& acc, Accumulators& sal, Cursor& cur, const RowBits<P>& b,
                                            const Problem& p, int row, int64_t m0, int mt, int tile_col0,
                                            bool last_tile, int lane, float scale) {
    const T* x = static_cast<const T*>(p.x);
    while (cur.next < cur.end) {  // warp-uniform
        const int64_t e = static_cast<int64_t>(cur.next) + lane;  // next + 31 may pass INT32_MAX
        const bool have = e < cur.end;
        const int col = have ? p.cols[e] : 0;
        const int8_t q = have ? p.q[e] : int8_t{0};
        const bool here = have && (last_tile || col < tile_col0 + kTileCols);
        const int taken = leading_ones(__ballot_sync(0xffffffffu, here));
        const bool valid = lane < taken && column_in_range(p, col);
        const bool in_tile = valid && col >= tile_col0 && col - tile_col0 < kTileCols;
        int idx = tile_bits<P>(b, col, tile_col0, lane, in_tile);
        if (valid) {
            if (!in_tile) idx = binary_index(p, row, col);
            const float binary = binary_weight(p, idx);
            const float salient = scale * static_cast<float>(q);
#pragma unroll 1
            for (int m = 0; m < mt; ++m) {
                const float xv = to_float(x[(m0 + m) * p.k + col]);
                acc.v[m][lane] = fmaf(-binary, xv, acc.v[m][lane]);
                sal.v[m][lane] = fmaf(salient, xv, sal.v[m][lane]);
            }
        }
        cur.next += taken;
        if (taken < 32) break;
    }
}

// Y = r_n·(binary sum) + (salient sum) + bias: the row scale of contract v2, once per output.
template <typename T>
__device__ __forceinline__ void reduce_and_store(const Accumulators (&acc)[kRowsPerWarp],
                                                 const Accumulators (&sal)[kRowsPerWarp], const Problem& p,
                                                 int row0, int64_t m0, int mt, int lane) {
    T* y = static_cast<T*>(p.y);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
        const int row = row0 + r;
        const float rs = row < p.n ? row_scale(p, row) : 0.0f;
#pragma unroll 1
        for (int m = 0; m < mt; ++m) {
            float sum = acc[r].v[m][lane];
            float salient = sal[r].v[m][lane];
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) {
                sum += __shfl_xor_sync(0xffffffffu, sum, offset);
                salient += __shfl_xor_sync(0xffffffffu, salient, offset);
            }
            if (lane == 0 && row < p.n) {
                y[(m0 + m) * p.n + row] = from_float<T>(fmaf(rs, sum, salient) + bias_at(p, row));
            }
        }
    }
}

// One warp owns kRowsPerWarp output rows for mt activation rows; its lanes split each row's packed bytes
// (128 columns each per tile) and the next tile's loads are issued before the current tile is consumed.
template <typename T, int P>
__global__ void __launch_bounds__(kWarps * 32) gemv2_kernel(Problem p, int rows_per_pass, bool vec, bool xvec) {
    __shared__ Accumulators acc_all[kWarps][kRowsPerWarp];
    __shared__ Accumulators sal_all[kWarps][kRowsPerWarp];  // salient values s·q·x, outside r_n's sum
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int row0 = (blockIdx.x * kWarps + warp) * kRowsPerWarp;
    if (row0 >= p.n) return;  // whole warps only: no block-wide synchronisation below
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * rows_per_pass;
    const int mt = static_cast<int>(p.m - m0 < rows_per_pass ? p.m - m0 : rows_per_pass);
    Accumulators (&acc)[kRowsPerWarp] = acc_all[warp];
    Accumulators (&sal)[kRowsPerWarp] = sal_all[warp];

    float alpha[1 << P];
#pragma unroll
    for (int g = 0; g < (1 << P); ++g) alpha[g] = g < p.groups ? __half2float(p.scales[g]) : 0.0f;
    Cursor cur[kRowsPerWarp];
    float scale[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
        const bool live = row0 + r < p.n;
        const SalientRange range = live ? salient_range(p, row0 + r) : SalientRange{0, 0};
        cur[r] = {range.begin, range.end};
        scale[r] = live ? __half2float(p.salient_scale[row0 + r]) : 0.0f;
        for (int m = 0; m < kMaxRowsPerPass; ++m) acc[r].v[m][lane] = sal[r].v[m][lane] = 0.0f;
    }

    const int n_tiles = (p.kb + kTileBytes - 1) / kTileBytes;
    Tile<P> next = load_tile<P>(p, row0, 0, lane, vec);
    for (int tile = 0; tile < n_tiles; ++tile) {
        const Tile<P> cur_tile = next;
        if (tile + 1 < n_tiles) next = load_tile<P>(p, row0, tile + 1, lane, vec);
        const int tile_col0 = tile * kTileCols;
        accumulate_tile<T, P>(acc, cur_tile, p, m0, mt, tile_col0 + lane * kChunkCols, lane, alpha, xvec);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
            add_salient<T, P>(acc[r], sal[r], cur[r], cur_tile.row[r], p, row0 + r, m0, mt, tile_col0,
                              tile + 1 == n_tiles, lane, scale[r]);
        }
    }
    reduce_and_store<T>(acc, sal, p, row0, m0, mt, lane);
}

// Picks the instance (code planes) and the launch shape; activation rows per pass as in gemv::dispatch.
template <typename T, typename Launcher>
cudaError_t dispatch(const Problem& p, const Launcher& launch) {
    const int mt = gemv::rows_per_pass(p.m);
    const int64_t passes = (p.m + mt - 1) / mt;
    if (passes > 65535) return cudaErrorInvalidConfiguration;
    const bool vec =
        p.kb % kChunkBytes == 0 && gemv::aligned16(p.sign) && (p.planes == 0 || gemv::aligned16(p.codes));
    const bool xvec = gemv::aligned16(p.x) && (static_cast<int64_t>(p.k) * sizeof(T)) % 16 == 0;
    const dim3 grid((p.n + kRowsPerBlock - 1) / kRowsPerBlock, static_cast<unsigned>(passes));
    const dim3 block(kWarps * 32);
    switch (p.planes) {
        case 0: return launch(gemv2_kernel<T, 0>, grid, block, p, mt, vec, xvec);
        case 1: return launch(gemv2_kernel<T, 1>, grid, block, p, mt, vec, xvec);
        case 2: return launch(gemv2_kernel<T, 2>, grid, block, p, mt, vec, xvec);
        case 3: return launch(gemv2_kernel<T, 3>, grid, block, p, mt, vec, xvec);
        default: return launch(gemv2_kernel<T, 4>, grid, block, p, mt, vec, xvec);
    }
}

}  // namespace gemv2
}  // namespace sage
