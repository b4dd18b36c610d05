/* Launch API of the SageBinaryGemm CUDA kernels (op contract v3, docs/sage_binary_gemm.md).
 *
 * Y[M, N] = X[M, K] · Ŵᵀ (+ bias), Ŵ decoded on the fly from the packed layout; nothing dense is materialised.
 * Every caller (TensorRT plugin, Python ctypes runtime, benchmarks) goes through sage_gemm_launch, so this plain-C
 * struct is the single place where the layout's tensors meet the kernels. All pointers are device pointers.
 */
#ifndef SAGE_GEMM_API_H
#define SAGE_GEMM_API_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 2: nnz added after m (the kernels clamp the CSR arrays to it).
 * 3: prepared / prepared_bytes (the GEMV3 weight layout, made once by sage_gemm_prepare).
 * 4: row_scales after salient_scale (op contract v2: r_n multiplies every unsalient weight of row n).
 * 5: op contract v3: salient_cols is uint16_t (was int32_t; same field, so a v4 caller's int32 columns would be
 *    misread, hence the bump) and row_scales may be NULL (every r_n = 1). */
#define SAGE_GEMM_ABI_VERSION 5
/* Group indices are decoded with a lookup table of 2*SAGE_MAX_GROUPS entries (at most 4 code planes). */
#define SAGE_MAX_GROUPS 16
/* SAGE_PATH_AUTO runs the GEMV kernel up to this many activation rows and the tiled kernel above it. */
#define SAGE_GEMV_MAX_M 16
/* Largest K and N accepted. The kernels index columns and rows with int and step up to one tile or block past the
 * last one (k0 + BK, tile * 1024 + c, n_base + 63, (K + 7) / 8, ...); 2^30 leaves 2^30 of headroom below INT32_MAX
 * for all of them, so no bound check in an inner loop has to fear wrap-around. No real layer comes close. */
#define SAGE_MAX_FEATURES (1 << 30)
/* Largest K the op contract allows (v3): a salient column is stored in 16 bits. */
#define SAGE_MAX_K 65536

#if defined(_WIN32)
#define SAGE_API __declspec(dllexport)
#else
#define SAGE_API __attribute__((visibility("default")))
#endif

typedef enum SageDType { SAGE_DTYPE_FLOAT32 = 0, SAGE_DTYPE_FLOAT16 = 1 } SageDType;

/* SAGE_PATH_AUTO: GEMV3 for M <= SAGE_GEMV_MAX_M when it can run (prepared layout given, float16 X, G <= 8,
 * K <= 65535, a GPU of compute capability 8.0 or later); otherwise GEMV for M <= SAGE_GEMV_MAX_M and tiled above.
 * sage_gemm_choose_path says which one a launch would take. */
typedef enum SagePath {
    SAGE_PATH_AUTO = 0,  /* see above */
    SAGE_PATH_GEMV = 1,  /* decode kernel: batches of up to 8 rows per pass, any M */
    SAGE_PATH_TILED = 2, /* prefill kernel: 64x64 output tiles (WMMA for float16, SIMT for float32) */
    SAGE_PATH_GEMV2 = 3, /* decode kernel, no LUT, 8 output rows per block, any M */
    SAGE_PATH_GEMV3 = 4  /* decode kernel built for bandwidth: prepared layout, tensor cores (docs/plugin.md) */
} SagePath;

/* Pointers, then the 64-bit integers, then the 32-bit ones: every field is naturally aligned and there is no
 * padding, so the ctypes mirror (sage_export/runtime/kernels.py) lays it out identically on every 64-bit ABI. */
