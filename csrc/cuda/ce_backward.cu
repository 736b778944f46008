// uce_forward with sigma given (CE alone) and uce_backward, every dtype.
#include "cuda/uce_kernels.cuh"

namespace uce_cuda {
namespace detail {

template cudaError_t launch_ce<DType::kFloat32>(const ForwardArgs&,
                                                cudaStream_t);
template cudaError_t launch_ce<DType::kFloat16>(const ForwardArgs&,
                                                cudaStream_t);
template cudaError_t launch_ce<DType::kBFloat16>(const ForwardArgs&,
                                                 cudaStream_t);

template cudaError_t launch_backward<DType::kFloat32>(const BackwardArgs&,
                                                      cudaStream_t);
template cudaError_t launch_backward<DType::kFloat16>(const BackwardArgs&,
                                                      cudaStream_t);
template cudaError_t launch_backward<DType::kBFloat16>(const BackwardArgs&,
                                                       cudaStream_t);

}  // namespace detail
}  // namespace uce_cuda
