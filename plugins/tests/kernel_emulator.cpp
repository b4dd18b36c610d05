// Runs sage_gemm_launch with the kernels executed by the CPU emulator (cuda_emulator.h). tests/test_plugins_build.py
// uses it to compare every kernel path with the NumPy reference on machines without a GPU.
//
// Usage: sage_kernel_emulator PROBLEM.bin OUT.bin
//   PROBLEM.bin: 11 little-endian int64 [m, k, n, n_groups, salient_bits, x_dtype, bias_dtype (-1: no bias), path,
//   nnz, misalign, row_scales (its length: n, or 0 for contract v3's empty one, passed as NULL)], then the
//   contract's arrays as raw bytes in contract v3 order (x, sign_bits, group_codes, group_scales, salient_rowptr,
//   salient_cols (2 bytes per entry), salient_q, salient_scale, row_scales, bias when present).
//   misalign = 1 shifts every array by one byte in memory, which forces the kernels' unaligned load paths.
//   OUT.bin receives y [m, n] in x's dtype. The exit status is sage_gemm_launch's return code.
//   A header the launch API must reject (K above SAGE_MAX_K, N above SAGE_MAX_FEATURES, nnz outside 0..INT32_MAX,
//   ...) needs no arrays: they are then empty, since the launch may read none of them.
#include "cuda_emulator.h"

#include <array>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <new>
#include <vector>

#include "sage_gemv2_kernel.cuh"
#include "sage_gemv3_kernel.cuh"
#include "sage_gemv_kernel.cuh"
#include "sage_tiled_kernel.cuh"

namespace sage {

template <typename T>
cudaError_t launch_gemv(const Problem& p, cudaStream_t) {
    return gemv::dispatch<T>(p, emu::Launcher{});
}

template <typename T>
cudaError_t launch_gemv2(const Problem& p, cudaStream_t) {
    return gemv2::dispatch<T>(p, emu::Launcher{});
}

template <typename T>
cudaError_t launch_tiled(const Problem& p, cudaStream_t) {
    return tiled::dispatch<T>(p, emu::Launcher{});
}

cudaError_t launch_gemv3(const Problem& p, const uint32_t* prepared, cudaStream_t) {
    return gemv3::dispatch(p, prepared, emu::Launcher{});
}

cudaError_t prepare_gemv3(const Problem& p, uint32_t* prepared, cudaStream_t) {
    return gemv3::prepare(p, prepared, emu::Launcher{});
}

int64_t gemv3_prepared_bytes(const Problem& p) { return gemv3::prepared_bytes(p); }

bool gemv3_launchable(const Problem& p, bool half_x) { return gemv3::launchable(p, half_x); }

bool gemv3_device_ok() { return true; }  // the emulator runs mma.sync m16n8k16

}  // namespace sage

#include "sage_gemm_launch.cu"  // the real argument checks and path choice

#if defined(__SANITIZE_ADDRESS__)
// Out-of-bounds reads are what the sanitizer is here for; leak checking needs ptrace, which containers may deny.
extern "C" const char* __asan_default_options() { return "detect_leaks=0"; }
#endif

