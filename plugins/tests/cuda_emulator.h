// Runs this project's CUDA kernels on the CPU so that their indexing, bit decoding and reductions can be tested
// on machines without a GPU. Every CUDA thread of a block is a std::thread; __syncthreads is a barrier over the
// block; warp shuffles and ballots exchange values through a per-warp table; WMMA fragments hold a whole 16x16
// tile in every lane. Blocks run one after another, so a kernel's __shared__ variables (made `static` here) are
// per-block shared memory. It checks semantics, not speed, and knows only the intrinsics the kernels use.
#pragma once

#define SAGE_CUDA_EMULATOR 1
#define __device__
#define __global__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>

namespace emu {

struct Block {
    explicit Block(unsigned threads) : all(threads), shuffle(threads), mma(threads) {
        for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    }
    std::barrier<> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint32_t> shuffle;  // one 32-bit slot per thread: shuffles move floats and integers by their bits
    std::vector<std::array<uint32_t, 6>> mma;  // one MMA's operand registers per thread (a0..a3, b0, b1)
};

inline thread_local uint3 thread_idx;
inline thread_local uint3 block_idx;
inline dim3 block_dim;
inline dim3 grid_dim;
inline Block* current_block = nullptr;

// The `launch` argument of gemv::dispatch / tiled::dispatch: runs the grid to completion.
struct Launcher {
    template <typename... Params, typename... Args>
    cudaError_t operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) const {
        const unsigned threads = block.x * block.y * block.z;
        if (threads == 0 || threads % 32 != 0 || block.y != 1 || block.z != 1) return cudaErrorInvalidConfiguration;
        grid_dim = grid;
        block_dim = block;
        for (unsigned bz = 0; bz < grid.z; ++bz) {
            for (unsigned by = 0; by < grid.y; ++by) {
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    Block state(threads);
                    current_block = &state;
                    std::vector<std::thread> pool;
                    for (unsigned t = 0; t < threads; ++t) {
                        pool.emplace_back([=] {
                            thread_idx = make_uint3(t, 0, 0);
                            block_idx = make_uint3(bx, by, bz);
                            kernel(args...);
                        });
                    }
                    for (std::thread& th : pool) th.join();
                }
            }
        }
        current_block = nullptr;
        return cudaSuccess;
    }
};

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::current_block->all.arrive_and_wait(); }

namespace emu {

// Every lane of the warp publishes `value`, then reads the one published by lane `source(lane)`.
template <typename Source>
inline uint32_t exchange(uint32_t value, Source source) {
    Block& b = *current_block;
    const unsigned t = threadIdx.x;
    const unsigned warp = t / 32;
    b.shuffle[t] = value;
    b.warps[warp]->arrive_and_wait();
    const uint32_t other = b.shuffle[warp * 32 + (source(t % 32) % 32)];
    b.warps[warp]->arrive_and_wait();
    return other;
}

}  // namespace emu

inline float __shfl_xor_sync(unsigned /*mask*/, float value, int lane_mask) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    bits = emu::exchange(bits, [=](unsigned lane) { return lane ^ static_cast<unsigned>(lane_mask); });
    std::memcpy(&value, &bits, sizeof(bits));
    return value;
}

inline uint32_t __shfl_sync(unsigned /*mask*/, uint32_t value, int src_lane) {
    return emu::exchange(value, [=](unsigned) { return static_cast<unsigned>(src_lane); });
}

inline unsigned __ballot_sync(unsigned /*mask*/, int predicate) {
    emu::Block& b = *emu::current_block;
    const unsigned t = threadIdx.x;
    const unsigned warp = t / 32;
    b.shuffle[t] = predicate != 0;
    b.warps[warp]->arrive_and_wait();
    unsigned ballot = 0;
    for (unsigned lane = 0; lane < 32; ++lane) ballot |= b.shuffle[warp * 32 + lane] << lane;
    b.warps[warp]->arrive_and_wait();
    return ballot;
}

