// Fused forward (Monte-Carlo statistics + weighted CE) for bf16 logits and
// every samples dtype: each instantiation compiles all register buckets, both
// access modes and the class-chunked path.
#include "cuda/mc_kernels.cuh"

namespace uce_cuda {
namespace detail {

template cudaError_t launch_fused<DType::kBFloat16, DType::kFloat32>(
    const ForwardArgs&, float*, cudaStream_t);
template cudaError_t launch_fused<DType::kBFloat16, DType::kFloat16>(
    const ForwardArgs&, float*, cudaStream_t);
template cudaError_t launch_fused<DType::kBFloat16, DType::kBFloat16>(
    const ForwardArgs&, float*, cudaStream_t);

}  // namespace detail
}  // namespace uce_cuda
