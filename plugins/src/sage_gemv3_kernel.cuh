// GEMV3: the decode path (M <= 16, float16 X, G <= 8, K <= 65535) built for memory bandwidth on sm_80 and later.
//
// Design (docs/plugin.md, "GEMV3"):
// * The weight bits are re-laid once, on the device, into a "prepared" buffer (sage_gemm_prepare): the same bits
//   as the contract's (plus padding), ordered so that every lane reads its weights with 16-byte loads that are
//   contiguous across the warp, and so that the decode needs no per-weight table lookup.
// * Products run on the tensor cores: mma.sync m16n8k16, float16 weights and activations, float32 accumulation.
//   The product of two float16 values is exact in float32, so this is the contract's "convert to float32, then
//   accumulate in float32" up to the order of the additions. A warp owns 16 output rows; batch rows are the MMA's
//   8 columns (NB = 2 blocks of 8 for M <= 16).
// * The decode turns bits into float16 weights with byte permutes: per 4 weights one PRMT picks their low bytes
//   and one their high bytes out of a table of the 8 group scales held in 4 registers, one LOP3 flips the sign
//   bits, two PRMTs interleave low and high bytes into two half2. The whole steady-state loop (decode, MMAs,
//   loads) is 2.2 to 2.3 SASS instructions per weight for G = 2..8 and 1.35 for G = 1 at batch <= 8
//   (benchmarks/kernel_cost.md).
// * Salient entries: prepared as one 32-bit word each (16-bit column, 8-bit q), their bits in the prepared buffer
//   cleared to "+α_0", so each adds (s·q − r_n·α_0)·x. Their loads are issued right after the first weight loads.
// * Row scales (contract v2): the dense sum of row n is multiplied by r_n once, when the warps' partial sums are
//   added; the layout does not depend on r_n (it is read at launch, like the other scales; absent: 1, v3).
// * A block = 8 warps = 16 output rows; its warps split K (steps of 512 columns) and are reduced in shared memory in
//   a fixed order: deterministic, no atomics, no workspace. N = 4096 gives 256 blocks.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>

#include "sage_gemm_internal.cuh"