inline int __ffs(int x) { return __builtin_ffs(x); }

namespace emu {

// PTX prmt.b32, default mode: result byte i is byte (c >> 4i) & 7 of {b, a} (a = bytes 0..3), or the sign of that
// byte replicated when bit 3 of the nibble is set.
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t c) {
    const uint64_t bytes = static_cast<uint64_t>(b) << 32 | a;
    uint32_t d = 0;
    for (int i = 0; i < 4; ++i) {
        const unsigned sel = (c >> (4 * i)) & 0xF;
        uint32_t v = (bytes >> (8 * (sel & 7))) & 0xFF;
        if (sel & 8) v = (v & 0x80) ? 0xFF : 0x00;
        d |= v << (8 * i);
    }
    return d;
}

inline float half_bits_to_float(uint32_t bits) {
    __half_raw raw;
    raw.x = static_cast<unsigned short>(bits & 0xFFFF);
    return __half2float(__half(raw));
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 over the warp, with the PTX ISA's fragment layouts: lane
// 4g + t holds A rows g and g + 8 at columns 2t, 2t + 1 (a0: row g, a1: row g + 8) and 2t + 8, 2t + 9 (a2, a3);
// B column g at rows 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1); D rows g, g + 8 at columns 2t, 2t + 1.
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    Block& blk = *current_block;
    const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    blk.mma[tid] = {a[0], a[1], a[2], a[3], b0, b1};
    blk.warps[warp]->arrive_and_wait();
    auto A = [&](int r, int k) {
        const auto& regs = blk.mma[warp * 32 + (r % 8) * 4 + (k % 8) / 2];
        return half_bits_to_float(regs[(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)] >> (16 * (k % 2)));
    };
    auto B = [&](int k, int c) {
        const auto& regs = blk.mma[warp * 32 + c * 4 + (k % 8) / 2];
        return half_bits_to_float(regs[4 + (k >= 8 ? 1 : 0)] >> (16 * (k % 2)));
    };
    const int g = static_cast<int>(lane / 4), t = static_cast<int>(lane % 4);
    for (int e = 0; e < 4; ++e) {
        const int r = g + (e >= 2 ? 8 : 0), c = 2 * t + (e % 2);
        float s = d[e];
        for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, c);
        d[e] = s;
    }
    blk.warps[warp]->arrive_and_wait();
}

}  // namespace emu

template <typename T>
inline T __ldg(const T* ptr) {
    return *ptr;
}

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulator knows 16x16x16 only");
    float x[16 * 16];  // element (r, c) at x[r * 16 + c]; A is M x K, B is K x N
};

template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
    for (float& v : f.x) v = value;
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
    constexpr bool row = std::is_same<Layout, row_major>::value;
    for (int r = 0; r < 16; ++r) {
        for (int c = 0; c < 16; ++c) {
            const T v = row ? ptr[r * ldm + c] : ptr[c * ldm + r];
            if constexpr (std::is_same<T, __half>::value) {
                f.x[r * 16 + c] = __half2float(v);
            } else {
                f.x[r * 16 + c] = static_cast<float>(v);
            }
        }
    }
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
    float out[16 * 16];
    for (int i = 0; i < 16; ++i) {
        for (int j = 0; j < 16; ++j) {
            float s = c.x[i * 16 + j];
            for (int k = 0; k < 16; ++k) s += a.x[i * 16 + k] * b.x[k * 16 + j];
            out[i * 16 + j] = s;
        }
    }
    for (int e = 0; e < 256; ++e) d.x[e] = out[e];
}

// Every lane holds the whole tile; each writes its share so that no two threads store to one address.
inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
    for (int e = static_cast<int>(threadIdx.x % 32); e < 256; e += 32) {
        const int r = e / 16;
        const int c = e % 16;
        ptr[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[e];
    }
}

}  // namespace wmma
}  // namespace nvcuda
