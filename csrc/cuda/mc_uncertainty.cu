// mc_uncertainty (Monte-Carlo statistics alone) for every samples dtype.
#include "cuda/uce_kernels.cuh"

namespace uce_cuda {
namespace detail {

template cudaError_t launch_mc<DType::kFloat32>(const ForwardArgs&, float*,
                                                cudaStream_t);
template cudaError_t launch_mc<DType::kFloat16>(const ForwardArgs&, float*,
                                                cudaStream_t);
template cudaError_t launch_mc<DType::kBFloat16>(const ForwardArgs&, float*,
                                                 cudaStream_t);

}  // namespace detail
}  // namespace uce_cuda
