// Instantiates the bandwidth-oriented decode launcher (kernels in sage_gemv2_kernel.cuh).
#include "sage_gemv2_kernel.cuh"

namespace sage {

template <typename T>
cudaError_t launch_gemv2(const Problem& p, cudaStream_t stream) {
    return gemv2::dispatch<T>(p, StreamLauncher{stream});
}

template cudaError_t launch_gemv2<float>(const Problem&, cudaStream_t);
template cudaError_t launch_gemv2<__half>(const Problem&, cudaStream_t);

}  // namespace sage
