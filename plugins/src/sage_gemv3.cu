// Instantiates the GEMV3 decode path and its one-time weight preparation (kernels in sage_gemv3_kernel.cuh).
#include "sage_gemv3_kernel.cuh"

namespace sage {

cudaError_t launch_gemv3(const Problem& p, const uint32_t* prepared, cudaStream_t stream) {
    return gemv3::dispatch(p, prepared, StreamLauncher{stream});
}

cudaError_t prepare_gemv3(const Problem& p, uint32_t* prepared, cudaStream_t stream) {
    return gemv3::prepare(p, prepared, StreamLauncher{stream});
}

int64_t gemv3_prepared_bytes(const Problem& p) { return gemv3::prepared_bytes(p); }

bool gemv3_launchable(const Problem& p, bool half_x) { return gemv3::launchable(p, half_x); }

bool gemv3_device_ok() {
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
    return major >= 8;
}

}  // namespace sage