namespace sage {
namespace gemv3 {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerTile = 16;             // one MMA's M
constexpr int kPieceCols = 128;              // columns one lane owns per step
constexpr int kStepCols = 4 * kPieceCols;    // the 4 lanes of a quad side by side
// The prepared salient word keeps the column in 16 bits with 0xFFFF meaning "no entry" (>= K), so K = 65536, the
// contract's limit (v3), is left to the other kernels.
constexpr int kMaxK = 65535;
constexpr int kMaxCodePlanes = 3;            // G <= 8 (the other kernels take 4: G <= 16)
constexpr int kMaxM = 16;                    // activation rows per pass (two MMA column blocks)
constexpr int kSalientPerLane = 4;           // salient entries a lane keeps in registers per round

// Geometry of the prepared buffer: [row tile][step][row half h][uint4 q < 1+P][lane] uint4, then the salient words.
struct Layout {
    int planes;
    int tiles;       // ceil(N / 16)
    int steps;       // ceil(K / 512)
    int64_t dense_words;  // 32-bit words of the dense part
};

__host__ __device__ inline Layout layout_of(int n, int k, int planes) {
    Layout l;
    l.planes = planes;
    l.tiles = (n + kRowsPerTile - 1) / kRowsPerTile;
    l.steps = (k + kStepCols - 1) / kStepCols;
    l.dense_words = static_cast<int64_t>(l.tiles) * l.steps * 2 * (1 + planes) * 32 * 4;
    return l;
}

// Where weight (row, col) lives: its lane's chunk for that row half and step, its 32-column group's first word in
// that chunk, and its place in the group.
struct Place {
    int64_t lane_word;  // index of the lane's chunk word 0
    int w0;             // chunk word of the group's first word: group * (1 + P)
    int set;            // 8-column set within the group, 0..3
    int i;              // column within the set, 0..7
};

__host__ __device__ inline Place place_of(const Layout& l, int row, int col) {
    const int tile = row / kRowsPerTile, r = row % kRowsPerTile;
    const int half = r / 8, g = r % 8;
    const int step = col / kStepCols, t = (col % kStepCols) / kPieceCols, group = (col % kPieceCols) / 32;
    const int64_t block = ((static_cast<int64_t>(tile) * l.steps + step) * 2 + half) * (1 + l.planes);
    return {block * 128 + (4 * g + t) * 4, group * (1 + l.planes), (col % 32) / 8, col % 8};
}

// Index of group word k (0..P) of a place: chunk word w0 + k sits in uint4 (w0 + k) / 4, field (w0 + k) % 4 (a
// group's words straddle uint4 boundaries when 1 + P does not divide 4).
__host__ __device__ inline int64_t word_index(const Place& at, int k) {
    const int w = at.w0 + k;
    return at.lane_word + static_cast<int64_t>(w / 4) * 128 + w % 4;
}

// Bits of one weight in the group's words. Code words (P = 1, 2) hold a code bit of weight i of set j at
// 4i + j (P = 1) or 4i + 2(j % 2) + b in word j / 2 (P = 2); the sign word (last) holds weight i of set j at
// 8(i % 4) + 7 − (2j + i / 4). P = 3: word j holds weight i's code at 4i..4i+2 and signs in the nibbles' bit 3:
// weights 0..3 at 8i + 7, weights 4..7 at 8(i − 4) + 3. Sign bit 1 = negative (the opposite of the contract).
struct BitRef {
    int word;  // group word 0..P
    int bit;
};

__host__ __device__ inline BitRef sign_ref(int planes, int set, int i) {
    if (planes == 3) return {set, i < 4 ? 8 * i + 7 : 8 * (i - 4) + 3};
    return {planes, 8 * (i % 4) + 7 - (2 * set + i / 4)};
}

__host__ __device__ inline BitRef code_ref(int planes, int set, int i, int b) {
    if (planes == 3) return {set, 4 * i + b};
    if (planes == 2) return {set / 2, 4 * i + 2 * (set % 2) + b};
    return {0, 4 * i + set};  // planes == 1
}

// ------------------------------------------------------------------------------------------------ preparation

// One thread per (row, 32-column group): reads the contract's bytes and writes the group's 1 + P words.
__global__ void prepare_dense_kernel(Problem p, Layout l, uint32_t* out) {
    const int64_t groups_per_row = static_cast<int64_t>(l.steps) * kStepCols / 32;
    const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (id >= static_cast<int64_t>(l.tiles) * kRowsPerTile * groups_per_row) return;
    const int row = static_cast<int>(id / groups_per_row);
    const int col0 = static_cast<int>(id % groups_per_row) * 32;
    uint32_t words[1 + kMaxCodePlanes] = {0, 0, 0, 0};
    const int64_t plane_stride = static_cast<int64_t>(p.n) * p.kb;
    for (int c = 0; c < 32; ++c) {
        const int col = col0 + c;
        if (row >= p.n || col >= p.k) continue;  // padding: all bits 0 (+α_0, met by zero activations)
        const int64_t byte = static_cast<int64_t>(row) * p.kb + (col >> 3);
        const int set = c / 8, i = c % 8;
        const BitRef s = sign_ref(l.planes, set, i);
        if (((p.sign[byte] >> (col & 7)) & 1) == 0) words[s.word] |= 1u << s.bit;
        for (int b = 0; b < l.planes; ++b) {
            const BitRef r = code_ref(l.planes, set, i, b);
            if ((p.codes[b * plane_stride + byte] >> (col & 7)) & 1) words[r.word] |= 1u << r.bit;
        }
    }
    const Place at = place_of(l, row, col0);
    for (int w = 0; w <= l.planes; ++w) out[word_index(at, w)] = words[w];
}

// One thread per row: every valid salient entry becomes one word (column | q << 16) and its bits in the dense part
// are cleared to sign +, code 0 (so the dense pass adds +α_0 there, which the entry takes back). Entries outside
// every row's clamped range, or with a column outside [0, K), keep the word 0xFFFFFFFF (column 65535 >= K:
// skipped). Rows are disjoint, so no two threads touch one word.
__global__ void prepare_salient_init_kernel(Problem p, Layout l, uint32_t* out) {
    uint32_t* salient = out + l.dense_words;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < p.nnz;
         e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        salient[e] = 0xFFFFFFFFu;
    }
}

__global__ void prepare_salient_rows_kernel(Problem p, Layout l, uint32_t* out) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= p.n) return;
    uint32_t* salient = out + l.dense_words;
    const SalientRange range = salient_range(p, row);
    for (int e = range.begin; e < range.end; ++e) {
        const int col = p.cols[e];
        if (!column_in_range(p, col)) continue;
        salient[e] = static_cast<uint32_t>(col) | (static_cast<uint32_t>(static_cast<uint8_t>(p.q[e])) << 16);
        const Place at = place_of(l, row, col);
        const BitRef s = sign_ref(l.planes, at.set, at.i);
        out[word_index(at, s.word)] &= ~(1u << s.bit);
        for (int b = 0; b < l.planes; ++b) {
            const BitRef r = code_ref(l.planes, at.set, at.i, b);
            out[word_index(at, r.word)] &= ~(1u << r.bit);
        }
    }
}

