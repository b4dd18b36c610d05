// Instantiates the decode-path launcher (kernels in sage_gemv_kernel.cuh).
#include "sage_gemv_kernel.cuh"

namespace sage {

template <typename T>
cudaError_t launch_gemv(const Problem& p, cudaStream_t stream) {
    return gemv::dispatch<T>(p, StreamLauncher{stream});
}

template cudaError_t launch_gemv<float>(const Problem&, cudaStream_t);
template cudaError_t launch_gemv<__half>(const Problem&, cudaStream_t);

}  // namespace sage