namespace {

struct Header {
    int64_t m, k, n, groups, salient_bits, x_dtype, bias_dtype, path, nnz, misalign, row_scales;
};

// Copies of the arrays, each in a block of exactly its size so that AddressSanitizer (when the emulator is
// built with it) sees the first byte read past one. With misalign each starts one byte past a 16-byte boundary.
class Arena {
public:
    explicit Arena(bool misalign) : mShift(misalign ? 1 : 0) {}
    uint8_t* add(const uint8_t* src, size_t bytes) {
        mBlocks.emplace_back(static_cast<uint8_t*>(::operator new(bytes + mShift, kAlign)));
        uint8_t* at = mBlocks.back().get() + mShift;
        if (bytes) src ? std::memcpy(at, src, bytes) : std::memset(at, 0, bytes);
        return at;
    }

private:
    static constexpr std::align_val_t kAlign{16};
    struct Free {
        void operator()(uint8_t* block) const { ::operator delete(block, kAlign); }
    };
    size_t mShift;
    std::vector<std::unique_ptr<uint8_t, Free>> mBlocks;
};

bool sizable(const Header& h) {
    return h.m >= 0 && h.k >= 1 && h.k <= SAGE_MAX_K && h.n >= 1 && h.n <= SAGE_MAX_FEATURES && h.nnz >= 0 &&
           h.nnz <= INT32_MAX && h.groups >= 1 && h.groups <= SAGE_MAX_GROUPS;
}

// Bytes of x, the eight packed arrays and the bias, in file order; all 0 for a header the launch must reject.
std::array<size_t, 10> input_sizes(const Header& h) {
    if (!sizable(h)) return {};
    const size_t x_item = h.x_dtype == SAGE_DTYPE_FLOAT16 ? 2 : 4;
    const size_t bias_item = h.bias_dtype == SAGE_DTYPE_FLOAT16 ? 2 : 4;
    const size_t kb = static_cast<size_t>((h.k + 7) / 8);
    return {static_cast<size_t>(h.m * h.k) * x_item,
            static_cast<size_t>(h.n) * kb,
            static_cast<size_t>(sage_gemm_planes(static_cast<int32_t>(h.groups)) * h.n) * kb,
            static_cast<size_t>(h.groups) * 2,
            static_cast<size_t>(h.n + 1) * 4,
            static_cast<size_t>(h.nnz) * 2,
            static_cast<size_t>(h.nnz),
            static_cast<size_t>(h.n) * 2,
            static_cast<size_t>(h.row_scales) * 2,
            h.bias_dtype < 0 ? 0 : static_cast<size_t>(h.n) * bias_item};
}

size_t output_size(const Header& h) {
    return sizable(h) ? static_cast<size_t>(h.m * h.n) * (h.x_dtype == SAGE_DTYPE_FLOAT16 ? 2 : 4) : 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s PROBLEM.bin OUT.bin\n", argv[0]);
        return 2;
    }
    std::ifstream in(argv[1], std::ios::binary);
    std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    Header h;
    if (data.size() < sizeof(h)) return 2;
    std::memcpy(&h, data.data(), sizeof(h));
    if (h.row_scales != 0 && h.row_scales != h.n) {
        std::fprintf(stderr, "row_scales must have n or 0 entries\n");
        return 2;
    }
    const std::array<size_t, 10> sizes = input_sizes(h);
    Arena arena(h.misalign != 0);
    void* arrays[10];
    size_t offset = sizeof(h);
    for (int i = 0; i < 10; ++i) {
        if (offset + sizes[i] > data.size()) {
            std::fprintf(stderr, "problem file too short\n");
            return 2;
        }
        arrays[i] = arena.add(data.data() + offset, sizes[i]);
        offset += sizes[i];
    }
    const size_t y_bytes = output_size(h);
    Arena output(false);  // kernels store whole floats and halves: y stays aligned
    uint8_t* y = output.add(nullptr, y_bytes);

    SageGemmArgs a;
    std::memset(&a, 0, sizeof(a));
    a.x = arrays[0];
    a.sign_bits = static_cast<const int8_t*>(arrays[1]);
    a.group_codes = static_cast<const int8_t*>(arrays[2]);
    a.group_scales = static_cast<const uint16_t*>(arrays[3]);
    a.salient_rowptr = static_cast<const int32_t*>(arrays[4]);
    a.salient_cols = static_cast<const uint16_t*>(arrays[5]);
    a.salient_q = static_cast<const int8_t*>(arrays[6]);
    a.salient_scale = static_cast<const uint16_t*>(arrays[7]);
    a.row_scales = h.row_scales == 0 ? nullptr : static_cast<const uint16_t*>(arrays[8]);  // v3: empty -> NULL
    a.bias = h.bias_dtype < 0 ? nullptr : arrays[9];
    a.y = y;
    a.m = h.m;
    a.nnz = h.nnz;
    a.k = static_cast<int32_t>(h.k);
    a.n = static_cast<int32_t>(h.n);
    a.n_groups = static_cast<int32_t>(h.groups);
    a.salient_bits = static_cast<int32_t>(h.salient_bits);
    a.x_dtype = static_cast<int32_t>(h.x_dtype);
    a.bias_dtype = h.bias_dtype < 0 ? SAGE_DTYPE_FLOAT32 : static_cast<int32_t>(h.bias_dtype);
    a.path = static_cast<int32_t>(h.path);

    // GEMV3 reads the prepared layout: make it, in a block of its exact size, as a runtime would once per set of
    // weights. Only when GEMV3 is asked for by name, so that AUTO cases keep covering the kernels without it.
    Arena prepared_arena(false);
    if (h.path == SAGE_PATH_GEMV3) {
        const int64_t bytes = sage_gemm_prepared_bytes(&a);
        if (bytes > 0) {
            a.prepared = prepared_arena.add(nullptr, static_cast<size_t>(bytes));
            a.prepared_bytes = bytes;
            const int prep = sage_gemm_prepare(&a, nullptr);
            if (prep != 0) {
                std::fprintf(stderr, "sage_gemm_prepare: %s\n", sage_gemm_error_string(prep));
                return prep;
            }
        }
    }
    const int status = sage_gemm_launch(&a, nullptr);
    if (status != 0) {
        std::fprintf(stderr, "sage_gemm_launch: %s\n", sage_gemm_error_string(status));
        return status;
    }
    std::ofstream(argv[2], std::ios::binary).write(reinterpret_cast<const char*>(y), y_bytes);
    return 0;
}