// ------------------------------------------------------------------------------------------------ the decode

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
#elif defined(SAGE_CUDA_EMULATOR)
    return emu::prmt(a, b, sel);
#else
    return a ^ b ^ sel;  // host pass of nvcc: never called
#endif
}

// m16n8k16, row.col, float16 in, float32 accumulate: d += a·b.
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(SAGE_CUDA_EMULATOR)
    emu::mma16816(d, a, b0, b1);
#endif
}

// Low and high bytes of the 8 table entries ±α: entry e is group e mod 2^P, so that selector bits above the code
// are don't-care (bit 3 of each nibble is always cleared: PRMT reads it as a sign-replicate flag).
struct Table {
    uint32_t lo[2];
    uint32_t hi[2];
};

__device__ __forceinline__ Table make_table(const Problem& p, int planes) {
    Table t = {{0, 0}, {0, 0}};
    for (int e = 0; e < 8; ++e) {
        const int g = e & ((1 << planes) - 1);
        const uint16_t bits = g < p.groups ? __half_as_ushort(p.scales[g]) : 0;
        t.lo[e / 4] |= static_cast<uint32_t>(bits & 0xFF) << (8 * (e % 4));
        t.hi[e / 4] |= static_cast<uint32_t>(bits >> 8) << (8 * (e % 4));
    }
    return t;
}

// Four weights -> two half2 (columns 0,1 and 2,3 of the four). sel: their codes in nibbles 0..3 (bit 3 clear);
// sign: their sign bits at 7, 15, 23, 31.
__device__ __forceinline__ void decode4(const Table& t, uint32_t sel, uint32_t sign, uint32_t& h01, uint32_t& h23) {
    const uint32_t lo = prmt(t.lo[0], t.lo[1], sel);
    const uint32_t hi = prmt(t.hi[0], t.hi[1], sel) ^ (sign & 0x80808080u);
    h01 = prmt(lo, hi, 0x5140);
    h23 = prmt(lo, hi, 0x7362);
}

// The 8 weights of set j of group `grp` of one row's chunk words -> 4 half2 (columns 0,1 / 2,3 / 4,5 / 6,7).
template <int P>
__device__ __forceinline__ void decode_set(const Table& t, const uint32_t* w, int grp, int j, uint32_t (&h)[4]) {
    const uint32_t* g = w + grp * (1 + P);
    uint32_t sel, sign_a, sign_b;
    if (P == 3) {
        sel = g[j] & 0x77777777u;
        sign_a = g[j];
        sign_b = g[j] << 4;
    } else {
        if (P == 2) sel = (g[j / 2] >> (2 * (j % 2))) & 0x77777777u;
        else if (P == 1) sel = (g[0] >> j) & 0x77777777u;
        else sel = 0;
        sign_a = g[P] << (2 * j);
        sign_b = g[P] << (2 * j + 1);
    }
    decode4(t, sel, sign_a, h[0], h[1]);
    decode4(t, sel >> 16, sign_b, h[2], h[3]);
}

// ------------------------------------------------------------------------------------------------ the kernel

template <int P>
struct Chunk {
    uint32_t w[2][4 * (1 + P)];  // [row half][chunk word]
};

template <int P>
__device__ __forceinline__ void load_chunk(Chunk<P>& c, const uint4* dense, const Layout& l, int tile, int step,
                                           int lane, bool live) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int q = 0; q <= P; ++q) {
            uint4 v = make_uint4(0, 0, 0, 0);
            if (live) v = dense[(((static_cast<int64_t>(tile) * l.steps + step) * 2 + h) * (1 + P) + q) * 32 + lane];
            c.w[h][4 * q + 0] = v.x, c.w[h][4 * q + 1] = v.y, c.w[h][4 * q + 2] = v.z, c.w[h][4 * q + 3] = v.w;
        }
    }
}

// Lanes whose activations do not exist (batch rows past M, columns past K) read zeros from here instead of being
// predicated: the loop then has no branch and no zero-fill, only plain 16-byte loads.
__device__ uint4 kZeroActivations[kPieceCols / 8];