typedef struct SageGemmArgs {
    const void* x;                 /* [M, K] in x_dtype, row-major */
    const int8_t* sign_bits;       /* [N, ceil(K/8)]: bit j of byte c is column 8c+j, 1 -> +1 */
    const int8_t* group_codes;     /* [P, N, ceil(K/8)] bit planes of the group index; NULL allowed when P == 0 */
    const uint16_t* group_scales;  /* float16 bits [G] */
    const int32_t* salient_rowptr; /* [N + 1] CSR row pointers (clamped to [0, nnz], see sage_gemm_launch) */
    const uint16_t* salient_cols;  /* [nnz] ascending within a row (the contract's int8 [nnz, 2] little-endian
                                      bytes); NULL allowed when nnz == 0 */
    const int8_t* salient_q;       /* [nnz] signed integers; NULL allowed when nnz == 0 */
    const uint16_t* salient_scale; /* float16 bits [N] */
    const uint16_t* row_scales;    /* float16 bits [N]: r_n, the multiplier of row n's unsalient weights (v2), or
                                      NULL: every r_n is 1 (v3's empty row_scales) */
    const void* bias;              /* [N] in bias_dtype (the op contract: float32; float16 also accepted), or NULL */
    void* y;                       /* [M, N] in x_dtype, row-major */
    const void* prepared;          /* GEMV3 layout of these weights (sage_gemm_prepare), or NULL */
    int64_t m;                     /* activation rows (product of X's leading dims); 0 is a no-op */
    int64_t nnz;                   /* salient entries: the length of salient_cols and salient_q, 0..INT32_MAX */
    int64_t prepared_bytes;        /* size of the buffer behind `prepared` (0 when NULL) */
    int32_t k;                     /* in_features, 1..SAGE_MAX_K */
    int32_t n;                     /* out_features, 1..SAGE_MAX_FEATURES */
    int32_t n_groups;              /* G, 1..SAGE_MAX_GROUPS */
    int32_t salient_bits;          /* b, 2..8 (checked only: q is already stored as int8) */
    int32_t x_dtype;               /* SageDType of x and y */
    int32_t bias_dtype;            /* SageDType of bias (ignored when bias is NULL) */
    int32_t path;                  /* SagePath */
    int32_t reserved;              /* must be 0 */
} SageGemmArgs;

/* Number of group-code planes P = ceil(log2 G) for G >= 1 (0 when G == 1). */
static inline int32_t sage_gemm_planes(int32_t n_groups) {
    int32_t planes = 0;
    while ((1 << planes) < n_groups) ++planes;
    return planes;
}

/* Validates the arguments (cudaErrorInvalidValue without touching the device when they are wrong), enqueues the
 * kernel on `stream` and returns the cudaError_t of the launch as an int.
 *
 * The CSR contents live on the device and are not checked here; the kernels only make bad values harmless (garbage
 * out, never an illegal address): row r owns the entries [clamp(rowptr[r], 0, nnz), clamp(rowptr[r+1], that, nnz))
 * and an entry whose column lies outside [0, K) is skipped. Valid data is unaffected. */
SAGE_API int sage_gemm_launch(const SageGemmArgs* args, cudaStream_t stream);

/* The path SAGE_PATH_AUTO takes for m activation rows when GEMV3 cannot run (no prepared layout, ...). */
SAGE_API int sage_gemm_auto_path(int64_t m);

/* The path a launch with these arguments would take (resolves SAGE_PATH_AUTO), or -1 for invalid arguments. */
SAGE_API int sage_gemm_choose_path(const SageGemmArgs* args);

/* Bytes of the GEMV3 layout of these weights, or 0 when GEMV3 cannot take them (G > 8, K > 65535) or the
 * arguments are invalid. x, y and m are not looked at. */
SAGE_API int64_t sage_gemm_prepared_bytes(const SageGemmArgs* args);

/* Writes the GEMV3 layout of the weights into args->prepared (args->prepared_bytes must be at least
 * sage_gemm_prepared_bytes) on `stream`. Done once per set of weights; the launches then read it instead of the
 * contract's bit planes (they still read the CSR row pointers and the scales, row_scales included: the layout does
 * not depend on them). */
SAGE_API int sage_gemm_prepare(const SageGemmArgs* args, cudaStream_t stream);

/* Text of a code returned by sage_gemm_launch. */
SAGE_API const char* sage_gemm_error_string(int code);

/* Let callers (ctypes) check that they were built against this struct. */
SAGE_API int sage_gemm_abi_version(void);
SAGE_API size_t sage_gemm_args_size(void);

#ifdef __cplusplus
}
#endif

#endif /* SAGE_GEMM_API_H */
