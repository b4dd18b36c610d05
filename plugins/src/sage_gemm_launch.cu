// Host side of the launch API: argument validation (no device call on bad input) and path dispatch.
#include "sage_gemm_internal.cuh"

namespace {

bool valid_dtype(int32_t dtype) { return dtype == SAGE_DTYPE_FLOAT32 || dtype == SAGE_DTYPE_FLOAT16; }

// K up to SAGE_MAX_K (the contract's, v3: 16-bit columns) and N up to SAGE_MAX_FEATURES keep the kernels' int
// index math from wrapping (see sage_gemm_api.h); nnz up to INT32_MAX fits their int CSR cursors, which the
// clamped row pointers never carry past it.
bool valid_sizes(const SageGemmArgs* a) {
    return a->m >= 0 && a->k >= 1 && a->k <= SAGE_MAX_K && a->n >= 1 && a->n <= SAGE_MAX_FEATURES &&
           a->nnz >= 0 && a->nnz <= INT32_MAX && a->n_groups >= 1 && a->n_groups <= SAGE_MAX_GROUPS &&
           a->salient_bits >= 2 && a->salient_bits <= 8;
}

// The weights' pointers (what sage_gemm_prepare reads). row_scales may be NULL: every r_n = 1 (contract v3).
bool valid_weight_pointers(const SageGemmArgs* a) {
    const bool salient = a->nnz == 0 || (a->salient_cols != nullptr && a->salient_q != nullptr);
    const bool codes = a->group_codes != nullptr || sage_gemm_planes(a->n_groups) == 0;
    return a->sign_bits != nullptr && a->group_scales != nullptr && a->salient_rowptr != nullptr &&
           a->salient_scale != nullptr && salient && codes;
}

bool valid_weights(const SageGemmArgs* a) {
    return a != nullptr && valid_sizes(a) && valid_weight_pointers(a) && a->reserved == 0 &&
           a->prepared_bytes >= 0 && (a->prepared != nullptr || a->prepared_bytes == 0);
}

bool valid_args(const SageGemmArgs* a) {
    if (!valid_weights(a)) return false;
    const bool kinds = valid_dtype(a->x_dtype) && (a->bias == nullptr || valid_dtype(a->bias_dtype)) &&
                       a->path >= SAGE_PATH_AUTO && a->path <= SAGE_PATH_GEMV3;
    return kinds && a->x != nullptr && a->y != nullptr;
}

sage::Problem make_problem(const SageGemmArgs& a) {
    sage::Problem p;
    p.x = a.x;
    p.sign = reinterpret_cast<const uint8_t*>(a.sign_bits);
    p.codes = reinterpret_cast<const uint8_t*>(a.group_codes);
    p.scales = reinterpret_cast<const __half*>(a.group_scales);
    p.rowptr = a.salient_rowptr;
    p.cols = a.salient_cols;
    p.q = a.salient_q;
    p.salient_scale = reinterpret_cast<const __half*>(a.salient_scale);
    p.row_scales = reinterpret_cast<const __half*>(a.row_scales);
    p.bias = a.bias;
    p.y = a.y;
    p.m = a.m;
    p.k = a.k;
    p.n = a.n;
    p.nnz = static_cast<int>(a.nnz);
    p.kb = (a.k + 7) / 8;
    p.groups = a.n_groups;
    p.planes = sage_gemm_planes(a.n_groups);
    p.bias_half = a.bias_dtype == SAGE_DTYPE_FLOAT16;
    return p;
}

// GEMV3 can run these arguments: its layout was prepared (and is big enough), float16 X, G <= 8, K <= 65535, and
// the device has mma.sync m16n8k16.
bool gemv3_runs(const SageGemmArgs& a, const sage::Problem& p) {
    const int64_t need = sage::gemv3_prepared_bytes(p);
    return a.prepared != nullptr && need > 0 && a.prepared_bytes >= need &&
           sage::gemv3_launchable(p, a.x_dtype == SAGE_DTYPE_FLOAT16) && sage::gemv3_device_ok();
}

int resolve_path(const SageGemmArgs& a, const sage::Problem& p) {
    if (a.path != SAGE_PATH_AUTO) return a.path;
    if (a.m <= SAGE_GEMV_MAX_M && gemv3_runs(a, p)) return SAGE_PATH_GEMV3;
    return a.m <= SAGE_GEMV_MAX_M ? SAGE_PATH_GEMV : SAGE_PATH_TILED;
}

}  // namespace

extern "C" {

SAGE_API int sage_gemm_auto_path(int64_t m) { return m <= SAGE_GEMV_MAX_M ? SAGE_PATH_GEMV : SAGE_PATH_TILED; }

SAGE_API int sage_gemm_choose_path(const SageGemmArgs* args) {
    if (!valid_args(args)) return -1;
    return resolve_path(*args, make_problem(*args));
}

SAGE_API int64_t sage_gemm_prepared_bytes(const SageGemmArgs* args) {
    if (!valid_weights(args)) return 0;
    return sage::gemv3_prepared_bytes(make_problem(*args));
}

SAGE_API int sage_gemm_prepare(const SageGemmArgs* args, cudaStream_t stream) {
    if (!valid_weights(args)) return cudaErrorInvalidValue;
    const sage::Problem p = make_problem(*args);
    const int64_t need = sage::gemv3_prepared_bytes(p);
    if (need == 0 || args->prepared == nullptr || args->prepared_bytes < need) return cudaErrorInvalidValue;
    return static_cast<int>(sage::prepare_gemv3(p, static_cast<uint32_t*>(const_cast<void*>(args->prepared)), stream));
}

SAGE_API int sage_gemm_launch(const SageGemmArgs* args, cudaStream_t stream) {
    if (!valid_args(args)) return cudaErrorInvalidValue;
    if (args->m == 0) return cudaSuccess;
    const sage::Problem p = make_problem(*args);
    const int path = resolve_path(*args, p);
    const bool half = args->x_dtype == SAGE_DTYPE_FLOAT16;
    cudaError_t status;
    if (path == SAGE_PATH_GEMV3) {
        // Forced without what it needs: refuse rather than read a layout that is not there (AUTO checked already).
        if (args->path == SAGE_PATH_GEMV3 && !gemv3_runs(*args, p)) return cudaErrorInvalidValue;
        status = sage::launch_gemv3(p, static_cast<const uint32_t*>(args->prepared), stream);
    } else if (path == SAGE_PATH_GEMV) {
        status = half ? sage::launch_gemv<__half>(p, stream) : sage::launch_gemv<float>(p, stream);
    } else if (path == SAGE_PATH_GEMV2) {
        status = half ? sage::launch_gemv2<__half>(p, stream) : sage::launch_gemv2<float>(p, stream);
    } else {
        status = half ? sage::launch_tiled<__half>(p, stream) : sage::launch_tiled<float>(p, stream);
    }
    return static_cast<int>(status);
}

SAGE_API const char* sage_gemm_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

SAGE_API int sage_gemm_abi_version(void) { return SAGE_GEMM_ABI_VERSION; }

SAGE_API size_t sage_gemm_args_size(void) { return sizeof(SageGemmArgs); }

}  // extern "C"