// Where a lane reads the activations of one batch row for the piece of 128 columns at col0: the row itself, or the
// zeros when the row is past M or the piece past K. K is a multiple of 8 and x 16-byte aligned (eligible()).
__device__ __forceinline__ const uint4* piece_x(const __half* x, int m, int mt, int k, int col0) {
    if (m >= mt || col0 >= k) return kZeroActivations;
    return reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * k + col0);
}

// One step (512 columns) of a warp: 4 groups x 4 sets of 8 weights per row half, 32 MMAs per column block.
// kTail: K is not a multiple of 128, so the last piece ends inside; its sets past K read the zeros too.
template <int P, int NB, bool kTail>
__device__ __forceinline__ void consume_step(float (&acc)[NB][4], const Chunk<P>& c, const Table& t,
                                             const __half* x, int mt, int k, int col0, int g) {
    const uint4* xs_base[NB];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) xs_base[nb] = piece_x(x, nb * 8 + g, mt, k, col0);
#pragma unroll
    for (int grp = 0; grp < 4; ++grp) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int set = grp * 4 + j;
            uint32_t xs[NB][4];
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
                const uint4* at = xs_base[nb] + set;
                if (kTail && col0 + set * 8 >= k) at = kZeroActivations;
                const uint4 v = __ldg(at);
                xs[nb][0] = v.x, xs[nb][1] = v.y, xs[nb][2] = v.z, xs[nb][3] = v.w;
            }
            uint32_t lo[4], hi[4];  // rows g and g + 8
            decode_set<P>(t, c.w[0], grp, j, lo);
            decode_set<P>(t, c.w[1], grp, j, hi);
            const uint32_t a0[4] = {lo[0], hi[0], lo[1], hi[1]};
            const uint32_t a1[4] = {lo[2], hi[2], lo[3], hi[3]};
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
                mma16816(acc[nb], a0, xs[nb][0], xs[nb][1]);
                mma16816(acc[nb], a1, xs[nb][2], xs[nb][3]);
            }
        }
    }
}

// Salient entries of one row seen by one of its 16 lanes: entries begin + lane16 + 16u. The first
// kSalientPerLane words are loaded before the dense loop (their latency hides behind it), the rest, if any, after.
struct SalientLane {
    SalientRange range;
    uint32_t first[kSalientPerLane];
};

__device__ __forceinline__ SalientLane salient_prefetch(const Problem& p, const uint32_t* salient, int row) {
    SalientLane s;
    s.range = row < p.n ? salient_range(p, row) : SalientRange{0, 0};
    const int e0 = s.range.begin + static_cast<int>(threadIdx.x % 16);
#pragma unroll
    for (int u = 0; u < kSalientPerLane; ++u) {
        const int e = e0 + 16 * u;
        s.first[u] = e < s.range.end ? salient[e] : 0xFFFFFFFFu;  // independent loads, all in flight
    }
    return s;
}

// Branch-free, so that every gather of the round is in flight at once: an empty slot (or a column outside
// [0, K)) reads column 0 and adds it times 0. alpha0 is r_n·α_0 (exact in float32: two float16 mantissas).
template <int NB>
__device__ __forceinline__ void add_salient_words(float (&sum)[8 * NB], const Problem& p, const uint32_t* words,
                                                  int64_t m0, int mt, float scale, float alpha0) {
    const __half* x = static_cast<const __half*>(p.x) + m0 * static_cast<int64_t>(p.k);
    float corr[kSalientPerLane];
    int col[kSalientPerLane];
#pragma unroll
    for (int u = 0; u < kSalientPerLane; ++u) {
        const int c = static_cast<int>(words[u] & 0xFFFF);
        const bool valid = c < p.k;
        col[u] = valid ? c : 0;
        corr[u] = valid ? salient_correction(scale, static_cast<int8_t>(words[u] >> 16), alpha0) : 0.0f;
    }
    float xv[kSalientPerLane][8 * NB];
#pragma unroll
    for (int u = 0; u < kSalientPerLane; ++u) {
#pragma unroll
        for (int m = 0; m < 8 * NB; ++m) {
            xv[u][m] = m < mt ? __half2float(x[m * static_cast<int64_t>(p.k) + col[u]]) : 0.0f;
        }
    }
#pragma unroll
    for (int u = 0; u < kSalientPerLane; ++u) {
#pragma unroll
        for (int m = 0; m < 8 * NB; ++m) sum[m] += corr[u] * xv[u][m];
    }
}

