// Instantiates the prefill-path launcher (kernels in sage_tiled_kernel.cuh).
#include "sage_tiled_kernel.cuh"

namespace sage {

template <typename T>
cudaError_t launch_tiled(const Problem& p, cudaStream_t stream) {
    return tiled::dispatch<T>(p, StreamLauncher{stream});
}

template cudaError_t launch_tiled<float>(const Problem&, cudaStream_t);
template cudaError_t launch_tiled<__half>(const Problem&, cudaStream_t);

}  // namespace sage
