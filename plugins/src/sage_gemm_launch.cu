// Host side of the launch API: argument validation (no device call on bad input) and path dispatch.
#include "sage_gemm_internal.cuh"

namespace {

bool valid_dtype(int32_t dtype) { return dtype == SAGE_DTYPE_FLOAT32 || dtype == SAGE_DTYPE_FLOAT16; }

// K and N up to SAGE_MAX_FEATURES keep the kernels' int index math from wrapping (see sage_gemm_api.h); nnz up
// to INT32_MAX fits their int CSR cursors, which the clamped row pointers never carry past it.
bool valid_sizes(const SageGemmArgs* a) {
    return a->m >= 0 && a->k >= 1 && a->k <= SAGE_MAX_FEATURES && a->n >= 1 && a->n <= SAGE_MAX_FEATURES &&
           a->nnz >= 0 && a->nnz <= INT32_MAX && a->n_groups >= 1 && a->n_groups <= SAGE_MAX_GROUPS &&
           a->salient_bits >= 2 && a->salient_bits <= 8;
}

bool valid_pointers(const SageGemmArgs* a) {
    const bool salient = a->nnz == 0 || (a->salient_cols != nullptr && a->salient_q != nullptr);
    return a->x != nullptr && a->sign_bits != nullptr && a->group_scales != nullptr &&
           a->salient_rowptr != nullptr && a->salient_scale != nullptr && a->y != nullptr && salient &&
           (a->group_codes != nullptr || sage_gemm_planes(a->n_groups) == 0);
}

bool valid_args(const SageGemmArgs* a) {
    if (a == nullptr) return false;
    const bool kinds = valid_dtype(a->x_dtype) && (a->bias == nullptr || valid_dtype(a->bias_dtype)) &&
                       a->path >= SAGE_PATH_AUTO && a->path <= SAGE_PATH_GEMV2 && a->reserved == 0;
    return valid_sizes(a) && kinds && valid_pointers(a);
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

}  // namespace

extern "C" {

// GEMV2 is not chosen automatically until a GPU has measured it (see SagePath in sage_gemm_api.h).
SAGE_API int sage_gemm_auto_path(int64_t m) { return m <= SAGE_GEMV_MAX_M ? SAGE_PATH_GEMV : SAGE_PATH_TILED; }

SAGE_API int sage_gemm_launch(const SageGemmArgs* args, cudaStream_t stream) {
    if (!valid_args(args)) return cudaErrorInvalidValue;
    if (args->m == 0) return cudaSuccess;
    const sage::Problem p = make_problem(*args);
    const int path = args->path == SAGE_PATH_AUTO ? sage_gemm_auto_path(args->m) : args->path;
    const bool half = args->x_dtype == SAGE_DTYPE_FLOAT16;
    cudaError_t status;
    if (path == SAGE_PATH_GEMV) {
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