// The row's salient corrections (s·q − r_n·α_0)·x summed over its entries, reduced over its 16 lanes by shuffles
// in a fixed order; lane 0 of each 16-lane group ends with the row's sums. The dense sum, to which the entries'
// bits contributed +α_0·x each, is multiplied by r_n afterwards: together r_n·α_0·x is taken back.
template <int NB>
__device__ __forceinline__ void salient_sums(float (&sum)[8 * NB], const Problem& p, const uint32_t* salient,
                                             const SalientLane& s, int row, int64_t m0, int mt, float alpha0,
                                             float rs) {
#pragma unroll
    for (int m = 0; m < 8 * NB; ++m) sum[m] = 0.0f;
    if (row < p.n) {
        const float scale = __half2float(p.salient_scale[row]);
        alpha0 *= rs;
        add_salient_words<NB>(sum, p, s.first, m0, mt, scale, alpha0);
        for (int e0 = s.range.begin + static_cast<int>(threadIdx.x % 16) + 16 * kSalientPerLane; e0 < s.range.end;
             e0 += 16 * kSalientPerLane) {
            uint32_t words[kSalientPerLane];
#pragma unroll
            for (int u = 0; u < kSalientPerLane; ++u) {
                const int e = e0 + 16 * u;
                words[u] = e < s.range.end ? salient[e] : 0xFFFFFFFFu;
            }
            add_salient_words<NB>(sum, p, words, m0, mt, scale, alpha0);
        }
    }
#pragma unroll
    for (int m = 0; m < 8 * NB; ++m) {
#pragma unroll
        for (int off = 8; off > 0; off >>= 1) sum[m] += __shfl_xor_sync(0xffffffffu, sum[m], off);
    }
}

template <int P, int NB, bool kTail>
__global__ void __launch_bounds__(kThreads, NB == 1 ? 2 : 1)  // two blocks per SM at batch <= 8; no spills at 16
    gemv3_kernel(Problem p, Layout l, const uint32_t* prepared) {
    constexpr int MB = 8 * NB;
    __shared__ float partial[kWarps][kRowsPerTile][MB];
    __shared__ float salient_part[kRowsPerTile][MB];
    __shared__ float row_scale_part[kRowsPerTile];  // r_n of the tile's rows (contract v2)
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int tile = blockIdx.x;
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MB;
    const int mt = static_cast<int>(p.m - m0 < MB ? p.m - m0 : MB);
    const uint4* dense = reinterpret_cast<const uint4*>(prepared);
    const __half* x = static_cast<const __half*>(p.x) + m0 * static_cast<int64_t>(p.k);
    const Table table = make_table(p, P);

    // Requested before anything else: the first step's weights, then the first salient entries of the tile's rows.
    // Both are consumed late (the salient ones after the dense loop), so their latencies overlap.
    const int pieces_left = (p.k + kPieceCols - 1) / kPieceCols;  // pieces of 128 columns holding data
    Chunk<P> next;
    int step = warp;
    load_chunk<P>(next, dense, l, tile, step, lane, step < l.steps && step * 4 + t < pieces_left);
    const uint32_t* salient = prepared + l.dense_words;
    const int salient_row = tile * kRowsPerTile + threadIdx.x / 16;
    const SalientLane sal = salient_prefetch(p, salient, salient_row);

    float acc[NB][4] = {};
#pragma unroll 1
    for (; step < l.steps; step += kWarps) {
        const Chunk<P> cur = next;
        const int ahead = step + kWarps;
        if (ahead < l.steps) load_chunk<P>(next, dense, l, tile, ahead, lane, ahead * 4 + t < pieces_left);
        consume_step<P, NB, kTail>(acc, cur, table, x, mt, p.k, step * kStepCols + t * kPieceCols, g);
    }

    float sums[MB];
    // Read after the dense loop (not prefetched before it): one load per thread, and no register held across it.
    const float rs = salient_row < p.n ? row_scale(p, salient_row) : 0.0f;
    salient_sums<NB>(sums, p, salient, sal, salient_row, m0, mt, __half2float(p.scales[0]), rs);
    if (threadIdx.x % 16 == 0) {
#pragma unroll
        for (int m = 0; m < MB; ++m) salient_part[threadIdx.x / 16][m] = sums[m];
        row_scale_part[threadIdx.x / 16] = rs;
    }
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        partial[warp][g][nb * 8 + 2 * t] = acc[nb][0];
        partial[warp][g][nb * 8 + 2 * t + 1] = acc[nb][1];
        partial[warp][g + 8][nb * 8 + 2 * t] = acc[nb][2];
        partial[warp][g + 8][nb * 8 + 2 * t + 1] = acc[nb][3];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < kRowsPerTile * MB; idx += kThreads) {
        const int r = idx / MB, m = idx % MB;
        const int row = tile * kRowsPerTile + r;
        if (row >= p.n || m >= mt) continue;
        float dense = 0.0f;
        for (int w = 0; w < kWarps; ++w) dense += partial[w][r][m];  // fixed order: deterministic
        const float y = fmaf(row_scale_part[r], dense, salient_part[r][m]) + bias_at(p, row);
        static_cast<__half*>(p.y)[(m0 + m) * p.n + row] = __float2half_rn(y);
    }
}

// ------------------------------------------------------------------------------------------------ host side

// What the layout can hold: G <= 8, K <= 65535 (16-bit salient columns), K a multiple of 8 (16-byte activation
// loads).
inline bool eligible(const Problem& p) { return p.planes <= kMaxCodePlanes && p.k <= kMaxK && p.k % 8 == 0; }

// What a launch also needs: float16 activations on a 16-byte boundary.
inline bool launchable(const Problem& p, bool half_x) {
    return eligible(p) && half_x && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
}

// Bytes of the prepared buffer; 0 when the layout cannot hold the problem.
inline int64_t prepared_bytes(const Problem& p) {
    if (!eligible(p)) return 0;
    const Layout l = layout_of(p.n, p.k, p.planes);
    return (l.dense_words + p.nnz) * 4;  // the dense part is a multiple of 16 bytes: uint4 loads stay aligned
}

template <typename Launcher>
cudaError_t prepare(const Problem& p, uint32_t* out, const Launcher& launch) {
    const Layout l = layout_of(p.n, p.k, p.planes);
    const int64_t groups = static_cast<int64_t>(l.tiles) * kRowsPerTile * l.steps * (kStepCols / 32);
    cudaError_t status = launch(prepare_dense_kernel, dim3(static_cast<unsigned>((groups + 255) / 256)), dim3(256),
                                p, l, out);
    if (status != cudaSuccess) return status;
    if (p.nnz > 0) {
        status = launch(prepare_salient_init_kernel, dim3(static_cast<unsigned>((p.nnz + 255) / 256 < 4096
                                                                               ? (p.nnz + 255) / 256 : 4096)),
                        dim3(256), p, l, out);
        if (status != cudaSuccess) return status;
        status = launch(prepare_salient_rows_kernel, dim3(static_cast<unsigned>((p.n + 127) / 128)), dim3(128), p,
                        l, out);
    }
    return status;
}

template <int NB, bool kTail, typename Launcher>
cudaError_t dispatch_planes(const Problem& p, const Layout& l, const uint32_t* prepared, dim3 grid,
                            const Launcher& launch) {
    const dim3 block(kThreads);
    switch (p.planes) {
        case 0: return launch(gemv3_kernel<0, NB, kTail>, grid, block, p, l, prepared);
        case 1: return launch(gemv3_kernel<1, NB, kTail>, grid, block, p, l, prepared);
        case 2: return launch(gemv3_kernel<2, NB, kTail>, grid, block, p, l, prepared);
        default: return launch(gemv3_kernel<3, NB, kTail>, grid, block, p, l, prepared);
    }
}

// One kernel instance per (code planes, 8 or 16 activation rows per pass, K a multiple of 128 or not).
template <typename Launcher>
cudaError_t dispatch(const Problem& p, const uint32_t* prepared, const Launcher& launch) {
    const Layout l = layout_of(p.n, p.k, p.planes);
    const int mb = p.m <= 8 ? 8 : kMaxM;
    const int64_t passes = (p.m + mb - 1) / mb;
    if (passes > 65535) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(l.tiles), static_cast<unsigned>(passes));
    const bool tail = p.k % kPieceCols != 0;
    if (mb == 8) {
        return tail ? dispatch_planes<1, true>(p, l, prepared, grid, launch)
                    : dispatch_planes<1, false>(p, l, prepared, grid, launch);
    }
    return tail ? dispatch_planes<2, true>(p, l, prepared, grid, launch)
                : dispatch_planes<2, false>(p, l, prepared, grid, launch);
}

}  // namespace gemv3
}  // namespace sage
